//! `treaty demo`: the README's main job. Starts a local cluster, spreads bank accounts over the
//! shards, runs concurrent cross-shard transfers while SIGKILLing and restarting the coordinator,
//! waits for recovery to converge, and checks atomicity from the databases themselves.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use sqlx::Row;
use tonic::transport::Channel;
use treaty_harness::{ClusterSpec, LocalCluster, PgOptions};
use treaty_proto::pb;
use treaty_proto::pb::coordinator_client::CoordinatorClient;

use crate::scenario::spec::DecisionStore;

const INITIAL_BALANCE: i64 = 1_000;
const DATABASE: &str = "treaty";

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Seconds of transfers.
    #[arg(long, default_value_t = 20)]
    pub duration: u64,
    /// Shards (PostgreSQL clusters, one participant each).
    #[arg(long, default_value_t = 3)]
    pub shards: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Bank accounts, spread over the shards.
    #[arg(long, default_value_t = 300)]
    pub accounts: i64,
    /// Times the coordinator is SIGKILLed and restarted during the run.
    #[arg(long, default_value_t = 2)]
    pub coordinator_kills: u32,
    /// Seed of the workload and kill schedule (printed, so a run can be repeated). Default: random.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Where the coordinator keeps commit decisions: `file` (its decision log) or `shard` (a row
    /// in `treaty.decisions` committed inside each transfer's first branch).
    #[arg(long, value_enum, default_value_t = DecisionStore::Shard)]
    pub decision_store: DecisionStore,
    /// Keep the cluster's data here instead of a temporary directory.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
    /// TLS on every link (a throw-away CA and certificates, client certificates required), as
    /// `treaty dev up --tls`.
    #[arg(long)]
    pub tls: bool,
    /// How the coordinator reaches the databases: agent (a participant process per shard) or
    /// in-process (the coordinator drives them itself; its kills take them down with it).
    #[arg(long, value_enum, default_value = "agent")]
    pub participants: crate::ParticipantKind,
}

/// What the clients saw, per transfer id.
#[derive(Default)]
struct Acknowledged {
    committed: Vec<i64>,
    aborted: Vec<i64>,
    unknown: Vec<i64>,
    latencies_us: Vec<u64>,
    abort_causes: HashMap<String, u64>,
}

struct Counters {
    committed: AtomicU64,
    aborted: AtomicU64,
    unknown: AtomicU64,
}

fn shard_of(account: i64, shards: usize) -> usize {
    (account % shards as i64) as usize
}

fn int(value: i64) -> pb::Value {
    pb::Value {
        kind: Some(pb::value::Kind::Int64(value)),
    }
}

fn transfer_ops(shards: &[String], from: i64, to: i64, amount: i64, id: i64) -> Vec<pb::Op> {
    let leg = |account: i64, delta: i64| {
        let shard = shards[shard_of(account, shards.len())].clone();
        [
            pb::Op {
                shard: shard.clone(),
                sql: "UPDATE accounts SET balance = balance + $1 WHERE id = $2".into(),
                params: vec![int(delta), int(account)],
                expect_rows: Some(1),
            },
            pb::Op {
                shard,
                sql: "INSERT INTO transfers (id, account, delta) VALUES ($1, $2, $3)".into(),
                params: vec![int(id), int(account), int(delta)],
                expect_rows: Some(1),
            },
        ]
    };
    leg(from, -amount).into_iter().chain(leg(to, amount)).collect()
}

async fn create_schema(cluster: &LocalCluster, accounts: i64) -> Result<()> {
    let shards = cluster.pgs.len();
    for (index, pg) in cluster.pgs.iter().enumerate() {
        let mut conn = pg.connect(DATABASE).await?;
        sqlx::raw_sql(
            "CREATE TABLE accounts (id bigint PRIMARY KEY, balance bigint NOT NULL CHECK (balance >= 0));
             CREATE TABLE transfers (id bigint PRIMARY KEY, account bigint NOT NULL, delta bigint NOT NULL);",
        )
        .execute(&mut conn)
        .await
        .with_context(|| format!("creating tables on shard {index}"))?;
        sqlx::query(
            "INSERT INTO accounts (id, balance) SELECT id, $1 FROM generate_series(0, $2 - 1) AS id WHERE id % $3 = $4",
        )
        .bind(INITIAL_BALANCE)
        .bind(accounts)
        .bind(shards as i64)
        .bind(index as i64)
        .execute(&mut conn)
        .await
        .with_context(|| format!("creating accounts on shard {index}"))?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn client_loop(
    worker: u64,
    seed: u64,
    mut client: CoordinatorClient<Channel>,
    shards: Vec<String>,
    accounts: i64,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
) -> Acknowledged {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(worker));
    let mut seen = Acknowledged::default();
    let mut sequence = 0i64;
    while !stop.load(Ordering::Relaxed) {
        let from = rng.random_range(0..accounts);
        let mut to = rng.random_range(0..accounts);
        while shard_of(to, shards.len()) == shard_of(from, shards.len()) && shards.len() > 1 {
            to = rng.random_range(0..accounts);
        }
        let amount = rng.random_range(1..=50);
        sequence += 1;
        let id = ((worker as i64) << 40) | sequence;
        let mut request = tonic::Request::new(pb::SubmitRequest {
            ops: transfer_ops(&shards, from, to, amount, id),
            options: Some(pb::TransactionOptions {
                label: format!("transfer {id}"),
                ..Default::default()
            }),
            wait_for_apply: false,
        });
        request.set_timeout(Duration::from_secs(10));
        let started = Instant::now();
        match client.submit(request).await {
            Ok(response) => {
                let outcome = response.into_inner().outcome.unwrap_or_default();
                if outcome.kind == pb::OutcomeKind::Committed as i32 {
                    seen.committed.push(id);
                    seen.latencies_us.push(started.elapsed().as_micros() as u64);
                    counters.committed.fetch_add(1, Ordering::Relaxed);
                } else {
                    let cause = outcome.abort.map_or(0, |a| a.cause);
                    let cause = pb::AbortCause::try_from(cause).map_or("unknown".into(), |c| {
                        c.as_str_name().trim_start_matches("ABORT_CAUSE_").to_lowercase()
                    });
                    *seen.abort_causes.entry(cause).or_default() += 1;
                    seen.aborted.push(id);
                    counters.aborted.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => {
                // Coordinator down or the answer lost: the outcome is unknown to this client,
                // and the checker holds it to all-or-nothing. Back off while it restarts.
                seen.unknown.push(id);
                counters.unknown.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    seen
}

struct Verdict {
    total_before: i64,
    total_after: i64,
    half_applied: Vec<i64>,
    lost_commits: Vec<i64>,
    applied_aborts: Vec<i64>,
    prepared_left: i64,
}

impl Verdict {
    fn ok(&self) -> bool {
        self.total_before == self.total_after
            && self.half_applied.is_empty()
            && self.lost_commits.is_empty()
            && self.applied_aborts.is_empty()
            && self.prepared_left == 0
    }
}

async fn count_prepared(cluster: &LocalCluster) -> Result<i64> {
    let mut total = 0;
    for pg in &cluster.pgs {
        let mut conn = pg.connect(DATABASE).await?;
        let n: i64 = sqlx::query_scalar(crate::PREPARED_TREATY_GIDS_SQL)
            .fetch_one(&mut conn)
            .await?;
        total += n;
    }
    Ok(total)
}

/// Waits (bounded) until no Treaty transaction is prepared on any shard and the coordinator has
/// nothing in doubt.
async fn await_convergence(cluster: &LocalCluster, progress: &ProgressBar) -> Result<Duration> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(90);
    let mut client = cluster.client().await?;
    loop {
        let prepared = count_prepared(cluster).await?;
        let in_doubt = client
            .list_transactions(pb::ListTransactionsRequest {
                filter: pb::ListFilter::InDoubt as i32,
                limit: 1,
            })
            .await
            .map(|r| r.into_inner().transactions.len())
            .unwrap_or(1);
        if prepared == 0 && in_doubt == 0 {
            return Ok(started.elapsed());
        }
        if Instant::now() > deadline {
            progress.println(format!(
                "recovery did not converge in 90 s: {prepared} prepared, {in_doubt} in doubt"
            ));
            return Ok(started.elapsed());
        }
        progress.set_message(format!(
            "waiting for recovery: {prepared} prepared branches, {in_doubt} in doubt"
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn check(cluster: &LocalCluster, accounts: i64, seen: &Acknowledged) -> Result<Verdict> {
    let mut total_after = 0i64;
    let mut legs: HashMap<i64, usize> = HashMap::new();
    for pg in &cluster.pgs {
        let mut conn = pg.connect(DATABASE).await?;
        let sum: Option<i64> = sqlx::query_scalar("SELECT sum(balance)::bigint FROM accounts")
            .fetch_one(&mut conn)
            .await?;
        total_after += sum.unwrap_or(0);
        for row in sqlx::query("SELECT id FROM transfers")
            .fetch_all(&mut conn)
            .await?
        {
            *legs.entry(row.try_get::<i64, _>(0)?).or_default() += 1;
        }
    }
    let mut half_applied: Vec<i64> = legs.iter().filter(|(_, n)| **n != 2).map(|(id, _)| *id).collect();
    half_applied.sort_unstable();
    let present: HashSet<i64> = legs.keys().copied().collect();
    Ok(Verdict {
        total_before: accounts * INITIAL_BALANCE,
        total_after,
        half_applied,
        lost_commits: seen
            .committed
            .iter()
            .filter(|id| legs.get(id) != Some(&2))
            .copied()
            .collect(),
        applied_aborts: seen
            .aborted
            .iter()
            .filter(|id| present.contains(id))
            .copied()
            .collect(),
        prepared_left: count_prepared(cluster).await?,
    })
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)] as f64 / 1000.0
}

fn progress_bar(seconds: u64) -> ProgressBar {
    let bar = ProgressBar::new(seconds);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len}s {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

pub async fn run(args: DemoArgs) -> Result<()> {
    anyhow::ensure!(
        args.shards >= 2,
        "--shards must be at least 2 for cross-shard transfers"
    );
    anyhow::ensure!(
        args.accounts >= args.shards as i64,
        "--accounts must be at least --shards"
    );
    anyhow::ensure!(
        (1..=3600).contains(&args.duration),
        "--duration must be between 1 and 3600 seconds"
    );
    anyhow::ensure!(
        (1..=256).contains(&args.clients),
        "--clients must be between 1 and 256"
    );
    crate::fault_build::check_service_binaries()?;
    let seed = args.seed.unwrap_or_else(treaty_proto::now_ms);
    let temp = tempfile::Builder::new().prefix("treaty-demo-").tempdir()?;
    let base_dir = match &args.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            std::fs::canonicalize(dir)?
        }
        None => temp.path().to_path_buf(),
    };
    eprintln!(
        "starting {} shards (PostgreSQL + {}) and a coordinator (decision store: {}) in {}",
        args.shards,
        match args.participants {
            crate::ParticipantKind::Agent => "a participant agent each",
            crate::ParticipantKind::InProcess => "driven by the coordinator in its process",
        },
        args.decision_store.name(),
        base_dir.display()
    );
    let spec = ClusterSpec {
        shards: args.shards,
        base_dir: base_dir.clone(),
        pg: PgOptions::default(),
        coordinator_args: [
            vec![
                "--idle-timeout-ms".into(),
                "5000".into(),
                "--lock-timeout-ms".into(),
                "2000".into(),
            ],
            args.decision_store.coordinator_args(),
        ]
        .concat(),
        participant_args: vec![
            "--branch-idle-timeout-ms".into(),
            "3000".into(),
            "--in-doubt-after-ms".into(),
            "1000".into(),
        ],
        database: DATABASE.into(),
        coordinator_port: 0,
        in_process: args.participants.in_process(),
        tls: if args.tls {
            Some(
                treaty_proto::tls::dev_certs::write_dev_certs(&base_dir.join("tls"), "treaty-demo-client")
                    .context("making the demo's CA and certificates")?,
            )
        } else {
            None
        },
    };
    let mut cluster = LocalCluster::start(spec)
        .await
        .context("starting the local cluster")?;
    create_schema(&cluster, args.accounts).await?;
    eprintln!(
        "{} accounts of {INITIAL_BALANCE} over {} shards; {} clients transfer for {} s (seed {seed}); the coordinator is SIGKILLed {} times",
        args.accounts, args.shards, args.clients, args.duration, args.coordinator_kills
    );

    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters {
        committed: AtomicU64::new(0),
        aborted: AtomicU64::new(0),
        unknown: AtomicU64::new(0),
    });
    let channel = cluster
        .endpoint_to(&cluster.coordinator_endpoint())?
        .connect_timeout(Duration::from_secs(1))
        .connect_lazy();
    let workers: Vec<_> = (0..args.clients as u64)
        .map(|worker| {
            tokio::spawn(client_loop(
                worker,
                seed,
                CoordinatorClient::new(channel.clone()),
                cluster.shard_names.clone(),
                args.accounts,
                Arc::clone(&stop),
                Arc::clone(&counters),
            ))
        })
        .collect();

    let progress = progress_bar(args.duration);
    let started = Instant::now();
    let run_for = Duration::from_secs(args.duration);
    let kill_at: Vec<Duration> = (1..=args.coordinator_kills)
        .map(|k| run_for * k / (args.coordinator_kills + 1))
        .collect();
    let mut kills = 0u32;
    let mut last_line = Instant::now();
    while started.elapsed() < run_for {
        if kill_at
            .get(kills as usize)
            .is_some_and(|at| started.elapsed() >= *at)
        {
            cluster.coordinator.kill9().context("killing the coordinator")?;
            kills += 1;
            progress.println(format!(
                "[{:>5.1}s] coordinator SIGKILLed (kill {kills}); restarting",
                started.elapsed().as_secs_f64()
            ));
            cluster
                .coordinator
                .restart()
                .await
                .context("restarting the coordinator")?;
            progress.println(format!(
                "[{:>5.1}s] coordinator back; replayed its decision log",
                started.elapsed().as_secs_f64()
            ));
        }
        let message = format!(
            "committed {} aborted {} unknown {} kills {kills}",
            counters.committed.load(Ordering::Relaxed),
            counters.aborted.load(Ordering::Relaxed),
            counters.unknown.load(Ordering::Relaxed)
        );
        progress.set_position(started.elapsed().as_secs());
        if progress.is_hidden() && last_line.elapsed() >= Duration::from_secs(5) {
            eprintln!("[{:>5.1}s] {message}", started.elapsed().as_secs_f64());
            last_line = Instant::now();
        }
        progress.set_message(message);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut seen = Acknowledged::default();
    for worker in workers {
        let part = worker.await?;
        seen.committed.extend(part.committed);
        seen.aborted.extend(part.aborted);
        seen.unknown.extend(part.unknown);
        seen.latencies_us.extend(part.latencies_us);
        for (cause, n) in part.abort_causes {
            *seen.abort_causes.entry(cause).or_default() += n;
        }
    }
    let elapsed = started.elapsed();
    let convergence = await_convergence(&cluster, &progress).await?;
    progress.finish_and_clear();
    let verdict = check(&cluster, args.accounts, &seen).await?;
    seen.latencies_us.sort_unstable();
    let throughput = seen.committed.len() as f64 / elapsed.as_secs_f64();
    let (p50, p99) = (
        percentile(&seen.latencies_us, 0.50),
        percentile(&seen.latencies_us, 0.99),
    );

    let ok = verdict.ok();
    println!("verdict:            {}", if ok { "ok" } else { "VIOLATED" });
    println!(
        "balance conserved:  {} ({} before, {} after)",
        verdict.total_before == verdict.total_after,
        verdict.total_before,
        verdict.total_after
    );
    println!(
        "half-applied:       {} {:?}",
        verdict.half_applied.len(),
        first(&verdict.half_applied)
    );
    println!(
        "lost commits:       {} {:?}",
        verdict.lost_commits.len(),
        first(&verdict.lost_commits)
    );
    println!(
        "applied aborts:     {} {:?}",
        verdict.applied_aborts.len(),
        first(&verdict.applied_aborts)
    );
    println!("prepared left:      {}", verdict.prepared_left);
    println!("committed:          {}", seen.committed.len());
    println!(
        "aborted:            {} {:?}",
        seen.aborted.len(),
        seen.abort_causes
    );
    println!("unknown (in flight at a kill): {}", seen.unknown.len());
    println!("coordinator kills:  {kills}");
    println!("throughput:         {throughput:.1} commits/s");
    println!("latency:            p50 {p50:.2} ms, p99 {p99:.2} ms");
    println!("recovery converged: {} ms after the run", convergence.as_millis());
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "verdict": if ok { "ok" } else { "violated" },
                "committed": seen.committed.len(),
                "aborted": seen.aborted.len(),
                "unknown": seen.unknown.len(),
                "coordinator_kills": kills,
                "decision_store": args.decision_store.name(),
                "participants": args.participants.name(),
                "tls": args.tls,
                "balance_conserved": verdict.total_before == verdict.total_after,
                "half_applied": verdict.half_applied.len(),
                "lost_commits": verdict.lost_commits.len(),
                "applied_aborts": verdict.applied_aborts.len(),
                "prepared_left": verdict.prepared_left,
                "throughput_tps": (throughput * 10.0).round() / 10.0,
                "latency_p50_ms": p50,
                "latency_p99_ms": p99,
                "seed": seed,
            })
        );
    }
    drop(cluster);
    if !ok {
        anyhow::bail!("atomicity violated");
    }
    Ok(())
}

fn first(ids: &[i64]) -> &[i64] {
    &ids[..ids.len().min(5)]
}
