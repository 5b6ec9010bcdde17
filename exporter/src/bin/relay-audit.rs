//! `relay-audit --exporter-data DIR [--log-key HEX] [--affiliates FILE] [--json]`: checks a whole export log.
//!
//! Reads the log, its signed tree heads and the consent evidence from a `relay-exporter` data dir (the exporter must
//! be stopped, or the dir a copy taken while it was), and reports every entry not backed by a user-signed grant in
//! force at its time, every head whose signature, root or consistency with the previous head fails, and, with
//! `--affiliates`, every entry whose fields differ from the catalogue's. Exit status 0 if the log passed, 1 if a
//! problem was found, 2 if the audit could not run.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use ed25519_dalek::{SigningKey, VerifyingKey};
use relay_exporter::Catalogue;
use relay_exporter::audit::audit;
use relay_exporter::outbox::ExporterStore;

#[derive(Parser)]
#[command(name = "relay-audit", version, about = "Audit a Consent Relay export log")]
struct Args {
    /// The exporter's data directory (its `db` holds the log).
    #[arg(long)]
    exporter_data: PathBuf,
    /// Hex of the log's Ed25519 public key, as published to users. Without it, derived from the data dir's log.key.
    #[arg(long)]
    log_key: Option<String>,
    /// Affiliates catalogue: also check that every entry's fields are exactly those allowed.
    #[arg(long)]
    affiliates: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn run(args: &Args) -> anyhow::Result<bool> {
    let log_key = match &args.log_key {
        Some(hex_key) => {
            let bytes: [u8; 32] =
                hex::decode(hex_key).ok().and_then(|b| b.try_into().ok()).context("--log-key must be 64 hex digits")?;
            VerifyingKey::from_bytes(&bytes).context("--log-key is not an Ed25519 public key")?
        }
        None => {
            let path = args.exporter_data.join("log.key");
            let seed: [u8; 32] = std::fs::read(&path)
                .with_context(|| format!("cannot read {}; pass --log-key", path.display()))?
                .try_into()
                .map_err(|_| anyhow::anyhow!("{} is not 32 bytes", path.display()))?;
            SigningKey::from_bytes(&seed).verifying_key()
        }
    };
    let catalogue = args.affiliates.as_deref().map(Catalogue::from_file).transpose()?;
    let db = args.exporter_data.join("db");
    if !db.exists() {
        anyhow::bail!("{} has no exporter store", args.exporter_data.display());
    }
    let store = ExporterStore::open(&db).with_context(|| {
        format!("cannot open {} (is relay-exporter still running on it? stop it or audit a copy)", db.display())
    })?;
    let report = audit(&store, &log_key, catalogue.as_ref())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("log key      {}", hex::encode(log_key.as_bytes()));
        println!("entries      {}", report.entries);
        println!("tree heads   {} (latest signed size {})", report.heads, report.signed_size);
        if report.passed() {
            println!(
                "result       PASSED: every entry backed by a user-signed grant in force at its time; heads consistent"
            );
        } else {
            println!("result       FAILED: {} problem(s)", report.problems.len());
            for p in &report.problems {
                println!("  - {p}");
            }
        }
    }
    Ok(report.passed())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("relay-audit: {e:#}");
            ExitCode::from(2)
        }
    }
}
