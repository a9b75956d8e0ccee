//! The workload of a run: clients running transactions against whichever coordinator incarnation
//! is up (interactive: begin, statements, commit or rollback; one-shot over several shards: each
//! shard's last statement with its vote, then commit; one-shot on one shard: the last statement with
//! its COMMIT), 2PC or 3PC, and an operator's heuristic resolves. Each records what it was told.

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use treaty_commit_protocol::store::HeuristicDecision;
use treaty_commit_protocol::{AbortCause, AbortReason, Outcome, Protocol};
use treaty_coordinator::driver::{ResolveRequest, TxnOptions};
use treaty_types::{Gid, ShardName};

use crate::checker::ClientRecord;
use crate::participants::BranchState;
use crate::run::{SimEngine, World, lock, on};

/// The kinds of transactions clients run.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// begin, statements, commit (or rollback).
    Interactive,
    /// begin, the last statement of every shard with its vote (`execute_and_prepare`), commit.
    OneShotMulti,
    /// begin, the one shard's last statement with its COMMIT (`commit_with_statement`).
    OneShotSingle,
}

fn write_sql(rng: &mut StdRng) -> String {
    if rng.random_bool(0.75) {
        "UPDATE accounts SET balance = balance + 1 WHERE id = $1".into()
    } else {
        "SELECT balance FROM accounts WHERE id = $1".into()
    }
}

/// One client's transaction.
pub async fn client(
    world: Arc<World>,
    index: usize,
    kind: Kind,
    protocol: Protocol,
    start_ms: u64,
    seed: u64,
) {
    tokio::time::sleep(Duration::from_millis(start_ms)).await;
    let mut rng = StdRng::seed_from_u64(seed);
    // A client whose coordinator is down tries again until it is back.
    let (engine, life) = loop {
        if let Some(current) = world.current() {
            break current;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let options = TxnOptions {
        label: format!("client {index}"),
        protocol: Some(protocol),
        ..TxnOptions::default()
    };
    let Some(Ok(txid)) = on(&life, engine.begin(options)).await else {
        world.trace.record(format!("client {index}: begin failed"));
        return;
    };
    let gid = Gid::new(&world.id, txid).to_string();
    lock(&world.begun).push(txid);
    world.trace.record(format!(
        "client {index}: begin {gid} ({kind:?}, {})",
        protocol.short_name()
    ));
    let mut record = ClientRecord {
        gid: gid.clone(),
        wrote: Vec::new(),
        outcome: None,
    };
    let shards = world.cluster.shards.clone();
    let outcome = on(&life, async {
        match kind {
            Kind::Interactive => interactive(&world, &engine, txid, &shards, &mut rng, &mut record).await,
            Kind::OneShotMulti => one_shot_multi(&world, &engine, txid, &shards, &mut rng, &mut record).await,
            Kind::OneShotSingle => one_shot_single(&engine, txid, &shards, &mut rng, &mut record).await,
        }
    })
    .await;
    let told = match &outcome {
        None => "the coordinator crashed".to_owned(),
        Some(Ok(outcome)) => format!("{outcome:?}"),
        Some(Err(error)) => format!("error: {error}"),
    };
    // With the decision in a branch, the GID names the first shard enlisted.
    if let Some(handle) = engine.tracked(txid) {
        record.gid = handle.gid().to_string();
    }
    world
        .trace
        .record(format!("client {index}: {} told {told}", record.gid));
    if let Some(Ok(outcome)) = outcome {
        record.outcome = Some(outcome);
    }
    lock(&world.clients).push(record);
}

type Told = Result<Outcome, String>;

async fn pause(rng: &mut StdRng) {
    if rng.random_bool(0.3) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..1_000))).await;
    }
}

async fn interactive(
    world: &World,
    engine: &Arc<SimEngine>,
    txid: u64,
    shards: &[ShardName],
    rng: &mut StdRng,
    record: &mut ClientRecord,
) -> Told {
    for _ in 0..rng.random_range(1..=4) {
        let shard = shards.choose(rng).expect("shards").clone();
        let sql = write_sql(rng);
        let writes = sql.starts_with("UPDATE");
        pause(rng).await;
        engine
            .execute(txid, shard.as_str(), sql, Vec::new())
            .await
            .map_err(|e| format!("execute on {shard}: {e}"))?;
        if writes && !record.wrote.contains(&shard) {
            record.wrote.push(shard);
        }
    }
    pause(rng).await;
    if rng.random_bool(0.15) {
        let reason = AbortReason::new(AbortCause::ClientRollback, "the client changed its mind");
        world.trace.record(format!("client rolls back {}", record.gid));
        return engine.rollback(txid, reason).await.map_err(|e| e.to_string());
    }
    engine
        .commit(txid, rng.random_bool(0.5))
        .await
        .map_err(|e| e.to_string())
}

async fn one_shot_multi(
    world: &World,
    engine: &Arc<SimEngine>,
    txid: u64,
    shards: &[ShardName],
    rng: &mut StdRng,
    record: &mut ClientRecord,
) -> Told {
    let count = rng.random_range(2..=shards.len());
    let mut chosen: Vec<ShardName> = shards.choose_multiple(rng, count).cloned().collect();
    chosen.sort();
    let statements: Vec<(ShardName, String)> = chosen
        .iter()
        .map(|shard| (shard.clone(), write_sql(rng)))
        .collect();
    let results = futures::future::join_all(statements.iter().map(|(shard, sql)| {
        engine.execute_and_prepare(txid, shard.as_str(), sql.clone(), Vec::new(), &chosen)
    }))
    .await;
    for ((shard, sql), result) in statements.iter().zip(results) {
        if let Err(error) = result {
            world
                .trace
                .record(format!("{}: execute-and-prepare on {shard}: {error}", record.gid));
            // The statement failed: the transaction aborts; the client rolls back as a submit does.
            let reason = AbortReason::new(AbortCause::StatementFailed, error.to_string());
            return engine.rollback(txid, reason).await.map_err(|e| e.to_string());
        }
        if sql.starts_with("UPDATE") {
            record.wrote.push(shard.clone());
        }
    }
    engine
        .commit(txid, rng.random_bool(0.5))
        .await
        .map_err(|e| e.to_string())
}

async fn one_shot_single(
    engine: &Arc<SimEngine>,
    txid: u64,
    shards: &[ShardName],
    rng: &mut StdRng,
    record: &mut ClientRecord,
) -> Told {
    let shard = shards.choose(rng).expect("shards").clone();
    if rng.random_bool(0.4) {
        let sql = write_sql(rng);
        engine
            .execute(txid, shard.as_str(), sql.clone(), Vec::new())
            .await
            .map_err(|e| e.to_string())?;
        if sql.starts_with("UPDATE") {
            record.wrote.push(shard.clone());
        }
    }
    let sql = write_sql(rng);
    let expect_rows = rng
        .random_bool(0.5)
        .then_some(u64::from(sql.starts_with("UPDATE")));
    let (outcome, _) = engine
        .commit_with_statement(
            txid,
            shard.as_str(),
            sql.clone(),
            Vec::new(),
            expect_rows,
            0,
            rng.random_bool(0.5),
        )
        .await
        .map_err(|e| e.to_string())?;
    if sql.starts_with("UPDATE") && !record.wrote.contains(&shard) {
        record.wrote.push(shard);
    }
    Ok(outcome)
}

/// An operator decides a transaction by hand (`treaty resolve`), commit or abort.
pub async fn operator(world: Arc<World>, at_ms: u64, seed: u64) {
    tokio::time::sleep(Duration::from_millis(at_ms)).await;
    let mut rng = StdRng::seed_from_u64(seed);
    // Mostly what `treaty in-doubt` lists (a branch some shard holds prepared), sometimes any
    // transaction a client began (one still in flight, or long finished).
    let in_doubt: Vec<u64> = world
        .cluster
        .snapshot()
        .values()
        .flat_map(|branches| {
            branches
                .iter()
                .filter(|(_, b)| b.state == BranchState::Prepared)
                .filter_map(|(gid, _)| Gid::parse(gid).ok().map(|gid| gid.txid()))
        })
        .collect();
    let pick = if !in_doubt.is_empty() && rng.random_bool(0.8) {
        in_doubt.choose(&mut rng).copied()
    } else {
        lock(&world.begun).choose(&mut rng).copied()
    };
    let Some(txid) = pick else {
        return;
    };
    let Some((engine, life)) = world.current() else {
        return;
    };
    let decision = if rng.random_bool(0.5) {
        HeuristicDecision::Commit
    } else {
        HeuristicDecision::Abort
    };
    let request = ResolveRequest {
        txid,
        decision,
        reason: "simulated operator".into(),
        operator: "sim".into(),
    };
    world
        .trace
        .record(format!("operator resolves txid {txid}: {}", decision.name()));
    let answer = on(&life, engine.resolve(request)).await;
    let told = match answer {
        None => "the coordinator crashed".to_owned(),
        Some(Ok(outcome)) => format!("{outcome:?}"),
        Some(Err(error)) => format!("refused: {error}"),
    };
    world
        .trace
        .record(format!("operator resolve of txid {txid}: {told}"));
}
