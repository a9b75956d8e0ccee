//! gRPC health reporting shared by the coordinator and the participant: a server reports one
//! status under two names, the whole server's (`""`) and its API's own.

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// Sets `status` for the whole server and for `service` (its API's full name).
pub async fn report(reporter: &HealthReporter, service: &'static str, status: ServingStatus) {
    for name in ["", service] {
        reporter.set_service_status(name, status).await;
    }
}
