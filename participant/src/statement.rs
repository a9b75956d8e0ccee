//! Runs one client statement on a branch's connection and collects its result.
//!
//! A single statement goes through the extended protocol: prepared once per connection and type
//! signature (sqlx's statement cache), binary parameters and results, one round trip when cached.
//! A string of several statements (allowed only without parameters) goes through the simple
//! protocol; it returns the rows of the last statement that returned any, and the sum of the
//! affected-row counts.

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
    let Some(begin) = begin else {
        return run_unopened(connection, sql, params, batch).await;
    };
    if !batch {
        // Prepared first when new to this session (a round trip of its own, before BEGIN), so
        // that BEGIN and the statement then leave together.
        let key = statement_key(sql, params);
        connection.prepared(&key, &types_of(params)).await?;
    }
    let (began, ran) = futures::join!(
        connection.client().batch_execute(begin),
        run_unopened(connection, sql, params, batch)
    );
    began.map_err(|error| StatementError::Begin(error.into()))?;
    ran
}

/// `run`, then `end` (`end_statements` statements that end the branch's transaction: the vote's
/// marker row and `PREPARE TRANSACTION`) with the session check, all in one round trip: the last
/// statement of a one-shot submit and its vote. `end` must only be taken as the vote when the
/// statement succeeded: after a failed statement PostgreSQL answers `PREPARE TRANSACTION` with a
/// rollback, not an error. Never for a batch (its statements are not all sent before `end`).
pub async fn run_then_end(
    connection: &Connection,
    begin: Option<&str>,
    sql: &str,
    params: &[Param],
    end: &str,
    end_statements: usize,
    clean: &SessionState,
) -> (
    Result<StatementOutput, StatementError>,
    Result<Session, StatementFailed>,
) {
    // Prepared first when new to this session (a round trip of its own), so that nothing of the
    // statement is left to send after the first poll: the vote must reach PostgreSQL after it.
    if let Err(error) = connection
        .prepared(&statement_key(sql, params), &types_of(params))
        .await
    {
        let failed = StatementFailed {
            index: 0,
            error: DbError::Client("the vote was not sent: the statement could not be prepared".into()),
        };
        return (Err(error.into()), Err(failed));
    }
    futures::join!(
        run(connection, begin, sql, params, false),
        session::end_and_check(connection, end, end_statements, clean)
    )
}

async fn run_unopened(
    connection: &Connection,
    sql: &str,
    params: &[Param],
    batch: bool,
) -> Result<StatementOutput, StatementError> {
    if batch {
        run_batch(connection, sql).await
    } else {
        run_single(connection, sql, params).await
    }
}

fn statement_key(sql: &str, params: &[Param]) -> Arc<str> {
    format!("{}{sql}", values::signature(params)).into()
}

fn types_of(params: &[Param]) -> Vec<tokio_postgres::types::Type> {
    params.iter().map(Param::pg_type).collect()
}

async fn run_single(
    connection: &Connection,
    sql: &str,
    params: &[Param],
) -> Result<StatementOutput, StatementError> {
    let statement = connection
        .prepared(&statement_key(sql, params), &types_of(params))
        .await?;
    let mut output = StatementOutput {
        columns: statement.columns().iter().map(values::column_from_pg).collect(),
        ..StatementOutput::default()
    };
    let rows = connection
        .client()
        .query_raw(
            &statement,
            params.iter().map(|param| param as &(dyn ToSql + Sync)),
        )
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
