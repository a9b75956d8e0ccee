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

    /// The gRPC code a client should branch on for this SQLSTATE.
    fn code(&self) -> Code {
        match self.sqlstate.get(..2) {
            // Syntax, undefined objects, bad parameter data or count: the request itself is wrong.
            Some("42" | "22") => Code::InvalidArgument,
            _ if self.sqlstate == "08P01" => Code::InvalidArgument,
            // Constraint violations: the data is not in the state the request needs.
            Some("23") => Code::FailedPrecondition,
            _ => Code::Aborted,
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
            ApiError::InvalidArgument(m) => Status::invalid_argument(m),
            ApiError::NotFound(m) => Status::not_found(m),
            ApiError::FailedPrecondition(m) => Status::failed_precondition(m),
            ApiError::Aborted(m) => Status::aborted(m),
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
                metadata.insert(
                    RETRYABLE_KEY,
                    if sql.retryable() { "true" } else { "false" }
                        .parse()
                        .expect("ascii"),
                );
                status
            }
        }
    }
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
    }
}
