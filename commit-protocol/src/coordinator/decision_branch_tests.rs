//! Tests of two-phase commit with the decision in the first branch (`decision_branch.rs`). Each
//! test names the rule it checks.

use treaty_types::ShardName;

use super::tests::{TIMEOUTS, shard, step, vote};
use super::*;

fn shards(names: &[&str]) -> Vec<ShardName> {
    names.iter().map(|n| shard(n)).collect()
}

/// A transaction deciding in its first branch that ran one statement on each named shard.
fn active(names: &[&str]) -> Transaction {
    let mut txn = Transaction::begin(7, Protocol::TwoPhase, TIMEOUTS, 0);
    txn.set_decision_in_branch();
    for s in names {
        txn.step(Event::Enlist { shard: shard(s) }, 0).unwrap();
        txn.step(Event::ExecuteSucceeded { shard: shard(s) }, 0).unwrap();
    }
    txn
}

fn commit(txn: &mut Transaction) -> Vec<Action> {
    step(
        txn,
        Event::CommitRequested {
            wait_for_apply: false,
        },
    )
}

/// Three shards, `a` the decision branch, `b` and `c` voted YES: the decision is being committed.
fn deciding() -> Transaction {
    let mut txn = active(&["a", "b", "c"]);
    commit(&mut txn);
    vote(&mut txn, "b", Vote::Yes);
    vote(&mut txn, "c", Vote::Yes);
    assert_eq!(txn.phase(), Phase::LoggingCommit);
    txn
}

#[test]
fn the_first_branch_is_the_decision_branch_and_is_never_asked_to_prepare() {
    let mut txn = active(&["a", "b", "c"]);
    assert_eq!(txn.decision_shard(), Some(&shard("a")));
    let actions = commit(&mut txn);
    assert_eq!(
        actions,
        vec![Action::SendPrepare {
            shards: shards(&["b", "c"])
        }]
    );
    assert_eq!(txn.branches()[0].phase, BranchPhase::Active);
}

#[test]
fn three_phase_transactions_keep_their_decision_in_the_store() {
    let mut txn = Transaction::begin(7, Protocol::ThreePhase, TIMEOUTS, 0);
    txn.set_decision_in_branch();
    txn.step(Event::Enlist { shard: shard("a") }, 0).unwrap();
    assert_eq!(txn.decision_shard(), None);
}

#[test]
fn once_every_other_branch_voted_yes_the_decision_branch_commits_the_decision() {
    let mut txn = active(&["a", "b", "c"]);
    commit(&mut txn);
    assert!(vote(&mut txn, "b", Vote::Yes).is_empty());
    let actions = vote(&mut txn, "c", Vote::Yes);
    assert_eq!(
        actions,
        vec![Action::CommitDecision {
            shard: shard("a"),
            participants: shards(&["b", "c"]),
            standalone: false,
        }]
    );
    // Nothing is sent to the prepared branches and the client hears nothing until it commits.
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::SendCommit { .. } | Action::Reply(_)))
    );
}

#[test]
fn the_committed_decision_commits_the_prepared_branches_and_answers_the_client() {
    let mut txn = deciding();
    let actions = step(&mut txn, Event::DecisionDurable);
    assert!(actions.contains(&Action::Reply(Outcome::Committed)));
    for s in ["b", "c"] {
        assert!(actions.contains(&Action::SendCommit {
            shard: shard(s),
            delay_ms: 0
        }));
    }
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::SendCommit { shard, .. } if shard.as_str() == "a"))
    );
    assert_eq!(txn.branches()[0].phase, BranchPhase::Committed);
    assert_eq!(txn.phase(), Phase::Committing);
    step(&mut txn, Event::Acknowledged { shard: shard("b") });
    let actions = step(&mut txn, Event::Acknowledged { shard: shard("c") });
    assert!(actions.contains(&Action::PersistEnd));
    assert_eq!(txn.phase(), Phase::Committed);
}

#[test]
fn a_refused_decision_aborts_the_prepared_branches_and_the_client_hears_aborted() {
    // Rule: an abort row won (or the COMMIT failed): the decision branch rolled back, the others
    // roll back their prepared branches.
    let mut txn = deciding();
    let reason = AbortReason::new(AbortCause::ConcludedAbort, "abort row first");
    let actions = step(
        &mut txn,
        Event::DecisionRefused {
            reason: reason.clone(),
        },
    );
    assert!(actions.contains(&Action::Reply(Outcome::Aborted(reason.clone()))));
    for s in ["b", "c"] {
        assert!(actions.contains(&Action::SendAbort {
            shard: shard(s),
            delay_ms: 0
        }));
    }
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::SendAbort { shard, .. } if shard.as_str() == "a"))
    );
    assert_eq!(txn.phase(), Phase::Aborting);
    assert!(reason.retryable);
}

#[test]
fn no_clear_answer_reads_the_decision_back_and_never_decides_abort_alone() {
    // Rule: the decision branch may have committed; only the decision row can tell.
    let mut txn = deciding();
    let actions = step(
        &mut txn,
        Event::DecisionUnknown {
            error: "connection reset".into(),
        },
    );
    assert_eq!(
        actions,
        vec![Action::ConcludeDecision {
            shard: shard("a"),
            delay_ms: 0
        }]
    );
    // Failures to read keep asking, with backoff; time passing decides nothing.
    let actions = step(
        &mut txn,
        Event::DecisionUnknown {
            error: "unavailable".into(),
        },
    );
    assert!(matches!(actions.as_slice(), [Action::ConcludeDecision { delay_ms, .. }] if *delay_ms > 0));
    assert!(txn.step(Event::Tick, 1_000_000).unwrap().is_empty());
    assert_eq!(txn.phase(), Phase::LoggingCommit);
    assert!(
        txn.step(
            Event::HeuristicAbort {
                reason: AbortReason::new(AbortCause::Heuristic, "op")
            },
            2
        )
        .is_err()
    );
    // A commit row read back commits.
    let actions = step(&mut txn, Event::DecisionLearned { commit: true });
    assert!(actions.contains(&Action::Reply(Outcome::Committed)));
    assert_eq!(txn.phase(), Phase::Committing);
}

#[test]
fn an_abort_row_read_back_aborts() {
    let mut txn = deciding();
    step(
        &mut txn,
        Event::DecisionUnknown {
            error: "reset".into(),
        },
    );
    let actions = step(&mut txn, Event::DecisionLearned { commit: false });
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::Reply(Outcome::Aborted(AbortReason {
            cause: AbortCause::ConcludedAbort,
            ..
        }))
    )));
    assert_eq!(txn.phase(), Phase::Aborting);
    // The CommitDecision may never have arrived: the decision branch may still be open, and is
    // rolled back like the prepared ones (found by the simulation, seed 1769).
    for s in ["a", "b", "c"] {
        assert!(
            actions.contains(&Action::SendAbort {
                shard: shard(s),
                delay_ms: 0
            }),
            "{s}: {actions:?}"
        );
    }
}

#[test]
fn with_every_other_branch_read_only_the_decision_branch_commits_in_one_phase() {
    let mut txn = active(&["a", "b"]);
    commit(&mut txn);
    let actions = vote(&mut txn, "b", Vote::ReadOnly);
    assert_eq!(actions, vec![Action::CommitOnePhase { shard: shard("a") }]);
    assert_eq!(txn.phase(), Phase::CommittingOnePhase);
    let actions = step(&mut txn, Event::OnePhaseCommitted);
    assert!(actions.contains(&Action::Reply(Outcome::Committed)));
}

#[test]
fn a_no_vote_aborts_the_open_decision_branch_too() {
    let mut txn = active(&["a", "b"]);
    commit(&mut txn);
    let actions = vote(
        &mut txn,
        "b",
        Vote::No(AbortReason::new(AbortCause::VoteNo, "no")),
    );
    assert!(actions.contains(&Action::SendAbort {
        shard: shard("a"),
        delay_ms: 0
    }));
}

#[test]
fn a_decision_branch_that_voted_early_stays_prepared_and_the_row_is_written_standalone() {
    let mut txn = active(&["a", "b"]);
    for s in ["a", "b"] {
        step(
            &mut txn,
            Event::VoteCastEarly {
                shard: shard(s),
                vote: Vote::Yes,
                named: Vec::new(),
            },
        );
    }
    let actions = commit(&mut txn);
    assert_eq!(
        actions,
        vec![Action::CommitDecision {
            shard: shard("a"),
            participants: shards(&["a", "b"]),
            standalone: true,
        }]
    );
    let actions = step(&mut txn, Event::DecisionDurable);
    for s in ["a", "b"] {
        assert!(actions.contains(&Action::SendCommit {
            shard: shard(s),
            delay_ms: 0
        }));
    }
}

#[test]
fn late_decision_events_change_nothing_once_decided() {
    let mut txn = deciding();
    step(&mut txn, Event::DecisionDurable);
    let before = txn.clone();
    for event in [
        Event::DecisionRefused {
            reason: AbortReason::new(AbortCause::ConcludedAbort, "late"),
        },
        Event::DecisionUnknown { error: "late".into() },
        Event::DecisionLearned { commit: false },
    ] {
        assert!(step(&mut txn, event).is_empty());
    }
    assert_eq!(txn, before);
}
