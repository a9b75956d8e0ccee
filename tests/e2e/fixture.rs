//! A three-shard cluster per test, with helpers to read the shards directly and to wait for
//! conditions (polling with a deadline, never a bare sleep), and the certificates, access files
//! and TLS channels of the tests whose services authenticate their callers.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sqlx::Row;
use tempfile::TempDir;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use treaty_harness::{ClusterSpec, LocalCluster, PgOptions};
use treaty_proto::pb;
use treaty_proto::pb::coordinator_client::CoordinatorClient;
use treaty_proto::tls::dev_certs::{ClientCertFiles, DevCertFiles, write_dev_certs_with_clients};

pub const DATABASE: &str = "treaty";

pub struct TestCluster {
    pub cluster: LocalCluster,
    pub dir: TempDir,
}

#[derive(Default)]
pub struct Options {
    pub coordinator_args: Vec<String>,
    pub participant_args: Vec<String>,
    /// Every shard driven inside the coordinator (`--shard NAME=postgres://...`), no agents.
    pub in_process: bool,
    /// TLS on every link, with these certificates (`ClusterSpec::tls`).
    pub tls: Option<treaty_harness::DevCertFiles>,
    /// PostgreSQL accepts TLS connections only, with these certificates (`PgOptions::ssl_only`).
    pub pg_ssl_only: Option<treaty_harness::DevCertFiles>,
}

impl TestCluster {
    pub async fn start(options: Options) -> Result<TestCluster> {
        let dir = tempfile::Builder::new().prefix("treaty-e2e-").tempdir()?;
        let mut coordinator_args: Vec<String> = ["--vote-timeout-ms", "5000", "--lock-timeout-ms", "2000"]
            .map(String::from)
            .to_vec();
        coordinator_args.extend(options.coordinator_args);
        let mut participant_args: Vec<String> =
            ["--in-doubt-after-ms", "500", "--reconcile-interval-ms", "200"]
                .map(String::from)
                .to_vec();
        participant_args.extend(options.participant_args);
        let spec = ClusterSpec {
            shards: 3,
            base_dir: dir.path().to_path_buf(),
            pg: PgOptions {
                fsync: false,
                ssl_only: options.pg_ssl_only,
                ..PgOptions::default()
            },
            coordinator_args,
            participant_args,
            database: DATABASE.into(),
            coordinator_port: 0,
            in_process: options.in_process,
            tls: options.tls,
        };
        let cluster = LocalCluster::start(spec)
            .await
            .context("starting the test cluster")?;
        let test = TestCluster { cluster, dir };
        for shard in 0..3 {
            test.sql(shard, "CREATE TABLE kv (k bigint PRIMARY KEY, v text NOT NULL)")
                .await?;
        }
        Ok(test)
    }

    pub async fn client(&self) -> Result<CoordinatorClient<Channel>> {
        Ok(self.cluster.client().await?)
    }

    pub fn shard(&self, index: usize) -> String {
        self.cluster.shard_names[index].clone()
    }

    /// Runs SQL directly on a shard's database (not through Treaty).
    pub async fn sql(&self, shard: usize, sql: &str) -> Result<()> {
        let mut conn = self.cluster.pgs[shard].connect(DATABASE).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(&mut conn)
            .await
            .with_context(|| format!("shard {shard}: {sql}"))?;
        Ok(())
    }

    /// A `SELECT count(*) ...` on a shard, read directly.
    pub async fn count(&self, shard: usize, sql: &str) -> Result<i64> {
        let mut conn = self.cluster.pgs[shard].connect(DATABASE).await?;
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(&mut conn)
            .await
            .with_context(|| format!("shard {shard}: {sql}"))
    }

    /// The kv rows of a shard, read directly.
    pub async fn kv(&self, shard: usize) -> Result<Vec<(i64, String)>> {
        let mut conn = self.cluster.pgs[shard].connect(DATABASE).await?;
        let rows = sqlx::query("SELECT k, v FROM kv ORDER BY k")
            .fetch_all(&mut conn)
            .await?;
        rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect()
    }

    /// Treaty GIDs prepared in a shard's database, as PostgreSQL holds them (branch GIDs,
    /// `<gid>:<shard>`).
    pub async fn prepared(&self, shard: usize) -> Result<Vec<String>> {
        let mut conn = self.cluster.pgs[shard].connect(DATABASE).await?;
        Ok(sqlx::query_scalar(
            "SELECT gid FROM pg_prepared_xacts \
             WHERE database = current_database() AND gid LIKE 'treaty:%' ORDER BY gid",
        )
        .fetch_all(&mut conn)
        .await?)
    }

    pub async fn prepared_everywhere(&self) -> Result<usize> {
        let mut total = 0;
        for shard in 0..self.cluster.pgs.len() {
            total += self.prepared(shard).await?.len();
        }
        Ok(total)
    }

    pub fn coordinator_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("logs").join("coordinator.log")).unwrap_or_default()
    }
}

/// Certificates for a TLS cluster (`Options::tls`), written under `dir`: the CA, the services' own
/// `treaty-server`, the harness's client `e2e-client`, and one more client certificate for each of
/// `names`, in that order.
pub fn tls_certs<const N: usize>(
    dir: &Path,
    names: [&str; N],
) -> Result<(DevCertFiles, [ClientCertFiles; N])> {
    let (files, more) = write_dev_certs_with_clients(dir, "e2e-client", &names)?;
    let more =
        <[ClientCertFiles; N]>::try_from(more).map_err(|_| anyhow::anyhow!("{N} more certificates"))?;
    Ok((files, more))
}

/// The access files of a TLS cluster made with [`tls_certs`]. The services know each other by their
/// own certificate, `treaty-server`, so every file names it: the coordinator's as `participant`,
/// the participants' as `coordinator` and `peer`. The coordinator's also lets
/// `e2e-client` in as `client`: it is the certificate [`TestCluster::client`] presents.
pub struct AccessFiles {
    pub coordinator: PathBuf,
    pub participant: PathBuf,
}

impl AccessFiles {
    /// Writes both files into `dir`, each with its further `[[caller]]` tables (TOML).
    pub fn write(dir: &Path, coordinator_callers: &str, participant_callers: &str) -> Result<AccessFiles> {
        let files = AccessFiles {
            coordinator: dir.join("coordinator-access.toml"),
            participant: dir.join("participant-access.toml"),
        };
        std::fs::write(
            &files.coordinator,
            format!(
                r#"
[[caller]]
certificate = "treaty-server"
roles = ["participant"]

[[caller]]
certificate = "e2e-client"
roles = ["client"]
{coordinator_callers}"#
            ),
        )?;
        std::fs::write(
            &files.participant,
            format!(
                r#"
[[caller]]
certificate = "treaty-server"
roles = ["coordinator", "peer"]
{participant_callers}"#
            ),
        )?;
        Ok(files)
    }
}

/// A channel to `url` trusting the CA of `files`, presenting `identity` (certificate and key) or no
/// certificate at all.
pub async fn tls_channel(
    files: &DevCertFiles,
    url: &str,
    identity: Option<(&Path, &Path)>,
) -> Result<Channel> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(&files.ca)?));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(std::fs::read(cert)?, std::fs::read(key)?));
    }
    Ok(Endpoint::from_shared(url.to_owned())?
        .tls_config(tls)?
        .connect()
        .await?)
}

/// Polls `condition` every 50 ms until it holds or `within` passes.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut condition: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + within;
    loop {
        let last = condition().await;
        if matches!(last, Ok(true)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {within:?} waiting for {what} (last check: {last:?})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `treaty demo` on 2 shards, 4 clients for 4 s, one coordinator kill, with `args` added,
/// into a directory of its own; checks the verdict is "ok" with commits and a clean exit, and
/// answers the verdict and the directory (its `logs/` say what ran).
pub async fn run_demo(args: &[&str]) -> Result<(serde_json::Value, TempDir)> {
    let dir = tempfile::tempdir()?;
    let output = tokio::process::Command::new(treaty_harness::binary_path("treaty")?)
        .arg("demo")
        .args(args)
        .args(["--duration", "4", "--shards", "2", "--clients", "4"])
        .args(["--coordinator-kills", "1", "--json", "--dir"])
        .arg(dir.path())
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let verdict: serde_json::Value = serde_json::from_str(last).with_context(|| {
        format!(
            "demo output: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    assert_eq!(verdict["verdict"], "ok", "{verdict}");
    assert_eq!(verdict["coordinator_kills"], 1, "{verdict}");
    assert!(verdict["committed"].as_u64().unwrap_or(0) > 0, "{verdict}");
    assert!(output.status.success(), "{verdict}");
    Ok((verdict, dir))
}

pub fn int(value: i64) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::Int64(value)),
    }
}

pub fn text(value: &str) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::Text(value.into())),
    }
}

pub fn insert(shard: &str, k: i64, v: &str) -> pb::Op {
    pb::Op {
        shard: shard.into(),
        sql: "INSERT INTO kv (k, v) VALUES ($1, $2)".into(),
        params: vec![int(k), text(v)],
        expect_rows: Some(1),
    }
}

pub fn submit(ops: Vec<pb::Op>) -> pb::SubmitRequest {
    pb::SubmitRequest {
        ops,
        options: None,
        wait_for_apply: true,
    }
}

pub fn committed(outcome: &Option<pb::Outcome>) -> bool {
    outcome
        .as_ref()
        .is_some_and(|o| o.kind == pb::OutcomeKind::Committed as i32)
}

pub async fn begin(client: &mut CoordinatorClient<Channel>) -> Result<u64> {
    Ok(client
        .begin(pb::BeginRequest { options: None })
        .await?
        .into_inner()
        .txid)
}

/// Commits `txid` and waits until every branch has applied it; the outcome.
pub async fn commit_applied(client: &mut CoordinatorClient<Channel>, txid: u64) -> Result<pb::Outcome> {
    Ok(client
        .commit(pb::CommitRequest {
            txid,
            wait_for_apply: true,
        })
        .await?
        .into_inner())
}

pub async fn execute(
    client: &mut CoordinatorClient<Channel>,
    txid: u64,
    shard: &str,
    sql: &str,
    params: Vec<pb::Value>,
) -> Result<pb::ExecuteResult, tonic::Status> {
    client
        .execute(pb::ExecuteRequest {
            txid,
            shard: shard.into(),
            sql: sql.into(),
            params,
            last: false,
        })
        .await
        .map(|r| r.into_inner())
}

/// A three-shard insert of key `k`, one row per shard.
pub fn three_inserts(t: &TestCluster, k: i64) -> pb::SubmitRequest {
    submit((0..3).map(|i| insert(&t.shard(i), k, "v")).collect())
}

/// Submits a three-shard insert to a coordinator armed to crash, and waits until it is gone.
pub async fn submit_into_crash(t: &mut TestCluster, k: i64) -> Result<()> {
    let mut client = t.client().await?;
    let result = client.submit(three_inserts(t, k)).await;
    assert!(
        result.is_err(),
        "the coordinator should have died before answering: {result:?}"
    );
    let exit = t.cluster.coordinator.wait_exit(Duration::from_secs(10)).await?;
    assert!(exit.is_some(), "the coordinator process should have ended");
    Ok(())
}
