//! What clients ask of a transaction: begin (with txid allocation), statements, a branch's last
//! statement with its vote or with its COMMIT (one-shot submits), commit and rollback. Each feeds
//! the machine and carries out the call it allows; the machine decides.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::oneshot;
use tracing::Instrument as _;
use treaty_commit_protocol::answers;
use treaty_commit_protocol::store::DecisionStore;
use treaty_commit_protocol::transport::{ParticipantTransport, Statement, StatementResult, VoteRequest};
use treaty_proto::{ApiError, Gid, ShardName, TxId, Value};

use super::table::{Fused, TxnHandle};
use super::{Engine, PHASE_TWO_TIMEOUT_MS, TXID_BLOCK, TxnOptions, api_error, refused};
use crate::protocol::{AbortCause, AbortReason, Event, Outcome, Protocol, Transaction};

/// A begin in progress, counted in `Engine::beginning` until dropped.
struct Beginning<'a>(&'a AtomicU64);

impl<'a> Beginning<'a> {
    fn enter(count: &'a AtomicU64) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Beginning(count)
    }
}

impl Drop for Beginning<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A statement in flight on a participant. If the call running it is dropped first (the client's
/// deadline passed or it disconnected: tonic drops the handler's future), the participant call is
/// dropped with it, which resets its HTTP/2 stream so the participant cancels the statement in
/// PostgreSQL; this guard then aborts the transaction, since its branch is rolled back.
struct AbortIfDropped<S: DecisionStore, T: ParticipantTransport> {
    engine: Arc<Engine<S, T>>,
    handle: Arc<TxnHandle>,
    shard: ShardName,
    armed: bool,
}

impl<S: DecisionStore, T: ParticipantTransport> Drop for AbortIfDropped<S, T> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let reason = AbortReason::new(
            AbortCause::StatementFailed,
            format!(
                "the client cancelled its call (deadline or disconnect) while a statement ran on \
                 shard {}; the statement was cancelled and the transaction aborted",
                self.shard
            ),
        )
        .on_shard(&self.shard);
        self.engine.feed_result(
            &self.handle,
            Event::ExecuteFailed {
                shard: self.shard.clone(),
                reason,
            },
        );
    }
}

impl<S: DecisionStore, T: ParticipantTransport> Engine<S, T> {
    async fn allocate_txid(&self) -> Result<TxId, ApiError> {
        // SeqCst, not Relaxed: `open_from` relies on this taking place after the begin counted
        // itself in `beginning` (a relaxed store could be seen before that earlier one).
        let txid = self.next_txid.fetch_add(1, Ordering::SeqCst);
        if txid <= self.reserved_up_to.load(Ordering::Acquire) {
            return Ok(txid);
        }
        let _guard = self.reserve_lock.lock().await;
        let reserved = self.reserved_up_to.load(Ordering::Acquire);
        if txid > reserved {
            let up_to = txid.max(reserved) + TXID_BLOCK;
            self.store
                .reserve_txids(up_to)
                .await
                .map_err(|e| self.store_failed(e))?;
            self.reserved_up_to.store(up_to, Ordering::Release);
        }
        Ok(txid)
    }

    pub async fn begin(&self, options: TxnOptions) -> Result<TxId, ApiError> {
        // Counted from before the txid is taken until it is registered (see `open_from`).
        let _beginning = Beginning::enter(&self.beginning);
        let txid = self.allocate_txid().await?;
        let timeouts = options.timeouts.unwrap_or(self.default_timeouts);
        let protocol = options.protocol.unwrap_or(self.default_protocol);
        let mut machine = Transaction::begin(txid, protocol, timeouts, self.now_ms());
        if self.decide_in_branch {
            machine.set_decision_in_branch();
        }
        self.register_limited(
            Gid::new(&self.id, txid),
            options.label,
            options.branch,
            machine,
            options.slot,
            options.max_statements,
        );
        crate::metrics::global().begun(protocol);
        Ok(txid)
    }

    pub async fn execute(
        self: &Arc<Self>,
        txid: TxId,
        shard: &str,
        sql: String,
        params: Vec<Value>,
    ) -> Result<StatementResult, ApiError> {
        self.run_statement(txid, shard, sql, params, None).await
    }

    /// `execute` for a branch's last statement when the caller will commit right after (one-shot
    /// submits over several shards): the participant votes in the same call, and the machine keeps
    /// the vote (`Event::VoteCastEarly`) to count when it prepares, in place of a Prepare message.
    /// `participants`: every shard of the transaction, which a three-phase vote names. A transport
    /// that does not take votes with statements gets a Prepare message instead.
    pub async fn execute_and_prepare(
        self: &Arc<Self>,
        txid: TxId,
        shard: &str,
        sql: String,
        params: Vec<Value>,
        participants: &[ShardName],
    ) -> Result<StatementResult, ApiError> {
        let fuse = self.transport.votes_with_last_statement();
        self.run_statement(txid, shard, sql, params, fuse.then_some(participants))
            .await
    }

    /// `execute` for what the client marked as the shard's last statement (`ExecuteRequest.last`):
    /// where the machine lets that statement carry the branch's vote (`may_vote_early`), the
    /// participant votes in the same call, as a submit's branches do, and the commit asks only the
    /// others; elsewhere the statement runs as `execute` runs it.
    pub async fn execute_last(
        self: &Arc<Self>,
        txid: TxId,
        shard: &str,
        sql: String,
        params: Vec<Value>,
    ) -> Result<StatementResult, ApiError> {
        let votes = self.handle(txid)?.machine().may_vote_early(&self.shard(shard)?);
        if votes {
            self.execute_and_prepare(txid, shard, sql, params, &[]).await
        } else {
            self.execute(txid, shard, sql, params).await
        }
    }

    /// Enlists `shard` in the transaction for a statement: the shard, the transaction, and the
    /// milliseconds left before its next deadline (the statement's time budget).
    fn enlist(
        self: &Arc<Self>,
        txid: TxId,
        shard: &str,
    ) -> Result<(ShardName, Arc<TxnHandle>, u64), ApiError> {
        let shard = self.shard(shard)?;
        let handle = self.handle(txid)?;
        handle.count_statement()?;
        self.feed(&handle, Event::Enlist { shard: shard.clone() })
            .map_err(refused)?;
        let decision_shard = handle.machine().decision_shard().cloned();
        if let Some(decision_shard) = decision_shard {
            // Before any participant hears the GID: every branch names where the decision is.
            handle
                .fix_decision_shard(&decision_shard)
                .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        }
        let now = self.now_ms();
        let remaining = handle
            .machine()
            .next_deadline_ms()
            .map_or(0, |d| d.saturating_sub(now));
        Ok((shard, handle, remaining.max(1)))
    }

    async fn run_statement(
        self: &Arc<Self>,
        txid: TxId,
        shard: &str,
        sql: String,
        params: Vec<Value>,
        prepare_with: Option<&[ShardName]>,
    ) -> Result<StatementResult, ApiError> {
        let (shard, handle, timeout_ms) = self.enlist(txid, shard)?;
        let statement = Statement {
            gid: handle.gid().clone(),
            sql,
            params,
            options: handle.branch_options.clone(),
            continues: handle.ran_on(&shard),
        };
        let span = match prepare_with {
            Some(_) => phase_span!(handle, "execute_and_prepare", shard),
            None => phase_span!(handle, "execute", shard),
        };
        let mut cancelled = AbortIfDropped {
            engine: Arc::clone(self),
            handle: Arc::clone(&handle),
            shard: shard.clone(),
            armed: true,
        };
        let result = match prepare_with {
            Some(participants) => {
                let protocol = handle.machine().protocol();
                let named = match protocol {
                    Protocol::ThreePhase => participants.to_vec(),
                    Protocol::TwoPhase => Vec::new(),
                };
                let request = VoteRequest {
                    protocol,
                    participants: named.clone(),
                };
                match self
                    .transport
                    .execute_and_prepare(&shard, statement, request, timeout_ms)
                    .instrument(span)
                    .await
                {
                    Ok(answer) => {
                        let vote = answers::early_vote(&shard, &answer, protocol);
                        self.feed_result(
                            &handle,
                            Event::VoteCastEarly {
                                shard: shard.clone(),
                                vote,
                                named,
                            },
                        );
                        Ok(answer.result)
                    }
                    Err(error) => Err(error),
                }
            }
            None => {
                self.transport
                    .execute(&shard, statement, timeout_ms)
                    .instrument(span)
                    .await
            }
        };
        cancelled.armed = false;
        match result {
            Ok(result) => {
                handle.note_ran_on(&shard);
                self.feed_result(&handle, Event::ExecuteSucceeded { shard });
                Ok(result)
            }
            Err(error) => {
                let reason = answers::execute_failed(&shard, &error);
                self.feed_result(
                    &handle,
                    Event::ExecuteFailed {
                        shard: shard.clone(),
                        reason,
                    },
                );
                Err(api_error(&shard, error))
            }
        }
    }

    /// A single-shard transaction's last statement and its commit in one participant call
    /// (`ExecuteAndCommit`; one-shot submits on one shard). The machine decides when it runs
    /// (`Action::ExecuteAndCommitOnePhase`, only once the transaction is committing), so no timeout
    /// or rollback can abort it under a COMMIT already sent. Answers the outcome and, when the
    /// statement ran, its result; `expect_rows` is checked by the participant before COMMIT.
    #[allow(clippy::too_many_arguments)]
    pub async fn commit_with_statement(
        self: &Arc<Self>,
        txid: TxId,
        shard: &str,
        sql: String,
        params: Vec<Value>,
        expect_rows: Option<u64>,
        op: usize,
        wait_for_apply: bool,
    ) -> Result<(Outcome, Option<StatementResult>), ApiError> {
        let (shard, handle, remaining) = self.enlist(txid, shard)?;
        *handle.fused() = Fused::Pending {
            statement: Statement {
                gid: handle.gid().clone(),
                sql,
                params,
                options: handle.branch_options.clone(),
                continues: handle.ran_on(&shard),
            },
            expect_rows,
            op,
            // The statement may use what is left of the transaction's time; the COMMIT gets the
            // time a one-phase commit gets.
            timeout_ms: remaining + PHASE_TWO_TIMEOUT_MS,
        };
        let outcome = self
            .request_outcome(
                &handle,
                Event::CommitWithLastStatement {
                    shard,
                    wait_for_apply,
                },
            )
            .await;
        let result = match std::mem::take(&mut *handle.fused()) {
            Fused::Ran(Ok(answer)) => Some(answer.result),
            Fused::Ran(Err(_)) | Fused::None | Fused::Pending { .. } => None,
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
            *handle.fused() = Fused::None;
            return Err(refused(e));
        }
        receiver.await.map_err(|_| {
            ApiError::Unavailable(format!(
                "transaction {} is still being decided by another request; ask GetTransaction for its outcome",
                handle.gid().txid()
            ))
        })
    }
}
