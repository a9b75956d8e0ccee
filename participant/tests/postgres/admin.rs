//! The `Admin` service that arms failpoints is served only by a build with them: without the
//! `failpoints` feature a call to it answers UNIMPLEMENTED (tonic's answer for a service it does
//! not have), so no client of the service port can arm anything.

use treaty_proto::pb;
use treaty_proto::pb::admin_client::AdminClient;

use crate::support::{Env, SERVER};

#[tokio::test]
async fn the_admin_service_is_served_only_by_a_build_with_failpoints() {
    let _shared = SERVER.read().await;
    let Some(env) = Env::start("admin", |_| {}).await else {
        return;
    };
    let url = env.participant.as_ref().expect("participant running").url.clone();
    let mut admin = AdminClient::connect(url).await.unwrap();
    let listed = admin.list_failpoints(pb::ListFailpointsRequest {}).await;
    if treaty_participant::failpoints::BUILT_IN {
        let listed = listed.unwrap().into_inner();
        assert!(listed.enabled);
        assert_eq!(
            listed.failpoints.len(),
            treaty_participant::failpoints::CATALOG.len()
        );
    } else {
        assert_eq!(listed.unwrap_err().code(), tonic::Code::Unimplemented);
        let set = admin
            .set_failpoint(pb::SetFailpointRequest {
                name: "participant::unsafe-commit-in-doubt".into(),
                actions: "return".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(set.code(), tonic::Code::Unimplemented, "{set:?}");
    }
}
