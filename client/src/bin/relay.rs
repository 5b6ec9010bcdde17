//! `relay`: the Consent Relay command-line client.
//!
//! ```text
//! relay --home D init --phone +33612345678 [--device-model M] [--os O]
//! relay --home D register --server 127.0.0.1:4433 --cert-sha256 HEX [--code CODE | --code-file PATH] [--pin PIN]
//! relay --home D set-pin [--pin PIN | --remove]
//! relay --home D send --to +33698765432 "text"
//! relay --home D recv [--wait SECS] [--json]
//! relay --home D chat --to +33698765432
//! relay --home D status [--json]
//! relay --home D consent notice|grant|withdraw --affiliate A --purpose P | object --purpose P [--lift]
//! relay --home D consent reject-all | show | history
//! relay --home D device [--model M] [--os O] [--app-version V]
//! relay --home D exports [--verify] [--json]
//! relay --home D consent history [--json]
//! relay --home D data export FILE
//! relay --home D account delete [--yes]
//! ```
//! Exit status 0 means success (for `send`: the relay acknowledged the message durably); errors go to stderr with
//! status 1. `register` exits 3 when the relay verifies phone numbers and no code was given: it has asked the relay
//! to send one and, with no terminal to prompt on, says to rerun with `--code CODE` (or `--code-file PATH`). `recv`
//! exits 3 when it set aside (quarantined) an envelope it could not read, after printing everything else.
//! `verify` exits 2 when a contact's identity changed; `exports --verify` exits 1 when a check fails. `consent grant`
//! shows the notice and signs only after `yes` is typed (or with `--yes`); anything else exits 1, nothing signed.
//! `account delete` asks to type the account's phone number (or takes `--yes`): anything else exits 1 with nothing
//! deleted; a refusal by the relay exits 1 with nothing deleted either; exit 0 means the relay erased the account and
//! the home directory was removed; exit 4 means the relay erased the account but the home could not be removed
//! (the path is printed: remove it by hand).
//! Text another party chose (a message, a sender, anything the relay relays) reaches the terminal only through
//! `relay_client::display`: control characters are dropped from human output and escaped in JSON.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use relay_client::display::{json_line, terminal_safe};
use relay_client::home::Quarantined;
use relay_client::messenger::{self, Accepted};
use relay_client::{Device, Home, InboxEvent, Messenger, MessengerError, ReceivedMessage, Verification};
use relay_proto::ErrorCode;
use std::io::IsTerminal;
use tokio::io::AsyncBufReadExt;

#[derive(Parser)]
#[command(name = "relay", version, about = "Consent Relay client: end-to-end encrypted messaging from a terminal")]
struct Cli {
    /// Directory holding this client's keys and state [default: ~/.config/consent-relay, or $XDG_CONFIG_HOME/consent-relay].
    #[arg(long, global = true)]
    home: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create keys and local state for a phone number.
    Init {
        /// Own phone number, E.164 (e.g. +33612345678).
        #[arg(long)]
        phone: String,
        /// Device model reported to the relay.
        #[arg(long, default_value = "unknown")]
        device_model: String,
        /// Operating system reported to the relay.
        #[arg(long, default_value = std::env::consts::OS)]
        os: String,
    },
    /// Register with a relay, pinning its certificate. If the relay verifies phone numbers and no code is given,
    /// asks it to send one and prompts for it on a terminal; otherwise exits with status 3.
    Register {
        /// Relay address, ip:port; for a relay of several nodes, a comma list (the first that answers within 5 s
        /// is used, the one that answered last tried first).
        #[arg(long)]
        server: String,
        /// SHA-256 of the relay's certificate (printed by relayd at start): one shared by every node, or one per
        /// node in --server's order, comma-separated.
        #[arg(long)]
        cert_sha256: String,
        /// The verification code sent to your number.
        #[arg(long, conflicts_with = "code_file")]
        code: Option<String>,
        /// A file holding the verification code.
        #[arg(long)]
        code_file: Option<PathBuf>,
        /// The registration lock PIN of the number, when moving it from an identity that set one.
        #[arg(long)]
        pin: Option<String>,
    },
    /// Set a registration lock PIN: while this identity connects at least once every 7 days, nobody can register
    /// your number elsewhere without the PIN, even with a code sent to it. Reads the PIN from stdin without --pin.
    SetPin {
        /// The PIN (4 to 64 characters).
        #[arg(long, conflicts_with = "remove")]
        pin: Option<String>,
        /// Remove the lock instead.
        #[arg(long)]
        remove: bool,
    },
    /// Send a message; exits 0 only once the relay has stored it durably.
    Send {
        /// Recipient's phone number.
        #[arg(long)]
        to: String,
        /// The text.
        text: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print and acknowledge received messages. Drains the mailbox; if it was empty, waits up to --wait seconds for
    /// the first message. An envelope that cannot be read is kept in <home>/quarantine/ and reported; the exit
    /// status is then 3.
    Recv {
        /// Seconds to wait when nothing is queued.
        #[arg(long, default_value_t = 0)]
        wait: u64,
        /// One JSON object per line: id, from, from_account, text, sent_at, stored_at, server_id, identity_changed;
        /// or, for an envelope set aside, error, server_id, stored_at.
        #[arg(long)]
        json: bool,
    },
    /// Interactive chat: lines typed are sent to --to, incoming messages are printed.
    Chat {
        /// The other party's phone number.
        #[arg(long)]
        to: String,
    },
    /// Consent to sharing your phone number and device info with an affiliate, per purpose. Everything is denied
    /// until you grant it; messaging never depends on it.
    Consent {
        #[command(subcommand)]
        action: ConsentAction,
    },
    /// Report new device info to the relay (a new phone, an OS or app update). Affiliates you granted receive the
    /// fields they may see again if these changed; nothing else does.
    Device {
        /// Device model.
        #[arg(long)]
        model: Option<String>,
        /// Operating system.
        #[arg(long)]
        os: Option<String>,
        /// Client version.
        #[arg(long)]
        app_version: Option<String>,
    },
    /// What was shared about you: every export of your phone number or device info to an affiliate, with whom, when,
    /// which fields and under which consent. With --verify, checks the log's proofs and your signed consent for each.
    Exports {
        /// Check the signed tree head, inclusion and consistency proofs, and the consent behind each entry; exits 1
        /// if anything fails.
        #[arg(long)]
        verify: bool,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
        /// Hex key of a witness (`relay-witness ... public-key`) whose cosignature the log's head must carry;
        /// remembered in the home (witnesses.json) for every later --verify (repeatable).
        #[arg(long = "witness-key", value_name = "HEX", requires = "verify")]
        witness_keys: Vec<String>,
    },
    /// Your account: `delete` erases it on the relay (directory entry, keys, mailbox; affiliates that received
    /// data are told) and removes this home.
    Account {
        #[command(subcommand)]
        action: AccountAction,
    },
    /// Your data, as one portable document.
    Data {
        #[command(subcommand)]
        action: DataAction,
    },
    /// What this home holds: account, relay, contacts, held messages, quarantined envelopes. Works offline.
    Status {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Replace your sealed-sender access key (contacts learn the new one from your next message to them).
    RotateAccessKey,
    /// Show the safety number with a contact, to compare out of band; with --accept, trust a changed identity and
    /// send the messages held for it.
    Verify {
        /// The contact's phone number.
        #[arg(long)]
        with: String,
        /// Accept the contact's new identity key.
        #[arg(long)]
        accept: bool,
    },
}

#[derive(Subcommand)]
enum AccountAction {
    /// Erase this account: asks you to type its phone number, then the relay removes your directory entry, phone
    /// number, device info, keys and queued messages, every affiliate that received data about you is sent an
    /// erasure notice, and this home directory (keys and all local state) is removed. The number can be registered
    /// again, by a new identity only.
    Delete {
        /// Delete without asking (for scripts).
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum DataAction {
    /// Write everything about this account to FILE (mode 0600) as one JSON document: profile, device, every consent
    /// decision (signatures checked), receipts with the notices shown, and what was shared with its log proofs.
    Export {
        /// Where to write it (replaced atomically if it exists).
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum ConsentAction {
    /// Object to a purpose: no affiliate may receive anything about you for it, now or under a later grant, until you
    /// lift the objection (withdraws every grant of the purpose first).
    Object {
        /// Purpose.
        #[arg(long)]
        purpose: String,
        /// Lift the objection instead (grants made after this count again; earlier ones stay void).
        #[arg(long)]
        lift: bool,
        /// Print the receipts as JSON, one per line.
        #[arg(long)]
        json: bool,
    },
    /// Every consent decision you made, as the relay recorded it, each signature checked on this device.
    History {
        /// One JSON object per statement, one per line.
        #[arg(long)]
        json: bool,
    },
    /// Print the current notice of one affiliate and purpose: who receives what, where, and for how long.
    Notice {
        /// Affiliate id (e.g. adsco).
        #[arg(long)]
        affiliate: String,
        /// Purpose: security, analytics, advertising or business_messaging.
        #[arg(long)]
        purpose: String,
        /// Print {"hash", "version", "document"} as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Grant one affiliate one purpose: shows the notice, asks for confirmation, then signs its hash and prints a
    /// receipt.
    Grant {
        /// Affiliate id (e.g. adsco).
        #[arg(long)]
        affiliate: String,
        /// Purpose: security, analytics, advertising or business_messaging.
        #[arg(long)]
        purpose: String,
        /// Let the grant lapse after this many days.
        #[arg(long)]
        expires_days: Option<u64>,
        /// Sign without asking (for scripts; the notice is still printed).
        #[arg(long)]
        yes: bool,
        /// Print the receipt as JSON (the notice then goes to stderr).
        #[arg(long)]
        json: bool,
    },
    /// Withdraw one affiliate's consent for one purpose, with immediate effect.
    Withdraw {
        /// Affiliate id.
        #[arg(long)]
        affiliate: String,
        /// Purpose.
        #[arg(long)]
        purpose: String,
        /// Print the receipt as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Withdraw everything granted so far.
    RejectAll {
        /// Print the receipts as JSON, one per line.
        #[arg(long)]
        json: bool,
    },
    /// Show what is granted; everything not listed as granted is denied.
    Show {
        /// One JSON object per pair, one per line.
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() {
    relay_quic::logging::init("warn");
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        // The chain may quote the relay's own refusal message: it is peer-provided text too.
        eprintln!("error: {}", terminal_safe(&format!("{e:#}")));
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let home = Home::new(cli.home.unwrap_or_else(Home::default_dir));
    match cli.command {
        Command::Init { phone, device_model, os } => {
            let device = Device { model: device_model, os, app_version: env!("CARGO_PKG_VERSION").to_owned() };
            let id = messenger::init(&home, &phone, device)?;
            println!("initialised {} for {phone}, account {}", home.dir().display(), id.account_id());
        }
        Command::Register { server, cert_sha256, code, code_file, pin } => {
            let code = match code_file {
                Some(path) => Some(
                    std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read the code from {}", path.display()))?,
                ),
                None => code,
            };
            register(&home, &server, &cert_sha256, Verification { code, pin }).await?;
        }
        Command::SetPin { pin, remove } => {
            let pin = match (pin, remove) {
                (_, true) => None,
                (Some(pin), false) => Some(pin),
                (None, false) => Some(read_secret("registration lock PIN (4 to 64 characters): ")?),
            };
            let m = Messenger::open(&home).await?;
            let enabled = m.set_registration_lock(pin.as_deref()).await;
            m.close().await;
            if enabled? {
                println!("registration lock set: your number cannot be registered elsewhere without this PIN while");
                println!("this identity connects at least once every 7 days");
            } else {
                println!("registration lock removed");
            }
        }
        Command::Send { to, text, json } => {
            let mut m = Messenger::open(&home).await?;
            let sent = m.send_text(&to, &text).await?;
            if json {
                println!("{}", json_line(&sent)?);
            } else {
                let how = if sent.sealed { "sealed sender" } else { "first contact, sender known to the relay" };
                println!("sent {} (relay id {}, {how})", sent.id, sent.server_id);
            }
            m.close().await;
        }
        Command::Recv { wait, json } => {
            let mut m = Messenger::open(&home).await?;
            let got = m.receive_all(1, Duration::from_secs(wait)).await?;
            for msg in &got.messages {
                print_message(msg, json)?;
            }
            for q in &got.quarantined {
                print_quarantined(&home, q, json)?;
            }
            m.close().await;
            if !got.quarantined.is_empty() {
                std::process::exit(3);
            }
        }
        Command::Status { json } => status(&home, json)?,
        Command::Chat { to } => chat(&home, &to).await?,
        Command::Verify { with, accept } => verify(&home, &with, accept).await?,
        Command::Consent { action } => consent(&home, action).await?,
        Command::Device { model, os, app_version } => {
            let mut m = Messenger::open(&home).await?;
            let mut device = home.profile()?.device;
            for (field, value) in
                [(&mut device.model, model), (&mut device.os, os), (&mut device.app_version, app_version)]
            {
                if let Some(v) = value {
                    *field = v;
                }
            }
            m.update_device(device.clone()).await?;
            println!(
                "device reported: model {:?}, os {:?}, app version {:?}",
                device.model, device.os, device.app_version
            );
            m.close().await;
        }
        Command::Exports { verify, json, witness_keys } => {
            if !witness_keys.is_empty() {
                relay_client::witnessed::Witnesses::remember(&home, &witness_keys).map_err(anyhow::Error::msg)?;
            }
            exports(&home, verify, json).await?
        }
        Command::Account { action: AccountAction::Delete { yes } } => delete_account(&home, yes).await?,
        Command::Data { action: DataAction::Export { file } } => {
            let m = Messenger::open(&home).await?;
            let export = m.data_export().await;
            m.close().await;
            let export = export?;
            let bytes = serde_json::to_vec_pretty(&export)?;
            relay_quic::durable_file::replace(&file, &bytes, relay_quic::durable_file::Access::Owner)
                .with_context(|| format!("cannot write {}", file.display()))?;
            println!(
                "wrote {} ({} consent decisions, {} receipts, {} export-log entries{})",
                file.display(),
                export.consent_history.len(),
                export.receipts.len(),
                export.exports.entries.len(),
                if export.exports.problems.is_empty() { ", all verified" } else { ", VERIFICATION PROBLEMS listed" }
            );
        }
        Command::RotateAccessKey => {
            let mut m = Messenger::open(&home).await?;
            m.rotate_access_key().await?;
            println!("access key replaced: sealed sends under the old one are refused from now on");
            m.close().await;
        }
    }
    Ok(())
}

/// Exit status of `register` when a code is needed and there is no terminal to ask for it on.
const EXIT_CODE_NEEDED: i32 = 3;

/// `register`: with the code (and PIN) given, or, when the relay verifies numbers and they are missing, asks for a
/// code and prompts for what is missing on a terminal. Without a terminal it exits [`EXIT_CODE_NEEDED`].
async fn register(home: &Home, server: &str, cert_sha256: &str, mut proof: Verification) -> anyhow::Result<()> {
    let interactive = std::io::stdin().is_terminal();
    // Each round either registers or learns one more thing to ask for; a person gets a few tries at typing.
    for _ in 0..6 {
        let refused = match Messenger::register_with(home, server, cert_sha256, &proof).await {
            Ok((m, created)) => {
                let what = if created { "registered" } else { "updated registration of" };
                println!("{what} {} as account {} on {server}", m.phone(), m.account_id());
                m.close().await;
                return Ok(());
            }
            Err(e) => e,
        };
        match refused.code() {
            Some(ErrorCode::VerificationRequired) | Some(ErrorCode::CodeExpired) => {
                let sent = Messenger::request_code(home, server, cert_sha256).await?;
                let phone = home.profile()?.phone;
                eprintln!(
                    "this relay verifies phone numbers: a {}-digit code was sent to {phone} (request {}); it \
                     expires at {} and allows {} attempts",
                    relay_proto::verification::CODE_DIGITS,
                    terminal_safe(&sent.request_id),
                    relay_proto::time::rfc3339(sent.expires_at),
                    sent.attempts,
                );
                if !interactive {
                    eprintln!("rerun this command with --code CODE (or --code-file PATH)");
                    std::process::exit(EXIT_CODE_NEEDED);
                }
                proof.code = Some(read_secret("verification code: ")?);
            }
            Some(ErrorCode::BadCode) if interactive => {
                // The relay's refusal message is peer-provided text.
                eprintln!("{}", terminal_safe(&refused.to_string()));
                proof.code = Some(read_secret("verification code: ")?);
            }
            Some(ErrorCode::RegistrationLocked) if interactive => {
                // The relay's refusal message is peer-provided text.
                eprintln!("{}", terminal_safe(&refused.to_string()));
                proof.pin = Some(read_secret("registration lock PIN: ")?);
            }
            Some(ErrorCode::RegistrationLocked) => {
                return Err(anyhow::Error::new(refused).context("rerun with --pin PIN"));
            }
            _ => return Err(refused.into()),
        }
    }
    anyhow::bail!("registration did not complete; run the command again")
}

/// A notice document for the terminal: every line through [`terminal_safe`] (a canonical notice has no control
/// characters, but the relay served it).
fn terminal_safe_notice(document: &str) -> String {
    document.lines().map(|l| format!("{}\n", terminal_safe(l))).collect()
}

/// Exit status of `account delete` when the relay erased the account but the home could not be removed.
const EXIT_HOME_LEFT: i32 = 4;

async fn delete_account(home: &Home, yes: bool) -> anyhow::Result<()> {
    let phone = home.profile()?.phone;
    if !yes {
        let answer = read_secret(&format!(
            "This erases the account of {phone} on the relay and removes {} for good. Type the phone number to \
             confirm: ",
            home.dir().display()
        ))
        .unwrap_or_default();
        if answer.trim() != phone {
            anyhow::bail!("not deleted: the number typed is not this account's (or pass --yes in a script)");
        }
    }
    let m = Messenger::open(home).await?;
    m.delete_account().await?;
    println!("account of {phone} erased on the relay; affiliates that received data will be told");
    if let Err(e) = home.erase() {
        eprintln!("error: the account is erased, but {} could not be removed: {e}", home.dir().display());
        std::process::exit(EXIT_HOME_LEFT);
    }
    println!("removed {}", home.dir().display());
    Ok(())
}

/// Prompts on stderr (when stdin is a terminal) and reads one line from stdin. The line is echoed by the terminal:
/// this client links no terminal-control code.
fn read_secret(prompt: &str) -> anyhow::Result<String> {
    if std::io::stdin().is_terminal() {
        eprint!("{prompt}");
        std::io::Write::flush(&mut std::io::stderr())?;
    }
    let mut line = String::new();
    if std::io::stdin().read_line(&mut line)? == 0 {
        anyhow::bail!("no input on stdin");
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

async fn exports(home: &Home, verify: bool, json: bool) -> anyhow::Result<()> {
    let m = Messenger::open(home).await?;
    let report = m.exports(verify).await;
    m.close().await;
    let report = report?;
    if json {
        println!("{}", json_line(&report)?);
    } else if report.log_key.is_none() {
        println!("nothing was ever exported through this relay's exporter");
    } else {
        println!("{} export(s) concerning you in a log of {} entries", report.entries.len(), report.tree_size);
        for e in &report.entries {
            let consent = e.consent_sequence.map_or_else(|| "unknown consent".to_owned(), |s| format!("statement {s}"));
            let status = match (&e.problem, verify) {
                (Some(p), _) => format!("FAILED: {p}"),
                (None, true) => "verified".to_owned(),
                (None, false) => "not verified".to_owned(),
            };
            println!(
                "#{:<5} {} {:<10} {:<18} {:<40} {consent:<14} {}",
                e.index,
                e.time,
                terminal_safe(&e.affiliate),
                terminal_safe(&e.purpose),
                terminal_safe(&e.fields.join(",")),
                terminal_safe(&status)
            );
        }
        if verify && report.problems.is_empty() {
            println!(
                "log key {} — head of size {} verified",
                report.log_key.as_deref().unwrap_or(""),
                report.tree_size
            );
        }
    }
    if verify && !json {
        for p in &report.problems {
            println!("PROBLEM: {}", terminal_safe(p));
        }
    }
    if verify && !report.problems.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

async fn consent(home: &Home, action: ConsentAction) -> anyhow::Result<()> {
    use relay_proto::consent::Decision;
    let m = Messenger::open(home).await?;
    let print_receipt = |r: &relay_client::consent::Receipt, json: bool| -> anyhow::Result<()> {
        if json {
            println!("{}", json_line(r)?);
        } else {
            let until =
                r.expires_at.map(|e| format!(" until {} (UTC)", relay_proto::time::date(e))).unwrap_or_default();
            let who = if r.affiliate.is_empty() { "every affiliate" } else { r.affiliate.as_str() };
            println!(
                "{}: {who} for {}{until} (statement {}, receipt {})",
                r.decision, r.purpose, r.sequence, r.receipt_id
            );
        }
        Ok(())
    };
    match action {
        ConsentAction::Object { purpose, lift, json } => {
            let receipts = m.object_to_purpose(&purpose, lift).await?;
            for r in &receipts {
                print_receipt(r, json)?;
            }
            if !json {
                if lift {
                    println!("objection to {purpose} lifted: grants you make from now on count again");
                } else {
                    println!("you object to {purpose}: no affiliate receives anything for it until you lift this");
                }
            }
        }
        ConsentAction::History { json } => {
            let history = m.consent_history().await?;
            for h in &history {
                if json {
                    println!("{}", json_line(h)?);
                } else {
                    let until =
                        h.expires_at.map(|e| format!(" until {}", relay_proto::time::date(e))).unwrap_or_default();
                    println!(
                        "#{:<4} {} {:<8} {:<12} {:<20}{until} (signature verified)",
                        h.sequence,
                        relay_proto::time::date(h.decided_at),
                        h.decision,
                        terminal_safe(&h.affiliate),
                        h.purpose
                    );
                }
            }
            if !json {
                println!("{} decisions, every one signed by this device's identity key", history.len());
            }
        }
        ConsentAction::Notice { affiliate, purpose, json } => {
            let shown = m.notice(&affiliate, &purpose).await?;
            if json {
                let out = serde_json::json!({
                    "hash": hex::encode(shown.hash),
                    "version": shown.notice.version,
                    "document": shown.document,
                });
                println!("{}", json_line(&out)?);
            } else {
                print!("{}", terminal_safe_notice(&shown.document));
                println!("notice hash: {}", hex::encode(shown.hash));
            }
        }
        ConsentAction::Grant { affiliate, purpose, expires_days, yes, json } => {
            // Shown first, then signed: the grant names exactly the document printed here.
            let shown = m.notice(&affiliate, &purpose).await?;
            let text = format!("{}notice hash: {}\n", terminal_safe_notice(&shown.document), hex::encode(shown.hash));
            if json {
                eprint!("{text}");
            } else {
                print!("{text}");
            }
            if !yes {
                let answer = read_secret(&format!(
                    "Grant {} ({}) this, for {}? Type yes to sign: ",
                    shown.notice.legal_name, shown.notice.affiliate, shown.notice.purpose
                ))
                .unwrap_or_default();
                if answer.trim() != "yes" {
                    m.close().await;
                    anyhow::bail!(
                        "not granted: nothing was signed (type yes at the prompt, or pass --yes in a script)"
                    );
                }
            }
            let r = m.grant_consent(&shown, expires_days).await?;
            print_receipt(&r, json)?;
        }
        ConsentAction::Withdraw { affiliate, purpose, json } => {
            let r = m.decide_consent(&affiliate, &purpose, Decision::Withdraw, None).await?;
            print_receipt(&r, json)?;
        }
        ConsentAction::RejectAll { json } => {
            let receipts = m.reject_all_consent().await?;
            for r in &receipts {
                print_receipt(r, json)?;
            }
            if !json {
                println!("everything is now denied ({} withdrawn)", receipts.len());
            }
        }
        ConsentAction::Show { json } => {
            let pairs = m.consent_state().await?;
            for p in &pairs {
                if json {
                    println!("{}", json_line(p)?);
                } else {
                    println!("{:<12} {:<20} {}", p.affiliate, p.purpose, p.status);
                }
            }
            if !json {
                println!("(every other affiliate and purpose: denied)");
            }
        }
    }
    m.close().await;
    Ok(())
}

/// Sends one chat line. The peer is resolved (one directory lookup) on the first line only, so a long chat does not
/// spend the lookup rate limit; while its identity change is pending, lines are held.
async fn send_line(
    m: &mut Messenger,
    peer: &mut Option<relay_client::DirectoryEntry>,
    to: &str,
    line: &str,
) -> Result<relay_client::Sent, MessengerError> {
    if peer.is_none() {
        match m.contact(to).await {
            Ok(entry) => *peer = Some(entry),
            Err(MessengerError::IdentityChanged { .. }) => return m.send_text(to, line).await,
            Err(e) => return Err(e),
        }
    }
    match peer {
        Some(p) => m.send_to(p, line).await,
        None => m.send_text(to, line).await,
    }
}

async fn verify(home: &Home, with: &str, accept: bool) -> anyhow::Result<()> {
    let mut m = Messenger::open(home).await?;
    if !m.contacts().contains_key(with) {
        // Not a contact yet: resolve it now (first use).
        m.contact(with).await?;
    }
    let (current, changed) = m.safety_numbers(with)?;
    match (changed, accept) {
        (None, _) => {
            println!("safety number with {with}:\n{current}");
            println!("compare it with the one {with} sees; if they match, nobody is in the middle");
        }
        (Some(new), false) => {
            println!("SAFETY NUMBER CHANGED for {with}: it now uses a different identity key.");
            println!("previous safety number:\n{current}\nnew safety number:\n{new}");
            let held = m.held()?.iter().filter(|h| h.to == with).count();
            println!("{held} message(s) held. If the new number matches what {with} sees, run:");
            println!("  relay --home {} verify --with {with} --accept", home.dir().display());
            m.close().await;
            std::process::exit(2);
        }
        (Some(new), true) => {
            let sent = m.accept_identity(with).await?;
            println!("accepted the new identity of {with}; safety number:\n{new}");
            println!("sent {} held message(s)", sent.len());
        }
    }
    m.close().await;
    Ok(())
}

fn print_message(m: &ReceivedMessage, json: bool) -> anyhow::Result<()> {
    let from = terminal_safe(&m.from);
    if m.identity_changed && !json {
        println!("!! SAFETY NUMBER CHANGED: the next message is certified as from {from} but with new keys");
    }
    if json {
        println!("{}", json_line(m)?);
    } else {
        println!("[{}] {from}: {}", format_time(m.sent_at), terminal_safe(&m.text));
    }
    Ok(())
}

/// An envelope set aside: `{"error", "server_id", "stored_at"}` in JSON, a warning line otherwise.
fn print_quarantined(home: &Home, q: &Quarantined, json: bool) -> anyhow::Result<()> {
    if json {
        #[derive(serde::Serialize)]
        struct Line<'a> {
            error: &'a str,
            server_id: u64,
            stored_at: u64,
        }
        println!("{}", json_line(&Line { error: &q.error, server_id: q.server_id, stored_at: q.stored_at })?);
    } else {
        println!(
            "!! a message stored at {} (relay id {}) could not be read and was set aside in {}: {}",
            format_time(q.stored_at),
            q.server_id,
            home.quarantine_dir().display(),
            terminal_safe(&q.error)
        );
    }
    Ok(())
}

fn status(home: &Home, json: bool) -> anyhow::Result<()> {
    #[derive(serde::Serialize)]
    struct Status {
        phone: String,
        account: String,
        relay: Option<String>,
        contacts: usize,
        identity_changes: usize,
        held: usize,
        quarantined: usize,
    }
    let (identity, profile) = (home.identity()?, home.profile()?);
    let contacts = home.contacts()?;
    let s = Status {
        phone: profile.phone,
        account: identity.account_id().to_string(),
        relay: profile.relay.map(|r| r.server),
        contacts: contacts.len(),
        identity_changes: contacts.values().filter(|c| c.changed.is_some()).count(),
        held: home.held()?.len(),
        quarantined: home.quarantined()?,
    };
    if json {
        println!("{}", json_line(&s)?);
        return Ok(());
    }
    println!("{} (account {})", terminal_safe(&s.phone), s.account);
    println!("relay: {}", s.relay.as_deref().unwrap_or("not registered"));
    println!("contacts: {} ({} with a SAFETY NUMBER CHANGED to review)", s.contacts, s.identity_changes);
    println!("held messages: {}", s.held);
    println!("quarantined envelopes: {} (in {})", s.quarantined, home.quarantine_dir().display());
    Ok(())
}

fn format_time(ms: u64) -> String {
    let secs = ms / 1000;
    format!("{:02}:{:02}:{:02}", (secs / 3600) % 24, (secs / 60) % 60, secs % 60)
}

/// Opens the home's relay again after the connection was lost (a node went down, the relay restarted, the network
/// dropped): tries every listed node, again and again with a growing pause (at most [`RECONNECT_PAUSE_MAX`]), until
/// one answers; an answer of the relay itself (the account is gone, say) ends the chat.
async fn reconnect(home: &Home) -> anyhow::Result<(Messenger, relay_client::Inbox)> {
    eprintln!("(the connection to the relay was lost; reconnecting…)");
    let mut pause = Duration::from_millis(200);
    loop {
        match Messenger::open(home).await {
            Ok(m) => {
                let inbox = m.inbox().await?;
                eprintln!("(reconnected to {})", m.relay_address());
                return Ok((m, inbox));
            }
            Err(e) if e.is_transport() => {
                tracing::debug!(error = %e, "reconnect attempt failed");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RECONNECT_PAUSE_MAX);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The longest pause between two reconnection attempts of `chat`.
const RECONNECT_PAUSE_MAX: Duration = Duration::from_secs(5);

async fn chat(home: &Home, to: &str) -> anyhow::Result<()> {
    let mut m = Messenger::open(home).await?;
    relay_proto::PhoneNumber::parse_valid(to).with_context(|| format!("invalid phone number {to:?}"))?;
    let mut inbox = m.inbox().await?;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    eprintln!("chatting with {to} as {} — type a line and press Enter; Ctrl-D to quit", m.phone());
    let mut pending = Vec::new();
    let mut peer = None;
    // Peers consume one-time prekeys while we chat: top the pools up now and then.
    let mut refresh = tokio::time::interval(Duration::from_secs(300));
    refresh.tick().await;
    loop {
        tokio::select! {
            _ = refresh.tick() => {
                if let Err(e) = m.refresh_prekeys().await {
                    eprintln!("(could not replenish prekeys: {})", terminal_safe(&e.to_string()));
                }
            }
            line = lines.next_line() => match line? {
                Some(line) if line.trim().is_empty() => {}
                Some(line) => match send_line(&mut m, &mut peer, to, &line).await {
                    Ok(sent) => tracing::debug!(id = %sent.id, "sent"),
                    // The peer may not have registered yet: say so and keep the chat open.
                    Err(e) if e.code() == Some(ErrorCode::NotFound) => {
                        eprintln!("(not sent: {to} is not registered on this relay yet)");
                    }
                    Err(e @ (MessengerError::IdentityChanged { .. } | MessengerError::UnboundKey { .. })) => {
                        eprintln!("{}", terminal_safe(&e.to_string()));
                    }
                    // Whether the relay stored it is unknown: say so rather than send it twice.
                    Err(e) if e.is_transport() => {
                        eprintln!("(not known to be sent — the connection was lost; type it again once reconnected)");
                        (m, inbox) = reconnect(home).await?;
                        pending.clear();
                    }
                    Err(e) => return Err(e.into()),
                },
                None => break,
            },
            event = inbox.next() => match event {
                Some(Ok(InboxEvent::Deliver(d))) => {
                    match m.accept(&d).await {
                        Ok(Accepted::New(msg)) => {
                            print_message(&msg, false)?;
                            pending.push(d.server_id);
                        }
                        Ok(Accepted::Duplicate) => pending.push(d.server_id),
                        Ok(Accepted::Quarantined(q)) => {
                            print_quarantined(home, &q, false)?;
                            pending.push(d.server_id);
                        }
                        // Not acknowledged, so left in the mailbox: the next delivery stream brings it again.
                        Err(e) => {
                            eprintln!("(could not process a message, it stays on the relay: {})", terminal_safe(&e.to_string()));
                        }
                    }
                    // End the receive batch (it holds the home's lock) before waiting for anything else.
                    if !inbox.has_buffered() {
                        m.save_seen().await?;
                        if !pending.is_empty() {
                            inbox.ack(&pending).await?;
                            pending.clear();
                        }
                    }
                }
                Some(Ok(InboxEvent::QueueEmpty)) => {
                    if !pending.is_empty() {
                        m.save_seen().await?;
                        inbox.ack(&pending).await?;
                        pending.clear();
                    }
                }
                Some(Ok(InboxEvent::Acked(_))) => {}
                // Unacknowledged messages stay on the relay and come again on the new delivery stream.
                Some(Err(e)) if e.is_transport() => {
                    (m, inbox) = reconnect(home).await?;
                    pending.clear();
                }
                Some(Err(e)) => return Err(e.into()),
                None => {
                    (m, inbox) = reconnect(home).await?;
                    pending.clear();
                }
            }
        }
    }
    if !pending.is_empty() {
        m.save_seen().await?;
        inbox.ack(&pending).await?;
        // Give the relay a moment to process the final acknowledgement before closing.
        tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(e)) = inbox.next().await {
                if matches!(e, InboxEvent::Acked(_)) {
                    break;
                }
            }
        })
        .await
        .ok();
    }
    m.close().await;
    Ok(())
}
