//! `--decision-store postgres://...`: the commit decisions are rows in a dedicated database (a
//! PostgreSQL server of its own here), and a restarted coordinator finishes from them.

use std::time::Duration;

use anyhow::Result;
use treaty_harness::{PgCluster, PgOptions};

use crate::fixture::*;

const RECOVERY: Duration = Duration::from_secs(30);
const DECISIONS_DATABASE: &str = "decisions";

/// The decision database's server, and the coordinator arguments that point at it.
async fn decision_database(t_dir: &std::path::Path, crash_at: &str) -> Result<(PgCluster, Options)> {
    let pg = PgCluster::start(
        t_dir,
        "decisions",
        &PgOptions {
            fsync: false,
            ..PgOptions::default()
        },
    )
    .await?;
    pg.create_database(DECISIONS_DATABASE).await?;
    let mut coordinator_args = vec!["--decision-store".to_string(), pg.url(DECISIONS_DATABASE)];
    if !crash_at.is_empty() {
        coordinator_args.extend(["--crash-at".to_string(), crash_at.to_string()]);
    }
    Ok((
        pg,
        Options {
            coordinator_args,
            ..Options::default()
        },
    ))
}

/// Runs a coordinator on `data_dir` with `--decision-store store`, expects it to refuse to start,
/// and returns what it printed on stderr.
async fn coordinator_that_fails_to_start(data_dir: &std::path::Path, store: &str) -> Result<String> {
    let output = tokio::process::Command::new(treaty_harness::binary_path("treaty-coordinator")?)
        .args(["--listen", "127.0.0.1:0", "--shard", "s0=http://127.0.0.1:1"])
        .args(["--decision-store", store])
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .await?;
    assert!(!output.status.success(), "--decision-store {store} started");
    Ok(String::from_utf8_lossy(&output.stderr).into_owned())
}

async fn commit_rows(pg: &PgCluster) -> Result<i64> {
    let mut conn = pg.connect(DECISIONS_DATABASE).await?;
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM treaty.decisions WHERE outcome = 'commit'")
            .fetch_one(&mut conn)
            .await?,
    )
}

async fn on_every_shard(t: &TestCluster, k: i64) -> Result<usize> {
    let mut shards = 0;
    for shard in 0..3 {
        if t.kv(shard).await?.iter().any(|(key, _)| *key == k) {
            shards += 1;
        }
    }
    Ok(shards)
}

#[tokio::test]
async fn commits_are_rows_in_the_decision_database_and_are_deleted_once_finished() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("treaty-e2e-decisions-")
        .tempdir()?;
    let (pg, options) = decision_database(dir.path(), "").await?;
    let t = TestCluster::start(options).await?;
    let mut client = t.client().await?;
    for k in 1..=5 {
        let ops = (0..3).map(|i| insert(&t.shard(i), k, "v")).collect();
        let response = client.submit(submit(ops)).await?.into_inner();
        assert!(committed(&response.outcome), "transaction {k}: {response:?}");
    }
    for k in 1..=5 {
        assert_eq!(on_every_shard(&t, k).await?, 3, "key {k}");
    }
    // Every transaction finished on every shard, so its row goes (in a batch, after the answer).
    eventually("the commit rows deleted", RECOVERY, || async {
        Ok(commit_rows(&pg).await? == 0)
    })
    .await?;
    assert_eq!(t.prepared_everywhere().await?, 0);
    // The data directory records the database, so that a start without it is refused.
    let marker = std::fs::read_to_string(t.dir.path().join("coordinator").join("decision-database"))?;
    assert_eq!(marker.trim(), pg.url(DECISIONS_DATABASE));
    Ok(())
}

/// A coordinator whose decisions were rows must not start on its log alone: it would presume abort
/// for transactions committed in the database.
#[tokio::test]
async fn a_coordinator_that_used_a_decision_database_refuses_to_start_without_it() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("treaty-e2e-decisions-")
        .tempdir()?;
    let data_dir = dir.path().join("coordinator");
    std::fs::create_dir_all(&data_dir)?;
    std::fs::write(
        data_dir.join("decision-database"),
        "postgres://treaty:***@10.0.0.5:5432/decisions\n",
    )?;
    for store in ["file", "shard"] {
        let stderr = coordinator_that_fails_to_start(&data_dir, store).await?;
        assert!(
            stderr.contains(
                "kept its decisions in the decision database postgres://treaty:***@10.0.0.5:5432/decisions"
            ),
            "{stderr}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_coordinator_killed_after_the_decision_commits_everywhere_from_its_row_after_restart() -> Result<()>
{
    let dir = tempfile::Builder::new()
        .prefix("treaty-e2e-decisions-")
        .tempdir()?;
    let (pg, options) = decision_database(dir.path(), "after-commit-decision").await?;
    let mut t = TestCluster::start(options).await?;
    submit_into_crash(&mut t, 1).await?;
    // Every branch prepared, none committed, and the decision is the row.
    for shard in 0..3 {
        assert_eq!(t.prepared(shard).await?.len(), 1, "shard {shard}");
    }
    assert_eq!(commit_rows(&pg).await?, 1);
    t.cluster.coordinator.restart().await?;
    eventually("committed on every shard", RECOVERY, || async {
        Ok(on_every_shard(&t, 1).await? == 3 && t.prepared_everywhere().await? == 0)
    })
    .await?;
    eventually("the commit row deleted", RECOVERY, || async {
        Ok(commit_rows(&pg).await? == 0)
    })
    .await?;
    Ok(())
}

/// The row is the decision, not a copy of one in the coordinator's log: without it, the restarted
/// coordinator presumes abort.
#[tokio::test]
async fn without_its_row_the_restarted_coordinator_aborts_the_transaction() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("treaty-e2e-decisions-")
        .tempdir()?;
    let (pg, options) = decision_database(dir.path(), "after-commit-decision").await?;
    let mut t = TestCluster::start(options).await?;
    submit_into_crash(&mut t, 1).await?;
    assert_eq!(commit_rows(&pg).await?, 1);
    let mut conn = pg.connect(DECISIONS_DATABASE).await?;
    sqlx::query("DELETE FROM treaty.decisions")
        .execute(&mut conn)
        .await?;
    t.cluster.coordinator.restart().await?;
    eventually("rolled back on every shard", RECOVERY, || async {
        Ok(t.prepared_everywhere().await? == 0)
    })
    .await?;
    assert_eq!(on_every_shard(&t, 1).await?, 0);
    Ok(())
}

#[tokio::test]
async fn an_unreachable_decision_database_stops_the_coordinator_with_a_clear_error() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("treaty-e2e-decisions-")
        .tempdir()?;
    // A port nothing listens on.
    let port = treaty_harness::free_loopback_port()?;
    // A password no path or backtrace line can hold by chance (a checkout may be named
    // `.../wt-secrets/...`).
    let password = "Unreach4ble-pw";
    let url = format!("postgres://postgres:{password}@127.0.0.1:{port}/decisions");
    let stderr = coordinator_that_fails_to_start(&dir.path().join("coordinator"), &url).await?;
    assert!(stderr.contains("decision database"), "{stderr}");
    assert!(
        stderr.contains(&format!("postgres://postgres:***@127.0.0.1:{port}")),
        "{stderr}"
    );
    assert!(
        !stderr.contains(password),
        "the password must not be printed: {stderr}"
    );
    Ok(())
}
