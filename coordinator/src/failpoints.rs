//! The coordinator's failpoints: their names, what each site accepts, and the one-line helpers the
//! driver calls. Sites sit in `driver` (the code that carries out the protocol's actions), never in
//! `protocol`, which stays pure. docs/failpoints.md says what recovery must do at each.

pub use treaty_proto::failpoints::Fired;
use treaty_proto::failpoints::{Catalog, Point, Return};

/// All votes are YES; the commit record is not written yet.
pub const BEFORE_COMMIT_DECISION: &str = "coordinator::before-commit-decision";
/// The commit record is durable; nothing else has happened yet.
pub const AFTER_COMMIT_DECISION: &str = "coordinator::after-commit-decision";
/// PREPARE went to the first participant (and it answered); the others are not sent yet.
pub const AFTER_SOME_PREPARES: &str = "coordinator::after-some-prepares";
/// The decision is durable and processed; no COMMIT has been sent.
pub const BEFORE_COMMIT_SENDS: &str = "coordinator::before-commit-sends";
/// The first participant acknowledged COMMIT; the others are not sent yet.
pub const BETWEEN_COMMIT_SENDS: &str = "coordinator::between-commit-sends";
/// 3PC: every vote is YES; the pre-commit record is not written yet.
pub const BEFORE_PRE_COMMIT_RECORD: &str = "coordinator::before-pre-commit-record";
/// 3PC: the pre-commit record is durable; no PreCommit has been sent.
pub const BEFORE_PRE_COMMIT_SENDS: &str = "coordinator::before-pre-commit-sends";
/// 3PC: the first participant acknowledged PreCommit; the others are not sent yet.
pub const AFTER_SOME_PRE_COMMITS: &str = "coordinator::after-some-pre-commits";
/// Every participant acknowledged; the end record is not written yet.
pub const BEFORE_END_RECORD: &str = "coordinator::before-end-record";
/// The end record was handed to the log (lazily: it may not be durable yet).
pub const AFTER_END_RECORD: &str = "coordinator::after-end-record";

/// Before an fsync of appended records: a bare `return` cuts `decisions.log` back to what is
/// already synced and aborts, as a power cut would (see `log_faults`).
pub const LOG_LOSES_UNSYNCED_TAIL: &str = "coordinator::log-loses-unsynced-tail";

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
pub static CATALOG: Catalog = Catalog::new(POINTS, cfg!(feature = "failpoints"));

/// Evaluates a failpoint (see `treaty_proto::failpoints::hit`); always `None` in a build without
/// the `failpoints` feature.
pub fn hit(name: &'static str) -> Option<Fired> {
    if cfg!(feature = "failpoints") {
        treaty_proto::failpoints::hit(name)
    } else {
        None
    }
}

/// Whether a failpoint is armed: the fan-outs only split off their first send when it is.
pub fn armed(name: &'static str) -> bool {
    cfg!(feature = "failpoints") && treaty_proto::failpoints::is_armed(name)
}

/// How the messages of a fan-out fare after a failpoint was evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Sent as usual.
    Send,
    /// `return(error)`: refused on the spot, as if the participant were unreachable.
    Fail(&'static str),
    /// `return(drop)`: lost on the way; the caller waits for its normal timeout.
    Lose,
}

/// Evaluates `name` at a fan-out and says what happens to the messages after it.
pub fn delivery(name: &'static str) -> Delivery {
    match hit(name) {
        None | Some(Fired::On) => Delivery::Send,
        Some(Fired::Error) => Delivery::Fail(name),
        Some(Fired::Drop) => Delivery::Lose,
    }
}

/// Arms `--failpoints NAME=ACTIONS;...` at start.
pub fn arm_at_start(spec: Option<&str>) -> Result<(), treaty_proto::failpoints::FailpointError> {
    match spec {
        Some(spec) if !spec.trim().is_empty() => treaty_proto::failpoints::configure(&CATALOG, spec),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn the_flag_refuses_unknown_names_and_unsupported_returns() {
        let error = arm_at_start(Some("coordinator::nope=return(crash)")).unwrap_err();
        assert!(error.to_string().contains(BETWEEN_COMMIT_SENDS), "{error}");
        let error = arm_at_start(Some("coordinator::after-end-record=return(drop)")).unwrap_err();
        assert!(error.to_string().contains("accepts return(crash)"), "{error}");
        assert!(arm_at_start(None).is_ok());
        assert!(arm_at_start(Some(" ")).is_ok());
    }
}
