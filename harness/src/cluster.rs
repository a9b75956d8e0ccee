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
use crate::ports::{self, PortReservation};
use crate::postgres::{PgCluster, PgOptions};
use crate::process::{ServiceProcess, ServiceSpec};
use crate::proxy::FaultNetwork;
pub use treaty_proto::tls::dev_certs::DevCertFiles;

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
    /// Coordinator port on 127.0.0.1; 0 picks a free one, reserved (`ports.rs`) while the
    /// coordinator's [`ServiceProcess`] lives. A port given here is the caller's to keep reserved.
    pub coordinator_port: u16,
    /// Every shard driven by the coordinator itself (`--shard NAME=postgres://...`): no
    /// participant processes are started, and `participants` stays empty.
    pub in_process: bool,
    /// TLS on every link (`--tls-*` and `--link-tls-*` on every process, https:// everywhere),
    /// with these throw-away certificates; the server certificate is also each service's
    /// identity on the links it dials.
    pub tls: Option<DevCertFiles>,
}

/// The TLS flags of a service in a TLS cluster: its listener requires client certificates of the
/// cluster's CA, and it presents the server certificate on the links it dials.
pub fn service_tls_args(files: &DevCertFiles) -> Vec<String> {
    let path = |p: &PathBuf| p.display().to_string();
    vec![
        "--tls-cert".into(),
        path(&files.server_cert),
        "--tls-key".into(),
        path(&files.server_key),
        "--tls-client-ca".into(),
        path(&files.ca),
        "--link-tls-ca".into(),
        path(&files.ca),
        "--link-tls-cert".into(),
        path(&files.server_cert),
        "--link-tls-key".into(),
        path(&files.server_key),
    ]
}

/// tonic's client TLS with the cluster's CA and its client certificate (what the services'
/// links use, so a test's client is configured exactly as they are).
pub fn client_tls(files: &DevCertFiles) -> Result<tonic::transport::ClientTlsConfig, HarnessError> {
    treaty_proto::tls::tonic_client_config(&treaty_proto::tls::LinkTlsFiles {
        ca: files.ca.clone(),
        identity: Some((files.client_cert.clone(), files.client_key.clone())),
    })
    .map_err(|error| HarnessError::Invalid(format!("the cluster's client certificate: {error}")))
}

/// A running local cluster. Dropping it kills the processes and stops PostgreSQL, unless each part
/// was told to `keep_on_drop`.
pub struct LocalCluster {
    // Declared first so that it is dropped first: processes go before their databases.
    pub coordinator: ServiceProcess,
    /// Other coordinator instances over the same shards, added with
    /// [`LocalCluster::add_coordinator`]: kept here so that they stop with the cluster, before its
    /// databases. Empty unless a caller adds one.
    pub extra_coordinators: Vec<ServiceProcess>,
    pub participants: Vec<ServiceProcess>,
    pub pgs: Vec<PgCluster>,
    /// `s0`, `s1`, ...: shard i is `pgs[i]` + `participants[i]`.
    pub shard_names: Vec<String>,
    pub base_dir: PathBuf,
    /// With [`LocalCluster::start_proxied`]: a fault proxy on every link, named `client`,
    /// `coordinator` and the shard names (`client -> coordinator`, `coordinator -> s0`,
    /// `s0 -> coordinator`, ...); only `client -> coordinator` when the shards are in process.
    pub network: Option<FaultNetwork>,
    /// The certificates of a TLS cluster (`ClusterSpec::tls`).
    pub tls: Option<DevCertFiles>,
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

impl LocalCluster {
    pub async fn start(spec: ClusterSpec) -> Result<LocalCluster, HarnessError> {
        Self::start_inner(spec, false).await
    }

    /// Like [`LocalCluster::start`], with every process talking to every other through a
    /// [`FaultNetwork`] proxy, so that links can be delayed, cut or reset by name.
    pub async fn start_proxied(spec: ClusterSpec) -> Result<LocalCluster, HarnessError> {
        Self::start_inner(spec, true).await
    }

    async fn start_inner(spec: ClusterSpec, proxied: bool) -> Result<LocalCluster, HarnessError> {
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
        // the coordinator who it is when they start, so the coordinator starts first. Each port
        // is reserved, and its reservation handed to the process that listens on it, so that no
        // other harness process (nextest runs many) is given it, even while that process is
        // down between a kill and a restart.
        let coordinator_reservation = match spec.coordinator_port {
            0 => Some(ports::reserve_loopback_port()?),
            _ => None,
        };
        let coordinator_addr = coordinator_reservation
            .as_ref()
            .map_or(loopback(spec.coordinator_port), PortReservation::addr);
        let participant_reservations: Vec<PortReservation> = shard_names
            .iter()
            .map(|_| ports::reserve_loopback_port())
            .collect::<Result<_, _>>()?;
        let participant_addrs: Vec<SocketAddr> = participant_reservations
            .iter()
            .map(PortReservation::addr)
            .collect();
        // What each process dials: the real address, or the proxy of its link.
        let mut network = proxied.then(FaultNetwork::new);
        let mut participant_dials: Vec<SocketAddr> = participant_addrs.clone();
        let mut coordinator_dials: Vec<SocketAddr> = vec![coordinator_addr; shard_names.len()];
        if let Some(network) = network.as_mut() {
            network.link("client", "coordinator", coordinator_addr).await?;
            // In-process shards have no link between coordinator and participant to proxy:
            // only the clients' link is.
            let agent_links = if spec.in_process { 0 } else { shard_names.len() };
            for (i, name) in shard_names[..agent_links].iter().enumerate() {
                participant_dials[i] = network
                    .link("coordinator", name, participant_addrs[i])
                    .await?
                    .addr();
                coordinator_dials[i] = network.link(name, "coordinator", coordinator_addr).await?.addr();
            }
        }

        let scheme = if spec.tls.is_some() { "https" } else { "http" };
        let tls_args = spec.tls.as_ref().map(service_tls_args).unwrap_or_default();
        let mut coordinator_args = vec![
            "--data-dir".to_string(),
            base_dir.join("coordinator").display().to_string(),
        ];
        coordinator_args.extend(tls_args.iter().cloned());
        for ((name, addr), pg) in shard_names.iter().zip(&participant_dials).zip(&pgs) {
            coordinator_args.push("--shard".into());
            if spec.in_process {
                coordinator_args.push(format!("{name}={}", pg.url(&spec.database)));
            } else {
                coordinator_args.push(format!("{name}={scheme}://{addr}"));
            }
        }
        coordinator_args.extend(spec.coordinator_args.iter().cloned());
        let coordinator_spec = ServiceSpec {
            name: "coordinator".into(),
            binary: os::binary_path("treaty-coordinator")?,
            args: coordinator_args,
            env: Vec::new(),
            listen: coordinator_addr,
            log_path: logs.join("coordinator.log"),
        };
        let coordinator = match coordinator_reservation {
            Some(port) => ServiceProcess::spawn_reserved(coordinator_spec, port).await?,
            None => ServiceProcess::spawn(coordinator_spec).await?,
        };

        let participant_binary = os::binary_path("treaty-participant")?;
        let agent_shards = if spec.in_process { 0 } else { shard_names.len() };
        let participants = futures::future::try_join_all(
            shard_names[..agent_shards]
                .iter()
                .zip(participant_reservations)
                .zip(&pgs)
                .zip(&coordinator_dials)
                .map(|(((name, port), pg), coordinator_dial)| {
                    let mut args = vec![
                        "--shard".to_string(),
                        name.clone(),
                        "--database-url".into(),
                        pg.url(&spec.database),
                        "--coordinator".into(),
                        format!("{scheme}://{coordinator_dial}"),
                        "--data-dir".into(),
                        base_dir.join(format!("participant-{name}")).display().to_string(),
                    ];
                    args.extend(tls_args.iter().cloned());
                    args.extend(spec.participant_args.iter().cloned());
                    ServiceProcess::spawn_reserved(
                        ServiceSpec {
                            name: format!("participant-{name}"),
                            binary: participant_binary.clone(),
                            args,
                            env: Vec::new(),
                            listen: port.addr(),
                            log_path: logs.join(format!("participant-{name}.log")),
                        },
                        port,
                    )
                }),
        )
        .await?;

        Ok(LocalCluster {
            coordinator,
            extra_coordinators: Vec::new(),
            participants,
            pgs,
            shard_names,
            base_dir,
            network,
            tls: spec.tls.clone(),
        })
    }

    /// `http://127.0.0.1:<port>` of the coordinator.
    pub fn coordinator_endpoint(&self) -> String {
        self.coordinator.endpoint()
    }

    /// Where clients dial the coordinator: its `client -> coordinator` proxy when proxied.
    pub fn client_endpoint(&self) -> String {
        match self.network.as_ref().and_then(|n| n.get("client", "coordinator")) {
            Some(proxy) => proxy.endpoint(),
            None => self.coordinator_endpoint(),
        }
    }

    /// A tonic endpoint for `url`, with the cluster's client TLS when the cluster runs TLS.
    pub fn endpoint_to(&self, url: &str) -> Result<tonic::transport::Endpoint, HarnessError> {
        let grpc = |source| HarnessError::Grpc {
            endpoint: url.to_owned(),
            source,
        };
        let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned()).map_err(grpc)?;
        match &self.tls {
            Some(files) => endpoint.tls_config(client_tls(files)?).map_err(grpc),
            None => Ok(endpoint),
        }
    }

    /// A connected gRPC client of the coordinator.
    pub async fn client(&self) -> Result<CoordinatorClient<Channel>, HarnessError> {
        let endpoint = self.coordinator_endpoint();
        let channel = self
            .endpoint_to(&endpoint)?
            .connect()
            .await
            .map_err(|source| HarnessError::Grpc { endpoint, source })?;
        Ok(CoordinatorClient::new(channel))
    }

    /// Starts another coordinator instance serving the same shards (direct links, its own data
    /// directory `coordinator-<id>` and log `coordinator-<id>.log`), with coordinator id `id` and
    /// `args` added. With `--decision-store shard`, any instance can finish any transaction.
    pub async fn spawn_coordinator(&self, id: &str, args: &[String]) -> Result<ServiceProcess, HarnessError> {
        self.spawn_coordinator_on(id, args, ports::reserve_loopback_port()?)
            .await
    }

    /// [`LocalCluster::spawn_coordinator`] listening on `port`, reserved before the cluster
    /// started, so that the participants could be given its address (`--coordinator`) and ask
    /// it about its transactions as they ask the cluster's own coordinator.
    pub async fn spawn_coordinator_on(
        &self,
        id: &str,
        args: &[String],
        port: PortReservation,
    ) -> Result<ServiceProcess, HarnessError> {
        let mut coordinator_args = vec![
            "--data-dir".to_string(),
            self.base_dir
                .join(format!("coordinator-{id}"))
                .display()
                .to_string(),
            "--id".into(),
            id.into(),
        ];
        coordinator_args.extend(self.tls.as_ref().map(service_tls_args).unwrap_or_default());
        for (name, participant) in self.shard_names.iter().zip(&self.participants) {
            coordinator_args.push("--shard".into());
            coordinator_args.push(format!("{name}={}", participant.endpoint()));
        }
        coordinator_args.extend(args.iter().cloned());
        ServiceProcess::spawn_reserved(
            ServiceSpec {
                name: format!("coordinator-{id}"),
                binary: os::binary_path("treaty-coordinator")?,
                args: coordinator_args,
                env: Vec::new(),
                listen: port.addr(),
                log_path: self.base_dir.join("logs").join(format!("coordinator-{id}.log")),
            },
            port,
        )
        .await
    }

    /// Like [`LocalCluster::spawn_coordinator`], keeping the instance in
    /// [`LocalCluster::extra_coordinators`]; returns its index there.
    pub async fn add_coordinator(&mut self, id: &str, args: &[String]) -> Result<usize, HarnessError> {
        let process = self.spawn_coordinator(id, args).await?;
        self.extra_coordinators.push(process);
        Ok(self.extra_coordinators.len() - 1)
    }

    /// The index of shard `name` in `pgs` and `participants`.
    pub fn shard_index(&self, name: &str) -> Option<usize> {
        self.shard_names.iter().position(|n| n == name)
    }
}
