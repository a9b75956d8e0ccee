//! `treaty-participant`: parses configuration, sets up logging, binds, and runs the service.

use anyhow::Context;
use clap::Parser;
use treaty_participant::config::{Args, Config};

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    treaty_proto::process::runtime(args.worker_threads)
        .context("starting the async runtime")?
        .block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let config = Config::resolve(args).context("configuration")?;
    treaty_proto::process::init_tracing(config.log_format);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    treaty_participant::run(config, listener, treaty_proto::process::shutdown_signal())
        .await
        .context("participant")?;
    Ok(())
}
