//! The atomicity checker every scenario (and `treaty chaos`) ends with. Each transaction writes a
//! marker row carrying its txid and the list of shards it touches on every one of those shards, so
//! the databases alone say whether it is all-or-nothing; what clients were told is then checked
//! against them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use sqlx::Row;
use treaty_harness::LocalCluster;
use treaty_proto::pb;

pub const DATABASE: &str = "treaty";

/// Creates the marker table on every shard.
pub async fn create_markers(cluster: &LocalCluster) -> Result<()> {
    for pg in &cluster.pgs {
        let mut conn = pg.connect(DATABASE).await?;
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS treaty_markers (txid bigint PRIMARY KEY, shards text NOT NULL, \
             written_at timestamptz NOT NULL DEFAULT now())",
        )
        .execute(&mut conn)
        .await
        .with_context(|| format!("creating the marker table on {}", pg.name()))?;
    }
    Ok(())
}

/// The marker insert a transaction runs on each shard it touches.
pub fn marker_op(shard: &str, txid: u64, shards: &[String]) -> (String, String, Vec<pb::Value>) {
    let int = |v: i64| pb::Value {
        kind: Some(pb::value::Kind::Int64(v)),
    };
    let text = |v: String| pb::Value {
        kind: Some(pb::value::Kind::Text(v)),
    };
    (
        shard.to_string(),
        "INSERT INTO treaty_markers (txid, shards) VALUES ($1, $2)".into(),
        vec![int(txid as i64), text(shards.join(","))],
    )
}

/// What the clients were told, per txid.
#[derive(Debug, Default, Clone)]
pub struct Told {
    pub committed: BTreeSet<u64>,
    pub aborted: BTreeSet<u64>,
    /// Never asked to commit (the client gave up before `Commit`): must be absent everywhere.
    pub abandoned: BTreeSet<u64>,
    /// The commit call failed in transport: either outcome, but all-or-nothing.
    pub unknown: BTreeSet<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Violation {
    pub txid: u64,
    pub kind: String,
    /// Per shard: whether its marker is present.
    pub evidence: BTreeMap<String, bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub committed: usize,
    pub aborted: usize,
    pub unknown: usize,
    pub abandoned: usize,
    pub prepared_left: usize,
    pub converged: bool,
    pub convergence_ms: u64,
    pub violations: Vec<Violation>,
}

impl Report {
    pub fn violation_count(&self) -> usize {
        self.violations.len() + usize::from(self.prepared_left > 0) + usize::from(!self.converged)
    }
}

/// Treaty GIDs prepared in each shard's database, as PostgreSQL holds them (branch GIDs,
/// `treaty_proto::BranchGid`, which `BranchGid::parse` maps back to their transaction).
pub async fn prepared(cluster: &LocalCluster) -> Result<Vec<(String, Vec<String>)>> {
    let mut out = Vec::new();
    for (name, pg) in cluster.shard_names.iter().zip(&cluster.pgs) {
        let mut conn = pg.connect(DATABASE).await?;
        let gids: Vec<String> = sqlx::query_scalar(
            "SELECT gid FROM pg_prepared_xacts \
             WHERE database = current_database() AND gid LIKE 'treaty:%' ORDER BY gid",
        )
        .fetch_all(&mut conn)
        .await?;
        out.push((name.clone(), gids));
    }
    Ok(out)
}

/// Waits (bounded) until nothing is prepared on any shard and the coordinator holds nothing in
/// doubt. Returns whether it converged and how long it took.
pub async fn await_convergence(cluster: &LocalCluster, within: Duration) -> Result<(bool, Duration)> {
    let started = Instant::now();
    loop {
        let prepared_now: usize = match prepared(cluster).await {
            Ok(p) => p.iter().map(|(_, g)| g.len()).sum(),
            Err(_) => usize::MAX,
        };
        let in_doubt = match cluster.client().await {
            Ok(mut client) => client
                .list_transactions(pb::ListTransactionsRequest {
                    filter: pb::ListFilter::InDoubt as i32,
                    limit: 1,
                })
                .await
                .map(|r| r.into_inner().transactions.len())
                .unwrap_or(1),
            Err(_) => 1,
        };
        if prepared_now == 0 && in_doubt == 0 {
            return Ok((true, started.elapsed()));
        }
        if started.elapsed() > within {
            return Ok((false, started.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// txid -> (the shards its marker declares, the shards where its marker is committed).
pub type Markers = BTreeMap<u64, (Vec<String>, BTreeSet<String>)>;

/// Every shard's committed markers.
pub async fn read_markers(cluster: &LocalCluster) -> Result<Markers> {
    let mut seen = Markers::new();
    for (name, pg) in cluster.shard_names.iter().zip(&cluster.pgs) {
        let mut conn = pg.connect(DATABASE).await?;
        let rows = sqlx::query("SELECT txid, shards FROM treaty_markers")
            .fetch_all(&mut conn)
            .await
            .with_context(|| format!("reading markers on {name}"))?;
        for row in rows {
            let txid: i64 = row.try_get(0)?;
            let shards: String = row.try_get(1)?;
            let entry = seen
                .entry(txid as u64)
                .or_insert_with(|| (shards.split(',').map(String::from).collect(), BTreeSet::new()));
            entry.1.insert(name.clone());
        }
    }
    Ok(seen)
}

/// Reads every shard's markers and checks them against what clients were told.
pub async fn check(
    cluster: &LocalCluster,
    told: &Told,
    converged: bool,
    convergence: Duration,
) -> Result<Report> {
    let seen = read_markers(cluster).await?;
    let evidence = |declared: &[String], present: &BTreeSet<String>| -> BTreeMap<String, bool> {
        declared
            .iter()
            .map(|s| (s.clone(), present.contains(s)))
            .collect()
    };
    let mut violations = Vec::new();
    for (txid, (declared, present)) in &seen {
        let complete = declared.iter().all(|s| present.contains(s));
        if !complete {
            violations.push(Violation {
                txid: *txid,
                kind: "half-applied".into(),
                evidence: evidence(declared, present),
            });
        } else if told.aborted.contains(txid) {
            violations.push(Violation {
                txid: *txid,
                kind: "acknowledged abort applied".into(),
                evidence: evidence(declared, present),
            });
        } else if told.abandoned.contains(txid) {
            violations.push(Violation {
                txid: *txid,
                kind: "applied without a commit request".into(),
                evidence: evidence(declared, present),
            });
        }
    }
    for txid in &told.committed {
        if !seen.contains_key(txid) {
            violations.push(Violation {
                txid: *txid,
                kind: "acknowledged commit lost".into(),
                evidence: cluster.shard_names.iter().map(|s| (s.clone(), false)).collect(),
            });
        }
    }
    let prepared_left = prepared(cluster).await?.iter().map(|(_, g)| g.len()).sum();
    Ok(Report {
        committed: told.committed.len(),
        aborted: told.aborted.len(),
        unknown: told.unknown.len(),
        abandoned: told.abandoned.len(),
        prepared_left,
        converged,
        convergence_ms: convergence.as_millis() as u64,
        violations,
    })
}
