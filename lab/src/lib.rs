//! `treaty-lab`: the fault-injection and measurement tooling the `treaty` command links in, kept
//! apart from its operator commands.
//!
//! - `demo`: the README's bank demo (transfers under coordinator kills, then a verdict);
//! - `scenario`: `treaty scenario run`, recovery scenarios from TOML files, with their workload,
//!   checker and timeline;
//! - `chaos`: bank transfers under random kills and proxy faults;
//! - `bench`: Treaty against hand-driven PostgreSQL two-phase commit, and 2PC beside 3PC;
//! - `fault_build`: the check, before any of the above starts a cluster, that the service
//!   binaries were built with failpoints.
//!
//! Each command's entry point returns `anyhow::Result`: they are the binary's commands.

pub mod bench;
pub mod chaos;
pub mod demo;
pub mod fault_build;
pub mod scenario;

use treaty_proto::{Protocol, pb};

/// Treaty's branches still prepared in the database a connection is on: the count every lab tool
/// waits on to say nothing was left behind.
pub(crate) const PREPARED_TREATY_GIDS_SQL: &str =
    "SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database() AND gid LIKE 'treaty:%'";

/// How Treaty reaches each shard's database, in every command that starts a cluster.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParticipantKind {
    /// A participant agent process per shard, over gRPC.
    Agent,
    /// The coordinator drives each database itself (`--shard NAME=postgres://...`): no agent.
    InProcess,
}

impl ParticipantKind {
    pub fn name(self) -> &'static str {
        match self {
            ParticipantKind::Agent => "agent",
            ParticipantKind::InProcess => "in-process",
        }
    }

    pub fn in_process(self) -> bool {
        self == ParticipantKind::InProcess
    }
}

/// `TransactionOptions.protocol` for a protocol.
pub(crate) fn wire_protocol(protocol: Protocol) -> pb::Protocol {
    match protocol {
        Protocol::TwoPhase => pb::Protocol::TwoPhase,
        Protocol::ThreePhase => pb::Protocol::ThreePhase,
    }
}
