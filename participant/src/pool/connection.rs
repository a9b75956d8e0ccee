//! One session of the branch pool: a tokio-postgres client and the statements prepared on it.
//!
//! tokio-postgres sends a request when its future is first polled and reads answers in order, so
//! requests issued together share one round trip. Statements that belong together
//! (`postgres::begin_sql` and the branch's first statement, the last statement and the vote, the
//! commit row and `COMMIT`) go as one `pipeline`, with one `Sync` after the last: PostgreSQL
//! answers them in one flush, where a `Sync` per statement cost a send by the server and a
//! wake-up and read here for each. Client statements are prepared once per session and
//! parameter types (`prepared`), as sqlx's statement cache did, so that PostgreSQL parses and
//! plans a branch's statement once per connection, not per call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_postgres::types::Type;
use tokio_postgres::{Client, PipelineOutput, Statement, Step, StepOutput};

use crate::postgres::DbError;

/// Most statements kept prepared per session; past it the cache starts over (a workload with
/// this many distinct statements per connection gains little from any cache).
const MAX_PREPARED: usize = 256;

pub struct Connection {
    client: Client,
    /// Behind a lock only so that a statement can be looked up while another request on the
    /// same session is in flight (`statement::run` sends BEGIN beside it); never contended.
    prepared: Mutex<HashMap<Arc<str>, Statement>>,
}

impl Connection {
    pub fn new(client: Client) -> Connection {
        Connection {
            client,
            prepared: Mutex::new(HashMap::new()),
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Text without parameters (one or more statements, simple protocol).
    pub async fn simple(&self, sql: &str) -> Result<(), DbError> {
        Ok(self.client.batch_execute(sql).await?)
    }

    /// `sql` prepared with `types` for its parameters, from the cache when it was prepared on this
    /// session before under `key` (the text with its parameter types, `values::signature`).
    pub async fn prepared(&self, key: &Arc<str>, types: &[Type]) -> Result<Statement, DbError> {
        if let Some(statement) = self.cache().get(key) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare_typed(key, types).await?;
        let mut cache = self.cache();
        if cache.len() >= MAX_PREPARED {
            // Dropping a `Statement` closes it on the server.
            cache.clear();
        }
        cache.insert(Arc::clone(key), statement.clone());
        Ok(statement)
    }

    /// Runs `steps` with one `Sync` after the last (`Client::pipeline`): one answer per step. A
    /// step runs only when every step before it succeeded; one that did not run answers the
    /// failure before it (SQLSTATE 25P02 after a statement's error, as PostgreSQL answers a
    /// statement sent into a failed transaction; the same connection error after one).
    pub async fn pipeline(&self, steps: &[Step<'_>]) -> Vec<Result<StepOutput, DbError>> {
        let output = self
            .client
            .pipeline(steps)
            .await
            .unwrap_or_else(|error| PipelineOutput {
                completed: Vec::new(),
                failed: Some(error),
                status: None,
            });
        let PipelineOutput {
            mut completed,
            failed,
            ..
        } = output;
        // Never more answers than steps, whatever came back.
        completed.truncate(steps.len());
        let ran = completed.len();
        let mut answers: Vec<Result<StepOutput, DbError>> = completed.into_iter().map(Ok).collect();
        match failed {
            Some(error) if ran == steps.len() && ran > 0 => {
                // Every step completed and PostgreSQL still failed at the Sync (the implicit
                // transaction of steps sent without BEGIN could not commit, e.g. a deferred
                // constraint): the last step's answer carries it, so that nothing reads as done.
                answers[ran - 1] = Err(DbError::from(error));
            }
            failed if ran < steps.len() => {
                let error = failed.map(DbError::from).unwrap_or_else(|| {
                    DbError::Client(format!("PostgreSQL answered {ran} of {} statements", steps.len()))
                });
                let skipped = match &error {
                    DbError::Connection(_) => error.clone(),
                    _ => DbError::Sql {
                        sqlstate: "25P02".into(),
                        message: format!(
                            "not run: statement {} of its round trip failed first ({error})",
                            ran + 1
                        ),
                    },
                };
                answers.push(Err(error));
                answers.resize_with(steps.len(), || Err(skipped.clone()));
            }
            _ => {}
        }
        answers
    }

    /// `text`, a statement without parameters, prepared on this session (from the cache, keyed
    /// by the text alone as a client's statement without parameters is, or prepared now); looked
    /// up without allocating.
    pub async fn prepared_text(&self, text: &str) -> Result<Statement, DbError> {
        if let Some(statement) = self.cache().get(text) {
            return Ok(statement.clone());
        }
        self.prepared(&Arc::from(text), &[]).await
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Statement>> {
        // Inserts and clears only: a panic elsewhere leaves the map whole.
        self.prepared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Awaits `requests` (tokio-postgres calls on one connection), sending them in the order given:
/// each is polled once, which sends it, before any is awaited, so they share round trips and
/// PostgreSQL runs them in this order. (`join_all` promises no polling order for long lists.)
pub async fn pipelined<F: std::future::Future>(requests: Vec<F>) -> Vec<F::Output> {
    let mut requests: Vec<_> = requests
        .into_iter()
        .map(|request| Box::pin(futures::future::maybe_done(request)))
        .collect();
    for request in &mut requests {
        let _ = futures::poll!(request.as_mut());
    }
    let mut outputs = Vec::with_capacity(requests.len());
    for mut request in requests {
        request.as_mut().await;
        if let Some(output) = request.as_mut().take_output() {
            outputs.push(output);
        }
    }
    outputs
}
