//! The access file (`--access-file`): who may call a service and as what. It is read once at
//! start and parsed strictly (an unknown key, a role that does not exist, a malformed token hash
//! or a name given twice is refused with its line), because a typo here silently widens or
//! narrows who gets in.
//!
//! Bearer tokens are kept only as SHA-256 hashes; a presented token is hashed and compared with
//! every stored hash in constant time, so neither the file nor the time a refusal takes tells
//! anything about a valid token.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use subtle::ConstantTimeEq;

use super::{Caller, Role, RoleSet};

/// Why an access file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AccessFileError {
    #[error("cannot read the access file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the access file {path} is not valid: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// One `[[caller]]` entry as written.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CallerEntry {
    /// The common name of a client certificate signed by `--tls-client-ca`.
    certificate: Option<String>,
    /// A bearer token's caller: its name, and the token's SHA-256 (hex).
    name: Option<String>,
    token_sha256: Option<String>,
    roles: Vec<String>,
    /// The PostgreSQL role the caller's statements run under on every shard.
    database_role: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileContents {
    #[serde(default)]
    caller: Vec<CallerEntry>,
}

/// Who may call, parsed from an access file.
#[derive(Debug)]
pub struct AccessPolicy {
    path: PathBuf,
    certificates: std::collections::HashMap<String, Arc<Caller>>,
    tokens: Vec<([u8; 32], Arc<Caller>)>,
}

impl AccessPolicy {
    /// Reads and checks the access file at `path`.
    pub fn load(path: &Path) -> Result<Self, AccessFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| AccessFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses the text of an access file; `path` names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, AccessFileError> {
        let invalid = |message: String| AccessFileError::Invalid {
            path: path.to_owned(),
            message,
        };
        let contents: FileContents = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if contents.caller.is_empty() {
            return Err(invalid(
                "it names no [[caller]]: nobody could call this service. Add entries, or leave --access-file out to \
                 run without authentication (loopback only)"
                    .into(),
            ));
        }
        let mut policy = Self {
            path: path.to_owned(),
            certificates: Default::default(),
            tokens: Vec::new(),
        };
        let mut names = HashSet::new();
        for (index, entry) in contents.caller.into_iter().enumerate() {
            let which = format!("[[caller]] number {}", index + 1);
            let roles = parse_roles(&entry.roles).map_err(|e| invalid(format!("{which}: {e}")))?;
            if let Some(role) = &entry.database_role {
                check_database_role(role).map_err(|e| invalid(format!("{which}: {e}")))?;
            }
            match (entry.certificate, entry.name, entry.token_sha256) {
                (Some(common_name), None, None) => {
                    if common_name.trim().is_empty() {
                        return Err(invalid(format!("{which}: certificate is empty")));
                    }
                    let identity = format!("cert:{common_name}");
                    if !names.insert(identity.clone()) {
                        return Err(invalid(format!(
                            "{which}: certificate {common_name:?} is listed twice"
                        )));
                    }
                    let caller = Arc::new(Caller {
                        identity,
                        roles,
                        database_role: entry.database_role,
                    });
                    policy.certificates.insert(common_name, caller);
                }
                (None, Some(name), Some(hash)) => {
                    if name.trim().is_empty() {
                        return Err(invalid(format!("{which}: name is empty")));
                    }
                    let digest = parse_sha256(&hash).ok_or_else(|| {
                        invalid(format!(
                            "{which}: token_sha256 must be 64 hexadecimal digits (the SHA-256 of the token; \
                             `treaty token new` prints one)"
                        ))
                    })?;
                    let identity = format!("token:{name}");
                    if !names.insert(identity.clone()) {
                        return Err(invalid(format!("{which}: name {name:?} is listed twice")));
                    }
                    if policy.tokens.iter().any(|(known, _)| *known == digest) {
                        return Err(invalid(format!(
                            "{which}: the same token hash is given to two callers"
                        )));
                    }
                    let caller = Arc::new(Caller {
                        identity,
                        roles,
                        database_role: entry.database_role,
                    });
                    policy.tokens.push((digest, caller));
                }
                _ => {
                    return Err(invalid(format!(
                        "{which}: give either `certificate = \"<common name>\"` or both `name` and `token_sha256`"
                    )));
                }
            }
        }
        Ok(policy)
    }

    /// The file this policy came from, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether any caller authenticates with a bearer token.
    pub fn has_tokens(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Whether any caller authenticates with a client certificate.
    pub fn has_certificates(&self) -> bool {
        !self.certificates.is_empty()
    }

    /// The caller a client certificate with this common name is.
    pub fn by_certificate(&self, common_name: &str) -> Option<&Arc<Caller>> {
        self.certificates.get(common_name)
    }

    /// The caller holding `token`: every stored hash is compared, in constant time each, whatever
    /// matches.
    pub fn by_token(&self, token: &str) -> Option<&Arc<Caller>> {
        let digest = sha256(token.as_bytes());
        let mut found = None;
        for (known, caller) in &self.tokens {
            if bool::from(known.ct_eq(&digest)) {
                found = Some(caller);
            }
        }
        found
    }
}

/// A new bearer token: 32 bytes from the operating system's random source, hex, prefixed `trt_`
/// so that secret scanners and people can tell what it is.
pub fn new_token() -> Result<String, ring::error::Unspecified> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut bytes)?;
    Ok(format!(
        "trt_{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// The lower-case hex of a token's SHA-256, as an access file stores it.
pub fn token_sha256_hex(token: &str) -> String {
    sha256(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn parse_roles(names: &[String]) -> Result<RoleSet, String> {
    if names.is_empty() {
        return Err(format!("roles is empty; give one or more of {}", Role::ALL_NAMES));
    }
    let mut roles = RoleSet::default();
    for name in names {
        let role = Role::parse(name)
            .ok_or_else(|| format!("unknown role {name:?}; the roles are {}", Role::ALL_NAMES))?;
        roles.insert(role);
    }
    Ok(roles)
}

/// A PostgreSQL role name Treaty will put in `SET LOCAL ROLE`: the one rule,
/// `treaty_types::DatabaseRole`'s (a plain identifier within PostgreSQL's 63-byte limit, no
/// reserved name), so the access file refuses at start what a participant would refuse later.
pub fn check_database_role(role: &str) -> Result<(), String> {
    treaty_types::DatabaseRole::new(role)
        .map(|_| ())
        .map_err(|error| format!("database_role: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AccessPolicy, AccessFileError> {
        AccessPolicy::parse(Path::new("access.toml"), text)
    }

    #[test]
    fn certificates_and_tokens_become_callers_with_their_roles() {
        let hash = token_sha256_hex("s3cret-token");
        let policy = parse(&format!(
            r#"
            [[caller]]
            certificate = "alice"
            roles = ["client", "operator"]
            database_role = "app_alice"

            [[caller]]
            name = "batch-job"
            token_sha256 = "{hash}"
            roles = ["client"]
            "#
        ))
        .unwrap();
        let alice = policy.by_certificate("alice").unwrap();
        assert_eq!(alice.identity(), "cert:alice");
        assert!(alice.has(Role::Operator) && alice.has(Role::Client) && !alice.has(Role::Admin));
        assert_eq!(alice.database_role(), Some("app_alice"));
        let batch = policy.by_token("s3cret-token").unwrap();
        assert_eq!(batch.identity(), "token:batch-job");
        assert!(batch.has(Role::Client) && !batch.has(Role::Operator));
        assert!(policy.by_token("s3cret-tokeN").is_none());
        assert!(policy.by_token("").is_none());
        assert!(policy.by_certificate("bob").is_none());
    }

    #[test]
    fn mistakes_are_refused_naming_the_entry_and_the_problem() {
        let cases = [
            ("", "names no [[caller]]"),
            (
                "[[caller]]\ncertificate = \"a\"\nroles = [\"superuser\"]\n",
                "unknown role \"superuser\"",
            ),
            ("[[caller]]\ncertificate = \"a\"\nroles = []\n", "roles is empty"),
            ("[[caller]]\nroles = [\"client\"]\n", "give either"),
            (
                "[[caller]]\nname = \"x\"\ntoken_sha256 = \"abc\"\nroles = [\"client\"]\n",
                "64 hexadecimal digits",
            ),
            (
                "[[caller]]\ncertificate = \"a\"\nroles = [\"client\"]\n[[caller]]\ncertificate = \"a\"\nroles = [\"client\"]\n",
                "listed twice",
            ),
            (
                "[[caller]]\ncertificate = \"a\"\nroles = [\"client\"]\ndatabase_role = \"x; drop\"\n",
                "not a plain PostgreSQL role name",
            ),
            (
                "[[caller]]\ncertificate = \"a\"\nroles = [\"client\"]\nrole = \"x\"\n",
                "unknown field",
            ),
        ];
        for (text, expected) in cases {
            let error = parse(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
            assert!(error.contains("access.toml"), "{error}");
        }
    }

    #[test]
    fn new_tokens_differ_and_their_hashes_authenticate_them() {
        let (a, b) = (new_token().unwrap(), new_token().unwrap());
        assert_ne!(a, b);
        assert!(a.starts_with("trt_") && a.len() == 68, "{a}");
        let policy = parse(&format!(
            "[[caller]]\nname = \"a\"\ntoken_sha256 = \"{}\"\nroles = [\"client\"]\n",
            token_sha256_hex(&a)
        ))
        .unwrap();
        assert!(policy.by_token(&a).is_some());
        assert!(policy.by_token(&b).is_none());
    }

    #[test]
    fn database_roles_are_plain_identifiers() {
        for good in ["app_alice", "_x", "r2d2", "a$b"] {
            assert!(check_database_role(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Alice",
            "1abc",
            "a b",
            "a\"b",
            "none",
            "public",
            &"a".repeat(64),
        ] {
            assert!(check_database_role(bad).is_err(), "{bad}");
        }
    }
}
