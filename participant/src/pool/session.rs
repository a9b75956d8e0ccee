//! Whether a pooled connection's session is still as it was opened, checked after every branch
//! before the connection may serve another client.
//!
//! A branch's statements can change the session behind the SQL guard's back: a function body may
//! run `set_config('role', 'x', false)` (every later branch on the connection would run as `x`),
//! `set_config('search_path', ..., false)` (every later client's unqualified names would resolve
//! elsewhere), take a session-level advisory lock, or create a temporary table. So a branch's last
//! round trip (its COMMIT, ROLLBACK or PREPARE TRANSACTION) carries one more statement, the check
//! (`CHECK_SQL`): it reads what must not have changed (the current and session user, the
//! temporary schema, `search_path`) and compares it with what the same read gave when the
//! connection opened (`SessionState`); any difference, or a check that fails, closes the
//! connection instead of pooling it (`Session::Changed`, logged with what changed and counted).
//!
//! Session-level advisory locks are the one thing released rather than verified: the check calls
//! `pg_advisory_unlock_all()`, which releases exactly those (transaction-level ones ended with the
//! transaction) for a few microseconds, where verifying them means `pg_locks`, whose function
//! copies every lock table of the server under all its partition locks: about 250 µs per branch
//! with 200 connections and 256 prepared transactions allowed, measured on PostgreSQL 15, more than
//! a short branch's own statements cost (docs: README "Database roles"). A lock the SQL guard sees
//! taken (`pg_advisory_lock(...)` in the client's text) still closes the connection.
//!
//! Checked after the branch rather than before the next one so that the participant's own
//! statements, which run on the same pool, never meet a changed session either.

use futures::TryStreamExt as _;
use sqlx::postgres::PgConnection;
use sqlx::{Executor as _, Row as _};

use crate::postgres::DbError;

/// What the session must still be after a branch, in the order `SessionState` holds it. Every
/// name is qualified: a changed `search_path` must not change what the check calls. (A macro, so
/// that both statements below are literals built from the one list.)
macro_rules! state_columns {
    () => {
        "current_user::text, session_user::text, pg_catalog.pg_my_temp_schema()::text, \
         pg_catalog.current_setting('search_path')"
    };
}

/// Read once when a connection opens: its backend's pid (to cancel a statement from another
/// connection) and its clean state.
const OPEN_SQL: &str = concat!("SELECT pg_catalog.pg_backend_pid(), ", state_columns!());

/// The statement folded after a branch's last one: session-level advisory locks released, and
/// the state read back. It runs in a transaction of its own (the branch's has just ended).
const CHECK_SQL: &str = concat!(
    "SELECT ",
    state_columns!(),
    ", pg_catalog.pg_advisory_unlock_all() IS NULL"
);

/// The parts of a session a branch must leave as it found them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionState {
    current_user: String,
    session_user: String,
    /// The OID of the session's temporary schema, `0` until a temporary object was made. Once
    /// made it stays for the session, even after its tables are dropped, so any use closes the
    /// connection; temporary tables are rare in a branch.
    temp_schema: String,
    search_path: String,
}

impl SessionState {
    /// Reads the state from the first four columns of `row` starting at `first`.
    fn from_row(row: &sqlx::postgres::PgRow, first: usize) -> Result<SessionState, sqlx::Error> {
        Ok(SessionState {
            current_user: row.try_get(first)?,
            session_user: row.try_get(first + 1)?,
            temp_schema: row.try_get(first + 2)?,
            search_path: row.try_get(first + 3)?,
        })
    }

    /// What differs from `clean`, for the log; empty when nothing does.
    pub fn differences(&self, clean: &SessionState) -> Vec<String> {
        let mut changed = Vec::new();
        let mut compare = |what: &str, now: &str, then: &str| {
            if now != then {
                changed.push(format!("{what} is {now:?}, was {then:?}"));
            }
        };
        compare("current_user", &self.current_user, &clean.current_user);
        compare("session_user", &self.session_user, &clean.session_user);
        compare(
            "the temporary schema (pg_my_temp_schema)",
            &self.temp_schema,
            &clean.temp_schema,
        );
        compare("search_path", &self.search_path, &clean.search_path);
        changed
    }
}

/// Reads a new connection's backend pid and clean state (`OPEN_SQL`).
pub async fn open(connection: &mut PgConnection) -> Result<(i32, SessionState), sqlx::Error> {
    let row = sqlx::query(OPEN_SQL).fetch_one(connection).await?;
    Ok((row.try_get(0)?, SessionState::from_row(&row, 1)?))
}

/// What the check found after a branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Session {
    /// As it was opened: the connection may serve another branch.
    Clean,
    /// Changed (what, for the log), or the check could not tell: the connection is closed.
    Changed(String),
}

/// One of a simple query's statements failed: which (counted from 0) and why. The statements
/// after it did not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementFailed {
    pub index: usize,
    pub error: DbError,
}

/// Runs `sql`, a simple-query text of `statements` statements that ends the branch's
/// transaction, with the check after it, in one round trip; answers what the check found, or
/// which of the statements failed. The check's own failure (after every statement completed) is
/// `Session::Changed`: the branch ended as asked, only the connection is in doubt.
pub async fn end_and_check(
    connection: &mut PgConnection,
    sql: &str,
    statements: usize,
    clean: &SessionState,
) -> Result<Session, StatementFailed> {
    let text = format!("{sql}; {CHECK_SQL}");
    // Counted per statement: PostgreSQL skips the rest of a simple query after an error, so the
    // number completed says which one failed.
    let mut completed = 0;
    let mut state = None;
    let mut results = connection.fetch_many(sqlx::raw_sql(sqlx::AssertSqlSafe(text)));
    let failed = loop {
        match results.try_next().await {
            Ok(Some(sqlx::Either::Left(_))) => completed += 1,
            Ok(Some(sqlx::Either::Right(row))) if completed == statements => {
                state = Some(SessionState::from_row(&row, 0).map_err(DbError::from));
            }
            // A statement of the branch's own that returns rows (none does): not the check's.
            Ok(Some(sqlx::Either::Right(_))) => {}
            Ok(None) => break None,
            Err(error) => break Some(DbError::from(error)),
        }
    };
    drop(results);
    match failed {
        Some(error) if completed < statements => Err(StatementFailed {
            index: completed,
            error,
        }),
        Some(error) => Ok(Session::Changed(format!("the session check failed: {error}"))),
        None => Ok(match state {
            Some(Ok(state)) => {
                let changed = state.differences(clean);
                if changed.is_empty() {
                    Session::Clean
                } else {
                    Session::Changed(changed.join("; "))
                }
            }
            Some(Err(error)) => Session::Changed(format!("the session check's row did not decode: {error}")),
            None if completed < statements => Session::Changed(format!(
                "PostgreSQL answered {completed} of {statements} statements and no error"
            )),
            None => Session::Changed("the session check returned no row".into()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clean() -> SessionState {
        SessionState {
            current_user: "treaty".into(),
            session_user: "treaty".into(),
            temp_schema: "0".into(),
            search_path: "\"$user\", public".into(),
        }
    }

    #[test]
    fn a_changed_role_search_path_or_temporary_schema_is_named() {
        assert!(clean().differences(&clean()).is_empty());
        let leaked = SessionState {
            current_user: "x".into(),
            search_path: "evil, public".into(),
            temp_schema: "16390".into(),
            ..clean()
        };
        let changed = leaked.differences(&clean()).join("; ");
        assert!(
            changed.contains("current_user is \"x\", was \"treaty\""),
            "{changed}"
        );
        assert!(changed.contains("search_path"), "{changed}");
        assert!(changed.contains("temporary schema"), "{changed}");
        assert!(!changed.contains("session_user"), "{changed}");
    }

    #[test]
    fn the_check_reads_what_the_open_reads_and_releases_advisory_locks() {
        assert!(OPEN_SQL.ends_with(state_columns!()));
        assert!(CHECK_SQL.starts_with(concat!("SELECT ", state_columns!(), ",")));
        assert!(CHECK_SQL.contains("pg_catalog.pg_advisory_unlock_all()"));
    }
}
