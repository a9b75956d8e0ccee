//! Treaty's participant agent: sits next to one PostgreSQL database and serves the `Participant`
//! gRPC service to the coordinator. Each transaction branch is a local PostgreSQL transaction on a
//! pooled connection, voted on with `PREPARE TRANSACTION`, and finished by the coordinator's
//! decision, directly or through recovery.
//!
//! - `config`: flags, environment and TOML configuration;
//! - `in_process`: the services called in the coordinator's own process (`--shard NAME=postgres://...`);
//! - `health`: the gRPC health service (SERVING while the database answers under the claim) and
//!   server reflection;
//! - `service`: the gRPC service (wire ⇄ domain conversions);
//! - `agent`: the behaviour of every RPC, the idle sweep and shutdown;
//! - `branches`: the in-memory branch table, per-GID locks and tombstones;
//! - `claim`: the advisory lock that keeps a second participant off this database;
//! - `sql_guard`: refuses transaction control in client SQL;
//! - `statement`, `values`: running client statements, parameters and row decoding; `cancel`:
//!   cancelling the statement of a call its caller dropped;
//! - `pool`: the PostgreSQL connection pool (no round trip when a connection is returned);
//! - `postgres`: the participant's own SQL (vote, phase two, markers, `pg_prepared_xacts`);
//! - `decisions`: commit decisions kept in `treaty.decisions` (`--decision-store shard`);
//! - `reconcile`, `coordinator_link`: recovery of prepared branches with the coordinators, and
//!   rolling back open branches of a coordinator run that ended;
//! - `prepared`: the prepared branches and the locks they hold (`ListPrepared`, `treaty in-doubt`);
//! - `error`: the error types and their mapping to `ApiError`;
//! - `failpoints`: the participant's failpoints (served by the `Admin` service);
//! - `three_phase`: three-phase branches (durable pre-commit and promises, the termination protocol).

mod agent;
mod branches;
mod cancel;
mod claim;
pub mod config;
mod coordinator_link;
mod decisions;
pub mod error;
pub mod failpoints;
pub mod health;
mod in_process;
pub mod metrics;
pub mod pool;
mod postgres;
/// The statement a vote's or a decision's round trip makes the transaction durable with
/// (`synchronous_commit = on`) and takes the participant's role back; public for the tests that
/// run it on a real server.
pub use postgres::ROLE_AND_DURABILITY;
mod prepared;
mod reconcile;
mod service;
pub mod sql_guard;
mod statement;
mod three_phase;
mod values;

use std::future::Future;
use std::io::Write;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions as _, Connection as _};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use treaty_proto::metrics_endpoint::{self, MetricsEndpoint};
use treaty_proto::pb::participant_server::ParticipantServer;

pub use crate::config::Config;
pub use crate::error::ParticipantError;
pub use crate::in_process::InProcess;
pub use crate::postgres::{DbError, SessionDefaults};

use crate::agent::{Admission, Agent};
use crate::coordinator_link::{CoordinatorInfo, Coordinators};
use crate::pool::Pool;
use crate::reconcile::Reconciler;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// How long a call waits for a free pooled connection before answering UNAVAILABLE.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long startup waits for the coordinator's `Info` (see `Admission`).
const STARTUP_INFO_TIMEOUT: Duration = Duration::from_secs(2);

/// Connects to PostgreSQL, checks and migrates it, and serves until `shutdown` completes.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ParticipantError> {
    // Loaded first, so a bad access file or certificate stops the start with the file named.
    let access = config.auth.clone().load(
        listener.local_addr().map_err(ParticipantError::ListenAddr)?,
        config.tls.server.as_ref(),
    )?;
    let server_tls = match &config.tls.server {
        Some(files) => Some(
            treaty_proto::tls::ServerTls::load(treaty_proto::auth::server_tls_files(
                files,
                access.as_deref(),
            ))
            .map_err(ParticipantError::Tls)?,
        ),
        None => None,
    };
    let running = Running::start(&config).await?;
    let serving_metrics = match config.metrics_addr {
        Some(metrics_addr) => {
            let endpoint = MetricsEndpoint::bind(metrics_addr).await?;
            let (registry, refresh) = metrics::registry(&running.agent);
            tracing::info!(addr = %endpoint.local_addr(), "serving Prometheus metrics at /metrics");
            metrics_endpoint::announce(endpoint.local_addr());
            Some(endpoint.spawn(registry, Some(refresh)))
        }
        None => None,
    };
    let addr = listener.local_addr().map_err(ParticipantError::ListenAddr)?;
    tracing::info!(%addr, shard = %config.shard, database = %running.database, "participant serving");
    announce(addr);
    let (reflection_v1, reflection_v1alpha) = treaty_proto::reflection::services(
        treaty_proto::pb::participant_server::SERVICE_NAME,
        cfg!(feature = "failpoints"),
    )?;
    let router = tonic::transport::Server::builder()
        // The coordinator's `traceparent` (when exporting) parents each call's span.
        .layer(treaty_proto::telemetry::ServerSpanLayer::new(Some(
            config.shard.as_str(),
        )))
        // Only the configured coordinators and peers get past this (see `treaty_proto::auth`).
        .layer(treaty_proto::auth::AuthLayer::new(access))
        .add_service(ParticipantServer::from_arc(Arc::clone(&running.participant)))
        .add_service(health::server(&running.health))
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    // Only a build with failpoints serves `Admin`; without, a call to it answers UNIMPLEMENTED.
    #[cfg(feature = "failpoints")]
    let router = router.add_service(treaty_failpoints::admin::AdminService::server(&failpoints::ADMIN));
    let served = match server_tls {
        Some(tls) => {
            tracing::info!(
                client_certificates = tls.files().client_certificates(),
                "serving TLS only"
            );
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
    if let Some(serving_metrics) = serving_metrics {
        serving_metrics.abort();
    }
    running.stop().await;
    served?;
    Ok(())
}

/// A started participant: its database checked, claimed and migrated, its background work
/// (reconciliation, the idle sweep, three-phase timeouts, health) running, and its gRPC services
/// built but not bound to any listener. `run` serves them on a port; a coordinator that drives a
/// shard's database itself (`--shard NAME=postgres://...`) calls them in its own process through
/// `in_process` (`in_process.rs`).
pub struct Running {
    database: String,
    participant: Arc<service::ParticipantService>,
    /// The statuses the health service reads (`health::server` on the network).
    health: tonic_health::server::HealthReporter,
    agent: Arc<Agent>,
    pool: Pool,
    claim: claim::Claim,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    following_claim: tokio::task::JoinHandle<()>,
}

impl Running {
    pub async fn start(config: &Config) -> Result<Running, ParticipantError> {
        tokio::fs::create_dir_all(&config.data_dir)
            .await
            .map_err(|source| ParticipantError::DataDir {
                path: config.data_dir.clone(),
                source,
            })?;
        failpoints::arm_at_start(config.failpoints.as_deref())?;
        let pool = connect(config).await?;
        check_server(&pool).await?;
        let database = postgres::current_database(&pool)
            .await
            .map_err(ParticipantError::ServerCheck)?;
        // Before anything reads or writes the database as this shard's.
        let claim = claim::take(&connect_options(config)?, &config.shard, &database).await?;
        migrate(config).await?;
        // Listed before serving: none of these can be a vote this process is about to cast.
        let inherited = postgres::list_prepared(&pool)
            .await
            .map_err(ParticipantError::ServerCheck)?
            .into_iter()
            .map(|xact| xact.gid)
            .collect();
        let link_tls = match &config.tls.link {
            Some(files) => {
                Some(treaty_proto::tls::tonic_client_config(files).map_err(ParticipantError::Tls)?)
            }
            None => None,
        };
        let coordinators = Arc::new(Coordinators::new(&config.coordinator_urls, link_tls.as_ref())?);
        let (admission, runs) = if config.ask_coordinators_at_start {
            startup_admission(&coordinators).await
        } else {
            (Vec::new(), Vec::new())
        };
        let agent = Agent::new(
            config.shard.clone(),
            database.clone(),
            pool.clone(),
            config.branch_idle_timeout(),
            admission,
        );

        let three_phase =
            three_phase::ThreePhase::start(agent.clone(), config.three_phase_timeout_ms, link_tls)
                .await
                .map_err(ParticipantError::ServerCheck)?;

        let (stop, stopped) = watch::channel(false);
        let terminating = tokio::spawn(three_phase.clone().run_ticker(stopped.clone()));
        let reconciler = Reconciler::new(
            agent.clone(),
            three_phase.clone(),
            coordinators,
            config.in_doubt_after_ms,
            config.marker_retention_ms,
            inherited,
            runs,
        );
        let reconciling = tokio::spawn(reconciler.run(config.reconcile_interval(), stopped.clone()));
        let sweeping = tokio::spawn(sweep_idle_branches(
            agent.clone(),
            config.branch_idle_timeout(),
            stopped,
        ));
        let (health, following_claim) = health::start(claim.held()).await;
        let participant = Arc::new(service::ParticipantService::new(agent.clone(), three_phase));
        Ok(Running {
            database,
            participant,
            health,
            agent,
            pool,
            claim,
            stop,
            tasks: vec![terminating, reconciling, sweeping],
            following_claim,
        })
    }

    /// The participant's services for a coordinator that calls them in its own process: no
    /// socket, no HTTP/2, no encoding, the same handlers the agent serves.
    pub fn in_process(&self) -> InProcess {
        InProcess::new(
            Arc::clone(&self.participant),
            tonic_health::server::HealthService::from_health_reporter(self.health.clone()),
        )
    }

    /// Stops the background work, rolls back open branches, closes the pool and drops the claim.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        self.agent.shutdown().await;
        self.pool.close().await;
        drop(self.claim);
        self.following_claim.abort();
        tracing::info!(shard = %self.agent.shard(), "participant stopped");
    }
}

fn unreachable(config: &Config) -> impl FnOnce(sqlx::Error) -> ParticipantError + '_ {
    |source| ParticipantError::DatabaseUnreachable {
        url: config.database_url.redacted(),
        source,
    }
}

/// The one place the URL's password is used. A URL without one gets it from `PGPASSWORD` or the
/// passfile (sqlx reads `PGPASSFILE`, then `~/.pgpass`), which must be private.
fn connect_options(config: &Config) -> Result<PgConnectOptions, ParticipantError> {
    treaty_proto::secret_file::check_passfile(config.database_url.expose())?;
    let url = config.database_url.to_connect()?;
    Ok(PgConnectOptions::from_str(&url)
        .map_err(unreachable(config))?
        .application_name("treaty-participant"))
}

async fn connect(config: &Config) -> Result<Pool, ParticipantError> {
    let options = connect_options(config)?;
    // One direct connection first: the pool would only report "timed out" where this reports the
    // cause (refused, authentication failed, no such database).
    let probe = options.connect().await.map_err(unreachable(config))?;
    let _ = probe.close().await;
    let url = config.database_url.to_connect()?;
    let target = pool::ConnectTarget::from_url(&url)
        .map_err(|source| ParticipantError::BranchPool {
            url: config.database_url.redacted(),
            source: Box::new(source),
        })?
        .application_name("treaty-participant");
    Ok(Pool::with_session_defaults(
        target,
        config.session,
        config.max_connections,
        ACQUIRE_TIMEOUT,
    ))
}

/// Applies the migrations over a sqlx pool of one connection of its own: sqlx's migrator takes
/// a pool (or anything it can acquire from), and this is the only use of one.
async fn migrate(config: &Config) -> Result<(), ParticipantError> {
    let options = connect_options(config)?;
    let migrations = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .map_err(unreachable(config))?;
    let result = MIGRATOR.run(&migrations).await;
    migrations.close().await;
    Ok(result?)
}

async fn check_server(pool: &Pool) -> Result<(), ParticipantError> {
    let max_prepared = postgres::max_prepared_transactions(pool)
        .await
        .map_err(ParticipantError::ServerCheck)?;
    if max_prepared <= 0 {
        return Err(ParticipantError::PreparedTransactionsDisabled);
    }
    Ok(())
}

/// Asks every coordinator once, briefly, for its id, next txid and run; see `Admission`. One
/// that does not answer (usually because it is not running yet, and so has no transactions that
/// could have had a branch in a previous process) admits every transaction of its id. The runs
/// seen are the reconciler's first sighting of each (see `Reconciler::watch_runs`).
async fn startup_admission(coordinators: &Coordinators) -> (Vec<Admission>, Vec<CoordinatorInfo>) {
    let (mut admission, mut runs) = (Vec::new(), Vec::new());
    for result in coordinators.info_all(STARTUP_INFO_TIMEOUT).await {
        match result {
            Ok(info) => {
                tracing::info!(
                    coordinator = %info.id,
                    first_txid = info.next_txid,
                    incarnation = info.incarnation,
                    "coordinator reached at start"
                );
                admission.push(Admission {
                    coordinator: info.id.clone(),
                    first_txid: info.next_txid,
                });
                runs.push(info);
            }
            Err(error) => {
                tracing::info!("coordinator not reached at start ({error}); recovery keeps asking")
            }
        }
    }
    (admission, runs)
}

async fn sweep_idle_branches(agent: Arc<Agent>, idle_timeout: Duration, mut stop: watch::Receiver<bool>) {
    let every = (idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                agent.sweep_idle().await;
                // Bounded, so that a server that stopped answering cannot hold up the branch
                // sweep; a check cut short closes its connection.
                let _ = tokio::time::timeout(every, agent.pool().check_idle()).await;
            }
            _ = stop.changed() => return,
        }
    }
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
