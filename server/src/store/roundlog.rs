//! Mailboxes as a log of group-commit rounds in sled: the embedded [`MailboxStore`], at one sled write per round
//! instead of an insert, a scan and a remove per envelope.
//!
//! Layout (one tree, [`super::trees::MAILBOXES`]):
//! - `b'r' ‖ round (8, big-endian)` → the envelopes appended during one group-commit round, packed one after the
//!   other: `recipient (16) ‖ id (8) ‖ stored_at_ms (8) ‖ expires_at_ms (8) ‖ length (4) ‖ envelope`, all integers
//!   big-endian. Nothing about the sender, nothing decrypted.
//! - `b'd' ‖ sequence (8, big-endian)` → the ids (8 bytes each) of envelopes removed (acknowledged, expired or
//!   purged) during one round.
//!
//! Contract (on top of [`MailboxStore`]'s):
//! - An appended envelope sits in memory until the next group commit seals it: `RoundMailboxes::seal`, called by
//!   the flusher before each flush, writes the envelopes appended since the last seal and still queued as round
//!   records (a new one every 128 KiB), and one record of the removals since then. A sender's acknowledgement waits for that flush, so
//!   what was acknowledged is on disk; an envelope acknowledged by its recipient before the seal is never written.
//! - Memory: an index entry per queued envelope (its id, times, length and where it lives; ~100 bytes, no envelope
//!   bytes once sealed); envelope bytes only for the current round. Scans read sealed envelopes from the round
//!   records, sharing sled's buffers.
//! - A round record is deleted once none of its envelopes is queued; a removal record once every round it names
//!   has been deleted by an earlier, already flushed round, so a crash never revives a removed envelope (at worst
//!   one removed since the last flush, which clients de-duplicate). Removals alone (an offline mailbox draining)
//!   ask the flusher for a round, so they reach the disk within a flush interval.
//! - At open, the index is rebuilt from the records; a record that does not decode stops the open with an error
//!   instead of silently dropping mail. Entries of the earlier layout (one sled entry per envelope,
//!   `recipient ‖ id` → `stored_at_ms ‖ expires_at_ms ‖ envelope`) are converted into round records first, in one
//!   atomic sled batch, so an upgrade neither loses nor duplicates mail.
//! - Erasure: [`MailboxStore::purge`] rewrites every round record that held the account's envelopes without them,
//!   in the next round, so the erased account's ciphertext leaves the live records at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard, Weak};

use bytes::{Bytes, BytesMut};
use relay_proto::{ACCOUNT_ID_LEN, AccountId};

use super::backend::{BackendError, BoxFuture, MailboxStore};
use super::commit::GroupCommit;
use super::mailbox::{Appended, MailboxError, MailboxLimits, StoredEnvelope};

const ROUND: u8 = b'r';
const REMOVAL: u8 = b'd';
/// recipient, id, stored_at_ms, expires_at_ms, length.
const ENTRY_HEADER: usize = ACCOUNT_ID_LEN + 8 + 8 + 8 + 4;
/// Key length of an entry in the layout before round records.
const LEGACY_KEY_LEN: usize = ACCOUNT_ID_LEN + 8;
/// A round record is closed once it holds this many bytes (one seal may write several), so that sled keeps each
/// inline in its log rather than as a separate blob file.
const ROUND_MAX_BYTES: usize = 128 * 1024;

/// Where an envelope's bytes are.
#[derive(Debug, Clone)]
enum Place {
    /// Appended since the last seal: the bytes are here.
    Pending(Bytes),
    /// In round record `round`, at `offset` (of the envelope itself).
    Sealed { round: u64, offset: u32 },
}

#[derive(Debug, Clone)]
struct Entry {
    stored_at_ms: u64,
    expires_at_ms: u64,
    len: u32,
    place: Place,
}

#[derive(Debug, Default)]
struct Mailbox {
    entries: BTreeMap<u64, Entry>,
    bytes: u64,
}

#[derive(Debug, Default)]
struct Round {
    /// Envelopes of this round still queued.
    live: u64,
    /// Removal records naming envelopes of this round, and how many each names.
    named_by: HashMap<u64, u64>,
}

#[derive(Default)]
struct State {
    mailboxes: HashMap<AccountId, Mailbox>,
    /// (recipient, id) appended since the last seal, in id order.
    pending: Vec<(AccountId, u64)>,
    /// (id, round) of sealed envelopes removed since the last seal.
    removed: Vec<(u64, u64)>,
    rounds: HashMap<u64, Round>,
    /// Removal record → ids it names whose round record still exists.
    removal_refs: HashMap<u64, u64>,
    /// Rounds with nothing queued, to delete at the next seal.
    empty_rounds: Vec<u64>,
    /// Removal records that no longer name a round, to delete at the seal after next (once the rounds' deletion
    /// has been flushed).
    stale_removals: Vec<u64>,
    /// Rounds to rewrite without an erased account's envelopes.
    rewrite: Vec<u64>,
    next_round: u64,
    next_removal: u64,
    queued: u64,
}

/// The mailboxes, as a log of rounds.
pub struct RoundMailboxes {
    tree: sled::Tree,
    ids: sled::Db,
    limits: MailboxLimits,
    state: Mutex<State>,
    /// The group commit to ask for a round when only removals are waiting.
    commit: Mutex<Weak<GroupCommit>>,
}

fn record_key(kind: u8, n: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = kind;
    k[1..].copy_from_slice(&n.to_be_bytes());
    k
}

fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// One envelope of a round record: (recipient, id, stored_at_ms, expires_at_ms, offset of the envelope, length).
type Packed = (AccountId, u64, u64, u64, usize, usize);

/// Splits a round record into its envelopes; `None` if it does not decode.
fn unpack(record: &[u8]) -> Option<Vec<Packed>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < record.len() {
        let recipient = AccountId::from_slice(record.get(at..at + ACCOUNT_ID_LEN)?)?;
        let id = be_u64(record, at + ACCOUNT_ID_LEN)?;
        let stored = be_u64(record, at + ACCOUNT_ID_LEN + 8)?;
        let expires = be_u64(record, at + ACCOUNT_ID_LEN + 16)?;
        let len = u32::from_be_bytes(record.get(at + ACCOUNT_ID_LEN + 24..at + ENTRY_HEADER)?.try_into().ok()?);
        let start = at + ENTRY_HEADER;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        record.get(start..end)?;
        out.push((recipient, id, stored, expires, start, end - start));
        at = end;
    }
    Some(out)
}

fn pack_header(out: &mut BytesMut, recipient: &AccountId, id: u64, e: &Entry) {
    out.extend_from_slice(recipient.as_bytes());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&e.stored_at_ms.to_be_bytes());
    out.extend_from_slice(&e.expires_at_ms.to_be_bytes());
    out.extend_from_slice(&e.len.to_be_bytes());
}

/// A stored record did not decode.
fn corrupt(what: &str, key: &[u8]) -> MailboxError {
    MailboxError::Store(BackendError(format!("mailbox record {} is damaged ({what})", hex::encode(key))))
}

/// Converts entries of the layout before round records into round records numbered after the existing ones, and
/// removes them, in one atomic batch; then flushes.
fn convert_legacy(tree: &sled::Tree) -> Result<(), MailboxError> {
    let mut next_round = 0;
    let mut legacy = Vec::new();
    for item in tree.iter() {
        let (k, v) = item?;
        if k.len() == LEGACY_KEY_LEN {
            legacy.push((k, v));
        } else if k.len() == 9 && k[0] == ROUND {
            next_round = next_round.max(be_u64(&k, 1).unwrap_or_default() + 1);
        }
    }
    if legacy.is_empty() {
        return Ok(());
    }
    let mut batch = sled::Batch::default();
    let mut record = BytesMut::new();
    for (k, v) in &legacy {
        let recipient = AccountId::from_slice(&k[..ACCOUNT_ID_LEN]).ok_or_else(|| corrupt("legacy", k))?;
        let id = be_u64(k, ACCOUNT_ID_LEN).ok_or_else(|| corrupt("legacy", k))?;
        let (Some(stored_at_ms), Some(expires_at_ms)) = (be_u64(v, 0), be_u64(v, 8)) else {
            return Err(corrupt("legacy", k));
        };
        let envelope = &v[16..];
        let len = u32::try_from(envelope.len()).map_err(|_| corrupt("legacy", k))?;
        let e = Entry { stored_at_ms, expires_at_ms, len, place: Place::Pending(Bytes::new()) };
        pack_header(&mut record, &recipient, id, &e);
        record.extend_from_slice(envelope);
        if record.len() >= ROUND_MAX_BYTES {
            batch.insert(&record_key(ROUND, next_round), record.as_ref());
            next_round += 1;
            record.clear();
        }
        batch.remove(k);
    }
    if !record.is_empty() {
        batch.insert(&record_key(ROUND, next_round), record.as_ref());
    }
    tree.apply_batch(batch)?;
    tree.flush()?;
    tracing::info!(envelopes = legacy.len(), "mailbox entries converted to round records");
    Ok(())
}

/// The envelopes queued in a stopped relay's mailbox tree, as stored (removals applied), with their recipients:
/// for audits and tests that inspect what the relay keeps on disk.
pub fn stored_envelopes(tree: &sled::Tree) -> Result<Vec<(AccountId, Bytes)>, MailboxError> {
    let limits = MailboxLimits { max_messages: u64::MAX, max_bytes: u64::MAX, ttl_ms: 0 };
    let ids = sled::Config::new().temporary(true).open()?;
    let m = RoundMailboxes::open(tree.clone(), ids, limits)?;
    let st = m.state();
    let mut out = Vec::new();
    for (recipient, mailbox) in &st.mailboxes {
        for id in mailbox.entries.keys() {
            let got = m.scan_locked(&st, recipient, id - 1, 1, usize::MAX, 0)?;
            out.extend(got.into_iter().map(|e| (*recipient, e.envelope)));
        }
    }
    Ok(out)
}

impl RoundMailboxes {
    /// Opens the mailboxes in `tree`, rebuilding the index from its records. `ids` generates envelope ids.
    pub(crate) fn open(tree: sled::Tree, ids: sled::Db, limits: MailboxLimits) -> Result<Self, MailboxError> {
        convert_legacy(&tree)?;
        let mut st = State::default();
        let mut removal_records = Vec::new();
        for item in tree.iter() {
            let (k, v) = item?;
            let n = be_u64(&k, 1).filter(|_| k.len() == 9).ok_or_else(|| corrupt("unknown", &k))?;
            match k[0] {
                ROUND => {
                    let packed = unpack(&v).ok_or_else(|| corrupt("round", &k))?;
                    let round = st.rounds.entry(n).or_default();
                    for (recipient, id, stored_at_ms, expires_at_ms, offset, len) in packed {
                        let (offset, len) = (u32::try_from(offset), u32::try_from(len));
                        let (Ok(offset), Ok(len)) = (offset, len) else { return Err(corrupt("round", &k)) };
                        let mailbox = st.mailboxes.entry(recipient).or_default();
                        let place = Place::Sealed { round: n, offset };
                        mailbox.entries.insert(id, Entry { stored_at_ms, expires_at_ms, len, place });
                        mailbox.bytes += u64::from(len);
                        round.live += 1;
                        st.queued += 1;
                    }
                    st.next_round = st.next_round.max(n + 1);
                }
                REMOVAL => {
                    if v.len() % 8 != 0 {
                        return Err(corrupt("removal", &k));
                    }
                    removal_records.push((n, v));
                    st.next_removal = st.next_removal.max(n + 1);
                }
                _ => return Err(corrupt("unknown", &k)),
            }
        }
        // Ids are unique across mailboxes: find each removed id's mailbox through an id → recipient map.
        let owner: HashMap<u64, AccountId> =
            st.mailboxes.iter().flat_map(|(a, m)| m.entries.keys().map(move |id| (*id, *a))).collect();
        for (seq, ids) in removal_records {
            let mut refs = 0;
            for chunk in ids.chunks_exact(8) {
                let id = be_u64(chunk, 0).unwrap_or_default();
                let Some(recipient) = owner.get(&id) else { continue };
                let Some(mailbox) = st.mailboxes.get_mut(recipient) else { continue };
                let Some(e) = mailbox.entries.remove(&id) else { continue };
                mailbox.bytes -= u64::from(e.len);
                st.queued -= 1;
                if let Place::Sealed { round, .. } = e.place
                    && let Some(r) = st.rounds.get_mut(&round)
                {
                    r.live -= 1;
                    *r.named_by.entry(seq).or_default() += 1;
                    refs += 1;
                }
            }
            if refs == 0 {
                st.stale_removals.push(seq);
            } else {
                st.removal_refs.insert(seq, refs);
            }
        }
        st.mailboxes.retain(|_, m| !m.entries.is_empty());
        st.empty_rounds = st.rounds.iter().filter(|(_, r)| r.live == 0).map(|(n, _)| *n).collect();
        Ok(Self { tree, ids, limits, state: Mutex::new(st), commit: Mutex::new(Weak::new()) })
    }

    /// Lets removals ask `commit` for a round (see the module's contract).
    pub(crate) fn attach(&self, commit: &std::sync::Arc<GroupCommit>) {
        *self.commit.lock().unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::downgrade(commit);
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a panic mid-update elsewhere; every update below leaves the state consistent
        // before it can panic (it only allocates).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ask_for_round(&self) {
        if let Some(commit) = self.commit.lock().unwrap_or_else(|p| p.into_inner()).upgrade() {
            commit.request_flush();
        }
    }

    /// Writes what changed since the last seal: one round record of the envelopes appended and still queued, one
    /// record of the removals, rewritten rounds of erased accounts, and deletions of records no longer needed.
    /// Called by the group commit's flusher before each flush; everything written here is covered by that flush.
    pub(crate) fn seal(&self) -> Result<(), sled::Error> {
        let mut st = self.state();
        let st = &mut *st;
        // Removal records left without a round by the previous seal: that seal's flush has completed.
        for seq in std::mem::take(&mut st.stale_removals) {
            self.tree.remove(record_key(REMOVAL, seq))?;
        }
        if !st.pending.is_empty() {
            let pending = std::mem::take(&mut st.pending);
            let mut rest = &pending[..];
            while !rest.is_empty() {
                match self.seal_round(st, rest) {
                    Ok(n) => rest = &rest[n..],
                    Err(e) => {
                        // Not written: they stay pending for the next round (their senders are refused by this
                        // flush's failure).
                        st.pending = rest.to_vec();
                        return Err(e);
                    }
                }
            }
        }
        if !st.removed.is_empty() {
            let seq = st.next_removal;
            st.next_removal += 1;
            let removed = std::mem::take(&mut st.removed);
            let mut record = Vec::with_capacity(removed.len() * 8);
            let mut refs = 0;
            for (id, round) in removed {
                record.extend_from_slice(&id.to_be_bytes());
                if let Some(r) = st.rounds.get_mut(&round) {
                    *r.named_by.entry(seq).or_default() += 1;
                    refs += 1;
                }
            }
            self.tree.insert(record_key(REMOVAL, seq), record)?;
            st.removal_refs.insert(seq, refs);
        }
        for round in std::mem::take(&mut st.rewrite) {
            if st.rounds.get(&round).is_none_or(|r| r.live == 0) {
                continue; // deleted below, or already gone
            }
            self.rewrite_round(st, round)?;
        }
        for round in std::mem::take(&mut st.empty_rounds) {
            let Some(r) = st.rounds.remove(&round) else { continue };
            self.tree.remove(record_key(ROUND, round))?;
            for (seq, n) in r.named_by {
                if let Some(refs) = st.removal_refs.get_mut(&seq) {
                    *refs = refs.saturating_sub(n);
                    if *refs == 0 {
                        st.removal_refs.remove(&seq);
                        st.stale_removals.push(seq);
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes the next round record with pending envelopes from the front of `pending` (those still queued), up to
    /// [`ROUND_MAX_BYTES`]; returns how many of `pending` it dealt with.
    fn seal_round(&self, st: &mut State, pending: &[(AccountId, u64)]) -> Result<usize, sled::Error> {
        let round = st.next_round;
        let mut record = BytesMut::new();
        let mut sealed = Vec::new();
        let mut taken = 0;
        for (recipient, id) in pending {
            if record.len() >= ROUND_MAX_BYTES {
                break;
            }
            taken += 1;
            let Some(e) = st.mailboxes.get(recipient).and_then(|m| m.entries.get(id)) else {
                continue; // removed before it was sealed: never written
            };
            let Place::Pending(bytes) = &e.place else { continue };
            pack_header(&mut record, recipient, *id, e);
            sealed.push((*recipient, *id, u32::try_from(record.len()).unwrap_or(u32::MAX)));
            record.extend_from_slice(bytes);
        }
        if sealed.is_empty() {
            return Ok(taken);
        }
        self.tree.insert(record_key(ROUND, round), record.as_ref())?;
        let live = sealed.len() as u64;
        for (recipient, id, offset) in sealed {
            if let Some(e) = st.mailboxes.get_mut(&recipient).and_then(|m| m.entries.get_mut(&id)) {
                e.place = Place::Sealed { round, offset };
            }
        }
        st.rounds.insert(round, Round { live, named_by: HashMap::new() });
        st.next_round += 1;
        Ok(taken)
    }

    /// Writes round `round` again with only its envelopes still queued (an account was erased).
    fn rewrite_round(&self, st: &mut State, round: u64) -> Result<(), sled::Error> {
        let Some(old) = self.tree.get(record_key(ROUND, round))? else { return Ok(()) };
        let Some(packed) = unpack(&old) else { return Ok(()) };
        let mut record = BytesMut::with_capacity(old.len());
        for (recipient, id, ..) in packed {
            let Some(e) = st.mailboxes.get_mut(&recipient).and_then(|m| m.entries.get_mut(&id)) else { continue };
            let Place::Sealed { offset, .. } = e.place else { continue };
            let start = usize::try_from(offset).unwrap_or(usize::MAX);
            let Some(bytes) = start.checked_add(e.len as usize).and_then(|end| old.get(start..end)) else { continue };
            pack_header(&mut record, &recipient, id, e);
            let new_offset = u32::try_from(record.len()).unwrap_or(u32::MAX);
            record.extend_from_slice(bytes);
            e.place = Place::Sealed { round, offset: new_offset };
        }
        self.tree.insert(record_key(ROUND, round), record.as_ref())?;
        Ok(())
    }

    /// Takes `id` out of `recipient`'s mailbox, noting the removal for the next seal.
    fn take(st: &mut State, recipient: &AccountId, id: u64) -> Option<Entry> {
        let mailbox = st.mailboxes.get_mut(recipient)?;
        let e = mailbox.entries.remove(&id)?;
        mailbox.bytes -= u64::from(e.len);
        if mailbox.entries.is_empty() {
            st.mailboxes.remove(recipient);
        }
        st.queued -= 1;
        if let Place::Sealed { round, .. } = e.place {
            st.removed.push((id, round));
            if let Some(r) = st.rounds.get_mut(&round) {
                r.live -= 1;
                if r.live == 0 {
                    st.empty_rounds.push(round);
                }
            }
        }
        Some(e)
    }

    fn append_now(&self, recipient: &AccountId, envelope: &[u8], now_ms: u64) -> Result<Appended, MailboxError> {
        let len = u32::try_from(envelope.len()).map_err(|_| MailboxError::QuotaExceeded {
            messages: 0,
            bytes: 0,
            max_messages: self.limits.max_messages,
            max_bytes: self.limits.max_bytes,
        })?;
        let mut st = self.state();
        let (messages, bytes) = st.mailboxes.get(recipient).map_or((0, 0), |m| (m.entries.len() as u64, m.bytes));
        if messages.saturating_add(1) > self.limits.max_messages
            || bytes.saturating_add(u64::from(len)) > self.limits.max_bytes
        {
            return Err(MailboxError::QuotaExceeded {
                messages,
                bytes,
                max_messages: self.limits.max_messages,
                max_bytes: self.limits.max_bytes,
            });
        }
        // Taken under the lock, so entries of one mailbox are indexed in id order. Ours start at 1 so that 0 can
        // mean "before the first entry" in a scan.
        let id = self.ids.generate_id()?.saturating_add(1);
        let entry = Entry {
            stored_at_ms: now_ms,
            expires_at_ms: now_ms.saturating_add(self.limits.ttl_ms),
            len,
            place: Place::Pending(Bytes::copy_from_slice(envelope)),
        };
        let mailbox = st.mailboxes.entry(*recipient).or_default();
        mailbox.entries.insert(id, entry);
        mailbox.bytes += u64::from(len);
        st.pending.push((*recipient, id));
        st.queued += 1;
        Ok(Appended { id, stored_at_ms: now_ms })
    }

    fn scan_now(
        &self,
        recipient: &AccountId,
        after: u64,
        limit: usize,
        max_bytes: usize,
        now_ms: u64,
    ) -> Result<Vec<StoredEnvelope>, MailboxError> {
        // Under the lock: a seal or a rewrite cannot move an entry while its bytes are read (sled reads here are
        // memory lookups of the round records, one per round touched).
        let st = self.state();
        self.scan_locked(&st, recipient, after, limit, max_bytes, now_ms)
    }

    fn scan_locked(
        &self,
        st: &State,
        recipient: &AccountId,
        after: u64,
        limit: usize,
        max_bytes: usize,
        now_ms: u64,
    ) -> Result<Vec<StoredEnvelope>, MailboxError> {
        let Some(mailbox) = st.mailboxes.get(recipient) else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut record: Option<(u64, Bytes)> = None;
        for (id, e) in mailbox.entries.range(after.saturating_add(1)..) {
            if out.len() >= limit || bytes >= max_bytes {
                break;
            }
            if e.expires_at_ms <= now_ms {
                continue;
            }
            let len = e.len as usize;
            let envelope = match &e.place {
                Place::Pending(b) => b.clone(),
                Place::Sealed { round, offset } => {
                    if record.as_ref().is_none_or(|(r, _)| r != round) {
                        let key = record_key(ROUND, *round);
                        let got = self.tree.get(key)?.ok_or_else(|| corrupt("missing round", &key))?;
                        record = Some((*round, Bytes::from_owner(got)));
                    }
                    let start = *offset as usize;
                    match record.as_ref().and_then(|(_, b)| b.get(start..start + len).map(|_| b)) {
                        Some(b) => b.slice(start..start + len),
                        None => return Err(corrupt("short round", &record_key(ROUND, *round))),
                    }
                }
            };
            bytes = bytes.saturating_add(len);
            out.push(StoredEnvelope {
                id: *id,
                stored_at_ms: e.stored_at_ms,
                expires_at_ms: e.expires_at_ms,
                envelope,
            });
        }
        Ok(out)
    }

    fn remove_now(&self, recipient: &AccountId, ids: &[u64]) -> u32 {
        let mut n = 0;
        let mut st = self.state();
        for id in ids {
            if Self::take(&mut st, recipient, *id).is_some() {
                n += 1;
            }
        }
        let ask = !st.removed.is_empty();
        drop(st);
        if ask {
            self.ask_for_round();
        }
        n
    }

    fn purge_now(&self, recipient: &AccountId) -> u64 {
        let mut st = self.state();
        let ids: Vec<u64> =
            st.mailboxes.get(recipient).map(|m| m.entries.keys().copied().collect()).unwrap_or_default();
        let mut n = 0;
        for id in ids {
            if let Some(e) = Self::take(&mut st, recipient, id) {
                n += 1;
                if let Place::Sealed { round, .. } = e.place
                    && !st.rewrite.contains(&round)
                {
                    st.rewrite.push(round);
                }
            }
        }
        n
    }

    async fn sweep_now(&self, now_ms: u64) -> u64 {
        let accounts: Vec<AccountId> = self.state().mailboxes.keys().copied().collect();
        let mut removed = 0;
        for (i, account) in accounts.iter().enumerate() {
            if i % 256 == 255 {
                tokio::task::yield_now().await;
            }
            let mut st = self.state();
            let expired: Vec<u64> = match st.mailboxes.get(account) {
                Some(m) => m.entries.iter().filter(|(_, e)| e.expires_at_ms <= now_ms).map(|(id, _)| *id).collect(),
                None => continue,
            };
            for id in expired {
                if Self::take(&mut st, account, id).is_some() {
                    removed += 1;
                }
            }
        }
        if removed > 0 {
            self.ask_for_round();
        }
        removed
    }
}

impl MailboxStore for RoundMailboxes {
    fn append<'a>(
        &'a self,
        recipient: &'a AccountId,
        envelope: &'a [u8],
        now_ms: u64,
    ) -> BoxFuture<'a, Result<Appended, MailboxError>> {
        Box::pin(std::future::ready(self.append_now(recipient, envelope, now_ms)))
    }

    fn scan<'a>(
        &'a self,
        recipient: &'a AccountId,
        after: u64,
        limit: usize,
        max_bytes: usize,
        now_ms: u64,
    ) -> BoxFuture<'a, Result<Vec<StoredEnvelope>, MailboxError>> {
        Box::pin(std::future::ready(self.scan_now(recipient, after, limit, max_bytes, now_ms)))
    }

    fn remove<'a>(&'a self, recipient: &'a AccountId, ids: &'a [u64]) -> BoxFuture<'a, Result<u32, MailboxError>> {
        Box::pin(std::future::ready(Ok(self.remove_now(recipient, ids))))
    }

    fn purge<'a>(&'a self, recipient: &'a AccountId) -> BoxFuture<'a, Result<u64, MailboxError>> {
        let n = self.purge_now(recipient);
        if n > 0 {
            self.ask_for_round();
        }
        Box::pin(std::future::ready(Ok(n)))
    }

    fn sweep_expired(&self, now_ms: u64) -> BoxFuture<'_, Result<u64, MailboxError>> {
        Box::pin(async move { Ok(self.sweep_now(now_ms).await) })
    }

    fn depth<'a>(&'a self, recipient: &'a AccountId) -> BoxFuture<'a, Result<u64, MailboxError>> {
        let n = self.state().mailboxes.get(recipient).map_or(0, |m| m.entries.len() as u64);
        Box::pin(std::future::ready(Ok(n)))
    }

    fn queued(&self) -> u64 {
        self.state().queued
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::conformance::mailboxes as suite;

    /// Mailbox stores over one tree; `durable` seals and flushes the last one opened, as the group commit would.
    struct Rounds {
        _dir: tempfile::TempDir,
        db: sled::Db,
        tree: sled::Tree,
        last: Mutex<Option<Arc<RoundMailboxes>>>,
    }

    impl Rounds {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            let db = sled::Config::new().path(dir.path()).temporary(true).open().expect("open");
            let tree = db.open_tree("m").expect("tree");
            Self { _dir: dir, db, tree, last: Mutex::new(None) }
        }

        fn open_rounds(&self, limits: MailboxLimits) -> Arc<RoundMailboxes> {
            let m = Arc::new(RoundMailboxes::open(self.tree.clone(), self.db.clone(), limits).expect("open"));
            *self.last.lock().expect("lock") = Some(m.clone());
            m
        }

        fn seal(&self) {
            let last = self.last.lock().expect("lock").clone();
            last.expect("a store was opened").seal().expect("seal");
        }
    }

    impl suite::Fixture for Rounds {
        fn byte_quota(&self) -> suite::ByteQuota {
            suite::ByteQuota::Enforced
        }

        async fn open(&self, limits: MailboxLimits) -> Arc<dyn MailboxStore> {
            self.open_rounds(limits)
        }

        async fn durable(&self) {
            self.seal();
            self.db.flush_async().await.expect("flush");
        }
    }

    fn limits() -> MailboxLimits {
        MailboxLimits { max_messages: 1000, max_bytes: 1 << 20, ttl_ms: 10_000 }
    }

    #[tokio::test]
    async fn conformance() {
        suite::run_all(&Rounds::new).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn conformance_cursor_readers_under_concurrent_appends() {
        suite::cursor_readers_miss_nothing_under_concurrent_appends(&Rounds::new()).await;
    }

    #[tokio::test]
    async fn a_round_is_one_record_and_survives_a_reopen_byte_for_byte() {
        let f = Rounds::new();
        let m = f.open_rounds(limits());
        let (a, b) = (AccountId([1; 16]), AccountId([2; 16]));
        let e1 = m.append(&a, b"first", 1).await.expect("append");
        let e2 = m.append(&b, b"second", 2).await.expect("append");
        let e3 = m.append(&a, b"third", 3).await.expect("append");
        assert_eq!(f.tree.len(), 0, "nothing is written before the round is sealed");
        f.seal();
        assert_eq!(f.tree.len(), 1, "one record for the whole round");
        let again = f.open_rounds(limits());
        let got = again.scan(&a, 0, 10, usize::MAX, 0).await.expect("scan");
        assert_eq!(
            got.iter().map(|e| (e.id, e.stored_at_ms, &e.envelope[..])).collect::<Vec<_>>(),
            vec![(e1.id, 1, &b"first"[..]), (e3.id, 3, &b"third"[..])]
        );
        let got = again.scan(&b, 0, 10, usize::MAX, 0).await.expect("scan");
        assert_eq!((got[0].id, &got[0].envelope[..]), (e2.id, &b"second"[..]));
    }

    #[tokio::test]
    async fn removals_survive_a_reopen_and_drained_rounds_leave_no_record() {
        let f = Rounds::new();
        let m = f.open_rounds(limits());
        let a = AccountId([1; 16]);
        let ids: Vec<u64> = {
            let mut ids = Vec::new();
            for i in 0..4u8 {
                ids.push(m.append(&a, &[i; 10], 0).await.expect("append").id);
            }
            ids
        };
        f.seal();
        assert_eq!(m.remove(&a, &ids[..2]).await.expect("remove"), 2);
        f.seal();
        // A restart now sees only the two left.
        let again = f.open_rounds(limits());
        let left: Vec<u64> = again.scan(&a, 0, 10, usize::MAX, 0).await.expect("scan").iter().map(|e| e.id).collect();
        assert_eq!(left, ids[2..]);
        assert_eq!(again.remove(&a, &ids[2..]).await.expect("remove"), 2);
        f.seal(); // the removal record and the round's deletion
        f.seal(); // the removal records that named it, once that deletion has been flushed
        assert_eq!(
            f.tree.len(),
            0,
            "a drained mailbox leaves no record behind: {:?}",
            f.tree.iter().keys().collect::<Vec<_>>()
        );
        assert!(f.open_rounds(limits()).scan(&a, 0, 10, usize::MAX, 0).await.expect("scan").is_empty());
    }

    #[tokio::test]
    async fn an_envelope_acknowledged_before_its_round_is_never_written() {
        let f = Rounds::new();
        let m = f.open_rounds(limits());
        let a = AccountId([1; 16]);
        let e = m.append(&a, b"quick", 0).await.expect("append");
        assert_eq!(m.scan(&a, 0, 10, usize::MAX, 0).await.expect("scan").len(), 1, "deliverable before the seal");
        m.remove(&a, &[e.id]).await.expect("remove");
        f.seal();
        assert_eq!(f.tree.len(), 0);
    }

    #[tokio::test]
    async fn purge_rewrites_shared_rounds_without_the_erased_accounts_bytes() {
        let f = Rounds::new();
        let m = f.open_rounds(limits());
        let (gone, kept) = (AccountId([1; 16]), AccountId([2; 16]));
        m.append(&gone, b"ERASED-CIPHERTEXT", 0).await.expect("append");
        m.append(&kept, b"kept-ciphertext", 0).await.expect("append");
        f.seal();
        assert_eq!(m.purge(&gone).await.expect("purge"), 1);
        f.seal();
        for item in f.tree.iter() {
            let (_, v) = item.expect("record");
            assert!(!v.windows(17).any(|w| w == b"ERASED-CIPHERTEXT"), "an erased account's envelope is still stored");
        }
        let again = f.open_rounds(limits());
        assert_eq!(&again.scan(&kept, 0, 10, usize::MAX, 0).await.expect("scan")[0].envelope[..], b"kept-ciphertext");
        assert_eq!(again.depth(&gone).await.expect("depth"), 0);
    }

    #[tokio::test]
    async fn entries_of_the_earlier_layout_are_converted_without_loss() {
        let f = Rounds::new();
        let (a, b) = (AccountId([1; 16]), AccountId([2; 16]));
        // As the relay before round records stored them: recipient ‖ id → stored_at ‖ expires_at ‖ envelope.
        for (recipient, id, body) in [(a, 7u64, &b"seven"[..]), (b, 8, b"eight"), (a, 9, b"nine")] {
            let mut k = recipient.as_bytes().to_vec();
            k.extend_from_slice(&id.to_be_bytes());
            let mut v = 100u64.to_be_bytes().to_vec();
            v.extend_from_slice(&5000u64.to_be_bytes());
            v.extend_from_slice(body);
            f.tree.insert(k, v).expect("legacy entry");
        }
        let m = f.open_rounds(limits());
        let got = m.scan(&a, 0, 10, usize::MAX, 0).await.expect("scan");
        assert_eq!(
            got.iter().map(|e| (e.id, e.stored_at_ms, e.expires_at_ms, &e.envelope[..])).collect::<Vec<_>>(),
            vec![(7, 100, 5000, &b"seven"[..]), (9, 100, 5000, &b"nine"[..])]
        );
        assert_eq!(m.depth(&b).await.expect("depth"), 1);
        assert!(f.tree.iter().keys().all(|k| k.expect("key").len() == 9), "no entry of the old layout is left");
        // Opening again converts nothing twice.
        assert_eq!(f.open_rounds(limits()).queued(), 3);
    }

    #[tokio::test]
    async fn a_large_round_is_split_into_records_that_all_read_back() {
        let f = Rounds::new();
        let big = MailboxLimits { max_messages: 1000, max_bytes: 1 << 30, ttl_ms: 10_000 };
        let m = f.open_rounds(big);
        let a = AccountId([1; 16]);
        for i in 0..40u8 {
            m.append(&a, &[i; 16 * 1024], 0).await.expect("append");
        }
        f.seal();
        assert!(f.tree.len() >= 5, "640 KiB in records of at most ~128 KiB: {} records", f.tree.len());
        let again = f.open_rounds(big);
        let got = again.scan(&a, 0, 100, usize::MAX, 0).await.expect("scan");
        assert_eq!(got.len(), 40);
        assert!(got.iter().enumerate().all(|(i, e)| e.envelope.len() == 16 * 1024 && e.envelope[0] == i as u8));
    }

    #[tokio::test]
    async fn a_damaged_record_stops_the_open() {
        let f = Rounds::new();
        let m = f.open_rounds(limits());
        m.append(&AccountId([1; 16]), b"x", 0).await.expect("append");
        f.seal();
        let (k, v) = f.tree.iter().next().expect("record").expect("record");
        f.tree.insert(k, &v[..v.len() - 1]).expect("truncate");
        let err = RoundMailboxes::open(f.tree.clone(), f.db.clone(), limits()).err().expect("refused");
        assert!(err.to_string().contains("damaged"), "{err}");
    }
}
