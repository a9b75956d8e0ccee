//! The participant's connection pool: a connection goes back without a round trip and is reused
//! at once, the pool's limit and timeout hold, and under a burst of commits the `COMMIT
//! PREPARED`s of all batches in flight share one limit, so that a recovery backlog does not make
//! the participant open a backend per commit.

use std::time::Duration;

use treaty_participant::pool::{CHECK_INTERVAL, ConnectTarget, Pool, PooledConnection, Taker};
use treaty_proto::{DatabaseRole, pb};

use crate::support::{Env, SERVER, int, vote};

/// Branches prepared before the burst (the test server allows 200 prepared at once, shared with
/// the other tests).
const BRANCHES: u64 = 96;
/// Batches sent at once, as a coordinator re-driving a backlog does.
const BATCHES: usize = 4;
/// The participant's limit on `COMMIT PREPARED`s in flight over all batches.
const COMMITS_IN_PARALLEL: i64 = 16;

#[tokio::test]
async fn a_burst_of_commit_batches_uses_a_bounded_number_of_connections() {
    let _shared = SERVER.read().await;
    // Room for more connections than the commit limit, so that only the limit keeps them few.
    let Some(env) = Env::start("commit-burst", |c| c.max_connections = 64).await else {
        return;
    };
    env.db.sql("CREATE TABLE burst (k bigint PRIMARY KEY)").await;
    let gids: Vec<String> = (1..=BRANCHES).map(|txid| env.gid(txid)).collect();
    for (k, gid) in gids.iter().enumerate() {
        env.execute(gid, "INSERT INTO burst (k) VALUES ($1)", vec![int(k as i64)])
            .await
            .unwrap();
        assert_eq!(vote(&env.prepare(gid).await), pb::Vote::Yes);
    }
    let before = participant_backends(&env).await;
    assert!(
        before <= 2,
        "one branch at a time needs one connection (and the pool reuses it at once), found {before}"
    );

    let chunk = gids.len().div_ceil(BATCHES);
    let batches = gids.chunks(chunk).map(|gids| {
        let mut client = env.client();
        let gids = gids.to_vec();
        async move {
            client
                .commit_batch(pb::FinishBatchRequest { gids })
                .await
                .unwrap()
                .into_inner()
        }
    });
    let answers = futures::future::join_all(batches).await;
    for result in answers.iter().flat_map(|answer| &answer.results) {
        assert!(result.error.is_empty(), "{}: {}", result.gid, result.error);
        assert_eq!(result.state, pb::BranchState::Committed as i32, "{}", result.gid);
    }
    assert_eq!(
        answers.iter().map(|answer| answer.results.len()).sum::<usize>(),
        gids.len()
    );
    assert_eq!(env.db.count("SELECT count(*) FROM burst").await, BRANCHES as i64);
    assert!(env.db.prepared().await.is_empty());

    let after = participant_backends(&env).await;
    assert!(
        after <= COMMITS_IN_PARALLEL + before,
        "{BATCHES} batches of {chunk} commits opened {after} connections; at most {COMMITS_IN_PARALLEL} \
         commits run at once, and a connection is reusable as soon as its commit is done"
    );
}

/// The participant's backends on the test's database.
async fn participant_backends(env: &Env) -> i64 {
    env.db
        .count(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'treaty-participant'",
        )
        .await
}

async fn pid_of(connection: &mut PooledConnection) -> i32 {
    connection
        .client()
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

async fn backend_pid(pool: &Pool) -> i32 {
    pid_of(&mut pool.acquire().await.unwrap()).await
}

#[tokio::test]
async fn a_returned_connection_is_reused_at_once_and_a_closed_one_is_not() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("pool-reuse", |_| {}).await else {
        return;
    };
    let target = ConnectTarget::from_url(&env.db.url).unwrap();
    let pool = Pool::new(target, 2, Duration::from_millis(300));

    // Back among the idle connections as soon as it is dropped: no test round trip first (with
    // one, the next acquire would find none idle and open a second backend).
    let first = backend_pid(&pool).await;
    for _ in 0..5 {
        assert_eq!(backend_pid(&pool).await, first, "the same backend, reused");
    }

    // Newest first: of two idle connections, the one returned last is taken (a light load keeps
    // the same backends warm).
    let mut a = pool.acquire().await.unwrap();
    let mut b = pool.acquire().await.unwrap();
    let (pid_a, pid_b) = (pid_of(&mut a).await, pid_of(&mut b).await);
    drop(b);
    drop(a);
    assert_eq!(backend_pid(&pool).await, pid_a, "the connection returned last");
    drop(pool.acquire().await.unwrap());
    let mut a = pool.acquire().await.unwrap();
    let mut b = pool.acquire().await.unwrap();
    let (again_a, again_b) = (pid_of(&mut a).await, pid_of(&mut b).await);
    assert_eq!((again_a, again_b), (pid_a, pid_b), "both reused, newest first");
    drop((a, b));

    let mut closing = pool.acquire().await.unwrap();
    let closed = pid_of(&mut closing).await;
    closing.close_on_drop();
    drop(closing);
    let mut a = pool.acquire().await.unwrap();
    let mut b = pool.acquire().await.unwrap();
    let now = [pid_of(&mut a).await, pid_of(&mut b).await];
    assert!(
        !now.contains(&closed),
        "a connection closed on drop is not reused: {closed} in {now:?}"
    );

    // Both of the pool's two connections are in use.
    let Err(error) = pool.acquire().await else {
        panic!("a third connection from a pool of two");
    };
    let message = error.to_string();
    assert!(
        message.contains("no PostgreSQL connection within 300 ms: all 2 are in use"),
        "{message}"
    );
    assert!(error.is_connection(), "{error:?}");
}

/// A pool of one connection to `env`'s database, so that each test knows which session it gets.
fn pool_of_one(env: &Env) -> Pool {
    Pool::new(
        ConnectTarget::from_url(&env.db.url).unwrap(),
        1,
        Duration::from_secs(5),
    )
}

/// `search_path` of the session on `connection`.
async fn search_path(connection: &mut PooledConnection) -> String {
    connection
        .client()
        .query_one("SHOW search_path", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_connection_a_branch_left_changed_serves_only_its_own_role_unchecked() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("pool-owner", |_| {}).await else {
        return;
    };
    let pool = pool_of_one(&env);
    let role = DatabaseRole::new("app_orders").unwrap();
    let clean_path = search_path(&mut pool.acquire().await.unwrap()).await;

    // A branch under no role whose hidden function moved search_path for the session, ended
    // without a check (none is due within CHECK_INTERVAL of the last).
    let mut branch = pool.acquire_for(Taker::Branch(None)).await.unwrap();
    let left = pid_of(&mut branch).await;
    branch
        .client()
        .simple_query("SELECT set_config('search_path', 'nowhere', false)")
        .await
        .unwrap();
    drop(branch);
    // The next branch under the same role takes it as it is, as a per-user pool would (a check
    // would have closed it). The counts are the process's (other tests may add to them).
    let handovers = || treaty_participant::metrics::global().session_checks("handover");
    let before = handovers();
    let mut same = pool.acquire_for(Taker::Branch(None)).await.unwrap();
    assert_eq!(pid_of(&mut same).await, left, "reused by the same role");
    assert_eq!(search_path(&mut same).await, "nowhere");
    drop(same);

    // A branch under another role has it checked first: found changed, it is closed, and a
    // fresh session serves instead.
    let mut other = pool.acquire_for(Taker::Branch(Some(&role))).await.unwrap();
    let fresh = pid_of(&mut other).await;
    assert_ne!(fresh, left, "a changed session never reaches another role");
    assert!(handovers() > before, "counted as a check at handover");
    assert_eq!(search_path(&mut other).await, clean_path);
    // Moved again under that role: the participant's own statements get a checked one too.
    other
        .client()
        .simple_query("SELECT set_config('search_path', 'elsewhere', false)")
        .await
        .unwrap();
    drop(other);
    let mut own = pool.acquire().await.unwrap();
    assert_ne!(
        pid_of(&mut own).await,
        fresh,
        "the participant never meets a changed session"
    );
    assert_eq!(search_path(&mut own).await, clean_path);
    drop(own);

    // Unchanged, an unchecked connection passes the check and stays.
    let mut branch = pool.acquire_for(Taker::Branch(Some(&role))).await.unwrap();
    let kept = pid_of(&mut branch).await;
    drop(branch);
    let mut own = pool.acquire().await.unwrap();
    assert_eq!(
        pid_of(&mut own).await,
        kept,
        "a clean session is checked and kept"
    );
}

/// A session whose `synchronous_commit` a branch's hidden function turned off, or which holds a
/// cursor declared `WITH HOLD`, never serves the participant's own statements (its COMMIT
/// PREPARED would be acknowledged unflushed; the cursor's rows were read under another role).
#[tokio::test]
async fn a_session_with_commits_made_asynchronous_or_a_held_cursor_is_closed_at_handover() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("pool-durability", |_| {}).await else {
        return;
    };
    let pool = pool_of_one(&env);
    for leak in [
        "SELECT set_config('synchronous_commit', 'off', false)",
        "SET client_encoding = 'LATIN1'",
        "BEGIN; DECLARE held CURSOR WITH HOLD FOR SELECT 1; COMMIT",
    ] {
        let mut branch = pool.acquire_for(Taker::Branch(None)).await.unwrap();
        let left = pid_of(&mut branch).await;
        branch.client().batch_execute(leak).await.unwrap();
        drop(branch);
        let mut own = pool.acquire().await.unwrap();
        assert_ne!(
            pid_of(&mut own).await,
            left,
            "{leak}: the changed session was closed"
        );
        let setting: String = own
            .client()
            .query_one("SHOW synchronous_commit", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(setting, "on", "{leak}");
        drop(own);
    }
}

/// The vote's prelude makes the transaction durable whatever the branch set before it, and takes
/// the participant's role back, in one statement.
#[tokio::test]
async fn the_votes_prelude_turns_synchronous_commit_back_on_for_the_transaction() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("pool-vote-durable", |_| {}).await else {
        return;
    };
    let pool = pool_of_one(&env);
    let own = pool.acquire().await.unwrap();
    own.client()
        .batch_execute("BEGIN; SET LOCAL synchronous_commit = off")
        .await
        .unwrap();
    own.client()
        .batch_execute(treaty_participant::ROLE_AND_DURABILITY)
        .await
        .unwrap();
    let setting: String = own
        .client()
        .query_one("SHOW synchronous_commit", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(setting, "on");
    own.client().batch_execute("ROLLBACK").await.unwrap();
}

#[tokio::test]
async fn a_session_lock_left_on_an_idle_connection_is_released_by_the_idle_check() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("pool-idle-check", |_| {}).await else {
        return;
    };
    let pool = pool_of_one(&env);
    let mut branch = pool.acquire_for(Taker::Branch(None)).await.unwrap();
    let pid = pid_of(&mut branch).await;
    branch
        .client()
        .simple_query("SELECT pg_advisory_lock(4242)")
        .await
        .unwrap();
    drop(branch);
    let locks =
        format!("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242 AND pid = {pid}");
    let held = || env.db.count(&locks);
    assert_eq!(held().await, 1, "left by the branch on the idle connection");
    let idle_checks = || treaty_participant::metrics::global().session_checks("idle");
    let before = idle_checks();
    // The idle sweep's call; it checks a connection once CHECK_INTERVAL has passed since its
    // last check, so it is repeated until then (bounded).
    let deadline = std::time::Instant::now() + CHECK_INTERVAL * 20;
    while held().await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the lock outlived the idle check"
        );
        pool.check_idle().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(idle_checks() > before, "counted as an idle check");
    // Released by the check itself; the session was otherwise clean, so it stays.
    assert_eq!(backend_pid(&pool).await, pid);
}

/// `Client::pipeline` (the vendored tokio-postgres) and `Connection::pipeline`: the steps go
/// with one Sync, so without a BEGIN they are one implicit transaction (a Sync per step would have
/// committed the insert on its own before the division by zero), PostgreSQL skips what follows a
/// failed step (answered as 25P02), and a prepared step's rows come back.
#[tokio::test]
async fn a_pipeline_is_answered_at_one_sync_and_stops_at_the_first_failure() {
    use tokio_postgres::Step;
    use tokio_postgres::types::ToSql;
    use treaty_participant::DbError;

    let _shared = SERVER.read().await;
    let Some(env) = Env::start("pool-pipeline", |_| {}).await else {
        return;
    };
    env.db.sql("CREATE TABLE piped (k int PRIMARY KEY)").await;
    let (client, connection) = tokio_postgres::connect(&env.db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let insert = client.prepare("INSERT INTO piped VALUES ($1)").await.unwrap();
    let one: &(dyn ToSql + Sync) = &1i32;
    let output = client
        .pipeline(&[
            Step::Prepared(&insert, &[one]),
            Step::Text("SELECT 1/0"),
            Step::Text("SELECT 2"),
        ])
        .await
        .unwrap();
    assert_eq!(output.completed.len(), 1, "{output:?}");
    assert_eq!(output.completed[0].rows_affected, 1);
    let failed = output
        .failed
        .as_ref()
        .and_then(|error| error.code())
        .map(|code| code.code().to_owned());
    assert_eq!(failed.as_deref(), Some("22012"), "{output:?}");
    assert_eq!(output.status, Some(b'I'));
    assert_eq!(
        env.db.count("SELECT count(*) FROM piped").await,
        0,
        "the insert and the failed step were one implicit transaction: one Sync"
    );

    // The participant's pooled sessions (read-only outside a BEGIN ... READ WRITE).
    let pool = pool_of_one(&env);
    let connection = pool.acquire().await.unwrap();
    let insert = connection
        .client()
        .prepare("INSERT INTO piped VALUES ($1)")
        .await
        .unwrap();
    let select = connection
        .client()
        .prepare("SELECT k FROM piped ORDER BY k")
        .await
        .unwrap();
    let sqlstate = |answer: &Result<tokio_postgres::StepOutput, DbError>| match answer {
        Err(DbError::Sql { sqlstate, .. }) => sqlstate.clone(),
        other => format!("{other:?}"),
    };
    let two: &(dyn ToSql + Sync) = &2i32;
    let answers = connection
        .pipeline(&[
            Step::Text("BEGIN READ WRITE"),
            Step::Prepared(&insert, &[two]),
            Step::Text("SELECT 1/0"),
            Step::Text("COMMIT"),
        ])
        .await;
    assert_eq!(answers.len(), 4);
    assert_eq!(answers[1].as_ref().map(|step| step.rows_affected).ok(), Some(1));
    assert_eq!(sqlstate(&answers[2]), "22012", "division by zero");
    assert_eq!(
        sqlstate(&answers[3]),
        "25P02",
        "skipped after the failure: {:?}",
        answers[3]
    );
    connection.simple("ROLLBACK").await.unwrap();
    assert_eq!(
        env.db.count("SELECT count(*) FROM piped").await,
        0,
        "nothing committed"
    );

    let three: &(dyn ToSql + Sync) = &3i32;
    let answers = connection
        .pipeline(&[
            Step::Text("BEGIN READ WRITE"),
            Step::Prepared(&insert, &[three]),
            Step::Prepared(&select, &[]),
            Step::Text("COMMIT"),
        ])
        .await;
    let outputs: Vec<_> = answers.into_iter().map(|answer| answer.unwrap()).collect();
    let rows: Vec<i32> = outputs[2].rows.iter().map(|row| row.get(0)).collect();
    assert_eq!(
        rows,
        vec![3],
        "the prepared step's rows, seeing the insert before it"
    );
    assert_eq!(env.db.count("SELECT count(*) FROM piped").await, 1, "committed");
}
