//! Runs one client statement on a branch's connection and collects its result.
//!
//! A single statement goes through the extended protocol: prepared once per connection and type
//! signature (sqlx's statement cache), binary parameters and results, one round trip when cached.
//! A string of several statements (allowed only without parameters) goes through the simple
//! protocol; it returns the rows of the last statement that returned any, and the sum of the
//! affected-row counts.

use futures::TryStreamExt as _;
use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, Either, Executor as _, Row as _, SqlSafeStr as _, Statement as _};

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
}

impl From<sqlx::Error> for StatementError {
    fn from(error: sqlx::Error) -> Self {
        StatementError::Db(error.into())
    }
}

pub async fn run(
    connection: &mut PgConnection,
    sql: &str,
    params: Vec<Param>,
    batch: bool,
) -> Result<StatementOutput, StatementError> {
    if batch {
        run_batch(connection, sql).await
    } else {
        run_single(connection, sql, params).await
    }
}

async fn run_single(
    connection: &mut PgConnection,
    sql: &str,
    params: Vec<Param>,
) -> Result<StatementOutput, StatementError> {
    let text: std::sync::Arc<str> = format!("{}{sql}", values::signature(&params)).into();
    let mut query = sqlx::query(AssertSqlSafe(text.clone()));
    for param in params {
        query = query.bind(param);
    }
    let mut output = StatementOutput::default();
    {
        let mut results = connection.fetch_many(query);
        while let Some(result) = results.try_next().await? {
            match result {
                Either::Left(done) => output.rows_affected += done.rows_affected(),
                Either::Right(row) => {
                    if output.columns.is_empty() {
                        output.columns = row.columns().iter().map(values::column_from_pg).collect();
                    }
                    output.rows.push(values::decode_row(&row)?);
                }
            }
        }
    }
    if output.rows.is_empty() {
        // No row carried the column list. The statement was just prepared and cached under this
        // exact text, so this is a cache lookup, not a round trip (a failed Parse here would abort
        // the branch's transaction, which is why it must never be the first preparation).
        let statement = connection.prepare(AssertSqlSafe(text).into_sql_str()).await?;
        output.columns = statement.columns().iter().map(values::column_from_pg).collect();
    }
    Ok(output)
}

async fn run_batch(connection: &mut PgConnection, sql: &str) -> Result<StatementOutput, StatementError> {
    let mut output = StatementOutput::default();
    let mut pending = StatementOutput::default();
    let mut results = connection.fetch_many(sqlx::raw_sql(AssertSqlSafe(sql.to_owned())));
    while let Some(result) = results.try_next().await? {
        match result {
            Either::Left(done) => {
                output.rows_affected += done.rows_affected();
                if !pending.rows.is_empty() {
                    output.columns = std::mem::take(&mut pending.columns);
                    output.rows = std::mem::take(&mut pending.rows);
                }
            }
            Either::Right(row) => {
                if pending.rows.is_empty() {
                    pending.columns = row.columns().iter().map(values::column_from_pg).collect();
                }
                pending.rows.push(values::decode_row(&row)?);
            }
        }
    }
    Ok(output)
}
