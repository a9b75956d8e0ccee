//! What both service binaries (`treaty-coordinator`, `treaty-participant`) do the same way around
//! their service: the async runtime they run on, the signals that stop them gracefully, and their
//! logs and traces (`--log-format`, `RUST_LOG`, `--otlp-endpoint`: [`init_tracing`]). Behind the `process` feature, so library
//! users of the wire types do not pull in tokio's runtime.

/// How a service writes its logs (`--log-format`, `log_format` in its `--config` file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// The filter when `RUST_LOG` is unset. PostgreSQL notices (e.g. "there is no transaction in
/// progress" after a failed PREPARE) are not the operator's business unless asked for.
const DEFAULT_FILTER: &str = "info,sqlx::postgres::notice=error";

/// sqlx's parsing of connect options and of the passfile logs at WARN with the secrets in it.
const QUIET_SQLX_OPTIONS: &str = "sqlx_postgres::options=error";

/// Stderr with every log line passed through the one redactor (`treaty_types::secret::redact`):
/// a URL or `password=` that reaches a log line by any path (a dependency's message, an error's
/// text) shows no password. The fmt layer writes each event in one `write`, so a line is never
/// split between two redactions.
struct RedactingStderr;

impl std::io::Write for RedactingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr()
            .lock()
            .write_all(crate::redact(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Sets up logging to stderr for the whole process, filtered by `RUST_LOG` (default: INFO), and,
/// with `traces`, the export of Treaty's spans over OTLP (`crate::telemetry`). Must run inside
/// the runtime when `traces` is given; the guard flushes the last spans at shutdown.
pub fn init_tracing(
    format: LogFormat,
    traces: Option<&crate::telemetry::TraceExport>,
) -> Result<crate::telemetry::TracingGuard, crate::telemetry::TelemetryError> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_FILTER));
    // Whatever RUST_LOG says: sqlx's connect-option warnings quote a value it did not know
    // (`?sslpassword=...`) or a malformed passfile line whole (its password with it).
    if let Ok(quiet) = QUIET_SQLX_OPTIONS.parse() {
        filter = filter.add_directive(quiet);
    }
    let logs = tracing_subscriber::fmt::layer()
        // Colour only for a person watching: log files stay greppable.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(|| RedactingStderr);
    // The log filter applies to the log lines only: trace export picks its own spans (DEBUG
    // ones included), so turning it on changes no log line.
    let logs = match format {
        LogFormat::Json => logs.json().with_filter(filter).boxed(),
        LogFormat::Human => logs.with_filter(filter).boxed(),
    };
    let registry = tracing_subscriber::registry().with(logs);
    let Some(traces) = traces else {
        registry.init();
        return Ok(crate::telemetry::TracingGuard::off());
    };
    let provider = crate::telemetry::start_export(traces)?;
    registry.with(crate::telemetry::otel_layer(&provider)).init();
    tracing::info!(endpoint = %traces.endpoint, "exporting traces over OTLP");
    Ok(crate::telemetry::TracingGuard::on(provider))
}

/// The service's runtime: `worker_threads` workers (tokio's default, one per core, when `None`).
/// Fewer workers help when the services share a small machine with the databases
/// (docs/performance.md). One thread is tokio's current-thread scheduler, not a pool of one: the
/// service then runs its tasks on the thread that serves it, with no hand-over between the main
/// thread and a worker and no cross-thread wake-up per I/O event (measured in docs/performance.md,
/// session 25: about 10 % less coordinator CPU per transfer than a one-worker pool).
///
/// `failpoints`: the binary is a fault-injection build. It keeps a pool even for one thread: a
/// failpoint's sleep or pause blocks its task through `block_in_place`, which needs a pool, and a
/// pause ends only when the `Admin` service, served by another thread meanwhile, clears it.
pub fn runtime(worker_threads: Option<u16>, failpoints: bool) -> std::io::Result<tokio::runtime::Runtime> {
    if worker_threads == Some(1) && !failpoints {
        return tokio::runtime::Builder::new_current_thread().enable_all().build();
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(threads) = worker_threads {
        runtime.worker_threads(usize::from(threads));
    }
    runtime.build()
}

/// Completes on Ctrl-C or SIGTERM (graceful shutdown); only Ctrl-C where SIGTERM cannot be
/// listened for.
pub async fn shutdown_signal() {
    signalled().await;
    tracing::info!("shutting down");
}

async fn signalled() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use tokio::runtime::RuntimeFlavor;

    use super::runtime;

    #[test]
    fn one_thread_is_the_current_thread_scheduler_unless_failpoints_need_a_pool() {
        let one = runtime(Some(1), false).expect("a one-thread runtime");
        assert_eq!(one.handle().runtime_flavor(), RuntimeFlavor::CurrentThread);
        // Spawned tasks run on it while the service's future is driven.
        let answer = one.block_on(async { tokio::spawn(async { 7 }).await });
        assert_eq!(answer.expect("the spawned task ran"), 7);
        let two = runtime(Some(2), false).expect("a two-thread runtime");
        assert_eq!(two.handle().runtime_flavor(), RuntimeFlavor::MultiThread);
        let default = runtime(None, false).expect("the default runtime");
        assert_eq!(default.handle().runtime_flavor(), RuntimeFlavor::MultiThread);
        // A fault-injection build keeps a pool, so that a failpoint's pause can be released.
        let injected = runtime(Some(1), true).expect("a fault-injection build's runtime");
        assert_eq!(injected.handle().runtime_flavor(), RuntimeFlavor::MultiThread);
    }
}
