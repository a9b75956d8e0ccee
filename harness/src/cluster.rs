//! [`LocalCluster`]: N shards, each a PostgreSQL server with a participant beside it, and one
//! coordinator, all on loopback under one base directory:
//!
//! ```text
//! <base>/pg-s0 ...          PostgreSQL data (or a temp directory when the postgres user cannot reach <base>)
//! <base>/participant-s0 ... participant data
//! <base>/coordinator        the decision log
//! <base>/logs/<name>.log    every process's output
//! ```

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use tonic::transport::Channel;
use treaty_proto::pb::coordinator_client::CoordinatorClient;

use crate::error::HarnessError;
use crate::os;
use crate::postgres::{PgCluster, PgOptions};
use crate::process::{ServiceProcess, ServiceSpec};

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub shards: usize,
    pub base_dir: PathBuf,
    pub pg: PgOptions,
    /// Extra coordinator arguments (the harness adds `--data-dir`, `--shard` and `--listen`).
    pub coordinator_args: Vec<String>,
    /// Extra participant arguments (the harness adds `--shard`, `--database-url`, `--coordinator`,
    /// `--data-dir` and `--listen`).
    pub participant_args: Vec<String>,
    /// The database each participant uses (created if missing).
    pub database: String,
    /// Coordinator port on 127.0.0.1; 0 picks a free one.
    pub coordinator_port: u16,
}

/// A running local cluster. Dropping it kills the processes and stops PostgreSQL, unless each part
/// was told to `keep_on_drop`.
pub struct LocalCluster {
    // Declared first so that it is dropped first: processes go before their databases.
    pub coordinator: ServiceProcess,
    pub participants: Vec<ServiceProcess>,
    pub pgs: Vec<PgCluster>,
    /// `s0`, `s1`, ...: shard i is `pgs[i]` + `participants[i]`.
    pub shard_names: Vec<String>,
    pub base_dir: PathBuf,
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

impl LocalCluster {
    pub async fn start(spec: ClusterSpec) -> Result<LocalCluster, HarnessError> {
        if spec.shards == 0 {
            return Err(HarnessError::Invalid("a cluster needs at least one shard".into()));
        }
        let base_dir = spec.base_dir.clone();
        std::fs::create_dir_all(&base_dir)
            .map_err(HarnessError::io(format!("creating {}", base_dir.display())))?;
        let logs = base_dir.join("logs");
        let shard_names: Vec<String> = (0..spec.shards).map(|i| format!("s{i}")).collect();

        let pgs = futures::future::try_join_all(
            shard_names
                .iter()
                .map(|name| PgCluster::start(&base_dir, name, &spec.pg)),
        )
        .await?;
        for pg in &pgs {
            pg.create_database(&spec.database).await?;
        }

        // Addresses first: the coordinator must know the participants, and the participants ask
        // the coordinator who it is when they start, so the coordinator starts first.
        let coordinator_port = match spec.coordinator_port {
            0 => os::free_loopback_port()?,
            port => port,
        };
        let participant_addrs: Vec<SocketAddr> = shard_names
            .iter()
            .map(|_| os::free_loopback_port().map(loopback))
            .collect::<Result<_, _>>()?;
        let coordinator_addr = loopback(coordinator_port);

        let mut coordinator_args = vec![
            "--data-dir".to_string(),
            base_dir.join("coordinator").display().to_string(),
        ];
        for (name, addr) in shard_names.iter().zip(&participant_addrs) {
            coordinator_args.push("--shard".into());
            coordinator_args.push(format!("{name}=http://{addr}"));
        }
        coordinator_args.extend(spec.coordinator_args.iter().cloned());
        let coordinator = ServiceProcess::spawn(ServiceSpec {
            name: "coordinator".into(),
            binary: os::binary_path("treaty-coordinator")?,
            args: coordinator_args,
            env: Vec::new(),
            listen: coordinator_addr,
            log_path: logs.join("coordinator.log"),
        })
        .await?;

        let participant_binary = os::binary_path("treaty-participant")?;
        let participants =
            futures::future::try_join_all(shard_names.iter().zip(&participant_addrs).zip(&pgs).map(
                |((name, addr), pg)| {
                    let mut args = vec![
                        "--shard".to_string(),
                        name.clone(),
                        "--database-url".into(),
                        pg.url(&spec.database),
                        "--coordinator".into(),
                        format!("http://{coordinator_addr}"),
                        "--data-dir".into(),
                        base_dir.join(format!("participant-{name}")).display().to_string(),
                    ];
                    args.extend(spec.participant_args.iter().cloned());
                    ServiceProcess::spawn(ServiceSpec {
                        name: format!("participant-{name}"),
                        binary: participant_binary.clone(),
                        args,
                        env: Vec::new(),
                        listen: *addr,
                        log_path: logs.join(format!("participant-{name}.log")),
                    })
                },
            ))
            .await?;

        Ok(LocalCluster {
            coordinator,
            participants,
            pgs,
            shard_names,
            base_dir,
        })
    }

    /// `http://127.0.0.1:<port>` of the coordinator.
    pub fn coordinator_endpoint(&self) -> String {
        self.coordinator.endpoint()
    }

    /// A connected gRPC client of the coordinator.
    pub async fn client(&self) -> Result<CoordinatorClient<Channel>, HarnessError> {
        let endpoint = self.coordinator_endpoint();
        let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
            .map_err(|source| HarnessError::Grpc {
                endpoint: endpoint.clone(),
                source,
            })?
            .connect()
            .await
            .map_err(|source| HarnessError::Grpc { endpoint, source })?;
        Ok(CoordinatorClient::new(channel))
    }

    /// The index of shard `name` in `pgs` and `participants`.
    pub fn shard_index(&self, name: &str) -> Option<usize> {
        self.shard_names.iter().position(|n| n == name)
    }
}
