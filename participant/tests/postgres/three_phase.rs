//! Three-phase commit between two real participants (s0 and s1, two databases of one PostgreSQL
//! server, as branch GIDs allow) with the coordinator silent: the fake coordinator only answers PENDING, so whatever finishes the
//! transaction is the participants' termination protocol.

use std::time::Duration;

use treaty_proto::pb;

use crate::support::{Env, Participant, SERVER, TestDb, eventually, int, vote};

const FINISHED: Duration = Duration::from_secs(20);
/// Short, so termination starts soon after the coordinator falls silent.
const TIMEOUT_MS: u64 = 300;

struct Pair {
    db1: TestDb,
    s1: Option<Participant>,
    data_dir1: tempfile::TempDir,
    /// Last, so dropped last: it holds the PostgreSQL server both databases are on.
    env: Env,
}

impl Pair {
    async fn start(name: &str) -> Option<Pair> {
        let env = Env::start(name, |config| config.three_phase_timeout_ms = TIMEOUT_MS).await?;
        // On s0's server: each participant prepares under its own branch GID.
        let db1 = TestDb::create(
            &env.admin_url,
            &format!("treaty_test_{}_s1", name.replace('-', "_")),
        )
        .await;
        let data_dir1 = tempfile::tempdir().unwrap();
        let mut pair = Pair {
            env,
            db1,
            s1: None,
            data_dir1,
        };
        pair.s1 = Some(Participant::start(pair.s1_config()).await);
        for db in [&pair.env.db, &pair.db1] {
            db.sql("CREATE TABLE kv (k bigint PRIMARY KEY)").await;
        }
        Some(pair)
    }

    fn s1_config(&self) -> treaty_participant::Config {
        let mut config = crate::support::config(&self.db1, self.env.coordinator_addr, self.data_dir1.path());
        config.shard = treaty_proto::ShardName::new("s1").unwrap();
        config.three_phase_timeout_ms = TIMEOUT_MS;
        config
    }

    /// The coordinator's first-round pre-commit, sent to s1 only.
    async fn coordinator_pre_commit_to_s1(&self, gid: &str) -> pb::PreCommitResponse {
        self.s1()
            .client
            .clone()
            .pre_commit(pb::PreCommitRequest {
                gid: gid.into(),
                ballot: Some(coordinator_ballot()),
            })
            .await
            .unwrap()
            .into_inner()
    }

    fn s1(&self) -> &Participant {
        self.s1.as_ref().unwrap()
    }

    fn peers(&self) -> Vec<pb::Peer> {
        let s0 = self.env.participant.as_ref().unwrap();
        vec![
            pb::Peer {
                shard: "s0".into(),
                url: s0.url.clone(),
            },
            pb::Peer {
                shard: "s1".into(),
                url: self.s1().url.clone(),
            },
        ]
    }

    /// Inserts `k` on both shards under `gid` and prepares both branches under 3PC.
    async fn prepared(&self, gid: &str, k: i64) {
        // The silent coordinator: recovery must not get an ABORT (presumed) from it.
        self.env.coordinator.decide(gid, pb::Decision::Pending, true);
        let request = |sql: &str| pb::BranchExecuteRequest {
            gid: gid.into(),
            sql: sql.into(),
            params: vec![int(k)],
            options: None,
            ..Default::default()
        };
        let sql = "INSERT INTO kv VALUES ($1)";
        for mut client in [self.env.client(), self.s1().client.clone()] {
            client.execute(request(sql)).await.unwrap();
            let prepare = pb::PrepareRequest {
                gid: gid.into(),
                participants: vec!["s0".into(), "s1".into()],
                protocol: pb::Protocol::ThreePhase as i32,
                peers: self.peers(),
            };
            let answer = client.prepare(prepare).await.unwrap().into_inner();
            assert_eq!(vote(&answer), pb::Vote::Yes, "{answer:?}");
        }
    }

    /// As `prepared`, with each vote cast together with the statement (`ExecuteAndPrepare`
    /// carrying the protocol and the peers, as a one-shot submit sends it).
    async fn prepared_fused(&self, gid: &str, k: i64) {
        self.env.coordinator.decide(gid, pb::Decision::Pending, true);
        for mut client in [self.env.client(), self.s1().client.clone()] {
            let answer = client
                .execute_and_prepare(pb::BranchExecuteRequest {
                    gid: gid.into(),
                    sql: "INSERT INTO kv VALUES ($1)".into(),
                    params: vec![int(k)],
                    options: None,
                    protocol: pb::Protocol::ThreePhase as i32,
                    peers: self.peers(),
                    continues: false,
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(answer.result.map(|r| r.rows_affected), Some(1));
            assert_eq!(
                answer.protocol,
                pb::Protocol::ThreePhase as i32,
                "the vote says it is 3PC"
            );
            assert_eq!(vote(answer.vote.as_ref().unwrap()), pb::Vote::Yes);
        }
    }

    async fn finished_everywhere(&self, gid: &str) {
        let (db0, db1) = (&self.env.db, &self.db1);
        eventually("both branches finished", FINISHED, || async {
            !db0.is_prepared(gid).await && !db1.is_prepared(gid).await
        })
        .await;
        // Deleted in a batch by the participant's ticker, soon after.
        eventually(
            "the three-phase rows of finished branches deleted",
            FINISHED,
            || async {
                db0.count("SELECT count(*) FROM treaty.three_phase").await == 0
                    && db1.count("SELECT count(*) FROM treaty.three_phase").await == 0
            },
        )
        .await;
    }
}

fn coordinator_ballot() -> pb::Ballot {
    pb::Ballot {
        round: 0,
        proposer: Some(pb::ballot::Proposer::CoordinatorIncarnation(0)),
    }
}

#[tokio::test]
async fn a_pre_commit_at_one_participant_makes_both_commit_without_the_coordinator() {
    let _shared = SERVER.read().await;
    let Some(mut pair) = Pair::start("tpc-commit").await else {
        return;
    };
    let gid = pair.env.gid(1);
    pair.prepared(&gid, 1).await;
    // The coordinator's pre-commit reaches s1 only, then the coordinator falls silent.
    let answer = pair.coordinator_pre_commit_to_s1(&gid).await;
    assert!(answer.acknowledged, "{answer:?}");
    assert_eq!(
        pair.db1
            .count("SELECT count(*) FROM treaty.three_phase WHERE pre_committed")
            .await,
        1,
        "the pre-commit is durable before it is acknowledged"
    );
    // s1 restarts: only what it recorded durably tells it that it pre-committed.
    let s1 = pair.s1.take().unwrap();
    let addr = s1.url.trim_start_matches("http://").to_owned();
    s1.stop().await;
    pair.s1 = Some(Participant::start_at(pair.s1_config(), &addr).await);

    pair.finished_everywhere(&gid).await;
    for db in [&pair.env.db, &pair.db1] {
        assert_eq!(db.count("SELECT count(*) FROM kv WHERE k = 1").await, 1);
        assert!(db.has_marker(&gid).await, "committed with its marker");
    }
    // A late query (a restarted coordinator learning) finds no machine any more: the answer comes
    // from PostgreSQL, never a presumed abort.
    let late = pair
        .s1()
        .client
        .clone()
        .query_state(pb::QueryStateRequest {
            gid: gid.clone(),
            ballot: Some(pb::Ballot {
                round: 9,
                proposer: Some(pb::ballot::Proposer::CoordinatorIncarnation(2)),
            }),
            participants: pair.peers(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(late.state, pb::ReportedState::Committed as i32, "{late:?}");
}

#[tokio::test]
async fn without_any_pre_commit_both_abort_and_a_late_pre_commit_is_refused() {
    let _shared = SERVER.read().await;
    let Some(pair) = Pair::start("tpc-abort").await else {
        return;
    };
    let gid = pair.env.gid(1);
    pair.prepared(&gid, 2).await;
    pair.finished_everywhere(&gid).await;
    for db in [&pair.env.db, &pair.db1] {
        assert_eq!(db.count("SELECT count(*) FROM kv").await, 0);
    }
    // The coordinator's pre-commit arriving after termination aborted cannot revive it.
    let late = pair.coordinator_pre_commit_to_s1(&gid).await;
    assert!(!late.acknowledged, "{late:?}");
}

#[tokio::test]
async fn a_query_before_the_vote_aborts_the_branch_and_the_vote_is_no() {
    let _shared = SERVER.read().await;
    let Some(pair) = Pair::start("tpc-query-first").await else {
        return;
    };
    let gid = pair.env.gid(1);
    pair.env
        .execute(&gid, "INSERT INTO kv VALUES (3)", vec![])
        .await
        .unwrap();
    let leader_ballot = pb::Ballot {
        round: 1,
        proposer: Some(pb::ballot::Proposer::Participant("s1".into())),
    };
    let report = pair
        .env
        .client()
        .query_state(pb::QueryStateRequest {
            gid: gid.clone(),
            ballot: Some(leader_ballot),
            participants: pair.peers(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.state, pb::ReportedState::Aborted as i32, "{report:?}");
    let prepare = pb::PrepareRequest {
        gid: gid.clone(),
        participants: vec!["s0".into(), "s1".into()],
        protocol: pb::Protocol::ThreePhase as i32,
        peers: pair.peers(),
    };
    let answer = pair.env.client().prepare(prepare).await.unwrap().into_inner();
    assert_eq!(vote(&answer), pb::Vote::No, "{answer:?}");
    assert!(!pair.env.db.is_prepared(&gid).await);
    assert_eq!(pair.env.db.count("SELECT count(*) FROM kv").await, 0);
}

#[tokio::test]
async fn bad_three_phase_requests_are_refused_with_the_reason() {
    let _shared = SERVER.read().await;
    let Some(pair) = Pair::start("tpc-bad").await else {
        return;
    };
    let gid = pair.env.gid(1);
    let mut client = pair.env.client();
    let missing_me = client
        .prepare(pb::PrepareRequest {
            gid: gid.clone(),
            participants: vec!["s1".into()],
            protocol: pb::Protocol::ThreePhase as i32,
            peers: vec![pb::Peer {
                shard: "s1".into(),
                url: pair.s1().url.clone(),
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(missing_me.code(), tonic::Code::InvalidArgument);
    assert!(missing_me.message().contains("(s0)"), "{}", missing_me.message());
    let no_ballot = client
        .pre_commit(pb::PreCommitRequest {
            gid: gid.clone(),
            ballot: None,
        })
        .await
        .unwrap_err();
    assert_eq!(no_ballot.code(), tonic::Code::InvalidArgument);
    assert!(no_ballot.message().contains("ballot"), "{}", no_ballot.message());
}

#[tokio::test]
async fn a_vote_cast_with_the_statement_takes_part_in_termination() {
    let _shared = SERVER.read().await;
    let Some(pair) = Pair::start("tpc-fused").await else {
        return;
    };
    let gid = pair.env.gid(1);
    pair.prepared_fused(&gid, 3).await;
    assert_eq!(
        pair.db1.count("SELECT count(*) FROM treaty.three_phase").await,
        1,
        "the fused vote recorded its peers, as a 3PC Prepare does"
    );
    // The coordinator's pre-commit reaches s1 only, then it falls silent: the participants'
    // termination, which needs both fused voters' states, commits both.
    let answer = pair.coordinator_pre_commit_to_s1(&gid).await;
    assert!(answer.acknowledged, "{answer:?}");
    pair.finished_everywhere(&gid).await;
    for db in [&pair.env.db, &pair.db1] {
        assert_eq!(db.count("SELECT count(*) FROM kv WHERE k = 3").await, 1);
    }
}
