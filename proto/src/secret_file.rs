//! Secrets read from files, by both services: a database URL from a file
//! (`--database-url-file`, `--decision-store-file`), and the check that PostgreSQL's passfile
//! (`PGPASSFILE`, else `~/.pgpass`) is private before a URL without a password relies on it.
//!
//! Like libpq, a file that its group or the world may read is refused: a secret anyone on the host
//! can read is no secret, and saying so at start beats a password that silently stops being used.
//! (sqlx, which reads the passfile itself, only logs at `warn` and goes on without it, so the
//! participant's later "password authentication failed" would not say why.) No error here quotes
//! a file's content.

use std::path::{Path, PathBuf};

use treaty_types::secret::has_password;

#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "{path} may be read by its group or by anyone (mode {mode:04o}); a file holding a secret must be \
         private to its owner: chmod 600 {path}"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("{path} is empty")]
    Empty { path: PathBuf },
}

/// The file's content, without surrounding whitespace (the trailing newline an editor adds).
/// Refused if the group or others may read or write it.
pub fn read_secret_file(path: &Path) -> Result<String, SecretFileError> {
    check_private(path)?;
    let text = std::fs::read_to_string(path).map_err(|source| SecretFileError::Read {
        path: path.into(),
        source,
    })?;
    let text = text.trim();
    if text.is_empty() {
        return Err(SecretFileError::Empty { path: path.into() });
    }
    Ok(text.to_owned())
}

/// For a connection URL without a password of its own (and no `PGPASSWORD`), the passfile the
/// PostgreSQL client will read must be private; a missing one is fine (no password, or another
/// authentication method).
pub fn check_passfile(url: &str) -> Result<(), SecretFileError> {
    if has_password(url) || std::env::var_os("PGPASSWORD").is_some() {
        return Ok(());
    }
    // sqlx reads `PGPASSFILE` and, if it has no entry, `~/.pgpass`: both are checked.
    let candidates = [
        std::env::var_os("PGPASSFILE").map(PathBuf::from),
        std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".pgpass")),
    ];
    for path in candidates.into_iter().flatten() {
        if path.exists() {
            check_private(&path)?;
        }
    }
    Ok(())
}

#[cfg(unix)]
fn check_private(path: &Path) -> Result<(), SecretFileError> {
    use std::os::unix::fs::PermissionsExt;

    let metadata = std::fs::metadata(path).map_err(|source| SecretFileError::Read {
        path: path.into(),
        source,
    })?;
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SecretFileError::TooOpen {
            path: path.into(),
            mode,
        });
    }
    Ok(())
}

/// Elsewhere the file's ACLs are the operating system's business.
#[cfg(not(unix))]
fn check_private(_path: &Path) -> Result<(), SecretFileError> {
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_private_file_is_read_trimmed_and_an_open_one_is_refused_without_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("url");
        std::fs::write(&path, "postgres://u:hunter2@h/db\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret_file(&path).unwrap(), "postgres://u:hunter2@h/db");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = read_secret_file(&path).unwrap_err().to_string();
        assert!(error.contains("chmod 600"), "{error}");
        assert!(error.contains("0644"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
        std::fs::write(&path, "\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(matches!(
            read_secret_file(&path),
            Err(SecretFileError::Empty { .. })
        ));
        assert!(matches!(
            read_secret_file(&dir.path().join("missing")),
            Err(SecretFileError::Read { .. })
        ));
    }
}
