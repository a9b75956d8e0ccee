//! The check a coordinator makes before it starts a new decision log under an id given on the
//! command line: that no earlier run of that id left work on the shards. A run whose data
//! directory was lost leaves its txid reservations with it; a new log would hand the same txids,
//! and so the same GIDs, out again, and a participant asking about the old run's prepared branch
//! would be answered from the new run's transaction of that number. What the earlier run leaves
//! is visible on the shards: branches prepared under its GIDs and, under the shard store, its
//! commit rows.

use treaty_commit_protocol::transport::ParticipantTransport;
use treaty_proto::{CoordinatorId, Gid};

use crate::participants::ParticipantLinks;

/// How long each shard gets to answer.
const ASK_TIMEOUT_MS: u64 = 5_000;

/// What an earlier run of `id` left on the shards, described for the error; `None` when no shard
/// holds anything of it. A shard that does not answer is skipped with a warning: the check can
/// only refuse on what it sees.
pub(crate) async fn work_left(links: &ParticipantLinks, id: &CoordinatorId, rows: bool) -> Option<String> {
    let mut found = Vec::new();
    for shard in &links.shards() {
        match links.list_prepared(shard, ASK_TIMEOUT_MS).await {
            Ok(branches) => {
                let mine: Vec<&str> = branches
                    .iter()
                    .filter(|branch| Gid::parse(&branch.gid).is_ok_and(|gid| gid.coordinator() == id))
                    .map(|branch| branch.gid.as_str())
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
        if !rows {
            continue;
        }
        match links.list_decisions(shard, Some(id), 1, ASK_TIMEOUT_MS).await {
            Ok(decisions) => {
                if let Some(row) = decisions.first() {
                    found.push(format!("commit rows on {shard}, such as {}", row.gid));
                }
            }
            Err(error) => tracing::warn!(
                %shard,
                "could not ask for commit rows an earlier run of coordinator {id} left: {error}"
            ),
        }
    }
    (!found.is_empty()).then(|| found.join("; "))
}
