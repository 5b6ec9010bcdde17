//! `online --e2ee`: the client-side cost of end-to-end encryption on the load path, doing per message what the
//! messenger does.
//!
//! Every sender gets real Double Ratchet sessions with [`PEERS`] recipients (its next clients in index order), set
//! up in memory with real PQXDH (each recipient's prekey store, one-time keys included) before the clock starts:
//! set-up cost is measured by the criterion benchmark, not here. The certificates are issued in memory by a key of
//! the run's own (what they cost to check is the same as under the relay's key).
//!
//! Sending ([`Pairs::seal_batch`]) takes a batch of messages, as the messenger's `send_batch` does: each is
//! ratchet-encrypted; then the sending state of every session the batch touched is written, once, to the run's
//! state directory (a temporary directory: JSON, each file atomic and all flushed together, with
//! `relay_quic::durable_file::replace_all` as the messenger writes its session files), under those sessions' locks,
//! so no state older than a message sent can overwrite a newer one; only then is each message wrapped in the signed sealed-sender envelope and returned to be
//! sent. Concurrent sends of one sender go through its [`Outbox`], a group commit: what is handed over while a
//! batch is being written goes into the next batch. With `--e2ee-in-memory` the writes are skipped, to separate the CPU cost from the disk's; with
//! `--e2ee-state-dir` they go elsewhere (all simulated clients share one directory and one disk's flushes, where
//! real devices each have their own: on tmpfs the writes cost their CPU and no flush). A batch is what a
//! sender has to hand over at once: pipelined (the default), every free window slot; with `--stream-per-send`, what
//! its window workers (each one send at a time) queued in its [`Outbox`] meanwhile.
//!
//! Receiving ([`Pairs::open`]): the recipient opens the envelope, checks the sender certificate through its own
//! [`VerifiedCertificates`] (the relay's signature once per certificate, the expiry every time) and the sender's
//! signature (every time), and ratchet-decrypts before reading the stamp, as the messenger does; before it
//! acknowledges a batch of deliveries it writes the receiving state of each session the batch touched, once
//! ([`Pairs::persist_received`]), as the messenger flushes its sessions before acknowledging.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Result, anyhow};
use bytes::Bytes;
use relay_client::Identity;
use relay_client::e2ee::message::E2eeMessage;
use relay_client::e2ee::pqxdh;
use relay_client::e2ee::prekeys::PrekeyStore;
use relay_client::e2ee::ratchet::RatchetState;
use relay_client::sealed::{open_message_with, seal_message};
use relay_client::verified_certificates::VerifiedCertificates;
use relay_proto::identity::{CERTIFICATE_VALIDITY_MS, SenderCertificate, SignedCertificate, SigningKey};
use relay_proto::{AccountId, PhoneNumber};
use relay_quic::durable_file::{self, Access};
use serde::Serialize;

/// Where a run writes its session states.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateDir {
    /// A temporary directory in the system's temporary directory.
    SystemTemp,
    /// A temporary directory inside this one.
    In(PathBuf),
}

/// Where `--e2ee` writes session states: `None` with `--e2ee-in-memory`.
pub fn state_dir(load: &crate::Load) -> Option<StateDir> {
    match (&load.e2ee_state_dir, load.e2ee_in_memory) {
        (_, true) => None,
        (Some(dir), false) => Some(StateDir::In(dir.clone())),
        (None, false) => Some(StateDir::SystemTemp),
    }
}

/// Recipients each client holds a session with.
pub const PEERS: usize = 8;

#[derive(Serialize)]
struct Half {
    ratchet: RatchetState,
    #[serde(serialize_with = "as_hex")]
    ad: Vec<u8>,
}

fn as_hex<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(bytes))
}

/// The sessions of every (sender, recipient) pair of a run.
pub struct Pairs {
    identities: Vec<Identity>,
    certificates: Vec<SignedCertificate>,
    /// Each recipient's cache of the sender certificates it verified.
    verified: Vec<VerifiedCertificates>,
    by_key: HashMap<[u8; 32], usize>,
    sending: HashMap<(usize, usize), Mutex<Half>>,
    receiving: HashMap<(usize, usize), Mutex<Half>>,
    peers: usize,
    /// Where sending states are written before a batch leaves; `None` with `--e2ee-in-memory`.
    state_dir: Option<tempfile::TempDir>,
}

fn lock(m: &Mutex<Half>) -> std::sync::MutexGuard<'_, Half> {
    // A poisoned lock means a panic mid-operation elsewhere; the ratchet stages its changes, so the state is usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pairs {
    /// Sets up the sessions of every client with its next [`PEERS`] clients; session states are written to a new
    /// temporary directory in `state_dir` (see [`state_dir`]), or kept in memory if it is `None`.
    pub fn establish(identities: Vec<Identity>, state_dir: Option<StateDir>) -> Result<Self> {
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
        let verified = identities.iter().map(|_| VerifiedCertificates::new(issuer.verifying_key())).collect();
        let state_dir = match state_dir {
            None => None,
            Some(StateDir::SystemTemp) => Some(tempfile::tempdir()?),
            Some(StateDir::In(parent)) => Some(tempfile::tempdir_in(parent)?),
        };
        Ok(Self { identities, certificates, verified, by_key, sending, receiving, peers, state_dir })
    }

    /// The recipient of `me`'s message, from a random `pick`.
    pub fn recipient(&self, me: usize, pick: usize) -> usize {
        (me + 1 + pick % self.peers) % self.identities.len()
    }

    /// Encrypts a batch of `(recipient, body)` from `from` as the messenger's `send_batch` does (see the module
    /// header): ratchet, write each touched sending state once, then seal. Blocks on the disk: call it off the
    /// async workers.
    pub fn seal_batch(&self, from: usize, items: &[(usize, Vec<u8>)]) -> Result<Vec<Bytes>> {
        let mut payloads: Vec<Option<Vec<u8>>> = vec![None; items.len()];
        let mut peers: Vec<usize> = items.iter().map(|(to, _)| *to).collect();
        peers.sort_unstable();
        peers.dedup();
        // Locked in recipient order (so two batches of one sender cannot deadlock) and held until written, so a
        // state older than a message sent never overwrites a newer one.
        let mut held = Vec::with_capacity(peers.len());
        for &to in &peers {
            let half = self.sending.get(&(from, to)).ok_or_else(|| anyhow!("no session {from}->{to}"))?;
            held.push((to, lock(half)));
        }
        for (to, h) in held.iter_mut() {
            for (slot, (_, body)) in payloads.iter_mut().zip(items).filter(|(_, (t, _))| t == to) {
                let Half { ratchet, ad } = &mut **h;
                *slot = Some(E2eeMessage::Ratchet(ratchet.encrypt(body, ad)?).encode());
            }
        }
        if let Some(dir) = &self.state_dir {
            let files = held
                .iter()
                .map(|(to, h)| {
                    Ok((dir.path().join(format!("session-{from}-{to}.json")), serde_json::to_vec_pretty(&**h)?))
                })
                .collect::<Result<Vec<_>>>()?;
            write_all(&files)?;
        }
        drop(held);
        let sender = &self.identities[from];
        items
            .iter()
            .zip(payloads)
            .map(|((to, _), payload)| {
                let payload = payload.ok_or_else(|| anyhow!("message left unencrypted"))?;
                let recipient = &self.identities[*to];
                let envelope = seal_message(
                    sender,
                    &self.certificates[from],
                    &AccountId::from_identity_key(&recipient.identity_key()),
                    &recipient.sealing_key(),
                    payload,
                )?;
                Ok(Bytes::from(envelope))
            })
            .collect()
    }

    /// Opens an envelope delivered to `me`, returning its sender and the stamped payload.
    pub fn open(&self, me: usize, envelope: &[u8]) -> Result<(usize, Vec<u8>)> {
        let sealed = open_message_with(&self.identities[me], envelope, &self.verified[me], relay_proto::now_ms())?;
        let from = *self.by_key.get(&sealed.sender_identity_key()).ok_or_else(|| anyhow!("unknown sender"))?;
        let E2eeMessage::Ratchet(message) = E2eeMessage::decode(&sealed.payload)? else {
            return Err(anyhow!("unexpected session set-up message"));
        };
        let half = self.receiving.get(&(from, me)).ok_or_else(|| anyhow!("no session {from}->{me}"))?;
        let mut h = lock(half);
        let Half { ratchet, ad } = &mut *h;
        Ok((from, ratchet.decrypt(&message, ad)?))
    }

    /// Writes `me`'s receiving state of the session with each of `senders`, once each, as the messenger does before
    /// acknowledging a receive batch (nothing with `--e2ee-in-memory`). Blocks on the disk.
    pub fn persist_received(&self, me: usize, senders: &[usize]) -> Result<()> {
        let Some(dir) = &self.state_dir else { return Ok(()) };
        let mut senders = senders.to_vec();
        senders.sort_unstable();
        senders.dedup();
        let mut held = Vec::with_capacity(senders.len());
        for from in senders {
            let half = self.receiving.get(&(from, me)).ok_or_else(|| anyhow!("no session {from}->{me}"))?;
            held.push((from, lock(half)));
        }
        let files = held
            .iter()
            .map(|(from, h)| {
                Ok((dir.path().join(format!("received-{me}-{from}.json")), serde_json::to_vec_pretty(&**h)?))
            })
            .collect::<Result<Vec<_>>>()?;
        write_all(&files)
    }
}

/// The session files of one batch, written together as the messenger writes them (`durable_file::replace_all`).
fn write_all(files: &[(PathBuf, Vec<u8>)]) -> Result<()> {
    let refs: Vec<(&std::path::Path, &[u8])> = files.iter().map(|(p, b)| (p.as_path(), b.as_slice())).collect();
    Ok(durable_file::replace_all(&refs, Access::Owner)?)
}

type Queued = (usize, Vec<u8>, tokio::sync::oneshot::Sender<std::result::Result<Bytes, String>>);

/// One sender's group commit for concurrent sends: each message handed over waits for its turn, and the sender
/// whose turn it is encrypts, writes and seals everything queued by then as one [`Pairs::seal_batch`], as a
/// messenger that collects its outgoing messages while the previous batch is written would.
pub struct Outbox {
    me: usize,
    pairs: Arc<Pairs>,
    queue: Mutex<Vec<Queued>>,
    turn: tokio::sync::Mutex<()>,
}

impl Outbox {
    /// The outbox of sender `me`.
    pub fn new(pairs: Arc<Pairs>, me: usize) -> Self {
        Self { me, pairs, queue: Mutex::new(Vec::new()), turn: tokio::sync::Mutex::new(()) }
    }

    /// Encrypts `body` for `to` in the next batch and returns its envelope, once the batch's states are written.
    pub async fn seal(&self, to: usize, body: Vec<u8>) -> Result<Bytes> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        // A panic while holding the queue's lock leaves a queue of whole entries: usable.
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).push((to, body, tx));
        {
            let _turn = self.turn.lock().await;
            let batch = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()));
            // Empty if an earlier turn took this message along.
            if !batch.is_empty() {
                let (items, answers): (Vec<_>, Vec<_>) = batch.into_iter().map(|(to, b, tx)| ((to, b), tx)).unzip();
                let (pairs, me) = (self.pairs.clone(), self.me);
                let sealed = tokio::task::spawn_blocking(move || pairs.seal_batch(me, &items))
                    .await
                    .map_err(anyhow::Error::from)
                    .and_then(|r| r);
                match sealed {
                    Ok(envelopes) => {
                        for (tx, envelope) in answers.into_iter().zip(envelopes) {
                            // The waiter may have gone (its task ended): nothing to tell it.
                            let _ = tx.send(Ok(envelope));
                        }
                    }
                    Err(e) => {
                        for tx in answers {
                            let _ = tx.send(Err(e.to_string()));
                        }
                    }
                }
            }
        }
        rx.await.map_err(|_| anyhow!("the batch was dropped"))?.map_err(|e| anyhow!(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message number the next encryption would use, as the state written for `file` says.
    fn next_number_written(pairs: &Pairs, file: &str) -> u32 {
        let dir = pairs.state_dir.as_ref().expect("a state directory");
        let text = std::fs::read(dir.path().join(file)).expect("written");
        let mut v: serde_json::Value = serde_json::from_slice(&text).expect("JSON");
        let mut ratchet: RatchetState = serde_json::from_value(v["ratchet"].take()).expect("a ratchet state");
        let ad = hex::decode(v["ad"].as_str().expect("hex")).expect("hex");
        ratchet.encrypt(b"probe", &ad).expect("encrypt").header.n
    }

    /// When a batch is returned (what the sender then hands to the relay), each touched sending state is on disk
    /// as it is after the batch's last message; the recipients open everything in order, and their receiving
    /// states are written when they acknowledge.
    #[test]
    fn a_batch_is_written_before_it_is_returned_and_opens_in_order() {
        let pairs = Pairs::establish((0..3).map(|_| Identity::generate()).collect(), Some(StateDir::SystemTemp))
            .expect("sessions");
        let items = vec![(1, b"a".to_vec()), (2, b"b".to_vec()), (1, b"c".to_vec())];
        let envelopes = pairs.seal_batch(0, &items).expect("seal");
        assert_eq!(next_number_written(&pairs, "session-0-1.json"), 2);
        assert_eq!(next_number_written(&pairs, "session-0-2.json"), 1);
        let opened: Vec<_> = [(1, &envelopes[0]), (2, &envelopes[1]), (1, &envelopes[2])]
            .iter()
            .map(|(me, e)| pairs.open(*me, e).expect("open"))
            .collect();
        assert_eq!(opened, [(0, b"a".to_vec()), (0, b"b".to_vec()), (0, b"c".to_vec())]);
        pairs.persist_received(1, &[0]).expect("write");
        assert_eq!(next_number_written(&pairs, "received-1-0.json"), 0, "the recipient has sent nothing on it");
        assert_eq!(pairs.verified[1].len(), 1, "one certificate verified in full for two envelopes");
    }

    #[test]
    fn states_go_inside_the_directory_asked_for() {
        let parent = tempfile::tempdir().expect("tempdir");
        let pairs = Pairs::establish(
            (0..2).map(|_| Identity::generate()).collect(),
            Some(StateDir::In(parent.path().to_path_buf())),
        )
        .expect("sessions");
        pairs.seal_batch(0, &[(1, b"a".to_vec())]).expect("seal");
        let dir = pairs.state_dir.as_ref().expect("a state directory");
        assert!(dir.path().starts_with(parent.path()));
        assert_eq!(next_number_written(&pairs, "session-0-1.json"), 1);
    }

    /// Concurrent sends of one sender through its outbox: every one is sealed, written before it is returned, and
    /// opens at the recipient.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_sends_share_batches_and_all_open() {
        let pairs = Arc::new(
            Pairs::establish((0..2).map(|_| Identity::generate()).collect(), Some(StateDir::SystemTemp))
                .expect("sessions"),
        );
        let outbox = Arc::new(Outbox::new(pairs.clone(), 0));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..20u8 {
            let outbox = outbox.clone();
            tasks.spawn(async move { (i, outbox.seal(1, vec![i]).await.expect("sealed")) });
        }
        let mut opened = Vec::new();
        while let Some(done) = tasks.join_next().await {
            let (i, envelope) = done.expect("task");
            let (from, body) = pairs.open(1, &envelope).expect("opens");
            assert_eq!((from, body), (0, vec![i]));
            opened.push(i);
        }
        assert_eq!(opened.len(), 20);
        assert_eq!(next_number_written(&pairs, "session-0-1.json"), 20);
    }

    #[test]
    fn in_memory_writes_nothing() {
        let pairs = Pairs::establish((0..2).map(|_| Identity::generate()).collect(), None).expect("sessions");
        let envelopes = pairs.seal_batch(0, &[(1, b"a".to_vec())]).expect("seal");
        assert!(pairs.state_dir.is_none());
        assert_eq!(pairs.open(1, &envelopes[0]).expect("open"), (0, b"a".to_vec()));
    }
}
