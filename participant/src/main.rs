//! `treaty-participant`: parses configuration, sets up logging and trace export, binds, and runs the service.

use anyhow::Context;
use std::time::Duration;

use clap::Parser;
use treaty_participant::config::{Args, Config};
use treaty_proto::telemetry::TraceExport;

/// mimalloc rather than glibc's malloc: see the workspace `Cargo.toml`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    treaty_proto::process::runtime(args.worker_threads, treaty_participant::failpoints::BUILT_IN)
        .context("starting the async runtime")?
        .block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let config = Config::resolve(args).context("configuration")?;
    let traces = config.otlp_endpoint.as_ref().map(|endpoint| TraceExport {
        endpoint: endpoint.clone(),
        service_name: "treaty-participant",
        resource: vec![("treaty.shard", config.shard.to_string())],
        export_interval: config.otlp_export_interval_ms.map(Duration::from_millis),
    });
    let tracing = treaty_proto::process::init_tracing(config.log_format, traces.as_ref())
        .context("starting trace export")?;
    // The exporter is flushed whatever the outcome, so the spans of a failed start are sent too.
    let served = serve_on(config).await;
    tracing.shutdown().await;
    served
}

async fn serve_on(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    treaty_participant::run(config, listener, treaty_proto::process::shutdown_signal())
        .await
        .context("participant")?;
    Ok(())
}
