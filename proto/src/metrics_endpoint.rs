//! The Prometheus scrape endpoint both services serve on `--metrics-addr`: `GET /metrics` answers
//! a `prometheus_client` registry in the OpenMetrics text format (which Prometheus scrapes), after
//! the service's [`Refresh`] has read the state its gauges show. It is a small HTTP/1.1 listener
//! of its own, apart from the gRPC port: a scraper needs no gRPC, and the port can be kept off the
//! network the clients use. Behind the `process` feature, like the rest of what both binaries share.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// The client library the services register their metrics with (this crate's version of it).
pub use prometheus_client;
use prometheus_client::registry::Registry;

/// What Prometheus expects from an OpenMetrics exposition.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Scrapes served at once; further connections wait to be accepted, so a client retrying in a
/// loop cannot pile up work (each scrape may read the database, `Refresh`).
const CONCURRENT_CONNECTIONS: usize = 4;

/// A connection that takes longer than this (a stalled or slow client) is dropped, freeing its turn.
const CONNECTION_LIMIT: Duration = Duration::from_secs(30);

/// Runs before each scrape is encoded: reads the state that gauges show (the participant's
/// prepared branches, for one), off the commit path. Bounded by the caller's own timeouts.
pub type Refresh = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum MetricsEndpointError {
    #[error("binding the metrics address {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A bound metrics listener, not serving yet: the address is known (and announced) first.
pub struct MetricsEndpoint {
    listener: TcpListener,
    addr: SocketAddr,
}

impl MetricsEndpoint {
    pub async fn bind(addr: SocketAddr) -> Result<MetricsEndpoint, MetricsEndpointError> {
        let bind_error = |source| MetricsEndpointError::Bind { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        Ok(MetricsEndpoint { listener, addr })
    }

    /// The address it listens on (the port chosen when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves scrapes on a task of its own until that task is aborted.
    pub fn spawn(self, registry: Registry, refresh: Option<Refresh>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(serve(self.listener, Arc::new(registry), refresh))
    }
}

/// Tells whoever started the process where its metrics are served, on stdout before the
/// `listening on` line (the test harness and `treaty dev up` read it).
pub fn announce(addr: SocketAddr) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    // Nobody reading stdout is not a reason to stop serving.
    let _ = writeln!(stdout, "metrics on {addr}");
    let _ = stdout.flush();
}

async fn serve(listener: TcpListener, registry: Arc<Registry>, refresh: Option<Refresh>) {
    let turns = Arc::new(Semaphore::new(CONCURRENT_CONNECTIONS));
    loop {
        let Ok(turn) = Arc::clone(&turns).acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors, say: wait a little rather than spin.
                tracing::warn!("accepting a metrics connection: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (registry, refresh) = (Arc::clone(&registry), refresh.clone());
        tokio::spawn(async move {
            let service = service_fn(move |request| answer(request, Arc::clone(&registry), refresh.clone()));
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            // Past the limit the connection is simply dropped: a scraper retries on its own.
            if let Ok(Err(error)) = tokio::time::timeout(CONNECTION_LIMIT, connection).await {
                tracing::debug!("metrics connection: {error}");
            }
            drop(turn);
        });
    }
}

async fn answer(
    request: Request<Incoming>,
    registry: Arc<Registry>,
    refresh: Option<Refresh>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.uri().path() != "/metrics" {
        return Ok(plain(
            StatusCode::NOT_FOUND,
            "not found; metrics are at /metrics\n",
        ));
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return Ok(plain(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n"));
    }
    if let Some(refresh) = &refresh {
        refresh().await;
    }
    let mut body = String::with_capacity(16 * 1024);
    if let Err(error) = prometheus_client::encoding::text::encode(&mut body, &registry) {
        tracing::warn!("encoding metrics: {error}");
        return Ok(plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding the metrics failed\n",
        ));
    }
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
    Ok(response)
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn metrics_are_served_after_the_refresh_and_other_paths_are_not_found() {
        let mut registry = Registry::default();
        let counter = Counter::<u64>::default();
        registry.register("treaty_test_things", "Things", counter.clone());
        let refreshed = Counter::<u64>::default();
        let seen = refreshed.clone();
        let refresh: Refresh = Arc::new(move || {
            let seen = seen.clone();
            Box::pin(async move {
                seen.inc();
            })
        });
        let endpoint = MetricsEndpoint::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = endpoint.local_addr();
        let serving = endpoint.spawn(registry, Some(refresh));
        counter.inc();

        let response = get(addr, "/metrics").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains(OPENMETRICS), "{response}");
        assert!(response.contains("treaty_test_things_total 1"), "{response}");
        assert!(response.trim_end().ends_with("# EOF"), "{response}");
        assert_eq!(
            refreshed.get(),
            1,
            "the refresh ran before the scrape was encoded"
        );

        let response = get(addr, "/").await;
        assert!(response.starts_with("HTTP/1.1 404"), "{response}");
        serving.abort();
    }
}
