//! Commit decisions kept in PostgreSQL (`--decision-store shard`): the decision branch's
//! `CommitDecision`, the race against a concluded abort, `ReadDecisions` waiting for an
//! uncommitted commit row, listing and forgetting commit rows, and branches of GIDs that name a
//! decision shard (no marker row; nothing prepared answers UNKNOWN).

use std::time::Duration;

use sqlx::Connection as _;
use tonic::Code;
use treaty_proto::pb;

use crate::support::{Env, SERVER, int, state, text, vote};

async fn kv(env: &Env) {
    env.db
        .sql("CREATE TABLE kv (k bigint PRIMARY KEY, v text NOT NULL)")
        .await;
}

/// The GID of transaction `txid` whose decision is kept on shard `s0`, the test participant's.
fn decision_gid(env: &Env, txid: u64) -> String {
    format!("{}@s0", env.gid(txid))
}

async fn commit_decision(
    env: &Env,
    gid: &str,
    participants: &[&str],
    standalone: bool,
) -> Result<pb::CommitDecisionResponse, tonic::Status> {
    env.client()
        .commit_decision(pb::CommitDecisionRequest {
            gid: gid.into(),
            participants: participants.iter().map(|s| (*s).to_owned()).collect(),
            standalone,
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn read(
    env: &Env,
    gids: &[&str],
    conclude_abort: bool,
) -> Result<Vec<pb::StoredDecision>, tonic::Status> {
    env.client()
        .read_decisions(pb::ReadDecisionsRequest {
            gids: gids.iter().map(|s| (*s).to_owned()).collect(),
            conclude_abort,
        })
        .await
        .map(|response| response.into_inner().decisions)
}

fn decision(stored: &pb::StoredDecision) -> pb::Decision {
    pb::Decision::try_from(stored.decision).unwrap()
}

async fn outcome_row(env: &Env, gid: &str) -> Option<String> {
    sqlx::query_scalar("SELECT outcome FROM treaty.decisions WHERE gid = $1")
        .bind(gid)
        .fetch_optional(&env.db.pool)
        .await
        .unwrap()
}

async fn insert_kv(env: &Env, gid: &str, k: i64) {
    env.execute(
        gid,
        "INSERT INTO kv (k, v) VALUES ($1, $2)",
        vec![int(k), text("x")],
    )
    .await
    .unwrap();
}

fn unix_ms_now() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

#[tokio::test]
async fn commit_decision_commits_the_row_and_the_branch_writes_together() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("decision-commit", |_| {}).await else {
        return;
    };
    kv(&env).await;
    let gid = decision_gid(&env, 1);
    insert_kv(&env, &gid, 1).await;
    let before_ms = unix_ms_now();
    let answer = commit_decision(&env, &gid, &["s1", "s2"], false).await.unwrap();
    assert!(answer.committed, "{}", answer.message);
    assert_eq!(env.db.count("SELECT count(*) FROM kv WHERE k = 1").await, 1);
    assert_eq!(outcome_row(&env, &gid).await.as_deref(), Some("commit"));
    assert!(
        !env.db.has_marker(&gid).await,
        "the decision branch keeps no marker"
    );
    assert!(
        env.db.prepared().await.is_empty(),
        "the decision branch is never prepared"
    );

    let stored = read(&env, &[&gid], false).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].gid, gid);
    assert_eq!(decision(&stored[0]), pb::Decision::Commit);
    assert_eq!(stored[0].participants, ["s1", "s2"]);
    let decided_at_ms = stored[0].decided_at_ms;
    assert!(
        decided_at_ms + 60_000 > before_ms && decided_at_ms < unix_ms_now() + 60_000,
        "decided_at_ms {decided_at_ms} is not about now ({before_ms})"
    );
    let row_coordinator: String =
        sqlx::query_scalar("SELECT coordinator_id FROM treaty.decisions WHERE gid = $1")
            .bind(&gid)
            .fetch_one(&env.db.pool)
            .await
            .unwrap();
    assert_eq!(row_coordinator, env.coordinator.id);
    // A coordinator that lost the answer concludes: the abort insert does nothing, COMMIT stands.
    let concluded = read(&env, &[&gid], true).await.unwrap();
    assert_eq!(decision(&concluded[0]), pb::Decision::Commit);
    assert_eq!(outcome_row(&env, &gid).await.as_deref(), Some("commit"));

    // The branch is finished: a repeat finds nothing open, and the branch is committed.
    let again = commit_decision(&env, &gid, &["s1", "s2"], false)
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound, "{}", again.message());
    assert!(
        again.message().contains("already committed"),
        "{}",
        again.message()
    );
    assert_eq!(state(env.status(&gid).await.state), pb::BranchState::Committed);
    let abort = env.abort(&gid).await.unwrap_err();
    assert_eq!(abort.code(), Code::FailedPrecondition, "{}", abort.message());
}

#[tokio::test]
async fn a_concluded_abort_wins_over_a_later_commit_decision() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("decision-concluded", |_| {}).await else {
        return;
    };
    kv(&env).await;
    // Without conclude_abort, a GID with no row is UNSPECIFIED and nothing is written.
    let unknown = decision_gid(&env, 9);
    let read_only = read(&env, &[&unknown], false).await.unwrap();
    assert_eq!(decision(&read_only[0]), pb::Decision::Unspecified);
    assert_eq!(outcome_row(&env, &unknown).await, None);

    for (txid, isolation) in [
        (1, pb::IsolationLevel::ReadCommitted),
        (2, pb::IsolationLevel::Serializable),
    ] {
        let gid = decision_gid(&env, txid);
        let k = i64::try_from(txid).unwrap();
        env.client()
            .execute(pb::BranchExecuteRequest {
                gid: gid.clone(),
                sql: "INSERT INTO kv (k, v) VALUES ($1, 'x')".into(),
                params: vec![int(k)],
                options: Some(pb::BranchOptions {
                    isolation: isolation as i32,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap();
        let concluded = read(&env, &[&gid], true).await.unwrap();
        assert_eq!(decision(&concluded[0]), pb::Decision::Abort, "{isolation:?}");
        assert!(concluded[0].participants.is_empty());

        let answer = commit_decision(&env, &gid, &["s1"], false).await.unwrap();
        assert!(!answer.committed, "{isolation:?}: the abort row must win");
        assert!(
            answer.message.contains("concluded aborted"),
            "{isolation:?}: {}",
            answer.message
        );
        assert_eq!(
            env.db
                .count(&format!("SELECT count(*) FROM kv WHERE k = {k}"))
                .await,
            0,
            "{isolation:?}: the branch's write must not be visible"
        );
        assert_eq!(outcome_row(&env, &gid).await.as_deref(), Some("abort"));
        assert_eq!(state(env.status(&gid).await.state), pb::BranchState::Aborted);
    }
    // The branches' connections went back clean: later branches work.
    let gid = decision_gid(&env, 3);
    insert_kv(&env, &gid, 3).await;
    assert!(commit_decision(&env, &gid, &[], false).await.unwrap().committed);
}

#[tokio::test]
async fn a_failed_commit_of_the_decision_branch_is_not_committed_and_says_why() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("decision-commit-fails", |_| {}).await else {
        return;
    };
    env.db
        .sql(
            "CREATE TABLE d (k bigint, CONSTRAINT d_k UNIQUE (k) DEFERRABLE INITIALLY DEFERRED); \
             INSERT INTO d VALUES (1)",
        )
        .await;
    let gid = decision_gid(&env, 1);
    env.execute(&gid, "INSERT INTO d VALUES (1)", vec![])
        .await
        .unwrap();
    // The deferred check fails at COMMIT, after the decision row went in: the branch rolls back.
    let answer = commit_decision(&env, &gid, &["s1"], false).await.unwrap();
    assert!(!answer.committed);
    assert!(answer.message.contains("COMMIT"), "{}", answer.message);
    assert!(answer.message.contains("23505"), "{}", answer.message);
    assert!(
        !answer.message.contains("concluded aborted"),
        "a failed COMMIT is not an abort row winning: {}",
        answer.message
    );
    assert_eq!(
        outcome_row(&env, &gid).await,
        None,
        "the commit row rolled back with the branch"
    );
    assert_eq!(env.db.count("SELECT count(*) FROM d").await, 1);
    let concluded = read(&env, &[&gid], true).await.unwrap();
    assert_eq!(decision(&concluded[0]), pb::Decision::Abort);
}

/// Holds `gid`'s commit row uncommitted on a connection of its own (as a decision branch between
/// its insert and its COMMIT), starts a concluding `ReadDecisions`, waits until that read is
/// blocked on the row's lock, then ends the holder with `end` and answers what the read said.
async fn conclude_against_an_open_commit_row(env: &Env, gid: &str, end: &str) -> pb::Decision {
    let mut holder = sqlx::PgConnection::connect(&env.db.url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "BEGIN; INSERT INTO treaty.decisions (gid, outcome, coordinator_id, participants) \
         VALUES ('{gid}', 'commit', '{}', ARRAY['s1'])",
        env.coordinator.id
    )))
    .execute(&mut holder)
    .await
    .unwrap();
    let client = env.client();
    let request = pb::ReadDecisionsRequest {
        gids: vec![gid.to_owned()],
        conclude_abort: true,
    };
    let reading = tokio::spawn(async move {
        let mut client = client;
        client.read_decisions(request).await
    });
    let db = &env.db;
    crate::support::eventually(
        "the concluding read to wait for the uncommitted commit row",
        Duration::from_secs(20),
        || async {
            db.count(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO treaty.decisions%'",
            )
            .await
                == 1
        },
    )
    .await;
    assert!(
        !reading.is_finished(),
        "the read answered while the commit row was undecided"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(end.to_owned()))
        .execute(&mut holder)
        .await
        .unwrap();
    let answer = reading.await.unwrap().unwrap().into_inner().decisions;
    assert_eq!(answer.len(), 1);
    decision(&answer[0])
}

#[tokio::test]
async fn a_concluding_read_waits_for_an_uncommitted_commit_row() {
    let _shared = SERVER.read().await;
    let Some(mut env) = Env::start("decision-waits", |_| {}).await else {
        return;
    };
    // At the database's REPEATABLE READ the waiting insert would fail with a serialization error:
    // the read must run at READ COMMITTED whatever the default.
    env.db
        .sql(&format!(
            "ALTER DATABASE {} SET default_transaction_isolation = 'repeatable read'",
            env.db.name
        ))
        .await;
    env.restart_participant(env.config()).await;

    let committed = decision_gid(&env, 1);
    assert_eq!(
        conclude_against_an_open_commit_row(&env, &committed, "COMMIT").await,
        pb::Decision::Commit
    );
    assert_eq!(outcome_row(&env, &committed).await.as_deref(), Some("commit"));

    let rolled_back = decision_gid(&env, 2);
    assert_eq!(
        conclude_against_an_open_commit_row(&env, &rolled_back, "ROLLBACK").await,
        pb::Decision::Abort
    );
    assert_eq!(outcome_row(&env, &rolled_back).await.as_deref(), Some("abort"));
}

async fn commit_batch(env: &Env, gids: &[&str]) -> Vec<pb::FinishResult> {
    env.client()
        .commit_batch(pb::FinishBatchRequest {
            gids: gids.iter().map(|s| (*s).to_owned()).collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .results
}

#[tokio::test]
async fn commit_with_nothing_prepared_is_unknown_only_for_a_gid_with_a_decision_shard() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("decision-unknown", |_| {}).await else {
        return;
    };
    kv(&env).await;
    let never = decision_gid(&env, 1);
    assert_eq!(env.commit(&never).await.unwrap(), pb::BranchState::Unknown);
    let results = commit_batch(&env, &[&never]).await;
    assert_eq!(state(results[0].state), pb::BranchState::Unknown);
    assert_eq!(results[0].error, "");

    // Prepared here, then finished behind this participant's back: the history says prepared,
    // PostgreSQL holds nothing, and no marker can be asked.
    let gone = decision_gid(&env, 2);
    insert_kv(&env, &gone, 2).await;
    assert_eq!(vote(&env.prepare(&gone).await), pb::Vote::Yes);
    env.db.sql(&format!("COMMIT PREPARED '{gone}:s0'")).await;
    assert_eq!(env.commit(&gone).await.unwrap(), pb::BranchState::Unknown);
    assert_eq!(state(env.status(&gone).await.state), pb::BranchState::Unknown);

    // A GID without a decision shard: "does not exist" is never success (as before).
    let plain = env.gid(3);
    let refused = env.commit(&plain).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{}", refused.message());
    let plain_batch = env.gid(4);
    let results = commit_batch(&env, &[&plain_batch]).await;
    assert_ne!(state(results[0].state), pb::BranchState::Unknown);
    assert_ne!(state(results[0].state), pb::BranchState::Committed);
    assert!(!results[0].error.is_empty());
}

#[tokio::test]
async fn a_branch_of_a_gid_with_a_decision_shard_prepares_without_a_marker() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("decision-no-marker", |_| {}).await else {
        return;
    };
    kv(&env).await;
    let gid = format!("{}@s9", env.gid(1));
    insert_kv(&env, &gid, 1).await;
    assert_eq!(vote(&env.prepare(&gid).await), pb::Vote::Yes);
    assert_eq!(env.db.prepared().await, [format!("{gid}:s0")]);
    assert_eq!(env.db.count("SELECT count(*) FROM treaty.branches").await, 0);
    assert_eq!(env.commit(&gid).await.unwrap(), pb::BranchState::Committed);
    assert_eq!(env.db.count("SELECT count(*) FROM kv").await, 1);
    assert_eq!(env.db.count("SELECT count(*) FROM treaty.branches").await, 0);
    // The same without a decision shard keeps its marker.
    let plain = env.gid(2);
    insert_kv(&env, &plain, 2).await;
    assert_eq!(vote(&env.prepare(&plain).await), pb::Vote::Yes);
    assert_eq!(env.commit(&plain).await.unwrap(), pb::BranchState::Committed);
    assert!(env.db.has_marker(&plain).await);
}

/// A branch prepared under another shard's name (the participant's `--shard` was renamed since)
/// is not "nothing prepared": the commit is refused, naming it, so the coordinator keeps the
/// commit row and retries instead of forgetting it and leaving that branch to be presumed aborted.
#[tokio::test]
async fn commit_finds_the_branch_prepared_under_a_former_shard_name_and_refuses() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("decision-renamed", |_| {}).await else {
        return;
    };
    kv(&env).await;
    let gid = format!("{}@s9", env.gid(1));
    let former = format!("{gid}:s_old");
    // The participant's recovery pass leaves a transaction its coordinator calls pending alone.
    env.coordinator.decide(&gid, pb::Decision::Pending, true);
    env.db
        .sql(&format!(
            "BEGIN; INSERT INTO kv VALUES (1, 'x'); PREPARE TRANSACTION '{former}'"
        ))
        .await;
    let refused = env.commit(&gid).await.unwrap_err();
    assert!(
        refused.message().contains(&former) && refused.message().contains("another shard name"),
        "{refused:?}"
    );
    assert_eq!(
        env.db.prepared().await,
        std::slice::from_ref(&former),
        "left prepared"
    );
    // Nothing of the transaction anywhere here: nothing prepared, the usual answer.
    let other = format!("{}@s9", env.gid(2));
    assert_eq!(env.commit(&other).await.unwrap(), pb::BranchState::Unknown);
}

#[tokio::test]
async fn decision_calls_refuse_gids_that_keep_their_decision_elsewhere() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("decision-invalid", |_| {}).await else {
        return;
    };
    kv(&env).await;
    let elsewhere = format!("{}@s1", env.gid(1));
    insert_kv(&env, &elsewhere, 1).await;
    let refused = commit_decision(&env, &elsewhere, &["s1"], false)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("on shard s1"), "{}", refused.message());
    assert_eq!(outcome_row(&env, &elsewhere).await, None);
    assert_eq!(state(env.status(&elsewhere).await.state), pb::BranchState::Active);

    let plain = env.gid(2);
    let refused = commit_decision(&env, &plain, &[], true).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let mine = decision_gid(&env, 3);
    let refused = read(&env, &[&mine, &elsewhere], true).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(
        outcome_row(&env, &mine).await,
        None,
        "nothing concluded for a refused call"
    );
    let refused = commit_decision(&env, &mine, &["s1", "bad name"], true)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let refused = env
        .client()
        .forget_decisions(pb::ForgetDecisionsRequest {
            gids: vec![elsewhere.clone()],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let refused = env
        .client()
        .list_decisions(pb::ListDecisionsRequest {
            coordinator: "Not An Id".into(),
            limit: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    // No open branch: NOT_FOUND, so the coordinator reads the decision instead.
    let missing = commit_decision(&env, &mine, &[], false).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{}", missing.message());
}

#[tokio::test]
async fn standalone_decisions_are_idempotent_and_lose_to_an_abort_row() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("decision-standalone", |_| {}).await else {
        return;
    };
    let gid = decision_gid(&env, 1);
    let first = commit_decision(&env, &gid, &["s1", "s2"], true).await.unwrap();
    assert!(first.committed, "{}", first.message);
    let repeat = commit_decision(&env, &gid, &["s1", "s2"], true).await.unwrap();
    assert!(
        repeat.committed,
        "a repeat finds its own commit row: {}",
        repeat.message
    );
    let read_back = read(&env, &[&gid], true).await.unwrap();
    assert_eq!(decision(&read_back[0]), pb::Decision::Commit);
    assert_eq!(read_back[0].participants, ["s1", "s2"]);

    let concluded = decision_gid(&env, 2);
    assert_eq!(
        decision(&read(&env, &[&concluded], true).await.unwrap()[0]),
        pb::Decision::Abort
    );
    let lost = commit_decision(&env, &concluded, &["s1"], true).await.unwrap();
    assert!(!lost.committed);
    assert!(lost.message.contains("concluded aborted"), "{}", lost.message);
    assert_eq!(outcome_row(&env, &concluded).await.as_deref(), Some("abort"));
}

/// The commit row's insert is on every transaction's commit path, so the table has only its key
/// (migrations/0004): no CHECK on `outcome`, whose value every read checks instead.
#[tokio::test]
async fn the_decisions_table_has_only_its_key_and_a_row_with_another_outcome_is_refused_on_read() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("decision-lean", |_| {}).await else {
        return;
    };
    assert!(read(&env, &[], false).await.unwrap().is_empty());
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes WHERE schemaname = 'treaty' AND tablename = 'decisions'",
    )
    .fetch_all(&env.db.pool)
    .await
    .unwrap();
    assert_eq!(indexes, ["decisions_pkey"]);
    let checks: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_constraint WHERE conrelid = 'treaty.decisions'::regclass AND contype = 'c'",
    )
    .fetch_one(&env.db.pool)
    .await
    .unwrap();
    assert_eq!(checks, 0);

    env.db
        .sql("INSERT INTO treaty.decisions (gid, outcome, coordinator_id) VALUES ('treaty:ca:7@s0', 'maybe', 'ca')")
        .await;
    let refused = read(&env, &["treaty:ca:7@s0"], false).await.unwrap_err();
    assert!(
        refused.message().contains("\"maybe\"") && refused.message().contains("treaty:ca:7@s0"),
        "{refused:?}"
    );
}

#[tokio::test]
async fn list_filters_by_coordinator_and_forget_deletes_commit_rows_only() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("decision-list", |_| {}).await else {
        return;
    };
    // A first call answers once the participant serves, after its migrations created the table.
    assert!(read(&env, &[], false).await.unwrap().is_empty());
    env.db
        .sql(
            "INSERT INTO treaty.decisions (gid, outcome, coordinator_id, participants, decided_at) VALUES \
             ('treaty:ca:1@s0', 'commit', 'ca', '{s1}', now() - interval '3 s'), \
             ('treaty:cb:1@s0', 'commit', 'cb', '{s1}', now() - interval '2 s'), \
             ('treaty:ca:2@s0', 'commit', 'ca', '{s2}', now() - interval '1 s'), \
             ('treaty:ca:3@s0', 'abort', 'ca', '{}', now())",
        )
        .await;
    let list = |coordinator: &str, limit: u32| {
        let mut client = env.client();
        let request = pb::ListDecisionsRequest {
            coordinator: coordinator.into(),
            limit,
        };
        async move {
            client
                .list_decisions(request)
                .await
                .unwrap()
                .into_inner()
                .decisions
                .into_iter()
                .map(|d| {
                    assert_eq!(decision(&d), pb::Decision::Commit);
                    d.gid
                })
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        list("", 0).await,
        ["treaty:ca:1@s0", "treaty:cb:1@s0", "treaty:ca:2@s0"]
    );
    assert_eq!(list("ca", 0).await, ["treaty:ca:1@s0", "treaty:ca:2@s0"]);
    assert_eq!(list("cb", 0).await, ["treaty:cb:1@s0"]);
    assert_eq!(list("", 1).await, ["treaty:ca:1@s0"]);

    let deleted = env
        .client()
        .forget_decisions(pb::ForgetDecisionsRequest {
            gids: vec![
                "treaty:ca:1@s0".into(),
                "treaty:ca:3@s0".into(),
                "treaty:cz:9@s0".into(),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .deleted;
    assert_eq!(deleted, 1, "only the commit row goes");
    assert_eq!(
        outcome_row(&env, "treaty:ca:3@s0").await.as_deref(),
        Some("abort")
    );
    assert_eq!(list("ca", 0).await, ["treaty:ca:2@s0"]);
}

#[tokio::test]
async fn recovery_and_list_prepared_read_branch_gids_that_name_a_decision_shard() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("decision-recovery", |c| {
        c.in_doubt_after_ms = 200;
        c.reconcile_interval_ms = 100;
    })
    .await
    else {
        return;
    };
    kv(&env).await;
    // Branches of transactions whose decision is kept on another shard, as s0 holds them.
    let committed = format!("{}@s9", env.gid(1));
    let aborted = format!("{}@s9", env.gid(2));
    for (gid, k) in [(&committed, 1), (&aborted, 2)] {
        insert_kv(&env, gid, k).await;
        assert_eq!(vote(&env.prepare(gid).await), pb::Vote::Yes);
    }
    let listed = env
        .client()
        .list_prepared(pb::ListPreparedRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut listed: Vec<String> = listed.branches.into_iter().map(|b| b.gid).collect();
    listed.sort();
    assert_eq!(listed, [committed.clone(), aborted.clone()]);

    env.coordinator.decide(&committed, pb::Decision::Commit, true);
    env.coordinator.decide(&aborted, pb::Decision::Abort, true);
    let db = &env.db;
    crate::support::eventually("both branches resolved", Duration::from_secs(15), || async {
        db.prepared().await.is_empty()
    })
    .await;
    let asked = env.coordinator.asked.lock().unwrap().clone();
    assert!(
        asked.contains(&committed) && asked.contains(&aborted),
        "{asked:?}"
    );
    assert_eq!(db.count("SELECT k FROM kv").await, 1);
    assert_eq!(db.count("SELECT count(*) FROM treaty.branches").await, 0);
    assert_eq!(env.commit(&committed).await.unwrap(), pb::BranchState::Committed);
}

#[tokio::test]
async fn a_decision_branch_that_lost_its_commit_answer_is_settled_by_its_abort_row() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("decision-lost-answer", |_| {}).await else {
        return;
    };
    kv(&env).await;
    let gid = decision_gid(&env, 1);
    insert_kv(&env, &gid, 1).await;
    // The branch's session dies under it (as when PostgreSQL stops): its COMMIT gets no answer.
    env.db
        .sql(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = '{}' AND application_name = 'treaty-participant' \
             AND state = 'idle in transaction'",
            env.db.name
        ))
        .await;
    let lost = commit_decision(&env, &gid, &["s1"], false).await;
    assert!(lost.is_err(), "the outcome is unknown, not an answer: {lost:?}");
    // Before any row exists, the branch cannot say which way it went.
    let refused = env.abort(&gid).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("lost the answer"),
        "{}",
        refused.message()
    );
    // A coordinator concludes abort (the abort row takes the commit row's place) and sends the
    // abort: the row proves the COMMIT did not commit, so the abort is acknowledged.
    let concluded = read(&env, &[&gid], true).await.unwrap();
    assert_eq!(decision(&concluded[0]), pb::Decision::Abort);
    assert_eq!(env.abort(&gid).await.unwrap(), pb::BranchState::Aborted);
    assert_eq!(
        env.abort(&gid).await.unwrap(),
        pb::BranchState::Aborted,
        "idempotent"
    );
    assert_eq!(state(env.status(&gid).await.state), pb::BranchState::Aborted);
    assert_eq!(env.db.count("SELECT count(*) FROM kv").await, 0);

    // The other way: the COMMIT did commit (its row is there), so the abort stays refused.
    let committed = decision_gid(&env, 2);
    insert_kv(&env, &committed, 2).await;
    assert!(
        commit_decision(&env, &committed, &["s1"], false)
            .await
            .unwrap()
            .committed
    );
    let refused = env.abort(&committed).await.unwrap_err();
    assert!(
        refused.message().contains("already committed"),
        "{}",
        refused.message()
    );
}

/// Waits for two more `Info` calls: a recovery pass that began after this call has ended.
async fn a_pass_ends(env: &Env) {
    let infos = &env.coordinator.infos;
    let seen = infos.load(std::sync::atomic::Ordering::SeqCst);
    crate::support::eventually("a recovery pass", Duration::from_secs(15), || async {
        infos.load(std::sync::atomic::Ordering::SeqCst) >= seen + 2
    })
    .await;
}

#[tokio::test]
async fn abort_rows_below_what_the_coordinator_finished_are_deleted_and_their_branches_refused() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("decision-abort-gc", |config| {
        config.reconcile_interval_ms = 100;
    })
    .await
    else {
        return;
    };
    kv(&env).await;
    // Txid 1: concluded abort with no branch here. Txid 2: concluded abort while its decision
    // branch is open (its coordinator then finished it). Txid 5: concluded abort, still open at
    // the coordinator.
    let (one, two, five) = (
        decision_gid(&env, 1),
        decision_gid(&env, 2),
        decision_gid(&env, 5),
    );
    insert_kv(&env, &two, 2).await;
    for gid in [&one, &two, &five] {
        let concluded = read(&env, &[gid.as_str()], true).await.unwrap();
        assert_eq!(decision(&concluded[0]), pb::Decision::Abort);
    }
    // While the coordinator does not say what it finished, every abort row stays.
    a_pass_ends(&env).await;
    for gid in [&one, &two, &five] {
        assert_eq!(outcome_row(&env, gid).await.as_deref(), Some("abort"), "{gid}");
    }
    assert_eq!(state(env.status(&two).await.state), pb::BranchState::Active);

    // It has finished everything below txid 4.
    env.coordinator
        .open_from
        .store(4, std::sync::atomic::Ordering::SeqCst);
    crate::support::eventually(
        "the abort rows below 4 deleted",
        Duration::from_secs(15),
        || async { outcome_row(&env, &one).await.is_none() && outcome_row(&env, &two).await.is_none() },
    )
    .await;
    assert_eq!(
        outcome_row(&env, &five).await.as_deref(),
        Some("abort"),
        "txid 5 may still try to commit: its abort row stays"
    );
    // The open branch of txid 2 was rolled back first, and nothing below 4 opens again, so no
    // late commit can meet the missing row.
    assert_eq!(state(env.status(&two).await.state), pb::BranchState::Aborted);
    let late = commit_decision(&env, &two, &["s1"], false).await;
    assert!(late.is_err(), "{late:?}");
    let three = decision_gid(&env, 3);
    let refused = env
        .execute(&three, "INSERT INTO kv (k, v) VALUES (3, 'x')", vec![])
        .await
        .unwrap_err();
    assert!(refused.message().contains("below 4"), "{}", refused.message());
    assert_eq!(outcome_row(&env, &two).await, None);
    assert_eq!(env.db.count("SELECT count(*) FROM kv").await, 0);
}
