//! Operating-system odds and ends: free loopback ports, which user we are and which user runs
//! PostgreSQL, where the Treaty binaries are, and reading the end of a log file.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::HarnessError;

/// A TCP port on 127.0.0.1 that was free a moment ago, chosen **below the kernel's ephemeral
/// range**. A port from that range (what binding port 0 hands out) can be taken, between our
/// check and the service's own bind, by any outgoing connection or proxy listener on the machine:
/// under a parallel test run that happened often enough to fail starts with EADDRINUSE. Below
/// the range only another explicit bind can collide, and the random pick makes that rare.
pub fn free_loopback_port() -> Result<u16, HarnessError> {
    let (low, _) = ephemeral_range();
    let first = 10_000u32;
    let span = u32::from(low).saturating_sub(first).max(1);
    let mut seed = random_seed();
    for _ in 0..64 {
        // xorshift: enough to spread concurrent callers over the span.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let port = (first + (seed % u64::from(span)) as u32) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    // Everything we tried was taken: fall back to whatever the kernel hands out.
    let listener =
        std::net::TcpListener::bind(("127.0.0.1", 0)).map_err(HarnessError::io("binding 127.0.0.1:0"))?;
    let port = listener
        .local_addr()
        .map_err(HarnessError::io("reading a bound address"))?
        .port();
    Ok(port)
}

/// The kernel's ephemeral port range (`net.ipv4.ip_local_port_range`), Linux's default if unreadable.
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut parts = text.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((parts.next()??, parts.next()??))
        })
        .filter(|(low, _)| *low > 11_000)
        .unwrap_or((32_768, 60_999))
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    if let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        hasher.write_u128(now.as_nanos());
    }
    hasher.finish() | 1
}

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
