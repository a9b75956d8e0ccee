//! `treaty.decisions` (`migrations/0003_decisions.sql`): the commit decisions kept inside
//! PostgreSQL (`--decision-store shard`), one row per transaction whose GID names this shard as its
//! decision shard (`treaty:<coordinator>:<txid>@<shard>`). This module owns every statement on that
//! table: the commit row that the decision branch inserts right before its one-phase COMMIT (one
//! round trip: that COMMIT is the decision), the commit row of a dedicated decision database
//! (`standalone`), the reads that first conclude abort where no row is committed, and the listing
//! and deleting of commit and abort rows.
//!
//! The primary key on `gid` is what makes a decision final: a commit row and an abort row for the
//! same GID cannot both commit. An insert that meets the other's uncommitted row waits for its
//! transaction, then fails (unique violation) or goes on, so every statement here that must see a
//! decision made concurrently runs at READ COMMITTED, never at the database's default isolation.
//!
//! GIDs, coordinator ids and shard names are formatted into SQL text only from `Gid` and
//! `ShardName`, whose constructors restrict them to `[A-Za-z0-9_-:@]` (see `postgres.rs`); every
//! other statement binds them as parameters.

use std::sync::{Arc, LazyLock};

use tokio_postgres::Step;
use tokio_postgres::types::{ToSql, Type};
use treaty_proto::{CoordinatorId, DatabaseRole, Gid, ShardName};

use crate::pool::session::{self, Session, StatementFailed};
use crate::pool::{Connection, Pool, PooledConnection};
use crate::postgres::{DbError, bookkeeping_prelude, retrying, simple, write};

/// SQLSTATE `unique_violation`: the other outcome's row for the GID committed first.
const UNIQUE_VIOLATION: &str = "23505";
/// SQLSTATE `serialization_failure`: at REPEATABLE READ or SERIALIZABLE, the decision branch's
/// insert met an abort row committed after its snapshot; the same meaning as a unique violation.
const SERIALIZATION_FAILURE: &str = "40001";

/// Most rows `ListDecisions` answers with.
pub const MAX_LIST: u32 = 100_000;
/// What `ListDecisions` answers with when the request sets no limit.
pub const DEFAULT_LIST: u32 = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Commit,
    Abort,
}

/// One row of `treaty.decisions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDecision {
    pub gid: String,
    pub outcome: Outcome,
    pub participants: Vec<String>,
    /// Unix milliseconds, from the database's clock.
    pub decided_at_ms: u64,
}

/// The row as selected: gid, outcome, participants, decided_at in unix ms.
type Row = (String, String, Vec<String>, i64);

fn stored(row: Row) -> Result<StoredDecision, DbError> {
    let (gid, outcome, participants, decided_at_ms) = row;
    let outcome = match outcome.as_str() {
        "commit" => Outcome::Commit,
        "abort" => Outcome::Abort,
        // Treaty writes no other value (the table has no CHECK for it since migrations/0004: it
        // cost every commit row's insert); a row that has one was written by someone else.
        other => {
            return Err(DbError::Client(format!(
                "treaty.decisions holds outcome {other:?} for {gid}; expected 'commit' or 'abort'"
            )));
        }
    };
    Ok(StoredDecision {
        gid,
        outcome,
        participants,
        // Before 1970 only on a server whose clock is badly wrong; 0 says "unknown" plainly.
        decided_at_ms: u64::try_from(decided_at_ms).unwrap_or(0),
    })
}

const COLUMNS: &str = "gid, outcome, participants, (extract(epoch FROM decided_at) * 1000)::bigint";

/// Whether the decision row's insert failed because the other outcome got there first.
fn lost_to_abort(error: &DbError) -> bool {
    matches!(error, DbError::Sql { sqlstate, .. }
        if sqlstate == UNIQUE_VIOLATION || sqlstate == SERIALIZATION_FAILURE)
}

/// The commit row's `INSERT` as a statement prepared once per connection and bound per decision:
/// PostgreSQL parses, analyses and plans it once, not on every transaction (the text form cost
/// it about 60 µs more per decision, pgbench on this table: docs/performance.md, Session 20).
/// The comment keeps the text apart from any client statement in the connection's cache.
/// The commit row, inserted only once the transaction is made durable whatever the branch set
/// (`postgres::ROLE_AND_DURABILITY`, here inside the insert so that the decision's round trip
/// carries no statement more): its COMMIT is the decision, and one acknowledged before its WAL
/// is flushed could be lost after other shards committed.
const COMMIT_ROW: &str = concat!(
    "/* treaty: commit row */ INSERT INTO treaty.decisions \
     (gid, outcome, coordinator_id, participants) SELECT $1, 'commit', $2, $3 WHERE ",
    crate::postgres::durable!(),
    " IS NOT NULL"
);
const COMMIT_ROW_TYPES: [Type; 3] = [Type::TEXT, Type::TEXT, Type::TEXT_ARRAY];
static COMMIT_ROW_KEY: LazyLock<Arc<str>> = LazyLock::new(|| Arc::from(COMMIT_ROW));

/// The `INSERT` of `gid`'s commit row. Safe to format: see the module documentation.
fn commit_row_sql(gid: &Gid, participants: &[ShardName]) -> String {
    let participants = participants
        .iter()
        .map(|shard| format!("'{shard}'"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT INTO treaty.decisions (gid, outcome, coordinator_id, participants) \
         SELECT '{gid}', 'commit', '{}', ARRAY[{participants}]::text[] WHERE {} IS NOT NULL",
        gid.coordinator(),
        crate::postgres::durable!()
    )
}

/// Why the decision branch did not commit its commit row.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommitRowError {
    /// A deferred constraint of the client's failed when it was checked before the commit row
    /// (a branch under a client's role checks them first, under that role): the branch cannot
    /// commit.
    #[error(
        "a deferred constraint of the decision branch {gid} failed before its commit row was inserted, so \
         it cannot commit: {error}"
    )]
    Deferred { gid: String, error: DbError },
    /// An abort row for the GID was committed first (or is being: the insert waited for it).
    #[error("the transaction was concluded aborted first: an abort row for {gid} won ({error})")]
    ConcludedAbort { gid: String, error: DbError },
    /// The insert failed for another reason; the branch's transaction cannot commit.
    #[error("the decision row for {gid} could not be inserted: {error}")]
    Insert { gid: String, error: DbError },
    /// The insert went through and COMMIT failed: PostgreSQL rolled the branch back (a deferred
    /// constraint, a serialization failure at commit).
    #[error("COMMIT of the decision branch {gid} failed and rolled it back: {error}")]
    Commit { gid: String, error: DbError },
}

impl CommitRowError {
    pub fn db(&self) -> &DbError {
        match self {
            CommitRowError::Deferred { error, .. }
            | CommitRowError::ConcludedAbort { error, .. }
            | CommitRowError::Insert { error, .. }
            | CommitRowError::Commit { error, .. } => error,
        }
    }
}

/// Inserts `gid`'s commit row in the open transaction on `connection` (the decision branch) and
/// commits it, with the session check after when due, in one round trip; a branch under a client's `role`
/// first checks its deferred constraints under that role and writes the row under the
/// participant's (`postgres::bookkeeping_prelude`). On an error the transaction may still be open
/// (a failed statement skips the rest): the caller rolls it back, which is harmless if COMMIT
/// already ended it. A connection error (`db().is_connection()`) leaves the outcome unknown.
pub async fn insert_and_commit(
    connection: &mut PooledConnection,
    gid: &Gid,
    participants: &[ShardName],
    role: Option<&DatabaseRole>,
) -> Result<Session, CommitRowError> {
    if role.is_some() {
        return insert_and_commit_as_text(connection, gid, participants, role).await;
    }
    let clean = connection.clean_session();
    let statement = match connection.prepared(&COMMIT_ROW_KEY, &COMMIT_ROW_TYPES).await {
        Ok(statement) => statement,
        Err(error) => {
            let gid = gid.to_string();
            return Err(CommitRowError::Insert { gid, error });
        }
    };
    let connection: &Connection = connection;
    let gid_text = gid.as_str();
    let coordinator = gid.coordinator().as_str();
    let participants: Vec<&str> = participants.iter().map(ShardName::as_str).collect();
    let params: [&(dyn ToSql + Sync); 3] = [&gid_text, &coordinator, &participants];
    // One pipeline, one answer. After a failed insert PostgreSQL skips the COMMIT (the caller
    // rolls back), so the insert's answer decides.
    let steps = [Step::Prepared(&statement, &params), Step::Text("COMMIT")];
    let (mut answers, ended) = session::steps_and_check(connection, &steps, 1, clean.as_deref()).await;
    let inserted = answers.swap_remove(0);
    let gid = gid.to_string();
    match (inserted, ended) {
        (Err(error), _) if lost_to_abort(&error) => Err(CommitRowError::ConcludedAbort { gid, error }),
        (Err(error), _) => Err(CommitRowError::Insert { gid, error }),
        (Ok(_), Err(StatementFailed { error, .. })) => Err(CommitRowError::Commit { gid, error }),
        (Ok(_), Ok(session)) => Ok(session),
    }
}

/// `insert_and_commit` for a branch under a client's role, as one simple-query text: the commit
/// row's statement is prepared under the participant's role, and until `SET LOCAL ROLE NONE` has
/// run the branch is under the client's, which may not even see the `treaty` schema.
async fn insert_and_commit_as_text(
    connection: &mut PooledConnection,
    gid: &Gid,
    participants: &[ShardName],
    role: Option<&DatabaseRole>,
) -> Result<Session, CommitRowError> {
    let (prelude, insert_at) = bookkeeping_prelude(role);
    let sql = format!("{prelude}{}; COMMIT", commit_row_sql(gid, participants));
    let clean = connection.clean_session();
    let StatementFailed { index, error } =
        match session::end_and_check(connection, &sql, insert_at + 2, clean.as_deref()).await {
            Ok(session) => return Ok(session),
            Err(failed) => failed,
        };
    let gid = gid.to_string();
    Err(match index {
        index if index < insert_at => CommitRowError::Deferred { gid, error },
        index if index == insert_at && lost_to_abort(&error) => CommitRowError::ConcludedAbort { gid, error },
        index if index == insert_at => CommitRowError::Insert { gid, error },
        _ => CommitRowError::Commit { gid, error },
    })
}

/// The answer to a commit-row insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowCommit {
    Committed,
    /// The abort row won; why, for the coordinator.
    NotCommitted(String),
}

/// Inserts `gid`'s commit row in a transaction of its own (a dedicated decision database, which
/// holds no branch of the transaction), at READ COMMITTED, one round trip. Safe to repeat: a
/// commit row already there is this same decision, inserted by an earlier attempt whose answer was
/// lost, and counts as committed.
pub async fn insert_standalone(
    pool: &Pool,
    gid: &Gid,
    participants: &[ShardName],
) -> Result<RowCommit, DbError> {
    let sql = format!(
        "BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE; {}; COMMIT",
        commit_row_sql(gid, participants)
    );
    retrying(pool, |connection| {
        let (sql, gid) = (sql.clone(), gid.to_string());
        Box::pin(async move {
            let Err(error) = simple(connection, &sql).await else {
                return Ok(RowCommit::Committed);
            };
            // A failed statement skips the rest of the text and leaves the transaction open; a
            // connection whose ROLLBACK fails too is closed, never pooled in that state.
            if let Err(rollback) = simple(connection, "ROLLBACK").await {
                return Err(DbError::Connection(format!(
                    "{error}; then ROLLBACK failed too: {rollback}"
                )));
            }
            if !lost_to_abort(&error) {
                return Err(error);
            }
            let rows = connection
                .client()
                .query_typed(
                    "SELECT outcome FROM treaty.decisions WHERE gid = $1",
                    &[(&gid, Type::TEXT)],
                )
                .await?;
            let outcome: Option<String> = match rows.first() {
                Some(row) => Some(row.try_get(0)?),
                None => None,
            };
            Ok(match outcome.as_deref() {
                Some("commit") => RowCommit::Committed,
                _ => RowCommit::NotCommitted(format!(
                    "the transaction was concluded aborted first: an abort row for {gid} won ({error})"
                )),
            })
        })
    })
    .await
}

/// Ends the transaction `BEGIN ISOLATION LEVEL READ COMMITTED` opened on `connection`: COMMIT
/// after `result` succeeded, ROLLBACK after it failed. A rollback that fails too comes back as a
/// connection error, so that the connection (whose transaction state is then unknown) is closed
/// rather than pooled.
async fn end_transaction<T>(connection: &Connection, result: Result<T, DbError>) -> Result<T, DbError> {
    match result {
        Ok(value) => {
            simple(connection, "COMMIT").await?;
            Ok(value)
        }
        Err(error) => {
            if let Err(rollback) = simple(connection, "ROLLBACK").await {
                return Err(DbError::Connection(format!(
                    "{error}; then ROLLBACK failed too: {rollback}"
                )));
            }
            Err(error)
        }
    }
}

/// The decision rows of `gids` (those that have one). With `conclude_abort`, first inserts an abort
/// row for every GID that has none, in GID order (two concluders then wait for each other in one
/// order, never in a cycle). An insert that meets the uncommitted commit row of a decision branch
/// waits for it: afterwards every GID has a committed row, and the answer is final. Safe to
/// repeat.
pub async fn read(pool: &Pool, gids: &[Gid], conclude_abort: bool) -> Result<Vec<StoredDecision>, DbError> {
    if gids.is_empty() {
        return Ok(Vec::new());
    }
    let mut sorted: Vec<(&str, &str)> = gids
        .iter()
        .map(|gid| (gid.as_str(), gid.coordinator().as_str()))
        .collect();
    sorted.sort_unstable();
    sorted.dedup();
    let (texts, coordinators): (Vec<String>, Vec<String>) = sorted
        .into_iter()
        .map(|(gid, coordinator)| (gid.to_owned(), coordinator.to_owned()))
        .unzip();
    let rows: Vec<Row> = retrying(pool, |connection| {
        let (texts, coordinators) = (texts.clone(), coordinators.clone());
        Box::pin(async move {
            // Never the database's default isolation: at REPEATABLE READ or SERIALIZABLE the
            // insert that waited for a commit row would fail instead of letting the read see it.
            simple(connection, "BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE").await?;
            let result = read_in_transaction(connection, &texts, &coordinators, conclude_abort).await;
            end_transaction(connection, result).await
        })
    })
    .await?;
    rows.into_iter().map(stored).collect()
}

async fn read_in_transaction(
    connection: &Connection,
    gids: &[String],
    coordinators: &[String],
    conclude_abort: bool,
) -> Result<Vec<Row>, DbError> {
    if conclude_abort {
        connection
            .client()
            .query_typed(
                "INSERT INTO treaty.decisions (gid, outcome, coordinator_id) \
                 SELECT t.gid, 'abort', t.coordinator_id \
                 FROM unnest($1::text[], $2::text[]) AS t(gid, coordinator_id) \
                 ORDER BY t.gid \
                 ON CONFLICT (gid) DO NOTHING",
                &[(&gids, Type::TEXT_ARRAY), (&coordinators, Type::TEXT_ARRAY)],
            )
            .await?;
    }
    // A statement of its own: at READ COMMITTED it sees the rows committed while the insert
    // waited.
    let rows = connection
        .client()
        .query_typed(
            &format!("SELECT {COLUMNS} FROM treaty.decisions WHERE gid = ANY($1)"),
            &[(&gids, Type::TEXT_ARRAY)],
        )
        .await?;
    rows.iter().map(row_of).collect()
}

/// A selected row (`COLUMNS`) as its fields.
fn row_of(row: &tokio_postgres::Row) -> Result<Row, DbError> {
    Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?, row.try_get(3)?))
}

/// The `outcome` column's value for `outcome`: SQL text from a fixed set, never from a caller.
fn outcome_sql(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Commit => "'commit'",
        Outcome::Abort => "'abort'",
    }
}

/// The rows of `outcome`, oldest first, at most `limit`, optionally only `coordinator`'s.
pub async fn list(
    pool: &Pool,
    outcome: Outcome,
    coordinator: Option<&CoordinatorId>,
    limit: u32,
) -> Result<Vec<StoredDecision>, DbError> {
    let coordinator = coordinator.map(|id| id.as_str().to_owned());
    let rows: Vec<Row> = retrying(pool, |connection| {
        let coordinator = coordinator.clone();
        Box::pin(async move {
            // Two texts rather than `$2 IS NULL OR ...`: each form gets a plan of its own. (No
            // index serves the filter: the table stays small, and nearly every row matches when
            // one or a few coordinators run; migrations/0004.)
            let filter = if coordinator.is_some() {
                "AND coordinator_id = $2 "
            } else {
                ""
            };
            let sql = format!(
                "SELECT {COLUMNS} FROM treaty.decisions WHERE outcome = {} {filter}\
                 ORDER BY decided_at, gid LIMIT $1",
                outcome_sql(outcome)
            );
            let limit = i64::from(limit);
            let rows = match &coordinator {
                Some(coordinator) => {
                    connection
                        .client()
                        .query_typed(&sql, &[(&limit, Type::INT8), (coordinator, Type::TEXT)])
                        .await?
                }
                None => {
                    connection
                        .client()
                        .query_typed(&sql, &[(&limit, Type::INT8)])
                        .await?
                }
            };
            rows.iter().map(row_of).collect::<Result<Vec<Row>, DbError>>()
        })
    })
    .await?;
    rows.into_iter().map(stored).collect()
}

/// Deletes the rows of `outcome` for `gids`; rows of the other outcome stay. Commit rows go once
/// every branch has committed (`ForgetDecisions`), while their abort rows stay: a late decision
/// branch must still lose to them. Abort rows go only once the caller made sure no decision branch
/// of theirs can still commit (`Agent::collect_abort_rows`). Answers how many rows went.
pub async fn delete(pool: &Pool, outcome: Outcome, gids: &[String]) -> Result<u64, DbError> {
    let sql = format!(
        "DELETE FROM treaty.decisions WHERE outcome = {} AND gid = ANY($1)",
        outcome_sql(outcome)
    );
    retrying(pool, |connection| {
        let (sql, gids) = (sql.clone(), gids.to_vec());
        Box::pin(async move { write(connection, &sql, &[(&gids, Type::TEXT_ARRAY)]).await })
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commit_row_is_formatted_from_checked_names() {
        let coordinator = CoordinatorId::new("c1").unwrap();
        let s0 = ShardName::new("s0").unwrap();
        let gid = Gid::with_decision_shard(&coordinator, 42, &s0).unwrap();
        let participants = [s0, ShardName::new("NULL").unwrap()];
        // Quoted elements: an unquoted NULL in an array literal would be a null.
        assert_eq!(
            commit_row_sql(&gid, &participants),
            "INSERT INTO treaty.decisions (gid, outcome, coordinator_id, participants) \
             SELECT 'treaty:c1:42@s0', 'commit', 'c1', ARRAY['s0', 'NULL']::text[] \
             WHERE pg_catalog.set_config('synchronous_commit', 'on', true) IS NOT NULL"
        );
        assert!(commit_row_sql(&gid, &[]).contains("ARRAY[]::text[] WHERE"));
        // Both forms make the decision's COMMIT durable whatever the branch set.
        assert!(COMMIT_ROW.contains("set_config('synchronous_commit', 'on', true)"));
    }

    #[test]
    fn each_outcome_has_its_own_fixed_literal() {
        assert_eq!(outcome_sql(Outcome::Commit), "'commit'");
        assert_eq!(outcome_sql(Outcome::Abort), "'abort'");
    }

    #[test]
    fn only_the_other_outcome_winning_is_a_lost_decision() {
        let sql = |sqlstate: &str| DbError::Sql {
            sqlstate: sqlstate.into(),
            message: String::new(),
        };
        assert!(lost_to_abort(&sql("23505")));
        assert!(lost_to_abort(&sql("40001")));
        assert!(!lost_to_abort(&sql("42P01")));
        assert!(!lost_to_abort(&DbError::Connection("gone".into())));
    }
}
