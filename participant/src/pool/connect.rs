//! How the branch pool's sessions are opened with tokio-postgres: the database URL read with
//! the meaning sqlx 0.9 (which the rest of the participant connects with) and libpq give it, so
//! that one URL reaches the same server as the same user with the same security either way.
//!
//! This module owns that reading ([`ConnectTarget::from_url`]: host or socket directory, port,
//! user, password, database, the `PG*` environment defaults, the passfile, `sslmode` and the
//! certificate files; `params`) and the opening of a session over it
//! ([`ConnectTarget::connect`], with TLS by rustls, `tls`), and says which failures to open one
//! are worth retrying ([`OpenError::is_transient`]). The passfile's privacy is checked at start
//! elsewhere (`treaty_proto::secret_file::check_passfile`); here it is only read (`passfile`).
//!
//! Where sqlx and libpq differ, this never trusts a server that sqlx would refuse, and takes
//! libpq's rule where that is the stricter: `sslmode=require` with a root certificate verifies
//! the chain (libpq; sqlx does not verify), and a given `sslrootcert` is the only trust anchor
//! (libpq; sqlx also trusts the Mozilla roots then). `verify-*` without `sslrootcert` trusts the
//! Mozilla roots as sqlx does (libpq would read `~/.postgresql/root.crt`). `allow` tries TLS
//! first (sqlx takes it as `disable`; libpq tries without first); none of the three verifies. A
//! query parameter sqlx would ignore with a warning is refused here, so that a misspelt
//! `sslmode` cannot quietly weaken the connection.

mod params;
mod passfile;
mod tls;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use self::params::{Environment, Params};
pub use self::tls::TlsConfigError;
use self::tls::{TlsSettings, Verification};

/// Why a URL cannot be used for the branch pool. No variant quotes a password.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the database URL cannot be used: {0}")]
    Url(String),
    #[error("the database URL's scheme is `{0}`; expected `postgres` or `postgresql`")]
    Scheme(String),
    #[error(
        "the database URL's parameter `{name}` is not supported by the participant's branch pool \
         (supported: {SUPPORTED_PARAMETERS})"
    )]
    UnknownParameter { name: String },
    #[error("the database URL's parameter `{name}` has an invalid value `{value}`: {reason}")]
    InvalidValue {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error("the database URL's {part} is not valid UTF-8 once percent-decoded")]
    NotUtf8 { part: &'static str },
    #[error(
        "a client certificate needs both a certificate (`sslcert`, PGSSLCERT) and its key \
         (`sslkey`, PGSSLKEY); only the {given} is given"
    )]
    ClientCertificateHalf { given: &'static str },
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
}

/// The query parameters [`ConnectTarget::from_url`] understands (sqlx's spellings included).
const SUPPORTED_PARAMETERS: &str = "host, hostaddr, port, user, password, dbname, sslmode, sslrootcert, \
     sslcert, sslkey, application_name, options, options[NAME], statement-cache-capacity";

/// Why a session could not be opened. [`OpenError::is_transient`] tells a failure worth
/// retrying (the server unreachable, restarting or full) from one that will repeat.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The certificate files named by the URL could not be read when the session was opened.
    #[error("connecting to {target}: {source}")]
    Tls {
        target: String,
        #[source]
        source: TlsConfigError,
    },
    #[error("connecting to {target}: {}", describe_postgres_error(.source))]
    Postgres {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl OpenError {
    /// A failure that another attempt may not meet: an I/O error (connection refused or reset,
    /// the server closing the connection, a name that did not resolve) or PostgreSQL refusing the
    /// session for now (SQLSTATE 57P0x: shutting down, starting up, crashed; 53300: too many
    /// connections). Everything else (authentication, no such database, a certificate refused,
    /// the server not offering TLS) repeats until someone changes something.
    pub fn is_transient(&self) -> bool {
        match self {
            OpenError::Tls { .. } => false,
            OpenError::Postgres { source, .. } => is_transient_postgres_error(source),
        }
    }

    /// The error PostgreSQL answered with, if it answered.
    pub fn as_db_error(&self) -> Option<&tokio_postgres::error::DbError> {
        match self {
            OpenError::Tls { .. } => None,
            OpenError::Postgres { source, .. } => source.as_db_error(),
        }
    }
}

fn is_transient_postgres_error(error: &tokio_postgres::Error) -> bool {
    if let Some(db) = error.as_db_error() {
        let code = db.code().code();
        return code.starts_with("57P0") || code == "53300";
    }
    if error.is_closed() {
        return true;
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(error) = cause {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            // rustls reports a refused certificate or a fatal alert as an I/O error carrying
            // its own error; that one will repeat.
            return !io.get_ref().is_some_and(|inner| inner.is::<rustls::Error>());
        }
        // A `TlsHandshakeError` that is an I/O failure has the I/O error as its source, met on
        // the next step; one that is a refusal has none.
        cause = error.source();
    }
    false
}

/// tokio-postgres's `Display` names only the kind ("error performing TLS handshake"); the
/// cause, which names the problem, is in its source chain.
fn describe_postgres_error(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        return format!(
            "PostgreSQL refused the session: {db} (SQLSTATE {})",
            db.code().code()
        );
    }
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(error) = cause {
        text.push_str(": ");
        text.push_str(&error.to_string());
        cause = error.source();
    }
    text
}

/// libpq's `sslmode`, all six values (tokio-postgres knows three; the others are mapped in
/// [`SslMode::driver_mode`] and the verification in [`TlsSettings`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Option<SslMode> {
        // sqlx compares without case; libpq does not, but accepting more spellings of the same
        // mode changes no connection.
        Some(match value.to_ascii_lowercase().as_str() {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// `allow` is taken as `prefer`: both accept an unverified TLS or a plain connection,
    /// whichever the server offers, and trying TLS first never gives less protection.
    fn driver_mode(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Driver;
        match self {
            SslMode::Disable => Driver::Disable,
            SslMode::Allow | SslMode::Prefer => Driver::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Driver::Require,
        }
    }

    /// What is checked of the server's certificate, given whether a root certificate is named.
    fn verification(self, has_root_cert: bool) -> Verification {
        match self {
            SslMode::Disable | SslMode::Allow | SslMode::Prefer => Verification::None,
            // libpq: "if a root CA file exists, sslmode=require behaves like verify-ca".
            SslMode::Require if has_root_cert => Verification::Chain,
            SslMode::Require => Verification::None,
            SslMode::VerifyCa => Verification::Chain,
            SslMode::VerifyFull => Verification::ChainAndName,
        }
    }
}

/// Where and how to connect; built once from the URL, cheap to clone.
#[derive(Clone)]
pub struct ConnectTarget {
    config: tokio_postgres::Config,
    ssl_mode: SslMode,
    /// `None` with `sslmode=disable`: no certificate file is read then (as sqlx).
    tls: Option<Arc<TlsSettings>>,
    /// `user@host:port/database` for errors and logs; never the password.
    described: String,
}

impl std::fmt::Debug for ConnectTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectTarget")
            .field("target", &self.described)
            .field("ssl_mode", &self.ssl_mode)
            .finish_non_exhaustive()
    }
}

impl ConnectTarget {
    /// From the URL as `SecretUrl::to_connect` gives it, with the process's `PG*` environment
    /// and passfile filling what the URL leaves out.
    pub fn from_url(url: &str) -> Result<ConnectTarget, ConnectError> {
        ConnectTarget::from_url_in(url, &Environment::of_process())
    }

    fn from_url_in(url: &str, env: &Environment) -> Result<ConnectTarget, ConnectError> {
        let params = Params::from_url(url, env)?;
        params.into_target()
    }

    /// The session's `application_name`.
    pub fn application_name(mut self, name: &str) -> ConnectTarget {
        self.config.application_name(name);
        self
    }

    /// Settings every session starts with (PostgreSQL's `options` startup parameter,
    /// `-c name=value`), added to any the URL gives.
    pub fn settings(mut self, settings: &[(&str, String)]) -> ConnectTarget {
        let mut options = self.config.get_options().unwrap_or_default().to_owned();
        for (name, value) in settings {
            push_setting(&mut options, name, value);
        }
        self.config.options(&options);
        self
    }

    /// The `sslmode` in force (from the URL, else `PGSSLMODE`, else `prefer`).
    pub fn ssl_mode(&self) -> SslMode {
        self.ssl_mode
    }

    /// `user@host:port/database`, without the password: for logs and errors.
    pub fn describe(&self) -> &str {
        &self.described
    }

    /// A new session; its connection task runs on the current runtime until the client is
    /// dropped or the server closes it.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, OpenError> {
        let postgres_error = |source| OpenError::Postgres {
            target: self.described.clone(),
            source,
        };
        let client = match &self.tls {
            None => {
                let (client, connection) = self
                    .config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(postgres_error)?;
                spawn_connection(connection);
                client
            }
            Some(settings) => {
                let connector = self.tls_connector(settings).await?;
                let (client, connection) = self.config.connect(connector).await.map_err(postgres_error)?;
                spawn_connection(connection);
                client
            }
        };
        Ok(client)
    }

    /// The certificate files are read again for every session, as sqlx does, so that a
    /// rotated client certificate or CA is used without a restart; off the runtime's threads,
    /// since they are files.
    async fn tls_connector(&self, settings: &Arc<TlsSettings>) -> Result<tls::MakeRustls, OpenError> {
        let settings = Arc::clone(settings);
        let built = tokio::task::spawn_blocking(move || settings.client_config()).await;
        let config = match built {
            Ok(config) => config,
            // The closure does not panic; a cancelled task means the runtime is shutting down.
            Err(join) => Err(TlsConfigError::Task(join.to_string())),
        };
        config.map(tls::MakeRustls::new).map_err(|source| OpenError::Tls {
            target: self.described.clone(),
            source,
        })
    }
}

fn spawn_connection<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "a branch pool connection ended");
        }
    });
}

/// `-c name=value` appended to a startup `options` string, with PostgreSQL's escapes for it
/// (a backslash before a space or a backslash), as sqlx writes them.
pub(super) fn push_setting(options: &mut String, name: &str, value: &str) {
    if !options.is_empty() {
        options.push(' ');
    }
    options.push_str("-c ");
    for c in format!("{name}={value}").chars() {
        if c == ' ' || c == '\\' {
            options.push('\\');
        }
        options.push(c);
    }
}
