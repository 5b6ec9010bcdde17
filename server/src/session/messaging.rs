//! The message path: `Send`, `SealedSend`, `Ack` and `Subscribe` (the delivery stream).
//!
//! Contract: it stores an opaque envelope for its recipient and acknowledges it only once durable; it records
//! nothing about the sender. Its handles are the mailboxes, the identity keys ([`Identities`]: does the recipient
//! exist), the access-key verifiers, the group commit and the wake-ups: it holds no [`crate::store::Directory`], so
//! it cannot read a phone number or device info (invariant 2), and nothing here can decrypt (the crate links no
//! AEAD). Acks remove entries from the authenticated account's own mailbox only.

use std::sync::Arc;
use std::time::Instant;

use relay_proto::wire::{Ack, Acked, SealedSend, Send, SendAck, server_frame::Body as Resp};
use relay_proto::{AccountId, ErrorCode};

use super::checks::{Reply, reply};
use super::state::Session;
use crate::delivery::Delivery;
use crate::ratelimit::RateLimiter;
use crate::reject::Reject;
use crate::store::{Appended, Durability, Identities, Prekeys};
use crate::tamper::Tamper;

/// Length of a sealed-sender access key.
pub const ACCESS_KEY_LEN: usize = 32;

/// The message-path handler.
pub struct Messaging {
    /// Mailboxes, wake-ups and counters, shared with the delivery streams.
    pub delivery: Delivery,
    /// Identity keys only: whether a recipient exists.
    pub recipients: Identities,
    /// Access-key verifiers for sealed sends (the prekey trees hold no personal data).
    pub access_keys: Prekeys,
    /// Durability barrier.
    pub commit: Arc<dyn Durability>,
    /// Authenticated sends per account.
    pub sends: RateLimiter<AccountId>,
    /// Sealed sends per recipient.
    pub sealed_sends: RateLimiter<AccountId>,
    /// Largest envelope accepted, in bytes.
    pub max_envelope_bytes: usize,
    /// The configured rates, for the refusal messages.
    pub sends_per_second: u32,
    /// See [`Messaging::sends_per_second`].
    pub sealed_sends_per_minute: u32,
    /// Lies to tell, for tests only (see [`crate::tamper`]).
    pub tamper: Arc<Tamper>,
}

impl Messaging {
    /// Checks and appends an opaque envelope for the recipient, without waiting for durability: the caller awaits
    /// [`Durability::durable`] (taken after this returns) before acknowledging it, then calls [`Messaging::stored`].
    pub(crate) async fn append(&self, recipient: &[u8], envelope: &[u8]) -> Result<(AccountId, Appended), Reject> {
        let recipient = AccountId::from_slice(recipient)
            .ok_or_else(|| Reject::invalid("recipient must be a 16-byte account id"))?;
        let max = self.max_envelope_bytes;
        if envelope.len() > max {
            return Err(Reject::new(
                ErrorCode::EnvelopeTooLarge,
                format!("envelope of {} bytes exceeds the limit of {max} bytes", envelope.len()),
            ));
        }
        if envelope.is_empty() {
            return Err(Reject::invalid("empty envelope"));
        }
        if !self.recipients.exists(&recipient).await? {
            return Err(Reject::new(ErrorCode::UnknownRecipient, "no such recipient account"));
        }
        let rewritten = self.tamper.envelope(&recipient, envelope);
        let envelope = rewritten.as_deref().unwrap_or(envelope);
        let stored = self.delivery.mailboxes.append(&recipient, envelope, relay_proto::now_ms()).await?;
        Ok((recipient, stored))
    }

    /// Counts a durable envelope and wakes its recipient's delivery stream.
    pub(crate) fn stored(&self, recipient: &AccountId) {
        self.delivery.metrics.stored();
        self.delivery.subscribers.notify(recipient);
    }

    /// Stores an opaque envelope for the recipient and acknowledges once it is durable.
    async fn store(&self, recipient: &[u8], envelope: &[u8]) -> Reply {
        let (recipient, stored) = self.append(recipient, envelope).await?;
        self.commit.durable().await?;
        self.stored(&recipient);
        reply(Resp::SendAck(SendAck { server_id: stored.id, stored_at_ms: stored.stored_at_ms }))
    }

    /// The checks of an authenticated send before its envelope is appended.
    pub(crate) fn check_send(&self, session: &Session) -> Result<(), Reject> {
        let account = session.account()?;
        if !self.sends.allow(account, Instant::now()) {
            return Err(Reject::new(
                ErrorCode::RateLimited,
                format!("at most {} sends per second from one account", self.sends_per_second),
            ));
        }
        Ok(())
    }

    /// A send on the authenticated connection (first contact, before the recipient's access key is known).
    pub async fn send(&self, session: &Session, s: Send) -> Reply {
        self.check_send(session)?;
        self.store(&s.recipient, &s.envelope).await
    }

    /// The checks of a sealed send before its envelope is appended: the access key and the per-recipient rate.
    pub(crate) async fn check_sealed(&self, s: &SealedSend) -> Result<(), Reject> {
        let recipient = AccountId::from_slice(&s.recipient)
            .ok_or_else(|| Reject::invalid("recipient must be a 16-byte account id"))?;
        let bad_key = || Reject::new(ErrorCode::BadAccessKey, "access key not valid for this recipient");
        if s.access_key.len() != ACCESS_KEY_LEN || !self.access_keys.access_allowed(&recipient, &s.access_key).await? {
            return Err(bad_key());
        }
        if !self.sealed_sends.allow(recipient, Instant::now()) {
            return Err(Reject::new(
                ErrorCode::RateLimited,
                format!("at most {} sealed sends per minute to one recipient", self.sealed_sends_per_minute),
            ));
        }
        Ok(())
    }

    /// A send that names no sender, on any connection: authorised by the recipient's access key, and limited per
    /// recipient (on top of the mailbox quota) so that a leaked key cannot flood a mailbox faster than the limit.
    pub async fn sealed_send(&self, s: SealedSend) -> Reply {
        self.check_sealed(&s).await?;
        self.store(&s.recipient, &s.envelope).await
    }

    /// Removes acknowledged envelopes from the caller's own mailbox.
    pub async fn ack(&self, session: &Session, a: Ack) -> Reply {
        let account = session.account()?;
        let removed = self.delivery.mailboxes.remove(&account, &a.server_ids).await?;
        reply(Resp::Acked(Acked { removed }))
    }

    /// Turns the stream into `account`'s delivery stream until it ends.
    pub async fn subscribe(
        &self,
        account: AccountId,
        budget: &relay_quic::FrameBudget,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) {
        crate::delivery::run(&self.delivery, account, budget.clone(), send, recv).await;
    }
}

#[cfg(test)]
mod tests {
    /// Invariant 2 is a fact of the message path's types: neither this handler nor the delivery stream names a
    /// handle that can reach a phone number or device info. This reads their source (tests excluded), so adding
    /// such a field or call fails here, not in review.
    #[test]
    fn the_message_path_names_no_personal_data_handle() {
        let files = [
            ("session/messaging.rs", include_str!("messaging.rs")),
            ("delivery.rs", include_str!("../delivery.rs")),
            ("subscribers.rs", include_str!("../subscribers.rs")),
        ];
        let forbidden =
            ["Directory", "AccountProfile", "PhoneNumber", "DeviceInfo", ".profile(", ".lookup(", "PROFILES"];
        for (name, source) in files {
            let code = source.split("#[cfg(test)]").next().unwrap_or(source);
            for (n, line) in code.lines().enumerate() {
                if line.trim_start().starts_with("//") {
                    continue;
                }
                for word in forbidden {
                    assert!(!line.contains(word), "{name}:{}: the message path names {word}: {line}", n + 1);
                }
            }
        }
    }
}
