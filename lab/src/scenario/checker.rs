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

/// What the clients were told, per marker id (the txid, or a submitted transaction's own id).
#[derive(Debug, Default, Clone)]
pub struct Told {
    pub committed: BTreeSet<u64>,
    pub aborted: BTreeSet<u64>,
    /// Never asked to commit (the client gave up before `Commit`): must be absent everywhere.
    pub abandoned: BTreeSet<u64>,
    /// The commit call failed in transport: either outcome, but all-or-nothing.
    pub unknown: BTreeSet<u64>,
    /// How many aborts clients heard per cause (`concluded-abort`, ...: `spec::abort_cause_name`),
    /// from the abort reason the coordinator's answer carried.
    pub abort_causes: BTreeMap<String, u64>,
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
    /// Decision rows left in `treaty.decisions` once converged (commit rows should be gone).
    pub decision_rows: DecisionRows,
    /// Aborts the clients heard, per cause.
    pub abort_causes: BTreeMap<String, u64>,
}

impl Report {
    pub fn violation_count(&self) -> usize {
        self.violations.len() + usize::from(self.prepared_left > 0) + usize::from(!self.converged)
    }
}

/// Treaty GIDs prepared in each shard's database, as PostgreSQL holds them (branch GIDs,
/// `treaty_proto::BranchGid`, which `BranchGid::parse` maps back to their transaction).
pub async fn prepared(cluster: &LocalCluster) -> Result<Vec<(String, Vec<String>)>> {
    Ok(prepared_with_xids(cluster)
        .await?
        .into_iter()
        .map(|(shard, branches)| (shard, branches.into_iter().map(|(gid, _)| gid).collect()))
        .collect())
}

/// As [`prepared`], each GID with the local transaction id PostgreSQL gave the branch. A row the
/// branch wrote keeps that id as its `xmin` once committed: that is how a transaction in doubt is
/// matched to its marker when the marker carries an id the client chose (a submitted
/// transaction's txid is the coordinator's to pick).
pub async fn prepared_with_xids(cluster: &LocalCluster) -> Result<Vec<(String, Vec<(String, u64)>)>> {
    let mut out = Vec::new();
    for (name, pg) in cluster.shard_names.iter().zip(&cluster.pgs) {
        let mut conn = pg.connect(DATABASE).await?;
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT gid, transaction::text::bigint FROM pg_prepared_xacts \
             WHERE database = current_database() AND gid LIKE 'treaty:%' ORDER BY gid",
        )
        .fetch_all(&mut conn)
        .await?;
        let branches = rows.into_iter().map(|(gid, xid)| (gid, xid as u64)).collect();
        out.push((name.clone(), branches));
    }
    Ok(out)
}

/// Waits (bounded) until nothing is prepared or open on any shard and the coordinator holds
/// nothing in doubt. Returns whether it converged and how long it took.
pub async fn await_convergence(cluster: &LocalCluster, within: Duration) -> Result<(bool, Duration)> {
    await_convergence_via(cluster, &[cluster.coordinator_endpoint()], within, false).await
}

/// Transactions `endpoint`'s coordinator holds in doubt (at most 1 counted); 1 when it cannot be
/// asked, so that an unreachable coordinator never passes for a converged one.
async fn in_doubt_at(cluster: &LocalCluster, endpoint: &str) -> usize {
    let Ok(endpoint) = cluster.endpoint_to(endpoint) else {
        return 1;
    };
    let Ok(channel) = endpoint.connect().await else {
        return 1;
    };
    let mut client = pb::coordinator_client::CoordinatorClient::new(channel);
    client
        .list_transactions(pb::ListTransactionsRequest {
            filter: pb::ListFilter::InDoubt as i32,
            limit: 1,
        })
        .await
        .map(|r| r.into_inner().transactions.len())
        .unwrap_or(1)
}

/// As [`await_convergence`], asking every coordinator instance in `coordinators` (those still
/// running: one killed for good answers nobody) and, with `commit_rows_gone` (the shard store),
/// also waiting until no shard's `treaty.decisions` holds a commit row: a finished transaction's
/// row is forgotten, so one left over means its end was never carried out.
pub async fn await_convergence_via(
    cluster: &LocalCluster,
    coordinators: &[String],
    within: Duration,
    commit_rows_gone: bool,
) -> Result<(bool, Duration)> {
    let started = Instant::now();
    loop {
        // A branch still open (a call held in a failpoint, say) may yet prepare: not converged
        // until it has ended one way or the other, or the verdict would race its PREPARE. Read
        // before the prepared ones: a branch that prepares in between is then seen prepared.
        let open_now = open_branches(cluster).await.unwrap_or(1);
        let prepared_now: usize = match prepared(cluster).await {
            Ok(p) => p.iter().map(|(_, g)| g.len()).sum(),
            Err(_) => usize::MAX,
        };
        let mut in_doubt = 0;
        for endpoint in coordinators {
            in_doubt += in_doubt_at(cluster, endpoint).await;
        }
        let rows_left = if commit_rows_gone {
            decision_rows(cluster).await.map(|r| r.commit).unwrap_or(1)
        } else {
            0
        };
        if prepared_now == 0 && in_doubt == 0 && rows_left == 0 && open_now == 0 {
            return Ok((true, started.elapsed()));
        }
        if started.elapsed() > within {
            return Ok((false, started.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Transactions the participants hold open in the shards' databases (sessions idle in a
/// transaction), summed over every shard.
async fn open_branches(cluster: &LocalCluster) -> Result<usize> {
    let mut open = 0;
    for (name, pg) in cluster.shard_names.iter().zip(&cluster.pgs) {
        let mut conn = pg.connect(DATABASE).await?;
        let count: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'treaty-participant' AND state LIKE 'idle in transaction%'",
        )
        .fetch_one(&mut conn)
        .await
        .with_context(|| format!("counting open branches on {name}"))?;
        open += count as usize;
    }
    Ok(open)
}

/// What the shards' `treaty.decisions` tables hold, summed over every shard.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct DecisionRows {
    pub commit: usize,
    pub abort: usize,
}

/// Counts the decision rows on every shard (the table exists whatever the store: the
/// participant's migrations create it).
pub async fn decision_rows(cluster: &LocalCluster) -> Result<DecisionRows> {
    let mut rows = DecisionRows::default();
    for (name, pg) in cluster.shard_names.iter().zip(&cluster.pgs) {
        let mut conn = pg.connect(DATABASE).await?;
        let (commit, abort): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE outcome = 'commit'), count(*) FILTER (WHERE outcome = 'abort') \
             FROM treaty.decisions",
        )
        .fetch_one(&mut conn)
        .await
        .with_context(|| format!("counting decision rows on {name}"))?;
        rows.commit += commit as usize;
        rows.abort += abort as usize;
    }
    Ok(rows)
}

/// marker id -> (the shards its marker declares, the shards where its marker is committed). The
/// marker id is the transaction's txid (interactive) or the id its client picked (submit, above
/// `workload::SUBMIT_MARKER_BASE`).
pub type Markers = BTreeMap<u64, (Vec<String>, BTreeSet<String>)>;

/// (shard, `xmin` of a committed marker row) -> its marker id.
pub type MarkerRows = BTreeMap<(String, u64), u64>;

/// Every shard's committed markers.
pub async fn read_markers(cluster: &LocalCluster) -> Result<Markers> {
    Ok(read_markers_with_rows(cluster).await?.0)
}

/// Every shard's committed markers, and the local transaction that wrote each row.
pub async fn read_markers_with_rows(cluster: &LocalCluster) -> Result<(Markers, MarkerRows)> {
    let mut seen = Markers::new();
    let mut rows_by_xmin = MarkerRows::new();
    for (name, pg) in cluster.shard_names.iter().zip(&cluster.pgs) {
        let mut conn = pg.connect(DATABASE).await?;
        let rows = sqlx::query("SELECT txid, shards, xmin::text::bigint FROM treaty_markers")
            .fetch_all(&mut conn)
            .await
            .with_context(|| format!("reading markers on {name}"))?;
        for row in rows {
            let txid: i64 = row.try_get(0)?;
            let shards: String = row.try_get(1)?;
            let xmin: i64 = row.try_get(2)?;
            let entry = seen
                .entry(txid as u64)
                .or_insert_with(|| (shards.split(',').map(String::from).collect(), BTreeSet::new()));
            entry.1.insert(name.clone());
            rows_by_xmin.insert((name.clone(), xmin as u64), txid as u64);
        }
    }
    Ok((seen, rows_by_xmin))
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
    let decision_rows = decision_rows(cluster).await?;
    Ok(Report {
        committed: told.committed.len(),
        aborted: told.aborted.len(),
        unknown: told.unknown.len(),
        abandoned: told.abandoned.len(),
        prepared_left,
        converged,
        convergence_ms: convergence.as_millis() as u64,
        violations,
        decision_rows,
        abort_causes: told.abort_causes.clone(),
    })
}
