//! What one load phase measured: commits, aborts by reason, and a latency histogram (HdrHistogram,
//! microseconds, 3 significant figures), merged across clients and rounds; and the summary figures
//! (throughput, percentiles) derived from them.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Latencies above this are clamped (a request times out well before).
const MAX_LATENCY_US: u64 = 120_000_000;

/// Commit latencies in microseconds.
#[derive(Clone)]
pub struct Latencies {
    histogram: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            // 1 µs .. 120 s at 3 significant figures: constant bounds that are valid.
            histogram: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                .expect("constant histogram bounds are valid"),
        }
    }
}

impl Latencies {
    pub fn record(&mut self, latency: Duration) {
        let micros = (latency.as_micros() as u64).clamp(1, MAX_LATENCY_US);
        // In range by the clamp, so recording cannot fail.
        let _ = self.histogram.record(micros);
    }

    pub fn merge(&mut self, other: &Latencies) {
        let _ = self.histogram.add(&other.histogram);
    }

    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    /// The latency at quantile `q` (0..=1) in milliseconds; 0 when empty.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.histogram.is_empty() {
            return 0.0;
        }
        self.histogram.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn max_ms(&self) -> f64 {
        if self.histogram.is_empty() {
            return 0.0;
        }
        self.histogram.max() as f64 / 1000.0
    }

    pub fn mean_ms(&self) -> f64 {
        self.histogram.mean() / 1000.0
    }

    /// Points `(latency ms, cumulative fraction)` for a CDF plot.
    pub fn cdf_points(&self) -> Vec<(f64, f64)> {
        if self.histogram.is_empty() {
            return Vec::new();
        }
        let mut quantiles: Vec<f64> = (0..=98).map(|i| f64::from(i) / 100.0).collect();
        quantiles.extend([0.99, 0.995, 0.999, 0.9999, 1.0]);
        quantiles.into_iter().map(|q| (self.quantile_ms(q), q)).collect()
    }
}

/// Counts and latencies from one client, one phase, or several merged.
#[derive(Clone, Default)]
pub struct Counts {
    pub committed: u64,
    /// Aborted or failed transactions by reason (`statement_failed/55P03`, `timeout`, ...).
    pub aborts: BTreeMap<String, u64>,
    pub latencies: Latencies,
}

impl Counts {
    pub fn commit(&mut self, latency: Duration) {
        self.committed += 1;
        self.latencies.record(latency);
    }

    pub fn abort(&mut self, reason: String) {
        *self.aborts.entry(reason).or_default() += 1;
    }

    pub fn aborted(&self) -> u64 {
        self.aborts.values().sum()
    }

    pub fn merge(&mut self, other: &Counts) {
        self.committed += other.committed;
        for (reason, n) in &other.aborts {
            *self.aborts.entry(reason.clone()).or_default() += n;
        }
        self.latencies.merge(&other.latencies);
    }
}

/// The figures reported for one system (Treaty or a baseline) over all its rounds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Figures {
    pub tps: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Figures {
    pub fn of(counts: &Counts, elapsed: Duration) -> Figures {
        let seconds = elapsed.as_secs_f64();
        Figures {
            tps: if seconds > 0.0 {
                counts.committed as f64 / seconds
            } else {
                0.0
            },
            p50_ms: counts.latencies.quantile_ms(0.50),
            p95_ms: counts.latencies.quantile_ms(0.95),
            p99_ms: counts.latencies.quantile_ms(0.99),
            max_ms: counts.latencies.max_ms(),
            mean_ms: counts.latencies.mean_ms(),
        }
    }
}

/// `a / b`, or `None` when `b` is zero (no baseline figure to compare with).
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut counts = Counts::default();
        for ms in 1..=100u64 {
            counts.commit(Duration::from_millis(ms));
        }
        let figures = Figures::of(&counts, Duration::from_secs(10));
        assert_eq!(figures.tps, 10.0);
        // 3 significant figures: within 0.1%.
        let close = |a: f64, b: f64| (a - b).abs() <= b * 0.002;
        assert!(close(figures.p50_ms, 50.0), "p50 {}", figures.p50_ms);
        assert!(close(figures.p95_ms, 95.0), "p95 {}", figures.p95_ms);
        assert!(close(figures.p99_ms, 99.0), "p99 {}", figures.p99_ms);
        assert!(close(figures.max_ms, 100.0), "max {}", figures.max_ms);
    }

    #[test]
    fn merging_adds_counts_reasons_and_latencies() {
        let mut a = Counts::default();
        a.commit(Duration::from_micros(500));
        a.abort("timeout".into());
        let mut b = Counts::default();
        b.commit(Duration::from_millis(3));
        b.abort("timeout".into());
        b.abort("vote_no".into());
        a.merge(&b);
        assert_eq!(a.committed, 2);
        assert_eq!(a.aborted(), 3);
        assert_eq!(a.aborts.get("timeout"), Some(&2));
        assert_eq!(a.latencies.count(), 2);
        assert!(a.latencies.max_ms() >= 2.99);
        let cdf = a.latencies.cdf_points();
        assert!(cdf.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
    }

    #[test]
    fn empty_figures_and_ratios() {
        let figures = Figures::of(&Counts::default(), Duration::ZERO);
        assert_eq!(figures, Figures::default());
        assert_eq!(ratio(1.0, 0.0), None);
        assert_eq!(ratio(3.0, 2.0), Some(1.5));
    }
}
