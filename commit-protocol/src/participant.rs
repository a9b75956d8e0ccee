//! One participant's branch of one transaction as a pure state machine, for 2PC and 3PC: the vote,
//! the durable pre-commit, the decision, the participant's timeout, and (3PC only) the cooperative
//! termination protocol it runs when the coordinator falls silent. Like the coordinator's machine it
//! does no I/O: [`ParticipantEvent`]s in, [`ParticipantAction`]s out, time passed in as `now_ms`.
//!
//! Guarantee: 3PC finishes without the coordinator when the coordinator is down but every
//! participant of the transaction is up and reachable; with a participant also down or
//! partitioned away, it waits like 2PC; it never decides both ways, under any partition.
//! (The rules and why they are safe: [`crate::termination`].)
//!
//! Termination: on a timeout while prepared or pre-committed, the lowest-named participant of the
//! transaction leads (any other asks it to, [`ParticipantAction::RequestTermination`]). Leadership is
//! fixed by name rather than by liveness because the guard needs every participant's answer
//! anyway: with the lowest-named one down, nobody could finish, so nobody needs to lead. The leader
//! asks every participant (itself included) for its state under a fresh ballot, applies
//! [`termination::decide`] once it holds all of them, and then pre-commits the rest under that ballot
//! before committing, or aborts.
//!
//! In 2PC a participant never finishes a prepared branch on its own: on a timeout it asks the
//! coordinator ([`ParticipantAction::AskCoordinator`]).
//!
//! A participant restart is not modelled: the service keeps the participants, the pre-commit and the
//! promised ballot durable before it votes or answers, and rebuilds the machine with
//! [`Participant::recover`], so a restart cannot forget a promise.

use std::collections::{BTreeMap, BTreeSet};

use treaty_types::ShardName;

use crate::coordinator::Protocol;
use crate::termination::{self, Ballot, Proposer, ReportedState, Rules, TerminationOutcome};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ParticipantPhase {
    /// Running statements; has not voted.
    Working,
    /// `PREPARE TRANSACTION` done, voted YES.
    Prepared,
    /// A pre-commit is being made durable; the acknowledgement waits for it.
    PreCommitting,
    /// Durably pre-committed (3PC): the transaction will commit.
    PreCommitted,
    Committed,
    Aborted,
}

impl ParticipantPhase {
    pub fn is_decided(self) -> bool {
        matches!(self, ParticipantPhase::Committed | ParticipantPhase::Aborted)
    }
}

/// A participant's answer to a termination query.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Report {
    State(ReportedState),
    /// The query's ballot is below one this participant already promised.
    Refused {
        promised: Ballot,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParticipantEvent {
    /// The coordinator asks for a vote; `participants` names every participant of the transaction
    /// (termination needs them).
    PrepareRequested {
        participants: Vec<ShardName>,
    },
    /// The driver's `PREPARE TRANSACTION` succeeded.
    BranchPrepared,
    /// The driver's `PREPARE TRANSACTION` failed (or the branch could not be prepared).
    BranchPrepareFailed,
    /// Pre-commit under `ballot`, from the coordinator (ballot [`Ballot::COORDINATOR`]) or a
    /// termination proposer.
    PreCommitRequested {
        from: Proposer,
        ballot: Ballot,
    },
    /// The pre-commit asked for by `PersistPreCommitState` is durable.
    PreCommitDurable,
    CommitRequested {
        from: Proposer,
    },
    AbortRequested {
        from: Proposer,
    },
    /// A termination proposer asks for this branch's state under `ballot`.
    StateQueried {
        from: Proposer,
        ballot: Ballot,
    },
    /// (Leader) an answer to this participant's own termination query.
    StateReported {
        shard: ShardName,
        ballot: Ballot,
        report: Report,
    },
    /// (Leader) a participant acknowledged the leader's pre-commit.
    PreCommitAcknowledged {
        shard: ShardName,
        ballot: Ballot,
    },
    /// Another participant timed out and asks this one, the leader, to run termination.
    TerminationRequested {
        participants: Vec<ShardName>,
    },
    /// Time passed: checks the participant's timeout.
    Tick,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ParticipantAction {
    /// Run `PREPARE TRANSACTION`; answered by `BranchPrepared` or `BranchPrepareFailed`.
    PrepareBranch,
    /// Answer the coordinator's prepare.
    SendVote {
        yes: bool,
    },
    /// Durably record "pre-committed under this ballot" in the participant's own table before
    /// acknowledging; answered by `PreCommitDurable`.
    PersistPreCommitState {
        ballot: Ballot,
    },
    AcknowledgePreCommit {
        to: Proposer,
        ballot: Ballot,
    },
    /// `COMMIT PREPARED`.
    ApplyCommit,
    /// `ROLLBACK PREPARED`, or a plain rollback of a branch that never voted.
    ApplyAbort,
    /// Tell the coordinator its commit or abort was applied.
    AcknowledgeDecision,
    ReportState {
        to: Proposer,
        ballot: Ballot,
        report: Report,
    },
    /// 2PC: ask the coordinator for the decision.
    AskCoordinator,
    /// 3PC, not the leader: ask the leader to run termination.
    RequestTermination {
        leader: ShardName,
        participants: Vec<ShardName>,
    },
    /// (Leader) ask every participant for its state under `ballot`.
    QueryStates {
        ballot: Ballot,
        shards: Vec<ShardName>,
    },
    /// (Leader) pre-commit `shard` under `ballot`.
    SendPreCommit {
        shard: ShardName,
        ballot: Ballot,
    },
    /// (Leader) the decision, to every participant.
    SendCommit {
        shard: ShardName,
    },
    SendAbort {
        shard: ShardName,
    },
}

/// The leader's current termination round.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Round {
    ballot: Ballot,
    states: BTreeMap<ShardName, ReportedState>,
    outcome: Option<TerminationOutcome>,
    /// Pre-commits of this round still to be acknowledged.
    awaiting_acks: BTreeSet<ShardName>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Participant {
    shard: ShardName,
    protocol: Protocol,
    rules: Rules,
    /// Every participant of the transaction (empty until the prepare or a termination request
    /// names them).
    participants: Vec<ShardName>,
    phase: ParticipantPhase,
    /// The highest ballot this participant answered a query under: lower pre-commits are ignored.
    promised: Ballot,
    /// The highest ballot seen anywhere (own rounds, refusals), so that a new round goes above it.
    highest_seen: Ballot,
    /// Who to acknowledge once the pending pre-commit is durable.
    pending_pre_commit: Option<(Proposer, Ballot)>,
    /// Queries that arrived while a pre-commit was being made durable: answered once it is, so that
    /// an answer never describes a state that is about to change under a lower ballot.
    deferred_queries: Vec<(Proposer, Ballot)>,
    timeout_ms: u64,
    deadline_ms: Option<u64>,
    round: Option<Round>,
}

impl Participant {
    /// A branch that just started working at `now_ms`; without a prepare within `timeout_ms` it is
    /// rolled back (the idle-branch cleanup), which is allowed because it has not voted.
    pub fn new(shard: ShardName, protocol: Protocol, rules: Rules, timeout_ms: u64, now_ms: u64) -> Self {
        Self {
            shard,
            protocol,
            rules,
            participants: Vec::new(),
            phase: ParticipantPhase::Working,
            promised: Ballot::COORDINATOR,
            highest_seen: Ballot::COORDINATOR,
            pending_pre_commit: None,
            deferred_queries: Vec::new(),
            timeout_ms,
            deadline_ms: Some(now_ms.saturating_add(timeout_ms)),
            round: None,
        }
    }

    /// A 3PC branch rebuilt after a participant restart from what it recorded durably before
    /// voting and before answering: the participants, whether it pre-committed, and the highest
    /// ballot it promised. It times out at once (`now_ms`), so termination runs without waiting for
    /// a coordinator that may be gone.
    pub fn recover(
        shard: ShardName,
        participants: Vec<ShardName>,
        pre_committed: bool,
        promised: Ballot,
        rules: Rules,
        timeout_ms: u64,
        now_ms: u64,
    ) -> Self {
        Self {
            shard,
            protocol: Protocol::ThreePhase,
            rules,
            participants,
            phase: if pre_committed {
                ParticipantPhase::PreCommitted
            } else {
                ParticipantPhase::Prepared
            },
            promised: promised.clone(),
            highest_seen: promised,
            pending_pre_commit: None,
            deferred_queries: Vec::new(),
            timeout_ms,
            deadline_ms: Some(now_ms),
            round: None,
        }
    }

    pub fn participants(&self) -> &[ShardName] {
        &self.participants
    }

    pub fn shard(&self) -> &ShardName {
        &self.shard
    }
    pub fn phase(&self) -> ParticipantPhase {
        self.phase
    }
    pub fn promised(&self) -> &Ballot {
        &self.promised
    }
    /// The earliest time a `Tick` can change anything, if any.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.deadline_ms
    }

    /// The termination leader: the lowest-named participant of the transaction.
    pub fn leader(&self) -> Option<&ShardName> {
        self.participants.iter().min()
    }

    fn is_leader(&self) -> bool {
        self.leader() == Some(&self.shard)
    }

    /// The state reported to a termination query.
    fn reported_state(&self) -> ReportedState {
        match self.phase {
            ParticipantPhase::Prepared | ParticipantPhase::PreCommitting => ReportedState::Prepared,
            ParticipantPhase::PreCommitted => ReportedState::PreCommitted,
            ParticipantPhase::Committed => ReportedState::Committed,
            ParticipantPhase::Working | ParticipantPhase::Aborted => ReportedState::Aborted,
        }
    }

    /// Applies one event. Events out of place (late, duplicated, or under a stale ballot) are
    /// ignored: every message here may be lost, repeated or overtaken.
    pub fn step(&mut self, event: ParticipantEvent, now_ms: u64) -> Vec<ParticipantAction> {
        let mut actions = Vec::new();
        match event {
            ParticipantEvent::PrepareRequested { participants } => {
                self.prepare_requested(participants, &mut actions)
            }
            ParticipantEvent::BranchPrepared => {
                if self.phase == ParticipantPhase::Working {
                    self.phase = ParticipantPhase::Prepared;
                    self.deadline_ms = Some(now_ms.saturating_add(self.timeout_ms));
                    actions.push(ParticipantAction::SendVote { yes: true });
                }
            }
            ParticipantEvent::BranchPrepareFailed => {
                if self.phase == ParticipantPhase::Working {
                    self.decide(ParticipantPhase::Aborted, &mut actions);
                    actions.push(ParticipantAction::SendVote { yes: false });
                }
            }
            ParticipantEvent::PreCommitRequested { from, ballot } => {
                self.pre_commit_requested(from, ballot, now_ms, &mut actions)
            }
            ParticipantEvent::PreCommitDurable => self.pre_commit_durable(now_ms, &mut actions),
            ParticipantEvent::CommitRequested { from } => {
                if matches!(
                    self.phase,
                    ParticipantPhase::Prepared | ParticipantPhase::PreCommitted
                ) {
                    self.decide(ParticipantPhase::Committed, &mut actions);
                }
                if self.phase == ParticipantPhase::Committed && matches!(from, Proposer::Coordinator { .. }) {
                    actions.push(ParticipantAction::AcknowledgeDecision);
                }
            }
            ParticipantEvent::AbortRequested { from } => {
                if matches!(
                    self.phase,
                    ParticipantPhase::Working | ParticipantPhase::Prepared | ParticipantPhase::PreCommitted
                ) {
                    self.decide(ParticipantPhase::Aborted, &mut actions);
                }
                if self.phase == ParticipantPhase::Aborted && matches!(from, Proposer::Coordinator { .. }) {
                    actions.push(ParticipantAction::AcknowledgeDecision);
                }
            }
            ParticipantEvent::StateQueried { from, ballot } => self.state_queried(from, ballot, &mut actions),
            ParticipantEvent::StateReported {
                shard,
                ballot,
                report,
            } => self.state_reported(shard, ballot, report, &mut actions),
            ParticipantEvent::PreCommitAcknowledged { shard, ballot } => {
                self.pre_commit_acknowledged(&shard, &ballot, &mut actions)
            }
            ParticipantEvent::TerminationRequested { participants } => {
                if self.protocol == Protocol::ThreePhase {
                    if self.participants.is_empty() {
                        self.participants = participants;
                    }
                    if self.is_leader() {
                        self.start_round(&mut actions);
                    }
                }
            }
            ParticipantEvent::Tick => self.tick(now_ms, &mut actions),
        }
        actions
    }

    fn prepare_requested(&mut self, participants: Vec<ShardName>, actions: &mut Vec<ParticipantAction>) {
        if self.participants.is_empty() {
            self.participants = participants;
        }
        match self.phase {
            ParticipantPhase::Working => actions.push(ParticipantAction::PrepareBranch),
            // Aborted before voting (a termination query reached it first): the vote is NO.
            ParticipantPhase::Aborted => actions.push(ParticipantAction::SendVote { yes: false }),
            // A repeated prepare gets the same vote.
            _ => actions.push(ParticipantAction::SendVote { yes: true }),
        }
    }

    fn pre_commit_requested(
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
            ParticipantPhase::Working | ParticipantPhase::PreCommitting | ParticipantPhase::Aborted => {}
        }
    }

    fn pre_commit_durable(&mut self, now_ms: u64, actions: &mut Vec<ParticipantAction>) {
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

    fn state_queried(&mut self, from: Proposer, ballot: Ballot, actions: &mut Vec<ParticipantAction>) {
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

    fn state_reported(
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

    fn pre_commit_acknowledged(
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

    fn send_to_all(&self, commit: bool, actions: &mut Vec<ParticipantAction>) {
        for shard in &self.participants {
            let shard = shard.clone();
            actions.push(if commit {
                ParticipantAction::SendCommit { shard }
            } else {
                ParticipantAction::SendAbort { shard }
            });
        }
    }

    fn start_round(&mut self, actions: &mut Vec<ParticipantAction>) {
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

    fn tick(&mut self, now_ms: u64, actions: &mut Vec<ParticipantAction>) {
        let Some(deadline_ms) = self.deadline_ms else {
            return;
        };
        if now_ms < deadline_ms || self.phase.is_decided() {
            return;
        }
        self.deadline_ms = Some(now_ms.saturating_add(self.timeout_ms));
        if self.phase == ParticipantPhase::Working {
            self.decide(ParticipantPhase::Aborted, actions);
            return;
        }
        match self.protocol {
            Protocol::TwoPhase => actions.push(ParticipantAction::AskCoordinator),
            Protocol::ThreePhase if self.is_leader() => self.start_round(actions),
            Protocol::ThreePhase => {
                if let Some(leader) = self.leader().cloned() {
                    actions.push(ParticipantAction::RequestTermination {
                        leader,
                        participants: self.participants.clone(),
                    });
                }
            }
        }
    }

    fn decide(&mut self, phase: ParticipantPhase, actions: &mut Vec<ParticipantAction>) {
        self.phase = phase;
        self.deadline_ms = None;
        actions.push(match phase {
            ParticipantPhase::Committed => ParticipantAction::ApplyCommit,
            _ => ParticipantAction::ApplyAbort,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(name: &str) -> ShardName {
        ShardName::new(name).unwrap()
    }

    fn prepared(name: &str) -> Participant {
        let mut p = Participant::new(shard(name), Protocol::ThreePhase, Rules::Classical, 100, 0);
        p.step(
            ParticipantEvent::PrepareRequested {
                participants: vec![shard("a"), shard("b")],
            },
            0,
        );
        assert_eq!(
            p.step(ParticipantEvent::BranchPrepared, 0),
            vec![ParticipantAction::SendVote { yes: true }]
        );
        p
    }

    fn leader_ballot(round: u64) -> Ballot {
        Ballot {
            round,
            proposer: Proposer::Participant(shard("a")),
        }
    }

    #[test]
    fn pre_commit_is_durable_before_it_is_acknowledged() {
        let mut p = prepared("b");
        let from = Proposer::Coordinator { incarnation: 0 };
        let actions = p.step(
            ParticipantEvent::PreCommitRequested {
                from: from.clone(),
                ballot: Ballot::COORDINATOR,
            },
            1,
        );
        assert_eq!(
            actions,
            vec![ParticipantAction::PersistPreCommitState {
                ballot: Ballot::COORDINATOR
            }]
        );
        assert_eq!(
            p.step(ParticipantEvent::PreCommitDurable, 2),
            vec![ParticipantAction::AcknowledgePreCommit {
                to: from,
                ballot: Ballot::COORDINATOR
            }]
        );
        assert_eq!(p.phase(), ParticipantPhase::PreCommitted);
    }

    #[test]
    fn an_answered_query_shuts_out_lower_pre_commits() {
        // Rule: a participant that answers ballot b ignores every pre-commit below b.
        let mut p = prepared("b");
        let from = Proposer::Participant(shard("a"));
        p.step(
            ParticipantEvent::StateQueried {
                from,
                ballot: leader_ballot(1),
            },
            1,
        );
        let actions = p.step(
            ParticipantEvent::PreCommitRequested {
                from: Proposer::Coordinator { incarnation: 0 },
                ballot: Ballot::COORDINATOR,
            },
            2,
        );
        assert!(actions.is_empty());
        assert_eq!(p.phase(), ParticipantPhase::Prepared);
    }

    #[test]
    fn the_leader_decides_only_with_every_state_and_aborts_when_all_are_merely_prepared() {
        let mut leader = prepared("a");
        let actions = leader.step(ParticipantEvent::Tick, 100);
        let ballot = leader_ballot(1);
        assert_eq!(
            actions,
            vec![ParticipantAction::QueryStates {
                ballot: ballot.clone(),
                shards: vec![shard("a"), shard("b")]
            }]
        );
        let report = |s: &str| ParticipantEvent::StateReported {
            shard: shard(s),
            ballot: ballot.clone(),
            report: Report::State(ReportedState::Prepared),
        };
        assert!(leader.step(report("a"), 101).is_empty());
        assert_eq!(
            leader.step(report("b"), 101),
            vec![
                ParticipantAction::SendAbort { shard: shard("a") },
                ParticipantAction::SendAbort { shard: shard("b") },
            ]
        );
    }

    #[test]
    fn a_non_leader_asks_the_leader_and_a_2pc_participant_asks_the_coordinator() {
        let mut b = prepared("b");
        assert_eq!(
            b.step(ParticipantEvent::Tick, 100),
            vec![ParticipantAction::RequestTermination {
                leader: shard("a"),
                participants: vec![shard("a"), shard("b")]
            }]
        );
        let mut two_phase = Participant::new(shard("b"), Protocol::TwoPhase, Rules::Classical, 100, 0);
        two_phase.step(
            ParticipantEvent::PrepareRequested {
                participants: vec![shard("a"), shard("b")],
            },
            0,
        );
        two_phase.step(ParticipantEvent::BranchPrepared, 0);
        assert_eq!(
            two_phase.step(ParticipantEvent::Tick, 100),
            vec![ParticipantAction::AskCoordinator]
        );
    }

    #[test]
    fn a_participant_that_has_not_voted_aborts_when_asked() {
        let mut p = Participant::new(shard("b"), Protocol::ThreePhase, Rules::Classical, 100, 0);
        let actions = p.step(
            ParticipantEvent::StateQueried {
                from: Proposer::Participant(shard("a")),
                ballot: leader_ballot(1),
            },
            1,
        );
        assert_eq!(p.phase(), ParticipantPhase::Aborted);
        assert!(actions.contains(&ParticipantAction::ReportState {
            to: Proposer::Participant(shard("a")),
            ballot: leader_ballot(1),
            report: Report::State(ReportedState::Aborted),
        }));
    }
}
