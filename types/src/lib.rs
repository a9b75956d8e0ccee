//! Treaty's domain types, shared by the protocol core, the wire edge and the services: ids and
//! GIDs (`ids`), SQL values (`value`). This crate has no I/O, no async runtime and no wire code,
//! so that `treaty-commit-protocol` can depend on it alone.

mod ids;
pub mod value;

pub use ids::{BranchGid, CoordinatorId, GID_PREFIX, Gid, IdError, ShardName, TxId};
pub use value::{Value, ValueError};
