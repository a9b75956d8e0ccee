//! The participant's configuration: command-line flags, `TREATY_PARTICIPANT_*` environment
//! variables and an optional TOML file with the same keys, in that order of precedence, resolved
//! into one `Config`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use treaty_proto::secret_file::{SecretFileError, read_secret_file};
use treaty_proto::{SecretUrl, ShardName};

use crate::postgres::SessionDefaults;

pub use treaty_proto::process::LogFormat;

/// `--version`: the crate version, with `(failpoints)` in a build that has them. The lab tooling
/// (`treaty scenario run`, `treaty chaos`, `treaty demo`) looks for that mark.
const VERSION: &str = if cfg!(feature = "failpoints") {
    concat!(env!("CARGO_PKG_VERSION"), " (failpoints)")
} else {
    env!("CARGO_PKG_VERSION")
};

#[derive(Debug, Default, clap::Parser)]
#[command(
    name = "treaty-participant",
    version = VERSION,
    about = "Treaty participant: runs transaction branches on one PostgreSQL database for the coordinator"
)]
pub struct Args {
    /// TOML file with any of the settings below (flags and environment win over it).
    #[arg(long, env = "TREATY_PARTICIPANT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to serve gRPC on.
    #[arg(long, env = "TREATY_PARTICIPANT_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// This participant's shard name, as the coordinator knows it.
    #[arg(long, env = "TREATY_PARTICIPANT_SHARD")]
    pub shard: Option<String>,
    /// PostgreSQL URL, e.g. postgres://user@127.0.0.1:5432/db. Keep a password off the command
    /// line (where `ps` shows it): give the URL in the environment, in --database-url-file, or
    /// leave the password out and let PostgreSQL's passfile (PGPASSFILE, ~/.pgpass) supply it.
    #[arg(
        long,
        env = "TREATY_PARTICIPANT_DATABASE_URL",
        conflicts_with = "database_url_file"
    )]
    pub database_url: Option<String>,
    /// A file holding the PostgreSQL URL (one line; it must be private to its owner, mode 0600).
    #[arg(long, env = "TREATY_PARTICIPANT_DATABASE_URL_FILE")]
    pub database_url_file: Option<PathBuf>,
    /// The coordinator, as http://HOST:PORT (asked about prepared branches during recovery), or
    /// several instances serving the same shards, comma-separated or the flag repeated: recovery
    /// asks any that answers.
    #[arg(long, env = "TREATY_PARTICIPANT_COORDINATOR", action = clap::ArgAction::Append)]
    pub coordinator: Vec<String>,
    /// Directory for the participant's local files.
    #[arg(long, env = "TREATY_PARTICIPANT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Roll back an open, unprepared branch after this long without a call, in ms.
    #[arg(long, env = "TREATY_PARTICIPANT_BRANCH_IDLE_TIMEOUT_MS")]
    pub branch_idle_timeout_ms: Option<u64>,
    /// Ask the coordinator about a branch left prepared this long, in ms.
    #[arg(long, env = "TREATY_PARTICIPANT_IN_DOUBT_AFTER_MS")]
    pub in_doubt_after_ms: Option<u64>,
    /// Three-phase commit: how long a prepared or pre-committed branch waits for the coordinator
    /// before the participants run termination among themselves, in ms.
    #[arg(long, env = "TREATY_PARTICIPANT_THREE_PHASE_TIMEOUT_MS")]
    pub three_phase_timeout_ms: Option<u64>,
    /// How often recovery looks at prepared branches and old marker rows, in ms.
    #[arg(long, env = "TREATY_PARTICIPANT_RECONCILE_INTERVAL_MS")]
    pub reconcile_interval_ms: Option<u64>,
    /// Keep marker rows of committed branches at least this long, in ms (default 5000). A marker
    /// is deleted only once the coordinator no longer tracks its transaction, whatever its age:
    /// this sets how soon recovery asks, and so how many rows the table holds under load.
    #[arg(long, env = "TREATY_PARTICIPANT_MARKER_RETENTION_MS")]
    pub marker_retention_ms: Option<u64>,
    /// Size of the PostgreSQL connection pool (each open branch holds one connection).
    #[arg(long, env = "TREATY_PARTICIPANT_MAX_CONNECTIONS")]
    pub max_connections: Option<u32>,
    /// PostgreSQL `lock_timeout` every pooled connection's session starts with, in ms (default
    /// 10000, the coordinator's default `--lock-timeout-ms`; 0: none). A branch asking for this
    /// value opens without a `SET LOCAL`; set it to the coordinator's value if you change that.
    #[arg(long, env = "TREATY_PARTICIPANT_SESSION_LOCK_TIMEOUT_MS")]
    pub session_lock_timeout_ms: Option<u32>,
    /// PostgreSQL `statement_timeout` every pooled connection's session starts with, in ms
    /// (default 60000, the coordinator's default `--transaction-timeout-ms`, which it sends as each
    /// branch's statement timeout; 0: none). As above, it only saves a `SET LOCAL` per branch.
    #[arg(long, env = "TREATY_PARTICIPANT_SESSION_STATEMENT_TIMEOUT_MS")]
    pub session_statement_timeout_ms: Option<u32>,
    /// Threads of the async runtime (default: one per core). On a machine shared with the
    /// databases and other Treaty processes, fewer threads mean fewer cross-thread wake-ups; 1
    /// runs every task on one thread (tokio's current-thread scheduler), which costs the least
    /// CPU per transaction (docs/performance.md); a fault-injection build keeps a pool of one.
    #[arg(long, env = "TREATY_PARTICIPANT_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
    #[arg(long, env = "TREATY_PARTICIPANT_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Serve Prometheus metrics at http://ADDR/metrics (default: off). Keep it on a private or
    /// loopback address.
    #[arg(long, env = "TREATY_PARTICIPANT_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Export traces over OTLP/gRPC to this collector (e.g. http://127.0.0.1:4317). Default: the
    /// standard OTEL_EXPORTER_OTLP_ENDPOINT if set, else no export (and no tracing cost).
    #[arg(long, env = "TREATY_PARTICIPANT_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// How often finished spans are sent to the collector, in ms (default: OTEL_BSP_SCHEDULE_DELAY,
    /// or 5000).
    #[arg(long, env = "TREATY_PARTICIPANT_OTLP_EXPORT_INTERVAL_MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub otlp_export_interval_ms: Option<u64>,
    #[command(flatten)]
    pub tls: treaty_proto::tls::TlsArgs,
    #[command(flatten)]
    pub auth: treaty_proto::auth::AuthArgs,
    /// Failpoints to arm at start, as NAME=ACTIONS;NAME=ACTIONS in fail-rs syntax
    /// (docs/failpoints.md). Only a binary built with failpoints (`cargo build-fi`) accepts it.
    #[arg(long, env = "TREATY_PARTICIPANT_FAILPOINTS")]
    pub failpoints: Option<String>,
}

/// `coordinator` in the TOML file: one URL (possibly comma-separated, as on the command line) or a
/// list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum CoordinatorUrls {
    One(String),
    Many(Vec<String>),
}

/// The TOML file: the same settings under the same names (`coordinator` is the URL or a list).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    shard: Option<String>,
    database_url: Option<String>,
    database_url_file: Option<PathBuf>,
    coordinator: Option<CoordinatorUrls>,
    data_dir: Option<PathBuf>,
    branch_idle_timeout_ms: Option<u64>,
    in_doubt_after_ms: Option<u64>,
    three_phase_timeout_ms: Option<u64>,
    reconcile_interval_ms: Option<u64>,
    marker_retention_ms: Option<u64>,
    max_connections: Option<u32>,
    session_lock_timeout_ms: Option<u32>,
    session_statement_timeout_ms: Option<u32>,
    log_format: Option<LogFormat>,
    metrics_addr: Option<SocketAddr>,
    otlp_endpoint: Option<String>,
    otlp_export_interval_ms: Option<u64>,
    /// `[tls]`: cert, key, client_ca, link_ca, link_cert, link_key (as the `--tls-*` flags).
    tls: Option<treaty_proto::tls::TlsFileSection>,
    /// Who may call, and as what (as `--access-file`).
    access_file: Option<PathBuf>,
    allow_unauthenticated: Option<bool>,
    failpoints: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub shard: ShardName,
    /// Shown redacted by `Debug` and `Display`; `expose()` only to connect.
    pub database_url: SecretUrl,
    /// Every coordinator instance recovery may ask, in the order given (at least one).
    pub coordinator_urls: Vec<String>,
    pub data_dir: PathBuf,
    pub branch_idle_timeout_ms: u64,
    pub in_doubt_after_ms: u64,
    pub three_phase_timeout_ms: u64,
    pub reconcile_interval_ms: u64,
    pub marker_retention_ms: u64,
    pub max_connections: u32,
    /// The timeouts pooled sessions start with (`--session-lock-timeout-ms`,
    /// `--session-statement-timeout-ms`; 0 given is `None`).
    pub session: SessionDefaults,
    pub log_format: LogFormat,
    /// Where Prometheus metrics are served; none: not served.
    pub metrics_addr: Option<SocketAddr>,
    /// Where spans are exported (`--otlp-endpoint`, else `OTEL_EXPORTER_OTLP_ENDPOINT`); `None`:
    /// not at all.
    pub otlp_endpoint: Option<String>,
    pub otlp_export_interval_ms: Option<u64>,
    /// TLS on this service's listener and on the links it dials (`--tls-*`, `--link-tls-*`).
    pub tls: treaty_proto::tls::TlsSettings,
    /// The access file and whether to serve without one (`--access-file`,
    /// `--allow-unauthenticated`); loaded and checked when the service starts.
    pub auth: treaty_proto::auth::AuthArgs,
    pub failpoints: Option<String>,
    /// Whether to ask the coordinators for their runs before serving (`Admission`). A
    /// participant inside the coordinator does not: it starts before its coordinator serves,
    /// and it cannot have branches of an earlier run, which ended with the same process.
    pub ask_coordinators_at_start: bool,
}

impl Config {
    pub fn branch_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.branch_idle_timeout_ms)
    }

    pub fn reconcile_interval(&self) -> Duration {
        Duration::from_millis(self.reconcile_interval_ms)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("TLS: {0}")]
    Tls(treaty_proto::tls::TlsError),
    #[error("reading config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{flag} is required (or {env}, or `{key}` in the --config file)")]
    Missing {
        flag: &'static str,
        env: &'static str,
        key: &'static str,
    },
    #[error("--shard {0:?}: {1}")]
    Shard(String, treaty_proto::IdError),
    #[error("{0} must be greater than 0")]
    Zero(&'static str),
    #[error("--database-url-file: {0}")]
    DatabaseUrlFile(#[source] SecretFileError),
    #[error("give the database URL once: `database_url` or `database_url_file`, not both")]
    DatabaseUrlTwice,
    #[error("--coordinator: {0}")]
    Coordinator(#[from] crate::coordinator_link::LinkError),
}

/// Splits `--coordinator` (or its environment or TOML forms) into its URLs, each checked.
fn coordinator_urls(value: CoordinatorUrls) -> Result<Vec<String>, ConfigError> {
    let parts = match value {
        CoordinatorUrls::One(text) => vec![text],
        CoordinatorUrls::Many(list) => list,
    };
    let urls: Vec<String> = parts
        .iter()
        .flat_map(|part| part.split(','))
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(str::to_owned)
        .collect();
    if urls.is_empty() {
        return Err(crate::coordinator_link::LinkError::NoCoordinator.into());
    }
    for url in &urls {
        crate::coordinator_link::check_url(url)?;
    }
    Ok(urls)
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    // A parse error quotes the offending line, which may be the database URL.
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.into(),
        message: treaty_proto::redact(&e.to_string()),
    })
}

/// The database URL from the flags (or environment) if they give one, else from the TOML file;
/// each source gives it as text or as a file to read it from, not both.
fn database_url(
    from_args: (Option<String>, Option<PathBuf>),
    from_file: (Option<String>, Option<PathBuf>),
) -> Result<SecretUrl, ConfigError> {
    let chosen = match from_args {
        (None, None) => from_file,
        given => given,
    };
    match chosen {
        (Some(_), Some(_)) => Err(ConfigError::DatabaseUrlTwice),
        (Some(url), None) => Ok(SecretUrl::new(url)),
        (None, Some(path)) => Ok(SecretUrl::new(
            read_secret_file(&path).map_err(ConfigError::DatabaseUrlFile)?,
        )),
        (None, None) => Err(ConfigError::Missing {
            flag: "--database-url (or --database-url-file)",
            env: "TREATY_PARTICIPANT_DATABASE_URL",
            key: "database_url",
        }),
    }
}

fn required<T>(
    value: Option<T>,
    flag: &'static str,
    env: &'static str,
    key: &'static str,
) -> Result<T, ConfigError> {
    value.ok_or(ConfigError::Missing { flag, env, key })
}

impl Config {
    /// A participant that a coordinator runs in its own process for a shard it drives itself
    /// (`--shard NAME=postgres://...`): every setting at its default, as a participant started
    /// with only the required flags, but for the session lock timeout, which follows the
    /// coordinator's branch default so that its branches open with a bare `BEGIN`. Nothing is
    /// read from the environment or a file: the coordinator's configuration says it all.
    pub fn in_process(
        shard: ShardName,
        database_url: SecretUrl,
        coordinator_url: String,
        data_dir: PathBuf,
        session_lock_timeout_ms: u32,
    ) -> Result<Config, ConfigError> {
        let mut config = Config::resolve(Args {
            // Nothing listens: the coordinator calls the services in its process.
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            shard: Some(shard.to_string()),
            database_url: Some(database_url.expose().to_owned()),
            coordinator: vec![coordinator_url],
            data_dir: Some(data_dir),
            session_lock_timeout_ms: Some(session_lock_timeout_ms),
            ..Args::default()
        })?;
        config.ask_coordinators_at_start = false;
        Ok(config)
    }

    pub fn resolve(args: Args) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let shard = required(
            args.shard.or(file.shard),
            "--shard",
            "TREATY_PARTICIPANT_SHARD",
            "shard",
        )?;
        let shard = ShardName::new(&shard).map_err(|e| ConfigError::Shard(shard.clone(), e))?;
        let config = Config {
            listen: required(
                args.listen.or(file.listen),
                "--listen",
                "TREATY_PARTICIPANT_LISTEN",
                "listen",
            )?,
            shard,
            database_url: database_url(
                (args.database_url, args.database_url_file),
                (file.database_url, file.database_url_file),
            )?,
            coordinator_urls: coordinator_urls(required(
                Some(args.coordinator)
                    .filter(|urls| !urls.is_empty())
                    .map(CoordinatorUrls::Many)
                    .or(file.coordinator),
                "--coordinator",
                "TREATY_PARTICIPANT_COORDINATOR",
                "coordinator",
            )?)?,
            data_dir: required(
                args.data_dir.or(file.data_dir),
                "--data-dir",
                "TREATY_PARTICIPANT_DATA_DIR",
                "data_dir",
            )?,
            branch_idle_timeout_ms: args
                .branch_idle_timeout_ms
                .or(file.branch_idle_timeout_ms)
                .unwrap_or(30_000),
            in_doubt_after_ms: args.in_doubt_after_ms.or(file.in_doubt_after_ms).unwrap_or(5_000),
            three_phase_timeout_ms: args
                .three_phase_timeout_ms
                .or(file.three_phase_timeout_ms)
                .unwrap_or(2_000),
            reconcile_interval_ms: args
                .reconcile_interval_ms
                .or(file.reconcile_interval_ms)
                .unwrap_or(1_000),
            marker_retention_ms: args
                .marker_retention_ms
                .or(file.marker_retention_ms)
                .unwrap_or(5_000),
            max_connections: args.max_connections.or(file.max_connections).unwrap_or(64),
            session: SessionDefaults {
                lock_timeout_ms: Some(
                    args.session_lock_timeout_ms
                        .or(file.session_lock_timeout_ms)
                        .unwrap_or(10_000),
                )
                .filter(|ms| *ms > 0),
                statement_timeout_ms: Some(
                    args.session_statement_timeout_ms
                        .or(file.session_statement_timeout_ms)
                        .unwrap_or(60_000),
                )
                .filter(|ms| *ms > 0),
            },
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            metrics_addr: args.metrics_addr.or(file.metrics_addr),
            otlp_endpoint: treaty_proto::telemetry::otlp_endpoint(args.otlp_endpoint.or(file.otlp_endpoint)),
            otlp_export_interval_ms: args.otlp_export_interval_ms.or(file.otlp_export_interval_ms),
            tls: args.tls.resolve(file.tls).map_err(ConfigError::Tls)?,
            auth: treaty_proto::auth::AuthArgs {
                access_file: args.auth.access_file.or(file.access_file),
                allow_unauthenticated: args.auth.allow_unauthenticated
                    || file.allow_unauthenticated.unwrap_or(false),
            },
            failpoints: args.failpoints.or(file.failpoints),
            ask_coordinators_at_start: true,
        };
        for (name, value) in [
            ("--branch-idle-timeout-ms", config.branch_idle_timeout_ms),
            ("--reconcile-interval-ms", config.reconcile_interval_ms),
            ("--three-phase-timeout-ms", config.three_phase_timeout_ms),
            ("--max-connections", config.max_connections.into()),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        Config::resolve(
            Args::try_parse_from(std::iter::once("treaty-participant").chain(args.iter().copied())).unwrap(),
        )
    }

    const REQUIRED: [&str; 10] = [
        "--listen",
        "127.0.0.1:0",
        "--shard",
        "s0",
        "--database-url",
        "postgres://x@127.0.0.1/db",
        "--coordinator",
        "http://127.0.0.1:1",
        "--data-dir",
        "/tmp/x",
    ];

    /// The example shipped for systemd (`deploy/config/`) stays a valid configuration; the
    /// database URL comes from the environment file beside it.
    #[test]
    fn the_deployment_example_config_resolves() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/config/participant-s0.toml"
        );
        let config = parse(&["--config", path, "--database-url", "postgres://x@127.0.0.1/db"]).unwrap();
        assert_eq!(config.shard.as_str(), "s0");
    }
    #[test]
    fn flags_resolve_with_defaults() {
        let config = parse(&REQUIRED).unwrap();
        assert_eq!(config.shard.as_str(), "s0");
        assert_eq!(config.branch_idle_timeout_ms, 30_000);
        assert_eq!(config.in_doubt_after_ms, 5_000);
        assert_eq!(config.three_phase_timeout_ms, 2_000);
        assert_eq!(config.reconcile_interval_ms, 1_000);
        assert_eq!(config.marker_retention_ms, 5_000);
        assert_eq!(config.max_connections, 64);
        assert_eq!(config.log_format, LogFormat::Human);
    }

    #[test]
    fn missing_and_bad_settings_are_named() {
        let err = parse(&REQUIRED[2..]).unwrap_err().to_string();
        assert!(err.starts_with("--listen is required"), "{err}");
        let mut args = REQUIRED.to_vec();
        args[3] = "a b";
        assert!(matches!(parse(&args), Err(ConfigError::Shard(..))));
        args[3] = "s0";
        args.extend(["--max-connections", "0"]);
        assert!(matches!(
            parse(&args),
            Err(ConfigError::Zero("--max-connections"))
        ));
    }

    #[test]
    fn metrics_are_off_unless_an_address_is_given_by_flag_or_file() {
        assert_eq!(parse(&REQUIRED).unwrap().metrics_addr, None);
        let flag = parse(&[&REQUIRED[..], &["--metrics-addr", "127.0.0.1:9701"]].concat()).unwrap();
        assert_eq!(flag.metrics_addr, Some("127.0.0.1:9701".parse().unwrap()));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, "metrics_addr = \"127.0.0.1:9702\"\n").unwrap();
        let file = parse(&[&REQUIRED[..], &["--config", path.to_str().unwrap()]].concat()).unwrap();
        assert_eq!(file.metrics_addr, Some("127.0.0.1:9702".parse().unwrap()));
    }

    #[test]
    fn file_settings_apply_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:7000\"\nshard = \"s1\"\ndatabase_url = \"postgres://db\"\n\
             coordinator = \"http://127.0.0.1:7600\"\ndata_dir = \"/tmp/p\"\nin_doubt_after_ms = 7\n\
             reconcile_interval_ms = 9\nlog_format = \"json\"\n\
             failpoints = \"participant::after-prepare=pause\"\n",
        )
        .unwrap();
        let config = parse(&["--config", path.to_str().unwrap(), "--reconcile-interval-ms", "8"]).unwrap();
        assert_eq!(config.shard.as_str(), "s1");
        assert_eq!(config.in_doubt_after_ms, 7);
        assert_eq!(config.reconcile_interval_ms, 8);
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(
            config.failpoints.as_deref(),
            Some("participant::after-prepare=pause")
        );
        assert_eq!(config.coordinator_urls, vec!["http://127.0.0.1:7600".to_owned()]);
        std::fs::write(&path, "nonsense = 1\n").unwrap();
        assert!(matches!(
            parse(&["--config", path.to_str().unwrap()]),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn several_coordinators_are_accepted_as_a_list_and_a_bad_one_is_named() {
        let mut args = REQUIRED.to_vec();
        args[7] = "http://127.0.0.1:1, http://127.0.0.1:2";
        let config = parse(&args).unwrap();
        assert_eq!(
            config.coordinator_urls,
            vec!["http://127.0.0.1:1".to_owned(), "http://127.0.0.1:2".to_owned()]
        );
        args[7] = "http://127.0.0.1:1,127.0.0.1:2";
        let err = parse(&args).unwrap_err().to_string();
        assert!(err.contains("\"127.0.0.1:2\""), "{err}");
        // Repeated, as the harness adds one to a test's own.
        args.extend(["--coordinator", "http://127.0.0.1:3"]);
        args[7] = "http://127.0.0.1:1";
        assert_eq!(parse(&args).unwrap().coordinator_urls.len(), 2);
        args.truncate(REQUIRED.len());
        args[7] = " , ";
        assert!(matches!(parse(&args), Err(ConfigError::Coordinator(_))));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            "coordinator = [\"http://127.0.0.1:7600\", \"http://127.0.0.1:7601\"]\n",
        )
        .unwrap();
        let config = parse(&[
            "--config",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--shard",
            "s0",
            "--database-url",
            "postgres://db",
            "--data-dir",
            "/tmp/x",
        ])
        .unwrap();
        assert_eq!(config.coordinator_urls.len(), 2);
        std::fs::write(&path, "coordinator = [\"http://127.0.0.1:7600\", \"ftp://x\"]\n").unwrap();
        let err = parse(&[
            "--config",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--shard",
            "s0",
            "--database-url",
            "postgres://db",
            "--data-dir",
            "/tmp/x",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("ftp://x"), "{err}");
    }

    const PASSWORD: &str = "Hunter2-pw";

    /// Neither `{:?}` of the configuration nor any configuration error shows the password, in the
    /// userinfo or in a `password` parameter, given by flag, environment-style text, TOML or file.
    #[test]
    fn the_password_is_in_no_debug_output_and_no_error() {
        use std::os::unix::fs::PermissionsExt;

        let url = format!("postgres://u:{PASSWORD}@127.0.0.1/db?sslpassword={PASSWORD}&PassWord={PASSWORD}");
        let mut args = REQUIRED.to_vec();
        args[5] = &url;
        let config = parse(&args).unwrap();
        assert_eq!(
            config.database_url.expose(),
            url,
            "the real URL is kept to connect with"
        );
        let shown = format!("{config:?} {}", config.database_url);
        assert!(!shown.contains(PASSWORD), "{shown}");
        assert!(shown.contains("postgres://u:***@127.0.0.1/db"), "{shown}");

        let dir = tempfile::tempdir().unwrap();
        let url_file = dir.path().join("url");
        std::fs::write(&url_file, format!("{url}\n")).unwrap();
        std::fs::set_permissions(&url_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let toml = dir.path().join("p.toml");
        let mut errors = Vec::new();
        // Every way resolving can fail while a URL with a password is given.
        let bad_shard = [&args[..2], &["--shard", "a b"], &args[4..]].concat();
        errors.push(parse(&bad_shard).unwrap_err());
        errors.push(parse(&[&args[..], &["--max-connections", "0"]].concat()).unwrap_err());
        errors.push(parse(&[&args[..], &["--coordinator", "ftp://x"]].concat()).unwrap_err());
        let twice = [&args[..], &["--database-url-file", url_file.to_str().unwrap()]].concat();
        assert!(Args::try_parse_from(std::iter::once("p").chain(twice.iter().copied())).is_err());
        std::fs::write(
            &toml,
            format!("database_url = \"{url}\"\ndatabase_url_file = \"/x\"\n"),
        )
        .unwrap();
        errors.push(
            parse(
                &[
                    &args[..2],
                    &args[2..4],
                    &args[6..],
                    &["--config", toml.to_str().unwrap()],
                ]
                .concat(),
            )
            .unwrap_err(),
        );
        std::fs::write(&toml, format!("database_url = \"{url}\" nonsense\n")).unwrap();
        errors.push(parse(&["--config", toml.to_str().unwrap()]).unwrap_err());
        std::fs::write(&toml, format!("database_url = {url}\n")).unwrap();
        errors.push(parse(&["--config", toml.to_str().unwrap()]).unwrap_err());
        std::fs::set_permissions(&url_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let from_file = [
            &args[..4],
            &args[6..],
            &["--database-url-file", url_file.to_str().unwrap()],
        ]
        .concat();
        let open_file = parse(&from_file).unwrap_err();
        assert!(open_file.to_string().contains("chmod 600"), "{open_file}");
        errors.push(open_file);
        for error in &errors {
            let text = format!("{error} {error:?}");
            assert!(!text.contains(PASSWORD), "{text}");
        }
        assert!(
            matches!(errors[3], ConfigError::DatabaseUrlTwice),
            "{}",
            errors[3]
        );
    }

    #[test]
    fn the_url_comes_from_a_private_file() {
        use std::os::unix::fs::PermissionsExt;

        let dir = tempfile::tempdir().unwrap();
        let url_file = dir.path().join("url");
        std::fs::write(&url_file, format!("postgres://u:{PASSWORD}@h/db\n")).unwrap();
        std::fs::set_permissions(&url_file, std::fs::Permissions::from_mode(0o400)).unwrap();
        let args = [
            &REQUIRED[..4],
            &REQUIRED[6..],
            &["--database-url-file", url_file.to_str().unwrap()],
        ]
        .concat();
        let config = parse(&args).unwrap();
        assert_eq!(
            config.database_url.expose(),
            format!("postgres://u:{PASSWORD}@h/db")
        );
        let toml = dir.path().join("p.toml");
        std::fs::write(&toml, format!("database_url_file = \"{}\"\n", url_file.display())).unwrap();
        let args = [
            &REQUIRED[..4],
            &REQUIRED[6..],
            &["--config", toml.to_str().unwrap()],
        ]
        .concat();
        assert_eq!(
            parse(&args).unwrap().database_url.expose(),
            format!("postgres://u:{PASSWORD}@h/db")
        );
    }
}
