//! The decision log's failpoint: a crash before an fsync that also loses what the OS had not yet
//! written to disk, as a power cut would. A plain `kill -9` cannot show this (the page cache
//! survives it), yet it is exactly the case the "acknowledge only after fsync" rule exists for.
//!
//! It works through the log writer thread's `before_fsync` hook, which is told how much of
//! `decisions.log` is already durable. When the failpoint fires it truncates the file back to that
//! length and aborts. With no failpoint armed the hook costs one atomic load per fsync: no file
//! system call and no lock on the group-commit path.

use std::path::Path;

use treaty_decision_log::{FsyncAt, TestHooks};

use crate::failpoints::{self, Fired, LOG_LOSES_UNSYNCED_TAIL};

/// The writer-thread hooks that implement `log::loses-unsynced-tail` for the log in `dir`.
pub fn hooks(dir: &Path) -> TestHooks {
    let log = dir.join("decisions.log");
    TestHooks {
        before_fsync: Some(Box::new(move |at| {
            before_fsync(&log, at);
            Ok(())
        })),
        ..TestHooks::default()
    }
}

fn before_fsync(log: &Path, at: FsyncAt) {
    if !failpoints::armed(LOG_LOSES_UNSYNCED_TAIL)
        || failpoints::hit(LOG_LOSES_UNSYNCED_TAIL) != Some(Fired::On)
    {
        return;
    }
    // Best effort: if the truncate fails the crash still happens, losing nothing, which is the
    // weaker (still correct) scenario.
    let result = std::fs::OpenOptions::new()
        .write(true)
        .open(log)
        .and_then(|f| f.set_len(at.durable_len).and_then(|()| f.sync_all()));
    tracing::warn!(
        target: "treaty::failpoint",
        from = at.file_len,
        to = at.durable_len,
        ?result,
        "decisions.log lost its unsynced tail; crashing before the fsync"
    );
    std::process::abort();
}
