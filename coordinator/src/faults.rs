//! The coordinator's failpoints as decorators over the core's two traits: [`FaultyStore`] around
//! the decision store (a failed or half-done forced write, a dropped or failed end record) and
//! [`FaultyTransport`] around the participant transport (a round of prepares, commits or
//! pre-commits where the first is sent alone and the others are then failed or lost). The driver
//! has no failpoint of its own. Compiled only with the `failpoints` feature; without it
//! [`install`] hands the store and the transport back unchanged.
//!
//! A step's failpoints apply to transactions this process decided (their commit or pre-commit
//! record went through this store), not to a recovered transaction's re-drive, so that a restart
//! with the same `--failpoints` converges (docs/failpoints.md).

#[cfg(feature = "failpoints")]
mod rounds;

#[cfg(feature = "failpoints")]
pub use rounds::{FaultyStore, FaultyTransport};

/// The store and transport the engine runs on: wrapped in the failpoint decorators in a
/// fault-injection build, as they are otherwise.
#[cfg(feature = "failpoints")]
pub fn install<S, T>(store: S, transport: T) -> (FaultyStore<S>, FaultyTransport<T>) {
    rounds::install(store, transport)
}

#[cfg(not(feature = "failpoints"))]
pub fn install<S, T>(store: S, transport: T) -> (S, T) {
    (store, transport)
}
