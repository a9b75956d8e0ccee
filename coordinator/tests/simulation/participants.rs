//! Simulated participants: one in-memory database per shard (`Cluster`); the coordinator reaches
//! them through `SimTransport` (`transport.rs`).
//!
//! Each shard is an in-memory "database" holding one branch per GID, with PostgreSQL's rules as
//! the real participant applies them: a branch opens on its first statement, a statement may fail
//! (the branch rolls back), `PREPARE TRANSACTION` makes it durable, a read-only branch commits at
//! once and votes READ-ONLY under two-phase commit (under three-phase it prepares anyway), a vote
//! may be NO. A prepared branch that committed keeps its marker row, so a repeated COMMIT PREPARED
//! succeeds and a ROLLBACK PREPARED is refused (the participant's records contradict the
//! decision); a branch without a marker (never prepared, or rolled back) answers a COMMIT PREPARED
//! with a refusal and a ROLLBACK with success, as "does not exist" without a marker does. A crash loses every branch that is not
//! prepared or finished; a restarted participant asks the coordinator about its prepared branches
//! (`run.rs`). Three-phase branches keep a durable promised ballot and pre-commit, and answer
//! `query_state` as the participant's machine does (a branch that has not voted aborts when asked).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use rand::Rng;
use treaty_commit_protocol::participant::Report;
use treaty_commit_protocol::termination::{Ballot, ReportedState};
use treaty_commit_protocol::transport::{
    LinkError, PreCommitAnswer, Statement, StatementResult, VoteAnswer, VoteRequest,
};
use treaty_types::{Gid, Protocol, ShardName};

use crate::faults::Chance;
use crate::store::SimStore;
use crate::trace::Trace;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BranchState {
    Active,
    Prepared,
    Committed,
    Aborted,
}

/// One transaction's branch on one shard.
#[derive(Debug, Clone)]
pub struct Branch {
    pub state: BranchState,
    /// A statement that writes succeeded in it.
    pub wrote: bool,
    /// It was ever prepared (voted YES).
    pub prepared: bool,
    /// Lost in a participant crash while active.
    pub lost: bool,
    /// Three-phase: the highest ballot answered, and whether it durably pre-committed.
    pub promised: Ballot,
    pub pre_committed: bool,
    /// Three-phase: every participant the vote named (termination asks them all).
    pub participants: Vec<ShardName>,
    pub touched_ms: u64,
}

impl Branch {
    fn new(now_ms: u64) -> Self {
        Self {
            state: BranchState::Active,
            wrote: false,
            prepared: false,
            lost: false,
            promised: Ballot::COORDINATOR,
            pre_committed: false,
            participants: Vec::new(),
            touched_ms: now_ms,
        }
    }
}

/// One shard's database and whether its participant is up.
#[derive(Debug, Default)]
pub struct Database {
    pub up: bool,
    pub branches: BTreeMap<String, Branch>,
}

fn refused(message: impl Into<String>) -> LinkError {
    LinkError::Refused(message.into())
}

fn serialization_failure() -> LinkError {
    LinkError::Sql {
        sqlstate: "40001".into(),
        message: "could not serialize access due to concurrent update".into(),
        retryable: true,
    }
}

/// Every shard's database, the seed's chances, and the checks made as branches finish.
pub struct Cluster {
    pub shards: Vec<ShardName>,
    databases: Mutex<BTreeMap<ShardName, Database>>,
    pub chance: Arc<Chance>,
    pub trace: Trace,
    store: SimStore,
    violations: Mutex<Vec<String>>,
    contradictions: Mutex<Vec<(String, String)>>,
    /// Three-phase termination: the highest ballot each leader saw per GID (in memory: a restart
    /// forgets it, and the durable promise keeps rounds above it).
    ballots_seen: Mutex<BTreeMap<(ShardName, String), Ballot>>,
    /// `treaty.decisions` of every decision shard (`decision_rows.rs`), durable.
    rows: Mutex<crate::decision_rows::Rows>,
}

impl Cluster {
    pub fn new(shards: Vec<ShardName>, chance: Arc<Chance>, trace: Trace, store: SimStore) -> Arc<Self> {
        let databases = shards
            .iter()
            .map(|shard| {
                (
                    shard.clone(),
                    Database {
                        up: true,
                        ..Database::default()
                    },
                )
            })
            .collect();
        Arc::new(Self {
            shards,
            databases: Mutex::new(databases),
            chance,
            trace,
            store,
            violations: Mutex::new(Vec::new()),
            contradictions: Mutex::new(Vec::new()),
            ballots_seen: Mutex::new(BTreeMap::new()),
            rows: Mutex::new(BTreeMap::new()),
        })
    }

    pub(crate) fn rows(&self) -> MutexGuard<'_, crate::decision_rows::Rows> {
        self.rows.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether a one-phase COMMIT (plain or with a decision row) fails, as the seed decides.
    pub(crate) fn commit_fails(&self, shard: &ShardName, gid: &str) -> bool {
        self.random(&format!("commit-fails/{shard}/{gid}"), |r| r.statement_fails)
    }

    fn databases(&self) -> MutexGuard<'_, BTreeMap<ShardName, Database>> {
        self.databases
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn violations(&self) -> Vec<String> {
        self.violations
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn ballots_seen(&self) -> MutexGuard<'_, BTreeMap<(ShardName, String), Ballot>> {
        self.ballots_seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A ballot for `leader`'s next termination round of `gid`, above every ballot it saw or
    /// promised, and remembered.
    pub fn next_termination_ballot(&self, leader: &ShardName, gid: &str, promised: Ballot) -> Ballot {
        let own = self.with_branch(leader, gid, |branch, _| branch.map(|b| b.promised.clone()));
        let mut seen = self.ballots_seen();
        let key = (leader.clone(), gid.to_owned());
        let highest = [seen.get(&key).cloned(), own, Some(promised)]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(Ballot::COORDINATOR);
        let ballot = highest.next_for(crate::three_phase::proposer(leader));
        seen.insert(key, ballot.clone());
        ballot
    }

    /// A participant refused `leader`'s round for a higher promise.
    pub fn saw_ballot(&self, leader: &ShardName, gid: &str, ballot: Ballot) {
        let mut seen = self.ballots_seen();
        let entry = seen
            .entry((leader.clone(), gid.to_owned()))
            .or_insert_with(|| ballot.clone());
        if ballot > *entry {
            *entry = ballot;
        }
    }

    /// A phase-two message the participant refused because its records say otherwise (it must
    /// never happen; `checker` fails the seed unless an operator's heuristic caused it).
    pub(crate) fn note_contradiction(&self, shard: &ShardName, gid: &str, result: &Result<(), LinkError>) {
        if let Err(LinkError::Refused(message)) = result {
            self.trace.record(format!("CONTRADICTION on {shard}: {message}"));
            self.contradictions
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push((
                    gid.to_owned(),
                    format!("{shard} refused the coordinator: {message}"),
                ));
        }
    }

    /// Every contradiction seen: (GID, what).
    pub fn contradictions(&self) -> Vec<(String, String)> {
        self.contradictions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn report_violation(&self, what: String) {
        self.violation(what);
    }

    fn violation(&self, what: String) {
        self.trace.record(format!("VIOLATION: {what}"));
        self.violations
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(what);
    }

    pub fn is_up(&self, shard: &ShardName) -> bool {
        self.databases().get(shard).is_some_and(|db| db.up)
    }

    /// Every shard's branches, for the checker.
    pub fn snapshot(&self) -> BTreeMap<ShardName, BTreeMap<String, Branch>> {
        self.databases()
            .iter()
            .map(|(shard, db)| (shard.clone(), db.branches.clone()))
            .collect()
    }

    /// The participant crashes: its active branches roll back, prepared and finished ones stay.
    pub fn crash(&self, shard: &ShardName) {
        let mut databases = self.databases();
        let Some(db) = databases.get_mut(shard) else {
            return;
        };
        db.up = false;
        self.ballots_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(leader, _), _| leader != shard);
        for (gid, branch) in &mut db.branches {
            if branch.state == BranchState::Active {
                branch.state = BranchState::Aborted;
                branch.lost = true;
                self.trace
                    .record(format!("{shard}: lost active branch {gid} in the crash"));
            }
        }
        self.trace.record(format!("crash participant {shard}"));
    }

    pub fn restart(&self, shard: &ShardName) {
        if let Some(db) = self.databases().get_mut(shard) {
            db.up = true;
        }
        self.trace.record(format!("restart participant {shard}"));
    }

    /// The GIDs `shard` holds prepared (its `pg_prepared_xacts`), while it is up.
    pub fn prepared(&self, shard: &ShardName) -> Vec<String> {
        let databases = self.databases();
        let Some(db) = databases.get(shard).filter(|db| db.up) else {
            return Vec::new();
        };
        db.branches
            .iter()
            .filter(|(_, branch)| branch.state == BranchState::Prepared)
            .map(|(gid, _)| gid.clone())
            .collect()
    }

    /// How long each branch `shard` holds prepared has been untouched, in ms.
    pub fn prepared_ages(&self, shard: &ShardName) -> BTreeMap<String, u64> {
        let now = self.trace.now_ms();
        let databases = self.databases();
        let Some(db) = databases.get(shard).filter(|db| db.up) else {
            return BTreeMap::new();
        };
        db.branches
            .iter()
            .filter(|(_, branch)| branch.state == BranchState::Prepared)
            .map(|(gid, branch)| (gid.clone(), now.saturating_sub(branch.touched_ms)))
            .collect()
    }

    /// The three-phase branches `shard` holds prepared, untouched for `timeout_ms`, with their
    /// participants and the highest ballot promised (the participant's timeout).
    pub fn timed_out_three_phase(
        &self,
        shard: &ShardName,
        timeout_ms: u64,
    ) -> Vec<(String, Vec<ShardName>, Ballot)> {
        let now = self.trace.now_ms();
        let mut databases = self.databases();
        let Some(db) = databases.get_mut(shard).filter(|db| db.up) else {
            return Vec::new();
        };
        db.branches
            .iter_mut()
            .filter(|(_, b)| {
                b.state == BranchState::Prepared
                    && !b.participants.is_empty()
                    && now.saturating_sub(b.touched_ms) >= timeout_ms
            })
            .map(|(gid, b)| {
                // The timer restarts: the next round only after another timeout.
                b.touched_ms = now;
                (gid.clone(), b.participants.clone(), b.promised.clone())
            })
            .collect()
    }

    /// The idle-branch cleanup: an active branch untouched for `idle_ms` rolls back (it has not
    /// voted, so that is allowed).
    pub fn roll_back_idle(&self, idle_ms: u64) {
        let now = self.trace.now_ms();
        let mut databases = self.databases();
        for (shard, db) in databases.iter_mut().filter(|(_, db)| db.up) {
            for (gid, branch) in &mut db.branches {
                if branch.state == BranchState::Active && now.saturating_sub(branch.touched_ms) >= idle_ms {
                    branch.state = BranchState::Aborted;
                    self.trace
                        .record(format!("{shard}: idle branch {gid} rolled back"));
                }
            }
        }
    }

    pub(crate) fn with_branch<R>(
        &self,
        shard: &ShardName,
        gid: &str,
        apply: impl FnOnce(Option<&mut Branch>, u64) -> R,
    ) -> R {
        let now = self.trace.now_ms();
        let mut databases = self.databases();
        let branch = databases.get_mut(shard).and_then(|db| db.branches.get_mut(gid));
        apply(branch, now)
    }

    fn random(&self, key: &str, rate: impl Fn(&crate::faults::FaultRates) -> f64) -> bool {
        let Some(rates) = self.chance.faults() else {
            return false;
        };
        self.chance.rng(key).random_bool(rate(&rates))
    }

    pub(crate) fn finish(
        &self,
        shard: &ShardName,
        gid: &str,
        branch: &mut Branch,
        state: BranchState,
        how: &str,
    ) {
        // A three-phase termination leader commits without the coordinator's record: only after
        // some participant pre-committed, which needed the coordinator's durable pre-commit record
        // (checked in `pre_commit`).
        if state == BranchState::Committed && branch.prepared && !how.contains("termination") {
            let parsed = Gid::parse(gid).ok();
            let txid = parsed.as_ref().map_or(0, Gid::txid);
            let in_row = parsed.as_ref().is_some_and(|g| g.decision_shard().is_some());
            if in_row && !self.committed_by_row(gid) {
                self.violation(format!(
                    "{shard} applied COMMIT PREPARED of {gid} while its decision row is not a committed commit row"
                ));
            } else if !in_row && !self.store.commit_is_durable(txid) {
                self.violation(format!(
                    "{shard} applied COMMIT PREPARED of {gid} while no commit decision for txid {txid} is durable"
                ));
            }
        }
        branch.state = state;
        self.trace.record(format!("{shard}: {gid} {how}"));
    }

    pub(crate) fn execute(
        &self,
        shard: &ShardName,
        statement: &Statement,
    ) -> Result<StatementResult, LinkError> {
        let gid = statement.gid.as_str().to_owned();
        let writes = statement.sql.starts_with("UPDATE");
        let fails = self.random(&format!("fails/{shard}/{gid}"), |r| r.statement_fails);
        let now = self.trace.now_ms();
        let mut databases = self.databases();
        let Some(db) = databases.get_mut(shard) else {
            return Err(refused("no such shard"));
        };
        let branch = db.branches.entry(gid.clone()).or_insert_with(|| Branch::new(now));
        match branch.state {
            BranchState::Active => {}
            BranchState::Aborted if branch.lost => {
                return Err(LinkError::BranchLost(format!("{gid}: the participant restarted")));
            }
            other => return Err(refused(format!("{gid} is {other:?}, not active"))),
        }
        branch.touched_ms = now;
        if fails {
            branch.state = BranchState::Aborted;
            self.trace
                .record(format!("{shard}: {gid} statement failed, rolled back"));
            return Err(serialization_failure());
        }
        branch.wrote |= writes;
        Ok(StatementResult {
            rows_affected: u64::from(writes),
            ..StatementResult::default()
        })
    }

    pub(crate) fn vote(&self, shard: &ShardName, gid: &str, request: &VoteRequest) -> VoteAnswer {
        let protocol = request.protocol;
        let no = self.random(&format!("vote/{shard}/{gid}"), |r| r.vote_no);
        let mut databases = self.databases();
        let Some(branch) = databases.get_mut(shard).and_then(|db| db.branches.get_mut(gid)) else {
            return VoteAnswer::No {
                sqlstate: "42704".into(),
                message: format!("no branch {gid}"),
            };
        };
        match branch.state {
            BranchState::Active if no => {
                self.finish(shard, gid, branch, BranchState::Aborted, "voted NO, rolled back");
                VoteAnswer::No {
                    sqlstate: "40001".into(),
                    message: "could not serialize".into(),
                }
            }
            BranchState::Active if !branch.wrote && protocol == Protocol::TwoPhase => {
                self.finish(shard, gid, branch, BranchState::Committed, "read-only, committed");
                VoteAnswer::ReadOnly
            }
            BranchState::Active => {
                branch.prepared = true;
                branch.touched_ms = self.trace.now_ms();
                if protocol == Protocol::ThreePhase {
                    branch.participants = request.participants.clone();
                }
                self.finish(shard, gid, branch, BranchState::Prepared, "PREPARED");
                VoteAnswer::Yes
            }
            BranchState::Prepared => VoteAnswer::Yes,
            BranchState::Committed if !branch.prepared => VoteAnswer::ReadOnly,
            BranchState::Committed => VoteAnswer::Yes,
            BranchState::Aborted => VoteAnswer::No {
                sqlstate: "40001".into(),
                message: format!("{gid} rolled back"),
            },
        }
    }

    pub(crate) fn commit_prepared(&self, shard: &ShardName, gid: &str) -> Result<(), LinkError> {
        self.commit_prepared_by(shard, gid, "COMMIT PREPARED")
    }

    pub(crate) fn commit_prepared_by(
        &self,
        shard: &ShardName,
        gid: &str,
        how: &str,
    ) -> Result<(), LinkError> {
        self.with_branch(shard, gid, |branch, _| match branch {
            Some(branch) if branch.state == BranchState::Prepared => {
                self.finish(shard, gid, branch, BranchState::Committed, how);
                Ok(())
            }
            // The marker row (written only by a prepared branch) says it committed.
            Some(branch) if branch.state == BranchState::Committed && branch.prepared => Ok(()),
            Some(branch) => Err(refused(format!(
                "COMMIT PREPARED {gid}: the branch is {:?}; this contradicts a commit decision",
                branch.state
            ))),
            // No marker rows for a GID whose decision is a row: the participant answers "nothing
            // prepared here", and the coordinator, which sends COMMIT only on a commit row, takes it.
            None if Gid::parse(gid).is_ok_and(|g| g.decision_shard().is_some()) => Ok(()),
            None => Err(refused(format!(
                "COMMIT PREPARED {gid}: no such branch and no marker row; this contradicts a commit decision"
            ))),
        })
    }

    pub(crate) fn roll_back(&self, shard: &ShardName, gid: &str) -> Result<(), LinkError> {
        let now = self.trace.now_ms();
        let mut databases = self.databases();
        let Some(db) = databases.get_mut(shard) else {
            return Err(refused("no such shard"));
        };
        // A GID never seen is remembered as aborted, so a late statement or prepare is refused.
        let branch = db.branches.entry(gid.to_owned()).or_insert_with(|| {
            let mut tombstone = Branch::new(now);
            tombstone.state = BranchState::Aborted;
            tombstone
        });
        match branch.state {
            BranchState::Active | BranchState::Prepared => {
                self.finish(shard, gid, branch, BranchState::Aborted, "ROLLBACK");
                Ok(())
            }
            // No marker row for a GID whose decision is a row: ROLLBACK PREPARED of a branch that
            // committed finds nothing, as for one that never prepared. Such a late abort comes
            // from an abort row concluded after every branch committed and the commit row was
            // forgotten (a question delayed past it): nothing is prepared for it to contradict.
            BranchState::Committed if Gid::parse(gid).is_ok_and(|g| g.decision_shard().is_some()) => {
                self.trace.record(format!(
                    "{shard}: ROLLBACK PREPARED {gid} finds nothing (it committed)"
                ));
                Ok(())
            }
            BranchState::Committed if branch.prepared => Err(refused(format!(
                "ROLLBACK PREPARED {gid}: the marker row says it committed; this contradicts an abort"
            ))),
            BranchState::Committed | BranchState::Aborted => Ok(()),
        }
    }

    pub(crate) fn commit_one_phase(&self, shard: &ShardName, gid: &str) -> Result<(), LinkError> {
        let fails = self.commit_fails(shard, gid);
        self.with_branch(shard, gid, |branch, _| match branch {
            Some(branch) if branch.state == BranchState::Active && fails => {
                self.finish(
                    shard,
                    gid,
                    branch,
                    BranchState::Aborted,
                    "COMMIT failed, rolled back",
                );
                Err(serialization_failure())
            }
            Some(branch) if branch.state == BranchState::Active => {
                self.finish(shard, gid, branch, BranchState::Committed, "COMMIT (one phase)");
                Ok(())
            }
            Some(branch) if branch.state == BranchState::Committed && !branch.prepared => Ok(()),
            Some(branch) if branch.lost => {
                Err(LinkError::BranchLost(format!("{gid}: the participant restarted")))
            }
            Some(branch) => Err(refused(format!("COMMIT {gid}: the branch is {:?}", branch.state))),
            None => Err(refused(format!("COMMIT {gid}: no such branch"))),
        })
    }

    pub(crate) fn pre_commit(&self, shard: &ShardName, gid: &str, ballot: &Ballot) -> PreCommitAnswer {
        self.with_branch(shard, gid, |branch, _| {
            let Some(branch) = branch else {
                return PreCommitAnswer {
                    acknowledged: false,
                    promised: None,
                    message: format!("no branch {gid}"),
                };
            };
            if *ballot < branch.promised {
                return PreCommitAnswer {
                    acknowledged: false,
                    promised: Some(branch.promised.clone()),
                    message: "promised a higher ballot".into(),
                };
            }
            match branch.state {
                BranchState::Prepared | BranchState::Committed if branch.prepared => {
                    branch.promised = ballot.clone();
                    branch.touched_ms = self.trace.now_ms();
                    if !branch.pre_committed && branch.state == BranchState::Prepared {
                        let txid = Gid::parse(gid).map(|gid| gid.txid()).unwrap_or(0);
                        if !self.store.pre_commit_is_durable(txid) {
                            self.violation(format!(
                                "{shard} pre-committed {gid} while no pre-commit record for txid {txid} is durable"
                            ));
                        }
                        branch.pre_committed = true;
                        self.trace
                            .record(format!("{shard}: {gid} PRE-COMMITTED under {ballot:?}"));
                    }
                    PreCommitAnswer {
                        acknowledged: true,
                        promised: None,
                        message: String::new(),
                    }
                }
                state => PreCommitAnswer {
                    acknowledged: false,
                    promised: None,
                    message: format!("{gid} is {state:?}"),
                },
            }
        })
    }

    pub(crate) fn query_state(&self, shard: &ShardName, gid: &str, ballot: &Ballot) -> Report {
        let now = self.trace.now_ms();
        let mut databases = self.databases();
        let Some(db) = databases.get_mut(shard) else {
            return Report::State(ReportedState::Aborted);
        };
        // A branch never seen is recorded as aborted under this promise, so a late prepare votes NO.
        let branch = db.branches.entry(gid.to_owned()).or_insert_with(|| {
            let mut branch = Branch::new(now);
            branch.state = BranchState::Aborted;
            branch
        });
        if *ballot < branch.promised {
            return Report::Refused {
                promised: branch.promised.clone(),
            };
        }
        branch.promised = ballot.clone();
        if branch.state == BranchState::Active {
            // Not voted yet: it may abort on its own, so the answer is final.
            self.finish(
                shard,
                gid,
                branch,
                BranchState::Aborted,
                "aborted when asked its state",
            );
        }
        Report::State(match branch.state {
            BranchState::Prepared if branch.pre_committed => ReportedState::PreCommitted,
            BranchState::Prepared => ReportedState::Prepared,
            BranchState::Committed if branch.prepared => ReportedState::Committed,
            _ => ReportedState::Aborted,
        })
    }

    /// A restarted (or long-waiting) participant applies the coordinator's answer.
    pub fn apply_decision(&self, shard: &ShardName, gid: &str, commit: bool) {
        if !self.is_up(shard) {
            return;
        }
        let result = if commit {
            self.commit_prepared(shard, gid)
        } else {
            self.roll_back(shard, gid)
        };
        if let Err(error) = result {
            self.violation(format!(
                "{shard}: applying the coordinator's answer for {gid}: {error}"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::{FaultRates, Life};
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use treaty_commit_protocol::termination::Proposer;
    use treaty_commit_protocol::transport::BranchOptions;
    use treaty_types::CoordinatorId;

    fn cluster() -> (Arc<Cluster>, SimStore) {
        let mut rng = StdRng::seed_from_u64(3);
        let chance = Arc::new(Chance::new(3, FaultRates::random(&mut rng)));
        chance.heal();
        let trace = Trace::new();
        let store = SimStore::new(Arc::clone(&chance), trace.clone());
        let shards = vec![ShardName::new("s0").unwrap(), ShardName::new("s1").unwrap()];
        (Cluster::new(shards, chance, trace, store.clone()), store)
    }

    fn two_phase() -> VoteRequest {
        VoteRequest {
            protocol: Protocol::TwoPhase,
            participants: Vec::new(),
        }
    }

    fn three_phase() -> VoteRequest {
        VoteRequest {
            protocol: Protocol::ThreePhase,
            participants: vec![ShardName::new("s0").unwrap(), ShardName::new("s1").unwrap()],
        }
    }

    fn gid(txid: u64) -> Gid {
        Gid::new(&CoordinatorId::new("sim").unwrap(), txid)
    }

    fn write(gid: &Gid) -> Statement {
        Statement {
            gid: gid.clone(),
            sql: "UPDATE t SET v = v + 1".into(),
            params: Vec::new(),
            options: BranchOptions::default(),
            continues: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn commit_prepared_answers_from_the_marker_and_refuses_a_rolled_back_branch() {
        let (cluster, store) = cluster();
        let s0 = cluster.shards[0].clone();
        let (one, two) = (gid(1), gid(2));
        cluster.execute(&s0, &write(&one)).unwrap();
        assert_eq!(cluster.vote(&s0, one.as_str(), &two_phase()), VoteAnswer::Yes);
        let handle = store.handle(Life::new(1));
        use treaty_commit_protocol::store::{CommitRecord, DecisionStore};
        handle
            .force_commit(CommitRecord {
                txid: 1,
                gid: one.to_string(),
                participants: vec!["s0".into()],
                decided_at_ms: 0,
            })
            .await
            .unwrap();
        cluster.commit_prepared(&s0, one.as_str()).unwrap();
        cluster.commit_prepared(&s0, one.as_str()).unwrap();
        assert!(matches!(
            cluster.roll_back(&s0, one.as_str()),
            Err(LinkError::Refused(_))
        ));
        cluster.execute(&s0, &write(&two)).unwrap();
        cluster.roll_back(&s0, two.as_str()).unwrap();
        assert!(matches!(
            cluster.commit_prepared(&s0, two.as_str()),
            Err(LinkError::Refused(_))
        ));
        assert!(cluster.violations().is_empty(), "{:?}", cluster.violations());
    }

    #[tokio::test(start_paused = true)]
    async fn a_commit_before_the_decision_is_durable_is_a_violation() {
        let (cluster, _store) = cluster();
        let s0 = cluster.shards[0].clone();
        let one = gid(1);
        cluster.execute(&s0, &write(&one)).unwrap();
        cluster.vote(&s0, one.as_str(), &two_phase());
        cluster.commit_prepared(&s0, one.as_str()).unwrap();
        assert_eq!(cluster.violations().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_crash_loses_active_branches_only_and_read_only_votes_depend_on_the_protocol() {
        let (cluster, _store) = cluster();
        let s0 = cluster.shards[0].clone();
        let (active, prepared, read_only, read_only_3pc) = (gid(1), gid(2), gid(3), gid(4));
        cluster.execute(&s0, &write(&active)).unwrap();
        cluster.execute(&s0, &write(&prepared)).unwrap();
        cluster.vote(&s0, prepared.as_str(), &two_phase());
        let mut read = write(&read_only);
        read.sql = "SELECT 1".into();
        cluster.execute(&s0, &read).unwrap();
        assert_eq!(
            cluster.vote(&s0, read_only.as_str(), &two_phase()),
            VoteAnswer::ReadOnly
        );
        read.gid = read_only_3pc.clone();
        cluster.execute(&s0, &read).unwrap();
        assert_eq!(
            cluster.vote(&s0, read_only_3pc.as_str(), &three_phase()),
            VoteAnswer::Yes,
            "a three-phase participant prepares even a read-only branch"
        );
        cluster.crash(&s0);
        cluster.restart(&s0);
        assert!(matches!(
            cluster.execute(&s0, &write(&active)),
            Err(LinkError::BranchLost(_))
        ));
        assert_eq!(
            cluster.prepared(&s0),
            vec![prepared.to_string(), read_only_3pc.to_string()]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_state_query_promises_the_ballot_and_aborts_a_branch_that_has_not_voted() {
        let (cluster, _store) = cluster();
        let s0 = cluster.shards[0].clone();
        let (voted, unvoted) = (gid(1), gid(2));
        cluster.execute(&s0, &write(&voted)).unwrap();
        cluster.vote(&s0, voted.as_str(), &three_phase());
        cluster.execute(&s0, &write(&unvoted)).unwrap();
        let higher = Ballot::COORDINATOR.next_for(Proposer::Coordinator { incarnation: 2 });
        assert_eq!(
            cluster.query_state(&s0, voted.as_str(), &higher),
            Report::State(ReportedState::Prepared)
        );
        let late = cluster.pre_commit(&s0, voted.as_str(), &Ballot::COORDINATOR);
        assert!(!late.acknowledged && late.promised == Some(higher.clone()));
        assert!(cluster.pre_commit(&s0, voted.as_str(), &higher).acknowledged);
        assert_eq!(
            cluster.query_state(&s0, voted.as_str(), &higher),
            Report::State(ReportedState::PreCommitted)
        );
        assert_eq!(
            cluster.query_state(&s0, unvoted.as_str(), &higher),
            Report::State(ReportedState::Aborted)
        );
        assert!(matches!(
            cluster.vote(&s0, unvoted.as_str(), &three_phase()),
            VoteAnswer::No { .. }
        ));
    }
}
