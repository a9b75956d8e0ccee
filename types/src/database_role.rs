//! `DatabaseRole`: the PostgreSQL role a client's statements run under in each branch (`SET LOCAL
//! ROLE`), so that the database's GRANTs and row-level security decide what the client may do.
//!
//! The name is formatted into SQL text (`SET LOCAL ROLE "<name>"`; the statement takes no bind
//! parameter), so it is only ever built by `DatabaseRole::new`, which allows the alphabet of a plain
//! PostgreSQL identifier and its length (the rule the access file's `database_role` is checked
//! with, `treaty_proto::auth::check_database_role`), refuses the names PostgreSQL gives a meaning
//! of their own in `SET ROLE` (`none` would be the participant's own role), and quotes it as an
//! identifier all the same. Lower case only: that is how PostgreSQL stores a role created without
//! quotes (`CREATE ROLE App_Alice` makes `app_alice`), so the name reads the same in both places.

use std::fmt;
use std::sync::Arc;

/// PostgreSQL keeps identifiers to `NAMEDATALEN - 1` bytes and silently truncates longer ones, which
/// would make a long name another role's.
pub const MAX_DATABASE_ROLE_BYTES: usize = 63;

/// Names `SET ROLE` reads as something other than a role of that name (`none` is the session
/// user, the participant's own role), or that PostgreSQL reserves.
const RESERVED: [&str; 5] = ["none", "public", "current_user", "current_role", "session_user"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatabaseRoleError {
    #[error(
        "database role {0:?} is empty or longer than {MAX_DATABASE_ROLE_BYTES} bytes (PostgreSQL's limit \
         on a role name)"
    )]
    Length(String),
    #[error(
        "database role {0:?} is not a plain PostgreSQL role name: lower-case ASCII letters, digits, '_' \
         and '$', starting with a letter or '_' (as PostgreSQL stores a role created without quotes)"
    )]
    Alphabet(String),
    #[error(
        "database role {0:?} is a name PostgreSQL reserves (SET ROLE {0} does not mean a role of that \
         name); name the role the client's statements should run under"
    )]
    Reserved(String),
}

/// A PostgreSQL role name, checked (see the module documentation), exactly as PostgreSQL stores it.
/// Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DatabaseRole(Arc<str>);

impl DatabaseRole {
    pub fn new(name: &str) -> Result<Self, DatabaseRoleError> {
        if name.is_empty() || name.len() > MAX_DATABASE_ROLE_BYTES {
            return Err(DatabaseRoleError::Length(name.into()));
        }
        let mut chars = name.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_');
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '$'));
        if !first_ok || !rest_ok {
            return Err(DatabaseRoleError::Alphabet(name.into()));
        }
        if RESERVED.contains(&name) {
            return Err(DatabaseRoleError::Reserved(name.into()));
        }
        Ok(Self(name.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as a quoted SQL identifier, `"app_alice"`, for `SET LOCAL ROLE`. The alphabet holds
    /// no quote; one would be doubled all the same.
    pub fn quoted(&self) -> String {
        format!("\"{}\"", self.0.replace('"', "\"\""))
    }
}

impl fmt::Display for DatabaseRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_role_names_are_accepted_and_quoted() {
        for name in ["app_alice", "_batch", "r2d2", "r$1", "pg_read_all_data"] {
            let role = DatabaseRole::new(name).unwrap();
            assert_eq!(role.as_str(), name);
            assert_eq!(role.quoted(), format!("\"{name}\""));
        }
        let longest = "a".repeat(MAX_DATABASE_ROLE_BYTES);
        assert!(DatabaseRole::new(&longest).is_ok());
    }

    #[test]
    fn names_that_could_escape_the_quotes_or_mean_something_else_are_refused() {
        let too_long = "a".repeat(MAX_DATABASE_ROLE_BYTES + 1);
        assert_eq!(
            DatabaseRole::new(&too_long),
            Err(DatabaseRoleError::Length(too_long.clone()))
        );
        assert!(matches!(DatabaseRole::new(""), Err(DatabaseRoleError::Length(_))));
        for bad in [
            "alice\"; DROP TABLE kv; --",
            "a b",
            "a;b",
            "a'b",
            "1abc",
            "$abc",
            "-abc",
            "a\0b",
            "rôle",
            "a.b",
            // Quoted, these would name roles other than the ones `CREATE ROLE App_Alice` makes.
            "App_Alice",
            "NONE",
            "batch-job",
        ] {
            assert_eq!(
                DatabaseRole::new(bad),
                Err(DatabaseRoleError::Alphabet(bad.into())),
                "{bad:?}"
            );
        }
        for reserved in RESERVED {
            assert_eq!(
                DatabaseRole::new(reserved),
                Err(DatabaseRoleError::Reserved(reserved.into())),
                "{reserved:?}"
            );
        }
    }

    #[test]
    fn errors_name_the_value_and_the_rule() {
        let message = DatabaseRole::new("a b").unwrap_err().to_string();
        assert!(
            message.contains("\"a b\"") && message.contains("letters"),
            "{message}"
        );
        let message = DatabaseRole::new("none").unwrap_err().to_string();
        assert!(message.contains("reserves"), "{message}");
    }
}
