//! The participant's failpoints: their names, what each site accepts, and the one-line helpers the
//! agent and the service call. docs/failpoints.md says what recovery must do at each.
//!
//! Only with the cargo feature `failpoints` (off by default; `cargo build-fi`). Without it the
//! names are zero-sized (no name is in the binary), the helpers are inline no-ops, arming at start
//! is refused, and `lib.rs` registers no `Admin` service.

use std::time::Duration;

use tonic::Status;
use treaty_failpoints::{Catalog, Point, Return, failpoint_name};
pub use treaty_failpoints::{FailpointError, Fired, Name, is_armed};
use treaty_proto::ApiError;

use crate::error::BranchError;

/// The branch wrote something; `PREPARE TRANSACTION` has not run.
pub const BEFORE_PREPARE: Name = failpoint_name!("participant::before-prepare");
/// `PREPARE TRANSACTION` succeeded; nothing else has happened yet.
pub const AFTER_PREPARE: Name = failpoint_name!("participant::after-prepare");
/// The vote is cast (whatever it is); the answer to `Prepare` is about to go back.
pub const BEFORE_PREPARE_REPLY: Name = failpoint_name!("participant::before-prepare-reply");
/// `COMMIT PREPARED` is about to run.
pub const BEFORE_COMMIT_PREPARED: Name = failpoint_name!("participant::before-commit-prepared");
/// `COMMIT PREPARED` succeeded; nothing else has happened yet.
pub const AFTER_COMMIT_PREPARED: Name = failpoint_name!("participant::after-commit-prepared");
/// `ROLLBACK PREPARED` is about to run.
pub const BEFORE_ROLLBACK_PREPARED: Name = failpoint_name!("participant::before-rollback-prepared");
/// `ROLLBACK PREPARED` succeeded; nothing else has happened yet.
pub const AFTER_ROLLBACK_PREPARED: Name = failpoint_name!("participant::after-rollback-prepared");
/// The commit is applied; the answer to `Commit` is about to go back.
pub const BEFORE_COMMIT_REPLY: Name = failpoint_name!("participant::before-commit-reply");
/// The decision branch is open and `CommitDecision` is about to insert its commit row and COMMIT.
pub const BEFORE_COMMIT_DECISION: Name = failpoint_name!("participant::before-commit-decision");
/// The commit row is committed (the decision is made); the answer to `CommitDecision` is about to
/// go back.
pub const BEFORE_COMMIT_DECISION_REPLY: Name = failpoint_name!("participant::before-commit-decision-reply");
/// Deliberately unsafe, to prove the checker catches a broken build: recovery COMMITs a branch
/// left prepared past `--in-doubt-after-ms` on its own instead of asking the coordinator.
pub const UNSAFE_COMMIT_IN_DOUBT: Name = failpoint_name!("participant::unsafe-commit-in-doubt");

static POINTS: &[Point] = &[
    Point {
        name: BEFORE_PREPARE,
        returns: &[Return::Error],
    },
    Point {
        name: AFTER_PREPARE,
        returns: &[Return::Error],
    },
    Point {
        name: BEFORE_PREPARE_REPLY,
        returns: &[Return::Error, Return::Drop],
    },
    Point {
        name: BEFORE_COMMIT_PREPARED,
        returns: &[Return::Error],
    },
    Point {
        name: AFTER_COMMIT_PREPARED,
        returns: &[Return::Error],
    },
    Point {
        name: BEFORE_ROLLBACK_PREPARED,
        returns: &[Return::Error],
    },
    Point {
        name: AFTER_ROLLBACK_PREPARED,
        returns: &[Return::Error],
    },
    Point {
        name: BEFORE_COMMIT_REPLY,
        returns: &[Return::Error, Return::Drop],
    },
    Point {
        name: BEFORE_COMMIT_DECISION,
        returns: &[Return::Error],
    },
    Point {
        name: BEFORE_COMMIT_DECISION_REPLY,
        returns: &[Return::Error, Return::Drop],
    },
    Point {
        name: UNSAFE_COMMIT_IN_DOUBT,
        returns: &[Return::On],
    },
];

/// The participant's failpoints, served by its `Admin` service.
pub static CATALOG: Catalog = Catalog::new(POINTS);

/// What the agent's `Admin` service serves.
pub static ADMIN: [&Catalog; 1] = [&CATALOG];

/// Whether this binary was built with failpoints (its `--version` then says `(failpoints)`).
pub const BUILT_IN: bool = cfg!(feature = "failpoints");

/// How long a dropped reply is held back: longer than any of the coordinator's RPC deadlines, so
/// the coordinator sees a lost answer (its own timeout), not an error.
const DROPPED_REPLY_HOLD: Duration = Duration::from_secs(60);

/// Evaluates a failpoint; always `None` in a build without the `failpoints` feature.
#[inline]
pub fn hit(name: Name) -> Option<Fired> {
    if BUILT_IN {
        treaty_failpoints::hit(name)
    } else {
        None
    }
}

/// A failpoint at a step of the agent: `return(error)` fails the step as an unreachable database
/// would (the RPC answers UNAVAILABLE).
#[inline]
pub fn step(name: Name) -> Result<(), BranchError> {
    match hit(name) {
        None | Some(Fired::On) => Ok(()),
        Some(Fired::Error | Fired::Drop) => Err(BranchError::Unavailable(format!("failpoint {name}"))),
    }
}

/// A failpoint before an answer goes back: `return(error)` answers UNAVAILABLE instead;
/// `return(drop)` answers nothing until the caller has given up (the work is done either way).
#[inline]
pub async fn reply(name: Name) -> Result<(), Status> {
    match hit(name) {
        None | Some(Fired::On) => Ok(()),
        Some(Fired::Error) => Err(Status::from(ApiError::Unavailable(format!("failpoint {name}")))),
        Some(Fired::Drop) => {
            tokio::time::sleep(DROPPED_REPLY_HOLD).await;
            Err(Status::from(ApiError::Unavailable(format!(
                "failpoint {name}: the reply was dropped"
            ))))
        }
    }
}

/// Arms `--failpoints NAME=ACTIONS;...` at start; refused, saying how to build a binary that has
/// failpoints, by a build without them (even when another crate of the build turned on
/// `treaty-failpoints`' registry).
pub fn arm_at_start(spec: Option<&str>) -> Result<(), FailpointError> {
    match spec {
        Some(spec) if !spec.trim().is_empty() => {
            if !BUILT_IN {
                return Err(FailpointError::NotBuiltIn(spec.trim().to_owned()));
            }
            treaty_failpoints::configure(&CATALOG, spec)
        }
        _ => Ok(()),
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
        assert!(names.iter().all(|n| n.starts_with("participant::")));
    }

    #[cfg(feature = "failpoints")]
    #[test]
    fn the_flag_refuses_unknown_names_and_unsupported_returns() {
        let error = arm_at_start(Some("participant::nope=off")).unwrap_err();
        assert!(error.to_string().contains(AFTER_PREPARE.as_str()), "{error}");
        let error = arm_at_start(Some("participant::after-prepare=return(drop)")).unwrap_err();
        assert!(
            error.to_string().contains("accepts return(crash), return(error)"),
            "{error}"
        );
        let error = arm_at_start(Some("participant::after-prepare")).unwrap_err();
        assert!(error.to_string().contains("NAME=ACTIONS"), "{error}");
    }

    #[test]
    fn unarmed_points_are_inert() {
        assert!(step(BEFORE_COMMIT_PREPARED).is_ok());
        assert_eq!(hit(AFTER_ROLLBACK_PREPARED), None);
    }

    /// A build without failpoints refuses `--failpoints`, saying how to build one that has them.
    #[cfg(not(feature = "failpoints"))]
    #[test]
    fn without_the_feature_the_flag_is_refused_with_the_way_to_build_it() {
        let error = arm_at_start(Some("participant::after-prepare=return(crash)")).unwrap_err();
        assert!(matches!(error, FailpointError::NotBuiltIn(_)), "{error:?}");
        let message = error.to_string();
        assert!(
            message.contains("built without failpoints") && message.contains("cargo build-fi"),
            "{message}"
        );
        assert!(arm_at_start(None).is_ok());
        assert_eq!(CATALOG.len(), 11);
        assert_eq!(std::mem::size_of::<Name>(), 0, "no name is in the binary");
    }
}
