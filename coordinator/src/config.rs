//! The coordinator's configuration: command-line flags, `TREATY_COORDINATOR_*` environment
//! variables and an optional TOML file, in that order of precedence, resolved into one `Config`.

use crate::limits::LimitSettings;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use treaty_proto::secret_file::{SecretFileError, read_secret_file};
use treaty_proto::{SecretUrl, ShardName, redact};

use crate::protocol::{Protocol, Timeouts};

pub use treaty_proto::process::LogFormat;

/// `--version`: the crate version, with `(failpoints)` in a build that has them. The lab tooling
/// (`treaty scenario run`, `treaty chaos`, `treaty demo`) looks for that mark.
const VERSION: &str = if cfg!(feature = "failpoints") {
    concat!(env!("CARGO_PKG_VERSION"), " (failpoints)")
} else {
    env!("CARGO_PKG_VERSION")
};

#[derive(Debug, clap::Parser)]
#[command(
    name = "treaty-coordinator",
    version = VERSION,
    about = "Treaty coordinator: atomic commit across PostgreSQL shards"
)]
pub struct Args {
    /// TOML file with any of the settings below (flags and environment win over it).
    #[arg(long, env = "TREATY_COORDINATOR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to serve gRPC on.
    #[arg(long, env = "TREATY_COORDINATOR_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory of the decision log.
    #[arg(long, env = "TREATY_COORDINATOR_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// A shard, repeated for each: NAME=http://HOST:PORT for a participant agent, or
    /// NAME=postgres://USER@HOST:PORT/DB to drive that database from this process (no agent, no
    /// network hop; two-phase commit only). Both kinds mix. Leave a database password out of
    /// the URL (`ps` shows the command line): PostgreSQL's passfile (PGPASSFILE, ~/.pgpass)
    /// supplies it, or give the shards in the environment or the --config file.
    #[arg(long = "shard", env = "TREATY_COORDINATOR_SHARDS", value_delimiter = ',')]
    pub shards: Vec<String>,
    /// Coordinator id used in GIDs when the log is new (default: generated once and kept in the log).
    #[arg(long, env = "TREATY_COORDINATOR_ID")]
    pub id: Option<String>,
    /// Default whole-transaction limit, in ms.
    #[arg(long, env = "TREATY_COORDINATOR_TRANSACTION_TIMEOUT_MS")]
    pub transaction_timeout_ms: Option<u64>,
    /// Default limit between client calls of an active transaction, in ms.
    #[arg(long, env = "TREATY_COORDINATOR_IDLE_TIMEOUT_MS")]
    pub idle_timeout_ms: Option<u64>,
    /// How long to wait for votes; a missing vote is a NO.
    #[arg(long, env = "TREATY_COORDINATOR_VOTE_TIMEOUT_MS")]
    pub vote_timeout_ms: Option<u64>,
    /// Default PostgreSQL lock_timeout of each branch, in ms.
    #[arg(long, env = "TREATY_COORDINATOR_LOCK_TIMEOUT_MS")]
    pub lock_timeout_ms: Option<u64>,
    /// Commit protocol of a transaction that does not choose one: two-phase (2pc, the default)
    /// or three-phase (3pc).
    #[arg(long, env = "TREATY_COORDINATOR_DEFAULT_PROTOCOL")]
    pub default_protocol: Option<Protocol>,
    /// Where two-phase commit decisions are kept: `shard` (the default: a row in
    /// `treaty.decisions` committed inside each transaction's first branch, so the decision is as
    /// durable and available as that database and any coordinator can read it), `file` (the
    /// coordinator's decision log), or a PostgreSQL URL (`postgres://...`: a dedicated database
    /// holding the same `treaty.decisions` table; each decision is a row committed there after
    /// every branch prepared). Three-phase commit always uses the file log. A URL's password is
    /// best kept off the command line: in the environment, in --decision-store-file, or in
    /// PostgreSQL's passfile (PGPASSFILE, ~/.pgpass).
    #[arg(
        long,
        env = "TREATY_COORDINATOR_DECISION_STORE",
        conflicts_with = "decision_store_file"
    )]
    pub decision_store: Option<String>,
    /// A file holding the --decision-store value (one line, usually the database URL; it must be
    /// private to its owner, mode 0600).
    #[arg(long, env = "TREATY_COORDINATOR_DECISION_STORE_FILE")]
    pub decision_store_file: Option<PathBuf>,
    /// With `--decision-store shard`: finish commit rows and prepared branches that no
    /// coordinator instance has finished after this many ms (one that died for good); 0: never.
    /// Safety does not depend on it; it only keeps live instances from doing each other's work.
    #[arg(long, env = "TREATY_COORDINATOR_TAKEOVER_AFTER_MS")]
    pub takeover_after_ms: Option<u64>,
    /// Compact the decision log once it grows past this many bytes.
    #[arg(long, env = "TREATY_COORDINATOR_COMPACT_AFTER_BYTES")]
    pub compact_after_bytes: Option<u64>,
    /// Threads of the async runtime (default: one per core). On a machine shared with the
    /// databases and other Treaty processes, fewer threads mean fewer cross-thread wake-ups; 1
    /// runs every task on one thread (tokio's current-thread scheduler), which costs the least
    /// CPU per transaction (docs/performance.md); a fault-injection build keeps a pool of one.
    #[arg(long, env = "TREATY_COORDINATOR_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
    /// Serve the web console (transactions, timelines, in-doubt branches, resolve) on this
    /// address; off unless given. It has no authentication yet: bind it to loopback
    /// (127.0.0.1:PORT) and reach it through an SSH tunnel or an authenticating proxy.
    #[arg(long, env = "TREATY_COORDINATOR_CONSOLE_ADDR")]
    pub console_addr: Option<SocketAddr>,
    #[arg(long, env = "TREATY_COORDINATOR_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Serve Prometheus metrics at http://ADDR/metrics (default: off). Keep it on a private or
    /// loopback address: it tells anyone who asks how busy each shard is.
    #[arg(long, env = "TREATY_COORDINATOR_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Export traces over OTLP/gRPC to this collector (e.g. http://127.0.0.1:4317). Default: the
    /// standard OTEL_EXPORTER_OTLP_ENDPOINT if set, else no export (and no tracing cost).
    #[arg(long, env = "TREATY_COORDINATOR_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// How often finished spans are sent to the collector, in ms (default: OTEL_BSP_SCHEDULE_DELAY,
    /// or 5000).
    #[arg(long, env = "TREATY_COORDINATOR_OTLP_EXPORT_INTERVAL_MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub otlp_export_interval_ms: Option<u64>,
    /// Largest `timeout_ms` a client may ask for at Begin or Submit (default 3600000); more is INVALID_ARGUMENT.
    #[arg(long, env = "TREATY_COORDINATOR_MAX_TIMEOUT_MS")]
    pub max_timeout_ms: Option<u64>,
    /// Largest `idle_timeout_ms` a client may ask for (default 3600000).
    #[arg(long, env = "TREATY_COORDINATOR_MAX_IDLE_TIMEOUT_MS")]
    pub max_idle_timeout_ms: Option<u64>,
    /// Largest `lock_timeout_ms` a client may ask for (default 600000).
    #[arg(long, env = "TREATY_COORDINATOR_MAX_LOCK_TIMEOUT_MS")]
    pub max_lock_timeout_ms: Option<u64>,
    /// Transactions one client (peer IP address) may have open, begun and not yet decided (default 1000); more is RESOURCE_EXHAUSTED.
    #[arg(long, env = "TREATY_COORDINATOR_MAX_OPEN_TRANSACTIONS_PER_CLIENT")]
    pub max_open_transactions_per_client: Option<u32>,
    /// Transactions open on this coordinator in all (default 100000).
    #[arg(long, env = "TREATY_COORDINATOR_MAX_OPEN_TRANSACTIONS")]
    pub max_open_transactions: Option<u32>,
    /// Statements one transaction may run, a submit's ops included (default 10000).
    #[arg(long, env = "TREATY_COORDINATOR_MAX_STATEMENTS_PER_TRANSACTION")]
    pub max_statements_per_transaction: Option<u32>,
    /// Calls one client may have in flight at once (default 256).
    #[arg(long, env = "TREATY_COORDINATOR_MAX_CONCURRENT_CALLS_PER_CLIENT")]
    pub max_concurrent_calls_per_client: Option<u32>,
    /// Largest request message in bytes (default 4194304); more is RESOURCE_EXHAUSTED.
    #[arg(long, env = "TREATY_COORDINATOR_MAX_REQUEST_BYTES")]
    pub max_request_bytes: Option<usize>,
    /// Largest SQL text of one statement in bytes (default and most 1048576); more is INVALID_ARGUMENT.
    #[arg(long, env = "TREATY_COORDINATOR_MAX_SQL_BYTES")]
    pub max_sql_bytes: Option<usize>,
    #[command(flatten)]
    pub tls: treaty_proto::tls::TlsArgs,
    #[command(flatten)]
    pub auth: treaty_proto::auth::AuthArgs,
    /// Failpoints to arm at start, as NAME=ACTIONS;NAME=ACTIONS in fail-rs syntax
    /// (docs/failpoints.md). Only a binary built with failpoints (`cargo build-fi`) accepts it.
    #[arg(long, env = "TREATY_COORDINATOR_FAILPOINTS")]
    pub failpoints: Option<String>,
    /// Testing only: abort the process the first time it reaches this failpoint (once per data
    /// directory: a marker file stops a restart from crashing there again).
    #[arg(long, hide = true)]
    pub crash_at: Option<String>,
}

/// The TOML file: the same settings, `shards` as a table of name = url.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    #[serde(default)]
    shards: BTreeMap<String, String>,
    id: Option<String>,
    transaction_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    vote_timeout_ms: Option<u64>,
    lock_timeout_ms: Option<u64>,
    /// Either spelling, as the flag (`Protocol`'s `FromStr`).
    default_protocol: Option<String>,
    compact_after_bytes: Option<u64>,
    decision_store: Option<String>,
    decision_store_file: Option<PathBuf>,
    takeover_after_ms: Option<u64>,
    console_addr: Option<SocketAddr>,
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
    max_timeout_ms: Option<u64>,
    max_idle_timeout_ms: Option<u64>,
    max_lock_timeout_ms: Option<u64>,
    max_open_transactions_per_client: Option<u32>,
    max_open_transactions: Option<u32>,
    max_statements_per_transaction: Option<u32>,
    max_concurrent_calls_per_client: Option<u32>,
    max_request_bytes: Option<usize>,
    max_sql_bytes: Option<usize>,
}

/// Where two-phase commit decisions are kept (`--decision-store`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecisionStoreKind {
    /// The coordinator's decision log (fsync per group of commits).
    File,
    /// A row committed inside the transaction's first branch (`treaty.decisions`): the default
    /// for two-phase commit (three-phase commit keeps the file log either way).
    #[default]
    Shard,
    /// A row in `treaty.decisions` of a dedicated database (`Config::decision_database`),
    /// committed after every branch prepared.
    Database,
}

/// `file`, `shard`, or a PostgreSQL URL (then also the URL).
fn parse_decision_store(text: &str) -> Result<(DecisionStoreKind, Option<SecretUrl>), ConfigError> {
    let text = text.trim();
    match text {
        "file" => Ok((DecisionStoreKind::File, None)),
        "shard" => Ok((DecisionStoreKind::Shard, None)),
        url if is_database_url(url) => Ok((DecisionStoreKind::Database, Some(SecretUrl::new(url)))),
        other => Err(ConfigError::DecisionStore(redact(other))),
    }
}

/// The `--decision-store` text from the flags (or environment) if they give it, else from the
/// TOML file; each source gives it as text or as a file to read it from, not both.
fn decision_store_text(
    from_args: (Option<String>, Option<PathBuf>),
    from_file: (Option<String>, Option<PathBuf>),
) -> Result<Option<String>, ConfigError> {
    let chosen = match from_args {
        (None, None) => from_file,
        given => given,
    };
    match chosen {
        (Some(_), Some(_)) => Err(ConfigError::DecisionStoreTwice),
        (Some(text), None) => Ok(Some(text)),
        (None, Some(path)) => Ok(Some(
            read_secret_file(&path).map_err(ConfigError::DecisionStoreFile)?,
        )),
        (None, None) => Ok(None),
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Each shard's participant address or database URL; `SecretUrl` so that `{:?}` of the
    /// configuration shows no password.
    pub shards: BTreeMap<ShardName, SecretUrl>,
    pub id: Option<String>,
    pub timeouts: Timeouts,
    pub lock_timeout_ms: u64,
    /// Used when a client leaves `TransactionOptions.protocol` unspecified.
    pub default_protocol: Protocol,
    pub compact_after_bytes: u64,
    pub decision_store: DecisionStoreKind,
    /// With `DecisionStoreKind::Database`: the database holding `treaty.decisions`.
    pub decision_database: Option<SecretUrl>,
    pub takeover_after_ms: u64,
    /// Where the web console listens (`--console-addr`); `None`: no console.
    pub console_addr: Option<SocketAddr>,
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
    pub crash_at: Option<String>,
    /// What one client may ask for and hold (`--max-*`).
    pub limits: LimitSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("TLS: {0}")]
    Tls(treaty_proto::tls::TlsError),
    #[error("reading config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("--shard {0:?}: expected NAME=http://HOST:PORT")]
    ShardSyntax(String),
    #[error("--shard {0:?}: {1}")]
    ShardName(String, treaty_proto::IdError),
    #[error("shard {0} is given twice")]
    DuplicateShard(String),
    #[error(
        "--decision-store {0:?}: expected `file`, `shard`, or a PostgreSQL URL (postgres://USER@HOST:PORT/DATABASE)"
    )]
    DecisionStore(String),
    #[error("--decision-store-file: {0}")]
    DecisionStoreFile(#[source] SecretFileError),
    #[error("give the decision store once: `decision_store` or `decision_store_file`, not both")]
    DecisionStoreTwice,
    #[error(
        "no shards configured: pass --shard NAME=http://HOST:PORT for each participant (or NAME=postgres://... to drive a database from the coordinator)"
    )]
    NoShards,
    #[error("{0} must be greater than 0")]
    Zero(&'static str),
    #[error("--{flag} {value} is over the most allowed, {max}")]
    OverMaximum {
        flag: &'static str,
        value: u64,
        max: u64,
    },
    #[error("--{default_flag} {value} is over --{max_flag} {max}: the default must be allowed")]
    DefaultOverMaximum {
        default_flag: &'static str,
        value: u64,
        max_flag: &'static str,
        max: u64,
    },
    #[error("config file {path}: default_protocol: {source}")]
    Protocol {
        path: PathBuf,
        source: treaty_types::UnknownProtocol,
    },
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    // A parse error quotes the offending line, which may be a database URL.
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.into(),
        message: redact(&e.to_string()),
    })
}

impl Config {
    pub fn resolve(args: Args) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let limits = resolve_limits(&args, &file)?;
        let file_protocol = match (&file.default_protocol, &args.config) {
            (Some(name), Some(path)) => {
                Some(name.parse::<Protocol>().map_err(|source| ConfigError::Protocol {
                    path: path.clone(),
                    source,
                })?)
            }
            _ => None,
        };
        let mut shards = BTreeMap::new();
        let from_flags = args.shards.iter().map(|spec| {
            spec.split_once('=')
                .map(|(n, u)| (n.trim().to_owned(), u.trim().to_owned()))
                .ok_or_else(|| ConfigError::ShardSyntax(redact(spec)))
        });
        let pairs: Vec<(String, String)> = if args.shards.is_empty() {
            file.shards.into_iter().collect()
        } else {
            from_flags.collect::<Result<_, _>>()?
        };
        for (name, url) in pairs {
            let shard = ShardName::new(&name).map_err(|e| ConfigError::ShardName(name.clone(), e))?;
            if shards.insert(shard, SecretUrl::new(url)).is_some() {
                return Err(ConfigError::DuplicateShard(name));
            }
        }
        if shards.is_empty() {
            return Err(ConfigError::NoShards);
        }
        let timeouts = Timeouts {
            transaction_ms: args
                .transaction_timeout_ms
                .or(file.transaction_timeout_ms)
                .unwrap_or(60_000),
            idle_ms: args.idle_timeout_ms.or(file.idle_timeout_ms).unwrap_or(30_000),
            vote_ms: args.vote_timeout_ms.or(file.vote_timeout_ms).unwrap_or(10_000),
        };
        for (name, value) in [
            ("transaction timeout", timeouts.transaction_ms),
            ("idle timeout", timeouts.idle_ms),
            ("vote timeout", timeouts.vote_ms),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        for (default_flag, value, max_flag, max) in [
            (
                "transaction-timeout-ms",
                timeouts.transaction_ms,
                "max-timeout-ms",
                limits.max_transaction_timeout_ms,
            ),
            (
                "idle-timeout-ms",
                timeouts.idle_ms,
                "max-idle-timeout-ms",
                limits.max_idle_timeout_ms,
            ),
        ] {
            if value > max {
                return Err(ConfigError::DefaultOverMaximum {
                    default_flag,
                    value,
                    max_flag,
                    max,
                });
            }
        }
        let (decision_store, decision_database) = match decision_store_text(
            (args.decision_store, args.decision_store_file),
            (file.decision_store, file.decision_store_file),
        )? {
            Some(text) => parse_decision_store(&text)?,
            None => (DecisionStoreKind::default(), None),
        };
        Ok(Config {
            listen: args
                .listen
                .or(file.listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7600))),
            data_dir: args
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("treaty-coordinator-data")),
            shards,
            id: args.id.or(file.id),
            timeouts,
            lock_timeout_ms: args.lock_timeout_ms.or(file.lock_timeout_ms).unwrap_or(10_000),
            default_protocol: args.default_protocol.or(file_protocol).unwrap_or_default(),
            compact_after_bytes: args
                .compact_after_bytes
                .or(file.compact_after_bytes)
                .unwrap_or(64 << 20),
            decision_store,
            decision_database,
            takeover_after_ms: args
                .takeover_after_ms
                .or(file.takeover_after_ms)
                .unwrap_or(10_000),
            console_addr: args.console_addr.or(file.console_addr),
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
            crash_at: args.crash_at,
            limits,
        })
    }
}

/// The `--max-*` flags over the file's values over the defaults, each checked: above 0, and the
/// timeouts within what a participant accepts (PostgreSQL's timeouts are 32-bit milliseconds).
fn resolve_limits(args: &Args, file: &FileConfig) -> Result<LimitSettings, ConfigError> {
    let defaults = LimitSettings::default();
    let limits = LimitSettings {
        max_transaction_timeout_ms: args
            .max_timeout_ms
            .or(file.max_timeout_ms)
            .unwrap_or(defaults.max_transaction_timeout_ms),
        max_idle_timeout_ms: args
            .max_idle_timeout_ms
            .or(file.max_idle_timeout_ms)
            .unwrap_or(defaults.max_idle_timeout_ms),
        max_lock_timeout_ms: args
            .max_lock_timeout_ms
            .or(file.max_lock_timeout_ms)
            .unwrap_or(defaults.max_lock_timeout_ms),
        max_open_transactions_per_client: args
            .max_open_transactions_per_client
            .or(file.max_open_transactions_per_client)
            .unwrap_or(defaults.max_open_transactions_per_client),
        max_open_transactions: args
            .max_open_transactions
            .or(file.max_open_transactions)
            .unwrap_or(defaults.max_open_transactions),
        max_statements_per_transaction: args
            .max_statements_per_transaction
            .or(file.max_statements_per_transaction)
            .unwrap_or(defaults.max_statements_per_transaction),
        max_concurrent_calls_per_client: args
            .max_concurrent_calls_per_client
            .or(file.max_concurrent_calls_per_client)
            .unwrap_or(defaults.max_concurrent_calls_per_client),
        max_request_bytes: args
            .max_request_bytes
            .or(file.max_request_bytes)
            .unwrap_or(defaults.max_request_bytes),
        max_sql_bytes: args
            .max_sql_bytes
            .or(file.max_sql_bytes)
            .unwrap_or(defaults.max_sql_bytes),
    };
    let postgres_ms = i32::MAX as u64;
    for (flag, value, max) in [
        ("max-timeout-ms", limits.max_transaction_timeout_ms, postgres_ms),
        ("max-idle-timeout-ms", limits.max_idle_timeout_ms, postgres_ms),
        ("max-lock-timeout-ms", limits.max_lock_timeout_ms, postgres_ms),
        (
            "max-open-transactions-per-client",
            u64::from(limits.max_open_transactions_per_client),
            u64::MAX,
        ),
        (
            "max-open-transactions",
            u64::from(limits.max_open_transactions),
            u64::MAX,
        ),
        (
            "max-statements-per-transaction",
            u64::from(limits.max_statements_per_transaction),
            u64::MAX,
        ),
        (
            "max-concurrent-calls-per-client",
            u64::from(limits.max_concurrent_calls_per_client),
            u64::MAX,
        ),
        ("max-request-bytes", limits.max_request_bytes as u64, u64::MAX),
        (
            "max-sql-bytes",
            limits.max_sql_bytes as u64,
            treaty_proto::MAX_SQL_BYTES as u64,
        ),
    ] {
        if value == 0 {
            return Err(ConfigError::Zero(flag));
        }
        if value > max {
            return Err(ConfigError::OverMaximum { flag, value, max });
        }
    }
    Ok(limits)
}

/// Whether a shard's address is a PostgreSQL URL: a database the coordinator drives itself.
pub fn is_database_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        Config::resolve(
            Args::try_parse_from(std::iter::once("treaty-coordinator").chain(args.iter().copied())).unwrap(),
        )
    }

    /// The example shipped for systemd (`deploy/config/`) stays a valid configuration.
    #[test]
    fn the_deployment_example_config_resolves() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/config/coordinator.toml");
        let config = parse(&["--config", path]).unwrap();
        assert_eq!(config.shards.len(), 2);
        assert_eq!(config.decision_store, DecisionStoreKind::Shard);
        let console = config.console_addr.expect("the example turns the console on");
        assert!(console.ip().is_loopback(), "on loopback: {console}");
    }

    #[test]
    fn flags_resolve_with_defaults() {
        let config = parse(&[
            "--shard",
            "s0=http://127.0.0.1:1",
            "--shard",
            "s1=http://127.0.0.1:2",
        ])
        .unwrap();
        assert_eq!(config.shards.len(), 2);
        assert_eq!(config.timeouts.vote_ms, 10_000);
        assert_eq!(config.default_protocol, Protocol::TwoPhase);
    }

    #[test]
    fn the_decision_store_is_file_shard_or_a_database_url_and_a_bad_one_names_the_choices() {
        let store = |value: &str| parse(&["--shard", "s0=http://127.0.0.1:1", "--decision-store", value]);
        let default = parse(&["--shard", "s0=http://127.0.0.1:1"]).unwrap();
        assert_eq!(
            (default.decision_store, default.decision_database),
            (DecisionStoreKind::Shard, None)
        );
        assert_eq!(store("file").unwrap().decision_store, DecisionStoreKind::File);
        assert_eq!(store("shard").unwrap().decision_store, DecisionStoreKind::Shard);
        let url = "postgresql://treaty:pw@10.0.0.5:5432/decisions";
        let database = store(url).unwrap();
        assert_eq!(database.decision_store, DecisionStoreKind::Database);
        assert_eq!(
            database.decision_database.as_ref().map(SecretUrl::expose),
            Some(url)
        );
        let error = store("mysql://root:hunter2@db/x").unwrap_err().to_string();
        assert!(
            error.contains("expected `file`, `shard`, or a PostgreSQL URL"),
            "{error}"
        );
        assert!(
            error.contains("mysql://root:***@db/x") && !error.contains("hunter2"),
            "{error}"
        );
    }

    const PASSWORD: &str = "Hunter2-pw";

    /// Neither `{:?}` of the configuration nor any configuration error shows a password given in
    /// the decision store's URL (userinfo or `?password=`) or in a shard's database URL.
    #[test]
    fn the_password_is_in_no_debug_output_and_no_error() {
        use std::os::unix::fs::PermissionsExt;

        let store = format!("postgres://u:{PASSWORD}@127.0.0.1/decisions?password={PASSWORD}");
        let shard = format!("s1=postgres://u@127.0.0.1/db?PassWord={PASSWORD}");
        let args = [
            "--shard",
            "s0=http://127.0.0.1:1",
            "--shard",
            &shard,
            "--decision-store",
            &store,
        ];
        let config = parse(&args).unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains(PASSWORD), "{shown}");
        assert!(
            shown.contains("postgres://u:***@127.0.0.1/decisions?password=***"),
            "{shown}"
        );
        assert_eq!(
            config.decision_database.as_ref().map(SecretUrl::expose),
            Some(store.as_str())
        );

        let dir = tempfile::tempdir().unwrap();
        let store_file = dir.path().join("store");
        std::fs::write(&store_file, format!("{store}\n")).unwrap();
        std::fs::set_permissions(&store_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let from_file = parse(
            &[
                &args[..4],
                &["--decision-store-file", store_file.to_str().unwrap()],
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(from_file.decision_store, DecisionStoreKind::Database);
        assert_eq!(
            from_file.decision_database.as_ref().map(SecretUrl::expose),
            Some(store.as_str())
        );

        let toml = dir.path().join("c.toml");
        let mut errors = Vec::new();
        let bad_store = format!("mysql://u:{PASSWORD}@h/x?password={PASSWORD}");
        errors.push(parse(&[&args[..4], &["--decision-store", &bad_store]].concat()).unwrap_err());
        let no_equals = format!("s2:postgres://u:{PASSWORD}@h/db");
        errors.push(parse(&[&args[..], &["--shard", &no_equals]].concat()).unwrap_err());
        errors.push(parse(&[&args[..], &["--shard", &shard]].concat()).unwrap_err());
        errors.push(parse(&[&args[..], &["--idle-timeout-ms", "0"]].concat()).unwrap_err());
        std::fs::write(&toml, format!("decision_store = \"{store}\" nonsense\n")).unwrap();
        errors.push(parse(&["--config", toml.to_str().unwrap()]).unwrap_err());
        std::fs::write(&toml, format!("decision_store = {store}\n")).unwrap();
        errors.push(parse(&["--config", toml.to_str().unwrap()]).unwrap_err());
        std::fs::write(
            &toml,
            format!("decision_store = \"{store}\"\ndecision_store_file = \"/x\"\n[shards]\ns0 = \"http://127.0.0.1:9\"\n"),
        )
        .unwrap();
        let twice = parse(&["--config", toml.to_str().unwrap()]).unwrap_err();
        assert!(matches!(twice, ConfigError::DecisionStoreTwice), "{twice}");
        errors.push(twice);
        std::fs::set_permissions(&store_file, std::fs::Permissions::from_mode(0o640)).unwrap();
        let open_file = parse(
            &[
                &args[..4],
                &["--decision-store-file", store_file.to_str().unwrap()],
            ]
            .concat(),
        )
        .unwrap_err();
        assert!(open_file.to_string().contains("chmod 600"), "{open_file}");
        errors.push(open_file);
        for error in &errors {
            let text = format!("{error} {error:?}");
            assert!(!text.contains(PASSWORD), "{text}");
        }
    }

    #[test]
    fn the_default_protocol_comes_from_the_flag_or_the_file_and_a_bad_one_is_named() {
        let shard = ["--shard", "s0=http://127.0.0.1:1"];
        for (spelling, protocol) in [
            ("three-phase", Protocol::ThreePhase),
            ("3pc", Protocol::ThreePhase),
            ("two-phase", Protocol::TwoPhase),
            ("2pc", Protocol::TwoPhase),
        ] {
            let config = parse(&[&shard[..], &["--default-protocol", spelling]].concat()).unwrap();
            assert_eq!(config.default_protocol, protocol, "{spelling}");
        }

        let error = Args::try_parse_from(["treaty-coordinator", "--default-protocol", "paxos"]).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains("paxos") && message.contains("two-phase") && message.contains("three-phase"),
            "{message}"
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "default_protocol = \"three-phase\"\n[shards]\ns0 = \"http://127.0.0.1:9\"\n",
        )
        .unwrap();
        let from_file = ["--config", path.to_str().unwrap()];
        assert_eq!(parse(&from_file).unwrap().default_protocol, Protocol::ThreePhase);
        let flag_wins = parse(&[&from_file[..], &["--default-protocol", "two-phase"]].concat()).unwrap();
        assert_eq!(flag_wins.default_protocol, Protocol::TwoPhase);

        std::fs::write(
            &path,
            "default_protocol = \"3pc\"\n[shards]\ns0 = \"http://127.0.0.1:9\"\n",
        )
        .unwrap();
        assert_eq!(parse(&from_file).unwrap().default_protocol, Protocol::ThreePhase);
        std::fs::write(&path, "default_protocol = \"paxos\"\n").unwrap();
        match parse(&from_file) {
            Err(error @ ConfigError::Protocol { .. }) => {
                let message = error.to_string();
                assert!(
                    message.contains("paxos") && message.contains("three-phase"),
                    "{message}"
                )
            }
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }

    #[test]
    fn metrics_are_off_unless_an_address_is_given_by_flag_or_file() {
        let shard = ["--shard", "s0=http://127.0.0.1:1"];
        assert_eq!(parse(&shard).unwrap().metrics_addr, None);
        let flag = parse(&[&shard[..], &["--metrics-addr", "127.0.0.1:9600"]].concat()).unwrap();
        assert_eq!(flag.metrics_addr, Some("127.0.0.1:9600".parse().unwrap()));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "metrics_addr = \"127.0.0.1:9601\"\n").unwrap();
        let file = parse(&[&shard[..], &["--config", path.to_str().unwrap()]].concat()).unwrap();
        assert_eq!(file.metrics_addr, Some("127.0.0.1:9601".parse().unwrap()));
    }

    #[test]
    fn bad_shards_are_named() {
        assert!(matches!(parse(&[]), Err(ConfigError::NoShards)));
        assert!(matches!(
            parse(&["--shard", "nourl"]),
            Err(ConfigError::ShardSyntax(_))
        ));
        assert!(matches!(
            parse(&["--shard", "a b=http://x"]),
            Err(ConfigError::ShardName(..))
        ));
        assert!(matches!(
            parse(&["--shard", "a=http://x", "--shard", "a=http://y"]),
            Err(ConfigError::DuplicateShard(_))
        ));
    }

    #[test]
    fn trace_export_comes_from_the_flag_or_the_file_and_an_empty_endpoint_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "otlp_endpoint = \"http://127.0.0.1:4317\"\notlp_export_interval_ms = 250\n\
             [shards]\ns0 = \"http://127.0.0.1:9\"\n",
        )
        .unwrap();
        let config = parse(&["--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(config.otlp_endpoint.as_deref(), Some("http://127.0.0.1:4317"));
        assert_eq!(config.otlp_export_interval_ms, Some(250));
        let config = parse(&[
            "--config",
            path.to_str().unwrap(),
            "--otlp-endpoint",
            "http://127.0.0.1:14317",
        ])
        .unwrap();
        assert_eq!(config.otlp_endpoint.as_deref(), Some("http://127.0.0.1:14317"));
        assert_eq!(
            treaty_proto::telemetry::otlp_endpoint(Some("  ".into())),
            None,
            "an empty endpoint turns export off"
        );
        assert!(Args::try_parse_from(["treaty-coordinator", "--otlp-export-interval-ms", "0"]).is_err());
    }

    #[test]
    fn file_settings_apply_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "idle_timeout_ms = 5\nvote_timeout_ms = 7\n[shards]\ns0 = \"http://127.0.0.1:9\"\n",
        )
        .unwrap();
        let config = parse(&["--config", path.to_str().unwrap(), "--vote-timeout-ms", "8"]).unwrap();
        assert_eq!(config.timeouts.idle_ms, 5);
        assert_eq!(config.timeouts.vote_ms, 8);
        assert_eq!(config.shards.len(), 1);
        assert_eq!(config.failpoints, None);
        assert_eq!(config.console_addr, None, "the console is off unless asked for");
        std::fs::write(
            &path,
            "failpoints = \"coordinator::after-end-record=pause\"\n[shards]\ns0 = \"http://127.0.0.1:9\"\n",
        )
        .unwrap();
        let config = parse(&["--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(
            config.failpoints.as_deref(),
            Some("coordinator::after-end-record=pause")
        );
        std::fs::write(
            &path,
            "console_addr = \"127.0.0.1:7680\"\n[shards]\ns0 = \"http://127.0.0.1:9\"\n",
        )
        .unwrap();
        let config = parse(&["--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(
            config.console_addr,
            Some(SocketAddr::from(([127, 0, 0, 1], 7680)))
        );
        let config = parse(&[
            "--config",
            path.to_str().unwrap(),
            "--console-addr",
            "127.0.0.1:7681",
        ])
        .unwrap();
        assert_eq!(
            config.console_addr,
            Some(SocketAddr::from(([127, 0, 0, 1], 7681)))
        );
        std::fs::write(&path, "nonsense = 1\n").unwrap();
        assert!(matches!(
            parse(&["--config", path.to_str().unwrap()]),
            Err(ConfigError::Parse { .. })
        ));
    }
}
