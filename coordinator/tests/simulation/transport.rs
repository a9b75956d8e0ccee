//! `SimTransport`: the coordinator's link to the simulated participants (`participants.rs`), one
//! per coordinator incarnation. Every call goes through [`SimTransport::call`]: the seed decides its
//! delay, whether the request or the answer is lost (the caller times out), and whether the request
//! is applied twice; a dead incarnation's calls never complete.

use std::sync::Arc;
use std::time::Duration;

use treaty_commit_protocol::participant::Report;
use treaty_commit_protocol::termination::Ballot;
use treaty_commit_protocol::transport::{
    DecisionWrite, ExecutedAndCommitted, ExecutedAndVoted, LinkError, ParticipantTransport, PreCommitAnswer,
    PreparedBranch, Statement, StatementResult, StoredDecision, VoteAnswer, VoteRequest,
};
use treaty_types::{CoordinatorId, Gid, ShardName};

use crate::faults::{Fate, Life};
use crate::participants::Cluster;

type Op<R> = Arc<dyn Fn(&Cluster, &ShardName) -> Result<R, LinkError> + Send + Sync>;

/// One coordinator incarnation's links to every participant.
#[derive(Clone)]
pub struct SimTransport {
    cluster: Arc<Cluster>,
    life: Life,
}

impl SimTransport {
    pub fn new(cluster: Arc<Cluster>, life: Life) -> Self {
        Self { cluster, life }
    }

    /// One call: the seed decides its fate; a lost request or answer shows as a timeout, a shard
    /// that is down as unavailable (at once) or a timeout (if it went down in flight).
    async fn call<R>(
        &self,
        kind: &'static str,
        shard: &ShardName,
        gid: &str,
        timeout_ms: u64,
        duplicable: bool,
        op: Op<R>,
    ) -> Result<R, LinkError>
    where
        R: std::fmt::Debug + Send + 'static,
    {
        self.life.check().await;
        let cluster = Arc::clone(&self.cluster);
        let mut rng = cluster.chance.rng(&format!("{kind}/{shard}/{gid}"));
        let fate = Fate::draw(&mut rng, cluster.chance.faults(), duplicable);
        let label = format!("{kind} {gid} -> {shard} (coordinator {})", self.life.number);
        cluster.trace.record(format!("send {label}"));
        let shard = shard.clone();
        let inner = {
            let label = label.clone();
            let cluster = Arc::clone(&cluster);
            async move {
                tokio::time::sleep(Duration::from_millis(fate.request_delay_ms)).await;
                if fate.drop_request {
                    cluster.trace.record(format!("drop request {label}"));
                    return std::future::pending().await;
                }
                if !cluster.is_up(&shard) {
                    cluster.trace.record(format!("refused {label}: participant down"));
                    return Err(LinkError::Unavailable(format!("{shard} is down")));
                }
                let result = op(&cluster, &shard);
                cluster.trace.record(format!("deliver {label}: {result:?}"));
                if let Some(after_ms) = fate.duplicate_after_ms {
                    let (cluster, label, op, shard) = (
                        Arc::clone(&cluster),
                        label.clone(),
                        Arc::clone(&op),
                        shard.clone(),
                    );
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(after_ms)).await;
                        if cluster.is_up(&shard) {
                            let again = op(&cluster, &shard);
                            cluster.trace.record(format!("duplicate {label}: {again:?}"));
                        }
                    });
                }
                if fate.drop_answer {
                    cluster.trace.record(format!("drop answer {label}"));
                    return std::future::pending().await;
                }
                tokio::time::sleep(Duration::from_millis(fate.answer_delay_ms)).await;
                result
            }
        };
        let result = match tokio::time::timeout(Duration::from_millis(timeout_ms.max(1)), inner).await {
            Ok(result) => result,
            Err(_) => {
                cluster
                    .trace
                    .record(format!("timeout {label} after {timeout_ms} ms"));
                Err(LinkError::TimedOut { after_ms: timeout_ms })
            }
        };
        // The answer reaches only a live coordinator.
        self.life.check().await;
        result
    }
}

impl ParticipantTransport for SimTransport {
    fn shard(&self, name: &str) -> Option<ShardName> {
        self.cluster
            .shards
            .iter()
            .find(|shard| shard.as_str() == name)
            .cloned()
    }

    fn shards(&self) -> Vec<ShardName> {
        self.cluster.shards.clone()
    }

    async fn execute(
        &self,
        shard: &ShardName,
        statement: Statement,
        timeout_ms: u64,
    ) -> Result<StatementResult, LinkError> {
        let gid = statement.gid.to_string();
        let op: Op<StatementResult> = Arc::new(move |cluster, shard| cluster.execute(shard, &statement));
        self.call("execute", shard, &gid, timeout_ms, false, op).await
    }

    async fn execute_and_prepare(
        &self,
        shard: &ShardName,
        statement: Statement,
        vote: VoteRequest,
        timeout_ms: u64,
    ) -> Result<ExecutedAndVoted, LinkError> {
        let gid = statement.gid.to_string();
        let op: Op<ExecutedAndVoted> = Arc::new(move |cluster, shard| {
            let result = cluster.execute(shard, &statement)?;
            let answer = cluster.vote(shard, statement.gid.as_str(), &vote);
            Ok(ExecutedAndVoted {
                result,
                vote: Some(answer),
                voted_under: Some(vote.protocol),
            })
        });
        self.call("execute-and-prepare", shard, &gid, timeout_ms, false, op)
            .await
    }

    async fn execute_and_commit(
        &self,
        shard: &ShardName,
        statement: Statement,
        expect_rows: Option<u64>,
        timeout_ms: u64,
    ) -> Result<ExecutedAndCommitted, LinkError> {
        let gid = statement.gid.to_string();
        let op: Op<ExecutedAndCommitted> = Arc::new(move |cluster, shard| {
            let result = cluster.execute(shard, &statement)?;
            let gid = statement.gid.as_str();
            if expect_rows.is_some_and(|expected| expected != result.rows_affected) {
                cluster.roll_back(shard, gid)?;
                return Ok(ExecutedAndCommitted {
                    result,
                    committed: false,
                });
            }
            cluster.commit_one_phase(shard, gid)?;
            Ok(ExecutedAndCommitted {
                result,
                committed: true,
            })
        });
        self.call("execute-and-commit", shard, &gid, timeout_ms, false, op)
            .await
    }

    async fn prepare(
        &self,
        shard: &ShardName,
        gid: &Gid,
        vote: VoteRequest,
        timeout_ms: u64,
    ) -> Result<VoteAnswer, LinkError> {
        let text = gid.to_string();
        let key = text.clone();
        let op: Op<VoteAnswer> = Arc::new(move |cluster, shard| Ok(cluster.vote(shard, &text, &vote)));
        self.call("prepare", shard, &key, timeout_ms, true, op).await
    }

    async fn commit(&self, shard: &ShardName, gid: &Gid, timeout_ms: u64) -> Result<(), LinkError> {
        let text = gid.to_string();
        let key = text.clone();
        let op: Op<()> = Arc::new(move |cluster, shard| {
            let result = cluster.commit_prepared(shard, &text);
            cluster.note_contradiction(shard, &text, &result);
            result
        });
        self.call("commit", shard, &key, timeout_ms, true, op).await
    }

    async fn abort(&self, shard: &ShardName, gid: &Gid, timeout_ms: u64) -> Result<(), LinkError> {
        let text = gid.to_string();
        let key = text.clone();
        let op: Op<()> = Arc::new(move |cluster, shard| {
            let result = cluster.roll_back(shard, &text);
            cluster.note_contradiction(shard, &text, &result);
            result
        });
        self.call("abort", shard, &key, timeout_ms, true, op).await
    }

    async fn commit_one_phase(&self, shard: &ShardName, gid: &Gid, timeout_ms: u64) -> Result<(), LinkError> {
        let text = gid.to_string();
        let key = text.clone();
        let op: Op<()> = Arc::new(move |cluster, shard| cluster.commit_one_phase(shard, &text));
        self.call("commit-one-phase", shard, &key, timeout_ms, false, op)
            .await
    }

    async fn commit_decision(
        &self,
        shard: &ShardName,
        gid: &Gid,
        participants: &[ShardName],
        standalone: bool,
        timeout_ms: u64,
    ) -> Result<DecisionWrite, LinkError> {
        let (gid, key) = (gid.clone(), gid.to_string());
        let participants = participants.to_vec();
        let op: Op<DecisionWrite> =
            Arc::new(move |cluster, shard| cluster.commit_decision(shard, &gid, &participants, standalone));
        self.call("commit-decision", shard, &key, timeout_ms, false, op)
            .await
    }

    async fn read_decisions(
        &self,
        shard: &ShardName,
        gids: &[Gid],
        conclude_abort: bool,
        timeout_ms: u64,
    ) -> Result<Vec<StoredDecision>, LinkError> {
        let key = gids.first().map(ToString::to_string).unwrap_or_default();
        let gids = gids.to_vec();
        let op: Op<Vec<StoredDecision>> =
            Arc::new(move |cluster, shard| cluster.read_decisions(shard, &gids, conclude_abort));
        self.call("read-decisions", shard, &key, timeout_ms, true, op)
            .await
    }

    async fn list_decisions(
        &self,
        shard: &ShardName,
        coordinator: Option<&CoordinatorId>,
        _limit: u32,
        timeout_ms: u64,
    ) -> Result<Vec<StoredDecision>, LinkError> {
        let coordinator = coordinator.cloned();
        let op: Op<Vec<StoredDecision>> =
            Arc::new(move |cluster, shard| Ok(cluster.list_decisions(shard, coordinator.as_ref())));
        self.call("list-decisions", shard, "*", timeout_ms, false, op)
            .await
    }

    async fn forget_decisions(
        &self,
        shard: &ShardName,
        gids: &[Gid],
        timeout_ms: u64,
    ) -> Result<u64, LinkError> {
        let key = gids.first().map(ToString::to_string).unwrap_or_default();
        let gids = gids.to_vec();
        let op: Op<u64> = Arc::new(move |cluster, shard| cluster.forget_decisions(shard, &gids));
        self.call("forget-decisions", shard, &key, timeout_ms, true, op)
            .await
    }

    async fn pre_commit(
        &self,
        shard: &ShardName,
        gid: &Gid,
        ballot: &Ballot,
        timeout_ms: u64,
    ) -> Result<PreCommitAnswer, LinkError> {
        let text = gid.to_string();
        let key = text.clone();
        let ballot = ballot.clone();
        let op: Op<PreCommitAnswer> =
            Arc::new(move |cluster, shard| Ok(cluster.pre_commit(shard, &text, &ballot)));
        self.call("pre-commit", shard, &key, timeout_ms, true, op).await
    }

    async fn list_prepared(
        &self,
        shard: &ShardName,
        timeout_ms: u64,
    ) -> Result<Vec<PreparedBranch>, LinkError> {
        let op: Op<Vec<PreparedBranch>> = Arc::new(|cluster, shard| {
            Ok(cluster
                .prepared_ages(shard)
                .into_iter()
                .map(|(gid, age_ms)| PreparedBranch {
                    gid,
                    age_ms,
                    ..PreparedBranch::default()
                })
                .collect())
        });
        self.call("list-prepared", shard, "*", timeout_ms, false, op)
            .await
    }

    async fn query_state(
        &self,
        shard: &ShardName,
        gid: &Gid,
        ballot: &Ballot,
        _participants: &[ShardName],
        timeout_ms: u64,
    ) -> Result<Report, LinkError> {
        let text = gid.to_string();
        let key = text.clone();
        let ballot = ballot.clone();
        let op: Op<Report> = Arc::new(move |cluster, shard| Ok(cluster.query_state(shard, &text, &ballot)));
        self.call("query-state", shard, &key, timeout_ms, true, op).await
    }
}
