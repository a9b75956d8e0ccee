//! In-doubt tooling: `ListInDoubt` reports prepared branches with their shard, age and locks, and
//! `Resolve` records a heuristic decision (who, when, why) that the coordinator carries out, and
//! refuses one that contradicts the decision it already holds.

use std::time::Duration;

use anyhow::{Context, Result};
use tonic::transport::Channel;
use treaty_harness::{ClusterSpec, LocalCluster, PgOptions};
use treaty_proto::pb;
use treaty_proto::pb::admin_client::AdminClient;
use treaty_proto::pb::coordinator_client::CoordinatorClient;

use crate::fixture::*;

const WITHIN: Duration = Duration::from_secs(30);

/// The fixture's cluster, but with a vote timeout far longer than the test, so that the
/// transaction held at its vote stays in flight until the operator resolves it.
async fn start(in_doubt_after_ms: &str) -> Result<TestCluster> {
    let dir = tempfile::Builder::new().prefix("treaty-e2e-").tempdir()?;
    let spec = ClusterSpec {
        shards: 3,
        base_dir: dir.path().to_path_buf(),
        pg: PgOptions {
            fsync: false,
            ..PgOptions::default()
        },
        // The file store: resolving by hand is the operator's decision, logged.
        coordinator_args: [
            "--vote-timeout-ms",
            "600000",
            "--lock-timeout-ms",
            "2000",
            "--decision-store",
            "file",
        ]
        .map(String::from)
        .to_vec(),
        participant_args: [
            "--in-doubt-after-ms",
            in_doubt_after_ms,
            "--reconcile-interval-ms",
            "200",
        ]
        .map(String::from)
        .to_vec(),
        database: DATABASE.into(),
        coordinator_port: 0,
        in_process: false,
        tls: None,
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

fn resolve(txid: u64, commit: bool, reason: &str) -> pb::ResolveRequest {
    pb::ResolveRequest {
        txid,
        commit,
        reason: reason.into(),
        operator: "alice".into(),
    }
}

async fn in_doubt(client: &mut CoordinatorClient<Channel>) -> Result<pb::ListInDoubtResponse> {
    Ok(client
        .list_in_doubt(pb::ListInDoubtRequest::default())
        .await?
        .into_inner())
}

#[tokio::test]
async fn a_prepared_branch_is_listed_with_its_locks_and_resolved_by_hand() -> Result<()> {
    let t = start("500").await?;
    let mut client = t.client().await?;
    // Shard 2 prepares but its vote never arrives: the transaction stays in `preparing`, with
    // branches prepared (and locks held) on every shard.
    let mut s2 = AdminClient::connect(t.cluster.participants[2].endpoint()).await?;
    s2.set_failpoint(pb::SetFailpointRequest {
        name: "participant::before-prepare-reply".into(),
        actions: "pause".into(),
    })
    .await?;
    let txid = begin(&mut client).await?;
    for shard in 0..3 {
        execute(
            &mut client,
            txid,
            &t.shard(shard),
            "INSERT INTO kv (k, v) VALUES ($1, $2)",
            vec![int(1), text("in doubt")],
        )
        .await?;
    }
    let mut committer = client.clone();
    let commit = tokio::spawn(async move {
        committer
            .commit(pb::CommitRequest {
                txid,
                wait_for_apply: false,
            })
            .await
    });
    let coordinator = client.info(pb::InfoRequest {}).await?.into_inner().coordinator_id;
    let gid = format!("treaty:{coordinator}:{txid}");
    eventually("the branch prepared on all three shards", WITHIN, || async {
        let listed = in_doubt(&mut t.client().await?).await?;
        Ok(listed.branches.iter().filter(|b| b.gid == gid).count() == 3)
    })
    .await?;

    let listed = in_doubt(&mut client).await?;
    assert!(listed.unreachable.is_empty(), "{listed:?}");
    let branch = listed
        .branches
        .iter()
        .find(|b| b.gid == gid && b.shard == t.shard(0))
        .context("shard 0's branch is listed")?;
    assert_eq!(branch.txid, txid);
    assert!(branch.prepared_at_ms > 0, "{branch:?}");
    assert!(branch.coordinator_decision.contains("in progress"), "{branch:?}");
    assert!(
        branch
            .locks
            .iter()
            .any(|l| l.relation == "kv" && l.mode == "RowExclusiveLock" && l.granted),
        "the insert holds a lock on kv: {:?}",
        branch.locks
    );

    // A reason is required; a commit cannot be forced while the votes are still being collected.
    let status = client.resolve(resolve(txid, false, "  ")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let status = client
        .resolve(resolve(txid, true, "ops ticket 7"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("in flight"), "{status:?}");

    let resolved = client
        .resolve(resolve(txid, false, "ops ticket 7: shard 2 stuck"))
        .await?
        .into_inner();
    assert!(resolved.recorded, "{resolved:?}");
    assert_eq!(resolved.decision, "ABORT");
    let outcome = commit.await??.into_inner();
    assert_eq!(outcome.kind, pb::OutcomeKind::Aborted as i32, "{outcome:?}");
    assert_eq!(
        outcome.abort.as_ref().map(|a| a.cause),
        Some(pb::AbortCause::Heuristic as i32),
        "{outcome:?}"
    );

    // Release shard 2's paused reply; every branch is rolled back and the rows are gone.
    s2.clear_failpoints(pb::ClearFailpointsRequest {}).await?;
    eventually("nothing prepared anywhere", WITHIN, || async {
        Ok(t.prepared_everywhere().await? == 0)
    })
    .await?;
    for shard in 0..3 {
        assert!(t.kv(shard).await?.is_empty(), "shard {shard}");
    }
    assert!(in_doubt(&mut client).await?.branches.is_empty());

    let info = client
        .get_transaction(pb::GetTransactionRequest { txid })
        .await?
        .into_inner();
    let heuristic = info.heuristic.context("the heuristic is shown")?;
    assert!(!heuristic.commit);
    assert_eq!(heuristic.operator, "alice");
    assert_eq!(heuristic.reason, "ops ticket 7: shard 2 stuck");
    assert!(heuristic.decided_at_ms > 0);

    // The same decision again is answered without a new record; the opposite one is refused.
    let again = client.resolve(resolve(txid, false, "again")).await?.into_inner();
    assert!(!again.recorded, "{again:?}");
    let status = client
        .resolve(resolve(txid, true, "changed my mind"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("heuristic ABORT by alice"),
        "{status:?}"
    );

    // A transaction whose commit the log holds cannot be aborted by hand.
    let committed_txn = client
        .submit(submit(vec![
            insert(&t.shard(0), 2, "a"),
            insert(&t.shard(1), 2, "b"),
        ]))
        .await?
        .into_inner();
    assert!(committed(&committed_txn.outcome), "{committed_txn:?}");
    let committed_txid = committed_txn.outcome.map(|o| o.txid).unwrap_or_default();
    let status = client
        .resolve(resolve(committed_txid, false, "wrong txid"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("already holds COMMIT (logged at"),
        "{status:?}"
    );
    assert!(
        status.message().contains("refusing heuristic ABORT"),
        "{status:?}"
    );
    Ok(())
}

/// A branch the coordinator has no record of, prepared on one shard only: the coordinator cannot
/// tell whether the other shards were part of the transaction and rolled theirs back, so a
/// heuristic COMMIT is refused; ABORT rolls it back.
#[tokio::test]
async fn an_untracked_branch_missing_on_some_shards_cannot_be_committed_by_hand() -> Result<()> {
    // Participants never ask about it on their own during the test, so the coordinator has not
    // answered ABORT for it by presumption: the refusal below is the missing shards' doing.
    let mut t = start("600000").await?;
    // A restart moves the coordinator's next txid past the block reserved by the first Begin:
    // txid 5 below it was never tracked, as after a restart that forgot an unlogged abort.
    begin(&mut t.client().await?).await?;
    t.cluster.coordinator.restart().await?;
    let mut client = t.client().await?;
    let coordinator = client.info(pb::InfoRequest {}).await?.into_inner().coordinator_id;
    let txid = 5u64;
    let gid = format!("treaty:{coordinator}:{txid}");
    // Prepared under shard 0's branch GID, as its participant would have.
    let prepared_as = format!("{gid}:{}", t.shard(0));
    t.sql(
        0,
        &format!("BEGIN; INSERT INTO kv (k, v) VALUES (9, 'orphan'); PREPARE TRANSACTION '{prepared_as}'"),
    )
    .await?;
    let listed = in_doubt(&mut client).await?;
    let branch = listed
        .branches
        .iter()
        .find(|b| b.gid == gid)
        .context("the orphan branch is listed")?;
    assert!(
        branch.coordinator_decision.contains("presumed abort"),
        "{branch:?}"
    );

    let status = client
        .resolve(resolve(txid, true, "looks complete to me"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("do not hold its branch") && status.message().contains("half-commit"),
        "{status:?}"
    );
    assert_eq!(
        t.prepared(0).await?,
        vec![prepared_as],
        "the refusal changed nothing"
    );

    let resolved = client
        .resolve(resolve(txid, false, "orphan from a lost run"))
        .await?
        .into_inner();
    assert!(resolved.recorded, "{resolved:?}");
    eventually("the orphan rolled back", WITHIN, || async {
        Ok(t.prepared_everywhere().await? == 0)
    })
    .await?;
    assert!(t.kv(0).await?.is_empty());
    Ok(())
}
