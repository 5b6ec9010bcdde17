//! A minimal HTTP/1.1 client for webhooks: `POST` to an `http://host:port/path` URL with a `Content-Length` body and
//! `Connection: close`, returning the status code. `https://` is refused ([`HttpError::Unsupported`]).
//!
//! Contract: one request per connection; the whole exchange (connect, send, status line) is bounded by the timeout
//! given; at most [`MAX_STATUS_LINE`] bytes of the answer are read, the rest is ignored.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest status line read.
pub const MAX_STATUS_LINE: usize = 8 * 1024;

/// A parsed webhook URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
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
    /// The URL is not a plain `http://` URL this client handles.
    #[error("unsupported endpoint {0:?}: only http://host[:port]/path is supported (https is not yet)")]
    Unsupported(String),
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

/// Parses `http://host[:port][/path]`.
pub fn parse_url(url: &str) -> Result<Url, HttpError> {
    let unsupported = || HttpError::Unsupported(url.to_owned());
    let rest = url.strip_prefix("http://").ok_or_else(unsupported)?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(unsupported)?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| unsupported())?,
            None if after.is_empty() => 80,
            None => return Err(unsupported()),
        };
        (host.to_owned(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), p.parse().map_err(|_| unsupported())?),
            None => (authority.to_owned(), 80),
        }
    };
    if host.is_empty()
        || authority.contains('@')
        || path.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(unsupported());
    }
    Ok(Url { host, port, path: path.to_owned() })
}

/// Posts `body` with `headers` to `url`; the answer's status code.
pub async fn post(url: &Url, headers: &[(&str, String)], body: &[u8], timeout: Duration) -> Result<u16, HttpError> {
    tokio::time::timeout(timeout, exchange(url, headers, body)).await.map_err(|_| HttpError::Timeout)?
}

async fn exchange(url: &Url, headers: &[(&str, String)], body: &[u8]) -> Result<u16, HttpError> {
    let mut stream = TcpStream::connect((url.host.as_str(), url.port)).await.map_err(HttpError::Connect)?;
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

fn parse_status(answer: &[u8]) -> Result<u16, HttpError> {
    let end = answer.windows(2).position(|w| w == b"\r\n").ok_or(HttpError::BadStatus)?;
    let line = std::str::from_utf8(&answer[..end]).map_err(|_| HttpError::BadStatus)?;
    let mut parts = line.split(' ');
    match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") && code.len() == 3 => {
            code.parse().map_err(|_| HttpError::BadStatus)
        }
        _ => Err(HttpError::BadStatus),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_https_is_refused() {
        let u = parse_url("http://127.0.0.1:9000/hooks?x=1").expect("url");
        assert_eq!(u, Url { host: "127.0.0.1".into(), port: 9000, path: "/hooks?x=1".into() });
        assert_eq!(parse_url("http://example.com").expect("url").port, 80);
        assert_eq!(parse_url("http://[::1]:8080/a").expect("url").host, "::1");
        for bad in ["https://example.com/", "ftp://x/", "http://:80/", "http://h:notaport/", "http://u@h/"] {
            assert!(matches!(parse_url(bad), Err(HttpError::Unsupported(_))), "{bad}");
        }
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 204 No Content\r\n").expect("status"), 204);
        assert_eq!(parse_status(b"HTTP/1.0 503 Busy\r\nx").expect("status"), 503);
        assert!(parse_status(b"SSH-2.0\r\n").is_err());
        assert!(parse_status(b"HTTP/1.1 200").is_err(), "no line end");
    }
}
