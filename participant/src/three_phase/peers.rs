//! gRPC clients to the other participants of three-phase transactions, reached at the addresses
//! the coordinator put in the prepare (`Peer.url`). Channels are made lazily and kept per address;
//! every call has a short deadline, because the termination protocol asks again on its next
//! timeout rather than waiting on a participant that does not answer.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use treaty_commit_protocol::participant::Report;
use treaty_commit_protocol::termination::Ballot;
use treaty_proto::pb::participant_client::ParticipantClient;
use treaty_proto::wire;
use treaty_proto::{Gid, ShardName, pb};

use super::{Peer, PreCommitAnswer};
use crate::error::BranchError;

/// A call to another participant gives up after this long.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Default)]
pub struct PeerClients {
    channels: Mutex<HashMap<String, ParticipantClient<Channel>>>,
    /// For `https://` peers (`--link-tls-*`).
    tls: Option<ClientTlsConfig>,
}

pub fn peers_to_pb(peers: &[Peer]) -> Vec<pb::Peer> {
    peers
        .iter()
        .map(|p| pb::Peer {
            shard: p.shard.to_string(),
            url: p.url.clone(),
        })
        .collect()
}

impl PeerClients {
    pub fn new(tls: Option<ClientTlsConfig>) -> Self {
        Self {
            channels: Mutex::default(),
            tls,
        }
    }

    fn client(&self, shard: &ShardName, peers: &[Peer]) -> Result<ParticipantClient<Channel>, BranchError> {
        let url = peers
            .iter()
            .find(|p| &p.shard == shard)
            .map(|p| p.url.clone())
            .filter(|url| !url.is_empty())
            .ok_or_else(|| {
                BranchError::Unavailable(format!(
                    "no address for participant {shard}: the coordinator did not name one"
                ))
            })?;
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(client) = channels.get(&url) {
            return Ok(client.clone());
        }
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| BranchError::InvalidRequest(format!("participant {shard} address {url:?}: {e}")))?
            .connect_timeout(Duration::from_secs(1))
            .timeout(CALL_TIMEOUT)
            .tcp_nodelay(true);
        if url.starts_with("https://") {
            let tls = self.tls.clone().ok_or_else(|| {
                BranchError::Unavailable(format!(
                    "participant {shard} is at {url}, but this participant has no --link-tls-ca to reach it"
                ))
            })?;
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| BranchError::Unavailable(format!("participant {shard} at {url}: TLS: {e}")))?;
        }
        let client = ParticipantClient::new(endpoint.connect_lazy());
        channels.insert(url, client.clone());
        Ok(client)
    }

    fn failed(shard: &ShardName, status: tonic::Status) -> BranchError {
        BranchError::Unavailable(format!("participant {shard}: {}", status.message()))
    }

    pub async fn query_state(
        &self,
        gid: &Gid,
        shard: &ShardName,
        peers: &[Peer],
        ballot: &Ballot,
    ) -> Result<Report, BranchError> {
        let request = pb::QueryStateRequest {
            gid: gid.to_string(),
            ballot: Some(wire::ballot_to_pb(ballot)),
            participants: peers_to_pb(peers),
        };
        let response = self
            .client(shard, peers)?
            .query_state(request)
            .await
            .map_err(|status| Self::failed(shard, status))?
            .into_inner();
        wire::report_from_pb(&response)
            .map_err(|e| BranchError::Unavailable(format!("participant {shard} answered badly: {e}")))
    }

    pub async fn pre_commit(
        &self,
        gid: &Gid,
        shard: &ShardName,
        peers: &[Peer],
        ballot: &Ballot,
    ) -> Result<PreCommitAnswer, BranchError> {
        let request = pb::PreCommitRequest {
            gid: gid.to_string(),
            ballot: Some(wire::ballot_to_pb(ballot)),
        };
        let response = self
            .client(shard, peers)?
            .pre_commit(request)
            .await
            .map_err(|status| Self::failed(shard, status))?
            .into_inner();
        if response.acknowledged {
            return Ok(PreCommitAnswer::Acknowledged);
        }
        Ok(PreCommitAnswer::Refused {
            promised: wire::ballot_from_pb(response.promised.as_ref()).unwrap_or_else(|_| ballot.clone()),
            why: response.message,
        })
    }

    pub async fn finish(
        &self,
        gid: &Gid,
        shard: &ShardName,
        peers: &[Peer],
        commit: bool,
    ) -> Result<(), BranchError> {
        let request = pb::FinishRequest { gid: gid.to_string() };
        let mut client = self.client(shard, peers)?;
        let result = if commit {
            client.commit(request).await
        } else {
            client.abort(request).await
        };
        result.map(|_| ()).map_err(|status| Self::failed(shard, status))
    }

    pub async fn request_termination(
        &self,
        gid: &Gid,
        leader: &ShardName,
        peers: &[Peer],
    ) -> Result<(), BranchError> {
        let request = pb::TerminationRequest {
            gid: gid.to_string(),
            participants: peers_to_pb(peers),
        };
        self.client(leader, peers)?
            .request_termination(request)
            .await
            .map(|_| ())
            .map_err(|status| Self::failed(leader, status))
    }
}
