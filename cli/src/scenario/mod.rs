//! `treaty scenario run FILE|DIR`: replays recovery scenarios. Each scenario starts a local cluster
//! (with fault proxies on every link unless it opts out), runs a marker-writing workload while a
//! schedule of fault steps fires (failpoints, kill -9, restarts, PostgreSQL crashes, network
//! faults), lets recovery converge, runs the atomicity checker, and prints a timeline and a verdict.
//!
//! - `spec`: the file format; `workload`: the clients; `checker`: the verdict;
//! - `timeline`: what happened, in order;
//! - `coordinator_down`: the `await-convergence` step (do the participants finish while the
//!   coordinator stays down?) and its expectations.

pub mod checker;
pub mod coordinator_down;
pub mod spec;
pub mod timeline;
pub mod workload;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use treaty_harness::{ClusterSpec, LocalCluster, PgOptions};
use treaty_proto::pb;

use checker::Report;
use coordinator_down::DownObservation;
use spec::{Action, Process, Protocol, Scenario, Trigger};
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
    let total = scenarios.len();
    let mut results = Vec::new();
    for (index, (file, scenario)) in scenarios.into_iter().enumerate() {
        eprintln!(
            "=== scenario {}/{total}: {} ({})",
            index + 1,
            scenario.name,
            file.display()
        );
        if !scenario.description.is_empty() {
            eprintln!("    {}", scenario.description.trim());
        }
        let result = run_one(&scenario, &file, args.keep).await;
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
    println!("{passed} passed, {failed} failed, {violations} violations");
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "passed": passed,
                "failed": failed,
                "violations": violations,
                "scenarios": results,
            })
        );
    }
    if failed > 0 {
        bail!("{failed} of {total} scenarios failed");
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

/// Settings every scenario cluster gets: short timeouts so that faults resolve in seconds.
pub fn cluster_spec(
    shards: usize,
    base_dir: PathBuf,
    coordinator: &[String],
    participant: &[String],
) -> ClusterSpec {
    let mut coordinator_args: Vec<String> = [
        "--vote-timeout-ms",
        "3000",
        "--lock-timeout-ms",
        "2000",
        "--idle-timeout-ms",
        "3000",
    ]
    .map(String::from)
    .to_vec();
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
    }
}

async fn run_one(scenario: &Scenario, file: &Path, keep: bool) -> ScenarioResult {
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
    match drive(scenario, keep, &timeline).await {
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

/// Runs the cluster, workload and steps; returns the checker's report, any reasons the scenario
/// itself did not go as written (a step that never triggered), and what `await-convergence` saw.
async fn drive(scenario: &Scenario, keep: bool, timeline: &Arc<Timeline>) -> Result<Driven> {
    let dir = tempfile::Builder::new().prefix("treaty-scenario-").tempdir()?;
    let base = dir.path().to_path_buf();
    let t = &scenario.topology;
    let spec = cluster_spec(t.shards, base.clone(), &t.coordinator_args, &t.participant_args);
    let mut cluster = if t.proxies {
        LocalCluster::start_proxied(spec).await
    } else {
        LocalCluster::start(spec).await
    }
    .context("starting the cluster")?;
    checker::create_markers(&cluster).await?;
    timeline.note(format!(
        "cluster up: {} shards, coordinator {}{}",
        t.shards,
        cluster.coordinator_endpoint(),
        if t.proxies { ", every link proxied" } else { "" }
    ));

    let w = &scenario.workload;
    let protocol = w.parsed_protocol()?;
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
        protocol: protocol.wire(),
        mode,
        deadline,
        accounts: None,
    });
    let mut reasons = Vec::new();
    let mut runner = StepRunner {
        cluster: &mut cluster,
        timeline,
        fired_baseline: HashMap::new(),
        workload_started: Instant::now(),
        last_step: Instant::now(),
        while_coordinator_down: None,
    };
    // Steps at `start` run before the first transaction (e.g. arming a failpoint).
    let steps: Vec<(usize, Trigger, Action)> = scenario
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| Ok((i + 1, s.trigger(t.shards)?, s.parsed_action(t.shards)?)))
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
    let (converged, took) =
        checker::await_convergence(&cluster, Duration::from_secs(scenario.expect.converge_within_s)).await?;
    timeline.note(if converged {
        format!(
            "converged: nothing prepared, nothing in doubt ({} ms)",
            took.as_millis()
        )
    } else {
        format!("did NOT converge within {} s", scenario.expect.converge_within_s)
    });
    let told = progress.told.lock().map(|t| t.clone()).unwrap_or_default();
    let report = checker::check(&cluster, &told, converged, took).await?;
    timeline.absorb_log("coordinator", &base.join("logs").join("coordinator.log"));
    for name in &cluster.shard_names {
        timeline.absorb_log(name, &base.join("logs").join(format!("participant-{name}.log")));
    }
    if keep {
        let kept = dir.keep();
        for pg in &mut cluster.pgs {
            pg.keep_on_drop();
        }
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
                protocol: protocol.wire() as i32,
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

/// Carries out steps on a running cluster.
pub struct StepRunner<'a> {
    pub cluster: &'a mut LocalCluster,
    pub timeline: &'a Timeline,
    /// Times a failpoint had fired in a process's log when it was armed.
    fired_baseline: HashMap<(String, String), usize>,
    workload_started: Instant,
    last_step: Instant,
    /// What the `await-convergence` step saw.
    pub while_coordinator_down: Option<DownObservation>,
}

impl<'a> StepRunner<'a> {
    pub fn new(cluster: &'a mut LocalCluster, timeline: &'a Timeline) -> StepRunner<'a> {
        StepRunner {
            cluster,
            timeline,
            fired_baseline: HashMap::new(),
            workload_started: Instant::now(),
            last_step: Instant::now(),
            while_coordinator_down: None,
        }
    }

    fn log_path(&self, process: &Process) -> PathBuf {
        let logs = self.cluster.base_dir.join("logs");
        match process {
            Process::Coordinator => logs.join("coordinator.log"),
            Process::Participant(i) | Process::Postgres(i) => logs.join(format!("participant-s{i}.log")),
        }
    }

    fn fired_count(&self, process: &Process, failpoint: &str) -> usize {
        std::fs::read_to_string(self.log_path(process))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("failpoint fired") && l.contains(failpoint))
            .count()
    }

    fn exit_text(&mut self, process: &Process) -> String {
        use std::os::unix::process::ExitStatusExt;
        let status = match process {
            Process::Coordinator => self.cluster.coordinator.try_exit_status(),
            Process::Participant(i) => self.cluster.participants[*i].try_exit_status(),
            Process::Postgres(_) => return "server stopped".into(),
        };
        match status {
            Some(status) => match status.signal() {
                Some(6) => "aborted (SIGABRT, as a crash)".into(),
                Some(9) => "killed (SIGKILL)".into(),
                Some(signal) => format!("signal {signal}"),
                None => format!("exit code {}", status.code().unwrap_or(-1)),
            },
            None => "gone".into(),
        }
    }

    fn exited(&mut self, process: &Process) -> bool {
        match process {
            Process::Coordinator => self.cluster.coordinator.try_exit_status().is_some(),
            Process::Participant(i) => self.cluster.participants[*i].try_exit_status().is_some(),
            Process::Postgres(i) => !self.cluster.pgs[*i].is_running(),
        }
    }

    /// Waits for a trigger; false if the deadline passed first.
    async fn wait(&mut self, trigger: &Trigger, progress: &Progress, deadline: Instant) -> Result<bool> {
        loop {
            let now = Instant::now();
            let ready = match trigger {
                Trigger::Start => true,
                Trigger::Txns(n) => progress.finished.load(Ordering::SeqCst) >= *n,
                Trigger::Ms(ms) => now >= self.workload_started + Duration::from_millis(*ms),
                Trigger::AfterPrevious(ms) => now >= self.last_step + Duration::from_millis(*ms),
                Trigger::Exit(process) => self.exited(process),
                Trigger::Fired { failpoint, process } => {
                    let baseline = self
                        .fired_baseline
                        .get(&(process.to_string(), failpoint.clone()))
                        .copied()
                        .unwrap_or(0);
                    self.fired_count(process, failpoint) > baseline
                }
            };
            if ready {
                if let Trigger::Exit(process) = trigger {
                    self.timeline
                        .note(format!("{process} exited: {}", self.exit_text(process)));
                }
                return Ok(true);
            }
            if now > deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn admin_endpoint(&self, process: &Process) -> Result<String> {
        Ok(match process {
            Process::Coordinator => self.cluster.coordinator.endpoint(),
            Process::Participant(i) => self.cluster.participants[*i].endpoint(),
            Process::Postgres(_) => bail!("PostgreSQL has no failpoints"),
        })
    }

    pub async fn perform(&mut self, n: usize, action: &Action) -> Result<()> {
        self.last_step = Instant::now();
        match action {
            Action::Arm {
                process,
                failpoint,
                actions,
            } => {
                let endpoint = self.admin_endpoint(process)?;
                let mut admin = pb::admin_client::AdminClient::connect(endpoint)
                    .await
                    .with_context(|| format!("step {n}: reaching {process}"))?;
                admin
                    .set_failpoint(pb::SetFailpointRequest {
                        name: failpoint.clone(),
                        actions: actions.clone(),
                    })
                    .await
                    .with_context(|| format!("step {n}: arming {failpoint} on {process}"))?;
                let baseline = self.fired_count(process, failpoint);
                self.fired_baseline
                    .insert((process.to_string(), failpoint.clone()), baseline);
                self.timeline
                    .note(format!("step {n}: armed {failpoint}={actions} on {process}"));
            }
            Action::Disarm(process) => {
                let endpoint = self.admin_endpoint(process)?;
                let mut admin = pb::admin_client::AdminClient::connect(endpoint)
                    .await
                    .with_context(|| format!("step {n}: reaching {process}"))?;
                admin
                    .clear_failpoints(pb::ClearFailpointsRequest {})
                    .await
                    .with_context(|| format!("step {n}: disarming {process}"))?;
                self.timeline
                    .note(format!("step {n}: disarmed every failpoint on {process}"));
            }
            Action::Kill9(process) => {
                match process {
                    Process::Coordinator => self.cluster.coordinator.kill9()?,
                    Process::Participant(i) => self.cluster.participants[*i].kill9()?,
                    Process::Postgres(i) => self.cluster.pgs[*i].stop_immediate().await?,
                }
                self.timeline.note(format!("step {n}: kill -9 {process}"));
            }
            Action::Restart(process) => {
                self.restart(process).await?;
                self.timeline.note(format!("step {n}: restarted {process}"));
            }
            Action::PgStop(i) => {
                self.cluster.pgs[*i].stop_immediate().await?;
                self.timeline.note(format!(
                    "step {n}: PostgreSQL s{i} stopped with -m immediate (crash)"
                ));
            }
            Action::PgStart(i) => {
                self.cluster.pgs[*i].restart().await?;
                self.timeline.note(format!("step {n}: PostgreSQL s{i} started"));
            }
            Action::Fault { from, to, fault } => {
                let network = self
                    .cluster
                    .network
                    .as_ref()
                    .context("no proxies in this topology")?;
                let link = network
                    .get(from, to)
                    .with_context(|| format!("step {n}: no link {from}->{to}"))?;
                link.set(*fault);
                self.timeline
                    .note(format!("step {n}: link {from}->{to}: {fault:?}"));
            }
            Action::Partition(a, b) => {
                let network = self
                    .cluster
                    .network
                    .as_ref()
                    .context("no proxies in this topology")?;
                let a: Vec<&str> = a.iter().map(String::as_str).collect();
                let b: Vec<&str> = b.iter().map(String::as_str).collect();
                network.partition(&a, &b);
                self.timeline
                    .note(format!("step {n}: partitioned {a:?} from {b:?}"));
            }
            Action::Heal => {
                if let Some(network) = self.cluster.network.as_ref() {
                    network.heal();
                }
                self.timeline.note(format!("step {n}: network healed"));
            }
            Action::AwaitConvergence { within } => {
                let observed = coordinator_down::observe(self.cluster, n, *within, self.timeline).await?;
                self.while_coordinator_down = Some(observed);
                // It lasts seconds: a following `+N` counts from its end.
                self.last_step = Instant::now();
            }
        }
        Ok(())
    }

    async fn restart(&mut self, process: &Process) -> Result<()> {
        match process {
            Process::Coordinator => self.cluster.coordinator.restart().await?,
            Process::Participant(i) => self.cluster.participants[*i].restart().await?,
            Process::Postgres(i) => {
                let pg = &self.cluster.pgs[*i];
                if pg.is_running() {
                    pg.stop_immediate().await?;
                }
                pg.restart().await?;
            }
        }
        Ok(())
    }

    /// After the schedule: heal the network and bring back anything still down, so that recovery
    /// can finish and the checker can read every shard.
    pub async fn epilogue(&mut self) -> Result<()> {
        if let Some(network) = self.cluster.network.as_ref() {
            network.heal();
        }
        for i in 0..self.cluster.pgs.len() {
            if !self.cluster.pgs[i].is_running() {
                self.cluster.pgs[i].restart().await?;
                self.timeline
                    .note(format!("epilogue: PostgreSQL s{i} was down; started"));
            }
        }
        if self.exited(&Process::Coordinator) {
            self.cluster.coordinator.restart().await?;
            self.timeline.note("epilogue: coordinator was down; restarted");
        }
        for i in 0..self.cluster.participants.len() {
            if self.exited(&Process::Participant(i)) {
                self.cluster.participants[i].restart().await?;
                self.timeline
                    .note(format!("epilogue: participant s{i} was down; restarted"));
            }
        }
        // Failpoints armed with sleeps or drops must not hold up recovery.
        for process in std::iter::once(Process::Coordinator)
            .chain((0..self.cluster.participants.len()).map(Process::Participant))
        {
            if let Ok(endpoint) = self.admin_endpoint(&process)
                && let Ok(mut admin) = pb::admin_client::AdminClient::connect(endpoint).await
            {
                let _ = admin.clear_failpoints(pb::ClearFailpointsRequest {}).await;
            }
        }
        Ok(())
    }
}
