//! SQL values as Treaty carries them: the parameter and cell types of the API, validated on arrival.

use crate::pb;

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

fn is_decimal(text: &str) -> bool {
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let all_digits = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    (!whole.is_empty() || !fraction.is_empty()) && all_digits(whole) && all_digits(fraction)
        || matches!(digits, "NaN")
}

fn is_uuid(text: &str) -> bool {
    text.len() == 36
        && text.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

impl TryFrom<pb::Value> for Value {
    type Error = ValueError;

    fn try_from(value: pb::Value) -> Result<Self, ValueError> {
        use pb::value::Kind;
        Ok(match value.kind.ok_or(ValueError::Missing)? {
            Kind::Null(_) => Value::Null,
            Kind::Bool(b) => Value::Bool(b),
            Kind::Int64(i) => Value::Int64(i),
            Kind::Float64(f) => Value::Float64(f),
            Kind::Text(s) => Value::Text(s),
            Kind::Bytes(b) => Value::Bytes(b),
            Kind::Numeric(s) if is_decimal(&s) => Value::Numeric(s),
            Kind::Numeric(s) => return Err(ValueError::Numeric(s)),
            Kind::TimestamptzMicros(t) => Value::TimestamptzMicros(t),
            Kind::Uuid(s) if is_uuid(&s) => Value::Uuid(s),
            Kind::Uuid(s) => return Err(ValueError::Uuid(s)),
            Kind::Json(s) => Value::Json(s),
        })
    }
}

impl From<Value> for pb::Value {
    fn from(value: Value) -> Self {
        use pb::value::Kind;
        let kind = match value {
            Value::Null => Kind::Null(true),
            Value::Bool(b) => Kind::Bool(b),
            Value::Int64(i) => Kind::Int64(i),
            Value::Float64(f) => Kind::Float64(f),
            Value::Text(s) => Kind::Text(s),
            Value::Bytes(b) => Kind::Bytes(b),
            Value::Numeric(s) => Kind::Numeric(s),
            Value::TimestamptzMicros(t) => Kind::TimestamptzMicros(t),
            Value::Uuid(s) => Kind::Uuid(s),
            Value::Json(s) => Kind::Json(s),
        };
        pb::Value { kind: Some(kind) }
    }
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
    fn missing_kind_is_an_error() {
        assert_eq!(
            Value::try_from(pb::Value { kind: None }),
            Err(ValueError::Missing)
        );
    }

    #[test]
    fn uuid_syntax() {
        assert!(is_uuid("123e4567-e89b-12d3-a456-426614174000"));
        assert!(!is_uuid("123e4567e89b12d3a456426614174000"));
    }
}
