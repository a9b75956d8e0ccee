//! One-shot submits in the coordinator's machine: votes cast together with a branch's last
//! statement (`ExecuteAndPrepare`), kept until the transaction prepares and then counted in place
//! of a Prepare message. Under three-phase commit such a vote names the participants it was told
//! about, and counts as a YES only if those are exactly the participants the transaction prepares
//! with: termination decides with the states of the participants each one knows, so two lists must
//! never differ (a client that enlists another shard in a running submit's transaction would make
//! them differ).

use treaty_types::ShardName;

use super::{Phase, Protocol, Transaction};
use crate::events::{AbortCause, AbortReason, Vote};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct EarlyVote {
    shard: ShardName,
    vote: Vote,
    /// Three-phase: the participants the vote named (sorted); empty under two-phase.
    named: Vec<ShardName>,
}

impl Transaction {
    /// Keeps a vote cast with a last statement. A vote that arrives once the transaction is no
    /// longer active is dropped: the transaction already decided, and its abort reaches the branch.
    pub(super) fn vote_cast_early(&mut self, shard: ShardName, vote: Vote, mut named: Vec<ShardName>) {
        if self.phase != Phase::Active || !self.branches.iter().any(|b| b.shard == shard) {
            return;
        }
        named.sort_unstable();
        self.early_votes.retain(|early| early.shard != shard);
        self.early_votes.push(EarlyVote { shard, vote, named });
    }

    /// Whether an interactive client's last statement on `shard` may carry the branch's vote
    /// (`ExecuteRequest.last`): only under two-phase commit, where a branch's vote needs no list of
    /// participants that could still grow (three-phase votes name them), and never on the shard
    /// that holds the decision, whose branch commits the decision row in one phase instead of
    /// voting. Deciding in a branch with none enlisted yet, this statement opens the first branch,
    /// which becomes the decision branch.
    pub fn may_vote_early(&self, shard: &ShardName) -> bool {
        let holds_decision = match self.decision_shard() {
            Some(decision) => decision == shard,
            None => self.decides_in_branch(),
        };
        self.protocol == Protocol::TwoPhase && !holds_decision
    }

    /// Whether `shard`'s branch already voted with its last statement.
    pub(super) fn voted_early(&self, shard: &ShardName) -> bool {
        self.early_votes.iter().any(|early| &early.shard == shard)
    }

    /// The early votes, each as the protocol may count it.
    pub(super) fn take_early_votes(&mut self) -> Vec<(ShardName, Vote)> {
        let mut prepared: Vec<ShardName> = self.branches.iter().map(|b| b.shard.clone()).collect();
        prepared.sort_unstable();
        let protocol = self.protocol;
        std::mem::take(&mut self.early_votes)
            .into_iter()
            .map(|early| counted(early, &prepared, protocol))
            .collect()
    }
}

fn counted(early: EarlyVote, prepared: &[ShardName], protocol: Protocol) -> (ShardName, Vote) {
    if protocol != Protocol::ThreePhase || early.named == prepared {
        return (early.shard, early.vote);
    }
    let reason = AbortReason::new(
        AbortCause::VoteNo,
        format!(
            "its three-phase vote named the participants {:?}, but the transaction prepares with {prepared:?}",
            early.named
        ),
    )
    .on_shard(&early.shard);
    (early.shard, Vote::No(reason))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::{BranchPhase, Timeouts};
    use crate::events::{Action, Event};

    const TIMEOUTS: Timeouts = Timeouts {
        transaction_ms: 10_000,
        idle_ms: 10_000,
        vote_ms: 1_000,
    };

    fn shard(name: &str) -> ShardName {
        ShardName::new(name).unwrap()
    }

    /// The client asks to commit at `now_ms`; the machine's actions.
    fn commit_requested(txn: &mut Transaction, now_ms: u64) -> Vec<Action> {
        let commit = Event::CommitRequested {
            wait_for_apply: false,
        };
        txn.step(commit, now_ms).unwrap()
    }

    fn enlisted(protocol: Protocol, shards: &[&str]) -> Transaction {
        let mut txn = Transaction::begin(1, protocol, TIMEOUTS, 0);
        for name in shards {
            txn.step(Event::Enlist { shard: shard(name) }, 0).unwrap();
            txn.step(Event::ExecuteSucceeded { shard: shard(name) }, 0)
                .unwrap();
        }
        txn
    }

    #[test]
    fn early_votes_replace_the_prepare_message_for_their_shard() {
        let mut txn = enlisted(Protocol::TwoPhase, &["s0", "s1"]);
        txn.step(
            Event::VoteCastEarly {
                shard: shard("s0"),
                vote: Vote::Yes,
                named: vec![],
            },
            0,
        )
        .unwrap();
        let actions = commit_requested(&mut txn, 1);
        assert_eq!(
            actions,
            vec![Action::SendPrepare {
                shards: vec![shard("s1")]
            }]
        );
        assert_eq!(
            txn.branches()[0].phase,
            BranchPhase::Prepared,
            "s0's early YES counted"
        );
        let actions = txn
            .step(
                Event::VoteReceived {
                    shard: shard("s1"),
                    vote: Vote::Yes,
                },
                2,
            )
            .unwrap();
        assert!(
            matches!(actions.as_slice(), [Action::PersistCommit { .. }]),
            "{actions:?}"
        );
    }

    #[test]
    fn a_three_phase_early_vote_counts_only_if_it_named_exactly_the_prepared_participants() {
        let mut txn = enlisted(Protocol::ThreePhase, &["s0", "s1", "s2"]);
        for name in ["s0", "s1", "s2"] {
            let named = if name == "s2" {
                vec![shard("s0"), shard("s1")]
            } else {
                vec![shard("s2"), shard("s1"), shard("s0")]
            };
            let vote = Event::VoteCastEarly {
                shard: shard(name),
                vote: Vote::Yes,
                named,
            };
            txn.step(vote, 0).unwrap();
        }
        commit_requested(&mut txn, 1);
        assert_eq!(txn.phase(), Phase::Aborting, "s2 named fewer participants: a NO");
        let Some(crate::Outcome::Aborted(reason)) = txn.outcome() else {
            panic!("expected an abort, got {:?}", txn.outcome());
        };
        assert!(
            reason.message.contains("s2") && reason.shard == Some(shard("s2")),
            "{reason}"
        );
    }

    #[test]
    fn a_single_branch_that_voted_early_commits_in_two_phases() {
        let mut txn = enlisted(Protocol::TwoPhase, &["s0"]);
        txn.step(
            Event::VoteCastEarly {
                shard: shard("s0"),
                vote: Vote::Yes,
                named: vec![],
            },
            0,
        )
        .unwrap();
        let actions = commit_requested(&mut txn, 1);
        assert!(
            matches!(actions.as_slice(), [Action::PersistCommit { .. }]),
            "a prepared branch cannot take a plain COMMIT: {actions:?}"
        );
    }

    #[test]
    fn the_last_statement_rides_with_the_commit_of_its_only_branch() {
        let mut txn = enlisted(Protocol::TwoPhase, &["s0"]);
        let actions = txn
            .step(
                Event::CommitWithLastStatement {
                    shard: shard("s0"),
                    wait_for_apply: false,
                },
                1,
            )
            .unwrap();
        assert_eq!(
            actions,
            vec![Action::ExecuteAndCommitOnePhase { shard: shard("s0") }]
        );

        let mut two = enlisted(Protocol::TwoPhase, &["s0", "s1"]);
        let refused = two.step(
            Event::CommitWithLastStatement {
                shard: shard("s0"),
                wait_for_apply: false,
            },
            1,
        );
        assert!(
            matches!(
                refused,
                Err(crate::ProtocolError::LastStatementNeedsOneBranch { .. })
            ),
            "{refused:?}"
        );
        assert_eq!(two.phase(), Phase::Active, "a refused commit changes nothing");
    }

    #[test]
    fn only_a_two_phase_branch_that_does_not_hold_the_decision_may_vote_with_its_last_statement() {
        // The file store: every two-phase branch may.
        let file = enlisted(Protocol::TwoPhase, &["s0", "s1"]);
        assert!(file.may_vote_early(&shard("s0")) && file.may_vote_early(&shard("s1")));
        // Three-phase votes name every participant, which only the commit knows.
        let three = enlisted(Protocol::ThreePhase, &["s0", "s1"]);
        assert!(!three.may_vote_early(&shard("s1")));
        // Deciding in a branch: the first branch commits the decision instead of voting.
        let mut in_branch = Transaction::begin(1, Protocol::TwoPhase, TIMEOUTS, 0);
        in_branch.set_decision_in_branch();
        assert!(
            !in_branch.may_vote_early(&shard("s1")),
            "with no branch yet, the statement opens the decision branch"
        );
        in_branch.step(Event::Enlist { shard: shard("s1") }, 0).unwrap();
        assert!(!in_branch.may_vote_early(&shard("s1")));
        assert!(in_branch.may_vote_early(&shard("s0")));
    }

    #[test]
    fn a_branch_that_voted_with_its_last_statement_takes_no_more_statements() {
        let mut txn = enlisted(Protocol::TwoPhase, &["s0", "s1"]);
        let vote = Event::VoteCastEarly {
            shard: shard("s1"),
            vote: Vote::Yes,
            named: vec![],
        };
        txn.step(vote, 0).unwrap();
        let refused = txn.step(Event::Enlist { shard: shard("s1") }, 1);
        assert!(
            matches!(&refused, Err(crate::ProtocolError::AlreadyVoted { shard: s, .. }) if *s == shard("s1")),
            "{refused:?}"
        );
        assert_eq!(txn.phase(), Phase::Active, "the refusal aborts nothing");
        // The other branch still takes statements, and the transaction commits with s1's vote.
        txn.step(Event::Enlist { shard: shard("s0") }, 1).unwrap();
        txn.step(Event::ExecuteSucceeded { shard: shard("s0") }, 1)
            .unwrap();
        let actions = commit_requested(&mut txn, 2);
        assert_eq!(
            actions,
            vec![Action::SendPrepare {
                shards: vec![shard("s0")]
            }]
        );
    }
}
