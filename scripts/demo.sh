#!/usr/bin/env bash
# The main job: a local 3-shard cluster, concurrent cross-shard transfers with coordinator SIGKILLs,
# and a verdict. Extra arguments go to `treaty demo` (for example --json or --duration 60).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-postgres.sh
cargo build --release --bins --quiet
export TREATY_BIN_DIR="$PWD/target/release"
exec target/release/treaty demo "$@"
