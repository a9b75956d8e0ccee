//! The participant's services called inside the coordinator's own process, for a shard the
//! coordinator drives itself (`--shard NAME=postgres://...`). A call runs the very handlers the
//! agent serves over the network (execution, the SQL guard, voting, finishing, health) as a plain
//! method call on the service, with the request and answer as the generated message types: no
//! socket, no HTTP/2 framing, no protobuf encoding and decoding, no second process. Each handler
//! still runs its database work on a task of its own (`service.rs`), so a caller that gives up
//! cannot cancel a branch halfway, exactly as over the network.

use std::sync::Arc;

use tonic_health::pb::health_server::Health;
use tonic_health::server::HealthService;
use treaty_proto::pb::participant_server::Participant;

use crate::service::ParticipantService;

/// A started participant's `treaty.v1.Participant` and `grpc.health.v1.Health` services
/// (`Running::in_process`). Cheap to clone: each service is an `Arc`.
#[derive(Clone)]
pub struct InProcess {
    participant: Arc<ParticipantService>,
    health: Arc<HealthService>,
}

impl InProcess {
    pub(crate) fn new(participant: Arc<ParticipantService>, health: HealthService) -> InProcess {
        InProcess {
            participant,
            health: Arc::new(health),
        }
    }

    /// The `treaty.v1.Participant` handlers: call them as the generated trait's methods.
    pub fn participant(&self) -> &impl Participant {
        &*self.participant
    }

    /// The `grpc.health.v1.Health` handlers over the participant's health.
    pub fn health(&self) -> &impl Health {
        &*self.health
    }
}
