//! A minimal HTTP/1.1 client for webhooks: `POST` to an `https://` (or, for local affiliates, `http://`) URL with a
//! `Content-Length` body and `Connection: close`, returning the status code.
//!
//! Contract: one request per connection; the whole exchange (connect, TLS handshake, send, status line) is bounded by
//! the timeout given, and when the timeout fires the connection is reset (`SO_LINGER` 0), not closed gracefully: the
//! kernel discards what it still held of the request, so no byte of it reaches the affiliate after the timeout (a
//! lease that covered the request may have lapsed by then). An exchange that completes closes normally; at most [`MAX_STATUS_LINE`] bytes of the answer are read, the rest is ignored. `https://`
//! verifies the server's certificate chain and name with rustls (TLS 1.2 or 1.3, ring) against the system's roots
//! plus any extra CA the operator adds ([`Tls::with_extra_roots`]); there is no way to turn verification off.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest status line read.
pub const MAX_STATUS_LINE: usize = 8 * 1024;

/// A parsed webhook URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// `https://`: the request goes over TLS.
    pub tls: bool,
    /// Host name or IP literal.
    pub host: String,
    /// TCP port (80 when not given).
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

/// Why a webhook request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// The URL is not an `http://` or `https://` URL this client handles.
    #[error("unsupported endpoint {0:?}: expected https://host[:port]/path or http://host[:port]/path")]
    Unsupported(String),
    /// The TLS setup or handshake failed (unknown issuer, wrong name, no roots, ...): nothing of the request was
    /// sent.
    #[error("webhook TLS: {0}")]
    Tls(String),
    /// Connecting failed: nothing of the request was sent.
    #[error("webhook connect: {0}")]
    Connect(std::io::Error),
    /// Writing or reading failed: the affiliate may or may not have the request.
    #[error("webhook connection: {0}")]
    Io(#[from] std::io::Error),
    /// No complete answer within the timeout.
    #[error("webhook request timed out")]
    Timeout,
    /// The answer does not start with an HTTP/1.x status line.
    #[error("malformed HTTP status line")]
    BadStatus,
}

/// Parses `https://host[:port][/path]` (port 443 by default) or `http://host[:port][/path]` (port 80).
pub fn parse_url(url: &str) -> Result<Url, HttpError> {
    let unsupported = || HttpError::Unsupported(url.to_owned());
    let (tls, rest) = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
        (Some(rest), _) => (true, rest),
        (None, Some(rest)) => (false, rest),
        (None, None) => return Err(unsupported()),
    };
    let default_port = if tls { 443 } else { 80 };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(unsupported)?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| unsupported())?,
            None if after.is_empty() => default_port,
            None => return Err(unsupported()),
        };
        (host.to_owned(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), p.parse().map_err(|_| unsupported())?),
            None => (authority.to_owned(), default_port),
        }
    };
    // Host and path are written into the request head: a space, CR, LF or other control byte in either could end a
    // line or a field early, so a URL with one in either is refused.
    let head_unsafe = |s: &str| s.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control());
    if host.is_empty() || authority.contains('@') || head_unsafe(&host) || head_unsafe(path) {
        return Err(unsupported());
    }
    Ok(Url { tls, host, port, path: path.to_owned() })
}

/// The TLS client configuration for `https://` webhooks (cheap to clone).
#[derive(Clone)]
pub struct Tls {
    connector: tokio_rustls::TlsConnector,
    roots: usize,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("roots", &self.roots).finish()
    }
}

impl Tls {
    /// Trusts the system's root certificates.
    pub fn system() -> Result<Self, HttpError> {
        Self::with_extra_roots(None)
    }

    /// Trusts the system's roots and the certificates in `pem` (an operator's private CA, or a test's).
    pub fn with_extra_roots(pem: Option<&[u8]>) -> Result<Self, HttpError> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            tracing::warn!(error = %error, "some system root certificates could not be loaded");
        }
        let (added, _ignored) = roots.add_parsable_certificates(native.certs);
        let mut count = added;
        if let Some(pem) = pem {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| HttpError::Tls(format!("extra CA file: {e}")))?;
                roots.add(cert).map_err(|e| HttpError::Tls(format!("extra CA certificate: {e}")))?;
                count += 1;
            }
        }
        let config = rustls::ClientConfig::builder_with_provider(relay_quic::crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| HttpError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self { connector: tokio_rustls::TlsConnector::from(Arc::new(config)), roots: count })
    }

    /// Number of trusted roots.
    pub fn roots(&self) -> usize {
        self.roots
    }
}

/// Posts `body` with `headers` to `url` (over TLS with `tls` for `https://`); the answer's status code.
pub async fn post(
    url: &Url,
    tls: &Tls,
    headers: &[(&str, String)],
    body: &[u8],
    timeout: Duration,
) -> Result<u16, HttpError> {
    tokio::time::timeout(timeout, connect_and_exchange(url, tls, headers, body))
        .await
        .map_err(|_| HttpError::Timeout)?
}

async fn connect_and_exchange(url: &Url, tls: &Tls, headers: &[(&str, String)], body: &[u8]) -> Result<u16, HttpError> {
    let tcp = TcpStream::connect((url.host.as_str(), url.port)).await.map_err(HttpError::Connect)?;
    // Until the answer is in, dropping the socket (the timeout firing) resets the connection.
    set_linger_zero(&tcp, true).map_err(HttpError::Connect)?;
    if !url.tls {
        let mut tcp = tcp;
        let status = exchange(&mut tcp, url, headers, body).await?;
        set_linger_zero(&tcp, false)?;
        return Ok(status);
    }
    let name = ServerName::try_from(url.host.clone()).map_err(|e| HttpError::Tls(format!("server name: {e}")))?;
    let mut stream = tls.connector.connect(name, tcp).await.map_err(|e| HttpError::Tls(e.to_string()))?;
    let status = exchange(&mut stream, url, headers, body).await?;
    set_linger_zero(stream.get_ref().0, false)?;
    Ok(status)
}

/// `SO_LINGER` 0 (`abort`: a close resets the connection and discards unsent data) or the default (a graceful
/// close).
fn set_linger_zero(tcp: &TcpStream, abort: bool) -> std::io::Result<()> {
    socket2::SockRef::from(tcp).set_linger(abort.then_some(Duration::ZERO))
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    url: &Url,
    headers: &[(&str, String)],
    body: &[u8],
) -> Result<u16, HttpError> {
    let host = if url.host.contains(':') {
        format!("[{}]:{}", url.host, url.port)
    } else {
        format!("{}:{}", url.host, url.port)
    };
    let mut head = format!(
        "POST {} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nConnection: close\r\n",
        url.path,
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.flush().await?;
    let mut answer = Vec::with_capacity(256);
    let mut buf = [0u8; 1024];
    while !answer.windows(2).any(|w| w == b"\r\n") && answer.len() < MAX_STATUS_LINE {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    parse_status(&answer)
}

/// The status code of an answer's status line (`HTTP/1.x NNN ...`, ended by CRLF): a pure function of the bytes read,
/// so that the parsing of what an affiliate's server sends can be tested and fuzzed without a socket.
pub fn parse_status(answer: &[u8]) -> Result<u16, HttpError> {
    let end = answer.windows(2).position(|w| w == b"\r\n").ok_or(HttpError::BadStatus)?;
    let line = std::str::from_utf8(&answer[..end]).map_err(|_| HttpError::BadStatus)?;
    let mut parts = line.split(' ');
    match (parts.next(), parts.next()) {
        // Exactly three digits (RFC 9112 section 4): `u16::from_str` alone would also take "+20" as 20.
        (Some(v), Some(code))
            if v.starts_with("HTTP/1.") && code.len() == 3 && code.bytes().all(|b| b.is_ascii_digit()) =>
        {
            code.parse().map_err(|_| HttpError::BadStatus)
        }
        _ => Err(HttpError::BadStatus),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let u = parse_url("http://127.0.0.1:9000/hooks?x=1").expect("url");
        assert_eq!(u, Url { tls: false, host: "127.0.0.1".into(), port: 9000, path: "/hooks?x=1".into() });
        assert_eq!(parse_url("http://example.com").expect("url").port, 80);
        let secure = parse_url("https://hooks.example.com/in").expect("url");
        assert_eq!((secure.tls, secure.port, secure.path.as_str()), (true, 443, "/in"));
        assert_eq!(parse_url("https://[::1]:8443/a").expect("url").port, 8443);
        assert_eq!(parse_url("http://[::1]:8080/a").expect("url").host, "::1");
        for bad in ["ftp://x/", "http://:80/", "http://h:notaport/", "http://u@h/", "https://", "HTTPS://x/"] {
            assert!(matches!(parse_url(bad), Err(HttpError::Unsupported(_))), "{bad}");
        }
    }

    #[test]
    fn urls_that_could_split_the_request_head_are_refused() {
        // Found by the http_response fuzz target: the host was not checked for control bytes or whitespace.
        for bad in [
            "http://128\0\0\0\0\0\0\0\u{12}/",
            "http://a b/",
            "http://evil\r\nX-Injected: 1:80/",
            "http://h\t:80/",
            "http://[::1\n]:80/",
            "http://h/a b",
            "http://h/a\r\n",
        ] {
            assert!(matches!(parse_url(bad), Err(HttpError::Unsupported(_))), "{bad}");
        }
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 204 No Content\r\n").expect("status"), 204);
        assert_eq!(parse_status(b"HTTP/1.0 503 Busy\r\nx").expect("status"), 503);
        assert!(parse_status(b"SSH-2.0\r\n").is_err());
        assert!(parse_status(b"HTTP/1.1 200").is_err(), "no line end");
        // Found by the http_response fuzz target: a sign was taken as part of the code ("+00" parsed as 0).
        for bad in [&b"HTTP/1.1 +00\r\n"[..], b"HTTP/1.1 +20 OK\r\n", b"HTTP/1.1 20 OK\r\n", b"HTTP/1.1 2000\r\n"] {
            assert!(matches!(parse_status(bad), Err(HttpError::BadStatus)), "{bad:?}");
        }
    }

    /// Issue #12, point 4: a request that timed out was dropped with a graceful close, so what the kernel still
    /// held of it kept going to a slow affiliate after the timeout (and after a withdrawal its lease no longer held
    /// back). An affiliate that stops reading must see the connection reset once the timeout fires, not the rest of
    /// the request followed by an orderly end.
    #[tokio::test]
    async fn a_timed_out_request_is_reset_not_drained() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = parse_url(&format!("http://{}/hooks", listener.local_addr().expect("addr"))).expect("url");
        let tls = Tls::with_extra_roots(None).expect("tls");
        // More than the socket buffers of both ends hold, so the request is still being written when it times out.
        let body = vec![b'x'; 32 << 20];
        let (post, accepted) = tokio::join!(post(&url, &tls, &[], &body, Duration::from_millis(300)), async {
            listener.accept().await.expect("accept").0
        });
        assert!(matches!(post, Err(HttpError::Timeout)), "{post:?}");
        // Only now does the affiliate read what reached it.
        let mut sink = accepted;
        let mut received = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(20), sink.read_to_end(&mut received)).await.expect("ends");
        let error = read.expect_err("the connection must be reset, not ended in order");
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset, "{error}");
        assert!(received.len() < body.len());
    }

    /// A request that is answered closes its connection in order: the reset is only for one cut short.
    #[tokio::test]
    async fn an_answered_request_closes_in_order() {
        use tokio::io::AsyncWriteExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = parse_url(&format!("http://{}/hooks", listener.local_addr().expect("addr"))).expect("url");
        let tls = Tls::with_extra_roots(None).expect("tls");
        let sink = async {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.windows(5).any(|w| w == b"\r\n\r\nx") {
                let n = s.read(&mut buf).await.expect("read");
                assert!(n > 0, "the whole request arrives");
                request.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await.expect("answer");
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await
        };
        let (post, rest) = tokio::join!(post(&url, &tls, &[], b"x", Duration::from_secs(20)), sink);
        assert_eq!(post.expect("answered"), 204);
        assert_eq!(rest.expect("an orderly end, not a reset"), 0);
    }
}
