//! Who is calling, and may they. A service started with `--access-file` authenticates every call
//! (a client certificate's common name over mutual TLS, or a bearer token in `authorization`),
//! looks the caller up in the file, and lets the call through only when the caller holds a role
//! the method needs ([`required_roles`]); otherwise it answers UNAUTHENTICATED (no or unknown
//! credentials) or PERMISSION_DENIED naming the role needed, before any handler runs. Handlers
//! read the authenticated [`Caller`] with [`caller`]: the identity a heuristic resolve records,
//! the PostgreSQL role a client's statements run under.
//!
//! This lives at the gRPC edge, in one tower layer both services put in front of all their
//! routes, so no method can be added without a decision here: [`required_roles`] refuses any
//! method of Treaty's services it does not list.

mod access_file;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

pub use access_file::{AccessFileError, AccessPolicy, check_database_role, new_token, token_sha256_hex};

/// What a caller may do. A method needs one of the roles [`required_roles`] names for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Runs transactions: Begin, Execute, Commit, Rollback, Submit, and reads them.
    Client,
    /// Looks after in-doubt transactions: ListInDoubt, Resolve, and reads transactions.
    Operator,
    /// Arms failpoints (the `Admin` service, only in fault-injection builds).
    Admin,
    /// A coordinator, to a participant: Execute, Prepare, Commit, Abort, the decision rows, the
    /// three-phase calls.
    Coordinator,
    /// A participant, to a coordinator: QueryDecision (reconciling its prepared branches).
    Participant,
    /// Another participant of a three-phase transaction, leading its termination: QueryState,
    /// RequestTermination, PreCommit, Commit, Abort.
    Peer,
}

impl Role {
    const ALL: [Role; 6] = [
        Role::Client,
        Role::Operator,
        Role::Admin,
        Role::Coordinator,
        Role::Participant,
        Role::Peer,
    ];
    const ALL_NAMES: &'static str = "client, operator, admin, coordinator, participant, peer";

    /// The role's name in access files and messages.
    pub fn name(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::Coordinator => "coordinator",
            Role::Participant => "participant",
            Role::Peer => "peer",
        }
    }

    fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.name() == name)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of roles.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoleSet(u8);

impl RoleSet {
    fn insert(&mut self, role: Role) {
        self.0 |= role.bit();
    }

    fn contains(self, role: Role) -> bool {
        self.0 & role.bit() != 0
    }

    fn names(self) -> String {
        let names: Vec<_> = Role::ALL
            .into_iter()
            .filter(|role| self.contains(*role))
            .map(Role::name)
            .collect();
        names.join(", ")
    }
}

/// An authenticated caller, as its access file entry describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    identity: String,
    roles: RoleSet,
    database_role: Option<String>,
}

impl Caller {
    /// Who the caller proved to be: `cert:<common name>` or `token:<name>`.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Whether the caller holds `role`.
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(role)
    }

    /// The PostgreSQL role the caller's statements run under on every shard, if one is mapped.
    pub fn database_role(&self) -> Option<&str> {
        self.database_role.as_deref()
    }
}

/// The authenticated caller of `request`; `None` when the service runs without an access file
/// (every call is then anonymous and allowed).
pub fn caller<T>(request: &tonic::Request<T>) -> Option<&Caller> {
    request.extensions().get::<Arc<Caller>>().map(|caller| &**caller)
}

/// What a method asks of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Required {
    /// Anyone, authenticated or not: health checks and server reflection (they reveal nothing a
    /// caller could use and load balancers probe them without credentials).
    Open,
    /// An authenticated caller holding one of these roles.
    AnyOf(&'static [Role]),
}

/// The roles a gRPC method (its HTTP/2 path, `/package.Service/Method`) needs.
pub fn required_roles(path: &str) -> Required {
    use Role::*;
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
    match (service, method) {
        ("grpc.health.v1.Health", _) => Required::Open,
        (service, _) if service.starts_with("grpc.reflection.") => Required::Open,
        ("treaty.v1.Coordinator", "Begin" | "Execute" | "Commit" | "Rollback" | "Submit") => {
            Required::AnyOf(&[Client])
        }
        ("treaty.v1.Coordinator", "GetTransaction" | "ListTransactions") => {
            Required::AnyOf(&[Client, Operator])
        }
        ("treaty.v1.Coordinator", "ListInDoubt" | "Resolve") => Required::AnyOf(&[Operator]),
        ("treaty.v1.Coordinator", "QueryDecision") => Required::AnyOf(&[Participant]),
        ("treaty.v1.Coordinator", "Info") => Required::AnyOf(&[Client, Operator, Participant, Admin]),
        // A three-phase termination leader is a participant of the transaction: it asks the
        // others' state, pre-commits them and finishes them, as the coordinator would.
        ("treaty.v1.Participant", "QueryState" | "RequestTermination" | "PreCommit" | "Commit" | "Abort") => {
            Required::AnyOf(&[Coordinator, Peer])
        }
        ("treaty.v1.Participant", _) => Required::AnyOf(&[Coordinator]),
        ("treaty.v1.Admin", _) => Required::AnyOf(&[Admin]),
        // A method nobody decided about: nobody may call it.
        _ => Required::AnyOf(&[]),
    }
}

/// The `--access-file` flag both services take (flattened into their arguments).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct AuthArgs {
    /// Authenticate every call and allow it by role: a TOML file of `[[caller]]` entries, each a
    /// client certificate's common name (`certificate = "alice"`) or a bearer token's name and
    /// SHA-256 (`name`, `token_sha256`; `treaty token new` makes one), with its `roles` and an
    /// optional `database_role`. Without it, every caller may do everything: allowed only on a
    /// loopback address unless --allow-unauthenticated.
    #[arg(long, env = "TREATY_ACCESS_FILE")]
    pub access_file: Option<PathBuf>,
    /// Serve a non-loopback address without --access-file: anyone who reaches the port may run
    /// any SQL on every shard and decide in-doubt transactions. For networks where something else
    /// authenticates every connection.
    #[arg(long, env = "TREATY_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated: bool,
}

/// Why a service's authentication settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    AccessFile(#[from] AccessFileError),
    #[error(
        "listening on {addr} without --access-file would let anyone who reaches it run any SQL on every shard; \
         give --access-file (see README \"Security\"), listen on a loopback address, or pass \
         --allow-unauthenticated if the network itself authenticates every connection"
    )]
    Unauthenticated { addr: SocketAddr },
    #[error(
        "{path} authenticates callers by bearer token, but {addr} serves plaintext: the tokens would cross the \
         network readable; give --tls-cert and --tls-key, or listen on a loopback address"
    )]
    TokensInPlaintext { path: PathBuf, addr: SocketAddr },
    #[error(
        "{path} names callers by certificate, but this listener does not ask for client certificates; give \
         --tls-client-ca (with --tls-cert and --tls-key)"
    )]
    CertificatesWithoutMutualTls { path: PathBuf },
}

impl AuthArgs {
    /// [`AuthArgs::resolve`] for a service serving `listen` with the TLS files `server`, and logs
    /// the outcome: what both services do at start.
    pub fn load(
        self,
        listen: SocketAddr,
        server: Option<&crate::tls::ServerTlsFiles>,
    ) -> Result<Option<Arc<AccessPolicy>>, AuthError> {
        let client_certificates = server.is_some_and(|files| files.client_ca.is_some());
        let policy = self.resolve(listen, server.is_some(), client_certificates)?;
        announce(policy.as_deref());
        Ok(policy)
    }

    /// Loads the access file and checks it fits how the service listens: `tls` and
    /// `client_certificates` say whether the listener serves TLS and asks for client
    /// certificates.
    pub fn resolve(
        self,
        listen: SocketAddr,
        tls: bool,
        client_certificates: bool,
    ) -> Result<Option<Arc<AccessPolicy>>, AuthError> {
        let Some(path) = self.access_file else {
            if !listen.ip().is_loopback() && !self.allow_unauthenticated {
                return Err(AuthError::Unauthenticated { addr: listen });
            }
            return Ok(None);
        };
        let policy = AccessPolicy::load(&path)?;
        if policy.has_tokens() && !tls && !listen.ip().is_loopback() {
            return Err(AuthError::TokensInPlaintext { path, addr: listen });
        }
        if policy.has_certificates() && !client_certificates {
            return Err(AuthError::CertificatesWithoutMutualTls { path });
        }
        Ok(Some(Arc::new(policy)))
    }
}

/// The listener's TLS files, with client certificates optional at the handshake when the access
/// file lets callers authenticate with a bearer token instead (this layer then requires one or
/// the other on every call but health checks).
pub fn server_tls_files(
    files: &crate::tls::ServerTlsFiles,
    policy: Option<&AccessPolicy>,
) -> crate::tls::ServerTlsFiles {
    crate::tls::ServerTlsFiles {
        client_certificate_optional: policy.is_some_and(AccessPolicy::has_tokens),
        ..files.clone()
    }
}

/// Logs how the service decides who may call, once at start.
fn announce(policy: Option<&AccessPolicy>) {
    match policy {
        Some(policy) => tracing::info!(
            access_file = %policy.path().display(),
            "every call is authenticated and allowed by role"
        ),
        None => tracing::warn!(
            "no --access-file: every caller that reaches this address may call everything (see README \"Security\")"
        ),
    }
}

/// The tower layer that authenticates and authorises every call (see the module's doc). Without
/// a policy it lets everything through untouched.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    state: Option<Arc<AuthState>>,
}

#[derive(Debug)]
struct AuthState {
    policy: Arc<AccessPolicy>,
    /// Callers by the DER of the certificate they presented: parsing a certificate costs more
    /// than the rest of the check, and a connection presents the same one on every call.
    by_der: Mutex<HashMap<Vec<u8>, Option<Arc<Caller>>>>,
}

/// Certificates remembered at most; past it the memory starts over (a cache, not a record).
const CERTIFICATE_CACHE: usize = 4096;

impl AuthLayer {
    /// `None`: no access file, every call allowed as anonymous.
    pub fn new(policy: Option<Arc<AccessPolicy>>) -> Self {
        Self {
            state: policy.map(|policy| {
                Arc::new(AuthState {
                    policy,
                    by_der: Mutex::new(HashMap::new()),
                })
            }),
        }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Authenticated<S> {
        Authenticated {
            inner,
            state: self.state.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around a server's routes.
#[derive(Debug, Clone)]
pub struct Authenticated<S> {
    inner: S,
    state: Option<Arc<AuthState>>,
}

type TlsInfo = tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>;

impl AuthState {
    /// The caller behind `request`, or the status refusing it.
    fn authenticate<B>(&self, request: &http::Request<B>) -> Result<Arc<Caller>, tonic::Status> {
        if let Some(value) = request.headers().get(http::header::AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim)
                .ok_or_else(|| {
                    tonic::Status::unauthenticated("the authorization header must be `Bearer <token>`")
                })?;
            return self.policy.by_token(token).cloned().ok_or_else(|| {
                tonic::Status::unauthenticated("the bearer token is not one this service's access file knows")
            });
        }
        // The connection's chain is shared (an `Arc`): the leaf's DER is borrowed, and copied only
        // into the cache, once per certificate.
        let chain = request
            .extensions()
            .get::<TlsInfo>()
            .and_then(|info| info.peer_certs());
        let Some(der) = chain
            .as_deref()
            .and_then(|certs| certs.first())
            .map(|cert| cert.as_ref())
        else {
            return Err(tonic::Status::unauthenticated(
                "this service authenticates every call: connect with a client certificate (mutual TLS) or send \
                 `authorization: Bearer <token>`",
            ));
        };
        let known = self.by_der.lock().ok().and_then(|cache| cache.get(der).cloned());
        let caller = match known {
            Some(caller) => caller,
            None => {
                let found = common_name(der)
                    .as_deref()
                    .and_then(|name| self.policy.by_certificate(name))
                    .cloned();
                if let Ok(mut cache) = self.by_der.lock() {
                    if cache.len() >= CERTIFICATE_CACHE {
                        cache.clear();
                    }
                    cache.insert(der.to_vec(), found.clone());
                }
                found
            }
        };
        caller.ok_or_else(|| {
            let name = common_name(der).unwrap_or_else(|| "(no common name)".into());
            tonic::Status::permission_denied(format!(
                "certificate {name:?} is not a caller in this service's access file"
            ))
        })
    }
}

/// The subject common name of a DER certificate.
fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let name = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_owned();
    Some(name)
}

/// Whether `caller` may call `path`: the refusal names the role needed.
fn authorise(caller: &Caller, path: &str) -> Result<(), tonic::Status> {
    let Required::AnyOf(roles) = required_roles(path) else {
        return Ok(());
    };
    if roles.iter().any(|role| caller.has(*role)) {
        return Ok(());
    }
    let needed = match roles {
        [] => "a role no caller has (the method is not open to callers)".to_owned(),
        [one] => format!("the {} role", one.name()),
        several => format!(
            "one of the roles {}",
            several.iter().map(|r| r.name()).collect::<Vec<_>>().join(", ")
        ),
    };
    Err(tonic::Status::permission_denied(format!(
        "{path} needs {needed}; {} has {}",
        caller.identity(),
        match caller.roles.names() {
            names if names.is_empty() => "no role".to_owned(),
            names => format!("the roles: {names}"),
        }
    )))
}

impl<S, B, R> tower_service::Service<http::Request<B>> for Authenticated<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::Either<std::future::Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let Some(state) = &self.state else {
            return futures::future::Either::Right(self.inner.call(request));
        };
        let path = request.uri().path();
        if required_roles(path) == Required::Open {
            return futures::future::Either::Right(self.inner.call(request));
        }
        let checked = state
            .authenticate(&request)
            .and_then(|caller| authorise(&caller, path).map(|()| caller));
        match checked {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                futures::future::Either::Right(self.inner.call(request))
            }
            Err(status) => {
                tracing::warn!(path, reason = status.message(), "call refused");
                futures::future::Either::Left(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests;
