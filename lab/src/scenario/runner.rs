//! Carrying out a scenario's steps on a running local cluster: waiting for each trigger (a
//! transaction count, a time, a process exit, a failpoint firing in a log) and performing its
//! action (arming failpoints over the Admin service, kill -9, restarts, PostgreSQL crashes, a
//! PostgreSQL failing over to its standby, proxy faults, `await-convergence`), then the epilogue
//! that brings everything back for the checker (except a coordinator instance killed for good).
//! `treaty chaos` drives the same runner with random actions.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use treaty_harness::LocalCluster;
use treaty_proto::pb;

use super::coordinator_down::{self, DownObservation};
use super::schedule::{Action, Process, Trigger};
use super::standby::Standbys;
use super::timeline::Timeline;
use super::workload::Progress;

/// Carries out steps on a running cluster.
pub struct StepRunner<'a> {
    pub cluster: &'a mut LocalCluster,
    pub timeline: &'a Timeline,
    /// Times a failpoint had fired in a process's log when it was armed.
    fired_baseline: HashMap<(String, String), usize>,
    pub(super) workload_started: Instant,
    last_step: Instant,
    /// What the `await-convergence` step saw.
    pub while_coordinator_down: Option<DownObservation>,
    /// Coordinator instances killed for good: the epilogue leaves them down.
    pub for_good: Vec<Process>,
    /// The standbys `pg-failover` promotes (`topology.standby`); none unless the caller sets them.
    pub standbys: Standbys,
}

/// The coordinator id of instance `n` (2, 3, ...): its GIDs, data directory `coordinator-c<n>`
/// and log `coordinator-c<n>.log`.
pub fn other_coordinator_id(n: usize) -> String {
    format!("c{n}")
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
            for_good: Vec::new(),
            standbys: Standbys::default(),
        }
    }

    /// The service process of a coordinator instance or participant (PostgreSQL has none).
    fn service(&mut self, process: &Process) -> Result<&mut treaty_harness::ServiceProcess> {
        Ok(match process {
            Process::Coordinator => &mut self.cluster.coordinator,
            Process::OtherCoordinator(n) => self
                .cluster
                .extra_coordinators
                .get_mut(n - 2)
                .with_context(|| format!("{process} was not started"))?,
            Process::Participant(i) => &mut self.cluster.participants[*i],
            Process::Postgres(i) => bail!("PostgreSQL s{i} is not a Treaty process"),
        })
    }

    /// Endpoints of the coordinator instances still running (for the convergence check: the
    /// first one may have been killed for good).
    pub fn live_coordinator_endpoints(&mut self) -> Vec<String> {
        let mut live = Vec::new();
        if self.cluster.coordinator.try_exit_status().is_none() {
            live.push(self.cluster.coordinator.endpoint());
        }
        for other in &mut self.cluster.extra_coordinators {
            if other.try_exit_status().is_none() {
                live.push(other.endpoint());
            }
        }
        live
    }

    fn log_path(&self, process: &Process) -> PathBuf {
        let logs = self.cluster.base_dir.join("logs");
        match process {
            Process::Coordinator => logs.join("coordinator.log"),
            Process::OtherCoordinator(n) => {
                logs.join(format!("coordinator-{}.log", other_coordinator_id(*n)))
            }
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
        let status = match self.service(process) {
            Ok(service) => service.try_exit_status(),
            Err(_) => return "server stopped".into(),
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
            Process::Postgres(i) => !self.cluster.pgs[*i].is_running(),
            _ => self
                .service(process)
                .map(|service| service.try_exit_status().is_some())
                .unwrap_or(false),
        }
    }

    /// Waits for a trigger; false if the deadline passed first.
    pub(super) async fn wait(
        &mut self,
        trigger: &Trigger,
        progress: &Progress,
        deadline: Instant,
    ) -> Result<bool> {
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

    fn admin_endpoint(&mut self, process: &Process) -> Result<String> {
        if matches!(process, Process::Postgres(_)) {
            bail!("PostgreSQL has no failpoints");
        }
        Ok(self.service(process)?.endpoint())
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
                    Process::Postgres(i) => self.cluster.pgs[*i].stop_immediate().await?,
                    _ => self.service(process)?.kill9()?,
                }
                self.timeline.note(format!("step {n}: kill -9 {process}"));
            }
            Action::Kill9ForGood(process) => {
                let already = self.exited(process);
                self.service(process)?.kill9()?;
                self.for_good.push(process.clone());
                self.timeline.note(format!(
                    "step {n}: {process} {} for good (never restarted)",
                    if already { "left down" } else { "kill -9" }
                ));
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
            Action::PgFailover(i) => {
                let done = self
                    .standbys
                    .fail_over(self.cluster, *i)
                    .await
                    .with_context(|| format!("step {n}: pg-failover of PostgreSQL s{i}"))?;
                self.timeline.note(format!("step {n}: {done}"));
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
            Process::Coordinator | Process::OtherCoordinator(_) | Process::Participant(_) => {
                self.service(process)?.restart().await?
            }
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
        let coordinators = std::iter::once(Process::Coordinator)
            .chain((0..self.cluster.extra_coordinators.len()).map(|i| Process::OtherCoordinator(i + 2)));
        let coordinators: Vec<Process> = coordinators.collect();
        for process in &coordinators {
            if self.exited(process) && !self.for_good.contains(process) {
                self.service(process)?.restart().await?;
                self.timeline
                    .note(format!("epilogue: {process} was down; restarted"));
            }
        }
        for i in 0..self.cluster.participants.len() {
            if self.exited(&Process::Participant(i)) {
                self.cluster.participants[i].restart().await?;
                self.timeline
                    .note(format!("epilogue: participant s{i} was down; restarted"));
            }
        }
        // Failpoints armed with sleeps or drops must not hold up recovery.
        let participants = (0..self.cluster.participants.len()).map(Process::Participant);
        for process in coordinators.into_iter().chain(participants) {
            if self.for_good.contains(&process) {
                continue;
            }
            if let Ok(endpoint) = self.admin_endpoint(&process)
                && let Ok(mut admin) = pb::admin_client::AdminClient::connect(endpoint).await
            {
                let _ = admin.clear_failpoints(pb::ClearFailpointsRequest {}).await;
            }
        }
        Ok(())
    }
}
