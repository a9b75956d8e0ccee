//! Two shards that are two databases of ONE PostgreSQL server ("one database per service"). GIDs
//! are unique per server, so each participant prepares its branch under the branch GID
//! `<gid>:<shard>`: commits, aborts after a prepare, and recovery after a coordinator crash must
//! all work with both branches of a transaction prepared on the same server.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::Row;
use tempfile::TempDir;
use tonic::transport::Channel;
use treaty_harness::{PgCluster, PgOptions, ServiceProcess, ServiceSpec, binary_path, free_loopback_port};
use treaty_proto::pb;
use treaty_proto::pb::coordinator_client::CoordinatorClient;

use crate::fixture::{begin, commit_applied, committed, eventually, execute, insert, int, submit, text};

const SHARDS: [&str; 2] = ["s0", "s1"];
const WITHIN: Duration = Duration::from_secs(30);

/// One PostgreSQL server holding the databases `treaty_s0` and `treaty_s1`, a participant for
/// each, and a coordinator.
struct SharedServer {
    // Processes first, so that they are dropped before their server.
    coordinator: ServiceProcess,
    participants: Vec<ServiceProcess>,
    pg: PgCluster,
    _dir: TempDir,
}

fn database(shard: &str) -> String {
    format!("treaty_{shard}")
}

impl SharedServer {
    async fn start(coordinator_extra: &[&str]) -> Result<SharedServer> {
        let dir = tempfile::Builder::new().prefix("treaty-e2e-shared-").tempdir()?;
        let options = PgOptions {
            fsync: false,
            ..PgOptions::default()
        };
        let pg = PgCluster::start(dir.path(), "pg", &options).await?;
        for shard in SHARDS {
            pg.create_database(&database(shard)).await?;
        }
        let loopback = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let coordinator_addr = loopback(free_loopback_port()?);
        let participant_addrs = SHARDS
            .iter()
            .map(|_| free_loopback_port().map(loopback))
            .collect::<Result<Vec<_>, _>>()?;
        let logs = dir.path().join("logs");

        let mut args: Vec<String> = vec![
            "--data-dir".into(),
            dir.path().join("coordinator").display().to_string(),
            "--vote-timeout-ms".into(),
            "5000".into(),
            "--lock-timeout-ms".into(),
            "2000".into(),
            // Written for the decision log: the file store, explicitly.
            "--decision-store".into(),
            "file".into(),
        ];
        for (shard, addr) in SHARDS.iter().zip(&participant_addrs) {
            args.extend(["--shard".into(), format!("{shard}=http://{addr}")]);
        }
        args.extend(coordinator_extra.iter().map(|arg| arg.to_string()));
        let coordinator = ServiceProcess::spawn(ServiceSpec {
            name: "coordinator".into(),
            binary: binary_path("treaty-coordinator")?,
            args,
            env: Vec::new(),
            listen: coordinator_addr,
            log_path: logs.join("coordinator.log"),
        })
        .await?;

        let mut participants = Vec::new();
        for (shard, addr) in SHARDS.iter().zip(&participant_addrs) {
            let args = [
                "--shard".into(),
                shard.to_string(),
                "--database-url".into(),
                pg.url(&database(shard)),
                "--coordinator".into(),
                format!("http://{coordinator_addr}"),
                "--data-dir".into(),
                dir.path()
                    .join(format!("participant-{shard}"))
                    .display()
                    .to_string(),
                "--in-doubt-after-ms".into(),
                "500".into(),
                "--reconcile-interval-ms".into(),
                "200".into(),
            ];
            participants.push(
                ServiceProcess::spawn(ServiceSpec {
                    name: format!("participant-{shard}"),
                    binary: binary_path("treaty-participant")?,
                    args: args.to_vec(),
                    env: Vec::new(),
                    listen: *addr,
                    log_path: logs.join(format!("participant-{shard}.log")),
                })
                .await?,
            );
        }
        let server = SharedServer {
            coordinator,
            participants,
            pg,
            _dir: dir,
        };
        for shard in 0..SHARDS.len() {
            server
                .sql(shard, "CREATE TABLE kv (k bigint PRIMARY KEY, v text NOT NULL)")
                .await?;
        }
        Ok(server)
    }

    async fn client(&self) -> Result<CoordinatorClient<Channel>> {
        Ok(CoordinatorClient::connect(self.coordinator.endpoint()).await?)
    }

    async fn connect(&self, shard: usize) -> Result<sqlx::PgConnection> {
        Ok(self.pg.connect(&database(SHARDS[shard])).await?)
    }

    async fn sql(&self, shard: usize, sql: &str) -> Result<()> {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&mut self.connect(shard).await?)
            .await
            .with_context(|| format!("shard {shard}: {sql}"))?;
        Ok(())
    }

    async fn keys(&self, shard: usize) -> Result<Vec<i64>> {
        let rows = sqlx::query("SELECT k FROM kv ORDER BY k")
            .fetch_all(&mut self.connect(shard).await?)
            .await?;
        rows.iter().map(|row| Ok(row.try_get(0)?)).collect()
    }

    /// (database, gid) of every transaction prepared anywhere on the server.
    async fn prepared_on_server(&self) -> Result<Vec<(String, String)>> {
        Ok(
            sqlx::query_as("SELECT database::text, gid FROM pg_prepared_xacts ORDER BY database, gid")
                .fetch_all(&mut self.connect(0).await?)
                .await?,
        )
    }

    async fn both_have(&self, k: i64) -> Result<bool> {
        for shard in 0..SHARDS.len() {
            if !self.keys(shard).await?.contains(&k) {
                return Ok(false);
            }
        }
        Ok(self.prepared_on_server().await?.is_empty())
    }
}

/// Inserts `k` on both shards inside the open transaction `txid`.
async fn insert_on_both(client: &mut CoordinatorClient<Channel>, txid: u64, k: i64) -> Result<()> {
    for shard in SHARDS {
        execute(
            client,
            txid,
            shard,
            "INSERT INTO kv VALUES ($1, $2)",
            vec![int(k), text("v")],
        )
        .await?;
    }
    Ok(())
}

fn on_both(k: i64) -> pb::SubmitRequest {
    submit(SHARDS.iter().map(|shard| insert(shard, k, "v")).collect())
}

#[tokio::test]
async fn two_databases_of_one_server_commit_and_abort_together() -> Result<()> {
    let t = SharedServer::start(&[]).await?;
    let mut client = t.client().await?;

    // One-shot across both databases.
    let response = client.submit(on_both(1)).await?.into_inner();
    assert!(committed(&response.outcome), "{response:?}");
    assert_eq!(t.keys(0).await?, [1]);
    assert_eq!(t.keys(1).await?, [1]);
    assert!(t.prepared_on_server().await?.is_empty());

    // Interactive, then rolled back: nothing anywhere.
    let txid = begin(&mut client).await?;
    insert_on_both(&mut client, txid, 2).await?;
    client.rollback(pb::RollbackRequest { txid }).await?;
    // Rolled back after a prepare: s1's deferred check fails at PREPARE (vote NO), so s0's
    // prepared branch is rolled back under its branch GID.
    t.sql(
        1,
        "CREATE TABLE once (k bigint, CONSTRAINT once_k UNIQUE (k) DEFERRABLE INITIALLY DEFERRED); \
         INSERT INTO once VALUES (3)",
    )
    .await?;
    let txid = begin(&mut client).await?;
    execute(
        &mut client,
        txid,
        SHARDS[0],
        "INSERT INTO kv VALUES (3, 'v')",
        vec![],
    )
    .await?;
    execute(
        &mut client,
        txid,
        SHARDS[1],
        "INSERT INTO once VALUES (3)",
        vec![],
    )
    .await?;
    let outcome = commit_applied(&mut client, txid).await?;
    assert_eq!(outcome.kind, pb::OutcomeKind::Aborted as i32, "{outcome:?}");
    eventually("nothing prepared on the server", WITHIN, || async {
        Ok(t.prepared_on_server().await?.is_empty())
    })
    .await?;
    assert_eq!(t.keys(0).await?, [1]);
    assert_eq!(t.keys(1).await?, [1]);

    // Three-phase commit across both databases.
    let txid = client
        .begin(pb::BeginRequest {
            options: Some(pb::TransactionOptions {
                protocol: pb::Protocol::ThreePhase as i32,
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .txid;
    insert_on_both(&mut client, txid, 4).await?;
    let outcome = commit_applied(&mut client, txid).await?;
    assert_eq!(outcome.kind, pb::OutcomeKind::Committed as i32, "{outcome:?}");
    assert_eq!(t.keys(0).await?, [1, 4]);
    assert_eq!(t.keys(1).await?, [1, 4]);
    assert!(t.prepared_on_server().await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_coordinator_crash_after_the_decision_finishes_both_databases_of_one_server() -> Result<()> {
    let mut t = SharedServer::start(&["--crash-at", "after-commit-decision"]).await?;
    let result = t.client().await?.submit(on_both(1)).await;
    assert!(
        result.is_err(),
        "the coordinator should have died before answering: {result:?}"
    );
    let exit = t.coordinator.wait_exit(Duration::from_secs(10)).await?;
    assert!(exit.is_some(), "the coordinator process should have ended");

    // Both branches are prepared on the one server, each in its database under its own name.
    let prepared = t.prepared_on_server().await?;
    assert_eq!(prepared.len(), 2, "{prepared:?}");
    for ((database_name, gid), shard) in prepared.iter().zip(SHARDS) {
        assert_eq!(database_name, &database(shard));
        assert!(gid.ends_with(&format!(":{shard}")), "{gid}");
    }
    assert!(t.keys(0).await?.is_empty() && t.keys(1).await?.is_empty());

    // s1's participant dies too and finds its branch prepared when it comes back.
    t.participants[1].kill9()?;
    t.participants[1].restart().await?;
    t.coordinator.restart().await?;
    eventually("committed in both databases, nothing prepared", WITHIN, || {
        t.both_have(1)
    })
    .await?;
    Ok(())
}
