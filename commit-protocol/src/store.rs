//! The decision store as the protocol core sees it: where a coordinator forces its commit
//! decisions, 3PC pre-commit records, operators' heuristic decisions, end records and
//! incarnations, and what it replays at start. The core owns the trait and the record types; the
//! file decision log (`treaty-decision-log`) implements it in production, and an in-memory store
//! implements it in the seeded simulation. Every `force_*` returns only once the record is
//! durable: the driver feeds `DecisionDurable` / `PreCommitDurable` after it, never before.

use std::future::Future;

use treaty_types::TxId;

/// A durable commit decision: the participants must commit the prepared branch `gid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitRecord {
    pub txid: u64,
    pub gid: String,
    pub participants: Vec<String>,
    pub decided_at_ms: u64,
}

/// 3PC: the transaction entered pre-commit with these participants (every YES voter), so
/// pre-commits may have been sent. Forced before the first `PreCommit` leaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreCommitRecord {
    pub txid: u64,
    pub gid: String,
    pub participants: Vec<String>,
    /// When the record was written, in ms since the Unix epoch.
    pub at_ms: u64,
}

/// What an operator decided for a transaction by hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeuristicDecision {
    Commit,
    Abort,
}

impl HeuristicDecision {
    pub fn name(self) -> &'static str {
        match self {
            HeuristicDecision::Commit => "COMMIT",
            HeuristicDecision::Abort => "ABORT",
        }
    }
}

/// A heuristic decision taken by an operator (`treaty resolve`), with who, when and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeuristicRecord {
    pub txid: u64,
    pub gid: String,
    pub decision: HeuristicDecision,
    /// The shards the decision is sent to.
    pub participants: Vec<String>,
    pub operator: String,
    pub reason: String,
    pub decided_at_ms: u64,
}

impl HeuristicRecord {
    /// The commit decision a heuristic commit amounts to (what recovery re-drives).
    pub fn as_commit(&self) -> Option<CommitRecord> {
        (self.decision == HeuristicDecision::Commit).then(|| CommitRecord {
            txid: self.txid,
            gid: self.gid.clone(),
            participants: self.participants.clone(),
            decided_at_ms: self.decided_at_ms,
        })
    }
}

/// What a store holds that a restarted coordinator must finish.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unfinished {
    /// No txid at or below this was handed out by an earlier start.
    pub txids_reserved_up_to: u64,
    /// Commit decisions (heuristic commits included) without an end record, in decision order.
    pub commits: Vec<CommitRecord>,
    /// Heuristic decisions without an end record.
    pub heuristics: Vec<HeuristicRecord>,
    /// 3PC pre-commit records with neither a commit nor an end record: their outcome must be
    /// learned from the participants.
    pub pre_committed: Vec<PreCommitRecord>,
}

/// The store could not make a record durable. The decision is then unknown to this process, so
/// the driver stops and a restart recovers from what is durable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the decision store failed: {0}; stop, and let a restart recover from what is durable")]
pub struct StoreError(pub String);

/// Where decisions are forced. Implementations must make each `force_*` durable before its future
/// completes, and must never reorder a commit record after the end record of the same txid.
pub trait DecisionStore: Send + Sync + 'static {
    /// Forces the commit decision.
    fn force_commit(&self, record: CommitRecord) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// 3PC: forces "pre-commits may be sent" before the first leaves.
    fn force_pre_commit(
        &self,
        record: PreCommitRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Forces an operator's decision.
    fn force_heuristic(&self, record: HeuristicRecord)
    -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Forces "txids up to `up_to` may be in use", so none is handed out twice across restarts.
    fn reserve_txids(&self, up_to: u64) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Forces and returns a new incarnation, above every earlier one (3PC ballots carry it).
    fn new_incarnation(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// The transaction needs nothing more (lazy: durable with a later force, or never, which only
    /// costs a repeated re-drive after a restart).
    fn end(&self, txid: TxId);
    /// What the store held unfinished when it was opened (the file log replays at open; a
    /// restarted coordinator re-drives or re-learns every entry).
    fn replay(&self) -> impl Future<Output = Result<Unfinished, StoreError>> + Send;
    /// Makes everything written so far durable (graceful shutdown).
    fn flush(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
}
