//! The bench report: a table on stdout and, with `--json`, one JSON object (printed as the last
//! line). Field names are part of the interface (docs/performance.md, scripts): `treaty_tps`,
//! `direct_tps`, `throughput_ratio`, `treaty_p99_ms`, `direct_p99_ms`, `p99_ratio`,
//! `coordinator_cpu_us_per_txn` and the rest are always present, `null` when not measured.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::cpu::{CpuSample, ticks_to_us};
use super::stats::{Counts, Figures, ratio};

/// Everything measured for one system (`treaty`, `direct`, `independent`) at one client count.
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
    fn per_txn(&self, ticks: u64) -> Option<f64> {
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
    /// The main measurement (at `--clients`): Treaty first, then the baselines in order.
    pub main: SweepPoint,
    pub sweep: Vec<SweepPoint>,
    /// One object per measured phase.
    pub rounds: Vec<Value>,
    pub prepared_left: i64,
    pub plots: Vec<String>,
}

fn round3(x: f64) -> Value {
    json!((x * 1000.0).round() / 1000.0)
}

fn opt3(x: Option<f64>) -> Value {
    x.map_or(Value::Null, round3)
}

impl BenchReport {
    fn treaty(&self) -> Option<&SystemRun> {
        self.main.systems.iter().find(|s| s.name == "treaty")
    }

    fn baselines(&self) -> impl Iterator<Item = &SystemRun> {
        self.main.systems.iter().filter(|s| s.name != "treaty")
    }

    pub fn to_json(&self) -> Value {
        let mut out = self.params.clone();
        out.insert("status".into(), json!("ok"));
        // Always-present keys, overwritten below when measured.
        for system in ["treaty", "direct", "independent"] {
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
            "coordinator_cpu_us_per_txn",
            "participant_cpu_us_per_txn",
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
                opt3(treaty.per_txn(treaty.cpu.coordinator)),
            );
            out.insert(
                "participant_cpu_us_per_txn".into(),
                opt3(treaty.per_txn(treaty.cpu.participants)),
            );
            let t = treaty.figures();
            let mut all_ratios = Map::new();
            for (index, baseline) in self.baselines().enumerate() {
                let b = baseline.figures();
                let ratios = json!({
                    "throughput_ratio": opt3(ratio(t.tps, b.tps)),
                    "p50_ratio": opt3(ratio(t.p50_ms, b.p50_ms)),
                    "p95_ratio": opt3(ratio(t.p95_ms, b.p95_ms)),
                    "p99_ratio": opt3(ratio(t.p99_ms, b.p99_ms)),
                    "max_ratio": opt3(ratio(t.max_ms, b.max_ms)),
                });
                if index == 0 {
                    out.insert("baseline".into(), json!(baseline.name));
                    if let Value::Object(fields) = &ratios {
                        for (key, value) in fields {
                            out.insert(key.clone(), value.clone());
                        }
                    }
                }
                all_ratios.insert(baseline.name.clone(), ratios);
            }
            out.insert("ratios".into(), Value::Object(all_ratios));
        }
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
                system.name,
                f.tps,
                f.p50_ms,
                f.p95_ms,
                f.p99_ms,
                f.max_ms,
                system.counts.committed,
                system.counts.aborted()
            );
        }
        if let Some(treaty) = self.treaty() {
            let t = treaty.figures();
            for baseline in self.baselines() {
                let b = baseline.figures();
                let show = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.3}"));
                println!(
                    "treaty/{:<11} throughput {}  p50 {}  p95 {}  p99 {}  max {}",
                    baseline.name,
                    show(ratio(t.tps, b.tps)),
                    show(ratio(t.p50_ms, b.p50_ms)),
                    show(ratio(t.p95_ms, b.p95_ms)),
                    show(ratio(t.p99_ms, b.p99_ms)),
                    show(ratio(t.max_ms, b.max_ms)),
                );
            }
        }
        println!("CPU µs per committed transaction:");
        for system in &self.main.systems {
            let show = |ticks: u64| {
                system
                    .per_txn(ticks)
                    .map_or("-".to_string(), |us| format!("{us:.1}"))
            };
            if system.name == "treaty" {
                println!(
                    "  treaty:      coordinator {}  participants {}  postgres {}  bench client {}",
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
                println!("aborts ({}): {reasons:?}", system.name);
            }
        }
        if self.sweep.len() > 1 {
            println!("throughput vs clients:");
            for point in &self.sweep {
                let cells: Vec<String> = point
                    .systems
                    .iter()
                    .map(|s| format!("{} {:.1}", s.name, s.figures().tps))
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
        // A baseline that was not run is null, not missing.
        assert_eq!(value["independent_tps"], Value::Null);
    }

    #[test]
    fn unsupported_protocol_keeps_the_keys() {
        let value = unsupported_json(Map::new(), "3PC is not implemented");
        assert_eq!(value["status"], json!("unsupported"));
        assert_eq!(value["treaty_tps"], Value::Null);
    }
}
