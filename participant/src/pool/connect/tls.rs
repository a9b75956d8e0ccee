//! TLS for the branch pool's sessions: tokio-postgres's `MakeTlsConnect`/`TlsConnect`/
//! `TlsStream` over tokio-rustls (ring), and the rustls client configuration an `sslmode` asks
//! for: no verification (`prefer`, `allow`, `require` without a root certificate, as libpq and
//! sqlx), the chain only (`verify-ca`, and `require` with a root certificate as libpq), or the
//! chain and the host name (`verify-full`).
//!
//! Written here rather than taken from `tokio-postgres-rustls`: that crate is not in the tree,
//! and what it adds over these few traits is channel binding, which the pool does not use; the
//! verifiers for `verify-ca` and "no verification" would have to be written anyway.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// Why the TLS configuration (certificate files, keys) cannot be used. Names the file, never
/// its content.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("reading the {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("the {what} {origin} is not valid PEM: {reason}")]
    Pem {
        what: &'static str,
        origin: String,
        reason: String,
    },
    #[error("the {what} {origin} holds no certificate")]
    NoCertificate { what: &'static str, origin: String },
    #[error("the {what} {origin} was refused by rustls: {source}")]
    Refused {
        what: &'static str,
        origin: String,
        source: rustls::Error,
    },
    #[error("building the TLS certificate verifier: {0}")]
    Verifier(String),
    #[error("reading the TLS files: {0}")]
    Task(String),
}

/// A certificate or key: a file (the URL's `sslrootcert`, `sslcert`, `sslkey`), or PEM text
/// given in the environment variable itself (`PGSSLROOTCERT` and the others, as sqlx allows).
#[derive(Debug, Clone)]
pub(super) enum CertSource {
    File(PathBuf),
    Pem { variable: &'static str, text: Vec<u8> },
}

impl CertSource {
    /// sqlx's heuristic for its environment variables: PEM if it looks like PEM, else a path.
    pub(super) fn from_environment(variable: &'static str, value: &str) -> CertSource {
        let trimmed = value.trim();
        if trimmed.starts_with("-----BEGIN") && trimmed.ends_with("-----") {
            CertSource::Pem {
                variable,
                text: value.as_bytes().to_vec(),
            }
        } else {
            CertSource::File(PathBuf::from(value))
        }
    }

    fn origin(&self) -> String {
        match self {
            CertSource::File(path) => path.display().to_string(),
            CertSource::Pem { variable, .. } => format!("in {variable}"),
        }
    }

    fn read(&self, what: &'static str) -> Result<Vec<u8>, TlsConfigError> {
        match self {
            CertSource::File(path) => std::fs::read(path).map_err(|source| TlsConfigError::Read {
                what,
                path: path.clone(),
                source,
            }),
            CertSource::Pem { text, .. } => Ok(text.clone()),
        }
    }

    fn certificates(&self, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
        let pem = self.read(what)?;
        let certificates = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsConfigError::Pem {
                what,
                origin: self.origin(),
                reason: e.to_string(),
            })?;
        if certificates.is_empty() {
            return Err(TlsConfigError::NoCertificate {
                what,
                origin: self.origin(),
            });
        }
        Ok(certificates)
    }

    fn private_key(&self, what: &'static str) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
        let pem = self.read(what)?;
        PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsConfigError::Pem {
            what,
            origin: self.origin(),
            reason: e.to_string(),
        })
    }
}

/// What is checked of the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verification {
    /// Nothing but the handshake's signatures: encryption against a passive listener only.
    None,
    /// The chain up to a trusted root, not the name (`verify-ca`).
    Chain,
    /// The chain and that the certificate names the host connected to (`verify-full`).
    ChainAndName,
}

/// Everything the rustls client configuration is built from; the files are read on each build.
#[derive(Debug)]
pub(super) struct TlsSettings {
    pub(super) verification: Verification,
    /// The only trust anchor when given; the Mozilla roots (as sqlx) when not.
    pub(super) root_cert: Option<CertSource>,
    /// A client certificate (chain) and its key.
    pub(super) client: Option<(CertSource, CertSource)>,
}

impl TlsSettings {
    pub(super) fn client_config(&self) -> Result<Arc<ClientConfig>, TlsConfigError> {
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsConfigError::Verifier(e.to_string()))?;
        let builder = match self.verification {
            Verification::None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(SignaturesOnly { provider })),
            Verification::Chain => {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly {
                        webpki: self.webpki_verifier(provider)?,
                    }))
            }
            Verification::ChainAndName => builder.with_webpki_verifier(self.webpki_verifier(provider)?),
        };
        let config = match &self.client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                const WHAT: &str = "client certificate (sslcert)";
                builder
                    .with_client_auth_cert(cert.certificates(WHAT)?, key.private_key("client key (sslkey)")?)
                    .map_err(|source| TlsConfigError::Refused {
                        what: WHAT,
                        origin: cert.origin(),
                        source,
                    })?
            }
        };
        Ok(Arc::new(config))
    }

    fn webpki_verifier(
        &self,
        provider: Arc<CryptoProvider>,
    ) -> Result<Arc<WebPkiServerVerifier>, TlsConfigError> {
        let roots = match &self.root_cert {
            Some(source) => {
                const WHAT: &str = "root certificate (sslrootcert)";
                let mut roots = RootCertStore::empty();
                for certificate in source.certificates(WHAT)? {
                    roots
                        .add(certificate)
                        .map_err(|source_error| TlsConfigError::Refused {
                            what: WHAT,
                            origin: source.origin(),
                            source: source_error,
                        })?;
                }
                roots
            }
            None => RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        };
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| TlsConfigError::Verifier(e.to_string()))
    }
}

/// ring, as sqlx's `tls-rustls-ring-webpki` and the gRPC links (`treaty_proto::tls`) use:
/// rustls 0.23.48 marks it deprecated for having no post-quantum key exchange, which only the
/// aws-lc-rs provider has, and that one needs cmake and a C toolchain to build.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why the TLS handshake failed: the connection broke (worth another attempt), or TLS itself
/// refused (a certificate, an alert, the host name), which will repeat.
#[derive(Debug, thiserror::Error)]
pub(super) enum TlsHandshakeError {
    #[error("the connection failed")]
    Io(#[source] io::Error),
    // No `#[source]`: the message is the cause's, and a chain would repeat it.
    #[error("{0}")]
    Refused(rustls::Error),
    #[error("`{0}` is not a host name or address a certificate can be checked against")]
    HostName(String),
}

impl From<io::Error> for TlsHandshakeError {
    /// tokio-rustls reports a TLS refusal as an I/O error carrying rustls's error.
    fn from(error: io::Error) -> TlsHandshakeError {
        match error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(refusal) => TlsHandshakeError::Refused(refusal.clone()),
            None => TlsHandshakeError::Io(error),
        }
    }
}

/// tokio-postgres's TLS factory: one connector per host it connects to.
#[derive(Clone)]
pub(super) struct MakeRustls {
    config: Arc<ClientConfig>,
}

impl MakeRustls {
    pub(super) fn new(config: Arc<ClientConfig>) -> MakeRustls {
        MakeRustls { config }
    }
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = std::convert::Infallible;

    fn make_tls_connect(&mut self, host: &str) -> Result<RustlsConnect, Self::Error> {
        // Over a Unix socket `host` is empty and the server never offers TLS, so a bad name is
        // only an error if a handshake is actually attempted.
        let server_name = ServerName::try_from(host.to_owned()).map_err(|_| host.to_owned());
        Ok(RustlsConnect {
            config: Arc::clone(&self.config),
            server_name,
        })
    }
}

pub(super) struct RustlsConnect {
    config: Arc<ClientConfig>,
    server_name: Result<ServerName<'static>, String>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = TlsHandshakeError;
    type Future = Pin<Box<dyn Future<Output = Result<RustlsStream<S>, TlsHandshakeError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let server_name = self.server_name.map_err(TlsHandshakeError::HostName)?;
            let stream = tokio_rustls::TlsConnector::from(self.config)
                .connect(server_name, stream)
                .await?;
            Ok(RustlsStream(stream))
        })
    }
}

/// A TLS session as tokio-postgres reads and writes it.
pub(super) struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    /// No channel binding: SCRAM authenticates without `-PLUS`, as with sqlx.
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// No check of the certificate (libpq's `prefer`/`require` without a root certificate); the
/// handshake's signatures are still verified, which keeps the session's key tied to the
/// certificate the server sent.
#[derive(Debug)]
struct SignaturesOnly {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SignaturesOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `verify-ca`: webpki's verification of the chain (trust anchor, validity dates, key usage),
/// with only its verdict on the name set aside; webpki checks the name last, so a certificate
/// refused for its name has passed everything else.
#[derive(Debug)]
struct ChainOnly {
    webpki: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            verdict => verdict,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}
