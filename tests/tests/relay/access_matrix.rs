//! The access-control matrix: every operation of the wire protocol and of the export interface, tried with no
//! identity, with the wrong identity, with an authentication replayed from another connection and with a replayed
//! consent statement. The classification matches on every request variant without a wildcard, so a new operation
//! does not compile until it has a row here.

use bytes::Bytes;
use relay_client::{Connection, Identity, InboxEvent};
use relay_proto::auth::{auth_transcript, delete_transcript, register_transcript};
use relay_proto::consent::{ConsentStatement, Decision, Purpose};
use relay_proto::wire::{
    Ack, Auth, ConsentChanges, ConsentHistory, DeleteAccount, EndExport, ErasureChanges, ExportRequest, FetchBundle,
    GetNotice, GetSenderCertificate, ListConsent, ListExports, Lookup, PublishLog, PublishNotices, PutConsent,
    Register, RequestCode, SealedSend, Send, ServerFrame, SetAccessKey, SetRegistrationLock, SubjectChanges, Subscribe,
    UploadPrekeys, client_frame::Body, export_request::Body as ExportBody, server_frame::Body as Resp,
};
use relay_proto::{AccountId, ErrorCode, MAX_FRAME_LEN, PROTOCOL_VERSION};
use relay_tests::TestRelay;
use relay_tests::export::ExporterIdentity;

use crate::bounded;

const BOB: &str = "+33698765432";

fn fp(relay: &TestRelay) -> [u8; 32] {
    relay_client::pin::parse_fingerprint(relay.fingerprint()).expect("fingerprint")
}

fn ekm_of(conn: &Connection) -> [u8; 32] {
    relay_quic::ekm(conn.quic()).expect("keying material")
}

fn register_frame(conn: &Connection, identity: &Identity, signer: &Identity, phone: &str) -> Body {
    let (ik, sk) = (identity.identity_key(), identity.sealing_key());
    let device = Default::default();
    let signature = signer.sign(&register_transcript(&ekm_of(conn), &ik, &sk, phone, &device));
    Body::Register(Register {
        protocol_version: PROTOCOL_VERSION,
        identity_key: Bytes::copy_from_slice(&ik),
        sealing_key: Bytes::copy_from_slice(&sk),
        phone: phone.into(),
        device: Some(device),
        signature: Bytes::copy_from_slice(&signature),
        sealing_key_signature: Bytes::copy_from_slice(&signer.sign(&relay_proto::identity::binding_bytes(&ik, &sk))),
        ..Default::default()
    })
}

fn auth_frame(conn: &Connection, account: AccountId, signer: &Identity) -> Body {
    Body::Auth(Auth {
        protocol_version: PROTOCOL_VERSION,
        account_id: Bytes::copy_from_slice(account.as_bytes()),
        signature: Bytes::copy_from_slice(&signer.sign(&auth_transcript(&ekm_of(conn), &account))),
    })
}

/// The hash of the test catalogue's notice for adsco's advertising.
fn adsco_advertising_notice() -> [u8; 32] {
    let catalogue = relay_exporter::Catalogue::parse(&relay_tests::test_catalogue()).expect("catalogue");
    catalogue.notice("adsco", Purpose::Advertising).expect("a notice").hash
}

fn statement(account: AccountId, sequence: u64) -> ConsentStatement {
    ConsentStatement {
        account,
        affiliate: "adsco".into(),
        purpose: Purpose::Advertising,
        decision: Decision::Grant,
        notice_hash: adsco_advertising_notice(),
        sequence,
        time_ms: relay_proto::now_ms(),
        expires_ms: None,
    }
}

fn put_consent(s: &ConsentStatement, signer: &Identity) -> Body {
    Body::PutConsent(PutConsent {
        statement: s.encode().into(),
        signature: Bytes::copy_from_slice(&signer.sign(&s.signed_bytes())),
    })
}

/// What the relay must answer when `conn` (authenticated as `caller`, or not at all) aims `op` at Bob.
#[derive(Debug)]
enum Expect {
    /// Refused with this code.
    Refused(ErrorCode),
    /// Answered, but only about the caller (checked by the caller of `matrix_row`).
    OwnOnly,
    /// Allowed to anyone authenticated by design (the directory and prekeys are how strangers start a chat).
    Public,
}

/// One request per operation, aimed at Bob wherever the operation names an account, signed by `signer`.
fn operations(conn: &Connection, bob: &Identity, signer: &Identity, bob_server_id: u64) -> Vec<Body> {
    let b = bob.account_id();
    vec![
        register_frame(conn, bob, signer, BOB),
        auth_frame(conn, b, signer),
        Body::Lookup(Lookup { phone: BOB.into() }),
        Body::Send(Send { recipient: b.as_bytes().to_vec().into(), envelope: Bytes::from_static(b"x") }),
        Body::Subscribe(Subscribe {}),
        Body::Ack(Ack { server_ids: vec![bob_server_id] }),
        Body::UploadPrekeys(UploadPrekeys::default()),
        Body::FetchBundle(FetchBundle { account_id: b.as_bytes().to_vec().into() }),
        Body::SetAccessKey(SetAccessKey { verifier: vec![0; 32].into() }),
        Body::SealedSend(SealedSend {
            recipient: b.as_bytes().to_vec().into(),
            envelope: Bytes::from_static(b"x"),
            access_key: vec![0; 16].into(),
        }),
        put_consent(&statement(b, 99), signer),
        Body::ListConsent(ListConsent {}),
        Body::ListExports(ListExports::default()),
        Body::GetSenderCertificate(GetSenderCertificate {}),
        Body::RequestCode(RequestCode { phone: BOB.into() }),
        Body::SetRegistrationLock(SetRegistrationLock { pin: "2468".into() }),
        Body::GetNotice(GetNotice { affiliate: "adsco".into(), purpose: "advertising".into(), hash: Bytes::new() }),
        Body::ConsentHistory(ConsentHistory { after_sequence: 0 }),
        // An erasure of Bob's account, signed by `signer` for this connection.
        Body::DeleteAccount(DeleteAccount {
            signature: Bytes::copy_from_slice(&signer.sign(&delete_transcript(&ekm_of(conn), &b))),
        }),
    ]
}

/// The expected outcome of `op` on a connection with no identity (`authenticated` false) or authenticated as
/// someone other than Bob.
fn expect(op: &Body, authenticated: bool) -> Expect {
    use Expect::*;
    match op {
        Body::Register(_) | Body::Auth(_) => Refused(ErrorCode::BadSignature),
        Body::SealedSend(_) => Refused(ErrorCode::BadAccessKey),
        // This relay is open (first come): there are no codes to ask for. On a verifying relay anyone may make
        // the relay text a code to any number (that is how a number is proven), rate-limited per number and address;
        // the verification tests cover it.
        Body::RequestCode(_) => Refused(ErrorCode::InvalidRequest),
        // Only inside a pipelined send stream, where each is checked as the Send or SealedSend it carries
        // (pipeline.rs); `OpenSendStream` itself has no answer and is not a row of this matrix.
        Body::PipelinedSend(_) | Body::OpenSendStream(_) => Refused(ErrorCode::InvalidRequest),
        _ if !authenticated => Refused(ErrorCode::Unauthenticated),
        Body::PutConsent(_) => Refused(ErrorCode::ConsentRejected),
        // Only ever the caller's own account, and only with its own key's signature over this connection's transcript.
        Body::DeleteAccount(_) => Refused(ErrorCode::BadSignature),
        // Notices are the same for everyone: what any user is shown before granting.
        Body::Lookup(_) | Body::FetchBundle(_) | Body::Send(_) | Body::GetNotice(_) => Public,
        Body::Subscribe(_)
        | Body::Ack(_)
        | Body::UploadPrekeys(_)
        | Body::SetAccessKey(_)
        | Body::ListConsent(_)
        | Body::ConsentHistory(_)
        | Body::ListExports(_)
        | Body::SetRegistrationLock(_)
        | Body::GetSenderCertificate(_) => OwnOnly,
    }
}

async fn check(conn: &Connection, op: Body, expected: &Expect) {
    let name = format!("{op:?}").split('(').next().unwrap_or_default().to_owned();
    let reply = bounded(&name, conn.request(op)).await;
    match (expected, reply) {
        (Expect::Refused(code), Err(e)) => assert_eq!(e.code(), Some(*code), "{name}: {e}"),
        (Expect::Refused(code), Ok(r)) => panic!("{name} should be refused with {code:?}, got {r:?}"),
        (Expect::OwnOnly, Ok(Resp::Acked(a))) => assert_eq!(a.removed, 0, "{name} removed another's envelope"),
        (Expect::OwnOnly, Ok(Resp::ConsentList(l))) => assert!(l.latest.is_empty(), "{name} shows Bob's consent"),
        (Expect::OwnOnly, Ok(Resp::ConsentHistoryPage(p))) => {
            assert!(p.statements.is_empty(), "{name} shows Bob's consent history")
        }
        (Expect::OwnOnly, Ok(Resp::ExportList(l))) => assert!(l.entries.is_empty(), "{name} shows Bob's exports"),
        (Expect::OwnOnly, Ok(Resp::QueueEmpty(_))) => {}
        (Expect::OwnOnly, Ok(Resp::SenderCertificate(c))) => {
            let cert = relay_proto::identity::SenderCertificate::decode(&c.certificate).expect("a certificate");
            assert_ne!(cert.phone.as_str(), BOB, "{name} certified the caller as Bob");
        }
        (Expect::OwnOnly, Ok(Resp::Deliver(d))) => panic!("{name} delivered {:?} from another mailbox", d.envelope),
        (Expect::OwnOnly | Expect::Public, Ok(_)) => {}
        (Expect::OwnOnly | Expect::Public, Err(e)) => panic!("{name} should be answered, got {e}"),
    }
}

#[tokio::test]
async fn every_operation_is_refused_or_confined_without_the_right_identity() {
    let relay = TestRelay::in_process().await.expect("relay");
    let bob = relay.user(BOB).await.expect("bob");
    let bob_identity = bob.home.identity().expect("bob's keys");
    let (alice, _) = relay.raw_user("+33612345678").await.expect("alice");
    let queued = alice.send(&bob_identity.account_id(), Bytes::from_static(b"for bob")).await.expect("send");
    relay.publish_test_notices().await.expect("notices");
    bob.messenger.decide_consent("adsco", "advertising", Decision::Grant, None).await.expect("bob's grant");

    // No identity at all.
    let anonymous = Connection::connect(relay.addr(), fp(&relay)).await.expect("connect");
    let mallory = Identity::generate();
    for op in operations(&anonymous, &bob_identity, &mallory, queued.server_id) {
        let e = expect(&op, false);
        check(&anonymous, op, &e).await;
    }

    // The wrong identity: Mallory, authenticated as herself, aims every operation at Bob.
    let (mallory_conn, mallory) = relay.raw_user("+33655555555").await.expect("mallory");
    for op in operations(&mallory_conn, &bob_identity, &mallory, queued.server_id) {
        let e = expect(&op, true);
        check(&mallory_conn, op, &e).await;
    }

    // Bob's own authentication and registration, made for one connection, replayed on another.
    let first = Connection::connect(relay.addr(), fp(&relay)).await.expect("connect");
    let second = Connection::connect(relay.addr(), fp(&relay)).await.expect("connect");
    for replayed in [
        auth_frame(&first, bob_identity.account_id(), &bob_identity),
        register_frame(&first, &bob_identity, &bob_identity, BOB),
    ] {
        let err = second.request(replayed).await.expect_err("replayed on another connection");
        assert_eq!(err.code(), Some(ErrorCode::BadSignature), "{err}");
    }

    // Bob's recorded statement replayed: by Bob on a fresh connection, and by Mallory.
    let receipts: Vec<relay_client::consent::Receipt> = bob.home.load_private("receipts.json").expect("receipts");
    let recorded = ConsentStatement::decode_stored(&hex::decode(&receipts[0].statement).expect("hex")).expect("stmt");
    let signature: [u8; 64] = hex::decode(&receipts[0].signature).expect("hex").try_into().expect("64 bytes");
    second.request(auth_frame(&second, bob_identity.account_id(), &bob_identity)).await.expect("bob authenticates");
    for conn in [&second, &mallory_conn] {
        let err = conn.put_consent(recorded.encode(), signature).await.expect_err("replayed statement");
        assert_eq!(err.code(), Some(ErrorCode::ConsentRejected), "{err}");
    }

    // After all of it, Bob's mailbox and consent are exactly as they were.
    let mut inbox = bob.messenger.connection().subscribe().await.expect("subscribe");
    match bounded("delivery", inbox.next()).await.expect("open").expect("event") {
        InboxEvent::Deliver(d) => assert_eq!(d.envelope, Bytes::from_static(b"for bob")),
        other => panic!("Bob's envelope is gone: {other:?}"),
    }
    let state = bob.messenger.consent_state().await.expect("consent");
    assert_eq!(state.len(), 1);
    assert_eq!((state[0].sequence, state[0].status.as_str()), (1, "granted"));
}

/// Every request of the export protocol, for the export-interface rows.
fn export_operations(bob: AccountId) -> Vec<ExportBody> {
    let ops = vec![
        ExportBody::ConsentChanges(ConsentChanges { after_cursor: 0 }),
        ExportBody::BeginExport(relay_proto::wire::BeginExport {
            account_id: bob.as_bytes().to_vec().into(),
            affiliate: "adsco".into(),
            purpose: "advertising".into(),
            statement_hash: vec![0; 32].into(),
        }),
        ExportBody::EndExport(EndExport {
            account_id: bob.as_bytes().to_vec().into(),
            affiliate: "adsco".into(),
            purpose: "advertising".into(),
            lease_id: 1,
        }),
        ExportBody::SubjectChanges(SubjectChanges { after_cursor: 0 }),
        ExportBody::PublishLog(PublishLog::default()),
        ExportBody::ReadLog(relay_proto::wire::ReadLog { start_index: 0, max_entries: 256 }),
        ExportBody::PublishNotices(PublishNotices { documents: vec![] }),
        ExportBody::ErasureChanges(ErasureChanges { after_cursor: 0 }),
    ];
    // A new export operation must be added above (this match has no wildcard).
    for op in &ops {
        match op {
            ExportBody::ConsentChanges(_)
            | ExportBody::BeginExport(_)
            | ExportBody::EndExport(_)
            | ExportBody::SubjectChanges(_)
            | ExportBody::PublishLog(_)
            | ExportBody::ReadLog(_)
            | ExportBody::PublishNotices(_)
            | ExportBody::ErasureChanges(_) => {}
        }
    }
    ops
}

#[tokio::test]
async fn the_export_interface_admits_only_the_pinned_exporter_and_the_messaging_endpoint_none_of_its_operations() {
    let exporter = ExporterIdentity::generate().expect("exporter identity");
    let relay = TestRelay::with_export(&exporter).await.expect("relay");
    let bob = relay.user(BOB).await.expect("bob");
    let export_addr = relay.export_addr().expect("export interface");

    // No identity, and the wrong identity: every operation refused (the TLS 1.3 handshake may look complete to the
    // client before the relay has checked its certificate; nothing is served either way).
    let impostor = ExporterIdentity::generate().expect("impostor");
    for identity in [None, Some(&impostor)] {
        if let Ok(client) = relay.exporter(identity).await {
            for op in export_operations(bob.messenger.account_id()) {
                let name = format!("{op:?}");
                assert!(bounded("refusal", client.request(op)).await.is_err(), "{name} served without the pinned cert");
            }
        }
    }
    let messaging_client = Connection::connect(export_addr, fp(&relay)).await;
    if let Ok(c) = messaging_client {
        assert!(c.request(Body::ListConsent(ListConsent {})).await.is_err(), "a messaging client on the export port");
    }

    // The pinned exporter is served; on the messaging endpoint no export request is: each is refused (read as a
    // messaging frame, it does not decode or is not allowed there).
    let genuine = relay.exporter(Some(&exporter)).await.expect("pinned exporter");
    genuine.request(ExportBody::ConsentChanges(ConsentChanges { after_cursor: 0 })).await.expect("served");
    let conn = Connection::connect(relay.addr(), fp(&relay)).await.expect("messaging connection");
    for op in export_operations(bob.messenger.account_id()) {
        let (mut send, mut recv) = conn.quic().open_bi().await.expect("stream");
        relay_quic::write_frame(&mut send, &ExportRequest { body: Some(op.clone()) }).await.expect("write");
        send.finish().ok();
        let reply = bounded("answer", relay_quic::read_frame::<ServerFrame>(&mut recv, MAX_FRAME_LEN)).await;
        match reply {
            Ok(Some(ServerFrame { body: Some(Resp::Error(e)) })) => {
                tracing::debug!(?op, code = ?e.code(), "export request refused on the messaging endpoint");
            }
            other => panic!("{op:?} on the messaging endpoint must be refused, got {other:?}"),
        }
    }
}
