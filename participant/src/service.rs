//! The gRPC `Participant` service: validates requests, converts between wire and domain types, and
//! hands the work to the agent on a task of its own, so a caller that gives up (a timeout on the
//! coordinator's side) cannot cancel a database call halfway and leave a branch in an unknown state.
//!
//! Modules: `decisions` (the decision RPCs of `--decision-store shard`).

mod decisions;

use std::future::Future;
use std::sync::Arc;

use futures::StreamExt as _;
use tokio::sync::Semaphore;
use tracing::Instrument as _;

use tonic::{Request, Response, Status};
use treaty_proto::{ApiError, DatabaseRole, Gid, pb};

use crate::agent::{Agent, BranchState, Vote};
use crate::error::BranchError;
use crate::failpoints;
use crate::postgres::{BranchOptions, Isolation};
use crate::three_phase::{Peer, PreCommitAnswer, ThreePhase};
use crate::values;
use treaty_proto::wire;

pub struct ParticipantService {
    agent: Arc<Agent>,
    three_phase: Arc<ThreePhase>,
    /// `COMMIT PREPARED`s of all `CommitBatch` calls at once; see `COMMITS_IN_PARALLEL`.
    commit_slots: Arc<Semaphore>,
}

impl ParticipantService {
    pub fn new(agent: Arc<Agent>, three_phase: Arc<ThreePhase>) -> Self {
        Self {
            agent,
            three_phase,
            commit_slots: Arc::new(Semaphore::new(COMMITS_IN_PARALLEL)),
        }
    }

    fn error(&self, error: BranchError) -> Status {
        // Handled by the caller (the coordinator); the agent already logged what matters here.
        tracing::debug!(%error, "call failed");
        Status::from(error.into_api(self.agent.shard()))
    }

    /// `spawn` for a call that runs a client statement: if the call is dropped before the work
    /// finished (its caller gave up), the statement is cancelled in PostgreSQL (`cancel`), which
    /// aborts the branch.
    fn spawn_cancellable<T, F>(&self, work: F) -> impl Future<Output = Result<T, Status>> + Send + '_
    where
        T: Send + 'static,
        F: Future<Output = Result<T, BranchError>> + Send + 'static,
    {
        let statement = crate::cancel::Cancellable::new();
        let guard = crate::cancel::CancelOnDrop::new(Arc::clone(&statement), self.agent.pool().clone());
        let spawned = self.spawn(crate::cancel::CURRENT.scope(statement, work));
        async move {
            let result = spawned.await;
            guard.finished();
            result
        }
    }

    /// Runs `work` to completion on its own task, whatever happens to the request.
    ///
    /// `work` is boxed when called, not kept in the returned future: a handler's future (boxed
    /// per call by the generated service trait) holds whatever it awaits, so with `work` inline
    /// every call allocated and copied a future the size of the largest branch operation, several
    /// kilobytes, and kept it for as long as the call waited. A restarted coordinator re-driving
    /// 10,000 commits in process spent over a third of its CPU faulting in the pages of those.
    fn spawn<T, F>(&self, work: F) -> impl Future<Output = Result<T, Status>> + Send + '_
    where
        T: Send + 'static,
        F: Future<Output = Result<T, BranchError>> + Send + 'static,
    {
        let work = Box::pin(work);
        async move {
            // In the call's span when traces are exported, so the agent's spans and events
            // belong to its trace; otherwise not even looked up.
            let span = if treaty_proto::telemetry::exporting() {
                tracing::Span::current()
            } else {
                tracing::Span::none()
            };
            match tokio::spawn(work.instrument(span)).await {
                Ok(result) => result.map_err(|e| self.error(e)),
                Err(join) => Err(Status::from(ApiError::Internal(format!(
                    "participant task failed: {join}"
                )))),
            }
        }
    }
}

/// The request's GID, checked; it also names the call's span (`gid`, `txid`) when traced.
fn parse_gid(gid: &str) -> Result<Gid, Status> {
    let gid = Gid::parse(gid).map_err(|e| Status::from(ApiError::InvalidArgument(format!("gid: {e}"))))?;
    treaty_proto::telemetry::record_gid(&gid);
    Ok(gid)
}

fn invalid(message: String) -> Status {
    Status::from(ApiError::InvalidArgument(message))
}

/// Whether a vote request asks for a three-phase vote, and its peers if so. An unknown protocol,
/// or peers on a two-phase vote, is refused rather than read as two-phase.
fn vote_protocol(
    protocol: i32,
    peers: Vec<pb::Peer>,
    me: &treaty_proto::ShardName,
) -> Result<Option<Vec<crate::three_phase::Peer>>, Status> {
    match pb::Protocol::try_from(protocol) {
        Ok(pb::Protocol::ThreePhase) => Ok(Some(parse_peers(peers, me)?)),
        Ok(pb::Protocol::Unspecified | pb::Protocol::TwoPhase) if peers.is_empty() => Ok(None),
        Ok(_) => Err(invalid(
            "peers are for a three-phase vote; this request asks for a two-phase one".into(),
        )),
        Err(_) => Err(invalid(format!("unknown protocol {protocol}"))),
    }
}

/// The participants of a three-phase transaction, checked: valid names, an address each, no
/// repeats, and this participant among them.
fn parse_peers(peers: Vec<pb::Peer>, me: &treaty_proto::ShardName) -> Result<Vec<Peer>, Status> {
    let mut parsed: Vec<Peer> = Vec::with_capacity(peers.len());
    for peer in peers {
        let shard = treaty_proto::ShardName::new(&peer.shard)
            .map_err(|e| invalid(format!("peers: shard {:?}: {e}", peer.shard)))?;
        // An empty url is a participant the coordinator no longer knows the address of: calls to
        // it fail, so termination waits for it (checked where it is called, `peers.rs`).
        if parsed.iter().any(|p| p.shard == shard) {
            return Err(invalid(format!("peers: participant {shard} is listed twice")));
        }
        parsed.push(Peer { shard, url: peer.url });
    }
    if !parsed.iter().any(|p| &p.shard == me) {
        return Err(invalid(format!(
            "peers must list every participant of the transaction, this one ({me}) included"
        )));
    }
    Ok(parsed)
}

fn ballot(ballot: Option<&pb::Ballot>) -> Result<treaty_commit_protocol::termination::Ballot, Status> {
    let ballot = wire::ballot_from_pb(ballot).map_err(|e| invalid(e.to_string()))?;
    // Promises are stored as bigint: a larger round could not be kept exactly.
    if i64::try_from(ballot.round).is_err() {
        return Err(invalid(format!(
            "ballot round {} is over {}",
            ballot.round,
            i64::MAX
        )));
    }
    Ok(ballot)
}

/// PostgreSQL's limit for `lock_timeout` and `statement_timeout`.
fn timeout_ms(name: &str, value: u64) -> Result<Option<u32>, Status> {
    match value {
        0 => Ok(None),
        ms => i32::try_from(ms).map(|ms| Some(ms.unsigned_abs())).map_err(|_| {
            Status::from(ApiError::InvalidArgument(format!(
                "{name} {ms} is over PostgreSQL's limit of {} ms",
                i32::MAX
            )))
        }),
    }
}

fn branch_options(options: Option<pb::BranchOptions>) -> Result<BranchOptions, Status> {
    let options = options.unwrap_or_default();
    let isolation = match pb::IsolationLevel::try_from(options.isolation) {
        Ok(pb::IsolationLevel::Unspecified | pb::IsolationLevel::ReadCommitted) => Isolation::ReadCommitted,
        Ok(pb::IsolationLevel::RepeatableRead) => Isolation::RepeatableRead,
        Ok(pb::IsolationLevel::Serializable) => Isolation::Serializable,
        Err(_) => {
            return Err(Status::from(ApiError::InvalidArgument(format!(
                "unknown isolation level {}",
                options.isolation
            ))));
        }
    };
    Ok(BranchOptions {
        isolation,
        lock_timeout_ms: timeout_ms("lock_timeout_ms", options.lock_timeout_ms)?,
        statement_timeout_ms: timeout_ms("statement_timeout_ms", options.statement_timeout_ms)?,
        database_role: database_role(&options.database_role)?,
        continues: false,
    })
}

/// `options.database_role`: empty is the participant's own role; anything else must be a role name
/// `DatabaseRole` accepts, since it is formatted into `SET LOCAL ROLE`.
fn database_role(name: &str) -> Result<Option<DatabaseRole>, Status> {
    if name.is_empty() {
        return Ok(None);
    }
    DatabaseRole::new(name).map(Some).map_err(|error| {
        Status::from(ApiError::InvalidArgument(format!(
            "options.database_role: {error}"
        )))
    })
}

fn vote_to_pb(vote: Vote) -> pb::PrepareResponse {
    let (vote, sqlstate, message) = match vote {
        Vote::Yes => (pb::Vote::Yes, String::new(), String::new()),
        Vote::ReadOnly => (pb::Vote::ReadOnly, String::new(), String::new()),
        Vote::No { sqlstate, message } => (pb::Vote::No, sqlstate, message),
    };
    pb::PrepareResponse {
        vote: vote as i32,
        sqlstate,
        message,
    }
}

/// At most this many commits of `CommitBatch` calls run at once, over all the batches in flight
/// (single `Commit` calls do not count). Enough for PostgreSQL to flush several commits' WAL
/// together; more only makes the pool open connections (a backend start each) and the backends
/// contend for the same cores and the same prepared-transaction array, which is what a
/// coordinator's recovery backlog did. A commit keeps its slot while it waits for its GID's lock
/// or a pooled connection, so a few stuck ones slow every batch down; none of those waits is on
/// another slot holder, so they cannot deadlock.
const COMMITS_IN_PARALLEL: usize = 16;

/// One GID of a `CommitBatch`, answered as `Commit` would answer it.
async fn commit_one(
    three_phase: &Arc<ThreePhase>,
    shard: &treaty_proto::ShardName,
    text: String,
) -> pb::FinishResult {
    let outcome = match Gid::parse(&text) {
        Ok(gid) => three_phase
            .commit(&gid)
            .await
            .map_err(|error| Status::from(error.into_api(shard))),
        Err(e) => Err(Status::from(ApiError::InvalidArgument(format!("gid: {e}")))),
    };
    match outcome {
        Ok(state) => pb::FinishResult {
            gid: text,
            state: state_to_pb(state) as i32,
            error: String::new(),
            contradicts: false,
        },
        Err(status) => {
            tracing::debug!(gid = %text, error = status.message(), "commit in a batch failed");
            pb::FinishResult {
                gid: text,
                state: pb::BranchState::Unspecified as i32,
                error: status.message().to_owned(),
                contradicts: status.code() == tonic::Code::FailedPrecondition,
            }
        }
    }
}

fn state_to_pb(state: BranchState) -> pb::BranchState {
    match state {
        BranchState::Unknown => pb::BranchState::Unknown,
        BranchState::Active => pb::BranchState::Active,
        BranchState::Prepared => pb::BranchState::Prepared,
        BranchState::Committed => pb::BranchState::Committed,
        BranchState::Aborted => pb::BranchState::Aborted,
    }
}

fn finish_response(state: BranchState) -> Response<pb::FinishResponse> {
    Response::new(pb::FinishResponse {
        state: state_to_pb(state) as i32,
    })
}

/// A branch statement request, checked and converted.
struct Statement {
    gid: Gid,
    sql: String,
    params: Vec<values::Param>,
    options: crate::postgres::BranchOptions,
}

impl ParticipantService {
    fn statement(&self, request: pb::BranchExecuteRequest) -> Result<Statement, Status> {
        let gid = parse_gid(&request.gid)?;
        let params = treaty_proto::params_from_pb(request.params)?;
        treaty_proto::validate_statement(&request.sql, &params)?;
        let params = values::params(params).map_err(|e| self.error(e.into()))?;
        let options = BranchOptions {
            continues: request.continues,
            ..branch_options(request.options)?
        };
        Ok(Statement {
            gid,
            sql: request.sql,
            params,
            options,
        })
    }
}

#[tonic::async_trait]
impl pb::participant_server::Participant for ParticipantService {
    async fn commit_decision(
        &self,
        request: Request<pb::CommitDecisionRequest>,
    ) -> Result<Response<pb::CommitDecisionResponse>, Status> {
        self.commit_decision_call(request.into_inner()).await
    }

    async fn read_decisions(
        &self,
        request: Request<pb::ReadDecisionsRequest>,
    ) -> Result<Response<pb::ReadDecisionsResponse>, Status> {
        self.read_decisions_call(request.into_inner()).await
    }

    async fn list_decisions(
        &self,
        request: Request<pb::ListDecisionsRequest>,
    ) -> Result<Response<pb::ListDecisionsResponse>, Status> {
        self.list_decisions_call(request.into_inner()).await
    }

    async fn forget_decisions(
        &self,
        request: Request<pb::ForgetDecisionsRequest>,
    ) -> Result<Response<pb::ForgetDecisionsResponse>, Status> {
        self.forget_decisions_call(request.into_inner()).await
    }

    async fn execute(
        &self,
        request: Request<pb::BranchExecuteRequest>,
    ) -> Result<Response<pb::ExecuteResult>, Status> {
        let request = request.into_inner();
        let Statement {
            gid,
            sql,
            params,
            options,
        } = self.statement(request)?;
        let agent = self.agent.clone();
        let output = self
            .spawn_cancellable(async move { agent.execute(&gid, &sql, params, &options).await })
            .await?;
        Ok(Response::new(wire::result_to_pb(output)))
    }

    async fn execute_and_prepare(
        &self,
        request: Request<pb::BranchExecuteRequest>,
    ) -> Result<Response<pb::ExecuteAndPrepareResponse>, Status> {
        let mut request = request.into_inner();
        let peers = std::mem::take(&mut request.peers);
        let three_phase_peers = vote_protocol(request.protocol, peers, self.agent.shard())?;
        let three_phase = three_phase_peers.is_some();
        let Statement {
            gid,
            sql,
            params,
            options,
        } = self.statement(request)?;
        let (output, vote) = if let Some(peers) = three_phase_peers {
            // The statement, then the vote as a 3PC Prepare casts it: the same two steps as the
            // separate calls, without the message between them.
            let (agent, three_phase) = (self.agent.clone(), self.three_phase.clone());
            self.spawn_cancellable(async move {
                let output = agent.execute(&gid, &sql, params, &options).await?;
                let vote = three_phase.prepare(&gid, peers).await?;
                Ok((output, vote))
            })
            .await?
        } else {
            let agent = self.agent.clone();
            self.spawn_cancellable(
                async move { agent.execute_and_prepare(&gid, &sql, params, &options).await },
            )
            .await?
        };
        // The same reply failpoint as a separate Prepare: the vote was cast, its answer is lost.
        failpoints::reply(failpoints::BEFORE_PREPARE_REPLY).await?;
        Ok(Response::new(pb::ExecuteAndPrepareResponse {
            result: Some(wire::result_to_pb(output)),
            vote: Some(vote_to_pb(vote)),
            protocol: if three_phase {
                pb::Protocol::ThreePhase as i32
            } else {
                pb::Protocol::TwoPhase as i32
            },
        }))
    }

    async fn prepare(
        &self,
        request: Request<pb::PrepareRequest>,
    ) -> Result<Response<pb::PrepareResponse>, Status> {
        let request = request.into_inner();
        let gid = parse_gid(&request.gid)?;
        let vote = if let Some(peers) = vote_protocol(request.protocol, request.peers, self.agent.shard())? {
            let three_phase = self.three_phase.clone();
            self.spawn(async move { three_phase.prepare(&gid, peers).await })
                .await?
        } else {
            let agent = self.agent.clone();
            self.spawn(async move { agent.prepare(&gid).await }).await?
        };
        failpoints::reply(failpoints::BEFORE_PREPARE_REPLY).await?;
        Ok(Response::new(vote_to_pb(vote)))
    }

    async fn commit(
        &self,
        request: Request<pb::FinishRequest>,
    ) -> Result<Response<pb::FinishResponse>, Status> {
        let gid = parse_gid(&request.into_inner().gid)?;
        let three_phase = self.three_phase.clone();
        let state = self.spawn(async move { three_phase.commit(&gid).await }).await?;
        failpoints::reply(failpoints::BEFORE_COMMIT_REPLY).await?;
        Ok(finish_response(state))
    }

    async fn commit_batch(
        &self,
        request: Request<pb::FinishBatchRequest>,
    ) -> Result<Response<pb::FinishBatchResponse>, Status> {
        let gids = request.into_inner().gids;
        // A batch of one (the usual case unless under load) names its transaction on the call's
        // span; each commit of a larger one has a span of its own below.
        if let [only] = gids.as_slice()
            && let Ok(gid) = Gid::parse(only)
        {
            treaty_proto::telemetry::record_gid(&gid);
        }
        let three_phase = self.three_phase.clone();
        let shard = self.agent.shard().clone();
        let slots = self.commit_slots.clone();
        let mut gids = gids;
        if gids.len() == 1
            && let Some(text) = gids.pop()
        {
            // A batch of one (an in-process shard's every commit, an agent's unless under load)
            // takes its slot before its task: under a backlog (a restarted coordinator re-driving
            // thousands of commits at once) only the running commits hold a task's memory, and
            // the rest wait as small futures. Giving up while waiting for a slot cancels nothing
            // that started. Nor does it need the stream below, an allocation of its own per call.
            let slot = slots.acquire_owned().await.ok();
            let result = self
                .spawn(async move {
                    let _slot = slot;
                    Ok(commit_one(&three_phase, &shard, text).await)
                })
                .await?;
            failpoints::reply(failpoints::BEFORE_COMMIT_REPLY).await?;
            return Ok(Response::new(pb::FinishBatchResponse {
                results: vec![result],
            }));
        }
        let results = self
            .spawn(async move {
                // In order, a few at a time: each commit takes a pooled connection of its own, and
                // the branches opening meanwhile need some too.
                let results = futures::stream::iter(gids)
                    .map(|text| async {
                        // Never closed, so acquiring cannot fail; if it somehow did, commit anyway.
                        let span = tracing::debug_span!("commit_prepared", gid = %text);
                        async {
                            let _slot = slots.acquire().await.ok();
                            commit_one(&three_phase, &shard, text).await
                        }
                        .instrument(span)
                        .await
                    })
                    .buffered(COMMITS_IN_PARALLEL)
                    .collect()
                    .await;
                Ok(results)
            })
            .await?;
        failpoints::reply(failpoints::BEFORE_COMMIT_REPLY).await?;
        Ok(Response::new(pb::FinishBatchResponse { results }))
    }

    async fn abort(
        &self,
        request: Request<pb::FinishRequest>,
    ) -> Result<Response<pb::FinishResponse>, Status> {
        let gid = parse_gid(&request.into_inner().gid)?;
        let three_phase = self.three_phase.clone();
        let state = self.spawn(async move { three_phase.abort(&gid).await }).await?;
        Ok(finish_response(state))
    }

    async fn commit_one_phase(
        &self,
        request: Request<pb::FinishRequest>,
    ) -> Result<Response<pb::FinishResponse>, Status> {
        let gid = parse_gid(&request.into_inner().gid)?;
        let agent = self.agent.clone();
        let state = self
            .spawn(async move { agent.commit_one_phase(&gid).await })
            .await?;
        Ok(finish_response(state))
    }

    async fn execute_and_commit(
        &self,
        request: Request<pb::ExecuteAndCommitRequest>,
    ) -> Result<Response<pb::ExecuteAndCommitResponse>, Status> {
        let request = request.into_inner();
        let expect_rows = request.expect_rows;
        let Some(request) = request.execute else {
            return Err(ApiError::InvalidArgument(
                "execute is missing: ExecuteAndCommit needs the statement to run".into(),
            )
            .into());
        };
        let Statement {
            gid,
            sql,
            params,
            options,
        } = self.statement(request)?;
        let agent = self.agent.clone();
        let (output, committed) = self
            .spawn(async move {
                agent
                    .execute_and_commit(&gid, &sql, params, &options, expect_rows)
                    .await
            })
            .await?;
        Ok(Response::new(pb::ExecuteAndCommitResponse {
            result: Some(wire::result_to_pb(output)),
            committed,
        }))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let gid = parse_gid(&request.into_inner().gid)?;
        let agent = self.agent.clone();
        let state = self.spawn(async move { agent.status(&gid).await }).await?;
        Ok(Response::new(pb::StatusResponse {
            state: state_to_pb(state) as i32,
            shard: self.agent.shard().to_string(),
            database: self.agent.database().to_owned(),
        }))
    }

    async fn list_prepared(
        &self,
        _request: Request<pb::ListPreparedRequest>,
    ) -> Result<Response<pb::ListPreparedResponse>, Status> {
        let agent = self.agent.clone();
        let branches = self
            .spawn(async move { Ok(crate::prepared::list(agent.pool(), agent.shard()).await?) })
            .await?;
        Ok(Response::new(pb::ListPreparedResponse {
            shard: self.agent.shard().to_string(),
            database: self.agent.database().to_owned(),
            branches,
        }))
    }

    async fn pre_commit(
        &self,
        request: Request<pb::PreCommitRequest>,
    ) -> Result<Response<pb::PreCommitResponse>, Status> {
        let request = request.into_inner();
        let gid = parse_gid(&request.gid)?;
        let ballot = ballot(request.ballot.as_ref())?;
        let three_phase = self.three_phase.clone();
        let answer = self
            .spawn(async move { three_phase.pre_commit(&gid, ballot).await })
            .await?;
        Ok(Response::new(match answer {
            PreCommitAnswer::Acknowledged => pb::PreCommitResponse {
                acknowledged: true,
                ..Default::default()
            },
            PreCommitAnswer::Refused { promised, why } => pb::PreCommitResponse {
                acknowledged: false,
                promised: Some(wire::ballot_to_pb(&promised)),
                message: why,
            },
        }))
    }

    async fn query_state(
        &self,
        request: Request<pb::QueryStateRequest>,
    ) -> Result<Response<pb::QueryStateResponse>, Status> {
        let request = request.into_inner();
        let gid = parse_gid(&request.gid)?;
        let ballot = ballot(request.ballot.as_ref())?;
        let peers = parse_peers(request.participants, self.agent.shard())?;
        let three_phase = self.three_phase.clone();
        let report = self
            .spawn(async move { three_phase.query_state(&gid, ballot, peers).await })
            .await?;
        Ok(Response::new(wire::report_to_pb(&report)))
    }

    async fn request_termination(
        &self,
        request: Request<pb::TerminationRequest>,
    ) -> Result<Response<pb::TerminationResponse>, Status> {
        let request = request.into_inner();
        let gid = parse_gid(&request.gid)?;
        let peers = parse_peers(request.participants, self.agent.shard())?;
        let three_phase = self.three_phase.clone();
        self.spawn(async move { three_phase.termination_requested(&gid, peers).await })
            .await?;
        Ok(Response::new(pb::TerminationResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vote_request_names_a_known_protocol_and_peers_only_for_three_phase() {
        let me = treaty_proto::ShardName::new("s0").unwrap();
        let peer = |shard: &str| pb::Peer {
            shard: shard.into(),
            url: format!("http://127.0.0.1:1/{shard}"),
        };
        let two_phase = vote_protocol(pb::Protocol::Unspecified as i32, vec![], &me).unwrap();
        assert!(two_phase.is_none());
        let three = vote_protocol(pb::Protocol::ThreePhase as i32, vec![peer("s0"), peer("s1")], &me)
            .unwrap()
            .expect("a three-phase vote");
        assert_eq!(three.len(), 2);
        let unknown = vote_protocol(9, vec![], &me).unwrap_err();
        assert!(
            unknown.message().contains("unknown protocol 9"),
            "{}",
            unknown.message()
        );
        let stray = vote_protocol(pb::Protocol::TwoPhase as i32, vec![peer("s0")], &me).unwrap_err();
        assert!(
            stray.message().contains("peers are for a three-phase vote"),
            "{}",
            stray.message()
        );
    }

    #[test]
    fn branch_options_convert_and_validate() {
        let options = branch_options(Some(pb::BranchOptions {
            isolation: pb::IsolationLevel::RepeatableRead as i32,
            lock_timeout_ms: 100,
            statement_timeout_ms: 0,
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(options.isolation, Isolation::RepeatableRead);
        assert_eq!(options.lock_timeout_ms, Some(100));
        assert_eq!(options.statement_timeout_ms, None);
        assert_eq!(branch_options(None).unwrap(), BranchOptions::default());
        let bad = branch_options(Some(pb::BranchOptions {
            isolation: 99,
            ..Default::default()
        }));
        assert_eq!(bad.unwrap_err().code(), tonic::Code::InvalidArgument);
        let too_long = branch_options(Some(pb::BranchOptions {
            lock_timeout_ms: u64::MAX,
            ..Default::default()
        }));
        assert!(too_long.unwrap_err().message().contains("lock_timeout_ms"));
    }

    #[test]
    fn a_database_role_is_checked_before_it_can_reach_set_role() {
        let options = branch_options(Some(pb::BranchOptions {
            database_role: "app_alice".into(),
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(
            options.database_role.as_ref().map(DatabaseRole::as_str),
            Some("app_alice")
        );
        assert_eq!(branch_options(None).unwrap().database_role, None);
        for bad in ["app\"; RESET ROLE; --", "none", &"r".repeat(64)] {
            let refused = branch_options(Some(pb::BranchOptions {
                database_role: bad.into(),
                ..Default::default()
            }))
            .unwrap_err();
            assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{bad:?}");
            assert!(
                refused.message().contains("options.database_role"),
                "{}",
                refused.message()
            );
        }
    }
}
