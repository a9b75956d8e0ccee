//! `ListInDoubt` for operators, at the gRPC edge: every shard's prepared branches (with their
//! locks), each with what the coordinator holds for its transaction. A shard that does not answer
//! in time is listed as unreachable.

use treaty_commit_protocol::store::{HeuristicDecision, HeuristicRecord};
use treaty_commit_protocol::transport::PreparedBranch;
use treaty_proto::{BranchGid, ShardName, pb};

use crate::CoordinatorEngine;
use crate::driver::coordinator_view;

/// Per-participant wait when the request names none.
const DEFAULT_PARTICIPANT_TIMEOUT_MS: u64 = 2_000;

pub fn heuristic_to_pb(record: &HeuristicRecord) -> pb::Heuristic {
    pb::Heuristic {
        commit: record.decision == HeuristicDecision::Commit,
        operator: record.operator.clone(),
        reason: record.reason.clone(),
        decided_at_ms: record.decided_at_ms,
    }
}

/// Every prepared branch on every shard (`participant_timeout_ms`: 0 for the default wait).
pub async fn list(engine: &CoordinatorEngine, participant_timeout_ms: u64) -> pb::ListInDoubtResponse {
    let timeout_ms = if participant_timeout_ms == 0 {
        DEFAULT_PARTICIPANT_TIMEOUT_MS
    } else {
        participant_timeout_ms
    };
    let mut response = pb::ListInDoubtResponse::default();
    for (shard, answer) in engine.prepared_everywhere(timeout_ms).await {
        match answer {
            Ok(branches) => {
                for branch in branches {
                    response.branches.push(in_doubt_branch(engine, &shard, branch));
                }
            }
            Err(error) => response.unreachable.push(pb::UnreachableShard {
                shard: shard.to_string(),
                error: format!("shard {shard}: {error}"),
            }),
        }
    }
    response
}

fn in_doubt_branch(
    engine: &CoordinatorEngine,
    shard: &ShardName,
    branch: PreparedBranch,
) -> pb::InDoubtBranch {
    // Participants report their branches under the transaction's GID; a branch GID (naming a
    // shard, e.g. one this participant does not own) is read back to its transaction too.
    let (txid, view, heuristic) = match BranchGid::parse(&branch.gid).map(|b| b.gid().clone()) {
        Ok(gid) if gid.coordinator() == engine.id() => match engine.tracked(gid.txid()) {
            Some(handle) => (
                gid.txid(),
                coordinator_view(&handle),
                handle.heuristic().as_ref().map(heuristic_to_pb),
            ),
            None => (gid.txid(), "no decision: presumed abort".to_owned(), None),
        },
        Ok(gid) => (
            gid.txid(),
            format!("belongs to coordinator {}", gid.coordinator()),
            None,
        ),
        Err(error) => (0, format!("not a Treaty GID this build reads: {error}"), None),
    };
    pb::InDoubtBranch {
        txid,
        shard: shard.to_string(),
        gid: branch.gid,
        prepared_at_ms: branch.prepared_at_ms,
        age_ms: branch.age_ms,
        coordinator_decision: view,
        locks: branch
            .locks
            .into_iter()
            .map(|lock| pb::PreparedLock {
                locktype: lock.locktype,
                mode: lock.mode,
                relation: lock.relation,
                granted: lock.granted,
            })
            .collect(),
        heuristic,
    }
}
