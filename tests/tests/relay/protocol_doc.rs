//! `docs/protocol.md` against the code. Every hex test vector in the document is computed again here, by the
//! implementation, from the fixed inputs the document states, and must match byte for byte; a vector the document
//! lacks or has in excess fails too. The TLS facts the document states (ALPN, the cipher suite and so the hash of the
//! exported keying material, and that the relay follows the client's order) are checked on a handshake, in memory,
//! between the relay's and the client's own TLS configurations.
//!
//! A vector in the document is a fenced code block whose first line is `vector: NAME`; its other lines are hex, with
//! whitespace ignored and `#` starting a comment. A block whose first line is `text: NAME` holds exact text (its
//! lines joined by line feeds). `PROTOCOL_VECTORS_PRINT=1` prints every computed vector.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use ed25519_dalek::SigningKey;
use prost::Message;
use relay_client::Identity;
use relay_client::e2ee::SafetyNumber;
use relay_client::e2ee::pqxdh::identity_binding;
use relay_client::e2ee::prekeys::{KIND_SIGNED, signed_bytes as prekey_signed_bytes};
use relay_client::e2ee::safety::{Party, fingerprint};
use relay_client::sealed::{SealedContent, seal_for_test_vector, signature_input};
use relay_proto::auth::{EKM_LABEL, auth_transcript, register_transcript};
use relay_proto::consent::{ConsentStatement, Decision, Purpose, signed_bytes_of, statement_hash};
use relay_proto::identity::{SenderCertificate, certificate_signed_bytes};
use relay_proto::merkle::{ExportLeaf, LeafKind, MerkleLog, TreeHead, leaf_hash, node_hash};
use relay_proto::wire::{Auth, ClientFrame, DeviceInfo, Register, client_frame};
use relay_proto::{PROTOCOL_VERSION, PhoneNumber};
use rustls::CipherSuite;
use rustls::pki_types::ServerName;

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md");

const ALICE_PHONE: &str = "+33612345678";
const BOB_PHONE: &str = "+33698765432";
const SEALED_PAYLOAD: &[u8] = b"an end-to-end encrypted payload";
/// Expiry of Alice's sender certificate in the vectors: a day after 1_700_000_000_000.
const CERTIFICATE_EXPIRES_MS: u64 = 1_700_086_400_000;

/// 32 bytes counting up from `first`: the document's fixed secrets.
fn run(first: u8) -> [u8; 32] {
    std::array::from_fn(|i| first.wrapping_add(i as u8))
}

/// The X25519 public key of `secret` (the client derives it the same way for its sealing key).
fn x25519_public(secret: [u8; 32]) -> [u8; 32] {
    Identity::from_secrets([0; 32], secret).sealing_key()
}

fn leaf(
    (kind, id): (LeafKind, u8),
    affiliate: &str,
    purpose: &str,
    fields: &[&str],
    (payload_hash, consent_hash, notice_hash): ([u8; 32], [u8; 32], Option<[u8; 32]>),
    time_ms: u64,
) -> ExportLeaf {
    ExportLeaf {
        kind,
        notice_hash,
        export_id: [id; 16],
        affiliate: affiliate.into(),
        purpose: purpose.into(),
        fields: fields.iter().map(|f| (*f).to_owned()).collect(),
        payload_hash,
        consent_hash,
        time_ms,
    }
}

/// Every vector, computed by the implementation from the document's inputs, in document order.
fn computed() -> Vec<(&'static str, Vec<u8>)> {
    let alice = Identity::from_secrets(run(0x00), run(0x20));
    let bob = Identity::from_secrets(run(0x40), run(0x60));
    let ekm = run(0xa0);
    let mut v: Vec<(&'static str, Vec<u8>)> = vec![
        ("alice_identity_key", alice.identity_key().to_vec()),
        ("alice_sealing_key", alice.sealing_key().to_vec()),
        ("bob_identity_key", bob.identity_key().to_vec()),
        ("bob_sealing_key", bob.sealing_key().to_vec()),
        ("alice_account_id", alice.account_id().as_bytes().to_vec()),
        ("bob_account_id", bob.account_id().as_bytes().to_vec()),
    ];

    // Authentication.
    let device = DeviceInfo { model: "Pixel 10".into(), os: "Android 16".into(), app_version: "1.4.2".into() };
    let register = register_transcript(&ekm, &alice.identity_key(), &alice.sealing_key(), ALICE_PHONE, &device);
    let register_signature = alice.sign(&register);
    v.push(("register_transcript", register));
    v.push(("register_signature", register_signature.to_vec()));
    let auth = auth_transcript(&ekm, &alice.account_id());
    let auth_signature = alice.sign(&auth);
    v.push(("auth_transcript", auth));
    v.push(("auth_signature", auth_signature.to_vec()));
    let delete = relay_proto::auth::delete_transcript(&ekm, &alice.account_id());
    let delete_signature = alice.sign(&delete);
    v.push(("delete_transcript", delete));
    v.push(("delete_signature", delete_signature.to_vec()));
    let frame = ClientFrame {
        body: Some(client_frame::Body::Auth(Auth {
            protocol_version: PROTOCOL_VERSION,
            account_id: Bytes::copy_from_slice(alice.account_id().as_bytes()),
            signature: Bytes::copy_from_slice(&auth_signature),
        })),
    };
    v.push(("auth_frame", relay_proto::frame::encode(&frame).expect("small frame").to_vec()));
    // A `Register` with every field set, so that the field numbers on the wire are pinned too.
    let frame = ClientFrame {
        body: Some(client_frame::Body::Register(Register {
            protocol_version: PROTOCOL_VERSION,
            identity_key: Bytes::copy_from_slice(&alice.identity_key()),
            sealing_key: Bytes::copy_from_slice(&alice.sealing_key()),
            phone: ALICE_PHONE.into(),
            device: Some(device.clone()),
            signature: Bytes::copy_from_slice(&register_signature),
            code: "042042".into(),
            registration_lock_pin: "2468".into(),
            sealing_key_signature: Bytes::copy_from_slice(&alice.sealing_key_signature()),
        })),
    };
    v.push(("register_frame", relay_proto::frame::encode(&frame).expect("small frame").to_vec()));

    // Sender certificate, then sealed sender.
    let phone = |p| PhoneNumber::parse(p).expect("valid phone");
    let relay_key = SigningKey::from_bytes(&run(0xd0));
    v.push(("sender_certificate_key", relay_key.verifying_key().to_bytes().to_vec()));
    let certificate =
        SenderCertificate::new(alice.identity_key(), alice.sealing_key(), phone(ALICE_PHONE), CERTIFICATE_EXPIRES_MS)
            .sign(&relay_key);
    v.push(("sender_certificate", certificate.certificate.clone()));
    v.push(("sender_certificate_signed_bytes", certificate_signed_bytes(&certificate.certificate)));
    v.push(("sender_certificate_signature", certificate.signature.to_vec()));
    let content =
        SealedContent::sign(&alice, &certificate, &bob.account_id(), &bob.sealing_key(), SEALED_PAYLOAD.to_vec());
    v.push(("sealed_message", content.message.clone()));
    v.push(("sealed_signature_input", signature_input(&alice.identity_key(), &content.message)));
    v.push(("sealed_signature", content.signature.clone()));
    let plaintext = content.encode_to_vec();
    let envelope = seal_for_test_vector(run(0xc0), &bob.sealing_key(), &plaintext).expect("contributory keys");
    v.push(("sealed_plaintext", plaintext));
    v.push(("sealed_envelope", envelope));

    // Prekeys and the PQXDH identity binding.
    let spk = x25519_public(run(0x80));
    v.push(("signed_prekey_public", spk.to_vec()));
    let spk_input = prekey_signed_bytes(KIND_SIGNED, 1, &spk);
    let spk_signature = alice.sign(&spk_input);
    v.push(("signed_prekey_signature_input", spk_input));
    v.push(("signed_prekey_signature", spk_signature.to_vec()));
    let binding = identity_binding(&alice.identity_key(), &alice.sealing_key());
    let binding_signature = alice.sign(&binding);
    v.push(("identity_binding", binding));
    v.push(("identity_binding_signature", binding_signature.to_vec()));

    // Safety numbers, as their ASCII digits: Signal's published vector through the same construction, then ours.
    let signal = |key: &str, id: &[u8]| fingerprint(5200, id, &hex::decode(key).expect("hex"));
    let signal_a = signal("0506863bc66d02b40d27b8d49ca7c09e9239236f9d7d25d6fcca5ce13c7064d868", b"+14152222222");
    let signal_b = signal("05f781b6fb32fed9ba1cf2de978d4d5da28dc34046ae814402b5c0dbd96fda907b", b"+14153333333");
    let signal_number = if signal_a <= signal_b { signal_a + &signal_b } else { signal_b + &signal_a };
    v.push(("safety_number_signal_vector", signal_number.into_bytes()));
    let (alice_phone, bob_phone) = (phone(ALICE_PHONE), phone(BOB_PHONE));
    let (ai, asl, bi, bsl) = (alice.identity_key(), alice.sealing_key(), bob.identity_key(), bob.sealing_key());
    let alice_party = Party { phone: &alice_phone, identity_key: &ai, sealing_key: &asl };
    let bob_party = Party { phone: &bob_phone, identity_key: &bi, sealing_key: &bsl };
    v.push(("safety_number_key_alice", alice_party.key_bytes().to_vec()));
    let alice_half = fingerprint(5200, ALICE_PHONE.as_bytes(), &alice_party.key_bytes());
    let bob_half = fingerprint(5200, BOB_PHONE.as_bytes(), &bob_party.key_bytes());
    v.push(("safety_number_half_alice", alice_half.into_bytes()));
    v.push(("safety_number_half_bob", bob_half.into_bytes()));
    let safety = SafetyNumber::new(&alice_party, &bob_party);
    v.push(("safety_number", safety.digits().as_bytes().to_vec()));

    // Consent: one notice (AdsCo's for advertising, version 1), then one statement under it.
    let notice = relay_proto::notice::Notice {
        version: 1,
        affiliate: "adsco".into(),
        legal_name: "AdsCo SAS".into(),
        country: "FR".into(),
        purpose: Purpose::Advertising,
        fields: vec![relay_proto::notice::Field::PhonePseudonym, relay_proto::notice::Field::DeviceModel],
        retention: relay_proto::notice::Retention::UntilWithdrawn,
    };
    let document = notice.encode().expect("a valid notice");
    // A text block holds lines; the document is those lines, each ended by a line feed.
    let lines = document.strip_suffix(b"\n").expect("a notice ends with a line feed").to_vec();
    v.push(("notice_text_adsco_advertising", lines));
    let notice_hash = relay_proto::notice::notice_hash(&document);
    v.push(("notice_hash_adsco_advertising", notice_hash.to_vec()));
    let statement = ConsentStatement {
        account: alice.account_id(),
        affiliate: "adsco".into(),
        purpose: Purpose::Advertising,
        decision: Decision::Grant,
        notice_hash,
        sequence: 1,
        time_ms: 1_700_000_000_000,
        expires_ms: Some(1_707_776_000_000),
    }
    .encode();
    let consent_hash = statement_hash(&statement);
    let consent_signature = alice.sign(&signed_bytes_of(&statement));
    v.push(("consent_signed_bytes", signed_bytes_of(&statement)));
    v.push(("consent_statement", statement));
    v.push(("consent_signature", consent_signature.to_vec()));
    v.push(("consent_statement_hash", consent_hash.to_vec()));

    // Export log.
    let leaves = [
        leaf(
            (LeafKind::Export, 0x10),
            "adsco",
            "advertising",
            &["phone_pseudonym", "device_model"],
            ([0x11; 32], consent_hash, Some(notice_hash)),
            1_700_000_050_000,
        ),
        leaf(
            (LeafKind::Export, 0x20),
            "shieldco",
            "security",
            &["phone"],
            ([0x33; 32], [0x44; 32], Some([0x77; 32])),
            1_700_000_060_000,
        ),
        leaf(
            (LeafKind::WithdrawalNotice, 0x30),
            "adsco",
            "analytics",
            &[],
            ([0x55; 32], [0x66; 32], Some([0; 32])),
            1_700_000_070_000,
        ),
    ];
    // A leaf as written before version 2, which still decodes (and keeps its bytes).
    let v1 = leaf(
        (LeafKind::Export, 0x10),
        "adsco",
        "advertising",
        &["phone_pseudonym", "device_model"],
        ([0x11; 32], consent_hash, None),
        1_700_000_050_000,
    );
    let v1 = v1.encode().expect("within limits");
    assert_eq!(ExportLeaf::decode(&v1).and_then(|l| l.encode()), Ok(v1.clone()));
    let encoded: Vec<Vec<u8>> = leaves.iter().map(|l| l.encode().expect("within limits")).collect();
    let hashes: Vec<[u8; 32]> = encoded.iter().map(|l| leaf_hash(l)).collect();
    let mut log = MerkleLog::new();
    for l in &encoded {
        log.append(l);
    }
    v.push(("export_leaf_0", encoded[0].clone()));
    v.push(("leaf_hash_0", hashes[0].to_vec()));
    v.push(("export_leaf_1", encoded[1].clone()));
    v.push(("leaf_hash_1", hashes[1].to_vec()));
    v.push(("export_leaf_2", encoded[2].clone()));
    v.push(("leaf_hash_2", hashes[2].to_vec()));
    v.push(("export_leaf_v1", v1));
    v.push(("node_hash_01", node_hash(&hashes[0], &hashes[1]).to_vec()));
    v.push(("tree_root_3", log.root().to_vec()));
    v.push(("inclusion_proof_1_of_3", log.inclusion_proof(1, 3).expect("in range").concat()));
    v.push(("consistency_proof_1_to_3", log.consistency_proof(1, 3).expect("in range").concat()));
    let log_key = SigningKey::from_bytes(&run(0xe0));
    v.push(("log_key", log_key.verifying_key().to_bytes().to_vec()));
    let head = TreeHead { size: 3, root: log.root(), timestamp_ms: 1_700_000_100_000 };
    v.push(("tree_head_signed_bytes", head.encode().to_vec()));
    v.push(("tree_head_signature", head.sign(&log_key).signature.to_vec()));
    let witness = SigningKey::from_bytes(&run(0xf0));
    v.push(("witness_key", witness.verifying_key().to_bytes().to_vec()));
    v.push(("log_key_id", relay_proto::witness::log_key_id(&log_key.verifying_key()).to_vec()));
    let cosigned_at = 1_700_000_200_000;
    let message = relay_proto::witness::cosigned_message(&log_key.verifying_key(), 3, &log.root(), cosigned_at);
    v.push(("cosigned_bytes", message.to_vec()));
    let cosignature = relay_proto::witness::Cosignature::sign(&witness, &log_key.verifying_key(), &head, cosigned_at);
    v.push(("cosignature", cosignature.signature.to_vec()));
    v
}

/// The `vector:` blocks of a document, by name; an error for a duplicate name or bad hex.
fn documented(doc: &str) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let mut out = BTreeMap::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        if !line.trim_start().starts_with("```") {
            continue;
        }
        // An opening fence: a vector block if its first line names one; skip to the closing fence either way.
        let mut body = lines.by_ref().take_while(|l| !l.trim_start().starts_with("```"));
        let first = body.next().map(str::trim).unwrap_or("");
        let (name, bytes) = if let Some(name) = first.strip_prefix("vector:").map(str::trim) {
            let hex_text: String =
                body.map(|l| l.split('#').next().unwrap_or("")).flat_map(|l| l.split_whitespace()).collect();
            (name, hex::decode(&hex_text).map_err(|e| format!("vector {name}: {e}"))?)
        } else if let Some(name) = first.strip_prefix("text:").map(str::trim) {
            // Exact text: the lines as they are, joined by line feeds.
            (name, body.collect::<Vec<_>>().join("\n").into_bytes())
        } else {
            body.for_each(drop);
            continue;
        };
        if out.insert(name.to_owned(), bytes).is_some() {
            return Err(format!("vector {name} appears twice"));
        }
    }
    Ok(out)
}

/// What is wrong between the document's vectors and the computed ones (empty if nothing).
fn disagreements(doc: &BTreeMap<String, Vec<u8>>, code: &[(&'static str, Vec<u8>)]) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, bytes) in code {
        match doc.get(*name) {
            None => problems.push(format!("{name}: missing from the document; the code computes\n{}", wrap(bytes))),
            Some(d) if d != bytes => problems.push(format!(
                "{name}: the document and the code disagree\n  document: {}\n  code:     {}",
                hex::encode(d),
                hex::encode(bytes)
            )),
            Some(_) => {}
        }
    }
    for name in doc.keys() {
        if !code.iter().any(|(n, _)| n == name) {
            problems.push(format!("{name}: in the document, but no code computes it"));
        }
    }
    problems
}

fn wrap(bytes: &[u8]) -> String {
    bytes.chunks(32).map(hex::encode).collect::<Vec<_>>().join("\n")
}

#[test]
fn every_vector_in_the_protocol_document_matches_the_code() {
    let code = computed();
    if std::env::var_os("PROTOCOL_VECTORS_PRINT").is_some() {
        for (name, bytes) in &code {
            match std::str::from_utf8(bytes) {
                Ok(text) if name.contains("_text_") => println!("```text\ntext: {name}\n{text}\n```\n"),
                _ => println!("```text\nvector: {name}\n{}\n```\n", wrap(bytes)),
            }
        }
    }
    let text = std::fs::read_to_string(DOC).unwrap_or_else(|e| panic!("{DOC}: {e}"));
    let doc = documented(&text).unwrap_or_else(|e| panic!("{DOC}: {e}"));
    let problems = disagreements(&doc, &code);
    assert!(problems.is_empty(), "{DOC} is out of date with the code:\n{}", problems.join("\n"));
}

/// The checker itself: one changed hex digit, a comment or a dropped block must be noticed.
#[test]
fn the_vector_checker_notices_a_changed_digit() {
    let code = vec![("a", vec![0xab, 0xcd]), ("b", vec![0x01])];
    let doc =
        "text\n```text\nvector: a\nab # first byte\n  cd\n```\n```rust\nlet x = 1;\n```\n```\nvector: b\n01\n```\n";
    assert_eq!(disagreements(&documented(doc).expect("parses"), &code), Vec::<String>::new());
    let changed = doc.replace("  cd", "  ce");
    assert_eq!(disagreements(&documented(&changed).expect("parses"), &code).len(), 1);
    let dropped = doc.replace("vector: b", "not a vector");
    assert_eq!(disagreements(&documented(&dropped).expect("parses"), &code).len(), 1);
    assert!(documented(&doc.replace("01\n```", "0g\n```")).is_err(), "bad hex is an error");
    assert!(documented(&format!("{doc}{doc}")).is_err(), "a duplicate is an error");
    let text = documented("```\ntext: t\nexact  text # not a comment\n```\n").expect("parses");
    assert_eq!(text.get("t").map(Vec::as_slice), Some(&b"exact  text # not a comment"[..]));
}

/// Drives a QUIC-TLS handshake between two rustls configurations in memory; returns the negotiated suite, the ALPN
/// and both sides' exported keying material under the authentication label.
fn handshake(
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
) -> (CipherSuite, Vec<u8>, [u8; 32], [u8; 32]) {
    let name = ServerName::try_from("consent-relay".to_owned()).expect("valid name");
    let mut c = rustls::quic::ClientConnection::new(client, rustls::quic::Version::V1, name, Vec::new())
        .expect("client config is QUIC-ready");
    let mut s = rustls::quic::ServerConnection::new(server, rustls::quic::Version::V1, Vec::new())
        .expect("server config is QUIC-ready");
    // One flight segment at a time: bytes written before a key change belong to the old epoch and must be read
    // before the bytes after it.
    fn segment(write: impl FnMut(&mut Vec<u8>) -> Option<rustls::quic::KeyChange>) -> Vec<u8> {
        let mut write = write;
        let mut buf = Vec::new();
        loop {
            let before = buf.len();
            if write(&mut buf).is_some() || buf.len() == before {
                return buf;
            }
        }
    }
    for _ in 0..16 {
        let to_server = segment(|b| c.write_hs(b));
        if !to_server.is_empty() {
            s.read_hs(&to_server).expect("server accepts the client's flight");
        }
        let to_client = segment(|b| s.write_hs(b));
        if !to_client.is_empty() {
            c.read_hs(&to_client).expect("client accepts the server's flight");
        }
        if !c.is_handshaking() && !s.is_handshaking() {
            break;
        }
    }
    assert!(!c.is_handshaking() && !s.is_handshaking(), "handshake did not complete");
    let suite = s.negotiated_cipher_suite().expect("negotiated").suite();
    assert_eq!(c.negotiated_cipher_suite().map(|x| x.suite()), Some(suite));
    let alpn = s.alpn_protocol().expect("ALPN agreed").to_vec();
    // As quinn asks for it: an empty context (which TLS 1.3 treats exactly as no context).
    let ekm = |conn: rustls::quic::Connection| {
        conn.export_keying_material([0u8; 32], EKM_LABEL, Some(b"")).expect("exporter")
    };
    let (ekm_c, ekm_s) = (ekm(rustls::quic::Connection::Client(c)), ekm(rustls::quic::Connection::Server(s)));
    (suite, alpn, ekm_c, ekm_s)
}

#[test]
fn the_relay_and_the_client_negotiate_what_the_document_says() {
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = relay_quic::identity::Identity::load_or_create(dir.path()).expect("TLS identity");
    let server = Arc::new(identity.server_tls().expect("server config"));
    let client = relay_client::connection::tls_config(identity.cert_sha256()).expect("client config");
    let (suite, alpn, ekm_c, ekm_s) = handshake(Arc::new(client), server.clone());
    assert_eq!(suite, CipherSuite::TLS13_AES_256_GCM_SHA384, "so the exporter hashes with SHA-384");
    assert_eq!(alpn, relay_proto::ALPN);
    assert_eq!(ekm_c, ekm_s, "both sides derive the same keying material");

    // The relay follows the client's order: a client that prefers AES-128-GCM gets it, and SHA-256 with it.
    let mut provider = (*relay_quic::crypto_provider()).clone();
    provider.cipher_suites.sort_by_key(|s| s.suite() != CipherSuite::TLS13_AES_128_GCM_SHA256);
    let provider = Arc::new(provider);
    let pin = relay_quic::pin::PinnedServerCert::new(identity.cert_sha256(), provider.clone());
    let mut other = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(pin))
        .with_no_client_auth();
    other.alpn_protocols = vec![relay_proto::ALPN.to_vec()];
    let (suite, _, ekm_c, ekm_s) = handshake(Arc::new(other), server);
    assert_eq!(suite, CipherSuite::TLS13_AES_128_GCM_SHA256);
    assert_eq!(ekm_c, ekm_s);
}
