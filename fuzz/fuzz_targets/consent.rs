//! Consent statements (`relay_proto::consent`) over arbitrary bytes, and their Ed25519 signatures.
//!
//! Input: `time (8) ‖ key (32) ‖ signature (64) ‖ statement bytes`; shorter inputs are taken whole as statement
//! bytes. Checks: `decode` is `decode_stored` plus `validate`; whatever decodes re-encodes to the very same bytes
//! (one encoding per statement), and `signed_bytes`, `hash` and `in_force` are consistent with it. The signature is
//! checked as the relay (`verify_strict` over `signed_bytes`) and the exporter (`exporter::feed::verify`) do it, with
//! the arbitrary key and signature; then the statement is re-bound to the account of a key made from the input bytes,
//! signed, and must verify, and no longer verify once one bit of the signature is flipped.
#![no_main]

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use libfuzzer_sys::fuzz_target;
use relay_proto::AccountId;
use relay_proto::consent::{ConsentStatement, Decision};
use relay_proto::wire::ConsentChange;
use relay_exporter::feed;
use sha2::{Digest, Sha256};

const LABEL: &[u8] = b"consent-relay consent statement v1";

fn change(key: &[u8], account: &AccountId, statement: Vec<u8>, signature: &[u8]) -> ConsentChange {
    ConsentChange {
        cursor: 1,
        account_id: account.as_bytes().to_vec().into(),
        identity_key: key.to_vec().into(),
        statement: statement.into(),
        signature: signature.to_vec().into(),
        recorded_at_ms: 0,
        subject: None,
    }
}

fn check_statement(bytes: &[u8], now_ms: u64) -> Option<ConsentStatement> {
    let stored = ConsentStatement::decode_stored(bytes);
    let fresh = ConsentStatement::decode(bytes);
    match (&stored, &fresh) {
        (Ok(s), Ok(f)) => assert_eq!(s, f),
        (Ok(s), Err(e)) => assert_eq!(s.validate().err().as_ref(), Some(e), "decode = decode_stored + validate"),
        (Err(a), Err(b)) => assert_eq!(a, b),
        (Err(_), Ok(_)) => panic!("decode accepted what decode_stored refused"),
    }
    let s = stored.ok()?;
    let encoded = s.encode();
    assert_eq!(encoded, bytes, "canonical: a decoded statement re-encodes to its bytes");
    assert_eq!(ConsentStatement::decode_stored(&encoded).as_ref(), Ok(&s));
    assert_eq!(s.signed_bytes(), [LABEL, bytes].concat());
    assert_eq!(s.hash(), <[u8; 32]>::from(Sha256::digest(bytes)));
    // In force only under the notice it names, within its lifetime.
    let named = Some(&s.notice_hash);
    if s.in_force(now_ms, named) {
        assert!(s.decision == Decision::Grant && now_ms >= s.time_ms && s.validate().is_ok());
        assert!(s.expires_ms.is_none_or(|e| now_ms < e));
        assert!(s.names_notice(named).is_ok());
    }
    assert!(!s.in_force(now_ms, None), "no notice, nothing in force");
    let other = s.notice_hash.map(|b| !b);
    assert!(!s.in_force(now_ms, Some(&other)), "another notice, nothing in force");
    assert!(!s.in_force(s.time_ms.saturating_sub(1), named) || s.time_ms == 0);
    Some(s)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 + 32 + 64 {
        check_statement(data, 0);
        return;
    }
    let (now, rest) = data.split_at(8);
    let (key, rest) = rest.split_at(32);
    let (sig, bytes) = rest.split_at(64);
    let now_ms = u64::from_be_bytes(now.try_into().expect("8 bytes"));
    let key: [u8; 32] = key.try_into().expect("32 bytes");
    let sig: [u8; 64] = sig.try_into().expect("64 bytes");

    let Some(statement) = check_statement(bytes, now_ms) else {
        return;
    };

    // Arbitrary key and signature, as the relay checks them.
    if let Ok(vk) = VerifyingKey::from_bytes(&key) {
        let _ = vk.verify_strict(&statement.signed_bytes(), &Signature::from_bytes(&sig));
    }
    // ... and as the exporter checks a change read from the relay.
    let derived = AccountId::from_identity_key(&key);
    let verdict = feed::verify(&change(&key, &statement.account, bytes.to_vec(), &sig));
    if statement.account != derived {
        assert!(verdict.is_err(), "a statement for another account must be refused");
    }

    // A genuine signature by a key made from the input, over the statement re-bound to that key's account.
    let signer = SigningKey::from_bytes(&key);
    let public = signer.verifying_key().to_bytes();
    let mine = ConsentStatement { account: AccountId::from_identity_key(&public), ..statement };
    let signature = signer.sign(&mine.signed_bytes()).to_bytes();
    let good = change(&public, &mine.account, mine.encode(), &signature);
    assert_eq!(feed::verify(&good), Ok(mine.clone()), "a genuine signature must verify");
    let bit = usize::from(sig[0]) % (64 * 8);
    let mut forged = signature;
    forged[bit / 8] ^= 1 << (bit % 8);
    assert!(feed::verify(&change(&public, &mine.account, mine.encode(), &forged)).is_err(), "bit {bit}");
    // The genuine signature does not carry over to a statement changed in one byte of its encoding.
    let mut altered = mine.encode();
    let at = usize::from(sig[1]) % altered.len();
    altered[at] ^= 1 << (sig[2] % 8);
    assert!(feed::verify(&change(&public, &mine.account, altered, &signature)).is_err(), "byte {at}");
});
