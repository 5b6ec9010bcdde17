//! The affiliates catalogue (`relay_exporter::affiliates::Catalogue::parse`) over arbitrary UTF-8, and the
//! webhook signatures made with the secrets it holds (`relay_exporter::webhook`).
//!
//! Checks: parsing never panics; an accepted catalogue holds only valid ids, two-letter countries and 16 to 64 byte
//! secrets; a signature made with each affiliate's secret verifies and does not verify for another body; verifying an
//! arbitrary `webhook-signature` header (the input text) never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::consent::valid_affiliate_id;
use relay_exporter::{Catalogue, http, webhook};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // An arbitrary header against an arbitrary key: must not panic (and will not verify).
    let key = &data[..data.len().min(32)];
    assert!(!webhook::verify(key, "msg_1", 1_700_000_000, b"{}", text) || text.contains("v1,"));

    let Ok(catalogue) = Catalogue::parse(text) else {
        return;
    };
    for a in catalogue.iter() {
        assert!(valid_affiliate_id(&a.id), "{:?}", a.id);
        assert!(a.country.len() == 2 && a.country.bytes().all(|b| b.is_ascii_uppercase()));
        assert!((16..=64).contains(&a.secret.len()));
        assert!(a.endpoint.starts_with("http://") || a.endpoint.starts_with("https://"));
        let _ = http::parse_url(&a.endpoint);
        assert_eq!(catalogue.get(&a.id).map(|b| &b.id), Some(&a.id));
        let sig = webhook::sign(&a.secret, &a.id, 1_700_000_000, text.as_bytes());
        assert!(webhook::verify(&a.secret, &a.id, 1_700_000_000, text.as_bytes(), &sig));
        assert!(!webhook::verify(&a.secret, &a.id, 1_700_000_001, text.as_bytes(), &sig));
    }
});
