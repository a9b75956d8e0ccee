//! Carrying out a scenario's steps on a running local cluster: waiting for each trigger (a
//! transaction count, a time, a process exit, a failpoint firing in a log) and performing its
//! action (arming failpoints over the Admin service, kill -9, restarts, PostgreSQL crashes, proxy
//! faults, `await-convergence`), then the epilogue that brings everything back for the checker.
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
