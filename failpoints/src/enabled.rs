//! Arming and firing, in a build with the `failpoints` feature: `configure` and `set` check actions
//! against the catalog and hand them to the registry; `hit` carries out what fired, logging the
//! WARN `failpoint fired` line before the action takes effect.

use crate::actions::{Task, translate};
use crate::{Catalog, FailpointError, Fired, Name, parse_spec, registry};

/// Checks every entry of `spec` before arming any, then arms them all.
pub fn configure(catalog: &Catalog, spec: &str) -> Result<(), FailpointError> {
    let entries = parse_spec(spec)?;
    for (name, actions) in &entries {
        translate(catalog.point(name)?, actions)?;
    }
    for (name, actions) in &entries {
        set(catalog, name, actions)?;
    }
    Ok(())
}

/// Arms one point of `catalog`; empty `actions` disarms it.
pub fn set(catalog: &Catalog, name: &str, actions: &str) -> Result<(), FailpointError> {
    let point = catalog.point(name)?;
    let actions = actions.trim();
    if actions.is_empty() {
        registry::remove(point.name.as_str());
        return Ok(());
    }
    let translated = translate(point, actions)?;
    registry::arm(point.name.as_str(), actions, &translated).map_err(|reason| {
        FailpointError::BadActions {
            name: name.to_owned(),
            actions: actions.to_owned(),
            reason,
        }
    })?;
    tracing::info!(target: "treaty::failpoint", failpoint = name, actions, "failpoint armed");
    Ok(())
}

/// Disarms every point of `catalog` (a paused one goes on).
pub fn clear(catalog: &Catalog) {
    for name in catalog.names() {
        registry::remove(name);
    }
}

/// Every point of `catalog` with its actions as armed ("" when not armed).
pub fn list(catalog: &Catalog) -> Vec<(&'static str, String)> {
    catalog
        .names()
        .map(|name| (name, registry::actions(name).unwrap_or_default()))
        .collect()
}

/// Whether `name` is armed (with any actions).
pub fn is_armed(name: Name) -> bool {
    registry::actions(name.as_str()).is_some()
}

/// Runs `hook` with the point's name just before a `return(crash)` aborts the process (the
/// coordinator's one-shot `--crash-at` writes its marker file there). Set once per process.
pub fn set_crash_hook(hook: fn(&str)) {
    let _ = CRASH_HOOK.set(hook);
}

static CRASH_HOOK: std::sync::OnceLock<fn(&str)> = std::sync::OnceLock::new();

/// Evaluates the failpoint `name`: `None` to carry on (nothing armed, nothing fired, or a sleep or
/// pause that has ended), or what a fired `return(..)` asks of the site. `return(crash)` does not
/// come back.
pub fn hit(name: Name) -> Option<Fired> {
    let name = name.as_str();
    let task = registry::fire(name)?;
    tracing::warn!(target: "treaty::failpoint", failpoint = name, action = %task, "failpoint fired");
    match task {
        Task::Crash => crash(name),
        Task::Return(fired) => Some(fired),
        Task::Sleep(ms) => {
            blocking(|| std::thread::sleep(std::time::Duration::from_millis(ms)));
            None
        }
        Task::Delay(ms) => {
            blocking(|| {
                let until = std::time::Instant::now() + std::time::Duration::from_millis(ms);
                while std::time::Instant::now() < until {
                    std::hint::spin_loop();
                }
            });
            None
        }
        Task::Pause => {
            blocking(|| registry::pause(name));
            None
        }
        Task::Yield => {
            std::thread::yield_now();
            None
        }
        Task::Print(message) => {
            tracing::info!(target: "treaty::failpoint", failpoint = name, "{message}");
            None
        }
    }
}

/// Ends the process as SIGKILL would, after saying where.
fn crash(name: &str) -> ! {
    use std::io::Write;
    if let Some(hook) = CRASH_HOOK.get() {
        hook(name);
    }
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "failpoint {name}: crash");
    let _ = stderr.flush();
    std::process::abort();
}

/// Runs blocking work without stalling the other tasks of a multi-threaded runtime's worker.
fn blocking(work: impl FnOnce()) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current()
        && runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
    {
        return tokio::task::block_in_place(work);
    }
    work()
}
