//! Throw-away certificates for a local cluster (`treaty dev up --tls`, the demo) and the tests: a
//! CA made on the spot and certificates it signs, valid for `localhost` and 127.0.0.1. Nothing
//! here is fit for a deployment, where certificates come from the team's own CA.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use super::TlsError;

/// A certificate authority that lives as long as this value (and in the files it writes).
pub struct DevCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

fn rcgen_error(error: rcgen::Error) -> TlsError {
    TlsError::Rustls(format!("making a development certificate: {error}"))
}

impl DevCa {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Result<Self, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rcgen_error)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().map_err(rcgen_error)?;
        Ok(Self {
            issuer: CertifiedIssuer::self_signed(params, key).map_err(rcgen_error)?,
        })
    }

    /// The CA's certificate, to trust.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `common_name`, usable by a server at `localhost` / 127.0.0.1 and as a
    /// client certificate (the identity is its common name).
    pub fn issue(&self, common_name: &str) -> Result<Issued, TlsError> {
        let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .map_err(rcgen_error)?;
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().map_err(rcgen_error)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(rcgen_error)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The files [`write_dev_certs`] writes.
#[derive(Debug, Clone)]
pub struct DevCertFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// A new CA in `dir` (`ca.pem`), a server certificate (`server.pem`, `server.key`) and a client
/// certificate named `client_name` (`client.pem`, `client.key`); keys readable by the owner only.
pub fn write_dev_certs(dir: &Path, client_name: &str) -> Result<DevCertFiles, TlsError> {
    Ok(write_dev_certs_with_clients(dir, client_name, &[])?.0)
}

/// A client certificate and its key, as files.
#[derive(Debug, Clone)]
pub struct ClientCertFiles {
    /// The certificate's common name: the identity an access file names.
    pub name: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// [`write_dev_certs`], plus a client certificate of the same CA for each of `more_clients`
/// (`<name>.pem`, `<name>.key`): callers with other identities, for access files.
pub fn write_dev_certs_with_clients(
    dir: &Path,
    client_name: &str,
    more_clients: &[&str],
) -> Result<(DevCertFiles, Vec<ClientCertFiles>), TlsError> {
    let ca = DevCa::new("Treaty development CA")?;
    let server = ca.issue("treaty-server")?;
    let client = ca.issue(client_name)?;
    let files = DevCertFiles {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    };
    std::fs::create_dir_all(dir).map_err(|source| write_error(dir, source))?;
    write(&files.ca, &ca.cert_pem(), false)?;
    write(&files.server_cert, &server.cert_pem, false)?;
    write(&files.server_key, &server.key_pem, true)?;
    write(&files.client_cert, &client.cert_pem, false)?;
    write(&files.client_key, &client.key_pem, true)?;
    let mut more = Vec::with_capacity(more_clients.len());
    for name in more_clients {
        let issued = ca.issue(name)?;
        let extra = ClientCertFiles {
            name: (*name).to_owned(),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        };
        write(&extra.cert, &issued.cert_pem, false)?;
        write(&extra.key, &issued.key_pem, true)?;
        more.push(extra);
    }
    Ok((files, more))
}

fn write_error(path: &Path, source: std::io::Error) -> TlsError {
    TlsError::Read {
        what: "certificate directory or file (writing)",
        path: path.to_owned(),
        source,
    }
}

/// Writes `text` to `path`, private to the owner when `private`.
pub fn write(path: &Path, text: &str, private: bool) -> Result<(), TlsError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(path).map_err(|source| write_error(path, source))?;
    file.write_all(text.as_bytes())
        .map_err(|source| write_error(path, source))
}
