//! Treaty's domain types, shared by the protocol core, the wire edge and the services: ids and
//! GIDs (`ids`), SQL values (`value`), the PostgreSQL role a client's statements run under
//! (`database_role`), the
//! commit protocol's name (`protocol`), the clock (`clock`), and the one redactor of passwords in
//! connection strings with the `SecretUrl` type that keeps them (`secret`). This crate has no I/O, no async runtime and no wire code,
//! so that `treaty-commit-protocol` can depend on it alone.

pub mod clock;
mod database_role;
mod ids;
mod protocol;
pub mod secret;
#[cfg(feature = "testing")]
pub mod testing;
pub mod value;

pub use clock::{Clock, SystemClock, now_ms};
pub use database_role::{DatabaseRole, DatabaseRoleError, MAX_DATABASE_ROLE_BYTES};
pub use ids::{BranchGid, CoordinatorId, GID_PREFIX, Gid, IdError, ShardName, TxId};
pub use protocol::{Protocol, UnknownProtocol};
pub use secret::{SecretUrl, SecretUrlError, redact};
pub use value::{Value, ValueError};
