//! What a participant's answer means for the transaction: the rules that turn the result of a
//! transport call ([`crate::transport`]) into the protocol's events and abort reasons. They live in
//! the core, beside the machine, so that the production driver and the seeded simulation count a
//! vote, a lost message or a refusal the same way.
//!
//! - A vote is a YES or READ-ONLY only when the participant clearly said so; anything else (a NO,
//!   an error, no answer in time, an answer without a vote) is a NO.
//! - Under three-phase commit a READ-ONLY vote is a NO: such a participant holds no branch that
//!   termination could ask about. A vote cast under another protocol than the one asked for is a NO.
//! - A phase-two message that failed in any way is sent again (`PhaseTwoFailed`); a refusal means
//!   the participant's records contradict the decision, which must never happen, and is reported
//!   as such.
//! - A one-phase COMMIT whose call broke or timed out has an unknown outcome; one PostgreSQL or the
//!   participant refused did not commit.

use treaty_types::{Protocol, ShardName};

use crate::events::{AbortCause, AbortReason, Event, Vote};
use crate::participant::Report;
use crate::termination::Ballot;
use crate::transport::{
    DecisionWrite, ExecutedAndCommitted, ExecutedAndVoted, LinkError, PreCommitAnswer, StoredDecision,
    StoredOutcome, VoteAnswer,
};

/// Whether running the transaction again may succeed after this SQLSTATE: serialization failure,
/// deadlock, lock or statement timeout, a lost connection.
pub fn sqlstate_is_retryable(sqlstate: &str) -> bool {
    // Class 08 is a lost or refused connection, except 08P01 (protocol violation: a bind with the
    // wrong parameter count), which fails the same way every time. 57P01-57P03: the server is
    // shutting down or starting; 53300: too many connections right now.
    matches!(
        sqlstate,
        "40001" | "40P01" | "55P03" | "57014" | "57P01" | "57P02" | "57P03" | "53300"
    ) || (sqlstate.starts_with("08") && sqlstate != "08P01")
}

fn unavailable(shard: &ShardName, message: String) -> AbortReason {
    AbortReason::new(AbortCause::ParticipantUnavailable, message).on_shard(shard)
}

/// A vote as the protocol counts it (`asked`: the protocol the vote was asked under).
pub fn vote(shard: &ShardName, answer: Result<VoteAnswer, LinkError>, asked: Protocol) -> Vote {
    match answer {
        Ok(VoteAnswer::Yes) => Vote::Yes,
        Ok(VoteAnswer::ReadOnly) if asked == Protocol::ThreePhase => Vote::No(unavailable(
            shard,
            "voted READ-ONLY in a three-phase transaction (a participant without three-phase \
             commit?); every 3PC participant must prepare"
                .into(),
        )),
        Ok(VoteAnswer::ReadOnly) => Vote::ReadOnly,
        Ok(VoteAnswer::No { sqlstate, message }) => {
            let mut reason = AbortReason::new(AbortCause::VoteNo, message).on_shard(shard);
            reason.retryable = sqlstate_is_retryable(&sqlstate);
            reason.sqlstate = sqlstate;
            Vote::No(reason)
        }
        Err(LinkError::TimedOut { after_ms }) => Vote::No(
            AbortReason::new(AbortCause::Timeout, format!("no vote within {after_ms} ms")).on_shard(shard),
        ),
        Err(error) => Vote::No(unavailable(shard, format!("prepare failed: {error}"))),
    }
}

/// The vote cast with a branch's last statement (`ExecuteAndPrepare`), as the protocol counts it.
pub fn early_vote(shard: &ShardName, answer: &ExecutedAndVoted, asked: Protocol) -> Vote {
    if asked == Protocol::ThreePhase && answer.voted_under != Some(Protocol::ThreePhase) {
        return Vote::No(unavailable(
            shard,
            "asked for a three-phase vote, the participant answered for another protocol (a \
             participant without three-phase ExecuteAndPrepare?)"
                .into(),
        ));
    }
    match &answer.vote {
        Some(cast) => vote(shard, Ok(cast.clone()), asked),
        None => Vote::No(unavailable(
            shard,
            "the participant's answer carried no vote".into(),
        )),
    }
}

/// The event a phase-two message's result feeds (commit or abort).
pub fn phase_two(shard: &ShardName, result: Result<(), LinkError>) -> Event {
    match result {
        Ok(()) => Event::Acknowledged { shard: shard.clone() },
        Err(error) => Event::PhaseTwoFailed {
            shard: shard.clone(),
            error: error.to_string(),
        },
    }
}

/// Whether a phase-two failure means the participant's own records contradict the decision (it
/// must never happen; the driver keeps retrying and says so loudly).
pub fn contradicts_decision(error: &LinkError) -> bool {
    matches!(error, LinkError::Refused(_))
}

/// The event a 3PC pre-commit's result feeds.
pub fn pre_commit(shard: &ShardName, ballot: &Ballot, result: Result<PreCommitAnswer, LinkError>) -> Event {
    let failed = |error: String| Event::PhaseTwoFailed {
        shard: shard.clone(),
        error,
    };
    match result {
        Ok(answer) if answer.acknowledged => Event::PreCommitAcknowledged {
            shard: shard.clone(),
            ballot: ballot.clone(),
        },
        Ok(answer) => {
            let promised = answer
                .promised
                .map(|promised| format!(" (it promised ballot {promised:?})"))
                .unwrap_or_default();
            failed(format!("PreCommit refused{promised}: {}", answer.message))
        }
        Err(error) => failed(format!("PreCommit failed: {error}")),
    }
}

/// A 3PC state report, or `None` when the participant did not answer usably (asked again on the
/// machine's next tick).
pub fn state_report(result: Result<Report, LinkError>) -> Option<Report> {
    result.ok()
}

/// The abort reason for a statement that did not run to completion on `shard`. A shard that could
/// not be reached, or that lost the branch in a restart, says the transaction may succeed when run
/// again; a refused request does not.
pub fn execute_failed(shard: &ShardName, error: &LinkError) -> AbortReason {
    match error {
        LinkError::Sql {
            sqlstate,
            message,
            retryable,
        } => AbortReason {
            cause: AbortCause::StatementFailed,
            shard: Some(shard.clone()),
            sqlstate: sqlstate.clone(),
            message: message.clone(),
            retryable: *retryable,
        },
        LinkError::Unavailable(_) | LinkError::BranchLost(_) => unavailable(shard, error.to_string()),
        LinkError::TimedOut { after_ms } => AbortReason::new(
            AbortCause::Timeout,
            format!("statement did not finish within the transaction's remaining {after_ms} ms"),
        )
        .on_shard(shard),
        LinkError::Deadline(message) => {
            AbortReason::new(AbortCause::Timeout, message.clone()).on_shard(shard)
        }
        other => AbortReason::new(AbortCause::StatementFailed, other.to_string()).on_shard(shard),
    }
}

/// The event a plain one-phase COMMIT's result feeds.
pub fn one_phase(shard: &ShardName, result: Result<(), LinkError>) -> Event {
    match result {
        Ok(()) => Event::OnePhaseCommitted,
        Err(error @ LinkError::Sql { .. }) => Event::OnePhaseFailed {
            reason: execute_failed(shard, &error),
        },
        // The participant answered without committing (no such branch, timed out, ...).
        Err(LinkError::Refused(message) | LinkError::Invalid(message)) => Event::OnePhaseFailed {
            reason: unavailable(shard, message),
        },
        // The call broke: the COMMIT may or may not have run.
        Err(other) => Event::OnePhaseUnknown {
            error: format!("shard {shard}: {other}"),
        },
    }
}

/// The event a decision branch's `CommitDecision` feeds. Only a clear answer decides: the commit
/// row committed, or the participant said it did not (an abort row won, the COMMIT failed). Any
/// other failure leaves the decision unknown, and it is read back (concluding abort if no row):
/// even a refusal or a lost branch could follow a first attempt that committed.
pub fn decision_written(shard: &ShardName, result: Result<DecisionWrite, LinkError>) -> Event {
    match result {
        Ok(DecisionWrite::Committed) => Event::DecisionDurable,
        Ok(DecisionWrite::NotCommitted { message }) => Event::DecisionRefused {
            reason: AbortReason::new(AbortCause::ConcludedAbort, message).on_shard(shard),
        },
        Err(error) => Event::DecisionUnknown {
            error: format!("decision branch on shard {shard}: {error}"),
        },
    }
}

/// The event a `ConcludeDecision` (a read with `conclude_abort`) feeds for `gid`.
pub fn decision_read(
    shard: &ShardName,
    gid: &treaty_types::Gid,
    result: Result<Vec<StoredDecision>, LinkError>,
) -> Event {
    match result {
        Ok(rows) => match rows
            .iter()
            .find(|row| &row.gid == gid)
            .and_then(|row| row.outcome)
        {
            Some(StoredOutcome::Commit) => Event::DecisionLearned { commit: true },
            Some(StoredOutcome::Abort) => Event::DecisionLearned { commit: false },
            None => Event::DecisionUnknown {
                error: format!("shard {shard} answered without a decision for {gid}"),
            },
        },
        Err(error) => Event::DecisionUnknown {
            error: format!("reading the decision on shard {shard}: {error}"),
        },
    }
}

/// The event a fused last statement and COMMIT (`ExecuteAndCommit`) feeds; `op` names the
/// statement in an abort reason.
pub fn executed_and_committed(
    shard: &ShardName,
    op: usize,
    expect_rows: Option<u64>,
    result: &Result<ExecutedAndCommitted, LinkError>,
) -> Event {
    match result {
        Ok(answer) if answer.committed => Event::OnePhaseCommitted,
        Ok(answer) => Event::OnePhaseFailed {
            reason: AbortReason::new(
                AbortCause::ExpectRows,
                format!(
                    "op {op} affected {} rows, expected {}",
                    answer.result.rows_affected,
                    expect_rows.unwrap_or_default()
                ),
            )
            .on_shard(shard),
        },
        // The statement or the COMMIT failed in PostgreSQL: rolled back.
        Err(error @ LinkError::Sql { .. }) => Event::OnePhaseFailed {
            reason: execute_failed(shard, error),
        },
        // Refused before anything ran (bad request, branch in the wrong state).
        Err(LinkError::Refused(message) | LinkError::Invalid(message)) => Event::OnePhaseFailed {
            reason: AbortReason::new(AbortCause::StatementFailed, format!("op {op}: {message}"))
                .on_shard(shard),
        },
        // The call broke: the COMMIT may or may not have run.
        Err(other) => Event::OnePhaseUnknown {
            error: format!("shard {shard}: {other}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::StatementResult;

    fn s0() -> ShardName {
        ShardName::new("s0").unwrap()
    }

    #[test]
    fn read_only_counts_as_no_under_three_phase_only() {
        assert_eq!(
            vote(&s0(), Ok(VoteAnswer::ReadOnly), Protocol::TwoPhase),
            Vote::ReadOnly
        );
        assert!(matches!(
            vote(&s0(), Ok(VoteAnswer::ReadOnly), Protocol::ThreePhase),
            Vote::No(_)
        ));
        assert_eq!(vote(&s0(), Ok(VoteAnswer::Yes), Protocol::ThreePhase), Vote::Yes);
    }

    #[test]
    fn anything_but_a_clear_vote_is_a_no() {
        for error in [
            LinkError::TimedOut { after_ms: 5 },
            LinkError::Unavailable("down".into()),
            LinkError::Refused("no".into()),
        ] {
            assert!(matches!(vote(&s0(), Err(error), Protocol::TwoPhase), Vote::No(_)));
        }
        let Vote::No(reason) = vote(
            &s0(),
            Ok(VoteAnswer::No {
                sqlstate: "40001".into(),
                message: "could not serialize".into(),
            }),
            Protocol::TwoPhase,
        ) else {
            panic!("a NO must stay a NO");
        };
        assert!(reason.retryable, "serialization failures are retryable");
        let voted = ExecutedAndVoted {
            result: StatementResult::default(),
            vote: None,
            voted_under: None,
        };
        assert!(matches!(
            early_vote(&s0(), &voted, Protocol::TwoPhase),
            Vote::No(_)
        ));
    }

    #[test]
    fn a_three_phase_early_vote_must_be_cast_under_three_phase() {
        let voted = |under| ExecutedAndVoted {
            result: StatementResult::default(),
            vote: Some(VoteAnswer::Yes),
            voted_under: under,
        };
        assert!(matches!(
            early_vote(&s0(), &voted(Some(Protocol::TwoPhase)), Protocol::ThreePhase),
            Vote::No(_)
        ));
        assert_eq!(
            early_vote(&s0(), &voted(Some(Protocol::ThreePhase)), Protocol::ThreePhase),
            Vote::Yes
        );
        assert_eq!(early_vote(&s0(), &voted(None), Protocol::TwoPhase), Vote::Yes);
    }

    #[test]
    fn a_broken_one_phase_commit_has_an_unknown_outcome() {
        assert!(matches!(
            one_phase(&s0(), Err(LinkError::TimedOut { after_ms: 1 })),
            Event::OnePhaseUnknown { .. }
        ));
        assert!(matches!(
            one_phase(&s0(), Err(LinkError::Refused("gone".into()))),
            Event::OnePhaseFailed { .. }
        ));
        assert_eq!(one_phase(&s0(), Ok(())), Event::OnePhaseCommitted);
    }
}
