//! `treaty scenario run FILE|DIR`: replays recovery scenarios. Each scenario starts a local cluster
//! (with fault proxies on every link unless it opts out), runs a marker-writing workload while a
//! schedule of fault steps fires (failpoints, kill -9, restarts, PostgreSQL crashes, network
//! faults), lets recovery converge, runs the atomicity checker, and prints a timeline and a verdict.
//!
//! - `spec`: the file format; `schedule`: each step's trigger and action; `validate`: the whole
//!   file checked before anything runs;
//! - `runner`: carrying out steps on a running cluster (`StepRunner`, shared with `treaty chaos`);
//! - `workload`: the clients; `checker`: the verdict; `timeline`: what happened, in order;
//! - `coordinator_down`: the `await-convergence` step (do the participants finish while the
//!   coordinator stays down?) and its expectations;
//! - `standby`: a shard's synchronous standby (`topology.standby`) and `pg-failover` onto it;
//! - `in_process`: a scenario run with in-process participants (`--participants in-process`).

pub mod checker;
pub mod coordinator_down;
mod in_process;
pub mod runner;
pub mod schedule;
pub mod spec;
pub mod standby;
pub mod timeline;
mod validate;
pub mod workload;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use treaty_harness::{ClusterSpec, LocalCluster, PgOptions};
use treaty_proto::{Protocol, pb};

use checker::Report;
use coordinator_down::DownObservation;
pub use runner::StepRunner;
use schedule::{Action, Trigger};
use spec::{DecisionStore, Scenario};
use timeline::Timeline;
use workload::{Progress, WorkloadConfig};

#[derive(clap::Subcommand, Debug)]
pub enum ScenarioCommand {
    /// Run scenario files (a file, or every .toml under a directory, recursively, in name order).
    Run(RunArgs),
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Scenario files or directories.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Print one JSON object as the last line: passed, failed, violations, per-scenario results.
    #[arg(long)]
    pub json: bool,
    /// Keep each scenario's data directory (cluster data and process logs) and print where.
    #[arg(long)]
    pub keep: bool,
    /// How the coordinator reaches the databases: agent (a participant process per shard) or
    /// in-process (the coordinator drives them itself: what a step does to a participant it
    /// does to the coordinator; scenarios that need agents are skipped, with the reason).
    #[arg(long, value_enum, default_value = "agent")]
    pub participants: crate::ParticipantKind,
}

/// A scenario not run, and why.
#[derive(Debug, Serialize)]
pub struct Skipped {
    pub name: String,
    pub file: String,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct ScenarioResult {
    pub name: String,
    pub file: String,
    pub passed: bool,
    pub reasons: Vec<String>,
    pub violations: usize,
    pub report: Option<Report>,
    /// What the `await-convergence` step saw, if the scenario has one.
    pub while_coordinator_down: Option<DownObservation>,
    pub seconds: f64,
}

/// What [`drive`] hands back: the checker's report, reasons the schedule did not go as written,
/// and what the `await-convergence` step saw.
struct Driven {
    report: Report,
    reasons: Vec<String>,
    while_coordinator_down: Option<DownObservation>,
}

pub async fn run(command: ScenarioCommand) -> Result<()> {
    let ScenarioCommand::Run(args) = command;
    let files = collect(&args.paths)?;
    if files.is_empty() {
        bail!("no scenario files (*.toml) found in {:?}", args.paths);
    }
    // Parse everything first: a typo in the tenth file should not cost nine cluster runs.
    let scenarios: Vec<(PathBuf, Scenario)> = files
        .into_iter()
        .map(|file| Scenario::load(&file).map(|s| (file, s)))
        .collect::<Result<_>>()?;
    crate::fault_build::check_service_binaries()?;
    let total = scenarios.len();
    let in_process = args.participants.in_process();
    let mut results = Vec::new();
    let mut skipped = Vec::new();
    for (index, (file, scenario)) in scenarios.into_iter().enumerate() {
        if in_process && let Some(reason) = in_process::obstacle(&scenario) {
            println!("SKIP {}: {reason}", scenario.name);
            skipped.push(Skipped {
                name: scenario.name,
                file: file.display().to_string(),
                reason,
            });
            continue;
        }
        let (scenario, note) = if in_process {
            in_process::adapt(scenario)
        } else {
            (scenario, None)
        };
        eprintln!(
            "=== scenario {}/{total}: {} ({}){}",
            index + 1,
            scenario.name,
            file.display(),
            if in_process {
                ", participants in process"
            } else {
                ""
            }
        );
        if !scenario.description.is_empty() {
            eprintln!("    {}", scenario.description.trim());
        }
        if let Some(note) = note {
            eprintln!("    in process: {note}");
        }
        let result = run_one(&scenario, &file, args.keep, in_process).await;
        println!(
            "{} {} ({:.1} s){}",
            if result.passed { "PASS" } else { "FAIL" },
            result.name,
            result.seconds,
            if result.reasons.is_empty() {
                String::new()
            } else {
                format!(": {}", result.reasons.join("; "))
            }
        );
        results.push(result);
    }
    let passed = results.iter().filter(|r| r.passed).count();
    let failed = results.len() - passed;
    let violations: usize = results.iter().map(|r| r.violations).sum();
    println!(
        "{passed} passed, {failed} failed, {violations} violations{}",
        if skipped.is_empty() {
            String::new()
        } else {
            format!(", {} skipped (they need participant agents)", skipped.len())
        }
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "participants": args.participants.name(),
                "passed": passed,
                "failed": failed,
                "skipped": skipped.len(),
                "violations": violations,
                "scenarios": results,
                "skipped_scenarios": skipped,
            })
        );
    }
    if failed > 0 {
        bail!("{failed} of {} scenarios run failed", results.len());
    }
    if results.is_empty() {
        bail!(
            "every scenario was skipped: none can run with {} participants",
            args.participants.name()
        );
    }
    Ok(())
}

fn collect(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).with_context(|| format!("{} does not exist", path.display()))?;
        if meta.is_dir() {
            walk(path, &mut files)?;
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for entry in entries {
        if entry.is_dir() {
            walk(&entry, files)?;
        } else if entry.extension().is_some_and(|e| e == "toml") {
            files.push(entry);
        }
    }
    Ok(())
}

/// Arguments every scenario coordinator instance gets: short timeouts so that faults resolve in
/// seconds.
pub fn scenario_coordinator_args() -> Vec<String> {
    [
        "--vote-timeout-ms",
        "3000",
        "--lock-timeout-ms",
        "2000",
        "--idle-timeout-ms",
        "3000",
    ]
    .map(String::from)
    .to_vec()
}

/// Starts coordinator instances 2..=`coordinators` beside the cluster's first (ids from
/// [`runner::other_coordinator_id`]), each with the scenario settings, `store` and `args`.
pub async fn start_other_coordinators(
    cluster: &mut LocalCluster,
    coordinators: usize,
    store: DecisionStore,
    args: &[String],
) -> Result<()> {
    for n in 2..=coordinators {
        let mut all = scenario_coordinator_args();
        all.extend(store.coordinator_args());
        all.extend(args.iter().cloned());
        cluster
            .add_coordinator(&runner::other_coordinator_id(n), &all)
            .await
            .with_context(|| format!("starting coordinator-{n}"))?;
    }
    Ok(())
}

/// Settings every scenario cluster gets: short timeouts so that faults resolve in seconds.
pub fn cluster_spec(
    shards: usize,
    base_dir: PathBuf,
    coordinator: &[String],
    participant: &[String],
) -> ClusterSpec {
    let mut coordinator_args = scenario_coordinator_args();
    coordinator_args.extend(coordinator.iter().cloned());
    let mut participant_args: Vec<String> = [
        "--in-doubt-after-ms",
        "500",
        "--reconcile-interval-ms",
        "200",
        "--branch-idle-timeout-ms",
        "3000",
    ]
    .map(String::from)
    .to_vec();
    participant_args.extend(participant.iter().cloned());
    ClusterSpec {
        shards,
        base_dir,
        // PostgreSQL crashes here are `-m immediate` stops: the page cache survives them, so
        // fsync off loses nothing and keeps scenarios quick.
        pg: PgOptions {
            fsync: false,
            ..PgOptions::default()
        },
        coordinator_args,
        participant_args,
        database: checker::DATABASE.into(),
        coordinator_port: 0,
        in_process: false,
        tls: None,
    }
}

async fn run_one(scenario: &Scenario, file: &Path, keep: bool, in_process: bool) -> ScenarioResult {
    let started = Instant::now();
    let mut result = ScenarioResult {
        name: scenario.name.clone(),
        file: file.display().to_string(),
        passed: false,
        reasons: Vec::new(),
        violations: 0,
        report: None,
        while_coordinator_down: None,
        seconds: 0.0,
    };
    let timeline = Arc::new(Timeline::new(true));
    match drive(scenario, keep, in_process, &timeline).await {
        Ok(Driven {
            report,
            mut reasons,
            while_coordinator_down,
        }) => {
            let violations = report.violation_count();
            let e = &scenario.expect;
            match e.verdict.as_str() {
                "violation" => {
                    if violations == 0 {
                        reasons.push("expected the checker to find a violation; it found none".into());
                    }
                }
                _ => {
                    if violations > 0 {
                        reasons.push(format!("{violations} violations"));
                    }
                    if (report.committed as u64) < e.min_committed {
                        reasons.push(format!(
                            "{} committed, expected at least {}",
                            report.committed, e.min_committed
                        ));
                    }
                    if (report.aborted as u64) < e.min_aborted {
                        reasons.push(format!(
                            "{} aborted, expected at least {}",
                            report.aborted, e.min_aborted
                        ));
                    }
                }
            }
            reasons.extend(decision_row_reasons(scenario, &report));
            reasons.extend(coordinator_down::expectation_reasons(
                e,
                while_coordinator_down.as_ref(),
            ));
            result.violations = violations;
            result.report = Some(report);
            result.while_coordinator_down = while_coordinator_down;
            result.passed = reasons.is_empty();
            result.reasons = reasons;
        }
        Err(error) => {
            timeline.note(format!("scenario error: {error:#}"));
            result.reasons.push(format!("{error:#}"));
        }
    }
    // The live lines above went to stderr as progress; this is the merged record, with what the
    // processes logged about themselves, on stdout.
    println!("timeline of {}:", result.name);
    for line in timeline.render() {
        println!("  {line}");
    }
    if let Some(report) = &result.report {
        println!(
            "  verdict: committed {} aborted {} unknown {} abandoned {}; prepared left {}; converged {} in {} ms; {} violations",
            report.committed,
            report.aborted,
            report.unknown,
            report.abandoned,
            report.prepared_left,
            report.converged,
            report.convergence_ms,
            report.violations.len()
        );
        if scenario.topology.decision_store.trim() == "shard" {
            println!(
                "  decision rows left: {} commit, {} abort; aborts heard by cause: {:?}",
                report.decision_rows.commit, report.decision_rows.abort, report.abort_causes
            );
        }
        for v in &report.violations {
            println!("  violation: txid {} {}: {:?}", v.txid, v.kind, v.evidence);
        }
    }
    if let Some(down) = &result.while_coordinator_down {
        println!("  while the coordinator was down: {}", down.summary());
    }
    result.seconds = started.elapsed().as_secs_f64();
    result
}

/// Why a scenario fails on what the decision rows and the clients' abort causes show: a commit
/// row left once everything converged (with the shard store: finished transactions' rows are
/// forgotten), or an abort cause in `expect.heard_abort_causes` no client heard.
fn decision_row_reasons(scenario: &Scenario, report: &Report) -> Vec<String> {
    let mut reasons = Vec::new();
    let shard_store = scenario.topology.parsed_decision_store().ok() == Some(DecisionStore::Shard);
    if shard_store && report.decision_rows.commit > 0 {
        reasons.push(format!(
            "{} commit rows left in treaty.decisions after convergence (a finished transaction's row is forgotten)",
            report.decision_rows.commit
        ));
    }
    for cause in &scenario.expect.heard_abort_causes {
        if report.abort_causes.get(cause.trim()).copied().unwrap_or(0) == 0 {
            reasons.push(format!(
                "expected some client to hear an abort with cause {cause}; the aborts heard by cause: {:?}",
                report.abort_causes
            ));
        }
    }
    reasons
}

/// Runs the cluster, workload and steps; returns the checker's report, any reasons the scenario
/// itself did not go as written (a step that never triggered), and what `await-convergence` saw.
async fn drive(
    scenario: &Scenario,
    keep: bool,
    in_process: bool,
    timeline: &Arc<Timeline>,
) -> Result<Driven> {
    let dir = tempfile::Builder::new().prefix("treaty-scenario-").tempdir()?;
    let base = dir.path().to_path_buf();
    let t = &scenario.topology;
    let store = t.parsed_decision_store()?;
    let mut first_args = store.coordinator_args();
    first_args.extend(t.coordinator_args.iter().cloned());
    let mut spec = cluster_spec(t.shards, base.clone(), &first_args, &t.participant_args);
    spec.in_process = in_process;
    let mut cluster = if t.proxies {
        LocalCluster::start_proxied(spec).await
    } else {
        LocalCluster::start(spec).await
    }
    .context("starting the cluster")?;
    start_other_coordinators(&mut cluster, t.coordinators, store, &t.other_coordinator_args).await?;
    checker::create_markers(&cluster).await?;
    let others: Vec<String> = cluster
        .extra_coordinators
        .iter()
        .enumerate()
        .map(|(i, c)| format!(", coordinator-{} {}", i + 2, c.endpoint()))
        .collect();
    timeline.note(format!(
        "cluster up: {} shards, coordinator {}{}{}, decision store {}",
        t.shards,
        cluster.coordinator_endpoint(),
        others.concat(),
        match (in_process, t.proxies) {
            (true, true) => ", participants in process, the clients' link proxied",
            (true, false) => ", participants in process",
            (false, true) => ", every link proxied",
            (false, false) => "",
        },
        store.name()
    ));

    let w = &scenario.workload;
    let protocol = w.protocol;
    let mode = w.parsed_mode()?;
    if protocol == Protocol::ThreePhase {
        ensure_served(&cluster, protocol).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(w.deadline_s);
    let progress = Arc::new(Progress::default());
    let config = Arc::new(WorkloadConfig {
        endpoint: cluster.client_endpoint(),
        shards: cluster.shard_names.clone(),
        transactions: w.transactions,
        concurrency: w.concurrency,
        shards_per_txn: w.shards_per_txn,
        seed: w.seed,
        protocol,
        mode,
        deadline,
        accounts: None,
    });
    // Before the workload: the primary waits for its standby on every commit from then on.
    let standbys = standby::Standbys::start(&cluster, &t.standby_shards()?, timeline).await?;
    let mut reasons = Vec::new();
    let mut runner = StepRunner::new(&mut cluster, timeline);
    runner.standbys = standbys;
    // Steps at `start` run before the first transaction (e.g. arming a failpoint).
    let steps: Vec<(usize, Trigger, Action)> = scenario
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (trigger, action) = (s.trigger(t.shards)?, s.parsed_action(t.shards)?);
            Ok(if in_process {
                (i + 1, in_process::trigger(trigger), in_process::action(action))
            } else {
                (i + 1, trigger, action)
            })
        })
        .collect::<Result<_>>()?;
    let mut pending = steps.into_iter().peekable();
    while let Some((n, Trigger::Start, action)) =
        pending.next_if(|(_, trigger, _)| *trigger == Trigger::Start)
    {
        runner.perform(n, &action).await?;
    }
    timeline.note(format!(
        "workload: {} transactions, {} clients, {} shards each, {}, {}",
        w.transactions,
        w.concurrency,
        w.shards_per_txn,
        protocol.name(),
        mode.name()
    ));
    runner.workload_started = Instant::now();
    let workload = tokio::spawn(workload::run(Arc::clone(&config), Arc::clone(&progress)));
    for (n, trigger, action) in pending {
        if runner.wait(&trigger, &progress, deadline).await? {
            runner.perform(n, &action).await?;
            if runner.for_good.contains(&schedule::Process::Coordinator)
                && !progress.stop.swap(true, Ordering::SeqCst)
            {
                // The clients dial the first instance only; with it gone for good they are done.
                timeline.note("the workload stops: its coordinator is gone for good");
            }
        } else {
            let reason = format!("step {n} never triggered ({trigger:?})");
            timeline.note(reason.clone());
            reasons.push(reason);
            break;
        }
    }
    // The workload ends when its budget is spent; past the deadline, stop it.
    let remaining = deadline.saturating_duration_since(Instant::now());
    if tokio::time::timeout(remaining, async {
        while !workload.is_finished() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .is_err()
    {
        progress.stop.store(true, Ordering::SeqCst);
        reasons.push("the workload did not finish before the deadline".into());
    }
    let _ = tokio::time::timeout(Duration::from_secs(20), workload).await;
    let while_coordinator_down = runner.while_coordinator_down.take();
    timeline.note(format!(
        "workload done: {} transactions finished",
        progress.finished.load(Ordering::SeqCst)
    ));

    runner.epilogue().await?;
    let live = runner.live_coordinator_endpoints();
    // Out of the runner, which borrows the cluster the checker reads next.
    let mut standbys = std::mem::take(&mut runner.standbys);
    let (converged, took) = checker::await_convergence_via(
        &cluster,
        &live,
        Duration::from_secs(scenario.expect.converge_within_s),
        store == DecisionStore::Shard,
    )
    .await?;
    timeline.note(if converged {
        format!(
            "converged: nothing prepared, nothing in doubt{} ({} ms)",
            if store == DecisionStore::Shard {
                ", no commit row left"
            } else {
                ""
            },
            took.as_millis()
        )
    } else {
        format!("did NOT converge within {} s", scenario.expect.converge_within_s)
    });
    let told = progress.told.lock().map(|t| t.clone()).unwrap_or_default();
    let report = checker::check(&cluster, &told, converged, took).await?;
    timeline.absorb_log("coordinator", &base.join("logs").join("coordinator.log"));
    for n in 2..=t.coordinators {
        let id = runner::other_coordinator_id(n);
        timeline.absorb_log(
            &format!("coordinator-{n}"),
            &base.join("logs").join(format!("coordinator-{id}.log")),
        );
    }
    for name in &cluster.shard_names {
        timeline.absorb_log(name, &base.join("logs").join(format!("participant-{name}.log")));
    }
    if keep {
        let kept = dir.keep();
        for pg in &mut cluster.pgs {
            pg.keep_on_drop();
        }
        standbys.keep_on_drop();
        eprintln!("  kept {} (PostgreSQL servers left running)", kept.display());
    }
    Ok(Driven {
        report,
        reasons,
        while_coordinator_down,
    })
}

/// Fails at once, naming the protocol, when the coordinator refuses to begin a transaction with
/// it (3PC before the services serve it): otherwise the clients would retry `Begin` until the
/// deadline and the scenario would fail late and vaguely.
async fn ensure_served(cluster: &LocalCluster, protocol: Protocol) -> Result<()> {
    let mut client = cluster.client().await.context("reaching the coordinator")?;
    let begun = client
        .begin(pb::BeginRequest {
            options: Some(pb::TransactionOptions {
                protocol: crate::wire_protocol(protocol) as i32,
                label: "scenario protocol probe".into(),
                ..Default::default()
            }),
        })
        .await;
    match begun {
        Ok(response) => {
            let txid = response.into_inner().txid;
            let _ = client.rollback(pb::RollbackRequest { txid }).await;
            Ok(())
        }
        Err(status) => bail!(
            "the coordinator refuses workload.protocol = \"{}\" ({:?}: {}); this scenario needs services that serve it",
            protocol.name(),
            status.code(),
            status.message()
        ),
    }
}
