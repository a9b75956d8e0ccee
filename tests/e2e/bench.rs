//! `treaty bench` end to end, briefly: every decision store side by side against direct and
//! direct-pipelined, on a cluster the bench starts itself (the decision database's server
//! included).

use std::path::Path;

use anyhow::{Context, Result};

/// Runs `treaty <args> --json --dir <dir>`, asserts it succeeded, and returns its report (the
/// last line of its output).
async fn bench_report(args: &[&str], dir: &Path) -> Result<serde_json::Value> {
    let output = tokio::process::Command::new(treaty_harness::binary_path("treaty")?)
        .args(args)
        .arg("--json")
        .arg("--dir")
        .arg(dir)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{args:?}: {stdout}\n{stderr}");
    serde_json::from_str(stdout.lines().last().context("no output")?)
        .context("the last line is the JSON report")
}

#[tokio::test]
async fn the_bench_runs_every_decision_store_beside_both_direct_baselines_and_leaves_nothing_prepared()
-> Result<()> {
    let dir = tempfile::Builder::new().prefix("treaty-e2e-bench-").tempdir()?;
    let report = bench_report(
        &[
            "bench",
            "transfer",
            "--shards",
            "2",
            "--clients",
            "2",
            "--duration",
            "2",
            "--rounds",
            "1",
            "--warmup",
            "0",
            "--accounts",
            "10000",
            "--baseline",
            "direct,direct-pipelined",
            "--decision-store",
            "file,shard,database",
        ],
        dir.path(),
    )
    .await?;
    assert_eq!(report["prepared_left"], 0, "{report}");
    for (store, system) in [
        ("file", "treaty"),
        ("shard", "treaty_shard"),
        ("database", "treaty_database"),
    ] {
        let figures = &report["decision_stores"][store];
        assert_eq!(figures["system"], system, "{report}");
        assert!(
            figures["committed"].as_u64().unwrap_or(0) > 0,
            "{store}: {figures}"
        );
    }
    // Each store's deferred work (marker rows, commit rows, branches still prepared) was waited
    // out after its phase and charged to it, not left for the next system measured.
    let rounds = report["rounds"].as_array().context("rounds")?;
    assert_eq!(rounds.len(), 5, "{report}");
    for round in rounds {
        let treaty = round["system"].as_str().unwrap_or("").starts_with("treaty");
        if treaty {
            assert_eq!(round["left_after_settle"], 0, "{round}");
            assert!(round["settle_ms"].as_u64().is_some(), "{round}");
        } else {
            assert!(round["settle_ms"].is_null(), "{round}");
        }
    }
    assert!(report["direct_tps"].as_f64().unwrap_or(0.0) > 0.0, "{report}");
    // The pipelined baseline beside direct: its own keys, its transfers committed and nothing
    // of its left prepared (counted in `prepared_left` above).
    assert!(
        report["direct_pipelined_tps"].as_f64().unwrap_or(0.0) > 0.0,
        "{report}"
    );
    assert!(report["direct_pipelined_p99_ms"].as_f64().is_some(), "{report}");
    assert!(report["direct_pipelined_aborts"].is_object(), "{report}");
    assert_eq!(
        report["baselines"],
        serde_json::json!(["direct", "direct_pipelined"]),
        "{report}"
    );
    Ok(())
}

/// `--participants in-process`: the coordinator drives both databases itself, as a service or (the
/// default) embedded in the bench process; the report says which, and Treaty commits beside direct
/// with nothing left prepared.
#[tokio::test]
async fn the_bench_runs_in_process_participants_beside_direct_with_the_coordinator_a_service_or_embedded()
-> Result<()> {
    for (coordinator, asked) in [("service", Some("service")), ("embedded", None)] {
        let dir = tempfile::Builder::new().prefix("treaty-e2e-bench-").tempdir()?;
        let mut args = vec![
            "bench",
            "transfer",
            "--shards",
            "2",
            "--clients",
            "2",
            "--duration",
            "2",
            "--rounds",
            "1",
            "--warmup",
            "0",
            "--accounts",
            "10000",
            "--baseline",
            "direct",
            "--participants",
            "in-process",
        ];
        if let Some(kind) = asked {
            args.extend(["--coordinator", kind]);
        }
        let report = bench_report(&args, dir.path()).await?;
        assert_eq!(report["participant_kind"], "in-process", "{report}");
        assert_eq!(report["coordinator_kind"], coordinator, "{report}");
        assert_eq!(report["prepared_left"], 0, "{report}");
        assert!(report["treaty_tps"].as_f64().unwrap_or(0.0) > 0.0, "{report}");
        assert!(report["direct_tps"].as_f64().unwrap_or(0.0) > 0.0, "{report}");
        // Measured either way: the service's process, or the bench process beyond direct's clients.
        assert!(
            report["coordinator_cpu_us_per_txn"].as_f64().is_some(),
            "{report}"
        );
        // The embedded coordinator's log is in the bench's directory, as the service's is.
        assert!(dir.path().join("coordinator").is_dir(), "{coordinator}");
    }
    // Two decision stores cannot share the databases in process: refused before anything starts.
    let refused = tokio::process::Command::new(treaty_harness::binary_path("treaty")?)
        .args([
            "bench",
            "transfer",
            "--participants",
            "in-process",
            "--decision-store",
            "file,shard",
        ])
        .output()
        .await?;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("give one --decision-store"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    Ok(())
}

/// `treaty bench recovery`: a restarted coordinator finishes every transaction the bench left
/// decided and prepared, whether the commit rows lie on every shard (`spread`, the default) or
/// all on the first, and the report says which layout it measured. Both are backlogs (at least
/// `FORGET_BATCH` live), during which commit rows are forgotten only in full batches or once they
/// waited 1 s: 600 rows per shard never make a full batch, 2,200 on one shard make two, and every
/// row must still be gone at the end.
#[tokio::test]
async fn bench_recovery_finishes_every_decided_transaction_in_either_layout_of_the_decisions() -> Result<()> {
    for (layout, txns) in [("spread", 1_200u64), ("first", 2_200)] {
        let dir = tempfile::Builder::new()
            .prefix("treaty-e2e-bench-recovery-")
            .tempdir()?;
        let txns_arg = txns.to_string();
        let report = bench_report(
            &[
                "bench",
                "recovery",
                "--txns",
                &txns_arg,
                "--decision-shards",
                layout,
            ],
            dir.path(),
        )
        .await?;
        assert_eq!(report["status"], "ok", "{report}");
        assert_eq!(report["decision_shards"], layout, "{report}");
        assert_eq!(report["prepared_left"], 0, "{report}");
        assert_eq!(report["rows_ok"], true, "{report}");
        // One prepared branch per transaction (the decision branch committed with its row), and
        // every commit row forgotten once its branches finished.
        assert_eq!(report["branches"], txns, "{report}");
        assert_eq!(report["decision_rows"], txns, "{report}");
        assert_eq!(report["decision_rows_left"], 0, "{report}");
    }
    Ok(())
}
