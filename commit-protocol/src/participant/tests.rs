//! Hand-driven tests of the participant's machine, each naming the rule it checks.

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

fn two_phase(name: &str) -> Participant {
    Participant::new(shard(name), Protocol::TwoPhase, Rules::Classical, 100, 0)
}

fn coordinator() -> Proposer {
    Proposer::Coordinator { incarnation: 0 }
}

fn prepare_two_phase(p: &mut Participant) -> Vec<ParticipantAction> {
    p.step(
        ParticipantEvent::PrepareRequested {
            participants: Vec::new(),
        },
        0,
    )
}

#[test]
fn a_two_phase_vote_asks_first_whether_the_branch_wrote_and_a_writer_prepares() {
    // Rule: 2PC checks writes before preparing; a writer prepares and votes YES.
    let mut p = two_phase("a");
    assert_eq!(prepare_two_phase(&mut p), vec![ParticipantAction::CheckWrites]);
    assert_eq!(
        p.step(ParticipantEvent::BranchWrote, 0),
        vec![ParticipantAction::PrepareBranch]
    );
    assert_eq!(
        p.step(ParticipantEvent::BranchPrepared, 0),
        vec![ParticipantAction::SendVote { yes: true }]
    );
    assert_eq!(p.phase(), ParticipantPhase::Prepared);
}

#[test]
fn a_branch_that_wrote_nothing_commits_locally_and_votes_read_only_in_2pc_only() {
    // Rule: READ-ONLY only in 2PC, and only after the local COMMIT succeeded.
    let mut p = two_phase("a");
    prepare_two_phase(&mut p);
    assert_eq!(
        p.step(ParticipantEvent::BranchWroteNothing, 0),
        vec![ParticipantAction::CommitLocally]
    );
    assert_eq!(
        p.step(ParticipantEvent::LocalCommitSucceeded, 0),
        vec![ParticipantAction::SendReadOnlyVote]
    );
    assert_eq!(p.phase(), ParticipantPhase::ReadOnly);
    assert_eq!(
        prepare_two_phase(&mut p),
        vec![ParticipantAction::SendReadOnlyVote]
    );
    // Left out of phase two: a decision sent anyway is acknowledged without touching anything.
    let from = coordinator();
    assert_eq!(
        p.step(ParticipantEvent::CommitRequested { from: from.clone() }, 0),
        vec![ParticipantAction::AcknowledgeDecision]
    );
    assert_eq!(
        p.step(ParticipantEvent::AbortRequested { from }, 0),
        vec![ParticipantAction::AcknowledgeDecision]
    );

    let mut three = Participant::new(shard("a"), Protocol::ThreePhase, Rules::Classical, 100, 0);
    assert_eq!(
        three.step(
            ParticipantEvent::PrepareRequested {
                participants: vec![shard("a"), shard("b")]
            },
            0
        ),
        vec![ParticipantAction::PrepareBranch]
    );
    assert!(three.step(ParticipantEvent::BranchWroteNothing, 0).is_empty());
    assert_eq!(three.phase(), ParticipantPhase::Working);
}

#[test]
fn a_failed_read_only_commit_votes_no() {
    let mut p = two_phase("a");
    prepare_two_phase(&mut p);
    p.step(ParticipantEvent::BranchWroteNothing, 0);
    assert_eq!(
        p.step(ParticipantEvent::LocalCommitFailed, 0),
        vec![
            ParticipantAction::ApplyAbort,
            ParticipantAction::SendVote { yes: false }
        ]
    );
    assert_eq!(p.phase(), ParticipantPhase::Aborted);
}

#[test]
fn a_one_phase_commit_answers_from_the_local_commit_and_repeats_are_refused_or_acknowledged() {
    let mut p = two_phase("a");
    assert_eq!(
        p.step(ParticipantEvent::CommitOnePhaseRequested, 0),
        vec![ParticipantAction::CommitLocally]
    );
    assert_eq!(
        p.next_deadline_ms(),
        None,
        "no idle timeout under a COMMIT in flight"
    );
    assert_eq!(
        p.step(ParticipantEvent::LocalCommitSucceeded, 0),
        vec![ParticipantAction::AcknowledgeDecision]
    );
    assert_eq!(p.phase(), ParticipantPhase::Committed);
    assert_eq!(
        p.step(ParticipantEvent::CommitOnePhaseRequested, 0),
        vec![ParticipantAction::AcknowledgeDecision]
    );

    let mut failed = two_phase("a");
    failed.step(ParticipantEvent::CommitOnePhaseRequested, 0);
    assert_eq!(
        failed.step(ParticipantEvent::LocalCommitFailed, 0),
        vec![ParticipantAction::ApplyAbort]
    );
    assert_eq!(
        failed.step(ParticipantEvent::CommitOnePhaseRequested, 0),
        vec![ParticipantAction::Refuse(Refusal::RolledBack)]
    );

    let mut prepared = two_phase("a");
    prepare_two_phase(&mut prepared);
    prepared.step(ParticipantEvent::BranchWrote, 0);
    prepared.step(ParticipantEvent::BranchPrepared, 0);
    assert_eq!(
        prepared.step(ParticipantEvent::CommitOnePhaseRequested, 0),
        vec![ParticipantAction::Refuse(Refusal::Prepared)]
    );
    assert_eq!(prepared.phase(), ParticipantPhase::Prepared);
}

#[test]
fn a_one_phase_commit_of_unknown_outcome_can_be_neither_committed_nor_aborted() {
    // Rule: after a lost COMMIT answer nothing may claim either outcome.
    let mut p = two_phase("a");
    p.step(ParticipantEvent::CommitOnePhaseRequested, 0);
    assert!(p.step(ParticipantEvent::LocalCommitOutcomeUnknown, 0).is_empty());
    assert_eq!(p.phase(), ParticipantPhase::OutcomeUnknown);
    let refused = vec![ParticipantAction::Refuse(Refusal::OutcomeUnknown)];
    assert_eq!(p.step(ParticipantEvent::CommitOnePhaseRequested, 0), refused);
    assert_eq!(
        p.step(ParticipantEvent::CommitRequested { from: coordinator() }, 0),
        refused
    );
    assert_eq!(
        p.step(ParticipantEvent::AbortRequested { from: coordinator() }, 0),
        refused
    );
    assert_eq!(
        prepare_two_phase(&mut p),
        vec![ParticipantAction::SendVote { yes: false }]
    );
}

#[test]
fn a_commit_of_a_branch_that_never_prepared_or_rolled_back_is_refused() {
    // Rule: only a prepared branch commits in two phases.
    let mut open = two_phase("a");
    assert_eq!(
        open.step(ParticipantEvent::CommitRequested { from: coordinator() }, 0),
        vec![ParticipantAction::Refuse(Refusal::NotPrepared)]
    );
    assert_eq!(open.phase(), ParticipantPhase::Working);

    let mut aborted = Participant::resume(shard("a"), Remembered::Aborted, 100, 0);
    assert_eq!(
        aborted.step(ParticipantEvent::CommitRequested { from: coordinator() }, 0),
        vec![ParticipantAction::Refuse(Refusal::RolledBack)]
    );
    assert_eq!(
        aborted.step(ParticipantEvent::AbortRequested { from: coordinator() }, 0),
        vec![
            ParticipantAction::ApplyAbort,
            ParticipantAction::AcknowledgeDecision
        ],
        "a repeated abort is applied again (the PREPARE may have gone through) and acknowledged"
    );
}

#[test]
fn an_abort_of_a_committed_branch_is_refused() {
    let mut p = Participant::resume(shard("a"), Remembered::Committed, 100, 0);
    assert_eq!(
        p.step(ParticipantEvent::AbortRequested { from: coordinator() }, 0),
        vec![ParticipantAction::Refuse(Refusal::Committed)]
    );
    assert_eq!(p.phase(), ParticipantPhase::Committed);
    assert_eq!(
        p.step(ParticipantEvent::CommitRequested { from: coordinator() }, 0),
        vec![ParticipantAction::AcknowledgeDecision]
    );
}

#[test]
fn a_resumed_prepared_branch_applies_the_coordinators_decision_and_asks_on_its_timeout() {
    // Rule: a 2PC branch never finishes a prepared branch on its own; it asks the coordinator.
    let mut p = Participant::resume(shard("a"), Remembered::Prepared, 100, 0);
    assert!(p.step(ParticipantEvent::Tick, 99).is_empty());
    assert_eq!(
        p.step(ParticipantEvent::Tick, 100),
        vec![ParticipantAction::AskCoordinator]
    );
    assert_eq!(p.phase(), ParticipantPhase::Prepared);
    assert_eq!(
        p.step(ParticipantEvent::CommitRequested { from: coordinator() }, 101),
        vec![
            ParticipantAction::ApplyCommit,
            ParticipantAction::AcknowledgeDecision
        ]
    );
    assert_eq!(p.next_deadline_ms(), None);
}

#[test]
fn statements_push_the_idle_timeout_back_and_an_idle_branch_aborts() {
    // Rule: a branch that has not voted aborts after `timeout_ms` without a statement.
    let mut p = two_phase("a");
    assert!(p.step(ParticipantEvent::StatementRan, 80).is_empty());
    assert!(
        p.step(ParticipantEvent::Tick, 150).is_empty(),
        "the statement at 80 keeps it alive"
    );
    assert_eq!(
        p.step(ParticipantEvent::Tick, 180),
        vec![ParticipantAction::ApplyAbort]
    );
    assert_eq!(p.phase(), ParticipantPhase::Aborted);
}

#[test]
fn abandoned_work_aborts_only_a_branch_that_has_not_voted() {
    let mut p = two_phase("a");
    assert_eq!(
        p.step(ParticipantEvent::WorkAbandoned, 0),
        vec![ParticipantAction::ApplyAbort]
    );
    assert_eq!(p.phase(), ParticipantPhase::Aborted);
    assert_eq!(
        prepare_two_phase(&mut p),
        vec![ParticipantAction::SendVote { yes: false }]
    );
    let mut prepared = Participant::resume(shard("a"), Remembered::Prepared, 100, 0);
    assert!(prepared.step(ParticipantEvent::WorkAbandoned, 0).is_empty());
    assert_eq!(prepared.phase(), ParticipantPhase::Prepared);
}
