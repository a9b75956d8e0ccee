//! What the console shows, read through the same functions the gRPC service answers with
//! (`service::info_to_pb` for `GetTransaction`/`ListTransactions`, `in_doubt::list` for
//! `ListInDoubt`, `Engine::resolve` for `Resolve`), turned into plain serializable views. Both
//! the HTML pages and the JSON endpoints are built from these, so they never disagree.

use serde::Serialize;
use treaty_proto::pb;

use crate::CoordinatorEngine;
use crate::driver::TxnHandle;
use crate::driver::timeline::Subject;
use crate::protocol::{BranchPhase, Phase};
use crate::service::info_to_pb;

/// Transactions listed when the request names no limit, and the most it may ask for.
pub const DEFAULT_LIMIT: usize = 200;
pub const MAX_LIMIT: usize = 10_000;

/// Which transactions the list shows, by their phase (the first two as `ListTransactions`'
/// `ACTIVE` and `IN_DOUBT` filters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StateFilter {
    #[default]
    All,
    /// Not decided yet.
    Active,
    /// Decided, phase two not finished.
    InDoubt,
    /// Committed or aborted: the recent history the coordinator keeps.
    Finished,
}

impl StateFilter {
    pub const ALL: [StateFilter; 4] = [
        StateFilter::All,
        StateFilter::Active,
        StateFilter::InDoubt,
        StateFilter::Finished,
    ];

    pub fn name(self) -> &'static str {
        match self {
            StateFilter::All => "all",
            StateFilter::Active => "active",
            StateFilter::InDoubt => "in-doubt",
            StateFilter::Finished => "finished",
        }
    }

    pub fn parse(text: &str) -> Option<StateFilter> {
        StateFilter::ALL.into_iter().find(|filter| filter.name() == text)
    }

    pub fn keeps(self, phase: Phase) -> bool {
        match self {
            StateFilter::All => true,
            StateFilter::Active => phase.is_undecided(),
            StateFilter::InDoubt => phase.is_in_doubt(),
            StateFilter::Finished => !phase.is_undecided() && !phase.is_in_doubt(),
        }
    }
}

/// The transactions page's filters, from its query string.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Filters {
    pub state: StateFilter,
    /// Substring of the client's label.
    pub label: String,
    /// A shard the transaction has a branch on.
    pub shard: String,
    pub limit: usize,
}

impl Filters {
    /// Reads `state`, `label`, `shard` and `limit`; an unknown state or a bad limit is refused
    /// with a message naming what is accepted.
    pub fn from_query(pairs: &[(String, String)]) -> Result<Filters, String> {
        let mut filters = Filters {
            limit: DEFAULT_LIMIT,
            ..Filters::default()
        };
        for (key, value) in pairs {
            let value = value.trim();
            match key.as_str() {
                "state" if value.is_empty() => {}
                "state" => {
                    filters.state = StateFilter::parse(value).ok_or_else(|| {
                        format!("unknown state filter {value:?}: use all, active, in-doubt or finished")
                    })?;
                }
                "label" => filters.label = value.to_owned(),
                "shard" => filters.shard = value.to_owned(),
                "limit" if value.is_empty() => {}
                "limit" => {
                    filters.limit = value
                        .parse::<usize>()
                        .ok()
                        .filter(|limit| (1..=MAX_LIMIT).contains(limit))
                        .ok_or_else(|| format!("limit {value:?}: expected a number from 1 to {MAX_LIMIT}"))?;
                }
                // `live` is the page's own refresh; anything else is ignored like a browser would.
                _ => {}
            }
        }
        Ok(filters)
    }

    fn keeps(&self, handle: &TxnHandle) -> bool {
        let machine = handle.machine();
        self.state.keeps(machine.phase())
            && (self.label.is_empty() || handle.label.contains(&self.label))
            && (self.shard.is_empty() || machine.branches().iter().any(|b| b.shard.as_str() == self.shard))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BranchView {
    pub shard: String,
    pub state: String,
    /// Phase-two sends so far.
    pub attempts: u32,
    pub last_error: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct HeuristicView {
    pub decision: &'static str,
    pub operator: String,
    pub reason: String,
    pub decided_at_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TransactionView {
    pub txid: u64,
    pub gid: String,
    pub state: String,
    pub protocol: String,
    pub label: String,
    pub begun_at_ms: u64,
    /// 0 until decided (and for a transaction recovered from the log, which does not know it).
    pub decided_at_ms: u64,
    pub finished_at_ms: u64,
    /// "committed", "aborted: <cause> ...", or empty while undecided.
    pub outcome: String,
    pub recovered: bool,
    pub heuristic: Option<HeuristicView>,
    pub branches: Vec<BranchView>,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Counts {
    pub active: usize,
    pub in_doubt: usize,
    pub finished: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct TransactionList {
    pub coordinator: String,
    pub now_ms: u64,
    pub filters: Filters,
    /// Every tracked transaction by state, whatever the filters.
    pub counts: Counts,
    pub transactions: Vec<TransactionView>,
}

/// One mark of the timeline: the transaction (`shard` empty) or a shard's branch entering a phase.
#[derive(Debug, Clone, Serialize)]
pub struct MarkView {
    pub at_ms: u64,
    pub shard: String,
    pub phase: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct TransactionDetail {
    pub coordinator: String,
    pub now_ms: u64,
    pub transaction: TransactionView,
    pub timeline: Vec<MarkView>,
    /// Earlier marks dropped to keep the record bounded.
    pub timeline_dropped: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LockView {
    pub locktype: String,
    pub mode: String,
    pub relation: String,
    pub granted: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct InDoubtView {
    pub txid: u64,
    pub shard: String,
    pub gid: String,
    pub prepared_at_ms: u64,
    /// As the participant measured it when asked, just now.
    pub age_ms: u64,
    /// What this coordinator holds for the transaction.
    pub coordinator_decision: String,
    pub heuristic: Option<HeuristicView>,
    pub locks: Vec<LockView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct UnreachableView {
    pub shard: String,
    pub error: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct InDoubtList {
    pub coordinator: String,
    pub now_ms: u64,
    pub branches: Vec<InDoubtView>,
    pub unreachable: Vec<UnreachableView>,
}

/// `TRANSACTION_STATE_PRE_COMMITTING` → `pre-committing`: the wire name without its prefix.
fn wire_name(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix)
        .unwrap_or(full)
        .to_ascii_lowercase()
        .replace('_', "-")
}

fn heuristic_view(heuristic: pb::Heuristic) -> HeuristicView {
    HeuristicView {
        decision: if heuristic.commit { "COMMIT" } else { "ABORT" },
        operator: heuristic.operator,
        reason: heuristic.reason,
        decided_at_ms: heuristic.decided_at_ms,
    }
}

fn outcome_text(outcome: Option<pb::Outcome>) -> String {
    let Some(outcome) = outcome else {
        return String::new();
    };
    match pb::OutcomeKind::try_from(outcome.kind) {
        Ok(pb::OutcomeKind::Committed) => "committed".into(),
        Ok(pb::OutcomeKind::Aborted) => match outcome.abort {
            Some(reason) => {
                let cause = pb::AbortCause::try_from(reason.cause)
                    .map(|c| wire_name(c.as_str_name(), "ABORT_CAUSE_"))
                    .unwrap_or_else(|_| reason.cause.to_string());
                let shard = if reason.shard.is_empty() {
                    String::new()
                } else {
                    format!(" on {}", reason.shard)
                };
                format!("aborted ({cause}{shard}): {}", reason.message)
            }
            None => "aborted".into(),
        },
        _ => String::new(),
    }
}

/// The transaction as `GetTransaction` reports it.
pub fn transaction_view(handle: &TxnHandle) -> TransactionView {
    let info = info_to_pb(handle);
    let state = pb::TransactionState::try_from(info.state)
        .map(|s| wire_name(s.as_str_name(), "TRANSACTION_STATE_"))
        .unwrap_or_else(|_| info.state.to_string());
    let protocol = pb::Protocol::try_from(info.protocol)
        .map(|p| wire_name(p.as_str_name(), "PROTOCOL_"))
        .unwrap_or_else(|_| info.protocol.to_string());
    TransactionView {
        txid: info.txid,
        gid: info.gid,
        state,
        protocol,
        label: info.label,
        begun_at_ms: info.begun_at_ms,
        decided_at_ms: info.decided_at_ms,
        finished_at_ms: info.finished_at_ms,
        outcome: outcome_text(info.outcome),
        recovered: info.recovered,
        heuristic: info.heuristic.map(heuristic_view),
        branches: info
            .participants
            .into_iter()
            .map(|p| BranchView {
                shard: p.shard,
                state: pb::ParticipantState::try_from(p.state)
                    .map(|s| wire_name(s.as_str_name(), "PARTICIPANT_STATE_"))
                    .unwrap_or_else(|_| p.state.to_string()),
                attempts: p.attempts,
                last_error: p.last_error,
            })
            .collect(),
    }
}

pub fn transactions(engine: &CoordinatorEngine, filters: Filters, now_ms: u64) -> TransactionList {
    // One pass over the table for the counts; the list is then newest first, as `ListTransactions`.
    let every = engine.list(|_| true, usize::MAX);
    let mut counts = Counts::default();
    for handle in &every {
        let phase = handle.machine().phase();
        if phase.is_undecided() {
            counts.active += 1;
        } else if phase.is_in_doubt() {
            counts.in_doubt += 1;
        } else {
            counts.finished += 1;
        }
    }
    let transactions = every
        .iter()
        .filter(|handle| filters.keeps(handle))
        .take(filters.limit)
        .map(|handle| transaction_view(handle))
        .collect();
    TransactionList {
        coordinator: engine.id().to_string(),
        now_ms,
        filters,
        counts,
        transactions,
    }
}

fn branch_phase_name(phase: BranchPhase) -> &'static str {
    match phase {
        BranchPhase::Active => "active",
        BranchPhase::Preparing => "preparing",
        BranchPhase::Prepared => "prepared",
        BranchPhase::PreCommitting => "pre-committing",
        BranchPhase::PreCommitted => "pre-committed",
        BranchPhase::ReadOnly => "read-only",
        BranchPhase::VotedNo => "voted no",
        BranchPhase::Committing => "committing",
        BranchPhase::Committed => "committed",
        BranchPhase::Aborting => "aborting",
        BranchPhase::Aborted => "aborted",
    }
}

/// The transaction with its timeline; `None` when this coordinator does not track it.
pub fn transaction_detail(engine: &CoordinatorEngine, txid: u64, now_ms: u64) -> Option<TransactionDetail> {
    let handle = engine.tracked(txid)?;
    let transaction = transaction_view(&handle);
    // Branch indexes to names first: the machine is locked before the timeline, never inside it.
    let shards: Vec<String> = handle
        .machine()
        .branches()
        .iter()
        .map(|b| b.shard.to_string())
        .collect();
    let (marks, dropped) = {
        let timeline = handle.timeline();
        (timeline.marks(), timeline.dropped())
    };
    let timeline = marks
        .into_iter()
        .map(|mark| match mark.subject {
            Subject::Transaction(phase) => MarkView {
                at_ms: mark.at_ms,
                shard: String::new(),
                phase: phase.name().to_owned(),
            },
            Subject::Branch { index, phase } => MarkView {
                at_ms: mark.at_ms,
                shard: shards
                    .get(index)
                    .cloned()
                    .unwrap_or_else(|| format!("branch {index}")),
                phase: branch_phase_name(phase).to_owned(),
            },
        })
        .collect();
    Some(TransactionDetail {
        coordinator: engine.id().to_string(),
        now_ms,
        transaction,
        timeline,
        timeline_dropped: dropped,
    })
}

/// Every shard's prepared branches, as `ListInDoubt` answers.
pub async fn in_doubt(engine: &CoordinatorEngine, participant_timeout_ms: u64, now_ms: u64) -> InDoubtList {
    let listed = crate::in_doubt::list(engine, participant_timeout_ms).await;
    let mut branches: Vec<InDoubtView> = listed
        .branches
        .into_iter()
        .map(|branch| InDoubtView {
            txid: branch.txid,
            shard: branch.shard,
            gid: branch.gid,
            prepared_at_ms: branch.prepared_at_ms,
            age_ms: branch.age_ms,
            coordinator_decision: branch.coordinator_decision,
            heuristic: branch.heuristic.map(heuristic_view),
            locks: branch
                .locks
                .into_iter()
                .map(|lock| LockView {
                    locktype: lock.locktype,
                    mode: lock.mode,
                    relation: lock.relation,
                    granted: lock.granted,
                })
                .collect(),
        })
        .collect();
    // Oldest first: the one to look at is at the top.
    branches.sort_by(|a, b| b.age_ms.cmp(&a.age_ms).then_with(|| a.gid.cmp(&b.gid)));
    InDoubtList {
        coordinator: engine.id().to_string(),
        now_ms,
        branches,
        unreachable: listed
            .unreachable
            .into_iter()
            .map(|u| UnreachableView {
                shard: u.shard,
                error: u.error,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn filters_are_read_and_bad_ones_named() {
        let filters = Filters::from_query(&pairs(&[
            ("state", "in-doubt"),
            ("label", " pay "),
            ("shard", "s1"),
            ("limit", "5"),
            ("live", "1"),
        ]))
        .unwrap();
        assert_eq!(filters.state, StateFilter::InDoubt);
        assert_eq!(filters.label, "pay");
        assert_eq!(filters.shard, "s1");
        assert_eq!(filters.limit, 5);
        assert_eq!(Filters::from_query(&[]).unwrap().limit, DEFAULT_LIMIT);
        let error = Filters::from_query(&pairs(&[("state", "stuck")])).unwrap_err();
        assert!(error.contains("in-doubt"), "{error}");
        assert!(Filters::from_query(&pairs(&[("limit", "0")])).is_err());
        assert!(Filters::from_query(&pairs(&[("limit", "lots")])).is_err());
    }

    #[test]
    fn state_filters_split_the_phases_as_list_transactions_does() {
        assert!(StateFilter::Active.keeps(Phase::Preparing));
        assert!(!StateFilter::Active.keeps(Phase::Committing));
        assert!(StateFilter::InDoubt.keeps(Phase::Committing));
        assert!(StateFilter::InDoubt.keeps(Phase::Aborting));
        assert!(StateFilter::Finished.keeps(Phase::Committed));
        assert!(StateFilter::Finished.keeps(Phase::Aborted));
        assert!(!StateFilter::Finished.keeps(Phase::Active));
    }

    #[test]
    fn wire_names_lose_their_prefix() {
        assert_eq!(
            wire_name("TRANSACTION_STATE_PRE_COMMITTING", "TRANSACTION_STATE_"),
            "pre-committing"
        );
        assert_eq!(wire_name("PROTOCOL_TWO_PHASE", "PROTOCOL_"), "two-phase");
    }
}
