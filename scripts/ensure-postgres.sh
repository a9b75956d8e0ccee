#!/usr/bin/env bash
# Makes sure PostgreSQL server binaries (initdb, pg_ctl, postgres) and, when running as root, an
# unprivileged `postgres` user to run them as are present. Installs them from Debian's packages if
# missing and we are root; otherwise says what to install.
set -euo pipefail

find_initdb() {
  if [ -n "${TREATY_PG_BIN_DIR:-}" ] && [ -x "$TREATY_PG_BIN_DIR/initdb" ]; then return 0; fi
  if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then return 0; fi
  if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then return 0; fi
  command -v initdb >/dev/null 2>&1
}

if ! find_initdb; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "PostgreSQL server binaries not found: installing them with apt-get" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "PostgreSQL server binaries (initdb, pg_ctl, postgres) are not installed." >&2
    echo "Install them (Debian/Ubuntu: sudo apt-get install postgresql) or set TREATY_PG_BIN_DIR." >&2
    exit 1
  fi
fi

# PostgreSQL refuses to run as root: the harness runs it as `postgres`, which must exist.
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
  useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
fi
