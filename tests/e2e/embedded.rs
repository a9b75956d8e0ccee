//! The coordinator embedded in an application (`treaty_coordinator::Embedded`, in the
//! `embedded-app` binary): SIGKILLed mid-load, the application's next start finishes what it had
//! prepared; every transfer it had been told was committed is applied on both shards and none is
//! half-applied; a second application on the same databases is refused naming the first.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, ChildStdout, Command};
use treaty_harness::{PgCluster, PgOptions};

use crate::fixture::eventually;

const DATABASE: &str = "app";
/// Transfers acknowledged before the kill: enough that some are mid-commit when it lands.
const ACKNOWLEDGED_BEFORE_KILL: usize = 300;
/// Kills at most, waiting for one that leaves a branch prepared (each so far left 2 to 4).
const KILLS: usize = 5;
const WAIT: Duration = Duration::from_secs(60);

struct App {
    child: Child,
    lines: tokio::io::Lines<BufReader<ChildStdout>>,
}

impl App {
    fn spawn(data_dir: &std::path::Path, pgs: &[PgCluster], transfers: u64) -> Result<App> {
        let mut command = Command::new(env!("CARGO_BIN_EXE_embedded-app"));
        command
            .args([
                "--listen",
                "127.0.0.1:0",
                "--decision-store",
                "shard",
                "--data-dir",
            ])
            .arg(data_dir)
            .env("TRANSFERS", transfers.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (index, pg) in pgs.iter().enumerate() {
            command.args(["--shard", &format!("s{index}={}", pg.url(DATABASE))]);
        }
        let mut child = command.spawn()?;
        let stdout = child.stdout.take().context("stdout")?;
        Ok(App {
            child,
            lines: BufReader::new(stdout).lines(),
        })
    }

    /// The next line, within `WAIT`; `None` once the application has closed its stdout.
    async fn line(&mut self) -> Result<Option<String>> {
        Ok(tokio::time::timeout(WAIT, self.lines.next_line())
            .await
            .context("the application printed nothing")??)
    }

    async fn ready(&mut self) -> Result<()> {
        match self.line().await? {
            Some(line) if line.starts_with("ready ") => Ok(()),
            other => bail!("expected `ready`, got {other:?}; stderr: {}", self.stderr().await),
        }
    }

    async fn stderr(&mut self) -> String {
        let _ = self.child.start_kill();
        let mut text = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            use tokio::io::AsyncReadExt as _;
            let _ = stderr.read_to_string(&mut text).await;
        }
        text
    }
}

async fn balances_and_transfers(pg: &PgCluster) -> Result<(i64, BTreeSet<i64>)> {
    let mut conn = pg.connect(DATABASE).await?;
    let total: i64 = sqlx::query_scalar("SELECT sum(balance)::bigint FROM accounts")
        .fetch_one(&mut conn)
        .await?;
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM transfers")
        .fetch_all(&mut conn)
        .await?;
    Ok((total, ids.into_iter().collect()))
}

async fn prepared(pgs: &[PgCluster]) -> Result<i64> {
    let mut total = 0;
    for pg in pgs {
        total += pg.prepared_count(DATABASE).await?;
    }
    Ok(total)
}

#[tokio::test]
async fn an_application_killed_mid_load_finishes_its_transfers_when_it_starts_again() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("treaty-e2e-embedded-")
        .tempdir()?;
    let mut pgs = Vec::new();
    for name in ["s0", "s1"] {
        let pg = PgCluster::start(dir.path(), name, &PgOptions::default()).await?;
        pg.create_database(DATABASE).await?;
        let mut conn = pg.connect(DATABASE).await?;
        sqlx::raw_sql(
            "CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL);
             INSERT INTO accounts SELECT g, 1000 FROM generate_series(0, 99) g;
             CREATE TABLE transfers (id bigint PRIMARY KEY);",
        )
        .execute(&mut conn)
        .await?;
        pgs.push(pg);
    }
    let data_dir = dir.path().join("app");

    // Load, and a SIGKILL once enough transfers were acknowledged; again (a bounded number of
    // times) until a kill lands while branches are prepared, so that the restart has them to
    // finish. Each start finishes what the kill before it left.
    let mut acknowledged = BTreeSet::new();
    let mut left_prepared = 0;
    for _ in 0..KILLS {
        let mut app = App::spawn(&data_dir, &pgs, 1_000_000)?;
        app.ready().await?;
        let target = acknowledged.len() + ACKNOWLEDGED_BEFORE_KILL;
        while acknowledged.len() < target {
            match app.line().await? {
                // A failed call is neither acknowledged nor known aborted: not checked.
                Some(line) if line.starts_with("failed ") => eprintln!("{line}"),
                Some(line) => {
                    let id = line.strip_prefix("committed ").context("unexpected line")?;
                    acknowledged.insert(id.parse::<i64>()?);
                }
                None => bail!("the application ended early: {}", app.stderr().await),
            }
        }
        app.child.kill().await?;
        left_prepared = prepared(&pgs).await?;
        eprintln!(
            "killed after {} acknowledged transfers; {left_prepared} branches left prepared",
            acknowledged.len()
        );
        if left_prepared > 0 {
            break;
        }
    }
    assert!(
        left_prepared > 0,
        "no kill of {KILLS} landed while a branch was prepared: nothing tested recovery"
    );

    // Started again on the same data directory: it finishes what it had left prepared.
    let mut app = App::spawn(&data_dir, &pgs, 0)?;
    app.ready().await?;
    eventually("no prepared transaction left", WAIT, || async {
        Ok(prepared(&pgs).await? == 0)
    })
    .await?;

    // Atomic: a transfer is on both shards or on neither, and the money is all there.
    let (debited, on_s0) = balances_and_transfers(&pgs[0]).await?;
    let (credited, on_s1) = balances_and_transfers(&pgs[1]).await?;
    assert_eq!(on_s0, on_s1, "a transfer applied on one shard only");
    assert_eq!(debited + credited, 2 * 100 * 1000, "money created or lost");
    assert_eq!(
        1000 * 100 - debited,
        on_s0.len() as i64,
        "debits and recorded transfers differ"
    );
    // Durable: every transfer the application was told was committed is applied.
    let lost: Vec<_> = acknowledged.difference(&on_s0).collect();
    assert!(lost.is_empty(), "acknowledged but not applied: {lost:?}");

    // One coordinator drives a database: a second application on the same databases is refused,
    // naming the participant that holds them.
    let mut second = App::spawn(&dir.path().join("second"), &pgs, 0)?;
    let status = tokio::time::timeout(WAIT, second.child.wait()).await??;
    assert!(
        !status.success(),
        "a second application started on the same databases"
    );
    let stderr = second.stderr().await;
    assert!(
        stderr.contains("already served by another participant"),
        "{stderr}"
    );

    // Closing its stdin stops the application as SIGTERM stops the service.
    drop(app.child.stdin.take());
    assert_eq!(app.line().await?.as_deref(), Some("stopped"));
    assert!(tokio::time::timeout(WAIT, app.child.wait()).await??.success());
    Ok(())
}
