//! [`ServiceProcess`]: a Treaty coordinator or participant running as a child process.
//!
//! Its stdout and stderr are appended to a log file; it is ready once it prints
//! `listening on <addr>` (the binaries print this after binding; one serving metrics prints
//! `metrics on <addr>` before it, kept as [`ServiceProcess::metrics_addr`]). It runs in a process
//! group of its own so that a terminal's Ctrl-C does not reach it behind the harness's back, and it
//! can be SIGKILLed and restarted on the same address to test crash recovery. Started with
//! [`ServiceProcess::spawn_reserved`], it keeps its port's reservation (`ports.rs`) for as long as
//! it lives, so that no other harness process is given that port while it is down.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use crate::error::HarnessError;
use crate::os;
use crate::ports::PortReservation;

/// How to start one service.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    /// For messages and log names, e.g. `coordinator` or `participant-s0`.
    pub name: String,
    pub binary: PathBuf,
    /// Arguments; `--listen <listen>` is appended.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub listen: SocketAddr,
    /// Where stdout and stderr are appended.
    pub log_path: PathBuf,
}

/// How long a service may take to print its `listening on` line.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const READY_POLL: Duration = Duration::from_millis(20);
/// Attempts when the address is still held: a killed process's socket lingering briefly. Retrying
/// the same port is all we can do (its peers know the address); that it is not someone else's is
/// the port's reservation's job, not this retry's.
const BIND_ATTEMPTS: u32 = 20;

pub struct ServiceProcess {
    spec: ServiceSpec,
    child: Option<tokio::process::Child>,
    keep: bool,
    /// Where it serves Prometheus metrics, from its `metrics on <addr>` line (started with
    /// `--metrics-addr`); read again at each start, since port 0 picks a new one.
    metrics_addr: Option<SocketAddr>,
    /// The reservation of `spec.listen`'s port, when started with
    /// [`ServiceProcess::spawn_reserved`]: held across restarts until this value is dropped.
    _reservation: Option<PortReservation>,
}

impl ServiceProcess {
    /// Starts the service and waits until it listens. Its port is the caller's to keep reserved;
    /// see [`ServiceProcess::spawn_reserved`].
    pub async fn spawn(spec: ServiceSpec) -> Result<ServiceProcess, HarnessError> {
        ServiceProcess::spawn_holding(spec, None).await
    }

    /// Like [`ServiceProcess::spawn`], keeping `port`, the reservation of the port `spec.listen`
    /// names, for as long as this value lives: a restart after a crash then finds the port
    /// reserved for it, never handed to another harness process meanwhile.
    pub async fn spawn_reserved(
        spec: ServiceSpec,
        port: PortReservation,
    ) -> Result<ServiceProcess, HarnessError> {
        if spec.listen != port.addr() {
            return Err(HarnessError::Invalid(format!(
                "{}: listen address {} is not the reserved {}",
                spec.name,
                spec.listen,
                port.addr()
            )));
        }
        ServiceProcess::spawn_holding(spec, Some(port)).await
    }

    async fn spawn_holding(
        spec: ServiceSpec,
        reservation: Option<PortReservation>,
    ) -> Result<ServiceProcess, HarnessError> {
        let mut process = ServiceProcess {
            spec,
            child: None,
            keep: false,
            metrics_addr: None,
            _reservation: reservation,
        };
        process.start().await?;
        Ok(process)
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.spec.listen
    }

    /// Where it serves Prometheus metrics (`GET /metrics`), when started with `--metrics-addr`.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// `http://<addr>`, for gRPC clients.
    /// `http://ADDR`, or `https://ADDR` for a service started with `--tls-cert`.
    pub fn endpoint(&self) -> String {
        let scheme = if self.spec.args.iter().any(|arg| arg == "--tls-cert") {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.spec.listen)
    }

    pub fn log_path(&self) -> &std::path::Path {
        &self.spec.log_path
    }

    /// The OS pid of the running child, if there is one.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Sends SIGKILL (no clean-up of any kind runs in the process). A process that already exited
    /// is fine.
    pub fn kill9(&mut self) -> Result<(), HarnessError> {
        if let Some(child) = self.child.as_mut() {
            match child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) => {}
                Err(error) => {
                    return Err(HarnessError::Io {
                        what: format!("checking {}", self.spec.name),
                        source: error,
                    });
                }
            }
            child
                .start_kill()
                .map_err(HarnessError::io(format!("killing {}", self.spec.name)))?;
        }
        Ok(())
    }

    /// Restarts on the same address: kills the process if it still runs, reaps it, starts it
    /// again with the same arguments and waits until it listens.
    pub async fn restart(&mut self) -> Result<(), HarnessError> {
        self.kill9()?;
        if let Some(mut child) = self.child.take() {
            child
                .wait()
                .await
                .map_err(HarnessError::io(format!("reaping {}", self.spec.name)))?;
        }
        self.start().await
    }

    /// The arguments it runs with (without the `--listen` the harness appends).
    pub fn args(&self) -> &[String] {
        &self.spec.args
    }

    /// Like [`ServiceProcess::restart`], with new arguments from now on (say, a participant
    /// pointed at a promoted standby's URL).
    pub async fn restart_with_args(&mut self, args: Vec<String>) -> Result<(), HarnessError> {
        self.kill9()?;
        if let Some(mut child) = self.child.take() {
            child
                .wait()
                .await
                .map_err(HarnessError::io(format!("reaping {}", self.spec.name)))?;
        }
        self.spec.args = args;
        self.start().await
    }

    /// The exit status if the process has ended.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits up to `timeout` for the process to end; `None` if it is still running.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, HarnessError> {
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(status) => Ok(Some(
                status.map_err(HarnessError::io(format!("waiting for {}", self.spec.name)))?,
            )),
            Err(_) => Ok(None),
        }
    }

    /// Leaves the process running when this value is dropped.
    pub fn keep_on_drop(&mut self) {
        self.keep = true;
    }

    async fn start(&mut self) -> Result<(), HarnessError> {
        for attempt in 1..=BIND_ATTEMPTS {
            match self.start_once().await {
                Ok(()) => return Ok(()),
                Err(HarnessError::NotReady { tail, .. })
                    if attempt < BIND_ATTEMPTS && tail.contains("Address already in use") =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => return Err(error),
            }
        }
        Err(HarnessError::Invalid(format!(
            "{} could not bind {}",
            self.spec.name, self.spec.listen
        )))
    }

    async fn start_once(&mut self) -> Result<(), HarnessError> {
        let log_path = &self.spec.log_path;
        if let Some(parent) = log_path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(HarnessError::io(format!("creating {}", parent.display())))?;
        }
        let open = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log_path)
                .map_err(HarnessError::io(format!("opening {}", log_path.display())))
        };
        let log = open()?;
        let from = log
            .metadata()
            .map_err(HarnessError::io(format!("reading {}", log_path.display())))?
            .len();
        let mut command = tokio::process::Command::new(&self.spec.binary);
        command
            .args(&self.spec.args)
            .arg("--listen")
            .arg(self.spec.listen.to_string())
            // A startup error should end the log with its message, not a backtrace of `main`
            // (anyhow reads this before RUST_BACKTRACE; panics still get theirs).
            .env("RUST_LIB_BACKTRACE", "0")
            .envs(self.spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .stdout(open()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(false);
        let mut child = command.spawn().map_err(HarnessError::io(format!(
            "starting {}",
            self.spec.binary.display()
        )))?;
        let deadline = Instant::now() + READY_TIMEOUT;
        let not_ready = |reason: String| HarnessError::NotReady {
            name: self.spec.name.clone(),
            reason,
            log: log_path.clone(),
            tail: os::tail(log_path, 30),
        };
        loop {
            if let Ok(bytes) = std::fs::read(log_path) {
                let new = bytes.get(from as usize..).unwrap_or_default();
                let new = String::from_utf8_lossy(new);
                if new.lines().any(|line| line.starts_with("listening on ")) {
                    // Printed before `listening on`, when metrics are served at all.
                    self.metrics_addr = new
                        .lines()
                        .find_map(|line| line.strip_prefix("metrics on "))
                        .and_then(|addr| addr.trim().parse().ok());
                    self.child = Some(child);
                    return Ok(());
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(not_ready(format!("it exited with {status}")));
            }
            if Instant::now() > deadline {
                let _ = child.start_kill();
                return Err(not_ready(format!(
                    "no `listening on` line within {READY_TIMEOUT:?}"
                )));
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if !self.keep
            && let Some(child) = self.child.as_mut()
        {
            let _ = child.start_kill();
        }
    }
}
