//! An application with Treaty embedded (`treaty_coordinator::Embedded`): what `e2e/embedded.rs`
//! crashes and restarts, and the smallest example of embedding.
//!
//! `embedded-app [coordinator flags]`: the flags are `treaty-coordinator`'s (`--data-dir`,
//! `--shard s0=postgres://...`, `--decision-store`, ...). It starts the coordinator in this
//! process, prints `ready <addr>`, then runs `TRANSFERS` transfers (environment, default 0) on
//! `CLIENTS` concurrent tasks (default 4) through `treaty_client::Client::embedded` (every other
//! one a one-shot submit, the rest interactive transactions): each moves 1 from an account on
//! `s0` to one on `s1` and records its id in both shards' `transfers` table, and `committed <id>`
//! is printed once Treaty answers COMMITTED (`failed <error>` for a call that failed). Then it waits for its stdin to close and stops as the service stops
//! on SIGTERM, printing `stopped`.

use std::io::{Read as _, Write as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use clap::Parser as _;
use treaty_client::Client;
use treaty_coordinator::Embedded;
use treaty_coordinator::config::{Args, Config};
use treaty_proto::pb;

/// Accounts per shard (`e2e/embedded.rs` creates them).
const ACCOUNTS: i64 = 100;

#[tokio::main]
async fn main() -> Result<()> {
    let config = Config::resolve(Args::try_parse_from(std::env::args())?)?;
    let transfers: u64 = env_number("TRANSFERS", 0)?;
    let clients: u64 = env_number("CLIENTS", 4)?.max(1);
    let embedded = Arc::new(
        Embedded::start(config)
            .await
            .context("starting Treaty in this process")?,
    );
    say(&format!("ready {}", embedded.addr()));
    let client = Arc::new(Client::embedded(embedded.clone())?);
    // Ids unique across runs of the application: the run's start time, then a sequence.
    let run = treaty_proto::now_ms() << 20;
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let client = client.clone();
            let next = next.clone();
            tokio::spawn(async move {
                loop {
                    let seq = next.fetch_add(1, Ordering::Relaxed);
                    if seq >= transfers {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let id = run | seq;
                    let from = (seq as i64 * 7) % ACCOUNTS;
                    let to = (seq as i64 * 13) % ACCOUNTS;
                    let request = transfer(id as i64, from, to);
                    let outcome = if seq.is_multiple_of(2) {
                        client.submit(request).await.map(|response| response.outcome)
                    } else {
                        interactive(&client, request).await
                    };
                    match outcome {
                        Ok(outcome) if treaty_client::committed(outcome.as_ref()) => {
                            say(&format!("committed {id}"));
                        }
                        // Aborted (a lock timeout, say): nothing to check, nothing applied.
                        Ok(_) => {}
                        // Neither acknowledged nor known aborted (a limit under load, an unknown
                        // outcome): said, and not counted either way.
                        Err(error) => say(&format!("failed {error}")),
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    // Serve until the caller closes stdin.
    tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
    })
    .await?;
    embedded.stop().await?;
    say("stopped");
    Ok(())
}

/// The submit's ops as an interactive transaction: each shard's last statement votes with it.
async fn interactive(
    client: &Client,
    request: pb::SubmitRequest,
) -> Result<Option<pb::Outcome>, treaty_client::ClientError> {
    let txn = client.begin(request.options).await?;
    for (index, op) in request.ops.iter().enumerate() {
        let last = request
            .ops
            .get(index + 1)
            .is_none_or(|next| next.shard != op.shard);
        let result = if last {
            txn.execute_last(op.shard.clone(), op.sql.clone(), op.params.clone())
                .await
        } else {
            txn.execute(op.shard.clone(), op.sql.clone(), op.params.clone())
                .await
        };
        match result {
            Ok(result) if Some(result.rows_affected) == op.expect_rows => {}
            // Not applied (a lock timeout, say): a failed statement already aborted it, and the
            // rollback then only confirms it.
            Ok(_) | Err(_) => {
                let _ = txn.rollback().await;
                return Ok(None);
            }
        }
    }
    Ok(Some(txn.commit(false).await?))
}

fn transfer(id: i64, from: i64, to: i64) -> pb::SubmitRequest {
    let op = |shard: &str, sql: &str, params: &[i64]| pb::Op {
        shard: shard.into(),
        sql: sql.into(),
        params: params
            .iter()
            .map(|&value| pb::Value {
                kind: Some(pb::value::Kind::Int64(value)),
            })
            .collect(),
        expect_rows: Some(1),
    };
    pb::SubmitRequest {
        ops: vec![
            op(
                "s0",
                "UPDATE accounts SET balance = balance - 1 WHERE id = $1",
                &[from],
            ),
            op("s0", "INSERT INTO transfers (id) VALUES ($1)", &[id]),
            op(
                "s1",
                "UPDATE accounts SET balance = balance + 1 WHERE id = $1",
                &[to],
            ),
            op("s1", "INSERT INTO transfers (id) VALUES ($1)", &[id]),
        ],
        options: None,
        wait_for_apply: false,
    }
}

fn env_number(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .with_context(|| format!("{name}={value:?} is not a number")),
        Err(_) => Ok(default),
    }
}

/// One line on stdout, flushed: the test reads it as it comes.
fn say(line: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}
