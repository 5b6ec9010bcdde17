//! `relay-demo`: the whole system on one screen. Starts a relay, the metadata exporter and two affiliate webhook
//! sinks (in this process, printing every event they receive and whether its signature verifies), then drives three
//! users with the real `relay` CLI: they chat; Alice reads AdsCo's advertising notice and grants it; Bob grants
//! ShieldCo security, then objects to security for every affiliate; Alice changes phone, updates her app, withdraws;
//! both list and verify what was shared about them; Carol grants, then erases her account; the auditor checks the
//! whole export log and writes a regulator pack for the day.
//!
//! It checks what it shows: each affiliate must receive exactly the events the consents allow, with valid
//! signatures, or the demo exits with status 1. Everything runs on loopback in a temporary directory
//! (`--keep DIR` to keep it). The binaries it runs are looked up beside its own executable: build them first with
//! `cargo build --release --bins`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use relay_quic::ready::{ReadyLine, ServerChild};
use relay_tests::affiliate::{Attempt, Sink};

const WAIT: Duration = Duration::from_secs(20);
const ALICE: &str = "+33612345678";
const BOB: &str = "+33698765432";
const CAROL: &str = "+33644444444";

struct Demo {
    bin: PathBuf,
    dir: PathBuf,
    relay: String,
    relay_cert: String,
}

/// Whether stdout takes colour escapes (a terminal, and `NO_COLOR` unset).
fn colour() -> bool {
    use std::io::IsTerminal;
    relay_quic::logging::colour_allowed(std::io::stdout().is_terminal(), std::env::var_os("NO_COLOR"))
}

/// `text` in the given SGR style when stdout is a terminal, plain otherwise.
fn styled(sgr: &str, text: &str) -> String {
    if colour() { format!("\x1b[{sgr}m{text}\x1b[0m") } else { text.to_owned() }
}

fn section(title: &str) {
    println!("\n{}", styled("1", &format!("== {title}")));
}

/// Starts a server binary (its stderr appended to `log`) and returns it with its ready line.
async fn start(bin: &Path, args: &[&str], log: &Path) -> Result<(ServerChild, ReadyLine)> {
    let mut command = tokio::process::Command::new(bin);
    command.args(args).env("RUST_LOG", "info");
    Ok(ServerChild::start(command, log, WAIT).await?)
}

/// Stops a server with SIGTERM, bounded.
async fn stop(child: ServerChild) -> Result<()> {
    child.terminate(WAIT).await?;
    Ok(())
}

/// A free UDP port on loopback (for the export interface, which both sides must know in advance).
fn free_udp_port() -> Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Demo {
    /// Runs the `relay` CLI for `user`, echoing the command and its output.
    fn relay_cli(&self, user: &str, args: &[&str]) -> Result<String> {
        self.relay_cli_answering(user, args, None)
    }

    /// Runs the CLI with `answer` typed on its stdin (a confirmation prompt), or nothing.
    fn relay_cli_answering(&self, user: &str, args: &[&str], answer: Option<&str>) -> Result<String> {
        let home = self.dir.join(user);
        let shown: Vec<String> =
            args.iter().map(|a| if a.contains(' ') { format!("{a:?}") } else { (*a).to_owned() }).collect();
        let typed = answer.map(|a| format!("echo {a} | ")).unwrap_or_default();
        println!("{}", styled("36", &format!("$ {typed}relay --home {user} {}", shown.join(" "))));
        let mut child = Command::new(self.bin.join("relay"))
            .arg("--home")
            .arg(&home)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        if let (Some(mut stdin), Some(a)) = (child.stdin.take(), answer) {
            std::io::Write::write_all(&mut stdin, format!("{a}\n").as_bytes())?;
        }
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        for line in text.lines() {
            println!("  {line}");
        }
        if !out.status.success() {
            bail!("relay {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(text)
    }
}

fn show(affiliate: &str, a: &Attempt) {
    let sig = if a.signature_ok { "signature verified" } else { "BAD SIGNATURE" };
    let line =
        format!("  [{affiliate} received] {} {} ({sig})", a.body["type"].as_str().unwrap_or("?"), a.body["data"]);
    println!("{}", styled("33", &line));
}

/// Waits until `sink` has `n` distinct events, printing the new ones.
async fn expect_events(name: &str, sink: &Sink, shown: &mut usize, n: usize) -> Result<()> {
    sink.wait_events(n, WAIT).await.with_context(|| format!("{name} did not receive {n} events"))?;
    // In arrival order, each webhook id once.
    let mut events: Vec<Attempt> = Vec::new();
    for a in sink.attempts().into_iter().filter(|a| a.status == 200) {
        if !events.iter().any(|e| e.id == a.id) {
            events.push(a);
        }
    }
    for e in events.iter().skip(*shown) {
        show(name, e);
    }
    *shown = events.len();
    Ok(())
}

/// Gives the exporter time for a few polls, then checks that `sink` got nothing new.
async fn expect_nothing_new(name: &str, sink: &Sink, shown: usize) -> Result<()> {
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let now = sink.events().len();
    if now != shown {
        bail!("{name} received {} unexpected event(s)", now - shown);
    }
    println!("  ({name} received nothing: correct)");
    Ok(())
}

async fn run(dir: &Path) -> Result<()> {
    let bin = std::env::current_exe()?.parent().ok_or_else(|| anyhow!("no exe dir"))?.to_path_buf();
    for b in ["relayd", "relay-exporter", "relay", "relay-audit"] {
        if !bin.join(b).exists() {
            bail!("{} not found beside relay-demo: run `cargo build --release --bins` first", b);
        }
    }
    section("Affiliates: two webhook sinks that verify signatures and print what they receive");
    let adsco = Sink::start(b"adsco demo webhook key 012345").await?;
    let shieldco = Sink::start(b"shieldco demo webhook key 6789").await?;
    let catalogue = relay_tests::affiliate::catalogue(&[
        (
            "adsco",
            &adsco,
            &[
                ("advertising", &["phone_pseudonym", "device_model"]),
                ("analytics", &["device_model", "os", "app_version"]),
            ],
        ),
        ("shieldco", &shieldco, &[("security", &["phone", "device_model", "os"])]),
    ]);
    // The operator, named as controller in the regulator pack's Article 30 record.
    let catalogue = format!(
        "{catalogue}\n[controller]\nname = \"Consent Relay Demo SAS\"\ncontact = \"dpo@demo.example\"\ncountry = \"FR\"\n"
    );
    let catalogue_path = dir.join("affiliates.toml");
    std::fs::write(&catalogue_path, &catalogue)?;
    println!("  adsco at {} may get: advertising = phone_pseudonym, device_model", adsco.url());
    println!("  shieldco at {} may get: security = phone, device_model, os", shieldco.url());

    section("Relay and exporter (first start: each pins the other's certificate)");
    let relay_data = dir.join("relay").display().to_string();
    let relay_log = dir.join("relayd.log");
    let (first, ready) =
        start(&bin.join("relayd"), &["--data", &relay_data, "--listen", "127.0.0.1:0"], &relay_log).await?;
    stop(first).await?;
    let relay_cert = ready.cert_hex();
    let export_addr = format!("127.0.0.1:{}", free_udp_port()?);
    let exporter_data = dir.join("exporter").display().to_string();
    let (exporter, ready) = start(
        &bin.join("relay-exporter"),
        &[
            "--data",
            &exporter_data,
            "--relay",
            &export_addr,
            "--relay-cert-sha256",
            &relay_cert,
            "--affiliates",
            &catalogue_path.display().to_string(),
            "--poll-ms",
            "200",
        ],
        &dir.join("exporter.log"),
    )
    .await?;
    println!("  relay-exporter: {ready}");
    let ReadyLine::Exporter { log_key, .. } = ready else { bail!("relay-exporter printed a relay's ready line") };
    let (exporter_cert, log_key) = (ready.cert_hex(), hex::encode(log_key));
    let (relay, ready) = start(
        &bin.join("relayd"),
        &[
            "--data",
            &relay_data,
            "--listen",
            "127.0.0.1:0",
            "--export-listen",
            &export_addr,
            "--exporter-cert-sha256",
            &exporter_cert,
        ],
        &relay_log,
    )
    .await?;
    println!("  relayd: {ready}");
    let ReadyLine::Relay { addr: relay_addr, .. } = ready else { bail!("relayd printed an exporter's ready line") };
    let relay_addr = relay_addr.to_string();
    let demo = Demo { bin: bin.clone(), dir: dir.to_path_buf(), relay: relay_addr, relay_cert };

    section("Two users register and chat (no consent needed for messaging)");
    demo.relay_cli("alice", &["init", "--phone", ALICE, "--device-model", "Pixel 8", "--os", "Android 15"])?;
    demo.relay_cli("bob", &["init", "--phone", BOB, "--device-model", "iPhone 15", "--os", "iOS 18"])?;
    for user in ["alice", "bob"] {
        demo.relay_cli(user, &["register", "--server", &demo.relay, "--cert-sha256", &demo.relay_cert])?;
    }
    demo.relay_cli("alice", &["send", "--to", BOB, "Hi Bob, lunch at noon?"])?;
    demo.relay_cli("bob", &["recv", "--wait", "10"])?;
    demo.relay_cli("bob", &["send", "--to", ALICE, "Sure, see you there"])?;
    demo.relay_cli("alice", &["recv", "--wait", "10"])?;
    let (mut ads_seen, mut shield_seen) = (0, 0);
    expect_nothing_new("adsco", &adsco, 0).await?;

    section("Alice reads AdsCo's advertising notice: who receives what, where, for how long");
    // The exporter publishes its notices to the relay when it connects; wait for that (bounded) before showing one.
    let notice = ["consent", "notice", "--affiliate", "adsco", "--purpose", "advertising"];
    let deadline = std::time::Instant::now() + WAIT;
    while Command::new(demo.bin.join("relay"))
        .arg("--home")
        .arg(demo.dir.join("alice"))
        .args(notice)
        .output()?
        .status
        .code()
        != Some(0)
    {
        if std::time::Instant::now() > deadline {
            bail!("the exporter did not publish its notices in time");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    demo.relay_cli("alice", &notice)?;

    section("Alice grants it (the CLI shows the notice again and signs its hash once she types yes)");
    demo.relay_cli_answering(
        "alice",
        &["consent", "grant", "--affiliate", "adsco", "--purpose", "advertising"],
        Some("yes"),
    )?;
    println!("  AdsCo gets exactly what the notice names: a pseudonym and the device model");
    expect_events("adsco", &adsco, &mut ads_seen, 1).await?;
    println!("  (no phone number, no OS, no app version; ShieldCo got nothing about Alice)");

    section("Bob grants ShieldCo security: ShieldCo may see his number, model and OS; AdsCo hears nothing of Bob");
    demo.relay_cli("bob", &["consent", "grant", "--affiliate", "shieldco", "--purpose", "security", "--yes"])?;
    expect_events("shieldco", &shieldco, &mut shield_seen, 1).await?;
    expect_nothing_new("adsco", &adsco, ads_seen).await?;

    section("Bob objects to security for every affiliate: ShieldCo is told, and nothing more leaves for it");
    demo.relay_cli("bob", &["consent", "object", "--purpose", "security"])?;
    expect_events("shieldco", &shieldco, &mut shield_seen, 2).await?;
    demo.relay_cli("bob", &["device", "--os", "iOS 19"])?;
    expect_nothing_new("shieldco", &shieldco, shield_seen).await?;
    demo.relay_cli("bob", &["consent", "show"])?;

    section("Alice changes phone: AdsCo gets the new model; an app update is not AdsCo's to see");
    demo.relay_cli("alice", &["device", "--model", "Pixel 10"])?;
    expect_events("adsco", &adsco, &mut ads_seen, 2).await?;
    demo.relay_cli("alice", &["device", "--app-version", "2.0.0"])?;
    expect_nothing_new("adsco", &adsco, ads_seen).await?;

    section("Alice withdraws: AdsCo is told, by pseudonym only, and gets nothing more");
    demo.relay_cli("alice", &["consent", "withdraw", "--affiliate", "adsco", "--purpose", "advertising"])?;
    expect_events("adsco", &adsco, &mut ads_seen, 3).await?;
    demo.relay_cli("alice", &["device", "--model", "Pixel 10 Pro"])?;
    expect_nothing_new("adsco", &adsco, ads_seen).await?;
    demo.relay_cli("alice", &["consent", "show"])?;

    section("What was shared about Alice, verified on her device (signed head, Merkle proofs, her signed grant)");
    demo.relay_cli("alice", &["exports", "--verify"])?;
    demo.relay_cli("bob", &["exports", "--verify"])?;
    expect_nothing_new("shieldco", &shieldco, shield_seen).await?;

    section("Carol grants AdsCo advertising, then erases her account: AdsCo is told to erase what it received");
    demo.relay_cli("carol", &["init", "--phone", CAROL, "--device-model", "Fairphone 5", "--os", "Android 15"])?;
    demo.relay_cli("carol", &["register", "--server", &demo.relay, "--cert-sha256", &demo.relay_cert])?;
    demo.relay_cli("carol", &["consent", "grant", "--affiliate", "adsco", "--purpose", "advertising", "--yes"])?;
    expect_events("adsco", &adsco, &mut ads_seen, 4).await?;
    demo.relay_cli_answering("carol", &["account", "delete"], Some(CAROL))?;
    expect_events("adsco", &adsco, &mut ads_seen, 5).await?;
    println!("  (the relay removed Carol's number, keys, profile and mailbox; the exporter her data and bodies)");

    section("The auditor checks the whole export log (exporter stopped)");
    stop(exporter).await?;
    println!(
        "{}",
        styled(
            "36",
            &format!("$ relay-audit --exporter-data exporter --log-key {log_key} --affiliates affiliates.toml")
        )
    );
    let out = Command::new(bin.join("relay-audit"))
        .args(["--exporter-data", &exporter_data, "--log-key", &log_key, "--affiliates"])
        .arg(&catalogue_path)
        .output()?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("  {line}");
    }
    if !out.status.success() {
        bail!("the audit failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    section("A regulator asks what was shared today: the operator hands over a pack it can check on its own");
    let today = relay_proto::time::date(relay_proto::now_ms());
    let pack = dir.join("regulator-pack");
    println!(
        "{}",
        styled(
            "36",
            &format!(
                "$ relay-audit --exporter-data exporter --affiliates affiliates.toml --regulator-pack regulator-pack \
                 --from {today} --to {today}"
            )
        )
    );
    let out = Command::new(bin.join("relay-audit"))
        .args(["--exporter-data", &exporter_data, "--affiliates"])
        .arg(&catalogue_path)
        .arg("--regulator-pack")
        .arg(&pack)
        .args(["--from", &today, "--to", &today])
        .output()?;
    for line in String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("regulator pack")) {
        println!("  {line}");
    }
    if !out.status.success() {
        bail!("the regulator pack failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let record = std::fs::read_to_string(pack.join("article30.md"))?;
    for line in record.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| recipient")) {
        println!("  {line}");
    }
    // Bodies are kept for their notice's retention: Bob's security export (90 days) is there; Alice's advertising
    // exports were kept only until her withdrawal.
    let bodies = std::fs::read_to_string(pack.join("bodies.jsonl"))?.lines().count();
    println!(
        "  bodies kept: {bodies} (Bob's security export, 90 days; Alice's advertising ones left at her withdrawal)"
    );
    if bodies != 1 {
        bail!("the pack holds {bodies} bodies, not exactly the one still within its retention");
    }

    section("Summary");
    let bad = adsco.events().iter().chain(shieldco.events().iter()).filter(|e| !e.signature_ok).count();
    println!(
        "  adsco received {ads_seen} events (Alice: export, re-export, withdrawal; Carol: export, erasure); shieldco \
         {shield_seen} (Bob's export, objection); {bad} bad signatures"
    );
    if ads_seen != 5 || shield_seen != 2 || bad != 0 {
        bail!("the affiliates did not receive exactly what was consented");
    }
    println!("  every affiliate received exactly what was consented, and nothing else");
    stop(relay).await?;
    Ok(())
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let keep = match (args.next().as_deref(), args.next()) {
        (Some("--keep"), Some(dir)) => Some(PathBuf::from(dir)),
        (None, _) => None,
        _ => {
            eprintln!("usage: relay-demo [--keep DIR]");
            std::process::exit(2);
        }
    };
    let temp = tempfile::tempdir();
    let dir = match (&keep, &temp) {
        (Some(d), _) => d.clone(),
        (None, Ok(t)) => t.path().to_path_buf(),
        (None, Err(e)) => {
            eprintln!("relay-demo: no temporary directory: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("relay-demo: {}: {e}", dir.display());
        std::process::exit(2);
    }
    if let Err(e) = run(&dir).await {
        eprintln!("\nrelay-demo FAILED: {e:#}\n(logs: {})", dir.display());
        if let Ok(t) = temp {
            std::mem::forget(t); // keep the logs for inspection
        }
        std::process::exit(1);
    }
}
