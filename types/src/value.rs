//! SQL values as Treaty carries them: the parameter and cell types of the API. The syntax checks
//! (`is_decimal`, `is_uuid`) are the ones every edge applies on arrival (`treaty-proto`).

/// One SQL value. `Numeric` and `Uuid` keep their text form; both are checked for syntax here so a
/// bad value is refused before it reaches a database.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int64(i64),
    Float64(f64),
    Text(String),
    Bytes(Vec<u8>),
    Numeric(String),
    TimestamptzMicros(i64),
    Uuid(String),
    Json(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error(
        "value has no kind set (set exactly one of null, bool, int64, float64, text, bytes, numeric, timestamptz_micros, uuid, json)"
    )]
    Missing,
    #[error("numeric {0:?} is not a decimal number (expected e.g. \"-12.50\")")]
    Numeric(String),
    #[error("uuid {0:?} is not in the hyphenated form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx")]
    Uuid(String),
}

pub fn is_decimal(text: &str) -> bool {
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let all_digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    (!whole.is_empty() || !fraction.is_empty()) && all_digits(whole) && all_digits(fraction)
        || matches!(digits, "NaN")
}

pub fn is_uuid(text: &str) -> bool {
    text.len() == 36
        && text.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_syntax() {
        for good in ["0", "-12.50", "+3", ".5", "5.", "NaN"] {
            assert!(is_decimal(good), "{good}");
        }
        for bad in ["", "-", ".", "1e5", "12,5", "1.2.3", "abc"] {
            assert!(!is_decimal(bad), "{bad}");
        }
    }

    #[test]
    fn uuid_syntax() {
        assert!(is_uuid("123e4567-e89b-12d3-a456-426614174000"));
        assert!(!is_uuid("123e4567e89b12d3a456426614174000"));
    }
}
