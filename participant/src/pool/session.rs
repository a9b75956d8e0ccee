//! Whether a pooled connection's session is still as it was opened, checked after a branch before
//! the connection may serve another database role or the participant itself.
//!
//! A branch's statements can change the session behind the SQL guard's back: a function body may
//! run `set_config('role', 'x', false)` (every later branch on the connection would run as `x`),
//! `set_config('search_path', ..., false)` (every later client's unqualified names would resolve
//! elsewhere), change a timeout or make later transactions read-only, take a session-level
//! advisory lock, or create a temporary table (which would shadow a table of the same name for
//! every later client). So before a connection a branch used serves anyone else, it runs one
//! more statement, the check: it reads what must not have changed (`STATE`) and compares it with
//! what the same read gave when the connection opened (`SessionState`); any difference, or a check
//! that fails, closes the connection instead of pooling it (`Session::Changed`, logged with what
//! changed and counted). When the check runs is the pool's business (`pool`, "Whose a connection
//! is"): before a connection changes hands between database roles or goes to the participant's
//! own statements, in a round trip of its own (`check`); and within one role again about every
//! `pool::CHECK_INTERVAL`, in the round trip that ends a branch (its COMMIT, ROLLBACK or PREPARE
//! TRANSACTION: `end_and_check`) or on an idle connection.
//!
//! The check is a statement prepared once per connection (`treaty_session_check`, in the round
//! trip that opens it), so each check costs only its execution, not its parsing and planning:
//! measured on PostgreSQL 15, a short branch (BEGIN, SELECT 1, COMMIT) took about 50 µs more server
//! time with the check, half of what the same check sent as text cost. Should a client's function
//! deallocate it, the check fails and the connection is closed. (A client able to create a
//! function, or one that returned to the participant's role, see the README's "Database roles",
//! could replace it with one that answers what was read at open; the check is a wall against
//! sessions changed by mistake and by clients without those privileges.)
//!
//! Session-level advisory locks are the one thing released rather than verified: the check calls
//! `pg_advisory_unlock_all()`, which releases exactly those (transaction-level ones ended with the
//! transaction) for a few microseconds, where verifying them means `pg_locks`, whose function
//! copies every lock table of the server under all its partition locks: about 240 µs more per
//! branch with 200 connections and 256 prepared transactions allowed, more than the branch's own
//! statements cost. A lock the SQL guard sees taken (`pg_advisory_lock(...)` in the client's text)
//! still closes the connection.
//!
//! Run after a branch, never inside it: deferred triggers change the session at COMMIT, after
//! any statement inside the transaction could look, and a `SET LOCAL` can mask a setting changed
//! for the session (docs/performance.md, session 20). The participant's own statements, which run
//! on the same pool, only ever take a checked connection.

use std::borrow::Cow;

use futures::TryStreamExt as _;
use tokio_postgres::{SimpleQueryMessage, SimpleQueryRow, Step, StepOutput};

use super::Connection;
use crate::postgres::DbError;

/// What a branch must leave as it found it: a name for the log, and the expression that reads
/// it. Every function and type is qualified, so that a changed `search_path` cannot change what
/// the check calls.
const STATE: [(&str, &str); 21] = [
    ("current_user", "current_user::pg_catalog.text"),
    ("session_user", "session_user::pg_catalog.text"),
    // The OID of the session's temporary schema, `0` until a temporary object was made. Once
    // made it stays for the session, even after its tables are dropped, so any use closes the
    // connection; temporary objects are rare in a branch.
    (
        "the temporary schema (pg_my_temp_schema)",
        "pg_catalog.pg_my_temp_schema()::pg_catalog.text",
    ),
    ("search_path", "pg_catalog.current_setting('search_path')"),
    (
        "statement_timeout",
        "pg_catalog.current_setting('statement_timeout')",
    ),
    ("lock_timeout", "pg_catalog.current_setting('lock_timeout')"),
    (
        "idle_in_transaction_session_timeout",
        "pg_catalog.current_setting('idle_in_transaction_session_timeout')",
    ),
    (
        "default_transaction_read_only",
        "pg_catalog.current_setting('default_transaction_read_only')",
    ),
    ("row_security", "pg_catalog.current_setting('row_security')"),
    // Settings a `SET` or a function's `set_config(..., false)` could leave for the rest of the
    // session that change whether a commit is flushed (the participant's own COMMIT PREPARED would
    // be acknowledged unflushed) or what the next branch's statements mean. Named one by one:
    // reading every session setting (`pg_settings`) costs PostgreSQL about 50 µs per check,
    // these a few µs together.
    (
        "synchronous_commit",
        "pg_catalog.current_setting('synchronous_commit')",
    ),
    ("client_encoding", "pg_catalog.current_setting('client_encoding')"),
    ("DateStyle", "pg_catalog.current_setting('DateStyle')"),
    ("IntervalStyle", "pg_catalog.current_setting('IntervalStyle')"),
    ("TimeZone", "pg_catalog.current_setting('TimeZone')"),
    (
        "session_replication_role",
        "pg_catalog.current_setting('session_replication_role')",
    ),
    (
        "standard_conforming_strings",
        "pg_catalog.current_setting('standard_conforming_strings')",
    ),
    ("bytea_output", "pg_catalog.current_setting('bytea_output')"),
    (
        "extra_float_digits",
        "pg_catalog.current_setting('extra_float_digits')",
    ),
    (
        "transform_null_equals",
        "pg_catalog.current_setting('transform_null_equals')",
    ),
    ("xmloption", "pg_catalog.current_setting('xmloption')"),
    // A cursor declared `WITH HOLD` outlives its transaction: the next branch, perhaps under
    // another role, could fetch rows read with this one's privileges.
    (
        "cursors held open (WITH HOLD)",
        "(SELECT pg_catalog.count(*) FROM pg_catalog.pg_cursors WHERE is_holdable)::pg_catalog.text",
    ),
];

/// The check's name among the session's prepared statements.
const CHECK: &str = "treaty_session_check";
/// Runs the check prepared on the connection.
const CHECK_SQL: &str = "EXECUTE treaty_session_check";

/// Run once when a connection opens: prepares the check (the backend's pid, the state, and
/// session-level advisory locks released) and runs it, so that the pid (to cancel a statement
/// from another connection) and the clean state come back in the same round trip.
fn open_sql() -> String {
    let state: Vec<&str> = STATE.iter().map(|(_, expression)| *expression).collect();
    format!(
        "PREPARE {CHECK} AS SELECT pg_catalog.pg_backend_pid(), {}, \
         pg_catalog.pg_advisory_unlock_all() IS NULL; EXECUTE {CHECK}",
        state.join(", ")
    )
}

/// The parts of a session a branch must leave as it found them, in `STATE`'s order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionState {
    values: Vec<String>,
}

impl SessionState {
    /// The state from a row of the check (text, simple protocol): the pid first, then `STATE`.
    fn from_row(row: &SimpleQueryRow) -> Result<SessionState, String> {
        let values = (1..=STATE.len())
            .map(|column| match row.try_get(column) {
                Ok(Some(value)) => Ok(value.to_owned()),
                Ok(None) => Ok(String::new()),
                Err(error) => Err(error.to_string()),
            })
            .collect::<Result<_, _>>()?;
        Ok(SessionState { values })
    }

    /// `Session::Clean` when nothing differs from `clean`, else `Changed` naming what does.
    fn compared_with(&self, clean: &SessionState) -> Session {
        let changed = self.differences(clean);
        if changed.is_empty() {
            Session::Clean
        } else {
            Session::Changed(changed.join("; "))
        }
    }

    /// What differs from `clean`, for the log; empty when nothing does.
    pub fn differences(&self, clean: &SessionState) -> Vec<String> {
        STATE
            .iter()
            .zip(self.values.iter().zip(&clean.values))
            .filter(|(_, (now, then))| now != then)
            .map(|((what, _), (now, then))| format!("{what} is {now:?}, was {then:?}"))
            .collect()
    }
}

/// Prepares the check on a new connection and reads its backend pid and clean state.
pub async fn open(connection: &mut Connection) -> Result<(i32, SessionState), String> {
    let messages = connection
        .client()
        .simple_query(&open_sql())
        .await
        .map_err(|error| error.to_string())?;
    for message in &messages {
        if let SimpleQueryMessage::Row(row) = message {
            let pid = row
                .try_get(0)
                .map_err(|error| error.to_string())?
                .and_then(|pid| pid.parse().ok())
                .ok_or("the session check returned no backend pid")?;
            return Ok((pid, SessionState::from_row(row)?));
        }
    }
    Err("the session check returned no row".into())
}

/// What the check found after a branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Session {
    /// As it was opened: the connection may serve another branch.
    Clean,
    /// Not checked this time (`pool::CHECK_INTERVAL`): the connection goes back marked with the
    /// branch's role, for the check before anyone else uses it.
    Unchecked,
    /// Changed (what, for the log), or the check could not tell: the connection is closed.
    Changed(String),
    /// The connection broke before the check answered (why, for the log): it is closed, but
    /// nothing says its session changed, so it is not counted as a dirty one.
    Lost(String),
}

/// What a check that failed with `error` found: a broken connection is `Lost`, anything else
/// (PostgreSQL refused the check) `Changed`.
fn check_failed(error: &DbError) -> Session {
    if error.is_connection() {
        Session::Lost(format!(
            "the connection broke before the session check answered: {error}"
        ))
    } else {
        Session::Changed(format!("the session check failed: {error}"))
    }
}

/// One of a simple query's statements failed: which (counted from 0) and why. The statements
/// after it did not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementFailed {
    pub index: usize,
    pub error: DbError,
}

/// Runs the check alone, in a round trip of its own (a connection about to change hands, `pool`).
pub async fn check(connection: &Connection, clean: &SessionState) -> Session {
    match end_and_check(connection, "", 0, Some(clean)).await {
        Ok(found) => found,
        Err(failed) => check_failed(&failed.error),
    }
}

/// Runs `sql`, a simple-query text of `statements` statements that ends the branch's
/// transaction, with the check after it when `clean` is given (`PooledConnection::clean_session`:
/// when one is due), in one round trip; answers what the check found (`Session::Unchecked`
/// without one), or which of the statements failed. The check's own failure (after every
/// statement completed) is `Session::Changed`: the branch ended as asked, only the connection is
/// in doubt.
pub async fn end_and_check(
    connection: &Connection,
    sql: &str,
    statements: usize,
    clean: Option<&SessionState>,
) -> Result<Session, StatementFailed> {
    if clean.is_some() && statements > 0 {
        crate::metrics::global().session_checked("branch_end");
    }
    // Borrowed when no check is due, the common case: nothing allocated on the commit path.
    let text: Cow<'_, str> = match (clean, sql.is_empty()) {
        (None, _) => Cow::Borrowed(sql),
        (Some(_), true) => Cow::Owned(format!("EXECUTE {CHECK}")),
        (Some(_), false) => Cow::Owned(format!("{sql}; EXECUTE {CHECK}")),
    };
    // Counted per statement: PostgreSQL skips the rest of a simple query after an error, so the
    // number completed says which one failed.
    let mut completed = 0;
    let mut state = None;
    let failed = match connection.client().simple_query_raw(&text).await {
        Err(error) => Some(DbError::from(error)),
        Ok(results) => {
            futures::pin_mut!(results);
            loop {
                match results.try_next().await {
                    Ok(Some(SimpleQueryMessage::CommandComplete(_))) => completed += 1,
                    Ok(Some(SimpleQueryMessage::Row(row))) if completed == statements => {
                        state = Some(SessionState::from_row(&row));
                    }
                    // A row of the branch's own statements (none returns one): not the check's.
                    Ok(Some(_)) => {}
                    Ok(None) => break None,
                    Err(error) => break Some(DbError::from(error)),
                }
            }
        }
    };
    match failed {
        Some(error) if completed < statements => Err(StatementFailed {
            index: completed,
            error,
        }),
        Some(error) if clean.is_some() => Ok(check_failed(&error)),
        Some(error) if error.is_connection() => Ok(Session::Lost(format!(
            "the connection broke after the branch's statements: {error}"
        ))),
        Some(error) => Ok(Session::Changed(format!(
            "the connection failed after the branch's statements: {error}"
        ))),
        // Fewer answers than statements and no error: the ending statements (a PREPARE, a
        // COMMIT) are not taken as done, and, as after a broken connection, whether they ran is
        // unknown.
        None if completed < statements => Err(StatementFailed {
            index: completed,
            error: DbError::Connection(format!(
                "PostgreSQL answered {completed} of {statements} statements and no error; whether \
                 the rest ran is unknown"
            )),
        }),
        None => Ok(match (state, clean) {
            (_, None) if completed == statements => Session::Unchecked,
            (_, None) => Session::Changed(format!(
                "PostgreSQL answered {completed} of {statements} statements"
            )),
            (Some(Ok(state)), Some(clean)) => state.compared_with(clean),
            (Some(Err(error)), _) => {
                Session::Changed(format!("the session check's row did not decode: {error}"))
            }
            (None, Some(_)) => Session::Changed(format!(
                "PostgreSQL answered {completed} of {} statements and no session check",
                statements + 1
            )),
        }),
    }
}

/// Runs `steps` in one pipeline (`Connection::pipeline`, one `Sync`), the last `ending` of which
/// end the branch's transaction, with the check after them when `clean` is given, all in one
/// write: answers every step, and what the check found or which of the ending steps failed (as
/// `end_and_check`). The check is a request of its own, so PostgreSQL runs it whatever the steps
/// did; its answer counts only when every step succeeded.
pub async fn steps_and_check(
    connection: &Connection,
    steps: &[Step<'_>],
    ending: usize,
    clean: Option<&SessionState>,
) -> (Vec<Result<StepOutput, DbError>>, Result<Session, StatementFailed>) {
    if clean.is_some() && ending > 0 {
        crate::metrics::global().session_checked("branch_end");
    }
    let (answers, checked) = match clean {
        None => (connection.pipeline(steps).await, None),
        Some(_) if steps.is_empty() => (Vec::new(), Some(run_check(connection).await)),
        Some(_) => {
            let (answers, checked) = futures::join!(connection.pipeline(steps), run_check(connection));
            (answers, Some(checked))
        }
    };
    let first_ending = steps.len().saturating_sub(ending);
    let failed = answers[first_ending..]
        .iter()
        .enumerate()
        .find_map(|(index, answer)| answer.as_ref().err().map(|error| (index, error.clone())));
    let ended = match (failed, clean, checked) {
        (Some((index, error)), _, _) => Err(StatementFailed { index, error }),
        (None, None, _) | (None, Some(_), None) => Ok(Session::Unchecked),
        (None, Some(clean), Some(checked)) => Ok(match checked {
            Err(error) => check_failed(&error),
            Ok(None) => Session::Changed("the session check returned no row".into()),
            Ok(Some(Err(error))) => {
                Session::Changed(format!("the session check's row did not decode: {error}"))
            }
            Ok(Some(Ok(state))) => state.compared_with(clean),
        }),
    };
    (answers, ended)
}

/// The check's own request (simple protocol, its row in text): the state it read, if it answered
/// a row.
async fn run_check(connection: &Connection) -> Result<Option<Result<SessionState, String>>, DbError> {
    let results = connection.client().simple_query_raw(CHECK_SQL).await?;
    futures::pin_mut!(results);
    let mut state = None;
    while let Some(message) = results.try_next().await? {
        if let SimpleQueryMessage::Row(row) = message {
            state = Some(SessionState::from_row(&row));
        }
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_connection_is_lost_and_a_refused_check_is_a_changed_session() {
        let broken = check_failed(&DbError::Connection("connection reset by peer".into()));
        assert!(
            matches!(&broken, Session::Lost(why) if why.contains("connection reset")),
            "{broken:?}"
        );
        let refused = check_failed(&DbError::Sql {
            sqlstate: "26000".into(),
            message: "prepared statement does not exist".into(),
        });
        assert!(
            matches!(&refused, Session::Changed(why) if why.contains("26000")),
            "{refused:?}"
        );
    }

    /// A clean state: every value `v<index>`, but those named in `overrides`.
    fn state_with(overrides: &[(&str, &str)]) -> SessionState {
        let values: Vec<String> = STATE
            .iter()
            .enumerate()
            .map(|(index, (name, _))| {
                overrides
                    .iter()
                    .find(|(named, _)| named == name)
                    .map_or_else(|| format!("v{index}"), |(_, value)| (*value).to_owned())
            })
            .collect();
        SessionState { values }
    }

    fn clean() -> SessionState {
        state_with(&[])
    }

    #[test]
    fn a_changed_role_search_path_or_temporary_schema_is_named() {
        assert_eq!(clean().values.len(), STATE.len());
        assert!(clean().differences(&clean()).is_empty());
        let leaked = state_with(&[
            ("current_user", "x"),
            ("the temporary schema (pg_my_temp_schema)", "16390"),
            ("search_path", "evil, public"),
            ("default_transaction_read_only", "on"),
            ("synchronous_commit", "off"),
            ("client_encoding", "LATIN1"),
            ("cursors held open (WITH HOLD)", "1"),
        ]);
        let changed = leaked.differences(&clean()).join("; ");
        for what in [
            "current_user is \"x\"",
            "search_path",
            "temporary schema",
            "default_transaction_read_only is \"on\"",
            "synchronous_commit is \"off\"",
            "client_encoding is \"LATIN1\"",
            "cursors held open (WITH HOLD) is \"1\"",
        ] {
            assert!(changed.contains(what), "{what}: {changed}");
        }
        assert!(!changed.contains("session_user"), "{changed}");
        assert!(!changed.contains("TimeZone"), "{changed}");
    }

    #[test]
    fn the_check_is_prepared_qualified_and_releases_advisory_locks() {
        let sql = open_sql();
        assert!(sql.starts_with("PREPARE treaty_session_check AS SELECT pg_catalog.pg_backend_pid(), "));
        assert!(sql.ends_with("pg_catalog.pg_advisory_unlock_all() IS NULL; EXECUTE treaty_session_check"));
        for (_, expression) in STATE {
            assert!(sql.contains(expression), "{expression}");
            // Only keywords and qualified names: nothing a search_path could redirect.
            assert!(
                expression.starts_with("pg_catalog.") || expression.ends_with("::pg_catalog.text"),
                "{expression}"
            );
        }
    }
}
