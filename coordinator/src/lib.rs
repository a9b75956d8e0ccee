//! Treaty's coordinator: drives two-phase (or, per transaction, three-phase) commit across
//! participant agents and keeps the durable decision log that recovery replays.
//!
//! - `protocol`: the pure state machine (no I/O), re-exported from `treaty-commit-protocol`;
//! - `driver`: the executor that carries out the machine's actions through the core's two
//!   traits, generic over them (the seeded simulation runs it in memory);
//! - `store`: the file decision log as the core's `DecisionStore`, with two-phase commit records in
//!   a decision database when one is configured (`decision_database`);
//! - `participants`: the gRPC links to participant agents as the core's `ParticipantTransport`
//!   (`h2_channel`: the HTTP/2 connection each link runs on);
//! - `submit`: one-shot cross-shard submits;
//! - `embedded`: the coordinator inside an application's process (`Embedded`), its calls handed
//!   to the service without the gRPC hop;
//! - `service`: the gRPC `Coordinator` service; `in_doubt`: its `ListInDoubt` fan-out; `limits`:
//!   what one client may ask for and hold (`--max-*`);
//! - `metrics`: the Prometheus metrics served on `--metrics-addr`;
//! - `health`: the gRPC health service (SERVING once every shard's participant is reached) and
//!   server reflection;
//! - `console`: the web console (`--console-addr`, off by default): transactions, timelines, the
//!   in-doubt list and resolve, over HTTP;
//! - `config`: flags, environment and TOML configuration;
//! - `failpoints`: the coordinator's failpoints, only with the cargo feature `failpoints`, which
//!   also serves the `Admin` service that arms them (`crash`: the one-shot `--crash-at` on top).

pub mod config;
pub mod console;
mod crash;
pub mod decision_database;
pub mod driver;
mod earlier_run;
pub mod embedded;
pub mod failpoints;
mod faults;
pub mod h2_channel;
pub mod health;
mod in_doubt;
pub mod limits;
mod log_faults;
pub mod metrics;
pub mod participants;
pub mod service;
pub mod store;
pub mod submit;

#[cfg(test)]
mod serve_tests;

/// The pure commit protocol lives in its own crate so that the model checker runs the same code.
pub use treaty_commit_protocol as protocol;

pub use embedded::Embedded;

use std::future::Future;
use std::io::Write;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use treaty_decision_log::{DecisionLog, LogOptions, TestHooks};
use treaty_proto::CoordinatorId;
use treaty_proto::metrics_endpoint::{self, MetricsEndpoint};
use treaty_proto::pb::coordinator_server::CoordinatorServer;
use treaty_types::SystemClock;

use crate::config::{Config, DecisionStoreKind};
use crate::driver::{Engine, EngineSettings};
use crate::participants::ParticipantLinks;
use crate::store::FileStore;

/// The coordinator as it runs: the file decision log and gRPC participant links (wrapped in the
/// failpoint decorators in a fault-injection build).
#[cfg(not(feature = "failpoints"))]
pub type CoordinatorEngine = Engine<FileStore, ParticipantLinks>;
#[cfg(feature = "failpoints")]
pub type CoordinatorEngine =
    Engine<faults::FaultyStore<FileStore>, faults::FaultyTransport<ParticipantLinks>>;

/// The engine on `store` and `links`, with the failpoint decorators where the build has them (for
/// the in-crate tests that drive it against fake participants; `run` starts it with `driver::start`).
#[cfg(test)]
pub(crate) fn engine_on(
    id: CoordinatorId,
    store: FileStore,
    links: ParticipantLinks,
    settings: EngineSettings,
) -> std::sync::Arc<CoordinatorEngine> {
    let (store, links) = faults::install(store, links);
    Engine::new(id, store, links, Arc::new(SystemClock), settings, 0)
}

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("TLS: {0}")]
    Tls(treaty_proto::tls::TlsError),
    #[error("who may call: {0}")]
    Auth(#[from] treaty_proto::auth::AuthError),
    #[error("decision log in {dir}: {source}")]
    Log {
        dir: std::path::PathBuf,
        source: treaty_decision_log::LogError,
    },
    #[error(
        "the decision log in {dir} belongs to coordinator {logged:?} but --id says {configured:?}; \
         GIDs must stay stable, so drop --id or point --data-dir at this coordinator's own log"
    )]
    IdMismatch {
        dir: std::path::PathBuf,
        logged: String,
        configured: String,
    },
    #[error(
        "the decision log in {dir} is damaged and its header (which holds this coordinator's id) was lost; \
         restart with --id set to the id in the GIDs this coordinator wrote (treaty:<id>:<txid>:<shard> in \
         the participants' pg_prepared_xacts, treaty:<id>:<txid> in their logs), so that its transactions keep their names"
    )]
    HeaderLost { dir: std::path::PathBuf },
    #[error(
        "{dir} holds no decision log, but the shards hold work of coordinator {id} from an earlier \
         run ({found}): a new log would hand out that run's txids again and could finish those \
         transactions wrongly. Restore the data directory of coordinator {id}; or, with \
         --decision-store shard, start this instance under another --id and let the running \
         instances finish {id}'s transactions (they take over what no instance finishes)"
    )]
    EarlierRunLeftWork {
        dir: std::path::PathBuf,
        id: String,
        found: String,
    },
    #[error("coordinator id: {0}")]
    BadId(treaty_proto::IdError),
    #[error("--decision-store shard: {0}")]
    GidRoom(String),
    #[error(transparent)]
    Links(#[from] participants::LinkSetupError),
    #[error("serving gRPC: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("reading the listen address: {0}")]
    ListenAddr(std::io::Error),
    #[error("opening the decision log was interrupted: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("{0}")]
    Store(String),
    #[error(transparent)]
    DecisionDatabase(#[from] decision_database::DecisionDatabaseError),
    #[error(
        "this coordinator kept its decisions in the decision database {url} (recorded in {marker}); \
         started without it, it would presume abort for transactions committed there. Start it with \
         --decision-store set to that database's URL; remove {marker} only once no transaction of this \
         coordinator is left unfinished (none of its GIDs in any shard's pg_prepared_xacts)"
    )]
    DecisionDatabaseRequired { url: String, marker: std::path::PathBuf },
    #[error("recording the decision database in {path}: {source}")]
    DecisionDatabaseMarker {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("arming failpoints: {0}")]
    Failpoints(#[from] failpoints::FailpointError),
    #[error("shard {shard} (driven in this process): {message}")]
    InProcessConfig { shard: String, message: String },
    #[error("shard {shard} (driven in this process): {source}")]
    InProcess {
        shard: String,
        source: treaty_participant::ParticipantError,
    },
    #[error(transparent)]
    Console(#[from] console::ConsoleError),
    #[error(transparent)]
    Metrics(#[from] treaty_proto::metrics_endpoint::MetricsEndpointError),
}

/// A fresh coordinator id: short, lowercase, unlikely to collide with another coordinator's.
fn generate_id() -> String {
    format!("c{:08x}", rand::random::<u32>())
}

/// Opens the log, recovers, and serves until `shutdown` completes.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CoordinatorError> {
    serve(config, listener, shutdown, None).await
}

/// What a coordinator started inside an application hands it once it serves: the engine and the
/// limits its gRPC service enforces, so that the application's own calls count against the same
/// totals as remote clients' (`embedded`).
pub(crate) struct Ready {
    pub engine: Arc<CoordinatorEngine>,
    pub limits: Arc<limits::Limits>,
    pub addr: std::net::SocketAddr,
    /// `own_endpoint`: how this process reaches the listener.
    pub endpoint: String,
}

/// `run`, telling `ready` (if any) instead of stdout that it serves.
pub(crate) async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    ready: Option<tokio::sync::oneshot::Sender<Ready>>,
) -> Result<(), CoordinatorError> {
    let dir = config.data_dir.clone();
    failpoints::arm_at_start(config.failpoints.as_deref())?;
    crash::arm(config.crash_at.as_deref(), &dir)?;
    let log_error = |source| CoordinatorError::Log {
        dir: dir.clone(),
        source,
    };
    let options = LogOptions {
        compact_after_bytes: config.compact_after_bytes,
        on_batch: Some(metrics::log_batch_observer()),
    };
    let open_dir = dir.clone();
    // The hooks cost an `Option` check per batch; without the feature they are not installed.
    let hooks = if cfg!(feature = "failpoints") {
        log_faults::hooks(&dir)
    } else {
        TestHooks::default()
    };
    // Commit decisions in a decision database are not in the log: a start without that database
    // would presume abort for them, so it is refused.
    if config.decision_store != DecisionStoreKind::Database
        && let Some(url) = decision_database::recorded_in(&dir.join(decision_database::MARKER_FILE))
    {
        return Err(CoordinatorError::DecisionDatabaseRequired {
            url,
            marker: dir.join(decision_database::MARKER_FILE),
        });
    }
    let (log, replay) =
        tokio::task::spawn_blocking(move || DecisionLog::open_with_hooks(&open_dir, options, hooks))
            .await?
            .map_err(log_error)?;
    for damage in &replay.damage {
        tracing::warn!(kind = ?damage.kind, offset = damage.offset, length = damage.length, "decision log damage repaired: {}", damage.detail);
    }
    // A log with nothing in it: no record, no damage, no header.
    let new_log_for_configured_id = replay.coordinator_id.is_none()
        && config.id.is_some()
        && replay.records == 0
        && replay.damage.is_empty();
    let id = match (&replay.coordinator_id, &config.id) {
        (Some(logged), Some(configured)) if logged != configured => {
            return Err(CoordinatorError::IdMismatch {
                dir,
                logged: logged.clone(),
                configured: configured.clone(),
            });
        }
        (Some(logged), _) => logged.clone(),
        (None, None) if !replay.damage.is_empty() => {
            // A damaged log without its header: the id is still written in every commit record's
            // GID; a fresh id would orphan every prepared branch named with the old one.
            let from_gids = replay
                .unfinished
                .iter()
                .find_map(|record| treaty_proto::Gid::parse(&record.gid).ok())
                .map(|gid| gid.coordinator().to_string());
            let Some(id) = from_gids else {
                return Err(CoordinatorError::HeaderLost { dir });
            };
            tracing::warn!(coordinator = %id, "decision log header lost; id recovered from the logged GIDs");
            log.write_header(&id).await.map_err(log_error)?;
            id
        }
        (None, None) => {
            let id = generate_id();
            CoordinatorId::new(&id).map_err(CoordinatorError::BadId)?;
            log.write_header(&id).await.map_err(log_error)?;
            id
        }
        // A new log under an id given on the command line: written once the shards show no
        // earlier run of that id (below), since an id that ran before with its data directory
        // lost would hand out its txids again.
        (None, Some(configured)) => {
            if !new_log_for_configured_id {
                CoordinatorId::new(configured).map_err(CoordinatorError::BadId)?;
                log.write_header(configured).await.map_err(log_error)?;
            }
            configured.clone()
        }
    };
    let id = CoordinatorId::new(&id).map_err(CoordinatorError::BadId)?;
    let addr = listener.local_addr().map_err(CoordinatorError::ListenAddr)?;
    // Everything that can fail for a reason of its own (a certificate, a port taken) fails here,
    // before the participants and the driver start, so that a failed start leaves none of their
    // work running; and before the coordinator says it listens: a console address that cannot be
    // bound fails the start instead of leaving a coordinator without the console it was asked
    // for, and a bad certificate stops it with the file named.
    let access = config.auth.clone().load(addr, config.tls.server.as_ref())?;
    let server_tls = match &config.tls.server {
        Some(files) => {
            let tls = treaty_proto::tls::ServerTls::load(treaty_proto::auth::server_tls_files(
                files,
                access.as_deref(),
            ))
            .map_err(CoordinatorError::Tls)?;
            tracing::info!(
                cert = %files.cert.display(),
                client_certificates = tls.files().client_certificates(),
                "serving TLS only"
            );
            Some(tls)
        }
        None => None,
    };
    let console = match config.console_addr {
        Some(addr) => Some(console::bind(addr).await?),
        None => None,
    };
    let metrics_endpoint = match config.metrics_addr {
        Some(metrics_addr) => Some(MetricsEndpoint::bind(metrics_addr).await?),
        None => None,
    };
    let (reflection_v1, reflection_v1alpha) = treaty_proto::reflection::services(
        treaty_proto::pb::coordinator_server::SERVICE_NAME,
        cfg!(feature = "failpoints"),
    )?;
    let link_tls = match &config.tls.link {
        Some(files) => Some(Arc::new(
            treaty_proto::tls::client_config(files).map_err(CoordinatorError::Tls)?,
        )),
        None => None,
    };
    let (local, in_process) = start_in_process(&config, addr).await?;
    let addresses = config
        .shards
        .iter()
        .map(|(shard, address)| (shard.clone(), address.expose().to_owned()))
        .collect();
    let links = ParticipantLinks::with_local(&addresses, local, link_tls)?;
    let settings = EngineSettings {
        timeouts: config.timeouts,
        lock_timeout_ms: config.lock_timeout_ms,
        protocol: config.default_protocol,
        decide_in_branch: config.decision_store == DecisionStoreKind::Shard,
        takeover_after_ms: config.takeover_after_ms,
    };
    if settings.decide_in_branch {
        check_gid_room(&id, config.shards.keys())?;
    }
    if new_log_for_configured_id {
        if let Some(found) = earlier_run::work_left(&links, &id, settings.decide_in_branch).await {
            return Err(CoordinatorError::EarlierRunLeftWork {
                dir: dir.clone(),
                id: id.to_string(),
                found,
            });
        }
        log.write_header(id.as_str()).await.map_err(log_error)?;
    }
    // A damaged region may have held the latest txid reservation: skip a block per damaged region
    // so that no txid handed out before the damage is handed out again.
    let reserved_up_to = replay.txids_reserved_up_to + driver::TXID_BLOCK * replay.damage.len() as u64;
    tracing::info!(coordinator = %id, records = replay.records, "decision log opened");
    // The metrics read the log's counters through a clone of its handle.
    let log_for_metrics = log.clone();
    let mut store = FileStore::new(log, &replay, reserved_up_to);
    let marker = dir.join(decision_database::MARKER_FILE);
    if let (DecisionStoreKind::Database, Some(url)) = (config.decision_store, &config.decision_database) {
        decision_database::record_in(&marker, url).map_err(|source| {
            CoordinatorError::DecisionDatabaseMarker {
                path: marker.clone(),
                source,
            }
        })?;
        let database = decision_database::DecisionDatabase::open(url, id.clone()).await?;
        tracing::info!(database = %url, "two-phase commit decisions are rows in the decision database");
        store = store.with_database(database);
    }
    // The health probe goes straight to the links: no failpoint decorates it.
    let probed_links = links.clone();
    let (store, links) = faults::install(store, links);
    let engine = driver::start(id.clone(), store, links, Arc::new(SystemClock), settings)
        .await
        .map_err(|error| CoordinatorError::Store(error.to_string()))?;
    engine.spawn_ticker();

    let serving_metrics = match metrics_endpoint {
        Some(endpoint) => {
            let shards: Vec<_> = config.shards.keys().cloned().collect();
            let registry = metrics::registry(&engine, CoordinatorEngine::census, log_for_metrics, &shards);
            tracing::info!(addr = %endpoint.local_addr(), "serving Prometheus metrics at /metrics");
            // An application that embeds the coordinator owns its stdout.
            if ready.is_none() {
                metrics_endpoint::announce(endpoint.local_addr());
            }
            Some(AbortOnDrop(endpoint.spawn(registry, None)))
        }
        None => None,
    };
    tracing::info!(%addr, shards = config.shards.len(), "coordinator serving");
    let console = console.map(|listener| spawn_console(engine.clone(), listener, access.is_some()));
    let limits = limits::Limits::new(config.limits);
    let service = CoordinatorServer::new(service::CoordinatorService::new(engine.clone(), limits.clone()))
        .max_decoding_message_size(config.limits.max_request_bytes);
    let (health, probing) = health::start(probed_links).await;
    // The probe holds the links (and through them the in-process participants' branches): it must
    // not outlive a start that fails below.
    let probing = AbortOnDrop(probing);
    let router = tonic::transport::Server::builder()
        // A client's `traceparent` (when exporting) parents the call, and so the transaction.
        .layer(treaty_proto::telemetry::ServerSpanLayer::new(None))
        // A request over `--max-request-bytes` is refused like any other limit.
        .layer(limits::RequestSizeLayer)
        // Every call authenticated and allowed by role before any handler sees it.
        .layer(treaty_proto::auth::AuthLayer::new(access))
        .add_service(service)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    // Only a build with failpoints serves `Admin`; without, a call to it answers UNIMPLEMENTED.
    // With shards driven in process, their participants' points fire here too, and are armed here.
    #[cfg(feature = "failpoints")]
    let router = router.add_service(treaty_failpoints::admin::AdminService::server(
        if in_process.is_empty() {
            &failpoints::ADMIN
        } else {
            &failpoints::ADMIN_WITH_IN_PROCESS
        },
    ));
    // Told only once nothing more can fail before serving. Should nobody be waiting any more (an
    // application's start was cancelled without aborting this), it stops at once rather than
    // run with nobody able to stop it.
    let abandoned = match ready {
        Some(ready) => ready
            .send(Ready {
                engine: engine.clone(),
                limits,
                addr,
                endpoint: own_endpoint(&config, addr),
            })
            .is_err(),
        None => {
            announce(addr);
            false
        }
    };
    let shutdown = async move {
        if !abandoned {
            shutdown.await;
        }
    };
    let served = match server_tls {
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(treaty_proto::tls::incoming(listener, tls), shutdown)
                .await
        }
        None => {
            router
                .serve_with_incoming_shutdown(incoming(listener), shutdown)
                .await
        }
    };
    drop(probing);
    if let Some(console) = console {
        console.stop().await;
    }
    drop(serving_metrics);
    // Whether the server stopped on request or failed, what was decided is flushed and the
    // participants stop cleanly before the error is reported.
    engine.flush().await;
    for participant in in_process {
        participant.stop().await;
    }
    served?;
    tracing::info!("coordinator stopped");
    Ok(())
}

/// A background task that ends with its owner, on every path out of `serve`.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The URL this coordinator is reached at from its own host: a listener on every interface is
/// reached on loopback; `https` when it serves TLS.
fn own_endpoint(config: &Config, addr: std::net::SocketAddr) -> String {
    let own = if addr.ip().is_unspecified() {
        std::net::SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    let scheme = if config.tls.server.is_some() {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{own}")
}

/// The console's server task and the signal that stops it.
struct RunningConsole {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// How long a stopping console waits for requests in flight (a browser's long-lived connection
/// must not hold up the coordinator's exit).
const CONSOLE_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

impl RunningConsole {
    async fn stop(self) {
        // The server may already have ended (its error was logged); nothing to stop then.
        let _ = self.stop.send(());
        let mut task = self.task;
        if tokio::time::timeout(CONSOLE_STOP_TIMEOUT, &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

fn spawn_console(engine: Arc<CoordinatorEngine>, listener: TcpListener, read_only: bool) -> RunningConsole {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(url = %format!("http://{addr}/"), "web console serving");
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "the web console has no authentication and is not bound to loopback: anyone who reaches it can see every transaction{}", if read_only { "" } else { " and resolve them by hand" });
        }
    }
    let task = tokio::spawn(async move {
        let shutdown = async move {
            // A dropped sender stops the console too.
            let _ = stopped.await;
        };
        if let Err(error) = console::serve(engine, listener, shutdown, read_only).await {
            tracing::error!("{error}; the coordinator keeps serving gRPC without its console");
        }
    });
    RunningConsole { stop, task }
}

/// Starts a participant in this process for each shard given as a database URL: the agent's own
/// code (`treaty_participant::Running`), with its data under `<data dir>/participants/<shard>`,
/// asking this coordinator (through its own listener) about prepared branches during recovery.
/// They start before the driver, whose re-drives need every link.
async fn start_in_process(
    config: &Config,
    addr: std::net::SocketAddr,
) -> Result<
    (
        std::collections::BTreeMap<treaty_proto::ShardName, treaty_participant::InProcess>,
        Vec<treaty_participant::Running>,
    ),
    CoordinatorError,
> {
    let mut local = std::collections::BTreeMap::new();
    let mut running = Vec::new();
    let own = own_endpoint(config, addr);
    for (shard, url) in &config.shards {
        if !config::is_database_url(url.expose()) {
            continue;
        }
        let lock_timeout_ms = u32::try_from(config.lock_timeout_ms).unwrap_or(u32::MAX);
        let participant = treaty_participant::Config::in_process(
            shard.clone(),
            url.clone(),
            own.clone(),
            config.data_dir.join("participants").join(shard.as_str()),
            lock_timeout_ms,
        )
        .map_err(|error| CoordinatorError::InProcessConfig {
            shard: shard.to_string(),
            message: error.to_string(),
        })?;
        // It asks this coordinator for decisions over the coordinator's own links' TLS.
        let mut participant = participant;
        participant.tls.link = config.tls.link.clone();
        let started = treaty_participant::Running::start(&participant)
            .await
            .map_err(|source| CoordinatorError::InProcess {
                shard: shard.to_string(),
                source,
            })?;
        tracing::info!(%shard, "shard driven in this process (no participant agent)");
        local.insert(shard.clone(), started.in_process());
        running.push(started);
    }
    Ok((local, running))
}

/// Tells whoever started the process where it serves (the test harness waits for this line).
fn announce(addr: std::net::SocketAddr) {
    let mut stdout = std::io::stdout().lock();
    // Nobody reading stdout is not a reason to stop serving.
    let _ = writeln!(stdout, "listening on {addr}");
    let _ = stdout.flush();
}

/// Accepted connections with Nagle off. `Server::tcp_nodelay` applies only when tonic binds the
/// socket itself; with a listener handed in, each small gRPC frame otherwise waits for the peer's
/// delayed ACK (about 40 ms per round trip, measured with one client in `treaty bench`).
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// With decisions in a shard, every branch GID names two shards; refuse at start a coordinator id
/// and shard names too long for PostgreSQL's 199-byte GIDs rather than fail transactions later.
fn check_gid_room<'a>(
    id: &CoordinatorId,
    shards: impl Iterator<Item = &'a treaty_proto::ShardName>,
) -> Result<(), CoordinatorError> {
    for shard in shards {
        treaty_proto::Gid::with_decision_shard(id, u64::MAX, shard)
            .map_err(|e| CoordinatorError::GidRoom(e.to_string()))?;
    }
    Ok(())
}
