//! Failpoints: named steps of the commit protocol where a test makes a Treaty process crash, fail
//! the step, lose a message or stall (docs/failpoints.md lists them). This crate owns the names'
//! type ([`Name`], made by [`failpoint_name!`]), each binary's [`Catalog`], arming (`--failpoints`
//! and the `Admin` service, `admin`), and [`hit`], which a site calls.
//!
//! **Only with the cargo feature `failpoints`** (which the coordinator's and the participant's own
//! `failpoints` features turn on; `cargo build-fi` builds both). Without it, the default and the
//! release build:
//! - a [`Name`] is zero-sized and [`failpoint_name!`] drops its string, so no failpoint name is in
//!   the binary;
//! - [`hit`] is an inline `None` and [`is_armed`] an inline `false`: every site compiles to nothing;
//! - [`set`] and [`configure`] refuse with [`FailpointError::NotBuiltIn`], saying how to build a
//!   binary that has failpoints;
//! - there is no `admin` module, so no binary can serve the `Admin` service.
//!
//! With it: actions use tikv's fail-rs syntax (`[p%][cnt*]task[(arg)]`, chained with `->`), and
//! fail-rs decides which action of a chain fires (probability, count, order). Every task is
//! handed to fail-rs as a `return(..)` carrying a tag, and carried out here (`enabled`), so that
//! the WARN `failpoint fired` line (target `treaty::failpoint`) is logged *before* the action
//! takes effect (a scenario runner reacts to it while the process sleeps or pauses), and so that
//! a sleep blocks only its own task, through `tokio::task::block_in_place` (which is why a
//! fault-injection build of a service keeps a thread pool even with `--worker-threads 1`;
//! `treaty_proto::process::runtime`). An unarmed point costs
//! one relaxed atomic load.
//!
//! `return(crash)` logs, writes `failpoint <name>: crash` to stderr and calls
//! `std::process::abort()` (as SIGKILL would: no clean-up). `return(error)`, `return(drop)` and a
//! bare `return` come back to the site as [`Fired`]; each point accepts only the returns its site
//! implements, checked when it is armed.

use std::fmt;

use treaty_proto::ApiError;

#[cfg(feature = "failpoints")]
mod actions;
#[cfg(feature = "failpoints")]
pub mod admin;
#[cfg(feature = "failpoints")]
mod enabled;
#[cfg(feature = "failpoints")]
mod registry;

#[cfg(feature = "failpoints")]
pub use enabled::{clear, configure, hit, is_armed, list, set, set_crash_hook};

/// Whether this build has failpoints (the `failpoints` feature).
pub const BUILT_IN: bool = cfg!(feature = "failpoints");

/// How to build the binaries that have failpoints (the lab tooling needs them), for every message
/// that refuses a build without.
pub const BUILD_HINT: &str = "build the fault-injection binaries with `cargo build-fi` (add --release for \
     target/release), i.e. cargo build --workspace --bins --features \
     treaty-coordinator/failpoints,treaty-participant/failpoints";

/// The name of a failpoint, made only by [`failpoint_name!`]. With the `failpoints` feature it
/// holds the name; without, it is zero-sized and the name is not in the binary at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Name {
    #[cfg(feature = "failpoints")]
    name: &'static str,
}

impl Name {
    /// For [`failpoint_name!`] only.
    #[cfg(feature = "failpoints")]
    #[doc(hidden)]
    pub const fn __from_literal(name: &'static str) -> Name {
        Name { name }
    }

    /// For [`failpoint_name!`] only: the name of a build without failpoints.
    #[cfg(not(feature = "failpoints"))]
    #[doc(hidden)]
    pub const __ABSENT: Name = Name {};

    /// The name, as armed and listed.
    #[cfg(feature = "failpoints")]
    pub const fn as_str(self) -> &'static str {
        self.name
    }
}

impl fmt::Display for Name {
    #[cfg(feature = "failpoints")]
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }

    #[cfg(not(feature = "failpoints"))]
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("(a failpoint; this build has none)")
    }
}

/// A failpoint's [`Name`] from a string literal: the name with the `failpoints` feature, a
/// zero-sized value that leaves no string in the binary without it.
#[cfg(feature = "failpoints")]
#[macro_export]
macro_rules! failpoint_name {
    ($name:literal) => {
        $crate::Name::__from_literal($name)
    };
}

/// A failpoint's [`Name`] from a string literal: the name with the `failpoints` feature, a
/// zero-sized value that leaves no string in the binary without it.
#[cfg(not(feature = "failpoints"))]
#[macro_export]
macro_rules! failpoint_name {
    ($name:literal) => {
        $crate::Name::__ABSENT
    };
}

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
    #[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
    pub(crate) fn syntax(self) -> &'static str {
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
    pub name: Name,
    /// The returns its site implements besides `crash`.
    pub returns: &'static [Return],
}

/// The failpoints of one binary.
#[derive(Debug)]
pub struct Catalog {
    points: &'static [Point],
}

impl Catalog {
    pub const fn new(points: &'static [Point]) -> Catalog {
        Catalog { points }
    }

    /// Whether this build has failpoints: arming works only then.
    pub fn enabled(&self) -> bool {
        BUILT_IN
    }

    /// How many points the binary has (each site's name is in the catalog).
    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    #[cfg(feature = "failpoints")]
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.points.iter().map(|p| p.name.as_str())
    }

    #[cfg(feature = "failpoints")]
    fn point(&self, name: &str) -> Result<&Point, FailpointError> {
        self.points
            .iter()
            .find(|p| p.name.as_str() == name)
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
    #[error("this binary was built without failpoints, so it cannot arm {0:?}; {hint}", hint = BUILD_HINT)]
    NotBuiltIn(String),
}

impl From<FailpointError> for ApiError {
    fn from(error: FailpointError) -> ApiError {
        match error {
            FailpointError::NotBuiltIn(_) => ApiError::FailedPrecondition(error.to_string()),
            _ => ApiError::InvalidArgument(error.to_string()),
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

/// Built without failpoints: a spec with any entry is refused (an empty one arms nothing).
#[cfg(not(feature = "failpoints"))]
pub fn configure(_catalog: &Catalog, spec: &str) -> Result<(), FailpointError> {
    if parse_spec(spec)?.is_empty() {
        return Ok(());
    }
    Err(FailpointError::NotBuiltIn(spec.trim().to_owned()))
}

/// Built without failpoints: arming is refused.
#[cfg(not(feature = "failpoints"))]
pub fn set(_catalog: &Catalog, name: &str, actions: &str) -> Result<(), FailpointError> {
    Err(FailpointError::NotBuiltIn(format!("{name}={actions}")))
}

/// Built without failpoints: nothing is ever armed.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn is_armed(_name: Name) -> bool {
    false
}

/// Built without failpoints: nothing ever fires.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: Name) -> Option<Fired> {
    None
}

/// Built without failpoints: nothing ever crashes at a failpoint, so the hook is never run.
#[cfg(not(feature = "failpoints"))]
pub fn set_crash_hook(_hook: fn(&str)) {}

#[cfg(test)]
mod tests {
    use super::*;

    static POINTS: &[Point] = &[
        Point {
            name: failpoint_name!("test::step"),
            returns: &[Return::Error],
        },
        Point {
            name: failpoint_name!("test::send"),
            returns: &[Return::Error, Return::Drop],
        },
        Point {
            name: failpoint_name!("test::switch"),
            returns: &[Return::On],
        },
        Point {
            name: failpoint_name!("test::paused"),
            returns: &[],
        },
        Point {
            name: failpoint_name!("test::quiet"),
            returns: &[],
        },
    ];
    static CATALOG: Catalog = Catalog::new(POINTS);

    #[cfg(feature = "failpoints")]
    pub(crate) fn point(name: &str) -> &'static Point {
        POINTS.iter().find(|p| p.name.as_str() == name).unwrap()
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
    fn the_build_says_whether_it_has_failpoints() {
        assert_eq!(BUILT_IN, cfg!(feature = "failpoints"));
        assert_eq!(CATALOG.enabled(), BUILT_IN);
        assert_eq!(CATALOG.len(), 5);
    }

    /// The release build: nothing can be armed, the refusal says how to build binaries that have
    /// failpoints, and names hold no string.
    #[cfg(not(feature = "failpoints"))]
    #[test]
    fn without_the_feature_arming_is_refused_and_names_are_empty() {
        for error in [
            set(&CATALOG, "test::quiet", "return(crash)").unwrap_err(),
            configure(&CATALOG, "test::quiet=return(crash)").unwrap_err(),
        ] {
            assert!(matches!(error, FailpointError::NotBuiltIn(_)), "{error:?}");
            let message = error.to_string();
            assert!(message.contains("built without failpoints"), "{message}");
            assert!(message.contains("cargo build-fi"), "{message}");
            assert!(
                message.contains("--features treaty-coordinator/failpoints,treaty-participant/failpoints"),
                "{message}"
            );
            assert!(matches!(ApiError::from(error), ApiError::FailedPrecondition(_)));
        }
        assert_eq!(configure(&CATALOG, " ; "), Ok(()), "an empty spec arms nothing");
        assert!(matches!(
            configure(&CATALOG, "nonsense"),
            Err(FailpointError::Syntax(_))
        ));
        assert_eq!(std::mem::size_of::<Name>(), 0);
        assert_eq!(hit(POINTS[0].name), None);
        assert!(!is_armed(POINTS[0].name));
    }

    #[cfg(feature = "failpoints")]
    #[test]
    fn names_keep_their_string_with_the_feature() {
        assert_eq!(POINTS[0].name.as_str(), "test::step");
        assert_eq!(POINTS[0].name.to_string(), "test::step");
    }

    #[cfg(feature = "failpoints")]
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
        assert!(
            !is_armed(point("test::quiet").name),
            "nothing is armed when one entry is bad"
        );
    }

    #[cfg(feature = "failpoints")]
    #[test]
    fn armed_points_fire_as_counted_and_list_as_armed() {
        let send = point("test::send").name;
        set(&CATALOG, "test::send", "1*return(drop)->return(error)").unwrap();
        assert!(is_armed(send));
        assert!(list(&CATALOG).contains(&("test::send", "1*return(drop)->return(error)".to_owned())));
        assert_eq!(hit(send), Some(Fired::Drop));
        assert_eq!(hit(send), Some(Fired::Error));
        set(&CATALOG, "test::send", "").unwrap();
        assert!(!is_armed(send));
        assert_eq!(hit(send), None);

        let switch = point("test::switch").name;
        set(&CATALOG, "test::switch", "1*sleep(1)->return").unwrap();
        assert_eq!(hit(switch), None, "the sleep fires first");
        assert_eq!(hit(switch), Some(Fired::On));
        set(&CATALOG, "test::switch", "").unwrap();
    }

    #[cfg(feature = "failpoints")]
    #[test]
    fn a_pause_ends_when_the_point_is_disarmed() {
        set(&CATALOG, "test::paused", "pause").unwrap();
        let paused = std::thread::spawn(|| hit(point("test::paused").name));
        registry::wait_until_paused("test::paused");
        assert!(!paused.is_finished(), "the point pauses");
        set(&CATALOG, "test::paused", "").unwrap();
        assert_eq!(paused.join().unwrap(), None);
    }
}
