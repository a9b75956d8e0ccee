//! Finishing what no live coordinator is finishing (`--decision-store shard`). Any instance can:
//! the decision is a row on the transaction's decision shard, and its GID names that shard. Every
//! `takeover_after_ms / 2`, each instance
//! - lists the commit rows on every shard and re-drives those older than `takeover_after_ms`
//!   that nobody here drives (another instance's that died for good, or rows whose forget failed):
//!   COMMIT PREPARED to the shards the row names, then the row is forgotten;
//! - lists the prepared branches on every shard and, for those prepared longer than
//!   `takeover_after_ms` that nobody here drives, reads the decision row, concluding abort when
//!   there is none (an abort row, which the decision branch's commit can no longer overtake), and
//!   carries the decision out.
//!
//! Safety never depends on the threshold or on clocks: a commit row is a decision, and concluding
//! abort is safe at any time (the unique key lets only one row commit; a coordinator still running
//! the transaction then hears its decision refused and answers ABORTED). The threshold only keeps
//! instances from doing each other's work while they are alive.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use treaty_commit_protocol::store::DecisionStore;
use treaty_commit_protocol::transport::{ParticipantTransport, StoredDecision, StoredOutcome};
use treaty_proto::{Gid, ShardName};

use super::{Engine, PHASE_TWO_TIMEOUT_MS};
use crate::protocol::{AbortCause, AbortReason, Transaction};

/// Rows and prepared branches looked at per shard and sweep.
const SWEEP_BATCH: u32 = 10_000;

impl<S: DecisionStore, T: ParticipantTransport> Engine<S, T> {
    /// Runs the sweep until the engine is dropped by everyone else.
    pub(super) fn spawn_takeover(self: &Arc<Self>, after_ms: u64) {
        let weak = Arc::downgrade(self);
        let every = Duration::from_millis((after_ms / 2).max(100));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(engine) = weak.upgrade() else { return };
                engine.sweep(after_ms).await;
            }
        });
    }

    /// One pass over every shard (see the module documentation).
    pub(super) async fn sweep(self: &Arc<Self>, after_ms: u64) {
        let now = self.now_ms();
        for shard in self.transport.shards() {
            match self
                .transport
                .list_decisions(&shard, None, SWEEP_BATCH, PHASE_TWO_TIMEOUT_MS)
                .await
            {
                Ok(rows) => {
                    for row in rows {
                        if row.decided_at_ms.saturating_add(after_ms) <= now {
                            self.take_over_commit(row);
                        }
                    }
                }
                Err(error) => tracing::debug!(%shard, "takeover: listing commit rows: {error}"),
            }
        }
        // By decision shard, then GID text (ordered, so a seeded simulation replays the same).
        let mut stuck: BTreeMap<ShardName, BTreeMap<String, (Gid, Vec<ShardName>)>> = BTreeMap::new();
        for (shard, answer) in self.prepared_everywhere(PHASE_TWO_TIMEOUT_MS).await {
            let Ok(branches) = answer else { continue };
            for branch in branches.into_iter().filter(|b| b.age_ms >= after_ms) {
                let Ok(gid) = Gid::parse(&branch.gid) else {
                    continue;
                };
                let Some(decision_shard) = gid.decision_shard().cloned() else {
                    continue;
                };
                if self.drives(&gid) {
                    continue;
                }
                stuck
                    .entry(decision_shard)
                    .or_default()
                    .entry(gid.to_string())
                    .or_insert_with(|| (gid, Vec::new()))
                    .1
                    .push(shard.clone());
            }
        }
        for (decision_shard, holding) in stuck {
            let gids: Vec<Gid> = holding.values().map(|(gid, _)| gid.clone()).collect();
            match self
                .transport
                .read_decisions(&decision_shard, &gids, true, PHASE_TWO_TIMEOUT_MS)
                .await
            {
                Ok(rows) => {
                    for row in rows {
                        match row.outcome {
                            Some(StoredOutcome::Commit) => self.take_over_commit(row),
                            Some(StoredOutcome::Abort) => {
                                let shards = holding
                                    .get(row.gid.as_str())
                                    .map(|(_, shards)| shards.clone())
                                    .unwrap_or_default();
                                self.take_over_abort(row.gid, shards);
                            }
                            None => {}
                        }
                    }
                }
                Err(error) => {
                    tracing::debug!(shard = %decision_shard, "takeover: reading decisions: {error}")
                }
            }
        }
    }

    /// Whether this instance finished `gid` (its own) and still remembers it.
    fn finished_here(&self, gid: &Gid) -> bool {
        gid.coordinator() == &self.id
            && self
                .tracked(gid.txid())
                .is_some_and(|h| h.gid() == gid && h.machine().phase() == crate::protocol::Phase::Committed)
    }

    /// Whether this instance already drives `gid`.
    fn drives(&self, gid: &Gid) -> bool {
        if gid.coordinator() == &self.id {
            self.tracked(gid.txid()).is_some_and(|h| h.gid() == gid)
        } else {
            self.finishing_foreign(gid)
        }
    }

    fn take_over_commit(self: &Arc<Self>, row: StoredDecision) {
        if row.outcome != Some(StoredOutcome::Commit) {
            return;
        }
        if self.finished_here(&row.gid) {
            // Every branch committed, but forgetting the row failed (its shard was down): again.
            if let Some(shard) = row.gid.decision_shard() {
                self.forget_decision(shard, &row.gid);
            }
            return;
        }
        if self.drives(&row.gid) {
            return;
        }
        tracing::info!(gid = %row.gid, shards = ?row.participants, "finishing a commit row nobody here drives");
        let (machine, actions) = Transaction::recover_commit(
            row.gid.txid(),
            row.participants,
            row.decided_at_ms,
            self.default_timeouts,
            self.now_ms(),
        );
        self.adopt(row.gid, machine, actions);
    }

    fn take_over_abort(self: &Arc<Self>, gid: Gid, shards: Vec<ShardName>) {
        if self.drives(&gid) {
            return;
        }
        tracing::info!(%gid, ?shards, "rolling back prepared branches whose decision row says abort");
        let reason = AbortReason::new(
            AbortCause::ConcludedAbort,
            format!("concluded aborted by coordinator {}: no commit row", self.id),
        );
        let now = self.now_ms();
        let (machine, actions) =
            Transaction::recover_abort(gid.txid(), shards, now, reason, self.default_timeouts, now);
        self.adopt(gid, machine, actions);
    }

    /// Drives a rebuilt transaction: in this instance's table if it is its own, else apart.
    fn adopt(self: &Arc<Self>, gid: Gid, machine: Transaction, actions: Vec<crate::protocol::Action>) {
        let handle = if gid.coordinator() == &self.id {
            Some(self.register(gid, String::new(), Default::default(), machine))
        } else {
            self.register_foreign(gid, machine)
        };
        if let Some(handle) = handle {
            crate::metrics::global().redriven("takeover");
            self.perform(&handle, actions);
        }
    }
}
