//! The lexer under the SQL guard: splits SQL into the tokens the rules look at (words, quoted
//! names, `;`, punctuation), skipping whitespace, `--` and nested `/* */` comments, quoted strings
//! (read with or without backslash escapes, see `Strings`) and dollar quotes.

use super::Strings;

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Token<'a> {
    Word(&'a str),
    Semicolon,
    /// One byte of punctuation, an operator or a digit, e.g. `(`, `,`, `=`.
    Punctuation(u8),
    /// A quoted identifier's text between its quotes (doubled quotes left as they are).
    QuotedName(&'a str),
    /// Anything else: strings, parameters.
    Other,
}

/// Byte-level lexer: every delimiter it cares about is ASCII, so multi-byte UTF-8 sequences only
/// ever appear inside words, strings or comments.
pub(super) struct Lexer<'a> {
    text: &'a str,
    bytes: &'a [u8],
    position: usize,
    strings: Strings,
}

/// PostgreSQL's whitespace: its lexer's `[ \t\n\r\f\v]`. `u8::is_ascii_whitespace` leaves out the
/// vertical tab, and a `\v` read as punctuation would hide the keyword after it (`\vCOMMIT`).
fn is_whitespace(byte: u8) -> bool {
    byte.is_ascii_whitespace() || byte == 0x0b
}

fn is_word_start(byte: u8) -> bool {
    byte.is_ascii_alphabetic() || byte == b'_' || byte >= 0x80
}

fn is_word_continue(byte: u8) -> bool {
    is_word_start(byte) || byte.is_ascii_digit() || byte == b'$'
}

impl<'a> Lexer<'a> {
    pub(super) fn new(text: &'a str, strings: Strings) -> Self {
        Self {
            text,
            bytes: text.as_bytes(),
            position: 0,
            strings,
        }
    }

    /// How far into the text the lexer has read: just past the last token returned.
    pub(super) fn offset(&self) -> usize {
        self.position
    }

    fn peek(&self, offset: usize) -> Option<u8> {
        self.bytes.get(self.position + offset).copied()
    }

    fn starts_with(&self, prefix: &[u8]) -> bool {
        self.bytes[self.position..].starts_with(prefix)
    }

    fn skip_line_comment(&mut self) {
        while let Some(byte) = self.peek(0) {
            self.position += 1;
            if byte == b'\n' {
                break;
            }
        }
    }

    /// PostgreSQL block comments nest.
    fn skip_block_comment(&mut self) {
        self.position += 2;
        let mut depth = 1;
        while depth > 0 && self.position < self.bytes.len() {
            if self.starts_with(b"/*") {
                depth += 1;
                self.position += 2;
            } else if self.starts_with(b"*/") {
                depth -= 1;
                self.position += 2;
            } else {
                self.position += 1;
            }
        }
    }

    /// A quoted string or identifier; a doubled quote is an escaped quote. With `backslash`, a
    /// backslash escapes the next byte (`E'...'` strings).
    fn skip_quoted(&mut self, quote: u8, backslash: bool) {
        self.position += 1;
        while let Some(byte) = self.peek(0) {
            self.position += 1;
            if backslash && byte == b'\\' {
                self.position = (self.position + 1).min(self.bytes.len());
            } else if byte == quote {
                if self.peek(0) == Some(quote) {
                    self.position += 1;
                } else {
                    return;
                }
            }
        }
    }

    /// At a `$`: a dollar-quoted string if a valid tag follows, else a lone `$` (e.g. `$1`).
    fn skip_dollar(&mut self) {
        let rest = &self.bytes[self.position + 1..];
        let tag_length = rest
            .iter()
            .take_while(|&&b| is_word_continue(b) && b != b'$')
            .count();
        let valid_tag = rest.get(tag_length) == Some(&b'$')
            && (tag_length == 0 || rest.first().is_some_and(|&b| is_word_start(b)));
        if !valid_tag {
            self.position += 1;
            return;
        }
        let delimiter = &self.bytes[self.position..self.position + tag_length + 2];
        let body_start = self.position + delimiter.len();
        match self.bytes[body_start..]
            .windows(delimiter.len())
            .position(|window| window == delimiter)
        {
            Some(end) => self.position = body_start + end + delimiter.len(),
            None => self.position = self.bytes.len(),
        }
    }
}

impl<'a> Iterator for Lexer<'a> {
    type Item = Token<'a>;

    fn next(&mut self) -> Option<Token<'a>> {
        loop {
            let byte = self.peek(0)?;
            match byte {
                b if is_whitespace(b) => self.position += 1,
                b'-' if self.peek(1) == Some(b'-') => self.skip_line_comment(),
                b'/' if self.peek(1) == Some(b'*') => self.skip_block_comment(),
                b';' => {
                    self.position += 1;
                    return Some(Token::Semicolon);
                }
                b'\'' => {
                    self.skip_quoted(b'\'', self.strings == Strings::BackslashEscapes);
                    return Some(Token::Other);
                }
                b'"' => {
                    let start = self.position + 1;
                    self.skip_quoted(b'"', false);
                    let end = self.position.saturating_sub(1).max(start);
                    return Some(Token::QuotedName(self.text.get(start..end).unwrap_or_default()));
                }
                b'$' => {
                    self.skip_dollar();
                    return Some(Token::Other);
                }
                b if is_word_start(b) => {
                    let start = self.position;
                    while self.peek(0).is_some_and(is_word_continue) {
                        self.position += 1;
                    }
                    let word = self.text.get(start..self.position).unwrap_or_default();
                    // E'...' is one token: a string in which backslash escapes.
                    if word.eq_ignore_ascii_case("e") && self.peek(0) == Some(b'\'') {
                        self.skip_quoted(b'\'', true);
                        return Some(Token::Other);
                    }
                    return Some(Token::Word(word));
                }
                other => {
                    self.position += 1;
                    return Some(Token::Punctuation(other));
                }
            }
        }
    }
}
