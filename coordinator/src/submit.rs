//! One-shot cross-shard submits: every op is checked before anything runs, ops on one shard run in
//! order, different shards run concurrently, and the transaction commits only if every op ran and
//! met its `expect_rows`.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::join_all;
use treaty_commit_protocol::answers;
use treaty_commit_protocol::store::DecisionStore;
use treaty_commit_protocol::transport::{LinkError, ParticipantTransport, StatementResult};
use treaty_proto::{ApiError, ShardName, TxId, Value};

use crate::driver::{Engine, TxnOptions};
use crate::protocol::{AbortCause, AbortReason, Outcome};

/// One op of a submit, its parameters already converted from the wire.
#[derive(Debug, Clone)]
pub struct Op {
    pub shard: String,
    pub sql: String,
    pub params: Vec<Value>,
    pub expect_rows: Option<u64>,
}

/// An op that passed validation.
struct CheckedOp {
    index: usize,
    shard: ShardName,
    sql: String,
    params: Vec<Value>,
    expect_rows: Option<u64>,
}

/// Validates every op up front so a bad request runs nothing.
fn check_ops<S: DecisionStore, T: ParticipantTransport>(
    engine: &Engine<S, T>,
    ops: Vec<Op>,
) -> Result<BTreeMap<ShardName, Vec<CheckedOp>>, ApiError> {
    if ops.is_empty() {
        return Err(ApiError::InvalidArgument(
            "ops is empty: a submit needs at least one op".into(),
        ));
    }
    let mut by_shard: BTreeMap<ShardName, Vec<CheckedOp>> = BTreeMap::new();
    for (index, op) in ops.into_iter().enumerate() {
        let in_op = |e: ApiError| ApiError::InvalidArgument(format!("op {index}: {e}"));
        let shard = engine.shard(&op.shard).map_err(in_op)?;
        treaty_proto::validate_statement(&op.sql, &op.params).map_err(in_op)?;
        by_shard.entry(shard.clone()).or_default().push(CheckedOp {
            index,
            shard,
            sql: op.sql,
            params: op.params,
            expect_rows: op.expect_rows,
        });
    }
    Ok(by_shard)
}

/// Runs one shard's ops in order; stops at the first failure. With `vote_with_last` (every shard
/// of the transaction), the participant votes together with the last op (the transaction spans
/// several shards and commits next unless something fails).
async fn run_shard<S: DecisionStore, T: ParticipantTransport>(
    engine: &Arc<Engine<S, T>>,
    txid: TxId,
    ops: Vec<CheckedOp>,
    vote_with_last: Option<&[ShardName]>,
) -> Result<Vec<(usize, StatementResult)>, AbortReason> {
    let mut results = Vec::with_capacity(ops.len());
    let last = ops.len().saturating_sub(1);
    for (position, op) in ops.into_iter().enumerate() {
        let executed = if let Some(shards) = vote_with_last
            && position == last
        {
            engine
                .execute_and_prepare(txid, op.shard.as_str(), op.sql, op.params, shards)
                .await
        } else {
            engine.execute(txid, op.shard.as_str(), op.sql, op.params).await
        };
        let result = executed.map_err(|error| match error {
            ApiError::Sql(sql) => answers::execute_failed(
                &op.shard,
                &LinkError::Sql {
                    retryable: sql.retryable(),
                    sqlstate: sql.sqlstate,
                    message: sql.message,
                },
            ),
            other => AbortReason::new(AbortCause::StatementFailed, format!("op {}: {other}", op.index))
                .on_shard(&op.shard),
        })?;
        if let Some(expected) = op.expect_rows
            && result.rows_affected != expected
        {
            return Err(AbortReason::new(
                AbortCause::ExpectRows,
                format!(
                    "op {} affected {} rows, expected {expected}",
                    op.index, result.rows_affected
                ),
            )
            .on_shard(&op.shard));
        }
        results.push((op.index, result));
    }
    Ok(results)
}

/// Aborts after an op failed. A failed statement already aborted the transaction; the first
/// reason recorded there is the one the client hears. An expect_rows miss aborts it here.
async fn abort_with<S: DecisionStore, T: ParticipantTransport>(
    engine: &Arc<Engine<S, T>>,
    txid: TxId,
    reason: AbortReason,
) -> Result<Outcome, ApiError> {
    Ok(match engine.rollback(txid, reason.clone()).await {
        Ok(outcome) => outcome,
        Err(_) => engine
            .handle(txid)?
            .machine()
            .outcome()
            .cloned()
            .unwrap_or(Outcome::Aborted(reason)),
    })
}

pub async fn submit<S: DecisionStore, T: ParticipantTransport>(
    engine: &Arc<Engine<S, T>>,
    ops: Vec<Op>,
    options: TxnOptions,
    wait_for_apply: bool,
) -> Result<(TxId, Outcome, Vec<StatementResult>), ApiError> {
    let by_shard = check_ops(engine, ops)?;
    let op_count = by_shard.values().map(Vec::len).sum();
    let txid = engine.begin(options).await?;
    if by_shard.len() == 1 {
        let ops = by_shard.into_values().next().unwrap_or_default();
        return submit_one_shard(engine, txid, ops, wait_for_apply).await;
    }
    // Several shards: each votes together with its last statement; a 3PC vote names every shard
    // of the transaction, all known here. With the decision in a branch, the shard of the first op
    // is the decision branch: it runs first (its first statement enlists it first) and does not
    // vote, since it commits the decision instead of preparing.
    let shards: Vec<ShardName> = by_shard.keys().cloned().collect();
    let in_branch = engine.decides_in_branch(txid);
    let mut groups: Vec<Vec<CheckedOp>> = by_shard.into_values().collect();
    groups.sort_by_key(|ops| ops.first().map_or(usize::MAX, |op| op.index));
    let runs = join_all(groups.into_iter().enumerate().map(|(at, ops)| {
        let votes = !(in_branch && at == 0);
        run_shard(engine, txid, ops, votes.then_some(shards.as_slice()))
    }))
    .await;
    let mut results: Vec<(usize, StatementResult)> = Vec::with_capacity(op_count);
    let mut failure = None;
    for run in runs {
        match run {
            Ok(done) => results.extend(done),
            Err(reason) => failure = failure.or(Some(reason)),
        }
    }
    if let Some(reason) = failure {
        return Ok((txid, abort_with(engine, txid, reason).await?, Vec::new()));
    }
    let outcome = engine.commit(txid, wait_for_apply).await?;
    results.sort_by_key(|(index, _)| *index);
    Ok((txid, outcome, results.into_iter().map(|(_, r)| r).collect()))
}

/// One shard commits in one phase: the ops before the last run as usual, and the last one goes
/// with the COMMIT in a single participant call.
async fn submit_one_shard<S: DecisionStore, T: ParticipantTransport>(
    engine: &Arc<Engine<S, T>>,
    txid: TxId,
    mut ops: Vec<CheckedOp>,
    wait_for_apply: bool,
) -> Result<(TxId, Outcome, Vec<StatementResult>), ApiError> {
    let Some(last) = ops.pop() else {
        return Err(ApiError::InvalidArgument(
            "ops is empty: a submit needs at least one op".into(),
        ));
    };
    let mut results = match run_shard(engine, txid, ops, None).await {
        Ok(results) => results,
        Err(reason) => return Ok((txid, abort_with(engine, txid, reason).await?, Vec::new())),
    };
    let (outcome, result) = engine
        .commit_with_statement(
            txid,
            last.shard.as_str(),
            last.sql,
            last.params,
            last.expect_rows,
            last.index,
            wait_for_apply,
        )
        .await?;
    if let Some(result) = result {
        results.push((last.index, result));
    }
    Ok((txid, outcome, results.into_iter().map(|(_, r)| r).collect()))
}
