//! The gRPC `Coordinator` service: validates requests, converts between wire and domain types, and
//! hands the work to the driver. Nothing here decides anything.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use treaty_proto::{ApiError, DatabaseRole, pb};

use treaty_commit_protocol::store::HeuristicDecision;
use treaty_commit_protocol::transport::{BranchOptions, Isolation, ParticipantTransport};

use crate::CoordinatorEngine;
use crate::driver::{Decision, ResolveRequest, TxnHandle, TxnOptions};
use crate::in_doubt::heuristic_to_pb;
use crate::limits::{CallGuard, ClientId, Limits};
use crate::participants::result_to_pb;
use crate::protocol::{AbortCause, AbortReason, BranchPhase, Outcome, Phase, Protocol, Timeouts};
use crate::submit::Op;

pub struct CoordinatorService {
    engine: Arc<CoordinatorEngine>,
    limits: Arc<Limits>,
}

impl CoordinatorService {
    pub fn new(engine: Arc<CoordinatorEngine>, limits: Arc<Limits>) -> Self {
        Self { engine, limits }
    }

    /// Counts the call against its client's calls in flight until the returned guard drops.
    fn enter<R>(&self, request: &Request<R>) -> Result<CallGuard, Status> {
        Ok(self.limits.enter_call(ClientId::from_request(request))?)
    }

    /// The options of a new transaction, checked against the limits, with the client's
    /// open-transaction slot: refused (nothing opened) when the client or the coordinator is full.
    /// Its branches run under `database_role`, the caller's.
    fn begin_options(
        &self,
        client: ClientId,
        database_role: Option<DatabaseRole>,
        options: Option<pb::TransactionOptions>,
    ) -> Result<TxnOptions, ApiError> {
        let mut options = self.options(options)?;
        options.branch.database_role = database_role;
        options.max_statements = Some(self.limits.settings().max_statements_per_transaction);
        options.slot = Some(Arc::new(self.limits.open_transaction(client)?));
        Ok(options)
    }

    fn options(&self, options: Option<pb::TransactionOptions>) -> Result<TxnOptions, ApiError> {
        let options = options.unwrap_or_default();
        let protocol = match pb::Protocol::try_from(options.protocol) {
            Ok(pb::Protocol::Unspecified) => None,
            Ok(pb::Protocol::TwoPhase) => Some(Protocol::TwoPhase),
            Ok(pb::Protocol::ThreePhase) => Some(Protocol::ThreePhase),
            Err(_) => {
                return Err(ApiError::InvalidArgument(format!(
                    "unknown protocol {}",
                    options.protocol
                )));
            }
        };
        let isolation = match pb::IsolationLevel::try_from(options.isolation) {
            Ok(pb::IsolationLevel::Unspecified) => Isolation::Default,
            Ok(pb::IsolationLevel::ReadCommitted) => Isolation::ReadCommitted,
            Ok(pb::IsolationLevel::RepeatableRead) => Isolation::RepeatableRead,
            Ok(pb::IsolationLevel::Serializable) => Isolation::Serializable,
            Err(_) => {
                return Err(ApiError::InvalidArgument(format!(
                    "unknown isolation level {}",
                    options.isolation
                )));
            }
        };
        if options.label.len() > 256 {
            return Err(ApiError::InvalidArgument("label is longer than 256 bytes".into()));
        }
        // Checked here, at Begin or Submit, so that an out-of-range option opens nothing (it used to
        // be refused only by the participant, at the first statement, leaving the transaction
        // open until its timeout, which could be never).
        let settings = self.limits.settings();
        Limits::check_timeout(
            "timeout_ms",
            options.timeout_ms,
            settings.max_transaction_timeout_ms,
        )?;
        Limits::check_timeout(
            "idle_timeout_ms",
            options.idle_timeout_ms,
            settings.max_idle_timeout_ms,
        )?;
        Limits::check_timeout(
            "lock_timeout_ms",
            options.lock_timeout_ms,
            settings.max_lock_timeout_ms,
        )?;
        let defaults = self.engine.default_timeouts();
        let pick = |value: u64, default: u64| if value == 0 { default } else { value };
        let timeouts = Timeouts {
            transaction_ms: pick(options.timeout_ms, defaults.transaction_ms),
            idle_ms: pick(options.idle_timeout_ms, defaults.idle_ms),
            vote_ms: defaults.vote_ms,
        };
        Ok(TxnOptions {
            label: options.label,
            protocol,
            timeouts: Some(timeouts),
            branch: BranchOptions {
                isolation,
                lock_timeout_ms: pick(options.lock_timeout_ms, self.engine.default_lock_timeout_ms()),
                statement_timeout_ms: timeouts.transaction_ms,
                // The caller's, set by `begin_options`; never from the request.
                database_role: None,
            },
            slot: None,
            max_statements: None,
        })
    }
}

/// The PostgreSQL role the calling client's statements run under on every shard: its access-file
/// entry's `database_role` (`treaty_proto::auth`); `None` (each participant's own role) for a
/// caller without one, or when the coordinator runs without an access file. The access file
/// refuses a name `DatabaseRole` would; should one get through all the same, it could not be put
/// into `SET LOCAL ROLE`, and the call is refused, naming it.
fn caller_database_role<T>(request: &Request<T>) -> Result<Option<DatabaseRole>, ApiError> {
    let Some(name) = treaty_proto::auth::caller(request).and_then(|caller| caller.database_role()) else {
        return Ok(None);
    };
    DatabaseRole::new(name).map(Some).map_err(|error| {
        ApiError::InvalidArgument(format!(
            "the caller's database_role (from the coordinator's --access-file): {error}"
        ))
    })
}

/// A submit's ops as the driver takes them; a bad parameter is refused naming its op.
fn ops_from_pb(ops: Vec<pb::Op>) -> Result<Vec<Op>, ApiError> {
    ops.into_iter()
        .enumerate()
        .map(|(index, op)| {
            let params = treaty_proto::params_from_pb(op.params)
                .map_err(|e| ApiError::InvalidArgument(format!("op {index}: {e}")))?;
            Ok(Op {
                shard: op.shard,
                sql: op.sql,
                params,
                expect_rows: op.expect_rows,
            })
        })
        .collect()
}

fn outcome_to_pb(txid: u64, outcome: Outcome) -> Result<pb::Outcome, ApiError> {
    match outcome {
        Outcome::Committed => Ok(pb::Outcome {
            txid,
            kind: pb::OutcomeKind::Committed as i32,
            abort: None,
        }),
        Outcome::Aborted(reason) => Ok(pb::Outcome {
            txid,
            kind: pb::OutcomeKind::Aborted as i32,
            abort: Some(reason_to_pb(&reason)),
        }),
        Outcome::Unknown(error) => Err(ApiError::Unavailable(format!(
            "transaction {txid}: the commit's answer was lost, so its outcome is unknown: {error}"
        ))),
    }
}

fn reason_to_pb(reason: &AbortReason) -> pb::AbortReason {
    let cause = match reason.cause {
        AbortCause::ClientRollback => pb::AbortCause::ClientRollback,
        AbortCause::StatementFailed => pb::AbortCause::StatementFailed,
        AbortCause::VoteNo => pb::AbortCause::VoteNo,
        AbortCause::Timeout => pb::AbortCause::Timeout,
        AbortCause::ExpectRows => pb::AbortCause::ExpectRows,
        AbortCause::ParticipantUnavailable => pb::AbortCause::ParticipantUnavailable,
        AbortCause::CoordinatorRestart => pb::AbortCause::CoordinatorRestart,
        AbortCause::ConcludedAbort => pb::AbortCause::ConcludedAbort,
        AbortCause::Heuristic => pb::AbortCause::Heuristic,
    };
    pb::AbortReason {
        cause: cause as i32,
        shard: reason.shard.as_ref().map(ToString::to_string).unwrap_or_default(),
        sqlstate: reason.sqlstate.clone(),
        message: reason.message.clone(),
        retryable: reason.retryable,
    }
}

fn phase_to_pb(phase: Phase) -> pb::TransactionState {
    match phase {
        Phase::Active => pb::TransactionState::Active,
        Phase::Preparing | Phase::LoggingCommit | Phase::CommittingOnePhase => {
            pb::TransactionState::Preparing
        }
        Phase::PreCommitting => pb::TransactionState::PreCommitting,
        Phase::Committing => pb::TransactionState::Committing,
        Phase::Aborting => pb::TransactionState::Aborting,
        Phase::Committed => pb::TransactionState::Committed,
        Phase::Aborted | Phase::OutcomeUnknown => pb::TransactionState::Aborted,
    }
}

fn branch_to_pb(phase: BranchPhase) -> pb::ParticipantState {
    match phase {
        BranchPhase::Active => pb::ParticipantState::Active,
        BranchPhase::Preparing => pb::ParticipantState::Preparing,
        BranchPhase::Prepared | BranchPhase::PreCommitting => pb::ParticipantState::Prepared,
        BranchPhase::PreCommitted => pb::ParticipantState::PreCommitted,
        BranchPhase::ReadOnly => pb::ParticipantState::ReadOnly,
        BranchPhase::VotedNo => pb::ParticipantState::VotedNo,
        BranchPhase::Committing => pb::ParticipantState::Committing,
        BranchPhase::Committed => pb::ParticipantState::Committed,
        BranchPhase::Aborting => pb::ParticipantState::Aborting,
        BranchPhase::Aborted => pb::ParticipantState::Aborted,
    }
}

pub(crate) fn info_to_pb(handle: &TxnHandle) -> pb::TransactionInfo {
    let machine = handle.machine();
    let txid = machine.txid();
    pb::TransactionInfo {
        txid,
        gid: handle.gid().to_string(),
        state: phase_to_pb(machine.phase()) as i32,
        protocol: match machine.protocol() {
            Protocol::TwoPhase => pb::Protocol::TwoPhase,
            Protocol::ThreePhase => pb::Protocol::ThreePhase,
        } as i32,
        label: handle.label.clone(),
        participants: machine
            .branches()
            .iter()
            .map(|b| pb::ParticipantInfo {
                shard: b.shard.to_string(),
                state: branch_to_pb(b.phase) as i32,
                attempts: b.attempts,
                last_error: b.last_error.clone().unwrap_or_default(),
            })
            .collect(),
        begun_at_ms: machine.begun_at_ms(),
        decided_at_ms: machine.decided_at_ms().unwrap_or(0),
        finished_at_ms: machine.finished_at_ms().unwrap_or(0),
        outcome: machine
            .outcome()
            .filter(|_| !machine.phase().is_undecided())
            .and_then(|o| outcome_to_pb(txid, o.clone()).ok()),
        recovered: machine.recovered(),
        heuristic: handle.heuristic().as_ref().map(heuristic_to_pb),
    }
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for CoordinatorService {
    async fn begin(&self, request: Request<pb::BeginRequest>) -> Result<Response<pb::BeginResponse>, Status> {
        let _call = self.enter(&request)?;
        let client = ClientId::from_request(&request);
        let database_role = caller_database_role(&request)?;
        let options = self.begin_options(client, database_role, request.into_inner().options)?;
        let txid = self.engine.begin(options).await?;
        Ok(Response::new(pb::BeginResponse { txid }))
    }

    async fn execute(
        &self,
        request: Request<pb::ExecuteRequest>,
    ) -> Result<Response<pb::ExecuteResult>, Status> {
        let _call = self.enter(&request)?;
        let request = request.into_inner();
        self.limits.check_sql(None, &request.sql)?;
        let values = treaty_proto::params_from_pb(request.params)?;
        treaty_proto::validate_statement(&request.sql, &values)?;
        let result = if request.last {
            self.engine
                .execute_last(request.txid, &request.shard, request.sql, values)
                .await?
        } else {
            self.engine
                .execute(request.txid, &request.shard, request.sql, values)
                .await?
        };
        Ok(Response::new(result_to_pb(result)))
    }

    async fn commit(&self, request: Request<pb::CommitRequest>) -> Result<Response<pb::Outcome>, Status> {
        let _call = self.enter(&request)?;
        let request = request.into_inner();
        let outcome = self.engine.commit(request.txid, request.wait_for_apply).await?;
        Ok(Response::new(outcome_to_pb(request.txid, outcome)?))
    }

    async fn rollback(&self, request: Request<pb::RollbackRequest>) -> Result<Response<pb::Outcome>, Status> {
        let _call = self.enter(&request)?;
        let txid = request.into_inner().txid;
        let reason = AbortReason::new(AbortCause::ClientRollback, "rolled back by the client");
        let outcome = self.engine.rollback(txid, reason).await?;
        Ok(Response::new(outcome_to_pb(txid, outcome)?))
    }

    async fn submit(
        &self,
        request: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let _call = self.enter(&request)?;
        let client = ClientId::from_request(&request);
        let database_role = caller_database_role(&request)?;
        let request = request.into_inner();
        let max_statements = self.limits.settings().max_statements_per_transaction;
        if request.ops.len() > max_statements as usize {
            return Err(ApiError::ResourceExhausted(format!(
                "{} ops, over the limit of {max_statements} statements per transaction \
                 (--max-statements-per-transaction); split the submit",
                request.ops.len()
            ))
            .into());
        }
        for (index, op) in request.ops.iter().enumerate() {
            self.limits.check_sql(Some(index), &op.sql)?;
        }
        let ops = ops_from_pb(request.ops)?;
        let options = self.begin_options(client, database_role, request.options)?;
        let (txid, outcome, results) =
            crate::submit::submit(&self.engine, ops, options, request.wait_for_apply).await?;
        Ok(Response::new(pb::SubmitResponse {
            outcome: Some(outcome_to_pb(txid, outcome)?),
            results: results.into_iter().map(result_to_pb).collect(),
        }))
    }

    async fn get_transaction(
        &self,
        request: Request<pb::GetTransactionRequest>,
    ) -> Result<Response<pb::TransactionInfo>, Status> {
        let _call = self.enter(&request)?;
        let handle = self.engine.handle(request.into_inner().txid)?;
        Ok(Response::new(info_to_pb(&handle)))
    }

    async fn list_transactions(
        &self,
        request: Request<pb::ListTransactionsRequest>,
    ) -> Result<Response<pb::ListTransactionsResponse>, Status> {
        let _call = self.enter(&request)?;
        let request = request.into_inner();
        let limit = if request.limit == 0 {
            1000
        } else {
            request.limit as usize
        };
        let filter = pb::ListFilter::try_from(request.filter)
            .map_err(|_| ApiError::InvalidArgument(format!("unknown filter {}", request.filter)))?;
        let keep = move |phase: Phase| match filter {
            pb::ListFilter::Unspecified => true,
            pb::ListFilter::Active => phase.is_undecided(),
            pb::ListFilter::InDoubt => phase.is_in_doubt(),
        };
        let transactions = self
            .engine
            .list(keep, limit)
            .iter()
            .map(|h| info_to_pb(h))
            .collect();
        Ok(Response::new(pb::ListTransactionsResponse { transactions }))
    }

    async fn query_decision(
        &self,
        request: Request<pb::QueryDecisionRequest>,
    ) -> Result<Response<pb::QueryDecisionResponse>, Status> {
        let _call = self.enter(&request)?;
        let request = request.into_inner();
        if request.gids.len() > 10_000 {
            return Err(ApiError::InvalidArgument("at most 10000 gids per QueryDecision".into()).into());
        }
        let decisions = self.engine.decisions(&request.gids).await;
        let answers = request
            .gids
            .into_iter()
            .zip(decisions)
            .map(|(gid, (decision, tracked))| {
                let decision = match decision {
                    Decision::Commit => pb::Decision::Commit,
                    Decision::Abort => pb::Decision::Abort,
                    Decision::Pending => pb::Decision::Pending,
                    Decision::Unknown => pb::Decision::Unspecified,
                };
                pb::DecisionAnswer {
                    gid,
                    decision: decision as i32,
                    tracked,
                }
            })
            .collect();
        Ok(Response::new(pb::QueryDecisionResponse { answers }))
    }

    async fn list_in_doubt(
        &self,
        request: Request<pb::ListInDoubtRequest>,
    ) -> Result<Response<pb::ListInDoubtResponse>, Status> {
        let _call = self.enter(&request)?;
        let timeout_ms = request.into_inner().participant_timeout_ms;
        Ok(Response::new(
            crate::in_doubt::list(&self.engine, timeout_ms).await,
        ))
    }

    async fn resolve(
        &self,
        request: Request<pb::ResolveRequest>,
    ) -> Result<Response<pb::ResolveResponse>, Status> {
        let _call = self.enter(&request)?;
        let operator = operator_of(&request)?;
        let request = request.into_inner();
        let decision = if request.commit {
            HeuristicDecision::Commit
        } else {
            HeuristicDecision::Abort
        };
        let request = ResolveRequest::new(request.txid, decision, &request.reason, &operator)
            .map_err(|refused| ApiError::InvalidArgument(refused.to_string()))?;
        let outcome = self.engine.resolve(request).await?;
        Ok(Response::new(pb::ResolveResponse {
            decision: outcome.decision.name().into(),
            recorded: outcome.recorded,
            shards: outcome.shards,
            message: outcome.message,
        }))
    }

    async fn info(&self, request: Request<pb::InfoRequest>) -> Result<Response<pb::InfoResponse>, Status> {
        let _call = self.enter(&request)?;
        Ok(Response::new(pb::InfoResponse {
            coordinator_id: self.engine.id().to_string(),
            shards: self
                .engine
                .transport()
                .shards()
                .iter()
                .map(ToString::to_string)
                .collect(),
            next_txid: self.engine.next_txid(),
            incarnation: self.engine.incarnation(),
            first_txid: self.engine.first_txid(),
            open_from: self.engine.open_from().unwrap_or(0),
        }))
    }
}

/// Who a heuristic decision is recorded as: the authenticated identity when the coordinator has an
/// access file (a name typed beside it must be that identity: the record says who proved to be
/// there, not who they said they were), else the name the operator gave.
fn operator_of(request: &Request<pb::ResolveRequest>) -> Result<String, Status> {
    let typed = request.get_ref().operator.trim();
    match treaty_proto::auth::caller(request) {
        Some(caller) => {
            let identity = caller.identity();
            if typed.is_empty() || typed == identity {
                Ok(identity.to_owned())
            } else {
                Err(Status::permission_denied(format!(
                    "you are authenticated as {identity}; the decision is recorded under that identity, not \
                     {typed:?}: leave --operator out or give {identity}"
                )))
            }
        }
        None => Ok(typed.to_owned()),
    }
}
