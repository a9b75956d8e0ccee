//! The durable half of a three-phase branch: the `treaty.three_phase` row (migrations/0002) that
//! says who the other participants are, whether the branch pre-committed, and the highest ballot it
//! promised. Each write here is its own autocommit transaction on a pooled connection. The pre-commit
//! and promise writes return only once durable, so the caller may then acknowledge or answer; the
//! insert before the vote is made durable by the `PREPARE TRANSACTION` that follows it (`insert`).
//!
//! Rows are keyed by the transaction's GID; whether the branch is still prepared is asked of
//! `pg_prepared_xacts` under the shard's branch GID (or the legacy form).

use treaty_commit_protocol::termination::{Ballot, Proposer};
use treaty_proto::{BranchGid, Gid, ShardName};

use crate::pool::Pool;
use crate::postgres::{self, DbError, retrying, write};
use tokio_postgres::types::Type;

/// A participant of the transaction and the address the coordinator reaches it at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub shard: ShardName,
    pub url: String,
}

/// One prepared three-phase branch as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub gid: Gid,
    pub peers: Vec<Peer>,
    pub pre_committed: bool,
    pub promised: Ballot,
}

type BallotColumns = (i64, Option<i64>, Option<String>);

fn ballot_columns(ballot: &Ballot) -> BallotColumns {
    let round = i64::try_from(ballot.round).unwrap_or(i64::MAX);
    match &ballot.proposer {
        Proposer::Coordinator { incarnation } => {
            (round, Some(i64::try_from(*incarnation).unwrap_or(i64::MAX)), None)
        }
        Proposer::Participant(shard) => (round, None, Some(shard.to_string())),
    }
}

fn ballot_from_columns(
    gid: &str,
    (round, incarnation, participant): BallotColumns,
) -> Result<Ballot, DbError> {
    let proposer = match participant {
        Some(name) => Proposer::Participant(ShardName::new(&name).map_err(|e| {
            DbError::Client(format!(
                "treaty.three_phase row {gid}: promised_participant {name:?}: {e}"
            ))
        })?),
        None => Proposer::Coordinator {
            incarnation: incarnation.unwrap_or(0).max(0) as u64,
        },
    };
    Ok(Ballot {
        round: round.max(0) as u64,
        proposer,
    })
}

/// Records the participants before the branch votes (a repeated prepare keeps the first row).
/// Durable once the branch's `PREPARE TRANSACTION` returns, which flushes the WAL past it.
pub async fn insert(pool: &Pool, gid: &Gid, peers: &[Peer], promised: &Ballot) -> Result<(), DbError> {
    let shards: Vec<String> = peers.iter().map(|p| p.shard.to_string()).collect();
    let urls: Vec<String> = peers.iter().map(|p| p.url.clone()).collect();
    let (round, incarnation, participant) = ballot_columns(promised);
    retrying(pool, |connection| {
        let (gid, shards, urls, participant) =
            (gid.to_string(), shards.clone(), urls.clone(), participant.clone());
        Box::pin(async move {
            // Committed without waiting for its WAL flush: the branch's PREPARE TRANSACTION comes
            // next and flushes the WAL past this commit before the vote leaves, and a row whose
            // PREPARE never happened is deleted at the next start anyway.
            write(
                connection,
                "WITH async AS (SELECT set_config('synchronous_commit', 'off', true)) \
                 INSERT INTO treaty.three_phase \
                   (gid, shards, urls, promised_round, promised_incarnation, promised_participant) \
                 SELECT $1, $2, $3, $4, $5, $6 FROM async ON CONFLICT (gid) DO NOTHING",
                &[
                    (&gid, Type::TEXT),
                    (&shards, Type::TEXT_ARRAY),
                    (&urls, Type::TEXT_ARRAY),
                    (&round, Type::INT8),
                    (&incarnation, Type::INT8),
                    (&participant, Type::TEXT),
                ],
            )
            .await?;
            Ok(())
        })
    })
    .await
}

/// Records a promise (a termination query answered) and, with `pre_committed`, the pre-commit.
pub async fn record(pool: &Pool, gid: &Gid, pre_committed: bool, promised: &Ballot) -> Result<(), DbError> {
    let (round, incarnation, participant) = ballot_columns(promised);
    let updated = retrying(pool, |connection| {
        let (gid, participant) = (gid.to_string(), participant.clone());
        Box::pin(async move {
            // Durable before the answer whatever the server's synchronous_commit says.
            write(
                connection,
                "WITH sync AS (SELECT set_config('synchronous_commit', 'on', true)) \
                 UPDATE treaty.three_phase SET pre_committed = pre_committed OR $2, promised_round = $3, \
                   promised_incarnation = $4, promised_participant = $5, updated_at = now() \
                 FROM sync WHERE gid = $1",
                &[
                    (&gid, Type::TEXT),
                    (&pre_committed, Type::BOOL),
                    (&round, Type::INT8),
                    (&incarnation, Type::INT8),
                    (&participant, Type::TEXT),
                ],
            )
            .await
        })
    })
    .await?;
    if updated == 0 {
        return Err(DbError::Client(format!(
            "no treaty.three_phase row for {gid}: the branch is not a prepared three-phase branch here"
        )));
    }
    Ok(())
}

/// Forgets branches that are committed or rolled back.
pub async fn delete(pool: &Pool, gids: &[Gid]) -> Result<(), DbError> {
    let gids: Vec<String> = gids.iter().map(ToString::to_string).collect();
    retrying(pool, |connection| {
        let gids = gids.clone();
        Box::pin(async move {
            write(
                connection,
                "DELETE FROM treaty.three_phase WHERE gid = ANY($1)",
                &[(&gids, Type::TEXT_ARRAY)],
            )
            .await?;
            Ok(())
        })
    })
    .await
}

type RowColumns = (
    String,
    Vec<String>,
    Vec<String>,
    bool,
    i64,
    Option<i64>,
    Option<String>,
);

/// At start: deletes rows whose branch is no longer prepared (finished, or never prepared because
/// the participant died between the row and PREPARE) and returns the others. Runs before the
/// participant serves, so no branch can be prepared between the listing and the delete.
pub async fn load_prepared(pool: &Pool, shard: &ShardName) -> Result<Vec<Recorded>, DbError> {
    let prepared: Vec<String> = postgres::prepared_branches(pool, shard)
        .await?
        .iter()
        .map(|branch| branch.gid().to_string())
        .collect();
    let rows: Vec<RowColumns> = retrying(pool, |connection| {
        let prepared = prepared.clone();
        Box::pin(async move {
            write(
                connection,
                "DELETE FROM treaty.three_phase WHERE gid <> ALL($1)",
                &[(&prepared, Type::TEXT_ARRAY)],
            )
            .await?;
            let rows = connection
                .client()
                .query_typed(
                    "SELECT gid, shards, urls, pre_committed, promised_round, promised_incarnation, \
                            promised_participant FROM treaty.three_phase ORDER BY gid",
                    &[],
                )
                .await?;
            rows.iter()
                .map(columns_of)
                .collect::<Result<Vec<RowColumns>, DbError>>()
        })
    })
    .await?;
    // A row that cannot be read is left alone (its branch waits for the coordinator, through the
    // reconciler) rather than stopping the participant from starting.
    Ok(rows
        .into_iter()
        .filter_map(|row| match parse_row(row) {
            Ok(recorded) => Some(recorded),
            Err(error) => {
                tracing::error!(%error, "unreadable treaty.three_phase row skipped");
                None
            }
        })
        .collect())
}

/// A selected row as its fields.
fn columns_of(row: &tokio_postgres::Row) -> Result<RowColumns, DbError> {
    Ok((
        row.try_get(0)?,
        row.try_get(1)?,
        row.try_get(2)?,
        row.try_get(3)?,
        row.try_get(4)?,
        row.try_get(5)?,
        row.try_get(6)?,
    ))
}

fn parse_row(row: RowColumns) -> Result<Recorded, DbError> {
    let (gid, shards, urls, pre_committed, round, incarnation, participant) = row;
    let bad = |what: String| DbError::Client(format!("treaty.three_phase row {gid}: {what}"));
    let parsed = Gid::parse(&gid).map_err(|e| bad(e.to_string()))?;
    if shards.len() != urls.len() {
        return Err(bad(format!("{} shards but {} urls", shards.len(), urls.len())));
    }
    let mut peers = Vec::with_capacity(shards.len());
    for (shard, url) in shards.into_iter().zip(urls) {
        let shard = ShardName::new(&shard).map_err(|e| bad(format!("shard {shard:?}: {e}")))?;
        peers.push(Peer { shard, url });
    }
    let promised = ballot_from_columns(&gid, (round, incarnation, participant))?;
    Ok(Recorded {
        gid: parsed,
        peers,
        pre_committed,
        promised,
    })
}

/// The row of `branch`'s transaction if the branch is still prepared here.
pub async fn load_one(pool: &Pool, branch: &BranchGid) -> Result<Option<Recorded>, DbError> {
    let names = postgres::prepared_names(branch);
    let row: Option<RowColumns> = retrying(pool, |connection| {
        let (gid, names) = (branch.gid().to_string(), names.clone());
        Box::pin(async move {
            let rows = connection
                .client()
                .query_typed(
                    "SELECT gid, shards, urls, pre_committed, promised_round, promised_incarnation, \
                            promised_participant FROM treaty.three_phase t WHERE gid = $1 AND EXISTS \
                       (SELECT 1 FROM pg_prepared_xacts p WHERE p.gid = ANY($2) AND p.database = current_database())",
                    &[(&gid, Type::TEXT), (&names, Type::TEXT_ARRAY)],
                )
                .await?;
            rows.first().map(columns_of).transpose()
        })
    })
    .await?;
    row.map(parse_row).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ballots_round_trip_through_columns() {
        for ballot in [
            Ballot::COORDINATOR,
            Ballot {
                round: 4,
                proposer: Proposer::Coordinator { incarnation: 9 },
            },
            Ballot {
                round: 2,
                proposer: Proposer::Participant(ShardName::new("s1").unwrap()),
            },
        ] {
            assert_eq!(ballot_from_columns("g", ballot_columns(&ballot)).unwrap(), ballot);
        }
        let bad = ballot_from_columns("g", (1, None, Some("NOT A SHARD!".into())));
        assert!(bad.unwrap_err().to_string().contains("promised_participant"));
    }
}
