//! The consent registry over a real relay: default deny, per-(affiliate, purpose) grants, withdrawal, reject-all,
//! signatures the relay checks and cannot make, replay refused, one user unable to touch another's consent, and
//! messaging unaffected by any consent state.

use relay_proto::ErrorCode;
use relay_proto::consent::{ConsentStatement, Decision, Purpose};
use relay_tests::TestRelay;

fn states(pairs: &[relay_client::consent::PairState]) -> Vec<(String, String, String)> {
    let mut v: Vec<_> = pairs.iter().map(|p| (p.affiliate.clone(), p.purpose.clone(), p.status.clone())).collect();
    v.sort();
    v
}

fn own(a: &str, p: &str, s: &str) -> (String, String, String) {
    (a.to_owned(), p.to_owned(), s.to_owned())
}

#[tokio::test]
async fn grants_are_specific_withdrawable_and_off_by_default() {
    let relay = TestRelay::in_process().await.expect("relay");
    relay.publish_test_notices().await.expect("notices");
    let alice = relay.user("+33612345678").await.expect("alice");
    let m = &alice.messenger;
    assert!(m.consent_state().await.expect("show").is_empty(), "default: nothing granted");

    let r = m.decide_consent("adsco", "advertising", Decision::Grant, Some(30)).await.expect("grant");
    assert_eq!((r.affiliate.as_str(), r.purpose.as_str(), r.decision.as_str()), ("adsco", "advertising", "grant"));
    assert_eq!(r.notice_hash, hex::encode(adsco_advertising_notice()));
    assert!(r.notice.contains("recipient: AdsCo SAS") && r.notice.contains("fields: phone_pseudonym, device_model"));
    assert!(r.expires_at.is_some());
    m.decide_consent("metrico", "analytics", Decision::Grant, None).await.expect("grant");
    // Granting (adsco, advertising) says nothing about (adsco, analytics) or (otherco, advertising).
    assert_eq!(
        states(&m.consent_state().await.expect("show")),
        [own("adsco", "advertising", "granted"), own("metrico", "analytics", "granted")]
    );

    m.decide_consent("adsco", "advertising", Decision::Withdraw, None).await.expect("withdraw");
    assert_eq!(
        states(&m.consent_state().await.expect("show")),
        [own("adsco", "advertising", "withdrawn"), own("metrico", "analytics", "granted")]
    );
    let withdrawn = m.reject_all_consent().await.expect("reject all");
    assert_eq!(withdrawn.len(), 1, "only what was still granted");
    assert!(m.consent_state().await.expect("show").iter().all(|p| p.status == "withdrawn" && !p.in_force));
    let receipts: Vec<relay_client::consent::Receipt> = alice.home.load_private("receipts.json").expect("receipts");
    assert_eq!(receipts.len(), 4, "a receipt for every decision");

    let err = m.decide_consent("adsco", "business intelligence", Decision::Grant, None).await.expect_err("unknown");
    assert!(err.to_string().contains("unknown purpose"), "{err}");
}

fn adsco_advertising_notice() -> [u8; 32] {
    let catalogue = relay_exporter::Catalogue::parse(&relay_tests::test_catalogue()).expect("catalogue");
    catalogue.notice("adsco", Purpose::Advertising).expect("a notice").hash
}

fn statement(account: relay_proto::AccountId, sequence: u64, decision: Decision) -> ConsentStatement {
    ConsentStatement {
        account,
        affiliate: "adsco".into(),
        purpose: Purpose::Advertising,
        decision,
        notice_hash: match decision {
            Decision::Grant => adsco_advertising_notice(),
            Decision::Withdraw | Decision::Object | Decision::Lift => [0; 32],
        },
        sequence,
        time_ms: relay_proto::now_ms(),
        expires_ms: None,
    }
}

#[tokio::test]
async fn the_relay_accepts_only_the_accounts_own_fresh_signed_statements() {
    let relay = TestRelay::in_process().await.expect("relay");
    relay.publish_test_notices().await.expect("notices");
    let (bob, bob_id) = relay.raw_user("+33698765432").await.expect("bob");
    let (eve, eve_id) = relay.raw_user("+33655555555").await.expect("eve");
    let sign = |id: &relay_client::Identity, s: &ConsentStatement| id.sign(&s.signed_bytes());

    // Bob grants, then withdraws.
    let grant = statement(bob_id.account_id(), 1, Decision::Grant);
    bob.put_consent(grant.encode(), sign(&bob_id, &grant)).await.expect("grant");
    let withdraw = statement(bob_id.account_id(), 2, Decision::Withdraw);
    bob.put_consent(withdraw.encode(), sign(&bob_id, &withdraw)).await.expect("withdraw");

    // Replaying Bob's old grant (its sequence is not above the last) does not bring it back.
    let err = bob.put_consent(grant.encode(), sign(&bob_id, &grant)).await.expect_err("replay");
    assert_eq!(err.code(), Some(ErrorCode::ConsentRejected), "{err}");
    // Eve cannot record a statement for Bob: not signed by him, nor his own replayed on her connection.
    let forged = statement(bob_id.account_id(), 3, Decision::Grant);
    let err = eve.put_consent(forged.encode(), sign(&eve_id, &forged)).await.expect_err("forged");
    assert_eq!(err.code(), Some(ErrorCode::ConsentRejected));
    let err = eve.put_consent(forged.encode(), sign(&bob_id, &forged)).await.expect_err("other account");
    assert_eq!(err.code(), Some(ErrorCode::ConsentRejected));
    // Bob's own connection refuses a statement whose signature does not match it.
    let err = bob.put_consent(forged.encode(), sign(&eve_id, &forged)).await.expect_err("bad signature");
    assert_eq!(err.code(), Some(ErrorCode::ConsentRejected));
    // A grant under an outdated notice is refused.
    let stale = ConsentStatement { notice_hash: [7; 32], ..statement(bob_id.account_id(), 4, Decision::Grant) };
    let err = bob.put_consent(stale.encode(), sign(&bob_id, &stale)).await.expect_err("stale notice");
    assert_eq!(err.code(), Some(ErrorCode::ConsentRejected));
    // Garbage is refused, not stored.
    let err = bob.put_consent(vec![1, 2, 3], [0; 64]).await.expect_err("garbage");
    assert_eq!(err.code(), Some(ErrorCode::ConsentRejected));

    let list = bob.list_consent().await.expect("list");
    assert_eq!(list.last_sequence, 2);
    assert_eq!(list.latest.len(), 1);
    let latest = ConsentStatement::decode_stored(&list.latest[0].statement).expect("decode");
    assert_eq!(latest.decision, Decision::Withdraw, "the withdrawal stands");
    assert!(eve.list_consent().await.expect("list").latest.is_empty(), "eve sees only her own (none)");
}

/// Messaging works the same whatever the consent state.
#[tokio::test]
async fn messaging_does_not_depend_on_consent() {
    let relay = TestRelay::in_process().await.expect("relay");
    relay.publish_test_notices().await.expect("notices");
    let mut alice = relay.user("+33612345678").await.expect("alice");
    let mut bob = relay.user("+33698765432").await.expect("bob");
    for (i, step) in ["none", "granted", "withdrawn", "rejected all"].iter().enumerate() {
        match i {
            1 => {
                alice.messenger.decide_consent("adsco", "advertising", Decision::Grant, None).await.expect("grant");
            }
            2 => {
                alice.messenger.decide_consent("adsco", "advertising", Decision::Withdraw, None).await.expect("w");
            }
            3 => {
                bob.messenger.decide_consent("shieldco", "security", Decision::Grant, None).await.expect("grant");
                bob.messenger.reject_all_consent().await.expect("reject all");
            }
            _ => {}
        }
        alice.messenger.send_text("+33698765432", &format!("consent {step}")).await.expect("send");
        let got = bob.messenger.receive(1, crate::WAIT).await.expect("receive");
        assert_eq!(got[0].text, format!("consent {step}"));
        bob.messenger.send_text("+33612345678", "ok").await.expect("reply");
        assert_eq!(alice.messenger.receive(1, crate::WAIT).await.expect("receive")[0].text, "ok");
    }
}

/// The next statement number is computed from what the relay reports; at `u64::MAX` there is none, and the client
/// says so instead of overflowing.
#[tokio::test]
async fn a_consent_sequence_at_its_maximum_is_refused_cleanly() {
    let relay = TestRelay::in_process().await.expect("relay");
    relay.publish_test_notices().await.expect("notices");
    let alice = relay.user("+33612345678").await.expect("alice");
    let identity = alice.home.identity().expect("keys");
    let last = statement(identity.account_id(), u64::MAX, Decision::Grant);
    let conn = alice.messenger.connection();
    conn.put_consent(last.encode(), identity.sign(&last.signed_bytes())).await.expect("the relay records it");
    assert_eq!(conn.list_consent().await.expect("list").last_sequence, u64::MAX);

    let err = alice
        .messenger
        .decide_consent("adsco", "advertising", Decision::Withdraw, None)
        .await
        .expect_err("no sequence number is left");
    assert!(err.to_string().contains("sequence"), "the error says why: {err}");
    // Nothing was recorded and the connection still works.
    assert_eq!(conn.list_consent().await.expect("list").last_sequence, u64::MAX);
}

/// Consent covers exactly what leaves. Before the exporter published a notice for a pair nothing can be granted for
/// it; a grant signs the document shown, which names the recipient, its country, the exact fields and the retention;
/// when the operator changes what the affiliate receives, the exporter publishes a new notice and the earlier grant
/// stops being in force (the user sees "notice changed") until the user grants under the new one. Every version
/// stays readable by its hash.
#[tokio::test]
async fn a_grant_signs_the_notice_shown_and_a_change_of_terms_voids_it() {
    let relay = TestRelay::in_process().await.expect("relay");
    let alice = relay.user("+33612345678").await.expect("alice");
    let m = &alice.messenger;

    // No notice published: nothing can be granted, and the error says why.
    let err = m.decide_consent("adsco", "advertising", Decision::Grant, None).await.expect_err("no notice");
    assert!(err.to_string().contains("no notice is published"), "{err}");
    let identity = alice.home.identity().expect("keys");
    let blind = ConsentStatement { notice_hash: [7; 32], ..statement(identity.account_id(), 1, Decision::Grant) };
    let err = m.connection().put_consent(blind.encode(), identity.sign(&blind.signed_bytes())).await.expect_err("x");
    assert_eq!(err.code(), Some(ErrorCode::ConsentRejected), "{err}");

    let catalogue = relay_tests::test_catalogue();
    relay.publish_notices(&notices_of(&catalogue)).await.expect("publish");
    let shown = m.notice("adsco", "advertising").await.expect("the notice");
    for term in ["recipient: AdsCo SAS", "country: FR", "fields: phone_pseudonym, device_model", "until withdrawn"] {
        assert!(shown.document.contains(term), "{term} in {}", shown.document);
    }
    assert!(m.notice("adsco", "security").await.is_err(), "adsco receives nothing for security: no notice");
    let receipt = m.grant_consent(&shown, None).await.expect("grant");
    assert_eq!(
        (receipt.notice_hash.clone(), receipt.notice.clone()),
        (hex::encode(shown.hash), shown.document.clone())
    );
    assert_eq!(states(&m.consent_state().await.expect("show")), [own("adsco", "advertising", "granted")]);

    // The operator adds the raw phone number to AdsCo's advertising fields: a new notice (version 2).
    let widened = catalogue.replace(
        r#"advertising = ["phone_pseudonym", "device_model"]"#,
        r#"advertising = ["phone", "phone_pseudonym", "device_model"]"#,
    );
    let mut v2 = relay_exporter::Catalogue::parse(&widened).expect("catalogue");
    let bumped: Vec<_> = v2
        .notice_terms()
        .into_iter()
        .map(|n| {
            if n.affiliate == "adsco" && n.purpose == Purpose::Advertising {
                relay_proto::notice::Notice { version: 2, ..n }
            } else {
                n
            }
        })
        .collect();
    v2.set_notices(bumped).expect("versions");
    relay.publish_notices(&v2.notices().map(|n| n.document.clone()).collect::<Vec<_>>()).await.expect("publish");
    let pairs = m.consent_state().await.expect("show");
    assert_eq!(states(&pairs), [own("adsco", "advertising", "notice changed")]);
    assert!(!pairs[0].in_force);
    // The old grant's notice is still there to read, by hash; the new one names the phone number.
    let old = m.connection().get_notice("adsco", "advertising", Some(shown.hash)).await.expect("by hash");
    assert_eq!(old, shown.document.as_bytes());
    let new = m.notice("adsco", "advertising").await.expect("the new notice");
    assert!(
        new.document.contains("version: 2") && new.document.contains("fields: phone, phone_pseudonym"),
        "{}",
        new.document
    );
    // The old notice cannot be granted any more; the new one can.
    let err = m.grant_consent(&shown, None).await.expect_err("old notice");
    assert!(err.to_string().contains("has changed"), "{err}");
    m.grant_consent(&new, None).await.expect("grant under the new notice");
    assert_eq!(states(&m.consent_state().await.expect("show")), [own("adsco", "advertising", "granted")]);
}

fn notices_of(catalogue: &str) -> Vec<Vec<u8>> {
    let c = relay_exporter::Catalogue::parse(catalogue).expect("catalogue");
    c.notices().map(|n| n.document.clone()).collect()
}

/// `relay consent grant` prints the notice and signs only once `yes` is typed: anything else (or nothing) exits 1
/// with nothing recorded. `consent notice --json` prints the document and its hash.
#[tokio::test]
async fn the_cli_shows_the_notice_and_signs_only_after_yes() {
    let relay = TestRelay::in_process().await.expect("relay");
    relay.publish_test_notices().await.expect("notices");
    let alice = relay.user("+33612345678").await.expect("alice");
    let home = alice.home_dir().to_owned();
    let run = |args: &'static [&'static str], typed: &'static str| {
        let home = home.clone();
        async move {
            crate::bounded("relay consent", relay_tests::relay_cli_typing(&home, args, typed)).await.expect("run relay")
        }
    };
    let grant: &[&str] = &["consent", "grant", "--affiliate", "adsco", "--purpose", "advertising"];

    let out = run(&["consent", "notice", "--affiliate", "adsco", "--purpose", "advertising", "--json"], "").await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let document = shown["document"].as_str().expect("document");
    assert!(document.starts_with("consent-relay notice v2\nversion: 1\naffiliate: adsco\n"), "{document}");
    assert_eq!(shown["hash"], hex::encode(relay_proto::notice::notice_hash(document.as_bytes())));

    for typed in ["no\n", "", "y\n"] {
        let out = run(grant, typed).await;
        assert_eq!(out.status.code(), Some(1), "typed {typed:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("recipient: AdsCo SAS") && stdout.contains("notice hash: "), "shown first: {stdout}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("not granted: nothing was signed"));
    }
    assert_eq!(alice.messenger.connection().list_consent().await.expect("list").last_sequence, 0, "nothing recorded");

    let out = run(grant, "yes\n").await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("grant: adsco for advertising (statement 1"));
    let receipts: Vec<relay_client::consent::Receipt> = alice.home.load_private("receipts.json").expect("receipts");
    assert_eq!(receipts.last().map(|r| r.notice.as_str()), Some(document), "the receipt keeps the document signed");
}

/// `consent history` returns every decision, each signature checked on the device; a relay that drops, alters,
/// reorders or repeats a statement makes it an error, not a shorter list. `data export` writes one owner-only JSON
/// document with the profile, the history, the receipts and the verified exports.
#[tokio::test]
async fn the_history_is_every_signed_decision_and_the_data_export_carries_it() {
    let relay = TestRelay::in_process().await.expect("relay");
    relay.publish_test_notices().await.expect("notices");
    let alice = relay.user("+33612345678").await.expect("alice");
    let m = &alice.messenger;
    m.decide_consent("adsco", "advertising", Decision::Grant, None).await.expect("grant");
    m.decide_consent("adsco", "advertising", Decision::Withdraw, None).await.expect("withdraw");
    m.decide_consent("shieldco", "security", Decision::Grant, Some(30)).await.expect("grant");
    let history = m.consent_history().await.expect("history");
    let got: Vec<_> = history.iter().map(|h| (h.sequence, h.decision.as_str(), h.affiliate.as_str())).collect();
    assert_eq!(got, [(1, "grant", "adsco"), (2, "withdraw", "adsco"), (3, "grant", "shieldco")]);
    let receipts: Vec<relay_client::consent::Receipt> = alice.home.load_private("receipts.json").expect("receipts");
    for (h, r) in history.iter().zip(&receipts) {
        assert_eq!((h.statement_hash.as_str(), h.statement.as_str()), (r.receipt_id.as_str(), r.statement.as_str()));
    }

    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("alice.json");
    let bin = relay_tests::binary_path("relay", "RELAY_BIN").expect("the relay binary");
    let out = crate::bounded(
        "relay data export",
        tokio::process::Command::new(&bin)
            .arg("--home")
            .arg(alice.home_dir())
            .arg("data")
            .arg("export")
            .arg(&file)
            .output(),
    )
    .await
    .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&file).expect("written").permissions().mode() & 0o777, 0o600);
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).expect("read")).expect("JSON");
    assert_eq!(doc["format"], relay_client::subject::DATA_EXPORT_FORMAT);
    assert_eq!(
        (doc["phone"].as_str(), doc["account_id"].as_str()),
        (Some("+33612345678"), Some(m.account_id().to_string().as_str()))
    );
    assert_eq!(doc["consent_history"].as_array().map(Vec::len), Some(3));
    assert_eq!(doc["receipts"].as_array().map(Vec::len), Some(3));
    assert!(doc["receipts"][0]["notice"].as_str().is_some_and(|n| n.contains("recipient: AdsCo SAS")));
    assert!(doc["exports"]["problems"].as_array().is_some_and(Vec::is_empty), "{}", doc["exports"]);

    // A lying relay: each rewrite of the history pages is refused as a whole.
    let tamper = relay.tamper().expect("in-process");
    type Page = Vec<(Vec<u8>, Vec<u8>, u64)>;
    type Lie = fn(Page) -> Page;
    let lies: [(&str, Lie); 4] = [
        ("drop the withdrawal", |mut p| {
            p.remove(1);
            p
        }),
        ("alter a byte of a statement", |mut p| {
            p[0].0[20] ^= 1;
            p
        }),
        ("reorder", |mut p| {
            p.swap(0, 2);
            p
        }),
        ("repeat one", |mut p| {
            let first = p[0].clone();
            p.push(first);
            p
        }),
    ];
    for (what, lie) in lies {
        tamper.rewrite_history(std::sync::Arc::new(lie));
        match m.consent_history().await {
            Err(e) => assert!(e.to_string().contains("does not check"), "{what}: {e}"),
            Ok(h) => panic!("{what}: accepted {} entries", h.len()),
        }
    }
}

/// `relay consent object --purpose P` withdraws every grant of the purpose, then objects: no grant for it can be
/// recorded while the objection stands; `--lift` lets new grants count again (not the old ones).
#[tokio::test]
async fn an_objection_withdraws_the_purpose_and_refuses_grants_until_lifted() {
    let relay = TestRelay::in_process().await.expect("relay");
    relay.publish_test_notices().await.expect("notices");
    let alice = relay.user("+33612345678").await.expect("alice");
    let m = &alice.messenger;
    m.decide_consent("adsco", "analytics", Decision::Grant, None).await.expect("grant");
    m.decide_consent("metrico", "analytics", Decision::Grant, None).await.expect("grant");
    m.decide_consent("adsco", "advertising", Decision::Grant, None).await.expect("grant");

    let receipts = m.object_to_purpose("analytics", false).await.expect("object");
    let decisions: Vec<_> = receipts.iter().map(|r| (r.decision.as_str(), r.affiliate.as_str())).collect();
    assert_eq!(decisions, [("withdraw", "adsco"), ("withdraw", "metrico"), ("object", "")]);
    assert_eq!(
        states(&m.consent_state().await.expect("show")),
        [
            own("*", "analytics", "objected"),
            own("adsco", "advertising", "granted"),
            own("adsco", "analytics", "withdrawn"),
            own("metrico", "analytics", "withdrawn")
        ]
    );
    let err = m.decide_consent("metrico", "analytics", Decision::Grant, None).await.expect_err("objected");
    assert!(err.to_string().contains("you object to analytics"), "{err}");
    // A purpose-level statement naming an affiliate is malformed, whoever signs it.
    let identity = alice.home.identity().expect("keys");
    let next = m.connection().list_consent().await.expect("list").last_sequence + 1;
    let bad = ConsentStatement {
        decision: Decision::Lift,
        notice_hash: [0; 32],
        ..statement(identity.account_id(), next, Decision::Grant)
    };
    let err = m.connection().put_consent(bad.encode(), identity.sign(&bad.signed_bytes())).await.expect_err("bad");
    assert_eq!(err.code(), Some(ErrorCode::ConsentRejected));

    m.object_to_purpose("analytics", true).await.expect("lift");
    m.decide_consent("metrico", "analytics", Decision::Grant, None).await.expect("grant after the lift");
    let after: Vec<_> = states(&m.consent_state().await.expect("show"));
    assert!(after.contains(&own("metrico", "analytics", "granted")), "{after:?}");
    assert!(after.contains(&own("*", "analytics", "objection lifted")), "{after:?}");
}
