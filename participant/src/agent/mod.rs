//! The participant's behaviour, one method per RPC, on domain types: `execute` (open a branch, run
//! statements), `prepare` and `commit_one_phase` (the vote), `commit_decision` (the decision
//! branch's one-phase commit with its decision row), `commit` and `abort` (phase two, also used by
//! reconciliation), `status`; plus the idle-branch sweep and shutdown.
//!
//! Every two-phase branch runs the protocol's `Participant` machine (`machine.rs` steps it and
//! carries out its actions): the methods here feed it events and answer what it decides.
//!
//! Every method that touches a GID holds that GID's lock from the branch table for its whole
//! duration, so RPCs, the sweep and reconciliation never interleave on one GID.

mod decision;
mod execute;
mod finish;
mod machine;
mod vote;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use treaty_commit_protocol::participant::ParticipantEvent;

use treaty_proto::{BranchGid, CoordinatorId, Gid, ShardName, TxId};

use crate::branches::{ActiveBranch, Branches, Finished};
use crate::decisions::{self, Outcome};
use crate::error::BranchError;
use crate::pool::Pool;
use crate::postgres::{self, DbError};

pub use vote::Vote;

/// How long finished GIDs are remembered (tombstones and outcomes).
const HISTORY_RETENTION: Duration = Duration::from_secs(600);
/// How long `Status` waits for a call in progress on the same GID.
const STATUS_LOCK_WAIT: Duration = Duration::from_millis(500);

/// A branch's state as `Status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BranchState {
    Unknown,
    Active,
    Prepared,
    Committed,
    Aborted,
}

/// Why the txids below a bound were closed (`Agent::close_below`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The coordinator restarted: the bound is its new run's first txid.
    RunEnded,
    /// The coordinator says it has finished every lower txid (`Info.open_from`).
    Finished,
}

/// Which transactions may open a branch here: those of `coordinator` begun after this process
/// started. A transaction begun earlier may have had a branch in the previous process, lost with
/// it; opening a fresh branch for its next statement would commit that statement without the
/// earlier ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    pub coordinator: CoordinatorId,
    /// The coordinator's next txid when this process started.
    pub first_txid: TxId,
}

pub struct Agent {
    shard: ShardName,
    database: String,
    pool: Pool,
    branches: Arc<Branches>,
    idle_timeout: Duration,
    /// Per coordinator id, the lowest txid that may still open a branch here (see `Admission`);
    /// raised when a coordinator's new run is seen (`end_run`).
    admission: Mutex<HashMap<CoordinatorId, TxId>>,
    /// Prepared branches whose machine timed out and asked for the coordinator's decision; the
    /// reconciler asks about them on its next pass.
    asked: Mutex<HashSet<String>>,
    /// The origin of the machines' clock (`clock_ms`).
    epoch: Instant,
}

impl Agent {
    pub fn new(
        shard: ShardName,
        database: String,
        pool: Pool,
        idle_timeout: Duration,
        admission: Vec<Admission>,
    ) -> Arc<Self> {
        let admission = admission
            .into_iter()
            .map(|a| (a.coordinator, a.first_txid))
            .collect();
        Arc::new(Self {
            shard,
            database,
            pool,
            branches: Branches::new(HISTORY_RETENTION),
            idle_timeout,
            admission: Mutex::new(admission),
            asked: Mutex::default(),
            epoch: Instant::now(),
        })
    }

    pub fn shard(&self) -> &ShardName {
        &self.shard
    }

    /// The name this shard's branch of `gid` is prepared under in PostgreSQL (unique per server).
    pub fn branch_gid(&self, gid: &Gid) -> BranchGid {
        BranchGid::new(gid, &self.shard)
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    /// Branches open here now (the metrics).
    pub fn open_branches(&self) -> usize {
        self.branches.open_count()
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Whether the GID has an open (not yet voted) branch here that nobody is using right now.
    pub fn has_open_branch(&self, gid: &str) -> bool {
        self.branches
            .try_lock(gid)
            .is_some_and(|slot| slot.active.is_some())
    }

    /// Whether an RPC is working on the GID right now (recovery leaves such GIDs alone).
    pub fn is_busy(&self, gid: &str) -> bool {
        self.branches.is_busy(gid)
    }

    /// The time the two-phase machines run on: milliseconds since this agent started, monotonic,
    /// so a wall-clock step cannot roll back an open branch early. The machines live only in
    /// this process's memory, so a process-local origin is enough.
    fn clock_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn idle_timeout_ms(&self) -> u64 {
        u64::try_from(self.idle_timeout.as_millis()).unwrap_or(u64::MAX)
    }

    /// Carries out a machine's `AskCoordinator`: the reconciler asks on its next pass.
    fn ask_coordinator(&self, gid: &Gid) {
        tracing::info!(%gid, "prepared branch waited past its timeout; asking the coordinator");
        self.asked
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(gid.to_string());
    }

    /// The GIDs whose machines asked for the coordinator's decision since the last call.
    pub fn take_asked(&self) -> HashSet<String> {
        std::mem::take(&mut *self.asked.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// Ends an open branch's transaction with ROLLBACK and frees its connection.
    async fn roll_back(&self, mut branch: ActiveBranch, gid: &Gid) {
        if let Some(Ok(session)) = branch.vote_sent.take() {
            // PostgreSQL already prepared it with the last statement (`execute_and_prepare`) and
            // the vote never took that answer: a ROLLBACK would find no transaction and leave
            // the branch prepared, holding its locks until reconciliation. Rolled back as
            // prepared, on its own connection, whose transaction has ended.
            match postgres::rollback_prepared_on(&branch.connection, &self.branch_gid(gid)).await {
                Ok(()) => branch.transaction_ended(gid, session),
                Err(error) if error.is_undefined_object() => branch.transaction_ended(gid, session),
                Err(error) => {
                    // Its session may be under a role a function moved it to, which may not
                    // finish a branch the participant's role prepared: closed, and the rollback
                    // tried once more on a checked connection.
                    branch.discard();
                    let branch_gid = self.branch_gid(gid);
                    match postgres::rollback_prepared(&self.pool, &branch_gid).await {
                        Ok(()) => {}
                        Err(again) if again.is_undefined_object() => {}
                        Err(again) => {
                            tracing::warn!(%gid, %error, %again, "ROLLBACK PREPARED of a branch prepared with its last statement failed; reconciliation will roll it back")
                        }
                    }
                }
            }
            return;
        }
        if let Some(Ok(session)) = branch.commit_sent.take() {
            // The COMMIT went with the statement and ended the transaction (the statement's
            // rows then failed on this side): there is nothing left to end. (After a statement
            // PostgreSQL refused, the COMMIT behind it was skipped and answered as an error, so
            // that transaction is rolled back below.)
            branch.transaction_ended(gid, session);
            return;
        }
        match postgres::rollback(&mut branch.connection).await {
            Ok(session) => branch.transaction_ended(gid, session),
            Err(error) => {
                // PostgreSQL rolls the transaction back itself when the connection closes.
                tracing::warn!(%gid, %error, "ROLLBACK failed; closing the connection instead");
                branch.discard();
            }
        }
    }

    pub async fn status(&self, gid: &Gid) -> Result<BranchState, BranchError> {
        // Waits briefly for a call in progress (a vote, phase two) so the answer reflects its outcome;
        // a call that takes longer is almost always a statement on an open branch.
        let _slot = match tokio::time::timeout(STATUS_LOCK_WAIT, self.branches.lock(gid.as_str())).await {
            Ok(slot) if slot.active.is_some() => return Ok(BranchState::Active),
            Ok(slot) => slot,
            Err(_) => return Ok(BranchState::Active),
        };
        let (prepared, marker) = postgres::prepared_and_marker(&self.pool, &self.branch_gid(gid)).await?;
        if prepared {
            return Ok(BranchState::Prepared);
        }
        if marker {
            return Ok(BranchState::Committed);
        }
        Ok(match self.branches.finished(gid.as_str()) {
            Some(Finished::ReadOnly | Finished::CommittedOnePhase | Finished::Committed) => {
                BranchState::Committed
            }
            // No marker for a GID that names a decision shard: prepared here and gone since may
            // be either way; its decision row says which.
            Some(Finished::Prepared) if gid.decision_shard().is_some() => BranchState::Unknown,
            // Prepared here, now neither prepared nor committed: rolled back since.
            Some(Finished::Aborted(_) | Finished::Prepared) => BranchState::Aborted,
            Some(Finished::OutcomeUnknown(_)) | None => BranchState::Unknown,
        })
    }

    /// Ticks every machine whose timeout passed: an open branch idle for longer than the idle
    /// timeout is rolled back, a prepared one asks the coordinator (it is never finished here).
    /// Also forgets old history.
    pub async fn sweep_idle(&self) {
        let now_ms = self.clock_ms();
        for gid in self.branches.gids() {
            let (Some(mut slot), Ok(parsed)) = (self.branches.try_lock(&gid), Gid::parse(&gid)) else {
                continue;
            };
            let due = slot
                .machine
                .as_ref()
                .and_then(|machine| machine.next_deadline_ms())
                .is_some_and(|deadline_ms| deadline_ms <= now_ms);
            if !due {
                continue;
            }
            let idle = slot.active.as_ref().map(|b| b.last_used.elapsed());
            let reason = format!(
                "no call for {} ms, over --branch-idle-timeout-ms {}",
                idle.unwrap_or_default().as_millis(),
                self.idle_timeout.as_millis()
            );
            if idle.is_some() {
                tracing::warn!(gid = %parsed, "rolling back an idle branch: {reason}");
            }
            let learned = machine::Learned {
                abort_reason: Some(reason),
                ..machine::Learned::default()
            };
            if let Err(error) = self
                .drive_learning(&mut slot, &parsed, ParticipantEvent::Tick, learned)
                .await
            {
                tracing::warn!(gid = %parsed, %error, "idle sweep step failed");
            }
        }
        self.branches.prune_history();
    }

    /// The lowest txid of `coordinator` that may open a branch here, if one is known.
    fn admitted_from(&self, coordinator: &CoordinatorId) -> Option<TxId> {
        self.admission
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(coordinator)
            .copied()
    }

    /// A run of `coordinator` ended: every txid below `first_txid` (the new run's first) belonged
    /// to an earlier run. See [`Agent::close_below`].
    ///
    /// Why txid order is enough: a coordinator's txids are reserved in its store in blocks and
    /// never handed out twice, across restarts too, and `first_txid` is the first this run hands
    /// out; so a branch of this coordinator with a lower txid was begun by an earlier run, which
    /// is gone (a higher incarnation is running), and its unprepared work can only be aborted
    /// (presumed abort: its coordinator never logged a commit for an unprepared branch).
    pub async fn end_run(&self, coordinator: &CoordinatorId, first_txid: TxId) -> usize {
        self.close_below(coordinator, first_txid, Closed::RunEnded).await
    }

    /// Every txid of `coordinator` below `from` is closed (`why`): no branch of those may open
    /// from now on, and every one still open and unprepared is rolled back: nobody will ever ask
    /// it to prepare or commit. Prepared branches are never touched (their decision may be
    /// commit; recovery asks for it). A branch some call is working on right now is left for the
    /// next call of this (the caller repeats it every pass). Answers how many were rolled back.
    pub async fn close_below(&self, coordinator: &CoordinatorId, from: TxId, why: Closed) -> usize {
        {
            let mut admission = self
                .admission
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let admitted = admission.entry(coordinator.clone()).or_insert(from);
            *admitted = (*admitted).max(from);
        }
        let mut rolled_back = 0;
        for gid in self.branches.gids() {
            let Ok(parsed) = Gid::parse(&gid) else {
                continue;
            };
            if parsed.coordinator() != coordinator || parsed.txid() >= from {
                continue;
            }
            // Busy: a statement or a vote is running; the next pass sees how it ended.
            let Some(mut slot) = self.branches.try_lock(&gid) else {
                continue;
            };
            // No open transaction: prepared (or finished): never ours to decide.
            if slot.active.is_none() {
                continue;
            }
            let reason = match why {
                Closed::RunEnded => format!(
                    "coordinator {coordinator} restarted; transaction {} belonged to an earlier run \
                     (this run starts at txid {from}) and can never prepare",
                    parsed.txid()
                ),
                Closed::Finished => format!(
                    "coordinator {coordinator} has finished transaction {} (it says every txid \
                     below {from} has), so this branch can never prepare",
                    parsed.txid()
                ),
            };
            self.abandon(&mut slot, &parsed, reason).await;
            rolled_back += 1;
        }
        rolled_back
    }

    /// Deletes abort rows of `treaty.decisions` (at most `limit` looked at) that can no longer
    /// meet a commit: the transaction's txid is below what its coordinator may still open here
    /// (`close_below`), so no branch of it can open again, and none is open now. An abort row
    /// exists to make a decision branch's late commit fail; with the branch gone and refused,
    /// nothing can try. Anyone who later asks about the transaction finds no row and concludes
    /// abort again, the same answer. Answers how many rows went.
    pub async fn collect_abort_rows(&self, limit: u32) -> Result<u64, DbError> {
        // Per coordinator with a known bound: the oldest rows of all could belong to an instance
        // with none (one removed from the configuration), and, looked at first every pass, keep
        // everyone else's from ever being reached.
        let bounded: Vec<CoordinatorId> = self
            .admission
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .keys()
            .cloned()
            .collect();
        // `limit` over them all, shared out.
        let each = (limit / u32::try_from(bounded.len()).unwrap_or(u32::MAX).max(1)).max(1);
        let mut rows = Vec::new();
        for coordinator in &bounded {
            rows.extend(decisions::list(&self.pool, Outcome::Abort, Some(coordinator), each).await?);
        }
        let mut gone = Vec::new();
        for text in rows.into_iter().map(|row| row.gid) {
            let Ok(gid) = Gid::parse(&text) else {
                continue;
            };
            let Some(from) = self.admitted_from(gid.coordinator()) else {
                continue;
            };
            if gid.txid() >= from {
                continue;
            }
            // Open (or busy) branches keep their row: the idle sweep or `close_below` ends them.
            // Nothing can open one after this look: the txid is below the admission bound.
            if !self.branches.is_busy(gid.as_str()) {
                gone.push(text);
            }
        }
        if gone.is_empty() {
            return Ok(0);
        }
        decisions::delete(&self.pool, Outcome::Abort, &gone).await
    }

    /// Rolls back every open branch (graceful shutdown); prepared ones stay prepared.
    pub async fn shutdown(&self) {
        for gid in self.branches.gids() {
            let Ok(parsed) = Gid::parse(&gid) else {
                continue;
            };
            let mut slot = self.branches.lock(&gid).await;
            if slot.active.is_some() {
                tracing::info!(gid = %parsed, "rolling back an open branch at shutdown");
                self.abandon(&mut slot, &parsed, "participant shut down".into())
                    .await;
            }
        }
    }
}
