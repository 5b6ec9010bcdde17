//! `online --e2ee`: the client-side cost of end-to-end encryption on the load path.
//!
//! Every sender gets real Double Ratchet sessions with [`PEERS`] recipients (its next clients in index order), set
//! up in memory with real PQXDH (each recipient's prekey store, one-time keys included) before the clock starts:
//! set-up cost is measured by the criterion benchmark, not here. Each message is then handled as the messenger does
//! it: the stamped payload is ratchet-encrypted, wrapped in the signed sealed-sender envelope, sent; the recipient
//! opens the envelope, checks the sender certificate and the signature, and ratchet-decrypts before reading the
//! stamp. The certificates are issued in memory by a key of the run's own (what they cost to check is the same as
//! under the relay's key). Nothing touches disk.

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::{Result, anyhow};
use bytes::Bytes;
use relay_client::Identity;
use relay_client::e2ee::message::E2eeMessage;
use relay_client::e2ee::pqxdh;
use relay_client::e2ee::prekeys::PrekeyStore;
use relay_client::e2ee::ratchet::RatchetState;
use relay_client::sealed::{open_message, seal_message};
use relay_proto::identity::{CERTIFICATE_VALIDITY_MS, SenderCertificate, SignedCertificate, SigningKey, VerifyingKey};
use relay_proto::{AccountId, PhoneNumber};

/// Recipients each client holds a session with.
pub const PEERS: usize = 8;

struct Half {
    ratchet: RatchetState,
    ad: Vec<u8>,
}

/// The sessions of every (sender, recipient) pair of a run.
pub struct Pairs {
    identities: Vec<Identity>,
    certificates: Vec<SignedCertificate>,
    issuer: VerifyingKey,
    by_key: HashMap<[u8; 32], usize>,
    sending: HashMap<(usize, usize), Mutex<Half>>,
    receiving: HashMap<(usize, usize), Mutex<Half>>,
    peers: usize,
}

fn lock(m: &Mutex<Half>) -> std::sync::MutexGuard<'_, Half> {
    // A poisoned lock means a panic mid-operation elsewhere; the ratchet stages its changes, so the state is usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pairs {
    /// Sets up the sessions of every client with its next [`PEERS`] clients.
    pub fn establish(identities: Vec<Identity>) -> Result<Self> {
        let n = identities.len();
        let peers = PEERS.min(n.saturating_sub(1)).max(1);
        let mut stores: Vec<PrekeyStore> = identities
            .iter()
            .map(|id| {
                let mut s = PrekeyStore::generate(id);
                s.generate_one_time(peers);
                s.generate_kem(id, peers);
                s
            })
            .collect();
        let (mut sending, mut receiving) = (HashMap::new(), HashMap::new());
        for from in 0..n {
            for k in 1..=peers {
                let to = (from + k) % n;
                let bundle = stores[to].bundle(&identities[to]);
                let (header, alice_secret, ad) = pqxdh::initiate(&identities[from], &bundle)?;
                let (bob_secret, bob_ad) = pqxdh::respond(&identities[to], &mut stores[to], &header)?;
                let alice = RatchetState::init_initiator(&alice_secret, &bundle.signed_prekey.public)?;
                let bob = RatchetState::init_responder(
                    &bob_secret,
                    &stores[to].signed_prekey_secret(header.signed_prekey_id)?,
                );
                sending.insert((from, to), Mutex::new(Half { ratchet: alice, ad }));
                receiving.insert((from, to), Mutex::new(Half { ratchet: bob, ad: bob_ad }));
            }
        }
        let by_key = identities.iter().enumerate().map(|(i, id)| (id.identity_key(), i)).collect();
        let issuer = SigningKey::from_bytes(&rand::random());
        let expires_ms = relay_proto::now_ms() + CERTIFICATE_VALIDITY_MS;
        let certificates = identities
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let phone = PhoneNumber::parse(&format!("+3360{i:07}"))?;
                Ok(SenderCertificate::new(id.identity_key(), id.sealing_key(), phone, expires_ms).sign(&issuer))
            })
            .collect::<Result<_>>()?;
        Ok(Self { identities, certificates, issuer: issuer.verifying_key(), by_key, sending, receiving, peers })
    }

    /// The recipient of `me`'s message, from a random `pick`.
    pub fn recipient(&self, me: usize, pick: usize) -> usize {
        (me + 1 + pick % self.peers) % self.identities.len()
    }

    /// Encrypts `body` from `from` to `to` as the messenger would.
    pub fn seal(&self, from: usize, to: usize, body: &[u8]) -> Result<Bytes> {
        let half = self.sending.get(&(from, to)).ok_or_else(|| anyhow!("no session {from}->{to}"))?;
        let message = {
            let mut h = lock(half);
            let Half { ratchet, ad } = &mut *h;
            ratchet.encrypt(body, ad)?
        };
        let payload = E2eeMessage::Ratchet(message).encode();
        let recipient = &self.identities[to];
        let envelope = seal_message(
            &self.identities[from],
            &self.certificates[from],
            &AccountId::from_identity_key(&recipient.identity_key()),
            &recipient.sealing_key(),
            payload,
        )?;
        Ok(Bytes::from(envelope))
    }

    /// Opens an envelope delivered to `me`, returning the stamped payload.
    pub fn open(&self, me: usize, envelope: &[u8]) -> Result<Vec<u8>> {
        let sealed = open_message(&self.identities[me], envelope, &self.issuer, relay_proto::now_ms())?;
        let from = *self.by_key.get(&sealed.sender_identity_key()).ok_or_else(|| anyhow!("unknown sender"))?;
        let E2eeMessage::Ratchet(message) = E2eeMessage::decode(&sealed.payload)? else {
            return Err(anyhow!("unexpected session set-up message"));
        };
        let half = self.receiving.get(&(from, me)).ok_or_else(|| anyhow!("no session {from}->{me}"))?;
        let mut h = lock(half);
        let Half { ratchet, ad } = &mut *h;
        Ok(ratchet.decrypt(&message, ad)?)
    }
}
