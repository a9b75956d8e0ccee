//! The per-shard queue that coalesces phase-two commits into `CommitBatch` calls: under load, the
//! commits of many transactions to one shard share a message (fewer messages and wake-ups on both
//! sides); alone, a commit is sent at once. A participant from before `CommitBatch` gets one
//! `Commit` per GID.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::Instrument as _;
use treaty_commit_protocol::transport::LinkError;
use treaty_proto::pb;
use treaty_proto::pb::participant_client::ParticipantClient;

use super::link_error;
use crate::h2_channel::H2Channel;

/// Most GIDs in one `CommitBatch`.
const MAX_COMMIT_BATCH: usize = 128;
/// `CommitBatch` calls in flight per shard; commits that arrive meanwhile wait and go together.
const COMMIT_BATCHES_IN_FLIGHT: usize = 4;

/// A commit waiting for its batch, where its answer goes, and (when traces are exported) the span
/// of the phase that asked for it.
pub(super) type PendingCommit = (String, oneshot::Sender<Result<(), LinkError>>, tracing::Span);

/// The task behind one shard's commit queue: takes whatever is queued (up to `MAX_COMMIT_BATCH`)
/// as soon as a slot among `COMMIT_BATCHES_IN_FLIGHT` is free, and sends it as one `CommitBatch`.
/// Ends when the links are dropped.
pub(super) async fn send_commit_batches(
    client: ParticipantClient<H2Channel>,
    mut queue: mpsc::UnboundedReceiver<PendingCommit>,
    timeout: Duration,
) {
    let slots = Arc::new(Semaphore::new(COMMIT_BATCHES_IN_FLIGHT));
    while let Some(first) = queue.recv().await {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        // A commit whose caller stopped waiting (it timed out and will send it again) is left out:
        // under a backlog, resending it too would only lengthen the queue.
        let mut batch = Vec::with_capacity(MAX_COMMIT_BATCH);
        if !first.1.is_closed() {
            batch.push(first);
        }
        while batch.len() < MAX_COMMIT_BATCH {
            match queue.try_recv() {
                Ok(pending) if pending.1.is_closed() => {}
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let client = client.clone();
        tokio::spawn(async move {
            send_batch(client, batch, timeout).await;
            drop(slot);
        });
    }
}

async fn send_batch(mut client: ParticipantClient<H2Channel>, batch: Vec<PendingCommit>, timeout: Duration) {
    let lost = || LinkError::TimedOut {
        after_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
    };
    // One call carries one trace context: the batch goes in its first commit's trace (alone, the
    // usual case, it is exactly that transaction's); the others' phase-two spans stay in theirs.
    let span = batch
        .first()
        .map_or_else(tracing::Span::none, |(_, _, span)| span.clone());
    let (gids, answers): (Vec<String>, Vec<_>) =
        batch.into_iter().map(|(gid, answer, _)| (gid, answer)).unzip();
    let gids_again = gids.clone();
    let call = client
        .commit_batch(pb::FinishBatchRequest { gids })
        .instrument(span.clone());
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(response)) => {
            let mut results = response.into_inner().results.into_iter();
            for answer in answers {
                // The waiter may have timed out; it sends the commit again.
                let _ = answer.send(self::answer(results.next()));
            }
        }
        Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
            // A participant from before CommitBatch: one Commit per GID.
            for (gid, answer) in gids_again.into_iter().zip(answers) {
                let call = client.commit(pb::FinishRequest { gid }).instrument(span.clone());
                let result = match tokio::time::timeout(timeout, call).await {
                    Ok(result) => result.map(|_| ()).map_err(link_error),
                    Err(_) => Err(lost()),
                };
                let _ = answer.send(result);
            }
        }
        Ok(Err(status)) => {
            let error = link_error(status);
            for answer in answers {
                let _ = answer.send(Err(error.clone()));
            }
        }
        Err(_) => {
            for answer in answers {
                let _ = answer.send(Err(lost()));
            }
        }
    }
}

/// One commit's answer within a `CommitBatch` answer; `None` when the participant left it out.
pub(super) fn answer(result: Option<pb::FinishResult>) -> Result<(), LinkError> {
    match result {
        Some(result) if result.error.is_empty() => Ok(()),
        Some(result) if result.contradicts => Err(LinkError::Refused(result.error)),
        Some(result) => Err(LinkError::Other(result.error)),
        None => Err(LinkError::Other(
            "the participant's batch answer left this commit out".into(),
        )),
    }
}
