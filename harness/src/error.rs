//! The harness's error type: every variant names the command or file involved and, for a process
//! that failed to start, the tail of its log.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}):\n{output}")]
    Command {
        command: String,
        status: String,
        output: String,
    },
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl) not found; install PostgreSQL or set TREATY_PG_BIN_DIR to the directory holding them"
    )]
    PostgresNotFound,
    #[error(
        "running as root, PostgreSQL must run as an unprivileged user but `{0}` does not exist; create it or set TREATY_PG_USER"
    )]
    NoPostgresUser(String),
    #[error("{name} did not become ready: {reason}\n--- last lines of {log} ---\n{tail}")]
    NotReady {
        name: String,
        reason: String,
        log: PathBuf,
        tail: String,
    },
    #[error(
        "binary `{name}` not found (looked in {looked}); build it with `cargo build-fi` (fault-injection binaries, for tests and the lab tooling) or `cargo build --bins`, or set TREATY_BIN_DIR"
    )]
    BinaryNotFound { name: String, looked: String },
    #[error(
        "{binaries}: built without failpoints (`--version` lacks `(failpoints)`), but this needs the \
         fault-injection binaries; {hint}, or point TREATY_BIN_DIR at a directory that has them",
        hint = treaty_failpoints::BUILD_HINT
    )]
    NoFailpoints { binaries: String },
    #[error("connecting to {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("SQL on {url}: {source}")]
    Sql {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("gRPC connection to {endpoint}: {source}")]
    Grpc {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error(
        "no free loopback port in {range}: {attempts} tried, each reserved by another harness process (in {dir}) or in use"
    )]
    NoFreePort {
        range: String,
        attempts: u32,
        dir: PathBuf,
    },
    #[error("{0}")]
    Invalid(String),
}

impl HarnessError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
        let what = what.into();
        move |source| HarnessError::Io { what, source }
    }
}
