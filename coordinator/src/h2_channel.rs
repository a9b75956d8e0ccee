//! The gRPC channel to one participant: one HTTP/2 connection driven by the `h2` crate directly,
//! connected on first use and again after it breaks, with keep-alive pings.
//!
//! Why not tonic's `Channel`: it puts every call through a buffer task and hyper's dispatch task,
//! and hyper holds a request's body until h2 grants the new stream send capacity, which only
//! happens once the connection task has already written the HEADERS frame. So every call the
//! coordinator makes left as two writes (HEADERS, then DATA), woke the participant twice, and
//! cost the coordinator a `writev` and two task hand-offs more than needed. Here a unary
//! request's body is in memory before the stream opens, so it is queued with the HEADERS and
//! both leave in one write; the caller's task talks to the connection task directly.
//!
//! When traces are exported, each call carries the caller's span as a W3C `traceparent` header
//! (`treaty_proto::telemetry::inject_current`), so the participant's spans join the transaction's
//! trace.
//!
//! Errors are `tonic::Status`. A call the participant certainly did not act on is sent once more
//! before it fails: one that never reached the wire (the connection was already closed), one
//! above the last stream a `GOAWAY` says was processed (a participant shutting down), or one
//! reset with `REFUSED_STREAM` (RFC 9113 §8.7: "no application processing"). If the second try
//! fails the same way, the call is `UNAVAILABLE`, which is always safe to retry. Any other
//! failure after the request was sent is mapped from the HTTP/2 error the way tonic maps it (an
//! I/O failure is `UNKNOWN`: the participant may have acted on it).

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::client::SendRequest;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body::{Body, Frame};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tonic::Status;

/// Ping the participant this often; a missing pong after `KEEP_ALIVE_TIMEOUT` drops the
/// connection, so calls fail and the next one reconnects instead of waiting on a dead peer.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Flow-control windows as hyper's client sets them: large enough that no unary message waits.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;

/// A cheap handle (clone per call) on one participant's connection.
#[derive(Clone)]
pub struct H2Channel {
    inner: Arc<Inner>,
}

struct Inner {
    /// `host:port`, as dialled; shared with every response body (for its error messages) without
    /// a copy per call.
    address: Arc<str>,
    scheme: Scheme,
    authority: Authority,
    /// With an `https://` URL: the TLS client and the name the participant's certificate must
    /// carry.
    tls: Option<Tls>,
    connect_timeout: Duration,
    keep_alive: KeepAlive,
    /// The live connection, if any. Held only to clone or replace it, never across an await.
    current: Mutex<Option<Connection>>,
    /// Serialises connects, so a burst of calls after a break opens one connection, not many.
    /// Holds the last attempt's failure, which the calls that waited for that attempt share.
    connecting: Arc<tokio::sync::Mutex<Option<String>>>,
    /// Connect attempts finished so far; the next attempt's number is its connection's id.
    attempts: AtomicU64,
    /// Pongs received on any connection (tests await keep-alive rounds with it).
    pongs: Arc<AtomicU64>,
}

struct Tls {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

#[derive(Debug, Clone, Copy)]
struct KeepAlive {
    interval: Duration,
    timeout: Duration,
}

#[derive(Clone)]
struct Connection {
    id: u64,
    sender: SendRequest<Bytes>,
}

/// Why a URL cannot be a participant's address.
#[derive(Debug, thiserror::Error)]
pub enum ChannelUrlError {
    #[error("not a URL: {0}")]
    Parse(#[from] http::uri::InvalidUri),
    #[error("the scheme must be http:// (TLS is not supported), found {0:?}")]
    Scheme(String),
    #[error("the URL has no host")]
    NoHost,
    #[error("an https:// participant needs --link-tls-ca (the CA that signs the participants' certificates)")]
    NoTls,
}

impl H2Channel {
    /// A channel to `url` (`http://host:port`, or `https://host:port` with `tls`, the client
    /// side of `--link-tls-*`). Nothing connects until the first call.
    pub fn new(
        url: &str,
        connect_timeout: Duration,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Self, ChannelUrlError> {
        let keep_alive = KeepAlive {
            interval: KEEP_ALIVE_INTERVAL,
            timeout: KEEP_ALIVE_TIMEOUT,
        };
        Self::with_keep_alive(url, connect_timeout, keep_alive, tls)
    }

    fn with_keep_alive(
        url: &str,
        connect_timeout: Duration,
        keep_alive: KeepAlive,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Self, ChannelUrlError> {
        let uri: Uri = url.parse()?;
        let scheme = uri.scheme().cloned().unwrap_or(Scheme::HTTP);
        let authority = uri.authority().cloned().ok_or(ChannelUrlError::NoHost)?;
        let tls = if scheme == Scheme::HTTP {
            None
        } else if scheme == Scheme::HTTPS {
            let config = tls.ok_or(ChannelUrlError::NoTls)?;
            // The name the server's certificate must carry: an IP address or a DNS name.
            let name = ServerName::try_from(authority.host().trim_matches(['[', ']']).to_owned())
                .map_err(|_| ChannelUrlError::NoHost)?;
            Some(Tls {
                connector: tokio_rustls::TlsConnector::from(config),
                name,
            })
        } else {
            return Err(ChannelUrlError::Scheme(scheme.to_string()));
        };
        let default_port = if tls.is_some() { 443 } else { 80 };
        let address: Arc<str> = format!(
            "{}:{}",
            authority.host(),
            authority.port_u16().unwrap_or(default_port)
        )
        .into();
        Ok(Self {
            inner: Arc::new(Inner {
                address,
                scheme,
                authority,
                tls,
                connect_timeout,
                keep_alive,
                current: Mutex::new(None),
                connecting: Arc::new(tokio::sync::Mutex::new(None)),
                attempts: AtomicU64::new(0),
                pongs: Arc::new(AtomicU64::new(0)),
            }),
        })
    }
}

#[cfg(test)]
mod tests;

impl tower_service::Service<Request<tonic::body::Body>> for H2Channel {
    type Response = Response<ResponseBody>;
    type Error = Status;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Status>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        // Readiness (a connection, a free stream) is awaited inside the call.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: Request<tonic::body::Body>) -> Self::Future {
        // Here, in the caller's span (the transaction's phase), rather than in the future: the
        // participant's span continues this one. Nothing is formatted unless exporting.
        treaty_proto::telemetry::inject_current(request.headers_mut());
        let inner = self.inner.clone();
        Box::pin(async move { inner.send(request).await })
    }
}

impl Inner {
    async fn send(
        self: &Arc<Self>,
        request: Request<tonic::body::Body>,
    ) -> Result<Response<ResponseBody>, Status> {
        let (mut parts, body) = request.into_parts();
        let body = collect(body).await?;
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.uri = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()
            .map_err(|e| Status::internal(format!("building the request URI for {}: {e}", self.address)))?;
        parts.version = http::Version::HTTP_2;
        // h2 consumes the request even when it refuses it, so the second try needs a copy made
        // beforehand (the headers are the only allocation: the URI and body are reference
        // counted).
        let mut first_try = Request::new(());
        *first_try.method_mut() = parts.method.clone();
        *first_try.uri_mut() = parts.uri.clone();
        *first_try.version_mut() = parts.version;
        *first_try.headers_mut() = parts.headers.clone();
        let response = match self.send_once(first_try, body.clone()).await {
            Err(Failure::NotProcessed(first)) => {
                // The next ready sender is the same connection if it still takes streams, or a
                // new one if it is closing (h2 refuses new streams after a GOAWAY).
                tracing::debug!(address = %self.address, %first, "call not processed; sending it again");
                crate::metrics::global().link_retry();
                self.send_once(Request::from_parts(parts, ()), body).await
            }
            first => first,
        }
        .map_err(Failure::into_status)?;
        Ok(response.map(|recv| ResponseBody {
            recv,
            address: self.address.clone(),
            data_done: false,
            done: false,
        }))
    }

    /// One try. `NotProcessed` when the participant certainly did not act on the request.
    async fn send_once(
        self: &Arc<Self>,
        request: Request<()>,
        body: Bytes,
    ) -> Result<Response<h2::RecvStream>, Failure> {
        let mut sender = self.ready_sender().await.map_err(Failure::Other)?;
        let end_of_stream = body.is_empty();
        let (response, mut stream) = sender
            .send_request(request, end_of_stream)
            .map_err(|e| self.not_processed("request not sent to", &e))?;
        if !end_of_stream {
            // Queued without waiting for send capacity: h2 writes it right after the HEADERS once
            // the stream opens. The body is one message already in memory, so nothing unbounded
            // is buffered.
            stream
                .send_data(body, true)
                .map_err(|e| self.not_processed("request not sent to", &e))?;
        }
        response.await.map_err(|error| {
            let refused = error.is_remote()
                && (error.is_go_away() || error.reason() == Some(h2::Reason::REFUSED_STREAM));
            if refused {
                self.not_processed("request refused unprocessed by", &error)
            } else {
                Failure::Other(sent_and_failed(&self.address, &error))
            }
        })
    }

    /// A sender ready for one more stream: the live connection's, or a new connection's.
    async fn ready_sender(self: &Arc<Self>) -> Result<SendRequest<Bytes>, Status> {
        let live = self.lock_current().clone();
        let dead = match live {
            Some(connection) => match connection.sender.ready().await {
                Ok(sender) => return Ok(sender),
                Err(_) => Some(connection.id),
            },
            None => None,
        };
        let seen = self.attempts.load(Ordering::Acquire);
        let last_failure = self.connecting.clone().lock_owned().await;
        // Another call may have connected while this one waited.
        let live = self.lock_current().clone();
        if let Some(connection) = live
            && Some(connection.id) != dead
            && let Ok(sender) = connection.sender.ready().await
        {
            return Ok(sender);
        }
        if self.attempts.load(Ordering::Acquire) != seen
            && let Some(failure) = last_failure.as_ref()
        {
            // The attempt this call waited for failed: share its answer rather than queue
            // another full connect timeout behind it.
            return Err(Status::unavailable(failure.clone()));
        }
        // The connect runs in its own task, holding the lock: a caller whose deadline passes
        // mid-connect does not cancel it, and the calls waiting behind get its outcome.
        let inner = self.clone();
        let connected = tokio::spawn(async move {
            let mut last_failure = last_failure;
            // Stable while the lock is held: only the holder ends an attempt.
            let id = inner.attempts.load(Ordering::Acquire);
            let result = inner.connect(id).await;
            match &result {
                Ok(connection) => {
                    *inner.lock_current() = Some(connection.clone());
                    *last_failure = None;
                }
                Err(status) => *last_failure = Some(status.message().to_owned()),
            }
            inner.attempts.fetch_add(1, Ordering::Release);
            result
        })
        .await
        .map_err(|e| Status::unavailable(format!("connecting to {} did not finish: {e}", self.address)))??;
        connected
            .sender
            .ready()
            .await
            .map_err(|e| self.not_processed("request not sent to", &e).into_status())
    }

    async fn connect(self: &Arc<Self>, id: u64) -> Result<Connection, Status> {
        let unavailable =
            |what: String| Status::unavailable(format!("cannot connect to {}: {what}", self.address));
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&*self.address))
            .await
            .map_err(|_| {
                unavailable(format!(
                    "no answer within {} ms",
                    self.connect_timeout.as_millis()
                ))
            })?
            .map_err(|e| unavailable(e.to_string()))?;
        tcp.set_nodelay(true).map_err(|e| unavailable(e.to_string()))?;
        match &self.tls {
            None => self.handshake(tcp, id).await,
            Some(tls) => {
                let stream =
                    tokio::time::timeout(self.connect_timeout, tls.connector.connect(tls.name.clone(), tcp))
                        .await
                        .map_err(|_| unavailable("no TLS handshake within the connect timeout".into()))?
                        .map_err(|e| unavailable(format!("TLS handshake: {e}")))?;
                self.handshake(stream, id).await
            }
        }
    }

    /// The HTTP/2 handshake on a connected stream (TCP, or TLS over TCP), and the task that drives
    /// the connection and its keep-alive pings.
    async fn handshake<T>(self: &Arc<Self>, io: T, id: u64) -> Result<Connection, Status>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let unavailable =
            |what: String| Status::unavailable(format!("cannot connect to {}: {what}", self.address));
        let (sender, mut connection) = tokio::time::timeout(
            self.connect_timeout,
            h2::client::Builder::new()
                .enable_push(false)
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .handshake::<_, Bytes>(io),
        )
        .await
        .map_err(|_| unavailable("no HTTP/2 handshake within the connect timeout".into()))?
        .map_err(|e| unavailable(format!("HTTP/2 handshake: {e}")))?;
        let ping_pong = connection.ping_pong();
        let owner = Arc::downgrade(self);
        let every = self.keep_alive;
        let pongs = self.pongs.clone();
        tokio::spawn(async move {
            let outcome = tokio::select! {
                result = &mut connection => match result {
                    Ok(()) => "closed".to_string(),
                    Err(error) => error.to_string(),
                },
                reason = keep_alive(ping_pong, every, &pongs) => reason,
            };
            // Closed before it is forgotten: a call that still picks it up fails as not sent.
            drop(connection);
            forget(&owner, id, &outcome);
        });
        tracing::debug!(address = %self.address, id, "connected to participant");
        crate::metrics::global().link_connected();
        Ok(Connection { id, sender })
    }

    fn lock_current(&self) -> std::sync::MutexGuard<'_, Option<Connection>> {
        // The guarded value is always whole (a clone or a replacement), so a panic elsewhere
        // while holding the lock leaves nothing half-done.
        self.current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The participant did not act on the request: `UNAVAILABLE`, safe to send again.
    fn not_processed(&self, what: &str, error: &h2::Error) -> Failure {
        Failure::NotProcessed(Status::unavailable(format!("{what} {}: {error}", self.address)))
    }
}

/// Why one try of a call failed.
enum Failure {
    /// The participant did not act on the request (`UNAVAILABLE`): it may be sent again.
    NotProcessed(Status),
    /// Anything else, coded as the caller gets it.
    Other(Status),
}

impl Failure {
    fn into_status(self) -> Status {
        match self {
            Failure::NotProcessed(status) | Failure::Other(status) => status,
        }
    }
}

/// Drops the connection's handle once its task ends, so the next call reconnects at once.
fn forget(owner: &Weak<Inner>, id: u64, outcome: &str) {
    let Some(inner) = owner.upgrade() else {
        return;
    };
    tracing::debug!(address = %inner.address, id, outcome, "connection to participant ended");
    let mut current = inner.lock_current();
    if current.as_ref().is_some_and(|c| c.id == id) {
        *current = None;
    }
}

/// Pings forever; returns (ending the connection) when a pong does not come back in time.
async fn keep_alive(ping_pong: Option<h2::PingPong>, every: KeepAlive, pongs: &AtomicU64) -> String {
    let Some(mut ping_pong) = ping_pong else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(every.interval).await;
        match tokio::time::timeout(every.timeout, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {
                pongs.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(error)) => return format!("keep-alive ping failed: {error}"),
            Err(_) => {
                return format!("no keep-alive pong within {} ms", every.timeout.as_millis());
            }
        }
    }
}

/// A failure after the request may have reached the participant, coded as tonic codes it.
fn sent_and_failed(address: &str, error: &h2::Error) -> Status {
    use h2::Reason;
    use tonic::Code;
    // tonic's table (`Status::code_from_h2`), which follows gRPC's PROTOCOL-HTTP2.md.
    let code = match error.reason() {
        Some(
            Reason::NO_ERROR
            | Reason::PROTOCOL_ERROR
            | Reason::INTERNAL_ERROR
            | Reason::FLOW_CONTROL_ERROR
            | Reason::SETTINGS_TIMEOUT
            | Reason::FRAME_SIZE_ERROR
            | Reason::COMPRESSION_ERROR
            | Reason::CONNECT_ERROR,
        ) => Code::Internal,
        Some(Reason::REFUSED_STREAM) => Code::Unavailable,
        Some(Reason::CANCEL) => Code::Cancelled,
        Some(Reason::ENHANCE_YOUR_CALM) => Code::ResourceExhausted,
        Some(Reason::INADEQUATE_SECURITY) => Code::PermissionDenied,
        _ => Code::Unknown,
    };
    Status::new(code, format!("h2 protocol error talking to {address}: {error}"))
}

/// A unary request's body: the one encoded message (frames, should there be several, joined).
async fn collect(mut body: tonic::body::Body) -> Result<Bytes, Status> {
    let mut message = Bytes::new();
    while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let Ok(data) = frame?.into_data() else {
            continue; // request trailers: gRPC clients send none
        };
        message = if message.is_empty() {
            data
        } else {
            let mut joined = BytesMut::with_capacity(message.len() + data.len());
            joined.extend_from_slice(&message);
            joined.extend_from_slice(&data);
            joined.freeze()
        };
    }
    Ok(message)
}

/// A response's body: its DATA frames, then its trailers (where gRPC puts the status).
pub struct ResponseBody {
    recv: h2::RecvStream,
    address: Arc<str>,
    data_done: bool,
    done: bool,
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if !this.data_done {
            match this.recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(data))) => {
                    // Read, so the window opens again for the next message.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(error))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(sent_and_failed(&this.address, &error))));
                }
                Poll::Ready(None) => this.data_done = true,
            }
        }
        match this.recv.poll_trailers(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(trailers)) => {
                this.done = true;
                Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))))
            }
            Poll::Ready(Err(error)) => {
                this.done = true;
                Poll::Ready(Some(Err(sent_and_failed(&this.address, &error))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.recv.is_end_stream()
    }
}
