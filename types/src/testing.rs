//! Test support shared by the crates' property tests (feature `testing`, turned on only by their
//! dev-dependencies): how many cases a property runs, one rule for all of them.

use std::io::Write as _;

/// `PROPTEST_CASES` when set (more on demand), else `default`. Printed straight to stderr, past the
/// test harness's capture, so that a passing CI run shows each property's count too.
pub fn property_cases(property: &str, default: u32) -> u32 {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default);
    let _ = writeln!(
        std::io::stderr(),
        "property {property}: {cases} cases (PROPTEST_CASES to change)"
    );
    cases
}
