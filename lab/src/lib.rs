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

/// `TransactionOptions.protocol` for a protocol.
pub(crate) fn wire_protocol(protocol: Protocol) -> pb::Protocol {
    match protocol {
        Protocol::TwoPhase => pb::Protocol::TwoPhase,
        Protocol::ThreePhase => pb::Protocol::ThreePhase,
    }
}
