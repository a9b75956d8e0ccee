//! `treaty`: the command users run. The operator commands live here: `dev up`/`dev down` manage a
//! local cluster; `submit`, `list`, `txn`, `in-doubt` and `resolve` talk to a running coordinator
//! (`client`, `list`). The lab's commands come from `treaty-lab`: `demo` (the README's main job),
//! `scenario run` and `chaos` replay failures and check atomicity, and `bench` measures Treaty
//! against hand-driven PostgreSQL two-phase commit on the same databases.

mod client;
mod dev;
mod exit;
mod list;
mod ops_file;
mod token;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use treaty_lab::{bench, chaos, demo, scenario};

/// mimalloc, as the services run (see the workspace `Cargo.toml`): `treaty bench` runs the
/// embedded coordinator and the baselines' clients in this process, and glibc's malloc and free
/// were 17 % of its samples under the transfer load (session 27, perf).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "treaty", version, about = "Atomic commit across PostgreSQL shards")]
struct Cli {
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a local cluster, a bank workload with coordinator crashes, and print a verdict.
    Demo(demo::DemoArgs),
    /// Benchmark Treaty against PREPARE/COMMIT PREPARED by hand and plain COMMITs.
    Bench(bench::BenchArgs),
    /// Replay recovery scenarios (TOML files or directories of them) and check atomicity.
    Scenario {
        #[command(subcommand)]
        command: scenario::ScenarioCommand,
    },
    /// Bank transfers while random processes are killed and links fail, then the checker.
    Chaos(chaos::ChaosArgs),
    /// Manage a local development cluster.
    Dev {
        #[command(subcommand)]
        command: DevCommand,
    },
    /// Submit a one-shot cross-shard transaction from a JSON or TOML file.
    Submit {
        /// The ops file (see README: "Submitting from a file").
        file: PathBuf,
        #[command(flatten)]
        target: client::Target,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// List the transactions the coordinator tracks: txid, GID, state, protocol, shards, age.
    List(list::ListArgs),
    /// Show one transaction: state, participants, phase-two progress, outcome.
    Txn {
        /// The transaction's id, as `submit`, `list` and `in-doubt` print it.
        txid: u64,
        #[command(flatten)]
        target: client::Target,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// List prepared branches waiting for a decision on every shard: age, locks held, and what
    /// the coordinator holds for each transaction.
    InDoubt {
        #[command(flatten)]
        target: client::Target,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Decide an in-doubt transaction by hand (a heuristic decision, logged with who, when, why).
    #[command(group(clap::ArgGroup::new("decision").required(true).args(["commit", "abort"])))]
    Resolve {
        /// The in-doubt transaction's id (`treaty in-doubt` lists them).
        txid: u64,
        /// Commit the transaction's prepared branches.
        #[arg(long)]
        commit: bool,
        /// Roll back the transaction's prepared branches.
        #[arg(long)]
        abort: bool,
        /// Why (required; kept in the coordinator's log and shown by `treaty txn`).
        #[arg(long)]
        reason: String,
        /// Who decides. Default: the identity you authenticate with (certificate or token), which
        /// a coordinator with an access file records in any case; else $USER.
        #[arg(long)]
        operator: Option<String>,
        #[command(flatten)]
        target: client::Target,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Bearer tokens for clients that cannot present a certificate.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make a token: written to a private file, its hash printed as an access-file entry.
    New(token::NewArgs),
}

#[derive(Subcommand)]
enum DevCommand {
    /// Start N PostgreSQL clusters, one participant each and a coordinator; print the endpoints.
    Up(dev::UpArgs),
    /// Stop everything `dev up` started.
    Down(dev::DownArgs),
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour only for a person watching: log files stay greppable.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            // A usage error is JSON too when JSON was asked for; `--help` and `--version` are not
            // errors (clap prints them to stdout and exits 0).
            if error.use_stderr() && std::env::args().any(|arg| arg == "--json") {
                let message = error.render().to_string();
                println!("{}", exit::Failure::new(exit::Exit::Usage, message.trim()).json());
            }
            error.exit()
        }
    };
    init_tracing(cli.log_json);
    let json = cli.command.json();
    match dispatch(cli.command).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => exit::report(&error, json),
    }
}

impl Command {
    /// Whether the command was asked for JSON, so that a failure prints JSON too.
    fn json(&self) -> bool {
        match self {
            Command::Bench(args) => args.json,
            Command::Submit { json, .. }
            | Command::Txn { json, .. }
            | Command::InDoubt { json, .. }
            | Command::Resolve { json, .. } => *json,
            Command::List(args) => args.json,
            Command::Demo(args) => args.json,
            Command::Chaos(args) => args.json,
            Command::Scenario {
                command: scenario::ScenarioCommand::Run(args),
            } => args.json,
            Command::Dev { .. } | Command::Token { .. } => false,
        }
    }
}

async fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Demo(args) => demo::run(args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Scenario { command } => scenario::run(command).await,
        Command::Chaos(args) => chaos::run(args).await,
        Command::Dev {
            command: DevCommand::Up(args),
        } => dev::up(args).await,
        Command::Dev {
            command: DevCommand::Down(args),
        } => dev::down(args).await,
        Command::Token {
            command: TokenCommand::New(args),
        } => token::new(args),
        Command::Submit { file, target, json } => client::submit(&file, &target, json).await,
        Command::List(args) => list::run(&args).await,
        Command::Txn { txid, target, json } => client::show_transaction(txid, &target, json).await,
        Command::InDoubt { target, json } => client::in_doubt(&target, json).await,
        Command::Resolve {
            txid,
            commit,
            abort: _,
            reason,
            operator,
            target,
            json,
        } => client::resolve(txid, commit, reason, operator, &target, json).await,
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every flag and argument of every command says what it is for (clap adds the default).
    #[test]
    fn every_argument_has_help_text() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in command.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "treaty", &mut missing);
        assert!(missing.is_empty(), "arguments without help: {missing:?}");
        super::Cli::command().debug_assert();
    }
}
