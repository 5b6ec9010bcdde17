//! The witness (`relay_witness::Witness::handle`) answering arbitrary bytes taken as a `WitnessRequest` body.
//!
//! Checks: nothing panics; an answer is a cosignature only for an `AddCheckpoint` whose head is signed by the
//! witnessed log's key (which the fuzzer does not hold, so never), and any cosignature returned verifies under the
//! witness's key for exactly that head; a refusal is an error frame or a conflict carrying the witness's size (0).
//! The witness runs on a data dir made once per process under the system's temporary directory.
#![no_main]

use std::sync::OnceLock;

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use relay_proto::merkle::SignedTreeHead;
use relay_proto::wire::{WitnessRequest, witness_request, witness_response};
use relay_proto::witness::Cosignature;
use relay_witness::Witness;

fn log_key() -> SigningKey {
    SigningKey::from_bytes(&[0xe0; 32])
}

fn witness() -> &'static Witness {
    static WITNESS: OnceLock<Witness> = OnceLock::new();
    WITNESS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("relay-fuzz-witness-{}", std::process::id()));
        Witness::open(&dir, &[log_key().verifying_key()]).expect("a witness on a temporary data dir")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(request) = WitnessRequest::decode(data) else { return };
    let w = witness();
    let reply = w.handle(request.body.clone(), 1);
    match reply.body {
        Some(witness_response::Body::Cosignature(c)) => {
            let Some(witness_request::Body::AddCheckpoint(add)) = &request.body else {
                panic!("a cosignature answering something else than AddCheckpoint");
            };
            let head = add.head.as_ref().map(SignedTreeHead::try_from);
            let Some(Ok(head)) = head else { panic!("a cosignature for a head that does not parse") };
            head.verify(&log_key().verifying_key()).expect("cosigned a head the log key did not sign");
            let c = Cosignature::try_from(&c).expect("a well-formed cosignature");
            c.verify(&w.public_key(), &log_key().verifying_key(), &head.head).expect("the cosignature verifies");
        }
        Some(witness_response::Body::Conflict(c)) => assert_eq!(c.size, 0, "the witness never cosigned"),
        Some(witness_response::Body::Witnessed(h)) => assert_eq!(h.size, 0, "the witness never cosigned"),
        Some(witness_response::Body::Error(_)) => {}
        None => panic!("an empty answer"),
    }
});
