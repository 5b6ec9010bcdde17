//! `relay-exporter --data DIR --relay ADDR --relay-cert-sha256 HEX --affiliates FILE [--affiliate-ca PEM]
//! [--poll-ms N] [--witness ADDR,CERT_SHA256_HEX,WITNESS_KEY_HEX]... [--recover-log-from-relay]`: the metadata
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
    /// Rebuild a damaged export log from the relay's copy (verified against the signed heads), then exit.
    #[arg(long)]
    recover_log_from_relay: bool,
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
    Ok(())
}
