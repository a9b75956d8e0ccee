//! `treaty chaos`: the bank under chaos. Clients move money between accounts spread over the
//! shards (every transfer also writes its markers) while random processes — the coordinator,
//! participants, PostgreSQL servers — are SIGKILLed and restarted and network faults come and go on
//! the proxied links. Bounded in time; then recovery converges and the checker runs: atomicity per
//! transaction, acknowledged outcomes, conservation of money, nothing left prepared.
//!
//! With `--decision-store shard` the decisions are rows in the shards' `treaty.decisions`, and
//! `--coordinators 2` runs a second instance over the same shards that finishes what a killed one
//! leaves behind; both instances are killed in turn (the clients use the first), and convergence
//! also waits for every commit row to be forgotten.
//!
//! With `--participants in-process` the coordinator drives every database itself: a coordinator
//! kill takes its participants down with it, and the only proxied link is the clients'.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rand::{Rng, SeedableRng};
use treaty_harness::{Fault, LocalCluster};
use treaty_proto::Protocol;

use crate::ParticipantKind;
use crate::scenario::checker::{self, DATABASE};
use crate::scenario::schedule::{Action, MAX_COORDINATORS, Process};
use crate::scenario::spec::{DecisionStore, Mode};
use crate::scenario::timeline::Timeline;
use crate::scenario::workload::{self, Progress, WorkloadConfig};
use crate::scenario::{StepRunner, cluster_spec, start_other_coordinators};

const INITIAL_BALANCE: i64 = 1_000;

#[derive(clap::Args, Debug)]
pub struct ChaosArgs {
    /// Seconds of chaos (faults and transfers); recovery and the check come after.
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    /// Seed of the fault schedule and workload (printed, so a run can be repeated). Default: random.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Shards (PostgreSQL clusters, one participant each).
    #[arg(long, default_value_t = 3)]
    pub shards: usize,
    /// Concurrent clients making transfers.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Bank accounts, spread over the shards.
    #[arg(long, default_value_t = 300)]
    pub accounts: i64,
    /// Mean milliseconds between faults.
    #[arg(long, default_value_t = 2000)]
    pub fault_every_ms: u64,
    /// The commit protocol of every transfer: two-phase (or 2pc) or three-phase (or 3pc).
    #[arg(long, default_value = "two-phase")]
    pub protocol: Protocol,
    /// Send each transfer as one `Submit` (every statement in one request; each shard's last
    /// statement votes in the same participant call) instead of Begin, Execute per statement and
    /// Commit.
    #[arg(long)]
    pub submit: bool,
    /// Where the coordinators keep two-phase commit decisions: `file` (each one's decision log)
    /// or `shard` (a row in `treaty.decisions` committed inside each transaction's first branch).
    #[arg(long, value_enum, default_value_t = DecisionStore::Shard)]
    pub decision_store: DecisionStore,
    /// Coordinator instances over the same shards (more than one needs `--decision-store
    /// shard`). The clients use the first; every instance is killed now and then.
    #[arg(long, default_value_t = 1)]
    pub coordinators: usize,
    /// With the shard store: each instance finishes commit rows and prepared branches nobody
    /// has finished after this long (`--takeover-after-ms` of every coordinator).
    #[arg(long, default_value_t = 2000)]
    pub takeover_after_ms: u64,
    /// How the coordinator reaches the databases: agent (a participant process per shard, each
    /// killed now and then) or in-process (the coordinator drives them itself; two-phase commit
    /// and one coordinator only).
    #[arg(long, value_enum, default_value = "agent")]
    pub participants: ParticipantKind,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: ChaosArgs) -> Result<()> {
    if !(2..=8).contains(&args.shards) {
        bail!("--shards must be between 2 and 8");
    }
    if !(1..=7200).contains(&args.duration) {
        bail!("--duration must be between 1 and 7200 seconds");
    }
    if !(1..=128).contains(&args.clients) {
        bail!("--clients must be between 1 and 128");
    }
    if args.accounts < args.shards as i64 * 2 {
        bail!("--accounts must be at least twice --shards");
    }
    if args.fault_every_ms < 100 {
        bail!("--fault-every-ms must be at least 100");
    }
    if !(1..=MAX_COORDINATORS).contains(&args.coordinators) {
        bail!("--coordinators must be between 1 and {MAX_COORDINATORS}");
    }
    if args.coordinators > 1 && args.decision_store != DecisionStore::Shard {
        bail!(
            "--coordinators {} needs --decision-store shard: with the file store only the coordinator that logged a decision can finish its transaction",
            args.coordinators
        );
    }
    if args.participants.in_process() {
        // One process drives each database (its participant holds the database's claim), and
        // three-phase commit needs participants that outlive the coordinator.
        if args.coordinators > 1 {
            bail!("--participants in-process runs one coordinator per database: use --coordinators 1");
        }
        if args.protocol == Protocol::ThreePhase {
            bail!(
                "--participants in-process: three-phase commit needs participant agents (--participants agent)"
            );
        }
    }
    crate::fault_build::check_service_binaries()?;
    let seed = args.seed.unwrap_or_else(treaty_proto::now_ms);
    let mode = if args.submit {
        Mode::Submit
    } else {
        Mode::Interactive
    };
    let dir = tempfile::Builder::new().prefix("treaty-chaos-").tempdir()?;
    eprintln!(
        "chaos: {} shards ({} participants), {} clients, {}, {}, decision store {}, {} coordinators, {} s, seed {seed}, a fault every ~{} ms; data in {}",
        args.shards,
        args.participants.name(),
        args.clients,
        args.protocol,
        mode.name(),
        args.decision_store.name(),
        args.coordinators,
        args.duration,
        args.fault_every_ms,
        dir.path().display()
    );
    let mut store_args = args.decision_store.coordinator_args();
    if args.decision_store == DecisionStore::Shard {
        store_args.extend(["--takeover-after-ms".into(), args.takeover_after_ms.to_string()]);
    }
    let mut spec = cluster_spec(args.shards, dir.path().to_path_buf(), &store_args, &[]);
    spec.in_process = args.participants.in_process();
    let mut cluster = LocalCluster::start_proxied(spec)
        .await
        .context("starting the cluster")?;
    let takeover = [
        "--takeover-after-ms".to_string(),
        args.takeover_after_ms.to_string(),
    ];
    start_other_coordinators(&mut cluster, args.coordinators, args.decision_store, &takeover).await?;
    checker::create_markers(&cluster).await?;
    create_accounts(&cluster, args.accounts).await?;

    let timeline = Timeline::new(!args.json);
    let progress = Arc::new(Progress::default());
    let deadline = Instant::now() + Duration::from_secs(args.duration);
    let config = Arc::new(WorkloadConfig {
        endpoint: cluster.client_endpoint(),
        shards: cluster.shard_names.clone(),
        transactions: 10_000_000,
        concurrency: args.clients,
        shards_per_txn: 2,
        seed,
        protocol: args.protocol,
        mode,
        deadline,
        accounts: Some(args.accounts),
    });
    let clients = tokio::spawn(workload::run(Arc::clone(&config), Arc::clone(&progress)));

    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut kills = 0u64;
    // Kills per target (`coordinator`, `coordinator-2`, `s1`, `pg:s0`, ...), so a run shows that
    // each instance and the decision shards' servers were hit.
    let mut kills_by_target: BTreeMap<String, u64> = BTreeMap::new();
    let mut network_faults = 0u64;
    let mut runner = StepRunner::new(&mut cluster, &timeline);
    let shards = args.shards;
    let mut n = 0;
    while Instant::now() < deadline {
        let pause = rng.random_range(args.fault_every_ms / 2..=args.fault_every_ms * 3 / 2);
        tokio::time::sleep(
            Duration::from_millis(pause).min(deadline.saturating_duration_since(Instant::now())),
        )
        .await;
        if Instant::now() >= deadline {
            break;
        }
        n += 1;
        let shard = rng.random_range(0..shards);
        let down_for = Duration::from_millis(rng.random_range(0..=800));
        // In process, the participants live and die with the coordinator: their share of the
        // kills goes to it.
        let kind = match rng.random_range(0..10) {
            3..=5 if args.participants.in_process() => 0,
            kind => kind,
        };
        match kind {
            0..=2 => {
                let coordinator = match rng.random_range(1..=args.coordinators) {
                    1 => Process::Coordinator,
                    other => Process::OtherCoordinator(other),
                };
                runner.perform(n, &Action::Kill9(coordinator.clone())).await?;
                tokio::time::sleep(down_for).await;
                runner.perform(n, &Action::Restart(coordinator.clone())).await?;
                kills += 1;
                *kills_by_target.entry(coordinator.to_string()).or_default() += 1;
            }
            3..=5 => {
                runner
                    .perform(n, &Action::Kill9(Process::Participant(shard)))
                    .await?;
                tokio::time::sleep(down_for).await;
                runner
                    .perform(n, &Action::Restart(Process::Participant(shard)))
                    .await?;
                kills += 1;
                *kills_by_target.entry(format!("s{shard}")).or_default() += 1;
            }
            6 => {
                runner.perform(n, &Action::PgStop(shard)).await?;
                tokio::time::sleep(down_for).await;
                runner.perform(n, &Action::PgStart(shard)).await?;
                kills += 1;
                *kills_by_target.entry(format!("pg:s{shard}")).or_default() += 1;
            }
            kind => {
                let name = format!("s{shard}");
                let link = match rng.random_range(0..3) {
                    // Only the clients' link exists to fault in process.
                    _ if args.participants.in_process() => 2,
                    link => link,
                };
                let (from, to) = match link {
                    0 => ("coordinator".to_string(), name),
                    1 => (name, "coordinator".to_string()),
                    _ => ("client".to_string(), "coordinator".to_string()),
                };
                let fault = match kind {
                    7 => Fault::Drop,
                    8 => Fault::Reset,
                    _ => Fault::Delay(Duration::from_millis(rng.random_range(10..=300))),
                };
                runner.perform(n, &Action::Fault { from, to, fault }).await?;
                tokio::time::sleep(Duration::from_millis(rng.random_range(200..=1500))).await;
                runner.perform(n, &Action::Heal).await?;
                network_faults += 1;
            }
        }
        if args.json {
            // Keep a heartbeat on stderr even when the timeline is not live.
            eprintln!(
                "[{:>6.1}s] faults {n}: kills {kills}, network {network_faults}; finished {}",
                timeline.elapsed_s(),
                progress.finished.load(Ordering::SeqCst)
            );
        }
    }
    progress.stop.store(true, Ordering::SeqCst);
    let _ = tokio::time::timeout(Duration::from_secs(30), clients).await;
    runner.epilogue().await?;
    let live = runner.live_coordinator_endpoints();
    drop(runner);
    eprintln!("chaos over; waiting for recovery to converge ...");
    let shard_store = args.decision_store == DecisionStore::Shard;
    let (converged, took) =
        checker::await_convergence_via(&cluster, &live, Duration::from_secs(120), shard_store).await?;
    let told = progress.told.lock().map(|t| t.clone()).unwrap_or_default();
    let report = checker::check(&cluster, &told, converged, took).await?;
    let total = total_balance(&cluster).await?;
    let expected = args.accounts * INITIAL_BALANCE;
    let conserved = total == expected;
    let violations = report.violation_count() + usize::from(!conserved);

    println!(
        "faults injected:    {} process kills, {network_faults} network faults",
        kills
    );
    println!(
        "transactions:       committed {} aborted {} unknown {} abandoned {}",
        report.committed, report.aborted, report.unknown, report.abandoned
    );
    println!("balance conserved:  {conserved} ({expected} expected, {total} found)");
    println!("prepared left:      {}", report.prepared_left);
    println!("kills by target:    {kills_by_target:?}");
    if shard_store {
        println!(
            "decision rows left: {} commit, {} abort; aborts heard by cause: {:?}",
            report.decision_rows.commit, report.decision_rows.abort, report.abort_causes
        );
    }
    println!(
        "converged:          {converged} ({} ms after the last fault)",
        report.convergence_ms
    );
    println!("violations:         {violations}");
    for v in &report.violations {
        println!("  txid {} {}: {:?}", v.txid, v.kind, v.evidence);
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "seed": seed,
                "duration_s": args.duration,
                "protocol": args.protocol.name(),
                "mode": mode.name(),
                "kills": kills,
                "kills_by_target": kills_by_target,
                "decision_store": args.decision_store.name(),
                "coordinators": args.coordinators,
                "participants": args.participants.name(),
                "decision_commit_rows_left": report.decision_rows.commit,
                "decision_abort_rows": report.decision_rows.abort,
                "abort_causes": report.abort_causes,
                "network_faults": network_faults,
                "committed": report.committed,
                "aborted": report.aborted,
                "unknown": report.unknown,
                "abandoned": report.abandoned,
                "violations": violations,
                "prepared_left": report.prepared_left,
                "balance_conserved": conserved,
                "converged": converged,
                "convergence_ms": report.convergence_ms,
                "violation_details": report.violations,
            })
        );
    }
    if violations > 0 {
        bail!("{violations} violations (seed {seed})");
    }
    Ok(())
}

async fn create_accounts(cluster: &LocalCluster, accounts: i64) -> Result<()> {
    let shards = cluster.pgs.len() as i64;
    for (index, pg) in cluster.pgs.iter().enumerate() {
        let mut conn = pg.connect(DATABASE).await?;
        sqlx::raw_sql("CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL)")
            .execute(&mut conn)
            .await?;
        sqlx::query(
            "INSERT INTO accounts (id, balance) SELECT id, $3 FROM generate_series(0, $1 - 1) id WHERE id % $2 = $4",
        )
        .bind(accounts)
        .bind(shards)
        .bind(INITIAL_BALANCE)
        .bind(index as i64)
        .execute(&mut conn)
        .await?;
    }
    Ok(())
}

async fn total_balance(cluster: &LocalCluster) -> Result<i64> {
    let mut total = 0;
    for pg in &cluster.pgs {
        let mut conn = pg.connect(DATABASE).await?;
        let sum: Option<i64> = sqlx::query_scalar("SELECT sum(balance)::bigint FROM accounts")
            .fetch_one(&mut conn)
            .await?;
        total += sum.unwrap_or(0);
    }
    Ok(total)
}
