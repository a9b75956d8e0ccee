//! `grpc.health.v1` and server reflection on the real processes: a participant is NOT_SERVING
//! while its database is down and SERVING again once it is back; the coordinator is NOT_SERVING
//! while a shard's participant is not serving or cannot be reached; reflection lists the services
//! (what `grpcurl list` asks) and describes them.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::fixture::{Options, TestCluster, eventually};

/// Long enough for a few health probe rounds (every 2 s) and a PostgreSQL restart.
const WITHIN: Duration = Duration::from_secs(30);

async fn channel(endpoint: &str) -> Result<Channel> {
    Ok(Endpoint::from_shared(endpoint.to_owned())?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(2))
        .connect()
        .await?)
}

/// The status `endpoint` reports for `service`.
async fn health(endpoint: &str, service: &str) -> Result<ServingStatus> {
    let mut client = HealthClient::new(channel(endpoint).await?);
    let request = HealthCheckRequest {
        service: service.to_owned(),
    };
    Ok(client.check(request).await?.into_inner().status())
}

/// Whether `endpoint` reports `expected` for both the whole server (`""`) and `service`.
async fn reports(endpoint: &str, service: &str, expected: ServingStatus) -> Result<bool> {
    Ok(health(endpoint, "").await? == expected && health(endpoint, service).await? == expected)
}

const COORDINATOR: &str = "treaty.v1.Coordinator";
const PARTICIPANT: &str = "treaty.v1.Participant";

#[tokio::test]
async fn health_follows_each_shards_database_and_participant() -> Result<()> {
    let mut t = TestCluster::start(Options::default()).await?;
    let coordinator = t.cluster.coordinator_endpoint();
    let participant = |index: usize| t.cluster.participants[index].endpoint();
    let (s0, s1) = (participant(0), participant(1));

    eventually("the coordinator SERVING", WITHIN, || {
        reports(&coordinator, COORDINATOR, ServingStatus::Serving)
    })
    .await?;
    for endpoint in [&s0, &s1] {
        assert_eq!(health(endpoint, PARTICIPANT).await?, ServingStatus::Serving);
        assert_eq!(health(endpoint, "").await?, ServingStatus::Serving);
    }

    // Shard 1's database goes down: its participant, and so the coordinator, stop serving.
    t.cluster.pgs[1].stop_fast().await?;
    eventually("s1's participant NOT_SERVING", WITHIN, || {
        reports(&s1, PARTICIPANT, ServingStatus::NotServing)
    })
    .await?;
    eventually("the coordinator NOT_SERVING", WITHIN, || {
        reports(&coordinator, COORDINATOR, ServingStatus::NotServing)
    })
    .await?;
    assert_eq!(
        health(&s0, PARTICIPANT).await?,
        ServingStatus::Serving,
        "another shard's participant is not affected"
    );

    // Back up: both serve again.
    t.cluster.pgs[1].restart().await?;
    eventually("s1's participant SERVING again", WITHIN, || {
        reports(&s1, PARTICIPANT, ServingStatus::Serving)
    })
    .await?;
    eventually("the coordinator SERVING again", WITHIN, || {
        reports(&coordinator, COORDINATOR, ServingStatus::Serving)
    })
    .await?;

    // A participant process gone: the coordinator cannot reach the shard.
    t.cluster.participants[2].kill9()?;
    eventually(
        "the coordinator NOT_SERVING without s2's participant",
        WITHIN,
        || reports(&coordinator, COORDINATOR, ServingStatus::NotServing),
    )
    .await?;
    t.cluster.participants[2].restart().await?;
    eventually(
        "the coordinator SERVING with s2's participant back",
        WITHIN,
        || reports(&coordinator, COORDINATOR, ServingStatus::Serving),
    )
    .await?;

    // And it still commits across every shard.
    let mut client = t.client().await?;
    let shards: Vec<String> = (0..3).map(|i| t.shard(i)).collect();
    let ops = shards
        .iter()
        .enumerate()
        .map(|(i, shard)| crate::fixture::insert(shard, i as i64, "after health"))
        .collect();
    let submitted = client.submit(crate::fixture::submit(ops)).await?.into_inner();
    assert!(crate::fixture::committed(&submitted.outcome), "{submitted:?}");
    Ok(())
}

/// The services `endpoint` lists over reflection v1, and whether v1alpha describes `symbol`.
async fn reflect(endpoint: &str, symbol: &str) -> Result<(Vec<String>, bool)> {
    use tonic_reflection::pb::{v1, v1alpha};

    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel(endpoint).await?);
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let answer = answers.message().await?.context("no answer to list_services")?;
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(listed)) =
        answer.message_response
    else {
        bail!("not a service list: {answer:?}");
    };
    let mut services: Vec<String> = listed.service.into_iter().map(|s| s.name).collect();
    services.sort();

    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel(endpoint).await?);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(symbol.to_owned()),
        ),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let answer = answers
        .message()
        .await?
        .context("no answer to file_containing_symbol")?;
    let described = matches!(
        answer.message_response,
        Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(ref files))
            if !files.file_descriptor_proto.is_empty()
    );
    Ok((services, described))
}

#[tokio::test]
async fn reflection_lists_and_describes_each_services_api() -> Result<()> {
    let t = TestCluster::start(Options::default()).await?;
    let (services, described) = reflect(&t.cluster.coordinator_endpoint(), COORDINATOR).await?;
    for expected in [
        COORDINATOR,
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            services.iter().any(|s| s == expected),
            "{expected} not in {services:?}"
        );
    }
    assert!(!services.iter().any(|s| s == PARTICIPANT), "{services:?}");
    assert!(described, "v1alpha does not describe {COORDINATOR}");

    let (services, described) = reflect(&t.cluster.participants[0].endpoint(), PARTICIPANT).await?;
    assert!(services.iter().any(|s| s == PARTICIPANT), "{services:?}");
    assert!(!services.iter().any(|s| s == COORDINATOR), "{services:?}");
    assert!(described, "v1alpha does not describe {PARTICIPANT}");
    Ok(())
}
