//! The file decision log (`treaty-decision-log`) as the core's [`DecisionStore`]: every force
//! is group-committed and fsynced by the log's writer thread before its future completes. The
//! replay the log did when it was opened is kept here until the driver asks for it.

use std::sync::Mutex;

use treaty_commit_protocol::store::{
    CommitRecord, DecisionStore, HeuristicRecord, PreCommitRecord, StoreError, Unfinished,
};
use treaty_decision_log::{DecisionLog, Replay};
use treaty_proto::TxId;

pub struct FileStore {
    log: DecisionLog,
    replayed: Mutex<Option<Unfinished>>,
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
        }
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
        self.log.commit(record).await.map_err(failed)
    }

    async fn force_pre_commit(&self, record: PreCommitRecord) -> Result<(), StoreError> {
        self.log.pre_commit(record).await.map_err(failed)
    }

    async fn force_heuristic(&self, record: HeuristicRecord) -> Result<(), StoreError> {
        self.log.heuristic(record).await.map_err(failed)
    }

    async fn reserve_txids(&self, up_to: u64) -> Result<(), StoreError> {
        self.log.reserve_txids(up_to).await.map_err(failed)
    }

    async fn new_incarnation(&self) -> Result<u64, StoreError> {
        self.log.new_incarnation().await.map_err(failed)
    }

    fn end(&self, txid: TxId) {
        self.log.end(txid);
    }

    async fn replay(&self) -> Result<Unfinished, StoreError> {
        self.replayed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
            .ok_or_else(|| StoreError("the decision log was already replayed by this process".into()))
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.log.flush().await.map_err(failed)
    }
}
