//! A Rust client for Treaty's coordinators (`treaty.v1.Coordinator`): it takes a list of
//! coordinator endpoints, fails over between them, and never sends a call again that may already
//! have been carried out.
//!
//! ```no_run
//! # async fn example() -> Result<(), treaty_client::ClientError> {
//! use treaty_client::{Client, pb};
//!
//! let client = Client::connect(["http://10.0.0.1:7600", "http://10.0.0.2:7600"]).await?;
//! let response = client
//!     .submit(pb::SubmitRequest {
//!         ops: vec![
//!             treaty_client::op("s0", "UPDATE accounts SET balance = balance - 25 WHERE id = 17"),
//!             treaty_client::op("s1", "UPDATE accounts SET balance = balance + 25 WHERE id = 18"),
//!         ],
//!         ..Default::default()
//!     })
//!     .await?;
//! assert!(treaty_client::committed(response.outcome.as_ref()));
//! # Ok(())
//! # }
//! ```
//!
//! # Failover
//!
//! [`Client::connect`] connects to the first endpoint that answers, in the order given, and
//! remembers the list. A call goes to the current endpoint; when that coordinator cannot be
//! reached the client moves on round-robin through the list (each endpoint tried at most once per
//! call), and the endpoint that answered becomes the current one. Whether a call is sent again
//! depends on what is known about its first sending:
//!
//! - **Not sent** (connecting failed: tonic reports a `ConnectError`, or the connection could not
//!   be opened within the connect timeout): any call moves to the next endpoint, since no
//!   coordinator saw it.
//! - **Maybe sent** (the connection broke, the answer was `UNAVAILABLE`, `UNKNOWN`, `INTERNAL`,
//!   `CANCELLED`, `DATA_LOSS` or `DEADLINE_EXCEEDED`, or the request timeout passed): only calls
//!   that are safe to repeat move on: the read-only calls that mean the same on every instance
//!   ([`Client::info`], [`Client::list_transactions`], [`Client::list_in_doubt`]) and
//!   [`Client::begin`]. A begun transaction that is never used is aborted by its coordinator's
//!   idle timeout (`TransactionOptions::idle_timeout_ms`, default the coordinator's
//!   `--idle-timeout-ms`, 30 s; the machine's `Active` deadline in
//!   `commit-protocol/src/coordinator.rs`), and it holds nothing on any shard until a statement
//!   runs, so a begin repeated elsewhere costs a txid, not a lock. A [`Client::submit`] or a
//!   transaction's `execute`, `commit` or `rollback` is **never** sent again: it fails with
//!   [`ClientError::OutcomeUnknown`], naming the endpoint (and the txid when it is known), and the
//!   caller must look the transaction up ([`Client::transaction_on`], [`Transaction::status`])
//!   before deciding to run it again.
//! - **Answered** (any other gRPC status, e.g. `INVALID_ARGUMENT`, `NOT_FOUND`, `ABORTED`,
//!   `FAILED_PRECONDITION`): the coordinator decided; the status is returned as
//!   [`ClientError::Rpc`] and nothing moves.
//!
//! # Transactions are pinned to the instance that began them
//!
//! A txid is allocated by one coordinator instance from its own store and its GID is
//! `treaty:<coordinator id>:<txid>`: txid 5 of one instance and txid 5 of another are different
//! transactions. Only the instance that began a transaction serves its `Execute`, `Commit`,
//! `Rollback` and `GetTransaction` (another answers `NOT_FOUND`, or about its own txid 5); other
//! instances only finish the *decided* transactions of an instance that died, through the
//! participants (decision rows, `--takeover-after-ms`), never through client calls. So
//! [`Client::begin`] returns a [`Transaction`] bound to the endpoint that began it, and every call
//! on it goes there and nowhere else: when that coordinator cannot be reached the call fails with
//! [`ClientError::CoordinatorUnreachable`]. An uncommitted transaction of an instance that went
//! away is aborted (its idle timeout, or presumed abort when it restarts), so begin again.
//! For the same reason the calls that take a txid on [`Client`] ([`Client::transaction`],
//! [`Client::resolve`]) go to the current endpoint only, and [`Client::transaction_on`] asks a
//! named one (the `endpoint` of an `OutcomeUnknown`).
//!
//! # Timeouts
//!
//! [`ClientBuilder`]: connect timeout (default 2 s) per endpoint, request timeout (default 75 s,
//! above the coordinator's default 60 s transaction timeout, so a slow submit is ended by the
//! coordinator's own timeout with a clear outcome rather than by the client with an unknown one).

mod client;
mod error;
mod trace_context;
mod transaction;

pub use client::{Client, ClientBuilder, DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT};
pub use error::{ClientError, EndpointFailure, Rpc};
/// TLS settings for `https://` coordinators ([`ClientBuilder::tls`]).
pub use tonic::transport::{Certificate, ClientTlsConfig, Identity};
pub use transaction::Transaction;
pub use treaty_proto::pb;

/// An op of a one-shot submit with no parameters and no row-count check.
pub fn op(shard: impl Into<String>, sql: impl Into<String>) -> pb::Op {
    pb::Op {
        shard: shard.into(),
        sql: sql.into(),
        params: Vec::new(),
        expect_rows: None,
    }
}

/// Whether an outcome says COMMITTED (`None`, as a response without one, is not).
pub fn committed(outcome: Option<&pb::Outcome>) -> bool {
    outcome.is_some_and(|o| o.kind == pb::OutcomeKind::Committed as i32)
}
