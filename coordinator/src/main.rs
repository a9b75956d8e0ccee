//! `treaty-coordinator`: parses configuration, sets up logging, binds, and runs the service.

use anyhow::Context;
use clap::Parser;
use treaty_coordinator::config::{Args, Config, LogFormat};

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour only for a person watching: log files stay greppable.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    treaty_proto::process::runtime(args.worker_threads)
        .context("starting the async runtime")?
        .block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let config = Config::resolve(args).context("configuration")?;
    init_tracing(config.log_format);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    treaty_coordinator::run(config, listener, treaty_proto::process::shutdown_signal())
        .await
        .context("coordinator")?;
    Ok(())
}
