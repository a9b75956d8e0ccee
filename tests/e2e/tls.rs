//! TLS on every link (issue 17): a cluster whose coordinator and participants serve TLS only and
//! require client certificates of the cluster's CA, with https:// between all of them.

use anyhow::{Context, Result};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use treaty_proto::pb::coordinator_client::CoordinatorClient;
use treaty_proto::tls::dev_certs::{DevCertFiles, write_dev_certs};

use crate::fixture::*;

async fn tls_cluster() -> Result<(TestCluster, tempfile::TempDir, DevCertFiles)> {
    let dir = tempfile::tempdir()?;
    let files = write_dev_certs(dir.path(), "e2e-client")?;
    let t = TestCluster::start(Options {
        tls: Some(files.clone()),
        ..Options::default()
    })
    .await?;
    Ok((t, dir, files))
}

fn client_tls(
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<ClientTlsConfig> {
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca)?))
        .identity(Identity::from_pem(std::fs::read(cert)?, std::fs::read(key)?)))
}

#[tokio::test]
async fn over_tls_a_client_certificate_of_the_ca_commits_and_plaintext_or_another_ca_is_refused() -> Result<()>
{
    let (t, dir, files) = tls_cluster().await?;
    let endpoint = t.cluster.coordinator_endpoint();
    assert!(endpoint.starts_with("https://"), "{endpoint}");

    // A valid client certificate: a cross-shard transaction commits on every shard, over TLS
    // from the client to the coordinator and from the coordinator to each participant.
    let mut client = t.client().await?;
    let (s0, s1) = (t.shard(0), t.shard(1));
    let response = client
        .submit(submit(vec![insert(&s0, 1, "a"), insert(&s1, 1, "b")]))
        .await?
        .into_inner();
    assert!(committed(&response.outcome), "{response:?}");
    assert_eq!(t.kv(0).await?, vec![(1, "a".to_owned())]);
    assert_eq!(t.kv(1).await?, vec![(1, "b".to_owned())]);

    // Plaintext to the TLS port: no call gets through, and the coordinator says why.
    let plain = endpoint.replacen("https://", "http://", 1);
    let refused = match Endpoint::from_shared(plain.clone())?.connect().await {
        Err(error) => format!("{error:?}"),
        Ok(channel) => {
            let status = CoordinatorClient::new(channel)
                .submit(submit(vec![insert(&s0, 2, "plain")]))
                .await
                .expect_err("a plaintext call must fail");
            format!("{status:?}")
        }
    };
    eventually(
        "the coordinator logs the refused plaintext client",
        std::time::Duration::from_secs(10),
        || async {
            Ok(t.coordinator_log().contains("TLS handshake refused")
                && t.coordinator_log().contains("plaintext client"))
        },
    )
    .await
    .with_context(|| format!("client saw: {refused}"))?;

    // A certificate from another CA (the client trusts the server, the server does not trust it).
    let other = write_dev_certs(&dir.path().join("other"), "mallory")?;
    let foreign = client_tls(&files.ca, &other.client_cert, &other.client_key)?;
    let outcome = match Endpoint::from_shared(endpoint.clone())?
        .tls_config(foreign)?
        .connect()
        .await
    {
        Err(error) => Err(format!("{error:?}")),
        Ok(channel) => CoordinatorClient::new(channel)
            .submit(submit(vec![insert(&s0, 3, "foreign")]))
            .await
            .map(|_| ())
            .map_err(|status| format!("{status:?}")),
    };
    assert!(
        outcome.is_err(),
        "a client certificate from another CA must be refused"
    );

    // No certificate at all.
    let anonymous = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(&files.ca)?));
    let outcome = match Endpoint::from_shared(endpoint.clone())?
        .tls_config(anonymous)?
        .connect()
        .await
    {
        Err(error) => Err(format!("{error:?}")),
        Ok(channel) => CoordinatorClient::new(channel)
            .submit(submit(vec![insert(&s0, 4, "anonymous")]))
            .await
            .map(|_| ())
            .map_err(|status| format!("{status:?}")),
    };
    assert!(outcome.is_err(), "a client without a certificate must be refused");

    // Nothing the refused clients sent was carried out.
    assert_eq!(t.kv(0).await?, vec![(1, "a".to_owned())]);
    eventually(
        "the refusals are logged with their reasons",
        std::time::Duration::from_secs(10),
        || async {
            let log = t.coordinator_log();
            Ok(log.contains("not signed by --tls-client-ca")
                || log.contains("UnknownIssuer")
                || log.contains("BadSignature"))
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn the_cli_commits_over_tls_with_its_certificate_flags() -> Result<()> {
    let (t, dir, files) = tls_cluster().await?;
    let ops = dir.path().join("ops.json");
    let (s0, s1) = (t.shard(0), t.shard(1));
    std::fs::write(
        &ops,
        format!(
            r#"{{"ops": [{{"shard": "{s0}", "sql": "INSERT INTO kv VALUES (7, 'cli')"}}, {{"shard": "{s1}", "sql": "INSERT INTO kv VALUES (7, 'cli')"}}]}}"#
        ),
    )?;
    let run = |extra: &[&str]| -> Result<std::process::Output> {
        let mut command = std::process::Command::new(treaty_harness::binary_path("treaty")?);
        command
            .args(["submit", "--coordinator", &t.cluster.coordinator_endpoint()])
            .args(extra)
            .arg(&ops);
        Ok(command.output()?)
    };
    let path = |p: &std::path::Path| p.display().to_string();
    let without = run(&[])?;
    assert!(!without.status.success(), "https:// without --tls-ca must fail");
    let stderr = String::from_utf8_lossy(&without.stderr);
    assert!(
        stderr.contains("--tls-ca"),
        "the error names the missing flag: {stderr}"
    );
    assert_eq!(t.kv(0).await?, vec![], "nothing was sent");

    let with = run(&[
        "--tls-ca",
        &path(&files.ca),
        "--tls-cert",
        &path(&files.client_cert),
        "--tls-key",
        &path(&files.client_key),
    ])?;
    assert!(
        with.status.success(),
        "{}{}",
        String::from_utf8_lossy(&with.stdout),
        String::from_utf8_lossy(&with.stderr)
    );
    assert_eq!(t.kv(0).await?, vec![(7, "cli".to_owned())]);
    assert_eq!(t.kv(1).await?, vec![(7, "cli".to_owned())]);
    Ok(())
}

#[tokio::test]
async fn the_demo_reaches_an_ok_verdict_over_tls() -> Result<()> {
    let (verdict, dir) = run_demo(&["--tls"]).await?;
    assert_eq!(verdict["tls"], true, "{verdict}");
    // Every process served TLS only.
    let logs = dir.path().join("logs");
    for log in ["coordinator.log", "participant-s0.log", "participant-s1.log"] {
        let text = std::fs::read_to_string(logs.join(log))?;
        assert!(
            text.contains("serving TLS only"),
            "{log} does not say it served TLS"
        );
    }
    Ok(())
}

#[tokio::test]
async fn shards_whose_postgres_accepts_only_hostssl_connections_work() -> Result<()> {
    use sqlx::Connection;
    let dir = tempfile::tempdir()?;
    let files = write_dev_certs(dir.path(), "unused")?;
    let t = TestCluster::start(Options {
        pg_ssl_only: Some(files.clone()),
        ..Options::default()
    })
    .await?;
    let url = t.cluster.pgs[0].url(DATABASE);
    assert!(url.contains("sslmode=verify-full"), "{url}");

    let mut client = t.client().await?;
    let (s0, s1) = (t.shard(0), t.shard(1));
    let response = client
        .submit(submit(vec![insert(&s0, 1, "a"), insert(&s1, 1, "b")]))
        .await?
        .into_inner();
    assert!(committed(&response.outcome), "{response:?}");
    assert_eq!(t.kv(0).await?, vec![(1, "a".to_owned())]);
    assert_eq!(t.kv(1).await?, vec![(1, "b".to_owned())]);

    // Plaintext is refused by the server.
    let port = t.cluster.pgs[0].port();
    let plain = format!("postgres://postgres@127.0.0.1:{port}/{DATABASE}?sslmode=disable");
    let error = sqlx::PgConnection::connect(&plain)
        .await
        .err()
        .context("a plaintext connection must be refused")?;
    assert!(error.to_string().contains("no encryption"), "{error}");

    // Every connection the participant holds to its database is encrypted.
    let mut conn = t.cluster.pgs[0].connect(DATABASE).await?;
    let (encrypted, plaintext): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
         FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.datname = $1 AND a.pid <> pg_backend_pid()",
    )
    .bind(DATABASE)
    .fetch_one(&mut conn)
    .await?;
    assert!(encrypted > 0, "the participant's connections are TLS");
    assert_eq!(plaintext, 0);
    Ok(())
}
