//! Start-up and recovery: replay what the decision store holds unfinished, force a new
//! incarnation (3PC ballots carry it), then re-drive every commit decision without an end record,
//! re-learn every 3PC pre-commit without a commit record, and re-drive operators' heuristic
//! decisions. Production and the seeded simulation start the engine through [`start`].

use std::sync::Arc;

use treaty_commit_protocol::store::{
    CommitRecord, DecisionStore, HeuristicRecord, PreCommitRecord, StoreError,
};
use treaty_commit_protocol::transport::{BranchOptions, ParticipantTransport};
use treaty_proto::{CoordinatorId, Gid, ShardName, TxId};
use treaty_types::Clock;

use super::{Engine, EngineSettings};
use crate::protocol::{AbortCause, AbortReason, Transaction};

/// Up to this many re-driven commits are logged one by one at info.
const REDRIVES_LOGGED_ONE_BY_ONE: usize = 100;

/// Replays `store`, forces a new incarnation, builds the engine and re-drives what is unfinished.
/// The caller starts the ticker (`spawn_ticker`) and serves.
pub async fn start<S: DecisionStore, T: ParticipantTransport>(
    id: CoordinatorId,
    store: S,
    transport: T,
    clock: Arc<dyn Clock>,
    settings: EngineSettings,
) -> Result<Arc<Engine<S, T>>, StoreError> {
    let unfinished = store.replay().await?;
    // Durable before any 3PC ballot of this start goes out (recovery below uses it first).
    let incarnation = store.new_incarnation().await?;
    let engine = Engine::new(
        id,
        store,
        transport,
        clock,
        settings,
        unfinished.txids_reserved_up_to,
    );
    engine
        .incarnation
        .store(incarnation, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        unfinished = unfinished.commits.len(),
        pre_committed = unfinished.pre_committed.len(),
        heuristics = unfinished.heuristics.len(),
        incarnation,
        next_txid = engine.next_txid(),
        "decision store replayed"
    );
    crate::metrics::global().recovered();
    engine.recover(unfinished.commits);
    if engine.decide_in_branch {
        engine.redrive_decision_rows();
        if engine.takeover_after_ms > 0 {
            engine.spawn_takeover(engine.takeover_after_ms);
        }
    }
    engine.recover_pre_committed(unfinished.pre_committed, incarnation);
    engine.recover_heuristics(unfinished.heuristics);
    Ok(engine)
}

impl<S: DecisionStore, T: ParticipantTransport> Engine<S, T> {
    /// Re-drives every commit decision the store holds without an end record.
    pub fn recover(self: &Arc<Self>, unfinished: Vec<CommitRecord>) {
        let now = self.now_ms();
        // A line per transaction helps read a small recovery (scenario timelines); a restart that
        // re-drives thousands gets the summary only (per transaction at debug).
        let detailed = unfinished.len() <= REDRIVES_LOGGED_ONE_BY_ONE;
        if !unfinished.is_empty() {
            tracing::info!(
                transactions = unfinished.len(),
                "re-driving logged commits without an end record"
            );
        }
        for record in unfinished {
            let Some(gid) = parse_logged(record.txid, &record.gid, "commit record") else {
                continue;
            };
            let participants = self.logged_participants(record.txid, &record.participants);
            if detailed {
                tracing::info!(txid = record.txid, shards = ?record.participants, "re-driving a logged commit");
            } else {
                tracing::debug!(txid = record.txid, shards = ?record.participants, "re-driving a logged commit");
            }
            let (machine, actions) = Transaction::recover_commit(
                record.txid,
                participants,
                record.decided_at_ms,
                self.default_timeouts,
                now,
            );
            let handle = self.register(gid, String::new(), BranchOptions::default(), machine);
            crate::metrics::global().redriven("commit");
            self.perform(&handle, actions);
        }
    }

    /// Re-learns the outcome of every 3PC transaction whose pre-commit record the store holds
    /// without a commit or end record: pre-commits may have been sent, so abort cannot be presumed.
    /// Each asks every participant for its state under a ballot of this `incarnation` (durable,
    /// higher than any earlier start's) and applies the termination rules; until then
    /// `QueryDecision` answers PENDING for it.
    pub fn recover_pre_committed(self: &Arc<Self>, records: Vec<PreCommitRecord>, incarnation: u64) {
        let now = self.now_ms();
        if !records.is_empty() {
            tracing::info!(
                transactions = records.len(),
                incarnation,
                "learning the outcome of logged pre-commits without a commit or end record"
            );
        }
        for record in records {
            let Some(gid) = parse_logged(record.txid, &record.gid, "pre-commit record") else {
                continue;
            };
            let participants = self.logged_participants(record.txid, &record.participants);
            tracing::info!(txid = record.txid, shards = ?record.participants, "learning the outcome of a pre-committed transaction");
            let (machine, actions) = Transaction::recover_pre_committed(
                record.txid,
                participants,
                incarnation,
                self.default_timeouts,
                now,
            );
            let handle = self.register(gid, String::new(), BranchOptions::default(), machine);
            crate::metrics::global().redriven("pre_commit");
            self.perform(&handle, actions);
        }
    }

    /// Attaches the heuristic decisions found in the store to the transactions `recover` rebuilt,
    /// and re-drives heuristic aborts (whose branches may still be prepared).
    pub fn recover_heuristics(self: &Arc<Self>, heuristics: Vec<HeuristicRecord>) {
        for record in heuristics {
            let txid = record.txid;
            if let Some(handle) = self.tracked(txid) {
                handle.set_heuristic(record);
                continue;
            }
            let Some(gid) = parse_logged(txid, &record.gid, "heuristic record") else {
                continue;
            };
            let shards = self.logged_participants(txid, &record.participants);
            let reason = AbortReason::new(
                AbortCause::Heuristic,
                format!("aborted by hand by {}: {}", record.operator, record.reason),
            );
            let (machine, actions) = Transaction::recover_abort(
                txid,
                shards,
                record.decided_at_ms,
                reason,
                self.default_timeouts,
                self.now_ms(),
            );
            tracing::info!(txid, "re-driving a logged heuristic abort");
            let handle = self.register(gid, String::new(), BranchOptions::default(), machine);
            crate::metrics::global().redriven("heuristic");
            handle.set_heuristic(record);
            self.perform(&handle, actions);
        }
    }

    /// The shards a stored record names, each as configured; one this coordinator no longer knows
    /// is kept by name (its messages fail until it is configured again) and reported.
    pub(super) fn logged_participants(&self, txid: TxId, names: &[String]) -> Vec<ShardName> {
        names
            .iter()
            .filter_map(|name| match self.transport.shard(name) {
                Some(shard) => Some(shard),
                None => {
                    tracing::error!(
                        txid,
                        shard = name,
                        "a logged transaction names a shard this coordinator is not configured with; \
                         add it back with --shard so the transaction can finish"
                    );
                    ShardName::new(name).ok()
                }
            })
            .collect()
    }
}

fn parse_logged(txid: TxId, gid: &str, what: &str) -> Option<Gid> {
    match Gid::parse(gid) {
        Ok(gid) => Some(gid),
        Err(e) => {
            tracing::error!(txid, gid, "unusable GID in a {what}: {e}");
            None
        }
    }
}
