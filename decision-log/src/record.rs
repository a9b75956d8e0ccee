//! The record frame (`magic | length | crc32 | type | payload`) and the hand-written encoding of each
//! record type; the exact layout is in the crate documentation.

use std::fmt;

use crate::{CommitRecord, HeuristicDecision, HeuristicRecord, MAX_RECORD_BODY_BYTES, PreCommitRecord};

/// The bytes "TRDL" read as a little-endian u32.
pub(crate) const MAGIC: u32 = 0x4C44_5254;
pub(crate) const FRAME_HEADER_LEN: usize = 12;
pub(crate) const FORMAT_VERSION: u32 = 1;

const TYPE_HEADER: u8 = 1;
const TYPE_TXIDS_RESERVED: u8 = 2;
const TYPE_COMMIT: u8 = 3;
const TYPE_END: u8 = 4;
const TYPE_HEURISTIC: u8 = 5;
const TYPE_PRE_COMMIT: u8 = 6;
const TYPE_INCARNATION: u8 = 7;

const HEURISTIC_COMMIT: u8 = 1;
const HEURISTIC_ABORT: u8 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Record {
    Header {
        coordinator_id: String,
        format_version: u32,
    },
    TxidsReserved {
        up_to: u64,
    },
    Commit(CommitRecord),
    End {
        txid: u64,
    },
    Heuristic(HeuristicRecord),
    PreCommit(PreCommitRecord),
    Incarnation {
        number: u64,
    },
}

impl Record {
    /// The whole frame's size, computed without encoding (to reject oversized records up front).
    pub(crate) fn encoded_len(&self) -> usize {
        let payload = match self {
            Record::Header { coordinator_id, .. } => 4 + string_len(coordinator_id),
            Record::TxidsReserved { .. } | Record::End { .. } | Record::Incarnation { .. } => 8,
            Record::Commit(commit) => {
                8 + 8 + string_len(&commit.gid) + participants_len(&commit.participants)
            }
            Record::PreCommit(pre_commit) => {
                8 + 8 + string_len(&pre_commit.gid) + participants_len(&pre_commit.participants)
            }
            Record::Heuristic(heuristic) => {
                8 + 8
                    + 1
                    + string_len(&heuristic.gid)
                    + string_len(&heuristic.operator)
                    + string_len(&heuristic.reason)
                    + 4
                    + heuristic
                        .participants
                        .iter()
                        .map(|p| string_len(p))
                        .sum::<usize>()
            }
        };
        FRAME_HEADER_LEN + 1 + payload
    }

    /// Whether this record fits in one frame; encoding assumes it does.
    pub(crate) fn check_size(&self) -> Result<(), crate::LogError> {
        let bytes = self.encoded_len();
        if bytes - FRAME_HEADER_LEN <= MAX_RECORD_BODY_BYTES as usize {
            return Ok(());
        }
        let what = match self {
            Record::Header { .. } => "header",
            Record::TxidsReserved { .. } => "txid reservation",
            Record::Commit(_) => "commit",
            Record::End { .. } => "end",
            Record::Heuristic(_) => "heuristic decision",
            Record::PreCommit(_) => "pre-commit",
            Record::Incarnation { .. } => "incarnation",
        };
        Err(crate::LogError::RecordTooLarge {
            what,
            bytes,
            limit: MAX_RECORD_BODY_BYTES,
        })
    }

    /// Appends one frame to `buf`; the only allocation is `buf` growing.
    pub(crate) fn encode(&self, buf: &mut Vec<u8>) {
        match self {
            Record::Header {
                coordinator_id,
                format_version,
            } => encode_header(coordinator_id, *format_version, buf),
            Record::TxidsReserved { up_to } => {
                encode_frame(buf, TYPE_TXIDS_RESERVED, |buf| put_u64(buf, *up_to))
            }
            Record::Commit(commit) => encode_commit(commit, buf),
            Record::End { txid } => encode_frame(buf, TYPE_END, |buf| put_u64(buf, *txid)),
            Record::Heuristic(heuristic) => encode_heuristic(heuristic, buf),
            Record::PreCommit(pre_commit) => encode_pre_commit(pre_commit, buf),
            Record::Incarnation { number } => {
                encode_frame(buf, TYPE_INCARNATION, |buf| put_u64(buf, *number))
            }
        }
    }
}

pub(crate) fn encode_header(coordinator_id: &str, format_version: u32, buf: &mut Vec<u8>) {
    encode_frame(buf, TYPE_HEADER, |buf| {
        put_u32(buf, format_version);
        put_str(buf, coordinator_id);
    });
}

/// Encodes a borrowed commit, so compaction writes what the state holds without cloning it.
pub(crate) fn encode_commit(commit: &CommitRecord, buf: &mut Vec<u8>) {
    encode_frame(buf, TYPE_COMMIT, |buf| {
        put_u64(buf, commit.txid);
        put_u64(buf, commit.decided_at_ms);
        put_str(buf, &commit.gid);
        put_u32(buf, commit.participants.len() as u32);
        for participant in &commit.participants {
            put_str(buf, participant);
        }
    });
}

/// Encodes a borrowed pre-commit record (compaction writes what the state holds); the layout of a
/// commit record under its own type.
pub(crate) fn encode_pre_commit(pre_commit: &PreCommitRecord, buf: &mut Vec<u8>) {
    encode_frame(buf, TYPE_PRE_COMMIT, |buf| {
        put_u64(buf, pre_commit.txid);
        put_u64(buf, pre_commit.at_ms);
        put_str(buf, &pre_commit.gid);
        put_u32(buf, pre_commit.participants.len() as u32);
        for participant in &pre_commit.participants {
            put_str(buf, participant);
        }
    });
}

/// Encodes a borrowed heuristic decision (compaction writes what the state holds).
pub(crate) fn encode_heuristic(heuristic: &HeuristicRecord, buf: &mut Vec<u8>) {
    encode_frame(buf, TYPE_HEURISTIC, |buf| {
        put_u64(buf, heuristic.txid);
        put_u64(buf, heuristic.decided_at_ms);
        buf.push(match heuristic.decision {
            HeuristicDecision::Commit => HEURISTIC_COMMIT,
            HeuristicDecision::Abort => HEURISTIC_ABORT,
        });
        put_str(buf, &heuristic.gid);
        put_str(buf, &heuristic.operator);
        put_str(buf, &heuristic.reason);
        put_u32(buf, heuristic.participants.len() as u32);
        for participant in &heuristic.participants {
            put_str(buf, participant);
        }
    });
}

/// Appends a frame whose payload `write_payload` appends, then fills in the length and checksum.
fn encode_frame(buf: &mut Vec<u8>, type_tag: u8, write_payload: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0; FRAME_HEADER_LEN]);
    buf.push(type_tag);
    write_payload(buf);
    let body = &buf[start + FRAME_HEADER_LEN..];
    debug_assert!(
        body.len() <= MAX_RECORD_BODY_BYTES as usize,
        "check_size was skipped"
    );
    let length = body.len() as u32;
    let crc = crc32fast::hash(body);
    buf[start..start + 4].copy_from_slice(&MAGIC.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&length.to_le_bytes());
    buf[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
}

fn string_len(s: &str) -> usize {
    4 + s.len()
}

/// A participant count and the participants' names.
fn participants_len(participants: &[String]) -> usize {
    4 + participants.iter().map(|p| string_len(p)).sum::<usize>()
}

fn put_u32(buf: &mut Vec<u8>, value: u32) {
    buf.extend_from_slice(&value.to_le_bytes());
}

fn put_u64(buf: &mut Vec<u8>, value: u64) {
    buf.extend_from_slice(&value.to_le_bytes());
}

fn put_str(buf: &mut Vec<u8>, value: &str) {
    put_u32(buf, value.len() as u32);
    buf.extend_from_slice(value.as_bytes());
}

/// Why the bytes at some offset are not a good record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FrameError {
    ShortHeader {
        available: usize,
    },
    BadMagic {
        found: u32,
    },
    BadLength {
        length: u32,
    },
    PastEnd {
        length: u32,
        available: usize,
    },
    Checksum {
        stored: u32,
        computed: u32,
    },
    /// A checksummed record this build does not know: a newer format, never skipped silently.
    UnknownType {
        type_tag: u8,
    },
    Payload {
        type_tag: u8,
        problem: &'static str,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::ShortHeader { available } => {
                write!(f, "only {available} bytes left, fewer than a record header")
            }
            FrameError::BadMagic { found } => write!(f, "bad magic {found:#010x}"),
            FrameError::BadLength { length } => {
                write!(f, "record length {length} outside 1..={MAX_RECORD_BODY_BYTES}")
            }
            FrameError::PastEnd { length, available } => {
                write!(
                    f,
                    "record length {length} runs past the end of the file ({available} bytes left)"
                )
            }
            FrameError::Checksum { stored, computed } => {
                write!(
                    f,
                    "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
                )
            }
            FrameError::UnknownType { type_tag } => write!(f, "unknown record type {type_tag}"),
            FrameError::Payload { type_tag, problem } => {
                write!(f, "undecodable payload of record type {type_tag}: {problem}")
            }
        }
    }
}

/// Decodes the frame at the start of `bytes`, returning the record and the frame's length.
pub(crate) fn decode_frame(bytes: &[u8]) -> Result<(Record, usize), FrameError> {
    let header = bytes.get(..FRAME_HEADER_LEN).ok_or(FrameError::ShortHeader {
        available: bytes.len(),
    })?;
    let field = |at: usize| u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
    let (magic, length, stored) = (field(0), field(4), field(8));
    if magic != MAGIC {
        return Err(FrameError::BadMagic { found: magic });
    }
    if length == 0 || length > MAX_RECORD_BODY_BYTES {
        return Err(FrameError::BadLength { length });
    }
    let frame_len = FRAME_HEADER_LEN + length as usize;
    let body = bytes
        .get(FRAME_HEADER_LEN..frame_len)
        .ok_or(FrameError::PastEnd {
            length,
            available: bytes.len() - FRAME_HEADER_LEN,
        })?;
    let computed = crc32fast::hash(body);
    if computed != stored {
        return Err(FrameError::Checksum { stored, computed });
    }
    let type_tag = body[0];
    let mut reader = Reader {
        rest: &body[1..],
        failed: None,
    };
    let record = match type_tag {
        TYPE_HEADER => Record::Header {
            format_version: reader.u32(),
            coordinator_id: reader.string(),
        },
        TYPE_TXIDS_RESERVED => Record::TxidsReserved { up_to: reader.u64() },
        TYPE_COMMIT => Record::Commit(decode_commit(&mut reader)),
        TYPE_END => Record::End { txid: reader.u64() },
        TYPE_HEURISTIC => Record::Heuristic(decode_heuristic(&mut reader)),
        TYPE_PRE_COMMIT => Record::PreCommit(decode_pre_commit(&mut reader)),
        TYPE_INCARNATION => Record::Incarnation { number: reader.u64() },
        other => return Err(FrameError::UnknownType { type_tag: other }),
    };
    reader
        .finish()
        .map_err(|problem| FrameError::Payload { type_tag, problem })?;
    Ok((record, frame_len))
}

fn decode_commit(reader: &mut Reader<'_>) -> CommitRecord {
    let txid = reader.u64();
    let decided_at_ms = reader.u64();
    let gid = reader.string();
    let participants = decode_participants(reader);
    CommitRecord {
        txid,
        gid,
        participants,
        decided_at_ms,
    }
}

fn decode_pre_commit(reader: &mut Reader<'_>) -> PreCommitRecord {
    let txid = reader.u64();
    let at_ms = reader.u64();
    let gid = reader.string();
    let participants = decode_participants(reader);
    PreCommitRecord {
        txid,
        gid,
        participants,
        at_ms,
    }
}

fn decode_heuristic(reader: &mut Reader<'_>) -> HeuristicRecord {
    let txid = reader.u64();
    let decided_at_ms = reader.u64();
    let decision = match reader.u8() {
        HEURISTIC_COMMIT => HeuristicDecision::Commit,
        HEURISTIC_ABORT => HeuristicDecision::Abort,
        _ => {
            // A checksummed record with a decision this build does not know is damage, not a guess.
            reader.failed.get_or_insert("unknown heuristic decision");
            HeuristicDecision::Abort
        }
    };
    let gid = reader.string();
    let operator = reader.string();
    let reason = reader.string();
    let participants = decode_participants(reader);
    HeuristicRecord {
        txid,
        gid,
        decision,
        participants,
        operator,
        reason,
        decided_at_ms,
    }
}

fn decode_participants(reader: &mut Reader<'_>) -> Vec<String> {
    let count = reader.u32() as usize;
    // A corrupt count must not allocate: each participant takes at least 4 bytes of what is left.
    let mut participants = Vec::with_capacity(count.min(reader.rest.len() / 4));
    for _ in 0..count {
        if reader.failed.is_some() {
            break;
        }
        participants.push(reader.string());
    }
    participants
}

/// Reads fields from a checksummed payload; the first problem sticks and is reported by `finish`,
/// which keeps the decoding code straight-line.
struct Reader<'a> {
    rest: &'a [u8],
    failed: Option<&'static str>,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        if self.failed.is_some() {
            return &[];
        }
        match self.rest.split_at_checked(n) {
            Some((taken, rest)) => {
                self.rest = rest;
                taken
            }
            None => {
                self.failed = Some("a field runs past the end of the record");
                &[]
            }
        }
    }

    fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    fn u32(&mut self) -> u32 {
        self.take(4).try_into().map(u32::from_le_bytes).unwrap_or(0)
    }

    fn u64(&mut self) -> u64 {
        self.take(8).try_into().map(u64::from_le_bytes).unwrap_or(0)
    }

    fn string(&mut self) -> String {
        let len = self.u32() as usize;
        let bytes = self.take(len);
        match std::str::from_utf8(bytes) {
            Ok(s) => s.to_owned(),
            Err(_) => {
                self.failed.get_or_insert("a string is not UTF-8");
                String::new()
            }
        }
    }

    fn finish(self) -> Result<(), &'static str> {
        match self.failed {
            Some(problem) => Err(problem),
            None if !self.rest.is_empty() => Err("trailing bytes after the last field"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_commit(txid: u64) -> CommitRecord {
        CommitRecord {
            txid,
            gid: format!("treaty:c1:{txid}"),
            participants: vec!["shard-a".into(), "shard-b".into(), "ünïcode".into()],
            decided_at_ms: 1_700_000_000_000 + txid,
        }
    }

    fn every_kind() -> Vec<Record> {
        vec![
            Record::Header {
                coordinator_id: "c0000beef".into(),
                format_version: FORMAT_VERSION,
            },
            Record::TxidsReserved { up_to: u64::MAX },
            Record::Commit(sample_commit(7)),
            Record::Commit(CommitRecord {
                txid: 0,
                gid: String::new(),
                participants: vec![],
                decided_at_ms: 0,
            }),
            Record::End { txid: 42 },
            Record::Heuristic(sample_heuristic(9, HeuristicDecision::Abort)),
            Record::Heuristic(sample_heuristic(10, HeuristicDecision::Commit)),
            Record::PreCommit(PreCommitRecord {
                txid: 11,
                gid: "treaty:c1:11".into(),
                participants: vec!["shard-a".into(), "ünïcode".into()],
                at_ms: 1_700_000_000_011,
            }),
            Record::Incarnation { number: u64::MAX },
        ]
    }

    fn sample_heuristic(txid: u64, decision: HeuristicDecision) -> HeuristicRecord {
        HeuristicRecord {
            txid,
            gid: format!("treaty:c1:{txid}"),
            decision,
            participants: vec!["shard-a".into(), "shard-b".into()],
            operator: "alice".into(),
            reason: "coordinator host lost; ticket ÜNI-42".into(),
            decided_at_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn heuristic_payload_layout_is_as_documented() {
        let mut buf = Vec::new();
        Record::Heuristic(sample_heuristic(3, HeuristicDecision::Commit)).encode(&mut buf);
        assert_eq!(buf[12], TYPE_HEURISTIC);
        assert_eq!(u64::from_le_bytes(buf[13..21].try_into().unwrap()), 3);
        assert_eq!(
            u64::from_le_bytes(buf[21..29].try_into().unwrap()),
            1_700_000_000_000
        );
        assert_eq!(buf[29], HEURISTIC_COMMIT);
        assert_eq!(u32::from_le_bytes(buf[30..34].try_into().unwrap()), 11);
        assert_eq!(&buf[34..45], b"treaty:c1:3");
    }

    #[test]
    fn pre_commit_and_incarnation_payload_layouts_are_as_documented() {
        let mut buf = Vec::new();
        Record::PreCommit(PreCommitRecord {
            txid: 3,
            gid: "treaty:c1:3".into(),
            participants: vec!["s0".into()],
            at_ms: 1_700_000_000_000,
        })
        .encode(&mut buf);
        assert_eq!(buf[12], TYPE_PRE_COMMIT);
        assert_eq!(u64::from_le_bytes(buf[13..21].try_into().unwrap()), 3);
        assert_eq!(
            u64::from_le_bytes(buf[21..29].try_into().unwrap()),
            1_700_000_000_000
        );
        assert_eq!(u32::from_le_bytes(buf[29..33].try_into().unwrap()), 11);
        assert_eq!(&buf[33..44], b"treaty:c1:3");
        assert_eq!(u32::from_le_bytes(buf[44..48].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(buf[48..52].try_into().unwrap()), 2);
        assert_eq!(&buf[52..], b"s0");

        let mut buf = Vec::new();
        Record::Incarnation { number: 9 }.encode(&mut buf);
        assert_eq!(buf.len(), 21);
        assert_eq!(buf[12], TYPE_INCARNATION);
        assert_eq!(u64::from_le_bytes(buf[13..21].try_into().unwrap()), 9);
    }

    #[test]
    fn a_heuristic_with_an_unknown_decision_is_undecodable() {
        let mut buf = Vec::new();
        Record::Heuristic(sample_heuristic(3, HeuristicDecision::Abort)).encode(&mut buf);
        let mut payload = buf[13..].to_vec();
        payload[16] = 7;
        assert!(matches!(
            decode_frame(&frame(TYPE_HEURISTIC, &payload)),
            Err(FrameError::Payload {
                type_tag: TYPE_HEURISTIC,
                problem: "unknown heuristic decision"
            })
        ));
    }

    #[test]
    fn every_record_type_round_trips_and_encoded_len_is_exact() {
        for record in every_kind() {
            let mut buf = vec![0xAA]; // encoding appends, it must not assume an empty buffer
            record.encode(&mut buf);
            assert_eq!(buf.len() - 1, record.encoded_len(), "{record:?}");
            let (decoded, len) = decode_frame(&buf[1..]).unwrap();
            assert_eq!(decoded, record);
            assert_eq!(len, buf.len() - 1);
        }
    }

    #[test]
    fn frame_layout_is_magic_length_crc_then_body() {
        let mut buf = Vec::new();
        Record::End { txid: 5 }.encode(&mut buf);
        assert_eq!(&buf[0..4], b"TRDL");
        assert_eq!(u32::from_le_bytes(buf[4..8].try_into().unwrap()), 9);
        assert_eq!(
            u32::from_le_bytes(buf[8..12].try_into().unwrap()),
            crc32fast::hash(&buf[12..])
        );
        assert_eq!(buf[12], TYPE_END);
        assert_eq!(u64::from_le_bytes(buf[13..21].try_into().unwrap()), 5);
    }

    fn frame(type_tag: u8, payload: &[u8]) -> Vec<u8> {
        let mut body = vec![type_tag];
        body.extend_from_slice(payload);
        let mut buf = MAGIC.to_le_bytes().to_vec();
        buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
        buf.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        buf.extend_from_slice(&body);
        buf
    }

    #[test]
    fn unknown_type_with_valid_checksum_is_named_not_skipped() {
        assert_eq!(
            decode_frame(&frame(9, &[1, 2, 3])).unwrap_err(),
            FrameError::UnknownType { type_tag: 9 }
        );
    }

    #[test]
    fn huge_counts_and_lengths_fail_without_allocating() {
        let mut payload = Vec::new();
        payload.extend_from_slice(&1u64.to_le_bytes());
        payload.extend_from_slice(&2u64.to_le_bytes());
        payload.extend_from_slice(&0u32.to_le_bytes()); // empty gid
        payload.extend_from_slice(&u32::MAX.to_le_bytes()); // participant count
        assert!(matches!(
            decode_frame(&frame(TYPE_COMMIT, &payload)),
            Err(FrameError::Payload {
                type_tag: TYPE_COMMIT,
                ..
            })
        ));
        let mut header = MAGIC.to_le_bytes().to_vec();
        header.extend_from_slice(&u32::MAX.to_le_bytes());
        header.extend_from_slice(&[0; 8]);
        assert_eq!(
            decode_frame(&header).unwrap_err(),
            FrameError::BadLength { length: u32::MAX }
        );
    }

    #[test]
    fn trailing_bytes_and_bad_utf8_are_undecodable() {
        let mut end = 3u64.to_le_bytes().to_vec();
        end.push(0);
        assert!(matches!(
            decode_frame(&frame(TYPE_END, &end)),
            Err(FrameError::Payload { .. })
        ));
        let mut header = FORMAT_VERSION.to_le_bytes().to_vec();
        header.extend_from_slice(&2u32.to_le_bytes());
        header.extend_from_slice(&[0xff, 0xfe]);
        assert!(matches!(
            decode_frame(&frame(TYPE_HEADER, &header)),
            Err(FrameError::Payload { .. })
        ));
    }

    #[test]
    fn oversized_records_are_refused_before_encoding() {
        let mut commit = sample_commit(1);
        commit.gid = "g".repeat(MAX_RECORD_BODY_BYTES as usize);
        let error = Record::Commit(commit).check_size().unwrap_err();
        assert!(matches!(
            error,
            crate::LogError::RecordTooLarge { what: "commit", .. }
        ));
        assert!(Record::Commit(sample_commit(1)).check_size().is_ok());
    }
}
