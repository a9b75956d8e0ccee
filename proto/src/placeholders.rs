//! Counts the bind parameters a statement expects, from its text: the highest `$n` placeholder
//! outside string literals, quoted identifiers, dollar-quoted bodies and comments.
//!
//! Why here and not by asking PostgreSQL: a `Parse` that names parameter types accepts more types
//! than the text uses (three parameters for two placeholders ran silently), and too few fail with a
//! protocol-level error (08P01) that reads as a lost connection. Counting the text refuses both
//! before a branch is touched, with the same answer at the coordinator and at the participant.

/// The number of parameters `sql` expects: its highest `$n` placeholder (0 when it has none).
/// Saturates on absurd numbers instead of overflowing; such a count never matches a request.
pub fn expected_params(sql: &str) -> usize {
    let bytes = sql.as_bytes();
    let mut highest = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\'' => {
                // E'...' strings allow backslash escapes; plain ones only doubled quotes.
                let escapes = i > 0 && matches!(bytes[i - 1], b'e' | b'E') && !is_ident(bytes, i - 1);
                i = skip_quoted(bytes, i + 1, b'\'', escapes);
            }
            b'"' => i = skip_quoted(bytes, i + 1, b'"', false),
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                i = bytes[i..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(bytes.len(), |p| i + p + 1);
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => i = skip_block_comment(bytes, i + 2),
            b'$' => {
                let preceded_by_identifier = i > 0 && is_ident_byte(bytes[i - 1]);
                let digits = bytes[i + 1..].iter().take_while(|b| b.is_ascii_digit()).count();
                if digits > 0 && !preceded_by_identifier {
                    let number = sql[i + 1..i + 1 + digits].parse::<usize>().unwrap_or(usize::MAX);
                    highest = highest.max(number);
                    i += 1 + digits;
                } else if !preceded_by_identifier && let Some(end) = dollar_tag_end(bytes, i) {
                    i = skip_dollar_quoted(bytes, i, end);
                } else {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    highest
}

fn is_ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

/// Whether the byte at `at` continues an identifier that began before it (so `e` in `some'` is not
/// an `E'` prefix).
fn is_ident(bytes: &[u8], at: usize) -> bool {
    at > 0 && is_ident_byte(bytes[at - 1])
}

/// Past the closing `quote` (a doubled quote is part of the text).
fn skip_quoted(bytes: &[u8], mut i: usize, quote: u8, escapes: bool) -> usize {
    while i < bytes.len() {
        if escapes && bytes[i] == b'\\' {
            i += 2;
            continue;
        }
        if bytes[i] == quote {
            if bytes.get(i + 1) == Some(&quote) {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i += 1;
    }
    bytes.len()
}

/// Past a `/* */` comment, which nests in PostgreSQL.
fn skip_block_comment(bytes: &[u8], mut i: usize) -> usize {
    let mut depth = 1;
    while i < bytes.len() {
        if bytes[i] == b'/' && bytes.get(i + 1) == Some(&b'*') {
            depth += 1;
            i += 2;
        } else if bytes[i] == b'*' && bytes.get(i + 1) == Some(&b'/') {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            i += 1;
        }
    }
    bytes.len()
}

/// The index just past a dollar-quote opening tag (`$$` or `$tag$`) starting at `start`.
fn dollar_tag_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    if bytes.get(i).is_some_and(u8::is_ascii_digit) {
        return None;
    }
    while i < bytes.len() {
        match bytes[i] {
            b'$' => return Some(i + 1),
            b if b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80 => i += 1,
            _ => return None,
        }
    }
    None
}

/// Past the closing tag of a dollar-quoted body opened by `bytes[start..tag_end]`.
fn skip_dollar_quoted(bytes: &[u8], start: usize, tag_end: usize) -> usize {
    let tag = &bytes[start..tag_end];
    bytes[tag_end..]
        .windows(tag.len())
        .position(|window| window == tag)
        .map_or(bytes.len(), |p| tag_end + p + tag.len())
}

#[cfg(test)]
mod tests {
    use super::expected_params;

    #[test]
    fn counts_the_highest_placeholder() {
        assert_eq!(expected_params("SELECT 1"), 0);
        assert_eq!(expected_params("SELECT $1, $2"), 2);
        assert_eq!(expected_params("SELECT $3"), 3);
        assert_eq!(expected_params("UPDATE t SET a = $2 WHERE id = $1"), 2);
    }

    #[test]
    fn ignores_literals_identifiers_and_comments() {
        assert_eq!(expected_params("SELECT '$1', \"$2\", $1"), 1);
        assert_eq!(expected_params("SELECT E'\\'$4', $1"), 1);
        assert_eq!(expected_params("SELECT 1 -- $5\n, $2"), 2);
        assert_eq!(expected_params("SELECT /* $9 /* $8 */ */ $1"), 1);
        assert_eq!(expected_params("SELECT $$ $7 $$, $tag$ $6 $tag$, $2"), 2);
        assert_eq!(expected_params("DO $$BEGIN RAISE 'x $3'; END$$"), 0);
        assert_eq!(expected_params("SELECT a$1 FROM t"), 0);
        assert_eq!(expected_params("SELECT 'it''s $4', $1"), 1);
    }

    #[test]
    fn unterminated_text_does_not_panic() {
        for sql in ["SELECT '$1", "SELECT \"", "/* $1", "$$ $1", "$", "$a", "E'\\"] {
            let _ = expected_params(sql);
        }
    }
}
