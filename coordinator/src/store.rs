//! The file decision log (`treaty-decision-log`) as the core's [`DecisionStore`]: every force
//! is group-committed and fsynced by the log's writer thread before its future completes. The
//! replay the log did when it was opened is kept here until the driver asks for it.
//!
//! With a decision database (`--decision-store postgres://...`, `decision_database.rs`), two-phase
//! commit records are rows there instead; the log keeps the rest (the coordinator id, txid
//! reservations, incarnations, heuristic decisions, and three-phase transactions from their
//! pre-commit on), so a transaction's records are all in one place.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Instant;

use treaty_commit_protocol::store::{
    CommitRecord, DecisionStore, HeuristicRecord, PreCommitRecord, StoreError, Unfinished,
};
use treaty_decision_log::{DecisionLog, Replay};
use treaty_proto::TxId;

use crate::decision_database::DecisionDatabase;
use crate::metrics::{self, DecisionStoreLabel};

pub struct FileStore {
    log: DecisionLog,
    replayed: Mutex<Option<Unfinished>>,
    database: Option<DecisionDatabase>,
    /// With a decision database: the transactions whose records are in the log all the same
    /// (three-phase from the pre-commit on, and heuristic decisions).
    in_log: Mutex<HashSet<TxId>>,
}

impl FileStore {
    /// `reserved_up_to`: the txids the replay says may be in use (with any margin for damage).
    pub fn new(log: DecisionLog, replay: &Replay, reserved_up_to: u64) -> Self {
        let unfinished = Unfinished {
            txids_reserved_up_to: reserved_up_to,
            commits: replay.unfinished.clone(),
            heuristics: replay.heuristics.clone(),
            pre_committed: replay.pre_committed.clone(),
        };
        Self {
            log,
            replayed: Mutex::new(Some(unfinished)),
            database: None,
            in_log: Mutex::new(HashSet::new()),
        }
    }

    /// Two-phase commit records go to `database` from now on (set before the driver starts).
    pub fn with_database(mut self, database: DecisionDatabase) -> Self {
        self.database = Some(database);
        self
    }

    fn in_log(&self) -> std::sync::MutexGuard<'_, HashSet<TxId>> {
        self.in_log
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn log(&self) -> &DecisionLog {
        &self.log
    }
}

fn failed(error: impl std::fmt::Display) -> StoreError {
    StoreError(error.to_string())
}

impl DecisionStore for FileStore {
    async fn force_commit(&self, record: CommitRecord) -> Result<(), StoreError> {
        let started = Instant::now();
        let (store, written) = match &self.database {
            Some(database) if !self.in_log().contains(&record.txid) => {
                (DecisionStoreLabel::Database, database.insert(&record).await)
            }
            _ => (
                DecisionStoreLabel::File,
                self.log.commit(record).await.map_err(failed),
            ),
        };
        let metrics = metrics::global();
        metrics.store_write("commit", started.elapsed());
        metrics.decision_durable(store, started.elapsed());
        written
    }

    async fn force_pre_commit(&self, record: PreCommitRecord) -> Result<(), StoreError> {
        if self.database.is_some() {
            self.in_log().insert(record.txid);
        }
        let started = Instant::now();
        let written = self.log.pre_commit(record).await.map_err(failed);
        metrics::global().store_write("pre_commit", started.elapsed());
        written
    }

    async fn force_heuristic(&self, record: HeuristicRecord) -> Result<(), StoreError> {
        if self.database.is_some() {
            self.in_log().insert(record.txid);
        }
        let started = Instant::now();
        let written = self.log.heuristic(record).await.map_err(failed);
        metrics::global().store_write("heuristic", started.elapsed());
        written
    }

    async fn reserve_txids(&self, up_to: u64) -> Result<(), StoreError> {
        let started = Instant::now();
        let written = self.log.reserve_txids(up_to).await.map_err(failed);
        metrics::global().store_write("txids", started.elapsed());
        written
    }

    async fn new_incarnation(&self) -> Result<u64, StoreError> {
        let started = Instant::now();
        let written = self.log.new_incarnation().await.map_err(failed);
        metrics::global().store_write("incarnation", started.elapsed());
        written
    }

    fn end(&self, txid: TxId) {
        match &self.database {
            None => self.log.end(txid),
            Some(database) => {
                if self.in_log().remove(&txid) {
                    self.log.end(txid);
                }
                database.end(txid);
            }
        }
    }

    async fn replay(&self) -> Result<Unfinished, StoreError> {
        let mut unfinished = self
            .replayed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
            .ok_or_else(|| StoreError("the decision log was already replayed by this process".into()))?;
        if let Some(database) = &self.database {
            let rows = database.unfinished().await.map_err(failed)?;
            {
                let mut in_log = self.in_log();
                in_log.extend(unfinished.pre_committed.iter().map(|record| record.txid));
                in_log.extend(unfinished.heuristics.iter().map(|record| record.txid));
                in_log.extend(unfinished.commits.iter().map(|record| record.txid));
            }
            // A txid the database holds was handed out, whatever the log says.
            if let Some(highest) = rows.iter().map(|record| record.txid).max() {
                unfinished.txids_reserved_up_to = unfinished.txids_reserved_up_to.max(highest);
            }
            unfinished.commits.extend(rows);
        }
        Ok(unfinished)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.log.flush().await.map_err(failed)
    }
}
