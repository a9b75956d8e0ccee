//! Identifiers shared by the coordinator and the participants: transaction ids, shard names,
//! coordinator ids and the PostgreSQL GID built from them.
//!
//! A GID cannot be a bind parameter of `PREPARE TRANSACTION`, so it is formatted into SQL text. That
//! is only safe because every GID comes from `Gid::new` or `Gid::parse`, which allow a fixed
//! alphabet (`[a-z0-9-]`, `:` as separator, decimal digits) and at most 199 bytes.

use std::fmt;
use std::sync::Arc;

/// A transaction id: allocated by one coordinator, never reused, across restarts too.
pub type TxId = u64;

/// Every Treaty GID starts with this; recovery touches nothing else.
pub const GID_PREFIX: &str = "treaty:";

const MAX_NAME_BYTES: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{what} {value:?} is empty or longer than {MAX_NAME_BYTES} bytes")]
    Length { what: &'static str, value: String },
    #[error("{what} {value:?} may only contain {alphabet}")]
    Alphabet {
        what: &'static str,
        value: String,
        alphabet: &'static str,
    },
    #[error("{0:?} is not a Treaty GID (expected treaty:<coordinator id>:<txid>)")]
    NotAGid(String),
}

fn check_name(
    what: &'static str,
    value: &str,
    alphabet: &'static str,
    allowed: fn(char) -> bool,
) -> Result<(), IdError> {
    if value.is_empty() || value.len() > MAX_NAME_BYTES {
        return Err(IdError::Length {
            what,
            value: value.into(),
        });
    }
    if !value.chars().all(allowed) {
        return Err(IdError::Alphabet {
            what,
            value: value.into(),
            alphabet,
        });
    }
    Ok(())
}

/// The name of a shard (one participant, one database). Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardName(Arc<str>);

impl ShardName {
    pub fn new(name: &str) -> Result<Self, IdError> {
        check_name("shard name", name, "letters, digits, '-' and '_'", |c| {
            c.is_ascii_alphanumeric() || c == '-' || c == '_'
        })?;
        Ok(Self(name.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Lets maps keyed by `ShardName` be looked up with a plain `&str` (derived `Eq`, `Ord` and `Hash`
/// on `Arc<str>` agree with `str`'s).
impl std::borrow::Borrow<str> for ShardName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ShardName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The identity of a coordinator, part of every GID it hands out. It is chosen once and kept in
/// the decision log, so a restarted coordinator produces the same GIDs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CoordinatorId(Arc<str>);

impl CoordinatorId {
    pub fn new(id: &str) -> Result<Self, IdError> {
        check_name("coordinator id", id, "lowercase letters, digits and '-'", |c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
        })?;
        Ok(Self(id.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CoordinatorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `treaty:<coordinator id>:<txid>`, at most 7 + 64 + 1 + 20 = 92 bytes (PostgreSQL allows 199).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Gid {
    text: Arc<str>,
    coordinator: CoordinatorId,
    txid: TxId,
}

impl Gid {
    pub fn new(coordinator: &CoordinatorId, txid: TxId) -> Self {
        Self {
            text: format!("{GID_PREFIX}{coordinator}:{txid}").into(),
            coordinator: coordinator.clone(),
            txid,
        }
    }

    /// Parses a GID as sent by a coordinator or read from `pg_prepared_xacts`.
    pub fn parse(text: &str) -> Result<Self, IdError> {
        let not_a_gid = || IdError::NotAGid(text.into());
        let rest = text.strip_prefix(GID_PREFIX).ok_or_else(not_a_gid)?;
        let (coordinator, txid) = rest.rsplit_once(':').ok_or_else(not_a_gid)?;
        let coordinator = CoordinatorId::new(coordinator).map_err(|_| not_a_gid())?;
        if txid.is_empty()
            || !txid.bytes().all(|b| b.is_ascii_digit())
            || (txid.len() > 1 && txid.starts_with('0'))
        {
            return Err(not_a_gid());
        }
        let txid = txid.parse().map_err(|_| not_a_gid())?;
        Ok(Self::new(&coordinator, txid))
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn coordinator(&self) -> &CoordinatorId {
        &self.coordinator
    }

    pub fn txid(&self) -> TxId {
        self.txid
    }
}

impl fmt::Display for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gid_round_trips_and_fits_postgres_limit() {
        let id = CoordinatorId::new(&"a".repeat(64)).unwrap();
        let gid = Gid::new(&id, u64::MAX);
        assert!(gid.as_str().len() < 200);
        assert_eq!(Gid::parse(gid.as_str()).unwrap(), gid);
    }

    #[test]
    fn gid_rejects_foreign_and_malformed_text() {
        for bad in [
            "other:c1:1",
            "treaty:c1:",
            "treaty:c1:01",
            "treaty::1",
            "treaty:C1:1",
            "treaty:c1:1'; DROP TABLE x; --",
            "treaty:c1:99999999999999999999999",
        ] {
            assert!(Gid::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn shard_names_are_restricted() {
        assert!(ShardName::new("shard-1_a").is_ok());
        assert!(ShardName::new("").is_err());
        assert!(ShardName::new("a b").is_err());
        assert!(ShardName::new(&"x".repeat(65)).is_err());
    }
}
