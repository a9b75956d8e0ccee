//! Recovery: prepared branches outliving the participant or PostgreSQL, resolved only by the
//! coordinator's answer; marker cleanup; refusing transactions whose branch may have been lost.

use std::time::Duration;

use tonic::Code;
use treaty_proto::pb;

use crate::support::{Env, SERVER, eventually, int, text, vote};

const RESOLVED: Duration = Duration::from_secs(15);

async fn prepared_insert(env: &Env, txid: u64, k: i64) -> String {
    let gid = env.gid(txid);
    env.execute(&gid, "INSERT INTO kv VALUES ($1, $2)", vec![int(k), text("v")])
        .await
        .unwrap();
    assert_eq!(vote(&env.prepare(&gid).await), pb::Vote::Yes);
    gid
}

async fn kv(env: &Env) {
    env.db.sql("CREATE TABLE kv (k bigint PRIMARY KEY, v text)").await;
}

/// A branch whose statements died with the participant is never continued in a new one: the
/// coordinator's next statement says it continues (`continues`), and the restarted participant,
/// which has no such branch, refuses it instead of committing it without the first.
#[tokio::test]
async fn a_restarted_participant_refuses_to_continue_a_branch_it_lost() {
    let _shared = SERVER.read().await;
    let Some(mut env) = Env::start("restart-continues", |_| {}).await else {
        return;
    };
    kv(&env).await;
    let gid = env.gid(5);
    env.execute(&gid, "INSERT INTO kv VALUES (51, 'first')", vec![])
        .await
        .unwrap();
    let config = env.config();
    env.restart_participant(config).await;
    let second = |gid: String, k: i64, continues: bool| pb::BranchExecuteRequest {
        gid,
        sql: "INSERT INTO kv VALUES ($1, 'more')".into(),
        params: vec![int(k)],
        continues,
        ..Default::default()
    };
    let refused = env
        .client()
        .execute(second(gid.clone(), 52, true))
        .await
        .expect_err("a lost branch is not continued");
    assert!(refused.message().contains("no longer has"), "{refused:?}");
    // Asked again, with or without the flag, the GID stays refused: nothing under it commits.
    assert!(
        env.client()
            .execute(second(gid.clone(), 53, false))
            .await
            .is_err()
    );
    assert_eq!(
        env.db
            .count("SELECT count(*) FROM kv WHERE k BETWEEN 51 AND 53")
            .await,
        0
    );
    // Another transaction's first statement opens its branch as ever.
    let fresh = env.gid(6);
    env.client()
        .execute(second(fresh.clone(), 61, false))
        .await
        .unwrap();
    assert_eq!(vote(&env.prepare(&fresh).await), pb::Vote::Yes);
}

#[tokio::test]
async fn a_restarted_participant_applies_the_coordinators_decision() {
    let _shared = SERVER.read().await;
    let Some(mut env) = Env::start("restart-participant", |_| {}).await else {
        return;
    };
    kv(&env).await;
    let committed = prepared_insert(&env, 1, 1).await;
    let aborted = prepared_insert(&env, 2, 2).await;
    let pending = prepared_insert(&env, 3, 3).await;
    let open = env.gid(4);
    env.execute(&open, "INSERT INTO kv VALUES (4, 'open')", vec![])
        .await
        .unwrap();

    env.coordinator.decide(&committed, pb::Decision::Commit, true);
    env.coordinator.decide(&pending, pb::Decision::Pending, true);
    env.coordinator
        .next_txid
        .store(10, std::sync::atomic::Ordering::SeqCst);

    // The open branch dies with the process; the prepared ones are PostgreSQL's to keep.
    let mut config = env.config();
    config.reconcile_interval_ms = 100;
    env.restart_participant(config).await;
    let db = &env.db;
    eventually("committed and aborted resolved", RESOLVED, || async {
        !db.is_prepared(&committed).await && !db.is_prepared(&aborted).await
    })
    .await;
    assert_eq!(db.count("SELECT count(*) FROM kv WHERE k = 1").await, 1);
    assert_eq!(db.count("SELECT count(*) FROM kv WHERE k = 2").await, 0);
    assert!(db.has_marker(&committed).await);
    assert!(db.is_prepared(&pending).await, "PENDING is left alone");
    assert_eq!(db.count("SELECT count(*) FROM kv WHERE k = 4").await, 0);

    // The open branch's transaction began before this process: its next statement is refused
    // rather than run in a fresh branch without the first one.
    let err = env
        .execute(&open, "INSERT INTO kv VALUES (5, 'x')", vec![])
        .await
        .unwrap_err();
    // ABORTED: this transaction cannot go on, but run again it may succeed.
    assert_eq!(err.code(), Code::Aborted);
    assert!(
        err.message().contains("began before this participant started"),
        "{}",
        err.message()
    );
    assert_eq!(vote(&env.prepare(&open).await), pb::Vote::No);
    let fresh = env.gid(10);
    env.execute(&fresh, "SELECT 1", vec![]).await.unwrap();

    // The coordinator's own phase-two call still works after recovery, and repeats are fine.
    assert_eq!(env.commit(&committed).await.unwrap(), pb::BranchState::Committed);
    assert_eq!(env.commit(&pending).await.unwrap(), pb::BranchState::Committed);
    assert_eq!(db.count("SELECT count(*) FROM kv").await, 2);
}

#[tokio::test]
async fn branches_in_doubt_are_asked_about_and_never_decided_alone() {
    let _shared = SERVER.read().await;
    // The coordinator's port is reserved but nobody serves on it yet.
    let unreachable = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = unreachable.local_addr().unwrap().port();
    drop(unreachable);
    let Some(env) = Env::start("in-doubt", |c| {
        c.in_doubt_after_ms = 200;
        c.reconcile_interval_ms = 100;
        c.coordinator_urls = vec![format!("http://127.0.0.1:{port}")];
    })
    .await
    else {
        return;
    };
    kv(&env).await;
    let gid = prepared_insert(&env, 1, 1).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(env.db.is_prepared(&gid).await, "no answer, no action");

    // The coordinator comes up (on the port the participant keeps trying) and says ABORT.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::coordinator_server::CoordinatorServer::new(
                env.coordinator.clone(),
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let db = &env.db;
    eventually("the in-doubt branch rolled back", RESOLVED, || async {
        !db.is_prepared(&gid).await
    })
    .await;
    assert_eq!(db.count("SELECT count(*) FROM kv").await, 0);
    assert_eq!(env.abort(&gid).await.unwrap(), pb::BranchState::Aborted);
}

#[tokio::test]
async fn a_prepared_branch_whose_machine_times_out_asks_the_coordinator() {
    // Rule: a 2PC machine prepared past its timeout asks the coordinator (`AskCoordinator`), and
    // recovery applies the answer, long before `--in-doubt-after-ms` would have.
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("machine-asks", |c| {
        c.branch_idle_timeout_ms = 200;
        c.in_doubt_after_ms = 600_000;
        c.reconcile_interval_ms = 100;
    })
    .await
    else {
        return;
    };
    kv(&env).await;
    let gid = env.gid(1);
    env.coordinator.decide(&gid, pb::Decision::Commit, true);
    env.execute(&gid, "INSERT INTO kv VALUES (1, 'v')", vec![])
        .await
        .unwrap();
    assert_eq!(vote(&env.prepare(&gid).await), pb::Vote::Yes);
    let db = &env.db;
    eventually(
        "the branch committed on the coordinator's answer",
        RESOLVED,
        || async { !db.is_prepared(&gid).await },
    )
    .await;
    assert_eq!(db.count("SELECT count(*) FROM kv").await, 1);
    assert!(
        env.coordinator
            .asked
            .lock()
            .unwrap()
            .iter()
            .any(|asked| asked == &gid),
        "the coordinator was asked about the branch"
    );
    assert_eq!(env.commit(&gid).await.unwrap(), pb::BranchState::Committed);

    // A branch rolled back by hand behind the participant's back: its waiting machine still asks,
    // although PostgreSQL no longer lists it, and the coordinator's ABORT finishes it.
    let by_hand = env.gid(2);
    env.coordinator.decide(&by_hand, pb::Decision::Abort, true);
    env.execute(&by_hand, "INSERT INTO kv VALUES (2, 'v')", vec![])
        .await
        .unwrap();
    assert_eq!(vote(&env.prepare(&by_hand).await), pb::Vote::Yes);
    db.sql(&format!("ROLLBACK PREPARED '{by_hand}:s0'")).await;
    let coordinator = &env.coordinator;
    eventually(
        "the coordinator was asked about the vanished branch",
        RESOLVED,
        || async {
            coordinator
                .asked
                .lock()
                .unwrap()
                .iter()
                .any(|asked| asked == &by_hand)
        },
    )
    .await;
    assert_eq!(env.abort(&by_hand).await.unwrap(), pb::BranchState::Aborted);
}

#[tokio::test]
async fn marker_rows_are_deleted_once_the_coordinator_stops_tracking() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("markers", |c| {
        c.marker_retention_ms = 100;
        c.reconcile_interval_ms = 100;
    })
    .await
    else {
        return;
    };
    kv(&env).await;
    let gid = prepared_insert(&env, 1, 1).await;
    env.coordinator.decide(&gid, pb::Decision::Commit, true);
    assert_eq!(env.commit(&gid).await.unwrap(), pb::BranchState::Committed);
    let queries = env.coordinator.queries.load(std::sync::atomic::Ordering::SeqCst);
    let coordinator = &env.coordinator;
    eventually("the coordinator was asked about the marker", RESOLVED, || async {
        coordinator.queries.load(std::sync::atomic::Ordering::SeqCst) > queries + 1
    })
    .await;
    assert!(env.db.has_marker(&gid).await, "kept while tracked");

    env.coordinator.decide(&gid, pb::Decision::Commit, false);
    let db = &env.db;
    eventually("the marker deleted", RESOLVED, || async {
        !db.has_marker(&gid).await
    })
    .await;
    assert_eq!(db.count("SELECT count(*) FROM kv").await, 1);
}

#[tokio::test]
async fn commit_after_postgres_restarts_with_the_branch_prepared() {
    let _exclusive = SERVER.write().await;
    let Some(env) = Env::start("restart-postgres", |_| {}).await else {
        return;
    };
    kv(&env).await;
    let gid = prepared_insert(&env, 1, 1).await;
    // Warm the pool so that the participant holds connections the restart kills.
    env.execute(&env.gid(2), "SELECT 1", vec![]).await.unwrap();
    assert_eq!(vote(&env.prepare(&env.gid(2)).await), pb::Vote::ReadOnly);

    match std::env::var("TREATY_TEST_PG_RESTART") {
        _ if env.pg.is_some() => {
            let (pg, _) = env.pg.as_ref().unwrap();
            pg.stop_immediate().await.unwrap();
            pg.restart().await.unwrap();
        }
        Ok(command) if !command.is_empty() => {
            let status = std::process::Command::new("sh")
                .arg("-c")
                .arg(&command)
                .status()
                .unwrap();
            assert!(status.success(), "{command} failed");
        }
        _ => {
            eprintln!("TREATY_TEST_PG_RESTART unset: terminating the participant's connections instead");
            env.db
                .sql(&format!(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = '{}' AND application_name = 'treaty-participant'",
                    env.db.name
                ))
                .await;
        }
    }
    let db = &env.db;
    eventually("PostgreSQL accepting connections", RESOLVED, || async {
        sqlx::query("SELECT 1").execute(&db.pool).await.is_ok()
    })
    .await;
    assert!(db.is_prepared(&gid).await, "the prepared branch survives");
    assert_eq!(env.commit(&gid).await.unwrap(), pb::BranchState::Committed);
    assert_eq!(db.count("SELECT count(*) FROM kv").await, 1);
    // Fresh branches work on the replaced connections.
    let next = env.gid(3);
    env.execute(&next, "INSERT INTO kv VALUES (2, 'after')", vec![])
        .await
        .unwrap();
    assert_eq!(
        env.commit_one_phase(&next).await.unwrap(),
        pb::BranchState::Committed
    );
}

/// Two shards may be two databases of one PostgreSQL server, and GIDs are unique per server: each
/// branch is prepared under its branch GID (`<gid>:<shard>`). Recovery reads only its own database
/// only. It finishes a branch an older participant left prepared under the bare GID (the legacy
/// form) under that exact text, and a branch of its own database named for another shard (left
/// under an earlier `--shard` name: the database has only one participant) under that name, once
/// the coordinator has decided.
#[tokio::test]
async fn recovery_leaves_other_databases_alone_and_finishes_legacy_and_orphaned_branches() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("neighbour", |c| {
        c.in_doubt_after_ms = 200;
        c.reconcile_interval_ms = 100;
        // Every pass then asks about the committed marker, so passes can be counted.
        c.marker_retention_ms = 100;
    })
    .await
    else {
        return;
    };
    kv(&env).await;
    let neighbour = crate::support::TestDb::create(&env.admin_url, "treaty_test_neighbour_other").await;
    // As the neighbour shard's participant would have migrated it.
    neighbour
        .sql(include_str!("../../../migrations/0001_treaty_branches.sql"))
        .await;
    neighbour
        .sql("CREATE TABLE kv (k bigint PRIMARY KEY, v text)")
        .await;
    let coordinator = &env.coordinator;
    let gid = |txid: u64| env.gid(txid);
    // As a participant of the same coordinator would leave them: the marker row under the
    // transaction's GID, then PREPARE under `name`.
    let prepare_by_hand = |db: &crate::support::TestDb, txid: u64, name: String| {
        let sql = format!(
            "BEGIN; INSERT INTO kv VALUES ({txid}, 'by hand'); \
             INSERT INTO treaty.branches (gid, coordinator_id, txid) VALUES ('{}', '{}', {txid}); \
             PREPARE TRANSACTION '{name}'",
            gid(txid),
            coordinator.id
        );
        let db = db.pool.clone();
        async move {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&db)
                .await
                .unwrap();
        }
    };
    // Nothing is finished until the test says so.
    for txid in [3, 4, 5] {
        coordinator.decide(&gid(txid), pb::Decision::Pending, true);
    }
    // Another database of the same server: names that would be this shard's in its own database.
    prepare_by_hand(&neighbour, 1, format!("{}:s0", gid(1))).await;
    prepare_by_hand(&neighbour, 2, gid(2)).await;
    // This database: a legacy branch, a branch GID, and another shard's branch GID.
    prepare_by_hand(&env.db, 3, gid(3)).await;
    prepare_by_hand(&env.db, 4, format!("{}:s0", gid(4))).await;
    prepare_by_hand(&env.db, 5, format!("{}:s1", gid(5))).await;

    // The operator's listing names this shard's branches by their transaction, whatever the form.
    let listed = env
        .client()
        .list_prepared(pb::ListPreparedRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut listed: Vec<String> = listed.branches.into_iter().map(|b| b.gid).collect();
    listed.sort();
    assert_eq!(listed, [gid(3), gid(4), format!("{}:s1", gid(5))]);

    eventually(
        "both own branches and the orphan asked about",
        RESOLVED,
        || async {
            let asked = coordinator.asked.lock().unwrap().clone();
            asked.contains(&gid(3)) && asked.contains(&gid(4)) && asked.contains(&gid(5))
        },
    )
    .await;
    coordinator.decide(&gid(3), pb::Decision::Commit, true);
    coordinator.decide(&gid(4), pb::Decision::Abort, true);
    let db = &env.db;
    // The orphan stays prepared while its transaction is undecided.
    let orphan = vec![format!("{}:s1", gid(5))];
    eventually("this shard's branches finished", RESOLVED, || async {
        db.prepared().await == orphan
    })
    .await;
    assert_eq!(
        db.count("SELECT count(*) FROM kv WHERE k = 3").await,
        1,
        "legacy branch committed"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM kv WHERE k = 4").await,
        0,
        "branch rolled back"
    );

    // A few more passes: still nothing asked about the neighbour's GIDs.
    let queries = coordinator.queries.load(std::sync::atomic::Ordering::SeqCst);
    eventually("more recovery passes", RESOLVED, || async {
        coordinator.queries.load(std::sync::atomic::Ordering::SeqCst) > queries + 2
    })
    .await;
    let asked = coordinator.asked.lock().unwrap().clone();
    for txid in [1, 2] {
        assert!(
            !asked.contains(&gid(txid)),
            "asked about {}: {asked:?}",
            gid(txid)
        );
    }
    // Phase two for a GID prepared only in the neighbour's database does not reach it either.
    assert_eq!(env.abort(&gid(2)).await.unwrap(), pb::BranchState::Aborted);
    let mut expected = vec![gid(2), format!("{}:s0", gid(1))];
    expected.sort();
    assert_eq!(neighbour.prepared().await, expected);
    assert_eq!(neighbour.count("SELECT count(*) FROM kv").await, 0);
    assert_eq!(db.prepared().await, orphan, "the undecided orphan waits");

    // Once decided, the orphan is finished under its own name.
    coordinator.decide(&gid(5), pb::Decision::Commit, true);
    eventually("the orphan committed", RESOLVED, || async {
        db.prepared().await.is_empty()
    })
    .await;
    assert_eq!(
        db.count("SELECT count(*) FROM kv WHERE k = 5").await,
        1,
        "the orphan's write"
    );
    // Prepared transactions outlive the test on a shared server (`TREATY_TEST_DATABASE_URL`).
    for name in expected {
        neighbour.sql(&format!("ROLLBACK PREPARED '{name}'")).await;
    }
}

#[tokio::test]
async fn a_plain_gid_is_asked_of_the_instance_whose_info_names_its_coordinator() {
    let _shared = SERVER.read().await;
    // Listed first: another coordinator, which would answer ABORT (presumed abort) for anything.
    let other = crate::support::FakeCoordinator {
        id: format!("other-{}", std::process::id()),
        next_txid: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1)),
        decisions: Default::default(),
        queries: Default::default(),
        asked: Default::default(),
        open_from: Default::default(),
        infos: Default::default(),
    };
    let other_addr = crate::support::serve_fake(other.clone()).await;
    let Some(mut env) = Env::start("plain-gid-routing", |_| {}).await else {
        return;
    };
    kv(&env).await;
    let committed = prepared_insert(&env, 1, 1).await;
    env.coordinator.decide(&committed, pb::Decision::Commit, true);
    let mut config = env.config();
    config.reconcile_interval_ms = 100;
    config.in_doubt_after_ms = 100;
    config.coordinator_urls = vec![
        format!("http://{other_addr}"),
        format!("http://{}", env.coordinator_addr),
    ];
    env.restart_participant(config).await;
    let db = &env.db;
    eventually("the prepared branch resolved", RESOLVED, || async {
        !db.is_prepared(&committed).await
    })
    .await;
    assert_eq!(
        db.count("SELECT count(*) FROM kv WHERE k = 1").await,
        1,
        "committed, as its own coordinator decided"
    );
    assert!(
        other.asked.lock().unwrap().is_empty(),
        "the other coordinator was never asked about a plain GID that is not its own"
    );
}
