#!/usr/bin/env bash
# The main job: a local 3-shard cluster, concurrent cross-shard transfers with coordinator SIGKILLs,
# and a verdict. Extra arguments go to `treaty demo` (for example --json or --duration 60).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-postgres.sh
# `treaty demo` runs on the fault-injection binaries (built with failpoints; their --version says
# so): `cargo build-fi` is the alias in .cargo/config.toml.
echo "building the fault-injection release binaries: cargo build-fi --release (a few minutes on a fresh clone) ..." >&2
cargo build-fi --release
export TREATY_BIN_DIR="${CARGO_TARGET_DIR:-$PWD/target}/release"
exec "$TREATY_BIN_DIR/treaty" demo "$@"
