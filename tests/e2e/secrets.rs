//! Secrets: a PostgreSQL role that needs a password (scram-sha-256 for it alone in `pg_hba.conf`;
//! everything else stays trust on loopback). A cross-shard transaction commits over participants
//! that get their URL from a private file, from the environment, or only their password from a
//! private passfile, and over a shard driven in the coordinator with `?password=` in its URL; no
//! password shows on a command line, in a log, a client's error, `treaty` output or the data
//! directory. A file others may read is refused, naming it; a wrong password fails the start with
//! an error that does not show it; a coordinator whose decision database URL carries
//! `?password=` never writes it to its log or its data directory.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tempfile::TempDir;
use treaty_harness::{PgCluster, PgOptions, ServiceProcess, ServiceSpec, binary_path, free_loopback_port};

const ROLE: &str = "treaty_app";
const PASSWORD: &str = "Tr3aty-e2e-S3cret";
const WRONG_PASSWORD: &str = "Wr0ng-e2e-Guess";
const SHARD_DATABASES: [&str; 4] = ["by_file", "by_env", "by_passfile", "by_query"];
const DATABASES: [&str; 5] = ["by_file", "by_env", "by_passfile", "by_query", "decisions"];

/// A PostgreSQL server where `ROLE` owns `DATABASES` and must give its password over TCP.
async fn secured_server() -> Result<(TempDir, PgCluster)> {
    let dir = tempfile::Builder::new().prefix("treaty-e2e-secrets-").tempdir()?;
    let pg = PgCluster::start(
        dir.path(),
        "secured",
        &PgOptions {
            fsync: false,
            ..PgOptions::default()
        },
    )
    .await?;
    let mut conn = pg.connect("postgres").await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET password_encryption = 'scram-sha-256'; CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'"
    )))
    .execute(&mut conn)
    .await?;
    for database in DATABASES {
        pg.create_database(database).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE {database} OWNER TO {ROLE}"
        )))
        .execute(&mut conn)
        .await?;
    }
    // First match wins: this line, ahead of the harness's trust lines, applies to ROLE alone.
    let hba = pg.data_dir().join("pg_hba.conf");
    let rules = std::fs::read_to_string(&hba)?;
    std::fs::write(
        &hba,
        format!("host all {ROLE} 127.0.0.1/32 scram-sha-256\n{rules}"),
    )?;
    sqlx::query("SELECT pg_reload_conf()").execute(&mut conn).await?;
    // The role really needs its password now.
    let mut refused = false;
    for _ in 0..50 {
        let url = format!("postgres://{ROLE}@127.0.0.1:{}/by_file", pg.port());
        if <sqlx::PgConnection as sqlx::Connection>::connect(&url)
            .await
            .is_err()
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        refused,
        "pg_hba.conf reload did not require a password for {ROLE}"
    );
    Ok((dir, pg))
}

/// Writes `text` to `dir/name` with `mode`.
fn secret_file(dir: &Path, name: &str, text: &str, mode: u32) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
    Ok(path)
}

fn participant_args(dir: &Path, name: &str) -> Vec<String> {
    vec![
        "--shard".into(),
        "s0".into(),
        // Nobody there: the participant asks once at start, briefly, and serves anyway.
        "--coordinator".into(),
        "http://127.0.0.1:1".into(),
        "--data-dir".into(),
        dir.join(name).display().to_string(),
    ]
}

async fn spawn(
    binary: &str,
    dir: &Path,
    name: &str,
    args: Vec<String>,
    env: Vec<(String, String)>,
) -> Result<ServiceProcess> {
    let port = free_loopback_port()?;
    Ok(ServiceProcess::spawn(ServiceSpec {
        name: name.into(),
        binary: binary_path(binary)?,
        args,
        env,
        listen: ([127, 0, 0, 1], port).into(),
        log_path: dir.join(format!("{name}.log")),
    })
    .await?)
}

/// Runs a service expected to refuse to start; returns everything it printed.
async fn fails_to_start(binary: &str, args: &[String], env: &[(String, String)]) -> Result<String> {
    let output = tokio::process::Command::new(binary_path(binary)?)
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .await?;
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(!output.status.success(), "{binary} started: {printed}");
    Ok(printed)
}

fn log_of(process: &ServiceProcess) -> Result<String> {
    Ok(std::fs::read_to_string(process.log_path())?)
}

/// Everything a process made visible: its command line (what `ps` shows) and its log.
fn shown_by(process: &ServiceProcess) -> Result<String> {
    let pid = process.pid().context("the process is running")?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    Ok(format!(
        "{}\n{}",
        String::from_utf8_lossy(&cmdline),
        log_of(process)?
    ))
}

/// Runs `treaty ARGS --coordinator ENDPOINT`; returns its exit code and everything it printed.
fn treaty(endpoint: &str, args: &[&str]) -> Result<(Option<i32>, String)> {
    let output = std::process::Command::new(binary_path("treaty")?)
        .args(args)
        .args(["--coordinator", endpoint])
        .env_remove("TREATY_COORDINATOR")
        .output()?;
    Ok((
        output.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    ))
}

/// Four shards, each given its secret another way: s0's agent reads its URL from a private file,
/// s1's from the environment, s2's has no password in its URL and takes it from the passfile, and
/// s3 is driven inside the coordinator with `?password=` in its URL; the coordinator's decision
/// database URL carries the password in its userinfo. A cross-shard transaction commits on all
/// four, an aborted one is reported to a client and by `treaty`, and the password appears on no
/// command line, in no log, no client error, no `treaty` output and not in the data directory.
#[tokio::test]
async fn a_transaction_commits_over_shards_whose_passwords_come_from_a_file_the_environment_and_the_passfile()
-> Result<()> {
    let (dir, pg) = secured_server().await?;
    let port = pg.port();
    for database in SHARD_DATABASES {
        let mut conn = pg.connect(database).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE kv (k bigint PRIMARY KEY, v text NOT NULL); ALTER TABLE kv OWNER TO {ROLE}"
        )))
        .execute(&mut conn)
        .await?;
    }
    let coordinator_port = free_loopback_port()?;
    let coordinator_url = format!("http://127.0.0.1:{coordinator_port}");
    let agent_args = |shard: &str| {
        vec![
            "--shard".to_string(),
            shard.to_string(),
            "--coordinator".into(),
            coordinator_url.clone(),
            "--data-dir".into(),
            dir.path().join(shard).display().to_string(),
        ]
    };

    let url_file = secret_file(
        dir.path(),
        "s0.url",
        &format!("postgres://{ROLE}:{PASSWORD}@127.0.0.1:{port}/by_file\n"),
        0o600,
    )?;
    let mut args = agent_args("s0");
    args.extend(["--database-url-file".into(), url_file.display().to_string()]);
    let s0 = spawn("treaty-participant", dir.path(), "s0", args, vec![]).await?;

    let env = vec![(
        "TREATY_PARTICIPANT_DATABASE_URL".to_string(),
        format!("postgres://{ROLE}:{PASSWORD}@127.0.0.1:{port}/by_env"),
    )];
    let s1 = spawn("treaty-participant", dir.path(), "s1", agent_args("s1"), env).await?;

    let passfile = secret_file(
        dir.path(),
        "pgpass",
        &format!("# host:port:database:user:password\n127.0.0.1:{port}:by_passfile:{ROLE}:{PASSWORD}\n"),
        0o600,
    )?;
    let passfile_env = vec![("PGPASSFILE".to_string(), passfile.display().to_string())];
    let mut args = agent_args("s2");
    args.extend([
        "--database-url".into(),
        format!("postgres://{ROLE}@127.0.0.1:{port}/by_passfile"),
    ]);
    let s2 = spawn("treaty-participant", dir.path(), "s2", args, passfile_env).await?;

    let coordinator_env = vec![
        (
            "TREATY_COORDINATOR_SHARDS".to_string(),
            format!(
                "s0={},s1={},s2={},s3=postgres://{ROLE}@127.0.0.1:{port}/by_query?sslmode=disable&password={PASSWORD}",
                s0.endpoint(),
                s1.endpoint(),
                s2.endpoint()
            ),
        ),
        (
            "TREATY_COORDINATOR_DECISION_STORE".to_string(),
            format!("postgres://{ROLE}:{PASSWORD}@127.0.0.1:{port}/decisions"),
        ),
    ];
    let data_dir = dir.path().join("coordinator");
    let coordinator = ServiceProcess::spawn(ServiceSpec {
        name: "coordinator".into(),
        binary: binary_path("treaty-coordinator")?,
        args: vec!["--data-dir".into(), data_dir.display().to_string()],
        env: coordinator_env,
        listen: ([127, 0, 0, 1], coordinator_port).into(),
        log_path: dir.path().join("coordinator.log"),
    })
    .await?;
    let endpoint = coordinator.endpoint();

    // Committed on all four shards; applied everywhere before the answer (`wait_for_apply`): with
    // the decision in a shard, the client is answered once the decision commits, and the other
    // branches' COMMIT PREPARED may still be on their way.
    let ops = |k: i64| {
        format!(
            r#"{{"wait_for_apply":true,"ops":[{}]}}"#,
            ["s0", "s1", "s2", "s3"]
                .map(|shard| format!(
                    r#"{{"shard":"{shard}","sql":"INSERT INTO kv VALUES ($1, $2)","params":[{k},"{shard}"]}}"#
                ))
                .join(",")
        )
    };
    let ops_path = dir.path().join("insert.json");
    std::fs::write(&ops_path, ops(1))?;
    let ops_path = ops_path.display().to_string();
    let (code, committed) = treaty(&endpoint, &["submit", &ops_path, "--json"])?;
    ensure!(code == Some(0) && committed.contains("committed"), "{committed}");
    for database in SHARD_DATABASES {
        let mut conn = pg.connect(database).await?;
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM kv WHERE k = 1")
            .fetch_one(&mut conn)
            .await?;
        ensure!(
            rows == 1,
            "{database} has {rows} rows of the committed transaction"
        );
    }

    // The same keys again: aborted, reported to a client and by `treaty`.
    let (code, aborted) = treaty(&endpoint, &["submit", &ops_path])?;
    ensure!(code == Some(3), "aborted is exit code 3: {aborted}");
    let client = treaty_client::Client::connect([endpoint.clone()]).await?;
    let request = treaty_proto::pb::SubmitRequest {
        ops: vec![treaty_proto::pb::Op {
            shard: "s3".into(),
            sql: "INSERT INTO no_such_table VALUES (1)".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let client_error = match client.submit(request).await {
        Ok(response) => format!("{response:?}"),
        Err(error) => format!("{error} {error:?}"),
    };
    ensure!(client_error.contains("no_such_table"), "{client_error}");
    let (_, listed) = treaty(&endpoint, &["list"])?;
    let (_, in_doubt) = treaty(&endpoint, &["in-doubt"])?;

    let mut shown = vec![committed, aborted, client_error, listed, in_doubt];
    for process in [&s0, &s1, &s2, &coordinator] {
        let text = shown_by(process)?;
        ensure!(
            text.contains("listening on") || text.contains("serving"),
            "{text}"
        );
        shown.push(text);
    }
    shown.push(std::fs::read_to_string(data_dir.join("decision-database"))?);
    for text in &shown {
        ensure!(!text.contains(PASSWORD), "the password is shown: {text}");
    }
    // The coordinator says where its decisions are, without the password.
    ensure!(
        shown
            .iter()
            .any(|text| text.contains(&format!("{ROLE}:***@127.0.0.1:{port}/decisions"))),
        "{shown:?}"
    );

    // A passfile, or a URL file, that others may read is refused, naming the file.
    std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o644))?;
    let mut args = participant_args(dir.path(), "open-passfile");
    args.extend([
        "--database-url".into(),
        format!("postgres://{ROLE}@127.0.0.1:{port}/by_passfile"),
    ]);
    let printed = fails_to_start(
        "treaty-participant",
        &args,
        &[("PGPASSFILE".to_string(), passfile.display().to_string())],
    )
    .await?;
    ensure!(
        printed.contains("chmod 600") && printed.contains(&passfile.display().to_string()),
        "{printed}"
    );
    ensure!(!printed.contains(PASSWORD), "{printed}");
    std::fs::set_permissions(&url_file, std::fs::Permissions::from_mode(0o640))?;
    let mut args = participant_args(dir.path(), "open-url-file");
    args.extend(["--database-url-file".into(), url_file.display().to_string()]);
    let printed = fails_to_start("treaty-participant", &args, &[]).await?;
    ensure!(
        printed.contains("chmod 600") && printed.contains(&url_file.display().to_string()),
        "{printed}"
    );
    ensure!(!printed.contains(PASSWORD), "{printed}");
    Ok(())
}

#[tokio::test]
async fn a_wrong_password_fails_the_start_and_the_error_does_not_show_it() -> Result<()> {
    let (dir, pg) = secured_server().await?;
    let port = pg.port();
    // In the userinfo, from the environment.
    let env = [(
        "TREATY_PARTICIPANT_DATABASE_URL".to_string(),
        format!("postgres://{ROLE}:{WRONG_PASSWORD}@127.0.0.1:{port}/by_file"),
    )];
    let printed = fails_to_start("treaty-participant", &participant_args(dir.path(), "wrong"), &env).await?;
    ensure!(printed.contains("password authentication failed"), "{printed}");
    ensure!(printed.contains(&format!("{ROLE}:***@127.0.0.1")), "{printed}");
    ensure!(
        !printed.contains(WRONG_PASSWORD),
        "the password is shown: {printed}"
    );

    // As a query parameter, from a file.
    let url_file = secret_file(
        dir.path(),
        "wrong.url",
        &format!("postgres://{ROLE}@127.0.0.1:{port}/by_file?sslmode=disable&PassWord={WRONG_PASSWORD}"),
        0o600,
    )?;
    let mut args = participant_args(dir.path(), "wrong-parameter");
    args.extend(["--database-url-file".into(), url_file.display().to_string()]);
    let printed = fails_to_start("treaty-participant", &args, &[]).await?;
    ensure!(printed.contains("password authentication failed"), "{printed}");
    ensure!(printed.contains("PassWord=***"), "{printed}");
    ensure!(
        !printed.contains(WRONG_PASSWORD),
        "the password is shown: {printed}"
    );

    // `sslpassword`, which the driver cannot use (it would ignore it and log its value): refused,
    // named, and not shown.
    let url_file = secret_file(
        dir.path(),
        "sslpassword.url",
        &format!("postgres://{ROLE}@127.0.0.1:{port}/by_file?sslpassword={WRONG_PASSWORD}"),
        0o600,
    )?;
    let mut args = participant_args(dir.path(), "sslpassword");
    args.extend(["--database-url-file".into(), url_file.display().to_string()]);
    let printed = fails_to_start("treaty-participant", &args, &[]).await?;
    ensure!(
        printed.contains("`sslpassword` parameter is not supported"),
        "{printed}"
    );
    ensure!(
        !printed.contains(WRONG_PASSWORD),
        "the password is shown: {printed}"
    );
    Ok(())
}

#[tokio::test]
async fn a_decision_database_password_in_a_query_parameter_is_never_logged() -> Result<()> {
    let (dir, pg) = secured_server().await?;
    let port = pg.port();
    let data_dir = dir.path().join("coordinator");
    let args = vec![
        "--shard".to_string(),
        "s0=http://127.0.0.1:1".to_string(),
        "--data-dir".to_string(),
        data_dir.display().to_string(),
    ];
    let env = vec![(
        "TREATY_COORDINATOR_DECISION_STORE".to_string(),
        format!("postgres://{ROLE}@127.0.0.1:{port}/decisions?password={PASSWORD}&application_name=x"),
    )];
    let coordinator = spawn("treaty-coordinator", dir.path(), "coordinator", args.clone(), env).await?;
    let log = log_of(&coordinator)?;
    ensure!(
        log.contains("decision database") && log.contains("password=***"),
        "the coordinator did not say where its decisions are: {log}"
    );
    ensure!(!log.contains(PASSWORD), "the password is in the log: {log}");
    // Gone before the next start on the same data directory (a dropped process is only signalled).
    let mut coordinator = coordinator;
    coordinator.kill9()?;
    coordinator
        .wait_exit(std::time::Duration::from_secs(30))
        .await?
        .context("the coordinator did not exit after SIGKILL")?;
    let log = std::fs::read_to_string(dir.path().join("coordinator.log"))?;
    ensure!(!log.contains(PASSWORD), "the password is in the log: {log}");
    let marker = std::fs::read_to_string(data_dir.join("decision-database"))?;
    ensure!(
        !marker.contains(PASSWORD),
        "the data directory keeps the password: {marker}"
    );

    // A wrong one, from --decision-store-file: refused, and not shown.
    let store_file = secret_file(
        dir.path(),
        "store.url",
        &format!("postgres://{ROLE}@127.0.0.1:{port}/decisions?password={WRONG_PASSWORD}\n"),
        0o600,
    )?;
    let mut args = args;
    args.extend(["--decision-store-file".into(), store_file.display().to_string()]);
    let printed = fails_to_start("treaty-coordinator", &args, &[]).await?;
    ensure!(printed.contains("password authentication failed"), "{printed}");
    ensure!(printed.contains("password=***"), "{printed}");
    ensure!(
        !printed.contains(WRONG_PASSWORD),
        "the password is shown: {printed}"
    );
    Ok(())
}
