//! Test-only hooks into the writer thread: pausing it so requests queue into one batch, injecting fsync
//! failures, and observing (or stopping in) each step of a compaction. Production code passes
//! `TestHooks::default()`, which costs one `Option` check per batch, fsync and compaction step.

use std::fmt;
use std::io;

/// The steps of a compaction, in order; the rename is the commit point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompactionStep {
    /// `decisions.log.compact` is written but not synced.
    TempWritten,
    /// ... and fdatasynced.
    TempSynced,
    /// ... and renamed over `decisions.log`.
    Renamed,
    /// ... and the directory is fsynced: compaction is complete.
    DirectorySynced,
}

type Hook<T> = Option<Box<dyn Fn() -> T + Send + Sync>>;

/// Where the log stands when an fsync of appended records is about to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsyncAt {
    /// Bytes of `decisions.log` known durable: everything up to the previous fsync (or what the
    /// log was opened or compacted with).
    pub durable_len: u64,
    /// Bytes written so far, the ones this fsync makes durable included.
    pub file_len: u64,
}

#[derive(Default)]
pub struct TestHooks {
    /// Runs on the writer thread after it received the first request of a batch, before it drains the
    /// rest: a hook that blocks makes every request sent meanwhile part of one batch.
    pub before_batch: Hook<()>,
    /// Runs before each fdatasync of appended records; an error is treated as the fsync's.
    pub before_fsync: Option<Box<dyn Fn(FsyncAt) -> io::Result<()> + Send + Sync>>,
    /// Runs after each step of a compaction (including the one that repairs a damaged log on open).
    pub after_compaction_step: Option<Box<dyn Fn(CompactionStep) + Send + Sync>>,
}

impl TestHooks {
    pub(crate) fn before_batch(&self) {
        if let Some(hook) = &self.before_batch {
            hook();
        }
    }

    pub(crate) fn before_fsync(&self, at: FsyncAt) -> io::Result<()> {
        match &self.before_fsync {
            Some(hook) => hook(at),
            None => Ok(()),
        }
    }

    pub(crate) fn compaction_step(&self, step: CompactionStep) {
        if let Some(hook) = &self.after_compaction_step {
            hook(step);
        }
    }
}

impl fmt::Debug for TestHooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestHooks")
            .field("before_batch", &self.before_batch.is_some())
            .field("before_fsync", &self.before_fsync.is_some())
            .field("after_compaction_step", &self.after_compaction_step.is_some())
            .finish()
    }
}
