//! The scenario file format (TOML): topology, workload, a schedule of fault steps, and the expected
//! verdict. Parsing validates everything up front, so a typo fails before any cluster starts, with
//! the file and the step named.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

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
    pub coordinator_args: Vec<String>,
    pub participant_args: Vec<String>,
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            shards: 3,
            proxies: true,
            coordinator_args: Vec::new(),
            participant_args: Vec::new(),
        }
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
    /// `three-phase` (`2pc` and `3pc` are accepted too). See [`Workload::parsed_protocol`].
    pub protocol: String,
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
            protocol: "two-phase".into(),
            mode: "interactive".into(),
            deadline_s: 60,
        }
    }
}

/// The commit protocol a workload's transactions ask for at `Begin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    TwoPhase,
    ThreePhase,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::TwoPhase => "two-phase",
            Protocol::ThreePhase => "three-phase",
        }
    }

    /// `TransactionOptions.protocol`.
    pub fn wire(self) -> treaty_proto::pb::Protocol {
        match self {
            Protocol::TwoPhase => treaty_proto::pb::Protocol::TwoPhase,
            Protocol::ThreePhase => treaty_proto::pb::Protocol::ThreePhase,
        }
    }
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

    /// `workload.protocol`, parsed; the error names the field and the values it takes.
    pub fn parsed_protocol(&self) -> Result<Protocol> {
        match self.protocol.trim() {
            "two-phase" | "2pc" => Ok(Protocol::TwoPhase),
            "three-phase" | "3pc" => Ok(Protocol::ThreePhase),
            other => bail!(
                "workload.protocol = \"{other}\" is not a protocol: expected \"two-phase\" (the default) or \"three-phase\""
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
    /// `arm`, `disarm`, `kill9`, `restart`, `pg-stop`, `pg-start`, `fault`, `partition`, `heal`,
    /// `await-convergence` (the coordinator is down: wait up to `within_ms` for the participants
    /// to finish without it, and record whether they did; nothing restarts it meanwhile).
    #[serde(rename = "do")]
    pub action: String,
    /// `coordinator`, a shard name (its participant), `pg:<shard>`, or a link `a->b` for `fault`.
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

/// A parsed trigger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    Start,
    Txns(u64),
    Ms(u64),
    AfterPrevious(u64),
    Exit(Process),
    Fired { failpoint: String, process: Process },
}

/// A process of the local cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Process {
    Coordinator,
    Participant(usize),
    Postgres(usize),
}

impl std::fmt::Display for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Process::Coordinator => write!(f, "coordinator"),
            Process::Participant(i) => write!(f, "participant s{i}"),
            Process::Postgres(i) => write!(f, "PostgreSQL s{i}"),
        }
    }
}

/// A parsed step action.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Arm {
        process: Process,
        failpoint: String,
        actions: String,
    },
    Disarm(Process),
    Kill9(Process),
    Restart(Process),
    PgStop(usize),
    PgStart(usize),
    Fault {
        from: String,
        to: String,
        fault: treaty_harness::Fault,
    },
    Partition(Vec<String>, Vec<String>),
    Heal,
    /// The coordinator is down (and stays down): wait at most this long for the participants to
    /// converge without it.
    AwaitConvergence {
        within: Duration,
    },
}

pub fn parse_process(text: &str, shards: usize) -> Result<Process> {
    let shard = |name: &str| -> Result<usize> {
        let index = name
            .strip_prefix('s')
            .and_then(|n| n.parse::<usize>().ok())
            .with_context(|| format!("`{name}` is not a shard name (s0, s1, ...)"))?;
        if index >= shards {
            bail!("shard `{name}` does not exist: the topology has {shards} shards");
        }
        Ok(index)
    };
    match text {
        "coordinator" => Ok(Process::Coordinator),
        _ => match text.strip_prefix("pg:") {
            Some(name) => Ok(Process::Postgres(shard(name)?)),
            None => Ok(Process::Participant(shard(text)?)),
        },
    }
}

impl Step {
    pub fn trigger(&self, shards: usize) -> Result<Trigger> {
        let at = self.at.trim();
        let number = |n: &str| -> Result<u64> {
            n.trim()
                .parse()
                .with_context(|| format!("`{at}`: `{n}` is not a whole number"))
        };
        if at == "start" {
            return Ok(Trigger::Start);
        }
        if let Some(n) = at.strip_prefix('+') {
            return Ok(Trigger::AfterPrevious(number(n)?));
        }
        match at.split_once('=') {
            Some(("txns", n)) => Ok(Trigger::Txns(number(n)?)),
            Some(("ms", n)) => Ok(Trigger::Ms(number(n)?)),
            Some(("exit", process)) => Ok(Trigger::Exit(parse_process(process.trim(), shards)?)),
            Some(("fired", what)) => {
                let (failpoint, process) = what
                    .split_once('@')
                    .with_context(|| format!("`{at}`: expected fired=<failpoint>@<process>"))?;
                Ok(Trigger::Fired {
                    failpoint: failpoint.trim().into(),
                    process: parse_process(process.trim(), shards)?,
                })
            }
            _ => bail!(
                "unknown trigger `{at}`: expected start, txns=N, ms=N, +N, exit=<process> or fired=<failpoint>@<process>"
            ),
        }
    }

    pub fn parsed_action(&self, shards: usize) -> Result<Action> {
        let target = || -> Result<Process> {
            let target = self
                .target
                .as_deref()
                .with_context(|| format!("`{}` needs a target", self.action))?;
            parse_process(target, shards)
        };
        let shard_of = |process: Process| -> Result<usize> {
            match process {
                Process::Postgres(i) | Process::Participant(i) => Ok(i),
                Process::Coordinator => bail!("`{}` needs a shard's PostgreSQL, e.g. pg:s1", self.action),
            }
        };
        let action = match self.action.as_str() {
            "arm" => {
                let process = target()?;
                if matches!(process, Process::Postgres(_)) {
                    bail!("failpoints live in Treaty processes, not in PostgreSQL");
                }
                Action::Arm {
                    process,
                    failpoint: self.failpoint.clone().context("`arm` needs `failpoint`")?,
                    actions: self
                        .actions
                        .clone()
                        .context("`arm` needs `actions`, e.g. \"1*return(crash)\"")?,
                }
            }
            "disarm" => Action::Disarm(target()?),
            "kill9" => Action::Kill9(target()?),
            "restart" => Action::Restart(target()?),
            "pg-stop" => Action::PgStop(shard_of(target()?)?),
            "pg-start" => Action::PgStart(shard_of(target()?)?),
            "fault" => {
                let link = self
                    .target
                    .as_deref()
                    .context("`fault` needs a link target like coordinator->s1")?;
                let (from, to) = link
                    .split_once("->")
                    .with_context(|| format!("`{link}` is not a link: expected from->to"))?;
                let fault = parse_fault(self.fault.as_deref().context("`fault` needs `fault`")?)?;
                Action::Fault {
                    from: from.trim().into(),
                    to: to.trim().into(),
                    fault,
                }
            }
            "partition" => {
                let [a, b] = self
                    .between
                    .clone()
                    .context("`partition` needs `between = [[...], [...]]`")?;
                Action::Partition(a, b)
            }
            "heal" => Action::Heal,
            "await-convergence" => {
                if let Some(target) = self.target.as_deref()
                    && target != "coordinator"
                {
                    bail!(
                        "`await-convergence` watches the participants while the coordinator is down; its target can only be `coordinator`, not `{target}`"
                    );
                }
                let within_ms = self.within_ms.context(
                    "`await-convergence` needs `within_ms`, the longest to wait for the participants (e.g. 6000)",
                )?;
                if within_ms == 0 {
                    bail!("`await-convergence`: within_ms must be at least 1");
                }
                Action::AwaitConvergence {
                    within: Duration::from_millis(within_ms),
                }
            }
            other => bail!(
                "unknown action `{other}`: expected arm, disarm, kill9, restart, pg-stop, pg-start, fault, partition, heal or await-convergence"
            ),
        };
        if self.within_ms.is_some() && !matches!(action, Action::AwaitConvergence { .. }) {
            bail!(
                "`within_ms` is only for `await-convergence`, not `{}`",
                self.action
            );
        }
        Ok(action)
    }
}

pub fn parse_fault(text: &str) -> Result<treaty_harness::Fault> {
    use treaty_harness::Fault;
    Ok(match text.trim() {
        "none" => Fault::None,
        "drop" => Fault::Drop,
        "reset" => Fault::Reset,
        other => match other.strip_prefix("delay=") {
            Some(ms) => Fault::Delay(Duration::from_millis(
                ms.parse()
                    .with_context(|| format!("`{other}`: delay needs milliseconds"))?,
            )),
            None => bail!("unknown fault `{other}`: expected none, drop, reset or delay=<ms>"),
        },
    })
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

    pub fn validate(&self) -> Result<()> {
        let t = &self.topology;
        let w = &self.workload;
        if !(1..=8).contains(&t.shards) {
            bail!("topology.shards must be between 1 and 8");
        }
        if w.shards_per_txn == 0 || w.shards_per_txn > t.shards {
            bail!("workload.shards_per_txn must be between 1 and topology.shards");
        }
        if !(1..=64).contains(&w.concurrency) {
            bail!("workload.concurrency must be between 1 and 64");
        }
        if w.transactions > 100_000 {
            bail!("workload.transactions is bounded at 100000");
        }
        if !(1..=3600).contains(&w.deadline_s) {
            bail!("workload.deadline_s must be between 1 and 3600");
        }
        w.parsed_protocol()?;
        w.parsed_mode()?;
        if !matches!(self.expect.verdict.as_str(), "pass" | "violation") {
            bail!("expect.verdict must be pass or violation");
        }
        // (process, failpoint) armed by an earlier step: a `fired=` trigger on anything else
        // could never fire, and the run would only end at its deadline.
        let mut armed: Vec<(Process, String)> = Vec::new();
        // Whether an earlier step takes the coordinator down (a crash armed, or kill -9) with no
        // restart since: `await-convergence` needs it down.
        let mut coordinator_goes_down = false;
        let mut awaits = 0;
        for (i, step) in self.steps.iter().enumerate() {
            let trigger = step
                .trigger(t.shards)
                .with_context(|| format!("step {}", i + 1))?;
            if let Trigger::Fired { failpoint, process } = &trigger
                && !armed.iter().any(|(p, f)| p == process && f == failpoint)
            {
                bail!(
                    "step {}: `fired={failpoint}@{process}` waits for a failpoint no earlier step arms on {process}",
                    i + 1
                );
            }
            let action = step
                .parsed_action(t.shards)
                .with_context(|| format!("step {}", i + 1))?;
            if let Action::Arm {
                process, failpoint, ..
            } = &action
            {
                let side = if matches!(process, Process::Coordinator) {
                    "coordinator::"
                } else {
                    "participant::"
                };
                if !failpoint.starts_with(side) {
                    bail!(
                        "step {}: {failpoint} is not a failpoint of {process} (its failpoints start with `{side}`; see docs/failpoints.md)",
                        i + 1
                    );
                }
                armed.push((process.clone(), failpoint.clone()));
            }
            match &action {
                Action::Kill9(Process::Coordinator) => coordinator_goes_down = true,
                Action::Arm {
                    process: Process::Coordinator,
                    failpoint,
                    actions,
                } if actions.contains("return(crash)")
                    || failpoint == "coordinator::log-loses-unsynced-tail" =>
                {
                    coordinator_goes_down = true
                }
                Action::Restart(Process::Coordinator) => coordinator_goes_down = false,
                Action::AwaitConvergence { within } => {
                    awaits += 1;
                    if awaits > 1 {
                        bail!("step {}: only one `await-convergence` step per scenario", i + 1);
                    }
                    if !coordinator_goes_down {
                        bail!(
                            "step {}: `await-convergence` watches the participants while the coordinator is down, \
                             but no earlier step takes it down (arm a coordinator failpoint with \"1*return(crash)\", \
                             or kill9 it, and do not restart it before this step)",
                            i + 1
                        );
                    }
                    if within.as_millis() > u128::from(w.deadline_s) * 1000 {
                        bail!(
                            "step {}: within_ms = {} is longer than the scenario's workload.deadline_s = {}",
                            i + 1,
                            within.as_millis(),
                            w.deadline_s
                        );
                    }
                }
                _ => {}
            }
            let needs_proxies = matches!(
                action,
                Action::Fault { .. } | Action::Partition(..) | Action::Heal
            );
            if needs_proxies && !t.proxies {
                bail!("step {}: `{}` needs topology.proxies = true", i + 1, step.action);
            }
        }
        let e = &self.expect;
        let outcome = e
            .outcome_while_coordinator_down
            .as_deref()
            .map(DownOutcome::parse)
            .transpose()?;
        if awaits == 0 {
            if e.converged_while_coordinator_down.is_some() {
                bail!("expect.converged_while_coordinator_down needs an `await-convergence` step");
            }
            if outcome.is_some() {
                bail!("expect.outcome_while_coordinator_down needs an `await-convergence` step");
            }
        }
        if outcome == Some(DownOutcome::Undecided) && e.converged_while_coordinator_down == Some(true) {
            bail!(
                "expect.outcome_while_coordinator_down = \"undecided\" contradicts \
                 expect.converged_while_coordinator_down = true (undecided branches stay prepared)"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(at: &str, action: &str) -> Step {
        Step {
            at: at.into(),
            action: action.into(),
            target: Some("coordinator".into()),
            failpoint: None,
            actions: None,
            fault: None,
            between: None,
            within_ms: None,
        }
    }

    #[test]
    fn triggers_parse_and_bad_ones_are_named() {
        assert_eq!(step("start", "kill9").trigger(3).unwrap(), Trigger::Start);
        assert_eq!(step("txns=4", "kill9").trigger(3).unwrap(), Trigger::Txns(4));
        assert_eq!(
            step("+250", "kill9").trigger(3).unwrap(),
            Trigger::AfterPrevious(250)
        );
        assert_eq!(
            step("exit=s2", "kill9").trigger(3).unwrap(),
            Trigger::Exit(Process::Participant(2))
        );
        assert_eq!(
            step("fired=participant::after-prepare@s1", "kill9")
                .trigger(3)
                .unwrap(),
            Trigger::Fired {
                failpoint: "participant::after-prepare".into(),
                process: Process::Participant(1)
            }
        );
        let error = step("exit=s3", "kill9").trigger(3).unwrap_err().to_string();
        assert!(error.contains("does not exist"), "{error}");
        let error = step("soon", "kill9").trigger(3).unwrap_err().to_string();
        assert!(error.contains("unknown trigger"), "{error}");
    }

    #[test]
    fn actions_parse_and_bad_ones_are_named() {
        let mut s = step("start", "pg-stop");
        s.target = Some("pg:s1".into());
        assert_eq!(s.parsed_action(3).unwrap(), Action::PgStop(1));
        let mut s = step("start", "fault");
        s.target = Some("coordinator->s0".into());
        s.fault = Some("delay=30".into());
        assert!(matches!(s.parsed_action(3).unwrap(), Action::Fault { .. }));
        let error = step("start", "explode").parsed_action(3).unwrap_err().to_string();
        assert!(error.contains("unknown action"), "{error}");
        let error = step("start", "arm").parsed_action(3).unwrap_err().to_string();
        assert!(error.contains("failpoint"), "{error}");
    }

    #[test]
    fn a_whole_file_parses_and_unknown_keys_are_refused() {
        let text = r#"
            name = "x"
            [workload]
            transactions = 4
            [[steps]]
            at = "start"
            do = "arm"
            target = "coordinator"
            failpoint = "coordinator::after-commit-decision"
            actions = "1*return(crash)"
        "#;
        let scenario: Scenario = toml::from_str(text).unwrap();
        scenario.validate().unwrap();
        assert!(toml::from_str::<Scenario>("name = \"x\"\nshardz = 3").is_err());
    }

    #[test]
    fn a_trigger_on_a_failpoint_never_armed_or_armed_on_the_wrong_process_is_refused() {
        let parse = |steps: &str| -> Result<()> {
            let scenario: Scenario = toml::from_str(&format!("name = \"x\"\n{steps}"))?;
            scenario.validate()
        };
        let never_armed = r#"
            [[steps]]
            at = "fired=coordinator::after-commit-decision@coordinator"
            do = "kill9"
            target = "s0"
        "#;
        let error = format!("{:#}", parse(never_armed).unwrap_err());
        assert!(error.contains("no earlier step arms"), "{error}");
        let wrong_side = r#"
            [[steps]]
            at = "start"
            do = "arm"
            target = "s1"
            failpoint = "coordinator::after-commit-decision"
            actions = "1*return(crash)"
        "#;
        let error = format!("{:#}", parse(wrong_side).unwrap_err());
        assert!(error.contains("is not a failpoint of"), "{error}");
    }

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
        assert_eq!(scenario.workload.parsed_protocol().unwrap(), Protocol::TwoPhase);
        for (text, protocol) in [
            ("two-phase", Protocol::TwoPhase),
            ("three-phase", Protocol::ThreePhase),
            ("2pc", Protocol::TwoPhase),
            ("3pc", Protocol::ThreePhase),
        ] {
            let scenario = parse(&format!("name = \"x\"\n[workload]\nprotocol = \"{text}\"")).unwrap();
            assert_eq!(scenario.workload.parsed_protocol().unwrap(), protocol, "{text}");
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
        std::fs::write(&path, "name = \"x\"\n[workload]\nprotocol = \"3PC\"\n").unwrap();
        let error = format!("{:#}", Scenario::load(&path).unwrap_err());
        assert!(error.contains("bad-protocol.toml"), "{error}");
        assert!(error.contains("workload.protocol = \"3PC\""), "{error}");
    }

    const CRASH_AND_AWAIT: &str = r#"
        name = "x"
        [workload]
        protocol = "three-phase"
        transactions = 3
        concurrency = 1
        deadline_s = 60
        [expect]
        converged_while_coordinator_down = true
        outcome_while_coordinator_down = "committed"
        [[steps]]
        at = "start"
        do = "arm"
        target = "coordinator"
        failpoint = "coordinator::after-some-pre-commits"
        actions = "1*return(crash)"
        [[steps]]
        at = "exit=coordinator"
        do = "await-convergence"
        within_ms = 6000
        [[steps]]
        at = "+0"
        do = "restart"
        target = "coordinator"
    "#;

    #[test]
    fn a_crash_the_coordinator_stays_down_for_parses() {
        let scenario = parse(CRASH_AND_AWAIT).unwrap();
        assert_eq!(
            scenario.steps[1].parsed_action(3).unwrap(),
            Action::AwaitConvergence {
                within: Duration::from_millis(6000)
            }
        );
        assert_eq!(scenario.expect.converged_while_coordinator_down, Some(true));
        assert_eq!(
            DownOutcome::parse(scenario.expect.outcome_while_coordinator_down.as_deref().unwrap()).unwrap(),
            DownOutcome::Committed
        );
        // kill -9 takes it down too.
        let killed = CRASH_AND_AWAIT.replace(
            "do = \"arm\"\n        target = \"coordinator\"\n        failpoint = \"coordinator::after-some-pre-commits\"\n        actions = \"1*return(crash)\"",
            "do = \"kill9\"\n        target = \"coordinator\"",
        );
        assert!(killed.contains("kill9"));
        parse(&killed).unwrap();
    }

    #[test]
    fn await_convergence_mistakes_are_refused_with_the_field_named() {
        let cases: [(&str, &str, &str); 9] = [
            ("within_ms = 6000", "", "needs `within_ms`"),
            ("within_ms = 6000", "within_ms = 0", "at least 1"),
            (
                "within_ms = 6000",
                "within_ms = 61000",
                "longer than the scenario's workload.deadline_s",
            ),
            (
                "within_ms = 6000",
                "within_ms = 6000\n        target = \"s1\"",
                "its target can only be `coordinator`",
            ),
            ("1*return(crash)", "1*sleep(100)", "no earlier step takes it down"),
            (
                "outcome_while_coordinator_down = \"committed\"",
                "outcome_while_coordinator_down = \"done\"",
                "expect.outcome_while_coordinator_down = \"done\"",
            ),
            (
                "outcome_while_coordinator_down = \"committed\"",
                "outcome_while_coordinator_down = \"undecided\"",
                "contradicts",
            ),
            (
                "do = \"restart\"",
                "do = \"restart\"\n        within_ms = 5",
                "`within_ms` is only for `await-convergence`",
            ),
            (
                "[[steps]]\n        at = \"exit=coordinator\"",
                "[[steps]]\n        at = \"+0\"\n        do = \"restart\"\n        target = \"coordinator\"\n        [[steps]]\n        at = \"exit=coordinator\"",
                "no earlier step takes it down",
            ),
        ];
        for (from, to, wanted) in cases {
            assert!(CRASH_AND_AWAIT.contains(from), "{from}");
            let error = error_of(&CRASH_AND_AWAIT.replacen(from, to, 1));
            assert!(error.contains(wanted), "{from} -> {to}: {error}");
        }
        let twice = format!(
            "{CRASH_AND_AWAIT}\n        [[steps]]\n        at = \"+0\"\n        do = \"await-convergence\"\n        within_ms = 10"
        );
        assert!(error_of(&twice).contains("only one `await-convergence`"));
        let no_step = r#"
            name = "x"
            [expect]
            converged_while_coordinator_down = false
        "#;
        let error = error_of(no_step);
        assert!(
            error.contains("expect.converged_while_coordinator_down needs an `await-convergence` step"),
            "{error}"
        );
        let error = error_of(&no_step.replace(
            "converged_while_coordinator_down = false",
            "outcome_while_coordinator_down = \"aborted\"",
        ));
        assert!(
            error.contains("expect.outcome_while_coordinator_down needs"),
            "{error}"
        );
        let error = error_of(&no_step.replace(
            "converged_while_coordinator_down = false",
            "converged_while_down = false",
        ));
        assert!(error.contains("unknown field"), "{error}");
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
                    scenario.workload.parsed_protocol().unwrap(),
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
    }
}
