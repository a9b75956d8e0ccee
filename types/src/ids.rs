//! Identifiers shared by the coordinator and the participants: transaction ids, shard names,
//! coordinator ids, the transaction's GID built from them, and the branch GID a participant hands
//! PostgreSQL.
//!
//! The `Gid` (`treaty:<coordinator id>:<txid>`) names a transaction everywhere Treaty speaks: the
//! decision log, every protocol message, the marker rows. PostgreSQL names a prepared transaction
//! per *server*, not per database, so two shards that are two databases of one server cannot both
//! prepare under the same text; each participant therefore prepares its branch as `BranchGid`
//! (`<gid>:<shard>`).
//!
//! A GID cannot be a bind parameter of `PREPARE TRANSACTION`, so it is formatted into SQL text. That
//! is only safe because every GID comes from `Gid::new`, `Gid::parse`, `BranchGid::new` or
//! `BranchGid::parse`, which allow a fixed alphabet (`[A-Za-z0-9_-]`, `:` as separator, decimal
//! digits, `@` before a decision shard) and at most 199 bytes.

use std::fmt;
use std::sync::Arc;

/// A transaction id: allocated by one coordinator, never reused, across restarts too.
pub type TxId = u64;

/// Every Treaty GID starts with this; recovery touches nothing else.
pub const GID_PREFIX: &str = "treaty:";

const MAX_NAME_BYTES: usize = 64;

/// PostgreSQL's limit on a prepared transaction's GID, in bytes.
const MAX_GID_BYTES: usize = 199;

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
    #[error(
        "GID {text:?} is too long: with its decision shard it may have at most {limit} bytes, so that every branch GID fits PostgreSQL's 199; shorten the coordinator id or the shard names"
    )]
    TooLong { text: String, limit: usize },
    #[error("{0:?} is not a Treaty GID (expected treaty:<coordinator id>:<txid>[@<decision shard>])")]
    NotAGid(String),
    #[error("{0:?} is not a Treaty branch GID (expected treaty:<coordinator id>:<txid>:<shard>)")]
    NotABranchGid(String),
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

/// `treaty:<coordinator id>:<txid>`, at most 7 + 64 + 1 + 20 = 92 bytes (PostgreSQL allows 199);
/// or, when the transaction's commit decision is a row in one of its own branches
/// (`--decision-store shard`), `treaty:<coordinator id>:<txid>@<decision shard>`: every prepared
/// branch then names where its decision is, so any coordinator can find it from PostgreSQL alone.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Gid {
    text: Arc<str>,
    coordinator: CoordinatorId,
    txid: TxId,
    decision_shard: Option<ShardName>,
}

impl Gid {
    pub fn new(coordinator: &CoordinatorId, txid: TxId) -> Self {
        Self {
            text: format!("{GID_PREFIX}{coordinator}:{txid}").into(),
            coordinator: coordinator.clone(),
            txid,
            decision_shard: None,
        }
    }

    /// The GID of a transaction whose commit decision is a row committed on `decision_shard`.
    /// Refused when a branch GID of it could exceed PostgreSQL's 199 bytes (with a shard name of
    /// the longest allowed length): shorten the coordinator id or the shard names.
    pub fn with_decision_shard(
        coordinator: &CoordinatorId,
        txid: TxId,
        decision_shard: &ShardName,
    ) -> Result<Self, IdError> {
        let text = format!("{GID_PREFIX}{coordinator}:{txid}@{decision_shard}");
        if text.len() + 1 + MAX_NAME_BYTES > MAX_GID_BYTES {
            return Err(IdError::TooLong {
                text,
                limit: MAX_GID_BYTES - 1 - MAX_NAME_BYTES,
            });
        }
        Ok(Self {
            text: text.into(),
            coordinator: coordinator.clone(),
            txid,
            decision_shard: Some(decision_shard.clone()),
        })
    }

    /// The shard whose `treaty.decisions` holds this transaction's decision; `None` when the
    /// decision is in the coordinator's own store (the file log).
    pub fn decision_shard(&self) -> Option<&ShardName> {
        self.decision_shard.as_ref()
    }

    /// Parses a GID as sent by a coordinator or read from `pg_prepared_xacts`.
    pub fn parse(text: &str) -> Result<Self, IdError> {
        let not_a_gid = || IdError::NotAGid(text.into());
        let rest = text.strip_prefix(GID_PREFIX).ok_or_else(not_a_gid)?;
        let (coordinator, txid) = rest.rsplit_once(':').ok_or_else(not_a_gid)?;
        let coordinator = CoordinatorId::new(coordinator).map_err(|_| not_a_gid())?;
        let (txid, decision_shard) = match txid.split_once('@') {
            Some((txid, shard)) => (txid, Some(ShardName::new(shard).map_err(|_| not_a_gid())?)),
            None => (txid, None),
        };
        if txid.is_empty()
            || !txid.bytes().all(|b| b.is_ascii_digit())
            || (txid.len() > 1 && txid.starts_with('0'))
        {
            return Err(not_a_gid());
        }
        let txid = txid.parse().map_err(|_| not_a_gid())?;
        match decision_shard {
            Some(shard) => Self::with_decision_shard(&coordinator, txid, &shard).map_err(|_| not_a_gid()),
            None => Ok(Self::new(&coordinator, txid)),
        }
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

/// The name under which one shard's branch of a transaction is prepared in PostgreSQL:
/// `treaty:<coordinator id>:<txid>:<shard>`, at most 92 + 1 + 64 = 157 bytes (PostgreSQL allows
/// 199). PostgreSQL GIDs are unique per server, so the shard suffix is what lets two shards that
/// are databases of one server prepare the same transaction.
///
/// Participants before this form prepared under the bare `Gid` text; `parse` still reads it (the
/// `legacy` form, naming no shard), so that branches such a version left prepared are recovered and
/// finished under the exact text PostgreSQL holds. Nothing prepares under it any more.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BranchGid {
    text: Arc<str>,
    gid: Gid,
    /// `None` for the legacy form.
    shard: Option<ShardName>,
}

impl BranchGid {
    /// The branch of `gid` on `shard`: what a participant prepares under.
    pub fn new(gid: &Gid, shard: &ShardName) -> Self {
        Self {
            text: format!("{gid}:{shard}").into(),
            gid: gid.clone(),
            shard: Some(shard.clone()),
        }
    }

    /// The form before branch GIDs named their shard (the transaction's own GID text), only to
    /// find and finish a branch an older participant left prepared.
    pub fn legacy(gid: &Gid) -> Self {
        Self {
            text: gid.as_str().into(),
            gid: gid.clone(),
            shard: None,
        }
    }

    /// Parses a GID read from `pg_prepared_xacts`: the branch form, or the legacy form. The two
    /// cannot be confused: a coordinator id has no `:`, so the legacy form has exactly two
    /// separators after the prefix and the branch form three.
    pub fn parse(text: &str) -> Result<Self, IdError> {
        let not_a_branch = || IdError::NotABranchGid(text.into());
        let rest = text.strip_prefix(GID_PREFIX).ok_or_else(not_a_branch)?;
        match rest.matches(':').count() {
            1 => Ok(Self::legacy(&Gid::parse(text).map_err(|_| not_a_branch())?)),
            2 => {
                let (gid, shard) = text.rsplit_once(':').ok_or_else(not_a_branch)?;
                let gid = Gid::parse(gid).map_err(|_| not_a_branch())?;
                let shard = ShardName::new(shard).map_err(|_| not_a_branch())?;
                Ok(Self::new(&gid, &shard))
            }
            _ => Err(not_a_branch()),
        }
    }

    /// The text PostgreSQL holds (safe to format into SQL: see the module documentation).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The transaction this branch belongs to.
    pub fn gid(&self) -> &Gid {
        &self.gid
    }

    /// The shard the branch names; `None` for the legacy form.
    pub fn shard(&self) -> Option<&ShardName> {
        self.shard.as_ref()
    }

    pub fn is_legacy(&self) -> bool {
        self.shard.is_none()
    }

    /// Whether the branch is `shard`'s: it names `shard`, or it is in the legacy form. Call this
    /// only for GIDs prepared in `shard`'s own database: the legacy form names no shard, and is
    /// `shard`'s because an older participant, the only one to prepare under it, served one shard
    /// per database.
    pub fn is_of(&self, shard: &ShardName) -> bool {
        self.shard.as_ref().is_none_or(|own| own == shard)
    }
}

impl fmt::Display for BranchGid {
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
    fn branch_gid_names_the_shard_and_round_trips() {
        let gid = Gid::new(&CoordinatorId::new("c1").unwrap(), 42);
        let s0 = ShardName::new("s0").unwrap();
        let branch = BranchGid::new(&gid, &s0);
        assert_eq!(branch.as_str(), "treaty:c1:42:s0");
        assert_eq!(branch.to_string(), "treaty:c1:42:s0");
        let parsed = BranchGid::parse("treaty:c1:42:s0").unwrap();
        assert_eq!(parsed, branch);
        assert_eq!(parsed.gid(), &gid);
        assert_eq!(parsed.shard(), Some(&s0));
        assert!(parsed.is_of(&s0));
        assert!(!parsed.is_of(&ShardName::new("s1").unwrap()));
        assert!(!parsed.is_legacy());
        // Two shards of one transaction never share a PostgreSQL name.
        assert_ne!(
            BranchGid::new(&gid, &ShardName::new("s1").unwrap()).as_str(),
            branch.as_str()
        );
    }

    #[test]
    fn branch_gid_reads_the_legacy_form_as_any_shards() {
        let gid = Gid::new(&CoordinatorId::new("c1").unwrap(), 42);
        let legacy = BranchGid::parse("treaty:c1:42").unwrap();
        assert_eq!(legacy, BranchGid::legacy(&gid));
        assert_eq!(
            legacy.as_str(),
            gid.as_str(),
            "finished under the exact text prepared"
        );
        assert_eq!(legacy.gid(), &gid);
        assert!(legacy.is_legacy());
        assert_eq!(legacy.shard(), None);
        assert!(legacy.is_of(&ShardName::new("s0").unwrap()));
        assert!(legacy.is_of(&ShardName::new("any_Other-1").unwrap()));
    }

    #[test]
    fn branch_gid_fits_postgres_limit_at_the_longest() {
        let id = CoordinatorId::new(&"a".repeat(64)).unwrap();
        let shard = ShardName::new(&"Z".repeat(64)).unwrap();
        let branch = BranchGid::new(&Gid::new(&id, u64::MAX), &shard);
        assert_eq!(branch.as_str().len(), 157);
        assert!(branch.as_str().len() <= 199);
        assert_eq!(BranchGid::parse(branch.as_str()).unwrap(), branch);
    }

    #[test]
    fn branch_gid_rejects_foreign_and_malformed_text() {
        for bad in [
            "treaty:c1:1:",
            "treaty:c1:1:s0:s1",
            "treaty:c1:01:s0",
            "treaty:c1:x:s0",
            "treaty::1:s0",
            "treaty:c1:1:a b",
            "treaty:c1:1:s0'; DROP TABLE x; --",
            "treaty:c1:1:s0'",
            "other:c1:1:s0",
            "treaty:c1",
            "treaty:",
            &format!("treaty:c1:1:{}", "x".repeat(65)),
        ] {
            assert!(BranchGid::parse(bad).is_err(), "{bad} should be rejected");
        }
        // The wire GID type never takes a branch GID for a transaction's.
        assert!(Gid::parse("treaty:c1:1:s0").is_err());
    }

    #[test]
    fn gid_names_its_decision_shard_and_round_trips() {
        let id = CoordinatorId::new("c1").unwrap();
        let s0 = ShardName::new("s0").unwrap();
        let gid = Gid::with_decision_shard(&id, 42, &s0).unwrap();
        assert_eq!(gid.as_str(), "treaty:c1:42@s0");
        assert_eq!(gid.decision_shard(), Some(&s0));
        assert_eq!(Gid::parse("treaty:c1:42@s0").unwrap(), gid);
        assert_eq!(Gid::new(&id, 42).decision_shard(), None);
        let branch = BranchGid::new(&gid, &ShardName::new("s1").unwrap());
        assert_eq!(branch.as_str(), "treaty:c1:42@s0:s1");
        let parsed = BranchGid::parse(branch.as_str()).unwrap();
        assert_eq!(parsed.gid().decision_shard(), Some(&s0));
        assert_eq!(parsed, branch);
        for bad in [
            "treaty:c1:42@",
            "treaty:c1:@s0",
            "treaty:c1:42@s 0",
            "treaty:c1:42@s0@s1",
            "treaty:c1:42@s0'",
        ] {
            assert!(Gid::parse(bad).is_err(), "{bad} should be rejected");
        }
        let long = CoordinatorId::new(&"a".repeat(64)).unwrap();
        let err = Gid::with_decision_shard(&long, u64::MAX, &ShardName::new(&"Z".repeat(64)).unwrap());
        assert!(matches!(err, Err(IdError::TooLong { .. })), "{err:?}");
        let fits =
            Gid::with_decision_shard(&long, u64::MAX, &ShardName::new(&"Z".repeat(20)).unwrap()).unwrap();
        assert!(
            BranchGid::new(&fits, &ShardName::new(&"Z".repeat(64)).unwrap())
                .as_str()
                .len()
                <= 199
        );
    }

    #[test]
    fn shard_names_are_restricted() {
        assert!(ShardName::new("shard-1_a").is_ok());
        assert!(ShardName::new("").is_err());
        assert!(ShardName::new("a b").is_err());
        assert!(ShardName::new(&"x".repeat(65)).is_err());
    }
}
