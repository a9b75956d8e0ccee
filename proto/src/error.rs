//! The one error type that crosses the wire, and its mapping to and from `tonic::Status`.
//!
//! A PostgreSQL error keeps its SQLSTATE, message and shard through every hop: they ride in the
//! status message for people and in `treaty-*` metadata for programs.

use tonic::{Code, Status};

const SQLSTATE_KEY: &str = "treaty-sqlstate";
const SHARD_KEY: &str = "treaty-shard";
const RETRYABLE_KEY: &str = "treaty-retryable";

/// A statement's failure as PostgreSQL reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlError {
    pub shard: String,
    pub sqlstate: String,
    pub message: String,
}

impl SqlError {
    /// Whether running the transaction again may succeed: serialization failure, deadlock, lock or
    /// statement timeout, a lost connection.
    pub fn retryable(&self) -> bool {
        treaty_commit_protocol::answers::sqlstate_is_retryable(&self.sqlstate)
    }

    /// The gRPC code a client should branch on for this SQLSTATE. The rule (README, "Status codes
    /// and retrying"): `ABORTED` if and only if running the transaction again may succeed, so a
    /// client library can retry on the code alone; `treaty-retryable` always agrees with it.
    fn code(&self) -> Code {
        if self.retryable() {
            return Code::Aborted;
        }
        match self.sqlstate.get(..2) {
            // Syntax, undefined objects, bad parameter data or count: the request itself is wrong.
            Some("42" | "22") => Code::InvalidArgument,
            _ if self.sqlstate == "08P01" => Code::InvalidArgument,
            // Anything else that running again will not fix: a constraint violation, an exception
            // raised by the client's own SQL (a DO block's RAISE). The data
            // or the database is not in the state the request needs.
            _ => Code::FailedPrecondition,
        }
    }
}

impl std::fmt::Display for SqlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.shard.is_empty() {
            write!(f, "SQLSTATE {}: {}", self.sqlstate, self.message)
        } else {
            write!(
                f,
                "shard {}: SQLSTATE {}: {}",
                self.shard, self.sqlstate, self.message
            )
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    Sql(SqlError),
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Status {
        match error {
            // The codes that say whether to run the transaction again carry the flag too, so a
            // client reading `treaty-retryable` never finds it missing where the code decides.
            ApiError::InvalidArgument(m) => with_retryable(Status::invalid_argument(m), false),
            ApiError::NotFound(m) => Status::not_found(m),
            ApiError::FailedPrecondition(m) => with_retryable(Status::failed_precondition(m), false),
            ApiError::Aborted(m) => with_retryable(Status::aborted(m), true),
            ApiError::Unavailable(m) => Status::unavailable(m),
            ApiError::DeadlineExceeded(m) => Status::deadline_exceeded(m),
            ApiError::ResourceExhausted(m) => Status::resource_exhausted(m),
            ApiError::Internal(m) => Status::internal(m),
            ApiError::Sql(sql) => {
                let mut status = Status::new(sql.code(), sql.to_string());
                let metadata = status.metadata_mut();
                // Values that are not valid ASCII metadata are left out; the message still has them.
                if let Ok(v) = sql.sqlstate.parse() {
                    metadata.insert(SQLSTATE_KEY, v);
                }
                if let Ok(v) = sql.shard.parse() {
                    metadata.insert(SHARD_KEY, v);
                }
                let retryable = sql.retryable();
                with_retryable(status, retryable)
            }
        }
    }
}

/// `status` with `treaty-retryable` set: `true` exactly when its code is `ABORTED`.
fn with_retryable(mut status: Status, retryable: bool) -> Status {
    let value = if retryable {
        tonic::metadata::MetadataValue::from_static("true")
    } else {
        tonic::metadata::MetadataValue::from_static("false")
    };
    status.metadata_mut().insert(RETRYABLE_KEY, value);
    status
}

impl From<Status> for ApiError {
    /// Rebuilds the error a peer sent, keeping a PostgreSQL error's SQLSTATE and shard.
    fn from(status: Status) -> ApiError {
        let metadata = status.metadata();
        let text = |key: &str| metadata.get(key).and_then(|v| v.to_str().ok()).map(str::to_owned);
        if let Some(sqlstate) = text(SQLSTATE_KEY) {
            let shard = text(SHARD_KEY).unwrap_or_default();
            // Strip the prefix Display added so the message is PostgreSQL's own.
            let message = status.message();
            let message = message
                .split_once(&format!("SQLSTATE {sqlstate}: "))
                .map_or(message, |(_, m)| m);
            return ApiError::Sql(SqlError {
                shard,
                sqlstate,
                message: message.to_owned(),
            });
        }
        let message = status.message().to_owned();
        match status.code() {
            Code::InvalidArgument | Code::OutOfRange => ApiError::InvalidArgument(message),
            Code::NotFound => ApiError::NotFound(message),
            Code::FailedPrecondition | Code::AlreadyExists => ApiError::FailedPrecondition(message),
            Code::Aborted => ApiError::Aborted(message),
            Code::DeadlineExceeded | Code::Cancelled => ApiError::DeadlineExceeded(message),
            Code::ResourceExhausted => ApiError::ResourceExhausted(message),
            Code::Unavailable | Code::Unknown => ApiError::Unavailable(message),
            _ => ApiError::Internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_error_survives_a_round_trip_through_status() {
        let original = SqlError {
            shard: "s1".into(),
            sqlstate: "23505".into(),
            message: "duplicate key".into(),
        };
        let status = Status::from(ApiError::Sql(original.clone()));
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(ApiError::from(status), ApiError::Sql(original));
    }

    #[test]
    fn retryable_states() {
        let e = |s: &str| SqlError {
            shard: String::new(),
            sqlstate: s.into(),
            message: String::new(),
        };
        assert!(e("40001").retryable());
        assert!(e("40P01").retryable());
        assert!(e("55P03").retryable());
        assert!(!e("23505").retryable());
        // A protocol violation (a bind with the wrong parameter count) is not a lost connection.
        assert!(!e("08P01").retryable());
        assert!(e("08006").retryable());
    }

    /// The README's rule: ABORTED exactly when `treaty-retryable` is true.
    #[test]
    fn aborted_if_and_only_if_retryable() {
        for sqlstate in [
            "40001", "40P01", "55P03", "57014", "08006", "23505", "P0001", "42601", "22P02", "08P01",
            "42501", "XX000",
        ] {
            let status = Status::from(ApiError::Sql(SqlError {
                shard: "s0".into(),
                sqlstate: sqlstate.into(),
                message: String::new(),
            }));
            let flag = status
                .metadata()
                .get(RETRYABLE_KEY)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            assert_eq!(
                flag.as_deref() == Some("true"),
                status.code() == Code::Aborted,
                "{sqlstate}: {:?} with treaty-retryable {flag:?}",
                status.code()
            );
        }
        assert_eq!(
            Status::from(ApiError::Sql(SqlError {
                shard: String::new(),
                sqlstate: "P0001".into(),
                message: String::new()
            }))
            .code(),
            Code::FailedPrecondition
        );
    }
}
