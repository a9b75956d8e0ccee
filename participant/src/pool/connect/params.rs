//! The URL (and the environment) read into the fields of sqlx's `PgConnectOptions` that choose
//! the server, the user and the security, in sqlx's order (environment defaults, then the URL,
//! then the passfile), and from them the tokio-postgres configuration and TLS settings.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use percent_encoding::percent_decode_str;

use super::tls::{CertSource, TlsSettings, Verification};
use super::{ConnectError, ConnectTarget, SslMode, passfile, push_setting};

/// What the process's environment contributes: the `PG*` variables sqlx reads, the home
/// directory (for `~/.pgpass`), the operating system's user name, and whether a server's
/// socket exists in a directory. Tests make one of their own instead of changing the process's.
pub(super) struct Environment {
    pub(super) vars: HashMap<&'static str, String>,
    pub(super) home: Option<PathBuf>,
    pub(super) os_user: Option<String>,
    pub(super) socket_exists: fn(&Path) -> bool,
}

/// The variables sqlx's `PgConnectOptions::new_without_pgpass` and its passfile lookup read.
const ENVIRONMENT_VARIABLES: [&str; 13] = [
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGPASSWORD",
    "PGDATABASE",
    "PGSSLMODE",
    "PGSSLROOTCERT",
    "PGSSLCERT",
    "PGSSLKEY",
    "PGAPPNAME",
    "PGOPTIONS",
    "PGPASSFILE",
];

impl Environment {
    pub(super) fn of_process() -> Environment {
        let vars = ENVIRONMENT_VARIABLES
            .iter()
            .filter_map(|name| std::env::var(name).ok().map(|value| (*name, value)))
            .collect();
        Environment {
            vars,
            home: std::env::home_dir(),
            os_user: whoami::username().ok(),
            socket_exists: |path| path.exists(),
        }
    }

    pub(super) fn var(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    /// sqlx's `default_host`: the first of the usual socket directories holding the server's
    /// socket for `port`, else `localhost`.
    fn default_host(&self, port: u16) -> String {
        let socket = format!(".s.PGSQL.{port}");
        for directory in ["/var/run/postgresql", "/private/tmp", "/tmp"] {
            if (self.socket_exists)(&Path::new(directory).join(&socket)) {
                return directory.to_owned();
            }
        }
        "localhost".to_owned()
    }
}

/// The URL read into sqlx's `PgConnectOptions` fields (the ones that choose the server, the
/// user and the security), in sqlx's order: environment defaults, then the URL, then the
/// passfile.
#[derive(Debug)]
pub(super) struct Params {
    /// A host name or address; or a socket directory when it starts with `/` (as sqlx's
    /// `fetch_socket`). Also the host the passfile is matched against, as sqlx does.
    pub(super) host: String,
    port: u16,
    /// A socket directory given by the URL, which wins over `host` for connecting.
    socket: Option<PathBuf>,
    user: String,
    password: Option<String>,
    database: Option<String>,
    ssl_mode: SslMode,
    ssl_root_cert: Option<CertSource>,
    ssl_client_cert: Option<CertSource>,
    ssl_client_key: Option<CertSource>,
    application_name: Option<String>,
    options: Option<String>,
}

impl Params {
    /// sqlx's `new_without_pgpass`: the defaults from the environment.
    fn from_environment(env: &Environment) -> Result<Params, ConnectError> {
        // An unparsable PGPORT or PGSSLMODE is ignored by sqlx; it is refused here, since the
        // value meant something to whoever set it.
        let port = match env.var("PGPORT") {
            Some(port) => parse_port("PGPORT", port)?,
            None => 5432,
        };
        let host = match env.var("PGHOSTADDR").or_else(|| env.var("PGHOST")) {
            Some(host) => host.to_owned(),
            None => env.default_host(port),
        };
        let ssl_mode = match env.var("PGSSLMODE") {
            Some(mode) => parse_ssl_mode("PGSSLMODE", mode)?,
            None => SslMode::Prefer,
        };
        Ok(Params {
            host,
            port,
            socket: None,
            user: match env.var("PGUSER") {
                Some(user) => user.to_owned(),
                // sqlx's fallback when the user name cannot be found.
                None => env.os_user.clone().unwrap_or_else(|| "unknown".to_owned()),
            },
            password: env.var("PGPASSWORD").map(str::to_owned),
            database: env.var("PGDATABASE").map(str::to_owned),
            ssl_mode,
            ssl_root_cert: env
                .var("PGSSLROOTCERT")
                .map(|value| CertSource::from_environment("PGSSLROOTCERT", value)),
            ssl_client_cert: env
                .var("PGSSLCERT")
                .map(|value| CertSource::from_environment("PGSSLCERT", value)),
            ssl_client_key: env
                .var("PGSSLKEY")
                .map(|value| CertSource::from_environment("PGSSLKEY", value)),
            application_name: env.var("PGAPPNAME").map(str::to_owned),
            options: env.var("PGOPTIONS").map(str::to_owned),
        })
    }

    /// sqlx's `parse_from_url`, with unknown parameters refused.
    pub(super) fn from_url(text: &str, env: &Environment) -> Result<Params, ConnectError> {
        // The parse error of the url crate names the problem, never the URL's content.
        let url = url::Url::parse(text).map_err(|e| ConnectError::Url(e.to_string()))?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(ConnectError::Scheme(url.scheme().to_owned()));
        }
        let mut params = Params::from_environment(env)?;

        if let Some(host) = url.host_str() {
            let decoded = decode(host, "host")?;
            // A percent-encoded path as host is a socket directory; any other host is taken as
            // written (sqlx decodes only to look for the slash).
            if decoded.starts_with('/') {
                params.socket = Some(PathBuf::from(decoded));
            } else {
                params.host = host.to_owned();
            }
        }
        if let Some(port) = url.port() {
            params.port = port;
        }
        if !url.username().is_empty() {
            params.user = decode(url.username(), "user name")?;
        }
        if let Some(password) = url.password() {
            params.password = Some(decode(password, "password")?);
        }
        let path = url.path().trim_start_matches('/');
        if !path.is_empty() {
            params.database = Some(decode(path, "database name")?);
        }
        for (key, value) in url.query_pairs() {
            params.apply_parameter(&key, &value)?;
        }

        if params.password.is_none() {
            params.password = passfile::find_password(
                env,
                &params.host,
                params.port,
                &params.user,
                params.database.as_deref(),
            );
        }
        Ok(params)
    }

    fn apply_parameter(&mut self, key: &str, value: &str) -> Result<(), ConnectError> {
        match key {
            "sslmode" | "ssl-mode" => self.ssl_mode = parse_ssl_mode("sslmode", value)?,
            "sslrootcert" | "ssl-root-cert" | "ssl-ca" => {
                self.ssl_root_cert = Some(CertSource::File(value.into()));
            }
            "sslcert" | "ssl-cert" => self.ssl_client_cert = Some(CertSource::File(value.into())),
            "sslkey" | "ssl-key" => self.ssl_client_key = Some(CertSource::File(value.into())),
            // sqlx's statement cache size: tokio-postgres prepares as the pool asks, so it
            // means nothing here; checked as sqlx does so the URL works for both or neither.
            "statement-cache-capacity" => {
                value
                    .parse::<usize>()
                    .map_err(|e| invalid("statement-cache-capacity", value, e))?;
            }
            "host" => {
                if value.starts_with('/') {
                    self.socket = Some(PathBuf::from(value));
                } else {
                    value.clone_into(&mut self.host);
                }
            }
            "hostaddr" => {
                value
                    .parse::<IpAddr>()
                    .map_err(|e| invalid("hostaddr", value, e))?;
                // sqlx makes the address the host (also the name a certificate is checked
                // against), unlike libpq, which keeps `host` for that.
                value.clone_into(&mut self.host);
            }
            "port" => self.port = parse_port("port", value)?,
            "dbname" => self.database = Some(value.to_owned()),
            "user" => value.clone_into(&mut self.user),
            "password" => self.password = Some(value.to_owned()),
            "application_name" => self.application_name = Some(value.to_owned()),
            "options" => match &mut self.options {
                Some(options) => {
                    options.push(' ');
                    options.push_str(value);
                }
                None => self.options = Some(value.to_owned()),
            },
            _ => match key.strip_prefix("options[").and_then(|k| k.strip_suffix(']')) {
                Some(name) => push_setting(self.options.get_or_insert_with(String::new), name, value),
                None => return Err(ConnectError::UnknownParameter { name: key.to_owned() }),
            },
        }
        Ok(())
    }

    /// The socket directory to connect through, if any (sqlx's `fetch_socket`).
    fn socket_directory(&self) -> Option<&Path> {
        match &self.socket {
            Some(socket) => Some(socket),
            None if self.host.starts_with('/') => Some(Path::new(&self.host)),
            None => None,
        }
    }

    pub(super) fn into_target(self) -> Result<ConnectTarget, ConnectError> {
        let mut config = tokio_postgres::Config::new();
        let place = match self.socket_directory() {
            Some(directory) => {
                config.host_path(directory);
                directory.display().to_string()
            }
            None => {
                // The url crate keeps an IPv6 address's brackets; the driver and the TLS server
                // name want the address alone.
                let host = self.host.trim_start_matches('[').trim_end_matches(']');
                config.host(host);
                self.host.clone()
            }
        };
        config.port(self.port);
        config.user(&self.user);
        if let Some(password) = &self.password {
            config.password(password);
        }
        if let Some(database) = &self.database {
            config.dbname(database);
        }
        if let Some(options) = &self.options {
            config.options(options);
        }
        if let Some(name) = &self.application_name {
            config.application_name(name);
        }
        config.ssl_mode(self.ssl_mode.driver_mode());

        let described = format!(
            "{}@{place}:{}/{}",
            self.user,
            self.port,
            self.database.as_deref().unwrap_or(&self.user)
        );
        let tls = self.tls_settings()?;
        if let Some(settings) = &tls {
            // Read the files once now, so that a missing or malformed one stops the start
            // instead of every session.
            settings.client_config()?;
        }
        Ok(ConnectTarget {
            config,
            ssl_mode: self.ssl_mode,
            tls: tls.map(Arc::new),
            described,
        })
    }

    fn tls_settings(&self) -> Result<Option<TlsSettings>, ConnectError> {
        if self.ssl_mode == SslMode::Disable {
            return Ok(None);
        }
        let client = match (&self.ssl_client_cert, &self.ssl_client_key) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            (None, None) => None,
            (Some(_), None) => return Err(ConnectError::ClientCertificateHalf { given: "certificate" }),
            (None, Some(_)) => return Err(ConnectError::ClientCertificateHalf { given: "key" }),
        };
        let verification = self.ssl_mode.verification(self.ssl_root_cert.is_some());
        Ok(Some(TlsSettings {
            verification,
            // Unverified modes read no root certificate (as sqlx), so a stale path there
            // does not stop a connection that would not use it.
            root_cert: match verification {
                Verification::None => None,
                Verification::Chain | Verification::ChainAndName => self.ssl_root_cert.clone(),
            },
            client,
        }))
    }
}

fn decode(text: &str, part: &'static str) -> Result<String, ConnectError> {
    percent_decode_str(text)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|_| ConnectError::NotUtf8 { part })
}

fn invalid(name: &'static str, value: &str, reason: impl std::fmt::Display) -> ConnectError {
    ConnectError::InvalidValue {
        name,
        value: value.to_owned(),
        reason: reason.to_string(),
    }
}

fn parse_port(name: &'static str, value: &str) -> Result<u16, ConnectError> {
    value.parse().map_err(|e| invalid(name, value, e))
}

fn parse_ssl_mode(name: &'static str, value: &str) -> Result<SslMode, ConnectError> {
    SslMode::parse(value).ok_or_else(|| {
        invalid(
            name,
            value,
            "expected disable, allow, prefer, require, verify-ca or verify-full",
        )
    })
}
