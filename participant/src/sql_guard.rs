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
//!
//! Modules: `lexer` (the tokens), `tests`, `proptests` (property tests: disguised statements,
//! arbitrary strings).

mod lexer;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

use lexer::{Lexer, Token};

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
    /// instead of reused, whether the statement succeeded or not. (A function of the client's own
    /// that changes a setting inside its body cannot be seen from here, nor can a name spelt with
    /// Unicode escapes, `U&"..."`: the check after every branch, `pool::session`, is what finds
    /// those.)
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

/// The texts of `sql`'s non-empty statements, in order, as PostgreSQL splits them with its
/// default `standard_conforming_strings = on` (which the participant's sessions start with): a
/// multi-statement string runs as one statement per extended-protocol request, pipelined
/// (`statement::run`), so that every result keeps its column types.
pub fn statement_texts(sql: &str) -> Vec<&str> {
    let mut texts = Vec::new();
    let mut current = Statement::default();
    let mut start = 0;
    let mut lexer = Lexer::new(sql, Strings::Standard);
    while let Some(token) = lexer.next() {
        match token {
            Token::Semicolon if current.atomic_depth == 0 => {
                let end = lexer.offset().saturating_sub(1);
                if current.finish().is_some() {
                    texts.push(&sql[start..end]);
                }
                current = Statement::default();
                start = lexer.offset();
            }
            Token::Semicolon | Token::Other => current.other(None),
            Token::Punctuation(byte) => current.other(Some(byte)),
            Token::Word(word) => current.word(word),
            Token::QuotedName(name) => current.quoted_name(name),
        }
    }
    if current.finish().is_some() {
        texts.push(&sql[start..]);
    }
    texts
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
