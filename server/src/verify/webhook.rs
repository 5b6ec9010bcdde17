//! The `webhook=URL` verifier: each code is posted to an SMS gateway of the operator's choice as a Standard
//! Webhooks request, `{"phone", "code", "expires_at"}` in JSON, signed with the relay's `whsec_` secret.
//!
//! Contract: the gateway is reached over plain HTTP/1.1 on a **loopback** address only. The relay links no TLS
//! client for outgoing connections and no general HTTP client (`.ci/boundaries`: no `tokio-rustls`, no `hmac`, no
//! exporter code), so the one request it makes is written here by hand, and a gateway elsewhere is reached through a
//! local adapter (which forwards over HTTPS) rather than by sending phone numbers and codes in clear across a
//! network. The signature is HMAC-SHA256 from *ring* (already linked through rustls and quinn), not hand-rolled:
//! `webhook-signature: v1,base64(HMAC-SHA256(key, "msg_<request id>" ‖ "." ‖ timestamp ‖ "." ‖ body))` with
//! `webhook-id: msg_<request id>` and `webhook-timestamp` in Unix seconds, as the exporter's affiliates receive.
//!
//! The secret lives in `<data_dir>/webhook.secret` (mode 0600, one line `whsec_<base64 of the key>`); the relay
//! creates a random one at its first start with this verifier, and the operator gives the same line to the gateway
//! (or writes their own before that first start). A delivery is one attempt, bounded by [`DELIVERY_TIMEOUT`]; it
//! succeeds only on a 2xx answer. Nothing here logs the body.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use base64::Engine;
use ring::hmac;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{CodeMessage, DeliveryError};

/// Longest a delivery may take, connection included.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes of the gateway's answer read while looking for its status line.
const MAX_STATUS_LINE: usize = 8 * 1024;
/// File name of the webhook secret in the data directory.
pub const SECRET_FILE: &str = "webhook.secret";
/// Shortest accepted key behind a `whsec_` secret, in bytes.
const MIN_SECRET_BYTES: usize = 16;

/// The gateway's URL: `http://` + a loopback IP literal or `localhost`, an optional port (80), a path (`/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    /// Where to connect.
    addr: SocketAddr,
    /// The authority as written, for the `Host` header and display.
    authority: String,
    /// Path and query, starting with `/`.
    path: String,
}

/// Why a webhook URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UrlError {
    /// Anything but `http://` (the relay links no TLS client: see the module header).
    #[error("the webhook URL must start with http:// (the gateway must be on this host; see README)")]
    Scheme,
    /// The host is not a loopback address.
    #[error("the webhook URL's host must be a loopback address (127.0.0.1, [::1] or localhost), not {0:?}")]
    NotLoopback(String),
    /// The authority or path does not parse.
    #[error("malformed webhook URL: {0}")]
    Malformed(&'static str),
}

impl FromStr for WebhookUrl {
    type Err = UrlError;

    fn from_str(s: &str) -> Result<Self, UrlError> {
        let rest = s.strip_prefix("http://").ok_or(UrlError::Scheme)?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if path.bytes().any(|b| b <= b' ' || b == 0x7f) || path.contains('#') {
            return Err(UrlError::Malformed("the path must be printable, without spaces or a fragment"));
        }
        if authority.contains('@') {
            return Err(UrlError::Malformed("no user information in the URL"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or(UrlError::Malformed("unclosed '[' in the host"))?;
            (host, after)
        } else {
            match authority.rfind(':') {
                Some(i) => (&authority[..i], &authority[i..]),
                None => (authority, ""),
            }
        };
        let port = match port {
            "" => 80,
            p => p
                .strip_prefix(':')
                .and_then(|p| p.parse::<u16>().ok())
                .filter(|p| *p != 0)
                .ok_or(UrlError::Malformed("the port must be 1 to 65535"))?,
        };
        let ip = if host.eq_ignore_ascii_case("localhost") {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            host.parse::<IpAddr>().map_err(|_| UrlError::NotLoopback(host.to_owned()))?
        };
        if !ip.is_loopback() {
            return Err(UrlError::NotLoopback(host.to_owned()));
        }
        Ok(Self { addr: SocketAddr::new(ip, port), authority: authority.to_owned(), path: path.to_owned() })
    }
}

impl fmt::Display for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.authority, self.path)
    }
}

/// Why the webhook secret could not be loaded or created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// The file could not be read or created.
    #[error("webhook secret {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file does not hold a `whsec_` secret.
    #[error("webhook secret {0}: expected one line `whsec_<base64>` with at least {MIN_SECRET_BYTES} bytes of key")]
    Format(std::path::PathBuf),
}

/// The posting side: the gateway's URL and the signing key.
pub struct WebhookSender {
    url: WebhookUrl,
    key: hmac::Key,
}

impl WebhookSender {
    /// Loads the secret from `data_dir` (creating a random one the first time) for posting to `url`.
    pub fn open(url: WebhookUrl, data_dir: &Path) -> Result<Self, SecretError> {
        let path = data_dir.join(SECRET_FILE);
        let io = |source| SecretError::Io { path: path.clone(), source };
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key: [u8; 32] = rand::random();
                let line = format!("whsec_{}\n", base64::engine::general_purpose::STANDARD.encode(key));
                relay_quic::durable_file::create_secret(&path, line.as_bytes()).map_err(io)?;
                tracing::info!(file = %path.display(), "created a webhook secret for the SMS gateway");
                line
            }
            Err(e) => return Err(io(e)),
        };
        let key = parse_secret(&text).ok_or_else(|| SecretError::Format(path.clone()))?;
        Ok(Self { url, key: hmac::Key::new(hmac::HMAC_SHA256, &key) })
    }

    /// Posts `message` to the gateway: one attempt, bounded by [`DELIVERY_TIMEOUT`], successful on 2xx only.
    pub async fn deliver(&self, message: &CodeMessage<'_>) -> Result<(), DeliveryError> {
        let body = message.json();
        let id = format!("msg_{}", message.request_id);
        let timestamp = message.now_ms / 1000;
        let signature = signature(&self.key, &id, timestamp, body.as_bytes());
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\
             webhook-id: {id}\r\nwebhook-timestamp: {timestamp}\r\nwebhook-signature: {signature}\r\n\
             Connection: close\r\n\r\n{body}",
            path = self.url.path,
            host = self.url.authority,
            len = body.len(),
        );
        let status = tokio::time::timeout(DELIVERY_TIMEOUT, post(self.url.addr, request.as_bytes()))
            .await
            .map_err(|_| DeliveryError::Gateway("no answer in time".into()))??;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(DeliveryError::Gateway(format!("answered HTTP {status}")))
        }
    }
}

/// The key behind a `whsec_` line, if it is one.
fn parse_secret(text: &str) -> Option<Vec<u8>> {
    let b64 = text.trim().strip_prefix("whsec_")?;
    let key = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    (key.len() >= MIN_SECRET_BYTES).then_some(key)
}

/// The `webhook-signature` value for `id`, `timestamp` and `body`.
fn signature(key: &hmac::Key, id: &str, timestamp: u64, body: &[u8]) -> String {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(id.as_bytes());
    ctx.update(b".");
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(ctx.sign().as_ref()))
}

/// Writes `request` to `addr` and returns the status code of the answer.
async fn post(addr: SocketAddr, request: &[u8]) -> Result<u16, DeliveryError> {
    let io = |e: std::io::Error| DeliveryError::Gateway(e.to_string());
    let mut stream = TcpStream::connect(addr).await.map_err(io)?;
    stream.write_all(request).await.map_err(io)?;
    let mut answer = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        if let Some(end) = answer.windows(2).position(|w| w == b"\r\n") {
            return status_code(&answer[..end])
                .ok_or_else(|| DeliveryError::Gateway("answered something that is not HTTP/1.x".into()));
        }
        if answer.len() > MAX_STATUS_LINE {
            return Err(DeliveryError::Gateway("status line too long".into()));
        }
        let n = stream.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            return Err(DeliveryError::Gateway("closed the connection without an answer".into()));
        }
        answer.extend_from_slice(&chunk[..n]);
    }
}

/// The status code of an HTTP/1.x status line (`HTTP/1.1 200 OK`).
fn status_code(line: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.splitn(3, ' ');
    let version = parts.next()?;
    let code = parts.next()?;
    if !(version == "HTTP/1.1" || version == "HTTP/1.0") || code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    code.parse().ok().filter(|c| (100..600).contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_plain_http_to_a_loopback_address() {
        let u: WebhookUrl = "http://127.0.0.1:8085/sms".parse().expect("valid");
        assert_eq!((u.addr, u.path.as_str()), (SocketAddr::from(([127, 0, 0, 1], 8085)), "/sms"));
        assert_eq!(u.to_string(), "http://127.0.0.1:8085/sms");
        let u: WebhookUrl = "http://[::1]:9/a?b=c".parse().expect("v6");
        assert_eq!((u.addr.port(), u.path.as_str()), (9, "/a?b=c"));
        let u: WebhookUrl = "http://localhost".parse().expect("localhost, default port and path");
        assert_eq!((u.addr, u.path.as_str()), (SocketAddr::from(([127, 0, 0, 1], 80)), "/"));
        assert_eq!("https://127.0.0.1/sms".parse::<WebhookUrl>(), Err(UrlError::Scheme));
        assert!(matches!("http://192.0.2.1/sms".parse::<WebhookUrl>(), Err(UrlError::NotLoopback(_))));
        assert!(matches!("http://gateway.example/sms".parse::<WebhookUrl>(), Err(UrlError::NotLoopback(_))));
        for bad in [
            "http://127.0.0.1:0/",
            "http://127.0.0.1:x/",
            "http://u@127.0.0.1/",
            "http://[::1/",
            "http://127.0.0.1/a b",
        ] {
            assert!(bad.parse::<WebhookUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn secrets_are_whsec_lines_and_signatures_follow_standard_webhooks() {
        assert_eq!(parse_secret("whsec_MDEyMzQ1Njc4OWFiY2RlZg==\n"), Some(b"0123456789abcdef".to_vec()));
        assert_eq!(parse_secret("MDEyMzQ1Njc4OWFiY2RlZg=="), None, "no prefix");
        assert_eq!(parse_secret("whsec_c2hvcnQ="), None, "too short");
        // The signed content is `id.timestamp.body`, byte for byte. (The integration test posts to a sink that checks
        // the header with the exporter's independent implementation.)
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"0123456789abcdef");
        let sig = signature(&key, "msg_1", 1_700_000_000, b"{\"a\":1}");
        let mut ctx = hmac::Context::with_key(&key);
        ctx.update(b"msg_1.1700000000.{\"a\":1}");
        let expected = base64::engine::general_purpose::STANDARD.encode(ctx.sign().as_ref());
        assert_eq!(sig, format!("v1,{expected}"));
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_code(b"HTTP/1.1 204 No Content"), Some(204));
        assert_eq!(status_code(b"HTTP/1.0 503 Service Unavailable"), Some(503));
        assert_eq!(status_code(b"HTTP/1.1 200"), Some(200));
        for bad in [&b"HTTP/2 200 OK"[..], b"HTTP/1.1 20 OK", b"HTTP/1.1 abc", b"SSH-2.0", b"HTTP/1.1 999 x", b"\xff"] {
            assert_eq!(status_code(bad), None, "{bad:?}");
        }
    }
}
