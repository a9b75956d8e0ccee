//! Treaty values to PostgreSQL bind parameters and back.
//!
//! Parameters are sent in PostgreSQL's binary format with an explicit type OID per value
//! (`Param`), built here from the validated `treaty_proto::Value`. A NULL is sent with OID 0
//! ("unspecified"), so PostgreSQL infers its type from the statement (`int_col = $1` works). Rows
//! are decoded in `decode`; numerics in both directions in `numeric`.

mod decode;
mod numeric;

use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use treaty_proto::Value;

pub use decode::{DecodeError, column_from_pg, decode_row};

/// Microseconds from 1970-01-01 (Unix) to 2000-01-01 (PostgreSQL's epoch).
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

mod oid {
    pub const UNSPECIFIED: u32 = 0;
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const INT8: u32 = 20;
    pub const TEXT: u32 = 25;
    pub const FLOAT8: u32 = 701;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

/// One bind parameter, already in PostgreSQL's binary format.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    oid: u32,
    /// `None` is SQL NULL.
    bytes: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("parameter ${position}: {problem}")]
pub struct ParamError {
    /// 1-based, as in `$1`.
    pub position: usize,
    pub problem: String,
}

impl Param {
    /// Converts the value for `$position` (1-based).
    pub fn new(position: usize, value: Value) -> Result<Param, ParamError> {
        let error = |problem: String| ParamError { position, problem };
        let (oid, bytes) = match value {
            Value::Null => {
                return Ok(Param {
                    oid: oid::UNSPECIFIED,
                    bytes: None,
                });
            }
            Value::Bool(b) => (oid::BOOL, vec![u8::from(b)]),
            Value::Int64(i) => (oid::INT8, i.to_be_bytes().to_vec()),
            Value::Float64(f) => (oid::FLOAT8, f.to_bits().to_be_bytes().to_vec()),
            Value::Text(s) => (oid::TEXT, s.into_bytes()),
            Value::Bytes(b) => (oid::BYTEA, b),
            Value::Numeric(s) => (
                oid::NUMERIC,
                numeric::encode(&s).map_err(|e| error(format!("numeric {s:?} {e}")))?,
            ),
            Value::TimestamptzMicros(micros) => {
                let since_2000 = micros.checked_sub(POSTGRES_EPOCH_MICROS).ok_or_else(|| {
                    error(format!(
                        "timestamp {micros} µs since 1970 is outside PostgreSQL's range"
                    ))
                })?;
                (oid::TIMESTAMPTZ, since_2000.to_be_bytes().to_vec())
            }
            Value::Uuid(s) => {
                let uuid = uuid::Uuid::parse_str(&s).map_err(|e| error(format!("uuid {s:?}: {e}")))?;
                (oid::UUID, uuid.as_bytes().to_vec())
            }
            Value::Json(s) => {
                serde_json::from_str::<serde::de::IgnoredAny>(&s)
                    .map_err(|e| error(format!("not valid JSON ({e})")))?;
                // jsonb's binary format is a version byte followed by the JSON text.
                let mut bytes = Vec::with_capacity(s.len() + 1);
                bytes.push(1);
                bytes.extend_from_slice(s.as_bytes());
                (oid::JSONB, bytes)
            }
        };
        Ok(Param {
            oid,
            bytes: Some(bytes),
        })
    }

    /// The PostgreSQL type this parameter declares (`unknown` for NULL).
    pub fn type_name(&self) -> &'static str {
        match self.oid {
            oid::BOOL => "bool",
            oid::BYTEA => "bytea",
            oid::INT8 => "int8",
            oid::TEXT => "text",
            oid::FLOAT8 => "float8",
            oid::TIMESTAMPTZ => "timestamptz",
            oid::NUMERIC => "numeric",
            oid::UUID => "uuid",
            oid::JSONB => "jsonb",
            _ => "unknown",
        }
    }
}

/// Converts every parameter, naming the first bad one.
pub fn params(values: Vec<Value>) -> Result<Vec<Param>, ParamError> {
    values
        .into_iter()
        .enumerate()
        .map(|(index, value)| Param::new(index + 1, value))
        .collect()
}

/// The parameter types as a comment, put in front of a statement with parameters.
///
/// Statements are prepared once per connection, keyed by this and the text (`Connection::prepared`), and binary parameters
/// are read by the types the statement was prepared with: the same text bound first with an int8
/// and later with a float8 would reinterpret the float's bits. Making the types part of the text
/// gives every type signature its own prepared statement.
pub fn signature(params: &[Param]) -> String {
    if params.is_empty() {
        return String::new();
    }
    let types: Vec<&str> = params.iter().map(Param::type_name).collect();
    format!("/* treaty params: {} */ ", types.join(","))
}

impl Param {
    /// The type the statement is prepared with for this parameter: its own, or for NULL the
    /// "unspecified" OID 0, so that PostgreSQL infers it from the statement.
    pub fn pg_type(&self) -> Type {
        Type::from_oid(self.oid).unwrap_or_else(|| {
            Type::new(
                "unknown".into(),
                oid::UNSPECIFIED,
                tokio_postgres::types::Kind::Pseudo,
                "pg_catalog".into(),
            )
        })
    }
}

/// The bytes are already in the binary format of the type the value declared (`Param::new`),
/// which is the type the statement was prepared with, or of the type PostgreSQL inferred for a
/// NULL; so any type is accepted.
impl ToSql for Param {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match &self.bytes {
            None => Ok(IsNull::Yes),
            Some(bytes) => {
                out.extend_from_slice(bytes);
                Ok(IsNull::No)
            }
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(value: Value) -> (u32, Option<Vec<u8>>) {
        let param = Param::new(1, value).unwrap();
        (param.oid, param.bytes)
    }

    #[test]
    fn encodes_binary_formats() {
        assert_eq!(bytes(Value::Null), (0, None));
        assert_eq!(bytes(Value::Bool(true)), (16, Some(vec![1])));
        assert_eq!(
            bytes(Value::Int64(-2)),
            (20, Some((-2i64).to_be_bytes().to_vec()))
        );
        assert_eq!(
            bytes(Value::Text("é".into())),
            (25, Some("é".as_bytes().to_vec()))
        );
        assert_eq!(
            bytes(Value::TimestamptzMicros(POSTGRES_EPOCH_MICROS + 1)),
            (1184, Some(vec![0, 0, 0, 0, 0, 0, 0, 1]))
        );
        assert_eq!(bytes(Value::Json("{\"a\": 1}".into())).1.unwrap()[0], 1);
        let uuid = "123e4567-e89b-12d3-a456-426614174000";
        assert_eq!(bytes(Value::Uuid(uuid.into())).1.unwrap()[..2], [0x12, 0x3e]);
    }

    #[test]
    fn bad_values_name_the_parameter() {
        let err = params(vec![Value::Int64(1), Value::Json("{".into())]).unwrap_err();
        assert_eq!(err.position, 2);
        assert!(
            err.to_string().starts_with("parameter $2: not valid JSON"),
            "{err}"
        );
        let err = Param::new(3, Value::TimestamptzMicros(i64::MIN)).unwrap_err();
        assert!(err.to_string().contains("$3"), "{err}");
        let err = Param::new(1, Value::Numeric("1e5".into())).unwrap_err();
        assert!(err.to_string().contains("numeric \"1e5\""), "{err}");
    }

    #[test]
    fn signature_distinguishes_parameter_types() {
        let a = params(vec![Value::Int64(1), Value::Null]).unwrap();
        let b = params(vec![Value::Float64(1.0), Value::Null]).unwrap();
        assert_eq!(signature(&a), "/* treaty params: int8,unknown */ ");
        assert_ne!(signature(&a), signature(&b));
        assert_eq!(signature(&[]), "");
    }
}
