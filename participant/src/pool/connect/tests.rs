//! The URL read as sqlx reads it (each case checked against sqlx-postgres 0.9's `parse.rs`,
//! `mod.rs` and `pgpass.rs`), and sessions opened against real clusters started by the harness:
//! plain, TLS verified in full or by chain, refused certificates, passfile passwords, and which
//! failures are transient.

use std::path::{Path, PathBuf};

use tokio_postgres::config::{Host, SslMode as Driver};
use treaty_harness::{PgCluster, PgOptions};
use treaty_proto::tls::dev_certs::{DevCertFiles, write_dev_certs};

use super::tls::CertSource;
use super::*;

fn env(vars: &[(&'static str, &str)]) -> Environment {
    Environment {
        vars: vars
            .iter()
            .map(|(name, value)| (*name, (*value).to_owned()))
            .collect(),
        home: None,
        os_user: Some("os-user".to_owned()),
        socket_exists: |_| false,
    }
}

fn target(url: &str) -> ConnectTarget {
    ConnectTarget::from_url_in(url, &env(&[])).unwrap()
}

fn params(url: &str) -> Params {
    Params::from_url(url, &env(&[])).unwrap()
}

fn tcp(host: &str) -> Vec<Host> {
    vec![Host::Tcp(host.to_owned())]
}

fn unix(path: &str) -> Vec<Host> {
    vec![Host::Unix(PathBuf::from(path))]
}

#[test]
fn connect_url_parts_are_percent_decoded() {
    let t = target("postgres://us%40er:p%3Aw%2Fd%20x@db.example:6000/my%20db");
    assert_eq!(t.config.get_hosts(), tcp("db.example"));
    assert_eq!(t.config.get_ports(), [6000]);
    assert_eq!(t.config.get_user(), Some("us@er"));
    assert_eq!(t.config.get_password(), Some(&b"p:w/d x"[..]));
    assert_eq!(t.config.get_dbname(), Some("my db"));
    assert_eq!(t.describe(), "us@er@db.example:6000/my db");
    assert!(!format!("{t:?}").contains("p:w"), "{t:?}");
    // Query values are form-decoded (`+` is a space), as the url crate does for sqlx.
    let t = target("postgresql://u@h/d?password=a%26b+c&application_name=x%20y");
    assert_eq!(t.config.get_password(), Some(&b"a&b c"[..]));
    assert_eq!(t.config.get_application_name(), Some("x y"));
}

#[test]
fn connect_from_url_reads_the_process_environment_only_for_what_the_url_leaves_out() {
    let t = ConnectTarget::from_url("postgres://u:pw@db.example:6000/d?sslmode=disable").unwrap();
    assert_eq!(t.config.get_hosts(), tcp("db.example"));
    assert_eq!(t.config.get_ports(), [6000]);
    assert_eq!(t.config.get_user(), Some("u"));
    assert_eq!(t.config.get_password(), Some(&b"pw"[..]));
    assert_eq!(t.ssl_mode(), SslMode::Disable);
}

#[test]
fn connect_defaults_come_from_the_environment_like_sqlx() {
    let t = ConnectTarget::from_url_in("postgres://", &env(&[])).unwrap();
    assert_eq!(t.config.get_hosts(), tcp("localhost"));
    assert_eq!(t.config.get_ports(), [5432]);
    assert_eq!(t.config.get_user(), Some("os-user"));
    assert_eq!(t.config.get_dbname(), None);
    assert_eq!(t.config.get_password(), None);
    assert_eq!(t.ssl_mode(), SslMode::Prefer);

    let vars = env(&[
        ("PGHOST", "pg.example"),
        ("PGPORT", "7000"),
        ("PGUSER", "alice"),
        ("PGDATABASE", "shard"),
        ("PGPASSWORD", "secret"),
        ("PGSSLMODE", "disable"),
        ("PGAPPNAME", "app"),
        ("PGOPTIONS", "-c work_mem=64MB"),
    ]);
    let t = ConnectTarget::from_url_in("postgres:///", &vars).unwrap();
    assert_eq!(t.config.get_hosts(), tcp("pg.example"));
    assert_eq!(t.config.get_ports(), [7000]);
    assert_eq!(t.config.get_user(), Some("alice"));
    assert_eq!(t.config.get_dbname(), Some("shard"));
    assert_eq!(t.config.get_password(), Some(&b"secret"[..]));
    assert_eq!(t.ssl_mode(), SslMode::Disable);
    assert_eq!(t.config.get_application_name(), Some("app"));
    assert_eq!(t.config.get_options(), Some("-c work_mem=64MB"));

    // The URL wins over the environment; PGHOSTADDR over PGHOST.
    let t = ConnectTarget::from_url_in("postgres://bob:pw@other:1234/db?sslmode=require", &vars).unwrap();
    assert_eq!(t.config.get_hosts(), tcp("other"));
    assert_eq!(t.config.get_ports(), [1234]);
    assert_eq!(t.config.get_user(), Some("bob"));
    assert_eq!(t.config.get_password(), Some(&b"pw"[..]));
    assert_eq!(t.config.get_dbname(), Some("db"));
    assert_eq!(t.ssl_mode(), SslMode::Require);
    let vars = env(&[("PGHOST", "pg.example"), ("PGHOSTADDR", "10.0.0.1")]);
    let t = ConnectTarget::from_url_in("postgres://", &vars).unwrap();
    assert_eq!(t.config.get_hosts(), tcp("10.0.0.1"));

    // An unparsable PGPORT or PGSSLMODE is refused (sqlx ignores it), naming the variable.
    let error = ConnectTarget::from_url_in("postgres://h/d", &env(&[("PGPORT", "x")])).unwrap_err();
    assert!(error.to_string().contains("PGPORT"), "{error}");
    let error = ConnectTarget::from_url_in("postgres://h/d", &env(&[("PGSSLMODE", "on")])).unwrap_err();
    assert!(error.to_string().contains("PGSSLMODE"), "{error}");
}

#[test]
fn connect_default_host_is_a_socket_directory_holding_the_server_socket() {
    let mut vars = env(&[("PGPORT", "5433")]);
    vars.socket_exists = |path| path == Path::new("/tmp/.s.PGSQL.5433");
    let t = ConnectTarget::from_url_in("postgres:///db", &vars).unwrap();
    assert_eq!(t.config.get_hosts(), unix("/tmp"));
    // sqlx looks for the socket of PGPORT (or 5432), not of the URL's port.
    let t = ConnectTarget::from_url_in("postgres:///db?port=5433", &env(&[])).unwrap();
    assert_eq!(t.config.get_hosts(), tcp("localhost"));
}

#[test]
fn connect_socket_directory_as_host_parameter_or_percent_encoded_host() {
    let t = target("postgres:///db?host=/var/run/postgresql");
    assert_eq!(t.config.get_hosts(), unix("/var/run/postgresql"));
    let t = target("postgres://u@%2Fvar%2Frun%2Fpostgresql:5433/db");
    assert_eq!(t.config.get_hosts(), unix("/var/run/postgresql"));
    assert_eq!(t.config.get_ports(), [5433]);
    let t = target("postgres:///db?host=db.example&port=6000&user=u&dbname=other");
    assert_eq!(t.config.get_hosts(), tcp("db.example"));
    assert_eq!(t.config.get_ports(), [6000]);
    assert_eq!(t.config.get_user(), Some("u"));
    assert_eq!(t.config.get_dbname(), Some("other"));
}

#[test]
fn connect_ipv6_and_hostaddr() {
    let t = target("postgres://u@[::1]:5432/db");
    assert_eq!(t.config.get_hosts(), tcp("::1"));
    let t = target("postgres://u@name.example/db?hostaddr=127.0.0.1");
    assert_eq!(t.config.get_hosts(), tcp("127.0.0.1"));
    let error = ConnectTarget::from_url_in("postgres://u@h/db?hostaddr=name", &env(&[])).unwrap_err();
    assert!(error.to_string().contains("hostaddr"), "{error}");
}

#[test]
fn connect_sslmode_maps_to_the_driver_and_a_verification() {
    let cases = [
        ("disable", Driver::Disable, None),
        ("allow", Driver::Prefer, Some(Verification::None)),
        ("prefer", Driver::Prefer, Some(Verification::None)),
        ("require", Driver::Require, Some(Verification::None)),
        ("verify-ca", Driver::Require, Some(Verification::Chain)),
        ("VERIFY-FULL", Driver::Require, Some(Verification::ChainAndName)),
        ("verify-full", Driver::Require, Some(Verification::ChainAndName)),
    ];
    for (mode, driver, verification) in cases {
        let t = target(&format!("postgres://u@h/d?sslmode={mode}"));
        assert_eq!(t.config.get_ssl_mode(), driver, "{mode}");
        assert_eq!(t.tls.as_ref().map(|tls| tls.verification), verification, "{mode}");
        let t = target(&format!("postgres://u@h/d?ssl-mode={mode}"));
        assert_eq!(t.config.get_ssl_mode(), driver, "ssl-mode={mode}");
    }
    let error = ConnectTarget::from_url_in("postgres://u@h/d?sslmode=on", &env(&[])).unwrap_err();
    assert!(
        error.to_string().contains("`sslmode`") && error.to_string().contains("verify-full"),
        "{error}"
    );
}

#[test]
fn connect_require_with_a_root_certificate_verifies_the_chain_like_libpq() {
    let dir = tempfile::tempdir().unwrap();
    let files = write_dev_certs(dir.path(), "client").unwrap();
    let ca = files.ca.display();
    let t = target(&format!("postgres://u@h/d?sslmode=require&sslrootcert={ca}"));
    assert_eq!(
        t.tls.as_ref().map(|tls| tls.verification),
        Some(Verification::Chain)
    );
    // Through the environment too.
    let vars = env(&[("PGSSLROOTCERT", &files.ca.display().to_string())]);
    let t = ConnectTarget::from_url_in("postgres://u@h/d?sslmode=require", &vars).unwrap();
    assert_eq!(
        t.tls.as_ref().map(|tls| tls.verification),
        Some(Verification::Chain)
    );
    // `prefer` verifies nothing and reads no root certificate, even a missing one (as sqlx).
    let t = target("postgres://u@h/d?sslmode=prefer&sslrootcert=/nonexistent/ca.pem");
    assert_eq!(
        t.tls.as_ref().map(|tls| tls.verification),
        Some(Verification::None)
    );
}

#[test]
fn connect_certificate_files_are_read_when_the_url_is() {
    let error = ConnectTarget::from_url_in(
        "postgres://u@h/d?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        &env(&[]),
    )
    .unwrap_err();
    assert!(error.to_string().contains("/nonexistent/ca.pem"), "{error}");

    let dir = tempfile::tempdir().unwrap();
    let files = write_dev_certs(dir.path(), "client").unwrap();
    // A key is no certificate.
    let error = ConnectTarget::from_url_in(
        &format!(
            "postgres://u@h/d?sslmode=verify-ca&sslrootcert={}",
            files.client_key.display()
        ),
        &env(&[]),
    )
    .unwrap_err();
    assert!(error.to_string().contains("holds no certificate"), "{error}");

    let both = format!(
        "postgres://u@h/d?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
        files.ca.display(),
        files.client_cert.display(),
        files.client_key.display()
    );
    let t = target(&both);
    assert!(t.tls.as_ref().is_some_and(|tls| tls.client.is_some()));
    let half = format!("postgres://u@h/d?sslcert={}", files.client_cert.display());
    let error = ConnectTarget::from_url_in(&half, &env(&[])).unwrap_err();
    assert!(
        matches!(error, ConnectError::ClientCertificateHalf { .. }),
        "{error}"
    );
    // PEM text in the variable itself, as sqlx accepts.
    let pem = std::fs::read_to_string(&files.ca).unwrap();
    let vars = env(&[("PGSSLROOTCERT", &pem)]);
    let t = ConnectTarget::from_url_in("postgres://u@h/d?sslmode=verify-full", &vars).unwrap();
    assert!(matches!(
        t.tls.as_ref().and_then(|tls| tls.root_cert.as_ref()),
        Some(CertSource::Pem { .. })
    ));
}

#[test]
fn connect_unknown_parameters_are_refused_by_name() {
    for name in [
        "connect_timeout",
        "sslpassword",
        "target_session_attrs",
        "ssl_mode",
    ] {
        let error = ConnectTarget::from_url_in(&format!("postgres://u@h/d?{name}=1"), &env(&[])).unwrap_err();
        assert!(
            matches!(&error, ConnectError::UnknownParameter { name: n } if n == name),
            "{name}: {error}"
        );
        assert!(error.to_string().contains(&format!("`{name}`")), "{error}");
    }
    // sqlx's own knob is accepted (and checked as sqlx checks it).
    target("postgres://u@h/d?statement-cache-capacity=10");
    assert!(ConnectTarget::from_url_in("postgres://u@h/d?statement-cache-capacity=x", &env(&[])).is_err());
    let error = ConnectTarget::from_url_in("mysql://u@h/d", &env(&[])).unwrap_err();
    assert!(error.to_string().contains("mysql"), "{error}");
    assert!(ConnectTarget::from_url_in("not a url", &env(&[])).is_err());
}

#[test]
fn connect_options_and_settings_append_with_escapes() {
    let t = target("postgres://u@h/d?options=-c%20a%3D1&options[search_path]=x,%20public")
        .settings(&[("statement_timeout", "5s".to_owned()), ("b", "a\\b".to_owned())]);
    assert_eq!(
        t.config.get_options(),
        Some("-c a=1 -c search_path=x,\\ public -c statement_timeout=5s -c b=a\\\\b")
    );
    let t = target("postgres://u@h/d").application_name("treaty-participant");
    assert_eq!(t.config.get_application_name(), Some("treaty-participant"));
}

#[test]
fn connect_password_from_url_then_pgpassword_then_passfiles() {
    let dir = tempfile::tempdir().unwrap();
    let passfile = dir.path().join("passfile");
    std::fs::write(
        &passfile,
        "# comment\nother:5432:*:u:no\n*:6000:d:u:from\\:pass\\\\file\n*:*:*:*:wildcard\n",
    )
    .unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    std::fs::write(home.join(".pgpass"), "h:7000:*:u:from-home\n").unwrap();
    let passfile = passfile.display().to_string();
    let mut vars = env(&[("PGPASSFILE", &passfile)]);
    vars.home = Some(home);
    let password = |url: &str, vars: &Environment| {
        let t = ConnectTarget::from_url_in(url, vars).unwrap();
        t.config
            .get_password()
            .map(|p| String::from_utf8(p.to_vec()).unwrap())
    };
    assert_eq!(
        password("postgres://u:url@h:6000/d", &vars).as_deref(),
        Some("url")
    );
    assert_eq!(
        password("postgres://u@h:6000/d", &vars).as_deref(),
        Some("from:pass\\file")
    );
    assert_eq!(
        password("postgres://u@h:6001/d", &vars).as_deref(),
        Some("wildcard")
    );
    // The passfile is matched with the URL's parameters, which override its path.
    assert_eq!(
        password("postgres://x@h/y?port=6000&user=u&dbname=d", &vars).as_deref(),
        Some("from:pass\\file")
    );
    let mut with_env_password = env(&[("PGPASSFILE", &passfile), ("PGPASSWORD", "env")]);
    with_env_password.home = None;
    assert_eq!(
        password("postgres://u@h:6000/d", &with_env_password).as_deref(),
        Some("env")
    );
    // No line in PGPASSFILE: `~/.pgpass` next, as sqlx.
    std::fs::write(&passfile, "other:*:*:*:no\n").unwrap();
    assert_eq!(
        password("postgres://u@h:7000/d", &vars).as_deref(),
        Some("from-home")
    );
    assert_eq!(password("postgres://u@h:7001/d", &vars), None);
    // The host a socket URL is matched with is sqlx's default host, not the socket directory.
    std::fs::write(&passfile, "localhost:5432:d:u:by-socket\n").unwrap();
    assert_eq!(
        password("postgres://u@%2Frun%2Fpg/d", &vars).as_deref(),
        Some("by-socket")
    );
    assert_eq!(params("postgres://u@%2Frun%2Fpg/d").host, "localhost");
}

// Real sessions against clusters started by the harness.

async fn cluster(options: PgOptions) -> (PgCluster, tempfile::TempDir) {
    let dir = tempfile::Builder::new()
        .prefix("treaty-connect-test-")
        .tempdir()
        .unwrap();
    let options = PgOptions {
        fsync: false,
        ..options
    };
    let pg = PgCluster::start(dir.path(), "pg", &options)
        .await
        .expect("starting a PostgreSQL cluster for the test");
    (pg, dir)
}

/// `url` read with an empty environment: no `PG*` variable and no `~/.pgpass` of the machine.
fn isolated(url: &str) -> ConnectTarget {
    ConnectTarget::from_url_in(url, &env(&[])).unwrap()
}

async fn uses_tls(client: &tokio_postgres::Client) -> bool {
    client
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn connect_plain_session_with_application_name_and_settings() {
    let (pg, _dir) = cluster(PgOptions::default()).await;
    pg.create_database("shard").await.unwrap();
    let target = isolated(&format!("postgres://postgres@127.0.0.1:{}/shard", pg.port()))
        .application_name("treaty-participant")
        .settings(&[
            ("statement_timeout", "5s".to_owned()),
            ("search_path", "pg_catalog, public".to_owned()),
        ]);
    let client = target.connect().await.unwrap();
    let row = client
        .query_one(
            "SELECT current_user::text, current_database()::text, current_setting('application_name'), \
             current_setting('statement_timeout'), current_setting('search_path')",
            &[],
        )
        .await
        .unwrap();
    let got: (String, String, String, String, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    assert_eq!(
        got,
        (
            "postgres".into(),
            "shard".into(),
            "treaty-participant".into(),
            "5s".into(),
            "pg_catalog, public".into()
        )
    );
    // The default `prefer` against a server without TLS: a plain session.
    assert!(!uses_tls(&client).await);

    // `require` against a server without TLS: refused, not worth retrying.
    let error = isolated(&format!(
        "postgres://postgres@127.0.0.1:{}/shard?sslmode=require",
        pg.port()
    ))
    .connect()
    .await
    .unwrap_err();
    assert!(
        error.to_string().contains("server does not support TLS"),
        "{error}"
    );
    assert!(!error.is_transient(), "{error}");
}

#[tokio::test]
async fn connect_verify_full_over_tls_to_the_ssl_only_cluster() {
    let certs = tempfile::tempdir().unwrap();
    let files = write_dev_certs(certs.path(), "client").unwrap();
    let (pg, _dir) = cluster(PgOptions {
        ssl_only: Some(files.clone()),
        ..PgOptions::default()
    })
    .await;
    // The harness's own URL: `sslmode=verify-full&sslrootcert=<CA>` at 127.0.0.1.
    let client = isolated(&pg.url("postgres")).connect().await.unwrap();
    assert!(uses_tls(&client).await);
    let base = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port());
    let ca = files.ca.display();
    let with_client_cert = format!(
        "&sslcert={}&sslkey={}",
        files.client_cert.display(),
        files.client_key.display()
    );
    for query in [
        format!("sslmode=verify-ca&sslrootcert={ca}"),
        format!("sslmode=verify-full&sslrootcert={ca}{with_client_cert}"),
        format!("sslmode=require&sslrootcert={ca}"),
        "sslmode=require".to_owned(),
        "sslmode=prefer".to_owned(),
        "sslmode=allow".to_owned(),
    ] {
        let client = isolated(&format!("{base}?{query}"))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("{query}: {e}"));
        assert!(uses_tls(&client).await, "{query}");
    }
    // `localhost` is also in the dev certificate.
    let url = format!(
        "postgres://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={ca}",
        pg.port()
    );
    isolated(&url).connect().await.unwrap();

    // Without TLS the server's hba file has no line for the session.
    let error = isolated(&format!("{base}?sslmode=disable"))
        .connect()
        .await
        .unwrap_err();
    assert_eq!(
        error.as_db_error().map(|db| db.code().code()),
        Some("28000"),
        "{error}"
    );
    assert!(!error.is_transient(), "{error}");
    assert!(error.to_string().contains("no pg_hba.conf entry"), "{error}");
}

#[tokio::test]
async fn connect_refuses_a_server_certificate_of_another_ca() {
    let certs = tempfile::tempdir().unwrap();
    let files = write_dev_certs(&certs.path().join("server"), "client").unwrap();
    let other = write_dev_certs(&certs.path().join("other"), "client").unwrap();
    let (pg, _dir) = cluster(PgOptions {
        ssl_only: Some(files),
        ..PgOptions::default()
    })
    .await;
    let base = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port());
    // `require` with a root certificate verifies the chain, as libpq (sqlx would not).
    for mode in ["verify-full", "verify-ca", "require"] {
        let url = format!("{base}?sslmode={mode}&sslrootcert={}", other.ca.display());
        let error = isolated(&url).connect().await.unwrap_err();
        let text = error.to_string();
        // Both dev CAs carry the same name, so webpki takes the other CA for the issuer and
        // finds the signature wrong ("BadSignature"); a CA of another name is "UnknownIssuer".
        assert!(
            text.contains("TLS handshake") && text.contains("invalid peer certificate"),
            "{mode}: {text}"
        );
        assert!(!error.is_transient(), "{mode}: {text}");
        assert!(text.contains(&format!("127.0.0.1:{}", pg.port())), "{text}");
    }
    // Without a root certificate `verify-full` trusts the Mozilla roots (as sqlx), not this CA.
    let error = isolated(&format!("{base}?sslmode=verify-full"))
        .connect()
        .await
        .unwrap_err();
    assert!(error.to_string().contains("UnknownIssuer"), "{error}");
}

/// A CA and a server certificate for `db.invalid` only (not the address connected to).
fn certificates_for_another_name(dir: &Path) -> DevCertFiles {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "connect test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let mut server = CertificateParams::new(vec!["db.invalid".to_owned()]).unwrap();
    server.distinguished_name.push(DnType::CommonName, "db.invalid");
    let key = KeyPair::generate().unwrap();
    let cert = server.signed_by(&key, &ca).unwrap();
    let files = DevCertFiles {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("server.pem"),
        client_key: dir.join("server.key"),
    };
    std::fs::write(&files.ca, ca.pem()).unwrap();
    std::fs::write(&files.server_cert, cert.pem()).unwrap();
    std::fs::write(&files.server_key, key.serialize_pem()).unwrap();
    files
}

#[tokio::test]
async fn connect_verify_full_refuses_a_certificate_for_another_name_and_verify_ca_accepts_it() {
    let certs = tempfile::tempdir().unwrap();
    let files = certificates_for_another_name(certs.path());
    let (pg, _dir) = cluster(PgOptions {
        ssl_only: Some(files.clone()),
        ..PgOptions::default()
    })
    .await;
    let url = |mode: &str| {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode={mode}&sslrootcert={}",
            pg.port(),
            files.ca.display()
        )
    };
    let error = isolated(&url("verify-full")).connect().await.unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("not valid for name") && text.contains("db.invalid"),
        "{text}"
    );
    assert!(!error.is_transient(), "{text}");
    for mode in ["verify-ca", "require"] {
        let client = isolated(&url(mode))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert!(uses_tls(&client).await, "{mode}");
    }
}

/// A cluster where role `treaty_pw` must give its password (SCRAM), everyone else is trusted.
async fn cluster_with_password_role(password: &str) -> (PgCluster, tempfile::TempDir) {
    let (pg, dir) = cluster(PgOptions::default()).await;
    let superuser = isolated(&format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port()));
    let client = superuser.connect().await.unwrap();
    let quoted = password.replace('\'', "''");
    client
        .batch_execute(&format!("CREATE ROLE treaty_pw LOGIN PASSWORD '{quoted}'"))
        .await
        .unwrap();
    std::fs::write(
        pg.data_dir().join("pg_hba.conf"),
        "host all treaty_pw 127.0.0.1/32 scram-sha-256\nhost all all 127.0.0.1/32 trust\n",
    )
    .unwrap();
    client.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    // The reload is a signal: wait until a session without password is refused.
    let without = isolated(&format!("postgres://treaty_pw@127.0.0.1:{}/postgres", pg.port()));
    for _ in 0..100 {
        if without.connect().await.is_err() {
            return (pg, dir);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the server did not load the new pg_hba.conf");
}

#[tokio::test]
async fn connect_with_the_password_of_the_passfile() {
    const PASSWORD: &str = "p:w\\x y";
    let (pg, _dir) = cluster_with_password_role(PASSWORD).await;
    let files = tempfile::tempdir().unwrap();
    let passfile = files.path().join("pgpass");
    let port = pg.port();
    std::fs::write(
        &passfile,
        format!(
            "# the test's\n127.0.0.1:{port}:postgres:other:nope\n127.0.0.1:{port}:*:treaty_pw:p\\:w\\\\x y\n"
        ),
    )
    .unwrap();
    let passfile_text = passfile.display().to_string();
    let vars = env(&[("PGPASSFILE", &passfile_text)]);
    let url = format!("postgres://treaty_pw@127.0.0.1:{port}/postgres");
    let client = ConnectTarget::from_url_in(&url, &vars)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, "treaty_pw");
    // The same password percent-encoded in the URL.
    let encoded = format!("postgres://treaty_pw:p%3Aw%5Cx%20y@127.0.0.1:{port}/postgres");
    isolated(&encoded).connect().await.unwrap();

    // A wrong password in the passfile: refused for good, and the message says why.
    std::fs::write(&passfile, format!("*:{port}:*:treaty_pw:wrong\n")).unwrap();
    let error = ConnectTarget::from_url_in(&url, &vars)
        .unwrap()
        .connect()
        .await
        .unwrap_err();
    assert_eq!(
        error.as_db_error().map(|db| db.code().code()),
        Some("28P01"),
        "{error}"
    );
    assert!(
        error.to_string().contains("password authentication failed"),
        "{error}"
    );
    assert!(!error.is_transient(), "{error}");
}

#[tokio::test]
async fn connect_failures_transient_or_not() {
    // Nothing listens on a port just released: refused, transient.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let error = isolated(&format!(
        "postgres://postgres@127.0.0.1:{port}/postgres?sslmode=disable"
    ))
    .connect()
    .await
    .unwrap_err();
    assert!(error.is_transient(), "{error}");
    assert!(
        error.to_string().contains("error connecting to server"),
        "{error}"
    );

    let (pg, _dir) = cluster(PgOptions::default()).await;
    let base = format!("127.0.0.1:{}", pg.port());
    let superuser = isolated(&format!("postgres://postgres@{base}/postgres"));
    let client = superuser.connect().await.unwrap();
    client
        .batch_execute("CREATE ROLE full_role LOGIN CONNECTION LIMIT 0")
        .await
        .unwrap();
    // Too many connections (53300): transient.
    let error = isolated(&format!("postgres://full_role@{base}/postgres"))
        .connect()
        .await
        .unwrap_err();
    assert_eq!(
        error.as_db_error().map(|db| db.code().code()),
        Some("53300"),
        "{error}"
    );
    assert!(error.is_transient(), "{error}");
    // No such database (3D000): not transient.
    let error = isolated(&format!("postgres://postgres@{base}/no_such_db"))
        .connect()
        .await
        .unwrap_err();
    assert_eq!(
        error.as_db_error().map(|db| db.code().code()),
        Some("3D000"),
        "{error}"
    );
    assert!(!error.is_transient(), "{error}");
    assert!(error.to_string().contains("no_such_db"), "{error}");
    // The server stopped: refused again, transient.
    drop(client);
    pg.stop_fast().await.unwrap();
    let error = superuser.connect().await.unwrap_err();
    assert!(error.is_transient(), "{error}");
}
