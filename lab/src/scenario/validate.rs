//! Checking a parsed scenario as a whole before anything runs: bounds on topology and workload,
//! every step's trigger and action, failpoints armed on the process they belong to, `fired=`
//! triggers that can fire, the `await-convergence` step with its expectations, the decision
//! store with the coordinator instances steps may name, and `pg-failover` only onto a standby the
//! topology starts, once per shard.

use anyhow::{Context, Result, bail};

use super::schedule::{Action, MAX_COORDINATORS, Process, Trigger};
use super::spec::{DecisionStore, DownOutcome, Scenario, parse_abort_cause};

/// The process a trigger waits on, if any.
fn trigger_process(trigger: &Trigger) -> Option<&Process> {
    match trigger {
        Trigger::Exit(process) | Trigger::Fired { process, .. } => Some(process),
        _ => None,
    }
}

/// The process an action acts on, if any.
fn action_process(action: &Action) -> Option<&Process> {
    match action {
        Action::Arm { process, .. }
        | Action::Disarm(process)
        | Action::Kill9(process)
        | Action::Kill9ForGood(process)
        | Action::Restart(process) => Some(process),
        _ => None,
    }
}

impl Scenario {
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
        w.parsed_mode()?;
        let store = t.parsed_decision_store()?;
        if !(1..=MAX_COORDINATORS).contains(&t.coordinators) {
            bail!("topology.coordinators must be between 1 and {MAX_COORDINATORS}");
        }
        if t.coordinators > 1 && store != DecisionStore::Shard {
            bail!(
                "topology.coordinators = {} needs topology.decision_store = \"shard\": with the file store only the \
                 coordinator that logged a decision can finish its transaction",
                t.coordinators
            );
        }
        if t.coordinators == 1 && !t.other_coordinator_args.is_empty() {
            bail!("topology.other_coordinator_args needs topology.coordinators of 2 or more");
        }
        for cause in &self.expect.heard_abort_causes {
            parse_abort_cause(cause)?;
        }
        let standby_shards = t.standby_shards()?;
        // Shards failed over to their standby, by the step that did it.
        let mut failed_over: Vec<(usize, usize)> = Vec::new();
        // Coordinator instances killed for good, by the step that did it.
        let mut killed_for_good: Vec<(Process, usize)> = Vec::new();
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
            for process in trigger_process(&trigger)
                .into_iter()
                .chain(action_process(&action))
            {
                if let Process::OtherCoordinator(n) = process
                    && *n > t.coordinators
                {
                    bail!(
                        "step {}: {process} does not exist: topology.coordinators = {}",
                        i + 1,
                        t.coordinators
                    );
                }
            }
            match &action {
                Action::Kill9ForGood(process) => {
                    if t.coordinators < 2 {
                        bail!(
                            "step {}: `kill9-for-good` leaves {process} down, but no other coordinator instance would \
                             finish its transactions (set topology.coordinators = 2 and decision_store = \"shard\")",
                            i + 1
                        );
                    }
                    killed_for_good.push((process.clone(), i + 1));
                    if killed_for_good.len() >= t.coordinators {
                        bail!(
                            "step {}: every coordinator instance would be killed for good",
                            i + 1
                        );
                    }
                }
                Action::Restart(process) | Action::Arm { process, .. } | Action::Disarm(process) => {
                    if let Some((_, by)) = killed_for_good.iter().find(|(p, _)| p == process) {
                        bail!(
                            "step {}: {process} was killed for good by step {by}; nothing may restart or reach it",
                            i + 1
                        );
                    }
                }
                _ => {}
            }
            if let Action::PgFailover(shard) = &action {
                if !standby_shards.contains(shard) {
                    bail!(
                        "step {}: `pg-failover` on pg:s{shard} needs a standby of s{shard} to promote, and \
                         topology.standby does not list s{shard} (add standby = [\"s{shard}\"] to [topology])",
                        i + 1
                    );
                }
                if let Some((_, by)) = failed_over.iter().find(|(s, _)| s == shard) {
                    bail!(
                        "step {}: pg:s{shard} already failed over to its standby at step {by}; the promoted \
                         standby has no standby of its own to fail over to",
                        i + 1
                    );
                }
                failed_over.push((*shard, i + 1));
            }
            if let Action::Arm {
                process, failpoint, ..
            } = &action
            {
                let side = if process.is_coordinator() {
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
                Action::Kill9(Process::Coordinator) | Action::Kill9ForGood(Process::Coordinator) => {
                    coordinator_goes_down = true
                }
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
    use std::time::Duration;

    use super::*;

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

    const TWO_COORDINATORS: &str = r#"
        name = "x"
        [topology]
        decision_store = "shard"
        coordinators = 2
        other_coordinator_args = ["--takeover-after-ms", "500"]
        [workload]
        concurrency = 1
        [expect]
        heard_abort_causes = ["concluded-abort"]
        [[steps]]
        at = "start"
        do = "arm"
        target = "coordinator-2"
        failpoint = "coordinator::before-commit-decision"
        actions = "1*sleep(10)"
        [[steps]]
        at = "txns=2"
        do = "kill9-for-good"
        target = "coordinator"
    "#;

    #[test]
    fn the_decision_store_is_file_or_shard_and_a_bad_one_names_the_choices() {
        // Unset: the coordinator's own default.
        let scenario = parse("name = \"x\"").unwrap();
        assert_eq!(
            scenario.topology.parsed_decision_store().unwrap(),
            DecisionStore::Shard
        );
        let scenario = parse("name = \"x\"\n[topology]\ndecision_store = \"file\"").unwrap();
        assert_eq!(
            scenario.topology.parsed_decision_store().unwrap(),
            DecisionStore::File
        );
        let error = error_of("name = \"x\"\n[topology]\ndecision_store = \"postgres\"");
        assert!(
            error.contains("topology.decision_store = \"postgres\""),
            "{error}"
        );
        assert!(
            error.contains("\"file\"") && error.contains("\"shard\""),
            "{error}"
        );
        // The CLI flags share the parser's names.
        use clap::ValueEnum;
        let names: Vec<String> = DecisionStore::value_variants()
            .iter()
            .map(|v| v.name().to_string())
            .collect();
        assert_eq!(names, ["file", "shard"]);
    }

    #[test]
    fn other_coordinator_instances_need_the_shard_store_and_steps_name_only_those_that_exist() {
        let scenario = parse(TWO_COORDINATORS).unwrap();
        assert_eq!(scenario.topology.coordinators, 2);
        let cases: [(&str, &str, &str); 6] = [
            (
                "decision_store = \"shard\"",
                "decision_store = \"file\"",
                "needs topology.decision_store = \"shard\"",
            ),
            ("coordinators = 2", "coordinators = 4", "between 1 and 3"),
            (
                "target = \"coordinator-2\"",
                "target = \"coordinator-3\"",
                "coordinator-3 does not exist: topology.coordinators = 2",
            ),
            (
                "coordinators = 2\n",
                "coordinators = 1\n",
                "topology.other_coordinator_args needs",
            ),
            (
                "target = \"coordinator\"",
                "target = \"coordinator-2\"\n        [[steps]]\n        at = \"+0\"\n        do = \"restart\"\n        target = \"coordinator-2\"",
                "was killed for good by step 2",
            ),
            (
                "[\"concluded-abort\"]",
                "[\"concluded\"]",
                "\"concluded\" is not an abort cause: expected one of client-rollback",
            ),
        ];
        for (from, to, wanted) in cases {
            assert!(TWO_COORDINATORS.contains(from), "{from}");
            let error = error_of(&TWO_COORDINATORS.replacen(from, to, 1));
            assert!(error.contains(wanted), "{from} -> {to}: {error}");
        }
        // Killed for good with no other instance left to finish its transactions.
        let alone = r#"
            name = "x"
            [[steps]]
            at = "start"
            do = "kill9-for-good"
            target = "coordinator"
        "#;
        assert!(error_of(alone).contains("no other coordinator instance"));
    }

    #[test]
    fn abort_causes_read_as_the_wire_names_them() {
        use treaty_proto::pb::AbortCause;
        assert_eq!(
            crate::scenario::spec::abort_cause_name(AbortCause::ConcludedAbort),
            "concluded-abort"
        );
        assert_eq!(
            parse_abort_cause("concluded-abort").unwrap(),
            AbortCause::ConcludedAbort
        );
        assert!(parse_abort_cause("unspecified").is_err());
    }

    const FAILOVER: &str = r#"
        name = "x"
        [topology]
        decision_store = "shard"
        standby = ["s0"]
        [workload]
        transactions = 20
        [[steps]]
        at = "txns=5"
        do = "pg-failover"
        target = "pg:s0"
    "#;

    #[test]
    fn a_failover_onto_the_standby_the_topology_starts_parses() {
        let scenario = parse(FAILOVER).unwrap();
        assert_eq!(scenario.topology.standby_shards().unwrap(), [0]);
        assert_eq!(scenario.steps[0].parsed_action(3).unwrap(), Action::PgFailover(0));
        // Without the key there are no standbys.
        assert!(
            parse("name = \"x\"")
                .unwrap()
                .topology
                .standby_shards()
                .unwrap()
                .is_empty()
        );
        // After the failover the shard's PostgreSQL is the promoted standby: crashing and
        // restarting it, or restarting its participant, are ordinary steps.
        let later = format!(
            "{FAILOVER}\n        [[steps]]\n        at = \"+100\"\n        do = \"pg-stop\"\n        target = \"pg:s0\"\n        \
             [[steps]]\n        at = \"+100\"\n        do = \"pg-start\"\n        target = \"pg:s0\"\n        \
             [[steps]]\n        at = \"+100\"\n        do = \"restart\"\n        target = \"s0\""
        );
        parse(&later).unwrap();
    }

    #[test]
    fn failover_mistakes_are_refused_naming_the_shard_and_the_field() {
        let cases: [(&str, &str, &str); 6] = [
            (
                "target = \"pg:s0\"",
                "target = \"pg:s1\"",
                "`pg-failover` on pg:s1 needs a standby of s1 to promote, and topology.standby does not list s1",
            ),
            (
                "standby = [\"s0\"]",
                "",
                "`pg-failover` on pg:s0 needs a standby of s0",
            ),
            (
                "standby = [\"s0\"]",
                "standby = [\"s3\"]",
                "topology.standby: \"s3\": shard `s3` does not exist: the topology has 3 shards",
            ),
            (
                "standby = [\"s0\"]",
                "standby = [\"pg:s0\"]",
                "topology.standby: \"pg:s0\": `pg:s0` is not a shard name",
            ),
            (
                "standby = [\"s0\"]",
                "standby = [\"s0\", \"s0\"]",
                "topology.standby lists \"s0\" twice",
            ),
            (
                "target = \"pg:s0\"",
                "target = \"coordinator\"",
                "`pg-failover` needs a shard's PostgreSQL",
            ),
        ];
        for (from, to, wanted) in cases {
            assert!(FAILOVER.contains(from), "{from}");
            let error = error_of(&FAILOVER.replacen(from, to, 1));
            assert!(error.contains(wanted), "{from} -> {to}: {error}");
        }
        // A promoted standby has no standby of its own: one failover per shard.
        let twice = format!(
            "{FAILOVER}\n        [[steps]]\n        at = \"+100\"\n        do = \"pg-failover\"\n        target = \"pg:s0\""
        );
        let error = error_of(&twice);
        assert!(
            error.contains("step 2: pg:s0 already failed over to its standby at step 1"),
            "{error}"
        );
    }
}
