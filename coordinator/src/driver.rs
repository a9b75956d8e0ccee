//! The driver: owns the table of transactions, feeds events into each one's protocol state
//! machine and carries out the actions that come back (RPCs to participants, decision-log writes,
//! answers to waiting clients). It also allocates transaction ids, runs the timeout ticker and
//! re-drives unfinished commits found in the log at start; for three-phase commit it forces the
//! pre-commit record, sends pre-commits, asks the participants for their states, and at start
//! re-learns the outcome of every transaction the log holds a pre-commit record for.
//!
//! Architecture invariant: only `perform` turns actions into I/O, and it never holds a
//! transaction's lock across an await; every result comes back through `feed`.
//!
//! The coordinator's failpoints (`crate::failpoints`) sit here, where actions are carried out.
//! `in_doubt`: the operator's listing of prepared branches and heuristic decisions (`resolve`).

mod in_doubt;
#[cfg(test)]
mod three_phase_tests;

pub use in_doubt::{ResolveRequest, format_ms, heuristic_to_pb};

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;
use treaty_decision_log::{CommitRecord, DecisionLog, HeuristicRecord, PreCommitRecord};
use treaty_proto::{ApiError, CoordinatorId, Gid, ShardName, TxId, pb};

use crate::failpoints::{self, Delivery, Fired};
use crate::participants::ParticipantLinks;
use crate::protocol::termination::Ballot;
use crate::protocol::{
    AbortCause, AbortReason, Action, Event, Outcome, Phase, Protocol, ProtocolError, Timeouts, Transaction,
    Vote,
};

/// Transaction ids are reserved in the log this many at a time, so only one begin in this many
/// waits for an fsync, and no id is handed out twice across restarts.
pub(crate) const TXID_BLOCK: u64 = 10_000;
/// Finished transactions kept for `GetTransaction`.
const HISTORY: usize = 10_000;
/// Up to this many re-driven commits are logged one by one at info.
const REDRIVES_LOGGED_ONE_BY_ONE: usize = 100;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Per-transaction settings chosen at begin.
#[derive(Debug, Clone, Default)]
pub struct TxnOptions {
    pub label: String,
    pub protocol: Option<Protocol>,
    pub timeouts: Option<Timeouts>,
    pub branch: pb::BranchOptions,
}

/// A vote cast with a branch's last statement.
struct EarlyVote {
    shard: ShardName,
    vote: Vote,
    /// Three-phase: the participants the vote named to the participant (sorted), which its
    /// termination will ask; empty under two-phase.
    named: Vec<ShardName>,
}

/// One transaction: its protocol state plus what the driver needs to talk about it.
pub struct TxnHandle {
    pub gid: Gid,
    pub label: String,
    branch_options: pb::BranchOptions,
    machine: Mutex<Transaction>,
    waiter: Mutex<Option<oneshot::Sender<Outcome>>>,
    /// Votes cast together with a branch's last statement (`execute_and_prepare`), fed to the
    /// machine in place of a Prepare message once it asks for the votes.
    early_votes: Mutex<Vec<EarlyVote>>,
    /// An operator's decision (`treaty resolve`), once it is durable in the log.
    heuristic: Mutex<Option<HeuristicRecord>>,
    /// A single-shard submit's last statement, sent together with its COMMIT
    /// (`commit_with_statement`): the request until the machine asks for the one-phase commit,
    /// then the statement's result.
    fused: Mutex<Fused>,
}

/// A record `force` writes to the decision log before the machine may go on.
enum Forced {
    Commit(CommitRecord),
    PreCommit(PreCommitRecord),
}

#[derive(Default)]
enum Fused {
    #[default]
    None,
    Pending {
        request: pb::ExecuteAndCommitRequest,
        op: usize,
        timeout: Duration,
    },
    Ran(pb::ExecuteResult),
}

impl TxnHandle {
    /// The protocol state; a poisoned lock still holds a consistent machine because `step`
    /// never panics half-way through a change it has not finished validating.
    pub fn machine(&self) -> MutexGuard<'_, Transaction> {
        self.machine
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn waiter(&self) -> MutexGuard<'_, Option<oneshot::Sender<Outcome>>> {
        self.waiter
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn early_votes(&self) -> MutexGuard<'_, Vec<EarlyVote>> {
        self.early_votes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn fused(&self) -> MutexGuard<'_, Fused> {
        self.fused.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn heuristic(&self) -> Option<HeuristicRecord> {
        self.heuristic
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

/// Live transactions apart from finished ones, so the ticker only looks at the few that can time
/// out; finished ones stay (bounded) for `GetTransaction` and `QueryDecision`.
#[derive(Default)]
struct Table {
    live: HashMap<TxId, Arc<TxnHandle>>,
    finished: HashMap<TxId, Arc<TxnHandle>>,
    finished_order: VecDeque<TxId>,
}

impl Table {
    fn get(&self, txid: TxId) -> Option<&Arc<TxnHandle>> {
        self.live.get(&txid).or_else(|| self.finished.get(&txid))
    }
}

/// Defaults applied to transactions that do not choose their own.
#[derive(Debug, Clone, Copy)]
pub struct EngineSettings {
    pub timeouts: Timeouts,
    pub lock_timeout_ms: u64,
    /// The protocol of a transaction that does not choose one.
    pub protocol: Protocol,
}

pub struct Engine {
    id: CoordinatorId,
    log: DecisionLog,
    links: ParticipantLinks,
    default_timeouts: Timeouts,
    default_lock_timeout_ms: u64,
    default_protocol: Protocol,
    table: Mutex<Table>,
    next_txid: AtomicU64,
    reserved_up_to: AtomicU64,
    reserve_lock: tokio::sync::Mutex<()>,
    resolving: in_doubt::Resolving,
}

impl Engine {
    pub fn new(
        id: CoordinatorId,
        log: DecisionLog,
        links: ParticipantLinks,
        settings: EngineSettings,
        txids_reserved_up_to: u64,
    ) -> Arc<Self> {
        Arc::new(Self {
            id,
            log,
            links,
            default_timeouts: settings.timeouts,
            default_lock_timeout_ms: settings.lock_timeout_ms,
            default_protocol: settings.protocol,
            table: Mutex::new(Table::default()),
            // Skip the whole block reserved before the restart: some of it may have been handed out.
            next_txid: AtomicU64::new(txids_reserved_up_to + 1),
            reserved_up_to: AtomicU64::new(txids_reserved_up_to),
            reserve_lock: tokio::sync::Mutex::new(()),
            resolving: in_doubt::Resolving::default(),
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

    pub fn links(&self) -> &ParticipantLinks {
        &self.links
    }

    pub fn next_txid(&self) -> TxId {
        self.next_txid.load(Ordering::Relaxed)
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Re-drives every commit decision the log holds without an end record.
    pub fn recover(self: &Arc<Self>, unfinished: Vec<CommitRecord>) {
        let now = now_ms();
        // A line per transaction helps read a small recovery (scenario timelines); a restart that
        // re-drives thousands gets the summary only (per transaction at debug).
        let detailed = unfinished.len() <= REDRIVES_LOGGED_ONE_BY_ONE;
        if !unfinished.is_empty() {
            tracing::info!(
                transactions = unfinished.len(),
                "re-driving logged commits without an end record"
            );
        }
        for record in unfinished {
            let gid = match Gid::parse(&record.gid) {
                Ok(gid) => gid,
                Err(e) => {
                    tracing::error!(
                        txid = record.txid,
                        gid = record.gid,
                        "unusable GID in the log: {e}"
                    );
                    continue;
                }
            };
            let participants = self.logged_participants(record.txid, &record.participants);
            if detailed {
                tracing::info!(txid = record.txid, shards = ?record.participants, "re-driving a logged commit");
            } else {
                tracing::debug!(txid = record.txid, shards = ?record.participants, "re-driving a logged commit");
            }
            let (machine, actions) = Transaction::recover_commit(
                record.txid,
                participants,
                record.decided_at_ms,
                self.default_timeouts,
                now,
            );
            let handle = self.register(gid, String::new(), pb::BranchOptions::default(), machine);
            self.perform(&handle, actions);
        }
    }

    /// Re-learns the outcome of every 3PC transaction whose pre-commit record the log holds without
    /// a commit or end record: pre-commits may have been sent, so abort cannot be presumed. Each
    /// asks every participant for its state under a ballot of this `incarnation` (durable, higher
    /// than any earlier start's) and applies the termination rules; until then `QueryDecision`
    /// answers PENDING for it.
    pub fn recover_pre_committed(self: &Arc<Self>, records: Vec<PreCommitRecord>, incarnation: u64) {
        let now = now_ms();
        if !records.is_empty() {
            tracing::info!(
                transactions = records.len(),
                incarnation,
                "learning the outcome of logged pre-commits without a commit or end record"
            );
        }
        for record in records {
            let gid = match Gid::parse(&record.gid) {
                Ok(gid) => gid,
                Err(e) => {
                    tracing::error!(
                        txid = record.txid,
                        gid = record.gid,
                        "unusable GID in a pre-commit record: {e}"
                    );
                    continue;
                }
            };
            let participants = self.logged_participants(record.txid, &record.participants);
            tracing::info!(txid = record.txid, shards = ?record.participants, "learning the outcome of a pre-committed transaction");
            let (machine, actions) = Transaction::recover_pre_committed(
                record.txid,
                participants,
                incarnation,
                self.default_timeouts,
                now,
            );
            let handle = self.register(gid, String::new(), pb::BranchOptions::default(), machine);
            self.perform(&handle, actions);
        }
    }

    /// The shards a log record names, each as configured; one this coordinator no longer knows is
    /// kept by name (its messages fail until it is configured again) and reported.
    fn logged_participants(&self, txid: TxId, names: &[String]) -> Vec<ShardName> {
        names
            .iter()
            .filter_map(|name| match self.links.resolve(name) {
                Ok(shard) => Some(shard),
                Err(_) => {
                    tracing::error!(
                        txid,
                        shard = name,
                        "a logged transaction names a shard this coordinator is not configured with; \
                         add it back with --shard so the transaction can finish"
                    );
                    ShardName::new(name).ok()
                }
            })
            .collect()
    }

    fn register(
        &self,
        gid: Gid,
        label: String,
        branch_options: pb::BranchOptions,
        machine: Transaction,
    ) -> Arc<TxnHandle> {
        let txid = machine.txid();
        let handle = Arc::new(TxnHandle {
            gid,
            label,
            branch_options,
            machine: Mutex::new(machine),
            waiter: Mutex::new(None),
            early_votes: Mutex::new(Vec::new()),
            heuristic: Mutex::new(None),
            fused: Mutex::new(Fused::None),
        });
        self.table().live.insert(txid, Arc::clone(&handle));
        handle
    }

    async fn allocate_txid(&self) -> Result<TxId, ApiError> {
        let txid = self.next_txid.fetch_add(1, Ordering::Relaxed);
        if txid <= self.reserved_up_to.load(Ordering::Acquire) {
            return Ok(txid);
        }
        let _guard = self.reserve_lock.lock().await;
        let reserved = self.reserved_up_to.load(Ordering::Acquire);
        if txid > reserved {
            let up_to = txid.max(reserved) + TXID_BLOCK;
            self.log
                .reserve_txids(up_to)
                .await
                .map_err(|e| self.log_failed(e))?;
            self.reserved_up_to.store(up_to, Ordering::Release);
        }
        Ok(txid)
    }

    /// A log that cannot write leaves decisions in an unknown state: stop, and let a restart
    /// replay what is durable.
    fn log_failed(&self, error: impl std::fmt::Display) -> ApiError {
        tracing::error!("decision log failed: {error}; stopping so that a restart recovers from the log");
        std::process::exit(70);
    }

    pub async fn begin(&self, options: TxnOptions) -> Result<TxId, ApiError> {
        let txid = self.allocate_txid().await?;
        let timeouts = options.timeouts.unwrap_or(self.default_timeouts);
        let protocol = options.protocol.unwrap_or(self.default_protocol);
        let machine = Transaction::begin(txid, protocol, timeouts, now_ms());
        self.register(Gid::new(&self.id, txid), options.label, options.branch, machine);
        Ok(txid)
    }

    /// The transaction, or NOT_FOUND naming the id.
    pub fn handle(&self, txid: TxId) -> Result<Arc<TxnHandle>, ApiError> {
        self.table().get(txid).cloned().ok_or_else(|| {
            ApiError::NotFound(format!(
                "transaction {txid} is unknown to coordinator {} (never begun, or finished long ago)",
                self.id
            ))
        })
    }

    /// Feeds one event and carries out what it asks for.
    fn feed(self: &Arc<Self>, handle: &Arc<TxnHandle>, event: Event) -> Result<(), ProtocolError> {
        let actions = handle.machine().step(event, now_ms())?;
        self.perform(handle, actions);
        Ok(())
    }

    /// Feeds an event the machine never refuses (results of the driver's own actions).
    fn feed_result(self: &Arc<Self>, handle: &Arc<TxnHandle>, event: Event) {
        if let Err(e) = self.feed(handle, event) {
            tracing::error!(gid = %handle.gid, "protocol refused an internal event: {e}");
        }
    }

    fn perform(self: &Arc<Self>, handle: &Arc<TxnHandle>, actions: Vec<Action>) {
        // Commits sent without delay are a round's first sends (retries come with a backoff).
        let mut commit_round = Vec::new();
        let mut pre_commit_round: Option<(Ballot, Vec<ShardName>)> = None;
        let mut votes_cast = Vec::new();
        for action in actions {
            match action {
                Action::SendPrepare { shards } => votes_cast = self.send_prepare(handle, shards),
                Action::PersistCommit { participants } => self.persist_commit(handle, participants),
                Action::SendCommit { shard, delay_ms: 0 } => commit_round.push(shard),
                Action::SendCommit { shard, delay_ms } => {
                    self.send_phase_two(handle, shard, delay_ms, true, Delivery::Send)
                }
                Action::SendAbort { shard, delay_ms } => {
                    self.send_phase_two(handle, shard, delay_ms, false, Delivery::Send)
                }
                Action::CommitOnePhase { shard } => {
                    let fused = std::mem::take(&mut *handle.fused());
                    let (engine, handle) = (Arc::clone(self), Arc::clone(handle));
                    tokio::spawn(async move {
                        let event = match fused {
                            Fused::Pending { request, op, timeout } => {
                                let (event, result) = engine
                                    .links
                                    .execute_and_commit(&shard, request, op, timeout)
                                    .await;
                                // Before the event, whose Reply wakes the submit that reads it.
                                if let Some(result) = result {
                                    *handle.fused() = Fused::Ran(result);
                                }
                                event
                            }
                            Fused::None | Fused::Ran(_) => {
                                engine.links.commit_one_phase(&shard, &handle.gid).await
                            }
                        };
                        engine.feed_result(&handle, event);
                    });
                }
                Action::Reply(outcome) => {
                    if let Some(waiter) = handle.waiter().take() {
                        // The client may have gone away; the outcome stands either way.
                        let _ = waiter.send(outcome);
                    }
                }
                Action::PersistEnd => self.persist_end(handle),
                Action::PersistPreCommit { participants } => self.persist_pre_commit(handle, participants),
                // Pre-commits sent without delay are a round's first sends (retries come with a
                // backoff); one action list holds at most one ballot's round.
                Action::SendPreCommit {
                    shard,
                    ballot,
                    delay_ms: 0,
                } => pre_commit_round
                    .get_or_insert_with(|| (ballot, Vec::new()))
                    .1
                    .push(shard),
                Action::SendPreCommit {
                    shard,
                    ballot,
                    delay_ms,
                } => self.send_pre_commit(handle, shard, ballot, delay_ms, Delivery::Send),
                Action::QueryParticipantStates { shards, ballot } => {
                    self.query_participant_states(handle, shards, ballot)
                }
                Action::Finished => {
                    // A heuristic decision stays in the log until this end record (an abort
                    // writes none of its own).
                    if handle.heuristic().is_some() {
                        self.log.end(handle.gid.txid());
                    }
                    self.retire(handle.gid.txid());
                }
            }
        }
        if !commit_round.is_empty() {
            self.send_commit_round(handle, commit_round);
        }
        if let Some((ballot, shards)) = pre_commit_round {
            self.send_pre_commit_round(handle, shards, ballot);
        }
        // After the other actions, as if each vote had come back from its own Prepare.
        for (shard, vote) in votes_cast {
            self.feed_result(handle, Event::VoteReceived { shard, vote });
        }
    }

    /// Sends PREPARE in parallel to every shard that has not voted yet, and returns the votes cast
    /// already with a last statement. With `after-some-prepares` armed, the first is sent (and
    /// answered) alone, the failpoint is evaluated, and only then are the others sent.
    fn send_prepare(
        self: &Arc<Self>,
        handle: &Arc<TxnHandle>,
        shards: Vec<ShardName>,
    ) -> Vec<(ShardName, Vote)> {
        let all: Vec<String> = shards.iter().map(ToString::to_string).collect();
        let protocol = handle.machine().protocol();
        let cast: Vec<(ShardName, Vote)> = std::mem::take(&mut *handle.early_votes())
            .into_iter()
            .map(|early| named_as_prepared(early, &shards, protocol))
            .collect();
        let shards: Vec<ShardName> = if cast.is_empty() {
            shards
        } else {
            shards
                .into_iter()
                .filter(|shard| !cast.iter().any(|(voted, _)| voted == shard))
                .collect()
        };
        if shards.len() > 1 && failpoints::armed(failpoints::AFTER_SOME_PREPARES) {
            let (engine, handle) = (Arc::clone(self), Arc::clone(handle));
            tokio::spawn(async move {
                let mut shards = shards.into_iter();
                if let Some(first) = shards.next() {
                    engine
                        .prepare_one(&handle, first, all.clone(), protocol, Delivery::Send)
                        .await;
                }
                let delivery = failpoints::delivery(failpoints::AFTER_SOME_PREPARES);
                for shard in shards {
                    engine.spawn_prepare(&handle, shard, all.clone(), protocol, delivery);
                }
            });
            return cast;
        }
        for shard in shards {
            self.spawn_prepare(handle, shard, all.clone(), protocol, Delivery::Send);
        }
        cast
    }

    fn spawn_prepare(
        self: &Arc<Self>,
        handle: &Arc<TxnHandle>,
        shard: ShardName,
        all: Vec<String>,
        protocol: Protocol,
        delivery: Delivery,
    ) {
        let (engine, handle) = (Arc::clone(self), Arc::clone(handle));
        tokio::spawn(async move { engine.prepare_one(&handle, shard, all, protocol, delivery).await });
    }

    async fn prepare_one(
        self: &Arc<Self>,
        handle: &Arc<TxnHandle>,
        shard: ShardName,
        all: Vec<String>,
        protocol: Protocol,
        delivery: Delivery,
    ) {
        let vote_timeout = Duration::from_millis(self.default_timeouts.vote_ms);
        let vote = self
            .links
            .prepare(&shard, &handle.gid, all, protocol, vote_timeout, delivery)
            .await;
        self.feed_result(handle, Event::VoteReceived { shard, vote });
    }

    /// The first COMMIT of every participant after a decision, in parallel, with the failpoints
    /// `before-commit-sends` (before any is sent) and `between-commit-sends` (with it armed, the
    /// first is sent alone and the others only after it acknowledged). A recovered transaction's
    /// re-drive skips them, so that a restart with the same `--failpoints` converges.
    fn send_commit_round(self: &Arc<Self>, handle: &Arc<TxnHandle>, shards: Vec<ShardName>) {
        let armed = failpoints::armed(failpoints::BEFORE_COMMIT_SENDS)
            || failpoints::armed(failpoints::BETWEEN_COMMIT_SENDS);
        if !armed || handle.machine().recovered() {
            for shard in shards {
                self.send_phase_two(handle, shard, 0, true, Delivery::Send);
            }
            return;
        }
        let (engine, handle) = (Arc::clone(self), Arc::clone(handle));
        tokio::spawn(async move {
            let mut delivery = failpoints::delivery(failpoints::BEFORE_COMMIT_SENDS);
            let mut shards = shards.into_iter();
            if delivery == Delivery::Send
                && shards.len() > 1
                && failpoints::armed(failpoints::BETWEEN_COMMIT_SENDS)
                && let Some(first) = shards.next()
            {
                let event = engine
                    .links
                    .finish(&first, &handle.gid, true, Delivery::Send)
                    .await;
                let acknowledged = matches!(event, Event::Acknowledged { .. });
                engine.feed_result(&handle, event);
                if acknowledged {
                    delivery = failpoints::delivery(failpoints::BETWEEN_COMMIT_SENDS);
                }
            }
            for shard in shards {
                engine.send_phase_two(&handle, shard, 0, true, delivery);
            }
        });
    }

    /// 3PC: forces the pre-commit record, then feeds `PreCommitDurable`; no PreCommit leaves
    /// before it is durable.
    fn persist_pre_commit(self: &Arc<Self>, handle: &Arc<TxnHandle>, participants: Vec<ShardName>) {
        let record = PreCommitRecord {
            txid: handle.gid.txid(),
            gid: handle.gid.to_string(),
            participants: participants.iter().map(ToString::to_string).collect(),
            at_ms: now_ms(),
        };
        self.force(handle, Forced::PreCommit(record));
    }

    /// 3PC: a round of PreCommits under `ballot`, in parallel. The coordinator's own first round
    /// (`Ballot::COORDINATOR`) of a transaction this process runs passes the failpoints
    /// `before-pre-commit-sends` (before any is sent) and `after-some-pre-commits` (with it armed,
    /// the first is sent alone and the others only after it acknowledged); a round decided by the
    /// termination rules (a learned state, or a recovered transaction) skips them, so that a
    /// restart with the same `--failpoints` converges.
    fn send_pre_commit_round(
        self: &Arc<Self>,
        handle: &Arc<TxnHandle>,
        shards: Vec<ShardName>,
        ballot: Ballot,
    ) {
        let first_round = ballot == Ballot::COORDINATOR && !handle.machine().recovered();
        let armed = failpoints::armed(failpoints::BEFORE_PRE_COMMIT_SENDS)
            || failpoints::armed(failpoints::AFTER_SOME_PRE_COMMITS);
        if !first_round || !armed {
            for shard in shards {
                self.send_pre_commit(handle, shard, ballot.clone(), 0, Delivery::Send);
            }
            return;
        }
        let (engine, handle) = (Arc::clone(self), Arc::clone(handle));
        tokio::spawn(async move {
            let mut delivery = failpoints::delivery(failpoints::BEFORE_PRE_COMMIT_SENDS);
            let mut shards = shards.into_iter();
            if delivery == Delivery::Send
                && shards.len() > 1
                && failpoints::armed(failpoints::AFTER_SOME_PRE_COMMITS)
                && let Some(first) = shards.next()
            {
                let event = engine
                    .links
                    .pre_commit(&first, &handle.gid, &ballot, Delivery::Send)
                    .await;
                let acknowledged = matches!(event, Event::PreCommitAcknowledged { .. });
                engine.feed_result(&handle, event);
                if acknowledged {
                    delivery = failpoints::delivery(failpoints::AFTER_SOME_PRE_COMMITS);
                }
            }
            for shard in shards {
                engine.send_pre_commit(&handle, shard, ballot.clone(), 0, delivery);
            }
        });
    }

    /// 3PC: one PreCommit after `delay_ms`; its answer comes back as `PreCommitAcknowledged` or
    /// `PhaseTwoFailed` (which the machine retries with backoff until it learns states instead).
    fn send_pre_commit(
        self: &Arc<Self>,
        handle: &Arc<TxnHandle>,
        shard: ShardName,
        ballot: Ballot,
        delay_ms: u64,
        delivery: Delivery,
    ) {
        let (engine, handle) = (Arc::clone(self), Arc::clone(handle));
        tokio::spawn(async move {
            if delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            }
            let event = engine
                .links
                .pre_commit(&shard, &handle.gid, &ballot, delivery)
                .await;
            engine.feed_result(&handle, event);
        });
    }

    /// 3PC: asks every shard for its state under `ballot`, in parallel; each answer is fed on its
    /// own as it comes. An unanswered shard is simply missing: the machine decides only with every
    /// state and asks again, under a new ballot, on its next deadline.
    fn query_participant_states(
        self: &Arc<Self>,
        handle: &Arc<TxnHandle>,
        shards: Vec<ShardName>,
        ballot: Ballot,
    ) {
        let peers = self.links.peers(shards.iter().map(ShardName::as_str));
        // An answer later than the machine's next round would be for a ballot it has left.
        let timeout = Duration::from_millis(self.default_timeouts.vote_ms);
        for shard in shards {
            let (engine, handle) = (Arc::clone(self), Arc::clone(handle));
            let (ballot, peers) = (ballot.clone(), peers.clone());
            tokio::spawn(async move {
                let report = engine
                    .links
                    .query_state(&shard, &handle.gid, &ballot, peers, timeout)
                    .await;
                if let Some(report) = report {
                    let event = Event::ParticipantStatesLearned {
                        ballot,
                        reports: vec![(shard, report)],
                    };
                    engine.feed_result(&handle, event);
                }
            });
        }
    }

    /// The lazy end record, between `before-end-record` and `after-end-record` (not for a
    /// recovered transaction's re-drive, as for the commit round).
    fn persist_end(&self, handle: &Arc<TxnHandle>) {
        let txid = handle.gid.txid();
        let live = !handle.machine().recovered();
        let fired = if live {
            failpoints::hit(failpoints::BEFORE_END_RECORD)
        } else {
            None
        };
        match fired {
            None | Some(Fired::On) => {}
            Some(Fired::Drop) => return,
            Some(Fired::Error) => {
                self.log_failed(format!(
                    "failpoint {}: writing the end record of {txid} failed",
                    failpoints::BEFORE_END_RECORD
                ));
            }
        }
        self.log.end(txid);
        if live {
            failpoints::hit(failpoints::AFTER_END_RECORD);
        }
    }

    fn persist_commit(self: &Arc<Self>, handle: &Arc<TxnHandle>, participants: Vec<ShardName>) {
        let record = CommitRecord {
            txid: handle.gid.txid(),
            gid: handle.gid.to_string(),
            participants: participants.iter().map(ToString::to_string).collect(),
            decided_at_ms: now_ms(),
        };
        self.force(handle, Forced::Commit(record));
    }

    /// Forces one record to the log on a task of its own (group-committed with whatever else is
    /// waiting), then feeds the event saying it is durable. The record's failpoints fail the write
    /// as a failed fsync would: the coordinator exits and a restart recovers from the log.
    fn force(self: &Arc<Self>, handle: &Arc<TxnHandle>, record: Forced) {
        let (before, after, what, durable) = match &record {
            Forced::Commit(_) => (
                failpoints::BEFORE_COMMIT_DECISION,
                Some(failpoints::AFTER_COMMIT_DECISION),
                "commit record",
                Event::DecisionDurable,
            ),
            Forced::PreCommit(_) => (
                failpoints::BEFORE_PRE_COMMIT_RECORD,
                None,
                "pre-commit record",
                Event::PreCommitDurable,
            ),
        };
        let (engine, handle) = (Arc::clone(self), Arc::clone(handle));
        tokio::spawn(async move {
            if failpoints::hit(before).is_some() {
                engine.log_failed(format!(
                    "failpoint {before}: writing the {what} of {} failed",
                    handle.gid
                ));
            }
            let written = match record {
                Forced::Commit(record) => engine.log.commit(record).await,
                Forced::PreCommit(record) => engine.log.pre_commit(record).await,
            };
            if let Err(e) = written {
                engine.log_failed(e);
            }
            if let Some(after) = after
                && failpoints::hit(after).is_some()
            {
                engine.log_failed(format!(
                    "failpoint {after}: the {what} of {} was written but its fsync failed",
                    handle.gid
                ));
            }
            engine.feed_result(&handle, durable);
        });
    }

    fn send_phase_two(
        self: &Arc<Self>,
        handle: &Arc<TxnHandle>,
        shard: ShardName,
        delay_ms: u64,
        commit: bool,
        delivery: Delivery,
    ) {
        let (engine, handle) = (Arc::clone(self), Arc::clone(handle));
        tokio::spawn(async move {
            if delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            }
            let event = engine.links.finish(&shard, &handle.gid, commit, delivery).await;
            engine.feed_result(&handle, event);
        });
    }

    fn retire(&self, txid: TxId) {
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

    pub async fn execute(
        self: &Arc<Self>,
        txid: TxId,
        shard: &str,
        sql: String,
        params: Vec<pb::Value>,
    ) -> Result<pb::ExecuteResult, ApiError> {
        self.run_statement(txid, shard, sql, params, None).await
    }

    /// `execute` for a branch's last statement when the caller will commit right after (one-shot
    /// submits over several shards): the participant votes in the same call, and the vote is kept
    /// for the machine's `SendPrepare` instead of a Prepare message. A branch prepared this way and
    /// then aborted is rolled back by the abort like any prepared branch. With the
    /// `after-some-prepares` failpoint armed the votes go through Prepare messages as before.
    /// `participants`: every shard of the transaction (a one-shot submit knows them all up
    /// front); a three-phase vote names them, with their addresses, to the participant, and counts
    /// only if the machine prepares with exactly those (`named_as_prepared`).
    pub async fn execute_and_prepare(
        self: &Arc<Self>,
        txid: TxId,
        shard: &str,
        sql: String,
        params: Vec<pb::Value>,
        participants: &[ShardName],
    ) -> Result<pb::ExecuteResult, ApiError> {
        let fuse = !failpoints::armed(failpoints::AFTER_SOME_PREPARES);
        self.run_statement(txid, shard, sql, params, fuse.then_some(participants))
            .await
    }

    /// Enlists `shard` in the transaction for a statement: the shard, the transaction, and the
    /// milliseconds left before its next deadline (the statement's time budget).
    fn enlist(
        self: &Arc<Self>,
        txid: TxId,
        shard: &str,
    ) -> Result<(ShardName, Arc<TxnHandle>, u64), ApiError> {
        let shard = self.links.resolve(shard)?;
        let handle = self.handle(txid)?;
        self.feed(&handle, Event::Enlist { shard: shard.clone() })
            .map_err(refused)?;
        let remaining = handle
            .machine()
            .next_deadline_ms()
            .map_or(0, |d| d.saturating_sub(now_ms()));
        Ok((shard, handle, remaining))
    }

    async fn run_statement(
        self: &Arc<Self>,
        txid: TxId,
        shard: &str,
        sql: String,
        params: Vec<pb::Value>,
        prepare_with: Option<&[ShardName]>,
    ) -> Result<pb::ExecuteResult, ApiError> {
        let (shard, handle, remaining) = self.enlist(txid, shard)?;
        let prepare = prepare_with.is_some();
        let (protocol, peers, mut named) = match (prepare_with, handle.machine().protocol()) {
            (Some(participants), Protocol::ThreePhase) => (
                pb::Protocol::ThreePhase as i32,
                self.links.peers(participants.iter().map(ShardName::as_str)),
                participants.to_vec(),
            ),
            _ => (pb::Protocol::Unspecified as i32, Vec::new(), Vec::new()),
        };
        named.sort_unstable();
        let request = pb::BranchExecuteRequest {
            gid: handle.gid.to_string(),
            sql,
            params,
            options: Some(handle.branch_options),
            protocol,
            peers,
        };
        let timeout = Duration::from_millis(remaining.max(1));
        let result = if prepare {
            match self.links.execute_and_prepare(&shard, request, timeout).await {
                Ok((result, vote)) => {
                    handle.early_votes().push(EarlyVote {
                        shard: shard.clone(),
                        vote,
                        named,
                    });
                    Ok(result)
                }
                Err(error) => Err(error),
            }
        } else {
            self.links.execute(&shard, request, timeout).await
        };
        match &result {
            Ok(_) => self.feed_result(&handle, Event::ExecuteSucceeded { shard }),
            Err(error) => {
                let reason = crate::participants::execute_failed(&shard, error);
                self.feed_result(&handle, Event::ExecuteFailed { shard, reason });
            }
        }
        result
    }

    /// A single-shard transaction's last statement and its commit in one participant call
    /// (`ExecuteAndCommit`; one-shot submits on one shard). The statement is handed to the machine's
    /// `CommitOnePhase`, so it runs only once the transaction is committing and no timeout or
    /// rollback can abort it under a COMMIT already sent. Answers the outcome and, when the
    /// statement ran, its result; `expect_rows` is checked by the participant before COMMIT.
    #[allow(clippy::too_many_arguments)]
    pub async fn commit_with_statement(
        self: &Arc<Self>,
        txid: TxId,
        shard: &str,
        sql: String,
        params: Vec<pb::Value>,
        expect_rows: Option<u64>,
        op: usize,
        wait_for_apply: bool,
    ) -> Result<(Outcome, Option<pb::ExecuteResult>), ApiError> {
        let (_, handle, remaining) = self.enlist(txid, shard)?;
        *handle.fused() = Fused::Pending {
            request: pb::ExecuteAndCommitRequest {
                execute: Some(pb::BranchExecuteRequest {
                    gid: handle.gid.to_string(),
                    sql,
                    params,
                    options: Some(handle.branch_options),
                    ..Default::default()
                }),
                expect_rows,
            },
            op,
            // The statement may use what is left of the transaction's time; the COMMIT gets the
            // time a one-phase commit gets.
            timeout: Duration::from_millis(remaining.max(1)) + crate::participants::PHASE_TWO_TIMEOUT,
        };
        let outcome = self
            .request_outcome(&handle, Event::CommitRequested { wait_for_apply })
            .await;
        let result = match std::mem::take(&mut *handle.fused()) {
            Fused::Ran(result) => Some(result),
            Fused::None | Fused::Pending { .. } => None,
        };
        Ok((outcome?, result))
    }

    /// Asks the transaction to commit and waits for the outcome.
    pub async fn commit(self: &Arc<Self>, txid: TxId, wait_for_apply: bool) -> Result<Outcome, ApiError> {
        let handle = self.handle(txid)?;
        self.request_outcome(&handle, Event::CommitRequested { wait_for_apply })
            .await
    }

    pub async fn rollback(self: &Arc<Self>, txid: TxId, reason: AbortReason) -> Result<Outcome, ApiError> {
        let handle = self.handle(txid)?;
        self.request_outcome(&handle, Event::AbortRequested { reason })
            .await
    }

    async fn request_outcome(
        self: &Arc<Self>,
        handle: &Arc<TxnHandle>,
        event: Event,
    ) -> Result<Outcome, ApiError> {
        let (sender, receiver) = oneshot::channel();
        *handle.waiter() = Some(sender);
        if let Err(e) = self.feed(handle, event) {
            handle.waiter().take();
            return Err(refused(e));
        }
        receiver.await.map_err(|_| {
            ApiError::Unavailable(format!(
                "transaction {} is still being decided by another request; ask GetTransaction for its outcome",
                handle.gid.txid()
            ))
        })
    }

    /// Checks every transaction with a deadline that has passed.
    pub fn tick(self: &Arc<Self>) {
        let now = now_ms();
        let due: Vec<Arc<TxnHandle>> = self
            .table()
            .live
            .values()
            .filter(|h| h.machine().next_deadline_ms().is_some_and(|d| d <= now))
            .cloned()
            .collect();
        for handle in due {
            self.feed_result(&handle, Event::Tick);
        }
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
        found.sort_by_key(|h| std::cmp::Reverse(h.gid.txid()));
        found.truncate(limit);
        found
    }

    /// What a recovering participant should do with `gid`, and whether the coordinator still
    /// needs the participant's marker row for it.
    pub fn decision(&self, gid: &str) -> (pb::Decision, bool) {
        let Ok(gid) = Gid::parse(gid) else {
            return (pb::Decision::Unspecified, false);
        };
        if gid.coordinator() != &self.id {
            return (pb::Decision::Unspecified, false);
        }
        let Some(handle) = self.table().get(gid.txid()).cloned() else {
            // An operator's resolve may be about to decide it: ask again later.
            if !self.resolving.presume_abort(gid.txid()) {
                return (pb::Decision::Pending, true);
            }
            // Presumed abort: no record means no commit was ever decided.
            return (pb::Decision::Abort, false);
        };
        let phase = handle.machine().phase();
        match phase {
            Phase::Committing => (pb::Decision::Commit, true),
            Phase::Aborting => (pb::Decision::Abort, true),
            Phase::Committed => (pb::Decision::Commit, false),
            Phase::Aborted | Phase::OutcomeUnknown => (pb::Decision::Abort, false),
            // Includes `PreCommitting`: a 3PC transaction whose outcome is being learned (a
            // pre-commit may be out) is never presumed aborted.
            _ => (pb::Decision::Pending, true),
        }
    }

    /// Forces what is queued in the log (graceful shutdown).
    pub async fn flush(&self) {
        if let Err(e) = self.log.flush().await {
            tracing::warn!("flushing the decision log at shutdown: {e}");
        }
    }
}

/// An early vote as the machine may count it. A three-phase vote is a YES only if it named
/// exactly the participants the transaction prepares with: termination decides with the states of
/// the participants each one was told about, so two lists must never differ (a client that enlists
/// another shard in a running submit's transaction would make them differ).
fn named_as_prepared(early: EarlyVote, shards: &[ShardName], protocol: Protocol) -> (ShardName, Vote) {
    if protocol != Protocol::ThreePhase {
        return (early.shard, early.vote);
    }
    let mut prepared = shards.to_vec();
    prepared.sort_unstable();
    if early.named == prepared {
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

fn refused(error: ProtocolError) -> ApiError {
    ApiError::FailedPrecondition(error.to_string())
}

#[cfg(test)]
mod early_vote_tests {
    use super::*;

    fn shards(names: &[&str]) -> Vec<ShardName> {
        names.iter().map(|s| ShardName::new(s).unwrap()).collect()
    }

    fn early(named: &[&str]) -> EarlyVote {
        EarlyVote {
            shard: ShardName::new("s0").unwrap(),
            vote: Vote::Yes,
            named: shards(named),
        }
    }

    #[test]
    fn a_three_phase_vote_counts_only_if_it_named_exactly_the_prepared_participants() {
        let all = shards(&["s1", "s0"]);
        let (_, vote) = named_as_prepared(early(&["s0", "s1"]), &all, Protocol::ThreePhase);
        assert_eq!(vote, Vote::Yes, "the same set, in another order");
        let three = shards(&["s0", "s1", "s2"]);
        let (_, vote) = named_as_prepared(early(&["s0", "s1"]), &three, Protocol::ThreePhase);
        let Vote::No(reason) = vote else {
            panic!("a vote that named fewer participants must be a NO, got {vote:?}");
        };
        assert!(reason.message.contains("s2"), "{}", reason.message);
        let (_, vote) = named_as_prepared(early(&[]), &three, Protocol::TwoPhase);
        assert_eq!(vote, Vote::Yes, "two-phase votes name nobody");
    }
}
