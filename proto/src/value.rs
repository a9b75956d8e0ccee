//! Wire conversions of SQL values: `treaty.v1.Value` to the domain [`Value`] (validated on
//! arrival) and back.

use treaty_types::value::{is_decimal, is_uuid};
pub use treaty_types::{Value, ValueError};

use crate::pb;

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
    fn missing_kind_is_an_error() {
        assert_eq!(
            Value::try_from(pb::Value { kind: None }),
            Err(ValueError::Missing)
        );
    }
}
