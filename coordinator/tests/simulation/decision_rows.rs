//! The simulated `treaty.decisions` (`--decision-store shard`): one row per GID, kept by the
//! decision shard and durable (a committed row survives the participant's crash, as PostgreSQL's
//! does). The decision branch's commit and the row's insert are one step here, as one COMMIT is in
//! PostgreSQL, so "an insert that meets the other's uncommitted row waits for it" needs no model:
//! whichever of the commit row and an abort row comes first is the decision, and the other is
//! refused or does nothing.

use std::collections::BTreeMap;

use treaty_commit_protocol::transport::{DecisionWrite, LinkError, StoredDecision, StoredOutcome};
use treaty_types::{CoordinatorId, Gid, ShardName};

use crate::participants::{BranchState, Cluster};

/// One row: the outcome and, for a commit row, the shards to commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub outcome: StoredOutcome,
    pub participants: Vec<ShardName>,
    pub decided_at_ms: u64,
}

/// Every decision shard's rows, keyed by GID (the GID names its shard).
pub type Rows = BTreeMap<String, Row>;

fn on_this_shard(shard: &ShardName, gid: &Gid) -> Result<(), LinkError> {
    match gid.decision_shard() {
        Some(own) if own == shard => Ok(()),
        _ => Err(LinkError::Invalid(format!(
            "{gid} does not keep its decision on {shard}"
        ))),
    }
}

impl Cluster {
    /// The commit row of `gid` did commit.
    pub fn committed_by_row(&self, gid: &str) -> bool {
        self.rows()
            .get(gid)
            .is_some_and(|row| row.outcome == StoredOutcome::Commit)
    }

    /// `CommitDecision`: the commit row inserted in the decision branch, committed with it.
    pub(crate) fn commit_decision(
        &self,
        shard: &ShardName,
        gid: &Gid,
        participants: &[ShardName],
        standalone: bool,
    ) -> Result<DecisionWrite, LinkError> {
        on_this_shard(shard, gid)?;
        let text = gid.as_str();
        let fails = !standalone && self.commit_fails(shard, text);
        let now = self.trace.now_ms();
        let row = Row {
            outcome: StoredOutcome::Commit,
            participants: participants.to_vec(),
            decided_at_ms: now,
        };
        if standalone {
            let mut rows = self.rows();
            if rows.contains_key(text) {
                return Ok(DecisionWrite::NotCommitted {
                    message: format!("{gid} already has a decision row"),
                });
            }
            rows.insert(text.to_owned(), row);
            self.trace
                .record(format!("{shard}: commit row of {gid} inserted (standalone)"));
            return Ok(DecisionWrite::Committed);
        }
        self.with_branch(shard, text, |branch, _| {
            let branch = match branch {
                Some(branch) if branch.state == BranchState::Active => branch,
                Some(branch) if branch.lost => {
                    return Err(LinkError::BranchLost(format!("{gid}: the participant restarted")));
                }
                Some(branch) => return Err(LinkError::Refused(format!("{gid} is {:?}", branch.state))),
                None => return Err(LinkError::NotFound(format!("no branch {gid}"))),
            };
            let mut rows = self.rows();
            if rows.contains_key(text) {
                drop(rows);
                self.finish(
                    shard,
                    text,
                    branch,
                    BranchState::Aborted,
                    "decision insert met an abort row, rolled back",
                );
                return Ok(DecisionWrite::NotCommitted {
                    message: format!("{gid} was concluded aborted first"),
                });
            }
            if fails {
                drop(rows);
                self.finish(
                    shard,
                    text,
                    branch,
                    BranchState::Aborted,
                    "COMMIT with decision row failed, rolled back",
                );
                return Ok(DecisionWrite::NotCommitted {
                    message: "SQLSTATE 40001: could not serialize".into(),
                });
            }
            rows.insert(text.to_owned(), row);
            drop(rows);
            self.finish(
                shard,
                text,
                branch,
                BranchState::Committed,
                "COMMIT with its commit row (the decision)",
            );
            Ok(DecisionWrite::Committed)
        })
    }

    /// `ReadDecisions`: with `conclude_abort`, an abort row for every GID without one first.
    pub(crate) fn read_decisions(
        &self,
        shard: &ShardName,
        gids: &[Gid],
        conclude_abort: bool,
    ) -> Result<Vec<StoredDecision>, LinkError> {
        for gid in gids {
            on_this_shard(shard, gid)?;
        }
        let now = self.trace.now_ms();
        let mut rows = self.rows();
        Ok(gids
            .iter()
            .map(|gid| {
                if conclude_abort && !rows.contains_key(gid.as_str()) {
                    rows.insert(
                        gid.to_string(),
                        Row {
                            outcome: StoredOutcome::Abort,
                            participants: Vec::new(),
                            decided_at_ms: now,
                        },
                    );
                    self.trace
                        .record(format!("{shard}: abort row of {gid} inserted (concluded)"));
                }
                let row = rows.get(gid.as_str());
                StoredDecision {
                    gid: gid.clone(),
                    outcome: row.map(|row| row.outcome),
                    participants: row.map(|row| row.participants.clone()).unwrap_or_default(),
                    decided_at_ms: row.map_or(0, |row| row.decided_at_ms),
                }
            })
            .collect())
    }

    /// `ListDecisions`: commit rows kept on `shard`.
    pub(crate) fn list_decisions(
        &self,
        shard: &ShardName,
        coordinator: Option<&CoordinatorId>,
    ) -> Vec<StoredDecision> {
        self.rows()
            .iter()
            .filter(|(_, row)| row.outcome == StoredOutcome::Commit)
            .filter_map(|(text, row)| Some((Gid::parse(text).ok()?, row)))
            .filter(|(gid, _)| gid.decision_shard() == Some(shard))
            .filter(|(gid, _)| coordinator.is_none_or(|id| gid.coordinator() == id))
            .map(|(gid, row)| StoredDecision {
                gid,
                outcome: Some(row.outcome),
                participants: row.participants.clone(),
                decided_at_ms: row.decided_at_ms,
            })
            .collect()
    }

    /// `ForgetDecisions`: commit rows only; every branch of each must have committed.
    pub(crate) fn forget_decisions(&self, shard: &ShardName, gids: &[Gid]) -> Result<u64, LinkError> {
        let snapshot = self.snapshot();
        let mut rows = self.rows();
        let mut deleted = 0;
        for gid in gids {
            on_this_shard(shard, gid)?;
            let Some(row) = rows.get(gid.as_str()) else {
                continue;
            };
            if row.outcome != StoredOutcome::Commit {
                continue;
            }
            let unfinished: Vec<&ShardName> = row
                .participants
                .iter()
                .filter(|s| {
                    snapshot
                        .get(*s)
                        .and_then(|branches| branches.get(gid.as_str()))
                        .is_some_and(|b| b.state == BranchState::Prepared)
                })
                .collect();
            if !unfinished.is_empty() {
                self.report_violation(format!(
                    "the commit row of {gid} was forgotten while {unfinished:?} still hold it prepared"
                ));
            }
            rows.remove(gid.as_str());
            deleted += 1;
        }
        Ok(deleted)
    }
}
