//! The relay's layout in NATS JetStream, for relay nodes that share one replicated store: plain async functions and
//! types over an [`async_nats::jetstream::Context`], with no dependency on the relay's own crate (the store traits
//! that put these behind the relay's storage interface come later; docs/scale.md says what exists).
//!
//! Contract:
//! - Every stream, subject and bucket name is written in one place, [`layout`]; [`Layout`] holds the limits (shards,
//!   replicas, mailbox quota and TTL, envelope size) and [`Layout::check`] rejects bad ones before anything is made.
//! - A write is reported done only once JetStream acknowledged it: for a replicated stream that is after a quorum
//!   of its replicas stored it (and, with the shipped server configuration, `sync_interval: always`, wrote it to
//!   disk).
//! - What a mailbox holds is opaque bytes keyed by recipient: nothing here reads, logs or derives anything from
//!   envelope contents. A phone number enters a key only through [`cas::ClaimKey`], which hashes it; a key in its
//!   E.164 form (with `+`) is not a valid key and is refused.
//! - Engine errors are returned as [`StoreError`], never as panics; a refusal the caller must act on (a full
//!   mailbox, a key that exists, a revision that moved, a lease held by another) has a variant of its own.
//!
//! Modules, one concern each: [`mailbox`] (sharded mailbox streams), [`cas`] (compare-and-set key-value buckets:
//! claims), [`lease`] (leases with a server-side TTL), [`fence`] (the withdrawal fence's export leases, several per
//! consent pair), [`feed`] (the consent statement stream and its cursor),
//! [`wake`] (cross-node wake-up subjects).

pub mod cas;
mod error;
pub mod feed;
pub mod fence;
pub mod layout;
pub mod lease;
pub mod mailbox;
pub mod wake;

pub use error::StoreError;
pub use layout::{Layout, Shard};
