//! The relay under test: a `relayd` child process this tool starts on 127.0.0.1:0 in a temporary directory, or a
//! running relay named on the command line. For a child, CPU time and memory are read from /proc.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use relay_client::pin::parse_fingerprint;
use relay_quic::ready::{ReadyLine, ServerChild};
use tokio::process::Command;

use crate::Target;

/// How long relayd may take to print its ready line.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A relay to load.
pub struct Relay {
    /// Its QUIC address.
    pub addr: SocketAddr,
    /// SHA-256 of its certificate.
    pub fingerprint: [u8; 32],
    child: Option<(ServerChild, u32, tempfile::TempDir)>,
}

/// Limits written into the child relay's config file (production defaults unless a run needs more room).
#[derive(Debug, Clone, Copy, Default)]
pub struct Overrides {
    /// `limits.mailbox_max_messages`, if the default quota is too small for the run.
    pub mailbox_max_messages: Option<u64>,
    /// `limits.max_streams_per_connection`, if `--window` needs more.
    pub max_streams: Option<u32>,
}

/// CPU time and memory of a process, from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcStats {
    /// User plus system CPU time, in seconds.
    pub cpu_s: f64,
    /// Resident set size now, bytes.
    pub rss_bytes: u64,
    /// Peak resident set size, bytes.
    pub rss_peak_bytes: u64,
}

impl ProcStats {
    /// Reads the figures of process `pid` (`None` for this process).
    pub fn read(pid: Option<u32>) -> Result<Self> {
        let dir = match pid {
            Some(p) => PathBuf::from(format!("/proc/{p}")),
            None => PathBuf::from("/proc/self"),
        };
        let stat = std::fs::read_to_string(dir.join("stat"))?;
        // Fields after the parenthesised command name (which may itself contain spaces): state is field 3, utime and
        // stime are fields 14 and 15, so indices 11 and 12 here.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| anyhow!("unexpected /proc stat format"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        let cpu_s = (ticks(11) + ticks(12)) as f64 / clock_ticks_per_second() as f64;
        let status = std::fs::read_to_string(dir.join("status"))?;
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
                .map_or(0, |k| k * 1024)
        };
        Ok(Self { cpu_s, rss_bytes: kib("VmRSS:"), rss_peak_bytes: kib("VmHWM:") })
    }
}

/// `sysconf(_SC_CLK_TCK)` without libc: the kernel passes it in the auxiliary vector as `AT_CLKTCK` (17). Linux
/// fixes it at 100 on the usual architectures, which is the fallback.
fn clock_ticks_per_second() -> u64 {
    const AT_CLKTCK: u64 = 17;
    let Ok(auxv) = std::fs::read("/proc/self/auxv") else { return 100 };
    let word = |c: &[u8]| c.try_into().map(u64::from_ne_bytes).ok();
    auxv.chunks_exact(16)
        .filter_map(|pair| Some((word(&pair[..8])?, word(&pair[8..])?)))
        .find(|(key, _)| *key == AT_CLKTCK)
        .map_or(100, |(_, v)| v.max(1))
}

fn default_relayd() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().ok_or_else(|| anyhow!("cannot locate the directory of this executable"))?;
    let path = dir.join("relayd");
    if !path.exists() {
        bail!("{} not found: build it (`cargo build --bin relayd`) or pass --relayd PATH", path.display());
    }
    Ok(path)
}

impl Relay {
    /// The relay of `target`: the running one it names, or a fresh child process.
    pub async fn open(target: &Target, overrides: Overrides) -> Result<Self> {
        if let (Some(addr), Some(hex)) = (target.server, &target.cert_sha256) {
            let fingerprint = parse_fingerprint(hex).ok_or_else(|| anyhow!("--cert-sha256 must be 64 hex digits"))?;
            return Ok(Self { addr, fingerprint, child: None });
        }
        let path = match &target.relayd {
            Some(p) => p.clone(),
            None => default_relayd()?,
        };
        Self::spawn(&path, overrides).await
    }

    async fn spawn(relayd: &Path, overrides: Overrides) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        // Every load client connects from 127.0.0.1 and sends as fast as it can: the per-address and per-account
        // rate limits are lifted so that the run measures the relay, not its abuse limits.
        let mut config = String::from(
            "[limits]\nmax_connections_per_ip = 1000000\nregistrations_per_minute_per_ip = 100000000\n\
             sends_per_second = 100000000\n",
        );
        if let Some(n) = overrides.mailbox_max_messages {
            config.push_str(&format!("mailbox_max_messages = {n}\n"));
        }
        if let Some(n) = overrides.max_streams {
            config.push_str(&format!("max_streams_per_connection = {n}\n"));
        }
        let config_path = dir.path().join("relayd.toml");
        std::fs::write(&config_path, config)?;
        let mut command = Command::new(relayd);
        command
            .arg("--config")
            .arg(&config_path)
            .arg("--data")
            .arg(dir.path().join("data"))
            .arg("--listen")
            .arg("127.0.0.1:0")
            .env("RUST_LOG", std::env::var("RELAYD_LOG").unwrap_or_else(|_| "warn".into()));
        let (child, ready) = ServerChild::start(command, &dir.path().join("relayd.log"), START_TIMEOUT).await?;
        let ReadyLine::Relay { addr, cert_sha256: fingerprint } = ready else {
            bail!("{} printed {ready}", relayd.display())
        };
        let pid = child.pid().ok_or_else(|| anyhow!("relayd exited at once"))?;
        Ok(Self { addr, fingerprint, child: Some((child, pid, dir)) })
    }

    /// The child's pid, if this tool started the relay.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|(_, pid, _)| *pid)
    }

    /// The child's CPU time and memory; `None` for a relay this tool did not start.
    pub fn stats(&self) -> Option<ProcStats> {
        self.pid().and_then(|p| ProcStats::read(Some(p)).ok())
    }

    /// Stops a child relay with SIGTERM (SIGKILL if it does not exit within 10 s).
    pub async fn stop(mut self) {
        let Some((child, _pid, _dir)) = self.child.take() else { return };
        if let Err(e) = child.terminate(Duration::from_secs(10)).await {
            eprintln!("relay-load: stopping relayd: {e}");
        }
    }
}

/// Server CPU and memory over a measured phase.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    started: Instant,
    server: Option<ProcStats>,
    client: Option<ProcStats>,
}

impl Usage {
    /// Starts measuring.
    pub fn start(relay: &Relay) -> Self {
        Self { started: Instant::now(), server: relay.stats(), client: ProcStats::read(None).ok() }
    }

    /// Adds `server_cpu_pct`, `client_cpu_pct` (percent of one core over the phase) and the server's peak RSS.
    pub fn finish(&self, relay: &Relay, report: &mut crate::report::Report) {
        let wall = self.started.elapsed().as_secs_f64().max(1e-9);
        if let (Some(before), Some(after)) = (self.server, relay.stats()) {
            report.set("server_cpu_pct", crate::report::round2((after.cpu_s - before.cpu_s) / wall * 100.0), true);
            report.server_rss_peak_bytes = Some(after.rss_peak_bytes);
        }
        if let (Some(before), Ok(after)) = (self.client, ProcStats::read(None)) {
            report.set("client_cpu_pct", crate::report::round2((after.cpu_s - before.cpu_s) / wall * 100.0), true);
        }
    }
}
