//! `relay-exporter --data DIR --relay ADDR --relay-cert-sha256 HEX --affiliates FILE [--affiliate-ca PEM]
//! [--poll-ms N] [--notice-retry-for DURATION] [--witness ADDR,CERT_SHA256_HEX,WITNESS_KEY_HEX]...
//! [--metrics-listen ADDR] [--recover-log-from-relay]`: the metadata
//! exporter. Reads the relay's consent feed over the export interface and delivers signed webhooks to affiliates,
//! within the withdrawal fence, until SIGINT or SIGTERM.
//!
//! On first start it creates its TLS identity and pseudonym key in `--data`. When ready it prints exactly one line
//! on stdout, `exporter cert-sha256 <hex> log-key <hex>`: the first is relayd's `--exporter-cert-sha256`, the second
//! the Ed25519 key that verifies the export log's tree heads (`relay-audit --log-key`). Logs go to stderr
//! (`RUST_LOG`). Each `--witness` (a `relay-witness`: its address, its certificate's SHA-256 from its ready line, its
//! public key) is asked to cosign every new tree head; a witness that is down holds nothing back (see
//! `relay_exporter::process`).
//!
//! Exit status: 0 after SIGINT or SIGTERM; 3 if the export log is damaged (checked before the ready line against the
//! store's signed heads, and every pass against the latest one and the relay's copy: the exporter exports nothing
//! more); 1 for any other error. `--recover-log-from-relay` does not run the exporter: it rebuilds a log that lost
//! entries from the relay's copy, verified against the signed heads, prints one line saying what it did, and exits 0
//! (1 if it refused: then it wrote nothing).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use relay_exporter::{Catalogue, Exporter, ExporterError};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

#[derive(Parser)]
#[command(name = "relay-exporter", version, about = "Consent Relay metadata exporter: consent-gated signed webhooks")]
struct Args {
    /// Data directory: TLS identity, pseudonym key, outbox.
    #[arg(long)]
    data: PathBuf,
    /// UDP address of the relay's export interface (relayd's --export-listen).
    #[arg(long)]
    relay: SocketAddr,
    /// Hex SHA-256 of the relay's certificate (from relayd's ready line).
    #[arg(long)]
    relay_cert_sha256: String,
    /// Affiliates catalogue (TOML).
    #[arg(long)]
    affiliates: PathBuf,
    /// Extra CA certificates (PEM) trusted for https:// affiliates, besides the system's roots.
    #[arg(long)]
    affiliate_ca: Option<PathBuf>,
    /// Feed poll interval in milliseconds.
    #[arg(long, default_value_t = 1000)]
    poll_ms: u64,
    /// A witness to cosign every new tree head: ADDR,CERT_SHA256_HEX,WITNESS_KEY_HEX (repeatable).
    #[arg(long = "witness", value_name = "ADDR,CERT_SHA256_HEX,WITNESS_KEY_HEX")]
    witnesses: Vec<relay_exporter::witness_link::WitnessSpec>,
    /// How long a withdrawal notice is retried before it is abandoned (an `error!` line and a counter say so):
    /// a number followed by s, m, h or d.
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    notice_retry_for: Duration,
    /// Serve `GET /metrics` (Prometheus text: totals only, abandoned notices among them) on this local TCP address.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Rebuild a damaged export log from the relay's copy (verified against the signed heads), then exit.
    #[arg(long)]
    recover_log_from_relay: bool,
}

/// `90s`, `30m`, `12h`, `7d`: a positive whole number and its unit.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let refused = || format!("{text:?}: expected a positive number followed by s, m, h or d (e.g. 7d)");
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(refused)?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| refused())?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(refused()),
    };
    match n.checked_mul(unit) {
        Some(secs) if secs > 0 => Ok(Duration::from_secs(secs)),
        _ => Err(refused()),
    }
}

/// Exit status when the export log is damaged.
const DAMAGED: u8 = 3;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let damaged = e.chain().any(|c| matches!(c.downcast_ref(), Some(ExporterError::LogDamaged(_))));
            eprintln!("relay-exporter: {e:#}");
            ExitCode::from(if damaged { DAMAGED } else { 1 })
        }
    }
}

#[tokio::main]
async fn run() -> anyhow::Result<()> {
    relay_quic::logging::init("info");
    // Everything this process writes (its store included) is for its owner only.
    relay_quic::durable_file::restrict_new_files();
    let args = Args::parse();
    let fingerprint = relay_quic::pin::parse_fingerprint(&args.relay_cert_sha256)
        .context("--relay-cert-sha256 must be 64 hex digits")?;
    if args.poll_ms == 0 {
        bail!("--poll-ms must be at least 1");
    }
    let catalogue = Catalogue::from_file(&args.affiliates)?;
    let mut exporter = Exporter::open(&args.data, catalogue, Duration::from_millis(args.poll_ms))
        .context("relay-exporter could not start")?;
    exporter.set_notice_retry_for(args.notice_retry_for);
    if args.recover_log_from_relay {
        let r = exporter.recover_log(args.relay, fingerprint).await.context("--recover-log-from-relay")?;
        let plural = if r.appended == 1 { "y" } else { "ies" };
        println!(
            "recovered {} entr{plural} from the relay's copy ({} kept, {} heads checked and stored, {} without consent \
             evidence); the log now passes its checks",
            r.appended, r.kept, r.heads, r.without_evidence
        );
        return Ok(());
    }
    exporter.check_log().context("relay-exporter will not start")?;
    for witness in &args.witnesses {
        exporter.add_witness(*witness);
    }
    if let Some(path) = &args.affiliate_ca {
        let pem = std::fs::read(path).with_context(|| format!("cannot read --affiliate-ca {}", path.display()))?;
        exporter.trust_extra_ca(&pem).with_context(|| format!("--affiliate-ca {}", path.display()))?;
    }
    // Handlers are installed before the ready line: a supervisor may signal as soon as it has read it.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", exporter.ready_line())?;
        out.flush()?;
    }
    let metrics = match args.metrics_listen {
        Some(addr) => {
            let listener =
                tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot serve metrics on {addr}"))?;
            let progress = exporter.progress();
            let render: relay_quic::metrics_http::Renderer =
                std::sync::Arc::new(move || progress.borrow().render_metrics());
            tracing::info!(addr = %addr, "metrics on http://{addr}/metrics");
            Some(tokio::spawn(relay_quic::metrics_http::serve(listener, render)))
        }
        None => None,
    };
    let (stop, shutdown) = watch::channel(false);
    let mut run = tokio::spawn(exporter.run(args.relay, fingerprint, shutdown));
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
        result = &mut run => return Ok(result??),
    }
    tracing::info!("shutting down");
    stop.send(true).ok();
    run.await??;
    if let Some(m) = metrics {
        m.abort();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notice_retry_periods_parse() {
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        for bad in ["", "7", "d", "0d", "-1d", "1.5h", "7 d", "7w", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
