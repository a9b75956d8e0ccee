//! The check a coordinator makes before it starts a new decision log under an id given on the
//! command line: that no earlier run of that id left work on the shards. A run whose data
//! directory was lost leaves its txid reservations with it; a new log would hand the same txids,
//! and so the same GIDs, out again, and a participant asking about the old run's prepared branch
//! would be answered from the new run's transaction of that number. What the earlier run leaves
//! is visible on the shards: branches prepared under its GIDs and, under the shard store, its
//! commit rows.

use treaty_commit_protocol::transport::ParticipantTransport;
use treaty_proto::{CoordinatorId, ShardName};

use crate::participants::ParticipantLinks;

/// How long each shard gets to answer.
const ASK_TIMEOUT_MS: u64 = 5_000;

/// What an earlier run of `id` left on the shards, described for the error; `None` when no shard
/// holds anything of it. A shard that does not answer is skipped with a warning: the check can
/// only refuse on what it sees.
pub(crate) async fn work_left(links: &ParticipantLinks, id: &CoordinatorId, rows: bool) -> Option<String> {
    // Every shard at once: one that does not answer costs the start its timeout once, not once
    // per shard.
    let shards = links.shards();
    let found: Vec<String> =
        futures::future::join_all(shards.iter().map(|shard| left_on(links, shard, id, rows)))
            .await
            .into_iter()
            .flatten()
            .collect();
    (!found.is_empty()).then(|| found.join("; "))
}

/// What `shard` holds of an earlier run of `id`.
async fn left_on(links: &ParticipantLinks, shard: &ShardName, id: &CoordinatorId, rows: bool) -> Vec<String> {
    let mut found = Vec::new();
    // By the text's prefix rather than a parsed GID: a branch prepared under a name this build
    // cannot read back (a former shard name, an older form) is reported as PostgreSQL holds it.
    let prefix = format!("treaty:{id}:");
    let prepared = links.list_prepared(shard, ASK_TIMEOUT_MS);
    let decisions = async {
        match rows {
            true => Some(links.list_decisions(shard, Some(id), 1, ASK_TIMEOUT_MS).await),
            false => None,
        }
    };
    let (prepared, decisions) = futures::join!(prepared, decisions);
    match prepared {
        Ok(branches) => {
            let mine: Vec<&str> = branches
                .iter()
                .map(|branch| branch.gid.as_str())
                .filter(|gid| gid.starts_with(&prefix))
                .collect();
            if let Some(first) = mine.first() {
                found.push(format!("{} prepared on {shard}, such as {first}", mine.len()));
            }
        }
        Err(error) => tracing::warn!(
            %shard,
            "could not ask for branches an earlier run of coordinator {id} left prepared: {error}"
        ),
    }
    match decisions {
        Some(Ok(decisions)) => {
            if let Some(row) = decisions.first() {
                found.push(format!("commit rows on {shard}, such as {}", row.gid));
            }
        }
        Some(Err(error)) => tracing::warn!(
            %shard,
            "could not ask for commit rows an earlier run of coordinator {id} left: {error}"
        ),
        None => {}
    }
    found
}
