//! The coordinator inside an application's own process: the same engine, decision store,
//! in-process participants, recovery and gRPC service as `treaty-coordinator`, with the
//! application's transactions handed to the service's handlers directly instead of over a
//! loopback HTTP/2 connection.
//!
//! Why it exists: the client's gRPC hop to a separate coordinator process costs about as much CPU
//! as everything the protocol adds (docs/performance.md, "Session 26"); without it the commit path
//! is within a few percent of driving PostgreSQL by hand.
//!
//! What it keeps: everything. The instance still serves gRPC on `config.listen` (its in-process
//! participants ask it about prepared branches there during recovery, agents on other shards ask
//! it for decisions, operators use `treaty` against it, and its console and metrics serve as
//! configured); a crash of the application is a crash of the coordinator, recovered by starting it
//! again on the same `--data-dir` (or, with `--decision-store shard` and agents, by another
//! instance's takeover). The application's calls pass the service's validation and limits as one
//! client (`ClientId::Unknown`): statement and SQL checks, per-client and total open transactions,
//! calls in flight, statements per transaction, timeouts. What they skip is what only a network
//! peer needs: the access file (the application is the coordinator's own process, so its
//! statements run under each participant's own database role, as a caller's with no
//! `database_role` does) and `--max-request-bytes` (nothing is decoded).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use futures::FutureExt as _;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::{Request, Status};
use treaty_proto::pb;
use treaty_proto::pb::coordinator_server::Coordinator as _;

use crate::config::Config;
use crate::service::CoordinatorService;
use crate::{CoordinatorEngine, CoordinatorError};

/// A running coordinator in this process. `stop` stops it as SIGTERM stops the service; dropping
/// the last handle starts the same stop in the background (cut short if the runtime ends first:
/// a crash). A crash of the application is a crash of the coordinator: its next start on the
/// same `--data-dir` finishes what it left.
pub struct Embedded {
    service: CoordinatorService,
    engine: Arc<CoordinatorEngine>,
    addr: std::net::SocketAddr,
    endpoint: String,
    /// Held (read) by every call of the application's for its length; `stop` takes it (write)
    /// once they are done and closes it, as the service drains its calls before it stops.
    open: tokio::sync::RwLock<bool>,
    /// Dropped (or sent) to stop it: `serve`'s shutdown future ends either way.
    stop: Mutex<Option<oneshot::Sender<()>>>,
    task: Mutex<Option<JoinHandle<Result<(), CoordinatorError>>>>,
}

/// Aborts the spawned start if `start` itself is dropped before it answers, so that no
/// coordinator runs that nobody holds: a crash at whatever point the start had reached, which the
/// next start recovers from like any other.
struct StartGuard(Option<JoinHandle<Result<(), CoordinatorError>>>);

impl Drop for StartGuard {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

impl Embedded {
    /// Opens the decision log, recovers, starts the in-process participants and the gRPC service
    /// on `config.listen`, and returns once the coordinator serves; a start that fails returns its
    /// error (a shard that cannot be reached, a log of another coordinator, an earlier run's work).
    pub async fn start(config: Config) -> Result<Embedded, CoordinatorError> {
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(CoordinatorError::ListenAddr)?;
        let (ready_tx, ready_rx) = oneshot::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            // A dropped sender (the handle dropped) stops it too.
            let _ = stopped.await;
        };
        let mut guard = StartGuard(Some(tokio::spawn(crate::serve(
            config,
            listener,
            shutdown,
            Some(ready_tx),
        ))));
        let ready = match ready_rx.await {
            Ok(ready) => ready,
            // The start failed before it served: its error, or a panic's.
            Err(_) => {
                let task = guard.0.take().expect("set above");
                return Err(match task.await {
                    Ok(Err(error)) => error,
                    Ok(Ok(())) => CoordinatorError::Store("the coordinator stopped while starting".into()),
                    Err(join) => CoordinatorError::Join(join),
                });
            }
        };
        Ok(Embedded {
            service: CoordinatorService::new(ready.engine.clone(), ready.limits),
            engine: ready.engine,
            addr: ready.addr,
            endpoint: ready.endpoint,
            open: tokio::sync::RwLock::new(true),
            stop: Mutex::new(Some(stop)),
            task: Mutex::new(guard.0.take()),
        })
    }

    /// Where it serves gRPC (for `treaty --coordinator`, agents and the participants' recovery).
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// The URL this process reaches that listener at (loopback for a listener on every interface;
    /// `https://` when it serves TLS).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// False once it stopped, whether asked to or because serving failed (`stop` says why).
    pub fn is_running(&self) -> bool {
        lock(&self.task).as_ref().is_some_and(|task| !task.is_finished())
    }

    /// The engine, for what the gRPC API does not carry.
    pub fn engine(&self) -> &Arc<CoordinatorEngine> {
        &self.engine
    }

    /// A one-shot transaction: every op, then commit; the answer says committed or aborted, and why.
    pub async fn submit(&self, request: pb::SubmitRequest) -> Result<pb::SubmitResponse, Status> {
        let call = self.service.submit(Request::new(request));
        Ok(self.guarded(call).await?.into_inner())
    }

    /// Opens an interactive transaction; its statements follow with `execute`.
    pub async fn begin(&self, options: Option<pb::TransactionOptions>) -> Result<u64, Status> {
        let call = self.service.begin(Request::new(pb::BeginRequest { options }));
        Ok(self.guarded(call).await?.into_inner().txid)
    }

    /// One statement of an interactive transaction (`last`: the shard's last, which carries its vote).
    pub async fn execute(&self, request: pb::ExecuteRequest) -> Result<pb::ExecuteResult, Status> {
        let call = self.service.execute(Request::new(request));
        Ok(self.guarded(call).await?.into_inner())
    }

    /// Commits an interactive transaction: the outcome is final once this answers.
    pub async fn commit(&self, txid: u64, wait_for_apply: bool) -> Result<pb::Outcome, Status> {
        let call = self
            .service
            .commit(Request::new(pb::CommitRequest { txid, wait_for_apply }));
        Ok(self.guarded(call).await?.into_inner())
    }

    /// Rolls an interactive transaction back.
    pub async fn rollback(&self, txid: u64) -> Result<pb::Outcome, Status> {
        let call = self.service.rollback(Request::new(pb::RollbackRequest { txid }));
        Ok(self.guarded(call).await?.into_inner())
    }

    /// What this coordinator knows of a transaction.
    pub async fn transaction(&self, txid: u64) -> Result<pb::TransactionInfo, Status> {
        let call = self
            .service
            .get_transaction(Request::new(pb::GetTransactionRequest { txid }));
        Ok(self.guarded(call).await?.into_inner())
    }

    /// Runs one call of the application's while it is admitted (`enter`). A panic in the handler
    /// (a bug) ends that call as INTERNAL, as a broken gRPC call would end for a remote client,
    /// which the client reads as an unknown outcome, instead of unwinding into the application.
    async fn guarded<T>(&self, call: impl Future<Output = Result<T, Status>>) -> Result<T, Status> {
        let _open = self.enter().await?;
        match AssertUnwindSafe(call).catch_unwind().await {
            Ok(answer) => answer,
            Err(_) => Err(Status::internal(
                "the coordinator in this process panicked while handling the call (a bug, logged \
                 on stderr): its outcome is unknown; look the transaction up before running it again",
            )),
        }
    }

    /// Admits one call of the application's, unless it was stopped.
    async fn enter(&self) -> Result<tokio::sync::RwLockReadGuard<'_, bool>, Status> {
        let open = self.open.read().await;
        if *open {
            Ok(open)
        } else {
            Err(Status::failed_precondition(
                "the coordinator in this process was stopped (Embedded::stop); start it again to run transactions",
            ))
        }
    }

    /// Waits for the application's calls in flight and refuses new ones, then stops serving,
    /// flushes the log and stops the in-process participants, as `treaty-coordinator` does on
    /// SIGTERM; its error if serving had failed. Calls after the first return at once. The data
    /// directory is free for another start once the last handle (clients and transactions hold
    /// one) is dropped.
    pub async fn stop(&self) -> Result<(), CoordinatorError> {
        *self.open.write().await = false;
        if let Some(stop) = lock(&self.stop).take() {
            let _ = stop.send(());
        }
        let task = lock(&self.task).take();
        match task {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl std::fmt::Debug for Embedded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedded")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}
