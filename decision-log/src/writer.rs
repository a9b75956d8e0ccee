//! The writer thread: the only owner of the log file. It group-commits batches of requests (one write,
//! at most one fdatasync, then wakes the forced waiters), keeps the live state, compacts, and poisons
//! the log for good when a write or fsync fails.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tokio::sync::oneshot;

use crate::error::{LogError, WriteFailure};
use crate::files::{CompactionFailure, LogPaths, write_compacted};
use crate::hooks::{FsyncAt, TestHooks};
use crate::record::{FORMAT_VERSION, Record};
use crate::state::LiveState;
use crate::{BatchObserver, BatchWritten, CommitRecord, HeuristicRecord, LogStats, PreCommitRecord};

pub(crate) type Waiter = oneshot::Sender<Result<(), LogError>>;

pub(crate) enum Request {
    Header {
        coordinator_id: String,
        done: Waiter,
    },
    ReserveTxids {
        up_to: u64,
        done: Waiter,
    },
    Commit {
        record: CommitRecord,
        done: Waiter,
    },
    Heuristic {
        record: HeuristicRecord,
        done: Waiter,
    },
    PreCommit {
        record: PreCommitRecord,
        done: Waiter,
    },
    Incarnation {
        number: u64,
        done: Waiter,
    },
    /// Lazy: written with the next batch, never waits for an fsync of its own.
    End {
        txid: u64,
    },
    Flush {
        done: Waiter,
    },
}

/// What the handles and the writer thread share.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Set once, by the writer, when a write or fsync fails; appenders check it before sending.
    pub(crate) poison: OnceLock<Arc<WriteFailure>>,
    pub(crate) requests_sent: AtomicU64,
    records_appended: AtomicU64,
    fsyncs: AtomicU64,
    bytes_written: AtomicU64,
    compactions: AtomicU64,
    batches: AtomicU64,
}

impl Shared {
    pub(crate) fn stats(&self) -> LogStats {
        LogStats {
            records_appended: self.records_appended.load(Ordering::Relaxed),
            fsyncs: self.fsyncs.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            compactions: self.compactions.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
        }
    }

    fn count(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

pub(crate) struct Writer {
    pub(crate) paths: LogPaths,
    pub(crate) file: File,
    pub(crate) file_len: u64,
    pub(crate) compact_after_bytes: u64,
    pub(crate) on_batch: Option<BatchObserver>,
    pub(crate) state: LiveState,
    pub(crate) shared: Arc<Shared>,
    pub(crate) hooks: TestHooks,
    /// Held, never read: the directory lock lives exactly as long as the writer.
    pub(crate) _lock: File,
}

/// The writer's working memory, reused across batches so the steady state allocates nothing.
struct Loop {
    log: Writer,
    compact_at: u64,
    /// The file's length at the last fdatasync (or as opened or compacted): known durable. Bytes
    /// beyond it (lazy end records) tell a flush that it must sync.
    synced_len: u64,
    buf: Vec<u8>,
    batch: Vec<Request>,
    waiters: Vec<Waiter>,
}

impl Writer {
    pub(crate) fn run(self, requests: Receiver<Request>) {
        let mut writer = Loop {
            compact_at: self.compact_after_bytes,
            synced_len: self.file_len,
            log: self,
            buf: Vec::with_capacity(64 * 1024),
            batch: Vec::with_capacity(256),
            waiters: Vec::with_capacity(256),
        };
        while let Ok(first) = requests.recv() {
            writer.log.hooks.before_batch();
            writer.batch.push(first);
            writer.batch.extend(requests.try_iter());
            writer.process_batch();
        }
        writer.sync_at_exit();
    }
}

impl Loop {
    fn unsynced(&self) -> bool {
        self.log.file_len != self.synced_len
    }

    fn process_batch(&mut self) {
        let mut batch = std::mem::take(&mut self.batch);
        if let Some(failure) = self.log.shared.poison.get().cloned() {
            for request in batch.drain(..) {
                reply_poisoned(request, &failure);
            }
            self.batch = batch;
            return;
        }
        self.buf.clear();
        let mut forced = false;
        let mut records = 0;
        for request in batch.drain(..) {
            let (record, waiter) = self.stage(request);
            if let Some(record) = record {
                record.encode(&mut self.buf);
                // Cannot conflict: only a header can, and `stage` already checked it.
                let _ = self.log.state.apply(record);
                records += 1;
            }
            if let Some(waiter) = waiter {
                forced = true;
                self.waiters.push(waiter);
            }
        }
        self.batch = batch;
        let started = Instant::now();
        let synced_before = self.synced_len;
        if let Err(failure) = self.append_and_sync(forced) {
            self.poison(failure);
            return;
        }
        if let Some(observer) = &self.log.on_batch {
            observer(BatchWritten {
                records,
                synced: self.synced_len != synced_before,
                duration: started.elapsed(),
            });
        }
        // Counted before the waiters wake, so that `stats()` after an acknowledged append includes it.
        Shared::count(&self.log.shared.records_appended, records);
        Shared::count(&self.log.shared.batches, 1);
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(Ok(()));
        }
        self.maybe_compact();
    }

    /// The record a request appends (if any) and the waiter to wake once it is durable (if forced).
    fn stage(&self, request: Request) -> (Option<Record>, Option<Waiter>) {
        match request {
            Request::Header { coordinator_id, done } => match self.log.state.header_needed(&coordinator_id) {
                Ok(true) => {
                    let header = Record::Header {
                        coordinator_id,
                        format_version: FORMAT_VERSION,
                    };
                    (Some(header), Some(done))
                }
                Ok(false) => (None, Some(done)),
                Err(conflict) => {
                    let _ = done.send(Err(LogError::ConflictingHeader {
                        logged: conflict.logged,
                        requested: conflict.requested,
                    }));
                    (None, None)
                }
            },
            Request::ReserveTxids { up_to, done } => (Some(Record::TxidsReserved { up_to }), Some(done)),
            Request::Commit { record, done } => (Some(Record::Commit(record)), Some(done)),
            Request::Heuristic { record, done } => (Some(Record::Heuristic(record)), Some(done)),
            Request::PreCommit { record, done } => (Some(Record::PreCommit(record)), Some(done)),
            Request::Incarnation { number, done } => (Some(Record::Incarnation { number }), Some(done)),
            // An end for a txid the log does not hold would only take space until the next compaction.
            Request::End { txid } if self.log.state.is_unfinished(txid) => (Some(Record::End { txid }), None),
            Request::End { .. } => (None, None),
            Request::Flush { done } => (None, Some(done)),
        }
    }

    fn append_and_sync(&mut self, forced: bool) -> Result<(), WriteFailure> {
        let path = &self.log.paths.log;
        if !self.buf.is_empty() {
            self.log
                .file
                .write_all(&self.buf)
                .map_err(|source| WriteFailure {
                    action: "appending to",
                    path: path.clone(),
                    source,
                })?;
            let len = self.buf.len() as u64;
            self.log.file_len += len;
            Shared::count(&self.log.shared.bytes_written, len);
        }
        if forced && self.unsynced() {
            let at = FsyncAt {
                durable_len: self.synced_len,
                file_len: self.log.file_len,
            };
            self.log
                .hooks
                .before_fsync(at)
                .and_then(|()| self.log.file.sync_data())
                .map_err(|source| WriteFailure {
                    action: "fdatasync of",
                    path: path.clone(),
                    source,
                })?;
            self.synced_len = self.log.file_len;
            Shared::count(&self.log.shared.fsyncs, 1);
        }
        Ok(())
    }

    /// Never retried: after a failed fsync the dirty pages may be gone while the next fsync succeeds.
    fn poison(&mut self, failure: WriteFailure) {
        tracing::error!(
            "decision log poisoned: {failure}; refusing every further write, restart the coordinator"
        );
        let failure = Arc::new(failure);
        let failure = self.log.shared.poison.get_or_init(|| failure).clone();
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(Err(LogError::Poisoned(failure.clone())));
        }
    }

    fn maybe_compact(&mut self) {
        if self.log.file_len <= self.compact_at {
            return;
        }
        let log = &self.log;
        match write_compacted(&log.paths, &log.state, &mut self.buf, &log.hooks) {
            Ok((file, len)) => {
                tracing::debug!(
                    before_bytes = log.file_len,
                    after_bytes = len,
                    unfinished = log.state.unfinished_count(),
                    "decision log compacted"
                );
                self.log.file = file;
                self.log.file_len = len;
                self.synced_len = len;
                // Twice the live size: a large live set must not make every batch compact.
                self.compact_at = self.log.compact_after_bytes.max(len.saturating_mul(2));
                Shared::count(&self.log.shared.compactions, 1);
                Shared::count(&self.log.shared.bytes_written, len);
            }
            Err(CompactionFailure {
                renamed: false,
                failure,
            }) => {
                tracing::warn!(
                    "decision log compaction failed, the log is intact and keeps growing: {failure}; \
                     check free space in {}",
                    log.paths.dir.display()
                );
                self.compact_at = log.file_len.saturating_add(log.compact_after_bytes);
            }
            Err(CompactionFailure {
                renamed: true,
                failure,
            }) => self.poison(failure),
        }
    }

    /// Lazy end records still in the page cache: sync them when the last handle goes, best effort.
    fn sync_at_exit(&mut self) {
        if !self.unsynced() || self.log.shared.poison.get().is_some() {
            return;
        }
        match self.log.file.sync_data() {
            Ok(()) => Shared::count(&self.log.shared.fsyncs, 1),
            Err(e) => tracing::warn!(
                "fdatasync of {} at close failed: {e}; unsynced end records are re-driven after restart",
                self.log.paths.log.display()
            ),
        }
    }
}

fn reply_poisoned(request: Request, failure: &Arc<WriteFailure>) {
    let done = match request {
        Request::Header { done, .. }
        | Request::ReserveTxids { done, .. }
        | Request::Commit { done, .. }
        | Request::Heuristic { done, .. }
        | Request::PreCommit { done, .. }
        | Request::Incarnation { done, .. }
        | Request::Flush { done } => done,
        Request::End { .. } => return,
    };
    let _ = done.send(Err(LogError::Poisoned(failure.clone())));
}
