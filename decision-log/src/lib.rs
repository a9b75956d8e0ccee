//! The coordinator's durable decision log for two-phase commit with presumed abort, and for
//! three-phase commit.
//!
//! Only commit decisions (and, in 3PC, pre-commit records) are forced to disk; end records are
//! lazy; aborts are never logged (a transaction the log does not hold a commit or pre-commit record
//! for is aborted). The log is the source of truth for recovery.
//!
//! # On-disk format
//!
//! The live file is `<dir>/decisions.log`: a sequence of records, each framed as
//!
//! ```text
//! offset  size  field
//! 0       4     magic   = 0x4C44_5254 (the bytes "TRDL"), u32 little-endian
//! 4       4     length  = number of body bytes (type + payload), u32 LE, 1..=1 MiB
//! 8       4     crc32   = CRC-32 (IEEE, crc32fast) of the body, u32 LE
//! 12      1     type    = body[0]
//! 13      n     payload = body[1..]
//! ```
//!
//! Payload fields are little-endian; a string is a u32 byte length followed by UTF-8 bytes.
//!
//! | type | record          | payload                                                          |
//! |------|-----------------|------------------------------------------------------------------|
//! | 1    | `Header`        | format version u32 (= 1), coordinator id string                  |
//! | 2    | `TxidsReserved` | up_to u64                                                        |
//! | 3    | `Commit`        | txid u64, decided_at_ms u64, gid string, count u32, participant strings |
//! | 4    | `End`           | txid u64                                                         |
//! | 5    | `Heuristic`     | txid u64, decided_at_ms u64, decision u8 (1 commit, 2 abort), gid string, operator string, reason string, count u32, participant strings |
//! | 6    | `PreCommit`     | txid u64, at_ms u64, gid string, count u32, participant strings  |
//! | 7    | `Incarnation`   | number u64                                                       |
//!
//! A `PreCommit` record (3PC) says that pre-commits may have been sent to these participants: a
//! restarted coordinator must learn the outcome from them instead of presuming abort. A later
//! commit or end record for the same txid supersedes it. An `Incarnation` record is written at every
//! coordinator start ([`DecisionLog::new_incarnation`]); the coordinator's 3PC ballots carry the
//! number, so a restarted coordinator never reuses a ballot of an earlier life.
//!
//! A `Heuristic` record is an operator's decision (`treaty resolve`): who, when, why. A heuristic
//! commit is a commit decision like type 3 (replay re-drives it until its end record); a heuristic
//! abort is kept only so the note survives a restart until the transaction's end record.
//!
//! A record with a valid checksum but an unknown type, or a header with another format version,
//! was written by a newer Treaty: opening fails with an error naming it rather than skipping it.
//!
//! # Durable write path (group commit)
//!
//! 1. An appender sends its request to the writer thread and (if forced) awaits a oneshot.
//! 2. The writer blocks for one request, then drains every other pending request.
//! 3. It encodes the whole batch into one reused buffer and appends it with one `write`.
//! 4. If any request in the batch is forced, it calls `fdatasync` once.
//! 5. Only then is every forced waiter of the batch woken.
//!
//! A failed write or fsync poisons the log: the page cache state after a failed fsync is unknown,
//! so the log never retries and answers every later write with [`LogError::Poisoned`].
//!
//! # Compaction
//!
//! After a batch, when the file exceeds [`LogOptions::compact_after_bytes`], the writer
//!
//! 1. writes `decisions.log.compact` with only the header, the txid reservation, the highest
//!    incarnation, the unfinished commits, the live pre-commit records and the heuristic decisions
//!    of unfinished transactions;
//! 2. `fdatasync`s it;
//! 3. renames it over `decisions.log` (the commit point of compaction);
//! 4. `fsync`s the directory, and appends to the new file from then on.
//!
//! A crash before step 3 leaves the old log (and a stale `.compact`, deleted on open); after it,
//! the new one.
//!
//! # Modules
//!
//! - `record`: the frame and record encoding; `state`: what replay and compaction keep;
//! - `replay`: reading a log image, finding and classifying damage;
//! - `files`: file names, the directory lock, compacted rewrites, preserving damaged files;
//! - `writer`: the writer thread; `handle`: [`DecisionLog`], the public face;
//! - `proptests` (tests only): property tests of replay on arbitrary and on corrupted logs.

mod error;
mod files;
mod handle;
mod hooks;
mod record;
mod replay;
mod state;
mod writer;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::Arc;

pub use error::{LogError, WriteFailure};
pub use handle::DecisionLog;
#[doc(hidden)]
pub use hooks::{CompactionStep, FsyncAt, TestHooks};

/// The largest body (type + payload) of one record; also what replay accepts as a sane length.
pub const MAX_RECORD_BODY_BYTES: u32 = 1 << 20;

/// Tuning for [`DecisionLog::open`].
#[derive(Clone)]
pub struct LogOptions {
    /// Compact the log once the file grows past this many bytes (and past twice its last compacted size,
    /// so that a large live set does not compact after every batch).
    pub compact_after_bytes: u64,
    /// Told about every batch the writer thread wrote (the coordinator's metrics); it runs on that
    /// thread, between the batch's fsync and waking its waiters, so it must be cheap.
    pub on_batch: Option<BatchObserver>,
}

/// See [`LogOptions::on_batch`].
pub type BatchObserver = Arc<dyn Fn(BatchWritten) + Send + Sync>;

/// One group-commit batch, as the writer thread wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchWritten {
    /// Records appended in this one `write`.
    pub records: u64,
    /// Whether it was fdatasynced (some request in it was forced).
    pub synced: bool,
    /// The `write` and the fdatasync together.
    pub duration: std::time::Duration,
}

impl std::fmt::Debug for LogOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogOptions")
            .field("compact_after_bytes", &self.compact_after_bytes)
            .field("on_batch", &self.on_batch.as_ref().map(|_| "set"))
            .finish()
    }
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            compact_after_bytes: 64 * 1024 * 1024,
            on_batch: None,
        }
    }
}

// The record types are the protocol core's (`treaty_commit_protocol::store`): the log stores
// exactly what the core forces.
pub use treaty_commit_protocol::store::{CommitRecord, HeuristicDecision, HeuristicRecord, PreCommitRecord};

/// Whether damage ended the log or was followed by good records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DamageKind {
    /// Nothing valid follows: an interrupted append (or garbage after the last record). Cut.
    TornTail,
    /// A bad region followed by valid records: skipped, and the records after it kept.
    CorruptRecord,
}

/// One damaged region found by replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub kind: DamageKind,
    /// Byte offset of the region in the original file.
    pub offset: u64,
    /// Length of the region in bytes.
    pub length: u64,
    pub detail: String,
}

/// What [`DecisionLog::open`] found in the log.
#[derive(Debug, Clone, Default)]
pub struct Replay {
    /// From the header record; `None` for a new or empty log.
    pub coordinator_id: Option<String>,
    /// Highest `TxidsReserved` seen (0 if none), and at least every txid in a commit record.
    pub txids_reserved_up_to: u64,
    /// Commit records (heuristic commits included) without an end record, in log order.
    pub unfinished: Vec<CommitRecord>,
    /// Heuristic decisions without an end record, in log order.
    pub heuristics: Vec<HeuristicRecord>,
    /// 3PC pre-commit records with neither a commit (or heuristic commit) nor an end record after
    /// them, in log order: their outcome must be learned from the participants.
    pub pre_committed: Vec<PreCommitRecord>,
    /// The highest incarnation logged (0 if none); [`DecisionLog::new_incarnation`] starts the next.
    pub incarnation: u64,
    /// What was found and cut or skipped; empty for a clean log.
    pub damage: Vec<Damage>,
    /// Good records read.
    pub records: u64,
    /// Where the damaged original was copied, if damage was found.
    pub preserved_damaged_file: Option<PathBuf>,
}

/// Counters since open, for metrics and tests.
#[derive(Debug, Clone, Default)]
pub struct LogStats {
    pub records_appended: u64,
    pub fsyncs: u64,
    pub bytes_written: u64,
    pub compactions: u64,
    pub batches: u64,
}
