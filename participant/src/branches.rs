//! The in-memory branch table: which GIDs have an open transaction here (with its pooled
//! connection), each two-phase branch's protocol machine from its first statement until it is
//! finished, a per-GID lock that serializes every call touching a GID (RPCs, the idle sweep,
//! reconciliation), and the recent history of finished GIDs (tombstones), from which a finished
//! branch's machine is rebuilt when a late call needs one.
//!
//! The table holds no truth that PostgreSQL also holds: whether a GID is prepared or committed is
//! asked of `pg_prepared_xacts` and the marker table. What only this process knows lives here: the
//! open transactions (lost with the process, by design: PostgreSQL rolls them back when their
//! connections close) and how recently finished GIDs ended, so that a late `Execute` or `Prepare`
//! for a GID that was rolled back is refused instead of starting a fresh transaction.

use std::collections::{HashMap, VecDeque};
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::OwnedMutexGuard;
use treaty_commit_protocol::participant::Participant;
use treaty_proto::{DatabaseRole, Gid};

use crate::pool::PooledConnection;
use crate::pool::session::{Session, StatementFailed};

/// Most finished GIDs remembered at once; the oldest are forgotten first.
const MAX_HISTORY: usize = 200_000;

/// An open transaction: `BEGIN` has run on `connection` and nothing has ended it yet.
///
/// Dropped without `transaction_ended`, the connection is closed rather than pooled, so an open
/// transaction can never be handed to another branch (PostgreSQL rolls it back on disconnect).
/// Nor is a session the branch changed: the SQL guard's word or the check after the branch's last
/// statement (`session_changed`) closes it too.
pub struct ActiveBranch {
    pub connection: PooledConnection,
    pub last_used: Instant,
    pub statements: u64,
    /// A statement may have changed session state (`SET`, `RESET`, a session-level advisory
    /// lock: `sql_guard`), whether it succeeded or not, or the check after the branch's last
    /// statement found it changed (`transaction_ended`): the connection is closed when the branch
    /// ends instead of going back to the pool.
    pub session_changed: bool,
    /// The role the client's statements run under (`SET LOCAL ROLE` at BEGIN); `None`: the
    /// participant's own.
    pub database_role: Option<DatabaseRole>,
    /// A statement certainly wrote (a single INSERT/UPDATE/DELETE/MERGE that affected rows), so the
    /// vote need not ask PostgreSQL whether the transaction has an id.
    pub wrote: bool,
    /// The BEGIN (with its `SET LOCAL`s) not sent yet: it goes with the first statement.
    pub pending_begin: Option<String>,
    /// The vote's marker row and `PREPARE TRANSACTION` went with the last statement
    /// (`Agent::execute_and_prepare`), and this is what PostgreSQL answered: the vote takes it
    /// instead of sending them again.
    pub vote_sent: Option<Result<Session, StatementFailed>>,
    /// The one-phase `COMMIT` went with the last statement (`Agent::execute_and_commit`), and this
    /// is what PostgreSQL answered: the commit takes it instead of sending one.
    pub commit_sent: Option<Result<Session, StatementFailed>>,
    ended: bool,
}

impl ActiveBranch {
    pub fn new(connection: PooledConnection) -> Self {
        Self {
            connection,
            last_used: Instant::now(),
            statements: 0,
            session_changed: false,
            database_role: None,
            wrote: false,
            pending_begin: None,
            vote_sent: None,
            commit_sent: None,
            ended: false,
        }
    }

    /// The transaction is over (COMMIT, ROLLBACK or PREPARE succeeded): the connection may go back
    /// to the pool, unless `session` (the check that ran in the same round trip, when one was due)
    /// or the SQL guard says its session changed. Unchecked, it goes back marked with the
    /// branch's role (`pool`).
    pub fn transaction_ended(mut self, gid: &Gid, session: Session) {
        self.ended = true;
        // A changed session is logged and counted by `checked`; one only the guard suspects here.
        if !self.connection.checked(session) {
            tracing::debug!(%gid, "the session check after the branch found its session changed");
            self.session_changed = true;
        } else if self.session_changed {
            tracing::debug!(%gid, "closing the branch's connection: a statement may have changed its session");
            crate::metrics::global().dirty_connection_closed("sql_guard");
        }
    }

    /// Closes the connection: its transaction or protocol state is unknown.
    pub fn discard(self) {}
}

impl Drop for ActiveBranch {
    fn drop(&mut self) {
        if !self.ended || self.session_changed {
            self.connection.close_on_drop();
        }
    }
}

/// How a GID ended here, remembered for a while.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finished {
    /// `PREPARE TRANSACTION` succeeded; phase two is pending or done (PostgreSQL knows which).
    Prepared,
    /// Wrote nothing and was committed locally at prepare.
    ReadOnly,
    /// Committed with a plain `COMMIT` (the transaction's only participant).
    CommittedOnePhase,
    /// `COMMIT PREPARED` succeeded (or the marker row proved it had).
    Committed,
    /// Rolled back, never prepared, or refused; the reason is for messages.
    Aborted(String),
    /// A `COMMIT` was sent and the connection broke before the answer.
    OutcomeUnknown(String),
}

impl Finished {
    /// A short name for messages, e.g. "was rolled back (idle for 30000 ms)".
    pub fn describe(&self) -> String {
        match self {
            Finished::Prepared => "is already prepared".into(),
            Finished::ReadOnly => "already finished as read-only".into(),
            Finished::CommittedOnePhase | Finished::Committed => "is already committed".into(),
            Finished::Aborted(reason) => format!("was rolled back ({reason})"),
            Finished::OutcomeUnknown(reason) => format!("has an unknown outcome ({reason})"),
        }
    }
}

/// What one GID's lock protects.
#[derive(Default)]
pub struct Slot {
    pub active: Option<ActiveBranch>,
    /// The branch's machine (two-phase branches; a three-phase one's lives in `three_phase`):
    /// created when the branch opens, kept while it is open or prepared, dropped once it is
    /// finished (the history remembers how).
    pub machine: Option<Participant>,
}

impl Slot {
    /// Whether the slot must stay in the table when nobody holds its lock.
    fn is_live(&self) -> bool {
        self.active.is_some()
            || self
                .machine
                .as_ref()
                .is_some_and(|machine| !machine.phase().is_decided())
    }
}

#[derive(Default)]
struct History {
    entries: HashMap<Arc<str>, (Instant, Finished)>,
    order: VecDeque<(Instant, Arc<str>)>,
}

pub struct Branches {
    slots: Mutex<HashMap<Arc<str>, Arc<tokio::sync::Mutex<Slot>>>>,
    history: Mutex<History>,
    history_retention: Duration,
}

/// Holds one GID's lock. Dropping it releases the lock and forgets the slot if it is empty and
/// nobody else is waiting for it.
pub struct SlotGuard {
    branches: Arc<Branches>,
    gid: Arc<str>,
    guard: OwnedMutexGuard<Slot>,
}

impl Deref for SlotGuard {
    type Target = Slot;
    fn deref(&self) -> &Slot {
        &self.guard
    }
}

impl DerefMut for SlotGuard {
    fn deref_mut(&mut self) -> &mut Slot {
        &mut self.guard
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if self.guard.is_live() {
            return;
        }
        let mut slots = self.branches.slots();
        // Arcs of a slot are only cloned under the table lock: two of them (the table's and the one
        // inside this guard) mean nobody is waiting, so the next caller may start a fresh slot.
        if let Some(slot) = slots.get(&self.gid)
            && Arc::strong_count(slot) == 2
        {
            slots.remove(&self.gid);
        }
    }
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data stays consistent at every await-free step, so a panic elsewhere does not taint it.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Branches {
    pub fn new(history_retention: Duration) -> Arc<Self> {
        Arc::new(Self {
            slots: Mutex::default(),
            history: Mutex::default(),
            history_retention,
        })
    }

    fn slots(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<tokio::sync::Mutex<Slot>>>> {
        locked(&self.slots)
    }

    fn slot(&self, gid: &str) -> (Arc<str>, Arc<tokio::sync::Mutex<Slot>>) {
        let mut slots = self.slots();
        if let Some((key, slot)) = slots.get_key_value(gid) {
            return (key.clone(), slot.clone());
        }
        let key: Arc<str> = gid.into();
        let slot = Arc::new(tokio::sync::Mutex::new(Slot::default()));
        slots.insert(key.clone(), slot.clone());
        (key, slot)
    }

    /// Waits for the GID's lock.
    pub async fn lock(self: &Arc<Self>, gid: &str) -> SlotGuard {
        let (gid, slot) = self.slot(gid);
        SlotGuard {
            branches: self.clone(),
            gid,
            guard: slot.lock_owned().await,
        }
    }

    /// The GID's lock if nobody holds it now.
    pub fn try_lock(self: &Arc<Self>, gid: &str) -> Option<SlotGuard> {
        let (gid, slot) = self.slot(gid);
        let guard = slot.try_lock_owned().ok()?;
        Some(SlotGuard {
            branches: self.clone(),
            gid,
            guard,
        })
    }

    /// Whether a call is working on the GID or it has an open transaction here. A prepared branch
    /// whose machine merely waits in the table is not busy: recovery may ask about it.
    pub fn is_busy(&self, gid: &str) -> bool {
        let slots = self.slots();
        let Some(slot) = slots.get(gid) else {
            return false;
        };
        // Arcs of a slot are only cloned under the table lock: another one is a call holding or
        // waiting for the lock.
        Arc::strong_count(slot) > 1 || slot.try_lock().map_or(true, |slot| slot.active.is_some())
    }

    /// Branches with an open transaction here, or a call working on one (the metrics; read at
    /// scrape time, so the walk under the table lock stays off the commit path).
    pub fn open_count(&self) -> usize {
        self.slots()
            .values()
            .filter(|slot| slot.try_lock().map_or(true, |slot| slot.active.is_some()))
            .count()
    }

    /// Every GID with a slot (open, prepared or in use), for sweeps.
    pub fn gids(&self) -> Vec<Arc<str>> {
        self.slots().keys().cloned().collect()
    }

    pub fn record(&self, gid: &str, finished: Finished) {
        let now = Instant::now();
        let key: Arc<str> = gid.into();
        let mut history = locked(&self.history);
        history.entries.insert(key.clone(), (now, finished));
        history.order.push_back((now, key));
        self.prune(&mut history, now);
    }

    pub fn finished(&self, gid: &str) -> Option<Finished> {
        locked(&self.history).entries.get(gid).map(|(_, f)| f.clone())
    }

    /// Forgets finished GIDs older than the retention.
    pub fn prune_history(&self) {
        let mut history = locked(&self.history);
        self.prune(&mut history, Instant::now());
    }

    fn prune(&self, history: &mut History, now: Instant) {
        while let Some((at, gid)) = history.order.front() {
            let expired = now.duration_since(*at) > self.history_retention;
            if !expired && history.order.len() <= MAX_HISTORY {
                break;
            }
            // A GID recorded twice has a newer entry; only its own entry is removed.
            if history
                .entries
                .get(gid)
                .is_some_and(|(recorded, _)| recorded == at)
            {
                history.entries.remove(gid);
            }
            history.order.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_for_one_gid_are_serialized_and_empty_slots_forgotten() {
        let branches = Branches::new(Duration::from_secs(60));
        let first = branches.lock("treaty:c:1").await;
        assert!(branches.is_busy("treaty:c:1"));
        assert!(
            branches.try_lock("treaty:c:1").is_none(),
            "second caller must wait"
        );
        assert!(
            branches.try_lock("treaty:c:2").is_some(),
            "other GIDs are independent"
        );
        drop(first);
        assert!(!branches.is_busy("treaty:c:1"));
        assert!(!branches.is_busy("treaty:c:2"));
    }

    #[tokio::test]
    async fn a_waiting_caller_keeps_the_slot() {
        let branches = Branches::new(Duration::from_secs(60));
        let first = branches.lock("g").await;
        let waiter = {
            let branches = branches.clone();
            tokio::spawn(async move {
                let _second = branches.lock("g").await;
            })
        };
        tokio::task::yield_now().await;
        while Arc::strong_count(&branches.slot("g").1) < 4 {
            tokio::task::yield_now().await;
        }
        drop(first);
        assert!(branches.is_busy("g"), "the waiter still needs the same slot");
        waiter.await.unwrap();
        assert!(!branches.is_busy("g"));
    }

    #[tokio::test]
    async fn a_prepared_branch_keeps_its_machine_in_the_table_without_being_busy() {
        use treaty_commit_protocol::participant::Remembered;
        let branches = Branches::new(Duration::from_secs(60));
        let shard = treaty_proto::ShardName::new("s0").unwrap();
        {
            let mut slot = branches.lock("g").await;
            slot.machine = Some(Participant::resume(shard.clone(), Remembered::Prepared, 100, 0));
        }
        assert!(
            branches.gids().iter().any(|gid| &**gid == "g"),
            "the machine of a prepared branch stays until it is finished"
        );
        assert!(!branches.is_busy("g"), "nobody works on it: recovery may");
        {
            let _held = branches.lock("g").await;
            assert!(branches.is_busy("g"));
        }
        {
            let mut slot = branches.lock("g").await;
            slot.machine = Some(Participant::resume(shard, Remembered::Committed, 100, 0));
        }
        assert!(
            branches.gids().is_empty(),
            "a finished machine leaves with its slot"
        );
    }

    #[test]
    fn history_remembers_the_latest_outcome_and_expires() {
        let branches = Branches::new(Duration::from_millis(0));
        branches.record("a", Finished::Prepared);
        branches.record("a", Finished::Committed);
        std::thread::sleep(Duration::from_millis(2));
        branches.prune_history();
        assert_eq!(branches.finished("a"), None);

        let branches = Branches::new(Duration::from_secs(60));
        branches.record("a", Finished::Prepared);
        branches.record("a", Finished::Aborted("x".into()));
        branches.prune_history();
        assert_eq!(branches.finished("a"), Some(Finished::Aborted("x".into())));
    }
}
