//! Property tests of replay (issue 17, fuzzed inputs): whatever bytes the log file holds, replay
//! never panics and hands on only well-formed records; and a log the real encoder (and the real
//! writer thread) wrote, then damaged in any of the ways a disk or a crash damages files, replays
//! to records that were written, in their order, with the damage reported.
//!
//! Each property runs `PROPTEST_CASES` cases (default below, what CI runs); set it higher for a
//! longer search, e.g. `PROPTEST_CASES=100000 cargo test -p treaty-decision-log proptests`.

use std::io::Write;
use std::path::Path;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::Config as ProptestConfig;
use tempfile::TempDir;

use crate::record::{FORMAT_VERSION, FRAME_HEADER_LEN, FrameError, MAGIC, Record, decode_frame};
use crate::replay::{Frames, scan, scan_frames_with};
use crate::{
    CommitRecord, DecisionLog, HeuristicDecision, HeuristicRecord, LogError, LogOptions,
    MAX_RECORD_BODY_BYTES, PreCommitRecord,
};

/// Cases per property in `cargo test` (CI): together they take well under a few seconds.
const DEFAULT_CASES: u32 = 512;
/// The property that goes through the writer thread and the file system costs an fsync per
/// forced record, so it runs fewer cases.
const DEFAULT_CASES_ON_DISK: u32 = 48;

/// `PROPTEST_CASES` when set (more on demand), else `default`; printed so CI logs show the count.
fn config(property: &str, default: u32) -> ProptestConfig {
    ProptestConfig {
        cases: treaty_types::testing::property_cases(property, default),
        // A failure is minimized and printed; its counterexample becomes a plain unit test, so no
        // regression file is written into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ------------------------------------------------------------------------------------------------
// Generators
// ------------------------------------------------------------------------------------------------

/// Strings as the coordinator writes them (GIDs, shard names) and as operators type them.
fn text() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z0-9:@_-]{0,16}", "\\PC{0,8}"]
}

fn names() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(text(), 0..4)
}

/// Txids from a small range, so that ends, commits and pre-commits meet.
fn txid() -> impl Strategy<Value = u64> {
    prop_oneof![0..16u64, any::<u64>()]
}

fn commit() -> impl Strategy<Value = CommitRecord> {
    (txid(), text(), names(), any::<u64>()).prop_map(|(txid, gid, participants, decided_at_ms)| {
        CommitRecord {
            txid,
            gid,
            participants,
            decided_at_ms,
        }
    })
}

fn pre_commit() -> impl Strategy<Value = PreCommitRecord> {
    (txid(), text(), names(), any::<u64>()).prop_map(|(txid, gid, participants, at_ms)| PreCommitRecord {
        txid,
        gid,
        participants,
        at_ms,
    })
}

fn heuristic() -> impl Strategy<Value = HeuristicRecord> {
    (
        txid(),
        text(),
        any::<bool>(),
        names(),
        text(),
        text(),
        any::<u64>(),
    )
        .prop_map(
            |(txid, gid, commit, participants, operator, reason, decided_at_ms)| HeuristicRecord {
                txid,
                gid,
                decision: if commit {
                    HeuristicDecision::Commit
                } else {
                    HeuristicDecision::Abort
                },
                participants,
                operator,
                reason,
                decided_at_ms,
            },
        )
}

/// Any record but a header (a log holds one header, written first).
fn body_record() -> impl Strategy<Value = Record> {
    prop_oneof![
        any::<u64>().prop_map(|up_to| Record::TxidsReserved { up_to }),
        commit().prop_map(Record::Commit),
        txid().prop_map(|txid| Record::End { txid }),
        heuristic().prop_map(Record::Heuristic),
        pre_commit().prop_map(Record::PreCommit),
        any::<u64>().prop_map(|number| Record::Incarnation { number }),
    ]
}

/// A log as the coordinator writes it: maybe a header, then records.
fn written_log() -> impl Strategy<Value = Vec<Record>> {
    (
        prop::option::of(text()),
        prop::collection::vec(body_record(), 0..12),
    )
        .prop_map(|(header, body)| {
            let header = header.map(|coordinator_id| Record::Header {
                coordinator_id,
                format_version: FORMAT_VERSION,
            });
            header.into_iter().chain(body).collect()
        })
}

fn encode(records: &[Record]) -> (Vec<u8>, Vec<usize>) {
    let mut bytes = Vec::new();
    let mut starts = Vec::new();
    for record in records {
        starts.push(bytes.len());
        record.encode(&mut bytes);
    }
    (bytes, starts)
}

/// Lengths a damaged length field may hold: the edges of the valid range and anything.
fn length_field() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        1..64u32,
        Just(MAX_RECORD_BODY_BYTES),
        Just(MAX_RECORD_BODY_BYTES + 1),
        Just(u32::MAX),
        any::<u32>(),
    ]
}

/// Bytes that are not a record but look like the start of one: random bytes, the magic, and frame
/// headers with a plausible length and a checksum that does not match.
fn garbage() -> impl Strategy<Value = Vec<u8>> {
    let chunk = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..48),
        Just(MAGIC.to_le_bytes().to_vec()),
        (
            length_field(),
            any::<u32>(),
            prop::collection::vec(any::<u8>(), 0..32)
        )
            .prop_map(|(length, crc, body)| {
                let mut bytes = MAGIC.to_le_bytes().to_vec();
                bytes.extend_from_slice(&length.to_le_bytes());
                bytes.extend_from_slice(&crc.to_le_bytes());
                bytes.extend_from_slice(&body);
                bytes
            }),
    ];
    prop::collection::vec(chunk, 0..6).prop_map(|chunks| chunks.concat())
}

/// Arbitrary log images: garbage mixed with real frames, whole or with one byte changed, so that
/// the resynchronising scan is exercised and not only the first bad-magic check.
fn any_image() -> impl Strategy<Value = Vec<u8>> {
    let chunk = prop_oneof![
        2 => garbage(),
        2 => body_record().prop_map(|record| encode(&[record]).0),
        1 => (body_record(), any::<Index>(), 1..=255u8).prop_map(|(record, at, xor)| {
            let mut bytes = encode(&[record]).0;
            let at = at.index(bytes.len());
            bytes[at] ^= xor;
            bytes
        }),
    ];
    prop::collection::vec(chunk, 0..8).prop_map(|chunks| chunks.concat())
}

/// One way a disk or a crash damages a log file.
#[derive(Debug, Clone)]
enum Corruption {
    FlipBit {
        at: Index,
        bit: u8,
    },
    Truncate {
        at: Index,
    },
    AppendGarbage(Vec<u8>),
    /// A record's length field rewritten (the record picked among those written).
    SetLength {
        record: Index,
        length: u32,
    },
    Overwrite {
        at: Index,
        bytes: Vec<u8>,
    },
    InsertGarbage {
        at: Index,
        bytes: Vec<u8>,
    },
}

fn corruption() -> impl Strategy<Value = Corruption> {
    prop_oneof![
        (any::<Index>(), 0..8u8).prop_map(|(at, bit)| Corruption::FlipBit { at, bit }),
        any::<Index>().prop_map(|at| Corruption::Truncate { at }),
        garbage().prop_map(Corruption::AppendGarbage),
        (any::<Index>(), length_field())
            .prop_map(|(record, length)| Corruption::SetLength { record, length }),
        (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Corruption::Overwrite { at, bytes }),
        (any::<Index>(), garbage()).prop_map(|(at, bytes)| Corruption::InsertGarbage { at, bytes }),
    ]
}

fn corrupt(image: &mut Vec<u8>, starts: &[usize], corruption: &Corruption) {
    if image.is_empty() {
        if let Corruption::AppendGarbage(bytes) | Corruption::InsertGarbage { bytes, .. } = corruption {
            image.extend_from_slice(bytes);
        }
        return;
    }
    match corruption {
        Corruption::FlipBit { at, bit } => {
            let at = at.index(image.len());
            image[at] ^= 1 << bit;
        }
        Corruption::Truncate { at } => image.truncate(at.index(image.len())),
        Corruption::AppendGarbage(bytes) => image.extend_from_slice(bytes),
        Corruption::SetLength { record, length } => {
            if starts.is_empty() {
                return;
            }
            let field = starts[record.index(starts.len())] + 4;
            if field + 4 <= image.len() {
                image[field..field + 4].copy_from_slice(&length.to_le_bytes());
            }
        }
        Corruption::Overwrite { at, bytes } => {
            let at = at.index(image.len());
            let end = (at + bytes.len()).min(image.len());
            image[at..end].copy_from_slice(&bytes[..end - at]);
        }
        Corruption::InsertGarbage { at, bytes } => {
            let at = at.index(image.len() + 1);
            image.splice(at..at, bytes.iter().copied());
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Checks
// ------------------------------------------------------------------------------------------------

/// Every good record replay found, with its offset, and the rest of what it reported.
fn replay_frames(image: &[u8]) -> Result<(Vec<(usize, Record)>, Frames), LogError> {
    replay_frames_with(image, decode_frame)
}

/// [`replay_frames`] with the frame decoder given.
fn replay_frames_with(
    image: &[u8],
    decode: impl Fn(&[u8]) -> Result<(Record, usize), FrameError>,
) -> Result<(Vec<(usize, Record)>, Frames), LogError> {
    let mut records = Vec::new();
    let frames = scan_frames_with(image, Path::new("fuzzed.log"), decode, |record, offset| {
        records.push((offset, record));
        Ok(())
    })?;
    Ok((records, frames))
}

/// Good records and damaged regions tile the image exactly, each good record is exactly what the
/// encoder writes for it (so it is well-formed: checksummed, every field decoded, nothing left
/// over), and the counts agree.
fn check_well_formed(
    image: &[u8],
    records: &[(usize, Record)],
    frames: &Frames,
) -> Result<(), TestCaseError> {
    let mut regions: Vec<(usize, usize)> = records
        .iter()
        .map(|(offset, record)| (*offset, record.encoded_len()))
        .chain(
            frames
                .damage
                .iter()
                .map(|d| (d.offset as usize, d.length as usize)),
        )
        .collect();
    regions.sort_unstable();
    let mut covered = 0;
    for (offset, length) in regions {
        prop_assert_eq!(
            offset,
            covered,
            "regions must tile the image without gaps or overlaps"
        );
        prop_assert!(length > 0, "an empty region at {}", offset);
        covered = offset + length;
    }
    prop_assert_eq!(covered, image.len());
    prop_assert_eq!(frames.records, records.len() as u64);
    for (offset, record) in records {
        let mut encoded = Vec::new();
        record.encode(&mut encoded);
        prop_assert!(record.check_size().is_ok());
        prop_assert_eq!(
            &image[*offset..*offset + encoded.len()],
            &encoded[..],
            "the record at {} is not what the encoder writes for {:?}",
            offset,
            record
        );
    }
    Ok(())
}

/// `found` is `written` with some records left out, in the same order.
fn is_subsequence(found: &[Record], written: &[Record]) -> bool {
    let mut written = written.iter();
    found.iter().all(|record| written.any(|w| w == record))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime")
}

/// Writes `records` through [`DecisionLog`] (the writer thread, its batches and fsyncs).
fn write_through_the_writer(dir: &Path, records: &[Record]) {
    let (log, _) = DecisionLog::open(dir, LogOptions::default()).expect("opening a new log");
    runtime().block_on(async {
        for record in records {
            let written = match record.clone() {
                Record::Header { coordinator_id, .. } => log.write_header(&coordinator_id).await,
                Record::TxidsReserved { up_to } => log.reserve_txids(up_to).await,
                Record::Commit(commit) => log.commit(commit).await,
                Record::End { txid } => {
                    log.end(txid);
                    Ok(())
                }
                Record::Heuristic(heuristic) => log.heuristic(heuristic).await,
                Record::PreCommit(pre_commit) => log.pre_commit(pre_commit).await,
                // `new_incarnation` picks its own number; the record it writes is checked by what
                // replay reports back, not by equality.
                Record::Incarnation { .. } => log.new_incarnation().await.map(|_| ()),
            };
            written.expect("writing a record");
        }
        log.flush().await.expect("flushing");
    });
}

/// The property behind `a_damaged_log_replays_only_records_that_were_written`, with the frame
/// decoder given so that [`a_planted_bug_a_reader_that_skips_the_checksum_is_caught`] can run it
/// against a faulty one.
fn damaged_log_replays_only_written_records(
    written: &[Record],
    corruptions: &[Corruption],
    decode: impl Fn(&[u8]) -> Result<(Record, usize), FrameError>,
) -> Result<(), TestCaseError> {
    let (original, starts) = encode(written);
    let mut image = original.clone();
    for corruption in corruptions {
        corrupt(&mut image, &starts, corruption);
    }
    let (records, frames) = replay_frames_with(&image, decode)
        .map_err(|e| TestCaseError::fail(format!("replay of a damaged log failed: {e}")))?;
    check_well_formed(&image, &records, &frames)?;
    let found: Vec<Record> = records.iter().map(|(_, record)| record.clone()).collect();
    prop_assert!(
        is_subsequence(&found, written),
        "replay found a record that was not written, or out of order: {:?}",
        found
    );
    // Every record that lies wholly before the first damaged byte is kept.
    let intact = original.iter().zip(&image).take_while(|(a, b)| a == b).count();
    let whole_before: Vec<&Record> = written
        .iter()
        .zip(&starts)
        .take_while(|(record, start)| *start + record.encoded_len() <= intact)
        .map(|(record, _)| record)
        .collect();
    prop_assert!(found.len() >= whole_before.len());
    for (kept, expected) in found.iter().zip(whole_before) {
        prop_assert_eq!(kept, expected);
    }
    // A log that lost records without a cut at a record boundary reports damage.
    if frames.damage.is_empty() {
        let (clean, _) = encode(&found);
        prop_assert_eq!(
            &clean,
            &image,
            "no damage reported, yet the image is not whole records"
        );
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Properties
// ------------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config("decision-log: any bytes replay without panic to well-formed records", DEFAULT_CASES))]
    #[test]
    fn any_bytes_replay_without_panic_to_well_formed_records(image in any_image()) {
        match replay_frames(&image) {
            Ok((records, frames)) => check_well_formed(&image, &records, &frames)?,
            // A checksummed record of a type this build does not know is refused, never skipped.
            Err(LogError::UnknownRecordType { offset, type_tag, .. }) => {
                let offset = offset as usize;
                prop_assert!(decode_frame(&image[offset..]).is_err());
                prop_assert!(type_tag == 0 || type_tag > 7, "type {} is known", type_tag);
            }
            Err(other) => prop_assert!(false, "unexpected error {other}"),
        }
        // The whole replay (records applied to the live state) must not panic either; a header
        // conflict or version is a typed error.
        match scan(&image, Path::new("fuzzed.log")) {
            Ok(_)
            | Err(LogError::UnknownRecordType { .. })
            | Err(LogError::UnsupportedVersion { .. })
            | Err(LogError::ConflictingHeader { .. }) => {}
            Err(other) => prop_assert!(false, "unexpected error {other}"),
        }
    }
}

proptest! {
    #![proptest_config(config("decision-log: a damaged log replays only records that were written", DEFAULT_CASES))]
    #[test]
    fn a_damaged_log_replays_only_records_that_were_written(
        written in written_log(),
        corruptions in prop::collection::vec(corruption(), 1..4),
    ) {
        damaged_log_replays_only_written_records(&written, &corruptions, decode_frame)?;
    }
}

proptest! {
    #![proptest_config(config("decision-log: a log the writer wrote, damaged, reopens to written decisions", DEFAULT_CASES_ON_DISK))]
    #[test]
    fn a_log_the_writer_wrote_then_damaged_reopens_to_written_decisions(
        written in written_log(),
        corruptions in prop::collection::vec(corruption(), 1..4),
    ) {
        let dir = TempDir::new().expect("a temporary directory");
        write_through_the_writer(dir.path(), &written);
        let path = dir.path().join(crate::files::LOG_FILE);
        let original = std::fs::read(&path).expect("reading the log");
        let starts: Vec<usize> = {
            let (records, frames) = replay_frames(&original).expect("the written log replays");
            prop_assert!(frames.damage.is_empty(), "the writer wrote a damaged log");
            records.iter().map(|(offset, _)| *offset).collect()
        };
        let mut image = original.clone();
        for corruption in &corruptions {
            corrupt(&mut image, &starts, corruption);
        }
        std::fs::write(&path, &image).expect("writing the damaged log");

        let (log, replay) = DecisionLog::open(dir.path(), LogOptions::default())
            .map_err(|e| TestCaseError::fail(format!("opening a damaged log failed: {e}")))?;
        drop(log);
        let commits: Vec<CommitRecord> = written
            .iter()
            .filter_map(|record| match record {
                Record::Commit(commit) => Some(commit.clone()),
                Record::Heuristic(heuristic) => heuristic.as_commit(),
                _ => None,
            })
            .collect();
        for unfinished in &replay.unfinished {
            prop_assert!(commits.contains(unfinished), "invented commit decision {:?}", unfinished);
        }
        for heuristic in &replay.heuristics {
            prop_assert!(
                written.contains(&Record::Heuristic(heuristic.clone())),
                "invented heuristic decision {:?}",
                heuristic
            );
        }
        for pre_commit in &replay.pre_committed {
            prop_assert!(
                written.contains(&Record::PreCommit(pre_commit.clone())),
                "invented pre-commit {:?}",
                pre_commit
            );
        }
        if let Some(coordinator_id) = &replay.coordinator_id {
            let header_written = written.iter().any(
                |record| matches!(record, Record::Header { coordinator_id: id, .. } if id == coordinator_id)
            );
            prop_assert!(header_written, "invented header {:?}", coordinator_id);
        }
        prop_assert_eq!(replay.damage.is_empty(), replay.preserved_damaged_file.is_none());
        // The repaired log is clean and holds the same decisions.
        let (_, again) = DecisionLog::open(dir.path(), LogOptions::default())
            .map_err(|e| TestCaseError::fail(format!("reopening a repaired log failed: {e}")))?;
        prop_assert!(again.damage.is_empty(), "the repaired log is damaged: {:?}", again.damage);
        prop_assert_eq!(&again.unfinished, &replay.unfinished);
        prop_assert_eq!(&again.heuristics, &replay.heuristics);
        prop_assert_eq!(&again.pre_committed, &replay.pre_committed);
    }
}

/// A planted bug: a reader that trusts each frame's length and never checks its checksum (it
/// decodes the body as if the stored checksum were right).
fn decode_frame_skipping_the_checksum(bytes: &[u8]) -> Result<(Record, usize), FrameError> {
    let mut frame = bytes.to_vec();
    let claimed = frame_body_len(bytes);
    if let Some(body) = frame.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + claimed) {
        let computed = crc32fast::hash(body);
        frame[8..FRAME_HEADER_LEN].copy_from_slice(&computed.to_le_bytes());
    }
    decode_frame(&frame)
}

/// The body length a frame header claims, or 0 when there is no header.
fn frame_body_len(bytes: &[u8]) -> usize {
    bytes
        .get(4..8)
        .map(|field| u32::from_le_bytes([field[0], field[1], field[2], field[3]]) as usize)
        .unwrap_or(0)
}

/// The damaged-log property, run against the planted bug above, must fail: a flipped bit inside
/// a record's body then comes back as a record that was never written.
#[test]
fn a_planted_bug_a_reader_that_skips_the_checksum_is_caught() {
    let mut runner = proptest::test_runner::TestRunner::new(config(
        "decision-log: the planted bug (no checksum check) is caught",
        DEFAULT_CASES,
    ));
    let strategy = (written_log(), prop::collection::vec(corruption(), 1..4));
    let outcome = runner.run(&strategy, |(written, corruptions)| {
        damaged_log_replays_only_written_records(&written, &corruptions, decode_frame_skipping_the_checksum)
    });
    match outcome {
        Err(proptest::test_runner::TestError::Fail(reason, (written, corruptions))) => {
            let _ = writeln!(
                std::io::stderr(),
                "planted bug caught: {reason}\n  written: {written:?}\n  corruptions: {corruptions:?}"
            );
        }
        other => panic!("the property should have caught a reader that skips the checksum: {other:?}"),
    }
}
