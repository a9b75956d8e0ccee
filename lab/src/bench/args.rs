//! `treaty bench`'s command line: the workload, the cluster, the systems to compare (`--protocol`
//! in any spelling [`Protocol`] accepts, or `both`; `--decision-store file,shard,database`;
//! `--baseline`),
//! and the bounds checked before anything starts.

use std::path::PathBuf;
use std::str::FromStr;

use anyhow::Result;
use treaty_proto::Protocol;
use treaty_types::UnknownProtocol;

use super::stores::DecisionStore;
use super::workload::{Skew, WorkloadKind};

/// One item of `--protocol`: a protocol in any spelling [`Protocol`] accepts, or `both`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolChoice {
    One(Protocol),
    /// 2pc and 3pc side by side.
    Both,
}

impl FromStr for ProtocolChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text.trim().eq_ignore_ascii_case("both") {
            Ok(ProtocolChoice::Both)
        } else {
            text.parse()
                .map(ProtocolChoice::One)
                .map_err(|error: UnknownProtocol| format!("{error}, or \"both\""))
        }
    }
}

impl ProtocolChoice {
    /// The protocols a `--protocol` list asks for: `both` expanded, duplicates dropped, 2PC first
    /// (it keeps the `treaty_*` names when the two run side by side).
    pub(super) fn expand(list: &[ProtocolChoice]) -> Vec<Protocol> {
        let wants = |p: Protocol| {
            list.iter()
                .any(|&choice| choice == ProtocolChoice::One(p) || choice == ProtocolChoice::Both)
        };
        Protocol::ALL.into_iter().filter(|&p| wants(p)).collect()
    }
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaselineArg {
    None,
    Direct,
    Independent,
    /// `direct` pipelined per shard (tokio-postgres), reported as `direct_pipelined_*`.
    #[value(alias = "direct_pipelined")]
    DirectPipelined,
}

pub use crate::ParticipantKind;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// The workload (`recovery` measures coordinator recovery instead of load).
    #[arg(value_enum, default_value = "transfer")]
    pub workload: WorkloadKind,
    /// Shards in the cluster; a transfer touches all of them (K = shards).
    #[arg(long, default_value_t = 2)]
    pub shards: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// Run every client count in this list (for the throughput-vs-clients plot), e.g. 1,8,32.
    #[arg(long, value_delimiter = ',')]
    pub clients_list: Vec<usize>,
    /// Seconds of measured load per system, split evenly over --rounds.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Unmeasured seconds per system before the first round.
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// Rounds; each runs Treaty, then each baseline.
    #[arg(long, default_value_t = 2)]
    pub rounds: u32,
    /// Accounts over all shards.
    #[arg(long, default_value_t = 100_000)]
    pub accounts: u64,
    /// How transfers pick accounts: uniform, or skewed towards a few hot ones (contention).
    #[arg(long, value_enum, default_value = "uniform")]
    pub skew: Skew,
    /// Zipf exponent for --skew zipfian, in (0, 1).
    #[arg(long, default_value_t = 0.99)]
    pub zipf_theta: f64,
    /// Treaty's commit protocol (2pc or two-phase, 3pc or three-phase); `2pc,3pc` (or `both`)
    /// runs Treaty with each, side by side in the same rounds (3PC reported as `treaty_3pc_*`).
    #[arg(long, value_delimiter = ',', default_value = "2pc")]
    pub protocol: Vec<ProtocolChoice>,
    /// Where the coordinator keeps 2PC commit decisions: file (its fsynced log, every branch
    /// prepared with a marker row), shard (a row committed in one phase inside the first
    /// branch) or database (a row in a dedicated decision database, a PostgreSQL server the bench
    /// starts for it); `file,shard` runs Treaty on each, side by side in the same rounds, each on
    /// its own coordinator over the same databases. The first of file, shard, database keeps the
    /// `treaty_*` keys, the others are `treaty_<store>_*`; `decision_stores` in the JSON names the
    /// store of every set of figures. recovery: the store whose decisions the restarted
    /// coordinator finishes (file or shard).
    /// Default: shard, the coordinator's own default (file when --protocol includes 3pc).
    #[arg(long, value_delimiter = ',')]
    pub decision_store: Vec<DecisionStore>,
    /// How Treaty reaches the databases: agent (a participant process per shard) or in-process
    /// (the coordinator drives them itself, no gRPC hop; two-phase commit and one decision store).
    /// Default: the fastest that keeps every guarantee of the run: in-process, or agent when the
    /// run measures three-phase commit, several decision stores side by side, or recovery.
    #[arg(long, value_enum)]
    pub participants: Option<ParticipantKind>,
    /// Where Treaty's coordinator runs: service (the `treaty-coordinator` process, each bench
    /// client on its own gRPC connection, like independent application servers) or embedded
    /// (inside the bench process, as `treaty_coordinator::Embedded` in an application: the same
    /// engine, store, recovery and gRPC service, the clients' calls handed to it without the
    /// hop). Default: embedded when the participants are in process and the run is one store's
    /// two-phase commit under load; service otherwise. Embedded, it runs on the bench's own
    /// runtime (`--service-threads` applies to service processes only).
    #[arg(long, value_enum)]
    pub coordinator: Option<CoordinatorKind>,
    /// Baselines on the same databases: none, direct (PREPARE/COMMIT PREPARED by hand, one
    /// statement per round trip), direct-pipelined (the same SQL, each shard's BEGIN, statements
    /// and PREPARE in one round trip), independent (plain per-shard COMMIT); a comma-separated
    /// list runs several.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "none")]
    pub baseline: Vec<BaselineArg>,
    /// Drive Treaty with Begin/Execute/Commit instead of one Submit per transaction.
    #[arg(long)]
    pub interactive: bool,
    /// PostgreSQL lock_timeout per branch, for Treaty and the baselines alike (cross-shard waits
    /// are not seen by PostgreSQL's deadlock detector).
    #[arg(long, default_value_t = 1000)]
    pub lock_timeout_ms: u64,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
    /// Write SVG plots into this directory.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Keep the cluster's data here instead of a temporary directory.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// A PostgreSQL setting for every server the bench starts, as NAME=VALUE (repeatable), e.g.
    /// `shared_preload_libraries=pg_stat_statements` to see what each statement costs. Figures
    /// taken with settings other than the defaults are not comparable with docs/performance.md.
    #[arg(long = "pg-setting", value_name = "NAME=VALUE", value_parser = parse_pg_setting)]
    pub pg_settings: Vec<(String, String)>,
    /// Seed of the account choice (printed, so a run can be repeated). Default: random.
    #[arg(long)]
    pub seed: Option<u64>,
    /// recovery: committed-but-unfinished transactions to leave in the log.
    #[arg(long, default_value_t = 10_000)]
    pub txns: u64,
    /// recovery with the shard store: where the transactions' decisions lie. `spread` (the
    /// default): transaction k's decision shard is shard k mod N, as transactions that begin on
    /// different shards leave them (each shard holds commit rows and the other shards' prepared
    /// branches); `first`: every decision on the first shard, every prepared branch on the
    /// others, as an application whose transactions all begin on one shard leaves them (one
    /// server then commits every branch: PostgreSQL's slowest case).
    #[arg(long, value_enum)]
    pub decision_shards: Option<DecisionShards>,
    /// Async runtime threads of the coordinator and of each participant (their
    /// `--worker-threads`). The benchmark runs every process on one machine, PostgreSQL servers
    /// included, so one thread each avoids cross-thread wake-ups between processes competing for
    /// the same cores (with 1, each service runs tokio's current-thread scheduler); 0 keeps the
    /// services' default (one per core).
    #[arg(long, default_value_t = 1)]
    pub service_threads: u16,
}

/// Where `treaty bench recovery` puts the decision rows (`--decision-shards`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionShards {
    /// Transaction k decided on shard k mod N.
    Spread,
    /// Every transaction decided on the first shard.
    First,
}

impl DecisionShards {
    pub fn name(self) -> &'static str {
        match self {
            DecisionShards::Spread => "spread",
            DecisionShards::First => "first",
        }
    }
}

/// Where `treaty bench` runs the coordinator (`--coordinator`).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoordinatorKind {
    /// The `treaty-coordinator` process; the bench's clients reach it over gRPC.
    Service,
    /// Inside the bench process (`treaty_coordinator::Embedded`).
    Embedded,
}

impl CoordinatorKind {
    pub fn name(self) -> &'static str {
        match self {
            CoordinatorKind::Service => "service",
            CoordinatorKind::Embedded => "embedded",
        }
    }
}

/// `--worker-threads N` for a service, or nothing for its default.
pub fn service_thread_args(threads: u16) -> Vec<String> {
    if threads == 0 {
        Vec::new()
    } else {
        vec!["--worker-threads".into(), threads.to_string()]
    }
}

impl BenchArgs {
    /// The stores to run: `--decision-store`'s, or the coordinator's default (shard) when it is
    /// not given, file when 3PC is measured (3PC always keeps the file log).
    pub fn stores(&self) -> Vec<DecisionStore> {
        if !self.decision_store.is_empty() {
            return DecisionStore::expand(&self.decision_store);
        }
        if ProtocolChoice::expand(&self.protocol).contains(&Protocol::ThreePhase) {
            vec![DecisionStore::File]
        } else {
            vec![DecisionStore::Shard]
        }
    }

    /// The participants to run: `--participants`, or else in process (no gRPC hop and no second
    /// process per shard, with the same guarantees for two-phase commit) unless the run needs
    /// agents: three-phase commit needs participants that outlive the coordinator, and stores
    /// side by side run a coordinator each over the same databases, which in process would each
    /// claim them. `recovery` keeps agents too: they outlive the coordinator's restart and finish
    /// the branches faster than participants that start again with it (2.2 against 2.3–3.1 s for
    /// 10,000 transactions in session 19).
    pub fn participant_kind(&self) -> ParticipantKind {
        if let Some(kind) = self.participants {
            return kind;
        }
        let three_phase = ProtocolChoice::expand(&self.protocol).contains(&Protocol::ThreePhase);
        if three_phase || self.stores().len() > 1 || self.workload == WorkloadKind::Recovery {
            ParticipantKind::Agent
        } else {
            ParticipantKind::InProcess
        }
    }

    /// Where the coordinator runs: `--coordinator`, or embedded whenever it can be (the
    /// participants in process: an agent would ask the bench process for decisions it can no
    /// longer answer once the bench ends; recovery restarts a coordinator process).
    pub fn coordinator_kind(&self) -> CoordinatorKind {
        if let Some(kind) = self.coordinator {
            return kind;
        }
        if self.participant_kind() == ParticipantKind::InProcess && self.workload != WorkloadKind::Recovery {
            CoordinatorKind::Embedded
        } else {
            CoordinatorKind::Service
        }
    }

    /// Bounds on the arguments, checked before anything starts.
    pub fn validate(&self) -> Result<()> {
        let args = self;
        if args.coordinator == Some(CoordinatorKind::Embedded) {
            anyhow::ensure!(
                args.participant_kind() == ParticipantKind::InProcess,
                "--coordinator embedded drives the databases from the bench process: it needs \
                 --participants in-process (one --decision-store, two-phase commit)"
            );
            anyhow::ensure!(
                args.workload != WorkloadKind::Recovery,
                "--coordinator embedded: recovery measures a restarted coordinator process; use --coordinator service"
            );
        }
        if args.participants == Some(ParticipantKind::InProcess) {
            // One coordinator owns each database (its participant holds the database's claim), so
            // stores cannot run side by side on their own coordinators, and 3PC needs agents.
            anyhow::ensure!(
                args.stores().len() == 1,
                "--participants in-process runs one coordinator per database: give one --decision-store"
            );
            anyhow::ensure!(
                !ProtocolChoice::expand(&args.protocol).contains(&Protocol::ThreePhase),
                "--participants in-process: three-phase commit needs participant agents"
            );
        }
        anyhow::ensure!((1..=8).contains(&args.shards), "--shards must be between 1 and 8");
        anyhow::ensure!(
            args.decision_shards.is_none() || args.workload == WorkloadKind::Recovery,
            "--decision-shards places the decision rows `treaty bench recovery` leaves behind; \
             under load the coordinator puts each transaction's decision on its first branch's shard"
        );
        anyhow::ensure!(
            args.workload != WorkloadKind::Transfer || args.shards >= 2,
            "transfer needs --shards of at least 2"
        );
        if args.workload == WorkloadKind::Recovery {
            // Recovery runs no load: what follows checks flags it does not read.
            return Ok(());
        }
        anyhow::ensure!(
            (1..=512).contains(&args.clients),
            "--clients must be between 1 and 512"
        );
        anyhow::ensure!(
            args.clients_list.iter().all(|c| (1..=512).contains(c)),
            "--clients-list entries must be between 1 and 512"
        );
        anyhow::ensure!(
            (1..=3600).contains(&args.duration),
            "--duration must be 1..=3600 seconds"
        );
        anyhow::ensure!(args.warmup <= 600, "--warmup must be at most 600 seconds");
        anyhow::ensure!((1..=100).contains(&args.rounds), "--rounds must be 1..=100");
        anyhow::ensure!(
            u64::from(args.rounds) <= args.duration,
            "--duration is split over --rounds: give at least one second per round"
        );
        let three_phase = ProtocolChoice::expand(&args.protocol).contains(&Protocol::ThreePhase);
        anyhow::ensure!(
            !(three_phase && args.stores().contains(&DecisionStore::Shard)),
            "--decision-store shard applies to 2PC only (3PC always keeps its decisions in the file \
             log): drop 3pc from --protocol or shard from --decision-store"
        );
        anyhow::ensure!(
            args.accounts >= args.shards as u64 && args.accounts <= 100_000_000,
            "--accounts must be between --shards and 100000000"
        );
        Ok(())
    }
}

/// `NAME=VALUE` of `--pg-setting`: the name as PostgreSQL spells settings (letters, digits, `_`
/// and `.`); the value as a `postgresql.conf` literal: taken as it is when already in single
/// quotes, else quoted here (quotes doubled, backslashes escaped). One line only.
fn parse_pg_setting(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("--pg-setting {text:?}: expected NAME=VALUE"))?;
    let name = name.trim();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
    {
        return Err(format!(
            "--pg-setting {text:?}: {name:?} is not a PostgreSQL setting name (letters, digits, _ and .)"
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!(
            "--pg-setting {text:?}: the value must be one line, without control characters"
        ));
    }
    let value = value.trim();
    let quoted = value.len() >= 2 && value.starts_with('\'') && value.ends_with('\'');
    let literal = if quoted {
        value.to_owned()
    } else {
        format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
    };
    Ok((name.to_owned(), literal))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn protocols(args: &[&str]) -> Vec<Protocol> {
        let cli = Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied())).unwrap();
        ProtocolChoice::expand(&cli.bench.protocol)
    }

    fn parse(args: &[&str]) -> Result<BenchArgs, String> {
        Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))
            .map(|cli| cli.bench)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn decision_store_lists_parse_and_unknown_stores_are_refused_naming_the_choices() {
        use DecisionStore::{Database, File, Shard};
        let stores = |args: &[&str]| parse(args).unwrap().stores();
        // Unset: the coordinator's default, except beside 3PC (which keeps the file log).
        assert_eq!(stores(&[]), vec![Shard]);
        assert_eq!(stores(&["--protocol", "both"]), vec![File]);
        assert_eq!(stores(&["--protocol", "3pc"]), vec![File]);
        assert_eq!(stores(&["--decision-store", "shard"]), vec![Shard]);
        assert_eq!(stores(&["--decision-store", "file,shard"]), vec![File, Shard]);
        assert_eq!(stores(&["--decision-store", "shard,file"]), vec![File, Shard]);
        assert_eq!(
            stores(&["--decision-store", "database,shard,file"]),
            vec![File, Shard, Database]
        );
        let error = parse(&["--decision-store", "file,zookeeper"])
            .err()
            .unwrap_or_default();
        assert!(
            error.contains("zookeeper")
                && error.contains("file")
                && error.contains("shard")
                && error.contains("database"),
            "{error}"
        );
        // 3PC never decides in a shard: the pair is refused before anything starts.
        let both = parse(&["--protocol", "both", "--decision-store", "file,shard"]).unwrap();
        let error = both.validate().unwrap_err().to_string();
        assert!(error.contains("2PC only"), "{error}");
        assert!(
            parse(&["--decision-store", "file,shard"])
                .unwrap()
                .validate()
                .is_ok()
        );
        assert!(parse(&["--protocol", "both"]).unwrap().validate().is_ok());
    }

    #[test]
    fn the_default_participants_are_in_process_unless_the_run_needs_agents() {
        let kind = |args: &[&str]| parse(args).map(|args| args.participant_kind());
        assert_eq!(kind(&[]), Ok(ParticipantKind::InProcess));
        assert_eq!(
            kind(&["--decision-store", "file"]),
            Ok(ParticipantKind::InProcess)
        );
        // Three-phase commit needs participants that outlive the coordinator.
        assert_eq!(kind(&["--protocol", "3pc"]), Ok(ParticipantKind::Agent));
        assert_eq!(kind(&["--protocol", "both"]), Ok(ParticipantKind::Agent));
        // Stores side by side run a coordinator each over the same databases.
        assert_eq!(
            kind(&["--decision-store", "file,shard"]),
            Ok(ParticipantKind::Agent)
        );
        // Asked for, either kind is kept, and in process is refused where it cannot run.
        assert_eq!(kind(&["--participants", "agent"]), Ok(ParticipantKind::Agent));
        let refused = parse(&["--participants", "in-process", "--protocol", "3pc"]).unwrap();
        assert!(refused.validate().is_err());
        assert!(parse(&["--protocol", "3pc"]).unwrap().validate().is_ok());
    }

    #[test]
    fn decision_shards_apply_to_recovery_only() {
        let error = parse(&["--decision-shards", "first"])
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(error.contains("--decision-shards"), "{error}");
        assert!(
            parse(&["--decision-shards", "first", "recovery"])
                .unwrap()
                .validate()
                .is_ok()
        );
        assert!(parse(&["--decision-shards", "sideways", "recovery"]).is_err());
        // Recovery runs no load: the load's flags are not checked for it.
        assert!(
            parse(&["--duration", "1", "recovery"])
                .unwrap()
                .validate()
                .is_ok()
        );
        assert!(parse(&["--duration", "1"]).unwrap().validate().is_err());
    }

    #[test]
    fn the_coordinator_is_embedded_by_default_only_where_its_participants_are_in_process() {
        let kind = |args: &[&str]| parse(args).map(|args| args.coordinator_kind());
        assert_eq!(kind(&[]), Ok(CoordinatorKind::Embedded));
        assert_eq!(kind(&["single"]), Ok(CoordinatorKind::Embedded));
        assert_eq!(kind(&["--decision-store", "file"]), Ok(CoordinatorKind::Embedded));
        // Agents (asked for, or needed by 3PC or stores side by side) and recovery: a service.
        assert_eq!(kind(&["--participants", "agent"]), Ok(CoordinatorKind::Service));
        assert_eq!(kind(&["--protocol", "3pc"]), Ok(CoordinatorKind::Service));
        assert_eq!(
            kind(&["--decision-store", "file,shard"]),
            Ok(CoordinatorKind::Service)
        );
        assert_eq!(kind(&["recovery"]), Ok(CoordinatorKind::Service));
        assert_eq!(kind(&["--coordinator", "service"]), Ok(CoordinatorKind::Service));
        // Asked for where it cannot run, it is refused naming what it needs.
        for args in [
            &["--coordinator", "embedded", "--participants", "agent"][..],
            &["--coordinator", "embedded", "--protocol", "3pc"],
            &["--coordinator", "embedded", "recovery"],
        ] {
            let error = parse(args).unwrap().validate().unwrap_err().to_string();
            assert!(error.contains("--coordinator embedded"), "{args:?}: {error}");
        }
        assert!(parse(&["--coordinator", "embedded"]).unwrap().validate().is_ok());
    }

    #[test]
    fn baseline_lists_take_direct_pipelined_in_either_spelling() {
        let baselines = |list: &str| parse(&["--baseline", list]).map(|args| args.baseline);
        assert_eq!(
            baselines("direct,direct-pipelined"),
            Ok(vec![BaselineArg::Direct, BaselineArg::DirectPipelined])
        );
        assert_eq!(
            baselines("direct_pipelined,independent"),
            Ok(vec![BaselineArg::DirectPipelined, BaselineArg::Independent])
        );
        let error = baselines("direct-pipelinde").err().unwrap_or_default();
        assert!(error.contains("direct-pipelined"), "{error}");
    }

    #[test]
    fn protocol_lists_expand_with_two_phase_first() {
        use Protocol::{ThreePhase, TwoPhase};
        assert_eq!(protocols(&[]), vec![TwoPhase]);
        assert_eq!(protocols(&["--protocol", "3pc"]), vec![ThreePhase]);
        assert_eq!(protocols(&["--protocol", "2pc,3pc"]), vec![TwoPhase, ThreePhase]);
        assert_eq!(protocols(&["--protocol", "3pc,2pc"]), vec![TwoPhase, ThreePhase]);
        assert_eq!(protocols(&["--protocol", "both"]), vec![TwoPhase, ThreePhase]);
        assert_eq!(protocols(&["--protocol", "3pc,3pc"]), vec![ThreePhase]);
        assert_eq!(
            protocols(&["--protocol", "three-phase,two-phase"]),
            vec![TwoPhase, ThreePhase]
        );
        let error = Cli::try_parse_from(["bench", "--protocol", "2pc,4pc"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            error.contains("4pc") && error.contains("three-phase") && error.contains("both"),
            "{error}"
        );
    }

    #[test]
    fn pg_settings_are_quoted_and_bad_names_refused() {
        assert_eq!(
            parse_pg_setting("shared_preload_libraries=pg_stat_statements"),
            Ok(("shared_preload_libraries".into(), "'pg_stat_statements'".into()))
        );
        assert_eq!(
            parse_pg_setting("pg_stat_statements.track = 'all'"),
            Ok(("pg_stat_statements.track".into(), "'all'".into()))
        );
        assert_eq!(parse_pg_setting("x=it's"), Ok(("x".into(), "'it''s'".into())));
        assert_eq!(parse_pg_setting("x='it''s'"), Ok(("x".into(), "'it''s'".into())));
        assert_eq!(parse_pg_setting(r"x=a\b"), Ok(("x".into(), r"'a\\b'".into())));
        for bad in ["no_equals", "=1", "a b=1", "a;b=1", "x=1\nfsync=off"] {
            let error = parse_pg_setting(bad).unwrap_err();
            assert!(error.contains("--pg-setting"), "{error}");
        }
    }
}
