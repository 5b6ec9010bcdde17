//! "What was shared about me": the user's entries of the exporter's Merkle export log, fetched from the relay and,
//! with `verify`, checked on the device without trusting the relay or the exporter's word.
//!
//! Checks, for `verify`:
//! - the tree head is signed by the log key, which is pinned in the home (`exports.json`) at the first verified
//!   fetch; a different key later is reported, never silently accepted;
//! - the head is consistent with the head verified last time (RFC 6962 consistency proof), so the log only grew;
//! - each entry is in the log under that head (inclusion proof);
//! - each entry's consent hash is the hash of a grant this device signed (a receipt in `receipts.json`) for exactly
//!   that affiliate and purpose, in force at the export's time, and not superseded by a statement the relay had
//!   recorded before that time;
//! - with witnesses remembered in the home ([`crate::witnessed`]), the head carries a valid cosignature from each.
//!
//! - a home that verified a head before fails when the relay now serves no head at all, or a head older (smaller)
//!   than the pinned one: a log only grows.
//!
//! The head is pinned only when every check passed.
//!
//! Paging is bounded: at most [`MAX_PAGES`] pages and [`MAX_ENTRIES`] entries per listing (each page is one frame of
//! bounded size), so a relay that announces "more" forever gets an error, not a client that loops or grows.
//!
//! The report carries, for each entry, its canonical leaf and its inclusion proof, and the signed head they were
//! checked against with the log key: enough for another tool to check it all again without this code (README,
//! "`relay exports --json`").

use relay_proto::consent::{ConsentStatement, Decision, statement_hash};
use relay_proto::merkle::{
    ExportLeaf, LeafKind, SignedTreeHead, log_key_from_wire, proof_from_wire, verify_consistency, verify_inclusion,
};
use relay_proto::wire::ExportList;
use serde::{Deserialize, Serialize};

use crate::consent::Receipt;
use crate::messenger::{Messenger, MessengerError};

/// The file that pins the log key and the last verified head.
pub const STATE_FILE: &str = "exports.json";

/// Most entries of one listing the client keeps.
pub const MAX_ENTRIES: usize = 8_192;

/// Most pages of one listing the client asks for: twice what [`MAX_ENTRIES`] takes in full pages, as an honest relay
/// sends them.
pub const MAX_PAGES: usize = 2 * MAX_ENTRIES / relay_proto::MAX_LISTED_EXPORTS;

/// One export concerning the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExportedEntry {
    /// Position in the log.
    pub index: u64,
    /// What the entry records: `export`, `withdrawal_notice` (no data, only the identifiers the affiliate already
    /// held) or `erasure_notice`.
    pub kind: &'static str,
    /// Export (webhook) id, hex.
    pub export_id: String,
    /// Affiliate that received the data.
    pub affiliate: String,
    /// Purpose.
    pub purpose: String,
    /// Names of the fields sent (never their values).
    pub fields: Vec<String>,
    /// When the export was made (ms since the Unix epoch).
    pub time_ms: u64,
    /// The same, RFC 3339.
    pub time: String,
    /// SHA-256 of the body as sent (it includes a random nonce), hex.
    pub payload_hash: String,
    /// Hash of the consent statement that allowed it (the receipt id), hex.
    pub consent: String,
    /// Sequence number of that statement, if it is one of this device's receipts.
    pub consent_sequence: Option<u64>,
    /// Why the entry failed verification, if it did.
    pub problem: Option<String>,
    /// The canonical leaf encoding (`ExportLeaf::encode`), hex: its RFC 6962 leaf hash is SHA-256(0x00 ‖ leaf).
    pub leaf: String,
    /// The audit path of the leaf to the report's head.
    pub inclusion: InclusionProof,
}

/// An RFC 6962 audit path, as the relay served it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InclusionProof {
    /// The leaf's index.
    pub index: u64,
    /// The size of the tree (the head) it leads to.
    pub tree_size: u64,
    /// The hashes, leaf side first, hex.
    pub hashes: Vec<String>,
}

/// A tree head signed by the log key: the key signs `TreeHead::encode` ("consent-relay tree head v1" ‖ size, u64
/// big-endian ‖ timestamp_ms, u64 big-endian ‖ root) with Ed25519.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SignedHead {
    /// Number of leaves.
    pub size: u64,
    /// Merkle tree root, hex.
    pub root: String,
    /// When it was signed (ms since the Unix epoch).
    pub timestamp_ms: u64,
    /// Ed25519 signature, hex.
    pub signature: String,
    /// The witnesses' cosignatures the relay served with the head (docs/protocol.md 10.4), as served: checked only
    /// under the witness keys this home was configured with (`--witness-key`), whatever key each names.
    pub cosignatures: Vec<HeadCosignature>,
}

/// A witness's cosignature of a head: Ed25519 by `witness_key` over "consent-relay witness cosignature v1" ‖
/// SHA-256(log key) ‖ size (u64 BE) ‖ root ‖ timestamp_ms (u64 BE).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeadCosignature {
    /// The witness key it names, hex.
    pub witness_key: String,
    /// When the witness cosigned (its clock, ms since the Unix epoch).
    pub timestamp_ms: u64,
    /// The signature, hex.
    pub signature: String,
}

/// The RFC 6962 consistency proof from the head this home verified before to the report's head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConsistencyProof {
    /// The size of the head verified before.
    pub old_size: u64,
    /// Its root, hex.
    pub old_root: String,
    /// The proof's hashes, hex.
    pub hashes: Vec<String>,
}

/// What the relay returned, and what verification found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ExportsReport {
    /// The log's key, hex, if anything was ever exported.
    pub log_key: Option<String>,
    /// Size of the signed head the entries were proven against.
    pub tree_size: u64,
    /// When that head was signed (ms since the Unix epoch).
    pub head_time_ms: u64,
    /// That head, as signed.
    pub head: Option<SignedHead>,
    /// With `verify` and a head verified before: the proof that the log only grew since.
    pub consistency: Option<ConsistencyProof>,
    /// The user's entries, oldest first.
    pub entries: Vec<ExportedEntry>,
    /// Whether the checks ran.
    pub verified: bool,
    /// Problems with the log as a whole (key, head signature, consistency) and a summary of entry problems.
    pub problems: Vec<String>,
}

/// `exports.json`: the pinned log key and the last head that passed verification.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct PinnedLog {
    log_key: Option<String>,
    size: u64,
    root: String,
    timestamp_ms: u64,
}

/// The problem with one entry's consent, if any: its hash must be one of `receipts`' grants for the same pair, in
/// force at `leaf.time_ms`, with no later statement for the pair recorded by then.
fn consent_problem(leaf: &ExportLeaf, receipts: &[Receipt]) -> (Option<u64>, Option<String>) {
    let hash = hex::encode(leaf.consent_hash);
    let Some(receipt) = receipts.iter().find(|r| r.receipt_id == hash) else {
        return (None, Some("no consent statement of this device has this hash".into()));
    };
    let decoded =
        hex::decode(&receipt.statement).ok().and_then(|b| Some((ConsentStatement::decode_stored(&b).ok()?, b)));
    let Some((statement, encoded)) = decoded else {
        return (Some(receipt.sequence), Some("the receipt's statement does not decode".into()));
    };
    let seq = Some(statement.sequence);
    if statement_hash(&encoded) != leaf.consent_hash {
        return (seq, Some("the receipt's statement does not have the receipt's hash".into()));
    }
    if leaf.kind != LeafKind::Export {
        // A notice carries nothing new: it must follow from this device's withdrawal of exactly that pair.
        let ok = statement.decision == Decision::Withdraw
            && statement.affiliate == leaf.affiliate
            && statement.purpose.as_str() == leaf.purpose;
        return (seq, (!ok).then(|| "a notice that does not follow from a withdrawal of its pair".into()));
    }
    if statement.decision != Decision::Grant {
        return (seq, Some("exported under a withdrawal".into()));
    }
    if statement.affiliate != leaf.affiliate || statement.purpose.as_str() != leaf.purpose {
        return (seq, Some("the grant was for another affiliate or purpose".into()));
    }
    if !statement.granted_at(leaf.time_ms) {
        return (seq, Some("the grant was not in force at the export's time".into()));
    }
    // The notice this device showed and signed, kept in the receipt: every field that left must be on it.
    let Ok(notice) = relay_proto::notice::Notice::decode(receipt.notice.as_bytes()) else {
        return (seq, Some("the receipt's notice is not a notice naming its fields (granted before they did)".into()));
    };
    if relay_proto::notice::notice_hash(receipt.notice.as_bytes()) != statement.notice_hash {
        return (seq, Some("the receipt's notice is not the one the statement signed".into()));
    }
    if let Some(field) = leaf.fields.iter().find(|f| !notice.fields.iter().any(|n| n.as_str() == f.as_str())) {
        return (seq, Some(format!("{field} was sent although the notice you agreed to does not name it")));
    }
    let superseded = receipts.iter().any(|r| {
        r.affiliate == leaf.affiliate
            && r.purpose == leaf.purpose
            && r.sequence > statement.sequence
            && r.recorded_at < leaf.time_ms
    });
    if superseded {
        return (seq, Some("exported after a later decision for this pair was recorded".into()));
    }
    (seq, None)
}

/// Where the page after `page` (which started at index `start`) starts, if the relay says there is one. The relay
/// decides how many pages there are: each must start strictly after the one before and inside the tree of `size`
/// leaves, so a relay cannot keep a client paging forever.
fn next_page(start: u64, page: &ExportList, size: u64) -> Result<Option<u64>, String> {
    if !page.more {
        return Ok(None);
    }
    if page.next_index <= start || page.next_index >= size {
        return Err(format!(
            "export log: the relay announced another page at index {} after one at {start}, in a log of {size} \
             entries",
            page.next_index
        ));
    }
    Ok(Some(page.next_index))
}

/// Counts the pages and entries of one listing against [`MAX_PAGES`] and [`MAX_ENTRIES`].
#[derive(Debug, Default)]
struct PageBounds {
    pages: usize,
    entries: usize,
}

impl PageBounds {
    /// Counts one more page received; an error once either bound is passed.
    fn take(&mut self, page: &ExportList) -> Result<(), String> {
        self.pages += 1;
        self.entries = self.entries.saturating_add(page.entries.len());
        if self.pages > MAX_PAGES {
            return Err(format!(
                "export log: the relay announced more than {MAX_PAGES} pages of entries for this account; stopped"
            ));
        }
        if self.entries > MAX_ENTRIES {
            return Err(format!(
                "export log: the relay sent more than {MAX_ENTRIES} entries for this account; stopped"
            ));
        }
        Ok(())
    }
}

impl Messenger {
    /// The exports concerning this account, from the relay's copy of the export log; with `verify`, every check of
    /// the module header, and the head pinned if all pass.
    pub async fn exports(&self, verify: bool) -> Result<ExportsReport, MessengerError> {
        let pinned: PinnedLog = self.home().load_private(STATE_FILE)?;
        let conn = self.connection();
        let mut report = ExportsReport { verified: verify, ..ExportsReport::default() };
        let since = if verify { pinned.size } else { 0 };
        let first = match conn.list_exports(0, 0, since).await {
            Ok(page) => page,
            Err(e) if since > 0 => {
                report.problems.push(format!(
                    "the relay cannot prove the log is consistent with the head of size {since} verified before: {e}"
                ));
                conn.list_exports(0, 0, 0).await?
            }
            Err(e) => return Err(e.into()),
        };
        let Some(wire_head) = &first.head else {
            if verify && pinned.log_key.is_some() {
                report.problems.push(format!(
                    "the relay serves no tree head, but this home verified a head of size {} before: a log only grows",
                    pinned.size
                ));
            }
            return Ok(report);
        };
        let bad = |e: relay_proto::merkle::MerkleError| MessengerError::Input(format!("export log: {e}"));
        let key = log_key_from_wire(&first.log_key).map_err(bad)?;
        let head = SignedTreeHead::try_from(wire_head).map_err(bad)?;
        let key_hex = hex::encode(key.as_bytes());
        report.log_key = Some(key_hex.clone());
        report.tree_size = head.head.size;
        report.head_time_ms = head.head.timestamp_ms;
        report.head = Some(SignedHead {
            size: head.head.size,
            root: hex::encode(head.head.root),
            timestamp_ms: head.head.timestamp_ms,
            signature: hex::encode(head.signature),
            cosignatures: wire_head
                .cosignatures
                .iter()
                .take(relay_proto::witness::MAX_COSIGNATURES)
                .map(|c| HeadCosignature {
                    witness_key: hex::encode(&c.witness_key),
                    timestamp_ms: c.timestamp_ms,
                    signature: hex::encode(&c.signature),
                })
                .collect(),
        });
        let witness_problems = if verify {
            let witnesses = crate::witnessed::Witnesses::load(self.home())?.parsed().map_err(MessengerError::Input)?;
            crate::witnessed::problems(wire_head, &head, &key, &witnesses)
        } else {
            Vec::new()
        };

        let mut bounds = PageBounds::default();
        bounds.take(&first).map_err(MessengerError::Input)?;
        let mut pages = Vec::new();
        let (mut page, mut start) = (first, 0);
        loop {
            let next = next_page(start, &page, head.head.size).map_err(MessengerError::Input)?;
            pages.push(page);
            let Some(next) = next else { break };
            start = next;
            page = conn.list_exports(head.head.size, next, 0).await?;
            bounds.take(&page).map_err(MessengerError::Input)?;
        }
        let receipts: Vec<Receipt> = self.home().load_private("receipts.json")?;
        if verify {
            if let Some(pinned_key) = &pinned.log_key
                && *pinned_key != key_hex
            {
                report.problems.push(format!("LOG KEY CHANGED: pinned {pinned_key}, the relay now serves {key_hex}"));
            }
            if head.verify(&key).is_err() {
                report.problems.push("the tree head's signature does not verify under the log key".into());
            }
            if head.head.size < pinned.size {
                report.problems.push(format!(
                    "the relay serves a head of size {}, older than the head of size {} verified before: a log only \
                     grows",
                    head.head.size, pinned.size
                ));
            }
            report.problems.extend(witness_problems);
            if pinned.size > 0 && report.problems.is_empty() {
                let old_root: Option<[u8; 32]> = hex::decode(&pinned.root).ok().and_then(|r| r.try_into().ok());
                let proof = proof_from_wire(&pages[0].consistency).map_err(bad)?;
                report.consistency = Some(ConsistencyProof {
                    old_size: pinned.size,
                    old_root: pinned.root.clone(),
                    hashes: proof.iter().map(hex::encode).collect(),
                });
                let consistent = old_root.is_some_and(|old| {
                    verify_consistency(pinned.size, head.head.size, &old, &head.head.root, &proof).is_ok()
                });
                if !consistent {
                    report.problems.push(format!(
                        "the log is not consistent with the head of size {} verified before",
                        pinned.size
                    ));
                }
            }
        }
        let mut failed = 0;
        for entry in pages.iter().flat_map(|p| &p.entries) {
            let leaf = ExportLeaf::decode(&entry.leaf).map_err(bad)?;
            let (consent_sequence, mut problem) = consent_problem(&leaf, &receipts);
            let proof = proof_from_wire(&entry.proof).map_err(bad)?;
            let inclusion = InclusionProof {
                index: entry.index,
                tree_size: head.head.size,
                hashes: proof.iter().map(hex::encode).collect(),
            };
            if verify {
                let hash = relay_proto::merkle::leaf_hash(&entry.leaf);
                if let Err(e) = verify_inclusion(&hash, entry.index, head.head.size, &proof, &head.head.root) {
                    problem = Some(format!("inclusion proof: {e}"));
                }
            } else {
                problem = None;
            }
            failed += usize::from(problem.is_some());
            report.entries.push(ExportedEntry {
                index: entry.index,
                kind: leaf.kind.as_str(),
                export_id: hex::encode(leaf.export_id),
                affiliate: leaf.affiliate,
                purpose: leaf.purpose,
                fields: leaf.fields,
                time_ms: leaf.time_ms,
                time: relay_proto::time::rfc3339(leaf.time_ms),
                payload_hash: hex::encode(leaf.payload_hash),
                consent: hex::encode(leaf.consent_hash),
                consent_sequence,
                problem,
                leaf: hex::encode(&entry.leaf),
                inclusion,
            });
        }
        if failed > 0 {
            report.problems.push(format!("{failed} entr{} failed verification", if failed == 1 { "y" } else { "ies" }));
        }
        if verify && report.problems.is_empty() {
            // Pinned under the lock; a head verified concurrently by another client of this home is as good.
            let op = self.begin(false).await?;
            let state = PinnedLog {
                log_key: Some(key_hex),
                size: head.head.size,
                root: hex::encode(head.head.root),
                timestamp_ms: head.head.timestamp_ms,
            };
            self.home().save_private(STATE_FILE, &state)?;
            op.end(self.home())?;
        }
        Ok(report)
    }

    /// Reports new device info to the relay (a re-registration): exports already granted are sent again with the
    /// new data, for the fields each affiliate receives.
    pub async fn update_device(&mut self, device: crate::home::Device) -> Result<(), MessengerError> {
        let op = self.begin(false).await?;
        let mut profile = self.home().profile()?;
        profile.device = device.clone();
        let info = relay_proto::wire::DeviceInfo {
            model: device.model.clone(),
            os: device.os.clone(),
            app_version: device.app_version.clone(),
        };
        self.connection().register(self.identity(), &profile.phone, info).await?;
        self.home().save_profile(&profile)?;
        op.end(self.home())?;
        self.set_device(device);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use relay_proto::AccountId;
    use relay_proto::consent::Purpose;

    use super::*;

    /// AdsCo's advertising notice: the pseudonym and the device model.
    fn notice() -> String {
        use relay_proto::notice::{Field, Notice, Retention};
        let n = Notice {
            version: 1,
            affiliate: "adsco".into(),
            legal_name: "AdsCo SAS".into(),
            country: "FR".into(),
            purpose: Purpose::Advertising,
            fields: vec![Field::PhonePseudonym, Field::DeviceModel],
            retention: Retention::UntilWithdrawn,
        };
        String::from_utf8(n.encode().expect("notice")).expect("utf-8")
    }

    fn receipt(sequence: u64, decision: Decision, recorded_at: u64) -> (Receipt, [u8; 32]) {
        let s = ConsentStatement {
            account: AccountId([1; 16]),
            affiliate: "adsco".into(),
            purpose: Purpose::Advertising,
            decision,
            notice_hash: relay_proto::notice::notice_hash(notice().as_bytes()),
            sequence,
            time_ms: recorded_at,
            expires_ms: None,
        };
        let r = Receipt {
            version: String::new(),
            receipt_id: hex::encode(s.hash()),
            decision: String::new(),
            consent_timestamp: recorded_at,
            recorded_at,
            collection_method: String::new(),
            pii_principal_id: String::new(),
            recorded_by: String::new(),
            affiliate: "adsco".into(),
            purpose: "advertising".into(),
            notice_version: 1,
            notice_hash: String::new(),
            notice: notice(),
            consent_type: String::new(),
            expires_at: None,
            sequence,
            statement: hex::encode(s.encode()),
            signature: String::new(),
        };
        (r, s.hash())
    }

    fn leaf(consent_hash: [u8; 32], affiliate: &str, time_ms: u64) -> ExportLeaf {
        ExportLeaf {
            kind: LeafKind::Export,
            notice_hash: Some([0; 32]),
            export_id: [0; 16],
            affiliate: affiliate.into(),
            purpose: "advertising".into(),
            fields: vec![],
            payload_hash: [0; 32],
            consent_hash,
            time_ms,
        }
    }

    #[test]
    fn pages_must_move_forward_inside_the_log() {
        let page = |more, next_index| ExportList { more, next_index, ..ExportList::default() };
        assert_eq!(next_page(0, &page(false, 0), 10), Ok(None));
        assert_eq!(next_page(0, &page(true, 4), 10), Ok(Some(4)));
        assert_eq!(next_page(4, &page(true, 9), 10), Ok(Some(9)));
        for (start, next) in [(4, 4), (4, 3), (4, 10), (4, u64::MAX)] {
            assert!(next_page(start, &page(true, next), 10).is_err(), "{start} -> {next}");
        }
    }

    #[test]
    fn a_listing_stops_at_the_page_and_entry_bounds() {
        // The figures README and docs/protocol.md give.
        assert_eq!((MAX_PAGES, MAX_ENTRIES), (128, 8_192));
        let page = |n| ExportList { entries: vec![relay_proto::wire::LogLeaf::default(); n], ..ExportList::default() };
        let mut bounds = PageBounds::default();
        for _ in 0..MAX_PAGES {
            assert_eq!(bounds.take(&page(0)), Ok(()));
        }
        assert!(bounds.take(&page(0)).is_err_and(|e| e.contains("pages")));
        let mut bounds = PageBounds::default();
        assert_eq!(bounds.take(&page(MAX_ENTRIES)), Ok(()));
        assert!(bounds.take(&page(1)).is_err_and(|e| e.contains("entries")));
    }

    #[test]
    fn an_entry_must_rest_on_this_devices_grant_in_force_and_not_superseded() {
        let (grant, grant_hash) = receipt(1, Decision::Grant, 1_000);
        let (withdraw, withdraw_hash) = receipt(2, Decision::Withdraw, 5_000);
        let receipts = [grant, withdraw];
        assert_eq!(consent_problem(&leaf(grant_hash, "adsco", 2_000), &receipts), (Some(1), None));
        let problem = |l: &ExportLeaf| consent_problem(l, &receipts).1.unwrap_or_default();
        assert!(problem(&leaf(grant_hash, "adsco", 6_000)).contains("later decision"));
        assert!(problem(&leaf(grant_hash, "adsco", 500)).contains("not in force"));
        assert!(problem(&leaf(grant_hash, "shieldco", 2_000)).contains("another affiliate"));
        assert!(problem(&leaf(withdraw_hash, "adsco", 6_000)).contains("withdrawal"));
        assert!(problem(&leaf([9; 32], "adsco", 2_000)).contains("no consent statement"));
        // A withdrawal notice rests on the withdrawal of its pair, and only on one.
        let notice =
            |hash, affiliate: &str| ExportLeaf { kind: LeafKind::WithdrawalNotice, ..leaf(hash, affiliate, 6_000) };
        assert_eq!(consent_problem(&notice(withdraw_hash, "adsco"), &receipts), (Some(2), None));
        assert!(problem(&notice(grant_hash, "adsco")).contains("does not follow from a withdrawal"));
        assert!(problem(&notice(withdraw_hash, "shieldco")).contains("does not follow from a withdrawal"));

        // Only the fields the notice this device signed names.
        let with_fields = |fields: &[&str]| ExportLeaf {
            fields: fields.iter().map(|f| (*f).to_owned()).collect(),
            ..leaf(grant_hash, "adsco", 2_000)
        };
        assert_eq!(consent_problem(&with_fields(&["phone_pseudonym", "device_model"]), &receipts).1, None);
        assert!(problem(&with_fields(&["phone", "device_model"])).contains("phone was sent although the notice"));
        // A receipt whose notice is not the one its statement signed proves nothing.
        let mut altered = receipts.clone();
        altered[0].notice = altered[0].notice.replace("version: 1", "version: 2");
        let problem = consent_problem(&with_fields(&["device_model"]), &altered).1.unwrap_or_default();
        assert!(problem.contains("not the one the statement signed"), "{problem}");
    }
}
