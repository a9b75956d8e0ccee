//! Integration-style tests of the decision log: replay, damage, group commit, compaction, crashes.
//!
//! Every test works in its own temporary directory through the public [`DecisionLog`] API; the crate's
//! record decoder and replay scanner are used only to find record boundaries and to check that a
//! repaired file is clean. Waiting is always on a condition (bounded by a deadline), never on time.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::record::{FORMAT_VERSION, MAGIC, Record, decode_frame};
use crate::{
    BatchWritten, CommitRecord, CompactionStep, Damage, DamageKind, DecisionLog, FsyncAt, HeuristicDecision,
    HeuristicRecord, LogError, LogOptions, PreCommitRecord, Replay, TestHooks,
};

// ---------------------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------------------

const WAIT_LIMIT: Duration = Duration::from_secs(30);

fn commit_record(txid: u64) -> CommitRecord {
    CommitRecord {
        txid,
        gid: format!("treaty:c1:{txid}"),
        participants: vec!["shard-a".into(), format!("shard-{}", txid % 7)],
        decided_at_ms: 1_700_000_000_000 + txid,
    }
}

fn log_file(dir: &Path) -> PathBuf {
    dir.join("decisions.log")
}

fn compact_file(dir: &Path) -> PathBuf {
    dir.join("decisions.log.compact")
}

fn open(dir: &Path) -> (DecisionLog, Replay) {
    DecisionLog::open(dir, LogOptions::default()).unwrap_or_else(|e| panic!("opening {}: {e}", dir.display()))
}

fn open_with(dir: &Path, options: LogOptions, hooks: TestHooks) -> (DecisionLog, Replay) {
    DecisionLog::open_with_hooks(dir, options, hooks)
        .unwrap_or_else(|e| panic!("opening {}: {e}", dir.display()))
}

fn txids(replay: &Replay) -> Vec<u64> {
    replay.unfinished.iter().map(|c| c.txid).collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The start offset of every record of a clean log image (panics on any damage).
fn frame_starts(bytes: &[u8]) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        starts.push(at);
        let (_, len) = decode_frame(&bytes[at..]).unwrap_or_else(|e| panic!("bad frame at {at}: {e}"));
        at += len;
    }
    starts
}

/// Asserts that the log file in `dir` is a clean sequence of records, returning its scan.
fn assert_clean_file(dir: &Path) -> crate::replay::Scan {
    let bytes = fs::read(log_file(dir)).unwrap();
    let scan = crate::replay::scan(&bytes, &log_file(dir)).unwrap();
    assert!(scan.damage.is_empty(), "file left damaged: {:?}", scan.damage);
    scan
}

/// Polls `condition` until it holds; fails the test after [`WAIT_LIMIT`].
async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT_LIMIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::task::yield_now().await;
    }
}

/// A `before_batch` hook that blocks the writer, once, at the start of the batch after `arm()`, until
/// `release()` (or the gate is dropped, or [`WAIT_LIMIT`] passes): everything sent meanwhile joins that
/// one batch. The bound keeps a failing test from leaving the writer (and so the log's drop) blocked.
struct Gate {
    armed: Arc<AtomicBool>,
    release: mpsc::Sender<()>,
    wait: Arc<Mutex<mpsc::Receiver<()>>>,
}

impl Gate {
    fn new(armed: bool) -> Gate {
        let (release, wait) = mpsc::channel();
        Gate {
            armed: Arc::new(AtomicBool::new(armed)),
            release,
            wait: Arc::new(Mutex::new(wait)),
        }
    }

    fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    fn hook(&self) -> Box<dyn Fn() + Send + Sync> {
        let (armed, wait) = (self.armed.clone(), self.wait.clone());
        Box::new(move || {
            if armed.swap(false, Ordering::SeqCst) {
                let _ = wait.lock().unwrap().recv_timeout(WAIT_LIMIT);
            }
        })
    }

    fn release(&self) {
        let _ = self.release.send(());
    }
}

// ---------------------------------------------------------------------------------------------------------
// 1. Round trip
// ---------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn round_trip_replays_header_reservation_and_unfinished_commits_in_order() {
    let dir = TempDir::new().unwrap();
    let (log, replay) = open(dir.path());
    assert_eq!(replay.coordinator_id, None);
    assert_eq!(replay.txids_reserved_up_to, 0);
    assert!(replay.unfinished.is_empty());
    assert!(replay.damage.is_empty());
    assert_eq!(replay.records, 0);
    assert_eq!(replay.preserved_damaged_file, None);

    log.write_header("coord-1").await.unwrap();
    log.write_header("coord-1").await.unwrap(); // the same id again: a no-op
    let conflict = log.write_header("coord-2").await.unwrap_err();
    assert!(
        matches!(&conflict, LogError::ConflictingHeader { logged, requested }
            if logged == "coord-1" && requested == "coord-2"),
        "{conflict}"
    );
    log.reserve_txids(1000).await.unwrap();
    log.reserve_txids(500).await.unwrap(); // lower: the maximum stays
    for txid in [7, 3, 12, 5, 9, 20, 1500] {
        log.commit(commit_record(txid)).await.unwrap();
    }
    log.end(3);
    log.end(9);
    log.end(1500);
    log.end(4444); // never committed: nothing to write
    log.flush().await.unwrap();
    let stats = log.stats();
    // header once, two reservations, seven commits, three ends
    assert_eq!(stats.records_appended, 1 + 2 + 7 + 3);
    drop(log);

    let (log, replay) = open(dir.path());
    assert_eq!(replay.coordinator_id.as_deref(), Some("coord-1"));
    assert_eq!(
        replay.txids_reserved_up_to, 1500,
        "raised to the highest committed txid, even an ended one"
    );
    let expected: Vec<CommitRecord> = [7, 12, 5, 20].into_iter().map(commit_record).collect();
    assert_eq!(
        replay.unfinished, expected,
        "exactly the non-ended commits, in log order"
    );
    assert!(replay.damage.is_empty(), "{:?}", replay.damage);
    assert_eq!(replay.records, 13);
    assert_eq!(replay.preserved_damaged_file, None);

    // The header survives the restart: another id is still refused, the same one is a no-op.
    assert!(matches!(
        log.write_header("coord-2").await,
        Err(LogError::ConflictingHeader { .. })
    ));
    log.write_header("coord-1").await.unwrap();
    assert_eq!(log.stats().records_appended, 0);
    drop(log);
    let (_log, replay) = open(dir.path());
    assert_eq!(
        replay.records, 13,
        "nothing was appended by the refused or repeated headers"
    );
}

fn heuristic_record(txid: u64, decision: HeuristicDecision) -> HeuristicRecord {
    HeuristicRecord {
        txid,
        gid: format!("treaty:c1:{txid}"),
        decision,
        participants: vec!["shard-a".into(), "shard-b".into()],
        operator: "alice".into(),
        reason: format!("ticket {txid}: shard-c host lost"),
        decided_at_ms: 1_700_000_000_000 + txid,
    }
}

#[tokio::test]
async fn heuristic_decisions_survive_reopen_and_compaction_until_their_end_record() {
    let dir = TempDir::new().unwrap();
    let (log, _) = open(dir.path());
    log.write_header("coord-1").await.unwrap();
    log.commit(commit_record(1)).await.unwrap();
    log.heuristic(heuristic_record(2, HeuristicDecision::Abort))
        .await
        .unwrap();
    log.heuristic(heuristic_record(3, HeuristicDecision::Commit))
        .await
        .unwrap();
    log.heuristic(heuristic_record(4, HeuristicDecision::Abort))
        .await
        .unwrap();
    log.end(4);
    log.flush().await.unwrap();
    // header, commit, three heuristics (each forced like a commit), and the flush of the lazy end
    assert_eq!(log.stats().fsyncs, 6);
    drop(log);

    let (log, replay) = open(dir.path());
    assert_eq!(
        replay.heuristics,
        vec![
            heuristic_record(2, HeuristicDecision::Abort),
            heuristic_record(3, HeuristicDecision::Commit)
        ]
    );
    assert_eq!(
        txids(&replay),
        vec![1, 3],
        "a heuristic commit is re-driven like a logged commit"
    );
    assert_eq!(replay.unfinished[1].participants, vec!["shard-a", "shard-b"]);
    assert_eq!(replay.txids_reserved_up_to, 4);
    drop(log);

    // A compacted log keeps exactly the same live state.
    let (log, _) = open_with(
        dir.path(),
        LogOptions {
            compact_after_bytes: 1,
            ..LogOptions::default()
        },
        TestHooks::default(),
    );
    log.end(3);
    log.flush().await.unwrap();
    drop(log); // joins the writer, which compacts after the batch
    let (_log, replay) = open(dir.path());
    assert_eq!(
        replay.records, 4,
        "compacted: header, reservation, commit 1, heuristic 2"
    );
    assert_eq!(txids(&replay), vec![1]);
    assert_eq!(
        replay.heuristics,
        vec![heuristic_record(2, HeuristicDecision::Abort)]
    );
    assert!(replay.damage.is_empty(), "{:?}", replay.damage);
}

fn pre_commit_record(txid: u64) -> PreCommitRecord {
    PreCommitRecord {
        txid,
        gid: format!("treaty:c1:{txid}"),
        participants: vec!["shard-a".into(), "shard-b".into(), "shard-c".into()],
        at_ms: 1_700_000_000_000 + txid,
    }
}

fn pre_committed(replay: &Replay) -> Vec<u64> {
    replay.pre_committed.iter().map(|p| p.txid).collect()
}

#[tokio::test]
async fn a_pre_commit_without_commit_or_end_is_replayed_forced_like_a_commit() {
    let dir = TempDir::new().unwrap();
    let (log, _) = open(dir.path());
    log.write_header("coord-1").await.unwrap();
    log.pre_commit(pre_commit_record(5)).await.unwrap();
    log.pre_commit(pre_commit_record(2)).await.unwrap();
    // header and two pre-commits, each forced: a restart must find it before a PreCommit leaves
    assert_eq!(log.stats().fsyncs, 3);
    drop(log);

    let (_log, replay) = open(dir.path());
    assert_eq!(
        replay.pre_committed,
        vec![pre_commit_record(5), pre_commit_record(2)],
        "every live pre-commit, whole, in log order"
    );
    assert!(replay.unfinished.is_empty(), "a pre-commit is no commit decision");
    assert_eq!(
        replay.txids_reserved_up_to, 5,
        "its txid is never handed out again"
    );
}

#[tokio::test]
async fn a_commit_record_supersedes_the_pre_commit_record() {
    let dir = TempDir::new().unwrap();
    let (log, _) = open(dir.path());
    for txid in [1, 2] {
        log.pre_commit(pre_commit_record(txid)).await.unwrap();
    }
    log.commit(commit_record(1)).await.unwrap();
    log.heuristic(heuristic_record(2, HeuristicDecision::Commit))
        .await
        .unwrap();
    drop(log);

    let (log, replay) = open(dir.path());
    assert!(replay.pre_committed.is_empty(), "{:?}", replay.pre_committed);
    assert_eq!(
        txids(&replay),
        vec![1, 2],
        "re-driven as commits (a heuristic commit is one)"
    );
    // Its end record then finishes it like any commit.
    log.end(1);
    log.end(2);
    log.flush().await.unwrap();
    drop(log);
    let (_log, replay) = open(dir.path());
    assert!(replay.unfinished.is_empty() && replay.pre_committed.is_empty());
}

#[tokio::test]
async fn an_end_record_supersedes_the_pre_commit_record() {
    let dir = TempDir::new().unwrap();
    let (log, _) = open(dir.path());
    for txid in [1, 2, 3] {
        log.pre_commit(pre_commit_record(txid)).await.unwrap();
    }
    // Aborted by the termination rules: no commit record, only the end.
    log.end(2);
    log.flush().await.unwrap();
    assert_eq!(
        log.stats().records_appended,
        4,
        "the end of a pre-committed transaction is written (the writer skips ends of txids it does not hold)"
    );
    drop(log);

    let (_log, replay) = open(dir.path());
    assert_eq!(pre_committed(&replay), vec![1, 3]);
    assert!(replay.unfinished.is_empty());
}

#[tokio::test]
async fn a_live_pre_commit_survives_compaction_and_a_finished_one_is_dropped() {
    let dir = TempDir::new().unwrap();
    let (log, _) = open(dir.path());
    log.write_header("coord-1").await.unwrap();
    log.new_incarnation().await.unwrap();
    log.pre_commit(pre_commit_record(1)).await.unwrap();
    log.pre_commit(pre_commit_record(2)).await.unwrap();
    log.pre_commit(pre_commit_record(3)).await.unwrap();
    log.commit(commit_record(3)).await.unwrap();
    drop(log);

    let (log, _) = open_with(
        dir.path(),
        LogOptions {
            compact_after_bytes: 1,
            ..LogOptions::default()
        },
        TestHooks::default(),
    );
    log.end(2);
    log.flush().await.unwrap();
    drop(log); // joins the writer, which compacts after the batch

    let scan = assert_clean_file(dir.path());
    assert_eq!(
        scan.records, 5,
        "compacted: header, reservation, incarnation, commit 3, pre-commit 1"
    );
    let (_log, replay) = open(dir.path());
    assert_eq!(replay.pre_committed, vec![pre_commit_record(1)]);
    assert_eq!(txids(&replay), vec![3]);
    assert_eq!(replay.incarnation, 1, "the incarnation survives compaction");
}

#[tokio::test]
async fn the_incarnation_grows_at_every_start_and_is_durable_before_it_is_returned() {
    let dir = TempDir::new().unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let (log, replay) = open(dir.path());
        assert_eq!(replay.incarnation, seen.last().copied().unwrap_or(0));
        let fsyncs = log.stats().fsyncs;
        let incarnation = log.new_incarnation().await.unwrap();
        assert_eq!(log.stats().fsyncs, fsyncs + 1, "forced");
        seen.push(incarnation);
    }
    assert_eq!(seen, vec![1, 2, 3]);

    // Two starts on one open still get two numbers.
    let (log, _) = open(dir.path());
    let (a, b) = tokio::join!(log.new_incarnation(), log.new_incarnation());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a, b);
    assert_eq!(a.max(b), 5);
    drop(log);
    let (_log, replay) = open(dir.path());
    assert_eq!(replay.incarnation, 5);
}

#[test]
fn an_incarnation_lost_in_a_damaged_region_is_never_handed_out_again() {
    let dir = TempDir::new().unwrap();
    let rt = runtime();
    let (log, _) = open(dir.path());
    rt.block_on(log.commit(commit_record(1))).unwrap();
    rt.block_on(log.new_incarnation()).unwrap();
    rt.block_on(log.new_incarnation()).unwrap();
    rt.block_on(log.commit(commit_record(2))).unwrap();
    drop(log);
    // Flip a byte in the second incarnation record (the third record): replay skips it.
    let mut bytes = fs::read(log_file(dir.path())).unwrap();
    let starts = frame_starts(&bytes);
    bytes[starts[2] + 14] ^= 0x01;
    fs::write(log_file(dir.path()), &bytes).unwrap();

    let (log, replay) = open(dir.path());
    assert_eq!(replay.damage.len(), 1, "{:?}", replay.damage);
    assert_eq!(replay.incarnation, 1, "the damaged record held 2");
    let next = rt.block_on(log.new_incarnation()).unwrap();
    assert!(next > 2, "{next} may have been used before the damage");
    assert_eq!(txids(&replay), vec![1, 2]);
}

#[tokio::test]
async fn clones_share_one_writer_and_the_last_drop_closes_it() {
    let dir = TempDir::new().unwrap();
    let (log, _) = open(dir.path());
    let clone = log.clone();
    drop(log);
    clone.commit(commit_record(1)).await.unwrap();
    clone.end(1);
    clone.commit(commit_record(2)).await.unwrap();
    assert_eq!(clone.stats().records_appended, 3);
    drop(clone);
    let (_log, replay) = open(dir.path());
    assert_eq!(txids(&replay), vec![2]);
}

#[tokio::test]
async fn a_second_open_of_the_same_directory_is_locked_out_until_the_first_is_dropped() {
    let dir = TempDir::new().unwrap();
    let (log, _) = open(dir.path());
    log.commit(commit_record(1)).await.unwrap();
    let error = DecisionLog::open(dir.path(), LogOptions::default())
        .err()
        .expect("a second open must fail");
    assert!(matches!(error, LogError::Locked { .. }), "{error}");
    drop(log);
    let (_log, replay) = open(dir.path());
    assert_eq!(txids(&replay), vec![1]);
}

#[tokio::test]
async fn oversized_records_are_refused_without_poisoning_the_log() {
    let dir = TempDir::new().unwrap();
    let (log, _) = open(dir.path());
    let mut huge = commit_record(1);
    huge.gid = "g".repeat(crate::MAX_RECORD_BODY_BYTES as usize);
    assert!(matches!(
        log.commit(huge).await,
        Err(LogError::RecordTooLarge { what: "commit", .. })
    ));
    let huge_id = "c".repeat(crate::MAX_RECORD_BODY_BYTES as usize);
    assert!(matches!(
        log.write_header(&huge_id).await,
        Err(LogError::RecordTooLarge { what: "header", .. })
    ));
    log.commit(commit_record(2)).await.unwrap();
    drop(log);
    let (_log, replay) = open(dir.path());
    assert_eq!(txids(&replay), vec![2]);
    assert!(replay.damage.is_empty());
}

// ---------------------------------------------------------------------------------------------------------
// 2. Torn tails
// ---------------------------------------------------------------------------------------------------------

/// Writes header "c1", reservation 100, commits 1..=4, end 2, commit 5 (the last record); returns the bytes.
fn write_sample_log(dir: &Path) -> Vec<u8> {
    let rt = runtime();
    let (log, _) = open(dir);
    rt.block_on(async {
        log.write_header("c1").await.unwrap();
        log.reserve_txids(100).await.unwrap();
        for txid in 1..=4 {
            log.commit(commit_record(txid)).await.unwrap();
        }
        log.end(2);
        log.commit(commit_record(5)).await.unwrap();
    });
    drop(log);
    fs::read(log_file(dir)).unwrap()
}

/// After repair: a commit made now must survive another reopen, on a clean log.
fn assert_writable_after_repair(dir: &Path, rt: &tokio::runtime::Runtime, log: DecisionLog, before: &[u64]) {
    rt.block_on(log.commit(commit_record(99))).unwrap();
    drop(log);
    let (_log, replay) = open(dir);
    assert!(replay.damage.is_empty(), "{:?}", replay.damage);
    let mut expected = before.to_vec();
    expected.push(99);
    assert_eq!(txids(&replay), expected);
}

#[test]
fn every_cut_inside_the_last_record_is_a_torn_tail_that_open_cuts_and_the_log_stays_writable() {
    let rt = runtime();
    let source = TempDir::new().unwrap();
    let original = write_sample_log(source.path());
    let starts = frame_starts(&original);
    assert_eq!(starts.len(), 8, "header, reservation, 4 commits, end, commit");
    let last_start = starts[starts.len() - 1];

    for len in last_start..original.len() {
        let dir = TempDir::new().unwrap();
        fs::write(log_file(dir.path()), &original[..len]).unwrap();
        let (log, replay) = open(dir.path());
        let context = format!(
            "log cut at {len} (last record at {last_start}..{})",
            original.len()
        );

        assert_eq!(replay.coordinator_id.as_deref(), Some("c1"), "{context}");
        assert_eq!(replay.txids_reserved_up_to, 100, "{context}");
        assert_eq!(txids(&replay), vec![1, 3, 4], "{context}");
        assert_eq!(replay.records, 7, "{context}");
        if len == last_start {
            assert!(replay.damage.is_empty(), "{context}: {:?}", replay.damage);
            assert_eq!(replay.preserved_damaged_file, None, "{context}");
            assert_eq!(
                fs::metadata(log_file(dir.path())).unwrap().len(),
                len as u64,
                "{context}"
            );
        } else {
            assert_eq!(replay.damage.len(), 1, "{context}: {:?}", replay.damage);
            let Damage {
                kind, offset, length, ..
            } = &replay.damage[0];
            assert_eq!(*kind, DamageKind::TornTail, "{context}");
            assert_eq!(*offset, last_start as u64, "{context}");
            assert_eq!(*length, (len - last_start) as u64, "{context}");
            let preserved = replay.preserved_damaged_file.as_ref().expect("a preserved copy");
            assert_eq!(fs::read(preserved).unwrap(), &original[..len], "{context}");
            // The torn bytes are gone: the file is clean and no longer than the good prefix.
            let scan = assert_clean_file(dir.path());
            assert_eq!(scan.state.unfinished_records().len(), 3, "{context}");
            assert!(
                fs::metadata(log_file(dir.path())).unwrap().len() <= last_start as u64,
                "{context}: torn bytes left in the file"
            );
        }
        assert_writable_after_repair(dir.path(), &rt, log, &[1, 3, 4]);
    }
}

#[test]
fn garbage_after_the_last_record_is_a_torn_tail() {
    let rt = runtime();
    let source = TempDir::new().unwrap();
    let original = write_sample_log(source.path());
    let mut random = Vec::new();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..777 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        random.push(x as u8);
    }
    // A frame header claiming a 64 KiB body that is not there.
    let mut claimed = MAGIC.to_le_bytes().to_vec();
    claimed.extend_from_slice(&65_536u32.to_le_bytes());
    claimed.extend_from_slice(&[0xAB; 40]);

    for garbage in [
        vec![0u8; 4096],
        random,
        MAGIC.to_le_bytes().repeat(9),
        claimed,
        vec![0xFF],
    ] {
        let dir = TempDir::new().unwrap();
        let mut damaged = original.clone();
        damaged.extend_from_slice(&garbage);
        fs::write(log_file(dir.path()), &damaged).unwrap();
        let (log, replay) = open(dir.path());
        assert_eq!(txids(&replay), vec![1, 3, 4, 5]);
        assert_eq!(replay.damage.len(), 1, "{:?}", replay.damage);
        assert_eq!(replay.damage[0].kind, DamageKind::TornTail);
        assert_eq!(replay.damage[0].offset, original.len() as u64);
        assert_eq!(replay.damage[0].length, garbage.len() as u64);
        let preserved = replay.preserved_damaged_file.as_ref().expect("a preserved copy");
        assert_eq!(fs::read(preserved).unwrap(), damaged);
        assert_clean_file(dir.path());
        assert!(fs::metadata(log_file(dir.path())).unwrap().len() <= original.len() as u64);
        assert_writable_after_repair(dir.path(), &rt, log, &[1, 3, 4, 5]);
    }
}

// ---------------------------------------------------------------------------------------------------------
// 3. Corrupt middle record
// ---------------------------------------------------------------------------------------------------------

#[test]
fn a_corrupt_middle_record_is_skipped_the_later_records_kept_and_the_original_preserved() {
    let rt = runtime();
    let source = TempDir::new().unwrap();
    let original = write_sample_log(source.path());
    let starts = frame_starts(&original);
    // starts: 0 header, 1 reservation, 2..=5 commits 1..=4, 6 end 2, 7 commit 5. Damage commit 3.
    let (bad_start, bad_end) = (starts[4], starts[5]);
    for at in [bad_start + 13, bad_start + 30, bad_end - 1] {
        let dir = TempDir::new().unwrap();
        let mut damaged = original.clone();
        damaged[at] ^= 0x20;
        fs::write(log_file(dir.path()), &damaged).unwrap();

        let (log, replay) = open(dir.path());
        assert_eq!(replay.damage.len(), 1, "flip at {at}: {:?}", replay.damage);
        let damage = &replay.damage[0];
        assert_eq!(damage.kind, DamageKind::CorruptRecord, "flip at {at}");
        assert_eq!(damage.offset, bad_start as u64, "flip at {at}");
        assert_eq!(damage.length, (bad_end - bad_start) as u64, "flip at {at}");
        assert!(damage.detail.contains("checksum"), "{}", damage.detail);
        assert_eq!(
            txids(&replay),
            vec![1, 4, 5],
            "records after the damage are kept (end 2 too)"
        );
        assert_eq!(replay.unfinished[2], commit_record(5));
        assert_eq!(replay.coordinator_id.as_deref(), Some("c1"));
        assert_eq!(replay.records, 7);
        let preserved = replay.preserved_damaged_file.clone().expect("a preserved copy");
        assert!(preserved.starts_with(dir.path()));
        assert_eq!(
            fs::read(&preserved).unwrap(),
            damaged,
            "the copy holds the original bytes"
        );
        assert_clean_file(dir.path());

        assert_writable_after_repair(dir.path(), &rt, log, &[1, 4, 5]);
        assert!(preserved.exists(), "later opens leave the preserved copy alone");
    }
}

#[test]
fn a_corrupt_record_followed_by_a_torn_tail_reports_both() {
    let rt = runtime();
    let source = TempDir::new().unwrap();
    let original = write_sample_log(source.path());
    let starts = frame_starts(&original);
    let dir = TempDir::new().unwrap();
    let mut damaged = original[..original.len() - 3].to_vec();
    damaged[starts[2] + 20] ^= 0x01; // commit 1
    fs::write(log_file(dir.path()), &damaged).unwrap();
    let (log, replay) = open(dir.path());
    let kinds: Vec<_> = replay.damage.iter().map(|d| (d.kind.clone(), d.offset)).collect();
    assert_eq!(
        kinds,
        vec![
            (DamageKind::CorruptRecord, starts[2] as u64),
            (DamageKind::TornTail, starts[7] as u64)
        ]
    );
    assert_eq!(txids(&replay), vec![3, 4]);
    assert_writable_after_repair(dir.path(), &rt, log, &[3, 4]);
}

// ---------------------------------------------------------------------------------------------------------
// 4. Group commit and lazy ends
// ---------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commits_queued_together_share_one_write_and_one_fsync() {
    const N: u64 = 200;
    let dir = TempDir::new().unwrap();
    let gate = Gate::new(true);
    let hooks = TestHooks {
        before_batch: Some(gate.hook()),
        ..TestHooks::default()
    };
    let (log, _) = open_with(dir.path(), LogOptions::default(), hooks);
    let tasks: Vec<_> = (1..=N)
        .map(|txid| {
            let log = log.clone();
            tokio::spawn(async move { log.commit(commit_record(txid)).await })
        })
        .collect();
    // The writer holds the first request at the gate; wait until every other one is queued behind it.
    wait_for("all commits to be queued", || log.requests_sent() == N).await;
    assert_eq!(
        log.stats().fsyncs,
        0,
        "nothing is acknowledged while the writer is held"
    );
    gate.release();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let stats = log.stats();
    assert_eq!(stats.records_appended, N);
    assert_eq!(stats.batches, 1, "{stats:?}");
    assert_eq!(stats.fsyncs, 1, "one fdatasync covers the whole batch: {stats:?}");
    drop(log);
    let (_log, replay) = open(dir.path());
    assert_eq!(replay.unfinished.len() as u64, N);
    assert_eq!(replay.txids_reserved_up_to, N);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn free_running_concurrent_commits_all_succeed_with_at_most_one_fsync_per_batch() {
    const N: u64 = 200;
    let dir = TempDir::new().unwrap();
    let (log, _) = open(dir.path());
    let tasks: Vec<_> = (1..=N)
        .map(|txid| {
            let log = log.clone();
            tokio::spawn(async move { log.commit(commit_record(txid)).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let stats = log.stats();
    assert_eq!(stats.records_appended, N);
    assert!(stats.fsyncs <= stats.batches, "{stats:?}");
    assert!(stats.fsyncs >= 1, "{stats:?}");
    drop(log);
    let (_log, replay) = open(dir.path());
    let mut got = txids(&replay);
    got.sort_unstable();
    assert_eq!(got, (1..=N).collect::<Vec<_>>());
}

#[tokio::test]
async fn an_end_is_written_lazily_without_an_fsync_of_its_own_and_made_durable_by_flush() {
    let dir = TempDir::new().unwrap();
    let (log, _) = open(dir.path());
    log.commit(commit_record(1)).await.unwrap();
    log.commit(commit_record(2)).await.unwrap();
    let before = log.stats();
    assert_eq!(
        before.fsyncs, 2,
        "each forced commit alone in its batch syncs: {before:?}"
    );

    log.end(1);
    wait_for("the end record to be appended", || {
        log.stats().records_appended == before.records_appended + 1
    })
    .await;
    let after_end = log.stats();
    assert_eq!(after_end.fsyncs, before.fsyncs, "an end must not fsync by itself");
    assert!(after_end.bytes_written > before.bytes_written);

    log.flush().await.unwrap();
    assert_eq!(
        log.stats().fsyncs,
        before.fsyncs + 1,
        "flush syncs the unsynced end"
    );
    log.flush().await.unwrap();
    assert_eq!(
        log.stats().fsyncs,
        before.fsyncs + 1,
        "nothing unsynced: no fsync"
    );

    log.end(777); // not in the log: nothing appended
    log.flush().await.unwrap();
    assert_eq!(log.stats().records_appended, before.records_appended + 1);
    assert_eq!(log.stats().fsyncs, before.fsyncs + 1);
    drop(log);

    let (_log, replay) = open(dir.path());
    assert_eq!(txids(&replay), vec![2]);
}

#[tokio::test]
async fn a_lazy_end_rides_on_the_next_commits_fsync() {
    let dir = TempDir::new().unwrap();
    let gate = Gate::new(false);
    let hooks = TestHooks {
        before_batch: Some(gate.hook()),
        ..TestHooks::default()
    };
    let (log, _) = open_with(dir.path(), LogOptions::default(), hooks);
    log.commit(commit_record(1)).await.unwrap();
    let before = log.stats();
    gate.arm();
    log.end(1);
    let sent = log.requests_sent();
    let commit = {
        let log = log.clone();
        tokio::spawn(async move { log.commit(commit_record(2)).await })
    };
    wait_for("the commit to be queued", || log.requests_sent() == sent + 1).await;
    gate.release();
    commit.await.unwrap().unwrap();
    let stats = log.stats();
    assert_eq!(stats.batches, before.batches + 1, "end and commit in one batch");
    assert_eq!(stats.records_appended, before.records_appended + 2);
    assert_eq!(stats.fsyncs, before.fsyncs + 1);
    drop(log);
    let (_log, replay) = open(dir.path());
    assert_eq!(txids(&replay), vec![2]);
}

// ---------------------------------------------------------------------------------------------------------
// 5. Compaction
// ---------------------------------------------------------------------------------------------------------

/// Commits 1..=count, ending every txid not divisible by 10; returns the kept (unfinished) ones.
async fn commit_and_end(log: &DecisionLog, count: u64) -> Vec<u64> {
    for txid in 1..=count {
        log.commit(commit_record(txid)).await.unwrap();
        if txid % 10 != 0 {
            log.end(txid);
        }
    }
    log.flush().await.unwrap();
    (1..=count).filter(|t| t % 10 == 0).collect()
}

#[tokio::test]
async fn compaction_bounds_the_file_and_keeps_only_the_live_state() {
    let dir = TempDir::new().unwrap();
    let options = LogOptions {
        compact_after_bytes: 4096,
        ..LogOptions::default()
    };
    let (log, _) = open_with(dir.path(), options.clone(), TestHooks::default());
    log.write_header("c1").await.unwrap();
    log.reserve_txids(10).await.unwrap();
    let kept = commit_and_end(&log, 599).await;
    let stats = log.stats();
    assert!(stats.compactions > 0, "{stats:?}");
    let size = fs::metadata(log_file(dir.path())).unwrap().len();
    assert!(
        size < 16 * 1024,
        "the file stays bounded: {size} bytes after {stats:?}"
    );
    assert!(stats.bytes_written > 3 * size, "{stats:?}, size {size}");
    assert!(!compact_file(dir.path()).exists());
    drop(log);

    let (log, replay) = open_with(dir.path(), options, TestHooks::default());
    assert!(replay.damage.is_empty(), "{:?}", replay.damage);
    assert_eq!(replay.coordinator_id.as_deref(), Some("c1"));
    assert_eq!(
        replay.txids_reserved_up_to, 599,
        "the reservation survives, raised by ended commits"
    );
    assert_eq!(txids(&replay), kept);
    assert_eq!(replay.unfinished[0], commit_record(10));
    // Still a working log after a compacted reopen.
    log.commit(commit_record(601)).await.unwrap();
    drop(log);
    let (_log, replay) = open(dir.path());
    assert_eq!(*txids(&replay).last().unwrap(), 601);
}

#[tokio::test]
async fn a_large_live_set_does_not_compact_after_every_batch() {
    let dir = TempDir::new().unwrap();
    let options = LogOptions {
        compact_after_bytes: 2048,
        ..LogOptions::default()
    };
    let (log, _) = open_with(dir.path(), options, TestHooks::default());
    for txid in 1..=400 {
        log.commit(commit_record(txid)).await.unwrap();
    }
    let stats = log.stats();
    assert!(stats.compactions >= 1, "{stats:?}");
    // Nothing ends, so every compaction roughly keeps the file; the threshold doubles each time.
    assert!(stats.compactions <= 8, "{stats:?}");
    drop(log);
    let (_log, replay) = open(dir.path());
    assert_eq!(txids(&replay), (1..=400).collect::<Vec<_>>());
}

fn step_name(step: CompactionStep) -> &'static str {
    match step {
        CompactionStep::TempWritten => "temp-written",
        CompactionStep::TempSynced => "temp-synced",
        CompactionStep::Renamed => "renamed",
        CompactionStep::DirectorySynced => "dir-synced",
    }
}

type CompactionHook = Box<dyn Fn(CompactionStep) + Send + Sync>;
type Snapshots = Arc<Mutex<Vec<(CompactionStep, PathBuf)>>>;

/// A hook that copies the log directory's data files at every compaction step into `root/<n>-<step>`,
/// the state a crash right after that step would leave (with the page cache surviving).
fn snapshotting_hook(dir: &Path, root: &Path) -> (CompactionHook, Snapshots) {
    let snapshots = Arc::new(Mutex::new(Vec::new()));
    let (dir, root, taken) = (dir.to_owned(), root.to_owned(), snapshots.clone());
    let hook = Box::new(move |step: CompactionStep| {
        let mut taken = taken.lock().unwrap();
        let into = root.join(format!("{}-{}", taken.len(), step_name(step)));
        fs::create_dir_all(&into).unwrap();
        for name in ["decisions.log", "decisions.log.compact"] {
            let from = dir.join(name);
            if from.exists() {
                fs::copy(&from, into.join(name)).unwrap();
            }
        }
        taken.push((step, into));
    });
    (hook, snapshots)
}

/// Opens the state left by a crash at `step`, checking that it is exactly the old or the new log and
/// that every commit in `kept` (never ended) up to the reservation is still unfinished.
/// `old_is_damaged`: the old log is a damaged one being repaired, so reopening it repairs it again.
fn check_crash_snapshot(
    step: CompactionStep,
    snapshot: &Path,
    kept: &[u64],
    coordinator: Option<&str>,
    old_is_damaged: bool,
) {
    let context = format!("crash after {step:?} ({})", snapshot.display());
    let before_rename = matches!(step, CompactionStep::TempWritten | CompactionStep::TempSynced);
    assert_eq!(compact_file(snapshot).exists(), before_rename, "{context}");
    let new_log = before_rename.then(|| {
        // What the directory would hold had the rename happened: the new log on its own.
        let alone = snapshot.with_extension("new");
        fs::create_dir_all(&alone).unwrap();
        fs::copy(compact_file(snapshot), log_file(&alone)).unwrap();
        let (_log, replay) = open(&alone);
        assert!(replay.damage.is_empty(), "{context}: {:?}", replay.damage);
        (replay, fs::metadata(log_file(&alone)).unwrap().len())
    });
    let old_len = fs::metadata(log_file(snapshot)).unwrap().len();

    let (log, replay) = open(snapshot);
    drop(log);
    if old_is_damaged && before_rename {
        assert_eq!(replay.damage.len(), 1, "{context}: {:?}", replay.damage);
        assert_eq!(replay.damage[0].kind, DamageKind::TornTail, "{context}");
    } else {
        assert!(replay.damage.is_empty(), "{context}: {:?}", replay.damage);
    }
    assert!(
        !compact_file(snapshot).exists(),
        "{context}: stale compaction left behind"
    );
    assert_eq!(replay.coordinator_id.as_deref(), coordinator, "{context}");
    let unfinished = txids(&replay);
    for txid in kept.iter().filter(|t| **t <= replay.txids_reserved_up_to) {
        assert!(
            unfinished.contains(txid),
            "{context}: lost unfinished commit {txid}"
        );
    }
    assert!(
        unfinished.iter().all(|t| *t <= replay.txids_reserved_up_to),
        "{context}"
    );
    if let Some((new, new_len)) = new_log {
        assert_eq!(
            new.unfinished, replay.unfinished,
            "{context}: old and new logs differ"
        );
        assert_eq!(new.txids_reserved_up_to, replay.txids_reserved_up_to, "{context}");
        assert_eq!(new.coordinator_id, replay.coordinator_id, "{context}");
        assert!(new_len < old_len, "{context}: the compacted log is not smaller");
    }
}

#[tokio::test]
async fn a_crash_at_any_compaction_step_leaves_the_old_or_the_new_log_and_loses_no_commit() {
    let dir = TempDir::new().unwrap();
    let snapshots_root = TempDir::new().unwrap();
    let (hook, snapshots) = snapshotting_hook(dir.path(), snapshots_root.path());
    let hooks = TestHooks {
        after_compaction_step: Some(hook),
        ..TestHooks::default()
    };
    let options = LogOptions {
        compact_after_bytes: 4096,
        ..LogOptions::default()
    };
    let (log, _) = open_with(dir.path(), options, hooks);
    log.write_header("c1").await.unwrap();
    log.reserve_txids(5).await.unwrap();
    let kept = commit_and_end(&log, 300).await;
    let compactions = log.stats().compactions;
    drop(log);

    let snapshots = snapshots.lock().unwrap().clone();
    assert!(compactions >= 2, "{compactions}");
    // The batch of the last flush may compact after acknowledging it, so after `stats()` was read.
    assert!(
        snapshots.len() as u64 == 4 * compactions || snapshots.len() as u64 == 4 * (compactions + 1),
        "four steps per compaction: {} snapshots, {compactions} compactions",
        snapshots.len()
    );
    let steps: Vec<_> = snapshots.iter().take(4).map(|(step, _)| *step).collect();
    assert_eq!(
        steps,
        [
            CompactionStep::TempWritten,
            CompactionStep::TempSynced,
            CompactionStep::Renamed,
            CompactionStep::DirectorySynced
        ]
    );
    for (step, snapshot) in &snapshots {
        check_crash_snapshot(*step, snapshot, &kept, Some("c1"), false);
    }
}

#[test]
fn a_crash_at_any_step_of_the_repair_on_open_loses_nothing() {
    let source = TempDir::new().unwrap();
    let original = write_sample_log(source.path());
    let dir = TempDir::new().unwrap();
    let mut damaged = original.clone();
    damaged.extend_from_slice(&[0x54, 0x52, 0x44]); // a torn start of a frame
    fs::write(log_file(dir.path()), &damaged).unwrap();
    let snapshots_root = TempDir::new().unwrap();
    let (hook, snapshots) = snapshotting_hook(dir.path(), snapshots_root.path());
    let hooks = TestHooks {
        after_compaction_step: Some(hook),
        ..TestHooks::default()
    };
    let (log, replay) = open_with(dir.path(), LogOptions::default(), hooks);
    drop(log);
    assert_eq!(replay.damage.len(), 1);
    let snapshots = snapshots.lock().unwrap().clone();
    assert_eq!(snapshots.len(), 4, "the repair is a compaction");
    for (step, snapshot) in &snapshots {
        check_crash_snapshot(*step, snapshot, &[1, 3, 4, 5], Some("c1"), true);
        let (_log, replay) = open(snapshot);
        assert_eq!(txids(&replay), vec![1, 3, 4, 5]);
    }
}

/// Stops the writer thread (panics in it) right after `step` of the first compaction, as a crash would.
#[tokio::test]
async fn a_writer_dying_at_each_compaction_step_keeps_every_acknowledged_commit() {
    for step in [
        CompactionStep::TempWritten,
        CompactionStep::TempSynced,
        CompactionStep::Renamed,
        CompactionStep::DirectorySynced,
    ] {
        let dir = TempDir::new().unwrap();
        let hooks = TestHooks {
            after_compaction_step: Some(Box::new(move |at| {
                if at == step {
                    panic!("simulated crash after {at:?}");
                }
            })),
            ..TestHooks::default()
        };
        let compact_after_bytes = 4096;
        let (log, _) = open_with(
            dir.path(),
            LogOptions {
                compact_after_bytes,
                ..LogOptions::default()
            },
            hooks,
        );
        log.write_header("c1").await.unwrap();
        let mut acked = Vec::new();
        let mut crashed = false;
        for txid in 1..=1000 {
            match log.commit(commit_record(txid)).await {
                Ok(()) => acked.push(txid),
                Err(LogError::Closed) => {
                    crashed = true;
                    break;
                }
                Err(e) => panic!("{step:?}: unexpected {e}"),
            }
            if txid % 10 != 0 {
                log.end(txid);
            }
        }
        assert!(crashed, "{step:?}: the compaction never ran");
        drop(log);

        let len = fs::metadata(log_file(dir.path())).unwrap().len();
        let renamed = matches!(step, CompactionStep::Renamed | CompactionStep::DirectorySynced);
        assert_eq!(
            len < compact_after_bytes,
            renamed,
            "{step:?}: expected the {} log, found {len} bytes",
            if renamed { "new" } else { "old" }
        );
        let (log, replay) = open(dir.path());
        assert!(replay.damage.is_empty(), "{step:?}: {:?}", replay.damage);
        assert!(!compact_file(dir.path()).exists(), "{step:?}");
        assert_eq!(replay.coordinator_id.as_deref(), Some("c1"));
        let unfinished = txids(&replay);
        let kept: Vec<u64> = acked.iter().copied().filter(|t| t % 10 == 0).collect();
        assert!(!kept.is_empty());
        for txid in &kept {
            assert!(
                unfinished.contains(txid),
                "{step:?}: lost acknowledged commit {txid}"
            );
        }
        assert!(
            unfinished.iter().all(|t| acked.contains(t)),
            "{step:?}: {unfinished:?}"
        );
        log.commit(commit_record(5000)).await.unwrap();
    }
}

// ---------------------------------------------------------------------------------------------------------
// 6. Logs from a newer Treaty
// ---------------------------------------------------------------------------------------------------------

fn assert_open_refused_and_file_untouched(bytes: &[u8], check: impl Fn(&LogError) -> bool) -> LogError {
    let dir = TempDir::new().unwrap();
    fs::write(log_file(dir.path()), bytes).unwrap();
    let error = DecisionLog::open(dir.path(), LogOptions::default())
        .err()
        .expect("open must fail");
    assert!(check(&error), "unexpected error: {error}");
    assert_eq!(
        fs::read(log_file(dir.path())).unwrap(),
        bytes,
        "the log must not be rewritten"
    );
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.contains("damaged"))
        .collect();
    assert!(names.is_empty(), "not damage: {names:?}");
    error
}

#[test]
fn a_record_of_unknown_type_with_a_valid_checksum_fails_open() {
    let source = TempDir::new().unwrap();
    let mut bytes = write_sample_log(source.path());
    let at = bytes.len();
    Record::End { txid: 1 }.encode(&mut bytes);
    bytes[at + 12] = 200;
    let crc = crc32fast::hash(&bytes[at + 12..]);
    bytes[at + 8..at + 12].copy_from_slice(&crc.to_le_bytes());
    // A good record after it, so it is not mistaken for a torn tail either way.
    Record::End { txid: 3 }.encode(&mut bytes);

    let error = assert_open_refused_and_file_untouched(
        &bytes,
        |e| matches!(e, LogError::UnknownRecordType { offset, type_tag: 200, .. } if *offset == at as u64),
    );
    let message = error.to_string();
    assert!(
        message.contains("unknown type 200") && message.contains("newer Treaty"),
        "{message}"
    );
}

#[test]
fn a_header_of_another_format_version_fails_open() {
    let mut bytes = Vec::new();
    Record::Header {
        coordinator_id: "c1".into(),
        format_version: FORMAT_VERSION + 1,
    }
    .encode(&mut bytes);
    Record::Commit(commit_record(1)).encode(&mut bytes);
    let error = assert_open_refused_and_file_untouched(&bytes, |e| {
        matches!(
            e,
            LogError::UnsupportedVersion {
                found: 2,
                supported: 1,
                ..
            }
        )
    });
    assert!(error.to_string().contains("format version 2"), "{error}");
}

// ---------------------------------------------------------------------------------------------------------
// 7. Acknowledged commits survive SIGKILL of the process
// ---------------------------------------------------------------------------------------------------------

const CRASH_CHILD_DIR: &str = "TREATY_DECISION_LOG_TEST_CRASH_CHILD_DIR";
const CRASH_TEST: &str = "tests::acknowledged_commits_survive_sigkill_of_the_process";
const CRASH_ACKS: usize = 50;

/// The child: commits from four concurrent tasks until killed (bounded), printing `ACK <txid>` after each
/// acknowledged commit.
fn crash_child(dir: &Path) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let (log, _) = open(dir);
    rt.block_on(async {
        log.write_header("crash-child").await.unwrap();
        let workers: Vec<_> = (0..4u64)
            .map(|worker| {
                let log = log.clone();
                tokio::spawn(async move {
                    for k in 0..2500u64 {
                        let txid = 1 + worker + 4 * k;
                        log.commit(commit_record(txid)).await.unwrap();
                        if txid % 3 == 0 {
                            log.end(txid);
                        }
                        let mut out = std::io::stdout().lock();
                        if writeln!(out, "ACK {txid}").and_then(|()| out.flush()).is_err() {
                            return; // the parent is gone
                        }
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.await.unwrap();
        }
    });
}

#[test]
fn acknowledged_commits_survive_sigkill_of_the_process() {
    if let Some(dir) = std::env::var_os(CRASH_CHILD_DIR) {
        crash_child(Path::new(&dir));
        return;
    }
    let dir = TempDir::new().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", CRASH_TEST, "--nocapture", "--test-threads=1"])
        .env(CRASH_CHILD_DIR, dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut acked = Vec::new();
    while acked.len() < CRASH_ACKS {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                if let Some(txid) = line.strip_prefix("ACK ") {
                    acked.push(txid.parse::<u64>().unwrap());
                }
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the child stopped acknowledging after {} commits: {e}",
                    acked.len()
                );
            }
        }
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    }
    // Anything acknowledged while the kill was in flight counts too.
    acked.extend(
        lines
            .iter()
            .filter_map(|line| line.strip_prefix("ACK ").map(|t| t.parse::<u64>().unwrap())),
    );
    reader.join().unwrap();

    // The kernel released the dead child's lock; the log opens.
    let (log, replay) = open(dir.path());
    assert_eq!(replay.coordinator_id.as_deref(), Some("crash-child"));
    assert!(
        replay.damage.iter().all(|d| d.kind == DamageKind::TornTail),
        "only an interrupted append may be cut: {:?}",
        replay.damage
    );
    let unfinished = txids(&replay);
    for txid in acked.iter().filter(|t| *t % 3 != 0) {
        assert!(unfinished.contains(txid), "acknowledged commit {txid} lost");
    }
    let max_acked = *acked.iter().max().unwrap();
    assert!(replay.txids_reserved_up_to >= max_acked);
    let rt = runtime();
    rt.block_on(log.commit(commit_record(1_000_000))).unwrap();
    drop(log);
    let (_log, replay) = open(dir.path());
    assert!(replay.damage.is_empty());
    assert!(txids(&replay).contains(&1_000_000));
}

/// The fsync hook is told what is durable: the length at the previous fsync, or what the log was
/// opened with. The coordinator's "loses its unsynced tail" failpoint truncates to exactly that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fsync_hook_is_told_the_length_made_durable_by_the_previous_fsync() {
    let dir = TempDir::new().unwrap();
    let seen = Arc::new(Mutex::new(Vec::<FsyncAt>::new()));
    let recording = |seen: &Arc<Mutex<Vec<FsyncAt>>>| {
        let seen = seen.clone();
        TestHooks {
            before_fsync: Some(Box::new(move |at| {
                seen.lock().unwrap().push(at);
                Ok(())
            })),
            ..TestHooks::default()
        }
    };
    let (log, _) = open_with(dir.path(), LogOptions::default(), recording(&seen));
    log.write_header("c1").await.unwrap();
    log.commit(commit_record(1)).await.unwrap();
    log.end(1);
    log.commit(commit_record(2)).await.unwrap();
    drop(log);
    let first = seen.lock().unwrap().clone();
    assert_eq!(first.len(), 3, "one fsync per forced write: {first:?}");
    assert_eq!(first[0].durable_len, 0, "a new log has nothing durable");
    for pair in first.windows(2) {
        assert_eq!(pair[1].durable_len, pair[0].file_len, "{first:?}");
        assert!(pair[1].file_len > pair[1].durable_len, "{first:?}");
    }

    // Reopened: what is on disk counts as durable.
    let on_disk = std::fs::metadata(dir.path().join("decisions.log")).unwrap().len();
    seen.lock().unwrap().clear();
    let (log, _) = open_with(dir.path(), LogOptions::default(), recording(&seen));
    log.commit(commit_record(3)).await.unwrap();
    drop(log);
    let reopened = seen.lock().unwrap().clone();
    assert_eq!(
        reopened.first().map(|at| at.durable_len),
        Some(on_disk),
        "{reopened:?}"
    );
}

// ---------------------------------------------------------------------------------------------------------
// 8. Poisoning
// ---------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_poisons_the_log_for_good() {
    let dir = TempDir::new().unwrap();
    let fail = Arc::new(AtomicBool::new(false));
    let gate = Gate::new(false);
    let hooks = TestHooks {
        before_batch: Some(gate.hook()),
        before_fsync: Some({
            let fail = fail.clone();
            Box::new(move |_| {
                if fail.load(Ordering::SeqCst) {
                    Err(std::io::Error::other("injected fsync failure"))
                } else {
                    Ok(())
                }
            })
        }),
        ..TestHooks::default()
    };
    let (log, _) = open_with(dir.path(), LogOptions::default(), hooks);
    log.write_header("c1").await.unwrap();
    log.commit(commit_record(1)).await.unwrap();
    let before = log.stats();

    // Five commits in the batch whose fsync fails: none of them may be acknowledged.
    fail.store(true, Ordering::SeqCst);
    gate.arm();
    let sent = log.requests_sent();
    let tasks: Vec<_> = (2..=6)
        .map(|txid| {
            let log = log.clone();
            tokio::spawn(async move { log.commit(commit_record(txid)).await })
        })
        .collect();
    wait_for("the failing batch to be queued", || {
        log.requests_sent() == sent + 5
    })
    .await;
    gate.release();
    for task in tasks {
        let error = task.await.unwrap().unwrap_err();
        let LogError::Poisoned(failure) = &error else {
            panic!("expected Poisoned, got {error}");
        };
        assert_eq!(failure.action, "fdatasync of");
        assert!(failure.source.to_string().contains("injected fsync failure"));
    }
    assert_eq!(log.stats().fsyncs, before.fsyncs);

    // Even once the disk "recovers", the log never retries.
    fail.store(false, Ordering::SeqCst);
    let poisoned = |result: Result<(), LogError>| matches!(result, Err(LogError::Poisoned(_)));
    assert!(poisoned(log.commit(commit_record(7)).await));
    assert!(poisoned(log.reserve_txids(100).await));
    assert!(poisoned(log.write_header("c1").await));
    assert!(poisoned(log.flush().await));
    log.end(1); // dropped quietly
    let clone = log.clone();
    assert!(poisoned(clone.commit(commit_record(8)).await));
    let message = clone.flush().await.unwrap_err().to_string();
    assert!(message.contains("restart the coordinator"), "{message}");
    assert_eq!(log.stats().fsyncs, before.fsyncs);
    drop((log, clone));

    // A restart recovers from what is durable: the acknowledged commit, and a working log.
    let (log, replay) = open(dir.path());
    assert!(txids(&replay).starts_with(&[1]), "{:?}", txids(&replay));
    log.commit(commit_record(9)).await.unwrap();
    drop(log);
    let (_log, replay) = open(dir.path());
    assert!(txids(&replay).contains(&9));
}

#[tokio::test]
async fn every_batch_written_is_told_to_the_observer_with_its_records_and_fsync() {
    let dir = TempDir::new().unwrap();
    let seen: Arc<Mutex<Vec<BatchWritten>>> = Arc::default();
    let observer = Arc::clone(&seen);
    let options = LogOptions {
        on_batch: Some(Arc::new(move |batch| {
            observer.lock().unwrap().push(batch);
        })),
        ..LogOptions::default()
    };
    let (log, _) = open_with(dir.path(), options, TestHooks::default());
    log.commit(commit_record(1)).await.unwrap();
    // The batch is told before its waiters wake: seen by the time the commit returns.
    let batches = seen.lock().unwrap().clone();
    assert!(
        batches.iter().any(|batch| batch.records == 1 && batch.synced),
        "{batches:?}"
    );
    log.end(1);
    log.flush().await.unwrap();
    let batches = seen.lock().unwrap().clone();
    assert!(
        batches.iter().map(|batch| batch.records).sum::<u64>() >= 2,
        "the commit and its end record: {batches:?}"
    );
}
