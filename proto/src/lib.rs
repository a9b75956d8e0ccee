//! Treaty's wire protocol: the generated gRPC code (`pb`) and, beside it, the domain types the rest
//! of the workspace uses. Generated types stay at this edge: conversions validate on arrival, and
//! one error type (`ApiError`) maps to and from `tonic::Status`. The domain types themselves live in
//! `treaty-types` and are re-exported here; `wire` converts the protocol core's termination types.
//! `process` (feature `process`) is what both service binaries set up the same way. Failpoints
//! and the `Admin` service live in `treaty-failpoints`; only the `Admin` wire types are here.
//! `proptests` (tests only): property tests of decoding and validating requests from any bytes.

#[allow(clippy::all, clippy::unwrap_used, missing_docs)]
pub mod pb {
    tonic::include_proto!("treaty.v1");
}

/// The encoded `FileDescriptorSet` of `treaty.v1` and everything it imports, written by `build.rs`:
/// what gRPC server reflection serves, so `grpcurl list` and `grpcurl describe` work without the
/// `.proto` files.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("treaty_descriptor");

#[cfg(feature = "process")]
pub mod auth;
mod error;
pub mod health;
#[cfg(feature = "process")]
pub mod metrics_endpoint;
pub mod placeholders;
#[cfg(feature = "process")]
pub mod process;
#[cfg(test)]
mod proptests;
pub mod reflection;
#[cfg(feature = "process")]
pub mod secret_file;
#[cfg(feature = "process")]
pub mod telemetry;
#[cfg(feature = "process")]
pub mod tls;
mod value;
pub mod wire;

pub use error::{ApiError, SqlError};
pub use treaty_types::{
    BranchGid, CoordinatorId, DatabaseRole, DatabaseRoleError, GID_PREFIX, Gid, IdError, Protocol, SecretUrl,
    SecretUrlError, ShardName, TxId, now_ms, redact,
};
pub use value::{Value, ValueError};

/// Largest SQL text accepted in one statement, in bytes. Bigger statements are refused with
/// `INVALID_ARGUMENT` before they reach a database.
pub const MAX_SQL_BYTES: usize = 1 << 20;

/// Largest number of bind parameters in one statement (PostgreSQL's own limit).
pub const MAX_PARAMS: usize = 65_535;

/// Checks the parts of a statement every entry point validates the same way.
pub fn validate_statement(sql: &str, params: &[Value]) -> Result<(), ApiError> {
    if sql.trim().is_empty() {
        return Err(ApiError::InvalidArgument("sql is empty".into()));
    }
    if sql.len() > MAX_SQL_BYTES {
        return Err(ApiError::InvalidArgument(format!(
            "sql is {} bytes, over the limit of {MAX_SQL_BYTES} bytes; split the statement",
            sql.len()
        )));
    }
    if params.len() > MAX_PARAMS {
        return Err(ApiError::InvalidArgument(format!(
            "{} parameters, over PostgreSQL's limit of {MAX_PARAMS}",
            params.len()
        )));
    }
    let expected = placeholders::expected_params(sql);
    if expected != params.len() {
        let placeholders = match expected {
            0 => "no placeholder".to_owned(),
            n => format!("placeholders up to ${n}"),
        };
        return Err(ApiError::InvalidArgument(format!(
            "parameter count mismatch: the sql expects {expected} parameters ({placeholders}) but {} \
             were given; send exactly one parameter per placeholder",
            params.len()
        )));
    }
    Ok(())
}

/// Converts wire parameters into validated values, naming the first bad one.
pub fn params_from_pb(params: Vec<pb::Value>) -> Result<Vec<Value>, ApiError> {
    params
        .into_iter()
        .enumerate()
        .map(|(index, value)| {
            Value::try_from(value)
                .map_err(|error| ApiError::InvalidArgument(format!("parameter ${}: {error}", index + 1)))
        })
        .collect()
}
