//! The participant's Prometheus metrics (served on `--metrics-addr` by
//! `treaty_proto::metrics_endpoint`), every one labelled with the participant's `shard`.
//!
//! Counters and histograms are one process-wide set ([`global`]), touched where the agent votes
//! and finishes branches and where recovery applies a decision: an atomic add or one histogram
//! observe, no allocation. What describes state is read when Prometheus scrapes, off the commit
//! path: the prepared branches of this shard and the age of the oldest (one query of
//! `pg_prepared_xacts`, bounded by [`SCAN_TIMEOUT`]), the open branches and the pool's
//! connections (in memory).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use treaty_proto::metrics_endpoint::{Refresh, prometheus_client};
use treaty_proto::{BranchGid, Gid, ShardName};

use crate::agent::{Agent, Vote};
use crate::postgres;

/// How long a scrape waits for `pg_prepared_xacts`; past it the prepared-branch gauges are left
/// out of that scrape (and `treaty_participant_database_up` says 0).
const SCAN_TIMEOUT: Duration = Duration::from_secs(2);

type Labels<const N: usize> = [(&'static str, &'static str); N];
type HistogramFamily<const N: usize> = Family<Labels<N>, Histogram, fn() -> Histogram>;

/// Buckets from 0.25 ms to about 8 s, doubling: a PREPARE or COMMIT PREPARED is a local round
/// trip and an fsync, slower under lock waits or a struggling disk.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.00025, 2.0, 16))
}

pub struct Metrics {
    votes: Family<Labels<1>, Counter>,
    prepare_seconds: Histogram,
    finished: Family<Labels<1>, Counter>,
    finish_seconds: HistogramFamily<1>,
    resolved_by_recovery: Family<Labels<1>, Counter>,
    recovery_pass_errors: Counter,
    dirty_connections_closed: Family<Labels<1>, Counter>,
    session_checks: Family<Labels<1>, Counter>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    votes: Family::default(),
    prepare_seconds: latency_histogram(),
    finished: Family::default(),
    finish_seconds: Family::new_with_constructor(latency_histogram),
    resolved_by_recovery: Family::default(),
    recovery_pass_errors: Counter::default(),
    dirty_connections_closed: Family::default(),
    session_checks: Family::default(),
});

/// Who found that a branch may have changed its connection's session (`dirty_connection_closed`).
const FOUND_BY: [&str; 2] = ["sql_guard", "session_check"];

/// When a pooled connection's session was checked (`session_checked`, `pool`): `handover`, in a
/// round trip of its own before it served another database role or the participant itself;
/// `branch_end`, in the round trip that ended a branch, once `pool::CHECK_INTERVAL` had passed
/// since its last check; `idle`, by the idle sweep on a connection left waiting unchecked.
pub const CHECKED_AT: [&str; 3] = ["handover", "branch_end", "idle"];

pub fn global() -> &'static Metrics {
    &METRICS
}

fn decision_label(commit: bool) -> &'static str {
    if commit { "commit" } else { "abort" }
}

impl Metrics {
    /// A vote cast (2PC or 3PC) and how long preparing took.
    pub fn voted(&self, vote: &Vote, elapsed: Duration) {
        let vote = match vote {
            Vote::Yes => "yes",
            Vote::ReadOnly => "read_only",
            Vote::No { .. } => "no",
        };
        self.votes.get_or_create(&[("vote", vote)]).inc();
        self.prepare_seconds.observe(elapsed.as_secs_f64());
    }

    /// A coordinator's COMMIT or ABORT of a branch carried out (or refused) and how long it took.
    pub fn finished(&self, commit: bool, elapsed: Duration) {
        let decision = decision_label(commit);
        self.finished.get_or_create(&[("decision", decision)]).inc();
        self.finish_seconds
            .get_or_create(&[("decision", decision)])
            .observe(elapsed.as_secs_f64());
    }

    /// A prepared branch finished by recovery with the decision a coordinator answered.
    pub fn resolved_by_recovery(&self, commit: bool) {
        self.resolved_by_recovery
            .get_or_create(&[("decision", decision_label(commit))])
            .inc();
    }

    /// A recovery pass that failed (the database or every coordinator unreachable).
    pub fn recovery_pass_failed(&self) {
        self.recovery_pass_errors.inc();
    }

    /// A branch's connection closed instead of pooled because its session may have changed;
    /// `found_by` is one of `FOUND_BY`: the SQL guard saw such a statement, or the check after
    /// the branch's last statement found a difference.
    pub fn dirty_connection_closed(&self, found_by: &'static str) {
        self.dirty_connections_closed
            .get_or_create(&[("found_by", found_by)])
            .inc();
    }

    /// A session check run on a pooled connection; `when` is one of `CHECKED_AT`.
    pub fn session_checked(&self, when: &'static str) {
        self.session_checks.get_or_create(&[("when", when)]).inc();
    }

    /// Session checks run so far at `when` (one of `CHECKED_AT`), in this process.
    pub fn session_checks(&self, when: &'static str) -> u64 {
        self.session_checks.get_or_create(&[("when", when)]).get()
    }

    /// Creates every series of the bounded label sets at 0, so that each is scraped from the
    /// start (`rate()` and alerts see a 0, not a missing series).
    fn create_series(&self) {
        for vote in ["yes", "read_only", "no"] {
            self.votes.get_or_create_owned(&[("vote", vote)]);
        }
        for commit in [true, false] {
            let decision = [("decision", decision_label(commit))];
            self.finished.get_or_create_owned(&decision);
            self.finish_seconds.get_or_create_owned(&decision);
            self.resolved_by_recovery.get_or_create_owned(&decision);
        }
        for found_by in FOUND_BY {
            self.dirty_connections_closed
                .get_or_create_owned(&[("found_by", found_by)]);
        }
        for when in CHECKED_AT {
            self.session_checks.get_or_create_owned(&[("when", when)]);
        }
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "treaty_participant_votes",
            "Votes cast, by vote (yes, read_only, no)",
            self.votes.clone(),
        );
        registry.register(
            "treaty_participant_prepare_seconds",
            "Preparing a branch: from the vote request to the vote (PREPARE TRANSACTION included)",
            self.prepare_seconds.clone(),
        );
        registry.register(
            "treaty_participant_phase_two",
            "The coordinator's decisions carried out on a branch, by decision",
            self.finished.clone(),
        );
        registry.register(
            "treaty_participant_phase_two_seconds",
            "Carrying out a decision on a branch (COMMIT PREPARED or ROLLBACK PREPARED), by decision",
            self.finish_seconds.clone(),
        );
        registry.register(
            "treaty_participant_recovered_branches",
            "Prepared branches recovery finished with a coordinator's answer, by decision",
            self.resolved_by_recovery.clone(),
        );
        registry.register(
            "treaty_participant_recovery_pass_errors",
            "Recovery passes that failed (database or coordinators unreachable)",
            self.recovery_pass_errors.clone(),
        );
        registry.register(
            "treaty_participant_dirty_connections_closed",
            "Branch connections closed instead of pooled because the branch may have changed their \
             session, by who found it (sql_guard: a statement that may; session_check: the session \
             check found the role, temporary schema, search_path or a setting changed)",
            self.dirty_connections_closed.clone(),
        );
        registry.register(
            "treaty_participant_session_checks",
            "Session checks run on pooled connections, by when (handover: before serving another \
             database role or the participant itself, a round trip of its own; branch_end: with a \
             branch's last round trip, at most once a second per connection; idle: by the idle sweep)",
            self.session_checks.clone(),
        );
    }
}

/// This shard's prepared branches as last read from `pg_prepared_xacts`.
#[derive(Debug, Clone, Copy, Default)]
struct PreparedScan {
    branches: u64,
    oldest_age_ms: u64,
}

/// The state the gauges show, refreshed before each scrape.
struct State {
    agent: Weak<Agent>,
    shard: ShardName,
    /// `None` when the last scan failed or timed out.
    prepared: Mutex<Option<PreparedScan>>,
    max_connections: AtomicU64,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("participant metrics state")
    }
}

impl State {
    fn prepared(&self) -> std::sync::MutexGuard<'_, Option<PreparedScan>> {
        // A plain value: a panic elsewhere cannot leave it half-written.
        self.prepared
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn refresh(&self) {
        let Some(agent) = self.agent.upgrade() else {
            return;
        };
        let scanned = tokio::time::timeout(SCAN_TIMEOUT, postgres::list_prepared(agent.pool())).await;
        let scan = match scanned {
            Ok(Ok(xacts)) => {
                let ours: Vec<i64> = xacts
                    .iter()
                    .filter(|xact| self.is_ours(&xact.gid))
                    .map(|xact| xact.age_ms)
                    .collect();
                Some(PreparedScan {
                    branches: ours.len() as u64,
                    // A negative age (clock skew) counts as 0.
                    oldest_age_ms: ours
                        .iter()
                        .copied()
                        .max()
                        .map_or(0, |age| u64::try_from(age).unwrap_or(0)),
                })
            }
            Ok(Err(error)) => {
                tracing::debug!("metrics: listing prepared branches: {error}");
                None
            }
            Err(_) => None,
        };
        *self.prepared() = scan;
    }

    /// This shard's branch GIDs, and bare GIDs an older version prepared under (recovery finishes
    /// both); another shard's branch in the same database is that shard's participant's to count.
    fn is_ours(&self, text: &str) -> bool {
        match BranchGid::parse(text) {
            Ok(branch) => branch.is_of(&self.shard),
            Err(_) => Gid::parse(text).is_ok(),
        }
    }
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> Result<(), std::fmt::Error> {
    let gauge = ConstGauge::new(value);
    gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
}

fn saturating(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

struct StateCollector(Arc<State>);

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateCollector")
    }
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let state = &self.0;
        let prepared = *state.prepared();
        gauge(
            &mut encoder,
            "treaty_participant_database_up",
            "1 when this scrape could read pg_prepared_xacts, 0 when not (the prepared-branch gauges are then left out)",
            i64::from(prepared.is_some()),
        )?;
        if let Some(scan) = prepared {
            gauge(
                &mut encoder,
                "treaty_participant_prepared_branches",
                "This shard's branches PostgreSQL holds prepared: voted YES, waiting for the outcome (in doubt)",
                saturating(scan.branches),
            )?;
            let age = ConstGauge::new(scan.oldest_age_ms as f64 / 1000.0);
            age.encode(encoder.encode_descriptor(
                "treaty_participant_oldest_prepared_branch_age_seconds",
                "Age of this shard's oldest prepared branch (pg_prepared_xacts.prepared); 0 when none. Locks held that long block other writers",
                None,
                age.metric_type(),
            )?)?;
        }
        if let Some(agent) = state.agent.upgrade() {
            gauge(
                &mut encoder,
                "treaty_participant_open_branches",
                "Branches with an open PostgreSQL transaction here (active, not yet prepared or finished)",
                saturating(agent.open_branches() as u64),
            )?;
            let pool = agent.pool();
            gauge(
                &mut encoder,
                "treaty_participant_pool_connections_in_use",
                "Pooled PostgreSQL connections in use (each open branch holds one)",
                saturating(pool.in_use() as u64),
            )?;
            gauge(
                &mut encoder,
                "treaty_participant_pool_connections_idle",
                "Pooled PostgreSQL connections open and idle",
                saturating(pool.idle_count() as u64),
            )?;
        }
        gauge(
            &mut encoder,
            "treaty_participant_pool_connections_max",
            "The pool's limit (--max-connections)",
            saturating(state.max_connections.load(Ordering::Relaxed)),
        )?;
        Ok(())
    }
}

/// The registry `--metrics-addr` serves, every metric labelled `shard`, and the refresh that
/// reads the prepared branches before each scrape.
pub fn registry(agent: &Arc<Agent>) -> (Registry, Refresh) {
    let shard = agent.shard().clone();
    let mut registry = Registry::with_labels(std::iter::once((
        std::borrow::Cow::Borrowed("shard"),
        std::borrow::Cow::Owned(shard.to_string()),
    )));
    global().create_series();
    global().register(&mut registry);
    let state = Arc::new(State {
        agent: Arc::downgrade(agent),
        shard,
        prepared: Mutex::new(None),
        max_connections: AtomicU64::new(u64::from(agent.pool().max_connections())),
    });
    registry.register_collector(Box::new(StateCollector(Arc::clone(&state))));
    let refresh: Refresh = Arc::new(move || {
        let state = Arc::clone(&state);
        Box::pin(async move { state.refresh().await })
    });
    (registry, refresh)
}
