//! The benchmark workloads and the transactions they generate. Every system (Treaty and the
//! baselines) runs the same [`TxnPlan`]s: per shard, an ordered list of statements.
//!
//! Accounts `0..accounts` live on shard `id % shards` in table `bench_accounts`. An account is
//! picked per shard by rank (uniform or Zipfian, rank 0 hottest), `id = rank * shards + shard`.
//!
//! - `transfer`: every shard of the cluster takes part: one debit, a credit on each other shard.
//! - `single`: one UPDATE on one random shard (Treaty's one-phase path).
//! - `read-mostly`: two point reads on every shard and one UPDATE on one random shard.

use std::sync::Arc;

use anyhow::{Context, Result};
use rand::Rng;
use treaty_harness::PgCluster;

use super::zipf::Zipf;

pub const DATABASE: &str = "bench";
pub const INITIAL_BALANCE: i64 = 1_000_000;

const UPDATE: &str = "UPDATE bench_accounts SET balance = balance + $1 WHERE id = $2";
const READ: &str = "SELECT balance FROM bench_accounts WHERE id = $1";
/// Every statement the workloads run (the pipelined baseline prepares them once per connection).
pub const STATEMENTS: [&str; 2] = [UPDATE, READ];

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    /// Cross-shard transfers over every shard (K = --shards).
    Transfer,
    /// One-shard updates (one-phase commit).
    Single,
    /// Reads on every shard, one write.
    ReadMostly,
    /// Recovery speed: N logged, unfinished commits finished after a coordinator restart.
    Recovery,
}

impl WorkloadKind {
    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::Transfer => "transfer",
            WorkloadKind::Single => "single",
            WorkloadKind::ReadMostly => "read-mostly",
            WorkloadKind::Recovery => "recovery",
        }
    }
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skew {
    Uniform,
    Zipfian,
}

/// One statement with integer parameters.
#[derive(Debug, Clone)]
pub struct Stmt {
    pub sql: &'static str,
    pub params: Vec<i64>,
    /// Rows the statement must affect, or the transaction aborts.
    pub expect_rows: Option<u64>,
    pub writes: bool,
}

/// The statements of one transaction on one shard.
#[derive(Debug, Clone)]
pub struct ShardWork {
    pub shard: usize,
    pub stmts: Vec<Stmt>,
}

impl ShardWork {
    pub fn writes(&self) -> bool {
        self.stmts.iter().any(|s| s.writes)
    }
}

/// One transaction: each shard appears at most once.
#[derive(Debug, Clone)]
pub struct TxnPlan {
    pub work: Vec<ShardWork>,
}

impl TxnPlan {
    /// How many shards write (2PC is needed only when more than one does).
    pub fn writers(&self) -> usize {
        self.work.iter().filter(|w| w.writes()).count()
    }
}

/// Generates transactions; cheap to clone (the Zipf table is shared).
#[derive(Clone)]
pub struct Generator {
    kind: WorkloadKind,
    shards: usize,
    per_shard: u64,
    zipf: Option<Arc<Zipf>>,
}

impl Generator {
    pub fn new(
        kind: WorkloadKind,
        shards: usize,
        accounts: u64,
        skew: Skew,
        theta: f64,
    ) -> Result<Generator> {
        anyhow::ensure!(shards >= 1, "at least one shard");
        let per_shard = accounts / shards as u64;
        anyhow::ensure!(per_shard >= 1, "--accounts must be at least --shards");
        let zipf = match skew {
            Skew::Uniform => None,
            Skew::Zipfian => Some(Arc::new(Zipf::new(per_shard, theta).map_err(anyhow::Error::msg)?)),
        };
        Ok(Generator {
            kind,
            shards,
            per_shard,
            zipf,
        })
    }

    fn account<R: Rng + ?Sized>(&self, rng: &mut R, shard: usize) -> i64 {
        let rank = match &self.zipf {
            Some(zipf) => zipf.sample(rng),
            None => rng.random_range(0..self.per_shard),
        };
        (rank * self.shards as u64 + shard as u64) as i64
    }

    fn update<R: Rng + ?Sized>(&self, rng: &mut R, shard: usize, delta: i64) -> Stmt {
        Stmt {
            sql: UPDATE,
            params: vec![delta, self.account(rng, shard)],
            expect_rows: Some(1),
            writes: true,
        }
    }

    pub fn next<R: Rng + ?Sized>(&self, rng: &mut R) -> TxnPlan {
        let work = match self.kind {
            WorkloadKind::Transfer => {
                let amount = rng.random_range(1..=10i64);
                let debit = rng.random_range(0..self.shards);
                let credits = (self.shards as i64 - 1).max(1);
                (0..self.shards)
                    .map(|shard| {
                        let delta = if shard == debit { -amount * credits } else { amount };
                        ShardWork {
                            shard,
                            stmts: vec![self.update(rng, shard, delta)],
                        }
                    })
                    .collect()
            }
            WorkloadKind::Single => {
                let shard = rng.random_range(0..self.shards);
                let delta = rng.random_range(-5..=5i64);
                vec![ShardWork {
                    shard,
                    stmts: vec![self.update(rng, shard, delta)],
                }]
            }
            WorkloadKind::ReadMostly | WorkloadKind::Recovery => {
                let writer = rng.random_range(0..self.shards);
                (0..self.shards)
                    .map(|shard| {
                        let mut stmts: Vec<Stmt> = (0..2)
                            .map(|_| Stmt {
                                sql: READ,
                                params: vec![self.account(rng, shard)],
                                expect_rows: None,
                                writes: false,
                            })
                            .collect();
                        if shard == writer {
                            stmts.push(self.update(rng, shard, 1));
                        }
                        ShardWork { shard, stmts }
                    })
                    .collect()
            }
        };
        TxnPlan { work }
    }
}

/// Creates and fills `bench_accounts` on every shard (account `id` on shard `id % shards`).
pub async fn create_schema(pgs: &[PgCluster], accounts: u64) -> Result<()> {
    let shards = pgs.len() as i64;
    for (index, pg) in pgs.iter().enumerate() {
        let mut conn = pg.connect(DATABASE).await?;
        sqlx::raw_sql(
            "DROP TABLE IF EXISTS bench_accounts;
             CREATE TABLE bench_accounts (id bigint PRIMARY KEY, balance bigint NOT NULL);",
        )
        .execute(&mut conn)
        .await
        .with_context(|| format!("creating bench_accounts on shard {index}"))?;
        sqlx::query(
            "INSERT INTO bench_accounts (id, balance) \
             SELECT id, $1 FROM generate_series(0, $2 - 1) AS id WHERE id % $3 = $4",
        )
        .bind(INITIAL_BALANCE)
        .bind(accounts as i64)
        .bind(shards)
        .bind(index as i64)
        .execute(&mut conn)
        .await
        .with_context(|| format!("filling bench_accounts on shard {index}"))?;
        sqlx::raw_sql("VACUUM ANALYZE bench_accounts")
            .execute(&mut conn)
            .await
            .with_context(|| format!("vacuuming bench_accounts on shard {index}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn transfers_touch_every_shard_and_conserve_money() {
        let generator = Generator::new(WorkloadKind::Transfer, 3, 300, Skew::Uniform, 0.99).expect("valid");
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..100 {
            let plan = generator.next(&mut rng);
            assert_eq!(plan.work.len(), 3);
            assert_eq!(plan.writers(), 3);
            let mut total = 0;
            for work in &plan.work {
                let account = work.stmts[0].params[1];
                assert_eq!(account % 3, work.shard as i64, "account on its shard");
                assert!((0..300).contains(&account));
                total += work.stmts[0].params[0];
            }
            assert_eq!(total, 0);
        }
    }

    #[test]
    fn read_mostly_has_one_writer() {
        let generator = Generator::new(WorkloadKind::ReadMostly, 2, 100, Skew::Zipfian, 0.9).expect("valid");
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let plan = generator.next(&mut rng);
        assert_eq!(plan.work.len(), 2);
        assert_eq!(plan.writers(), 1);
    }
}
