#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, and end-to-end tests on real PostgreSQL
# clusters and real Treaty processes over loopback. Each step says what it is doing.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n==> %s\n' "$*"; }

step "checking PostgreSQL server binaries"
scripts/ensure-postgres.sh
step "cargo fmt --check"
cargo fmt --all -- --check
step "building the binaries (treaty, treaty-coordinator, treaty-participant)"
cargo build --workspace --bins
export TREATY_BIN_DIR="${CARGO_TARGET_DIR:-$PWD/target}/debug"
step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
step "running the tests"
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
step "all tests passed"
