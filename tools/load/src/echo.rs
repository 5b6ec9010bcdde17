//! `echo`: the transport ceiling. A QUIC echo server in this process, with the relay's transport settings, TLS
//! provider, ALPN and tuned sockets, answers what the clients send with `Deliver` frames carrying the same envelopes:
//! framing and QUIC, no storage, no relay logic. The clients behave as `online` senders do (`--window` in flight per
//! connection, `--size`-byte payloads), so the round trips per second it reaches is what `online` is compared with.
//! By default both sides model the pipelined send stream (protocol.md 4.3): one stream per connection,
//! sequence-numbered `PipelinedSend` frames, and per batch of frames read a `Deliver` echoing each envelope plus one
//! `SendAcks`, written at once. With `--stream-per-send`, one stream per request, a `Send` frame out and a frame
//! back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use bytes::Bytes;
use rand::RngExt;
use relay_proto::wire::{ClientFrame, Deliver, ServerFrame, client_frame, server_frame};
use relay_proto::{MAX_FRAME_LEN, wire};
use relay_quic::{read_frame, write_frame};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use tokio::task::JoinSet;

use crate::Load;
use crate::clients::Endpoints;
use crate::relayd::ProcStats;
use crate::report::{Latency, Report, round2};

/// Streams a connection may have open, as relayd's default `max_streams_per_connection`.
const MAX_STREAMS: u32 = 256;
/// As relayd's default `idle_timeout_secs`.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Starts the echo server on 127.0.0.1:0; returns its endpoint and certificate fingerprint.
fn start_server() -> Result<(quinn::Endpoint, [u8; 32])> {
    let generated = rcgen::generate_simple_self_signed(vec!["consent-relay".to_owned()])?;
    let cert = generated.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(generated.signing_key.serialize_der()));
    let fingerprint: [u8; 32] = Sha256::digest(cert.as_ref()).into();
    let mut tls = rustls::ServerConfig::builder_with_provider(relay_quic::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    tls.alpn_protocols = vec![relay_proto::ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls)).map_err(|e| anyhow!("{e}"))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(relay_quic::transport_config(MAX_STREAMS, IDLE_TIMEOUT, None)));
    let endpoint = relay_quic::endpoint(SocketAddr::from(([127, 0, 0, 1], 0)), Some(server))?;
    let serving = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = serving.accept().await {
            tokio::spawn(serve_connection(incoming));
        }
    });
    Ok((endpoint, fingerprint))
}

async fn serve_connection(incoming: quinn::Incoming) {
    let Ok(conn) = incoming.await else { return };
    let mut streams = JoinSet::new();
    loop {
        tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    streams.spawn(serve_stream(send, recv));
                }
                Err(_) => return,
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    }
}

async fn serve_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    while let Ok(Some(frame)) = read_frame::<ClientFrame>(&mut recv, MAX_FRAME_LEN).await {
        let envelope = match frame.body {
            Some(client_frame::Body::Send(s)) => s.envelope,
            Some(client_frame::Body::OpenSendStream(_)) => return serve_pipeline(send, recv).await,
            _ => Bytes::new(),
        };
        let reply = Deliver { server_id: 0, stored_at_ms: 0, envelope };
        if write_frame(&mut send, &ServerFrame { body: Some(server_frame::Body::Deliver(reply)) }).await.is_err() {
            return;
        }
    }
    send.finish().ok();
}

/// A pipelined send stream as the relay serves it (protocol.md 4.3), without storage: the reading half hands each
/// frame on; the writing half takes every frame ready and answers them in one write, a `Deliver` echoing each
/// envelope (the bytes the relay would push to the recipient) and one `SendAcks` for the batch.
async fn serve_pipeline(mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    const PENDING: usize = 1024;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, Bytes)>(PENDING);
    let read = async move {
        while let Ok(Some(frame)) = read_frame::<ClientFrame>(&mut recv, MAX_FRAME_LEN).await {
            let Some(client_frame::Body::PipelinedSend(p)) = frame.body else { return };
            let envelope = p.send.map(|s| s.envelope).unwrap_or_default();
            if tx.send((p.seq, envelope)).await.is_err() {
                return;
            }
        }
    };
    let write = async {
        let mut batch = Vec::new();
        let mut out = bytes::BytesMut::new();
        while rx.recv_many(&mut batch, PENDING).await > 0 {
            out.clear();
            let mut acks = wire::SendAcks::default();
            for (seq, envelope) in batch.drain(..) {
                let deliver = Deliver { server_id: seq, stored_at_ms: 0, envelope };
                let frame = ServerFrame { body: Some(server_frame::Body::Deliver(deliver)) };
                relay_proto::frame::encode_into(&frame, &mut out).ok();
                acks.seqs.push(seq);
                acks.server_ids.push(seq);
            }
            let frame = ServerFrame { body: Some(server_frame::Body::SendAcks(acks)) };
            relay_proto::frame::encode_into(&frame, &mut out).ok();
            if send.write_all(&out).await.is_err() {
                return;
            }
        }
        send.finish().ok();
    };
    tokio::join!(read, write);
}

/// One connection's `msgs` echo round trips on one pipelined stream, `window` unanswered; returns the
/// send-to-ack latencies, µs, and counts each answered frame in `done`.
async fn pipelined(
    conn: quinn::Connection,
    msgs: u64,
    window: usize,
    envelope: Bytes,
    deadline: Instant,
    done: Arc<AtomicU64>,
) -> Result<hdrhistogram::Histogram<u64>> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let open = ClientFrame { body: Some(client_frame::Body::OpenSendStream(wire::OpenSendStream {})) };
    write_frame(&mut send, &open).await?;
    let slots = tokio::sync::Semaphore::new(window);
    let sent_at = std::sync::Mutex::new(std::collections::VecDeque::<Instant>::new());
    let write = async {
        for seq in 1..=msgs {
            match tokio::time::timeout_at(deadline.into(), slots.acquire()).await {
                Ok(Ok(permit)) => permit.forget(),
                _ => break,
            }
            let send_frame = wire::Send { recipient: Bytes::from_static(&[0; 16]), envelope: envelope.clone() };
            let p = wire::PipelinedSend { seq, send: Some(send_frame), sealed: None };
            sent_at.lock().unwrap_or_else(|p| p.into_inner()).push_back(Instant::now());
            write_frame(&mut send, &ClientFrame { body: Some(client_frame::Body::PipelinedSend(p)) }).await?;
        }
        send.finish().ok();
        Ok::<_, anyhow::Error>(())
    };
    let read = async {
        let mut hist = crate::report::histogram();
        let mut answered = 0u64;
        while answered < msgs {
            let next = read_frame::<ServerFrame>(&mut recv, MAX_FRAME_LEN);
            let frame = match tokio::time::timeout_at(deadline.into(), next).await {
                Ok(frame) => frame?,
                Err(_) => break,
            };
            match frame {
                Some(ServerFrame { body: Some(server_frame::Body::Deliver(_)) }) => {}
                Some(ServerFrame { body: Some(server_frame::Body::SendAcks(a)) }) => {
                    let n = a.seqs.len();
                    let mut times = sent_at.lock().unwrap_or_else(|p| p.into_inner());
                    let take = n.min(times.len());
                    for t in times.drain(..take) {
                        hist.saturating_record(t.elapsed().as_micros() as u64);
                    }
                    drop(times);
                    answered += n as u64;
                    done.fetch_add(n as u64, Ordering::Relaxed);
                    slots.add_permits(n);
                }
                _ => break,
            }
        }
        slots.close();
        Ok::<_, anyhow::Error>(hist)
    };
    let (wrote, hist) = tokio::join!(write, read);
    wrote?;
    hist
}

/// One echo round trip on a new stream, as `Connection::request` does it.
async fn round_trip(conn: &quinn::Connection, frame: &ClientFrame) -> Result<()> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(&mut send, frame).await?;
    send.finish().ok();
    match read_frame::<ServerFrame>(&mut recv, MAX_FRAME_LEN).await? {
        Some(ServerFrame { body: Some(server_frame::Body::Deliver(_)) }) => Ok(()),
        _ => Err(anyhow!("unexpected echo reply")),
    }
}

/// Runs `echo`.
pub async fn run(load: &Load, n: usize) -> Result<Report> {
    let deadline = Instant::now() + load.limit();
    let (server, fingerprint) = start_server()?;
    let addr = server.local_addr()?;
    let endpoints = Endpoints::new(n, load.per_endpoint)?;
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let config = relay_client::connection::client_config(fingerprint)?;
        let connecting = endpoints.for_client(i).connect_with(config, addr, "consent-relay")?;
        conns.push(tokio::time::timeout_at(deadline.into(), connecting).await??);
    }

    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let total = load.msgs * n as u64;
    let started = Instant::now();
    let progress = {
        let done = done.clone();
        crate::progress::Progress::start("echo", move || {
            let d = done.load(Ordering::Relaxed);
            format!("{d}/{total} round trips ({:.0}/s)", d as f64 / started.elapsed().as_secs_f64())
        })
    };
    let client_before = ProcStats::read(None).ok();
    let mut workers = JoinSet::new();
    for conn in &conns {
        if load.pipelined() {
            let mut filler = vec![0u8; load.size];
            rand::rng().fill(&mut filler[..]);
            let (conn, done, errors) = (conn.clone(), done.clone(), errors.clone());
            let (msgs, window) = (load.msgs, load.window);
            workers.spawn(async move {
                match pipelined(conn, msgs, window, Bytes::from(filler), deadline, done).await {
                    Ok(hist) => hist,
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        crate::report::histogram()
                    }
                }
            });
            continue;
        }
        let next = Arc::new(AtomicU64::new(0));
        for _ in 0..load.window {
            let (conn, next, done, errors) = (conn.clone(), next.clone(), done.clone(), errors.clone());
            let msgs = load.msgs;
            let mut filler = vec![0u8; load.size];
            rand::rng().fill(&mut filler[..]);
            let frame = ClientFrame {
                body: Some(client_frame::Body::Send(wire::Send {
                    recipient: Bytes::from_static(&[0; 16]),
                    envelope: Bytes::from(filler),
                })),
            };
            workers.spawn(async move {
                let mut hist = crate::report::histogram();
                while next.fetch_add(1, Ordering::Relaxed) < msgs && Instant::now() < deadline {
                    let t = Instant::now();
                    let left = deadline.saturating_duration_since(t);
                    match tokio::time::timeout(left, round_trip(&conn, &frame)).await {
                        Ok(Ok(())) => {
                            hist.saturating_record(t.elapsed().as_micros() as u64);
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Err(_)) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => break,
                    }
                }
                hist
            });
        }
    }
    let mut rtt = crate::report::histogram();
    while let Some(h) = workers.join_next().await {
        rtt.add(&h?).ok();
    }
    let elapsed = started.elapsed().as_secs_f64();
    progress.finish().await;
    let mut report = Report::new(if load.pipelined() { "echo-pipeline" } else { "echo" }, load, n);
    if let (Some(before), Ok(after)) = (client_before, ProcStats::read(None)) {
        // Server and clients share this process here.
        report.set("process_cpu_pct", round2((after.cpu_s - before.cpu_s) / elapsed * 100.0), true);
    }
    endpoints.close().await;
    server.close(0u32.into(), b"done");
    let delivered = done.load(Ordering::Relaxed);
    report.complete = delivered == total;
    report.elapsed_s = round2(elapsed);
    report.delivered = delivered;
    report.msgs_per_s = round2(delivered as f64 / elapsed);
    report.latency_ms = Latency::from_histogram(&rtt);
    report.errors = errors.load(Ordering::Relaxed);
    Ok(report)
}
