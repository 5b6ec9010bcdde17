//! Notice documents (`relay_proto::notice`) over arbitrary bytes.
//!
//! Checks: decoding never panics; whatever decodes is a notice whose terms pass `check` and that re-encodes to the
//! very same bytes (one document per set of terms), so its hash is the SHA-256 of the input; one flipped byte of an
//! accepted document is either refused or a notice with other terms (another hash).
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::notice::{Notice, notice_hash};

fuzz_target!(|data: &[u8]| {
    let Ok(notice) = Notice::decode(data) else {
        return;
    };
    assert!(notice.check().is_ok());
    assert_eq!(notice.encode().as_deref(), Ok(data), "canonical");
    assert_eq!(notice.hash(), Ok(notice_hash(data)));
    let mut flipped = data.to_vec();
    let at = data.len() / 2;
    flipped[at] ^= 1;
    if let Ok(other) = Notice::decode(&flipped) {
        assert_ne!(other, notice);
    }
});
