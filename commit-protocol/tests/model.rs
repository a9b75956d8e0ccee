//! Model checking of the commit protocol with stateright: the coordinator's real [`Transaction`]
//! and one real [`Participant`] per shard, wired by a network that delays, reorders and loses
//! messages, a coordinator that crashes and restarts from its durable log (through the real
//! `recover_*` constructors), participant timeouts and the 3PC termination protocol. Explored
//! exhaustively (BFS) for 2PC and 3PC with 2 and 3 participants.
//!
//! Only the glue is model code: it plays the drivers, turning each machine's actions into
//! messages and log records and each delivered message into the machine's event, as the services
//! do (the participant's production driver, `participant/src/agent/machine.rs`, runs the same
//! `Participant` for every 2PC branch). A 2PC prepare may find the branch wrote nothing: it then
//! commits locally and votes READ-ONLY. Time is abstract: ordinary steps run at `now_ms = 0` and a timeout action feeds the machine
//! a `Tick` at exactly its own next deadline.
//!
//! Assumptions that keep the state space finite (and the liveness property meaningful): at most
//! `max_losses` messages are lost, the coordinator crashes at most `max_crashes` times and always
//! restarts, and the first `racy_timeouts` participant timeouts may fire at any time (each counts,
//! wherever it fires; so do coordinator timeouts other than the vote timeout that fire while
//! messages are in flight). The coordinator's vote timeout may always fire (it aborts once). Any
//! other timeout fires only when the network is quiet (a 2PC participant then asks a live
//! coordinator with no timer of its own, a 3PC one starts or requests termination). Counting
//! every early participant timeout keeps the 3-participant 3PC check under a minute.

use std::collections::{BTreeMap, BTreeSet};

use stateright::{Checker, Model, Property};
use treaty_commit_protocol::participant::{
    Participant, ParticipantAction, ParticipantEvent, ParticipantPhase, Report,
};
use treaty_commit_protocol::termination::{Ballot, Proposer, Rules};
use treaty_commit_protocol::{
    AbortCause, AbortReason, Action, Event, Outcome, Phase, Protocol, Timeouts, Transaction, Vote,
};
use treaty_types::ShardName;

const TXID: u64 = 1;
const PARTICIPANT_TIMEOUT_MS: u64 = 100;
const TIMEOUTS: Timeouts = Timeouts {
    transaction_ms: 1_000_000,
    idle_ms: 1_000_000,
    vote_ms: 100,
};

#[derive(Clone, Copy, Debug)]
struct CommitModel {
    protocol: Protocol,
    participants: usize,
    rules: Rules,
    max_losses: u8,
    max_crashes: u8,
    racy_timeouts: u8,
    /// A participant's pre-commit write completes in the same step as the request (no query can
    /// slip in between); used to keep the larger configurations small.
    atomic_participant_writes: bool,
}

fn shard(i: usize) -> ShardName {
    ShardName::new(&format!("p{i}")).expect("valid shard name")
}

fn index_of(name: &ShardName) -> usize {
    name.as_str()[1..]
        .parse()
        .expect("model shard names are p<index>")
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Record {
    PreCommit(Vec<ShardName>),
    Commit(Vec<ShardName>),
}

/// A participant's vote as the network carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum WireVote {
    Yes,
    No,
    /// 2PC only: the branch wrote nothing, committed locally and leaves phase two.
    ReadOnly,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Msg {
    Prepare {
        to: usize,
    },
    PreCommit {
        to: usize,
        from: Proposer,
        ballot: Ballot,
    },
    Commit {
        to: usize,
        from: Proposer,
    },
    Abort {
        to: usize,
        from: Proposer,
    },
    Query {
        to: usize,
        from: Proposer,
        ballot: Ballot,
    },
    RequestTermination {
        to: usize,
    },
    Vote {
        from: usize,
        vote: WireVote,
    },
    PreCommitAck {
        from: usize,
        to: Proposer,
        ballot: Ballot,
    },
    DecisionAck {
        from: usize,
    },
    Report {
        from: usize,
        to: Proposer,
        ballot: Ballot,
        report: Report,
    },
    AskDecision {
        from: usize,
    },
    /// A coordinator log write in progress; delivering it makes it durable.
    LogWrite(Record),
    /// A participant's pre-commit write in progress.
    PreCommitWrite {
        at: usize,
    },
}

impl Msg {
    /// Log writes are not messages: a crash loses them, the network does not.
    fn lossable(&self) -> bool {
        !matches!(self, Msg::LogWrite(_) | Msg::PreCommitWrite { .. })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct Log {
    pre_commit: Option<Vec<ShardName>>,
    commit: Option<Vec<ShardName>>,
    end: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct State {
    /// The coordinator's volatile machine; `None` while down, or after a restart that found
    /// nothing to recover (it then answers "abort" to a participant that asks: presumed abort).
    coordinator: Option<Transaction>,
    coordinator_up: bool,
    incarnation: u64,
    log: Log,
    participants: Vec<Participant>,
    network: BTreeSet<Msg>,
    losses: u8,
    crashes: u8,
    racy_timeouts: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Step {
    Deliver(Msg),
    /// Deliver a prepare; `vote` is what the branch can vote (PREPARE TRANSACTION succeeds or
    /// not, or, in 2PC, the branch wrote nothing).
    DeliverPrepare {
        to: usize,
        vote: WireVote,
    },
    Lose(Msg),
    /// The coordinator crashes; with `writes_landed` its log writes in progress became durable
    /// first (it crashed before hearing so).
    CoordinatorCrash {
        writes_landed: bool,
    },
    CoordinatorRestart,
    CoordinatorTimeout,
    ParticipantTimeout(usize),
}

impl CommitModel {
    fn quiet(&self, state: &State) -> bool {
        state.network.is_empty()
    }

    fn perform_coordinator(&self, state: &mut State, actions: Vec<Action>) {
        let me = Proposer::Coordinator {
            incarnation: state.incarnation,
        };
        for action in actions {
            match action {
                Action::SendPrepare { shards } => {
                    for s in shards {
                        state.network.insert(Msg::Prepare { to: index_of(&s) });
                    }
                }
                Action::PersistCommit { participants } => {
                    state.network.insert(Msg::LogWrite(Record::Commit(participants)));
                }
                Action::PersistPreCommit { participants } => {
                    state
                        .network
                        .insert(Msg::LogWrite(Record::PreCommit(participants)));
                }
                Action::SendCommit { shard, .. } => {
                    state.network.insert(Msg::Commit {
                        to: index_of(&shard),
                        from: me.clone(),
                    });
                }
                Action::SendAbort { shard, .. } => {
                    state.network.insert(Msg::Abort {
                        to: index_of(&shard),
                        from: me.clone(),
                    });
                }
                Action::SendPreCommit { shard, ballot, .. } => {
                    state.network.insert(Msg::PreCommit {
                        to: index_of(&shard),
                        from: me.clone(),
                        ballot,
                    });
                }
                Action::QueryParticipantStates { shards, ballot } => {
                    for s in shards {
                        state.network.insert(Msg::Query {
                            to: index_of(&s),
                            from: me.clone(),
                            ballot: ballot.clone(),
                        });
                    }
                }
                // The end record is lazy and only lets the log forget.
                Action::PersistEnd => state.log.end = true,
                // This model keeps decisions in the store; `tests/decision_race.rs` checks the
                // decision in a branch's row.
                Action::CommitOnePhase { .. }
                | Action::ExecuteAndCommitOnePhase { .. }
                | Action::CommitDecision { .. }
                | Action::ConcludeDecision { .. }
                | Action::Reply(_)
                | Action::Finished => {}
            }
        }
    }

    fn feed_coordinator(&self, state: &mut State, event: Event, now_ms: u64) {
        let Some(machine) = state.coordinator.as_mut() else {
            return;
        };
        // Only client requests can be refused; the model sends none after the commit.
        let actions = machine.step(event, now_ms).unwrap_or_default();
        self.perform_coordinator(state, actions);
    }

    fn perform_participant(&self, state: &mut State, at: usize, actions: Vec<ParticipantAction>) {
        let me = Proposer::Participant(shard(at));
        let mut write_completes = false;
        for action in actions {
            let msg = match action {
                // Answered inline by `DeliverPrepare`, which carries the outcome.
                ParticipantAction::CheckWrites
                | ParticipantAction::PrepareBranch
                | ParticipantAction::CommitLocally => continue,
                ParticipantAction::SendVote { yes } => Msg::Vote {
                    from: at,
                    vote: if yes { WireVote::Yes } else { WireVote::No },
                },
                ParticipantAction::SendReadOnlyVote => Msg::Vote {
                    from: at,
                    vote: WireVote::ReadOnly,
                },
                // A refused request is an error the coordinator retries; the properties below
                // catch a refusal that would matter (a commit refused by an aborted branch).
                ParticipantAction::Refuse(_) => continue,
                ParticipantAction::PersistPreCommitState { .. } if self.atomic_participant_writes => {
                    write_completes = true;
                    continue;
                }
                ParticipantAction::PersistPreCommitState { .. } => Msg::PreCommitWrite { at },
                ParticipantAction::AcknowledgePreCommit { to, ballot } => {
                    Msg::PreCommitAck { from: at, to, ballot }
                }
                ParticipantAction::ApplyCommit | ParticipantAction::ApplyAbort => continue,
                ParticipantAction::AcknowledgeDecision => Msg::DecisionAck { from: at },
                ParticipantAction::ReportState { to, ballot, report } => Msg::Report {
                    from: at,
                    to,
                    ballot,
                    report,
                },
                ParticipantAction::AskCoordinator => Msg::AskDecision { from: at },
                ParticipantAction::RequestTermination { leader, .. } => Msg::RequestTermination {
                    to: index_of(&leader),
                },
                ParticipantAction::QueryStates { ballot, shards } => {
                    for s in shards {
                        state.network.insert(Msg::Query {
                            to: index_of(&s),
                            from: me.clone(),
                            ballot: ballot.clone(),
                        });
                    }
                    continue;
                }
                ParticipantAction::SendPreCommit { shard, ballot } => Msg::PreCommit {
                    to: index_of(&shard),
                    from: me.clone(),
                    ballot,
                },
                ParticipantAction::SendCommit { shard } => Msg::Commit {
                    to: index_of(&shard),
                    from: me.clone(),
                },
                ParticipantAction::SendAbort { shard } => Msg::Abort {
                    to: index_of(&shard),
                    from: me.clone(),
                },
            };
            state.network.insert(msg);
        }
        if write_completes {
            self.feed_participant(state, at, ParticipantEvent::PreCommitDurable, 0);
        }
    }

    fn feed_participant(&self, state: &mut State, at: usize, event: ParticipantEvent, now_ms: u64) {
        let actions = state.participants[at].step(event, now_ms);
        self.perform_participant(state, at, actions);
    }

    fn all_shards(&self) -> Vec<ShardName> {
        (0..self.participants).map(shard).collect()
    }

    /// What the coordinator's driver answers a participant asking for the decision.
    fn answer_decision(&self, state: &mut State, from: usize) {
        let answer = match &state.coordinator {
            None => Some(false), // nothing recovered for it: presumed abort
            Some(machine) => match machine.outcome() {
                Some(Outcome::Committed) if !machine.phase().is_undecided() => Some(true),
                Some(Outcome::Aborted(_)) => Some(false),
                _ => None, // still deciding: PENDING
            },
        };
        let from_coordinator = Proposer::Coordinator {
            incarnation: state.incarnation,
        };
        match answer {
            Some(true) => {
                state.network.insert(Msg::Commit {
                    to: from,
                    from: from_coordinator,
                });
            }
            Some(false) => {
                state.network.insert(Msg::Abort {
                    to: from,
                    from: from_coordinator,
                });
            }
            None => {}
        }
    }

    fn deliver(&self, state: &mut State, msg: Msg) {
        let coordinator_event = match msg {
            Msg::Prepare { .. } => unreachable!("prepares are delivered by DeliverPrepare"),
            Msg::PreCommit { to, from, ballot } => {
                self.feed_participant(
                    state,
                    to,
                    ParticipantEvent::PreCommitRequested { from, ballot },
                    0,
                );
                None
            }
            Msg::Commit { to, from } => {
                self.feed_participant(state, to, ParticipantEvent::CommitRequested { from }, 0);
                None
            }
            Msg::Abort { to, from } => {
                self.feed_participant(state, to, ParticipantEvent::AbortRequested { from }, 0);
                None
            }
            Msg::Query { to, from, ballot } => {
                self.feed_participant(state, to, ParticipantEvent::StateQueried { from, ballot }, 0);
                None
            }
            Msg::RequestTermination { to } => {
                let participants = self.all_shards();
                self.feed_participant(
                    state,
                    to,
                    ParticipantEvent::TerminationRequested { participants },
                    0,
                );
                None
            }
            Msg::PreCommitWrite { at } => {
                self.feed_participant(state, at, ParticipantEvent::PreCommitDurable, 0);
                None
            }
            Msg::PreCommitAck { from, to, ballot } => match to {
                Proposer::Participant(leader) => {
                    let event = ParticipantEvent::PreCommitAcknowledged {
                        shard: shard(from),
                        ballot,
                    };
                    self.feed_participant(state, index_of(&leader), event, 0);
                    None
                }
                Proposer::Coordinator { .. } => Some(Event::PreCommitAcknowledged {
                    shard: shard(from),
                    ballot,
                }),
            },
            Msg::Report {
                from,
                to,
                ballot,
                report,
            } => match to {
                Proposer::Participant(leader) => {
                    let event = ParticipantEvent::StateReported {
                        shard: shard(from),
                        ballot,
                        report,
                    };
                    self.feed_participant(state, index_of(&leader), event, 0);
                    None
                }
                Proposer::Coordinator { .. } => Some(Event::ParticipantStatesLearned {
                    ballot,
                    reports: vec![(shard(from), report)],
                }),
            },
            Msg::Vote { from, vote } => Some(Event::VoteReceived {
                shard: shard(from),
                vote: match vote {
                    WireVote::Yes => Vote::Yes,
                    WireVote::ReadOnly => Vote::ReadOnly,
                    WireVote::No => Vote::No(AbortReason::new(AbortCause::VoteNo, "no")),
                },
            }),
            Msg::DecisionAck { from } => Some(Event::Acknowledged { shard: shard(from) }),
            Msg::AskDecision { from } => {
                if state.coordinator_up {
                    self.answer_decision(state, from);
                }
                None
            }
            Msg::LogWrite(record) => {
                let event = match &record {
                    Record::Commit(_) => Event::DecisionDurable,
                    Record::PreCommit(_) => Event::PreCommitDurable,
                };
                write_record(&mut state.log, record);
                Some(event)
            }
        };
        if let Some(event) = coordinator_event {
            self.feed_coordinator(state, event, 0);
        }
    }

    /// A lost coordinator→participant request (or its answer) is an RPC error at the coordinator,
    /// which retries it; any other loss is noticed only by a timeout.
    fn lose(&self, state: &mut State, msg: Msg) {
        let failed_shard = match msg {
            Msg::PreCommit {
                to,
                from: Proposer::Coordinator { .. },
                ..
            }
            | Msg::Commit {
                to,
                from: Proposer::Coordinator { .. },
            }
            | Msg::Abort {
                to,
                from: Proposer::Coordinator { .. },
            } => Some(to),
            Msg::PreCommitAck {
                from,
                to: Proposer::Coordinator { .. },
                ..
            }
            | Msg::DecisionAck { from } => Some(from),
            _ => None,
        };
        if let Some(at) = failed_shard {
            let event = Event::PhaseTwoFailed {
                shard: shard(at),
                error: "lost".into(),
            };
            self.feed_coordinator(state, event, 0);
        }
    }

    fn restart(&self, state: &mut State) {
        state.coordinator_up = true;
        state.incarnation += 1;
        let log = state.log.clone();
        if log.end {
            return;
        }
        let recovered = if let Some(participants) = log.commit {
            Some(Transaction::recover_commit(TXID, participants, 0, TIMEOUTS, 0))
        } else {
            log.pre_commit.map(|participants| {
                Transaction::recover_pre_committed(TXID, participants, state.incarnation, TIMEOUTS, 0)
            })
        };
        if let Some((machine, actions)) = recovered {
            state.coordinator = Some(machine);
            self.perform_coordinator(state, actions);
        }
    }

    fn participant_timeout_enabled(&self, state: &State, at: usize) -> bool {
        let participant = &state.participants[at];
        if participant.phase().is_decided() || participant.next_deadline_ms().is_none() {
            return false;
        }
        if state.racy_timeouts < self.racy_timeouts {
            return true;
        }
        if !self.quiet(state) {
            return false;
        }
        match self.protocol {
            Protocol::ThreePhase => true,
            // Asking a down coordinator or one with a timer of its own would go round in circles.
            Protocol::TwoPhase => {
                state.coordinator_up
                    && state
                        .coordinator
                        .as_ref()
                        .is_none_or(|machine| machine.next_deadline_ms().is_none())
            }
        }
    }

    fn coordinator_timeout_enabled(&self, state: &State) -> bool {
        let Some(machine) = state.coordinator.as_ref().filter(|_| state.coordinator_up) else {
            return false;
        };
        if machine.next_deadline_ms().is_none() {
            return false;
        }
        machine.phase() == Phase::Preparing || self.quiet(state) || state.racy_timeouts < self.racy_timeouts
    }
}

fn write_record(log: &mut Log, record: Record) {
    match record {
        Record::PreCommit(participants) => log.pre_commit = Some(participants),
        Record::Commit(participants) => log.commit = Some(participants),
    }
}

fn committed(state: &State) -> bool {
    state
        .participants
        .iter()
        .any(|p| p.phase() == ParticipantPhase::Committed)
}

fn aborted(state: &State) -> bool {
    state
        .participants
        .iter()
        .any(|p| p.phase() == ParticipantPhase::Aborted)
}

/// A commit in the log, or a decided outcome in the coordinator's machine, matches what the
/// participants applied.
fn decisions_applied(state: &State) -> bool {
    if state.log.commit.is_some() && aborted(state) {
        return false;
    }
    let Some(machine) = state.coordinator.as_ref() else {
        return true;
    };
    match machine.outcome() {
        Some(Outcome::Aborted(_)) => !committed(state),
        Some(Outcome::Committed) if !machine.phase().is_undecided() => !aborted(state),
        _ => true,
    }
}

impl Model for CommitModel {
    type State = State;
    type Action = Step;

    fn init_states(&self) -> Vec<State> {
        let mut machine = Transaction::begin(TXID, self.protocol, TIMEOUTS, 0);
        for s in self.all_shards() {
            machine
                .step(Event::Enlist { shard: s.clone() }, 0)
                .expect("enlist");
            machine
                .step(Event::ExecuteSucceeded { shard: s }, 0)
                .expect("statement");
        }
        let actions = machine
            .step(
                Event::CommitRequested {
                    wait_for_apply: false,
                },
                0,
            )
            .expect("commit");
        let mut state = State {
            coordinator: Some(machine),
            coordinator_up: true,
            incarnation: 0,
            log: Log::default(),
            participants: (0..self.participants)
                .map(|i| Participant::new(shard(i), self.protocol, self.rules, PARTICIPANT_TIMEOUT_MS, 0))
                .collect(),
            network: BTreeSet::new(),
            losses: 0,
            crashes: 0,
            racy_timeouts: 0,
        };
        self.perform_coordinator(&mut state, actions);
        vec![state]
    }

    fn actions(&self, state: &State, actions: &mut Vec<Step>) {
        for msg in &state.network {
            match msg {
                Msg::Prepare { to } => {
                    actions.push(Step::DeliverPrepare {
                        to: *to,
                        vote: WireVote::Yes,
                    });
                    if state.participants[*to].phase() == ParticipantPhase::Working {
                        actions.push(Step::DeliverPrepare {
                            to: *to,
                            vote: WireVote::No,
                        });
                        if self.protocol == Protocol::TwoPhase {
                            actions.push(Step::DeliverPrepare {
                                to: *to,
                                vote: WireVote::ReadOnly,
                            });
                        }
                    }
                }
                _ => actions.push(Step::Deliver(msg.clone())),
            }
            if msg.lossable() && state.losses < self.max_losses {
                actions.push(Step::Lose(msg.clone()));
            }
        }
        if state.coordinator_up {
            if state.crashes < self.max_crashes {
                actions.push(Step::CoordinatorCrash { writes_landed: false });
                if state.network.iter().any(|m| matches!(m, Msg::LogWrite(_))) {
                    actions.push(Step::CoordinatorCrash { writes_landed: true });
                }
            }
            if self.coordinator_timeout_enabled(state) {
                actions.push(Step::CoordinatorTimeout);
            }
        } else {
            actions.push(Step::CoordinatorRestart);
        }
        for at in 0..self.participants {
            if self.participant_timeout_enabled(state, at) {
                actions.push(Step::ParticipantTimeout(at));
            }
        }
    }

    fn next_state(&self, last: &State, step: Step) -> Option<State> {
        let mut state = last.clone();
        match step {
            Step::DeliverPrepare { to, vote } => {
                state.network.remove(&Msg::Prepare { to });
                let participants = self.all_shards();
                self.feed_participant(
                    &mut state,
                    to,
                    ParticipantEvent::PrepareRequested { participants },
                    0,
                );
                // What the driver's steps report, in order (2PC first answers `CheckWrites`; a
                // 3PC machine, or one that already voted, ignores the events it did not ask for).
                let outcomes: &[ParticipantEvent] = match vote {
                    WireVote::Yes => &[ParticipantEvent::BranchWrote, ParticipantEvent::BranchPrepared],
                    WireVote::No => &[
                        ParticipantEvent::BranchWrote,
                        ParticipantEvent::BranchPrepareFailed,
                    ],
                    WireVote::ReadOnly => &[
                        ParticipantEvent::BranchWroteNothing,
                        ParticipantEvent::LocalCommitSucceeded,
                    ],
                };
                for outcome in outcomes {
                    self.feed_participant(&mut state, to, outcome.clone(), 0);
                }
            }
            Step::Deliver(msg) => {
                state.network.remove(&msg);
                let to_down_coordinator = !state.coordinator_up
                    && matches!(
                        &msg,
                        Msg::Vote { .. }
                            | Msg::DecisionAck { .. }
                            | Msg::AskDecision { .. }
                            | Msg::PreCommitAck {
                                to: Proposer::Coordinator { .. },
                                ..
                            }
                            | Msg::Report {
                                to: Proposer::Coordinator { .. },
                                ..
                            }
                    );
                if !to_down_coordinator {
                    self.deliver(&mut state, msg);
                }
            }
            Step::Lose(msg) => {
                state.network.remove(&msg);
                state.losses += 1;
                self.lose(&mut state, msg);
            }
            Step::CoordinatorCrash { writes_landed } => {
                state.crashes += 1;
                state.coordinator_up = false;
                state.coordinator = None;
                let writes: Vec<Msg> = state
                    .network
                    .iter()
                    .filter(|m| matches!(m, Msg::LogWrite(_)))
                    .cloned()
                    .collect();
                for write in writes {
                    state.network.remove(&write);
                    if let (true, Msg::LogWrite(record)) = (writes_landed, write) {
                        write_record(&mut state.log, record);
                    }
                }
            }
            Step::CoordinatorRestart => self.restart(&mut state),
            Step::CoordinatorTimeout => {
                if !self.quiet(&state) && state.coordinator.as_ref()?.phase() != Phase::Preparing {
                    state.racy_timeouts += 1;
                }
                let now_ms = state.coordinator.as_ref()?.next_deadline_ms()?;
                self.feed_coordinator(&mut state, Event::Tick, now_ms);
            }
            Step::ParticipantTimeout(at) => {
                if !self.quiet(&state) || state.racy_timeouts < self.racy_timeouts {
                    state.racy_timeouts += 1;
                }
                let now_ms = state.participants[at].next_deadline_ms()?;
                self.feed_participant(&mut state, at, ParticipantEvent::Tick, now_ms);
            }
        }
        Some(state)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(
                "no participant commits while another aborts",
                |_, state: &State| !(committed(state) && aborted(state)),
            ),
            Property::always(
                "every decision in the log is the one applied",
                |_, state: &State| decisions_applied(state),
            ),
            Property::eventually("every participant decides", |_, state: &State| {
                state.participants.iter().all(|p| p.phase().is_decided())
            }),
            Property::sometimes("a transaction can commit", |_, state: &State| {
                state
                    .participants
                    .iter()
                    .all(|p| p.phase() == ParticipantPhase::Committed)
            }),
            Property::sometimes("a transaction can abort", |_, state: &State| {
                state
                    .participants
                    .iter()
                    .all(|p| p.phase() == ParticipantPhase::Aborted)
            }),
        ]
    }
}

fn model(protocol: Protocol, participants: usize, rules: Rules) -> CommitModel {
    CommitModel {
        protocol,
        participants,
        rules,
        max_losses: 1,
        max_crashes: 1,
        racy_timeouts: 1,
        atomic_participant_writes: false,
    }
}

fn check(name: &str, model: CommitModel) {
    let started = std::time::Instant::now();
    let checker = model.checker().spawn_bfs().join();
    println!(
        "{name}: {} states explored ({} generated) in {:.1?}",
        checker.unique_state_count(),
        checker.state_count(),
        started.elapsed()
    );
    checker.assert_properties();
}

#[test]
fn two_phase_commit_two_participants() {
    check(
        "2PC, 2 participants",
        model(Protocol::TwoPhase, 2, Rules::Classical),
    );
}

#[test]
fn two_phase_commit_three_participants() {
    check(
        "2PC, 3 participants",
        model(Protocol::TwoPhase, 3, Rules::Classical),
    );
}

#[test]
fn three_phase_commit_two_participants() {
    check(
        "3PC, 2 participants",
        model(Protocol::ThreePhase, 2, Rules::Classical),
    );
}

#[test]
fn three_phase_commit_three_participants() {
    // Three participants under 3PC multiply the interleavings of termination rounds; without
    // message loss and with atomic participant writes (crash, restart and a racing timeout stay)
    // it checks in seconds.
    let model = CommitModel {
        max_losses: 0,
        atomic_participant_writes: true,
        ..model(Protocol::ThreePhase, 3, Rules::Classical)
    };
    check("3PC, 3 participants, no loss, atomic participant writes", model);
}

#[test]
fn the_wrong_termination_rule_is_caught_with_a_counterexample() {
    let model = model(Protocol::ThreePhase, 2, Rules::WrongAllPreparedCommit);
    let checker = model.checker().spawn_bfs().join();
    println!(
        "3PC with \"all prepared -> commit\": {} states explored",
        checker.unique_state_count()
    );
    let path = checker
        .discovery("no participant commits while another aborts")
        .expect("the wrong rule must break atomicity");
    println!("counterexample ({} steps):", path.clone().into_actions().len());
    for (i, step) in path.clone().into_actions().into_iter().enumerate() {
        println!("  {:>2}. {step:?}", i + 1);
    }
    let last = path.last_state();
    let phases: BTreeMap<String, ParticipantPhase> = last
        .participants
        .iter()
        .map(|p| (p.shard().to_string(), p.phase()))
        .collect();
    println!("  final participant phases: {phases:?}");
}
