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
use treaty_commit_protocol::{Phase, Protocol, Timeouts};
use treaty_coordinator::driver::{self, Decision, Engine, EngineSettings};
use treaty_types::{Clock, CoordinatorId, ShardName};

use crate::checker::{self, ClientRecord, Facts};
use crate::faults::{Chance, FaultRates, Life};
use crate::participants::{BranchState, Cluster};
use crate::store::{SimStore, SimStoreHandle};
use crate::three_phase;
use crate::trace::Trace;
use crate::transport::SimTransport;
use crate::workload;

pub(crate) type SimEngine = Engine<SimStoreHandle, SimTransport>;

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
    /// How often each kind of event happened (`EXERCISED`), to show what the seeds cover.
    pub exercised: Vec<u64>,
}

/// Kinds of events counted over all seeds: (label, what the trace line contains).
pub const EXERCISED: &[(&str, &str)] = &[
    ("coordinator crashes", "crash coordinator"),
    ("participant crashes", "crash participant"),
    ("records lost in a crash", "store: lost "),
    ("messages dropped", "drop "),
    ("messages duplicated", "duplicate "),
    ("calls timed out", "timeout "),
    ("participants asking the coordinator for a decision", "asks about"),
    ("3PC pre-commits", "PRE-COMMITTED"),
    ("3PC participant termination rounds", "termination round"),
    ("heuristic decisions recorded", "store: durable heuristic"),
    (
        "decision branches committing their commit row",
        "COMMIT with its commit row",
    ),
    ("abort rows concluded", "inserted (concluded)"),
    ("decision branches that met an abort row", "met an abort row"),
    ("commit rows forgotten", "deliver forget-decisions"),
    ("clients told Committed", "told Committed"),
    ("clients told Aborted", "told Aborted"),
];

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

pub(crate) struct World {
    chance: Arc<Chance>,
    pub(crate) trace: Trace,
    store: SimStore,
    pub(crate) cluster: Arc<Cluster>,
    clock: Arc<SimClock>,
    pub(crate) id: CoordinatorId,
    settings: EngineSettings,
    coordinator: Mutex<Coordinator>,
    pub(crate) clients: Mutex<Vec<ClientRecord>>,
    pub(crate) begun: Mutex<Vec<u64>>,
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `future` for the coordinator incarnation `life`; `None` if that incarnation dies first
/// (a client's connection to a crashed coordinator breaks).
pub(crate) async fn on<F: Future>(life: &Life, future: F) -> Option<F::Output> {
    tokio::select! {
        biased;
        () = life.died() => None,
        output = future => Some(output),
    }
}

impl World {
    pub(crate) fn current(&self) -> Option<(Arc<SimEngine>, Life)> {
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
        // Odd seeds keep 2PC decisions in the decision branch's row (`--decision-store shard`).
        decide_in_branch: seed % 2 == 1,
        // Shorter than a seed's run, so the sweep finishes what no coordinator drives.
        takeover_after_ms: 1_500,
    };
    trace.record(format!(
        "seed {seed}: shards {shards:?}, {rates:?}, {:?}, decisions in {}",
        settings.timeouts,
        if settings.decide_in_branch {
            "the first branch"
        } else {
            "the store"
        }
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
        let kind = *[
            workload::Kind::Interactive,
            workload::Kind::OneShotMulti,
            workload::Kind::OneShotSingle,
        ]
        .choose(&mut plan)
        .expect("three kinds");
        let protocol = if plan.random_bool(0.5) {
            Protocol::ThreePhase
        } else {
            Protocol::TwoPhase
        };
        let start_ms = plan.random_range(0..1_500);
        let client_seed = plan.random();
        tasks.push(tokio::spawn(workload::client(
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
        tasks.push(tokio::spawn(workload::operator(
            Arc::clone(&world),
            at_ms,
            operator_seed,
        )));
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
    let exercised = trace.count_containing(EXERCISED.iter().map(|(_, needle)| *needle));
    RunReport {
        trace,
        failure,
        transactions,
        hazards,
        exercised,
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
                .map(|handle| handle.gid().to_string())
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
    let (decision, _) = engine.decision(gid).await;
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
