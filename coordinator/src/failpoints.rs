//! The coordinator's failpoints: their names, what each site accepts, and the one-line helpers the
//! driver calls. Sites sit in `driver` (the code that carries out the protocol's actions), never in
//! `protocol`, which stays pure. docs/failpoints.md says what recovery must do at each.
//!
//! Only with the cargo feature `failpoints` (off by default; `cargo build-fi`). Without it the
//! names are zero-sized (no name is in the binary), the helpers are inline no-ops, arming at start
//! is refused, and `lib.rs` registers no `Admin` service.

use treaty_failpoints::{Catalog, Point, Return, failpoint_name};
pub use treaty_failpoints::{FailpointError, Fired, Name};

/// All votes are YES; the commit record is not written yet.
pub const BEFORE_COMMIT_DECISION: Name = failpoint_name!("coordinator::before-commit-decision");
/// The commit record is durable; nothing else has happened yet.
pub const AFTER_COMMIT_DECISION: Name = failpoint_name!("coordinator::after-commit-decision");
/// PREPARE went to the first participant (and it answered); the others are not sent yet.
pub const AFTER_SOME_PREPARES: Name = failpoint_name!("coordinator::after-some-prepares");
/// The decision is durable and processed; no COMMIT has been sent.
pub const BEFORE_COMMIT_SENDS: Name = failpoint_name!("coordinator::before-commit-sends");
/// The first participant acknowledged COMMIT; the others are not sent yet.
pub const BETWEEN_COMMIT_SENDS: Name = failpoint_name!("coordinator::between-commit-sends");
/// 3PC: every vote is YES; the pre-commit record is not written yet.
pub const BEFORE_PRE_COMMIT_RECORD: Name = failpoint_name!("coordinator::before-pre-commit-record");
/// 3PC: the pre-commit record is durable; no PreCommit has been sent.
pub const BEFORE_PRE_COMMIT_SENDS: Name = failpoint_name!("coordinator::before-pre-commit-sends");
/// 3PC: the first participant acknowledged PreCommit; the others are not sent yet.
pub const AFTER_SOME_PRE_COMMITS: Name = failpoint_name!("coordinator::after-some-pre-commits");
/// Every participant acknowledged; the end record is not written yet.
pub const BEFORE_END_RECORD: Name = failpoint_name!("coordinator::before-end-record");
/// The end record was handed to the log (lazily: it may not be durable yet).
pub const AFTER_END_RECORD: Name = failpoint_name!("coordinator::after-end-record");

/// Before an fsync of appended records: a bare `return` cuts `decisions.log` back to what is
/// already synced and aborts, as a power cut would (see `log_faults`).
pub const LOG_LOSES_UNSYNCED_TAIL: Name = failpoint_name!("coordinator::log-loses-unsynced-tail");

static POINTS: &[Point] = &[
    Point {
        name: BEFORE_COMMIT_DECISION,
        returns: &[Return::Error],
    },
    Point {
        name: AFTER_COMMIT_DECISION,
        returns: &[Return::Error],
    },
    Point {
        name: AFTER_SOME_PREPARES,
        returns: &[Return::Error, Return::Drop],
    },
    Point {
        name: BEFORE_COMMIT_SENDS,
        returns: &[Return::Error, Return::Drop],
    },
    Point {
        name: BETWEEN_COMMIT_SENDS,
        returns: &[Return::Error, Return::Drop],
    },
    Point {
        name: BEFORE_PRE_COMMIT_RECORD,
        returns: &[Return::Error],
    },
    Point {
        name: BEFORE_PRE_COMMIT_SENDS,
        returns: &[Return::Error, Return::Drop],
    },
    Point {
        name: AFTER_SOME_PRE_COMMITS,
        returns: &[Return::Error, Return::Drop],
    },
    Point {
        name: BEFORE_END_RECORD,
        returns: &[Return::Error, Return::Drop],
    },
    Point {
        name: AFTER_END_RECORD,
        returns: &[],
    },
    Point {
        name: LOG_LOSES_UNSYNCED_TAIL,
        returns: &[Return::On],
    },
];

/// The coordinator's failpoints, served by its `Admin` service.
pub static CATALOG: Catalog = Catalog::new(POINTS);

/// What the `Admin` service serves without shards in process.
pub static ADMIN: [&Catalog; 1] = [&CATALOG];

/// What it serves with shards in process: their participants' points fire in this process too.
pub static ADMIN_WITH_IN_PROCESS: [&Catalog; 2] = [&CATALOG, &treaty_participant::failpoints::CATALOG];

/// Whether this binary was built with failpoints (its `--version` then says `(failpoints)`).
pub const BUILT_IN: bool = cfg!(feature = "failpoints");

/// Evaluates a failpoint (see `treaty_failpoints::hit`); always `None` in a build without the
/// `failpoints` feature.
#[inline]
pub fn hit(name: Name) -> Option<Fired> {
    if BUILT_IN {
        treaty_failpoints::hit(name)
    } else {
        None
    }
}

/// Whether a failpoint is armed: the fan-outs only split off their first send when it is.
#[inline]
pub fn armed(name: Name) -> bool {
    BUILT_IN && treaty_failpoints::is_armed(name)
}

/// How the messages of a fan-out fare after a failpoint was evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Sent as usual.
    Send,
    /// `return(error)`: refused on the spot, as if the participant were unreachable.
    Fail(Name),
    /// `return(drop)`: lost on the way; the caller waits for its normal timeout.
    Lose,
}

/// Evaluates `name` at a fan-out and says what happens to the messages after it.
#[inline]
pub fn delivery(name: Name) -> Delivery {
    match hit(name) {
        None | Some(Fired::On) => Delivery::Send,
        Some(Fired::Error) => Delivery::Fail(name),
        Some(Fired::Drop) => Delivery::Lose,
    }
}

/// Arms `--failpoints NAME=ACTIONS;...` at start; refused, saying how to build a binary that has
/// failpoints, by a build without them.
pub fn arm_at_start(spec: Option<&str>) -> Result<(), FailpointError> {
    match spec {
        Some(spec) if !spec.trim().is_empty() => {
            built_in(spec)?;
            treaty_failpoints::configure(&CATALOG, spec)
        }
        _ => Ok(()),
    }
}

/// Arms one point by name (`--crash-at`); refused by a build without failpoints.
pub fn set(name: &str, actions: &str) -> Result<(), FailpointError> {
    built_in(&format!("{name}={actions}"))?;
    treaty_failpoints::set(&CATALOG, name, actions)
}

/// Refuses to arm `what` in a build without failpoints (even when another crate of the build
/// turned on `treaty-failpoints`' registry).
fn built_in(what: &str) -> Result<(), FailpointError> {
    if BUILT_IN {
        Ok(())
    } else {
        Err(FailpointError::NotBuiltIn(what.trim().to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "failpoints")]
    #[test]
    fn every_point_is_named_for_its_binary_and_unique() {
        let names: Vec<&str> = CATALOG.names().collect();
        assert_eq!(names.len(), 11);
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
        assert!(names.iter().all(|n| n.starts_with("coordinator::")));
    }

    #[cfg(feature = "failpoints")]
    #[test]
    fn the_flag_refuses_unknown_names_and_unsupported_returns() {
        let error = arm_at_start(Some("coordinator::nope=return(crash)")).unwrap_err();
        assert!(
            error.to_string().contains(BETWEEN_COMMIT_SENDS.as_str()),
            "{error}"
        );
        let error = arm_at_start(Some("coordinator::after-end-record=return(drop)")).unwrap_err();
        assert!(error.to_string().contains("accepts return(crash)"), "{error}");
        assert!(arm_at_start(None).is_ok());
        assert!(arm_at_start(Some(" ")).is_ok());
    }

    /// A build without failpoints refuses `--failpoints` and `--crash-at`, saying how to build one
    /// that has them, and its sites are inert.
    #[cfg(not(feature = "failpoints"))]
    #[test]
    fn without_the_feature_arming_is_refused_with_the_way_to_build_it() {
        for error in [
            arm_at_start(Some("coordinator::after-end-record=return(crash)")).unwrap_err(),
            set("coordinator::after-end-record", "1*return(crash)").unwrap_err(),
        ] {
            assert!(matches!(error, FailpointError::NotBuiltIn(_)), "{error:?}");
            assert!(error.to_string().contains("cargo build-fi"), "{error}");
        }
        assert!(arm_at_start(None).is_ok());
        assert!(arm_at_start(Some(" ")).is_ok());
        assert_eq!(CATALOG.len(), 11);
        assert_eq!(std::mem::size_of::<Name>(), 0, "no name is in the binary");
        assert!(!armed(BETWEEN_COMMIT_SENDS));
        assert_eq!(delivery(BETWEEN_COMMIT_SENDS), Delivery::Send);
    }
}
