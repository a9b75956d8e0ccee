//! The `treaty scenario` and `treaty chaos` commands as a user runs them: the real binary, real
//! clusters, the JSON verdict on the last line. The scenario matrix in `scenarios/` runs here,
//! one test per directory so that the test runner can spread them over cores.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Runs `treaty <args>` and returns (success, last line parsed as JSON, whole stdout).
fn treaty(args: &[&str]) -> Result<(bool, serde_json::Value, String)> {
    let binary = treaty_harness::binary_path("treaty")?;
    let output = Command::new(&binary)
        .args(args)
        .current_dir(repo())
        .output()
        .with_context(|| format!("running {}", binary.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stdout.lines().last().unwrap_or_default();
    let json = serde_json::from_str(last)
        .with_context(|| format!("the last line is not JSON:\n{stdout}\n--- stderr ---\n{stderr}"))?;
    Ok((output.status.success(), json, stdout))
}

/// `treaty scenario run scenarios/<dir> --json`, in process when asked.
fn scenario_run(dir: &str, in_process: bool) -> Result<(bool, serde_json::Value, String)> {
    let path = repo().join("scenarios").join(dir);
    let mut args = vec!["scenario", "run", path.to_str().unwrap_or_default()];
    if in_process {
        args.extend(["--participants", "in-process"]);
    }
    args.push("--json");
    treaty(&args)
}

fn run_dir(dir: &str) -> Result<()> {
    let path = repo().join("scenarios").join(dir);
    let files = std::fs::read_dir(&path)?
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "toml"))
        })
        .count();
    assert!(files > 0, "no scenarios in {}", path.display());
    let (ok, json, stdout) = scenario_run(dir, false)?;
    assert!(ok, "scenarios in {dir} failed:\n{stdout}");
    assert_eq!(json["failed"], 0, "{stdout}");
    assert_eq!(json["violations"], 0, "{stdout}");
    assert_eq!(json["passed"], files, "{stdout}");
    Ok(())
}

/// The directory's scenarios with in-process participants: every one runs (none needs agents)
/// and passes.
fn run_dir_in_process(dir: &str) -> Result<()> {
    let (ok, json, stdout) = scenario_run(dir, true)?;
    assert!(ok, "scenarios in {dir} failed in process:\n{stdout}");
    assert_eq!(json["participants"], "in-process", "{stdout}");
    assert_eq!(json["failed"], 0, "{stdout}");
    assert_eq!(json["violations"], 0, "{stdout}");
    assert!(json["passed"].as_u64().unwrap_or(0) > 0, "{stdout}");
    Ok(())
}

#[test]
fn scenarios_participant_failpoints_with_in_process_participants() -> Result<()> {
    run_dir_in_process("participant")
}

#[test]
fn scenarios_that_need_participant_agents_are_skipped_in_process_with_the_reason() -> Result<()> {
    let (ok, json, stdout) = scenario_run("3pc", true)?;
    // Nothing ran, which is not a pass: the last line is the error, the verdict is before it.
    assert!(!ok, "{stdout}");
    assert!(
        json["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("every scenario was skipped")),
        "{stdout}"
    );
    let verdict: serde_json::Value = stdout
        .lines()
        .find(|line| line.contains("\"skipped_scenarios\""))
        .map(serde_json::from_str)
        .transpose()?
        .with_context(|| format!("no verdict line:\n{stdout}"))?;
    assert_eq!(verdict["passed"], 0, "{stdout}");
    assert!(verdict["skipped"].as_u64().unwrap_or(0) >= 5, "{stdout}");
    let reasons = verdict["skipped_scenarios"].to_string();
    assert!(
        reasons.contains("three-phase commit needs participant agents"),
        "{reasons}"
    );
    Ok(())
}

#[test]
fn scenarios_coordinator_failpoints() -> Result<()> {
    run_dir("coordinator")
}

#[test]
fn scenarios_participant_failpoints() -> Result<()> {
    run_dir("participant")
}

#[test]
fn scenarios_network() -> Result<()> {
    run_dir("network")
}

#[test]
fn scenarios_three_phase() -> Result<()> {
    run_dir("3pc")
}

#[test]
fn scenarios_decision_log() -> Result<()> {
    run_dir("log")
}

/// The commit decision in PostgreSQL (`--decision-store shard`): crashes of the coordinator, the
/// decision branch's participant and its PostgreSQL around the decision commit, a paused
/// coordinator losing to an abort another instance concluded, a coordinator killed for good
/// finished by another, commit rows forgotten under load, and the decision database failing over
/// to its synchronous standby mid-load.
#[test]
fn scenarios_decision_rows() -> Result<()> {
    run_dir("decision-rows")
}

#[test]
fn scenarios_submit() -> Result<()> {
    run_dir("submit")
}

#[test]
fn the_checker_catches_a_participant_that_commits_on_its_own() -> Result<()> {
    let file = repo().join("tests/scenarios/broken-participant-commits-alone.toml");
    let (_, json, stdout) = treaty(&["scenario", "run", file.to_str().unwrap_or_default(), "--json"])?;
    let scenario = &json["scenarios"][0];
    let violations = scenario["report"]["violations"]
        .as_array()
        .context("a report with violations")?;
    assert!(
        violations
            .iter()
            .any(|v| v["kind"] == "half-applied" && v["evidence"]["s1"] == true),
        "the checker must report the transaction applied on s1 only:\n{stdout}"
    );
    // The scenario expects the violation, so as a scenario it passes.
    assert_eq!(json["passed"], 1, "{stdout}");
    Ok(())
}

#[test]
fn a_short_chaos_run_ends_with_no_violations() -> Result<()> {
    let (ok, json, stdout) = treaty(&["chaos", "--duration", "20", "--seed", "7", "--json"])?;
    assert!(ok, "{stdout}");
    assert_eq!(json["violations"], 0, "{stdout}");
    assert_eq!(json["prepared_left"], 0, "{stdout}");
    assert!(json["kills"].as_u64().unwrap_or(0) >= 3, "{stdout}");
    assert!(json["committed"].as_u64().unwrap_or(0) > 0, "{stdout}");
    Ok(())
}

#[test]
fn a_short_chaos_run_with_in_process_participants_ends_with_no_violations() -> Result<()> {
    let (ok, json, stdout) = treaty(&[
        "chaos",
        "--participants",
        "in-process",
        "--duration",
        "20",
        "--seed",
        "11",
        "--json",
    ])?;
    assert!(ok, "{stdout}");
    assert_eq!(json["participants"], "in-process", "{stdout}");
    assert_eq!(json["violations"], 0, "{stdout}");
    assert_eq!(json["prepared_left"], 0, "{stdout}");
    // The participants live in the coordinator: every process kill is of the coordinator or of
    // a PostgreSQL server, never of an agent.
    let by_target = json["kills_by_target"].as_object().cloned().unwrap_or_default();
    assert!(
        by_target
            .keys()
            .all(|target| target == "coordinator" || target.starts_with("pg:")),
        "{stdout}"
    );
    assert!(
        by_target.get("coordinator").and_then(|n| n.as_u64()).unwrap_or(0) >= 2,
        "{stdout}"
    );
    assert!(json["committed"].as_u64().unwrap_or(0) > 0, "{stdout}");
    Ok(())
}

#[test]
fn chaos_refuses_in_process_participants_with_three_phase_commit_or_two_coordinators() -> Result<()> {
    let binary = treaty_harness::binary_path("treaty")?;
    for (extra, expected) in [
        (
            ["--protocol", "three-phase"],
            "three-phase commit needs participant agents",
        ),
        (["--coordinators", "2"], "use --coordinators 1"),
    ] {
        let output = Command::new(&binary)
            .args(["chaos", "--participants", "in-process", "--duration", "1"])
            .args(extra)
            .output()?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{extra:?} was accepted");
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
    }
    Ok(())
}
