//! The executor of two-phase branches. Every 2PC branch runs the pure
//! `treaty_commit_protocol::participant::Participant` machine (the one `commit-protocol/tests/model.rs`
//! checks), kept in the branch's slot of the branch table from its first statement until it is
//! finished. `drive` steps it with one event and carries out the actions it answers with (check
//! writes, `PREPARE TRANSACTION`, a local COMMIT, `COMMIT PREPARED` / `ROLLBACK PREPARED` or a
//! rollback, ask the coordinator), feeding each result back as the next event; what the RPC answers
//! (a vote, an acknowledgement, a refusal) is the machine's last word.
//!
//! The I/O of each action stays here, with the facts it learns: why a vote is NO, how a branch
//! ended (the history, from which a finished branch's machine is rebuilt), and errors a failpoint
//! injects. A step whose I/O fails drops the machine; the next call rebuilds it from the history,
//! as after a restart.

use treaty_commit_protocol::Protocol;
use treaty_commit_protocol::participant::{
    Participant, ParticipantAction, ParticipantEvent, ParticipantPhase, Refusal, Remembered,
};
use treaty_commit_protocol::termination::Rules;
use treaty_proto::Gid;

use super::{Agent, Vote};
use crate::branches::{ActiveBranch, Finished, Slot, SlotGuard};
use crate::error::BranchError;
use crate::failpoints;
use crate::postgres::{self, DbError};

/// SQLSTATE `connection_failure`, reported with a NO vote when the database connection broke.
pub(super) const CONNECTION_FAILURE: &str = "08006";

/// The machine's answer to the request that drove it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Answer {
    Vote(Vote),
    Acknowledged,
    Refused(Refusal),
    /// Nothing to answer (a sweep's tick, an abandoned branch).
    Nothing,
    /// The commit was acknowledged, but PostgreSQL held nothing prepared under the GID, which names
    /// a decision shard: it committed earlier, or never prepared here. The decision row, not a
    /// marker, is the authority for such a GID, so this participant cannot tell which; the
    /// coordinator, which sends Commit only when that row says commit, takes it as committed.
    NothingPrepared,
}

/// What `COMMIT PREPARED` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Applied {
    Committed,
    /// Nothing prepared under a GID that names a decision shard: see `Answer::NothingPrepared`.
    NothingPrepared,
}

/// What the executors learned during one drive, for the answer and the history.
#[derive(Default)]
pub(super) struct Learned {
    /// Why the vote is NO: SQLSTATE and message.
    pub(super) no_vote: Option<(String, String)>,
    /// Why the branch is being rolled back, for the history.
    pub(super) abort_reason: Option<String>,
    /// An error the call answers with whatever the machine says (a failpoint, a failed COMMIT).
    pub(super) error: Option<BranchError>,
    /// `CommitDecision`: the commit row the one-phase COMMIT inserts first, and what became of it.
    pub(super) decision: Option<super::decision::DecisionCommit>,
}

impl Agent {
    /// A machine for a branch that opens now; its timeout is the idle timeout.
    pub(super) fn new_machine(&self) -> Participant {
        Participant::new(
            self.shard.clone(),
            Protocol::TwoPhase,
            Rules::Classical,
            self.idle_timeout_ms(),
            self.clock_ms(),
        )
    }

    /// What this process remembers of a GID it holds no machine for.
    pub(super) fn remembered(&self, gid: &Gid) -> Option<Remembered> {
        Some(match self.branches.finished(gid.as_str())? {
            Finished::Prepared => Remembered::Prepared,
            Finished::ReadOnly => Remembered::ReadOnly,
            Finished::CommittedOnePhase | Finished::Committed => Remembered::Committed,
            Finished::Aborted(_) => Remembered::Aborted,
            Finished::OutcomeUnknown(_) => Remembered::OutcomeUnknown,
        })
    }

    /// Gives the slot a machine: a fresh one for an open branch, else one rebuilt from `remembered`.
    pub(super) fn ensure_machine(&self, slot: &mut Slot, remembered: Remembered) {
        if slot.machine.is_some() {
            return;
        }
        slot.machine = Some(if slot.active.is_some() {
            self.new_machine()
        } else {
            Participant::resume(
                self.shard.clone(),
                remembered,
                self.idle_timeout_ms(),
                self.clock_ms(),
            )
        });
    }

    /// Steps the slot's machine with `event` and carries out what it answers, until nothing is
    /// left. The slot must hold a machine (`ensure_machine`).
    pub(super) async fn drive(
        &self,
        slot: &mut SlotGuard,
        gid: &Gid,
        event: ParticipantEvent,
    ) -> Result<Answer, BranchError> {
        self.drive_learning(slot, gid, event, Learned::default()).await
    }

    /// A branch that has not voted cannot go on (`reason`): its machine decides, and its
    /// rollback is remembered with the reason.
    ///
    /// The drive is boxed: a failure path, awaited inside the hot path's futures (`execute`),
    /// which would otherwise each carry its 4.7 KB, allocated and copied on every call.
    pub(super) async fn abandon(&self, slot: &mut SlotGuard, gid: &Gid, reason: String) {
        self.ensure_machine(slot, Remembered::Aborted);
        let learned = Learned {
            abort_reason: Some(reason),
            ..Learned::default()
        };
        if let Err(error) =
            Box::pin(self.drive_learning(slot, gid, ParticipantEvent::WorkAbandoned, learned)).await
        {
            tracing::warn!(%gid, %error, "abandoning the branch failed");
        }
    }

    /// `drive`, with what the caller already knows (why a rollback would happen).
    pub(super) async fn drive_learning(
        &self,
        slot: &mut SlotGuard,
        gid: &Gid,
        event: ParticipantEvent,
        mut learned: Learned,
    ) -> Result<Answer, BranchError> {
        self.drive_keeping(slot, gid, event, &mut learned).await
    }

    /// `drive_learning`, leaving what the executors learned in `learned` for the caller.
    pub(super) async fn drive_keeping(
        &self,
        slot: &mut SlotGuard,
        gid: &Gid,
        event: ParticipantEvent,
        learned: &mut Learned,
    ) -> Result<Answer, BranchError> {
        let slot: &mut Slot = slot;
        let result = self.drive_inner(slot, gid, event, learned).await;
        if result.is_err() || slot.machine.as_ref().is_some_and(|m| m.phase().is_decided()) {
            // Finished (the history says how), or a step failed: the next call rebuilds it.
            slot.machine = None;
        }
        result
    }

    async fn drive_inner(
        &self,
        slot: &mut Slot,
        gid: &Gid,
        event: ParticipantEvent,
        learned: &mut Learned,
    ) -> Result<Answer, BranchError> {
        let mut answer = Answer::Nothing;
        let mut nothing_prepared = false;
        let mut next = Some(event);
        // One buffer for every step of the drive (a vote takes three).
        let mut actions = Vec::new();
        while let Some(event) = next.take() {
            let Some(machine) = slot.machine.as_mut() else {
                return Err(BranchError::Internal(format!("branch {gid} has no machine")));
            };
            let before = machine.phase();
            machine.step_into(event, self.clock_ms(), &mut actions);
            let after = machine.phase();
            for action in actions.drain(..) {
                match action {
                    ParticipantAction::CheckWrites => {
                        next = Some(self.check_writes(&mut slot.active, gid, learned).await)
                    }
                    ParticipantAction::PrepareBranch => {
                        next = Some(self.prepare_branch(&mut slot.active, gid, learned).await)
                    }
                    ParticipantAction::CommitLocally => {
                        next = Some(self.commit_locally(&mut slot.active, gid, after, learned).await)
                    }
                    ParticipantAction::ApplyCommit => {
                        nothing_prepared = self.commit_prepared(gid).await? == Applied::NothingPrepared
                    }
                    ParticipantAction::ApplyAbort => {
                        // Boxed: the largest of these futures (3.5 KB), and not the commit
                        // path's; inline, every drive of a branch would carry and copy it.
                        Box::pin(self.apply_abort(&mut slot.active, gid, before, learned)).await?
                    }
                    ParticipantAction::SendVote { yes: true } => answer = Answer::Vote(Vote::Yes),
                    ParticipantAction::SendVote { yes: false } => {
                        answer = Answer::Vote(self.no_vote(gid, learned.no_vote.take()))
                    }
                    ParticipantAction::SendReadOnlyVote => answer = Answer::Vote(Vote::ReadOnly),
                    ParticipantAction::AcknowledgeDecision => answer = Answer::Acknowledged,
                    ParticipantAction::Refuse(refusal) => answer = Answer::Refused(refusal),
                    ParticipantAction::AskCoordinator => self.ask_coordinator(gid),
                    other => {
                        // Three-phase actions; a two-phase machine never asks for them.
                        tracing::error!(%gid, ?other, "a two-phase branch asked for a three-phase action");
                    }
                }
            }
        }
        match learned.error.take() {
            Some(error) => Err(error),
            None if nothing_prepared && answer == Answer::Acknowledged => Ok(Answer::NothingPrepared),
            None => Ok(answer),
        }
    }

    /// The NO vote, with the reason the executors learned or the history keeps.
    fn no_vote(&self, gid: &Gid, learned: Option<(String, String)>) -> Vote {
        let (sqlstate, message) = learned.unwrap_or_else(|| {
            let why = self
                .branches
                .finished(gid.as_str())
                .map_or_else(|| "was rolled back".to_owned(), |finished| finished.describe());
            (String::new(), format!("branch {gid} {why}"))
        });
        Vote::No { sqlstate, message }
    }

    async fn check_writes(
        &self,
        active: &mut Option<ActiveBranch>,
        gid: &Gid,
        learned: &mut Learned,
    ) -> ParticipantEvent {
        let Some(branch) = active.as_mut() else {
            learned.no_vote = Some((String::new(), format!("branch {gid} has no open transaction")));
            return ParticipantEvent::BranchPrepareFailed;
        };
        // A branch known to have written, or whose vote already went with its last statement,
        // skips the round trip that asks PostgreSQL.
        if branch.wrote || branch.vote_sent.is_some() {
            return ParticipantEvent::BranchWrote;
        }
        match postgres::wrote_nothing(&branch.connection).await {
            Ok(true) => ParticipantEvent::BranchWroteNothing,
            Ok(false) => ParticipantEvent::BranchWrote,
            Err(error) => {
                self.vote_failed(active, gid, error, learned);
                ParticipantEvent::BranchPrepareFailed
            }
        }
    }

    /// The marker row and `PREPARE TRANSACTION` (one round trip); also the three-phase vote's.
    pub(super) async fn prepare_branch(
        &self,
        active: &mut Option<ActiveBranch>,
        gid: &Gid,
        learned: &mut Learned,
    ) -> ParticipantEvent {
        if active.is_none() {
            learned.no_vote = Some((String::new(), format!("branch {gid} has no open transaction")));
            return ParticipantEvent::BranchPrepareFailed;
        }
        if let Err(error) = failpoints::step(failpoints::BEFORE_PREPARE) {
            // As a PREPARE that failed: the branch is rolled back.
            learned.abort_reason = Some(error.to_string());
            learned.error = Some(error);
            return ParticipantEvent::BranchPrepareFailed;
        }
        let Some(mut branch) = active.take() else {
            return ParticipantEvent::BranchPrepareFailed;
        };
        let prepared = match branch.vote_sent.take() {
            // Sent with the last statement (`Agent::execute_and_prepare`): PostgreSQL's answer.
            Some(sent) => sent.map_err(|failed| failed.error),
            None => {
                postgres::insert_marker_and_prepare(
                    &mut branch.connection,
                    gid,
                    &self.branch_gid(gid),
                    branch.database_role.as_ref(),
                )
                .await
            }
        };
        match prepared {
            Ok(session) => {
                let after = failpoints::step(failpoints::AFTER_PREPARE);
                branch.transaction_ended(gid, session);
                self.branches.record(gid.as_str(), Finished::Prepared);
                // On an error the branch stays prepared: the coordinator counts the failed call
                // as a NO and its abort (or recovery) rolls the branch back.
                learned.error = after.err();
                ParticipantEvent::BranchPrepared
            }
            Err(error) => {
                *active = Some(branch);
                self.vote_failed(active, gid, error, learned);
                ParticipantEvent::BranchPrepareFailed
            }
        }
    }

    /// Notes why a vote step failed. A broken connection is closed here: if PREPARE itself went
    /// through, the branch stays prepared until the coordinator's abort (or reconciliation) rolls
    /// it back. Any other failure leaves the open transaction for the rollback that follows.
    pub(super) fn vote_failed(
        &self,
        active: &mut Option<ActiveBranch>,
        gid: &Gid,
        error: DbError,
        learned: &mut Learned,
    ) {
        let (sqlstate, message) = match error {
            DbError::Sql { sqlstate, message } => (sqlstate, message),
            DbError::Connection(message) => {
                if let Some(branch) = active.take() {
                    branch.discard();
                }
                (
                    CONNECTION_FAILURE.to_owned(),
                    format!("the connection to PostgreSQL broke while preparing: {message}"),
                )
            }
            DbError::Client(message) => (String::new(), message),
        };
        tracing::warn!(%gid, %sqlstate, %message, "voting NO");
        learned.abort_reason = Some(format!("voted NO: {message}"));
        learned.no_vote = Some((sqlstate, message));
    }

    /// A plain COMMIT: the one-phase commit of the only participant, or a read-only branch's.
    async fn commit_locally(
        &self,
        active: &mut Option<ActiveBranch>,
        gid: &Gid,
        phase: ParticipantPhase,
        learned: &mut Learned,
    ) -> ParticipantEvent {
        let one_phase = phase == ParticipantPhase::CommittingOnePhase;
        let Some(mut branch) = active.take() else {
            learned.no_vote = Some((String::new(), format!("branch {gid} has no open transaction")));
            return ParticipantEvent::LocalCommitFailed;
        };
        let committed = match (learned.decision.as_mut(), branch.commit_sent.take()) {
            (Some(decision), _) if one_phase => decision.insert_and_commit(&mut branch, gid).await,
            // Sent with the last statement (`Agent::execute_and_commit`): PostgreSQL's answer.
            (None, Some(sent)) if one_phase => sent.map_err(|failed| failed.error),
            _ => postgres::commit(&mut branch.connection).await,
        };
        match committed {
            Ok(session) => {
                branch.transaction_ended(gid, session);
                let finished = if one_phase {
                    Finished::CommittedOnePhase
                } else {
                    Finished::ReadOnly
                };
                self.branches.record(gid.as_str(), finished);
                ParticipantEvent::LocalCommitSucceeded
            }
            Err(DbError::Connection(message)) if one_phase => {
                branch.discard();
                tracing::error!(%gid, %message, "connection broke during a one-phase COMMIT; outcome unknown");
                learned.error = Some(BranchError::Unavailable(format!(
                    "the connection to PostgreSQL broke during COMMIT of {gid}; whether it committed is \
                     unknown: {message}"
                )));
                self.branches
                    .record(gid.as_str(), Finished::OutcomeUnknown(message));
                ParticipantEvent::LocalCommitOutcomeUnknown
            }
            Err(error) if one_phase => {
                // A failed COMMIT (deferred constraint, serialization failure) rolled back already;
                // the rollback that follows frees the connection cleanly.
                *active = Some(branch);
                tracing::info!(%gid, %error, "one-phase COMMIT failed; the transaction rolled back");
                learned.abort_reason = Some(format!("COMMIT failed: {error}"));
                // A decision branch whose row or COMMIT PostgreSQL refused answers that it did not
                // commit; the error is not the call's.
                let refused = learned.decision.as_ref().and_then(|d| d.not_committed());
                if refused.is_none() {
                    learned.error = Some(error.into());
                }
                ParticipantEvent::LocalCommitFailed
            }
            Err(error) => {
                *active = Some(branch);
                self.vote_failed(active, gid, error, learned);
                ParticipantEvent::LocalCommitFailed
            }
        }
    }

    /// `ApplyAbort`: a branch that never prepared (`phase` is where the machine stood) is rolled
    /// back on its connection; any other is finished with `ROLLBACK PREPARED`.
    async fn apply_abort(
        &self,
        active: &mut Option<ActiveBranch>,
        gid: &Gid,
        phase: ParticipantPhase,
        learned: &mut Learned,
    ) -> Result<(), BranchError> {
        let never_prepared = matches!(
            phase,
            ParticipantPhase::Working
                | ParticipantPhase::CommittingReadOnly
                | ParticipantPhase::CommittingOnePhase
        );
        if never_prepared {
            self.end_unprepared(active, gid, learned).await;
            return Ok(());
        }
        self.rollback_prepared(gid).await
    }

    /// Rolls back a branch that never prepared (if its connection is still there) and remembers
    /// why it ended.
    pub(super) async fn end_unprepared(
        &self,
        active: &mut Option<ActiveBranch>,
        gid: &Gid,
        learned: &mut Learned,
    ) {
        if let Some(branch) = active.take() {
            self.roll_back(branch, gid).await;
        }
        let reason = learned
            .abort_reason
            .take()
            .unwrap_or_else(|| "aborted before prepare".into());
        self.branches.record(gid.as_str(), Finished::Aborted(reason));
    }

    /// `COMMIT PREPARED`, never taking "does not exist" for success: the marker row says, or, for
    /// a GID that names a decision shard (no marker), the answer says nothing was prepared.
    async fn commit_prepared(&self, gid: &Gid) -> Result<Applied, BranchError> {
        failpoints::step(failpoints::BEFORE_COMMIT_PREPARED)?;
        match postgres::commit_prepared(&self.pool, &self.branch_gid(gid)).await {
            Ok(()) => {
                let after = failpoints::step(failpoints::AFTER_COMMIT_PREPARED);
                tracing::debug!(%gid, "committed");
                self.branches.record(gid.as_str(), Finished::Committed);
                after.map(|()| Applied::Committed)
            }
            Err(error) if error.is_undefined_object() && gid.decision_shard().is_some() => {
                // The coordinator takes "nothing prepared" as done and forgets the commit row; a
                // branch of the transaction prepared here under another shard's name (this
                // participant's `--shard` was renamed meanwhile) would then be presumed aborted.
                let branch = self.branch_gid(gid);
                if let Some(other) = postgres::prepared_under_another_name(&self.pool, &branch).await? {
                    tracing::error!(
                        %gid,
                        prepared = %other,
                        "asked to commit {branch}, but this database holds the transaction's branch \
                         prepared as {other}: the participant's --shard changed since it prepared"
                    );
                    return Err(BranchError::WrongState(format!(
                        "branch {branch} is not prepared, but {other} is: this participant serves \
                         shard {} and the branch was prepared under another shard name; restart it \
                         with its former --shard until that branch is finished, or commit it by hand \
                         (COMMIT PREPARED '{other}'): the transaction's decision is commit",
                        self.shard
                    )));
                }
                // Nothing is recorded: this participant does not know that the branch committed,
                // and a repeat asks PostgreSQL again.
                tracing::info!(
                    %gid,
                    "asked to commit a branch that is not prepared; its decision row is the authority"
                );
                Ok(Applied::NothingPrepared)
            }
            Err(error) if error.is_undefined_object() => {
                if postgres::marker_exists(&self.pool, gid).await? {
                    self.branches.record(gid.as_str(), Finished::Committed);
                    return Ok(Applied::Committed);
                }
                tracing::error!(
                    %gid,
                    "asked to commit a branch that is not prepared and has no marker row: it was rolled back \
                     or never prepared here"
                );
                self.branches.record(
                    gid.as_str(),
                    Finished::Aborted("found rolled back at commit".into()),
                );
                Err(BranchError::WrongState(format!(
                    "branch {gid} was rolled back, cannot commit"
                )))
            }
            Err(error) => Err(error.into()),
        }
    }

    /// `ROLLBACK PREPARED`; "does not exist" is an abort only without a marker row (a GID that
    /// names a decision shard has none to look up).
    async fn rollback_prepared(&self, gid: &Gid) -> Result<(), BranchError> {
        failpoints::step(failpoints::BEFORE_ROLLBACK_PREPARED)?;
        match postgres::rollback_prepared(&self.pool, &self.branch_gid(gid)).await {
            Ok(()) => {
                let after = failpoints::step(failpoints::AFTER_ROLLBACK_PREPARED);
                tracing::debug!(%gid, "rolled back a prepared branch");
                self.branches.record(
                    gid.as_str(),
                    Finished::Aborted("rolled back after prepare".into()),
                );
                after
            }
            Err(error) if error.is_undefined_object() => {
                if gid.decision_shard().is_none() && postgres::marker_exists(&self.pool, gid).await? {
                    tracing::error!(%gid, "asked to abort a branch that already committed");
                    self.branches.record(gid.as_str(), Finished::Committed);
                    return Err(BranchError::WrongState(format!(
                        "branch {gid} already committed, cannot abort"
                    )));
                }
                // Never prepared or already rolled back: aborted under presumed abort. Remembering
                // it refuses a late Execute or Prepare for the GID.
                if !matches!(self.branches.finished(gid.as_str()), Some(Finished::Aborted(_))) {
                    self.branches.record(
                        gid.as_str(),
                        Finished::Aborted("aborted by the coordinator".into()),
                    );
                }
                Ok(())
            }
            Err(error) => Err(error.into()),
        }
    }
}
