//! The guard's cases: what is refused, what changes session state, and what passes.

use super::*;

fn refused(sql: &str) -> String {
    match check(sql, false) {
        Err(refusal) => refusal.statement,
        Ok(analysis) => panic!("{sql:?} was accepted: {analysis:?}"),
    }
}

fn accepted(sql: &str) -> Analysis {
    check(sql, false).unwrap_or_else(|e| panic!("{sql:?} was refused: {e}"))
}

/// Every one of `cases` is accepted, and reported as changing the session or not.
fn assert_changes_session(changes: bool, cases: &[&str]) {
    for sql in cases {
        assert_eq!(accepted(sql).changes_session, changes, "{sql}");
    }
}

#[test]
fn refuses_statements_that_end_the_branch() {
    assert_eq!(refused("COMMIT"), "COMMIT");
    assert_eq!(refused("commit;"), "COMMIT");
    assert_eq!(refused("  End"), "END");
    assert_eq!(refused("ROLLBACK"), "ROLLBACK");
    assert_eq!(refused("abort work"), "ABORT");
    assert_eq!(refused("PREPARE TRANSACTION 'x'"), "PREPARE TRANSACTION");
    assert_eq!(refused("COMMIT PREPARED 'treaty:c:1'"), "COMMIT PREPARED");
    assert_eq!(refused("ROLLBACK PREPARED 'treaty:c:1'"), "ROLLBACK PREPARED");
    assert_eq!(refused("COMMIT AND CHAIN"), "COMMIT");
}

#[test]
fn single_writes_are_recognised() {
    assert!(accepted("UPDATE t SET a = 1").single_write);
    assert!(accepted("/* c */ insert into t values (1);").single_write);
    assert!(accepted("DELETE FROM t").single_write);
    assert!(!accepted("SELECT * FROM t").single_write);
    assert!(!accepted("WITH x AS (DELETE FROM t RETURNING 1) SELECT 1").single_write);
    assert!(!accepted("UPDATE t SET a = 1; UPDATE t SET a = 2").single_write);
}

#[test]
fn refuses_nested_transactions_and_savepoints() {
    assert_eq!(refused("BEGIN"), "BEGIN");
    assert_eq!(refused("begin isolation level serializable"), "BEGIN");
    assert_eq!(refused("START TRANSACTION"), "START TRANSACTION");
    assert_eq!(refused("SAVEPOINT a"), "SAVEPOINT");
    assert_eq!(refused("RELEASE SAVEPOINT a"), "RELEASE");
    assert_eq!(refused("ROLLBACK TO SAVEPOINT a"), "ROLLBACK TO");
}

#[test]
fn transaction_settings_only_as_the_first_statement_of_the_branch() {
    let sql = "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE";
    assert!(check(sql, true).is_ok());
    assert_eq!(refused(sql), "SET TRANSACTION");
    let err = check("SELECT 1; SET TRANSACTION READ ONLY", true).unwrap_err();
    assert_eq!(err.statement, "SET TRANSACTION");
    assert!(err.to_string().contains("statement 2 of 2"), "{err}");
    assert!(check("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", true).is_err());
}

#[test]
fn refused_message_names_the_statement_and_says_what_to_do() {
    let err = check("commit", false).unwrap_err().to_string();
    assert!(
        err.starts_with("COMMIT is not allowed in a Treaty branch"),
        "{err}"
    );
    assert!(err.contains("Commit or Rollback call"), "{err}");
}

#[test]
fn ordinary_statements_pass() {
    for sql in [
        "SELECT 1",
        "INSERT INTO kv VALUES ($1, $2)",
        "UPDATE t SET committed = true WHERE id = 1",
        "WITH x AS (SELECT 1) SELECT * FROM x",
        "select * from \"COMMIT\"",
        "(SELECT 1)",
        "PREPARE q AS SELECT 1",
        "SET LOCAL lock_timeout = 100",
        "SET CONSTRAINTS ALL DEFERRED",
        "LOCK TABLE t IN SHARE MODE",
        "DO $$ BEGIN PERFORM 1; END $$",
        "SELECT $1::int, $2",
        "end_date_column_is_not_end",
    ] {
        assert_eq!(accepted(sql).statements, 1, "{sql}");
    }
}

#[test]
fn keywords_inside_strings_comments_and_quotes_are_ignored() {
    for sql in [
        "SELECT 'a;COMMIT'",
        "SELECT 'it''s; COMMIT'",
        "SELECT E'it\\'s; COMMIT'",
        "SELECT \"a;\"\"COMMIT\" FROM t",
        "SELECT 1 -- ; COMMIT\n",
        "SELECT /* ; COMMIT /* nested ; */ still ; */ 1",
        "SELECT $$ ; COMMIT $$",
        "SELECT $tag$ ; $$ ; COMMIT $tag$",
        "SELECT $a$x$b$ ; COMMIT $b$y$a$",
        "SELECT U&'d\\0061t; COMMIT'",
    ] {
        assert_eq!(accepted(sql).statements, 1, "{sql}");
    }
}

#[test]
fn leading_comments_are_skipped() {
    assert_eq!(refused("-- hello\n  /* c */ COMMIT"), "COMMIT");
    assert_eq!(refused("/* a /* nested */ b */commit"), "COMMIT");
    assert_eq!(refused("ROLLBACK/**/PREPARED 'x'"), "ROLLBACK PREPARED");
}

#[test]
fn every_statement_of_a_batch_is_checked() {
    assert_eq!(refused("INSERT INTO t VALUES (1); COMMIT"), "COMMIT");
    assert_eq!(refused("SELECT ';'; SELECT $$;$$;\nBEGIN"), "BEGIN");
    assert_eq!(accepted("SELECT 1; SELECT 2;").statements, 2);
    assert_eq!(accepted(";; SELECT 1 ;; -- done").statements, 1);
    assert_eq!(accepted("/* only */ -- comments\n").statements, 0);
}

#[test]
fn dollar_signs_that_are_not_quotes() {
    // `$1` is a parameter, and `a$b$` is one identifier: neither opens a dollar quote.
    assert_eq!(refused("SELECT $1; COMMIT"), "COMMIT");
    assert_eq!(refused("SELECT a$b$ FROM t; COMMIT"), "COMMIT");
    // An unterminated dollar quote swallows the rest; PostgreSQL reports the syntax error.
    assert_eq!(accepted("SELECT $x$ ; COMMIT").statements, 1);
}

#[test]
fn atomic_function_bodies_are_one_statement() {
    let sql = "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC \
               SELECT CASE WHEN true THEN 1 END; SELECT 2; END; SELECT 3";
    assert_eq!(accepted(sql).statements, 2);
    assert_eq!(refused(&format!("{sql}; COMMIT")), "COMMIT");
}

#[test]
fn session_changes_are_reported() {
    assert!(accepted("SET search_path = a").changes_session);
    assert!(accepted("set session timezone = 'UTC'").changes_session);
    assert!(accepted("RESET ALL").changes_session);
    assert!(!accepted("SET LOCAL search_path = a").changes_session);
    assert!(!accepted("SELECT 'SET x = 1'").changes_session);
    assert!(accepted("DO $$ BEGIN EXECUTE 'DEALLOCATE ALL'; END $$").changes_session);
    assert!(accepted("PREPARE q (int) AS SELECT $1").changes_session);
    assert!(accepted("CREATE TEMP TABLE t (k int)").changes_session);
    assert!(accepted("create local temporary table t (k int)").changes_session);
    assert!(!accepted("CREATE TABLE t (k int)").changes_session);
}

#[test]
fn set_config_changes_the_session_unless_it_is_literally_local() {
    assert_changes_session(
        true,
        &[
            "SELECT set_config('app.user', 'alice', false)",
            "SELECT pg_catalog.SET_CONFIG('app.user', 'alice', FALSE)",
            "SELECT set_config('app.user', $1, $2)",
            "SELECT set_config('app.user', 'alice', (true))",
            "SELECT set_config('app.user', 'alice', true OR x)",
            "SELECT set_config('app.user', 'alice')",
            "SELECT 1; SELECT set_config('app.user', lower('A'), false) FROM t",
            "SELECT set_config('app.user', 'alice', true), set_config('b', '1', false)",
            "SELECT set_config('app.user', 'alice', true",
        ],
    );
    assert_changes_session(
        false,
        &[
            "SELECT set_config('app.user', 'alice', true)",
            "select set_config('app.user', concat('a', 'b,c', f(1, 2)), TRUE) from t",
            "SELECT set_config('app.user', $1, true); UPDATE t SET v = 1",
            "SELECT 'set_config(1, 2, false)', \"set_config\" FROM t",
            "SELECT set_config_value FROM t",
            "UPDATE t SET set_config = 1.5e3",
            "SELECT set_config('app.user', $1::text, true)",
        ],
    );
}

#[test]
fn session_state_changed_past_the_leading_keywords_is_reported() {
    assert_changes_session(
        true,
        &[
            "SELECT set_config('app.x', set_config('search_path', 'evil', false), true)",
            "SELECT \"set_config\"('search_path', 'x', false)",
            "SELECT pg_catalog.\"set_config\"('search_path', 'x', false)",
            "UPDATE pg_settings SET setting = 'nowhere' WHERE name = 'search_path'",
            "WITH s AS (UPDATE pg_catalog.pg_settings SET setting = 'x' RETURNING 1) SELECT 1",
            "SELECT pg_advisory_lock(1)",
            "SELECT pg_try_advisory_lock_shared(1, 2)",
            "CREATE TABLE pg_temp.t (k int)",
        ],
    );
    assert_changes_session(
        false,
        &[
            "SELECT \"SET_CONFIG\"('search_path', 'x', false)",
            "SELECT name, setting FROM pg_settings",
            "SELECT pg_advisory_xact_lock(1)",
            "CREATE TABLE pg_temp_schema.t (k int)",
        ],
    );
}

#[test]
fn strings_are_read_both_ways_when_they_hold_a_backslash() {
    // With standard_conforming_strings off, '\'' is a string holding a quote, and what
    // follows is SQL again.
    assert!(accepted("SELECT '\\'', set_config($1, $2, false), '\\''").changes_session);
    assert_eq!(refused("SELECT 1; SELECT '\\''; COMMIT; SELECT '\\''"), "COMMIT");
    // Both readings agree on an ordinary path.
    let path = accepted("SELECT 'C:\\temp' FROM t");
    assert_eq!(path.statements, 1);
    assert!(!path.changes_session);
}

#[test]
fn a_letter_after_a_number_starts_a_word() {
    // PostgreSQL 14 reads `2END` as `2 END`, which closes the atomic body.
    let sql = "SELECT 1; CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC \
               SELECT CASE WHEN true THEN 1 ELSE 2END; END; COMMIT; SELECT 1";
    assert_eq!(refused(sql), "COMMIT");
}

#[test]
fn protocol_and_cache_breakers_are_refused() {
    assert_eq!(refused("COPY t FROM STDIN"), "COPY");
    assert_eq!(refused("LISTEN chan"), "LISTEN");
    assert_eq!(refused("DEALLOCATE ALL"), "DEALLOCATE");
    assert_eq!(refused("DISCARD ALL"), "DISCARD");
}

#[test]
fn non_ascii_text_is_handled() {
    assert_eq!(accepted("SELECT 'héllo; wörld', ünïcode FROM t").statements, 1);
    assert_eq!(refused("SELECT 'é'; COMMIT"), "COMMIT");
}

#[test]
fn a_vertical_tab_is_whitespace() {
    // Found by the property tests: PostgreSQL (since 16) reads `\v` as whitespace; the guard read
    // it as punctuation, so the keyword after it did not lead its statement and was let through.
    assert_eq!(refused("\u{b}COMMIT"), "COMMIT");
    assert_eq!(refused("SELECT 1;\u{b}end--x\n"), "END");
    assert_eq!(
        refused("SET\u{b}SESSION\u{b}CHARACTERISTICS AS TRANSACTION READ ONLY"),
        "SET SESSION CHARACTERISTICS"
    );
}

#[test]
fn statement_texts_split_where_postgres_does() {
    assert_eq!(
        statement_texts("INSERT INTO t VALUES (1, ';'); ; -- x;\n SELECT $$a;b$$;"),
        vec!["INSERT INTO t VALUES (1, ';')", " -- x;\n SELECT $$a;b$$"]
    );
    let body = "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END";
    assert_eq!(
        statement_texts(&format!("{body}; SELECT 2")),
        vec![body, " SELECT 2"]
    );
    assert_eq!(statement_texts("SELECT 1"), vec!["SELECT 1"]);
    assert!(statement_texts(" ; -- only a comment").is_empty());
}
