//! Phone-number verification at registration, attacked: a squatter without the code, a guesser, a stale code, a SIM
//! swapper against a registration lock, flooding code requests, and the traces a number or a code could leave. Also
//! the legitimate paths: the owner taking a squatted number over, a lost phone replaced, contacts told through the
//! safety-number change, the webhook verifier's signed request, and the CLI's exit status 3.
//!
//! Relays here use the `file` verifier (the code is read from `<data_dir>/verification/<request id>`, as a person
//! reads the SMS); ten minutes and seven days pass on the relay's registration clock, never by waiting.

use std::time::Duration;

use relay_client::{Messenger, MessengerError, Verification};
use relay_proto::ErrorCode;
use relay_proto::consent::Decision;
use relay_proto::verification::{CODE_ATTEMPTS, CODE_TTL_MS, LOCK_INACTIVITY_MS};
use relay_proto::wire::{BeginExport, export_request::Body as ExportReq, export_response::Body as ExportResp};
use relay_server::verify::VerifierSpec;
use relay_tests::affiliate::Sink;
use relay_tests::export::ExporterIdentity;
use relay_tests::{TestRelay, files_containing};

use crate::{WAIT, bounded};

const OWNER: &str = "+33612345678";
const BOB: &str = "+33698765432";
const DAY: Duration = Duration::from_secs(24 * 3600);

fn code(c: &str) -> Verification {
    Verification { code: Some(c.to_owned()), pin: None }
}

fn code_and_pin(c: &str, pin: &str) -> Verification {
    Verification { code: Some(c.to_owned()), pin: Some(pin.to_owned()) }
}

/// A code that is not `c`.
fn other_than(c: &str) -> String {
    let n: u32 = c.parse().expect("six digits");
    format!("{:06}", (n + 1) % 1_000_000)
}

fn refusal(result: Result<(), MessengerError>) -> (ErrorCode, String) {
    match result {
        Ok(()) => panic!("the relay accepted the registration"),
        Err(e) => (e.code().unwrap_or(ErrorCode::Unspecified), e.to_string()),
    }
}

/// Why `home`'s identity can no longer connect (it must not).
async fn refused_open(home: &relay_client::Home) -> ErrorCode {
    match Messenger::open(home).await {
        Ok(_) => panic!("the identity still authenticates"),
        Err(e) => e.code().unwrap_or(ErrorCode::Unspecified),
    }
}

fn ms(d: u64) -> Duration {
    Duration::from_millis(d)
}

#[tokio::test]
async fn a_squatter_cannot_register_a_number_without_its_code() {
    let relay = TestRelay::verifying().await.expect("relay");
    let squatter = relay.unregistered_user(OWNER).expect("home");
    let (code_, _) = refusal(squatter.try_register(&Verification::default()).await);
    assert_eq!(code_, ErrorCode::VerificationRequired);
    assert_eq!(refusal(squatter.try_register(&code("123456")).await).0, ErrorCode::CodeExpired, "none requested");

    // The squatter can make the relay send a code, but it goes to the number, not to the squatter.
    let (_, sent) = relay.request_code(OWNER).await.expect("code");
    assert_eq!(refusal(squatter.try_register(&code(&other_than(&sent))).await).0, ErrorCode::BadCode);
    // A client speaking the protocol directly fares no better.
    let fresh = relay_client::Connection::connect(relay.addr(), fingerprint(&relay)).await.expect("connect");
    let raw = fresh.register(&relay_client::Identity::generate(), OWNER, Default::default()).await;
    assert_eq!(raw.expect_err("no code").code(), Some(ErrorCode::VerificationRequired));
    let (conn, _) = relay.raw_user(BOB).await.expect("bob");
    assert_eq!(conn.lookup(OWNER).await.expect_err("nobody holds it").code(), Some(ErrorCode::NotFound));

    // The owner, who received the code, registers.
    let owner = relay.unregistered_user(OWNER).expect("home");
    let owner = owner.register(&code(&sent)).await.expect("the owner registers with the code");
    assert_eq!(conn.lookup(OWNER).await.expect("lookup").account, owner.messenger.account_id());
}

fn fingerprint(relay: &TestRelay) -> [u8; 32] {
    relay_client::pin::parse_fingerprint(relay.fingerprint()).expect("fingerprint")
}

/// A number squatted while the relay was open (first come) is taken over by its owner once the relay verifies: the
/// owner proves the number with a code and the squatter's identity is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_with_the_code_takes_the_number_over_from_a_squatter() {
    let mut relay = TestRelay::process().await.expect("relay");
    let squatter = relay.user(OWNER).await.expect("first come");
    relay.stop().await.expect("stop");
    relay.reconfigure(|c| c.registration.verifier = VerifierSpec::File).expect("reconfigure");
    relay.restart().await.expect("restart, verifying");

    let owner = relay.unregistered_user(OWNER).expect("home");
    let (refused, _) = refusal(owner.try_register(&Verification::default()).await);
    assert_eq!(refused, ErrorCode::VerificationRequired, "not PHONE_TAKEN: the number can be proven");
    let (_, sent) = relay.request_code(OWNER).await.expect("code");
    let owner = owner.register(&code(&sent)).await.expect("the owner takes the number over");

    let bob = relay.user(BOB).await.expect("bob");
    let found = bob.messenger.connection().lookup(OWNER).await.expect("lookup");
    assert_eq!(found.account, owner.messenger.account_id());
    assert_eq!(refused_open(&squatter.home).await, ErrorCode::NotFound, "the squatter's key no longer authenticates");
    // Nor can the squatter take it back without a code.
    let back = relay_client::Connection::connect(relay.addr(), fingerprint(&relay)).await.expect("connect");
    let identity = squatter.home.identity().expect("keys");
    let again = back.register(&identity, OWNER, Default::default()).await.expect_err("no code");
    assert_eq!(again.code(), Some(ErrorCode::VerificationRequired));
}

/// The squatter's consent no longer exports the owner's number once the owner has taken it over.
#[tokio::test]
async fn a_takeover_ends_the_exports_the_old_identity_granted() {
    let exporter_identity = ExporterIdentity::generate().expect("exporter identity");
    let relay = TestRelay::in_process_with(|c| {
        c.export_listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
        c.exporter_cert_sha256 = Some(exporter_identity.fingerprint());
        c.registration.verifier = VerifierSpec::File;
    })
    .await
    .expect("relay");
    let exporter = relay.exporter(Some(&exporter_identity)).await.expect("exporter");
    relay.publish_test_notices().await.expect("notices");
    // Mallory once held the number (a recycled number, or codes read off a phone she had): she grants AdsCo.
    let mallory = relay.user(OWNER).await.expect("mallory");
    let receipt = mallory.messenger.decide_consent("adsco", "advertising", Decision::Grant, None).await.expect("grant");
    let begin = || {
        ExportReq::BeginExport(BeginExport {
            account_id: mallory.messenger.account_id().as_bytes().to_vec().into(),
            affiliate: "adsco".into(),
            purpose: "advertising".into(),
            statement_hash: hex::decode(&receipt.receipt_id).expect("hex").into(),
        })
    };
    match exporter.request(begin()).await.expect("begin") {
        ExportResp::ExportGranted(g) => assert_eq!(g.subject.map(|s| s.phone).as_deref(), Some(OWNER)),
        other => panic!("expected a grant in force, got {other:?}"),
    }

    let owner = relay.user(OWNER).await.expect("the owner proves the number and takes it over");
    match exporter.request(begin()).await.expect("begin") {
        ExportResp::ExportDenied(d) => assert!(!d.reason.is_empty()),
        other => panic!("the old identity's grant still exports the number: {other:?}"),
    }
    assert_ne!(owner.messenger.account_id(), mallory.messenger.account_id());
}

#[tokio::test]
async fn wrong_codes_five_times_lock_the_request() {
    let relay = TestRelay::verifying().await.expect("relay");
    let (request, sent) = relay.request_code(OWNER).await.expect("code");
    let guesser = relay.unregistered_user(OWNER).expect("home");
    for left in (0..CODE_ATTEMPTS).rev() {
        let (c, message) = refusal(guesser.try_register(&code(&other_than(&sent))).await);
        assert_eq!(c, ErrorCode::BadCode);
        assert!(message.contains(&format!("{left} attempt(s) left")), "{message}");
    }
    assert!(!relay.code_file(&request).exists(), "the used-up request's code file is removed");
    let (c, _) = refusal(guesser.try_register(&code(&sent)).await);
    assert_eq!(c, ErrorCode::CodeExpired, "even the right code is refused once the attempts are used up");
    // The owner asks again and gets in.
    let (_, again) = relay.request_code(OWNER).await.expect("new code");
    relay.unregistered_user(OWNER).expect("home").register(&code(&again)).await.expect("fresh code");
}

#[tokio::test]
async fn an_expired_code_is_refused() {
    let relay = TestRelay::verifying().await.expect("relay");
    let clock = relay.registration_clock().expect("in-process clock");
    let (request, sent) = relay.request_code(OWNER).await.expect("code");
    let owner = relay.unregistered_user(OWNER).expect("home");
    clock.advance(ms(CODE_TTL_MS) - Duration::from_secs(60));
    let (c, _) = refusal(owner.try_register(&code(&other_than(&sent))).await);
    assert_eq!(c, ErrorCode::BadCode, "nine minutes on, the request is still alive");
    clock.advance(Duration::from_secs(60));
    let (c, _) = refusal(owner.try_register(&code(&sent)).await);
    assert_eq!(c, ErrorCode::CodeExpired, "ten minutes on, the right code is refused");
    assert!(!relay.code_file(&request).exists(), "the expired request's code file is removed");
    let (_, again) = relay.request_code(OWNER).await.expect("new code");
    owner.register(&code(&again)).await.expect("a fresh code works");
}

/// The owner's new phone gets the number with the code and the PIN; a SIM swapper with the code alone does not.
#[tokio::test]
async fn a_registration_lock_needs_the_pin_on_top_of_the_code() {
    let relay = TestRelay::verifying().await.expect("relay");
    let old = relay.user(OWNER).await.expect("owner");
    assert!(old.messenger.set_registration_lock(Some("2468")).await.expect("set pin"));

    let (_, sent) = relay.request_code(OWNER).await.expect("the swapped SIM receives the code");
    let thief = relay.unregistered_user(OWNER).expect("home");
    let (c, message) = refusal(thief.try_register(&code(&sent)).await);
    assert_eq!(c, ErrorCode::RegistrationLocked);
    assert!(message.contains("give its PIN"), "{message}");
    let (c, message) = refusal(thief.try_register(&code_and_pin(&sent, "1357")).await);
    assert_eq!(c, ErrorCode::RegistrationLocked);
    assert!(message.contains("wrong PIN"), "{message}");

    let new_phone = relay.unregistered_user(OWNER).expect("home");
    let new_phone = new_phone.register(&code_and_pin(&sent, "2468")).await.expect("code and PIN");
    let found = new_phone.messenger.connection().lookup(OWNER).await.expect("lookup");
    assert_eq!(found.account, new_phone.messenger.account_id());
    // The lock was the old account's: the new one starts without, until it sets its own.
    let (_, next) = relay.request_code(OWNER).await.expect("code");
    relay.unregistered_user(OWNER).expect("home").register(&code(&next)).await.expect("no lock on the new account");
}

/// Signal's model: the lock holds while the old identity was active within 7 days, and lapses after that.
#[tokio::test]
async fn a_registration_lock_holds_for_seven_days_after_the_last_activity_and_not_after() {
    let relay = TestRelay::verifying().await.expect("relay");
    let clock = relay.registration_clock().expect("in-process clock");
    let mut old = relay.user(OWNER).await.expect("owner");
    old.messenger.set_registration_lock(Some("2468")).await.expect("set pin");
    clock.advance(6 * DAY);
    old.reconnect().await.expect("the old identity is active on day 6");
    clock.advance(6 * DAY);

    let thief = relay.unregistered_user(OWNER).expect("home");
    let (_, sent) = relay.request_code(OWNER).await.expect("code");
    let (c, message) = refusal(thief.try_register(&code(&sent)).await);
    assert_eq!(c, ErrorCode::RegistrationLocked, "12 days after the PIN was set, 6 after the last activity");
    assert!(message.contains("after 1 more day(s)"), "{message}");

    clock.advance(ms(LOCK_INACTIVITY_MS) - 6 * DAY);
    let (_, sent) = relay.request_code(OWNER).await.expect("code");
    thief.try_register(&code(&sent)).await.expect("7 days without activity: the code alone takes the number");
    assert_eq!(refused_open(&old.home).await, ErrorCode::NotFound, "taken over");
}

/// A lost phone: the new identity takes the number, and the old identity's contacts see it as a safety number
/// change in both directions, never as the same person silently.
#[tokio::test]
async fn a_takeover_reaches_old_contacts_as_a_safety_number_change() {
    let relay = TestRelay::verifying().await.expect("relay");
    let mut alice = relay.user(OWNER).await.expect("alice");
    let mut bob = relay.user(BOB).await.expect("bob");
    bob.messenger.set_contact_recheck(Duration::ZERO);
    alice.messenger.send_text(BOB, "from my old phone").await.expect("send");
    assert_eq!(bob.messenger.receive(1, WAIT).await.expect("receive")[0].text, "from my old phone");
    bob.messenger.send_text(OWNER, "hello old phone").await.expect("send");
    assert_eq!(alice.messenger.receive(1, WAIT).await.expect("receive").len(), 1);

    // Alice's phone is lost; her new phone has a new identity key and proves the number with a code.
    let mut new_alice = relay.user(OWNER).await.expect("takeover");

    let err = bob.messenger.send_text(OWNER, "are you there?").await.expect_err("held");
    assert!(matches!(err, MessengerError::IdentityChanged { .. }), "{err}");
    new_alice.messenger.send_text(BOB, "new phone, same me").await.expect("send");
    let got = bob.messenger.receive(1, WAIT).await.expect("receive");
    assert_eq!((got[0].from.as_str(), got[0].text.as_str()), (OWNER, "new phone, same me"));
    assert!(got[0].identity_changed, "the new identity is flagged to the old contact");

    let sent = bob.messenger.accept_identity(OWNER).await.expect("bob accepts the new safety number");
    assert_eq!(sent.len(), 1);
    let got = new_alice.messenger.receive(1, WAIT).await.expect("receive");
    assert_eq!(got[0].text, "are you there?");
    assert_eq!(refused_open(&alice.home).await, ErrorCode::NotFound, "the lost phone's identity is gone");
}

#[tokio::test]
async fn code_requests_are_rate_limited_per_number_and_per_address() {
    let relay = TestRelay::in_process_with(|c| {
        c.registration.verifier = VerifierSpec::File;
        c.registration.codes_per_hour_per_number = 2;
        c.registration.codes_per_hour_per_ip = 4;
    })
    .await
    .expect("relay");
    let conn = relay_client::Connection::connect(relay.addr(), fingerprint(&relay)).await.expect("connect");
    conn.request_code(OWNER).await.expect("first");
    conn.request_code(OWNER).await.expect("second");
    let err = conn.request_code(OWNER).await.expect_err("third for one number");
    assert_eq!(err.code(), Some(ErrorCode::RateLimited));
    assert!(err.to_string().contains("for one number"), "{err}");
    conn.request_code(BOB).await.expect("another number, fourth from this address");
    let err = conn.request_code("+33600000001").await.expect_err("fifth from this address");
    assert_eq!(err.code(), Some(ErrorCode::RateLimited));
    assert!(err.to_string().contains("from one address"), "{err}");
}

/// Whether `needle` (digits) occurs in `hay` as a whole number: not inside a longer run of digits.
fn has_number(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).enumerate().any(|(i, w)| {
        let before = i.checked_sub(1).and_then(|j| hay.get(j));
        let after = hay.get(i + needle.len());
        w == needle && !before.is_some_and(u8::is_ascii_digit) && !after.is_some_and(u8::is_ascii_digit)
    })
}

/// Files under the relay's directory holding `needle` as a whole number; in the log, each line's first field (its
/// timestamp, whose microseconds are six digits) is skipped.
fn holding_number(relay: &TestRelay, needle: &str) -> Vec<std::path::PathBuf> {
    let mut hits = Vec::new();
    for path in files_containing(relay.dir(), needle.as_bytes()).expect("scan") {
        let bytes = std::fs::read(&path).expect("read");
        let found = if path == relay.log_path() {
            String::from_utf8_lossy(&bytes)
                .lines()
                .any(|l| has_number(l.split_once(' ').map_or("", |x| x.1).as_bytes(), needle.as_bytes()))
        } else {
            has_number(&bytes, needle.as_bytes())
        };
        if found {
            hits.push(path);
        }
    }
    hits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_phone_number_code_or_pin_reaches_the_log_or_the_store() {
    const NEVER: &str = "+33655501234";
    const PIN: &str = "pin-7f3a9c";
    const WRONG_PIN: &str = "pin-0b1d2e";
    let mut relay = TestRelay::process_with(|c| c.registration.verifier = VerifierSpec::File).await.expect("relay");
    // A number that is requested and guessed at, never registered.
    let (never_request, never_code) = relay.request_code(NEVER).await.expect("code");
    let guesser = relay.unregistered_user(NEVER).expect("home");
    for _ in 0..2 {
        assert_eq!(refusal(guesser.try_register(&code(&other_than(&never_code))).await).0, ErrorCode::BadCode);
    }
    // A number registered with its code, locked with a PIN, then attacked with a wrong PIN.
    let (used_request, used_code) = relay.request_code(OWNER).await.expect("code");
    let owner = relay.unregistered_user(OWNER).expect("home").register(&code(&used_code)).await.expect("register");
    owner.messenger.set_registration_lock(Some(PIN)).await.expect("pin");
    let (attack_request, attack_code) = relay.request_code(OWNER).await.expect("code");
    let thief = relay.unregistered_user(OWNER).expect("home");
    let (c, _) = refusal(thief.try_register(&code_and_pin(&attack_code, WRONG_PIN)).await);
    assert_eq!(c, ErrorCode::RegistrationLocked);
    relay.stop().await.expect("stop: everything on disk");

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(mode(&relay.data_dir().join("verification")), 0o700);
        assert_eq!(mode(&relay.code_file(&never_request)), 0o600);
        assert_eq!(mode(&relay.data_dir().join("verification.key")), 0o600);
    }
    assert!(!relay.code_file(&used_request).exists(), "a used code's file is removed");
    assert!(std::fs::metadata(relay.log_path()).expect("log").len() > 0, "the scan covers a non-empty log");

    // The unregistered number and its code: in their pending code file and nowhere else.
    assert_eq!(files_containing(relay.dir(), &NEVER.as_bytes()[1..]).expect("scan"), [relay.code_file(&never_request)]);
    assert_eq!(holding_number(&relay, &never_code), [relay.code_file(&never_request)]);
    // The registered number is in the directory (the store) and in the attacker's pending file; never in the log.
    let owner_hits = files_containing(relay.dir(), &OWNER.as_bytes()[1..]).expect("scan");
    assert!(!owner_hits.contains(&relay.log_path()), "phone number in the log");
    assert!(owner_hits.contains(&relay.code_file(&attack_request)));
    // The used code is gone; the attacker's code is only in its file; the PINs nowhere.
    assert_eq!(holding_number(&relay, &used_code), Vec::<std::path::PathBuf>::new());
    assert_eq!(holding_number(&relay, &attack_code), [relay.code_file(&attack_request)]);
    for pin in [PIN, WRONG_PIN] {
        assert!(files_containing(relay.dir(), pin.as_bytes()).expect("scan").is_empty(), "PIN {pin} written");
    }
}

#[tokio::test]
async fn the_webhook_verifier_posts_signed_codes_and_refuses_when_the_gateway_fails() {
    let gateway = Sink::start(b"sms gateway signing key 0123456789").await.expect("gateway");
    let relay = TestRelay::in_process_with(|c| {
        std::fs::create_dir_all(&c.data_dir).expect("data dir");
        std::fs::write(c.data_dir.join("webhook.secret"), gateway.secret()).expect("secret");
        c.registration.verifier = format!("webhook={}", gateway.url()).parse().expect("spec");
    })
    .await
    .expect("relay");
    let conn = relay_client::Connection::connect(relay.addr(), fingerprint(&relay)).await.expect("connect");
    let sent = conn.request_code(OWNER).await.expect("code sent");
    let attempts = gateway.wait_until(WAIT, |a| !a.is_empty()).await.expect("the gateway got the request");
    let sms = &attempts[0];
    assert!(sms.signature_ok, "Standard Webhooks signature verifies with the gateway's secret");
    assert_eq!(sms.id, format!("msg_{}", sent.request_id));
    assert_eq!(sms.body["phone"], OWNER);
    let expires = sms.body["expires_at"].as_str().expect("expires_at");
    assert_eq!(expires, relay_proto::time::rfc3339(sent.expires_at_ms));
    let the_code = sms.body["code"].as_str().expect("code").to_owned();
    assert_eq!(the_code.len(), 6);
    relay.unregistered_user(OWNER).expect("home").register(&code(&the_code)).await.expect("registered");

    gateway.set_failing(true);
    let err = conn.request_code(BOB).await.expect_err("the gateway answers 503");
    assert_eq!(err.code(), Some(ErrorCode::VerifierUnavailable));
    let attempts = gateway.wait_until(WAIT, |a| a.len() == 2).await.expect("second request");
    let undelivered = attempts[1].body["code"].as_str().expect("code").to_owned();
    let bob = relay.unregistered_user(BOB).expect("home");
    assert_eq!(refusal(bob.try_register(&code(&undelivered)).await).0, ErrorCode::CodeExpired, "nothing pending");
}

/// `relay register` without a code asks for one and, with no terminal to prompt on, exits 3 saying how to go on;
/// `--code-file` then registers; `relay set-pin` sets the lock.
#[tokio::test]
async fn the_cli_exits_3_without_a_code_and_registers_with_it() {
    let relay = TestRelay::verifying().await.expect("relay");
    let bin = relay_tests::binary_path("relay", "RELAY_BIN").expect("relay binary");
    let home = tempfile::tempdir().expect("home");
    let run = |args: &[&str]| {
        let mut c = tokio::process::Command::new(&bin);
        c.arg("--home").arg(home.path()).args(args).stdin(std::process::Stdio::null());
        c
    };
    let out = bounded("init", run(&["init", "--phone", OWNER]).output()).await.expect("init");
    assert!(out.status.success(), "{out:?}");
    let (server, cert) = (relay.addr().to_string(), relay.fingerprint().to_owned());
    let register = ["register", "--server", &server, "--cert-sha256", &cert];
    let out = bounded("register", run(&register).output()).await.expect("register");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("--code CODE") && stderr.contains("--code-file PATH"), "{stderr}");
    let request = stderr.split("request ").nth(1).and_then(|r| r.get(..32)).expect("the request id is shown");
    let (the_code, phone) = relay.code(request).expect("code file");
    assert_eq!(phone, OWNER);

    let code_file = home.path().join("code.txt");
    std::fs::write(&code_file, format!("{}-{}\n", &the_code[..3], &the_code[3..])).expect("write");
    let with_file = [&register[..], &["--code-file", code_file.to_str().expect("utf-8")]].concat();
    let out = bounded("register", run(&with_file).output()).await.expect("register");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = bounded("set-pin", run(&["set-pin", "--pin", "2468"]).output()).await.expect("set-pin");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("registration lock set"), "{out:?}");
}
