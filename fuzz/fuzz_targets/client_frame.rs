//! Every message the relay decodes from the network, and what it then parses out of the fields.
//!
//! The input is a frame body: it is decoded as a `ClientFrame` (messaging endpoint) and as an `ExportRequest` (export
//! interface), with prost directly and through `frame::decode_body`, which must agree. Each decoded request is then
//! taken apart the way the relay's handlers do it (`server/src/session/`, `server/src/export/handler.rs`): account
//! ids, E.164 phone numbers, verification codes and registration-lock PINs, keys and signatures of fixed length,
//! transcripts, the sealing-key binding, consent statements, purposes and affiliate ids, export-log publications. The
//! raw input is also fed to the string and slice parsers directly, and to the sender-certificate decoder clients run
//! on what arrives in envelopes.
//! Nothing may panic. Both matches list every request type without a wildcard, so a new request type breaks the
//! build of this target until it is handled here (CI builds every target).
#![no_main]

use ed25519_dalek::{Signature, VerifyingKey};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use relay_proto::auth::{self, KEY_LEN};
use relay_proto::consent::{self, ConsentStatement, Purpose};
use relay_proto::frame;
use relay_proto::identity::{self, SenderCertificate};
use relay_proto::merkle;
use relay_proto::phone::{MAX_DIGITS, MIN_DIGITS};
use relay_proto::verification::{RegistrationPin, VerificationCode};
use relay_proto::wire::{
    ClientFrame, DeviceInfo, ExportRequest, client_frame::Body as Req, export_request::Body as ExportReq,
};
use relay_proto::{AccountId, PhoneNumber};

fn phone(s: &str) {
    if let Ok(p) = PhoneNumber::parse(s) {
        assert_eq!(p.as_str(), s);
        let digits = &s[1..];
        assert!(s.starts_with('+') && (MIN_DIGITS..=MAX_DIGITS).contains(&digits.len()));
        assert!(digits.bytes().all(|b| b.is_ascii_digit()) && !digits.starts_with('0'));
        assert!(!format!("{p:?}").contains(digits), "Debug must not print the number");
    }
    // The numbering-plan check accepts a subset of the syntax check, exactly as written.
    if let Ok(p) = PhoneNumber::parse_valid(s) {
        assert_eq!(p.as_str(), s);
        assert!(PhoneNumber::parse(s).is_ok());
    }
}

fn account(bytes: &[u8]) -> Option<AccountId> {
    let id = AccountId::from_slice(bytes);
    assert_eq!(id.is_some(), bytes.len() == auth::ACCOUNT_ID_LEN);
    if let Some(id) = id {
        assert_eq!(id.as_bytes(), bytes);
        assert_eq!(AccountId::from_hex(&id.to_string()), Some(id));
    }
    id
}

/// The relay's signature check: a 32-byte key, a 64-byte signature, `verify_strict`.
fn verify(identity_key: &[u8], message: &[u8], signature: &[u8]) {
    let Ok(key) = <[u8; KEY_LEN]>::try_from(identity_key) else { return };
    let Ok(key) = VerifyingKey::from_bytes(&key) else { return };
    let Ok(sig) = Signature::from_slice(signature) else { return };
    let _ = key.verify_strict(message, &sig);
}

fn statement(bytes: &[u8]) {
    if let Ok(s) = ConsentStatement::decode(bytes) {
        assert_eq!(s.encode(), bytes, "an accepted statement has one encoding");
        let _ = (s.signed_bytes(), s.hash());
    }
}

/// A verification code is accepted only as exactly six ASCII digits, given back unchanged.
fn code(s: &str) {
    if let Ok(c) = VerificationCode::parse(s) {
        assert!(s.len() == 6 && s.bytes().all(|b| b.is_ascii_digit()) && c.as_str() == s);
    }
}

/// A PIN is accepted only within its length bounds, without control characters, unchanged.
fn pin(s: &str) {
    if let Ok(p) = RegistrationPin::parse(s) {
        assert!((4..=64).contains(&s.len()) && !s.chars().any(char::is_control) && p.as_str() == s);
    }
}

fn device_ok(d: &DeviceInfo) -> bool {
    [&d.model, &d.os, &d.app_version].iter().all(|v| v.len() <= 64 && !v.chars().any(char::is_control))
}

fn client_frame(f: ClientFrame) {
    let ekm = [0x5a; auth::EKM_LEN];
    match f.body {
        Some(Req::Register(r)) => {
            phone(&r.phone);
            let device = r.device.unwrap_or_default();
            let _ = device_ok(&device);
            if let (Ok(ik), Ok(sk), Ok(p)) = (
                <[u8; KEY_LEN]>::try_from(r.identity_key.as_ref()),
                <[u8; KEY_LEN]>::try_from(r.sealing_key.as_ref()),
                PhoneNumber::parse(&r.phone),
            ) {
                let transcript = auth::register_transcript(&ekm, &ik, &sk, p.as_str(), &device);
                verify(&ik, &transcript, &r.signature);
                let _ = identity::verify_binding(&ik, &sk, &r.sealing_key_signature);
                let _ = AccountId::from_identity_key(&ik);
            }
            code(&r.code);
            pin(&r.registration_lock_pin);
        }
        Some(Req::RequestCode(c)) => phone(&c.phone),
        Some(Req::SetRegistrationLock(l)) => pin(&l.pin),
        Some(Req::Auth(a)) => {
            if let Some(id) = account(&a.account_id) {
                let _ = auth::auth_transcript(&ekm, &id);
            }
            let _ = Signature::from_slice(&a.signature);
        }
        Some(Req::Lookup(l)) => phone(&l.phone),
        Some(Req::Send(s)) => {
            account(&s.recipient);
        }
        Some(Req::SealedSend(s)) => {
            account(&s.recipient);
            let _ = auth::sha256(&s.access_key);
        }
        Some(Req::FetchBundle(b)) => {
            account(&b.account_id);
        }
        Some(Req::PutConsent(c)) => {
            statement(&c.statement);
            let _ = <[u8; 64]>::try_from(c.signature.as_ref());
        }
        Some(Req::UploadPrekeys(u)) => {
            let _ = u.one_time_prekeys.len() + u.kem_prekeys.len();
        }
        Some(Req::Ack(a)) => {
            let _ = a.server_ids.len();
        }
        Some(Req::SetAccessKey(k)) => {
            let _ = <[u8; 32]>::try_from(k.verifier.as_ref());
        }
        Some(Req::GetNotice(n)) => {
            pair(&[], &n.affiliate, &n.purpose);
            let _ = <[u8; 32]>::try_from(n.hash.as_ref());
        }
        Some(Req::PipelinedSend(p)) => {
            // As the pipelined stream takes a frame apart (server/src/session/pipeline.rs): the send it carries.
            let _ = p.seq;
            if let Some(s) = &p.send {
                account(&s.recipient);
            }
            if let Some(s) = &p.sealed {
                account(&s.recipient);
                let _ = auth::sha256(&s.access_key);
            }
        }
        // No fields: it only switches the stream into pipelined mode.
        Some(Req::OpenSendStream(_)) => {}
        Some(Req::DeleteAccount(d)) => {
            // As the relay checks it (server/src/session/account.rs) and the exporter takes the transcript apart.
            let transcript = auth::delete_transcript(&ekm, &AccountId([0x11; 16]));
            assert!(auth::parse_delete_transcript(&transcript).is_some());
            let _ = auth::parse_delete_transcript(&d.signature);
            let _ = Signature::from_slice(&d.signature);
        }
        // Bare integers, nothing to take apart; listed so that a new request type fails to compile here.
        Some(
            Req::Subscribe(_)
            | Req::ListConsent(_)
            | Req::ConsentHistory(_)
            | Req::ListExports(_)
            | Req::GetSenderCertificate(_),
        )
        | None => {}
    }
}

fn pair(account_id: &[u8], affiliate: &str, purpose: &str) {
    account(account_id);
    if let Some(p) = Purpose::parse(purpose) {
        assert_eq!(p.as_str(), purpose);
    }
    if consent::valid_affiliate_id(affiliate) {
        assert!(!affiliate.is_empty() && affiliate.len() <= consent::MAX_AFFILIATE_LEN);
    }
}

fn export_request(r: ExportRequest) {
    match r.body {
        Some(ExportReq::BeginExport(b)) => {
            pair(&b.account_id, &b.affiliate, &b.purpose);
            let _ = <[u8; 32]>::try_from(b.statement_hash.as_ref());
        }
        Some(ExportReq::EndExport(e)) => pair(&e.account_id, &e.affiliate, &e.purpose),
        Some(ExportReq::PublishNotices(p)) => {
            // As the relay's notice store takes each document apart (server/src/store/notices.rs).
            for d in &p.documents {
                if let Ok(n) = relay_proto::notice::Notice::decode(d) {
                    assert_eq!(n.encode().as_deref(), Ok(d.as_ref()));
                }
            }
        }
        Some(ExportReq::PublishLog(p)) => {
            // As the relay takes a publication apart (server/src/export/handler.rs, store/exportlog.rs).
            let _ = merkle::log_key_from_wire(&p.log_key);
            if let Some(head) = &p.head {
                let _ = merkle::SignedTreeHead::try_from(head);
            }
            for e in &p.entries {
                account(&e.account_id);
                if let Ok(leaf) = merkle::ExportLeaf::decode(&e.leaf) {
                    let _ = (leaf.check(), leaf.leaf_hash());
                }
            }
        }
        // Cursors and counts only, nothing to take apart (the relay bounds `max_entries` itself); listed so that a
        // new request type fails to compile here.
        Some(
            ExportReq::ConsentChanges(_)
            | ExportReq::SubjectChanges(_)
            | ExportReq::ReadLog(_)
            | ExportReq::ErasureChanges(_),
        )
        | None => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let direct = ClientFrame::decode(data);
    let framed = frame::decode_body::<ClientFrame>(data);
    assert_eq!(direct.as_ref().ok(), framed.as_ref().ok());
    if let Ok(f) = direct {
        client_frame(f);
    }

    let direct = ExportRequest::decode(data);
    let framed = frame::decode_body::<ExportRequest>(data);
    assert_eq!(direct.as_ref().ok(), framed.as_ref().ok());
    if let Ok(r) = direct {
        export_request(r);
    }

    // The field parsers on the raw bytes too.
    account(data);
    statement(data);
    if let Ok(c) = SenderCertificate::decode(data) {
        assert_eq!(c.encode(), data, "an accepted certificate has one encoding");
        assert_eq!(AccountId::from_identity_key(&c.identity_key), c.account);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        phone(s);
        pair(&[], s, s);
        code(s);
        pin(s);
    }
});
