#!/usr/bin/env bash
# Makes sure headless Chromium is present for the web console's end-to-end test
# (tests/e2e/console.rs runs `chromium --headless --dump-dom`). Installs Debian's `chromium`
# package if it is missing and we are root; otherwise says what to install.
set -euo pipefail

# TREATY_CHROMIUM names another binary (the test reads the same variable).
if [ -n "${TREATY_CHROMIUM:-}" ]; then
  if [ -x "$TREATY_CHROMIUM" ]; then exit 0; fi
  echo "TREATY_CHROMIUM=$TREATY_CHROMIUM is not an executable file." >&2
  exit 1
fi
if [ -x /usr/bin/chromium ]; then exit 0; fi

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "chromium not found: installing Debian's chromium package with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; then
    echo "Installing chromium with apt-get failed (see above); the console test needs it." >&2
    echo "Install it by hand (Debian: apt-get install chromium) or set TREATY_CHROMIUM to a Chromium binary." >&2
    exit 1
  fi
  if [ ! -x /usr/bin/chromium ]; then
    echo "apt-get installed chromium but /usr/bin/chromium is missing; set TREATY_CHROMIUM to the binary." >&2
    exit 1
  fi
else
  echo "Chromium (/usr/bin/chromium) is not installed; the web console's end-to-end test needs it." >&2
  echo "Install it (Debian: sudo apt-get install chromium) or set TREATY_CHROMIUM to a Chromium binary." >&2
  exit 1
fi
