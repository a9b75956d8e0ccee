//! `--decision-store shard`: the commit decision is a row in `treaty.decisions` committed inside
//! the transaction's first branch. Real processes, real PostgreSQL: the decision branch commits in
//! one phase and leaves no marker, an abort concluded by someone else wins over a coordinator that
//! was slow to decide, and a coordinator killed for good is finished by another instance (or by
//! itself after a restart) from the rows alone.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tonic::transport::Channel;
use treaty_proto::pb;
use treaty_proto::pb::admin_client::AdminClient;
use treaty_proto::pb::participant_client::ParticipantClient;

use crate::fixture::*;

const RECOVERY: Duration = Duration::from_secs(30);

fn shard_store(extra: &[&str]) -> Options {
    let mut coordinator_args: Vec<String> = vec!["--decision-store".into(), "shard".into()];
    coordinator_args.extend(extra.iter().map(|s| s.to_string()));
    Options {
        coordinator_args,
        ..Options::default()
    }
}

async fn rows_with(t: &TestCluster, k: i64) -> Result<usize> {
    let mut count = 0;
    for shard in 0..3 {
        count += t.kv(shard).await?.iter().filter(|(key, _)| *key == k).count();
    }
    Ok(count)
}

async fn settled_with(t: &TestCluster, k: i64, rows: usize) -> Result<bool> {
    Ok(rows_with(t, k).await? == rows && t.prepared_everywhere().await? == 0)
}

async fn decision_rows(t: &TestCluster, shard: usize) -> Result<i64> {
    t.count(shard, "SELECT count(*) FROM treaty.decisions").await
}

async fn markers_everywhere(t: &TestCluster) -> Result<i64> {
    let mut total = 0;
    for shard in 0..3 {
        total += t.count(shard, "SELECT count(*) FROM treaty.branches").await?;
    }
    Ok(total)
}

#[tokio::test]
async fn the_decision_branch_commits_in_one_phase_with_its_row_and_nothing_is_left_behind() -> Result<()> {
    let t = TestCluster::start(shard_store(&[])).await?;
    let mut client = t.client().await?;
    let response = client.submit(three_inserts(&t, 1)).await?.into_inner();
    assert!(committed(&response.outcome), "{response:?}");
    assert_eq!(rows_with(&t, 1).await?, 3);

    // Interactive: the first shard written is the decision shard, named in the GID.
    let txid = begin(&mut client).await?;
    for shard in [1, 0, 2] {
        execute(
            &mut client,
            txid,
            &t.shard(shard),
            "UPDATE kv SET v = 'two'",
            vec![],
        )
        .await?;
    }
    let outcome = commit_applied(&mut client, txid).await?;
    assert_eq!(outcome.kind, pb::OutcomeKind::Committed as i32, "{outcome:?}");
    let info = client
        .get_transaction(pb::GetTransactionRequest { txid })
        .await?
        .into_inner();
    assert!(
        info.gid.ends_with("@s1"),
        "the GID names the decision shard: {}",
        info.gid
    );
    for shard in 0..3 {
        assert_eq!(t.kv(shard).await?, vec![(1, "two".to_owned())], "shard {shard}");
    }
    // No PREPARE left, no marker row ever written, and the commit rows are forgotten.
    assert_eq!(t.prepared_everywhere().await?, 0);
    assert_eq!(
        markers_everywhere(&t).await?,
        0,
        "no marker rows under the shard store"
    );
    eventually("every commit row forgotten", RECOVERY, || async {
        let mut total = 0;
        for shard in 0..3 {
            total += decision_rows(&t, shard).await?;
        }
        Ok(total == 0)
    })
    .await?;
    Ok(())
}

/// The branch GID PostgreSQL holds prepared on `shard`, once there is one.
async fn prepared_gid(t: &TestCluster, shard: usize) -> Result<String> {
    eventually("a prepared branch", RECOVERY, || async {
        Ok(!t.prepared(shard).await?.is_empty())
    })
    .await?;
    Ok(t.prepared(shard).await?.remove(0))
}

#[tokio::test]
async fn an_abort_concluded_while_the_coordinator_is_slow_to_decide_wins_and_the_client_hears_aborted()
-> Result<()> {
    treaty_harness::require_failpoints()?;
    let t = TestCluster::start(shard_store(&[])).await?;
    let mut admin = AdminClient::connect(t.cluster.coordinator_endpoint()).await?;
    admin
        .set_failpoint(pb::SetFailpointRequest {
            name: "coordinator::before-commit-decision".into(),
            actions: "pause".into(),
        })
        .await?;
    let mut client = t.client().await?;
    let request = three_inserts(&t, 7);
    let submitted = tokio::spawn(async move { client.submit(request).await });

    // s1 and s2 are prepared; s0, the decision branch, is open; the coordinator is paused before
    // its decision. Someone else (here: the decision shard's own participant, as any coordinator
    // would ask it) concludes abort.
    let branch = prepared_gid(&t, 1).await?;
    let gid = branch.rsplit_once(':').context("a branch GID")?.0.to_owned();
    assert!(gid.ends_with("@s0"), "{gid}");
    let mut participant: ParticipantClient<Channel> =
        ParticipantClient::connect(t.cluster.participants[0].endpoint()).await?;
    let read = participant
        .read_decisions(pb::ReadDecisionsRequest {
            gids: vec![gid.clone()],
            conclude_abort: true,
        })
        .await?
        .into_inner();
    assert_eq!(read.decisions[0].decision, pb::Decision::Abort as i32, "{read:?}");

    admin.clear_failpoints(pb::ClearFailpointsRequest {}).await?;
    let response = submitted.await??.into_inner();
    let outcome = response.outcome.context("an outcome")?;
    assert_eq!(outcome.kind, pb::OutcomeKind::Aborted as i32, "{outcome:?}");
    let reason = outcome.abort.context("an abort reason")?;
    assert_eq!(reason.cause, pb::AbortCause::ConcludedAbort as i32, "{reason:?}");
    assert!(reason.retryable);
    eventually("nothing written, nothing prepared", RECOVERY, || {
        settled_with(&t, 7, 0)
    })
    .await?;
    // Once the coordinator has finished the transaction (its Info's open_from passes the txid),
    // no decision branch of it can open again, and s0's participant deletes the abort row.
    let t = &t;
    let gid = &gid;
    eventually("the abort row deleted", RECOVERY, || async move {
        let left = t
            .count(
                0,
                &format!("SELECT count(*) FROM treaty.decisions WHERE gid = '{gid}'"),
            )
            .await?;
        Ok(left == 0)
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_restarted_coordinator_finishes_its_commit_rows() -> Result<()> {
    let mut t = TestCluster::start(shard_store(&["--crash-at", "after-commit-decision"])).await?;
    submit_into_crash(&mut t, 3).await?;
    // The decision branch committed with its row; the others are prepared.
    assert_eq!(t.kv(0).await?.len(), 1);
    assert_eq!(decision_rows(&t, 0).await?, 1);
    let prepared = (
        t.prepared(0).await?,
        t.prepared(1).await?,
        t.prepared(2).await?,
        t.kv(1).await?,
        t.kv(2).await?,
    );
    assert_eq!(prepared.1.len() + prepared.2.len(), 2, "{prepared:?}");
    t.cluster.coordinator.restart().await?;
    eventually("committed on every shard", RECOVERY, || settled_with(&t, 3, 3)).await?;
    eventually("the commit row forgotten", RECOVERY, || async {
        Ok(decision_rows(&t, 0).await? == 0)
    })
    .await?;
    Ok(())
}

/// Another coordinator instance over the same shards, finishing what nobody finished for 500 ms.
async fn second_instance(t: &TestCluster) -> Result<treaty_harness::ServiceProcess> {
    let args = ["--decision-store", "shard", "--takeover-after-ms", "500"].map(String::from);
    Ok(t.cluster.spawn_coordinator("second", &args).await?)
}

#[tokio::test]
async fn a_coordinator_killed_for_good_after_its_decision_is_finished_by_another_instance() -> Result<()> {
    let mut t = TestCluster::start(shard_store(&["--crash-at", "after-commit-decision"])).await?;
    submit_into_crash(&mut t, 4).await?;
    let killed = Instant::now();
    let _second = second_instance(&t).await?;
    eventually(
        "committed on every shard by the second instance",
        RECOVERY,
        || settled_with(&t, 4, 3),
    )
    .await?;
    eprintln!(
        "the second instance finished the killed one's transaction {:?} after the kill",
        killed.elapsed()
    );
    eventually("the commit row forgotten", RECOVERY, || async {
        Ok(decision_rows(&t, 0).await? == 0)
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_coordinator_killed_for_good_before_its_decision_is_aborted_by_another_instance() -> Result<()> {
    let mut t = TestCluster::start(shard_store(&["--crash-at", "before-commit-decision"])).await?;
    submit_into_crash(&mut t, 5).await?;
    assert_eq!(t.prepared(1).await?.len() + t.prepared(2).await?.len(), 2);
    let _second = second_instance(&t).await?;
    eventually("rolled back everywhere by the second instance", RECOVERY, || {
        settled_with(&t, 5, 0)
    })
    .await?;
    assert_eq!(
        t.count(0, "SELECT count(*) FROM treaty.decisions WHERE outcome = 'abort'")
            .await?,
        1,
        "the second instance concluded abort with a row"
    );
    Ok(())
}

#[tokio::test]
async fn the_cli_fails_over_to_the_next_coordinator() -> Result<()> {
    let t = TestCluster::start(shard_store(&[])).await?;
    let dead = format!("http://127.0.0.1:{}", treaty_harness::free_loopback_port()?);
    let list = std::process::Command::new(treaty_harness::binary_path("treaty")?)
        .args([
            "list",
            "--coordinator",
            &format!("{dead},{}", t.cluster.coordinator_endpoint()),
        ])
        .output()?;
    assert!(list.status.success(), "{}", String::from_utf8_lossy(&list.stderr));
    let only_dead = std::process::Command::new(treaty_harness::binary_path("treaty")?)
        .args(["list", "--coordinator", &dead])
        .output()?;
    assert!(!only_dead.status.success());
    let stderr = String::from_utf8_lossy(&only_dead.stderr);
    assert!(
        stderr.contains("no coordinator answered") && stderr.contains(&dead),
        "{stderr}"
    );
    Ok(())
}
