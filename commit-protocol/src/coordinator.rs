//! One transaction's state as the coordinator sees it, and `step`, the only way it changes; for
//! 2PC (presumed abort) and 3PC (a forced pre-commit record, `PreCommit` to every YES voter, then
//! the commit decision as in 2PC).
//!
//! Architecture invariant: a transaction reaches `Committing` only through `DecisionDurable`
//! (or through `recover_commit`, which starts from a durable decision), so no participant is ever
//! told to commit before the decision is in the log. Every other path out of `Active` or
//! `Preparing` leads to `Aborting`, which is safe to take without logging (presumed abort).
//!
//! 3PC: once a `PreCommit` may have been sent (from `PreCommitDurable` on, and for a transaction
//! recovered from a pre-commit record), the coordinator never decides abort by itself: it only
//! learns the participants' states under a ballot and applies `termination::decide`, the same rule
//! the participants' termination leader applies.

use std::collections::BTreeMap;

pub use treaty_types::Protocol;
use treaty_types::{ShardName, TxId};

use crate::termination::{Ballot, ReportedState};

use crate::events::{AbortCause, AbortReason, Action, Event, Outcome, ProtocolError, Vote};
use crate::retry_delay_ms;

pub use phases::{Branch, BranchPhase, Phase, Timeouts};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ReplyWhen {
    Decided,
    Applied,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Transaction {
    txid: TxId,
    protocol: Protocol,
    phase: Phase,
    branches: Vec<Branch>,
    timeouts: Timeouts,
    begun_at_ms: u64,
    last_activity_ms: u64,
    statements_running: u32,
    vote_deadline_ms: u64,
    decided_at_ms: Option<u64>,
    finished_at_ms: Option<u64>,
    outcome: Option<Outcome>,
    reply: Option<ReplyWhen>,
    recovered: bool,
    /// 3PC: the log holds this transaction's pre-commit record (so finishing needs an end record).
    pre_commit_logged: bool,
    /// 3PC: the ballot of this coordinator's pre-commits and queries.
    ballot: Ballot,
    /// 3PC: the highest ballot a participant refused a query for (a termination leader's).
    highest_refusal: Ballot,
    /// 3PC: the states learned so far under `ballot`, while learning.
    learning: Option<BTreeMap<ShardName, ReportedState>>,
    /// Votes cast with a branch's last statement (one-shot submits), counted when the transaction
    /// prepares instead of a Prepare message to that shard (`one_shot.rs`).
    early_votes: Vec<one_shot::EarlyVote>,
    /// 2PC: the commit decision is a row committed by the first branch instead of a record in the
    /// coordinator's store (`decision_branch.rs`).
    decide_in_branch: bool,
}

impl Transaction {
    pub fn begin(txid: TxId, protocol: Protocol, timeouts: Timeouts, now_ms: u64) -> Self {
        Self {
            txid,
            protocol,
            phase: Phase::Active,
            branches: Vec::new(),
            timeouts,
            begun_at_ms: now_ms,
            last_activity_ms: now_ms,
            statements_running: 0,
            vote_deadline_ms: 0,
            decided_at_ms: None,
            finished_at_ms: None,
            outcome: None,
            reply: None,
            recovered: false,
            pre_commit_logged: false,
            ballot: Ballot::COORDINATOR,
            highest_refusal: Ballot::COORDINATOR,
            learning: None,
            early_votes: Vec::new(),
            decide_in_branch: false,
        }
    }

    pub fn txid(&self) -> TxId {
        self.txid
    }
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }
    pub fn phase(&self) -> Phase {
        self.phase
    }
    pub fn branches(&self) -> &[Branch] {
        &self.branches
    }
    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }
    pub fn begun_at_ms(&self) -> u64 {
        self.begun_at_ms
    }
    pub fn decided_at_ms(&self) -> Option<u64> {
        self.decided_at_ms
    }
    pub fn finished_at_ms(&self) -> Option<u64> {
        self.finished_at_ms
    }
    pub fn recovered(&self) -> bool {
        self.recovered
    }

    /// The earliest time a `Tick` can change anything, if any.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        match self.phase {
            Phase::Active => {
                let whole = self.begun_at_ms.saturating_add(self.timeouts.transaction_ms);
                if self.statements_running > 0 {
                    Some(whole)
                } else {
                    Some(whole.min(self.last_activity_ms.saturating_add(self.timeouts.idle_ms)))
                }
            }
            Phase::Preparing => Some(self.vote_deadline_ms),
            Phase::PreCommitting if self.pre_commit_logged => Some(self.vote_deadline_ms),
            _ => None,
        }
    }

    /// Applies one event. An event that makes no sense in the current phase but is harmless (a
    /// late vote, a duplicate acknowledgement) is ignored; one that a caller must hear about is
    /// refused with a `ProtocolError`.
    pub fn step(&mut self, event: Event, now_ms: u64) -> Result<Vec<Action>, ProtocolError> {
        let mut actions = Vec::new();
        match event {
            Event::Enlist { shard } => self.enlist(shard, now_ms)?,
            Event::ExecuteSucceeded { .. } => self.statement_done(now_ms),
            Event::ExecuteFailed { reason, .. } => {
                self.statement_done(now_ms);
                if self.phase == Phase::Active {
                    self.abort(reason, now_ms, &mut actions);
                }
            }
            Event::AbortRequested { reason } => self.abort_requested(reason, now_ms, &mut actions)?,
            Event::CommitRequested { wait_for_apply } => {
                self.commit_requested(wait_for_apply, None, now_ms, &mut actions)?
            }
            Event::CommitWithLastStatement {
                shard,
                wait_for_apply,
            } => self.commit_requested(wait_for_apply, Some(shard), now_ms, &mut actions)?,
            Event::VoteCastEarly { shard, vote, named } => self.vote_cast_early(shard, vote, named),
            Event::VoteReceived { shard, vote } => self.vote_received(&shard, vote, now_ms, &mut actions),
            Event::DecisionDurable => self.decision_durable(now_ms, &mut actions),
            Event::DecisionRefused { reason } => self.decision_refused(reason, true, now_ms, &mut actions),
            Event::DecisionUnknown { error } => self.decision_unknown(error, &mut actions),
            Event::DecisionLearned { commit: true } => self.decision_durable(now_ms, &mut actions),
            Event::DecisionLearned { commit: false } => self.decision_refused(
                AbortReason::new(
                    AbortCause::ConcludedAbort,
                    "the transaction was concluded aborted before its decision branch committed",
                ),
                false,
                now_ms,
                &mut actions,
            ),
            Event::Acknowledged { shard } => self.acknowledged(&shard, now_ms, &mut actions),
            Event::PhaseTwoFailed { shard, error } => self.phase_two_failed(&shard, error, &mut actions),
            Event::OnePhaseCommitted => self.one_phase_finished(Outcome::Committed, now_ms, &mut actions),
            Event::OnePhaseFailed { reason } => {
                self.one_phase_finished(Outcome::Aborted(reason), now_ms, &mut actions)
            }
            Event::OnePhaseUnknown { error } => {
                self.one_phase_finished(Outcome::Unknown(error), now_ms, &mut actions)
            }
            Event::Tick => self.tick(now_ms, &mut actions),
            Event::HeuristicAbort { reason } => self.heuristic_abort(reason, now_ms, &mut actions)?,
            Event::PreCommitDurable => self.pre_commit_durable(now_ms, &mut actions),
            Event::PreCommitAcknowledged { shard, ballot } => {
                self.pre_commit_acknowledged(&shard, &ballot, &mut actions)
            }
            Event::ParticipantStatesLearned { ballot, reports } => {
                self.states_learned(&ballot, reports, now_ms, &mut actions)
            }
        }
        Ok(actions)
    }

    /// The error for a request the current phase cannot take.
    fn refusal(&self) -> ProtocolError {
        let txid = self.txid;
        match &self.outcome {
            Some(Outcome::Aborted(reason)) => ProtocolError::AlreadyAborted {
                txid,
                reason: reason.clone(),
            },
            Some(Outcome::Committed) if !self.phase.is_undecided() => {
                ProtocolError::AlreadyCommitted { txid }
            }
            Some(Outcome::Unknown(error)) => ProtocolError::OutcomeUnknown {
                txid,
                error: error.clone(),
            },
            _ => ProtocolError::NotActive {
                txid,
                phase: self.phase.name(),
            },
        }
    }

    fn enlist(&mut self, shard: ShardName, now_ms: u64) -> Result<(), ProtocolError> {
        if self.phase != Phase::Active {
            return Err(self.refusal());
        }
        // Its participant prepared the branch with that statement: another would find no open
        // branch there and abort the whole transaction, so it is refused before it is sent.
        if self.voted_early(&shard) {
            return Err(ProtocolError::AlreadyVoted {
                txid: self.txid,
                shard,
            });
        }
        if !self.branches.iter().any(|b| b.shard == shard) {
            self.branches.push(Branch {
                shard,
                phase: BranchPhase::Active,
                attempts: 0,
                last_error: None,
            });
        }
        self.statements_running += 1;
        self.last_activity_ms = now_ms;
        Ok(())
    }

    fn statement_done(&mut self, now_ms: u64) {
        self.statements_running = self.statements_running.saturating_sub(1);
        self.last_activity_ms = now_ms;
    }

    fn abort_requested(
        &mut self,
        reason: AbortReason,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) -> Result<(), ProtocolError> {
        match (&self.phase, &self.outcome) {
            (Phase::Active, _) => {
                self.reply = Some(ReplyWhen::Decided);
                self.abort(reason, now_ms, actions);
                Ok(())
            }
            // A repeated rollback gets the same answer.
            (Phase::Aborting | Phase::Aborted, Some(Outcome::Aborted(first))) => {
                actions.push(Action::Reply(Outcome::Aborted(first.clone())));
                Ok(())
            }
            _ => Err(self.refusal()),
        }
    }

    /// Until every vote is in and the commit is being logged, abort is as safe as a vote timeout:
    /// no participant can have been told to commit. From `LoggingCommit` on it would race the
    /// commit record, so it is refused.
    fn heuristic_abort(
        &mut self,
        reason: AbortReason,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) -> Result<(), ProtocolError> {
        match self.phase {
            Phase::Active | Phase::Preparing => {
                self.abort(reason, now_ms, actions);
                Ok(())
            }
            _ => Err(self.refusal()),
        }
    }

    /// The client commits. `last_statement`: a one-shot submit's last statement waits to be sent
    /// with the COMMIT (`ExecuteAndCommit`); only a transaction whose one branch is on that shard
    /// may commit that way, so the statement runs only once the transaction is committing.
    fn commit_requested(
        &mut self,
        wait_for_apply: bool,
        last_statement: Option<ShardName>,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) -> Result<(), ProtocolError> {
        match self.phase {
            Phase::Active => {}
            // A replayed commit succeeds.
            Phase::Committing | Phase::Committed if last_statement.is_none() => {
                actions.push(Action::Reply(Outcome::Committed));
                return Ok(());
            }
            _ => return Err(self.refusal()),
        }
        if let Some(shard) = &last_statement
            && (self.branches.len() != 1 || &self.branches[0].shard != shard || !self.early_votes.is_empty())
        {
            return Err(ProtocolError::LastStatementNeedsOneBranch {
                txid: self.txid,
                shard: shard.clone(),
                branches: self.branches.iter().map(|b| b.shard.clone()).collect(),
            });
        }
        self.reply = Some(if wait_for_apply {
            ReplyWhen::Applied
        } else {
            ReplyWhen::Decided
        });
        // A branch that already voted (it is prepared) cannot commit in one phase.
        match (self.branches.len(), self.early_votes.is_empty()) {
            (0, _) => {
                self.decided_at_ms = Some(now_ms);
                self.finish(Phase::Committed, Outcome::Committed, now_ms, actions);
            }
            (1, true) => {
                self.phase = Phase::CommittingOnePhase;
                self.branches[0].phase = BranchPhase::Committing;
                self.branches[0].attempts = 1;
                let shard = self.branches[0].shard.clone();
                actions.push(match last_statement {
                    Some(_) => Action::ExecuteAndCommitOnePhase { shard },
                    None => Action::CommitOnePhase { shard },
                });
            }
            _ => self.prepare(now_ms, actions),
        }
        Ok(())
    }

    /// Asks every branch for its vote; votes cast early are counted instead of a Prepare message.
    fn prepare(&mut self, now_ms: u64, actions: &mut Vec<Action>) {
        self.phase = Phase::Preparing;
        self.vote_deadline_ms = now_ms.saturating_add(self.timeouts.vote_ms);
        for branch in &mut self.branches {
            branch.phase = BranchPhase::Preparing;
        }
        let cast = self.take_early_votes();
        let decision_shard = self.keep_decision_branch_open(&cast);
        let to_ask: Vec<ShardName> = self
            .branches
            .iter()
            .map(|b| b.shard.clone())
            .filter(|shard| !cast.iter().any(|(voted, _)| voted == shard))
            .filter(|shard| Some(shard) != decision_shard.as_ref())
            .collect();
        if !to_ask.is_empty() {
            actions.push(Action::SendPrepare { shards: to_ask });
        }
        for (shard, vote) in cast {
            self.vote_received(&shard, vote, now_ms, actions);
        }
    }

    fn vote_received(&mut self, shard: &ShardName, vote: Vote, now_ms: u64, actions: &mut Vec<Action>) {
        if self.phase != Phase::Preparing {
            return; // late: the transaction already decided, and sent abort to every undecided branch
        }
        let Some(branch) = self.branches.iter_mut().find(|b| &b.shard == shard) else {
            return;
        };
        if branch.phase != BranchPhase::Preparing {
            return; // duplicate
        }
        match vote {
            Vote::Yes => branch.phase = BranchPhase::Prepared,
            Vote::ReadOnly => branch.phase = BranchPhase::ReadOnly,
            Vote::No(reason) => {
                branch.phase = BranchPhase::VotedNo;
                self.abort(reason, now_ms, actions);
                return;
            }
        }
        if self.branches.iter().any(|b| b.phase == BranchPhase::Preparing) {
            return;
        }
        let prepared: Vec<ShardName> = self
            .branches
            .iter()
            .filter(|b| b.phase == BranchPhase::Prepared)
            .map(|b| b.shard.clone())
            .collect();
        if self.decide_in_branch(prepared.clone(), actions) {
            // The decision branch commits the decision (or alone, in one phase).
        } else if prepared.is_empty() {
            // Every branch was read-only and has finished: nothing to decide or log.
            self.decided_at_ms = Some(now_ms);
            self.finish(Phase::Committed, Outcome::Committed, now_ms, actions);
        } else if self.protocol == Protocol::ThreePhase {
            // Force the pre-commit record before any pre-commit leaves: from then on a restart
            // must learn the outcome instead of presuming abort.
            self.phase = Phase::PreCommitting;
            actions.push(Action::PersistPreCommit {
                participants: prepared,
            });
        } else {
            self.phase = Phase::LoggingCommit;
            actions.push(Action::PersistCommit {
                participants: prepared,
            });
        }
    }

    /// The 3PC participants: every YES voter.
    fn yes_voters(&self) -> Vec<ShardName> {
        self.branches
            .iter()
            .filter(|b| {
                matches!(
                    b.phase,
                    BranchPhase::Prepared | BranchPhase::PreCommitting | BranchPhase::PreCommitted
                )
            })
            .map(|b| b.shard.clone())
            .collect()
    }

    fn decision_durable(&mut self, now_ms: u64, actions: &mut Vec<Action>) {
        if self.phase != Phase::LoggingCommit {
            return;
        }
        self.decision_branch_committed();
        self.phase = Phase::Committing;
        self.decided_at_ms = Some(now_ms);
        self.outcome = Some(Outcome::Committed);
        for branch in self
            .branches
            .iter_mut()
            .filter(|b| matches!(b.phase, BranchPhase::Prepared | BranchPhase::PreCommitted))
        {
            branch.phase = BranchPhase::Committing;
            branch.attempts = 1;
            actions.push(Action::SendCommit {
                shard: branch.shard.clone(),
                delay_ms: 0,
            });
        }
        if self.reply == Some(ReplyWhen::Decided) {
            self.reply = None;
            actions.push(Action::Reply(Outcome::Committed));
        }
        // Every prepared branch may have been read-only but the decision branch's.
        self.finish_if_applied(now_ms, actions);
    }

    fn acknowledged(&mut self, shard: &ShardName, now_ms: u64, actions: &mut Vec<Action>) {
        let (from, to) = match self.phase {
            Phase::Committing => (BranchPhase::Committing, BranchPhase::Committed),
            Phase::Aborting => (BranchPhase::Aborting, BranchPhase::Aborted),
            _ => return,
        };
        if let Some(branch) = self
            .branches
            .iter_mut()
            .find(|b| &b.shard == shard && b.phase == from)
        {
            branch.phase = to;
            branch.last_error = None;
        }
        match self.phase {
            Phase::Committing => self.finish_if_applied(now_ms, actions),
            _ => self.finish_if_aborted(now_ms, actions),
        }
    }

    fn phase_two_failed(&mut self, shard: &ShardName, error: String, actions: &mut Vec<Action>) {
        let pending = match self.phase {
            Phase::Committing => BranchPhase::Committing,
            Phase::Aborting => BranchPhase::Aborting,
            Phase::PreCommitting => BranchPhase::PreCommitting,
            _ => return,
        };
        let Some(branch) = self
            .branches
            .iter_mut()
            .find(|b| &b.shard == shard && b.phase == pending)
        else {
            return;
        };
        let delay_ms = retry_delay_ms(branch.attempts);
        branch.attempts += 1;
        branch.last_error = Some(error);
        let shard = branch.shard.clone();
        actions.push(match pending {
            BranchPhase::Committing => Action::SendCommit { shard, delay_ms },
            BranchPhase::PreCommitting => Action::SendPreCommit {
                shard,
                ballot: self.ballot.clone(),
                delay_ms,
            },
            _ => Action::SendAbort { shard, delay_ms },
        });
    }

    fn one_phase_finished(&mut self, outcome: Outcome, now_ms: u64, actions: &mut Vec<Action>) {
        if self.phase != Phase::CommittingOnePhase {
            return;
        }
        let (phase, branch_phase) = match outcome {
            Outcome::Committed => (Phase::Committed, BranchPhase::Committed),
            Outcome::Aborted(_) => (Phase::Aborted, BranchPhase::Aborted),
            Outcome::Unknown(_) => (Phase::OutcomeUnknown, BranchPhase::Committing),
        };
        self.branches[0].phase = branch_phase;
        self.decided_at_ms = Some(now_ms);
        self.finish(phase, outcome, now_ms, actions);
    }

    fn tick(&mut self, now_ms: u64, actions: &mut Vec<Action>) {
        let Some(deadline) = self.next_deadline_ms() else {
            return;
        };
        if now_ms < deadline {
            return;
        }
        if self.phase == Phase::PreCommitting {
            // Never abort here: a pre-commit may be out. Learn what the participants hold.
            self.start_learning(now_ms, actions);
            return;
        }
        let message = match self.phase {
            Phase::Active if now_ms >= self.begun_at_ms.saturating_add(self.timeouts.transaction_ms) => {
                format!(
                    "transaction ran longer than its {} ms limit",
                    self.timeouts.transaction_ms
                )
            }
            Phase::Active => format!("no client call for {} ms (idle timeout)", self.timeouts.idle_ms),
            Phase::Preparing => {
                let missing: Vec<&str> = self
                    .branches
                    .iter()
                    .filter(|b| b.phase == BranchPhase::Preparing)
                    .map(|b| b.shard.as_str())
                    .collect();
                format!(
                    "no vote within {} ms from {}",
                    self.timeouts.vote_ms,
                    missing.join(", ")
                )
            }
            _ => return,
        };
        let mut reason = AbortReason::new(AbortCause::Timeout, message);
        if self.phase == Phase::Preparing {
            reason.shard = self
                .branches
                .iter()
                .find(|b| b.phase == BranchPhase::Preparing)
                .map(|b| b.shard.clone());
        }
        self.abort(reason, now_ms, actions);
    }

    /// Decides abort from `Active` or `Preparing`: every branch that may hold work is told to roll
    /// back. Nothing is logged (presumed abort).
    fn abort(&mut self, reason: AbortReason, now_ms: u64, actions: &mut Vec<Action>) {
        debug_assert!(
            matches!(self.phase, Phase::Active | Phase::Preparing)
                || (self.decide_in_branch && self.phase == Phase::LoggingCommit),
            "abort from {:?}",
            self.phase
        );
        self.phase = Phase::Aborting;
        self.decided_at_ms = Some(now_ms);
        self.outcome = Some(Outcome::Aborted(reason.clone()));
        for branch in &mut self.branches {
            match branch.phase {
                BranchPhase::Active | BranchPhase::Preparing | BranchPhase::Prepared => {
                    branch.phase = BranchPhase::Aborting;
                    branch.attempts = 1;
                    actions.push(Action::SendAbort {
                        shard: branch.shard.clone(),
                        delay_ms: 0,
                    });
                }
                BranchPhase::VotedNo => branch.phase = BranchPhase::Aborted,
                _ => {}
            }
        }
        if self.reply.take().is_some() {
            actions.push(Action::Reply(Outcome::Aborted(reason)));
        }
        self.finish_if_aborted(now_ms, actions);
    }

    fn finish_if_applied(&mut self, now_ms: u64, actions: &mut Vec<Action>) {
        if self.branches.iter().any(|b| b.phase == BranchPhase::Committing) {
            return;
        }
        actions.push(Action::PersistEnd);
        self.finish(Phase::Committed, Outcome::Committed, now_ms, actions);
    }

    fn finish_if_aborted(&mut self, now_ms: u64, actions: &mut Vec<Action>) {
        if self.branches.iter().any(|b| b.phase == BranchPhase::Aborting) {
            return;
        }
        if let Some(outcome) = self.outcome.clone() {
            if self.pre_commit_logged {
                // The pre-commit record must go: the log would otherwise re-learn this one.
                actions.push(Action::PersistEnd);
            }
            self.finish(Phase::Aborted, outcome, now_ms, actions);
        }
    }

    fn finish(&mut self, phase: Phase, outcome: Outcome, now_ms: u64, actions: &mut Vec<Action>) {
        self.phase = phase;
        self.finished_at_ms = Some(now_ms);
        if self.reply.take().is_some() {
            actions.push(Action::Reply(outcome.clone()));
        }
        self.outcome = Some(outcome);
        actions.push(Action::Finished);
    }
}

mod decision_branch;
mod one_shot;
mod phases;
mod recovery;
mod three_phase;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod three_phase_tests;

#[cfg(test)]
mod decision_branch_tests;
