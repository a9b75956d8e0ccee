//! Operators' heuristic decisions (`treaty resolve`): the driver gathers what the coordinator and
//! the participants hold, asks the core's rules (`treaty_commit_protocol::heuristic`) what may be
//! done, forces the decision (who, when, why) to the store and carries it out like a normal one.
//! While an untracked transaction is being resolved, `QueryDecision` answers PENDING for it, so no
//! participant rolls back under a heuristic COMMIT; and a transaction once answered ABORT by
//! presumption is never committed by hand.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use treaty_commit_protocol::heuristic::{self, PreparedView, ResolveRefusal, ResolveRequest, TrackedPlan};
use treaty_commit_protocol::store::{DecisionStore, HeuristicDecision, HeuristicRecord};
use treaty_commit_protocol::transport::{
    BranchOptions, LinkError, ParticipantTransport, PreparedBranch, StoredOutcome,
};
use treaty_proto::{ApiError, Gid, ShardName, TxId};

use super::table::TxnHandle;
use super::{Engine, refused};
use crate::protocol::{AbortCause, AbortReason, Event, Outcome, Phase, Transaction};

/// Presumed-abort answers remembered, so that a heuristic COMMIT never overrides one.
const PRESUMED_ABORTS_REMEMBERED: usize = 100_000;
/// How long an untracked resolve waits for each participant's list of prepared branches.
const LIST_PREPARED_TIMEOUT_MS: u64 = 2_000;

/// What `resolve` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveOutcome {
    pub decision: HeuristicDecision,
    /// False when the coordinator already held this decision and recorded nothing new.
    pub recorded: bool,
    pub shards: Vec<String>,
    pub message: String,
}

/// Transactions being resolved by hand, and those answered ABORT by presumption.
#[derive(Default)]
pub(super) struct Resolving {
    state: Mutex<ResolvingState>,
}

#[derive(Default)]
struct ResolvingState {
    in_progress: HashSet<TxId>,
    presumed_aborts: HashSet<TxId>,
    presumed_order: VecDeque<TxId>,
}

impl Resolving {
    fn lock(&self) -> MutexGuard<'_, ResolvingState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether an untracked `txid` may be answered ABORT now (false while an operator resolves
    /// it); remembers the answer when it may.
    pub(super) fn presume_abort(&self, txid: TxId) -> bool {
        let mut state = self.lock();
        if state.in_progress.contains(&txid) {
            return false;
        }
        if state.presumed_aborts.insert(txid) {
            state.presumed_order.push_back(txid);
            if state.presumed_order.len() > PRESUMED_ABORTS_REMEMBERED
                && let Some(old) = state.presumed_order.pop_front()
            {
                state.presumed_aborts.remove(&old);
            }
        }
        true
    }
}

/// Marks a txid as being resolved; unmarks it when dropped, whatever path `resolve` leaves by.
struct ResolvingGuard<'a> {
    resolving: &'a Resolving,
    txid: TxId,
}

impl<'a> ResolvingGuard<'a> {
    fn enter(resolving: &'a Resolving, txid: TxId) -> Result<(ResolvingGuard<'a>, bool), ApiError> {
        let mut state = resolving.lock();
        if !state.in_progress.insert(txid) {
            return Err(ApiError::FailedPrecondition(format!(
                "transaction {txid} is being resolved by another request; check `treaty txn {txid}`"
            )));
        }
        let presumed = state.presumed_aborts.contains(&txid);
        Ok((ResolvingGuard { resolving, txid }, presumed))
    }
}

impl Drop for ResolvingGuard<'_> {
    fn drop(&mut self) {
        self.resolving.lock().in_progress.remove(&self.txid);
    }
}

/// Unix milliseconds as an RFC 3339 UTC time, for messages.
pub fn format_ms(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(
            || format!("unix ms {ms}"),
            |time| time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        )
}

fn describe_heuristic(record: &HeuristicRecord) -> String {
    format!(
        "a heuristic {} by {} at {} ({})",
        record.decision.name(),
        record.operator,
        format_ms(record.decided_at_ms),
        record.reason
    )
}

/// A refusal of the core's rules as the operator hears it.
fn refusal(error: ResolveRefusal) -> ApiError {
    match error {
        ResolveRefusal::NoReason
        | ResolveRefusal::ReasonTooLong(_)
        | ResolveRefusal::NoOperator
        | ResolveRefusal::OperatorTooLong(_) => ApiError::InvalidArgument(error.to_string()),
        ResolveRefusal::NothingToResolve { .. } => ApiError::NotFound(error.to_string()),
        other => ApiError::FailedPrecondition(other.to_string()),
    }
}

/// The decision the coordinator holds for a tracked transaction, described for messages.
fn held_decision(handle: &TxnHandle) -> Option<(HeuristicDecision, String)> {
    if let Some(heuristic) = handle.heuristic() {
        return Some((heuristic.decision, describe_heuristic(&heuristic)));
    }
    let machine = handle.machine();
    let decided_at = format_ms(machine.decided_at_ms().unwrap_or(0));
    match machine.phase() {
        Phase::Committing | Phase::Committed => Some((
            HeuristicDecision::Commit,
            format!("COMMIT (logged at {decided_at})"),
        )),
        Phase::Aborting | Phase::Aborted => {
            let why = match machine.outcome() {
                Some(Outcome::Aborted(reason)) => reason.to_string(),
                _ => "aborted".into(),
            };
            Some((
                HeuristicDecision::Abort,
                format!("ABORT (decided at {decided_at}: {why})"),
            ))
        }
        _ => None,
    }
}

/// What the coordinator holds for a tracked transaction, in the words of `treaty in-doubt`.
pub fn coordinator_view(handle: &TxnHandle) -> String {
    if let Some(heuristic) = handle.heuristic() {
        return format!(
            "{} (heuristic, by {})",
            heuristic.decision.name(),
            heuristic.operator
        );
    }
    let machine = handle.machine();
    match machine.phase() {
        Phase::Committing | Phase::Committed => "COMMIT (logged)".into(),
        Phase::Aborting | Phase::Aborted => match machine.outcome() {
            Some(Outcome::Aborted(reason)) => format!("ABORT ({reason})"),
            _ => "ABORT".into(),
        },
        Phase::OutcomeUnknown => "unknown (one-phase commit answer lost)".into(),
        undecided => format!("in progress ({})", undecided.name()),
    }
}

fn heuristic_reason(request: &ResolveRequest) -> AbortReason {
    AbortReason::new(
        AbortCause::Heuristic,
        format!("aborted by hand by {}: {}", request.operator, request.reason),
    )
}

impl<S: DecisionStore, T: ParticipantTransport> Engine<S, T> {
    /// Every shard's prepared branches (or why it did not answer), asked in parallel.
    pub async fn prepared_everywhere(
        &self,
        timeout_ms: u64,
    ) -> Vec<(ShardName, Result<Vec<PreparedBranch>, LinkError>)> {
        let shards = self.transport.shards();
        let answers = futures::future::join_all(
            shards
                .iter()
                .map(|shard| self.transport.list_prepared(shard, timeout_ms)),
        )
        .await;
        shards.into_iter().zip(answers).collect()
    }

    /// Records and carries out an operator's decision, or says why not (the core's rules).
    pub async fn resolve(self: &Arc<Self>, request: ResolveRequest) -> Result<ResolveOutcome, ApiError> {
        let txid = request.txid;
        if txid == 0 || txid >= self.next_txid() {
            return Err(ApiError::NotFound(format!(
                "transaction {txid} was never begun by coordinator {}",
                self.id
            )));
        }
        match self.tracked(txid) {
            Some(handle) => self.resolve_tracked(&handle, request).await,
            None => self.resolve_untracked(request).await,
        }
    }

    async fn resolve_tracked(
        self: &Arc<Self>,
        handle: &Arc<TxnHandle>,
        request: ResolveRequest,
    ) -> Result<ResolveOutcome, ApiError> {
        let txid = request.txid;
        let phase = handle.machine().phase();
        let shards = || -> Vec<String> {
            handle
                .machine()
                .branches()
                .iter()
                .map(|b| b.shard.to_string())
                .collect()
        };
        match heuristic::plan_tracked(txid, phase, held_decision(handle), request.decision)
            .map_err(refusal)?
        {
            TrackedPlan::AlreadyHeld { held } => {
                return Ok(ResolveOutcome {
                    decision: request.decision,
                    recorded: false,
                    shards: shards(),
                    message: format!(
                        "transaction {txid}: the coordinator already holds {held}; nothing new recorded"
                    ),
                });
            }
            TrackedPlan::AbortInFlight => {}
        }
        // Decided in the machine first, recorded second: the other order could record an abort
        // while the votes complete and a commit record is written beside it. A crash in between
        // leaves an abort the store does not hold, which presumed abort answers the same way.
        self.feed(
            handle,
            Event::HeuristicAbort {
                reason: heuristic_reason(&request),
            },
        )
        .map_err(|error| {
            ApiError::FailedPrecondition(format!("refusing heuristic ABORT: {}", refused(error)))
        })?;
        let participants = shards();
        let record = self
            .force_heuristic(handle.gid(), &request, participants.clone())
            .await?;
        handle.set_heuristic(record);
        // Every abort may have been acknowledged before the note was attached: end it here then.
        if handle.machine().phase() == Phase::Aborted {
            self.store.end(txid);
        }
        Ok(ResolveOutcome {
            decision: HeuristicDecision::Abort,
            recorded: true,
            message: format!(
                "transaction {txid}: heuristic ABORT recorded; it was in flight and is being rolled back on {}",
                participants.join(", ")
            ),
            shards: participants,
        })
    }

    async fn resolve_untracked(
        self: &Arc<Self>,
        request: ResolveRequest,
    ) -> Result<ResolveOutcome, ApiError> {
        let txid = request.txid;
        let (guard, presumed) = ResolvingGuard::enter(&self.resolving, txid)?;
        // A participant may have registered a handle between the lookup and the guard.
        if let Some(handle) = self.tracked(txid) {
            drop(guard);
            return self.resolve_tracked(&handle, request).await;
        }
        let mut gid = Gid::new(&self.id, txid);
        let mut view = PreparedView {
            shards: self.transport.shards(),
            ..PreparedView::default()
        };
        let ours = |text: &str| {
            Gid::parse(text)
                .ok()
                .filter(|g| g.coordinator() == &self.id && g.txid() == txid)
        };
        for (shard, answer) in self.prepared_everywhere(LIST_PREPARED_TIMEOUT_MS).await {
            match answer {
                Ok(branches) => {
                    if let Some(found) = branches.iter().find_map(|b| ours(&b.gid)) {
                        // Under `--decision-store shard` the GID names its decision shard.
                        gid = found;
                        view.holding.push(shard);
                    }
                }
                Err(error) => view.unreachable.push((shard, error.to_string())),
            }
        }
        if let Some(decision_shard) = gid.decision_shard().cloned() {
            return self
                .resolve_by_row(gid, decision_shard, request, view.holding)
                .await;
        }
        let shards = heuristic::plan_untracked(txid, request.decision, presumed, view).map_err(refusal)?;
        self.record_and_drive(gid, request, shards).await
    }

    /// Records an untracked transaction's heuristic decision and carries it out on `shards`.
    async fn record_and_drive(
        self: &Arc<Self>,
        gid: Gid,
        request: ResolveRequest,
        shards: Vec<ShardName>,
    ) -> Result<ResolveOutcome, ApiError> {
        let txid = request.txid;
        let participants: Vec<String> = shards.iter().map(ToString::to_string).collect();
        let record = self.force_heuristic(&gid, &request, participants.clone()).await?;
        let now = self.now_ms();
        let (machine, actions) = match request.decision {
            HeuristicDecision::Commit => {
                Transaction::recover_commit(txid, shards, record.decided_at_ms, self.default_timeouts, now)
            }
            HeuristicDecision::Abort => Transaction::recover_abort(
                txid,
                shards,
                record.decided_at_ms,
                heuristic_reason(&request),
                self.default_timeouts,
                now,
            ),
        };
        let decision = record.decision;
        let handle = self.register(gid, String::new(), BranchOptions::default(), machine);
        handle.set_heuristic(record);
        self.perform(&handle, actions);
        Ok(ResolveOutcome {
            decision,
            recorded: true,
            message: format!(
                "transaction {txid}: heuristic {} recorded; sending it to {}",
                decision.name(),
                participants.join(", ")
            ),
            shards: participants,
        })
    }

    /// `--decision-store shard`: an untracked transaction's decision is its row on `shard`. ABORT
    /// concludes abort there (an abort row, unless a commit row committed first: then it is
    /// refused). COMMIT is allowed only when the row already says commit: without a committed
    /// commit row the decision branch's writes are rolled back or may still commit, so committing
    /// the others would break atomicity. The operator's note goes to the store for the record.
    async fn resolve_by_row(
        self: &Arc<Self>,
        gid: Gid,
        shard: ShardName,
        request: ResolveRequest,
        holding: Vec<ShardName>,
    ) -> Result<ResolveOutcome, ApiError> {
        let txid = request.txid;
        let conclude = request.decision == HeuristicDecision::Abort;
        let rows = self
            .transport
            .read_decisions(&shard, std::slice::from_ref(&gid), conclude, LIST_PREPARED_TIMEOUT_MS)
            .await
            .map_err(|e| {
                ApiError::Unavailable(format!(
                    "transaction {txid}: its decision is a row on shard {shard}, which did not answer ({e}); try again"
                ))
            })?;
        let row = rows.into_iter().find(|row| row.gid == gid);
        let held = row.as_ref().and_then(|row| row.outcome);
        let shards = match (request.decision, held) {
            (HeuristicDecision::Abort, Some(StoredOutcome::Abort)) => holding,
            (HeuristicDecision::Commit, Some(StoredOutcome::Commit)) => {
                row.map(|row| row.participants).unwrap_or_default()
            }
            (HeuristicDecision::Abort, Some(StoredOutcome::Commit)) => {
                return Err(ApiError::FailedPrecondition(format!(
                    "transaction {txid}: its decision row on shard {shard} says COMMIT; a heuristic ABORT would \
                     contradict it (resolve with --commit, or let a coordinator finish it)"
                )));
            }
            (HeuristicDecision::Commit, Some(StoredOutcome::Abort)) => {
                return Err(ApiError::FailedPrecondition(format!(
                    "transaction {txid}: its decision row on shard {shard} says ABORT; a heuristic COMMIT would \
                     contradict it (resolve with --abort)"
                )));
            }
            (HeuristicDecision::Commit, None) => {
                return Err(ApiError::FailedPrecondition(format!(
                    "transaction {txid}: shard {shard} holds no decision row for it, so its decision branch never \
                     committed: those writes are rolled back or may still commit, and committing the other \
                     shards would break atomicity; only --abort can be resolved"
                )));
            }
            (HeuristicDecision::Abort, None) => {
                return Err(ApiError::Unavailable(format!(
                    "transaction {txid}: shard {shard} answered without concluding its decision; try again"
                )));
            }
        };
        self.record_and_drive(gid, request, shards).await
    }

    /// Forces the heuristic record; a store that cannot write stops the coordinator.
    async fn force_heuristic(
        &self,
        gid: &Gid,
        request: &ResolveRequest,
        participants: Vec<String>,
    ) -> Result<HeuristicRecord, ApiError> {
        let record = HeuristicRecord {
            txid: request.txid,
            gid: gid.to_string(),
            decision: request.decision,
            participants,
            operator: request.operator.clone(),
            reason: request.reason.clone(),
            decided_at_ms: self.now_ms(),
        };
        if let Err(error) = self.store.force_heuristic(record.clone()).await {
            return Err(self.store_failed(error));
        }
        crate::metrics::global().heuristic(record.decision == HeuristicDecision::Commit);
        tracing::warn!(
            txid = request.txid,
            decision = record.decision.name(),
            operator = %record.operator,
            reason = %record.reason,
            shards = ?record.participants,
            "heuristic decision recorded"
        );
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presumed_aborts_are_remembered_and_withheld_while_resolving() {
        let resolving = Resolving::default();
        assert!(resolving.presume_abort(7));
        let (guard, presumed) = ResolvingGuard::enter(&resolving, 7).unwrap();
        assert!(presumed, "the ABORT answered for 7 is remembered");
        assert!(!resolving.presume_abort(7), "no ABORT while 7 is being resolved");
        assert!(
            ResolvingGuard::enter(&resolving, 7).is_err(),
            "one resolve at a time"
        );
        drop(guard);
        assert!(resolving.presume_abort(7));
        let (_guard, presumed) = ResolvingGuard::enter(&resolving, 8).unwrap();
        assert!(!presumed);
    }

    #[test]
    fn times_format_as_utc() {
        assert_eq!(format_ms(0), "1970-01-01T00:00:00.000Z");
    }
}
