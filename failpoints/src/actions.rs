//! Failpoint actions: fail-rs's syntax (`[p%][cnt*]task[(arg)]`, chained with `->`) checked
//! against what a point's site implements, and each task rewritten as a `return(<tag>)` that
//! fail-rs hands back to `hit`, which carries it out. Only in a build with the `failpoints`
//! feature: without it nothing is ever parsed for arming.

use std::fmt;

use crate::{FailpointError, Fired, Point, Return};

/// A task as carried out here, after fail-rs chose it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Task {
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
    pub(crate) fn tag(&self) -> String {
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

    pub(crate) fn from_tag(tag: &str) -> Option<Task> {
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

/// Checks `actions` against what `point` supports and rewrites every task as `return(<tag>)`,
/// keeping each action's probability and count for fail-rs.
pub(crate) fn translate(point: &Point, actions: &str) -> Result<String, FailpointError> {
    let bad = |reason: String| FailpointError::BadActions {
        name: point.name.as_str().to_owned(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::point;

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
}
