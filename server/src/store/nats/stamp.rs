//! The prefix the JetStream mailboxes put before each envelope: when the relay stored it and when it expires, on
//! the relay's clock (the `now_ms` the relay passes to [`crate::store::MailboxStore::append`]).
//!
//! Contract: a stored message is `stored_at_ms (8) ‖ expires_at_ms (8) ‖ envelope`, both integers big-endian;
//! nothing else is added and nothing of the envelope is read. A message shorter than the prefix does not split: the
//! caller reports it as damage, never as an empty envelope.

use bytes::{BufMut, Bytes, BytesMut};

/// Length of the prefix.
pub(crate) const STAMP_LEN: usize = 16;

/// When an envelope was stored and when it expires, in milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub(crate) stored_at_ms: u64,
    pub(crate) expires_at_ms: u64,
}

impl Stamp {
    /// The message to store: this stamp, then `envelope`.
    pub(crate) fn frame(self, envelope: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(STAMP_LEN + envelope.len());
        out.put_u64(self.stored_at_ms);
        out.put_u64(self.expires_at_ms);
        out.put_slice(envelope);
        out.freeze()
    }

    /// The stamp and the envelope of a stored message (sharing its buffer); `None` if it is shorter than a stamp.
    pub(crate) fn split(message: &Bytes) -> Option<(Self, Bytes)> {
        let head = message.get(..STAMP_LEN)?;
        let (stored, expires) = head.split_at(8);
        let stamp = Self {
            stored_at_ms: u64::from_be_bytes(stored.try_into().ok()?),
            expires_at_ms: u64::from_be_bytes(expires.try_into().ok()?),
        };
        Some((stamp, message.slice(STAMP_LEN..)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_framed_envelope_splits_back_byte_for_byte() {
        let stamp = Stamp { stored_at_ms: 0x0102_0304_0506_0708, expires_at_ms: u64::MAX };
        let framed = stamp.frame(b"opaque");
        assert_eq!(&framed[..8], &[1, 2, 3, 4, 5, 6, 7, 8], "big-endian, stored_at first");
        assert_eq!(Stamp::split(&framed), Some((stamp, Bytes::from_static(b"opaque"))));
        let empty = stamp.frame(b"");
        assert_eq!(Stamp::split(&empty), Some((stamp, Bytes::new())), "an empty envelope is still a message");
    }

    #[test]
    fn a_message_shorter_than_a_stamp_does_not_split() {
        for len in [0, 1, STAMP_LEN - 1] {
            assert_eq!(Stamp::split(&Bytes::from(vec![0; len])), None, "{len} bytes");
        }
    }
}
