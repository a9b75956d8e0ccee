//! The password from PostgreSQL's passfile, for a URL that gives none (and no `PGPASSWORD`),
//! looked up as sqlx 0.9 does: `PGPASSFILE`, then (if it has no entry) `~/.pgpass`; lines
//! `host:port:database:user:password`, `*` matching anything, `\:` and `\\` escaping, `#`
//! starting a comment, the first matching line winning.
//!
//! Whether the file is private is checked once at start (`treaty_proto::secret_file::
//! check_passfile`, which refuses to start otherwise); here it is only read. Nothing logged
//! here quotes a line, since a line holds a password.

use std::io::BufRead;
use std::path::Path;

use super::params::Environment;

/// The password of the first line matching the connection, from the first passfile that has one.
pub(super) fn find_password(
    env: &Environment,
    host: &str,
    port: u16,
    user: &str,
    database: Option<&str>,
) -> Option<String> {
    let key = Key {
        host,
        port: &port.to_string(),
        database: database.unwrap_or_default(),
        user,
    };
    if let Some(path) = env.var("PGPASSFILE")
        && let Some(password) = password_in_file(Path::new(path), &key)
    {
        return Some(password);
    }
    let default = env.home.as_ref()?.join(".pgpass");
    password_in_file(&default, &key)
}

/// What a line is matched against.
struct Key<'a> {
    host: &'a str,
    port: &'a str,
    database: &'a str,
    user: &'a str,
}

fn password_in_file(path: &Path, key: &Key<'_>) -> Option<String> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            tracing::debug!(path = %path.display(), "no passfile");
            return None;
        }
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "cannot read the passfile");
            return None;
        }
    };
    password_in(std::io::BufReader::new(file), key)
}

/// Reads as sqlx does: a line that is not UTF-8 ends the reading; a malformed line is skipped.
fn password_in(mut reader: impl BufRead, key: &Key<'_>) -> Option<String> {
    let mut line = String::new();
    let mut number = 0;
    while let Ok(length) = reader.read_line(&mut line) {
        if length == 0 {
            break;
        }
        number += 1;
        let text = line.strip_suffix('\n').unwrap_or(&line);
        let text = text.strip_suffix('\r').unwrap_or(text);
        match password_of_line(text, key) {
            Ok(Some(password)) => return Some(password),
            Ok(None) => {}
            Err(MissingField) => {
                tracing::warn!(
                    line = number,
                    "a passfile line has fewer than five fields; skipped"
                );
            }
        }
        line.clear();
    }
    None
}

/// A line ended before its fifth (password) field.
#[derive(Debug, PartialEq, Eq)]
struct MissingField;

/// The line's password if its first four fields match `key`; `None` for a comment, an empty
/// line or another connection's line.
fn password_of_line(mut line: &str, key: &Key<'_>) -> Result<Option<String>, MissingField> {
    if let None | Some('#') = line.trim_end().chars().next() {
        return Ok(None);
    }
    for wanted in [key.host, key.port, key.database, key.user] {
        let field = next_field(&mut line)?;
        if field != "*" && field != wanted {
            return Ok(None);
        }
    }
    Ok(Some(unescape(line)))
}

/// The field at the start of `line`, unescaped, and `line` moved past it and its `:`.
fn next_field(line: &mut &str) -> Result<String, MissingField> {
    let mut field = String::new();
    let mut chars = line.char_indices();
    while let Some((index, c)) = chars.next() {
        match c {
            ':' => {
                *line = &line[index + 1..];
                return Ok(field);
            }
            // Any escaped character stands for itself (libpq documents `\:` and `\\`).
            '\\' => match chars.next() {
                Some((_, escaped)) => field.push(escaped),
                None => return Err(MissingField),
            },
            c => field.push(c),
        }
    }
    Err(MissingField)
}

/// The password: the rest of the line, unescaped; a `\` at its very end is dropped (as sqlx).
fn unescape(text: &str) -> String {
    let mut password = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(escaped) = chars.next() {
                password.push(escaped);
            }
        } else {
            password.push(c);
        }
    }
    password
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: Key<'static> = Key {
        host: "db.example",
        port: "5432",
        database: "shard",
        user: "treaty",
    };

    fn line(text: &str) -> Result<Option<String>, MissingField> {
        password_of_line(text, &KEY)
    }

    #[test]
    fn a_line_matches_field_by_field_with_wildcards() {
        assert_eq!(line("db.example:5432:shard:treaty:pw"), Ok(Some("pw".into())));
        assert_eq!(line("*:*:*:*:pw"), Ok(Some("pw".into())));
        assert_eq!(line("db.example:*:shard:treaty:pw"), Ok(Some("pw".into())));
        assert_eq!(line("other:5432:shard:treaty:pw"), Ok(None));
        assert_eq!(line("db.example:5433:shard:treaty:pw"), Ok(None));
        assert_eq!(line("db.example:5432:other:treaty:pw"), Ok(None));
        assert_eq!(line("db.example:5432:shard:other:pw"), Ok(None));
        // A field is compared whole: no prefix or case folding.
        assert_eq!(line("DB.example:5432:shard:treaty:pw"), Ok(None));
        assert_eq!(line("db:5432:shard:treaty:pw"), Ok(None));
    }

    #[test]
    fn escapes_in_fields_and_in_the_password() {
        let key = Key {
            host: "h:1",
            port: "5432",
            database: "d\\b",
            user: "u",
        };
        assert_eq!(
            password_of_line("h\\:1:5432:d\\\\b:u:p\\:w\\\\d", &key),
            Ok(Some("p:w\\d".into()))
        );
        // An escaped `*` is still the wildcard (the field is compared once unescaped, as sqlx).
        assert_eq!(line("\\*:5432:shard:treaty:pw"), Ok(Some("pw".into())));
        // Trailing spaces belong to the password; a lone trailing backslash is dropped.
        assert_eq!(line("*:*:*:*:pw "), Ok(Some("pw ".into())));
        assert_eq!(line("*:*:*:*:pw\\"), Ok(Some("pw".into())));
        // An unescaped colon in the password is part of it.
        assert_eq!(line("*:*:*:*:a:b"), Ok(Some("a:b".into())));
    }

    #[test]
    fn comments_blank_and_short_lines() {
        assert_eq!(line("# db.example:5432:shard:treaty:pw"), Ok(None));
        assert_eq!(line(""), Ok(None));
        assert_eq!(line("   "), Ok(None));
        assert_eq!(line("db.example:5432:shard:treaty"), Err(MissingField));
        assert_eq!(line("db.example:5432:shard:treaty\\:pw"), Err(MissingField));
    }

    #[test]
    fn the_first_matching_line_of_a_file_wins() {
        let file = "# comment\r\n\
                    other:5432:*:treaty:wrong\n\
                    malformed:line\n\
                    *:5432:shard:treaty:first\r\n\
                    *:*:*:*:second\n";
        assert_eq!(password_in(file.as_bytes(), &KEY), Some("first".into()));
        let key = Key { port: "6000", ..KEY };
        assert_eq!(password_in(file.as_bytes(), &key), Some("second".into()));
        assert_eq!(password_in("a:b:c:d:e".as_bytes(), &KEY), None);
    }

    #[test]
    fn a_url_without_database_matches_an_empty_field_or_a_wildcard() {
        let key = Key { database: "", ..KEY };
        assert_eq!(password_of_line("*:5432::treaty:pw", &key), Ok(Some("pw".into())));
        assert_eq!(
            password_of_line("*:5432:*:treaty:pw", &key),
            Ok(Some("pw".into()))
        );
        assert_eq!(password_of_line("*:5432:shard:treaty:pw", &key), Ok(None));
    }
}
