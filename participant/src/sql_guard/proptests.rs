//! Property tests of the guard (issue 17, fuzzed inputs): no disguise makes it accept a statement
//! list holding a statement that ends or reshapes the branch's transaction, none makes it miss a
//! statement that changes the session, the same words inside strings, dollar quotes, comments and
//! quoted identifiers stay allowed, and no string at all makes it panic.
//!
//! The disguises are what PostgreSQL's own lexer reads past: any case mix, its whitespace (space,
//! tab, newline, carriage return, form feed, vertical tab), `--` and nested `/* */` comments
//! between any two tokens, and `;` with empty statements in any position. Unicode spaces appear
//! only inside comments and literals: PostgreSQL reads a non-ASCII byte as part of an identifier,
//! so `\u{a0}COMMIT` is an unknown word to it, not a `COMMIT`.
//!
//! Each property runs `PROPTEST_CASES` cases (default below, what CI runs); set it higher for a
//! longer search, e.g. `PROPTEST_CASES=100000 cargo test -p treaty-participant --lib sql_guard`.

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

use super::check;

/// Cases per property in `cargo test` (CI).
const DEFAULT_CASES: u32 = 1000;

/// `PROPTEST_CASES` when set (more on demand), else the default; printed so CI logs show it.
fn config(property: &str) -> ProptestConfig {
    ProptestConfig {
        cases: treaty_types::testing::property_cases(property, DEFAULT_CASES),
        // A failure is minimized and printed; its counterexample becomes a plain unit test.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Statements the guard must refuse wherever they stand in a string (except `SET TRANSACTION`
/// as an opening branch's first statement, checked apart). Tokens: keywords are case-mixed,
/// anything starting with a quote is kept as written.
const REFUSED: &[&[&str]] = &[
    &["COMMIT"],
    &["COMMIT", "WORK"],
    &["COMMIT", "AND", "CHAIN"],
    &["END"],
    &["END", "TRANSACTION"],
    &["ROLLBACK"],
    &["ROLLBACK", "WORK", "AND", "NO", "CHAIN"],
    &["ABORT"],
    &["PREPARE", "TRANSACTION", "'treaty:c1:7@s0'"],
    &["COMMIT", "PREPARED", "'treaty:c1:7@s0'"],
    &["ROLLBACK", "PREPARED", "'treaty:c1:7@s0'"],
    &["SAVEPOINT", "s1"],
    &["RELEASE", "SAVEPOINT", "s1"],
    &["RELEASE", "s1"],
    &["ROLLBACK", "TO", "SAVEPOINT", "s1"],
    &["ROLLBACK", "TO", "s1"],
    &["BEGIN"],
    &["BEGIN", "ISOLATION", "LEVEL", "SERIALIZABLE"],
    &["START", "TRANSACTION"],
    &["START", "TRANSACTION", "READ", "ONLY"],
    &[
        "SET",
        "SESSION",
        "CHARACTERISTICS",
        "AS",
        "TRANSACTION",
        "READ",
        "ONLY",
    ],
    &["COPY", "t", "FROM", "STDIN"],
    &["LISTEN", "channel"],
    &["UNLISTEN", "*"],
    &["DEALLOCATE", "ALL"],
    &["DISCARD", "ALL"],
];

const SET_TRANSACTION: &[&str] = &["SET", "TRANSACTION", "ISOLATION", "LEVEL", "SERIALIZABLE"];

/// Statements the guard may accept only if it reports that they change the session (the
/// connection is then closed instead of reused).
const CHANGE_SESSION: &[&[&str]] = &[
    &["SET", "search_path", "=", "evil"],
    &["SET", "SESSION", "AUTHORIZATION", "'mallory'"],
    &["SET", "SESSION", "search_path", "TO", "evil"],
    &["SET", "ROLE", "mallory"],
    &["RESET", "ALL"],
    &["RESET", "ROLE"],
    &["DO", "$$BEGIN PERFORM 1; END$$"],
    &["PREPARE", "q", "AS", "SELECT", "1"],
    &["CREATE", "TEMP", "TABLE", "t", "(", "k", "int", ")"],
    &[
        "CREATE",
        "GLOBAL",
        "TEMPORARY",
        "TABLE",
        "t",
        "(",
        "k",
        "int",
        ")",
    ],
    &["CREATE", "TABLE", "pg_temp", ".", "t", "(", "k", "int", ")"],
    &[
        "SELECT",
        "set_config",
        "(",
        "'role'",
        ",",
        "'mallory'",
        ",",
        "false",
        ")",
    ],
    &[
        "SELECT",
        "pg_catalog",
        ".",
        "set_config",
        "(",
        "'role'",
        ",",
        "'x'",
        ",",
        "$1",
        ")",
    ],
    &[
        "SELECT",
        "\"set_config\"",
        "(",
        "'role'",
        ",",
        "'x'",
        ",",
        "false",
        ")",
    ],
    &["SELECT", "pg_advisory_lock", "(", "42", ")"],
    &["SELECT", "pg_try_advisory_lock_shared", "(", "1", ",", "2", ")"],
    &[
        "UPDATE",
        "pg_settings",
        "SET",
        "setting",
        "=",
        "'x'",
        "WHERE",
        "name",
        "=",
        "'role'",
    ],
];

/// PostgreSQL's whitespace (its lexer's `[ \t\n\r\f\v]`).
const WHITESPACE: &[char] = &[' ', '\t', '\n', '\r', '\u{c}', '\u{b}'];

/// Text that may sit in a comment or a literal: forbidden words, statement ends, Unicode spaces,
/// quotes of the other kinds. No `*`, `/`, `\`, `$` or newline, so it never ends the comment or
/// literal it is put in (each wrapper escapes its own quote).
fn inner_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        "[a-zA-Z0-9 ,.()=-]{0,6}",
        Just(";".to_owned()),
        Just("'".to_owned()),
        Just("\"".to_owned()),
        Just("\u{a0}".to_owned()),
        Just("\u{2003}".to_owned()),
        Just("\u{3000}".to_owned()),
        Just("é".to_owned()),
        // `UNLISTEN *` would bring a `*`, which could close a comment.
        refused_statement_plain().prop_map(|sql| sql.replace('*', "x")),
    ];
    prop::collection::vec(piece, 0..5).prop_map(|pieces| pieces.concat())
}

/// A refused statement written plainly (random case, single spaces), for use inside literals.
fn refused_statement_plain() -> impl Strategy<Value = String> {
    (prop::sample::select(REFUSED), any::<u64>()).prop_map(|(tokens, mask)| {
        tokens
            .iter()
            .enumerate()
            .map(|(i, token)| case_mixed(token, mask.rotate_left(i as u32 * 7)))
            .collect::<Vec<_>>()
            .join(" ")
    })
}

/// Upper- or lower-cases each ASCII letter of a keyword or name by the bits of `mask`.
fn case_mixed(token: &str, mask: u64) -> String {
    if token.starts_with(['\'', '"', '$']) {
        return token.to_owned();
    }
    token
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if mask >> (i % 64) & 1 == 1 {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect()
}

/// A block comment, possibly holding nested ones.
fn block_comment() -> impl Strategy<Value = String> {
    let leaf = inner_text().prop_map(|text| format!("/*{text}*/"));
    leaf.prop_recursive(3, 8, 3, |inner| {
        (inner_text(), prop::collection::vec(inner, 1..3), inner_text())
            .prop_map(|(before, nested, after)| format!("/*{before}{}{after}*/", nested.concat()))
    })
}

/// One piece of what PostgreSQL skips between tokens.
fn skipped() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::collection::vec(prop::sample::select(WHITESPACE), 1..3)
            .prop_map(|spaces| spaces.into_iter().collect::<String>()),
        1 => inner_text().prop_map(|text| format!("--{text}\n")),
        1 => block_comment(),
    ]
}

/// At least one piece of skipped text: what must separate two tokens.
fn separator() -> impl Strategy<Value = String> {
    prop::collection::vec(skipped(), 1..3).prop_map(|pieces| pieces.concat())
}

/// Any amount of skipped text, none included.
fn gap() -> impl Strategy<Value = String> {
    prop::collection::vec(skipped(), 0..3).prop_map(|pieces| pieces.concat())
}

/// `tokens` case-mixed, with comments and whitespace between them and around them.
fn disguised(tokens: &'static [&'static str]) -> impl Strategy<Value = String> {
    (
        gap(),
        prop::collection::vec((any::<u64>(), separator()), tokens.len()),
        gap(),
    )
        .prop_map(move |(leading, parts, trailing)| {
            let mut sql = leading;
            for (i, (token, (mask, separator))) in tokens.iter().zip(parts).enumerate() {
                if i > 0 {
                    sql.push_str(&separator);
                }
                sql.push_str(&case_mixed(token, mask));
            }
            sql.push_str(&trailing);
            sql
        })
}

fn refused_statement() -> impl Strategy<Value = String> {
    prop::sample::select(REFUSED).prop_flat_map(disguised)
}

fn session_statement() -> impl Strategy<Value = String> {
    prop::sample::select(CHANGE_SESSION).prop_flat_map(disguised)
}

/// A string literal of any kind holding `inner_text`, escaped as its kind needs.
fn literal() -> impl Strategy<Value = String> {
    prop_oneof![
        inner_text().prop_map(|text| format!("'{}'", text.replace('\'', "''"))),
        inner_text().prop_map(|text| format!("E'{}'", text.replace('\'', "\\'"))),
        inner_text().prop_map(|text| format!("e'\\\\{}'", text.replace('\'', "''"))),
        inner_text().prop_map(|text| format!("$${text}$$")),
        inner_text().prop_map(|text| format!("$tag$ {text} $tag$")),
    ]
}

/// A quoted identifier holding `inner_text`.
fn identifier() -> impl Strategy<Value = String> {
    inner_text().prop_map(|text| format!("\"{}\"", text.replace('"', "\"\"")))
}

/// A harmless statement that holds forbidden words only where they are not SQL: in strings
/// (plain, `E''` with backslash escapes, dollar-quoted), quoted identifiers and comments.
fn harmless_statement() -> impl Strategy<Value = String> {
    prop_oneof![
        literal().prop_map(|value| format!("SELECT {value}")),
        (literal(), gap()).prop_map(|(value, gap)| format!("{gap}UPDATE t SET note = {value}")),
        (literal(), identifier()).prop_map(|(value, name)| format!("INSERT INTO {name} VALUES ({value})")),
        identifier().prop_map(|name| format!("SELECT 1 AS {name}")),
        (gap(), inner_text()).prop_map(|(gap, text)| format!("SELECT 1{gap} --{text}\n")),
        (block_comment(), gap()).prop_map(|(comment, gap)| format!("{comment}{gap}SELECT 2")),
        Just("SELECT set_config('app.user', 'alice', true)".to_owned()),
        Just("SELECT pg_advisory_xact_lock(1)".to_owned()),
        Just("SET LOCAL search_path = a".to_owned()),
    ]
}

/// Joins statements with `;`, extra empty statements and skipped text in any position.
fn statement_list(statements: Vec<String>) -> impl Strategy<Value = String> {
    let count = statements.len();
    (
        prop::collection::vec((gap(), 1..3usize, gap()), count + 1),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(move |(joints, leading_semicolon, trailing_semicolon)| {
            let mut sql = String::new();
            for (i, (before, semicolons, after)) in joints.into_iter().enumerate() {
                let at_edge = i == 0 || i == count;
                let write_semicolons =
                    !at_edge || (i == 0 && leading_semicolon) || (i == count && trailing_semicolon);
                sql.push_str(&before);
                if write_semicolons {
                    sql.push_str(&";".repeat(semicolons));
                }
                sql.push_str(&after);
                if let Some(statement) = statements.get(i) {
                    sql.push_str(statement);
                }
            }
            sql
        })
}

/// Harmless statements with `special` inserted at a random place, joined into one string.
fn list_with(special: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
    (
        prop::collection::vec(harmless_statement(), 0..4),
        special,
        any::<prop::sample::Index>(),
    )
        .prop_flat_map(|(mut statements, special, at)| {
            let at = at.index(statements.len() + 1);
            statements.insert(at, special);
            statement_list(statements)
        })
}

/// SQL-looking soup: the characters and pairs the lexer treats specially, in any order, with
/// unterminated quotes and comments.
fn soup() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        prop::sample::select(
            &[
                "'",
                "\"",
                "$",
                "$$",
                "$a$",
                "--",
                "/*",
                "*/",
                ";",
                "\\",
                "E'",
                "e'",
                "\n",
                "\u{b}",
                " ",
                "(",
                ")",
                ",",
                "COMMIT",
                "begin",
                "ATOMIC",
                "CASE",
                "END",
                "set_config",
                "true",
                "SET",
                "1",
                "2END",
                "é",
                "\u{a0}",
            ][..]
        )
        .prop_map(str::to_owned),
        "\\PC{0,3}",
    ];
    prop::collection::vec(piece, 0..24).prop_map(|pieces| pieces.concat())
}

proptest! {
    #![proptest_config(config("sql guard: a statement that ends or reshapes the branch is refused in any disguise"))]
    #[test]
    fn a_refused_statement_is_refused_in_any_disguise(sql in list_with(refused_statement()), opening in any::<bool>()) {
        prop_assert!(check(&sql, opening).is_err(), "accepted: {:?}", sql);
    }
}

proptest! {
    #![proptest_config(config("sql guard: SET TRANSACTION only as an opening branch's first statement"))]
    #[test]
    fn set_transaction_is_refused_unless_it_opens_the_branch(
        later in list_with(disguised(SET_TRANSACTION)),
        first in (disguised(SET_TRANSACTION), prop::collection::vec(harmless_statement(), 0..3)),
    ) {
        // Anywhere, in a branch already open: refused.
        prop_assert!(check(&later, false).is_err(), "accepted: {:?}", later);
        // First in the call that opens the branch: allowed (the transaction has not started).
        let (set_transaction, rest) = first;
        let mut sql = set_transaction;
        for statement in rest {
            sql.push(';');
            sql.push_str(&statement);
        }
        prop_assert!(check(&sql, true).is_ok(), "refused: {:?}", sql);
    }
}

proptest! {
    #![proptest_config(config("sql guard: a statement that changes the session is refused or reported"))]
    #[test]
    fn a_session_change_is_reported_in_any_disguise(sql in list_with(session_statement()), opening in any::<bool>()) {
        if let Ok(analysis) = check(&sql, opening) {
            prop_assert!(analysis.changes_session, "not reported: {:?}", sql);
        }
    }
}

proptest! {
    #![proptest_config(config("sql guard: forbidden words in strings, identifiers and comments stay allowed"))]
    #[test]
    fn forbidden_words_inside_literals_and_comments_are_allowed(
        statements in prop::collection::vec(harmless_statement(), 1..5)
            .prop_flat_map(|statements| (Just(statements.len()), statement_list(statements))),
    ) {
        let (count, sql) = statements;
        let analysis = check(&sql, false).map_err(|e| TestCaseError::fail(format!("{sql:?} refused: {e}")))?;
        prop_assert_eq!(analysis.statements, count, "{:?}", sql);
        prop_assert!(!analysis.changes_session, "{:?}", sql);
    }
}

proptest! {
    #![proptest_config(config("sql guard: no string panics it"))]
    #[test]
    fn no_string_panics_the_guard(sql in prop_oneof![soup(), any::<String>()], opening in any::<bool>()) {
        if let Ok(analysis) = check(&sql, opening) {
            prop_assert!(analysis.statements <= sql.matches(';').count() + 1);
        }
    }
}
