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
//!   recorded before that time.
//!
//! The head is pinned only when every check passed.

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
    if !statement.in_force(leaf.time_ms) {
        return (seq, Some("the grant was not in force at the export's time".into()));
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
        let Some(wire_head) = &first.head else { return Ok(report) };
        let bad = |e: relay_proto::merkle::MerkleError| MessengerError::Input(format!("export log: {e}"));
        let key = log_key_from_wire(&first.log_key).map_err(bad)?;
        let head = SignedTreeHead::try_from(wire_head).map_err(bad)?;
        let key_hex = hex::encode(key.as_bytes());
        report.log_key = Some(key_hex.clone());
        report.tree_size = head.head.size;
        report.head_time_ms = head.head.timestamp_ms;

        let mut pages = vec![first.clone()];
        let mut page = first;
        let mut start = 0;
        while let Some(next) = next_page(start, &page, head.head.size).map_err(MessengerError::Input)? {
            start = next;
            page = conn.list_exports(head.head.size, next, 0).await?;
            pages.push(page.clone());
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
            if pinned.size > 0 && report.problems.is_empty() {
                let old_root: Option<[u8; 32]> = hex::decode(&pinned.root).ok().and_then(|r| r.try_into().ok());
                let proof = proof_from_wire(&pages[0].consistency).map_err(bad)?;
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
            if verify {
                let proof = proof_from_wire(&entry.proof).map_err(bad)?;
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

    fn receipt(sequence: u64, decision: Decision, recorded_at: u64) -> (Receipt, [u8; 32]) {
        let s = ConsentStatement {
            account: AccountId([1; 16]),
            affiliate: "adsco".into(),
            purpose: Purpose::Advertising,
            decision,
            notice_hash: Purpose::Advertising.notice().hash(),
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
            notice: String::new(),
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
    }
}
