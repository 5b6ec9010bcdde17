//! What the relay, the exporter and the client share at runtime: reading and writing length-delimited frames on
//! quinn streams (and the error codes a bad frame earns), the single rustls crypto provider (ring), transport
//! settings, UDP sockets with buffers large enough for loopback load, certificate pinning ([`pin`]), TLS identities
//! ([`identity`]), the TLS keying material authentication is bound to ([`ekm`]), the accept loop ([`accept`]), the
//! ready line and the child-process starter ([`ready`]), durable and secret files ([`durable_file`]) and the
//! logging set-up ([`logging`]).
//!
//! Holds no protocol decisions (those are in `relay-proto`), no cryptography beyond QUIC's own TLS, and nothing
//! specific to one process.

pub mod accept;
pub mod budget;
pub mod durable_file;
pub mod identity;
pub mod logging;
pub mod metrics_http;
pub mod pin;
pub mod ready;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use prost::Message;
use relay_proto::auth::{EKM_LABEL, EKM_LEN};
use relay_proto::frame::{self, FrameError, PREFIX_LEN};
use relay_proto::{ErrorCode, StreamCloseCode};

pub use budget::{FrameBudget, FrameHold};

/// UDP send and receive buffer size. The 208 KiB Linux default drops datagrams under loopback load.
pub const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Why a frame could not be read from a stream.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The peer announced an oversized frame or sent a body that does not decode.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream ended in the middle of a frame.
    #[error("stream ended in the middle of a frame")]
    Truncated,
    /// The stream failed (reset by the peer, connection lost).
    #[error("stream error: {0}")]
    Stream(#[from] quinn::ReadError),
    /// The peer started a frame and did not complete it in time.
    #[error("frame not completed within {0:?}")]
    TimedOut(Duration),
}

impl ReadError {
    /// The error code for the error frame answering this, and the code to stop the stream with.
    pub fn codes(&self) -> (ErrorCode, StreamCloseCode) {
        match self {
            Self::Frame(FrameError::TooLarge { .. }) => (ErrorCode::FrameTooLarge, StreamCloseCode::FrameTooLarge),
            Self::TimedOut(_) => (ErrorCode::FrameTimeout, StreamCloseCode::ProtocolError),
            _ => (ErrorCode::MalformedFrame, StreamCloseCode::ProtocolError),
        }
    }
}

/// Why a frame could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// The message is larger than the maximum frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream failed.
    #[error("stream error: {0}")]
    Stream(#[from] quinn::WriteError),
}

/// Reads one frame. `Ok(None)` when the peer finished the stream cleanly between frames. The announced length is
/// checked against `max` before anything is allocated, and memory then grows only with bytes actually received
/// (which QUIC flow control bounds), so announcing a large frame and stalling costs the reader almost nothing.
pub async fn read_frame<M: Message + Default>(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Option<M>, ReadError> {
    let mut prefix = [0u8; PREFIX_LEN];
    match recv.read(&mut prefix).await? {
        Some(n) => read_rest(recv, max, prefix, n, None).await.map(|(m, _)| Some(m)),
        None => Ok(None),
    }
}

/// Like [`read_frame`], but once the first byte of a frame has arrived the whole frame must arrive within `limit`:
/// a peer that starts frames and stalls holds a stream (and its buffer) for at most that long. Waiting for the
/// first byte of the next frame is not limited (the connection's idle timeout covers that).
pub async fn read_frame_within<M: Message + Default>(
    recv: &mut quinn::RecvStream,
    max: usize,
    limit: Duration,
) -> Result<Option<M>, ReadError> {
    read_frame_budgeted(recv, max, limit, None).await
}

/// Like [`read_frame_within`], and the frame's bytes are taken from the connection's `budget` before they are read
/// out of quinn (see [`budget`]): waiting for budget counts against `limit` like waiting for bytes.
pub async fn read_frame_budgeted<M: Message + Default>(
    recv: &mut quinn::RecvStream,
    max: usize,
    limit: Duration,
    budget: Option<&FrameBudget>,
) -> Result<Option<M>, ReadError> {
    Ok(read_frame_held(recv, max, limit, budget).await?.map(|(m, _)| m))
}

/// Like [`read_frame_budgeted`], and the frame's bytes stay counted against `budget` until the returned hold is
/// dropped (see [`budget`]'s contract): for requests kept while they are served.
pub async fn read_frame_held<M: Message + Default>(
    recv: &mut quinn::RecvStream,
    max: usize,
    limit: Duration,
    budget: Option<&FrameBudget>,
) -> Result<Option<(M, Option<FrameHold>)>, ReadError> {
    let mut prefix = [0u8; PREFIX_LEN];
    match recv.read(&mut prefix).await? {
        Some(n) => match tokio::time::timeout(limit, read_rest(recv, max, prefix, n, budget)).await {
            Ok(result) => result.map(Some),
            Err(_) => Err(ReadError::TimedOut(limit)),
        },
        None => Ok(None),
    }
}

/// The rest of a frame whose first `filled` prefix bytes are in `prefix`. The body is kept as the pieces quinn
/// returns (no buffer sized to the announced length), each piece's bytes taken from `budget` first, and joined once
/// complete.
async fn read_rest<M: Message + Default>(
    recv: &mut quinn::RecvStream,
    max: usize,
    mut prefix: [u8; PREFIX_LEN],
    mut filled: usize,
    budget: Option<&FrameBudget>,
) -> Result<(M, Option<FrameHold>), ReadError> {
    if filled == 0 {
        // quinn never returns an empty read before the end of the stream; treat it as the end.
        return Err(ReadError::Truncated);
    }
    while filled < PREFIX_LEN {
        match recv.read(&mut prefix[filled..]).await? {
            Some(n) => filled += n,
            None => return Err(ReadError::Truncated),
        }
    }
    let len = frame::body_len(prefix, max)?;
    let mut held = budget.map(FrameBudget::hold);
    // The whole announced body at once, before any of it is read: a frame never waits for budget while holding
    // part of it, so frames of many streams cannot hold each other's budget hostage.
    if let Some(h) = held.as_mut() {
        h.take(len).await;
    }
    let mut pieces: Vec<Bytes> = Vec::new();
    let mut got = 0;
    while got < len {
        let want = (len - got).min(budget::READ_STEP);
        match recv.read_chunk(want, true).await? {
            Some(chunk) => {
                got += chunk.bytes.len();
                pieces.push(chunk.bytes);
            }
            None => return Err(ReadError::Truncated),
        }
    }
    let body = match pieces.len() {
        1 => pieces.pop().unwrap_or_default(),
        _ => {
            let mut joined = BytesMut::with_capacity(len);
            for piece in pieces.drain(..) {
                joined.extend_from_slice(&piece);
            }
            joined.freeze()
        }
    };
    Ok((M::decode(body).map_err(FrameError::from)?, held))
}

/// What [`next_request`] got from a request stream.
#[derive(Debug)]
pub enum NextRequest<M> {
    /// The next request.
    Request(M),
    /// The stream is over: the peer finished it between frames (our half is finished too) or it failed.
    Closed,
    /// The frame was oversized, undecodable, cut short or too slow: the peer's half was stopped with the matching
    /// close code, the error frame sent and our half finished. The stream is over; the code is for counting.
    Refused(ErrorCode),
}

/// Reads the next request frame on a request stream, and closes the stream the one way the protocol says when the
/// peer ends it or sends a frame that cannot be read: `error` makes the error frame for a code and a message.
/// Shared by the messaging endpoint and the export interface, so both refuse bad input identically.
pub async fn next_request<M: Message + Default, E: Message>(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    frame_timeout: Duration,
    error: impl FnOnce(ErrorCode, String) -> E,
) -> NextRequest<M> {
    next_request_budgeted(send, recv, frame_timeout, None, error).await
}

/// Like [`next_request`], with the frame's bytes taken from the connection's `budget` as they are read.
pub async fn next_request_budgeted<M: Message + Default, E: Message>(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    frame_timeout: Duration,
    budget: Option<&FrameBudget>,
    error: impl FnOnce(ErrorCode, String) -> E,
) -> NextRequest<M> {
    next_request_held(send, recv, frame_timeout, budget, error).await.0
}

/// Like [`next_request_budgeted`], with the request's hold on `budget` (kept until the request is answered).
pub async fn next_request_held<M: Message + Default, E: Message>(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    frame_timeout: Duration,
    budget: Option<&FrameBudget>,
    error: impl FnOnce(ErrorCode, String) -> E,
) -> (NextRequest<M>, Option<FrameHold>) {
    let next = match read_frame_held::<M>(recv, relay_proto::MAX_FRAME_LEN, frame_timeout, budget).await {
        Ok(Some((request, hold))) => return (NextRequest::Request(request), hold),
        Ok(None) => {
            send.finish().ok();
            NextRequest::Closed
        }
        Err(ReadError::Stream(_)) => NextRequest::Closed,
        Err(e) => {
            let (code, close) = e.codes();
            tracing::debug!(error = %e, "bad frame, closing stream");
            recv.stop(close.code().into()).ok();
            write_frame(send, &error(code, e.to_string())).await.ok();
            send.finish().ok();
            NextRequest::Refused(code)
        }
    };
    (next, None)
}

/// Writes one frame.
pub async fn write_frame<M: Message>(send: &mut quinn::SendStream, msg: &M) -> Result<(), WriteError> {
    let bytes = frame::encode(msg)?;
    send.write_all(&bytes).await?;
    Ok(())
}

/// The process's one rustls crypto provider (ring). Every rustls config is built with it explicitly, so a second
/// provider compiled into the binary can never make rustls panic.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Transport settings shared by both ends.
pub fn transport_config(
    max_bidi_streams: u32,
    idle_timeout: Duration,
    keep_alive: Option<Duration>,
) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // Flow control bounds what a peer can make us buffer: two maximal frames per stream, 16 MiB per connection.
    t.stream_receive_window(quinn::VarInt::from_u32(2 * relay_proto::MAX_FRAME_LEN as u32));
    t.receive_window(quinn::VarInt::from_u32(16 * 1024 * 1024));
    t.max_concurrent_bidi_streams(max_bidi_streams.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle_timeout).ok());
    t.keep_alive_interval(keep_alive);
    t
}

/// Binds a UDP socket with enlarged buffers (best effort: the kernel may cap them at `net.core.rmem_max`).
pub fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).ok();
    }
    socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES).ok();
    socket.set_send_buffer_size(SOCKET_BUFFER_BYTES).ok();
    let granted = socket.recv_buffer_size().unwrap_or(0);
    if granted < SOCKET_BUFFER_BYTES {
        tracing::warn!(
            granted,
            wanted = SOCKET_BUFFER_BYTES,
            "UDP receive buffer capped by the kernel (raise net.core.rmem_max): datagrams may drop under load"
        );
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Creates an endpoint on `addr` with tuned socket buffers.
pub fn endpoint(addr: SocketAddr, server: Option<quinn::ServerConfig>) -> std::io::Result<quinn::Endpoint> {
    let socket = udp_socket(addr)?;
    let runtime = quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime found for quinn"))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, runtime)
}

/// The TLS exported keying material (RFC 8446 §7.5, label [`EKM_LABEL`], empty context, [`EKM_LEN`] bytes) that
/// authentication transcripts are bound to.
pub fn ekm(conn: &quinn::Connection) -> Result<[u8; EKM_LEN], quinn::crypto::ExportKeyingMaterialError> {
    let mut out = [0u8; EKM_LEN];
    conn.export_keying_material(&mut out, EKM_LABEL, b"")?;
    Ok(out)
}
