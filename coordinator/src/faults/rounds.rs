//! The decorators. A *round* is the first send of one step of one transaction to each of its
//! participants (the prepares, the first commits after the decision, the coordinator's own
//! pre-commits); a later call for the same participant is a retry and passes through. With the
//! step's "between" failpoint armed, the first call of a round goes alone, the failpoint is
//! evaluated once it succeeded, and the others then go out failed, lost or normally as it says.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use treaty_commit_protocol::participant::Report;
use treaty_commit_protocol::store::{
    CommitRecord, DecisionStore, HeuristicRecord, PreCommitRecord, StoreError, Unfinished,
};
use treaty_commit_protocol::termination::Ballot;
use treaty_commit_protocol::transport::{
    DecisionWrite, ExecutedAndCommitted, ExecutedAndVoted, LinkError, ParticipantTransport, PreCommitAnswer,
    PreparedBranch, Statement, StatementResult, StoredDecision, VoteAnswer, VoteRequest,
};
use treaty_proto::{CoordinatorId, Gid, ShardName, TxId};

use crate::failpoints::{self, Delivery, Fired, Name};

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Transactions this process forced a commit or pre-commit record for, with their participant
/// counts: the ones whose rounds the failpoints apply to.
#[derive(Default)]
struct Live {
    txids: Mutex<HashMap<TxId, usize>>,
}

impl Live {
    fn insert(&self, txid: TxId, participants: usize) {
        lock(&self.txids).insert(txid, participants);
    }
    fn participants(&self, txid: TxId) -> Option<usize> {
        lock(&self.txids).get(&txid).copied()
    }
    fn remove(&self, txid: TxId) -> bool {
        lock(&self.txids).remove(&txid).is_some()
    }
}

pub fn install<S, T>(store: S, transport: T) -> (FaultyStore<S>, FaultyTransport<T>) {
    let live = Arc::new(Live::default());
    (
        FaultyStore {
            inner: store,
            live: Arc::clone(&live),
        },
        FaultyTransport {
            inner: transport,
            live,
            rounds: Mutex::new(HashMap::new()),
        },
    )
}

pub struct FaultyStore<S> {
    inner: S,
    live: Arc<Live>,
}

fn fired(name: Name, what: &str, gid: &str) -> StoreError {
    StoreError(format!("failpoint {name}: {what} of {gid}"))
}

impl<S: DecisionStore> DecisionStore for FaultyStore<S> {
    async fn force_commit(&self, record: CommitRecord) -> Result<(), StoreError> {
        if failpoints::hit(failpoints::BEFORE_COMMIT_DECISION).is_some() {
            return Err(fired(
                failpoints::BEFORE_COMMIT_DECISION,
                "writing the commit record",
                &record.gid,
            ));
        }
        let (txid, participants, gid) = (record.txid, record.participants.len(), record.gid.clone());
        self.inner.force_commit(record).await?;
        if failpoints::hit(failpoints::AFTER_COMMIT_DECISION).is_some() {
            return Err(fired(
                failpoints::AFTER_COMMIT_DECISION,
                "the commit record was written but its fsync failed",
                &gid,
            ));
        }
        self.live.insert(txid, participants);
        Ok(())
    }

    async fn force_pre_commit(&self, record: PreCommitRecord) -> Result<(), StoreError> {
        if failpoints::hit(failpoints::BEFORE_PRE_COMMIT_RECORD).is_some() {
            return Err(fired(
                failpoints::BEFORE_PRE_COMMIT_RECORD,
                "writing the pre-commit record",
                &record.gid,
            ));
        }
        let (txid, participants) = (record.txid, record.participants.len());
        self.inner.force_pre_commit(record).await?;
        self.live.insert(txid, participants);
        Ok(())
    }

    async fn force_heuristic(&self, record: HeuristicRecord) -> Result<(), StoreError> {
        self.inner.force_heuristic(record).await
    }

    async fn reserve_txids(&self, up_to: u64) -> Result<(), StoreError> {
        self.inner.reserve_txids(up_to).await
    }

    async fn new_incarnation(&self) -> Result<u64, StoreError> {
        self.inner.new_incarnation().await
    }

    /// Between `before-end-record` and `after-end-record`, for a transaction this process decided.
    fn end(&self, txid: TxId) {
        let live = self.live.remove(txid);
        match live
            .then(|| failpoints::hit(failpoints::BEFORE_END_RECORD))
            .flatten()
        {
            None | Some(Fired::On) => {}
            Some(Fired::Drop) => return,
            Some(Fired::Error) => {
                // As a failed fsync: stop, and let a restart recover from what is durable.
                tracing::error!(
                    "failpoint {}: writing the end record of {txid} failed; stopping",
                    failpoints::BEFORE_END_RECORD
                );
                std::process::exit(70);
            }
        }
        self.inner.end(txid);
        if live {
            failpoints::hit(failpoints::AFTER_END_RECORD);
        }
    }

    async fn replay(&self) -> Result<Unfinished, StoreError> {
        self.inner.replay().await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush().await
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Step {
    Prepare,
    Commit,
    PreCommit,
}

impl Step {
    /// The failpoint evaluated before any send of the round, and the one evaluated after the
    /// first send succeeded.
    fn failpoints(self) -> (Option<Name>, Name) {
        match self {
            Step::Prepare => (None, failpoints::AFTER_SOME_PREPARES),
            Step::Commit => (
                Some(failpoints::BEFORE_COMMIT_SENDS),
                failpoints::BETWEEN_COMMIT_SENDS,
            ),
            Step::PreCommit => (
                Some(failpoints::BEFORE_PRE_COMMIT_SENDS),
                failpoints::AFTER_SOME_PRE_COMMITS,
            ),
        }
    }
}

/// One round: who was sent to, and the delivery the rest of the round gets (set by the round's
/// first send, which holds the lock until it is known).
struct Round {
    sent: HashSet<ShardName>,
    size: usize,
    delivery: Arc<tokio::sync::Mutex<Option<Delivery>>>,
}

pub struct FaultyTransport<T> {
    inner: T,
    live: Arc<Live>,
    rounds: Mutex<HashMap<(TxId, Step), Round>>,
}

/// What a failpoint did to a message about to be sent: `Ok` to send it, or the failure the caller
/// sees (after waiting out the call's time, for a lost message).
async fn delivered(delivery: Delivery, timeout_ms: u64) -> Result<(), LinkError> {
    match delivery {
        Delivery::Send => Ok(()),
        Delivery::Fail(failpoint) => Err(LinkError::Unavailable(format!("failpoint {failpoint}"))),
        Delivery::Lose => {
            tokio::time::sleep(Duration::from_millis(timeout_ms)).await;
            Err(LinkError::TimedOut { after_ms: timeout_ms })
        }
    }
}

/// A send's place in its round.
enum Turn {
    /// Not a round's first send to this participant (a retry), or nothing armed: send as is.
    Pass,
    /// The round's first send: it decides the delivery of the others (`guard`).
    First(tokio::sync::OwnedMutexGuard<Option<Delivery>>),
    /// Another send of the round: it waits for the first.
    Later(Arc<tokio::sync::Mutex<Option<Delivery>>>),
}

impl<T: ParticipantTransport> FaultyTransport<T> {
    fn turn(&self, txid: TxId, step: Step, shard: &ShardName, size: usize) -> Turn {
        let (before, between) = step.failpoints();
        let armed = before.is_some_and(failpoints::armed) || failpoints::armed(between);
        if !armed || size == 0 {
            return Turn::Pass;
        }
        let mut rounds = lock(&self.rounds);
        let round = rounds.entry((txid, step)).or_insert_with(|| Round {
            sent: HashSet::new(),
            size,
            delivery: Arc::new(tokio::sync::Mutex::new(None)),
        });
        if !round.sent.insert(shard.clone()) {
            return Turn::Pass;
        }
        let first = round.sent.len() == 1;
        let delivery = Arc::clone(&round.delivery);
        if round.sent.len() >= round.size {
            rounds.remove(&(txid, step));
        }
        if first {
            match delivery.try_lock_owned() {
                Ok(guard) => Turn::First(guard),
                Err(_) => Turn::Pass,
            }
        } else {
            Turn::Later(delivery)
        }
    }

    /// Sends `call` at its place in the round.
    async fn in_round<R>(
        &self,
        turn: Turn,
        step: Step,
        size: usize,
        timeout_ms: u64,
        call: impl Future<Output = Result<R, LinkError>>,
        succeeded: impl Fn(&Result<R, LinkError>) -> bool,
    ) -> Result<R, LinkError> {
        let (before, between) = step.failpoints();
        match turn {
            Turn::Pass => call.await,
            Turn::Later(delivery) => {
                let delivery = delivery.lock().await.unwrap_or(Delivery::Send);
                delivered(delivery, timeout_ms).await?;
                call.await
            }
            Turn::First(mut guard) => {
                let first = before.map_or(Delivery::Send, failpoints::delivery);
                if first != Delivery::Send {
                    *guard = Some(first);
                    drop(guard);
                    delivered(first, timeout_ms).await?;
                    return call.await;
                }
                if size < 2 || !failpoints::armed(between) {
                    *guard = Some(Delivery::Send);
                    drop(guard);
                    return call.await;
                }
                let result = call.await;
                let rest = if succeeded(&result) {
                    failpoints::delivery(between)
                } else {
                    Delivery::Send
                };
                *guard = Some(rest);
                result
            }
        }
    }
}

impl<T: ParticipantTransport> ParticipantTransport for FaultyTransport<T> {
    fn shard(&self, name: &str) -> Option<ShardName> {
        self.inner.shard(name)
    }

    fn shards(&self) -> Vec<ShardName> {
        self.inner.shards()
    }

    /// With `after-some-prepares` armed, every vote goes through a Prepare message, so that the
    /// failpoint sees the whole round.
    fn votes_with_last_statement(&self) -> bool {
        !failpoints::armed(failpoints::AFTER_SOME_PREPARES) && self.inner.votes_with_last_statement()
    }

    async fn execute(
        &self,
        shard: &ShardName,
        statement: Statement,
        timeout_ms: u64,
    ) -> Result<StatementResult, LinkError> {
        self.inner.execute(shard, statement, timeout_ms).await
    }

    async fn execute_and_prepare(
        &self,
        shard: &ShardName,
        statement: Statement,
        vote: VoteRequest,
        timeout_ms: u64,
    ) -> Result<ExecutedAndVoted, LinkError> {
        self.inner
            .execute_and_prepare(shard, statement, vote, timeout_ms)
            .await
    }

    async fn execute_and_commit(
        &self,
        shard: &ShardName,
        statement: Statement,
        expect_rows: Option<u64>,
        timeout_ms: u64,
    ) -> Result<ExecutedAndCommitted, LinkError> {
        self.inner
            .execute_and_commit(shard, statement, expect_rows, timeout_ms)
            .await
    }

    async fn prepare(
        &self,
        shard: &ShardName,
        gid: &Gid,
        vote: VoteRequest,
        timeout_ms: u64,
    ) -> Result<VoteAnswer, LinkError> {
        let size = vote.participants.len();
        let turn = self.turn(gid.txid(), Step::Prepare, shard, size);
        let call = self.inner.prepare(shard, gid, vote, timeout_ms);
        // The vote, whatever it was, is in before the failpoint is evaluated.
        self.in_round(turn, Step::Prepare, size, timeout_ms, call, |_| true)
            .await
    }

    async fn commit(&self, shard: &ShardName, gid: &Gid, timeout_ms: u64) -> Result<(), LinkError> {
        let size = self.live.participants(gid.txid()).unwrap_or(0);
        let turn = self.turn(gid.txid(), Step::Commit, shard, size);
        let call = self.inner.commit(shard, gid, timeout_ms);
        self.in_round(turn, Step::Commit, size, timeout_ms, call, Result::is_ok)
            .await
    }

    async fn abort(&self, shard: &ShardName, gid: &Gid, timeout_ms: u64) -> Result<(), LinkError> {
        self.inner.abort(shard, gid, timeout_ms).await
    }

    async fn commit_one_phase(&self, shard: &ShardName, gid: &Gid, timeout_ms: u64) -> Result<(), LinkError> {
        self.inner.commit_one_phase(shard, gid, timeout_ms).await
    }

    /// The decision branch's commit passes the same failpoints as the file log's commit record:
    /// before it, nothing is sent; after it, the row committed but its answer is lost. Either way
    /// the driver reads the decision back.
    async fn commit_decision(
        &self,
        shard: &ShardName,
        gid: &Gid,
        participants: &[ShardName],
        standalone: bool,
        timeout_ms: u64,
    ) -> Result<DecisionWrite, LinkError> {
        if failpoints::hit(failpoints::BEFORE_COMMIT_DECISION).is_some() {
            return Err(LinkError::Other(format!(
                "failpoint {} fired before the decision branch of {gid} committed",
                failpoints::BEFORE_COMMIT_DECISION.as_str()
            )));
        }
        let written = self
            .inner
            .commit_decision(shard, gid, participants, standalone, timeout_ms)
            .await?;
        if written == DecisionWrite::Committed {
            self.live.insert(gid.txid(), participants.len());
        }
        if failpoints::hit(failpoints::AFTER_COMMIT_DECISION).is_some() {
            return Err(LinkError::Other(format!(
                "failpoint {} fired: the decision branch of {gid} answered, the answer is lost",
                failpoints::AFTER_COMMIT_DECISION.as_str()
            )));
        }
        Ok(written)
    }

    async fn read_decisions(
        &self,
        shard: &ShardName,
        gids: &[Gid],
        conclude_abort: bool,
        timeout_ms: u64,
    ) -> Result<Vec<StoredDecision>, LinkError> {
        self.inner
            .read_decisions(shard, gids, conclude_abort, timeout_ms)
            .await
    }

    async fn list_decisions(
        &self,
        shard: &ShardName,
        coordinator: Option<&CoordinatorId>,
        limit: u32,
        timeout_ms: u64,
    ) -> Result<Vec<StoredDecision>, LinkError> {
        self.inner
            .list_decisions(shard, coordinator, limit, timeout_ms)
            .await
    }

    async fn forget_decisions(
        &self,
        shard: &ShardName,
        gids: &[Gid],
        timeout_ms: u64,
    ) -> Result<u64, LinkError> {
        self.inner.forget_decisions(shard, gids, timeout_ms).await
    }

    /// Only the coordinator's own first round (`Ballot::COORDINATOR`) of a transaction this
    /// process pre-committed passes the failpoints; a round the termination rules decided skips
    /// them.
    async fn pre_commit(
        &self,
        shard: &ShardName,
        gid: &Gid,
        ballot: &Ballot,
        timeout_ms: u64,
    ) -> Result<PreCommitAnswer, LinkError> {
        let size = match ballot == &Ballot::COORDINATOR {
            true => self.live.participants(gid.txid()).unwrap_or(0),
            false => 0,
        };
        let turn = self.turn(gid.txid(), Step::PreCommit, shard, size);
        let call = self.inner.pre_commit(shard, gid, ballot, timeout_ms);
        let acknowledged =
            |result: &Result<PreCommitAnswer, LinkError>| result.as_ref().is_ok_and(|a| a.acknowledged);
        self.in_round(turn, Step::PreCommit, size, timeout_ms, call, acknowledged)
            .await
    }

    async fn list_prepared(
        &self,
        shard: &ShardName,
        timeout_ms: u64,
    ) -> Result<Vec<PreparedBranch>, LinkError> {
        self.inner.list_prepared(shard, timeout_ms).await
    }

    async fn query_state(
        &self,
        shard: &ShardName,
        gid: &Gid,
        ballot: &Ballot,
        participants: &[ShardName],
        timeout_ms: u64,
    ) -> Result<Report, LinkError> {
        self.inner
            .query_state(shard, gid, ballot, participants, timeout_ms)
            .await
    }
}
