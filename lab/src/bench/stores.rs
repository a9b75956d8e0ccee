//! `--decision-store file,shard,database`: where the coordinator keeps its 2PC commit decisions,
//! measured side by side in one invocation against the same databases. `database` is a dedicated
//! decision database (`--decision-store postgres://...` on the coordinator): the bench starts one
//! more PostgreSQL server for it, fsync on like the shards, and counts its CPU as PostgreSQL's.
//!
//! Each store runs on its own coordinator process over the same participants and PostgreSQL
//! servers: the cluster's coordinator is started with the first store's flag, and every other
//! store gets an instance of its own (`LocalCluster::spawn_coordinator`). The harness cannot
//! restart a coordinator with different arguments, and a second instance is what production runs
//! anyway; the idle instance costs a takeover sweep every few seconds, nothing per transaction.
//!
//! Naming (the same pattern as `--protocol 2pc,3pc`): the first store in the order `file`, `shard`
//! keeps the `treaty_*` keys; another store is the system `treaty_<store>` (`treaty_shard_tps`,
//! ...), with `coordinator_cpu_us_per_txn_<store>`, `participant_cpu_us_per_txn_<store>`,
//! `ratios_<store>` and `*_ratio_<store>_vs_<first>`. `decision_store` names what `treaty_*`
//! measured, and `decision_stores` holds one object per store naming its system and figures, so
//! every set of figures says which store produced it.

use std::str::FromStr;

use serde_json::{Map, Value, json};

use super::report::{BenchReport, SystemRun, opt3};
use super::stats::ratio;

/// A value of `--decision-store`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DecisionStore {
    /// The coordinator's decision log: every branch prepared with a marker row, fsync per group.
    File,
    /// A commit row in `treaty.decisions`, committed in one phase inside the first branch.
    Shard,
    /// A commit row in `treaty.decisions` of a dedicated database, after every branch prepared.
    Database,
}

impl DecisionStore {
    /// Every store, in the order they are run and named (the first keeps `treaty_*`).
    pub const ALL: [DecisionStore; 3] = [DecisionStore::File, DecisionStore::Shard, DecisionStore::Database];

    /// The name the coordinator's flag and the JSON use.
    pub fn name(self) -> &'static str {
        match self {
            DecisionStore::File => "file",
            DecisionStore::Shard => "shard",
            DecisionStore::Database => "database",
        }
    }

    /// The coordinator's arguments that select this store; `database` needs the decision
    /// database's URL.
    pub fn coordinator_args(self, decision_database: Option<&str>) -> Vec<String> {
        let value = match (self, decision_database) {
            (DecisionStore::Database, Some(url)) => url,
            _ => self.name(),
        };
        vec!["--decision-store".into(), value.into()]
    }

    /// The system name of Treaty on this store: `treaty` for the first store of the run,
    /// `treaty_<store>` for the others.
    pub fn system_name(self, first: bool) -> &'static str {
        match (first, self) {
            (true, _) => "treaty",
            (false, DecisionStore::File) => "treaty_file",
            (false, DecisionStore::Shard) => "treaty_shard",
            (false, DecisionStore::Database) => "treaty_database",
        }
    }

    /// The stores a `--decision-store` list asks for: duplicates dropped, in [`Self::ALL`]'s order
    /// (so `shard,file` names the same systems as `file,shard`); `file` when the list is empty.
    pub fn expand(list: &[DecisionStore]) -> Vec<DecisionStore> {
        let stores: Vec<DecisionStore> = Self::ALL.into_iter().filter(|s| list.contains(s)).collect();
        if stores.is_empty() {
            vec![DecisionStore::File]
        } else {
            stores
        }
    }
}

impl FromStr for DecisionStore {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let wanted = text.trim();
        Self::ALL
            .into_iter()
            .find(|store| store.name().eq_ignore_ascii_case(wanted))
            .ok_or_else(|| format!("unknown decision store \"{wanted}\"; choose file, shard or database"))
    }
}

/// One store's figures, as `decision_stores.<store>`: the system that measured them and what the
/// issue's targets compare (throughput, p50, PostgreSQL CPU per transfer, against each baseline).
fn store_object(report: &BenchReport, store: DecisionStore, run: &SystemRun) -> Value {
    let f = run.figures();
    let mut object = Map::new();
    object.insert("decision_store".into(), json!(store.name()));
    object.insert("system".into(), json!(run.name));
    object.insert("tps".into(), opt3(Some(f.tps)));
    object.insert("p50_ms".into(), opt3(Some(f.p50_ms)));
    object.insert("p99_ms".into(), opt3(Some(f.p99_ms)));
    object.insert("committed".into(), json!(run.counts.committed));
    object.insert("aborted".into(), json!(run.counts.aborted()));
    object.insert(
        "postgres_cpu_us_per_txn".into(),
        opt3(run.per_txn(run.cpu.postgres)),
    );
    object.insert(
        "coordinator_cpu_us_per_txn".into(),
        opt3(report.coordinator_cpu_us_per_txn(run)),
    );
    object.insert(
        "participant_cpu_us_per_txn".into(),
        opt3(run.per_txn(run.cpu.participants)),
    );
    object.insert(
        "ratios".into(),
        Value::Object(report.ratios_to_baselines(run).into_iter().collect()),
    );
    Value::Object(object)
}

/// Adds the decision-store keys to the report's JSON: `decision_stores` always (one object per
/// store measured), and the suffixed keys of every store after the first.
pub fn insert_store_keys(report: &BenchReport, out: &mut Map<String, Value>) {
    let Some(&(first, _)) = report.stores.first() else {
        return;
    };
    let run_of = |name: &str| report.main.systems.iter().find(|s| s.name == name);
    let mut objects = Map::new();
    for (store, name) in &report.stores {
        if let Some(run) = run_of(name) {
            objects.insert(store.name().into(), store_object(report, *store, run));
        } else {
            objects.insert(store.name().into(), Value::Null);
        }
    }
    out.insert("decision_stores".into(), Value::Object(objects));
    let first_run = run_of(&report.stores[0].1);
    for (store, name) in report.stores.iter().skip(1) {
        let suffix = store.name();
        let vs = format!("{suffix}_vs_{}", first.name());
        for key in [
            format!("coordinator_cpu_us_per_txn_{suffix}"),
            format!("participant_cpu_us_per_txn_{suffix}"),
            format!("postgres_cpu_us_per_txn_{suffix}"),
            format!("throughput_ratio_{vs}"),
            format!("p50_ratio_{vs}"),
            format!("p99_ratio_{vs}"),
            format!("postgres_cpu_ratio_{vs}"),
        ] {
            out.insert(key, Value::Null);
        }
        let Some(run) = run_of(name) else {
            continue;
        };
        out.insert(
            format!("coordinator_cpu_us_per_txn_{suffix}"),
            opt3(run.per_txn(run.cpu.coordinator)),
        );
        out.insert(
            format!("participant_cpu_us_per_txn_{suffix}"),
            opt3(run.per_txn(run.cpu.participants)),
        );
        out.insert(
            format!("postgres_cpu_us_per_txn_{suffix}"),
            opt3(run.per_txn(run.cpu.postgres)),
        );
        out.insert(
            format!("ratios_{suffix}"),
            Value::Object(report.ratios_to_baselines(run).into_iter().collect()),
        );
        if let Some(base) = first_run {
            let (t, b) = (run.figures(), base.figures());
            out.insert(format!("throughput_ratio_{vs}"), opt3(ratio(t.tps, b.tps)));
            out.insert(format!("p50_ratio_{vs}"), opt3(ratio(t.p50_ms, b.p50_ms)));
            out.insert(format!("p99_ratio_{vs}"), opt3(ratio(t.p99_ms, b.p99_ms)));
            let pg = |r: &SystemRun| r.per_txn(r.cpu.postgres);
            out.insert(
                format!("postgres_cpu_ratio_{vs}"),
                opt3(pg(run).zip(pg(base)).and_then(|(a, b)| ratio(a, b))),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::cpu::{CpuSample, ticks_to_us};
    use super::super::report::{SideBySide, SweepPoint};
    use super::super::stats::Counts;
    use super::*;

    #[test]
    fn lists_parse_in_one_order_and_unknown_stores_name_the_choices() {
        use DecisionStore::{Database, File, Shard};
        let parse = |text: &str| {
            text.split(',')
                .map(str::parse)
                .collect::<Result<Vec<DecisionStore>, String>>()
                .map(|list| DecisionStore::expand(&list))
        };
        assert_eq!(parse("file"), Ok(vec![File]));
        assert_eq!(parse("shard"), Ok(vec![Shard]));
        assert_eq!(parse("file,shard"), Ok(vec![File, Shard]));
        assert_eq!(parse("shard,file"), Ok(vec![File, Shard]));
        assert_eq!(parse("SHARD,shard"), Ok(vec![Shard]));
        assert_eq!(DecisionStore::expand(&[]), vec![File]);
        let error = parse("file,etcd").unwrap_err();
        assert!(
            error.contains("etcd") && error.contains("file") && error.contains("shard"),
            "{error}"
        );
        assert_eq!(Shard.coordinator_args(None), ["--decision-store", "shard"]);
        // The decision database is named by its URL.
        let url = "postgres://postgres@127.0.0.1:5999/decisions";
        assert_eq!(parse("database"), Ok(vec![Database]));
        assert_eq!(Database.coordinator_args(Some(url)), ["--decision-store", url]);
        assert_eq!(Database.system_name(false), "treaty_database");
        assert_eq!(File.system_name(true), "treaty");
        assert_eq!(Shard.system_name(true), "treaty");
        assert_eq!(Shard.system_name(false), "treaty_shard");
    }

    /// A run whose every commit took `latency_ms`, with `pg_ticks` of PostgreSQL CPU.
    fn run(name: &str, commits: u64, latency_ms: u64, pg_ticks: u64) -> SystemRun {
        let mut counts = Counts::default();
        for _ in 0..commits {
            counts.commit(Duration::from_millis(latency_ms));
        }
        let mut system = SystemRun::new(name);
        let cpu = CpuSample {
            coordinator: 10,
            participants: 20,
            postgres: pg_ticks,
            bench: 5,
        };
        system.add(&counts, Duration::from_secs(10), &cpu);
        system
    }

    fn report(stores: Vec<(DecisionStore, String)>, systems: Vec<SystemRun>) -> Value {
        let main = SweepPoint { clients: 32, systems };
        BenchReport {
            params: Map::new(),
            main: main.clone(),
            sweep: vec![main],
            rounds: Vec::new(),
            prepared_left: 0,
            plots: Vec::new(),
            three_phase: SideBySide::Off,
            stores,
        }
        .to_json()
    }

    #[test]
    fn a_two_store_run_names_each_store_and_compares_postgres_cpu() {
        let value = report(
            vec![
                (DecisionStore::File, "treaty".into()),
                (DecisionStore::Shard, "treaty_shard".into()),
            ],
            vec![
                run("treaty", 800, 4, 400),
                run("treaty_shard", 900, 3, 300),
                run("direct", 1000, 2, 250),
            ],
        );
        // The first store keeps treaty_*; the second is suffixed.
        assert_eq!(value["treaty_tps"], json!(80.0));
        assert_eq!(value["treaty_shard_tps"], json!(90.0));
        let stores = &value["decision_stores"];
        assert_eq!(stores["file"]["system"], json!("treaty"));
        assert_eq!(stores["file"]["decision_store"], json!("file"));
        assert_eq!(stores["shard"]["system"], json!("treaty_shard"));
        assert_eq!(stores["shard"]["tps"], json!(90.0));
        let per_txn = |ticks: u64, commits: f64| ticks_to_us(ticks) / commits;
        let close = |v: &Value, expected: f64| {
            let got = v.as_f64().unwrap_or(f64::NAN);
            assert!((got - expected).abs() < 0.002, "{got} vs {expected}");
        };
        close(&stores["shard"]["postgres_cpu_us_per_txn"], per_txn(300, 900.0));
        close(&value["direct_postgres_cpu_us_per_txn"], per_txn(250, 1000.0));
        // PostgreSQL CPU per transfer against direct, per store and at the top level (first).
        let shard_vs_direct = per_txn(300, 900.0) / per_txn(250, 1000.0);
        let file_vs_direct = per_txn(400, 800.0) / per_txn(250, 1000.0);
        close(
            &stores["shard"]["ratios"]["direct"]["postgres_cpu_ratio"],
            shard_vs_direct,
        );
        close(
            &value["ratios_shard"]["direct"]["postgres_cpu_ratio"],
            shard_vs_direct,
        );
        close(&value["postgres_cpu_ratio"], file_vs_direct);
        close(&value["throughput_ratio_shard_vs_file"], 90.0 / 80.0);
        close(
            &value["postgres_cpu_ratio_shard_vs_file"],
            shard_vs_direct / file_vs_direct,
        );
        close(&value["coordinator_cpu_us_per_txn_shard"], per_txn(10, 900.0));
        assert_eq!(value["ratios_shard"]["direct"]["throughput_ratio"], json!(0.9));
    }

    #[test]
    fn a_single_store_run_names_its_store_and_adds_no_suffixed_keys() {
        let value = report(
            vec![(DecisionStore::Shard, "treaty".into())],
            vec![run("treaty", 900, 3, 300), run("direct", 1000, 2, 250)],
        );
        assert_eq!(value["decision_stores"]["shard"]["system"], json!("treaty"));
        assert!(value["decision_stores"].get("file").is_none());
        let keys: Vec<&String> = value.as_object().unwrap().keys().collect();
        assert!(
            keys.iter().all(|k| !k.ends_with("_shard") && !k.contains("_vs_")),
            "{keys:?}"
        );
    }
}
