//! PostgreSQL result cells to Treaty values, by column type.
//!
//! Every result comes back in binary format (each statement, even of a multi-statement string,
//! goes through the extended protocol) and is read here from its bytes by column type. A type Treaty does not carry is an error naming the column and
//! the cast that fixes it, never a panic. `date` is returned as text (`YYYY-MM-DD`): the API has no
//! date type and a midnight timestamp would invent a time zone.

use chrono::NaiveDate;
use tokio_postgres::types::{FromSql, Kind as PgKind, Type};
use treaty_proto::Value;

use super::{POSTGRES_EPOCH_MICROS, numeric};

/// A result column as the API reports it (the core's `Column`: PostgreSQL's name for the type, e.g.
/// `int4`, `varchar`, `timestamptz`).
pub use treaty_commit_protocol::transport::Column;

/// The column as PostgreSQL described it.
pub fn column_from_pg(column: &tokio_postgres::Column) -> Column {
    Column {
        name: column.name().to_owned(),
        type_name: type_name(column.type_()),
    }
}

/// PostgreSQL's catalog name; an array as its element's name and `[]` (`int4[]`), as before.
fn type_name(ty: &Type) -> String {
    match ty.kind() {
        PgKind::Array(element) => format!("{}[]", element.name()),
        _ => ty.name().to_owned(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error(
        "column {column:?} has type {type_name}, which Treaty cannot return; \
         cast it in the query, e.g. {column}::text"
    )]
    Unsupported { column: String, type_name: String },
    #[error("column {column:?} ({type_name}): {problem}; cast it in the query, e.g. {column}::text")]
    Value {
        column: String,
        type_name: String,
        problem: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Text,
    Bytea,
    Numeric,
    Timestamptz,
    Timestamp,
    Date,
    Uuid,
    Json,
    Jsonb,
}

fn kind_of(ty: &Type) -> Option<Kind> {
    let mut base = ty;
    // A domain travels in its base type's format.
    while let PgKind::Domain(inner) = base.kind() {
        base = inner;
    }
    if base.name() == "citext" {
        return Some(Kind::Text);
    }
    Some(match base.oid() {
        16 => Kind::Bool,
        17 => Kind::Bytea,
        19 | 25 | 705 | 1042 | 1043 => Kind::Text,
        20 => Kind::Int8,
        21 => Kind::Int2,
        23 => Kind::Int4,
        114 => Kind::Json,
        700 => Kind::Float4,
        701 => Kind::Float8,
        1082 => Kind::Date,
        1114 => Kind::Timestamp,
        1184 => Kind::Timestamptz,
        1700 => Kind::Numeric,
        2950 => Kind::Uuid,
        3802 => Kind::Jsonb,
        _ => return None,
    })
}

/// A cell as PostgreSQL sent it (binary format: the extended protocol asks for binary results).
struct Raw<'a>(&'a [u8]);

impl<'a> FromSql<'a> for Raw<'a> {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Raw<'a>, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// Every cell of `row`, in column order.
pub fn decode_row(row: &tokio_postgres::Row) -> Result<Vec<Value>, DecodeError> {
    row.columns()
        .iter()
        .enumerate()
        .map(|(index, column)| {
            let failed = |problem: String| DecodeError::Value {
                column: column.name().to_owned(),
                type_name: type_name(column.type_()),
                problem,
            };
            let raw: Option<Raw<'_>> = row.try_get(index).map_err(|e| failed(e.to_string()))?;
            let Some(Raw(bytes)) = raw else {
                return Ok(Value::Null);
            };
            let kind = kind_of(column.type_()).ok_or_else(|| DecodeError::Unsupported {
                column: column.name().to_owned(),
                type_name: type_name(column.type_()),
            })?;
            binary(kind, bytes).map_err(failed)
        })
        .collect()
}

fn exact<const N: usize>(bytes: &[u8]) -> Result<[u8; N], String> {
    bytes
        .try_into()
        .map_err(|_| format!("expected {N} bytes, the server sent {}", bytes.len()))
}

fn utf8(bytes: &[u8]) -> Result<String, String> {
    String::from_utf8(bytes.to_vec()).map_err(|e| e.to_string())
}

fn micros_since_unix(since_2000: i64) -> Result<Value, String> {
    if since_2000 == i64::MAX || since_2000 == i64::MIN {
        return Err("infinite timestamps have no microsecond value".into());
    }
    since_2000
        .checked_add(POSTGRES_EPOCH_MICROS)
        .map(Value::TimestamptzMicros)
        .ok_or_else(|| "timestamp is outside the range of microseconds since 1970 in 64 bits".into())
}

fn date_text(date: NaiveDate) -> Result<Value, String> {
    use chrono::Datelike;
    if !(1..=9999).contains(&date.year()) {
        return Err("dates outside years 1-9999 are not returned as YYYY-MM-DD".into());
    }
    Ok(Value::Text(date.format("%Y-%m-%d").to_string()))
}

fn binary(kind: Kind, bytes: &[u8]) -> Result<Value, String> {
    Ok(match kind {
        Kind::Bool => Value::Bool(exact::<1>(bytes)?[0] != 0),
        Kind::Int2 => Value::Int64(i16::from_be_bytes(exact(bytes)?).into()),
        Kind::Int4 => Value::Int64(i32::from_be_bytes(exact(bytes)?).into()),
        Kind::Int8 => Value::Int64(i64::from_be_bytes(exact(bytes)?)),
        Kind::Float4 => Value::Float64(f32::from_be_bytes(exact(bytes)?).into()),
        Kind::Float8 => Value::Float64(f64::from_be_bytes(exact(bytes)?)),
        Kind::Text => Value::Text(utf8(bytes)?),
        Kind::Json => Value::Json(utf8(bytes)?),
        Kind::Bytea => Value::Bytes(bytes.to_vec()),
        Kind::Numeric => Value::Numeric(numeric::decode(bytes).map_err(|e| e.to_string())?),
        Kind::Timestamptz | Kind::Timestamp => micros_since_unix(i64::from_be_bytes(exact(bytes)?))?,
        Kind::Date => {
            let days = i32::from_be_bytes(exact(bytes)?);
            let date = NaiveDate::from_ymd_opt(2000, 1, 1)
                .and_then(|epoch| epoch.checked_add_signed(chrono::TimeDelta::days(days.into())))
                .ok_or("infinite or out-of-range date")?;
            date_text(date)?
        }
        Kind::Uuid => Value::Uuid(uuid::Uuid::from_bytes(exact(bytes)?).hyphenated().to_string()),
        Kind::Jsonb => match bytes.split_first() {
            Some((1, json)) => Value::Json(utf8(json)?),
            _ => return Err("unknown jsonb format version".into()),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_cells() {
        assert_eq!(binary(Kind::Int2, &[0xff, 0xfe]).unwrap(), Value::Int64(-2));
        assert_eq!(binary(Kind::Int4, &[0, 0, 1, 0]).unwrap(), Value::Int64(256));
        assert_eq!(
            binary(Kind::Float4, &1.5f32.to_be_bytes()).unwrap(),
            Value::Float64(1.5)
        );
        assert_eq!(binary(Kind::Json, b"{}").unwrap(), Value::Json("{}".into()));
        assert_eq!(
            binary(Kind::Jsonb, b"\x01[1]").unwrap(),
            Value::Json("[1]".into())
        );
        assert_eq!(
            binary(Kind::Timestamptz, &0i64.to_be_bytes()).unwrap(),
            Value::TimestamptzMicros(POSTGRES_EPOCH_MICROS)
        );
        assert_eq!(
            binary(Kind::Date, &(-1i32).to_be_bytes()).unwrap(),
            Value::Text("1999-12-31".into())
        );
        assert_eq!(
            binary(Kind::Uuid, &[0x12; 16]).unwrap(),
            Value::Uuid("12121212-1212-1212-1212-121212121212".into())
        );
    }

    #[test]
    fn infinity_and_garbage_are_errors_not_panics() {
        assert!(binary(Kind::Timestamptz, &i64::MAX.to_be_bytes()).is_err());
        assert!(binary(Kind::Timestamp, &i64::MIN.to_be_bytes()).is_err());
        assert!(binary(Kind::Date, &i32::MAX.to_be_bytes()).is_err());
        assert!(binary(Kind::Int8, &[1, 2, 3]).is_err());
        assert!(binary(Kind::Jsonb, b"\x02{}").is_err());
        assert!(binary(Kind::Text, &[0xff]).is_err());
    }
}
