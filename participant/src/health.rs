//! What the participant serves for operators and load balancers besides its own API: the gRPC
//! health service (`grpc.health.v1.Health`) and server reflection (v1 and v1alpha).
//!
//! The health rule, for the service names `""` (the whole server) and `treaty.v1.Participant`:
//! nothing is served before the database was reached, checked, claimed and migrated (`run` does
//! all of that before it serves), so the first answer is SERVING; from then on the status follows
//! the claim's own periodic check (`claim::Claim::held`, a `SELECT 1` on the claim's connection
//! every couple of seconds, with a timeout): NOT_SERVING while the database cannot be reached or
//! this participant no longer holds its claim on it, SERVING again once the claim is retaken on a
//! live connection. The branch path does no health work.

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use treaty_proto::health::report;
use treaty_proto::pb::participant_server::SERVICE_NAME as PARTICIPANT_SERVICE;

/// The participant's status given whether its database answers under its claim.
pub fn status(database_held: bool) -> ServingStatus {
    if database_held {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// Starts reporting `database_held` as the participant's health; returns the reporter the
/// services read (`server` for the network, `HealthService::from_health_reporter` for a
/// coordinator that calls it in process) and the task that follows the claim (it ends when the
/// claim is dropped).
pub async fn start(mut database_held: watch::Receiver<bool>) -> (HealthReporter, JoinHandle<()>) {
    // Built from its parts rather than `health_reporter()`, whose server type is opaque.
    let reporter = HealthReporter::new();
    let statuses = reporter.clone();
    // The first status is set before the service can be asked, so that the participant's own name
    // is never "not registered" and "" never says SERVING for a database that does not answer.
    let held = *database_held.borrow();
    report(&reporter, PARTICIPANT_SERVICE, status(held)).await;
    let following = tokio::spawn(async move {
        loop {
            let held = *database_held.borrow_and_update();
            if held {
                tracing::info!("health: SERVING, the database answers");
            } else {
                tracing::warn!("health: NOT_SERVING, the database does not answer (or its claim is lost)");
            }
            report(&reporter, PARTICIPANT_SERVICE, status(held)).await;
            if database_held.changed().await.is_err() {
                report(&reporter, PARTICIPANT_SERVICE, ServingStatus::NotServing).await;
                return;
            }
        }
    });
    (statuses, following)
}

/// The `grpc.health.v1.Health` service over `reporter`'s statuses, to serve on the network.
pub fn server(reporter: &HealthReporter) -> HealthServer<HealthService> {
    HealthServer::new(HealthService::from_health_reporter(reporter.clone()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpListener;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus as Wire;
    use tonic_health::pb::health_client::HealthClient;

    use super::*;

    async fn check(client: &mut HealthClient<tonic::transport::Channel>, service: &str) -> Wire {
        let request = HealthCheckRequest {
            service: service.to_owned(),
        };
        client.check(request).await.unwrap().into_inner().status()
    }

    /// Polls until every reported name answers `expected`, failing after a deadline.
    async fn await_status(client: &mut HealthClient<tonic::transport::Channel>, expected: Wire) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut answers = Vec::new();
            for name in ["", PARTICIPANT_SERVICE] {
                answers.push(check(client, name).await);
            }
            if answers.iter().all(|answer| *answer == expected) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "still {answers:?}, expected {expected:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn the_status_follows_the_claim_on_the_database() {
        let (held, database_held) = watch::channel(true);
        let (reporter, following) = start(database_held).await;
        let server = server(&reporter);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(server)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let mut client = HealthClient::new(
            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );

        await_status(&mut client, Wire::Serving).await;
        held.send(false).unwrap();
        await_status(&mut client, Wire::NotServing).await;
        held.send(true).unwrap();
        await_status(&mut client, Wire::Serving).await;
        // The claim dropped (the participant stopping): never SERVING again.
        drop(held);
        await_status(&mut client, Wire::NotServing).await;
        following.await.unwrap();
        serving.abort();
    }
}
