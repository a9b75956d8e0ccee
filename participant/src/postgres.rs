//! The SQL the participant sends on its own behalf: opening a branch, the vote (marker row and
//! `PREPARE TRANSACTION` in one round trip; no marker for a GID that names a decision shard, whose
//! decision row is the authority, `decisions.rs`), phase two, the marker table, `pg_prepared_xacts`, and
//! the classification of driver errors.
//!
//! A branch opened with a client's database role runs `SET LOCAL ROLE` in BEGIN's round trip, and
//! returns to the participant's role (`bookkeeping_prelude`) in the round trip that writes
//! Treaty's own row and prepares, so the role costs no round trip. A statement that ends a branch
//! carries the session check after it in the same round trip when one is due (`pool`,
//! `pool::session`).
//!
//! A GID is formatted into SQL text only here (and in `decisions.rs`) and only from a `Gid` or
//! `BranchGid`, whose constructors restrict it to `[A-Za-z0-9_-:@]`; PostgreSQL does not accept it
//! as a bind parameter.
//!
//! PostgreSQL holds a branch prepared under its `BranchGid` (`<gid>:<shard>`, unique per server);
//! the marker row keeps the transaction's `Gid` (the marker table is per database). A branch an
//! older participant prepared under the bare `Gid` text (the legacy form) is still found and
//! finished here, under that exact text.

use futures::TryStreamExt as _;
use futures::future::BoxFuture;
use tokio_postgres::types::{ToSql, Type};
use treaty_proto::{BranchGid, DatabaseRole, Gid, ShardName};

use crate::pool::session::{self, Session};
use crate::pool::{Connection, Pool, PooledConnection};

/// SQLSTATE `undefined_object`: "prepared transaction with identifier ... does not exist".
const UNDEFINED_OBJECT: &str = "42704";

/// A failed database call, sorted by what the caller can conclude from it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DbError {
    /// PostgreSQL answered with an error; the connection is fine.
    #[error("SQLSTATE {sqlstate}: {message}")]
    Sql { sqlstate: String, message: String },
    /// The connection broke or none could be had: whether the statement ran is unknown.
    #[error("database connection failed: {0}")]
    Connection(String),
    /// The client side refused (encoding a parameter, an unexpected answer).
    #[error("{0}")]
    Client(String),
}

impl DbError {
    pub fn is_undefined_object(&self) -> bool {
        matches!(self, DbError::Sql { sqlstate, .. } if sqlstate == UNDEFINED_OBJECT)
    }

    pub fn is_connection(&self) -> bool {
        matches!(self, DbError::Connection(_))
    }
}

impl From<tokio_postgres::Error> for DbError {
    fn from(error: tokio_postgres::Error) -> DbError {
        if let Some(database) = error.as_db_error() {
            let sqlstate = database.code().code().to_owned();
            let mut message = database.message().to_owned();
            for extra in [database.detail(), database.hint()].into_iter().flatten() {
                message.push_str(" (");
                message.push_str(extra);
                message.push(')');
            }
            // FATAL ends the session (e.g. 57P01 when the server shuts down or the backend is
            // terminated): the connection is gone, not just the statement.
            let session_ended = matches!(
                database.parsed_severity(),
                Some(tokio_postgres::error::Severity::Fatal | tokio_postgres::error::Severity::Panic)
            )
                // 08P01 at ERROR severity is a bad bind (e.g. wrong parameter count): the
                // statement failed, the session lives on.
                || (sqlstate.starts_with("08") && sqlstate != "08P01")
                || sqlstate.starts_with("57P");
            return if session_ended {
                DbError::Connection(format!("SQLSTATE {sqlstate}: {message}"))
            } else {
                DbError::Sql { sqlstate, message }
            };
        }
        let io = std::error::Error::source(&error).is_some_and(|source| source.is::<std::io::Error>());
        // The rest of tokio-postgres' kinds are not public; these are the ones that leave the
        // session's state unknown (closed, I/O, an answer it could not read).
        let text = error.to_string();
        if error.is_closed()
            || io
            || text.starts_with("unexpected message from server")
            || text.starts_with("error parsing response from server")
            || text.starts_with("error communicating with the server")
        {
            DbError::Connection(text)
        } else {
            DbError::Client(text)
        }
    }
}

/// The claim's own session (`claim.rs`) is sqlx's.
impl From<sqlx::Error> for DbError {
    fn from(error: sqlx::Error) -> DbError {
        match error {
            sqlx::Error::Database(database) => {
                let sqlstate = database
                    .code()
                    .map_or_else(|| "XX000".to_owned(), |c| c.into_owned());
                let mut message = database.message().to_owned();
                let pg = database.try_downcast_ref::<sqlx::postgres::PgDatabaseError>();
                if let Some(pg) = pg {
                    for extra in [pg.detail(), pg.hint()].into_iter().flatten() {
                        message.push_str(" (");
                        message.push_str(extra);
                        message.push(')');
                    }
                }
                // FATAL ends the session (e.g. 57P01 when the server shuts down or the backend is
                // terminated): the connection is gone, not just the statement.
                let session_ended = pg
                    .is_some_and(|pg| matches!(pg.severity(), sqlx::postgres::PgSeverity::Fatal | sqlx::postgres::PgSeverity::Panic))
                    // 08P01 at ERROR severity is a bad bind (e.g. wrong parameter count): the
                    // statement failed, the session lives on.
                    || (sqlstate.starts_with("08") && sqlstate != "08P01")
                    || sqlstate.starts_with("57P");
                if session_ended {
                    DbError::Connection(format!("SQLSTATE {sqlstate}: {message}"))
                } else {
                    DbError::Sql { sqlstate, message }
                }
            }
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => DbError::Connection(error.to_string()),
            other => DbError::Client(other.to_string()),
        }
    }
}

/// Runs text without parameters (one or more statements, simple protocol).
pub(crate) async fn simple(connection: &Connection, sql: &str) -> Result<(), DbError> {
    connection.simple(sql).await
}

/// One of the participant's own writes (`sql` with `params`, one statement) in a transaction of
/// its own: the pool's sessions are read-only by default (`Pool::with_session_defaults`), so it
/// opens `READ WRITE`, pipelined with the statement and the COMMIT in one round trip. A failed
/// statement leaves the transaction aborted and the COMMIT rolls it back, so the session is
/// left outside any transaction either way. Answers the rows affected.
pub(crate) async fn write(
    connection: &Connection,
    sql: &str,
    params: &[(&(dyn ToSql + Sync), Type)],
) -> Result<u64, DbError> {
    let client = connection.client();
    let statement = async {
        let rows = client
            .query_typed_raw(sql, params.iter().map(|(value, ty)| (*value, ty.clone())))
            .await?;
        futures::pin_mut!(rows);
        while rows.try_next().await?.is_some() {}
        Ok::<_, tokio_postgres::Error>(rows.rows_affected().unwrap_or(0))
    };
    let (begin, affected, commit) = futures::join!(
        client.batch_execute("BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE"),
        statement,
        client.batch_execute("COMMIT")
    );
    begin?;
    let affected = affected?;
    commit?;
    Ok(affected)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Isolation {
    #[default]
    ReadCommitted,
    RepeatableRead,
    Serializable,
}

/// How a branch's transaction is opened.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BranchOptions {
    pub isolation: Isolation,
    /// `SET LOCAL lock_timeout`, when given.
    pub lock_timeout_ms: Option<u32>,
    /// `SET LOCAL statement_timeout`, when given.
    pub statement_timeout_ms: Option<u32>,
    /// `SET LOCAL ROLE`, when given: the client's statements run under this role, Treaty's own
    /// rows under the participant's (`ROLE_FOR_BOOKKEEPING`).
    pub database_role: Option<DatabaseRole>,
    /// The coordinator already ran a statement of this branch (`BranchExecuteRequest.continues`):
    /// a call that finds no open branch refuses instead of opening one without those statements.
    pub continues: bool,
}

/// The expression that makes the open transaction's commit durable whatever it set before
/// (`synchronous_commit = on` until it ends); `ROLE_AND_DURABILITY` and the commit row's insert
/// (`decisions::COMMIT_ROW`) both run it.
macro_rules! durable {
    () => {
        "pg_catalog.set_config('synchronous_commit', 'on', true)"
    };
}
pub(crate) use durable;

/// The SQL of `ROLE_AND_DURABILITY`, a macro so that the preludes built on it are `concat!`ed
/// constants rather than copies.
macro_rules! role_and_durability {
    () => {
        concat!("SELECT pg_catalog.set_config('role', 'none', true), ", durable!())
    };
}

/// The participant's role back, and the vote or decision made durable whatever the branch set:
/// `SET LOCAL ROLE NONE` and `SET LOCAL synchronous_commit = on` in one statement. A client's
/// `SET LOCAL synchronous_commit = off` (or a function's `set_config`) would otherwise let the
/// decision branch's COMMIT be acknowledged before its WAL is flushed, and a PREPARE TRANSACTION
/// skip the wait for a synchronous standby: a crash or a failover then loses a decision or a YES
/// vote that other shards already acted on. `on` flushes locally and waits for synchronous
/// standbys when there are any; it is never less durable than another setting (`remote_apply`
/// waits for the same flush, then for the standby to apply). Prepared once per connection
/// (`statement::constants_prepared`).
pub const ROLE_AND_DURABILITY: &str = role_and_durability!();

/// Sent before Treaty's own work in a branch that runs under a client's role, in the same round
/// trip: first every deferred constraint trigger the client's statements queued fires, still
/// under the client's role (at COMMIT or PREPARE they would fire under the participant's, with its
/// privileges); then `ROLE_AND_DURABILITY`: the participant's own role writes the marker or
/// decision row, which the client's role may not touch, and runs PREPARE TRANSACTION, since
/// PostgreSQL lets only the role that prepared a transaction (or a superuser) finish it. Two
/// statements.
const ROLE_FOR_BOOKKEEPING: &str = concat!("SET CONSTRAINTS ALL IMMEDIATE; ", role_and_durability!(), "; ");

/// `ROLE_AND_DURABILITY` as the prelude of a branch under the participant's own role.
const OWN_ROLE_AND_DURABILITY: &str = concat!(role_and_durability!(), "; ");

/// What goes before Treaty's own rows in a branch: `ROLE_FOR_BOOKKEEPING` when it runs under a
/// client's role, else nothing; and how many statements that is.
pub(crate) fn bookkeeping_prelude(role: Option<&DatabaseRole>) -> (&'static str, usize) {
    match role {
        Some(_) => (ROLE_FOR_BOOKKEEPING, 2),
        None => ("", 0),
    }
}

/// The timeouts a pool's connections start with (`Pool::with_session_defaults`, PostgreSQL's
/// `options` startup parameter); `None`: PostgreSQL's own default (no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SessionDefaults {
    pub lock_timeout_ms: Option<u32>,
    pub statement_timeout_ms: Option<u32>,
}

/// `BEGIN`, a `SET LOCAL` for each timeout the branch wants other than what its session starts
/// with (a `SET LOCAL` costs PostgreSQL a parse, an execution and a restore at the end of the
/// transaction, about 10 µs each: measured in docs/performance.md, Session 13), and last the
/// client's role, so that everything after runs under it.
pub(crate) fn begin_sql(options: &BranchOptions, session: &SessionDefaults) -> String {
    let isolation = match options.isolation {
        Isolation::ReadCommitted => "READ COMMITTED",
        Isolation::RepeatableRead => "REPEATABLE READ",
        Isolation::Serializable => "SERIALIZABLE",
    };
    let mut sql = format!("BEGIN ISOLATION LEVEL {isolation} READ WRITE");
    if options.lock_timeout_ms != session.lock_timeout_ms {
        let ms = options.lock_timeout_ms.unwrap_or(0);
        sql.push_str(&format!("; SET LOCAL lock_timeout = {ms}"));
    }
    if options.statement_timeout_ms != session.statement_timeout_ms {
        let ms = options.statement_timeout_ms.unwrap_or(0);
        sql.push_str(&format!("; SET LOCAL statement_timeout = {ms}"));
    }
    if let Some(role) = &options.database_role {
        sql.push_str("; SET LOCAL ROLE ");
        sql.push_str(&role.quoted());
    }
    sql
}

/// Ends the branch's transaction with ROLLBACK, the session check (when due) in the same round
/// trip.
pub async fn rollback(connection: &mut PooledConnection) -> Result<Session, DbError> {
    end(connection, "ROLLBACK", 1).await
}

/// Ends the branch's transaction with COMMIT, the session check (when due) in the same round trip. Deferred
/// constraint triggers fire under the branch's role, as they would for the client.
pub async fn commit(connection: &mut PooledConnection) -> Result<Session, DbError> {
    end(connection, "COMMIT", 1).await
}

/// `sql` (`statements` statements, ending the transaction) and the session check when due, one
/// round trip.
async fn end(connection: &mut PooledConnection, sql: &str, statements: usize) -> Result<Session, DbError> {
    let clean = connection.clean_session();
    session::end_and_check(connection, sql, statements, clean.as_deref())
        .await
        .map_err(|failed| failed.error)
}

/// True when the open transaction has no transaction id, i.e. wrote nothing. Asked under the
/// branch's role, which may only ever mislead its own branch; qualified, since that role may have
/// changed `search_path`.
pub async fn wrote_nothing(connection: &Connection) -> Result<bool, DbError> {
    let row = connection
        .client()
        .query_typed("SELECT pg_catalog.txid_current_if_assigned() IS NULL", &[])
        .await?;
    one_value(&row)
}

/// The first column of the one row a query answers.
fn one_value<T: for<'a> tokio_postgres::types::FromSql<'a>>(
    rows: &[tokio_postgres::Row],
) -> Result<T, DbError> {
    let row = rows
        .first()
        .ok_or_else(|| DbError::Client(format!("expected one row, PostgreSQL answered {}", rows.len())))?;
    row.try_get(0).map_err(DbError::from)
}

/// The vote's SQL and how many statements it holds: the marker row and `PREPARE TRANSACTION`,
/// the marker under the participant's role when the branch runs under a client's.
pub(crate) fn prepare_sql(
    gid: &Gid,
    branch: &BranchGid,
    role: Option<&DatabaseRole>,
) -> Result<(String, usize), DbError> {
    // The role goes back before PREPARE TRANSACTION even without a marker: PostgreSQL lets only
    // the role that prepared a transaction (or a superuser) finish it, and the participant
    // finishes it under its own. A branch under the participant's role returns to it too: a
    // function may have moved the session's role (`set_config('role', ...)`, in this branch or,
    // on a connection passed on unchecked within one role, an earlier one: `pool`), and a branch
    // prepared under another role would stay prepared, holding its locks, until an operator with
    // that role or a superuser finished it.
    let (prelude, prelude_statements) = match role {
        Some(_) => bookkeeping_prelude(role),
        None => (OWN_ROLE_AND_DURABILITY, 1),
    };
    // A transaction whose decision is a row on its decision shard needs no marker: that row says
    // whether the branch committed, and a branch found not prepared is answered from it by the
    // coordinator (`Agent::commit_prepared`). One insert and one index entry fewer per branch.
    if gid.decision_shard().is_some() {
        return Ok((
            format!("{prelude}PREPARE TRANSACTION '{branch}'"),
            prelude_statements + 1,
        ));
    }
    let txid = i64::try_from(gid.txid())
        .map_err(|_| DbError::Client(format!("txid of {gid} does not fit the marker table's bigint")))?;
    Ok((
        format!(
            "{prelude}INSERT INTO treaty.branches (gid, coordinator_id, txid) VALUES ('{gid}', '{}', {txid}); \
             PREPARE TRANSACTION '{branch}'",
            gid.coordinator()
        ),
        prelude_statements + 2,
    ))
}

/// Writes the marker row (under `gid`) inside the branch and prepares it (as `branch`), with the
/// session check after when due, in one round trip; no marker for a GID that names a decision shard. After
/// success the session has no open transaction.
pub async fn insert_marker_and_prepare(
    connection: &mut PooledConnection,
    gid: &Gid,
    branch: &BranchGid,
    role: Option<&DatabaseRole>,
) -> Result<Session, DbError> {
    let (sql, statements) = prepare_sql(gid, branch, role)?;
    end(connection, &sql, statements).await
}

/// Runs `attempt` on a pooled connection, and again on another one while the connection turns out
/// to be dead. Pooled connections are not pinged before use (that would cost a round trip on every
/// call); after a PostgreSQL restart each one finds out on first use and is closed. Only for work
/// that is safe to repeat.
pub async fn retrying<T, F>(pool: &Pool, mut attempt: F) -> Result<T, DbError>
where
    F: for<'c> FnMut(&'c mut Connection) -> BoxFuture<'c, Result<T, DbError>>,
{
    let attempts = pool.max_connections() + 1;
    let mut tried = 0;
    loop {
        let mut connection = pool.acquire().await?;
        tried += 1;
        // Until the statement completes: if this call is dropped halfway, an answer left unread
        // (an error, say) would otherwise be read as the next user's.
        connection.close_on_drop();
        match attempt(&mut connection).await {
            Err(DbError::Connection(_)) if tried < attempts => {}
            Err(error) => {
                if !error.is_connection() {
                    connection.return_on_drop();
                }
                return Err(error);
            }
            Ok(value) => {
                connection.return_on_drop();
                return Ok(value);
            }
        }
    }
}

async fn on_pool(pool: &Pool, sql: String) -> Result<(), DbError> {
    retrying(pool, |connection| {
        let sql = sql.clone();
        Box::pin(async move { simple(connection, &sql).await })
    })
    .await
}

pub async fn commit_prepared(pool: &Pool, branch: &BranchGid) -> Result<(), DbError> {
    finish_prepared(pool, "COMMIT PREPARED", branch).await
}

pub async fn rollback_prepared(pool: &Pool, branch: &BranchGid) -> Result<(), DbError> {
    finish_prepared(pool, "ROLLBACK PREPARED", branch).await
}

/// `ROLLBACK PREPARED` of exactly `branch` on `connection` (a session with no transaction open).
pub async fn rollback_prepared_on(connection: &Connection, branch: &BranchGid) -> Result<(), DbError> {
    simple(connection, &format!("ROLLBACK PREPARED '{branch}'")).await
}

/// `verb` on `branch`; when PostgreSQL holds no such branch but holds the legacy form in this
/// database, `verb` on that. The fallback costs a query only on the "does not exist" path, which
/// is rare (repeats, branches rolled back meanwhile), so the common case stays one round trip.
async fn finish_prepared(pool: &Pool, verb: &str, branch: &BranchGid) -> Result<(), DbError> {
    let error = match finish_exactly(pool, verb, branch).await {
        // Nothing prepares a GID that names a decision shard under the legacy form, which is
        // older than such GIDs: no query for it.
        Err(error)
            if error.is_undefined_object()
                && !branch.is_legacy()
                && branch.gid().decision_shard().is_none() =>
        {
            error
        }
        done => return done,
    };
    let legacy = BranchGid::legacy(branch.gid());
    // Only from this database: the same text prepared in another database of the server is not
    // this shard's branch, and finishing it from here would fail anyway.
    if !is_prepared_here(pool, &legacy).await? {
        return Err(error);
    }
    tracing::info!(gid = %legacy, "finishing a branch prepared under the legacy GID form");
    finish_exactly(pool, verb, &legacy).await
}

/// `verb` (`COMMIT PREPARED` or `ROLLBACK PREPARED`) on exactly `branch`, whichever shard it
/// names, with no legacy fallback: the step `finish_prepared` is made of, and what recovery uses
/// for orphans (see `reconcile`).
pub async fn finish_exactly(pool: &Pool, verb: &str, branch: &BranchGid) -> Result<(), DbError> {
    on_pool(pool, format!("{verb} '{branch}'")).await
}

/// The texts PostgreSQL may hold `branch`'s transaction prepared under in this shard's database:
/// the branch form, and the legacy form an older participant used.
pub fn prepared_names(branch: &BranchGid) -> Vec<String> {
    let legacy = BranchGid::legacy(branch.gid());
    vec![branch.as_str().to_owned(), legacy.as_str().to_owned()]
}

/// Whether PostgreSQL holds exactly `name` prepared in this database.
async fn is_prepared_here(pool: &Pool, name: &BranchGid) -> Result<bool, DbError> {
    retrying(pool, |connection| {
        let name = name.to_string();
        Box::pin(async move {
            let rows = connection
                .client()
                .query_typed(
                    "SELECT EXISTS (SELECT 1 FROM pg_prepared_xacts \
                     WHERE gid = $1 AND database = current_database())",
                    &[(&name, Type::TEXT)],
                )
                .await?;
            one_value(&rows)
        })
    })
    .await
}

/// Whether the GID's marker row is committed: the branch was prepared and then committed.
/// A branch of `branch`'s transaction prepared in this database under another shard's name than
/// `branch`'s, if there is one: what a participant finds after its `--shard` was renamed while
/// the branch was prepared. Asked only where "does not exist" would otherwise be answered.
pub async fn prepared_under_another_name(pool: &Pool, branch: &BranchGid) -> Result<Option<String>, DbError> {
    retrying(pool, |connection| {
        let (prefix, own) = (format!("{}:", branch.gid()), branch.to_string());
        Box::pin(async move {
            // A prefix compared exactly: `_` in a GID would be a wildcard to LIKE.
            let rows = connection
                .client()
                .query_typed(
                    "SELECT gid FROM pg_catalog.pg_prepared_xacts WHERE database = pg_catalog.current_database() \
                     AND pg_catalog.left(gid, pg_catalog.length($1)) = $1 AND gid <> $2 LIMIT 1",
                    &[(&prefix, Type::TEXT), (&own, Type::TEXT)],
                )
                .await?;
            match rows.first() {
                Some(row) => Ok(Some(row.try_get(0).map_err(DbError::from)?)),
                None => Ok(None),
            }
        })
    })
    .await
}

pub async fn marker_exists(pool: &Pool, gid: &Gid) -> Result<bool, DbError> {
    retrying(pool, |connection| {
        let gid = gid.to_string();
        Box::pin(async move {
            let rows = connection
                .client()
                .query_typed(
                    "SELECT EXISTS (SELECT 1 FROM treaty.branches WHERE gid = $1)",
                    &[(&gid, Type::TEXT)],
                )
                .await?;
            one_value(&rows)
        })
    })
    .await
}

/// Whether the branch is prepared (in either form) and whether its transaction's marker row is
/// committed, in one query.
pub async fn prepared_and_marker(pool: &Pool, branch: &BranchGid) -> Result<(bool, bool), DbError> {
    let names = prepared_names(branch);
    retrying(pool, |connection| {
        let (gid, names) = (branch.gid().to_string(), names.clone());
        Box::pin(async move {
            let rows = connection
                .client()
                .query_typed(
                    "SELECT EXISTS (SELECT 1 FROM pg_prepared_xacts WHERE gid = ANY($2) AND database = current_database()), \
                            EXISTS (SELECT 1 FROM treaty.branches WHERE gid = $1)",
                    &[(&gid, Type::TEXT), (&names, Type::TEXT_ARRAY)],
                )
                .await?;
            let row = rows
                .first()
                .ok_or_else(|| DbError::Client("expected one row, PostgreSQL answered none".into()))?;
            Ok((row.try_get(0)?, row.try_get(1)?))
        })
    })
    .await
}

/// A Treaty-looking GID prepared in this database, as PostgreSQL holds it (a branch GID, or the
/// legacy form; see `BranchGid::parse`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedXact {
    pub gid: String,
    pub age_ms: i64,
}

/// The transactions whose branches of `shard` PostgreSQL holds prepared in this database (either
/// form), with the text each is prepared under.
pub async fn prepared_branches(pool: &Pool, shard: &ShardName) -> Result<Vec<BranchGid>, DbError> {
    Ok(list_prepared(pool)
        .await?
        .into_iter()
        .filter_map(|xact| BranchGid::parse(&xact.gid).ok())
        .filter(|branch| branch.is_of(shard))
        .collect())
}

pub async fn list_prepared(pool: &Pool) -> Result<Vec<PreparedXact>, DbError> {
    let rows: Vec<(String, i64)> = retrying(pool, |connection| {
        Box::pin(async move {
            let rows = connection
                .client()
                .query_typed(
                    "SELECT gid, (extract(epoch FROM clock_timestamp() - prepared) * 1000)::bigint \
                     FROM pg_prepared_xacts WHERE database = current_database() AND gid LIKE 'treaty:%' \
                     ORDER BY prepared",
                    &[],
                )
                .await?;
            rows.iter()
                .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
                .collect::<Result<_, DbError>>()
        })
    })
    .await?;
    Ok(rows
        .into_iter()
        .map(|(gid, age_ms)| PreparedXact { gid, age_ms })
        .collect())
}

/// Marker rows older than `older_than_ms`, oldest first. (A prepared branch's own row is not
/// visible to other sessions until it commits, so every row seen here belongs to a committed one.)
pub async fn old_markers(pool: &Pool, older_than_ms: u64, limit: i64) -> Result<Vec<String>, DbError> {
    let older_than_ms = i64::try_from(older_than_ms).unwrap_or(i64::MAX);
    retrying(pool, |connection| {
        Box::pin(async move {
            let rows = connection
                .client()
                .query_typed(
                    "SELECT gid FROM treaty.branches \
                     WHERE prepared_at < now() - make_interval(secs => $1::float8 / 1000) \
                     ORDER BY prepared_at LIMIT $2",
                    &[(&older_than_ms, Type::INT8), (&limit, Type::INT8)],
                )
                .await?;
            rows.iter()
                .map(|row| row.try_get(0).map_err(DbError::from))
                .collect()
        })
    })
    .await
}

pub async fn delete_markers(pool: &Pool, gids: &[String]) -> Result<u64, DbError> {
    retrying(pool, |connection| {
        let gids = gids.to_vec();
        Box::pin(async move {
            write(
                connection,
                "DELETE FROM treaty.branches WHERE gid = ANY($1)",
                &[(&gids, Type::TEXT_ARRAY)],
            )
            .await
        })
    })
    .await
}

pub async fn max_prepared_transactions(pool: &Pool) -> Result<i64, DbError> {
    let setting: String = retrying(pool, |connection| {
        Box::pin(async move {
            let rows = connection
                .client()
                .query_typed("SELECT current_setting('max_prepared_transactions')", &[])
                .await?;
            one_value(&rows)
        })
    })
    .await?;
    setting
        .trim()
        .parse()
        .map_err(|_| DbError::Client(format!("max_prepared_transactions is {setting:?}, not a number")))
}

pub async fn current_database(pool: &Pool) -> Result<String, DbError> {
    retrying(pool, |connection| {
        Box::pin(async move {
            let rows = connection
                .client()
                .query_typed("SELECT current_database()::text", &[])
                .await?;
            one_value(&rows)
        })
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use treaty_proto::CoordinatorId;

    #[test]
    fn begin_carries_the_options() {
        let none = SessionDefaults::default();
        assert_eq!(
            begin_sql(&BranchOptions::default(), &none),
            "BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE"
        );
        let options = BranchOptions {
            isolation: Isolation::Serializable,
            lock_timeout_ms: Some(2000),
            statement_timeout_ms: Some(60_000),
            database_role: None,
            continues: false,
        };
        assert_eq!(
            begin_sql(&options, &none),
            "BEGIN ISOLATION LEVEL SERIALIZABLE READ WRITE; SET LOCAL lock_timeout = 2000; \
             SET LOCAL statement_timeout = 60000"
        );
    }

    #[test]
    fn begin_sets_only_the_timeouts_its_session_does_not_start_with() {
        let session = SessionDefaults {
            lock_timeout_ms: Some(10_000),
            statement_timeout_ms: Some(60_000),
        };
        let usual = BranchOptions {
            isolation: Isolation::ReadCommitted,
            lock_timeout_ms: Some(10_000),
            statement_timeout_ms: Some(60_000),
            database_role: None,
            continues: false,
        };
        assert_eq!(
            begin_sql(&usual, &session),
            "BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE"
        );
        let other = BranchOptions {
            lock_timeout_ms: Some(2000),
            ..usual.clone()
        };
        assert_eq!(
            begin_sql(&other, &session),
            "BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE; SET LOCAL lock_timeout = 2000"
        );
        // No limit asked for, on a session that starts with one: the limit is lifted.
        let unlimited = BranchOptions {
            statement_timeout_ms: None,
            ..usual
        };
        assert_eq!(
            begin_sql(&unlimited, &session),
            "BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE; SET LOCAL statement_timeout = 0"
        );
    }

    #[test]
    fn prepare_is_one_batch_with_the_role_back_then_the_marker() {
        let gid = Gid::new(&CoordinatorId::new("c1").unwrap(), 42);
        let shard = ShardName::new("s0").unwrap();
        // The marker row keeps the transaction's GID; the branch is prepared under its own name.
        assert_eq!(
            prepare_sql(&gid, &BranchGid::new(&gid, &shard), None).unwrap(),
            (
                "SELECT pg_catalog.set_config('role', 'none', true), \
                 pg_catalog.set_config('synchronous_commit', 'on', true); \
                 INSERT INTO treaty.branches (gid, coordinator_id, txid) VALUES ('treaty:c1:42', 'c1', 42); \
                 PREPARE TRANSACTION 'treaty:c1:42:s0'"
                    .to_owned(),
                3
            )
        );
        let huge = Gid::new(&CoordinatorId::new("c1").unwrap(), u64::MAX);
        assert!(prepare_sql(&huge, &BranchGid::new(&huge, &shard), None).is_err());
    }

    #[test]
    fn every_prelude_takes_the_role_back_and_makes_the_vote_durable_in_one_statement() {
        assert_eq!(OWN_ROLE_AND_DURABILITY, format!("{ROLE_AND_DURABILITY}; "));
        assert!(ROLE_FOR_BOOKKEEPING.ends_with(OWN_ROLE_AND_DURABILITY));
        assert_eq!(bookkeeping_prelude(None), ("", 0));
        let role = DatabaseRole::new("app_alice").unwrap();
        assert_eq!(bookkeeping_prelude(Some(&role)).1, 2);
        assert_eq!(crate::sql_guard::statement_texts(ROLE_FOR_BOOKKEEPING).len(), 2);
        assert_eq!(
            crate::sql_guard::statement_texts(OWN_ROLE_AND_DURABILITY),
            vec![ROLE_AND_DURABILITY]
        );
    }

    #[test]
    fn a_gid_that_names_its_decision_shard_prepares_without_a_marker() {
        let s1 = ShardName::new("s1").unwrap();
        let gid = Gid::with_decision_shard(&CoordinatorId::new("c1").unwrap(), 42, &s1).unwrap();
        let branch = BranchGid::new(&gid, &ShardName::new("s0").unwrap());
        assert_eq!(
            prepare_sql(&gid, &branch, None).unwrap(),
            (
                "SELECT pg_catalog.set_config('role', 'none', true), \
                 pg_catalog.set_config('synchronous_commit', 'on', true); \
                 PREPARE TRANSACTION 'treaty:c1:42@s1:s0'"
                    .to_owned(),
                2
            )
        );
        // No marker, but the participant's role prepares: only it may finish the branch later.
        let role = DatabaseRole::new("app_alice").unwrap();
        assert_eq!(
            prepare_sql(&gid, &branch, Some(&role)).unwrap(),
            (
                "SET CONSTRAINTS ALL IMMEDIATE; SELECT pg_catalog.set_config('role', 'none', true), \
                 pg_catalog.set_config('synchronous_commit', 'on', true); \
                 PREPARE TRANSACTION 'treaty:c1:42@s1:s0'"
                    .to_owned(),
                3
            )
        );
    }

    #[test]
    fn a_branch_under_a_client_role_sets_it_at_begin_and_leaves_it_for_the_marker() {
        let role = DatabaseRole::new("app_alice").unwrap();
        let options = BranchOptions {
            database_role: Some(role.clone()),
            ..BranchOptions::default()
        };
        // In BEGIN's own round trip, after the timeouts, so every client statement runs under it.
        assert_eq!(
            begin_sql(&options, &SessionDefaults::default()),
            "BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE; SET LOCAL ROLE \"app_alice\""
        );
        let options = BranchOptions {
            lock_timeout_ms: Some(5),
            ..options
        };
        assert_eq!(
            begin_sql(&options, &SessionDefaults::default()),
            "BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE; SET LOCAL lock_timeout = 5; SET LOCAL ROLE \"app_alice\""
        );
        // The marker row is the participant's: deferred constraints fire first, under the
        // client's role, then the role goes back, in the vote's one round trip.
        let gid = Gid::new(&CoordinatorId::new("c1").unwrap(), 42);
        let branch = BranchGid::new(&gid, &ShardName::new("s0").unwrap());
        assert_eq!(
            prepare_sql(&gid, &branch, Some(&role)).unwrap(),
            (
                "SET CONSTRAINTS ALL IMMEDIATE; SELECT pg_catalog.set_config('role', 'none', true), \
                 pg_catalog.set_config('synchronous_commit', 'on', true); \
                 INSERT INTO treaty.branches (gid, coordinator_id, txid) VALUES ('treaty:c1:42', 'c1', 42); \
                 PREPARE TRANSACTION 'treaty:c1:42:s0'"
                    .to_owned(),
                4
            )
        );
    }

    #[test]
    fn a_branch_is_looked_for_in_both_forms() {
        let gid = Gid::new(&CoordinatorId::new("c1").unwrap(), 7);
        let branch = BranchGid::new(&gid, &ShardName::new("s1").unwrap());
        assert_eq!(prepared_names(&branch), ["treaty:c1:7:s1", "treaty:c1:7"]);
    }

    /// A PostgreSQL server that completes the startup (trust) and then answers the first message
    /// the client sends with `answer`, or closes the connection when `answer` is empty.
    async fn fake_server(answer: &'static [u8]) -> u16 {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let length = socket.read_i32().await.unwrap();
            let mut startup = vec![0; usize::try_from(length - 4).unwrap()];
            socket.read_exact(&mut startup).await.unwrap();
            // AuthenticationOk, ReadyForQuery (idle).
            socket
                .write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0, b'Z', 0, 0, 0, 5, b'I'])
                .await
                .unwrap();
            let mut request = [0; 64];
            let _ = socket.read(&mut request).await;
            if answer.is_empty() {
                return;
            }
            socket.write_all(answer).await.unwrap();
            // Held open: the client must judge the answer, not a closed socket.
            let _ = socket.read(&mut request).await;
        });
        port
    }

    /// A client of a `fake_server` that answers `answer`, its connection task running.
    async fn fake_client(answer: &'static [u8]) -> tokio_postgres::Client {
        let port = fake_server(answer).await;
        let (client, connection) = tokio_postgres::connect(
            &format!("host=127.0.0.1 port={port} user=treaty dbname=treaty sslmode=disable"),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        tokio::spawn(connection);
        client
    }

    async fn error_from(answer: &'static [u8]) -> DbError {
        let client = fake_client(answer).await;
        DbError::from(client.simple_query("SELECT 1").await.unwrap_err())
    }

    /// tokio-postgres' error kinds are private, so a session left in an unknown state is told
    /// partly by the error's text: these keep that text honest across upgrades. Misread as a
    /// client-side error, such a connection would go back to the pool.
    #[tokio::test]
    async fn an_answer_out_of_protocol_or_a_closed_socket_is_a_broken_connection() {
        // An AuthenticationOk in the middle of a query: "unexpected message from server".
        let unexpected = error_from(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0]).await;
        assert!(
            matches!(&unexpected, DbError::Connection(text) if text.contains("unexpected message")),
            "{unexpected:?}"
        );
        // A CommandComplete whose tag is not terminated: the answer cannot be parsed.
        let garbled = error_from(&[b'C', 0, 0, 0, 6, b'S', b'E']).await;
        assert!(garbled.is_connection(), "{garbled:?}");
        let closed = error_from(&[]).await;
        assert!(closed.is_connection(), "{closed:?}");
    }

    #[tokio::test]
    async fn a_parameter_that_cannot_be_encoded_is_the_clients_error() {
        let client = fake_client(&[]).await;
        let text = "not a number";
        let error = client
            .query_typed("SELECT $1", &[(&text, Type::INT4)])
            .await
            .unwrap_err();
        let error = DbError::from(error);
        assert!(matches!(error, DbError::Client(_)), "{error:?}");
    }
}
