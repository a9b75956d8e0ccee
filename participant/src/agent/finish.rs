//! Phase two: `Commit` (`COMMIT PREPARED`) and `Abort` (`ROLLBACK` of an open branch or
//! `ROLLBACK PREPARED`). Both are idempotent, and neither takes "prepared transaction does not
//! exist" for success: the marker row, committed with the branch, says which way it went.

use treaty_proto::Gid;

use super::{Agent, BranchState};
use crate::branches::Finished;
use crate::error::BranchError;
use crate::failpoints;
use crate::postgres;

impl Agent {
    pub async fn commit(&self, gid: &Gid) -> Result<BranchState, BranchError> {
        let slot = self.branches.lock(gid.as_str()).await;
        if slot.active.is_some() {
            return Err(BranchError::WrongState(format!(
                "branch {gid} is still open (not prepared); send Prepare before Commit"
            )));
        }
        if let Some(Finished::ReadOnly | Finished::CommittedOnePhase) = self.branches.finished(gid.as_str()) {
            return Ok(BranchState::Committed);
        }
        failpoints::step(failpoints::BEFORE_COMMIT_PREPARED)?;
        match postgres::commit_prepared(&self.pool, &self.branch_gid(gid)).await {
            Ok(()) => {
                let after = failpoints::step(failpoints::AFTER_COMMIT_PREPARED);
                tracing::debug!(%gid, "committed");
                self.branches.record(gid.as_str(), Finished::Committed);
                after.map(|()| BranchState::Committed)
            }
            Err(error) if error.is_undefined_object() => {
                if postgres::marker_exists(&self.pool, gid).await? {
                    self.branches.record(gid.as_str(), Finished::Committed);
                    return Ok(BranchState::Committed);
                }
                tracing::error!(
                    %gid,
                    "asked to commit a branch that is not prepared and has no marker row: it was rolled back \
                     or never prepared here"
                );
                self.branches.record(
                    gid.as_str(),
                    Finished::Aborted("found rolled back at commit".into()),
                );
                Err(BranchError::WrongState(format!(
                    "branch {gid} was rolled back, cannot commit"
                )))
            }
            Err(error) => Err(error.into()),
        }
    }

    pub async fn abort(&self, gid: &Gid) -> Result<BranchState, BranchError> {
        let mut slot = self.branches.lock(gid.as_str()).await;
        if let Some(branch) = slot.active.take() {
            self.roll_back(branch, gid).await;
            self.branches
                .record(gid.as_str(), Finished::Aborted("aborted before prepare".into()));
            return Ok(BranchState::Aborted);
        }
        match self.branches.finished(gid.as_str()) {
            // Nothing was written, so there is nothing to undo.
            Some(Finished::ReadOnly) => return Ok(BranchState::Aborted),
            Some(Finished::CommittedOnePhase) => {
                tracing::error!(%gid, "asked to abort a branch that committed in one phase");
                return Err(BranchError::WrongState(format!(
                    "branch {gid} already committed (one phase), cannot abort"
                )));
            }
            Some(Finished::OutcomeUnknown(message)) => {
                return Err(BranchError::WrongState(format!(
                    "branch {gid} sent COMMIT and lost the answer ({message}); it cannot be aborted"
                )));
            }
            _ => {}
        }
        failpoints::step(failpoints::BEFORE_ROLLBACK_PREPARED)?;
        match postgres::rollback_prepared(&self.pool, &self.branch_gid(gid)).await {
            Ok(()) => {
                let after = failpoints::step(failpoints::AFTER_ROLLBACK_PREPARED);
                tracing::debug!(%gid, "rolled back a prepared branch");
                self.branches.record(
                    gid.as_str(),
                    Finished::Aborted("rolled back after prepare".into()),
                );
                after.map(|()| BranchState::Aborted)
            }
            Err(error) if error.is_undefined_object() => {
                if postgres::marker_exists(&self.pool, gid).await? {
                    tracing::error!(%gid, "asked to abort a branch that already committed");
                    self.branches.record(gid.as_str(), Finished::Committed);
                    return Err(BranchError::WrongState(format!(
                        "branch {gid} already committed, cannot abort"
                    )));
                }
                // Never prepared or already rolled back: aborted under presumed abort. Remembering
                // it refuses a late Execute or Prepare for the GID.
                if !matches!(self.branches.finished(gid.as_str()), Some(Finished::Aborted(_))) {
                    self.branches.record(
                        gid.as_str(),
                        Finished::Aborted("aborted by the coordinator".into()),
                    );
                }
                Ok(BranchState::Aborted)
            }
            Err(error) => Err(error.into()),
        }
    }
}
