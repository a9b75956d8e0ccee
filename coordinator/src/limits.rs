//! What one client may ask for and hold: the bounds on a transaction's options, and the counts of
//! open transactions and calls in flight, per client and in total.
//!
//! Over a count the call is refused with RESOURCE_EXHAUSTED naming the limit, its flag and its
//! value, before anything is opened; an option out of range is INVALID_ARGUMENT naming the option,
//! its value and the maximum. Other clients are unaffected: every count is per client except the
//! total, which only guards the process's memory.
//!
//! A client is its authenticated identity ([`ClientId::from_request`]) when the coordinator has an
//! access file, else its peer IP address (every connection from one host counts as one client). The cost on the hot
//! path is one short mutex hold per call (the calls in flight) and one per begin (the open
//! transactions); statements count on an atomic in their transaction.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use treaty_proto::ApiError;

/// The bounds, from the coordinator's flags (`--max-*`, README "Limits").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitSettings {
    /// Largest `timeout_ms` a transaction may ask for.
    pub max_transaction_timeout_ms: u64,
    /// Largest `idle_timeout_ms`.
    pub max_idle_timeout_ms: u64,
    /// Largest `lock_timeout_ms`.
    pub max_lock_timeout_ms: u64,
    /// Transactions one client may have open (begun, not yet decided).
    pub max_open_transactions_per_client: u32,
    /// Transactions open in all.
    pub max_open_transactions: u32,
    /// Statements in one transaction (a submit's ops count).
    pub max_statements_per_transaction: u32,
    /// Calls one client may have in flight at once.
    pub max_concurrent_calls_per_client: u32,
    /// Largest request message, in bytes (tonic's `max_decoding_message_size`).
    pub max_request_bytes: usize,
    /// Largest SQL text of one statement, in bytes (at most `treaty_proto::MAX_SQL_BYTES`).
    pub max_sql_bytes: usize,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            max_transaction_timeout_ms: 3_600_000,
            max_idle_timeout_ms: 3_600_000,
            max_lock_timeout_ms: 600_000,
            max_open_transactions_per_client: 1_000,
            max_open_transactions: 100_000,
            max_statements_per_transaction: 10_000,
            max_concurrent_calls_per_client: 256,
            max_request_bytes: 4 << 20,
            max_sql_bytes: treaty_proto::MAX_SQL_BYTES,
        }
    }
}

/// Who a call is from, for the per-client counts: the authenticated identity, or without an
/// access file the peer's IP address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientId {
    Authenticated(Arc<str>),
    Peer(IpAddr),
    /// A call without a peer address (not over TCP).
    Unknown,
}

impl ClientId {
    pub fn from_request<T>(request: &tonic::Request<T>) -> ClientId {
        if let Some(caller) = treaty_proto::auth::caller(request) {
            return ClientId::Authenticated(caller.identity().into());
        }
        request
            .remote_addr()
            .map_or(ClientId::Unknown, |addr| ClientId::Peer(addr.ip()))
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientId::Authenticated(identity) => write!(f, "client {identity}"),
            ClientId::Peer(ip) => write!(f, "client {ip}"),
            ClientId::Unknown => f.write_str("a client without a peer address"),
        }
    }
}

#[derive(Default)]
struct Usage {
    open_transactions: u32,
    calls: u32,
}

#[derive(Default)]
struct Counts {
    clients: HashMap<ClientId, Usage>,
    open_transactions: u32,
}

/// The live counts, shared by the service and every slot it hands out.
pub struct Limits {
    settings: LimitSettings,
    counts: Mutex<Counts>,
}

impl Limits {
    pub fn new(settings: LimitSettings) -> Arc<Limits> {
        Arc::new(Limits {
            settings,
            counts: Mutex::new(Counts::default()),
        })
    }

    pub fn settings(&self) -> &LimitSettings {
        &self.settings
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        // Every holder leaves the counts whole (increments and decrements only).
        self.counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a call in flight for `client` until the guard is dropped.
    pub fn enter_call(self: &Arc<Self>, client: ClientId) -> Result<CallGuard, ApiError> {
        let limit = self.settings.max_concurrent_calls_per_client;
        let mut counts = self.counts();
        let usage = counts.clients.entry(client.clone()).or_default();
        if usage.calls >= limit {
            return Err(ApiError::ResourceExhausted(format!(
                "{client} has {} calls in flight, the limit (--max-concurrent-calls-per-client) is \
                 {limit}; wait for some to finish",
                usage.calls
            )));
        }
        usage.calls += 1;
        Ok(CallGuard {
            limits: Arc::clone(self),
            client,
        })
    }

    /// Takes an open-transaction slot for `client`, held until the transaction is decided.
    pub fn open_transaction(self: &Arc<Self>, client: ClientId) -> Result<OpenSlot, ApiError> {
        let per_client = self.settings.max_open_transactions_per_client;
        let total = self.settings.max_open_transactions;
        let mut counts = self.counts();
        if counts.open_transactions >= total {
            return Err(ApiError::ResourceExhausted(format!(
                "{} transactions are open on this coordinator, the limit (--max-open-transactions) \
                 is {total}; retry later",
                counts.open_transactions
            )));
        }
        let usage = counts.clients.entry(client.clone()).or_default();
        if usage.open_transactions >= per_client {
            return Err(ApiError::ResourceExhausted(format!(
                "{client} has {} transactions open, the limit \
                 (--max-open-transactions-per-client) is {per_client}; commit or roll back some first",
                usage.open_transactions
            )));
        }
        usage.open_transactions += 1;
        counts.open_transactions += 1;
        Ok(OpenSlot {
            limits: Arc::clone(self),
            client,
        })
    }

    /// Lowers one count of `client`, forgetting the client when it holds nothing.
    fn release(&self, client: &ClientId, open_transaction: bool) {
        let mut counts = self.counts();
        if open_transaction {
            counts.open_transactions = counts.open_transactions.saturating_sub(1);
        }
        if let Some(usage) = counts.clients.get_mut(client) {
            if open_transaction {
                usage.open_transactions = usage.open_transactions.saturating_sub(1);
            } else {
                usage.calls = usage.calls.saturating_sub(1);
            }
            if usage.open_transactions == 0 && usage.calls == 0 {
                counts.clients.remove(client);
            }
        }
    }

    /// Checks a requested timeout against its maximum (0 asks for the default).
    pub fn check_timeout(option: &str, value_ms: u64, max_ms: u64) -> Result<(), ApiError> {
        if value_ms > max_ms {
            return Err(ApiError::InvalidArgument(format!(
                "{option} {value_ms} is over the maximum of {max_ms} ms (--max-{}); ask for at most \
                 that, or 0 for the default",
                option.replace('_', "-")
            )));
        }
        Ok(())
    }

    /// Checks a statement's SQL text (`op`: its index in a submit, for the message) against
    /// `--max-sql-bytes`. Past the protocol's own cap (`treaty_proto::MAX_SQL_BYTES`, which no
    /// setting raises) the request is malformed, and `validate_statement` refuses it with
    /// INVALID_ARGUMENT; under it but over the operator's lower limit, the call is refused like
    /// any other limit, with RESOURCE_EXHAUSTED naming the flag and its value.
    pub fn check_sql(&self, op: Option<usize>, sql: &str) -> Result<(), ApiError> {
        let limit = self.settings.max_sql_bytes;
        if sql.len() > limit && sql.len() <= treaty_proto::MAX_SQL_BYTES {
            let what = op.map_or_else(|| "sql".to_owned(), |index| format!("op {index} sql"));
            return Err(ApiError::ResourceExhausted(format!(
                "{what} is {} bytes, over the limit (--max-sql-bytes) of {limit} bytes; split the statement",
                sql.len()
            )));
        }
        Ok(())
    }
}

/// A call in flight; dropping it (the call ended, or its future was dropped) ends the count.
pub struct CallGuard {
    limits: Arc<Limits>,
    client: ClientId,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.limits.release(&self.client, false);
    }
}

/// An open transaction counted against its client; the driver drops it when the transaction is
/// decided (or never registered).
pub struct OpenSlot {
    limits: Arc<Limits>,
    client: ClientId,
}

impl fmt::Debug for OpenSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OpenSlot({})", self.client)
    }
}

impl Drop for OpenSlot {
    fn drop(&mut self) {
        self.limits.release(&self.client, true);
    }
}

/// A tower layer that answers a request over `--max-request-bytes` with RESOURCE_EXHAUSTED naming
/// the flag, like every other limit. tonic refuses such a message while decoding it, before any
/// handler runs, with OUT_OF_RANGE and a message that names no flag; its status comes in the
/// response's trailers, where this rewrites the code and adds the flag to the message.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestSizeLayer;

impl<S> tower_layer::Layer<S> for RequestSizeLayer {
    type Service = RequestSize<S>;

    fn layer(&self, inner: S) -> RequestSize<S> {
        RequestSize { inner }
    }
}

/// The service [`RequestSizeLayer`] wraps around the server's routes.
#[derive(Debug, Clone)]
pub struct RequestSize<S> {
    inner: S,
}

/// The start of tonic's message for a message over the decoding limit (it goes on with the size
/// found and the limit), as it is sent: percent-encoded, spaces as `%20`.
const TONIC_TOO_LARGE: &[u8] = b"Error,%20decoded%20message%20length%20too%20large";

/// A body's frames, with a too-large refusal in the trailers rewritten.
type Rewritten<B> = http_body_util::combinators::MapFrame<
    B,
    fn(http_body::Frame<<B as http_body::Body>::Data>) -> http_body::Frame<<B as http_body::Body>::Data>,
>;

/// Rewrites `headers` (a response's trailers, or its headers when it has only those) if they
/// carry tonic's refusal of a too-large message.
fn rewrite_too_large(headers: &mut http::HeaderMap) {
    let out_of_range = headers
        .get("grpc-status")
        .is_some_and(|code| code.as_bytes() == b"11");
    let Some(message) = headers.get("grpc-message") else {
        return;
    };
    if !out_of_range || !message.as_bytes().starts_with(TONIC_TOO_LARGE) {
        return;
    }
    // The message is percent-encoded; what is appended is printable ASCII without `%`, which a
    // client's decoding leaves as it is.
    let mut text = message.as_bytes().to_vec();
    text.extend_from_slice(b" (--max-request-bytes); send less in one call");
    if let Ok(message) = http::HeaderValue::from_bytes(&text) {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
        headers.insert("grpc-message", message);
    }
}

fn rewrite_frame<D>(mut frame: http_body::Frame<D>) -> http_body::Frame<D> {
    if let Some(trailers) = frame.trailers_mut() {
        rewrite_too_large(trailers);
    }
    frame
}

impl<S, B, RB> tower_service::Service<http::Request<B>> for RequestSize<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: http_body::Body,
{
    type Response = http::Response<Rewritten<RB>>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let answer = self.inner.call(request);
        Box::pin(async move {
            let mut response = answer.await?;
            rewrite_too_large(response.headers_mut());
            Ok(response.map(|body| {
                http_body_util::BodyExt::map_frame(body, rewrite_frame::<RB::Data> as fn(_) -> _)
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(last: u8) -> ClientId {
        ClientId::Peer(IpAddr::from([127, 0, 0, last]))
    }

    #[test]
    fn per_client_open_transactions_are_bounded_and_released() {
        let limits = Limits::new(LimitSettings {
            max_open_transactions_per_client: 2,
            ..LimitSettings::default()
        });
        let a = limits.open_transaction(peer(1)).unwrap();
        let _b = limits.open_transaction(peer(1)).unwrap();
        let refused = limits.open_transaction(peer(1)).unwrap_err().to_string();
        assert!(
            refused.contains("--max-open-transactions-per-client) is 2"),
            "{refused}"
        );
        // Another client is not affected.
        let _other = limits.open_transaction(peer(2)).unwrap();
        drop(a);
        limits.open_transaction(peer(1)).unwrap();
    }

    #[test]
    fn total_and_calls_are_bounded() {
        let limits = Limits::new(LimitSettings {
            max_open_transactions: 1,
            max_concurrent_calls_per_client: 1,
            ..LimitSettings::default()
        });
        let _slot = limits.open_transaction(peer(1)).unwrap();
        assert!(limits.open_transaction(peer(2)).is_err());
        let call = limits.enter_call(peer(1)).unwrap();
        assert!(limits.enter_call(peer(1)).is_err());
        limits.enter_call(peer(2)).unwrap();
        drop(call);
        limits.enter_call(peer(1)).unwrap();
    }

    #[test]
    fn timeouts_over_the_maximum_name_the_option() {
        let refused = Limits::check_timeout("timeout_ms", u64::MAX, 3_600_000)
            .unwrap_err()
            .to_string();
        assert!(refused.contains("timeout_ms 18446744073709551615"), "{refused}");
        assert!(refused.contains("3600000"), "{refused}");
        Limits::check_timeout("timeout_ms", 3_600_000, 3_600_000).unwrap();
    }

    #[test]
    fn sql_over_the_operators_limit_is_resource_exhausted() {
        let limits = Limits::new(LimitSettings {
            max_sql_bytes: 10,
            ..LimitSettings::default()
        });
        limits.check_sql(None, "SELECT 1").unwrap();
        let refused = limits.check_sql(Some(1), "SELECT 12345").unwrap_err();
        assert!(matches!(refused, ApiError::ResourceExhausted(_)), "{refused:?}");
        assert!(
            refused
                .to_string()
                .contains("op 1 sql is 12 bytes, over the limit (--max-sql-bytes) of 10"),
            "{refused}"
        );
        // Past the protocol's cap it is a malformed request, refused by `validate_statement`.
        let huge = "x".repeat(treaty_proto::MAX_SQL_BYTES + 1);
        limits.check_sql(None, &huge).unwrap();
        assert!(matches!(
            treaty_proto::validate_statement(&huge, &[]),
            Err(ApiError::InvalidArgument(_))
        ));
    }
}
