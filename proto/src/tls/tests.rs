//! The TLS listener on loopback: who gets in, who is refused, and certificates reloaded in place.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::StreamExt;

use super::dev_certs::{DevCa, write, write_dev_certs};
use super::*;

fn link(ca: &Path, identity: Option<(&Path, &Path)>) -> LinkTlsFiles {
    LinkTlsFiles {
        ca: ca.to_owned(),
        identity: identity.map(|(c, k)| (c.to_owned(), k.to_owned())),
    }
}

/// Connects to `addr` with `files`, returning the handshake's outcome once the server has also
/// spoken (a server refusing a client certificate does so after the client's side completes).
async fn dial(addr: std::net::SocketAddr, files: &LinkTlsFiles) -> Result<Vec<u8>, String> {
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(client_config(files).map_err(|e| e.to_string())?));
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let mut tls = connector
        .connect(ServerName::try_from("localhost").expect("a name"), tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut answer = vec![0; 4];
    tls.read_exact(&mut answer).await.map_err(|e| e.to_string())?;
    Ok(tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c[0].to_vec())
        .unwrap_or(answer))
}

/// A TLS listener that echoes four bytes on every connection it accepts.
async fn echo_server(tls: Arc<ServerTls>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut accepted = incoming(listener, tls);
    tokio::spawn(async move {
        while let Some(Ok(mut stream)) = accepted.next().await {
            tokio::spawn(async move {
                let mut buf = [0; 4];
                if stream.read_exact(&mut buf).await.is_ok() {
                    let _ = stream.write_all(&buf).await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn only_clients_with_a_certificate_from_the_client_ca_get_in() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = write_dev_certs(dir.path(), "alice").expect("certs");
    let other = write_dev_certs(&dir.path().join("other"), "mallory").expect("other CA");
    let tls = ServerTls::load(ServerTlsFiles {
        cert: files.server_cert.clone(),
        key: files.server_key.clone(),
        client_ca: Some(files.ca.clone()),
        client_certificate_optional: false,
    })
    .expect("load");
    let addr = echo_server(tls).await;

    let good = link(&files.ca, Some((&files.client_cert, &files.client_key)));
    assert!(
        dial(addr, &good).await.is_ok(),
        "a client of the right CA gets in"
    );

    let foreign = link(&files.ca, Some((&other.client_cert, &other.client_key)));
    assert!(
        dial(addr, &foreign).await.is_err(),
        "a certificate from another CA is refused"
    );

    let anonymous = link(&files.ca, None);
    assert!(
        dial(addr, &anonymous).await.is_err(),
        "no client certificate is refused"
    );

    let mut plain = TcpStream::connect(addr).await.expect("connect");
    plain
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    // The server answers a plaintext client with a TLS alert at most, then closes; never h2.
    let _ = plain.read_to_end(&mut buf).await;
    assert!(
        !buf.starts_with(b"\x00\x00"),
        "no HTTP/2 frame to a plaintext client: {buf:?}"
    );

    let wrong_ca = link(&other.ca, Some((&files.client_cert, &files.client_key)));
    assert!(
        dial(addr, &wrong_ca).await.is_err(),
        "a client that does not trust the server's CA refuses it"
    );
}

#[tokio::test]
async fn a_changed_certificate_is_served_to_the_next_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = write_dev_certs(dir.path(), "alice").expect("certs");
    let tls = ServerTls::load(ServerTlsFiles {
        cert: files.server_cert.clone(),
        key: files.server_key.clone(),
        client_ca: None,
        client_certificate_optional: false,
    })
    .expect("load");
    let addr = echo_server(tls.clone()).await;
    let trust_first = link(&files.ca, None);
    let first = dial(addr, &trust_first).await.expect("first CA");

    // A new CA and server certificate replace the files (a certificate rotation).
    let ca = DevCa::new("rotated").expect("ca");
    let server = ca.issue("treaty-server").expect("issue");
    // A file stamp is its modification time and length: make sure the length differs even if
    // the clock did not move.
    write(&files.server_cert, &format!("{}\n", server.cert_pem), false).expect("write cert");
    write(&files.server_key, &server.key_pem, true).expect("write key");
    let rotated_ca = dir.path().join("rotated-ca.pem");
    write(&rotated_ca, &ca.cert_pem(), false).expect("write ca");

    let second = dial(addr, &link(&rotated_ca, None))
        .await
        .expect("the rotated certificate is served");
    assert_ne!(first, second);
    assert!(
        dial(addr, &trust_first).await.is_err(),
        "the old CA no longer vouches for the server"
    );
}

#[test]
fn a_broken_reload_keeps_the_previous_certificates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = write_dev_certs(dir.path(), "alice").expect("certs");
    let tls = ServerTls::load(ServerTlsFiles {
        cert: files.server_cert.clone(),
        key: files.server_key.clone(),
        client_ca: None,
        client_certificate_optional: false,
    })
    .expect("load");
    let before = tls.config();
    write(&files.server_key, "not a key\n", true).expect("write");
    let error = tls.reload().expect_err("a broken key is refused");
    assert!(error.to_string().contains("server.key"), "{error}");
    assert!(
        Arc::ptr_eq(&before, &tls.config()),
        "the previous configuration stays"
    );
}

#[test]
fn settings_are_refused_when_half_given() {
    let p = |s: &str| Some(std::path::PathBuf::from(s));
    let refused = |args: TlsArgs| args.resolve(None).expect_err("refused").to_string();
    assert!(
        refused(TlsArgs {
            tls_cert: p("c"),
            ..TlsArgs::default()
        })
        .contains("--tls-key")
    );
    assert!(
        refused(TlsArgs {
            tls_key: p("k"),
            ..TlsArgs::default()
        })
        .contains("--tls-cert")
    );
    assert!(
        refused(TlsArgs {
            tls_client_ca: p("ca"),
            ..TlsArgs::default()
        })
        .contains("--tls-cert")
    );
    assert!(
        refused(TlsArgs {
            link_tls_cert: p("c"),
            link_tls_key: p("k"),
            ..TlsArgs::default()
        })
        .contains("--link-tls-ca")
    );
    assert!(
        refused(TlsArgs {
            link_tls_ca: p("ca"),
            link_tls_cert: p("c"),
            ..TlsArgs::default()
        })
        .contains("--link-tls-key")
    );
    assert_eq!(
        TlsArgs::default().resolve(None).expect("none"),
        TlsSettings::default()
    );
    let file = TlsFileSection {
        cert: p("file-c"),
        key: p("file-k"),
        ..TlsFileSection::default()
    };
    let both = TlsArgs {
        tls_cert: p("flag-c"),
        ..TlsArgs::default()
    }
    .resolve(Some(file))
    .expect("resolved");
    let server = both.server.expect("server");
    assert_eq!(server.cert, std::path::PathBuf::from("flag-c"), "the flag wins");
    assert_eq!(server.key, std::path::PathBuf::from("file-k"));
}

#[test]
fn a_missing_or_empty_file_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let empty = dir.path().join("empty.pem");
    write(&empty, "", false).expect("write");
    let files = ServerTlsFiles {
        cert: empty.clone(),
        key: empty.clone(),
        client_ca: None,
        client_certificate_optional: false,
    };
    let error = server_config(&files).expect_err("empty").to_string();
    assert!(
        error.contains("empty.pem") && error.contains("no PEM certificate"),
        "{error}"
    );
    let missing = ServerTlsFiles {
        cert: dir.path().join("missing.pem"),
        ..files
    };
    let error = server_config(&missing).expect_err("missing").to_string();
    assert!(error.contains("missing.pem"), "{error}");
}

#[test]
fn the_start_up_line_says_whether_client_certificates_are_required_optional_or_not_asked_for() {
    let files = |client_ca: Option<&str>, client_certificate_optional| ServerTlsFiles {
        cert: "server.pem".into(),
        key: "server-key.pem".into(),
        client_ca: client_ca.map(PathBuf::from),
        client_certificate_optional,
    };
    assert_eq!(files(Some("ca.pem"), false).client_certificates(), "required");
    assert_eq!(files(Some("ca.pem"), true).client_certificates(), "optional");
    assert_eq!(files(None, false).client_certificates(), "not asked for");
    assert_eq!(files(None, true).client_certificates(), "not asked for");
}
