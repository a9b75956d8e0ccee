//! What a Treaty phase leaves for later, charged to that phase: the branches still prepared when
//! its clients stop (the shard store answers a client once its decision branch commits, before the
//! other branches' `COMMIT PREPARED`), the marker rows of committed branches (`treaty.branches`,
//! deleted by each participant's recovery pass once they are `--marker-retention-ms` old), the
//! shard store's commit rows (`treaty.decisions`, forgotten in batches) and three-phase rows.
//!
//! Without this, that work lands in whichever phase runs next on the same servers: with two
//! decision stores side by side, each store's deletes were measured as the other's, and with one
//! store as the baseline's. After a Treaty phase the bench waits until every server holds none of
//! it (or `LIMIT` passes), and the CPU that took counts as the phase's (with the servers'
//! background CPU meanwhile, `postgres_idle_cpu_us_per_s` in the report); the phase's throughput
//! and latency are still those of its measured seconds only. The participants know every
//! coordinator the bench starts, so each store's rows can go (`mod.rs`).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sqlx::{Connection, PgConnection};

/// How long a phase's leftovers may take to go before the bench reports them and moves on.
pub const LIMIT: Duration = Duration::from_secs(30);
/// Between two counts: each counts the rows of a few tables on every server, small by then.
const POLL: Duration = Duration::from_millis(100);

/// One server the leftovers are counted on, over a connection kept for the whole run (a new one
/// per poll would start a backend each time, work that would be charged to the phase).
struct Server {
    name: String,
    connection: PgConnection,
    /// One `SELECT` summing what this server holds of Treaty's deferred work.
    count_sql: String,
}

/// The servers whose leftovers a Treaty phase waits for.
pub struct Leftovers {
    servers: tokio::sync::Mutex<Vec<Server>>,
}

/// How a phase's leftovers went.
#[derive(Debug, Clone, Copy)]
pub struct Settled {
    /// From the end of the measured seconds until nothing was left (or `LIMIT`).
    pub waited: Duration,
    /// Rows and prepared branches still there when the bench stopped waiting (0: all gone).
    pub left: i64,
}

impl Leftovers {
    /// Connects to every `(name, url)`; the tables counted are the ones the server has (every
    /// migrated server has them all; a server Treaty never migrated has none).
    pub async fn open(servers: &[(String, String)]) -> Result<Self> {
        let mut open = Vec::with_capacity(servers.len());
        for (name, url) in servers {
            let mut connection = PgConnection::connect(url)
                .await
                .with_context(|| format!("connecting to {name} to count Treaty's leftovers"))?;
            let (branches, decisions, three_phase): (bool, bool, bool) = sqlx::query_as(
                "SELECT to_regclass('treaty.branches') IS NOT NULL, \
                        to_regclass('treaty.decisions') IS NOT NULL, \
                        to_regclass('treaty.three_phase') IS NOT NULL",
            )
            .fetch_one(&mut connection)
            .await
            .with_context(|| format!("looking up Treaty's tables on {name}"))?;
            open.push(Server {
                name: name.clone(),
                connection,
                count_sql: count_sql(branches, decisions, three_phase),
            });
        }
        Ok(Self {
            servers: tokio::sync::Mutex::new(open),
        })
    }

    /// What every server holds now.
    pub async fn count(&self) -> Result<i64> {
        let mut servers = self.servers.lock().await;
        let mut total = 0;
        for server in servers.iter_mut() {
            // Built from constants only (`count_sql`).
            let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(server.count_sql.clone()))
                .fetch_one(&mut server.connection)
                .await
                .with_context(|| format!("counting Treaty's leftovers on {}", server.name))?;
            total += n;
        }
        Ok(total)
    }

    /// Waits until nothing is left, or `LIMIT`.
    pub async fn settle(&self) -> Result<Settled> {
        let started = Instant::now();
        loop {
            let left = self.count().await?;
            let waited = started.elapsed();
            if left == 0 || waited >= LIMIT {
                return Ok(Settled { waited, left });
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// The count of one server: its Treaty branches still prepared, plus the rows of each table
/// it has (abort rows are not counted: presumed abort keeps them until no decision branch can
/// meet them, `participant/src/reconcile.rs`).
fn count_sql(branches: bool, decisions: bool, three_phase: bool) -> String {
    let mut parts = vec![format!("({})", crate::PREPARED_TREATY_GIDS_SQL)];
    if branches {
        parts.push("(SELECT count(*) FROM treaty.branches)".into());
    }
    if decisions {
        parts.push("(SELECT count(*) FROM treaty.decisions WHERE outcome = 'commit')".into());
    }
    if three_phase {
        parts.push("(SELECT count(*) FROM treaty.three_phase)".into());
    }
    format!("SELECT {}", parts.join(" + "))
}

#[cfg(test)]
mod tests {
    use super::count_sql;

    #[test]
    fn the_count_names_only_the_tables_a_server_has() {
        let all = count_sql(true, true, true);
        for table in [
            "pg_prepared_xacts",
            "treaty.branches",
            "treaty.decisions",
            "treaty.three_phase",
        ] {
            assert!(all.contains(table), "{all}");
        }
        assert!(
            all.contains("outcome = 'commit'"),
            "abort rows are not leftovers: {all}"
        );
        let bare = count_sql(false, false, false);
        assert!(bare.contains("pg_prepared_xacts"), "{bare}");
        assert!(!bare.contains("treaty."), "{bare}");
        assert!(!bare.contains(" + "), "{bare}");
    }
}
