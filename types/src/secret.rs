//! Secrets in connection strings: the one redactor (`redact`) every log line and error message
//! passes a database URL through, and `SecretUrl`, the type configuration keeps such a URL in, so
//! that neither `{:?}` nor `{}` of a config can print a password.
//!
//! It lives here, in the crate with no dependencies, because both services (and the lab tooling
//! that starts them) need the same rules, and a redactor must not differ between the place a URL
//! is logged and the place it is put into an error.
//!
//! What is hidden: the password of a URL's userinfo (`scheme://user:PASSWORD@host`), and the value
//! of every `password` or `sslpassword` parameter, whether in a URL's query (`?password=`,
//! `&SslPassword=`, a percent-encoded key) or in a libpq key=value string
//! (`host=h password='a b'`). The redactor also works on free text (a configuration file's parse
//! error quoting a line), so it looks for URLs and parameters anywhere in its input. On input it
//! cannot make sense of, it hides more, never less.
//!
//! `SecretUrl::to_connect` gives the URL as the driver (sqlx) must see it: a password parameter
//! the redactor hides but sqlx would not recognise (`?PassWord=`) is renamed, and `sslpassword` is
//! refused, because sqlx logs the value of every parameter it does not know.

use std::fmt;

/// What a hidden value is replaced with.
pub const REDACTED: &str = "***";

/// Parameter names whose value is a secret, compared without case and after percent-decoding.
const SECRET_KEYS: [&str; 2] = ["password", "sslpassword"];

/// `text` with every password hidden: URL userinfo passwords and `password`/`sslpassword`
/// parameters (query or key=value). Text without one comes back unchanged.
pub fn redact(text: &str) -> String {
    redact_parameters(&redact_userinfo(text))
}

/// Whether `text` (a URL or a key=value string) carries a password of its own; without one,
/// PostgreSQL clients look in `PGPASSWORD` and the passfile.
pub fn has_password(text: &str) -> bool {
    redact(text) != text
}

/// A URL (or key=value connection string) that may hold a password. `Debug` and `Display` show
/// it redacted; only `expose` gives the text itself, for the one place that connects with it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> SecretUrl {
        SecretUrl(url.into())
    }

    /// The URL with its password, to connect with. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL without its password, for messages.
    pub fn redacted(&self) -> String {
        redact(&self.0)
    }
}

/// Why a URL cannot be handed to the PostgreSQL driver as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretUrlError {
    /// The driver (sqlx) has no use for this parameter; it would ignore it and log its value.
    #[error(
        "the database URL's `{key}` parameter is not supported (the PostgreSQL driver cannot \
         decrypt a client key): remove it and give an unencrypted key file, private to its owner"
    )]
    Unsupported { key: String },
}

impl SecretUrl {
    /// The URL as the driver should parse it: a `password` parameter spelt in another case or
    /// percent-encoded (which the redactor, and so the operator reading a log, takes for the
    /// password) renamed `password`, since sqlx matches names exactly and logs the value of a
    /// parameter it does not know; `sslpassword`, which sqlx does not know, refused for the same
    /// reason. Anything else is left as it is. Never log the result.
    pub fn to_connect(&self) -> Result<String, SecretUrlError> {
        let url = self.expose();
        let Some((base, query)) = url.split_once('?') else {
            return Ok(url.to_owned());
        };
        let (query, fragment) = match query.split_once('#') {
            Some((query, fragment)) => (query, Some(fragment)),
            None => (query, None),
        };
        let mut pairs = Vec::new();
        for pair in query.split('&') {
            let (key, value) = match pair.split_once('=') {
                Some((key, value)) => (key, Some(value)),
                None => (pair, None),
            };
            if !is_secret_key(key) {
                pairs.push(pair.to_owned());
                continue;
            }
            let name = percent_decode(key).to_ascii_lowercase();
            if name != "password" {
                return Err(SecretUrlError::Unsupported { key: name });
            }
            pairs.push(match value {
                Some(value) => format!("password={value}"),
                None => "password".to_owned(),
            });
        }
        let mut out = format!("{base}?{}", pairs.join("&"));
        if let Some(fragment) = fragment {
            out.push('#');
            out.push_str(fragment);
        }
        Ok(out)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.redacted(), f)
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl From<String> for SecretUrl {
    fn from(url: String) -> SecretUrl {
        SecretUrl(url)
    }
}

impl From<&str> for SecretUrl {
    fn from(url: &str) -> SecretUrl {
        SecretUrl(url.to_owned())
    }
}

/// Hides the password of every `scheme://user:password@host` in `text`.
fn redact_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(found) = rest.find("://") {
        let after = found + 3;
        out.push_str(&rest[..after]);
        let tail = &rest[after..];
        // The authority ends at the path, query or fragment, or at the end of the word (free text).
        let word_end = tail.find(char::is_whitespace).unwrap_or(tail.len());
        let word = &tail[..word_end];
        let authority_end = word.find(['/', '?', '#']).unwrap_or(word.len());
        let authority = &word[..authority_end];
        let consumed = match authority.rfind('@') {
            // userinfo@host: the userinfo ends at the last '@' of the authority (a password may
            // hold one unencoded; a host never does).
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.split_once(':') {
                    Some((user, _)) => {
                        out.push_str(user);
                        out.push(':');
                        out.push_str(REDACTED);
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
                authority_end
            }
            // No '@' in the authority, but one later in the word after a `user:word` that is no
            // port: a password holding an unencoded '/', '?' or '#'. Everything up to the word's
            // last '@' may be that password, so all of it is hidden.
            None if looks_like_cut_password(authority) && word[authority_end..].contains('@') => {
                let at = word.rfind('@').unwrap_or(word.len());
                let user = authority.split_once(':').map_or("", |(user, _)| user);
                out.push_str(user);
                out.push(':');
                out.push_str(REDACTED);
                at
            }
            // `user:word` and nothing after: not a host and port, so possibly a password.
            None if looks_like_cut_password(authority) => {
                let user = authority.split_once(':').map_or("", |(user, _)| user);
                out.push_str(user);
                out.push(':');
                out.push_str(REDACTED);
                authority_end
            }
            None => 0,
        };
        rest = &tail[consumed..];
    }
    out.push_str(rest);
    out
}

/// `host:port` has digits after its last ':' (outside an IPv6 literal's brackets); anything else
/// with a ':' may be `user:password` whose '@' was cut off.
fn looks_like_cut_password(authority: &str) -> bool {
    let outside_brackets = match authority.rfind(']') {
        Some(close) => &authority[close + 1..],
        None => authority,
    };
    match outside_brackets.rsplit_once(':') {
        Some((_, port)) => !port.bytes().all(|b| b.is_ascii_digit()),
        None => false,
    }
}

/// Hides the value of every `password=` and `sslpassword=` parameter: in a URL query (the value
/// ends at `&`, `#` or whitespace) and in a key=value string (a value ends at whitespace, may be
/// quoted with `'`, and `\` escapes the next character).
fn redact_parameters(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut at = 0;
    while at < bytes.len() {
        let boundary = at == 0 || is_key_boundary(bytes[at - 1]);
        if !(boundary && is_key_byte(bytes[at])) {
            at += 1;
            continue;
        }
        let key_start = at;
        while at < bytes.len() && is_key_byte(bytes[at]) {
            at += 1;
        }
        let key = &text[key_start..at];
        let mut value_start = at;
        while value_start < bytes.len() && bytes[value_start] == b' ' {
            value_start += 1;
        }
        if value_start >= bytes.len() || bytes[value_start] != b'=' {
            continue;
        }
        value_start += 1;
        let in_query = key_start > 0 && matches!(bytes[key_start - 1], b'?' | b'&');
        if !in_query {
            while value_start < bytes.len() && bytes[value_start] == b' ' {
                value_start += 1;
            }
        }
        if !is_secret_key(key) {
            // Other values are scanned too: one may be a URL with a `?password=` of its own.
            at = value_start;
            continue;
        }
        let value_end = value_end(bytes, value_start, in_query);
        out.push_str(&text[copied..value_start]);
        out.push_str(REDACTED);
        copied = value_end;
        at = value_end.max(at);
    }
    out.push_str(&text[copied..]);
    out
}

/// Where a parameter's value starting at `start` ends (exclusive).
fn value_end(bytes: &[u8], start: usize, in_query: bool) -> usize {
    let mut at = start;
    if !in_query && bytes.get(at) == Some(&b'\'') {
        // Quoted: to the closing quote; unterminated, to the end (all of it may be the secret).
        at += 1;
        while at < bytes.len() {
            match bytes[at] {
                b'\\' => at += 2,
                b'\'' => return at + 1,
                _ => at += 1,
            }
        }
        return bytes.len();
    }
    while at < bytes.len() {
        match bytes[at] {
            b'\\' if !in_query => at += 2,
            b'&' | b'#' if in_query => return at,
            byte if byte.is_ascii_whitespace() => return at,
            _ => at += 1,
        }
    }
    bytes.len()
}

fn is_key_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'%' | b'-' | b'.')
}

fn is_key_boundary(byte: u8) -> bool {
    byte.is_ascii_whitespace() || matches!(byte, b'?' | b'&' | b';' | b',' | b'"' | b'\'' | b'(' | b'{')
}

/// Whether a parameter name, percent-decoded and without case, names a secret.
fn is_secret_key(key: &str) -> bool {
    let decoded = percent_decode(key).to_ascii_lowercase();
    SECRET_KEYS.contains(&decoded.as_str())
}

/// `%XX` decoded; anything else (including a bad escape) kept as it is.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let escaped = (bytes[at] == b'%')
            .then(|| text.get(at + 1..at + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                at += 3;
            }
            None => {
                out.push(bytes[at]);
                at += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWORD: &str = "Sup3r-s3cret";

    #[test]
    fn the_userinfo_password_is_hidden() {
        assert_eq!(redact("postgres://u:secret@h:5/db"), "postgres://u:***@h:5/db");
        // A password holding an unencoded '@': the userinfo ends at the authority's last '@'.
        assert_eq!(redact("postgres://u:p@ss@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("postgresql://u:p%40ss%2F@h/db"), "postgresql://u:***@h/db");
        assert_eq!(redact("http://u:pw@[::1]:80/x"), "http://u:***@[::1]:80/x");
    }

    #[test]
    fn password_parameters_are_hidden_in_any_case_and_encoding() {
        assert_eq!(
            redact("postgres://u@h/db?password=secret"),
            "postgres://u@h/db?password=***"
        );
        assert_eq!(
            redact("postgres://u@h/db?sslmode=require&PassWord=secret&application_name=x"),
            "postgres://u@h/db?sslmode=require&PassWord=***&application_name=x"
        );
        assert_eq!(
            redact("postgres://u@h/db?pass%77ord=secret#frag"),
            "postgres://u@h/db?pass%77ord=***#frag"
        );
        assert_eq!(
            redact("postgres://u@h/db?%70%61%73%73%77%6F%72%64=secret"),
            "postgres://u@h/db?%70%61%73%73%77%6F%72%64=***"
        );
        assert_eq!(
            redact("postgres://u@h/db?sslcert=c&sslpassword=secret"),
            "postgres://u@h/db?sslcert=c&sslpassword=***"
        );
        assert_eq!(
            redact("postgres://u:a@h/db?password=b"),
            "postgres://u:***@h/db?password=***"
        );
    }

    #[test]
    fn key_value_strings_are_hidden() {
        assert_eq!(
            redact("host=h user=u password=secret dbname=d"),
            "host=h user=u password=*** dbname=d"
        );
        assert_eq!(
            redact("host=h password = 'a b\\' c' dbname=d"),
            "host=h password = *** dbname=d"
        );
        assert_eq!(
            redact("host=h SSLPASSWORD=x\\ y port=5"),
            "host=h SSLPASSWORD=*** port=5"
        );
        // Not a secret key: `mypassword` is not `password`.
        assert_eq!(redact("mypassword=x"), "mypassword=x");
    }

    #[test]
    fn text_without_a_password_is_unchanged() {
        for text in [
            "postgres://u@h:5432/db",
            "postgres://u@h/db?sslmode=require&application_name=a",
            "postgres://h:5432/db",
            "postgres:///db?host=/run/postgresql",
            "http://127.0.0.1:7600",
            "http://[::1]/x",
            "host=h user=u dbname=d",
            "file",
            "shard",
            "",
        ] {
            assert_eq!(redact(text), text);
            assert!(!has_password(text), "{text}");
        }
        assert!(has_password("postgres://u:p@h/db"));
        assert!(has_password("postgres://u@h/db?password=p"));
    }

    #[test]
    fn free_text_is_redacted_where_urls_and_parameters_appear() {
        let message = format!(
            "config file p.toml: line 3: database_url = \"postgres://u:{PASSWORD}@h/db\" oops, and password={PASSWORD}"
        );
        let shown = redact(&message);
        assert!(!shown.contains(PASSWORD), "{shown}");
        assert!(shown.contains("postgres://u:***@h/db"), "{shown}");
        let quoted = format!("url = \"postgres://u@h/db?sslpassword={PASSWORD}&x=1\" nonsense");
        assert_eq!(
            redact(&quoted),
            "url = \"postgres://u@h/db?sslpassword=***&x=1\" nonsense"
        );
    }

    /// Malformed input: no panic, and the password never comes back.
    #[test]
    fn malformed_input_never_panics_or_echoes_a_password() {
        let cases = [
            format!("postgres://u:{PASSWORD}"),
            format!("postgres://u:{PASSWORD}/x@h/db"),
            format!("postgres://u:{PASSWORD}?x@h/db"),
            format!("postgres://u:{PASSWORD}#@h"),
            format!("postgres://:{PASSWORD}@"),
            format!("://:{PASSWORD}@"),
            format!("postgres://u@h/db?password={PASSWORD}&"),
            format!("postgres://u@h/db?password={PASSWORD}"),
            format!("password='{PASSWORD}"),
            format!("password={PASSWORD}\\"),
            format!("password=   {PASSWORD}"),
            format!("host=h password='{PASSWORD}\\'"),
            format!("postgres://u:{PASSWORD}@h/db?password=%"),
        ];
        for case in &cases {
            let shown = redact(case);
            assert!(!shown.contains(PASSWORD), "{case} -> {shown}");
        }
        // Odd bytes and cut escapes anywhere: never a panic.
        let odd = [
            "%",
            "%4",
            "password=",
            "password",
            "=",
            "://",
            "@://@",
            "?&=",
            "é://ü:ö@",
            "password=é'",
        ];
        for text in odd {
            let _ = redact(text);
        }
        for len in 0..cases[1].len() {
            if let Some(prefix) = cases[1].get(..len) {
                let _ = redact(prefix);
            }
        }
    }

    #[test]
    fn the_url_to_connect_with_spells_the_password_parameter_as_the_driver_expects() {
        let connect = |url: &str| SecretUrl::new(url).to_connect();
        assert_eq!(
            connect("postgres://u@h/db?sslmode=disable&PassWord=p%26q&x=1#f"),
            Ok("postgres://u@h/db?sslmode=disable&password=p%26q&x=1#f".to_owned())
        );
        assert_eq!(
            connect("postgres://u@h/db?pass%77ord=p"),
            Ok("postgres://u@h/db?password=p".to_owned())
        );
        for unchanged in [
            "postgres://u:p@h/db",
            "postgres://u@h/db?password=p&sslmode=require",
            "host=h",
        ] {
            assert_eq!(connect(unchanged), Ok(unchanged.to_owned()));
        }
        let refused = connect(&format!("postgres://u@h/db?SSLPassword={PASSWORD}")).unwrap_err();
        assert_eq!(
            refused,
            SecretUrlError::Unsupported {
                key: "sslpassword".into()
            }
        );
        assert!(!refused.to_string().contains(PASSWORD));
    }

    #[test]
    fn secret_url_debug_and_display_are_redacted() {
        let url = SecretUrl::new(format!("postgres://u:{PASSWORD}@h/db?sslpassword={PASSWORD}"));
        assert!(!format!("{url:?}").contains(PASSWORD));
        assert!(!format!("{url}").contains(PASSWORD));
        assert!(url.expose().contains(PASSWORD));
    }
}
