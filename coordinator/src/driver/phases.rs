//! Carrying out the machine's actions: the votes (`SendPrepare`), the one-phase commit (plain or
//! with a submit's last statement), the durable write of a decision (`PersistCommit`, 3PC
//! `PersistPreCommit`, the lazy end record), phase two, and the 3PC pre-commits and state queries.
//! Every call's result goes back to the machine through a rule of the core
//! (`treaty_commit_protocol::answers`).
//!
//! The coordinator's failpoints sit here, at the steps they name (docs/failpoints.md); without the
//! `failpoints` feature each is an inert check.

use std::sync::Arc;
use std::time::Duration;

use treaty_commit_protocol::answers;
use treaty_commit_protocol::store::{CommitRecord, DecisionStore, PreCommitRecord};
use treaty_commit_protocol::transport::{LinkError, ParticipantTransport, VoteRequest};
use treaty_proto::ShardName;

use super::table::{Fused, TxnHandle};
use super::{Engine, PHASE_TWO_TIMEOUT_MS};
pub(super) use crate::failpoints::Delivery;
use crate::failpoints::{self, Fired};
use crate::protocol::termination::Ballot;
use crate::protocol::{AbortCause, AbortReason, Event};

/// A record `force` writes to the store before the machine may go on.
enum Forced {
    Commit(CommitRecord),
    PreCommit(PreCommitRecord),
}

/// What a failpoint did to a message about to be sent: `Ok` to send it, or the failure the caller
/// sees (after waiting out the call's time, for a lost message).
async fn delivered(delivery: Delivery, timeout_ms: u64) -> Result<(), LinkError> {
    match delivery {
        Delivery::Send => Ok(()),
        Delivery::Fail(failpoint) => Err(LinkError::Unavailable(format!("failpoint {failpoint}"))),
        Delivery::Lose => {
            tokio::time::sleep(Duration::from_millis(timeout_ms)).await;
            Err(LinkError::TimedOut { after_ms: timeout_ms })
        }
    }
}

impl<S: DecisionStore, T: ParticipantTransport> Engine<S, T> {
    /// Sends PREPARE in parallel to every listed shard. With `after-some-prepares` armed, the
    /// first is sent (and answered) alone, the failpoint is evaluated, and only then are the others
    /// sent.
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
        if shards.len() > 1 && failpoints::armed(failpoints::AFTER_SOME_PREPARES) {
            let (engine, handle) = (Arc::clone(self), Arc::clone(handle));
            tokio::spawn(async move {
                let mut shards = shards.into_iter();
                if let Some(first) = shards.next() {
                    engine
                        .prepare_one(&handle, first, request.clone(), Delivery::Send)
                        .await;
                }
                let delivery = failpoints::delivery(failpoints::AFTER_SOME_PREPARES);
                for shard in shards {
                    engine.spawn_prepare(&handle, shard, request.clone(), delivery);
                }
            });
            return;
        }
        for shard in shards {
            self.spawn_prepare(handle, shard, request.clone(), Delivery::Send);
        }
    }

    fn spawn_prepare(
        self: &Arc<Self>,
        handle: &Arc<TxnHandle>,
        shard: ShardName,
        request: VoteRequest,
        delivery: Delivery,
    ) {
        let (engine, handle) = (Arc::clone(self), Arc::clone(handle));
        tokio::spawn(async move { engine.prepare_one(&handle, shard, request, delivery).await });
    }

    async fn prepare_one(
        self: &Arc<Self>,
        handle: &Arc<TxnHandle>,
        shard: ShardName,
        request: VoteRequest,
        delivery: Delivery,
    ) {
        let timeout_ms = self.default_timeouts.vote_ms;
        let protocol = request.protocol;
        let answer = match delivered(delivery, timeout_ms).await {
            Ok(()) => {
                self.transport
                    .prepare(&shard, &handle.gid, request, timeout_ms)
                    .await
            }
            Err(error) => Err(error),
        };
        let vote = answers::vote(&shard, answer, protocol);
        self.feed_result(handle, Event::VoteReceived { shard, vote });
    }

    pub(super) fn commit_one_phase(self: &Arc<Self>, handle: &Arc<TxnHandle>, shard: ShardName) {
        let (engine, handle) = (Arc::clone(self), Arc::clone(handle));
        tokio::spawn(async move {
            let result = engine
                .transport
                .commit_one_phase(&shard, &handle.gid, PHASE_TWO_TIMEOUT_MS)
                .await;
            engine.feed_result(&handle, answers::one_phase(&shard, result));
        });
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
        let (engine, handle) = (Arc::clone(self), Arc::clone(handle));
        tokio::spawn(async move {
            let result = engine
                .transport
                .execute_and_commit(&shard, statement, expect_rows, timeout_ms)
                .await;
            let event = answers::executed_and_committed(&shard, op, expect_rows, &result);
            *handle.fused() = Fused::Ran(result);
            engine.feed_result(&handle, event);
        });
    }

    /// The first COMMIT of every participant after a decision, in parallel, with the failpoints
    /// `before-commit-sends` (before any is sent) and `between-commit-sends` (with it armed, the
    /// first is sent alone and the others only after it acknowledged). A recovered transaction's
    /// re-drive skips them, so that a restart with the same `--failpoints` converges.
    pub(super) fn send_commit_round(self: &Arc<Self>, handle: &Arc<TxnHandle>, shards: Vec<ShardName>) {
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
                let event = engine.finish(&handle, &first, true, Delivery::Send).await;
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

    pub(super) fn send_phase_two(
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
            let event = engine.finish(&handle, &shard, commit, delivery).await;
            engine.feed_result(&handle, event);
        });
    }

    /// One COMMIT PREPARED (or abort) and the event its result feeds.
    async fn finish(&self, handle: &TxnHandle, shard: &ShardName, commit: bool, delivery: Delivery) -> Event {
        let result = match delivered(delivery, PHASE_TWO_TIMEOUT_MS).await {
            Ok(()) if commit => {
                self.transport
                    .commit(shard, &handle.gid, PHASE_TWO_TIMEOUT_MS)
                    .await
            }
            Ok(()) => {
                self.transport
                    .abort(shard, &handle.gid, PHASE_TWO_TIMEOUT_MS)
                    .await
            }
            Err(error) => Err(error),
        };
        if let Err(error) = &result
            && answers::contradicts_decision(error)
        {
            // The participant's own records contradict the decision: this must never happen.
            // Keep retrying (visible in GetTransaction) and say so loudly.
            tracing::error!(%shard, gid = %handle.gid, commit, %error, "participant contradicts the decision");
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
            txid: handle.gid.txid(),
            gid: handle.gid.to_string(),
            participants: participants.iter().map(ToString::to_string).collect(),
            at_ms: self.now_ms(),
        };
        self.force(handle, Forced::PreCommit(record));
    }

    /// 3PC: a round of PreCommits under `ballot`, in parallel. The coordinator's own first round
    /// (`Ballot::COORDINATOR`) of a transaction this process runs passes the failpoints
    /// `before-pre-commit-sends` (before any is sent) and `after-some-pre-commits` (with it armed,
    /// the first is sent alone and the others only after it acknowledged); a round decided by the
    /// termination rules (a learned state, or a recovered transaction) skips them, so that a
    /// restart with the same `--failpoints` converges.
    pub(super) fn send_pre_commit_round(
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
                let event = engine.pre_commit(&handle, &first, &ballot, Delivery::Send).await;
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
    pub(super) fn send_pre_commit(
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
            let event = engine.pre_commit(&handle, &shard, &ballot, delivery).await;
            engine.feed_result(&handle, event);
        });
    }

    async fn pre_commit(
        &self,
        handle: &TxnHandle,
        shard: &ShardName,
        ballot: &Ballot,
        delivery: Delivery,
    ) -> Event {
        let result = match delivered(delivery, PHASE_TWO_TIMEOUT_MS).await {
            Ok(()) => {
                self.transport
                    .pre_commit(shard, &handle.gid, ballot, PHASE_TWO_TIMEOUT_MS)
                    .await
            }
            Err(error) => Err(error),
        };
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
            let (engine, handle) = (Arc::clone(self), Arc::clone(handle));
            let (ballot, all) = (ballot.clone(), Arc::clone(&all));
            tokio::spawn(async move {
                let result = engine
                    .transport
                    .query_state(&shard, &handle.gid, &ballot, &all, timeout_ms)
                    .await;
                if let Err(error) = &result {
                    tracing::debug!(%shard, gid = %handle.gid, "QueryState failed: {error}");
                }
                if let Some(report) = answers::state_report(result) {
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
    pub(super) fn persist_end(&self, handle: &Arc<TxnHandle>) {
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
                self.store_failed(format!(
                    "failpoint {}: writing the end record of {txid} failed",
                    failpoints::BEFORE_END_RECORD
                ));
            }
        }
        self.store.end(txid);
        if live {
            failpoints::hit(failpoints::AFTER_END_RECORD);
        }
    }

    pub(super) fn persist_commit(self: &Arc<Self>, handle: &Arc<TxnHandle>, participants: Vec<ShardName>) {
        let record = CommitRecord {
            txid: handle.gid.txid(),
            gid: handle.gid.to_string(),
            participants: participants.iter().map(ToString::to_string).collect(),
            decided_at_ms: self.now_ms(),
        };
        self.force(handle, Forced::Commit(record));
    }

    /// Forces one record to the store on a task of its own (group-committed with whatever else is
    /// waiting), then feeds the event saying it is durable. The record's failpoints fail the write
    /// as a failed fsync would: the coordinator exits and a restart recovers from the store.
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
                engine.store_failed(format!(
                    "failpoint {before}: writing the {what} of {} failed",
                    handle.gid
                ));
            }
            let written = match record {
                Forced::Commit(record) => engine.store.force_commit(record).await,
                Forced::PreCommit(record) => engine.store.force_pre_commit(record).await,
            };
            if let Err(e) = written {
                engine.store_failed(e);
            }
            if let Some(after) = after
                && failpoints::hit(after).is_some()
            {
                engine.store_failed(format!(
                    "failpoint {after}: the {what} of {} was written but its fsync failed",
                    handle.gid
                ));
            }
            engine.feed_result(&handle, durable);
        });
    }
}
