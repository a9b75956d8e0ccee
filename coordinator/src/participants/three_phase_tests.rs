//! The driver carrying out three-phase commit against in-process fake participants (real gRPC on
//! loopback, no database): what each RPC carries, that every step waits for the one before it,
//! that the log holds the pre-commit record exactly as long as it must, and that a restart learns
//! a logged pre-commit's outcome (answering PENDING meanwhile) under its durable incarnation.
//! Also, with `--decision-store shard`, that a restart re-drives more commit rows than one listing
//! returns. Failpoints are process-global, so these tests arm none (the e2e scenarios do).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use treaty_decision_log::{DecisionLog, LogError, LogOptions, PreCommitRecord, Replay};
use treaty_proto::pb::participant_server::{Participant, ParticipantServer};
use treaty_proto::{CoordinatorId, Gid, ShardName, pb};

use crate::CoordinatorEngine as Engine;
use crate::driver::{Decision, EngineSettings, TxnOptions};
use crate::participants::ParticipantLinks;
use crate::protocol::termination::{Ballot, Proposer};
use crate::protocol::{Outcome, Phase, Protocol, Timeouts};
use crate::store::FileStore;
use treaty_proto::wire::ballot_from_pb;

const WAIT_LIMIT: Duration = Duration::from_secs(20);

/// What one fake participant was sent, and how it answers `QueryState`.
#[derive(Default)]
struct Seen {
    executes: u32,
    /// `continues` of each `Execute`, in order.
    continues: Vec<bool>,
    execute_and_prepares: u32,
    /// (protocol, peers' shards) of each `ExecuteAndPrepare`.
    fused_votes: Vec<(i32, Vec<String>)>,
    prepares: Vec<pb::PrepareRequest>,
    pre_commits: Vec<pb::PreCommitRequest>,
    queries: Vec<pb::QueryStateRequest>,
    commits: Vec<String>,
    aborts: Vec<String>,
    /// `None`: `QueryState` fails (the participant is unreachable, as far as the coordinator knows).
    reports: Option<pb::ReportedState>,
    /// Commit rows this shard keeps, oldest first (each naming `s1` as the shard to commit on).
    decision_rows: Vec<String>,
}

#[derive(Clone, Default)]
struct Fake {
    seen: Arc<Mutex<Seen>>,
}

impl Fake {
    fn seen(&self) -> MutexGuard<'_, Seen> {
        self.seen.lock().unwrap()
    }
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not in this fake"))
}

fn yes() -> pb::PrepareResponse {
    pb::PrepareResponse {
        vote: pb::Vote::Yes as i32,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl Participant for Fake {
    async fn commit_decision(
        &self,
        _: Request<pb::CommitDecisionRequest>,
    ) -> Result<Response<pb::CommitDecisionResponse>, Status> {
        Err(Status::unimplemented("the fake keeps no decisions"))
    }

    async fn read_decisions(
        &self,
        _: Request<pb::ReadDecisionsRequest>,
    ) -> Result<Response<pb::ReadDecisionsResponse>, Status> {
        Err(Status::unimplemented("the fake keeps no decisions"))
    }

    async fn list_decisions(
        &self,
        request: Request<pb::ListDecisionsRequest>,
    ) -> Result<Response<pb::ListDecisionsResponse>, Status> {
        let limit = request.into_inner().limit as usize;
        let decisions = self
            .seen()
            .decision_rows
            .iter()
            .take(limit)
            .enumerate()
            .map(|(at, gid)| pb::StoredDecision {
                gid: gid.clone(),
                decision: pb::Decision::Commit as i32,
                participants: vec!["s1".into()],
                decided_at_ms: at as u64,
            })
            .collect();
        Ok(Response::new(pb::ListDecisionsResponse { decisions }))
    }

    async fn forget_decisions(
        &self,
        request: Request<pb::ForgetDecisionsRequest>,
    ) -> Result<Response<pb::ForgetDecisionsResponse>, Status> {
        let gids = request.into_inner().gids;
        let mut seen = self.seen();
        let before = seen.decision_rows.len();
        seen.decision_rows.retain(|gid| !gids.contains(gid));
        let deleted = (before - seen.decision_rows.len()) as u64;
        Ok(Response::new(pb::ForgetDecisionsResponse { deleted }))
    }

    async fn execute(
        &self,
        request: Request<pb::BranchExecuteRequest>,
    ) -> Result<Response<pb::ExecuteResult>, Status> {
        let mut seen = self.seen();
        seen.executes += 1;
        seen.continues.push(request.into_inner().continues);
        drop(seen);
        Ok(Response::new(pb::ExecuteResult::default()))
    }

    async fn execute_and_prepare(
        &self,
        request: Request<pb::BranchExecuteRequest>,
    ) -> Result<Response<pb::ExecuteAndPrepareResponse>, Status> {
        let request = request.into_inner();
        let mut seen = self.seen();
        seen.execute_and_prepares += 1;
        let peers = request.peers.into_iter().map(|peer| peer.shard).collect();
        seen.fused_votes.push((request.protocol, peers));
        drop(seen);
        Ok(Response::new(pb::ExecuteAndPrepareResponse {
            result: Some(pb::ExecuteResult::default()),
            vote: Some(yes()),
            protocol: request.protocol,
        }))
    }

    async fn prepare(
        &self,
        request: Request<pb::PrepareRequest>,
    ) -> Result<Response<pb::PrepareResponse>, Status> {
        self.seen().prepares.push(request.into_inner());
        Ok(Response::new(yes()))
    }

    async fn commit(
        &self,
        request: Request<pb::FinishRequest>,
    ) -> Result<Response<pb::FinishResponse>, Status> {
        self.seen().commits.push(request.into_inner().gid);
        Ok(Response::new(pb::FinishResponse::default()))
    }

    async fn commit_batch(
        &self,
        request: Request<pb::FinishBatchRequest>,
    ) -> Result<Response<pb::FinishBatchResponse>, Status> {
        let gids = request.into_inner().gids;
        self.seen().commits.extend(gids.iter().cloned());
        let results = gids
            .into_iter()
            .map(|gid| pb::FinishResult {
                gid,
                ..Default::default()
            })
            .collect();
        Ok(Response::new(pb::FinishBatchResponse { results }))
    }

    async fn abort(
        &self,
        request: Request<pb::FinishRequest>,
    ) -> Result<Response<pb::FinishResponse>, Status> {
        self.seen().aborts.push(request.into_inner().gid);
        Ok(Response::new(pb::FinishResponse::default()))
    }

    async fn commit_one_phase(
        &self,
        _: Request<pb::FinishRequest>,
    ) -> Result<Response<pb::FinishResponse>, Status> {
        unimplemented()
    }

    async fn execute_and_commit(
        &self,
        _: Request<pb::ExecuteAndCommitRequest>,
    ) -> Result<Response<pb::ExecuteAndCommitResponse>, Status> {
        unimplemented()
    }

    async fn status(&self, _: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        unimplemented()
    }

    async fn list_prepared(
        &self,
        _: Request<pb::ListPreparedRequest>,
    ) -> Result<Response<pb::ListPreparedResponse>, Status> {
        unimplemented()
    }

    async fn pre_commit(
        &self,
        request: Request<pb::PreCommitRequest>,
    ) -> Result<Response<pb::PreCommitResponse>, Status> {
        self.seen().pre_commits.push(request.into_inner());
        Ok(Response::new(pb::PreCommitResponse {
            acknowledged: true,
            ..Default::default()
        }))
    }

    async fn query_state(
        &self,
        request: Request<pb::QueryStateRequest>,
    ) -> Result<Response<pb::QueryStateResponse>, Status> {
        let mut seen = self.seen();
        seen.queries.push(request.into_inner());
        match seen.reports {
            Some(state) => Ok(Response::new(pb::QueryStateResponse {
                state: state as i32,
                ..Default::default()
            })),
            None => Err(Status::unavailable("not answering yet")),
        }
    }

    async fn request_termination(
        &self,
        _: Request<pb::TerminationRequest>,
    ) -> Result<Response<pb::TerminationResponse>, Status> {
        unimplemented()
    }
}

/// Two fake participants, `s0` and `s1`, serving on loopback.
struct Shards {
    fakes: BTreeMap<String, Fake>,
    urls: BTreeMap<ShardName, String>,
}

impl Shards {
    async fn start() -> Shards {
        let mut fakes = BTreeMap::new();
        let mut urls = BTreeMap::new();
        for name in ["s0", "s1"] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let fake = Fake::default();
            let server = tonic::transport::Server::builder()
                .add_service(ParticipantServer::new(fake.clone()))
                .serve_with_incoming(TcpIncoming::from(listener));
            tokio::spawn(server);
            fakes.insert(name.to_owned(), fake);
            urls.insert(ShardName::new(name).unwrap(), url);
        }
        Shards { fakes, urls }
    }

    fn seen(&self, shard: &str) -> MutexGuard<'_, Seen> {
        self.fakes[shard].seen()
    }

    fn answer_queries_with(&self, state: pb::ReportedState) {
        for fake in self.fakes.values() {
            fake.seen().reports = Some(state);
        }
    }
}

fn timeouts() -> Timeouts {
    Timeouts {
        transaction_ms: 10_000,
        idle_ms: 10_000,
        // Short: a learning round that goes unanswered is asked again this soon.
        vote_ms: 300,
    }
}

fn engine(log: DecisionLog, shards: &Shards, protocol: Protocol) -> Arc<Engine> {
    let settings = EngineSettings {
        timeouts: timeouts(),
        lock_timeout_ms: 1_000,
        protocol,
        decide_in_branch: false,
        takeover_after_ms: 0,
    };
    let links = ParticipantLinks::new(&shards.urls).unwrap();
    let store = FileStore::new(log, &Replay::default(), 0);
    crate::engine_on(CoordinatorId::new("c1").unwrap(), store, links, settings)
}

fn three_phase() -> TxnOptions {
    TxnOptions {
        protocol: Some(Protocol::ThreePhase),
        ..TxnOptions::default()
    }
}

/// Polls `condition` until it holds; fails the test after [`WAIT_LIMIT`].
async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT_LIMIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reopens the log once every task of the dropped engine let go of it.
async fn reopen(dir: &Path) -> (DecisionLog, Replay) {
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        match DecisionLog::open(dir, LogOptions::default()) {
            Ok(opened) => return opened,
            Err(LogError::Locked { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("reopening the log: {e}"),
        }
    }
}

fn ballot(pb_ballot: Option<&pb::Ballot>) -> Ballot {
    ballot_from_pb(pb_ballot).unwrap()
}

/// Once a statement succeeded on a shard, every later one there says it continues the branch, so
/// that a participant which lost the branch (it restarted) refuses instead of opening another.
#[tokio::test]
async fn a_statement_after_one_that_succeeded_on_its_shard_continues_the_branch() {
    let shards = Shards::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = DecisionLog::open(dir.path(), LogOptions::default()).unwrap();
    let engine = engine(log, &shards, Protocol::TwoPhase);
    let txid = engine.begin(TxnOptions::default()).await.unwrap();
    for shard in ["s0", "s0", "s1", "s0"] {
        engine
            .execute(txid, shard, "UPDATE t SET v = 1".into(), vec![])
            .await
            .unwrap();
    }
    assert_eq!(shards.seen("s0").continues, vec![false, true, true]);
    assert_eq!(shards.seen("s1").continues, vec![false]);
}

#[tokio::test]
async fn a_three_phase_commit_prepares_with_peers_then_pre_commits_then_commits_and_ends() {
    let shards = Shards::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = DecisionLog::open(dir.path(), LogOptions::default()).unwrap();
    let engine = engine(log, &shards, Protocol::TwoPhase);

    let txid = engine.begin(three_phase()).await.unwrap();
    for shard in ["s0", "s1"] {
        engine
            .execute(txid, shard, "INSERT INTO t VALUES (1)".into(), vec![])
            .await
            .unwrap();
    }
    let outcome = engine.commit(txid, true).await.unwrap();
    assert_eq!(outcome, Outcome::Committed);
    let gid = Gid::new(&CoordinatorId::new("c1").unwrap(), txid).to_string();

    for shard in ["s0", "s1"] {
        let seen = shards.seen(shard);
        let prepare = &seen.prepares[..];
        assert_eq!(prepare.len(), 1, "{shard}");
        assert_eq!(prepare[0].protocol, pb::Protocol::ThreePhase as i32);
        assert_eq!(prepare[0].participants, vec!["s0", "s1"]);
        let peers: Vec<(&str, &str)> = prepare[0]
            .peers
            .iter()
            .map(|p| (p.shard.as_str(), p.url.as_str()))
            .collect();
        let expected: Vec<(&str, &str)> = shards
            .urls
            .iter()
            .map(|(shard, url)| (shard.as_str(), url.as_str()))
            .collect();
        assert_eq!(
            peers, expected,
            "every participant with the URL the coordinator uses"
        );
        // The coordinator's own round: the lowest ballot, so any termination ballot is above it.
        assert_eq!(seen.pre_commits.len(), 1, "{shard}");
        assert_eq!(seen.pre_commits[0].gid, gid);
        assert_eq!(ballot(seen.pre_commits[0].ballot.as_ref()), Ballot::COORDINATOR);
        assert_eq!(seen.commits, vec![gid.clone()], "{shard}");
        assert!(seen.queries.is_empty() && seen.aborts.is_empty());
    }
    assert_eq!(engine.decision(&gid).await, (Decision::Commit, false));

    engine.flush().await;
    drop(engine);
    let (_log, replay) = reopen(dir.path()).await;
    assert!(replay.pre_committed.is_empty(), "{:?}", replay.pre_committed);
    assert!(replay.unfinished.is_empty(), "the end record was written");
}

#[tokio::test]
async fn the_configured_default_protocol_applies_when_the_client_leaves_it_unspecified() {
    let shards = Shards::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = DecisionLog::open(dir.path(), LogOptions::default()).unwrap();
    let engine = engine(log, &shards, Protocol::ThreePhase);
    let txid = engine.begin(TxnOptions::default()).await.unwrap();
    assert_eq!(
        engine.handle(txid).unwrap().machine().protocol(),
        Protocol::ThreePhase
    );
    let two_phase = TxnOptions {
        protocol: Some(Protocol::TwoPhase),
        ..TxnOptions::default()
    };
    let txid = engine.begin(two_phase).await.unwrap();
    assert_eq!(
        engine.handle(txid).unwrap().machine().protocol(),
        Protocol::TwoPhase
    );
}

#[tokio::test]
async fn a_three_phase_submit_over_several_shards_votes_with_its_last_statement_naming_every_peer() {
    let shards = Shards::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = DecisionLog::open(dir.path(), LogOptions::default()).unwrap();
    let engine = engine(log, &shards, Protocol::ThreePhase);
    let ops = ["s0", "s1"]
        .into_iter()
        .map(|shard| crate::submit::Op {
            shard: shard.into(),
            sql: "INSERT INTO t VALUES (1)".into(),
            params: Vec::new(),
            expect_rows: None,
        })
        .collect();
    let (_, outcome, _) = crate::submit::submit(&engine, ops, TxnOptions::default(), true)
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Committed);
    for shard in ["s0", "s1"] {
        let seen = shards.seen(shard);
        assert_eq!(
            (seen.execute_and_prepares, seen.executes, seen.prepares.len()),
            (1, 0, 0),
            "{shard}"
        );
        assert_eq!(
            seen.fused_votes,
            vec![(
                pb::Protocol::ThreePhase as i32,
                vec!["s0".to_owned(), "s1".to_owned()]
            )],
            "{shard}: the vote is a three-phase one and names both peers"
        );
        assert_eq!(seen.pre_commits.len(), 1, "{shard}");
    }
}

fn pre_commit_record(txid: u64) -> PreCommitRecord {
    PreCommitRecord {
        txid,
        gid: Gid::new(&CoordinatorId::new("c1").unwrap(), txid).to_string(),
        participants: vec!["s0".into(), "s1".into()],
        at_ms: 1,
    }
}

/// A log holding a pre-commit record for txid 7 (and one earlier start), reopened as at a
/// restart: the engine, its incarnation, and the recovery started.
async fn restart_with_a_logged_pre_commit(dir: &Path, shards: &Shards) -> (Arc<Engine>, u64) {
    let (log, _) = DecisionLog::open(dir, LogOptions::default()).unwrap();
    log.new_incarnation().await.unwrap();
    log.pre_commit(pre_commit_record(7)).await.unwrap();
    drop(log);
    let (log, replay) = DecisionLog::open(dir, LogOptions::default()).unwrap();
    assert_eq!(replay.pre_committed, vec![pre_commit_record(7)]);
    let incarnation = log.new_incarnation().await.unwrap();
    assert_eq!(incarnation, 2);
    let engine = engine(log, shards, Protocol::TwoPhase);
    engine.spawn_ticker();
    engine.recover_pre_committed(replay.pre_committed, incarnation);
    (engine, incarnation)
}

#[tokio::test]
async fn a_restart_learns_a_logged_pre_commit_answering_pending_meanwhile_then_commits_it() {
    let shards = Shards::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (engine, incarnation) = restart_with_a_logged_pre_commit(dir.path(), &shards).await;
    let gid = pre_commit_record(7).gid;

    // Nobody answers yet: asked again on every deadline, never presumed aborted.
    wait_for("a second learning round", || shards.seen("s1").queries.len() >= 2).await;
    assert_eq!(engine.decision(&gid).await, (Decision::Pending, true));
    assert_eq!(engine.handle(7).unwrap().machine().phase(), Phase::PreCommitting);
    {
        let seen = shards.seen("s0");
        let rounds: Vec<Ballot> = seen.queries.iter().map(|q| ballot(q.ballot.as_ref())).collect();
        for (round, asked) in rounds.iter().enumerate() {
            assert_eq!(asked.proposer, Proposer::Coordinator { incarnation });
            assert_eq!(asked.round, round as u64 + 1, "a new ballot per round");
        }
        let peers: Vec<&str> = seen.queries[0]
            .participants
            .iter()
            .map(|p| p.shard.as_str())
            .collect();
        assert_eq!(peers, vec!["s0", "s1"]);
        assert_eq!(
            seen.queries[0].participants[1].url,
            shards.urls[&ShardName::new("s1").unwrap()]
        );
        assert!(seen.pre_commits.is_empty() && seen.commits.is_empty() && seen.aborts.is_empty());
    }

    // s0 had pre-committed, s1 only prepared: pre-commit s1 under the learned ballot, then commit.
    shards.seen("s1").reports = Some(pb::ReportedState::Prepared);
    shards.seen("s0").reports = Some(pb::ReportedState::PreCommitted);
    wait_for("the commit to reach both", || {
        shards.seen("s0").commits.len() == 1 && shards.seen("s1").commits.len() == 1
    })
    .await;
    {
        let seen = shards.seen("s1");
        assert_eq!(seen.pre_commits.len(), 1);
        let pre_commit_ballot = ballot(seen.pre_commits[0].ballot.as_ref());
        assert_eq!(pre_commit_ballot.proposer, Proposer::Coordinator { incarnation });
        assert!(pre_commit_ballot > Ballot::COORDINATOR);
    }
    assert!(shards.seen("s0").pre_commits.is_empty(), "already pre-committed");
    wait_for("the transaction to finish", || {
        engine.handle(7).unwrap().machine().phase() == Phase::Committed
    })
    .await;
    assert_eq!(engine.decision(&gid).await, (Decision::Commit, false));

    engine.flush().await;
    drop(engine);
    let (_log, replay) = reopen(dir.path()).await;
    assert!(replay.pre_committed.is_empty(), "superseded by the commit record");
    assert!(replay.unfinished.is_empty(), "and the end record");
    assert_eq!(replay.incarnation, incarnation);
}

#[tokio::test]
async fn a_restart_aborts_a_logged_pre_commit_when_every_participant_is_merely_prepared() {
    let shards = Shards::start().await;
    let dir = tempfile::tempdir().unwrap();
    shards.answer_queries_with(pb::ReportedState::Prepared);
    let (engine, _) = restart_with_a_logged_pre_commit(dir.path(), &shards).await;
    let gid = pre_commit_record(7).gid;
    wait_for("the abort to reach both", || {
        shards.seen("s0").aborts.len() == 1 && shards.seen("s1").aborts.len() == 1
    })
    .await;
    wait_for("the transaction to finish", || {
        engine.handle(7).unwrap().machine().phase() == Phase::Aborted
    })
    .await;
    for shard in ["s0", "s1"] {
        let seen = shards.seen(shard);
        assert!(seen.pre_commits.is_empty() && seen.commits.is_empty(), "{shard}");
    }
    assert_eq!(engine.decision(&gid).await.0, Decision::Abort);

    engine.flush().await;
    drop(engine);
    let (_log, replay) = reopen(dir.path()).await;
    assert!(
        replay.pre_committed.is_empty(),
        "the end record supersedes the pre-commit record: {:?}",
        replay.pre_committed
    );
}

#[tokio::test]
async fn open_from_is_the_oldest_transaction_still_in_the_table_or_the_next_txid() {
    let shards = Shards::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = DecisionLog::open(dir.path(), LogOptions::default()).unwrap();
    let engine = engine(log, &shards, Protocol::TwoPhase);
    let first = engine.next_txid();
    assert_eq!(engine.open_from(), Some(first), "nothing begun: the next txid");
    let old = engine.begin(TxnOptions::default()).await.unwrap();
    let young = engine.begin(TxnOptions::default()).await.unwrap();
    assert_eq!(engine.open_from(), Some(old));
    engine
        .rollback(
            young,
            crate::protocol::AbortReason::new(crate::protocol::AbortCause::ClientRollback, "test"),
        )
        .await
        .unwrap();
    assert_eq!(engine.open_from(), Some(old), "the older one is still open");
    engine
        .rollback(
            old,
            crate::protocol::AbortReason::new(crate::protocol::AbortCause::ClientRollback, "test"),
        )
        .await
        .unwrap();
    assert_eq!(engine.open_from(), Some(engine.next_txid()));
    assert!(engine.next_txid() > young);
}

/// With `--decision-store shard`, a restarted coordinator re-drives every commit row it left on a
/// shard, more than one listing returns (`LIST_BATCH`, 10 in unit tests): a full page is listed
/// again once the rows above it are forgotten, rather than at once (which returned the same rows,
/// now tracked, and stopped there, leaving the rest to the participants' in-doubt asking).
#[tokio::test]
async fn a_restart_re_drives_more_commit_rows_than_one_listing_returns() {
    let shards = Shards::start().await;
    let id = CoordinatorId::new("c1").unwrap();
    let s0 = ShardName::new("s0").unwrap();
    let left: Vec<String> = (1..=25)
        .map(|txid| Gid::with_decision_shard(&id, txid, &s0).unwrap().to_string())
        .collect();
    shards.seen("s0").decision_rows = left.clone();
    let dir = tempfile::tempdir().unwrap();
    let (log, replay) = DecisionLog::open(dir.path(), LogOptions::default()).unwrap();
    let settings = EngineSettings {
        timeouts: timeouts(),
        lock_timeout_ms: 1_000,
        protocol: Protocol::TwoPhase,
        decide_in_branch: true,
        takeover_after_ms: 0,
    };
    let links = ParticipantLinks::new(&shards.urls).unwrap();
    let store = FileStore::new(log, &replay, 0);
    let engine = crate::driver::start(id, store, links, Arc::new(treaty_types::SystemClock), settings)
        .await
        .unwrap();
    engine.spawn_ticker();
    wait_for(
        "every commit row re-driven, committed on s1 and forgotten",
        || {
            let committed: std::collections::BTreeSet<String> =
                shards.seen("s1").commits.iter().cloned().collect();
            committed.len() == left.len() && shards.seen("s0").decision_rows.is_empty()
        },
    )
    .await;
    let committed: std::collections::BTreeSet<String> = shards.seen("s1").commits.iter().cloned().collect();
    assert_eq!(committed, left.into_iter().collect());
}
