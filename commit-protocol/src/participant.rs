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
//! [`crate::termination::decide`] once it holds all of them, and then pre-commits the rest under that ballot
//! before committing, or aborts.
//!
//! In 2PC a participant never finishes a prepared branch on its own: on a timeout it asks the
//! coordinator ([`ParticipantAction::AskCoordinator`]).
//!
//! Two-phase branches in production need more rules, and the machine owns them too (the model
//! checks the READ-ONLY vote among them): the idle timeout of a branch that has not voted ([`ParticipantEvent::StatementRan`]
//! pushes it back), a branch whose work failed before its vote ([`ParticipantEvent::WorkAbandoned`]),
//! the READ-ONLY vote of a branch that wrote nothing ([`ParticipantAction::CheckWrites`], then a
//! local commit), the one-phase commit of a transaction's only participant
//! ([`ParticipantEvent::CommitOnePhaseRequested`]), and the typed [`Refusal`]s for a decision the
//! branch cannot take (a commit of a branch that never prepared or rolled back, an abort of one that
//! committed).
//!
//! A participant restart is not modelled: the service keeps the participants, the pre-commit and the
//! promised ballot durable before it votes or answers, and rebuilds the machine with
//! [`Participant::recover`], so a restart cannot forget a promise. A two-phase branch is rebuilt
//! with [`Participant::resume`] from what the participant remembers or PostgreSQL holds.
//!
//! Modules: `three_phase` (pre-commit, promises and the termination leader's rounds), `tests`.

#[cfg(test)]
mod tests;
mod three_phase;

use treaty_types::ShardName;

use crate::coordinator::Protocol;
use crate::termination::{Ballot, Proposer, ReportedState, Rules};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ParticipantPhase {
    /// Running statements; has not voted.
    Working,
    /// 2PC: wrote nothing; the local COMMIT that precedes the READ-ONLY vote is running.
    CommittingReadOnly,
    /// The transaction's only participant: the plain COMMIT is running.
    CommittingOnePhase,
    /// `PREPARE TRANSACTION` done, voted YES.
    Prepared,
    /// A pre-commit is being made durable; the acknowledgement waits for it.
    PreCommitting,
    /// Durably pre-committed (3PC): the transaction will commit.
    PreCommitted,
    Committed,
    Aborted,
    /// 2PC: wrote nothing, committed locally and voted READ-ONLY; it takes no part in phase two.
    ReadOnly,
    /// A one-phase COMMIT was sent and its answer lost: whether it committed is unknown, so the
    /// branch can be neither committed nor aborted by a later request.
    OutcomeUnknown,
}

impl ParticipantPhase {
    /// Finished: nothing is left for the machine to do.
    pub fn is_decided(self) -> bool {
        matches!(
            self,
            ParticipantPhase::Committed
                | ParticipantPhase::Aborted
                | ParticipantPhase::ReadOnly
                | ParticipantPhase::OutcomeUnknown
        )
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

/// Why the machine refuses a request from the coordinator (or recovery): each says what the caller
/// asked for that the branch cannot do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, thiserror::Error)]
pub enum Refusal {
    /// A two-phase commit of a branch that has not voted.
    #[error("the branch is still open (not prepared); it must be prepared before it is committed")]
    NotPrepared,
    /// A commit of a branch that rolled back (voted NO, failed, idled out, or was aborted).
    #[error("the branch was rolled back, cannot commit")]
    RolledBack,
    /// An abort of a branch that committed.
    #[error("the branch already committed, cannot abort")]
    Committed,
    /// A one-phase commit of a prepared branch, which only `COMMIT PREPARED` may finish.
    #[error("the branch is prepared; it is finished with a two-phase commit, not a one-phase commit")]
    Prepared,
    /// A decision for a branch whose one-phase COMMIT has an unknown outcome.
    #[error("the branch sent a one-phase COMMIT and lost the answer; its outcome is unknown")]
    OutcomeUnknown,
}

/// What a participant that holds no machine for a two-phase branch knows of it, from its own
/// recent history or from PostgreSQL; [`Participant::resume`] rebuilds the machine from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Remembered {
    /// Voted YES (or, with nothing remembered, may be held prepared by PostgreSQL: the coordinator
    /// sends a decision only to YES voters, and carrying out a decision checks PostgreSQL).
    Prepared,
    ReadOnly,
    Committed,
    Aborted,
    OutcomeUnknown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParticipantEvent {
    /// A statement of a branch that has not voted succeeded: pushes its idle timeout back.
    StatementRan,
    /// The branch cannot go on before its vote (a statement failed, a one-shot's row count was not
    /// met, the participant shuts down): it aborts unilaterally, which is allowed until it votes.
    WorkAbandoned,
    /// The coordinator asks for a vote; `participants` names every participant of the transaction
    /// (termination needs them).
    PrepareRequested {
        participants: Vec<ShardName>,
    },
    /// (2PC) answers `CheckWrites`: the branch wrote something, so it must prepare.
    BranchWrote,
    /// (2PC) answers `CheckWrites`: the branch wrote nothing, so it may vote READ-ONLY.
    BranchWroteNothing,
    /// The driver's `PREPARE TRANSACTION` succeeded.
    BranchPrepared,
    /// The driver's `PREPARE TRANSACTION` failed (or the branch could not be prepared).
    BranchPrepareFailed,
    /// The coordinator commits the transaction's only participant in one phase.
    CommitOnePhaseRequested,
    /// The local COMMIT asked for by `CommitLocally` succeeded.
    LocalCommitSucceeded,
    /// The local COMMIT failed (PostgreSQL rolled the transaction back).
    LocalCommitFailed,
    /// The connection broke while the local COMMIT was in flight: its outcome is unknown.
    LocalCommitOutcomeUnknown,
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
    /// (2PC) find out whether the branch wrote anything; answered by `BranchWrote` or
    /// `BranchWroteNothing` (or `BranchPrepareFailed` if it cannot be found out).
    CheckWrites,
    /// Run `PREPARE TRANSACTION`; answered by `BranchPrepared` or `BranchPrepareFailed`.
    PrepareBranch,
    /// A plain `COMMIT` of the open transaction (one-phase, or before a READ-ONLY vote); answered
    /// by `LocalCommitSucceeded`, `LocalCommitFailed` or `LocalCommitOutcomeUnknown`.
    CommitLocally,
    /// Answer the coordinator's prepare.
    SendVote {
        yes: bool,
    },
    /// Answer the coordinator's prepare with READ-ONLY: finished, leave me out of phase two.
    SendReadOnlyVote,
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
    /// Answer the coordinator's request with this refusal; nothing changed.
    Refuse(Refusal),
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
    round: Option<three_phase::Round>,
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
            participants,
            phase: if pre_committed {
                ParticipantPhase::PreCommitted
            } else {
                ParticipantPhase::Prepared
            },
            promised: promised.clone(),
            highest_seen: promised,
            deadline_ms: Some(now_ms),
            ..Self::new(shard, Protocol::ThreePhase, rules, timeout_ms, now_ms)
        }
    }

    /// A 2PC branch whose machine this participant no longer holds (it finished a while ago, or
    /// the participant restarted), rebuilt from what it remembers or PostgreSQL holds. A prepared
    /// one asks the coordinator once `timeout_ms` passes; it never finishes on its own.
    pub fn resume(shard: ShardName, remembered: Remembered, timeout_ms: u64, now_ms: u64) -> Self {
        let phase = match remembered {
            Remembered::Prepared => ParticipantPhase::Prepared,
            Remembered::ReadOnly => ParticipantPhase::ReadOnly,
            Remembered::Committed => ParticipantPhase::Committed,
            Remembered::Aborted => ParticipantPhase::Aborted,
            Remembered::OutcomeUnknown => ParticipantPhase::OutcomeUnknown,
        };
        Self {
            phase,
            deadline_ms: (!phase.is_decided()).then(|| now_ms.saturating_add(timeout_ms)),
            ..Self::new(shard, Protocol::TwoPhase, Rules::Classical, timeout_ms, now_ms)
        }
    }

    pub fn participants(&self) -> &[ShardName] {
        &self.participants
    }

    pub fn shard(&self) -> &ShardName {
        &self.shard
    }
    pub fn protocol(&self) -> Protocol {
        self.protocol
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
            // Only 2PC branches reach the others, and they take no part in termination; none of
            // them may be reported as anything but finished without a commit to lean on.
            ParticipantPhase::Working
            | ParticipantPhase::Aborted
            | ParticipantPhase::CommittingReadOnly
            | ParticipantPhase::CommittingOnePhase
            | ParticipantPhase::ReadOnly
            | ParticipantPhase::OutcomeUnknown => ReportedState::Aborted,
        }
    }

    /// Applies one event. Events out of place (late, duplicated, or under a stale ballot) are
    /// ignored: every message here may be lost, repeated or overtaken. A decision the branch cannot
    /// take comes back as [`ParticipantAction::Refuse`] when the coordinator asked for it.
    pub fn step(&mut self, event: ParticipantEvent, now_ms: u64) -> Vec<ParticipantAction> {
        let mut actions = Vec::new();
        self.step_into(event, now_ms, &mut actions);
        actions
    }

    /// [`Participant::step`], appending the actions to `actions`: a driver that steps a machine
    /// several times in a row reuses one buffer instead of allocating one per step.
    pub fn step_into(&mut self, event: ParticipantEvent, now_ms: u64, actions: &mut Vec<ParticipantAction>) {
        match event {
            ParticipantEvent::StatementRan => {
                // No action and so no allocation: this runs once per statement.
                if self.phase == ParticipantPhase::Working {
                    self.deadline_ms = Some(now_ms.saturating_add(self.timeout_ms));
                }
            }
            ParticipantEvent::WorkAbandoned => {
                if self.phase == ParticipantPhase::Working {
                    self.decide(ParticipantPhase::Aborted, actions);
                }
            }
            ParticipantEvent::PrepareRequested { participants } => {
                self.prepare_requested(participants, actions)
            }
            ParticipantEvent::BranchWrote => {
                if self.phase == ParticipantPhase::Working && self.protocol == Protocol::TwoPhase {
                    actions.push(ParticipantAction::PrepareBranch);
                }
            }
            ParticipantEvent::BranchWroteNothing => {
                // Only 2PC may vote READ-ONLY: a 3PC voter that left would report nothing to
                // termination, which needs every participant's state.
                if self.phase == ParticipantPhase::Working && self.protocol == Protocol::TwoPhase {
                    self.phase = ParticipantPhase::CommittingReadOnly;
                    self.deadline_ms = None;
                    actions.push(ParticipantAction::CommitLocally);
                }
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
                    self.decide(ParticipantPhase::Aborted, actions);
                    actions.push(ParticipantAction::SendVote { yes: false });
                }
            }
            ParticipantEvent::CommitOnePhaseRequested => self.commit_one_phase_requested(actions),
            ParticipantEvent::LocalCommitSucceeded => self.local_commit_succeeded(actions),
            ParticipantEvent::LocalCommitFailed => match self.phase {
                ParticipantPhase::CommittingReadOnly => {
                    self.decide(ParticipantPhase::Aborted, actions);
                    actions.push(ParticipantAction::SendVote { yes: false });
                }
                ParticipantPhase::CommittingOnePhase => self.decide(ParticipantPhase::Aborted, actions),
                _ => {}
            },
            ParticipantEvent::LocalCommitOutcomeUnknown => match self.phase {
                ParticipantPhase::CommittingOnePhase => {
                    // Neither committed nor aborted can be claimed: the connection that carried
                    // the COMMIT is gone, and nothing else can be asked.
                    self.phase = ParticipantPhase::OutcomeUnknown;
                    self.deadline_ms = None;
                }
                // A branch that wrote nothing has nothing to lose: its vote is NO all the same.
                ParticipantPhase::CommittingReadOnly => {
                    self.decide(ParticipantPhase::Aborted, actions);
                    actions.push(ParticipantAction::SendVote { yes: false });
                }
                _ => {}
            },
            ParticipantEvent::PreCommitRequested { from, ballot } => {
                self.pre_commit_requested(from, ballot, now_ms, actions)
            }
            ParticipantEvent::PreCommitDurable => self.pre_commit_durable(now_ms, actions),
            ParticipantEvent::CommitRequested { from } => self.commit_requested(&from, actions),
            ParticipantEvent::AbortRequested { from } => self.abort_requested(&from, actions),
            ParticipantEvent::StateQueried { from, ballot } => self.state_queried(from, ballot, actions),
            ParticipantEvent::StateReported {
                shard,
                ballot,
                report,
            } => self.state_reported(shard, ballot, report, actions),
            ParticipantEvent::PreCommitAcknowledged { shard, ballot } => {
                self.pre_commit_acknowledged(&shard, &ballot, actions)
            }
            ParticipantEvent::TerminationRequested { participants } => {
                if self.protocol == Protocol::ThreePhase {
                    if self.participants.is_empty() {
                        self.participants = participants;
                    }
                    if self.is_leader() {
                        self.start_round(actions);
                    }
                }
            }
            ParticipantEvent::Tick => self.tick(now_ms, actions),
        }
    }

    fn prepare_requested(&mut self, participants: Vec<ShardName>, actions: &mut Vec<ParticipantAction>) {
        if self.participants.is_empty() {
            self.participants = participants;
        }
        match self.phase {
            // 2PC asks first whether anything was written: a branch that wrote nothing commits
            // locally and stays out of phase two.
            ParticipantPhase::Working if self.protocol == Protocol::TwoPhase => {
                actions.push(ParticipantAction::CheckWrites)
            }
            ParticipantPhase::Working => actions.push(ParticipantAction::PrepareBranch),
            // Aborted before voting (a termination query reached it first, or its work failed), or
            // a one-phase commit of unknown outcome: the vote is NO.
            ParticipantPhase::Aborted | ParticipantPhase::OutcomeUnknown => {
                actions.push(ParticipantAction::SendVote { yes: false })
            }
            // A repeated prepare gets the same vote.
            ParticipantPhase::ReadOnly => actions.push(ParticipantAction::SendReadOnlyVote),
            ParticipantPhase::Prepared
            | ParticipantPhase::PreCommitting
            | ParticipantPhase::PreCommitted
            | ParticipantPhase::Committed => actions.push(ParticipantAction::SendVote { yes: true }),
            // A local commit is running; its outcome answers.
            ParticipantPhase::CommittingReadOnly | ParticipantPhase::CommittingOnePhase => {}
        }
    }

    fn commit_one_phase_requested(&mut self, actions: &mut Vec<ParticipantAction>) {
        match self.phase {
            ParticipantPhase::Working => {
                self.phase = ParticipantPhase::CommittingOnePhase;
                self.deadline_ms = None;
                actions.push(ParticipantAction::CommitLocally);
            }
            // A repeat: the commit (or the read-only finish, which needs nothing more) stands.
            ParticipantPhase::Committed | ParticipantPhase::ReadOnly => {
                actions.push(ParticipantAction::AcknowledgeDecision)
            }
            ParticipantPhase::Prepared | ParticipantPhase::PreCommitting | ParticipantPhase::PreCommitted => {
                actions.push(ParticipantAction::Refuse(Refusal::Prepared))
            }
            ParticipantPhase::Aborted => actions.push(ParticipantAction::Refuse(Refusal::RolledBack)),
            ParticipantPhase::OutcomeUnknown => {
                actions.push(ParticipantAction::Refuse(Refusal::OutcomeUnknown))
            }
            ParticipantPhase::CommittingReadOnly | ParticipantPhase::CommittingOnePhase => {}
        }
    }

    fn local_commit_succeeded(&mut self, actions: &mut Vec<ParticipantAction>) {
        match self.phase {
            ParticipantPhase::CommittingReadOnly => {
                self.phase = ParticipantPhase::ReadOnly;
                actions.push(ParticipantAction::SendReadOnlyVote);
            }
            ParticipantPhase::CommittingOnePhase => {
                self.phase = ParticipantPhase::Committed;
                actions.push(ParticipantAction::AcknowledgeDecision);
            }
            _ => {}
        }
    }

    fn commit_requested(&mut self, from: &Proposer, actions: &mut Vec<ParticipantAction>) {
        if matches!(
            self.phase,
            ParticipantPhase::Prepared | ParticipantPhase::PreCommitted
        ) {
            self.decide(ParticipantPhase::Committed, actions);
        }
        // Termination messages between participants get no answer; the coordinator's do.
        if !matches!(from, Proposer::Coordinator { .. }) {
            return;
        }
        match self.phase {
            // A READ-ONLY voter is left out of phase two; a commit sent anyway finds it finished.
            ParticipantPhase::Committed | ParticipantPhase::ReadOnly => {
                actions.push(ParticipantAction::AcknowledgeDecision)
            }
            ParticipantPhase::Working => actions.push(ParticipantAction::Refuse(Refusal::NotPrepared)),
            ParticipantPhase::Aborted => actions.push(ParticipantAction::Refuse(Refusal::RolledBack)),
            ParticipantPhase::OutcomeUnknown => {
                actions.push(ParticipantAction::Refuse(Refusal::OutcomeUnknown))
            }
            ParticipantPhase::CommittingReadOnly
            | ParticipantPhase::CommittingOnePhase
            | ParticipantPhase::Prepared
            | ParticipantPhase::PreCommitting
            | ParticipantPhase::PreCommitted => {}
        }
    }

    fn abort_requested(&mut self, from: &Proposer, actions: &mut Vec<ParticipantAction>) {
        let already_aborted = self.phase == ParticipantPhase::Aborted;
        if matches!(
            self.phase,
            ParticipantPhase::Working | ParticipantPhase::Prepared | ParticipantPhase::PreCommitted
        ) {
            self.decide(ParticipantPhase::Aborted, actions);
        }
        if !matches!(from, Proposer::Coordinator { .. }) {
            return;
        }
        match self.phase {
            // A repeated abort is applied again: a branch whose PREPARE broke off voted NO but may
            // be held prepared by the database, and undoing a branch that is gone is harmless.
            ParticipantPhase::Aborted => {
                if already_aborted {
                    actions.push(ParticipantAction::ApplyAbort);
                }
                actions.push(ParticipantAction::AcknowledgeDecision);
            }
            // A READ-ONLY voter wrote nothing, so there is nothing to undo.
            ParticipantPhase::ReadOnly => actions.push(ParticipantAction::AcknowledgeDecision),
            ParticipantPhase::Committed => actions.push(ParticipantAction::Refuse(Refusal::Committed)),
            ParticipantPhase::OutcomeUnknown => {
                actions.push(ParticipantAction::Refuse(Refusal::OutcomeUnknown))
            }
            ParticipantPhase::Working
            | ParticipantPhase::CommittingReadOnly
            | ParticipantPhase::CommittingOnePhase
            | ParticipantPhase::Prepared
            | ParticipantPhase::PreCommitting
            | ParticipantPhase::PreCommitted => {}
        }
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
