//! Runs one client statement on a branch's connection and collects its result.
//!
//! A single statement goes through the extended protocol: prepared once per connection and type
//! signature (sqlx's statement cache), binary parameters and results, one round trip when cached.
//! A string of several statements (allowed only without parameters) is split by the SQL guard's
//! lexer and sent as unnamed extended-protocol statements, all in one round trip, so their
//! results keep their column types; it returns the rows of the last statement that returned any,
//! and the sum of the affected-row counts. Each statement is looked up in (or added to) the
//! connection's cache once per call and passed down, not looked up again at each step.

use std::sync::Arc;

use futures::TryStreamExt as _;
use tokio_postgres::types::ToSql;

use crate::pool::Connection;
use crate::pool::session::{self, Session, SessionState, StatementFailed};
use crate::postgres::DbError;
use crate::values::{self, DecodeError, Param};

/// What a statement returned: the core's `StatementResult`, so that the wire conversion is the one
/// in `treaty_proto::wire`.
pub type StatementOutput = treaty_commit_protocol::transport::StatementResult;

#[derive(Debug, thiserror::Error)]
pub enum StatementError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The branch's BEGIN, sent with its first statement, failed (that statement then ran
    /// outside any transaction, in the session's read-only default, and is disregarded).
    #[error("opening the branch's transaction failed: {0}")]
    Begin(DbError),
}

impl From<tokio_postgres::Error> for StatementError {
    fn from(error: tokio_postgres::Error) -> Self {
        StatementError::Db(error.into())
    }
}

/// Runs the statement (or, with `batch`, the statements) of `sql` on the branch's connection;
/// with `begin` (the branch's first statement), sends the branch's BEGIN first, in the same round
/// trip. The pool's sessions are read-only by default and BEGIN opens `READ WRITE`, so were
/// BEGIN to fail, the statement after it could not write outside the branch's transaction.
pub async fn run(
    connection: &Connection,
    begin: Option<&str>,
    sql: &str,
    params: &[Param],
    batch: bool,
) -> Result<StatementOutput, StatementError> {
    if batch {
        return match begin {
            None => run_batch(connection, sql).await,
            Some(begin) => opened(connection, begin, run_batch(connection, sql)).await,
        };
    }
    // Prepared first when new to this session (a round trip of its own, before BEGIN), so that
    // BEGIN and the statement then leave together.
    let statement = prepare(connection, sql, params).await?;
    run_prepared(connection, begin, &statement, params).await
}

/// `statement` (prepared on this connection), after `begin` in the same round trip if given.
async fn run_prepared(
    connection: &Connection,
    begin: Option<&str>,
    statement: &tokio_postgres::Statement,
    params: &[Param],
) -> Result<StatementOutput, StatementError> {
    match begin {
        None => run_single(connection, statement, params).await,
        Some(begin) => opened(connection, begin, run_single(connection, statement, params)).await,
    }
}

/// Sends `begin`, then `run`'s request, before awaiting either: `join!` polls them in this order,
/// and each sends its request on its first poll.
async fn opened(
    connection: &Connection,
    begin: &str,
    run: impl std::future::Future<Output = Result<StatementOutput, StatementError>>,
) -> Result<StatementOutput, StatementError> {
    let (began, ran) = futures::join!(connection.client().batch_execute(begin), run);
    began.map_err(|error| StatementError::Begin(error.into()))?;
    ran
}

/// `run`, then `end` (`end_statements` statements that end the branch's transaction: the vote's
/// marker row and `PREPARE TRANSACTION`) with the session check when due, all in one round trip:
/// the last statement of a one-shot submit and its vote. `end` must only be taken as the vote
/// when the statement succeeded: after a failed statement the transaction is aborted, and
/// PostgreSQL refuses the vote's first statement (25P02, the rest skipped, the transaction left
/// open for the ROLLBACK that follows). Never for a batch (its statements are not all sent before `end`).
pub async fn run_then_end(
    connection: &Connection,
    begin: Option<&str>,
    sql: &str,
    params: &[Param],
    end: &str,
    end_statements: usize,
    clean: Option<&SessionState>,
) -> (
    Result<StatementOutput, StatementError>,
    Result<Session, StatementFailed>,
) {
    // Prepared first when new to this session (a round trip of its own), so that nothing of the
    // statement is left to send after the first poll: the vote must reach PostgreSQL after it.
    let statement = match prepare(connection, sql, params).await {
        Ok(statement) => statement,
        Err(error) => {
            let failed = StatementFailed {
                index: 0,
                error: DbError::Client("the vote was not sent: the statement could not be prepared".into()),
            };
            return (Err(error.into()), Err(failed));
        }
    };
    futures::join!(
        run_prepared(connection, begin, &statement, params),
        session::end_and_check(connection, end, end_statements, clean)
    )
}

/// `run`, then `COMMIT` and the session check (when due) in the same round trip, for a one-phase branch's
/// last statement (`Agent::execute_and_commit`): answers what the COMMIT did, or `None` when it
/// was not sent. It is sent only with a statement that returns no rows: a row this side cannot
/// decode would fail the call after PostgreSQL had committed. A failed statement leaves its
/// transaction aborted, so the COMMIT behind it rolls back (PostgreSQL answers it with `ROLLBACK`).
pub async fn run_then_commit(
    connection: &Connection,
    begin: Option<&str>,
    sql: &str,
    params: &[Param],
    clean: Option<&SessionState>,
) -> (
    Result<StatementOutput, StatementError>,
    Option<Result<Session, StatementFailed>>,
) {
    let statement = match prepare(connection, sql, params).await {
        Ok(statement) => statement,
        Err(error) => return (Err(error.into()), None),
    };
    if !statement.columns().is_empty() {
        return (run_prepared(connection, begin, &statement, params).await, None);
    }
    let (ran, committed) = futures::join!(
        run_prepared(connection, begin, &statement, params),
        session::end_and_check(connection, "COMMIT", 1, clean)
    );
    (ran, Some(committed))
}

/// The statement prepared on this connection for `sql` with these parameters' types: from the
/// connection's cache, keyed by the types' signature and the text, or prepared now.
async fn prepare(
    connection: &Connection,
    sql: &str,
    params: &[Param],
) -> Result<tokio_postgres::Statement, DbError> {
    let key: Arc<str> = format!("{}{sql}", values::signature(params)).into();
    let types: Vec<tokio_postgres::types::Type> = params.iter().map(Param::pg_type).collect();
    connection.prepared(&key, &types).await
}

async fn run_single(
    connection: &Connection,
    statement: &tokio_postgres::Statement,
    params: &[Param],
) -> Result<StatementOutput, StatementError> {
    let mut output = StatementOutput {
        columns: statement.columns().iter().map(values::column_from_pg).collect(),
        ..StatementOutput::default()
    };
    let rows = connection
        .client()
        .query_raw(statement, params.iter().map(|param| param as &(dyn ToSql + Sync)))
        .await?;
    futures::pin_mut!(rows);
    while let Some(row) = rows.try_next().await? {
        output.rows.push(values::decode_row(&row)?);
    }
    output.rows_affected = rows.rows_affected().unwrap_or(0);
    Ok(output)
}

/// Several statements without parameters: each sent as its own unnamed extended-protocol
/// statement, all in one round trip, inside the branch's transaction (a failed one aborts it,
/// so those after it fail too and none of them commits). Answers the rows of the last statement
/// that returned any, and the sum of the affected-row counts.
async fn run_batch(connection: &Connection, sql: &str) -> Result<StatementOutput, StatementError> {
    let client = connection.client();
    let runs = crate::sql_guard::statement_texts(sql)
        .into_iter()
        .map(|text| async move {
            let rows = client
                .query_typed_raw(text, std::iter::empty::<(&(dyn ToSql + Sync), _)>())
                .await?;
            futures::pin_mut!(rows);
            let mut output = StatementOutput::default();
            while let Some(row) = rows.try_next().await? {
                if output.columns.is_empty() {
                    output.columns = row.columns().iter().map(values::column_from_pg).collect();
                }
                output.rows.push(values::decode_row(&row)?);
            }
            output.rows_affected = rows.rows_affected().unwrap_or(0);
            Ok::<_, StatementError>(output)
        });
    let mut output = StatementOutput::default();
    for result in crate::pool::pipelined(runs.collect()).await {
        let one = result?;
        output.rows_affected += one.rows_affected;
        if !one.rows.is_empty() {
            output.columns = one.columns;
            output.rows = one.rows;
        }
    }
    Ok(output)
}
