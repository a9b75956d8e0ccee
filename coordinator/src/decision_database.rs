//! `--decision-store postgres://...`: two-phase commit decisions as rows of `treaty.decisions`
//! (`migrations/0003_decisions.sql`, the table the shard store uses) in a dedicated database, for
//! teams that want the decisions on their most durable server, replicated and failed over as
//! they already run it, rather than on a shard.
//!
//! The order is the decision log's: every branch prepared (with its marker row), then the commit
//! row committed here (that COMMIT is the decision), then `COMMIT PREPARED` everywhere. Only the
//! coordinator instance named in a GID writes or reads that GID's row, so a transaction is decided
//! exactly once by the core's own rules, as with the log; an abort is presumed (no row). What the
//! row adds over the log is where it lives: a restarted instance, or one started on another
//! machine with the same `--id`, finds its unfinished commits in this database
//! (`DecisionDatabase::unfinished`).
//!
//! Rows are deleted in batches once a transaction needs nothing more (`end`), by a task of their
//! own: a delete that is lost only costs a repeated re-drive after a restart.

use std::collections::HashSet;
use std::io::Write as _;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use tokio::sync::mpsc;
use treaty_commit_protocol::store::{CommitRecord, StoreError};
use treaty_proto::{CoordinatorId, Gid, SecretUrl, TxId, redact};

/// In the coordinator's data directory once it has used a decision database: the URL without its
/// password. A later start without a decision database is refused (`lib.rs`), since the log does
/// not hold the decisions that are rows.
pub const MARKER_FILE: &str = "decision-database";

/// Writes and syncs the marker (the directory entry too), before the first decision can be a row.
pub fn record_in(marker: &Path, url: &SecretUrl) -> std::io::Result<()> {
    let mut file = std::fs::File::create(marker)?;
    file.write_all(url.redacted().as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    if let Some(dir) = marker.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The URL the marker holds, if there is one (redacted again: a marker written by an older
/// version kept a `?password=` parameter).
pub fn recorded_in(marker: &Path) -> Option<String> {
    if !marker.exists() {
        return None;
    }
    Some(
        std::fs::read_to_string(marker)
            .map_or_else(|_| "(unreadable)".to_owned(), |text| redact(text.trim())),
    )
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// SQLSTATE `unique_violation`: a row for the GID exists (ours from an attempt whose answer was
/// lost, or another outcome's).
const UNIQUE_VIOLATION: &str = "23505";
/// Attempts of one insert while the connection fails (the server restarting, a standby being
/// promoted): the delay doubles from `FIRST_RETRY` up to `LAST_RETRY`, about 9 s in all. Past that
/// the store fails, and the driver stops the process (a restart recovers from the rows), as it
/// does when the log's disk fails.
const INSERT_ATTEMPTS: u32 = 10;
const FIRST_RETRY: Duration = Duration::from_millis(50);
const LAST_RETRY: Duration = Duration::from_secs(2);
/// Most GIDs deleted by one statement.
const DELETE_BATCH: usize = 1_000;
/// Connections to the decision database: inserts of concurrent commits share PostgreSQL's WAL
/// flushes, so more in flight means fewer flushes per decision.
const MAX_CONNECTIONS: u32 = 32;

#[derive(Debug, thiserror::Error)]
pub enum DecisionDatabaseError {
    #[error(
        "decision database {url}: {source}; check that the server is up and the URL (user, host, port, database) is right"
    )]
    Connect { url: String, source: sqlx::Error },
    #[error("decision database {url}: {source}")]
    Url {
        url: String,
        source: treaty_proto::SecretUrlError,
    },
    #[error("decision database {url}: PostgreSQL passfile: {source}")]
    Passfile {
        url: String,
        source: treaty_proto::secret_file::SecretFileError,
    },
    #[error("decision database {url}: applying the treaty schema: {source}")]
    Migrate {
        url: String,
        source: sqlx::migrate::MigrateError,
    },
    #[error("decision database {url}: reading this coordinator's commit rows: {source}")]
    Read { url: String, source: sqlx::Error },
}

/// A connection pool to the decision database, for one coordinator id.
pub struct DecisionDatabase {
    /// The URL without its password, for messages.
    shown_url: String,
    pool: PgPool,
    coordinator: CoordinatorId,
    /// The txids with a commit row here (inserted by this process or found at replay): only
    /// those are worth a delete when they end, so one-shard and aborted transactions cost the
    /// database nothing.
    rows: Mutex<HashSet<TxId>>,
    ended: mpsc::UnboundedSender<String>,
}

impl DecisionDatabase {
    /// Connects, applies the treaty schema (the same migrations a participant applies), and
    /// starts the task that deletes ended transactions' rows.
    pub async fn open(
        url: &SecretUrl,
        coordinator: CoordinatorId,
    ) -> Result<DecisionDatabase, DecisionDatabaseError> {
        let shown = url.redacted();
        // A URL without a password gets it from `PGPASSWORD` or the passfile, which must be private.
        treaty_proto::secret_file::check_passfile(url.expose()).map_err(|source| {
            DecisionDatabaseError::Passfile {
                url: shown.clone(),
                source,
            }
        })?;
        // The one place the password is used.
        let to_connect = url.to_connect().map_err(|source| DecisionDatabaseError::Url {
            url: shown.clone(),
            source,
        })?;
        let options: PgConnectOptions =
            to_connect
                .parse()
                .map_err(|source| DecisionDatabaseError::Connect {
                    url: shown.clone(),
                    source,
                })?;
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(Duration::from_secs(10))
            // A dead connection shows itself on use; `insert` tries again on another one.
            .test_before_acquire(false)
            .connect_with(options.application_name("treaty-coordinator"))
            .await
            .map_err(|source| DecisionDatabaseError::Connect {
                url: shown.clone(),
                source,
            })?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|source| DecisionDatabaseError::Migrate {
                url: shown.clone(),
                source,
            })?;
        let (ended, queue) = mpsc::unbounded_channel();
        tokio::spawn(delete_ended(pool.clone(), coordinator.clone(), queue));
        Ok(DecisionDatabase {
            shown_url: shown,
            pool,
            coordinator,
            rows: Mutex::new(HashSet::new()),
            ended,
        })
    }

    /// Commits the commit row of `record`: the decision. Tried again while the connection fails;
    /// an insert that finds the row already there succeeded on an attempt whose answer was lost
    /// when the row says commit.
    pub async fn insert(&self, record: &CommitRecord) -> Result<(), StoreError> {
        let mut delay = FIRST_RETRY;
        let mut attempt = 1;
        loop {
            let inserted = sqlx::query(
                "INSERT INTO treaty.decisions (gid, outcome, coordinator_id, participants) \
                 VALUES ($1, 'commit', $2, $3)",
            )
            .bind(&record.gid)
            .bind(self.coordinator.as_str())
            .bind(&record.participants)
            .execute(&self.pool)
            .await;
            let error = match inserted {
                Ok(_) => {
                    self.rows().insert(record.txid);
                    return Ok(());
                }
                Err(error) => error,
            };
            let code = error
                .as_database_error()
                .and_then(|db| db.code().map(|c| c.into_owned()));
            if code.as_deref() == Some(UNIQUE_VIOLATION) {
                self.already_there(&record.gid).await?;
                self.rows().insert(record.txid);
                return Ok(());
            }
            if error.as_database_error().is_some() || attempt >= INSERT_ATTEMPTS {
                return Err(StoreError(format!(
                    "decision database: inserting the commit row of {} (attempt {attempt}): {error}",
                    record.gid
                )));
            }
            tracing::warn!(gid = %record.gid, attempt, %error, "decision database: insert failed; trying again");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(LAST_RETRY);
            attempt += 1;
        }
    }

    async fn already_there(&self, gid: &str) -> Result<(), StoreError> {
        let outcome: Option<String> =
            sqlx::query_scalar("SELECT outcome FROM treaty.decisions WHERE gid = $1")
                .bind(gid)
                .fetch_optional(&self.pool)
                .await
                .map_err(|error| {
                    StoreError(format!("decision database: reading the row of {gid}: {error}"))
                })?;
        match outcome.as_deref() {
            Some("commit") => Ok(()),
            other => Err(StoreError(format!(
                "decision database: {gid} already holds outcome {other:?}; this coordinator's commit did not happen"
            ))),
        }
    }

    fn rows(&self) -> std::sync::MutexGuard<'_, HashSet<TxId>> {
        self.rows.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The transaction needs nothing more: its row, if it has one, goes with the next batch of
    /// deletes.
    pub fn end(&self, txid: TxId) {
        if !self.rows().remove(&txid) {
            return;
        }
        let gid = Gid::new(&self.coordinator, txid);
        // The deleting task ends only with the process.
        let _ = self.ended.send(gid.as_str().to_owned());
    }

    /// This coordinator's commit rows, oldest decision first: what a restart re-drives.
    pub async fn unfinished(&self) -> Result<Vec<CommitRecord>, DecisionDatabaseError> {
        let rows: Vec<(String, Vec<String>, i64)> = sqlx::query_as(
            "SELECT gid, participants, (extract(epoch FROM decided_at) * 1000)::bigint \
             FROM treaty.decisions WHERE outcome = 'commit' AND coordinator_id = $1 \
             ORDER BY decided_at, gid",
        )
        .bind(self.coordinator.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(|source| DecisionDatabaseError::Read {
            url: self.shown_url.clone(),
            source,
        })?;
        let mut records = Vec::with_capacity(rows.len());
        for (gid, participants, decided_at_ms) in rows {
            // Checked on read: a row under this id whose GID is not this id's is not ours to drive.
            match Gid::parse(&gid) {
                Ok(parsed)
                    if parsed.coordinator() == &self.coordinator && parsed.decision_shard().is_none() =>
                {
                    self.rows().insert(parsed.txid());
                    records.push(CommitRecord {
                        txid: parsed.txid(),
                        gid,
                        participants,
                        decided_at_ms: u64::try_from(decided_at_ms).unwrap_or(0),
                    });
                }
                _ => {
                    tracing::warn!(%gid, coordinator = %self.coordinator, "decision database: a commit row under this coordinator's id with a GID that is not its own; left alone")
                }
            }
        }
        Ok(records)
    }
}

/// Deletes the rows of ended transactions, many per statement.
async fn delete_ended(pool: PgPool, coordinator: CoordinatorId, mut queue: mpsc::UnboundedReceiver<String>) {
    while let Some(first) = queue.recv().await {
        let mut gids = vec![first];
        while gids.len() < DELETE_BATCH {
            match queue.try_recv() {
                Ok(gid) => gids.push(gid),
                Err(_) => break,
            }
        }
        let deleted = sqlx::query(
            "DELETE FROM treaty.decisions WHERE outcome = 'commit' AND coordinator_id = $1 AND gid = ANY($2)",
        )
        .bind(coordinator.as_str())
        .bind(&gids)
        .execute(&pool)
        .await;
        if let Err(error) = deleted {
            tracing::warn!(rows = gids.len(), %error, "decision database: deleting ended transactions' rows failed; a restart re-drives them once more");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The marker keeps the URL without its password, and one an older version wrote with a
    /// `?password=` parameter is shown redacted too.
    #[test]
    fn the_marker_never_holds_or_shows_a_password() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join(MARKER_FILE);
        record_in(
            &marker,
            &SecretUrl::new("postgres://u:hunter2@h/d?PassWord=hunter2"),
        )
        .unwrap();
        let written = std::fs::read_to_string(&marker).unwrap();
        assert!(!written.contains("hunter2"), "{written}");
        std::fs::write(&marker, "postgres://u@h/d?password=hunter2\n").unwrap();
        assert_eq!(
            recorded_in(&marker).as_deref(),
            Some("postgres://u@h/d?password=***")
        );
    }
}
