//! `ListPrepared`: the Treaty branches PostgreSQL holds prepared in this participant's database,
//! each with its age and the locks it holds, for the operator's `treaty in-doubt`.
//!
//! This shard's branches are reported under their transaction's GID (what the coordinator, its log
//! and `treaty resolve` know), whichever form PostgreSQL holds them under; any other Treaty-looking
//! GID in this database is reported as PostgreSQL holds it.
//!
//! A prepared transaction has no backend: its locks show in `pg_locks` with a NULL pid under the
//! virtual transaction id of the dummy process that holds them. That id is not derived from the xid
//! (on PostgreSQL 15 it reads like `3/7`, not `-1/<xid>`), so the query finds it through the lock
//! on the transaction's own xid and then takes every lock held under it, relation locks included.

use std::collections::BTreeMap;

use treaty_proto::{BranchGid, ShardName, pb};

use crate::postgres::{DbError, retrying};

/// One row of the join: a prepared GID and one of its locks (none when it holds no lock).
type Row = (
    String,
    i64,
    i64,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<bool>,
);

const QUERY: &str = "SELECT p.gid, \
        (extract(epoch FROM p.prepared) * 1000)::bigint, \
        (extract(epoch FROM clock_timestamp() - p.prepared) * 1000)::bigint, \
        p.owner::text, \
        l.locktype, l.mode, \
        CASE WHEN l.relation IS NULL THEN NULL ELSE l.relation::regclass::text END, \
        l.granted \
     FROM pg_prepared_xacts p \
     LEFT JOIN pg_locks x ON x.locktype = 'transactionid' AND x.transactionid = p.transaction \
          AND x.pid IS NULL \
     LEFT JOIN pg_locks l ON l.virtualtransaction = x.virtualtransaction AND l.pid IS NULL \
     WHERE p.database = current_database() AND p.gid LIKE 'treaty:%' \
     ORDER BY p.prepared, p.gid, l.locktype, l.relation";

/// Every Treaty-looking branch prepared in this database, oldest first.
pub async fn list(pool: &crate::pool::Pool, shard: &ShardName) -> Result<Vec<pb::PreparedBranch>, DbError> {
    let rows: Vec<Row> = retrying(pool, |connection| {
        Box::pin(async move {
            let rows = connection.client().query_typed(QUERY, &[]).await?;
            rows.iter()
                .map(|row| {
                    Ok((
                        row.try_get(0)?,
                        row.try_get(1)?,
                        row.try_get(2)?,
                        row.try_get(3)?,
                        row.try_get(4)?,
                        row.try_get(5)?,
                        row.try_get(6)?,
                        row.try_get(7)?,
                    ))
                })
                .collect::<Result<Vec<Row>, DbError>>()
        })
    })
    .await?;
    let mut branches = group(rows);
    for branch in &mut branches {
        branch.gid = transaction_gid(&branch.gid, shard);
    }
    Ok(branches)
}

/// The transaction's GID for this shard's branch, else the text as PostgreSQL holds it.
fn transaction_gid(prepared: &str, shard: &ShardName) -> String {
    match BranchGid::parse(prepared) {
        Ok(branch) if branch.is_of(shard) => branch.gid().to_string(),
        _ => prepared.to_owned(),
    }
}

/// Folds the one-row-per-lock join into one entry per GID, keeping the query's order.
fn group(rows: Vec<Row>) -> Vec<pb::PreparedBranch> {
    let mut order: Vec<String> = Vec::new();
    let mut branches: BTreeMap<String, pb::PreparedBranch> = BTreeMap::new();
    for (gid, prepared_at_ms, age_ms, owner, locktype, mode, relation, granted) in rows {
        let branch = branches.entry(gid.clone()).or_insert_with(|| {
            order.push(gid.clone());
            pb::PreparedBranch {
                gid,
                // A clock set before 1970 or a negative age (clock skew) is reported as 0.
                prepared_at_ms: u64::try_from(prepared_at_ms).unwrap_or(0),
                age_ms: u64::try_from(age_ms).unwrap_or(0),
                owner,
                locks: Vec::new(),
            }
        });
        if let Some(locktype) = locktype {
            branch.locks.push(pb::PreparedLock {
                locktype,
                mode: mode.unwrap_or_default(),
                relation: relation.unwrap_or_default(),
                granted: granted.unwrap_or(false),
            });
        }
    }
    order
        .into_iter()
        .filter_map(|gid| branches.remove(&gid))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(gid: &str, lock: Option<(&str, &str, &str)>) -> Row {
        let (locktype, mode, relation) = match lock {
            Some((t, m, r)) => (Some(t.into()), Some(m.into()), (!r.is_empty()).then(|| r.into())),
            None => (None, None, None),
        };
        (
            gid.into(),
            1_000,
            -5,
            "postgres".into(),
            locktype,
            mode,
            relation,
            lock.map(|_| true),
        )
    }

    #[test]
    fn branches_are_reported_under_their_transactions_gid() {
        let s0 = ShardName::new("s0").unwrap();
        assert_eq!(transaction_gid("treaty:c1:9:s0", &s0), "treaty:c1:9");
        assert_eq!(transaction_gid("treaty:c1:9", &s0), "treaty:c1:9", "legacy form");
        assert_eq!(transaction_gid("treaty:c1:9:s1", &s0), "treaty:c1:9:s1");
        assert_eq!(transaction_gid("treaty:junk", &s0), "treaty:junk");
    }

    #[test]
    fn rows_fold_into_one_branch_per_gid_in_query_order() {
        let branches = group(vec![
            row("treaty:c1:9", Some(("relation", "RowExclusiveLock", "kv"))),
            row("treaty:c1:9", Some(("transactionid", "ExclusiveLock", ""))),
            row("treaty:c1:2", None),
        ]);
        assert_eq!(branches.len(), 2);
        assert_eq!(branches[0].gid, "treaty:c1:9");
        assert_eq!(branches[0].locks.len(), 2);
        assert_eq!(branches[0].locks[0].relation, "kv");
        assert_eq!(branches[0].age_ms, 0, "a negative age is clamped");
        assert_eq!(branches[1].gid, "treaty:c1:2");
        assert!(branches[1].locks.is_empty());
    }
}
