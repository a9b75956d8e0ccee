//! Treaty's participant agent: sits next to one PostgreSQL database and serves the `Participant`
//! gRPC service to the coordinator. Each transaction branch is a local PostgreSQL transaction on a
//! pooled connection, voted on with `PREPARE TRANSACTION`, and finished by the coordinator's
//! decision, directly or through recovery.
//!
//! - `config`: flags, environment and TOML configuration;
//! - `health`: the gRPC health service (SERVING while the database answers under the claim) and
//!   server reflection;
//! - `service`: the gRPC service (wire ⇄ domain conversions);
//! - `agent`: the behaviour of every RPC, the idle sweep and shutdown;
//! - `branches`: the in-memory branch table, per-GID locks and tombstones;
//! - `claim`: the advisory lock that keeps a second participant off this database;
//! - `sql_guard`: refuses transaction control in client SQL;
//! - `statement`, `values`: running client statements, parameters and row decoding;
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
mod claim;
pub mod config;
mod coordinator_link;
mod decisions;
pub mod error;
pub mod failpoints;
pub mod health;
pub mod pool;
mod postgres;
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
use treaty_proto::pb::participant_server::ParticipantServer;

pub use crate::config::Config;
pub use crate::error::ParticipantError;
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
    tokio::fs::create_dir_all(&config.data_dir)
        .await
        .map_err(|source| ParticipantError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
    failpoints::arm_at_start(config.failpoints.as_deref())?;
    let pool = connect(&config).await?;
    check_server(&pool).await?;
    let database = postgres::current_database(&pool)
        .await
        .map_err(ParticipantError::ServerCheck)?;
    // Before anything reads or writes the database as this shard's.
    let claim = claim::take(&connect_options(&config)?, &config.shard, &database).await?;
    migrate(&config).await?;
    // Listed before serving: none of these can be a vote this process is about to cast.
    let inherited = postgres::list_prepared(&pool)
        .await
        .map_err(ParticipantError::ServerCheck)?
        .into_iter()
        .map(|xact| xact.gid)
        .collect();
    let coordinators = Arc::new(Coordinators::new(&config.coordinator_urls)?);
    let (admission, runs) = startup_admission(&coordinators).await;
    let agent = Agent::new(
        config.shard.clone(),
        database.clone(),
        pool.clone(),
        config.branch_idle_timeout(),
        admission,
    );

    let three_phase = three_phase::ThreePhase::start(agent.clone(), config.three_phase_timeout_ms)
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

    let addr = listener.local_addr().map_err(ParticipantError::ListenAddr)?;
    tracing::info!(%addr, shard = %config.shard, %database, "participant serving");
    announce(addr);
    let (health, following_claim) = health::start(claim.held()).await;
    let (reflection_v1, reflection_v1alpha) = treaty_proto::reflection::services(
        treaty_proto::pb::participant_server::SERVICE_NAME,
        cfg!(feature = "failpoints"),
    )?;
    let router = tonic::transport::Server::builder()
        // The coordinator's `traceparent` (when exporting) parents each call's span.
        .layer(treaty_proto::telemetry::ServerSpanLayer::new(Some(
            config.shard.as_str(),
        )))
        .add_service(ParticipantServer::new(service::ParticipantService::new(
            agent.clone(),
            three_phase,
        )))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    // Only a build with failpoints serves `Admin`; without, a call to it answers UNIMPLEMENTED.
    #[cfg(feature = "failpoints")]
    let router = router.add_service(treaty_failpoints::admin::AdminService::server(
        &failpoints::CATALOG,
    ));
    let served = router
        .serve_with_incoming_shutdown(incoming(listener), shutdown)
        .await;

    let _ = stop.send(true);
    let _ = reconciling.await;
    let _ = sweeping.await;
    let _ = terminating.await;
    agent.shutdown().await;
    pool.close().await;
    drop(claim);
    following_claim.abort();
    tracing::info!("participant stopped");
    served?;
    Ok(())
}

fn unreachable(config: &Config) -> impl FnOnce(sqlx::Error) -> ParticipantError + '_ {
    |source| ParticipantError::DatabaseUnreachable {
        url: redact(&config.database_url),
        source,
    }
}

fn connect_options(config: &Config) -> Result<PgConnectOptions, ParticipantError> {
    Ok(PgConnectOptions::from_str(&config.database_url)
        .map_err(unreachable(config))?
        .application_name("treaty-participant"))
}

async fn connect(config: &Config) -> Result<Pool, ParticipantError> {
    let options = connect_options(config)?;
    // One direct connection first: the pool would only report "timed out" where this reports the
    // cause (refused, authentication failed, no such database).
    let probe = options.connect().await.map_err(unreachable(config))?;
    let _ = probe.close().await;
    Ok(Pool::with_session_defaults(
        options,
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
            _ = ticker.tick() => agent.sweep_idle().await,
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

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_owned(),
    }
}

/// Accepted connections with Nagle off. `Server::tcp_nodelay` applies only when tonic binds the
/// socket itself; with a listener handed in, each small gRPC frame otherwise waits for the peer's
/// delayed ACK (about 40 ms per round trip, measured with one client in `treaty bench`).
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("postgres://u:secret@h:5/db"), "postgres://u:***@h:5/db");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("host=h"), "host=h");
    }
}
