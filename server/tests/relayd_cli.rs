//! The `relayd` binary as an operator runs it: the ready line, clean shutdown on SIGTERM, config errors.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// SIGTERM and a bounded wait for the exit status.
fn terminate(child: &mut std::process::Child) -> std::io::Result<std::process::ExitStatus> {
    relay_quic::ready::terminate_blocking(child, std::time::Duration::from_secs(20))
}

fn relayd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_relayd"))
}

#[test]
fn prints_one_ready_line_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = relayd()
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path().join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn relayd");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("ready line");
    let parts: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(parts.len(), 5, "{line:?}");
    assert_eq!((parts[0], parts[1], parts[3]), ("listening", "on", "cert-sha256"));
    let addr: std::net::SocketAddr = parts[2].parse().expect("address");
    assert!(addr.ip().is_loopback() && addr.port() != 0, "real port printed: {addr}");
    assert!(parts[4].len() == 64 && parts[4].chars().all(|c| c.is_ascii_hexdigit()));
    assert!(dir.path().join("data/cert.der").exists() && dir.path().join("data/key.der").exists());

    // A second relay on the same data directory refuses to start instead of corrupting the store.
    let second = relayd()
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path().join("data"))
        .output()
        .expect("run second relayd");
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("cannot open store"));

    let status = terminate(&mut child).expect("clean exit on SIGTERM");
    assert!(status.success(), "exit status {status}");
    let mut rest = String::new();
    stdout.read_line(&mut rest).expect("eof");
    assert!(rest.is_empty(), "exactly one line on stdout, then {rest:?}");
}

#[test]
fn invalid_config_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("relayd.toml");
    std::fs::write(&cfg, "[limits]\nmax_envelope_bytes = 0\n").expect("write");
    let out = relayd().arg("--config").arg(&cfg).arg("--data").arg(dir.path()).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("limits.max_envelope_bytes"), "{out:?}");

    std::fs::write(&cfg, "[limits]\nno_such_key = 1\n").expect("write");
    let out = relayd().arg("--config").arg(&cfg).arg("--data").arg(dir.path()).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no_such_key"), "{out:?}");
}

#[test]
fn export_interface_flags_keep_one_ready_line_and_are_checked_together() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fp = "ab".repeat(32);
    let mut child = relayd()
        .args(["--listen", "127.0.0.1:0", "--export-listen", "127.0.0.1:0", "--exporter-cert-sha256", &fp, "--data"])
        .arg(dir.path().join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn relayd");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("ready line");
    assert!(line.starts_with("listening on 127.0.0.1:") && line.contains(" cert-sha256 "), "{line:?}");
    assert!(terminate(&mut child).expect("clean exit on SIGTERM").success());
    let mut rest = String::new();
    stdout.read_line(&mut rest).expect("eof");
    assert!(rest.is_empty(), "still exactly one line on stdout, then {rest:?}");

    // One without the other is refused before anything starts.
    let out = relayd()
        .args(["--listen", "127.0.0.1:0", "--export-listen", "127.0.0.1:0", "--data"])
        .arg(dir.path().join("other"))
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("exporter_cert_sha256"), "{out:?}");
    let out = relayd()
        .args(["--listen", "127.0.0.1:0", "--export-listen", "127.0.0.1:0", "--exporter-cert-sha256", "xyz", "--data"])
        .arg(dir.path().join("other"))
        .output()
        .expect("run");
    assert!(!out.status.success(), "a malformed fingerprint is refused");
}

/// Open (first-come) registration lets anyone claim anyone's number, so it is refused on an address other hosts can
/// reach, before anything is bound or created, unless the operator says so explicitly; a verifier makes it fine.
#[test]
fn open_registration_is_refused_off_loopback_and_verifiers_are_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let out = relayd().args(["--listen", "0.0.0.0:0", "--data"]).arg(&data).output().expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--insecure-open-registration") && stderr.contains("--verifier"), "{stderr}");
    assert!(!data.exists(), "refused before creating anything");

    for (bad, why) in [("sms", "\"open\", \"file\" or \"webhook=URL\""), ("webhook=http://192.0.2.1/sms", "loopback")] {
        let out = relayd().args(["--verifier", bad, "--data"]).arg(&data).output().expect("run");
        assert!(!out.status.success(), "{bad}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(why), "{bad}: {out:?}");
    }

    // With the file verifier, a loopback relay starts and makes the code directory owner-only.
    let mut child = relayd()
        .args(["--listen", "127.0.0.1:0", "--verifier", "file", "--data"])
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn relayd");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("ready line");
    assert!(line.starts_with("listening on 127.0.0.1:"), "{line:?}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(data.join("verification")).expect("code directory").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }
    assert!(terminate(&mut child).expect("clean exit on SIGTERM").success());
}
