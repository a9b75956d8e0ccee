//! Authenticated callers and roles (issue 17 items 2 and 3): a TLS cluster whose coordinator and
//! participants run with access files. A client-role caller runs transactions but may not list or
//! resolve in-doubt transactions; an operator may, and the heuristic record carries its
//! authenticated identity; a bearer token authenticates like a certificate; a participant takes
//! Prepare, Commit and Abort only from its coordinators.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use tonic::transport::Channel;
use treaty_harness::{ClusterSpec, LocalCluster, PgOptions};
use treaty_proto::pb;
use treaty_proto::pb::admin_client::AdminClient;
use treaty_proto::pb::coordinator_client::CoordinatorClient;
use treaty_proto::pb::participant_client::ParticipantClient;
use treaty_proto::tls::dev_certs::{ClientCertFiles, DevCertFiles};

use crate::fixture::*;

const WITHIN: Duration = Duration::from_secs(30);

/// A cluster where every service has an access file. The services' own certificate
/// (`treaty-server`) is the participants' caller at the coordinator and the coordinator's caller at
/// the participants; `e2e-client` is a client (and arms failpoints); `ops-olivia` an operator;
/// `stranger` is signed by the same CA but named nowhere; `token:batch` a client by bearer token.
struct Secured {
    t: TestCluster,
    files: DevCertFiles,
    ops: ClientCertFiles,
    stranger: ClientCertFiles,
    token: String,
}

async fn secured_cluster() -> Result<Secured> {
    let dir = tempfile::Builder::new().prefix("treaty-e2e-").tempdir()?;
    let (files, [ops, stranger]) = tls_certs(&dir.path().join("certs"), ["ops-olivia", "stranger"])?;
    let token = treaty_proto::auth::new_token().map_err(|_| anyhow::anyhow!("random source"))?;
    let access = AccessFiles::write(
        dir.path(),
        &format!(
            r#"
[[caller]]
certificate = "ops-olivia"
roles = ["operator"]

[[caller]]
name = "batch"
token_sha256 = "{}"
roles = ["client"]
"#,
            treaty_proto::auth::token_sha256_hex(&token)
        ),
        r#"
[[caller]]
certificate = "e2e-client"
roles = ["admin"]
"#,
    )?;
    let path = |p: &Path| p.display().to_string();
    let spec = ClusterSpec {
        shards: 2,
        base_dir: dir.path().to_path_buf(),
        pg: PgOptions {
            fsync: false,
            ..PgOptions::default()
        },
        // A vote that never arrives keeps the transaction in doubt until the operator decides;
        // the file store makes that decision the operator's heuristic record.
        coordinator_args: vec![
            "--access-file".into(),
            path(&access.coordinator),
            "--vote-timeout-ms".into(),
            "600000".into(),
            "--lock-timeout-ms".into(),
            "2000".into(),
            "--decision-store".into(),
            "file".into(),
        ],
        participant_args: vec![
            "--access-file".into(),
            path(&access.participant),
            "--in-doubt-after-ms".into(),
            "500".into(),
            "--reconcile-interval-ms".into(),
            "200".into(),
        ],
        database: DATABASE.into(),
        coordinator_port: 0,
        in_process: false,
        tls: Some(files.clone()),
    };
    let cluster = LocalCluster::start(spec)
        .await
        .context("starting the secured cluster")?;
    let t = TestCluster { cluster, dir };
    for shard in 0..2 {
        t.sql(shard, "CREATE TABLE kv (k bigint PRIMARY KEY, v text NOT NULL)")
            .await?;
    }
    Ok(Secured {
        t,
        files,
        ops,
        stranger,
        token,
    })
}

impl Secured {
    /// A channel to `url` presenting `identity` (certificate and key), or no certificate.
    async fn channel(&self, url: &str, identity: Option<(&Path, &Path)>) -> Result<Channel> {
        tls_channel(&self.files, url, identity).await
    }

    async fn coordinator_as(&self, who: &ClientCertFiles) -> Result<CoordinatorClient<Channel>> {
        let url = self.t.cluster.coordinator_endpoint();
        Ok(CoordinatorClient::new(
            self.channel(&url, Some((&who.cert, &who.key))).await?,
        ))
    }
}

fn denied(result: Result<impl std::fmt::Debug, tonic::Status>, needs: &str) -> Result<()> {
    let status = match result {
        Ok(answer) => anyhow::bail!("expected PERMISSION_DENIED, got {answer:?}"),
        Err(status) => status,
    };
    anyhow::ensure!(
        status.code() == tonic::Code::PermissionDenied && status.message().contains(needs),
        "expected PERMISSION_DENIED naming {needs:?}, got {status:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_client_role_may_not_resolve_and_an_operator_resolves_under_its_authenticated_identity()
-> Result<()> {
    let s = secured_cluster().await?;
    let (s0, s1) = (s.t.shard(0), s.t.shard(1));

    // The client (its certificate) commits across both shards: the coordinator's links to the
    // participants pass their access check as `treaty-server`, the coordinator role.
    let mut client = s.t.client().await?;
    let response = client
        .submit(submit(vec![insert(&s0, 1, "a"), insert(&s1, 1, "b")]))
        .await?
        .into_inner();
    assert!(committed(&response.outcome), "{response:?}");

    // ... but may not look at or decide in-doubt transactions.
    denied(
        client.list_in_doubt(pb::ListInDoubtRequest::default()).await,
        "needs the operator role; cert:e2e-client has the roles: client",
    )?;
    let resolve = |txid, operator: &str| pb::ResolveRequest {
        txid,
        commit: false,
        reason: "ops ticket 9".into(),
        operator: operator.into(),
    };
    denied(client.resolve(resolve(1, "")).await, "operator role")?;

    // The operator may list, but not run transactions.
    let mut operator = s.coordinator_as(&s.ops).await?;
    operator.list_in_doubt(pb::ListInDoubtRequest::default()).await?;
    denied(
        operator.begin(pb::BeginRequest::default()).await,
        "needs the client role; cert:ops-olivia",
    )?;

    // A certificate of the same CA that the access file does not name; no certificate at all.
    let mut stranger = s.coordinator_as(&s.stranger).await?;
    denied(
        stranger.submit(submit(vec![insert(&s0, 2, "stranger")])).await,
        "certificate \"stranger\" is not a caller",
    )?;
    let url = s.t.cluster.coordinator_endpoint();
    let mut anonymous = CoordinatorClient::new(s.channel(&url, None).await?);
    let status = anonymous
        .submit(submit(vec![insert(&s0, 2, "anonymous")]))
        .await
        .expect_err("a call without credentials is refused");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert_eq!(
        s.t.kv(0).await?,
        vec![(1, "a".to_owned())],
        "nothing refused was applied"
    );

    // A bearer token authenticates as `token:batch` (a client), over TLS without a certificate;
    // a wrong one is refused.
    let tls = || -> Result<treaty_client::ClientTlsConfig> {
        Ok(treaty_client::ClientTlsConfig::new()
            .ca_certificate(treaty_client::Certificate::from_pem(std::fs::read(&s.files.ca)?)))
    };
    let batch = treaty_client::Client::builder()
        .tls(tls()?)
        .bearer_token(&s.token)?
        .connect([url.clone()])
        .await?;
    let response = batch
        .submit(submit(vec![insert(&s0, 3, "token"), insert(&s1, 3, "token")]))
        .await?;
    assert!(committed(&response.outcome), "{response:?}");
    let forged = treaty_client::Client::builder()
        .tls(tls()?)
        .bearer_token("trt_not-the-token")?
        .connect([url.clone()])
        .await?;
    let refused = forged
        .submit(submit(vec![insert(&s0, 4, "forged")]))
        .await
        .expect_err("a wrong token is refused")
        .to_string();
    assert!(
        refused.contains("Unauthenticated") || refused.contains("bearer token"),
        "{refused}"
    );
    assert_eq!(s.t.kv(0).await?.len(), 2, "the forged call applied nothing");

    // An in-doubt transaction: shard 1 prepares but its vote never arrives.
    let participant = s.t.cluster.participants[1].endpoint();
    let mut admin = AdminClient::new(
        s.channel(&participant, Some((&s.files.client_cert, &s.files.client_key)))
            .await?,
    );
    admin
        .set_failpoint(pb::SetFailpointRequest {
            name: "participant::before-prepare-reply".into(),
            actions: "pause".into(),
        })
        .await?;
    let txid = begin(&mut client).await?;
    for shard in [&s0, &s1] {
        execute(
            &mut client,
            txid,
            shard,
            "INSERT INTO kv (k, v) VALUES ($1, $2)",
            vec![int(10), text("in doubt")],
        )
        .await?;
    }
    let mut committer = client.clone();
    let commit = tokio::spawn(async move {
        committer
            .commit(pb::CommitRequest {
                txid,
                wait_for_apply: false,
            })
            .await
    });
    eventually(
        "both branches prepared and listed to the operator",
        WITHIN,
        || {
            let mut operator = operator.clone();
            async move {
                let listed = operator
                    .list_in_doubt(pb::ListInDoubtRequest::default())
                    .await?
                    .into_inner();
                Ok(listed.branches.iter().filter(|b| b.txid == txid).count() == 2)
            }
        },
    )
    .await?;

    // The record is the authenticated identity's: a different typed name is refused.
    denied(
        operator.resolve(resolve(txid, "somebody-else")).await,
        "you are authenticated as cert:ops-olivia",
    )?;
    let resolved = operator.resolve(resolve(txid, "")).await?.into_inner();
    assert!(resolved.recorded && resolved.decision == "ABORT", "{resolved:?}");
    let outcome = commit.await??.into_inner();
    assert_eq!(outcome.kind, pb::OutcomeKind::Aborted as i32, "{outcome:?}");
    admin.clear_failpoints(pb::ClearFailpointsRequest {}).await?;
    eventually("nothing prepared anywhere", WITHIN, || async {
        Ok(s.t.prepared_everywhere().await? == 0)
    })
    .await?;

    // `treaty txn`, run as the operator, shows who decided: the certificate's identity.
    let path = |p: &Path| p.display().to_string();
    let output = tokio::process::Command::new(treaty_harness::binary_path("treaty")?)
        .args(["txn", &txid.to_string(), "--json", "--coordinator", &url])
        .args(["--tls-ca", &path(&s.files.ca)])
        .args(["--tls-cert", &path(&s.ops.cert), "--tls-key", &path(&s.ops.key)])
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let shown: serde_json::Value = serde_json::from_str(&stdout).with_context(|| stdout.to_string())?;
    let text = shown.to_string();
    assert!(
        text.contains("\"operator\":\"cert:ops-olivia\"") && text.contains("ops ticket 9"),
        "the heuristic record names the authenticated operator: {text}"
    );
    Ok(())
}

#[tokio::test]
async fn a_participant_refuses_prepare_commit_and_abort_from_an_identity_that_is_not_its_coordinator()
-> Result<()> {
    let s = secured_cluster().await?;
    let participant = s.t.cluster.participants[0].endpoint();
    let gid = "treaty:forged:1".to_owned();
    // `e2e-client` is a caller here (it arms failpoints) but not a coordinator: each call names
    // the role it needs.
    let mut forged = ParticipantClient::new(
        s.channel(&participant, Some((&s.files.client_cert, &s.files.client_key)))
            .await?,
    );
    denied(
        forged
            .prepare(pb::PrepareRequest {
                gid: gid.clone(),
                ..Default::default()
            })
            .await,
        "needs the coordinator role; cert:e2e-client has the roles: admin",
    )?;
    denied(
        forged.commit(pb::FinishRequest { gid: gid.clone() }).await,
        "needs one of the roles coordinator, peer",
    )?;
    denied(
        forged.abort(pb::FinishRequest { gid: gid.clone() }).await,
        "needs one of the roles coordinator, peer",
    )?;
    denied(
        forged
            .execute(pb::BranchExecuteRequest {
                gid: gid.clone(),
                sql: "INSERT INTO kv VALUES (1, 'forged')".into(),
                ..Default::default()
            })
            .await,
        "needs the coordinator role",
    )?;
    // The coordinator's operator, a valid certificate of the same CA, is not named here at all.
    let mut operator =
        ParticipantClient::new(s.channel(&participant, Some((&s.ops.cert, &s.ops.key))).await?);
    denied(
        operator.commit(pb::FinishRequest { gid: gid.clone() }).await,
        "certificate \"ops-olivia\" is not a caller",
    )?;
    let mut stranger = ParticipantClient::new(
        s.channel(&participant, Some((&s.stranger.cert, &s.stranger.key)))
            .await?,
    );
    denied(
        stranger.commit(pb::FinishRequest { gid: gid.clone() }).await,
        "is not a caller",
    )?;
    assert!(s.t.kv(0).await?.is_empty(), "no forged call ran");

    // The coordinator, whose links present `treaty-server`, still drives the same participant.
    let mut client = s.t.client().await?;
    let (s0, s1) = (s.t.shard(0), s.t.shard(1));
    let response = client
        .submit(submit(vec![insert(&s0, 1, "a"), insert(&s1, 1, "b")]))
        .await?
        .into_inner();
    assert!(committed(&response.outcome), "{response:?}");
    Ok(())
}

/// Each service's TLS start-up line says what its handshake asks of a client: the coordinator's
/// access file takes a bearer token too, so a certificate is optional there; the participants'
/// names callers by certificate only, so one is required.
#[tokio::test]
async fn the_tls_start_up_line_says_whether_a_client_certificate_is_required_or_optional() -> Result<()> {
    let s = secured_cluster().await?;
    let logs = s.t.dir.path().join("logs");
    let participant_log = format!("participant-{}.log", s.t.shard(0));
    for (log, asked) in [
        ("coordinator.log", "optional"),
        (participant_log.as_str(), "required"),
    ] {
        let path = logs.join(log);
        // The participant logs the line once it is serving, which may be after the cluster started.
        eventually(
            &format!("{log} to say client certificates are {asked}"),
            WITHIN,
            || {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                async move {
                    Ok(text
                        .lines()
                        .any(|line| line.contains("serving TLS only") && line.contains(asked)))
                }
            },
        )
        .await?;
    }
    Ok(())
}
