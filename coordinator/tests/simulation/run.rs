//! One seed's run: the real coordinator (`treaty_coordinator::driver`, started with the same
//! `start` as production) on a `SimStore` and a `SimTransport`, on a paused current-thread tokio
//! runtime, so time is virtual and jumps ahead whenever every task waits.
//!
//! A run: a random workload (interactive and one-shot transactions, 2PC and 3PC, rollbacks, an
//! operator's heuristic resolves) under a random fault schedule (message faults in the transport,
//! coordinator and participant crashes and restarts); at `heal_at_ms` faults stop and every process
//! comes back; then the run waits until every transaction has finished and no branch is left open,
//! or fails with "did not finish". Participants ask the coordinator about their prepared branches
//! as the real participant's reconciliation does, and roll back idle active branches.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;
use treaty_commit_protocol::store::HeuristicDecision;
use treaty_commit_protocol::{AbortCause, AbortReason, Outcome, Phase, Protocol, Timeouts};
use treaty_coordinator::driver::{self, Decision, Engine, EngineSettings, ResolveRequest, TxnOptions};
use treaty_types::{Clock, CoordinatorId, Gid, ShardName};

use crate::checker::{self, ClientRecord, Facts};
use crate::faults::{Chance, FaultRates, Life};
use crate::participants::{BranchState, Cluster, SimTransport};
use crate::store::{SimStore, SimStoreHandle};
use crate::three_phase;
use crate::trace::Trace;

type SimEngine = Engine<SimStoreHandle, SimTransport>;

/// How long after healing a run may take to finish everything.
const FINISH_WITHIN_MS: u64 = 120_000;
/// Participants roll back an active branch untouched this long.
const IDLE_BRANCH_MS: u64 = 6_000;

/// Time for the driver: virtual, from tokio's paused clock, starting at a fixed Unix time.
struct SimClock {
    start: tokio::time::Instant,
}

impl Clock for SimClock {
    fn now_ms(&self) -> u64 {
        1_700_000_000_000 + u64::try_from(self.start.elapsed().as_millis()).unwrap_or(0)
    }
}

/// How a seed failed: what was violated, and the trace.
pub struct Failure {
    pub violations: Vec<String>,
    pub trace: String,
}

/// What one seed did.
pub struct RunReport {
    pub trace: Trace,
    pub failure: Option<Failure>,
    pub transactions: usize,
    /// Transactions an operator's heuristic decision made finish both ways (`checker`).
    pub hazards: Vec<String>,
}

/// Runs `seed` on a fresh runtime.
pub fn run_seed(seed: u64) -> RunReport {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime");
    let report = runtime.block_on(simulate(seed));
    // Dropping the runtime drops every task still waiting (a dead coordinator's calls).
    drop(runtime);
    report
}

/// The coordinator process: its current incarnation, and the engine once it has started.
struct Coordinator {
    life: Life,
    up: bool,
    engine: Option<Arc<SimEngine>>,
}

struct World {
    chance: Arc<Chance>,
    trace: Trace,
    store: SimStore,
    cluster: Arc<Cluster>,
    clock: Arc<SimClock>,
    id: CoordinatorId,
    settings: EngineSettings,
    coordinator: Mutex<Coordinator>,
    clients: Mutex<Vec<ClientRecord>>,
    begun: Mutex<Vec<u64>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `future` for the coordinator incarnation `life`; `None` if that incarnation dies first
/// (a client's connection to a crashed coordinator breaks).
async fn on<F: Future>(life: &Life, future: F) -> Option<F::Output> {
    tokio::select! {
        biased;
        () = life.died() => None,
        output = future => Some(output),
    }
}

impl World {
    fn current(&self) -> Option<(Arc<SimEngine>, Life)> {
        let coordinator = lock(&self.coordinator);
        coordinator
            .engine
            .clone()
            .map(|engine| (engine, coordinator.life.clone()))
    }

    /// Starts a new coordinator incarnation on what the store holds durable.
    fn boot(self: &Arc<Self>) {
        let life = {
            let mut coordinator = lock(&self.coordinator);
            if coordinator.up {
                return;
            }
            let life = Life::new(coordinator.life.number + 1);
            coordinator.life = life.clone();
            coordinator.up = true;
            life
        };
        self.trace.record(format!("coordinator {} starting", life.number));
        let world = Arc::clone(self);
        tokio::spawn(async move {
            let store = world.store.handle(life.clone());
            let transport = SimTransport::new(Arc::clone(&world.cluster), life.clone());
            let clock: Arc<dyn Clock> = world.clock.clone();
            let started = driver::start(world.id.clone(), store, transport, clock, world.settings).await;
            let engine = started.expect("the simulated store does not fail");
            if life.is_dead() {
                return;
            }
            engine.spawn_ticker();
            world.trace.record(format!("coordinator {} up", life.number));
            lock(&world.coordinator).engine = Some(engine);
        });
    }

    fn crash_coordinator(&self) {
        let mut coordinator = lock(&self.coordinator);
        if !coordinator.up {
            return;
        }
        coordinator.up = false;
        coordinator.engine = None;
        coordinator.life.kill();
        self.trace
            .record(format!("crash coordinator {}", coordinator.life.number));
        drop(coordinator);
        self.store.crash();
    }
}

/// The kinds of transactions clients run.
#[derive(Debug, Clone, Copy)]
enum Kind {
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

async fn simulate(seed: u64) -> RunReport {
    let trace = Trace::new();
    let mut plan = StdRng::seed_from_u64(seed);
    let rates = FaultRates::random(&mut plan);
    let chance = Arc::new(Chance::new(seed, rates));
    let store = SimStore::new(Arc::clone(&chance), trace.clone());
    let shard_count = plan.random_range(2..=4);
    let shards: Vec<ShardName> = (0..shard_count)
        .map(|i| ShardName::new(&format!("s{i}")).expect("a valid shard name"))
        .collect();
    let cluster = Cluster::new(shards.clone(), Arc::clone(&chance), trace.clone(), store.clone());
    let vote_ms = plan.random_range(150..800);
    let settings = EngineSettings {
        timeouts: Timeouts {
            transaction_ms: plan.random_range(1_500..4_000),
            idle_ms: plan.random_range(400..2_000),
            vote_ms,
        },
        lock_timeout_ms: 0,
        protocol: Protocol::TwoPhase,
    };
    trace.record(format!(
        "seed {seed}: shards {shards:?}, {rates:?}, {:?}",
        settings.timeouts
    ));
    let world = Arc::new(World {
        chance: Arc::clone(&chance),
        trace: trace.clone(),
        store,
        cluster: Arc::clone(&cluster),
        clock: Arc::new(SimClock {
            start: tokio::time::Instant::now(),
        }),
        id: CoordinatorId::new("sim").expect("a valid coordinator id"),
        settings,
        coordinator: Mutex::new(Coordinator {
            life: Life::new(0),
            up: false,
            engine: None,
        }),
        clients: Mutex::new(Vec::new()),
        begun: Mutex::new(Vec::new()),
    });
    world.boot();
    let heal_at_ms = 2_500;

    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    let transactions = plan.random_range(3..=8);
    for index in 0..transactions {
        let kind = *[Kind::Interactive, Kind::OneShotMulti, Kind::OneShotSingle]
            .choose(&mut plan)
            .expect("three kinds");
        let protocol = if plan.random_bool(0.5) {
            Protocol::ThreePhase
        } else {
            Protocol::TwoPhase
        };
        let start_ms = plan.random_range(0..1_500);
        let client_seed = plan.random();
        tasks.push(tokio::spawn(client(
            Arc::clone(&world),
            index,
            kind,
            protocol,
            start_ms,
            client_seed,
        )));
    }
    for _ in 0..plan.random_range(0..=2) {
        let at_ms = plan.random_range(200..2_400);
        let operator_seed = plan.random();
        tasks.push(tokio::spawn(operator(Arc::clone(&world), at_ms, operator_seed)));
    }
    let mut faults: Vec<(u64, Option<ShardName>, u64)> = Vec::new();
    for _ in 0..plan.random_range(0..=2) {
        faults.push((
            plan.random_range(0..heal_at_ms),
            None,
            plan.random_range(20..1_000),
        ));
    }
    for _ in 0..plan.random_range(0..=2) {
        let shard = shards.choose(&mut plan).cloned();
        faults.push((
            plan.random_range(0..heal_at_ms),
            shard,
            plan.random_range(20..1_000),
        ));
    }
    faults.sort_by_key(|(at, _, _)| *at);
    tokio::spawn(crashes(Arc::clone(&world), faults));
    let three_phase_timeout_ms = plan.random_range(600..3_000);
    for shard in &shards {
        tokio::spawn(reconcile(
            Arc::clone(&world),
            shard.clone(),
            three_phase_timeout_ms,
        ));
    }
    let idle = Arc::clone(&world);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            idle.cluster.roll_back_idle(IDLE_BRANCH_MS);
        }
    });

    tokio::time::sleep(Duration::from_millis(heal_at_ms)).await;
    chance.heal();
    trace.record("heal: no more faults; every process restarts");
    for shard in &shards {
        if !cluster.is_up(shard) {
            cluster.restart(shard);
        }
    }
    world.boot();

    let deadline = tokio::time::Instant::now() + Duration::from_millis(FINISH_WITHIN_MS);
    let mut left = unfinished(&world, &tasks);
    while !left.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = unfinished(&world, &tasks);
    }
    let mut violations = cluster.violations();
    if !left.is_empty() {
        violations.push(format!(
            "did not finish within {FINISH_WITHIN_MS} ms of healing: {}",
            left.join("; ")
        ));
    }
    let branches = cluster.snapshot();
    let durable = world.store.durable();
    let clients = lock(&world.clients).clone();
    let hazards = checker::heuristic_hazards(&branches, &durable);
    let mut contradicted: Vec<String> = Vec::new();
    for (gid, what) in cluster.contradictions() {
        if !hazards.contains(&gid) && !contradicted.contains(&gid) {
            violations.push(format!("contradiction for {gid}: {what}"));
            contradicted.push(gid);
        }
    }
    violations.extend(checker::check(&Facts {
        branches: &branches,
        durable: &durable,
        clients: &clients,
    }));
    trace.record(format!("end: {} violation(s)", violations.len()));
    let failure = (!violations.is_empty()).then(|| Failure {
        violations,
        trace: trace.render(),
    });
    let hazards = checker::heuristic_hazards(&branches, &durable)
        .into_iter()
        .collect();
    RunReport {
        trace,
        failure,
        transactions,
        hazards,
    }
}

/// What keeps the run from being finished, if anything.
fn unfinished(world: &World, tasks: &[JoinHandle<()>]) -> Vec<String> {
    let mut left = Vec::new();
    let branches = world.cluster.snapshot();
    let hazards = checker::heuristic_hazards(&branches, &world.store.durable());
    let running = tasks.iter().filter(|task| !task.is_finished()).count();
    if running > 0 {
        left.push(format!("{running} client or operator task(s) still running"));
    }
    match world.current() {
        None => left.push("the coordinator is not up".into()),
        Some((engine, _)) => {
            let live: Vec<String> = engine
                .list(
                    |phase| !matches!(phase, Phase::Committed | Phase::Aborted | Phase::OutcomeUnknown),
                    usize::MAX,
                )
                .iter()
                .map(|handle| handle.gid.to_string())
                .filter(|gid| !hazards.contains(gid))
                .collect();
            if !live.is_empty() {
                left.push(format!("the coordinator has live transactions {live:?}"));
            }
        }
    }
    for (shard, branches) in branches {
        for (gid, branch) in branches {
            if matches!(branch.state, BranchState::Prepared | BranchState::Active) && !hazards.contains(&gid)
            {
                left.push(format!("{shard} holds {gid} {:?}", branch.state));
            }
        }
    }
    left
}

/// Crashes and restarts at the scheduled times (restarts due after healing happen at healing).
async fn crashes(world: Arc<World>, faults: Vec<(u64, Option<ShardName>, u64)>) {
    let start = tokio::time::Instant::now();
    for (at_ms, shard, down_ms) in faults {
        tokio::time::sleep_until(start + Duration::from_millis(at_ms)).await;
        if world.chance.faults().is_none() {
            return;
        }
        let world = Arc::clone(&world);
        match shard {
            None => {
                world.crash_coordinator();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(down_ms)).await;
                    world.boot();
                });
            }
            Some(shard) => {
                if !world.cluster.is_up(&shard) {
                    continue;
                }
                world.cluster.crash(&shard);
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(down_ms)).await;
                    if !world.cluster.is_up(&shard) {
                        world.cluster.restart(&shard);
                    }
                });
            }
        }
    }
}

/// A participant's reconciliation: it asks the coordinator about every branch it holds prepared
/// (the real one does at start and for branches prepared longer than `--in-doubt-after-ms`) and
/// applies the answer; while the coordinator is down it keeps asking.
async fn reconcile(world: Arc<World>, shard: ShardName, three_phase_timeout_ms: u64) {
    loop {
        let pause_ms = world
            .chance
            .rng(&format!("reconcile/{shard}"))
            .random_range(100..400);
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        for gid in world.cluster.prepared(&shard) {
            let (world, shard) = (Arc::clone(&world), shard.clone());
            tokio::spawn(async move { ask_decision(&world, &shard, &gid).await });
        }
        // Three-phase branches also run termination among the participants on their timeout.
        for (gid, participants, promised) in world
            .cluster
            .timed_out_three_phase(&shard, three_phase_timeout_ms)
        {
            tokio::spawn(three_phase::request_termination(
                Arc::clone(&world.cluster),
                shard.clone(),
                gid,
                participants,
                promised,
            ));
        }
    }
}

async fn ask_decision(world: &World, shard: &ShardName, gid: &str) {
    let mut rng = world.chance.rng(&format!("ask/{shard}/{gid}"));
    let faults = world.chance.faults();
    let lost = faults.is_some_and(|rates| rng.random_bool(rates.drop_request));
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..20))).await;
    let Some((engine, _)) = world.current() else {
        return;
    };
    if lost || !world.cluster.is_up(shard) {
        return;
    }
    let (decision, _) = engine.decision(gid);
    world
        .trace
        .record(format!("{shard} asks about {gid}: {decision:?}"));
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..20))).await;
    match decision {
        Decision::Commit => world.cluster.apply_decision(shard, gid, true),
        Decision::Abort => world.cluster.apply_decision(shard, gid, false),
        Decision::Pending | Decision::Unknown => {}
    }
}

/// One client's transaction.
async fn client(world: Arc<World>, index: usize, kind: Kind, protocol: Protocol, start_ms: u64, seed: u64) {
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
    world.trace.record(format!("client {index}: {gid} told {told}"));
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
async fn operator(world: Arc<World>, at_ms: u64, seed: u64) {
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
