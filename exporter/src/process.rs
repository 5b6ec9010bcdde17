//! The `relay-exporter` process: its data dir (TLS identity, pseudonym master key, log signing key, sled store), and
//! the async driver of the exporter's rules ([`crate::core`]): every pass it reads the relay's feeds into the core,
//! lets it deliver what is due, and publishes the export log.
//!
//! Contract: this module decides nothing about what is exported, when, or what is logged; it performs the core's
//! effects in the order given, each only once the ones before it are done (an [`Effect::Flush`] awaits sled's
//! flush), and hands the core every answer: the relay's to `BeginExport`, the affiliate's to a webhook (an HTTP
//! status, or whether anything of the request left), the completion of `EndExport` whatever its outcome. Feed and
//! delivery run in one task, one after the other, so a withdrawal read from the feed cannot race a delivery of the
//! same entry. A relay error ends the pass once the writes that follow from the attempt under way are done (the
//! connection is then made again); a store error, or the core refusing to go on, stops the exporter. Logs carry no
//! personal data.
//!
//! After each pass in which the log grew, the exporter signs a tree head over the whole log with its log key
//! (`log.key`, Ed25519, mode 0600) and publishes the new entries and the head to the relay, which shows each user
//! their own entries.
//!
//! Witnesses ([`Exporter::add_witness`], `--witness`): after signing a head, the exporter asks every configured
//! witness to cosign it ([`crate::witness_link::cosign`], from the largest head that witness cosigned before),
//! stores each cosignature with the head (flushed) and publishes the head with them. A witness that does not answer
//! holds nothing up: the head is published without its cosignature, the failure is logged (the witness's key id,
//! the size, the error; nothing personal) and the latest head is submitted again on a later pass, after a pause that
//! doubles up to [`WITNESS_MAX_BACKOFF`]; cosignatures that come later are published by re-publishing the latest
//! head. Bodies queued from then on carry the latest head with its cosignatures (`log_head`).
//! A lease whose `EndExport` failed is released again at the start of the next pass, on a new connection: the
//! relay keeps leases across its restarts, so a withdrawal waiting for one goes on once the attempt is over rather
//! than when the lease lapses.
//!
//! A damaged log stops the exporter ([`ExporterError::LogDamaged`]): checked by [`Exporter::check_log`] at start, and
//! every pass, before a feed is read or anything delivered, against the latest stored head and the relay's latest
//! signed head ([`crate::logcheck`]). [`Exporter::recover_log`] rebuilds a log that lost entries from the relay's copy.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use relay_proto::merkle::{MerkleLog, SignedTreeHead};
use relay_proto::wire::{
    BeginExport, ConsentChangeList, EndExport, PublishLog, PublishNotices, PublishedEntry, export_request::Body as Req,
    export_response::Body as Resp,
};
use tokio::sync::watch;

use crate::affiliates::Catalogue;
use crate::core::{
    AccountRecords, Answer, CheckedChange, CheckedErasure, Core, CoreError, Effect, HTTP_TIMEOUT, Known, Lease,
    LeaseAnswer, SystemEntropy, Write,
};
use crate::feed::{self, Feed};
use crate::http::{self, HttpError, Url};
use crate::ids::{Pair, WebhookId};
use crate::logcheck::{self, LogDamage, Recovered, RecoveryError};
use crate::outbox::{ExporterStore, StoreError};
use crate::relay_link::{ExportClient, RelayLinkError};
use crate::vault::{self, Vault, VaultError};
use crate::webhook;
use crate::witness_link::{self, WitnessSpec};
use relay_quic::identity::{Identity, TlsError};

/// Feed pages read per pass.
pub const PAGES_PER_PASS: usize = 16;
/// Leases whose release failed kept to release again (at most one per attempt, and attempts are sequential).
const MAX_UNRELEASED: usize = 64;

/// First pause before a witness that did not cosign is asked again.
pub const WITNESS_FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// Longest pause before a witness that did not cosign is asked again.
pub const WITNESS_MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The pause after `pause` before a witness that did not cosign is asked again: doubled, at most
/// [`WITNESS_MAX_BACKOFF`].
fn next_witness_backoff(pause: Duration) -> Duration {
    pause.saturating_mul(2).min(WITNESS_MAX_BACKOFF)
}

/// A configured witness and when it may be asked again.
struct WitnessSlot {
    spec: WitnessSpec,
    retry_at: Option<Instant>,
    backoff: Duration,
}

/// Why the exporter could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExporterError {
    /// The data dir or key file could not be used.
    #[error("exporter data dir: {0}")]
    Io(#[from] std::io::Error),
    /// The vault of delivered bodies could not be opened or written.
    #[error(transparent)]
    Vault(#[from] VaultError),
    /// The pseudonym key file is not 32 bytes.
    #[error("pseudonym key file {0} is not 32 bytes")]
    BadKey(PathBuf),
    /// The catalogue's notices could not be made (a stored notice does not match the catalogue's terms).
    #[error("notices: {0}")]
    Notices(#[from] relay_proto::notice::NoticeError),
    /// The TLS identity could not be loaded or created.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The rules refused to go on: an entry that cannot be logged (a damaged store), or a driver fault.
    #[error("exporter rules: {0}")]
    Core(#[from] CoreError),
    /// The export log is damaged: it lost or changed entries that a signed head (its own, or the relay's) covers. The
    /// exporter stops exporting; `relay-exporter --recover-log-from-relay` rebuilds it.
    #[error(transparent)]
    LogDamaged(#[from] LogDamage),
    /// Recovering the log from the relay failed; nothing was written unless every check passed.
    #[error(transparent)]
    Recovery(#[from] RecoveryError),
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
    /// Withdrawal and erasure notices abandoned since start, after their retry period: affiliates not told.
    pub abandoned: u64,
    /// Entries in the export log.
    pub logged: u64,
    /// Entries of the export log the relay holds.
    pub published: u64,
    /// Notices the relay acknowledged as current (0 until the first publication since start).
    pub notices: u32,
}

impl Progress {
    /// The Prometheus text page of `relay-exporter --metrics-listen`: totals only, nothing about any user.
    pub fn render_metrics(&self) -> String {
        let rows: [(&str, &str, &str, u64); 8] = [
            ("relay_exporter_passes_total", "counter", "Passes completed without a relay error.", self.passes),
            ("relay_exporter_changes_total", "counter", "Consent and subject changes read since start.", self.changes),
            ("relay_exporter_delivered_total", "counter", "Webhooks answered 2xx since start.", self.delivered),
            (
                "relay_exporter_abandoned_notices_total",
                "counter",
                "Withdrawal notices given up after their retry period since start: affiliates not told.",
                self.abandoned,
            ),
            ("relay_exporter_outbox_entries", "gauge", "Entries waiting in the outbox.", self.outbox as u64),
            ("relay_exporter_log_entries", "gauge", "Entries in the export log.", self.logged),
            ("relay_exporter_log_published", "gauge", "Entries of the export log the relay holds.", self.published),
            ("relay_exporter_notices_current", "gauge", "Notices the relay holds as current.", u64::from(self.notices)),
        ];
        let mut out = String::new();
        for (name, kind, help, value) in rows {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
        }
        out
    }
}

/// Where an affiliate's webhooks go, and the key that signs them.
struct Endpoint {
    url: Url,
    secret: Vec<u8>,
}

/// The exporter, opened on its data dir.
pub struct Exporter {
    identity: Identity,
    log_key: SigningKey,
    log: MerkleLog,
    store: ExporterStore,
    /// Where the store's database is (what a compaction rewrites).
    db_path: PathBuf,
    core: Core,
    endpoints: BTreeMap<String, Endpoint>,
    tls: http::Tls,
    poll: Duration,
    progress: watch::Sender<Progress>,
    /// Whether the current connection to the relay has carried the catalogue's notices yet.
    notices_published: bool,
    witnesses: Vec<WitnessSlot>,
    /// (size, number of cosignatures) of the latest head as the relay last accepted it.
    cosignatures_published: Option<(u64, usize)>,
    /// The origin of the monotonic clock leases are counted on.
    started: std::time::Instant,
    /// Leases whose `EndExport` failed (the relay restarted, the connection broke): their attempts are over, and
    /// releasing them at the next pass lets a withdrawal waiting for them go on before they lapse.
    unreleased: VecDeque<(Pair, Lease)>,
    /// Delivered export bodies, sealed, kept for their notice's retention (`crate::vault`).
    vault: Vault,
}

fn load_or_create_key(path: &Path) -> Result<[u8; 32], ExporterError> {
    if !path.exists() {
        let key: [u8; 32] = rand::random();
        relay_quic::durable_file::create_secret(path, &key)?;
    }
    std::fs::read(path)?.try_into().map_err(|_| ExporterError::BadKey(path.to_owned()))
}

/// What a webhook request's outcome tells the core: nothing of the request left only if connecting or the TLS
/// handshake failed; any other failure may come after the affiliate read it.
fn answer(outcome: Result<u16, HttpError>) -> Answer {
    match outcome {
        Ok(status) => Answer::Status(status),
        Err(e @ (HttpError::Connect(_) | HttpError::Tls(_))) => Answer::NotSent(e.to_string()),
        Err(e) => Answer::Unknown(e.to_string()),
    }
}

impl Exporter {
    /// Opens the data dir, creating the TLS identity, the pseudonym and log keys (mode 0600) and the store on first
    /// start. `https://` endpoints are verified against the system's root certificates (see
    /// [`Exporter::trust_extra_ca`] for a private CA).
    pub fn open(data_dir: &Path, mut catalogue: Catalogue, poll: Duration) -> Result<Self, ExporterError> {
        // Keys and the outbox of personal data: the owner's alone (also when an older version made the dir).
        relay_quic::durable_file::private_dir(data_dir)?;
        let mut endpoints = BTreeMap::new();
        for a in catalogue.iter() {
            let url = http::parse_url(&a.endpoint)
                .map_err(|source| ExporterError::Endpoint { affiliate: a.id.clone(), source })?;
            endpoints.insert(a.id.clone(), Endpoint { url, secret: a.secret.clone() });
        }
        let identity = Identity::load_or_create(data_dir)?;
        let master_key = load_or_create_key(&data_dir.join("pseudonym.key"))?;
        let log_key = SigningKey::from_bytes(&load_or_create_key(&data_dir.join("log.key"))?);
        let store = ExporterStore::open(&data_dir.join("db"))?;
        // sled takes no file mode: tighten what it created (the binary also sets its umask for later files).
        relay_quic::durable_file::restrict_tree(data_dir)?;
        // Each notice gets its version from the store: a change of terms since the last start is a new version.
        catalogue.set_notices(store.version_notices(catalogue.notice_terms())?)?;
        let vault = Vault::open(store.bodies_tree()?, &data_dir.join("bodies.key"))?;
        let log = load_log(&store)?;
        let cursors = [
            (Feed::Consents, store.cursor(Feed::Consents)?),
            (Feed::Subjects, store.cursor(Feed::Subjects)?),
            (Feed::Erasures, store.cursor(Feed::Erasures)?),
        ];
        let core = Core::new(catalogue, master_key, store.entries()?, cursors, Box::new(SystemEntropy));
        let progress = watch::Sender::new(Progress {
            cursor: core.cursor(Feed::Consents),
            outbox: core.outbox_len(),
            logged: log.len(),
            published: store.published()?,
            ..Progress::default()
        });
        let tls = http::Tls::system().map_err(|source| ExporterError::Endpoint { affiliate: "*".into(), source })?;
        if tls.roots() == 0 && endpoints.values().any(|e| e.url.tls) {
            tracing::warn!("no system root certificates: https affiliates need --affiliate-ca");
        }
        let mut exporter = Self {
            identity,
            log_key,
            log,
            store,
            db_path: data_dir.join("db"),
            core,
            endpoints,
            tls,
            poll,
            progress,
            witnesses: Vec::new(),
            cosignatures_published: None,
            notices_published: false,
            started: std::time::Instant::now(),
            unreleased: VecDeque::new(),
            vault,
        };
        exporter.refresh_log_head()?;
        Ok(exporter)
    }

    /// Adds a witness whose cosignature every new head is to get.
    pub fn add_witness(&mut self, spec: WitnessSpec) {
        self.witnesses.push(WitnessSlot { spec, retry_at: None, backoff: WITNESS_FIRST_BACKOFF });
    }

    /// Gives the core the latest head with its cosignatures, for the bodies it queues from now on.
    fn refresh_log_head(&mut self) -> Result<(), StoreError> {
        let head = match self.store.heads()?.last() {
            Some(head) => {
                let cosignatures = self.store.cosignatures(head.head.size)?;
                Some(crate::feed::log_head(&self.log_key.verifying_key(), head, &cosignatures))
            }
            None => None,
        };
        self.core.set_log_head(head);
        Ok(())
    }

    /// Asks each witness that has not cosigned `head` yet (and is not pausing) to cosign it; stores and flushes what
    /// they give. A witness's failure is logged and retried later, never returned.
    async fn witness_head(&mut self, heads: &[SignedTreeHead], head: &SignedTreeHead) -> Result<(), StoreError> {
        let key = self.log_key.verifying_key();
        let now = Instant::now();
        let mut added = false;
        for slot in &mut self.witnesses {
            let witness = slot.spec.key.to_bytes();
            if self.store.cosignatures(head.head.size)?.iter().any(|c| c.witness_key == witness) {
                continue;
            }
            if slot.retry_at.is_some_and(|at| at > now) {
                continue;
            }
            // The largest head this witness cosigned before: its last size, as far as the exporter knows.
            let mut believed = 0;
            for h in heads.iter().rev().filter(|h| h.head.size < head.head.size) {
                if self.store.cosignatures(h.head.size)?.iter().any(|c| c.witness_key == witness) {
                    believed = h.head.size;
                    break;
                }
            }
            match witness_link::cosign(&slot.spec, &self.log, &key, head, believed).await {
                Ok(cosignature) => {
                    self.store.put_cosignature(head.head.size, &cosignature)?;
                    slot.retry_at = None;
                    slot.backoff = WITNESS_FIRST_BACKOFF;
                    added = true;
                    tracing::info!(witness = %slot.spec.short(), size = head.head.size, "head cosigned");
                }
                Err(e) => {
                    tracing::warn!(
                        witness = %slot.spec.short(),
                        size = head.head.size,
                        error = %e,
                        "the witness did not cosign; the head is published without its cosignature and retried"
                    );
                    slot.retry_at = Some(now + slot.backoff);
                    slot.backoff = next_witness_backoff(slot.backoff);
                }
            }
        }
        if added {
            self.store.flush().await?;
            self.refresh_log_head()?;
        }
        Ok(())
    }

    /// Also trusts the CA certificates in `pem` for `https://` affiliates (an operator's private CA).
    pub fn trust_extra_ca(&mut self, pem: &[u8]) -> Result<(), ExporterError> {
        self.tls = http::Tls::with_extra_roots(Some(pem))
            .map_err(|source| ExporterError::Endpoint { affiliate: "*".into(), source })?;
        Ok(())
    }

    /// Retries each withdrawal notice for `bound` from when it was queued, then abandons it (default 7 days,
    /// [`crate::core::NOTICE_RETRY_FOR`]).
    pub fn set_notice_retry_for(&mut self, bound: Duration) {
        self.core.set_notice_retry_for(bound);
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

    /// Hex SHA-256 of the exporter's certificate: the relay's `exporter_cert_sha256`.
    pub fn fingerprint(&self) -> String {
        self.identity.fingerprint()
    }

    /// Follows the exporter's progress.
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// Checks the export log against every head the store kept (each signed with the log key, each root the root
    /// over that many entries), the store's count of records and how much of the log the relay was sent: a
    /// [`ExporterError::LogDamaged`] if the store lost or changed entries. [`Exporter::run`] does it first.
    pub fn check_log(&self) -> Result<(), ExporterError> {
        logcheck::check_local(&self.store, &self.log, &self.log_key.verifying_key(), true)??;
        Ok(())
    }

    /// Rebuilds the tail of a damaged export log from the relay's copy ([`logcheck::recover`]), then checks the log
    /// as [`Exporter::check_log`] does.
    pub async fn recover_log(
        &mut self,
        relay: SocketAddr,
        relay_fingerprint: [u8; 32],
    ) -> Result<Recovered, ExporterError> {
        let client = ExportClient::connect(relay, relay_fingerprint, &self.identity)
            .await
            .map_err(|e| ExporterError::Recovery(e.into()))?;
        let recovered = logcheck::recover(&self.store, &client, &self.log_key.verifying_key()).await;
        client.close().await;
        let recovered = recovered?;
        self.log = load_log(&self.store)?;
        let (logged, published) = (self.log.len(), self.store.published()?);
        self.progress.send_modify(|p| {
            p.logged = logged;
            p.published = published;
        });
        self.check_log()?;
        Ok(recovered)
    }

    /// Runs until `shutdown` turns true: connects to the relay at `relay` (pinning `relay_fingerprint`), and every
    /// poll interval reads the feeds and delivers what is due. Relay errors drop the connection and are retried.
    /// A damaged export log ([`Exporter::check_log`] at start; every pass, the store's latest head and the relay's
    /// copy, before anything is read or delivered) stops it with [`ExporterError::LogDamaged`].
    pub async fn run(
        mut self,
        relay: SocketAddr,
        relay_fingerprint: [u8; 32],
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), ExporterError> {
        if let Err(e) = self.check_log() {
            self.store.flush().await?;
            return Err(e);
        }
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
                        self.notices_published = false;
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot reach the relay; retrying"),
                }
            }
            if let Some(c) = &client {
                match self.pass(c).await {
                    Ok(()) => {
                        let outbox = self.core.outbox_len();
                        self.progress.send_modify(|p| {
                            p.passes += 1;
                            p.outbox = outbox;
                        });
                    }
                    Err(PassError::Relay(e)) => {
                        tracing::warn!(error = %e, "export interface error; reconnecting");
                        if let Some(c) = client.take() {
                            c.close().await;
                        }
                    }
                    Err(PassError::Store(e)) => return Err(e.into()),
                    Err(PassError::Damage(e)) => {
                        tracing::error!(error = %e, "stopping: the export log is damaged");
                        if let Some(c) = client.take() {
                            c.close().await;
                        }
                        self.store.flush().await?;
                        return Err(e.into());
                    }
                    Err(PassError::Core(e)) => return Err(e.into()),
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

    async fn pass(&mut self, client: &ExportClient) -> Result<(), PassError> {
        // Before anything is read or delivered: an exporter whose log lost entries must not export (its webhooks
        // would go unlogged, or be logged at indices the relay already holds other entries at).
        let key = self.log_key.verifying_key();
        logcheck::check_local(&self.store, &self.log, &key, false)??;
        logcheck::check_relay(client, &self.log, &key).await??;
        self.release_leftovers(client).await?;
        let purged = self.vault.purge(relay_proto::now_ms()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        if purged > 0 {
            tracing::info!(purged, "delivered bodies past their retention deleted");
        }
        if !self.notices_published {
            self.publish_notices(client).await?;
        }
        // Erasures first: a grant of an erased account read after them exports nothing.
        self.read_erasures(client).await?;
        for feed in Feed::ALL {
            self.read_feed(client, feed).await?;
        }
        self.deliver_due(client).await?;
        self.publish(client).await?;
        Ok(self.compact_if_due().await?)
    }

    /// After an erasure, once no outbox entry of an erased account is left (its notices delivered or abandoned),
    /// rewrites the database so that what was removed leaves the disk (`crate::compact`). A failure ends the
    /// process, whose restart settles the files.
    async fn compact_if_due(&mut self) -> Result<(), StoreError> {
        if !self.store.compaction_due()? {
            return Ok(());
        }
        for entry in self.core.outbox().values() {
            if self.store.is_erased(&entry.pair.account)? {
                return Ok(());
            }
        }
        // The vault holds a tree of the store's database: it lets go of it first, and opens the new one after.
        let sealed = |e: VaultError| StoreError::Corrupt(e.to_string());
        let key_path = self.db_path.with_file_name("bodies.key");
        let placeholder = ExporterStore::temporary()?;
        self.vault = Vault::open(placeholder.bodies_tree()?, &key_path).map_err(sealed)?;
        let store = std::mem::replace(&mut self.store, placeholder);
        self.store = store.compacted(&self.db_path).await?;
        self.vault = Vault::open(self.store.bodies_tree()?, &key_path).map_err(sealed)?;
        tracing::info!("store compacted after an erasure");
        Ok(())
    }

    /// Reads one feed into the core, page by page, until it is caught up or the pass's pages are used.
    async fn read_feed(&mut self, client: &ExportClient, feed: Feed) -> Result<(), PassError> {
        for _ in 0..PAGES_PER_PASS {
            let after_cursor = self.core.cursor(feed);
            let page = match client.request(feed.request(after_cursor)).await? {
                Resp::ConsentChangeList(l) => l,
                Resp::SubjectChangeList(l) => ConsentChangeList { changes: l.changes, next_cursor: l.next_cursor },
                _ => return Err(RelayLinkError::Unexpected("expected a change list".into()).into()),
            };
            if feed::caught_up(after_cursor, &page) {
                return Ok(());
            }
            let now = relay_proto::now_ms();
            for change in &page.changes {
                let change = CheckedChange::new(change);
                // Looked up only once the previous change's writes are done: two changes of a page may share a pair.
                let known = match change.pair() {
                    Some(pair) => self.store.known(pair)?,
                    None => Known::default(),
                };
                let (_, effects) = self.core.handle_change(change, known, now)?;
                self.perform(client, effects).await?;
            }
            let effects = self.core.page_done(feed, page.next_cursor);
            self.perform(client, effects).await?;
            let (read, cursor) = (page.changes.len() as u64, self.core.cursor(Feed::Consents));
            self.progress.send_modify(|p| {
                p.cursor = cursor;
                p.changes += read;
            });
        }
        Ok(())
    }

    /// Reads the erasure feed into the core, page by page, until it is caught up or the pass's pages are used.
    async fn read_erasures(&mut self, client: &ExportClient) -> Result<(), PassError> {
        for _ in 0..PAGES_PER_PASS {
            let after_cursor = self.core.cursor(Feed::Erasures);
            let page = match client.request(Feed::Erasures.request(after_cursor)).await? {
                Resp::ErasureChangeList(l) => l,
                _ => return Err(RelayLinkError::Unexpected("expected an erasure list".into()).into()),
            };
            if page.changes.is_empty() && page.next_cursor <= after_cursor {
                return Ok(());
            }
            let now = relay_proto::now_ms();
            for change in &page.changes {
                let erasure = CheckedErasure::new(change);
                let records = match erasure.account() {
                    Some(account) => self.store.account_records(&account)?,
                    None => AccountRecords::default(),
                };
                let (_, effects) = self.core.handle_erasure(erasure, records, now)?;
                self.perform(client, effects).await?;
            }
            let effects = self.core.page_done(Feed::Erasures, page.next_cursor);
            self.perform(client, effects).await?;
        }
        Ok(())
    }

    /// Releases the leases whose release failed before (they outlive a relay restart, so the relay still counts
    /// them); a relay error ends the pass and keeps the rest for the next.
    async fn release_leftovers(&mut self, client: &ExportClient) -> Result<(), PassError> {
        while let Some((pair, lease)) = self.unreleased.front() {
            match client.request(Req::EndExport(end_export(pair, *lease))).await {
                Ok(_) => tracing::info!(lease = lease.id, "export lease released after a lost connection"),
                // Answered, but refused: asking again will not help, and the lease lapses by itself.
                Err(e @ (RelayLinkError::Refused(_) | RelayLinkError::Unexpected(_))) => {
                    tracing::warn!(lease = lease.id, error = %e, "releasing an export lease again was refused");
                }
                Err(e) => return Err(e.into()),
            }
            self.unreleased.pop_front();
        }
        Ok(())
    }

    /// Lets the core attempt what is due, one attempt after the other.
    async fn deliver_due(&mut self, client: &ExportClient) -> Result<(), PassError> {
        self.core.plan_deliveries(relay_proto::now_ms());
        while let Some(effects) = self.core.poll_attempt(relay_proto::now_ms()) {
            self.perform(client, effects).await?;
        }
        Ok(())
    }

    /// Performs `effects` in order, and the effects the core returns for the answers they bring. A relay error
    /// ends the attempt (the core is told) and is returned once the writes that follow from it are done.
    async fn perform(&mut self, client: &ExportClient, effects: Vec<Effect>) -> Result<(), PassError> {
        let mut queue = VecDeque::from(effects);
        let mut relay_error = None;
        while let Some(effect) = queue.pop_front() {
            let next = match effect {
                Effect::Write(write) => {
                    self.keep_body(&write)?;
                    self.store.apply(&write)?;
                    if let Write::Settle { .. } = write {
                        self.sync_log()?;
                    }
                    continue;
                }
                Effect::Flush => {
                    self.store.flush().await?;
                    continue;
                }
                Effect::AskLease { pair, statement_hash } => {
                    let asked = self.mono_ms();
                    let answer = match client.request(Req::BeginExport(begin_export(&pair, statement_hash))).await {
                        // A relay that does not say how long the lease lasts (`valid_for_ms` absent, 0) gives no
                        // time to post in.
                        Ok(Resp::ExportGranted(g)) => {
                            LeaseAnswer::Granted(Lease { id: g.lease_id, valid_for_ms: g.valid_for_ms })
                        }
                        Ok(Resp::ExportDenied(d)) => LeaseAnswer::Denied { reason: d.reason },
                        Ok(_) => {
                            let e = RelayLinkError::Unexpected("expected ExportGranted or ExportDenied".into());
                            relay_error = Some(e);
                            LeaseAnswer::Failed
                        }
                        Err(e) => {
                            relay_error = Some(e);
                            LeaseAnswer::Failed
                        }
                    };
                    self.core.handle_lease(answer, asked, self.mono_ms())?
                }
                Effect::CheckLease { .. } => self.core.handle_lease_check(self.mono_ms())?,
                Effect::Post { id, affiliate, body } => {
                    let outcome = self.post(&affiliate, &id, &body).await;
                    self.core.handle_answer(answer(outcome), relay_proto::now_ms())?
                }
                Effect::ReleaseLease { pair, lease } => {
                    if let Err(e) = client.request(Req::EndExport(end_export(&pair, lease))).await {
                        relay_error = Some(e);
                        if self.unreleased.len() >= MAX_UNRELEASED {
                            // The oldest has lapsed by now anyway.
                            self.unreleased.pop_front();
                        }
                        self.unreleased.push_back((pair, lease));
                    }
                    self.core.handle_released(relay_proto::now_ms())?
                }
            };
            let (delivered, abandoned) = (self.core.delivered(), self.core.abandoned());
            self.progress.send_modify(|p| {
                p.delivered = delivered;
                p.abandoned = abandoned;
            });
            queue.extend(next);
        }
        relay_error.map_or(Ok(()), |e| Err(e.into()))
    }

    /// Appends to the in-memory tree the records the store logged since (a delivery, or an export dropped after
    /// an unanswered attempt).
    fn sync_log(&mut self) -> Result<(), StoreError> {
        loop {
            let page = self.store.log_records(self.log.len(), 1024)?;
            if page.is_empty() {
                break;
            }
            for (index, record) in page {
                if index != self.log.len() {
                    return Err(StoreError::Corrupt(format!("log index {index} but {} leaves", self.log.len())));
                }
                self.log.append(&record.leaf);
            }
        }
        let logged = self.log.len();
        self.progress.send_modify(|p| p.logged = logged);
        Ok(())
    }

    /// Signs a head over the log if it grew, then sends the relay what it does not hold yet, in pages.
    /// Before `write` is performed: an export being settled (logged as delivered) leaves its body in the vault, for
    /// its notice's retention; a withdrawal (the pair's delivered record forgotten) deletes the bodies kept until it;
    /// an erasure deletes every body of the account.
    fn keep_body(&mut self, write: &Write) -> Result<(), PassError> {
        let sealed = |e: VaultError| PassError::Store(StoreError::Corrupt(e.to_string()));
        match write {
            Write::Settle { id, pair, record, .. } => {
                let Ok(leaf) = relay_proto::merkle::ExportLeaf::decode(&record.leaf) else { return Ok(()) };
                if leaf.kind != relay_proto::merkle::LeafKind::Export {
                    return Ok(());
                }
                let Some(entry) = self.store.entry(id)? else { return Ok(()) };
                let notice = match leaf.notice_hash {
                    Some(hash) => self.store.notice(&hash)?,
                    None => None,
                };
                let retention = match notice {
                    Some(n) => n.retention,
                    None => relay_proto::notice::Retention::default_for(pair.purpose),
                };
                let deadline = vault::deadline(leaf.time_ms, retention);
                self.vault.put(id, pair, &entry.body, leaf.time_ms, deadline).map_err(sealed)?;
            }
            Write::ForgetDelivered { pair } => {
                self.vault.withdrawn(pair).map_err(sealed)?;
            }
            Write::EraseBodies { account } => {
                let erased = self.vault.erase_account(account).map_err(sealed)?;
                tracing::info!(erased, "delivered bodies of an erased account deleted");
            }
            _ => {}
        }
        Ok(())
    }

    /// Sends the catalogue's complete set of current notices: from then on the relay accepts grants under them only.
    async fn publish_notices(&mut self, client: &ExportClient) -> Result<(), PassError> {
        let documents = self.core.catalogue().notices().map(|n| n.document.clone().into()).collect();
        match client.request(Req::PublishNotices(PublishNotices { documents })).await? {
            Resp::NoticesPublished(p) => {
                tracing::info!(new = p.new_documents, current = p.current, "notices published to the relay");
                self.notices_published = true;
                self.progress.send_modify(|progress| progress.notices = p.current);
                Ok(())
            }
            _ => Err(RelayLinkError::Unexpected("expected NoticesPublished".into()).into()),
        }
    }

    async fn publish(&mut self, client: &ExportClient) -> Result<(), PassError> {
        let len = self.log.len();
        if len == 0 {
            return Ok(());
        }
        let mut heads = self.store.heads()?;
        if heads.last().is_none_or(|h| h.head.size < len) {
            heads.push(self.sign_head(len)?);
            self.store.flush().await?;
            self.refresh_log_head()?;
        }
        // Cosigned before it is published, so the publication carries the cosignatures.
        let latest = heads.last().copied();
        if let Some(latest) = latest {
            self.witness_head(&heads, &latest).await?;
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
            let cosignatures = self.store.cosignatures(head.head.size)?;
            let request = PublishLog {
                first_index: published,
                entries,
                head: Some(relay_proto::witness::head_to_wire(&head, &cosignatures)),
                log_key: self.log_key.verifying_key().to_bytes().to_vec().into(),
            };
            let size = match client.request(Req::PublishLog(request)).await? {
                Resp::LogPublished(p) => p.size,
                _ => return Err(RelayLinkError::Unexpected("expected LogPublished".into()).into()),
            };
            if size > len {
                // The relay's signed head, checked at the start of the pass, was no larger: this unsigned size is
                // the relay's fault until a signed head says otherwise.
                return Err(
                    RelayLinkError::Unexpected(format!("the relay claims {size} log entries, its head fewer")).into()
                );
            }
            if size != end {
                tracing::info!(relay = size, "the relay's copy of the log differs in size; resuming from it");
            }
            self.store.set_published(size)?;
            self.store.flush().await?;
            self.progress.send_modify(|p| p.published = size);
            if size == end {
                self.cosignatures_published = Some((end, cosignatures.len()));
            }
        }
        self.publish_cosignatures(client, latest).await
    }

    /// Re-publishes the latest head (no entries) if the relay holds it with fewer cosignatures than the store.
    async fn publish_cosignatures(
        &mut self,
        client: &ExportClient,
        latest: Option<SignedTreeHead>,
    ) -> Result<(), PassError> {
        let Some(head) = latest else { return Ok(()) };
        let size = head.head.size;
        if self.store.published()? != size {
            return Ok(());
        }
        let cosignatures = self.store.cosignatures(size)?;
        if cosignatures.is_empty() || self.cosignatures_published == Some((size, cosignatures.len())) {
            return Ok(());
        }
        let request = PublishLog {
            first_index: size,
            entries: Vec::new(),
            head: Some(relay_proto::witness::head_to_wire(&head, &cosignatures)),
            log_key: self.log_key.verifying_key().to_bytes().to_vec().into(),
        };
        match client.request(Req::PublishLog(request)).await? {
            Resp::LogPublished(p) if p.size == size => {
                self.cosignatures_published = Some((size, cosignatures.len()));
                Ok(())
            }
            Resp::LogPublished(p) => {
                tracing::info!(relay = p.size, "the relay's copy of the log differs in size; cosignatures sent later");
                Ok(())
            }
            _ => Err(RelayLinkError::Unexpected("expected LogPublished".into()).into()),
        }
    }

    /// Signs and stores the head over the first `size` entries (the caller flushes).
    fn sign_head(&self, size: u64) -> Result<SignedTreeHead, StoreError> {
        let root = self.log.root_at(size).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let head = relay_proto::merkle::TreeHead { size, root, timestamp_ms: relay_proto::now_ms() };
        let signed = head.sign(&self.log_key);
        self.store.put_head(&signed)?;
        Ok(signed)
    }

    /// The monotonic clock the core counts leases on: ms since this exporter was opened.
    fn mono_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Posts `body` under webhook id `id` to `affiliate`'s endpoint, signed (Standard Webhooks).
    async fn post(&self, affiliate: &str, id: &WebhookId, body: &str) -> Result<u16, HttpError> {
        let Some(endpoint) = self.endpoints.get(affiliate) else {
            // Unreachable while the core and the endpoints come from one catalogue (every endpoint parsed at open);
            // refused before anything is sent.
            return Err(HttpError::Unsupported(format!("no endpoint for affiliate {affiliate:?}")));
        };
        let timestamp = relay_proto::now_ms() / 1000;
        let id = id.to_string();
        let signature = webhook::sign(&endpoint.secret, &id, timestamp, body.as_bytes());
        let headers = [
            ("content-type", "application/json".to_owned()),
            ("webhook-id", id),
            ("webhook-timestamp", timestamp.to_string()),
            ("webhook-signature", signature),
        ];
        http::post(&endpoint.url, &self.tls, &headers, body.as_bytes(), HTTP_TIMEOUT).await
    }
}

fn begin_export(pair: &Pair, statement_hash: [u8; 32]) -> BeginExport {
    BeginExport {
        account_id: pair.account.as_bytes().to_vec().into(),
        affiliate: pair.affiliate.clone(),
        purpose: pair.purpose.as_str().to_owned(),
        statement_hash: statement_hash.to_vec().into(),
    }
}

fn end_export(pair: &Pair, lease: Lease) -> EndExport {
    EndExport {
        account_id: pair.account.as_bytes().to_vec().into(),
        affiliate: pair.affiliate.clone(),
        purpose: pair.purpose.as_str().to_owned(),
        lease_id: lease.id,
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
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error(transparent)]
    Damage(#[from] LogDamage),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_witness_that_did_not_cosign_is_asked_again_after_a_doubling_pause() {
        let mut pause = WITNESS_FIRST_BACKOFF;
        let mut pauses = vec![pause];
        for _ in 0..8 {
            pause = next_witness_backoff(pause);
            pauses.push(pause);
        }
        let ms: Vec<u128> = pauses.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [500, 1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000, 30_000]);
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
        assert!(exporter.endpoints.get("adsco").is_some_and(|e| e.url.tls));
        let bad = b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n";
        assert!(exporter.trust_extra_ca(bad).is_err());
    }

    /// What sled leaves after damage, at start: records lost under a head that was kept, an entry changed under its
    /// head, a published count past the log. Each stops the exporter before it connects.
    #[test]
    fn a_store_that_lost_or_changed_logged_entries_is_refused_at_start() {
        use crate::core::{LogRecord, Write};
        use relay_proto::consent::Purpose;

        let dir = tempfile::tempdir().expect("dir");
        // sled's background threads may hold the store's file lock for a moment after the last handle is dropped:
        // retry a refused open, boundedly, instead of failing on that race.
        fn when_released<T, E: std::fmt::Debug>(open: impl Fn() -> Result<T, E>) -> T {
            let mut tries = 0;
            loop {
                match open() {
                    Ok(t) => return t,
                    Err(e) if tries < 250 && format!("{e:?}").contains("could not acquire lock") => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => panic!("opens: {e:?}"),
                }
            }
        }
        let open = || {
            let catalogue = Catalogue::parse(include_str!("../affiliates.example.toml")).expect("catalogue");
            when_released(|| Exporter::open(dir.path(), catalogue.clone(), Duration::from_millis(50)))
        };
        let account = relay_proto::AccountId::from_identity_key(&[1; 32]);
        let leaf = |n: u8| relay_proto::merkle::ExportLeaf {
            kind: relay_proto::merkle::LeafKind::Export,
            notice_hash: Some([0; 32]),
            export_id: [n; 16],
            affiliate: "adsco".into(),
            purpose: "advertising".into(),
            fields: vec!["device_model".into()],
            payload_hash: [n; 32],
            consent_hash: [n; 32],
            time_ms: u64::from(n),
        };
        {
            let mut exporter = open();
            for n in 0..3 {
                let record = LogRecord { leaf: leaf(n).encode().expect("leaf"), account, evidence: Default::default() };
                let settle = Write::Settle {
                    id: WebhookId::from_export_id([n; 16]),
                    pair: Pair::new(account, "adsco", Purpose::Advertising),
                    delivered: None,
                    record: Box::new(record),
                };
                exporter.store.apply(&settle).expect("settle");
                exporter.sync_log().expect("sync");
            }
            exporter.sign_head(3).expect("head");
            exporter.store.set_published(3).expect("published");
            exporter.check_log().expect("a sound log passes");
        }
        let damaged = |damage: &dyn Fn(&ExporterStore)| {
            {
                let store = when_released(|| ExporterStore::open(&dir.path().join("db")));
                damage(&store);
            }
            match open().check_log() {
                Err(ExporterError::LogDamaged(d)) => d,
                other => panic!("expected a damaged log, got {other:?}"),
            }
        };

        // One record changed under its head.
        let changed = damaged(&|store| {
            let (_, mut record) = store.log_records(1, 1).expect("record").remove(0);
            record.leaf = leaf(9).encode().expect("leaf");
            store.replace_log_record(1, &record).expect("tamper");
        });
        assert_eq!(changed, LogDamage::Changed { size: 3, which: "stored" });
        assert!(changed.to_string().contains("--recover-log-from-relay"), "{changed}");
        // The newest record lost, its head kept.
        let lost = damaged(&|store| {
            let heads = store.heads().expect("heads");
            store.drop_log_tail(2).expect("drop");
            for head in &heads {
                store.put_head(head).expect("head");
            }
        });
        assert_eq!(lost, LogDamage::LostEntries { head: 3, len: 2 });
        // The record and its heads lost, the count of entries sent to the relay kept.
        let published = damaged(&|store| {
            store.drop_log_tail(1).expect("drop");
            store.set_published(3).expect("published");
        });
        assert_eq!(published, LogDamage::LostPublished { published: 3, len: 1 });
    }

    #[test]
    fn a_data_dir_written_before_the_core_opens_as_it_was() {
        let dir = tempfile::tempdir().expect("dir");
        crate::outbox::write_fixture(&dir.path().join("db"), crate::outbox::STORE_C167199);
        let catalogue = Catalogue::parse(include_str!("../affiliates.example.toml")).expect("catalogue");
        let exporter = Exporter::open(dir.path(), catalogue, Duration::from_millis(50)).expect("opens");
        let progress = *exporter.progress().borrow();
        assert_eq!(
            (progress.cursor, progress.outbox, progress.logged, progress.published),
            (4, 3, 1, 1),
            "cursor, outbox, log and publication as they were"
        );
        assert_eq!(exporter.core.cursor(Feed::Subjects), 2);
    }
}
