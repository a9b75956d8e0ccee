//! The life of a branch: execute, vote, phase two, and the refusals around them.

use std::time::Duration;

use tonic::Code;
use treaty_proto::{ApiError, pb};

use crate::support::{Env, SERVER, boolean, int, state, text, vote};

async fn kv(env: &Env) {
    env.db
        .sql("CREATE TABLE kv (k bigint PRIMARY KEY, v text NOT NULL)")
        .await;
}

#[tokio::test]
async fn execute_prepare_commit_makes_the_row_visible_and_keeps_a_marker() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("commit-path", |_| {}).await else {
        return;
    };
    kv(&env).await;
    let gid = env.gid(1);
    let result = env
        .execute(
            &gid,
            "INSERT INTO kv (k, v) VALUES ($1, $2)",
            vec![int(1), text("one")],
        )
        .await
        .unwrap();
    assert_eq!(result.rows_affected, 1);
    assert_eq!(state(env.status(&gid).await.state), pb::BranchState::Active);
    assert_eq!(
        env.db.count("SELECT count(*) FROM kv").await,
        0,
        "not visible before commit"
    );

    assert_eq!(vote(&env.prepare(&gid).await), pb::Vote::Yes);
    assert!(env.db.is_prepared(&gid).await);
    let status = env.status(&gid).await;
    assert_eq!(state(status.state), pb::BranchState::Prepared);
    assert_eq!(status.shard, "s0");
    assert_eq!(status.database, env.db.name);
    assert_eq!(
        vote(&env.prepare(&gid).await),
        pb::Vote::Yes,
        "a repeated Prepare is YES"
    );

    assert_eq!(env.commit(&gid).await.unwrap(), pb::BranchState::Committed);
    assert_eq!(env.db.count("SELECT count(*) FROM kv WHERE v = 'one'").await, 1);
    assert!(env.db.has_marker(&gid).await);
    assert!(!env.db.is_prepared(&gid).await);
    assert_eq!(
        env.commit(&gid).await.unwrap(),
        pb::BranchState::Committed,
        "idempotent"
    );
    assert_eq!(state(env.status(&gid).await.state), pb::BranchState::Committed);

    let err = env.abort(&gid).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("already committed, cannot abort"),
        "{}",
        err.message()
    );
    let err = env.execute(&gid, "SELECT 1", vec![]).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn prepare_then_abort_leaves_nothing_and_commit_is_refused() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("abort-path", |_| {}).await else {
        return;
    };
    kv(&env).await;
    let gid = env.gid(1);
    env.execute(&gid, "INSERT INTO kv VALUES (1, 'x')", vec![])
        .await
        .unwrap();
    assert_eq!(vote(&env.prepare(&gid).await), pb::Vote::Yes);
    assert_eq!(env.abort(&gid).await.unwrap(), pb::BranchState::Aborted);
    assert_eq!(
        env.abort(&gid).await.unwrap(),
        pb::BranchState::Aborted,
        "idempotent"
    );
    assert!(!env.db.is_prepared(&gid).await);
    assert!(!env.db.has_marker(&gid).await);
    assert_eq!(env.db.count("SELECT count(*) FROM kv").await, 0);
    assert_eq!(state(env.status(&gid).await.state), pb::BranchState::Aborted);

    // "Does not exist" with no marker row is a rollback, never a successful commit.
    let err = env.commit(&gid).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("was rolled back, cannot commit"),
        "{}",
        err.message()
    );
    let no = env.prepare(&gid).await;
    assert_eq!(vote(&no), pb::Vote::No);
}

#[tokio::test]
async fn abort_of_an_open_or_unknown_branch_refuses_late_calls() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("abort-open", |_| {}).await else {
        return;
    };
    kv(&env).await;
    let open = env.gid(1);
    env.execute(&open, "INSERT INTO kv VALUES (1, 'x')", vec![])
        .await
        .unwrap();
    assert_eq!(env.abort(&open).await.unwrap(), pb::BranchState::Aborted);
    let err = env.execute(&open, "SELECT 1", vec![]).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("rolled back"), "{}", err.message());

    // An Abort that overtakes the branch's first Execute.
    let early = env.gid(2);
    assert_eq!(env.abort(&early).await.unwrap(), pb::BranchState::Aborted);
    assert_eq!(
        env.execute(&early, "SELECT 1", vec![]).await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    assert_eq!(vote(&env.prepare(&early).await), pb::Vote::No);
    assert_eq!(env.db.count("SELECT count(*) FROM kv").await, 0);
}

#[tokio::test]
async fn a_statement_error_returns_its_sqlstate_and_ends_the_branch() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("statement-error", |_| {}).await else {
        return;
    };
    kv(&env).await;
    let gid = env.gid(1);
    env.execute(&gid, "INSERT INTO kv VALUES (1, 'x')", vec![])
        .await
        .unwrap();
    let status = env
        .execute(&gid, "INSERT INTO kv VALUES (1, 'again')", vec![])
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "constraint violations are preconditions"
    );
    match ApiError::from(status) {
        ApiError::Sql(sql) => {
            assert_eq!(sql.sqlstate, "23505");
            assert_eq!(sql.shard, "s0");
            assert!(sql.message.contains("duplicate key"), "{}", sql.message);
            assert!(
                sql.message.contains("Key (k)=(1)"),
                "detail is kept: {}",
                sql.message
            );
        }
        other => panic!("expected a SQL error, got {other:?}"),
    }
    let after = env.execute(&gid, "SELECT 1", vec![]).await.unwrap_err();
    assert_eq!(after.code(), Code::FailedPrecondition);
    assert!(
        after.message().contains("a statement failed"),
        "{}",
        after.message()
    );
    assert_eq!(vote(&env.prepare(&gid).await), pb::Vote::No);

    let other = env.gid(2);
    let status = env
        .execute(&other, "SELECT * FROM missing", vec![])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(
        status
            .metadata()
            .get("treaty-sqlstate")
            .unwrap()
            .to_str()
            .unwrap(),
        "42P01"
    );
    assert_eq!(env.db.count("SELECT count(*) FROM kv").await, 0);
}

#[tokio::test]
async fn select_only_branch_votes_read_only() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("read-only", |_| {}).await else {
        return;
    };
    kv(&env).await;
    env.db.sql("INSERT INTO kv VALUES (7, 'seven')").await;
    let gid = env.gid(1);
    let result = env.execute(&gid, "SELECT k, v FROM kv", vec![]).await.unwrap();
    assert_eq!(result.rows.len(), 1);
    assert_eq!(vote(&env.prepare(&gid).await), pb::Vote::ReadOnly);
    assert!(!env.db.is_prepared(&gid).await);
    assert!(!env.db.has_marker(&gid).await);
    assert_eq!(vote(&env.prepare(&gid).await), pb::Vote::ReadOnly, "repeat");
    assert_eq!(env.commit(&gid).await.unwrap(), pb::BranchState::Committed);
}

#[tokio::test]
async fn transaction_control_in_client_sql_is_refused_without_ending_the_branch() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("refused", |_| {}).await else {
        return;
    };
    kv(&env).await;
    let gid = env.gid(1);
    env.execute(&gid, "INSERT INTO kv VALUES (1, 'x')", vec![])
        .await
        .unwrap();
    for sql in [
        "COMMIT",
        "/* sneaky */ commit",
        "SELECT 1; PREPARE TRANSACTION 'x'",
        "SAVEPOINT a",
    ] {
        let err = env.execute(&gid, sql, vec![]).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{sql}");
        assert!(
            err.message().contains("is not allowed in a Treaty branch"),
            "{}",
            err.message()
        );
    }
    let err = env.execute(&gid, "COMMIT", vec![]).await.unwrap_err();
    assert!(
        err.message().starts_with("COMMIT is not allowed"),
        "{}",
        err.message()
    );
    assert_eq!(
        env.db.count("SELECT count(*) FROM kv").await,
        0,
        "nothing committed"
    );
    assert_eq!(
        vote(&env.prepare(&gid).await),
        pb::Vote::Yes,
        "the branch is still usable"
    );
    assert_eq!(env.commit(&gid).await.unwrap(), pb::BranchState::Committed);
    assert_eq!(env.db.count("SELECT count(*) FROM kv").await, 1);
}

#[tokio::test]
async fn one_phase_commit_needs_no_marker_and_reports_commit_errors() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("one-phase", |_| {}).await else {
        return;
    };
    kv(&env).await;
    let gid = env.gid(1);
    env.execute(&gid, "INSERT INTO kv VALUES (1, 'x')", vec![])
        .await
        .unwrap();
    assert_eq!(
        env.commit_one_phase(&gid).await.unwrap(),
        pb::BranchState::Committed
    );
    assert_eq!(
        env.commit_one_phase(&gid).await.unwrap(),
        pb::BranchState::Committed,
        "repeat"
    );
    assert_eq!(env.db.count("SELECT count(*) FROM kv").await, 1);
    assert!(!env.db.has_marker(&gid).await);

    // A deferred constraint fails at COMMIT: the transaction did not commit.
    env.db
        .sql(
            "CREATE TABLE parent (id int PRIMARY KEY); \
             CREATE TABLE child (p int REFERENCES parent DEFERRABLE INITIALLY DEFERRED)",
        )
        .await;
    let failing = env.gid(2);
    env.execute(&failing, "INSERT INTO child VALUES (42)", vec![])
        .await
        .unwrap();
    let status = env.commit_one_phase(&failing).await.unwrap_err();
    match ApiError::from(status) {
        ApiError::Sql(sql) => assert_eq!(sql.sqlstate, "23503"),
        other => panic!("expected a SQL error, got {other:?}"),
    }
    assert_eq!(env.db.count("SELECT count(*) FROM child").await, 0);

    let unknown = env.commit_one_phase(&env.gid(3)).await.unwrap_err();
    assert_eq!(unknown.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn execute_and_commit_runs_checks_and_commits_in_one_call() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("execute-and-commit", |_| {}).await else {
        return;
    };
    kv(&env).await;
    let gid = env.gid(1);
    env.execute(&gid, "INSERT INTO kv VALUES (1, 'x')", vec![])
        .await
        .unwrap();
    let done = env
        .execute_and_commit(&gid, "INSERT INTO kv VALUES (2, 'y')", Some(1))
        .await
        .unwrap();
    assert!(done.committed);
    assert_eq!(done.result.unwrap().rows_affected, 1);
    assert_eq!(env.db.count("SELECT count(*) FROM kv").await, 2);
    assert!(
        !env.db.has_marker(&gid).await,
        "a one-phase commit writes no marker"
    );
    // Asked again (a retried call), the branch is not run twice and is not open any more.
    assert_eq!(
        env.commit_one_phase(&gid).await.unwrap(),
        pb::BranchState::Committed
    );

    // expect_rows not met: rolled back, nothing committed.
    let missed = env.gid(2);
    let done = env
        .execute_and_commit(&missed, "UPDATE kv SET v = 'z' WHERE k = 42", Some(1))
        .await
        .unwrap();
    assert!(!done.committed);
    assert_eq!(done.result.unwrap().rows_affected, 0);
    let again = env.commit_one_phase(&missed).await.unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");

    // A failing statement fails the call with its SQLSTATE; nothing is committed.
    let failing = env.gid(3);
    let status = env
        .execute_and_commit(&failing, "INSERT INTO kv VALUES (1, 'dup')", None)
        .await
        .unwrap_err();
    match ApiError::from(status) {
        ApiError::Sql(sql) => assert_eq!(sql.sqlstate, "23505"),
        other => panic!("expected a SQL error, got {other:?}"),
    }
    assert_eq!(env.db.count("SELECT count(*) FROM kv").await, 2);
}

#[tokio::test]
async fn a_failed_prepare_votes_no_with_the_sqlstate() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("prepare-fails", |_| {}).await else {
        return;
    };
    env.db
        .sql(
            "CREATE TABLE parent (id int PRIMARY KEY); \
             CREATE TABLE child (p int REFERENCES parent DEFERRABLE INITIALLY DEFERRED)",
        )
        .await;
    let gid = env.gid(1);
    env.execute(&gid, "INSERT INTO child VALUES (42)", vec![])
        .await
        .unwrap();
    let no = env.prepare(&gid).await;
    assert_eq!(vote(&no), pb::Vote::No);
    assert_eq!(no.sqlstate, "23503");
    assert!(!env.db.is_prepared(&gid).await);
    assert!(!env.db.has_marker(&gid).await);
    assert_eq!(env.abort(&gid).await.unwrap(), pb::BranchState::Aborted);
    assert_eq!(
        vote(&env.prepare(&env.gid(99)).await),
        pb::Vote::No,
        "unknown branch"
    );
}

#[tokio::test]
async fn idle_branches_are_rolled_back_and_refused_afterwards() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("idle", |c| c.branch_idle_timeout_ms = 200).await else {
        return;
    };
    kv(&env).await;
    let gid = env.gid(1);
    env.execute(&gid, "INSERT INTO kv VALUES (1, 'x')", vec![])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let err = env.execute(&gid, "SELECT 1", vec![]).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("branch-idle-timeout"), "{}", err.message());
    let no = env.prepare(&gid).await;
    assert_eq!(vote(&no), pb::Vote::No);
    assert_eq!(env.db.count("SELECT count(*) FROM kv").await, 0);
    // The connection went back to the pool clean: a new branch works.
    let next = env.gid(2);
    env.execute(&next, "INSERT INTO kv VALUES (2, 'y')", vec![])
        .await
        .unwrap();
    assert_eq!(
        env.commit_one_phase(&next).await.unwrap(),
        pb::BranchState::Committed
    );
}

#[tokio::test]
async fn branch_options_reach_postgres_and_lock_timeouts_are_retryable() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("options", |_| {}).await else {
        return;
    };
    kv(&env).await;
    env.db.sql("INSERT INTO kv VALUES (1, 'x')").await;
    let holder = env.gid(1);
    env.execute(&holder, "UPDATE kv SET v = 'held' WHERE k = 1", vec![])
        .await
        .unwrap();

    let waiter = env.gid(2);
    let request = pb::BranchExecuteRequest {
        gid: waiter.clone(),
        sql: "SELECT current_setting('transaction_isolation'), current_setting('lock_timeout')".into(),
        params: vec![],
        options: Some(pb::BranchOptions {
            isolation: pb::IsolationLevel::Serializable as i32,
            lock_timeout_ms: 150,
            statement_timeout_ms: 0,
            ..Default::default()
        }),
        ..Default::default()
    };
    let result = env.client().execute(request).await.unwrap().into_inner();
    assert_eq!(result.rows[0].values[0], text("serializable"));
    assert_eq!(result.rows[0].values[1], text("150ms"));
    let status = env
        .execute(&waiter, "UPDATE kv SET v = 'waiter' WHERE k = 1", vec![])
        .await
        .unwrap_err();
    assert_eq!(
        status
            .metadata()
            .get("treaty-retryable")
            .unwrap()
            .to_str()
            .unwrap(),
        "true"
    );
    match ApiError::from(status) {
        ApiError::Sql(sql) => assert_eq!(sql.sqlstate, "55P03"),
        other => panic!("expected lock_not_available, got {other:?}"),
    }
    assert_eq!(env.abort(&holder).await.unwrap(), pb::BranchState::Aborted);
}

/// Pooled sessions start with the configured timeouts, so a branch that asks for those needs no
/// `SET LOCAL`; one that asks for others gets them for its transaction only.
#[tokio::test]
async fn a_branch_runs_with_the_timeouts_it_asked_for_whatever_its_session_started_with() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("session-defaults", |c| c.max_connections = 1).await else {
        return;
    };
    let settings = "SELECT current_setting('lock_timeout'), current_setting('statement_timeout')";
    let run = |txid: u64, lock_timeout_ms: u64, statement_timeout_ms: u64| {
        let (gid, env) = (env.gid(txid), &env);
        async move {
            let request = pb::BranchExecuteRequest {
                gid: gid.clone(),
                sql: settings.into(),
                params: vec![],
                options: Some(pb::BranchOptions {
                    isolation: pb::IsolationLevel::ReadCommitted as i32,
                    lock_timeout_ms,
                    statement_timeout_ms,
                    ..Default::default()
                }),
                ..Default::default()
            };
            let result = env.client().execute(request).await.unwrap().into_inner();
            assert_eq!(
                env.commit_one_phase(&gid).await.unwrap(),
                pb::BranchState::Committed
            );
            (result.rows[0].values[0].clone(), result.rows[0].values[1].clone())
        }
    };
    // The session's own values (10 s and 60 s in `support::config`).
    assert_eq!(run(1, 10_000, 60_000).await, (text("10s"), text("1min")));
    // Others, for this branch only; 0 lifts the statement limit.
    assert_eq!(run(2, 150, 0).await, (text("150ms"), text("0")));
    // The same (only) connection again: back to the session's values.
    assert_eq!(run(3, 10_000, 60_000).await, (text("10s"), text("1min")));
}

#[tokio::test]
async fn multi_statement_strings_run_without_parameters() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("batch", |_| {}).await else {
        return;
    };
    kv(&env).await;
    let gid = env.gid(1);
    let result = env
        .execute(
            &gid,
            "INSERT INTO kv VALUES (1, 'a'); INSERT INTO kv VALUES (2, 'b'); SELECT k, v FROM kv ORDER BY k",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(result.rows.len(), 2);
    assert_eq!(result.rows[1].values, vec![int(2), text("b")]);
    assert_eq!(result.columns[0].name, "k");
    assert_eq!(result.columns[0].type_name, "int8");
    let err = env
        .execute(&gid, "SELECT $1; SELECT 2", vec![int(1)])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        env.commit_one_phase(&gid).await.unwrap(),
        pb::BranchState::Committed
    );
    assert_eq!(env.db.count("SELECT count(*) FROM kv").await, 2);
}

#[tokio::test]
async fn session_settings_do_not_leak_into_other_branches() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("session-leak", |c| c.max_connections = 1).await else {
        return;
    };
    // With one connection, every branch reuses the previous one's unless it was closed.
    let changes = [
        ("SET search_path = nowhere", vec![]),
        ("SELECT set_config('search_path', 'nowhere', false)", vec![]),
        (
            "SELECT set_config('search_path', $1, $2)",
            vec![text("nowhere"), boolean(false)],
        ),
        // A rule on pg_settings turns this into set_config(..., false).
        (
            "UPDATE pg_settings SET setting = 'nowhere' WHERE name = 'search_path'",
            vec![],
        ),
    ];
    for (n, (sql, params)) in changes.into_iter().enumerate() {
        let gid = env.gid(2 * n as u64 + 1);
        env.execute(&gid, sql, params).await.unwrap();
        assert_eq!(
            env.commit_one_phase(&gid).await.unwrap(),
            pb::BranchState::Committed
        );
        let next = env.gid(2 * n as u64 + 2);
        let result = env.execute(&next, "SHOW search_path", vec![]).await.unwrap();
        assert_eq!(
            result.rows[0].values[0],
            text("\"$user\", public"),
            "{sql} leaked into the next branch"
        );
        assert_eq!(
            env.commit_one_phase(&next).await.unwrap(),
            pb::BranchState::Committed
        );
    }
}

async fn execute_and_prepare(
    env: &Env,
    gid: &str,
    sql: &str,
) -> Result<pb::ExecuteAndPrepareResponse, tonic::Status> {
    env.client()
        .execute_and_prepare(pb::BranchExecuteRequest {
            gid: gid.into(),
            sql: sql.into(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

/// `ExecuteAndPrepare` sends the vote (marker row, PREPARE TRANSACTION) in the statement's round
/// trip: a statement that succeeds leaves the branch prepared with its write; one PostgreSQL
/// refuses, or one whose rows cannot be read after PostgreSQL ran it and prepared the branch,
/// leaves nothing prepared and no write, on an opening branch and on one already open; and the
/// connection serves the next branch.
#[tokio::test]
async fn the_vote_sent_with_the_last_statement_prepares_only_after_a_statement_that_succeeded() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("vote-with-statement", |c| c.max_connections = 1).await else {
        return;
    };
    kv(&env).await;
    let ok = env.gid(1);
    let next = env.gid(6);
    // Undecided while prepared: reconciliation leaves them alone.
    for gid in [&ok, &next] {
        env.coordinator.decide(gid, pb::Decision::Pending, true);
    }
    let answer = execute_and_prepare(&env, &ok, "INSERT INTO kv VALUES (1, 'a')")
        .await
        .unwrap();
    assert_eq!(answer.result.map(|r| r.rows_affected), Some(1));
    assert_eq!(vote(answer.vote.as_ref().unwrap()), pb::Vote::Yes);
    assert!(env.db.is_prepared(&ok).await, "{:?}", env.db.prepared().await);

    // Refused by PostgreSQL: the PREPARE behind it does not prepare.
    let refused = env.gid(2);
    execute_and_prepare(&env, &refused, "INSERT INTO kv VALUES (1/0, 'b')")
        .await
        .unwrap_err();
    // Ran and prepared, then unreadable here (Treaty returns no interval): rolled back.
    let unreadable = env.gid(3);
    let error = execute_and_prepare(
        &env,
        &unreadable,
        "INSERT INTO kv VALUES (3, 'c') RETURNING interval '1 day'",
    )
    .await
    .unwrap_err();
    assert!(error.message().contains("interval"), "{error:?}");
    // The same on a branch already open.
    let open = env.gid(4);
    env.execute(&open, "INSERT INTO kv VALUES (4, 'd')", vec![])
        .await
        .unwrap();
    execute_and_prepare(
        &env,
        &open,
        "INSERT INTO kv VALUES (5, 'e') RETURNING interval '1 day'",
    )
    .await
    .unwrap_err();
    let prepared = env.db.prepared().await;
    assert_eq!(prepared.len(), 1, "only the first branch: {prepared:?}");
    assert!(env.db.is_prepared(&ok).await, "{prepared:?}");

    assert_eq!(env.commit(&ok).await.unwrap(), pb::BranchState::Committed);
    assert_eq!(env.db.count("SELECT count(*) FROM kv").await, 1);
    assert!(env.db.prepared().await.is_empty());
    // The one connection is still good for the next branch.
    let answer = execute_and_prepare(&env, &next, "INSERT INTO kv VALUES (6, 'f')")
        .await
        .unwrap();
    assert_eq!(vote(answer.vote.as_ref().unwrap()), pb::Vote::Yes);
    assert_eq!(env.commit(&next).await.unwrap(), pb::BranchState::Committed);
    assert_eq!(env.db.count("SELECT count(*) FROM kv").await, 2);
}

/// `ExecuteAndCommit` without `expect_rows` sends the COMMIT in the statement's round trip: a
/// statement that succeeds commits; one PostgreSQL refuses, or one whose COMMIT fails (a deferred
/// constraint), commits nothing and fails the call with its SQLSTATE; a statement that returns
/// rows, which might not be readable here after PostgreSQL committed, gets its COMMIT only after
/// its rows were read, so an unreadable one commits nothing; and the one connection serves the
/// next branch after each.
#[tokio::test]
async fn the_commit_sent_with_the_last_statement_commits_only_after_a_statement_that_succeeded() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("commit-with-statement", |c| c.max_connections = 1).await else {
        return;
    };
    kv(&env).await;
    env.db
        .sql(
            "CREATE TABLE parent (id int PRIMARY KEY); \
             CREATE TABLE child (p int REFERENCES parent DEFERRABLE INITIALLY DEFERRED)",
        )
        .await;
    let sqlstate = |status: tonic::Status| match ApiError::from(status) {
        ApiError::Sql(sql) => sql.sqlstate,
        other => panic!("expected a SQL error, got {other:?}"),
    };

    let ok = env.gid(1);
    let done = env
        .execute_and_commit(&ok, "INSERT INTO kv VALUES (1, 'a')", None)
        .await
        .unwrap();
    assert!(done.committed);
    assert_eq!(done.result.unwrap().rows_affected, 1);
    assert_eq!(env.db.count("SELECT count(*) FROM kv").await, 1);
    assert_eq!(
        env.commit_one_phase(&ok).await.unwrap(),
        pb::BranchState::Committed,
        "a repeat finds it committed"
    );

    // Refused by PostgreSQL: the COMMIT behind it rolls back.
    let refused = env.gid(2);
    let status = env
        .execute_and_commit(&refused, "INSERT INTO kv VALUES (1, 'dup')", None)
        .await
        .unwrap_err();
    assert_eq!(sqlstate(status), "23505");
    let again = env.commit_one_phase(&refused).await.unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition, "{again:?}");

    // The statement runs, its COMMIT fails.
    let deferred = env.gid(3);
    let status = env
        .execute_and_commit(&deferred, "INSERT INTO child VALUES (42)", None)
        .await
        .unwrap_err();
    assert_eq!(sqlstate(status), "23503");
    assert_eq!(env.db.count("SELECT count(*) FROM child").await, 0);

    // Ran, then unreadable here (Treaty returns no interval): not committed.
    let unreadable = env.gid(4);
    let error = env
        .execute_and_commit(
            &unreadable,
            "INSERT INTO kv VALUES (4, 'd') RETURNING interval '1 day'",
            None,
        )
        .await
        .unwrap_err();
    assert!(error.message().contains("interval"), "{error:?}");
    // Rows that can be read come back, and commit.
    let returning = env.gid(5);
    let done = env
        .execute_and_commit(&returning, "INSERT INTO kv VALUES (5, 'e') RETURNING k", None)
        .await
        .unwrap();
    assert!(done.committed);
    assert_eq!(done.result.unwrap().rows.len(), 1);

    // On a branch already open, and on the one connection all of the above used.
    let open = env.gid(6);
    env.execute(&open, "INSERT INTO kv VALUES (6, 'f')", vec![])
        .await
        .unwrap();
    let done = env
        .execute_and_commit(&open, "INSERT INTO kv VALUES (7, 'g')", None)
        .await
        .unwrap();
    assert!(done.committed);
    assert_eq!(
        env.db.count("SELECT count(*) FROM kv").await,
        4,
        "1, 5, 6 and 7 committed; 4 did not"
    );
    assert_eq!(env.db.count("SELECT count(*) FROM kv WHERE k = 4").await, 0);
    assert!(env.db.prepared().await.is_empty());
}

/// The statements the participant keeps prepared on a pooled session can be run by any SQL on it
/// (`EXECUTE <name>`, which the SQL guard does not look into): only a branch's opening ones are
/// named (`BEGIN ...`), never one that ends a transaction, so no client statement can commit its
/// branch before the vote that way.
#[tokio::test]
async fn no_statement_that_ends_a_transaction_is_kept_prepared_on_a_pooled_session() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("named-statements", |_| {}).await else {
        return;
    };
    kv(&env).await;
    // One-phase commits (BEGIN, the statement and COMMIT as one pipeline) and a prepared and
    // committed branch, one at a time: the pool hands back the same session each time.
    for k in 1..=3 {
        let done = env
            .execute_and_commit(&env.gid(k), &format!("INSERT INTO kv VALUES ({k}, 'x')"), None)
            .await
            .unwrap();
        assert!(done.committed);
    }
    let two_phase = env.gid(4);
    env.execute(&two_phase, "INSERT INTO kv VALUES (4, 'x')", vec![])
        .await
        .unwrap();
    assert_eq!(vote(&env.prepare(&two_phase).await), pb::Vote::Yes);
    assert_eq!(env.commit(&two_phase).await.unwrap(), pb::BranchState::Committed);

    let reader = env.gid(5);
    let result = env
        .execute(
            &reader,
            "SELECT statement FROM pg_prepared_statements ORDER BY statement",
            vec![],
        )
        .await
        .unwrap();
    let statements: Vec<String> = result
        .rows
        .iter()
        .filter_map(
            |row| match row.values.first().and_then(|value| value.kind.clone()) {
                Some(pb::value::Kind::Text(text)) => Some(text),
                _ => None,
            },
        )
        .collect();
    assert!(
        statements.iter().any(|statement| statement.starts_with("BEGIN")),
        "the session the branches used, with its prepared BEGIN: {statements:?}"
    );
    for statement in &statements {
        let words: Vec<String> = statement
            .split_whitespace()
            .take(2)
            .map(str::to_ascii_uppercase)
            .collect();
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        assert!(
            !matches!(
                words.as_slice(),
                ["COMMIT" | "ROLLBACK" | "END" | "ABORT", ..] | ["PREPARE", "TRANSACTION"]
            ),
            "{statement:?} is prepared on a session clients share: `EXECUTE` of it would end a branch"
        );
    }
    env.abort(&reader).await.unwrap();
}
