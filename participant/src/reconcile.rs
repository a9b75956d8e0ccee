//! Recovery: resolves branches PostgreSQL holds prepared by asking the coordinator, and deletes
//! marker rows the coordinator no longer needs.
//!
//! Candidates are the Treaty GIDs that were already prepared when this process started (listed
//! before it served anything, so none of them can be this process's own fresh vote), any
//! prepared longer than `--in-doubt-after-ms`, and any whose machine timed out and asked for the
//! decision (`AskCoordinator`), that no RPC is working on. Only branches in this
//! shard's own database are candidates. This shard's (the branch GID names the shard; a legacy GID
//! without the shard, left by an older participant, is this database's and so this shard's) are
//! asked about and finished under their transaction's GID, through the same paths as phase two.
//! A branch named for another shard is an orphan: this process holds the database's claim
//! (`claim.rs`), so no running participant serves that name here; it was left by this database's
//! participant under an earlier `--shard` name (or by two shards that shared the database before
//! the claim existed). It is finished under its exact name once the coordinator answers COMMIT or
//! ABORT, so a renamed shard does not strand its branches and their locks. Only GIDs of a
//! coordinator some configured instance's `Info` named, or GIDs that name a decision shard (whose
//! row any instance reads), are touched. The participant
//! never decides: it applies COMMIT or ABORT answers through the same serialized paths as the
//! coordinator's own phase-two calls, and leaves PENDING ones for a later tick. While the
//! coordinator is unreachable it warns once per tick and keeps asking. (The one exception is the
//! deliberately unsafe failpoint `participant::unsafe-commit-in-doubt`, which exists only to prove
//! that the scenario checker catches a participant that decides on its own.)
//!
//! Every pass also asks each configured coordinator's `Info` (`watch_runs`): when a coordinator id
//! answers with a higher incarnation than last seen, its earlier run is gone, and every open,
//! unprepared branch of that id with a txid below the new run's `first_txid` is rolled back at
//! once (`Agent::end_run`) instead of holding its row locks until the idle timeout. `Info` also
//! says below which txid the coordinator has finished everything (`open_from`): branches below it
//! are refused and rolled back the same way (`Agent::close_below`), and abort rows below it,
//! which no decision branch can meet any more, are deleted (`Agent::collect_abort_rows`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use treaty_proto::{BranchGid, CoordinatorId, Gid};

use crate::agent::{Agent, Closed};
use crate::coordinator_link::{
    Answer, CoordinatorInfo, Coordinators, Decision, LinkError, MAX_GIDS_PER_QUERY,
};
use crate::failpoints;
use crate::postgres::{self, DbError};
use crate::three_phase::ThreePhase;

/// At most this many foreign GIDs are remembered for "log once".
const MAX_REPORTED: usize = 10_000;
/// Abort rows looked at per pass (`Agent::collect_abort_rows`).
const ABORT_ROWS_PER_PASS: u32 = 1_000;
/// How long a pass waits for each coordinator's `Info`.
const INFO_TIMEOUT: Duration = Duration::from_secs(2);

/// The run of a coordinator id last seen.
#[derive(Debug, Clone, Copy)]
struct Run {
    incarnation: u64,
    /// Set once a later run was seen: txids below it belong to ended runs.
    ended_below: Option<u64>,
    /// The highest `open_from` the id answered: every lower txid has finished at it.
    finished_below: Option<u64>,
}

pub struct Reconciler {
    agent: Arc<Agent>,
    /// Decisions go through three-phase machines where a branch has one.
    three_phase: Arc<ThreePhase>,
    coordinators: Arc<Coordinators>,
    /// Per coordinator id, its run last seen.
    runs: HashMap<CoordinatorId, Run>,
    in_doubt_after_ms: u64,
    marker_retention_ms: u64,
    /// Prepared before this process started and not yet seen resolved (as PostgreSQL names them).
    inherited: HashSet<String>,
    reported: HashSet<String>,
}

/// Why one pass stopped early; logged by the loop.
#[derive(Debug, thiserror::Error)]
enum PassError {
    #[error("reading PostgreSQL: {0}")]
    Database(#[from] DbError),
    #[error("{0}; prepared branches stay prepared until it answers")]
    Coordinator(#[from] crate::coordinator_link::LinkError),
}

impl Reconciler {
    pub fn new(
        agent: Arc<Agent>,
        three_phase: Arc<ThreePhase>,
        coordinators: Arc<Coordinators>,
        in_doubt_after_ms: u64,
        marker_retention_ms: u64,
        inherited: HashSet<String>,
        seen_at_start: Vec<CoordinatorInfo>,
    ) -> Self {
        let runs = seen_at_start
            .into_iter()
            .map(|info| {
                let run = Run {
                    incarnation: info.incarnation,
                    ended_below: None,
                    finished_below: info.open_from,
                };
                (info.id, run)
            })
            .collect();
        Self {
            agent,
            three_phase,
            coordinators,
            runs,
            in_doubt_after_ms,
            marker_retention_ms,
            inherited,
            reported: HashSet::new(),
        }
    }

    /// Runs a pass now and then every `interval` until `stop` turns true.
    pub async fn run(mut self, interval: Duration, mut stop: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.changed() => return,
            }
            if let Err(error) = self.pass().await {
                crate::metrics::global().recovery_pass_failed();
                tracing::warn!("recovery pass: {error}");
            }
        }
    }

    /// Asks every coordinator's `Info` and rolls back the open branches of runs that ended. The
    /// first run seen of an id is only recorded: nothing says an earlier one ended while this
    /// process watched (a branch of it opened before this participant started is refused anyway,
    /// see `Admission`). Fails with the last error when no coordinator answered.
    async fn watch_runs(&mut self) -> Result<(), LinkError> {
        let mut answered = false;
        let mut last_error = None;
        for result in self.coordinators.info_all(INFO_TIMEOUT).await {
            let info = match result {
                Ok(info) => info,
                Err(error) => {
                    tracing::debug!("{error}");
                    last_error = Some(error);
                    continue;
                }
            };
            answered = true;
            match self.runs.get_mut(&info.id) {
                None => {
                    self.runs.insert(
                        info.id.clone(),
                        Run {
                            incarnation: info.incarnation,
                            ended_below: None,
                            finished_below: info.open_from,
                        },
                    );
                }
                Some(run) if info.incarnation > run.incarnation => {
                    tracing::info!(
                        coordinator = %info.id,
                        incarnation = info.incarnation,
                        first_txid = info.first_txid,
                        "coordinator restarted; its earlier runs' unprepared branches are rolled back"
                    );
                    run.incarnation = info.incarnation;
                    run.ended_below = Some(run.ended_below.unwrap_or(0).max(info.first_txid));
                }
                Some(_) => {}
            }
            if let Some(run) = self.runs.get_mut(&info.id) {
                run.finished_below = run.finished_below.max(info.open_from);
            }
        }
        // Every pass, not only when the restart is seen: a branch busy then is rolled back once
        // its call ends.
        for (coordinator, run) in &self.runs {
            if let Some(first_txid) = run.ended_below {
                let rolled_back = self.agent.end_run(coordinator, first_txid).await;
                if rolled_back > 0 {
                    tracing::warn!(
                        %coordinator,
                        rolled_back,
                        first_txid,
                        "rolled back open branches of an ended coordinator run (they could never prepare)"
                    );
                }
            }
            if let Some(open_from) = run.finished_below {
                let rolled_back = self
                    .agent
                    .close_below(coordinator, open_from, Closed::Finished)
                    .await;
                if rolled_back > 0 {
                    tracing::warn!(
                        %coordinator,
                        rolled_back,
                        open_from,
                        "rolled back open branches of transactions their coordinator has finished"
                    );
                }
            }
        }
        match last_error {
            Some(error) if !answered => Err(error),
            _ => Ok(()),
        }
    }

    async fn pass(&mut self) -> Result<(), PassError> {
        let reached = self.watch_runs().await;
        // After `watch_runs`, which raised the bounds below which no decision branch can open.
        match self.agent.collect_abort_rows(ABORT_ROWS_PER_PASS).await {
            Ok(0) => {}
            Ok(deleted) => tracing::debug!(deleted, "deleted abort rows no decision branch can meet"),
            Err(error) => tracing::warn!("deleting old abort rows: {error}"),
        }
        let (prepared, orphans) = self.in_doubt().await?;
        if !prepared.is_empty() && failpoints::hit(failpoints::UNSAFE_COMMIT_IN_DOUBT).is_some() {
            self.commit_on_its_own(&prepared).await;
            return Ok(());
        }
        let markers = postgres::old_markers(
            self.agent.pool(),
            self.marker_retention_ms,
            MAX_GIDS_PER_QUERY as i64,
        )
        .await?;
        if prepared.is_empty() && orphans.is_empty() && markers.is_empty() {
            return Ok(());
        }
        // Only now: with nothing to ask about, a coordinator that is down is nothing to report.
        reached?;
        // Asked every pass (`watch_runs`): a coordinator restarted with a new log would have a
        // new id.
        let coordinators = self.coordinators.known_ids();
        let prepared = self.own(prepared, &coordinators);
        let orphans: Vec<BranchGid> = orphans
            .into_iter()
            .filter(|branch| self.is_of_coordinator(branch.as_str(), branch.gid(), &coordinators))
            .collect();
        if !prepared.is_empty() || !orphans.is_empty() {
            let mut ask: Vec<String> = prepared.keys().cloned().collect();
            ask.extend(orphans.iter().map(|branch| branch.gid().to_string()));
            ask.sort_unstable();
            ask.dedup();
            let answers = self.coordinators.query_decision(ask).await?;
            let decisions: HashMap<String, Decision> = answers
                .into_iter()
                .map(|answer| (answer.gid, answer.decision))
                .collect();
            for (text, gid) in &prepared {
                if let Some(decision) = decisions.get(text) {
                    self.apply(gid, *decision).await;
                }
            }
            for branch in &orphans {
                if let Some(decision) = decisions.get(branch.gid().as_str()) {
                    self.finish_orphan(branch, *decision).await;
                }
            }
        }
        let markers = self.own(markers, &coordinators);
        if !markers.is_empty() {
            let answers = self
                .coordinators
                .query_decision(markers.into_keys().collect())
                .await?;
            self.delete_unneeded_markers(answers).await?;
        }
        Ok(())
    }

    /// The transaction GIDs of this shard's prepared branches to ask about now, and the orphans
    /// (branches in this database named for another shard).
    async fn in_doubt(&mut self) -> Result<(Vec<String>, Vec<BranchGid>), DbError> {
        let all = postgres::list_prepared(self.agent.pool()).await?;
        let still_prepared: HashSet<&str> = all.iter().map(|xact| xact.gid.as_str()).collect();
        self.inherited.retain(|gid| still_prepared.contains(gid.as_str()));
        // Branches whose machines timed out and asked for the decision are asked about now.
        let asked = self.agent.take_asked();
        let (mut in_doubt, mut orphans) = (Vec::new(), Vec::new());
        for xact in all {
            let old_enough = u64::try_from(xact.age_ms).unwrap_or(0) >= self.in_doubt_after_ms;
            let parsed = BranchGid::parse(&xact.gid);
            let machine_asked = parsed
                .as_ref()
                .is_ok_and(|branch| asked.contains(branch.gid().as_str()));
            if !old_enough && !machine_asked && !self.inherited.contains(&xact.gid) {
                continue;
            }
            match parsed {
                // The branch table knows branches by their transaction's GID.
                Ok(branch) if branch.is_of(self.agent.shard()) => {
                    if !self.agent.is_busy(branch.gid().as_str()) {
                        in_doubt.push(branch.gid().to_string());
                    }
                }
                Ok(branch) => orphans.push(branch),
                Err(error) => self.report(&xact.gid, &error.to_string()),
            }
            if in_doubt.len() + orphans.len() == MAX_GIDS_PER_QUERY {
                break;
            }
        }
        // A machine that asked about a branch PostgreSQL no longer lists (finished by hand, say)
        // still waits in the branch table: the coordinator's answer, applied with the usual
        // marker-row checks, finishes it. One left out here asks again on its next timeout.
        for gid in asked {
            if in_doubt.len() + orphans.len() >= MAX_GIDS_PER_QUERY {
                break;
            }
            if !in_doubt.contains(&gid) && !self.agent.is_busy(&gid) {
                in_doubt.push(gid);
            }
        }
        Ok((in_doubt, orphans))
    }

    /// Whether a configured coordinator can answer for `gid`: it names a decision shard (any
    /// instance reads its row), or belongs to a coordinator id one of them answered `Info` with.
    /// Logs each other one once.
    fn is_of_coordinator(&mut self, text: &str, gid: &Gid, coordinators: &[CoordinatorId]) -> bool {
        if gid.decision_shard().is_some() || coordinators.contains(gid.coordinator()) {
            return true;
        }
        let names: Vec<&str> = coordinators.iter().map(CoordinatorId::as_str).collect();
        self.report(
            text,
            &format!("it belongs to another coordinator than {}", names.join(", ")),
        );
        false
    }

    /// Finishes an orphan under its exact name once the coordinator has decided; a PENDING or
    /// unknown answer leaves it for a later pass. Not through the branch table or a three-phase
    /// machine: they know this shard's branches only, and no live call works on this name.
    async fn finish_orphan(&self, branch: &BranchGid, decision: Decision) {
        let (verb, done) = match decision {
            Decision::Commit => ("COMMIT PREPARED", "committed"),
            Decision::Abort => ("ROLLBACK PREPARED", "rolled back"),
            Decision::Pending | Decision::Unknown => return,
        };
        let shard = branch.shard().map_or("?", |shard| shard.as_str());
        match postgres::finish_exactly(self.agent.pool(), verb, branch).await {
            Ok(()) => tracing::warn!(
                gid = %branch,
                "{done} a branch prepared in this database under shard name {shard} (this is shard {}); \
                 was the shard renamed while it held prepared branches?",
                self.agent.shard()
            ),
            // Finished meanwhile by someone else (an operator, an earlier pass).
            Err(error) if error.is_undefined_object() => {}
            Err(error) => tracing::error!(gid = %branch, %error, "could not finish an orphaned branch"),
        }
    }

    /// Keeps the GIDs a configured coordinator can answer for; logs each other one once.
    fn own(&mut self, gids: Vec<String>, coordinators: &[CoordinatorId]) -> HashMap<String, Gid> {
        let mut own = HashMap::new();
        for text in gids {
            match Gid::parse(&text) {
                Ok(gid) => {
                    if self.is_of_coordinator(&text, &gid, coordinators) {
                        own.insert(text, gid);
                    }
                }
                Err(error) => self.report(&text, &error.to_string()),
            }
        }
        own
    }

    /// Logs once per GID why recovery leaves it alone.
    fn report(&mut self, text: &str, why: &str) {
        if self.reported.len() < MAX_REPORTED && self.reported.insert(text.to_owned()) {
            tracing::warn!(gid = %text, "recovery leaves this GID alone: {why}");
        }
    }

    /// The deliberately broken heuristic behind `participant::unsafe-commit-in-doubt`: commits
    /// every branch in doubt without asking anyone. Never reached unless that failpoint is armed.
    async fn commit_on_its_own(&self, prepared: &[String]) {
        for text in prepared {
            let Ok(gid) = Gid::parse(text) else { continue };
            tracing::error!(%gid, "UNSAFE (failpoint): committing an in-doubt branch without asking the coordinator");
            if let Err(error) = self.agent.commit(&gid).await {
                tracing::error!(%gid, %error, "UNSAFE (failpoint): the heuristic commit failed");
            }
        }
    }

    async fn apply(&self, gid: &Gid, decision: Decision) {
        let result = match decision {
            Decision::Commit => self.three_phase.commit(gid).await,
            Decision::Abort => self.three_phase.abort(gid).await,
            Decision::Pending | Decision::Unknown => {
                tracing::debug!(%gid, ?decision, "prepared branch left for a later pass");
                return;
            }
        };
        match result {
            Ok(state) => {
                crate::metrics::global().resolved_by_recovery(decision == Decision::Commit);
                tracing::info!(%gid, ?decision, ?state, "resolved a prepared branch")
            }
            Err(error) => {
                tracing::error!(%gid, ?decision, %error, "could not apply the coordinator's decision")
            }
        }
    }

    async fn delete_unneeded_markers(&self, answers: Vec<Answer>) -> Result<(), DbError> {
        let unneeded: Vec<String> = answers
            .into_iter()
            .filter(|a| !a.tracked && matches!(a.decision, Decision::Commit | Decision::Abort))
            .map(|a| a.gid)
            .collect();
        if unneeded.is_empty() {
            return Ok(());
        }
        let deleted = postgres::delete_markers(self.agent.pool(), &unneeded).await?;
        tracing::debug!(deleted, "deleted marker rows the coordinator no longer tracks");
        Ok(())
    }
}
