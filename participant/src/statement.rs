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
use tokio_postgres::Step;
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
    /// The branch's BEGIN, sent with its first statement, failed (PostgreSQL then skipped that
    /// statement).
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
        Some(begin) => {
            run_pipelined(connection, Some(begin), statement, params, None, None)
                .await
                .0
        }
    }
}

/// Sends `begin`, then the batch `run` sends, before awaiting either: `join!` polls them in this
/// order, and each sends its request on its first poll.
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
/// marker row and `PREPARE TRANSACTION`), all in one pipeline, with the session check after when
/// due: the last statement of a one-shot submit and its vote, one write and one answer. `end`
/// runs only if the statement succeeded (PostgreSQL skips the rest of a pipeline after an
/// error, leaving the transaction open for the ROLLBACK that follows); its answer must still only
/// be taken as the vote when the statement's was; `None` when nothing was sent (preparing the
/// statement or the constants failed first), so the caller may run the statement again and vote
/// the usual way. Never for a batch.
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
    Option<Result<Session, StatementFailed>>,
) {
    // Prepared first when new to this session (a round trip of its own), so that the statement
    // and the vote leave together.
    let statement = match prepare(connection, sql, params).await {
        Ok(statement) => statement,
        Err(error) => return (Err(error.into()), None),
    };
    run_pipelined(
        connection,
        begin,
        &statement,
        params,
        Some((end, end_statements)),
        clean,
    )
    .await
}

/// `run`, then `COMMIT`, in one pipeline with the session check after when due, for a one-phase
/// branch's last statement (`Agent::execute_and_commit`): answers what the COMMIT did, or `None`
/// when it was not sent. It is sent only with a statement that returns no rows: a row this side
/// cannot decode would fail the call after PostgreSQL had committed. After a failed statement
/// PostgreSQL skips the COMMIT (answered as not run) and the transaction stays open, aborted, for
/// the ROLLBACK that follows.
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
    run_pipelined(connection, begin, &statement, params, Some(("COMMIT", 1)), clean).await
}

/// `begin`'s statements (if any), `statement` and `end`'s statements (if any: `end.1` of them,
/// ending the transaction) as one pipeline, with the session check after when `clean`: answers
/// the statement (`StatementError::Begin` when the BEGIN failed, and then nothing after it ran)
/// and, with `end`, what ending did (`session::steps_and_check`).
async fn run_pipelined(
    connection: &Connection,
    begin: Option<&str>,
    statement: &tokio_postgres::Statement,
    params: &[Param],
    end: Option<(&str, usize)>,
    clean: Option<&SessionState>,
) -> (
    Result<StatementOutput, StatementError>,
    Option<Result<Session, StatementFailed>>,
) {
    let begin_texts = begin.map(crate::sql_guard::statement_texts).unwrap_or_default();
    let end_texts = end
        .map(|(sql, _)| crate::sql_guard::statement_texts(sql))
        .unwrap_or_default();
    if let Some((sql, expected)) = end
        && end_texts.len() != expected
    {
        let error = DbError::Client(format!(
            "internal: {expected} statements expected in {sql:?}, {} found; nothing was sent",
            end_texts.len()
        ));
        return (Err(error.into()), None);
    }
    let (begin_statements, end_statements) = match (
        constants_prepared(connection, &begin_texts).await,
        constants_prepared(connection, &end_texts).await,
    ) {
        (Ok(begin), Ok(end)) => (begin, end),
        (Err(error), _) => return (Err(StatementError::Begin(error)), None),
        // Nothing was sent: the statement did not run and the end was not sent.
        (Ok(_), Err(error)) => return (Err(error.into()), None),
    };
    let values: Vec<&(dyn ToSql + Sync)> = params.iter().map(|param| param as &(dyn ToSql + Sync)).collect();
    let mut steps = Vec::with_capacity(begin_texts.len() + 1 + end_texts.len());
    steps.extend(text_steps(&begin_texts, &begin_statements));
    steps.push(Step::Prepared(statement, &values));
    steps.extend(text_steps(&end_texts, &end_statements));
    let (mut answers, ended) = match end {
        Some(_) => {
            let (answers, ended) = session::steps_and_check(connection, &steps, end_texts.len(), clean).await;
            (answers, Some(ended))
        }
        None => (connection.pipeline(&steps).await, None),
    };
    let at = begin_texts.len();
    if let Some(Err(error)) = answers[..at].iter().find(|answer| answer.is_err()) {
        return (Err(StatementError::Begin(error.clone())), ended);
    }
    let ran = match answers.swap_remove(at) {
        Err(error) => Err(StatementError::Db(error)),
        Ok(output) => output_of(statement, output),
    };
    (ran, ended)
}

/// Each of `texts` that opens the branch the same way on every branch under the same options
/// (`BEGIN ...`, `SET LOCAL ROLE ...`) prepared on this connection, once per connection: a Bind
/// and an Execute per branch then, where the unnamed statement costs PostgreSQL a parse each time
/// (about 4 µs more per statement, pgbench). Nothing else is named: a named statement can be run
/// by any SQL on the session (`EXECUTE <name>`, which the SQL guard does not look into), so a
/// named `COMMIT` would let a client's statement end its branch before the vote; running a named
/// `BEGIN` or `SET LOCAL ROLE` gives a client nothing it could not write itself (README, "What a
/// database role does not stop"). Timeouts a client chose (`SET LOCAL lock_timeout = <n>`) stay
/// unnamed too, so that they cannot fill the connection's statement cache; so does anything with a
/// literal (`PREPARE TRANSACTION '<gid>'`, a marker row), new every time. Unnamed is `None`.
async fn constants_prepared(
    connection: &Connection,
    texts: &[&str],
) -> Result<Vec<Option<tokio_postgres::Statement>>, DbError> {
    let mut statements = Vec::with_capacity(texts.len());
    for text in texts {
        let named = text.trim() == crate::postgres::ROLE_AND_DURABILITY
            || (!text.contains('\'') && (text.starts_with("BEGIN") || text.starts_with("SET LOCAL ROLE ")));
        statements.push(match named {
            true => Some(connection.prepared_text(text).await?),
            false => None,
        });
    }
    Ok(statements)
}

/// The pipeline's steps for `texts`: each prepared one bound (it has no parameters), the rest as
/// text.
fn text_steps<'a>(
    texts: &'a [&'a str],
    statements: &'a [Option<tokio_postgres::Statement>],
) -> impl Iterator<Item = Step<'a>> {
    texts
        .iter()
        .zip(statements)
        .map(|(text, statement)| match statement {
            Some(statement) => Step::Prepared(statement, &[]),
            None => Step::Text(text),
        })
}

/// A prepared statement's answer as the core's result: its columns, rows decoded, the count.
fn output_of(
    statement: &tokio_postgres::Statement,
    output: tokio_postgres::StepOutput,
) -> Result<StatementOutput, StatementError> {
    let rows = output
        .rows
        .iter()
        .map(values::decode_row)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(StatementOutput {
        columns: statement.columns().iter().map(values::column_from_pg).collect(),
        rows,
        rows_affected: output.rows_affected,
    })
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
