//! What `run` serves besides the `Coordinator` service: the `Admin` service that arms failpoints
//! only in a build with them; without, a call to it answers UNIMPLEMENTED (tonic's answer for a
//! service it does not have), so no client can arm anything; the health service, which says
//! SERVING only while every shard's participant does; and server reflection.

use clap::Parser;
use tokio::net::TcpListener;
use treaty_proto::pb;

use crate::config::{Args, Config};
use crate::{failpoints, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_service_is_served_only_by_a_build_with_failpoints() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let args = Args::try_parse_from([
        "treaty-coordinator",
        "--data-dir",
        data_dir,
        "--shard",
        "s0=http://127.0.0.1:9",
    ])
    .unwrap();
    let config = Config::resolve(args).unwrap();
    // Bound before `run` starts: a connection waits in the backlog until it serves.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(run(config, listener, async {
        let _ = stopped.await;
    }));

    let mut admin = pb::admin_client::AdminClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let listed = admin.list_failpoints(pb::ListFailpointsRequest {}).await;
    if failpoints::BUILT_IN {
        let listed = listed.unwrap().into_inner();
        assert!(listed.enabled);
        assert_eq!(listed.failpoints.len(), failpoints::CATALOG.len());
    } else {
        assert_eq!(listed.unwrap_err().code(), tonic::Code::Unimplemented);
        let set = admin
            .set_failpoint(pb::SetFailpointRequest {
                name: "coordinator::after-end-record".into(),
                actions: "return(crash)".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(set.code(), tonic::Code::Unimplemented, "{set:?}");
    }

    drop(admin);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

/// A coordinator configured with `shards`, serving on a loopback port until `stop` is sent.
async fn start_coordinator(
    shards: &[(&str, String)],
) -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), crate::CoordinatorError>>,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let mut argv = vec![
        "treaty-coordinator".to_owned(),
        "--data-dir".to_owned(),
        dir.path().to_str().unwrap().to_owned(),
    ];
    for (name, url) in shards {
        argv.push("--shard".to_owned());
        argv.push(format!("{name}={url}"));
    }
    let config = Config::resolve(Args::try_parse_from(argv).unwrap()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(run(config, listener, async {
        let _ = stopped.await;
    }));
    (addr, stop, server, dir)
}

async fn channel(addr: std::net::SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

type HealthClient = tonic_health::pb::health_client::HealthClient<tonic::transport::Channel>;
type Wire = tonic_health::pb::health_check_response::ServingStatus;

/// Polls the coordinator's health for `""` and `treaty.v1.Coordinator` until both are `expected`.
async fn await_coordinator_status(client: &mut HealthClient, expected: Wire) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let mut answers = Vec::new();
        for service in ["", "treaty.v1.Coordinator"] {
            let request = tonic_health::pb::HealthCheckRequest {
                service: service.to_owned(),
            };
            answers.push(client.check(request).await.unwrap().into_inner().status());
        }
        if answers.iter().all(|answer| *answer == expected) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "coordinator health still {answers:?}, expected {expected:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A stand-in participant that serves only the health service, with the status the test sets.
async fn fake_participant() -> (
    std::net::SocketAddr,
    tonic_health::server::HealthReporter,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("treaty.v1.Participant", tonic_health::ServingStatus::Serving)
        .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // Stopped gracefully: a GOAWAY ends the coordinator's connection too (an aborted server task
    // would leave its connections' tasks answering).
    let serving = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    (addr, reporter, stop, serving)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_is_serving_only_while_every_participant_is() {
    let (participant, reporter, stop_participant, participant_serving) = fake_participant().await;
    let (addr, stop, server, _dir) = start_coordinator(&[("s0", format!("http://{participant}"))]).await;
    let mut health = HealthClient::new(channel(addr).await);

    await_coordinator_status(&mut health, Wire::Serving).await;
    // The participant says it cannot do its job (its database is down).
    reporter
        .set_service_status("treaty.v1.Participant", tonic_health::ServingStatus::NotServing)
        .await;
    await_coordinator_status(&mut health, Wire::NotServing).await;
    reporter
        .set_service_status("treaty.v1.Participant", tonic_health::ServingStatus::Serving)
        .await;
    await_coordinator_status(&mut health, Wire::Serving).await;
    // The participant is gone: nothing answers on its address.
    stop_participant.send(()).unwrap();
    participant_serving.await.unwrap();
    await_coordinator_status(&mut health, Wire::NotServing).await;

    drop(health);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_shard_keeps_the_coordinator_not_serving() {
    // Port 9 (discard): nothing listens there on a test machine.
    let (addr, stop, server, _dir) = start_coordinator(&[("s0", "http://127.0.0.1:9".to_owned())]).await;
    let mut health = HealthClient::new(channel(addr).await);
    // Wait for the first probe round to finish: past it, the status is still NOT_SERVING.
    tokio::time::timeout(crate::health::PROBE_EVERY * 3, async {
        loop {
            let request = tonic_health::pb::HealthCheckRequest {
                service: "treaty.v1.Coordinator".to_owned(),
            };
            let answer = health.check(request).await.unwrap().into_inner().status();
            assert_eq!(answer, Wire::NotServing);
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_err();
    drop(health);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_what_the_coordinator_serves() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let (addr, stop, server, _dir) = start_coordinator(&[("s0", "http://127.0.0.1:9".to_owned())]).await;
    let mut reflection = ServerReflectionClient::new(channel(addr).await);
    let ask = |request| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let requests = tokio_stream::iter([
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol(
            "treaty.v1.Coordinator".to_owned(),
        )),
    ]);
    let mut answers = reflection
        .server_reflection_info(requests)
        .await
        .unwrap()
        .into_inner();

    let listed = answers
        .message()
        .await
        .unwrap()
        .unwrap()
        .message_response
        .unwrap();
    let MessageResponse::ListServicesResponse(listed) = listed else {
        panic!("not a service list: {listed:?}");
    };
    let mut names: Vec<String> = listed.service.into_iter().map(|service| service.name).collect();
    names.sort();
    let mut expected = vec![
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "treaty.v1.Coordinator",
    ];
    if failpoints::BUILT_IN {
        expected.push("treaty.v1.Admin");
    }
    expected.sort();
    assert_eq!(names, expected);

    let described = answers
        .message()
        .await
        .unwrap()
        .unwrap()
        .message_response
        .unwrap();
    let MessageResponse::FileDescriptorResponse(files) = described else {
        panic!("not a file descriptor: {described:?}");
    };
    assert!(!files.file_descriptor_proto.is_empty());

    drop(reflection);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
