//! The participant's pool of PostgreSQL connections.
//!
//! Why not sqlx's `PgPool`: it tests every connection on its way back into the pool with a round
//! trip to the server (a protocol `Sync` and its `ReadyForQuery`), on a task of its own. Every
//! branch returns its connection once and every `COMMIT PREPARED` once, so that was two extra
//! server wake-ups per branch, and while the test ran the connection was neither idle nor in use,
//! so a burst of commits made the pool open more backends than it ever used at once (a recovery
//! of 10,000 transactions opened about 45 per shard for 16 commits in flight).
//!
//! Here a connection goes back as it is. That is safe because its users decide whether it may: a
//! branch's connection is closed unless its transaction ended and its session was not found
//! changed (`ActiveBranch`), and the participant's own statements (`retrying`) mark theirs
//! `close_on_drop` until the statement completed, so a call dropped halfway (or one whose
//! connection broke) closes it instead of leaving an unread answer for the next user. A dead idle
//! connection is found on its next use, by the callers that may repeat their statement
//! (`retrying`, `open`), as with sqlx's pool under `test_before_acquire(false)`.
//!
//! **Whose a connection is.** A branch can change its session in ways the SQL guard cannot see (a
//! function body, a trigger: `session`). So a connection a branch used goes back *unchecked*,
//! marked with the branch's database role (`Left::Unchecked`), and only a branch under the same
//! role takes it as it is, as PgBouncer pools per database user; anyone else (a branch under
//! another role, the participant's own statements) has the session check run on it first, in a
//! round trip of its own, and a changed one is closed. Within one role the check still runs: in
//! the round trip that ends the first branch ending `CHECK_INTERVAL` or more after the
//! connection's last check, and by `check_idle` (the idle sweep) on a connection waiting unchecked
//! that long while a permit is free. So what a hidden function left (a session-level advisory
//! lock, a setting) lasts until the end of the branch running about a second later, or about a
//! second on a connection left idle, not the connection's life. Measured, the check after every
//! branch was most of the PostgreSQL CPU Treaty spends beyond driving the same SQL by hand
//! (docs/performance.md).
//!
//! Idle connections are reused newest first among those a taker may use as they are, so a light
//! load keeps the same few backends warm; those idle longer than `IDLE_TIMEOUT` are closed when the
//! pool is next used.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

use treaty_proto::DatabaseRole;

use crate::postgres::{DbError, SessionDefaults};
pub use connect::{ConnectError, ConnectTarget};
pub use connection::{Connection, pipelined};
use session::{Session, SessionState};

pub(crate) mod connect;
mod connection;
pub(crate) mod session;

/// An idle connection unused this long is closed (as sqlx's pool does by default).
const IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// Longest a connection serves branches of one database role without the session check, and
/// longest an idle one waits unchecked before the idle sweep checks it.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The least time a connection changing hands is given for its check, however long the acquire
/// waited for a permit before it.
const HANDOVER_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// `Idle::fit` of a connection another taker left unchecked.
const NEEDS_CHECK: u8 = 2;

/// Who takes a connection: the participant's own statements, or a branch under a database role
/// (`None`: the participant's login role).
#[derive(Clone, Copy)]
pub enum Taker<'a> {
    Participant,
    Branch(Option<&'a DatabaseRole>),
}

/// Whether an idle connection's session is known to be as it was opened.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Left {
    /// Checked since a branch last used it (or no branch has): anyone may take it.
    Checked,
    /// A branch under this role used it and nothing has checked it since: another branch under
    /// the same role may take it as it is; anyone else has it checked first.
    Unchecked(Option<DatabaseRole>),
}

/// A cheap handle; clones share the connections.
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
}

struct Shared {
    target: ConnectTarget,
    session: SessionDefaults,
    max_connections: u32,
    acquire_timeout: Duration,
    /// One permit per connection in use. Connections are only opened when none is idle, so the
    /// connections open (in use plus idle) never outnumber the permits.
    permits: Arc<Semaphore>,
    /// Oldest first; taken from the back.
    idle: Mutex<Vec<Idle>>,
}

struct Idle {
    connection: Connection,
    opened: Opened,
    since: Instant,
    left: Left,
    /// When the session check last found the session clean (or the connection opened).
    checked_at: Instant,
}

impl Idle {
    /// How well this connection suits `taker`, lower is better; `NEEDS_CHECK`: only after the
    /// session check.
    fn fit(&self, taker: Taker<'_>) -> u8 {
        match (&self.left, taker) {
            (Left::Unchecked(role), Taker::Branch(wanted)) if role.as_ref() == wanted => 0,
            (Left::Checked, Taker::Participant) => 0,
            (Left::Checked, Taker::Branch(_)) => 1,
            (Left::Unchecked(_), _) => NEEDS_CHECK,
        }
    }
}

/// What was read when a connection opened.
struct Opened {
    backend_pid: i32,
    /// The session as it was opened; a branch must leave it so (`session`).
    clean: Arc<SessionState>,
}

impl Pool {
    /// A pool of at most `max_connections` connections made to `target`. Opens none yet.
    pub fn new(target: ConnectTarget, max_connections: u32, acquire_timeout: Duration) -> Pool {
        Pool::with_session_defaults(
            target,
            SessionDefaults::default(),
            max_connections,
            acquire_timeout,
        )
    }

    /// As `new`, with every connection's session starting with `session`'s timeouts, so that a
    /// branch asking for those needs no `SET LOCAL` (`postgres::begin`). They also bound the
    /// participant's own statements on these connections: none of them waits on a lock for long
    /// by design (an abort-row insert that meets a decision branch's row fails after the lock
    /// timeout and is asked again), and a statement running past the statement timeout is better
    /// cancelled than left holding a connection.
    ///
    /// Every session also starts read-only (`default_transaction_read_only`): a branch opens with
    /// `BEGIN ... READ WRITE`, pipelined with its first statement (`postgres::begin_sql`), so
    /// should that BEGIN fail while the session lives on, the statement that follows runs outside
    /// any transaction and fails to write instead of committing on its own. The participant's
    /// own writes open `READ WRITE` transactions the same way (`postgres::write`).
    pub fn with_session_defaults(
        target: ConnectTarget,
        session: SessionDefaults,
        max_connections: u32,
        acquire_timeout: Duration,
    ) -> Pool {
        let mut settings = vec![("default_transaction_read_only", "on".to_owned())];
        if let Some(ms) = session.lock_timeout_ms {
            settings.push(("lock_timeout", ms.to_string()));
        }
        if let Some(ms) = session.statement_timeout_ms {
            settings.push(("statement_timeout", ms.to_string()));
        }
        Pool {
            shared: Arc::new(Shared {
                target: target.settings(&settings),
                session,
                max_connections,
                acquire_timeout,
                permits: Arc::new(Semaphore::new(max_connections as usize)),
                idle: Mutex::new(Vec::new()),
            }),
        }
    }

    pub fn max_connections(&self) -> u32 {
        self.shared.max_connections
    }

    /// Connections in use now (the metrics).
    pub fn in_use(&self) -> usize {
        (self.shared.max_connections as usize).saturating_sub(self.shared.permits.available_permits())
    }

    /// Connections open and idle now (the metrics).
    pub fn idle_count(&self) -> usize {
        self.shared.idle().len()
    }

    /// The timeouts every connection's session starts with.
    pub fn session_defaults(&self) -> SessionDefaults {
        self.shared.session
    }

    /// An idle connection, or a new one when none is idle; waits for one to come back while all
    /// `max_connections` are in use, at most the acquire timeout in all. A server that refuses
    /// connections for a moment (restarting, starting up) is tried again until then, as sqlx's
    /// pool did; one that refuses for good (authentication, no such database) fails at once.
    pub async fn acquire(&self) -> Result<PooledConnection, DbError> {
        self.acquire_for(Taker::Participant).await
    }

    /// As `acquire`, for `taker`: a connection whose session is clean for it (`Left`), an
    /// unchecked one checked first when no other is idle.
    pub async fn acquire_for(&self, taker: Taker<'_>) -> Result<PooledConnection, DbError> {
        let timeout = self.shared.acquire_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let waited = || {
            DbError::Connection(format!(
                "no PostgreSQL connection within {} ms: all {} are in use (--max-connections; each open \
                 branch holds one)",
                timeout.as_millis(),
                self.shared.max_connections
            ))
        };
        let closed = || DbError::Connection("the connection pool is closed".into());
        // A free permit is the common case: taken without registering a timer.
        let permit = match Arc::clone(&self.shared.permits).try_acquire_owned() {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => return Err(closed()),
            Err(TryAcquireError::NoPermits) => {
                match tokio::time::timeout_at(deadline, Arc::clone(&self.shared.permits).acquire_owned())
                    .await
                {
                    Ok(Ok(permit)) => permit,
                    Ok(Err(_)) => return Err(closed()),
                    Err(_) => return Err(waited()),
                }
            }
        };
        let mut permit = permit;
        while let Some((idle, as_it_is)) = self.shared.take_idle(taker) {
            let mut connection = PooledConnection::from_idle(idle, &self.shared, permit);
            let clean = as_it_is
                || match tokio::time::timeout_at(
                    deadline.max(tokio::time::Instant::now() + HANDOVER_CHECK_TIMEOUT),
                    connection.check("handover"),
                )
                .await
                {
                    Ok(clean) => clean,
                    // Cut short, the connection is closed as it drops (`check`).
                    Err(_) => {
                        return Err(DbError::Connection(
                            "the session check of a pooled connection did not answer in time".into(),
                        ));
                    }
                };
            if clean {
                connection.taken_by(taker);
                return Ok(connection);
            }
            // Closed as it drops; its permit serves the next one.
            permit = connection.release_permit();
        }
        // Boxed: opening a connection (TCP, TLS, startup) is a future of over 4 KB, and every
        // branch operation's future holds `acquire`'s; inline, each of those was 9 KB to allocate
        // and copy per call for a path most calls never take.
        let (connection, opened) = Box::pin(self.shared.open(deadline)).await?;
        let mut connection = PooledConnection {
            connection: Some(connection),
            opened,
            shared: Arc::clone(&self.shared),
            close: false,
            left: Left::Checked,
            checked_at: Instant::now(),
            _permit: Some(permit),
        };
        connection.taken_by(taker);
        Ok(connection)
    }

    /// Checks the idle connections a branch left unchecked for `CHECK_INTERVAL` or longer (the
    /// idle sweep calls it): what a branch's hidden function left in its session (a setting, a
    /// session-level advisory lock) is then undone or closed within about that long even when
    /// the connection waits unused. Skipped while every connection is in use.
    pub async fn check_idle(&self) {
        loop {
            let Ok(permit) = Arc::clone(&self.shared.permits).try_acquire_owned() else {
                return;
            };
            let due = {
                let mut idle = self.shared.idle();
                idle.iter()
                    .position(|entry| {
                        matches!(entry.left, Left::Unchecked(_))
                            && entry.checked_at.elapsed() >= CHECK_INTERVAL
                    })
                    .map(|at| idle.remove(at))
            };
            let Some(entry) = due else { return };
            let mut connection = PooledConnection::from_idle(entry, &self.shared, permit);
            // Clean, it goes back checked; changed, it is closed (both as it drops).
            connection.check("idle").await;
        }
    }

    /// A connection outside the pool (not counted against `max_connections`), for a rare
    /// out-of-band statement such as cancelling another connection's statement, which must not
    /// wait behind the branches that fill the pool.
    pub async fn connect_outside(&self) -> Result<Connection, DbError> {
        let deadline = tokio::time::Instant::now() + self.shared.acquire_timeout;
        self.shared.open(deadline).await.map(|(connection, _)| connection)
    }

    /// Closes the idle connections and refuses further acquires; connections in use close when
    /// they are dropped.
    pub async fn close(&self) {
        self.shared.permits.close();
        // Under the lock, after closing: a connection dropped meanwhile either sees the pool
        // closed or is pushed before this takes the list.
        let idle = std::mem::take(&mut *self.shared.idle());
        // Dropping a client ends its session (tokio-postgres sends Terminate).
        drop(idle);
    }
}

impl Shared {
    /// A new connection, its backend's process id and its clean session state, retried with a
    /// growing pause while the server refuses for a moment, until `deadline`. The pid and the
    /// state are read once here, in one round trip per connection (not per use): the pid so that
    /// a statement on the connection can be cancelled from another one (`pg_cancel_backend`; sqlx
    /// keeps the cancel key to itself), the state for the session check (`session`).
    async fn open(&self, deadline: tokio::time::Instant) -> Result<(Connection, Opened), DbError> {
        let mut pause = Duration::from_millis(20);
        loop {
            let error = match self.target.connect().await {
                Ok(client) => {
                    let mut connection = Connection::new(client);
                    let (backend_pid, clean) = session::open(&mut connection).await.map_err(|e| {
                        DbError::Connection(format!("reading the new session's backend pid and state: {e}"))
                    })?;
                    let opened = Opened {
                        backend_pid,
                        clean: Arc::new(clean),
                    };
                    return Ok((connection, opened));
                }
                Err(error) => error,
            };
            if !error.is_transient() || tokio::time::Instant::now() + pause >= deadline {
                return Err(DbError::Connection(format!(
                    "cannot connect to PostgreSQL: {error}"
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    fn idle(&self) -> MutexGuard<'_, Vec<Idle>> {
        // The lists are left whole by every holder (pushes and pops only), so a panic elsewhere
        // while holding the lock leaves nothing half-done.
        self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The idle connection `taker` should use, and whether as it is (else the check first):
    /// the newest among the best fitting (`Idle::fit`).
    fn take_idle(&self, taker: Taker<'_>) -> Option<(Idle, bool)> {
        let mut idle = self.idle();
        let stale = idle
            .iter()
            .take_while(|entry| entry.since.elapsed() >= IDLE_TIMEOUT)
            .count();
        // Dropped outside the lock would be nicer, but dropping a connection only closes its
        // socket.
        idle.drain(..stale);
        // One whose connection task has ended (PostgreSQL closed it: a restart, a terminated
        // backend) is dropped here rather than found dead by a branch: a branch whose COMMIT went
        // with its statement (`Agent::execute_and_commit`) cannot run again on a fresh
        // connection, since it cannot tell a dead socket from a COMMIT whose answer was lost.
        idle.retain(|entry| !entry.connection.client().is_closed());
        // Among equal fits the newest: `min_by_key` keeps the first it meets, and this walks
        // from the newest.
        let (at, fit) = idle
            .iter()
            .enumerate()
            .rev()
            .map(|(at, entry)| (at, entry.fit(taker)))
            .min_by_key(|&(_, fit)| fit)?;
        Some((idle.remove(at), fit < NEEDS_CHECK))
    }
}

/// A connection taken from the pool; derefs to `Connection`. Goes back to the pool when dropped,
/// unless `close_on_drop` was called.
pub struct PooledConnection {
    connection: Option<Connection>,
    opened: Opened,
    shared: Arc<Shared>,
    close: bool,
    /// How it goes back to the pool (`Left`), unless closed.
    left: Left,
    checked_at: Instant,
    /// Released after the connection is back among the idle ones (fields drop after `drop`), so
    /// that the acquire it wakes finds it there. `None` only once `release_permit` took it.
    _permit: Option<OwnedSemaphorePermit>,
}

impl PooledConnection {
    fn from_idle(idle: Idle, shared: &Arc<Shared>, permit: OwnedSemaphorePermit) -> PooledConnection {
        PooledConnection {
            connection: Some(idle.connection),
            opened: idle.opened,
            shared: Arc::clone(shared),
            close: false,
            left: idle.left,
            checked_at: idle.checked_at,
            _permit: Some(permit),
        }
    }

    /// A branch's connection goes back unchecked under its role until a check after the branch
    /// finds it clean (`checked`); the participant's own statements change no session.
    fn taken_by(&mut self, taker: Taker<'_>) {
        if let Taker::Branch(role) = taker {
            self.left = Left::Unchecked(role.cloned());
        }
    }

    /// Runs the session check in a round trip of its own (counted as `when`, one of
    /// `metrics::CHECKED_AT`); `true` if the session is clean (the connection is then marked
    /// checked), else it is marked to close.
    async fn check(&mut self, when: &'static str) -> bool {
        crate::metrics::global().session_checked(when);
        let clean = Arc::clone(&self.opened.clean);
        // A check dropped halfway would leave its answer unread for the next user: closed then.
        self.close = true;
        let found = session::check(self, &clean).await;
        let clean = self.checked(found);
        self.close = !clean;
        clean
    }

    /// What a check of this connection found: clean marks it checked; changed logs why, counts
    /// it and marks it to close; lost (the connection broke) marks it to close. `true` if clean.
    pub(crate) fn checked(&mut self, found: Session) -> bool {
        match found {
            Session::Clean => {
                self.left = Left::Checked;
                self.checked_at = Instant::now();
                true
            }
            Session::Unchecked => true,
            Session::Changed(what) => {
                tracing::warn!(
                    backend_pid = self.opened.backend_pid,
                    "closing a pooled connection instead of handing it on: its session changed ({what})"
                );
                crate::metrics::global().dirty_connection_closed("session_check");
                self.close = true;
                false
            }
            Session::Lost(why) => {
                tracing::debug!(
                    backend_pid = self.opened.backend_pid,
                    "closing a pooled connection: {why}"
                );
                self.close = true;
                false
            }
        }
    }

    /// Closes the connection and hands back its permit, for the caller to take the next one.
    fn release_permit(mut self) -> OwnedSemaphorePermit {
        self.close = true;
        let permit = self._permit.take();
        drop(self);
        permit.unwrap_or_else(|| unreachable!("the permit is taken only here"))
    }

    /// The PostgreSQL backend serving this connection, to cancel its statement from another.
    pub fn backend_pid(&self) -> i32 {
        self.opened.backend_pid
    }

    /// The session as it was when the connection opened, for the check in the round trip that
    /// ends a branch, if one is due (`CHECK_INTERVAL` since the last); `None`: not this time.
    pub(crate) fn clean_session(&self) -> Option<Arc<SessionState>> {
        (self.checked_at.elapsed() >= CHECK_INTERVAL).then(|| Arc::clone(&self.opened.clean))
    }

    /// Closes the connection instead of returning it: its transaction or protocol state is not
    /// known to be clean.
    pub fn close_on_drop(&mut self) {
        self.close = true;
    }

    /// Undoes `close_on_drop`: the caller knows the connection is clean again (its statement
    /// completed). With the pair around a statement, a call dropped halfway closes the
    /// connection instead of leaving an unread answer (an error, say) for the next user.
    pub fn return_on_drop(&mut self) {
        self.close = false;
    }
}

impl Deref for PooledConnection {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        // Only `drop` takes it out.
        self.connection
            .as_ref()
            .unwrap_or_else(|| unreachable!("connection taken before drop"))
    }
}

impl DerefMut for PooledConnection {
    fn deref_mut(&mut self) -> &mut Connection {
        self.connection
            .as_mut()
            .unwrap_or_else(|| unreachable!("connection taken before drop"))
    }
}

impl Drop for PooledConnection {
    fn drop(&mut self) {
        let Some(connection) = self.connection.take() else {
            return;
        };
        if self.close {
            // Dropping closes the socket; the backend ends when it reads end-of-file.
            return;
        }
        let mut idle = self.shared.idle();
        // Checked under the lock, which `close` takes after closing the pool.
        if !self.shared.permits.is_closed() {
            idle.push(Idle {
                connection,
                opened: Opened {
                    backend_pid: self.opened.backend_pid,
                    clean: Arc::clone(&self.opened.clean),
                },
                since: Instant::now(),
                left: std::mem::replace(&mut self.left, Left::Checked),
                checked_at: self.checked_at,
            });
        }
    }
}
