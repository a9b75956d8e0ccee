//! Links to the participant agents: one lazily connected gRPC channel per shard, the per-shard
//! queue that coalesces commits into `CommitBatch` calls, and the translation of their answers
//! into protocol events (votes, acknowledgements, abort reasons, and for three-phase commit
//! pre-commit acknowledgements and reported states).

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};

use treaty_proto::pb::participant_client::ParticipantClient;
use treaty_proto::{ApiError, Gid, ShardName, pb};

use crate::failpoints::Delivery;
use crate::h2_channel::H2Channel;
use crate::protocol::participant::Report;
use crate::protocol::termination::Ballot;
use treaty_proto::wire::{ballot_from_pb, ballot_to_pb, report_from_pb};
use crate::protocol::{AbortCause, AbortReason, Event, Protocol, Vote};

/// How long connecting (TCP and the HTTP/2 handshake) to a participant may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How long one phase-two message may take before it is counted as lost and sent again.
pub(crate) const PHASE_TWO_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("shard {shard}: {url:?} is not a usable participant address ({reason}); use http://HOST:PORT")]
    BadUrl {
        shard: String,
        url: String,
        reason: String,
    },
}

/// Most GIDs in one `CommitBatch`.
const MAX_COMMIT_BATCH: usize = 128;
/// `CommitBatch` calls in flight per shard; commits that arrive meanwhile wait and go together.
const COMMIT_BATCHES_IN_FLIGHT: usize = 4;

/// A commit waiting for its batch, and where its answer goes.
type PendingCommit = (String, oneshot::Sender<Result<(), PhaseTwoError>>);

/// Why a phase-two message did not succeed.
#[derive(Debug)]
struct PhaseTwoError {
    message: String,
    /// The participant's records contradict the decision (FAILED_PRECONDITION).
    contradicts: bool,
}

#[derive(Clone)]
pub struct ParticipantLinks {
    clients: BTreeMap<ShardName, ParticipantClient<H2Channel>>,
    /// Where each shard's participant serves, as configured: 3PC tells every participant where
    /// its peers are (`pb::Peer`).
    urls: Arc<BTreeMap<ShardName, String>>,
    /// Per shard, the queue of the task that coalesces commits into `CommitBatch` calls; started
    /// on first use (it needs the runtime).
    commit_queues: Arc<BTreeMap<ShardName, OnceLock<mpsc::UnboundedSender<PendingCommit>>>>,
}

impl ParticipantLinks {
    /// Builds a channel per shard. Nothing connects yet: a participant that is down at start is
    /// reached when it comes back.
    pub fn new(shards: &BTreeMap<ShardName, String>) -> Result<Self, LinkError> {
        let mut clients = BTreeMap::new();
        let mut commit_queues = BTreeMap::new();
        for (shard, url) in shards {
            let bad = |reason: String| LinkError::BadUrl {
                shard: shard.to_string(),
                url: url.clone(),
                reason,
            };
            let channel = H2Channel::new(url, CONNECT_TIMEOUT).map_err(|e| bad(e.to_string()))?;
            clients.insert(shard.clone(), ParticipantClient::new(channel));
            commit_queues.insert(shard.clone(), OnceLock::new());
        }
        Ok(Self {
            clients,
            urls: Arc::new(shards.clone()),
            commit_queues: Arc::new(commit_queues),
        })
    }

    pub fn shard_names(&self) -> impl Iterator<Item = &ShardName> {
        self.clients.keys()
    }

    /// The shard's name as configured, or an error listing the known ones.
    pub fn resolve(&self, shard: &str) -> Result<ShardName, ApiError> {
        self.clients
            .get_key_value(shard)
            .map(|(name, _)| name.clone())
            .ok_or_else(|| {
                let known: Vec<&str> = self.clients.keys().map(ShardName::as_str).collect();
                ApiError::InvalidArgument(format!(
                    "unknown shard {shard:?}; this coordinator knows: {}",
                    known.join(", ")
                ))
            })
    }

    /// The participants of a 3PC transaction with the addresses the coordinator reaches them at.
    /// A shard this coordinator is not configured with (a logged one, removed since) goes with an
    /// empty URL: its peers cannot reach it, and termination waits for it, as it must.
    pub fn peers<'a>(&self, shards: impl IntoIterator<Item = &'a str>) -> Vec<pb::Peer> {
        shards
            .into_iter()
            .map(|shard| pb::Peer {
                shard: shard.to_owned(),
                url: self.urls.get(shard).cloned().unwrap_or_default(),
            })
            .collect()
    }

    fn client(&self, shard: &ShardName) -> Result<ParticipantClient<H2Channel>, ApiError> {
        self.clients
            .get(shard)
            .cloned()
            .ok_or_else(|| ApiError::Internal(format!("shard {shard} is not configured on this coordinator")))
    }

    pub async fn execute(
        &self,
        shard: &ShardName,
        request: pb::BranchExecuteRequest,
        timeout: Duration,
    ) -> Result<pb::ExecuteResult, ApiError> {
        let mut client = self.client(shard)?;
        let call = client.execute(request);
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(with_shard(ApiError::from(status), shard)),
            Err(_) => Err(ApiError::DeadlineExceeded(format!(
                "shard {shard}: statement did not finish within the transaction's remaining {} ms",
                timeout.as_millis()
            ))),
        }
    }

    /// Runs a branch's last statement and has the participant vote right after it (one-shot
    /// submits): the statement's result, and the vote as `prepare` would have turned it into one.
    pub async fn execute_and_prepare(
        &self,
        shard: &ShardName,
        request: pb::BranchExecuteRequest,
        timeout: Duration,
    ) -> Result<(pb::ExecuteResult, Vote), ApiError> {
        let mut client = self.client(shard)?;
        let three_phase = request.protocol == pb::Protocol::ThreePhase as i32;
        let call = client.execute_and_prepare(request);
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(response)) => {
                let response = response.into_inner();
                let vote = match response.vote {
                    Some(_) if three_phase && response.protocol != pb::Protocol::ThreePhase as i32 => {
                        Vote::No(unavailable(
                            shard,
                            "asked for a three-phase vote, the participant answered for another \
                             protocol (a participant without three-phase ExecuteAndPrepare?)"
                                .into(),
                        ))
                    }
                    Some(vote) if three_phase => {
                        checked_vote(shard, vote_from_pb(shard, vote), Protocol::ThreePhase)
                    }
                    Some(vote) => vote_from_pb(shard, vote),
                    None => Vote::No(unavailable(
                        shard,
                        "the participant's answer carried no vote".into(),
                    )),
                };
                Ok((response.result.unwrap_or_default(), vote))
            }
            Ok(Err(status)) => Err(with_shard(ApiError::from(status), shard)),
            Err(_) => Err(ApiError::DeadlineExceeded(format!(
                "shard {shard}: statement did not finish within the transaction's remaining {} ms",
                timeout.as_millis()
            ))),
        }
    }

    /// Asks for a vote; anything but a clear YES or READ-ONLY within `timeout` is a NO. A message
    /// a failpoint fails or loses (`delivery`) ends the same way as an unreachable participant
    /// or a lost message. For three-phase commit the request names the protocol and every
    /// participant with its address, and a READ-ONLY vote counts as NO: a 3PC participant must
    /// prepare (one that committed on its own would report a commit to the termination protocol).
    pub async fn prepare(
        &self,
        shard: &ShardName,
        gid: &Gid,
        participants: Vec<String>,
        protocol: Protocol,
        timeout: Duration,
        delivery: Delivery,
    ) -> Vote {
        let no_vote = || {
            Vote::No(
                AbortReason::new(
                    AbortCause::Timeout,
                    format!("no vote within {} ms", timeout.as_millis()),
                )
                .on_shard(shard),
            )
        };
        match delivery {
            Delivery::Send => {}
            Delivery::Fail(failpoint) => {
                return Vote::No(unavailable(
                    shard,
                    format!("prepare failed: failpoint {failpoint}"),
                ));
            }
            Delivery::Lose => {
                tokio::time::sleep(timeout).await;
                return no_vote();
            }
        }
        let mut client = match self.client(shard) {
            Ok(client) => client,
            Err(e) => return Vote::No(unavailable(shard, e.to_string())),
        };
        let request = match protocol {
            Protocol::TwoPhase => pb::PrepareRequest {
                gid: gid.to_string(),
                participants,
                ..Default::default()
            },
            Protocol::ThreePhase => pb::PrepareRequest {
                gid: gid.to_string(),
                peers: self.peers(participants.iter().map(String::as_str)),
                participants,
                protocol: pb::Protocol::ThreePhase as i32,
            },
        };
        match tokio::time::timeout(timeout, client.prepare(request)).await {
            Ok(Ok(response)) => checked_vote(shard, vote_from_pb(shard, response.into_inner()), protocol),
            Ok(Err(status)) => Vote::No(unavailable(
                shard,
                format!("prepare failed: {}", status.message()),
            )),
            Err(_) => no_vote(),
        }
    }

    /// Sends COMMIT PREPARED (or the abort) and turns the answer into the event the protocol
    /// expects; a message a failpoint fails or loses (`delivery`) fails as one that did not arrive.
    pub async fn finish(&self, shard: &ShardName, gid: &Gid, commit: bool, delivery: Delivery) -> Event {
        let failed = |error: String| Event::PhaseTwoFailed {
            shard: shard.clone(),
            error,
        };
        let lost = || failed(format!("no answer within {} ms", PHASE_TWO_TIMEOUT.as_millis()));
        match delivery {
            Delivery::Send => {}
            Delivery::Fail(failpoint) => return failed(format!("failpoint {failpoint}")),
            Delivery::Lose => {
                tokio::time::sleep(PHASE_TWO_TIMEOUT).await;
                return lost();
            }
        }
        let mut client = match self.client(shard) {
            Ok(client) => client,
            Err(e) => return failed(e.to_string()),
        };
        let request = pb::FinishRequest { gid: gid.to_string() };
        let call = async {
            if commit {
                self.commit_batched(shard, &client, gid.to_string()).await
            } else {
                client
                    .abort(request)
                    .await
                    .map(|_| ())
                    .map_err(PhaseTwoError::from)
            }
        };
        match tokio::time::timeout(PHASE_TWO_TIMEOUT, call).await {
            Ok(Ok(())) => Event::Acknowledged { shard: shard.clone() },
            Ok(Err(error)) => {
                if error.contradicts {
                    // The participant's own records contradict the decision: this must never
                    // happen. Keep retrying (visible in GetTransaction) and say so loudly.
                    tracing::error!(%shard, %gid, commit, error = error.message, "participant contradicts the decision");
                }
                failed(error.message)
            }
            Err(_) => lost(),
        }
    }

    /// 3PC: sends `PreCommit` under `ballot` and turns the answer into the event the machine
    /// expects: `PreCommitAcknowledged`, or `PhaseTwoFailed` (retried with backoff until the
    /// machine stops asking: past its deadline it learns the participants' states instead, under
    /// a ballot above any promise a refusal names).
    pub async fn pre_commit(
        &self,
        shard: &ShardName,
        gid: &Gid,
        ballot: &Ballot,
        delivery: Delivery,
    ) -> Event {
        let failed = |error: String| Event::PhaseTwoFailed {
            shard: shard.clone(),
            error,
        };
        let lost = || {
            failed(format!(
                "no answer to PreCommit within {} ms",
                PHASE_TWO_TIMEOUT.as_millis()
            ))
        };
        match delivery {
            Delivery::Send => {}
            Delivery::Fail(failpoint) => return failed(format!("failpoint {failpoint}")),
            Delivery::Lose => {
                tokio::time::sleep(PHASE_TWO_TIMEOUT).await;
                return lost();
            }
        }
        let mut client = match self.client(shard) {
            Ok(client) => client,
            Err(e) => return failed(e.to_string()),
        };
        let request = pb::PreCommitRequest {
            gid: gid.to_string(),
            ballot: Some(ballot_to_pb(ballot)),
        };
        match tokio::time::timeout(PHASE_TWO_TIMEOUT, client.pre_commit(request)).await {
            Ok(Ok(response)) => {
                let response = response.into_inner();
                if response.acknowledged {
                    return Event::PreCommitAcknowledged {
                        shard: shard.clone(),
                        ballot: ballot.clone(),
                    };
                }
                let promised = match ballot_from_pb(response.promised.as_ref()) {
                    Ok(promised) => format!(" (it promised ballot {promised:?})"),
                    Err(_) => String::new(),
                };
                failed(format!("PreCommit refused{promised}: {}", response.message))
            }
            Ok(Err(status)) => failed(format!("PreCommit failed: {}", status.message())),
            Err(_) => lost(),
        }
    }

    /// 3PC: asks one participant for its branch's state under `ballot` (`peers`: every participant,
    /// so that one that never got the prepare can take part). `None` when it does not answer
    /// within `timeout` or answers something unreadable: the machine asks again on its tick.
    pub async fn query_state(
        &self,
        shard: &ShardName,
        gid: &Gid,
        ballot: &Ballot,
        peers: Vec<pb::Peer>,
        timeout: Duration,
    ) -> Option<Report> {
        let mut client = self.client(shard).ok()?;
        let request = pb::QueryStateRequest {
            gid: gid.to_string(),
            ballot: Some(ballot_to_pb(ballot)),
            participants: peers,
        };
        match tokio::time::timeout(timeout, client.query_state(request)).await {
            Ok(Ok(response)) => match report_from_pb(&response.into_inner()) {
                Ok(report) => Some(report),
                Err(e) => {
                    tracing::warn!(%shard, %gid, "unreadable QueryState answer: {e}");
                    None
                }
            },
            Ok(Err(status)) => {
                tracing::debug!(%shard, %gid, "QueryState failed: {}", status.message());
                None
            }
            Err(_) => None,
        }
    }

    /// Queues a commit for the shard's next `CommitBatch` and waits for its own answer. Under
    /// load, the commits of many transactions to one shard share a message (fewer messages and
    /// wake-ups on both sides); alone, a commit is sent at once.
    async fn commit_batched(
        &self,
        shard: &ShardName,
        client: &ParticipantClient<H2Channel>,
        gid: String,
    ) -> Result<(), PhaseTwoError> {
        let Some(queue) = self.commit_queues.get(shard) else {
            return Err(PhaseTwoError::new(format!(
                "shard {shard} is not configured on this coordinator"
            )));
        };
        let queue = queue.get_or_init(|| {
            let (sender, receiver) = mpsc::unbounded_channel();
            tokio::spawn(send_commit_batches(client.clone(), receiver));
            sender
        });
        let (answer, answered) = oneshot::channel();
        queue
            .send((gid, answer))
            .map_err(|_| PhaseTwoError::new("the commit queue has stopped".into()))?;
        answered
            .await
            .map_err(|_| PhaseTwoError::new("the commit batch was dropped unanswered".into()))?
    }

    /// Runs a single-shard transaction's last statement and commits it in the same call
    /// (`ExecuteAndCommit`): the one-phase outcome as `commit_one_phase` reports it, and the
    /// statement's result when it ran. `op` names the statement in an abort reason.
    pub async fn execute_and_commit(
        &self,
        shard: &ShardName,
        request: pb::ExecuteAndCommitRequest,
        op: usize,
        timeout: Duration,
    ) -> (Event, Option<pb::ExecuteResult>) {
        let mut client = match self.client(shard) {
            Ok(client) => client,
            Err(e) => {
                let reason = unavailable(shard, e.to_string());
                return (Event::OnePhaseFailed { reason }, None);
            }
        };
        let expect_rows = request.expect_rows;
        match tokio::time::timeout(timeout, client.execute_and_commit(request)).await {
            Ok(Ok(response)) => {
                let response = response.into_inner();
                let result = response.result.unwrap_or_default();
                let event = if response.committed {
                    Event::OnePhaseCommitted
                } else {
                    let reason = AbortReason::new(
                        AbortCause::ExpectRows,
                        format!(
                            "op {op} affected {} rows, expected {}",
                            result.rows_affected,
                            expect_rows.unwrap_or_default()
                        ),
                    )
                    .on_shard(shard);
                    Event::OnePhaseFailed { reason }
                };
                (event, Some(result))
            }
            Ok(Err(status)) => {
                let event = match ApiError::from(status) {
                    // The statement or the COMMIT failed in PostgreSQL: rolled back.
                    ApiError::Sql(sql) => Event::OnePhaseFailed {
                        reason: statement_failed(shard, &sql),
                    },
                    // Refused before anything ran (bad request, branch in the wrong state).
                    ApiError::FailedPrecondition(message) | ApiError::InvalidArgument(message) => {
                        Event::OnePhaseFailed {
                            reason: AbortReason::new(
                                AbortCause::StatementFailed,
                                format!("op {op}: {message}"),
                            )
                            .on_shard(shard),
                        }
                    }
                    // The call broke: the COMMIT may or may not have run.
                    other => Event::OnePhaseUnknown {
                        error: format!("shard {shard}: {other}"),
                    },
                };
                (event, None)
            }
            Err(_) => (
                Event::OnePhaseUnknown {
                    error: format!(
                        "shard {shard}: no answer to the statement and its COMMIT within {} ms",
                        timeout.as_millis()
                    ),
                },
                None,
            ),
        }
    }

    pub async fn commit_one_phase(&self, shard: &ShardName, gid: &Gid) -> Event {
        let mut client = match self.client(shard) {
            Ok(client) => client,
            Err(e) => {
                return Event::OnePhaseFailed {
                    reason: unavailable(shard, e.to_string()),
                };
            }
        };
        let request = pb::FinishRequest { gid: gid.to_string() };
        match tokio::time::timeout(PHASE_TWO_TIMEOUT, client.commit_one_phase(request)).await {
            Ok(Ok(_)) => Event::OnePhaseCommitted,
            Ok(Err(status)) => match ApiError::from(status) {
                ApiError::Sql(sql) => Event::OnePhaseFailed {
                    reason: statement_failed(shard, &sql),
                },
                // The participant answered without committing (no such branch, timed out, ...).
                ApiError::FailedPrecondition(message) | ApiError::InvalidArgument(message) => {
                    Event::OnePhaseFailed {
                        reason: unavailable(shard, message),
                    }
                }
                // The connection broke: the COMMIT may or may not have run.
                other => Event::OnePhaseUnknown {
                    error: format!("shard {shard}: {other}"),
                },
            },
            Err(_) => Event::OnePhaseUnknown {
                error: format!(
                    "shard {shard}: no answer to COMMIT within {} ms",
                    PHASE_TWO_TIMEOUT.as_millis()
                ),
            },
        }
    }
}

/// A participant's answer to a vote request; anything but a clear YES or READ-ONLY is a NO.
fn vote_from_pb(shard: &ShardName, response: pb::PrepareResponse) -> Vote {
    match pb::Vote::try_from(response.vote) {
        Ok(pb::Vote::Yes) => Vote::Yes,
        Ok(pb::Vote::ReadOnly) => Vote::ReadOnly,
        _ => {
            let mut reason = AbortReason::new(AbortCause::VoteNo, response.message).on_shard(shard);
            reason.retryable = treaty_proto::SqlError {
                shard: String::new(),
                sqlstate: response.sqlstate.clone(),
                message: String::new(),
            }
            .retryable();
            reason.sqlstate = response.sqlstate;
            Vote::No(reason)
        }
    }
}

impl PhaseTwoError {
    fn new(message: String) -> Self {
        Self {
            message,
            contradicts: false,
        }
    }

    /// No answer within `PHASE_TWO_TIMEOUT`: counted as lost, and sent again.
    fn lost() -> Self {
        Self::new(format!("no answer within {} ms", PHASE_TWO_TIMEOUT.as_millis()))
    }
}

impl From<tonic::Status> for PhaseTwoError {
    fn from(status: tonic::Status) -> Self {
        Self {
            message: status.message().to_owned(),
            contradicts: status.code() == tonic::Code::FailedPrecondition,
        }
    }
}

/// The task behind one shard's commit queue: takes whatever is queued (up to `MAX_COMMIT_BATCH`)
/// as soon as a slot among `COMMIT_BATCHES_IN_FLIGHT` is free, and sends it as one `CommitBatch`.
/// Ends when the links are dropped.
async fn send_commit_batches(
    client: ParticipantClient<H2Channel>,
    mut queue: mpsc::UnboundedReceiver<PendingCommit>,
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
        let mut client = client.clone();
        tokio::spawn(async move {
            let (gids, answers): (Vec<String>, Vec<_>) = batch.into_iter().unzip();
            let gids_again = gids.clone();
            let call = client.commit_batch(pb::FinishBatchRequest { gids });
            let outcome = tokio::time::timeout(PHASE_TWO_TIMEOUT, call).await;
            drop(slot);
            match outcome {
                Ok(Ok(response)) => {
                    let mut results = response.into_inner().results.into_iter();
                    for answer in answers {
                        let result = match results.next() {
                            Some(result) if result.error.is_empty() => Ok(()),
                            Some(result) => Err(PhaseTwoError {
                                message: result.error,
                                contradicts: result.contradicts,
                            }),
                            None => Err(PhaseTwoError::new(
                                "the participant's batch answer left this commit out".into(),
                            )),
                        };
                        // The waiter may have timed out; it sends the commit again.
                        let _ = answer.send(result);
                    }
                }
                Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                    // A participant from before CommitBatch: one Commit per GID.
                    for (gid, answer) in gids_again.into_iter().zip(answers) {
                        let call = client.commit(pb::FinishRequest { gid });
                        let result = match tokio::time::timeout(PHASE_TWO_TIMEOUT, call).await {
                            Ok(result) => result.map(|_| ()).map_err(PhaseTwoError::from),
                            Err(_) => Err(PhaseTwoError::lost()),
                        };
                        let _ = answer.send(result);
                    }
                }
                Ok(Err(status)) => {
                    for answer in answers {
                        let _ = answer.send(Err(PhaseTwoError::from(status.clone())));
                    }
                }
                Err(_) => {
                    for answer in answers {
                        let _ = answer.send(Err(PhaseTwoError::lost()));
                    }
                }
            }
        });
    }
}

/// A vote as the protocol may count it: a READ-ONLY vote in a three-phase transaction is a NO,
/// since such a participant (one without three-phase commit?) holds no branch that termination
/// could ask about.
fn checked_vote(shard: &ShardName, vote: Vote, protocol: Protocol) -> Vote {
    match (vote, protocol) {
        (Vote::ReadOnly, Protocol::ThreePhase) => Vote::No(unavailable(
            shard,
            "voted READ-ONLY in a three-phase transaction (a participant without three-phase \
             commit?); every 3PC participant must prepare"
                .into(),
        )),
        (vote, _) => vote,
    }
}

fn with_shard(error: ApiError, shard: &ShardName) -> ApiError {
    match error {
        ApiError::Sql(mut sql) => {
            if sql.shard.is_empty() {
                sql.shard = shard.to_string();
            }
            ApiError::Sql(sql)
        }
        ApiError::Unavailable(m) => ApiError::Unavailable(format!("shard {shard} is unavailable: {m}")),
        other => other,
    }
}

/// The abort reason for a statement that did not run to completion on `shard`. A shard that could
/// not be reached, or that lost the branch in a restart (ABORTED), says the transaction may succeed
/// when run again; a refused request does not.
pub fn execute_failed(shard: &ShardName, error: &ApiError) -> AbortReason {
    match error {
        ApiError::Sql(sql) => statement_failed(shard, sql),
        ApiError::Unavailable(_) | ApiError::Aborted(_) => unavailable(shard, error.to_string()),
        ApiError::DeadlineExceeded(_) => {
            AbortReason::new(AbortCause::Timeout, error.to_string()).on_shard(shard)
        }
        other => AbortReason::new(AbortCause::StatementFailed, other.to_string()).on_shard(shard),
    }
}

fn unavailable(shard: &ShardName, message: String) -> AbortReason {
    AbortReason::new(AbortCause::ParticipantUnavailable, message).on_shard(shard)
}

/// The abort reason for a statement that failed in PostgreSQL.
pub fn statement_failed(shard: &ShardName, sql: &treaty_proto::SqlError) -> AbortReason {
    AbortReason {
        cause: AbortCause::StatementFailed,
        shard: Some(shard.clone()),
        sqlstate: sql.sqlstate.clone(),
        message: sql.message.clone(),
        retryable: sql.retryable(),
    }
}

impl ParticipantLinks {
    /// The branches `shard` holds prepared, with their locks (`treaty in-doubt`); an error when the
    /// participant does not answer within `timeout`.
    pub async fn list_prepared(
        &self,
        shard: &ShardName,
        timeout: Duration,
    ) -> Result<pb::ListPreparedResponse, ApiError> {
        let mut client = self.client(shard)?;
        let call = client.list_prepared(pb::ListPreparedRequest {});
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(with_shard(ApiError::from(status), shard)),
            Err(_) => Err(ApiError::DeadlineExceeded(format!(
                "shard {shard}: no answer within {} ms",
                timeout.as_millis()
            ))),
        }
    }
}
