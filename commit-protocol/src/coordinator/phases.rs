//! The coordinator's view of one transaction's progress: its limits (`Timeouts`), its phase, and
//! each participant's branch with its phase.

use treaty_types::ShardName;

/// Limits a transaction runs under, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Timeouts {
    /// From begin to the end of voting.
    pub transaction_ms: u64,
    /// Between client calls while active (not counting a statement that is running).
    pub idle_ms: u64,
    /// From sending prepare to the last vote; a missing vote counts as NO.
    pub vote_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    Active,
    Preparing,
    /// Every vote was YES or READ-ONLY; the commit decision is being forced to the log.
    LoggingCommit,
    /// Three-phase commit, between the votes and the commit decision: the pre-commit record is
    /// being forced, pre-commits are out, or (after a timeout or a restart) the participants'
    /// states are being learned.
    PreCommitting,
    CommittingOnePhase,
    /// Decided commit (durable); phase two in progress.
    Committing,
    /// Decided abort; phase two in progress.
    Aborting,
    Committed,
    Aborted,
    OutcomeUnknown,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Active => "active",
            Phase::Preparing => "preparing",
            Phase::LoggingCommit => "logging its commit decision",
            Phase::PreCommitting => "pre-committing",
            Phase::CommittingOnePhase => "committing",
            Phase::Committing => "committing",
            Phase::Aborting => "aborting",
            Phase::Committed => "committed",
            Phase::Aborted => "aborted",
            Phase::OutcomeUnknown => "in an unknown state",
        }
    }

    /// Decided, with phase two still to finish: what `ListTransactions` calls in doubt.
    pub fn is_in_doubt(self) -> bool {
        matches!(self, Phase::Committing | Phase::Aborting)
    }

    pub fn is_undecided(self) -> bool {
        matches!(
            self,
            Phase::Active
                | Phase::Preparing
                | Phase::LoggingCommit
                | Phase::PreCommitting
                | Phase::CommittingOnePhase
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BranchPhase {
    Active,
    Preparing,
    Prepared,
    /// 3PC: sent a pre-commit, not acknowledged yet.
    PreCommitting,
    /// 3PC: durably pre-committed.
    PreCommitted,
    ReadOnly,
    VotedNo,
    Committing,
    Committed,
    Aborting,
    Aborted,
}

/// One participant's part in the transaction.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Branch {
    pub shard: ShardName,
    pub phase: BranchPhase,
    /// Phase-two sends so far.
    pub attempts: u32,
    pub last_error: Option<String>,
}
