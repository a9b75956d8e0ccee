//! The web console (`--console-addr`, off unless given): an HTTP/1 server on axum beside the gRPC
//! service, owning its pages, its JSON endpoints and its resolve form. It reads the coordinator's
//! state through the same functions the gRPC service answers with (`views`) and renders HTML on
//! the server (`html`), with a small script (`console.js`) that refreshes each page's live region
//! every 2 s. It decides nothing: a resolve goes through `Engine::resolve` and the core's rules,
//! exactly as the `Resolve` RPC does.
//!
//! There is no authentication until roles exist (issue 17): the console is meant to be bound to
//! loopback. What it does to limit harm meanwhile: state changes only by POST (a GET of `/resolve`
//! is refused), a resolve needs a reason and an operator, a cross-site POST (its `Origin` or
//! `Sec-Fetch-Site` says so) is refused, a request naming a host other than an IP address or
//! `localhost` is refused (a web page that rebinds its own DNS name to 127.0.0.1 would otherwise
//! be same-origin with the console), and a strict Content-Security-Policy allows no inline
//! script, so even a value that escaped escaping could not run.
//!
//! Pages: `/transactions` (filters `state`, `label`, `shard`, `limit`), `/transactions/{txid}`
//! (the timeline), `/in-doubt` (prepared branches with age and locks, and the resolve form),
//! `POST /resolve`. JSON: `/api/transactions`, `/api/transactions/{txid}`, `/api/in-doubt`. Each
//! page with `?live=1` answers `{"html": <its live region>, "refreshed_at": ...}`.

mod html;
mod views;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use treaty_commit_protocol::store::HeuristicDecision;
use treaty_proto::ApiError;

use crate::CoordinatorEngine;
use crate::driver::ResolveRequest;
use views::Filters;

/// How long the in-doubt page waits for each participant's `ListPrepared` (a shard that does not
/// answer in time is shown as unreachable, and the page still renders).
const PARTICIPANT_TIMEOUT_MS: u64 = 1_500;
/// In-doubt fan-outs running at once: many open tabs refreshing must not multiply the load on
/// the participants without bound.
const CONCURRENT_FANOUTS: usize = 4;

const CSS: &str = include_str!("console.css");
const SCRIPT: &str = include_str!("console.js");
/// No inline script or style at all: only the console's own two files, and only same-origin
/// fetches and form posts.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("binding the console to {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("serving the console: {0}")]
    Serve(std::io::Error),
}

struct Console {
    engine: Arc<CoordinatorEngine>,
    fanouts: Semaphore,
    /// The coordinator authenticates its callers (`--access-file`): the console, which has no
    /// login, only shows, so that nobody decides a transaction under a name they did not prove.
    read_only: bool,
}

/// Binds the console's address (so that a bad one fails the start, before the coordinator says it
/// is listening).
pub async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener, ConsoleError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ConsoleError::Bind { addr, source })
}

/// Serves the console on `listener` until `shutdown` completes.
pub async fn serve(
    engine: Arc<CoordinatorEngine>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    read_only: bool,
) -> Result<(), ConsoleError> {
    axum::serve(listener, router(engine, read_only))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(ConsoleError::Serve)
}

fn router(engine: Arc<CoordinatorEngine>, read_only: bool) -> Router {
    let console = Arc::new(Console {
        engine,
        fanouts: Semaphore::new(CONCURRENT_FANOUTS),
        read_only,
    });
    Router::new()
        .route("/", get(|| async { redirect("/transactions") }))
        .route(
            "/console.css",
            get(|| async { asset("text/css; charset=utf-8", CSS) }),
        )
        .route(
            "/console.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route("/transactions", get(transactions_page))
        .route("/transactions/find", get(find_transaction))
        .route("/transactions/{txid}", get(transaction_page))
        .route("/in-doubt", get(in_doubt_page))
        .route("/resolve", post(resolve))
        .route("/api/transactions", get(transactions_json))
        .route("/api/transactions/{txid}", get(transaction_json))
        .route("/api/in-doubt", get(in_doubt_json))
        .fallback(|| async {
            plain(
                StatusCode::NOT_FOUND,
                "no such page: try /transactions or /in-doubt",
            )
        })
        .layer(axum::middleware::from_fn(only_address_hosts))
        .with_state(console)
}

/// Whether a `Host` header names the console by address (`127.0.0.1:7680`, `[::1]:7680`) or as
/// `localhost`: what a browser on the machine, an SSH tunnel or a reverse proxy's default sends.
/// Any other name may be a page that rebound its DNS name to this address.
fn address_host(host: &str) -> bool {
    if let Some(rest) = host.strip_prefix('[') {
        // `[v6]:port`: an IPv6 literal.
        return rest
            .split_once(']')
            .is_some_and(|(ip, _)| ip.parse::<std::net::Ipv6Addr>().is_ok());
    }
    let name = host.rsplit_once(':').map_or(host, |(name, _port)| name);
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

async fn only_address_hosts(request: Request, next: Next) -> Response {
    let host = request.headers().get(header::HOST).map(|value| value.to_str());
    match host {
        Some(Ok(host)) if !address_host(host) => plain(
            StatusCode::MISDIRECTED_REQUEST,
            "the console answers only requests addressed to its IP address or localhost \
             (a reverse proxy must send Host as the console's address)",
        ),
        Some(Err(_)) => plain(StatusCode::BAD_REQUEST, "the Host header is not text"),
        _ => next.run(request).await,
    }
}

// ---- responses ----

/// Headers every console response carries: never cached (the state shown must be current), never
/// sniffed, never framed.
fn with_headers(status: StatusCode, content_type: &'static str, body: String) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    response
}

fn html_response(status: StatusCode, body: String) -> Response {
    with_headers(status, "text/html; charset=utf-8", body)
}

fn plain(status: StatusCode, text: &str) -> Response {
    with_headers(status, "text/plain; charset=utf-8", format!("{text}\n"))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    with_headers(StatusCode::OK, content_type, body.to_owned())
}

fn redirect(to: &str) -> Response {
    let mut response = with_headers(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", String::new());
    if let Ok(location) = HeaderValue::from_str(to) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

fn json<T: Serialize>(value: &T) -> Response {
    match serde_json::to_string(value) {
        Ok(body) => with_headers(StatusCode::OK, "application/json", body),
        Err(error) => plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("encoding the answer as JSON: {error}"),
        ),
    }
}

/// A page's live region, as its script asks for it.
#[derive(Serialize)]
struct Live {
    html: String,
    refreshed_at: String,
}

fn live(html: String, now_ms: u64) -> Response {
    json(&Live {
        html,
        refreshed_at: html::timestamp(now_ms),
    })
}

fn message(engine: &CoordinatorEngine, status: StatusCode, title: &str, class: &str, text: &str) -> Response {
    html_response(
        status,
        html::message_page(
            title,
            engine.id().as_str(),
            class,
            text,
            r#"<a href="/transactions">Transactions</a> · <a href="/in-doubt">In doubt</a>"#,
        ),
    )
}

// ---- requests ----

fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

fn wants_live(pairs: &[(String, String)]) -> bool {
    pairs.iter().any(|(key, value)| key == "live" && value == "1")
}

fn parse_txid(text: &str) -> Result<u64, String> {
    text.trim()
        .parse::<u64>()
        .ok()
        .filter(|txid| *txid > 0)
        .ok_or_else(|| {
            format!(
                "{:?} is not a transaction id (a positive whole number)",
                text.trim()
            )
        })
}

fn now_ms() -> u64 {
    treaty_types::clock::now_ms()
}

// ---- transactions ----

/// The query string with `live=1` added, for the page's live region to fetch.
fn live_src(path: &str, pairs: &[(String, String)]) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    for (key, value) in pairs.iter().filter(|(key, _)| key != "live") {
        query.append_pair(key, value);
    }
    query.append_pair("live", "1");
    format!("{path}?{}", query.finish())
}

async fn transactions_page(State(console): State<Arc<Console>>, RawQuery(query): RawQuery) -> Response {
    let engine = &console.engine;
    let pairs = query_pairs(query.as_deref());
    let filters = match Filters::from_query(&pairs) {
        Ok(filters) => filters,
        Err(refusal) => return message(engine, StatusCode::BAD_REQUEST, "Bad filter", "error", &refusal),
    };
    let now = now_ms();
    let list = views::transactions(engine, filters.clone(), now);
    let region = html::transactions_live(&list);
    if wants_live(&pairs) {
        return live(region, now);
    }
    html_response(
        StatusCode::OK,
        html::page(html::Page {
            title: "Transactions",
            coordinator: engine.id().as_str(),
            before: &html::filter_form(&filters),
            live_src: &live_src("/transactions", &pairs),
            live: &region,
            after: "",
        }),
    )
}

async fn transactions_json(State(console): State<Arc<Console>>, RawQuery(query): RawQuery) -> Response {
    match Filters::from_query(&query_pairs(query.as_deref())) {
        Ok(filters) => json(&views::transactions(&console.engine, filters, now_ms())),
        Err(refusal) => plain(StatusCode::BAD_REQUEST, &refusal),
    }
}

async fn find_transaction(State(console): State<Arc<Console>>, RawQuery(query): RawQuery) -> Response {
    let pairs = query_pairs(query.as_deref());
    let text = pairs
        .iter()
        .find(|(key, _)| key == "txid")
        .map(|(_, value)| value.as_str())
        .unwrap_or_default();
    match parse_txid(text) {
        Ok(txid) => redirect(&format!("/transactions/{txid}")),
        Err(refusal) => message(
            &console.engine,
            StatusCode::BAD_REQUEST,
            "Bad transaction id",
            "error",
            &refusal,
        ),
    }
}

fn not_tracked(engine: &CoordinatorEngine, txid: u64) -> String {
    format!(
        "transaction {txid} is unknown to coordinator {} (never begun, or finished long ago: the \
         coordinator keeps the last 10,000 finished transactions)",
        engine.id()
    )
}

async fn transaction_page(
    State(console): State<Arc<Console>>,
    Path(txid): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let engine = &console.engine;
    let txid = match parse_txid(&txid) {
        Ok(txid) => txid,
        Err(refusal) => {
            return message(
                engine,
                StatusCode::BAD_REQUEST,
                "Bad transaction id",
                "error",
                &refusal,
            );
        }
    };
    let now = now_ms();
    let Some(detail) = views::transaction_detail(engine, txid, now) else {
        return message(
            engine,
            StatusCode::NOT_FOUND,
            "Transaction not found",
            "error",
            &not_tracked(engine, txid),
        );
    };
    let region = html::detail_live(&detail);
    if wants_live(&query_pairs(query.as_deref())) {
        return live(region, now);
    }
    // A finished transaction has nothing left to resolve.
    let finished = detail.transaction.finished_at_ms > 0;
    html_response(
        StatusCode::OK,
        html::page(html::Page {
            title: &format!("Transaction {txid}"),
            coordinator: engine.id().as_str(),
            before: "",
            live_src: &format!("/transactions/{txid}?live=1"),
            live: &region,
            after: &if finished {
                String::new()
            } else {
                html::resolve_form(Some(txid))
            },
        }),
    )
}

async fn transaction_json(State(console): State<Arc<Console>>, Path(txid): Path<String>) -> Response {
    let engine = &console.engine;
    match parse_txid(&txid) {
        Ok(txid) => match views::transaction_detail(engine, txid, now_ms()) {
            Some(detail) => json(&detail),
            None => plain(StatusCode::NOT_FOUND, &not_tracked(engine, txid)),
        },
        Err(refusal) => plain(StatusCode::BAD_REQUEST, &refusal),
    }
}

// ---- in doubt ----

async fn in_doubt(console: &Console) -> Result<views::InDoubtList, Response> {
    // A closed semaphore never happens (it is never closed); answer rather than panic if it did.
    let Ok(_permit) = console.fanouts.acquire().await else {
        return Err(plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "the console is shutting down",
        ));
    };
    Ok(views::in_doubt(&console.engine, PARTICIPANT_TIMEOUT_MS, now_ms()).await)
}

async fn in_doubt_page(State(console): State<Arc<Console>>, RawQuery(query): RawQuery) -> Response {
    let pairs = query_pairs(query.as_deref());
    let list = match in_doubt(&console).await {
        Ok(list) => list,
        Err(response) => return response,
    };
    let region = html::in_doubt_live(&list);
    if wants_live(&pairs) {
        return live(region, list.now_ms);
    }
    // `?txid=N` (the rows' "resolve…" links) fills in the form.
    let txid = pairs
        .iter()
        .find(|(key, _)| key == "txid")
        .and_then(|(_, value)| parse_txid(value).ok());
    html_response(
        StatusCode::OK,
        html::page(html::Page {
            title: "In doubt: prepared branches",
            coordinator: console.engine.id().as_str(),
            before: "",
            live_src: "/in-doubt?live=1",
            live: &region,
            after: &html::resolve_form(txid),
        }),
    )
}

async fn in_doubt_json(State(console): State<Arc<Console>>) -> Response {
    match in_doubt(&console).await {
        Ok(list) => json(&list),
        Err(response) => response,
    }
}

// ---- resolve ----

/// Whether the request comes from a page of another site (a form on any web page can POST to a
/// loopback address): its `Sec-Fetch-Site` says cross-site, or its `Origin` is not this host.
fn cross_site(headers: &HeaderMap) -> bool {
    let header = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if header(header::HeaderName::from_static("sec-fetch-site"))
        .is_some_and(|site| site != "same-origin" && site != "none")
    {
        return true;
    }
    match (header(header::ORIGIN), header(header::HOST)) {
        (Some(origin), Some(host)) => origin != format!("http://{host}"),
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// The resolve form's fields.
#[derive(Default)]
struct ResolveForm {
    txid: String,
    decision: String,
    operator: String,
    reason: String,
}

impl ResolveForm {
    fn parse(body: &[u8]) -> ResolveForm {
        let mut form = ResolveForm::default();
        for (key, value) in form_urlencoded::parse(body) {
            match key.as_ref() {
                "txid" => form.txid = value.into_owned(),
                "decision" => form.decision = value.into_owned(),
                "operator" => form.operator = value.into_owned(),
                "reason" => form.reason = value.into_owned(),
                _ => {}
            }
        }
        form
    }

    /// The request the core's rules are asked about, or why the form is refused.
    fn request(&self) -> Result<ResolveRequest, String> {
        let txid = parse_txid(&self.txid)?;
        let decision = match self.decision.trim() {
            "commit" => HeuristicDecision::Commit,
            "abort" => HeuristicDecision::Abort,
            other => return Err(format!("decision {other:?}: choose commit or abort")),
        };
        if self.reason.trim().is_empty() {
            return Err(
                "a reason is required: say why this decision is forced (a ticket, what was checked); \
                 it is recorded with the decision. Nothing was changed."
                    .into(),
            );
        }
        ResolveRequest::new(txid, decision, &self.reason, &self.operator)
            .map_err(|refusal| format!("{refusal}. Nothing was changed."))
    }
}

fn api_status(error: &ApiError) -> StatusCode {
    match error {
        ApiError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
        ApiError::NotFound(_) => StatusCode::NOT_FOUND,
        ApiError::FailedPrecondition(_) | ApiError::Aborted(_) => StatusCode::CONFLICT,
        ApiError::Unavailable(_) | ApiError::ResourceExhausted(_) => StatusCode::SERVICE_UNAVAILABLE,
        ApiError::DeadlineExceeded(_) => StatusCode::GATEWAY_TIMEOUT,
        ApiError::Internal(_) | ApiError::Sql(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

async fn resolve(State(console): State<Arc<Console>>, headers: HeaderMap, body: Bytes) -> Response {
    let engine = &console.engine;
    if cross_site(&headers) {
        return message(
            engine,
            StatusCode::FORBIDDEN,
            "Refused",
            "error",
            "a resolve posted from another site is refused: use the console's own form",
        );
    }
    if console.read_only {
        return message(
            engine,
            StatusCode::FORBIDDEN,
            "Refused",
            "error",
            "this coordinator authenticates its callers (--access-file) and the console has no login: \
             decide with `treaty resolve`, authenticated as an operator",
        );
    }
    let form = ResolveForm::parse(&body);
    let request = match form.request() {
        Ok(request) => request,
        Err(refusal) => {
            return message(
                engine,
                StatusCode::BAD_REQUEST,
                "Resolve refused",
                "error",
                &refusal,
            );
        }
    };
    let txid = request.txid;
    let decision = request.decision.name();
    tracing::info!(txid, decision, operator = %request.operator, reason = %request.reason, "resolve from the web console");
    match engine.resolve(request).await {
        Ok(outcome) => {
            let text = format!(
                "transaction {txid}: heuristic {} {} on shards {}. {}",
                outcome.decision.name(),
                if outcome.recorded {
                    "recorded and being carried out"
                } else {
                    "was already held; nothing new recorded"
                },
                if outcome.shards.is_empty() {
                    "(none)".to_owned()
                } else {
                    outcome.shards.join(", ")
                },
                outcome.message
            );
            html_response(
                StatusCode::OK,
                html::message_page(
                    "Resolved",
                    engine.id().as_str(),
                    "ok-message",
                    &text,
                    &format!(
                        r#"<a href="/transactions/{txid}">Transaction {txid}</a> · <a href="/in-doubt">In doubt</a>"#
                    ),
                ),
            )
        }
        Err(error) => message(
            engine,
            api_status(&error),
            "Resolve refused",
            "error",
            &format!("{error}. Nothing was changed."),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn cross_site_posts_are_told_apart() {
        assert!(!cross_site(&headers(&[("host", "127.0.0.1:7680")])));
        assert!(!cross_site(&headers(&[
            ("host", "127.0.0.1:7680"),
            ("origin", "http://127.0.0.1:7680"),
            ("sec-fetch-site", "same-origin"),
        ])));
        assert!(cross_site(&headers(&[
            ("host", "127.0.0.1:7680"),
            ("origin", "http://evil.example"),
        ])));
        assert!(cross_site(&headers(&[
            ("host", "127.0.0.1:7680"),
            ("sec-fetch-site", "cross-site"),
        ])));
    }

    #[test]
    fn only_hosts_named_by_address_or_localhost_are_served() {
        for host in [
            "127.0.0.1:7680",
            "127.0.0.1",
            "localhost:7680",
            "LOCALHOST",
            "[::1]:7680",
            "10.0.0.5:80",
        ] {
            assert!(address_host(host), "{host}");
        }
        for host in [
            "attacker.example:7680",
            "attacker.example",
            "127.0.0.1.nip.io:7680",
            "[evil]:1",
            "",
        ] {
            assert!(!address_host(host), "{host}");
        }
    }

    #[test]
    fn a_resolve_needs_a_reason_and_a_decision() {
        let form = ResolveForm::parse(b"txid=7&decision=abort&operator=alice&reason=+++");
        let refusal = form.request().unwrap_err();
        assert!(refusal.contains("a reason is required"), "{refusal}");
        let form = ResolveForm::parse(b"txid=7&decision=maybe&operator=alice&reason=x");
        assert!(form.request().unwrap_err().contains("commit or abort"));
        let form = ResolveForm::parse(b"txid=x&decision=abort&operator=alice&reason=x");
        assert!(form.request().unwrap_err().contains("not a transaction id"));
        let form = ResolveForm::parse(b"txid=7&decision=abort&operator=&reason=ticket+9");
        assert!(form.request().is_err(), "an operator is required too");
        let request = ResolveForm::parse(b"txid=7&decision=commit&operator=alice&reason=ticket+9")
            .request()
            .unwrap();
        assert_eq!(request.txid, 7);
        assert_eq!(request.reason, "ticket 9");
    }

    #[test]
    fn the_live_source_keeps_the_filters() {
        let pairs = query_pairs(Some("state=active&label=a%26b&live=1"));
        assert_eq!(
            live_src("/transactions", &pairs),
            "/transactions?state=active&label=a%26b&live=1"
        );
    }
}
