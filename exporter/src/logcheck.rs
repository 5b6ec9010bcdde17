//! The export log checked against what vouches for it: the exporter's own latest signed head and the relay's copy
//! (invariant 8: damage to a store is detected and reported, never silently turned into a shorter history).
//!
//! sled discards every write after a damaged point of its files without an error, so a damaged store opens as a
//! shorter but self-consistent log. What cannot shrink with it is what left the store: the heads signed over the log
//! and the relay's copy, which holds every published entry under heads signed with the log key. So the exporter
//! checks its log against its latest stored head ([`check_local`], at start and every pass) and against the relay's
//! latest signed head ([`check_relay`], every pass, before reading a feed or delivering anything); a mismatch is a
//! [`LogDamage`], which stops it. [`recover`] rebuilds a log that lost its tail from the relay's copy, verified
//! against every head the relay holds and every head the store kept.
//!
//! Contract: nothing here trusts the relay. Only a head whose signature verifies under the exporter's own log key
//! can make the exporter stop or a leaf enter its log; an unsigned size or a head signed by another key is a relay
//! fault ([`RelayLinkError`]), never damage. Recovery only appends: it refuses a store whose entries differ from the
//! relay's, and writes nothing unless every check passed.

use std::collections::BTreeMap;

use ed25519_dalek::VerifyingKey;
use relay_proto::merkle::{ExportLeaf, MerkleLog, SignedTreeHead, leaf_hash, log_key_from_wire};
use relay_proto::wire::{ConsentChanges, LogCopy, ReadLog, export_request::Body as Req, export_response::Body as Resp};
use relay_proto::{AccountId, MAX_READ_LOG_ENTRIES};

use crate::core::{Evidence, LogRecord, Write};
use crate::feed;
use crate::ids::{Pair, WebhookId};
use crate::outbox::{ExporterStore, StoreError};
use crate::relay_link::{ExportClient, RelayLinkError};

/// What the rest of the message says to do.
const RECOVER: &str = "stop exporting; rebuild the log with `relay-exporter --recover-log-from-relay`";

/// How the export log was found damaged. Each one stops the exporter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LogDamage {
    /// The store counts more (or fewer) records than it holds.
    #[error("export log damaged: the store counts {counted} entries but holds {held}; {RECOVER}")]
    Count {
        /// The stored count.
        counted: u64,
        /// The records read.
        held: u64,
    },
    /// The store's latest signed head covers entries the store no longer holds.
    #[error("export log damaged: the latest signed head covers {head} entries but the store holds {len}; {RECOVER}")]
    LostEntries {
        /// Size of the head.
        head: u64,
        /// Entries held.
        len: u64,
    },
    /// The store says the relay holds more entries than the store does.
    #[error("export log damaged: the relay was sent {published} entries but the store holds {len}; {RECOVER}")]
    LostPublished {
        /// Entries published.
        published: u64,
        /// Entries held.
        len: u64,
    },
    /// A stored head is not signed by the log key.
    #[error("export log damaged: the stored head of size {size} is not signed by this exporter's log key; {RECOVER}")]
    ForeignHead {
        /// Size of the head.
        size: u64,
    },
    /// The entries under a signed head changed.
    #[error(
        "export log damaged: the log's root over its first {size} entries is not that of the {which} signed head of \
         that size (entries changed); {RECOVER}"
    )]
    Changed {
        /// Size of the head.
        size: u64,
        /// `stored` or `relay's`.
        which: &'static str,
    },
    /// The relay holds a head, signed with this exporter's key, over more entries than the store holds.
    #[error(
        "export log damaged: the relay holds {relay} log entries under a head signed with this exporter's key, the \
         store only {len}; {RECOVER}"
    )]
    RelayAhead {
        /// Size of the relay's signed head.
        relay: u64,
        /// Entries held.
        len: u64,
    },
    /// The relay's copy was pinned to another log key: `log.key` is not the key this log was signed with.
    #[error(
        "export log damaged: the relay's copy of the log is signed with key {relay}, not this exporter's {local} \
         (log.key replaced?); stop exporting and restore log.key"
    )]
    KeyChanged {
        /// The relay's pinned key, hex.
        relay: String,
        /// This exporter's key, hex.
        local: String,
    },
}

/// Checks the in-memory `log` (built from the store's records) against the store: its record count, the heads it
/// kept (each signed with `key`, with the root over that many entries; `all_heads` false checks the latest only,
/// the cheap check of every pass) and how much of it the relay was sent.
pub fn check_local(
    store: &ExporterStore,
    log: &MerkleLog,
    key: &VerifyingKey,
    all_heads: bool,
) -> Result<Result<(), LogDamage>, StoreError> {
    let len = log.len();
    let counted = store.log_len()?;
    if counted != len {
        return Ok(Err(LogDamage::Count { counted, held: len }));
    }
    let heads = store.heads()?;
    let checked = if all_heads { &heads[..] } else { heads.last().map(std::slice::from_ref).unwrap_or_default() };
    for head in checked {
        if let Err(damage) = matches(log, head, key, "stored") {
            return Ok(Err(damage));
        }
    }
    let published = store.published()?;
    if published > len {
        return Ok(Err(LogDamage::LostPublished { published, len }));
    }
    Ok(Ok(()))
}

/// Whether `log` extends `head`, which must be signed with `key`.
fn matches(log: &MerkleLog, head: &SignedTreeHead, key: &VerifyingKey, which: &'static str) -> Result<(), LogDamage> {
    let size = head.head.size;
    if head.verify(key).is_err() {
        return Err(LogDamage::ForeignHead { size });
    }
    if size > log.len() {
        return Err(if which == "stored" {
            LogDamage::LostEntries { head: size, len: log.len() }
        } else {
            LogDamage::RelayAhead { relay: size, len: log.len() }
        });
    }
    match log.root_at(size) {
        Ok(root) if root == head.head.root => Ok(()),
        _ => Err(LogDamage::Changed { size, which }),
    }
}

/// The relay's pinned key and latest head, checked: `None` while nothing was published.
fn relay_head(copy: &LogCopy, key: &VerifyingKey) -> Result<Result<Option<SignedTreeHead>, LogDamage>, RelayLinkError> {
    let Some(latest) = &copy.latest else {
        if copy.size != 0 || !copy.log_key.is_empty() {
            return Err(RelayLinkError::Unexpected("a log copy with entries but no head".into()));
        }
        return Ok(Ok(None));
    };
    let bad = |what: &str| RelayLinkError::Unexpected(format!("the relay's log copy: {what}"));
    let relay_key = log_key_from_wire(&copy.log_key).map_err(|e| bad(&e.to_string()))?;
    if relay_key != *key {
        return Ok(Err(LogDamage::KeyChanged {
            relay: hex::encode(relay_key.as_bytes()),
            local: hex::encode(key.as_bytes()),
        }));
    }
    let head = SignedTreeHead::try_from(latest).map_err(|e| bad(&e.to_string()))?;
    if head.verify(key).is_err() {
        // Not ours: the relay is at fault, the store may be fine.
        return Err(bad("its latest head is not signed with the log key"));
    }
    if head.head.size != copy.size {
        return Err(bad("its latest head is not over all its entries"));
    }
    Ok(Ok(Some(head)))
}

/// Asks the relay for one page of its copy.
pub async fn read_copy(client: &ExportClient, start_index: u64, max_entries: u32) -> Result<LogCopy, RelayLinkError> {
    match client.request(Req::ReadLog(ReadLog { start_index, max_entries })).await? {
        Resp::LogCopy(copy) => Ok(copy),
        _ => Err(RelayLinkError::Unexpected("expected LogCopy".into())),
    }
}

/// Every head the relay published, read page by page over its copy, and the relay's size. Unchecked: the auditor
/// checks each against the log (a head the relay made up fails its signature there).
pub async fn relay_heads(client: &ExportClient) -> Result<(u64, Vec<SignedTreeHead>), RelayLinkError> {
    let bad = |e: relay_proto::merkle::MerkleError| RelayLinkError::Unexpected(format!("a relay head: {e}"));
    let first = read_copy(client, 0, 0).await?;
    let mut heads = Vec::new();
    let mut start = 0;
    while start < first.size {
        let page = read_copy(client, start, MAX_READ_LOG_ENTRIES as u32).await?;
        if page.entries.is_empty() {
            return Err(RelayLinkError::Unexpected(format!("no entry from {start} of {}", first.size)));
        }
        start = start.saturating_add(page.entries.len() as u64);
        for h in &page.heads {
            heads.push(SignedTreeHead::try_from(h).map_err(bad)?);
        }
    }
    if let Some(latest) = &first.latest {
        let latest = SignedTreeHead::try_from(latest).map_err(bad)?;
        if heads.last() != Some(&latest) {
            heads.push(latest);
        }
    }
    Ok((first.size, heads))
}

/// Checks `log` against the relay's latest head (one small request): the relay's copy must be a prefix of the log,
/// under the same key. A relay that holds more, under a head signed with `key`, proves that the store lost entries.
pub async fn check_relay(
    client: &ExportClient,
    log: &MerkleLog,
    key: &VerifyingKey,
) -> Result<Result<(), LogDamage>, RelayLinkError> {
    let copy = read_copy(client, 0, 0).await?;
    Ok(match relay_head(&copy, key)? {
        Ok(Some(head)) => matches(log, &head, key, "relay's"),
        Ok(None) => Ok(()),
        Err(damage) => Err(damage),
    })
}

/// Why a recovery did not happen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecoveryError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The relay could not be read, or sent something that is not a log copy.
    #[error(transparent)]
    Relay(#[from] RelayLinkError),
    /// The relay's copy does not verify, or the store's log is not a prefix of it: nothing was written.
    #[error("cannot recover the export log from the relay: {0}")]
    Refused(String),
}

/// What a recovery did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Entries the store held before.
    pub kept: u64,
    /// Entries appended from the relay's copy.
    pub appended: u64,
    /// Heads taken from the relay.
    pub heads: u64,
    /// Appended entries whose consent evidence was found neither in the store nor in the relay's consent feed (the
    /// auditor reports them).
    pub without_evidence: u64,
}

/// The whole relay copy, read page by page.
struct RelayCopy {
    entries: Vec<(AccountId, Vec<u8>)>,
    heads: Vec<SignedTreeHead>,
    latest: Option<SignedTreeHead>,
}

async fn read_all(client: &ExportClient, key: &VerifyingKey) -> Result<RelayCopy, RecoveryError> {
    let refused = |what: String| RecoveryError::Refused(what);
    let first = read_copy(client, 0, 0).await?;
    let latest = relay_head(&first, key)?.map_err(|d| refused(d.to_string()))?;
    let size = latest.map_or(0, |h| h.head.size);
    let mut copy = RelayCopy { entries: Vec::new(), heads: Vec::new(), latest };
    while (copy.entries.len() as u64) < size {
        let start = copy.entries.len() as u64;
        let page = read_copy(client, start, MAX_READ_LOG_ENTRIES as u32).await?;
        if page.entries.is_empty() {
            return Err(refused(format!("the relay returned no entry from {start} of {size}")));
        }
        for e in page.entries {
            let account = AccountId::from_slice(&e.account_id)
                .ok_or_else(|| refused(format!("entry {}: account id is not 16 bytes", copy.entries.len())))?;
            copy.entries.push((account, e.leaf.to_vec()));
        }
        for h in &page.heads {
            copy.heads.push(SignedTreeHead::try_from(h).map_err(|e| refused(format!("a relay head: {e}")))?);
        }
    }
    copy.entries.truncate(usize::try_from(size).unwrap_or(usize::MAX));
    Ok(copy)
}

/// The relay's consent feed from the start, every statement verified, by statement hash: the evidence of entries the
/// store lost together with their statements.
async fn feed_evidence(client: &ExportClient) -> Result<BTreeMap<[u8; 32], (Pair, u64, Evidence)>, RecoveryError> {
    let mut out = BTreeMap::new();
    let mut after_cursor = 0;
    loop {
        let page = match client.request(Req::ConsentChanges(ConsentChanges { after_cursor })).await? {
            Resp::ConsentChangeList(l) => l,
            _ => return Err(RelayLinkError::Unexpected("expected a change list".into()).into()),
        };
        if feed::caught_up(after_cursor, &page) {
            return Ok(out);
        }
        for change in &page.changes {
            // A change that does not verify is no evidence (the feed reader skips it the same way).
            let Ok(statement) = feed::verify(change) else { continue };
            let pair = Pair::new(statement.account, statement.affiliate.clone(), statement.purpose);
            let evidence = Evidence {
                statement: hex::encode(&change.statement),
                signature: hex::encode(&change.signature),
                identity_key: hex::encode(&change.identity_key),
                recorded_at_ms: change.recorded_at_ms,
            };
            out.insert(relay_proto::consent::statement_hash(&change.statement), (pair, statement.sequence, evidence));
        }
        after_cursor = page.next_cursor;
    }
}

/// The stored statement of `pair` whose hash is `hash`, if the store kept it.
fn stored_evidence(store: &ExporterStore, pair: &Pair, hash: &[u8; 32]) -> Result<Option<Evidence>, StoreError> {
    Ok(store
        .statements_of(pair)?
        .into_iter()
        .map(|(_, e)| e)
        .find(|e| hex::decode(&e.statement).is_ok_and(|bytes| relay_proto::consent::statement_hash(&bytes) == *hash)))
}

/// Rebuilds the tail of the store's log from the relay's copy: every relay head must be signed with `key` and have
/// the root over that many of the relay's entries; the store's entries must be the relay's first ones, and every
/// head the store kept must be one the relay's entries extend. Then the missing entries are appended (with their
/// consent evidence from the store, else from the relay's consent feed, whose statements are also stored again),
/// the relay's heads stored, the published count set to the relay's size, and all of it flushed.
pub async fn recover(
    store: &ExporterStore,
    client: &ExportClient,
    key: &VerifyingKey,
) -> Result<Recovered, RecoveryError> {
    let refused = RecoveryError::Refused;
    let copy = read_all(client, key).await?;
    let relay_log = MerkleLog::from_leaf_hashes(copy.entries.iter().map(|(_, leaf)| leaf_hash(leaf)));
    for head in copy.heads.iter().chain(&copy.latest) {
        matches(&relay_log, head, key, "relay's")
            .map_err(|_| refused(format!("the relay's head of size {} does not match its entries", head.head.size)))?;
    }
    let mut local = Vec::new();
    store.visit_log(|index, record| {
        local.push((index, record.leaf));
        Ok::<_, StoreError>(())
    })?;
    for (index, leaf) in &local {
        let relay_leaf = usize::try_from(*index).ok().and_then(|i| copy.entries.get(i));
        if relay_leaf.is_some_and(|(_, l)| l != leaf) {
            return Err(refused(format!("the store's entry {index} differs from the relay's; nothing was written")));
        }
    }
    let kept = local.len() as u64;
    for head in store.heads()? {
        if head.head.size > relay_log.len() && head.head.size > kept {
            return Err(refused(format!(
                "the store's head of size {} covers entries neither the store nor the relay holds",
                head.head.size
            )));
        }
        if head.head.size <= relay_log.len() {
            matches(&relay_log, &head, key, "stored")
                .map_err(|d| refused(format!("the relay's entries do not extend a stored head: {d}")))?;
        }
    }

    let mut recovered = Recovered { kept, ..Recovered::default() };
    let mut from_feed = None;
    let mut records = Vec::new();
    for (index, (account, leaf)) in copy.entries.iter().enumerate().skip(local.len()) {
        let decoded = ExportLeaf::decode(leaf).map_err(|e| refused(format!("the relay's entry {index}: {e}")))?;
        let purpose = relay_proto::consent::Purpose::parse(&decoded.purpose)
            .ok_or_else(|| refused(format!("the relay's entry {index}: unknown purpose")))?;
        let pair = Pair::new(*account, decoded.affiliate.clone(), purpose);
        let evidence = match stored_evidence(store, &pair, &decoded.consent_hash)? {
            Some(e) => Some(e),
            None => {
                if from_feed.is_none() {
                    from_feed = Some(feed_evidence(client).await?);
                }
                from_feed.as_ref().and_then(|f| f.get(&decoded.consent_hash)).map(|(_, _, e)| e.clone())
            }
        };
        if evidence.is_none() {
            recovered.without_evidence += 1;
        }
        let record = LogRecord { leaf: leaf.clone(), account: *account, evidence: evidence.unwrap_or_default() };
        records.push((index as u64, WebhookId::from_export_id(decoded.export_id), record));
    }
    // Every check passed: write.
    if let Some(statements) = &from_feed {
        for (pair, sequence, evidence) in statements.values() {
            let write = Write::Statement { pair: pair.clone(), sequence: *sequence, evidence: evidence.clone() };
            store.apply(&write)?;
        }
    }
    for (index, id, record) in &records {
        store.append_recovered(*index, id, record)?;
    }
    recovered.appended = records.len() as u64;
    for head in copy.heads.iter().chain(&copy.latest) {
        store.put_head(head)?;
    }
    recovered.heads = copy.heads.len() as u64;
    store.set_published(relay_log.len())?;
    store.flush().await?;
    Ok(recovered)
}
