//! Pure parts of authentication: account ids and the transcripts that identity keys sign.
//!
//! Every signed transcript starts with a domain-separation label and includes 32 bytes of TLS keying material
//! exported from the connection (`EKM_LABEL`, RFC 5705 / RFC 8446 §7.5). Each QUIC connection has its own
//! handshake secrets, so a signature made on one connection is worthless on any other: it cannot be replayed.
//! Variable-length fields are length-prefixed so that no two field lists share an encoding.

use sha2::{Digest, Sha256};
use std::fmt;

use crate::wire::DeviceInfo;

/// Label for the TLS exported keying material (EKM) transcripts are bound to (the wire value keeps its first name).
pub const EKM_LABEL: &[u8] = b"EXPORTER-consent-relay-auth-v1";
/// Length of the exported keying material.
pub const EKM_LEN: usize = 32;
/// Length of an account id.
pub const ACCOUNT_ID_LEN: usize = 16;
/// Length of an Ed25519 or X25519 public key.
pub const KEY_LEN: usize = 32;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// Opaque account identifier: the first 16 bytes of SHA-256 over a label and the identity key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountId(pub [u8; ACCOUNT_ID_LEN]);

impl AccountId {
    /// Derives the account id of an Ed25519 identity key.
    pub fn from_identity_key(identity_key: &[u8; KEY_LEN]) -> Self {
        let digest = Sha256::new().chain_update(b"consent-relay account id v1").chain_update(identity_key).finalize();
        let mut id = [0u8; ACCOUNT_ID_LEN];
        id.copy_from_slice(&digest[..ACCOUNT_ID_LEN]);
        Self(id)
    }

    /// Parses an account id from wire bytes; `None` if the length is wrong.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    /// Parses the lowercase hex form.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut id = [0u8; ACCOUNT_ID_LEN];
        hex::decode_to_slice(s, &mut id).ok()?;
        Some(Self(id))
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; ACCOUNT_ID_LEN] {
        &self.0
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccountId({self})")
    }
}

/// SHA-256 of `data` (access-key verifiers are computed with it on both sides).
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn put_field(out: &mut Vec<u8>, field: &[u8]) {
    // Fields are bounded by the frame size, far below u32::MAX.
    out.extend_from_slice(&(field.len() as u32).to_be_bytes());
    out.extend_from_slice(field);
}

/// The bytes an identity key signs to register (or update) its account on this connection.
pub fn register_transcript(
    ekm: &[u8; EKM_LEN],
    identity_key: &[u8],
    sealing_key: &[u8],
    phone: &str,
    device: &DeviceInfo,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    put_field(&mut out, b"consent-relay/v1 register");
    put_field(&mut out, ekm);
    put_field(&mut out, identity_key);
    put_field(&mut out, sealing_key);
    put_field(&mut out, phone.as_bytes());
    put_field(&mut out, device.model.as_bytes());
    put_field(&mut out, device.os.as_bytes());
    put_field(&mut out, device.app_version.as_bytes());
    out
}

/// The bytes an identity key signs to authenticate this connection as its account.
pub fn auth_transcript(ekm: &[u8; EKM_LEN], account: &AccountId) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    put_field(&mut out, b"consent-relay/v1 auth");
    put_field(&mut out, ekm);
    put_field(&mut out, account.as_bytes());
    out
}

/// Domain-separation label of the delete transcript.
pub const DELETE_LABEL: &[u8] = b"consent-relay/v1 delete account";

/// The bytes an identity key signs to erase its account on this connection (`DeleteAccount`): the label, the
/// connection's EKM and the account id, each length-prefixed.
pub fn delete_transcript(ekm: &[u8; EKM_LEN], account: &AccountId) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    put_field(&mut out, DELETE_LABEL);
    put_field(&mut out, ekm);
    put_field(&mut out, account.as_bytes());
    out
}

/// The account a delete transcript erases, if `signed` is exactly a delete transcript (of any connection): what a
/// party that cannot know the connection's EKM, the exporter, checks of the bytes the user signed.
pub fn parse_delete_transcript(signed: &[u8]) -> Option<AccountId> {
    let (label, rest) = take_field(signed, DELETE_LABEL.len())?;
    let (_ekm, rest) = take_field(rest, EKM_LEN)?;
    let (account, rest) = take_field(rest, ACCOUNT_ID_LEN)?;
    (label == DELETE_LABEL && rest.is_empty()).then(|| AccountId::from_slice(account)).flatten()
}

/// One length-prefixed field of exactly `len` bytes at the start of `bytes`, and what follows it.
fn take_field(bytes: &[u8], len: usize) -> Option<(&[u8], &[u8])> {
    let n = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?);
    if usize::try_from(n).ok()? != len {
        return None;
    }
    let value = bytes.get(4..4 + len)?;
    Some((value, &bytes[4 + len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_id_depends_on_key_and_round_trips_hex() {
        let a = AccountId::from_identity_key(&[1; 32]);
        let b = AccountId::from_identity_key(&[2; 32]);
        assert_ne!(a, b);
        assert_eq!(AccountId::from_hex(&a.to_string()), Some(a));
        assert_eq!(AccountId::from_slice(&[0; 15]), None);
    }

    #[test]
    fn delete_transcripts_bind_the_connection_and_parse_back_exactly() {
        let acct = AccountId([7; 16]);
        let t = delete_transcript(&[1; 32], &acct);
        assert_ne!(t, delete_transcript(&[2; 32], &acct));
        assert_ne!(t, auth_transcript(&[1; 32], &acct), "not an auth transcript");
        assert_eq!(parse_delete_transcript(&t), Some(acct));
        assert_eq!(parse_delete_transcript(&auth_transcript(&[1; 32], &acct)), None);
        let mut longer = t.clone();
        longer.push(0);
        assert_eq!(parse_delete_transcript(&longer), None);
        assert_eq!(parse_delete_transcript(&t[..t.len() - 1]), None);
    }

    #[test]
    fn transcripts_bind_the_connection_and_are_unambiguous() {
        let acct = AccountId([7; 16]);
        assert_ne!(auth_transcript(&[0; 32], &acct), auth_transcript(&[1; 32], &acct));
        let dev = |m: &str, o: &str| DeviceInfo { model: m.into(), os: o.into(), app_version: String::new() };
        // Moving a byte from one field to the next must change the transcript.
        assert_ne!(
            register_transcript(&[0; 32], &[1; 32], &[2; 32], "+33612345678", &dev("ab", "c")),
            register_transcript(&[0; 32], &[1; 32], &[2; 32], "+33612345678", &dev("a", "bc")),
        );
    }
}
