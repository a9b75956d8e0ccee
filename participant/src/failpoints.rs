//! The participant's failpoints: their names, what each site accepts, and the one-line helpers the
//! agent and the service call. docs/failpoints.md says what recovery must do at each.

use std::time::Duration;

use tonic::Status;
use treaty_proto::ApiError;
pub use treaty_proto::failpoints::Fired;
use treaty_proto::failpoints::{Catalog, Point, Return};

use crate::error::BranchError;

/// The branch wrote something; `PREPARE TRANSACTION` has not run.
pub const BEFORE_PREPARE: &str = "participant::before-prepare";
/// `PREPARE TRANSACTION` succeeded; nothing else has happened yet.
pub const AFTER_PREPARE: &str = "participant::after-prepare";
/// The vote is cast (whatever it is); the answer to `Prepare` is about to go back.
pub const BEFORE_PREPARE_REPLY: &str = "participant::before-prepare-reply";
/// `COMMIT PREPARED` is about to run.
pub const BEFORE_COMMIT_PREPARED: &str = "participant::before-commit-prepared";
/// `COMMIT PREPARED` succeeded; nothing else has happened yet.
pub const AFTER_COMMIT_PREPARED: &str = "participant::after-commit-prepared";
/// `ROLLBACK PREPARED` is about to run.
pub const BEFORE_ROLLBACK_PREPARED: &str = "participant::before-rollback-prepared";
/// `ROLLBACK PREPARED` succeeded; nothing else has happened yet.
pub const AFTER_ROLLBACK_PREPARED: &str = "participant::after-rollback-prepared";
/// The commit is applied; the answer to `Commit` is about to go back.
pub const BEFORE_COMMIT_REPLY: &str = "participant::before-commit-reply";
/// Deliberately unsafe, to prove the checker catches a broken build: recovery COMMITs a branch
/// left prepared past `--in-doubt-after-ms` on its own instead of asking the coordinator.
pub const UNSAFE_COMMIT_IN_DOUBT: &str = "participant::unsafe-commit-in-doubt";

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
        name: UNSAFE_COMMIT_IN_DOUBT,
        returns: &[Return::On],
    },
];

/// The participant's failpoints, served by its `Admin` service.
pub static CATALOG: Catalog = Catalog::new(POINTS, cfg!(feature = "failpoints"));

/// How long a dropped reply is held back: longer than any of the coordinator's RPC deadlines, so
/// the coordinator sees a lost answer (its own timeout), not an error.
const DROPPED_REPLY_HOLD: Duration = Duration::from_secs(60);

/// Evaluates a failpoint; always `None` in a build without the `failpoints` feature.
pub fn hit(name: &'static str) -> Option<Fired> {
    if cfg!(feature = "failpoints") {
        treaty_proto::failpoints::hit(name)
    } else {
        None
    }
}

/// A failpoint at a step of the agent: `return(error)` fails the step as an unreachable database
/// would (the RPC answers UNAVAILABLE).
pub fn step(name: &'static str) -> Result<(), BranchError> {
    match hit(name) {
        None | Some(Fired::On) => Ok(()),
        Some(Fired::Error | Fired::Drop) => Err(BranchError::Unavailable(format!("failpoint {name}"))),
    }
}

/// A failpoint before an answer goes back: `return(error)` answers UNAVAILABLE instead;
/// `return(drop)` answers nothing until the caller has given up (the work is done either way).
pub async fn reply(name: &'static str) -> Result<(), Status> {
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
        assert_eq!(names.len(), 9);
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
        assert!(names.iter().all(|n| n.starts_with("participant::")));
    }

    #[test]
    fn the_flag_refuses_unknown_names_and_unsupported_returns() {
        let error = arm_at_start(Some("participant::nope=off")).unwrap_err();
        assert!(error.to_string().contains(AFTER_PREPARE), "{error}");
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
}
