//! TLS on Treaty's gRPC links (rustls with the ring provider), shared by the coordinator and the
//! participant: the settings (`--tls-*` for the service's own listener, `--link-tls-*` for the
//! links it dials), the server side (certificate and key from PEM files; client certificates
//! asked for when a client CA is given, and required unless the access file lets callers send a
//! bearer token instead; reloaded on SIGHUP or when a file changes, without a restart), and the
//! client side for the links.
//!
//! A listener with TLS configured speaks nothing else: a plaintext client's first bytes fail the
//! handshake, and the server logs that it was refused and why.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client may take to finish its TLS handshake before the connection is dropped, so a
/// client that connects and says nothing holds no task for long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the server to take them.
const ACCEPT_BACKLOG: usize = 64;
/// Handshakes in progress at most: past it the listener stops accepting until one ends, so a
/// flood of connections that never finish their handshake costs a bounded number of tasks (each
/// also ends at `HANDSHAKE_TIMEOUT`), and the kernel's backlog holds the rest.
const CONCURRENT_HANDSHAKES: usize = 256;

/// What went wrong setting up TLS; each names the file or flag to fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("the {what} {path} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)")]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("the {what} {path} is not a PEM file Treaty can read: {reason}")]
    BadPem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("the private key file {path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: PathBuf },
    #[error("{given} is set but {missing} is not: give both")]
    Incomplete {
        given: &'static str,
        missing: &'static str,
    },
    #[error("{flag} needs {needs}")]
    Needs { flag: &'static str, needs: &'static str },
    #[error("the TLS settings are not usable: {0}")]
    Rustls(String),
}

/// The TLS flags both services take (flattened into their arguments).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct TlsArgs {
    /// Serve TLS only, with this certificate chain (PEM). Needs --tls-key. Reloaded on SIGHUP and
    /// when the file changes.
    #[arg(long, env = "TREATY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert. Keep it readable by the service's user only.
    #[arg(long, env = "TREATY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Require a client certificate signed by this CA (PEM) on every connection (mutual TLS).
    /// Needs --tls-cert.
    #[arg(long, env = "TREATY_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// The CA (PEM) that signs the servers this process dials (https:// links: participants,
    /// coordinators, peers).
    #[arg(long, env = "TREATY_LINK_TLS_CA")]
    pub link_tls_ca: Option<PathBuf>,
    /// The certificate (PEM) this process presents on the links it dials, for servers that
    /// require client certificates. Needs --link-tls-key and --link-tls-ca.
    #[arg(long, env = "TREATY_LINK_TLS_CERT")]
    pub link_tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --link-tls-cert.
    #[arg(long, env = "TREATY_LINK_TLS_KEY")]
    pub link_tls_key: Option<PathBuf>,
}

/// The `[tls]` table of a service's TOML file: the same settings without the prefix.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFileSection {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    pub link_ca: Option<PathBuf>,
    pub link_cert: Option<PathBuf>,
    pub link_key: Option<PathBuf>,
}

/// The files behind a TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Client certificates are asked for, and must chain to this CA.
    pub client_ca: Option<PathBuf>,
    /// A connection without a client certificate is let through the handshake (when callers may
    /// authenticate with a bearer token instead: the access check then requires one or the
    /// other). False: a client certificate is required.
    pub client_certificate_optional: bool,
}

impl ServerTlsFiles {
    /// What the listener asks of a client at the handshake, as the service's start-up line says
    /// it: `required`, `optional` (callers may authenticate with a bearer token instead), or
    /// `not asked for` (no client CA).
    pub fn client_certificates(&self) -> &'static str {
        match (&self.client_ca, self.client_certificate_optional) {
            (None, _) => "not asked for",
            (Some(_), false) => "required",
            (Some(_), true) => "optional",
        }
    }
}

/// The files behind the links a process dials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkTlsFiles {
    pub ca: PathBuf,
    /// The certificate and key presented to servers that ask for one.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// A service's resolved TLS settings: flags over the file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    pub server: Option<ServerTlsFiles>,
    pub link: Option<LinkTlsFiles>,
}

impl TlsArgs {
    /// Flags win over the file, setting by setting; incomplete pairs are refused.
    pub fn resolve(self, file: Option<TlsFileSection>) -> Result<TlsSettings, TlsError> {
        let file = file.unwrap_or_default();
        let cert = self.tls_cert.or(file.cert);
        let key = self.tls_key.or(file.key);
        let client_ca = self.tls_client_ca.or(file.client_ca);
        let server = match (cert, key) {
            (Some(cert), Some(key)) => Some(ServerTlsFiles {
                cert,
                key,
                client_ca,
                client_certificate_optional: false,
            }),
            (Some(_), None) => return Err(incomplete("--tls-cert", "--tls-key")),
            (None, Some(_)) => return Err(incomplete("--tls-key", "--tls-cert")),
            (None, None) if client_ca.is_some() => {
                return Err(TlsError::Needs {
                    flag: "--tls-client-ca",
                    needs: "--tls-cert and --tls-key (client certificates are checked on a TLS listener)",
                });
            }
            (None, None) => None,
        };
        let ca = self.link_tls_ca.or(file.link_ca);
        let link_cert = self.link_tls_cert.or(file.link_cert);
        let link_key = self.link_tls_key.or(file.link_key);
        let identity = match (link_cert, link_key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (Some(_), None) => return Err(incomplete("--link-tls-cert", "--link-tls-key")),
            (None, Some(_)) => return Err(incomplete("--link-tls-key", "--link-tls-cert")),
            (None, None) => None,
        };
        let link = match (ca, identity) {
            (Some(ca), identity) => Some(LinkTlsFiles { ca, identity }),
            (None, Some(_)) => {
                return Err(TlsError::Needs {
                    flag: "--link-tls-cert",
                    needs: "--link-tls-ca (the CA that signs the servers this process dials)",
                });
            }
            (None, None) => None,
        };
        Ok(TlsSettings { server, link })
    }
}

fn incomplete(given: &'static str, missing: &'static str) -> TlsError {
    TlsError::Incomplete { given, missing }
}

/// ring, as tonic's `tls-ring` uses: rustls 0.23.48 marks it deprecated because it has no
/// post-quantum key exchange, which only the aws-lc-rs provider has, and that one needs cmake and
/// a C toolchain to build. X25519 with AES-GCM or ChaCha20 is what the links get meanwhile.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Every certificate in a PEM file; at least one.
fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            what,
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read("private key file", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::NoKey {
        path: path.to_owned(),
    })
}

fn roots(what: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(what, path)? {
        roots.add(cert).map_err(|e| TlsError::BadPem {
            what,
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

fn rustls_error(error: impl std::fmt::Display) -> TlsError {
    TlsError::Rustls(error.to_string())
}

/// The rustls server configuration `files` describe, speaking HTTP/2 only (gRPC).
pub fn server_config(files: &ServerTlsFiles) -> Result<rustls::ServerConfig, TlsError> {
    let certs = certificates("certificate file", &files.cert)?;
    let key = private_key(&files.key)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(rustls_error)?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots("client CA file", ca)?),
                provider(),
            );
            let verifier = if files.client_certificate_optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier.build().map_err(rustls_error)?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        TlsError::Rustls(format!(
            "{} with {}: {e}",
            files.cert.display(),
            files.key.display()
        ))
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The rustls client configuration for the links a process dials, speaking HTTP/2 only.
pub fn client_config(files: &LinkTlsFiles) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(rustls_error)?
        .with_root_certificates(roots("link CA file", &files.ca)?);
    let mut config = match &files.identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(certificates("link certificate file", cert)?, private_key(key)?)
            .map_err(rustls_error)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// tonic's client TLS for the same files (the tonic channels: participant to coordinator and to
/// its peers).
pub fn tonic_client_config(files: &LinkTlsFiles) -> Result<tonic::transport::ClientTlsConfig, TlsError> {
    // Parsed here first, so a bad file is refused at start with the file named, not at the first
    // connection.
    client_config(files)?;
    let mut config = tonic::transport::ClientTlsConfig::new().ca_certificate(
        tonic::transport::Certificate::from_pem(read("link CA file", &files.ca)?),
    );
    if let Some((cert, key)) = &files.identity {
        config = config.identity(tonic::transport::Identity::from_pem(
            read("link certificate file", cert)?,
            read("private key file", key)?,
        ));
    }
    Ok(config)
}

/// When each file was last changed, to notice a new certificate without a signal.
type Stamp = Vec<Option<(SystemTime, u64)>>;

fn stamp(files: &ServerTlsFiles) -> Stamp {
    [Some(&files.cert), Some(&files.key), files.client_ca.as_ref()]
        .into_iter()
        .flatten()
        .map(|path| {
            std::fs::metadata(path)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// A TLS listener's configuration, reloaded when its files change or on SIGHUP. A reload that
/// fails (a half-written file, a key that does not match) keeps the previous configuration and
/// logs why; the next change or signal tries again.
pub struct ServerTls {
    files: ServerTlsFiles,
    current: RwLock<(Arc<rustls::ServerConfig>, Stamp)>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("files", &self.files).finish()
    }
}

impl ServerTls {
    /// Loads the files now: a service refuses to start on a bad one.
    pub fn load(files: ServerTlsFiles) -> Result<Arc<Self>, TlsError> {
        let stamp = stamp(&files);
        let config = Arc::new(server_config(&files)?);
        Ok(Arc::new(Self {
            files,
            current: RwLock::new((config, stamp)),
        }))
    }

    pub fn files(&self) -> &ServerTlsFiles {
        &self.files
    }

    /// Reads the files again and uses them for every new connection.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamp = stamp(&self.files);
        let loaded = server_config(&self.files);
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        // The stamp is kept even on failure: the same broken files are not retried on every
        // connection, only after they change again or on SIGHUP.
        current.1 = stamp;
        current.0 = Arc::new(loaded?);
        Ok(())
    }

    /// The configuration for a new connection, reloaded first if a file changed.
    fn config(&self) -> Arc<rustls::ServerConfig> {
        let changed = {
            let current = self.current.read().unwrap_or_else(|p| p.into_inner());
            current.1 != stamp(&self.files)
        };
        if changed {
            self.reload_and_log("a certificate file changed");
        }
        self.current.read().unwrap_or_else(|p| p.into_inner()).0.clone()
    }

    fn reload_and_log(&self, why: &str) {
        match self.reload() {
            Ok(()) => tracing::info!(cert = %self.files.cert.display(), "{why}: TLS certificates reloaded"),
            Err(error) => {
                tracing::error!(%error, "{why}, but the TLS files could not be loaded: keeping the previous certificates")
            }
        }
    }
}

/// The connections `listener` accepts, each after a completed TLS handshake with the current
/// configuration. Handshakes run on their own tasks, so one slow client delays no other; a
/// failed one is logged (a plaintext client, a certificate from another CA) and dropped. The
/// accept loop ends when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsStream<TcpStream>, io::Error>> {
    let (sender, receiver) = tokio::sync::mpsc::channel(ACCEPT_BACKLOG);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_HANDSHAKES));
    tokio::spawn(async move {
        let mut hangups = hangup_signals();
        loop {
            // Taken before accepting: at the cap, connections wait in the kernel's backlog.
            let Ok(permit) = handshakes.clone().acquire_owned().await else {
                return;
            };
            let accepted = tokio::select! {
                () = sender.closed() => return,
                Some(()) = next_hangup(&mut hangups) => {
                    tls.reload_and_log("SIGHUP");
                    continue;
                }
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Each small gRPC frame would otherwise wait for the peer's delayed ACK.
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.config());
            let sender = sender.clone();
            tokio::spawn(async move {
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop(permit);
                match handshake {
                    Ok(Ok(stream)) => {
                        let _ = sender.send(Ok(stream)).await;
                    }
                    Ok(Err(error)) => tracing::warn!(
                        %peer,
                        "TLS handshake refused: {}",
                        handshake_error(&error)
                    ),
                    Err(_) => {
                        tracing::warn!(%peer, "TLS handshake refused: not finished within {HANDSHAKE_TIMEOUT:?}")
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(receiver)
}

/// rustls's error, with what it most likely means for the two mistakes users make.
fn handshake_error(error: &io::Error) -> String {
    let text = error.to_string();
    if text.contains("InvalidContentType") || text.contains("corrupt message") {
        format!("{text} (a plaintext client? this listener speaks TLS only: dial https://)")
    } else if text.contains("UnknownIssuer") || text.contains("invalid peer certificate") {
        format!("{text} (the client's certificate is not signed by --tls-client-ca)")
    } else if text.contains("peer sent no certificates") || text.contains("NoCertificatesPresented") {
        format!("{text} (this listener requires a client certificate)")
    } else {
        text
    }
}

#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = ();

#[cfg(unix)]
fn hangup_signals() -> Hangups {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|error| tracing::warn!(%error, "cannot watch SIGHUP; TLS files are still reloaded when they change"))
        .ok()
}

#[cfg(not(unix))]
fn hangup_signals() -> Hangups {}

#[cfg(unix)]
async fn next_hangup(hangups: &mut Hangups) -> Option<()> {
    match hangups {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(not(unix))]
async fn next_hangup(_: &mut Hangups) -> Option<()> {
    std::future::pending().await
}

#[cfg(feature = "dev-certs")]
pub mod dev_certs;

#[cfg(all(test, feature = "dev-certs"))]
mod tests;
