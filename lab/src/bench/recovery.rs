//! `treaty bench recovery --txns N`: how fast a restarted coordinator finishes N logged commits.
//!
//! 1. Start a local cluster (fsync on, `max_prepared_transactions` above N); run `WARM_CLIENTS`
//!    concurrent clients' transactions through it, so each participant holds the pooled
//!    connections that serving the load behind a backlog leaves it (otherwise its recovery would
//!    start a backend per commit in flight, and a backend start costs PostgreSQL about 6 ms of
//!    CPU with 10,000 transactions prepared, against 3.5 with none; with `--participants
//!    in-process` the pools die with the coordinator, so the restart starts cold either way);
//!    then SIGKILL the coordinator.
//! 2. Do by hand what a participant does before voting YES, N times on every shard: `BEGIN`; a row
//!    in `bench_recovery`; the marker row in `treaty.branches` (under the transaction's GID);
//!    `PREPARE TRANSACTION 'treaty:<coordinator id>:<txid>:<shard>'`, the branch GID (see
//!    `participant/src/postgres.rs`).
//! 3. Write what the coordinator writes when it decides: open its decision log
//!    (`DecisionLog::open`, which hands back the id from the header), reserve the txids, and a
//!    commit record per transaction naming every shard; close the log.
//! 4. Restart the coordinator and time until `pg_prepared_xacts` holds no Treaty GID on any shard;
//!    then check that every shard holds all N rows.
//!
//! With `--decision-store shard` the decisions are rows, not log records, so steps 2 and 3 are
//! what the shard store leaves behind instead (the coordinator runs with `--decision-store shard`
//! throughout; its log still names its id and reserves the txids):
//! - on the decision shard (shard k mod N for txid k with `--decision-shards spread`, the default,
//!   as transactions that begin on different shards leave them; the first shard for every
//!   transaction with `first`), each transaction's branch commits in one phase with its commit row: `INSERT INTO treaty.decisions (gid, 'commit', coordinator_id, participants)`
//!   under the GID `treaty:<id>:<txid>@<decision shard>`, naming every other shard;
//! - every other shard prepares its branch under `treaty:<id>:<txid>@<decision shard>:<shard>`,
//!   with no marker row (the row decides).
//!
//! The restarted coordinator re-drives its commit rows (`redrive_decision_rows`) and forgets them;
//! the clock stops when nothing is prepared (polled every 100 ms, every 5 ms once fewer than
//! `FINE_POLL_BELOW` are left, so the time is not rounded up to the next coarse poll), and the
//! time until the rows are gone is reported too.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::future::try_join_all;
use indicatif::ProgressBar;
use serde_json::json;
use sqlx::PgConnection;
use treaty_decision_log::{CommitRecord, DecisionLog, LogOptions};
use treaty_harness::{ClusterSpec, LocalCluster, PgCluster, PgOptions};
use treaty_proto::{BranchGid, CoordinatorId, Gid, ShardName, pb};

use super::BenchArgs;
use super::args::DecisionShards;
use super::cpu;
use super::stores::DecisionStore;
use super::treaty_driver;
use super::workload::DATABASE;

/// Connections per shard that prepare the transactions.
const PREPARE_CONNECTIONS: u64 = 16;
/// Concurrent clients of the warm-up: as many as the participant's commits in flight during a
/// backlog (`COMMITS_IN_PARALLEL` in `participant/src/service.rs`).
const WARM_CLIENTS: usize = 16;
/// Transactions each warm-up client runs, every one a short read on every shard.
const WARM_TXNS: usize = 4;
/// How long recovery may take before the bench gives up.
const RECOVERY_LIMIT: Duration = Duration::from_secs(300);
const POLL: Duration = Duration::from_millis(100);
/// Below this many prepared branches left, poll every `FINE_POLL`: listing a few prepared
/// transactions costs PostgreSQL little, listing thousands every few ms would not.
const FINE_POLL_BELOW: i64 = 1_000;
const FINE_POLL: Duration = Duration::from_millis(5);
/// The targets for 10,000 transactions, restart to all finished: 2 s with the decision log (its
/// replay and every branch's COMMIT PREPARED), under 1 s with the decisions in the shards (one
/// prepared branch fewer per transaction, no log to replay).
fn target_seconds(store: DecisionStore) -> f64 {
    match store {
        DecisionStore::File | DecisionStore::Database => 2.0,
        DecisionStore::Shard => 1.0,
    }
}

/// Prepared Treaty branches left on every shard, over connections the caller keeps: a new
/// connection per poll would start and end a PostgreSQL backend each time, work that would be
/// counted as recovery's.
async fn prepared_treaty_gids(conns: &mut [PgConnection]) -> Result<i64> {
    let mut total = 0;
    for conn in conns {
        let n: i64 = sqlx::query_scalar(crate::PREPARED_TREATY_GIDS_SQL)
            .fetch_one(&mut *conn)
            .await?;
        total += n;
    }
    Ok(total)
}

/// Runs `WARM_CLIENTS` clients' transactions through the coordinator at once, each a 5 ms read
/// on every shard, so that every participant's pool opens about that many connections.
async fn warm_participants(endpoint: &str, shards: &[String]) -> Result<()> {
    let clients = (0..WARM_CLIENTS).map(|_| async {
        let mut client = treaty_driver::connect(endpoint).await?;
        for _ in 0..WARM_TXNS {
            let ops = shards
                .iter()
                .map(|shard| pb::Op {
                    shard: shard.clone(),
                    sql: "SELECT pg_sleep(0.005)::text".into(),
                    params: Vec::new(),
                    expect_rows: None,
                })
                .collect();
            let outcome = client
                .submit(pb::SubmitRequest {
                    ops,
                    options: None,
                    // Nothing of the warm-up may still be prepared when the coordinator is killed.
                    wait_for_apply: true,
                })
                .await?
                .into_inner()
                .outcome
                .unwrap_or_default();
            anyhow::ensure!(
                outcome.kind == pb::OutcomeKind::Committed as i32,
                "a warm-up transaction did not commit: {outcome:?}"
            );
        }
        anyhow::Ok(())
    });
    try_join_all(clients).await?;
    Ok(())
}

/// What one shard holds of one transaction once it is decided, as SQL to run on that shard.
#[derive(Debug, Clone)]
enum Branch {
    /// File store: the branch prepared with its marker row, under `treaty:<id>:<txid>:<shard>`.
    PreparedWithMarker,
    /// Shard store, the decision shard: the branch committed in one phase with its commit row,
    /// naming the shards to send COMMIT PREPARED to.
    DecisionRow {
        decision_shard: ShardName,
        participants: Vec<ShardName>,
    },
    /// Shard store, any other shard: the branch prepared under a GID naming the decision shard,
    /// without a marker row.
    PreparedUnderDecisionShard { decision_shard: ShardName },
}

impl Branch {
    /// The statements for transaction `txid` on `shard`. Every piece is a validated id, a shard
    /// name or an integer: safe to format into SQL (GIDs cannot be bind parameters).
    fn sql(&self, id: &CoordinatorId, txid: u64, shard: &ShardName) -> Result<String> {
        Ok(match self {
            Branch::PreparedWithMarker => {
                let gid = Gid::new(id, txid);
                let branch = BranchGid::new(&gid, shard);
                format!(
                    "BEGIN; INSERT INTO bench_recovery (id) VALUES ({txid}); \
                     INSERT INTO treaty.branches (gid, coordinator_id, txid) VALUES ('{gid}', '{id}', {txid}); \
                     PREPARE TRANSACTION '{branch}'"
                )
            }
            Branch::DecisionRow {
                decision_shard,
                participants,
            } => {
                let gid = Gid::with_decision_shard(id, txid, decision_shard)?;
                let participants = participants
                    .iter()
                    .map(|shard| format!("'{shard}'"))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!(
                    "BEGIN; INSERT INTO bench_recovery (id) VALUES ({txid}); \
                     INSERT INTO treaty.decisions (gid, outcome, coordinator_id, participants) \
                     VALUES ('{gid}', 'commit', '{id}', ARRAY[{participants}]::text[]); COMMIT"
                )
            }
            Branch::PreparedUnderDecisionShard { decision_shard } => {
                let gid = Gid::with_decision_shard(id, txid, decision_shard)?;
                let branch = BranchGid::new(&gid, shard);
                format!(
                    "BEGIN; INSERT INTO bench_recovery (id) VALUES ({txid}); PREPARE TRANSACTION '{branch}'"
                )
            }
        })
    }

    /// What each shard holds under `store` when `shards[decider]` is the decision shard.
    fn per_shard(store: DecisionStore, shards: &[ShardName], decider: usize) -> Vec<Branch> {
        match store {
            DecisionStore::File | DecisionStore::Database => vec![Branch::PreparedWithMarker; shards.len()],
            DecisionStore::Shard => {
                let decision_shard = shards[decider].clone();
                shards
                    .iter()
                    .enumerate()
                    .map(|(i, _)| {
                        if i == decider {
                            Branch::DecisionRow {
                                decision_shard: decision_shard.clone(),
                                participants: shards
                                    .iter()
                                    .enumerate()
                                    .filter(|&(j, _)| j != decider)
                                    .map(|(_, shard)| shard.clone())
                                    .collect(),
                            }
                        } else {
                            Branch::PreparedUnderDecisionShard {
                                decision_shard: decision_shard.clone(),
                            }
                        }
                    })
                    .collect()
            }
        }
    }

    fn is_prepared(&self) -> bool {
        !matches!(self, Branch::DecisionRow { .. })
    }
}

/// Commit rows left in `treaty.decisions` on every shard.
async fn decision_rows(conns: &mut [PgConnection]) -> Result<i64> {
    let mut total = 0;
    for conn in conns {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM treaty.decisions WHERE outcome = 'commit'")
            .fetch_one(&mut *conn)
            .await?;
        total += n;
    }
    Ok(total)
}

/// What every shard holds of every transaction: `branch(txid)[shard index]`.
struct Layout {
    /// One `per_shard` per possible decision shard.
    by_decider: Vec<Vec<Branch>>,
    decision_shards: DecisionShards,
}

impl Layout {
    fn new(store: DecisionStore, shards: &[ShardName], decision_shards: DecisionShards) -> Self {
        Layout {
            by_decider: (0..shards.len())
                .map(|decider| Branch::per_shard(store, shards, decider))
                .collect(),
            decision_shards,
        }
    }

    fn branches(&self, txid: u64) -> &[Branch] {
        let decider = match self.decision_shards {
            DecisionShards::Spread => (txid % self.by_decider.len() as u64) as usize,
            DecisionShards::First => 0,
        };
        &self.by_decider[decider]
    }

    /// Prepared branches per transaction (the same whichever shard decides).
    fn prepared_per_txn(&self) -> u64 {
        self.by_decider[0].iter().filter(|b| b.is_prepared()).count() as u64
    }
}

/// Leaves `txids` on the `index`th shard as `layout` says, over several connections.
async fn prepare_on_shard(
    pg: &PgCluster,
    shard: &ShardName,
    index: usize,
    layout: &Layout,
    id: &CoordinatorId,
    txids: std::ops::Range<u64>,
    progress: &ProgressBar,
) -> Result<()> {
    // Connection k prepares txids k, k + 16, k + 32, ...: branches are prepared in about txid
    // order, as a coordinator's live transactions are (txids are handed out at Begin), not in 16
    // ranges side by side.
    let workers = (0..PREPARE_CONNECTIONS).map(|k| {
        let txids = txids.clone();
        async move {
            let mut conn = pg.connect(DATABASE).await?;
            for txid in txids.skip(k as usize).step_by(PREPARE_CONNECTIONS as usize) {
                let sql = layout.branches(txid)[index].sql(id, txid, shard)?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&mut conn)
                    .await
                    .with_context(|| format!("setting up txid {txid} on {}", pg.name()))?;
                progress.inc(1);
            }
            anyhow::Ok(())
        }
    });
    try_join_all(workers).await?;
    Ok(())
}

pub async fn run(args: &BenchArgs) -> Result<()> {
    anyhow::ensure!(
        (1..=50_000).contains(&args.txns),
        "--txns must be between 1 and 50000"
    );
    anyhow::ensure!((1..=8).contains(&args.shards), "--shards must be between 1 and 8");
    let stores = args.stores();
    anyhow::ensure!(
        stores.len() == 1,
        "recovery measures one decision store at a time: run it once per store"
    );
    let store = stores[0];
    anyhow::ensure!(
        store != DecisionStore::Database,
        "recovery measures the file and shard stores; a decision database's recovery is the file \
         store's with the commit records read from its rows (tests/e2e/decision_database.rs)"
    );
    anyhow::ensure!(
        store == DecisionStore::File || args.shards >= 2,
        "recovery with --decision-store shard needs --shards of at least 2 (one decision shard, \
         one prepared branch)"
    );
    let decision_shards = match (store, args.decision_shards) {
        (DecisionStore::Shard, choice) => choice.unwrap_or(DecisionShards::Spread),
        (_, None) => DecisionShards::First,
        (_, Some(_)) => anyhow::bail!(
            "--decision-shards places the shard store's commit rows; it does not apply to --decision-store {}",
            store.name()
        ),
    };
    let txns = args.txns;
    let temp = tempfile::Builder::new()
        .prefix("treaty-bench-recovery-")
        .tempdir()?;
    let base_dir = match &args.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            std::fs::canonicalize(dir)?
        }
        None => temp.path().to_path_buf(),
    };
    eprintln!(
        "starting {} shards ({} participants) and a coordinator in {} (max_prepared_transactions {})",
        args.shards,
        args.participant_kind().name(),
        base_dir.display(),
        txns + 100
    );
    let mut cluster = LocalCluster::start(ClusterSpec {
        shards: args.shards,
        base_dir: base_dir.clone(),
        pg: PgOptions {
            max_prepared_transactions: (txns as u32).saturating_add(100),
            extra: args.pg_settings.clone(),
            ..PgOptions::default()
        },
        coordinator_args: [
            super::service_thread_args(args.service_threads),
            store.coordinator_args(None),
        ]
        .concat(),
        participant_args: super::service_thread_args(args.service_threads),
        database: DATABASE.into(),
        coordinator_port: 0,
        // In process, the restarted coordinator starts its participants again and finishes the
        // branches through them; their CPU is the coordinator's.
        in_process: args.participant_kind().in_process(),
        tls: None,
    })
    .await
    .context("starting the local cluster")?;
    for pg in &cluster.pgs {
        let mut conn = pg.connect(DATABASE).await?;
        sqlx::raw_sql("CREATE TABLE bench_recovery (id bigint PRIMARY KEY)")
            .execute(&mut conn)
            .await
            .with_context(|| format!("creating bench_recovery on {}", pg.name()))?;
    }

    warm_participants(&cluster.coordinator.endpoint(), &cluster.shard_names)
        .await
        .context("warming the participants' pools")?;
    // The warm-up's commit rows are forgotten in batches after its commits; wait them out, so
    // that the restarted coordinator finds only the bench's.
    {
        let mut conns = try_join_all(cluster.pgs.iter().map(|pg| pg.connect(DATABASE))).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while decision_rows(&mut conns).await? > 0 {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the warm-up's commit rows were not forgotten within 30 s"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    // 1. The coordinator goes away; its log stays.
    cluster.coordinator.kill9()?;
    cluster
        .coordinator
        .wait_exit(Duration::from_secs(10))
        .await?
        .context("the coordinator did not exit after SIGKILL")?;
    let log_dir = base_dir.join("coordinator");
    let (log, replay) = {
        let dir = log_dir.clone();
        tokio::task::spawn_blocking(move || DecisionLog::open(&dir, LogOptions::default()))
            .await?
            .with_context(|| format!("opening the decision log in {}", log_dir.display()))?
    };
    let id_text = replay
        .coordinator_id
        .clone()
        .context("the coordinator's log has no header")?;
    let id = CoordinatorId::new(&id_text).context("the coordinator id in the log")?;
    let first = replay.txids_reserved_up_to + 1;
    let txids = first..first + txns;
    log.reserve_txids(txids.end).await?;

    // 2. Prepared branches, as participants leave them after voting YES (with the shard store,
    //    the decision shard's branches committed with their commit rows instead).
    let setup = Instant::now();
    let progress = ProgressBar::new(txns * cluster.pgs.len() as u64);
    progress.set_message("preparing");
    let shards = cluster
        .shard_names
        .iter()
        .map(|name| ShardName::new(name))
        .collect::<Result<Vec<_>, _>>()?;
    let layout = Layout::new(store, &shards, decision_shards);
    try_join_all(
        cluster
            .pgs
            .iter()
            .zip(&shards)
            .enumerate()
            .map(|(index, (pg, shard))| {
                prepare_on_shard(pg, shard, index, &layout, &id, txids.clone(), &progress)
            }),
    )
    .await?;
    progress.finish_and_clear();
    let prepare_seconds = setup.elapsed().as_secs_f64();
    let prepared_branches = txns * layout.prepared_per_txn();

    // 3. The commit decisions, as the coordinator logs them (forced, group-committed); none in
    //    the log with the shard store, whose decisions are the rows written above.
    let participants = cluster.shard_names.clone();
    let decided_at_ms = treaty_proto::now_ms();
    let mut next = txids.start;
    while store == DecisionStore::File && next < txids.end {
        let chunk_end = (next + 1000).min(txids.end);
        try_join_all((next..chunk_end).map(|txid| {
            log.commit(CommitRecord {
                txid,
                gid: Gid::new(&id, txid).to_string(),
                participants: participants.clone(),
                decided_at_ms,
            })
        }))
        .await?;
        next = chunk_end;
    }
    // Dropping the last handle joins the writer thread after a final sync.
    tokio::task::spawn_blocking(move || drop(log)).await?;
    eprintln!(
        "{txns} transactions left on {} shards in {prepare_seconds:.1} s ({prepared_branches} prepared branches), \
         decided in the {} store; restarting the coordinator",
        cluster.pgs.len(),
        store.name()
    );
    let mut polls = try_join_all(cluster.pgs.iter().map(|pg| pg.connect(DATABASE))).await?;
    let before = prepared_treaty_gids(&mut polls).await?;
    anyhow::ensure!(
        before == prepared_branches as i64,
        "expected {prepared_branches} prepared branches, found {before}"
    );
    let rows_before = decision_rows(&mut polls).await?;
    let participants_before: u64 = cluster
        .participants
        .iter()
        .filter_map(|p| p.pid())
        .map(cpu::process_ticks)
        .sum();

    let postgres_ticks = || -> u64 {
        cluster
            .pgs
            .iter()
            .filter_map(|pg| cpu::postmaster_pid(pg.data_dir()))
            .map(cpu::tree_ticks)
            .sum()
    };
    let postgres_before = postgres_ticks();

    // 4. Restart and time.
    let restarted = Instant::now();
    cluster
        .coordinator
        .restart()
        .await
        .context("restarting the coordinator")?;
    let listening = restarted.elapsed();
    let mut last_print = Instant::now();
    let left = loop {
        let left = prepared_treaty_gids(&mut polls).await?;
        if left == 0 || restarted.elapsed() > RECOVERY_LIMIT {
            break left;
        }
        if last_print.elapsed() >= Duration::from_secs(2) {
            eprintln!(
                "[{:>6.1}s] {left} prepared branches left",
                restarted.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(if left < FINE_POLL_BELOW { FINE_POLL } else { POLL }).await;
    };
    let seconds = restarted.elapsed().as_secs_f64();
    let coordinator_ticks = cluster.coordinator.pid().map_or(0, cpu::process_ticks);
    let participant_ticks = cluster
        .participants
        .iter()
        .filter_map(|p| p.pid())
        .map(cpu::process_ticks)
        .sum::<u64>()
        .saturating_sub(participants_before);
    // Includes this loop's polls of pg_prepared_xacts (10 a second per shard, 200 once fewer than
    // FINE_POLL_BELOW are left).
    let postgres_cpu_s = cpu::ticks_to_us(postgres_ticks().saturating_sub(postgres_before)) / 1e6;
    // The shard store's commit rows outlive the commits a little: they are forgotten in batches
    // after every branch committed. Not part of the recovery time (nothing waits on them), but a
    // row never forgotten would be re-driven at every restart, so its time is reported too.
    let mut rows_left = decision_rows(&mut polls).await?;
    let mut rows_forgotten_s = None;
    if rows_before > 0 {
        while rows_left > 0 && restarted.elapsed() < RECOVERY_LIMIT {
            tokio::time::sleep(POLL).await;
            rows_left = decision_rows(&mut polls).await?;
        }
        if rows_left == 0 {
            rows_forgotten_s = Some(restarted.elapsed().as_secs_f64());
        }
    }
    let mut rows_ok = true;
    for pg in &cluster.pgs {
        let mut conn = pg.connect(DATABASE).await?;
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM bench_recovery")
            .fetch_one(&mut conn)
            .await?;
        rows_ok &= rows == txns as i64;
    }
    let txns_per_s = if seconds > 0.0 { txns as f64 / seconds } else { 0.0 };
    let coordinator_cpu_s = cpu::ticks_to_us(coordinator_ticks) / 1e6;
    let participant_cpu_s = cpu::ticks_to_us(participant_ticks) / 1e6;
    let met = left == 0 && rows_ok && seconds < target_seconds(store) * (txns as f64 / 10_000.0).max(1.0);
    println!(
        "recovery of {txns} decided, unfinished commits over {} shards (decision store: {}{})",
        cluster.pgs.len(),
        store.name(),
        if store == DecisionStore::Shard {
            format!(", decision shards {}", decision_shards.name())
        } else {
            String::new()
        }
    );
    println!(
        "  restart to listening:          {:.3} s",
        listening.as_secs_f64()
    );
    println!("  restart to all finished:       {seconds:.3} s ({txns_per_s:.0} txns/s)");
    println!("  prepared branches left:        {left}");
    println!("  every shard holds every row:   {rows_ok}");
    if rows_before > 0 {
        println!(
            "  commit rows forgotten after:   {} ({rows_before} rows, {rows_left} left)",
            rows_forgotten_s.map_or("-".to_string(), |s| format!("{s:.3} s"))
        );
    }
    println!("  coordinator CPU (whole life):  {coordinator_cpu_s:.2} s");
    println!("  participants CPU (recovery):   {participant_cpu_s:.2} s");
    println!("  PostgreSQL CPU (recovery):     {postgres_cpu_s:.2} s");
    println!("  setup (prepare {prepared_branches} branches):   {prepare_seconds:.1} s");
    if args.json {
        println!(
            "{}",
            json!({
                "workload": "recovery",
                "status": if left == 0 && rows_ok { "ok" } else { "incomplete" },
                "decision_store": store.name(),
                "decision_shards": (store == DecisionStore::Shard).then(|| decision_shards.name()),
                "participant_kind": args.participant_kind().name(),
                "txns": txns,
                "shards": cluster.pgs.len(),
                // Prepared branches to finish (the shard store's decision branches committed).
                "branches": prepared_branches,
                "decision_rows": rows_before,
                "decision_rows_left": rows_left,
                "rows_forgotten_s": rows_forgotten_s.map(|s| (s * 1000.0).round() / 1000.0),
                "seconds": (seconds * 1000.0).round() / 1000.0,
                "listening_s": (listening.as_secs_f64() * 1000.0).round() / 1000.0,
                "txns_per_s": txns_per_s.round(),
                "prepared_left": left,
                "rows_ok": rows_ok,
                "coordinator_cpu_s": (coordinator_cpu_s * 1000.0).round() / 1000.0,
                "participant_cpu_s": (participant_cpu_s * 1000.0).round() / 1000.0,
                "postgres_cpu_s": (postgres_cpu_s * 1000.0).round() / 1000.0,
                "prepare_setup_s": (prepare_seconds * 10.0).round() / 10.0,
                "target_s_per_10k": target_seconds(store),
                "target_met": met,
                "fsync": true,
                "pg_settings": args.pg_settings.iter().map(|(n, v)| format!("{n}={v}")).collect::<Vec<_>>(),
            })
        );
    }
    drop(cluster);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shard_store_leaves_a_commit_row_on_the_decision_shard_and_bare_prepared_branches() {
        let id = CoordinatorId::new("c1").unwrap();
        let shards: Vec<ShardName> = ["s0", "s1", "s2"]
            .into_iter()
            .map(|name| ShardName::new(name).unwrap())
            .collect();
        let branches = Branch::per_shard(DecisionStore::Shard, &shards, 0);
        assert_eq!(branches.iter().filter(|b| b.is_prepared()).count(), 2);
        assert_eq!(
            branches[0].sql(&id, 7, &shards[0]).unwrap(),
            "BEGIN; INSERT INTO bench_recovery (id) VALUES (7); \
             INSERT INTO treaty.decisions (gid, outcome, coordinator_id, participants) \
             VALUES ('treaty:c1:7@s0', 'commit', 'c1', ARRAY['s1', 's2']::text[]); COMMIT"
        );
        assert_eq!(
            branches[2].sql(&id, 7, &shards[2]).unwrap(),
            "BEGIN; INSERT INTO bench_recovery (id) VALUES (7); PREPARE TRANSACTION 'treaty:c1:7@s0:s2'"
        );
        let file = Branch::per_shard(DecisionStore::File, &shards, 0);
        assert!(file.iter().all(Branch::is_prepared));
        let sql = file[1].sql(&id, 7, &shards[1]).unwrap();
        assert!(
            sql.contains("treaty.branches") && sql.ends_with("PREPARE TRANSACTION 'treaty:c1:7:s1'"),
            "{sql}"
        );
    }

    #[test]
    fn spread_decisions_rotate_over_the_shards_and_first_keeps_them_on_one() {
        let id = CoordinatorId::new("c1").unwrap();
        let shards: Vec<ShardName> = ["s0", "s1", "s2"]
            .into_iter()
            .map(|name| ShardName::new(name).unwrap())
            .collect();
        let spread = Layout::new(DecisionStore::Shard, &shards, DecisionShards::Spread);
        assert_eq!(spread.prepared_per_txn(), 2);
        // Txid 7 is decided on s1 (7 mod 3): its row names the other two, which prepare under it.
        let branches = spread.branches(7);
        assert!(!branches[1].is_prepared());
        assert!(
            branches[1]
                .sql(&id, 7, &shards[1])
                .unwrap()
                .contains("VALUES ('treaty:c1:7@s1', 'commit', 'c1', ARRAY['s0', 's2']::text[])")
        );
        assert!(
            branches[0]
                .sql(&id, 7, &shards[0])
                .unwrap()
                .ends_with("PREPARE TRANSACTION 'treaty:c1:7@s1:s0'")
        );
        // Every shard decides a third of the transactions.
        for shard in 0..3 {
            let decided = (0..300u64)
                .filter(|&txid| !spread.branches(txid)[shard].is_prepared())
                .count();
            assert_eq!(decided, 100, "shard {shard}");
        }
        let first = Layout::new(DecisionStore::Shard, &shards, DecisionShards::First);
        assert!((0..30u64).all(|txid| !first.branches(txid)[0].is_prepared()));
        assert!((0..30u64).all(|txid| first.branches(txid)[1..].iter().all(Branch::is_prepared)));
    }
}
