//! Webhook signatures in the Standard Webhooks convention: headers `webhook-id`, `webhook-timestamp` (Unix
//! seconds) and `webhook-signature` = `v1,` + base64(HMAC-SHA256(key, id ‖ "." ‖ timestamp ‖ "." ‖ body)), where
//! the key is the base64 part of the affiliate's `whsec_` secret. The affiliate recomputes it to know the request
//! came from us, unaltered, and uses `webhook-id` to process each event once.

use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

fn mac(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> Hmac<Sha256> {
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    m.update(id.as_bytes());
    m.update(b".");
    m.update(timestamp.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    m
}

/// The `webhook-signature` header value.
pub fn sign(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    let tag = mac(key, id, timestamp, body).finalize().into_bytes();
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(tag))
}

/// Whether any `v1` signature in `header` (space-separated, as the convention allows) is valid. Compares in
/// constant time.
pub fn verify(key: &[u8], id: &str, timestamp: u64, body: &[u8], header: &str) -> bool {
    header.split(' ').filter_map(|s| s.strip_prefix("v1,")).any(|b64| {
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .is_ok_and(|tag| mac(key, id, timestamp, body).verify_slice(&tag).is_ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_bind_every_part() {
        let key = b"0123456789abcdef";
        let sig = sign(key, "msg_1", 1_700_000_000, b"{\"a\":1}");
        assert!(sig.starts_with("v1,"));
        assert!(verify(key, "msg_1", 1_700_000_000, b"{\"a\":1}", &sig));
        assert!(verify(key, "msg_1", 1_700_000_000, b"{\"a\":1}", &format!("v1,bm9wZQ== {sig}")), "any of several");
        assert!(!verify(key, "msg_2", 1_700_000_000, b"{\"a\":1}", &sig));
        assert!(!verify(key, "msg_1", 1_700_000_001, b"{\"a\":1}", &sig));
        assert!(!verify(key, "msg_1", 1_700_000_000, b"{\"a\":2}", &sig));
        assert!(!verify(b"another key.....", "msg_1", 1_700_000_000, b"{\"a\":1}", &sig));
        assert!(!verify(key, "msg_1", 1_700_000_000, b"{\"a\":1}", "v1,not base64!"));
    }
}
