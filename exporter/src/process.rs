//! The `relay-exporter` process: its data dir (TLS identity, pseudonym master key, sled store), and the loop that
//! reads the relay's consent feed into the outbox and delivers due webhooks.
//!
//! Contract (the withdrawal fence, `docs/exporter.md`): an export is sent only inside a lease from `BeginExport`
//! asked immediately before that attempt, never started with less than [`HTTP_TIMEOUT`] left before the lease's
//! deadline, and the lease is released with `EndExport` after it. A denied export is dropped. An entry leaves the
//! outbox only on a 2xx answer, a denial, or a withdrawal of its pair; failures are retried with exponential backoff
//! (1 s doubling to 10 min, with jitter). Feed and delivery run in one task, one after the other, so a withdrawal
//! read from the feed cannot race a delivery of the same entry. Logs carry no personal data.
//!
//! Every export the affiliate acknowledged is appended to the Merkle export log in the same transaction that takes
//! it out of the outbox; so is one dropped after an attempt that got no answer (marked durably before the request
//! leaves), since the affiliate may hold it. Its leaf's time is when the attempt began, before the lease was asked for, so it precedes
//! any withdrawal the relay recorded while the attempt ran. After each pass the exporter signs a tree head over the
//! whole log with its log key (`log.key`, Ed25519, mode 0600) and publishes the new entries and the head to the
//! relay, which shows each user their own entries.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::{Mutex, MutexGuard};

use ed25519_dalek::SigningKey;
use relay_proto::merkle::{MerkleLog, SignedTreeHead};
use relay_proto::wire::{
    BeginExport, ConsentChanges, EndExport, PublishLog, PublishedEntry, SubjectChanges, export_request::Body as Req,
    export_response::Body as Resp,
};
use tokio::sync::watch;

use crate::affiliates::Catalogue;
use crate::feed::{self, Applied};
use crate::http::{self, HttpError, Url};
use crate::ids::WebhookId;
use crate::outbox::{CONSENT_CURSOR, Entry, ExporterStore, Kind, SUBJECT_CURSOR, StoreError, log_record};
use crate::relay_link::{ExportClient, RelayLinkError};
use crate::webhook;
use relay_quic::identity::{Identity, TlsError};

/// Bound of one webhook request; shorter than the relay's lease.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// First retry delay.
pub const RETRY_BASE: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const RETRY_MAX: Duration = Duration::from_secs(600);
/// Feed pages read per pass.
pub const PAGES_PER_PASS: usize = 16;
/// Deliveries attempted per pass.
pub const DELIVERIES_PER_PASS: usize = 64;

/// Why the exporter could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExporterError {
    /// The data dir or key file could not be used.
    #[error("exporter data dir: {0}")]
    Io(#[from] std::io::Error),
    /// The pseudonym key file is not 32 bytes.
    #[error("pseudonym key file {0} is not 32 bytes")]
    BadKey(PathBuf),
    /// The TLS identity could not be loaded or created.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An affiliate's endpoint cannot be used by this exporter.
    #[error("affiliate {affiliate:?}: {source}")]
    Endpoint {
        /// The affiliate.
        affiliate: String,
        /// Why.
        source: HttpError,
    },
}

/// What the exporter has done so far, for operators and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Passes (feed read, then due deliveries) completed without a relay error.
    pub passes: u64,
    /// The committed feed cursor.
    pub cursor: u64,
    /// Changes read from the feed since start.
    pub changes: u64,
    /// Entries in the outbox after the last pass.
    pub outbox: usize,
    /// Webhooks acknowledged with 2xx since start.
    pub delivered: u64,
    /// Entries in the export log.
    pub logged: u64,
    /// Entries of the export log the relay holds.
    pub published: u64,
}

/// The exporter, opened on its data dir.
pub struct Exporter {
    identity: Identity,
    master_key: [u8; 32],
    log_key: SigningKey,
    log: Mutex<MerkleLog>,
    store: ExporterStore,
    catalogue: Catalogue,
    endpoints: std::collections::BTreeMap<String, Url>,
    tls: http::Tls,
    poll: Duration,
    progress: watch::Sender<Progress>,
}

fn load_or_create_key(path: &Path) -> Result<[u8; 32], ExporterError> {
    if !path.exists() {
        let key: [u8; 32] = rand::random();
        relay_quic::durable_file::create_secret(path, &key)?;
    }
    std::fs::read(path)?.try_into().map_err(|_| ExporterError::BadKey(path.to_owned()))
}

/// The retry delay after `attempts` failures: 1 s doubling to 10 min, within ±20 %.
pub fn backoff(attempts: u32) -> Duration {
    let base = RETRY_BASE.saturating_mul(1u32 << attempts.saturating_sub(1).min(20)).min(RETRY_MAX);
    let ms = u64::try_from(base.as_millis()).unwrap_or(u64::MAX);
    let jitter = rand::random::<u64>() % (ms * 2 / 5 + 1);
    Duration::from_millis(ms * 4 / 5 + jitter)
}

impl Exporter {
    /// Opens the data dir, creating the TLS identity, the pseudonym and log keys (mode 0600) and the store on first
    /// start. `https://` endpoints are verified against the system's root certificates (see
    /// [`Exporter::trust_extra_ca`] for a private CA).
    pub fn open(data_dir: &Path, catalogue: Catalogue, poll: Duration) -> Result<Self, ExporterError> {
        std::fs::create_dir_all(data_dir)?;
        let mut endpoints = std::collections::BTreeMap::new();
        for a in catalogue.iter() {
            let url = http::parse_url(&a.endpoint)
                .map_err(|source| ExporterError::Endpoint { affiliate: a.id.clone(), source })?;
            endpoints.insert(a.id.clone(), url);
        }
        let identity = Identity::load_or_create(data_dir)?;
        let master_key = load_or_create_key(&data_dir.join("pseudonym.key"))?;
        let log_key = SigningKey::from_bytes(&load_or_create_key(&data_dir.join("log.key"))?);
        let store = ExporterStore::open(&data_dir.join("db"))?;
        let log = load_log(&store)?;
        let progress = watch::Sender::new(Progress {
            cursor: store.cursor()?,
            outbox: store.len(),
            logged: log.len(),
            published: store.published()?,
            ..Progress::default()
        });
        let tls = http::Tls::system().map_err(|source| ExporterError::Endpoint { affiliate: "*".into(), source })?;
        if tls.roots() == 0 && endpoints.values().any(|u| u.tls) {
            tracing::warn!("no system root certificates: https affiliates need --affiliate-ca");
        }
        Ok(Self {
            identity,
            master_key,
            log_key,
            log: Mutex::new(log),
            store,
            catalogue,
            endpoints,
            tls,
            poll,
            progress,
        })
    }

    /// Also trusts the CA certificates in `pem` for `https://` affiliates (an operator's private CA).
    pub fn trust_extra_ca(&mut self, pem: &[u8]) -> Result<(), ExporterError> {
        self.tls = http::Tls::with_extra_roots(Some(pem))
            .map_err(|source| ExporterError::Endpoint { affiliate: "*".into(), source })?;
        Ok(())
    }

    /// Hex of the Ed25519 key that verifies the export log's tree heads.
    pub fn log_key(&self) -> String {
        hex::encode(self.log_key.verifying_key().as_bytes())
    }

    /// The line `relay-exporter` prints when it is ready: its certificate's SHA-256 and its log key.
    pub fn ready_line(&self) -> relay_quic::ready::ReadyLine {
        relay_quic::ready::ReadyLine::Exporter {
            cert_sha256: self.identity.cert_sha256(),
            log_key: self.log_key.verifying_key().to_bytes(),
        }
    }

    fn log(&self) -> MutexGuard<'_, MerkleLog> {
        self.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends to the in-memory tree the records the store logged since (a delivery, or an export dropped after
    /// an unanswered attempt, see `ExporterStore::drop_export`).
    fn sync_log(&self) -> Result<(), StoreError> {
        let mut log = self.log();
        loop {
            let page = self.store.log_records(log.len(), 1024)?;
            if page.is_empty() {
                break;
            }
            for (index, record) in page {
                if index != log.len() {
                    return Err(StoreError::Corrupt(format!("log index {index} but {} leaves", log.len())));
                }
                log.append(&record.leaf);
            }
        }
        let logged = log.len();
        self.progress.send_modify(|p| p.logged = logged);
        Ok(())
    }

    /// Hex SHA-256 of the exporter's certificate: the relay's `exporter_cert_sha256`.
    pub fn fingerprint(&self) -> String {
        self.identity.fingerprint()
    }

    /// Follows the exporter's progress.
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// Runs until `shutdown` turns true: connects to the relay at `relay` (pinning `relay_fingerprint`), and every
    /// poll interval reads the feed and delivers what is due. Relay errors drop the connection and are retried.
    pub async fn run(
        self,
        relay: SocketAddr,
        relay_fingerprint: [u8; 32],
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), ExporterError> {
        let mut client: Option<ExportClient> = None;
        while !*shutdown.borrow() {
            if client.as_ref().is_some_and(ExportClient::is_closed) {
                client = None;
            }
            if client.is_none() {
                let connected = tokio::select! {
                    _ = shutdown.wait_for(|stop| *stop) => break,
                    c = ExportClient::connect(relay, relay_fingerprint, &self.identity) => c,
                };
                match connected {
                    Ok(c) => {
                        tracing::info!("connected to the relay's export interface");
                        client = Some(c);
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot reach the relay; retrying"),
                }
            }
            if let Some(c) = &client {
                match self.pass(c).await {
                    Ok(()) => self.progress.send_modify(|p| {
                        p.passes += 1;
                        p.outbox = self.store.len();
                    }),
                    Err(PassError::Relay(e)) => {
                        tracing::warn!(error = %e, "export interface error; reconnecting");
                        if let Some(c) = client.take() {
                            c.close().await;
                        }
                    }
                    Err(PassError::Store(e)) => return Err(e.into()),
                }
            }
            tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => {}
                () = tokio::time::sleep(self.poll) => {}
            }
        }
        if let Some(c) = client {
            c.close().await;
        }
        self.store.flush().await?;
        Ok(())
    }

    async fn pass(&self, client: &ExportClient) -> Result<(), PassError> {
        self.read_feed(client, CONSENT_CURSOR).await?;
        self.read_feed(client, SUBJECT_CURSOR).await?;
        self.deliver_due(client).await?;
        self.publish(client).await
    }

    /// Reads one feed (consent changes, or subject changes) into the outbox.
    async fn read_feed(&self, client: &ExportClient, feed: &[u8]) -> Result<(), PassError> {
        for _ in 0..PAGES_PER_PASS {
            let after_cursor = self.store.feed_cursor(feed)?;
            let request = if feed == SUBJECT_CURSOR {
                Req::SubjectChanges(SubjectChanges { after_cursor })
            } else {
                Req::ConsentChanges(ConsentChanges { after_cursor })
            };
            let list = match client.request(request).await? {
                Resp::ConsentChangeList(l) => l,
                Resp::SubjectChangeList(l) => {
                    relay_proto::wire::ConsentChangeList { changes: l.changes, next_cursor: l.next_cursor }
                }
                _ => return Err(RelayLinkError::Unexpected("expected a change list".into()).into()),
            };
            if list.changes.is_empty() && list.next_cursor <= after_cursor {
                return Ok(());
            }
            let now = relay_proto::now_ms();
            for change in &list.changes {
                match feed::apply(&self.store, &self.catalogue, &self.master_key, change, now)? {
                    Applied::Withdrawn { dropped, notified } if dropped > 0 || notified => {
                        tracing::info!(dropped, notified, "withdrawal applied to the outbox");
                    }
                    _ => {}
                }
            }
            // A dropped export that may have reached its affiliate was logged.
            self.sync_log()?;
            // The cursor moves only once the outbox writes of these changes are durable.
            self.store.flush().await?;
            self.store.set_feed_cursor(feed, list.next_cursor.max(after_cursor))?;
            self.store.flush().await?;
            let read = list.changes.len() as u64;
            self.progress.send_modify(|p| {
                if feed == CONSENT_CURSOR {
                    p.cursor = list.next_cursor.max(after_cursor);
                }
                p.changes += read;
            });
        }
        Ok(())
    }

    async fn deliver_due(&self, client: &ExportClient) -> Result<(), PassError> {
        for (id, entry) in self.store.due(relay_proto::now_ms(), DELIVERIES_PER_PASS)? {
            self.deliver(client, &id, entry).await?;
        }
        self.store.flush().await?;
        Ok(())
    }

    async fn deliver(&self, client: &ExportClient, id: &WebhookId, mut entry: Entry) -> Result<(), PassError> {
        let affiliate_id = &entry.pair.affiliate;
        let (Some(affiliate), Some(url)) = (self.catalogue.get(affiliate_id), self.endpoints.get(affiliate_id)) else {
            tracing::warn!(webhook = %id, "affiliate no longer in the catalogue; entry dropped");
            self.store.remove(id)?;
            return Ok(());
        };
        let outcome = match entry.kind {
            Kind::Withdrawn => self.post(url, &affiliate.secret, id, &entry.body).await.map_err(|e| e.to_string()),
            Kind::Export => {
                let started_ms = relay_proto::now_ms();
                let begin = BeginExport {
                    account_id: entry.pair.account.as_bytes().to_vec().into(),
                    affiliate: entry.pair.affiliate.clone(),
                    purpose: entry.pair.purpose.as_str().to_owned(),
                    statement_hash: entry.statement_hash.to_vec().into(),
                };
                let granted = match client.request(Req::BeginExport(begin)).await? {
                    Resp::ExportGranted(g) => g,
                    Resp::ExportDenied(d) => {
                        tracing::info!(webhook = %id, reason = %d.reason, "export denied by the relay; dropped");
                        if self.store.drop_export(id, &entry)? {
                            self.sync_log()?;
                        }
                        return Ok(());
                    }
                    _ => return Err(RelayLinkError::Unexpected("expected ExportGranted or ExportDenied".into()).into()),
                };
                let left = granted.deadline_ms.saturating_sub(relay_proto::now_ms());
                let outcome = if u128::from(left) < HTTP_TIMEOUT.as_millis() {
                    Err("lease too short to start a request".to_owned())
                } else {
                    // Durable before the request leaves: if no answer comes back (a crash, a lost connection), the
                    // affiliate may hold the data, and dropping the entry later must log it (`ExporterStore::drop_export`).
                    let unknown_before = entry.in_flight_ms;
                    entry.in_flight_ms = Some(unknown_before.unwrap_or(started_ms));
                    self.store.put(id, &entry)?;
                    self.store.flush().await?;
                    tracing::info!(webhook = %id, attempt = entry.attempts + 1, "posting export");
                    let outcome = self.post(url, &affiliate.secret, id, &entry.body).await;
                    // An answer (the data is held only on a 2xx, which `settle` logs) or nothing sent: known.
                    if matches!(outcome, Ok(_) | Err(HttpError::Connect(_) | HttpError::Tls(_))) {
                        entry.in_flight_ms = unknown_before;
                    }
                    outcome.map_err(|e| e.to_string())
                };
                let end = EndExport {
                    account_id: entry.pair.account.as_bytes().to_vec().into(),
                    affiliate: entry.pair.affiliate.clone(),
                    purpose: entry.pair.purpose.as_str().to_owned(),
                    lease_id: granted.lease_id,
                };
                let ended = client.request(Req::EndExport(end)).await;
                self.settle(id, &mut entry, outcome, started_ms)?;
                ended?;
                return Ok(());
            }
        };
        self.settle(id, &mut entry, outcome, 0)?;
        Ok(())
    }

    /// Records an attempt's outcome: removed (an export also logged, its pair marked delivered) on 2xx, rescheduled
    /// otherwise. `started_ms` is when an export attempt began (its log time).
    fn settle(
        &self,
        id: &WebhookId,
        entry: &mut Entry,
        outcome: Result<u16, String>,
        started_ms: u64,
    ) -> Result<(), StoreError> {
        match outcome {
            Ok(status) if (200..300).contains(&status) => {
                if entry.kind == Kind::Export {
                    let record = log_record(id, entry, started_ms)?;
                    self.store.complete_export(id, entry, &record)?;
                    self.sync_log()?;
                } else {
                    self.store.remove(id)?;
                }
                self.progress.send_modify(|p| p.delivered += 1);
                tracing::info!(webhook = %id, status, "webhook delivered");
            }
            other => {
                entry.attempts = entry.attempts.saturating_add(1);
                let delay = backoff(entry.attempts);
                entry.next_attempt_ms =
                    relay_proto::now_ms().saturating_add(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
                match other {
                    Ok(status) => tracing::info!(webhook = %id, status, ?delay, "webhook refused; will retry"),
                    Err(e) => tracing::info!(webhook = %id, error = %e, ?delay, "webhook failed; will retry"),
                }
                self.store.put(id, entry)?;
            }
        }
        Ok(())
    }

    /// Signs a head over the log if it grew, then sends the relay what it does not hold yet, in pages.
    async fn publish(&self, client: &ExportClient) -> Result<(), PassError> {
        let len = self.log().len();
        if len == 0 {
            return Ok(());
        }
        let mut heads = self.store.heads()?;
        if heads.last().is_none_or(|h| h.head.size < len) {
            heads.push(self.sign_head(len)?);
            self.store.flush().await?;
        }
        for _ in 0..PAGES_PER_PASS {
            let published = self.store.published()?;
            if published >= len {
                break;
            }
            let end = (published + relay_proto::MAX_PUBLISHED_ENTRIES as u64).min(len);
            let head = match heads.iter().find(|h| h.head.size == end) {
                Some(h) => *h,
                None => {
                    let h = self.sign_head(end)?;
                    heads.push(h);
                    h
                }
            };
            let mut entries = Vec::new();
            for (_, record) in self.store.log_records(published, (end - published) as usize)? {
                entries.push(PublishedEntry {
                    account_id: record.account.as_bytes().to_vec().into(),
                    leaf: record.leaf.into(),
                });
            }
            let request = PublishLog {
                first_index: published,
                entries,
                head: Some((&head).into()),
                log_key: self.log_key.verifying_key().to_bytes().to_vec().into(),
            };
            let size = match client.request(Req::PublishLog(request)).await? {
                Resp::LogPublished(p) => p.size,
                _ => return Err(RelayLinkError::Unexpected("expected LogPublished".into()).into()),
            };
            if size > len {
                tracing::error!(relay = size, local = len, "the relay holds more log entries than this exporter");
                return Ok(());
            }
            if size != end {
                tracing::info!(relay = size, "the relay's copy of the log differs in size; resuming from it");
            }
            self.store.set_published(size)?;
            self.store.flush().await?;
            self.progress.send_modify(|p| p.published = size);
        }
        Ok(())
    }

    /// Signs and stores the head over the first `size` entries (the caller flushes).
    fn sign_head(&self, size: u64) -> Result<SignedTreeHead, StoreError> {
        let root = self.log().root_at(size).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let head = relay_proto::merkle::TreeHead { size, root, timestamp_ms: relay_proto::now_ms() };
        let signed = head.sign(&self.log_key);
        self.store.put_head(&signed)?;
        Ok(signed)
    }

    async fn post(&self, url: &Url, key: &[u8], id: &WebhookId, body: &str) -> Result<u16, HttpError> {
        let timestamp = relay_proto::now_ms() / 1000;
        let id = id.to_string();
        let signature = webhook::sign(key, &id, timestamp, body.as_bytes());
        let headers = [
            ("content-type", "application/json".to_owned()),
            ("webhook-id", id),
            ("webhook-timestamp", timestamp.to_string()),
            ("webhook-signature", signature),
        ];
        http::post(url, &self.tls, &headers, body.as_bytes(), HTTP_TIMEOUT).await
    }
}

/// Rebuilds the Merkle tree from the stored log records.
pub fn load_log(store: &ExporterStore) -> Result<MerkleLog, StoreError> {
    let mut hashes = Vec::new();
    store.visit_log(|index, record| {
        if index != hashes.len() as u64 {
            return Err(StoreError::Corrupt(format!("log record {index} out of sequence")));
        }
        hashes.push(relay_proto::merkle::leaf_hash(&record.leaf));
        Ok(())
    })?;
    Ok(MerkleLog::from_leaf_hashes(hashes))
}

#[derive(Debug, thiserror::Error)]
enum PassError {
    #[error(transparent)]
    Relay(#[from] RelayLinkError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_to_ten_minutes_with_jitter() {
        for _ in 0..32 {
            let first = backoff(1);
            assert!(first >= Duration::from_millis(800) && first <= Duration::from_millis(1200), "{first:?}");
            let third = backoff(3);
            assert!(third >= Duration::from_millis(3200) && third <= Duration::from_millis(4800), "{third:?}");
            assert!(backoff(40) <= RETRY_MAX * 6 / 5 && backoff(40) >= RETRY_MAX * 4 / 5);
        }
    }

    #[test]
    fn the_key_file_is_created_once_owner_only() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("pseudonym.key");
        let key = load_or_create_key(&path).expect("create");
        assert_eq!(load_or_create_key(&path).expect("load"), key);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777, 0o600);
        }
        std::fs::write(&path, b"short").expect("write");
        assert!(matches!(load_or_create_key(&path), Err(ExporterError::BadKey(_))));
    }

    #[test]
    fn https_endpoints_are_accepted_and_a_bad_extra_ca_is_refused() {
        let text = include_str!("../affiliates.example.toml").replacen("http://", "https://", 1);
        let catalogue = Catalogue::parse(&text).expect("catalogue");
        let dir = tempfile::tempdir().expect("dir");
        let mut exporter = Exporter::open(dir.path(), catalogue, Duration::from_millis(50)).expect("https accepted");
        assert!(exporter.endpoints.get("adsco").is_some_and(|u| u.tls));
        let bad = b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n";
        assert!(exporter.trust_extra_ca(bad).is_err());
    }
}
