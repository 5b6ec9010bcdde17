//! The metadata exporter's building blocks (the `relay-exporter` process is built on them): the affiliates
//! catalogue, payloads with exactly the allowed fields, per-affiliate phone pseudonyms, and Standard Webhooks
//! signatures. Pure logic, no I/O beyond reading the catalogue file.
//!
//! The exporter never reads mailboxes: nothing here can name a mailbox tree or an envelope.

pub mod affiliates;
pub mod payload;
pub mod webhook;

pub use affiliates::{Affiliate, Catalogue, CatalogueError, Field};
