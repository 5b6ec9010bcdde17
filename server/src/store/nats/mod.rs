//! The relay's storage traits over NATS JetStream, for relay nodes that share one replicated cluster (issue #14):
//! the layout and its primitives are `relay_store_nats`; this module puts them behind [`crate::store::backend`].
//!
//! Contract:
//! - What exists: the mailboxes ([`NatsMailboxes`]), the erasure feed ([`NatsErasures`]), the notices
//!   ([`NatsNotices`]), the prekeys ([`NatsPrekeys`]), the verification codes and locks ([`NatsVerifications`]), the
//!   withdrawal fence's export leases ([`NatsLeases`]) and the durability barrier ([`JetStreamDurability`]). The
//!   other concerns still have only their sled implementations, and relayd does not open this backend yet
//!   (docs/scale.md says what exists).
//! - Every write here returns only after JetStream's publish acknowledgement: for the layout's R3 streams, after a
//!   quorum of two replicas stored it (fsynced first with the shipped `sync_interval: always`).
//! - Engine failures become the traits' [`crate::store::BackendError`]s, carrying the engine's text, never data.

pub mod erasures;
mod ids;
pub mod leases;
pub mod mailbox;
pub mod notices;
pub mod prekeys;
mod stamp;
pub mod verification;

pub use erasures::NatsErasures;
pub use leases::NatsLeases;
pub use mailbox::NatsMailboxes;
pub use notices::NatsNotices;
pub use prekeys::NatsPrekeys;
pub use verification::NatsVerifications;

use super::backend::{BoxFuture, Durability};

/// How long [`ready`] waits for a stream just created or updated to have a leader that answers.
pub const READY_WITHIN: std::time::Duration = std::time::Duration::from_secs(15);

/// Waits until stream `name` answers through `js` with a leader elected (or no cluster at all): a stream just
/// created in a cluster takes a moment to be placed and to elect its leader, and a publish before that fails with
/// "no stream found". Bounded by [`READY_WITHIN`]; the error names the stream and the last failure.
pub async fn ready(js: &async_nats::jetstream::Context, name: &str) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + READY_WITHIN;
    loop {
        let last = match js.get_stream(name).await {
            Ok(mut stream) => match stream.info().await {
                Ok(info) if info.cluster.as_ref().is_none_or(|c| c.leader.is_some()) => return Ok(()),
                Ok(_) => "no leader yet".to_owned(),
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("stream {name} not ready within {READY_WITHIN:?}: {last}"));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
use super::commit::CommitError;

/// The durability barrier of a store whose every write is durable when it returns.
///
/// Why a barrier that waits for nothing is correct: [`Durability::durable`] must return once every write applied
/// before the call is durable. A JetStream write (an append, a removal, a purge) returns only after the stream's
/// leader answered, and for a publish that answer is the acknowledgement sent once a quorum of the stream's
/// replicas stored the message. So when a caller reaches the barrier, everything it wrote before is already as
/// durable as JetStream makes it. It is only correct for writes to JetStream: a relay that kept some concern in
/// sled would still need the group commit for that concern's writes.
#[derive(Debug, Clone, Copy, Default)]
pub struct JetStreamDurability;

impl Durability for JetStreamDurability {
    fn durable(&self) -> BoxFuture<'_, Result<(), CommitError>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_barrier_answers_at_once() {
        // Nothing to wait for: the writes before it were acknowledged by a quorum when they returned.
        JetStreamDurability.durable().await.expect("durable");
    }
}
