//! Two-phase commit with the commit decision inside PostgreSQL (`--decision-store shard`). The
//! first branch a transaction enlists is its decision branch, and its GID names that shard
//! (`treaty:<coordinator>:<txid>@<shard>`). The decision branch is never prepared: once every other
//! branch voted YES, it inserts the transaction's commit row into `treaty.decisions` and commits in
//! one phase (`Action::CommitDecision`); that COMMIT is the decision, as durable as that database.
//!
//! Abort stays presumed. Whoever must conclude abort without the coordinator that runs the
//! transaction inserts an abort row on the same key; PostgreSQL's unique index lets only one of
//! the two rows commit. So the decision branch's answer is read as follows: committed → decided
//! commit; not committed (an abort row won, or the COMMIT failed and rolled back) → abort; no clear
//! answer → the row is read back with `Action::ConcludeDecision`, which concludes abort only if
//! no commit row exists or can still commit, and that answer is final. The machine never decides
//! abort by itself once the decision branch may have committed.
//!
//! The first branch is the one chosen because it costs nothing extra: its commit is a round trip
//! the transaction makes anyway (instead of PREPARE and COMMIT PREPARED), and it is known before
//! any branch prepares, so every prepared branch's GID can name it. A one-shot submit whose first
//! shard already voted with its last statement keeps that vote; its decision row is then inserted
//! on that shard in a transaction of its own (`standalone`).

use treaty_types::ShardName;

use super::{BranchPhase, Phase, Protocol, Transaction};
use crate::events::{AbortReason, Action, Vote};
use crate::retry_delay_ms;

impl Transaction {
    /// Has this transaction decide in its first branch instead of the coordinator's store. Only
    /// two-phase commit does; a three-phase transaction keeps its records in the store.
    pub fn set_decision_in_branch(&mut self) {
        self.decide_in_branch = self.protocol == Protocol::TwoPhase;
    }

    /// Whether this transaction decides in its first branch.
    pub fn decides_in_branch(&self) -> bool {
        self.decide_in_branch
    }

    /// The shard whose `treaty.decisions` holds this transaction's decision: its first branch's,
    /// when it decides in a branch and has one.
    pub fn decision_shard(&self) -> Option<&ShardName> {
        self.decide_in_branch
            .then(|| self.branches.first().map(|b| &b.shard))
            .flatten()
    }

    /// At prepare: the decision branch is not asked to vote (it commits the decision instead),
    /// unless it already voted with its last statement. Returns the branch left open.
    pub(super) fn keep_decision_branch_open(&mut self, cast: &[(ShardName, Vote)]) -> Option<ShardName> {
        let shard = self.decision_shard()?.clone();
        if cast.iter().any(|(voted, _)| voted == &shard) {
            return None;
        }
        self.branches[0].phase = BranchPhase::Active;
        Some(shard)
    }

    /// Every vote is in and none is NO: commits the decision through the decision branch. Returns
    /// false when this transaction does not decide in a branch, or has nothing to decide (every
    /// branch read-only, the decision branch included).
    pub(super) fn decide_in_branch(&mut self, prepared: Vec<ShardName>, actions: &mut Vec<Action>) -> bool {
        let Some(shard) = self.decision_shard().cloned() else {
            return false;
        };
        let open = self.branches[0].phase == BranchPhase::Active;
        if open && prepared.is_empty() {
            // Nothing else is prepared: the decision branch is the only writer, a plain COMMIT.
            self.phase = Phase::CommittingOnePhase;
            self.branches[0].phase = BranchPhase::Committing;
            self.branches[0].attempts = 1;
            actions.push(Action::CommitOnePhase { shard });
            return true;
        }
        if prepared.is_empty() {
            return false;
        }
        self.phase = Phase::LoggingCommit;
        if open {
            self.branches[0].phase = BranchPhase::Committing;
        }
        self.branches[0].attempts = 1;
        actions.push(Action::CommitDecision {
            shard,
            participants: prepared,
            standalone: !open,
        });
        true
    }

    /// The commit row committed: the decision branch, if it carried the row, is done.
    pub(super) fn decision_branch_committed(&mut self) {
        if self.decide_in_branch
            && let Some(branch) = self.branches.first_mut()
            && branch.phase == BranchPhase::Committing
        {
            branch.phase = BranchPhase::Committed;
            branch.last_error = None;
        }
    }

    /// The commit row did not commit, and the transaction aborts. `rolled_back`: the decision
    /// branch's participant said so (it rolled the branch back). Otherwise the abort was read from
    /// the row, and the decision branch may still be open (the `CommitDecision` may never have
    /// reached it): it is told to roll back like any other branch, so it does not hold its locks
    /// until the participant's idle timeout.
    pub(super) fn decision_refused(
        &mut self,
        reason: AbortReason,
        rolled_back: bool,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) {
        if !self.decide_in_branch || self.phase != Phase::LoggingCommit {
            return;
        }
        if self.branches[0].phase == BranchPhase::Committing {
            self.branches[0].phase = if rolled_back {
                BranchPhase::Aborted
            } else {
                BranchPhase::Active
            };
        }
        self.abort(reason, now_ms, actions);
    }

    /// No clear answer: read the decision back (concluding abort if there is none), with backoff.
    pub(super) fn decision_unknown(&mut self, error: String, actions: &mut Vec<Action>) {
        if !self.decide_in_branch || self.phase != Phase::LoggingCommit {
            return;
        }
        let branch = &mut self.branches[0];
        let delay_ms = retry_delay_ms(branch.attempts.saturating_sub(1));
        branch.attempts += 1;
        branch.last_error = Some(error);
        actions.push(Action::ConcludeDecision {
            shard: branch.shard.clone(),
            delay_ms,
        });
    }
}
