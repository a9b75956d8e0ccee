//! In-doubt tooling for operators: `list_in_doubt` asks every participant for the branches it holds
//! prepared (with their locks) and adds what the coordinator knows of each transaction; `resolve`
//! records a heuristic decision (who, when, why) durably and carries it out like a normal one.
//!
//! Safety rules of `resolve` (each refusal is FAILED_PRECONDITION naming what the coordinator holds):
//! - a decision the coordinator already holds is never contradicted; the same decision again is
//!   answered idempotently and logs nothing new;
//! - a transaction still in flight can only be aborted, and only through the state machine
//!   (`Event::HeuristicAbort`), which refuses once the commit decision is being logged;
//! - for a transaction the coordinator does not track (presumed abort), a heuristic COMMIT needs
//!   every shard to answer and to hold the branch prepared (without a record the coordinator
//!   cannot tell which shards the transaction touched, and one without the branch may have rolled
//!   it back), and no participant to have been answered ABORT for it since this coordinator started; while it is being resolved,
//!   `QueryDecision` answers PENDING so no participant rolls back under it.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use treaty_decision_log::{HeuristicDecision, HeuristicRecord};
use treaty_proto::{ApiError, BranchGid, Gid, ShardName, TxId, pb};

use super::{Engine, TxnHandle, now_ms};
use crate::protocol::{AbortCause, AbortReason, Outcome, Phase, Transaction};

/// Presumed-abort answers remembered, so that a heuristic COMMIT never overrides one.
const PRESUMED_ABORTS_REMEMBERED: usize = 100_000;
/// Longest reason and operator name accepted (they go into a log record).
const MAX_REASON_BYTES: usize = 4096;
const MAX_OPERATOR_BYTES: usize = 256;
/// Per-participant wait of `ListInDoubt` when the request names none.
const DEFAULT_PARTICIPANT_TIMEOUT: Duration = Duration::from_secs(2);

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

/// A validated `Resolve` request.
pub struct ResolveRequest {
    pub txid: TxId,
    pub decision: HeuristicDecision,
    pub reason: String,
    pub operator: String,
}

impl TryFrom<pb::ResolveRequest> for ResolveRequest {
    type Error = ApiError;

    fn try_from(request: pb::ResolveRequest) -> Result<Self, ApiError> {
        let reason = request.reason.trim().to_owned();
        let operator = request.operator.trim().to_owned();
        if reason.is_empty() {
            return Err(ApiError::InvalidArgument(
                "reason is empty: say why this transaction is decided by hand (--reason TEXT)".into(),
            ));
        }
        if reason.len() > MAX_REASON_BYTES {
            return Err(ApiError::InvalidArgument(format!(
                "reason is {} bytes, over the limit of {MAX_REASON_BYTES}",
                reason.len()
            )));
        }
        if operator.is_empty() {
            return Err(ApiError::InvalidArgument(
                "operator is empty: name who decides (--operator NAME, default $USER)".into(),
            ));
        }
        if operator.len() > MAX_OPERATOR_BYTES {
            return Err(ApiError::InvalidArgument(format!(
                "operator is {} bytes, over the limit of {MAX_OPERATOR_BYTES}",
                operator.len()
            )));
        }
        Ok(ResolveRequest {
            txid: request.txid,
            decision: if request.commit {
                HeuristicDecision::Commit
            } else {
                HeuristicDecision::Abort
            },
            reason,
            operator,
        })
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

pub fn heuristic_to_pb(record: &HeuristicRecord) -> pb::Heuristic {
    pb::Heuristic {
        commit: record.decision == HeuristicDecision::Commit,
        operator: record.operator.clone(),
        reason: record.reason.clone(),
        decided_at_ms: record.decided_at_ms,
    }
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

fn heuristic_reason(request: &ResolveRequest) -> AbortReason {
    AbortReason::new(
        AbortCause::Heuristic,
        format!("aborted by hand by {}: {}", request.operator, request.reason),
    )
}

/// What the coordinator holds for a tracked transaction, in the words of `treaty in-doubt`.
fn coordinator_view(handle: &TxnHandle) -> String {
    let machine = handle.machine();
    let phase = machine.phase();
    if let Some(heuristic) = handle.heuristic() {
        return format!(
            "{} (heuristic, by {})",
            heuristic.decision.name(),
            heuristic.operator
        );
    }
    match phase {
        Phase::Committing | Phase::Committed => "COMMIT (logged)".into(),
        Phase::Aborting | Phase::Aborted => match machine.outcome() {
            Some(Outcome::Aborted(reason)) => format!("ABORT ({reason})"),
            _ => "ABORT".into(),
        },
        Phase::OutcomeUnknown => "unknown (one-phase commit answer lost)".into(),
        undecided => format!("in progress ({})", undecided.name()),
    }
}

impl Engine {
    /// Every prepared branch on every shard, with the coordinator's view of its transaction.
    /// A shard that does not answer within the timeout is listed as unreachable.
    pub async fn list_in_doubt(&self, participant_timeout: Option<Duration>) -> pb::ListInDoubtResponse {
        let timeout = participant_timeout.unwrap_or(DEFAULT_PARTICIPANT_TIMEOUT);
        let shards: Vec<ShardName> = self.links.shard_names().cloned().collect();
        let answers = futures::future::join_all(
            shards
                .iter()
                .map(|shard| self.links.list_prepared(shard, timeout)),
        )
        .await;
        let mut response = pb::ListInDoubtResponse::default();
        for (shard, answer) in shards.iter().zip(answers) {
            let listed = match answer {
                Ok(listed) => listed,
                Err(error) => {
                    response.unreachable.push(pb::UnreachableShard {
                        shard: shard.to_string(),
                        error: error.to_string(),
                    });
                    continue;
                }
            };
            for branch in listed.branches {
                response.branches.push(self.in_doubt_branch(shard, branch));
            }
        }
        response
    }

    fn in_doubt_branch(&self, shard: &ShardName, branch: pb::PreparedBranch) -> pb::InDoubtBranch {
        // Participants report their branches under the transaction's GID; a branch GID (naming a
        // shard, e.g. one this participant does not own) is read back to its transaction too.
        let (txid, view, heuristic) = match BranchGid::parse(&branch.gid).map(|b| b.gid().clone()) {
            Ok(gid) if gid.coordinator() == &self.id => match self.table().get(gid.txid()).cloned() {
                Some(handle) => (
                    gid.txid(),
                    coordinator_view(&handle),
                    handle.heuristic().as_ref().map(heuristic_to_pb),
                ),
                None => (gid.txid(), "no decision: presumed abort".to_owned(), None),
            },
            Ok(gid) => (
                gid.txid(),
                format!("belongs to coordinator {}", gid.coordinator()),
                None,
            ),
            Err(error) => (0, format!("not a Treaty GID this build reads: {error}"), None),
        };
        pb::InDoubtBranch {
            txid,
            shard: shard.to_string(),
            gid: branch.gid,
            prepared_at_ms: branch.prepared_at_ms,
            age_ms: branch.age_ms,
            coordinator_decision: view,
            locks: branch.locks,
            heuristic,
        }
    }

    /// Records and carries out an operator's decision (see the module documentation for when it
    /// is refused).
    pub async fn resolve(self: &Arc<Self>, request: ResolveRequest) -> Result<pb::ResolveResponse, ApiError> {
        let txid = request.txid;
        if txid == 0 || txid >= self.next_txid() {
            return Err(ApiError::NotFound(format!(
                "transaction {txid} was never begun by coordinator {}",
                self.id
            )));
        }
        let tracked = self.table().get(txid).cloned();
        match tracked {
            Some(handle) => self.resolve_tracked(&handle, request).await,
            None => self.resolve_untracked(request).await,
        }
    }

    async fn resolve_tracked(
        self: &Arc<Self>,
        handle: &Arc<TxnHandle>,
        request: ResolveRequest,
    ) -> Result<pb::ResolveResponse, ApiError> {
        let txid = request.txid;
        let wanted = request.decision;
        let (phase, decided_at_ms) = {
            let machine = handle.machine();
            (machine.phase(), machine.decided_at_ms().unwrap_or(0))
        };
        let shards = || -> Vec<String> {
            handle
                .machine()
                .branches()
                .iter()
                .map(|b| b.shard.to_string())
                .collect()
        };
        let held = match (handle.heuristic(), phase) {
            (Some(heuristic), _) => Some((heuristic.decision, describe_heuristic(&heuristic))),
            (None, Phase::Committing | Phase::Committed) => Some((
                HeuristicDecision::Commit,
                format!("COMMIT (logged at {})", format_ms(decided_at_ms)),
            )),
            (None, Phase::Aborting | Phase::Aborted) => {
                let why = match handle.machine().outcome() {
                    Some(Outcome::Aborted(reason)) => reason.to_string(),
                    _ => "aborted".into(),
                };
                Some((
                    HeuristicDecision::Abort,
                    format!("ABORT (decided at {}: {why})", format_ms(decided_at_ms)),
                ))
            }
            _ => None,
        };
        if let Some((decision, what)) = held {
            if decision != wanted {
                return Err(ApiError::FailedPrecondition(format!(
                    "transaction {txid}: the coordinator already holds {what}; refusing heuristic {}",
                    wanted.name()
                )));
            }
            return Ok(pb::ResolveResponse {
                decision: decision.name().into(),
                recorded: false,
                shards: shards(),
                message: format!(
                    "transaction {txid}: the coordinator already holds {what}; nothing new recorded"
                ),
            });
        }
        match (phase, wanted) {
            (Phase::Active | Phase::Preparing, HeuristicDecision::Abort) => {}
            (Phase::Active | Phase::Preparing, HeuristicDecision::Commit) => {
                return Err(ApiError::FailedPrecondition(format!(
                    "transaction {txid} is still in flight on this coordinator ({}): only the protocol \
                     decides a commit, from every participant's vote; refusing heuristic COMMIT \
                     (--abort can cut it short)",
                    phase.name()
                )));
            }
            _ => {
                return Err(ApiError::FailedPrecondition(format!(
                    "transaction {txid} is {} on this coordinator; refusing heuristic {} (ask \
                     `treaty txn {txid}` for its outcome)",
                    phase.name(),
                    wanted.name()
                )));
            }
        }
        // Decided in the machine first, logged second: the other order could log an abort while
        // the votes complete and a commit record is written beside it. A crash in between leaves
        // an abort the log does not hold, which presumed abort answers the same way.
        self.feed(
            handle,
            crate::protocol::Event::HeuristicAbort {
                reason: heuristic_reason(&request),
            },
        )
        .map_err(|refused| ApiError::FailedPrecondition(format!("refusing heuristic ABORT: {refused}")))?;
        let participants = shards();
        let record = self
            .log_heuristic(&handle.gid, &request, participants.clone())
            .await?;
        *handle
            .heuristic
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(record);
        // Every abort may have been acknowledged before the note was attached: end it here then.
        if handle.machine().phase() == Phase::Aborted {
            self.log.end(txid);
        }
        Ok(pb::ResolveResponse {
            decision: "ABORT".into(),
            recorded: true,
            message: format!(
                "transaction {txid}: heuristic ABORT recorded; it was in flight and is being rolled \
                 back on {}",
                participants.join(", ")
            ),
            shards: participants,
        })
    }

    async fn resolve_untracked(
        self: &Arc<Self>,
        request: ResolveRequest,
    ) -> Result<pb::ResolveResponse, ApiError> {
        let txid = request.txid;
        let (_guard, presumed) = ResolvingGuard::enter(&self.resolving, txid)?;
        // A participant may have registered a handle between the lookup and the guard.
        let tracked = self.table().get(txid).cloned();
        if let Some(handle) = tracked {
            drop(_guard);
            return self.resolve_tracked(&handle, request).await;
        }
        if request.decision == HeuristicDecision::Commit && presumed {
            return Err(ApiError::FailedPrecondition(format!(
                "transaction {txid}: the coordinator holds no commit decision for it and has already \
                 answered ABORT (presumed abort) to a participant, which may have rolled back; \
                 refusing heuristic COMMIT"
            )));
        }
        let gid = Gid::new(&self.id, txid);
        let listing = self.list_in_doubt(None).await;
        let unreachable: Vec<String> = listing.unreachable.iter().map(|u| u.shard.clone()).collect();
        let holding: Vec<String> = listing
            .branches
            .iter()
            .filter(|b| b.gid == gid.to_string())
            .map(|b| b.shard.clone())
            .collect();
        if request.decision == HeuristicDecision::Commit {
            if let Some(down) = listing.unreachable.first() {
                return Err(ApiError::FailedPrecondition(format!(
                    "transaction {txid}: shard {} did not answer ({}); a heuristic COMMIT of a \
                     transaction the coordinator does not track needs every shard's view; refusing",
                    down.shard, down.error
                )));
            }
            if holding.is_empty() {
                return Err(ApiError::FailedPrecondition(format!(
                    "transaction {txid}: no shard holds its branch {gid} prepared, so there is nothing \
                     to commit; refusing heuristic COMMIT"
                )));
            }
            // Without a record the coordinator cannot know which shards the transaction touched:
            // a shard without the branch may have rolled it back (an abort sent before a restart
            // is not logged under presumed abort), so committing the others could half-commit it.
            // Only when every shard still holds it prepared is a commit certainly all-or-nothing.
            let missing: Vec<String> = self
                .links
                .shard_names()
                .map(|shard| shard.to_string())
                .filter(|shard| !holding.contains(shard))
                .collect();
            if !missing.is_empty() {
                return Err(ApiError::FailedPrecondition(format!(
                    "transaction {txid}: the coordinator holds no record of it (presumed abort) and \
                     shard(s) {} do not hold its branch {gid} prepared; they may have rolled it back, \
                     so a heuristic COMMIT on {} could half-commit it; refusing (use --abort)",
                    missing.join(", "),
                    holding.join(", ")
                )));
            }
        } else if holding.is_empty() && unreachable.is_empty() {
            return Err(ApiError::NotFound(format!(
                "transaction {txid}: no shard holds its branch {gid} prepared and the coordinator \
                 does not track it; nothing to resolve"
            )));
        }
        // An unreachable shard may hold the branch too: an abort is sent there as well (a shard
        // without it answers that there is nothing to roll back).
        let mut participants = holding;
        if request.decision == HeuristicDecision::Abort {
            participants.extend(unreachable);
        }
        let record = self.log_heuristic(&gid, &request, participants.clone()).await?;
        let shards: Vec<ShardName> = participants
            .iter()
            .filter_map(|name| self.links.resolve(name).ok())
            .collect();
        let now = now_ms();
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
        let decision = record.decision.name();
        let handle = self.register(gid, String::new(), pb::BranchOptions::default(), machine);
        *handle
            .heuristic
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(record);
        self.perform(&handle, actions);
        Ok(pb::ResolveResponse {
            decision: decision.into(),
            recorded: true,
            message: format!(
                "transaction {txid}: heuristic {decision} recorded; sending it to {}",
                participants.join(", ")
            ),
            shards: participants,
        })
    }

    /// Forces the heuristic record to the log; a log that cannot write stops the coordinator.
    async fn log_heuristic(
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
            decided_at_ms: now_ms(),
        };
        if let Err(error) = self.log.heuristic(record.clone()).await {
            return Err(self.log_failed(error));
        }
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

    /// Attaches the heuristic decisions found in the log to the transactions `recover` rebuilt,
    /// and re-drives heuristic aborts (whose branches may still be prepared).
    pub fn recover_heuristics(self: &Arc<Self>, heuristics: Vec<HeuristicRecord>) {
        for record in heuristics {
            let txid = record.txid;
            if let Some(handle) = self.table().get(txid).cloned() {
                *handle
                    .heuristic
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(record);
                continue;
            }
            let gid = match Gid::parse(&record.gid) {
                Ok(gid) => gid,
                Err(e) => {
                    tracing::error!(txid, gid = record.gid, "unusable GID in a heuristic record: {e}");
                    continue;
                }
            };
            let shards: Vec<ShardName> = record
                .participants
                .iter()
                .filter_map(|name| self.links.resolve(name).ok())
                .collect();
            let reason = AbortReason::new(
                AbortCause::Heuristic,
                format!("aborted by hand by {}: {}", record.operator, record.reason),
            );
            let (machine, actions) = Transaction::recover_abort(
                txid,
                shards,
                record.decided_at_ms,
                reason,
                self.default_timeouts,
                now_ms(),
            );
            tracing::info!(txid, "re-driving a logged heuristic abort");
            let handle = self.register(gid, String::new(), pb::BranchOptions::default(), machine);
            *handle
                .heuristic
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(record);
            self.perform(&handle, actions);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_requests_need_a_reason_and_an_operator() {
        let request = |reason: &str, operator: &str| pb::ResolveRequest {
            txid: 5,
            commit: false,
            reason: reason.into(),
            operator: operator.into(),
        };
        let error = ResolveRequest::try_from(request("  ", "alice")).err().unwrap();
        assert!(matches!(error, ApiError::InvalidArgument(m) if m.contains("reason")));
        let error = ResolveRequest::try_from(request("why", "")).err().unwrap();
        assert!(matches!(error, ApiError::InvalidArgument(m) if m.contains("operator")));
        let ok = ResolveRequest::try_from(request(" lost host ", "alice")).unwrap();
        assert_eq!(
            (ok.reason.as_str(), ok.decision),
            ("lost host", HeuristicDecision::Abort)
        );
    }

    #[test]
    fn presumed_aborts_are_remembered_and_withheld_while_resolving() {
        let resolving = Resolving::default();
        let (guard, presumed) = ResolvingGuard::enter(&resolving, 4).unwrap();
        assert!(!presumed);
        assert!(
            !resolving.presume_abort(4),
            "PENDING while an operator resolves it"
        );
        assert!(ResolvingGuard::enter(&resolving, 4).is_err());
        drop(guard);
        assert!(resolving.presume_abort(4));
        let (_guard, presumed) = ResolvingGuard::enter(&resolving, 4).unwrap();
        assert!(
            presumed,
            "a later heuristic COMMIT must see the ABORT already answered"
        );
    }

    #[test]
    fn times_format_as_utc() {
        assert_eq!(format_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }
}
