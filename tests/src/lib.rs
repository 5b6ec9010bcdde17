//! Integration harness: starts real relays on loopback for tests, in-process or as `relayd` child processes, each
//! in its own temporary data directory, and builds clients from the client library.
//!
//! A child-process relay can be stopped cleanly (SIGTERM), killed (SIGKILL) and restarted on the same address and
//! data directory, which is how durability through crashes is tested. Everything a relay wrote (store, certificate,
//! its log on stderr) stays under [`TestRelay::dir`] until the `TestRelay` is dropped.
//!
//! [`TestRelay::verifying`] starts a relay that verifies phone numbers with the `file` verifier: [`TestRelay::user`]
//! and [`TestRelay::raw_user`] then register with the code they read from the relay's code file, and
//! [`TestRelay::code`] reads any request's code, as a person would read the SMS.
//!
//! [`TestRelay::with_export`] starts an in-process relay with its export interface open for a test exporter
//! identity; [`export::connect`] opens the exporter's own client on it with any certificate, or none.
//! [`affiliate::Sink`] is an affiliate's webhook endpoint and [`affiliate::TestExporter`] the exporter process logic
//! running in-process against such a relay, [`affiliate::ExporterProcess`] the `relay-exporter` binary as a child
//! process, [`witness::WitnessProcess`] the `relay-witness` binary. [`chaos::Rng`] gives crash campaigns a replayable
//! random schedule. [`nats::NatsCluster`] is a 3-node NATS JetStream cluster on loopback, from the nats-server that
//! `tools/nats/install.sh` installs in the checkout.

pub mod affiliate;
pub mod chaos;
pub mod export;
pub mod nats;
pub mod witness;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use relay_client::{Device, Home, Messenger, Verification};
use relay_proto::ErrorCode;
use relay_quic::ready::{ReadyLine, ServerChild};
use relay_server::{Config, RelayHandle};
use tokio::process::Command;

/// How long a child relay may take to print its ready line.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

enum Running {
    InProcess(RelayHandle),
    Process(ServerChild),
    Stopped,
}

/// A relay under test.
pub struct TestRelay {
    dir: tempfile::TempDir,
    config: Config,
    addr: SocketAddr,
    fingerprint: String,
    export_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    running: Running,
}

/// Path of the `relayd` binary: `$RELAYD_BIN`, or beside the test executable's `deps/` directory (where
/// `cargo test --workspace` builds it).
pub fn relayd_path() -> Result<PathBuf> {
    binary_path("relayd", "RELAYD_BIN")
}

/// Path of the workspace binary `name`: `$env_var`, or beside the test executable's `deps/` directory.
pub fn binary_path(name: &str, env_var: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(Path::parent).ok_or_else(|| anyhow!("cannot locate target directory"))?;
    let path = dir.join(name);
    if !path.exists() {
        bail!("{} not found: build it with `cargo build --workspace` or set {env_var}", path.display());
    }
    Ok(path)
}

/// Every test client connects from 127.0.0.1, so the per-address limits (connections, registrations) and the
/// per-account send rate are lifted here; the tests of those limits set them back explicitly.
fn loopback_config(dir: &Path) -> Config {
    let mut config =
        Config { listen: SocketAddr::from(([127, 0, 0, 1], 0)), data_dir: dir.join("data"), ..Config::default() };
    config.limits.max_connections_per_ip = 100_000;
    config.limits.registrations_per_minute_per_ip = 1_000_000;
    config.limits.sends_per_second = 1_000_000;
    config.registration.codes_per_hour_per_ip = 1_000_000;
    config.registration.codes_per_hour_per_number = 1_000_000;
    config
}

impl TestRelay {
    /// A relay in this process with default limits.
    pub async fn in_process() -> Result<Self> {
        Self::in_process_with(|_| {}).await
    }

    /// A relay in this process; `tweak` adjusts the configuration (limits) before start.
    pub async fn in_process_with(tweak: impl FnOnce(&mut Config)) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut config = loopback_config(dir.path());
        tweak(&mut config);
        let handle = relay_server::start(config.clone()).await?;
        let (addr, fingerprint) = (handle.local_addr(), handle.cert_fingerprint().to_owned());
        let (export_addr, metrics_addr) = (handle.export_addr(), handle.metrics_addr());
        Ok(Self { dir, config, addr, fingerprint, export_addr, metrics_addr, running: Running::InProcess(handle) })
    }

    /// A relay in this process that verifies phone numbers with the `file` verifier.
    pub async fn verifying() -> Result<Self> {
        Self::in_process_with(|c| c.registration.verifier = relay_server::verify::VerifierSpec::File).await
    }

    /// The clock an in-process relay judges codes and registration locks by: tests move it forward instead of
    /// waiting ten minutes or seven days.
    pub fn registration_clock(&self) -> Option<relay_server::verify::Clock> {
        match &self.running {
            Running::InProcess(h) => Some(h.registration_clock()),
            _ => None,
        }
    }

    /// The code file of request `request_id` (`file` verifier).
    pub fn code_file(&self, request_id: &str) -> PathBuf {
        self.config.data_dir.join(relay_server::verify::file::DIR).join(request_id)
    }

    /// The code of request `request_id`, read from its code file, and the phone number the file names.
    pub fn code(&self, request_id: &str) -> Result<(String, String)> {
        let path = self.code_file(request_id);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let field = |k: &str| v[k].as_str().map(str::to_owned).ok_or_else(|| anyhow!("no {k} in {text}"));
        Ok((field("code")?, field("phone")?))
    }

    /// Asks the relay for a code for `phone` on a fresh connection; the request id and the code read from its file.
    pub async fn request_code(&self, phone: &str) -> Result<(String, String)> {
        let conn = relay_client::Connection::connect(self.addr, self.pinned()?).await?;
        let sent = conn.request_code(phone).await;
        conn.close().await;
        let sent = sent?;
        let (code, _) = self.code(&sent.request_id)?;
        Ok((sent.request_id, code))
    }

    fn pinned(&self) -> Result<[u8; 32]> {
        relay_client::pin::parse_fingerprint(&self.fingerprint).ok_or_else(|| anyhow!("bad fingerprint"))
    }

    /// A relay in this process with its export interface on `127.0.0.1:0`, accepting only `exporter`'s certificate.
    pub async fn with_export(exporter: &export::ExporterIdentity) -> Result<Self> {
        Self::with_export_for(exporter.fingerprint()).await
    }

    /// A relay in this process with its export interface on `127.0.0.1:0`, accepting only the client certificate
    /// with this hex SHA-256.
    pub async fn with_export_for(fingerprint: String) -> Result<Self> {
        Self::in_process_with(|c| {
            c.export_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
            c.exporter_cert_sha256 = Some(fingerprint);
        })
        .await
    }

    /// The bound address of the export interface, when it is enabled.
    pub fn export_addr(&self) -> Option<SocketAddr> {
        self.export_addr
    }

    /// The bound address of an in-process relay's metrics endpoint, when it is enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Connects an export client presenting `identity` (or no client certificate), pinning the relay's certificate.
    pub async fn exporter(&self, identity: Option<&export::ExporterIdentity>) -> Result<export::ExportClient> {
        let addr = self.export_addr.ok_or_else(|| anyhow!("the export interface is not enabled"))?;
        let fp = relay_client::pin::parse_fingerprint(&self.fingerprint).ok_or_else(|| anyhow!("bad fingerprint"))?;
        export::connect(addr, fp, identity).await
    }

    /// A `relayd` child process with default limits.
    pub async fn process() -> Result<Self> {
        Self::process_with(|_| {}).await
    }

    /// A `relayd` child process; `tweak` adjusts the configuration, passed to it as a TOML file.
    pub async fn process_with(tweak: impl FnOnce(&mut Config)) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut config = loopback_config(dir.path());
        tweak(&mut config);
        let mut relay = Self {
            dir,
            config,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            fingerprint: String::new(),
            export_addr: None,
            metrics_addr: None,
            running: Running::Stopped,
        };
        relay.spawn().await?;
        Ok(relay)
    }

    async fn spawn(&mut self) -> Result<()> {
        let toml = self.config.to_toml()?;
        let config_path = self.dir.path().join("relayd.toml");
        std::fs::write(&config_path, toml)?;
        let listen = if self.addr.port() == 0 { self.config.listen } else { self.addr };
        let mut command = Command::new(relayd_path()?);
        command
            .arg("--config")
            .arg(&config_path)
            .arg("--data")
            .arg(&self.config.data_dir)
            .arg("--listen")
            .arg(listen.to_string())
            .env("RUST_LOG", "debug");
        let (child, ready) = ServerChild::start(command, &self.log_path(), START_TIMEOUT).await?;
        let ReadyLine::Relay { addr, .. } = ready else { bail!("relayd printed {ready}") };
        let fingerprint = ready.cert_hex();
        self.addr = addr;
        self.fingerprint = fingerprint;
        // A child reports only its messaging address; an export interface on a fixed port is where it was told.
        self.export_addr = self.config.export_listen.filter(|a| a.port() != 0);
        self.running = Running::Process(child);
        Ok(())
    }

    /// The process id of a running child-process relay (for reading its memory in `/proc`); `None` in process.
    pub fn pid(&self) -> Option<u32> {
        match &self.running {
            Running::Process(child) => child.pid(),
            _ => None,
        }
    }

    /// The configuration the relay runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// A fresh connection to the relay, not authenticated.
    pub async fn raw_connection(&self) -> Result<relay_client::Connection> {
        Ok(relay_client::Connection::connect(self.addr, self.pinned()?).await?)
    }

    /// The relay's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Hex SHA-256 of the relay's certificate.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The store's fault injector, for an in-process relay.
    pub fn storage_faults(&self) -> Option<std::sync::Arc<relay_server::store::commit::StorageFaults>> {
        match &self.running {
            Running::InProcess(h) => Some(h.storage_faults()),
            _ => None,
        }
    }

    /// Seeds an in-process relay with the notices of the exporter's example catalogue plus `metrico` (analytics), as
    /// an exporter publishes them at start: for tests that grant consent without running an exporter. Returns the
    /// documents published.
    pub async fn publish_test_notices(&self) -> Result<Vec<Vec<u8>>> {
        let documents = test_notices()?;
        self.publish_notices(&documents).await?;
        Ok(documents)
    }

    /// Waits, at most `bound`, until an exporter has published its notices to this in-process relay (a test starting
    /// an exporter child waits for this before its users grant anything).
    pub async fn wait_for_notices(&self, bound: Duration) -> Result<()> {
        let Running::InProcess(h) = &self.running else { bail!("in-process relays only") };
        let notices = h.notices();
        tokio::time::timeout(bound, async {
            while notices.current_count().await.unwrap_or(0) == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .context("the exporter did not publish its notices in time")
    }

    /// Publishes `documents` as an exporter's complete set of current notices (in-process relays only).
    pub async fn publish_notices(&self, documents: &[Vec<u8>]) -> Result<()> {
        match &self.running {
            Running::InProcess(h) => {
                h.notices().publish(documents).await?;
                Ok(())
            }
            _ => bail!("notices are seeded in-process only; a relayd child gets them from its exporter"),
        }
    }

    /// The hook that makes an in-process relay lie about keys and envelopes.
    pub fn tamper(&self) -> Option<std::sync::Arc<relay_server::tamper::Tamper>> {
        match &self.running {
            Running::InProcess(h) => Some(h.tamper()),
            _ => None,
        }
    }

    /// The relay's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    /// The temporary directory holding the data directory and, for child processes, `relayd.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The child process's stderr log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("relayd.log")
    }

    /// Stops the relay cleanly (SIGTERM for a child process) and waits for it to release its store.
    pub async fn stop(&mut self) -> Result<()> {
        match std::mem::replace(&mut self.running, Running::Stopped) {
            Running::InProcess(h) => h.shutdown().await,
            Running::Process(child) => {
                let exit = child.terminate(Duration::from_secs(20)).await?;
                if !exit.success() {
                    bail!("relayd exited with {exit} after SIGTERM");
                }
            }
            Running::Stopped => {}
        }
        Ok(())
    }

    /// Kills a child-process relay with SIGKILL: no shutdown code runs.
    pub async fn kill(&mut self) -> Result<()> {
        match std::mem::replace(&mut self.running, Running::Stopped) {
            Running::Process(child) => {
                child.kill().await?;
                Ok(())
            }
            other => {
                self.running = other;
                bail!("only a child-process relay can be killed")
            }
        }
    }

    /// Changes the configuration of a stopped child-process relay; [`TestRelay::restart`] then runs with it (an
    /// operator switching verifiers on an existing store, say).
    pub fn reconfigure(&mut self, tweak: impl FnOnce(&mut Config)) -> Result<()> {
        if !matches!(self.running, Running::Stopped) {
            bail!("stop the relay before changing its configuration");
        }
        tweak(&mut self.config);
        Ok(())
    }

    /// Starts a stopped or killed child-process relay again, on the same address and data directory.
    pub async fn restart(&mut self) -> Result<()> {
        if !matches!(self.running, Running::Stopped) {
            bail!("relay is still running");
        }
        self.spawn().await?;
        Ok(())
    }

    /// A registered client with a fresh home for `phone`. On a verifying relay it registers with the code from
    /// the relay's code file (and may so take the number over from another identity).
    pub async fn user(&self, phone: &str) -> Result<TestUser> {
        let user = self.unregistered_user(phone)?;
        let server = self.addr.to_string();
        let messenger = match Messenger::register(&user.home, &server, &self.fingerprint).await {
            Ok((m, _)) => m,
            Err(e) if e.code() == Some(ErrorCode::VerificationRequired) => {
                let (_, code) = self.request_code(phone).await?;
                let proof = Verification { code: Some(code), pin: None };
                Messenger::register_with(&user.home, &server, &self.fingerprint, &proof).await?.0
            }
            Err(e) => return Err(e.into()),
        };
        Ok(TestUser { home_dir: user.home_dir, home: user.home, messenger })
    }

    /// A fresh home for `phone`, initialised and not registered: register it with [`UnregisteredUser::register`].
    pub fn unregistered_user(&self, phone: &str) -> Result<UnregisteredUser> {
        let home_dir = tempfile::tempdir()?;
        let home = Home::new(home_dir.path());
        relay_client::messenger::init(
            &home,
            phone,
            Device { model: "test".into(), os: "linux".into(), app_version: "0".into() },
        )?;
        Ok(UnregisteredUser { home_dir, home, server: self.addr.to_string(), cert: self.fingerprint.clone() })
    }
}

/// A home with keys for a number, not registered yet (a new phone, or a squatter), for tests of registration.
pub struct UnregisteredUser {
    home_dir: tempfile::TempDir,
    /// The home.
    pub home: Home,
    server: String,
    cert: String,
}

impl UnregisteredUser {
    /// Registers with `verification` (code, PIN); the registered user, or the relay's refusal.
    pub async fn register(self, verification: &Verification) -> Result<TestUser, relay_client::MessengerError> {
        let (messenger, _) = Messenger::register_with(&self.home, &self.server, &self.cert, verification).await?;
        Ok(TestUser { home_dir: self.home_dir, home: self.home, messenger })
    }

    /// Tries to register with `verification`, keeping the home for another try: `Ok` if the relay accepted (the
    /// connection is closed again), else why not.
    pub async fn try_register(&self, verification: &Verification) -> Result<(), relay_client::MessengerError> {
        let (m, _) = Messenger::register_with(&self.home, &self.server, &self.cert, verification).await?;
        m.close().await;
        Ok(())
    }
}

impl TestRelay {
    /// A connection registered (and authenticated) as a fresh identity for `phone`, without a messenger: nothing is
    /// published or stored on the client side, for tests that speak the protocol directly.
    pub async fn raw_user(&self, phone: &str) -> Result<(relay_client::Connection, relay_client::Identity)> {
        let conn = relay_client::Connection::connect(self.addr, self.pinned()?).await?;
        let identity = relay_client::Identity::generate();
        match conn.register(&identity, phone, Default::default()).await {
            Ok(_) => {}
            Err(e) if e.code() == Some(ErrorCode::VerificationRequired) => {
                let (_, code) = self.request_code(phone).await?;
                conn.register_verified(&identity, phone, Default::default(), &code, "").await?;
            }
            Err(e) => return Err(e.into()),
        }
        Ok((conn, identity))
    }
}

/// A UDP port on 127.0.0.1 that was free a moment ago, for a child relay's export interface that must keep its
/// address across restarts.
pub fn free_udp_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?.local_addr()?.port())
}

/// A registered client and its home directory.
pub struct TestUser {
    home_dir: tempfile::TempDir,
    /// The home.
    pub home: Home,
    /// The connected client.
    pub messenger: Messenger,
}

impl TestUser {
    /// The messenger, and the guard that keeps the home directory alive (drop it last).
    pub fn split(self) -> (Messenger, tempfile::TempDir) {
        (self.messenger, self.home_dir)
    }

    /// The home directory.
    pub fn home_dir(&self) -> &Path {
        self.home_dir.path()
    }

    /// Reconnects (a new connection, same home), e.g. after a relay restart.
    pub async fn reconnect(&mut self) -> Result<()> {
        self.messenger = Messenger::open(&self.home).await?;
        Ok(())
    }
}

/// What [`private_tree`] found under a directory.
#[derive(Debug)]
pub struct TreeModes {
    /// Regular files seen.
    pub files: usize,
    /// Directories not 0700 and files with any group or other permission bit, with their modes.
    pub loose: Vec<(PathBuf, u32)>,
}

/// Walks `dir` (itself included): every directory must be 0700 and no file may grant anything to group or others.
pub fn private_tree(dir: &Path) -> Result<TreeModes> {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| -> Result<u32> { Ok(std::fs::metadata(p)?.permissions().mode() & 0o777) };
    let mut modes = TreeModes { files: 0, loose: Vec::new() };
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if mode(&d)? != 0o700 {
            modes.loose.push((d.clone(), mode(&d)?));
        }
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                modes.files += 1;
                if mode(&path)? & 0o077 != 0 {
                    modes.loose.push((path.clone(), mode(&path)?));
                }
            }
        }
    }
    Ok(modes)
}

/// Every file under `dir` whose bytes contain `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Result<Vec<PathBuf>> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if std::fs::read(&path)?.windows(needle.len()).any(|w| w == needle) {
                hits.push(path);
            }
        }
    }
    Ok(hits)
}

/// Longest wait for one delivery event in [`drain_mailbox`].
pub const DELIVERY_WAIT: Duration = Duration::from_secs(20);

/// Drains `conn`'s mailbox through a delivery stream, acknowledging each envelope; the envelopes, in order. Fails if
/// an event takes longer than [`DELIVERY_WAIT`].
pub async fn drain_mailbox(conn: &relay_client::Connection) -> Result<Vec<bytes::Bytes>> {
    let mut inbox = conn.subscribe().await?;
    let mut got = Vec::new();
    loop {
        let event = tokio::time::timeout(DELIVERY_WAIT, inbox.next())
            .await
            .context("no delivery event in time")?
            .ok_or_else(|| anyhow!("delivery stream closed"))??;
        match event {
            relay_client::InboxEvent::Deliver(d) => {
                inbox.ack(&[d.server_id]).await?;
                got.push(d.envelope);
            }
            relay_client::InboxEvent::QueueEmpty => return Ok(got),
            relay_client::InboxEvent::Acked(_) => {}
        }
    }
}

/// The affiliates catalogue of the tests: the exporter's example file (adsco: advertising and analytics; shieldco:
/// security) and `metrico` (analytics).
pub fn test_catalogue() -> String {
    format!(
        "{}\n[[affiliate]]\nid = \"metrico\"\nname = \"Metrico Oy\"\ncountry = \"FI\"\n\
         endpoint = \"http://127.0.0.1:9002/in\"\nsecret = \"whsec_bWV0cmljby1zZWNyZXQta2V5LTEyMzQ1Ng==\"\n\
         [affiliate.purposes]\nanalytics = [\"device_model\", \"os\"]\n",
        include_str!("../../exporter/affiliates.example.toml")
    )
}

/// The notice documents of [`test_catalogue`], each at version 1.
pub fn test_notices() -> Result<Vec<Vec<u8>>> {
    let catalogue = relay_exporter::Catalogue::parse(&test_catalogue())?;
    Ok(catalogue.notices().map(|n| n.document.clone()).collect())
}

/// Runs the `relay` CLI (beside the test executable, or `$RELAY_BIN`) on `home` with `args`, `typed` written to its
/// stdin and then closed (an answer to a confirmation prompt); its output. Not bounded: callers bound it.
pub async fn relay_cli_typing(home: &Path, args: &[&str], typed: &str) -> Result<std::process::Output> {
    let mut child = Command::new(binary_path("relay", "RELAY_BIN")?)
        .arg("--home")
        .arg(home)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
    tokio::io::AsyncWriteExt::write_all(&mut stdin, typed.as_bytes()).await?;
    drop(stdin);
    Ok(child.wait_with_output().await?)
}
