//! Per-client database roles and clean pooled connections (issue 17 items 4 and 5): a client whose
//! access-file entry maps it to a PostgreSQL role runs its statements under that role on every
//! shard, so GRANTs decide (42501, and the whole transaction aborts); a role set inside a function
//! body never reaches the next branch of a client under another role on the same pooled
//! connection, and a session-level advisory lock taken inside one is released within about a
//! second.
//!
//! Each participant agent pools a single connection (`--max-connections 1`), so "the next branch"
//! runs on the connection the last one used unless that one was closed; the backend's pid says
//! which. A shard driven inside the coordinator takes the same options over its in-process link.

use std::path::Path;

use anyhow::{Context, Result, bail};
use tonic::transport::Channel;
use treaty_proto::pb;
use treaty_proto::pb::coordinator_client::CoordinatorClient;
use treaty_proto::tls::dev_certs::{ClientCertFiles, DevCertFiles};

use crate::fixture::*;

/// A TLS cluster whose coordinator maps `alice` to `app_alice` (may read `kv`) and `bob` to
/// `app_bob` (may read and write it); `e2e-client`, the harness's own client certificate, is a
/// client without a database role (it runs as the participant's own role). `app_alice` and
/// `app_bob` exist on every shard, each participant's login role a member of both.
struct Mapped {
    t: TestCluster,
    files: DevCertFiles,
    alice: ClientCertFiles,
    bob: ClientCertFiles,
    _certs: tempfile::TempDir,
}

async fn mapped_cluster(in_process: bool) -> Result<Mapped> {
    let certs = tempfile::Builder::new().prefix("treaty-e2e-roles-").tempdir()?;
    let (files, [alice, bob]) = tls_certs(certs.path(), ["alice", "bob"])?;
    let access = AccessFiles::write(
        certs.path(),
        r#"
[[caller]]
certificate = "alice"
roles = ["client"]
database_role = "app_alice"

[[caller]]
certificate = "bob"
roles = ["client"]
database_role = "app_bob"
"#,
        "",
    )?;
    let path = |p: &Path| p.display().to_string();
    let t = TestCluster::start(Options {
        coordinator_args: vec!["--access-file".into(), path(&access.coordinator)],
        participant_args: vec![
            "--access-file".into(),
            path(&access.participant),
            "--max-connections".into(),
            "1".into(),
        ],
        in_process,
        tls: Some(files.clone()),
        ..Options::default()
    })
    .await?;
    for shard in 0..3 {
        t.sql(
            shard,
            "CREATE ROLE app_alice NOLOGIN; CREATE ROLE app_bob NOLOGIN; \
             GRANT app_alice, app_bob TO CURRENT_USER; \
             GRANT SELECT ON kv TO app_alice, app_bob; GRANT INSERT, UPDATE ON kv TO app_bob; \
             INSERT INTO kv VALUES (1, 'before')",
        )
        .await?;
    }
    Ok(Mapped {
        t,
        files,
        alice,
        bob,
        _certs: certs,
    })
}

impl Mapped {
    /// A coordinator client presenting `who`'s certificate.
    async fn client_as(&self, who: &ClientCertFiles) -> Result<CoordinatorClient<Channel>> {
        let url = self.t.cluster.coordinator_endpoint();
        Ok(CoordinatorClient::new(
            tls_channel(&self.files, &url, Some((&who.cert, &who.key))).await?,
        ))
    }
}

/// `current_user` and the backend's pid on `shard`, read by `client` in a one-shot transaction.
async fn whoami(client: &mut CoordinatorClient<Channel>, shard: &str) -> Result<(String, i64)> {
    let response = client
        .submit(submit(vec![pb::Op {
            shard: shard.into(),
            sql: "SELECT current_user::text, pg_backend_pid()::bigint".into(),
            params: Vec::new(),
            expect_rows: None,
        }]))
        .await?
        .into_inner();
    anyhow::ensure!(committed(&response.outcome), "{response:?}");
    let values = response
        .results
        .first()
        .and_then(|result| result.rows.first())
        .map(|row| row.values.clone())
        .context("no row")?;
    match (
        values.first().and_then(|v| v.kind.clone()),
        values.get(1).and_then(|v| v.kind.clone()),
    ) {
        (Some(pb::value::Kind::Text(user)), Some(pb::value::Kind::Int64(pid))) => Ok((user, pid)),
        other => bail!("unexpected row {other:?}"),
    }
}

/// The participant's own login role on a shard (the harness connects it as `postgres`).
const PARTICIPANT_ROLE: &str = "postgres";

/// One statement in a one-shot transaction; committed or not.
async fn run(client: &mut CoordinatorClient<Channel>, shard: &str, sql: &str) -> Result<pb::SubmitResponse> {
    Ok(client
        .submit(submit(vec![pb::Op {
            shard: shard.into(),
            sql: sql.into(),
            params: Vec::new(),
            expect_rows: None,
        }]))
        .await?
        .into_inner())
}

/// Session-level advisory locks on `key` held by anyone on `shard`'s server.
async fn advisory_locks(t: &TestCluster, shard: usize, key: i64) -> Result<i64> {
    t.count(
        shard,
        &format!("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = {key}"),
    )
    .await
}

#[tokio::test]
async fn a_mapped_client_without_update_gets_42501_and_the_next_branch_runs_as_the_participant() -> Result<()>
{
    let m = mapped_cluster(false).await?;
    let (s0, s1) = (m.t.shard(0), m.t.shard(1));
    let mut alice = m.client_as(&m.alice).await?;
    let mut unmapped = m.t.client().await?;

    // Alice's statements run under app_alice on every shard.
    let (user, pid) = whoami(&mut alice, &s0).await?;
    assert_eq!(user, "app_alice");
    assert_eq!(whoami(&mut alice, &s1).await?.0, "app_alice");

    // She may read but not update: permission denied from the first UPDATE, after her other
    // shard already has a branch; the transaction aborts on every shard.
    let txid = begin(&mut alice).await?;
    execute(&mut alice, txid, &s1, "SELECT count(*) FROM kv", vec![]).await?;
    let refused = execute(
        &mut alice,
        txid,
        &s0,
        "UPDATE kv SET v = 'alice' WHERE k = 1",
        vec![],
    )
    .await
    .expect_err("app_alice has no UPDATE on kv");
    assert_eq!(
        refused
            .metadata()
            .get("treaty-sqlstate")
            .and_then(|v| v.to_str().ok()),
        Some("42501"),
        "{refused:?}"
    );
    assert!(refused.message().contains("permission denied"), "{refused:?}");
    let outcome = alice
        .commit(pb::CommitRequest {
            txid,
            wait_for_apply: true,
        })
        .await;
    let aborted = match outcome {
        Ok(outcome) => outcome.into_inner().kind == pb::OutcomeKind::Aborted as i32,
        Err(status) => {
            status.code() == tonic::Code::Aborted || status.code() == tonic::Code::FailedPrecondition
        }
    };
    assert!(aborted, "the transaction must not commit");
    assert_eq!(m.t.prepared_everywhere().await?, 0);
    for shard in 0..3 {
        assert_eq!(m.t.kv(shard).await?, vec![(1, "before".to_owned())]);
    }

    // The next branch on that pooled connection (the only one) is the participant's own again.
    assert_eq!(
        whoami(&mut unmapped, &s0).await?,
        (PARTICIPANT_ROLE.to_owned(), pid)
    );

    // Bob may update: a cross-shard transaction under app_bob commits (its marker rows are
    // written under the participant's role, which app_bob could not), and GRANTs are per client.
    let mut bob = m.client_as(&m.bob).await?;
    let response = bob
        .submit(submit(vec![
            pb::Op {
                shard: s0.clone(),
                sql: "UPDATE kv SET v = 'bob' WHERE k = 1".into(),
                params: Vec::new(),
                expect_rows: Some(1),
            },
            pb::Op {
                shard: s1.clone(),
                sql: "UPDATE kv SET v = 'bob' WHERE k = 1".into(),
                params: Vec::new(),
                expect_rows: Some(1),
            },
        ]))
        .await?
        .into_inner();
    assert!(committed(&response.outcome), "{response:?}");
    assert_eq!(m.t.kv(0).await?, vec![(1, "bob".to_owned())]);
    assert_eq!(m.t.kv(1).await?, vec![(1, "bob".to_owned())]);
    assert_eq!(m.t.prepared_everywhere().await?, 0);
    assert_eq!(whoami(&mut bob, &s0).await?, ("app_bob".to_owned(), pid));
    assert_eq!(
        whoami(&mut unmapped, &s0).await?,
        (PARTICIPANT_ROLE.to_owned(), pid)
    );
    Ok(())
}

#[tokio::test]
async fn a_role_set_inside_a_function_body_does_not_reach_the_next_client() -> Result<()> {
    let m = mapped_cluster(false).await?;
    let s0 = m.t.shard(0);
    let mut unmapped = m.t.client().await?;
    let mut bob = m.client_as(&m.bob).await?;
    let (_, before) = whoami(&mut unmapped, &s0).await?;

    // As an outside client did: a function created and called through Submit, whose body leaves
    // the session under app_alice (the SQL guard cannot see inside a function's body).
    let created = run(
        &mut unmapped,
        &s0,
        "CREATE FUNCTION become_alice() RETURNS text LANGUAGE sql \
         AS $$ SELECT set_config('role', 'app_alice', false) $$",
    )
    .await?;
    assert!(committed(&created.outcome), "{created:?}");
    let called = run(&mut unmapped, &s0, "SELECT become_alice()").await?;
    assert!(committed(&called.outcome), "{called:?}");

    // The connection was closed rather than pooled: the next branches, of other clients, run on
    // a fresh one, each as its own role, and Bob's updates all succeed.
    let (user, after) = whoami(&mut bob, &s0).await?;
    assert_eq!(user, "app_bob");
    assert_ne!(after, before, "the changed connection was closed");
    for n in 0..10 {
        let response = bob
            .submit(submit(vec![pb::Op {
                shard: s0.clone(),
                sql: format!("UPDATE kv SET v = 'bob {n}' WHERE k = 1"),
                params: Vec::new(),
                expect_rows: Some(1),
            }]))
            .await?
            .into_inner();
        assert!(committed(&response.outcome), "update {n}: {response:?}");
    }
    assert_eq!(
        whoami(&mut unmapped, &s0).await?,
        (PARTICIPANT_ROLE.to_owned(), after)
    );
    eventually(
        "the participant logs why it closed the connection",
        std::time::Duration::from_secs(10),
        || async {
            let log =
                std::fs::read_to_string(m.t.dir.path().join("logs").join(format!("participant-{s0}.log")))
                    .unwrap_or_default();
            Ok(log.contains("its session changed") && log.contains("app_alice"))
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_session_advisory_lock_is_not_held_after_its_branch() -> Result<()> {
    let m = mapped_cluster(false).await?;
    let s0 = m.t.shard(0);
    let mut unmapped = m.t.client().await?;
    let mut alice = m.client_as(&m.alice).await?;

    // As an outside client did: the call fails on its void result, after taking the lock.
    let _ = run(&mut unmapped, &s0, "SELECT pg_advisory_lock(42)").await;
    assert_eq!(advisory_locks(&m.t, 0, 42).await?, 0, "no backend holds lock 42");
    let (user, pid) = whoami(&mut alice, &s0).await?;
    assert_eq!(user, "app_alice");

    // Taken inside a function's body, where the SQL guard cannot see it: released by the
    // session check within about a second (the idle sweep checks a connection a branch left,
    // unused), and the connection (clean otherwise) serves the next client.
    let created = run(
        &mut unmapped,
        &s0,
        "CREATE FUNCTION take_lock() RETURNS int LANGUAGE plpgsql \
         AS $$ BEGIN PERFORM pg_advisory_lock(43); RETURN 1; END $$",
    )
    .await?;
    assert!(committed(&created.outcome), "{created:?}");
    let called = run(&mut alice, &s0, "SELECT take_lock()").await?;
    assert!(committed(&called.outcome), "{called:?}");
    eventually(
        "no backend holds lock 43",
        std::time::Duration::from_secs(10),
        || async { Ok(advisory_locks(&m.t, 0, 43).await? == 0) },
    )
    .await?;
    let response = unmapped
        .submit(submit(vec![insert(&s0, 2, "after")]))
        .await?
        .into_inner();
    assert!(committed(&response.outcome), "{response:?}");
    assert_eq!(
        whoami(&mut unmapped, &s0).await?,
        (PARTICIPANT_ROLE.to_owned(), pid)
    );
    Ok(())
}

#[tokio::test]
async fn a_shard_driven_in_process_runs_a_mapped_client_under_its_role() -> Result<()> {
    let m = mapped_cluster(true).await?;
    let s0 = m.t.shard(0);
    let mut alice = m.client_as(&m.alice).await?;
    assert_eq!(whoami(&mut alice, &s0).await?.0, "app_alice");
    let refused = run(&mut alice, &s0, "UPDATE kv SET v = 'alice' WHERE k = 1").await;
    match refused {
        Err(error) => assert!(error.to_string().contains("permission denied"), "{error:#}"),
        Ok(response) => assert!(!committed(&response.outcome), "{response:?}"),
    }
    let mut unmapped = m.t.client().await?;
    assert_eq!(whoami(&mut unmapped, &s0).await?.0, PARTICIPANT_ROLE);
    assert_eq!(m.t.kv(0).await?, vec![(1, "before".to_owned())]);
    Ok(())
}
