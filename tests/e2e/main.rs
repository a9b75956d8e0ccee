//! End-to-end tests: real PostgreSQL clusters started by the harness, real `treaty-coordinator` and
//! `treaty-participant` processes, real gRPC over loopback. One test binary, grouped by theme.

mod auth;
mod bad_input;
mod bench;
mod cli;
mod commit;
mod console;
mod coordinators;
mod database_roles;
mod decision_database;
mod decision_rows;
mod embedded;
mod failpoints;
mod fixture;
mod health;
mod in_doubt;
mod in_process;
mod limits;
mod metrics;
mod recovery;
mod scenarios;
mod secrets;
mod shared_server;
mod standby;
mod three_phase;
mod tls;
mod traces;
