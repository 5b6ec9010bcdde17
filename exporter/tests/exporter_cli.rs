//! The `relay-exporter` binary as an operator runs it: identity and pseudonym key created on first start and kept,
//! exactly one ready line, clean stop on SIGTERM even while the relay is unreachable, and clear refusals.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

/// SIGTERM and a bounded wait for the exit status.
fn terminate(child: &mut std::process::Child) -> std::io::Result<std::process::ExitStatus> {
    relay_quic::ready::terminate_blocking(child, std::time::Duration::from_secs(20))
}

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/affiliates.example.toml");

fn exporter(data: &Path, affiliates: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_relay-exporter"));
    // Nothing listens there: the exporter keeps retrying, which is what an exporter started before its relay does.
    c.args(["--relay", "127.0.0.1:9", "--relay-cert-sha256", &"ab".repeat(32), "--poll-ms", "50", "--data"])
        .arg(data)
        .arg("--affiliates")
        .arg(affiliates);
    c
}

/// Starts the exporter, reads its ready line, stops it with SIGTERM; the fingerprint it printed.
fn run_once(data: &Path) -> String {
    let mut child = exporter(data, Path::new(EXAMPLE))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn relay-exporter");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("ready line");
    let parts: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(parts.len(), 5, "{line:?}");
    assert_eq!((parts[0], parts[1], parts[3]), ("exporter", "cert-sha256", "log-key"));
    for hex in [parts[2], parts[4]] {
        assert!(hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()), "{line:?}");
    }
    let status = terminate(&mut child).expect("clean exit on SIGTERM");
    assert!(status.success(), "exit status {status}");
    let mut rest = String::new();
    stdout.read_line(&mut rest).expect("eof");
    assert!(rest.is_empty(), "exactly one line on stdout, then {rest:?}");
    format!("{} {}", parts[2], parts[4])
}

#[test]
fn creates_its_identity_once_prints_one_line_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("exporter");
    let first = run_once(&data);
    for name in ["pseudonym.key", "log.key"] {
        let key = std::fs::read(data.join(name)).expect("key file");
        assert_eq!(key.len(), 32);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(data.join(name)).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
    }
    let key = std::fs::read(data.join("pseudonym.key")).expect("key");
    assert_eq!(run_once(&data), first, "same certificate and log key after a restart");
    assert_eq!(std::fs::read(data.join("pseudonym.key")).expect("key"), key, "same pseudonym key");
}

#[test]
fn bad_endpoints_ca_files_and_fingerprints_are_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let catalogue = dir.path().join("affiliates.toml");
    let text = std::fs::read_to_string(EXAMPLE).expect("example").replacen("http://", "ftp://", 1);
    std::fs::write(&catalogue, text).expect("write");
    let out = exporter(&dir.path().join("a"), &catalogue).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("adsco") && err.contains("endpoint"), "{err}");
    assert!(out.stdout.is_empty(), "no ready line");

    let missing = dir.path().join("no-such-ca.pem");
    let out =
        exporter(&dir.path().join("c"), Path::new(EXAMPLE)).arg("--affiliate-ca").arg(&missing).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-ca.pem"), "{out:?}");

    let out = Command::new(env!("CARGO_BIN_EXE_relay-exporter"))
        .args(["--relay", "127.0.0.1:9", "--relay-cert-sha256", "abcd", "--data"])
        .arg(dir.path().join("b"))
        .arg("--affiliates")
        .arg(EXAMPLE)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--relay-cert-sha256"), "{out:?}");
}
