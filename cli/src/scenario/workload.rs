//! The scenario workload: concurrent clients, each running interactive transactions (Begin, one
//! marker insert per chosen shard, Commit) and recording exactly what the coordinator told it.
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
use treaty_proto::pb;
use treaty_proto::pb::coordinator_client::CoordinatorClient;

use super::checker::{Told, marker_op};

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
    pub protocol: pb::Protocol,
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

fn definitely_not_committed(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::FailedPrecondition | tonic::Code::Aborted | tonic::Code::NotFound
    )
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
            protocol: config.protocol as i32,
            label: format!("scenario client {worker}"),
            ..Default::default()
        };
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
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
                continue;
            }
        };
        let mut shards = config.shards.clone();
        shards.shuffle(&mut rng);
        shards.truncate(config.shards_per_txn);
        shards.sort();
        let mut requests: Vec<pb::ExecuteRequest> = shards
            .iter()
            .map(|shard| {
                let (shard, sql, params) = marker_op(shard, txid, &shards);
                pb::ExecuteRequest {
                    txid,
                    shard,
                    sql,
                    params,
                }
            })
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
                requests.push(pb::ExecuteRequest {
                    txid,
                    shard: shard.clone(),
                    sql: "UPDATE accounts SET balance = balance + $1 WHERE id = $2".into(),
                    params: vec![int(delta), int(account)],
                });
            }
        }
        let mut executed = true;
        for request in requests {
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
            // It never reached a decision, so it does not use up the budget (once per budgeted
            // transaction at most, so the loop stays bounded in count as well as by the deadline):
            // a scenario that kills a participant still gets decided transactions after it returns.
            if progress.retried.fetch_add(1, Ordering::SeqCst) < config.transactions {
                progress.started.fetch_sub(1, Ordering::SeqCst);
            }
            // A shard is down or being recovered: back off as a real client would, instead of
            // spending the whole budget on it before it returns.
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
            continue;
        }
        backoff = Duration::from_millis(20);
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
            continue;
        }
        match client
            .commit(pb::CommitRequest {
                txid,
                wait_for_apply: false,
            })
            .await
        {
            Ok(response) => {
                let committed = response.into_inner().kind == pb::OutcomeKind::Committed as i32;
                progress.record(|t| {
                    if committed {
                        t.committed.insert(txid);
                    } else {
                        t.aborted.insert(txid);
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
    }
}
