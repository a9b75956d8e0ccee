//! The files of a log directory: their names, the lock that keeps a second writer out, compacted rewrites
//! (write, fdatasync, rename, directory fsync) and the preserved copy of a damaged log.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{LogError, WriteFailure};
use crate::hooks::{CompactionStep, TestHooks};
use crate::state::LiveState;

pub(crate) const LOG_FILE: &str = "decisions.log";

#[derive(Debug, Clone)]
pub(crate) struct LogPaths {
    pub(crate) dir: PathBuf,
    pub(crate) log: PathBuf,
    pub(crate) compact: PathBuf,
    pub(crate) lock: PathBuf,
}

impl LogPaths {
    pub(crate) fn new(dir: &Path) -> LogPaths {
        LogPaths {
            dir: dir.to_owned(),
            log: dir.join(LOG_FILE),
            compact: dir.join("decisions.log.compact"),
            lock: dir.join("decisions.lock"),
        }
    }
}

/// Takes an exclusive lock on `decisions.lock`, held as long as the returned file is open, so two
/// coordinators can never append to one log. The kernel drops it when the process dies.
pub(crate) fn lock_directory(paths: &LogPaths) -> Result<File, LogError> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&paths.lock)
        .map_err(|e| LogError::io("opening lock file", &paths.lock, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(LogError::Locked {
            path: paths.lock.clone(),
        }),
        Err(TryLockError::Error(e)) => Err(LogError::io("locking", &paths.lock, e)),
    }
}

/// Makes creations and renames in `dir` durable.
pub(crate) fn sync_directory(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A `.compact` file left by a crash before its rename: the old log is complete, this one may not be.
pub(crate) fn remove_stale_compact(paths: &LogPaths) -> Result<(), LogError> {
    match fs::remove_file(&paths.compact) {
        Ok(()) => {
            tracing::info!(path = %paths.compact.display(), "removed a compaction left unfinished by a crash");
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LogError::io("removing stale compaction file", &paths.compact, e)),
    }
}

/// Reads the whole log (empty if absent). The log is bounded by compaction, so it fits in memory.
pub(crate) fn read_log(paths: &LogPaths) -> Result<Vec<u8>, LogError> {
    match fs::read(&paths.log) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(LogError::io("reading", &paths.log, e)),
    }
}

/// Opens the (clean) log for appending at its end, creating it durably if absent.
pub(crate) fn open_for_append(paths: &LogPaths) -> Result<(File, u64), LogError> {
    let existed = paths.log.exists();
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&paths.log)
        .map_err(|e| LogError::io("opening", &paths.log, e))?;
    let len = file
        .seek(SeekFrom::End(0))
        .map_err(|e| LogError::io("seeking to the end of", &paths.log, e))?;
    if !existed {
        sync_directory(&paths.dir).map_err(|e| LogError::io("syncing directory", &paths.dir, e))?;
    }
    Ok((file, len))
}

/// Copies the damaged original aside (synced) before repair overwrites it, for a post-mortem.
pub(crate) fn preserve_damaged(paths: &LogPaths, bytes: &[u8]) -> Result<PathBuf, LogError> {
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let mut attempt = 0u32;
    loop {
        let name = match attempt {
            0 => format!("{LOG_FILE}.damaged-{unix_ms}"),
            n => format!("{LOG_FILE}.damaged-{unix_ms}-{n}"),
        };
        let path = paths.dir.join(name);
        let mut file = match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 1000 => {
                attempt += 1;
                continue;
            }
            Err(e) => return Err(LogError::io("creating", &path, e)),
        };
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| LogError::io("writing the copy of a damaged log to", &path, e))?;
        return Ok(path);
    }
}

/// A compaction that failed: before its rename the old log is intact; from the rename on, which file
/// the directory holds after a crash is unknown, so the log must stop.
#[derive(Debug)]
pub(crate) struct CompactionFailure {
    pub(crate) renamed: bool,
    pub(crate) failure: WriteFailure,
}

/// Rewrites the log as exactly `state`, returning the new file (positioned at its end) and its length.
/// `buf` is the caller's reusable buffer.
pub(crate) fn write_compacted(
    paths: &LogPaths,
    state: &LiveState,
    buf: &mut Vec<u8>,
    hooks: &TestHooks,
) -> Result<(File, u64), CompactionFailure> {
    let before_rename = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| CompactionFailure {
            renamed: false,
            failure: WriteFailure { action, path, source },
        }
    };
    buf.clear();
    state.encode_compacted(buf);
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&paths.compact)
            .map_err(before_rename("creating", &paths.compact))?;
        file.write_all(buf)
            .map_err(before_rename("writing", &paths.compact))?;
        hooks.compaction_step(CompactionStep::TempWritten);
        file.sync_data()
            .map_err(before_rename("fdatasync of", &paths.compact))?;
        hooks.compaction_step(CompactionStep::TempSynced);
        Ok(file)
    })();
    let file = match written {
        Ok(file) => file,
        Err(failure) => {
            let _ = fs::remove_file(&paths.compact);
            return Err(failure);
        }
    };
    let after_rename = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| CompactionFailure {
            renamed: true,
            failure: WriteFailure { action, path, source },
        }
    };
    fs::rename(&paths.compact, &paths.log).map_err(after_rename("renaming compaction over", &paths.log))?;
    hooks.compaction_step(CompactionStep::Renamed);
    sync_directory(&paths.dir).map_err(after_rename("syncing directory", &paths.dir))?;
    hooks.compaction_step(CompactionStep::DirectorySynced);
    Ok((file, buf.len() as u64))
}
