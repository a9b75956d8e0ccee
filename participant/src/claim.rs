//! The claim a running participant holds on its database: a session-level advisory lock, held on a
//! connection of its own for the life of the process.
//!
//! Two participants on one database would break recovery: they share the marker table (the second
//! branch of a transaction that touches both would violate its key and vote NO), and each takes the
//! other's prepared branches for another shard's and leaves them alone. So a second participant,
//! under any shard name, refuses to start and names the one that holds the database. A participant
//! that was just stopped or killed releases the lock as soon as PostgreSQL sees its connection
//! close; the newcomer waits `WAIT` for that before giving up.
//!
//! The same check says whether the database can be reached: `Claim::held` is true while the lock is
//! held on a connection that answers (the participant's health, `health`).

use std::time::Duration;

use sqlx::ConnectOptions as _;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use treaty_proto::ShardName;

use crate::error::ParticipantError;
use crate::postgres::DbError;

/// The advisory lock's key ("TREATY" and 1); advisory locks are per database.
const KEY: i64 = 0x5452_4541_5459_0001;
/// How long a starting participant waits for the lock (its predecessor's backend to end).
const WAIT: Duration = Duration::from_secs(3);
/// How often the lock's connection is checked, and retaken after it broke.
const CHECK_EVERY: Duration = Duration::from_secs(2);
/// How long a check (or reconnecting, or retaking the lock) may take before it counts as failed:
/// a database that does not answer is as unreachable as one that refuses.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Holds the database while alive; dropping it ends the connection and so releases the lock.
pub struct Claim {
    task: JoinHandle<()>,
    held: watch::Receiver<bool>,
}

impl Claim {
    /// True while the lock is held on a connection that answered its last check; updated every
    /// `CHECK_EVERY`.
    pub fn held(&self) -> watch::Receiver<bool> {
        self.held.clone()
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Takes the database for `shard`, or says which participant holds it.
pub async fn take(
    options: &PgConnectOptions,
    shard: &ShardName,
    database: &str,
) -> Result<Claim, ParticipantError> {
    let options = options
        .clone()
        .application_name(&format!("treaty-participant shard={shard}"));
    let failed = ParticipantError::ServerCheck;
    let mut connection = options.connect().await.map_err(|e| failed(DbError::from(e)))?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !try_lock(&mut connection).await.map_err(failed)? {
        if tokio::time::Instant::now() >= deadline {
            return Err(ParticipantError::DatabaseClaimed {
                database: database.to_owned(),
                holder: holder(&mut connection).await.map_err(failed)?,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (state, held) = watch::channel(true);
    let task = tokio::spawn(hold(connection, options, state));
    Ok(Claim { task, held })
}

async fn try_lock(connection: &mut PgConnection) -> Result<bool, DbError> {
    Ok(sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(KEY)
        .fetch_one(connection)
        .await?)
}

/// Who holds the lock, as far as this role may see (`pg_stat_activity` hides other roles'
/// details without `pg_read_all_stats`).
async fn holder(connection: &mut PgConnection) -> Result<String, DbError> {
    let row: Option<(i32, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT a.pid, a.application_name, host(a.client_addr) \
         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted \
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND l.classid = ($1 >> 32)::oid AND l.objid = ($1 & 4294967295)::oid AND l.objsubid = 1",
    )
    .bind(KEY)
    .fetch_optional(connection)
    .await?;
    Ok(match row {
        Some((pid, name, addr)) => format!(
            "{} connected from {}, PostgreSQL backend pid {pid}",
            name.filter(|n| !n.is_empty())
                .unwrap_or_else(|| "a session whose name this role cannot see".into()),
            addr.unwrap_or_else(|| "a local socket".into()),
        ),
        None => "a session that released it just now; try again".into(),
    })
}

/// Keeps the lock's connection alive; after it broke (a PostgreSQL restart drops the lock with it),
/// takes the lock again on a new one. `state` says whether the lock is held on a live connection.
async fn hold(mut connection: PgConnection, options: PgConnectOptions, state: watch::Sender<bool>) {
    let mut held = true;
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        let check = sqlx::query("SELECT 1").execute(&mut connection);
        let alive = matches!(tokio::time::timeout(CHECK_TIMEOUT, check).await, Ok(Ok(_)));
        if alive && held {
            set(&state, true);
            continue;
        }
        if !alive {
            set(&state, false);
            match tokio::time::timeout(CHECK_TIMEOUT, options.connect()).await {
                Ok(Ok(fresh)) => connection = fresh,
                Ok(Err(error)) => {
                    tracing::warn!(%error, "the connection holding this participant's claim on its database broke; retrying");
                    continue;
                }
                Err(_) => {
                    tracing::warn!(
                        timeout_ms = CHECK_TIMEOUT.as_millis() as u64,
                        "the connection holding this participant's claim on its database broke, and reconnecting timed out; retrying"
                    );
                    continue;
                }
            }
        }
        let locked = tokio::time::timeout(CHECK_TIMEOUT, try_lock(&mut connection)).await;
        held = matches!(locked, Ok(Ok(true)));
        set(&state, held);
        if !held {
            let holder = match tokio::time::timeout(CHECK_TIMEOUT, holder(&mut connection)).await {
                Ok(found) => found.unwrap_or_else(|e| e.to_string()),
                Err(_) => "unknown (asking timed out)".to_owned(),
            };
            tracing::error!(
                %holder,
                "another participant holds this database now (taken while this one's claim was down); \
                 only one participant may serve a database: stop one of them"
            );
        }
    }
}

/// Publishes `held`, waking watchers only on a change.
fn set(state: &watch::Sender<bool>, held: bool) {
    state.send_if_modified(|current| std::mem::replace(current, held) != held);
}
