//! The process-wide state: fail-rs's registry (which decides what fires) plus the actions as
//! armed (for listing) and a generation per point (to end a `pause` when the point changes).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::actions::Task;

#[derive(Default)]
struct State {
    armed: BTreeMap<String, String>,
    generations: BTreeMap<String, u64>,
    /// Tasks waiting in a `pause`, per point.
    paused: BTreeMap<String, usize>,
}

static STATE: Mutex<State> = Mutex::new(State {
    armed: BTreeMap::new(),
    generations: BTreeMap::new(),
    paused: BTreeMap::new(),
});
static CHANGED: Condvar = Condvar::new();
/// How many points are armed: the fast path of every site when nothing is.
static ARMED: AtomicUsize = AtomicUsize::new(0);

fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn changed(state: &mut State, name: &str) {
    *state.generations.entry(name.to_owned()).or_default() += 1;
    ARMED.store(state.armed.len(), Ordering::Release);
    CHANGED.notify_all();
}

pub fn arm(name: &str, actions: &str, translated: &str) -> Result<(), String> {
    let mut state = state();
    fail::cfg(name, translated)?;
    state.armed.insert(name.to_owned(), actions.to_owned());
    changed(&mut state, name);
    Ok(())
}

pub fn remove(name: &str) {
    let mut state = state();
    fail::remove(name);
    state.armed.remove(name);
    changed(&mut state, name);
}

pub fn actions(name: &str) -> Option<String> {
    if ARMED.load(Ordering::Acquire) == 0 {
        return None;
    }
    state().armed.get(name).cloned()
}

pub fn fire(name: &str) -> Option<Task> {
    if ARMED.load(Ordering::Relaxed) == 0 {
        return None;
    }
    let tag = fail::eval(name, |tag| tag)??;
    Task::from_tag(&tag)
}

/// Waits until the point is armed again or disarmed.
pub fn pause(name: &str) {
    let mut state = state();
    let at = state.generations.get(name).copied().unwrap_or_default();
    *state.paused.entry(name.to_owned()).or_default() += 1;
    CHANGED.notify_all();
    while state.generations.get(name).copied().unwrap_or_default() == at {
        state = CHANGED
            .wait(state)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
    }
    if let Some(count) = state.paused.get_mut(name) {
        *count -= 1;
    }
}

/// Blocks until some task is waiting in a `pause` at `name` (tests synchronise on it).
#[cfg(test)]
pub fn wait_until_paused(name: &str) {
    let mut state = state();
    while state.paused.get(name).copied().unwrap_or_default() == 0 {
        state = CHANGED
            .wait(state)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
    }
}
