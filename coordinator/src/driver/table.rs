//! The transaction table: one [`TxnHandle`] per transaction (its machine, the client waiting for
//! its outcome, an operator's decision, and a one-shot submit's last statement while it waits for
//! the commit), live apart from finished ones so the ticker only looks at the few that can time out.
//! Finished ones stay (bounded) for `GetTransaction` and `QueryDecision`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use tokio::sync::oneshot;
use treaty_commit_protocol::store::{DecisionStore, HeuristicRecord};
use treaty_commit_protocol::transport::{
    BranchOptions, ExecutedAndCommitted, LinkError, ParticipantTransport, Statement,
};
use treaty_proto::{ApiError, Gid, ShardName, TxId};

use super::Engine;
use super::timeline::Timeline;
use crate::protocol::{Outcome, Phase, Transaction};

/// Finished transactions kept for `GetTransaction`.
const HISTORY: usize = 10_000;

/// One transaction: its protocol state plus what the driver needs to talk about it.
pub struct TxnHandle {
    /// The GID the transaction begins with.
    provisional_gid: Gid,
    /// `--decision-store shard`: the GID naming the decision shard, fixed when the first branch is
    /// enlisted (before any participant hears of the transaction).
    gid_with_decision: OnceLock<Gid>,
    pub label: String,
    pub(super) branch_options: BranchOptions,
    machine: Mutex<Transaction>,
    waiter: Mutex<Option<oneshot::Sender<Outcome>>>,
    /// An operator's decision (`treaty resolve`), once it is durable in the store.
    heuristic: Mutex<Option<HeuristicRecord>>,
    /// A single-shard submit's last statement, sent together with its COMMIT once the machine
    /// asks for it (`ExecuteAndCommitOnePhase`), then the answer.
    fused: Mutex<Fused>,
    /// When the transaction and each branch entered each phase (bounded), for the console.
    timeline: Mutex<Timeline>,
    /// The transaction's span (`transaction`: txid, GID, protocol; its outcome once finished),
    /// parent of every phase's span; swapped for none when the transaction finishes, which closes
    /// it (and, when traces are exported, sends it). Disabled, and nearly free, otherwise.
    span: Mutex<tracing::Span>,
    /// The client's open-transaction slot (`crate::limits`), dropped once the transaction is
    /// decided.
    slot: Mutex<Option<Arc<crate::limits::OpenSlot>>>,
    /// Statements begun so far, and how many are allowed (`u32::MAX`: no bound).
    statements: AtomicU32,
    max_statements: u32,
    /// The shards where a statement of this transaction succeeded: a later one continues that
    /// branch (`Statement::continues`) and must not open another.
    ran_on: Mutex<Vec<ShardName>>,
}

/// The span of a transaction: a child of the current span, which is the `Begin` or `Submit` call's
/// when the client sent a `traceparent`.
fn transaction_span(gid: &Gid, machine: &Transaction) -> tracing::Span {
    tracing::debug_span!(
        "transaction",
        txid = gid.txid(),
        gid = %gid,
        protocol = %machine.protocol(),
        recovered = machine.recovered(),
        outcome = tracing::field::Empty,
    )
}

/// A one-shot submit's last statement: data the driver carries, never a decision.
#[derive(Default)]
pub(super) enum Fused {
    #[default]
    None,
    Pending {
        statement: Statement,
        expect_rows: Option<u64>,
        op: usize,
        timeout_ms: u64,
    },
    Ran(Result<ExecutedAndCommitted, LinkError>),
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl TxnHandle {
    /// The protocol state; a poisoned lock still holds a consistent machine because `step`
    /// never panics half-way through a change it has not finished validating.
    /// The transaction's GID, as every participant hears it.
    pub fn gid(&self) -> &Gid {
        self.gid_with_decision.get().unwrap_or(&self.provisional_gid)
    }

    /// Names the decision shard in the GID (once; every caller passes the same shard, the
    /// machine's first branch's).
    pub(super) fn fix_decision_shard(&self, shard: &ShardName) -> Result<(), treaty_proto::IdError> {
        if self.gid_with_decision.get().is_none() {
            let gid = &self.provisional_gid;
            let fixed = Gid::with_decision_shard(gid.coordinator(), gid.txid(), shard)?;
            lock(&self.span).record("gid", tracing::field::display(&fixed));
            let _ = self.gid_with_decision.set(fixed);
        }
        Ok(())
    }

    pub fn machine(&self) -> MutexGuard<'_, Transaction> {
        lock(&self.machine)
    }

    pub(super) fn waiter(&self) -> MutexGuard<'_, Option<oneshot::Sender<Outcome>>> {
        lock(&self.waiter)
    }

    pub(super) fn fused(&self) -> MutexGuard<'_, Fused> {
        lock(&self.fused)
    }

    /// When the transaction and each branch entered each phase. Lock it after the machine, never
    /// before (the driver notes a step while holding the machine).
    pub fn timeline(&self) -> MutexGuard<'_, Timeline> {
        lock(&self.timeline)
    }

    /// The transaction's span, to parent a phase's span (none once it finished).
    pub(super) fn span(&self) -> tracing::Span {
        lock(&self.span).clone()
    }

    /// Closes the transaction's span, with its outcome.
    pub(super) fn close_span(&self) {
        let span = std::mem::replace(&mut *lock(&self.span), tracing::Span::none());
        if span.is_disabled() {
            return;
        }
        let outcome = match self.machine().outcome() {
            Some(Outcome::Committed) => "committed",
            Some(Outcome::Aborted(_)) => "aborted",
            Some(Outcome::Unknown(_)) | None => "unknown",
        };
        span.record("outcome", outcome);
    }

    /// Gives back the client's open-transaction slot (idempotent).
    pub(super) fn release_slot(&self) {
        drop(lock(&self.slot).take());
    }

    /// Whether a statement of this transaction already succeeded on `shard`.
    pub(super) fn ran_on(&self, shard: &ShardName) -> bool {
        lock(&self.ran_on).contains(shard)
    }

    /// Notes that a statement succeeded on `shard`.
    pub(super) fn note_ran_on(&self, shard: &ShardName) {
        let mut ran_on = lock(&self.ran_on);
        if !ran_on.contains(shard) {
            ran_on.push(shard.clone());
        }
    }

    /// Counts one more statement; refuses it once the transaction ran its allowed number.
    pub(super) fn count_statement(&self) -> Result<(), ApiError> {
        let ran = self.statements.fetch_add(1, Ordering::Relaxed);
        if ran >= self.max_statements {
            self.statements.fetch_sub(1, Ordering::Relaxed);
            return Err(ApiError::ResourceExhausted(format!(
                "transaction {} ran {ran} statements, the limit (--max-statements-per-transaction) \
                 is {}; commit or roll back, and split the work into several transactions",
                self.provisional_gid.txid(),
                self.max_statements
            )));
        }
        Ok(())
    }

    pub fn heuristic(&self) -> Option<HeuristicRecord> {
        lock(&self.heuristic).clone()
    }

    pub(super) fn set_heuristic(&self, record: HeuristicRecord) {
        *lock(&self.heuristic) = Some(record);
    }
}

#[derive(Default)]
pub(super) struct Table {
    live: HashMap<TxId, Arc<TxnHandle>>,
    /// Other coordinator instances' transactions this one finishes from their decision rows
    /// (`--decision-store shard`), by GID: their txids are theirs, not this instance's.
    foreign: HashMap<Gid, Arc<TxnHandle>>,
    finished: HashMap<TxId, Arc<TxnHandle>>,
    finished_order: VecDeque<TxId>,
}

impl Table {
    fn get(&self, txid: TxId) -> Option<&Arc<TxnHandle>> {
        self.live.get(&txid).or_else(|| self.finished.get(&txid))
    }
}

impl<S: DecisionStore, T: ParticipantTransport> Engine<S, T> {
    fn table(&self) -> MutexGuard<'_, Table> {
        lock(&self.table)
    }

    /// The lowest txid of a transaction of this coordinator still in the table (`open_from`).
    pub(super) fn oldest_live_txid(&self) -> Option<TxId> {
        self.table().live.keys().min().copied()
    }

    pub(super) fn register(
        &self,
        gid: Gid,
        label: String,
        branch_options: BranchOptions,
        machine: Transaction,
    ) -> Arc<TxnHandle> {
        self.register_limited(gid, label, branch_options, machine, None, None)
    }

    /// `register`, counting the transaction against its client (`slot`) and bounding its
    /// statements.
    pub(super) fn register_limited(
        &self,
        gid: Gid,
        label: String,
        branch_options: BranchOptions,
        machine: Transaction,
        slot: Option<Arc<crate::limits::OpenSlot>>,
        max_statements: Option<u32>,
    ) -> Arc<TxnHandle> {
        let txid = machine.txid();
        let mut timeline = Timeline::default();
        timeline.observe(&machine, self.now_ms());
        let span = transaction_span(&gid, &machine);
        let handle = Arc::new(TxnHandle {
            provisional_gid: gid,
            gid_with_decision: OnceLock::new(),
            label,
            branch_options,
            machine: Mutex::new(machine),
            waiter: Mutex::new(None),
            heuristic: Mutex::new(None),
            fused: Mutex::new(Fused::None),
            timeline: Mutex::new(timeline),
            span: Mutex::new(span),
            slot: Mutex::new(slot),
            statements: AtomicU32::new(0),
            max_statements: max_statements.unwrap_or(u32::MAX),
            ran_on: Mutex::new(Vec::new()),
        });
        self.table().live.insert(txid, Arc::clone(&handle));
        handle
    }

    /// Registers a transaction of another coordinator instance, to finish from its decision row;
    /// `None` when it is already being finished here.
    pub(super) fn register_foreign(&self, gid: Gid, machine: Transaction) -> Option<Arc<TxnHandle>> {
        let mut table = self.table();
        if table.foreign.contains_key(&gid) {
            return None;
        }
        let mut timeline = Timeline::default();
        timeline.observe(&machine, self.now_ms());
        let span = transaction_span(&gid, &machine);
        let handle = Arc::new(TxnHandle {
            provisional_gid: gid.clone(),
            gid_with_decision: OnceLock::new(),
            label: String::new(),
            branch_options: BranchOptions::default(),
            machine: Mutex::new(machine),
            waiter: Mutex::new(None),
            heuristic: Mutex::new(None),
            fused: Mutex::new(Fused::None),
            timeline: Mutex::new(timeline),
            span: Mutex::new(span),
            slot: Mutex::new(None),
            statements: AtomicU32::new(0),
            max_statements: u32::MAX,
            ran_on: Mutex::new(Vec::new()),
        });
        table.foreign.insert(gid, Arc::clone(&handle));
        Some(handle)
    }

    /// Whether another instance's transaction `gid` is being finished here.
    pub(super) fn finishing_foreign(&self, gid: &Gid) -> bool {
        self.table().foreign.contains_key(gid)
    }

    /// The transaction needs nothing more: into the history, or (another instance's) dropped.
    pub(super) fn retire_handle(&self, handle: &TxnHandle) {
        let gid = handle.gid();
        if gid.coordinator() != &self.id {
            self.table().foreign.remove(gid);
            return;
        }
        self.retire(gid.txid());
    }

    pub(super) fn retire(&self, txid: TxId) {
        let mut table = self.table();
        let Some(handle) = table.live.remove(&txid) else {
            return;
        };
        table.finished.insert(txid, handle);
        table.finished_order.push_back(txid);
        while table.finished_order.len() > HISTORY {
            if let Some(old) = table.finished_order.pop_front() {
                table.finished.remove(&old);
            }
        }
    }

    /// The transaction if this coordinator tracks it (live or recently finished).
    pub fn tracked(&self, txid: TxId) -> Option<Arc<TxnHandle>> {
        self.table().get(txid).cloned()
    }

    /// The transaction, or NOT_FOUND naming the id.
    pub fn handle(&self, txid: TxId) -> Result<Arc<TxnHandle>, ApiError> {
        self.tracked(txid).ok_or_else(|| {
            ApiError::NotFound(format!(
                "transaction {txid} is unknown to coordinator {} (never begun, or finished long ago)",
                self.id
            ))
        })
    }

    /// Transactions not yet finished, this instance's and those it finishes for others.
    pub(super) fn live_count(&self) -> usize {
        let table = self.table();
        table.live.len() + table.foreign.len()
    }

    /// How many transactions are in flight and in doubt now (the metrics' state gauges, read at
    /// scrape time).
    pub fn census(&self) -> crate::metrics::Census {
        let table = self.table();
        let in_doubt = table
            .live
            .values()
            .chain(table.foreign.values())
            .filter(|h| h.machine().phase().is_in_doubt())
            .count();
        crate::metrics::Census {
            in_flight: (table.live.len() + table.foreign.len()) as u64,
            in_doubt: in_doubt as u64,
        }
    }

    /// Live transactions whose next deadline has passed.
    pub(super) fn due(&self, now_ms: u64) -> Vec<Arc<TxnHandle>> {
        self.table()
            .live
            .values()
            .filter(|h| h.machine().next_deadline_ms().is_some_and(|d| d <= now_ms))
            .cloned()
            .collect()
    }

    /// Every tracked transaction matching `keep`, newest first, at most `limit`.
    pub fn list(&self, keep: impl Fn(Phase) -> bool, limit: usize) -> Vec<Arc<TxnHandle>> {
        let table = self.table();
        let mut found: Vec<Arc<TxnHandle>> = table
            .live
            .values()
            .chain(table.finished.values())
            .filter(|h| keep(h.machine().phase()))
            .cloned()
            .collect();
        drop(table);
        found.sort_by_key(|h| std::cmp::Reverse(h.gid().txid()));
        found.truncate(limit);
        found
    }
}
