//! Carrying out the decision-row actions of `--decision-store shard` (the decision inside
//! PostgreSQL, `treaty.decisions` on the transaction's decision shard): the decision branch's
//! commit (`CommitDecision`), reading a decision back and concluding abort when there is none
//! (`ConcludeDecision`, and `QueryDecision` for a transaction this process does not track),
//! forgetting commit rows in batches once every branch committed, and re-driving the commit rows
//! of this coordinator after a restart. What an answer means is the core's
//! (`treaty_commit_protocol::answers`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument as _;
use treaty_commit_protocol::answers;
use treaty_commit_protocol::store::{CommitRecord, DecisionStore};
use treaty_commit_protocol::transport::{ParticipantTransport, StoredOutcome};
use treaty_proto::{Gid, ShardName};

use super::table::TxnHandle;
use super::{Decision, Engine, PHASE_TWO_TIMEOUT_MS};

/// Commit rows forgotten per `ForgetDecisions` call, at most.
const FORGET_BATCH: usize = 1_000;
/// While a backlog is live, the longest a shard's partial batch of forgets waits for more.
const FORGET_MAX_WAIT_MS: u64 = 1_000;
/// Commit rows listed per shard and call when re-driving after a restart (10 in unit tests, so
/// that they cover paging).
#[cfg(not(test))]
const LIST_BATCH: u32 = 10_000;
#[cfg(test)]
const LIST_BATCH: u32 = 10;
/// Pause between attempts to list a shard's commit rows while it is unreachable, and before
/// listing again after a full page.
const LIST_RETRY: Duration = Duration::from_millis(500);
/// The longest pause before listing a full page again when the last brought nothing new.
const LIST_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// GIDs whose commit rows can go, per decision shard, until the next flush.
#[derive(Default)]
pub(super) struct Forgets(std::sync::Mutex<BTreeMap<ShardName, Queued>>);

/// One shard's queued forgets, and when the oldest of them was queued (the engine's clock).
struct Queued {
    gids: Vec<Gid>,
    since_ms: u64,
}

impl Forgets {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ShardName, Queued>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn push(&self, shard: &ShardName, gid: Gid, now_ms: u64) {
        self.lock()
            .entry(shard.clone())
            .or_insert_with(|| Queued {
                gids: Vec::new(),
                since_ms: now_ms,
            })
            .gids
            .push(gid);
    }

    /// The shards' queues to flush now: every queue, or during a backlog only those holding a
    /// full batch or waiting `FORGET_MAX_WAIT_MS` since their oldest entry.
    fn take_due(&self, backlog: bool, now_ms: u64) -> Vec<(ShardName, Vec<Gid>)> {
        let mut queues = self.lock();
        if !backlog {
            return std::mem::take(&mut *queues)
                .into_iter()
                .map(|(shard, queued)| (shard, queued.gids))
                .collect();
        }
        let due: Vec<ShardName> = queues
            .iter()
            .filter(|(_, queued)| {
                queued.gids.len() >= FORGET_BATCH
                    || now_ms.saturating_sub(queued.since_ms) >= FORGET_MAX_WAIT_MS
            })
            .map(|(shard, _)| shard.clone())
            .collect();
        due.iter()
            .filter_map(|shard| queues.remove_entry(shard))
            .map(|(shard, queued)| (shard, queued.gids))
            .collect()
    }
}

impl<S: DecisionStore, T: ParticipantTransport> Engine<S, T> {
    /// Whether transaction `txid` decides in its first branch (`--decision-store shard`, 2PC).
    pub fn decides_in_branch(&self, txid: treaty_proto::TxId) -> bool {
        self.tracked(txid)
            .is_some_and(|h| h.machine().decides_in_branch())
    }

    /// The decision branch inserts the commit row and commits; its answer is fed back.
    pub(super) fn commit_decision(
        self: &Arc<Self>,
        handle: &Arc<TxnHandle>,
        shard: ShardName,
        participants: Vec<ShardName>,
        standalone: bool,
    ) {
        let span = phase_span!(handle, "commit_decision", shard);
        let (engine, handle) = (Arc::clone(self), Arc::clone(handle));
        tokio::spawn(
            async move {
                let result = engine
                    .transport
                    .commit_decision(
                        &shard,
                        handle.gid(),
                        &participants,
                        standalone,
                        PHASE_TWO_TIMEOUT_MS,
                    )
                    .await;
                engine.feed_result(&handle, answers::decision_written(&shard, result));
            }
            .instrument(span),
        );
    }

    /// Reads the decision back after `delay_ms`, concluding abort if there is no row.
    pub(super) fn conclude_decision(
        self: &Arc<Self>,
        handle: &Arc<TxnHandle>,
        shard: ShardName,
        delay_ms: u64,
    ) {
        let span = phase_span!(handle, "conclude_decision", shard);
        let (engine, handle) = (Arc::clone(self), Arc::clone(handle));
        tokio::spawn(
            async move {
                if delay_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                }
                let gid = handle.gid().clone();
                let result = engine
                    .transport
                    .read_decisions(&shard, std::slice::from_ref(&gid), true, PHASE_TWO_TIMEOUT_MS)
                    .await;
                engine.feed_result(&handle, answers::decision_read(&shard, &gid, result));
            }
            .instrument(span),
        );
    }

    /// The transaction's end: its commit row can go (batched; see `flush_forgets`).
    pub(super) fn forget_decision(&self, shard: &ShardName, gid: &Gid) {
        self.forgets.push(shard, gid.clone(), self.now_ms());
    }

    /// Deletes the commit rows queued by `forget_decision`, one call per shard. A failed call
    /// loses nothing that matters: the rows stay, and a restart re-drives them (the commits are
    /// answered as already done) and forgets them again.
    ///
    /// While at least `FORGET_BATCH` transactions are live (a restart's re-drive, a takeover, a
    /// load that heavy), a shard's rows wait until a full batch is queued or its oldest has
    /// waited `FORGET_MAX_WAIT_MS`. Each delete reads the whole table (PostgreSQL's planner sees
    /// a small table and scans it rather than the key), and while thousands of branches are
    /// prepared every row's visibility check walks the server's list of transactions in
    /// progress: a delete per tick then cost 3-5 ms each, about a fifth of PostgreSQL's CPU in
    /// recovering 10,000 transactions.
    pub(super) fn flush_forgets(self: &Arc<Self>) {
        let backlog = self.live_count() >= FORGET_BATCH;
        for (shard, gids) in self.forgets.take_due(backlog, self.now_ms()) {
            for batch in gids.chunks(FORGET_BATCH) {
                let (engine, shard, batch) = (Arc::clone(self), shard.clone(), batch.to_vec());
                tokio::spawn(async move {
                    if let Err(error) = engine
                        .transport
                        .forget_decisions(&shard, &batch, PHASE_TWO_TIMEOUT_MS)
                        .await
                    {
                        tracing::debug!(%shard, rows = batch.len(), "forgetting commit rows failed: {error}");
                    }
                });
            }
        }
    }

    /// `QueryDecision`: what a participant should do with each GID, and whether the coordinator
    /// still needs its marker row. A GID whose decision is a row and that this process does not
    /// run is answered from the row, and with none an abort row is inserted first, so the answer
    /// is final whoever runs the transaction (any coordinator answers for any other); one read per
    /// decision shard. `Pending` when that shard cannot be reached: ask again later.
    pub async fn decisions(&self, gids: &[String]) -> Vec<(Decision, bool)> {
        let mut answers = Vec::with_capacity(gids.len());
        let mut to_read: BTreeMap<ShardName, Vec<(usize, Gid)>> = BTreeMap::new();
        for (at, text) in gids.iter().enumerate() {
            let Ok(gid) = Gid::parse(text) else {
                answers.push((Decision::Unknown, false));
                continue;
            };
            match self.local_decision(&gid) {
                Ok(answer) => answers.push(answer),
                Err(shard) => {
                    answers.push((Decision::Pending, false));
                    to_read.entry(shard).or_default().push((at, gid));
                }
            }
        }
        for (shard, wanted) in to_read {
            let gids: Vec<Gid> = wanted.iter().map(|(_, gid)| gid.clone()).collect();
            let rows = match self
                .transport
                .read_decisions(&shard, &gids, true, PHASE_TWO_TIMEOUT_MS)
                .await
            {
                Ok(rows) => rows,
                Err(error) => {
                    tracing::debug!(%shard, gids = gids.len(), "reading decisions failed: {error}");
                    continue;
                }
            };
            for (at, gid) in wanted {
                let outcome = rows.iter().find(|row| row.gid == gid).and_then(|row| row.outcome);
                answers[at].0 = match outcome {
                    Some(StoredOutcome::Commit) => Decision::Commit,
                    Some(StoredOutcome::Abort) => Decision::Abort,
                    None => Decision::Pending,
                };
            }
        }
        answers
    }

    /// After a restart: lists this coordinator's commit rows on every shard and re-drives the
    /// ones not tracked, shard by shard, retrying a shard until it answers. A page comes back
    /// oldest first, at most `LIST_BATCH` rows; a full one may hide more behind it, which come up
    /// once the rows above are finished and forgotten, so the shard is listed again while pages
    /// come back full: after `LIST_RETRY`, twice as long each time a page brings nothing not yet
    /// tracked (its rows are still being committed, or wait for a participant that is down), up
    /// to `LIST_BACKOFF_MAX`. (Listing again at once returned the same rows, now tracked, and
    /// stopped there, leaving the rest of a large backlog to the takeover sweep or to the
    /// participants' in-doubt asking.) Ends with the engine.
    pub(super) fn redrive_decision_rows(self: &Arc<Self>) {
        for shard in self.transport.shards() {
            let weak = Arc::downgrade(self);
            tokio::spawn(async move {
                let mut pause = LIST_RETRY;
                loop {
                    let Some(engine) = weak.upgrade() else {
                        return;
                    };
                    match engine
                        .transport
                        .list_decisions(&shard, Some(&engine.id), LIST_BATCH, PHASE_TWO_TIMEOUT_MS)
                        .await
                    {
                        Ok(rows) => {
                            let full = rows.len() >= LIST_BATCH as usize;
                            let records: Vec<CommitRecord> = rows
                                .into_iter()
                                .filter(|row| row.outcome == Some(StoredOutcome::Commit))
                                .filter(|row| engine.tracked(row.gid.txid()).is_none())
                                .map(|row| CommitRecord {
                                    txid: row.gid.txid(),
                                    gid: row.gid.to_string(),
                                    participants: row.participants.iter().map(ToString::to_string).collect(),
                                    decided_at_ms: row.decided_at_ms,
                                })
                                .collect();
                            pause = if records.is_empty() {
                                (pause * 2).min(LIST_BACKOFF_MAX)
                            } else {
                                LIST_RETRY
                            };
                            engine.recover(records);
                            if !full {
                                return;
                            }
                        }
                        Err(error) => {
                            tracing::info!(%shard, "listing commit rows to re-drive: {error}; retrying");
                            pause = LIST_RETRY;
                        }
                    }
                    drop(engine);
                    tokio::time::sleep(pause).await;
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use treaty_proto::CoordinatorId;

    use super::*;

    fn gids(n: u64) -> Vec<Gid> {
        let id = CoordinatorId::new("c1").unwrap();
        (1..=n).map(|txid| Gid::new(&id, txid)).collect()
    }

    #[test]
    fn without_a_backlog_every_queue_is_flushed_at_once() {
        let forgets = Forgets::default();
        let (s0, s1) = (ShardName::new("s0").unwrap(), ShardName::new("s1").unwrap());
        for gid in gids(3) {
            forgets.push(&s0, gid, 100);
        }
        forgets.push(&s1, gids(1).remove(0), 100);
        let due = forgets.take_due(false, 100);
        assert_eq!(due.len(), 2);
        assert_eq!(due[0], (s0, gids(3)));
        assert!(forgets.take_due(false, 100).is_empty());
    }

    #[test]
    fn during_a_backlog_a_queue_waits_for_a_full_batch_or_its_age_limit() {
        let forgets = Forgets::default();
        let (s0, s1) = (ShardName::new("s0").unwrap(), ShardName::new("s1").unwrap());
        let full = gids(FORGET_BATCH as u64);
        for gid in full.iter().cloned() {
            forgets.push(&s0, gid, 1_000);
        }
        forgets.push(&s1, gids(1).remove(0), 1_000);
        // s0 holds a full batch: flushed; s1's single row waits.
        let due = forgets.take_due(true, 1_050);
        assert_eq!(due, vec![(s0.clone(), full)]);
        assert!(forgets.take_due(true, 1_000 + FORGET_MAX_WAIT_MS - 1).is_empty());
        // Its age limit reached, the partial batch goes too, backlog or not.
        let due = forgets.take_due(true, 1_000 + FORGET_MAX_WAIT_MS);
        assert_eq!(due, vec![(s1, gids(1))]);
        // A queue started later is timed from its own first entry.
        forgets.push(&s0, gids(1).remove(0), 5_000);
        assert!(forgets.take_due(true, 5_500).is_empty());
        assert_eq!(forgets.take_due(false, 5_500).len(), 1);
    }
}
