//! The trace of one seed: every event the simulation saw (messages sent, delivered, dropped,
//! duplicated, timed out; crashes and restarts; records written, made durable and lost; branches
//! prepared and finished; what clients and operators were told), stamped with virtual time. A
//! failing seed prints it; two runs of one seed must produce the same trace.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

/// A shared, append-only list of events in virtual-time order.
#[derive(Clone)]
pub struct Trace {
    start: Instant,
    events: Arc<Mutex<Vec<(u64, String)>>>,
}

impl Trace {
    /// A trace whose time 0 is now (call inside the seed's runtime).
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            events: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Virtual milliseconds since the seed started.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub fn record(&self, event: impl Into<String>) {
        let at = self.now_ms();
        self.events
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push((at, event.into()));
    }

    /// The events, in virtual-time order; events of the same millisecond sorted by text, so that
    /// tokio's order among tasks woken at the same instant does not change the comparison.
    pub fn canonical(&self) -> Vec<(u64, String)> {
        let mut events = self
            .events
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        events.sort();
        events
    }

    pub fn len(&self) -> usize {
        self.events
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
    }

    /// For each needle, how many events contain it.
    pub fn count_containing<'a>(&self, needles: impl Iterator<Item = &'a str>) -> Vec<u64> {
        let events = self
            .events
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        needles
            .map(|needle| events.iter().filter(|(_, event)| event.contains(needle)).count() as u64)
            .collect()
    }

    /// The whole trace, one event a line, as it happened.
    pub fn render(&self) -> String {
        let events = self
            .events
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut out = String::new();
        for (at, event) in events.iter() {
            let _ = writeln!(out, "{at:>7} ms  {event}");
        }
        out
    }
}
