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
            found.push((offset, format!("{process}: {message}")));
        }
        if let Ok(mut events) = self.events.lock() {
            events.extend(found);
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
