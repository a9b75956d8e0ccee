//! The baselines: the same transactions driven from the bench process straight at the same
//! PostgreSQL databases with sqlx, no coordinator, one connection per shard per client.
//!
//! - `direct`: on every shard in parallel `BEGIN`; statements; then `PREPARE TRANSACTION
//!   'bench:<pid>:<client>:<n>'` where the shard wrote and more than one shard wrote (otherwise a
//!   plain `COMMIT`, as Treaty's one-phase and read-only paths do); then `COMMIT PREPARED` on each
//!   prepared shard in parallel. Any failure rolls back everything (prepared or open).
//! - `independent`: per shard `BEGIN`; statements; `COMMIT`, in parallel: no atomicity, the floor.
//!
//! `direct-pipelined` (`direct_pipelined_*` in the report) runs `direct`'s SQL with tokio-postgres,
//! each shard's requests pipelined: see `pipelined`. Both keep their connections in
//! [`Connections`], which also ends their prepared branches ([`Connections::finish_prepared`]).

use std::str::FromStr;

use futures::future::join_all;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};

use super::workload::{ShardWork, TxnPlan};

/// Attempts of `COMMIT PREPARED` / `ROLLBACK PREPARED` before giving up on one branch.
const FINISH_ATTEMPTS: u32 = 5;

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    /// PREPARE TRANSACTION / COMMIT PREPARED from the bench process.
    Direct,
    /// Plain per-shard COMMIT (no atomicity).
    Independent,
    /// `Direct`'s SQL pipelined per shard with tokio-postgres (`pipelined`).
    DirectPipelined,
}

impl Baseline {
    pub fn name(self) -> &'static str {
        match self {
            Baseline::Direct => "direct",
            Baseline::Independent => "independent",
            Baseline::DirectPipelined => "direct_pipelined",
        }
    }
}

/// How a shard's branch ends its first phase.
#[derive(Clone)]
enum Finish {
    Prepare(String),
    Commit,
}

enum Ended {
    Prepared,
    Committed,
}

/// One client's connections (opened lazily, reopened after a connection error).
pub struct DirectClient {
    mode: Baseline,
    conns: Connections<PgConnection>,
    gid_prefix: String,
    sequence: u64,
}

async fn open(url: &str, lock_timeout_ms: u64) -> Result<PgConnection, String> {
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| format!("bad url: {e}"))?
        .disable_statement_logging();
    let mut conn = options.connect().await.map_err(|_| "connect".to_string())?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET lock_timeout = '{lock_timeout_ms}ms'"
    )))
    .execute(&mut conn)
    .await
    .map_err(|_| "connect".to_string())?;
    Ok(conn)
}

/// `statement_failed/<sqlstate>` for a database error, `connection` otherwise; whether the
/// connection is still usable.
fn classify(error: &sqlx::Error) -> (String, bool) {
    match error {
        sqlx::Error::Database(db) => (
            format!("statement_failed/{}", db.code().unwrap_or_default()),
            true,
        ),
        _ => ("connection".into(), false),
    }
}

/// A connection of `direct` or `direct-pipelined`, as [`Connections`] keeps and reopens it.
pub(super) trait BaselineConnection: Sized {
    /// A new connection to `url`; the reason when there is none.
    async fn open(url: &str, lock_timeout_ms: u64) -> Result<Self, String>;
    /// Whether the connection is known to be gone, so that a new one is opened in its place.
    fn is_closed(&self) -> bool;
    /// Runs `sql` on its own; on failure, the reason and whether the connection is still usable.
    async fn run(&mut self, sql: &str) -> Result<(), (String, bool)>;
}

impl BaselineConnection for PgConnection {
    async fn open(url: &str, lock_timeout_ms: u64) -> Result<Self, String> {
        open(url, lock_timeout_ms).await
    }

    fn is_closed(&self) -> bool {
        // sqlx tells only by failing: a broken connection is dropped when a statement fails.
        false
    }

    async fn run(&mut self, sql: &str) -> Result<(), (String, bool)> {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(self)
            .await
            .map(|_| ())
            .map_err(|error| classify(&error))
    }
}

/// One client's connections of either kind, a slot per shard: a branch takes its shard's and
/// puts it back while it is still usable, and an empty slot is filled by opening a new one.
pub(super) struct Connections<C> {
    urls: Vec<String>,
    lock_timeout_ms: u64,
    slots: Vec<Option<C>>,
}

impl<C: BaselineConnection> Connections<C> {
    pub(super) fn new(urls: Vec<String>, lock_timeout_ms: u64) -> Self {
        let slots = urls.iter().map(|_| None).collect();
        Connections {
            urls,
            lock_timeout_ms,
            slots,
        }
    }

    /// Fills every empty slot with `open` (up front, so that connecting is not measured). `open`
    /// is the client's own, not [`BaselineConnection::open`], so that its error keeps its type:
    /// the pipelined one says what failed.
    pub(super) async fn fill<E>(&mut self, open: impl AsyncFn(&str, u64) -> Result<C, E>) -> Result<(), E> {
        for (slot, url) in self.slots.iter_mut().zip(&self.urls) {
            if slot.is_none() {
                *slot = Some(open(url, self.lock_timeout_ms).await?);
            }
        }
        Ok(())
    }

    /// `shard`'s connection, a new one when its slot is empty or its connection gone.
    pub(super) async fn take(&mut self, shard: usize) -> Result<C, String> {
        match self.slots.get_mut(shard).and_then(Option::take) {
            Some(connection) if !connection.is_closed() => Ok(connection),
            _ => {
                let url = self.urls.get(shard).ok_or("no such shard")?;
                C::open(url, self.lock_timeout_ms).await
            }
        }
    }

    /// Puts `shard`'s connection back for its next branch.
    pub(super) fn put(&mut self, shard: usize, connection: C) {
        self.slots[shard] = Some(connection);
    }

    /// The connections still kept, to close them.
    pub(super) fn into_kept(self) -> impl Iterator<Item = C> {
        self.slots.into_iter().flatten()
    }

    /// The second phase, once every branch has ended its first: `COMMIT PREPARED '<gid>'` on each
    /// shard in `prepared`, in parallel, or `ROLLBACK PREPARED` when the first phase failed
    /// (`failure`). A shard is tried [`FINISH_ATTEMPTS`] times, on a new connection after one
    /// broke, since a prepared branch left behind holds its locks until someone ends it. `Err` is
    /// the first failure, the first phase's before any of this one's.
    pub(super) async fn finish_prepared(
        &mut self,
        gid: &str,
        prepared: Vec<usize>,
        mut failure: Option<String>,
    ) -> Result<(), String> {
        let verb = if failure.is_none() {
            "COMMIT PREPARED"
        } else {
            "ROLLBACK PREPARED"
        };
        let sql = format!("{verb} '{gid}'");
        let finishing: Vec<_> = prepared
            .into_iter()
            .map(|shard| (shard, self.slots.get_mut(shard).and_then(Option::take)))
            .collect();
        let finished = join_all(finishing.into_iter().map(|(shard, connection)| {
            let url = self.urls.get(shard).map(String::as_str).unwrap_or_default();
            let lock_timeout_ms = self.lock_timeout_ms;
            let sql = &sql;
            async move {
                let mut connection = connection;
                let mut last = String::new();
                for _ in 0..FINISH_ATTEMPTS {
                    let mut current = match connection.take() {
                        Some(c) if !c.is_closed() => c,
                        _ => match C::open(url, lock_timeout_ms).await {
                            Ok(c) => c,
                            Err(e) => {
                                last = e;
                                continue;
                            }
                        },
                    };
                    match current.run(sql).await {
                        Ok(()) => return (shard, Some(current), Ok(())),
                        Err((reason, usable)) => {
                            last = reason;
                            if usable {
                                connection = Some(current);
                            }
                        }
                    }
                }
                (shard, connection, Err(format!("finish_failed/{last}")))
            }
        }))
        .await;
        for (shard, connection, result) in finished {
            if let Some(connection) = connection {
                self.put(shard, connection);
            }
            if let Err(reason) = result {
                failure.get_or_insert(reason);
            }
        }
        match failure {
            None => Ok(()),
            Some(reason) => Err(reason),
        }
    }
}

async fn run_branch(
    conn: &mut PgConnection,
    work: &ShardWork,
    finish: &Finish,
) -> Result<Ended, (String, bool)> {
    let mut open = false;
    let result: Result<Ended, (String, bool)> = async {
        sqlx::raw_sql("BEGIN")
            .execute(&mut *conn)
            .await
            .map_err(|e| classify(&e))?;
        open = true;
        for stmt in &work.stmts {
            let mut query = sqlx::query(stmt.sql);
            for param in &stmt.params {
                query = query.bind(*param);
            }
            let done = query.execute(&mut *conn).await.map_err(|e| classify(&e))?;
            if let Some(expected) = stmt.expect_rows
                && done.rows_affected() != expected
            {
                return Err(("expect_rows".to_string(), true));
            }
        }
        match finish {
            Finish::Prepare(gid) => {
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("PREPARE TRANSACTION '{gid}'")))
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| classify(&e))?;
                Ok(Ended::Prepared)
            }
            Finish::Commit => {
                sqlx::raw_sql("COMMIT")
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| classify(&e))?;
                Ok(Ended::Committed)
            }
        }
    }
    .await;
    if let Err((_, usable)) = &result
        && *usable
        && open
    {
        // A failed PREPARE or COMMIT already ended the transaction; ROLLBACK then only warns.
        let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
    }
    result
}

impl DirectClient {
    pub fn new(mode: Baseline, urls: Vec<String>, lock_timeout_ms: u64, client: usize) -> DirectClient {
        DirectClient {
            mode,
            conns: Connections::new(urls, lock_timeout_ms),
            gid_prefix: format!("bench:{}:{client}", std::process::id()),
            sequence: 0,
        }
    }

    /// Opens every shard's connection up front, so that connecting is not measured.
    pub async fn connect_all(&mut self) -> Result<(), String> {
        self.conns.fill(open).await
    }

    /// Runs one transaction; `Err(reason)` when it did not commit.
    pub async fn run_txn(&mut self, plan: &TxnPlan) -> Result<(), String> {
        self.sequence += 1;
        let two_phase = self.mode == Baseline::Direct && plan.writers() > 1;
        let gid = format!("{}:{}", self.gid_prefix, self.sequence);
        let mut taken = Vec::with_capacity(plan.work.len());
        for work in &plan.work {
            taken.push((work, self.conns.take(work.shard).await?));
        }
        let branches = join_all(taken.into_iter().map(|(work, mut conn)| {
            let finish = if two_phase && work.writes() {
                Finish::Prepare(gid.clone())
            } else {
                Finish::Commit
            };
            async move {
                let result = run_branch(&mut conn, work, &finish).await;
                (work.shard, conn, result)
            }
        }))
        .await;

        let mut prepared = Vec::new();
        let mut failure = None;
        for (shard, conn, result) in branches {
            match result {
                Ok(Ended::Prepared) => {
                    prepared.push(shard);
                    self.conns.put(shard, conn);
                }
                Ok(Ended::Committed) => self.conns.put(shard, conn),
                Err((reason, usable)) => {
                    if usable {
                        self.conns.put(shard, conn);
                    }
                    failure.get_or_insert(reason);
                }
            }
        }
        self.conns.finish_prepared(&gid, prepared, failure).await
    }

    /// Closes every connection politely.
    pub async fn close(self) {
        for conn in self.conns.into_kept() {
            let _ = conn.close().await;
        }
    }
}
