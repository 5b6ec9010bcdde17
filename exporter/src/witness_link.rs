//! The exporter's (and the auditor's) side of the witness protocol: a witness named by its address, certificate
//! fingerprint and public key ([`WitnessSpec`], the `--witness ADDR,CERT_SHA256_HEX,WITNESS_KEY_HEX` form), a QUIC
//! connection pinning its certificate, and the exchanges: [`cosign`] a new head (from the witness's last size,
//! retrying once from the size a conflict answer gives), read its latest checkpoint ([`checkpoint`]).
//!
//! Contract: a cosignature is returned only once it verifies under the configured witness key for exactly the head
//! submitted; a checkpoint only once its cosignature verifies. Nothing the witness sends panics; every failure is a
//! [`WitnessLinkError`]. Nothing personal is sent: a head, a log key and hashes.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::VerifyingKey;
use relay_proto::MAX_FRAME_LEN;
use relay_proto::merkle::{Hash, MerkleLog, SignedTreeHead, proof_to_wire};
use relay_proto::wire::{
    AddCheckpoint, GetCheckpoint, WitnessRequest, WitnessResponse, witness_request, witness_response,
};
use relay_proto::witness::{Cosignature, WitnessError};
use relay_quic::{read_frame, write_frame};

/// How long connecting to a witness may take (short: a witness that is down must not hold up the exporter long).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long one exchange with a witness may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A witness as configured: where it listens, its certificate's SHA-256 and its public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WitnessSpec {
    /// UDP address of its endpoint.
    pub addr: SocketAddr,
    /// SHA-256 of its certificate (from its ready line).
    pub cert_sha256: [u8; 32],
    /// Its Ed25519 public key (`relay-witness --data DIR public-key`).
    pub key: VerifyingKey,
}

/// A `--witness` value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a witness is ADDR,CERT_SHA256_HEX,WITNESS_KEY_HEX: {0}")]
pub struct WitnessSpecError(String);

impl FromStr for WitnessSpec {
    type Err = WitnessSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        let [addr, cert, key] = parts.as_slice() else {
            return Err(WitnessSpecError(format!("{s:?} does not have three parts")));
        };
        Ok(Self {
            addr: addr.parse().map_err(|_| WitnessSpecError(format!("{addr:?} is not an address")))?,
            cert_sha256: relay_quic::pin::parse_fingerprint(cert)
                .ok_or_else(|| WitnessSpecError(format!("{cert:?} is not 64 hex digits")))?,
            key: relay_proto::witness::parse_witness_key(key)
                .map_err(|_| WitnessSpecError(format!("{key:?} is not an Ed25519 public key in hex")))?,
        })
    }
}

impl fmt::Display for WitnessSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{},{}", self.addr, hex::encode(self.cert_sha256), hex::encode(self.key.as_bytes()))
    }
}

impl WitnessSpec {
    /// A short name for logs: the first 8 bytes of its key, in hex.
    pub fn short(&self) -> String {
        hex::encode(&self.key.as_bytes()[..8])
    }
}

/// Why a witness exchange failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WitnessLinkError {
    /// The witness could not be reached (down, timed out, wrong certificate).
    #[error("cannot reach the witness: {0}")]
    Connect(String),
    /// The stream failed or timed out.
    #[error("witness stream: {0}")]
    Stream(String),
    /// The witness refused (an error frame).
    #[error("the witness refused: {0}")]
    Refused(String),
    /// The witness's answer is not what was asked for, or does not verify.
    #[error("bad answer from the witness: {0}")]
    Bad(String),
    /// The witness still holds a size the log cannot prove consistency from (after one retry, or past the log).
    #[error("the witness's last cosigned size is {0}, which this log cannot extend")]
    Conflict(u64),
}

impl From<WitnessError> for WitnessLinkError {
    fn from(e: WitnessError) -> Self {
        Self::Bad(e.to_string())
    }
}

struct Connection {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

impl Connection {
    async fn open(spec: &WitnessSpec) -> Result<Self, WitnessLinkError> {
        let connect = |e: &dyn fmt::Display| WitnessLinkError::Connect(e.to_string());
        let quic = relay_quic::identity::pinned_client_crypto(spec.cert_sha256, relay_proto::WITNESS_ALPN)
            .map_err(|e| connect(&e))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(Arc::new(relay_quic::transport_config(4, Duration::from_secs(30), None)));
        let local =
            if spec.addr.is_ipv4() { SocketAddr::from(([0, 0, 0, 0], 0)) } else { SocketAddr::from(([0u16; 8], 0)) };
        let endpoint = relay_quic::endpoint(local, None).map_err(|e| connect(&e))?;
        let connecting = endpoint.connect_with(config, spec.addr, "consent-relay-witness").map_err(|e| connect(&e))?;
        let conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(connect(&e)),
            Err(_) => return Err(WitnessLinkError::Connect(format!("no handshake within {CONNECT_TIMEOUT:?}"))),
        };
        Ok(Self { endpoint, conn })
    }

    async fn request(&self, body: witness_request::Body) -> Result<witness_response::Body, WitnessLinkError> {
        let stream = |e: &dyn fmt::Display| WitnessLinkError::Stream(e.to_string());
        let exchange = async {
            let (mut send, mut recv) = self.conn.open_bi().await.map_err(|e| stream(&e))?;
            write_frame(&mut send, &WitnessRequest { body: Some(body) }).await.map_err(|e| stream(&e))?;
            send.finish().ok();
            read_frame::<WitnessResponse>(&mut recv, MAX_FRAME_LEN)
                .await
                .map_err(|e| stream(&e))?
                .ok_or_else(|| WitnessLinkError::Bad("stream closed without a response".into()))
        };
        let reply = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| WitnessLinkError::Stream(format!("no answer within {REQUEST_TIMEOUT:?}")))??;
        match reply.body {
            Some(witness_response::Body::Error(e)) => Err(WitnessLinkError::Refused(e.to_string())),
            Some(body) => Ok(body),
            None => Err(WitnessLinkError::Bad("empty response".into())),
        }
    }

    async fn close(self) {
        self.conn.close(0u32.into(), b"done");
        tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await.ok();
    }
}

/// What one submission got.
enum Submitted {
    Cosigned(Cosignature),
    Conflict(u64),
}

async fn submit(
    conn: &Connection,
    spec: &WitnessSpec,
    log: &MerkleLog,
    log_key: &VerifyingKey,
    head: &SignedTreeHead,
    old_size: u64,
) -> Result<Submitted, WitnessLinkError> {
    let proof = log.consistency_proof(old_size, head.head.size).map_err(|_| WitnessLinkError::Conflict(old_size))?;
    let request = AddCheckpoint {
        log_key: log_key.to_bytes().to_vec().into(),
        old_size,
        consistency: proof_to_wire(&proof),
        head: Some(head.into()),
    };
    match conn.request(witness_request::Body::AddCheckpoint(request)).await? {
        witness_response::Body::Cosignature(c) => {
            let c = Cosignature::try_from(&c)?;
            c.verify(&spec.key, log_key, &head.head)?;
            Ok(Submitted::Cosigned(c))
        }
        witness_response::Body::Conflict(c) => Ok(Submitted::Conflict(c.size)),
        _ => Err(WitnessLinkError::Bad("expected a cosignature or a conflict".into())),
    }
}

/// Asks the witness `spec` to cosign `head` (a head over the first `head.head.size` entries of `log`, signed with
/// `log_key`'s key), believing the witness's last cosigned size is `believed_size`. A conflict answer is handled
/// once: the proof is made again from the size the witness gave. The cosignature is verified before it is returned.
pub async fn cosign(
    spec: &WitnessSpec,
    log: &MerkleLog,
    log_key: &VerifyingKey,
    head: &SignedTreeHead,
    believed_size: u64,
) -> Result<Cosignature, WitnessLinkError> {
    let conn = Connection::open(spec).await?;
    let result = async {
        match submit(&conn, spec, log, log_key, head, believed_size.min(head.head.size)).await? {
            Submitted::Cosigned(c) => Ok(c),
            Submitted::Conflict(size) if size <= head.head.size => {
                tracing::info!(witness = %spec.short(), size, "the witness holds another size; retrying from it");
                match submit(&conn, spec, log, log_key, head, size).await? {
                    Submitted::Cosigned(c) => Ok(c),
                    Submitted::Conflict(size) => Err(WitnessLinkError::Conflict(size)),
                }
            }
            Submitted::Conflict(size) => Err(WitnessLinkError::Conflict(size)),
        }
    }
    .await;
    conn.close().await;
    result
}

/// The latest checkpoint the witness `spec` cosigned for the log with key `log_key`: `None` if it never cosigned
/// one, else its size and root, whose fresh cosignature has been verified under the configured witness key.
pub async fn checkpoint(spec: &WitnessSpec, log_key: &VerifyingKey) -> Result<Option<(u64, Hash)>, WitnessLinkError> {
    let conn = Connection::open(spec).await?;
    let result = async {
        let get = GetCheckpoint { log_key: log_key.to_bytes().to_vec().into() };
        let witness_response::Body::Witnessed(w) = conn.request(witness_request::Body::GetCheckpoint(get)).await?
        else {
            return Err(WitnessLinkError::Bad("expected the witnessed head".into()));
        };
        if w.size == 0 {
            return Ok(None);
        }
        let root: Hash = w.root.as_ref().try_into().map_err(|_| WitnessLinkError::Bad("root length".into()))?;
        let c = w.cosignature.as_ref().ok_or_else(|| WitnessLinkError::Bad("no cosignature".into()))?;
        let c = Cosignature::try_from(c)?;
        let head = relay_proto::merkle::TreeHead { size: w.size, root, timestamp_ms: 0 };
        c.verify(&spec.key, log_key, &head)?;
        Ok(Some((w.size, root)))
    }
    .await;
    conn.close().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_witness_spec_round_trips_and_bad_ones_are_refused() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]).verifying_key();
        let text = format!("127.0.0.1:4433,{},{}", "ab".repeat(32), hex::encode(key.as_bytes()));
        let spec: WitnessSpec = text.parse().expect("spec");
        assert_eq!(spec.to_string(), text);
        assert_eq!(spec.to_string().parse::<WitnessSpec>(), Ok(spec));
        for bad in [
            "",
            "127.0.0.1:4433",
            &format!("nothost,{},{}", "ab".repeat(32), hex::encode(key.as_bytes())),
            &format!("127.0.0.1:1,{},{}", "ab".repeat(31), hex::encode(key.as_bytes())),
            &format!("127.0.0.1:1,{},{}", "ab".repeat(32), "cd".repeat(31)),
            &format!("{text},extra"),
        ] {
            assert!(bad.parse::<WitnessSpec>().is_err(), "{bad:?}");
        }
    }
}
