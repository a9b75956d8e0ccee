//! One session of the branch pool: a tokio-postgres client and the statements prepared on it.
//!
//! tokio-postgres sends a request when its future is first polled and reads answers in order, so
//! requests issued together share one round trip (`postgres::begin_sql` and the statement,
//! the last statement and the vote). Client statements are prepared once per session and
//! parameter types (`prepared`), as sqlx's statement cache did, so that PostgreSQL parses and
//! plans a branch's statement once per connection, not per call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_postgres::types::Type;
use tokio_postgres::{Client, Statement};

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
