//! What every test here needs: a fresh database per test on the PostgreSQL named by
//! `TREATY_TEST_DATABASE_URL`, a fake coordinator (Info and QueryDecision answered from a table
//! the test fills), and the participant library serving on loopback with a gRPC client to it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use treaty_harness::{PgCluster, PgOptions};
use treaty_participant::{Config, ParticipantError};
use treaty_proto::pb;
use treaty_proto::pb::participant_client::ParticipantClient;

/// A restart of the whole server (e.g. `pg_ctl restart -m immediate`) stops every test's
/// connections, so such a test runs alone: it takes this lock for writing, all others for reading.
pub static SERVER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn init_logging() {
    // Participant logs go to the test's captured output (shown for failing tests); RUST_LOG filters.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx::postgres::notice=error")),
        )
        .with_test_writer()
        .try_init();
}

/// The PostgreSQL a test runs against: the server named by `TREATY_TEST_DATABASE_URL` if set,
/// else a cluster of the test's own started by the harness (stopped when the test ends).
pub async fn server() -> (String, Option<(PgCluster, tempfile::TempDir)>) {
    init_logging();
    if let Ok(url) = std::env::var("TREATY_TEST_DATABASE_URL")
        && !url.is_empty()
    {
        return (url, None);
    }
    let dir = tempfile::Builder::new()
        .prefix("treaty-participant-test-")
        .tempdir()
        .unwrap();
    let options = PgOptions {
        fsync: false,
        ..PgOptions::default()
    };
    let pg = PgCluster::start(dir.path(), "pg", &options)
        .await
        .expect("starting a PostgreSQL cluster for the test");
    (pg.url("postgres"), Some((pg, dir)))
}

/// `url` with its database name replaced (URLs of the form `postgres://.../db`, no query string).
fn with_database(url: &str, database: &str) -> String {
    let base = url.rsplit_once('/').map_or(url, |(base, _)| base);
    format!("{base}/{database}")
}

pub struct TestDb {
    pub name: String,
    pub url: String,
    /// Direct connections, to check what the participant did.
    pub pool: PgPool,
}

impl TestDb {
    pub async fn create(admin_url: &str, name: &str) -> TestDb {
        let url = with_database(admin_url, name);
        // Prepared transactions left by an earlier run block DROP DATABASE; they can only be
        // finished from their own database.
        if let Ok(old) = PgPoolOptions::new().max_connections(1).connect(&url).await {
            let gids: Vec<String> =
                sqlx::query_scalar("SELECT gid FROM pg_prepared_xacts WHERE database = current_database()")
                    .fetch_all(&old)
                    .await
                    .unwrap();
            for gid in gids {
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("ROLLBACK PREPARED '{gid}'")))
                    .execute(&old)
                    .await
                    .unwrap();
            }
            old.close().await;
        }
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(admin_url)
            .await
            .unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&admin)
        .await
        .unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&url)
            .await
            .unwrap();
        TestDb {
            name: name.into(),
            url,
            pool,
        }
    }

    pub async fn sql(&self, sql: &str) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Whether a branch of the transaction `gid` is prepared in this database, under whichever
    /// name (the branch GID `<gid>:<shard>`, or the legacy bare GID).
    pub async fn is_prepared(&self, gid: &str) -> bool {
        self.prepared()
            .await
            .iter()
            .any(|text| treaty_proto::BranchGid::parse(text).is_ok_and(|branch| branch.gid().as_str() == gid))
    }

    /// The GIDs prepared in this database, exactly as PostgreSQL holds them.
    pub async fn prepared(&self) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() ORDER BY gid",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    pub async fn has_marker(&self, gid: &str) -> bool {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM treaty.branches WHERE gid = $1)")
            .bind(gid)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }
}

/// Answers `Info` and `QueryDecision` like a coordinator with id `id`.
#[derive(Clone)]
pub struct FakeCoordinator {
    pub id: String,
    pub next_txid: Arc<AtomicU64>,
    /// gid → (decision, tracked); GIDs not listed get ABORT, untracked (presumed abort).
    pub decisions: Arc<Mutex<HashMap<String, (pb::Decision, bool)>>>,
    pub queries: Arc<AtomicUsize>,
    /// Every GID `QueryDecision` was asked about, in order.
    pub asked: Arc<Mutex<Vec<String>>>,
    /// What `Info` answers as `open_from` (0: not known).
    pub open_from: Arc<AtomicU64>,
    /// How many times `Info` was asked (a recovery pass asks once).
    pub infos: Arc<AtomicUsize>,
}

impl FakeCoordinator {
    pub fn decide(&self, gid: &str, decision: pb::Decision, tracked: bool) {
        self.decisions
            .lock()
            .unwrap()
            .insert(gid.into(), (decision, tracked));
    }
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for FakeCoordinator {
    async fn begin(&self, _: Request<pb::BeginRequest>) -> Result<Response<pb::BeginResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn execute(&self, _: Request<pb::ExecuteRequest>) -> Result<Response<pb::ExecuteResult>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn commit(&self, _: Request<pb::CommitRequest>) -> Result<Response<pb::Outcome>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn rollback(&self, _: Request<pb::RollbackRequest>) -> Result<Response<pb::Outcome>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn submit(&self, _: Request<pb::SubmitRequest>) -> Result<Response<pb::SubmitResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn get_transaction(
        &self,
        _: Request<pb::GetTransactionRequest>,
    ) -> Result<Response<pb::TransactionInfo>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn list_transactions(
        &self,
        _: Request<pb::ListTransactionsRequest>,
    ) -> Result<Response<pb::ListTransactionsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn query_decision(
        &self,
        request: Request<pb::QueryDecisionRequest>,
    ) -> Result<Response<pb::QueryDecisionResponse>, Status> {
        let gids = request.into_inner().gids;
        self.asked.lock().unwrap().extend(gids.iter().cloned());
        self.queries.fetch_add(1, Ordering::SeqCst);
        let decisions = self.decisions.lock().unwrap();
        let answers = gids
            .into_iter()
            .map(|gid| {
                let (decision, tracked) = decisions
                    .get(&gid)
                    .copied()
                    .unwrap_or((pb::Decision::Abort, false));
                pb::DecisionAnswer {
                    gid,
                    decision: decision as i32,
                    tracked,
                }
            })
            .collect();
        Ok(Response::new(pb::QueryDecisionResponse { answers }))
    }
    async fn list_in_doubt(
        &self,
        _: Request<pb::ListInDoubtRequest>,
    ) -> Result<Response<pb::ListInDoubtResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn resolve(&self, _: Request<pb::ResolveRequest>) -> Result<Response<pb::ResolveResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn info(&self, _: Request<pb::InfoRequest>) -> Result<Response<pb::InfoResponse>, Status> {
        self.infos.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(pb::InfoResponse {
            coordinator_id: self.id.clone(),
            shards: vec!["s0".into()],
            next_txid: self.next_txid.load(Ordering::SeqCst),
            open_from: self.open_from.load(Ordering::SeqCst),
            ..Default::default()
        }))
    }
}

pub async fn serve_fake(fake: FakeCoordinator) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::coordinator_server::CoordinatorServer::new(fake))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

pub struct Participant {
    pub client: ParticipantClient<Channel>,
    /// Where it serves (`http://127.0.0.1:PORT`).
    pub url: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ParticipantError>>,
}

impl Participant {
    pub async fn start(config: Config) -> Participant {
        Self::start_at(config, "127.0.0.1:0").await
    }

    /// Starts on a given address (a restart that keeps the address its peers know).
    pub async fn start_at(config: Config, addr: &str) -> Participant {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(treaty_participant::run(config, listener, async {
            let _ = stopped.await;
        }));
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let channel = loop {
            match endpoint.connect().await {
                Ok(channel) => break channel,
                Err(e) if Instant::now() < deadline => {
                    assert!(!task.is_finished(), "participant exited: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("participant did not start: {e}"),
            }
        };
        Participant {
            url: format!("http://{addr}"),
            client: ParticipantClient::new(channel),
            stop: Some(stop),
            task,
        }
    }

    /// Graceful shutdown, as on SIGTERM.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.unwrap().unwrap();
    }
}

/// One test's world: its database, a fake coordinator with a unique id (GIDs are unique across the
/// whole PostgreSQL cluster), and a participant.
pub struct Env {
    /// The server's `postgres` database, for creating more databases on the same server.
    pub admin_url: String,
    pub db: TestDb,
    pub coordinator: FakeCoordinator,
    pub coordinator_addr: SocketAddr,
    pub participant: Option<Participant>,
    pub data_dir: tempfile::TempDir,
    /// The test's own PostgreSQL (None with `TREATY_TEST_DATABASE_URL`); last, so dropped last.
    pub pg: Option<(PgCluster, tempfile::TempDir)>,
}

impl Env {
    /// Always `Some`; an `Option` so that tests read `let Some(env) = ... else` uniformly.
    pub async fn start(name: &str, tweak: impl FnOnce(&mut Config)) -> Option<Env> {
        let (admin, pg) = server().await;
        let unique = format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
        let db = TestDb::create(&admin, &format!("treaty_test_{}", name.replace('-', "_"))).await;
        let coordinator = FakeCoordinator {
            id: format!("c{unique}-{name}"),
            next_txid: Arc::new(AtomicU64::new(1)),
            decisions: Arc::default(),
            queries: Arc::default(),
            asked: Arc::default(),
            open_from: Arc::default(),
            infos: Arc::default(),
        };
        let coordinator_addr = serve_fake(coordinator.clone()).await;
        let data_dir = tempfile::tempdir().unwrap();
        let mut config = config(&db, coordinator_addr, data_dir.path());
        tweak(&mut config);
        let participant = Participant::start(config).await;
        Some(Env {
            admin_url: admin,
            db,
            coordinator,
            coordinator_addr,
            participant: Some(participant),
            data_dir,
            pg,
        })
    }

    /// Stops the participant gracefully (as on SIGTERM) and starts a new one with `config`.
    pub async fn restart_participant(&mut self, config: Config) {
        if let Some(participant) = self.participant.take() {
            participant.stop().await;
        }
        self.participant = Some(Participant::start(config).await);
    }

    pub fn config(&self) -> Config {
        config(&self.db, self.coordinator_addr, self.data_dir.path())
    }

    pub fn gid(&self, txid: u64) -> String {
        format!("treaty:{}:{txid}", self.coordinator.id)
    }

    pub fn client(&self) -> ParticipantClient<Channel> {
        self.participant
            .as_ref()
            .expect("participant running")
            .client
            .clone()
    }

    pub async fn execute(
        &self,
        gid: &str,
        sql: &str,
        params: Vec<pb::Value>,
    ) -> Result<pb::ExecuteResult, Status> {
        self.client()
            .execute(pb::BranchExecuteRequest {
                gid: gid.into(),
                sql: sql.into(),
                params,
                options: None,
                ..Default::default()
            })
            .await
            .map(Response::into_inner)
    }

    pub async fn prepare(&self, gid: &str) -> pb::PrepareResponse {
        self.client()
            .prepare(pb::PrepareRequest {
                gid: gid.into(),
                participants: vec!["s0".into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn commit(&self, gid: &str) -> Result<pb::BranchState, Status> {
        let response = self.client().commit(finish(gid)).await?;
        Ok(state(response.into_inner().state))
    }

    pub async fn abort(&self, gid: &str) -> Result<pb::BranchState, Status> {
        let response = self.client().abort(finish(gid)).await?;
        Ok(state(response.into_inner().state))
    }

    pub async fn execute_and_commit(
        &self,
        gid: &str,
        sql: &str,
        expect_rows: Option<u64>,
    ) -> Result<pb::ExecuteAndCommitResponse, Status> {
        self.client()
            .execute_and_commit(pb::ExecuteAndCommitRequest {
                execute: Some(pb::BranchExecuteRequest {
                    gid: gid.into(),
                    sql: sql.into(),
                    params: Vec::new(),
                    options: None,
                    ..Default::default()
                }),
                expect_rows,
            })
            .await
            .map(Response::into_inner)
    }

    pub async fn commit_one_phase(&self, gid: &str) -> Result<pb::BranchState, Status> {
        let response = self.client().commit_one_phase(finish(gid)).await?;
        Ok(state(response.into_inner().state))
    }

    pub async fn status(&self, gid: &str) -> pb::StatusResponse {
        self.client()
            .status(pb::StatusRequest { gid: gid.into() })
            .await
            .unwrap()
            .into_inner()
    }
}

pub fn config(db: &TestDb, coordinator: SocketAddr, data_dir: &std::path::Path) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        shard: treaty_proto::ShardName::new("s0").unwrap(),
        database_url: db.url.clone().into(),
        coordinator_urls: vec![format!("http://{coordinator}")],
        data_dir: data_dir.to_path_buf(),
        branch_idle_timeout_ms: 30_000,
        in_doubt_after_ms: 5_000,
        three_phase_timeout_ms: 2_000,
        reconcile_interval_ms: 1_000,
        marker_retention_ms: 60_000,
        max_connections: 8,
        session: treaty_participant::SessionDefaults {
            lock_timeout_ms: Some(10_000),
            statement_timeout_ms: Some(60_000),
        },
        log_format: treaty_participant::config::LogFormat::Human,
        metrics_addr: None,
        otlp_endpoint: None,
        otlp_export_interval_ms: None,
        tls: Default::default(),
        auth: Default::default(),
        failpoints: None,
        ask_coordinators_at_start: true,
    }
}

fn finish(gid: &str) -> pb::FinishRequest {
    pb::FinishRequest { gid: gid.into() }
}

pub fn state(value: i32) -> pb::BranchState {
    pb::BranchState::try_from(value).unwrap()
}

pub fn vote(response: &pb::PrepareResponse) -> pb::Vote {
    pb::Vote::try_from(response.vote).unwrap()
}

pub fn value(kind: pb::value::Kind) -> pb::Value {
    pb::Value { kind: Some(kind) }
}

pub fn int(v: i64) -> pb::Value {
    value(pb::value::Kind::Int64(v))
}

pub fn text(v: &str) -> pb::Value {
    value(pb::value::Kind::Text(v.into()))
}

pub fn boolean(v: bool) -> pb::Value {
    value(pb::value::Kind::Bool(v))
}

pub fn null() -> pb::Value {
    value(pb::value::Kind::Null(true))
}

/// Polls `condition` every 50 ms until it holds or `within` passes.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
