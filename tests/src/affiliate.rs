//! Affiliates for tests: [`Sink`], a tiny HTTP/1.1 webhook endpoint on `127.0.0.1:0` that checks every request's
//! Standard Webhooks signature and records it (with when it arrived); [`TestExporter`], the `relay-exporter` logic
//! running in this process against a [`TestRelay`] with its export interface open, with a catalogue that points at
//! the sinks; and [`ExporterProcess`], the `relay-exporter` binary as a child process that can be killed and
//! restarted on its data directory.
//!
//! A sink answers 200, or 503 while its `fail` switch is on, after an optional delay (a slow affiliate), and records
//! every attempt. Every wait takes a bound
//! from the caller and wakes on recorded requests or exporter progress; nothing here sleeps for a fixed time.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine;
use relay_exporter::{Catalogue, Exporter, Progress, webhook};
use relay_quic::ready::{ReadyLine, ServerChild};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::TestRelay;

/// Largest request head or body a sink reads.
const MAX_REQUEST: usize = 1 << 20;

/// One request a sink received.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// `webhook-id`.
    pub id: String,
    /// The body, parsed (`Null` if it is not JSON).
    pub body: Value,
    /// The raw body.
    pub raw: String,
    /// Whether `webhook-signature` verified with the affiliate's key.
    pub signature_ok: bool,
    /// The status the sink answered.
    pub status: u16,
    /// When the sink accepted the request's connection: the request cannot have started later.
    pub at: Instant,
}

/// An affiliate's webhook endpoint.
pub struct Sink {
    addr: SocketAddr,
    /// PEM of the sink's self-signed certificate when it serves https.
    ca_pem: Option<String>,
    key: Vec<u8>,
    fail: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    changed: watch::Receiver<usize>,
    /// Requests read whole so far (counted before any delay, so a slow sink shows a request in flight).
    arrived: watch::Receiver<usize>,
    /// While false, requests read whole wait for it before they are answered.
    open: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Sink {
    /// A sink verifying signatures with `key`, listening on `127.0.0.1:0` (plain http).
    pub async fn start(key: &[u8]) -> Result<Self> {
        Self::start_with(key, None).await
    }

    /// The same over https, with a fresh self-signed certificate for 127.0.0.1 ([`Sink::ca_pem`] to trust it).
    pub async fn start_tls(key: &[u8]) -> Result<Self> {
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
        let pem = cert.cert.pem();
        let key_der = rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der())
            .map_err(|e| anyhow!("sink key: {e}"))?;
        let config = rustls::ServerConfig::builder_with_provider(relay_quic::crypto_provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key_der)?;
        let mut sink = Self::start_with(key, Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await?;
        sink.ca_pem = Some(pem);
        Ok(sink)
    }

    /// PEM of the certificate to trust for an https sink.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    async fn start_with(key: &[u8], tls: Option<tokio_rustls::TlsAcceptor>) -> Result<Self> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        let fail = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let (tx, changed) = watch::channel(0usize);
        let (arrivals, arrived) = watch::channel(0usize);
        let open = Arc::new(watch::Sender::new(true));
        let gate = open.clone();
        let (k, f, d, a) = (key.to_vec(), fail.clone(), delay_ms.clone(), attempts.clone());
        let task = tokio::spawn(async move {
            // Ends when the sink is dropped (the task is aborted) or the listener fails.
            while let Ok((stream, _)) = listener.accept().await {
                let at = Instant::now();
                let (k, f, d, a, tx, tls) = (k.clone(), f.clone(), d.clone(), a.clone(), tx.clone(), tls.clone());
                let arrivals = arrivals.clone();
                let mut gate = gate.subscribe();
                tokio::spawn(async move {
                    let arrived = async move {
                        arrivals.send_modify(|n| *n += 1);
                        // A closed sender (the sink dropped) opens the gate: nothing waits for ever.
                        let _ = gate.wait_for(|open| *open).await;
                    };
                    let served = match tls {
                        Some(acceptor) => match acceptor.accept(stream).await {
                            Ok(stream) => serve(stream, &k, &f, &d, at, arrived).await,
                            Err(e) => Err(e.into()),
                        },
                        None => serve(stream, &k, &f, &d, at, arrived).await,
                    };
                    if let Ok(attempt) = served {
                        let n = {
                            let mut all = a.lock().unwrap_or_else(|e| e.into_inner());
                            all.push(attempt);
                            all.len()
                        };
                        tx.send_replace(n);
                    }
                });
            }
        });
        Ok(Self { addr, ca_pem: None, key: key.to_vec(), fail, delay_ms, attempts, changed, arrived, open, task })
    }

    /// The webhook URL.
    pub fn url(&self) -> String {
        let scheme = if self.ca_pem.is_some() { "https" } else { "http" };
        format!("{scheme}://{}/hooks", self.addr)
    }

    /// The `whsec_` secret for the catalogue.
    pub fn secret(&self) -> String {
        format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(&self.key))
    }

    /// While on, every request is answered 503.
    pub fn set_failing(&self, fail: bool) {
        self.fail.store(fail, Ordering::SeqCst);
    }

    /// Answers every request only `delay` after reading it: a slow affiliate, so that a backlog takes a while to
    /// deliver (crash tests kill the exporter in the middle of one).
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms.store(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    /// While `hold` is true, requests read whole are not answered (an affiliate that is slow for as long as a test
    /// needs); turning it false answers them.
    pub fn hold(&self, hold: bool) {
        self.open.send_replace(!hold);
    }

    /// Waits, at most `bound`, until `n` requests have been read whole (a slow sink has not answered them yet).
    pub async fn wait_arrivals(&self, n: usize, bound: Duration) -> Result<()> {
        let mut arrived = self.arrived.clone();
        tokio::time::timeout(bound, arrived.wait_for(|a| *a >= n))
            .await
            .context("the sink did not receive the requests in time")?
            .map_err(|_| anyhow!("sink stopped"))?;
        Ok(())
    }

    /// Every request received so far, in order.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.attempts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The events processed: the first 200-answered request of each webhook id (the affiliate's dedupe by id).
    pub fn events(&self) -> Vec<Attempt> {
        let mut seen = BTreeMap::new();
        for a in self.attempts().into_iter().filter(|a| a.status == 200) {
            seen.entry(a.id.clone()).or_insert(a);
        }
        seen.into_values().collect()
    }

    /// Waits, at most `bound`, until `done(attempts)` holds.
    pub async fn wait_until(&self, bound: Duration, done: impl Fn(&[Attempt]) -> bool) -> Result<Vec<Attempt>> {
        let mut changed = self.changed.clone();
        tokio::time::timeout(bound, async {
            loop {
                let all = self.attempts();
                if done(&all) {
                    return Ok(all);
                }
                changed.changed().await.map_err(|_| anyhow!("sink stopped"))?;
            }
        })
        .await
        .context("sink did not receive what was expected in time")?
    }

    /// Waits, at most `bound`, until `n` events (distinct ids answered 200) have been received.
    pub async fn wait_events(&self, n: usize, bound: Duration) -> Result<Vec<Attempt>> {
        self.wait_until(bound, |_| self.events().len() >= n).await?;
        Ok(self.events())
    }
}

/// Reads one request, checks its signature, answers it.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    key: &[u8],
    fail: &AtomicBool,
    delay_ms: &AtomicU64,
    at: Instant,
    arrived: impl std::future::Future<Output = ()>,
) -> Result<Attempt> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_REQUEST {
            bail!("request head too large");
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed before the end of the head");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end])?.to_owned();
    let headers: BTreeMap<String, String> = head
        .split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers.get("content-length").context("no content-length")?.parse()?;
    if len > MAX_REQUEST {
        bail!("body too large");
    }
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed before the end of the body");
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(len);
    arrived.await;
    let id = headers.get("webhook-id").cloned().unwrap_or_default();
    let timestamp = headers.get("webhook-timestamp").and_then(|t| t.parse().ok()).unwrap_or(0);
    let signature = headers.get("webhook-signature").map(String::as_str).unwrap_or("");
    let signature_ok = headers.get("content-type").map(String::as_str) == Some("application/json")
        && webhook::verify(key, &id, timestamp, &body, signature);
    let delay = delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let status = if fail.load(Ordering::SeqCst) { 503 } else { 200 };
    let reason = if status == 200 { "OK" } else { "Service Unavailable" };
    let answer = format!("HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    // Recorded even if the answer cannot be written: the affiliate has processed the request either way (an exporter
    // killed while waiting for the answer never learns that).
    if stream.write_all(answer.as_bytes()).await.is_ok() {
        stream.shutdown().await.ok();
    }
    let raw = String::from_utf8_lossy(&body).into_owned();
    Ok(Attempt { id, body: serde_json::from_str(&raw).unwrap_or(Value::Null), raw, signature_ok, status, at })
}

/// The exporter logic running in this process, with its own data dir.
pub struct TestExporter {
    dir: tempfile::TempDir,
    log_key: String,
    progress: watch::Receiver<Progress>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for TestExporter {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

impl TestExporter {
    /// Starts a relay with its export interface open for a new exporter whose catalogue is `catalogue` (TOML),
    /// then the exporter against it, polling every 20 ms.
    pub async fn start(catalogue: &str) -> Result<(TestRelay, Self)> {
        Self::start_trusting(catalogue, None).await
    }

    /// The same, with the exporter also trusting the CA certificates in `ca_pem` for https affiliates.
    pub async fn start_trusting(catalogue: &str, ca_pem: Option<&str>) -> Result<(TestRelay, Self)> {
        let dir = tempfile::tempdir()?;
        let catalogue = Catalogue::parse(catalogue)?;
        let mut exporter = Exporter::open(&dir.path().join("exporter"), catalogue, Duration::from_millis(20))?;
        if let Some(pem) = ca_pem {
            exporter.trust_extra_ca(pem.as_bytes())?;
        }
        let relay = TestRelay::with_export_for(exporter.fingerprint()).await?;
        Self::run(dir, exporter, relay).await
    }

    /// The same against a `relayd` child process whose export interface listens on a port fixed across its
    /// restarts (so the exporter reconnects to it), pinning this exporter.
    pub async fn start_with_relay_process(catalogue: &str) -> Result<(TestRelay, Self)> {
        let dir = tempfile::tempdir()?;
        let exporter =
            Exporter::open(&dir.path().join("exporter"), Catalogue::parse(catalogue)?, Duration::from_millis(20))?;
        let port = crate::free_udp_port()?;
        let fingerprint = exporter.fingerprint();
        let relay = TestRelay::process_with(|c| {
            c.export_listen = Some(SocketAddr::from(([127, 0, 0, 1], port)));
            c.exporter_cert_sha256 = Some(fingerprint);
        })
        .await?;
        Self::run(dir, exporter, relay).await
    }

    /// Runs `exporter` (its data dir in `dir`) against `relay`'s export interface.
    async fn run(dir: tempfile::TempDir, exporter: Exporter, relay: TestRelay) -> Result<(TestRelay, Self)> {
        let addr = relay.export_addr().ok_or_else(|| anyhow!("no export interface"))?;
        let fp = relay_client::pin::parse_fingerprint(relay.fingerprint()).ok_or_else(|| anyhow!("bad fingerprint"))?;
        let progress = exporter.progress();
        let log_key = exporter.log_key();
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(async move {
            if let Err(e) = exporter.run(addr, fp, shutdown).await {
                tracing::error!(error = %e, "test exporter stopped");
            }
        });
        let exporter = Self { dir, log_key, progress, stop, task: Some(task) };
        // Users can grant only once the exporter's notices are on the relay: its first pass publishes them.
        exporter.wait_until(crate::START_TIMEOUT, |p| p.notices > 0 || p.passes > 0).await?;
        Ok((relay, exporter))
    }

    /// The exporter's progress now.
    pub fn progress(&self) -> Progress {
        *self.progress.borrow()
    }

    /// Waits, at most `bound`, until `done(progress)` holds; the progress then.
    pub async fn wait_until(&self, bound: Duration, done: impl Fn(&Progress) -> bool) -> Result<Progress> {
        let mut rx = self.progress.clone();
        let p = tokio::time::timeout(bound, rx.wait_for(|p| done(p)))
            .await
            .context("the exporter did not get there in time")?
            .map_err(|_| anyhow!("the exporter stopped"))?;
        Ok(*p)
    }

    /// Waits until the exporter has completed `n` more passes (feed read, then due deliveries) than now: a pass
    /// that started after this call has then finished.
    pub async fn wait_passes(&self, n: u64, bound: Duration) -> Result<Progress> {
        let start = self.progress().passes;
        self.wait_until(bound, |p| p.passes >= start + n).await
    }

    /// The exporter's data directory.
    pub fn data_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("exporter")
    }

    /// Hex of the key that verifies the export log's tree heads.
    pub fn log_key(&self) -> &str {
        &self.log_key
    }

    /// Stops the exporter and waits for it to release its store (the data directory stays).
    pub async fn stop(&mut self) -> Result<()> {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            task.await?;
        }
        Ok(())
    }
}

/// A `relay-exporter` child process on its own data directory, which it keeps across kills and restarts; its stderr
/// goes to `exporter.log` beside the data directory.
///
/// Each side pins the other's certificate, so [`ExporterProcess::new`] starts the exporter once with no relay to
/// learn its certificate (it keeps its identity in its data dir) and stops it; [`ExporterProcess::start`] then runs
/// it against a relay whose export interface accepts [`ExporterProcess::fingerprint`].
pub struct ExporterProcess {
    dir: tempfile::TempDir,
    fingerprint: String,
    log_key: String,
    poll_ms: u64,
    relay: Option<(SocketAddr, String)>,
    extra_args: Vec<String>,
    child: Option<ServerChild>,
}

impl ExporterProcess {
    /// Writes `catalogue` (TOML) beside a new data directory and starts the exporter once, against no relay, to
    /// create its identity; it is stopped again before this returns. `poll_ms` is its feed poll interval.
    pub async fn new(catalogue: &str, poll_ms: u64) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("affiliates.toml"), catalogue)?;
        let mut exporter = Self {
            dir,
            fingerprint: String::new(),
            log_key: String::new(),
            poll_ms,
            relay: Some((SocketAddr::from(([127, 0, 0, 1], 9)), "00".repeat(32))),
            extra_args: Vec::new(),
            child: None,
        };
        exporter.spawn().await?;
        exporter.kill().await?;
        exporter.relay = None;
        Ok(exporter)
    }

    /// Has every later start ask the witness `spec` (`ADDR,CERT_SHA256_HEX,WITNESS_KEY_HEX`) to cosign its heads.
    pub fn add_witness(&mut self, spec: &str) {
        self.add_args(&["--witness", spec]);
    }

    /// Passes `args` to every later start.
    pub fn add_args(&mut self, args: &[&str]) {
        self.extra_args.extend(args.iter().map(|a| (*a).to_owned()));
    }

    /// Starts it against the export interface at `relay`, pinning the relay certificate `relay_fingerprint`.
    pub async fn start(&mut self, relay: SocketAddr, relay_fingerprint: &str) -> Result<()> {
        if self.child.is_some() {
            bail!("the exporter is already running");
        }
        self.relay = Some((relay, relay_fingerprint.to_owned()));
        self.spawn().await
    }

    async fn spawn(&mut self) -> Result<()> {
        let mut command = self.command()?;
        command.arg("--poll-ms").arg(self.poll_ms.to_string());
        let (child, ready) = ServerChild::start(command, &self.log_path(), crate::START_TIMEOUT).await?;
        let ReadyLine::Exporter { log_key, .. } = ready else { bail!("relay-exporter printed {ready}") };
        let (fingerprint, log_key) = (ready.cert_hex(), hex::encode(log_key));
        if !self.fingerprint.is_empty() && (fingerprint != self.fingerprint || log_key != self.log_key) {
            bail!("relay-exporter changed identity across a restart");
        }
        (self.fingerprint, self.log_key) = (fingerprint, log_key);
        self.child = Some(child);
        Ok(())
    }

    /// Kills it with SIGKILL: no shutdown code runs.
    pub async fn kill(&mut self) -> Result<()> {
        let child = self.child.take().ok_or_else(|| anyhow!("the exporter is not running"))?;
        child.kill().await?;
        Ok(())
    }

    /// Starts it again on the same data directory and relay, after [`ExporterProcess::kill`] or
    /// [`ExporterProcess::stop`].
    pub async fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("the exporter is still running");
        }
        self.spawn().await
    }

    /// Stops it cleanly (SIGTERM) and waits, at most `bound`, for it to release its store.
    pub async fn stop(&mut self, bound: Duration) -> Result<()> {
        let child = self.child.take().ok_or_else(|| anyhow!("the exporter is not running"))?;
        let exit = child.terminate(bound).await?;
        if !exit.success() {
            bail!("relay-exporter exited with {exit} after SIGTERM; see {}", self.log_path().display());
        }
        Ok(())
    }

    /// Waits, at most `bound`, for it to exit by itself (a fatal error); its exit status.
    pub async fn wait_exit(&mut self, bound: Duration) -> Result<std::process::ExitStatus> {
        let child = self.child.take().ok_or_else(|| anyhow!("the exporter is not running"))?;
        Ok(child.wait(bound).await?)
    }

    /// Runs the binary once more on its data directory, catalogue and relay, with `extra` arguments (a one-shot
    /// mode such as `--recover-log-from-relay`), and waits at most `bound` for it to exit.
    pub async fn run_once(&self, extra: &[&str], bound: Duration) -> Result<std::process::Output> {
        if self.child.is_some() {
            bail!("the exporter is still running");
        }
        let mut command = self.command()?;
        command.args(extra).stdin(std::process::Stdio::null()).kill_on_drop(true);
        tokio::time::timeout(bound, command.output())
            .await
            .context("relay-exporter did not exit in time")?
            .map_err(Into::into)
    }

    /// `relay-exporter` on this data directory and catalogue, against the relay it runs with.
    fn command(&self) -> Result<tokio::process::Command> {
        let (relay, relay_fp) = self.relay.clone().ok_or_else(|| anyhow!("no relay to run against"))?;
        let mut command = tokio::process::Command::new(crate::binary_path("relay-exporter", "RELAY_EXPORTER_BIN")?);
        command
            .arg("--data")
            .arg(self.data_dir())
            .arg("--relay")
            .arg(relay.to_string())
            .arg("--relay-cert-sha256")
            .arg(relay_fp)
            .arg("--affiliates")
            .arg(self.catalogue_path())
            .env("RUST_LOG", "info");
        command.args(&self.extra_args);
        Ok(command)
    }

    /// Its affiliates catalogue.
    pub fn catalogue_path(&self) -> std::path::PathBuf {
        self.dir.path().join("affiliates.toml")
    }

    /// Hex SHA-256 of its certificate: what the relay's export interface pins.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Hex of the key that verifies the export log's tree heads.
    pub fn log_key(&self) -> &str {
        &self.log_key
    }

    /// Its data directory.
    pub fn data_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    /// Its stderr log, across restarts.
    pub fn log_path(&self) -> std::path::PathBuf {
        self.dir.path().join("exporter.log")
    }
}

/// Per purpose, the fields an affiliate may receive.
pub type Purposes<'a> = &'a [(&'a str, &'a [&'a str])];

/// The affiliates catalogue (TOML) for sinks: per affiliate its id, its sink (endpoint and secret) and, per purpose,
/// the fields it may receive. `adsco` and `shieldco` get their demo names and countries.
pub fn catalogue(affiliates: &[(&str, &Sink, Purposes<'_>)]) -> String {
    let mut out = String::new();
    for (id, sink, purposes) in affiliates {
        let (name, country) = match *id {
            "adsco" => ("AdsCo SAS", "FR"),
            "shieldco" => ("ShieldCo GmbH", "DE"),
            other => (other, "FR"),
        };
        out.push_str(&format!(
            "[[affiliate]]\nid = \"{id}\"\nname = \"{name}\"\ncountry = \"{country}\"\nendpoint = \"{}\"\n\
             secret = \"{}\"\n[affiliate.purposes]\n",
            sink.url(),
            sink.secret()
        ));
        for (purpose, fields) in *purposes {
            let fields: Vec<String> = fields.iter().map(|f| format!("\"{f}\"")).collect();
            out.push_str(&format!("{purpose} = [{}]\n", fields.join(", ")));
        }
        out.push('\n');
    }
    out
}

/// The catalogue most tests use: AdsCo may receive advertising (`phone_pseudonym`, `device_model`) and analytics
/// (`device_model`, `os`, `app_version`); ShieldCo security (`phone_pseudonym`, `os`).
pub fn test_catalogue(adsco: &Sink, shieldco: &Sink) -> String {
    catalogue(&[
        (
            "adsco",
            adsco,
            &[
                ("advertising", &["phone_pseudonym", "device_model"]),
                ("analytics", &["device_model", "os", "app_version"]),
            ],
        ),
        ("shieldco", shieldco, &[("security", &["phone_pseudonym", "os"])]),
    ])
}
