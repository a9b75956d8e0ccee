//! The vote: `Prepare` (READ-ONLY for a branch that wrote nothing, YES after the marker row and
//! `PREPARE TRANSACTION`, NO otherwise) and `CommitOnePhase` (plain `COMMIT` for a transaction's
//! only participant).

use treaty_proto::Gid;

use super::{Agent, BranchState};
use crate::branches::{ActiveBranch, Finished, SlotGuard};
use crate::error::BranchError;
use crate::failpoints;
use crate::postgres::{self, DbError};

/// SQLSTATE `connection_failure`, reported with a NO vote when the database connection broke.
const CONNECTION_FAILURE: &str = "08006";

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
        match slot.active.take() {
            Some(branch) => self.prepare_open(gid, branch, false).await,
            None => Ok(self.vote_without_branch(gid).await),
        }
    }

    /// The vote of a three-phase branch: the participants are recorded durably first (termination
    /// needs them after a restart), and a branch that wrote nothing is prepared all the same, since
    /// a READ-ONLY voter would take no part in termination and could report nothing.
    pub async fn prepare_three_phase(
        &self,
        gid: &Gid,
        peers: &[crate::three_phase::Peer],
        promised: &treaty_commit_protocol::termination::Ballot,
    ) -> Result<Vote, BranchError> {
        let mut slot = self.branches.lock(gid.as_str()).await;
        let Some(branch) = slot.active.take() else {
            return Ok(self.vote_without_branch(gid).await);
        };
        if let Err(error) = crate::three_phase::store::insert(&self.pool, gid, peers, promised).await {
            return Ok(self.vote_no(gid, branch, error).await);
        }
        self.prepare_open(gid, branch, true).await
    }

    pub(super) async fn prepare_open(
        &self,
        gid: &Gid,
        mut branch: ActiveBranch,
        always_prepare: bool,
    ) -> Result<Vote, BranchError> {
        // A branch known to have written skips the round trip that asks PostgreSQL.
        let wrote_nothing = if branch.wrote || always_prepare {
            false
        } else {
            match postgres::wrote_nothing(&mut branch.connection).await {
                Ok(wrote_nothing) => wrote_nothing,
                Err(error) => return Ok(self.vote_no(gid, branch, error).await),
            }
        };
        if wrote_nothing {
            return Ok(match postgres::commit(&mut branch.connection).await {
                Ok(()) => {
                    branch.transaction_ended();
                    self.branches.record(gid.as_str(), Finished::ReadOnly);
                    Vote::ReadOnly
                }
                Err(error) => self.vote_no(gid, branch, error).await,
            });
        }
        if let Err(error) = failpoints::step(failpoints::BEFORE_PREPARE) {
            // As a PREPARE that failed: the branch is rolled back.
            self.roll_back(branch, gid).await;
            self.branches
                .record(gid.as_str(), Finished::Aborted(error.to_string()));
            return Err(error);
        }
        match postgres::insert_marker_and_prepare(&mut branch.connection, gid, &self.branch_gid(gid)).await {
            Ok(()) => {
                let after = failpoints::step(failpoints::AFTER_PREPARE);
                branch.transaction_ended();
                self.branches.record(gid.as_str(), Finished::Prepared);
                // On an error the branch stays prepared: the coordinator counts the failed call
                // as a NO and its abort (or recovery) rolls the branch back.
                after.map(|()| Vote::Yes)
            }
            Err(error) => Ok(self.vote_no(gid, branch, error).await),
        }
    }

    /// Ends the branch after a failed vote step and says why.
    async fn vote_no(&self, gid: &Gid, branch: ActiveBranch, error: DbError) -> Vote {
        let (sqlstate, message) = match error {
            DbError::Sql { sqlstate, message } => {
                self.roll_back(branch, gid).await;
                (sqlstate, message)
            }
            DbError::Connection(message) => {
                // If PREPARE itself went through, the branch stays prepared until the coordinator's
                // abort (or reconciliation) rolls it back.
                branch.discard();
                (
                    CONNECTION_FAILURE.to_owned(),
                    format!("the connection to PostgreSQL broke while preparing: {message}"),
                )
            }
            DbError::Client(message) => {
                self.roll_back(branch, gid).await;
                (String::new(), message)
            }
        };
        tracing::warn!(%gid, %sqlstate, %message, "voting NO");
        self.branches
            .record(gid.as_str(), Finished::Aborted(format!("voted NO: {message}")));
        Vote::No { sqlstate, message }
    }

    /// A `Prepare` for a GID with no open branch: a repeat of an earlier vote, or a branch that was
    /// never opened here or was lost.
    async fn vote_without_branch(&self, gid: &Gid) -> Vote {
        match self.branches.finished(gid.as_str()) {
            Some(Finished::Prepared | Finished::Committed) => return Vote::Yes,
            Some(Finished::ReadOnly) => return Vote::ReadOnly,
            Some(finished) => return Vote::no(format!("branch {gid} {}", finished.describe())),
            None => {}
        }
        match postgres::prepared_and_marker(&self.pool, &self.branch_gid(gid)).await {
            Ok((true, _)) | Ok((_, true)) => {
                tracing::info!(%gid, "Prepare repeated for a branch PostgreSQL holds prepared or committed");
                Vote::Yes
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
                self.branches
                    .record(gid.as_str(), Finished::Aborted(message.clone()));
                Vote::no(message)
            }
            Err(error) => {
                tracing::warn!(%gid, %error, "voting NO: cannot check pg_prepared_xacts");
                Vote::No {
                    sqlstate: match &error {
                        DbError::Sql { sqlstate, .. } => sqlstate.clone(),
                        _ => CONNECTION_FAILURE.to_owned(),
                    },
                    message: format!("cannot check whether {gid} is prepared: {error}"),
                }
            }
        }
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
        let Some(mut branch) = slot.active.take() else {
            return self.repeat_commit_one_phase(gid);
        };
        match postgres::commit(&mut branch.connection).await {
            Ok(()) => {
                branch.transaction_ended();
                self.branches.record(gid.as_str(), Finished::CommittedOnePhase);
                Ok(BranchState::Committed)
            }
            Err(DbError::Connection(message)) => {
                branch.discard();
                tracing::error!(%gid, %message, "connection broke during a one-phase COMMIT; outcome unknown");
                self.branches
                    .record(gid.as_str(), Finished::OutcomeUnknown(message.clone()));
                Err(BranchError::Unavailable(format!(
                    "the connection to PostgreSQL broke during COMMIT of {gid}; whether it committed is \
                     unknown: {message}"
                )))
            }
            Err(error) => {
                // A failed COMMIT (deferred constraint, serialization failure) rolled back already.
                self.roll_back(branch, gid).await;
                tracing::info!(%gid, %error, "one-phase COMMIT failed; the transaction rolled back");
                self.branches
                    .record(gid.as_str(), Finished::Aborted(format!("COMMIT failed: {error}")));
                Err(error.into())
            }
        }
    }

    fn repeat_commit_one_phase(&self, gid: &Gid) -> Result<BranchState, BranchError> {
        match self.branches.finished(gid.as_str()) {
            Some(Finished::CommittedOnePhase | Finished::ReadOnly | Finished::Committed) => {
                Ok(BranchState::Committed)
            }
            Some(Finished::OutcomeUnknown(message)) => Err(BranchError::Unavailable(format!(
                "the earlier COMMIT of {gid} has an unknown outcome: {message}"
            ))),
            Some(Finished::Prepared) => Err(BranchError::WrongState(format!(
                "branch {gid} is prepared; finish it with Commit (COMMIT PREPARED), not CommitOnePhase"
            ))),
            Some(Finished::Aborted(reason)) => Err(BranchError::WrongState(format!(
                "branch {gid} was rolled back ({reason}); there is nothing to commit"
            ))),
            None => Err(BranchError::WrongState(format!(
                "no open branch for {gid} on shard {}: nothing to commit (it was never opened here, or it \
                 was lost when the participant or PostgreSQL restarted, or it idled out)",
                self.shard
            ))),
        }
    }
}
