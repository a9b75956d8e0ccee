//! Operating-system odds and ends: which user we are and which user runs PostgreSQL, where the
//! Treaty binaries are and whether they have failpoints, and reading the end of a log file.
//! Loopback ports are `ports.rs`'s; [`free_loopback_port`] is re-exported here for the callers
//! that know it by this path.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::HarnessError;
pub use crate::ports::free_loopback_port;

/// Where the Treaty binary `name` is: `$TREATY_BIN_DIR`, else beside the running executable, else
/// one level up (a test binary lives in `target/<profile>/deps`).
pub fn binary_path(name: &str) -> Result<PathBuf, HarnessError> {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("TREATY_BIN_DIR") {
        candidates.push(PathBuf::from(dir));
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        candidates.push(dir.to_path_buf());
        if let Some(up) = dir.parent() {
            candidates.push(up.to_path_buf());
        }
    }
    for dir in &candidates {
        let path = dir.join(name);
        if path.is_file() {
            return Ok(path);
        }
    }
    Err(HarnessError::BinaryNotFound {
        name: name.into(),
        looked: candidates
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// The mark a service binary's `--version` carries when it was built with failpoints.
pub const FAILPOINTS_MARK: &str = "(failpoints)";

/// Whether the Treaty service binary at `binary` was built with failpoints: runs
/// `<binary> --version` and looks for `(failpoints)`.
pub fn failpoints_built_in(binary: &Path) -> Result<bool, HarnessError> {
    let command = format!("{} --version", binary.display());
    let output = std::process::Command::new(binary)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(HarnessError::io(format!("running {command}")))?;
    if !output.status.success() {
        return Err(HarnessError::Command {
            command,
            status: output.status.to_string(),
            output: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).contains(FAILPOINTS_MARK))
}

/// The lab tooling's check (scenarios, chaos, the demo arm failpoints): `treaty-coordinator` and
/// `treaty-participant`, as [`binary_path`] finds them, must both have been built with failpoints.
/// The error names the binaries without and says how to build the ones with.
pub fn require_failpoints() -> Result<(), HarnessError> {
    let mut without = Vec::new();
    for name in ["treaty-coordinator", "treaty-participant"] {
        let path = binary_path(name)?;
        if !failpoints_built_in(&path)? {
            without.push(path.display().to_string());
        }
    }
    if without.is_empty() {
        Ok(())
    } else {
        Err(HarnessError::NoFailpoints {
            binaries: without.join(", "),
        })
    }
}

/// The effective uid of this process (the owner of `/proc/self`), without unsafe code.
pub(crate) fn effective_uid() -> u32 {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX)
}

/// The OS user PostgreSQL runs as when we are root.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

/// `None` when we are not root (PostgreSQL runs as us); else the unprivileged user to run it as
/// (`$TREATY_PG_USER`, default `postgres`), from `/etc/passwd`.
pub(crate) fn postgres_run_as() -> Result<Option<RunAs>, HarnessError> {
    if effective_uid() != 0 {
        return Ok(None);
    }
    let user = std::env::var("TREATY_PG_USER").unwrap_or_else(|_| "postgres".into());
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(HarnessError::io("reading /etc/passwd"))?;
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() >= 4 && fields[0] == user {
            let uid = fields[2].parse().ok();
            let gid = fields[3].parse().ok();
            if let (Some(uid), Some(gid)) = (uid, gid) {
                return Ok(Some(RunAs { uid, gid }));
            }
        }
    }
    Err(HarnessError::NoPostgresUser(user))
}

/// Whether a user other than the owner can reach entries below `dir` (every ancestor has `o+x`).
pub(crate) fn traversable_by_others(dir: &Path) -> bool {
    dir.ancestors().all(|d| {
        std::fs::metadata(d)
            .map(|m| m.permissions().mode() & 0o001 != 0)
            .unwrap_or(false)
    })
}

/// Changes the owner of `path` (and everything below it) with `chown -R`.
pub(crate) fn chown_recursive(path: &Path, run_as: RunAs) -> Result<(), HarnessError> {
    std::os::unix::fs::chown(path, Some(run_as.uid), Some(run_as.gid))
        .map_err(HarnessError::io(format!("chown {}", path.display())))?;
    let output = std::process::Command::new("chown")
        .arg("-R")
        .arg(format!("{}:{}", run_as.uid, run_as.gid))
        .arg(path)
        .output()
        .map_err(HarnessError::io("running chown"))?;
    if !output.status.success() {
        return Err(HarnessError::Command {
            command: format!("chown -R {}", path.display()),
            status: output.status.to_string(),
            output: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(())
}

/// The last `lines` lines of a text file (empty if it cannot be read).
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A stand-in for a service binary: a script whose `--version` prints `version` and exits with
    /// `status`.
    fn fake_binary(dir: &Path, name: &str, version: &str, status: u8) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(
            &path,
            format!("#!/bin/sh\necho '{name} {version}'\necho 'a note' >&2\nexit {status}\n"),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// One test, so that no other test of this process forks while a script is open for writing
    /// (`ETXTBSY`).
    #[test]
    fn the_version_line_says_whether_a_binary_has_failpoints() {
        let dir = tempfile::tempdir().unwrap();
        let with = fake_binary(dir.path(), "with", "0.1.0 (failpoints)", 0);
        let without = fake_binary(dir.path(), "without", "0.1.0", 0);
        let broken = fake_binary(dir.path(), "broken", "0.1.0 (failpoints)", 3);
        assert!(failpoints_built_in(&with).unwrap());
        assert!(!failpoints_built_in(&without).unwrap());
        let error = failpoints_built_in(&broken).unwrap_err().to_string();
        assert!(error.contains("--version") && error.contains("a note"), "{error}");
        let error = failpoints_built_in(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("missing --version"), "{error}");
    }

    #[test]
    fn the_refusal_says_how_to_build_the_fault_injection_binaries() {
        let message = HarnessError::NoFailpoints {
            binaries: "target/release/treaty-participant".into(),
        }
        .to_string();
        assert!(message.contains("target/release/treaty-participant"), "{message}");
        assert!(message.contains("cargo build-fi"), "{message}");
        assert!(
            message.contains("--features treaty-coordinator/failpoints,treaty-participant/failpoints"),
            "{message}"
        );
    }
}
