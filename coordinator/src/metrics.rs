//! The coordinator's Prometheus metrics (served on `--metrics-addr` by
//! `treaty_proto::metrics_endpoint`): what it counts, the histograms it observes, and the gauges
//! read from its state at scrape time.
//!
//! Counters and histograms are one process-wide set ([`global`]): they are touched deep in the
//! generic driver, in the gRPC links and in spawned tasks, and a handle threaded through all of
//! them (and through the seeded simulation, which runs the same driver) would buy nothing, since a
//! metric never changes what the coordinator does. On the commit path they cost an atomic add or
//! one histogram observe; nothing allocates there except a `shard` label value on a link error.
//! Gauges that describe state (transactions in flight and in doubt, the decision log's counters)
//! are read from the engine by a collector when Prometheus scrapes, never kept up to date on the
//! commit path.
//!
//! Label sets are bounded: protocol, outcome, abort cause, shard (configured), RPC, store and
//! record kinds. No txid or GID is ever a label.

use std::sync::{Arc, LazyLock, Weak};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use treaty_commit_protocol::transport::LinkError;
use treaty_decision_log::{BatchObserver, BatchWritten, DecisionLog, LogStats};
use treaty_proto::metrics_endpoint::prometheus_client;
use treaty_proto::{Protocol, ShardName};

use crate::protocol::{AbortCause, Outcome};

type Labels<const N: usize> = [(&'static str, &'static str); N];
type HistogramFamily<const N: usize> = Family<Labels<N>, Histogram, fn() -> Histogram>;

/// Latency buckets from 0.5 ms to about 16 s, doubling: a commit's phases span local fsyncs and
/// round trips (sub-millisecond to milliseconds) up to retries under faults (seconds).
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Every counter and histogram of the coordinator.
pub struct Metrics {
    begun: Family<Labels<1>, Counter>,
    finished: Family<Labels<3>, Counter>,
    transaction_seconds: HistogramFamily<2>,
    execute_seconds: Histogram,
    prepare_seconds: Histogram,
    decision_durable_seconds: HistogramFamily<1>,
    phase_two_seconds: HistogramFamily<1>,
    store_write_seconds: HistogramFamily<1>,
    log_batch_records: Histogram,
    log_batch_seconds: Histogram,
    phase_two_retries: Counter,
    link_retries: Counter,
    link_connections: Counter,
    link_errors: Family<Vec<(&'static str, String)>, Counter>,
    redrives: Family<Labels<1>, Counter>,
    recoveries: Counter,
    heuristic: Family<Labels<1>, Counter>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    begun: Family::default(),
    finished: Family::default(),
    transaction_seconds: Family::new_with_constructor(latency_histogram),
    execute_seconds: latency_histogram(),
    prepare_seconds: latency_histogram(),
    decision_durable_seconds: Family::new_with_constructor(latency_histogram),
    phase_two_seconds: Family::new_with_constructor(latency_histogram),
    store_write_seconds: Family::new_with_constructor(latency_histogram),
    // 1 to 1024 records, doubling: a batch holds whatever was waiting while the last fsync ran.
    log_batch_records: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
    log_batch_seconds: latency_histogram(),
    phase_two_retries: Counter::default(),
    link_retries: Counter::default(),
    link_connections: Counter::default(),
    link_errors: Family::default(),
    redrives: Family::default(),
    recoveries: Counter::default(),
    heuristic: Family::default(),
});

/// The process's metrics.
pub fn global() -> &'static Metrics {
    &METRICS
}

pub fn protocol_label(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::TwoPhase => "two_phase",
        Protocol::ThreePhase => "three_phase",
    }
}

fn cause_label(cause: AbortCause) -> &'static str {
    match cause {
        AbortCause::ClientRollback => "client_rollback",
        AbortCause::StatementFailed => "statement_failed",
        AbortCause::VoteNo => "vote_no",
        AbortCause::Timeout => "timeout",
        AbortCause::ExpectRows => "expect_rows",
        AbortCause::ParticipantUnavailable => "participant_unavailable",
        AbortCause::CoordinatorRestart => "coordinator_restart",
        AbortCause::Heuristic => "heuristic",
        AbortCause::ConcludedAbort => "concluded_abort",
    }
}

/// `kind` of `treaty_link_errors_total` (every one but `sql` is created at 0 in `create_series`).
fn link_error_label(error: &LinkError) -> &'static str {
    match error {
        LinkError::Sql { .. } => "sql",
        LinkError::Unavailable(_) => "unavailable",
        LinkError::TimedOut { .. } | LinkError::Deadline(_) => "timeout",
        LinkError::Refused(_) => "refused",
        LinkError::Invalid(_) => "invalid",
        LinkError::NotFound(_) => "not_found",
        LinkError::Exhausted(_) => "exhausted",
        LinkError::BranchLost(_) => "branch_lost",
        LinkError::Unimplemented(_) => "unimplemented",
        LinkError::Other(_) => "other",
    }
}

/// Where a decision is made durable (`treaty_decision_durable_seconds{store}`).
#[derive(Debug, Clone, Copy)]
pub enum DecisionStoreLabel {
    /// The coordinator's file log (fsync).
    File,
    /// A dedicated decision database.
    Database,
    /// The decision branch's COMMIT of its row (`--decision-store shard`).
    Shard,
}

/// The kinds of call to a participant the phase histograms time.
#[derive(Debug, Clone, Copy)]
pub enum Rpc {
    Execute,
    Prepare,
    Commit,
    Abort,
    CommitOnePhase,
    PreCommit,
    /// The decision branch's commit row and COMMIT (`--decision-store shard`): the decision made
    /// durable.
    CommitDecision,
    /// Any other call (decision rows, listings, state queries): only its errors are counted.
    Other,
}

impl Metrics {
    pub fn begun(&self, protocol: Protocol) {
        self.begun
            .get_or_create(&[("protocol", protocol_label(protocol))])
            .inc();
    }

    /// A transaction's outcome as its client hears it, and how long it took from begin.
    pub fn finished(&self, protocol: Protocol, outcome: &Outcome, elapsed: Duration) {
        let (outcome, cause) = match outcome {
            Outcome::Committed => ("committed", "none"),
            Outcome::Aborted(reason) => ("aborted", cause_label(reason.cause)),
            Outcome::Unknown(_) => ("unknown", "none"),
        };
        let protocol = protocol_label(protocol);
        self.finished
            .get_or_create(&[("protocol", protocol), ("outcome", outcome), ("cause", cause)])
            .inc();
        self.transaction_seconds
            .get_or_create(&[("protocol", protocol), ("outcome", outcome)])
            .observe(elapsed.as_secs_f64());
    }

    /// One call to a participant: its latency in the phase's histogram, and its failure, if any.
    pub fn participant_call<R>(
        &self,
        shard: &ShardName,
        rpc: Rpc,
        elapsed: Duration,
        result: &Result<R, LinkError>,
    ) {
        let seconds = elapsed.as_secs_f64();
        match rpc {
            Rpc::Execute => self.execute_seconds.observe(seconds),
            Rpc::Prepare => self.prepare_seconds.observe(seconds),
            Rpc::Commit => self
                .phase_two_seconds
                .get_or_create(&[("decision", "commit")])
                .observe(seconds),
            Rpc::Abort => self
                .phase_two_seconds
                .get_or_create(&[("decision", "abort")])
                .observe(seconds),
            Rpc::CommitOnePhase => self
                .phase_two_seconds
                .get_or_create(&[("decision", "commit_one_phase")])
                .observe(seconds),
            Rpc::PreCommit => self
                .phase_two_seconds
                .get_or_create(&[("decision", "pre_commit")])
                .observe(seconds),
            Rpc::CommitDecision => self.decision_durable(DecisionStoreLabel::Shard, elapsed),
            Rpc::Other => {}
        }
        if let Err(error) = result {
            // A SQL error is the statement's, not the link's.
            if !matches!(error, LinkError::Sql { .. }) {
                self.link_errors
                    .get_or_create(&vec![
                        ("shard", shard.to_string()),
                        ("kind", link_error_label(error).to_owned()),
                    ])
                    .inc();
            }
        }
    }

    /// A decision made durable: its record forced to the log or database, or its row committed.
    pub fn decision_durable(&self, store: DecisionStoreLabel, elapsed: Duration) {
        let store = match store {
            DecisionStoreLabel::File => "file",
            DecisionStoreLabel::Database => "database",
            DecisionStoreLabel::Shard => "shard",
        };
        self.decision_durable_seconds
            .get_or_create(&[("store", store)])
            .observe(elapsed.as_secs_f64());
    }

    /// One forced write to the store (`record`: commit, pre_commit, heuristic, txids, incarnation).
    pub fn store_write(&self, record: &'static str, elapsed: Duration) {
        self.store_write_seconds
            .get_or_create(&[("record", record)])
            .observe(elapsed.as_secs_f64());
    }

    /// One group-commit batch of the decision log (on its writer thread: two observes).
    pub fn log_batch(&self, batch: BatchWritten) {
        self.log_batch_records.observe(batch.records as f64);
        if batch.synced {
            self.log_batch_seconds.observe(batch.duration.as_secs_f64());
        }
    }

    /// A phase-two message (commit, abort, pre-commit) sent again after a lost or failed one.
    pub fn phase_two_retry(&self) {
        self.phase_two_retries.inc();
    }

    /// A call to a participant sent a second time because the first was certainly not processed
    /// (`h2_channel`: refused stream, GOAWAY, a connection already closed).
    pub fn link_retry(&self) {
        self.link_retries.inc();
    }

    /// An HTTP/2 connection to a participant opened (the first, or again after one broke).
    pub fn link_connected(&self) {
        self.link_connections.inc();
    }

    /// A transaction this run took up to finish (`source`: commit, pre_commit, heuristic, takeover).
    pub fn redriven(&self, source: &'static str) {
        self.redrives.get_or_create(&[("source", source)]).inc();
    }

    /// A start that replayed the store and recovered what was unfinished.
    pub fn recovered(&self) {
        self.recoveries.inc();
    }

    /// An operator's decision recorded (`treaty resolve`).
    pub fn heuristic(&self, commit: bool) {
        let decision = if commit { "commit" } else { "abort" };
        self.heuristic.get_or_create(&[("decision", decision)]).inc();
    }

    /// Creates every series of the bounded label sets at 0, so that each is scraped from the
    /// start: `rate()` and alert expressions then see a 0 instead of no series at all.
    fn create_series(&self, shards: &[ShardName]) {
        const PROTOCOLS: [Protocol; 2] = [Protocol::TwoPhase, Protocol::ThreePhase];
        const CAUSES: [AbortCause; 9] = [
            AbortCause::ClientRollback,
            AbortCause::StatementFailed,
            AbortCause::VoteNo,
            AbortCause::Timeout,
            AbortCause::ExpectRows,
            AbortCause::ParticipantUnavailable,
            AbortCause::CoordinatorRestart,
            AbortCause::Heuristic,
            AbortCause::ConcludedAbort,
        ];
        for protocol in PROTOCOLS.map(protocol_label) {
            self.begun.get_or_create_owned(&[("protocol", protocol)]);
            let mut outcomes = vec![("committed", "none"), ("unknown", "none")];
            outcomes.extend(CAUSES.map(|cause| ("aborted", cause_label(cause))));
            for (outcome, cause) in outcomes {
                self.finished.get_or_create_owned(&[
                    ("protocol", protocol),
                    ("outcome", outcome),
                    ("cause", cause),
                ]);
                self.transaction_seconds
                    .get_or_create_owned(&[("protocol", protocol), ("outcome", outcome)]);
            }
        }
        for store in ["file", "database", "shard"] {
            self.decision_durable_seconds
                .get_or_create_owned(&[("store", store)]);
        }
        for decision in ["commit", "abort", "commit_one_phase", "pre_commit"] {
            self.phase_two_seconds
                .get_or_create_owned(&[("decision", decision)]);
        }
        for record in ["commit", "pre_commit", "heuristic", "txids", "incarnation"] {
            self.store_write_seconds
                .get_or_create_owned(&[("record", record)]);
        }
        let kinds = [
            "unavailable",
            "timeout",
            "refused",
            "invalid",
            "not_found",
            "exhausted",
            "branch_lost",
            "unimplemented",
            "other",
        ];
        for shard in shards {
            for kind in kinds {
                self.link_errors
                    .get_or_create_owned(&vec![("shard", shard.to_string()), ("kind", kind.to_owned())]);
            }
        }
        for source in ["commit", "pre_commit", "heuristic", "takeover"] {
            self.redrives.get_or_create_owned(&[("source", source)]);
        }
        for commit in [true, false] {
            self.heuristic
                .get_or_create_owned(&[("decision", if commit { "commit" } else { "abort" })]);
        }
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "treaty_transactions_begun",
            "Transactions begun (interactive and one-shot), by protocol",
            self.begun.clone(),
        );
        registry.register(
            "treaty_transactions_finished",
            "Transactions whose outcome was decided, by protocol, outcome (committed, aborted, unknown) and abort cause",
            self.finished.clone(),
        );
        registry.register(
            "treaty_transaction_seconds",
            "End to end: from begin to the outcome the client hears, by protocol and outcome",
            self.transaction_seconds.clone(),
        );
        registry.register(
            "treaty_execute_seconds",
            "One statement on a participant, as the coordinator waits for it",
            self.execute_seconds.clone(),
        );
        registry.register(
            "treaty_prepare_seconds",
            "One participant's vote: from sending PREPARE to its answer",
            self.prepare_seconds.clone(),
        );
        registry.register(
            "treaty_decision_durable_seconds",
            "Making a commit decision durable, by store: the log's fsync (file), the decision database, or the decision branch's COMMIT (shard)",
            self.decision_durable_seconds.clone(),
        );
        registry.register(
            "treaty_phase_two_seconds",
            "One phase-two message to a participant (commit, abort, one-phase commit, 3PC pre-commit) until it is answered",
            self.phase_two_seconds.clone(),
        );
        registry.register(
            "treaty_decision_store_write_seconds",
            "One forced write to the decision store (group-committed with others waiting), by record kind",
            self.store_write_seconds.clone(),
        );
        registry.register(
            "treaty_decision_log_batch_records",
            "Records per group-commit batch of the decision log (one write, at most one fdatasync)",
            self.log_batch_records.clone(),
        );
        registry.register(
            "treaty_decision_log_write_seconds",
            "One synced batch of the decision log: its write and its fdatasync",
            self.log_batch_seconds.clone(),
        );
        registry.register(
            "treaty_phase_two_retries",
            "Phase-two messages sent again after a failed or unanswered one",
            self.phase_two_retries.clone(),
        );
        registry.register(
            "treaty_link_errors",
            "Calls to a participant that failed on the link or were refused (not SQL errors), by shard and kind",
            self.link_errors.clone(),
        );
        registry.register(
            "treaty_link_retries",
            "Calls to a participant sent a second time because the first was certainly not processed (refused stream, GOAWAY, closed connection)",
            self.link_retries.clone(),
        );
        registry.register(
            "treaty_link_connections",
            "HTTP/2 connections opened to participants (the first, and again after one broke)",
            self.link_connections.clone(),
        );
        registry.register(
            "treaty_redrives",
            "Transactions taken up again to be finished, by source: a commit record or commit row after a restart (commit), a 3PC pre-commit record (pre_commit), an operator's decision (heuristic), another instance's transaction nobody finished (takeover)",
            self.redrives.clone(),
        );
        registry.register(
            "treaty_recoveries",
            "Starts that replayed the decision store and recovered what was unfinished",
            self.recoveries.clone(),
        );
        registry.register(
            "treaty_heuristic_decisions",
            "Operators' heuristic decisions recorded (treaty resolve), by decision",
            self.heuristic.clone(),
        );
    }
}

/// The decision log's observer of its batches (`LogOptions::on_batch`).
pub fn log_batch_observer() -> BatchObserver {
    Arc::new(|batch| global().log_batch(batch))
}

/// What the engine holds now, for the state gauges.
#[derive(Debug, Clone, Copy, Default)]
pub struct Census {
    /// Transactions not finished: active, voting, deciding or in phase two (another instance's
    /// being finished here included).
    pub in_flight: u64,
    /// Decided, with phase two not finished: some participant still holds a prepared branch
    /// waiting to hear the outcome (what `treaty list --filter in-doubt` shows).
    pub in_doubt: u64,
}

/// Reads the engine's census and the decision log's counters at scrape time.
struct StateCollector {
    census: Box<dyn Fn() -> Option<Census> + Send + Sync>,
    log: DecisionLog,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateCollector")
    }
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> Result<(), std::fmt::Error> {
    let gauge = ConstGauge::new(value);
    gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let counter = ConstCounter::new(value);
    counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)
}

fn saturating(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // An engine gone (shutting down) shows no state gauges rather than zeros that would
        // clear an alert.
        if let Some(census) = (self.census)() {
            gauge(
                &mut encoder,
                "treaty_transactions_in_flight",
                "Transactions not finished: active, voting, deciding or in phase two",
                saturating(census.in_flight),
            )?;
            gauge(
                &mut encoder,
                "treaty_transactions_in_doubt",
                "Transactions decided whose phase two has not finished: a participant holds a prepared branch waiting for the outcome",
                saturating(census.in_doubt),
            )?;
        }
        let LogStats {
            records_appended,
            fsyncs,
            bytes_written,
            compactions,
            batches,
        } = self.log.stats();
        counter(
            &mut encoder,
            "treaty_decision_log_records",
            "Records appended to the decision log since start",
            records_appended,
        )?;
        counter(
            &mut encoder,
            "treaty_decision_log_batches",
            "Group-commit batches the decision log wrote since start (records / batches is the mean batch size)",
            batches,
        )?;
        counter(
            &mut encoder,
            "treaty_decision_log_fsyncs",
            "fdatasync calls of the decision log since start",
            fsyncs,
        )?;
        counter(
            &mut encoder,
            "treaty_decision_log_bytes_written",
            "Bytes appended to the decision log since start",
            bytes_written,
        )?;
        counter(
            &mut encoder,
            "treaty_decision_log_compactions",
            "Compactions of the decision log since start",
            compactions,
        )?;
        Ok(())
    }
}

/// The registry `--metrics-addr` serves: every counter and histogram, plus the state gauges of
/// `engine` (held weakly: the endpoint never keeps a stopped engine alive) and the log's counters.
pub fn registry<E: Send + Sync + 'static>(
    engine: &Arc<E>,
    census: fn(&E) -> Census,
    log: DecisionLog,
    shards: &[ShardName],
) -> Registry {
    let mut registry = Registry::default();
    global().create_series(shards);
    global().register(&mut registry);
    let weak: Weak<E> = Arc::downgrade(engine);
    registry.register_collector(Box::new(StateCollector {
        census: Box::new(move || weak.upgrade().map(|engine| census(&engine))),
        log,
    }));
    registry
}
