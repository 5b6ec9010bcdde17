//! What a message says, as the recipient's application sees it: the plaintext inside the Double Ratchet.

use prost::Message;

/// Length of a message id.
pub const MESSAGE_ID_LEN: usize = 16;

/// The plaintext of one message.
#[derive(Clone, PartialEq, Message)]
pub struct Content {
    /// Random id chosen by the sender; the recipient de-duplicates by it.
    #[prost(bytes = "vec", tag = "1")]
    pub message_id: Vec<u8>,
    /// When the sender wrote it (ms since the Unix epoch).
    #[prost(uint64, tag = "2")]
    pub sent_at_ms: u64,
    /// The text.
    #[prost(string, tag = "3")]
    pub text: String,
    /// The sender's sealed-sender access key, so the recipient can answer without naming itself to the relay.
    #[prost(bytes = "vec", tag = "4")]
    pub sender_access_key: Vec<u8>,
}
