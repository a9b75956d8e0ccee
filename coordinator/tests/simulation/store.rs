//! `SimStore`: the decision store in memory, with a durable part and a volatile part, modelling the
//! file log (`treaty-decision-log`). A `force_*` appends its record to the volatile part, waits a
//! random virtual fsync, moves everything volatile to the durable part (group commit: lazily
//! written end records ride along) and only then completes; `end` only appends to the volatile
//! part. A coordinator crash discards the volatile part. `replay` rebuilds what is unfinished from
//! the durable part with the log's rules: a commit record (or heuristic commit) supersedes a
//! pre-commit record, an end record retires all three, the first decision for a txid stands, and
//! incarnations only grow.
//!
//! Each coordinator incarnation gets its own handle ([`SimStoreHandle`]); a dead incarnation's
//! calls never complete and never write.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::Rng;
use treaty_commit_protocol::store::{
    CommitRecord, DecisionStore, HeuristicDecision, HeuristicRecord, PreCommitRecord, StoreError, Unfinished,
};
use treaty_types::TxId;

use crate::faults::{Chance, Life};
use crate::trace::Trace;

/// One record of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Commit(CommitRecord),
    PreCommit(PreCommitRecord),
    Heuristic(HeuristicRecord),
    End(TxId),
    TxidsReserved(u64),
    Incarnation(u64),
}

impl Record {
    fn describe(&self) -> String {
        match self {
            Record::Commit(r) => format!("commit txid {} on {:?}", r.txid, r.participants),
            Record::PreCommit(r) => format!("pre-commit txid {} on {:?}", r.txid, r.participants),
            Record::Heuristic(r) => format!(
                "heuristic {} txid {} on {:?}",
                r.decision.name(),
                r.txid,
                r.participants
            ),
            Record::End(txid) => format!("end txid {txid}"),
            Record::TxidsReserved(up_to) => format!("txids reserved up to {up_to}"),
            Record::Incarnation(number) => format!("incarnation {number}"),
        }
    }
}

#[derive(Default)]
struct Log {
    durable: Vec<Record>,
    volatile: Vec<Record>,
}

/// The store's contents, shared by every incarnation.
#[derive(Clone)]
pub struct SimStore {
    log: Arc<Mutex<Log>>,
    chance: Arc<Chance>,
    trace: Trace,
}

impl SimStore {
    pub fn new(chance: Arc<Chance>, trace: Trace) -> Self {
        Self {
            log: Arc::new(Mutex::new(Log::default())),
            chance,
            trace,
        }
    }

    fn log(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The handle the incarnation `life` writes through.
    pub fn handle(&self, life: Life) -> SimStoreHandle {
        SimStoreHandle {
            store: self.clone(),
            life,
        }
    }

    /// The coordinator crashed: what was not made durable is lost.
    pub fn crash(&self) {
        let lost = std::mem::take(&mut self.log().volatile);
        for record in lost {
            self.trace.record(format!("store: lost {}", record.describe()));
        }
    }

    /// Every durable record, in log order.
    pub fn durable(&self) -> Vec<Record> {
        self.log().durable.clone()
    }

    /// Whether a commit decision for `txid` (a commit record or a heuristic commit) is durable.
    pub fn commit_is_durable(&self, txid: TxId) -> bool {
        self.log().durable.iter().any(|record| match record {
            Record::Commit(r) => r.txid == txid,
            Record::Heuristic(r) => r.txid == txid && r.decision == HeuristicDecision::Commit,
            _ => false,
        })
    }

    /// Whether a 3PC pre-commit record (or a commit decision) for `txid` is durable: no
    /// participant may pre-commit before.
    pub fn pre_commit_is_durable(&self, txid: TxId) -> bool {
        self.commit_is_durable(txid)
            || self
                .log()
                .durable
                .iter()
                .any(|record| matches!(record, Record::PreCommit(r) if r.txid == txid))
    }

    /// What a restart replays: the log's rules over the durable records.
    pub fn unfinished(&self) -> Unfinished {
        replay(&self.log().durable)
    }

    fn append(&self, record: Record) {
        self.trace.record(format!("store: write {}", record.describe()));
        self.log().volatile.push(record);
    }

    /// The fsync: everything written so far becomes durable.
    fn sync(&self) {
        let mut log = self.log();
        let synced = std::mem::take(&mut log.volatile);
        for record in &synced {
            self.trace.record(format!("store: durable {}", record.describe()));
        }
        log.durable.extend(synced);
    }

    fn fsync_delay(&self, what: &str) -> (u64, u64) {
        let mut rng = self.chance.rng(&format!("fsync/{what}"));
        let slow = self.chance.faults().is_some() && rng.random_bool(0.1);
        let before = if slow {
            rng.random_range(20..200)
        } else {
            rng.random_range(1..6)
        };
        // Between the fsync and the writer waking the caller: a crash there leaves a durable
        // record the coordinator never heard was durable.
        (before, rng.random_range(0..3))
    }
}

/// The log's replay rules (`treaty_decision_log::state::LiveState`).
pub fn replay(records: &[Record]) -> Unfinished {
    let mut reserved = 0;
    let mut commits: BTreeMap<TxId, (usize, CommitRecord)> = BTreeMap::new();
    let mut heuristics: BTreeMap<TxId, (usize, HeuristicRecord)> = BTreeMap::new();
    let mut pre_commits: BTreeMap<TxId, (usize, PreCommitRecord)> = BTreeMap::new();
    for (sequence, record) in records.iter().enumerate() {
        match record {
            Record::TxidsReserved(up_to) => reserved = reserved.max(*up_to),
            Record::Incarnation(_) => {}
            Record::Commit(commit) => {
                reserved = reserved.max(commit.txid);
                pre_commits.remove(&commit.txid);
                commits.entry(commit.txid).or_insert((sequence, commit.clone()));
            }
            Record::End(txid) => {
                commits.remove(txid);
                heuristics.remove(txid);
                pre_commits.remove(txid);
            }
            Record::Heuristic(heuristic) => {
                reserved = reserved.max(heuristic.txid);
                if let Some(commit) = heuristic.as_commit() {
                    pre_commits.remove(&commit.txid);
                    commits.entry(commit.txid).or_insert((sequence, commit));
                }
                heuristics
                    .entry(heuristic.txid)
                    .or_insert((sequence, heuristic.clone()));
            }
            Record::PreCommit(pre_commit) => {
                reserved = reserved.max(pre_commit.txid);
                if !commits.contains_key(&pre_commit.txid) {
                    pre_commits
                        .entry(pre_commit.txid)
                        .or_insert((sequence, pre_commit.clone()));
                }
            }
        }
    }
    fn in_order<T>(map: BTreeMap<TxId, (usize, T)>) -> Vec<T> {
        let mut entries: Vec<(usize, T)> = map.into_values().collect();
        entries.sort_by_key(|(sequence, _)| *sequence);
        entries.into_iter().map(|(_, record)| record).collect()
    }
    Unfinished {
        txids_reserved_up_to: reserved,
        commits: in_order(commits),
        heuristics: in_order(heuristics),
        pre_committed: in_order(pre_commits),
    }
}

fn highest_incarnation(records: &[Record]) -> u64 {
    records
        .iter()
        .filter_map(|record| match record {
            Record::Incarnation(number) => Some(*number),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// One coordinator incarnation's view of the store.
#[derive(Clone)]
pub struct SimStoreHandle {
    store: SimStore,
    life: Life,
}

impl SimStoreHandle {
    /// Writes `record`, waits for a virtual fsync covering it, and completes only if the
    /// incarnation is still alive.
    async fn force(&self, record: Record, key: String) -> Result<(), StoreError> {
        self.life.check().await;
        let (before_ms, after_ms) = self.store.fsync_delay(&key);
        self.store.append(record);
        tokio::time::sleep(Duration::from_millis(before_ms)).await;
        self.life.check().await;
        self.store.sync();
        tokio::time::sleep(Duration::from_millis(after_ms)).await;
        self.life.check().await;
        Ok(())
    }
}

impl DecisionStore for SimStoreHandle {
    async fn force_commit(&self, record: CommitRecord) -> Result<(), StoreError> {
        let key = format!("commit/{}", record.txid);
        self.force(Record::Commit(record), key).await
    }

    async fn force_pre_commit(&self, record: PreCommitRecord) -> Result<(), StoreError> {
        let key = format!("pre-commit/{}", record.txid);
        self.force(Record::PreCommit(record), key).await
    }

    async fn force_heuristic(&self, record: HeuristicRecord) -> Result<(), StoreError> {
        let key = format!("heuristic/{}", record.txid);
        self.force(Record::Heuristic(record), key).await
    }

    async fn reserve_txids(&self, up_to: u64) -> Result<(), StoreError> {
        self.force(Record::TxidsReserved(up_to), format!("reserve/{up_to}"))
            .await
    }

    async fn new_incarnation(&self) -> Result<u64, StoreError> {
        self.life.check().await;
        let number = {
            let log = self.store.log();
            highest_incarnation(&log.durable).max(highest_incarnation(&log.volatile)) + 1
        };
        self.force(Record::Incarnation(number), format!("incarnation/{number}"))
            .await?;
        Ok(number)
    }

    fn end(&self, txid: TxId) {
        if !self.life.is_dead() {
            self.store.append(Record::End(txid));
        }
    }

    async fn replay(&self) -> Result<Unfinished, StoreError> {
        self.life.check().await;
        Ok(self.store.unfinished())
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.life.check().await;
        self.store.sync();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::FaultRates;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn commit(txid: TxId) -> CommitRecord {
        CommitRecord {
            txid,
            gid: format!("treaty:c1:{txid}"),
            participants: vec!["s0".into(), "s1".into()],
            decided_at_ms: 1,
        }
    }

    fn pre_commit(txid: TxId) -> PreCommitRecord {
        PreCommitRecord {
            txid,
            gid: format!("treaty:c1:{txid}"),
            participants: vec!["s0".into(), "s1".into()],
            at_ms: 1,
        }
    }

    #[test]
    fn replay_follows_the_log_rules() {
        let heuristic = HeuristicRecord {
            txid: 9,
            gid: "treaty:c1:9".into(),
            decision: HeuristicDecision::Abort,
            participants: vec!["s0".into()],
            operator: "op".into(),
            reason: "why".into(),
            decided_at_ms: 2,
        };
        let records = vec![
            Record::TxidsReserved(100),
            Record::PreCommit(pre_commit(3)),
            Record::PreCommit(pre_commit(4)),
            Record::Commit(commit(3)),
            Record::Commit(commit(5)),
            Record::End(5),
            Record::Heuristic(heuristic.clone()),
            Record::PreCommit(pre_commit(3)),
            Record::Commit(commit(150)),
        ];
        let unfinished = replay(&records);
        assert_eq!(
            unfinished.txids_reserved_up_to, 150,
            "a commit raises the reservation"
        );
        assert_eq!(
            unfinished.commits,
            vec![commit(3), commit(150)],
            "the end retired 5"
        );
        assert_eq!(
            unfinished.pre_committed,
            vec![pre_commit(4)],
            "a commit supersedes a pre-commit, before or after"
        );
        assert_eq!(unfinished.heuristics, vec![heuristic]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_crash_loses_what_was_not_forced_and_incarnations_grow() {
        let mut rng = StdRng::seed_from_u64(1);
        let chance = Arc::new(Chance::new(1, FaultRates::random(&mut rng)));
        let store = SimStore::new(chance, Trace::new());
        let first = store.handle(Life::new(1));
        assert_eq!(first.new_incarnation().await.unwrap(), 1);
        first.force_commit(commit(7)).await.unwrap();
        first.end(7);
        assert_eq!(store.unfinished().commits, vec![commit(7)], "the end is lazy");
        store.crash();
        let second = store.handle(Life::new(2));
        assert_eq!(second.new_incarnation().await.unwrap(), 2);
        assert_eq!(second.replay().await.unwrap().commits, vec![commit(7)]);
        second.end(7);
        second.force_commit(commit(8)).await.unwrap();
        assert_eq!(
            store.unfinished().commits,
            vec![commit(8)],
            "a force makes earlier end records durable"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_incarnation_never_completes_a_force() {
        let mut rng = StdRng::seed_from_u64(2);
        let chance = Arc::new(Chance::new(2, FaultRates::random(&mut rng)));
        let store = SimStore::new(chance, Trace::new());
        let life = Life::new(1);
        let handle = store.handle(life.clone());
        life.kill();
        let forced = tokio::time::timeout(Duration::from_secs(60), handle.force_commit(commit(1))).await;
        assert!(forced.is_err(), "a dead process's force must hang");
        assert!(!store.commit_is_durable(1));
    }
}
