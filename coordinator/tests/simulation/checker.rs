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
//! Heuristic decisions: an operator's decision is allowed to contradict what participants did
//! only where the operator forced it and the coordinator allowed it. Precisely:
//! - the coordinator must never accept a heuristic decision beside a live decision of its own: a
//!   heuristic abort while the store holds a commit record for the transaction without an end
//!   record is a failure ("two decisions"), always;
//! - a transaction with a durable heuristic decision whose prepared branches finished the other
//!   way is a *heuristic hazard*: the operator's resolve raced the protocol (a participant's 3PC
//!   termination, or an outcome the coordinator no longer remembered) and the coordinator let it.
//!   It is exempt from the atomicity and "decision applied" checks and from "every transaction
//!   finishes" (the coordinator retries a refused phase two forever, by design), and it is
//!   counted and reported in the run's summary line. Every other transaction is checked in full.
//! - what a client was told is checked for every transaction, hazards included.

use std::collections::{BTreeMap, BTreeSet};

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

/// Transactions with a durable heuristic decision that some prepared branch contradicts.
pub fn heuristic_hazards(
    branches: &BTreeMap<ShardName, BTreeMap<String, Branch>>,
    durable: &[Record],
) -> BTreeSet<String> {
    durable
        .iter()
        .filter_map(|record| match record {
            Record::Heuristic(heuristic) => Some(heuristic),
            _ => None,
        })
        .filter(|heuristic| {
            let opposite = match heuristic.decision {
                HeuristicDecision::Commit => BranchState::Aborted,
                HeuristicDecision::Abort => BranchState::Committed,
            };
            branches
                .values()
                .filter_map(|b| b.get(&heuristic.gid))
                .any(|branch| branch.prepared && branch.state == opposite)
        })
        .map(|heuristic| heuristic.gid.clone())
        .collect()
}

pub fn check(facts: &Facts<'_>) -> Vec<String> {
    let mut violations = Vec::new();
    let hazards = heuristic_hazards(facts.branches, facts.durable);
    let branches_of = |gid: &str| -> Vec<(&ShardName, &Branch)> {
        facts
            .branches
            .iter()
            .filter_map(|(shard, branches)| branches.get(gid).map(|branch| (shard, branch)))
            .collect()
    };

    // Atomicity.
    let gids: BTreeSet<&String> = facts.branches.values().flat_map(|b| b.keys()).collect();
    for gid in gids.into_iter().filter(|gid| !hazards.contains(*gid)) {
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
    let mut live_commits: BTreeSet<u64> = BTreeSet::new();
    for record in facts.durable {
        match record {
            Record::Commit(commit) => {
                live_commits.insert(commit.txid);
            }
            Record::End(txid) => {
                live_commits.remove(txid);
            }
            Record::Heuristic(heuristic)
                if heuristic.decision == HeuristicDecision::Abort
                    && live_commits.contains(&heuristic.txid) =>
            {
                violations.push(format!(
                    "two decisions: a heuristic abort of {} was recorded while its commit record was live",
                    heuristic.gid
                ));
            }
            _ => {}
        }
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
    for (gid, decision) in decisions.iter().filter(|(gid, _)| !hazards.contains(*gid)) {
        let branches = branches_of(gid);
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
