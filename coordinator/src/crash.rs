//! `--crash-at POINT`: a one-shot crash at a coordinator failpoint, for recovery tests. It arms
//! `coordinator::POINT` with `1*return(crash)` (the `coordinator::` prefix may be left out), and
//! writes a marker file in the data directory as the process aborts, so the restarted process
//! (same flags) finds the marker and does not arm it again. The crash itself is the failpoints'
//! `return(crash)`: there is one crash mechanism, so a build without failpoints refuses the flag.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::failpoints::{self, FailpointError};

struct Armed {
    point: String,
    marker: PathBuf,
}

static ARMED: OnceLock<Armed> = OnceLock::new();

/// Arms `point` (if any) for this process unless its marker says it already crashed there.
pub fn arm(point: Option<&str>, data_dir: &Path) -> Result<(), FailpointError> {
    let Some(point) = point else {
        return Ok(());
    };
    let short = point.strip_prefix("coordinator::").unwrap_or(point);
    let name = format!("coordinator::{short}");
    let marker = data_dir.join(format!("crashed-at-{short}"));
    if marker.exists() {
        tracing::info!(
            point = name,
            marker = %marker.display(),
            "--crash-at: crashed there once already; not arming it again"
        );
        return Ok(());
    }
    failpoints::set(&name, "1*return(crash)")?;
    let _ = ARMED.set(Armed { point: name, marker });
    treaty_failpoints::set_crash_hook(write_marker);
    Ok(())
}

/// Runs just before the abort of a `return(crash)`.
fn write_marker(point: &str) {
    let Some(armed) = ARMED.get() else { return };
    if armed.point != point {
        return;
    }
    if let Err(e) = std::fs::write(&armed.marker, point) {
        tracing::error!(
            "crash point {point}: cannot write marker {}: {e}",
            armed.marker.display()
        );
    }
}
