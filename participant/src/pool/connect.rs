//! How the branch pool's sessions are opened with tokio-postgres: the database URL read with
//! the meaning libpq (and sqlx, which the rest of the participant connects with) gives it, so
//! that one URL reaches the same server as the same user either way.
//!
//! STUB (interface only): plain TCP, the URL as tokio-postgres parses it.

use std::str::FromStr as _;

/// Why a URL cannot be used for the branch pool.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the database URL cannot be used: {0}")]
    Url(String),
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(#[from] tokio_postgres::Error),
}

impl ConnectError {
    /// Worth trying again: the server refused for a moment (I/O error, starting up, shutting
    /// down, too many connections).
    pub fn is_transient(&self) -> bool {
        match self {
            ConnectError::Url(_) => false,
            ConnectError::Connect(error) => match error.code() {
                Some(code) => code.code().starts_with("57P") || code.code() == "53300",
                None => error.as_db_error().is_none(),
            },
        }
    }
}

/// Where and how to connect; built once from the URL, cheap to clone.
#[derive(Clone)]
pub struct ConnectTarget {
    config: tokio_postgres::Config,
}

impl ConnectTarget {
    /// From the URL as `SecretUrl::to_connect` gives it.
    pub fn from_url(url: &str) -> Result<ConnectTarget, ConnectError> {
        let config = tokio_postgres::Config::from_str(url).map_err(|e| ConnectError::Url(e.to_string()))?;
        Ok(ConnectTarget { config })
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
            if !options.is_empty() {
                options.push(' ');
            }
            options.push_str(&format!("-c {name}={value}"));
        }
        self.config.options(&options);
        self
    }

    /// A new session; its connection task runs on the current runtime until the client is
    /// dropped or the server closes it.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, ConnectError> {
        let (client, connection) = self.config.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "a branch pool connection ended");
            }
        });
        Ok(client)
    }
}
