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
    /// `2pc` (default) or `3pc`.
    pub protocol: String,
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
            protocol: "2pc".into(),
            deadline_s: 60,
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
}

impl Default for Expect {
    fn default() -> Self {
        Expect {
            verdict: "pass".into(),
            min_committed: 0,
            min_aborted: 0,
            converge_within_s: 60,
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
    /// `arm`, `disarm`, `kill9`, `restart`, `pg-stop`, `pg-start`, `fault`, `partition`, `heal`.
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
        Ok(match self.action.as_str() {
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
            other => bail!(
                "unknown action `{other}`: expected arm, disarm, kill9, restart, pg-stop, pg-start, fault, partition or heal"
            ),
        })
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
        if !matches!(w.protocol.as_str(), "2pc" | "3pc") {
            bail!("workload.protocol must be 2pc or 3pc");
        }
        if !matches!(self.expect.verdict.as_str(), "pass" | "violation") {
            bail!("expect.verdict must be pass or violation");
        }
        // (process, failpoint) armed by an earlier step: a `fired=` trigger on anything else
        // could never fire, and the run would only end at its deadline.
        let mut armed: Vec<(Process, String)> = Vec::new();
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
            let needs_proxies = matches!(
                action,
                Action::Fault { .. } | Action::Partition(..) | Action::Heal
            );
            if needs_proxies && !t.proxies {
                bail!("step {}: `{}` needs topology.proxies = true", i + 1, step.action);
            }
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
}
