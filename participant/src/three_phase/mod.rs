//! Three-phase commit at the participant: one pure `treaty_commit_protocol::participant::Participant`
//! machine per prepared three-phase branch, driven here. This module owns the table of those
//! machines, carries out their actions (the vote, the durable pre-commit and promises in
//! `store`, COMMIT/ROLLBACK PREPARED through the agent, messages to the other participants in
//! `peers`) and the timeout ticker that starts the termination protocol when the coordinator falls
//! silent (docs/three-phase-commit.md).
//!
//! Each GID's machine sits behind an async lock held while its local I/O runs (the vote, the
//! pre-commit write, the promise write, phase two), so the machine never sees a state that is
//! about to change underneath it; messages to other participants (and to itself, as the
//! termination leader) are sent only after the lock is released, and their answers come back as
//! events through the same lock.
//!
//! Durability rule: a promise (a termination query answered) and a pre-commit are written to
//! `treaty.three_phase` before the answer leaves; a step whose write fails drops the machine, which
//! is rebuilt from what is durable on its next use (as after a restart).
//!
//! Two-phase branches get their machine from the agent (`agent/machine.rs`), in the branch table;
//! the 2PC paths here only look at an empty table and hand the call to the agent.
//!
//! Modules: `store` (the durable row), `peers` (calls to the other participants), `messages`
//! (sending what a step asked for, feeding answers back, the timeout ticker).

pub mod store;

mod messages;
mod peers;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use treaty_commit_protocol::Protocol;
use treaty_commit_protocol::participant::{
    Participant, ParticipantAction, ParticipantEvent, ParticipantPhase, Report,
};
use treaty_commit_protocol::termination::{Ballot, Proposer, ReportedState, Rules};
use treaty_proto::{Gid, now_ms};

use crate::agent::{Agent, BranchState, Vote};
use crate::error::BranchError;

pub use store::Peer;

/// One three-phase branch: its machine and who the other participants are.
struct Entry {
    gid: Gid,
    machine: Participant,
    peers: Vec<Peer>,
    /// The `treaty.three_phase` row may exist: promises must be written to it.
    recorded: bool,
    /// Taken out of the table (finished, or dropped to be rebuilt): a caller that waited for the
    /// lock looks the GID up again.
    gone: bool,
}

type Slot = Arc<tokio::sync::Mutex<Entry>>;

/// What one step of a machine left for the caller: answers to the request that caused it, and
/// messages to send once the lock is released.
#[derive(Default)]
struct Driven {
    replies: Vec<ParticipantAction>,
    remote: Vec<ParticipantAction>,
    /// Why the vote was NO, when the branch refused to prepare.
    no_vote: Option<(String, String)>,
    /// The machine's phase after the step.
    phase: Option<ParticipantPhase>,
}

pub struct ThreePhase {
    agent: Arc<Agent>,
    timeout_ms: u64,
    entries: Mutex<HashMap<String, Slot>>,
    /// `entries.len()`, read without the lock by the two-phase paths.
    live: AtomicUsize,
    peers: peers::PeerClients,
    /// Rows of finished branches, deleted in batches by the ticker.
    finished_rows: Mutex<Vec<Gid>>,
    /// Branches whose machine was dropped after a failed step: the ticker rebuilds them from their
    /// rows, so that termination goes on without waiting for a message about them.
    dropped: Mutex<HashSet<Gid>>,
}

/// An answer to a `PreCommit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreCommitAnswer {
    Acknowledged,
    /// Not taken: the branch promised `promised` (a higher ballot), or is not prepared.
    Refused {
        promised: Ballot,
        why: String,
    },
}

impl ThreePhase {
    /// Rebuilds a machine for every three-phase branch PostgreSQL still holds prepared; each times
    /// out at once, so termination (or the coordinator) finishes it.
    pub async fn start(
        agent: Arc<Agent>,
        timeout_ms: u64,
        peer_tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> Result<Arc<Self>, crate::postgres::DbError> {
        let recorded = store::load_prepared(agent.pool(), agent.shard()).await?;
        let this = Arc::new(Self {
            agent,
            timeout_ms,
            entries: Mutex::new(HashMap::new()),
            live: AtomicUsize::new(0),
            peers: peers::PeerClients::new(peer_tls),
            finished_rows: Mutex::new(Vec::new()),
            dropped: Mutex::new(HashSet::new()),
        });
        for branch in recorded {
            tracing::info!(gid = %branch.gid, pre_committed = branch.pre_committed, "three-phase branch prepared before this start");
            let entry = this.rebuild(branch);
            this.insert(entry);
        }
        Ok(this)
    }

    fn rebuild(&self, recorded: store::Recorded) -> Entry {
        let machine = Participant::recover(
            self.agent.shard().clone(),
            recorded.peers.iter().map(|p| p.shard.clone()).collect(),
            recorded.pre_committed,
            recorded.promised,
            Rules::Classical,
            self.timeout_ms,
            now_ms(),
        );
        Entry {
            gid: recorded.gid,
            machine,
            peers: recorded.peers,
            recorded: true,
            gone: false,
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn insert(&self, entry: Entry) -> Slot {
        let mut table = self.table();
        let slot = table
            .entry(entry.gid.to_string())
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(entry)))
            .clone();
        self.live.store(table.len(), Ordering::Relaxed);
        slot
    }

    fn remove(&self, gid: &Gid) {
        let mut table = self.table();
        table.remove(gid.as_str());
        self.live.store(table.len(), Ordering::Relaxed);
    }

    fn get(&self, gid: &Gid) -> Option<Slot> {
        if self.live.load(Ordering::Relaxed) == 0 {
            return None;
        }
        self.table().get(gid.as_str()).cloned()
    }

    /// The machine for `gid`, rebuilt from `treaty.three_phase` when it was dropped after a failed
    /// write; `None` for a branch that is not a prepared three-phase branch here.
    async fn find(&self, gid: &Gid) -> Result<Option<Slot>, BranchError> {
        if let Some(slot) = self.get(gid) {
            return Ok(Some(slot));
        }
        Ok(store::load_one(self.agent.pool(), &self.agent.branch_gid(gid))
            .await?
            .map(|recorded| self.insert(self.rebuild(recorded))))
    }

    /// A machine for a branch that has not voted: the prepare names the participants, and a query
    /// that comes first aborts it (participants do not matter then).
    fn new_entry(&self, gid: &Gid, peers: Vec<Peer>) -> Entry {
        let machine = Participant::new(
            self.agent.shard().clone(),
            Protocol::ThreePhase,
            Rules::Classical,
            self.timeout_ms,
            now_ms(),
        );
        Entry {
            gid: gid.clone(),
            machine,
            peers,
            recorded: false,
            gone: false,
        }
    }

    /// Steps the machine with `event` and carries out its local actions, under the entry's lock.
    async fn drive(&self, entry: &mut Entry, event: ParticipantEvent) -> Result<Driven, BranchError> {
        let result = self.drive_inner(entry, event).await;
        if result.is_err() || entry.machine.phase().is_decided() {
            // Finished, or a durable write failed: the next use starts from what is durable.
            entry.gone = true;
            self.remove(&entry.gid);
            if result.is_err() {
                self.dropped
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .insert(entry.gid.clone());
            }
        }
        result
    }

    async fn drive_inner(&self, entry: &mut Entry, event: ParticipantEvent) -> Result<Driven, BranchError> {
        let pool = self.agent.pool();
        let mut driven = Driven::default();
        let mut queue = VecDeque::from([event]);
        while let Some(event) = queue.pop_front() {
            let promised = entry.machine.promised().clone();
            let actions = entry.machine.step(event, now_ms());
            let pre_commits = actions
                .iter()
                .any(|a| matches!(a, ParticipantAction::PersistPreCommitState { .. }));
            if entry.recorded && !pre_commits && *entry.machine.promised() != promised {
                store::record(pool, &entry.gid, false, entry.machine.promised()).await?;
            }
            for action in actions {
                match action {
                    ParticipantAction::PrepareBranch => {
                        entry.recorded = true;
                        let vote = self
                            .agent
                            .prepare_three_phase(&entry.gid, &entry.peers, entry.machine.promised())
                            .await;
                        queue.push_back(match vote {
                            Ok(Vote::Yes) => ParticipantEvent::BranchPrepared,
                            Ok(Vote::No { sqlstate, message }) => {
                                driven.no_vote = Some((sqlstate, message));
                                ParticipantEvent::BranchPrepareFailed
                            }
                            Ok(Vote::ReadOnly) => {
                                driven.no_vote = Some((
                                    String::new(),
                                    "branch finished read-only; three-phase branches must prepare".into(),
                                ));
                                ParticipantEvent::BranchPrepareFailed
                            }
                            Err(error) => {
                                driven.no_vote = Some((String::new(), error.to_string()));
                                ParticipantEvent::BranchPrepareFailed
                            }
                        });
                    }
                    ParticipantAction::PersistPreCommitState { ballot } => {
                        store::record(pool, &entry.gid, true, &ballot).await?;
                        queue.push_back(ParticipantEvent::PreCommitDurable);
                    }
                    ParticipantAction::ApplyCommit => {
                        self.agent.commit(&entry.gid).await?;
                        self.forget_row(entry);
                    }
                    ParticipantAction::ApplyAbort => {
                        self.agent.abort(&entry.gid).await?;
                        self.forget_row(entry);
                    }
                    ParticipantAction::SendVote { .. }
                    | ParticipantAction::AcknowledgePreCommit { .. }
                    | ParticipantAction::AcknowledgeDecision
                    | ParticipantAction::Refuse(_)
                    | ParticipantAction::ReportState { .. } => driven.replies.push(action),
                    ParticipantAction::CheckWrites
                    | ParticipantAction::CommitLocally
                    | ParticipantAction::SendReadOnlyVote => {
                        // Two-phase only: a three-phase machine never asks for them.
                        tracing::error!(gid = %entry.gid, ?action, "a three-phase branch asked for a two-phase action");
                    }
                    ParticipantAction::AskCoordinator => {
                        // Not asked by a three-phase machine; the reconciler asks the coordinator
                        // about every branch left in doubt anyway.
                    }
                    ParticipantAction::RequestTermination { .. }
                    | ParticipantAction::QueryStates { .. }
                    | ParticipantAction::SendPreCommit { .. }
                    | ParticipantAction::SendCommit { .. }
                    | ParticipantAction::SendAbort { .. } => driven.remote.push(action),
                }
            }
        }
        driven.phase = Some(entry.machine.phase());
        Ok(driven)
    }

    /// Queues the row of a finished branch for deletion: the ticker deletes the queue in one
    /// statement, so a commit costs no durable write of its own here. A row left behind by a crash
    /// is harmless (nothing reads the row of a branch that is no longer prepared) and is deleted
    /// at the next start.
    fn forget_row(&self, entry: &mut Entry) {
        if !entry.recorded {
            return;
        }
        self.finished_rows
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(entry.gid.clone());
        entry.recorded = false;
    }

    /// Locks the machine of `gid`, creating one with `create` when there is none, and runs
    /// `event`; answers what the step replied and sends the rest.
    async fn run(
        self: &Arc<Self>,
        gid: &Gid,
        create: Option<Vec<Peer>>,
        event: ParticipantEvent,
    ) -> Result<Option<Driven>, BranchError> {
        loop {
            // A branch still open has never been prepared, so it has no row to rebuild from: the
            // prepare skips looking for one.
            let found = if create.is_some() && self.agent.has_open_branch(gid.as_str()) {
                self.get(gid)
            } else {
                self.find(gid).await?
            };
            let slot = match (found, &create) {
                (Some(slot), _) => slot,
                (None, Some(peers)) => self.insert(self.new_entry(gid, peers.clone())),
                (None, None) => return Ok(None),
            };
            let mut entry = slot.lock().await;
            if entry.gone {
                continue;
            }
            if entry.peers.is_empty()
                && let Some(peers) = &create
            {
                entry.peers = peers.clone();
            }
            let mut driven = self.drive(&mut entry, event).await?;
            let peers = entry.peers.clone();
            drop(entry);
            self.send(gid, &peers, std::mem::take(&mut driven.remote));
            return Ok(Some(driven));
        }
    }

    /// The coordinator's Prepare of a three-phase branch.
    pub async fn prepare(self: &Arc<Self>, gid: &Gid, peers: Vec<Peer>) -> Result<Vote, BranchError> {
        let participants = peers.iter().map(|p| p.shard.clone()).collect();
        let driven = self
            .run(
                gid,
                Some(peers),
                ParticipantEvent::PrepareRequested { participants },
            )
            .await?
            .unwrap_or_default();
        let yes = driven.replies.iter().find_map(|a| match a {
            ParticipantAction::SendVote { yes } => Some(*yes),
            _ => None,
        });
        Ok(match (yes, driven.no_vote) {
            (Some(true), _) => Vote::Yes,
            (_, Some((sqlstate, message))) => Vote::No { sqlstate, message },
            _ => Vote::No {
                sqlstate: String::new(),
                message: format!("branch {gid} was aborted by three-phase termination before it voted"),
            },
        })
    }

    /// A `PreCommit` from the coordinator or a termination leader (the ballot names which).
    pub async fn pre_commit(
        self: &Arc<Self>,
        gid: &Gid,
        ballot: Ballot,
    ) -> Result<PreCommitAnswer, BranchError> {
        let event = ParticipantEvent::PreCommitRequested {
            from: ballot.proposer.clone(),
            ballot: ballot.clone(),
        };
        let Some(driven) = self.run(gid, None, event).await? else {
            // No machine: finished here already, or not a prepared three-phase branch.
            return Ok(match self.agent.status(gid).await? {
                BranchState::Committed => PreCommitAnswer::Acknowledged,
                state => PreCommitAnswer::Refused {
                    promised: ballot,
                    why: format!("branch {gid} is not a prepared three-phase branch here ({state:?})"),
                },
            });
        };
        if driven
            .replies
            .iter()
            .any(|a| matches!(a, ParticipantAction::AcknowledgePreCommit { .. }))
        {
            return Ok(PreCommitAnswer::Acknowledged);
        }
        let promised = match self.get(gid) {
            Some(slot) => slot.lock().await.machine.promised().clone(),
            None => ballot.clone(),
        };
        Ok(PreCommitAnswer::Refused {
            why: format!("branch {gid} promised ballot {promised:?}, above {ballot:?}, or is not prepared"),
            promised,
        })
    }

    /// A termination proposer's `QueryState`.
    pub async fn query_state(
        self: &Arc<Self>,
        gid: &Gid,
        ballot: Ballot,
        peers: Vec<Peer>,
    ) -> Result<Report, BranchError> {
        let event = ParticipantEvent::StateQueried {
            from: ballot.proposer.clone(),
            ballot: ballot.clone(),
        };
        // Through the machine when there is one. No machine (any more) is not "aborted": it may
        // have finished while this query waited for its lock, so PostgreSQL is asked next.
        if self.find(gid).await?.is_some()
            && let Some(driven) = self.run(gid, None, event.clone()).await?
        {
            return Self::report(gid, driven);
        }
        match self.agent.status(gid).await? {
            // Working, not voted: a machine of its own, which aborts it and answers ABORTED.
            BranchState::Active => match self.run(gid, Some(peers), event).await? {
                Some(driven) => Self::report(gid, driven),
                None => Err(BranchError::Unavailable(format!(
                    "branch {gid} changed while it was queried; ask again"
                ))),
            },
            BranchState::Committed => Ok(Report::State(ReportedState::Committed)),
            BranchState::Prepared => Err(BranchError::WrongState(format!(
                "branch {gid} is prepared here without a three-phase record (a two-phase branch, or \
                 one whose record was lost); it takes no part in three-phase termination"
            ))),
            BranchState::Aborted | BranchState::Unknown => {
                // Never voted YES here, or rolled back: abort for good, so a late Prepare votes NO.
                self.agent.abort(gid).await?;
                Ok(Report::State(ReportedState::Aborted))
            }
        }
    }

    fn report(gid: &Gid, driven: Driven) -> Result<Report, BranchError> {
        driven
            .replies
            .into_iter()
            .find_map(|a| match a {
                ParticipantAction::ReportState { report, .. } => Some(report),
                _ => None,
            })
            .ok_or_else(|| {
                BranchError::Unavailable(format!("branch {gid} did not answer the query; ask again"))
            })
    }

    /// Another participant's timeout fired and it asks this one (the leader) to run termination.
    pub async fn termination_requested(
        self: &Arc<Self>,
        gid: &Gid,
        peers: Vec<Peer>,
    ) -> Result<(), BranchError> {
        let participants = peers.iter().map(|p| p.shard.clone()).collect();
        if self
            .run(gid, None, ParticipantEvent::TerminationRequested { participants })
            .await?
            .is_some()
        {
            return Ok(());
        }
        // Finished here already: tell everyone how, so that the one asking learns it.
        let commit = match self.agent.status(gid).await? {
            BranchState::Committed => true,
            BranchState::Aborted | BranchState::Unknown => false,
            BranchState::Active | BranchState::Prepared => return Ok(()),
        };
        let remote = peers
            .iter()
            .map(|p| {
                let shard = p.shard.clone();
                if commit {
                    ParticipantAction::SendCommit { shard }
                } else {
                    ParticipantAction::SendAbort { shard }
                }
            })
            .collect();
        self.send(gid, &peers, remote);
        Ok(())
    }

    /// `Commit` from the coordinator, a termination leader or recovery: through the machine when
    /// the branch has one, so that it never runs termination for a branch already finished.
    pub async fn commit(self: &Arc<Self>, gid: &Gid) -> Result<BranchState, BranchError> {
        let event = ParticipantEvent::CommitRequested {
            from: Proposer::Coordinator { incarnation: 0 },
        };
        self.finish(gid, event, ParticipantPhase::Committed).await
    }

    pub async fn abort(self: &Arc<Self>, gid: &Gid) -> Result<BranchState, BranchError> {
        let event = ParticipantEvent::AbortRequested {
            from: Proposer::Coordinator { incarnation: 0 },
        };
        self.finish(gid, event, ParticipantPhase::Aborted).await
    }

    async fn finish(
        self: &Arc<Self>,
        gid: &Gid,
        event: ParticipantEvent,
        wanted: ParticipantPhase,
    ) -> Result<BranchState, BranchError> {
        // The three-phase run is boxed: every two-phase commit and abort comes through here too
        // (`CommitBatch`), and inline its 5 KB would be allocated and copied for each of them.
        if self.get(gid).is_some()
            && let Some(driven) = Box::pin(self.run(gid, None, event)).await?
            && driven.phase == Some(wanted)
        {
            return Ok(if wanted == ParticipantPhase::Committed {
                BranchState::Committed
            } else {
                BranchState::Aborted
            });
        }
        // Whatever the machine did, PostgreSQL has the last word (and the 2PC answers).
        match wanted {
            ParticipantPhase::Committed => self.agent.commit(gid).await,
            _ => self.agent.abort(gid).await,
        }
    }
}
