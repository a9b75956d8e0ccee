//! No client can hurt another (issue 17, item 5): bounded options, per-client limits, statement
//! cancellation, exact parameter counts, and the status code and `treaty-retryable` in agreement.
//! A client is its source address here, so a second client is a socket bound to 127.0.0.2.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use treaty_proto::pb;
use treaty_proto::pb::coordinator_client::CoordinatorClient;

use crate::fixture::*;

/// A client whose connection comes from `source` (a loopback address).
async fn client_from(t: &TestCluster, source: [u8; 4]) -> Result<CoordinatorClient<Channel>> {
    let channel = Endpoint::from_shared(t.cluster.client_endpoint())?
        .local_address(Some(IpAddr::from(source)))
        .connect()
        .await
        .with_context(|| format!("connecting from {source:?}"))?;
    Ok(CoordinatorClient::new(channel))
}

fn retryable_flag(status: &tonic::Status) -> Option<String> {
    status
        .metadata()
        .get("treaty-retryable")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn assert_refused(status: &tonic::Status, code: Code, needles: &[&str]) {
    assert_eq!(status.code(), code, "{status:?}");
    for needle in needles {
        assert!(
            status.message().contains(needle),
            "{:?} should mention {needle:?}",
            status.message()
        );
    }
}

async fn active_transactions(client: &mut CoordinatorClient<Channel>) -> Result<usize> {
    Ok(client
        .list_transactions(pb::ListTransactionsRequest {
            filter: pb::ListFilter::Active as i32,
            limit: 0,
        })
        .await?
        .into_inner()
        .transactions
        .len())
}

#[tokio::test]
async fn past_the_per_client_limit_begin_is_refused_and_other_clients_keep_working() -> Result<()> {
    const LIMIT: usize = 4;
    let t = TestCluster::start(Options {
        coordinator_args: vec!["--max-open-transactions-per-client".into(), LIMIT.to_string()],
        ..Options::default()
    })
    .await?;
    let mut greedy = client_from(&t, [127, 0, 0, 1]).await?;
    let mut other = client_from(&t, [127, 0, 0, 2]).await?;

    let mut open = Vec::new();
    for _ in 0..LIMIT {
        open.push(begin(&mut greedy).await?);
    }
    for _ in 0..3 {
        let refused = greedy
            .begin(pb::BeginRequest { options: None })
            .await
            .expect_err("over the limit");
        assert_refused(
            &refused,
            Code::ResourceExhausted,
            &["--max-open-transactions-per-client", &format!("is {LIMIT}")],
        );
        let refused = greedy
            .submit(three_inserts(&t, 99))
            .await
            .expect_err("a submit opens a transaction too");
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    }
    // Nothing was left open by the refusals.
    assert_eq!(active_transactions(&mut greedy).await?, LIMIT);

    // Meanwhile another client opens and commits as many as it likes (bounded here).
    for k in 0..(2 * LIMIT as i64) {
        let response = other.submit(three_inserts(&t, k)).await?.into_inner();
        assert!(committed(&response.outcome), "{response:?}");
    }
    for _ in 0..LIMIT {
        let txid = begin(&mut other).await?;
        other.rollback(pb::RollbackRequest { txid }).await?;
    }

    // Once the greedy client's transactions end, it may open transactions again.
    for txid in open {
        greedy.rollback(pb::RollbackRequest { txid }).await?;
    }
    for _ in 0..LIMIT {
        let txid = begin(&mut greedy).await?;
        greedy.rollback(pb::RollbackRequest { txid }).await?;
    }
    let response = greedy.submit(three_inserts(&t, 100)).await?.into_inner();
    assert!(committed(&response.outcome), "{response:?}");
    Ok(())
}

#[tokio::test]
async fn a_timeout_over_its_maximum_is_refused_at_begin_and_opens_nothing() -> Result<()> {
    let t = TestCluster::start(Options::default()).await?;
    let mut client = t.client().await?;
    let next_txid = |info: pb::InfoResponse| info.next_txid;
    let before = next_txid(client.info(pb::InfoRequest {}).await?.into_inner());

    let endless = |timeout_ms, idle_timeout_ms| pb::TransactionOptions {
        timeout_ms,
        idle_timeout_ms,
        ..pb::TransactionOptions::default()
    };
    let refused = client
        .begin(pb::BeginRequest {
            options: Some(endless(u64::MAX, 0)),
        })
        .await
        .expect_err("2^64-1 ms is over the maximum");
    assert_refused(
        &refused,
        Code::InvalidArgument,
        &[
            "timeout_ms 18446744073709551615",
            "maximum of 3600000 ms",
            "--max-timeout-ms",
        ],
    );
    let refused = client
        .begin(pb::BeginRequest {
            options: Some(endless(0, u64::MAX)),
        })
        .await
        .expect_err("2^64-1 ms is over the maximum");
    assert_refused(
        &refused,
        Code::InvalidArgument,
        &["idle_timeout_ms 18446744073709551615", "--max-idle-timeout-ms"],
    );
    let mut request = three_inserts(&t, 1);
    request.options = Some(endless(u64::MAX, u64::MAX));
    let refused = client
        .submit(request)
        .await
        .expect_err("the same bound on Submit");
    assert_refused(
        &refused,
        Code::InvalidArgument,
        &["timeout_ms 18446744073709551615"],
    );

    assert_eq!(active_transactions(&mut client).await?, 0);
    let after = next_txid(client.info(pb::InfoRequest {}).await?.into_inner());
    assert_eq!(before, after, "a refused Begin takes no txid");

    // The maximum itself is allowed.
    let txid = client
        .begin(pb::BeginRequest {
            options: Some(endless(3_600_000, 3_600_000)),
        })
        .await?
        .into_inner()
        .txid;
    client.rollback(pb::RollbackRequest { txid }).await?;
    Ok(())
}

/// Statements on shard 0 still running `pg_sleep(600)` (the poller's own query excluded).
async fn sleeping_backends(t: &TestCluster) -> Result<i64> {
    t.count(
        0,
        "SELECT count(*) FROM pg_stat_activity \
         WHERE state = 'active' AND query LIKE '%pg_sleep(600)%' AND pid <> pg_backend_pid()",
    )
    .await
}

#[tokio::test]
async fn a_client_deadline_cancels_its_statement_in_postgres() -> Result<()> {
    let t = TestCluster::start(Options::default()).await?;
    let mut client = t.client().await?;
    let s0 = t.shard(0);
    let txid = begin(&mut client).await?;
    let mut request = tonic::Request::new(pb::ExecuteRequest {
        txid,
        shard: s0.clone(),
        sql: "SELECT pg_sleep(600)".into(),
        params: vec![],
        last: false,
    });
    request.set_timeout(Duration::from_secs(2));
    let status = client
        .execute(request)
        .await
        .expect_err("the statement cannot finish within the deadline");
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );

    // Without the cancel the backend sleeps on until the transaction's statement timeout (60 s by
    // default); with it the statement ends about when the call is dropped. The poll's bound is
    // generous for a loaded machine and still far under that timeout, so a broken cancel fails.
    eventually(
        "the sleeping statement to be cancelled",
        Duration::from_secs(15),
        || async { Ok(sleeping_backends(&t).await? == 0) },
    )
    .await?;

    // The cancelled statement aborted the transaction, and says why.
    eventually("the transaction to abort", Duration::from_secs(10), || {
        let mut client = client.clone();
        async move {
            let found = client
                .get_transaction(pb::GetTransactionRequest { txid })
                .await?
                .into_inner();
            Ok(found.state == pb::TransactionState::Aborted as i32)
        }
    })
    .await?;
    let info = client
        .get_transaction(pb::GetTransactionRequest { txid })
        .await?
        .into_inner();
    let abort = info.outcome.and_then(|o| o.abort).context("abort reason")?;
    assert!(abort.message.contains("cancelled its call"), "{abort:?}");
    // The shard is usable by the next transaction at once.
    let response = client.submit(three_inserts(&t, 1)).await?.into_inner();
    assert!(committed(&response.outcome), "{response:?}");
    Ok(())
}

#[tokio::test]
async fn a_parameter_count_mismatch_is_invalid_and_not_retryable() -> Result<()> {
    let t = TestCluster::start(Options::default()).await?;
    let mut client = t.client().await?;
    let s0 = t.shard(0);
    let txid = begin(&mut client).await?;
    let sql = "SELECT $1::bigint + $2::bigint";
    for (given, params) in [(3, vec![int(1), int(2), int(3)]), (1, vec![int(1)]), (0, vec![])] {
        let status = execute(&mut client, txid, &s0, sql, params)
            .await
            .expect_err("the count must match");
        assert_refused(
            &status,
            Code::InvalidArgument,
            &["expects 2 parameters", &format!("but {given} were given")],
        );
        assert_eq!(retryable_flag(&status).as_deref(), Some("false"), "{status:?}");
    }
    let status = execute(&mut client, txid, &s0, "SELECT 1", vec![int(1)])
        .await
        .expect_err("no placeholder, one parameter");
    assert_refused(&status, Code::InvalidArgument, &["expects 0 parameters"]);
    // A placeholder inside a literal is not one.
    let result = execute(&mut client, txid, &s0, "SELECT '$2', $1::bigint", vec![int(7)]).await?;
    assert_eq!(result.rows.len(), 1);
    // The same in a submit, naming the op; nothing runs.
    let mut op = insert(&s0, 5, "v");
    op.params.push(int(3));
    let status = client
        .submit(submit(vec![insert(&t.shard(1), 5, "v"), op]))
        .await
        .expect_err("op 1 has three parameters for two placeholders");
    assert_refused(&status, Code::InvalidArgument, &["op 1", "but 3 were given"]);
    assert_eq!(retryable_flag(&status).as_deref(), Some("false"));
    assert_eq!(t.count(1, "SELECT count(*) FROM kv").await?, 0);
    client.rollback(pb::RollbackRequest { txid }).await?;
    Ok(())
}

#[tokio::test]
async fn aborted_means_retryable_and_other_sql_errors_say_not_retryable() -> Result<()> {
    let t = TestCluster::start(Options::default()).await?;
    let mut client = t.client().await?;
    let s0 = t.shard(0);
    t.sql(0, "INSERT INTO kv VALUES (1, 'locked')").await?;

    // A lock timeout (55P03) is retryable: ABORTED, treaty-retryable true.
    let mut holder = t.cluster.pgs[0].connect(DATABASE).await?;
    sqlx::raw_sql("BEGIN; SELECT * FROM kv WHERE k = 1 FOR UPDATE")
        .execute(&mut holder)
        .await?;
    let txid = client
        .begin(pb::BeginRequest {
            options: Some(pb::TransactionOptions {
                lock_timeout_ms: 200,
                ..pb::TransactionOptions::default()
            }),
        })
        .await?
        .into_inner()
        .txid;
    let status = execute(
        &mut client,
        txid,
        &s0,
        "UPDATE kv SET v = 'x' WHERE k = 1",
        vec![],
    )
    .await
    .expect_err("the row is locked past the lock timeout");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert_eq!(retryable_flag(&status).as_deref(), Some("true"), "{status:?}");
    let sqlstate = status
        .metadata()
        .get("treaty-sqlstate")
        .and_then(|v| v.to_str().ok());
    assert_eq!(sqlstate, Some("55P03"), "{status:?}");
    sqlx::raw_sql("ROLLBACK").execute(&mut holder).await?;

    // An exception the client's own SQL raises is not retryable: FAILED_PRECONDITION, false.
    let txid = begin(&mut client).await?;
    let status = execute(
        &mut client,
        txid,
        &s0,
        "DO $$BEGIN RAISE EXCEPTION 'refused by the procedure'; END$$",
        vec![],
    )
    .await
    .expect_err("the DO block raises");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(retryable_flag(&status).as_deref(), Some("false"), "{status:?}");
    let sqlstate = status
        .metadata()
        .get("treaty-sqlstate")
        .and_then(|v| v.to_str().ok());
    assert_eq!(sqlstate, Some("P0001"), "{status:?}");
    // The transaction's outcome says the same.
    let outcome = client
        .get_transaction(pb::GetTransactionRequest { txid })
        .await?
        .into_inner()
        .outcome;
    if let Some(abort) = outcome.and_then(|o| o.abort) {
        assert!(!abort.retryable, "{abort:?}");
    }
    Ok(())
}

#[tokio::test]
async fn a_request_over_the_size_limit_is_resource_exhausted_and_the_client_goes_on() -> Result<()> {
    const LIMIT: usize = 64 * 1024;
    let t = TestCluster::start(Options {
        coordinator_args: vec!["--max-request-bytes".into(), LIMIT.to_string()],
        ..Options::default()
    })
    .await?;
    let mut client = t.client().await?;
    let s0 = t.shard(0);
    let txid = begin(&mut client).await?;
    // Under the 1 MiB SQL cap, over the request limit.
    let big = format!("SELECT '{}'", "x".repeat(2 * LIMIT));
    let status = execute(&mut client, txid, &s0, &big, vec![])
        .await
        .expect_err("over --max-request-bytes");
    assert_refused(
        &status,
        Code::ResourceExhausted,
        &["--max-request-bytes", &LIMIT.to_string()],
    );
    // Refused before it was read: the transaction and the connection carry on.
    let result = execute(&mut client, txid, &s0, "SELECT 1", vec![]).await?;
    assert_eq!(result.rows.len(), 1);
    let outcome = client
        .commit(pb::CommitRequest {
            txid,
            wait_for_apply: false,
        })
        .await?
        .into_inner();
    assert!(committed(&Some(outcome)), "the transaction survives the refusal");
    Ok(())
}
