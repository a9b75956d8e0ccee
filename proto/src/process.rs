//! What both service binaries (`treaty-coordinator`, `treaty-participant`) do the same way around
//! their service: the async runtime they run on and the signals that stop them gracefully.
//! Behind the `process` feature, so library users of the wire types do not pull in tokio's runtime.

/// A multi-threaded runtime with `worker_threads` workers (tokio's default, one per core, when
/// `None`). Fewer workers help when the services share a small machine with the databases
/// (docs/performance.md).
pub fn runtime(worker_threads: Option<u16>) -> std::io::Result<tokio::runtime::Runtime> {
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
