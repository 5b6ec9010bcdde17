//! The one error type of the JetStream store. Contract: every failure of the engine is an [`StoreError::Engine`]
//! naming the operation; every refusal a caller must act on has a variant of its own.

use std::error::Error as StdError;

/// An engine error, boxed (async-nats has one error type per operation).
pub type EngineError = Box<dyn StdError + Send + Sync + 'static>;

/// Why a store operation did not happen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The layout's limits are unusable.
    #[error("invalid JetStream layout: {0}")]
    Layout(String),
    /// The mailbox holds its quota of messages: the append was refused (nothing older was dropped).
    #[error("mailbox full")]
    MailboxFull,
    /// The message with this sequence belongs to another mailbox (or is not a mailbox message).
    #[error("message {seq} is not in this mailbox")]
    NotInMailbox {
        /// The sequence asked for.
        seq: u64,
    },
    /// Create-if-absent found the key present.
    #[error("key exists")]
    Exists,
    /// A compare-and-set found another revision than the one expected.
    #[error("revision changed: expected {expected}")]
    RevisionChanged {
        /// The revision the caller expected.
        expected: u64,
    },
    /// A lease is held by someone else and has not expired.
    #[error("lease held by {holder:?}")]
    LeaseHeld {
        /// Who holds it.
        holder: String,
    },
    /// The caller's lease expired or was taken over: it no longer holds it.
    #[error("lease lost")]
    LeaseLost,
    /// A key, lease name, holder or TTL that the engine cannot take.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A wake-up notification whose payload is not an account id.
    #[error("malformed wake-up notification ({len} bytes)")]
    BadWakeup {
        /// Its length.
        len: usize,
    },
    /// The store holds something this layout never writes (a damaged or foreign stream): reported, not skipped.
    #[error("unexpected store content: {0}")]
    Corrupt(String),
    /// The engine failed (unreachable, timed out, refused for another reason).
    #[error("{op}: {source}")]
    Engine {
        /// What was being done.
        op: &'static str,
        /// The engine's error.
        source: EngineError,
    },
}

impl StoreError {
    /// A closure wrapping an engine error of operation `op`.
    pub(crate) fn engine<E: Into<EngineError>>(op: &'static str) -> impl FnOnce(E) -> Self {
        move |e| Self::Engine { op, source: e.into() }
    }
}

/// The JetStream API error (with its code) somewhere in `err`'s chain of sources, if any.
pub(crate) fn jetstream_error<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a async_nats::jetstream::Error> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(js) = e.downcast_ref::<async_nats::jetstream::Error>() {
            return Some(js);
        }
        cur = e.source();
    }
    None
}
