//! Starts real PostgreSQL clusters and real Treaty processes on loopback, for the integration tests,
//! the `treaty` CLI (`dev up`, `demo`) and benchmarks.
//!
//! - `postgres`: [`PgCluster`], one `initdb`-ed PostgreSQL server in a directory of its own, run as
//!   an unprivileged user when we are root (PostgreSQL refuses to run as root);
//! - `process`: [`ServiceProcess`], a coordinator or participant child process that can be
//!   SIGKILLed and restarted on the same address;
//! - `cluster`: [`LocalCluster`], N shards (PostgreSQL + participant) and one coordinator;
//! - `proxy`: [`FaultProxy`] and [`FaultNetwork`], loopback TCP proxies that delay, black-hole or
//!   reset traffic between named endpoints, for recovery scenarios;
//! - `standby`: a synchronous streaming standby of a [`PgCluster`] (`pg_basebackup -R`), and its
//!   promotion, for tests of a decision database that fails over;
//! - `ports`: [`PortReservation`], the loopback port of everything the harness starts, reserved
//!   across processes so that parallel test processes are never handed the same port;
//! - `os`: users and binaries (where they are, whether they have failpoints).

mod cluster;
mod error;
pub mod os;
mod ports;
mod postgres;
mod process;
mod proxy;
pub mod standby;

pub use cluster::{ClusterSpec, DevCertFiles, LocalCluster, client_tls, service_tls_args};
pub use error::HarnessError;
pub use os::{binary_path, failpoints_built_in, require_failpoints};
pub use ports::{PortReservation, free_loopback_port, reserve_loopback_port};
pub use postgres::{PgCluster, PgOptions, postgres_bin_dir};
pub use process::{ServiceProcess, ServiceSpec};
pub use proxy::{Fault, FaultNetwork, FaultProxy, ProxyStats};
