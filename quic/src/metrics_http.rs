//! The tiny HTTP responder behind the opt-in metrics ports of relayd and relay-exporter: one request per TCP
//! connection, `GET /metrics` answered with the page a renderer makes (the Prometheus text format), anything else
//! with 404 or 405; requests larger than 8 KiB or slower than 5 s are dropped, and a few connections are served at
//! once. It renders nothing itself: what the page holds (totals only, never anything about one user) is each
//! process's business.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Largest request accepted by the metrics responder.
const MAX_REQUEST: usize = 8 * 1024;
/// Scrapes served at once.
const MAX_SCRAPES: usize = 8;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Renders the whole metrics page at each scrape.
pub type Renderer = Arc<dyn Fn() -> String + Send + Sync>;

/// Serves `GET /metrics` on `listener` with the page `render` makes, until the task is aborted.
pub async fn serve(listener: TcpListener, render: Renderer) {
    let permits = Arc::new(Semaphore::new(MAX_SCRAPES));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors or similar: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else { continue };
        let render = render.clone();
        tokio::spawn(async move {
            tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, render.as_ref())).await.ok();
            drop(permit);
        });
    }
}

async fn answer(mut stream: TcpStream, render: &(dyn Fn() -> String + Send + Sync)) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() + n > MAX_REQUEST {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let (status, content_type, body) = match (method, path) {
        (b"GET", b"/metrics") => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", render()),
        (b"GET", _) => ("404 Not Found", "text/plain; charset=utf-8", "not found: try /metrics\n".to_owned()),
        _ => ("405 Method Not Allowed", "text/plain; charset=utf-8", "only GET\n".to_owned()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
