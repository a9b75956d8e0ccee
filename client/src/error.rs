//! What can go wrong talking to coordinators, said so a caller knows what to do, and the one rule
//! that sorts a failed call: not sent, maybe sent, or answered.

use std::error::Error as _;
use std::fmt;

use tonic::{Code, Status};

/// The coordinator RPCs the client makes, named as in `treaty.v1.Coordinator`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    Begin,
    Execute,
    Commit,
    Rollback,
    Submit,
    GetTransaction,
    ListTransactions,
    ListInDoubt,
    Info,
    Resolve,
}

impl fmt::Display for Rpc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Why one endpoint did not serve a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointFailure {
    pub endpoint: String,
    pub error: String,
}

impl fmt::Display for EndpointFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.endpoint, self.error)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no coordinator endpoint given: pass at least one, e.g. http://127.0.0.1:7600")]
    NoEndpoints,

    #[error(
        "coordinator endpoint {endpoint:?} is not usable ({reason}); write it as http://HOST:PORT or https://HOST:PORT"
    )]
    InvalidEndpoint { endpoint: String, reason: String },

    #[error(
        "the bearer token cannot be sent in a gRPC header: it must be printable ASCII (as `treaty token new` makes)"
    )]
    InvalidToken,

    /// Every endpoint was tried once for this call and none served it. Nothing was carried out
    /// by a call that only ever failed this way, except a repeated `Begin` (see the crate docs).
    #[error("no coordinator answered ({})", join(failures))]
    NoCoordinator { failures: Vec<EndpointFailure> },

    /// The call may have reached the coordinator at `endpoint` and been carried out, and its
    /// answer was lost. It was not sent again anywhere. Look the transaction up before running it
    /// again: by `txid` where known (`Client::transaction_on(endpoint, txid)`), else by what it
    /// wrote.
    #[error(
        "{rpc} to {endpoint} broke after it was sent{}, so it may have been carried out ({}); it was \
         not sent again: look the transaction up before running it again",
        txid.map(|t| format!(" (transaction {t})")).unwrap_or_default(),
        status_text(source)
    )]
    OutcomeUnknown {
        rpc: Rpc,
        txid: Option<u64>,
        endpoint: String,
        source: Status,
    },

    /// The call needs the coordinator instance at `endpoint` (it runs transaction `txid`, which no
    /// other instance knows) and that instance cannot be reached. An uncommitted transaction there
    /// is aborted by its idle timeout or when it restarts: begin again.
    #[error(
        "{rpc}: the coordinator at {endpoint} cannot be reached ({}){}; no other instance serves it",
        status_text(source),
        txid.map(|t| format!(" and transaction {t} is known only to that instance")).unwrap_or_default()
    )]
    CoordinatorUnreachable {
        rpc: Rpc,
        txid: Option<u64>,
        endpoint: String,
        source: Status,
    },

    /// The coordinator answered with an error: it decided (bad request, unknown transaction, an
    /// abort, a refusal). The status keeps its code, message and `treaty-*` metadata.
    #[error("{rpc} to {endpoint}: {}", status_text(status))]
    Rpc {
        rpc: Rpc,
        endpoint: String,
        #[source]
        status: Status,
    },
}

impl ClientError {
    /// The gRPC status behind this error, if there is one.
    pub fn status(&self) -> Option<&Status> {
        match self {
            ClientError::OutcomeUnknown { source, .. }
            | ClientError::CoordinatorUnreachable { source, .. } => Some(source),
            ClientError::Rpc { status, .. } => Some(status),
            _ => None,
        }
    }
}

fn join(failures: &[EndpointFailure]) -> String {
    failures
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// `Unavailable: tcp connect error: Connection refused (os error 111)`.
pub(crate) fn status_text(status: &Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// An error and its sources, `outer: inner: innermost` (tonic's transport error says only
/// "transport error" at the top).
pub(crate) fn chain_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        source = inner.source();
    }
    text
}

/// What is known about a call that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The connection could not be opened: no coordinator saw the request.
    NotSent,
    /// The request may have reached a coordinator and been carried out; its answer was lost.
    MaybeSent,
    /// The coordinator answered: the status is its decision.
    Answered,
}

pub(crate) fn classify(status: &Status) -> Failure {
    let mut source = status.source();
    while let Some(error) = source {
        if error.is::<tonic::ConnectError>() {
            return Failure::NotSent;
        }
        source = error.source();
    }
    match status.code() {
        Code::Unavailable
        | Code::Unknown
        | Code::Internal
        | Code::Cancelled
        | Code::DataLoss
        | Code::DeadlineExceeded => Failure::MaybeSent,
        _ => Failure::Answered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_the_server_sent_is_maybe_sent_or_answered_by_its_code() {
        assert_eq!(classify(&Status::unavailable("lost")), Failure::MaybeSent);
        assert_eq!(
            classify(&Status::cancelled("Timeout expired")),
            Failure::MaybeSent
        );
        assert_eq!(classify(&Status::not_found("no such txid")), Failure::Answered);
        assert_eq!(classify(&Status::aborted("deadlock")), Failure::Answered);
        assert_eq!(
            classify(&Status::invalid_argument("bad shard")),
            Failure::Answered
        );
    }

    #[test]
    fn a_connect_error_anywhere_in_the_source_chain_is_not_sent() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let status = Status::from_error(Box::new(tonic::ConnectError(Box::new(refused))));
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(classify(&status), Failure::NotSent);
    }
}
