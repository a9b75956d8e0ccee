//! The scenario workload: concurrent clients, each running transactions that write one marker
//! row per chosen shard, and recording exactly what the coordinator told it. A transaction is
//! either interactive (Begin, one Execute per statement, Commit) or one-shot (`workload.mode =
//! "submit"`: a single `Submit` carrying every statement, the path whose last statement on each
//! shard votes in the same participant call).
//! A client that cannot reach the coordinator (it is down, or its link is cut) retries with a
//! short backoff, bounded by the scenario's deadline; a transaction abandoned before its commit
//! (a shard was unreachable) is checked like any other and backs off, and its budget slot is
//! handed back (at most `transactions` times).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;
use treaty_proto::pb::coordinator_client::CoordinatorClient;
use treaty_proto::{Protocol, pb};

use super::checker::{Told, marker_op};
use super::spec::Mode;

/// The first marker id of a submitted transaction. A `Submit` allocates its txid inside the
/// coordinator, so its marker rows carry an id the client picks; starting here keeps those ids
/// apart from every coordinator txid, so a marker can never be mistaken for another transaction's.
pub const SUBMIT_MARKER_BASE: u64 = 1 << 48;

/// Shared between the clients and the fault schedule.
#[derive(Default)]
pub struct Progress {
    /// Transactions that reached an outcome (committed, aborted, unknown or abandoned).
    pub finished: AtomicU64,
    pub started: AtomicU64,
    /// Abandoned transactions whose slot in the budget was handed back (at most the budget again).
    pub retried: AtomicU64,
    pub told: Mutex<Told>,
    pub stop: AtomicBool,
    /// Marker ids handed out to submitted transactions (above [`SUBMIT_MARKER_BASE`]).
    submitted: AtomicU64,
}

impl Progress {
    fn record(&self, f: impl FnOnce(&mut Told)) {
        if let Ok(mut told) = self.told.lock() {
            f(&mut told);
        }
        self.finished.fetch_add(1, Ordering::SeqCst);
    }
}

pub struct WorkloadConfig {
    pub endpoint: String,
    pub shards: Vec<String>,
    pub transactions: u64,
    pub concurrency: usize,
    pub shards_per_txn: usize,
    pub seed: u64,
    pub protocol: Protocol,
    pub mode: Mode,
    pub deadline: Instant,
    /// Bank mode: move money between `accounts` accounts (account `a` lives on shard
    /// `a % shards`) besides writing the markers, so conservation can be checked too.
    pub accounts: Option<i64>,
}

/// Runs the workload to completion (all transactions attempted, stop requested, or deadline).
pub async fn run(config: Arc<WorkloadConfig>, progress: Arc<Progress>) {
    let channel = match tonic::transport::Endpoint::from_shared(config.endpoint.clone()) {
        Ok(endpoint) => endpoint
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(15))
            .connect_lazy(),
        Err(_) => return,
    };
    let clients: Vec<_> = (0..config.concurrency)
        .map(|worker| {
            tokio::spawn(client(
                worker as u64,
                CoordinatorClient::new(channel.clone()),
                Arc::clone(&config),
                Arc::clone(&progress),
            ))
        })
        .collect();
    for client in clients {
        let _ = client.await;
    }
}

fn int(value: i64) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::Int64(value)),
    }
}

/// Counts an abort the client heard, by the cause its reason names.
fn count_cause(told: &mut Told, reason: Option<&pb::AbortReason>) {
    let cause = reason
        .and_then(|r| pb::AbortCause::try_from(r.cause).ok())
        .unwrap_or(pb::AbortCause::Unspecified);
    *told
        .abort_causes
        .entry(super::spec::abort_cause_name(cause))
        .or_default() += 1;
}

fn definitely_not_committed(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::FailedPrecondition | tonic::Code::Aborted | tonic::Code::NotFound
    )
}

/// What one attempt left the client to do next.
enum Attempt {
    /// An outcome (or an abandoned transaction) was recorded; go on at once.
    Finished,
    /// The coordinator or a shard was unreachable: back off before the next attempt.
    BackOff,
}

async fn client(
    worker: u64,
    mut client: CoordinatorClient<Channel>,
    config: Arc<WorkloadConfig>,
    progress: Arc<Progress>,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed.wrapping_mul(1_000_003).wrapping_add(worker));
    let mut backoff = Duration::from_millis(20);
    loop {
        if progress.stop.load(Ordering::SeqCst) || Instant::now() > config.deadline {
            return;
        }
        // Claim one transaction of the budget.
        let claimed = progress.started.fetch_add(1, Ordering::SeqCst);
        if claimed >= config.transactions {
            return;
        }
        let options = pb::TransactionOptions {
            protocol: crate::wire_protocol(config.protocol) as i32,
            label: format!("scenario client {worker}"),
            ..Default::default()
        };
        let attempt = match config.mode {
            Mode::Interactive => interactive(&mut client, &config, &progress, &mut rng, options).await,
            Mode::Submit => submit(&mut client, &config, &progress, &mut rng, options).await,
        };
        match attempt {
            Attempt::Finished => backoff = Duration::from_millis(20),
            Attempt::BackOff => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    }
}

/// One statement of a transaction: (shard, sql, params).
type Statement = (String, String, Vec<pb::Value>);

/// The statements of one transaction whose markers carry `marker_id`: a marker insert on each
/// chosen shard and, in bank mode, a transfer between the first two. Both modes draw from `rng`
/// in the same order, so a seed picks the same shards either way.
fn statements(config: &WorkloadConfig, rng: &mut rand::rngs::StdRng, marker_id: u64) -> Vec<Statement> {
    let mut shards = config.shards.clone();
    shards.shuffle(rng);
    shards.truncate(config.shards_per_txn);
    shards.sort();
    let mut statements: Vec<Statement> = shards
        .iter()
        .map(|shard| marker_op(shard, marker_id, &shards))
        .collect();
    if let Some(accounts) = config.accounts
        && shards.len() >= 2
    {
        let amount = rng.random_range(1..=50);
        let mut account_on = |shard: &str| {
            let index = config.shards.iter().position(|s| s == shard).unwrap_or(0) as i64;
            let n = config.shards.len() as i64;
            let slots = (accounts / n).max(1);
            rng.random_range(0..slots) * n + index
        };
        let from = account_on(&shards[0]);
        let to = account_on(&shards[1]);
        for (shard, account, delta) in [(&shards[0], from, -amount), (&shards[1], to, amount)] {
            statements.push((
                shard.clone(),
                "UPDATE accounts SET balance = balance + $1 WHERE id = $2".into(),
                vec![int(delta), int(account)],
            ));
        }
    }
    statements
}

/// Hands an unfinished attempt's slot back to the budget, at most `transactions` times in all,
/// so the loop stays bounded in count as well as by the deadline.
fn hand_back_slot(config: &WorkloadConfig, progress: &Progress) {
    if progress.retried.fetch_add(1, Ordering::SeqCst) < config.transactions {
        progress.started.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Begin, one Execute per statement, then Commit (or, one time in ten, Rollback).
async fn interactive(
    client: &mut CoordinatorClient<Channel>,
    config: &WorkloadConfig,
    progress: &Progress,
    rng: &mut rand::rngs::StdRng,
    options: pb::TransactionOptions,
) -> Attempt {
    let txid = match client
        .begin(pb::BeginRequest {
            options: Some(options),
        })
        .await
    {
        Ok(response) => response.into_inner().txid,
        Err(_) => {
            // Not begun: give the budget back and wait for the coordinator to return.
            progress.started.fetch_sub(1, Ordering::SeqCst);
            return Attempt::BackOff;
        }
    };
    let mut executed = true;
    for (shard, sql, params) in statements(config, rng, txid) {
        // Prepared at Commit, as the scenarios' steps expect of an interactive transaction.
        let request = pb::ExecuteRequest {
            txid,
            shard,
            sql,
            params,
            last: false,
        };
        if client.execute(request).await.is_err() {
            executed = false;
            break;
        }
    }
    if !executed {
        // No commit was requested: the transaction must vanish everywhere. Tell the
        // coordinator if it listens; it aborts on its own otherwise (idle timeout).
        let _ = client.rollback(pb::RollbackRequest { txid }).await;
        progress.record(|t| {
            t.abandoned.insert(txid);
        });
        // It never reached a decision, so it does not use up the budget: a scenario that kills
        // a participant still gets decided transactions after it returns.
        hand_back_slot(config, progress);
        // A shard is down or being recovered: back off as a real client would, instead of
        // spending the whole budget on it before it returns.
        return Attempt::BackOff;
    }
    // An occasional client rollback keeps acknowledged aborts in the mix.
    if rng.random_ratio(1, 10) {
        match client.rollback(pb::RollbackRequest { txid }).await {
            Ok(outcome) if outcome.get_ref().kind == pb::OutcomeKind::Aborted as i32 => {
                progress.record(|t| {
                    t.aborted.insert(txid);
                })
            }
            // The coordinator answered with a different outcome than asked for (it had
            // already decided): take its word.
            Ok(outcome) => {
                let committed = outcome.get_ref().kind == pb::OutcomeKind::Committed as i32;
                progress.record(|t| {
                    if committed {
                        t.committed.insert(txid);
                    } else {
                        t.unknown.insert(txid);
                    }
                })
            }
            Err(_) => progress.record(|t| {
                t.abandoned.insert(txid);
            }),
        }
        return Attempt::Finished;
    }
    match client
        .commit(pb::CommitRequest {
            txid,
            wait_for_apply: false,
        })
        .await
    {
        Ok(response) => {
            let outcome = response.into_inner();
            let committed = outcome.kind == pb::OutcomeKind::Committed as i32;
            progress.record(|t| {
                if committed {
                    t.committed.insert(txid);
                } else {
                    t.aborted.insert(txid);
                    count_cause(t, outcome.abort.as_ref());
                }
            });
        }
        // Definite answers: the transaction did not commit (it had already aborted, or the
        // coordinator holds no record of it, which under presumed abort means aborted).
        Err(status) if definitely_not_committed(&status) => progress.record(|t| {
            t.aborted.insert(txid);
        }),
        Err(_) => progress.record(|t| {
            t.unknown.insert(txid);
        }),
    }
    Attempt::Finished
}

/// One `Submit` carrying every statement. Its reply is a Commit's: committed or aborted, a
/// definite refusal (aborted), or a failure that leaves the outcome unknown. One time in ten the
/// first statement asks for a row count it cannot meet, so acknowledged aborts stay in the mix
/// (the coordinator aborts a submit whose `expect_rows` is missed, after the other shards voted).
async fn submit(
    client: &mut CoordinatorClient<Channel>,
    config: &WorkloadConfig,
    progress: &Progress,
    rng: &mut rand::rngs::StdRng,
    options: pb::TransactionOptions,
) -> Attempt {
    let marker_id = SUBMIT_MARKER_BASE + progress.submitted.fetch_add(1, Ordering::SeqCst);
    let mut ops: Vec<pb::Op> = statements(config, rng, marker_id)
        .into_iter()
        .map(|(shard, sql, params)| pb::Op {
            shard,
            sql,
            params,
            expect_rows: None,
        })
        .collect();
    let abort_on_purpose = rng.random_ratio(1, 10);
    if abort_on_purpose && let Some(first) = ops.first_mut() {
        // A marker insert affects one row.
        first.expect_rows = Some(0);
    }
    let submitted = client
        .submit(pb::SubmitRequest {
            ops,
            options: Some(options),
            wait_for_apply: false,
        })
        .await;
    match submitted {
        Ok(response) => {
            let outcome = response.into_inner().outcome;
            let kind = outcome.as_ref().map(|outcome| outcome.kind);
            let aborted = kind == Some(pb::OutcomeKind::Aborted as i32);
            progress.record(|t| {
                if kind == Some(pb::OutcomeKind::Committed as i32) {
                    t.committed.insert(marker_id);
                } else if aborted {
                    t.aborted.insert(marker_id);
                    count_cause(t, outcome.as_ref().and_then(|o| o.abort.as_ref()));
                } else {
                    // A reply without an outcome says nothing either way.
                    t.unknown.insert(marker_id);
                }
            });
            if !aborted || abort_on_purpose {
                return Attempt::Finished;
            }
            // Marker inserts fail only under a fault (a shard down, cut off, or timed out), where
            // the interactive client sees a failed Execute: back off as a real client would and
            // hand the slot back, so the budget is not spent before the shard returns. (Any such
            // abort counts, whatever its `retryable` says: the workload only needs to know the
            // abort was not its own.)
            hand_back_slot(config, progress);
            Attempt::BackOff
        }
        // As for Commit: the transaction did not commit.
        Err(status) if definitely_not_committed(&status) => {
            progress.record(|t| {
                t.aborted.insert(marker_id);
            });
            Attempt::Finished
        }
        Err(_) => {
            progress.record(|t| {
                t.unknown.insert(marker_id);
            });
            // Unreachable, or cut off mid-call (the coordinator crashed; through a proxy that
            // shows as several codes): the outcome is unknown and checked all-or-nothing. The
            // slot goes back as a failed Begin's does (no bound but the deadline: a coordinator
            // kept down would otherwise use up the budget while the clients back off), so
            // decided transactions still follow once it returns.
            progress.started.fetch_sub(1, Ordering::SeqCst);
            Attempt::BackOff
        }
    }
}
