//! Links to the participant agents: one lazily connected gRPC channel per shard, and the
//! translation of their answers into protocol events (votes, acknowledgements, abort reasons).

use std::collections::BTreeMap;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use treaty_proto::pb::participant_client::ParticipantClient;
use treaty_proto::{ApiError, Gid, ShardName, pb};

use crate::failpoints::Delivery;
use crate::protocol::{AbortCause, AbortReason, Event, Vote};

/// How long one phase-two message may take before it is counted as lost and sent again.
const PHASE_TWO_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("shard {shard}: {url:?} is not a usable participant address ({reason}); use http://HOST:PORT")]
    BadUrl {
        shard: String,
        url: String,
        reason: String,
    },
}

#[derive(Clone)]
pub struct ParticipantLinks {
    clients: BTreeMap<ShardName, ParticipantClient<Channel>>,
}

impl ParticipantLinks {
    /// Builds a channel per shard. Nothing connects yet: a participant that is down at start is
    /// reached when it comes back.
    pub fn new(shards: &BTreeMap<ShardName, String>) -> Result<Self, LinkError> {
        let mut clients = BTreeMap::new();
        for (shard, url) in shards {
            let bad = |reason: String| LinkError::BadUrl {
                shard: shard.to_string(),
                url: url.clone(),
                reason,
            };
            let endpoint = Endpoint::from_shared(url.clone())
                .map_err(|e| bad(e.to_string()))?
                .connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5));
            clients.insert(shard.clone(), ParticipantClient::new(endpoint.connect_lazy()));
        }
        Ok(Self { clients })
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

    fn client(&self, shard: &ShardName) -> Result<ParticipantClient<Channel>, ApiError> {
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

    /// Asks for a vote; anything but a clear YES or READ-ONLY within `timeout` is a NO. A message
    /// a failpoint fails or loses (`delivery`) ends the same way as an unreachable participant
    /// or a lost message.
    pub async fn prepare(
        &self,
        shard: &ShardName,
        gid: &Gid,
        participants: Vec<String>,
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
        let request = pb::PrepareRequest {
            gid: gid.to_string(),
            participants,
        };
        match tokio::time::timeout(timeout, client.prepare(request)).await {
            Ok(Ok(response)) => {
                let response = response.into_inner();
                match pb::Vote::try_from(response.vote) {
                    Ok(pb::Vote::Yes) => Vote::Yes,
                    Ok(pb::Vote::ReadOnly) => Vote::ReadOnly,
                    _ => {
                        let mut reason =
                            AbortReason::new(AbortCause::VoteNo, response.message).on_shard(shard);
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
                client.commit(request).await
            } else {
                client.abort(request).await
            }
        };
        match tokio::time::timeout(PHASE_TWO_TIMEOUT, call).await {
            Ok(Ok(_)) => Event::Acknowledged { shard: shard.clone() },
            Ok(Err(status)) => {
                if status.code() == tonic::Code::FailedPrecondition {
                    // The participant's own records contradict the decision: this must never
                    // happen. Keep retrying (visible in GetTransaction) and say so loudly.
                    tracing::error!(%shard, %gid, commit, error = status.message(), "participant contradicts the decision");
                }
                failed(status.message().to_owned())
            }
            Err(_) => lost(),
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
