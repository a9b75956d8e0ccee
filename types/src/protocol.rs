//! The commit protocol a transaction runs under, with its one spelling: `two-phase` / `2pc` and
//! `three-phase` / `3pc` are accepted wherever a user names a protocol (flags, TOML, the CLI), and
//! `Display` prints the long form.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Protocol {
    #[default]
    TwoPhase,
    ThreePhase,
}

impl Protocol {
    pub const ALL: [Protocol; 2] = [Protocol::TwoPhase, Protocol::ThreePhase];

    /// The long name (`two-phase`, `three-phase`).
    pub fn name(self) -> &'static str {
        match self {
            Protocol::TwoPhase => "two-phase",
            Protocol::ThreePhase => "three-phase",
        }
    }

    /// The short name (`2pc`, `3pc`), as benchmarks label their columns.
    pub fn short_name(self) -> &'static str {
        match self {
            Protocol::TwoPhase => "2pc",
            Protocol::ThreePhase => "3pc",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A protocol name that is neither spelling of either protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a commit protocol: expected \"two-phase\" (or \"2pc\") or \"three-phase\" (or \"3pc\")"
)]
pub struct UnknownProtocol(pub String);

impl FromStr for Protocol {
    type Err = UnknownProtocol;

    fn from_str(text: &str) -> Result<Self, UnknownProtocol> {
        match text.trim().to_ascii_lowercase().as_str() {
            "two-phase" | "2pc" => Ok(Protocol::TwoPhase),
            "three-phase" | "3pc" => Ok(Protocol::ThreePhase),
            _ => Err(UnknownProtocol(text.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_spellings_parse_and_the_long_one_prints() {
        for protocol in Protocol::ALL {
            assert_eq!(protocol.name().parse::<Protocol>(), Ok(protocol));
            assert_eq!(protocol.short_name().parse::<Protocol>(), Ok(protocol));
            assert_eq!(protocol.to_string().parse::<Protocol>(), Ok(protocol));
        }
        assert_eq!(" 3PC ".parse::<Protocol>(), Ok(Protocol::ThreePhase));
        let error = "paxos".parse::<Protocol>().unwrap_err().to_string();
        assert!(error.contains("paxos") && error.contains("two-phase"), "{error}");
    }
}
