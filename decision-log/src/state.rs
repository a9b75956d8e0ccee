//! The live state of a log: the header, the txid reservation and the unfinished commits. Replay builds it,
//! the writer keeps it current, and compaction writes exactly it.

use std::collections::HashMap;

use crate::CommitRecord;
use crate::record::{FORMAT_VERSION, Record, encode_commit, encode_header};

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
            }
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

    pub(crate) fn is_unfinished(&self, txid: u64) -> bool {
        self.unfinished.contains_key(&txid)
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
        for commit in self.unfinished_in_order() {
            encode_commit(commit, buf);
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
