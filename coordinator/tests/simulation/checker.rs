//! What every seed must satisfy, checked on what the run left behind: every shard's branches, the
//! store's durable records, and what clients were told. (The rule "no COMMIT PREPARED before a
//! durable commit decision" is checked when each branch commits, in `participants.rs`; "with
//! faults healed, every transaction finishes and nothing is left prepared" by the run's wait,
//! in `run.rs`.)
//!
//! A branch "wrote" if a writing statement succeeded in it; a read-only branch that committed at
//! its READ-ONLY vote takes no part. Asserted:
//! - atomicity: no transaction has a written branch committed on one shard and aborted on another;
//! - the store never holds two decisions for one transaction (a commit record or heuristic commit
//!   beside a heuristic abort);
//! - every durable commit decision (commit record or heuristic commit) is what every shard it
//!   names applied: the branch is there and committed;
//! - every durable heuristic abort is what every shard that prepared the branch applied;
//! - a client told Committed finds the transaction committed on every shard it wrote to; a client
//!   told Aborted finds no written branch committed.
//!
//! Heuristic decisions get no exception: the coordinator must refuse every heuristic that could
//! contradict a decision or half-commit (see `driver/resolve.rs`), so an operator's resolve that
//! breaks atomicity is a failure like any other.

use std::collections::BTreeMap;

use treaty_commit_protocol::Outcome;
use treaty_commit_protocol::store::HeuristicDecision;
use treaty_types::ShardName;

use crate::participants::{Branch, BranchState};
use crate::store::Record;

/// What a client was told about its transaction.
#[derive(Debug, Clone)]
pub struct ClientRecord {
    pub gid: String,
    /// Shards a writing statement succeeded on (its last statement included, for fused commits).
    pub wrote: Vec<ShardName>,
    pub outcome: Option<Outcome>,
}

pub struct Facts<'a> {
    pub branches: &'a BTreeMap<ShardName, BTreeMap<String, Branch>>,
    pub durable: &'a [Record],
    pub clients: &'a [ClientRecord],
}

#[derive(Default)]
struct Decisions {
    commit: Option<String>,
    heuristic_abort: Option<Vec<String>>,
    commit_participants: Vec<String>,
}

pub fn check(facts: &Facts<'_>) -> Vec<String> {
    let mut violations = Vec::new();
    let branches_of = |gid: &str| -> Vec<(&ShardName, &Branch)> {
        facts
            .branches
            .iter()
            .filter_map(|(shard, branches)| branches.get(gid).map(|branch| (shard, branch)))
            .collect()
    };

    // Atomicity.
    let gids: std::collections::BTreeSet<&String> = facts.branches.values().flat_map(|b| b.keys()).collect();
    for gid in &gids {
        let written: Vec<(&ShardName, &Branch)> = branches_of(gid)
            .into_iter()
            .filter(|(_, branch)| branch.wrote || branch.prepared)
            .collect();
        let committed: Vec<&str> = written
            .iter()
            .filter(|(_, b)| b.state == BranchState::Committed)
            .map(|(s, _)| s.as_str())
            .collect();
        let aborted: Vec<&str> = written
            .iter()
            .filter(|(_, b)| b.state == BranchState::Aborted)
            .map(|(s, _)| s.as_str())
            .collect();
        if !committed.is_empty() && !aborted.is_empty() {
            violations.push(format!(
                "atomicity: {gid} committed on {committed:?} and aborted on {aborted:?}"
            ));
        }
    }

    // Durable decisions.
    let mut decisions: BTreeMap<String, Decisions> = BTreeMap::new();
    for record in facts.durable {
        match record {
            Record::Commit(commit) => {
                let entry = decisions.entry(commit.gid.clone()).or_default();
                entry.commit.get_or_insert_with(|| "commit record".into());
                entry
                    .commit_participants
                    .extend(commit.participants.iter().cloned());
            }
            Record::Heuristic(heuristic) => {
                let entry = decisions.entry(heuristic.gid.clone()).or_default();
                match heuristic.decision {
                    HeuristicDecision::Commit => {
                        entry.commit.get_or_insert_with(|| "heuristic commit".into());
                        entry
                            .commit_participants
                            .extend(heuristic.participants.iter().cloned());
                    }
                    HeuristicDecision::Abort => {
                        entry.heuristic_abort = Some(heuristic.participants.clone());
                    }
                }
            }
            _ => {}
        }
    }
    for (gid, decision) in &decisions {
        let branches = branches_of(gid);
        if let (Some(commit), Some(_)) = (&decision.commit, &decision.heuristic_abort) {
            violations.push(format!(
                "two decisions: the store holds a {commit} and a heuristic abort for {gid}"
            ));
        }
        if let Some(commit) = &decision.commit {
            for shard in &decision.commit_participants {
                let state = branches
                    .iter()
                    .find(|(s, _)| s.as_str() == shard)
                    .map(|(_, b)| b.state);
                if state != Some(BranchState::Committed) {
                    violations.push(format!(
                        "durable {commit} of {gid} names {shard}, whose branch is {state:?}, not committed"
                    ));
                }
            }
        }
        if decision.heuristic_abort.is_some() {
            for (shard, branch) in &branches {
                if branch.prepared && branch.state != BranchState::Aborted {
                    violations.push(format!(
                        "durable heuristic abort of {gid}, but {shard} holds its prepared branch {:?}",
                        branch.state
                    ));
                }
            }
        }
    }

    // What clients were told.
    for client in facts.clients {
        let branches = branches_of(&client.gid);
        match &client.outcome {
            Some(Outcome::Committed) => {
                for shard in &client.wrote {
                    let state = branches.iter().find(|(s, _)| *s == shard).map(|(_, b)| b.state);
                    if state != Some(BranchState::Committed) {
                        violations.push(format!(
                            "client told Committed for {}, but its write on {shard} is {state:?}",
                            client.gid
                        ));
                    }
                }
            }
            Some(Outcome::Aborted(reason)) => {
                for (shard, branch) in &branches {
                    if branch.wrote && branch.state == BranchState::Committed {
                        violations.push(format!(
                            "client told Aborted ({reason}) for {}, but {shard} committed its write",
                            client.gid
                        ));
                    }
                }
            }
            Some(Outcome::Unknown(_)) | None => {}
        }
    }
    violations
}
