//! Failpoints armed over the `Admin` service and with `--failpoints`: a process stops at an exact
//! protocol step, and after a restart the transaction ends all-or-nothing.

use std::time::Duration;

use anyhow::Result;
use tonic::transport::Channel;
use treaty_proto::pb;
use treaty_proto::pb::admin_client::AdminClient;

use crate::fixture::*;

const RECOVERY: Duration = Duration::from_secs(30);

fn three_inserts(t: &TestCluster, k: i64) -> pb::SubmitRequest {
    submit((0..3).map(|i| insert(&t.shard(i), k, "v")).collect())
}

async fn rows_with(t: &TestCluster, k: i64) -> Result<usize> {
    let mut count = 0;
    for shard in 0..3 {
        count += t.kv(shard).await?.iter().filter(|(key, _)| *key == k).count();
    }
    Ok(count)
}

async fn settled_with(t: &TestCluster, k: i64, rows: usize) -> Result<bool> {
    Ok(rows_with(t, k).await? == rows && t.prepared_everywhere().await? == 0)
}

async fn admin(endpoint: String) -> Result<AdminClient<Channel>> {
    Ok(AdminClient::connect(endpoint).await?)
}

async fn arm(admin: &mut AdminClient<Channel>, name: &str, actions: &str) -> Result<(), tonic::Status> {
    admin
        .set_failpoint(pb::SetFailpointRequest {
            name: name.into(),
            actions: actions.into(),
        })
        .await
        .map(|_| ())
}

fn log_of(t: &TestCluster, participant: usize) -> String {
    std::fs::read_to_string(t.cluster.participants[participant].log_path()).unwrap_or_default()
}

/// The binaries these tests start are the fault-injection build (`cargo build-fi`, as
/// scripts/test.sh does): without it every test here would fail on an absent `Admin` service; this
/// one says why and how to build the right ones.
#[test]
fn the_binaries_under_test_have_failpoints() -> Result<()> {
    treaty_harness::require_failpoints()?;
    for name in ["treaty-coordinator", "treaty-participant"] {
        let binary = treaty_harness::binary_path(name)?;
        assert!(
            treaty_harness::failpoints_built_in(&binary)?,
            "{}",
            binary.display()
        );
    }
    Ok(())
}

#[tokio::test]
async fn participant_crashing_right_after_prepare_ends_all_or_nothing() -> Result<()> {
    let mut t = TestCluster::start(Options::default()).await?;
    let mut s1 = admin(t.cluster.participants[1].endpoint()).await?;
    arm(&mut s1, "participant::after-prepare", "return(crash)").await?;
    let listed = s1
        .list_failpoints(pb::ListFailpointsRequest {})
        .await?
        .into_inner();
    assert!(listed.enabled);
    assert!(
        listed
            .failpoints
            .iter()
            .any(|f| f.name == "participant::after-prepare" && f.actions == "return(crash)"),
        "{listed:?}"
    );

    let mut client = t.client().await?;
    let result = client.submit(three_inserts(&t, 1)).await;
    if let Ok(response) = &result {
        assert!(
            !committed(&response.get_ref().outcome),
            "a participant died before voting: {response:?}"
        );
    }
    let exit = t.cluster.participants[1]
        .wait_exit(Duration::from_secs(10))
        .await?;
    assert!(exit.is_some(), "the participant of shard 1 should have died");
    assert_eq!(
        t.prepared(1).await?.len(),
        1,
        "it died after PREPARE TRANSACTION: its branch is prepared"
    );
    let log = log_of(&t, 1);
    assert!(log.contains("failpoint fired"), "{log}");
    assert!(
        log.contains("failpoint participant::after-prepare: crash"),
        "{log}"
    );

    t.cluster.participants[1].restart().await?;
    eventually("aborted everywhere, nothing prepared", RECOVERY, || {
        settled_with(&t, 1, 0)
    })
    .await?;
    // Arming over Admin does not outlive the process: the restarted participant runs through.
    let response = client.submit(three_inserts(&t, 2)).await?.into_inner();
    assert!(committed(&response.outcome), "{response:?}");
    eventually("committed everywhere", RECOVERY, || settled_with(&t, 2, 3)).await?;
    Ok(())
}

#[tokio::test]
async fn coordinator_crashing_between_commit_sends_commits_on_all_after_restart() -> Result<()> {
    let mut t = TestCluster::start(Options {
        coordinator_args: vec![
            "--failpoints".into(),
            "coordinator::between-commit-sends=return(crash)".into(),
            "--decision-store".into(),
            "file".into(),
        ],
        ..Options::default()
    })
    .await?;
    let mut client = t.client().await?;
    let result = client.submit(three_inserts(&t, 1)).await;
    assert!(
        result.is_err(),
        "the coordinator should have died before answering: {result:?}"
    );
    let exit = t.cluster.coordinator.wait_exit(Duration::from_secs(10)).await?;
    assert!(exit.is_some(), "the coordinator process should have ended");
    // The first participant committed; the others are still prepared.
    assert_eq!(rows_with(&t, 1).await?, 1);
    assert_eq!(t.prepared_everywhere().await?, 2);
    assert!(
        t.coordinator_log()
            .contains("failpoint coordinator::between-commit-sends: crash")
    );

    // Same flags: the re-drive of a logged decision does not stop at the failpoint again.
    t.cluster.coordinator.restart().await?;
    eventually("committed on every shard", RECOVERY, || settled_with(&t, 1, 3)).await?;
    Ok(())
}

#[tokio::test]
async fn failed_prepares_after_the_first_abort_everywhere() -> Result<()> {
    let t = TestCluster::start(Options::default()).await?;
    let mut coordinator = admin(t.cluster.coordinator_endpoint()).await?;
    arm(
        &mut coordinator,
        "coordinator::after-some-prepares",
        "1*return(error)",
    )
    .await?;
    let mut client = t.client().await?;
    let response = client.submit(three_inserts(&t, 1)).await?.into_inner();
    let outcome = response.outcome.expect("an outcome");
    assert_eq!(outcome.kind, pb::OutcomeKind::Aborted as i32, "{outcome:?}");
    let reason = outcome.abort.map(|a| a.message).unwrap_or_default();
    assert!(
        reason.contains("failpoint coordinator::after-some-prepares"),
        "{reason}"
    );
    eventually("aborted everywhere, nothing prepared", RECOVERY, || {
        settled_with(&t, 1, 0)
    })
    .await?;
    // `1*`: it fired once; the next transaction runs through.
    let response = client.submit(three_inserts(&t, 2)).await?.into_inner();
    assert!(committed(&response.outcome), "{response:?}");
    Ok(())
}

#[tokio::test]
async fn admin_refuses_unknown_names_and_bad_actions() -> Result<()> {
    let t = TestCluster::start(Options::default()).await?;
    for (endpoint, known) in [
        (
            t.cluster.coordinator_endpoint(),
            "coordinator::between-commit-sends",
        ),
        (t.cluster.participants[0].endpoint(), "participant::after-prepare"),
    ] {
        let mut admin = admin(endpoint).await?;
        let refused = arm(&mut admin, "participant::no-such-point", "return(crash)")
            .await
            .expect_err("an unknown name is refused");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(refused.message().contains(known), "{}", refused.message());

        for bad in ["explode", "sleep(soon)", "panic", "return(maybe)"] {
            let refused = arm(&mut admin, known, bad)
                .await
                .expect_err("bad actions are refused");
            assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{bad}");
        }

        arm(&mut admin, known, "pause").await?;
        admin.clear_failpoints(pb::ClearFailpointsRequest {}).await?;
        let listed = admin
            .list_failpoints(pb::ListFailpointsRequest {})
            .await?
            .into_inner();
        assert!(listed.failpoints.iter().any(|f| f.name == known));
        assert!(
            listed.failpoints.iter().all(|f| f.actions.is_empty()),
            "{listed:?}"
        );
    }
    // Disarmed: transactions run through.
    let mut client = t.client().await?;
    let response = client.submit(three_inserts(&t, 1)).await?.into_inner();
    assert!(committed(&response.outcome), "{response:?}");
    Ok(())
}
