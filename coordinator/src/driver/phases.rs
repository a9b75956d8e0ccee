//! Carrying out the machine's actions: the votes (`SendPrepare`), the one-phase commit (plain or
//! with a submit's last statement), the durable write of a decision (`PersistCommit`, 3PC
//! `PersistPreCommit`, the lazy end record), phase two, and the 3PC pre-commits and state queries.
//! Every call's result goes back to the machine through a rule of the core
//! (`treaty_commit_protocol::answers`).
//!
//! No failpoint sits here: a fault-injection build wraps the store and the transport in the
//! decorators of `crate::faults`.

use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument as _;
use treaty_commit_protocol::answers;
use treaty_commit_protocol::store::{CommitRecord, DecisionStore, PreCommitRecord};
use treaty_commit_protocol::transport::{ParticipantTransport, VoteRequest};
use treaty_proto::ShardName;

use super::table::{Fused, TxnHandle};
use super::{Engine, PHASE_TWO_TIMEOUT_MS};
use crate::protocol::termination::Ballot;
use crate::protocol::{AbortCause, AbortReason, Event};

/// A record `force` writes to the store before the machine may go on.
enum Forced {
    Commit(CommitRecord),
    PreCommit(PreCommitRecord),
}

impl<S: DecisionStore, T: ParticipantTransport> Engine<S, T> {
    /// Sends PREPARE in parallel to every listed shard; each vote comes back as `VoteReceived`.
    pub(super) fn send_prepare(self: &Arc<Self>, handle: &Arc<TxnHandle>, shards: Vec<ShardName>) {
        let (protocol, all) = {
            let machine = handle.machine();
            let all: Vec<ShardName> = machine.branches().iter().map(|b| b.shard.clone()).collect();
            (machine.protocol(), all)
        };
        let request = VoteRequest {
            protocol,
            participants: all,
        };
        for shard in shards {
            let span = phase_span!(handle, "prepare", shard);
            let (engine, handle, request) = (Arc::clone(self), Arc::clone(handle), request.clone());
            tokio::spawn(
                async move {
                    let timeout_ms = engine.default_timeouts.vote_ms;
                    let answer = engine
                        .transport
                        .prepare(&shard, handle.gid(), request, timeout_ms)
                        .await;
                    let vote = answers::vote(&shard, answer, protocol);
                    engine.feed_result(&handle, Event::VoteReceived { shard, vote });
                }
                .instrument(span),
            );
        }
    }

    pub(super) fn commit_one_phase(self: &Arc<Self>, handle: &Arc<TxnHandle>, shard: ShardName) {
        let span = phase_span!(handle, "commit_one_phase", shard);
        let (engine, handle) = (Arc::clone(self), Arc::clone(handle));
        tokio::spawn(
            async move {
                let result = engine
                    .transport
                    .commit_one_phase(&shard, handle.gid(), PHASE_TWO_TIMEOUT_MS)
                    .await;
                engine.feed_result(&handle, answers::one_phase(&shard, result));
            }
            .instrument(span),
        );
    }

    /// The submit's last statement with the branch's COMMIT. Its answer is kept for the submit
    /// before the event is fed, since the event's `Reply` wakes the submit that reads it.
    pub(super) fn execute_and_commit(self: &Arc<Self>, handle: &Arc<TxnHandle>, shard: ShardName) {
        let fused = std::mem::take(&mut *handle.fused());
        let Fused::Pending {
            statement,
            expect_rows,
            op,
            timeout_ms,
        } = fused
        else {
            let reason = AbortReason::new(
                AbortCause::StatementFailed,
                "the last statement to send with the COMMIT was not kept (a bug); nothing was sent",
            )
            .on_shard(&shard);
            self.feed_result(handle, Event::OnePhaseFailed { reason });
            return;
        };
        let span = phase_span!(handle, "execute_and_commit", shard);
        let (engine, handle) = (Arc::clone(self), Arc::clone(handle));
        tokio::spawn(
            async move {
                let result = engine
                    .transport
                    .execute_and_commit(&shard, statement, expect_rows, timeout_ms)
                    .await;
                let event = answers::executed_and_committed(&shard, op, expect_rows, &result);
                *handle.fused() = Fused::Ran(result);
                engine.feed_result(&handle, event);
            }
            .instrument(span),
        );
    }

    pub(super) fn send_phase_two(
        self: &Arc<Self>,
        handle: &Arc<TxnHandle>,
        shard: ShardName,
        delay_ms: u64,
        commit: bool,
    ) {
        let span = if commit {
            phase_span!(handle, "commit", shard)
        } else {
            phase_span!(handle, "abort", shard)
        };
        let (engine, handle) = (Arc::clone(self), Arc::clone(handle));
        tokio::spawn(
            async move {
                if delay_ms > 0 {
                    // Only a message sent again waits first (its backoff).
                    crate::metrics::global().phase_two_retry();
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                }
                let event = engine.finish(&handle, &shard, commit).await;
                engine.feed_result(&handle, event);
            }
            .instrument(span),
        );
    }

    /// One COMMIT PREPARED (or abort) and the event its result feeds.
    async fn finish(&self, handle: &TxnHandle, shard: &ShardName, commit: bool) -> Event {
        let result = if commit {
            self.transport
                .commit(shard, handle.gid(), PHASE_TWO_TIMEOUT_MS)
                .await
        } else {
            self.transport
                .abort(shard, handle.gid(), PHASE_TWO_TIMEOUT_MS)
                .await
        };
        if let Err(error) = &result
            && answers::contradicts_decision(error)
        {
            // The participant's own records contradict the decision: this must never happen.
            // Keep retrying (visible in GetTransaction) and say so loudly.
            tracing::error!(%shard, gid = %handle.gid(), commit, %error, "participant contradicts the decision");
        }
        answers::phase_two(shard, result)
    }

    /// 3PC: forces the pre-commit record, then feeds `PreCommitDurable`; no PreCommit leaves
    /// before it is durable.
    pub(super) fn persist_pre_commit(
        self: &Arc<Self>,
        handle: &Arc<TxnHandle>,
        participants: Vec<ShardName>,
    ) {
        let record = PreCommitRecord {
            txid: handle.gid().txid(),
            gid: handle.gid().to_string(),
            participants: participants.iter().map(ToString::to_string).collect(),
            at_ms: self.now_ms(),
        };
        self.force(handle, Forced::PreCommit(record));
    }

    /// 3PC: one PreCommit after `delay_ms`; its answer comes back as `PreCommitAcknowledged` or
    /// `PhaseTwoFailed` (which the machine retries with backoff until it learns states instead).
    pub(super) fn send_pre_commit(
        self: &Arc<Self>,
        handle: &Arc<TxnHandle>,
        shard: ShardName,
        ballot: Ballot,
        delay_ms: u64,
    ) {
        let span = phase_span!(handle, "pre_commit", shard);
        let (engine, handle) = (Arc::clone(self), Arc::clone(handle));
        tokio::spawn(
            async move {
                if delay_ms > 0 {
                    // Only a message sent again waits first (its backoff).
                    crate::metrics::global().phase_two_retry();
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                }
                let event = engine.pre_commit(&handle, &shard, &ballot).await;
                engine.feed_result(&handle, event);
            }
            .instrument(span),
        );
    }

    async fn pre_commit(&self, handle: &TxnHandle, shard: &ShardName, ballot: &Ballot) -> Event {
        let result = self
            .transport
            .pre_commit(shard, handle.gid(), ballot, PHASE_TWO_TIMEOUT_MS)
            .await;
        answers::pre_commit(shard, ballot, result)
    }

    /// 3PC: asks every shard for its state under `ballot`, in parallel; each answer is fed on its
    /// own as it comes. An unanswered shard is simply missing: the machine decides only with every
    /// state and asks again, under a new ballot, on its next deadline.
    pub(super) fn query_participant_states(
        self: &Arc<Self>,
        handle: &Arc<TxnHandle>,
        shards: Vec<ShardName>,
        ballot: Ballot,
    ) {
        // An answer later than the machine's next round would be for a ballot it has left.
        let timeout_ms = self.default_timeouts.vote_ms;
        let all = Arc::new(shards.clone());
        for shard in shards {
            let span = phase_span!(handle, "query_state", shard);
            let (engine, handle) = (Arc::clone(self), Arc::clone(handle));
            let (ballot, all) = (ballot.clone(), Arc::clone(&all));
            tokio::spawn(
                async move {
                    let result = engine
                        .transport
                        .query_state(&shard, handle.gid(), &ballot, &all, timeout_ms)
                        .await;
                    if let Err(error) = &result {
                        tracing::debug!(%shard, gid = %handle.gid(), "QueryState failed: {error}");
                    }
                    if let Some(report) = answers::state_report(result) {
                        let event = Event::ParticipantStatesLearned {
                            ballot,
                            reports: vec![(shard, report)],
                        };
                        engine.feed_result(&handle, event);
                    }
                }
                .instrument(span),
            );
        }
    }

    /// The lazy end record.
    pub(super) fn persist_end(&self, handle: &Arc<TxnHandle>) {
        match handle.gid().decision_shard() {
            Some(shard) => self.forget_decision(shard, handle.gid()),
            None => self.store.end(handle.gid().txid()),
        }
    }

    pub(super) fn persist_commit(self: &Arc<Self>, handle: &Arc<TxnHandle>, participants: Vec<ShardName>) {
        let record = CommitRecord {
            txid: handle.gid().txid(),
            gid: handle.gid().to_string(),
            participants: participants.iter().map(ToString::to_string).collect(),
            decided_at_ms: self.now_ms(),
        };
        self.force(handle, Forced::Commit(record));
    }

    /// Forces one record to the store on a task of its own (group-committed with whatever else is
    /// waiting), then feeds the event saying it is durable. A store that cannot write stops the
    /// coordinator: a restart recovers from what is durable.
    fn force(self: &Arc<Self>, handle: &Arc<TxnHandle>, record: Forced) {
        let span = match record {
            Forced::Commit(_) => phase_span!(handle, "decision_durable"),
            Forced::PreCommit(_) => phase_span!(handle, "pre_commit_durable"),
        };
        let (engine, handle) = (Arc::clone(self), Arc::clone(handle));
        tokio::spawn(
            async move {
                let (written, durable) = match record {
                    Forced::Commit(record) => {
                        (engine.store.force_commit(record).await, Event::DecisionDurable)
                    }
                    Forced::PreCommit(record) => (
                        engine.store.force_pre_commit(record).await,
                        Event::PreCommitDurable,
                    ),
                };
                if let Err(e) = written {
                    engine.store_failed(e);
                }
                engine.feed_result(&handle, durable);
            }
            .instrument(span),
        );
    }
}
