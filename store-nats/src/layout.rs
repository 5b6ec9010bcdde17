//! Every stream, subject and bucket name of the JetStream layout, and the limits they are made with.
//!
//! | what | JetStream object | subjects / keys |
//! |---|---|---|
//! | mailboxes, shard k of K | stream `MBOX-<k>` | `mbox.<k>.<account hex>` |
//! | consent statements (the feed) | stream `CONSENT` | `consent.<account hex>` |
//! | claims (a phone number → its account) | KV bucket `CLAIMS` | `<SHA-256 hex of the claimed name>` |
//! | leases | KV bucket `LEASES` | the lease's name |
//! | withdrawal-fence export leases | stream `FENCE` | `fence.<SHA-256 hex of the consent pair>`, one message a lease |
//! | wake-ups, shard k | core subject (not stored) | `wake.<k>` |
//!
//! Contract: these functions are the only place the names are written. An account's shard is its account id's
//! first eight bytes, big-endian, modulo K (account ids are already SHA-256 output, so shards fill evenly); it never
//! changes for a given K, so K is fixed for the life of a cluster's data.

use std::time::Duration;

use relay_proto::AccountId;

use crate::StoreError;

/// The stream of consent statements.
pub const FEED_STREAM: &str = "CONSENT";
/// The subjects of [`FEED_STREAM`].
pub const FEED_SUBJECTS: &str = "consent.*";
/// The bucket of claims (create-if-absent keys).
pub const CLAIMS_BUCKET: &str = "CLAIMS";
/// The bucket of leases.
pub const LEASES_BUCKET: &str = "LEASES";
/// The stream of the withdrawal fence's export leases.
pub const FENCE_STREAM: &str = "FENCE";
/// The subjects of [`FENCE_STREAM`].
pub const FENCE_SUBJECTS: &str = "fence.*";
/// Largest message the nats-server accepts by default (its `max_payload`).
pub const SERVER_MAX_PAYLOAD: u32 = 1024 * 1024;

/// The limits the layout's streams and buckets are made with. `Default` is the production layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Number of mailbox streams, K (default 8). Fixed for the life of the data: it decides every account's shard.
    pub shards: u32,
    /// Replicas of every stream and bucket (default 3: a quorum of 2 acknowledges, one node may be lost).
    pub replicas: usize,
    /// Most messages a mailbox holds (`max_msgs_per_subject`; default 10,000, relayd's `mailbox_max_messages`).
    pub mailbox_quota: u32,
    /// How long an undelivered message is kept (`max_age`; default 30 days, relayd's `message_ttl_secs`).
    pub mailbox_ttl: Duration,
    /// Largest mailbox message (`max_msg_size`; default 64 KiB, relayd's `max_envelope_bytes`).
    pub max_envelope_bytes: u32,
}

impl Default for Layout {
    fn default() -> Self {
        Self {
            shards: 8,
            replicas: 3,
            mailbox_quota: 10_000,
            mailbox_ttl: Duration::from_secs(30 * 24 * 3600),
            max_envelope_bytes: 64 * 1024,
        }
    }
}

impl Layout {
    /// Rejects limits JetStream cannot take or that make no sense, with a message naming the field.
    pub fn check(&self) -> Result<(), StoreError> {
        let bad = |m: &str| Err(StoreError::Layout(m.into()));
        if !(1..=1024).contains(&self.shards) {
            return bad("shards must be between 1 and 1024");
        }
        if !(1..=5).contains(&self.replicas) {
            return bad("replicas must be between 1 and 5 (3 to survive the loss of one node)");
        }
        if self.mailbox_quota == 0 {
            return bad("mailbox_quota must be at least 1");
        }
        if self.mailbox_ttl < Duration::from_secs(1) {
            return bad("mailbox_ttl must be at least one second");
        }
        if self.max_envelope_bytes == 0 || self.max_envelope_bytes > SERVER_MAX_PAYLOAD {
            return bad("max_envelope_bytes must be between 1 and the server's max_payload (1 MiB)");
        }
        Ok(())
    }

    /// The shard of `account`'s mailbox.
    pub fn shard_of(&self, account: &AccountId) -> Shard {
        let mut head = [0u8; 8];
        head.copy_from_slice(&account.as_bytes()[..8]);
        // `check` keeps shards >= 1; `max(1)` keeps an unchecked layout from dividing by zero.
        Shard((u64::from_be_bytes(head) % u64::from(self.shards.max(1))) as u32)
    }

    /// Every shard, 0..K.
    pub fn shards(&self) -> impl Iterator<Item = Shard> {
        (0..self.shards).map(Shard)
    }
}

/// One of the K mailbox shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Shard(pub u32);

impl Shard {
    /// The mailbox stream of this shard: `MBOX-<k>`.
    pub fn mailbox_stream(self) -> String {
        format!("MBOX-{}", self.0)
    }

    /// The subjects of the shard's stream: `mbox.<k>.*`.
    pub fn mailbox_subjects(self) -> String {
        format!("mbox.{}.*", self.0)
    }

    /// The wake-up subject of this shard: `wake.<k>`.
    pub fn wake_subject(self) -> String {
        format!("wake.{}", self.0)
    }
}

/// The subject of `account`'s mailbox in shard `shard`: `mbox.<k>.<account hex>`.
pub fn mailbox_subject(shard: Shard, account: &AccountId) -> String {
    format!("mbox.{}.{account}", shard.0)
}

/// The account whose mailbox subject in shard `shard` is `subject`; `None` if `subject` is not one.
pub fn mailbox_account(shard: Shard, subject: &str) -> Option<AccountId> {
    let hex = subject.strip_prefix(&format!("mbox.{}.", shard.0))?;
    let bytes = hex::decode(hex).ok()?;
    AccountId::from_slice(&bytes)
}

/// The subject of `account`'s consent statements: `consent.<account hex>`.
pub fn feed_subject(account: &AccountId) -> String {
    format!("consent.{account}")
}

/// The subject of the leases of the consent pair whose key is `pair`: `fence.<key>`.
pub fn fence_subject(pair: &crate::cas::ClaimKey) -> String {
    format!("fence.{}", pair.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_shards_are_stable() {
        let layout = Layout::default();
        let account = AccountId([0xab; 16]);
        let shard = layout.shard_of(&account);
        assert_eq!(shard, Shard((0xabab_abab_abab_abab_u64 % 8) as u32));
        assert_eq!(shard.mailbox_stream(), "MBOX-3");
        assert_eq!(mailbox_subject(shard, &account), format!("mbox.3.{}", "ab".repeat(16)));
        assert_eq!(feed_subject(&account), format!("consent.{}", "ab".repeat(16)));
        assert_eq!(shard.wake_subject(), "wake.3");
        assert_eq!(mailbox_account(shard, &mailbox_subject(shard, &account)), Some(account));
        assert_eq!(mailbox_account(Shard(2), &mailbox_subject(shard, &account)), None, "another shard's subject");
        assert_eq!(mailbox_account(shard, "mbox.3.zz"), None);
        assert_eq!(mailbox_account(shard, &format!("consent.{account}")), None);
        assert_eq!(layout.shards().count(), 8);
    }

    #[test]
    fn check_rejects_unusable_limits() {
        assert!(Layout::default().check().is_ok());
        for bad in [
            Layout { shards: 0, ..Layout::default() },
            Layout { replicas: 0, ..Layout::default() },
            Layout { replicas: 6, ..Layout::default() },
            Layout { mailbox_quota: 0, ..Layout::default() },
            Layout { mailbox_ttl: Duration::from_millis(10), ..Layout::default() },
            Layout { max_envelope_bytes: SERVER_MAX_PAYLOAD + 1, ..Layout::default() },
        ] {
            assert!(matches!(bad.check(), Err(StoreError::Layout(_))), "{bad:?}");
        }
    }
}
