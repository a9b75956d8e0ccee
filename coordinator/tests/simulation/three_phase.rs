//! The participants' own three-phase termination, as `treaty_commit_protocol::participant` runs it:
//! a three-phase branch left prepared past the participant's timeout asks the transaction's leader
//! (its lowest-named participant) to run a round; the leader asks every participant's state under
//! a ballot above any it has seen (each answer promises to ignore lower pre-commits), decides only
//! with every state (`termination::decide`, the rule the coordinator applies too), and then commits,
//! aborts, or pre-commits the merely prepared under its ballot before committing. Every message
//! between participants goes through the seed's faults like the coordinator's.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use treaty_commit_protocol::participant::Report;
use treaty_commit_protocol::termination::{self, Ballot, Proposer, ReportedState, Rules, TerminationOutcome};
use treaty_types::ShardName;

use crate::faults::Fate;
use crate::participants::Cluster;

/// How long a peer waits for another participant's answer.
const PEER_TIMEOUT_MS: u64 = 500;

/// One message from `from` to `to`, applied by `apply` at `to` if it arrives; `None` if the
/// request or the answer was lost, or either end is down.
async fn peer<R: std::fmt::Debug>(
    cluster: &Arc<Cluster>,
    from: &ShardName,
    to: &ShardName,
    kind: &str,
    gid: &str,
    apply: impl FnOnce(&Cluster) -> R,
) -> Option<R> {
    let mut rng = cluster.chance.rng(&format!("peer-{kind}/{from}/{to}/{gid}"));
    let fate = Fate::draw(&mut rng, cluster.chance.faults(), false);
    let label = format!("{kind} {gid} {from} -> {to}");
    tokio::time::sleep(Duration::from_millis(fate.request_delay_ms.min(PEER_TIMEOUT_MS))).await;
    if fate.drop_request || fate.request_delay_ms >= PEER_TIMEOUT_MS || !cluster.is_up(to) {
        cluster.trace.record(format!("peer lost {label}"));
        return None;
    }
    let answer = apply(cluster);
    cluster.trace.record(format!("peer deliver {label}: {answer:?}"));
    if fate.drop_answer || !cluster.is_up(from) {
        return None;
    }
    tokio::time::sleep(Duration::from_millis(fate.answer_delay_ms.min(PEER_TIMEOUT_MS))).await;
    Some(answer)
}

/// `asker`'s branch of `gid` timed out: it asks the leader to run a round.
pub async fn request_termination(
    cluster: Arc<Cluster>,
    asker: ShardName,
    gid: String,
    participants: Vec<ShardName>,
    promised: Ballot,
) {
    let Some(leader) = participants.iter().min().cloned() else {
        return;
    };
    let delay_ms = cluster
        .chance
        .rng(&format!("terminate/{asker}/{gid}"))
        .random_range(0..20);
    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    if leader != asker && !cluster.is_up(&leader) {
        return;
    }
    run_round(&cluster, &leader, &gid, &participants, promised).await;
}

async fn run_round(
    cluster: &Arc<Cluster>,
    leader: &ShardName,
    gid: &str,
    participants: &[ShardName],
    promised: Ballot,
) {
    let ballot = cluster.next_termination_ballot(leader, gid, promised);
    cluster
        .trace
        .record(format!("{leader}: termination round {ballot:?} for {gid}"));
    let queries = participants.iter().map(|shard| {
        let ballot = ballot.clone();
        async move {
            let report = peer(cluster, leader, shard, "query-state", gid, |c| {
                c.query_state(shard, gid, &ballot)
            })
            .await;
            (shard.clone(), report)
        }
    });
    let mut states: Vec<(ShardName, ReportedState)> = Vec::new();
    for (shard, report) in futures::future::join_all(queries).await {
        match report {
            Some(Report::State(state)) => states.push((shard, state)),
            Some(Report::Refused { promised }) => {
                cluster.saw_ballot(leader, gid, promised);
                return;
            }
            // The guard: without every state, nothing is decided; the next timeout asks again.
            None => return,
        }
    }
    let reported: Vec<ReportedState> = states.iter().map(|(_, state)| *state).collect();
    let Some(outcome) = termination::decide(&reported, Rules::Classical) else {
        return;
    };
    cluster.trace.record(format!(
        "{leader}: termination of {gid} under {ballot:?}: {outcome:?} from {states:?}"
    ));
    match outcome {
        TerminationOutcome::Commit => send_decision(cluster, leader, gid, participants, true).await,
        TerminationOutcome::Abort => send_decision(cluster, leader, gid, participants, false).await,
        TerminationOutcome::PreCommitThenCommit => {
            let pre_commits = states
                .iter()
                .filter(|(_, state)| *state == ReportedState::Prepared)
                .map(|(shard, _)| {
                    let ballot = ballot.clone();
                    async move {
                        peer(cluster, leader, shard, "pre-commit", gid, |c| {
                            c.pre_commit(shard, gid, &ballot).acknowledged
                        })
                        .await
                            == Some(true)
                    }
                });
            if futures::future::join_all(pre_commits)
                .await
                .into_iter()
                .all(|acked| acked)
            {
                send_decision(cluster, leader, gid, participants, true).await;
            }
        }
    }
}

async fn send_decision(
    cluster: &Arc<Cluster>,
    leader: &ShardName,
    gid: &str,
    participants: &[ShardName],
    commit: bool,
) {
    let sends = participants.iter().map(|shard| async move {
        let result = peer(
            cluster,
            leader,
            shard,
            if commit { "commit" } else { "abort" },
            gid,
            |c| {
                if commit {
                    c.commit_prepared_by(shard, gid, "COMMIT PREPARED by termination")
                } else {
                    c.roll_back(shard, gid)
                }
            },
        )
        .await;
        if let Some(Err(error)) = result {
            cluster.report_violation(format!(
                "termination led by {leader} could not apply its decision for {gid} on {shard}: {error}"
            ));
        }
    });
    futures::future::join_all(sends).await;
}

/// The proposer a participant leads rounds as.
pub fn proposer(leader: &ShardName) -> Proposer {
    Proposer::Participant(leader.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::{Chance, FaultRates};
    use crate::participants::BranchState;
    use crate::store::SimStore;
    use crate::trace::Trace;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use treaty_commit_protocol::transport::{BranchOptions, ParticipantTransport, Statement, VoteRequest};
    use treaty_types::{CoordinatorId, Gid, Protocol};

    #[tokio::test(start_paused = true)]
    async fn a_leader_finishes_a_pre_committed_transaction_by_committing_everywhere() {
        let mut rng = StdRng::seed_from_u64(5);
        let chance = Arc::new(Chance::new(5, FaultRates::random(&mut rng)));
        chance.heal();
        let trace = Trace::new();
        let store = SimStore::new(Arc::clone(&chance), trace.clone());
        let shards = vec![ShardName::new("s0").unwrap(), ShardName::new("s1").unwrap()];
        let cluster = Cluster::new(shards.clone(), chance, trace, store.clone());
        let transport =
            crate::transport::SimTransport::new(Arc::clone(&cluster), crate::faults::Life::new(1));
        let gid = Gid::new(&CoordinatorId::new("sim").unwrap(), 1);
        for shard in &shards {
            let statement = Statement {
                gid: gid.clone(),
                sql: "UPDATE t SET v = 1".into(),
                params: Vec::new(),
                options: BranchOptions::default(),
                continues: false,
            };
            transport.execute(shard, statement, 1_000).await.unwrap();
            let vote = VoteRequest {
                protocol: Protocol::ThreePhase,
                participants: shards.clone(),
            };
            transport.prepare(shard, &gid, vote, 1_000).await.unwrap();
        }
        use treaty_commit_protocol::store::{DecisionStore, PreCommitRecord};
        let record = PreCommitRecord {
            txid: 1,
            gid: gid.to_string(),
            participants: vec!["s0".into(), "s1".into()],
            at_ms: 0,
        };
        store
            .handle(crate::faults::Life::new(1))
            .force_pre_commit(record)
            .await
            .unwrap();
        assert!(
            cluster
                .pre_commit(&shards[1], gid.as_str(), &Ballot::COORDINATOR)
                .acknowledged
        );
        request_termination(
            Arc::clone(&cluster),
            shards[1].clone(),
            gid.to_string(),
            shards.clone(),
            Ballot::COORDINATOR,
        )
        .await;
        for branches in cluster.snapshot().values() {
            assert_eq!(branches[gid.as_str()].state, BranchState::Committed);
        }
        assert!(cluster.violations().is_empty(), "{:?}", cluster.violations());
    }
}
