//! The `treaty` command's documented exit codes and JSON output (README, "Exit codes"), run as a
//! real process against a real cluster: committed 0, usage 2, aborted 3, unavailable 4, not
//! found 5; under `--json` a failure is one JSON object naming its kind and exit code, and an
//! abort's cause, shard, SQLSTATE, message and retryable flag are separate fields.

use std::path::Path;
use std::process::Output;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::fixture::{Options, TestCluster};

fn treaty(coordinator: &str, args: &[&str]) -> Result<Output> {
    std::process::Command::new(treaty_harness::binary_path("treaty")?)
        .args(args)
        .args(["--coordinator", coordinator])
        .env_remove("TREATY_COORDINATOR")
        .output()
        .context("running treaty")
}

/// The last line of stdout as JSON (the one object a `--json` command prints).
fn json(output: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "stdout's last line is not JSON ({e}): {stdout:?}; stderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn ops_file(dir: &Path, name: &str, body: &str) -> Result<String> {
    let path = dir.join(name);
    std::fs::write(&path, body)?;
    Ok(path.display().to_string())
}

#[tokio::test]
async fn exit_codes_tell_committed_aborted_unavailable_not_found_and_usage_apart() -> Result<()> {
    let t = TestCluster::start(Options::default()).await?;
    let endpoint = t.cluster.coordinator_endpoint();
    let (s0, s1) = (t.shard(0), t.shard(1));
    let dir = t.dir.path();

    // Committed: 0, and the outcome is a field, not a sentence.
    let insert = ops_file(
        dir,
        "insert.json",
        &format!(
            r#"{{"ops":[{{"shard":"{s0}","sql":"INSERT INTO kv VALUES ($1, $2)","params":[1,"a"]}},
                {{"shard":"{s1}","sql":"INSERT INTO kv VALUES ($1, $2)","params":[1,"b"]}}]}}"#
        ),
    )?;
    let committed = treaty(&endpoint, &["submit", &insert, "--json"])?;
    assert_eq!(committed.status.code(), Some(0), "{committed:?}");
    let answer = json(&committed);
    assert_eq!(answer["outcome"]["kind"], "committed", "{answer}");
    let txid = answer["txid"].as_u64().context("txid")?;

    // `list --json` shows it.
    let list = treaty(&endpoint, &["list", "--json"])?;
    assert_eq!(list.status.code(), Some(0), "{list:?}");
    let listed = json(&list);
    assert!(
        listed.to_string().contains(&format!("\"txid\":{txid}")),
        "{listed}"
    );

    // Aborted: the same keys again violate the primary keys: 3, with the fields apart.
    let aborted = treaty(&endpoint, &["submit", &insert, "--json"])?;
    assert_eq!(aborted.status.code(), Some(3), "{aborted:?}");
    let error = json(&aborted);
    assert_eq!(error["error"]["kind"], "aborted", "{error}");
    assert_eq!(error["error"]["exit_code"], 3, "{error}");
    assert_eq!(error["error"]["abort"]["sqlstate"], "23505", "{error}");
    // Both branches meet a duplicate key; whichever shard answered first is named.
    let shard = error["error"]["abort"]["shard"].as_str().unwrap_or_default();
    assert!(shard == s0 || shard == s1, "{error}");
    assert_eq!(error["error"]["abort"]["retryable"], false, "{error}");
    assert!(
        t.kv(0).await? == vec![(1, "a".to_owned())],
        "the aborted transaction changed nothing"
    );

    // Not found: 5, in JSON too.
    let missing = treaty(&endpoint, &["txn", "987654321", "--json"])?;
    assert_eq!(missing.status.code(), Some(5), "{missing:?}");
    assert_eq!(json(&missing)["error"]["kind"], "not_found");

    // Unavailable: no coordinator at that address: 4.
    let dead = format!("http://127.0.0.1:{}", treaty_harness::free_loopback_port()?);
    let unavailable = treaty(&dead, &["txn", &txid.to_string(), "--json"])?;
    assert_eq!(unavailable.status.code(), Some(4), "{unavailable:?}");
    assert_eq!(json(&unavailable)["error"]["kind"], "unavailable");

    // Usage: a bad flag value, and an ops file that does not parse: 2, and nothing is sent.
    let bad_flag = treaty(&endpoint, &["list", "--limit", "0", "--json"])?;
    assert_eq!(bad_flag.status.code(), Some(2), "{bad_flag:?}");
    assert_eq!(json(&bad_flag)["error"]["kind"], "usage");
    let broken = ops_file(dir, "broken.json", r#"{"ops": [{"shard": 7}]}"#)?;
    let bad_file = treaty(&endpoint, &["submit", &broken, "--json"])?;
    assert_eq!(bad_file.status.code(), Some(2), "{bad_file:?}");
    let error = json(&bad_file);
    assert_eq!(error["error"]["kind"], "usage", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("broken.json")),
        "the message names the file: {error}"
    );

    // Without --json a failure is a sentence on stderr and stdout stays empty.
    let plain = treaty(&endpoint, &["txn", "987654321"])?;
    assert_eq!(plain.status.code(), Some(5));
    assert!(plain.stdout.is_empty(), "{plain:?}");
    assert!(String::from_utf8_lossy(&plain.stderr).starts_with("error: "));
    Ok(())
}
