//! Replay of a log image: applies good records in order and finds, classifies and reports damage.
//!
//! A bad record (bad magic, insane length, length past the end, checksum mismatch, undecodable payload)
//! starts a damaged region. Replay scans forward for the next offset where a complete, checksummed record
//! starts: if there is one, the region is `CorruptRecord` and replay resumes there, because the records
//! after it may be durable commit decisions that must not be lost; if not, the rest is `TornTail`.

use std::path::Path;

use crate::record::{FORMAT_VERSION, FrameError, MAGIC, Record, decode_frame};
use crate::state::LiveState;
use crate::{Damage, DamageKind, LogError};

#[derive(Debug)]
pub(crate) struct Scan {
    pub(crate) state: LiveState,
    pub(crate) damage: Vec<Damage>,
    pub(crate) records: u64,
}

/// Replays `bytes`, the whole content of the log at `path` (named in errors only).
pub(crate) fn scan(bytes: &[u8], path: &Path) -> Result<Scan, LogError> {
    let mut state = LiveState::default();
    let frames = scan_frames(bytes, path, |record, _| apply(&mut state, record, path))?;
    Ok(Scan {
        state,
        damage: frames.damage,
        records: frames.records,
    })
}

/// What [`scan_frames`] found besides the records it handed on.
#[derive(Debug)]
pub(crate) struct Frames {
    pub(crate) damage: Vec<Damage>,
    pub(crate) records: u64,
}

/// Walks `bytes` frame by frame, handing every good record (with its offset) to `on_record` in log
/// order, and cutting or skipping damage. Replay applies the records to the live state; the property
/// tests (`proptests.rs`) collect them, so that what replay would apply is exactly what they check.
pub(crate) fn scan_frames(
    bytes: &[u8],
    path: &Path,
    on_record: impl FnMut(Record, usize) -> Result<(), LogError>,
) -> Result<Frames, LogError> {
    scan_frames_with(bytes, path, decode_frame, on_record)
}

/// [`scan_frames`] with the frame decoder given, so that the property tests can plant a faulty
/// decoder and show that their properties catch it.
pub(crate) fn scan_frames_with(
    bytes: &[u8],
    path: &Path,
    decode: impl Fn(&[u8]) -> Result<(Record, usize), FrameError>,
    mut on_record: impl FnMut(Record, usize) -> Result<(), LogError>,
) -> Result<Frames, LogError> {
    let mut frames = Frames {
        damage: Vec::new(),
        records: 0,
    };
    let mut offset = 0;
    while offset < bytes.len() {
        match decode(&bytes[offset..]) {
            Ok((record, len)) => {
                on_record(record, offset)?;
                frames.records += 1;
                offset += len;
            }
            Err(FrameError::UnknownType { type_tag }) => {
                return Err(LogError::UnknownRecordType {
                    path: path.to_owned(),
                    offset: offset as u64,
                    type_tag,
                });
            }
            Err(problem) => {
                let next = find_next_record(bytes, offset + 1);
                let (kind, end) = match next {
                    Some(next) => (DamageKind::CorruptRecord, next),
                    None => (DamageKind::TornTail, bytes.len()),
                };
                let damage = Damage {
                    kind,
                    offset: offset as u64,
                    length: (end - offset) as u64,
                    detail: format!("record at offset {offset}: {problem}"),
                };
                tracing::warn!(
                    path = %path.display(),
                    kind = ?damage.kind,
                    offset = damage.offset,
                    length = damage.length,
                    "decision log damage: {}",
                    damage.detail
                );
                frames.damage.push(damage);
                offset = end;
            }
        }
    }
    Ok(frames)
}

fn apply(state: &mut LiveState, record: Record, path: &Path) -> Result<(), LogError> {
    if let Record::Header { format_version, .. } = &record
        && *format_version != FORMAT_VERSION
    {
        return Err(LogError::UnsupportedVersion {
            path: path.to_owned(),
            found: *format_version,
            supported: FORMAT_VERSION,
        });
    }
    state
        .apply(record)
        .map_err(|conflict| LogError::ConflictingHeader {
            logged: conflict.logged,
            requested: conflict.requested,
        })
}

/// The first offset at or after `from` where a complete record with a valid checksum starts.
/// A checksummed record of unknown type counts: replay then stops on it with an error naming the type.
fn find_next_record(bytes: &[u8], from: usize) -> Option<usize> {
    let magic = MAGIC.to_le_bytes();
    let mut candidate = from;
    while let Some(found) = bytes
        .get(candidate..)?
        .windows(magic.len())
        .position(|w| w == magic)
    {
        let at = candidate + found;
        match decode_frame(&bytes[at..]) {
            Ok(_) | Err(FrameError::UnknownType { .. }) => return Some(at),
            Err(_) => candidate = at + 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CommitRecord;

    fn commit(txid: u64) -> Record {
        Record::Commit(CommitRecord {
            txid,
            gid: format!("treaty:c1:{txid}"),
            participants: vec!["shard-a".into(), "shard-b".into()],
            decided_at_ms: txid,
        })
    }

    /// A log of `n` commits; returns the bytes and each record's start offset.
    fn log_of_commits(n: u64) -> (Vec<u8>, Vec<usize>) {
        let mut bytes = Vec::new();
        let mut starts = Vec::new();
        for txid in 1..=n {
            starts.push(bytes.len());
            commit(txid).encode(&mut bytes);
        }
        (bytes, starts)
    }

    fn unfinished(scan: &Scan) -> Vec<u64> {
        scan.state.unfinished_records().iter().map(|c| c.txid).collect()
    }

    fn scan_ok(bytes: &[u8]) -> Scan {
        scan(bytes, Path::new("test.log")).unwrap()
    }

    #[test]
    fn clean_log_of_commits_and_ends_yields_the_unfinished_ones() {
        let mut bytes = Vec::new();
        for record in [
            commit(1),
            commit(2),
            Record::End { txid: 1 },
            commit(3),
            Record::End { txid: 3 },
        ] {
            record.encode(&mut bytes);
        }
        let scan = scan_ok(&bytes);
        assert_eq!(unfinished(&scan), vec![2]);
        assert_eq!(scan.records, 5);
        assert!(scan.damage.is_empty());
    }

    #[test]
    fn every_cut_of_the_last_record_is_a_torn_tail_keeping_the_rest() {
        let (bytes, starts) = log_of_commits(4);
        let last = starts[3];
        for cut in last + 1..bytes.len() {
            let scan = scan_ok(&bytes[..cut]);
            assert_eq!(unfinished(&scan), vec![1, 2, 3], "cut at {cut}");
            assert_eq!(scan.damage.len(), 1, "cut at {cut}");
            assert_eq!(scan.damage[0].kind, DamageKind::TornTail);
            assert_eq!(scan.damage[0].offset, last as u64);
            assert_eq!(scan.damage[0].length, (cut - last) as u64);
        }
    }

    #[test]
    fn a_flipped_byte_anywhere_in_a_middle_record_is_skipped_and_later_records_kept() {
        let (bytes, starts) = log_of_commits(5);
        let (k_start, k_end) = (starts[2], starts[3]);
        for at in k_start..k_end {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x40;
            let scan = scan_ok(&damaged);
            assert_eq!(unfinished(&scan), vec![1, 2, 4, 5], "flip at {at}");
            assert_eq!(scan.damage.len(), 1, "flip at {at}");
            let damage = &scan.damage[0];
            assert_eq!(damage.kind, DamageKind::CorruptRecord, "flip at {at}");
            assert_eq!(
                (damage.offset, damage.length),
                (k_start as u64, (k_end - k_start) as u64)
            );
        }
    }

    #[test]
    fn a_corrupt_length_field_is_skipped_by_resynchronising() {
        let (bytes, starts) = log_of_commits(5);
        for bad_length in [0u32, 3, 40_000, u32::MAX] {
            let mut damaged = bytes.clone();
            damaged[starts[1] + 4..starts[1] + 8].copy_from_slice(&bad_length.to_le_bytes());
            let scan = scan_ok(&damaged);
            assert_eq!(unfinished(&scan), vec![1, 3, 4, 5], "length {bad_length}");
            assert_eq!(scan.damage[0].kind, DamageKind::CorruptRecord);
            assert_eq!(scan.damage[0].offset, starts[1] as u64);
        }
    }

    #[test]
    fn garbage_after_the_last_record_is_a_torn_tail() {
        let (bytes, _) = log_of_commits(3);
        let mut random = Vec::new();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..1000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            random.push(x as u8);
        }
        for garbage in [vec![0u8; 4096], random, MAGIC.to_le_bytes().repeat(5)] {
            let mut damaged = bytes.clone();
            damaged.extend_from_slice(&garbage);
            let scan = scan_ok(&damaged);
            assert_eq!(unfinished(&scan), vec![1, 2, 3]);
            assert_eq!(scan.damage.len(), 1);
            assert_eq!(scan.damage[0].kind, DamageKind::TornTail);
            assert_eq!(scan.damage[0].offset, bytes.len() as u64);
            assert_eq!(scan.damage[0].length, garbage.len() as u64);
        }
    }

    #[test]
    fn a_record_of_unknown_type_fails_replay_naming_it() {
        let (mut bytes, _) = log_of_commits(2);
        let at = bytes.len();
        Record::End { txid: 1 }.encode(&mut bytes);
        bytes[at + 12] = 200;
        let crc = crc32fast::hash(&bytes[at + 12..]);
        bytes[at + 8..at + 12].copy_from_slice(&crc.to_le_bytes());
        let error = scan(&bytes, Path::new("test.log")).unwrap_err();
        assert!(
            matches!(error, LogError::UnknownRecordType { type_tag: 200, .. }),
            "{error}"
        );
        assert!(error.to_string().contains("newer Treaty"));
    }

    #[test]
    fn a_header_of_another_format_version_fails_replay() {
        let mut bytes = Vec::new();
        Record::Header {
            coordinator_id: "c1".into(),
            format_version: FORMAT_VERSION + 1,
        }
        .encode(&mut bytes);
        let error = scan(&bytes, Path::new("test.log")).unwrap_err();
        assert!(matches!(
            error,
            LogError::UnsupportedVersion {
                found: 2,
                supported: 1,
                ..
            }
        ));
    }
}
