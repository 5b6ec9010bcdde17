//! `relay-witness --data DIR [--listen ADDR] --log-key HEX... [--config FILE]`: an independent witness of export
//! logs. Cosigns a log's tree head only if it extends the last head it cosigned for that log (see `relay_witness`).
//!
//! On first start it creates its Ed25519 key (`witness.key`, mode 0600) and TLS identity in `--data`. When ready it
//! prints exactly one line on stdout, `listening on <ip:port> cert-sha256 <64 hex>` (what submitters pin). Its public
//! key, which verifiers configure (`relay-audit --witness-key`, `relay exports --verify --witness-key`), is printed
//! by `relay-witness --data DIR public-key` (64 hex and a newline; the key is created if it does not exist yet).
//! `--config FILE` is a TOML file `log_keys = ["<64 hex>", ...]`, added to the `--log-key` flags. Logs go to stderr
//! (`RUST_LOG`). Exit status: 0 after SIGINT or SIGTERM, 1 on any error.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use ed25519_dalek::VerifyingKey;
use relay_witness::Witness;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

#[derive(Parser)]
#[command(name = "relay-witness", version, about = "Consent Relay witness: cosigns export-log heads that only grow")]
struct Args {
    /// Data directory: witness key, TLS identity, state.
    #[arg(long)]
    data: PathBuf,
    /// UDP address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Hex Ed25519 key of a log this witness witnesses (the exporter's log key); repeatable.
    #[arg(long = "log-key", value_name = "HEX")]
    log_keys: Vec<String>,
    /// TOML file with `log_keys = [...]`, witnessed as well.
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the witness's public key (hex) and exit.
    PublicKey,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    log_keys: Vec<String>,
}

fn log_keys(args: &Args) -> anyhow::Result<Vec<VerifyingKey>> {
    let mut hex_keys = args.log_keys.clone();
    if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let config: Config = toml_config(&text).with_context(|| format!("{}", path.display()))?;
        hex_keys.extend(config.log_keys);
    }
    if hex_keys.is_empty() {
        bail!("no log to witness: pass --log-key HEX (or log_keys in --config)");
    }
    hex_keys
        .iter()
        .map(|k| {
            relay_proto::witness::parse_witness_key(k).with_context(|| format!("log key {k:?} is not 64 hex digits"))
        })
        .collect()
}

fn toml_config(text: &str) -> anyhow::Result<Config> {
    Ok(toml::from_str(text)?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    relay_quic::logging::init("info");
    relay_quic::durable_file::restrict_new_files();
    let args = Args::parse();
    if let Some(Command::PublicKey) = args.command {
        let key = relay_witness::service::load_or_create_key(&args.data)?;
        println!("{}", hex::encode(key.verifying_key().as_bytes()));
        return Ok(());
    }
    let keys = log_keys(&args)?;
    let witness = Arc::new(Witness::open(&args.data, &keys).context("relay-witness could not start")?);
    let identity = relay_quic::identity::Identity::load_or_create(&args.data)?;
    relay_quic::durable_file::restrict_tree(&args.data)?;
    let endpoint = relay_quic::endpoint(args.listen, Some(relay_witness::server::server_config(&identity)?))
        .with_context(|| format!("cannot bind {}", args.listen))?;
    let addr = endpoint.local_addr()?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tracing::info!(logs = keys.len(), "witnessing");
    {
        let line = relay_quic::ready::ReadyLine::Relay { addr, cert_sha256: identity.cert_sha256() };
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    let (stop, shutdown) = watch::channel(false);
    let mut serve = tokio::spawn(relay_witness::server::run(endpoint, witness, shutdown));
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
        _ = &mut serve => return Ok(()),
    }
    tracing::info!("shutting down");
    stop.send(true).ok();
    serve.await?;
    Ok(())
}
