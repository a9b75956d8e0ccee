//! The participant's errors: `ParticipantError` for starting and serving, `BranchError` for one
//! call on a branch, and the one mapping of `BranchError` to the wire's `ApiError`.

use std::path::PathBuf;

use treaty_proto::{ApiError, ShardName, SqlError};

use crate::coordinator_link::LinkError;
use crate::postgres::DbError;
use crate::sql_guard::Refusal;
use crate::statement::StatementError;
use crate::values::{DecodeError, ParamError};

/// Why the participant could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum ParticipantError {
    #[error("TLS: {0}")]
    Tls(treaty_proto::tls::TlsError),
    #[error("who may call: {0}")]
    Auth(#[from] treaty_proto::auth::AuthError),
    #[error("creating the data directory {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error(
        "cannot connect to PostgreSQL at {url}: {source}; check --database-url and that the server accepts connections"
    )]
    DatabaseUnreachable { url: String, source: sqlx::Error },
    /// The URL could not be read for the branch pool's sessions.
    #[error("database URL {url} cannot be used for branch connections: {source}")]
    BranchPool {
        url: String,
        source: Box<crate::pool::ConnectError>,
    },
    /// The URL has no password and the passfile PostgreSQL would read is not private.
    #[error("PostgreSQL passfile: {0}")]
    Passfile(#[from] treaty_proto::secret_file::SecretFileError),
    #[error("--database-url: {0}")]
    DatabaseUrl(#[from] treaty_proto::SecretUrlError),
    #[error(
        "PostgreSQL has max_prepared_transactions = 0, which disables PREPARE TRANSACTION; set \
         max_prepared_transactions in postgresql.conf to a value > 0 (e.g. equal to max_connections) \
         and restart PostgreSQL"
    )]
    PreparedTransactionsDisabled,
    #[error("checking the PostgreSQL server: {0}")]
    ServerCheck(DbError),
    #[error(
        "database {database} is already served by another participant ({holder}); a database has \
         exactly one participant: stop the other one (if it is gone but PostgreSQL still holds its \
         session, end that backend with pg_terminate_backend), or give this shard a database of its own"
    )]
    DatabaseClaimed { database: String, holder: String },
    #[error("running the participant's migrations (schema treaty): {0}")]
    Migrations(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Coordinator(#[from] LinkError),
    #[error("reading the listen address: {0}")]
    ListenAddr(std::io::Error),
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("serving gRPC: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("arming failpoints: {0}")]
    Failpoints(#[from] treaty_failpoints::FailpointError),
    #[error(transparent)]
    Metrics(#[from] treaty_proto::metrics_endpoint::MetricsEndpointError),
}

/// Why one call on a branch failed.
#[derive(Debug, thiserror::Error)]
pub enum BranchError {
    /// The request is malformed (bad GID, empty SQL, unknown option).
    #[error("{0}")]
    InvalidRequest(String),
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Param(#[from] ParamError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The GID is not in a state that allows the call.
    #[error("{0}")]
    WrongState(String),
    /// The call needs something this participant does not hold (an open decision branch).
    #[error("{0}")]
    NotFound(String),
    /// The branch's earlier statements were lost with a previous participant process: the
    /// transaction cannot continue, but run again it may succeed (ABORTED on the wire).
    #[error("{0}")]
    Lost(String),
    /// PostgreSQL refused a statement.
    #[error("SQLSTATE {sqlstate}: {message}")]
    Sql { sqlstate: String, message: String },
    /// The database (or the coordinator) could not be reached; the outcome may be unknown.
    #[error("{0}")]
    Unavailable(String),
    /// The client side of sqlx refused something it should not have.
    #[error("{0}")]
    Internal(String),
}

impl From<DbError> for BranchError {
    fn from(error: DbError) -> Self {
        match error {
            DbError::Sql { sqlstate, message } => BranchError::Sql { sqlstate, message },
            DbError::Connection(message) => BranchError::Unavailable(format!(
                "PostgreSQL is unreachable or the connection broke: {message}"
            )),
            DbError::Client(message) => BranchError::InvalidRequest(message),
        }
    }
}

impl From<StatementError> for BranchError {
    fn from(error: StatementError) -> Self {
        match error {
            StatementError::Db(db) | StatementError::Begin(db) => db.into(),
            StatementError::Decode(decode) => decode.into(),
        }
    }
}

impl BranchError {
    /// The wire error, with the shard named on PostgreSQL errors.
    pub fn into_api(self, shard: &ShardName) -> ApiError {
        match self {
            BranchError::Sql { sqlstate, message } => ApiError::Sql(SqlError {
                shard: shard.to_string(),
                sqlstate,
                message,
            }),
            BranchError::InvalidRequest(_)
            | BranchError::Refused(_)
            | BranchError::Param(_)
            | BranchError::Decode(_) => ApiError::InvalidArgument(self.to_string()),
            BranchError::WrongState(message) => ApiError::FailedPrecondition(message),
            BranchError::NotFound(message) => ApiError::NotFound(message),
            BranchError::Lost(message) => ApiError::Aborted(message),
            BranchError::Unavailable(message) => ApiError::Unavailable(message),
            BranchError::Internal(message) => ApiError::Internal(message),
        }
    }
}
