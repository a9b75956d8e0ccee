//! Crashes at chosen protocol steps, restarts, and all-or-nothing afterwards.

use std::time::Duration;

use anyhow::Result;
use treaty_proto::pb;

use crate::fixture::*;

const RECOVERY: Duration = Duration::from_secs(30);

fn crash_at(point: &str) -> Options {
    Options {
        // Written for the decision log (its damage cases too): the file store, explicitly.
        coordinator_args: vec![
            "--crash-at".into(),
            point.into(),
            "--decision-store".into(),
            "file".into(),
        ],
        ..Options::default()
    }
}

async fn all_have(t: &TestCluster, k: i64) -> Result<bool> {
    for shard in 0..3 {
        if !t.kv(shard).await?.iter().any(|(key, _)| *key == k) {
            return Ok(false);
        }
    }
    Ok(t.prepared_everywhere().await? == 0)
}

async fn none_have(t: &TestCluster, k: i64) -> Result<bool> {
    for shard in 0..3 {
        if t.kv(shard).await?.iter().any(|(key, _)| *key == k) {
            return Ok(false);
        }
    }
    Ok(t.prepared_everywhere().await? == 0)
}

#[tokio::test]
async fn coordinator_killed_after_the_durable_decision_commits_on_all_after_restart() -> Result<()> {
    let mut t = TestCluster::start(crash_at("after-commit-decision")).await?;
    submit_into_crash(&mut t, 1).await?;
    // Every branch is prepared and none committed: the decision is only in the log.
    for shard in 0..3 {
        assert_eq!(t.prepared(shard).await?.len(), 1, "shard {shard}");
        assert!(t.kv(shard).await?.is_empty());
    }
    t.cluster.coordinator.restart().await?;
    eventually("committed on every shard", RECOVERY, || all_have(&t, 1)).await?;
    // The recovered transaction is visible with its outcome.
    let mut client = t.client().await?;
    let info = client
        .list_transactions(pb::ListTransactionsRequest::default())
        .await?
        .into_inner();
    let recovered = info
        .transactions
        .iter()
        .find(|i| i.recovered)
        .expect("a recovered transaction");
    assert_eq!(recovered.state, pb::TransactionState::Committed as i32);
    Ok(())
}

#[tokio::test]
async fn coordinator_killed_before_the_decision_aborts_on_all_after_restart() -> Result<()> {
    let mut t = TestCluster::start(crash_at("before-commit-decision")).await?;
    submit_into_crash(&mut t, 1).await?;
    assert_eq!(t.prepared_everywhere().await?, 3);
    t.cluster.coordinator.restart().await?;
    eventually("aborted on every shard, nothing prepared", RECOVERY, || {
        none_have(&t, 1)
    })
    .await?;
    // Presumed abort: the coordinator has no record and says so.
    let mut client = t.client().await?;
    let txid = client.info(pb::InfoRequest {}).await?.into_inner();
    assert!(txid.next_txid > 1);
    Ok(())
}

#[tokio::test]
async fn participant_killed_while_prepared_resolves_to_the_decision() -> Result<()> {
    // Commit decided, then the participant of shard 1 dies with its branch prepared.
    let mut t = TestCluster::start(crash_at("after-commit-decision")).await?;
    submit_into_crash(&mut t, 1).await?;
    t.cluster.participants[1].kill9()?;
    t.cluster.participants[1].restart().await?;
    t.cluster.coordinator.restart().await?;
    eventually("committed on every shard", RECOVERY, || all_have(&t, 1)).await?;

    // Abort decided (presumed), the participant of shard 2 dies with its branch prepared.
    let mut t = TestCluster::start(crash_at("before-commit-decision")).await?;
    submit_into_crash(&mut t, 2).await?;
    t.cluster.participants[2].kill9()?;
    t.cluster.participants[2].restart().await?;
    t.cluster.coordinator.restart().await?;
    eventually("aborted on every shard", RECOVERY, || none_have(&t, 2)).await?;
    Ok(())
}

#[tokio::test]
async fn prepared_branch_survives_an_immediate_postgres_stop_and_is_resolved() -> Result<()> {
    let mut t = TestCluster::start(crash_at("after-commit-decision")).await?;
    submit_into_crash(&mut t, 1).await?;
    let before = t.prepared(1).await?;
    assert_eq!(before.len(), 1);
    t.cluster.pgs[1].stop_immediate().await?;
    t.cluster.pgs[1].restart().await?;
    assert_eq!(
        t.prepared(1).await?,
        before,
        "the prepared branch survives a PostgreSQL crash"
    );
    t.cluster.coordinator.restart().await?;
    eventually("committed on every shard", RECOVERY, || all_have(&t, 1)).await?;
    Ok(())
}

#[tokio::test]
async fn torn_decision_log_tail_is_cut_and_the_coordinator_serves() -> Result<()> {
    let mut t = TestCluster::start(crash_at("after-commit-decision")).await?;
    submit_into_crash(&mut t, 1).await?;
    let log = t.dir.path().join("coordinator").join("decisions.log");
    let mut bytes = std::fs::read(&log)?;
    let good_len = bytes.len();
    // Half of a record's frame, as a crash in the middle of a write leaves it.
    let frame_start = bytes[..good_len.min(9)].to_vec();
    bytes.extend_from_slice(&frame_start);
    std::fs::write(&log, &bytes)?;
    t.cluster.coordinator.restart().await?;
    // The good commit record before the torn tail is kept and re-driven.
    eventually("committed on every shard", RECOVERY, || all_have(&t, 1)).await?;
    assert!(
        t.coordinator_log().to_lowercase().contains("damage"),
        "the damage is reported"
    );
    let mut client = t.client().await?;
    let response = client.submit(three_inserts(&t, 2)).await?.into_inner();
    assert!(
        committed(&response.outcome),
        "the coordinator serves after repair"
    );
    Ok(())
}

/// Byte offsets of the records in a decision log image (frame: magic, length, crc, body).
fn record_offsets(bytes: &[u8]) -> Vec<usize> {
    let mut offsets = Vec::new();
    let mut at = 0;
    while at + 12 <= bytes.len() {
        offsets.push(at);
        let length =
            u32::from_le_bytes([bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]]) as usize;
        at += 12 + length;
    }
    offsets
}

#[tokio::test]
async fn corrupt_decision_log_record_is_skipped_and_the_records_around_it_kept() -> Result<()> {
    let mut t = TestCluster::start(crash_at("after-commit-decision")).await?;
    let id_before = t
        .client()
        .await?
        .info(pb::InfoRequest {})
        .await?
        .into_inner()
        .coordinator_id;
    submit_into_crash(&mut t, 1).await?;
    // The log now holds: header, the start's incarnation, txid reservation, commit of the crashed
    // transaction.
    let log = t.dir.path().join("coordinator").join("decisions.log");
    let mut bytes = std::fs::read(&log)?;
    let offsets = record_offsets(&bytes);
    assert_eq!(
        offsets.len(),
        4,
        "header, incarnation, reservation, commit: {offsets:?}"
    );
    // Rot one byte in the body of the reservation: its checksum no longer holds.
    bytes[offsets[2] + 13] ^= 0xff;
    std::fs::write(&log, &bytes)?;

    t.cluster.coordinator.restart().await?;
    // The commit record after the damage is kept and re-driven to every shard.
    eventually("committed on every shard", RECOVERY, || all_have(&t, 1)).await?;
    let coordinator_log = t.coordinator_log().to_lowercase();
    assert!(
        coordinator_log.contains("damage") && coordinator_log.contains("corrupt"),
        "the damage is reported as a corrupt record:\n{coordinator_log}"
    );
    // The header before it is kept: same coordinator id, so GIDs stay stable.
    let mut client = t.client().await?;
    let info = client.info(pb::InfoRequest {}).await?.into_inner();
    assert_eq!(info.coordinator_id, id_before);
    // The coordinator serves, with txids beyond any handed out before the damage.
    let response = client.submit(three_inserts(&t, 2)).await?.into_inner();
    assert!(committed(&response.outcome), "{response:?}");
    let first_txid = {
        let listed = client
            .list_transactions(pb::ListTransactionsRequest::default())
            .await?
            .into_inner();
        listed.transactions.iter().map(|i| i.txid).min().unwrap_or(0)
    };
    let new_txid = response.outcome.map(|o| o.txid).unwrap_or(0);
    assert!(
        new_txid > first_txid + 10_000,
        "txid {new_txid} must skip the block whose reservation was lost (recovered txid {first_txid})"
    );
    eventually("committed on every shard", RECOVERY, || all_have(&t, 2)).await?;
    Ok(())
}
