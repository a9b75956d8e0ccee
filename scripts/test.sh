#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, and end-to-end tests on real PostgreSQL
# clusters and real Treaty processes over loopback. Each step says what it is doing.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n==> %s\n' "$*"; }

step "checking PostgreSQL server binaries"
scripts/ensure-postgres.sh
step "checking headless Chromium (the web console's end-to-end test)"
scripts/ensure-chromium.sh
step "cargo fmt --check"
cargo fmt --all -- --check
# The end-to-end tests arm failpoints, so everything is built, linted and tested with them: the
# `build-fi` alias (.cargo/config.toml) and the same features for clippy and the tests. A step
# without them would rebuild target/debug/treaty-* without failpoints.
FI_FEATURES="treaty-coordinator/failpoints,treaty-participant/failpoints"
step "building the fault-injection binaries (treaty, treaty-coordinator, treaty-participant): cargo build-fi"
cargo build-fi
export TREATY_BIN_DIR="${CARGO_TARGET_DIR:-$PWD/target}/debug"
step "cargo clippy -D warnings (with failpoints)"
cargo clippy --workspace --all-targets --features "$FI_FEATURES" -- -D warnings
step "cargo clippy -D warnings (the release configuration: no failpoints, no Admin service)"
cargo clippy -p treaty-failpoints -p treaty-coordinator -p treaty-participant --all-targets -- -D warnings
step "unit tests of the release configuration (arming refused, no Admin service)"
cargo test -p treaty-failpoints -p treaty-coordinator -p treaty-participant --lib --no-fail-fast
step "treaty-client with its otel feature (each call carries the caller's traceparent)"
cargo clippy -p treaty-client --all-targets --features otel -- -D warnings
cargo test -p treaty-client --features otel --lib --no-fail-fast
step "running the tests (with failpoints)"
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --features "$FI_FEATURES" --no-fail-fast "$@"
else
  cargo test --workspace --features "$FI_FEATURES" --no-fail-fast "$@"
fi
step "all tests passed"
