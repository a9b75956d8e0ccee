//! One-shot crash points: `--crash-at POINT` makes the process abort, as SIGKILL would, the first
//! time it reaches POINT. A marker file in the data directory makes it one-shot, so the restarted
//! process (same flags) runs through. Recovery tests use these to stop at an exact protocol step.
//!
//! Points: `before-commit-decision` (all votes in, nothing logged), `after-commit-decision` (the
//! decision is durable, no participant told).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

struct Armed {
    point: String,
    marker: PathBuf,
}

static ARMED: OnceLock<Option<Armed>> = OnceLock::new();

/// Arms `point` (if any) for this process; later calls are ignored.
pub fn arm(point: Option<&str>, data_dir: &Path) {
    let armed = point.map(|point| Armed {
        point: point.to_owned(),
        marker: data_dir.join(format!("crashed-at-{point}")),
    });
    let _ = ARMED.set(armed);
}

/// Aborts the process if `point` is armed and has not fired before.
pub fn hit(point: &str) {
    let Some(Some(armed)) = ARMED.get() else { return };
    if armed.point != point || armed.marker.exists() {
        return;
    }
    if let Err(e) = std::fs::write(&armed.marker, point) {
        tracing::error!(
            "crash point {point}: cannot write marker {}: {e}",
            armed.marker.display()
        );
    }
    eprintln!("crash point {point} reached: aborting");
    std::process::abort();
}
