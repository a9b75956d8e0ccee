//! `Execute`: the first statement for a GID opens its branch (a pooled connection and `BEGIN`) and
//! gives it its machine; later ones run on the same connection, each pushing the machine's idle
//! timeout back. Any failure once the branch is open ends it: the machine abandons the branch, which
//! is rolled back and remembered as aborted.

use std::sync::Arc;
use std::time::Instant;

use treaty_commit_protocol::participant::ParticipantEvent;
use treaty_proto::Gid;

use super::{Agent, Vote};
use crate::branches::{ActiveBranch, Finished, SlotGuard};
use crate::error::BranchError;
use crate::pool::Taker;
use crate::pool::session::StatementFailed;
use crate::postgres::{self, BranchOptions, DbError};
use crate::sql_guard;
use crate::statement::{self, StatementError, StatementOutput};
use crate::values::Param;

impl Agent {
    pub async fn execute(
        &self,
        gid: &Gid,
        sql: &str,
        params: Vec<Param>,
        options: &BranchOptions,
    ) -> Result<StatementOutput, BranchError> {
        let mut slot = self.branches.lock(gid.as_str()).await;
        self.execute_locked(&mut slot, gid, sql, params, options, Then::Return)
            .await
    }

    /// `execute`, then the vote as `prepare` casts it, under one hold of the GID's lock (a one-shot
    /// submit's last statement on this shard). A failed statement fails the call as `execute` does.
    pub async fn execute_and_prepare(
        &self,
        gid: &Gid,
        sql: &str,
        params: Vec<Param>,
        options: &BranchOptions,
    ) -> Result<(StatementOutput, Vote), BranchError> {
        let mut slot = self.branches.lock(gid.as_str()).await;
        let output = self
            .execute_locked(&mut slot, gid, sql, params, options, Then::Vote)
            .await?;
        let vote = self.prepare_locked(&mut slot, gid).await?;
        Ok((output, vote))
    }

    /// `execute`, then a plain `COMMIT`, under one hold of the GID's lock (a one-shot submit on a
    /// single shard). Answers `None` when `expect_rows` is set and not met: the branch is rolled
    /// back and nothing is committed. A statement or COMMIT error fails the call, as `execute` and
    /// `commit_one_phase` do. Without `expect_rows` the COMMIT goes in the statement's round trip
    /// (`statement::run_then_commit`); with it, only after the count was seen.
    pub async fn execute_and_commit(
        &self,
        gid: &Gid,
        sql: &str,
        params: Vec<Param>,
        options: &BranchOptions,
        expect_rows: Option<u64>,
    ) -> Result<(StatementOutput, bool), BranchError> {
        let mut slot = self.branches.lock(gid.as_str()).await;
        let then = match expect_rows {
            None => Then::Commit,
            Some(_) => Then::Return,
        };
        let output = self
            .execute_locked(&mut slot, gid, sql, params, options, then)
            .await?;
        if let Some(expected) = expect_rows
            && output.rows_affected != expected
        {
            let reason = format!(
                "the statement affected {} rows, expected {expected}",
                output.rows_affected
            );
            self.abandon(&mut slot, gid, reason).await;
            return Ok((output, false));
        }
        self.commit_one_phase_locked(&mut slot, gid).await?;
        Ok((output, true))
    }

    async fn execute_locked(
        &self,
        slot: &mut SlotGuard,
        gid: &Gid,
        sql: &str,
        params: Vec<Param>,
        options: &BranchOptions,
        then: Then,
    ) -> Result<StatementOutput, BranchError> {
        let opening = slot.active.is_none();
        let analysis = sql_guard::check(sql, opening)?;
        if analysis.statements == 0 {
            return Err(BranchError::InvalidRequest(
                "sql holds no statement, only comments or semicolons".into(),
            ));
        }
        let batch = analysis.statements > 1;
        if batch && !params.is_empty() {
            return Err(BranchError::InvalidRequest(format!(
                "sql holds {} statements and {} parameters; parameters need a single statement, so \
                 send the statements in separate Execute calls",
                analysis.statements,
                params.len()
            )));
        }
        if opening {
            // A machine without an open branch is a prepared branch waiting for its decision
            // (its history may already be forgotten): no second transaction under its GID.
            if let Some(machine) = &slot.machine {
                return Err(BranchError::WrongState(format!(
                    "branch {gid} on shard {} is {:?}; it cannot run more statements",
                    self.shard,
                    machine.phase()
                )));
            }
            self.check_can_open(gid, options.continues)?;
            slot.active = Some(self.open(options).await?);
            slot.machine = Some(self.new_machine());
        }
        // A call its caller can drop (`cancel`): register the backend running the statement so
        // that the caller's going away cancels it there.
        let cancellable = crate::cancel::CURRENT.try_with(Arc::clone).ok();
        if let (Some(cancellable), Some(branch)) = (&cancellable, slot.active.as_ref())
            && !cancellable.start(branch.connection.backend_pid())
        {
            let reason = "the caller cancelled its call (deadline or disconnect) before the statement ran; \
                          the branch was rolled back and the transaction aborts";
            self.abandon(slot, gid, reason.into()).await;
            return Err(BranchError::Lost(reason.into()));
        }
        let Some(branch) = slot.active.as_mut() else {
            return Err(BranchError::Internal(format!(
                "branch {gid} vanished while locked"
            )));
        };
        let begin = branch.pending_begin.take();
        // The vote (marker row, PREPARE TRANSACTION) goes in the statement's round trip when the
        // caller votes right after it: not for a batch, whose statements are not all sent first,
        // nor while a failpoint of the vote is armed, so that each still fires at its step.
        let vote_sql = if then == Then::Vote && !batch && !self.vote_failpoint_armed() {
            postgres::prepare_sql(gid, &self.branch_gid(gid), branch.database_role.as_ref()).ok()
        } else {
            None
        };
        let mut sent_vote = None;
        let mut sent_commit = None;
        let mut ran = match &vote_sql {
            _ if then == Then::Commit && !batch => {
                let clean = branch.connection.clean_session();
                let (ran, committed) = statement::run_then_commit(
                    &branch.connection,
                    begin.as_deref(),
                    sql,
                    &params,
                    clean.as_deref(),
                )
                .await;
                sent_commit = committed;
                ran
            }
            Some((end, statements)) => {
                let clean = branch.connection.clean_session();
                let (ran, voted) = statement::run_then_end(
                    &branch.connection,
                    begin.as_deref(),
                    sql,
                    &params,
                    end,
                    *statements,
                    clean.as_deref(),
                )
                .await;
                sent_vote = voted;
                ran
            }
            None => statement::run(&branch.connection, begin.as_deref(), sql, &params, batch).await,
        };
        // A pooled connection that died (PostgreSQL restarted) is found by the opening statement:
        // it ran in no transaction that could commit (its BEGIN went with it), so it is run again
        // on a fresh connection, each dead one closed as it is found. Not once a COMMIT went with
        // it: whether that COMMIT ran is unknown, and the call says so (`BranchError::Unavailable`).
        // Nor once the vote went with it: PostgreSQL may have prepared the branch before the
        // connection broke, and a second run would wait on that prepared branch's locks (holding
        // this GID's slot, which the Abort that rolls it back needs) or vote on effects other than
        // the prepared ones; the call fails, the transaction aborts, and the abort rolls back
        // whatever was prepared.
        let mut tried = 1;
        while let (
            Some(begin),
            Err(StatementError::Begin(DbError::Connection(_)) | StatementError::Db(DbError::Connection(_))),
        ) = (&begin, &ran)
        {
            if tried > self.pool.max_connections() || sent_commit.is_some() || sent_vote.is_some() {
                break;
            }
            tried += 1;
            // Nothing of the first try reached PostgreSQL (`sent_vote` is None): the retry votes
            // the usual way, after the statement.
            let fresh = match self
                .pool
                .acquire_for(Taker::Branch(options.database_role.as_ref()))
                .await
            {
                Ok(connection) => ActiveBranch::new(connection),
                Err(error) => {
                    ran = Err(StatementError::Db(error));
                    break;
                }
            };
            if let Some(dead) = slot.active.replace(fresh) {
                dead.discard();
            }
            let Some(branch) = slot.active.as_mut() else {
                break;
            };
            branch.database_role = options.database_role.clone();
            ran = statement::run(&branch.connection, Some(begin), sql, &params, batch).await;
        }
        let Some(branch) = slot.active.as_mut() else {
            return Err(BranchError::Internal(format!(
                "branch {gid} vanished while locked"
            )));
        };
        if let Some(cancellable) = &cancellable {
            cancellable.end().await;
        }
        // Kept on the branch either way: a statement that failed on this side (its rows could
        // not be decoded) after PostgreSQL ran it and prepared the branch is rolled back as
        // prepared when the failure abandons it below (`Agent::roll_back`): nothing may stay
        // prepared for a call that failed.
        branch.vote_sent = sent_vote;
        branch.commit_sent = sent_commit;
        match ran {
            Ok(output) => {
                branch.last_used = Instant::now();
                branch.statements += 1;
                branch.session_changed |= analysis.changes_session;
                branch.wrote |= analysis.single_write && output.rows_affected > 0;
                if let Some(machine) = slot.machine.as_mut() {
                    // No action comes back (and nothing is allocated): only the timeout moves.
                    machine.step(ParticipantEvent::StatementRan, self.clock_ms());
                }
                Ok(output)
            }
            Err(
                StatementError::Db(error @ DbError::Connection(_))
                | StatementError::Begin(error @ DbError::Connection(_)),
            ) if branch.commit_sent.is_some() => {
                // The COMMIT went with the statement on the connection that broke: whether it
                // ran is unknown, which the one-phase commit that follows reports (the branch is
                // remembered as of unknown outcome, not as rolled back).
                branch.commit_sent = Some(Err(StatementFailed { index: 0, error }));
                Ok(StatementOutput::default())
            }
            Err(error) => {
                // The statement may have taken a session-level advisory lock (or changed a
                // setting) before it failed: a lock outlives the rollback.
                branch.session_changed |= analysis.changes_session;
                let error = match error {
                    StatementError::Begin(error @ DbError::Sql { .. }) => self.begin_failed(options, error),
                    other => BranchError::from(other),
                };
                if matches!(error, BranchError::Unavailable(_))
                    && let Some(branch) = slot.active.take()
                {
                    // The connection's state is unknown: closed, not rolled back on it.
                    branch.discard();
                }
                tracing::info!(%gid, %error, "statement failed; branch rolled back");
                self.abandon(slot, gid, format!("a statement failed: {error}"))
                    .await;
                Err(error)
            }
        }
    }

    /// Whether a failpoint of the vote is armed (never, in a build without failpoints).
    fn vote_failpoint_armed(&self) -> bool {
        crate::failpoints::is_armed(crate::failpoints::BEFORE_PREPARE)
            || crate::failpoints::is_armed(crate::failpoints::AFTER_PREPARE)
    }

    /// Refuses to open a branch for a GID that already ended here, or whose transaction may have
    /// had a branch in a previous process (see `Admission`) or belongs to a coordinator run that
    /// ended (`Agent::end_run`).
    fn check_can_open(&self, gid: &Gid, continues: bool) -> Result<(), BranchError> {
        if let Some(finished) = self.branches.finished(gid.as_str()) {
            return Err(BranchError::WrongState(format!(
                "branch {gid} on shard {} {}; it cannot run more statements",
                self.shard,
                finished.describe()
            )));
        }
        // The coordinator ran statements of this branch here, and none is open: they were lost
        // with a previous participant process (PostgreSQL rolled the branch back when its
        // connection closed). A new branch would commit the rest without them.
        let lost = if continues {
            Some(format!(
                "transaction {gid} ran statements on shard {} that this participant no longer has \
                 (it restarted, and PostgreSQL rolled them back); it cannot continue here; run the \
                 transaction again",
                self.shard
            ))
        } else {
            self.admitted_from(gid.coordinator())
                .filter(|first_txid| gid.txid() < *first_txid)
                .map(|first_txid| {
                    format!(
                        "transaction {} began before this participant started or in an earlier run of \
                         its coordinator (txids below {first_txid} may not open branches here); \
                         statements it ran on shard {} earlier were lost with the previous process, so \
                         it cannot continue here; run the transaction again",
                        gid.txid(),
                        self.shard
                    )
                })
        };
        if let Some(reason) = lost {
            self.branches
                .record(gid.as_str(), Finished::Aborted(reason.clone()));
            return Err(BranchError::Lost(reason));
        }
        Ok(())
    }

    /// Takes a pooled connection for the branch; its BEGIN goes with the first statement
    /// (`statement::run`).
    async fn open(&self, options: &BranchOptions) -> Result<ActiveBranch, BranchError> {
        let connection = self
            .pool
            .acquire_for(Taker::Branch(options.database_role.as_ref()))
            .await
            .map_err(|error| BranchError::Unavailable(format!("opening the branch: {error}")))?;
        let mut branch = ActiveBranch::new(connection);
        branch.database_role = options.database_role.clone();
        branch.pending_begin = Some(postgres::begin_sql(options, &self.pool.session_defaults()));
        Ok(branch)
    }

    /// Why a branch could not open. `SET LOCAL ROLE` refused (42501: the participant's login role
    /// is not a member of the client's role; 22023: no such role) is a configuration error,
    /// explained as one.
    fn begin_failed(&self, options: &BranchOptions, error: DbError) -> BranchError {
        let Some(role) = &options.database_role else {
            return error.into();
        };
        match error {
            DbError::Sql { sqlstate, message } if sqlstate == "42501" || sqlstate == "22023" => {
                tracing::warn!(%role, %sqlstate, %message, "cannot run a branch under the client's database role");
                DbError::Sql {
                    sqlstate,
                    message: format!(
                        "{message}: the client's statements run under database role {role} (its \
                         database_role), so the role must exist on shard {} and the participant's \
                         login role must be a member of it (GRANT {} TO <participant's role>)",
                        self.shard,
                        role.quoted()
                    ),
                }
                .into()
            }
            other => other.into(),
        }
    }
}

/// What follows a statement in the same call, and so may go in its round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    /// Nothing: the call answers the statement.
    Return,
    /// The vote (`execute_and_prepare`).
    Vote,
    /// A one-phase COMMIT (`execute_and_commit` without `expect_rows`).
    Commit,
}
