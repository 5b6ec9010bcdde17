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
    let alice = relay.user("+33612345678").await.expect("alice");
    let m = &alice.messenger;
    assert!(m.consent_state().await.expect("show").is_empty(), "default: nothing granted");

    let r = m.decide_consent("adsco", "advertising", Decision::Grant, Some(30)).await.expect("grant");
    assert_eq!((r.affiliate.as_str(), r.purpose.as_str(), r.decision.as_str()), ("adsco", "advertising", "grant"));
    assert_eq!(r.notice_hash, hex::encode(Purpose::Advertising.notice().hash()));
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

fn statement(account: relay_proto::AccountId, sequence: u64, decision: Decision) -> ConsentStatement {
    ConsentStatement {
        account,
        affiliate: "adsco".into(),
        purpose: Purpose::Advertising,
        decision,
        notice_hash: Purpose::Advertising.notice().hash(),
        sequence,
        time_ms: relay_proto::now_ms(),
        expires_ms: None,
    }
}

#[tokio::test]
async fn the_relay_accepts_only_the_accounts_own_fresh_signed_statements() {
    let relay = TestRelay::in_process().await.expect("relay");
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
                bob.messenger.decide_consent("adsco", "security", Decision::Grant, None).await.expect("grant");
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
