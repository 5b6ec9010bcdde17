//! The metadata exporter's building blocks (the `relay-exporter` process is built on them): the affiliates
//! catalogue, payloads with exactly the allowed fields, per-affiliate phone pseudonyms, and Standard Webhooks
//! signatures (pure logic); and the `relay-exporter` process built on them: the feed reader ([`feed`]), the durable
//! outbox ([`outbox`]) with the export log, a minimal webhook client ([`http`]), the loop that ties them
//! ([`process`]), and the auditor that checks a stored log ([`audit`]).
//!
//! The exporter never reads mailboxes: nothing here can name a mailbox tree or an envelope.

pub mod affiliates;
pub mod audit;
pub mod feed;
pub mod http;
pub mod outbox;
pub mod payload;
pub mod process;
pub mod webhook;

pub use affiliates::{Affiliate, Catalogue, CatalogueError, Field};
pub use process::{Exporter, ExporterError, Progress};
