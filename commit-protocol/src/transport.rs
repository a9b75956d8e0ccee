//! The participant transport as the protocol core sees it: the calls a coordinator makes to one
//! participant, on domain types. The gRPC links (`treaty_coordinator::participants`) implement it
//! in production (conversions to and from `treaty.v1` live there, at the edge); the seeded
//! simulation implements it in memory. A transport reports what happened ([`LinkError`] says how a
//! call failed); what that means for the transaction is decided here in the core
//! ([`crate::answers`]).

use std::future::Future;

use treaty_types::{CoordinatorId, DatabaseRole, Gid, Protocol, ShardName, Value};

use crate::participant::Report;
use crate::termination::Ballot;

/// Isolation level of a branch (`BEGIN ISOLATION LEVEL ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Isolation {
    /// The database's default (read committed).
    #[default]
    Default,
    ReadCommitted,
    RepeatableRead,
    Serializable,
}

/// Settings a branch opens with.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct BranchOptions {
    pub isolation: Isolation,
    /// PostgreSQL `lock_timeout` for the branch; 0: the participant's default.
    pub lock_timeout_ms: u64,
    /// PostgreSQL `statement_timeout` for the branch; 0: none.
    pub statement_timeout_ms: u64,
    /// The role the branch's statements run under (the client's, from its identity); `None`: the
    /// participant's own role.
    pub database_role: Option<DatabaseRole>,
}

/// One statement of a branch; the first opens the branch with `options`.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    pub gid: Gid,
    pub sql: String,
    pub params: Vec<Value>,
    pub options: BranchOptions,
    /// A statement of this branch already succeeded: the participant must find the branch open,
    /// never open a new one (its earlier statements would be missing from what commits).
    pub continues: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Column {
    pub name: String,
    pub type_name: String,
}

/// What a statement returned.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StatementResult {
    pub columns: Vec<Column>,
    pub rows: Vec<Vec<Value>>,
    pub rows_affected: u64,
}

/// A vote request: the protocol and, for three-phase commit, every participant of the transaction
/// (termination asks them; the transport adds where each is reached).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoteRequest {
    pub protocol: Protocol,
    pub participants: Vec<ShardName>,
}

/// A participant's vote as it answered it, before the core checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VoteAnswer {
    Yes,
    ReadOnly,
    No { sqlstate: String, message: String },
}

/// The answer to a statement sent together with its vote (`ExecuteAndPrepare`).
#[derive(Debug, Clone, PartialEq)]
pub struct ExecutedAndVoted {
    pub result: StatementResult,
    /// `None`: the answer carried no vote (a participant that predates the call?).
    pub vote: Option<VoteAnswer>,
    /// The protocol the participant voted under (`None`: it did not say, as one that predates
    /// three-phase votes on this call).
    pub voted_under: Option<Protocol>,
}

/// The answer to a statement sent together with its COMMIT (`ExecuteAndCommit`).
#[derive(Debug, Clone, PartialEq)]
pub struct ExecutedAndCommitted {
    pub result: StatementResult,
    /// False: `expect_rows` was not met and the branch rolled back.
    pub committed: bool,
}

/// A participant's answer to a 3PC pre-commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreCommitAnswer {
    pub acknowledged: bool,
    /// When refused: the higher ballot it promised, if that is why.
    pub promised: Option<Ballot>,
    pub message: String,
}

/// What a decision branch's `CommitDecision` came to, when the participant answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecisionWrite {
    /// The commit row committed: the transaction is decided commit.
    Committed,
    /// The commit row did not commit (an abort row won, or the COMMIT failed); the branch rolled
    /// back. `message` says why.
    NotCommitted { message: String },
}

/// A decision as `treaty.decisions` holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoredOutcome {
    Commit,
    Abort,
}

/// One row of `treaty.decisions` (or its absence).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDecision {
    pub gid: Gid,
    /// `None`: no row (only when not concluding).
    pub outcome: Option<StoredOutcome>,
    /// The shards to commit (commit rows).
    pub participants: Vec<ShardName>,
    pub decided_at_ms: u64,
}

/// A lock a prepared branch holds (`pg_locks`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PreparedLock {
    pub locktype: String,
    pub mode: String,
    pub relation: String,
    pub granted: bool,
}

/// A branch a participant holds prepared, for operators (`treaty in-doubt`) and heuristic
/// decisions.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PreparedBranch {
    /// The transaction's GID (or, for a GID this build cannot read back, the text PostgreSQL holds).
    pub gid: String,
    pub prepared_at_ms: u64,
    pub age_ms: u64,
    pub owner: String,
    pub locks: Vec<PreparedLock>,
}

/// How a call to a participant failed. The variants follow what a caller must distinguish: whether
/// the participant may have acted, and whether PostgreSQL refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// PostgreSQL refused the statement or the COMMIT; the branch rolled back.
    #[error("SQLSTATE {sqlstate}: {message}")]
    Sql {
        sqlstate: String,
        message: String,
        retryable: bool,
    },
    /// The call did not reach the participant, or broke before an answer: it may or may not have
    /// acted.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// No answer within the call's time: it may or may not have acted.
    #[error("no answer within {after_ms} ms")]
    TimedOut { after_ms: u64 },
    /// The participant refused before acting: a bad request, or a branch in the wrong state. On a
    /// phase-two message it means the participant's records contradict the decision.
    #[error("refused: {0}")]
    Refused(String),
    /// The participant gave up on a deadline of its own (a statement timeout, say).
    #[error("deadline exceeded: {0}")]
    Deadline(String),
    /// The participant refused the request as malformed (a statement its SQL guard does not
    /// allow, a bad value).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The participant does not know what the request names.
    #[error("not found: {0}")]
    NotFound(String),
    /// The participant is out of a resource (connections, branches); the call may succeed later.
    #[error("out of resources: {0}")]
    Exhausted(String),
    /// The participant lost the branch (it restarted): the transaction may succeed if run again.
    #[error("branch lost: {0}")]
    BranchLost(String),
    /// The participant does not implement the call (an older version).
    #[error("not implemented by the participant: {0}")]
    Unimplemented(String),
    /// Anything else the participant answered.
    #[error("{0}")]
    Other(String),
}

/// The calls a coordinator makes to its participants. Every call names the shard; `timeout_ms`
/// bounds the whole call (a call past it fails with [`LinkError::TimedOut`]).
pub trait ParticipantTransport: Send + Sync + 'static {
    /// The configured shard named `name`, if any.
    fn shard(&self, name: &str) -> Option<ShardName>;
    /// Every configured shard, sorted.
    fn shards(&self) -> Vec<ShardName>;
    /// Whether a one-shot submit may send a branch's vote with its last statement
    /// (`execute_and_prepare`) instead of a Prepare message.
    fn votes_with_last_statement(&self) -> bool {
        true
    }

    fn execute(
        &self,
        shard: &ShardName,
        statement: Statement,
        timeout_ms: u64,
    ) -> impl Future<Output = Result<StatementResult, LinkError>> + Send;

    /// A branch's last statement, with its vote in the same call (one-shot submits).
    fn execute_and_prepare(
        &self,
        shard: &ShardName,
        statement: Statement,
        vote: VoteRequest,
        timeout_ms: u64,
    ) -> impl Future<Output = Result<ExecutedAndVoted, LinkError>> + Send;

    /// A single-shard transaction's last statement and its COMMIT in one call.
    fn execute_and_commit(
        &self,
        shard: &ShardName,
        statement: Statement,
        expect_rows: Option<u64>,
        timeout_ms: u64,
    ) -> impl Future<Output = Result<ExecutedAndCommitted, LinkError>> + Send;

    fn prepare(
        &self,
        shard: &ShardName,
        gid: &Gid,
        vote: VoteRequest,
        timeout_ms: u64,
    ) -> impl Future<Output = Result<VoteAnswer, LinkError>> + Send;

    /// `COMMIT PREPARED` (the gRPC links coalesce these per shard).
    fn commit(
        &self,
        shard: &ShardName,
        gid: &Gid,
        timeout_ms: u64,
    ) -> impl Future<Output = Result<(), LinkError>> + Send;

    /// `ROLLBACK PREPARED`, or the rollback of a branch that never voted.
    fn abort(
        &self,
        shard: &ShardName,
        gid: &Gid,
        timeout_ms: u64,
    ) -> impl Future<Output = Result<(), LinkError>> + Send;

    /// A plain `COMMIT` of the only writing branch.
    fn commit_one_phase(
        &self,
        shard: &ShardName,
        gid: &Gid,
        timeout_ms: u64,
    ) -> impl Future<Output = Result<(), LinkError>> + Send;

    /// `--decision-store shard`: inserts the commit row of `gid` inside its branch on `shard` and
    /// commits the branch in one phase (`standalone`: in a transaction of its own).
    fn commit_decision(
        &self,
        shard: &ShardName,
        gid: &Gid,
        participants: &[ShardName],
        standalone: bool,
        timeout_ms: u64,
    ) -> impl Future<Output = Result<DecisionWrite, LinkError>> + Send;

    /// The decision rows of `gids` on `shard` (their decision shard), one per GID in order. With
    /// `conclude_abort`, an abort row is first inserted for every GID without a row, so every
    /// answer is final.
    fn read_decisions(
        &self,
        shard: &ShardName,
        gids: &[Gid],
        conclude_abort: bool,
        timeout_ms: u64,
    ) -> impl Future<Output = Result<Vec<StoredDecision>, LinkError>> + Send;

    /// The commit rows on `shard`, oldest first, optionally only `coordinator`'s.
    fn list_decisions(
        &self,
        shard: &ShardName,
        coordinator: Option<&CoordinatorId>,
        limit: u32,
        timeout_ms: u64,
    ) -> impl Future<Output = Result<Vec<StoredDecision>, LinkError>> + Send;

    /// Deletes the commit rows of `gids` on `shard` (every branch of each has committed).
    fn forget_decisions(
        &self,
        shard: &ShardName,
        gids: &[Gid],
        timeout_ms: u64,
    ) -> impl Future<Output = Result<u64, LinkError>> + Send;

    /// 3PC: pre-commit under `ballot`.
    fn pre_commit(
        &self,
        shard: &ShardName,
        gid: &Gid,
        ballot: &Ballot,
        timeout_ms: u64,
    ) -> impl Future<Output = Result<PreCommitAnswer, LinkError>> + Send;

    /// The branches `shard` holds prepared, with their locks.
    fn list_prepared(
        &self,
        shard: &ShardName,
        timeout_ms: u64,
    ) -> impl Future<Output = Result<Vec<PreparedBranch>, LinkError>> + Send;

    /// 3PC: the branch's state under `ballot`; `participants` lets one that never got the prepare
    /// take part.
    fn query_state(
        &self,
        shard: &ShardName,
        gid: &Gid,
        ballot: &Ballot,
        participants: &[ShardName],
        timeout_ms: u64,
    ) -> impl Future<Output = Result<Report, LinkError>> + Send;
}
