//! A connection's authentication state.
//!
//! Authentication (`Auth`, or `Register` for a new account) is a signature by the account's identity key over a
//! transcript whose challenge is 32 bytes of keying material exported from this connection's TLS session (its EKM).
//! Both sides derive it independently, it depends on fresh randomness from both, and no other connection has the
//! same value, so it serves as the server's challenge without an extra round trip, and a signature cannot be
//! replayed on another connection. A connection authenticates once, as one account.

use std::net::IpAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

use relay_proto::AccountId;
use relay_proto::auth::EKM_LEN;

use crate::reject::Reject;

/// Per-connection state.
pub struct Session {
    ekm: [u8; EKM_LEN],
    account: OnceLock<AccountId>,
    peer: IpAddr,
    ended: AtomicBool,
    end: Notify,
}

impl Session {
    /// A new, unauthenticated session bound to the connection's exported keying material.
    pub fn new(ekm: [u8; EKM_LEN], peer: IpAddr) -> Self {
        Self { ekm, account: OnceLock::new(), peer, ended: AtomicBool::new(false), end: Notify::new() }
    }

    /// The connection's exported keying material, which authentication transcripts include.
    pub fn ekm(&self) -> &[u8; EKM_LEN] {
        &self.ekm
    }

    /// The client's address.
    pub fn peer(&self) -> IpAddr {
        self.peer
    }

    /// The authenticated account, or `UNAUTHENTICATED`.
    pub fn account(&self) -> Result<AccountId, Reject> {
        self.account.get().copied().ok_or_else(Reject::unauthenticated)
    }

    /// Refuses `account` if this connection is already authenticated as another one.
    pub fn check_same(&self, account: AccountId) -> Result<(), Reject> {
        match self.account.get() {
            Some(current) if *current != account => {
                Err(Reject::invalid("this connection is already authenticated as another account"))
            }
            _ => Ok(()),
        }
    }

    /// Marks the connection as ended (its account was erased): no further request is served, and the connection is
    /// closed once the answer in hand is written ([`Session::closing`]).
    pub fn end(&self) {
        self.ended.store(true, Ordering::SeqCst);
    }

    /// Whether the connection was ended.
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// Asks the connection's owner to close it now.
    pub fn close(&self) {
        self.end();
        self.end.notify_one();
    }

    /// Completes once [`Session::close`] was called (before or after this call: the wake-up is kept).
    pub async fn closing(&self) {
        self.end.notified().await;
    }

    /// Binds the connection to `account` (once; a different account later is refused).
    pub fn authenticate(&self, account: AccountId) -> Result<(), Reject> {
        self.account.get_or_init(|| account);
        self.check_same(account)
    }
}
