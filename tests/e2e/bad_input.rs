//! Bad input gets the right gRPC status and a message naming the problem, and loses nothing.

use anyhow::Result;
use tonic::Code;
use treaty_proto::pb;

use crate::fixture::*;

fn assert_status(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("the request must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "{:?} should mention {needle:?}",
        status.message()
    );
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_lose_nothing() -> Result<()> {
    let t = TestCluster::start(Options::default()).await?;
    let mut client = t.client().await?;
    let (s0, s1) = (t.shard(0), t.shard(1));

    // Refused before anything runs: the transaction stays usable.
    let txid = begin(&mut client).await?;
    assert_status(
        execute(&mut client, txid, "nope", "SELECT 1", vec![]).await,
        Code::InvalidArgument,
        "unknown shard",
    );
    let huge = format!("SELECT '{}'", "x".repeat(treaty_proto::MAX_SQL_BYTES));
    assert_status(
        execute(&mut client, txid, &s0, &huge, vec![]).await,
        Code::InvalidArgument,
        "over the limit",
    );
    assert_status(
        execute(
            &mut client,
            txid,
            &s0,
            "SELECT $1",
            vec![pb::Value { kind: None }],
        )
        .await,
        Code::InvalidArgument,
        "parameter $1",
    );
    assert_status(
        execute(
            &mut client,
            txid,
            &s0,
            "SELECT $1",
            vec![pb::Value {
                kind: Some(pb::value::Kind::Numeric("1,5".into())),
            }],
        )
        .await,
        Code::InvalidArgument,
        "not a decimal",
    );
    execute(
        &mut client,
        txid,
        &s0,
        "INSERT INTO kv VALUES (1, 'kept')",
        vec![],
    )
    .await?;
    execute(
        &mut client,
        txid,
        &s1,
        "INSERT INTO kv VALUES (1, 'kept')",
        vec![],
    )
    .await?;
    let outcome = client
        .commit(pb::CommitRequest {
            txid,
            wait_for_apply: true,
        })
        .await?
        .into_inner();
    assert_eq!(outcome.kind, pb::OutcomeKind::Committed as i32);
    assert_eq!(t.kv(0).await?, vec![(1, "kept".to_owned())]);

    // Unknown and finished transactions.
    assert_status(
        execute(&mut client, 999_999_999, &s0, "SELECT 1", vec![]).await,
        Code::NotFound,
        "999999999",
    );
    assert_status(
        execute(&mut client, txid, &s0, "SELECT 1", vec![]).await,
        Code::FailedPrecondition,
        "already committed",
    );
    assert_status(
        client
            .get_transaction(pb::GetTransactionRequest { txid: 999_999_999 })
            .await,
        Code::NotFound,
        "unknown",
    );

    // Parameters of the wrong count or type are refused by PostgreSQL with its SQLSTATE.
    let txid = begin(&mut client).await?;
    let wrong_count = execute(
        &mut client,
        txid,
        &s0,
        "INSERT INTO kv VALUES ($1, $2)",
        vec![int(5)],
    )
    .await;
    let status = wrong_count.expect_err("wrong parameter count");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("parameters"), "{}", status.message());
    let txid = begin(&mut client).await?;
    let wrong_type = execute(
        &mut client,
        txid,
        &s0,
        "SELECT v FROM kv WHERE k = $1",
        vec![text("one")],
    )
    .await;
    let status = wrong_type.expect_err("wrong parameter type");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.metadata().get("treaty-sqlstate").is_some(), "{status:?}");

    // Commit after abort, rollback after commit.
    let txid = begin(&mut client).await?;
    execute(
        &mut client,
        txid,
        &s0,
        "INSERT INTO kv VALUES (2, 'gone')",
        vec![],
    )
    .await?;
    client.rollback(pb::RollbackRequest { txid }).await?;
    assert_status(
        client
            .commit(pb::CommitRequest {
                txid,
                wait_for_apply: false,
            })
            .await,
        Code::FailedPrecondition,
        "already aborted",
    );
    let done = client
        .submit(submit(vec![insert(&s0, 3, "x")]))
        .await?
        .into_inner()
        .outcome
        .unwrap()
        .txid;
    assert_status(
        client.rollback(pb::RollbackRequest { txid: done }).await,
        Code::FailedPrecondition,
        "already committed",
    );

    // Submits.
    assert_status(
        client.submit(submit(vec![])).await,
        Code::InvalidArgument,
        "ops is empty",
    );
    assert_status(
        client
            .submit(submit(vec![insert(&s0, 9, "x"), insert("nope", 9, "x")]))
            .await,
        Code::InvalidArgument,
        "op 1",
    );
    assert!(
        !t.kv(0).await?.iter().any(|(k, _)| *k == 9),
        "a refused submit ran nothing"
    );

    // Statements that would end the branch's own transaction.
    let txid = begin(&mut client).await?;
    assert_status(
        execute(&mut client, txid, &s0, "COMMIT", vec![]).await,
        Code::InvalidArgument,
        "COMMIT",
    );
    let txid = begin(&mut client).await?;
    assert_status(
        execute(
            &mut client,
            txid,
            &s0,
            "SELECT 1; PREPARE TRANSACTION 'x'",
            vec![],
        )
        .await,
        Code::InvalidArgument,
        "PREPARE",
    );

    // Options.
    let three_phase = pb::TransactionOptions {
        protocol: pb::Protocol::ThreePhase as i32,
        ..Default::default()
    };
    // Three-phase commit is accepted at Begin (its participant RPCs are exercised elsewhere).
    let txid = client
        .begin(pb::BeginRequest {
            options: Some(three_phase),
        })
        .await?
        .into_inner()
        .txid;
    let info = client
        .get_transaction(pb::GetTransactionRequest { txid })
        .await?
        .into_inner();
    assert_eq!(info.protocol, pb::Protocol::ThreePhase as i32, "{info:?}");
    client.rollback(pb::RollbackRequest { txid }).await?;
    let bad_protocol = pb::TransactionOptions {
        protocol: 42,
        ..Default::default()
    };
    assert_status(
        client
            .begin(pb::BeginRequest {
                options: Some(bad_protocol),
            })
            .await,
        Code::InvalidArgument,
        "protocol",
    );
    Ok(())
}
