//! What a mailbox holds and why an operation on it fails, shared by every [`super::MailboxStore`]; the embedded
//! implementation is [`super::RoundMailboxes`].
//!
//! Every operation takes the recipient from its caller (the authenticated account), so one account can neither read
//! nor remove another's entries; appends are checked against a per-mailbox quota of messages and bytes.

use bytes::Bytes;

use super::backend::BackendError;

/// Quota and lifetime of mailbox entries.
#[derive(Debug, Clone, Copy)]
pub struct MailboxLimits {
    /// Most entries per mailbox.
    pub max_messages: u64,
    /// Most envelope bytes per mailbox.
    pub max_bytes: u64,
    /// Lifetime of an entry, in milliseconds.
    pub ttl_ms: u64,
}

/// One stored envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEnvelope {
    /// Server-assigned id, at least 1, unique and increasing across restarts.
    pub id: u64,
    /// When the relay stored it.
    pub stored_at_ms: u64,
    /// When it expires if not delivered and acknowledged.
    pub expires_at_ms: u64,
    /// The opaque envelope.
    pub envelope: Bytes,
}

/// Where an appended envelope was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Server-assigned id.
    pub id: u64,
    /// When the relay stored it.
    pub stored_at_ms: u64,
}

/// Why a mailbox operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MailboxError {
    /// The recipient's mailbox is full.
    #[error("mailbox full: {messages} messages / {bytes} bytes queued (limits {max_messages} / {max_bytes})")]
    QuotaExceeded {
        /// Messages queued.
        messages: u64,
        /// Bytes queued (0 from a backend that does not count a mailbox's bytes).
        bytes: u64,
        /// Message limit.
        max_messages: u64,
        /// Byte limit.
        max_bytes: u64,
    },
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] BackendError),
}

impl From<sled::Error> for MailboxError {
    fn from(e: sled::Error) -> Self {
        Self::Store(e.into())
    }
}
