//! Participants and the runs and instances of their coordinators: an open branch of a coordinator
//! run that ended is rolled back as soon as the participant sees the new run (not at its idle
//! timeout), a participant configured with several coordinator instances has a transaction of
//! one that died for good finished by another, through its own recovery alone, and a client given
//! both instances (`treaty-client`) carries on with the second when the first is killed.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use treaty_harness::{ServiceProcess, ServiceSpec};

use crate::fixture::*;

const RECOVERY: Duration = Duration::from_secs(30);

/// A direct UPDATE of `k` on `shard` that gives up after 200 ms waiting for a row lock.
async fn update_without_waiting(t: &TestCluster, shard: usize, k: i64) -> Result<bool> {
    let mut conn = t.cluster.pgs[shard].connect(DATABASE).await?;
    let sql = format!("SET lock_timeout = '200ms'; UPDATE kv SET v = 'direct' WHERE k = {k}");
    Ok(sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut conn)
        .await
        .is_ok())
}

#[tokio::test]
async fn an_open_branch_of_a_killed_coordinator_run_is_rolled_back_when_the_new_run_is_seen() -> Result<()> {
    // An idle timeout far beyond the test: only the new mechanism can release the lock.
    let mut t = TestCluster::start(Options {
        participant_args: vec!["--branch-idle-timeout-ms".into(), "600000".into()],
        ..Options::default()
    })
    .await?;
    t.sql(0, "INSERT INTO kv VALUES (1, 'v')").await?;
    let mut client = t.client().await?;
    let txid = begin(&mut client).await?;
    execute(
        &mut client,
        txid,
        &t.shard(0),
        "UPDATE kv SET v = 'held' WHERE k = 1",
        vec![],
    )
    .await?;
    assert!(
        !update_without_waiting(&t, 0, 1).await?,
        "the open branch holds the row lock"
    );

    t.cluster.coordinator.kill9()?;
    let killed = Instant::now();
    t.cluster.coordinator.restart().await?;
    eventually("the row lock released", Duration::from_secs(15), || {
        update_without_waiting(&t, 0, 1)
    })
    .await?;
    eprintln!("row lock released {:?} after the kill", killed.elapsed());
    assert_eq!(t.kv(0).await?, vec![(1, "direct".to_owned())]);
    let log = std::fs::read_to_string(t.cluster.participants[0].log_path())?;
    assert!(
        log.contains("rolled back open branches of an ended coordinator run"),
        "the participant says why"
    );
    Ok(())
}

/// Starts a coordinator instance with id `id` on `port`, serving the cluster's shards.
async fn coordinator_on(t: &TestCluster, id: &str, port: u16, args: &[&str]) -> Result<ServiceProcess> {
    let mut all = vec![
        "--data-dir".to_string(),
        t.dir
            .path()
            .join(format!("coordinator-{id}"))
            .display()
            .to_string(),
        "--id".into(),
        id.into(),
    ];
    for (name, participant) in t.cluster.shard_names.iter().zip(&t.cluster.participants) {
        all.push("--shard".into());
        all.push(format!("{name}={}", participant.endpoint()));
    }
    all.extend(args.iter().map(|arg| arg.to_string()));
    Ok(ServiceProcess::spawn(ServiceSpec {
        name: format!("coordinator-{id}"),
        binary: treaty_harness::binary_path("treaty-coordinator")?,
        args: all,
        env: Vec::new(),
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        log_path: t.dir.path().join("logs").join(format!("coordinator-{id}.log")),
    })
    .await?)
}

async fn rows_with(t: &TestCluster, k: i64) -> Result<usize> {
    let mut count = 0;
    for shard in 0..3 {
        count += t.kv(shard).await?.iter().filter(|(key, _)| *key == k).count();
    }
    Ok(count)
}

/// The first coordinator crashes at `crash_at` during a three-shard submit of key `k` and stays
/// dead; a second instance, which the participants know as their second `--coordinator`, comes up
/// with a takeover sweep too slow to matter. Answers the rows of `k` once nothing is prepared.
async fn finished_by_the_second_instance(crash_at: &str, k: i64) -> Result<usize> {
    let second_port = treaty_harness::free_loopback_port()?;
    let mut t = TestCluster::start(Options {
        coordinator_args: ["--decision-store", "shard", "--crash-at", crash_at]
            .map(String::from)
            .to_vec(),
        participant_args: vec!["--coordinator".into(), format!("http://127.0.0.1:{second_port}")],
        ..Options::default()
    })
    .await?;
    let mut client = t.client().await?;
    let request = submit((0..3).map(|i| insert(&t.shard(i), k, "v")).collect());
    let result = client.submit(request).await;
    assert!(result.is_err(), "the coordinator should have died: {result:?}");
    let exit = t.cluster.coordinator.wait_exit(Duration::from_secs(10)).await?;
    assert!(exit.is_some(), "the first coordinator should have ended");
    assert_eq!(
        t.prepared(1).await?.len() + t.prepared(2).await?.len(),
        2,
        "s1 and s2 voted and wait for a decision"
    );

    let _second = coordinator_on(
        &t,
        "second",
        second_port,
        &["--decision-store", "shard", "--takeover-after-ms", "600000"],
    )
    .await?;
    let started = Instant::now();
    eventually("nothing prepared anywhere", RECOVERY, || async {
        Ok(t.prepared_everywhere().await? == 0)
    })
    .await?;
    eprintln!(
        "participants finished the dead coordinator's transaction through the second instance in {:?}",
        started.elapsed()
    );
    let log = std::fs::read_to_string(t.dir.path().join("logs").join("coordinator-second.log"))?;
    assert!(
        !log.contains("finishing a commit row nobody here drives")
            && !log.contains("rolling back prepared branches whose decision row says abort"),
        "the takeover sweep must not be what finished it"
    );
    let mut resolved = 0;
    for shard in 1..3 {
        let log = std::fs::read_to_string(t.cluster.participants[shard].log_path())?;
        resolved += log.matches("resolved a prepared branch").count();
    }
    assert_eq!(resolved, 2, "each voter's own recovery applied the decision");
    rows_with(&t, k).await.context("reading the rows")
}

#[tokio::test]
async fn a_second_instance_answers_participants_whose_coordinator_died_after_its_decision() -> Result<()> {
    assert_eq!(
        finished_by_the_second_instance("after-commit-decision", 11).await?,
        3,
        "committed on every shard"
    );
    Ok(())
}

#[tokio::test]
async fn a_second_instance_answers_participants_whose_coordinator_died_before_its_decision() -> Result<()> {
    assert_eq!(
        finished_by_the_second_instance("before-commit-decision", 12).await?,
        0,
        "rolled back on every shard"
    );
    Ok(())
}

#[tokio::test]
async fn the_client_library_carries_on_with_the_second_instance_when_the_first_is_killed() -> Result<()> {
    let mut t = TestCluster::start(Options::default()).await?;
    let second = t.cluster.spawn_coordinator("second", &[]).await?;
    let client =
        treaty_client::Client::connect([t.cluster.coordinator_endpoint(), second.endpoint()]).await?;
    assert_ne!(
        client.info().await?.coordinator_id,
        "second",
        "the first endpoint answers first"
    );
    let shards: Vec<String> = (0..3).map(|i| t.shard(i)).collect();
    let ops = |k: i64, v: &str| submit(shards.iter().map(|shard| insert(shard, k, v)).collect());
    assert!(committed(&client.submit(ops(31, "first")).await?.outcome));

    t.cluster.coordinator.kill9()?;
    let exit = t.cluster.coordinator.wait_exit(Duration::from_secs(10)).await?;
    assert!(exit.is_some(), "the first coordinator should have ended");
    // A lookup is safe to repeat, so it moves on whatever broke; the answering instance is current.
    assert_eq!(client.info().await?.coordinator_id, "second");
    assert_eq!(client.current_endpoint(), second.endpoint());
    assert!(committed(&client.submit(ops(32, "second")).await?.outcome));

    let txn = client.begin(None).await?;
    assert_eq!(txn.endpoint(), second.endpoint());
    for shard in &shards[..2] {
        txn.execute(
            shard,
            "INSERT INTO kv (k, v) VALUES ($1, $2)",
            vec![int(33), text("interactive")],
        )
        .await?;
    }
    assert!(treaty_client::committed(Some(&txn.commit(true).await?)));
    assert_eq!(rows_with(&t, 31).await?, 3);
    assert_eq!(rows_with(&t, 32).await?, 3);
    assert_eq!(rows_with(&t, 33).await?, 2);
    Ok(())
}

/// A coordinator given `--id` over an empty data directory first looks for work an earlier run of
/// that id left on the shards: with its data directory lost, a new log would hand that run's
/// txids (and GIDs) out again, and a participant asking about the old run's prepared branch would
/// be answered from the new run's transaction of that number. Here a commit row of instance
/// `lost` is left on shard 0, and a coordinator started as `lost` on a fresh directory refuses.
#[tokio::test]
async fn a_coordinator_refuses_a_new_log_under_an_id_whose_earlier_run_left_work() -> Result<()> {
    let t = TestCluster::start(Options {
        // The cluster's own instance leaves `lost`'s row alone for the test's length.
        coordinator_args: vec![
            "--decision-store".into(),
            "shard".into(),
            "--takeover-after-ms".into(),
            "600000".into(),
        ],
        ..Options::default()
    })
    .await?;
    let shard = t.shard(0);
    let gid = format!("treaty:lost:7@{shard}");
    t.sql(
        0,
        &format!(
            "INSERT INTO treaty.decisions (gid, outcome, coordinator_id, participants) \
             VALUES ('{gid}', 'commit', 'lost', '{{{}}}')",
            t.shard(1)
        ),
    )
    .await?;
    let data_dir = t.dir.path().join("coordinator-lost-again");
    // Twice: a refused start writes no header under the id, so the second is refused too (with a
    // header written, it would take the directory for that run's own and start).
    for attempt in 1..=2 {
        let mut command = tokio::process::Command::new(treaty_harness::binary_path("treaty-coordinator")?);
        command
            .args([
                "--listen",
                "127.0.0.1:0",
                "--id",
                "lost",
                "--decision-store",
                "shard",
            ])
            .arg("--data-dir")
            .arg(&data_dir)
            .kill_on_drop(true);
        for (name, participant) in t.cluster.shard_names.iter().zip(&t.cluster.participants) {
            command.args(["--shard", &format!("{name}={}", participant.endpoint())]);
        }
        let output = tokio::time::timeout(Duration::from_secs(60), command.output())
            .await
            .context("the coordinator should have refused to start, not served")??;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "attempt {attempt} started: {stderr}");
        assert!(
            stderr.contains("holds no decision log, but the shards hold work of coordinator lost")
                && stderr.contains(&gid),
            "attempt {attempt}: {stderr}"
        );
    }
    Ok(())
}
