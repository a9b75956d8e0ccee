//! The participant's lazily connected gRPC client to its coordinator, used by recovery: `Info`
//! (whose GIDs this participant may resolve) and `QueryDecision`. Wire types stay in this module.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use treaty_proto::pb::coordinator_client::CoordinatorClient;
use treaty_proto::{CoordinatorId, TxId, pb};

/// Largest batch the coordinator accepts in one `QueryDecision`.
pub const MAX_GIDS_PER_QUERY: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("--coordinator {url:?} is not a usable address ({reason}); use http://HOST:PORT")]
    BadUrl { url: String, reason: String },
    #[error("coordinator at {url} is unreachable: {message}")]
    Unreachable { url: String, message: String },
    #[error("coordinator at {url} sent an invalid answer: {message}")]
    BadAnswer { url: String, message: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorInfo {
    pub id: CoordinatorId,
    pub next_txid: TxId,
}

/// The coordinator's answer about one GID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Still in flight: ask again later.
    Pending,
    Commit,
    Abort,
    /// Not one of the coordinator's GIDs (or an answer this version does not know): leave it.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub gid: String,
    pub decision: Decision,
    /// The coordinator may still send phase two for it: keep its marker row.
    pub tracked: bool,
}

#[derive(Clone)]
pub struct CoordinatorLink {
    url: String,
    client: CoordinatorClient<Channel>,
}

impl CoordinatorLink {
    /// Builds the channel; nothing connects until the first call.
    pub fn new(url: &str) -> Result<Self, LinkError> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| LinkError::BadUrl {
                url: url.to_owned(),
                reason: e.to_string(),
            })?
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        Ok(Self {
            url: url.to_owned(),
            client: CoordinatorClient::new(endpoint.connect_lazy()),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn unreachable(&self, status: &tonic::Status) -> LinkError {
        LinkError::Unreachable {
            url: self.url.clone(),
            message: status.message().to_owned(),
        }
    }

    pub async fn info(&self) -> Result<CoordinatorInfo, LinkError> {
        let response = self
            .client
            .clone()
            .info(pb::InfoRequest {})
            .await
            .map_err(|status| self.unreachable(&status))?
            .into_inner();
        let id = CoordinatorId::new(&response.coordinator_id).map_err(|e| LinkError::BadAnswer {
            url: self.url.clone(),
            message: e.to_string(),
        })?;
        Ok(CoordinatorInfo {
            id,
            next_txid: response.next_txid,
        })
    }

    /// Asks about up to `MAX_GIDS_PER_QUERY` GIDs.
    pub async fn query_decision(&self, gids: Vec<String>) -> Result<Vec<Answer>, LinkError> {
        let response = self
            .client
            .clone()
            .query_decision(pb::QueryDecisionRequest { gids })
            .await
            .map_err(|status| self.unreachable(&status))?
            .into_inner();
        Ok(response
            .answers
            .into_iter()
            .map(|answer| Answer {
                decision: match pb::Decision::try_from(answer.decision) {
                    Ok(pb::Decision::Pending) => Decision::Pending,
                    Ok(pb::Decision::Commit) => Decision::Commit,
                    Ok(pb::Decision::Abort) => Decision::Abort,
                    Ok(pb::Decision::Unspecified) | Err(_) => Decision::Unknown,
                },
                gid: answer.gid,
                tracked: answer.tracked,
            })
            .collect())
    }
}
