//! The commit protocol as a pure state machine: one [`Transaction`] per transaction, driven by
//! [`Event`]s and answering with [`Action`]s. Nothing in here does I/O, reads a clock or touches
//! tokio: time comes in as `now_ms` arguments, and the coordinator's driver (`treaty_coordinator::driver`) carries out the
//! actions and feeds their results back. The same code is unit-tested here, and run by the service.
//!
//! Two-phase commit with presumed abort:
//! - nothing is forced before the decision; only a commit decision is forced (`PersistCommit`), and
//!   the client's commit is answered once it is durable (or once every shard applied it, on request);
//! - an abort is never logged: a transaction the log does not hold a commit for was aborted;
//! - the end record (`PersistEnd`) is lazy;
//! - one writer among the participants commits with a plain local COMMIT and writes no record; a
//!   participant that wrote nothing votes read-only and is left out of phase two.
//!
//! Three-phase commit, selected per transaction by [`Protocol::ThreePhase`]: after the votes the
//! coordinator forces a pre-commit record, pre-commits every YES voter (each records it durably
//! before acknowledging), and only then forces the commit decision. The participant's machine
//! ([`participant`]) runs the cooperative termination protocol ([`termination`]) when the
//! coordinator falls silent.
//!
//! Guarantee: 3PC finishes without the coordinator when the coordinator is down but every
//! participant of the transaction is up and reachable; with a participant also down or
//! partitioned away, it waits like 2PC; it never decides both ways, under any partition.
//!
//! Modules: `coordinator` (the coordinator's [`Transaction`]), `participant` (one branch),
//! `termination` (ballots and the termination rules), `events` (the coordinator's events and
//! actions), `answers` (what a participant's answer means: vote checking, lost messages,
//! refusals). The I/O the driver performs sits behind two traits this crate owns: `store`
//! ([`DecisionStore`], where decisions are forced) and `transport` ([`ParticipantTransport`], the
//! calls to participants), both on domain types. Their wire forms live at the edge, in
//! `treaty_proto`. The model checker (`tests/model.rs`) explores these same machines.

pub mod answers;
pub mod coordinator;
mod events;
pub mod heuristic;
pub mod participant;
pub mod store;
pub mod termination;
pub mod transport;

pub use coordinator::{Branch, BranchPhase, Phase, Protocol, Timeouts, Transaction};
pub use events::{AbortCause, AbortReason, Action, Event, Outcome, ProtocolError, Vote};
pub use store::{
    CommitRecord, DecisionStore, HeuristicDecision, HeuristicRecord, PreCommitRecord, StoreError, Unfinished,
};
pub use transport::{LinkError, ParticipantTransport};

/// Delay before the next phase-two attempt to a participant that did not answer: doubles from
/// 20 ms up to 2 s so a participant that comes back is reached quickly and one that stays down
/// costs little.
pub fn retry_delay_ms(attempts: u32) -> u64 {
    const FIRST_MS: u64 = 20;
    const MAX_MS: u64 = 2_000;
    if attempts == 0 {
        return 0;
    }
    FIRST_MS
        .saturating_mul(1u64 << (attempts - 1).min(16))
        .min(MAX_MS)
}
