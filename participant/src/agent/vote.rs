//! The vote: `Prepare` and `CommitOnePhase` (plain `COMMIT` for a transaction's only participant)
//! feed the branch's machine (`machine.rs`), which decides between READ-ONLY (a branch that wrote
//! nothing), YES (after the marker row and `PREPARE TRANSACTION`) and NO; and the three-phase vote,
//! which `three_phase` drives with a machine of its own.

use std::time::Instant;

use treaty_commit_protocol::participant::{ParticipantEvent, Refusal, Remembered};
use treaty_proto::Gid;

use super::machine::{Answer, CONNECTION_FAILURE, Learned};
use super::{Agent, BranchState};
use crate::branches::{Finished, SlotGuard};
use crate::error::BranchError;
use crate::metrics;
use crate::postgres::{self, DbError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vote {
    Yes,
    ReadOnly,
    No { sqlstate: String, message: String },
}

impl Vote {
    fn no(message: String) -> Vote {
        Vote::No {
            sqlstate: String::new(),
            message,
        }
    }
}

impl Agent {
    /// The vote; an error only where a failpoint failed the step (`before-prepare`,
    /// `after-prepare` with `return(error)`).
    pub async fn prepare(&self, gid: &Gid) -> Result<Vote, BranchError> {
        let mut slot = self.branches.lock(gid.as_str()).await;
        self.prepare_locked(&mut slot, gid).await
    }

    /// `prepare` under a hold of the GID's lock the caller already has, counted in the metrics.
    pub(super) async fn prepare_locked(&self, slot: &mut SlotGuard, gid: &Gid) -> Result<Vote, BranchError> {
        let started = Instant::now();
        let vote = self.prepare_unmeasured(slot, gid).await;
        if let Ok(vote) = &vote {
            metrics::global().voted(vote, started.elapsed());
        }
        vote
    }

    async fn prepare_unmeasured(&self, slot: &mut SlotGuard, gid: &Gid) -> Result<Vote, BranchError> {
        if slot.machine.is_none() && slot.active.is_none() {
            let remembered = match self.remembered(gid) {
                Some(remembered) => remembered,
                None => match self.look_up_unremembered(gid).await {
                    Ok(remembered) => remembered,
                    Err(vote) => return Ok(vote),
                },
            };
            self.ensure_machine(slot, remembered);
        }
        self.ensure_machine(slot, Remembered::Prepared);
        let event = ParticipantEvent::PrepareRequested {
            participants: Vec::new(),
        };
        match self.drive(slot, gid, event).await? {
            Answer::Vote(vote) => Ok(vote),
            other => Err(BranchError::Internal(format!(
                "branch {gid} answered a prepare with {other:?}"
            ))),
        }
    }

    /// A `Prepare` for a GID with no open branch and no memory here (a repeat after a restart, or a
    /// branch never opened here or lost): PostgreSQL says whether it is prepared or committed. A
    /// NO vote that cannot even be looked up comes back as `Err`.
    async fn look_up_unremembered(&self, gid: &Gid) -> Result<Remembered, Vote> {
        match postgres::prepared_and_marker(&self.pool, &self.branch_gid(gid)).await {
            Ok((true, _)) => {
                tracing::info!(%gid, "Prepare repeated for a branch PostgreSQL holds prepared");
                Ok(Remembered::Prepared)
            }
            Ok((false, true)) => {
                tracing::info!(%gid, "Prepare repeated for a branch PostgreSQL committed");
                Ok(Remembered::Committed)
            }
            Ok((false, false)) => {
                let message = format!(
                    "no open branch for {gid} on shard {}: it was never opened here, or it was lost when \
                     the participant or PostgreSQL restarted, or it was rolled back after idling longer \
                     than --branch-idle-timeout-ms ({} ms)",
                    self.shard,
                    self.idle_timeout.as_millis()
                );
                tracing::warn!(%gid, "voting NO: {message}");
                self.branches.record(gid.as_str(), Finished::Aborted(message));
                Ok(Remembered::Aborted)
            }
            Err(error) => {
                tracing::warn!(%gid, %error, "voting NO: cannot check pg_prepared_xacts");
                Err(Vote::No {
                    sqlstate: match &error {
                        DbError::Sql { sqlstate, .. } => sqlstate.clone(),
                        _ => CONNECTION_FAILURE.to_owned(),
                    },
                    message: format!("cannot check whether {gid} is prepared: {error}"),
                })
            }
        }
    }

    /// The vote of a three-phase branch, as the executor of its machine's `PrepareBranch` (that
    /// machine lives in `three_phase`; the branch's two-phase one is dropped here): the
    /// participants are recorded durably first (termination needs them after a restart), and a
    /// branch that wrote nothing is prepared all the same, since a READ-ONLY voter would take no
    /// part in termination and could report nothing.
    pub async fn prepare_three_phase(
        &self,
        gid: &Gid,
        peers: &[crate::three_phase::Peer],
        promised: &treaty_commit_protocol::termination::Ballot,
    ) -> Result<Vote, BranchError> {
        let mut slot = self.branches.lock(gid.as_str()).await;
        if slot.active.is_none() {
            // A repeat, or a branch never opened here: answered as a two-phase prepare would be.
            return self.prepare_locked(&mut slot, gid).await;
        }
        let started = Instant::now();
        slot.machine = None;
        let mut learned = Learned::default();
        let mut active = slot.active.take();
        let prepared = match crate::three_phase::store::insert(&self.pool, gid, peers, promised).await {
            Ok(()) => {
                self.prepare_branch(&mut active, gid, &mut learned).await == ParticipantEvent::BranchPrepared
            }
            Err(error) => {
                self.vote_failed(&mut active, gid, error, &mut learned);
                false
            }
        };
        if !prepared {
            self.end_unprepared(&mut active, gid, &mut learned).await;
        }
        if let Some(error) = learned.error {
            return Err(error);
        }
        let vote = match (prepared, learned.no_vote) {
            (true, _) => Vote::Yes,
            (false, Some((sqlstate, message))) => Vote::No { sqlstate, message },
            (false, None) => Vote::no(format!("branch {gid} could not be prepared")),
        };
        metrics::global().voted(&vote, started.elapsed());
        Ok(vote)
    }

    pub async fn commit_one_phase(&self, gid: &Gid) -> Result<BranchState, BranchError> {
        let mut slot = self.branches.lock(gid.as_str()).await;
        self.commit_one_phase_locked(&mut slot, gid).await
    }

    /// `commit_one_phase` under a hold of the GID's lock the caller already has.
    pub(super) async fn commit_one_phase_locked(
        &self,
        slot: &mut SlotGuard,
        gid: &Gid,
    ) -> Result<BranchState, BranchError> {
        // Nothing remembered and nothing open: the branch was lost (or never opened), which is
        // as good as rolled back; nothing here can be committed in one phase.
        let remembered = self.remembered(gid);
        self.ensure_machine(slot, remembered.unwrap_or(Remembered::Aborted));
        match self
            .drive(slot, gid, ParticipantEvent::CommitOnePhaseRequested)
            .await?
        {
            Answer::Acknowledged => Ok(BranchState::Committed),
            Answer::Refused(refusal) => Err(self.one_phase_refused(gid, refusal, remembered.is_some())),
            other => Err(BranchError::Internal(format!(
                "branch {gid} answered a one-phase commit with {other:?}"
            ))),
        }
    }

    fn one_phase_refused(&self, gid: &Gid, refusal: Refusal, remembered: bool) -> BranchError {
        let finished = self.branches.finished(gid.as_str());
        match (refusal, finished) {
            (Refusal::OutcomeUnknown, Some(Finished::OutcomeUnknown(message))) => BranchError::Unavailable(
                format!("the earlier COMMIT of {gid} has an unknown outcome: {message}"),
            ),
            (Refusal::Prepared, _) => BranchError::WrongState(format!(
                "branch {gid} is prepared; finish it with Commit (COMMIT PREPARED), not CommitOnePhase"
            )),
            (Refusal::RolledBack, Some(Finished::Aborted(reason))) => BranchError::WrongState(format!(
                "branch {gid} was rolled back ({reason}); there is nothing to commit"
            )),
            (_, _) if !remembered => BranchError::WrongState(format!(
                "no open branch for {gid} on shard {}: nothing to commit (it was never opened here, or it \
                 was lost when the participant or PostgreSQL restarted, or it idled out)",
                self.shard
            )),
            (refusal, _) => BranchError::WrongState(format!("branch {gid}: {refusal}")),
        }
    }
}
