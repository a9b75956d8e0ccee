//! Running a scenario with in-process participants (`treaty scenario run --participants
//! in-process`): every shard is driven by the coordinator itself, so what a scenario does to a
//! participant process it does to the coordinator, the process that holds the participant's code.
//! Killing `s1` kills the coordinator and its participants with it; a participant failpoint is
//! armed in the coordinator's process (where it fires for whichever shard reaches that step
//! first) and seen in the coordinator's log.
//!
//! A participant's crash is then the coordinator's, so what a scenario expects clients to have
//! been told because the coordinator outlived it (`min_aborted`, `heard_abort_causes`) no longer
//! applies: those clients lose their coordinator and hear nothing. [`adapt`] drops those
//! expectations for such scenarios; the checker's verdict (atomicity, nothing left prepared,
//! convergence) and `min_committed` stand.
//!
//! Some scenarios test what only separate participant processes can do, and are skipped with the
//! reason: several coordinator instances over the same databases (one process drives each
//! database), three-phase commit (its participants finish without the coordinator), a standby
//! failover (it restarts the shard's agent on the promoted server), faults on a link between the
//! coordinator and a participant (there is none), and `await-convergence` (participants
//! finishing while the coordinator is down).

use super::schedule::{Action, Process, Trigger};
use super::spec::Scenario;
use treaty_proto::Protocol;

/// Why `scenario` cannot run with in-process participants, or `None` when it can.
pub fn obstacle(scenario: &Scenario) -> Option<String> {
    let t = &scenario.topology;
    if t.coordinators > 1 {
        return Some(format!(
            "{} coordinator instances: in process, one coordinator drives each database",
            t.coordinators
        ));
    }
    if scenario.workload.protocol == Protocol::ThreePhase {
        return Some("three-phase commit needs participant agents that outlive the coordinator".into());
    }
    if !t.standby.is_empty() {
        return Some(
            "a standby failover restarts the shard's participant agent on the promoted server".into(),
        );
    }
    for (index, step) in scenario.steps.iter().enumerate() {
        let n = index + 1;
        let Ok(action) = step.parsed_action(t.shards) else {
            // `validate` names it; nothing to skip for.
            continue;
        };
        match action {
            Action::Fault { from, to, .. } if !is_client_link(&from, &to) => {
                return Some(format!(
                    "step {n} faults the {from} -> {to} link, which does not exist in process"
                ));
            }
            Action::Partition(..) => {
                return Some(format!(
                    "step {n} partitions coordinator and participants, which share a process in process"
                ));
            }
            Action::AwaitConvergence { .. } => {
                return Some(format!(
                    "step {n} waits for participant agents to finish while the coordinator is down"
                ));
            }
            _ => {}
        }
    }
    None
}

fn is_client_link(from: &str, to: &str) -> bool {
    matches!((from, to), ("client", "coordinator") | ("coordinator", "client"))
}

/// `scenario` as it runs in process: when a step crashes a participant (kills it, or arms one of
/// its failpoints with `return(crash)`), the expectations about what the surviving coordinator
/// told its clients are dropped, and a note says so. A failpoint that only fails its step
/// (`return(error)`, a delay, a pause) crashes nothing, and the expectations stand.
pub fn adapt(mut scenario: Scenario) -> (Scenario, Option<String>) {
    let shards = scenario.topology.shards;
    let participant_crashes = scenario
        .steps
        .iter()
        .any(|step| match step.parsed_action(shards) {
            Ok(Action::Kill9(Process::Participant(_)) | Action::Kill9ForGood(Process::Participant(_))) => {
                true
            }
            Ok(Action::Arm {
                process: Process::Participant(_),
                actions,
                ..
            }) => crashes(&actions),
            _ => false,
        });
    let expect = &mut scenario.expect;
    if !participant_crashes || (expect.min_aborted == 0 && expect.heard_abort_causes.is_empty()) {
        return (scenario, None);
    }
    expect.min_aborted = 0;
    expect.heard_abort_causes.clear();
    (
        scenario,
        Some("a participant's crash is the coordinator's in process: what its clients were told is not checked".into()),
    )
}

/// Whether failpoint `actions` (fail-rs's `[p%][cnt*]task[(arg)]`, chained with `->`) may crash
/// the process: one of its tasks is `return(crash)`.
fn crashes(actions: &str) -> bool {
    actions
        .split("->")
        .any(|task| task.trim().rsplit(['*', '%']).next() == Some("return(crash)"))
}

/// The process that holds `process` in process: a participant is the coordinator.
fn holder(process: Process) -> Process {
    match process {
        Process::Participant(_) => Process::Coordinator,
        other => other,
    }
}

/// `trigger` as it reads in process.
pub fn trigger(trigger: Trigger) -> Trigger {
    match trigger {
        Trigger::Exit(process) => Trigger::Exit(holder(process)),
        Trigger::Fired { failpoint, process } => Trigger::Fired {
            failpoint,
            process: holder(process),
        },
        other => other,
    }
}

/// `action` as it reads in process.
pub fn action(action: Action) -> Action {
    match action {
        Action::Arm {
            process,
            failpoint,
            actions,
        } => Action::Arm {
            process: holder(process),
            failpoint,
            actions,
        },
        Action::Disarm(process) => Action::Disarm(holder(process)),
        Action::Kill9(process) => Action::Kill9(holder(process)),
        Action::Kill9ForGood(process) => Action::Kill9ForGood(holder(process)),
        Action::Restart(process) => Action::Restart(holder(process)),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(text: &str) -> Scenario {
        toml::from_str(text).expect("a scenario")
    }

    #[test]
    fn what_a_scenario_does_to_a_participant_it_does_to_the_coordinator() {
        assert_eq!(
            action(Action::Kill9(Process::Participant(1))),
            Action::Kill9(Process::Coordinator)
        );
        assert_eq!(
            trigger(Trigger::Fired {
                failpoint: "participant::after-prepare".into(),
                process: Process::Participant(2),
            }),
            Trigger::Fired {
                failpoint: "participant::after-prepare".into(),
                process: Process::Coordinator,
            }
        );
        assert_eq!(action(Action::PgStop(1)), Action::PgStop(1));
        assert_eq!(
            trigger(Trigger::Exit(Process::Postgres(0))),
            Trigger::Exit(Process::Postgres(0))
        );
    }

    /// A scenario expecting `expect` (TOML lines of `[expect]`) whose one step arms `failpoint`
    /// with `actions` on participant s1.
    fn armed_on_s1(expect: &str, failpoint: &str, actions: &str) -> Scenario {
        scenario(&format!(
            "name = \"x\"\n[expect]\n{expect}\n[[steps]]\nat = \"start\"\ndo = \"arm\"\n\
             target = \"s1\"\nfailpoint = \"{failpoint}\"\nactions = \"{actions}\""
        ))
    }

    #[test]
    fn a_participant_crash_drops_what_clients_of_a_surviving_coordinator_would_hear() {
        let crash = armed_on_s1(
            "min_aborted = 1\nmin_committed = 2",
            "participant::before-prepare-reply",
            "1*return(crash)",
        );
        let (adapted, note) = adapt(crash);
        assert_eq!(adapted.expect.min_aborted, 0);
        assert_eq!(adapted.expect.min_committed, 2);
        assert!(note.is_some());
        let coordinator = scenario(
            r#"name = "x"
               [expect]
               min_aborted = 1
               [[steps]]
               at = "start"
               do = "kill9"
               target = "coordinator""#,
        );
        let (adapted, note) = adapt(coordinator);
        assert_eq!(adapted.expect.min_aborted, 1);
        assert_eq!(note, None);
        // A participant failpoint that fails its step without crashing: the coordinator lives on
        // and its clients hear the abort, in process as with agents.
        let error = armed_on_s1(
            "min_aborted = 1\nheard_abort_causes = [\"vote_no\"]",
            "participant::before-prepare",
            "1*return(error)",
        );
        let (adapted, note) = adapt(error);
        assert_eq!(adapted.expect.min_aborted, 1);
        assert_eq!(adapted.expect.heard_abort_causes.len(), 1);
        assert_eq!(note, None);
    }

    #[test]
    fn only_a_crash_among_the_actions_crashes() {
        assert!(crashes("return(crash)"));
        assert!(crashes("1*return(crash)"));
        assert!(crashes("50%return(crash)"));
        assert!(crashes("1*sleep(100)->1*return(crash)"));
        assert!(!crashes("1*return(error)"));
        assert!(!crashes("pause"));
        assert!(!crashes("2*delay(50)->off"));
    }

    #[test]
    fn scenarios_that_need_agents_are_named_with_the_reason() {
        let plain = scenario(
            r#"name = "x"
               [[steps]]
               at = "start"
               do = "kill9"
               target = "s1""#,
        );
        assert_eq!(obstacle(&plain), None);
        let two = scenario(
            r#"name = "x"
               [topology]
               coordinators = 2
               decision_store = "shard""#,
        );
        assert!(obstacle(&two).is_some_and(|why| why.contains("2 coordinator instances")));
        let link = scenario(
            r#"name = "x"
               [[steps]]
               at = "start"
               do = "fault"
               target = "coordinator->s1"
               fault = "drop""#,
        );
        assert!(obstacle(&link).is_some_and(|why| why.contains("coordinator -> s1")));
        let client = scenario(
            r#"name = "x"
               [[steps]]
               at = "start"
               do = "fault"
               target = "client->coordinator"
               fault = "drop""#,
        );
        assert_eq!(obstacle(&client), None);
    }
}
