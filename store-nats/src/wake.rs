//! Wake-ups for cross-node delivery: after an append to a mailbox of shard k, the node that stored it publishes the
//! recipient's account id on core subject `wake.<k>`; a node holding delivery streams of shard k subscribes to it
//! and scans that account's mailbox when told.
//!
//! Contract:
//! - A wake-up carries the recipient's 16-byte account id and nothing else: no sender, no content, no sequence.
//! - It is core NATS publish-subscribe, not stored: a wake-up sent while no node is subscribed, or lost with a
//!   node, is gone. It is a hint that saves polling, never the record: a subscriber scans the mailbox after it has
//!   subscribed (so nothing appended before is missed) and on every wake-up; mailbox contents are the truth.
//! - [`WakeSubscription::next`] reports a payload that is not an account id as [`StoreError::BadWakeup`].

use async_nats::Client;
use futures_util::StreamExt;
use relay_proto::AccountId;

use crate::StoreError;
use crate::layout::{Layout, Shard};

/// Publishes and subscribes to wake-ups.
#[derive(Clone)]
pub struct Wakeups {
    client: Client,
    layout: Layout,
}

impl Wakeups {
    /// Wake-ups over `client`, sharded as `layout`'s mailboxes.
    pub fn new(client: Client, layout: Layout) -> Self {
        Self { client, layout }
    }

    /// Tells the nodes subscribed to `account`'s shard that its mailbox has something new.
    pub async fn notify(&self, account: &AccountId) -> Result<(), StoreError> {
        let subject = self.layout.shard_of(account).wake_subject();
        self.client
            .publish(subject, bytes::Bytes::copy_from_slice(account.as_bytes()))
            .await
            .map_err(StoreError::engine("publishing a wake-up"))
    }

    /// Subscribes to the wake-ups of `shard`; the server has the subscription when this returns.
    pub async fn subscribe(&self, shard: Shard) -> Result<WakeSubscription, StoreError> {
        let subscriber =
            self.client.subscribe(shard.wake_subject()).await.map_err(StoreError::engine("subscribing to wake-ups"))?;
        self.client.flush().await.map_err(StoreError::engine("subscribing to wake-ups"))?;
        Ok(WakeSubscription { subscriber })
    }
}

/// The wake-ups of one shard.
pub struct WakeSubscription {
    subscriber: async_nats::Subscriber,
}

impl WakeSubscription {
    /// The next wake-up's account; `None` once the subscription has ended.
    pub async fn next(&mut self) -> Option<Result<AccountId, StoreError>> {
        let message = self.subscriber.next().await?;
        Some(AccountId::from_slice(&message.payload).ok_or(StoreError::BadWakeup { len: message.payload.len() }))
    }
}
