//! One-time codes: drawing them, the keyed hashes under which the store knows a phone number and a code, and the
//! rules of a pending request (expiry, attempts) as a pure state machine: the time and whether the code matched go
//! in, the answer and the state to keep come out.
//!
//! Contract: a code is drawn uniformly from 000000–999999 with the thread's CSPRNG; the store never holds a code or
//! a phone number, only HMAC-SHA256 tags under the relay's verification key (`<data_dir>/verification.key`, 0600),
//! so a copy of the store without the key reveals neither (a plain hash of a 6-digit code or of a phone number
//! would be reversed by trying them all). A code is compared by recomputing its tag and checking it against the
//! stored one in constant time (`ring::hmac::verify`).

use std::fmt;
use std::path::Path;

use rand::RngExt;
use relay_proto::PhoneNumber;
use relay_proto::verification::{CODE_ATTEMPTS, CODE_TTL_MS, VerificationCode};
use ring::hmac;

/// Length of a request id.
pub const REQUEST_ID_LEN: usize = 16;
/// Length of an HMAC-SHA256 tag.
pub const TAG_LEN: usize = 32;
/// File name of the verification key in the data directory.
pub const KEY_FILE: &str = "verification.key";

const PHONE_LABEL: &[u8] = b"consent-relay verification phone v1\0";
const CODE_LABEL: &[u8] = b"consent-relay verification code v1\0";

/// A code request's random id: names the code file (`file` verifier) and the webhook id; carries nothing else.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId(pub [u8; REQUEST_ID_LEN]);

impl RequestId {
    /// A fresh random id.
    pub fn random() -> Self {
        Self(rand::random())
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({self})")
    }
}

/// The store's name for a phone number: its tag under the verification key. Also the key of the per-number rate
/// limit, so that the relay's memory holds no phone number either.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PhoneTag(pub [u8; TAG_LEN]);

/// A fresh code, uniform over the 10^6 possible ones.
pub fn draw_code() -> VerificationCode {
    let n = rand::rng().random_range(0..1_000_000u32);
    // The range above is exactly the numbers `from_number` accepts.
    VerificationCode::from_number(n).unwrap_or_else(|| unreachable!("{n} is below 10^6"))
}

/// The relay's HMAC key for phone and code tags.
pub struct CodeKey(hmac::Key);

impl CodeKey {
    /// Loads `<data_dir>/verification.key`, creating a random one (mode 0600) the first time.
    pub fn load_or_create(data_dir: &Path) -> std::io::Result<Self> {
        let path = data_dir.join(KEY_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key: [u8; 32] = rand::random();
                relay_quic::durable_file::create_secret(&path, &key)?;
                key.to_vec()
            }
            Err(e) => return Err(e),
        };
        if bytes.len() != 32 {
            return Err(std::io::Error::other(format!("{} must hold 32 bytes", path.display())));
        }
        Ok(Self::from_bytes(&bytes))
    }

    /// A key from its bytes.
    pub fn from_bytes(key: &[u8]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, key))
    }

    /// The tag of `phone`.
    pub fn phone_tag(&self, phone: &PhoneNumber) -> PhoneTag {
        let mut ctx = hmac::Context::with_key(&self.0);
        ctx.update(PHONE_LABEL);
        ctx.update(phone.as_str().as_bytes());
        PhoneTag(tag_bytes(ctx.sign()))
    }

    /// The tag of `code` for request `id` (the id is included so that equal codes of two requests differ).
    pub fn code_tag(&self, id: &RequestId, code: &VerificationCode) -> [u8; TAG_LEN] {
        tag_bytes(hmac::sign(&self.0, &code_input(id, code)))
    }

    /// Whether `code` is `pending`'s, compared in constant time.
    pub fn matches(&self, pending: &PendingCode, code: &VerificationCode) -> bool {
        hmac::verify(&self.0, &code_input(&pending.request_id, code), &pending.code_tag).is_ok()
    }
}

fn code_input(id: &RequestId, code: &VerificationCode) -> Vec<u8> {
    [CODE_LABEL, &id.0, code.as_str().as_bytes()].concat()
}

fn tag_bytes(tag: hmac::Tag) -> [u8; TAG_LEN] {
    let mut out = [0u8; TAG_LEN];
    // HMAC-SHA256 tags are exactly TAG_LEN bytes.
    out.copy_from_slice(&tag.as_ref()[..TAG_LEN]);
    out
}

/// A code waiting to be used, as stored under its number's tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingCode {
    /// The request it answers.
    pub request_id: RequestId,
    /// Tag of the code (never the code).
    pub code_tag: [u8; TAG_LEN],
    /// When it stops being accepted.
    pub expires_at_ms: u64,
    /// `Register` requests it still allows.
    pub attempts_left: u8,
}

/// Stored layout: version, request id, code tag, expiry, attempts left.
const ENCODED_LEN: usize = 1 + REQUEST_ID_LEN + TAG_LEN + 8 + 1;
const VERSION: u8 = 1;

/// What one use of a pending code comes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// Nothing can be accepted: the code expired or its attempts were used up (the request is dropped).
    Expired,
    /// Not the code; `left` more attempts are allowed (0: the request is dropped).
    Wrong {
        /// Attempts left.
        left: u8,
    },
    /// The code; `left` more attempts stay allowed should this registration not complete.
    Right {
        /// Attempts left.
        left: u8,
    },
}

impl PendingCode {
    /// A new request for `code`, made at `now_ms`.
    pub fn new(key: &CodeKey, request_id: RequestId, code: &VerificationCode, now_ms: u64) -> Self {
        Self {
            request_id,
            code_tag: key.code_tag(&request_id, code),
            expires_at_ms: now_ms.saturating_add(CODE_TTL_MS),
            attempts_left: CODE_ATTEMPTS,
        }
    }

    /// Whether the code is past its expiry at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        now_ms >= self.expires_at_ms
    }

    /// One `Register` using this code at `now_ms`; `matched` says whether the code given was this one. Every use
    /// counts against the attempts, right or wrong, so that parallel requests cannot try more than
    /// [`CODE_ATTEMPTS`] codes or PINs between them. Returns the answer and the state to keep (`None`: drop it).
    pub fn attempt(self, now_ms: u64, matched: bool) -> (Attempt, Option<Self>) {
        if self.expired(now_ms) || self.attempts_left == 0 {
            return (Attempt::Expired, None);
        }
        let left = self.attempts_left - 1;
        let next = (left > 0).then_some(Self { attempts_left: left, ..self });
        (if matched { Attempt::Right { left } } else { Attempt::Wrong { left } }, next)
    }

    /// The stored bytes.
    pub fn encode(&self) -> [u8; ENCODED_LEN] {
        let mut b = [0u8; ENCODED_LEN];
        b[0] = VERSION;
        b[1..17].copy_from_slice(&self.request_id.0);
        b[17..49].copy_from_slice(&self.code_tag);
        b[49..57].copy_from_slice(&self.expires_at_ms.to_be_bytes());
        b[57] = self.attempts_left;
        b
    }

    /// Parses stored bytes; `None` if they are not a version-1 record.
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != ENCODED_LEN || b[0] != VERSION {
            return None;
        }
        Some(Self {
            request_id: RequestId(b[1..17].try_into().ok()?),
            code_tag: b[17..49].try_into().ok()?,
            expires_at_ms: u64::from_be_bytes(b[49..57].try_into().ok()?),
            attempts_left: b[57],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> CodeKey {
        CodeKey::from_bytes(&[7; 32])
    }

    fn code(s: &str) -> VerificationCode {
        VerificationCode::parse(s).expect("valid code")
    }

    #[test]
    fn tags_depend_on_the_key_the_request_and_the_value() {
        let phone = PhoneNumber::parse("+33612345678").expect("valid");
        let other = PhoneNumber::parse("+33612345679").expect("valid");
        assert!(key().phone_tag(&phone) == key().phone_tag(&phone));
        assert!(key().phone_tag(&phone) != key().phone_tag(&other));
        assert!(key().phone_tag(&phone) != CodeKey::from_bytes(&[8; 32]).phone_tag(&phone));
        let (a, b) = (RequestId([1; 16]), RequestId([2; 16]));
        assert_ne!(key().code_tag(&a, &code("123456")), key().code_tag(&b, &code("123456")));
        let pending = PendingCode::new(&key(), a, &code("123456"), 0);
        assert!(key().matches(&pending, &code("123456")));
        assert!(!key().matches(&pending, &code("123457")));
        assert!(!CodeKey::from_bytes(&[8; 32]).matches(&pending, &code("123456")));
    }

    #[test]
    fn five_uses_then_nothing_and_nothing_after_ten_minutes() {
        let mut state = Some(PendingCode::new(&key(), RequestId([1; 16]), &code("000001"), 1_000));
        let mut answers = Vec::new();
        while let Some(p) = state.take() {
            let (answer, next) = p.attempt(2_000, false);
            answers.push(answer);
            state = next;
        }
        let lefts: Vec<_> = (0..CODE_ATTEMPTS).rev().map(|left| Attempt::Wrong { left }).collect();
        assert_eq!(answers, lefts, "exactly CODE_ATTEMPTS uses, then the request is gone");

        let p = PendingCode::new(&key(), RequestId([1; 16]), &code("000001"), 1_000);
        assert_eq!(p.attempt(1_000 + CODE_TTL_MS - 1, true).0, Attempt::Right { left: CODE_ATTEMPTS - 1 });
        assert_eq!(p.attempt(1_000 + CODE_TTL_MS, true), (Attempt::Expired, None), "a right code, too late");
        let (right, kept) = p.attempt(1_500, true);
        assert_eq!((right, kept.map(|k| k.attempts_left)), (Attempt::Right { left: 4 }, Some(4)));
    }

    #[test]
    fn records_round_trip_and_bad_bytes_are_refused() {
        let p = PendingCode::new(&key(), RequestId([9; 16]), &code("424242"), 77);
        assert_eq!(PendingCode::decode(&p.encode()), Some(p));
        assert_eq!(PendingCode::decode(&p.encode()[1..]), None);
        let mut other_version = p.encode();
        other_version[0] = 2;
        assert_eq!(PendingCode::decode(&other_version), None);
    }

    #[test]
    fn drawn_codes_are_six_digits() {
        for _ in 0..100 {
            assert_eq!(draw_code().as_str().len(), 6);
        }
    }
}
