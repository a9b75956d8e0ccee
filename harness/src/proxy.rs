//! Loopback TCP fault proxies for recovery scenarios: [`FaultProxy`] sits between two Treaty
//! processes (or a process and PostgreSQL) and forwards, delays, black-holes or resets their
//! traffic on command; [`FaultNetwork`] names the links so that a test can partition endpoints by
//! name.
//!
//! This module owns the proxy tasks and the sockets they hold. Per proxy there is one accept task,
//! and per connection one task per direction (client → target, target → client). Every task watches
//! one shared [`tokio::sync::watch`] value (fault, reset epoch, shutdown), so a change reaches
//! connections that are mid-read, mid-write or mid-delay at once, and every task ends when the
//! proxy shuts down (explicitly or when its last handle is dropped).
//!
//! Semantics of [`Fault::Drop`]: bytes keep being read and are discarded. Reading on means a
//! sender never blocks on a full socket buffer: its writes succeed and it waits for answers that
//! never come, the way a process behind a partition sees it (timeouts, not errors). A byte stream
//! with a hole in it cannot continue, though (HTTP/2 framing and HPACK state would be garbage), and
//! real TCP never delivers one: so a connection that lost any byte, or its FIN, under `Drop` is
//! reset with RST as soon as the link leaves `Drop`, as if it had timed out during the partition.
//! Peers reconnect; connections that lost nothing carry on untouched.
//!
//! A proxy started with [`FaultProxy::start`] listens on a port reserved across processes
//! (`ports.rs`), held until its last handle and task are gone.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::HarnessError;
use crate::ports::{self, PortReservation};

/// What a proxy does to traffic; applies to existing and new connections immediately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    None,
    /// Forward everything, each chunk delayed by this long (in order). Chunks are pipelined: the
    /// delay is added latency, not a cap on throughput.
    Delay(Duration),
    /// Black hole: accept connections and read bytes but forward nothing in either direction (a
    /// partition / lost messages: peers see timeouts, not errors). Connections that lost bytes are
    /// reset when the fault changes (see the module documentation).
    Drop,
    /// Reset: abort every current connection with RST and reset new connections at once (peers
    /// see connection errors). Current connections are reset even if the fault is changed back
    /// right away.
    Reset,
}

/// Counters of one proxy since it started.
#[derive(Debug, Clone, Default)]
pub struct ProxyStats {
    /// Connections accepted.
    pub connections: u64,
    /// Bytes written onward, both directions together.
    pub bytes_forwarded: u64,
    /// Connections the proxy closed with RST (by a fault, by `reset_connections`, after losing
    /// bytes under `Drop`, because the target refused, or passing on a peer's reset).
    pub resets: u64,
}

/// Per read; big enough for benchmark traffic, small enough to keep per connection.
const CHUNK: usize = 32 * 1024;
/// Bytes a direction may hold back under `Delay` before it stops reading (backpressure).
const MAX_DELAYED_BYTES: usize = 2 * 1024 * 1024;
/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(20);

/// The one value every task of a proxy watches.
#[derive(Debug, Clone, Copy)]
struct Control {
    fault: Fault,
    /// Bumped by `reset_connections`: a connection accepted under an older epoch is reset.
    epoch: u64,
    shutdown: bool,
}

/// State shared by a proxy's handles and tasks.
struct Shared {
    name: String,
    addr: SocketAddr,
    target: SocketAddr,
    control: watch::Sender<Control>,
    connections: AtomicU64,
    bytes_forwarded: AtomicU64,
    resets: AtomicU64,
    /// The reservation of `addr`'s port, for a proxy [`FaultProxy::start`] placed. Here, dropped
    /// with the last task, rather than in [`Handle`], so that the port stays reserved until the
    /// accept task has closed the listener.
    _reservation: Option<PortReservation>,
}

/// Held only by [`FaultProxy`] handles (never by tasks), so that dropping the last handle shuts
/// the proxy down.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.control.send_modify(|c| c.shutdown = true);
    }
}

/// A TCP proxy on loopback whose traffic can be faulted. Clones share one proxy; it stops when
/// [`FaultProxy::shutdown`] is called or the last clone is dropped.
#[derive(Clone)]
pub struct FaultProxy {
    inner: Arc<Handle>,
}

impl fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultProxy")
            .field("name", &self.name())
            .field("addr", &self.addr())
            .field("target", &self.target())
            .field("fault", &self.fault())
            .finish()
    }
}

impl FaultProxy {
    /// Listens on 127.0.0.1:<free port>, forwards to `target` (must be loopback; refused otherwise
    /// with [`HarnessError::Invalid`]). The target need not listen yet: it is connected per
    /// accepted connection, and a refused connect resets the accepted one.
    ///
    /// The port is reserved (`ports.rs`) until the proxy is gone, rather than port 0's pick from
    /// the ephemeral range, which any outgoing connection on the machine may take once the proxy
    /// shuts down: so a proxy brought back on this address with [`FaultProxy::start_on`] while a
    /// handle of this one is still held finds it free.
    pub async fn start(name: &str, target: SocketAddr) -> Result<FaultProxy, HarnessError> {
        let port = ports::reserve_loopback_port()?;
        FaultProxy::start_with(name, port.addr(), target, Some(port)).await
    }

    /// Same, on a chosen listen address (loopback only), e.g. to bring a proxy back on the address
    /// its peers know. Reserving that port (holding a handle of the proxy that had it) is the
    /// caller's business.
    pub async fn start_on(
        name: &str,
        listen: SocketAddr,
        target: SocketAddr,
    ) -> Result<FaultProxy, HarnessError> {
        FaultProxy::start_with(name, listen, target, None).await
    }

    async fn start_with(
        name: &str,
        listen: SocketAddr,
        target: SocketAddr,
        reservation: Option<PortReservation>,
    ) -> Result<FaultProxy, HarnessError> {
        // Loopback only: the harness must never relay or expose traffic beyond this machine.
        if !target.ip().is_loopback() {
            return Err(HarnessError::Invalid(format!(
                "proxy {name}: target {target} is not a loopback address"
            )));
        }
        if !listen.ip().is_loopback() {
            return Err(HarnessError::Invalid(format!(
                "proxy {name}: listen address {listen} is not a loopback address"
            )));
        }
        let listener = TcpListener::bind(listen)
            .await
            .map_err(HarnessError::io(format!("proxy {name}: binding {listen}")))?;
        let addr = listener.local_addr().map_err(HarnessError::io(format!(
            "proxy {name}: reading its bound address"
        )))?;
        let (control, _) = watch::channel(Control {
            fault: Fault::None,
            epoch: 0,
            shutdown: false,
        });
        let shared = Arc::new(Shared {
            name: name.to_string(),
            addr,
            target,
            control,
            connections: AtomicU64::new(0),
            bytes_forwarded: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            _reservation: reservation,
        });
        tokio::spawn(accept_loop(Arc::clone(&shared), listener));
        tracing::debug!(proxy = name, %addr, %target, "fault proxy listening");
        Ok(FaultProxy {
            inner: Arc::new(Handle { shared }),
        })
    }

    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    pub fn name(&self) -> &str {
        &self.shared().name
    }

    /// Where the proxy listens: give this to the peer instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.shared().addr
    }

    /// `http://<addr>`, for gRPC clients.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.shared().addr)
    }

    pub fn target(&self) -> SocketAddr {
        self.shared().target
    }

    /// Changes the fault; existing connections react at once.
    pub fn set(&self, fault: Fault) {
        self.shared().control.send_if_modified(|c| {
            let changed = c.fault != fault;
            c.fault = fault;
            // Tasks see only the latest value: after `set(Reset); set(None)` they might never see
            // `Reset`. The epoch makes the reset of current connections stick regardless.
            if fault == Fault::Reset {
                c.epoch += 1;
                return true;
            }
            changed
        });
        tracing::debug!(proxy = self.name(), ?fault, "fault set");
    }

    pub fn fault(&self) -> Fault {
        self.shared().control.borrow().fault
    }

    /// Aborts every current connection with RST once, leaving the fault setting as it is.
    pub fn reset_connections(&self) {
        self.shared().control.send_modify(|c| c.epoch += 1);
    }

    pub fn stats(&self) -> ProxyStats {
        let shared = self.shared();
        ProxyStats {
            connections: shared.connections.load(Ordering::Relaxed),
            bytes_forwarded: shared.bytes_forwarded.load(Ordering::Relaxed),
            resets: shared.resets.load(Ordering::Relaxed),
        }
    }

    /// Stops listening and closes every connection (also on drop of the last handle). The tasks
    /// end promptly but asynchronously: the port is free once the accept task has run.
    pub fn shutdown(&self) {
        self.shared().control.send_modify(|c| c.shutdown = true);
    }
}

/// Accepts until shutdown; each connection gets a task of its own.
async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut control = shared.control.subscribe();
    loop {
        if control.borrow_and_update().shutdown {
            break;
        }
        tokio::select! {
            biased;
            changed = control.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    shared.connections.fetch_add(1, Ordering::Relaxed);
                    // The epoch at accept time: a `reset_connections` after this resets it.
                    let epoch = control.borrow().epoch;
                    tracing::trace!(proxy = %shared.name, %peer, "accepted");
                    tokio::spawn(connection(Arc::clone(&shared), client, epoch));
                }
                Err(error) => {
                    tracing::warn!(proxy = %shared.name, %error, "accept failed");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            }
        }
    }
    tracing::debug!(proxy = %shared.name, "fault proxy stopped");
}

/// How a connection (or one direction of it) ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The FIN was passed on; the other direction carries on.
    Done,
    /// RST both sockets.
    Abort,
    /// The proxy shut down: close without ceremony.
    Close,
}

/// What both directions of one connection share.
struct Conn {
    /// Set by the first direction that aborts, so that the other aborts too.
    abort: watch::Sender<bool>,
    /// A byte or FIN was discarded under `Drop`: the stream has a hole and must not resume.
    lossy: AtomicBool,
}

/// Sets SO_LINGER 0 so that closing sends RST. Errors are ignored: the socket may already be
/// dead, which is what we want anyway.
fn arm_reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

/// Ends with RST, counting it.
fn reset_stream(shared: &Shared, stream: TcpStream) {
    arm_reset(&stream);
    shared.resets.fetch_add(1, Ordering::Relaxed);
    drop(stream);
}

/// One accepted connection: waits out `Drop` (discarding), connects the target, then runs the two
/// directions.
async fn connection(shared: Arc<Shared>, mut client: TcpStream, epoch: u64) {
    let mut control = shared.control.subscribe();
    let mut lossy = false;
    let mut eof = false;
    let mut buf = vec![0u8; CHUNK];
    // Before the target is connected: react to Reset/Drop/shutdown without touching the target.
    loop {
        let c = *control.borrow_and_update();
        if c.shutdown {
            return;
        }
        if c.fault == Fault::Reset || c.epoch != epoch || (lossy && c.fault != Fault::Drop) {
            reset_stream(&shared, client);
            return;
        }
        if c.fault != Fault::Drop {
            break;
        }
        tokio::select! {
            biased;
            changed = control.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            read = client.read(&mut buf), if !eof => match read {
                // Bytes or the FIN lost: the stream cannot resume, the reset follows on heal.
                Ok(n) => {
                    lossy = true;
                    eof = n == 0;
                }
                Err(_) => return, // The client reset us; there is nothing upstream to tell.
            }
        }
    }
    drop(buf);
    let target = shared.target;
    // A loopback connect is quick, but one to a full backlog can hang for the SYN retries: keep
    // watching for shutdown and resets meanwhile. `Drop` is the pumps' business once they start.
    let connect = TcpStream::connect(target);
    tokio::pin!(connect);
    let upstream = loop {
        tokio::select! {
            biased;
            changed = control.changed() => {
                if changed.is_err() {
                    return;
                }
                let c = *control.borrow_and_update();
                if c.shutdown {
                    return;
                }
                if c.fault == Fault::Reset || c.epoch != epoch {
                    reset_stream(&shared, client);
                    return;
                }
            }
            connected = &mut connect => break connected,
        }
    };
    let upstream = match upstream {
        Ok(upstream) => upstream,
        Err(error) => {
            // The client's connect already succeeded (we accepted it), so a reset is the nearest
            // thing to "connection refused" we can give it.
            tracing::debug!(proxy = %shared.name, %target, %error, "target unreachable");
            reset_stream(&shared, client);
            return;
        }
    };
    // Small RPCs must not wait for Nagle; the peers behind us made the same choice.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (abort, _) = watch::channel(false);
    let conn = Arc::new(Conn {
        abort,
        lossy: AtomicBool::new(false),
    });
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let outbound = Pump::new(&shared, &conn, epoch, client_read, upstream_write);
    let inbound = Pump::new(&shared, &conn, epoch, upstream_read, client_write);
    tokio::spawn(outbound.run());
    inbound.run().await;
}

/// A chunk held back by `Delay`; `None` bytes is the FIN.
struct Delayed {
    due: Instant,
    bytes: Option<Vec<u8>>,
}

/// One direction of a connection: reads `reader`, writes `writer`.
struct Pump {
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    control: watch::Receiver<Control>,
    abort: watch::Receiver<bool>,
    epoch: u64,
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    /// Reused for every read.
    buf: Vec<u8>,
    delayed: VecDeque<Delayed>,
    delayed_bytes: usize,
    /// The reader reached EOF.
    eof: bool,
}

impl Pump {
    fn new(
        shared: &Arc<Shared>,
        conn: &Arc<Conn>,
        epoch: u64,
        reader: OwnedReadHalf,
        writer: OwnedWriteHalf,
    ) -> Pump {
        Pump {
            shared: Arc::clone(shared),
            conn: Arc::clone(conn),
            control: shared.control.subscribe(),
            abort: conn.abort.subscribe(),
            epoch,
            reader,
            writer,
            buf: vec![0u8; CHUNK],
            delayed: VecDeque::new(),
            delayed_bytes: 0,
            eof: false,
        }
    }

    async fn run(mut self) {
        let end = match self.pump().await {
            Ok(()) => End::Done,
            Err(end) => end,
        };
        if end == End::Abort {
            // Both sockets close with RST once both directions have dropped their halves; the
            // other direction learns of it through `abort`.
            arm_reset(self.reader.as_ref());
            arm_reset(self.writer.as_ref());
            if !self.conn.abort.send_replace(true) {
                self.shared.resets.fetch_add(1, Ordering::Relaxed);
            }
            // Dropping a write half would send a FIN first; the peer must see the RST alone.
            self.writer.forget();
        }
    }

    /// What to do now, from the latest control value. Under `Drop` the delayed chunks are lost.
    fn check(&mut self) -> Result<Fault, End> {
        let c = *self.control.borrow_and_update();
        if c.shutdown {
            return Err(End::Close);
        }
        if *self.abort.borrow_and_update() || c.fault == Fault::Reset || c.epoch != self.epoch {
            return Err(End::Abort);
        }
        if c.fault == Fault::Drop {
            if !self.delayed.is_empty() {
                self.delayed.clear();
                self.delayed_bytes = 0;
                self.conn.lossy.store(true, Ordering::Relaxed);
            }
            return Ok(Fault::Drop);
        }
        if self.conn.lossy.load(Ordering::Relaxed) {
            return Err(End::Abort);
        }
        Ok(c.fault)
    }

    async fn pump(&mut self) -> Result<(), End> {
        loop {
            let fault = self.check()?;
            let due = self.delayed.front().map(|d| d.due);
            let can_read = !self.eof && self.delayed_bytes < MAX_DELAYED_BYTES;
            tokio::select! {
                biased;
                changed = self.control.changed() => {
                    if changed.is_err() {
                        return Err(End::Close);
                    }
                }
                _ = self.abort.changed() => {}
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    if let Some(delayed) = self.delayed.pop_front() {
                        match delayed.bytes {
                            Some(bytes) => {
                                self.delayed_bytes -= bytes.len();
                                self.write(&bytes).await?;
                            }
                            None => return self.finish().await,
                        }
                    }
                }
                read = self.reader.read(&mut self.buf), if can_read => {
                    let n = read.map_err(|_| End::Abort)?;
                    self.forward(fault, n).await?;
                    if self.eof && self.delayed.is_empty() && fault != Fault::Drop {
                        return self.finish().await;
                    }
                }
            }
        }
    }

    /// Passes on `n` bytes just read into `buf` (0: EOF) under `fault`.
    async fn forward(&mut self, fault: Fault, n: usize) -> Result<(), End> {
        if n == 0 {
            self.eof = true;
        }
        match fault {
            Fault::Drop => {
                self.conn.lossy.store(true, Ordering::Relaxed);
                Ok(())
            }
            Fault::Delay(delay) => {
                let bytes = (n > 0).then(|| self.buf[..n].to_vec());
                self.delayed_bytes += n;
                self.delayed.push_back(Delayed {
                    due: Instant::now() + delay,
                    bytes,
                });
                Ok(())
            }
            // Chunks still delayed from an earlier `Delay` go first: order is kept.
            Fault::None | Fault::Reset if !self.delayed.is_empty() => {
                let bytes = (n > 0).then(|| self.buf[..n].to_vec());
                self.delayed_bytes += n;
                self.delayed.push_back(Delayed {
                    due: Instant::now(),
                    bytes,
                });
                Ok(())
            }
            Fault::None | Fault::Reset => {
                if n > 0 {
                    // Take the buffer out so that `write` can borrow `self`; no allocation.
                    let buf = std::mem::take(&mut self.buf);
                    let written = self.write(&buf[..n]).await;
                    self.buf = buf;
                    written?;
                }
                Ok(())
            }
        }
    }

    /// Writes all of `bytes` unless the fault changes to `Drop` meanwhile (the rest is lost) or
    /// the connection must end. A write that cannot progress (the receiver does not read) still
    /// sees every control change.
    async fn write(&mut self, bytes: &[u8]) -> Result<(), End> {
        let mut written = 0;
        while written < bytes.len() {
            if self.check()? == Fault::Drop {
                self.conn.lossy.store(true, Ordering::Relaxed);
                return Ok(());
            }
            tokio::select! {
                biased;
                changed = self.control.changed() => {
                    if changed.is_err() {
                        return Err(End::Close);
                    }
                }
                _ = self.abort.changed() => {}
                // A cancelled `write` has written nothing, so looping loses no bytes.
                result = self.writer.write(&bytes[written..]) => {
                    let n = result.map_err(|_| End::Abort)?;
                    if n == 0 {
                        return Err(End::Abort);
                    }
                    written += n;
                    self.shared.bytes_forwarded.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    /// Passes the FIN on: half-close, so the other direction can still finish its answer.
    async fn finish(&mut self) -> Result<(), End> {
        self.writer.shutdown().await.map_err(|_| End::Abort)?;
        Err(End::Done)
    }
}

/// Named endpoints connected through proxies, so that links can be cut by name. A link `from →
/// to` carries the connections `from` opens to `to` (both directions of their bytes).
#[derive(Debug, Default)]
pub struct FaultNetwork {
    links: BTreeMap<(String, String), FaultProxy>,
}

impl FaultNetwork {
    pub fn new() -> FaultNetwork {
        FaultNetwork::default()
    }

    /// Adds a proxy carrying traffic from endpoint `from` to endpoint `to` (listening at
    /// `target`); returns it. Give `from` the proxy's address for `to`. A second link for the same
    /// pair is refused.
    pub async fn link(
        &mut self,
        from: &str,
        to: &str,
        target: SocketAddr,
    ) -> Result<FaultProxy, HarnessError> {
        let key = (from.to_string(), to.to_string());
        if self.links.contains_key(&key) {
            return Err(HarnessError::Invalid(format!(
                "link {from} -> {to} already exists"
            )));
        }
        let proxy = FaultProxy::start(&format!("{from}->{to}"), target).await?;
        self.links.insert(key, proxy.clone());
        Ok(proxy)
    }

    pub fn get(&self, from: &str, to: &str) -> Option<&FaultProxy> {
        self.links.get(&(from.to_string(), to.to_string()))
    }

    /// Drops all traffic between `a` and `b`, both ways: every link from any of `a` to any of `b`
    /// and from any of `b` to any of `a` is set to [`Fault::Drop`].
    pub fn partition(&self, a: &[&str], b: &[&str]) {
        self.set_between(a, b, Fault::Drop);
    }

    /// Sets `fault` on every link from any of `a` to any of `b` and from `b` to `a`.
    pub fn set_between(&self, a: &[&str], b: &[&str], fault: Fault) {
        for ((from, to), proxy) in &self.links {
            let (from, to) = (from.as_str(), to.as_str());
            if (a.contains(&from) && b.contains(&to)) || (b.contains(&from) && a.contains(&to)) {
                proxy.set(fault);
            }
        }
    }

    /// Every link back to [`Fault::None`].
    pub fn heal(&self) {
        for proxy in self.links.values() {
            proxy.set(Fault::None);
        }
    }

    /// Every link as `(from, to, proxy)`, ordered by `from`, then `to`.
    pub fn links(&self) -> impl Iterator<Item = (&str, &str, &FaultProxy)> {
        self.links
            .iter()
            .map(|((from, to), proxy)| (from.as_str(), to.as_str(), proxy))
    }
}
