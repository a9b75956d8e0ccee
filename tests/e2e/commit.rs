//! Commit and abort across shards as a client sees them.

use std::time::Duration;

use anyhow::{Context, Result};
use treaty_proto::pb;

use crate::fixture::*;

#[tokio::test]
async fn commit_across_three_shards_is_visible_on_all() -> Result<()> {
    let t = TestCluster::start(Options::default()).await?;
    let mut client = t.client().await?;
    let ops = (0..3).map(|i| insert(&t.shard(i), i as i64, "one")).collect();
    let response = client.submit(submit(ops)).await?.into_inner();
    assert!(committed(&response.outcome), "{response:?}");
    assert_eq!(response.results.len(), 3);
    for shard in 0..3 {
        assert_eq!(
            t.kv(shard).await?,
            vec![(shard as i64, "one".to_owned())],
            "shard {shard}"
        );
    }
    assert_eq!(t.prepared_everywhere().await?, 0);

    // Interactive: begin, execute on each shard, read back inside the transaction, commit.
    let txid = begin(&mut client).await?;
    for shard in 0..3 {
        execute(
            &mut client,
            txid,
            &t.shard(shard),
            "UPDATE kv SET v = $1",
            vec![text("two")],
        )
        .await?;
    }
    let read = execute(&mut client, txid, &t.shard(1), "SELECT k, v FROM kv", vec![]).await?;
    assert_eq!(
        read.columns.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["k", "v"]
    );
    assert_eq!(read.rows[0].values, vec![int(1), text("two")]);
    let outcome = client
        .commit(pb::CommitRequest {
            txid,
            wait_for_apply: true,
        })
        .await?
        .into_inner();
    assert_eq!(outcome.kind, pb::OutcomeKind::Committed as i32);
    for shard in 0..3 {
        assert_eq!(t.kv(shard).await?[0].1, "two");
    }
    let info = client
        .get_transaction(pb::GetTransactionRequest { txid })
        .await?
        .into_inner();
    assert_eq!(info.state, pb::TransactionState::Committed as i32);
    assert!(
        info.participants
            .iter()
            .all(|p| p.state == pb::ParticipantState::Committed as i32),
        "{info:?}"
    );
    Ok(())
}

#[tokio::test]
async fn statement_error_on_one_shard_aborts_all_with_its_sqlstate() -> Result<()> {
    let t = TestCluster::start(Options::default()).await?;
    let mut client = t.client().await?;
    t.sql(2, "INSERT INTO kv VALUES (7, 'taken')").await?;
    let ops = vec![
        insert(&t.shard(0), 7, "x"),
        insert(&t.shard(1), 7, "x"),
        insert(&t.shard(2), 7, "x"),
    ];
    let response = client.submit(submit(ops)).await?.into_inner();
    let outcome = response.outcome.expect("an outcome");
    assert_eq!(outcome.kind, pb::OutcomeKind::Aborted as i32);
    let reason = outcome.abort.expect("a reason");
    assert_eq!(reason.cause, pb::AbortCause::StatementFailed as i32);
    assert_eq!(reason.shard, t.shard(2));
    assert_eq!(reason.sqlstate, "23505", "unique violation: {reason:?}");
    assert!(reason.message.contains("duplicate key"), "{}", reason.message);
    assert_eq!(t.kv(0).await?, vec![]);
    assert_eq!(t.kv(1).await?, vec![]);
    eventually("no prepared branch left", Duration::from_secs(10), || async {
        Ok(t.prepared_everywhere().await? == 0)
    })
    .await?;

    // Interactive: the failing Execute carries the SQLSTATE, and the transaction is aborted.
    let txid = begin(&mut client).await?;
    execute(
        &mut client,
        txid,
        &t.shard(0),
        "INSERT INTO kv VALUES (1, 'a')",
        vec![],
    )
    .await?;
    let error = execute(
        &mut client,
        txid,
        &t.shard(1),
        "SELECT * FROM missing_table",
        vec![],
    )
    .await
    .unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    assert_eq!(error.metadata().get("treaty-sqlstate").unwrap(), "42P01");
    assert!(error.message().contains("missing_table"), "{}", error.message());
    let commit = client
        .commit(pb::CommitRequest {
            txid,
            wait_for_apply: false,
        })
        .await
        .unwrap_err();
    assert_eq!(commit.code(), tonic::Code::FailedPrecondition);
    assert!(commit.message().contains("aborted"), "{}", commit.message());
    eventually("shard 0 rolled back", Duration::from_secs(10), || async {
        Ok(t.kv(0).await?.is_empty())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn expect_rows_not_met_aborts_all() -> Result<()> {
    let t = TestCluster::start(Options::default()).await?;
    let mut client = t.client().await?;
    let mut update = insert(&t.shard(1), 0, "");
    update.sql = "UPDATE kv SET v = 'x' WHERE k = $1 AND v = $2".into();
    let ops = vec![insert(&t.shard(0), 1, "a"), update];
    let response = client.submit(submit(ops)).await?.into_inner();
    let outcome = response.outcome.expect("an outcome");
    assert_eq!(outcome.kind, pb::OutcomeKind::Aborted as i32);
    let reason = outcome.abort.expect("a reason");
    assert_eq!(reason.cause, pb::AbortCause::ExpectRows as i32);
    assert!(reason.message.contains("expected 1"), "{}", reason.message);
    eventually("shard 0 rolled back", Duration::from_secs(10), || async {
        Ok(t.kv(0).await?.is_empty() && t.prepared_everywhere().await? == 0)
    })
    .await?;
    Ok(())
}

/// A submit on one shard sends its last op with the COMMIT (`ExecuteAndCommit`): it commits with
/// the op's result, an `expect_rows` miss rolls it back, and a failing statement aborts it.
#[tokio::test]
async fn single_shard_submits_commit_check_expect_rows_and_abort_on_errors() -> Result<()> {
    let t = TestCluster::start(Options::default()).await?;
    let mut client = t.client().await?;
    let ops = vec![insert(&t.shard(0), 1, "a"), insert(&t.shard(0), 2, "b")];
    let response = client.submit(submit(ops)).await?.into_inner();
    assert!(committed(&response.outcome), "{response:?}");
    assert_eq!(response.results.len(), 2, "{response:?}");
    assert!(
        response.results.iter().all(|r| r.rows_affected == 1),
        "{response:?}"
    );
    assert_eq!(t.kv(0).await?, vec![(1, "a".to_string()), (2, "b".to_string())]);

    let mut update = insert(&t.shard(0), 9, "nobody");
    update.sql = "UPDATE kv SET v = $2 WHERE k = $1".into();
    let ops = vec![insert(&t.shard(0), 3, "c"), update];
    let response = client.submit(submit(ops)).await?.into_inner();
    let outcome = response.outcome.context("an outcome")?;
    assert_eq!(outcome.kind, pb::OutcomeKind::Aborted as i32, "{outcome:?}");
    let reason = outcome.abort.context("a reason")?;
    assert_eq!(reason.cause, pb::AbortCause::ExpectRows as i32, "{reason:?}");
    assert!(
        reason.message.contains("op 1 affected 0 rows, expected 1"),
        "{reason:?}"
    );

    let response = client
        .submit(submit(vec![insert(&t.shard(0), 1, "duplicate")]))
        .await?
        .into_inner();
    let outcome = response.outcome.context("an outcome")?;
    assert_eq!(outcome.kind, pb::OutcomeKind::Aborted as i32, "{outcome:?}");
    assert_eq!(outcome.abort.context("a reason")?.sqlstate, "23505");

    // Neither aborted submit left anything behind.
    assert_eq!(t.kv(0).await?, vec![(1, "a".to_string()), (2, "b".to_string())]);
    assert_eq!(t.prepared_everywhere().await?, 0);
    Ok(())
}

#[tokio::test]
async fn conflicting_transactions_do_not_hang_past_the_lock_timeout() -> Result<()> {
    let t = TestCluster::start(Options::default()).await?;
    let mut client = t.client().await?;
    t.sql(0, "INSERT INTO kv VALUES (1, 'a')").await?;
    t.sql(1, "INSERT INTO kv VALUES (1, 'a')").await?;
    // The first transaction holds the row lock on shard 0 and stays open.
    let first = begin(&mut client).await?;
    execute(
        &mut client,
        first,
        &t.shard(0),
        "UPDATE kv SET v = 'first' WHERE k = 1",
        vec![],
    )
    .await?;
    // The second wants the same row: it waits for lock_timeout (2 s here) and aborts with a reason.
    let mut update = insert(&t.shard(0), 1, "second");
    update.sql = "UPDATE kv SET v = $2 WHERE k = $1".into();
    let mut other = insert(&t.shard(1), 1, "second");
    other.sql = update.sql.clone();
    let response = tokio::time::timeout(
        Duration::from_secs(30),
        client.submit(submit(vec![update, other])),
    )
    .await
    .expect("the conflicting submit must not hang")?
    .into_inner();
    let outcome = response.outcome.expect("an outcome");
    assert_eq!(outcome.kind, pb::OutcomeKind::Aborted as i32);
    let reason = outcome.abort.expect("a reason");
    assert_eq!(reason.sqlstate, "55P03", "lock_not_available: {reason:?}");
    assert!(reason.retryable);
    // The first still commits.
    let outcome = client
        .commit(pb::CommitRequest {
            txid: first,
            wait_for_apply: true,
        })
        .await?
        .into_inner();
    assert_eq!(outcome.kind, pb::OutcomeKind::Committed as i32);
    assert_eq!(t.kv(0).await?, vec![(1, "first".to_owned())]);
    assert_eq!(t.kv(1).await?, vec![(1, "a".to_owned())]);
    Ok(())
}

#[tokio::test]
async fn rollback_undoes_every_shard_and_single_shard_commits_in_one_phase() -> Result<()> {
    let t = TestCluster::start(Options::default()).await?;
    let mut client = t.client().await?;
    let txid = begin(&mut client).await?;
    execute(
        &mut client,
        txid,
        &t.shard(0),
        "INSERT INTO kv VALUES (1, 'a')",
        vec![],
    )
    .await?;
    execute(
        &mut client,
        txid,
        &t.shard(1),
        "INSERT INTO kv VALUES (1, 'a')",
        vec![],
    )
    .await?;
    let outcome = client.rollback(pb::RollbackRequest { txid }).await?.into_inner();
    assert_eq!(
        outcome.abort.unwrap().cause,
        pb::AbortCause::ClientRollback as i32
    );
    eventually("rolled back", Duration::from_secs(10), || async {
        Ok(t.kv(0).await?.is_empty() && t.kv(1).await?.is_empty())
    })
    .await?;

    let response = client
        .submit(submit(vec![insert(&t.shard(2), 5, "solo")]))
        .await?
        .into_inner();
    assert!(committed(&response.outcome));
    assert_eq!(t.kv(2).await?, vec![(5, "solo".to_owned())]);
    let info = client
        .get_transaction(pb::GetTransactionRequest {
            txid: response.outcome.unwrap().txid,
        })
        .await?
        .into_inner();
    assert_eq!(info.state, pb::TransactionState::Committed as i32);
    Ok(())
}

/// A submit that needs a shard whose participant is down aborts with a reason a client can act
/// on: the participant was unavailable, and running the transaction again may succeed.
#[tokio::test]
async fn a_submit_to_a_shard_that_is_down_aborts_as_retryable() -> Result<()> {
    let mut t = TestCluster::start(Options::default()).await?;
    let mut client = t.client().await?;
    t.cluster.participants[1].kill9()?;
    let ops = vec![insert(&t.shard(0), 7, "x"), insert(&t.shard(1), 7, "x")];
    let response = tokio::time::timeout(Duration::from_secs(60), client.submit(submit(ops)))
        .await
        .context("the submit must not hang on a dead participant")??
        .into_inner();
    let outcome = response.outcome.context("an outcome")?;
    assert_eq!(outcome.kind, pb::OutcomeKind::Aborted as i32, "{outcome:?}");
    let reason = outcome.abort.context("a reason")?;
    assert_eq!(
        reason.cause,
        pb::AbortCause::ParticipantUnavailable as i32,
        "{reason:?}"
    );
    assert_eq!(reason.shard, t.shard(1), "{reason:?}");
    assert!(reason.retryable, "{reason:?}");
    assert!(
        t.kv(0).await?.is_empty(),
        "nothing applied on the shard that was up"
    );
    Ok(())
}

/// An interactive client that marks each shard's last statement (`ExecuteRequest.last`): the
/// branch is prepared with that statement, before the commit is asked for; a later statement on
/// the shard is refused without harming the transaction; the commit then commits everywhere, and a
/// rollback undoes a branch that voted early as well.
#[tokio::test]
async fn a_last_statement_votes_with_its_branch_and_closes_the_shard() -> Result<()> {
    let t = TestCluster::start(Options::default()).await?;
    let client = treaty_client::Client::connect([t.cluster.coordinator_endpoint()]).await?;
    let (s0, s1, s2) = (t.shard(0), t.shard(1), t.shard(2));
    let insert = "INSERT INTO kv VALUES ($1, $2)";

    let txn = client.begin(None).await?;
    // The first branch holds the decision (the shard store): it is not prepared early.
    txn.execute_last(&s0, insert, vec![int(1), text("a")]).await?;
    txn.execute_last(&s1, insert, vec![int(1), text("a")]).await?;
    txn.execute(&s2, insert, vec![int(1), text("a")]).await?;
    assert!(t.prepared(0).await?.is_empty(), "the decision branch voted early");
    let early = t.prepared(1).await?;
    assert_eq!(early.len(), 1, "s1 prepared with its last statement: {early:?}");
    assert!(t.prepared(2).await?.is_empty(), "s2 was not marked last");
    let refused = txn
        .execute(&s1, insert, vec![int(2), text("late")])
        .await
        .expect_err("a statement after the last one on s1");
    let message = refused.to_string();
    assert!(
        message.contains("already voted") && message.contains(&s1),
        "{message}"
    );
    assert!(treaty_client::committed(Some(&txn.commit(true).await?)));
    for shard in 0..3 {
        assert_eq!(t.kv(shard).await?, vec![(1, "a".to_owned())], "shard {shard}");
    }
    assert_eq!(t.prepared_everywhere().await?, 0);

    // Rolled back after its early vote: the prepared branch is rolled back too.
    let txn = client.begin(None).await?;
    txn.execute(&s0, insert, vec![int(2), text("b")]).await?;
    txn.execute_last(&s1, insert, vec![int(2), text("b")]).await?;
    assert_eq!(t.prepared(1).await?.len(), 1);
    let outcome = txn.rollback().await?;
    assert_eq!(outcome.kind, pb::OutcomeKind::Aborted as i32, "{outcome:?}");
    eventually(
        "the early-voted branch rolled back",
        Duration::from_secs(10),
        || async { Ok(t.prepared_everywhere().await? == 0) },
    )
    .await?;
    for shard in 0..3 {
        assert_eq!(
            t.kv(shard).await?.len(),
            1,
            "shard {shard} kept only the first row"
        );
    }
    Ok(())
}
