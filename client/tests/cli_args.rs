//! The `relay` CLI's local checks, which need no relay: bad input is refused with a clear message and exit status.

use std::process::Command;

fn relay(home: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_relay"));
    c.arg("--home").arg(home);
    c
}

#[test]
fn init_refuses_a_malformed_number_and_creates_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("h");
    let out = relay(&home).args(["init", "--phone", "+3367a829916"]).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid phone number"), "{out:?}");
    assert!(!home.join("identity.json").exists());
}

#[test]
fn commands_before_init_or_register_explain_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("h");
    let out = relay(&home).args(["send", "--to", "+33698765432", "hi"]).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("init --phone"), "{out:?}");

    let ok = relay(&home).args(["init", "--phone", "+33612345678"]).output().expect("run");
    assert!(ok.status.success(), "{ok:?}");
    let again = relay(&home).args(["init", "--phone", "+33612345678"]).output().expect("run");
    assert!(!again.status.success(), "a second init must not overwrite the keys");

    let out = relay(&home).args(["recv"]).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("relay register"), "{out:?}");

    let out = relay(&home).args(["register", "--server", "127.0.0.1:1", "--cert-sha256", "abc"]).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("64 hex"), "{out:?}");
}
