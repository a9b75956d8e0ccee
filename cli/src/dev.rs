//! `treaty dev up` / `treaty dev down`: a local cluster that outlives the command, described by a
//! state file (`cluster.json`) in its directory so that `down` and the client commands find it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use treaty_harness::{ClusterSpec, LocalCluster, PgCluster, PgOptions};
use treaty_lab::ParticipantKind;
use treaty_lab::scenario::spec::DecisionStore;

const STATE_FILE: &str = "cluster.json";

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Number of shards (PostgreSQL clusters, one participant each).
    #[arg(long, default_value_t = 3)]
    pub shards: usize,
    /// Where data, logs and the state file go (the same flag as the other commands' --dev-dir).
    #[arg(long = "dev-dir", alias = "dir", default_value = ".treaty/dev")]
    pub dir: PathBuf,
    /// Coordinator port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 7600)]
    pub port: u16,
    /// Where the coordinator keeps two-phase commit decisions: `file` (its decision log) or
    /// `shard` (a row in `treaty.decisions` committed inside each transaction's first branch).
    #[arg(long, value_enum, default_value_t = DecisionStore::Shard)]
    pub decision_store: DecisionStore,
    /// Web console port on 127.0.0.1 (0 picks a free one). The console has no authentication
    /// yet, so `dev up` only ever binds it to loopback.
    #[arg(long, default_value_t = 7680)]
    pub console_port: u16,
    /// TLS on every link: makes a throw-away CA and certificates under --dev-dir/tls, and starts
    /// every process serving TLS only, requiring client certificates of that CA. The other
    /// `treaty` commands then use them for this cluster by themselves.
    #[arg(long)]
    pub tls: bool,
    /// How the coordinator reaches the databases: agent (a participant process per shard) or
    /// in-process (the coordinator drives them itself; two-phase commit only).
    #[arg(long, value_enum, default_value = "agent")]
    pub participants: ParticipantKind,
}

#[derive(clap::Args, Debug)]
pub struct DownArgs {
    /// The cluster `treaty dev up` started there.
    #[arg(long = "dev-dir", alias = "dir", default_value = ".treaty/dev")]
    pub dir: PathBuf,
    /// Also delete the data directory.
    #[arg(long)]
    pub purge: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ShardState {
    pub name: String,
    /// The participant agent's endpoint; `None` for a shard the coordinator drives itself.
    pub participant: Option<String>,
    pub participant_pid: Option<u32>,
    pub postgres_url: String,
    pub postgres_data_dir: PathBuf,
    /// The participant's Prometheus endpoint (absent in a state file from before metrics).
    #[serde(default)]
    pub metrics: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ClusterState {
    pub coordinator: String,
    pub coordinator_pid: Option<u32>,
    /// The web console's URL (absent in state files written before it existed).
    #[serde(default)]
    pub console: Option<String>,
    /// The coordinator's Prometheus endpoint (absent in a state file from before metrics).
    #[serde(default)]
    pub coordinator_metrics: Option<String>,
    pub shards: Vec<ShardState>,
    /// With `dev up --tls`: the CA and the client certificate the client commands present.
    #[serde(default)]
    pub tls: Option<ClientTlsFiles>,
}

/// The files a client of a `dev up --tls` cluster uses.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientTlsFiles {
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl ClusterState {
    pub fn load(dir: &Path) -> Result<ClusterState> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not a cluster state file", path.display()))
    }

    fn of(cluster: &LocalCluster, database: &str, console: String) -> ClusterState {
        ClusterState {
            coordinator: cluster.coordinator_endpoint(),
            coordinator_pid: cluster.coordinator.pid(),
            console: Some(console),
            coordinator_metrics: metrics_url(&cluster.coordinator),
            shards: cluster
                .shard_names
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    // In process, `participants` is empty: the coordinator drives every shard.
                    let agent = cluster.participants.get(i);
                    ShardState {
                        name: name.clone(),
                        participant: agent.map(treaty_harness::ServiceProcess::endpoint),
                        participant_pid: agent.and_then(treaty_harness::ServiceProcess::pid),
                        postgres_url: cluster.pgs[i].url(database),
                        postgres_data_dir: cluster.pgs[i].data_dir().to_path_buf(),
                        metrics: agent.and_then(metrics_url),
                    }
                })
                .collect(),
            tls: cluster.tls.as_ref().map(|files| ClientTlsFiles {
                ca: files.ca.clone(),
                client_cert: files.client_cert.clone(),
                client_key: files.client_key.clone(),
            }),
        }
    }
}

/// `http://ADDR/metrics` of a service started with `--metrics-addr`.
fn metrics_url(service: &treaty_harness::ServiceProcess) -> Option<String> {
    service
        .metrics_addr()
        .map(|addr| format!("http://{addr}/metrics"))
}

/// Every service of a dev cluster serves Prometheus metrics on a free loopback port.
fn metrics_args() -> Vec<String> {
    vec!["--metrics-addr".into(), "127.0.0.1:0".into()]
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

pub async fn up(args: UpArgs) -> Result<()> {
    if args.shards == 0 || args.shards > 16 {
        bail!("--shards must be between 1 and 16");
    }
    if let Ok(state) = ClusterState::load(&args.dir)
        && state.coordinator_pid.is_some_and(pid_alive)
    {
        bail!(
            "a cluster is already running from {} (coordinator {}); run `treaty dev down` first",
            args.dir.display(),
            state.coordinator
        );
    }
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let base_dir = std::fs::canonicalize(&args.dir)?;
    let participants = match args.participants {
        ParticipantKind::Agent => format!("{} participants", args.shards),
        ParticipantKind::InProcess => {
            "no participant agents (the coordinator drives every database)".to_owned()
        }
    };
    eprintln!(
        "starting {} PostgreSQL clusters, {participants} and a coordinator under {} ...",
        args.shards,
        base_dir.display()
    );
    let console_port = match args.console_port {
        0 => treaty_harness::os::free_loopback_port().context("picking a port for the console")?,
        port => port,
    };
    let console_addr = std::net::SocketAddr::from(([127, 0, 0, 1], console_port));
    let mut coordinator_args = args.decision_store.coordinator_args();
    coordinator_args.extend(["--console-addr".to_owned(), console_addr.to_string()]);
    let tls = if args.tls {
        let dir = base_dir.join("tls");
        let files = treaty_proto::tls::dev_certs::write_dev_certs(&dir, "treaty-dev-client")
            .context("making the development CA and certificates")?;
        eprintln!(
            "TLS on every link: a throw-away CA and certificates in {}",
            dir.display()
        );
        Some(files)
    } else {
        None
    };
    let spec = ClusterSpec {
        shards: args.shards,
        base_dir: base_dir.clone(),
        pg: PgOptions::default(),
        coordinator_args: [coordinator_args, metrics_args()].concat(),
        participant_args: metrics_args(),
        database: "treaty".into(),
        coordinator_port: args.port,
        in_process: args.participants.in_process(),
        tls,
    };
    let mut cluster = LocalCluster::start(spec)
        .await
        .context("starting the local cluster")?;
    let state = ClusterState::of(&cluster, "treaty", format!("http://{console_addr}/"));
    for pg in &mut cluster.pgs {
        pg.keep_on_drop();
    }
    for participant in &mut cluster.participants {
        participant.keep_on_drop();
    }
    cluster.coordinator.keep_on_drop();
    std::fs::write(base_dir.join(STATE_FILE), serde_json::to_string_pretty(&state)?)?;
    println!(
        "coordinator  {} (decision store: {})",
        state.coordinator,
        args.decision_store.name()
    );
    if let Some(console) = &state.console {
        println!("console      {console} (loopback only: it has no authentication yet)");
    }
    for shard in &state.shards {
        println!(
            "shard {:<6} participant {}  postgres {}",
            shard.name,
            shard.participant.as_deref().unwrap_or("in process"),
            // The dev cluster's roles have no password, but a URL is shown only redacted.
            treaty_proto::redact(&shard.postgres_url)
        );
    }
    println!("metrics (Prometheus):");
    if let Some(url) = &state.coordinator_metrics {
        println!("  coordinator     {url}");
    }
    for shard in &state.shards {
        if let Some(url) = &shard.metrics {
            println!("  participant {:<4}{url}", shard.name);
        }
    }
    if let Some(tls) = &state.tls {
        println!(
            "TLS: CA {}, client certificate {} (the treaty commands use them for this cluster)",
            tls.ca.display(),
            tls.client_cert.display()
        );
    }
    println!("logs in {}/logs; stop with `treaty dev down`", base_dir.display());
    Ok(())
}

fn terminate(pid: u32) {
    // `kill` keeps this crate free of unsafe code; a process that is already gone is fine.
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
}

pub async fn down(args: DownArgs) -> Result<()> {
    let state = ClusterState::load(&args.dir).context("no cluster to stop")?;
    let pids: Vec<u32> = state
        .coordinator_pid
        .into_iter()
        .chain(state.shards.iter().filter_map(|s| s.participant_pid))
        .filter(|pid| pid_alive(*pid))
        .collect();
    for pid in &pids {
        terminate(*pid);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while pids.iter().any(|pid| pid_alive(*pid)) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for shard in &state.shards {
        if shard.postgres_data_dir.join("postmaster.pid").exists() {
            let pg = PgCluster::open_existing(&shard.postgres_data_dir, &PgOptions::default())
                .await
                .with_context(|| format!("reaching PostgreSQL of shard {}", shard.name))?;
            pg.stop_fast()
                .await
                .with_context(|| format!("stopping PostgreSQL of shard {}", shard.name))?;
        }
    }
    std::fs::remove_file(args.dir.join(STATE_FILE)).ok();
    if args.purge {
        std::fs::remove_dir_all(&args.dir).with_context(|| format!("removing {}", args.dir.display()))?;
    }
    println!(
        "stopped {} processes and {} PostgreSQL clusters",
        pids.len(),
        state.shards.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_file_written_before_the_console_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(STATE_FILE),
            r#"{"coordinator": "http://127.0.0.1:7600", "coordinator_pid": null, "shards": []}"#,
        )
        .unwrap();
        let state = ClusterState::load(dir.path()).unwrap();
        assert_eq!(state.coordinator, "http://127.0.0.1:7600");
        assert_eq!(state.console, None);
    }
}
