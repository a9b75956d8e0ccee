//! Shards the coordinator drives itself (`--shard NAME=postgres://...`): the participant's own code
//! in the coordinator's process, no agent and no network hop. Transactions commit and abort
//! atomically across such shards and mixed with agents; a crash of the coordinator after the
//! decision is finished by its restart (the in-process participant recovers its prepared
//! branches with it); three-phase commit over such a shard is refused, saying why. `treaty dev up`
//! and `treaty demo` run this way with `--participants in-process`.

use std::time::Duration;

use anyhow::{Context, Result};
use treaty_harness::{ServiceProcess, ServiceSpec};
use treaty_proto::pb;

use crate::fixture::*;

const RECOVERY: Duration = Duration::from_secs(30);

fn in_process(coordinator_args: &[&str]) -> Options {
    Options {
        coordinator_args: coordinator_args.iter().map(|a| a.to_string()).collect(),
        in_process: true,
        ..Options::default()
    }
}

async fn every_shard_has(t: &TestCluster, k: i64) -> Result<bool> {
    for shard in 0..3 {
        if !t.kv(shard).await?.iter().any(|(key, _)| *key == k) {
            return Ok(false);
        }
    }
    Ok(true)
}

#[tokio::test]
async fn transactions_commit_and_abort_atomically_over_in_process_shards() -> Result<()> {
    let t = TestCluster::start(in_process(&[])).await?;
    assert!(t.cluster.participants.is_empty(), "no agent was started");
    let mut client = t.client().await?;

    // One-shot, three shards.
    let response = client.submit(three_inserts(&t, 1)).await?.into_inner();
    assert!(committed(&response.outcome), "{response:?}");
    assert!(every_shard_has(&t, 1).await?);

    // Interactive, then rolled back by a failing statement on the last shard: nothing stays.
    let txid = begin(&mut client).await?;
    let sql = "INSERT INTO kv VALUES ($1, $2)";
    execute(&mut client, txid, &t.shard(0), sql, vec![int(2), text("a")]).await?;
    execute(&mut client, txid, &t.shard(1), sql, vec![int(2), text("b")]).await?;
    let duplicate = execute(&mut client, txid, &t.shard(2), sql, vec![int(1), text("dup")]).await;
    assert!(duplicate.is_err(), "a duplicate key fails: {duplicate:?}");
    for shard in 0..3 {
        assert!(
            !t.kv(shard).await?.iter().any(|(k, _)| *k == 2),
            "shard {shard} kept a row of the aborted transaction"
        );
    }
    assert_eq!(t.prepared_everywhere().await?, 0);

    // The coordinator reports SERVING: its in-process shards answer their health checks.
    let channel = tonic::transport::Endpoint::from_shared(t.cluster.coordinator_endpoint())?
        .connect()
        .await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    eventually("the coordinator is SERVING", Duration::from_secs(10), || {
        let mut health = health.clone();
        async move {
            let answer = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: pb::coordinator_server::SERVICE_NAME.to_owned(),
                })
                .await?;
            Ok(answer.into_inner().status()
                == tonic_health::pb::health_check_response::ServingStatus::Serving)
        }
    })
    .await?;
    let _ = &mut health;
    Ok(())
}

#[tokio::test]
async fn three_phase_commit_over_an_in_process_shard_is_refused_with_the_reason() -> Result<()> {
    let t = TestCluster::start(in_process(&[])).await?;
    let mut client = t.client().await?;
    let mut request = three_inserts(&t, 5);
    request.options = Some(pb::TransactionOptions {
        protocol: pb::Protocol::ThreePhase as i32,
        ..Default::default()
    });
    let answer = client.submit(request).await;
    let text = match &answer {
        Ok(response) => format!("{:?}", response.get_ref().outcome),
        Err(status) => status.message().to_owned(),
    };
    assert!(
        !answer.as_ref().is_ok_and(|r| committed(&r.get_ref().outcome)),
        "a three-phase transaction over in-process shards must not commit: {answer:?}"
    );
    assert!(
        text.contains("three-phase commit needs participants that outlive the coordinator"),
        "the refusal says why: {text}"
    );
    for shard in 0..3 {
        assert!(t.kv(shard).await?.is_empty(), "shard {shard} kept a row");
    }
    assert_eq!(t.prepared_everywhere().await?, 0);
    Ok(())
}

#[tokio::test]
async fn a_coordinator_crash_after_the_decision_is_finished_by_its_restart() -> Result<()> {
    for store in ["file", "shard"] {
        let mut t = TestCluster::start(in_process(&[
            "--crash-at",
            "after-commit-decision",
            "--decision-store",
            store,
        ]))
        .await?;
        submit_into_crash(&mut t, 7).await?;
        // Branches other than the decision's are left prepared by the crash.
        assert!(
            t.prepared_everywhere().await? > 0,
            "{store}: the crash left prepared branches"
        );
        // `--crash-at` fires once per data directory: the restart runs on.
        t.cluster.coordinator.restart().await?;
        eventually(
            &format!("{store}: every shard committed and nothing is prepared"),
            RECOVERY,
            || async { Ok(every_shard_has(&t, 7).await? && t.prepared_everywhere().await? == 0) },
        )
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn in_process_and_agent_shards_mix_in_one_transaction() -> Result<()> {
    let mut t = TestCluster::start(Options {
        coordinator_args: vec!["--decision-store".into(), "shard".into()],
        ..Options::default()
    })
    .await?;
    // Shard s0's agent gives its database up; a second coordinator drives s0 itself and reaches
    // s1 and s2 through their agents.
    t.cluster.participants[0].kill9()?;
    let database = t.cluster.pgs[0].url(DATABASE);
    let mut args = vec![
        "--data-dir".to_string(),
        t.dir.path().join("mixed").display().to_string(),
        "--id".into(),
        "mixed".into(),
        "--decision-store".into(),
        "shard".into(),
        "--shard".into(),
        format!("{}={database}", t.shard(0)),
    ];
    for i in 1..3 {
        args.push("--shard".into());
        args.push(format!("{}={}", t.shard(i), t.cluster.participants[i].endpoint()));
    }
    let port = treaty_harness::free_loopback_port()?;
    let mixed = ServiceProcess::spawn(ServiceSpec {
        name: "coordinator-mixed".into(),
        binary: treaty_harness::binary_path("treaty-coordinator")?,
        args,
        env: Vec::new(),
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        log_path: t.dir.path().join("logs").join("coordinator-mixed.log"),
    })
    .await
    .context("starting the mixed coordinator")?;
    let channel = tonic::transport::Endpoint::from_shared(mixed.endpoint())?
        .connect()
        .await?;
    let mut client = pb::coordinator_client::CoordinatorClient::new(channel);
    for k in 10..20 {
        let response = client.submit(three_inserts(&t, k)).await?.into_inner();
        assert!(committed(&response.outcome), "transaction {k}: {response:?}");
    }
    for k in 10..20 {
        assert!(every_shard_has(&t, k).await?, "key {k} is on every shard");
    }
    eventually("nothing prepared", RECOVERY, || async {
        Ok(t.prepared_everywhere().await? == 0)
    })
    .await?;
    Ok(())
}

/// Runs `treaty <args>` to completion.
async fn treaty(args: &[&str]) -> Result<std::process::Output> {
    tokio::process::Command::new(treaty_harness::binary_path("treaty")?)
        .args(args)
        .env_remove("TREATY_COORDINATOR")
        .output()
        .await
        .context("running treaty")
}

#[tokio::test]
async fn dev_up_with_in_process_participants_starts_no_agent_and_commits() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let dev_dir = dir.path().join("dev");
    let dev_dir = dev_dir.to_str().context("a UTF-8 temporary path")?;
    let up = treaty(&[
        "dev",
        "up",
        "--participants",
        "in-process",
        "--shards",
        "2",
        "--port",
        "0",
        "--console-port",
        "0",
        "--dev-dir",
        dev_dir,
    ])
    .await?;
    let stdout = String::from_utf8_lossy(&up.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&up.stderr).into_owned();
    // Stopped whatever happens below, so no process outlives the test.
    struct Down<'a>(&'a str);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            if let Ok(binary) = treaty_harness::binary_path("treaty") {
                let _ = std::process::Command::new(binary)
                    .args(["dev", "down", "--dev-dir", self.0])
                    .output();
            }
        }
    }
    let _down = Down(dev_dir);
    assert!(up.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("no participant agents"), "{stderr}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("dev/cluster.json"))?)?;
    let shards = state["shards"].as_array().cloned().unwrap_or_default();
    assert_eq!(shards.len(), 2, "{state}");
    for shard in &shards {
        assert!(shard["participant"].is_null(), "an agent endpoint in {state}");
        assert!(shard["participant_pid"].is_null(), "an agent process in {state}");
        assert!(
            stdout.contains(&format!(
                "shard {:<6} participant in process",
                shard["name"].as_str().unwrap_or_default()
            )),
            "{stdout}"
        );
    }
    assert!(
        !dir.path().join("dev/logs/participant-s0.log").exists(),
        "an agent was started"
    );

    // A cross-shard transaction commits through the coordinator alone.
    let coordinator = state["coordinator"]
        .as_str()
        .context("the coordinator's endpoint")?;
    for (i, shard) in shards.iter().enumerate() {
        let url = shard["postgres_url"].as_str().context("a shard's URL")?;
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(url).await?;
        sqlx::raw_sql("CREATE TABLE kv (k bigint PRIMARY KEY, v text NOT NULL)")
            .execute(&mut conn)
            .await
            .with_context(|| format!("creating kv on shard {i}"))?;
    }
    let ops = dir.path().join("ops.json");
    std::fs::write(
        &ops,
        r#"{"ops":[{"shard":"s0","sql":"INSERT INTO kv VALUES (1, 'a')"},
                   {"shard":"s1","sql":"INSERT INTO kv VALUES (1, 'b')"}]}"#,
    )?;
    let submit = treaty(&[
        "submit",
        ops.to_str().context("a UTF-8 temporary path")?,
        "--json",
        "--coordinator",
        coordinator,
    ])
    .await?;
    let answer = String::from_utf8_lossy(&submit.stdout);
    assert!(
        submit.status.success(),
        "{answer}{}",
        String::from_utf8_lossy(&submit.stderr)
    );
    assert!(answer.contains("\"committed\""), "{answer}");
    Ok(())
}

#[tokio::test]
async fn the_demo_with_in_process_participants_reaches_an_ok_verdict() -> Result<()> {
    let (verdict, dir) = run_demo(&["--participants", "in-process"]).await?;
    assert_eq!(verdict["participants"], "in-process", "{verdict}");
    assert_eq!(verdict["prepared_left"], 0, "{verdict}");
    assert!(
        !dir.path().join("logs/participant-s0.log").exists(),
        "an agent was started"
    );
    Ok(())
}
