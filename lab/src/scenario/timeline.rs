//! What happened during a scenario, in order: steps the runner took, processes that died, and the
//! notable lines the processes logged themselves (failpoints firing, recovery, damage), merged by
//! time and printed relative to the scenario's start.

use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use chrono::{DateTime, Utc};

pub struct Timeline {
    started: Instant,
    started_wall: DateTime<Utc>,
    events: Mutex<Vec<(f64, String)>>,
    live: bool,
}

/// Log lines worth showing in a timeline.
const NOTABLE: &[&str] = &[
    "failpoint fired",
    ": crash",
    "unsynced tail",
    "log replayed",
    "re-driving",
    "recover",
    "damage",
    "in doubt",
    "resolved",
    "reconcil",
    // 3PC: participants finishing a transaction without the coordinator.
    "terminat",
    // The shard store: a restart's replay, and one instance finishing another's transactions.
    "store replayed",
    "commit row",
    "decision row",
    "concluded",
];

impl Timeline {
    /// `live`: also print each event to stderr as it happens.
    pub fn new(live: bool) -> Timeline {
        Timeline {
            started: Instant::now(),
            started_wall: Utc::now(),
            events: Mutex::new(Vec::new()),
            live,
        }
    }

    pub fn elapsed_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn note(&self, what: impl Into<String>) {
        let at = self.elapsed_s();
        let what = what.into();
        if self.live {
            eprintln!("  [{at:>7.3}s] {what}");
        }
        if let Ok(mut events) = self.events.lock() {
            events.push((at, what));
        }
    }

    /// Adds the notable lines of a process log (human tracing format: RFC 3339 time first).
    pub fn absorb_log(&self, process: &str, path: &Path) {
        let Ok(text) = std::fs::read_to_string(path) else {
            return;
        };
        let mut found = Vec::new();
        for line in text.lines() {
            let line = strip_ansi(line);
            let lower = line.to_lowercase();
            if !NOTABLE.iter().any(|n| lower.contains(n)) {
                continue;
            }
            let Some((stamp, rest)) = line.split_once(' ') else {
                continue;
            };
            let Ok(at) = DateTime::parse_from_rfc3339(stamp.trim()) else {
                continue;
            };
            let offset = (at.with_timezone(&Utc) - self.started_wall)
                .num_microseconds()
                .unwrap_or(0) as f64
                / 1e6;
            if offset < 0.0 {
                continue;
            }
            let message: String = rest.trim().chars().take(160).collect();
            found.push((offset, message));
        }
        let found = collapse_repeats(found);
        if let Ok(mut events) = self.events.lock() {
            events.extend(
                found
                    .into_iter()
                    .map(|(at, message)| (at, format!("{process}: {message}"))),
            );
        }
    }

    pub fn render(&self) -> Vec<String> {
        let mut events = self.events.lock().map(|e| e.clone()).unwrap_or_default();
        events.sort_by(|a, b| a.0.total_cmp(&b.0));
        events
            .into_iter()
            .map(|(at, what)| format!("[{at:>7.3}s] {what}"))
            .collect()
    }
}

/// Lines of one process that say the same thing, give or take numbers (a participant warning
/// every reconcile tick while the coordinator is down), in runs of at least this many, are shown
/// once with a count.
const REPEAT_RUN: usize = 3;

fn repeat_key(message: &str) -> String {
    message.chars().filter(|c| !c.is_ascii_digit()).take(80).collect()
}

/// Folds each run of [`REPEAT_RUN`] or more consecutive similar lines into its first line,
/// annotated with how many followed and until when.
fn collapse_repeats(lines: Vec<(f64, String)>) -> Vec<(f64, String)> {
    let mut out: Vec<(f64, String)> = Vec::new();
    let mut run: Vec<(f64, String)> = Vec::new();
    let flush = |run: &mut Vec<(f64, String)>, out: &mut Vec<(f64, String)>| {
        if run.len() >= REPEAT_RUN {
            let (first_at, first) = run[0].clone();
            let last_at = run[run.len() - 1].0;
            out.push((
                first_at,
                format!("{first} [and {} more like it until {last_at:.3}s]", run.len() - 1),
            ));
        } else {
            out.append(run);
        }
        run.clear();
    };
    for line in lines {
        if run
            .last()
            .is_some_and(|(_, last)| repeat_key(last) != repeat_key(&line.1))
        {
            flush(&mut run, &mut out);
        }
        run.push(line);
    }
    flush(&mut run, &mut out);
    out
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_the_same_warning_fold_into_one_line_with_a_count() {
        let warn = |at: f64, error: &str| {
            (
                at,
                format!(
                    "WARN treaty_participant::reconcile: recovery pass: coordinator at http://127.0.0.1:{} is unreachable: {error}",
                    4000 + at as u32
                ),
            )
        };
        let lines = vec![
            (0.1, "INFO re-driving a logged commit txid=1".to_string()),
            (0.2, "INFO re-driving a logged commit txid=2".to_string()),
            warn(1.0, "tcp connect error"),
            warn(1.2, "transport error"),
            warn(1.4, "tcp connect error"),
            (2.0, "INFO resolved txid=1".to_string()),
        ];
        let folded = collapse_repeats(lines);
        assert_eq!(folded.len(), 4, "{folded:?}");
        // Two alike stay as they are.
        assert_eq!(folded[0].1, "INFO re-driving a logged commit txid=1");
        assert_eq!(folded[1].1, "INFO re-driving a logged commit txid=2");
        assert_eq!(folded[2].0, 1.0);
        assert!(
            folded[2].1.ends_with("[and 2 more like it until 1.400s]"),
            "{}",
            folded[2].1
        );
        assert_eq!(folded[3].1, "INFO resolved txid=1");
    }
}
