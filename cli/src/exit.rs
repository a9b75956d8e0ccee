//! What `treaty` exits with, and how a failure is printed: the documented exit codes (README,
//! "Exit codes"), the `Failure` that carries one through `anyhow` from where it is known to
//! `main`, and the JSON a failure prints under `--json`.
//!
//! Scripts branch on the exit code, so it tells apart what a script must handle differently: a
//! transaction that aborted (run it again if retryable), a coordinator that could not be reached
//! (nothing was carried out), a call whose outcome is unknown (look it up before running it
//! again), a transaction nobody knows, and a command written wrong.

use std::process::ExitCode;

use tonic::{Code, Status};
use treaty_client::ClientError;
use treaty_proto::pb;

/// The exit codes, one per thing a script must tell apart. Clap's own usage errors exit 2 too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The command did what it was asked; a submitted transaction committed. (Returned as
    /// `ExitCode::SUCCESS`; listed so the table is whole.)
    #[allow(dead_code)]
    Ok = 0,
    /// Anything not listed below: a refusal, an internal error, a failed workload.
    Failed = 1,
    /// The command line, an input file or a request value is wrong; nothing was carried out.
    Usage = 2,
    /// The transaction aborted: on every shard, nothing it wrote is kept.
    Aborted = 3,
    /// No coordinator could be reached, or it could not serve the call; nothing was carried out.
    Unavailable = 4,
    /// The coordinator does not know the transaction (or the thing) asked for.
    NotFound = 5,
    /// The call may have been carried out and its answer was lost: look the transaction up.
    OutcomeUnknown = 6,
}

impl Exit {
    /// The name `--json` prints in `error.kind`.
    pub fn name(self) -> &'static str {
        match self {
            Exit::Ok => "ok",
            Exit::Failed => "failed",
            Exit::Usage => "usage",
            Exit::Aborted => "aborted",
            Exit::Unavailable => "unavailable",
            Exit::NotFound => "not_found",
            Exit::OutcomeUnknown => "outcome_unknown",
        }
    }

    pub fn code(self) -> ExitCode {
        ExitCode::from(self as u8)
    }

    /// What a coordinator's status code means for a script.
    fn of_status(code: Code) -> Exit {
        match code {
            Code::InvalidArgument | Code::OutOfRange => Exit::Usage,
            Code::Aborted => Exit::Aborted,
            Code::NotFound => Exit::NotFound,
            Code::Unavailable => Exit::Unavailable,
            _ => Exit::Failed,
        }
    }
}

/// A failure that knows its exit code and, where the coordinator said them, the transaction's
/// abort fields. Built where the failure is understood; `main` finds it in the `anyhow` chain.
#[derive(Debug)]
pub struct Failure {
    pub exit: Exit,
    pub message: String,
    pub txid: Option<u64>,
    pub detail: Option<AbortDetail>,
}

/// Why a transaction aborted, as separate fields (never only inside a sentence).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AbortDetail {
    pub cause: String,
    pub shard: String,
    pub sqlstate: String,
    pub message: String,
    pub retryable: bool,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

impl Failure {
    pub fn new(exit: Exit, message: impl Into<String>) -> Failure {
        Failure {
            exit,
            message: message.into(),
            txid: None,
            detail: None,
        }
    }

    /// A client library error for people (`Code: message`; with a hint when no coordinator
    /// answered) and for scripts (its exit code; SQLSTATE, shard and retryable from the
    /// status's `treaty-*` metadata).
    pub fn from_client(error: ClientError) -> Failure {
        let (exit, message, txid) = match &error {
            // A statement failed inside the transaction (its SQLSTATE rides in the metadata):
            // whatever the code says of the statement, the transaction aborted.
            ClientError::Rpc { status, .. } if status.metadata().contains_key("treaty-sqlstate") => (
                Exit::Aborted,
                format!("{:?}: {}", status.code(), status.message()),
                None,
            ),
            ClientError::Rpc { status, .. } => (
                Exit::of_status(status.code()),
                format!("{:?}: {}", status.code(), status.message()),
                None,
            ),
            ClientError::NoCoordinator { .. } => (
                Exit::Unavailable,
                format!("{error}; is one running? try `treaty dev up`"),
                None,
            ),
            ClientError::CoordinatorUnreachable { txid, .. } => (Exit::Unavailable, error.to_string(), *txid),
            ClientError::OutcomeUnknown { txid, .. } => (Exit::OutcomeUnknown, error.to_string(), *txid),
            ClientError::NoEndpoints | ClientError::InvalidEndpoint { .. } | ClientError::InvalidToken => {
                (Exit::Usage, error.to_string(), None)
            }
        };
        let detail = match &error {
            ClientError::Rpc { status, .. } => status_detail(status),
            _ => None,
        };
        Failure {
            exit,
            message,
            txid,
            detail,
        }
    }

    /// A transaction the coordinator answered ABORTED for (an outcome, not a failed call).
    pub fn aborted(txid: u64, outcome: &pb::Outcome) -> Failure {
        let detail = abort_detail(outcome);
        Failure {
            exit: Exit::Aborted,
            message: format!("transaction {txid}: {}", crate::client::outcome_text(outcome)),
            txid: Some(txid),
            detail: Some(detail),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        let mut error = serde_json::json!({
            "kind": self.exit.name(),
            "exit_code": self.exit as u8,
            "message": self.message,
        });
        if let Some(txid) = self.txid {
            error["txid"] = txid.into();
        }
        if let Some(detail) = &self.detail {
            error["abort"] = detail.json();
        }
        serde_json::json!({ "error": error })
    }
}

impl AbortDetail {
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "cause": self.cause,
            "shard": self.shard,
            "sqlstate": self.sqlstate,
            "message": self.message,
            "retryable": self.retryable,
        })
    }
}

/// The abort fields of an outcome (`cause` as the proto names it, lower case, without the
/// `ABORT_CAUSE_` prefix).
pub fn abort_detail(outcome: &pb::Outcome) -> AbortDetail {
    let reason = outcome.abort.clone().unwrap_or_default();
    AbortDetail {
        cause: pb::AbortCause::try_from(reason.cause).map_or("unknown".into(), |cause| {
            cause
                .as_str_name()
                .trim_start_matches("ABORT_CAUSE_")
                .to_lowercase()
        }),
        shard: reason.shard,
        sqlstate: reason.sqlstate,
        message: reason.message,
        retryable: reason.retryable,
    }
}

/// An outcome as separate fields: `{"kind": "committed"}` or `{"kind": "aborted", "cause": ...}`.
pub fn outcome_json(outcome: &pb::Outcome) -> serde_json::Value {
    match pb::OutcomeKind::try_from(outcome.kind) {
        Ok(pb::OutcomeKind::Committed) => serde_json::json!({ "kind": "committed" }),
        Ok(pb::OutcomeKind::Aborted) => {
            let mut json = abort_detail(outcome).json();
            json["kind"] = "aborted".into();
            json
        }
        _ => serde_json::json!({ "kind": "unknown" }),
    }
}

/// A statement's failure as the status's `treaty-*` metadata carries it, if it does.
fn status_detail(status: &Status) -> Option<AbortDetail> {
    let text = |key: &str| {
        status
            .metadata()
            .get(key)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    let sqlstate = text("treaty-sqlstate")?;
    Some(AbortDetail {
        cause: "statement_failed".into(),
        shard: text("treaty-shard").unwrap_or_default(),
        sqlstate,
        message: status.message().to_owned(),
        retryable: text("treaty-retryable").as_deref() == Some("true"),
    })
}

/// What a failed command exits with, and how it is printed: under `--json`, one JSON object on
/// stdout (scripts read stdout); always the sentence on stderr for people.
pub fn report(error: &anyhow::Error, json: bool) -> ExitCode {
    let failure = error.downcast_ref::<Failure>();
    let exit = failure.map_or(Exit::Failed, |f| f.exit);
    // `{:#}` prints the whole context chain on one line, without a backtrace.
    eprintln!("error: {error:#}");
    if json {
        let value = match failure {
            Some(failure) => {
                let mut value = failure.json();
                value["error"]["message"] = format!("{error:#}").into();
                value
            }
            None => Failure::new(exit, format!("{error:#}")).json(),
        };
        println!("{value}");
    }
    exit.code()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_code_maps_to_the_documented_exit_code() {
        assert_eq!(Exit::of_status(Code::Aborted), Exit::Aborted);
        assert_eq!(Exit::of_status(Code::NotFound), Exit::NotFound);
        assert_eq!(Exit::of_status(Code::Unavailable), Exit::Unavailable);
        assert_eq!(Exit::of_status(Code::InvalidArgument), Exit::Usage);
        assert_eq!(Exit::of_status(Code::FailedPrecondition), Exit::Failed);
        assert_eq!(Exit::OutcomeUnknown as u8, 6);
    }

    #[test]
    fn a_statement_failure_keeps_its_fields_in_json() {
        let mut status = Status::aborted("shard s1: SQLSTATE 40001: could not serialize");
        let metadata = status.metadata_mut();
        metadata.insert("treaty-sqlstate", "40001".parse().unwrap());
        metadata.insert("treaty-shard", "s1".parse().unwrap());
        metadata.insert("treaty-retryable", "true".parse().unwrap());
        let failure = Failure::from_client(ClientError::Rpc {
            rpc: treaty_client::Rpc::Submit,
            endpoint: "http://127.0.0.1:1".into(),
            status,
        });
        assert_eq!(failure.exit, Exit::Aborted);
        let json = failure.json();
        assert_eq!(json["error"]["kind"], "aborted");
        assert_eq!(json["error"]["exit_code"], 3);
        assert_eq!(json["error"]["abort"]["sqlstate"], "40001");
        assert_eq!(json["error"]["abort"]["shard"], "s1");
        assert_eq!(json["error"]["abort"]["retryable"], true);
    }
}
