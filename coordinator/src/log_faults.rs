//! The decision log's failpoint: a crash before an fsync that also loses what the OS had not yet
//! written to disk, as a power cut would. A plain `kill -9` cannot show this (the page cache
//! survives it), yet it is exactly the case the "acknowledge only after fsync" rule exists for.
//!
//! It works through the log's writer-thread hooks: before each fsync of appended records the hook
//! knows every earlier batch is durable, so the file length it saw last time is the synced length.
//! When the failpoint fires it truncates `decisions.log` back to that length and aborts.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use treaty_decision_log::{CompactionStep, TestHooks};

use crate::failpoints::{self, Fired, LOG_LOSES_UNSYNCED_TAIL};

/// The length of `decisions.log` known to be on disk.
#[derive(Clone)]
pub struct SyncedLength {
    log: PathBuf,
    synced: Arc<Mutex<Option<u64>>>,
}

impl SyncedLength {
    pub fn new(dir: &Path) -> SyncedLength {
        SyncedLength {
            log: dir.join("decisions.log"),
            synced: Arc::new(Mutex::new(None)),
        }
    }

    /// Call once the log is open: what replay read is on disk.
    pub fn opened(&self) {
        self.record_current();
    }

    fn record_current(&self) {
        let len = std::fs::metadata(&self.log).map(|m| m.len()).ok();
        if let Ok(mut synced) = self.synced.lock() {
            *synced = len;
        }
    }

    fn before_fsync(&self) {
        if !failpoints::armed(LOG_LOSES_UNSYNCED_TAIL) {
            // Not armed: still track the length, so that arming later truncates correctly.
            self.record_current();
            return;
        }
        let current = std::fs::metadata(&self.log).map(|m| m.len()).ok();
        if failpoints::hit(LOG_LOSES_UNSYNCED_TAIL) == Some(Fired::On) {
            let synced = self.synced.lock().ok().and_then(|s| *s);
            if let Some(synced) = synced {
                // Best effort: if the truncate fails the crash still happens, losing nothing,
                // which is the weaker (still correct) scenario.
                let result = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&self.log)
                    .and_then(|f| f.set_len(synced).and_then(|()| f.sync_all()));
                tracing::warn!(
                    target: "treaty::failpoint",
                    from = current.unwrap_or(0),
                    to = synced,
                    ?result,
                    "decisions.log lost its unsynced tail; crashing before the fsync"
                );
            }
            std::process::abort();
        }
        if let Ok(mut synced) = self.synced.lock() {
            *synced = current;
        }
    }

    /// The writer-thread hooks that implement the failpoint.
    pub fn hooks(&self) -> TestHooks {
        let fsync = self.clone();
        let compaction = self.clone();
        TestHooks {
            before_fsync: Some(Box::new(move || {
                fsync.before_fsync();
                Ok(())
            })),
            after_compaction_step: Some(Box::new(move |step| {
                // A compaction replaces the file; its new length is durable once the directory is.
                if step == CompactionStep::DirectorySynced {
                    compaction.record_current();
                }
            })),
            ..TestHooks::default()
        }
    }
}
