//! Model checking of two-phase commit with the decision in the first branch
//! (`coordinator/decision_branch.rs`, `--decision-store shard`): two coordinators racing to decide
//! one transaction. The original coordinator runs the real [`Transaction`] (three shards `a`, `b`,
//! `c`; `a` is the decision branch; every statement done, the client asked to commit) and its
//! answers pass through the real `answers::vote`, `answers::decision_written` and
//! `answers::decision_read`. A second coordinator (another instance, a recovering one, an
//! operator) may at any time conclude for the transaction: insert an abort row unless there is a
//! row, read the row, then drive phase two from it, shard by shard (row = commit: COMMIT PREPARED
//! every prepared branch; row = abort: ROLLBACK every prepared or active branch).
//!
//! PostgreSQL is played by the participant rules below: the decision row in `treaty.decisions`
//! (primary key = the GID, so the first row to commit stays), each branch's state (active,
//! prepared, committed, aborted), and the decision branch rolled back while active (idle timeout,
//! crashed backend). Messages in flight form a set: any may be delivered in any order, and up to
//! `max_losses` may be lost (a lost request or answer is an RPC error to the machine, as the
//! driver reports it). The original coordinator may crash at any point and then sends nothing
//! more; its vote timeout may fire while it prepares. Bounds that keep the space finite: at most
//! two losses, one crash, one conclude by the second coordinator, each message delivered once.
//!
//! Checked exhaustively (BFS), always: atomicity (no committed branch beside an aborted branch
//! that had prepared or is the decision branch), the row never changes once set, COMMIT PREPARED
//! is applied only when the row says commit, no phase-two message finds its branch decided the
//! other way, and the client's answer matches the row (Committed → commit row, Aborted → no
//! commit row). Sometimes: both outcomes, the race "the second coordinator concludes abort while
//! the original prepares, the original hears Refused and replies Aborted", and a lost commit answer
//! read back as commit. The tests at the end break one rule each and show a property fails.

use std::collections::BTreeSet;

use stateright::{Checker, Model, Property};
use treaty_commit_protocol::answers;
use treaty_commit_protocol::transport::{DecisionWrite, StoredDecision, StoredOutcome, VoteAnswer};
use treaty_commit_protocol::{Action, Event, LinkError, Outcome, Phase, Protocol, Timeouts, Transaction};
use treaty_types::{CoordinatorId, Gid, ShardName};

const TXID: u64 = 1;
const SHARDS: [&str; 3] = ["a", "b", "c"];
/// The decision branch: the first one enlisted.
const DECIDER: usize = 0;
const TIMEOUTS: Timeouts = Timeouts {
    transaction_ms: 1_000_000,
    idle_ms: 1_000_000,
    vote_ms: 100,
};

/// A rule deliberately broken, to show that the properties catch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    /// The decision branch commits its commit row even when an abort row is there.
    CommitIgnoresAbortRow,
    /// The driver reads a decision without a clear answer as abort (instead of reading it back).
    UnknownMeansAbort,
}

#[derive(Clone, Copy, Debug)]
struct RaceModel {
    max_losses: u8,
    fault: Fault,
}

fn shard(i: usize) -> ShardName {
    ShardName::new(SHARDS[i]).expect("valid shard name")
}

fn index_of(name: &ShardName) -> usize {
    SHARDS
        .iter()
        .position(|s| *s == name.as_str())
        .expect("model shard names are a, b, c")
}

fn gid() -> Gid {
    let coordinator = CoordinatorId::new("c1").expect("valid coordinator id");
    Gid::with_decision_shard(&coordinator, TXID, &shard(DECIDER)).expect("short gid")
}

/// A branch as PostgreSQL holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Branch {
    Active,
    Prepared,
    Committed,
    Aborted,
}

/// The row in `treaty.decisions` for this transaction's GID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Row {
    Commit,
    Abort,
}

/// What the decision branch answers to `CommitDecision`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Written {
    Committed,
    /// An abort row was there: the insert failed and the branch rolled back.
    NotCommitted,
    /// No row, and the branch was no longer there (rolled back): an error, the answer unknown.
    BranchGone,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Msg {
    Prepare { to: usize },
    Vote { from: usize, yes: bool },
    CommitDecision,
    DecisionWritten(Written),
    Conclude,
    Concluded(Row),
    Commit { to: usize },
    Abort { to: usize },
    Ack { from: usize },
}

impl Msg {
    /// An answer to the original coordinator (dropped when it crashes).
    fn to_coordinator(&self) -> bool {
        matches!(
            self,
            Msg::Vote { .. } | Msg::DecisionWritten(_) | Msg::Concluded(_) | Msg::Ack { .. }
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct State {
    /// The original coordinator's machine (frozen once it crashed).
    coordinator: Transaction,
    crashed: bool,
    branches: [Branch; 3],
    /// Which branches ever prepared.
    prepared: [bool; 3],
    row: Option<Row>,
    /// The first row that committed (the row must stay it).
    first_row: Option<Row>,
    network: BTreeSet<Msg>,
    losses: u8,
    /// The client's answer: `Some(true)` Committed, `Some(false)` Aborted.
    replied: Option<bool>,
    /// The second coordinator: the row it read when it concluded (at most once), and the shards
    /// it drove phase two on since.
    second: Option<Row>,
    driven: [bool; 3],
    /// A COMMIT PREPARED was applied while the row did not say commit.
    committed_without_row: bool,
    /// A phase-two message found its branch decided the other way.
    contradicted: bool,
    /// The second coordinator inserted the abort row while the original was preparing.
    concluded_while_preparing: bool,
    /// The original machine was fed `DecisionRefused` / `DecisionUnknown`.
    heard_refused: bool,
    heard_unknown: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Step {
    Deliver(Msg),
    Lose(Msg),
    /// The original coordinator crashes: it sends nothing more, its answers are dropped.
    Crash,
    /// The original coordinator's vote timeout fires.
    VoteTimeout,
    /// The second coordinator inserts an abort row unless there is a row, and reads the row.
    SecondConcludes,
    /// The second coordinator applies the row to one shard's branch.
    SecondDrives(usize),
    /// The decision branch is rolled back while active (idle timeout, crashed backend).
    DecisionBranchLost,
}

impl RaceModel {
    fn perform(&self, state: &mut State, actions: Vec<Action>) {
        for action in actions {
            let msg = match action {
                Action::SendPrepare { shards } => {
                    for s in shards {
                        state.network.insert(Msg::Prepare { to: index_of(&s) });
                    }
                    continue;
                }
                Action::CommitDecision {
                    shard, standalone, ..
                } => {
                    assert_eq!((index_of(&shard), standalone), (DECIDER, false));
                    Msg::CommitDecision
                }
                Action::ConcludeDecision { shard, .. } => {
                    assert_eq!(index_of(&shard), DECIDER);
                    Msg::Conclude
                }
                Action::SendCommit { shard, .. } => Msg::Commit { to: index_of(&shard) },
                Action::SendAbort { shard, .. } => Msg::Abort { to: index_of(&shard) },
                Action::Reply(outcome) => {
                    let committed = match outcome {
                        Outcome::Committed => true,
                        Outcome::Aborted(_) => false,
                        Outcome::Unknown(error) => panic!("a 2PC reply cannot be unknown: {error}"),
                    };
                    assert!(state.replied.is_none(), "the client is answered once");
                    state.replied = Some(committed);
                    continue;
                }
                Action::PersistEnd | Action::Finished => continue,
                other => panic!("unexpected action with the decision in a branch: {other:?}"),
            };
            state.network.insert(msg);
        }
    }

    fn feed(&self, state: &mut State, event: Event) {
        if state.crashed {
            return;
        }
        let event = match event {
            Event::DecisionUnknown { .. } if self.fault == Fault::UnknownMeansAbort => {
                answers::decision_written(
                    &shard(DECIDER),
                    Ok(DecisionWrite::NotCommitted {
                        message: "read as abort".into(),
                    }),
                )
            }
            event => event,
        };
        match &event {
            Event::DecisionRefused { .. } => state.heard_refused = true,
            Event::DecisionUnknown { .. } => state.heard_unknown = true,
            _ => {}
        }
        let now_ms = match event {
            Event::Tick => state.coordinator.next_deadline_ms().unwrap_or_default(),
            _ => 0,
        };
        // The model sends no client request after the commit, so nothing can be refused.
        let actions = state.coordinator.step(event, now_ms).unwrap_or_default();
        self.perform(state, actions);
    }

    /// `INSERT ... ON CONFLICT DO NOTHING`: the first row stays.
    fn insert_row(state: &mut State, row: Row) {
        if state.row.is_none() {
            state.row = Some(row);
        }
        state.first_row = state.first_row.or(state.row);
    }

    /// COMMIT PREPARED on `at`: true when the branch is (now) committed.
    fn commit_prepared(state: &mut State, at: usize) -> bool {
        match state.branches[at] {
            Branch::Prepared => {
                state.committed_without_row |= state.row != Some(Row::Commit);
                state.branches[at] = Branch::Committed;
                true
            }
            Branch::Committed => true,
            Branch::Aborted => {
                state.contradicted = true;
                false
            }
            Branch::Active => false,
        }
    }

    /// ROLLBACK (PREPARED) on `at`: true when the branch is (now) rolled back.
    fn roll_back(state: &mut State, at: usize) -> bool {
        match state.branches[at] {
            Branch::Active | Branch::Prepared | Branch::Aborted => {
                state.branches[at] = Branch::Aborted;
                true
            }
            Branch::Committed => {
                state.contradicted = true;
                false
            }
        }
    }

    /// A participant (PostgreSQL) takes a request.
    fn deliver_request(&self, state: &mut State, msg: Msg) {
        let answer = match msg {
            Msg::Prepare { to } => {
                let yes = state.branches[to] == Branch::Active;
                if yes {
                    state.branches[to] = Branch::Prepared;
                    state.prepared[to] = true;
                }
                Msg::Vote { from: to, yes }
            }
            Msg::CommitDecision => Msg::DecisionWritten(match (state.branches[DECIDER], state.row) {
                (Branch::Active, Some(_)) if self.fault == Fault::CommitIgnoresAbortRow => {
                    state.row = Some(Row::Commit);
                    state.branches[DECIDER] = Branch::Committed;
                    Written::Committed
                }
                (Branch::Active, None) => {
                    Self::insert_row(state, Row::Commit);
                    state.branches[DECIDER] = Branch::Committed;
                    Written::Committed
                }
                // The insert meets the abort row: the branch (if still there) rolls back. An
                // error instead is the same as this answer lost, which the model also explores.
                (branch, Some(_)) => {
                    if branch == Branch::Active {
                        state.branches[DECIDER] = Branch::Aborted;
                    }
                    Written::NotCommitted
                }
                (_, None) => Written::BranchGone,
            }),
            Msg::Conclude => {
                Self::insert_row(state, Row::Abort);
                Msg::Concluded(state.row.expect("concluded"))
            }
            Msg::Commit { to } => {
                if !Self::commit_prepared(state, to) {
                    return; // refused: the coordinator would retry forever, the flags tell
                }
                Msg::Ack { from: to }
            }
            Msg::Abort { to } => {
                if !Self::roll_back(state, to) {
                    return;
                }
                Msg::Ack { from: to }
            }
            answer => unreachable!("{answer:?} is not a request"),
        };
        if !state.crashed {
            state.network.insert(answer);
        }
    }

    /// The original coordinator's driver turns an answer into the machine's event.
    fn deliver_answer(&self, state: &mut State, msg: Msg) {
        let event = match msg {
            Msg::Vote { from, yes } => {
                let answer = if yes {
                    Ok(VoteAnswer::Yes)
                } else {
                    Err(LinkError::BranchLost("rolled back".into()))
                };
                Event::VoteReceived {
                    shard: shard(from),
                    vote: answers::vote(&shard(from), answer, Protocol::TwoPhase),
                }
            }
            Msg::DecisionWritten(written) => {
                let result = match written {
                    Written::Committed => Ok(DecisionWrite::Committed),
                    Written::NotCommitted => Ok(DecisionWrite::NotCommitted {
                        message: "duplicate key: an abort row is there".into(),
                    }),
                    Written::BranchGone => Err(LinkError::BranchLost("rolled back".into())),
                };
                answers::decision_written(&shard(DECIDER), result)
            }
            Msg::Concluded(row) => {
                let stored = StoredDecision {
                    gid: gid(),
                    outcome: Some(match row {
                        Row::Commit => StoredOutcome::Commit,
                        Row::Abort => StoredOutcome::Abort,
                    }),
                    participants: Vec::new(),
                    decided_at_ms: 0,
                };
                answers::decision_read(&shard(DECIDER), &gid(), Ok(vec![stored]))
            }
            Msg::Ack { from } => answers::phase_two(&shard(from), Ok(())),
            request => unreachable!("{request:?} is not an answer"),
        };
        self.feed(state, event);
    }

    /// A lost request or answer is an RPC error at the original coordinator; a lost vote is
    /// noticed by the vote timeout.
    fn lose(&self, state: &mut State, msg: Msg) {
        let error = || LinkError::TimedOut { after_ms: 1 };
        let event = match msg {
            Msg::Prepare { .. } | Msg::Vote { .. } => return,
            Msg::CommitDecision | Msg::DecisionWritten(_) => {
                answers::decision_written(&shard(DECIDER), Err(error()))
            }
            Msg::Conclude | Msg::Concluded(_) => {
                answers::decision_read(&shard(DECIDER), &gid(), Err(error()))
            }
            Msg::Commit { to: at } | Msg::Abort { to: at } | Msg::Ack { from: at } => {
                answers::phase_two(&shard(at), Err(error()))
            }
        };
        self.feed(state, event);
    }
}

fn any_committed(state: &State) -> bool {
    state.branches.contains(&Branch::Committed)
}

/// An aborted branch whose abort matters: it had prepared, or it is the decision branch.
fn aborted_after_voting(state: &State) -> bool {
    (0..SHARDS.len()).any(|i| state.branches[i] == Branch::Aborted && (state.prepared[i] || i == DECIDER))
}

fn all(state: &State, branch: Branch) -> bool {
    state.branches.iter().all(|b| *b == branch)
}

impl Model for RaceModel {
    type State = State;
    type Action = Step;

    fn init_states(&self) -> Vec<State> {
        let mut machine = Transaction::begin(TXID, Protocol::TwoPhase, TIMEOUTS, 0);
        machine.set_decision_in_branch();
        for i in 0..SHARDS.len() {
            machine
                .step(Event::Enlist { shard: shard(i) }, 0)
                .expect("enlist");
            machine
                .step(Event::ExecuteSucceeded { shard: shard(i) }, 0)
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
            coordinator: machine,
            crashed: false,
            branches: [Branch::Active; 3],
            prepared: [false; 3],
            row: None,
            first_row: None,
            network: BTreeSet::new(),
            losses: 0,
            replied: None,
            second: None,
            driven: [false; 3],
            committed_without_row: false,
            contradicted: false,
            concluded_while_preparing: false,
            heard_refused: false,
            heard_unknown: false,
        };
        self.perform(&mut state, actions);
        vec![state]
    }

    fn actions(&self, state: &State, actions: &mut Vec<Step>) {
        for msg in &state.network {
            actions.push(Step::Deliver(msg.clone()));
            if state.losses < self.max_losses {
                actions.push(Step::Lose(msg.clone()));
            }
        }
        if !state.crashed {
            actions.push(Step::Crash);
            if state.coordinator.phase() == Phase::Preparing {
                actions.push(Step::VoteTimeout);
            }
        }
        match state.second {
            None => actions.push(Step::SecondConcludes),
            Some(_) => {
                for at in (0..SHARDS.len()).filter(|at| !state.driven[*at]) {
                    actions.push(Step::SecondDrives(at));
                }
            }
        }
        if state.branches[DECIDER] == Branch::Active {
            actions.push(Step::DecisionBranchLost);
        }
    }

    fn next_state(&self, last: &State, step: Step) -> Option<State> {
        let mut state = last.clone();
        match step {
            Step::Deliver(msg) => {
                state.network.remove(&msg);
                if msg.to_coordinator() {
                    self.deliver_answer(&mut state, msg);
                } else {
                    self.deliver_request(&mut state, msg);
                }
            }
            Step::Lose(msg) => {
                state.network.remove(&msg);
                state.losses += 1;
                self.lose(&mut state, msg);
            }
            Step::Crash => {
                state.crashed = true;
                state.network.retain(|m| !m.to_coordinator());
            }
            Step::VoteTimeout => self.feed(&mut state, Event::Tick),
            Step::SecondConcludes => {
                state.concluded_while_preparing =
                    state.row.is_none() && !state.crashed && state.coordinator.phase() == Phase::Preparing;
                Self::insert_row(&mut state, Row::Abort);
                state.second = state.row;
            }
            Step::SecondDrives(at) => {
                state.driven[at] = true;
                match state.second? {
                    Row::Commit if state.branches[at] == Branch::Prepared => {
                        Self::commit_prepared(&mut state, at);
                    }
                    Row::Abort if matches!(state.branches[at], Branch::Active | Branch::Prepared) => {
                        Self::roll_back(&mut state, at);
                    }
                    _ => {}
                }
            }
            Step::DecisionBranchLost => state.branches[DECIDER] = Branch::Aborted,
        }
        Some(state)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(
                "no branch commits beside an aborted one that voted or decides",
                |_, state: &State| !(any_committed(state) && aborted_after_voting(state)),
            ),
            Property::always("the decision row never changes once set", |_, state: &State| {
                state.row == state.first_row
            }),
            Property::always(
                "COMMIT PREPARED is applied only when the row says commit",
                |_, state: &State| !state.committed_without_row,
            ),
            Property::always(
                "no phase-two message finds its branch decided the other way",
                |_, state: &State| !state.contradicted,
            ),
            Property::always("a Committed reply has a commit row", |_, state: &State| {
                state.replied != Some(true) || state.row == Some(Row::Commit)
            }),
            Property::always("an Aborted reply has no commit row", |_, state: &State| {
                state.replied != Some(false) || state.row != Some(Row::Commit)
            }),
            Property::sometimes("a transaction can commit", |_, state: &State| {
                all(state, Branch::Committed) && state.replied == Some(true)
            }),
            Property::sometimes("a transaction can abort", |_, state: &State| {
                all(state, Branch::Aborted) && state.replied == Some(false)
            }),
            Property::sometimes(
                "a second coordinator concludes abort while the original prepares: Refused, Aborted",
                |_, state: &State| {
                    state.concluded_while_preparing && state.heard_refused && state.replied == Some(false)
                },
            ),
            Property::sometimes(
                "a lost commit answer is read back as commit",
                |_, state: &State| state.heard_unknown && state.replied == Some(true),
            ),
        ]
    }
}

fn explore(name: &str, model: RaceModel) -> impl Checker<RaceModel> + use<> {
    let started = std::time::Instant::now();
    let checker = model.checker().spawn_bfs().join();
    println!(
        "{name}: {} states explored ({} generated) in {:.1?}",
        checker.unique_state_count(),
        checker.state_count(),
        started.elapsed()
    );
    checker
}

#[test]
fn two_coordinators_racing_to_decide_one_transaction() {
    let model = RaceModel {
        max_losses: 2,
        fault: Fault::None,
    };
    explore("decision in a branch, 3 shards, 2 losses", model).assert_properties();
}

/// A broken rule must be caught: `property` gets a counterexample.
fn caught(fault: Fault, property: &'static str) {
    let model = RaceModel { max_losses: 1, fault };
    let checker = explore(&format!("{fault:?}"), model);
    let path = checker
        .discovery(property)
        .unwrap_or_else(|| panic!("{fault:?} must break \"{property}\""));
    println!("counterexample ({} steps):", path.clone().into_actions().len());
    for (i, step) in path.into_actions().into_iter().enumerate() {
        println!("  {:>2}. {step:?}", i + 1);
    }
}

#[test]
fn a_commit_row_over_an_abort_row_is_caught() {
    caught(
        Fault::CommitIgnoresAbortRow,
        "the decision row never changes once set",
    );
}

#[test]
fn an_unknown_decision_read_as_abort_is_caught() {
    caught(Fault::UnknownMeansAbort, "an Aborted reply has no commit row");
}
