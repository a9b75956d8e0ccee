//! The rules for an operator's heuristic decision (`treaty resolve`): what may be forced when, and
//! every refusal, as typed values. The driver gathers the facts (what the coordinator holds, what
//! the participants hold prepared) and applies what these functions answer.
//!
//! - A decision the coordinator already holds is never contradicted; the same decision again is
//!   answered idempotently and records nothing new.
//! - A transaction still in flight can only be aborted, and only through the machine
//!   (`Event::HeuristicAbort`), which refuses once the commit decision is being logged.
//! - For a transaction the coordinator does not track (presumed abort), a heuristic COMMIT needs
//!   every shard to answer and to hold the branch prepared (without a record the coordinator cannot
//!   tell which shards the transaction touched, and one without the branch may have rolled it
//!   back), and no participant to have been answered ABORT for it since this coordinator started.
//! - The operator's note: a reason and an operator name are required, each bounded, because they
//!   go into a durable record.

use treaty_types::{ShardName, TxId};

use crate::coordinator::Phase;
use crate::store::HeuristicDecision;

/// Longest reason and operator name accepted (they go into a durable record).
pub const MAX_REASON_BYTES: usize = 4096;
pub const MAX_OPERATOR_BYTES: usize = 256;

/// A validated request to decide a transaction by hand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveRequest {
    pub txid: TxId,
    pub decision: HeuristicDecision,
    pub reason: String,
    pub operator: String,
}

/// Why a heuristic decision is refused. Each message says what the coordinator holds and what the
/// operator can do instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveRefusal {
    #[error("reason is empty: say why this transaction is decided by hand (--reason TEXT)")]
    NoReason,
    #[error("reason is {0} bytes, over the limit of {MAX_REASON_BYTES}")]
    ReasonTooLong(usize),
    #[error("operator is empty: name who decides (--operator NAME, default $USER)")]
    NoOperator,
    #[error("operator is {0} bytes, over the limit of {MAX_OPERATOR_BYTES}")]
    OperatorTooLong(usize),
    #[error("transaction {txid}: the coordinator already holds {held}; refusing heuristic {}", wanted.name())]
    Contradicts {
        txid: TxId,
        held: String,
        wanted: HeuristicDecision,
    },
    #[error(
        "transaction {txid} is still in flight on this coordinator ({phase}): only the protocol decides a \
         commit, from every participant's vote; refusing heuristic COMMIT (--abort can cut it short)"
    )]
    CommitInFlight { txid: TxId, phase: &'static str },
    #[error(
        "transaction {txid} is {phase} on this coordinator; refusing heuristic {} (ask `treaty txn {txid}` \
         for its outcome)", wanted.name()
    )]
    BeingDecided {
        txid: TxId,
        phase: &'static str,
        wanted: HeuristicDecision,
    },
    #[error(
        "transaction {txid}: the coordinator holds no commit decision for it and has already answered ABORT \
         (presumed abort) to a participant, which may have rolled back; refusing heuristic COMMIT"
    )]
    AbortAlreadyAnswered { txid: TxId },
    #[error(
        "transaction {txid}: shard {shard} did not answer ({error}); a heuristic COMMIT of a transaction the \
         coordinator does not track needs every shard's view; refusing"
    )]
    ShardUnreachable {
        txid: TxId,
        shard: ShardName,
        error: String,
    },
    #[error(
        "transaction {txid}: no shard holds its branch prepared, so there is nothing to commit; refusing \
         heuristic COMMIT"
    )]
    NothingToCommit { txid: TxId },
    #[error(
        "transaction {txid}: the coordinator holds no record of it (presumed abort) and shard(s) {missing:?} \
         do not hold its branch prepared; they may have rolled it back, so a heuristic COMMIT on {holding:?} \
         could half-commit it; refusing (use --abort)"
    )]
    WouldHalfCommit {
        txid: TxId,
        missing: Vec<ShardName>,
        holding: Vec<ShardName>,
    },
    #[error(
        "transaction {txid}: no shard holds its branch prepared and the coordinator does not track it; \
         nothing to resolve"
    )]
    NothingToResolve { txid: TxId },
    #[error(
        "transaction {txid}: no reachable shard holds its branch prepared and shard {shard} did not answer \
         ({error}); it may have committed the transaction, so a heuristic ABORT could contradict that; \
         retry when it answers"
    )]
    OnlyUnreachableMayHoldIt {
        txid: TxId,
        shard: ShardName,
        error: String,
    },
}

impl ResolveRequest {
    /// Checks the operator's note: a reason and an operator name, trimmed, each within its bound.
    pub fn new(
        txid: TxId,
        decision: HeuristicDecision,
        reason: &str,
        operator: &str,
    ) -> Result<Self, ResolveRefusal> {
        let reason = reason.trim();
        let operator = operator.trim();
        if reason.is_empty() {
            return Err(ResolveRefusal::NoReason);
        }
        if reason.len() > MAX_REASON_BYTES {
            return Err(ResolveRefusal::ReasonTooLong(reason.len()));
        }
        if operator.is_empty() {
            return Err(ResolveRefusal::NoOperator);
        }
        if operator.len() > MAX_OPERATOR_BYTES {
            return Err(ResolveRefusal::OperatorTooLong(operator.len()));
        }
        Ok(Self {
            txid,
            decision,
            reason: reason.to_owned(),
            operator: operator.to_owned(),
        })
    }
}

/// What to do with a heuristic request for a transaction the coordinator tracks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrackedPlan {
    /// The coordinator already holds this very decision (`held` describes it): record nothing.
    AlreadyHeld { held: String },
    /// Abort the in-flight transaction through the machine (`Event::HeuristicAbort`), then record
    /// the operator's note.
    AbortInFlight,
}

/// The rule for a tracked transaction. `held`: the decision the coordinator holds, if any, with a
/// description for messages.
pub fn plan_tracked(
    txid: TxId,
    phase: Phase,
    held: Option<(HeuristicDecision, String)>,
    wanted: HeuristicDecision,
) -> Result<TrackedPlan, ResolveRefusal> {
    if let Some((decision, held)) = held {
        if decision != wanted {
            return Err(ResolveRefusal::Contradicts { txid, held, wanted });
        }
        return Ok(TrackedPlan::AlreadyHeld { held });
    }
    match (phase, wanted) {
        (Phase::Active | Phase::Preparing, HeuristicDecision::Abort) => Ok(TrackedPlan::AbortInFlight),
        (Phase::Active | Phase::Preparing, HeuristicDecision::Commit) => {
            Err(ResolveRefusal::CommitInFlight {
                txid,
                phase: phase.name(),
            })
        }
        _ => Err(ResolveRefusal::BeingDecided {
            txid,
            phase: phase.name(),
            wanted,
        }),
    }
}

/// What the participants answered about an untracked transaction's branch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PreparedView {
    /// Every configured shard.
    pub shards: Vec<ShardName>,
    /// The shards that hold the branch prepared.
    pub holding: Vec<ShardName>,
    /// The shards that did not answer, with why.
    pub unreachable: Vec<(ShardName, String)>,
}

/// The rule for a transaction the coordinator does not track: the shards to send the decision to,
/// or why not. `abort_answered`: this coordinator already answered ABORT (presumed) for it.
pub fn plan_untracked(
    txid: TxId,
    wanted: HeuristicDecision,
    abort_answered: bool,
    view: PreparedView,
) -> Result<Vec<ShardName>, ResolveRefusal> {
    match wanted {
        HeuristicDecision::Commit => {
            if abort_answered {
                return Err(ResolveRefusal::AbortAlreadyAnswered { txid });
            }
            if let Some((shard, error)) = view.unreachable.into_iter().next() {
                return Err(ResolveRefusal::ShardUnreachable { txid, shard, error });
            }
            if view.holding.is_empty() {
                return Err(ResolveRefusal::NothingToCommit { txid });
            }
            let missing: Vec<ShardName> = view
                .shards
                .into_iter()
                .filter(|shard| !view.holding.contains(shard))
                .collect();
            if !missing.is_empty() {
                return Err(ResolveRefusal::WouldHalfCommit {
                    txid,
                    missing,
                    holding: view.holding,
                });
            }
            Ok(view.holding)
        }
        HeuristicDecision::Abort => {
            if view.holding.is_empty() {
                // With no shard holding the branch, an unreachable one may have committed it: a
                // transaction committed everywhere and then forgotten (its end record written)
                // looks just like this. An abort sent there would contradict a commit.
                return match view.unreachable.into_iter().next() {
                    Some((shard, error)) => {
                        Err(ResolveRefusal::OnlyUnreachableMayHoldIt { txid, shard, error })
                    }
                    None => Err(ResolveRefusal::NothingToResolve { txid }),
                };
            }
            // Some shard still holds the branch prepared, so no commit decision was ever carried
            // out to the end (the end record comes only after every participant committed), and
            // an unreachable shard cannot have committed it: the abort goes there as well (a shard
            // without the branch answers that there is nothing to roll back).
            let mut participants = view.holding;
            participants.extend(view.unreachable.into_iter().map(|(shard, _)| shard));
            Ok(participants)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shards(names: &[&str]) -> Vec<ShardName> {
        names.iter().map(|s| ShardName::new(s).unwrap()).collect()
    }

    #[test]
    fn the_operators_note_is_required_and_bounded() {
        use HeuristicDecision::Abort;
        assert_eq!(
            ResolveRequest::new(1, Abort, " ", "ann"),
            Err(ResolveRefusal::NoReason)
        );
        assert_eq!(
            ResolveRequest::new(1, Abort, "why", ""),
            Err(ResolveRefusal::NoOperator)
        );
        let long = "x".repeat(MAX_REASON_BYTES + 1);
        assert!(matches!(
            ResolveRequest::new(1, Abort, &long, "ann"),
            Err(ResolveRefusal::ReasonTooLong(_))
        ));
        let ok = ResolveRequest::new(1, Abort, " stuck ", " ann ").unwrap();
        assert_eq!((ok.reason.as_str(), ok.operator.as_str()), ("stuck", "ann"));
    }

    #[test]
    fn a_held_decision_is_never_contradicted() {
        let held = Some((HeuristicDecision::Commit, "COMMIT (logged)".to_owned()));
        assert!(matches!(
            plan_tracked(7, Phase::Committing, held.clone(), HeuristicDecision::Abort),
            Err(ResolveRefusal::Contradicts { .. })
        ));
        assert!(matches!(
            plan_tracked(7, Phase::Committing, held, HeuristicDecision::Commit),
            Ok(TrackedPlan::AlreadyHeld { .. })
        ));
    }

    #[test]
    fn in_flight_transactions_can_only_be_aborted_and_only_before_the_commit_is_logged() {
        assert_eq!(
            plan_tracked(7, Phase::Preparing, None, HeuristicDecision::Abort),
            Ok(TrackedPlan::AbortInFlight)
        );
        assert!(matches!(
            plan_tracked(7, Phase::Active, None, HeuristicDecision::Commit),
            Err(ResolveRefusal::CommitInFlight { .. })
        ));
        assert!(matches!(
            plan_tracked(7, Phase::LoggingCommit, None, HeuristicDecision::Abort),
            Err(ResolveRefusal::BeingDecided { .. })
        ));
    }

    #[test]
    fn an_untracked_commit_needs_every_shard_holding_the_branch() {
        let view = |holding: &[&str], unreachable: &[&str]| PreparedView {
            shards: shards(&["s0", "s1"]),
            holding: shards(holding),
            unreachable: shards(unreachable)
                .into_iter()
                .map(|s| (s, "down".into()))
                .collect(),
        };
        use HeuristicDecision::{Abort, Commit};
        assert_eq!(
            plan_untracked(7, Commit, false, view(&["s0", "s1"], &[])),
            Ok(shards(&["s0", "s1"]))
        );
        assert!(matches!(
            plan_untracked(7, Commit, false, view(&["s0"], &[])),
            Err(ResolveRefusal::WouldHalfCommit { .. })
        ));
        assert!(matches!(
            plan_untracked(7, Commit, false, view(&["s0"], &["s1"])),
            Err(ResolveRefusal::ShardUnreachable { .. })
        ));
        assert!(matches!(
            plan_untracked(7, Commit, true, view(&["s0", "s1"], &[])),
            Err(ResolveRefusal::AbortAlreadyAnswered { .. })
        ));
        assert_eq!(
            plan_untracked(7, Abort, true, view(&["s0"], &["s1"])),
            Ok(shards(&["s0", "s1"]))
        );
        assert!(matches!(
            plan_untracked(7, Abort, false, view(&[], &[])),
            Err(ResolveRefusal::NothingToResolve { .. })
        ));
        assert!(
            matches!(
                plan_untracked(7, Abort, false, view(&[], &["s1"])),
                Err(ResolveRefusal::OnlyUnreachableMayHoldIt { .. })
            ),
            "a committed and forgotten transaction must not be aborted on the shard that did not answer"
        );
    }
}
