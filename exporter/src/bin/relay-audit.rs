//! `relay-audit --exporter-data DIR [--log-key HEX] [--affiliates FILE] [--head FILE]... [--relay ADDR
//! --relay-cert-sha256 HEX] [--witness-key HEX]... [--witness ADDR,CERT_SHA256_HEX,WITNESS_KEY_HEX]... [--json]
//! [--regulator-pack DIR --from DATE --to DATE]`: checks a whole export log, and writes a regulator pack for a period
//! (`relay_exporter::regulator`).
//!
//! Reads the log, its signed tree heads and the consent evidence from a `relay-exporter` data dir (the exporter must
//! be stopped, or the dir a copy taken while it was), and reports every entry not backed by a user-signed grant in
//! force at its time, every head whose signature, root or consistency with the previous head fails, and, with
//! `--affiliates`, every entry whose fields differ from the catalogue's.
//!
//! A log that lost its newest entries with their heads, or that was rewritten and re-signed with `log.key`, is sound
//! on its own; heads kept elsewhere catch it, and the log must extend each: `--head FILE` (repeatable) is a head as a
//! user's client pins it (`exports.json` in the user's home: `{"log_key", "size", "root", "timestamp_ms"}`) or a
//! JSON object `{"size", "root", "timestamp_ms", "signature"}` (hex; a signature, when present, must verify), or a
//! JSON array of such objects; `--relay` reads every head the relay published over the export interface, with the
//! data dir's TLS identity (the relay admits only the exporter's certificate).
//!
//! `--witness-key HEX` (repeatable) requires the latest head to carry a valid cosignature from that witness: a log
//! rewritten and re-signed with `log.key` cannot get one. `--witness ADDR,CERT_SHA256_HEX,WITNESS_KEY_HEX` does the
//! same and also asks the witness for the latest head it cosigned (its cosignature checked under that key), which
//! the log must extend: that catches a log rolled back to an older cosigned head.
//!
//! Exit status 0 if the log passed, 1 if a problem was found, 2 if the audit could not run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use ed25519_dalek::{SigningKey, VerifyingKey};
use relay_exporter::Catalogue;
use relay_exporter::audit::{ExternalHead, audit_witnessed};
use relay_exporter::logcheck;
use relay_exporter::outbox::ExporterStore;
use relay_exporter::relay_link::ExportClient;
use relay_exporter::witness_link::{self, WitnessSpec};

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
    /// A head kept outside the store, which the log must extend (a user's `exports.json`, or a JSON head or array of
    /// heads); repeatable.
    #[arg(long = "head", value_name = "FILE")]
    heads: Vec<PathBuf>,
    /// UDP address of the relay's export interface: check the log against every head the relay published.
    #[arg(long, requires = "relay_cert_sha256")]
    relay: Option<SocketAddr>,
    /// Hex SHA-256 of the relay's certificate (with --relay).
    #[arg(long, requires = "relay")]
    relay_cert_sha256: Option<String>,
    /// Hex Ed25519 key of a witness whose cosignature the latest head must carry (repeatable).
    #[arg(long = "witness-key", value_name = "HEX")]
    witness_keys: Vec<String>,
    /// A witness to ask for its latest cosigned head, which the log must extend; its key is required as with
    /// --witness-key (repeatable).
    #[arg(long = "witness", value_name = "ADDR,CERT_SHA256_HEX,WITNESS_KEY_HEX")]
    witnesses: Vec<WitnessSpec>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Also write a regulator pack for the period into this new directory (needs --affiliates, whose catalogue must
    /// name its [controller], and --from/--to).
    #[arg(long, value_name = "DIR", requires_all = ["affiliates", "from", "to"])]
    regulator_pack: Option<PathBuf>,
    /// First day of the pack's period (YYYY-MM-DD, UTC, included).
    #[arg(long, value_name = "DATE", requires = "regulator_pack")]
    from: Option<String>,
    /// Last day of the pack's period (YYYY-MM-DD, UTC, included).
    #[arg(long, value_name = "DATE", requires = "regulator_pack")]
    to: Option<String>,
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
    let mut external = Vec::new();
    for path in &args.heads {
        external.extend(head_file(path)?);
    }
    if let (Some(relay), Some(fp)) = (args.relay, &args.relay_cert_sha256) {
        external.extend(relay_heads(&args.exporter_data, relay, fp)?);
    }
    let mut witness_keys = Vec::new();
    for hex_key in &args.witness_keys {
        witness_keys
            .push(relay_proto::witness::parse_witness_key(hex_key).context("--witness-key must be 64 hex digits")?);
    }
    for spec in &args.witnesses {
        witness_keys.push(spec.key);
        external.extend(witness_checkpoint(spec, &log_key)?);
    }
    let report = audit_witnessed(&store, &log_key, catalogue.as_ref(), &external, &witness_keys)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("log key      {}", hex::encode(log_key.as_bytes()));
        println!("entries      {}", report.entries);
        println!("tree heads   {} (latest signed size {})", report.heads, report.signed_size);
        println!("outside      {} head(s) the log must extend", report.external_heads);
        println!("witnesses    {} whose cosignature the latest head must carry", witness_keys.len());
        if report.passed() {
            println!(
                "result       PASSED: every export backed by a user-signed grant in force at its time, every notice by a \
                 withdrawal; heads consistent"
            );
        } else {
            println!("result       FAILED: {} problem(s)", report.problems.len());
            for p in &report.problems {
                println!("  - {p}");
            }
        }
    }
    if let (Some(dir), Some(from), Some(to), Some(catalogue)) =
        (&args.regulator_pack, &args.from, &args.to, catalogue.as_ref())
    {
        let day = |s: &str, flag: &str| {
            relay_proto::time::parse_date(s).with_context(|| format!("--{flag} {s:?} is not a date YYYY-MM-DD"))
        };
        let (from_ms, to_ms) = (day(from, "from")?, day(to, "to")?.saturating_add(86_400_000));
        let vault =
            relay_exporter::vault::Vault::open_existing(store.bodies_tree()?, &args.exporter_data.join("bodies.key"))?;
        let summary =
            relay_exporter::regulator::write_pack(dir, &store, &log_key, catalogue, vault.as_ref(), from_ms, to_ms)?;
        if !args.json {
            println!(
                "regulator pack {}: {} log entries, {} bodies, {} without a body any more, {} notice versions in \
                 force, {} heads",
                dir.display(),
                summary.entries,
                summary.bodies,
                summary.without_body,
                summary.notices_in_force,
                summary.heads
            );
        }
    }
    Ok(report.passed())
}

/// The heads in `path`: one JSON object or an array of them.
fn head_file(path: &Path) -> anyhow::Result<Vec<(String, ExternalHead)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read --head {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("--head {} is not JSON", path.display()))?;
    let items = match value {
        serde_json::Value::Array(items) => items,
        one => vec![one],
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let head = serde_json::from_value(item)
                .with_context(|| format!("--head {}: item {i} is not a head (size, root)", path.display()))?;
            Ok((format!("{} #{i}", path.display()), head))
        })
        .collect()
}

/// Every head the relay published, read over the export interface as the exporter in `data` (its TLS identity).
fn relay_heads(data: &Path, relay: SocketAddr, fingerprint: &str) -> anyhow::Result<Vec<(String, ExternalHead)>> {
    let fingerprint =
        relay_quic::pin::parse_fingerprint(fingerprint).context("--relay-cert-sha256 must be 64 hex digits")?;
    // Loaded, never created: the audit writes nothing into the data dir.
    if !data.join("cert.der").exists() || !data.join("key.der").exists() {
        anyhow::bail!("{} has no TLS identity to present to the relay", data.display());
    }
    let identity = relay_quic::identity::Identity::load_or_create(data)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // The relay's size needs no check of its own: its latest head, among these, has that size.
    let (_, heads) = runtime.block_on(async {
        let client = ExportClient::connect(relay, fingerprint, &identity).await?;
        let heads = logcheck::relay_heads(&client).await;
        client.close().await;
        heads
    })?;
    Ok(heads.iter().map(|h| (format!("relay {relay}"), ExternalHead::from(h))).collect())
}

/// The latest head `spec` cosigned for the log, as a head the log must extend (none if it never cosigned one).
fn witness_checkpoint(spec: &WitnessSpec, log_key: &VerifyingKey) -> anyhow::Result<Option<(String, ExternalHead)>> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let checkpoint = runtime
        .block_on(witness_link::checkpoint(spec, log_key))
        .with_context(|| format!("--witness {}", spec.addr))?;
    Ok(checkpoint.map(|(size, root)| {
        let head = ExternalHead { size, root: hex::encode(root), timestamp_ms: None, signature: None, log_key: None };
        (format!("witness {}", spec.short()), head)
    }))
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
