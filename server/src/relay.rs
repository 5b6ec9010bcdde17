//! The relay process: binds the QUIC endpoint, builds each request family's handler from the store (each given only
//! the handles it may use), accepts connections, runs the expiry sweep (envelopes, verification codes), shuts down
//! cleanly.
//!
//! A connection starts with credit for [`INITIAL_STREAMS`] concurrent request streams, doubled whenever it uses
//! three quarters of it, up to `max_streams_per_connection`. quinn allocates state for every stream a peer may open,
//! so this keeps idle connections small (about 19 KB less each than granting 256 up front) while a busy client
//! reaches its full concurrency after a few round trips.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use relay_proto::StreamCloseCode;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

use relay_quic::identity::Identity;

use crate::config::Config;
use crate::delivery::Delivery;
use crate::metrics::{Gauges, Metrics};
use crate::ratelimit::{ConnectionLimiter, RateLimiter};
use crate::session::{Budgets, Handlers, Session, account, auth, consent, keys, messaging, serve_stream};
use crate::store::{Durability, MailboxLimits, MailboxStore, Store};
use crate::subscribers::Subscribers;
use crate::verify::{Registration, VerifierSpec};

/// Concurrent request streams a new connection may open before it shows it needs more.
pub const INITIAL_STREAMS: u32 = 16;

/// What the accept loop and every connection share: the request handlers, the connection limits and counters.
/// Request handling itself never sees this; each request family gets only its own handler (see `session`).
struct Shared {
    handlers: Arc<Handlers>,
    /// Concurrent connections per client address.
    connections: Arc<ConnectionLimiter>,
    /// Authenticated connections per account (closed together when the account is erased).
    accounts: Arc<crate::session::connections::AccountConnections>,
    metrics: Arc<Metrics>,
    max_streams: u32,
    /// The byte budgets of each connection (frame budgets and the authenticated receive window).
    budgets: crate::config::Limits,
}

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The data directory could not be created.
    #[error("data directory {0}: {1}")]
    DataDir(std::path::PathBuf, std::io::Error),
    /// The TLS identity could not be loaded or created.
    #[error(transparent)]
    Tls(#[from] relay_quic::identity::TlsError),
    /// The sender-certificate key could not be loaded or created.
    #[error("sender-certificate key: {0}")]
    CertificateKey(#[from] crate::certificates::CertificateKeyError),
    /// The store could not be opened (another relay may be using it).
    #[error("cannot open store: {0}")]
    Store(#[from] crate::store::OpenError),
    /// The UDP socket could not be bound.
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    /// The export interface's UDP socket could not be bound.
    #[error("cannot open the export interface on {0}: {1}")]
    ExportBind(SocketAddr, std::io::Error),
    /// The metrics TCP port could not be bound.
    #[error("cannot serve metrics on {0}: {1}")]
    MetricsBind(SocketAddr, std::io::Error),
    /// The phone-number verifier could not start.
    #[error("phone-number verifier: {0}")]
    Verifier(#[from] crate::verify::StartError),
}

/// A running relay.
pub struct RelayHandle {
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    export_addr: Option<SocketAddr>,
    fingerprint: String,
    cert_sha256: [u8; 32],
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    faults: Arc<crate::store::commit::StorageFaults>,
    tamper: Arc<crate::tamper::Tamper>,
    clock: crate::verify::Clock,
    notices: crate::store::Notices,
}

impl RelayHandle {
    /// The bound address (the real port when configured with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound metrics address, when metrics are enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The bound address of the export interface, when it is enabled.
    pub fn export_addr(&self) -> Option<SocketAddr> {
        self.export_addr
    }

    /// Hex SHA-256 of the relay's certificate (on both endpoints).
    pub fn cert_fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The line the relay prints on stdout when it is ready.
    pub fn ready_line(&self) -> relay_quic::ready::ReadyLine {
        relay_quic::ready::ReadyLine::Relay { addr: self.local_addr, cert_sha256: self.cert_sha256 }
    }

    /// The notices the exporter published (what `PublishNotices` writes): the harness seeds it for tests that
    /// grant consent without running an exporter.
    #[doc(hidden)]
    pub fn notices(&self) -> crate::store::Notices {
        self.notices.clone()
    }

    /// The store's fault injector (for tests of disk failures).
    #[doc(hidden)]
    pub fn storage_faults(&self) -> Arc<crate::store::commit::StorageFaults> {
        self.faults.clone()
    }

    /// The hook that makes this relay lie about keys and envelopes (for tests of what clients do about it).
    #[doc(hidden)]
    pub fn tamper(&self) -> Arc<crate::tamper::Tamper> {
        self.tamper.clone()
    }

    /// The clock verification codes and registration locks are judged by (for tests: moved forward instead of
    /// waiting for codes to expire or locks to lapse).
    #[doc(hidden)]
    pub fn registration_clock(&self) -> crate::verify::Clock {
        self.clock.clone()
    }

    /// Stops accepting, closes connections, flushes the store and waits until everything is released.
    pub async fn shutdown(self) {
        self.shutdown.send_replace(true);
        self.task.await.ok();
    }
}

/// Starts a relay with `config` on the current tokio runtime.
pub async fn start(config: Config) -> Result<RelayHandle, StartError> {
    config.check()?;
    let data = &config.data_dir;
    // The data dir holds the TLS key and every mailbox: the owner's alone (also when an older version made it).
    relay_quic::durable_file::private_dir(data).map_err(|e| StartError::DataDir(data.clone(), e))?;
    let identity = Identity::load_or_create(data)?;
    let certificates = Arc::new(crate::certificates::CertificateIssuer::load_or_create(data)?);
    tracing::info!(key = %hex::encode(certificates.public_key()), "sender-certificate key");
    let limits = config.limits.clone();
    let mailbox_limits = MailboxLimits {
        max_messages: limits.mailbox_max_messages,
        max_bytes: limits.mailbox_max_bytes,
        ttl_ms: limits.message_ttl_secs.saturating_mul(1000),
    };
    let store = Store::open(&data.join("store"), mailbox_limits)?;
    let store_notices = store.notices.clone();
    // sled takes no file mode: tighten what it created (relayd also sets its umask, for the files it adds later).
    relay_quic::durable_file::restrict_tree(data).map_err(|e| StartError::DataDir(data.clone(), e))?;

    let mut server = quinn::ServerConfig::with_crypto(Arc::new(identity.server_crypto()?));
    let mut transport = relay_quic::transport_config(
        INITIAL_STREAMS.min(limits.max_streams_per_connection),
        Duration::from_secs(limits.idle_timeout_secs),
        None,
    );
    // Byte budgets of a connection (README, "Memory per connection is bounded by bytes"): it starts with the
    // unauthenticated receive window, raised when it authenticates (see `session::Budgets`); the send window bounds
    // what waits for a slow reader.
    transport.receive_window(quinn::VarInt::from_u32(limits.unauthenticated_receive_window_bytes));
    transport.send_window(limits.send_window_bytes);
    server.transport_config(Arc::new(transport));
    let endpoint = relay_quic::endpoint(config.listen, Some(server)).map_err(|e| StartError::Bind(config.listen, e))?;
    let local_addr = endpoint.local_addr().map_err(|e| StartError::Bind(config.listen, e))?;

    let fence = store.fence.clone();
    let export = match (config.export_listen, config.exporter_fingerprint()) {
        (Some(addr), Some(pinned)) => {
            let verifier = relay_quic::pin::PinnedClientCert::new(pinned, relay_quic::crypto_provider());
            let mut server =
                quinn::ServerConfig::with_crypto(Arc::new(identity.export_server_crypto(Arc::new(verifier))?));
            server.transport_config(Arc::new(relay_quic::transport_config(
                crate::export::EXPORT_STREAMS,
                Duration::from_secs(limits.idle_timeout_secs),
                None,
            )));
            let endpoint = relay_quic::endpoint(addr, Some(server)).map_err(|e| StartError::ExportBind(addr, e))?;
            let bound = endpoint.local_addr().map_err(|e| StartError::ExportBind(addr, e))?;
            tracing::info!(addr = %bound, "export interface on {bound} (mutual TLS, exporter certificate pinned)");
            // Built from the registry, the directory and the fence only: no mailbox handle (see `export`).
            let handler = crate::export::ExportHandler::new(
                store.consent.clone(),
                store.directory.clone(),
                fence.clone(),
                store.export_log.clone(),
                store.notices.clone(),
                store.commit.clone(),
                store.erasures.clone(),
            );
            Some((endpoint, bound, Arc::new(handler)))
        }
        _ => None,
    };
    let export_addr = export.as_ref().map(|(_, bound, _)| *bound);
    let faults = store.commit.faults();
    let r = &config.registration;
    let code_limits = crate::verify::CodeLimits {
        per_number_per_hour: r.codes_per_hour_per_number,
        per_address_per_hour: r.codes_per_hour_per_ip,
    };
    let registration = Arc::new(Registration::open(
        &r.verifier,
        data,
        store.verifications.clone(),
        store.commit.clone(),
        code_limits,
    )?);
    if r.verifier == VerifierSpec::Open && !config.listen.ip().is_loopback() {
        tracing::warn!(addr = %config.listen, "open registration on a non-loopback address: anyone may claim any number");
    }
    tracing::info!(verifier = %r.verifier, "phone-number verifier");
    let clock = registration.clock();
    let tamper = Arc::new(crate::tamper::Tamper::default());
    let metrics = Arc::new(Metrics::default());
    let subscribers = Arc::new(Subscribers::default());
    let accounts = Arc::new(crate::session::connections::AccountConnections::default());
    let handlers = Arc::new(handlers(
        &store,
        accounts.clone(),
        &limits,
        registration.clone(),
        certificates,
        fence,
        subscribers.clone(),
        metrics.clone(),
        tamper.clone(),
    ));
    let shared = Arc::new(Shared {
        handlers,
        connections: Arc::new(ConnectionLimiter::new(limits.max_connections_per_ip)),
        accounts,
        metrics: metrics.clone(),
        max_streams: limits.max_streams_per_connection,
        budgets: limits.clone(),
    });
    let (metrics_task, metrics_addr) = match config.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| StartError::MetricsBind(addr, e))?;
            let bound = listener.local_addr().map_err(|e| StartError::MetricsBind(addr, e))?;
            if !bound.ip().is_loopback() {
                tracing::warn!(addr = %bound, "metrics served on a non-loopback address");
            }
            tracing::info!(addr = %bound, "metrics on http://{bound}/metrics");
            let (mailboxes, commit) = (store.mailboxes.clone(), store.commit.clone());
            let render: crate::metrics::Renderer = Arc::new(move || {
                crate::metrics::render(
                    &metrics,
                    &Gauges {
                        delivery_streams_open: subscribers.online(),
                        queue_depth: mailboxes.queued(),
                        flush_batch_sizes: commit.batch_sizes(),
                        flush_durations: commit.latencies(),
                    },
                )
            });
            (Some(tokio::spawn(crate::metrics::serve(listener, render))), Some(bound))
        }
        None => (None, None),
    };
    let (shutdown, rx) = watch::channel(false);
    let export_task =
        export.map(|(endpoint, _, handler)| tokio::spawn(crate::export::run(endpoint, handler, rx.clone())));
    let (mailboxes, commit) = (store.mailboxes.clone(), store.commit.clone());
    let sweep_every = Duration::from_secs(limits.expiry_sweep_secs);
    let task = tokio::spawn(async move {
        let sweeper = tokio::spawn(sweep_expired(mailboxes, registration, sweep_every));
        run(endpoint, shared, commit, rx).await;
        sweeper.abort();
        if let Some(t) = export_task {
            t.await.ok();
        }
        if let Some(m) = metrics_task {
            m.abort();
        }
    });
    Ok(RelayHandle {
        local_addr,
        metrics_addr,
        export_addr,
        fingerprint: identity.fingerprint(),
        cert_sha256: identity.cert_sha256(),
        shutdown,
        task,
        faults,
        tamper,
        clock,
        notices: store_notices,
    })
}

/// Each request family's handler, built from the store: each gets only the handles it may use.
#[expect(clippy::too_many_arguments, reason = "the wiring names every handle it hands out, one argument each")]
fn handlers(
    store: &Store,
    connections: Arc<crate::session::connections::AccountConnections>,
    limits: &crate::config::Limits,
    registration: Arc<Registration>,
    certificates: Arc<crate::certificates::CertificateIssuer>,
    fence: crate::store::Leases,
    subscribers: Arc<Subscribers>,
    metrics: Arc<Metrics>,
    tamper: Arc<crate::tamper::Tamper>,
) -> Handlers {
    Handlers {
        auth: auth::Auth {
            directory: store.directory.clone(),
            prekeys: store.prekeys.clone(),
            commit: store.commit.clone(),
            registration: registration.clone(),
            certificates,
            erasures: store.erasures.clone(),
            registrations: RateLimiter::new(limits.registrations_per_minute_per_ip),
            registrations_per_minute: limits.registrations_per_minute_per_ip,
        },
        messaging: messaging::Messaging {
            delivery: Delivery {
                mailboxes: store.mailboxes.clone(),
                subscribers,
                metrics: metrics.clone(),
                window: limits.delivery_window,
                burst_bytes: limits.delivery_burst_bytes,
                frame_timeout: limits.frame_timeout(),
            },
            recipients: store.directory.identities(),
            access_keys: store.prekeys.clone(),
            commit: store.commit.clone(),
            sends: RateLimiter::per_second(limits.sends_per_second, limits.sends_per_second.saturating_mul(2)),
            sealed_sends: RateLimiter::new(limits.sealed_sends_per_minute),
            max_envelope_bytes: limits.max_envelope_bytes,
            sends_per_second: limits.sends_per_second,
            sealed_sends_per_minute: limits.sealed_sends_per_minute,
            tamper: tamper.clone(),
        },
        keys: keys::Keys {
            directory: store.directory.clone(),
            prekeys: store.prekeys.clone(),
            commit: store.commit.clone(),
            lookups: RateLimiter::new(limits.lookups_per_minute),
            lookups_per_minute: limits.lookups_per_minute,
            tamper: tamper.clone(),
        },
        account: account::Account {
            directory: store.directory.clone(),
            prekeys: store.prekeys.clone(),
            mailboxes: store.mailboxes.clone(),
            connections: connections.clone(),
            registration,
            erasures: store.erasures.clone(),
            registry: store.consent.clone(),
            fence: fence.clone(),
            commit: store.commit.clone(),
        },
        consent: consent::Consent {
            registry: store.consent.clone(),
            identities: store.directory.identities(),
            export_log: store.export_log.clone(),
            notices: store.notices.clone(),
            fence,
            commit: store.commit.clone(),
            tamper,
        },
        metrics,
        frame_timeout: limits.frame_timeout(),
    }
}

async fn run(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    commit: Arc<dyn Durability>,
    shutdown: watch::Receiver<bool>,
) {
    relay_quic::accept::accept_until(&endpoint, shutdown, "messaging", |incoming| {
        serve_connection(shared.clone(), incoming)
    })
    .await;
    if let Err(e) = commit.durable().await {
        tracing::error!(error = %e, "final flush failed");
    }
    tracing::info!("relay stopped");
}

async fn serve_connection(shared: Arc<Shared>, incoming: quinn::Incoming) {
    let peer = incoming.remote_address().ip();
    // Counted before the handshake, so an address over its limit costs no key exchange.
    let Some(_slot) = shared.connections.try_acquire(peer) else {
        tracing::info!("connection refused: too many from this address");
        shared.metrics.refused();
        incoming.refuse();
        return;
    };
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "handshake failed");
            return;
        }
    };
    let ekm = match relay_quic::ekm(&conn) {
        Ok(x) => x,
        Err(_) => {
            conn.close(StreamCloseCode::ProtocolError.code().into(), b"no keying material");
            return;
        }
    };
    tracing::debug!("connected");
    let _open = shared.metrics.connection();
    let budgets = Budgets {
        frames: relay_quic::FrameBudget::new(shared.budgets.unauthenticated_frame_budget_bytes),
        authenticated_frames: shared.budgets.frame_budget_bytes,
        authenticated_window: shared.budgets.receive_window_bytes,
        connection: Some(conn.clone()),
    };
    let session = Arc::new(Session::new(ekm, peer, budgets).registered_in(shared.accounts.clone()));
    let mut streams = JoinSet::new();
    let max_streams = shared.max_streams;
    let mut credit = INITIAL_STREAMS.min(max_streams);
    loop {
        tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    streams.spawn(serve_stream(shared.handlers.clone(), session.clone(), send, recv).in_current_span());
                    if credit < max_streams && streams.len() as u64 * 4 >= u64::from(credit) * 3 {
                        credit = credit.saturating_mul(2).min(max_streams);
                        conn.set_max_concurrent_bi_streams(credit.into());
                    }
                }
                Err(e) => {
                    tracing::debug!(reason = %e, "connection closed");
                    break;
                }
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
            () = session.closing() => {
                conn.close(0u32.into(), b"account deleted");
                break;
            }
        }
    }
}

/// Removes expired envelopes, and expired verification codes with their files, every `every`.
async fn sweep_expired(mailboxes: Arc<dyn MailboxStore>, registration: Arc<Registration>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        match mailboxes.sweep_expired(relay_proto::now_ms()).await {
            Ok(n) if n > 0 => tracing::info!(removed = n, "expired envelopes removed"),
            Err(e) => tracing::error!(error = %e, "expiry sweep failed"),
            _ => {}
        }
        match registration.sweep().await {
            Ok(n) if n > 0 => tracing::info!(removed = n, "expired verification codes removed"),
            Err(e) => tracing::error!(error = %e, "verification code sweep failed"),
            _ => {}
        }
    }
}
