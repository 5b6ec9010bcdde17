//! The ready line a server process prints on stdout once it serves, and the one way to start such a process as a
//! child and wait for that line (used by the test harness, the load tool and the demo).
//!
//! Formats (stable; more fields may only be appended, and only once documented in the README):
//! - `relayd` and `relay-witness`: `listening on <ip:port> cert-sha256 <64 hex>` ([`ReadyLine::Relay`])
//! - `relay-exporter`: `exporter cert-sha256 <64 hex> log-key <64 hex>`
//!
//! Contract: [`ReadyLine`] is the only place these lines are written ([`std::fmt::Display`]) or read
//! ([`std::str::FromStr`]); a parsed line round-trips to the same text.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::str::FromStr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// What a server process announces when it is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyLine {
    /// `relayd`: the messaging endpoint's address and the SHA-256 of its certificate.
    Relay {
        /// The bound UDP address.
        addr: SocketAddr,
        /// SHA-256 of the DER certificate clients pin.
        cert_sha256: [u8; 32],
    },
    /// `relay-exporter`: the SHA-256 of its client certificate (which the relay pins) and its log-signing key.
    Exporter {
        /// SHA-256 of the DER certificate the relay's export interface pins.
        cert_sha256: [u8; 32],
        /// Ed25519 public key that signs the export log's tree heads.
        log_key: [u8; 32],
    },
}

impl fmt::Display for ReadyLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Relay { addr, cert_sha256 } => {
                write!(f, "listening on {addr} cert-sha256 {}", hex::encode(cert_sha256))
            }
            Self::Exporter { cert_sha256, log_key } => {
                write!(f, "exporter cert-sha256 {} log-key {}", hex::encode(cert_sha256), hex::encode(log_key))
            }
        }
    }
}

/// A line that is not a ready line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a ready line: {0:?}")]
pub struct ReadyLineError(String);

impl FromStr for ReadyLine {
    type Err = ReadyLineError;

    fn from_str(line: &str) -> Result<Self, Self::Err> {
        let bad = || ReadyLineError(line.to_owned());
        let hex32 = |s: &str| crate::pin::parse_fingerprint(s).ok_or_else(bad);
        match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["listening", "on", addr, "cert-sha256", fp] => {
                Ok(Self::Relay { addr: addr.parse().map_err(|_| bad())?, cert_sha256: hex32(fp)? })
            }
            ["exporter", "cert-sha256", fp, "log-key", key] => {
                Ok(Self::Exporter { cert_sha256: hex32(fp)?, log_key: hex32(key)? })
            }
            _ => Err(bad()),
        }
    }
}

impl ReadyLine {
    /// The certificate fingerprint, as the lowercase hex that the CLI flags take.
    pub fn cert_hex(&self) -> String {
        match self {
            Self::Relay { cert_sha256, .. } | Self::Exporter { cert_sha256, .. } => hex::encode(cert_sha256),
        }
    }
}

/// Why a child server process could not be started or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChildError {
    /// Spawning, signalling or waiting failed.
    #[error("{program}: {source}")]
    Io {
        /// The program.
        program: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// It printed nothing within the start timeout.
    #[error("{program} did not become ready within {timeout:?}; its log: {log}")]
    NotReady {
        /// The program.
        program: String,
        /// The timeout.
        timeout: Duration,
        /// Where its stderr went.
        log: PathBuf,
    },
    /// It exited before printing its ready line.
    #[error("{program} exited before it was ready; its log: {log}")]
    Exited {
        /// The program.
        program: String,
        /// Where its stderr went.
        log: PathBuf,
    },
    /// Its first line is not a ready line.
    #[error("{program}: {source}")]
    BadLine {
        /// The program.
        program: String,
        /// The parse error.
        source: ReadyLineError,
    },
    /// It was expected to exit by itself and did not within the bound; it was killed.
    #[error("{program} was still running after {bound:?} and was killed")]
    StillRunning {
        /// The program.
        program: String,
        /// The bound.
        bound: Duration,
    },
    /// It did not exit within the grace period after SIGTERM, and was killed.
    #[error("{program} did not exit within {grace:?} of SIGTERM and was killed")]
    Hung {
        /// The program.
        program: String,
        /// The grace period.
        grace: Duration,
    },
}

/// A server process started by [`ServerChild::start`], killed if dropped.
#[derive(Debug)]
pub struct ServerChild {
    child: Child,
    program: String,
}

impl ServerChild {
    /// Starts `command` with stdin closed, stdout read for the ready line and stderr appended to `log`; waits up to
    /// `timeout` for the first stdout line and parses it.
    pub async fn start(mut command: Command, log: &Path, timeout: Duration) -> Result<(Self, ReadyLine), ChildError> {
        let program = command.as_std().get_program().to_string_lossy().into_owned();
        let io = |source| ChildError::Io { program: program.clone(), source };
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log).map_err(io)?;
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .map_err(io)?;
        let stdout = child.stdout.take().ok_or_else(|| io(std::io::Error::other("no stdout pipe")))?;
        let mut lines = BufReader::new(stdout).lines();
        let line = match tokio::time::timeout(timeout, lines.next_line()).await {
            Err(_) => return Err(ChildError::NotReady { program, timeout, log: log.to_owned() }),
            Ok(Err(e)) => return Err(io(e)),
            Ok(Ok(None)) => return Err(ChildError::Exited { program, log: log.to_owned() }),
            Ok(Ok(Some(line))) => line,
        };
        let ready = line.parse().map_err(|source| ChildError::BadLine { program: program.clone(), source })?;
        // Keep draining stdout so that a process printing more never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok((Self { child, program }, ready))
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends SIGTERM and waits up to `grace` for the exit status; kills it (and fails) if it takes longer.
    pub async fn terminate(mut self, grace: Duration) -> Result<ExitStatus, ChildError> {
        let io = |source| ChildError::Io { program: self.program.clone(), source };
        if let Some(pid) = self.child.id() {
            sigterm(pid).map_err(io)?;
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status.map_err(io),
            Err(_) => {
                self.child.kill().await.ok();
                Err(ChildError::Hung { program: self.program, grace })
            }
        }
    }

    /// Waits up to `bound` for it to exit by itself; kills it (and fails) if it takes longer.
    pub async fn wait(mut self, bound: Duration) -> Result<ExitStatus, ChildError> {
        let io = |source| ChildError::Io { program: self.program.clone(), source };
        match tokio::time::timeout(bound, self.child.wait()).await {
            Ok(status) => status.map_err(io),
            Err(_) => {
                self.child.kill().await.ok();
                Err(ChildError::StillRunning { program: self.program, bound })
            }
        }
    }

    /// Kills it with SIGKILL (no shutdown code runs) and reaps it.
    pub async fn kill(mut self) -> Result<(), ChildError> {
        let program = self.program.clone();
        self.child.kill().await.map_err(|source| ChildError::Io { program, source })
    }
}

/// Sends SIGTERM to process `pid` (with `kill(1)`: this crate has no `unsafe` to call `kill(2)` itself).
pub fn sigterm(pid: u32) -> std::io::Result<()> {
    let status = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status()?;
    if status.success() { Ok(()) } else { Err(std::io::Error::other(format!("kill -TERM {pid} failed"))) }
}

/// For synchronous callers (the binaries' own tests, which read a `std` child's stdout themselves): SIGTERM to
/// `child`, then its exit status within `grace`; past that it is killed and this fails.
pub fn terminate_blocking(child: &mut std::process::Child, grace: Duration) -> std::io::Result<ExitStatus> {
    sigterm(child.id())?;
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if start.elapsed() > grace {
            child.kill().ok();
            child.wait().ok();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no exit within {grace:?} of SIGTERM"),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_lines_round_trip_and_reject_near_misses() {
        let relay = ReadyLine::Relay { addr: "127.0.0.1:4433".parse().expect("addr"), cert_sha256: [0xab; 32] };
        let text = relay.to_string();
        assert_eq!(text, format!("listening on 127.0.0.1:4433 cert-sha256 {}", "ab".repeat(32)));
        assert_eq!(text.parse::<ReadyLine>(), Ok(relay));
        let exporter = ReadyLine::Exporter { cert_sha256: [1; 32], log_key: [2; 32] };
        assert_eq!(exporter.to_string().parse::<ReadyLine>(), Ok(exporter));
        assert_eq!(exporter.cert_hex(), "01".repeat(32));
        for bad in [
            "",
            "listening on 127.0.0.1:4433",
            "listening on nowhere cert-sha256 00",
            &format!("listening on 127.0.0.1:1 cert-sha256 {}", "zz".repeat(32)),
            &format!("listening on 127.0.0.1:1 cert-sha256 {} extra", "00".repeat(32)),
            &format!("exporter cert-sha256 {} log-key {}", "00".repeat(32), "00".repeat(31)),
        ] {
            assert!(bad.parse::<ReadyLine>().is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn a_child_that_exits_before_its_ready_line_is_reported_with_its_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("child.log");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo oops >&2"]);
        let err = ServerChild::start(cmd, &log, Duration::from_secs(10)).await.expect_err("no ready line");
        assert!(matches!(err, ChildError::Exited { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&log).expect("log"), "oops\n");
    }

    #[tokio::test]
    async fn a_child_is_started_parsed_and_terminated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let line = ReadyLine::Exporter { cert_sha256: [3; 32], log_key: [4; 32] };
        let mut cmd = Command::new("sh");
        // exec: SIGTERM reaches sleep itself, which exits on it.
        cmd.args(["-c", &format!("echo '{line}'; exec sleep 30")]);
        let (child, ready) =
            ServerChild::start(cmd, &dir.path().join("log"), Duration::from_secs(10)).await.expect("start");
        assert_eq!(ready, line);
        assert!(child.pid().is_some());
        let status = child.terminate(Duration::from_secs(10)).await.expect("terminate");
        assert!(!status.success(), "sleep dies of SIGTERM");
    }
}
