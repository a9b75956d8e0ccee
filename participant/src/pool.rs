//! The participant's pool of PostgreSQL connections.
//!
//! Why not sqlx's `PgPool`: it tests every connection on its way back into the pool with a round
//! trip to the server (a protocol `Sync` and its `ReadyForQuery`), on a task of its own. Every
//! branch returns its connection once and every `COMMIT PREPARED` once, so that was two extra
//! server wake-ups per branch, and while the test ran the connection was neither idle nor in use,
//! so a burst of commits made the pool open more backends than it ever used at once (a recovery
//! of 10,000 transactions opened about 45 per shard for 16 commits in flight).
//!
//! Here a connection goes back as it is. That is safe because its users already decide whether
//! it may: a branch's connection is closed unless its transaction ended (`ActiveBranch`), a call
//! that lost its connection closes it (`close_on_drop`), and sqlx itself reads any answer left
//! over from an interrupted call before it sends the next statement. A dead idle connection is
//! found on its next use, by the callers that may repeat their statement (`retrying`, `open`), as
//! with sqlx's pool under `test_before_acquire(false)`.
//!
//! Idle connections are reused newest first, so a light load keeps the same few backends warm;
//! those idle longer than `IDLE_TIMEOUT` are closed when the pool is next used.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sqlx::ConnectOptions as _;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::postgres::DbError;

/// An idle connection unused this long is closed (as sqlx's pool does by default).
const IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// A cheap handle; clones share the connections.
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
}

struct Shared {
    options: PgConnectOptions,
    max_connections: u32,
    acquire_timeout: Duration,
    /// One permit per connection in use. Connections are only opened when none is idle, so the
    /// connections open (in use plus idle) never outnumber the permits.
    permits: Arc<Semaphore>,
    /// Oldest first; taken from the back.
    idle: Mutex<Vec<Idle>>,
}

struct Idle {
    connection: PgConnection,
    since: Instant,
}

impl Pool {
    /// A pool of at most `max_connections` connections made with `options`. Opens none yet.
    pub fn new(options: PgConnectOptions, max_connections: u32, acquire_timeout: Duration) -> Pool {
        Pool {
            shared: Arc::new(Shared {
                options,
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

    fn in_use(&self) -> usize {
        self.shared.max_connections as usize - self.shared.permits.available_permits()
    }

    /// An idle connection, or a new one when none is idle; waits for one to come back while all
    /// `max_connections` are in use, at most the acquire timeout in all.
    pub async fn acquire(&self) -> Result<PooledConnection, DbError> {
        let timeout = self.shared.acquire_timeout;
        let acquiring = async {
            let permit = Arc::clone(&self.shared.permits)
                .acquire_owned()
                .await
                .map_err(|_| DbError::Connection("the connection pool is closed".into()))?;
            let connection = match self.shared.take_idle() {
                Some(connection) => connection,
                None => self.shared.options.connect().await?,
            };
            Ok(PooledConnection {
                connection: Some(connection),
                shared: Arc::clone(&self.shared),
                close: false,
                _permit: permit,
            })
        };
        match tokio::time::timeout(timeout, acquiring).await {
            Ok(result) => result,
            Err(_) => Err(DbError::Connection(format!(
                "no PostgreSQL connection within {} ms ({} of {} in use)",
                timeout.as_millis(),
                self.in_use(),
                self.shared.max_connections
            ))),
        }
    }

    /// Closes the idle connections and refuses further acquires; connections in use close when
    /// they are dropped.
    pub async fn close(&self) {
        self.shared.permits.close();
        let idle = std::mem::take(&mut *self.shared.idle());
        for Idle { connection, .. } in idle {
            let _ = sqlx::Connection::close(connection).await;
        }
    }
}

impl Shared {
    fn idle(&self) -> MutexGuard<'_, Vec<Idle>> {
        // The lists are left whole by every holder (pushes and pops only), so a panic elsewhere
        // while holding the lock leaves nothing half-done.
        self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn take_idle(&self) -> Option<PgConnection> {
        let mut idle = self.idle();
        let stale = idle
            .iter()
            .take_while(|entry| entry.since.elapsed() >= IDLE_TIMEOUT)
            .count();
        // Dropped outside the lock would be nicer, but dropping a connection only closes its
        // socket.
        idle.drain(..stale);
        idle.pop().map(|entry| entry.connection)
    }
}

/// A connection taken from the pool; derefs to `PgConnection`. Goes back to the pool when dropped,
/// unless `close_on_drop` was called.
pub struct PooledConnection {
    connection: Option<PgConnection>,
    shared: Arc<Shared>,
    close: bool,
    /// Released after the connection is back among the idle ones (fields drop after `drop`), so
    /// that the acquire it wakes finds it there.
    _permit: OwnedSemaphorePermit,
}

impl PooledConnection {
    /// Closes the connection instead of returning it: its transaction or protocol state is not
    /// known to be clean.
    pub fn close_on_drop(&mut self) {
        self.close = true;
    }
}

impl Deref for PooledConnection {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        // Only `drop` takes it out.
        self.connection
            .as_ref()
            .unwrap_or_else(|| unreachable!("connection taken before drop"))
    }
}

impl DerefMut for PooledConnection {
    fn deref_mut(&mut self) -> &mut PgConnection {
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
        if self.close || self.shared.permits.is_closed() {
            // Dropping closes the socket; the backend ends when it reads end-of-file.
            return;
        }
        self.shared.idle().push(Idle {
            connection,
            since: Instant::now(),
        });
    }
}
