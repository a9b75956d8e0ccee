//! The participant library against a real PostgreSQL, over a real loopback gRPC server.
//!
//! Each test starts a PostgreSQL cluster of its own with the test harness (initdb template, own
//! port, stopped at the end) and creates its database there. Set `TREATY_TEST_DATABASE_URL` (a
//! server with `max_prepared_transactions > 0`) to run them against an existing server instead;
//! `TREATY_TEST_PG_RESTART` is then a shell command restarting it for the restart test.

// Test code: a failed setup step should stop the test loudly.
#![allow(clippy::unwrap_used)]

mod admin;
mod branches;
mod claim;
mod decisions;
mod pool;
mod recovery;
mod roles;
mod support;
mod three_phase;
mod values;
