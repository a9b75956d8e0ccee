//! `treaty bench`: measures Treaty against the raw PostgreSQL ceiling on the same databases.
//!
//! It starts its own local cluster (PostgreSQL with fsync on, a participant per shard, a
//! coordinator), creates `bench_accounts`, then runs the workload with `--clients` concurrent
//! clients, alternating Treaty and each `--baseline` in `--rounds` rounds (so drift of the machine
//! hits both alike), and reports throughput, latency percentiles, aborts by reason and CPU per
//! transaction (see `report`). `--protocol 2pc,3pc` (or `both`) runs Treaty once per protocol in
//! the same rounds and reports them side by side; `--decision-store file,shard` does the same per
//! decision store, each on its own coordinator (see `stores`). `recovery` measures how fast a
//! restarted coordinator finishes logged commits (see `recovery`, `recovery_rows`).
//!
//! Modules: `args` (the command line), `workload` (transactions), `zipf`, `treaty_driver`,
//! `baselines` and `pipelined` (the systems), `stores` (decision stores side by side), `settle`
//! (a Treaty phase's deferred work charged to it), `stats` (histograms), `cpu` (/proc), `report`
//! (table and JSON), `plot` (SVG), `recovery`.

mod args;
mod baselines;
mod cpu;
mod pipelined;
mod plot;
mod recovery;
mod report;
mod settle;
mod stats;
mod stores;
mod treaty_driver;
mod workload;
mod zipf;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use serde_json::{Map, Value, json};
use treaty_harness::{ClusterSpec, LocalCluster, PgCluster, PgOptions};
use treaty_proto::Protocol;

pub use args::{BaselineArg, BenchArgs, CoordinatorKind, ProtocolChoice, service_thread_args};
use baselines::{Baseline, DirectClient};
use cpu::Watched;
use pipelined::PipelinedClient;
use report::{BenchReport, SweepPoint, SystemRun};
use stats::{Counts, Figures};
pub use stores::DecisionStore;
use treaty_driver::TreatyTarget;
use workload::{DATABASE, Generator, Skew, TxnPlan, WorkloadKind};

/// The database of `--decision-store database`'s server.
const DECISIONS_DATABASE: &str = "decisions";

/// Upper bound on transactions one client runs in one phase (the duration bounds it first).
const MAX_TXNS_PER_CLIENT_PHASE: u64 = 5_000_000;
/// How long PostgreSQL's CPU is sampled with no load, before the warm-up.
const IDLE_SAMPLE: Duration = Duration::from_secs(2);
/// Upper bound on the whole load: phases × seconds.
const MAX_TOTAL_LOAD_SECONDS: u64 = 4 * 3600;

/// What one phase runs against.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum System {
    /// Treaty with this protocol, reported under `name`, through coordinator `coordinator` (an
    /// index into `Ctx::coordinators`: one per decision store).
    Treaty {
        protocol: Protocol,
        name: &'static str,
        coordinator: usize,
    },
    Baseline(Baseline),
}

impl System {
    /// Treaty with `protocol`: `treaty` on its own (whichever protocol, as always), and with 3PC
    /// beside 2PC, 2PC stays `treaty` and 3PC is `treaty_3pc`.
    fn treaty(protocol: Protocol, side_by_side: bool) -> System {
        let name = match protocol {
            Protocol::ThreePhase if side_by_side => report::TREATY_3PC,
            _ => "treaty",
        };
        System::Treaty {
            protocol,
            name,
            coordinator: 0,
        }
    }

    fn name(self) -> &'static str {
        match self {
            System::Treaty { name, .. } => name,
            System::Baseline(b) => b.name(),
        }
    }
}

/// A coordinator the bench drives: one per decision store.
struct Coordinator {
    endpoint: String,
    /// Its process, whose CPU a phase on it counts; none when it runs in the bench's own.
    pid: Option<u32>,
    /// Set when it runs in the bench process (`--coordinator embedded`): the clients call it there.
    embedded: Option<Arc<treaty_coordinator::Embedded>>,
}

/// What the bench runs Treaty on.
enum Deployment {
    /// Processes: a coordinator service and, unless the shards are in process, an agent each.
    Services(Box<LocalCluster>),
    /// The coordinator inside this process (`--coordinator embedded`), on servers of its own;
    /// `stop` stops it before them (on an error path the process exits anyway).
    Embedded {
        embedded: Arc<treaty_coordinator::Embedded>,
        pgs: Vec<PgCluster>,
        shard_names: Vec<String>,
    },
}

impl Deployment {
    /// Starts PostgreSQL per shard and the coordinator in this process, configured as the
    /// service would be (the same flags, parsed by the coordinator's own `Config`).
    async fn embedded(
        args: &BenchArgs,
        base_dir: &std::path::Path,
        pg_options: &PgOptions,
        store: DecisionStore,
        decision_url: Option<&str>,
    ) -> Result<Deployment> {
        let mut pgs = Vec::with_capacity(args.shards);
        let mut shard_names = Vec::with_capacity(args.shards);
        let mut argv: Vec<String> = vec![
            "treaty-coordinator".into(),
            "--data-dir".into(),
            base_dir.join("coordinator").display().to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--lock-timeout-ms".into(),
            args.lock_timeout_ms.to_string(),
        ];
        argv.extend(store.coordinator_args(decision_url));
        for index in 0..args.shards {
            let name = format!("s{index}");
            let pg = PgCluster::start(base_dir, &name, pg_options)
                .await
                .with_context(|| format!("starting PostgreSQL for shard {name}"))?;
            pg.create_database(DATABASE).await?;
            argv.extend(["--shard".into(), format!("{name}={}", pg.url(DATABASE))]);
            pgs.push(pg);
            shard_names.push(name);
        }
        use clap::Parser as _;
        let config = treaty_coordinator::config::Config::resolve(
            treaty_coordinator::config::Args::try_parse_from(argv)
                .context("the embedded coordinator's flags")?,
        )?;
        let embedded = treaty_coordinator::Embedded::start(config)
            .await
            .context("starting the coordinator in this process")?;
        Ok(Deployment::Embedded {
            embedded: Arc::new(embedded),
            pgs,
            shard_names,
        })
    }

    fn pgs(&self) -> &[PgCluster] {
        match self {
            Deployment::Services(cluster) => &cluster.pgs,
            Deployment::Embedded { pgs, .. } => pgs,
        }
    }

    fn shard_names(&self) -> &[String] {
        match self {
            Deployment::Services(cluster) => &cluster.shard_names,
            Deployment::Embedded { shard_names, .. } => shard_names,
        }
    }

    fn cluster(&self) -> Option<&LocalCluster> {
        match self {
            Deployment::Services(cluster) => Some(cluster),
            Deployment::Embedded { .. } => None,
        }
    }

    /// The first store's coordinator.
    fn coordinator(&self) -> Coordinator {
        match self {
            Deployment::Services(cluster) => Coordinator {
                endpoint: cluster.coordinator_endpoint(),
                pid: cluster.coordinator.pid(),
                embedded: None,
            },
            Deployment::Embedded { embedded, .. } => Coordinator {
                endpoint: embedded.endpoint().to_owned(),
                pid: None,
                embedded: Some(embedded.clone()),
            },
        }
    }

    fn participant_pids(&self) -> Vec<u32> {
        match self {
            Deployment::Services(cluster) => cluster.participants.iter().filter_map(|p| p.pid()).collect(),
            Deployment::Embedded { .. } => Vec::new(),
        }
    }

    /// Stops the coordinator (an embedded one as its service would stop on SIGTERM), then the
    /// servers.
    async fn stop(self) -> Result<()> {
        match self {
            Deployment::Services(cluster) => drop(cluster),
            Deployment::Embedded { embedded, pgs, .. } => {
                embedded
                    .stop()
                    .await
                    .context("stopping the embedded coordinator")?;
                drop(pgs);
            }
        }
        Ok(())
    }
}

struct Ctx {
    generator: Generator,
    treaty: TreatyTarget,
    coordinators: Vec<Coordinator>,
    pg_urls: Vec<String>,
    watched: Watched,
    /// What a Treaty phase leaves on the servers, waited for after it (`settle`).
    leftovers: settle::Leftovers,
    lock_timeout_ms: u64,
    seed: u64,
}

struct PhaseResult {
    counts: Counts,
    /// The measured seconds (throughput and latency are theirs).
    elapsed: Duration,
    /// CPU of the measured seconds and, for Treaty, of its leftovers' settling.
    cpu: cpu::CpuSample,
    /// Treaty phases only.
    settled: Option<settle::Settled>,
}

enum Client {
    Treaty(treaty_driver::TreatyClient),
    Direct(DirectClient),
    Pipelined(PipelinedClient),
}

impl Client {
    async fn run(&mut self, ctx_treaty: &TreatyTarget, plan: &TxnPlan) -> Result<(), String> {
        match self {
            Client::Treaty(client) => treaty_driver::run_txn(client, ctx_treaty, plan).await,
            Client::Direct(client) => client.run_txn(plan).await,
            Client::Pipelined(client) => client.run_txn(plan).await,
        }
    }
}

fn bar(seconds: u64, label: &str) -> ProgressBar {
    let bar = ProgressBar::new(seconds.max(1));
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {prefix:<28} [{elapsed_precise}] {bar:25} {pos}/{len}s {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(label.to_string());
    bar
}

async fn run_phase(
    ctx: &Ctx,
    system: System,
    clients: usize,
    seconds: u64,
    label: &str,
    salt: u64,
) -> Result<PhaseResult> {
    let coordinator = match system {
        System::Treaty { coordinator, .. } => &ctx.coordinators[coordinator],
        System::Baseline(_) => &ctx.coordinators[0],
    };
    let treaty_target = match system {
        System::Treaty { protocol, .. } => TreatyTarget {
            protocol,
            endpoint: coordinator.endpoint.clone(),
            ..ctx.treaty.clone()
        },
        System::Baseline(_) => ctx.treaty.clone(),
    };
    // Connect every client before the clock starts.
    let mut connected = Vec::with_capacity(clients);
    for index in 0..clients {
        connected.push(match system {
            System::Treaty { .. } => Client::Treaty(match &coordinator.embedded {
                Some(embedded) => treaty_driver::TreatyClient::Embedded(embedded.clone()),
                None => treaty_driver::TreatyClient::Remote(
                    treaty_driver::connect(&treaty_target.endpoint).await?,
                ),
            }),
            System::Baseline(Baseline::DirectPipelined) => {
                let mut client = PipelinedClient::new(ctx.pg_urls.clone(), ctx.lock_timeout_ms, index);
                client
                    .connect_all()
                    .await
                    .context("opening the direct-pipelined baseline's sessions")?;
                Client::Pipelined(client)
            }
            System::Baseline(mode) => {
                let mut client = DirectClient::new(mode, ctx.pg_urls.clone(), ctx.lock_timeout_ms, index);
                client.connect_all().await.map_err(anyhow::Error::msg)?;
                Client::Direct(client)
            }
        });
    }
    let progress = bar(seconds, label);
    let committed = Arc::new(AtomicU64::new(0));
    // The coordinator that serves this phase is the one whose CPU counts.
    let watched = Watched {
        coordinator: coordinator.pid,
        ..ctx.watched.clone()
    };
    let before = watched.sample();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let tasks: Vec<_> = connected
        .into_iter()
        .enumerate()
        .map(|(index, mut client)| {
            let generator = ctx.generator.clone();
            let target = treaty_target.clone();
            let committed = Arc::clone(&committed);
            let seed = ctx.seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index as u64;
            tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let mut counts = Counts::default();
                for _ in 0..MAX_TXNS_PER_CLIENT_PHASE {
                    if Instant::now() >= deadline {
                        break;
                    }
                    let plan = generator.next(&mut rng);
                    let begun = Instant::now();
                    match client.run(&target, &plan).await {
                        Ok(()) => {
                            counts.commit(begun.elapsed());
                            committed.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(reason) => {
                            let back_off = reason.starts_with("rpc/Unavailable") || reason == "connect";
                            counts.abort(reason);
                            if back_off {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                }
                match client {
                    Client::Direct(client) => client.close().await,
                    Client::Pipelined(client) => client.close().await,
                    Client::Treaty(_) => {}
                }
                counts
            })
        })
        .collect();
    while Instant::now() < deadline {
        progress.set_position(started.elapsed().as_secs());
        progress.set_message(format!("{} commits", committed.load(Ordering::Relaxed)));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut counts = Counts::default();
    for task in tasks {
        counts.merge(&task.await.context("a bench client panicked")?);
    }
    let elapsed = started.elapsed();
    let settled = match system {
        System::Treaty { .. } => {
            progress.set_message("settling: waiting for its prepared branches and rows to go");
            let settled = ctx.leftovers.settle().await?;
            if settled.left > 0 {
                eprintln!(
                    "{label}: {} prepared branches and rows still left after {:.1} s; the rest of its \
                     deferred work is charged to the next phase",
                    settled.left,
                    settled.waited.as_secs_f64()
                );
            }
            Some(settled)
        }
        System::Baseline(_) => None,
    };
    let cpu = watched.sample().since(&before);
    progress.finish_and_clear();
    Ok(PhaseResult {
        counts,
        elapsed,
        cpu,
        settled,
    })
}

fn phase_line(label: &str, result: &PhaseResult) -> String {
    let f = Figures::of(&result.counts, result.elapsed);
    let settled = result
        .settled
        .map(|s| format!("  settled in {} ms", s.waited.as_millis()))
        .unwrap_or_default();
    format!(
        "{label:<28} {:>9.1} commits/s  p50 {:>7.2} ms  p95 {:>7.2} ms  p99 {:>7.2} ms  aborts {}{settled}",
        f.tps,
        f.p50_ms,
        f.p95_ms,
        f.p99_ms,
        result.counts.aborted()
    )
}

fn params(
    args: &BenchArgs,
    protocols: &[Protocol],
    stores: &[DecisionStore],
    baselines: &[Baseline],
    per_round: u64,
) -> Map<String, Value> {
    let mut map = Map::new();
    map.insert("workload".into(), json!(args.workload.name()));
    map.insert("shards".into(), json!(args.shards));
    map.insert("clients".into(), json!(args.clients));
    map.insert("service_threads".into(), json!(args.service_threads));
    map.insert("duration_s".into(), json!(args.duration));
    map.insert("round_s".into(), json!(per_round));
    map.insert("rounds".into(), json!(args.rounds));
    map.insert("warmup_s".into(), json!(args.warmup));
    map.insert("accounts".into(), json!(args.accounts));
    map.insert(
        "skew".into(),
        json!(match args.skew {
            Skew::Uniform => "uniform",
            Skew::Zipfian => "zipfian",
        }),
    );
    map.insert(
        "zipf_theta".into(),
        if args.skew == Skew::Zipfian {
            json!(args.zipf_theta)
        } else {
            Value::Null
        },
    );
    // What `treaty_*` measured: the one protocol, or 2PC when 3PC runs beside it.
    map.insert(
        "protocol".into(),
        json!(
            protocols
                .first()
                .copied()
                .unwrap_or(Protocol::TwoPhase)
                .short_name()
        ),
    );
    if protocols.len() > 1 {
        map.insert(
            "protocols".into(),
            json!(protocols.iter().map(|p| p.short_name()).collect::<Vec<_>>()),
        );
    }
    // What `treaty_*` measured; `decision_stores` in the report names every store's figures.
    map.insert(
        "decision_store".into(),
        json!(stores.first().copied().unwrap_or(DecisionStore::File).name()),
    );
    map.insert("participant_kind".into(), json!(args.participant_kind().name()));
    map.insert("coordinator_kind".into(), json!(args.coordinator_kind().name()));
    map.insert("interactive".into(), json!(args.interactive));
    map.insert("lock_timeout_ms".into(), json!(args.lock_timeout_ms));
    map.insert(
        "baselines".into(),
        json!(baselines.iter().map(|b| b.name()).collect::<Vec<_>>()),
    );
    map.insert("fsync".into(), json!(true));
    map.insert(
        "pg_settings".into(),
        json!(
            args.pg_settings
                .iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect::<Vec<_>>()
        ),
    );
    // A Treaty phase's CPU includes waiting out its deferred work, up to this long (`settle`).
    map.insert("settle_limit_s".into(), json!(settle::LIMIT.as_secs()));
    map.insert("cpu_ticks_per_s".into(), json!(cpu::ticks_per_second()));
    map
}

async fn count_prepared(pgs: &[PgCluster]) -> Result<i64> {
    let mut total = 0;
    for pg in pgs {
        total += pg.prepared_count(DATABASE).await?;
    }
    Ok(total)
}

pub async fn run(args: BenchArgs) -> Result<()> {
    args.validate()?;
    if args.workload == WorkloadKind::Recovery {
        return recovery::run(&args).await;
    }
    let mut baselines: Vec<Baseline> = Vec::new();
    for arg in &args.baseline {
        let baseline = match arg {
            BaselineArg::None => continue,
            BaselineArg::Direct => Baseline::Direct,
            BaselineArg::Independent => Baseline::Independent,
            BaselineArg::DirectPipelined => Baseline::DirectPipelined,
        };
        if !baselines.contains(&baseline) {
            baselines.push(baseline);
        }
    }
    let mut sweep_clients: Vec<usize> = if args.clients_list.is_empty() {
        vec![args.clients]
    } else {
        args.clients_list.clone()
    };
    sweep_clients.dedup();
    let protocols = ProtocolChoice::expand(&args.protocol);
    let side_by_side = protocols.len() > 1;
    let stores = args.stores();
    let per_round = (args.duration / u64::from(args.rounds)).max(1);
    let total = (per_round * u64::from(args.rounds) * sweep_clients.len() as u64 + args.warmup)
        * (protocols.len() + stores.len() - 1 + baselines.len()) as u64;
    anyhow::ensure!(
        total <= MAX_TOTAL_LOAD_SECONDS,
        "this would run {total} s of load; keep it under {MAX_TOTAL_LOAD_SECONDS} s"
    );
    let generator = Generator::new(
        args.workload,
        args.shards,
        args.accounts,
        args.skew,
        args.zipf_theta,
    )?;
    let seed = args.seed.unwrap_or_else(treaty_proto::now_ms);
    let params = params(&args, &protocols, &stores, &baselines, per_round);

    let temp = tempfile::Builder::new().prefix("treaty-bench-").tempdir()?;
    let base_dir = match &args.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            std::fs::canonicalize(dir)?
        }
        None => temp.path().to_path_buf(),
    };
    let max_clients = sweep_clients.iter().copied().max().unwrap_or(args.clients);
    let pg_options = PgOptions {
        max_connections: (max_clients as u32 + 150).max(200),
        extra: args.pg_settings.clone(),
        ..PgOptions::default()
    };
    // `--decision-store database`: a server of its own for the decisions, as a team would run it.
    let decision_database = if stores.contains(&DecisionStore::Database) {
        eprintln!("starting the decision database (PostgreSQL with fsync on)");
        let pg = PgCluster::start(&base_dir, "decisions", &pg_options)
            .await
            .context("starting the decision database")?;
        pg.create_database(DECISIONS_DATABASE).await?;
        Some(pg)
    } else {
        None
    };
    let decision_url = decision_database.as_ref().map(|pg| pg.url(DECISIONS_DATABASE));
    let in_process = args.participant_kind().in_process();
    // Every further store's coordinator gets its port now, so that the participants know every
    // instance from the start, as a deployment configures them: a participant deletes a marker
    // row only once a coordinator it asks says it no longer needs it, and it asks only the
    // coordinators it was given (`participant/src/reconcile.rs`).
    let extra_ports: Vec<treaty_harness::PortReservation> = stores[1..]
        .iter()
        .map(|_| treaty_harness::reserve_loopback_port())
        .collect::<Result<_, _>>()?;
    let embedded = args.coordinator_kind() == CoordinatorKind::Embedded;
    eprintln!(
        "starting {} shards (PostgreSQL with fsync on, {} participants) and a coordinator ({}) in {}",
        args.shards,
        args.participant_kind().name(),
        args.coordinator_kind().name(),
        base_dir.display()
    );
    let deployment = if embedded {
        Deployment::embedded(&args, &base_dir, &pg_options, stores[0], decision_url.as_deref()).await?
    } else {
        Deployment::Services(Box::new(
            LocalCluster::start(ClusterSpec {
                shards: args.shards,
                base_dir: base_dir.clone(),
                pg: pg_options.clone(),
                // The cluster's coordinator serves the first store; the others get instances below.
                coordinator_args: [
                    service_thread_args(args.service_threads),
                    stores[0].coordinator_args(decision_url.as_deref()),
                    // In process, the participant's sessions start with the coordinator's branch lock
                    // timeout: the bench's, as the agents' sessions do (`--session-lock-timeout-ms`).
                    if in_process {
                        vec!["--lock-timeout-ms".to_string(), args.lock_timeout_ms.to_string()]
                    } else {
                        Vec::new()
                    },
                ]
                .concat(),
                participant_args: {
                    // Sessions start with the bench's lock timeout, as the direct baseline's do (it sets
                    // it once per connection): Treaty's branches then need no `SET LOCAL` for it.
                    let mut participant = service_thread_args(args.service_threads);
                    participant.extend([
                        "--session-lock-timeout-ms".to_string(),
                        args.lock_timeout_ms.to_string(),
                    ]);
                    for port in &extra_ports {
                        participant.extend(["--coordinator".to_string(), format!("http://{}", port.addr())]);
                    }
                    participant
                },
                database: DATABASE.into(),
                coordinator_port: 0,
                in_process,
                tls: None,
            })
            .await
            .context("starting the local cluster")?,
        ))
    };
    workload::create_schema(deployment.pgs(), args.accounts).await?;
    // Another instance per further store, over the same participants and databases; kept until
    // the end (dropping one stops it).
    let mut extra_coordinators = Vec::new();
    for (store, port) in stores[1..].iter().zip(extra_ports) {
        let process = deployment
            .cluster()
            .context("stores side by side run coordinator services")?
            .spawn_coordinator_on(
                &format!("bench-{}", store.name()),
                &[
                    service_thread_args(args.service_threads),
                    store.coordinator_args(decision_url.as_deref()),
                ]
                .concat(),
                port,
            )
            .await
            .with_context(|| format!("starting a coordinator with --decision-store {}", store.name()))?;
        extra_coordinators.push(process);
    }
    let coordinators: Vec<Coordinator> = std::iter::once(deployment.coordinator())
        .chain(extra_coordinators.iter().map(|process| Coordinator {
            endpoint: process.endpoint(),
            pid: process.pid(),
            embedded: None,
        }))
        .collect();

    let endpoint = coordinators[0].endpoint.clone();
    let mut measured = Vec::new();
    let mut unsupported = Vec::new();
    for &protocol in &protocols {
        match treaty_driver::probe_protocol(&endpoint, protocol).await? {
            Ok(()) => measured.push(protocol),
            Err(message) => unsupported.push((protocol, message)),
        }
    }
    if measured.is_empty() {
        let message = unsupported
            .first()
            .map(|(_, message)| message.clone())
            .unwrap_or_default();
        println!(
            "protocol {}: unsupported by this coordinator ({message}); nothing measured",
            protocols
                .iter()
                .map(|p| p.short_name())
                .collect::<Vec<_>>()
                .join(",")
        );
        if args.json {
            println!("{}", report::unsupported_json(params, &message));
        }
        return Ok(());
    }
    for (protocol, message) in &unsupported {
        println!(
            "protocol {}: unsupported by this coordinator ({message}); measuring {} only",
            protocol.short_name(),
            measured
                .iter()
                .map(|p| p.short_name())
                .collect::<Vec<_>>()
                .join(",")
        );
    }
    let three_phase = if !side_by_side {
        report::SideBySide::Off
    } else {
        match unsupported.iter().find(|(p, _)| *p == Protocol::ThreePhase) {
            Some((_, message)) => report::SideBySide::Unsupported(message.clone()),
            None => report::SideBySide::Measured,
        }
    };
    // Several stores run 2PC only (validate refuses 3PC beside the shard store): one system per
    // store, the first keeping `treaty`.
    let treaties: Vec<System> = if stores.len() > 1 {
        stores
            .iter()
            .enumerate()
            .map(|(index, store)| System::Treaty {
                protocol: measured[0],
                name: store.system_name(index == 0),
                coordinator: index,
            })
            .collect()
    } else {
        measured
            .iter()
            .map(|&protocol| System::treaty(protocol, side_by_side))
            .collect()
    };
    let store_systems: Vec<(DecisionStore, String)> = stores
        .iter()
        .zip(&treaties)
        .map(|(store, system)| (*store, system.name().to_string()))
        .collect();
    let systems: Vec<System> = treaties
        .into_iter()
        .chain(baselines.iter().copied().map(System::Baseline))
        .collect();

    let watched = Watched {
        coordinator: coordinators[0].pid,
        participants: deployment.participant_pids(),
        postmasters: deployment
            .pgs()
            .iter()
            .chain(decision_database.iter())
            .filter_map(|pg| cpu::postmaster_pid(pg.data_dir()))
            .collect(),
    };
    let leftovers = settle::Leftovers::open(
        &deployment
            .pgs()
            .iter()
            .map(|pg| (pg.name().to_string(), pg.url(DATABASE)))
            .chain(
                decision_database
                    .iter()
                    .map(|pg| (pg.name().to_string(), pg.url(DECISIONS_DATABASE))),
            )
            .collect::<Vec<_>>(),
    )
    .await?;
    let ctx = Ctx {
        generator,
        coordinators,
        treaty: TreatyTarget {
            endpoint,
            shard_names: deployment.shard_names().to_vec(),
            // Set per phase from the system (run_phase).
            protocol: measured[0],
            interactive: args.interactive,
            lock_timeout_ms: args.lock_timeout_ms,
        },
        pg_urls: deployment.pgs().iter().map(|pg| pg.url(DATABASE)).collect(),
        watched,
        leftovers,
        lock_timeout_ms: args.lock_timeout_ms,
        seed,
    };
    eprintln!(
        "{} on {} shards, {} accounts ({:?}), {} s per system in {} rounds of {per_round} s, systems: {}",
        args.workload.name(),
        args.shards,
        args.accounts,
        args.skew,
        args.duration,
        args.rounds,
        systems.iter().map(|s| s.name()).collect::<Vec<_>>().join(", ")
    );

    // PostgreSQL's CPU with no load at all (WAL writer, checkpointer, autovacuum, stats, the
    // participants' and coordinators' own polls): a fixed cost per second that the per-transaction
    // figures charge more heavily to the slower system, so the report gives it separately.
    let idle_before = ctx.watched.sample();
    let idle_started = Instant::now();
    tokio::time::sleep(IDLE_SAMPLE).await;
    let idle = ctx.watched.sample().since(&idle_before);
    let idle_us_per_s = cpu::ticks_to_us(idle.postgres) / idle_started.elapsed().as_secs_f64();
    let mut params = params;
    params.insert("postgres_idle_cpu_us_per_s".into(), json!(idle_us_per_s.round()));
    eprintln!("PostgreSQL CPU with no load: {idle_us_per_s:.0} µs/s");
    let mut salt = 0u64;
    if args.warmup > 0 {
        for system in &systems {
            salt += 1;
            let label = format!("warm-up {}", system.name());
            let result = run_phase(&ctx, *system, sweep_clients[0], args.warmup, &label, salt).await?;
            eprintln!("{}", phase_line(&label, &result));
        }
    }
    let mut sweep = Vec::new();
    let mut rounds = Vec::new();
    for &clients in &sweep_clients {
        let mut runs: Vec<SystemRun> = systems.iter().map(|s| SystemRun::new(s.name())).collect();
        for round in 1..=args.rounds {
            for (system, run) in systems.iter().zip(runs.iter_mut()) {
                salt += 1;
                let label = format!("{clients} clients r{round}/{} {}", args.rounds, system.name());
                let result = run_phase(&ctx, *system, clients, per_round, &label, salt).await?;
                eprintln!("{}", phase_line(&label, &result));
                let f = Figures::of(&result.counts, result.elapsed);
                rounds.push(json!({
                    "clients": clients,
                    "round": round,
                    "system": system.name(),
                    "tps": (f.tps * 10.0).round() / 10.0,
                    "p50_ms": f.p50_ms,
                    "p99_ms": f.p99_ms,
                    "committed": result.counts.committed,
                    "aborted": result.counts.aborted(),
                    "settle_ms": result.settled.map(|s| s.waited.as_millis() as u64),
                    "left_after_settle": result.settled.map(|s| s.left),
                }));
                run.add(&result.counts, result.elapsed, &result.cpu);
            }
        }
        sweep.push(SweepPoint {
            clients,
            systems: runs,
        });
    }
    let main = sweep
        .iter()
        .find(|point| point.clients == args.clients)
        .or(sweep.last())
        .cloned()
        .context("no measurement")?;
    let prepared_left = count_prepared(deployment.pgs()).await.unwrap_or(-1);
    let mut report = BenchReport {
        params,
        main,
        sweep,
        rounds,
        prepared_left,
        plots: Vec::new(),
        three_phase,
        stores: store_systems,
    };
    if let Some(dir) = &args.plot {
        report.plots = plot::write_plots(dir, args.workload.name(), &report)
            .with_context(|| format!("writing plots into {}", dir.display()))?;
    }
    report.print_table();
    if args.json {
        println!("{}", report.to_json());
    }
    drop(extra_coordinators);
    drop(ctx);
    deployment.stop().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn treaty_keeps_its_name_unless_three_phase_runs_beside_two_phase() {
        assert_eq!(System::treaty(Protocol::TwoPhase, false).name(), "treaty");
        assert_eq!(System::treaty(Protocol::ThreePhase, false).name(), "treaty");
        assert_eq!(System::treaty(Protocol::TwoPhase, true).name(), "treaty");
        assert_eq!(System::treaty(Protocol::ThreePhase, true).name(), "treaty_3pc");
    }
}
