//! A shard's PostgreSQL with a synchronous streaming standby (`topology.standby`), and the
//! `pg-failover` step that promotes it. The standbys start once the cluster is up and before the
//! workload (`treaty_harness::standby`: `pg_basebackup -R`, and the primary waits for its standby
//! on every commit, so the promoted standby holds every commit the primary acknowledged).
//!
//! A failover stops the primary `-m immediate`, promotes the standby, restarts the shard's
//! participant with the promoted standby's database URL, and puts the promoted standby in the
//! primary's place in `LocalCluster::pgs`. That swap is what keeps the rest of the run honest:
//! every later step (`pg-stop`, `pg-start`, `kill9`/`restart` of `pg:<shard>` or of the
//! participant, which restarts with its new arguments), the epilogue and the checker (markers,
//! `pg_prepared_xacts`, decision rows) reach the promoted server, never the dead primary.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use treaty_harness::{LocalCluster, PgCluster};

use super::checker::DATABASE;
use super::timeline::Timeline;

/// The longest a standby may take to stream synchronously, or to accept writes once promoted.
const STANDBY_READY: Duration = Duration::from_secs(30);

/// The standbys a scenario started, and the primaries they replaced.
#[derive(Default)]
pub struct Standbys {
    /// Shard index -> its standby, until a `pg-failover` promotes it.
    waiting: BTreeMap<usize, PgCluster>,
    /// Primaries a failover stopped. Held rather than dropped so that `--keep` keeps their data
    /// directories too (dropping a stopped server does nothing else).
    retired: Vec<PgCluster>,
}

impl Standbys {
    /// Starts a synchronous standby of each shard in `shards` (indices into the cluster's shards),
    /// returning once each streams synchronously.
    pub async fn start(cluster: &LocalCluster, shards: &[usize], timeline: &Timeline) -> Result<Standbys> {
        let mut standbys = Standbys::default();
        for &shard in shards {
            let (name, primary) = cluster
                .shard_names
                .get(shard)
                .zip(cluster.pgs.get(shard))
                .with_context(|| format!("a standby of shard {shard}: the cluster has no such shard"))?;
            let standby = treaty_harness::standby::start_standby(
                primary,
                &cluster.base_dir,
                &format!("{name}-standby"),
                STANDBY_READY,
            )
            .await
            .with_context(|| format!("starting the synchronous standby of PostgreSQL {name}"))?;
            timeline.note(format!(
                "PostgreSQL {name} (port {}) has a synchronous streaming standby (port {})",
                primary.port(),
                standby.port()
            ));
            standbys.waiting.insert(shard, standby);
        }
        Ok(standbys)
    }

    /// Fails shard `shard`'s PostgreSQL over to its standby: stops the primary `-m immediate`
    /// (a crash; it may already be down), promotes the standby, makes it the shard's PostgreSQL
    /// in `cluster.pgs`, and restarts the shard's participant on it. Returns what happened, for
    /// the timeline.
    pub async fn fail_over(&mut self, cluster: &mut LocalCluster, shard: usize) -> Result<String> {
        let name = cluster
            .shard_names
            .get(shard)
            .cloned()
            .with_context(|| format!("pg-failover: the cluster has no shard {shard}"))?;
        let standby = self.waiting.remove(&shard).with_context(|| {
            format!("pg-failover: PostgreSQL {name} has no standby left to promote (topology.standby)")
        })?;
        let primary = &cluster.pgs[shard];
        let was_running = primary.is_running();
        if was_running {
            primary
                .stop_immediate()
                .await
                .with_context(|| format!("stopping PostgreSQL {name} -m immediate"))?;
        }
        treaty_harness::standby::promote(&standby, STANDBY_READY)
            .await
            .with_context(|| format!("promoting the standby of PostgreSQL {name}"))?;
        let old_url = primary.url(DATABASE);
        let new_url = standby.url(DATABASE);
        let participant = &mut cluster.participants[shard];
        let args = repoint(participant.args(), &old_url, &new_url)
            .with_context(|| format!("pointing participant {name} at the promoted standby"))?;
        let primary = std::mem::replace(&mut cluster.pgs[shard], standby);
        self.retired.push(primary);
        participant
            .restart_with_args(args)
            .await
            .with_context(|| format!("restarting participant {name} on the promoted standby"))?;
        Ok(format!(
            "PostgreSQL {name} failed over: the primary {}, its standby promoted (port {}), participant {name} \
             restarted on it",
            if was_running {
                "stopped with -m immediate (crash)"
            } else {
                "was already down"
            },
            cluster.pgs[shard].port()
        ))
    }

    /// Leaves every standby and retired primary running (or its data directory in place) when
    /// dropped, for `--keep`.
    pub fn keep_on_drop(&mut self) {
        for pg in self.waiting.values_mut().chain(self.retired.iter_mut()) {
            pg.keep_on_drop();
        }
    }
}

/// A participant's arguments with its database URL `old_url` replaced by `new_url`; an error if
/// it does not run with `old_url`, since then restarting it would not move it anywhere.
fn repoint(args: &[String], old_url: &str, new_url: &str) -> Result<Vec<String>> {
    if !args.iter().any(|arg| arg == old_url) {
        bail!("it does not run with the primary's database URL {old_url}: {args:?}");
    }
    Ok(args
        .iter()
        .map(|arg| {
            if arg == old_url {
                new_url.to_owned()
            } else {
                arg.clone()
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_participant_is_repointed_by_its_database_url_and_nothing_else() {
        let args: Vec<String> = [
            "--shard",
            "s0",
            "--database-url",
            "postgres://postgres@127.0.0.1:5000/treaty",
            "--data-dir",
            "/tmp/x",
        ]
        .map(String::from)
        .to_vec();
        let moved = repoint(
            &args,
            "postgres://postgres@127.0.0.1:5000/treaty",
            "postgres://postgres@127.0.0.1:6000/treaty",
        )
        .unwrap();
        assert_eq!(moved[3], "postgres://postgres@127.0.0.1:6000/treaty");
        assert_eq!(moved[..3], args[..3]);
        assert_eq!(moved[4..], args[4..]);
        let error = repoint(&args, "postgres://postgres@127.0.0.1:7000/treaty", "x")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("does not run with the primary's database URL"),
            "{error}"
        );
    }
}
