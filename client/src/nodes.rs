//! The relay nodes a home talks to: one address, or several nodes of one clustered relay, each with its pinned
//! certificate, and the connection to the first that answers.
//!
//! Contract:
//! - `--server` takes one `ip:port` or a comma list; `--cert-sha256` one fingerprint shared by every node or one
//!   per node, in the same order. Anything else is refused before any connection is tried.
//! - [`Nodes::connect`] tries the node that answered last first, then the others in the order given, each for at
//!   most the connect timeout (default [`DEFAULT_CONNECT_TIMEOUT`]); a node whose certificate does not match its
//!   pin counts as a failed node like an unreachable one, never as a connection. The first node that completes the
//!   handshake is used and remembered; if none does, the error names every address with what went wrong there.
//! - Nodes of one relay share its state (a clustered relay over one replicated store): a home is one account on the
//!   relay, whichever node it reaches.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::connection::{ClientError, Connection};
use crate::pin::parse_fingerprint;

/// How long one node gets to complete the QUIC and TLS handshake.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Most nodes one home lists.
pub const MAX_NODES: usize = 16;

/// One relay node: its address and pinned certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Node {
    /// `ip:port`.
    pub addr: SocketAddr,
    /// SHA-256 of its certificate.
    pub fingerprint: [u8; 32],
}

/// Why a node list does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodesError {
    /// An address is not `ip:port`.
    #[error("invalid server address {0:?} (expected ip:port, or a comma list of them)")]
    Address(String),
    /// A fingerprint is not 64 hex digits.
    #[error("--cert-sha256 must be 64 hex characters (one for every node, or one per node, comma-separated)")]
    Fingerprint,
    /// As many fingerprints as nodes, or one, are needed.
    #[error(
        "{nodes} server addresses but {pins} certificate fingerprints: give one shared fingerprint or one per node"
    )]
    Count {
        /// Addresses given.
        nodes: usize,
        /// Fingerprints given.
        pins: usize,
    },
    /// No address, or too many.
    #[error("give between 1 and {MAX_NODES} server addresses")]
    Empty,
}

/// The nodes of the relay a home uses, and which answered last.
#[derive(Debug)]
pub struct Nodes {
    nodes: Vec<Node>,
    last: AtomicUsize,
    timeout: Duration,
}

impl Clone for Nodes {
    fn clone(&self) -> Self {
        Self {
            nodes: self.nodes.clone(),
            last: AtomicUsize::new(self.last.load(Ordering::Relaxed)),
            timeout: self.timeout,
        }
    }
}

fn split(list: &str) -> Vec<&str> {
    list.split(',').map(str::trim).filter(|s| !s.is_empty()).collect()
}

impl Nodes {
    /// Parses `--server` and `--cert-sha256` as given (see the module's contract).
    pub fn parse(servers: &str, fingerprints: &str) -> Result<Self, NodesError> {
        let addrs = split(servers);
        if addrs.is_empty() || addrs.len() > MAX_NODES {
            return Err(NodesError::Empty);
        }
        let addrs = addrs
            .iter()
            .map(|a| a.parse::<SocketAddr>().map_err(|_| NodesError::Address((*a).to_owned())))
            .collect::<Result<Vec<_>, _>>()?;
        let pins = split(fingerprints)
            .iter()
            .map(|f| parse_fingerprint(f).ok_or(NodesError::Fingerprint))
            .collect::<Result<Vec<_>, _>>()?;
        let pin_for = |i: usize| match pins.len() {
            1 => Ok(pins[0]),
            n if n == addrs.len() => Ok(pins[i]),
            n => Err(NodesError::Count { nodes: addrs.len(), pins: n }),
        };
        let nodes = addrs
            .iter()
            .enumerate()
            .map(|(i, addr)| Ok(Node { addr: *addr, fingerprint: pin_for(i)? }))
            .collect::<Result<Vec<_>, NodesError>>()?;
        Ok(Self { nodes, last: AtomicUsize::new(0), timeout: DEFAULT_CONNECT_TIMEOUT })
    }

    /// The same nodes, each given `timeout` to answer.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The nodes, in the order given.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The node that answered last (the first one before any did).
    pub fn current(&self) -> Node {
        self.nodes[self.last.load(Ordering::Relaxed) % self.nodes.len()]
    }

    /// Connects to the first node that answers: the one that answered last, then the others in order.
    pub async fn connect(&self) -> Result<Connection, ClientError> {
        let start = self.last.load(Ordering::Relaxed) % self.nodes.len();
        let mut failures = Vec::new();
        for i in (0..self.nodes.len()).map(|k| (start + k) % self.nodes.len()) {
            let node = self.nodes[i];
            match tokio::time::timeout(self.timeout, Connection::connect(node.addr, node.fingerprint)).await {
                Ok(Ok(conn)) => {
                    self.last.store(i, Ordering::Relaxed);
                    return Ok(conn);
                }
                Ok(Err(e)) => failures.push(format!("{}: {e}", node.addr)),
                Err(_) => failures.push(format!("{}: no answer within {} ms", node.addr, self.timeout.as_millis())),
            }
        }
        Err(ClientError::Connect(failures.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn one_shared_pin_or_one_per_node_and_nothing_else() {
        let one = Nodes::parse("127.0.0.1:1", A).expect("one node");
        assert_eq!(one.nodes().len(), 1);
        let shared = Nodes::parse("127.0.0.1:1, 127.0.0.1:2", A).expect("shared pin");
        assert!(shared.nodes().iter().all(|n| n.fingerprint == [0xaa; 32]));
        let each = Nodes::parse("127.0.0.1:1,127.0.0.1:2", &format!("{A},{B}")).expect("one pin each");
        assert_eq!(each.nodes()[1].fingerprint, [0xbb; 32]);
        assert_eq!(
            Nodes::parse("127.0.0.1:1,127.0.0.1:2,127.0.0.1:3", &format!("{A},{B}")).err(),
            Some(NodesError::Count { nodes: 3, pins: 2 })
        );
        assert_eq!(Nodes::parse("", A).err(), Some(NodesError::Empty));
        assert!(matches!(Nodes::parse("localhost:1", A), Err(NodesError::Address(_))));
        assert_eq!(Nodes::parse("127.0.0.1:1", "abc").err(), Some(NodesError::Fingerprint));
        let many = vec!["127.0.0.1:1"; MAX_NODES + 1].join(",");
        assert_eq!(Nodes::parse(&many, A).err(), Some(NodesError::Empty));
    }
}
