//! The participant's gRPC services as one `tower` service called inside the coordinator's own
//! process, for a shard the coordinator drives itself (`--shard NAME=postgres://...`). A call runs
//! the very handlers the agent serves over the network (execution, the SQL guard, voting,
//! finishing, health), in the caller's task: no socket, no HTTP/2 framing, no second process. The
//! request and answer still pass through their protobuf encoding, which keeps one code path for
//! both kinds of participant.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::server::NamedService;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::HealthService;
use tower_service::Service;
use treaty_proto::pb::participant_server::ParticipantServer;

use crate::service::ParticipantService;

/// A started participant's `treaty.v1.Participant` and `grpc.health.v1.Health` services, routed
/// by path (`Running::in_process`). Cheap to clone: each service is an `Arc` inside.
#[derive(Clone)]
pub struct InProcess {
    participant: ParticipantServer<ParticipantService>,
    health: HealthServer<HealthService>,
}

impl InProcess {
    pub(crate) fn new(
        participant: ParticipantServer<ParticipantService>,
        health: HealthServer<HealthService>,
    ) -> InProcess {
        InProcess { participant, health }
    }
}

impl Service<http::Request<Body>> for InProcess {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Both generated servers are always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let health_path = request
            .uri()
            .path()
            .strip_prefix('/')
            .and_then(|path| path.strip_prefix(HealthServer::<HealthService>::NAME))
            .is_some_and(|rest| rest.starts_with('/'));
        if health_path {
            self.health.call(request)
        } else {
            // Every other path, including unknown ones, which the generated server answers
            // UNIMPLEMENTED as the network service would.
            self.participant.call(request)
        }
    }
}
