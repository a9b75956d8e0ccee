//! The errors the decision log returns, each saying what went wrong and what to do about it.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

/// A write or fsync of the log that failed; it poisons the log for good.
#[derive(Debug, thiserror::Error)]
#[error("{action} {path} failed: {source}")]
pub struct WriteFailure {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{action} {path}: {source}; check the disk, free space and permissions of the data directory")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An earlier write or fsync failed. After a failed fsync the kernel may have dropped the dirty pages,
    /// so retrying could report durability that does not exist ("fsyncgate").
    #[error(
        "the decision log refuses writes because an earlier write failed ({0}); what is on disk is \
         unknown, so restart the coordinator to recover from what is durable"
    )]
    Poisoned(Arc<WriteFailure>),
    #[error("the decision log writer has stopped; restart the coordinator")]
    Closed,
    #[error(
        "{path} is locked by another open decision log (another coordinator on this data directory?); \
         stop it, or give this coordinator its own data directory"
    )]
    Locked { path: PathBuf },
    #[error(
        "{path} has format version {found} but this build reads version {supported}; \
         run the Treaty version that wrote it"
    )]
    UnsupportedVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "{path} holds a record of unknown type {type_tag} (with a valid checksum) at offset {offset}: \
         it was written by a newer Treaty; run that version"
    )]
    UnknownRecordType {
        path: PathBuf,
        offset: u64,
        type_tag: u8,
    },
    #[error(
        "the decision log belongs to coordinator {logged:?}, refusing to relabel it {requested:?}; \
         point this coordinator at its own data directory"
    )]
    ConflictingHeader { logged: String, requested: String },
    #[error(
        "a {what} record would take {bytes} bytes, over the {limit}-byte limit of one log record; \
         use fewer or shorter participant names and ids"
    )]
    RecordTooLarge {
        what: &'static str,
        bytes: usize,
        limit: u32,
    },
}

impl LogError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> LogError {
        LogError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
