//! Hand-driven tests of every transition of the protocol state machine. Each test names the rule
//! it checks.

use treaty_types::ShardName;

use super::*;

pub(super) const TIMEOUTS: Timeouts = Timeouts {
    transaction_ms: 10_000,
    idle_ms: 1_000,
    vote_ms: 500,
};

pub(super) fn shard(name: &str) -> ShardName {
    ShardName::new(name).unwrap()
}

fn reason(cause: AbortCause) -> AbortReason {
    AbortReason::new(cause, "test")
}

/// A transaction that ran one statement on each named shard.
fn active(shards: &[&str]) -> Transaction {
    let mut txn = Transaction::begin(7, Protocol::TwoPhase, TIMEOUTS, 0);
    for s in shards {
        txn.step(Event::Enlist { shard: shard(s) }, 0).unwrap();
        txn.step(Event::ExecuteSucceeded { shard: shard(s) }, 0).unwrap();
    }
    txn
}

pub(super) fn step(txn: &mut Transaction, event: Event) -> Vec<Action> {
    txn.step(event, 1).unwrap()
}

pub(super) fn vote(txn: &mut Transaction, s: &str, vote: Vote) -> Vec<Action> {
    step(
        txn,
        Event::VoteReceived {
            shard: shard(s),
            vote,
        },
    )
}

/// Drives a two-shard transaction up to a durable commit decision.
fn decided_commit(wait_for_apply: bool) -> Transaction {
    let mut txn = active(&["a", "b"]);
    step(&mut txn, Event::CommitRequested { wait_for_apply });
    vote(&mut txn, "a", Vote::Yes);
    vote(&mut txn, "b", Vote::Yes);
    step(&mut txn, Event::DecisionDurable);
    txn
}

#[test]
fn enlist_adds_each_shard_once() {
    let mut txn = active(&["a", "b", "a"]);
    assert_eq!(txn.branches().len(), 2);
    assert_eq!(txn.phase(), Phase::Active);
    assert!(step(&mut txn, Event::Enlist { shard: shard("c") }).is_empty());
    assert_eq!(txn.branches()[2].phase, BranchPhase::Active);
}

#[test]
fn commit_with_no_statements_commits_at_once() {
    let mut txn = active(&[]);
    let actions = step(
        &mut txn,
        Event::CommitRequested {
            wait_for_apply: false,
        },
    );
    assert_eq!(actions, vec![Action::Reply(Outcome::Committed), Action::Finished]);
    assert_eq!(txn.phase(), Phase::Committed);
}

#[test]
fn one_writer_commits_in_one_phase_without_logging() {
    // Rule: a transaction that touched one shard commits with a plain COMMIT and logs nothing.
    let mut txn = active(&["a"]);
    let actions = step(
        &mut txn,
        Event::CommitRequested {
            wait_for_apply: false,
        },
    );
    assert_eq!(actions, vec![Action::CommitOnePhase { shard: shard("a") }]);
    assert_eq!(txn.phase(), Phase::CommittingOnePhase);
    let actions = step(&mut txn, Event::OnePhaseCommitted);
    assert_eq!(actions, vec![Action::Reply(Outcome::Committed), Action::Finished]);
    assert_eq!(txn.phase(), Phase::Committed);
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::PersistCommit { .. } | Action::PersistEnd))
    );
}

#[test]
fn one_phase_failure_and_lost_answer() {
    let mut txn = active(&["a"]);
    step(
        &mut txn,
        Event::CommitRequested {
            wait_for_apply: false,
        },
    );
    let failed = reason(AbortCause::StatementFailed);
    let actions = step(
        &mut txn,
        Event::OnePhaseFailed {
            reason: failed.clone(),
        },
    );
    assert_eq!(
        actions,
        vec![Action::Reply(Outcome::Aborted(failed)), Action::Finished]
    );
    assert_eq!(txn.phase(), Phase::Aborted);

    let mut txn = active(&["a"]);
    step(
        &mut txn,
        Event::CommitRequested {
            wait_for_apply: false,
        },
    );
    let actions = step(
        &mut txn,
        Event::OnePhaseUnknown {
            error: "reset".into(),
        },
    );
    assert_eq!(
        actions,
        vec![Action::Reply(Outcome::Unknown("reset".into())), Action::Finished]
    );
    assert_eq!(txn.phase(), Phase::OutcomeUnknown);
    assert!(matches!(
        txn.step(
            Event::CommitRequested {
                wait_for_apply: false
            },
            2
        ),
        Err(ProtocolError::OutcomeUnknown { .. })
    ));
}

#[test]
fn commit_sends_prepare_to_every_participant_at_once() {
    let mut txn = active(&["a", "b", "c"]);
    let actions = step(
        &mut txn,
        Event::CommitRequested {
            wait_for_apply: false,
        },
    );
    assert_eq!(
        actions,
        vec![Action::SendPrepare {
            shards: vec![shard("a"), shard("b"), shard("c")]
        }]
    );
    assert_eq!(txn.phase(), Phase::Preparing);
    assert!(txn.branches().iter().all(|b| b.phase == BranchPhase::Preparing));
}

#[test]
fn decision_is_logged_only_after_every_yes_vote() {
    let mut txn = active(&["a", "b"]);
    step(
        &mut txn,
        Event::CommitRequested {
            wait_for_apply: false,
        },
    );
    assert!(vote(&mut txn, "a", Vote::Yes).is_empty());
    assert_eq!(txn.phase(), Phase::Preparing);
    let actions = vote(&mut txn, "b", Vote::Yes);
    assert_eq!(
        actions,
        vec![Action::PersistCommit {
            participants: vec![shard("a"), shard("b")]
        }]
    );
    assert_eq!(txn.phase(), Phase::LoggingCommit);
}

#[test]
fn client_is_answered_once_the_decision_is_durable() {
    // Rule: Commit returns once the commit decision is durable; phase two continues after.
    let mut txn = active(&["a", "b"]);
    step(
        &mut txn,
        Event::CommitRequested {
            wait_for_apply: false,
        },
    );
    vote(&mut txn, "a", Vote::Yes);
    vote(&mut txn, "b", Vote::Yes);
    let actions = step(&mut txn, Event::DecisionDurable);
    assert_eq!(
        actions,
        vec![
            Action::SendCommit {
                shard: shard("a"),
                delay_ms: 0
            },
            Action::SendCommit {
                shard: shard("b"),
                delay_ms: 0
            },
            Action::Reply(Outcome::Committed),
        ]
    );
    assert_eq!(txn.phase(), Phase::Committing);
    assert!(txn.phase().is_in_doubt());
}

#[test]
fn phase_two_finishes_with_a_lazy_end_record() {
    let mut txn = decided_commit(false);
    assert!(step(&mut txn, Event::Acknowledged { shard: shard("a") }).is_empty());
    let actions = step(&mut txn, Event::Acknowledged { shard: shard("b") });
    assert_eq!(actions, vec![Action::PersistEnd, Action::Finished]);
    assert_eq!(txn.phase(), Phase::Committed);
    assert!(txn.branches().iter().all(|b| b.phase == BranchPhase::Committed));
}

#[test]
fn wait_for_apply_answers_after_every_acknowledgement() {
    let mut txn = decided_commit(true);
    assert_eq!(txn.phase(), Phase::Committing);
    assert!(step(&mut txn, Event::Acknowledged { shard: shard("a") }).is_empty());
    let actions = step(&mut txn, Event::Acknowledged { shard: shard("b") });
    assert_eq!(
        actions,
        vec![
            Action::PersistEnd,
            Action::Reply(Outcome::Committed),
            Action::Finished
        ]
    );
}

#[test]
fn duplicate_acknowledgement_is_ignored() {
    let mut txn = decided_commit(false);
    step(&mut txn, Event::Acknowledged { shard: shard("a") });
    assert!(step(&mut txn, Event::Acknowledged { shard: shard("a") }).is_empty());
    assert_eq!(txn.phase(), Phase::Committing);
}

#[test]
fn failed_commit_is_retried_with_growing_backoff() {
    let mut txn = decided_commit(false);
    let first = step(
        &mut txn,
        Event::PhaseTwoFailed {
            shard: shard("a"),
            error: "down".into(),
        },
    );
    let second = step(
        &mut txn,
        Event::PhaseTwoFailed {
            shard: shard("a"),
            error: "down".into(),
        },
    );
    let delay = |actions: &[Action]| match actions {
        [Action::SendCommit { delay_ms, .. }] => *delay_ms,
        other => panic!("expected one SendCommit, got {other:?}"),
    };
    assert!(delay(&second) > delay(&first));
    assert_eq!(txn.branches()[0].attempts, 3);
    assert_eq!(txn.branches()[0].last_error.as_deref(), Some("down"));
    // A later acknowledgement clears the error and finishes as usual.
    step(&mut txn, Event::Acknowledged { shard: shard("a") });
    assert_eq!(txn.branches()[0].last_error, None);
}

#[test]
fn a_no_vote_aborts_every_other_branch_and_answers_the_client() {
    let mut txn = active(&["a", "b", "c"]);
    step(
        &mut txn,
        Event::CommitRequested {
            wait_for_apply: false,
        },
    );
    vote(&mut txn, "a", Vote::Yes);
    let no = reason(AbortCause::VoteNo);
    let actions = vote(&mut txn, "b", Vote::No(no.clone()));
    assert_eq!(
        actions,
        vec![
            Action::SendAbort {
                shard: shard("a"),
                delay_ms: 0
            },
            Action::SendAbort {
                shard: shard("c"),
                delay_ms: 0
            },
            Action::Reply(Outcome::Aborted(no.clone())),
        ]
    );
    assert_eq!(txn.phase(), Phase::Aborting);
    assert!(
        !actions.iter().any(|a| matches!(a, Action::PersistCommit { .. })),
        "presumed abort logs nothing"
    );
    // A late vote after the decision changes nothing.
    assert!(vote(&mut txn, "c", Vote::Yes).is_empty());
    step(&mut txn, Event::Acknowledged { shard: shard("a") });
    let actions = step(&mut txn, Event::Acknowledged { shard: shard("c") });
    assert_eq!(actions, vec![Action::Finished]);
    assert_eq!(txn.phase(), Phase::Aborted);
    assert_eq!(txn.outcome(), Some(&Outcome::Aborted(no)));
}

#[test]
fn read_only_branches_skip_phase_two() {
    let mut txn = active(&["a", "b"]);
    step(
        &mut txn,
        Event::CommitRequested {
            wait_for_apply: false,
        },
    );
    vote(&mut txn, "a", Vote::ReadOnly);
    let actions = vote(&mut txn, "b", Vote::Yes);
    assert_eq!(
        actions,
        vec![Action::PersistCommit {
            participants: vec![shard("b")]
        }]
    );
    let actions = step(&mut txn, Event::DecisionDurable);
    assert_eq!(
        actions,
        vec![
            Action::SendCommit {
                shard: shard("b"),
                delay_ms: 0
            },
            Action::Reply(Outcome::Committed)
        ]
    );
}

#[test]
fn all_read_only_commits_without_a_log_record() {
    let mut txn = active(&["a", "b"]);
    step(&mut txn, Event::CommitRequested { wait_for_apply: true });
    vote(&mut txn, "a", Vote::ReadOnly);
    let actions = vote(&mut txn, "b", Vote::ReadOnly);
    assert_eq!(actions, vec![Action::Reply(Outcome::Committed), Action::Finished]);
    assert_eq!(txn.phase(), Phase::Committed);
}

#[test]
fn a_missing_vote_is_a_no() {
    let mut txn = active(&["a", "b"]);
    txn.step(
        Event::CommitRequested {
            wait_for_apply: false,
        },
        100,
    )
    .unwrap();
    txn.step(
        Event::VoteReceived {
            shard: shard("a"),
            vote: Vote::Yes,
        },
        100,
    )
    .unwrap();
    assert_eq!(txn.next_deadline_ms(), Some(100 + TIMEOUTS.vote_ms));
    assert!(txn.step(Event::Tick, 599).unwrap().is_empty());
    let actions = txn.step(Event::Tick, 600).unwrap();
    assert_eq!(txn.phase(), Phase::Aborting);
    let Some(Action::Reply(Outcome::Aborted(why))) = actions.last() else {
        panic!("{actions:?}")
    };
    assert_eq!(why.cause, AbortCause::Timeout);
    assert_eq!(why.shard, Some(shard("b")));
    assert!(why.message.contains('b'));
}

#[test]
fn idle_transaction_is_aborted() {
    let mut txn = active(&["a"]);
    assert_eq!(txn.next_deadline_ms(), Some(TIMEOUTS.idle_ms));
    let actions = txn.step(Event::Tick, TIMEOUTS.idle_ms).unwrap();
    assert_eq!(
        actions,
        vec![Action::SendAbort {
            shard: shard("a"),
            delay_ms: 0
        }]
    );
    match txn.step(
        Event::CommitRequested {
            wait_for_apply: false,
        },
        TIMEOUTS.idle_ms,
    ) {
        Err(ProtocolError::AlreadyAborted { reason, .. }) => assert_eq!(reason.cause, AbortCause::Timeout),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_running_statement_is_not_idle_but_the_whole_limit_still_applies() {
    let mut txn = Transaction::begin(1, Protocol::TwoPhase, TIMEOUTS, 0);
    txn.step(Event::Enlist { shard: shard("a") }, 0).unwrap();
    assert_eq!(txn.next_deadline_ms(), Some(TIMEOUTS.transaction_ms));
    assert!(txn.step(Event::Tick, TIMEOUTS.idle_ms * 2).unwrap().is_empty());
    let actions = txn.step(Event::Tick, TIMEOUTS.transaction_ms).unwrap();
    assert_eq!(
        actions,
        vec![Action::SendAbort {
            shard: shard("a"),
            delay_ms: 0
        }]
    );
    assert!(matches!(txn.outcome(), Some(Outcome::Aborted(r)) if r.message.contains("limit")));
}

#[test]
fn statement_failure_aborts_all() {
    let mut txn = active(&["a", "b"]);
    txn.step(Event::Enlist { shard: shard("b") }, 1).unwrap();
    let failed = reason(AbortCause::StatementFailed).on_shard(&shard("b"));
    let actions = step(
        &mut txn,
        Event::ExecuteFailed {
            shard: shard("b"),
            reason: failed.clone(),
        },
    );
    assert_eq!(
        actions,
        vec![
            Action::SendAbort {
                shard: shard("a"),
                delay_ms: 0
            },
            Action::SendAbort {
                shard: shard("b"),
                delay_ms: 0
            }
        ]
    );
    assert!(matches!(
        txn.step(Event::CommitRequested { wait_for_apply: false }, 2),
        Err(ProtocolError::AlreadyAborted { reason, .. }) if reason == failed
    ));
    assert!(matches!(
        txn.step(Event::Enlist { shard: shard("a") }, 2),
        Err(ProtocolError::AlreadyAborted { .. })
    ));
}

#[test]
fn rollback_aborts_and_is_idempotent() {
    let mut txn = active(&["a"]);
    let rollback = reason(AbortCause::ClientRollback);
    let actions = step(
        &mut txn,
        Event::AbortRequested {
            reason: rollback.clone(),
        },
    );
    assert_eq!(
        actions,
        vec![
            Action::SendAbort {
                shard: shard("a"),
                delay_ms: 0
            },
            Action::Reply(Outcome::Aborted(rollback.clone()))
        ]
    );
    let again = step(
        &mut txn,
        Event::AbortRequested {
            reason: reason(AbortCause::ClientRollback),
        },
    );
    assert_eq!(again, vec![Action::Reply(Outcome::Aborted(rollback))]);
}

#[test]
fn rollback_without_statements_finishes_at_once() {
    let mut txn = active(&[]);
    let actions = step(
        &mut txn,
        Event::AbortRequested {
            reason: reason(AbortCause::ClientRollback),
        },
    );
    assert!(matches!(
        actions.as_slice(),
        [Action::Reply(Outcome::Aborted(_)), Action::Finished]
    ));
    assert_eq!(txn.phase(), Phase::Aborted);
}

#[test]
fn replayed_commit_succeeds_and_rollback_after_commit_is_refused() {
    let mut txn = decided_commit(false);
    assert_eq!(
        step(
            &mut txn,
            Event::CommitRequested {
                wait_for_apply: false
            }
        ),
        vec![Action::Reply(Outcome::Committed)]
    );
    assert!(matches!(
        txn.step(
            Event::AbortRequested {
                reason: reason(AbortCause::ClientRollback)
            },
            2
        ),
        Err(ProtocolError::AlreadyCommitted { .. })
    ));
    assert!(matches!(
        txn.step(Event::Enlist { shard: shard("a") }, 2),
        Err(ProtocolError::AlreadyCommitted { .. })
    ));
}

#[test]
fn requests_during_voting_are_refused() {
    let mut txn = active(&["a", "b"]);
    step(
        &mut txn,
        Event::CommitRequested {
            wait_for_apply: false,
        },
    );
    assert!(matches!(
        txn.step(
            Event::CommitRequested {
                wait_for_apply: false
            },
            2
        ),
        Err(ProtocolError::NotActive {
            phase: "preparing",
            ..
        })
    ));
    assert!(matches!(
        txn.step(
            Event::AbortRequested {
                reason: reason(AbortCause::ClientRollback)
            },
            2
        ),
        Err(ProtocolError::NotActive { .. })
    ));
}

#[test]
fn no_timeout_can_abort_once_the_decision_is_being_logged() {
    // Rule: after PersistCommit, only the log's answer moves the transaction.
    let mut txn = active(&["a", "b"]);
    step(
        &mut txn,
        Event::CommitRequested {
            wait_for_apply: false,
        },
    );
    vote(&mut txn, "a", Vote::Yes);
    vote(&mut txn, "b", Vote::Yes);
    assert_eq!(txn.next_deadline_ms(), None);
    assert!(txn.step(Event::Tick, u64::MAX).unwrap().is_empty());
    assert_eq!(txn.phase(), Phase::LoggingCommit);
    assert!(
        step(
            &mut txn,
            Event::PhaseTwoFailed {
                shard: shard("a"),
                error: "x".into()
            }
        )
        .is_empty()
    );
}

#[test]
fn events_out_of_place_are_ignored() {
    let mut txn = active(&["a"]);
    assert!(step(&mut txn, Event::DecisionDurable).is_empty());
    assert!(step(&mut txn, Event::Acknowledged { shard: shard("a") }).is_empty());
    assert!(step(&mut txn, Event::OnePhaseCommitted).is_empty());
    assert!(vote(&mut txn, "a", Vote::Yes).is_empty());
    assert_eq!(txn.phase(), Phase::Active);
    let mut txn = decided_commit(false);
    assert!(vote(&mut txn, "zz", Vote::Yes).is_empty());
}

#[test]
fn recovered_commit_is_driven_to_the_end() {
    // Rule: on restart, every commit decision without an end record is sent again.
    let (mut txn, actions) = Transaction::recover_commit(9, vec![shard("a"), shard("b")], 5, TIMEOUTS, 10);
    assert!(txn.recovered());
    assert_eq!(txn.phase(), Phase::Committing);
    assert_eq!(
        actions,
        vec![
            Action::SendCommit {
                shard: shard("a"),
                delay_ms: 0
            },
            Action::SendCommit {
                shard: shard("b"),
                delay_ms: 0
            }
        ]
    );
    step(&mut txn, Event::Acknowledged { shard: shard("a") });
    let actions = step(&mut txn, Event::Acknowledged { shard: shard("b") });
    assert_eq!(actions, vec![Action::PersistEnd, Action::Finished]);
}

#[test]
fn recovered_commit_without_participants_just_ends() {
    let (txn, actions) = Transaction::recover_commit(9, vec![], 5, TIMEOUTS, 10);
    assert_eq!(actions, vec![Action::PersistEnd, Action::Finished]);
    assert_eq!(txn.phase(), Phase::Committed);
}

#[test]
fn abort_is_retried_until_acknowledged() {
    let mut txn = active(&["a"]);
    step(
        &mut txn,
        Event::AbortRequested {
            reason: reason(AbortCause::ClientRollback),
        },
    );
    let actions = step(
        &mut txn,
        Event::PhaseTwoFailed {
            shard: shard("a"),
            error: "down".into(),
        },
    );
    assert!(matches!(actions.as_slice(), [Action::SendAbort { delay_ms, .. }] if *delay_ms > 0));
    assert_eq!(
        step(&mut txn, Event::Acknowledged { shard: shard("a") }),
        vec![Action::Finished]
    );
}

#[test]
fn retry_delay_grows_and_is_capped() {
    assert_eq!(retry_delay_ms(0), 0);
    assert_eq!(retry_delay_ms(1), 20);
    assert_eq!(retry_delay_ms(2), 40);
    assert_eq!(retry_delay_ms(40), 2_000);
}

#[test]
fn heuristic_abort_while_preparing_aborts_every_branch_and_answers_the_waiting_client() {
    // Rule: before the commit decision is logged, abort is always safe (presumed abort).
    let mut txn = active(&["a", "b"]);
    step(
        &mut txn,
        Event::CommitRequested {
            wait_for_apply: false,
        },
    );
    vote(&mut txn, "a", Vote::Yes);
    let actions = step(
        &mut txn,
        Event::HeuristicAbort {
            reason: reason(AbortCause::Heuristic),
        },
    );
    assert_eq!(txn.phase(), Phase::Aborting);
    assert!(actions.contains(&Action::SendAbort {
        shard: shard("a"),
        delay_ms: 0
    }));
    assert!(actions.contains(&Action::SendAbort {
        shard: shard("b"),
        delay_ms: 0
    }));
    assert!(actions.contains(&Action::Reply(Outcome::Aborted(reason(AbortCause::Heuristic)))));
    assert!(!actions.iter().any(|a| matches!(a, Action::PersistCommit { .. })));
    // A late YES changes nothing: no commit can be decided any more.
    assert!(vote(&mut txn, "b", Vote::Yes).is_empty());
}

#[test]
fn heuristic_abort_is_refused_once_the_commit_is_being_logged_or_decided() {
    // Rule: the commit record must never race an abort.
    let mut txn = active(&["a", "b"]);
    step(
        &mut txn,
        Event::CommitRequested {
            wait_for_apply: false,
        },
    );
    vote(&mut txn, "a", Vote::Yes);
    vote(&mut txn, "b", Vote::Yes);
    assert_eq!(txn.phase(), Phase::LoggingCommit);
    let abort = Event::HeuristicAbort {
        reason: reason(AbortCause::Heuristic),
    };
    assert!(txn.step(abort.clone(), 1).is_err());
    let mut decided = decided_commit(false);
    assert_eq!(
        decided.step(abort, 1),
        Err(ProtocolError::AlreadyCommitted { txid: 7 })
    );
}

#[test]
fn recover_abort_sends_aborts_and_finishes_when_all_acknowledge() {
    let (mut txn, actions) = Transaction::recover_abort(
        9,
        vec![shard("a"), shard("b")],
        5,
        reason(AbortCause::Heuristic),
        TIMEOUTS,
        10,
    );
    assert_eq!(txn.phase(), Phase::Aborting);
    assert_eq!(actions.len(), 2);
    step(&mut txn, Event::Acknowledged { shard: shard("a") });
    let actions = step(&mut txn, Event::Acknowledged { shard: shard("b") });
    assert_eq!(txn.phase(), Phase::Aborted);
    assert_eq!(
        actions,
        vec![Action::Finished],
        "an abort writes no end record of its own"
    );
    let (txn, actions) =
        Transaction::recover_abort(9, vec![], 5, reason(AbortCause::Heuristic), TIMEOUTS, 10);
    assert_eq!(txn.phase(), Phase::Aborted);
    assert_eq!(actions, vec![Action::Finished]);
}
