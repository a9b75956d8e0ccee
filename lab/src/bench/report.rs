//! The bench report: a table on stdout and, with `--json`, one JSON object (printed as the last
//! line). Field names are part of the interface (docs/performance.md, scripts): `treaty_tps`,
//! `direct_tps`, `throughput_ratio`, `treaty_p99_ms`, `direct_p99_ms`, `p99_ratio`,
//! `coordinator_cpu_us_per_txn` and the rest are always present, `null` when not measured.
//!
//! `throughput_ceiling` (per baseline, and at the top level for the first one) is the throughput
//! ratio Treaty would reach if its coordinator and participants cost no CPU at all: the baseline's
//! PostgreSQL and client CPU per transaction over Treaty's. It is what the ratio is bounded by when
//! every process shares the same cores, as in this bench; with cores to spare it means nothing.
//!
//! With the coordinator embedded in the bench process (`coordinator_kind` `embedded`, the default
//! where the participants are in process), there is no coordinator or participant process to
//! measure: `coordinator_cpu_us_per_txn` is then the bench process's CPU per transaction beyond
//! the first baseline's (what Treaty adds inside the application, beside a client that drives
//! PostgreSQL by hand: both speak PostgreSQL's protocol, only Treaty runs the protocol around it),
//! `coordinator_cpu_basis` says which, `participant_cpu_us_per_txn` is 0 (the participants are in
//! that figure), and the ceiling counts Treaty's CPU as the client's, so it says nothing more
//! than the ratio.
//!
//! With 3PC beside 2PC (`--protocol 2pc,3pc`), `treaty_*` stay 2PC's and 3PC adds `treaty_3pc_*`,
//! `coordinator_cpu_us_per_txn_3pc`, `participant_cpu_us_per_txn_3pc`, `*_ratio_3pc_vs_2pc`,
//! `ratios_3pc` and `treaty_3pc_status` (`ok` or `unsupported`, with `treaty_3pc_message`); those
//! keys are present whenever 3PC was asked for beside 2PC, and absent from a single-protocol run.
//!
//! PostgreSQL CPU per committed transaction is `<system>_postgres_cpu_us_per_txn` for every system
//! (all processes of each shard's server: the postmaster, its backends and helpers, see `cpu`);
//! `postgres_cpu_us_per_txn` is Treaty's (`treaty`), and `postgres_cpu_ratio` (top level for the
//! first baseline, and in every `ratios*` object) is Treaty's over the baseline's. With several
//! decision stores (`--decision-store file,shard`), `decision_stores` and the `*_<store>` keys
//! are added by `stores`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::cpu::{CpuSample, ticks_to_us};
use super::stats::{Counts, Figures, ratio};
use super::stores::{self, DecisionStore};

/// The name of Treaty run with 3PC beside 2PC (2PC keeps `treaty`).
pub const TREATY_3PC: &str = "treaty_3pc";

/// Whether a system is Treaty (`treaty`, `treaty_3pc`, `treaty_<store>`) rather than a baseline.
pub fn is_treaty(name: &str) -> bool {
    name == "treaty" || name.starts_with("treaty_")
}

/// 3PC beside 2PC in one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SideBySide {
    /// One protocol: `treaty_*` is that protocol, nothing else is added.
    Off,
    /// Both measured: `treaty` is 2PC, `treaty_3pc` is 3PC.
    Measured,
    /// 3PC asked for beside 2PC, refused by the coordinator (the message); 2PC measured alone.
    Unsupported(String),
}

/// Everything measured for one system (`treaty`, `treaty_3pc`, `direct`, `direct_pipelined`,
/// `independent`) at one client count.
#[derive(Clone, Default)]
pub struct SystemRun {
    pub name: String,
    pub counts: Counts,
    pub elapsed: Duration,
    pub cpu: CpuSample,
}

impl SystemRun {
    pub fn new(name: &str) -> SystemRun {
        SystemRun {
            name: name.into(),
            ..Default::default()
        }
    }

    pub fn add(&mut self, counts: &Counts, elapsed: Duration, cpu: &CpuSample) {
        self.counts.merge(counts);
        self.elapsed += elapsed;
        self.cpu.add(cpu);
    }

    pub fn figures(&self) -> Figures {
        Figures::of(&self.counts, self.elapsed)
    }

    /// Microseconds of CPU per committed transaction for `ticks`; `None` without commits.
    pub(super) fn per_txn(&self, ticks: u64) -> Option<f64> {
        (self.counts.committed > 0).then(|| ticks_to_us(ticks) / self.counts.committed as f64)
    }
}

/// One point of a clients sweep.
#[derive(Clone)]
pub struct SweepPoint {
    pub clients: usize,
    pub systems: Vec<SystemRun>,
}

/// The whole report.
pub struct BenchReport {
    /// Workload parameters, copied into the JSON as they are.
    pub params: Map<String, Value>,
    /// The main measurement (at `--clients`): Treaty first (2PC, then 3PC when side by side),
    /// then the baselines in order.
    pub main: SweepPoint,
    pub sweep: Vec<SweepPoint>,
    /// One object per measured phase.
    pub rounds: Vec<Value>,
    pub prepared_left: i64,
    pub plots: Vec<String>,
    pub three_phase: SideBySide,
    /// The decision stores measured, each with the system that ran on it (`stores`); the first
    /// is `treaty`.
    pub stores: Vec<(DecisionStore, String)>,
}

fn round3(x: f64) -> Value {
    json!((x * 1000.0).round() / 1000.0)
}

pub(super) fn opt3(x: Option<f64>) -> Value {
    x.map_or(Value::Null, round3)
}

impl BenchReport {
    fn treaty(&self) -> Option<&SystemRun> {
        self.main.systems.iter().find(|s| s.name == "treaty")
    }

    /// The coordinator's CPU per transaction. Embedded, it runs in the bench process beside the
    /// clients that drive it: its share is the bench process's CPU per transaction beyond what
    /// the first baseline's clients spent on the same workload (`None` without a baseline).
    pub(super) fn coordinator_cpu_us_per_txn(&self, treaty: &SystemRun) -> Option<f64> {
        if !self.embedded() {
            return treaty.per_txn(treaty.cpu.coordinator);
        }
        let baseline = self.baselines().next()?;
        let (treaty, baseline) = treaty
            .per_txn(treaty.cpu.bench)
            .zip(baseline.per_txn(baseline.cpu.bench))?;
        // Not clamped: a negative figure says the difference is within the noise.
        Some(treaty - baseline)
    }

    /// What `coordinator_cpu_us_per_txn` measured: the coordinator process's CPU, or (embedded)
    /// the bench process's beyond the named baseline's clients.
    fn coordinator_cpu_basis(&self) -> String {
        if !self.embedded() {
            return "coordinator process".into();
        }
        match self.baselines().next() {
            Some(baseline) => format!("bench process beyond {}'s clients", baseline.name),
            None => "not measured: embedded, with no baseline to subtract".into(),
        }
    }

    /// Whether Treaty ran in the bench process (`--coordinator embedded`).
    fn embedded(&self) -> bool {
        self.params.get("coordinator_kind").and_then(Value::as_str) == Some("embedded")
    }

    fn treaty_3pc(&self) -> Option<&SystemRun> {
        self.main.systems.iter().find(|s| s.name == TREATY_3PC)
    }

    fn baselines(&self) -> impl Iterator<Item = &SystemRun> {
        self.main.systems.iter().filter(|s| !is_treaty(&s.name))
    }

    /// A system's name in the table: says the protocol, or the decision store, when several run
    /// side by side.
    fn label(&self, name: &str) -> String {
        if self.stores.len() > 1
            && let Some((store, _)) = self.stores.iter().find(|(_, system)| system == name)
        {
            return format!("treaty {}", store.name());
        }
        match (&self.three_phase, name) {
            (SideBySide::Off, _) => name.to_string(),
            (_, "treaty") => "treaty 2pc".into(),
            (_, TREATY_3PC) => "treaty 3pc".into(),
            _ => name.to_string(),
        }
    }

    /// Treaty / each baseline.
    pub(super) fn ratios_to_baselines(&self, treaty: &SystemRun) -> Vec<(String, Value)> {
        let t = treaty.figures();
        let postgres = |run: &SystemRun| run.per_txn(run.cpu.postgres);
        self.baselines()
            .map(|baseline| {
                let b = baseline.figures();
                let postgres_ratio = postgres(treaty)
                    .zip(postgres(baseline))
                    .and_then(|(t, b)| ratio(t, b));
                let ratios = json!({
                    // PostgreSQL CPU per committed transaction, Treaty's over the baseline's.
                    "postgres_cpu_ratio": opt3(postgres_ratio),
                    "throughput_ratio": opt3(ratio(t.tps, b.tps)),
                    "throughput_ceiling": opt3(throughput_ceiling(treaty, baseline)),
                    "p50_ratio": opt3(ratio(t.p50_ms, b.p50_ms)),
                    "p95_ratio": opt3(ratio(t.p95_ms, b.p95_ms)),
                    "p99_ratio": opt3(ratio(t.p99_ms, b.p99_ms)),
                    "max_ratio": opt3(ratio(t.max_ms, b.max_ms)),
                });
                (baseline.name.clone(), ratios)
            })
            .collect()
    }

    /// The 3PC keys, when 3PC was asked for beside 2PC (null when not measured).
    fn insert_three_phase(&self, out: &mut Map<String, Value>) {
        let status = match &self.three_phase {
            SideBySide::Off => return,
            SideBySide::Measured => "ok",
            SideBySide::Unsupported(message) => {
                out.insert(format!("{TREATY_3PC}_message"), json!(message));
                "unsupported"
            }
        };
        out.insert(format!("{TREATY_3PC}_status"), json!(status));
        for key in ["tps", "p50_ms", "p95_ms", "p99_ms", "max_ms"] {
            out.entry(format!("{TREATY_3PC}_{key}")).or_insert(Value::Null);
        }
        for key in THREE_PHASE_KEYS {
            out.insert(key.into(), Value::Null);
        }
        let Some(three) = self.treaty_3pc() else {
            return;
        };
        out.insert(
            "coordinator_cpu_us_per_txn_3pc".into(),
            opt3(three.per_txn(three.cpu.coordinator)),
        );
        out.insert(
            "participant_cpu_us_per_txn_3pc".into(),
            opt3(three.per_txn(three.cpu.participants)),
        );
        if let Some(two) = self.treaty() {
            let (t, s) = (three.figures(), two.figures());
            out.insert("throughput_ratio_3pc_vs_2pc".into(), opt3(ratio(t.tps, s.tps)));
            out.insert("p50_ratio_3pc_vs_2pc".into(), opt3(ratio(t.p50_ms, s.p50_ms)));
            out.insert("p99_ratio_3pc_vs_2pc".into(), opt3(ratio(t.p99_ms, s.p99_ms)));
        }
        out.insert(
            "ratios_3pc".into(),
            Value::Object(self.ratios_to_baselines(three).into_iter().collect()),
        );
    }

    pub fn to_json(&self) -> Value {
        let mut out = self.params.clone();
        out.insert("status".into(), json!("ok"));
        // Always-present keys, overwritten below when measured.
        for system in ["treaty", "direct", "direct_pipelined", "independent"] {
            for key in ["tps", "p50_ms", "p95_ms", "p99_ms", "max_ms"] {
                out.insert(format!("{system}_{key}"), Value::Null);
            }
        }
        for key in [
            "baseline",
            "throughput_ratio",
            "p50_ratio",
            "p95_ratio",
            "p99_ratio",
            "max_ratio",
            "throughput_ceiling",
            "coordinator_cpu_us_per_txn",
            "participant_cpu_us_per_txn",
            "postgres_cpu_us_per_txn",
            "postgres_cpu_ratio",
        ] {
            out.insert(key.into(), Value::Null);
        }
        for system in &self.main.systems {
            let f = system.figures();
            let name = &system.name;
            out.insert(format!("{name}_tps"), round3(f.tps));
            out.insert(format!("{name}_p50_ms"), round3(f.p50_ms));
            out.insert(format!("{name}_p95_ms"), round3(f.p95_ms));
            out.insert(format!("{name}_p99_ms"), round3(f.p99_ms));
            out.insert(format!("{name}_max_ms"), round3(f.max_ms));
            out.insert(format!("{name}_mean_ms"), round3(f.mean_ms));
            out.insert(format!("{name}_committed"), json!(system.counts.committed));
            out.insert(format!("{name}_aborted"), json!(system.counts.aborted()));
            out.insert(format!("{name}_aborts"), json!(system.counts.aborts));
            out.insert(format!("{name}_seconds"), round3(system.elapsed.as_secs_f64()));
            out.insert(
                format!("{name}_postgres_cpu_us_per_txn"),
                opt3(system.per_txn(system.cpu.postgres)),
            );
            out.insert(
                format!("{name}_bench_cpu_us_per_txn"),
                opt3(system.per_txn(system.cpu.bench)),
            );
        }
        if let Some(treaty) = self.treaty() {
            out.insert(
                "coordinator_cpu_us_per_txn".into(),
                opt3(self.coordinator_cpu_us_per_txn(treaty)),
            );
            out.insert(
                "coordinator_cpu_basis".into(),
                json!(self.coordinator_cpu_basis()),
            );
            out.insert(
                "participant_cpu_us_per_txn".into(),
                opt3(treaty.per_txn(treaty.cpu.participants)),
            );
            out.insert(
                "postgres_cpu_us_per_txn".into(),
                opt3(treaty.per_txn(treaty.cpu.postgres)),
            );
            let mut all_ratios = Map::new();
            for (index, (baseline, ratios)) in self.ratios_to_baselines(treaty).into_iter().enumerate() {
                if index == 0 {
                    out.insert("baseline".into(), json!(baseline));
                    if let Value::Object(fields) = &ratios {
                        for (key, value) in fields {
                            out.insert(key.clone(), value.clone());
                        }
                    }
                }
                all_ratios.insert(baseline, ratios);
            }
            out.insert("ratios".into(), Value::Object(all_ratios));
        }
        self.insert_three_phase(&mut out);
        stores::insert_store_keys(self, &mut out);
        out.insert(
            "sweep".into(),
            json!(
                self.sweep
                    .iter()
                    .map(|point| {
                        let mut entry = Map::new();
                        entry.insert("clients".into(), json!(point.clients));
                        for system in &point.systems {
                            let f = system.figures();
                            entry.insert(format!("{}_tps", system.name), round3(f.tps));
                            entry.insert(format!("{}_p99_ms", system.name), round3(f.p99_ms));
                        }
                        Value::Object(entry)
                    })
                    .collect::<Vec<_>>()
            ),
        );
        out.insert("rounds".into(), json!(self.rounds));
        out.insert("prepared_left".into(), json!(self.prepared_left));
        out.insert("plots".into(), json!(self.plots));
        Value::Object(out)
    }

    pub fn print_table(&self) {
        println!(
            "{:<12} {:>10} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9}",
            "system", "commits/s", "p50 ms", "p95 ms", "p99 ms", "max ms", "committed", "aborted"
        );
        for system in &self.main.systems {
            let f = system.figures();
            println!(
                "{:<12} {:>10.1} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>10} {:>9}",
                self.label(&system.name),
                f.tps,
                f.p50_ms,
                f.p95_ms,
                f.p99_ms,
                f.max_ms,
                system.counts.committed,
                system.counts.aborted()
            );
        }
        let show = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.3}"));
        for treaty in self.main.systems.iter().filter(|s| is_treaty(&s.name)) {
            let t = treaty.figures();
            let prefix = match self.label(&treaty.name).as_str() {
                "treaty 2pc" | "treaty" => "treaty/".to_string(),
                label => format!("{label}/"),
            };
            let postgres = |run: &SystemRun| run.per_txn(run.cpu.postgres);
            for baseline in self.baselines() {
                let b = baseline.figures();
                println!(
                    "{:<18} throughput {}  p50 {}  p95 {}  p99 {}  max {}  postgres CPU {}",
                    format!("{prefix}{}", baseline.name),
                    show(ratio(t.tps, b.tps)),
                    show(ratio(t.p50_ms, b.p50_ms)),
                    show(ratio(t.p95_ms, b.p95_ms)),
                    show(ratio(t.p99_ms, b.p99_ms)),
                    show(ratio(t.max_ms, b.max_ms)),
                    show(
                        postgres(treaty)
                            .zip(postgres(baseline))
                            .and_then(|(t, b)| ratio(t, b))
                    ),
                );
                println!(
                    "{:<18} throughput ceiling {} (if coordinator and participants cost no CPU, on shared cores)",
                    "",
                    show(throughput_ceiling(treaty, baseline)),
                );
            }
        }
        if let (Some(two), Some(three)) = (self.treaty(), self.treaty_3pc()) {
            let (s, t) = (two.figures(), three.figures());
            println!(
                "{:<18} throughput {}  p50 {}  p95 {}  p99 {}  max {}",
                "treaty 3pc/2pc",
                show(ratio(t.tps, s.tps)),
                show(ratio(t.p50_ms, s.p50_ms)),
                show(ratio(t.p95_ms, s.p95_ms)),
                show(ratio(t.p99_ms, s.p99_ms)),
                show(ratio(t.max_ms, s.max_ms)),
            );
        }
        if let SideBySide::Unsupported(message) = &self.three_phase {
            println!("treaty 3pc: unsupported by this coordinator ({message}); not measured");
        }
        println!("CPU µs per committed transaction:");
        for system in &self.main.systems {
            let show = |ticks: u64| {
                system
                    .per_txn(ticks)
                    .map_or("-".to_string(), |us| format!("{us:.1}"))
            };
            if is_treaty(&system.name) && self.embedded() {
                println!(
                    "  {:<12} coordinator and participants in the bench process  postgres {}  bench process {}{}",
                    format!("{}:", self.label(&system.name)),
                    show(system.cpu.postgres),
                    show(system.cpu.bench),
                    self.coordinator_cpu_us_per_txn(system)
                        .map_or(String::new(), |us| format!(
                            " (Treaty {us:.1} beyond the baseline's clients)"
                        ))
                );
            } else if is_treaty(&system.name) {
                println!(
                    "  {:<12} coordinator {}  participants {}  postgres {}  bench client {}",
                    format!("{}:", self.label(&system.name)),
                    show(system.cpu.coordinator),
                    show(system.cpu.participants),
                    show(system.cpu.postgres),
                    show(system.cpu.bench)
                );
            } else {
                println!(
                    "  {:<12} postgres {}  bench client {}",
                    format!("{}:", system.name),
                    show(system.cpu.postgres),
                    show(system.cpu.bench)
                );
            }
        }
        for system in &self.main.systems {
            if !system.counts.aborts.is_empty() {
                let reasons: BTreeMap<&String, &u64> = system.counts.aborts.iter().collect();
                println!("aborts ({}): {reasons:?}", self.label(&system.name));
            }
        }
        if self.sweep.len() > 1 {
            println!("throughput vs clients:");
            for point in &self.sweep {
                let cells: Vec<String> = point
                    .systems
                    .iter()
                    .map(|s| format!("{} {:.1}", self.label(&s.name), s.figures().tps))
                    .collect();
                println!("  {:>4} clients: {}", point.clients, cells.join(", "));
            }
        }
        println!("prepared transactions left: {}", self.prepared_left);
        for plot in &self.plots {
            println!("plot: {plot}");
        }
    }
}

/// Keys added beside `treaty_3pc_*` when 3PC runs beside 2PC; null when not measured.
const THREE_PHASE_KEYS: [&str; 5] = [
    "coordinator_cpu_us_per_txn_3pc",
    "participant_cpu_us_per_txn_3pc",
    "throughput_ratio_3pc_vs_2pc",
    "p50_ratio_3pc_vs_2pc",
    "p99_ratio_3pc_vs_2pc",
];

/// The JSON printed when the requested protocol is not supported by the coordinator.
pub fn unsupported_json(mut params: Map<String, Value>, message: &str) -> Value {
    params.insert("status".into(), json!("unsupported"));
    params.insert("message".into(), json!(message));
    for key in [
        "treaty_tps",
        "direct_tps",
        "throughput_ratio",
        "treaty_p99_ms",
        "direct_p99_ms",
        "p99_ratio",
        "coordinator_cpu_us_per_txn",
    ] {
        params.insert(key.into(), Value::Null);
    }
    Value::Object(params)
}

/// Treaty's throughput / the baseline's if Treaty's coordinator and participants cost nothing and
/// every process shares the cores: the baseline's PostgreSQL and client CPU per transaction over
/// Treaty's. `None` when either side committed nothing or used no CPU there.
fn throughput_ceiling(treaty: &SystemRun, baseline: &SystemRun) -> Option<f64> {
    let unavoidable = |run: &SystemRun| {
        run.per_txn(run.cpu.postgres + run.cpu.bench)
            .filter(|&us| us > 0.0)
    };
    ratio(unavoidable(baseline)?, unavoidable(treaty)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(name: &str, commits: u64, latency_ms: u64, ticks: u64) -> SystemRun {
        let mut counts = Counts::default();
        for _ in 0..commits {
            counts.commit(Duration::from_millis(latency_ms));
        }
        counts.abort("vote_no".into());
        let mut system = SystemRun::new(name);
        let cpu = CpuSample {
            coordinator: ticks,
            participants: ticks * 2,
            postgres: ticks * 3,
            bench: ticks,
        };
        system.add(&counts, Duration::from_secs(10), &cpu);
        system
    }

    #[test]
    fn json_holds_the_required_fields_and_ratios() {
        let main = SweepPoint {
            clients: 32,
            systems: vec![run("treaty", 900, 4, 100), run("direct", 1000, 2, 0)],
        };
        let report = BenchReport {
            params: Map::from_iter([("workload".to_string(), json!("transfer"))]),
            main: main.clone(),
            sweep: vec![main],
            rounds: Vec::new(),
            prepared_left: 0,
            plots: Vec::new(),
            three_phase: SideBySide::Off,
            stores: Vec::new(),
        };
        let value = report.to_json();
        for key in [
            "treaty_tps",
            "direct_tps",
            "throughput_ratio",
            "treaty_p99_ms",
            "direct_p99_ms",
            "p99_ratio",
            "p50_ratio",
            "p95_ratio",
            "coordinator_cpu_us_per_txn",
            "participant_cpu_us_per_txn",
            "treaty_aborts",
            "workload",
        ] {
            assert!(value.get(key).is_some(), "missing {key}");
        }
        assert_eq!(value["treaty_tps"], json!(90.0));
        assert_eq!(value["direct_tps"], json!(100.0));
        assert_eq!(value["throughput_ratio"], json!(0.9));
        assert_eq!(value["baseline"], json!("direct"));
        assert_eq!(value["treaty_aborts"]["vote_no"], json!(1));
        let p99 = value["p99_ratio"].as_f64().unwrap_or(0.0);
        assert!((1.99..2.01).contains(&p99), "p99 ratio {p99}");
        // 100 ticks over 900 commits.
        let expected = ticks_to_us(100) / 900.0;
        let cpu = value["coordinator_cpu_us_per_txn"].as_f64().unwrap_or(0.0);
        assert!((cpu - expected).abs() < 0.01, "{cpu} vs {expected}");
        // Baseline: 0 ticks of PostgreSQL and client over 1000 commits; nothing to bound by.
        assert_eq!(value["throughput_ceiling"], Value::Null);
        // A baseline that was not run is null, not missing.
        assert_eq!(value["independent_tps"], Value::Null);
        for key in ["tps", "p50_ms", "p95_ms", "p99_ms", "max_ms"] {
            assert_eq!(value[format!("direct_pipelined_{key}")], Value::Null, "{key}");
        }
    }

    #[test]
    fn direct_pipelined_is_reported_beside_direct_under_its_own_keys() {
        let value = side_by_side(
            SideBySide::Off,
            vec![
                run("treaty", 900, 4, 100),
                run("direct", 1000, 2, 50),
                run("direct_pipelined", 1200, 1, 60),
            ],
        );
        assert_eq!(value["direct_tps"], json!(100.0));
        assert_eq!(value["direct_pipelined_tps"], json!(120.0));
        for key in ["p50_ms", "p95_ms", "p99_ms", "max_ms"] {
            let ms = value[format!("direct_pipelined_{key}")].as_f64().unwrap_or(0.0);
            assert!((0.99..1.01).contains(&ms), "{key}: {ms}");
        }
        let per_txn = |ticks: u64, commits: f64| ticks_to_us(ticks) / commits;
        for (key, ticks) in [("postgres", 180), ("bench", 60)] {
            let us = value[format!("direct_pipelined_{key}_cpu_us_per_txn")]
                .as_f64()
                .unwrap_or(0.0);
            assert!((us - per_txn(ticks, 1200.0)).abs() < 0.01, "{key}: {us}");
        }
        assert_eq!(value["direct_pipelined_aborts"]["vote_no"], json!(1));
        // The first baseline keeps the top-level ratios; every baseline has its own.
        assert_eq!(value["baseline"], json!("direct"));
        assert_eq!(value["throughput_ratio"], json!(0.9));
        assert_eq!(
            value["ratios"]["direct_pipelined"]["throughput_ratio"],
            json!(0.75)
        );
        assert_eq!(value["sweep"][0]["direct_pipelined_tps"], json!(120.0));
    }

    #[test]
    fn the_ceiling_counts_only_postgres_and_the_client() {
        // `run` gives every system coordinator t, participants 2t, PostgreSQL 3t, client t ticks.
        let systems = vec![run("treaty", 900, 4, 100), run("direct", 1000, 2, 50)];
        let value = side_by_side(SideBySide::Off, systems);
        // (3 + 1) * 50 / 1000 over (3 + 1) * 100 / 900: the coordinator's and participants' ticks
        // do not count.
        let expected = (200.0 / 1000.0) / (400.0 / 900.0);
        for ceiling in [
            &value["throughput_ceiling"],
            &value["ratios"]["direct"]["throughput_ceiling"],
        ] {
            let ceiling = ceiling.as_f64().unwrap_or(0.0);
            assert!((ceiling - expected).abs() < 0.001, "{ceiling} vs {expected}");
        }
    }

    #[test]
    fn unsupported_protocol_keeps_the_keys() {
        let value = unsupported_json(Map::new(), "3PC is not implemented");
        assert_eq!(value["status"], json!("unsupported"));
        assert_eq!(value["treaty_tps"], Value::Null);
    }

    fn side_by_side(three_phase: SideBySide, systems: Vec<SystemRun>) -> Value {
        let main = SweepPoint { clients: 32, systems };
        BenchReport {
            params: Map::from_iter([("protocol".to_string(), json!("2pc"))]),
            main: main.clone(),
            sweep: vec![main],
            rounds: Vec::new(),
            prepared_left: 0,
            plots: Vec::new(),
            three_phase,
            stores: Vec::new(),
        }
        .to_json()
    }

    #[test]
    fn three_phase_beside_two_phase_adds_its_keys_and_keeps_the_old_ones() {
        let value = side_by_side(
            SideBySide::Measured,
            vec![
                run("treaty", 900, 4, 100),
                run(TREATY_3PC, 600, 6, 200),
                run("direct", 1000, 2, 0),
            ],
        );
        // The 2PC figures keep their names; the baseline ratios are still Treaty (2PC)'s.
        assert_eq!(value["treaty_tps"], json!(90.0));
        assert_eq!(value["throughput_ratio"], json!(0.9));
        assert_eq!(value["baseline"], json!("direct"));
        let cpu_2pc = value["coordinator_cpu_us_per_txn"].as_f64().unwrap();
        assert!((cpu_2pc - ticks_to_us(100) / 900.0).abs() < 0.01, "{cpu_2pc}");
        // 3PC beside it.
        assert_eq!(value["treaty_3pc_status"], json!("ok"));
        assert_eq!(value["treaty_3pc_tps"], json!(60.0));
        // Histogram buckets: close to, not exactly, the recorded latency.
        let p99 = value["treaty_3pc_p99_ms"].as_f64().unwrap();
        assert!((5.99..6.01).contains(&p99), "{p99}");
        assert_eq!(value["treaty_3pc_committed"], json!(600));
        let cpu_3pc = value["coordinator_cpu_us_per_txn_3pc"].as_f64().unwrap();
        assert!((cpu_3pc - ticks_to_us(200) / 600.0).abs() < 0.01, "{cpu_3pc}");
        let participants_3pc = value["participant_cpu_us_per_txn_3pc"].as_f64().unwrap();
        assert!((participants_3pc - ticks_to_us(400) / 600.0).abs() < 0.01);
        let tps_ratio = value["throughput_ratio_3pc_vs_2pc"].as_f64().unwrap();
        assert!((tps_ratio - 60.0 / 90.0).abs() < 0.001, "{tps_ratio}");
        let p99_ratio = value["p99_ratio_3pc_vs_2pc"].as_f64().unwrap();
        assert!((1.49..1.51).contains(&p99_ratio), "{p99_ratio}");
        assert_eq!(value["ratios_3pc"]["direct"]["throughput_ratio"], json!(0.6));
        // 3PC is not a baseline: the 2PC ratios are against direct only.
        assert!(value["ratios"].get(TREATY_3PC).is_none());
        assert_eq!(value["ratios"].as_object().unwrap().len(), 1);
        assert_eq!(value["sweep"][0]["treaty_3pc_tps"], json!(60.0));
    }

    #[test]
    fn three_phase_refused_beside_two_phase_is_null_with_its_reason() {
        let value = side_by_side(
            SideBySide::Unsupported("3PC is not served yet".into()),
            vec![run("treaty", 900, 4, 100)],
        );
        assert_eq!(value["status"], json!("ok"));
        assert_eq!(value["treaty_tps"], json!(90.0));
        assert_eq!(value["treaty_3pc_status"], json!("unsupported"));
        assert_eq!(value["treaty_3pc_message"], json!("3PC is not served yet"));
        for key in ["treaty_3pc_tps", "treaty_3pc_p99_ms"]
            .into_iter()
            .chain(THREE_PHASE_KEYS)
        {
            assert_eq!(value.get(key), Some(&Value::Null), "{key}");
        }
    }

    #[test]
    fn a_single_protocol_run_has_no_three_phase_keys() {
        let value = side_by_side(SideBySide::Off, vec![run("treaty", 900, 4, 100)]);
        let keys: Vec<&String> = value.as_object().unwrap().keys().collect();
        assert!(keys.iter().all(|k| !k.contains("3pc")), "{keys:?}");
    }
}
