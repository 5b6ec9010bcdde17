//! Checks of request fields and signatures shared by the request families, each failure mapped to its [`Reject`],
//! and the one way an answer is wrapped.

use ed25519_dalek::{Signature, VerifyingKey};
use relay_proto::auth::KEY_LEN;
use relay_proto::wire::{ServerFrame, server_frame::Body as Resp};
use relay_proto::{ErrorCode, PROTOCOL_VERSION};

use crate::reject::Reject;

/// What a request handler answers: a response frame, or a refusal.
pub type Reply = Result<ServerFrame, Reject>;

/// A successful answer.
pub fn reply(body: Resp) -> Reply {
    Ok(ServerFrame { body: Some(body) })
}

/// A 32-byte key field.
pub fn key32(bytes: &[u8], what: &str) -> Result<[u8; KEY_LEN], Reject> {
    bytes.try_into().map_err(|_| Reject::invalid(format!("{what} must be {KEY_LEN} bytes")))
}

/// The protocol version a client announces must be the relay's.
pub fn version(v: u32) -> Result<(), Reject> {
    if v != PROTOCOL_VERSION {
        return Err(Reject::new(
            ErrorCode::UnsupportedVersion,
            format!("protocol version {v} is not supported (this relay speaks {PROTOCOL_VERSION})"),
        ));
    }
    Ok(())
}

/// A strict Ed25519 signature by `identity_key` over exactly `message`.
pub fn signature(identity_key: &[u8; KEY_LEN], message: &[u8], signature: &[u8]) -> Result<(), Reject> {
    let bad = || Reject::new(ErrorCode::BadSignature, "signature does not verify for this identity key and connection");
    let key = VerifyingKey::from_bytes(identity_key).map_err(|_| bad())?;
    let sig = Signature::from_slice(signature).map_err(|_| bad())?;
    key.verify_strict(message, &sig).map_err(|_| bad())
}
