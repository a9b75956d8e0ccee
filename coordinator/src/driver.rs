//! The driver: an executor for the protocol core. It owns the table of transactions, feeds
//! events into each one's machine (`treaty_commit_protocol::Transaction`) and carries out the
//! actions that come back through the two traits the core owns: the decision store
//! ([`DecisionStore`]: forced records) and the participant transport ([`ParticipantTransport`]:
//! calls to participants). Every rule (when to commit, what a vote or a lost message means, which
//! heuristic decision is allowed) is the core's; the driver decides nothing. Time comes from the
//! [`Clock`] it is given, so the seeded simulation runs this same driver on virtual time.
//!
//! Architecture invariant: only `perform` turns actions into I/O, and it never holds a
//! transaction's lock across an await; every result comes back through `feed`.
//!
//! Modules: `table` (the transactions and their handles), `statements` (begin, statements,
//! commit and rollback requests), `phases` (prepare, the decision's durable write, phase two, 3PC
//! pre-commits and state queries), `recovery` (start-up: replay, incarnation, re-drives),
//! `resolve` (operators' heuristic decisions), `timeline` (when each phase was entered, bounded,
//! for the console). No failpoint sits in the driver: a fault-injection
//! build wraps the store and the transport in decorators (`crate::faults`).

/// The span of one step of a transaction (on one shard, if given): a child of the transaction's
/// span, with its txid and GID, so the participant's span for the call, which continues the
/// current span, lands in the transaction's trace. Disabled (and its fields never formatted)
/// unless traces are exported or DEBUG logs asked for.
macro_rules! phase_span {
    ($handle:expr, $name:literal) => {
        tracing::debug_span!(
            parent: &$handle.span(),
            $name,
            txid = $handle.gid().txid(),
            gid = %$handle.gid(),
        )
    };
    ($handle:expr, $name:literal, $shard:expr) => {
        tracing::debug_span!(
            parent: &$handle.span(),
            $name,
            txid = $handle.gid().txid(),
            gid = %$handle.gid(),
            shard = %$shard,
        )
    };
}

mod decision_rows;
mod phases;
mod recovery;
mod resolve;
mod statements;
mod table;
mod takeover;
pub mod timeline;

pub use recovery::start;
pub use resolve::{ResolveOutcome, coordinator_view, format_ms};
pub use table::TxnHandle;
pub use treaty_commit_protocol::heuristic::ResolveRequest;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use treaty_commit_protocol::store::DecisionStore;
use treaty_commit_protocol::transport::{BranchOptions, LinkError, ParticipantTransport};
use treaty_proto::{ApiError, CoordinatorId, Gid, ShardName, SqlError, TxId};
use treaty_types::Clock;

use crate::protocol::{Action, Event, Phase, Protocol, ProtocolError, Timeouts};
use table::Table;

/// Transaction ids are reserved in the store this many at a time, so only one begin in this many
/// waits for a forced write, and no id is handed out twice across restarts.
pub const TXID_BLOCK: u64 = 10_000;
/// How long one phase-two message may take before it is counted as lost and sent again.
pub const PHASE_TWO_TIMEOUT_MS: u64 = 5_000;

/// Per-transaction settings chosen at begin.
#[derive(Debug, Clone, Default)]
pub struct TxnOptions {
    pub label: String,
    pub protocol: Option<Protocol>,
    pub timeouts: Option<Timeouts>,
    pub branch: BranchOptions,
    /// The transaction's place in its client's open-transaction count (`crate::limits`), held
    /// until it is decided; `None` for transactions no client limit applies to.
    pub slot: Option<Arc<crate::limits::OpenSlot>>,
    /// Statements the transaction may run (`--max-statements-per-transaction`); `None`: no bound.
    pub max_statements: Option<u32>,
}

/// Defaults applied to transactions that do not choose their own.
#[derive(Debug, Clone, Copy)]
pub struct EngineSettings {
    pub timeouts: Timeouts,
    pub lock_timeout_ms: u64,
    /// The protocol of a transaction that does not choose one.
    pub protocol: Protocol,
    /// `--decision-store shard`: two-phase commit decisions are rows committed inside each
    /// transaction's first branch (`treaty.decisions`), not records in the store.
    pub decide_in_branch: bool,
    /// `--decision-store shard`: finish commit rows and prepared branches that no instance has
    /// finished after this long (`takeover.rs`); 0: never.
    pub takeover_after_ms: u64,
}

/// What a recovering participant is told about a transaction (`QueryDecision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Commit,
    Abort,
    /// Still being decided (or learned): ask again later.
    Pending,
    /// Not a GID of this coordinator.
    Unknown,
}

pub struct Engine<S, T> {
    id: CoordinatorId,
    store: S,
    transport: T,
    clock: Arc<dyn Clock>,
    default_timeouts: Timeouts,
    default_lock_timeout_ms: u64,
    default_protocol: Protocol,
    decide_in_branch: bool,
    takeover_after_ms: u64,
    forgets: decision_rows::Forgets,
    table: std::sync::Mutex<Table>,
    next_txid: AtomicU64,
    /// The first txid this run hands out.
    first_txid: TxId,
    /// This run's incarnation (forced to the store at start; 0 until then).
    incarnation: AtomicU64,
    reserved_up_to: AtomicU64,
    reserve_lock: tokio::sync::Mutex<()>,
    /// Begins between taking a txid and registering it (`open_from` cannot be known meanwhile).
    beginning: AtomicU64,
    resolving: resolve::Resolving,
}

impl<S: DecisionStore, T: ParticipantTransport> Engine<S, T> {
    pub fn new(
        id: CoordinatorId,
        store: S,
        transport: T,
        clock: Arc<dyn Clock>,
        settings: EngineSettings,
        txids_reserved_up_to: u64,
    ) -> Arc<Self> {
        Arc::new(Self {
            id,
            store,
            transport,
            clock,
            default_timeouts: settings.timeouts,
            default_lock_timeout_ms: settings.lock_timeout_ms,
            default_protocol: settings.protocol,
            decide_in_branch: settings.decide_in_branch,
            takeover_after_ms: settings.takeover_after_ms,
            forgets: decision_rows::Forgets::default(),
            table: std::sync::Mutex::new(Table::default()),
            // Skip the whole block reserved before the restart: some of it may have been handed out.
            next_txid: AtomicU64::new(txids_reserved_up_to + 1),
            first_txid: txids_reserved_up_to + 1,
            incarnation: AtomicU64::new(0),
            reserved_up_to: AtomicU64::new(txids_reserved_up_to),
            reserve_lock: tokio::sync::Mutex::new(()),
            beginning: AtomicU64::new(0),
            resolving: resolve::Resolving::default(),
        })
    }

    pub fn id(&self) -> &CoordinatorId {
        &self.id
    }

    pub fn default_timeouts(&self) -> Timeouts {
        self.default_timeouts
    }

    pub fn default_lock_timeout_ms(&self) -> u64 {
        self.default_lock_timeout_ms
    }

    pub fn transport(&self) -> &T {
        &self.transport
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn next_txid(&self) -> TxId {
        self.next_txid.load(Ordering::Relaxed)
    }

    /// The first txid this run of the coordinator hands out: every lower one is an earlier run's.
    pub fn first_txid(&self) -> TxId {
        self.first_txid
    }

    /// The lowest txid that may still send a participant a statement, a vote request or a commit
    /// decision (`Info.open_from`): the oldest transaction of this run still in the table, or
    /// the next txid when there is none. `None` while a begin is between taking its txid and
    /// registering it, when a lower txid may be about to appear.
    ///
    /// Why the order of the loads is enough: a begin counts itself in `beginning` before it takes
    /// its txid and leaves after registering it, all `SeqCst`. A txid below the `next` read here
    /// was taken before that read; if `beginning` then reads 0, its begin had already left, so it
    /// was registered before the table is read below and is found there (or finished since).
    pub fn open_from(&self) -> Option<TxId> {
        let next = self.next_txid.load(Ordering::SeqCst);
        if self.beginning.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let oldest = self.oldest_live_txid();
        Some(oldest.map_or(next, |oldest| oldest.min(next)))
    }

    /// This run's incarnation, higher at every start (`Info`).
    pub fn incarnation(&self) -> u64 {
        self.incarnation.load(Ordering::Relaxed)
    }

    fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// The configured shard named `shard`, or INVALID_ARGUMENT listing the known ones.
    pub fn shard(&self, shard: &str) -> Result<ShardName, ApiError> {
        self.transport.shard(shard).ok_or_else(|| {
            let known: Vec<String> = self.transport.shards().iter().map(ToString::to_string).collect();
            ApiError::InvalidArgument(format!(
                "unknown shard {shard:?}; this coordinator knows: {}",
                known.join(", ")
            ))
        })
    }

    /// A store that cannot write leaves decisions in an unknown state: stop, and let a restart
    /// recover from what is durable.
    fn store_failed(&self, error: impl std::fmt::Display) -> ApiError {
        tracing::error!(
            "decision store failed: {error}; stopping so that a restart recovers from what is durable"
        );
        std::process::exit(70);
    }

    /// Feeds one event and carries out what it asks for.
    fn feed(self: &Arc<Self>, handle: &Arc<TxnHandle>, event: Event) -> Result<(), ProtocolError> {
        let now_ms = self.now_ms();
        let actions = {
            let mut machine = handle.machine();
            let actions = machine.step(event, now_ms)?;
            // Under the machine's lock, so that the marks are in the order the steps were taken.
            handle.timeline().observe(&machine, now_ms);
            actions
        };
        self.perform(handle, actions);
        Ok(())
    }

    /// Feeds an event the machine never refuses (results of the driver's own actions).
    fn feed_result(self: &Arc<Self>, handle: &Arc<TxnHandle>, event: Event) {
        if let Err(e) = self.feed(handle, event) {
            tracing::error!(gid = %handle.gid(), "protocol refused an internal event: {e}");
        }
    }

    fn perform(self: &Arc<Self>, handle: &Arc<TxnHandle>, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::SendPrepare { shards } => self.send_prepare(handle, shards),
                Action::PersistCommit { participants } => self.persist_commit(handle, participants),
                Action::CommitDecision {
                    shard,
                    participants,
                    standalone,
                } => self.commit_decision(handle, shard, participants, standalone),
                Action::ConcludeDecision { shard, delay_ms } => {
                    self.conclude_decision(handle, shard, delay_ms)
                }
                Action::SendCommit { shard, delay_ms } => self.send_phase_two(handle, shard, delay_ms, true),
                Action::SendAbort { shard, delay_ms } => self.send_phase_two(handle, shard, delay_ms, false),
                Action::CommitOnePhase { shard } => self.commit_one_phase(handle, shard),
                Action::ExecuteAndCommitOnePhase { shard } => self.execute_and_commit(handle, shard),
                Action::Reply(outcome) => {
                    self.count_outcome(handle, &outcome);
                    // Decided: no longer the client's to hold, even while phase two goes on;
                    // released before the client hears, so its next Begin finds the room.
                    handle.release_slot();
                    if let Some(waiter) = handle.waiter().take() {
                        // The client may have gone away; the outcome stands either way.
                        let _ = waiter.send(outcome);
                    }
                }
                Action::PersistEnd => self.persist_end(handle),
                Action::PersistPreCommit { participants } => self.persist_pre_commit(handle, participants),
                Action::SendPreCommit {
                    shard,
                    ballot,
                    delay_ms,
                } => self.send_pre_commit(handle, shard, ballot, delay_ms),
                Action::QueryParticipantStates { shards, ballot } => {
                    self.query_participant_states(handle, shards, ballot)
                }
                Action::Finished => {
                    handle.release_slot();
                    handle.close_span();
                    // A heuristic decision stays in the store until this end record (an abort
                    // writes none of its own).
                    if handle.heuristic().is_some() {
                        self.store.end(handle.gid().txid());
                    }
                    self.retire_handle(handle);
                }
            }
        }
    }

    /// The outcome in the metrics, with the time since begin on the engine's clock.
    fn count_outcome(&self, handle: &TxnHandle, outcome: &crate::protocol::Outcome) {
        let (protocol, begun_at_ms) = {
            let machine = handle.machine();
            (machine.protocol(), machine.begun_at_ms())
        };
        let elapsed = Duration::from_millis(self.now_ms().saturating_sub(begun_at_ms));
        crate::metrics::global().finished(protocol, outcome, elapsed);
    }

    /// Checks every transaction with a deadline that has passed.
    pub fn tick(self: &Arc<Self>) {
        let now = self.now_ms();
        for handle in self.due(now) {
            self.feed_result(&handle, Event::Tick);
        }
        self.flush_forgets();
    }

    /// Runs `tick` until the engine is dropped by everyone else.
    pub fn spawn_ticker(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_millis(50));
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let Some(engine) = weak.upgrade() else { return };
                engine.tick();
            }
        });
    }

    /// What a recovering participant should do with `gid`, and whether the coordinator still
    /// needs the participant's marker row for it. A GID whose decision is a row is answered for
    /// any coordinator: from this process's table when it runs the transaction, otherwise from
    /// the row (concluding abort when there is none).
    pub async fn decision(&self, gid: &str) -> (Decision, bool) {
        let mut answers = self.decisions(&[gid.to_owned()]).await;
        answers.pop().unwrap_or((Decision::Unknown, false))
    }

    /// What this process knows of `gid` without reading a decision row: `Err(shard)` when the
    /// answer is the row on that decision shard.
    fn local_decision(&self, gid: &Gid) -> Result<(Decision, bool), ShardName> {
        let tracked = self.tracked(gid.txid()).filter(|handle| handle.gid() == gid);
        if let (Some(shard), None) = (gid.decision_shard(), &tracked) {
            if gid.coordinator() == &self.id && !self.resolving.presume_abort(gid.txid()) {
                return Ok((Decision::Pending, true));
            }
            return Err(shard.clone());
        }
        if gid.coordinator() != &self.id {
            return Ok((Decision::Unknown, false));
        }
        let Some(handle) = tracked else {
            // An operator's resolve may be about to decide it: ask again later.
            if !self.resolving.presume_abort(gid.txid()) {
                return Ok((Decision::Pending, true));
            }
            // Presumed abort: no record means no commit was ever decided.
            return Ok((Decision::Abort, false));
        };
        let phase = handle.machine().phase();
        Ok(match phase {
            Phase::Committing => (Decision::Commit, true),
            Phase::Aborting => (Decision::Abort, true),
            Phase::Committed => (Decision::Commit, false),
            Phase::Aborted | Phase::OutcomeUnknown => (Decision::Abort, false),
            // Includes `PreCommitting`: a 3PC transaction whose outcome is being learned (a
            // pre-commit may be out) is never presumed aborted.
            _ => (Decision::Pending, true),
        })
    }

    /// Forces what is queued in the store (graceful shutdown).
    pub async fn flush(&self) {
        if let Err(e) = self.store.flush().await {
            tracing::warn!("flushing the decision store at shutdown: {e}");
        }
    }
}

/// A participant's failure as the client hears it, naming the shard.
pub fn api_error(shard: &ShardName, error: LinkError) -> ApiError {
    match error {
        LinkError::Sql {
            sqlstate, message, ..
        } => ApiError::Sql(SqlError {
            shard: shard.to_string(),
            sqlstate,
            message,
        }),
        LinkError::Unavailable(m) => ApiError::Unavailable(format!("shard {shard} is unavailable: {m}")),
        LinkError::TimedOut { after_ms } => ApiError::DeadlineExceeded(format!(
            "shard {shard}: statement did not finish within the transaction's remaining {after_ms} ms"
        )),
        LinkError::Deadline(m) => ApiError::DeadlineExceeded(m),
        LinkError::Refused(m) => ApiError::FailedPrecondition(m),
        LinkError::Invalid(m) => ApiError::InvalidArgument(m),
        LinkError::NotFound(m) => ApiError::NotFound(m),
        LinkError::Exhausted(m) => ApiError::ResourceExhausted(m),
        LinkError::BranchLost(m) => ApiError::Aborted(m),
        LinkError::Unimplemented(m) | LinkError::Other(m) => {
            ApiError::Internal(format!("shard {shard}: {m}"))
        }
    }
}

fn refused(error: ProtocolError) -> ApiError {
    ApiError::FailedPrecondition(error.to_string())
}
