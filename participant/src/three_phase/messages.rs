//! The termination protocol's messages and timers for three-phase branches: sending what a step
//! asked for to the other participants (or to this one, as the leader) once the entry's lock is
//! released, feeding their answers back as events, and the ticker that fires each machine's
//! timeout, deletes the rows of finished branches and rebuilds machines dropped after a failed
//! step.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use treaty_commit_protocol::participant::{ParticipantAction, ParticipantEvent};
use treaty_proto::{Gid, now_ms};

use super::{Peer, PreCommitAnswer, Slot, ThreePhase, store};

impl ThreePhase {
    /// Rebuilds the machines dropped after a failed step, from their rows (`find`); one no longer
    /// prepared is forgotten, one that cannot be read yet is tried again on the next tick.
    pub(super) async fn rebuild_dropped(&self) {
        let gids: Vec<Gid> = {
            let mut dropped = self
                .dropped
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if dropped.is_empty() {
                return;
            }
            dropped.drain().collect()
        };
        for gid in gids {
            if let Err(error) = self.find(&gid).await {
                tracing::warn!(%gid, %error, "three-phase branch not rebuilt yet; trying again");
                self.dropped
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .insert(gid);
            }
        }
    }

    pub(super) async fn delete_finished_rows(&self) {
        let gids = std::mem::take(
            &mut *self
                .finished_rows
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        if gids.is_empty() {
            return;
        }
        if let Err(error) = store::delete(self.agent.pool(), &gids).await {
            tracing::warn!(%error, rows = gids.len(), "could not delete the three-phase rows of finished branches; trying again");
            self.finished_rows
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .extend(gids);
        }
    }

    /// Sends what a step asked for, after its lock was released.
    pub(super) fn send(self: &Arc<Self>, gid: &Gid, peers: &[Peer], remote: Vec<ParticipantAction>) {
        for action in remote {
            let (this, gid, peers) = (Arc::clone(self), gid.clone(), peers.to_vec());
            tokio::spawn(async move { this.send_one(&gid, &peers, action).await });
        }
    }

    async fn send_one(self: &Arc<Self>, gid: &Gid, peers: &[Peer], action: ParticipantAction) {
        let me = self.agent.shard().clone();
        let commit = matches!(action, ParticipantAction::SendCommit { .. });
        match action {
            ParticipantAction::QueryStates { ballot, shards } => {
                for shard in shards {
                    let (this, gid, peers, ballot) =
                        (Arc::clone(self), gid.clone(), peers.to_vec(), ballot.clone());
                    tokio::spawn(async move {
                        let report = if shard == *this.agent.shard() {
                            this.query_state(&gid, ballot.clone(), peers.clone()).await
                        } else {
                            this.peers.query_state(&gid, &shard, &peers, &ballot).await
                        };
                        match report {
                            Ok(report) => {
                                let event = ParticipantEvent::StateReported {
                                    shard,
                                    ballot,
                                    report,
                                };
                                this.feed(&gid, event).await;
                            }
                            Err(error) => {
                                tracing::info!(%gid, %shard, %error, "termination: no state from a participant; asking again on the next timeout")
                            }
                        }
                    });
                }
            }
            ParticipantAction::SendPreCommit { shard, ballot } => {
                let answer = if shard == me {
                    self.pre_commit(gid, ballot.clone()).await
                } else {
                    self.peers.pre_commit(gid, &shard, peers, &ballot).await
                };
                match answer {
                    Ok(PreCommitAnswer::Acknowledged) => {
                        self.feed(gid, ParticipantEvent::PreCommitAcknowledged { shard, ballot })
                            .await
                    }
                    Ok(PreCommitAnswer::Refused { why, .. }) => {
                        tracing::info!(%gid, %shard, "termination: pre-commit refused: {why}")
                    }
                    Err(error) => {
                        tracing::info!(%gid, %shard, %error, "termination: pre-commit not delivered")
                    }
                }
            }
            ParticipantAction::SendCommit { shard } | ParticipantAction::SendAbort { shard } => {
                let result = if shard == me {
                    if commit {
                        self.commit(gid).await
                    } else {
                        self.abort(gid).await
                    }
                    .map(|_| ())
                } else {
                    self.peers.finish(gid, &shard, peers, commit).await
                };
                let decision = if commit { "commit" } else { "abort" };
                match result {
                    Ok(()) => tracing::info!(%gid, %shard, "termination: {decision} applied"),
                    // The participant asks again (termination request) when its own timeout fires.
                    Err(error) => tracing::warn!(%gid, %shard, %error, "termination: {decision} not applied"),
                }
            }
            ParticipantAction::RequestTermination { leader, .. } => {
                if let Err(error) = self.peers.request_termination(gid, &leader, peers).await {
                    tracing::info!(%gid, %leader, %error, "termination leader not reached; asking again on the next timeout");
                }
            }
            other => tracing::error!(%gid, ?other, "not a message to another participant"),
        }
    }

    /// Feeds an answer from another participant (or from itself) to the machine.
    pub(super) async fn feed(self: &Arc<Self>, gid: &Gid, event: ParticipantEvent) {
        let Some(slot) = self.get(gid) else { return };
        let mut entry = slot.lock().await;
        if entry.gone {
            return;
        }
        match self.drive(&mut entry, event).await {
            Ok(driven) => {
                let peers = entry.peers.clone();
                drop(entry);
                self.send(gid, &peers, driven.remote);
            }
            Err(error) => {
                tracing::warn!(%gid, %error, "three-phase step failed; the branch is rebuilt from its durable state")
            }
        }
    }

    /// Steps every machine whose timeout passed, until `stop`.
    pub async fn run_ticker(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let every = Duration::from_millis((self.timeout_ms / 4).clamp(10, 250));
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.changed() => {
                    self.delete_finished_rows().await;
                    return;
                }
            }
            self.delete_finished_rows().await;
            self.rebuild_dropped().await;
            let slots: Vec<(String, Slot)> = if self.live.load(Ordering::Relaxed) == 0 {
                continue;
            } else {
                self.table()
                    .iter()
                    .map(|(gid, slot)| (gid.clone(), slot.clone()))
                    .collect()
            };
            let now = now_ms();
            for (text, slot) in slots {
                let due = match slot.try_lock() {
                    Ok(entry) => !entry.gone && entry.machine.next_deadline_ms().is_some_and(|d| d <= now),
                    Err(_) => false,
                };
                let Ok(gid) = Gid::parse(&text) else { continue };
                if due {
                    let this = Arc::clone(&self);
                    tokio::spawn(async move { this.feed(&gid, ParticipantEvent::Tick).await });
                }
            }
        }
    }
}
