//! Consent Relay client library: connect to a relay with its certificate pinned, register and authenticate with the
//! device's identity key, exchange end-to-end encrypted messages, manage consent, keep local state in a home
//! directory. All end-to-end cryptography lives here; the relay never links it.
//!
//! Layers, bottom up: [`pin`] (certificate pinning), [`identity`] (keys), [`e2ee`] (prekeys, PQXDH, Double
//! Ratchet, safety numbers: pure, no I/O), [`sealed`] (the sealed-sender envelope) and
//! [`verified_certificates`] (sender certificates already checked), [`content`] (message
//! plaintext), [`connection`] (the wire protocol over QUIC), [`home`] (local files), [`sessions`] (end-to-end
//! state and its persistence), [`messenger`] (what the CLI and applications use), [`consent`] (signed consent
//! statements and receipts), [`display`] (peer-provided text made safe for a terminal), [`witnessed`] (the witnesses
//! whose cosignature the export log's head must carry).

pub mod connection;
pub mod consent;
pub mod content;
pub mod display;
pub mod e2ee;
pub mod exports;
pub mod home;
pub mod identity;
pub mod messenger;
pub mod nodes;
pub mod pin;
pub mod pipeline;
pub mod sealed;
pub mod sessions;
pub mod subject;
pub mod verified_certificates;
pub mod witnessed;

pub use connection::{Authenticated, ClientError, Connection, DirectoryEntry, Inbox, InboxEvent};
pub use home::{Device, Home};
pub use identity::Identity;
pub use messenger::{
    Accepted, BatchSent, CodeRequested, Messenger, MessengerError, Received, ReceivedMessage, Sent, Verification,
};
pub use pipeline::{PipelineAnswers, PipelineWriter, SendEvent};
