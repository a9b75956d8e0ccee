//! A synchronous streaming standby of a [`PgCluster`], for tests of a decision database that fails
//! over: the primary is configured for replication, a standby is made from it with
//! `pg_basebackup -R` into a data directory and port of its own, and the primary then waits for
//! the standby on every commit (`synchronous_standby_names`), so a promoted standby has every
//! commit the primary acknowledged. After the primary is stopped `-m immediate`,
//! [`promote`] makes the standby the writable server.
//!
//! Every PostgreSQL program runs as the user the harness runs the servers as (when we are root).

use std::time::{Duration, Instant};

use sqlx::Connection;

use crate::error::HarnessError;
use crate::postgres::PgCluster;

/// The `application_name` the standby connects with, and the name the primary waits for.
const STANDBY_NAME: &str = "treaty_standby";
const POLL: Duration = Duration::from_millis(50);

fn sql_error(pg: &PgCluster) -> impl FnOnce(sqlx::Error) -> HarnessError + '_ {
    move |source| HarnessError::Sql {
        url: pg.url("postgres"),
        source,
    }
}

async fn execute(pg: &PgCluster, sql: &str) -> Result<(), HarnessError> {
    let mut conn = pg.connect("postgres").await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut conn)
        .await
        .map_err(sql_error(pg))?;
    let _ = conn.close().await;
    Ok(())
}

async fn scalar<T>(pg: &PgCluster, sql: &str) -> Result<T, HarnessError>
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    let mut conn = pg.connect("postgres").await?;
    let value = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&mut conn)
        .await
        .map_err(sql_error(pg))?;
    let _ = conn.close().await;
    Ok(value)
}

/// Polls `check` until it answers true or `within` passes.
async fn wait_for<F, Fut>(what: &str, within: Duration, mut check: F) -> Result<(), HarnessError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, HarnessError>>,
{
    let deadline = Instant::now() + within;
    loop {
        let last = check().await;
        if matches!(last, Ok(true)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            let last = match last {
                Ok(_) => "not yet".to_owned(),
                Err(error) => error.to_string(),
            };
            return Err(HarnessError::Invalid(format!(
                "{what} did not happen within {within:?} (last check: {last})"
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Makes `primary` able to serve a streaming standby: `wal_level = replica` and WAL senders
/// (restarting it if either was missing), and a `pg_hba.conf` line letting replication
/// connections in from 127.0.0.1.
pub async fn configure_primary(primary: &PgCluster) -> Result<(), HarnessError> {
    let hba = primary.data_dir().join("pg_hba.conf");
    let text =
        std::fs::read_to_string(&hba).map_err(HarnessError::io(format!("reading {}", hba.display())))?;
    let allowed = text.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 5 && fields[0] == "host" && fields[1] == "replication" && fields[3] == "127.0.0.1/32"
    });
    if !allowed {
        // Appended, so the file keeps its owner and mode.
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&hba)
            .map_err(HarnessError::io(format!("opening {}", hba.display())))?;
        writeln!(file, "host replication all 127.0.0.1/32 trust")
            .map_err(HarnessError::io(format!("writing {}", hba.display())))?;
        execute(primary, "SELECT pg_reload_conf()").await?;
    }
    let wal_level: String = scalar(primary, "SHOW wal_level").await?;
    let senders: String = scalar(primary, "SHOW max_wal_senders").await?;
    if wal_level == "minimal" || senders.trim() == "0" {
        // One statement per call: ALTER SYSTEM refuses to run inside a multi-statement query's
        // implicit transaction.
        execute(primary, "ALTER SYSTEM SET wal_level = 'replica'").await?;
        execute(primary, "ALTER SYSTEM SET max_wal_senders = 4").await?;
        primary.stop_fast().await?;
        primary.restart().await?;
    }
    Ok(())
}

/// Creates a synchronous streaming standby of `primary` (`pg-<name>` under `base_dir`, its own
/// port, the primary's settings), starts it, makes the primary wait for it on every commit, and
/// returns once the primary reports it `streaming` and `sync`. Dropping the returned cluster
/// stops the standby.
pub async fn start_standby(
    primary: &PgCluster,
    base_dir: &std::path::Path,
    name: &str,
    within: Duration,
) -> Result<PgCluster, HarnessError> {
    configure_primary(primary).await?;
    let standby = PgCluster::empty(base_dir, name, primary.options())?;
    let connection = format!(
        "host=127.0.0.1 port={} user=postgres application_name={STANDBY_NAME}",
        primary.port()
    );
    // -R writes `standby.signal` and `primary_conninfo` (with our application_name, which is what
    // the primary's `synchronous_standby_names` matches); -X stream copies the WAL the backup needs.
    standby
        .run_program(
            "pg_basebackup",
            &[
                "-d".as_ref(),
                connection.as_ref(),
                "-D".as_ref(),
                standby.data_dir().as_os_str(),
                "-R".as_ref(),
                "-X".as_ref(),
                "stream".as_ref(),
                "-c".as_ref(),
                "fast".as_ref(),
                "--no-sync".as_ref(),
            ],
        )
        .await?;
    // The copied server log and pid file belong to the primary.
    let _ = std::fs::remove_file(standby.data_dir().join("server.log"));
    let _ = std::fs::remove_file(standby.data_dir().join("postmaster.pid"));
    standby.start_stopped().await?;
    // Only now: set before the standby existed, every commit on the primary would wait forever.
    // In postgresql.auto.conf of the primary only: the standby's copy was taken before, so once
    // promoted it waits for nobody.
    execute(
        primary,
        &format!("ALTER SYSTEM SET synchronous_standby_names = '{STANDBY_NAME}'"),
    )
    .await?;
    execute(primary, "SELECT pg_reload_conf()").await?;
    wait_for("the standby streaming synchronously", within, || async {
        let states: Vec<(String, String)> = {
            let mut conn = primary.connect("postgres").await?;
            let rows = sqlx::query_as(
                "SELECT coalesce(state, ''), coalesce(sync_state, '') FROM pg_stat_replication \
                 WHERE application_name = $1",
            )
            .bind(STANDBY_NAME)
            .fetch_all(&mut conn)
            .await
            .map_err(sql_error(primary))?;
            let _ = conn.close().await;
            rows
        };
        Ok(states
            .iter()
            .any(|(state, sync)| state == "streaming" && sync == "sync"))
    })
    .await?;
    Ok(standby)
}

/// Promotes `standby` (`pg_ctl promote`) and waits until it accepts writes.
pub async fn promote(standby: &PgCluster, within: Duration) -> Result<(), HarnessError> {
    standby
        .run_program(
            "pg_ctl",
            &[
                "-D".as_ref(),
                standby.data_dir().as_os_str(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "-s".as_ref(),
                "promote".as_ref(),
            ],
        )
        .await?;
    wait_for("the promoted standby accepting writes", within, || async {
        let in_recovery: bool = scalar(standby, "SELECT pg_is_in_recovery()").await?;
        if in_recovery {
            return Ok(false);
        }
        // A write proves it: a read-only server refuses a temporary table's creation.
        execute(standby, "CREATE TEMPORARY TABLE treaty_promoted (x int)").await?;
        Ok(true)
    })
    .await
}
