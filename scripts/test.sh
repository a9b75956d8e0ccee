#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, and end-to-end tests on real PostgreSQL
# clusters and real Treaty processes over loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-postgres.sh
cargo fmt --all -- --check
cargo build --workspace --bins --quiet
export TREATY_BIN_DIR="$PWD/target/debug"
cargo clippy --workspace --all-targets --quiet -- -D warnings
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
