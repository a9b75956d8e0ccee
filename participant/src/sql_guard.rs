//! Refuses SQL that would end or reshape a branch's own transaction, before it reaches PostgreSQL.
//!
//! A branch is one transaction that only the coordinator may end (PREPARE, COMMIT PREPARED, ...).
//! A client's `COMMIT` inside it would make the branch's writes durable before the vote, and a
//! `SAVEPOINT`/`ROLLBACK TO` dance hides work from the protocol, so those are refused here with a
//! message that names the statement. The check is a small lexer, not a parser: it skips whitespace,
//! `--` and nested `/* */` comments, quoted strings (including `E'...'` escapes), quoted identifiers
//! and dollar quotes, splits on `;` outside them, and looks at the leading keywords of every
//! statement. Anything it cannot classify is left for PostgreSQL to accept or reject.
//!
//! A client may turn `standard_conforming_strings` off, after which a backslash escapes in plain
//! `'...'` strings too and a string can end somewhere else. So SQL holding a backslash is read
//! both ways, and either reading's refusal or session change counts.

/// What the guard learned about an accepted SQL string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Analysis {
    /// Non-empty statements in the string (`;;` and comment-only pieces do not count).
    pub statements: usize,
    /// A statement may change session state that would outlive the branch on its pooled
    /// connection: plain `SET` and `RESET`, a `DO` block (it may run any of them, even
    /// `DEALLOCATE`, through `EXECUTE`), SQL-level `PREPARE`, a temporary table (also through
    /// `pg_temp.`), a call of `set_config` whose third argument is not the literal `true` (or
    /// one nested in another's arguments), an `UPDATE` of `pg_settings` (a rule turns it into
    /// `set_config(..., false)`), or a session-level advisory lock. Such a connection is closed
    /// instead of reused. (A function of the client's own that changes a setting inside its body
    /// cannot be seen from here, nor can a name spelt with Unicode escapes, `U&"..."`.)
    pub changes_session: bool,
    /// A single statement that leads with `INSERT`, `UPDATE`, `DELETE` or `MERGE`: when it reports
    /// affected rows, the branch certainly wrote, and the vote can skip asking PostgreSQL whether it
    /// did. A wrong "yes" would only cost a prepare (the marker row makes the branch a writer anyway);
    /// anything else keeps the check.
    pub single_write: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{statement} is not allowed in a Treaty branch{position}: {why}")]
pub struct Refusal {
    /// The refused statement's leading keywords, e.g. `PREPARE TRANSACTION`.
    pub statement: String,
    /// ` (statement 2 of 3)` for multi-statement strings, empty otherwise.
    position: String,
    why: &'static str,
}

const ENDS_BRANCH: &str =
    "the coordinator ends every branch; use the Commit or Rollback call of the Treaty API instead";
const NESTS: &str = "savepoints and nested transactions are not supported inside a branch";
const TRANSACTION_SETTINGS: &str = "transaction settings can only be changed by the branch's first statement; \
     pass them as transaction options (isolation, lock timeout) instead";
const SESSION_DEFAULTS: &str = "it changes defaults for later transactions on a shared pooled connection; \
     pass transaction options (isolation) instead";
const PROTOCOL: &str = "it needs a copy/notification protocol the participant does not speak; \
     use INSERT/SELECT instead";
const STATEMENT_CACHE: &str =
    "it would drop the prepared statements the participant keeps on its connections";

/// Checks every statement of `sql`. `opening` is true when this call opens the branch, the only
/// time `SET TRANSACTION` (as the first statement) is allowed.
pub fn check(sql: &str, opening: bool) -> Result<Analysis, Refusal> {
    let standard = check_reading(sql, opening, Strings::Standard)?;
    if !sql.contains('\\') {
        return Ok(standard);
    }
    let escaping = check_reading(sql, opening, Strings::BackslashEscapes)?;
    Ok(Analysis {
        // What PostgreSQL sees with its default settings. Were the other count the true one, a
        // single statement goes through the extended protocol, where PostgreSQL refuses several.
        statements: standard.statements,
        changes_session: standard.changes_session || escaping.changes_session,
        single_write: standard.single_write && escaping.single_write,
    })
}

/// How plain `'...'` strings treat a backslash.
#[derive(Clone, Copy, PartialEq)]
enum Strings {
    /// `standard_conforming_strings = on`, PostgreSQL's default: a backslash is just a character.
    Standard,
    /// `standard_conforming_strings = off`: a backslash escapes the next character.
    BackslashEscapes,
}

fn check_reading(sql: &str, opening: bool, strings: Strings) -> Result<Analysis, Refusal> {
    let statements = split(sql, strings);
    let count = statements.len();
    let mut changes_session = false;
    for (index, Parsed { words, changes }) in statements.iter().enumerate() {
        changes_session |= changes;
        let word = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
        let refuse = |keywords: usize, why: &'static str| Refusal {
            statement: words[..keywords.min(words.len())].join(" "),
            position: if count > 1 {
                format!(" (statement {} of {count})", index + 1)
            } else {
                String::new()
            },
            why,
        };
        match (word(0), word(1)) {
            ("ROLLBACK", "TO") => return Err(refuse(2, NESTS)),
            ("COMMIT" | "ROLLBACK", "PREPARED") | ("PREPARE", "TRANSACTION") => {
                return Err(refuse(2, ENDS_BRANCH));
            }
            ("COMMIT" | "END" | "ROLLBACK" | "ABORT", _) => return Err(refuse(1, ENDS_BRANCH)),
            ("START", "TRANSACTION") => return Err(refuse(2, NESTS)),
            ("BEGIN" | "SAVEPOINT" | "RELEASE", _) => return Err(refuse(1, NESTS)),
            ("SET", "TRANSACTION") if !(opening && index == 0) => {
                return Err(refuse(2, TRANSACTION_SETTINGS));
            }
            ("SET", "SESSION") if word(2) == "CHARACTERISTICS" => return Err(refuse(3, SESSION_DEFAULTS)),
            ("COPY" | "LISTEN" | "UNLISTEN", _) => return Err(refuse(1, PROTOCOL)),
            ("DEALLOCATE" | "DISCARD", _) => return Err(refuse(1, STATEMENT_CACHE)),
            ("SET", "LOCAL" | "TRANSACTION" | "CONSTRAINTS") => {}
            ("SET" | "RESET" | "DO" | "PREPARE", _) => changes_session = true,
            ("CREATE", "TEMP" | "TEMPORARY") => changes_session = true,
            ("CREATE", "LOCAL" | "GLOBAL") if matches!(word(2), "TEMP" | "TEMPORARY") => {
                changes_session = true
            }
            _ => {}
        }
    }
    let single_write = count == 1
        && statements
            .first()
            .and_then(|statement| statement.words.first())
            .is_some_and(|word| matches!(word.as_str(), "INSERT" | "UPDATE" | "DELETE" | "MERGE"));
    Ok(Analysis {
        statements: count,
        changes_session,
        single_write,
    })
}

/// How many leading keywords of a statement the rules look at.
const LEADING_WORDS: usize = 3;

/// What the rules need from one non-empty statement.
struct Parsed {
    /// Its leading keywords, upper-cased.
    words: Vec<String>,
    /// Something past its leading keywords changes session state (`set_config` with a
    /// session-wide effect, or one this lexer cannot rule out; `pg_settings`; advisory locks).
    changes: bool,
}

/// Every non-empty statement of `sql`.
fn split(sql: &str, strings: Strings) -> Vec<Parsed> {
    let mut statements = Vec::new();
    let mut current = Statement::default();
    for token in Lexer::new(sql, strings) {
        match token {
            Token::Semicolon if current.atomic_depth == 0 => {
                if let Some(words) = current.finish() {
                    statements.push(words);
                }
                current = Statement::default();
            }
            Token::Semicolon | Token::Other => current.other(None),
            Token::Punctuation(byte) => current.other(Some(byte)),
            Token::Word(word) => current.word(word),
            Token::QuotedName(name) => current.quoted_name(name),
        }
    }
    if let Some(words) = current.finish() {
        statements.push(words);
    }
    statements
}

/// One statement being read: its leading words, and whether it is inside a `BEGIN ATOMIC ... END`
/// body of `CREATE FUNCTION/PROCEDURE`, where `;` does not end the statement.
#[derive(Default)]
struct Statement {
    words: Vec<String>,
    leading: bool,
    tokens: usize,
    previous: Option<String>,
    atomic_depth: usize,
    set_config: SetConfig,
    changes: bool,
    mentions_pg_settings: bool,
    mentions_update: bool,
}

/// Where the statement is in a `set_config(name, value, is_local)` call. Only `is_local` written
/// as the literal `true` keeps the setting inside the branch's transaction (the usual row-level
/// security idiom); `false`, a parameter or an expression may change it for the whole session.
#[derive(Default, Clone, Copy, PartialEq)]
enum SetConfig {
    #[default]
    Outside,
    /// Just read the word `set_config`: a call if `(` follows.
    Named,
    /// Inside the call's parentheses.
    Arguments {
        depth: usize,
        commas: usize,
        third: ThirdArgument,
    },
}

#[derive(Clone, Copy, PartialEq)]
enum ThirdArgument {
    NotYet,
    LiteralTrue,
    Anything,
}

impl Statement {
    fn word(&mut self, word: &str) {
        let upper = word.to_ascii_uppercase();
        match upper.as_str() {
            // Session-level advisory locks outlive the branch (the `_xact_` ones do not);
            // `pg_temp.` names the session's temporary schema.
            "PG_ADVISORY_LOCK"
            | "PG_ADVISORY_LOCK_SHARED"
            | "PG_TRY_ADVISORY_LOCK"
            | "PG_TRY_ADVISORY_LOCK_SHARED"
            | "PG_TEMP" => self.changes = true,
            "PG_SETTINGS" => self.mentions_pg_settings = true,
            "UPDATE" => self.mentions_update = true,
            _ => {}
        }
        if upper == "SET_CONFIG" {
            self.set_config_named();
        } else {
            self.set_config = match self.set_config {
                SetConfig::Arguments {
                    depth,
                    commas: 2,
                    third,
                } => SetConfig::Arguments {
                    depth,
                    commas: 2,
                    third: if depth == 1 && third == ThirdArgument::NotYet && upper == "TRUE" {
                        ThirdArgument::LiteralTrue
                    } else {
                        ThirdArgument::Anything
                    },
                },
                arguments @ SetConfig::Arguments { .. } => arguments,
                SetConfig::Outside | SetConfig::Named => SetConfig::Outside,
            };
        }
        if self.tokens == 0 {
            self.leading = true;
        }
        self.tokens += 1;
        if self.leading && self.words.len() < LEADING_WORDS {
            self.words.push(upper.clone());
        }
        if self.words.first().is_some_and(|w| w == "CREATE") {
            match upper.as_str() {
                "ATOMIC" if self.previous.as_deref() == Some("BEGIN") => self.atomic_depth += 1,
                "CASE" if self.atomic_depth > 0 => self.atomic_depth += 1,
                "END" if self.atomic_depth > 0 => self.atomic_depth -= 1,
                _ => {}
            }
        }
        self.previous = Some(upper);
    }

    /// The name `set_config`, as a word or a quoted identifier.
    fn set_config_named(&mut self) {
        match &mut self.set_config {
            // A call inside another's arguments: not followed further, so taken as session-wide.
            SetConfig::Arguments { commas, third, .. } => {
                self.changes = true;
                if *commas == 2 {
                    *third = ThirdArgument::Anything;
                }
            }
            state => *state = SetConfig::Named,
        }
    }

    /// A quoted identifier: never a keyword, but `"set_config"` still names the function.
    fn quoted_name(&mut self, name: &str) {
        self.other(None);
        if name == "set_config" {
            self.set_config_named();
        }
    }

    /// A token that is not a word; `punctuation` is its byte when it is a single one.
    fn other(&mut self, punctuation: Option<u8>) {
        self.tokens += 1;
        self.leading = false;
        self.previous = None;
        self.set_config = match (self.set_config, punctuation) {
            (SetConfig::Named, Some(b'(')) => SetConfig::Arguments {
                depth: 1,
                commas: 0,
                third: ThirdArgument::NotYet,
            },
            (
                SetConfig::Arguments {
                    depth: 1,
                    commas,
                    third,
                },
                Some(b')'),
            ) => {
                self.changes |= !(commas == 2 && third == ThirdArgument::LiteralTrue);
                SetConfig::Outside
            }
            (SetConfig::Arguments { depth, commas, third }, _) => SetConfig::Arguments {
                depth: match punctuation {
                    Some(b'(') => depth + 1,
                    Some(b')') => depth - 1,
                    _ => depth,
                },
                commas: commas + usize::from(depth == 1 && punctuation == Some(b',')),
                // Anything but a lone `true` in the third place may be `false` at run time.
                third: if commas == 2 {
                    ThirdArgument::Anything
                } else {
                    third
                },
            },
            (SetConfig::Outside | SetConfig::Named, _) => SetConfig::Outside,
        };
    }

    fn finish(self) -> Option<Parsed> {
        // A call the statement never closed is not known to be local.
        let unfinished = matches!(self.set_config, SetConfig::Arguments { .. });
        let settings_rule = self.mentions_pg_settings && self.mentions_update;
        (self.tokens > 0).then_some(Parsed {
            words: self.words,
            changes: self.changes || unfinished || settings_rule,
        })
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Token<'a> {
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
struct Lexer<'a> {
    text: &'a str,
    bytes: &'a [u8],
    position: usize,
    strings: Strings,
}

fn is_word_start(byte: u8) -> bool {
    byte.is_ascii_alphabetic() || byte == b'_' || byte >= 0x80
}

fn is_word_continue(byte: u8) -> bool {
    is_word_start(byte) || byte.is_ascii_digit() || byte == b'$'
}

impl<'a> Lexer<'a> {
    fn new(text: &'a str, strings: Strings) -> Self {
        Self {
            text,
            bytes: text.as_bytes(),
            position: 0,
            strings,
        }
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
                b if b.is_ascii_whitespace() => self.position += 1,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(sql: &str) -> String {
        match check(sql, false) {
            Err(refusal) => refusal.statement,
            Ok(analysis) => panic!("{sql:?} was accepted: {analysis:?}"),
        }
    }

    fn accepted(sql: &str) -> Analysis {
        check(sql, false).unwrap_or_else(|e| panic!("{sql:?} was refused: {e}"))
    }

    /// Every one of `cases` is accepted, and reported as changing the session or not.
    fn assert_changes_session(changes: bool, cases: &[&str]) {
        for sql in cases {
            assert_eq!(accepted(sql).changes_session, changes, "{sql}");
        }
    }

    #[test]
    fn refuses_statements_that_end_the_branch() {
        assert_eq!(refused("COMMIT"), "COMMIT");
        assert_eq!(refused("commit;"), "COMMIT");
        assert_eq!(refused("  End"), "END");
        assert_eq!(refused("ROLLBACK"), "ROLLBACK");
        assert_eq!(refused("abort work"), "ABORT");
        assert_eq!(refused("PREPARE TRANSACTION 'x'"), "PREPARE TRANSACTION");
        assert_eq!(refused("COMMIT PREPARED 'treaty:c:1'"), "COMMIT PREPARED");
        assert_eq!(refused("ROLLBACK PREPARED 'treaty:c:1'"), "ROLLBACK PREPARED");
        assert_eq!(refused("COMMIT AND CHAIN"), "COMMIT");
    }

    #[test]
    fn single_writes_are_recognised() {
        assert!(accepted("UPDATE t SET a = 1").single_write);
        assert!(accepted("/* c */ insert into t values (1);").single_write);
        assert!(accepted("DELETE FROM t").single_write);
        assert!(!accepted("SELECT * FROM t").single_write);
        assert!(!accepted("WITH x AS (DELETE FROM t RETURNING 1) SELECT 1").single_write);
        assert!(!accepted("UPDATE t SET a = 1; UPDATE t SET a = 2").single_write);
    }

    #[test]
    fn refuses_nested_transactions_and_savepoints() {
        assert_eq!(refused("BEGIN"), "BEGIN");
        assert_eq!(refused("begin isolation level serializable"), "BEGIN");
        assert_eq!(refused("START TRANSACTION"), "START TRANSACTION");
        assert_eq!(refused("SAVEPOINT a"), "SAVEPOINT");
        assert_eq!(refused("RELEASE SAVEPOINT a"), "RELEASE");
        assert_eq!(refused("ROLLBACK TO SAVEPOINT a"), "ROLLBACK TO");
    }

    #[test]
    fn transaction_settings_only_as_the_first_statement_of_the_branch() {
        let sql = "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE";
        assert!(check(sql, true).is_ok());
        assert_eq!(refused(sql), "SET TRANSACTION");
        let err = check("SELECT 1; SET TRANSACTION READ ONLY", true).unwrap_err();
        assert_eq!(err.statement, "SET TRANSACTION");
        assert!(err.to_string().contains("statement 2 of 2"), "{err}");
        assert!(check("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", true).is_err());
    }

    #[test]
    fn refused_message_names_the_statement_and_says_what_to_do() {
        let err = check("commit", false).unwrap_err().to_string();
        assert!(
            err.starts_with("COMMIT is not allowed in a Treaty branch"),
            "{err}"
        );
        assert!(err.contains("Commit or Rollback call"), "{err}");
    }

    #[test]
    fn ordinary_statements_pass() {
        for sql in [
            "SELECT 1",
            "INSERT INTO kv VALUES ($1, $2)",
            "UPDATE t SET committed = true WHERE id = 1",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "select * from \"COMMIT\"",
            "(SELECT 1)",
            "PREPARE q AS SELECT 1",
            "SET LOCAL lock_timeout = 100",
            "SET CONSTRAINTS ALL DEFERRED",
            "LOCK TABLE t IN SHARE MODE",
            "DO $$ BEGIN PERFORM 1; END $$",
            "SELECT $1::int, $2",
            "end_date_column_is_not_end",
        ] {
            assert_eq!(accepted(sql).statements, 1, "{sql}");
        }
    }

    #[test]
    fn keywords_inside_strings_comments_and_quotes_are_ignored() {
        for sql in [
            "SELECT 'a;COMMIT'",
            "SELECT 'it''s; COMMIT'",
            "SELECT E'it\\'s; COMMIT'",
            "SELECT \"a;\"\"COMMIT\" FROM t",
            "SELECT 1 -- ; COMMIT\n",
            "SELECT /* ; COMMIT /* nested ; */ still ; */ 1",
            "SELECT $$ ; COMMIT $$",
            "SELECT $tag$ ; $$ ; COMMIT $tag$",
            "SELECT $a$x$b$ ; COMMIT $b$y$a$",
            "SELECT U&'d\\0061t; COMMIT'",
        ] {
            assert_eq!(accepted(sql).statements, 1, "{sql}");
        }
    }

    #[test]
    fn leading_comments_are_skipped() {
        assert_eq!(refused("-- hello\n  /* c */ COMMIT"), "COMMIT");
        assert_eq!(refused("/* a /* nested */ b */commit"), "COMMIT");
        assert_eq!(refused("ROLLBACK/**/PREPARED 'x'"), "ROLLBACK PREPARED");
    }

    #[test]
    fn every_statement_of_a_batch_is_checked() {
        assert_eq!(refused("INSERT INTO t VALUES (1); COMMIT"), "COMMIT");
        assert_eq!(refused("SELECT ';'; SELECT $$;$$;\nBEGIN"), "BEGIN");
        assert_eq!(accepted("SELECT 1; SELECT 2;").statements, 2);
        assert_eq!(accepted(";; SELECT 1 ;; -- done").statements, 1);
        assert_eq!(accepted("/* only */ -- comments\n").statements, 0);
    }

    #[test]
    fn dollar_signs_that_are_not_quotes() {
        // `$1` is a parameter, and `a$b$` is one identifier: neither opens a dollar quote.
        assert_eq!(refused("SELECT $1; COMMIT"), "COMMIT");
        assert_eq!(refused("SELECT a$b$ FROM t; COMMIT"), "COMMIT");
        // An unterminated dollar quote swallows the rest; PostgreSQL reports the syntax error.
        assert_eq!(accepted("SELECT $x$ ; COMMIT").statements, 1);
    }

    #[test]
    fn atomic_function_bodies_are_one_statement() {
        let sql = "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC \
                   SELECT CASE WHEN true THEN 1 END; SELECT 2; END; SELECT 3";
        assert_eq!(accepted(sql).statements, 2);
        assert_eq!(refused(&format!("{sql}; COMMIT")), "COMMIT");
    }

    #[test]
    fn session_changes_are_reported() {
        assert!(accepted("SET search_path = a").changes_session);
        assert!(accepted("set session timezone = 'UTC'").changes_session);
        assert!(accepted("RESET ALL").changes_session);
        assert!(!accepted("SET LOCAL search_path = a").changes_session);
        assert!(!accepted("SELECT 'SET x = 1'").changes_session);
        assert!(accepted("DO $$ BEGIN EXECUTE 'DEALLOCATE ALL'; END $$").changes_session);
        assert!(accepted("PREPARE q (int) AS SELECT $1").changes_session);
        assert!(accepted("CREATE TEMP TABLE t (k int)").changes_session);
        assert!(accepted("create local temporary table t (k int)").changes_session);
        assert!(!accepted("CREATE TABLE t (k int)").changes_session);
    }

    #[test]
    fn set_config_changes_the_session_unless_it_is_literally_local() {
        assert_changes_session(
            true,
            &[
                "SELECT set_config('app.user', 'alice', false)",
                "SELECT pg_catalog.SET_CONFIG('app.user', 'alice', FALSE)",
                "SELECT set_config('app.user', $1, $2)",
                "SELECT set_config('app.user', 'alice', (true))",
                "SELECT set_config('app.user', 'alice', true OR x)",
                "SELECT set_config('app.user', 'alice')",
                "SELECT 1; SELECT set_config('app.user', lower('A'), false) FROM t",
                "SELECT set_config('app.user', 'alice', true), set_config('b', '1', false)",
                "SELECT set_config('app.user', 'alice', true",
            ],
        );
        assert_changes_session(
            false,
            &[
                "SELECT set_config('app.user', 'alice', true)",
                "select set_config('app.user', concat('a', 'b,c', f(1, 2)), TRUE) from t",
                "SELECT set_config('app.user', $1, true); UPDATE t SET v = 1",
                "SELECT 'set_config(1, 2, false)', \"set_config\" FROM t",
                "SELECT set_config_value FROM t",
                "UPDATE t SET set_config = 1.5e3",
                "SELECT set_config('app.user', $1::text, true)",
            ],
        );
    }

    #[test]
    fn session_state_changed_past_the_leading_keywords_is_reported() {
        assert_changes_session(
            true,
            &[
                "SELECT set_config('app.x', set_config('search_path', 'evil', false), true)",
                "SELECT \"set_config\"('search_path', 'x', false)",
                "SELECT pg_catalog.\"set_config\"('search_path', 'x', false)",
                "UPDATE pg_settings SET setting = 'nowhere' WHERE name = 'search_path'",
                "WITH s AS (UPDATE pg_catalog.pg_settings SET setting = 'x' RETURNING 1) SELECT 1",
                "SELECT pg_advisory_lock(1)",
                "SELECT pg_try_advisory_lock_shared(1, 2)",
                "CREATE TABLE pg_temp.t (k int)",
            ],
        );
        assert_changes_session(
            false,
            &[
                "SELECT \"SET_CONFIG\"('search_path', 'x', false)",
                "SELECT name, setting FROM pg_settings",
                "SELECT pg_advisory_xact_lock(1)",
                "CREATE TABLE pg_temp_schema.t (k int)",
            ],
        );
    }

    #[test]
    fn strings_are_read_both_ways_when_they_hold_a_backslash() {
        // With standard_conforming_strings off, '\'' is a string holding a quote, and what
        // follows is SQL again.
        assert!(accepted("SELECT '\\'', set_config($1, $2, false), '\\''").changes_session);
        assert_eq!(refused("SELECT 1; SELECT '\\''; COMMIT; SELECT '\\''"), "COMMIT");
        // Both readings agree on an ordinary path.
        let path = accepted("SELECT 'C:\\temp' FROM t");
        assert_eq!(path.statements, 1);
        assert!(!path.changes_session);
    }

    #[test]
    fn a_letter_after_a_number_starts_a_word() {
        // PostgreSQL 14 reads `2END` as `2 END`, which closes the atomic body.
        let sql = "SELECT 1; CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC \
                   SELECT CASE WHEN true THEN 1 ELSE 2END; END; COMMIT; SELECT 1";
        assert_eq!(refused(sql), "COMMIT");
    }

    #[test]
    fn protocol_and_cache_breakers_are_refused() {
        assert_eq!(refused("COPY t FROM STDIN"), "COPY");
        assert_eq!(refused("LISTEN chan"), "LISTEN");
        assert_eq!(refused("DEALLOCATE ALL"), "DEALLOCATE");
        assert_eq!(refused("DISCARD ALL"), "DISCARD");
    }

    #[test]
    fn non_ascii_text_is_handled() {
        assert_eq!(accepted("SELECT 'héllo; wörld', ünïcode FROM t").statements, 1);
        assert_eq!(refused("SELECT 'é'; COMMIT"), "COMMIT");
    }
}
