//! The cooperative termination protocol of three-phase commit: ballots, the states a participant
//! reports, and [`decide`], the one rule that turns the states of every participant into an
//! outcome. The participant's termination leader and a restarted coordinator both use it, so a
//! transaction is finished by the same rule whoever finishes it.
//!
//! Guarantee: 3PC finishes without the coordinator when the coordinator is down but every
//! participant of the transaction is up and reachable; with a participant also down or
//! partitioned away, it waits like 2PC; it never decides both ways, under any partition.
//!
//! Why it is safe under partitions:
//! - the guard: [`decide`] is only ever applied to the states of *all* participants of the
//!   transaction; a proposer missing one answer waits and asks again, it never guesses;
//! - ballots: a participant that answers a proposer's query promises to ignore every `PreCommit`
//!   of a lower ballot (the coordinator's first round is the lowest, [`Ballot::COORDINATOR`]), so
//!   a pre-commit still in flight from an older proposer cannot land after a newer one has seen
//!   "nobody pre-committed" and decided abort;
//! - a pre-commit is durable at the participant before it is acknowledged, so once any participant
//!   is pre-committed every later complete set of states shows it, and the rules say commit.

use treaty_types::ShardName;

/// Who proposes a ballot. The coordinator's ballots order below any participant's of the same
/// round, and participants' by name, so two proposers never share a ballot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proposer {
    /// `incarnation` grows at every coordinator restart, so that a restarted coordinator never
    /// reuses a ballot of its previous life whose messages may still be in flight.
    Coordinator {
        incarnation: u64,
    },
    Participant(ShardName),
}

/// A termination round's number. Ordered by round, then proposer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ballot {
    pub round: u64,
    pub proposer: Proposer,
}

impl Ballot {
    /// The coordinator's own pre-commit round: every termination ballot is higher.
    pub const COORDINATOR: Ballot = Ballot {
        round: 0,
        proposer: Proposer::Coordinator { incarnation: 0 },
    };

    /// The first ballot above `self` that `proposer` may use.
    pub fn next_for(&self, proposer: Proposer) -> Ballot {
        Ballot {
            round: self.round.saturating_add(1),
            proposer,
        }
    }
}

/// What one participant reports about its branch when asked by a termination proposer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReportedState {
    /// Voted YES; not pre-committed.
    Prepared,
    /// Durably pre-committed.
    PreCommitted,
    Committed,
    /// Aborted, voted NO, or had not voted (a participant that had not voted aborts when asked).
    Aborted,
}

/// What the termination proposer must do once it holds every participant's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TerminationOutcome {
    /// Someone committed: commit the rest.
    Commit,
    /// Someone pre-committed: pre-commit the rest (under the proposer's ballot), then commit.
    PreCommitThenCommit,
    Abort,
}

/// The termination rules. Only `Classical` is safe; the others exist so that the model checker can
/// show it catches a wrong rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rules {
    /// Any committed → commit; any aborted → abort; any pre-committed → pre-commit the rest and
    /// commit; all merely prepared → abort.
    Classical,
    /// Deliberately wrong: "all prepared → commit". Unsafe because the coordinator may still be
    /// deciding abort on a vote timeout (it has not sent any pre-commit yet).
    WrongAllPreparedCommit,
}

/// The outcome for the states of every participant of a transaction. The caller must pass the
/// states of all of them (the guard); `None` for an empty set, which has nothing to decide.
pub fn decide(states: &[ReportedState], rules: Rules) -> Option<TerminationOutcome> {
    if states.is_empty() {
        return None;
    }
    let any = |wanted: ReportedState| states.contains(&wanted);
    let outcome = if any(ReportedState::Committed) {
        TerminationOutcome::Commit
    } else if any(ReportedState::Aborted) {
        TerminationOutcome::Abort
    } else if any(ReportedState::PreCommitted) {
        TerminationOutcome::PreCommitThenCommit
    } else {
        match rules {
            Rules::Classical => TerminationOutcome::Abort,
            Rules::WrongAllPreparedCommit => TerminationOutcome::PreCommitThenCommit,
        }
    };
    Some(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReportedState::*;

    #[test]
    fn classical_rules_in_order() {
        let rules = Rules::Classical;
        assert_eq!(
            decide(&[Committed, Prepared], rules),
            Some(TerminationOutcome::Commit)
        );
        assert_eq!(
            decide(&[Aborted, PreCommitted], rules),
            Some(TerminationOutcome::Abort)
        );
        assert_eq!(
            decide(&[PreCommitted, Prepared], rules),
            Some(TerminationOutcome::PreCommitThenCommit)
        );
        assert_eq!(
            decide(&[Prepared, Prepared], rules),
            Some(TerminationOutcome::Abort)
        );
        assert_eq!(decide(&[], rules), None);
    }

    #[test]
    fn the_wrong_rule_commits_when_all_are_merely_prepared() {
        assert_eq!(
            decide(&[Prepared, Prepared], Rules::WrongAllPreparedCommit),
            Some(TerminationOutcome::PreCommitThenCommit)
        );
    }

    #[test]
    fn ballots_order_by_round_then_proposer() {
        let p = |name: &str| Proposer::Participant(ShardName::new(name).unwrap());
        assert!(Ballot::COORDINATOR < Ballot::COORDINATOR.next_for(Proposer::Coordinator { incarnation: 1 }));
        let a1 = Ballot::COORDINATOR.next_for(p("a"));
        let b1 = Ballot::COORDINATOR.next_for(p("b"));
        assert!(a1 < b1);
        assert!(b1 < a1.next_for(p("a")));
    }
}
