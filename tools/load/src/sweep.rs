//! `sweep`: the latency/throughput curve of `online`. A closed-loop `online` run (`--msgs` per client, as fast as the
//! window allows) measures the saturation rate; then one open-loop `online` run per `--points` percentage of it,
//! each sending at that total rate (rate ÷ clients per client, on a fixed schedule independent of acknowledgements)
//! for `--seconds`, with latency counted from each send's scheduled time. Every run starts its own relay (or reuses
//! `--server`) with fresh clients, and is bounded by `3 × --seconds + 30` s; a point whose bound runs out is kept and
//! marked incomplete. The curve goes to `--out` as `sweep.json` and `sweep.svg` (see [`crate::curve`]).

use std::path::PathBuf;

use anyhow::{Result, bail};

use crate::curve::{self, Curve, Point};
use crate::report::Report;
use crate::{Load, Target, online};

/// Settings of `sweep`.
#[derive(clap::Args, Clone, Debug)]
pub struct SweepArgs {
    /// Number of clients (connections).
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// Messages each client sends in the closed-loop run that measures saturation.
    #[arg(long, default_value_t = 1000)]
    pub msgs: u64,
    /// Envelope size in bytes, at least 16.
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Requests in flight per client.
    #[arg(long, default_value_t = 32)]
    pub window: usize,
    /// Seconds of sending per point.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Offered rates, in percent of the measured saturation.
    #[arg(long, value_delimiter = ',', default_value = "10,25,50,75,90,100,110,120")]
    pub points: Vec<f64>,
    /// Connections sharing one client UDP socket.
    #[arg(long, default_value_t = 50)]
    pub per_endpoint: usize,
    /// One stream and one `SendAck` per send instead of the pipelined send stream (against relayd).
    #[arg(long)]
    pub stream_per_send: bool,
    /// Directory for sweep.json and sweep.svg.
    #[arg(long)]
    pub out: PathBuf,
    /// Name of the curve in the legend [default: relayd; with --server: relay; with --target: mqtt].
    #[arg(long)]
    pub label: Option<String>,
    #[command(flatten)]
    pub target: Target,
}

impl SweepArgs {
    /// The `online` settings of one run: `rate` (open loop) or closed loop with `--msgs`.
    fn load(&self, rate: Option<f64>) -> Load {
        let msgs = match rate {
            // Enough sends per client to keep the schedule going for `--seconds`.
            Some(r) => ((r * self.seconds as f64 / self.clients as f64).ceil() as u64).max(1),
            None => self.msgs,
        };
        Load {
            clients: Some(self.clients),
            msgs,
            size: self.size,
            window: self.window,
            seconds: self.seconds.saturating_mul(3).saturating_add(30),
            rate,
            per_endpoint: self.per_endpoint,
            json: None,
            e2ee: false,
            e2ee_in_memory: false,
            e2ee_state_dir: None,
            stream_per_send: self.stream_per_send,
            pipeline: false,
        }
    }

    fn check(&self) -> Result<()> {
        if self.points.is_empty() || self.points.iter().any(|p| !p.is_finite() || *p <= 0.0 || *p > 1000.0) {
            bail!("--points must be percentages above 0 and at most 1000");
        }
        if self.seconds == 0 {
            bail!("--seconds must be at least 1");
        }
        Ok(())
    }
}

fn point(pct: f64, offered: f64, r: &Report) -> Point {
    let l = r.latency_ms.as_ref();
    Point {
        offered_pct: pct,
        offered_per_s: crate::report::round2(offered),
        delivered_per_s: r.msgs_per_s,
        delivered: r.delivered,
        p50_ms: l.map(|l| l.p50),
        p99_ms: l.map(|l| l.p99),
        p999_ms: l.map(|l| l.p999),
        errors: r.errors,
        complete: r.complete,
    }
}

/// Runs the sweep against `relayd` (or `--server`) and writes the curve; returns it.
pub async fn run(args: &SweepArgs) -> Result<Curve> {
    args.check()?;
    let closed = args.load(None);
    let clients = closed.check(100, 2)?;
    let saturation = online::run(&closed, &args.target, clients).await?;
    eprintln!("sweep: saturation {}", saturation.summary_line());
    if saturation.msgs_per_s <= 0.0 {
        bail!("the closed-loop run delivered nothing; no saturation rate to sweep against");
    }
    let mut curve = Curve {
        target: match (&args.label, &args.target.mqtt, &args.target.server) {
            (Some(label), _, _) => label.clone(),
            (None, Some(_), _) => "mqtt".into(),
            (None, None, Some(_)) => "relay".into(),
            (None, None, None) => "relayd".into(),
        },
        clients,
        size: args.size,
        window: args.window,
        seconds_per_point: args.seconds,
        saturation_per_s: saturation.msgs_per_s,
        points: Vec::new(),
    };
    for &pct in &args.points {
        let rate = saturation.msgs_per_s * pct / 100.0;
        let report = online::run(&args.load(Some(rate)), &args.target, clients).await?;
        eprintln!("sweep: {pct}% ({rate:.0}/s offered) {}", report.summary_line());
        curve.points.push(point(pct, rate, &report));
        // Written after every point, so an interrupted sweep still leaves what it measured.
        curve::write(&args.out, std::slice::from_ref(&curve))?;
    }
    Ok(curve)
}
