//! Driving Treaty: each transaction is one `Submit` (ops on one shard run in order, shards run
//! concurrently inside the coordinator), or with `--interactive` a `Begin` / `Execute`... /
//! `Commit` conversation. An error is returned as a short reason string for the abort table.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::Channel;
use treaty_proto::pb::coordinator_client::CoordinatorClient;
use treaty_proto::{Protocol, pb};

use super::workload::{Stmt, TxnPlan};

/// Per-request deadline; a transaction slower than this is counted as `rpc/DeadlineExceeded`.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how to run transactions on Treaty.
#[derive(Debug, Clone)]
pub struct TreatyTarget {
    pub endpoint: String,
    pub shard_names: Vec<String>,
    pub protocol: Protocol,
    pub interactive: bool,
    pub lock_timeout_ms: u64,
}

impl TreatyTarget {
    fn options(&self) -> pb::TransactionOptions {
        pb::TransactionOptions {
            protocol: crate::wire_protocol(self.protocol) as i32,
            lock_timeout_ms: self.lock_timeout_ms,
            ..Default::default()
        }
    }

    fn shard(&self, index: usize) -> String {
        self.shard_names.get(index).cloned().unwrap_or_default()
    }
}

/// How a bench client reaches Treaty: its own HTTP/2 connection to a coordinator service, like an
/// independent application server, or the coordinator embedded in this process
/// (`--coordinator embedded`), shared by every client as an application's threads share it.
pub enum TreatyClient {
    Remote(CoordinatorClient<Channel>),
    Embedded(Arc<treaty_coordinator::Embedded>),
}

/// An embedded call under the same deadline a remote one has.
async fn within<T>(call: impl Future<Output = Result<T, tonic::Status>>) -> Result<T, tonic::Status> {
    tokio::time::timeout(REQUEST_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("bench request timeout")))
}

impl TreatyClient {
    async fn submit(&mut self, message: pb::SubmitRequest) -> Result<pb::SubmitResponse, tonic::Status> {
        match self {
            TreatyClient::Remote(client) => Ok(client.submit(request(message)).await?.into_inner()),
            TreatyClient::Embedded(embedded) => within(embedded.submit(message)).await,
        }
    }

    async fn begin(&mut self, options: pb::TransactionOptions) -> Result<u64, tonic::Status> {
        match self {
            TreatyClient::Remote(client) => {
                let message = pb::BeginRequest {
                    options: Some(options),
                };
                Ok(client.begin(request(message)).await?.into_inner().txid)
            }
            TreatyClient::Embedded(embedded) => within(embedded.begin(Some(options))).await,
        }
    }

    async fn execute(&mut self, message: pb::ExecuteRequest) -> Result<pb::ExecuteResult, tonic::Status> {
        match self {
            TreatyClient::Remote(client) => Ok(client.execute(request(message)).await?.into_inner()),
            TreatyClient::Embedded(embedded) => within(embedded.execute(message)).await,
        }
    }

    async fn commit(&mut self, txid: u64) -> Result<pb::Outcome, tonic::Status> {
        match self {
            TreatyClient::Remote(client) => {
                let message = pb::CommitRequest {
                    txid,
                    wait_for_apply: false,
                };
                Ok(client.commit(request(message)).await?.into_inner())
            }
            TreatyClient::Embedded(embedded) => within(embedded.commit(txid, false)).await,
        }
    }

    async fn rollback(&mut self, txid: u64) -> Result<pb::Outcome, tonic::Status> {
        match self {
            TreatyClient::Remote(client) => Ok(client
                .rollback(request(pb::RollbackRequest { txid }))
                .await?
                .into_inner()),
            TreatyClient::Embedded(embedded) => within(embedded.rollback(txid)).await,
        }
    }
}

/// One HTTP/2 connection per client, like independent application servers.
pub async fn connect(endpoint: &str) -> anyhow::Result<CoordinatorClient<Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await?;
    Ok(CoordinatorClient::new(channel))
}

fn int(value: i64) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::Int64(value)),
    }
}

fn op(target: &TreatyTarget, shard: usize, stmt: &Stmt) -> pb::Op {
    pb::Op {
        shard: target.shard(shard),
        sql: stmt.sql.to_string(),
        params: stmt.params.iter().copied().map(int).collect(),
        expect_rows: stmt.expect_rows,
    }
}

fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(REQUEST_TIMEOUT);
    request
}

/// `vote_no`, `statement_failed/55P03`, ...
fn abort_reason(outcome: &pb::Outcome) -> String {
    let Some(abort) = &outcome.abort else {
        return "aborted".into();
    };
    let cause = pb::AbortCause::try_from(abort.cause).map_or("unknown".to_string(), |c| {
        c.as_str_name().trim_start_matches("ABORT_CAUSE_").to_lowercase()
    });
    if abort.sqlstate.is_empty() {
        cause
    } else {
        format!("{cause}/{}", abort.sqlstate)
    }
}

fn rpc_reason(status: &tonic::Status) -> String {
    match status
        .metadata()
        .get("treaty-sqlstate")
        .and_then(|v| v.to_str().ok())
    {
        Some(sqlstate) => format!("statement_failed/{sqlstate}"),
        None => format!("rpc/{:?}", status.code()),
    }
}

fn outcome_result(outcome: Option<pb::Outcome>) -> Result<(), String> {
    let outcome = outcome.unwrap_or_default();
    if outcome.kind == pb::OutcomeKind::Committed as i32 {
        Ok(())
    } else {
        Err(abort_reason(&outcome))
    }
}

/// Runs one transaction; `Err(reason)` when it did not commit.
pub async fn run_txn(client: &mut TreatyClient, target: &TreatyTarget, plan: &TxnPlan) -> Result<(), String> {
    if target.interactive {
        return run_interactive(client, target, plan).await;
    }
    let ops = plan
        .work
        .iter()
        .flat_map(|work| work.stmts.iter().map(|stmt| op(target, work.shard, stmt)))
        .collect();
    let response = client
        .submit(pb::SubmitRequest {
            ops,
            options: Some(target.options()),
            wait_for_apply: false,
        })
        .await
        .map_err(|status| rpc_reason(&status))?;
    outcome_result(response.outcome)
}

async fn run_interactive(
    client: &mut TreatyClient,
    target: &TreatyTarget,
    plan: &TxnPlan,
) -> Result<(), String> {
    let txid = client
        .begin(target.options())
        .await
        .map_err(|status| rpc_reason(&status))?;
    for work in &plan.work {
        for (at, stmt) in work.stmts.iter().enumerate() {
            let result = client
                .execute(pb::ExecuteRequest {
                    txid,
                    shard: target.shard(work.shard),
                    sql: stmt.sql.to_string(),
                    params: stmt.params.iter().copied().map(int).collect(),
                    // Each shard's last statement carries its vote, as a client that knows
                    // its transaction's shape would send it.
                    last: at + 1 == work.stmts.len(),
                })
                .await;
            let reason = match result {
                Ok(result) => match stmt.expect_rows {
                    Some(expected) if result.rows_affected != expected => "expect_rows".to_string(),
                    _ => continue,
                },
                // A failed statement aborted the transaction already; the rollback below is a no-op.
                Err(status) => rpc_reason(&status),
            };
            let _ = client.rollback(txid).await;
            return Err(reason);
        }
    }
    let outcome = client.commit(txid).await.map_err(|status| rpc_reason(&status))?;
    outcome_result(Some(outcome))
}

/// Whether the coordinator accepts transactions with `protocol`: `Err(message)` when it answers
/// FAILED_PRECONDITION or UNIMPLEMENTED (3PC before it is implemented).
pub async fn probe_protocol(endpoint: &str, protocol: Protocol) -> anyhow::Result<Result<(), String>> {
    let mut client = connect(endpoint).await?;
    let begun = client
        .begin(request(pb::BeginRequest {
            options: Some(pb::TransactionOptions {
                protocol: crate::wire_protocol(protocol) as i32,
                ..Default::default()
            }),
        }))
        .await;
    match begun {
        Ok(response) => {
            let txid = response.into_inner().txid;
            let _ = client.rollback(request(pb::RollbackRequest { txid })).await;
            Ok(Ok(()))
        }
        Err(status)
            if matches!(
                status.code(),
                tonic::Code::FailedPrecondition | tonic::Code::Unimplemented | tonic::Code::InvalidArgument
            ) =>
        {
            Ok(Err(status.message().to_string()))
        }
        Err(status) => Err(anyhow::anyhow!("probing the coordinator: {status}")),
    }
}
