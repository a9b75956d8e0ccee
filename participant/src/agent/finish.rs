//! Phase two: `Commit` and `Abort` feed the branch's machine (`machine.rs`), which answers with
//! `COMMIT PREPARED`, `ROLLBACK PREPARED` or a rollback of an open branch, an acknowledgement, or a
//! typed refusal. Both are idempotent, and neither takes "prepared transaction does not exist" for
//! success: the marker row, committed with the branch, says which way it went. A GID that names a
//! decision shard has no marker (its decision row is the authority): a Commit that finds nothing
//! prepared answers UNKNOWN, "nothing prepared here", which the coordinator, holding a commit
//! row, takes as committed.

use treaty_commit_protocol::participant::{ParticipantEvent, Refusal, Remembered};
use treaty_commit_protocol::termination::Proposer;
use treaty_proto::Gid;

use super::machine::Answer;
use super::{Agent, BranchState};
use crate::branches::Finished;
use crate::decisions::{self, Outcome};
use crate::error::BranchError;

/// Phase-two requests come from the coordinator (directly, or through recovery's question).
const COORDINATOR: Proposer = Proposer::Coordinator { incarnation: 0 };

impl Agent {
    pub async fn commit(&self, gid: &Gid) -> Result<BranchState, BranchError> {
        let started = std::time::Instant::now();
        let event = ParticipantEvent::CommitRequested { from: COORDINATOR };
        let finished = self.finish(gid, event, BranchState::Committed).await;
        crate::metrics::global().finished(true, started.elapsed());
        finished
    }

    pub async fn abort(&self, gid: &Gid) -> Result<BranchState, BranchError> {
        let started = std::time::Instant::now();
        let event = ParticipantEvent::AbortRequested { from: COORDINATOR };
        let finished = self.finish(gid, event, BranchState::Aborted).await;
        crate::metrics::global().finished(false, started.elapsed());
        finished
    }

    async fn finish(
        &self,
        gid: &Gid,
        event: ParticipantEvent,
        done: BranchState,
    ) -> Result<BranchState, BranchError> {
        let mut slot = self.branches.lock(gid.as_str()).await;
        // With nothing remembered (after a restart) the branch may be held prepared: the
        // coordinator finishes only branches that voted, and the decision's I/O checks PostgreSQL
        // (no extra round trip first).
        let remembered = self.remembered(gid).unwrap_or(Remembered::Prepared);
        self.ensure_machine(&mut slot, remembered);
        match self.drive(&mut slot, gid, event).await? {
            Answer::Acknowledged => Ok(done),
            Answer::NothingPrepared => Ok(BranchState::Unknown),
            Answer::Refused(Refusal::OutcomeUnknown) if done == BranchState::Aborted => {
                match self.settle_from_decision_row(gid).await? {
                    Some(settled) => Ok(settled),
                    None => Err(self.finish_refused(gid, Refusal::OutcomeUnknown)),
                }
            }
            Answer::Refused(refusal) => Err(self.finish_refused(gid, refusal)),
            other => Err(BranchError::Internal(format!(
                "branch {gid} answered a decision with {other:?}"
            ))),
        }
    }

    /// A decision branch whose one-phase COMMIT lost its answer (PostgreSQL or the connection
    /// died under it) is settled by its own decision row: the COMMIT inserted the commit row
    /// first, in the same transaction, so an abort row committed in its place proves the COMMIT
    /// did not commit, and never will (the key is unique). The coordinator sends that abort only
    /// after reading the abort row; without this, the branch would refuse it forever. `None`: no
    /// row yet, or not a decision branch kept here; the refusal stands.
    async fn settle_from_decision_row(&self, gid: &Gid) -> Result<Option<BranchState>, BranchError> {
        if gid.decision_shard() != Some(&self.shard) {
            return Ok(None);
        }
        let rows = decisions::read(&self.pool, std::slice::from_ref(gid), false).await?;
        match rows.first().map(|row| row.outcome) {
            Some(Outcome::Abort) => {
                tracing::info!(%gid, "the decision branch's lost COMMIT did not commit: an abort row holds its place");
                self.branches.record(
                    gid.as_str(),
                    Finished::Aborted(
                        "its COMMIT lost the answer; the abort row shows it did not commit".into(),
                    ),
                );
                Ok(Some(BranchState::Aborted))
            }
            Some(Outcome::Commit) => {
                self.branches.record(gid.as_str(), Finished::CommittedOnePhase);
                Err(self.finish_refused(gid, Refusal::Committed))
            }
            None => Ok(None),
        }
    }

    fn finish_refused(&self, gid: &Gid, refusal: Refusal) -> BranchError {
        match refusal {
            Refusal::NotPrepared => BranchError::WrongState(format!(
                "branch {gid} is still open (not prepared); send Prepare before Commit"
            )),
            Refusal::RolledBack => {
                tracing::error!(%gid, "asked to commit a branch that was rolled back");
                BranchError::WrongState(format!("branch {gid} was rolled back, cannot commit"))
            }
            Refusal::Committed => {
                tracing::error!(%gid, "asked to abort a branch that already committed");
                let how = match self.branches.finished(gid.as_str()) {
                    Some(Finished::CommittedOnePhase) => " (one phase)",
                    _ => "",
                };
                BranchError::WrongState(format!("branch {gid} already committed{how}, cannot abort"))
            }
            Refusal::OutcomeUnknown => {
                let message = match self.branches.finished(gid.as_str()) {
                    Some(Finished::OutcomeUnknown(message)) => message,
                    _ => "no answer".into(),
                };
                BranchError::WrongState(format!(
                    "branch {gid} sent COMMIT and lost the answer ({message}); it cannot be finished \
                     another way"
                ))
            }
            Refusal::Prepared => BranchError::WrongState(format!("branch {gid}: {refusal}")),
        }
    }
}
