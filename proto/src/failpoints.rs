//! Failpoints: named steps of the commit protocol where a test makes a Treaty process crash, fail
//! the step, lose a message or stall (docs/failpoints.md lists them). Each binary declares its
//! points in a [`Catalog`]; a site is one call to [`hit`], inert (one relaxed atomic load) unless
//! something is armed.
//!
//! Actions use tikv's fail-rs syntax (`[p%][cnt*]task[(arg)]`, chained with `->`), and fail-rs
//! decides which action of a chain fires (probability, count, order). Every task is handed to
//! fail-rs as a `return(..)` carrying a tag, and carried out here, so that the WARN
//! `failpoint fired` line (target `treaty::failpoint`) is logged *before* the action takes effect
//! (a scenario runner reacts to it while the process sleeps or pauses), and so that a sleep blocks
//! only its own task, through `tokio::task::block_in_place`.
//!
//! `return(crash)` logs, writes `failpoint <name>: crash` to stderr and calls
//! `std::process::abort()` (as SIGKILL would: no clean-up). `return(error)`, `return(drop)` and a
//! bare `return` come back to the site as [`Fired`]; each point accepts only the returns its site
//! implements, checked when it is armed.
//!
//! Without the `failpoints` cargo feature, nothing can be armed and [`hit`] is always `None`.

use std::fmt;

use crate::ApiError;

/// What a `return(..)` at a point asks of its site, beyond `crash` (which every point accepts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Return {
    /// `return(error)`: the step fails with a clear error.
    Error,
    /// `return(drop)`: the message is lost.
    Drop,
    /// A bare `return`: a switch turns on (the deliberately unsafe point).
    On,
}

impl Return {
    fn syntax(self) -> &'static str {
        match self {
            Return::Error => "return(error)",
            Return::Drop => "return(drop)",
            Return::On => "return",
        }
    }
}

/// One failpoint a binary has.
#[derive(Debug)]
pub struct Point {
    pub name: &'static str,
    /// The returns its site implements besides `crash`.
    pub returns: &'static [Return],
}

/// The failpoints of one binary, and whether it was built with them.
#[derive(Debug)]
pub struct Catalog {
    points: &'static [Point],
    enabled: bool,
}

impl Catalog {
    pub const fn new(points: &'static [Point], enabled: bool) -> Catalog {
        Catalog { points, enabled }
    }

    /// Whether this binary was built with failpoints (and this crate with the registry).
    pub fn enabled(&self) -> bool {
        self.enabled && cfg!(feature = "failpoints")
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.points.iter().map(|p| p.name)
    }

    fn point(&self, name: &str) -> Result<&Point, FailpointError> {
        self.points
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| FailpointError::Unknown {
                name: name.to_owned(),
                known: self.names().collect::<Vec<_>>().join(", "),
            })
    }
}

/// What a fired `return(..)` asks the site to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fired {
    Error,
    Drop,
    On,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FailpointError {
    #[error("unknown failpoint {name:?}; this binary knows: {known}")]
    Unknown { name: String, known: String },
    #[error("failpoint {name}: bad actions {actions:?}: {reason}")]
    BadActions {
        name: String,
        actions: String,
        reason: String,
    },
    #[error("failpoints {0:?}: expected NAME=ACTIONS, separated by ';'")]
    Syntax(String),
    #[error(
        "this binary was built without failpoints (cargo feature `failpoints`, on by default); \
         cannot arm {0}"
    )]
    Disabled(String),
}

impl From<FailpointError> for ApiError {
    fn from(error: FailpointError) -> ApiError {
        match error {
            FailpointError::Disabled(_) => ApiError::FailedPrecondition(error.to_string()),
            _ => ApiError::InvalidArgument(error.to_string()),
        }
    }
}

/// A task as carried out here, after fail-rs chose it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Task {
    Crash,
    Return(Fired),
    Sleep(u64),
    Delay(u64),
    Pause,
    Yield,
    Print(String),
}

impl Task {
    /// The tag handed to fail-rs as `return(<tag>)`.
    fn tag(&self) -> String {
        match self {
            Task::Crash => "crash".into(),
            Task::Return(Fired::Error) => "error".into(),
            Task::Return(Fired::Drop) => "drop".into(),
            Task::Return(Fired::On) => "on".into(),
            Task::Sleep(ms) => format!("sleep:{ms}"),
            Task::Delay(ms) => format!("delay:{ms}"),
            Task::Pause => "pause".into(),
            Task::Yield => "yield".into(),
            Task::Print(message) => format!("print:{message}"),
        }
    }

    #[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
    fn from_tag(tag: &str) -> Option<Task> {
        let (kind, arg) = tag.split_once(':').unwrap_or((tag, ""));
        Some(match kind {
            "crash" => Task::Crash,
            "error" => Task::Return(Fired::Error),
            "drop" => Task::Return(Fired::Drop),
            "on" => Task::Return(Fired::On),
            "sleep" => Task::Sleep(arg.parse().ok()?),
            "delay" => Task::Delay(arg.parse().ok()?),
            "pause" => Task::Pause,
            "yield" => Task::Yield,
            "print" => Task::Print(arg.to_owned()),
            _ => return None,
        })
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Task::Crash => f.write_str("return(crash)"),
            Task::Return(Fired::Error) => f.write_str("return(error)"),
            Task::Return(Fired::Drop) => f.write_str("return(drop)"),
            Task::Return(Fired::On) => f.write_str("return"),
            Task::Sleep(ms) => write!(f, "sleep({ms})"),
            Task::Delay(ms) => write!(f, "delay({ms})"),
            Task::Pause => f.write_str("pause"),
            Task::Yield => f.write_str("yield"),
            Task::Print(message) => write!(f, "print({message})"),
        }
    }
}

/// Splits `NAME=ACTIONS;NAME=ACTIONS` (the `--failpoints` flag); empty entries are skipped.
pub fn parse_spec(spec: &str) -> Result<Vec<(String, String)>, FailpointError> {
    spec.split(';')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            entry
                .split_once('=')
                .map(|(name, actions)| (name.trim().to_owned(), actions.trim().to_owned()))
                .filter(|(name, actions)| !name.is_empty() && !actions.is_empty())
                .ok_or_else(|| FailpointError::Syntax(entry.to_owned()))
        })
        .collect()
}

/// Checks `actions` against what `point` supports and rewrites every task as `return(<tag>)`,
/// keeping each action's probability and count for fail-rs.
fn translate(point: &Point, actions: &str) -> Result<String, FailpointError> {
    let bad = |reason: String| FailpointError::BadActions {
        name: point.name.to_owned(),
        actions: actions.to_owned(),
        reason,
    };
    let mut translated = Vec::new();
    for action in actions.split("->") {
        let action = action.trim();
        let (head, arg) = match action.split_once('(') {
            Some((head, rest)) => match rest.strip_suffix(')') {
                Some(arg) => (head, Some(arg)),
                None => return Err(bad(format!("{action:?}: parentheses do not match"))),
            },
            None => (action, None),
        };
        let task_start = head.rfind(['%', '*']).map_or(0, |at| at + 1);
        let (prefix, task) = head.split_at(task_start);
        check_prefix(prefix).map_err(|reason| bad(format!("{action:?}: {reason}")))?;
        let task =
            parse_task(point, task.trim(), arg).map_err(|reason| bad(format!("{action:?}: {reason}")))?;
        translated.push(match task {
            None => format!("{prefix}off"),
            Some(task) => format!("{prefix}return({})", task.tag()),
        });
    }
    Ok(translated.join("->"))
}

/// `[p%][cnt*]`: a probability in percent and a count.
fn check_prefix(prefix: &str) -> Result<(), String> {
    let (probability, rest) = match prefix.split_once('%') {
        Some((p, rest)) => (Some(p), rest),
        None => (None, prefix),
    };
    if let Some(p) = probability {
        match p.trim().parse::<f32>() {
            Ok(p) if (0.0..=100.0).contains(&p) => {}
            _ => return Err(format!("{p:?} is not a probability between 0 and 100")),
        }
    }
    match rest.strip_suffix('*') {
        Some(count) => count
            .trim()
            .parse::<usize>()
            .map(|_| ())
            .map_err(|_| format!("{count:?} is not a count")),
        None if rest.trim().is_empty() => Ok(()),
        None => Err(format!("cannot read {rest:?}")),
    }
}

/// The task of one action; `None` for `off`.
fn parse_task(point: &Point, task: &str, arg: Option<&str>) -> Result<Option<Task>, String> {
    let millis = |what: &str| -> Result<u64, String> {
        arg.and_then(|ms| ms.trim().parse().ok())
            .ok_or_else(|| format!("{what} needs a time in ms, e.g. {what}(1500)"))
    };
    let no_arg = |task: Task| match arg {
        None => Ok(Some(task)),
        Some(_) => Err(format!("{task} takes no argument")),
    };
    match task {
        "off" => match arg {
            None => Ok(None),
            Some(_) => Err("off takes no argument".into()),
        },
        "sleep" => Ok(Some(Task::Sleep(millis("sleep")?))),
        "delay" => Ok(Some(Task::Delay(millis("delay")?))),
        "pause" => no_arg(Task::Pause),
        "yield" => no_arg(Task::Yield),
        "print" => Ok(Some(Task::Print(arg.unwrap_or_default().to_owned()))),
        "panic" => Err(
            "panic is refused: a panic inside a tokio task does not stop the process; use return(crash)"
                .into(),
        ),
        "return" => {
            let wanted = match arg.map(str::trim) {
                Some("crash") => return Ok(Some(Task::Crash)),
                Some("error") => Return::Error,
                Some("drop") => Return::Drop,
                None | Some("") => Return::On,
                Some(other) => {
                    return Err(format!(
                        "unknown return({other}); expected return(crash), return(error) or return(drop)"
                    ));
                }
            };
            if !point.returns.contains(&wanted) {
                let accepted: Vec<&str> = std::iter::once("return(crash)")
                    .chain(point.returns.iter().map(|r| r.syntax()))
                    .collect();
                return Err(format!(
                    "{} is not implemented at this point; it accepts {}",
                    wanted.syntax(),
                    accepted.join(", ")
                ));
            }
            Ok(Some(Task::Return(match wanted {
                Return::Error => Fired::Error,
                Return::Drop => Fired::Drop,
                Return::On => Fired::On,
            })))
        }
        other => Err(format!(
            "unknown task {other:?}; expected off, return(crash|error|drop), sleep(ms), delay(ms), pause, \
             yield or print(msg), with an optional p% and count* in front"
        )),
    }
}

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
        registry::remove(point.name);
        return Ok(());
    }
    let translated = translate(point, actions)?;
    if !catalog.enabled() {
        return Err(FailpointError::Disabled(format!("{name}={actions}")));
    }
    registry::arm(point.name, actions, &translated).map_err(|reason| FailpointError::BadActions {
        name: name.to_owned(),
        actions: actions.to_owned(),
        reason,
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
pub fn is_armed(name: &str) -> bool {
    registry::actions(name).is_some()
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
pub fn hit(name: &str) -> Option<Fired> {
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
    #[cfg(feature = "failpoints")]
    if let Ok(runtime) = tokio::runtime::Handle::try_current()
        && runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
    {
        return tokio::task::block_in_place(work);
    }
    work()
}

#[cfg(feature = "failpoints")]
mod registry {
    //! The process-wide state: fail-rs's registry (which decides what fires) plus the actions as
    //! armed (for listing) and a generation per point (to end a `pause` when the point changes).

    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Condvar, Mutex, MutexGuard};

    use super::Task;

    #[derive(Default)]
    struct State {
        armed: BTreeMap<String, String>,
        generations: BTreeMap<String, u64>,
    }

    static STATE: Mutex<State> = Mutex::new(State {
        armed: BTreeMap::new(),
        generations: BTreeMap::new(),
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
        while state.generations.get(name).copied().unwrap_or_default() == at {
            state = CHANGED
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }
}

#[cfg(not(feature = "failpoints"))]
mod registry {
    //! Built without failpoints: nothing is ever armed.

    use super::Task;

    pub fn arm(name: &str, _actions: &str, _translated: &str) -> Result<(), String> {
        Err(format!("built without failpoints; cannot arm {name}"))
    }

    pub fn remove(_name: &str) {}

    pub fn actions(_name: &str) -> Option<String> {
        None
    }

    pub fn fire(_name: &str) -> Option<Task> {
        None
    }

    pub fn pause(_name: &str) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    static POINTS: &[Point] = &[
        Point {
            name: "test::step",
            returns: &[Return::Error],
        },
        Point {
            name: "test::send",
            returns: &[Return::Error, Return::Drop],
        },
        Point {
            name: "test::switch",
            returns: &[Return::On],
        },
        Point {
            name: "test::paused",
            returns: &[],
        },
        Point {
            name: "test::quiet",
            returns: &[],
        },
    ];
    static CATALOG: Catalog = Catalog::new(POINTS, true);

    fn point(name: &str) -> &'static Point {
        POINTS.iter().find(|p| p.name == name).unwrap()
    }

    #[test]
    fn spec_splits_into_names_and_actions() {
        assert_eq!(
            parse_spec(" a=1*return(crash) ; b = sleep(10);").unwrap(),
            vec![
                ("a".to_owned(), "1*return(crash)".to_owned()),
                ("b".to_owned(), "sleep(10)".to_owned())
            ]
        );
        assert!(parse_spec("").unwrap().is_empty());
        assert!(matches!(parse_spec("a"), Err(FailpointError::Syntax(_))));
        assert!(matches!(parse_spec("=off"), Err(FailpointError::Syntax(_))));
        assert!(matches!(parse_spec("a="), Err(FailpointError::Syntax(_))));
    }

    #[test]
    fn actions_translate_keeping_probability_and_count() {
        let step = point("test::step");
        assert_eq!(translate(step, "return(crash)").unwrap(), "return(crash)");
        assert_eq!(translate(step, "1*return(error)").unwrap(), "1*return(error)");
        assert_eq!(
            translate(step, "50%2*sleep(1500)->pause").unwrap(),
            "50%2*return(sleep:1500)->return(pause)"
        );
        assert_eq!(translate(step, "off").unwrap(), "off");
        assert_eq!(translate(step, "delay(5)").unwrap(), "return(delay:5)");
        assert_eq!(translate(point("test::switch"), "return").unwrap(), "return(on)");
        assert_eq!(
            translate(point("test::send"), "return(drop)").unwrap(),
            "return(drop)"
        );
    }

    #[test]
    fn bad_actions_are_refused_with_the_reason() {
        let step = point("test::step");
        for (actions, reason) in [
            ("return(drop)", "accepts return(crash), return(error)"),
            ("return", "not implemented"),
            ("return(maybe)", "unknown return(maybe)"),
            ("sleep", "needs a time in ms"),
            ("sleep(soon)", "needs a time in ms"),
            ("panic", "use return(crash)"),
            ("explode", "unknown task"),
            ("x*sleep(1)", "not a count"),
            ("200%sleep(1)", "not a probability"),
            ("sleep(1", "parentheses"),
            ("pause(3)", "takes no argument"),
        ] {
            let error = translate(step, actions).unwrap_err().to_string();
            assert!(error.contains(reason), "{actions}: {error}");
        }
        let error = translate(point("test::switch"), "return(error)")
            .unwrap_err()
            .to_string();
        assert!(error.contains("accepts return(crash), return"), "{error}");
    }

    #[test]
    fn tags_round_trip() {
        for task in [
            Task::Crash,
            Task::Return(Fired::Error),
            Task::Return(Fired::Drop),
            Task::Return(Fired::On),
            Task::Sleep(7),
            Task::Delay(3),
            Task::Pause,
            Task::Yield,
            Task::Print("hello: world".into()),
        ] {
            assert_eq!(Task::from_tag(&task.tag()), Some(task));
        }
        assert_eq!(Task::from_tag("sleep:x"), None);
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        let error = set(&CATALOG, "test::nope", "off").unwrap_err();
        assert!(matches!(error, FailpointError::Unknown { .. }));
        let message = error.to_string();
        assert!(
            message.contains("test::step") && message.contains("test::switch"),
            "{message}"
        );
        assert!(matches!(ApiError::from(error), ApiError::InvalidArgument(_)));
        let error = configure(&CATALOG, "test::quiet=off;test::nope=off").unwrap_err();
        assert!(matches!(error, FailpointError::Unknown { .. }));
        assert!(!is_armed("test::quiet"), "nothing is armed when one entry is bad");
    }

    #[test]
    fn a_binary_without_failpoints_refuses_to_arm() {
        static OFF: Catalog = Catalog::new(POINTS, false);
        let error = set(&OFF, "test::quiet", "return(crash)").unwrap_err();
        assert!(matches!(error, FailpointError::Disabled(_)));
        assert!(matches!(ApiError::from(error), ApiError::FailedPrecondition(_)));
        assert!(hit("test::quiet").is_none());
    }

    #[cfg(feature = "failpoints")]
    #[test]
    fn armed_points_fire_as_counted_and_list_as_armed() {
        set(&CATALOG, "test::send", "1*return(drop)->return(error)").unwrap();
        assert!(is_armed("test::send"));
        assert!(list(&CATALOG).contains(&("test::send", "1*return(drop)->return(error)".to_owned())));
        assert_eq!(hit("test::send"), Some(Fired::Drop));
        assert_eq!(hit("test::send"), Some(Fired::Error));
        set(&CATALOG, "test::send", "").unwrap();
        assert!(!is_armed("test::send"));
        assert_eq!(hit("test::send"), None);

        set(&CATALOG, "test::switch", "1*sleep(1)->return").unwrap();
        assert_eq!(hit("test::switch"), None, "the sleep fires first");
        assert_eq!(hit("test::switch"), Some(Fired::On));
        set(&CATALOG, "test::switch", "").unwrap();
    }

    #[cfg(feature = "failpoints")]
    #[test]
    fn a_pause_ends_when_the_point_is_disarmed() {
        set(&CATALOG, "test::paused", "pause").unwrap();
        let paused = std::thread::spawn(|| hit("test::paused"));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!paused.is_finished(), "the point pauses");
        set(&CATALOG, "test::paused", "").unwrap();
        assert_eq!(paused.join().unwrap(), None);
    }
}
