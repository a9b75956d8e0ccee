//! The links to the participants, as the core's [`ParticipantTransport`]: per shard, a lazily
//! connected HTTP/2 channel to its agent, or the participant's handlers running in this process
//! (`--shard NAME=postgres://...`), called as methods with the same request and answer messages
//! (`Link`, `rpc!`), so both kinds share every line below and a transaction may mix them. This is
//! the wire edge: requests are built from domain types and answers turned back into them here (and
//! nowhere else in the coordinator's driver); what an answer means for the transaction is the
//! core's (`treaty_commit_protocol::answers`). Commits bound for one agent are coalesced into
//! `CommitBatch` calls (`commit_batch`); an in-process participant gets each at once.

mod commit_batch;
#[cfg(test)]
mod three_phase_tests;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use tokio::sync::{mpsc, oneshot};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::Health as _;
use treaty_commit_protocol::participant::Report;
use treaty_commit_protocol::termination::Ballot;
use treaty_commit_protocol::transport::{
    BranchOptions, DecisionWrite, ExecutedAndCommitted, ExecutedAndVoted, Isolation, LinkError,
    ParticipantTransport, PreCommitAnswer, PreparedBranch, PreparedLock, Statement, StatementResult,
    StoredDecision, StoredOutcome, VoteAnswer, VoteRequest,
};
use treaty_proto::pb::participant_client::ParticipantClient;
use treaty_proto::pb::participant_server::Participant as _;
use treaty_proto::wire::{ballot_from_pb, ballot_to_pb, report_from_pb};
pub use treaty_proto::wire::{result_from_pb, result_to_pb};
use treaty_proto::{ApiError, CoordinatorId, Gid, Protocol, ShardName, pb};

use crate::h2_channel::H2Channel;
use crate::metrics::{self, Rpc};
use commit_batch::PendingCommit;

/// The service name a participant's health is asked for.
const PARTICIPANT_SERVICE: &str = pb::participant_server::SERVICE_NAME;

/// How long connecting (TCP and the HTTP/2 handshake) to a participant may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum LinkSetupError {
    #[error("shard {shard}: {url:?} is not a usable participant address ({reason}); use http://HOST:PORT")]
    BadUrl {
        shard: String,
        url: String,
        reason: String,
    },
}

/// How one shard's participant is reached.
// One per shard, built once: the agent's clients stay inline rather than behind another pointer.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
enum Link {
    /// An agent over the network, with its `grpc.health.v1` client on the same connection.
    Agent {
        participant: ParticipantClient<H2Channel>,
        health: HealthClient<H2Channel>,
    },
    /// The participant's handlers inside this process.
    InProcess(treaty_participant::InProcess),
}

/// Makes the `Participant` call `$method` with `$request` on `$link` (a `&Link`), either kind,
/// as a future of `Result<tonic::Response<_>, tonic::Status>`: the agent's generated client, or
/// the in-process handler of the same name.
macro_rules! rpc {
    ($link:expr, $method:ident, $request:expr) => {{
        let link: &Link = $link;
        let request = $request;
        async move {
            match link {
                Link::Agent { participant, .. } => participant.clone().$method(request).await,
                Link::InProcess(local) => local.participant().$method(tonic::Request::new(request)).await,
            }
        }
    }};
}

#[derive(Clone)]
pub struct ParticipantLinks {
    links: BTreeMap<ShardName, Link>,
    /// Where each shard's participant serves, as configured: 3PC tells every participant where
    /// its peers are (`pb::Peer`).
    urls: Arc<BTreeMap<ShardName, String>>,
    /// Per agent, the queue of the task that coalesces commits into `CommitBatch` calls; started
    /// on first use (it needs the runtime).
    commit_queues: Arc<BTreeMap<ShardName, OnceLock<mpsc::UnboundedSender<PendingCommit>>>>,
}

/// A participant's gRPC error as the core reads it.
pub(crate) fn link_error(status: tonic::Status) -> LinkError {
    if status.code() == tonic::Code::Unimplemented {
        return LinkError::Unimplemented(status.message().to_owned());
    }
    match ApiError::from(status) {
        ApiError::Sql(sql) => LinkError::Sql {
            retryable: sql.retryable(),
            sqlstate: sql.sqlstate,
            message: sql.message,
        },
        ApiError::InvalidArgument(m) => LinkError::Invalid(m),
        ApiError::NotFound(m) => LinkError::NotFound(m),
        ApiError::FailedPrecondition(m) => LinkError::Refused(m),
        ApiError::Aborted(m) => LinkError::BranchLost(m),
        ApiError::Unavailable(m) => LinkError::Unavailable(m),
        ApiError::DeadlineExceeded(m) => LinkError::Deadline(m),
        ApiError::ResourceExhausted(m) => LinkError::Exhausted(m),
        ApiError::Internal(m) => LinkError::Other(m),
    }
}

/// Times one call for the metrics (the histogram of its phase) and counts its failure by kind.
///
/// A combinator, not an `async fn`: an `async fn` keeps its future argument and, separately, the
/// same future while awaiting it, so each such wrapper doubled the size of every call's future
/// (10 KB for an in-process `Execute`), and those bytes are copied each time the future moves.
fn measured<R>(
    shard: &ShardName,
    rpc: Rpc,
    call: impl Future<Output = Result<R, LinkError>>,
) -> impl Future<Output = Result<R, LinkError>> {
    let started = Instant::now();
    call.map(move |result| {
        metrics::global().participant_call(shard, rpc, started.elapsed(), &result);
        result
    })
}

fn millis(timeout_ms: u64) -> Duration {
    Duration::from_millis(timeout_ms)
}

/// Runs one call under `timeout_ms`, turning its failure into a [`LinkError`]. A combinator for
/// the reason `measured` is.
fn call<R>(
    timeout_ms: u64,
    call: impl Future<Output = Result<tonic::Response<R>, tonic::Status>>,
) -> impl Future<Output = Result<R, LinkError>> {
    tokio::time::timeout(millis(timeout_ms), call).map(move |answer| match answer {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(link_error(status)),
        Err(_) => Err(LinkError::TimedOut { after_ms: timeout_ms }),
    })
}

fn options_to_pb(options: BranchOptions) -> pb::BranchOptions {
    let isolation = match options.isolation {
        Isolation::Default => pb::IsolationLevel::Unspecified,
        Isolation::ReadCommitted => pb::IsolationLevel::ReadCommitted,
        Isolation::RepeatableRead => pb::IsolationLevel::RepeatableRead,
        Isolation::Serializable => pb::IsolationLevel::Serializable,
    };
    pb::BranchOptions {
        isolation: isolation as i32,
        lock_timeout_ms: options.lock_timeout_ms,
        statement_timeout_ms: options.statement_timeout_ms,
        database_role: options
            .database_role
            .map(|role| role.as_str().to_owned())
            .unwrap_or_default(),
    }
}

fn vote_from_pb(response: pb::PrepareResponse) -> VoteAnswer {
    match pb::Vote::try_from(response.vote) {
        Ok(pb::Vote::Yes) => VoteAnswer::Yes,
        Ok(pb::Vote::ReadOnly) => VoteAnswer::ReadOnly,
        _ => VoteAnswer::No {
            sqlstate: response.sqlstate,
            message: response.message,
        },
    }
}

fn protocol_from_pb(protocol: i32) -> Option<Protocol> {
    match pb::Protocol::try_from(protocol) {
        Ok(pb::Protocol::TwoPhase) => Some(Protocol::TwoPhase),
        Ok(pb::Protocol::ThreePhase) => Some(Protocol::ThreePhase),
        _ => None,
    }
}

impl ParticipantLinks {
    /// Builds a channel per shard. Nothing connects yet: a participant that is down at start is
    /// reached when it comes back.
    pub fn new(shards: &BTreeMap<ShardName, String>) -> Result<Self, LinkSetupError> {
        Self::with_local(shards, BTreeMap::new(), None)
    }

    /// As `new`, with the shards in `local` driven by participants running in this process
    /// (their entries in `shards` are ignored), and `https://` agents reached with `tls`.
    pub fn with_local(
        shards: &BTreeMap<ShardName, String>,
        local: BTreeMap<ShardName, treaty_participant::InProcess>,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Self, LinkSetupError> {
        let mut links = BTreeMap::new();
        let mut commit_queues = BTreeMap::new();
        let mut urls = BTreeMap::new();
        for (shard, url) in shards {
            let link = match local.get(shard) {
                Some(service) => Link::InProcess(service.clone()),
                None => {
                    let channel = H2Channel::new(url, CONNECT_TIMEOUT, tls.clone()).map_err(|e| {
                        LinkSetupError::BadUrl {
                            shard: shard.to_string(),
                            url: treaty_proto::redact(url),
                            reason: treaty_proto::redact(&e.to_string()),
                        }
                    })?;
                    urls.insert(shard.clone(), url.clone());
                    commit_queues.insert(shard.clone(), OnceLock::new());
                    Link::Agent {
                        health: HealthClient::new(channel.clone()),
                        participant: ParticipantClient::new(channel),
                    }
                }
            };
            links.insert(shard.clone(), link);
        }
        Ok(Self {
            links,
            // Only agents' addresses: a local shard's is a database URL, which may hold a
            // password and is no use to a peer.
            urls: Arc::new(urls),
            commit_queues: Arc::new(commit_queues),
        })
    }

    /// Three-phase commit needs participants that outlive the coordinator (they finish the
    /// transaction among themselves while it is down); one in this process dies with it.
    fn refuse_three_phase_over_local(&self, vote: &VoteRequest) -> Result<(), LinkError> {
        if vote.protocol != Protocol::ThreePhase {
            return Ok(());
        }
        let in_process = |shard: &&ShardName| matches!(self.links.get(*shard), Some(Link::InProcess(_)));
        match vote.participants.iter().find(in_process) {
            Some(shard) => Err(LinkError::Refused(format!(
                "three-phase commit needs participants that outlive the coordinator, and shard {shard} \
                 is driven inside the coordinator (--shard {shard}=postgres://...): use two-phase \
                 commit for this transaction, or run a participant agent for {shard}"
            ))),
            None => Ok(()),
        }
    }

    /// The shards whose health `participant_serving` asks: every configured one.
    pub fn health_probed_shards(&self) -> impl Iterator<Item = &ShardName> {
        self.links.keys()
    }

    /// Asks the shard's participant for its `grpc.health.v1` status of `treaty.v1.Participant`
    /// (one small call on the link's connection, connecting it if it is down). `Ok(true)`: it
    /// answered SERVING, or answered UNIMPLEMENTED (a participant older than the health service:
    /// it is up, and says nothing of its database); `Ok(false)`: it answered another status.
    pub async fn participant_serving(&self, shard: &ShardName, timeout_ms: u64) -> Result<bool, LinkError> {
        let link = self.link(shard)?;
        let request = HealthCheckRequest {
            service: PARTICIPANT_SERVICE.to_owned(),
        };
        let check = async move {
            match link {
                Link::Agent { health, .. } => health.clone().check(request).await,
                Link::InProcess(local) => local.health().check(tonic::Request::new(request)).await,
            }
        };
        match call(timeout_ms, check).await {
            Ok(answer) => Ok(answer.status() == ServingStatus::Serving),
            Err(LinkError::Unimplemented(_)) => Ok(true),
            Err(error) => Err(error),
        }
    }

    /// The participants of a 3PC transaction with the addresses the coordinator reaches them at.
    /// A shard this coordinator is not configured with (a logged one, removed since) goes with an
    /// empty URL: its peers cannot reach it, and termination waits for it, as it must.
    fn peers(&self, shards: &[ShardName]) -> Vec<pb::Peer> {
        shards
            .iter()
            .map(|shard| pb::Peer {
                shard: shard.to_string(),
                url: self.urls.get(shard).cloned().unwrap_or_default(),
            })
            .collect()
    }

    fn link(&self, shard: &ShardName) -> Result<&Link, LinkError> {
        self.links.get(shard).ok_or_else(|| {
            LinkError::Unavailable(format!("shard {shard} is not configured on this coordinator"))
        })
    }

    fn execute_request(&self, statement: Statement) -> pb::BranchExecuteRequest {
        pb::BranchExecuteRequest {
            gid: statement.gid.to_string(),
            sql: statement.sql,
            params: statement.params.into_iter().map(pb::Value::from).collect(),
            options: Some(options_to_pb(statement.options)),
            continues: statement.continues,
            ..Default::default()
        }
    }

    /// Queues a commit for the agent's next `CommitBatch` and waits for its own answer; an
    /// in-process participant, which has no messages to save, is asked at once (as a batch of
    /// one, so that its commits share `CommitBatch`'s bound on connections).
    async fn commit_batched(&self, shard: &ShardName, gid: String, timeout_ms: u64) -> Result<(), LinkError> {
        let client = match self.link(shard)? {
            Link::Agent { participant, .. } => participant.clone(),
            Link::InProcess(local) => {
                let request = tonic::Request::new(pb::FinishBatchRequest { gids: vec![gid] });
                let response = call(timeout_ms, local.participant().commit_batch(request)).await?;
                return commit_batch::answer(response.results.into_iter().next());
            }
        };
        let Some(queue) = self.commit_queues.get(shard) else {
            return Err(LinkError::Unavailable(format!(
                "shard {shard} is not configured on this coordinator"
            )));
        };
        let queue = queue.get_or_init(|| {
            let (sender, receiver) = mpsc::unbounded_channel();
            tokio::spawn(commit_batch::send_commit_batches(
                client,
                receiver,
                millis(timeout_ms),
            ));
            sender
        });
        let (answer, answered) = oneshot::channel();
        // The phase's span, for the batch's `traceparent`; not even looked up unless exporting.
        let span = if treaty_proto::telemetry::exporting() {
            tracing::Span::current()
        } else {
            tracing::Span::none()
        };
        queue
            .send((gid, answer, span))
            .map_err(|_| LinkError::Other("the commit queue has stopped".into()))?;
        match tokio::time::timeout(millis(timeout_ms), answered).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(LinkError::Other("the commit batch was dropped unanswered".into())),
            Err(_) => Err(LinkError::TimedOut { after_ms: timeout_ms }),
        }
    }
}

impl ParticipantTransport for ParticipantLinks {
    fn shard(&self, name: &str) -> Option<ShardName> {
        self.links.get_key_value(name).map(|(shard, _)| shard.clone())
    }

    fn shards(&self) -> Vec<ShardName> {
        self.links.keys().cloned().collect()
    }

    async fn execute(
        &self,
        shard: &ShardName,
        statement: Statement,
        timeout_ms: u64,
    ) -> Result<StatementResult, LinkError> {
        measured(shard, Rpc::Execute, async move {
            let link = self.link(shard)?;
            let request = self.execute_request(statement);
            call(timeout_ms, rpc!(link, execute, request))
                .await
                .map(result_from_pb)
        })
        .await
    }

    async fn execute_and_prepare(
        &self,
        shard: &ShardName,
        statement: Statement,
        vote: VoteRequest,
        timeout_ms: u64,
    ) -> Result<ExecutedAndVoted, LinkError> {
        self.refuse_three_phase_over_local(&vote)?;
        measured(shard, Rpc::Prepare, async move {
            let link = self.link(shard)?;
            let mut request = self.execute_request(statement);
            if vote.protocol == Protocol::ThreePhase {
                request.protocol = pb::Protocol::ThreePhase as i32;
                request.peers = self.peers(&vote.participants);
            }
            let response = call(timeout_ms, rpc!(link, execute_and_prepare, request)).await?;
            Ok(ExecutedAndVoted {
                result: result_from_pb(response.result.unwrap_or_default()),
                vote: response.vote.map(vote_from_pb),
                voted_under: protocol_from_pb(response.protocol),
            })
        })
        .await
    }

    async fn execute_and_commit(
        &self,
        shard: &ShardName,
        statement: Statement,
        expect_rows: Option<u64>,
        timeout_ms: u64,
    ) -> Result<ExecutedAndCommitted, LinkError> {
        measured(shard, Rpc::CommitOnePhase, async move {
            let link = self.link(shard)?;
            let request = pb::ExecuteAndCommitRequest {
                execute: Some(self.execute_request(statement)),
                expect_rows,
            };
            let response = call(timeout_ms, rpc!(link, execute_and_commit, request)).await?;
            Ok(ExecutedAndCommitted {
                result: result_from_pb(response.result.unwrap_or_default()),
                committed: response.committed,
            })
        })
        .await
    }

    async fn prepare(
        &self,
        shard: &ShardName,
        gid: &Gid,
        vote: VoteRequest,
        timeout_ms: u64,
    ) -> Result<VoteAnswer, LinkError> {
        self.refuse_three_phase_over_local(&vote)?;
        measured(shard, Rpc::Prepare, async move {
            let link = self.link(shard)?;
            let participants: Vec<String> = vote.participants.iter().map(ToString::to_string).collect();
            let request = match vote.protocol {
                Protocol::TwoPhase => pb::PrepareRequest {
                    gid: gid.to_string(),
                    participants,
                    ..Default::default()
                },
                Protocol::ThreePhase => pb::PrepareRequest {
                    gid: gid.to_string(),
                    peers: self.peers(&vote.participants),
                    participants,
                    protocol: pb::Protocol::ThreePhase as i32,
                },
            };
            call(timeout_ms, rpc!(link, prepare, request))
                .await
                .map(vote_from_pb)
        })
        .await
    }

    async fn commit(&self, shard: &ShardName, gid: &Gid, timeout_ms: u64) -> Result<(), LinkError> {
        measured(shard, Rpc::Commit, async move {
            self.commit_batched(shard, gid.to_string(), timeout_ms).await
        })
        .await
    }

    async fn abort(&self, shard: &ShardName, gid: &Gid, timeout_ms: u64) -> Result<(), LinkError> {
        measured(shard, Rpc::Abort, async move {
            let link = self.link(shard)?;
            let request = pb::FinishRequest { gid: gid.to_string() };
            call(timeout_ms, rpc!(link, abort, request)).await.map(|_| ())
        })
        .await
    }

    async fn commit_one_phase(&self, shard: &ShardName, gid: &Gid, timeout_ms: u64) -> Result<(), LinkError> {
        measured(shard, Rpc::CommitOnePhase, async move {
            let link = self.link(shard)?;
            let request = pb::FinishRequest { gid: gid.to_string() };
            call(timeout_ms, rpc!(link, commit_one_phase, request))
                .await
                .map(|_| ())
        })
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
        measured(shard, Rpc::CommitDecision, async move {
            let link = self.link(shard)?;
            let request = pb::CommitDecisionRequest {
                gid: gid.to_string(),
                participants: participants.iter().map(ToString::to_string).collect(),
                standalone,
            };
            let response = call(timeout_ms, rpc!(link, commit_decision, request)).await?;
            Ok(if response.committed {
                DecisionWrite::Committed
            } else {
                DecisionWrite::NotCommitted {
                    message: response.message,
                }
            })
        })
        .await
    }

    async fn read_decisions(
        &self,
        shard: &ShardName,
        gids: &[Gid],
        conclude_abort: bool,
        timeout_ms: u64,
    ) -> Result<Vec<StoredDecision>, LinkError> {
        measured(shard, Rpc::Other, async move {
            let link = self.link(shard)?;
            let request = pb::ReadDecisionsRequest {
                gids: gids.iter().map(ToString::to_string).collect(),
                conclude_abort,
            };
            let response = call(timeout_ms, rpc!(link, read_decisions, request)).await?;
            response
                .decisions
                .into_iter()
                .map(stored_decision_from_pb)
                .collect()
        })
        .await
    }

    async fn list_decisions(
        &self,
        shard: &ShardName,
        coordinator: Option<&CoordinatorId>,
        limit: u32,
        timeout_ms: u64,
    ) -> Result<Vec<StoredDecision>, LinkError> {
        measured(shard, Rpc::Other, async move {
            let link = self.link(shard)?;
            let request = pb::ListDecisionsRequest {
                coordinator: coordinator.map(ToString::to_string).unwrap_or_default(),
                limit,
            };
            let response = call(timeout_ms, rpc!(link, list_decisions, request)).await?;
            response
                .decisions
                .into_iter()
                .map(stored_decision_from_pb)
                .collect()
        })
        .await
    }

    async fn forget_decisions(
        &self,
        shard: &ShardName,
        gids: &[Gid],
        timeout_ms: u64,
    ) -> Result<u64, LinkError> {
        measured(shard, Rpc::Other, async move {
            let link = self.link(shard)?;
            let request = pb::ForgetDecisionsRequest {
                gids: gids.iter().map(ToString::to_string).collect(),
            };
            Ok(call(timeout_ms, rpc!(link, forget_decisions, request))
                .await?
                .deleted)
        })
        .await
    }

    async fn pre_commit(
        &self,
        shard: &ShardName,
        gid: &Gid,
        ballot: &Ballot,
        timeout_ms: u64,
    ) -> Result<PreCommitAnswer, LinkError> {
        measured(shard, Rpc::PreCommit, async move {
            let link = self.link(shard)?;
            let request = pb::PreCommitRequest {
                gid: gid.to_string(),
                ballot: Some(ballot_to_pb(ballot)),
            };
            let response = call(timeout_ms, rpc!(link, pre_commit, request)).await?;
            Ok(PreCommitAnswer {
                acknowledged: response.acknowledged,
                promised: ballot_from_pb(response.promised.as_ref()).ok(),
                message: response.message,
            })
        })
        .await
    }

    async fn list_prepared(
        &self,
        shard: &ShardName,
        timeout_ms: u64,
    ) -> Result<Vec<PreparedBranch>, LinkError> {
        measured(shard, Rpc::Other, async move {
            let link = self.link(shard)?;
            let response = call(timeout_ms, rpc!(link, list_prepared, pb::ListPreparedRequest {})).await?;
            Ok(response
                .branches
                .into_iter()
                .map(|branch| PreparedBranch {
                    gid: branch.gid,
                    prepared_at_ms: branch.prepared_at_ms,
                    age_ms: branch.age_ms,
                    owner: branch.owner,
                    locks: branch
                        .locks
                        .into_iter()
                        .map(|lock| PreparedLock {
                            locktype: lock.locktype,
                            mode: lock.mode,
                            relation: lock.relation,
                            granted: lock.granted,
                        })
                        .collect(),
                })
                .collect())
        })
        .await
    }

    async fn query_state(
        &self,
        shard: &ShardName,
        gid: &Gid,
        ballot: &Ballot,
        participants: &[ShardName],
        timeout_ms: u64,
    ) -> Result<Report, LinkError> {
        measured(shard, Rpc::Other, async move {
            let link = self.link(shard)?;
            let request = pb::QueryStateRequest {
                gid: gid.to_string(),
                ballot: Some(ballot_to_pb(ballot)),
                participants: self.peers(participants),
            };
            let response = call(timeout_ms, rpc!(link, query_state, request)).await?;
            report_from_pb(&response)
                .map_err(|e| LinkError::Other(format!("unreadable QueryState answer: {e}")))
        })
        .await
    }
}

/// A decision row as a participant answered it; a GID or shard name it cannot have sent is an
/// unreadable answer, never a decision.
fn stored_decision_from_pb(row: pb::StoredDecision) -> Result<StoredDecision, LinkError> {
    let unreadable = |what: String| LinkError::Other(format!("unreadable decision row: {what}"));
    let gid = Gid::parse(&row.gid).map_err(|e| unreadable(e.to_string()))?;
    let outcome = match pb::Decision::try_from(row.decision) {
        Ok(pb::Decision::Commit) => Some(StoredOutcome::Commit),
        Ok(pb::Decision::Abort) => Some(StoredOutcome::Abort),
        Ok(pb::Decision::Unspecified) => None,
        _ => return Err(unreadable(format!("decision {} for {gid}", row.decision))),
    };
    let participants = row
        .participants
        .iter()
        .map(|shard| ShardName::new(shard).map_err(|e| unreadable(e.to_string())))
        .collect::<Result<_, _>>()?;
    Ok(StoredDecision {
        gid,
        outcome,
        participants,
        decided_at_ms: row.decided_at_ms,
    })
}
