//! relay-witness: an independent witness of the exporter's export log (the model is C2SP tlog-witness).
//!
//! The witness has its own Ed25519 key and its own durable state: for each log it is configured to witness, the
//! size and root of the last head it cosigned ([`state`]). It cosigns a new head ([`service`]) only if the log's key
//! signed it and an RFC 6962 consistency proof shows it extends that last head; it refuses a smaller head (a
//! rollback) and a head of the same size with another root (a rewrite), and answers a submitter that assumed
//! another size with a conflict carrying its own. The new head is on disk before the cosignature leaves. The QUIC
//! endpoint ([`server`]) serves the witness protocol of `relay.proto`; [`limit`] bounds what one connection can ask.
//!
//! Contract: the witness sees tree heads and hashes only, never an export, an account or a phone number; it links
//! neither the exporter, nor the relay, nor the client, and no AEAD (`.ci/boundaries`). What a cosignature means is
//! defined in `relay_proto::witness`.

pub mod limit;
pub mod server;
pub mod service;
pub mod state;

pub use service::{Witness, WitnessOpenError};
