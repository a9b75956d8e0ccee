//! The live state of a log: the header, the txid reservation, the highest incarnation, the
//! unfinished commits, the live 3PC pre-commit records and the heuristic decisions of unfinished
//! transactions. Replay builds it, the writer keeps it current, and compaction writes exactly it.

use std::collections::HashMap;

use crate::record::{
    FORMAT_VERSION, Record, encode_commit, encode_header, encode_heuristic, encode_pre_commit,
};
use crate::{CommitRecord, HeuristicRecord, PreCommitRecord};

/// A header record naming another coordinator than the log already belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HeaderConflict {
    pub(crate) logged: String,
    pub(crate) requested: String,
}

#[derive(Debug, Default)]
pub(crate) struct LiveState {
    pub(crate) coordinator_id: Option<String>,
    /// Highest reservation, raised to every committed txid so a restart never reuses one.
    pub(crate) txids_reserved_up_to: u64,
    unfinished: HashMap<u64, Unfinished>,
    /// Operators' decisions, kept (like commits) until the transaction's end record.
    heuristics: HashMap<u64, (u64, HeuristicRecord)>,
    /// 3PC pre-commit records without a commit or end record yet (a commit decision supersedes one).
    pre_commits: HashMap<u64, (u64, PreCommitRecord)>,
    /// Highest coordinator incarnation logged.
    pub(crate) incarnation: u64,
    next_sequence: u64,
}

#[derive(Debug)]
struct Unfinished {
    /// Position in log order, so replay and compaction keep the order decisions were made in.
    sequence: u64,
    record: CommitRecord,
}

impl LiveState {
    pub(crate) fn apply(&mut self, record: Record) -> Result<(), HeaderConflict> {
        match record {
            Record::Header { coordinator_id, .. } => match &self.coordinator_id {
                Some(logged) if *logged != coordinator_id => {
                    return Err(HeaderConflict {
                        logged: logged.clone(),
                        requested: coordinator_id,
                    });
                }
                Some(_) => {}
                None => self.coordinator_id = Some(coordinator_id),
            },
            Record::TxidsReserved { up_to } => {
                self.txids_reserved_up_to = self.txids_reserved_up_to.max(up_to);
            }
            Record::Commit(commit) => {
                self.txids_reserved_up_to = self.txids_reserved_up_to.max(commit.txid);
                let sequence = self.next_sequence;
                // The commit decision supersedes the pre-commit record: the outcome is known.
                self.pre_commits.remove(&commit.txid);
                // A duplicate decision for the same txid keeps the first, which holds its place in the order.
                self.unfinished.entry(commit.txid).or_insert_with(|| Unfinished {
                    sequence,
                    record: commit,
                });
                self.next_sequence += 1;
            }
            Record::End { txid } => {
                // An end for a txid the log does not hold (already ended, or compacted away) changes nothing.
                self.unfinished.remove(&txid);
                self.heuristics.remove(&txid);
                self.pre_commits.remove(&txid);
            }
            Record::Heuristic(heuristic) => {
                self.txids_reserved_up_to = self.txids_reserved_up_to.max(heuristic.txid);
                let sequence = self.next_sequence;
                self.next_sequence += 1;
                // A heuristic commit is a commit decision: recovery must re-drive it like one.
                if let Some(commit) = heuristic.as_commit() {
                    self.pre_commits.remove(&commit.txid);
                    self.unfinished.entry(commit.txid).or_insert(Unfinished {
                        sequence,
                        record: commit,
                    });
                }
                // The first decision for a txid stands, as for commits (the coordinator never logs two).
                self.heuristics
                    .entry(heuristic.txid)
                    .or_insert((sequence, heuristic));
            }
            Record::PreCommit(pre_commit) => {
                self.txids_reserved_up_to = self.txids_reserved_up_to.max(pre_commit.txid);
                let sequence = self.next_sequence;
                self.next_sequence += 1;
                // Written before the commit record: one that comes after a commit decision (never
                // written so) adds nothing to it. The first pre-commit for a txid stands.
                if !self.unfinished.contains_key(&pre_commit.txid) {
                    self.pre_commits
                        .entry(pre_commit.txid)
                        .or_insert((sequence, pre_commit));
                }
            }
            Record::Incarnation { number } => self.incarnation = self.incarnation.max(number),
        }
        Ok(())
    }

    /// Whether the header `coordinator_id` can be appended (`Ok(false)`: it is already there).
    pub(crate) fn header_needed(&self, coordinator_id: &str) -> Result<bool, HeaderConflict> {
        match &self.coordinator_id {
            None => Ok(true),
            Some(logged) if logged == coordinator_id => Ok(false),
            Some(logged) => Err(HeaderConflict {
                logged: logged.clone(),
                requested: coordinator_id.to_owned(),
            }),
        }
    }

    /// Whether the log holds a commit, a pre-commit or a heuristic decision for `txid` without an
    /// end record.
    pub(crate) fn is_unfinished(&self, txid: u64) -> bool {
        self.unfinished.contains_key(&txid)
            || self.heuristics.contains_key(&txid)
            || self.pre_commits.contains_key(&txid)
    }

    pub(crate) fn unfinished_count(&self) -> usize {
        self.unfinished.len()
    }

    fn unfinished_in_order(&self) -> Vec<&CommitRecord> {
        let mut entries: Vec<&Unfinished> = self.unfinished.values().collect();
        entries.sort_unstable_by_key(|entry| entry.sequence);
        entries.into_iter().map(|entry| &entry.record).collect()
    }

    pub(crate) fn unfinished_records(&self) -> Vec<CommitRecord> {
        self.unfinished_in_order().into_iter().cloned().collect()
    }

    fn heuristics_in_order(&self) -> Vec<&HeuristicRecord> {
        let mut entries: Vec<&(u64, HeuristicRecord)> = self.heuristics.values().collect();
        entries.sort_unstable_by_key(|(sequence, _)| *sequence);
        entries.into_iter().map(|(_, record)| record).collect()
    }

    pub(crate) fn heuristic_records(&self) -> Vec<HeuristicRecord> {
        self.heuristics_in_order().into_iter().cloned().collect()
    }

    fn pre_commits_in_order(&self) -> Vec<&PreCommitRecord> {
        let mut entries: Vec<&(u64, PreCommitRecord)> = self.pre_commits.values().collect();
        entries.sort_unstable_by_key(|(sequence, _)| *sequence);
        entries.into_iter().map(|(_, record)| record).collect()
    }

    pub(crate) fn pre_commit_records(&self) -> Vec<PreCommitRecord> {
        self.pre_commits_in_order().into_iter().cloned().collect()
    }

    /// Appends the records of a compacted log holding exactly this state.
    pub(crate) fn encode_compacted(&self, buf: &mut Vec<u8>) {
        if let Some(coordinator_id) = &self.coordinator_id {
            encode_header(coordinator_id, FORMAT_VERSION, buf);
        }
        if self.txids_reserved_up_to > 0 {
            Record::TxidsReserved {
                up_to: self.txids_reserved_up_to,
            }
            .encode(buf);
        }
        if self.incarnation > 0 {
            Record::Incarnation {
                number: self.incarnation,
            }
            .encode(buf);
        }
        for commit in self.unfinished_in_order() {
            encode_commit(commit, buf);
        }
        // Live pre-commits have no commit record (it would have superseded them), so their place
        // relative to the commits does not matter.
        for pre_commit in self.pre_commits_in_order() {
            encode_pre_commit(pre_commit, buf);
        }
        // After the commits: a heuristic commit's own commit entry then comes first on replay and
        // the heuristic adds only the note (the two carry the same decision).
        for heuristic in self.heuristics_in_order() {
            encode_heuristic(heuristic, buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::decode_frame;

    fn commit(txid: u64) -> Record {
        Record::Commit(CommitRecord {
            txid,
            gid: format!("g{txid}"),
            participants: vec!["a".into(), "b".into()],
            decided_at_ms: txid * 10,
        })
    }

    fn heuristic(txid: u64, decision: crate::HeuristicDecision) -> Record {
        Record::Heuristic(HeuristicRecord {
            txid,
            gid: format!("g{txid}"),
            decision,
            participants: vec!["a".into()],
            operator: "op".into(),
            reason: "why".into(),
            decided_at_ms: 5,
        })
    }

    #[test]
    fn a_heuristic_commit_is_an_unfinished_commit_and_both_kinds_last_until_the_end() {
        use crate::HeuristicDecision::{Abort, Commit};
        let mut state = LiveState::default();
        for record in [heuristic(7, Commit), heuristic(8, Abort), commit(9)] {
            state.apply(record).unwrap();
        }
        assert_eq!(txids(&state), vec![7, 9], "the heuristic abort is no commit");
        let heuristics: Vec<u64> = state.heuristic_records().iter().map(|h| h.txid).collect();
        assert_eq!(heuristics, vec![7, 8]);
        assert!(state.is_unfinished(8), "an end record for it must be written");
        assert_eq!(state.txids_reserved_up_to, 9);
        state.apply(Record::End { txid: 7 }).unwrap();
        state.apply(Record::End { txid: 8 }).unwrap();
        assert_eq!(txids(&state), vec![9]);
        assert!(state.heuristic_records().is_empty());
        assert!(!state.is_unfinished(8));
    }

    #[test]
    fn compaction_keeps_heuristics_of_unfinished_transactions() {
        use crate::HeuristicDecision::{Abort, Commit};
        let mut state = LiveState::default();
        for record in [
            commit(1),
            heuristic(2, Commit),
            heuristic(3, Abort),
            heuristic(4, Abort),
        ] {
            state.apply(record).unwrap();
        }
        state.apply(Record::End { txid: 4 }).unwrap();
        let mut buf = Vec::new();
        state.encode_compacted(&mut buf);
        let mut copy = LiveState::default();
        let mut rest = &buf[..];
        while !rest.is_empty() {
            let (record, len) = decode_frame(rest).unwrap();
            copy.apply(record).unwrap();
            rest = &rest[len..];
        }
        assert_eq!(copy.unfinished_records(), state.unfinished_records());
        assert_eq!(copy.heuristic_records(), state.heuristic_records());
        assert_eq!(txids(&copy), vec![1, 2]);
    }

    fn pre_commit(txid: u64) -> Record {
        Record::PreCommit(PreCommitRecord {
            txid,
            gid: format!("g{txid}"),
            participants: vec!["a".into(), "b".into()],
            at_ms: txid * 10,
        })
    }

    fn pre_committed(state: &LiveState) -> Vec<u64> {
        state.pre_commit_records().iter().map(|p| p.txid).collect()
    }

    #[test]
    fn a_pre_commit_lives_until_a_commit_or_end_supersedes_it_and_compaction_keeps_it() {
        use crate::HeuristicDecision::{Abort, Commit};
        let mut state = LiveState::default();
        for record in [
            pre_commit(1),
            pre_commit(2),
            pre_commit(3),
            pre_commit(4),
            pre_commit(5),
            commit(1),
            Record::End { txid: 2 },
            heuristic(3, Commit),
            heuristic(4, Abort),
            Record::Incarnation { number: 4 },
            Record::Incarnation { number: 2 },
        ] {
            state.apply(record).unwrap();
        }
        assert_eq!(
            pre_committed(&state),
            vec![4, 5],
            "a heuristic abort decides nothing for it"
        );
        assert!(state.is_unfinished(5), "an end record for it must be written");
        assert_eq!(state.txids_reserved_up_to, 5);
        assert_eq!(state.incarnation, 4);
        state.apply(pre_commit(1)).unwrap();
        assert_eq!(
            pre_committed(&state),
            vec![4, 5],
            "after its commit it adds nothing"
        );

        let mut buf = Vec::new();
        state.encode_compacted(&mut buf);
        let mut copy = LiveState::default();
        let mut rest = &buf[..];
        while !rest.is_empty() {
            let (record, len) = decode_frame(rest).unwrap();
            copy.apply(record).unwrap();
            rest = &rest[len..];
        }
        assert_eq!(copy.pre_commit_records(), state.pre_commit_records());
        assert_eq!(copy.unfinished_records(), state.unfinished_records());
        assert_eq!(copy.incarnation, 4);
    }

    fn txids(state: &LiveState) -> Vec<u64> {
        state.unfinished_records().iter().map(|c| c.txid).collect()
    }

    #[test]
    fn commits_minus_later_ends_in_log_order() {
        let mut state = LiveState::default();
        for record in [
            commit(5),
            commit(3),
            Record::End { txid: 5 },
            commit(9),
            Record::End { txid: 77 }, // unknown txid: ignored
            commit(1),
            Record::End { txid: 1 },
        ] {
            state.apply(record).unwrap();
        }
        assert_eq!(txids(&state), vec![3, 9]);
        assert_eq!(
            state.txids_reserved_up_to, 9,
            "raised to the highest committed txid, even an ended one"
        );
    }

    #[test]
    fn duplicate_commit_keeps_one_and_a_commit_after_its_end_is_unfinished_again() {
        let mut state = LiveState::default();
        for record in [commit(2), commit(4), commit(2)] {
            state.apply(record).unwrap();
        }
        assert_eq!(txids(&state), vec![2, 4]);
        state.apply(Record::End { txid: 2 }).unwrap();
        state.apply(commit(2)).unwrap();
        assert_eq!(txids(&state), vec![4, 2]);
    }

    #[test]
    fn reservation_is_the_maximum_seen_and_a_second_coordinator_id_conflicts() {
        let mut state = LiveState::default();
        let header = |id: &str| Record::Header {
            coordinator_id: id.into(),
            format_version: FORMAT_VERSION,
        };
        state.apply(header("c1")).unwrap();
        state.apply(header("c1")).unwrap();
        state.apply(Record::TxidsReserved { up_to: 100 }).unwrap();
        state.apply(Record::TxidsReserved { up_to: 50 }).unwrap();
        assert_eq!(state.txids_reserved_up_to, 100);
        assert_eq!(state.header_needed("c1"), Ok(false));
        assert!(state.apply(header("c2")).is_err());
        assert!(state.header_needed("c2").is_err());
        assert_eq!(state.coordinator_id.as_deref(), Some("c1"));
    }

    #[test]
    fn compacted_encoding_replays_to_the_same_state() {
        let mut state = LiveState::default();
        for record in [
            Record::Header {
                coordinator_id: "c7".into(),
                format_version: FORMAT_VERSION,
            },
            Record::TxidsReserved { up_to: 1000 },
            commit(10),
            commit(11),
            Record::End { txid: 10 },
            commit(12),
        ] {
            state.apply(record).unwrap();
        }
        let mut buf = Vec::new();
        state.encode_compacted(&mut buf);
        let mut copy = LiveState::default();
        let mut rest = &buf[..];
        let mut records = 0;
        while !rest.is_empty() {
            let (record, len) = decode_frame(rest).unwrap();
            copy.apply(record).unwrap();
            rest = &rest[len..];
            records += 1;
        }
        assert_eq!(records, 4, "header, reservation, two unfinished commits");
        assert_eq!(copy.coordinator_id.as_deref(), Some("c7"));
        assert_eq!(copy.txids_reserved_up_to, 1000);
        assert_eq!(copy.unfinished_records(), state.unfinished_records());
    }
}
