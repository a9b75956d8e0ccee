//! Database roles and clean pooled connections: a branch opened with a `database_role` runs the
//! client's statements under it (GRANTs decide), Treaty's own rows and PREPARE under the
//! participant's role; and whatever a branch does to its session (a role or `search_path` set
//! inside a function body, a session-level advisory lock) never reaches a branch under another
//! role on the same pooled connection.
//!
//! The participant logs in as a role of its own here, set up as the README's "Database roles"
//! says: not a superuser, NOINHERIT, owner of its database and Treaty's tables, CREATE on schema
//! `public` (where the migrations' own table is; a NOINHERIT owner does not inherit it through
//! `pg_database_owner`), and a member of each client role.
//! Roles belong to the whole server, which the tests share, so their names carry the test's.

use tonic::Code;
use treaty_proto::{ApiError, pb};

use crate::support::{Env, SERVER, text, vote};

/// The roles of one test: the participant's login role and two client roles.
struct Roles {
    participant: String,
    /// May read `kv`, nothing else.
    reader: String,
    /// May read and insert into `kv`.
    writer: String,
}

/// A participant with a login role of its own and the clients' roles, on one pooled connection
/// (so that "the next branch" is certainly on the connection the last one used, unless that one
/// was closed), with table `kv` (a deferred trigger writes who inserted into `audit`) and table
/// `notes` (no trigger).
async fn start(name: &str) -> (Env, Roles) {
    let mut env = Env::start(name, |c| c.max_connections = 1).await.unwrap();
    // Answered once the participant serves, which is after it created Treaty's tables.
    execute(&env, &env.gid(999), "SELECT 1", None).await.unwrap();
    env.commit_one_phase(&env.gid(999)).await.unwrap();
    let tag = name.replace('-', "_");
    let roles = Roles {
        participant: format!("treaty_participant_{tag}"),
        reader: format!("app_reader_{tag}"),
        writer: format!("app_writer_{tag}"),
    };
    let (participant, reader, writer) = (&roles.participant, &roles.reader, &roles.writer);
    for (role, attributes) in [
        (participant, "LOGIN NOINHERIT"),
        (reader, "NOLOGIN"),
        (writer, "NOLOGIN"),
    ] {
        env.db
            .sql(&format!(
                "DO $$ BEGIN CREATE ROLE {role} {attributes}; \
                 EXCEPTION WHEN duplicate_object THEN NULL; END $$"
            ))
            .await;
    }
    let database = &env.db.name;
    env.db
        .sql(&format!(
            "GRANT {reader}, {writer} TO {participant}; \
             ALTER DATABASE {database} OWNER TO {participant}; \
             ALTER SCHEMA treaty OWNER TO {participant}; \
             ALTER TABLE treaty.branches OWNER TO {participant}; \
             ALTER TABLE treaty.decisions OWNER TO {participant}; \
             ALTER TABLE treaty.three_phase OWNER TO {participant}; \
             ALTER TABLE public._sqlx_migrations OWNER TO {participant}; \
             GRANT CREATE ON SCHEMA public TO {participant}; \
             CREATE TABLE kv (k bigint PRIMARY KEY, v text NOT NULL); \
             GRANT SELECT ON kv TO {reader}, {writer}; GRANT INSERT ON kv TO {writer}; \
             CREATE TABLE audit (k bigint, by_role text); GRANT INSERT ON audit TO {writer}; \
             CREATE TABLE notes (k bigint); GRANT INSERT ON notes TO {writer}; \
             CREATE FUNCTION audit_kv() RETURNS trigger LANGUAGE plpgsql AS \
               $$ BEGIN INSERT INTO audit VALUES (NEW.k, current_user); RETURN NULL; END $$; \
             CREATE CONSTRAINT TRIGGER audit_kv AFTER INSERT ON kv \
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION audit_kv()"
        ))
        .await;
    let mut config = env.config();
    config.max_connections = 1;
    config.database_url = env
        .db
        .url
        .replacen("postgres://postgres@", &format!("postgres://{participant}@"), 1)
        .into();
    env.restart_participant(config).await;
    // Nothing below runs as a superuser, or it would prove nothing about roles.
    let row = execute(
        &env,
        &env.gid(1_000),
        "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
        None,
    )
    .await
    .unwrap();
    assert_eq!(row.rows[0].values[0], crate::support::boolean(false));
    env.commit_one_phase(&env.gid(1_000)).await.unwrap();
    (env, roles)
}

/// One statement on branch `gid`, opened (if this opens it) under `role`.
async fn execute(
    env: &Env,
    gid: &str,
    sql: &str,
    role: Option<&str>,
) -> Result<pb::ExecuteResult, tonic::Status> {
    env.client()
        .execute(pb::BranchExecuteRequest {
            gid: gid.into(),
            sql: sql.into(),
            options: Some(pb::BranchOptions {
                database_role: role.unwrap_or_default().into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

/// `current_user` and the backend's pid, in a branch of its own under `role`, committed.
async fn whoami(env: &Env, txid: u64, role: Option<&str>) -> (String, i64) {
    let gid = env.gid(txid);
    let result = execute(
        env,
        &gid,
        "SELECT current_user::text, pg_backend_pid()::bigint",
        role,
    )
    .await
    .unwrap();
    env.commit_one_phase(&gid).await.unwrap();
    let values = &result.rows[0].values;
    let Some(pb::value::Kind::Int64(pid)) = values[1].kind else {
        panic!("pid is not an integer: {values:?}");
    };
    let Some(pb::value::Kind::Text(user)) = values[0].kind.clone() else {
        panic!("current_user is not text: {values:?}");
    };
    (user, pid)
}

#[tokio::test]
async fn client_statements_run_under_the_client_role_and_treatys_rows_under_the_participants() {
    let _shared = SERVER.read().await;
    let (env, roles) = start("roles-split").await;
    let (me, first_pid) = whoami(&env, 1, None).await;
    assert_eq!(me, roles.participant);
    assert_eq!(whoami(&env, 2, Some(&roles.reader)).await.0, roles.reader);

    // Refused by the GRANTs: permission denied (42501), and the branch is over.
    let gid = env.gid(3);
    let refused = execute(&env, &gid, "INSERT INTO kv VALUES (1, 'no')", Some(&roles.reader))
        .await
        .unwrap_err();
    match ApiError::from(refused) {
        ApiError::Sql(sql) => assert_eq!(sql.sqlstate, "42501", "{}", sql.message),
        other => panic!("expected permission denied, got {other:?}"),
    }
    assert_eq!(vote(&env.prepare(&gid).await), pb::Vote::No);
    // The next branch on that same connection is the participant's own again.
    assert_eq!(
        whoami(&env, 4, None).await,
        (roles.participant.clone(), first_pid)
    );

    // A writer prepares: its marker row is written (the writer may not touch treaty.branches) and
    // PREPARE TRANSACTION runs under the participant's role, which can then finish it; the
    // deferred trigger fired under the writer's role, as it would have for the client itself.
    let gid = env.gid(5);
    execute(&env, &gid, "INSERT INTO kv VALUES (5, 'w')", Some(&roles.writer))
        .await
        .unwrap();
    assert_eq!(vote(&env.prepare(&gid).await), pb::Vote::Yes);
    let owner: String = sqlx::query_scalar("SELECT owner::text FROM pg_prepared_xacts WHERE gid LIKE $1")
        .bind(format!("{gid}:%"))
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(owner, roles.participant);
    assert_eq!(env.commit(&gid).await.unwrap(), pb::BranchState::Committed);
    assert!(env.db.has_marker(&gid).await);
    let by: String = sqlx::query_scalar("SELECT by_role FROM audit WHERE k = 5")
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(
        by, roles.writer,
        "the deferred trigger ran under the client's role"
    );

    // A decision branch: the commit row is the participant's, inserted with its COMMIT.
    let gid = format!("{}@s0", env.gid(6));
    execute(&env, &gid, "INSERT INTO kv VALUES (6, 'd')", Some(&roles.writer))
        .await
        .unwrap();
    let answer = env
        .client()
        .commit_decision(pb::CommitDecisionRequest {
            gid: gid.clone(),
            participants: vec!["s1".into()],
            standalone: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(answer.committed, "{answer:?}");
    assert_eq!(
        env.db
            .count(&format!(
                "SELECT count(*) FROM treaty.decisions WHERE gid = '{gid}'"
            ))
            .await,
        1
    );
    // A branch of a GID with a decision shard prepares without a marker, still as the participant.
    let gid = format!("{}@s9", env.gid(7));
    execute(&env, &gid, "INSERT INTO kv VALUES (7, 'p')", Some(&roles.writer))
        .await
        .unwrap();
    assert_eq!(vote(&env.prepare(&gid).await), pb::Vote::Yes);
    assert_eq!(env.commit(&gid).await.unwrap(), pb::BranchState::Committed);
    assert_eq!(env.db.count("SELECT count(*) FROM kv").await, 3);
    // Every branch ended clean: still the one connection, as the participant.
    assert_eq!(
        whoami(&env, 8, None).await,
        (roles.participant.clone(), first_pid)
    );
}

#[tokio::test]
async fn a_role_the_participant_cannot_set_is_refused_with_what_to_grant() {
    let _shared = SERVER.read().await;
    let (env, roles) = start("roles-missing").await;
    let (_, pid) = whoami(&env, 10, None).await;
    let refused = execute(&env, &env.gid(1), "SELECT 1", Some("no_such_role_here"))
        .await
        .unwrap_err();
    assert!(refused.message().contains("GRANT"), "{}", refused.message());
    // A role it is not a member of.
    env.db
        .sql(
            "DO $$ BEGIN CREATE ROLE app_stranger NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
        )
        .await;
    let refused = execute(&env, &env.gid(2), "SELECT 1", Some("app_stranger"))
        .await
        .unwrap_err();
    assert!(refused.message().contains("member"), "{}", refused.message());
    let invalid = execute(&env, &env.gid(3), "SELECT 1", Some("x\"; RESET ROLE; --"))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    assert!(
        invalid.message().contains("database_role"),
        "{}",
        invalid.message()
    );
    // The refusals rolled back on the connection they had, which serves the next branch.
    assert_eq!(whoami(&env, 11, None).await, (roles.participant.clone(), pid));
}

/// A function `name()` that moves its session to `role` for the rest of the session, where the
/// SQL guard cannot see it.
fn becoming(name: &str, role: &str) -> String {
    format!(
        "CREATE FUNCTION {name}() RETURNS text LANGUAGE sql AS $$ SELECT set_config('role', '{role}', false) $$"
    )
}

#[tokio::test]
async fn a_role_or_setting_set_inside_a_function_body_closes_the_connection() {
    let _shared = SERVER.read().await;
    let (env, roles) = start("roles-leak").await;
    let (reader, writer) = (&roles.reader, &roles.writer);
    env.db
        .sql(&format!(
            "{}; {}; \
             CREATE FUNCTION move_search_path() RETURNS text LANGUAGE sql \
               AS $$ SELECT set_config('search_path', 'nowhere', false) $$; \
             CREATE FUNCTION read_write_from_now_on() RETURNS text LANGUAGE sql \
               AS $$ SELECT set_config('default_transaction_read_only', 'off', false) $$",
            becoming("become_reader", reader),
            becoming("become_writer", writer),
        ))
        .await;
    // Through each way a branch ends: one-phase COMMIT, PREPARE (a client that leaves the
    // session under its own role), ROLLBACK (PostgreSQL itself undoes a set_config of a
    // transaction that rolls back; the check runs all the same).
    let cases = [
        ("become_reader", "commit"),
        ("become_writer", "prepare"),
        ("move_search_path", "commit"),
        // The pool's sessions start read-only (a statement that runs outside its branch's
        // transaction must not write); a session left read-write is closed.
        ("read_write_from_now_on", "commit"),
        ("become_reader", "rollback"),
    ];
    for (n, (function, end)) in cases.into_iter().enumerate() {
        let txid = 10 * (n as u64 + 1);
        let (_, before) = whoami(&env, txid, None).await;
        let gid = env.gid(txid + 1);
        execute(
            &env,
            &gid,
            &format!("INSERT INTO notes VALUES ({txid})"),
            Some(writer),
        )
        .await
        .unwrap();
        // The guard cannot see inside the function's body.
        execute(&env, &gid, &format!("SELECT {function}()"), None)
            .await
            .unwrap();
        match end {
            "commit" => {
                env.commit_one_phase(&gid).await.unwrap();
            }
            "prepare" => {
                assert_eq!(vote(&env.prepare(&gid).await), pb::Vote::Yes);
                assert_eq!(env.commit(&gid).await.unwrap(), pb::BranchState::Committed);
            }
            _ => {
                execute(&env, &gid, "SELECT 1/0", None).await.unwrap_err();
            }
        }
        let (user, after) = whoami(&env, txid + 2, None).await;
        assert_eq!(
            &user, &roles.participant,
            "{function} then {end}: the next branch's role"
        );
        let gid = env.gid(txid + 3);
        let search_path = execute(&env, &gid, "SHOW search_path", None).await.unwrap();
        env.commit_one_phase(&gid).await.unwrap();
        assert_eq!(
            search_path.rows[0].values[0],
            text("\"$user\", public"),
            "{function} then {end}"
        );
        if end == "rollback" {
            assert_eq!(
                after, before,
                "{function} then {end}: nothing changed, the connection stays"
            );
        } else {
            assert_ne!(after, before, "{function} then {end}: the connection was closed");
        }
        // A mapped client after it runs as its own role.
        assert_eq!(&whoami(&env, txid + 4, Some(writer)).await.0, writer);
    }
}

/// Session-level advisory locks this test's participant holds on `key`, over all its backends.
async fn advisory_locks(env: &Env, key: i64) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
         WHERE l.locktype = 'advisory' AND l.objid = $1 AND a.datname = current_database()",
    )
    .bind(key)
    .fetch_one(&env.db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_session_advisory_lock_taken_in_a_branch_is_not_held_after_it() {
    let _shared = SERVER.read().await;
    let (env, roles) = start("roles-advisory").await;
    env.db
        .sql(
            "CREATE FUNCTION hidden_lock() RETURNS int LANGUAGE plpgsql \
               AS $$ BEGIN PERFORM pg_advisory_lock(43); RETURN 1; END $$",
        )
        .await;
    // Seen by the guard (and failing on its void result, as an outside client found): the
    // connection is closed, which releases the lock.
    let gid = env.gid(1);
    let _ = execute(&env, &gid, "SELECT pg_advisory_lock(42)", None).await;
    let _ = env.commit_one_phase(&gid).await;
    assert_eq!(advisory_locks(&env, 42).await, 0);
    let (user, pid) = whoami(&env, 2, None).await;
    assert_eq!(user, roles.participant);

    // Hidden in a function body, which the guard cannot see: released by the check before the
    // connection serves another role (here the participant's own), whichever way the branch
    // ended; the connection itself is clean and stays. (Within one role, the idle check releases
    // it: `pool::a_session_lock_left_on_an_idle_connection_is_released_by_the_idle_check`.)
    for (txid, end) in [(3, "commit"), (5, "prepare"), (7, "rollback")] {
        let gid = env.gid(txid);
        let _ = execute(&env, &gid, "SELECT hidden_lock()", Some(&roles.writer))
            .await
            .unwrap();
        match end {
            "commit" => {
                env.commit_one_phase(&gid).await.unwrap();
            }
            "prepare" => {
                execute(&env, &gid, &format!("INSERT INTO kv VALUES ({txid}, 'x')"), None)
                    .await
                    .unwrap();
                assert_eq!(vote(&env.prepare(&gid).await), pb::Vote::Yes);
                assert_eq!(env.commit(&gid).await.unwrap(), pb::BranchState::Committed);
            }
            _ => {
                execute(&env, &gid, "SELECT 1/0", None).await.unwrap_err();
            }
        }
        assert_eq!(
            whoami(&env, txid + 1, None).await,
            (roles.participant.clone(), pid),
            "after {end}"
        );
        assert_eq!(advisory_locks(&env, 43).await, 0, "after {end}");
    }
}

#[tokio::test]
async fn a_branch_whose_function_moved_the_sessions_role_is_prepared_under_the_participants() {
    let _shared = SERVER.read().await;
    let (env, roles) = start("roles-prepare-as").await;
    let (participant, reader) = (&roles.participant, &roles.reader);
    env.db
        .sql(&format!(
            "{}; CREATE TABLE own (k bigint); ALTER TABLE own OWNER TO {participant}",
            becoming("become_reader", reader)
        ))
        .await;
    // A branch under the participant's own role (no database_role) whose function leaves the
    // session under another role: the vote returns to the participant's role before the marker
    // and PREPARE, or the marker would be refused and, without one, the branch would stay
    // prepared under a role the participant cannot finish it as.
    let gid = env.gid(1);
    execute(&env, &gid, "INSERT INTO own VALUES (1)", None)
        .await
        .unwrap();
    execute(&env, &gid, "SELECT become_reader()", None).await.unwrap();
    assert_eq!(vote(&env.prepare(&gid).await), pb::Vote::Yes);
    let owner: String = sqlx::query_scalar("SELECT owner::text FROM pg_prepared_xacts WHERE gid LIKE $1")
        .bind(format!("{gid}:%"))
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(&owner, participant);
    assert_eq!(env.commit(&gid).await.unwrap(), pb::BranchState::Committed);
    assert_eq!(env.db.count("SELECT count(*) FROM own").await, 1);
}
