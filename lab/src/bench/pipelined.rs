//! The `direct-pipelined` baseline: `direct`'s SQL (per shard `BEGIN`, the statements, `PREPARE
//! TRANSACTION` where the shard wrote and more than one shard wrote, else `COMMIT`; then `COMMIT
//! PREPARED` on each prepared shard once all prepared), driven with tokio-postgres so that each
//! shard's `BEGIN`, statements and `PREPARE TRANSACTION` leave together and are answered in one
//! round trip, the shards in parallel. That is what Treaty's participant does once it pipelines its
//! branches, so this is the ceiling that compares with it; `direct` (sqlx, one statement per round
//! trip) stays beside it.
//!
//! Each branch goes as one pipeline (`Client::pipeline`, the same call Treaty's participant makes):
//! its requests leave in one write with one Sync after the last, so PostgreSQL answers them in one
//! flush, and after a failed statement it skips the rest (a `PREPARE TRANSACTION` or `COMMIT`
//! behind it does not run; the transaction is then rolled back). Each session still starts with
//! `default_transaction_read_only=on` and `BEGIN` asks for `READ WRITE`, as Treaty's do. Every
//! answer is checked: the abort is counted under the failed statement's SQLSTATE, as `direct`
//! counts it, and a `PREPARE` that went through on a branch whose row count was wrong is rolled
//! back with the others. `BEGIN` and the statements are prepared once per connection, so each
//! runs as one Bind/Execute.

use std::collections::HashMap;
use std::time::Duration;

use futures::future::join_all;
use tokio::task::JoinHandle;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, NoTls, PipelineOutput, Statement, Step};

use super::baselines::{BaselineConnection, Connections};
use super::workload::{STATEMENTS, ShardWork, TxnPlan};

/// `BEGIN` of every branch: `READ WRITE` against the session's read-only default (see the module).
const BEGIN: &str = "BEGIN ISOLATION LEVEL READ COMMITTED READ WRITE";
/// Startup option of every session: outside a `BEGIN ... READ WRITE`, nothing can write.
const READ_ONLY_DEFAULT: &str = "-c default_transaction_read_only=on";
/// How long `close` waits for a connection's task to end after its client is dropped.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("bad PostgreSQL URL: {0}")]
    Url(#[source] tokio_postgres::Error),
    #[error("connecting to PostgreSQL: {0}")]
    Connect(#[source] tokio_postgres::Error),
    #[error("setting up the session ({what}): {source}")]
    Setup {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// One connection with its statements prepared.
struct Session {
    client: Client,
    connection: JoinHandle<()>,
    begin: Statement,
    statements: HashMap<&'static str, Statement>,
}

async fn open(url: &str, lock_timeout_ms: u64) -> Result<Session, OpenError> {
    let mut config: Config = url.parse().map_err(OpenError::Url)?;
    let options = match config.get_options() {
        Some(given) if !given.trim().is_empty() => format!("{given} {READ_ONLY_DEFAULT}"),
        _ => READ_ONLY_DEFAULT.to_string(),
    };
    config.options(options);
    let (client, connection) = config.connect(NoTls).await.map_err(OpenError::Connect)?;
    // The connection's task ends when the client is dropped (or the server goes away).
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    let setup = |what: &'static str| move |source| OpenError::Setup { what, source };
    // As `direct` sets it: once per session.
    client
        .batch_execute(&format!("SET lock_timeout = '{lock_timeout_ms}ms'"))
        .await
        .map_err(setup("lock_timeout"))?;
    let begin = client.prepare(BEGIN).await.map_err(setup("prepare BEGIN"))?;
    let mut statements = HashMap::with_capacity(STATEMENTS.len());
    for sql in STATEMENTS {
        let statement = client.prepare(sql).await.map_err(setup("prepare a statement"))?;
        statements.insert(sql, statement);
    }
    Ok(Session {
        client,
        connection,
        begin,
        statements,
    })
}

/// `statement_failed/<sqlstate>` for a database error, `connection` otherwise; whether the
/// connection is still usable (as `direct` classifies sqlx's errors).
fn classify(error: &tokio_postgres::Error) -> (String, bool) {
    match error.code() {
        Some(state) if !error.is_closed() => (format!("statement_failed/{}", state.code()), true),
        _ => ("connection".into(), false),
    }
}

impl BaselineConnection for Session {
    async fn open(url: &str, lock_timeout_ms: u64) -> Result<Self, String> {
        open(url, lock_timeout_ms)
            .await
            .map_err(|_| "connect".to_string())
    }

    fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    async fn run(&mut self, sql: &str) -> Result<(), (String, bool)> {
        self.client
            .batch_execute(sql)
            .await
            .map_err(|error| classify(&error))
    }
}

/// A pipeline's answers in order: each completed step's row count, then the failure (a refused
/// step, or the connection's); steps PostgreSQL skipped after a failure have none.
fn answers_of(
    output: Result<PipelineOutput, tokio_postgres::Error>,
) -> Vec<Result<u64, tokio_postgres::Error>> {
    match output {
        Err(error) => vec![Err(error)],
        Ok(output) => {
            let mut answers: Vec<_> = output
                .completed
                .iter()
                .map(|step| Ok(step.rows_affected))
                .collect();
            answers.extend(output.failed.map(Err));
            answers
        }
    }
}

/// How a shard's branch ends its first phase.
#[derive(Clone)]
enum Finish {
    Prepare(String),
    Commit,
}

impl Finish {
    fn sql(&self) -> String {
        match self {
            Finish::Prepare(gid) => format!("PREPARE TRANSACTION '{gid}'"),
            Finish::Commit => "COMMIT".into(),
        }
    }
}

/// What became of one branch.
enum Branch {
    Prepared,
    Committed,
    /// Did not commit. `prepared`: its `PREPARE TRANSACTION` went through (it was sent with the
    /// statements, whose row count then proved wrong), so it must be rolled back.
    Failed {
        reason: String,
        usable: bool,
        prepared: bool,
    },
}

/// Whether a plain `COMMIT` may leave with the statements. A `PREPARE` always may (what it
/// prepared is rolled back when a check fails), a `COMMIT` only when the last statement is the
/// branch's one write: a row count that proves wrong then means that write, an update by primary
/// key, changed no row, so the commit committed nothing the check would have refused.
fn commit_rides(work: &ShardWork) -> bool {
    let writes = work.stmts.iter().filter(|s| s.writes).count();
    writes == 0 || (writes == 1 && work.stmts.last().is_some_and(|s| s.writes))
}

async fn run_branch(session: &mut Session, work: &ShardWork, finish: &Finish) -> Branch {
    // Prepared at open for every statement the workloads use; anything else is prepared here,
    // before the pipeline.
    for stmt in &work.stmts {
        if !session.statements.contains_key(stmt.sql) {
            match session.client.prepare(stmt.sql).await {
                Ok(statement) => {
                    session.statements.insert(stmt.sql, statement);
                }
                Err(error) => {
                    let (reason, usable) = classify(&error);
                    return Branch::Failed {
                        reason,
                        usable,
                        prepared: false,
                    };
                }
            }
        }
    }
    let session = &*session;
    let client = &session.client;
    let rides = matches!(finish, Finish::Prepare(_)) || commit_rides(work);
    let finish_sql = finish.sql();
    let mut params = Vec::with_capacity(work.stmts.len());
    for stmt in &work.stmts {
        // Present: prepared above.
        let Some(statement) = session.statements.get(stmt.sql) else {
            return Branch::Failed {
                reason: "unprepared".into(),
                usable: true,
                prepared: false,
            };
        };
        let values: Vec<&(dyn ToSql + Sync)> = stmt
            .params
            .iter()
            .map(|param| param as &(dyn ToSql + Sync))
            .collect();
        params.push((statement, values));
    }
    let mut steps: Vec<Step<'_>> = Vec::with_capacity(work.stmts.len() + 2);
    steps.push(Step::Prepared(&session.begin, &[]));
    steps.extend(
        params
            .iter()
            .map(|(statement, values)| Step::Prepared(statement, values)),
    );
    if rides {
        steps.push(Step::Text(&finish_sql));
    }
    let answers = answers_of(client.pipeline(&steps).await);
    let mut answers = answers.into_iter();

    // BEGIN: had it failed, nothing after it could write (read-only outside the transaction), and
    // a PREPARE or COMMIT after it found no transaction (a warning).
    match answers.next() {
        Some(Ok(_)) => {}
        Some(Err(error)) => {
            let (reason, usable) = classify(&error);
            return Branch::Failed {
                reason,
                usable,
                prepared: false,
            };
        }
        None => {
            return Branch::Failed {
                reason: "connection".into(),
                usable: false,
                prepared: false,
            };
        }
    }
    // The statements, in order: the first failure is the reason; the transaction is then aborted,
    // and a PREPARE or COMMIT sent after it rolled it back.
    let mut failure: Option<(String, bool)> = None;
    // Whether PostgreSQL refused a statement (the transaction is then aborted, whatever came first).
    let mut refused = false;
    for stmt in &work.stmts {
        let failed = match answers.next() {
            Some(Ok(rows)) => match stmt.expect_rows {
                Some(expected) if rows != expected => Some(("expect_rows".to_string(), true)),
                _ => None,
            },
            Some(Err(error)) => {
                refused = true;
                Some(classify(&error))
            }
            None => Some(("connection".to_string(), false)),
        };
        if failure.is_none() {
            failure = failed;
        }
    }
    let finished = if rides {
        answers.next()
    } else if failure.is_none() {
        Some(client.batch_execute(&finish_sql).await.map(|()| 0))
    } else {
        None
    };
    match (failure, finished) {
        (None, Some(Ok(_))) => match finish {
            Finish::Prepare(_) => Branch::Prepared,
            Finish::Commit => Branch::Committed,
        },
        // PREPARE or COMMIT refused: PostgreSQL has ended the transaction.
        (None, Some(Err(error))) => {
            let (reason, usable) = classify(&error);
            Branch::Failed {
                reason,
                usable,
                prepared: false,
            }
        }
        (None, None) => Branch::Failed {
            reason: "connection".into(),
            usable: false,
            prepared: false,
        },
        (Some((reason, usable)), finished) => {
            // A row count was wrong but PostgreSQL refused nothing: the PREPARE sent with the
            // statements went through.
            let prepared = rides
                && !refused
                && usable
                && matches!(finish, Finish::Prepare(_))
                && matches!(finished, Some(Ok(_)));
            let ended = rides && finished.is_some();
            if usable && !ended {
                // The transaction is still open (nothing ended it): roll it back.
                if let Err(error) = client.batch_execute("ROLLBACK").await {
                    return Branch::Failed {
                        reason,
                        usable: classify(&error).1,
                        prepared,
                    };
                }
            }
            Branch::Failed {
                reason,
                usable,
                prepared,
            }
        }
    }
}

/// One client's sessions (opened up front, reopened after a connection error).
pub struct PipelinedClient {
    sessions: Connections<Session>,
    gid_prefix: String,
    sequence: u64,
}

impl PipelinedClient {
    pub fn new(urls: Vec<String>, lock_timeout_ms: u64, client: usize) -> PipelinedClient {
        PipelinedClient {
            sessions: Connections::new(urls, lock_timeout_ms),
            gid_prefix: format!("bench-pipelined:{}:{client}", std::process::id()),
            sequence: 0,
        }
    }

    /// Opens every shard's session up front, so that connecting is not measured.
    pub async fn connect_all(&mut self) -> Result<(), OpenError> {
        self.sessions.fill(open).await
    }

    /// Runs one transaction; `Err(reason)` when it did not commit.
    pub async fn run_txn(&mut self, plan: &TxnPlan) -> Result<(), String> {
        self.sequence += 1;
        let two_phase = plan.writers() > 1;
        let gid = format!("{}:{}", self.gid_prefix, self.sequence);
        let mut taken = Vec::with_capacity(plan.work.len());
        for work in &plan.work {
            taken.push((work, self.sessions.take(work.shard).await?));
        }
        let branches = join_all(taken.into_iter().map(|(work, mut session)| {
            let finish = if two_phase && work.writes() {
                Finish::Prepare(gid.clone())
            } else {
                Finish::Commit
            };
            async move {
                let branch = run_branch(&mut session, work, &finish).await;
                (work.shard, session, branch)
            }
        }))
        .await;

        let mut prepared = Vec::new();
        let mut failure = None;
        for (shard, session, branch) in branches {
            match branch {
                Branch::Prepared => {
                    prepared.push(shard);
                    self.sessions.put(shard, session);
                }
                Branch::Committed => self.sessions.put(shard, session),
                Branch::Failed {
                    reason,
                    usable,
                    prepared: was_prepared,
                } => {
                    if was_prepared {
                        prepared.push(shard);
                    }
                    if usable {
                        self.sessions.put(shard, session);
                    }
                    failure.get_or_insert(reason);
                }
            }
        }
        self.sessions.finish_prepared(&gid, prepared, failure).await
    }

    /// Closes every session: dropping the client makes its connection send Terminate and end.
    pub async fn close(self) {
        for session in self.sessions.into_kept() {
            let Session {
                client, connection, ..
            } = session;
            drop(client);
            let _ = tokio::time::timeout(CLOSE_WAIT, connection).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::workload::Stmt;
    use super::*;

    fn stmt(writes: bool) -> Stmt {
        Stmt {
            sql: "SELECT 1",
            params: Vec::new(),
            expect_rows: writes.then_some(1),
            writes,
        }
    }

    #[test]
    fn a_commit_rides_with_the_statements_only_when_the_last_is_the_one_write() {
        let work = |stmts| ShardWork { shard: 0, stmts };
        assert!(commit_rides(&work(vec![stmt(true)])));
        assert!(commit_rides(&work(vec![stmt(false), stmt(false), stmt(true)])));
        assert!(commit_rides(&work(vec![stmt(false)])));
        assert!(!commit_rides(&work(vec![stmt(true), stmt(false)])));
        assert!(!commit_rides(&work(vec![stmt(true), stmt(true)])));
    }
}
