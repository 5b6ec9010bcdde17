//! relay-exporter: the metadata exporter process and the export-log auditor (`relay-audit`).
//!
//! Pure logic, no I/O: the exporter's rules ([`core`]: what a change from the relay's feeds does to the outbox,
//! and every delivery attempt, lease → in flight → post → release → settle, as events in and effects out), the
//! feeds' changes checked and the events they lead to ([`feed`]), the exporter's identifiers, webhook ids and
//! (account, affiliate, purpose) pairs ([`ids`]), the affiliates catalogue ([`affiliates`]), payloads with exactly
//! the allowed fields and per-affiliate phone pseudonyms ([`payload`]), Standard Webhooks signatures ([`webhook`]).
//! The I/O: the link to the relay's export interface ([`relay_link`]), the sled store that performs the core's
//! writes, with the export log ([`outbox`]), the checks of that log against its signed heads and the relay's
//! copy, and its recovery from that copy ([`logcheck`]), a minimal webhook client ([`http`]), the witness link that gets each
//! new tree head cosigned ([`witness_link`]), the async driver of the core ([`process`]), and the auditor that
//! checks a stored log ([`audit`]).
//!
//! Contract: the exporter never reads mailboxes. This crate does not depend on the relay's crate (`relay-server`),
//! so it cannot name a mailbox tree or an envelope store; `.ci/run` fails if that dependency ever appears. What it
//! learns of users comes only through the export interface's requests (`relay-proto`'s `ExportRequest`).

pub mod affiliates;
pub mod audit;
pub mod compact;
pub mod core;
pub mod feed;
pub mod http;
pub mod ids;
pub mod logcheck;
pub mod outbox;
pub mod payload;
pub mod process;
pub mod regulator;
pub mod relay_link;
pub mod vault;
pub mod webhook;
pub mod witness_link;

pub use affiliates::{Affiliate, Catalogue, CatalogueError, CurrentNotice, Field};
pub use process::{Exporter, ExporterError, Progress};
