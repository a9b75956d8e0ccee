//! Three-phase commit through the coordinator, chosen per transaction or by the coordinator's
//! default: real participants prepare, pre-commit durably and commit; a NO vote aborts everywhere.

use std::time::Duration;

use anyhow::Result;
use tonic::transport::Channel;
use treaty_proto::pb;
use treaty_proto::pb::coordinator_client::CoordinatorClient;

use crate::fixture::*;

fn three_phase() -> Option<pb::TransactionOptions> {
    Some(pb::TransactionOptions {
        protocol: pb::Protocol::ThreePhase as i32,
        ..Default::default()
    })
}

/// Begins a 3PC transaction and inserts `key(shard)` on every shard; returns its txid.
async fn begin_inserting(
    t: &TestCluster,
    client: &mut CoordinatorClient<Channel>,
    key: impl Fn(usize) -> i64,
) -> Result<u64> {
    let txid = client
        .begin(pb::BeginRequest {
            options: three_phase(),
        })
        .await?
        .into_inner()
        .txid;
    for shard in 0..3 {
        execute(
            client,
            txid,
            &t.shard(shard),
            "INSERT INTO kv (k, v) VALUES ($1, 'three-phase')",
            vec![int(key(shard))],
        )
        .await?;
    }
    Ok(txid)
}

/// The `treaty.three_phase` rows left on every shard (each is deleted once its branch finished).
async fn three_phase_rows(t: &TestCluster) -> Result<i64> {
    let mut total = 0;
    for shard in 0..3 {
        total += t.count(shard, "SELECT count(*) FROM treaty.three_phase").await?;
    }
    Ok(total)
}

#[tokio::test]
async fn three_phase_commits_interactive_and_one_shot_transactions_on_every_shard() -> Result<()> {
    let t = TestCluster::start(Options::default()).await?;
    let mut client = t.client().await?;

    let txid = begin_inserting(&t, &mut client, |shard| shard as i64).await?;
    let outcome = client
        .commit(pb::CommitRequest {
            txid,
            wait_for_apply: true,
        })
        .await?
        .into_inner();
    assert_eq!(outcome.kind, pb::OutcomeKind::Committed as i32, "{outcome:?}");
    let info = client
        .get_transaction(pb::GetTransactionRequest { txid })
        .await?
        .into_inner();
    assert_eq!(info.protocol, pb::Protocol::ThreePhase as i32, "{info:?}");
    assert_eq!(info.state, pb::TransactionState::Committed as i32, "{info:?}");

    let mut request = submit(
        (0..3)
            .map(|i| insert(&t.shard(i), 10 + i as i64, "one-shot"))
            .collect(),
    );
    request.options = three_phase();
    let response = client.submit(request).await?.into_inner();
    assert!(committed(&response.outcome), "{response:?}");

    for shard in 0..3 {
        assert_eq!(t.kv(shard).await?.len(), 2, "shard {shard}");
    }
    assert_eq!(t.prepared_everywhere().await?, 0);
    eventually("three-phase rows deleted", Duration::from_secs(10), || async {
        Ok(three_phase_rows(&t).await? == 0)
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_no_vote_aborts_a_three_phase_transaction_everywhere() -> Result<()> {
    let t = TestCluster::start(Options::default()).await?;
    t.sql(2, "INSERT INTO kv VALUES (7, 'taken')").await?;
    let mut client = t.client().await?;
    // Deferred, so the duplicate surfaces at PREPARE, as a NO vote.
    t.sql(
        2,
        "ALTER TABLE kv ADD CONSTRAINT kv_v_unique UNIQUE (v) DEFERRABLE INITIALLY DEFERRED",
    )
    .await?;
    let mut request = submit(vec![
        insert(&t.shard(0), 7, "x"),
        insert(&t.shard(1), 7, "x"),
        insert(&t.shard(2), 8, "taken"),
    ]);
    request.options = three_phase();
    let response = client.submit(request).await?.into_inner();
    let outcome = response.outcome.expect("an outcome");
    assert_eq!(outcome.kind, pb::OutcomeKind::Aborted as i32, "{outcome:?}");
    assert_eq!(t.kv(0).await?, vec![]);
    assert_eq!(t.kv(1).await?, vec![]);
    assert_eq!(t.prepared_everywhere().await?, 0);
    Ok(())
}

#[tokio::test]
async fn the_coordinators_default_protocol_applies_when_begin_leaves_it_unset() -> Result<()> {
    let t = TestCluster::start(Options {
        coordinator_args: vec!["--default-protocol".into(), "three-phase".into()],
        ..Options::default()
    })
    .await?;
    let mut client = t.client().await?;
    let txid = begin(&mut client).await?;
    let info = client
        .get_transaction(pb::GetTransactionRequest { txid })
        .await?
        .into_inner();
    assert_eq!(info.protocol, pb::Protocol::ThreePhase as i32, "{info:?}");
    Ok(())
}

/// A cluster whose coordinator dies at `failpoint`, with participants that run termination 300 ms
/// after the coordinator falls silent.
async fn crashing_at(failpoint: &str) -> Result<TestCluster> {
    TestCluster::start(Options {
        coordinator_args: vec!["--failpoints".into(), format!("{failpoint}=return(crash)")],
        participant_args: vec!["--three-phase-timeout-ms".into(), "300".into()],
        ..Options::default()
    })
    .await
}

/// Begins a 3PC transaction inserting `k` on every shard and asks to commit it; the coordinator
/// dies before answering. Returns the txid.
async fn commit_into_a_crash(t: &mut TestCluster, k: i64) -> Result<u64> {
    let mut client = t.client().await?;
    let txid = begin_inserting(t, &mut client, |_| k).await?;
    let answer = client
        .commit(pb::CommitRequest {
            txid,
            wait_for_apply: false,
        })
        .await;
    assert!(
        answer.is_err(),
        "the coordinator should have died first: {answer:?}"
    );
    let exit = t.cluster.coordinator.wait_exit(Duration::from_secs(10)).await?;
    assert!(exit.is_some(), "the coordinator process should have ended");
    Ok(txid)
}

async fn rows_everywhere(t: &TestCluster, k: i64) -> Result<usize> {
    let mut rows = 0;
    for shard in 0..3 {
        rows += t.kv(shard).await?.iter().filter(|(key, _)| *key == k).count();
    }
    Ok(rows)
}

async fn state_after_restart(t: &mut TestCluster, txid: u64) -> Result<i32> {
    t.cluster.coordinator.restart().await?;
    let client = t.client().await?;
    let state = |client: &CoordinatorClient<Channel>| {
        let mut client = client.clone();
        async move {
            let info = client
                .get_transaction(pb::GetTransactionRequest { txid })
                .await?
                .into_inner();
            anyhow::Ok(info.state)
        }
    };
    let finished =
        |s: i32| s == pb::TransactionState::Committed as i32 || s == pb::TransactionState::Aborted as i32;
    eventually(
        "the coordinator learns the outcome",
        Duration::from_secs(20),
        || async { Ok(finished(state(&client).await?)) },
    )
    .await?;
    state(&client).await
}

#[tokio::test]
async fn after_some_pre_commits_the_participants_commit_while_the_coordinator_is_down() -> Result<()> {
    let mut t = crashing_at("coordinator::after-some-pre-commits").await?;
    let txid = commit_into_a_crash(&mut t, 41).await?;
    // The coordinator stays down: only the participants' termination can finish it.
    eventually(
        "committed on every shard without the coordinator",
        Duration::from_secs(20),
        || async { Ok(rows_everywhere(&t, 41).await? == 3 && t.prepared_everywhere().await? == 0) },
    )
    .await?;
    assert!(
        t.cluster
            .coordinator
            .wait_exit(Duration::from_millis(1))
            .await?
            .is_some()
    );
    // Restarted, the coordinator finds its pre-commit record, learns the outcome and keeps it.
    let state = state_after_restart(&mut t, txid).await?;
    assert_eq!(state, pb::TransactionState::Committed as i32);
    Ok(())
}

#[tokio::test]
async fn before_any_pre_commit_the_participants_abort_while_the_coordinator_is_down() -> Result<()> {
    let mut t = crashing_at("coordinator::before-pre-commit-sends").await?;
    let txid = commit_into_a_crash(&mut t, 42).await?;
    eventually(
        "rolled back on every shard without the coordinator",
        Duration::from_secs(20),
        || async { Ok(t.prepared_everywhere().await? == 0) },
    )
    .await?;
    assert_eq!(rows_everywhere(&t, 42).await?, 0);
    let state = state_after_restart(&mut t, txid).await?;
    assert_eq!(state, pb::TransactionState::Aborted as i32);
    Ok(())
}
