//! What `run` serves besides the `Coordinator` service: the `Admin` service that arms failpoints
//! only in a build with them; without, a call to it answers UNIMPLEMENTED (tonic's answer for a
//! service it does not have), so no client can arm anything.

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
