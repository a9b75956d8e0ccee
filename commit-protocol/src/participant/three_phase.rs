//! The three-phase rules of one participant's machine: the durable pre-commit, the promises a
//! termination query extracts (ballots), and the termination leader's rounds, which decide only
//! with the state of every participant ([`termination::decide`]). The parent module dispatches the
//! events; everything here touches only the machine's own fields.

use std::collections::{BTreeMap, BTreeSet};

use treaty_types::ShardName;

use super::{Participant, ParticipantAction, ParticipantPhase, Report};
use crate::termination::{self, Ballot, Proposer, ReportedState, TerminationOutcome};

/// The leader's current termination round.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Round {
    ballot: Ballot,
    states: BTreeMap<ShardName, ReportedState>,
    outcome: Option<TerminationOutcome>,
    /// Pre-commits of this round still to be acknowledged.
    awaiting_acks: BTreeSet<ShardName>,
}

impl Participant {
    pub(super) fn pre_commit_requested(
        &mut self,
        from: Proposer,
        ballot: Ballot,
        now_ms: u64,
        actions: &mut Vec<ParticipantAction>,
    ) {
        if ballot < self.promised {
            return; // promised a higher proposer not to take this one
        }
        match self.phase {
            ParticipantPhase::Prepared => {
                self.promised = ballot.clone();
                self.phase = ParticipantPhase::PreCommitting;
                self.pending_pre_commit = Some((from, ballot.clone()));
                actions.push(ParticipantAction::PersistPreCommitState { ballot });
            }
            // Already durable (or beyond): acknowledge again under the newer ballot.
            ParticipantPhase::PreCommitted | ParticipantPhase::Committed => {
                self.promised = ballot.clone();
                self.deadline_ms = Some(now_ms.saturating_add(self.timeout_ms));
                actions.push(ParticipantAction::AcknowledgePreCommit { to: from, ballot });
            }
            // Not prepared (or a 2PC-only phase, which no pre-commit is sent to): nothing to take.
            ParticipantPhase::Working
            | ParticipantPhase::PreCommitting
            | ParticipantPhase::Aborted
            | ParticipantPhase::CommittingReadOnly
            | ParticipantPhase::CommittingOnePhase
            | ParticipantPhase::ReadOnly
            | ParticipantPhase::OutcomeUnknown => {}
        }
    }

    pub(super) fn pre_commit_durable(&mut self, now_ms: u64, actions: &mut Vec<ParticipantAction>) {
        if self.phase != ParticipantPhase::PreCommitting {
            return;
        }
        self.phase = ParticipantPhase::PreCommitted;
        self.deadline_ms = Some(now_ms.saturating_add(self.timeout_ms));
        if let Some((to, ballot)) = self.pending_pre_commit.take() {
            actions.push(ParticipantAction::AcknowledgePreCommit { to, ballot });
        }
        for (from, ballot) in std::mem::take(&mut self.deferred_queries) {
            self.state_queried(from, ballot, actions);
        }
    }

    pub(super) fn state_queried(
        &mut self,
        from: Proposer,
        ballot: Ballot,
        actions: &mut Vec<ParticipantAction>,
    ) {
        if self.phase == ParticipantPhase::PreCommitting {
            self.deferred_queries.push((from, ballot));
            return;
        }
        if ballot < self.promised {
            actions.push(ParticipantAction::ReportState {
                to: from,
                ballot,
                report: Report::Refused {
                    promised: self.promised.clone(),
                },
            });
            return;
        }
        self.promised = ballot.clone();
        if ballot > self.highest_seen {
            self.highest_seen = ballot.clone();
        }
        // Not voted yet: abort unilaterally (allowed before a YES vote), so the answer is final.
        if self.phase == ParticipantPhase::Working {
            self.decide(ParticipantPhase::Aborted, actions);
        }
        actions.push(ParticipantAction::ReportState {
            to: from,
            ballot,
            report: Report::State(self.reported_state()),
        });
    }

    pub(super) fn state_reported(
        &mut self,
        shard: ShardName,
        ballot: Ballot,
        report: Report,
        actions: &mut Vec<ParticipantAction>,
    ) {
        let Some(round) = self.round.as_mut() else {
            return;
        };
        if round.ballot != ballot || round.outcome.is_some() {
            return;
        }
        match report {
            Report::Refused { promised } => {
                // Outbid: the next round (on the next timeout) goes above it.
                if promised > self.highest_seen {
                    self.highest_seen = promised;
                }
                return;
            }
            Report::State(state) => {
                round.states.insert(shard, state);
            }
        }
        // The guard: decide only with the state of every participant.
        if !self.participants.iter().all(|p| round.states.contains_key(p)) {
            return;
        }
        let states: Vec<ReportedState> = round.states.values().copied().collect();
        let Some(outcome) = termination::decide(&states, self.rules) else {
            return;
        };
        round.outcome = Some(outcome);
        match outcome {
            TerminationOutcome::Commit => self.send_to_all(true, actions),
            TerminationOutcome::Abort => self.send_to_all(false, actions),
            TerminationOutcome::PreCommitThenCommit => {
                let to_pre_commit: BTreeSet<ShardName> = round
                    .states
                    .iter()
                    .filter(|(_, state)| **state == ReportedState::Prepared)
                    .map(|(shard, _)| shard.clone())
                    .collect();
                for shard in &to_pre_commit {
                    actions.push(ParticipantAction::SendPreCommit {
                        shard: shard.clone(),
                        ballot: round.ballot.clone(),
                    });
                }
                let done = to_pre_commit.is_empty();
                round.awaiting_acks = to_pre_commit;
                if done {
                    self.send_to_all(true, actions);
                }
            }
        }
    }

    pub(super) fn pre_commit_acknowledged(
        &mut self,
        shard: &ShardName,
        ballot: &Ballot,
        actions: &mut Vec<ParticipantAction>,
    ) {
        let Some(round) = self.round.as_mut() else {
            return;
        };
        if &round.ballot != ballot
            || round.outcome != Some(TerminationOutcome::PreCommitThenCommit)
            || !round.awaiting_acks.remove(shard)
        {
            return;
        }
        if round.awaiting_acks.is_empty() {
            self.send_to_all(true, actions);
        }
    }

    pub(super) fn send_to_all(&self, commit: bool, actions: &mut Vec<ParticipantAction>) {
        for shard in &self.participants {
            let shard = shard.clone();
            actions.push(if commit {
                ParticipantAction::SendCommit { shard }
            } else {
                ParticipantAction::SendAbort { shard }
            });
        }
    }

    pub(super) fn start_round(&mut self, actions: &mut Vec<ParticipantAction>) {
        let ballot = self
            .highest_seen
            .clone()
            .max(self.promised.clone())
            .next_for(Proposer::Participant(self.shard.clone()));
        self.highest_seen = ballot.clone();
        self.round = Some(Round {
            ballot: ballot.clone(),
            states: BTreeMap::new(),
            outcome: None,
            awaiting_acks: BTreeSet::new(),
        });
        actions.push(ParticipantAction::QueryStates {
            ballot,
            shards: self.participants.clone(),
        });
    }
}
