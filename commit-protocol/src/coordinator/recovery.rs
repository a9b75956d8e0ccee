//! Rebuilding transactions from the decision store after a restart (or from an operator's
//! heuristic decision): a logged commit is re-driven, a heuristic abort is re-sent, and a 3PC
//! pre-commit without a commit is re-learned from the participants, never presumed aborted.

use treaty_types::{ShardName, TxId};

use super::{Branch, BranchPhase, Phase, Protocol, Timeouts, Transaction};
use crate::events::{AbortReason, Action, Outcome};
use crate::termination::{Ballot, Proposer};

impl Transaction {
    /// Rebuilds a 3PC transaction whose pre-commit record was found in the log without a commit
    /// record. Pre-commits may have been sent, so abort cannot be presumed: the transaction learns
    /// every participant's state under a ballot of this `incarnation` (a number the driver makes
    /// higher at every restart) and applies the termination rules, like a termination leader.
    pub fn recover_pre_committed(
        txid: TxId,
        participants: Vec<ShardName>,
        incarnation: u64,
        timeouts: Timeouts,
        now_ms: u64,
    ) -> (Self, Vec<Action>) {
        let mut txn = Self::begin(txid, Protocol::ThreePhase, timeouts, now_ms);
        txn.begun_at_ms = 0;
        txn.recovered = true;
        txn.phase = Phase::PreCommitting;
        txn.pre_commit_logged = true;
        txn.ballot = Ballot {
            round: 0,
            proposer: Proposer::Coordinator { incarnation },
        };
        txn.branches = participants
            .into_iter()
            .map(|shard| Branch {
                shard,
                phase: BranchPhase::Prepared,
                attempts: 0,
                last_error: None,
            })
            .collect();
        let mut actions = Vec::new();
        txn.start_learning(now_ms, &mut actions);
        (txn, actions)
    }

    /// Rebuilds a transaction whose commit decision was found in the log without an end record,
    /// and returns the commits to send again. Participants that already committed answer from
    /// their marker rows, so resending is safe.
    pub fn recover_commit(
        txid: TxId,
        participants: Vec<ShardName>,
        decided_at_ms: u64,
        timeouts: Timeouts,
        now_ms: u64,
    ) -> (Self, Vec<Action>) {
        let mut txn = Self::decided(
            txid,
            participants,
            decided_at_ms,
            Outcome::Committed,
            timeouts,
            now_ms,
        );
        let mut actions: Vec<Action> = txn
            .branches
            .iter()
            .map(|b| Action::SendCommit {
                shard: b.shard.clone(),
                delay_ms: 0,
            })
            .collect();
        txn.finish_if_applied(now_ms, &mut actions);
        (txn, actions)
    }

    /// Rebuilds a transaction an operator aborted by hand (`treaty resolve --abort`) that the
    /// coordinator was not tracking (or that the log holds a heuristic abort for), and returns the
    /// aborts to send. Safe without a commit record: with presumed abort, abort is the answer anyway.
    pub fn recover_abort(
        txid: TxId,
        participants: Vec<ShardName>,
        decided_at_ms: u64,
        reason: AbortReason,
        timeouts: Timeouts,
        now_ms: u64,
    ) -> (Self, Vec<Action>) {
        let outcome = Outcome::Aborted(reason);
        let mut txn = Self::decided(txid, participants, decided_at_ms, outcome, timeouts, now_ms);
        let mut actions: Vec<Action> = txn
            .branches
            .iter()
            .map(|b| Action::SendAbort {
                shard: b.shard.clone(),
                delay_ms: 0,
            })
            .collect();
        txn.finish_if_aborted(now_ms, &mut actions);
        (txn, actions)
    }

    /// A rebuilt two-phase transaction whose `outcome` is decided, every participant's branch in
    /// phase two (its first message counted as sent).
    fn decided(
        txid: TxId,
        participants: Vec<ShardName>,
        decided_at_ms: u64,
        outcome: Outcome,
        timeouts: Timeouts,
        now_ms: u64,
    ) -> Self {
        let (phase, branch_phase) = match outcome {
            Outcome::Committed => (Phase::Committing, BranchPhase::Committing),
            Outcome::Aborted(_) | Outcome::Unknown(_) => (Phase::Aborting, BranchPhase::Aborting),
        };
        let mut txn = Self::begin(txid, Protocol::TwoPhase, timeouts, now_ms);
        txn.begun_at_ms = 0;
        txn.recovered = true;
        txn.decided_at_ms = Some(decided_at_ms);
        txn.outcome = Some(outcome);
        txn.phase = phase;
        txn.branches = participants
            .into_iter()
            .map(|shard| Branch {
                shard,
                phase: branch_phase,
                attempts: 1,
                last_error: None,
            })
            .collect();
        txn
    }
}
