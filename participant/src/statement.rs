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
use treaty_proto::Value;

use crate::postgres::DbError;
use crate::values::{self, Column, DecodeError, Param};

#[derive(Debug, Clone, PartialEq, Default)]
pub struct StatementOutput {
    pub columns: Vec<Column>,
    pub rows: Vec<Vec<Value>>,
    pub rows_affected: u64,
}

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
                        output.columns = row.columns().iter().map(Column::from_pg).collect();
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
        output.columns = statement.columns().iter().map(Column::from_pg).collect();
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
                    pending.columns = row.columns().iter().map(Column::from_pg).collect();
                }
                pending.rows.push(values::decode_row(&row)?);
            }
        }
    }
    Ok(output)
}
