//! [`DecisionLog`], the cloneable handle: opening (lock, replay, repair, start the writer) and the
//! append calls, which send requests to the writer thread and await its answer.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use crate::files::{self, LogPaths};
use crate::hooks::TestHooks;
use crate::record::{FORMAT_VERSION, Record};
use crate::replay;
use crate::writer::{Request, Shared, Waiter, Writer};
use crate::{CommitRecord, HeuristicRecord, LogError, LogOptions, LogStats, PreCommitRecord, Replay};

/// The coordinator's decision log. Clones share one writer thread; when the last clone is dropped the
/// writer finishes what was queued, syncs, and is joined (so the drop may block briefly).
#[derive(Clone)]
pub struct DecisionLog {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` only while dropping, so that the writer sees the channel close before it is joined.
    sender: Option<Sender<Request>>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    /// The number `new_incarnation` hands out next: above every incarnation the log may have held.
    next_incarnation: AtomicU64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        drop(self.sender.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the decision log writer thread panicked; restart the coordinator");
        }
    }
}

impl DecisionLog {
    /// Opens (creating if absent) `dir/decisions.log`, replays it, repairs damage, starts the writer thread.
    /// Blocking: callers run it before serving or in spawn_blocking.
    pub fn open(dir: &Path, options: LogOptions) -> Result<(DecisionLog, Replay), LogError> {
        Self::open_with_hooks(dir, options, TestHooks::default())
    }

    #[doc(hidden)]
    pub fn open_with_hooks(
        dir: &Path,
        options: LogOptions,
        hooks: TestHooks,
    ) -> Result<(DecisionLog, Replay), LogError> {
        std::fs::create_dir_all(dir).map_err(|e| LogError::io("creating directory", dir, e))?;
        let paths = LogPaths::new(dir);
        let lock = files::lock_directory(&paths)?;
        files::remove_stale_compact(&paths)?;
        let bytes = files::read_log(&paths)?;
        let scan = replay::scan(&bytes, &paths.log)?;
        let (file, file_len, preserved) = if scan.damage.is_empty() {
            let (file, len) = files::open_for_append(&paths)?;
            (file, len, None)
        } else {
            let preserved = files::preserve_damaged(&paths, &bytes)?;
            let (file, len) =
                files::write_compacted(&paths, &scan.state, &mut Vec::new(), &hooks).map_err(|failed| {
                    LogError::io(failed.failure.action, failed.failure.path, failed.failure.source)
                })?;
            tracing::warn!(
                damaged_copy = %preserved.display(),
                regions = scan.damage.len(),
                "decision log repaired: rewrote {} without the damaged regions",
                paths.log.display()
            );
            (file, len, Some(preserved))
        };
        drop(bytes);
        // A damaged region may have held incarnation records (21 bytes each): skip past every
        // number it could have held, so that none is handed out twice.
        let damaged_bytes: u64 = scan.damage.iter().map(|d| d.length).sum();
        let next_incarnation = scan
            .state
            .incarnation
            .saturating_add(1)
            .saturating_add(damaged_bytes);
        let replay = Replay {
            coordinator_id: scan.state.coordinator_id.clone(),
            txids_reserved_up_to: scan.state.txids_reserved_up_to,
            unfinished: scan.state.unfinished_records(),
            heuristics: scan.state.heuristic_records(),
            pre_committed: scan.state.pre_commit_records(),
            incarnation: scan.state.incarnation,
            damage: scan.damage,
            records: scan.records,
            preserved_damaged_file: preserved,
        };
        let shared = Arc::new(Shared::default());
        let writer = Writer {
            paths: paths.clone(),
            file,
            file_len,
            compact_after_bytes: options.compact_after_bytes,
            on_batch: options.on_batch,
            state: scan.state,
            shared: shared.clone(),
            hooks,
            _lock: lock,
        };
        let (sender, receiver) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("decision-log-writer".into())
            .spawn(move || writer.run(receiver))
            .map_err(|e| LogError::io("starting the writer thread for", &paths.log, e))?;
        let inner = Inner {
            sender: Some(sender),
            thread: Some(thread),
            shared,
            next_incarnation: AtomicU64::new(next_incarnation),
        };
        let log = DecisionLog {
            inner: Arc::new(inner),
        };
        Ok((log, replay))
    }

    /// Records which coordinator owns this log. Forced. Writing the id the log already holds is a no-op;
    /// another id is [`LogError::ConflictingHeader`].
    pub async fn write_header(&self, coordinator_id: &str) -> Result<(), LogError> {
        Record::Header {
            coordinator_id: coordinator_id.to_owned(),
            format_version: FORMAT_VERSION,
        }
        .check_size()?;
        let coordinator_id = coordinator_id.to_owned();
        self.forced(|done| Request::Header { coordinator_id, done }).await
    }

    /// Records that txids up to `up_to` may be handed out, so a restart never reuses one. Forced.
    pub async fn reserve_txids(&self, up_to: u64) -> Result<(), LogError> {
        self.forced(|done| Request::ReserveTxids { up_to, done }).await
    }

    /// Records a commit decision; returns only after an fdatasync covering it.
    pub async fn commit(&self, record: CommitRecord) -> Result<(), LogError> {
        let record = Record::Commit(record);
        record.check_size()?;
        let Record::Commit(record) = record else {
            unreachable!("constructed as a commit just above")
        };
        self.forced(|done| Request::Commit { record, done }).await
    }

    /// Records an operator's heuristic decision; returns only after an fdatasync covering it. A
    /// heuristic commit is a commit decision: replay re-drives it until `end(txid)`.
    pub async fn heuristic(&self, record: HeuristicRecord) -> Result<(), LogError> {
        let record = Record::Heuristic(record);
        record.check_size()?;
        let Record::Heuristic(record) = record else {
            unreachable!("constructed as a heuristic just above")
        };
        self.forced(|done| Request::Heuristic { record, done }).await
    }

    /// 3PC: records that the transaction enters pre-commit with these participants; returns only
    /// after an fdatasync covering it (group-committed like `commit`). Replay hands it back in
    /// [`Replay::pre_committed`] until a commit or end record for the txid supersedes it.
    pub async fn pre_commit(&self, record: PreCommitRecord) -> Result<(), LogError> {
        let record = Record::PreCommit(record);
        record.check_size()?;
        let Record::PreCommit(record) = record else {
            unreachable!("constructed as a pre-commit just above")
        };
        self.forced(|done| Request::PreCommit { record, done }).await
    }

    /// Starts a new incarnation of the coordinator: forces a record with a number above every
    /// incarnation this log has held (and above any a damaged region may have held), and returns it
    /// once durable. Every call returns a higher number; the coordinator calls it once per start and
    /// puts the number in its 3PC ballots.
    pub async fn new_incarnation(&self) -> Result<u64, LogError> {
        let number = self.inner.next_incarnation.fetch_add(1, Ordering::AcqRel);
        self.forced(|done| Request::Incarnation { number, done }).await?;
        Ok(number)
    }

    /// Records that `txid` is finished everywhere. Lazy: queued for the next batch, never waits. If it is
    /// lost (crash, stopped writer), recovery re-drives the commit (or re-learns a 3PC pre-commit's
    /// outcome), which participants answer idempotently.
    pub fn end(&self, txid: u64) {
        if self.inner.shared.poison.get().is_some() {
            tracing::debug!(txid, "end record dropped: the decision log is poisoned");
            return;
        }
        if let Err(e) = self.send(Request::End { txid }) {
            tracing::warn!(
                txid,
                "end record dropped ({e}); recovery will re-drive this commit"
            );
        }
    }

    pub fn stats(&self) -> LogStats {
        self.inner.shared.stats()
    }

    /// Forces everything queued so far (used at graceful shutdown).
    pub async fn flush(&self) -> Result<(), LogError> {
        self.forced(|done| Request::Flush { done }).await
    }

    /// How many requests were handed to the writer; tests wait on it to know a batch is queued.
    #[doc(hidden)]
    pub fn requests_sent(&self) -> u64 {
        self.inner.shared.requests_sent.load(Ordering::Acquire)
    }

    async fn forced(&self, request: impl FnOnce(Waiter) -> Request) -> Result<(), LogError> {
        check_poison(&self.inner.shared.poison)?;
        let (done, answer) = oneshot::channel();
        self.send(request(done))?;
        answer.await.map_err(|_| LogError::Closed)?
    }

    fn send(&self, request: Request) -> Result<(), LogError> {
        let sender = self.inner.sender.as_ref().ok_or(LogError::Closed)?;
        sender.send(request).map_err(|_| LogError::Closed)?;
        self.inner.shared.requests_sent.fetch_add(1, Ordering::Release);
        Ok(())
    }
}

fn check_poison(poison: &OnceLock<Arc<crate::WriteFailure>>) -> Result<(), LogError> {
    match poison.get() {
        Some(failure) => Err(LogError::Poisoned(failure.clone())),
        None => Ok(()),
    }
}
