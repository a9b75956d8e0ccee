//! A deterministic simulation of the real coordinator (issue 14, item 6): the production driver
//! (`treaty_coordinator::driver`) against an in-memory decision store (`store.rs`) and in-memory
//! participants behind a faulty network (`participants.rs`, `transport.rs`, `faults.rs`; the participants' own 3PC termination in `three_phase.rs`), under a seeded scheduler
//! on virtual time (`run.rs`, the clients and operators in `workload.rs`), checked after every seed (`checker.rs`). A failing seed prints its
//! number, the command that replays it, and its trace (`trace.rs`).
//!
//! - `cargo test -p treaty-coordinator --test simulation`: 10,000 seeds (0..10000), on every core;
//! - `SIM_SEEDS=<n>`: n seeds; `SIM_FIRST_SEED=<k>`: start at seed k;
//! - `SIM_SEED=<n>`: seed n alone (`SIM_TRACE=1` prints its trace even when it passes);
//! - `SIM_REPLAY_SEEDS=<n>`: the replay test runs seeds 0..n twice each (default: a few).

mod checker;
mod decision_rows;
mod faults;
mod participants;
mod run;
mod store;
mod three_phase;
mod trace;
mod transport;
mod workload;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

const DEFAULT_SEEDS: u64 = 10_000;

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
    )
}

fn failure_message(seed: u64, failure: &run::Failure) -> String {
    format!(
        "simulation seed {seed} failed:\n  - {}\nreplay it with:\n  SIM_SEED={seed} cargo test -p treaty-coordinator --test simulation\ntrace of seed {seed}:\n{}",
        failure.violations.join("\n  - "),
        failure.trace
    )
}

#[test]
fn simulation_of_the_real_coordinator_over_many_seeds() {
    if let Some(seed) = env_u64("SIM_SEED") {
        let report = run::run_seed(seed);
        if std::env::var_os("SIM_TRACE").is_some() {
            println!("{}", report.trace.render());
        }
        if let Some(failure) = &report.failure {
            panic!("{}", failure_message(seed, failure));
        }
        println!("1 seeds (seed {seed} passed, {} events)", report.trace.len());
        return;
    }
    let count = env_u64("SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
    let first = env_u64("SIM_FIRST_SEED").unwrap_or(0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let next = AtomicU64::new(first);
    let done = AtomicU64::new(0);
    let transactions = AtomicU64::new(0);
    let hazards: Mutex<Vec<(u64, String)>> = Mutex::new(Vec::new());
    let exercised: Vec<AtomicU64> = run::EXERCISED.iter().map(|_| AtomicU64::new(0)).collect();
    let stop = AtomicBool::new(false);
    let failures: Mutex<Vec<(u64, run::Failure)>> = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= first + count {
                        return;
                    }
                    let report = run::run_seed(seed);
                    transactions.fetch_add(report.transactions as u64, Ordering::Relaxed);
                    done.fetch_add(1, Ordering::Relaxed);
                    for (total, count) in exercised.iter().zip(&report.exercised) {
                        total.fetch_add(*count, Ordering::Relaxed);
                    }
                    hazards
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .extend(report.hazards.iter().map(|gid| (seed, gid.clone())));
                    if let Some(failure) = report.failure {
                        stop.store(true, Ordering::Relaxed);
                        failures
                            .lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner())
                            .push((seed, failure));
                    }
                }
            });
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let done = done.load(Ordering::Relaxed);
    let mut failures = failures
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    failures.sort_by_key(|(seed, _)| *seed);
    if let Some((seed, failure)) = failures.first() {
        panic!(
            "{}\n({done} seeds run before stopping; failing seeds: {:?})",
            failure_message(*seed, failure),
            failures.iter().map(|(seed, _)| seed).collect::<Vec<_>>()
        );
    }
    let exercised: Vec<String> = run::EXERCISED
        .iter()
        .zip(&exercised)
        .map(|((label, _), count)| format!("{} {label}", count.load(Ordering::Relaxed)))
        .collect();
    println!("exercised: {}", exercised.join(", "));
    let mut hazards = hazards
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    hazards.sort();
    println!(
        "{done} seeds (from {first}, {} transactions) in {elapsed:.1} s on {threads} thread(s): {:.0} seeds/s; \
         {} heuristic hazard(s){}",
        transactions.load(Ordering::Relaxed),
        done as f64 / elapsed.max(1e-9),
        hazards.len(),
        if hazards.is_empty() {
            String::new()
        } else {
            format!(
                " (operator resolves that raced the protocol, allowed by the coordinator; first: {:?})",
                &hazards[..hazards.len().min(5)]
            )
        }
    );
}

#[test]
fn simulation_replays_a_seed_with_the_same_trace() {
    let seeds: Vec<u64> = match env_u64("SIM_REPLAY_SEEDS") {
        Some(count) => (0..count).collect(),
        None => vec![1, 42, 553, 4_242],
    };
    for seed in seeds {
        let first = run::run_seed(seed).trace.canonical();
        let second = run::run_seed(seed).trace.canonical();
        assert!(first.len() > 10, "seed {seed} did almost nothing: {first:?}");
        if first != second {
            let at = first.iter().zip(&second).position(|(a, b)| a != b);
            panic!(
                "seed {seed} ran twice with different traces (first difference at event {at:?}: {:?} vs {:?})",
                at.and_then(|i| first.get(i)),
                at.and_then(|i| second.get(i))
            );
        }
    }
}
