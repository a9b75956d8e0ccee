//! The participant library against a real PostgreSQL, over a real loopback gRPC server.
//!
//! Set `TREATY_TEST_DATABASE_URL` (e.g. `postgres://postgres@127.0.0.1:55432/postgres`; the server
//! needs `max_prepared_transactions > 0`); without it every test prints "skipped" and passes. Each
//! test creates its own database. `TREATY_TEST_PG_RESTART`, if set, is a shell command that
//! restarts that server (e.g. `pg_ctl -D DIR -m immediate -w restart`), used by the restart test;
//! without it that test only kills the participant's connections.

// Test code: a failed setup step should stop the test loudly.
#![allow(clippy::unwrap_used)]

mod branches;
mod recovery;
mod support;
mod values;
