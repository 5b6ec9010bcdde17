//! A connection's authentication state.
//!
//! Authentication (`Auth`, or `Register` for a new account) is a signature by the account's identity key over a
//! transcript whose challenge is 32 bytes of keying material exported from this connection's TLS session (its EKM).
//! Both sides derive it independently, it depends on fresh randomness from both, and no other connection has the
//! same value, so it serves as the server's challenge without an extra round trip, and a signature cannot be
//! replayed on another connection. A connection authenticates once, as one account.
//!
//! Authentication also raises the connection's byte budgets from their unauthenticated to their authenticated
//! values (see [`Budgets`]): the budget for partially received frames and the connection's QUIC receive window.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::Notify;

use relay_proto::AccountId;
use relay_proto::auth::EKM_LEN;
use relay_quic::FrameBudget;

use crate::reject::Reject;

/// A connection's byte budgets: the budget for partially received frames (shared by its streams) and, once
/// authenticated, the values both are raised to.
pub struct Budgets {
    /// Partially received frames, all streams together; starts at the unauthenticated value.
    pub frames: FrameBudget,
    /// The frame budget once authenticated.
    pub authenticated_frames: usize,
    /// The connection's QUIC receive window once authenticated (it starts at the endpoint's, unauthenticated).
    pub authenticated_window: u32,
    /// The connection, to raise its receive window; `None` in unit tests without one.
    pub connection: Option<quinn::Connection>,
}

impl Budgets {
    /// Budgets that never change (for sessions without a connection).
    pub fn fixed(frames: usize) -> Self {
        Self {
            frames: FrameBudget::new(frames),
            authenticated_frames: frames,
            authenticated_window: 0,
            connection: None,
        }
    }

    fn raise(&self) {
        self.frames.raise_to(self.authenticated_frames);
        if let Some(conn) = &self.connection {
            conn.set_receive_window(quinn::VarInt::from_u32(self.authenticated_window));
        }
    }
}

/// What ends a connection: held by its session and, once it authenticates, by the registry of its account's
/// connections ([`super::connections::AccountConnections`]), so that erasing the account can close it.
#[derive(Default)]
pub struct Closer {
    ended: AtomicBool,
    end: Notify,
}

impl Closer {
    /// Marks the connection as ended: no further request is served.
    pub fn end(&self) {
        self.ended.store(true, Ordering::SeqCst);
    }

    /// Whether it was ended.
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// Ends it and asks the connection's owner to close it now.
    pub fn close(&self) {
        self.end();
        self.end.notify_one();
    }
}

/// Per-connection state.
pub struct Session {
    ekm: [u8; EKM_LEN],
    account: OnceLock<AccountId>,
    peer: IpAddr,
    closer: Arc<Closer>,
    budgets: Budgets,
    connections: Option<Arc<super::connections::AccountConnections>>,
}

impl Session {
    /// A new, unauthenticated session bound to the connection's exported keying material.
    pub fn new(ekm: [u8; EKM_LEN], peer: IpAddr, budgets: Budgets) -> Self {
        Self { ekm, account: OnceLock::new(), peer, closer: Arc::default(), budgets, connections: None }
    }

    /// Registers the session in `connections` when it authenticates (so that erasing its account closes it).
    pub fn registered_in(mut self, connections: Arc<super::connections::AccountConnections>) -> Self {
        self.connections = Some(connections);
        self
    }

    /// What ends this connection.
    pub fn closer(&self) -> &Arc<Closer> {
        &self.closer
    }

    /// The connection's budget for partially received frames.
    pub fn frame_budget(&self) -> &FrameBudget {
        &self.budgets.frames
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
        self.closer.end();
    }

    /// Whether the connection was ended.
    pub fn ended(&self) -> bool {
        self.closer.ended()
    }

    /// Asks the connection's owner to close it now.
    pub fn close(&self) {
        self.closer.close();
    }

    /// Completes once [`Session::close`] was called, here or through the account's registry (before or after
    /// this call: the wake-up is kept).
    pub async fn closing(&self) {
        self.closer.end.notified().await;
    }

    /// Binds the connection to `account` (once; a different account later is refused).
    pub fn authenticate(&self, account: AccountId) -> Result<(), Reject> {
        if self.account.set(account).is_ok() {
            self.budgets.raise();
            if let Some(connections) = &self.connections {
                connections.add(account, &self.closer);
            }
        }
        self.check_same(account)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let (Some(connections), Some(account)) = (&self.connections, self.account.get()) {
            connections.remove(account, &self.closer);
        }
    }
}
