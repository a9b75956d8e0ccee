//! [`PgCluster`]: one PostgreSQL server in a directory of its own, on 127.0.0.1 and a port of its own.
//!
//! `initdb` runs once per machine and PostgreSQL version into a cached template under the temp
//! directory; each cluster is a copy of it (`cp -a`), which is much faster than `initdb` when a test
//! suite starts dozens of clusters. Our settings live in `treaty.conf`, included from
//! `postgresql.conf` and rewritten on every start. When we are root, every PostgreSQL command runs as
//! an unprivileged user (PostgreSQL refuses to run as root) and the data directories belong to it.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use sqlx::Connection;
use tempfile::TempDir;

use crate::error::HarnessError;
use crate::os::{self, RunAs};
use crate::ports::{self, PortReservation};
use treaty_proto::tls::dev_certs::DevCertFiles;

/// Server settings for a test or demo cluster.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// `fsync` (and `full_page_writes`); off makes tests faster and loses nothing unless the
    /// machine itself crashes (a PostgreSQL `-m immediate` stop keeps the page cache).
    /// `synchronous_commit` stays on regardless: an asynchronous commit lives only in shared
    /// memory until the WAL writer runs, and an immediate stop would lose it.
    pub fsync: bool,
    pub max_connections: u32,
    /// Must be above zero for two-phase commit.
    pub max_prepared_transactions: u32,
    /// `log_statement = 'all'` into the server log.
    pub log_statements: bool,
    /// Further `name = value` settings, written verbatim.
    pub extra: Vec<(String, String)>,
    /// TLS only: the server uses these certificates (`ssl = on`), `pg_hba.conf` has only
    /// `hostssl` lines, so a plaintext connection is refused, and [`PgCluster::url`] asks for
    /// `sslmode=verify-full` against their CA.
    pub ssl_only: Option<DevCertFiles>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            fsync: true,
            max_connections: 200,
            max_prepared_transactions: 200,
            log_statements: false,
            extra: Vec::new(),
            ssl_only: None,
        }
    }
}

/// The directory holding `initdb` and `pg_ctl`: `$TREATY_PG_BIN_DIR`, else the one on `PATH`, else the
/// newest `/usr/lib/postgresql/<version>/bin`.
pub fn postgres_bin_dir() -> Result<PathBuf, HarnessError> {
    if let Some(dir) = std::env::var_os("TREATY_PG_BIN_DIR") {
        let dir = PathBuf::from(dir);
        if dir.join("pg_ctl").is_file() {
            return Ok(dir);
        }
        return Err(HarnessError::PostgresNotFound);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                // Debian's /usr/bin wrappers need a cluster registry; resolve to the real binaries.
                let real = std::fs::canonicalize(dir.join("pg_ctl")).unwrap_or_else(|_| dir.join("pg_ctl"));
                return Ok(real.parent().map(Path::to_path_buf).unwrap_or(dir));
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("pg_ctl").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .ok_or(HarnessError::PostgresNotFound)
}

/// A PostgreSQL server started (or found) by the harness. Dropping it stops the server with
/// `-m immediate` unless [`PgCluster::keep_on_drop`] was called.
pub struct PgCluster {
    name: String,
    data_dir: PathBuf,
    port: u16,
    bin_dir: PathBuf,
    run_as: Option<RunAs>,
    options: PgOptions,
    keep: bool,
    /// The reservation of `port` (`ports.rs`), kept while this value lives: no other harness
    /// process is given the port, even while the server is stopped and before it is restarted.
    /// `None` for a cluster found by `open_existing`, whose port was chosen by the harness that
    /// started it.
    _reservation: Option<PortReservation>,
    /// Holds the data directory when it had to live outside the caller's directory (see `place`).
    _holder: Option<TempDir>,
}

const TEMPLATE_INCLUDE: &str = "\ninclude_if_exists = 'treaty.conf'\n";

impl PgCluster {
    /// Creates (or reuses, if `base_dir/pg-<name>` already holds one) a cluster and starts it on a
    /// free loopback port, reserved for as long as the returned value lives (`ports.rs`).
    pub async fn start(base_dir: &Path, name: &str, options: &PgOptions) -> Result<PgCluster, HarnessError> {
        let bin_dir = postgres_bin_dir()?;
        let run_as = os::postgres_run_as()?;
        std::fs::create_dir_all(base_dir)
            .map_err(HarnessError::io(format!("creating {}", base_dir.display())))?;
        let (data_dir, holder) = place(base_dir, name, run_as)?;
        if !data_dir.join("PG_VERSION").exists() {
            let template = ensure_template(&bin_dir, run_as).await?;
            copy_tree(&template, &data_dir).await?;
        }
        let mut cluster = PgCluster {
            name: name.into(),
            data_dir,
            port: 0,
            bin_dir,
            run_as,
            options: options.clone(),
            keep: false,
            _reservation: None,
            _holder: holder,
        };
        // The port is reserved, so no other harness process takes it; a process outside the
        // harness still could between the check and the server's bind: then try another.
        let mut last = None;
        for _ in 0..5 {
            let port = ports::reserve_loopback_port()?;
            cluster.port = port.port();
            // Releases the previous attempt's port, if any.
            cluster._reservation = Some(port);
            match cluster.start_server().await {
                Ok(()) => return Ok(cluster),
                Err(error) => {
                    let log = std::fs::read_to_string(cluster.server_log()).unwrap_or_default();
                    if !log.contains("could not bind") && !log.contains("already in use") {
                        return Err(error);
                    }
                    last = Some(error);
                }
            }
        }
        Err(last.unwrap_or_else(|| HarnessError::Invalid("no port could be bound".into())))
    }

    /// A cluster the harness created earlier (for example by `treaty dev up`), found by its data
    /// directory. It is not stopped on drop.
    pub async fn open_existing(data_dir: &Path, options: &PgOptions) -> Result<PgCluster, HarnessError> {
        let conf = data_dir.join("treaty.conf");
        let text = std::fs::read_to_string(&conf).map_err(HarnessError::io(format!(
            "reading {} (is this a cluster the harness created?)",
            conf.display()
        )))?;
        let port = text
            .lines()
            .filter_map(|line| line.strip_prefix("port = "))
            .filter_map(|value| value.trim().parse().ok())
            .next_back()
            .ok_or_else(|| HarnessError::Invalid(format!("{} names no port", conf.display())))?;
        Ok(PgCluster {
            name: data_dir
                .file_name()
                .map(|n| n.to_string_lossy().trim_start_matches("pg-").to_string())
                .unwrap_or_default(),
            data_dir: data_dir.to_path_buf(),
            port,
            bin_dir: postgres_bin_dir()?,
            run_as: os::postgres_run_as()?,
            options: options.clone(),
            keep: true,
            _reservation: None,
            _holder: None,
        })
    }

    /// A cluster that is not running yet, whose data directory (`pg-<name>` under `base_dir`, or
    /// a directory of its own when the PostgreSQL user cannot reach it) exists, empty and owned
    /// by that user: for a base backup to fill (`standby.rs`). It is given a free port, reserved
    /// for as long as it lives.
    pub(crate) fn empty(base_dir: &Path, name: &str, options: &PgOptions) -> Result<PgCluster, HarnessError> {
        let bin_dir = postgres_bin_dir()?;
        let run_as = os::postgres_run_as()?;
        std::fs::create_dir_all(base_dir)
            .map_err(HarnessError::io(format!("creating {}", base_dir.display())))?;
        let (data_dir, holder) = place(base_dir, name, run_as)?;
        std::fs::create_dir_all(&data_dir)
            .map_err(HarnessError::io(format!("creating {}", data_dir.display())))?;
        {
            // PostgreSQL refuses a data directory others can read.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o700))
                .map_err(HarnessError::io(format!("chmod {}", data_dir.display())))?;
        }
        if let Some(run_as) = run_as {
            std::os::unix::fs::chown(&data_dir, Some(run_as.uid), Some(run_as.gid))
                .map_err(HarnessError::io(format!("chown {}", data_dir.display())))?;
        }
        let port = ports::reserve_loopback_port()?;
        Ok(PgCluster {
            name: name.into(),
            data_dir,
            port: port.port(),
            bin_dir,
            run_as,
            options: options.clone(),
            keep: false,
            _reservation: Some(port),
            _holder: holder,
        })
    }

    /// Runs a PostgreSQL program of this installation as the user the servers run as.
    pub(crate) async fn run_program(
        &self,
        program: &str,
        args: &[&std::ffi::OsStr],
    ) -> Result<Output, HarnessError> {
        pg_command(&self.bin_dir, self.run_as, program, args).await
    }

    /// Starts the server (a stopped one, or one `empty` made) on its port.
    pub(crate) async fn start_stopped(&self) -> Result<(), HarnessError> {
        self.start_server().await
    }

    /// The settings this cluster writes to `treaty.conf` at every start.
    pub(crate) fn options(&self) -> &PgOptions {
        &self.options
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// A connection URL for database `database` as the superuser `postgres` (trust authentication;
    /// with `ssl_only`, over TLS verified against the cluster's CA).
    pub fn url(&self, database: &str) -> String {
        let url = format!("postgres://postgres@127.0.0.1:{}/{database}", self.port);
        match &self.options.ssl_only {
            Some(files) => format!("{url}?sslmode=verify-full&sslrootcert={}", files.ca.display()),
            None => url,
        }
    }

    pub async fn connect(&self, database: &str) -> Result<sqlx::PgConnection, HarnessError> {
        let url = self.url(database);
        sqlx::PgConnection::connect(&url)
            .await
            .map_err(|source| HarnessError::Connect {
                url: treaty_proto::redact(&url),
                source,
            })
    }

    /// Creates `database` unless it exists.
    pub async fn create_database(&self, database: &str) -> Result<(), HarnessError> {
        let mut conn = self.connect("postgres").await?;
        let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(database)
            .fetch_one(&mut conn)
            .await
            .map_err(|source| HarnessError::Sql {
                url: treaty_proto::redact(&self.url("postgres")),
                source,
            })?;
        if !exists {
            let quoted = format!("\"{}\"", database.replace('"', "\"\""));
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {quoted}")))
                .execute(&mut conn)
                .await
                .map_err(|source| HarnessError::Sql {
                    url: treaty_proto::redact(&self.url("postgres")),
                    source,
                })?;
        }
        Ok(())
    }

    /// How many transactions are prepared in `database` (`pg_prepared_xacts` of that database).
    pub async fn prepared_count(&self, database: &str) -> Result<i64, HarnessError> {
        let mut conn = self.connect(database).await?;
        sqlx::query_scalar("SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()")
            .fetch_one(&mut conn)
            .await
            .map_err(|source| HarnessError::Sql {
                url: treaty_proto::redact(&self.url(database)),
                source,
            })
    }

    /// Whether the server's pid file is present (it is removed by a clean or immediate stop).
    pub fn is_running(&self) -> bool {
        self.data_dir.join("postmaster.pid").exists()
    }

    /// Stops the server as a crash would: no checkpoint, prepared transactions kept in the WAL.
    pub async fn stop_immediate(&self) -> Result<(), HarnessError> {
        self.stop("immediate").await
    }

    /// Stops the server cleanly, waiting for sessions to end (prepared transactions survive this too).
    pub async fn stop_fast(&self) -> Result<(), HarnessError> {
        self.stop("fast").await
    }

    /// Starts a stopped server again on the same port.
    pub async fn restart(&self) -> Result<(), HarnessError> {
        self.start_server().await
    }

    /// Leaves the server running when this value is dropped.
    pub fn keep_on_drop(&mut self) {
        self.keep = true;
    }

    fn server_log(&self) -> PathBuf {
        self.data_dir.join("server.log")
    }

    fn settings(&self) -> String {
        let o = &self.options;
        let on_off = |b: bool| if b { "on" } else { "off" };
        let mut conf = format!(
            "# Written by the Treaty harness on every start.\n\
             port = {}\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = ''\n\
             max_connections = {}\n\
             max_prepared_transactions = {}\n\
             shared_buffers = '64MB'\n\
             fsync = {}\n\
             synchronous_commit = on\n\
             full_page_writes = {}\n\
             log_statement = '{}'\n\
             log_line_prefix = '%m [%p] %q%a '\n",
            self.port,
            o.max_connections,
            o.max_prepared_transactions,
            on_off(o.fsync),
            on_off(o.fsync),
            if o.log_statements { "all" } else { "none" },
        );
        if o.ssl_only.is_some() {
            let dir = self.data_dir.display();
            conf.push_str(&format!(
                "ssl = on\nssl_cert_file = '{dir}/treaty-server.crt'\nssl_key_file = '{dir}/treaty-server.key'\nhba_file = '{dir}/treaty-hba.conf'\n"
            ));
        }
        for (name, value) in &o.extra {
            conf.push_str(&format!("{name} = {value}\n"));
        }
        conf
    }

    /// With `ssl_only`: the server's certificate and key in the data directory (the key owned by
    /// the server's user, mode 0600, as PostgreSQL requires) and an hba file that admits TLS
    /// connections only.
    fn write_ssl_files(&self) -> Result<(), HarnessError> {
        let Some(files) = &self.options.ssl_only else {
            return Ok(());
        };
        let copy = |from: &Path, name: &str| -> Result<(), HarnessError> {
            let to = self.data_dir.join(name);
            let text =
                std::fs::read(from).map_err(HarnessError::io(format!("reading {}", from.display())))?;
            std::fs::write(&to, text).map_err(HarnessError::io(format!("writing {}", to.display())))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))
                .map_err(HarnessError::io(format!("chmod {}", to.display())))?;
            if let Some(run_as) = self.run_as {
                std::os::unix::fs::chown(&to, Some(run_as.uid), Some(run_as.gid))
                    .map_err(HarnessError::io(format!("chown {}", to.display())))?;
            }
            Ok(())
        };
        copy(&files.server_cert, "treaty-server.crt")?;
        copy(&files.server_key, "treaty-server.key")?;
        let hba = self.data_dir.join("treaty-hba.conf");
        std::fs::write(
            &hba,
            "# Written by the Treaty harness: TLS connections only.\nhostssl all all 127.0.0.1/32 trust\n",
        )
        .map_err(HarnessError::io(format!("writing {}", hba.display())))?;
        if let Some(run_as) = self.run_as {
            std::os::unix::fs::chown(&hba, Some(run_as.uid), Some(run_as.gid))
                .map_err(HarnessError::io(format!("chown {}", hba.display())))?;
        }
        Ok(())
    }

    async fn start_server(&self) -> Result<(), HarnessError> {
        self.write_ssl_files()?;
        let conf = self.data_dir.join("treaty.conf");
        std::fs::write(&conf, self.settings())
            .map_err(HarnessError::io(format!("writing {}", conf.display())))?;
        if let Some(run_as) = self.run_as {
            std::os::unix::fs::chown(&conf, Some(run_as.uid), Some(run_as.gid))
                .map_err(HarnessError::io(format!("chown {}", conf.display())))?;
        }
        // A crashed server leaves its pid file; pg_ctl copes with a stale one.
        let log = self.server_log();
        pg_command(
            &self.bin_dir,
            self.run_as,
            "pg_ctl",
            &[
                "-D".as_ref(),
                self.data_dir.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "-s".as_ref(),
                "start".as_ref(),
            ],
        )
        .await
        .map_err(|error| match error {
            HarnessError::Command {
                command,
                status,
                output,
            } => HarnessError::Command {
                command,
                status,
                output: format!("{output}\n--- {} ---\n{}", log.display(), os::tail(&log, 20)),
            },
            other => other,
        })?;
        Ok(())
    }

    async fn stop(&self, mode: &str) -> Result<(), HarnessError> {
        pg_command(
            &self.bin_dir,
            self.run_as,
            "pg_ctl",
            &[
                "-D".as_ref(),
                self.data_dir.as_os_str(),
                "-m".as_ref(),
                mode.as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "-s".as_ref(),
                "stop".as_ref(),
            ],
        )
        .await?;
        Ok(())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.keep || !self.is_running() {
            return;
        }
        let mut command = std::process::Command::new(self.bin_dir.join("pg_ctl"));
        command
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "immediate", "-w", "-s", "stop"])
            .current_dir("/")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(run_as) = self.run_as {
            use std::os::unix::process::CommandExt;
            command.uid(run_as.uid).gid(run_as.gid);
        }
        let _ = command.status();
    }
}

/// Where the data directory of cluster `name` goes: `base_dir/pg-<name>` when the PostgreSQL user
/// can reach it, else a directory of its own under the temp directory.
fn place(
    base_dir: &Path,
    name: &str,
    run_as: Option<RunAs>,
) -> Result<(PathBuf, Option<TempDir>), HarnessError> {
    let Some(run_as) = run_as else {
        return Ok((base_dir.join(format!("pg-{name}")), None));
    };
    let base_dir = std::fs::canonicalize(base_dir)
        .map_err(HarnessError::io(format!("resolving {}", base_dir.display())))?;
    let parent_ok = base_dir.parent().is_none_or(os::traversable_by_others);
    if !os::traversable_by_others(&base_dir) && parent_ok {
        // Typically a 0700 temp directory of ours: letting others traverse it exposes nothing.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&base_dir)
            .map_err(HarnessError::io(format!("reading {}", base_dir.display())))?
            .permissions()
            .mode();
        std::fs::set_permissions(&base_dir, std::fs::Permissions::from_mode(mode | 0o011))
            .map_err(HarnessError::io(format!("chmod {}", base_dir.display())))?;
    }
    if os::traversable_by_others(&base_dir) {
        return Ok((base_dir.join(format!("pg-{name}")), None));
    }
    let holder = tempfile::Builder::new()
        .prefix("treaty-pg-")
        .tempdir()
        .map_err(HarnessError::io("creating a directory for PostgreSQL data"))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(holder.path(), std::fs::Permissions::from_mode(0o711))
            .map_err(HarnessError::io(format!("chmod {}", holder.path().display())))?;
    }
    let _ = run_as;
    Ok((holder.path().join(format!("pg-{name}")), Some(holder)))
}

/// The cached `initdb` output for this PostgreSQL version and user, created on first use.
async fn ensure_template(bin_dir: &Path, run_as: Option<RunAs>) -> Result<PathBuf, HarnessError> {
    let version = pg_command(bin_dir, None, "initdb", &["--version".as_ref()]).await?;
    let version: String = String::from_utf8_lossy(&version.stdout)
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '.')
        .collect();
    let owner = run_as.map_or(os::effective_uid(), |r| r.uid);
    let template = std::env::temp_dir().join(format!("treaty-pg-template-{version}-{owner}"));
    if template.join("PG_VERSION").exists() && template.join(".treaty-template-ok").exists() {
        return Ok(template);
    }
    // initdb into a private name, then rename: concurrent first uses each build one, one wins.
    let staging = std::env::temp_dir().join(format!(
        "treaty-pg-template-{version}-{owner}.{}.{}",
        std::process::id(),
        rand_suffix()
    ));
    pg_command(
        bin_dir,
        run_as,
        "initdb",
        &[
            "-D".as_ref(),
            staging.as_os_str(),
            "-U".as_ref(),
            "postgres".as_ref(),
            "--auth=trust".as_ref(),
            "-E".as_ref(),
            "UTF8".as_ref(),
            "--locale=C".as_ref(),
            "--no-sync".as_ref(),
        ],
    )
    .await?;
    let conf = staging.join("postgresql.conf");
    let mut text =
        std::fs::read_to_string(&conf).map_err(HarnessError::io(format!("reading {}", conf.display())))?;
    text.push_str(TEMPLATE_INCLUDE);
    std::fs::write(&conf, text).map_err(HarnessError::io(format!("writing {}", conf.display())))?;
    let marker = staging.join(".treaty-template-ok");
    std::fs::write(&marker, b"").map_err(HarnessError::io(format!("writing {}", marker.display())))?;
    if let Some(run_as) = run_as {
        os::chown_recursive(&staging, run_as)?;
    }
    if std::fs::rename(&staging, &template).is_err() {
        // Someone else's template won (or a broken one is in the way: replace it).
        if template.join(".treaty-template-ok").exists() {
            let _ = std::fs::remove_dir_all(&staging);
        } else {
            let _ = std::fs::remove_dir_all(&template);
            std::fs::rename(&staging, &template).map_err(HarnessError::io(format!(
                "moving the initdb template to {}",
                template.display()
            )))?;
        }
    }
    Ok(template)
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// `cp -a from to`: keeps owners and modes, which PostgreSQL checks on its data directory.
async fn copy_tree(from: &Path, to: &Path) -> Result<(), HarnessError> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)
            .map_err(HarnessError::io(format!("creating {}", parent.display())))?;
    }
    let output = tokio::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()
        .await
        .map_err(HarnessError::io("running cp"))?;
    check("cp -a", output).map(|_| ())
}

/// Runs a PostgreSQL program from `bin_dir`, as `run_as` when given, and fails with its output.
async fn pg_command(
    bin_dir: &Path,
    run_as: Option<RunAs>,
    program: &str,
    args: &[&std::ffi::OsStr],
) -> Result<Output, HarnessError> {
    let mut command = tokio::process::Command::new(bin_dir.join(program));
    command.args(args).current_dir("/").kill_on_drop(false);
    // pg_ctl's server inherits our stdout; a pipe would keep `output()` waiting for the server.
    if program == "pg_ctl" {
        command.stdout(std::process::Stdio::null());
    }
    if let Some(run_as) = run_as {
        command.uid(run_as.uid).gid(run_as.gid);
    }
    let rendered = format!(
        "{} {}",
        program,
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .map_err(|_| HarnessError::Invalid(format!("`{rendered}` did not finish within 120 s")))?
        .map_err(HarnessError::io(format!("running {rendered}")))?;
    check(&rendered, output)
}

fn check(rendered: &str, output: Output) -> Result<Output, HarnessError> {
    if output.status.success() {
        return Ok(output);
    }
    Err(HarnessError::Command {
        command: rendered.into(),
        status: output.status.to_string(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    })
}
