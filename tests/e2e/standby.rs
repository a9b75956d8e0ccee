//! The decision database fails over to a synchronous standby. Shard s0 holds the decision rows
//! (`--decision-store shard`, every submit writes s0 first) on a primary that waits for a
//! streaming standby on every commit. Under a bounded load of two-shard submits the primary is
//! stopped `-m immediate`, the standby promoted and s0's participant restarted on it: every submit
//! acknowledged as committed is on both shards, none is on one shard only, and nothing is left
//! prepared anywhere, the promoted standby included.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sqlx::Connection;
use treaty_harness::PgCluster;

use crate::fixture::*;

const CLIENTS: usize = 3;
/// Per client, whatever happens: the load is bounded.
const MAX_SUBMITS: i64 = 400;
const RECOVERY: Duration = Duration::from_secs(30);

/// How one submit ended, as its client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Committed,
    NotCommitted,
}

async fn keys(pg: &PgCluster) -> Result<BTreeSet<i64>> {
    let mut conn = pg.connect(DATABASE).await?;
    let keys: Vec<i64> = sqlx::query_scalar("SELECT k FROM kv")
        .fetch_all(&mut conn)
        .await?;
    let _ = conn.close().await;
    Ok(keys.into_iter().collect())
}

async fn prepared_on(pg: &PgCluster) -> Result<i64> {
    let mut conn = pg.connect(DATABASE).await?;
    let count = sqlx::query_scalar("SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE 'treaty:%'")
        .fetch_one(&mut conn)
        .await?;
    let _ = conn.close().await;
    Ok(count)
}

#[tokio::test]
async fn acknowledged_commits_survive_the_decision_database_failing_over_to_its_standby() -> Result<()> {
    let started = Instant::now();
    let mut t = TestCluster::start(Options {
        coordinator_args: vec!["--decision-store".into(), "shard".into()],
        ..Options::default()
    })
    .await?;
    let standby = treaty_harness::standby::start_standby(
        &t.cluster.pgs[0],
        t.dir.path(),
        "s0-standby",
        Duration::from_secs(30),
    )
    .await
    .context("starting s0's synchronous standby")?;

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for client_no in 0..CLIENTS as i64 {
        let mut client = t.client().await?;
        let (s0, s1) = (t.shard(0), t.shard(1));
        let (stop, acked) = (stop.clone(), acked.clone());
        clients.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for n in 0..MAX_SUBMITS {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let k = client_no * 1_000_000 + n;
                let request = submit(vec![insert(&s0, k, "v"), insert(&s1, k, "v")]);
                let outcome = match client.submit(request).await {
                    Ok(response) if committed(&response.get_ref().outcome) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                        Seen::Committed
                    }
                    Ok(_) => Seen::NotCommitted,
                    Err(_) => {
                        // An error says nothing about the outcome; don't spin while s0 is down.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Seen::NotCommitted
                    }
                };
                seen.push((k, outcome));
            }
            seen
        }));
    }

    // Mid-load: kill the primary, promote the standby, move s0's participant onto it.
    eventually("some submits acknowledged", RECOVERY, || async {
        Ok(acked.load(Ordering::Relaxed) >= 30)
    })
    .await?;
    t.cluster.pgs[0].stop_immediate().await?;
    let acked_at_kill = acked.load(Ordering::Relaxed);
    treaty_harness::standby::promote(&standby, Duration::from_secs(30)).await?;
    let old_url = t.cluster.pgs[0].url(DATABASE);
    let args: Vec<String> = t.cluster.participants[0]
        .args()
        .iter()
        .map(|arg| {
            if *arg == old_url {
                standby.url(DATABASE)
            } else {
                arg.clone()
            }
        })
        .collect();
    if !args.contains(&standby.url(DATABASE)) {
        bail!("s0's participant does not run with --database-url {old_url}: {args:?}");
    }
    t.cluster.participants[0].restart_with_args(args).await?;
    // The load goes on against the promoted standby before it stops.
    let recovered = eventually("submits acknowledged after the failover", RECOVERY, || async {
        Ok(acked.load(Ordering::Relaxed) >= acked_at_kill + 20)
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut seen = Vec::new();
    for client in clients {
        seen.extend(client.await?);
    }
    recovered?;

    eventually(
        "nothing prepared on s1, s2 or the promoted standby",
        RECOVERY,
        || async {
            Ok(prepared_on(&standby).await? == 0
                && prepared_on(&t.cluster.pgs[1]).await? == 0
                && prepared_on(&t.cluster.pgs[2]).await? == 0)
        },
    )
    .await?;
    let on_s0 = keys(&standby).await?;
    let on_s1 = keys(&t.cluster.pgs[1]).await?;
    let half: Vec<&i64> = on_s0.symmetric_difference(&on_s1).collect();
    assert!(half.is_empty(), "keys on one shard only: {half:?}");
    let lost: Vec<i64> = seen
        .iter()
        .filter(|(k, outcome)| *outcome == Seen::Committed && !(on_s0.contains(k) && on_s1.contains(k)))
        .map(|(k, _)| *k)
        .collect();
    assert!(lost.is_empty(), "acknowledged commits missing: {lost:?}");
    let committed = seen.iter().filter(|(_, o)| *o == Seen::Committed).count();
    eprintln!(
        "{} submits, {committed} acknowledged committed ({acked_at_kill} before the kill), {} keys on both \
         shards; {:?} in all",
        seen.len(),
        on_s0.len(),
        started.elapsed()
    );
    Ok(())
}
