//! Reading a one-shot submit from a JSON or TOML file into a `SubmitRequest`.
//!
//! Parameters are plain JSON/TOML values (integer, float, string, bool, JSON null) or a one-key
//! table naming the type: `{numeric = "1.50"}`, `{uuid = "..."}`, `{json = "{...}"}`,
//! `{timestamptz_micros = 0}`, `{bytes_hex = "00ff"}`, `{null = true}` (TOML has no null).

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;
use treaty_proto::pb;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitFile {
    ops: Vec<OpSpec>,
    #[serde(default)]
    wait_for_apply: bool,
    #[serde(default)]
    label: String,
    #[serde(default)]
    timeout_ms: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OpSpec {
    shard: String,
    sql: String,
    #[serde(default)]
    params: Vec<serde_json::Value>,
    expect_rows: Option<u64>,
}

fn param(index: usize, value: serde_json::Value) -> Result<pb::Value> {
    use pb::value::Kind;
    use serde_json::Value as J;
    let kind = match value {
        J::Null => Kind::Null(true),
        J::Bool(b) => Kind::Bool(b),
        J::Number(n) => match n.as_i64() {
            Some(i) => Kind::Int64(i),
            None => Kind::Float64(
                n.as_f64()
                    .ok_or_else(|| anyhow!("param {index}: number {n} is out of range"))?,
            ),
        },
        J::String(s) => Kind::Text(s),
        J::Object(map) if map.len() == 1 => {
            let Some((key, inner)) = map.into_iter().next() else {
                bail!("param {index}: empty table")
            };
            let text = || {
                inner
                    .as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| anyhow!("param {index}: {key} takes a string"))
            };
            match key.as_str() {
                "numeric" => Kind::Numeric(text()?),
                "uuid" => Kind::Uuid(text()?),
                "json" => Kind::Json(text()?),
                "text" => Kind::Text(text()?),
                "null" => Kind::Null(true),
                "timestamptz_micros" => Kind::TimestamptzMicros(
                    inner
                        .as_i64()
                        .ok_or_else(|| anyhow!("param {index}: timestamptz_micros takes an integer"))?,
                ),
                "bytes_hex" => Kind::Bytes(decode_hex(&text()?).with_context(|| format!("param {index}"))?),
                other => bail!(
                    "param {index}: unknown type {other:?} (use numeric, uuid, json, text, null, timestamptz_micros or bytes_hex)"
                ),
            }
        }
        other => bail!(
            "param {index}: {other} is not a value (use a scalar or a one-key table like {{numeric = \"1.5\"}})"
        ),
    };
    Ok(pb::Value { kind: Some(kind) })
}

fn decode_hex(text: &str) -> Result<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        bail!("hex string has an odd number of digits");
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&text[i..i + 2], 16).map_err(|_| anyhow!("{:?} is not hex", &text[i..i + 2]))
        })
        .collect()
}

pub fn parse(text: &str, path: &Path) -> Result<pb::SubmitRequest> {
    let is_toml = path.extension().is_some_and(|e| e == "toml");
    let file: SubmitFile = if is_toml {
        toml::from_str(text).with_context(|| format!("{} is not a valid TOML submit file", path.display()))?
    } else {
        serde_json::from_str(text)
            .with_context(|| format!("{} is not a valid JSON submit file", path.display()))?
    };
    let ops = file
        .ops
        .into_iter()
        .enumerate()
        .map(|(i, op)| {
            let params = op
                .params
                .into_iter()
                .enumerate()
                .map(|(p, v)| param(p + 1, v))
                .collect::<Result<Vec<_>>>()
                .with_context(|| format!("op {i}"))?;
            Ok(pb::Op {
                shard: op.shard,
                sql: op.sql,
                params,
                expect_rows: op.expect_rows,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(pb::SubmitRequest {
        ops,
        options: Some(pb::TransactionOptions {
            label: file.label,
            timeout_ms: file.timeout_ms,
            ..Default::default()
        }),
        wait_for_apply: file.wait_for_apply,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_toml_files_parse_to_the_same_request() {
        let json = r#"{"ops":[{"shard":"s0","sql":"UPDATE a SET b=$1 WHERE id=$2","params":[{"numeric":"1.5"},7],"expect_rows":1}]}"#;
        let toml = "[[ops]]\nshard = \"s0\"\nsql = \"UPDATE a SET b=$1 WHERE id=$2\"\nparams = [{numeric = \"1.5\"}, 7]\nexpect_rows = 1\n";
        let a = parse(json, Path::new("x.json")).unwrap();
        let b = parse(toml, Path::new("x.toml")).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.ops[0].expect_rows, Some(1));
        assert_eq!(a.ops[0].params[1].kind, Some(pb::value::Kind::Int64(7)));
    }

    #[test]
    fn bad_params_are_named() {
        let json = r#"{"ops":[{"shard":"s0","sql":"x","params":[1,{"nope":"1"}]}]}"#;
        let error = format!("{:#}", parse(json, Path::new("x.json")).unwrap_err());
        assert!(error.contains("param 2") && error.contains("nope"), "{error}");
        assert!(parse(r#"{"ops":[{"shard":"s0"}]}"#, Path::new("x.json")).is_err());
    }
}
