//! Secrets: a PostgreSQL role that needs a password (scram-sha-256 for it alone in `pg_hba.conf`;
//! everything else stays trust on loopback). A participant gets its URL from a private file, or
//! only its password from a private passfile; a file others may read is refused; a wrong password
//! fails the start with an error that does not show it; a coordinator whose decision database URL
//! carries `?password=` never writes it to its log or its data directory.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, ensure};
use tempfile::TempDir;
use treaty_harness::{PgCluster, PgOptions, ServiceProcess, ServiceSpec, binary_path, free_loopback_port};

const ROLE: &str = "treaty_app";
const PASSWORD: &str = "Tr3aty-e2e-S3cret";
const WRONG_PASSWORD: &str = "Wr0ng-e2e-Guess";
const DATABASES: [&str; 3] = ["by_file", "by_passfile", "decisions"];

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

#[tokio::test]
async fn a_participant_takes_its_url_from_a_private_file_or_its_password_from_the_passfile() -> Result<()> {
    let (dir, pg) = secured_server().await?;
    let port = pg.port();

    // The whole URL, password included, from a file only its owner may read.
    let url_file = secret_file(
        dir.path(),
        "by-file.url",
        &format!("postgres://{ROLE}:{PASSWORD}@127.0.0.1:{port}/by_file\n"),
        0o600,
    )?;
    let mut args = participant_args(dir.path(), "by-file");
    args.extend(["--database-url-file".into(), url_file.display().to_string()]);
    let by_file = spawn("treaty-participant", dir.path(), "by-file", args.clone(), vec![]).await?;
    let log = log_of(&by_file)?;
    ensure!(log.contains("participant serving"), "{log}");
    ensure!(!log.contains(PASSWORD), "the password is in the log: {log}");
    drop(by_file);

    // The URL without a password (from the environment), the password from PostgreSQL's passfile.
    let passfile = secret_file(
        dir.path(),
        "pgpass",
        &format!("# host:port:database:user:password\n127.0.0.1:{port}:by_passfile:{ROLE}:{PASSWORD}\n"),
        0o600,
    )?;
    let env = vec![
        (
            "TREATY_PARTICIPANT_DATABASE_URL".to_string(),
            format!("postgres://{ROLE}@127.0.0.1:{port}/by_passfile"),
        ),
        ("PGPASSFILE".to_string(), passfile.display().to_string()),
    ];
    let by_passfile = spawn(
        "treaty-participant",
        dir.path(),
        "by-passfile",
        participant_args(dir.path(), "by-passfile"),
        env.clone(),
    )
    .await?;
    let log = log_of(&by_passfile)?;
    ensure!(log.contains("participant serving"), "{log}");
    ensure!(!log.contains(PASSWORD), "the password is in the log: {log}");
    drop(by_passfile);

    // A passfile, or a URL file, that others may read is refused, as libpq refuses the passfile.
    std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o644))?;
    let printed = fails_to_start(
        "treaty-participant",
        &participant_args(dir.path(), "open-passfile"),
        &env,
    )
    .await?;
    ensure!(
        printed.contains("chmod 600") && printed.contains("pgpass"),
        "{printed}"
    );
    ensure!(!printed.contains(PASSWORD), "{printed}");
    std::fs::set_permissions(&url_file, std::fs::Permissions::from_mode(0o640))?;
    let printed = fails_to_start("treaty-participant", &args, &[]).await?;
    ensure!(
        printed.contains("chmod 600") && printed.contains("by-file.url"),
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
    drop(coordinator);
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
