//! What the coordinator serves for operators and load balancers besides its own API: the gRPC
//! health service (`grpc.health.v1.Health`) and server reflection (v1 and v1alpha).
//!
//! The health rule, for the service names `""` (the whole server) and `treaty.v1.Coordinator`:
//!
//! - nothing is served before the decision store is open and replayed and recovery has started
//!   (`run` starts serving only after `driver::start`), so that half of "can do its job" holds from
//!   the first answer;
//! - NOT_SERVING until the first round of shard probes has finished, and then whenever the last
//!   round found a configured shard unreachable; SERVING when every configured shard was reached
//!   (a coordinator with no shard is SERVING).
//!
//! A shard is reached when its participant answers its own health check for
//! `treaty.v1.Participant` with SERVING (it is up, its database answers and it holds its claim on
//! it), or with UNIMPLEMENTED (a participant older than the health service), within
//! `PROBE_TIMEOUT`. Every `PROBE_EVERY` the probe sends one such call per shard, all at once, on
//! the link's own connection (`ParticipantLinks::participant_serving`): it costs one small HTTP/2
//! stream per shard, and it runs in a task of its own, so it never holds up a transaction.

use std::time::Duration;

use futures::future::join_all;
use tokio::task::JoinHandle;
use tonic_health::ServingStatus;
use treaty_proto::ShardName;
use treaty_proto::health::report;
use treaty_proto::pb::coordinator_server::SERVICE_NAME as COORDINATOR_SERVICE;

use crate::participants::ParticipantLinks;

/// How often every shard is probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);
/// How long one shard's probe may take before the shard counts as unreachable.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The coordinator's status given the shards the last round could not reach.
pub fn status(unreachable: &[ShardName]) -> ServingStatus {
    if unreachable.is_empty() {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// The shards of `links` that did not answer SERVING within `PROBE_TIMEOUT`, probed all at once.
pub async fn unreachable_shards(links: &ParticipantLinks) -> Vec<ShardName> {
    let timeout_ms = PROBE_TIMEOUT.as_millis() as u64;
    let probes = links.health_probed_shards().map(|shard| async move {
        match links.participant_serving(shard, timeout_ms).await {
            Ok(true) => None,
            Ok(false) => Some((shard.clone(), "participant not serving".to_owned())),
            Err(error) => Some((shard.clone(), error.to_string())),
        }
    });
    let mut unreachable = Vec::new();
    for (shard, why) in join_all(probes).await.into_iter().flatten() {
        tracing::debug!(%shard, "health probe: {why}");
        unreachable.push(shard);
    }
    unreachable
}

/// Starts the health reporting (NOT_SERVING until the first probe round ends) and returns the
/// health service to serve and the probe task, to abort when serving ends.
pub async fn start(
    links: ParticipantLinks,
) -> (
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    JoinHandle<()>,
) {
    let (reporter, server) = tonic_health::server::health_reporter();
    // The reporter starts the server-wide name SERVING and knows no other: both are set before the
    // service can be asked, so no check sees SERVING (or "not registered") before a probe.
    report(&reporter, COORDINATOR_SERVICE, ServingStatus::NotServing).await;
    let probing = tokio::spawn(async move {
        let mut last: Option<Vec<ShardName>> = None;
        let mut ticker = tokio::time::interval(PROBE_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let unreachable = unreachable_shards(&links).await;
            if last.as_ref() != Some(&unreachable) {
                let shards: Vec<String> = unreachable.iter().map(ShardName::to_string).collect();
                match status(&unreachable) {
                    ServingStatus::Serving => tracing::info!("health: SERVING, every shard reached"),
                    _ => tracing::warn!(unreachable = ?shards, "health: NOT_SERVING, shards not reached"),
                }
                report(&reporter, COORDINATOR_SERVICE, status(&unreachable)).await;
                last = Some(unreachable);
            }
        }
    });
    (server, probing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serving_only_when_every_shard_is_reached() {
        assert_eq!(status(&[]), ServingStatus::Serving);
        let s1 = ShardName::new("s1").unwrap();
        assert_eq!(status(&[s1]), ServingStatus::NotServing);
    }
}
