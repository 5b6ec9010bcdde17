//! `relay-load`: how fast is a relay? Subcommands, each bounded in message count and in time (`--seconds`):
//!
//! - `echo`: the transport ceiling, a bare QUIC echo server in this process with the relay's QUIC and TLS settings,
//!   driven exactly like `online` (same clients, frame size and window), with no relay logic behind it;
//! - `online`: N registered clients each send M envelopes to random other clients, W in flight each, everyone
//!   subscribed; measures delivered msg/s and send-to-deliver latency;
//! - `offline-drain`: half the clients are offline while the other half send to them, then they connect and drain;
//! - `connections`: K idle authenticated connections held open, server memory per connection;
//! - `stalled`: one recipient subscribes and never reads while senders fill its mailbox, to show that the relay's
//!   memory stays bounded;
//! - `sweep`: `online` open loop at a series of offered rates (percentages of the saturation a closed-loop run
//!   measures), written as a latency/throughput curve to `--out` (sweep.json, sweep.svg);
//! - `plot`: the curves of several `sweep.json` files on the same axes.
//!
//! Against a relay it starts itself (a `relayd` child process on 127.0.0.1:0 in a temporary directory, whose CPU time
//! and memory it reads from /proc) or one given by `--server ADDR --cert-sha256 HEX`. Each run prints one summary
//! line on stdout and, with `--json FILE`, writes a JSON report. Load clients register with fresh identities and
//! synthetic phone numbers (+3360…, French mobiles valid in the numbering plan); payloads are random bytes, never
//! anything a person wrote.

mod clients;
mod conns;
mod curve;
mod e2ee;
mod echo;
mod mqtt;
mod offline;
mod online;
mod pipelined;
mod progress;
mod relayd;
mod report;
mod stalled;
mod sweep;
mod traffic;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "relay-load", version, about = "Load generator and benchmarks for Consent Relay")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Bare QUIC echo in this process: the transport ceiling for `online`.
    Echo(Load),
    /// Every client online: send to random others, measure delivery.
    Online(RelayLoad),
    /// Half the recipients offline while sending, then they connect and drain.
    OfflineDrain(RelayLoad),
    /// Hold many idle authenticated connections; server memory per connection.
    Connections(ConnectionsArgs),
    /// One recipient that never reads while senders fill its mailbox; relay memory must stay bounded.
    Stalled(RelayLoad),
    /// `online` open loop at a series of offered rates: latency and delivered rate against offered rate, as SVG and
    /// JSON.
    Sweep(sweep::SweepArgs),
    /// Draws the curves of several `sweep.json` files (e.g. relayd and an MQTT broker) on the same axes.
    Plot(PlotArgs),
}

/// Settings of `plot`.
#[derive(Args, Clone, Debug)]
pub struct PlotArgs {
    /// `sweep.json` files written by `sweep`; their curves are drawn in this order.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Directory for the combined sweep.json and sweep.svg.
    #[arg(long)]
    out: PathBuf,
}

/// Settings common to every mode.
#[derive(Args, Clone, Debug)]
pub struct Load {
    /// Number of clients (connections) [default: 100; connections: 10000].
    #[arg(long)]
    pub clients: Option<usize>,
    /// Messages each client sends.
    #[arg(long, default_value_t = 1000)]
    pub msgs: u64,
    /// Envelope (echo: frame payload) size in bytes, at least 16.
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Requests in flight per client.
    #[arg(long, default_value_t = 32)]
    pub window: usize,
    /// Hard bound on the whole run, set-up included; what is done by then is reported as incomplete.
    #[arg(long, default_value_t = 120)]
    pub seconds: u64,
    /// Open loop: total sends per second over all clients, each send due at a fixed time and its latency counted
    /// from then; without it every client sends as fast as its window allows (closed loop).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Connections sharing one client UDP socket.
    #[arg(long, default_value_t = 50)]
    pub per_endpoint: usize,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// `online` only: real end-to-end encryption (Double Ratchet sessions per pair and the sealed-sender envelope)
    /// instead of random opaque payloads; each client then sends to its next 8 clients.
    #[arg(long)]
    pub e2ee: bool,
    /// With `--e2ee`: keep the session states in memory instead of writing them (atomically, with fsync) before
    /// each batch leaves and before each receive batch is acknowledged, as the messenger does.
    #[arg(long, requires = "e2ee", conflicts_with = "e2ee_state_dir")]
    pub e2ee_in_memory: bool,
    /// With `--e2ee`: where the session states are written (a new temporary directory inside it, removed at the
    /// end) [default: the system's temporary directory]. All simulated clients share it, where real devices each
    /// have their own disk: a directory on tmpfs (/dev/shm) keeps the writes' CPU cost and drops the shared flush.
    #[arg(long, requires = "e2ee")]
    pub e2ee_state_dir: Option<PathBuf>,
    /// `echo`, `online` and `offline-drain`: one bidirectional stream and one `SendAck` per send, the protocol
    /// before the pipelined send stream, instead of one pipelined send stream per client (sequence-numbered sends,
    /// batched acknowledgements; the default since 2026-12-01).
    #[arg(long)]
    pub stream_per_send: bool,
    /// The default; kept so that older command lines still run.
    #[arg(long, hide = true, conflicts_with = "stream_per_send")]
    pub pipeline: bool,
}

impl Load {
    /// Whether clients send on the pipelined send stream (the default) rather than one stream per send.
    pub fn pipelined(&self) -> bool {
        !self.stream_per_send
    }
}

/// Where the relay under test is.
#[derive(Args, Clone, Debug)]
pub struct Target {
    /// Use this running relay instead of starting one.
    #[arg(long, requires = "cert_sha256")]
    pub server: Option<SocketAddr>,
    /// SHA-256 of the running relay's certificate (hex).
    #[arg(long, requires = "server")]
    pub cert_sha256: Option<String>,
    /// The relayd binary to start [default: `relayd` beside this executable].
    #[arg(long, conflicts_with = "server")]
    pub relayd: Option<PathBuf>,
    /// `online` and `sweep` only: run the same workload against an MQTT broker at `mqtt://IP:PORT` instead (QoS 1,
    /// one inbox topic per user), for the peer comparison in tools/peers/run.sh.
    #[arg(long = "target", value_parser = mqtt::parse_target, conflicts_with_all = ["server", "relayd"])]
    pub mqtt: Option<SocketAddr>,
}

/// Settings of the modes that run against a relay.
#[derive(Args, Clone, Debug)]
pub struct RelayLoad {
    #[command(flatten)]
    load: Load,
    #[command(flatten)]
    target: Target,
}

/// Settings of `connections`.
#[derive(Args, Clone, Debug)]
pub struct ConnectionsArgs {
    #[command(flatten)]
    load: Load,
    #[command(flatten)]
    target: Target,
    /// Seconds to hold the connections open before measuring.
    #[arg(long, default_value_t = 3)]
    hold: u64,
    /// Also open each connection's delivery stream (an online, idle client).
    #[arg(long)]
    subscribe: bool,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
}

impl Load {
    fn check(&self, default_clients: usize, min_clients: usize) -> Result<usize> {
        let clients = self.clients.unwrap_or(default_clients);
        if clients < min_clients {
            bail!("--clients must be at least {min_clients}");
        }
        if self.size < traffic::HEADER_LEN || self.size > 64 * 1024 {
            bail!("--size must be between {} and 65536", traffic::HEADER_LEN);
        }
        if self.window == 0 || self.per_endpoint == 0 || self.seconds == 0 {
            bail!("--window, --per-endpoint and --seconds must be at least 1");
        }
        if u32::try_from(self.msgs).is_err() || u32::try_from(clients).is_err() {
            bail!("--msgs and --clients must fit in 32 bits");
        }
        Ok(clients)
    }

    fn limit(&self) -> Duration {
        Duration::from_secs(self.seconds)
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    relay_quic::logging::init("warn");
    let cli = Cli::parse();
    if let Mode::Sweep(args) = &cli.mode {
        let curve = sweep::run(args).await?;
        println!(
            "sweep: saturation={:.0}/s points={} written to {}",
            curve.saturation_per_s,
            curve.points.len(),
            args.out.display()
        );
        if curve.points.iter().any(|p| !p.complete) {
            eprintln!("sweep: some points did not finish within their time bound (marked incomplete)");
        }
        return Ok(());
    }
    if let Mode::Plot(args) = &cli.mode {
        let mut curves = Vec::new();
        for input in &args.inputs {
            curves.extend(curve::read_json(input)?);
        }
        curve::write(&args.out, &curves)?;
        println!("plot: {} curves written to {}", curves.len(), args.out.display());
        return Ok(());
    }
    let e2ee_elsewhere = match &cli.mode {
        Mode::Echo(l) => l.e2ee,
        Mode::Online(_) => false,
        Mode::OfflineDrain(r) | Mode::Stalled(r) => r.load.e2ee,
        Mode::Connections(c) => c.load.e2ee,
        Mode::Sweep(_) | Mode::Plot(_) => false,
    };
    let mqtt_elsewhere = match &cli.mode {
        Mode::OfflineDrain(r) | Mode::Stalled(r) => r.target.mqtt.is_some(),
        Mode::Connections(c) => c.target.mqtt.is_some(),
        Mode::Echo(_) | Mode::Online(_) | Mode::Sweep(_) | Mode::Plot(_) => false,
    };
    if mqtt_elsewhere {
        bail!("--target mqtt://… applies to `online` and `sweep` only");
    }
    if e2ee_elsewhere {
        bail!("--e2ee applies to `online` only");
    }
    let protocol_elsewhere = match &cli.mode {
        Mode::Online(r) => r.load.stream_per_send && r.target.mqtt.is_some(),
        Mode::Echo(_) | Mode::OfflineDrain(_) | Mode::Sweep(_) | Mode::Plot(_) => false,
        Mode::Stalled(r) => r.load.stream_per_send,
        Mode::Connections(c) => c.load.stream_per_send,
    };
    if protocol_elsewhere {
        bail!("--stream-per-send applies to `echo`, `online` (against relayd) and `offline-drain` only");
    }
    let (report, json) = match cli.mode {
        Mode::Echo(l) => {
            let clients = l.check(100, 1)?;
            (echo::run(&l, clients).await?, l.json)
        }
        Mode::Online(r) => {
            let clients = r.load.check(100, 2)?;
            (online::run(&r.load, &r.target, clients).await?, r.load.json)
        }
        Mode::OfflineDrain(r) => {
            let clients = r.load.check(100, 2)?;
            (offline::run(&r.load, &r.target, clients).await?, r.load.json)
        }
        Mode::Connections(c) => {
            let clients = c.load.check(10_000, 1)?;
            let settings = conns::Settings {
                hold: Duration::from_secs(c.hold),
                subscribe: c.subscribe,
                concurrency: c.concurrency.max(1),
            };
            (conns::run(&c.load, &c.target, clients, settings).await?, c.load.json)
        }
        Mode::Stalled(r) => {
            let clients = r.load.check(4, 2)?;
            (stalled::run(&r.load, &r.target, clients).await?, r.load.json)
        }
        // Ran and returned above: a sweep is many runs, not one report; a plot runs nothing.
        Mode::Sweep(_) | Mode::Plot(_) => return Ok(()),
    };
    println!("{}", report.summary_line());
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(&path, text + "\n").with_context(|| format!("cannot write {}", path.display()))?;
    }
    if !report.complete {
        bail!("the run did not finish within --seconds; the figures above cover what was done");
    }
    Ok(())
}
