//! Consent Relay wire protocol: the schema (prost types generated from `protos/relay.proto`), the length-delimited
//! framing codec, protocol constants, error codes and the pure parts of authentication (transcripts, account ids,
//! phone number validation, the formats and rules of phone-number verification codes and registration-lock PINs)
//! and of identity (the sealing-key binding, sender certificates), and witness cosignatures of the export log's
//! heads ([`witness`]).
//!
//! This crate does no I/O and depends on nothing async: bytes go in, values or typed errors come out. The relay and
//! the client are thin drivers around it.

pub mod auth;
pub mod codes;
pub mod consent;
pub mod frame;
pub mod identity;
pub mod merkle;
pub mod notice;
pub mod phone;
pub mod time;
pub mod verification;
pub mod witness;

/// The prost types generated from `protos/relay.proto` (package `relay.v1`).
#[allow(missing_docs, clippy::all)]
pub mod wire {
    include!(concat!(env!("OUT_DIR"), "/relay.v1.rs"));
}

pub use auth::{ACCOUNT_ID_LEN, AccountId};
pub use codes::{ErrorCode, StreamCloseCode};
pub use frame::{FrameError, MAX_FRAME_LEN};
pub use phone::{PhoneError, PhoneNumber};

/// ALPN identifier of protocol version 1; both endpoints refuse a QUIC connection without it.
pub const ALPN: &[u8] = b"consent-relay/1";

/// ALPN identifier of the export protocol (version 1), spoken on the relay's separate export endpoint only.
pub const EXPORT_ALPN: &[u8] = b"consent-relay-export/1";

/// ALPN identifier of the witness protocol (version 1), spoken by `relay-witness`.
pub const WITNESS_ALPN: &[u8] = b"consent-relay-witness/1";

/// Most consent changes in one `ConsentChangeList`.
pub const MAX_CONSENT_CHANGES: usize = 256;

/// Most erasures in one `ErasureChangeList`.
pub const MAX_ERASURE_CHANGES: usize = 256;

/// Most statements in one `ConsentHistoryPage`.
pub const MAX_HISTORY_PAGE: usize = 256;

/// Most accounts examined for one `SubjectChangeList`.
pub const MAX_SUBJECT_CHANGES: usize = 64;

/// Most entries in one `ExportList` page.
pub const MAX_LISTED_EXPORTS: usize = 128;

/// Most entries in one `PublishLog` request.
pub const MAX_PUBLISHED_ENTRIES: usize = 256;

/// Most entries in one `LogCopy` answer to `ReadLog`.
pub const MAX_READ_LOG_ENTRIES: usize = 256;

/// Most leaf bytes in one `LogCopy` answer: with its heads and framing it stays well below the frame limit.
pub const MAX_READ_LOG_BYTES: usize = 128 * 1024;

/// The protocol version carried in `Register` and `Auth`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Current wall-clock time in milliseconds since the Unix epoch (0 if the clock is before the epoch).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
