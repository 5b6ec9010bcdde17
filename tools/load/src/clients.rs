//! Load clients: fresh identities with synthetic phone numbers, registered over connections that share client UDP
//! sockets (`--per-endpoint` connections per socket), so ten thousand connections need a few hundred descriptors.
//!
//! Recipients are addressed by the account ids of our own registrations: phone lookups are rate-limited per
//! account, and a load test has no reason to read the directory.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Result, anyhow};
use hdrhistogram::Histogram;
use relay_client::{ClientError, Connection, Identity};
use relay_proto::wire::DeviceInfo;
use relay_proto::{AccountId, ErrorCode};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Client UDP sockets, each shared by up to `per_endpoint` connections.
pub struct Endpoints {
    endpoints: Vec<quinn::Endpoint>,
    per_endpoint: usize,
}

impl Endpoints {
    /// Enough sockets on 127.0.0.1 for `clients` connections.
    pub fn new(clients: usize, per_endpoint: usize) -> Result<Self> {
        let count = clients.div_ceil(per_endpoint).max(1);
        let bind = SocketAddr::from(([127, 0, 0, 1], 0));
        let endpoints = (0..count).map(|_| relay_quic::endpoint(bind, None)).collect::<Result<Vec<_>, _>>()?;
        Ok(Self { endpoints, per_endpoint })
    }

    /// The socket of client `i`.
    pub fn for_client(&self, i: usize) -> &quinn::Endpoint {
        &self.endpoints[(i / self.per_endpoint) % self.endpoints.len()]
    }

    /// Closes every socket's connections and waits briefly for the peers to see it.
    pub async fn close(&self) {
        for e in &self.endpoints {
            e.close(0u32.into(), b"load test done");
        }
        for e in &self.endpoints {
            tokio::time::timeout(std::time::Duration::from_secs(1), e.wait_idle()).await.ok();
        }
    }
}

/// A registered load client.
pub struct LoadClient {
    /// Its keys.
    pub identity: Identity,
    /// Its account id.
    pub account: AccountId,
    /// Its open connection, if any.
    pub conn: Option<Arc<Connection>>,
}

/// `+3360` followed by seven digits: French mobile numbers, valid in the numbering plan the relay checks.
fn phone(n: u64) -> String {
    format!("+3360{:07}", n % 10_000_000)
}

fn device() -> DeviceInfo {
    DeviceInfo {
        model: "relay-load".into(),
        os: std::env::consts::OS.into(),
        app_version: env!("CARGO_PKG_VERSION").into(),
    }
}

/// Connects client `i` and registers a fresh identity with a synthetic phone number; a number already taken (a
/// previous run against the same relay) is replaced by another.
pub async fn register_one(
    endpoints: &Endpoints,
    i: usize,
    addr: SocketAddr,
    fp: [u8; 32],
    base: u64,
) -> Result<LoadClient, ClientError> {
    let identity = Identity::generate();
    let conn = Connection::connect_on(endpoints.for_client(i), addr, fp).await?;
    let mut n = base.wrapping_add(i as u64);
    for _ in 0..8 {
        match conn.register(&identity, &phone(n), device()).await {
            Ok(_) => {
                let account = identity.account_id();
                return Ok(LoadClient { identity, account, conn: Some(Arc::new(conn)) });
            }
            Err(e) if e.code() == Some(ErrorCode::PhoneTaken) => n = rand::random::<u64>(),
            Err(e) => return Err(e),
        }
    }
    Err(ClientError::Protocol("no free synthetic phone number found".into()))
}

/// Registers `n` clients, at most `concurrency` set-ups in flight; returns them in index order with the histogram of
/// connect-and-register times (µs). Fails on the first client that cannot register.
pub async fn register_all(
    endpoints: &Arc<Endpoints>,
    n: usize,
    addr: SocketAddr,
    fp: [u8; 32],
    concurrency: usize,
) -> Result<(Vec<LoadClient>, Histogram<u64>)> {
    let done = Arc::new(AtomicU64::new(0));
    let progress = {
        let done = done.clone();
        crate::progress::Progress::start("registering", move || format!("{}/{n}", done.load(Ordering::Relaxed)))
    };
    let base = rand::random::<u64>();
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    for i in 0..n {
        let (endpoints, permits, done) = (endpoints.clone(), permits.clone(), done.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let started = Instant::now();
            let client = register_one(&endpoints, i, addr, fp, base).await;
            done.fetch_add(1, Ordering::Relaxed);
            (i, client, started.elapsed())
        });
    }
    let mut slots: Vec<Option<LoadClient>> = (0..n).map(|_| None).collect();
    let mut hist = crate::report::histogram();
    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        // Only set-ups aborted after a failure fail to join, and that failure is reported.
        let Ok((i, client, took)) = joined else { continue };
        match client {
            Ok(c) => {
                hist.saturating_record(took.as_micros() as u64);
                slots[i] = Some(c);
            }
            Err(e) => {
                failure.get_or_insert(anyhow!("client {i} could not register: {e}"));
                tasks.abort_all();
            }
        }
    }
    progress.finish().await;
    if let Some(e) = failure {
        return Err(e);
    }
    let clients =
        slots.into_iter().collect::<Option<Vec<_>>>().ok_or_else(|| anyhow!("a registration went missing"))?;
    Ok((clients, hist))
}
