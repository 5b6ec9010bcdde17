//! What the exporter parses from an affiliate's server and from its own catalogue's endpoint strings
//! (`relay_exporter::http`).
//!
//! `parse_status` gets the arbitrary bytes as the answer read from the socket: it must not panic, and a status code
//! it returns must be the three ASCII digits after `HTTP/1.x ` on the first CRLF-ended line. `parse_url` gets the
//! input as text: it must not panic, and a URL it accepts must not be able to split the request head it is written
//! into (no ASCII whitespace or control bytes in host or path).
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_exporter::http::{self, MAX_STATUS_LINE};

/// No byte that could end a line or a field of the request head early.
fn head_safe(s: &str) -> bool {
    !s.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
}

fuzz_target!(|data: &[u8]| {
    let answer = &data[..data.len().min(MAX_STATUS_LINE + 1024)];
    if let Ok(code) = http::parse_status(answer) {
        let end = answer.windows(2).position(|w| w == b"\r\n").expect("a status line ends with CRLF");
        let line = &answer[..end];
        assert!(line.starts_with(b"HTTP/1."), "{line:?}");
        let code_text = line.split(|&b| b == b' ').nth(1).expect("a status code follows the version");
        assert!(code_text.len() == 3 && code_text.iter().all(u8::is_ascii_digit), "status code {code_text:?}");
        let value = code_text.iter().fold(0u16, |v, d| v * 10 + u16::from(d - b'0'));
        assert_eq!(code, value);
    }

    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(url) = http::parse_url(text) {
            assert_eq!(url.tls, text.starts_with("https://"));
            assert!(text.starts_with("http://") || text.starts_with("https://"));
            assert!(!url.host.is_empty() && url.path.starts_with('/'));
            assert!(head_safe(&url.host) && head_safe(&url.path), "{url:?} could split the request head");
        }
    }
});
