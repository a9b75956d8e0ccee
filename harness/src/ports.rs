//! Loopback ports for everything the harness starts, reserved across processes.
//!
//! What it owns: choosing the TCP port on 127.0.0.1 of every PostgreSQL server, coordinator,
//! participant and fault proxy the harness starts, and making sure that no two harness users on
//! the machine (test processes, `treaty dev up`, the lab tooling) are ever handed the same port
//! while one of them still owns it.
//!
//! Why a reservation: nextest runs many test processes at once, each starting clusters. Checking
//! that a port is free (bind it, release it) and starting the server that binds it are two steps,
//! seconds apart for PostgreSQL; another process's check could pass in between, both were handed
//! the port, and the loser failed with EADDRINUSE on every retry, since its peers already knew
//! its address. So a port is *reserved* first and checked second, and it stays reserved for as
//! long as its owner lives, so that a crashed service is restarted on its port safely.
//!
//! How:
//! - A reservation is an exclusive `flock` on the file `<temp dir>/treaty-harness-ports/<port>`,
//!   held through an open file by a [`PortReservation`]. The kernel drops the lock when its
//!   holder's process dies, even by SIGKILL: a dead process's reservation is stale at once and
//!   the next process takes it, with no pid to check (the file holds the holder's pid, for a
//!   human wondering who has a port). Two opens of the file exclude each other even within one
//!   process, so threads are covered too.
//! - Releasing unlinks the file *before* closing it (which drops the lock), and a taker checks,
//!   once it holds the lock, that the path still names the file it locked. Otherwise one that
//!   opened the file just before the unlink would lock a file no longer in the directory while
//!   another created a new one, and both would own the port. A stale file (its holder died) is
//!   simply taken over, then removed at its next release.
//! - A port is checked free by binding it only once it is reserved: processes outside the harness
//!   (and a server a finished `treaty dev up` left running) hold no reservations.
//! - Ports are chosen below the kernel's ephemeral range. A port from that range (what binding
//!   port 0 hands out) can be taken by any outgoing connection on the machine, which takes no
//!   reservation; below it only an explicit bind can, and every harness bind is reserved first.
//!
//! Who owns a reservation: [`crate::PgCluster`], [`crate::ServiceProcess`] (with
//! [`crate::ServiceProcess::spawn_reserved`]) and [`crate::FaultProxy`] keep the reservation of
//! their port for as long as they live; [`free_loopback_port`], for callers that want only a
//! number, keeps it until the process exits.

use std::fs::{File, OpenOptions, Permissions, TryLockError};
use std::io::{ErrorKind, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::ops::Range;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use crate::error::HarnessError;

/// The lowest port handed out: clear of the well-known and commonly configured ones.
const FIRST_PORT: u16 = 10_000;
/// Random picks before giving up. With the range even nine tenths taken, all of them fail with a
/// probability of about 2e-12.
const ATTEMPTS: u32 = 256;
/// The directory under the temp directory that every harness process reserves ports in.
const DIR_NAME: &str = "treaty-harness-ports";

/// A loopback port reserved for its holder: no other [`reserve_loopback_port`], in this process
/// or any other on the machine, returns it until this value is dropped (or its process dies).
#[derive(Debug)]
pub struct PortReservation {
    port: u16,
    path: PathBuf,
    /// Holds the lock; closing it (after `drop` unlinked `path`) ends the reservation.
    _lock: File,
}

impl PortReservation {
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }
}

impl Drop for PortReservation {
    fn drop(&mut self) {
        // Unlink while the lock is still held (the file is closed after this): see the module
        // doc. A file we may not remove (another user's stale file in the sticky directory) only
        // stays for the next taker, so the error is of no consequence.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reserves a loopback port that no other harness holds and nothing listens on: see the module
/// doc. The port is the caller's until the reservation is dropped.
pub fn reserve_loopback_port() -> Result<PortReservation, HarnessError> {
    let (low, _) = ephemeral_range();
    reserve_in(&shared_dir()?, FIRST_PORT..low, port_is_free)
}

/// Reservations [`free_loopback_port`] keeps for the life of the process.
static KEPT: Mutex<Vec<PortReservation>> = Mutex::new(Vec::new());

/// A port on 127.0.0.1 that nothing listened on a moment ago, reserved (see
/// [`reserve_loopback_port`]) until this process exits, for callers that need only its number.
/// Code that owns a port for less than its process's life should hold a [`PortReservation`].
pub fn free_loopback_port() -> Result<u16, HarnessError> {
    let reservation = reserve_loopback_port()?;
    let port = reservation.port();
    // A panic elsewhere while pushing cannot leave the list inconsistent: take it regardless.
    KEPT.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(reservation);
    Ok(port)
}

/// The shared reservation directory, created on first use by whoever comes first. It is sticky
/// and writable by everyone, like `/tmp` itself, so that harnesses run by different users
/// coordinate too.
fn shared_dir() -> Result<PathBuf, HarnessError> {
    let dir = std::env::temp_dir().join(DIR_NAME);
    match std::fs::DirBuilder::new().mode(0o1777).create(&dir) {
        // The umask took bits off the mode.
        Ok(()) => std::fs::set_permissions(&dir, Permissions::from_mode(0o1777))
            .map_err(HarnessError::io(format!("chmod {}", dir.display())))?,
        Err(error) if error.kind() == ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(HarnessError::Io {
                what: format!("creating {}", dir.display()),
                source,
            });
        }
    }
    Ok(dir)
}

/// Reserves a port of `range` in `dir` that `usable` accepts, picking at random so that
/// concurrent callers rarely try the same port (and when they do, the lock decides).
fn reserve_in(
    dir: &Path,
    range: Range<u16>,
    usable: impl Fn(u16) -> bool,
) -> Result<PortReservation, HarnessError> {
    let span = u64::from(range.end.saturating_sub(range.start).max(1));
    let mut seed = random_seed();
    for _ in 0..ATTEMPTS {
        // xorshift: enough to spread concurrent callers over the range.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // Below `span`, which is at most `u16::MAX`.
        let port = range.start.saturating_add((seed % span) as u16);
        // A port in use outside the harness is released again as the reservation drops.
        if let Some(reservation) = try_reserve(dir, port)?
            && usable(port)
        {
            return Ok(reservation);
        }
    }
    Err(HarnessError::NoFreePort {
        range: format!("{}..{}", range.start, range.end),
        attempts: ATTEMPTS,
        dir: dir.to_path_buf(),
    })
}

/// Reserves `port` in `dir`; `None` when someone else holds it.
fn try_reserve(dir: &Path, port: u16) -> Result<Option<PortReservation>, HarnessError> {
    let path = dir.join(port.to_string());
    let file = match OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        // Its holder's pid: rewritten only once the lock is ours.
        .truncate(false)
        .mode(0o666)
        .open(&path)
    {
        Ok(file) => file,
        // Another user's file we may not open: theirs, as far as we can tell.
        Err(error) if error.kind() == ErrorKind::PermissionDenied => return Ok(None),
        Err(source) => {
            return Err(HarnessError::Io {
                what: format!("opening {}", path.display()),
                source,
            });
        }
    };
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Ok(None),
        Err(TryLockError::Error(source)) => {
            return Err(HarnessError::Io {
                what: format!("locking {}", path.display()),
                source,
            });
        }
    }
    // Its holder may have released it between our open and our lock, unlinking the file first:
    // then the file we locked is no longer the reservation, and the path names none or a newer
    // one that someone else may hold.
    let locked = file
        .metadata()
        .map_err(HarnessError::io(format!("reading {}", path.display())))?;
    match std::fs::metadata(&path) {
        Ok(now) if now.dev() == locked.dev() && now.ino() == locked.ino() => {}
        Ok(_) => return Ok(None),
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(HarnessError::Io {
                what: format!("reading {}", path.display()),
                source,
            });
        }
    }
    // For a human who wonders who holds the port, and so that another user can take the file
    // over once we are gone. The lock is the reservation: failing these changes nothing.
    let _ = file.set_permissions(Permissions::from_mode(0o666));
    let _ = file
        .set_len(0)
        .and_then(|()| (&file).write_all(format!("{}\n", std::process::id()).as_bytes()));
    Ok(Some(PortReservation {
        port,
        path,
        _lock: file,
    }))
}

/// Whether nothing listens on 127.0.0.1:`port` (std sets SO_REUSEADDR, as the services and
/// PostgreSQL do, so a closed connection lingering in TIME_WAIT does not count).
fn port_is_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// The kernel's ephemeral port range (`net.ipv4.ip_local_port_range`), Linux's default if
/// unreadable or leaving too little room below it.
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut parts = text.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((parts.next()??, parts.next()??))
        })
        .filter(|(low, _)| *low > FIRST_PORT + 1_000)
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

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::io::{BufRead, BufReader, Read};
    use std::process::{Child, Command, Stdio};

    use super::*;

    // The helper below reads its orders from these.
    const HELPER_DIR: &str = "TREATY_PORTS_TEST_DIR";
    const HELPER_RANGE: &str = "TREATY_PORTS_TEST_RANGE";
    const HELPER_COUNT: &str = "TREATY_PORTS_TEST_COUNT";

    fn parse_range(text: &str) -> Range<u16> {
        let (start, end) = text.split_once("..").unwrap();
        start.parse().unwrap()..end.parse().unwrap()
    }

    /// Not a test: run in child processes by the tests below (and a no-op when run by hand). It
    /// reserves `$TREATY_PORTS_TEST_COUNT` ports of `$TREATY_PORTS_TEST_RANGE` in
    /// `$TREATY_PORTS_TEST_DIR`, prints `reserved <port>` for each and `holding`, and holds them
    /// until its stdin is closed or it is killed.
    #[test]
    #[ignore = "a helper the other tests run in child processes"]
    fn hold_reservations() {
        let Ok(dir) = std::env::var(HELPER_DIR) else {
            return;
        };
        let range = parse_range(&std::env::var(HELPER_RANGE).unwrap());
        let count: usize = std::env::var(HELPER_COUNT).unwrap().parse().unwrap();
        let held: Vec<PortReservation> = (0..count)
            .map(|_| reserve_in(Path::new(&dir), range.clone(), |_| true).unwrap())
            .collect();
        let mut out = std::io::stdout().lock();
        for reservation in &held {
            writeln!(out, "reserved {}", reservation.port()).unwrap();
        }
        writeln!(out, "holding").unwrap();
        out.flush().unwrap();
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
    }

    /// Starts `hold_reservations` in a child process (this same test binary).
    fn spawn_holder(dir: &Path, range: &Range<u16>, count: usize) -> Child {
        Command::new(std::env::current_exe().unwrap())
            .args([
                "ports::tests::hold_reservations",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env(HELPER_DIR, dir)
            .env(HELPER_RANGE, format!("{}..{}", range.start, range.end))
            .env(HELPER_COUNT, count.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// The ports a holder reserved, once it holds them all. Its stdout stays open (libtest
    /// writes its summary there as it ends).
    fn held_by(child: &mut Child) -> Vec<u16> {
        let stdout = child.stdout.as_mut().unwrap();
        let mut ports = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if line == "holding" {
                return ports;
            }
            if let Some(port) = line.strip_prefix("reserved ") {
                ports.push(port.parse().unwrap());
            }
        }
        panic!("the holder ended before holding its ports (reserved {ports:?})");
    }

    /// Many reservations at once, from threads of this process and from other processes, on a
    /// range barely larger than their number (so that picks collide all the time): no port is
    /// ever handed out twice, and a port held elsewhere cannot be taken.
    #[test]
    fn concurrent_reservations_never_share_a_port() {
        let dir = tempfile::tempdir().unwrap();
        // Only the names matter: `usable` accepts every port, so that this tests the
        // reservations and not which ports of the machine happen to be free.
        let range = 20_000..20_100;
        let mut children: Vec<Child> = (0..3).map(|_| spawn_holder(dir.path(), &range, 12)).collect();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let dir = dir.path().to_path_buf();
                let range = range.clone();
                std::thread::spawn(move || {
                    (0..10)
                        .map(|_| reserve_in(&dir, range.clone(), |_| true).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let here: Vec<PortReservation> = threads
            .into_iter()
            .flat_map(|thread| thread.join().unwrap())
            .collect();
        let elsewhere: Vec<u16> = children.iter_mut().flat_map(held_by).collect();

        let all: Vec<u16> = here
            .iter()
            .map(PortReservation::port)
            .chain(elsewhere.iter().copied())
            .collect();
        assert_eq!(all.len(), 3 * 12 + 4 * 10);
        let distinct: HashSet<u16> = all.iter().copied().collect();
        assert_eq!(distinct.len(), all.len(), "a port was handed out twice: {all:?}");
        assert!(all.iter().all(|port| range.contains(port)), "{all:?}");
        for port in all {
            assert!(
                try_reserve(dir.path(), port).unwrap().is_none(),
                "{port} taken while held"
            );
        }

        // Closing their stdin (which `wait_with_output` does first) ends the holders, which
        // releases their ports.
        for child in children {
            assert!(child.wait_with_output().unwrap().status.success());
        }
        for port in elsewhere {
            assert!(
                try_reserve(dir.path(), port).unwrap().is_some(),
                "{port} still held"
            );
        }
    }

    /// A reservation dropped is released (its file removed), and one whose process died without
    /// releasing it (SIGKILL) is stale: both can be taken again at once.
    #[test]
    fn a_released_or_stale_reservation_can_be_taken_again() {
        let dir = tempfile::tempdir().unwrap();
        let port = 20_000;
        let path = dir.path().join(port.to_string());

        let first = try_reserve(dir.path(), port).unwrap().unwrap();
        assert!(try_reserve(dir.path(), port).unwrap().is_none());
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
        drop(first);
        assert!(!path.exists(), "a released reservation leaves no file");
        let again = try_reserve(dir.path(), port).unwrap().unwrap();
        drop(again);

        let mut holder = spawn_holder(dir.path(), &(port..port + 1), 1);
        assert_eq!(held_by(&mut holder), [port]);
        assert!(try_reserve(dir.path(), port).unwrap().is_none());
        holder.kill().unwrap();
        holder.wait().unwrap();
        assert!(path.exists(), "a killed holder leaves its file behind");
        let taken = try_reserve(dir.path(), port).unwrap().unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
        drop(taken);
    }

    /// The shared directory's reservations: distinct, below the ephemeral range, and free.
    #[test]
    fn shared_reservations_are_distinct_free_ports_below_the_ephemeral_range() {
        let (low, _) = ephemeral_range();
        let held: Vec<PortReservation> = (0..8).map(|_| reserve_loopback_port().unwrap()).collect();
        let ports: HashSet<u16> = held.iter().map(PortReservation::port).collect();
        assert_eq!(ports.len(), held.len());
        for reservation in &held {
            assert!((FIRST_PORT..low).contains(&reservation.port()));
            // Nothing listens on it, so a server can bind it.
            TcpListener::bind(reservation.addr()).unwrap();
        }
    }
}
