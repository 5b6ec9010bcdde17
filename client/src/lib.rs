//! Consent Relay client library: connect to a relay with its certificate pinned, register and authenticate with the
//! device's identity key, send and receive sealed messages, keep local state in a home directory.
//!
//! Layers, bottom up: [`pin`] (certificate pinning), [`identity`] (keys), [`sealed`] (end-to-end envelope
//! encryption, client-side only), [`connection`] (the wire protocol over QUIC), [`home`] (local files),
//! [`messenger`] (what the CLI and applications use).

pub mod connection;
pub mod consent;
pub mod content;
pub mod e2ee;
pub mod home;
pub mod identity;
pub mod messenger;
pub mod pin;
pub mod sealed;
pub mod sessions;

pub use connection::{ClientError, Connection, DirectoryEntry, Inbox, InboxEvent};
pub use home::{Device, Home};
pub use identity::Identity;
pub use messenger::{Accepted, Messenger, MessengerError, ReceivedMessage, Sent};
