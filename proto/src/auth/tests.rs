use std::convert::Infallible;
use std::path::Path;

use tower_layer::Layer;
use tower_service::Service;

use super::*;

const PROTO: &str = include_str!("../../proto/treaty/v1/treaty.proto");

/// Every method of every `treaty.v1` service, as `/treaty.v1.Service/Method`.
fn every_method() -> Vec<String> {
    let mut service = "";
    let mut methods = Vec::new();
    for line in PROTO.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("service ") {
            service = rest.trim_end_matches('{').trim();
        } else if let Some(rest) = line.strip_prefix("rpc ") {
            let name = rest.split('(').next().unwrap_or("").trim();
            methods.push(format!("/treaty.v1.{service}/{name}"));
        }
    }
    methods
}

#[test]
fn every_method_of_every_service_has_a_decided_role() {
    let methods = every_method();
    assert!(methods.len() > 30, "{methods:?}");
    for method in methods {
        match required_roles(&method) {
            Required::AnyOf([]) => panic!("{method} has no role: add it to required_roles"),
            Required::Open => panic!("{method} is open to unauthenticated callers"),
            Required::AnyOf(_) => {}
        }
    }
    assert_eq!(
        required_roles("/treaty.v1.Coordinator/Invented"),
        Required::AnyOf(&[])
    );
    assert_eq!(required_roles("/grpc.health.v1.Health/Check"), Required::Open);
}

#[test]
fn the_roles_keep_clients_operators_and_services_apart() {
    let allowed = |role: Role, path: &str| match required_roles(path) {
        Required::Open => true,
        Required::AnyOf(roles) => roles.contains(&role),
    };
    assert!(allowed(Role::Client, "/treaty.v1.Coordinator/Submit"));
    assert!(!allowed(Role::Client, "/treaty.v1.Coordinator/Resolve"));
    assert!(!allowed(Role::Client, "/treaty.v1.Coordinator/ListInDoubt"));
    assert!(allowed(Role::Operator, "/treaty.v1.Coordinator/Resolve"));
    assert!(!allowed(Role::Operator, "/treaty.v1.Coordinator/Begin"));
    for method in [
        "Prepare",
        "CommitBatch",
        "Execute",
        "ExecuteAndPrepare",
        "CommitOnePhase",
        "CommitDecision",
        "ForgetDecisions",
    ] {
        let path = format!("/treaty.v1.Participant/{method}");
        assert!(allowed(Role::Coordinator, &path), "{path}");
        for role in [
            Role::Client,
            Role::Operator,
            Role::Peer,
            Role::Participant,
            Role::Admin,
        ] {
            assert!(!allowed(role, &path), "{role:?} {path}");
        }
    }
    for method in ["Commit", "Abort", "PreCommit", "QueryState", "RequestTermination"] {
        let path = format!("/treaty.v1.Participant/{method}");
        assert!(
            allowed(Role::Peer, &path) && allowed(Role::Coordinator, &path),
            "{path}"
        );
        assert!(!allowed(Role::Client, &path), "{path}");
    }
    assert!(allowed(Role::Participant, "/treaty.v1.Coordinator/QueryDecision"));
    assert!(!allowed(Role::Client, "/treaty.v1.Coordinator/QueryDecision"));
    assert!(!allowed(Role::Operator, "/treaty.v1.Admin/SetFailpoint"));
    assert!(allowed(Role::Admin, "/treaty.v1.Admin/SetFailpoint"));
}

fn policy(token: &str) -> Arc<AccessPolicy> {
    let text = format!(
        "[[caller]]\nname = \"app\"\ntoken_sha256 = \"{}\"\nroles = [\"client\"]\ndatabase_role = \"app_role\"\n",
        token_sha256_hex(token)
    );
    Arc::new(AccessPolicy::parse(Path::new("access.toml"), &text).unwrap())
}

/// The routes behind the layer: answers OK with the caller the layer attached, if any.
#[derive(Clone)]
struct Echo;

impl Service<http::Request<()>> for Echo {
    type Response = http::Response<Option<String>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<()>) -> Self::Future {
        let seen = request
            .extensions()
            .get::<Arc<Caller>>()
            .map(|c| c.identity().to_owned());
        let mut response = http::Response::new(seen);
        response
            .headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static("0"));
        std::future::ready(Ok(response))
    }
}

/// What the inner service saw: the caller the layer attached, if any.
async fn call(
    layer: &AuthLayer,
    path: &str,
    authorization: Option<&str>,
) -> (tonic::Code, String, Option<String>) {
    let mut service = layer.layer(Echo);
    let mut request = http::Request::builder().uri(path);
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    let response = service.call(request.body(()).unwrap()).await.unwrap();
    let status = tonic::Status::from_header_map(response.headers()).unwrap_or_else(|| tonic::Status::ok(""));
    (status.code(), status.message().to_owned(), response.into_body())
}

#[tokio::test]
async fn calls_are_authenticated_then_allowed_by_role() {
    let layer = AuthLayer::new(Some(policy("tok-1")));

    let (code, message, seen) = call(&layer, "/treaty.v1.Coordinator/Begin", None).await;
    assert_eq!(code, tonic::Code::Unauthenticated, "{message}");
    assert!(
        message.contains("client certificate") && message.contains("Bearer"),
        "{message}"
    );
    assert_eq!(seen, None);

    let (code, message, _) = call(&layer, "/treaty.v1.Coordinator/Begin", Some("Bearer tok-2")).await;
    assert_eq!(code, tonic::Code::Unauthenticated, "{message}");

    let (code, message, _) = call(&layer, "/treaty.v1.Coordinator/Begin", Some("Basic tok-1")).await;
    assert_eq!(code, tonic::Code::Unauthenticated, "{message}");

    let (code, message, seen) = call(&layer, "/treaty.v1.Coordinator/Resolve", Some("Bearer tok-1")).await;
    assert_eq!(code, tonic::Code::PermissionDenied, "{message}");
    assert!(
        message.contains("needs the operator role") && message.contains("token:app"),
        "{message}"
    );
    assert_eq!(seen, None);

    let (code, message, seen) = call(&layer, "/treaty.v1.Coordinator/Begin", Some("Bearer tok-1")).await;
    assert_eq!(code, tonic::Code::Ok, "{message}");
    assert_eq!(seen.as_deref(), Some("token:app"));

    // Health checks need no credentials.
    let (code, _, _) = call(&layer, "/grpc.health.v1.Health/Check", None).await;
    assert_eq!(code, tonic::Code::Ok);
}

#[tokio::test]
async fn without_an_access_file_every_call_passes_as_anonymous() {
    let layer = AuthLayer::new(None);
    let (code, _, seen) = call(&layer, "/treaty.v1.Coordinator/Resolve", None).await;
    assert_eq!(code, tonic::Code::Ok);
    assert_eq!(seen, None);
}

#[test]
fn a_non_loopback_listener_needs_an_access_file_and_tokens_need_tls() {
    let public: SocketAddr = "10.1.2.3:7600".parse().unwrap();
    let loopback: SocketAddr = "127.0.0.1:7600".parse().unwrap();
    let error = AuthArgs::default().resolve(public, true, true).unwrap_err();
    assert!(error.to_string().contains("--access-file"), "{error}");
    assert!(
        AuthArgs::default()
            .resolve(loopback, false, false)
            .unwrap()
            .is_none()
    );
    let open = AuthArgs {
        allow_unauthenticated: true,
        ..AuthArgs::default()
    };
    assert!(open.resolve(public, false, false).unwrap().is_none());

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("access.toml");
    std::fs::write(
        &file,
        format!(
            "[[caller]]\nname = \"a\"\ntoken_sha256 = \"{}\"\nroles = [\"client\"]\n",
            token_sha256_hex("t")
        ),
    )
    .unwrap();
    let with_file = || AuthArgs {
        access_file: Some(file.clone()),
        ..AuthArgs::default()
    };
    let error = with_file().resolve(public, false, false).unwrap_err();
    assert!(error.to_string().contains("plaintext"), "{error}");
    assert!(with_file().resolve(public, true, false).unwrap().is_some());
    assert!(with_file().resolve(loopback, false, false).unwrap().is_some());

    std::fs::write(
        &file,
        "[[caller]]\ncertificate = \"alice\"\nroles = [\"client\"]\n",
    )
    .unwrap();
    let error = with_file().resolve(loopback, true, false).unwrap_err();
    assert!(error.to_string().contains("--tls-client-ca"), "{error}");
}

#[cfg(feature = "dev-certs")]
#[test]
fn the_identity_of_a_certificate_is_its_common_name() {
    let ca = crate::tls::dev_certs::DevCa::new("test CA").unwrap();
    let issued = ca.issue("alice").unwrap();
    let der = rustls_pemfile_der(&issued.cert_pem);
    assert_eq!(common_name(&der).as_deref(), Some("alice"));
    assert_eq!(common_name(b"not a certificate"), None);
}

#[cfg(feature = "dev-certs")]
fn rustls_pemfile_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
}
