//! What goes into the protocol state machine ([`Event`]) and what comes out ([`Action`]), plus the
//! outcome and abort reasons a client sees.

use treaty_types::ShardName;

use crate::participant::Report;
use crate::termination::Ballot;

/// Why a transaction aborted: enough for a client to report it and decide whether to retry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AbortReason {
    pub cause: AbortCause,
    pub shard: Option<ShardName>,
    pub sqlstate: String,
    pub message: String,
    pub retryable: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AbortCause {
    ClientRollback,
    StatementFailed,
    VoteNo,
    Timeout,
    ExpectRows,
    ParticipantUnavailable,
    CoordinatorRestart,
    Heuristic,
    /// The decision row says abort: another coordinator or an operator concluded abort before
    /// this transaction's decision branch committed (`--decision-store shard`).
    ConcludedAbort,
}

impl AbortReason {
    pub fn new(cause: AbortCause, message: impl Into<String>) -> Self {
        let retryable = matches!(
            cause,
            AbortCause::Timeout | AbortCause::ParticipantUnavailable | AbortCause::ConcludedAbort
        );
        Self {
            cause,
            shard: None,
            sqlstate: String::new(),
            message: message.into(),
            retryable,
        }
    }

    pub fn on_shard(mut self, shard: &ShardName) -> Self {
        self.shard = Some(shard.clone());
        self
    }
}

impl std::fmt::Display for AbortReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.cause)?;
        if let Some(shard) = &self.shard {
            write!(f, " on shard {shard}")?;
        }
        if !self.sqlstate.is_empty() {
            write!(f, " (SQLSTATE {})", self.sqlstate)?;
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Outcome {
    Committed,
    Aborted(AbortReason),
    /// A one-phase commit whose answer was lost: the participant may or may not have committed.
    Unknown(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Vote {
    Yes,
    /// The branch wrote nothing and has already finished locally; it takes no part in phase two.
    ReadOnly,
    No(AbortReason),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Event {
    /// The client is about to run a statement on `shard`; enlists it. Refused unless active.
    Enlist {
        shard: ShardName,
    },
    /// A statement finished on `shard`; restarts the idle timer.
    ExecuteSucceeded {
        shard: ShardName,
    },
    /// A statement failed on `shard`; the whole transaction aborts.
    ExecuteFailed {
        shard: ShardName,
        reason: AbortReason,
    },
    /// The client asks for the transaction to abort before it commits (an `expect_rows` miss too).
    AbortRequested {
        reason: AbortReason,
    },
    CommitRequested {
        wait_for_apply: bool,
    },
    /// A one-shot submit on one shard commits with its last statement on `shard`, sent together
    /// with the COMMIT once the transaction is committing. Refused unless the transaction's only
    /// branch is on `shard` and no vote was cast early.
    CommitWithLastStatement {
        shard: ShardName,
        wait_for_apply: bool,
    },
    /// A vote cast with a branch's last statement (`ExecuteAndPrepare`, one-shot submits over
    /// several shards), kept until the transaction prepares. `named`: under three-phase commit,
    /// the participants the vote named to the participant (termination asks them); the vote counts
    /// as a YES only if they are exactly the ones the transaction prepares with.
    VoteCastEarly {
        shard: ShardName,
        vote: Vote,
        named: Vec<ShardName>,
    },
    VoteReceived {
        shard: ShardName,
        vote: Vote,
    },
    /// The commit decision asked for by `PersistCommit` is durable, or the decision branch asked
    /// for by `CommitDecision` committed its commit row.
    DecisionDurable,
    /// The decision branch did not commit its commit row: an abort row won (someone concluded
    /// abort first), or its COMMIT failed and it rolled back. The transaction aborts.
    DecisionRefused {
        reason: AbortReason,
    },
    /// The decision branch's commit (or a `ConcludeDecision`) got no clear answer: the decision
    /// must be read back, concluding abort if there is none (`ConcludeDecision`).
    DecisionUnknown {
        error: String,
    },
    /// The decision row read back by `ConcludeDecision`: commit, or abort (it was concluded).
    DecisionLearned {
        commit: bool,
    },
    /// A participant applied the phase-two message (commit or abort) sent to it.
    Acknowledged {
        shard: ShardName,
    },
    /// A phase-two message did not reach `shard` or was not applied; it will be sent again.
    PhaseTwoFailed {
        shard: ShardName,
        error: String,
    },
    OnePhaseCommitted,
    OnePhaseFailed {
        reason: AbortReason,
    },
    OnePhaseUnknown {
        error: String,
    },
    /// Time passed: checks the transaction, idle and vote deadlines.
    Tick,
    /// An operator aborts the transaction by hand (`treaty resolve --abort`). Taken only before a
    /// commit decision exists (`Active` or `Preparing`); refused once the commit is being logged.
    HeuristicAbort {
        reason: AbortReason,
    },
    /// 3PC: the record asked for by `PersistPreCommit` is durable.
    PreCommitDurable,
    /// 3PC: `shard` durably pre-committed under `ballot`.
    PreCommitAcknowledged {
        shard: ShardName,
        ballot: Ballot,
    },
    /// 3PC: answers to `QueryParticipantStates` under `ballot` (any subset; missing ones are asked
    /// again after the vote timeout).
    ParticipantStatesLearned {
        ballot: Ballot,
        reports: Vec<(ShardName, Report)>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    /// Ask every listed participant to prepare, in parallel; each answers with `VoteReceived`.
    SendPrepare { shards: Vec<ShardName> },
    /// Force the commit decision naming these participants to the log; answered by `DecisionDurable`.
    PersistCommit { participants: Vec<ShardName> },
    /// `--decision-store shard`: insert the commit row into `treaty.decisions` inside the decision
    /// branch on `shard` and commit it in one phase (`standalone`: the shard holds no open branch
    /// of this transaction, the row is inserted in a transaction of its own). `participants`: the
    /// prepared branches to commit after. Answered by `DecisionDurable`, `DecisionRefused` or
    /// `DecisionUnknown`.
    CommitDecision {
        shard: ShardName,
        participants: Vec<ShardName>,
        standalone: bool,
    },
    /// Read the decision row on `shard` after `delay_ms`, first inserting an abort row if there is
    /// none (waiting for a commit row still uncommitted), so the answer is final. Answered by
    /// `DecisionLearned` or `DecisionUnknown`.
    ConcludeDecision { shard: ShardName, delay_ms: u64 },
    /// Send `COMMIT PREPARED` after `delay_ms`; answered by `Acknowledged` or `PhaseTwoFailed`.
    SendCommit { shard: ShardName, delay_ms: u64 },
    /// Send an abort after `delay_ms`; answered by `Acknowledged` or `PhaseTwoFailed`.
    SendAbort { shard: ShardName, delay_ms: u64 },
    /// Commit the only writing branch with a plain COMMIT; answered by a `OnePhase*` event.
    CommitOnePhase { shard: ShardName },
    /// Send the last statement kept by `CommitWithLastStatement` together with the branch's plain
    /// COMMIT (`ExecuteAndCommit`); answered by a `OnePhase*` event.
    ExecuteAndCommitOnePhase { shard: ShardName },
    /// Answer the client waiting for the outcome.
    Reply(Outcome),
    /// Write the lazy end record: the log no longer needs this transaction.
    PersistEnd,
    /// The transaction needs nothing more; the driver may move it to its history.
    Finished,
    /// 3PC: force "this transaction entered pre-commit, with these participants" to the log, so a
    /// restarted coordinator never presumes abort for it; answered by `PreCommitDurable`.
    PersistPreCommit { participants: Vec<ShardName> },
    /// 3PC: ask `shard` to pre-commit under `ballot` after `delay_ms`; answered by
    /// `PreCommitAcknowledged`, or `PhaseTwoFailed` if it did not get there.
    SendPreCommit {
        shard: ShardName,
        ballot: Ballot,
        delay_ms: u64,
    },
    /// 3PC: ask every listed participant for its state under `ballot` (a participant that answers
    /// promises to ignore lower ballots); answered by `ParticipantStatesLearned`.
    QueryParticipantStates { shards: Vec<ShardName>, ballot: Ballot },
}

/// An event the transaction cannot take in its current phase. Each says what the caller did wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("transaction {txid} already aborted: {reason}")]
    AlreadyAborted { txid: u64, reason: AbortReason },
    #[error("transaction {txid} already committed")]
    AlreadyCommitted { txid: u64 },
    #[error("transaction {txid} is {phase}; statements and rollback are only accepted while it is active")]
    NotActive { txid: u64, phase: &'static str },
    #[error("transaction {txid} ended with an unknown outcome: {error}")]
    OutcomeUnknown { txid: u64, error: String },
    #[error(
        "transaction {txid} cannot commit with a last statement on shard {shard}: that needs exactly one \
         branch, on that shard, with no vote cast yet; it has branches on {branches:?}"
    )]
    LastStatementNeedsOneBranch {
        txid: u64,
        shard: ShardName,
        branches: Vec<ShardName>,
    },
    #[error(
        "transaction {txid}'s branch on shard {shard} already voted with what the client marked as its \
         last statement; send no more statements to {shard} (commit or roll back the transaction)"
    )]
    AlreadyVoted { txid: u64, shard: ShardName },
}
