//! `CommitDecision`: the commit decision of a transaction whose GID names this shard as its
//! decision shard. The branch here is never prepared; its machine commits it in one phase, like
//! `CommitOnePhase`, with the commit row inserted into `treaty.decisions` first in the same round
//! trip (`decisions::insert_and_commit`): that COMMIT is the decision. An abort row committed
//! first makes the insert fail, and the branch rolls back. A dedicated decision database holds no
//! branch of the transaction: there the row is inserted in a transaction of its own.

use treaty_commit_protocol::participant::{ParticipantEvent, Remembered};
use treaty_proto::{Gid, ShardName};

use super::Agent;
use super::machine::{Answer, Learned};
use crate::branches::ActiveBranch;
use crate::decisions::{self, RowCommit};
use crate::error::BranchError;
use crate::failpoints;
use crate::pool::session::Session;
use crate::postgres::DbError;

/// The commit row a decision branch's one-phase COMMIT inserts first, and, once that ran, why
/// the branch did not commit (when PostgreSQL said so; a broken connection leaves it `None`).
pub(super) struct DecisionCommit {
    participants: Vec<ShardName>,
    not_committed: Option<String>,
}

impl DecisionCommit {
    /// Why PostgreSQL did not commit the row, once it said so.
    pub(super) fn not_committed(&self) -> Option<&str> {
        self.not_committed.as_deref()
    }

    /// The insert and COMMIT on the branch's connection. An error leaves the transaction for the
    /// rollback the machine asks for next (harmless where COMMIT already ended it).
    pub(super) async fn insert_and_commit(
        &mut self,
        branch: &mut ActiveBranch,
        gid: &Gid,
    ) -> Result<Session, DbError> {
        let role = branch.database_role.clone();
        match decisions::insert_and_commit(&mut branch.connection, gid, &self.participants, role.as_ref())
            .await
        {
            Ok(session) => Ok(session),
            Err(failure) => {
                let error = failure.db().clone();
                if !error.is_connection() {
                    self.not_committed = Some(failure.to_string());
                }
                Err(error)
            }
        }
    }
}

impl Agent {
    /// Commits the decision branch of `gid` (open here, never prepared) with its commit row.
    /// Answers `RowCommit::NotCommitted` when PostgreSQL refused the row or the COMMIT (the branch
    /// rolled back); an error when there is no open branch, or when the outcome is unknown.
    pub async fn commit_decision(
        &self,
        gid: &Gid,
        participants: Vec<ShardName>,
    ) -> Result<RowCommit, BranchError> {
        let mut slot = self.branches.lock(gid.as_str()).await;
        if slot.active.is_none() {
            let why = self.branches.finished(gid.as_str()).map_or_else(
                || {
                    "was never opened here, or was lost when the participant or PostgreSQL restarted"
                        .to_owned()
                },
                |finished| finished.describe(),
            );
            return Err(BranchError::NotFound(format!(
                "no open decision branch for {gid} on shard {}: it {why}; read its decision with \
                 ReadDecisions",
                self.shard
            )));
        }
        // As a database that cannot be reached: the branch stays open, nothing is decided.
        failpoints::step(failpoints::BEFORE_COMMIT_DECISION)?;
        // An open branch always has its machine; should it not, a fresh one is what it would be.
        self.ensure_machine(&mut slot, Remembered::Aborted);
        let mut learned = Learned {
            decision: Some(DecisionCommit {
                participants,
                not_committed: None,
            }),
            ..Learned::default()
        };
        let answer = self
            .drive_keeping(
                &mut slot,
                gid,
                ParticipantEvent::CommitOnePhaseRequested,
                &mut learned,
            )
            .await;
        // PostgreSQL refused the row or the COMMIT: the branch is rolled back, whatever else
        // happened in the drive.
        if let Some(why) = learned.decision.and_then(|decision| decision.not_committed) {
            tracing::info!(%gid, "the decision branch did not commit: {why}");
            return Ok(RowCommit::NotCommitted(why));
        }
        match answer? {
            Answer::Acknowledged => Ok(RowCommit::Committed),
            Answer::Refused(refusal) => Err(BranchError::WrongState(format!(
                "decision branch {gid}: {refusal}"
            ))),
            other => Err(BranchError::Internal(format!(
                "decision branch {gid} answered its commit with {other:?}"
            ))),
        }
    }

    /// Inserts `gid`'s commit row on its own (a dedicated decision database: no branch of the
    /// transaction is here).
    pub async fn commit_decision_standalone(
        &self,
        gid: &Gid,
        participants: &[ShardName],
    ) -> Result<RowCommit, BranchError> {
        Ok(decisions::insert_standalone(&self.pool, gid, participants).await?)
    }
}
