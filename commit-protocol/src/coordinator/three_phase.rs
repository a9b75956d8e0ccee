//! Three-phase commit in the coordinator's machine: the pre-commit round after the votes, learning
//! the participants' states after a silence or a restart (`recover_pre_committed`), and applying the
//! termination rules. From the pre-commit record on, the coordinator never decides abort by itself:
//! only `termination::decide`, with every participant's state, may.

use std::collections::BTreeMap;

use treaty_types::ShardName;

use super::{BranchPhase, Phase, Transaction};
use crate::events::{AbortCause, AbortReason, Action, Outcome};
use crate::participant::Report;
use crate::termination::{self, Ballot, ReportedState, Rules, TerminationOutcome};

impl Transaction {
    pub(super) fn pre_commit_durable(&mut self, now_ms: u64, actions: &mut Vec<Action>) {
        if self.phase != Phase::PreCommitting || self.pre_commit_logged {
            return;
        }
        self.pre_commit_logged = true;
        self.vote_deadline_ms = now_ms.saturating_add(self.timeouts.vote_ms);
        let ballot = self.ballot.clone();
        for branch in self
            .branches
            .iter_mut()
            .filter(|b| b.phase == BranchPhase::Prepared)
        {
            branch.phase = BranchPhase::PreCommitting;
            branch.attempts = 1;
            actions.push(Action::SendPreCommit {
                shard: branch.shard.clone(),
                ballot: ballot.clone(),
                delay_ms: 0,
            });
        }
    }

    pub(super) fn pre_commit_acknowledged(
        &mut self,
        shard: &ShardName,
        ballot: &Ballot,
        actions: &mut Vec<Action>,
    ) {
        if self.phase != Phase::PreCommitting || ballot != &self.ballot || self.learning.is_some() {
            return;
        }
        if let Some(branch) = self
            .branches
            .iter_mut()
            .find(|b| &b.shard == shard && b.phase == BranchPhase::PreCommitting)
        {
            branch.phase = BranchPhase::PreCommitted;
            branch.last_error = None;
        }
        self.log_commit_if_pre_committed(actions);
    }

    /// Once every YES voter is pre-committed, the commit decision is forced as in 2PC.
    pub(super) fn log_commit_if_pre_committed(&mut self, actions: &mut Vec<Action>) {
        if self
            .branches
            .iter()
            .any(|b| matches!(b.phase, BranchPhase::PreCommitting | BranchPhase::Prepared))
        {
            return;
        }
        self.phase = Phase::LoggingCommit;
        actions.push(Action::PersistCommit {
            participants: self.yes_voters(),
        });
    }

    /// 3PC, pre-commits out and silence (or a restart): ask every YES voter for its state under a
    /// ballot above any seen, which also stops lower pre-commits still in flight.
    pub(super) fn start_learning(&mut self, now_ms: u64, actions: &mut Vec<Action>) {
        let proposer = self.ballot.proposer.clone();
        self.ballot = self
            .ballot
            .clone()
            .max(self.highest_refusal.clone())
            .next_for(proposer);
        self.vote_deadline_ms = now_ms.saturating_add(self.timeouts.vote_ms);
        for branch in &mut self.branches {
            if branch.phase == BranchPhase::PreCommitting || branch.phase == BranchPhase::PreCommitted {
                branch.phase = BranchPhase::Prepared;
            }
        }
        self.learning = Some(BTreeMap::new());
        actions.push(Action::QueryParticipantStates {
            shards: self.yes_voters(),
            ballot: self.ballot.clone(),
        });
    }

    pub(super) fn states_learned(
        &mut self,
        ballot: &Ballot,
        reports: Vec<(ShardName, Report)>,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) {
        if self.phase != Phase::PreCommitting || ballot != &self.ballot {
            return;
        }
        let voters = self.yes_voters();
        let Some(states) = self.learning.as_mut() else {
            return;
        };
        for (shard, report) in reports {
            match report {
                Report::State(state) => {
                    states.insert(shard, state);
                }
                Report::Refused { promised } => {
                    if promised > self.highest_refusal {
                        self.highest_refusal = promised;
                    }
                }
            }
        }
        // The guard: decide only with the state of every participant; else ask again on the tick.
        if !voters.iter().all(|shard| states.contains_key(shard)) {
            return;
        }
        let learned: Vec<ReportedState> = states.values().copied().collect();
        let Some(outcome) = termination::decide(&learned, Rules::Classical) else {
            return;
        };
        let states = std::mem::take(states);
        self.learning = None;
        self.vote_deadline_ms = now_ms.saturating_add(self.timeouts.vote_ms);
        match outcome {
            TerminationOutcome::Abort => {
                let reason = AbortReason::new(
                    AbortCause::Timeout,
                    "three-phase termination: no participant had pre-committed",
                );
                self.abort_after_termination(reason, now_ms, actions);
            }
            TerminationOutcome::Commit | TerminationOutcome::PreCommitThenCommit => {
                let ballot = self.ballot.clone();
                for branch in &mut self.branches {
                    let Some(state) = states.get(&branch.shard) else {
                        continue;
                    };
                    // With someone committed the decision is made: commit the rest directly.
                    if *state == ReportedState::Prepared && outcome == TerminationOutcome::PreCommitThenCommit
                    {
                        branch.phase = BranchPhase::PreCommitting;
                        branch.attempts = 1;
                        actions.push(Action::SendPreCommit {
                            shard: branch.shard.clone(),
                            ballot: ballot.clone(),
                            delay_ms: 0,
                        });
                    } else {
                        branch.phase = BranchPhase::PreCommitted;
                    }
                }
                self.log_commit_if_pre_committed(actions);
            }
        }
    }

    /// Abort decided by the termination rules: only from states where no participant was
    /// pre-committed or one had aborted.
    pub(super) fn abort_after_termination(
        &mut self,
        reason: AbortReason,
        now_ms: u64,
        actions: &mut Vec<Action>,
    ) {
        self.phase = Phase::Aborting;
        self.decided_at_ms = Some(now_ms);
        self.outcome = Some(Outcome::Aborted(reason.clone()));
        for branch in &mut self.branches {
            if matches!(
                branch.phase,
                BranchPhase::Prepared | BranchPhase::PreCommitting | BranchPhase::PreCommitted
            ) {
                branch.phase = BranchPhase::Aborting;
                branch.attempts = 1;
                actions.push(Action::SendAbort {
                    shard: branch.shard.clone(),
                    delay_ms: 0,
                });
            }
        }
        if self.reply.take().is_some() {
            actions.push(Action::Reply(Outcome::Aborted(reason)));
        }
        self.finish_if_aborted(now_ms, actions);
    }
}
