//! Treaty's addition to this copy of tokio-postgres: several statements sent with one `Sync`.
//!
//! Every request tokio-postgres sends ends with its own `Sync`, and PostgreSQL flushes its answers
//! at each `Sync` (`ReadyForQuery`): requests pipelined on one connection leave in one write but
//! come back in as many packets as they had `Sync`s, each a `send` by the server and a wake-up
//! and a read by the client. `Client::pipeline` sends its steps with one `Sync` after the last,
//! so PostgreSQL answers them all in one flush. After a step fails, PostgreSQL skips the rest until
//! the `Sync`: a step runs only if every step before it succeeded.

use crate::client::InnerClient;
use crate::codec::FrontendMessage;
use crate::connection::RequestMessages;
use crate::query::{encode_bind, extract_row_affected};
use crate::types::ToSql;
use crate::{Error, Row, Statement};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

/// One statement of a pipeline.
pub enum Step<'a> {
    /// A statement without parameters, sent as the unnamed statement (parsed each time, as a
    /// simple query is); rows it returns are read and dropped.
    Text(&'a str),
    /// A statement prepared on this connection, with its parameters; its rows are returned.
    Prepared(&'a Statement, &'a [&'a (dyn ToSql + Sync)]),
}

/// What one completed step returned.
#[derive(Debug, Default)]
pub struct StepOutput {
    /// The rows of a `Step::Prepared` (none for `Step::Text`).
    pub rows: Vec<Row>,
    /// The count in the command tag (rows updated, inserted, deleted...), 0 when it has none.
    pub rows_affected: u64,
}

/// What PostgreSQL answered to a pipeline.
#[derive(Debug)]
pub struct PipelineOutput {
    /// One per step that completed, in order: the steps before `failed`'s, or every step.
    pub completed: Vec<StepOutput>,
    /// Why the step after the completed ones failed (PostgreSQL then skipped the rest), or the
    /// connection's failure; `None` when every step completed.
    pub failed: Option<Error>,
    /// The transaction status at the `Sync`: `b'I'` idle, `b'T'` in a transaction block, `b'E'` in
    /// a failed one; `None` when the connection failed before it.
    pub status: Option<u8>,
}

pub async fn pipeline(client: &InnerClient, steps: &[Step<'_>]) -> Result<PipelineOutput, Error> {
    let buf = client.with_buf(|buf| {
        for step in steps {
            match step {
                Step::Text(sql) => {
                    frontend::parse("", sql, std::iter::empty(), buf).map_err(Error::encode)?;
                    frontend::bind(
                        "",
                        "",
                        std::iter::empty::<i16>(),
                        std::iter::empty::<()>(),
                        |_, _| Ok(postgres_protocol::IsNull::No),
                        Some(1),
                        buf,
                    )
                    .map_err(|error| match error {
                        frontend::BindError::Conversion(error) => Error::to_sql(error, 0),
                        frontend::BindError::Serialization(error) => Error::encode(error),
                    })?;
                }
                Step::Prepared(statement, params) => {
                    encode_bind(statement, params.iter().copied(), "", buf)?;
                }
            }
            frontend::execute("", 0, buf).map_err(Error::encode)?;
        }
        frontend::sync(buf);
        Ok::<_, Error>(buf.split().freeze())
    })?;
    let mut responses = match client.send(RequestMessages::Single(FrontendMessage::Raw(buf))) {
        Ok(responses) => responses,
        Err(error) => {
            return Ok(PipelineOutput {
                completed: Vec::new(),
                failed: Some(error),
                status: None,
            });
        }
    };
    let mut completed = Vec::with_capacity(steps.len());
    let mut current = StepOutput::default();
    let mut failed = None;
    loop {
        let message = match responses.next().await {
            Ok(message) => message,
            Err(error) if error.as_db_error().is_some() && failed.is_none() => {
                // The rest up to the Sync is skipped; its ReadyForQuery follows.
                failed = Some(error);
                continue;
            }
            Err(error) => {
                return Ok(PipelineOutput {
                    completed,
                    failed: Some(failed.unwrap_or(error)),
                    status: None,
                });
            }
        };
        match message {
            Message::ParseComplete | Message::BindComplete => {}
            Message::DataRow(body) => {
                if let Some(Step::Prepared(statement, _)) = steps.get(completed.len()) {
                    current.rows.push(Row::new((*statement).clone(), body)?);
                }
            }
            Message::CommandComplete(body) => {
                current.rows_affected = extract_row_affected(&body)?;
                completed.push(std::mem::take(&mut current));
            }
            Message::EmptyQueryResponse => completed.push(std::mem::take(&mut current)),
            Message::ReadyForQuery(body) => {
                return Ok(PipelineOutput {
                    completed,
                    failed,
                    status: Some(body.status()),
                });
            }
            _ => return Err(Error::unexpected_message()),
        }
    }
}
