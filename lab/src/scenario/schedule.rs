//! A scenario step's schedule: when it fires (`Trigger`: `start`, `txns=N`, `ms=N`, `+N`,
//! `exit=<process>`, `fired=<failpoint>@<process>`), what it does (`Action`), and the processes
//! and proxy faults they name, parsed from a step's strings with the offending text in the error.

use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::spec::Step;

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
    /// The first coordinator instance: the one the workload's clients use.
    Coordinator,
    /// Another coordinator instance over the same shards (`topology.coordinators`), by its
    /// number: 2 is `coordinator-2`.
    OtherCoordinator(usize),
    Participant(usize),
    Postgres(usize),
}

impl std::fmt::Display for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Process::Coordinator => write!(f, "coordinator"),
            Process::OtherCoordinator(n) => write!(f, "coordinator-{n}"),
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
    /// kill -9 a coordinator instance if it still runs, and never restart it (the epilogue
    /// leaves it down): another instance must finish its transactions.
    Kill9ForGood(Process),
    Restart(Process),
    PgStop(usize),
    PgStart(usize),
    /// The shard's PostgreSQL fails over to its standby (`topology.standby`): the primary stops
    /// `-m immediate`, the standby is promoted, the shard's participant restarts on it, and from
    /// then on the promoted standby is that shard's PostgreSQL for every later step and the
    /// checker.
    PgFailover(usize),
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

/// The most coordinator instances a scenario (or chaos) runs.
pub const MAX_COORDINATORS: usize = 3;

impl Process {
    /// Whether this is a coordinator instance (the first or another).
    pub fn is_coordinator(&self) -> bool {
        matches!(self, Process::Coordinator | Process::OtherCoordinator(_))
    }
}

/// A shard name (`s0`, `s1`, ...) of a topology with `shards` shards, as its index.
pub fn parse_shard(name: &str, shards: usize) -> Result<usize> {
    let index = name
        .strip_prefix('s')
        .and_then(|n| n.parse::<usize>().ok())
        .with_context(|| format!("`{name}` is not a shard name (s0, s1, ...)"))?;
    if index >= shards {
        bail!("shard `{name}` does not exist: the topology has {shards} shards");
    }
    Ok(index)
}

pub fn parse_process(text: &str, shards: usize) -> Result<Process> {
    let shard = |name: &str| parse_shard(name, shards);
    if let Some(n) = text.strip_prefix("coordinator-") {
        return match n.parse::<usize>() {
            Ok(n @ 2..=MAX_COORDINATORS) => Ok(Process::OtherCoordinator(n)),
            _ => bail!(
                "`{text}` is not a coordinator instance: expected coordinator (the first), or coordinator-2 .. coordinator-{MAX_COORDINATORS}"
            ),
        };
    }
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
                Process::Coordinator | Process::OtherCoordinator(_) => {
                    bail!("`{}` needs a shard's PostgreSQL, e.g. pg:s1", self.action)
                }
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
            "kill9-for-good" => {
                let process = target()?;
                if !process.is_coordinator() {
                    bail!(
                        "`kill9-for-good` is for a coordinator instance (another finishes its transactions), not {process}"
                    );
                }
                Action::Kill9ForGood(process)
            }
            "restart" => Action::Restart(target()?),
            "pg-stop" => Action::PgStop(shard_of(target()?)?),
            "pg-start" => Action::PgStart(shard_of(target()?)?),
            "pg-failover" => Action::PgFailover(shard_of(target()?)?),
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
                "unknown action `{other}`: expected arm, disarm, kill9, kill9-for-good, restart, pg-stop, pg-start, pg-failover, fault, partition, heal or await-convergence"
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
        let mut s = step("start", "pg-failover");
        for target in ["pg:s0", "s0"] {
            s.target = Some(target.into());
            assert_eq!(s.parsed_action(3).unwrap(), Action::PgFailover(0), "{target}");
        }
        s.target = None;
        let error = s.parsed_action(3).unwrap_err().to_string();
        assert!(error.contains("`pg-failover` needs a target"), "{error}");
        let error = step("start", "explode").parsed_action(3).unwrap_err().to_string();
        assert!(error.contains("unknown action"), "{error}");
        assert!(error.contains("pg-failover"), "{error}");
        let error = step("start", "arm").parsed_action(3).unwrap_err().to_string();
        assert!(error.contains("failpoint"), "{error}");
    }

    #[test]
    fn other_coordinator_instances_are_named_by_number() {
        assert_eq!(
            parse_process("coordinator-2", 3).unwrap(),
            Process::OtherCoordinator(2)
        );
        assert_eq!(Process::OtherCoordinator(3).to_string(), "coordinator-3");
        for bad in ["coordinator-1", "coordinator-4", "coordinator-x"] {
            let error = parse_process(bad, 3).unwrap_err().to_string();
            assert!(error.contains("coordinator-2 .. coordinator-3"), "{bad}: {error}");
        }
        let mut s = step("start", "kill9-for-good");
        s.target = Some("coordinator-2".into());
        assert_eq!(
            s.parsed_action(3).unwrap(),
            Action::Kill9ForGood(Process::OtherCoordinator(2))
        );
        s.target = Some("s1".into());
        let error = s.parsed_action(3).unwrap_err().to_string();
        assert!(error.contains("is for a coordinator instance"), "{error}");
    }
}
