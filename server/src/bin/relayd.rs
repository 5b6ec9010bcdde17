//! `relayd [--config FILE] [--data DIR] [--listen ADDR] [--metrics ADDR] [--export-listen ADDR
//! --exporter-cert-sha256 HEX] [--verifier open|file|webhook=URL] [--insecure-open-registration]`: runs the relay
//! until SIGINT or SIGTERM.
//!
//! When ready it prints exactly one line on stdout, `listening on <ip:port> cert-sha256 <hex>`; logs go to stderr
//! (`RUST_LOG` sets the level, default `info`; colour only on a terminal without `NO_COLOR`).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use relay_server::Config;
use relay_server::verify::VerifierSpec;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(name = "relayd", version, about = "Consent Relay: end-to-end encrypted store-and-forward relay over QUIC")]
struct Args {
    /// TOML configuration file (every key optional; flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory: sled store, certificate and key [default: ./relay-data].
    #[arg(long)]
    data: Option<PathBuf>,
    /// UDP address to listen on [default: 127.0.0.1:4433].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Serve aggregate Prometheus metrics on this TCP address, e.g. 127.0.0.1:9464 [default: off].
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Open the export interface for the metadata exporter on this UDP address [default: off].
    #[arg(long)]
    export_listen: Option<SocketAddr>,
    /// Hex SHA-256 of the exporter's certificate, the only client certificate the export interface accepts.
    #[arg(long)]
    exporter_cert_sha256: Option<String>,
    /// How phone numbers are verified at registration: open (first come; loopback only), file (codes written to
    /// <data>/verification/<request id>), or webhook=http://127.0.0.1:PORT/PATH (an SMS gateway on this host)
    /// [default: open].
    #[arg(long, value_name = "open|file|webhook=URL")]
    verifier: Option<VerifierSpec>,
    /// Allow the open verifier on a listen address that is not loopback: anyone may then register any number.
    #[arg(long)]
    insecure_open_registration: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    relay_quic::logging::init("info");
    // Everything this process writes (its store included) is for its owner only.
    relay_quic::durable_file::restrict_new_files();
    let args = Args::parse();
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(data) = args.data {
        config.data_dir = data;
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(metrics) = args.metrics {
        config.metrics_listen = Some(metrics);
    }
    if let Some(export) = args.export_listen {
        config.export_listen = Some(export);
    }
    if let Some(fp) = args.exporter_cert_sha256 {
        config.exporter_cert_sha256 = Some(fp);
    }
    if let Some(verifier) = args.verifier {
        config.registration.verifier = verifier;
    }
    if args.insecure_open_registration {
        config.registration.insecure_open_registration = true;
    }
    // Handlers are installed before the ready line: a supervisor may signal as soon as it has read it.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let relay = relay_server::start(config).await.context("relayd could not start")?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", relay.ready_line())?;
        out.flush()?;
    }
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    relay.shutdown().await;
    Ok(())
}
