//! Hand-driven tests of the coordinator's three-phase path. Each names the rule it checks.

use treaty_types::ShardName;

use super::*;
use crate::participant::Report;
use crate::termination::{Ballot, Proposer, ReportedState};

const TIMEOUTS: Timeouts = Timeouts {
    transaction_ms: 10_000,
    idle_ms: 1_000,
    vote_ms: 500,
};

fn shard(name: &str) -> ShardName {
    ShardName::new(name).unwrap()
}

/// A 3PC transaction over `a` and `b` whose votes were both YES.
fn voted() -> (Transaction, Vec<Action>) {
    let mut txn = Transaction::begin(9, Protocol::ThreePhase, TIMEOUTS, 0);
    for s in ["a", "b"] {
        txn.step(Event::Enlist { shard: shard(s) }, 0).unwrap();
        txn.step(Event::ExecuteSucceeded { shard: shard(s) }, 0).unwrap();
    }
    txn.step(
        Event::CommitRequested {
            wait_for_apply: false,
        },
        0,
    )
    .unwrap();
    txn.step(
        Event::VoteReceived {
            shard: shard("a"),
            vote: Vote::Yes,
        },
        1,
    )
    .unwrap();
    let actions = txn
        .step(
            Event::VoteReceived {
                shard: shard("b"),
                vote: Vote::Yes,
            },
            1,
        )
        .unwrap();
    (txn, actions)
}

#[test]
fn all_yes_forces_the_pre_commit_record_before_any_pre_commit() {
    let (mut txn, actions) = voted();
    assert_eq!(
        actions,
        vec![Action::PersistPreCommit {
            participants: vec![shard("a"), shard("b")]
        }]
    );
    assert_eq!(txn.phase(), Phase::PreCommitting);
    let actions = txn.step(Event::PreCommitDurable, 2).unwrap();
    assert_eq!(
        actions,
        vec![
            Action::SendPreCommit {
                shard: shard("a"),
                ballot: Ballot::COORDINATOR,
                delay_ms: 0
            },
            Action::SendPreCommit {
                shard: shard("b"),
                ballot: Ballot::COORDINATOR,
                delay_ms: 0
            },
        ]
    );
}

#[test]
fn every_pre_commit_acknowledged_then_the_commit_is_logged_and_sent_as_in_2pc() {
    let (mut txn, _) = voted();
    txn.step(Event::PreCommitDurable, 2).unwrap();
    let ack = |s: &str| Event::PreCommitAcknowledged {
        shard: shard(s),
        ballot: Ballot::COORDINATOR,
    };
    assert!(txn.step(ack("a"), 3).unwrap().is_empty());
    let actions = txn.step(ack("b"), 3).unwrap();
    assert_eq!(
        actions,
        vec![Action::PersistCommit {
            participants: vec![shard("a"), shard("b")]
        }]
    );
    let actions = txn.step(Event::DecisionDurable, 4).unwrap();
    assert!(actions.contains(&Action::SendCommit {
        shard: shard("a"),
        delay_ms: 0
    }));
    assert!(actions.contains(&Action::SendCommit {
        shard: shard("b"),
        delay_ms: 0
    }));
    assert_eq!(txn.phase(), Phase::Committing);
}

#[test]
fn no_abort_once_pre_commits_are_out_a_timeout_learns_instead() {
    // Rule: once any PreCommit may have been sent, the coordinator never decides abort by itself.
    let (mut txn, _) = voted();
    txn.step(Event::PreCommitDurable, 2).unwrap();
    let actions = txn.step(Event::Tick, 10_000).unwrap();
    assert_eq!(txn.phase(), Phase::PreCommitting);
    assert!(matches!(
        actions.as_slice(),
        [Action::QueryParticipantStates { ballot, .. }] if *ballot > Ballot::COORDINATOR
    ));
}

#[test]
fn a_recovered_pre_commit_learns_and_applies_the_termination_rules() {
    let (mut txn, actions) =
        Transaction::recover_pre_committed(9, vec![shard("a"), shard("b")], 1, TIMEOUTS, 0);
    let [Action::QueryParticipantStates { ballot, shards }] = actions.as_slice() else {
        panic!("expected a query, got {actions:?}");
    };
    assert_eq!(shards, &vec![shard("a"), shard("b")]);
    assert_eq!(ballot.proposer, Proposer::Coordinator { incarnation: 1 });
    let ballot = ballot.clone();
    // Only one answer: the guard waits for every participant.
    let learned = |s: &str, state| Event::ParticipantStatesLearned {
        ballot: ballot.clone(),
        reports: vec![(shard(s), Report::State(state))],
    };
    assert!(
        txn.step(learned("a", ReportedState::PreCommitted), 1)
            .unwrap()
            .is_empty()
    );
    // One pre-committed: pre-commit the other under this ballot, then commit.
    let actions = txn.step(learned("b", ReportedState::Prepared), 1).unwrap();
    assert_eq!(
        actions,
        vec![Action::SendPreCommit {
            shard: shard("b"),
            ballot: ballot.clone(),
            delay_ms: 0
        }]
    );
    let actions = txn
        .step(
            Event::PreCommitAcknowledged {
                shard: shard("b"),
                ballot,
            },
            2,
        )
        .unwrap();
    assert_eq!(
        actions,
        vec![Action::PersistCommit {
            participants: vec![shard("a"), shard("b")]
        }]
    );
}

#[test]
fn a_recovered_pre_commit_with_everyone_merely_prepared_aborts_and_ends_its_record() {
    let (mut txn, actions) =
        Transaction::recover_pre_committed(9, vec![shard("a"), shard("b")], 1, TIMEOUTS, 0);
    let [Action::QueryParticipantStates { ballot, .. }] = actions.as_slice() else {
        panic!("expected a query, got {actions:?}");
    };
    let reports = vec![
        (shard("a"), Report::State(ReportedState::Prepared)),
        (shard("b"), Report::State(ReportedState::Prepared)),
    ];
    let actions = txn
        .step(
            Event::ParticipantStatesLearned {
                ballot: ballot.clone(),
                reports,
            },
            1,
        )
        .unwrap();
    assert_eq!(txn.phase(), Phase::Aborting);
    assert!(actions.contains(&Action::SendAbort {
        shard: shard("a"),
        delay_ms: 0
    }));
    txn.step(Event::Acknowledged { shard: shard("a") }, 2).unwrap();
    let actions = txn.step(Event::Acknowledged { shard: shard("b") }, 2).unwrap();
    assert_eq!(actions, vec![Action::PersistEnd, Action::Finished]);
}

#[test]
fn a_refused_query_makes_the_next_round_go_higher() {
    let (mut txn, actions) =
        Transaction::recover_pre_committed(9, vec![shard("a"), shard("b")], 1, TIMEOUTS, 0);
    let [Action::QueryParticipantStates { ballot, .. }] = actions.as_slice() else {
        panic!("expected a query, got {actions:?}");
    };
    let leader = Ballot {
        round: 7,
        proposer: Proposer::Participant(shard("a")),
    };
    let reports = vec![(
        shard("a"),
        Report::Refused {
            promised: leader.clone(),
        },
    )];
    txn.step(
        Event::ParticipantStatesLearned {
            ballot: ballot.clone(),
            reports,
        },
        1,
    )
    .unwrap();
    let actions = txn.step(Event::Tick, 10_000).unwrap();
    let [Action::QueryParticipantStates { ballot, .. }] = actions.as_slice() else {
        panic!("expected a new query, got {actions:?}");
    };
    assert!(*ballot > leader);
}
