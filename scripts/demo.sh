#!/usr/bin/env bash
# The main job: a local 3-shard cluster, concurrent cross-shard transfers with coordinator SIGKILLs,
# and a verdict. Extra arguments go to `treaty demo` (for example --json or --duration 60).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-postgres.sh
echo "building the release binaries (a few minutes on a fresh clone) ..." >&2
cargo build --release --bins
export TREATY_BIN_DIR="${CARGO_TARGET_DIR:-$PWD/target}/release"
exec "$TREATY_BIN_DIR/treaty" demo "$@"
