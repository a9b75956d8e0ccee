//! The scenario file format (TOML): topology, workload, a schedule of fault steps, and the expected
//! verdict, as the file spells them, and loading a file. Each step's trigger and action are parsed
//! in `schedule`; the whole scenario is checked in `validate`, so a typo fails before any cluster
//! starts, with the file and the step named.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Deserializer};
use treaty_proto::Protocol;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub topology: Topology,
    #[serde(default)]
    pub workload: Workload,
    #[serde(default)]
    pub steps: Vec<Step>,
    #[serde(default)]
    pub expect: Expect,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Topology {
    pub shards: usize,
    /// Route every link (client, coordinator, participants) through fault proxies.
    pub proxies: bool,
    /// Extra arguments of the first coordinator (the one the workload's clients use).
    pub coordinator_args: Vec<String>,
    pub participant_args: Vec<String>,
    /// Where two-phase commit decisions are kept: `shard` (the default, as the coordinator's: a
    /// row in `treaty.decisions` committed inside each transaction's first branch) or `file` (the
    /// coordinator's log; the scenarios written for its failpoints say so).
    /// Passed to every coordinator instance as `--decision-store`. See [`DecisionStore`].
    pub decision_store: String,
    /// Coordinator instances over the same shards (1 to 3). The workload's clients use the first;
    /// the others (`coordinator-2`, `coordinator-3` in steps) finish what no live instance
    /// finishes, which only the shard store allows.
    pub coordinators: usize,
    /// Extra arguments of the other coordinator instances (e.g. a short `--takeover-after-ms`).
    pub other_coordinator_args: Vec<String>,
    /// Shards whose PostgreSQL gets a synchronous streaming standby once the cluster is up and
    /// before the workload starts (e.g. `["s0"]`), for a `pg-failover` step to promote.
    pub standby: Vec<String>,
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            shards: 3,
            proxies: true,
            coordinator_args: Vec::new(),
            participant_args: Vec::new(),
            decision_store: "shard".into(),
            coordinators: 1,
            other_coordinator_args: Vec::new(),
            standby: Vec::new(),
        }
    }
}

/// Where the coordinators keep two-phase commit decisions (`--decision-store`): one parser for
/// scenario files and the `demo`, `chaos` and `dev up` flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DecisionStore {
    /// The coordinator's own decision log (fsync per group of commits).
    #[default]
    File,
    /// A row in `treaty.decisions` on the transaction's decision shard.
    Shard,
}

impl DecisionStore {
    pub fn name(self) -> &'static str {
        match self {
            DecisionStore::File => "file",
            DecisionStore::Shard => "shard",
        }
    }

    /// `field = "text"` parsed; the error names the field, the value and the choices.
    pub fn parse(field: &str, text: &str) -> Result<DecisionStore> {
        match text.trim() {
            "file" => Ok(DecisionStore::File),
            "shard" => Ok(DecisionStore::Shard),
            other => bail!(
                "{field} = \"{other}\" is not a decision store: expected \"file\" (the default) or \"shard\""
            ),
        }
    }

    /// The coordinator arguments that select this store.
    pub fn coordinator_args(self) -> Vec<String> {
        vec!["--decision-store".into(), self.name().into()]
    }
}

impl Topology {
    /// `topology.decision_store`, parsed.
    pub fn parsed_decision_store(&self) -> Result<DecisionStore> {
        DecisionStore::parse("topology.decision_store", &self.decision_store)
    }

    /// `topology.standby` as shard indices, in the file's order; the error names the field and
    /// the entry (not a shard of this topology, or listed twice).
    pub fn standby_shards(&self) -> Result<Vec<usize>> {
        let mut shards = Vec::new();
        for name in &self.standby {
            let shard = super::schedule::parse_shard(name.trim(), self.shards)
                .with_context(|| format!("topology.standby: \"{name}\""))?;
            if shards.contains(&shard) {
                bail!("topology.standby lists \"{name}\" twice: a shard has at most one standby");
            }
            shards.push(shard);
        }
        Ok(shards)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Workload {
    /// Transactions to attempt in all.
    pub transactions: u64,
    pub concurrency: usize,
    /// Shards each transaction writes a marker on (at least 2 for a cross-shard commit).
    pub shards_per_txn: usize,
    pub seed: u64,
    /// The commit protocol of every transaction the workload begins: `two-phase` (default) or
    /// `three-phase` (`2pc` and `3pc` are accepted too: [`Protocol`]'s one parser).
    #[serde(deserialize_with = "protocol_field")]
    pub protocol: Protocol,
    /// How each transaction reaches the coordinator: `interactive` (default: `Begin`, one
    /// `Execute` per statement, `Commit`) or `submit` (one `Submit` carrying every statement, the
    /// one-shot path whose last statement per shard votes in the same participant call). See
    /// [`Workload::parsed_mode`].
    pub mode: String,
    /// The whole scenario (workload and steps) must finish within this many seconds.
    pub deadline_s: u64,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            transactions: 12,
            concurrency: 2,
            shards_per_txn: 3,
            seed: 1,
            protocol: Protocol::TwoPhase,
            mode: "interactive".into(),
            deadline_s: 60,
        }
    }
}

/// `workload.protocol` through [`Protocol`]'s one parser; the error names the field and the value.
fn protocol_field<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Protocol, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.parse()
        .map_err(|error| serde::de::Error::custom(format!("workload.protocol = \"{text}\": {error}")))
}

/// How the workload's transactions reach the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `Begin`, `Execute` per statement, `Commit` (or an occasional `Rollback`).
    Interactive,
    /// One `Submit` per transaction: on several shards each shard's last statement is sent as
    /// `ExecuteAndPrepare` (statement and vote in one call), on one shard as `ExecuteAndCommit`.
    Submit,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Interactive => "interactive",
            Mode::Submit => "submit",
        }
    }
}

impl Workload {
    /// `workload.mode`, parsed; the error names the field and the values it takes.
    pub fn parsed_mode(&self) -> Result<Mode> {
        match self.mode.trim() {
            "interactive" => Ok(Mode::Interactive),
            "submit" => Ok(Mode::Submit),
            other => bail!(
                "workload.mode = \"{other}\" is not a workload mode: expected \"interactive\" (the default) or \"submit\""
            ),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Expect {
    /// `pass` (no violation) or `violation` (the checker must find at least one).
    pub verdict: String,
    pub min_committed: u64,
    pub min_aborted: u64,
    /// Recovery must converge (nothing prepared, nothing in doubt) within this many seconds.
    pub converge_within_s: u64,
    /// What the `await-convergence` step must see while the coordinator is down: `true`, the
    /// participants finished every transaction without it (3PC); `false`, they did not within the
    /// step's `within_ms` (2PC blocks; 3PC's guard holds while a participant is cut off).
    /// Unset: not checked.
    pub converged_while_coordinator_down: Option<bool>,
    /// How every transaction in doubt when the `await-convergence` step began (a branch prepared
    /// on some shard) must stand when it ends: `committed` (on all its shards), `aborted` (on
    /// none), or `undecided` (every one of its branches still prepared: nobody decided).
    /// Unset: not checked.
    pub outcome_while_coordinator_down: Option<String>,
    /// Abort causes some client must have heard (in the answer to its Commit or Submit), e.g.
    /// `["concluded-abort"]`: another coordinator concluded abort before the decision branch
    /// committed. Names are `treaty.v1.AbortCause` values in kebab case ([`abort_cause_name`]).
    pub heard_abort_causes: Vec<String>,
}

/// `ABORT_CAUSE_CONCLUDED_ABORT` -> `concluded-abort`: how scenario files and reports name causes.
pub fn abort_cause_name(cause: treaty_proto::pb::AbortCause) -> String {
    cause
        .as_str_name()
        .trim_start_matches("ABORT_CAUSE_")
        .to_lowercase()
        .replace('_', "-")
}

/// A kebab-case abort cause from a scenario file, checked against the wire enum; the error lists
/// every name there is.
pub fn parse_abort_cause(text: &str) -> Result<treaty_proto::pb::AbortCause> {
    use treaty_proto::pb::AbortCause;
    let wire = format!("ABORT_CAUSE_{}", text.trim().to_uppercase().replace('-', "_"));
    match AbortCause::from_str_name(&wire) {
        Some(cause) if cause != AbortCause::Unspecified => Ok(cause),
        _ => {
            let names: Vec<String> = (1..=32)
                .filter_map(|n| AbortCause::try_from(n).ok())
                .map(abort_cause_name)
                .collect();
            bail!(
                "expect.heard_abort_causes: \"{text}\" is not an abort cause: expected one of {}",
                names.join(", ")
            )
        }
    }
}

/// `expect.outcome_while_coordinator_down`, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DownOutcome {
    Committed,
    Aborted,
    Undecided,
}

impl DownOutcome {
    pub fn parse(text: &str) -> Result<DownOutcome> {
        match text.trim() {
            "committed" => Ok(DownOutcome::Committed),
            "aborted" => Ok(DownOutcome::Aborted),
            "undecided" => Ok(DownOutcome::Undecided),
            other => bail!(
                "expect.outcome_while_coordinator_down = \"{other}\": expected \"committed\", \"aborted\" or \"undecided\""
            ),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DownOutcome::Committed => "committed",
            DownOutcome::Aborted => "aborted",
            DownOutcome::Undecided => "undecided",
        }
    }
}

impl Default for Expect {
    fn default() -> Self {
        Expect {
            verdict: "pass".into(),
            min_committed: 0,
            min_aborted: 0,
            converge_within_s: 60,
            converged_while_coordinator_down: None,
            outcome_while_coordinator_down: None,
            heard_abort_causes: Vec::new(),
        }
    }
}

/// One step of the fault schedule; steps run in order, each waiting for its trigger.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// `start`, `txns=N` (N transactions finished), `ms=N` (since the workload started),
    /// `+N` (N ms after the previous step), `exit=<process>` (it died),
    /// `fired=<failpoint>@<process>` (its log shows the failpoint fired).
    pub at: String,
    /// `arm`, `disarm`, `kill9`, `kill9-for-good` (a coordinator instance, never restarted:
    /// another instance must finish its transactions), `restart`, `pg-stop`, `pg-start`,
    /// `pg-failover` (`pg:<shard>` fails over to its `topology.standby`), `fault`,
    /// `partition`, `heal`, `await-convergence` (the coordinator is down: wait up to `within_ms` for the participants
    /// to finish without it, and record whether they did; nothing restarts it meanwhile).
    #[serde(rename = "do")]
    pub action: String,
    /// `coordinator` (the first instance), `coordinator-2`, `coordinator-3` (the others, with
    /// `topology.coordinators`), a shard name (its participant), `pg:<shard>`, or a link `a->b`
    /// for `fault`.
    #[serde(default)]
    pub target: Option<String>,
    #[serde(default)]
    pub failpoint: Option<String>,
    /// fail-rs actions for `arm`, e.g. `1*return(crash)`, `1*sleep(2000)`, `1*return(drop)`.
    #[serde(default)]
    pub actions: Option<String>,
    /// For `fault`: `none`, `drop`, `reset`, `delay=<ms>`.
    #[serde(default)]
    pub fault: Option<String>,
    /// For `partition`: the two sides, e.g. `[["coordinator"], ["s1"]]`.
    #[serde(default)]
    pub between: Option<[Vec<String>; 2]>,
    /// For `await-convergence`: the longest to wait, in milliseconds.
    #[serde(default)]
    pub within_ms: Option<u64>,
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let scenario: Scenario =
            toml::from_str(&text).with_context(|| format!("{} is not a valid scenario", path.display()))?;
        scenario
            .validate()
            .with_context(|| format!("{}: scenario `{}`", path.display(), scenario.name))?;
        Ok(scenario)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Scenario> {
        let scenario: Scenario = toml::from_str(text)?;
        scenario.validate()?;
        Ok(scenario)
    }

    fn error_of(text: &str) -> String {
        format!("{:#}", parse(text).unwrap_err())
    }

    #[test]
    fn the_workload_protocol_defaults_to_two_phase_and_names_the_field_when_wrong() {
        let scenario = parse("name = \"x\"").unwrap();
        assert_eq!(scenario.workload.protocol, Protocol::TwoPhase);
        for (text, protocol) in [
            ("two-phase", Protocol::TwoPhase),
            ("three-phase", Protocol::ThreePhase),
            ("2pc", Protocol::TwoPhase),
            ("3pc", Protocol::ThreePhase),
        ] {
            let scenario = parse(&format!("name = \"x\"\n[workload]\nprotocol = \"{text}\"")).unwrap();
            assert_eq!(scenario.workload.protocol, protocol, "{text}");
        }
        let error = error_of("name = \"x\"\n[workload]\nprotocol = \"four-phase\"");
        assert!(error.contains("workload.protocol"), "{error}");
        assert!(error.contains("four-phase"), "{error}");
        assert!(error.contains("three-phase"), "{error}");
    }

    #[test]
    fn the_workload_mode_defaults_to_interactive_and_names_the_field_when_wrong() {
        let scenario = parse("name = \"x\"").unwrap();
        assert_eq!(scenario.workload.parsed_mode().unwrap(), Mode::Interactive);
        for (text, mode) in [("interactive", Mode::Interactive), ("submit", Mode::Submit)] {
            let scenario = parse(&format!("name = \"x\"\n[workload]\nmode = \"{text}\"")).unwrap();
            assert_eq!(scenario.workload.parsed_mode().unwrap(), mode, "{text}");
        }
        let error = error_of("name = \"x\"\n[workload]\nmode = \"one-shot\"");
        assert!(error.contains("workload.mode = \"one-shot\""), "{error}");
        assert!(error.contains("\"interactive\""), "{error}");
        assert!(error.contains("\"submit\""), "{error}");
        // The mode is a string field: a bare word or a boolean is refused by the parser.
        assert!(parse("name = \"x\"\n[workload]\nmode = true").is_err());
    }

    #[test]
    fn a_bad_mode_in_a_file_names_the_file_and_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad-mode.toml");
        std::fs::write(&path, "name = \"x\"\n[workload]\nmode = \"Submit\"\n").unwrap();
        let error = format!("{:#}", Scenario::load(&path).unwrap_err());
        assert!(error.contains("bad-mode.toml"), "{error}");
        assert!(error.contains("workload.mode = \"Submit\""), "{error}");
    }

    #[test]
    fn a_bad_protocol_in_a_file_names_the_file_and_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad-protocol.toml");
        std::fs::write(&path, "name = \"x\"\n[workload]\nprotocol = \"paxos\"\n").unwrap();
        let error = format!("{:#}", Scenario::load(&path).unwrap_err());
        assert!(error.contains("bad-protocol.toml"), "{error}");
        assert!(error.contains("workload.protocol = \"paxos\""), "{error}");
        // The protocol is a string field: a number is refused by the parser.
        assert!(parse("name = \"x\"\n[workload]\nprotocol = 3").is_err());
    }

    #[test]
    fn every_scenario_file_in_the_repository_parses() {
        fn walk(dir: &Path, found: &mut Vec<std::path::PathBuf>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, found);
                } else if path.extension().is_some_and(|e| e == "toml") {
                    found.push(path);
                }
            }
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
        let mut files = Vec::new();
        walk(&root, &mut files);
        assert!(files.len() >= 60, "{} scenario files", files.len());
        for file in &files {
            Scenario::load(file).unwrap_or_else(|e| panic!("{e:#}"));
        }
        let three_phase: Vec<_> = files
            .iter()
            .filter(|f| f.parent().is_some_and(|p| p.ends_with("3pc")))
            .collect();
        assert!(three_phase.len() >= 5, "{three_phase:?}");
        for file in three_phase {
            let scenario = Scenario::load(file).unwrap();
            if !file.ends_with("two-phase-blocks-while-coordinator-down.toml") {
                assert_eq!(
                    scenario.workload.protocol,
                    Protocol::ThreePhase,
                    "{}",
                    file.display()
                );
            }
        }
        // The one-shot path has its own directory; everything else stays interactive.
        let mut submit = 0;
        for file in &files {
            let scenario = Scenario::load(file).unwrap();
            let in_submit_dir = file.parent().is_some_and(|p| p.ends_with("submit"));
            let wanted = if in_submit_dir {
                Mode::Submit
            } else {
                Mode::Interactive
            };
            assert_eq!(
                scenario.workload.parsed_mode().unwrap(),
                wanted,
                "{}",
                file.display()
            );
            submit += usize::from(in_submit_dir);
        }
        assert!(submit >= 4, "{submit} scenarios in scenarios/submit");
        // The decision-rows directory runs on the shard store; nothing else needs it.
        let decision_rows: Vec<_> = files
            .iter()
            .filter(|f| f.parent().is_some_and(|p| p.ends_with("decision-rows")))
            .collect();
        assert!(decision_rows.len() >= 10, "{decision_rows:?}");
        for file in decision_rows {
            let scenario = Scenario::load(file).unwrap();
            assert_eq!(
                scenario.topology.parsed_decision_store().unwrap(),
                DecisionStore::Shard,
                "{}",
                file.display()
            );
        }
        // The decision database fails over to its standby: s0, the decision shard of every
        // transaction (each writes every shard, and the first shard it writes is the lowest).
        let failover =
            Scenario::load(&root.join("decision-rows/decision-database-fails-over-to-its-standby.toml"))
                .unwrap();
        assert_eq!(failover.topology.standby_shards().unwrap(), [0]);
        assert_eq!(failover.workload.shards_per_txn, failover.topology.shards);
        let failovers: Vec<_> = failover
            .steps
            .iter()
            .map(|step| step.parsed_action(failover.topology.shards).unwrap())
            .filter(|action| *action == crate::scenario::schedule::Action::PgFailover(0))
            .collect();
        assert_eq!(failovers.len(), 1);
    }
}
