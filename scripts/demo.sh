#!/usr/bin/env bash
# The main job: a local 3-shard cluster, concurrent cross-shard transfers with coordinator SIGKILLs,
# and a verdict. Extra arguments go to `treaty demo` (for example --json or --duration 60).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-postgres.sh
echo "building the release binaries with failpoints (a few minutes on a fresh clone) ..." >&2
# `treaty demo` refuses service binaries built without failpoints (treaty-lab's fault_build.rs).
cargo build --release --workspace --bins --features treaty-coordinator/failpoints,treaty-participant/failpoints
export TREATY_BIN_DIR="${CARGO_TARGET_DIR:-$PWD/target}/release"
exec "$TREATY_BIN_DIR/treaty" demo "$@"
