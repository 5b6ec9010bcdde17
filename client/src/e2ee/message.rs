//! Wire encoding of end-to-end messages, the bytes that travel inside a sealed envelope: either a first message
//! with its PQXDH [`InitialHeader`], or a plain ratchet message.
//!
//! Encoded as protobuf (prost derive, no generated code):
//!
//! ```text
//! message E2eeMessage { oneof kind { PreKey prekey = 1; Ratchet ratchet = 2; } }
//! message PreKey      { InitialHeader header = 1; Ratchet message = 2; }
//! message InitialHeader {
//!   bytes identity_key = 1; bytes identity_dh_key = 2; bytes identity_dh_signature = 3; bytes ephemeral = 4;
//!   bytes kem_ciphertext = 5; uint32 signed_prekey_id = 6; optional uint32 one_time_prekey_id = 7;
//!   uint32 kem_prekey_id = 8;
//! }
//! message Ratchet     { bytes dh = 1; uint32 pn = 2; uint32 n = 3; bytes ciphertext = 4; }
//! ```
//!
//! Decoding checks, then converts: any byte string either decodes into well-sized fields or fails with
//! [`E2eeError::Malformed`]; it never panics. What the header fields mean is checked later, by
//! [`respond`](super::respond) and [`RatchetState::decrypt`](super::RatchetState::decrypt).

use prost::Message;

use super::E2eeError;
use super::pqxdh::InitialHeader;
use super::prekeys::KEM_CIPHERTEXT_LEN;
pub use super::ratchet::{Header, RatchetMessage};

/// Shortest ratchet ciphertext: the Poly1305 tag of an empty message.
const MIN_CIPHERTEXT_LEN: usize = 16;

/// What a sealed envelope carries between two devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum E2eeMessage {
    /// The first message(s) of a session, before the initiator has heard back: carries the PQXDH header.
    PreKey {
        /// What the responder needs to derive the shared secret.
        header: InitialHeader,
        /// The ratchet message itself.
        message: RatchetMessage,
    },
    /// Any later message.
    Ratchet(RatchetMessage),
}

#[derive(Clone, PartialEq, Message)]
struct WireMessage {
    #[prost(oneof = "WireKind", tags = "1, 2")]
    kind: Option<WireKind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum WireKind {
    #[prost(message, tag = "1")]
    PreKey(WirePreKey),
    #[prost(message, tag = "2")]
    Ratchet(WireRatchet),
}

#[derive(Clone, PartialEq, Message)]
struct WirePreKey {
    #[prost(message, optional, tag = "1")]
    header: Option<WireInitialHeader>,
    #[prost(message, optional, tag = "2")]
    message: Option<WireRatchet>,
}

#[derive(Clone, PartialEq, Message)]
struct WireInitialHeader {
    #[prost(bytes = "vec", tag = "1")]
    identity_key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    identity_dh_key: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    identity_dh_signature: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    ephemeral: Vec<u8>,
    #[prost(bytes = "vec", tag = "5")]
    kem_ciphertext: Vec<u8>,
    #[prost(uint32, tag = "6")]
    signed_prekey_id: u32,
    #[prost(uint32, optional, tag = "7")]
    one_time_prekey_id: Option<u32>,
    #[prost(uint32, tag = "8")]
    kem_prekey_id: u32,
}

#[derive(Clone, PartialEq, Message)]
struct WireRatchet {
    #[prost(bytes = "vec", tag = "1")]
    dh: Vec<u8>,
    #[prost(uint32, tag = "2")]
    pn: u32,
    #[prost(uint32, tag = "3")]
    n: u32,
    #[prost(bytes = "vec", tag = "4")]
    ciphertext: Vec<u8>,
}

fn array<const N: usize>(bytes: Vec<u8>, what: &'static str) -> Result<[u8; N], E2eeError> {
    bytes.try_into().map_err(|_| E2eeError::Malformed(what))
}

impl WireRatchet {
    fn from_message(m: &RatchetMessage) -> Self {
        Self { dh: m.header.dh.to_vec(), pn: m.header.pn, n: m.header.n, ciphertext: m.ciphertext.clone() }
    }

    fn into_message(self) -> Result<RatchetMessage, E2eeError> {
        if self.ciphertext.len() < MIN_CIPHERTEXT_LEN {
            return Err(E2eeError::Malformed("ratchet ciphertext"));
        }
        let header = Header { dh: array(self.dh, "ratchet key")?, pn: self.pn, n: self.n };
        Ok(RatchetMessage { header, ciphertext: self.ciphertext })
    }
}

impl WireInitialHeader {
    fn from_header(h: &InitialHeader) -> Self {
        Self {
            identity_key: h.identity_key.to_vec(),
            identity_dh_key: h.identity_dh_key.to_vec(),
            identity_dh_signature: h.identity_dh_signature.to_vec(),
            ephemeral: h.ephemeral.to_vec(),
            kem_ciphertext: h.kem_ciphertext.clone(),
            signed_prekey_id: h.signed_prekey_id,
            one_time_prekey_id: h.one_time_prekey_id,
            kem_prekey_id: h.kem_prekey_id,
        }
    }

    fn into_header(self) -> Result<InitialHeader, E2eeError> {
        if self.kem_ciphertext.len() != KEM_CIPHERTEXT_LEN {
            return Err(E2eeError::Malformed("ML-KEM ciphertext"));
        }
        Ok(InitialHeader {
            identity_key: array(self.identity_key, "identity key")?,
            identity_dh_key: array(self.identity_dh_key, "identity DH key")?,
            identity_dh_signature: array(self.identity_dh_signature, "identity DH signature")?,
            ephemeral: array(self.ephemeral, "ephemeral key")?,
            kem_ciphertext: self.kem_ciphertext,
            signed_prekey_id: self.signed_prekey_id,
            one_time_prekey_id: self.one_time_prekey_id,
            kem_prekey_id: self.kem_prekey_id,
        })
    }
}

impl E2eeMessage {
    /// The ratchet message inside, whichever the kind.
    pub fn ratchet_message(&self) -> &RatchetMessage {
        match self {
            Self::PreKey { message, .. } | Self::Ratchet(message) => message,
        }
    }

    /// The protobuf encoding.
    pub fn encode(&self) -> Vec<u8> {
        let kind = match self {
            Self::PreKey { header, message } => WireKind::PreKey(WirePreKey {
                header: Some(WireInitialHeader::from_header(header)),
                message: Some(WireRatchet::from_message(message)),
            }),
            Self::Ratchet(message) => WireKind::Ratchet(WireRatchet::from_message(message)),
        };
        WireMessage { kind: Some(kind) }.encode_to_vec()
    }

    /// Decodes and size-checks `bytes`. Never panics, whatever the input.
    pub fn decode(bytes: &[u8]) -> Result<Self, E2eeError> {
        let wire = WireMessage::decode(bytes).map_err(|_| E2eeError::Malformed("end-to-end message"))?;
        match wire.kind {
            Some(WireKind::PreKey(WirePreKey { header: Some(header), message: Some(message) })) => {
                Ok(Self::PreKey { header: header.into_header()?, message: message.into_message()? })
            }
            Some(WireKind::Ratchet(message)) => Ok(Self::Ratchet(message.into_message()?)),
            _ => Err(E2eeError::Malformed("end-to-end message")),
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::Rng;

    use super::*;

    fn ratchet_message(n: u32) -> RatchetMessage {
        RatchetMessage { header: Header { dh: [7; 32], pn: 3, n }, ciphertext: vec![9; 40] }
    }

    fn prekey_message() -> E2eeMessage {
        let header = InitialHeader {
            identity_key: [1; 32],
            identity_dh_key: [2; 32],
            identity_dh_signature: [3; 64],
            ephemeral: [4; 32],
            kem_ciphertext: vec![5; KEM_CIPHERTEXT_LEN],
            signed_prekey_id: 6,
            one_time_prekey_id: Some(0),
            kem_prekey_id: 8,
        };
        E2eeMessage::PreKey { header, message: ratchet_message(0) }
    }

    #[test]
    fn round_trip_of_both_kinds() {
        for m in [prekey_message(), E2eeMessage::Ratchet(ratchet_message(u32::MAX))] {
            assert_eq!(E2eeMessage::decode(&m.encode()), Ok(m));
        }
        // `Some(0)` and `None` stay distinct.
        let E2eeMessage::PreKey { mut header, message } = prekey_message() else { unreachable!("built above") };
        header.one_time_prekey_id = None;
        let m = E2eeMessage::PreKey { header, message };
        assert_eq!(E2eeMessage::decode(&m.encode()), Ok(m));
    }

    #[test]
    fn random_truncated_and_flipped_bytes_never_panic() {
        let mut rng = rand::rng();
        let valid = [prekey_message().encode(), E2eeMessage::Ratchet(ratchet_message(1)).encode()];
        for bytes in &valid {
            for len in 0..bytes.len() {
                assert!(E2eeMessage::decode(&bytes[..len]).is_err(), "truncated to {len} bytes");
            }
            for _ in 0..2000 {
                let mut b = bytes.clone();
                let i = rng.next_u32() as usize % b.len();
                b[i] ^= 1 << (rng.next_u32() % 8);
                let _ = E2eeMessage::decode(&b);
            }
        }
        let mut buf = [0u8; 256];
        for _ in 0..5000 {
            let len = rng.next_u32() as usize % buf.len();
            rng.fill_bytes(&mut buf[..len]);
            let _ = E2eeMessage::decode(&buf[..len]);
        }
        assert!(E2eeMessage::decode(&[]).is_err());
        assert_eq!(
            E2eeMessage::decode(&WireMessage { kind: None }.encode_to_vec()),
            Err(E2eeError::Malformed("end-to-end message"))
        );
    }

    #[test]
    fn wrong_sizes_are_malformed() {
        let short_key = WireRatchet { dh: vec![1; 31], pn: 0, n: 0, ciphertext: vec![0; 16] };
        let no_tag = WireRatchet { dh: vec![1; 32], pn: 0, n: 0, ciphertext: vec![0; 15] };
        for (w, what) in [(short_key, "ratchet key"), (no_tag, "ratchet ciphertext")] {
            let bytes = WireMessage { kind: Some(WireKind::Ratchet(w)) }.encode_to_vec();
            assert_eq!(E2eeMessage::decode(&bytes), Err(E2eeError::Malformed(what)));
        }
        let E2eeMessage::PreKey { header, message } = prekey_message() else { unreachable!("built above") };
        let mut wire = WireInitialHeader::from_header(&header);
        wire.kem_ciphertext.pop();
        let bytes = WireMessage {
            kind: Some(WireKind::PreKey(WirePreKey {
                header: Some(wire),
                message: Some(WireRatchet::from_message(&message)),
            })),
        }
        .encode_to_vec();
        assert_eq!(E2eeMessage::decode(&bytes), Err(E2eeError::Malformed("ML-KEM ciphertext")));
        let bytes =
            WireMessage { kind: Some(WireKind::PreKey(WirePreKey { header: None, message: None })) }.encode_to_vec();
        assert!(E2eeMessage::decode(&bytes).is_err());
    }
}
