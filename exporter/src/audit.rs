//! The auditor: checks a whole export log, as the exporter stored it, without trusting the exporter.
//!
//! For every entry: the leaf decodes; the statement kept with it is signed by the identity key the account id
//! derives from and its hash is the leaf's consent hash. An export's statement is a grant for exactly the leaf's
//! affiliate and purpose, whose notice hash is the leaf's (version-2 leaves), recorded before the export and in force
//! at the export's time (not expired, notice current), and no later statement for the pair had been recorded before
//! that millisecond; a notice's (withdrawal or erasure) is a withdrawal of exactly its pair recorded before it, and
//! the notice lists no fields; with a catalogue, the leaf's fields are exactly those the
//! catalogue allows. For the tree heads: each signature verifies under the log key, each root is the root over that
//! many entries, consecutive heads are consistent (RFC 6962 consistency proofs, checked with the verifier) and their
//! times do not go back. Every problem is reported with the entry or head it concerns; none is fatal to the audit.
//!
//! The store alone cannot show a log that lost its newest entries together with their heads, nor one rewritten and
//! re-signed by whoever holds `log.key`: both are sound logs. Heads kept outside the store can: a head a user pinned
//! (`relay exports --verify`), the relay's published heads. [`check_external`] fails every such head the log does
//! not extend (its size past the log, or another root over that many entries), and every one that claims a
//! signature that does not verify under the log key.
//!
//! Witnesses ([`audit_witnessed`]): with witness keys configured, the latest head must carry a valid cosignature
//! from each (`relay_proto::witness`). A witness cosigns only heads that extend the last one it cosigned, so a log
//! rewritten and re-signed by whoever holds `log.key` cannot get its new heads cosigned; a witness's own latest
//! checkpoint, read from it (`relay-audit --witness`), is one more head the log must extend, which catches a log
//! rolled back to an older cosigned head.

use ed25519_dalek::VerifyingKey;
use relay_proto::AccountId;
use relay_proto::consent::{self, ConsentStatement, Decision};
use relay_proto::merkle::{ExportLeaf, LeafKind, MerkleLog, leaf_hash, verify_consistency};
use relay_proto::witness::require_cosignatures;
use serde::Serialize;

use crate::affiliates::Catalogue;
use crate::core::{Evidence, LogRecord};
use crate::ids::Pair;
use crate::outbox::{ExporterStore, StoreError};

/// What the audit found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AuditReport {
    /// Log entries examined.
    pub entries: u64,
    /// Signed tree heads examined.
    pub heads: u64,
    /// Size of the latest signed head (entries past it are not yet signed).
    pub signed_size: u64,
    /// Heads from outside the store (user-pinned, the relay's) checked.
    pub external_heads: u64,
    /// Every problem found, each naming its entry or head.
    pub problems: Vec<String>,
}

impl AuditReport {
    /// Whether the log passed.
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }
}

/// A head kept outside the exporter's store, which the log must extend.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct ExternalHead {
    /// Number of entries it covers.
    pub size: u64,
    /// Root over them, hex.
    pub root: String,
    /// When it was signed, if known.
    #[serde(default)]
    pub timestamp_ms: Option<u64>,
    /// Its signature under the log key, hex, if the source kept it (a user's pin does not).
    #[serde(default)]
    pub signature: Option<String>,
    /// The log key the source pinned with it, hex, if any.
    #[serde(default)]
    pub log_key: Option<String>,
}

impl From<&relay_proto::merkle::SignedTreeHead> for ExternalHead {
    fn from(h: &relay_proto::merkle::SignedTreeHead) -> Self {
        Self {
            size: h.head.size,
            root: hex::encode(h.head.root),
            timestamp_ms: Some(h.head.timestamp_ms),
            signature: Some(hex::encode(h.signature)),
            log_key: None,
        }
    }
}

/// Problems of `log` against heads kept elsewhere, each `(where it came from, head)`: a head the log does not extend,
/// a head pinned with another log key, a head whose signature (when it has one) does not verify under `log_key`.
pub fn check_external(log: &MerkleLog, log_key: &VerifyingKey, heads: &[(String, ExternalHead)]) -> Vec<String> {
    let mut problems = Vec::new();
    for (source, head) in heads {
        let name = format!("{source}: head of size {}", head.size);
        let Some(root) = hex::decode(&head.root).ok().and_then(|r| <[u8; 32]>::try_from(r).ok()) else {
            problems.push(format!("{name}: root is not 32 bytes of hex"));
            continue;
        };
        if head.log_key.as_ref().is_some_and(|k| !k.eq_ignore_ascii_case(&hex::encode(log_key.as_bytes()))) {
            problems.push(format!("{name}: pinned with another log key"));
        }
        if let Some(signature) = &head.signature {
            let signed = hex::decode(signature).ok().and_then(|s| <[u8; 64]>::try_from(s).ok()).map(|signature| {
                relay_proto::merkle::SignedTreeHead {
                    head: relay_proto::merkle::TreeHead {
                        size: head.size,
                        root,
                        timestamp_ms: head.timestamp_ms.unwrap_or_default(),
                    },
                    signature,
                }
            });
            if signed.is_none_or(|h| h.verify(log_key).is_err()) {
                problems.push(format!("{name}: signature does not verify under the log key"));
            }
        }
        match log.root_at(head.size) {
            Ok(r) if r == root => {}
            Ok(_) => problems.push(format!(
                "{name}: the log does not extend it (another root over its first {} entries: entries changed)",
                head.size
            )),
            Err(_) => problems.push(format!(
                "{name}: the log does not extend it (the log holds {} entries: entries lost)",
                log.len()
            )),
        }
    }
    problems
}

/// The statement of `evidence` and the SHA-256 of its bytes as signed, if its signature verifies under its identity
/// key (over those bytes, before they are decoded) and the account derives from that key.
fn verified(evidence: &Evidence) -> Result<(ConsentStatement, [u8; 32]), &'static str> {
    let encoded = hex::decode(&evidence.statement).map_err(|_| "statement is not hex")?;
    let key: [u8; 32] = hex::decode(&evidence.identity_key)
        .ok()
        .and_then(|k| k.try_into().ok())
        .ok_or("identity key is not 32 bytes of hex")?;
    let signature = hex::decode(&evidence.signature).map_err(|_| "signature is not hex")?;
    let verifying = VerifyingKey::from_bytes(&key).map_err(|_| "identity key is not an Ed25519 key")?;
    consent::verify_signature(&encoded, &signature, &verifying).map_err(|_| "the user's signature does not verify")?;
    let statement = ConsentStatement::decode_stored(&encoded).map_err(|_| "statement does not decode")?;
    if AccountId::from_identity_key(&key) != statement.account {
        return Err("the statement's account does not derive from the identity key");
    }
    Ok((statement, consent::statement_hash(&encoded)))
}

/// An erasure notice must follow from the account's own signed erasure request, recorded before it, and carry no
/// fields.
fn check_erasure_notice(record: &LogRecord, leaf: ExportLeaf) -> Result<ExportLeaf, String> {
    let (account, hash) =
        crate::core::erasure::verify_evidence(&record.evidence).map_err(|e| format!("erasure evidence: {e}"))?;
    if account != record.account || hash != leaf.consent_hash {
        return Err("the erasure request is another account's, or not the one the leaf names".into());
    }
    if record.evidence.recorded_at_ms > leaf.time_ms || !leaf.fields.is_empty() {
        return Err("an erasure notice sent before its erasure was recorded, or with fields".into());
    }
    Ok(leaf)
}

/// The problem with one entry, if any.
fn check_entry(
    store: &ExporterStore,
    catalogue: Option<&Catalogue>,
    record: &LogRecord,
) -> Result<Result<ExportLeaf, String>, StoreError> {
    let Ok(leaf) = ExportLeaf::decode(&record.leaf) else {
        return Ok(Err("leaf does not decode".into()));
    };
    if leaf.kind == LeafKind::ErasureNotice {
        // Its evidence is the user's signed erasure request, not a consent statement.
        return Ok(check_erasure_notice(record, leaf));
    }
    let (statement, statement_hash) = match verified(&record.evidence) {
        Ok(s) => s,
        Err(e) => return Ok(Err(format!("consent evidence: {e}"))),
    };
    if statement.account != record.account {
        return Ok(Err("the statement is another account's".into()));
    }
    if statement_hash != leaf.consent_hash {
        return Ok(Err("the leaf's consent hash is not the hash of the signed statement".into()));
    }
    if leaf.kind != LeafKind::Export {
        // A notice carries no new data: it must follow from a withdrawal of exactly its pair, recorded before it.
        if statement.decision != Decision::Withdraw {
            return Ok(Err(format!("a {} that does not follow from a withdrawal", leaf.kind.as_str())));
        }
        if statement.affiliate != leaf.affiliate || statement.purpose.as_str() != leaf.purpose {
            return Ok(Err("the withdrawal is for another affiliate or purpose".into()));
        }
        if record.evidence.recorded_at_ms > leaf.time_ms || !leaf.fields.is_empty() {
            return Ok(Err("a notice sent before its withdrawal was recorded, or with fields".into()));
        }
        return Ok(Ok(leaf));
    }
    if leaf.notice_hash.is_some_and(|n| n != statement.notice_hash) {
        return Ok(Err("the leaf's notice hash is not the one its grant signed".into()));
    }
    if statement.decision != Decision::Grant {
        return Ok(Err("the statement is a withdrawal, not a grant".into()));
    }
    if statement.affiliate != leaf.affiliate || statement.purpose.as_str() != leaf.purpose {
        return Ok(Err("the grant is for another affiliate or purpose".into()));
    }
    if record.evidence.recorded_at_ms > leaf.time_ms {
        return Ok(Err("exported before the grant was recorded".into()));
    }
    if !statement.granted_at(leaf.time_ms) {
        return Ok(Err("the grant was not in force at the export's time (not yet made, or expired)".into()));
    }
    // The notice the user signed must be one this exporter made for the pair, and name every field that left.
    let Some(document) = store.notice_document(&statement.notice_hash)? else {
        return Ok(Err("the grant names a notice this exporter never made".into()));
    };
    let Ok(notice) = relay_proto::notice::Notice::decode(&document) else {
        return Ok(Err("the grant's notice does not decode".into()));
    };
    if notice.affiliate != leaf.affiliate || notice.purpose != statement.purpose {
        return Ok(Err("the grant's notice is for another affiliate or purpose".into()));
    }
    if let Some(field) = leaf.fields.iter().find(|f| !notice.fields.iter().any(|n| n.as_str() == f.as_str())) {
        return Ok(Err(format!("fields: {field} left although the notice the user signed does not name it")));
    }
    // And it must still have been the pair's current notice: no later version made before the export.
    let replaced = store
        .made_notices()?
        .into_iter()
        .filter(|m| m.notice.affiliate == notice.affiliate && m.notice.purpose == notice.purpose)
        .filter(|m| m.notice.version > notice.version && m.made_ms > 0)
        .map(|m| m.made_ms)
        .min();
    if let Some(at) = replaced.filter(|at| *at <= leaf.time_ms) {
        return Ok(Err(format!(
            "exported under notice version {} after a later version replaced it (at {})",
            notice.version,
            relay_proto::time::rfc3339(at)
        )));
    }
    // The statement's pair is the leaf's: both were checked above.
    let pair = Pair::new(statement.account, statement.affiliate.clone(), statement.purpose);
    for (sequence, later) in store.statements_of(&pair)? {
        // Strictly before: a statement recorded in the same millisecond as the attempt began may have come after the
        // relay granted the attempt's lease (the fence orders the two; millisecond times cannot).
        if sequence > statement.sequence && later.recorded_at_ms < leaf.time_ms && verified(&later).is_ok() {
            return Ok(Err(format!("statement {sequence} for the pair was recorded before the export")));
        }
    }
    if let Some(catalogue) = catalogue {
        let allowed: Option<Vec<&str>> = catalogue
            .get(&leaf.affiliate)
            .and_then(|a| a.purposes.get(&statement.purpose))
            .map(|fields| fields.iter().map(|f| f.as_str()).collect());
        if allowed.as_deref() != Some(&leaf.fields.iter().map(String::as_str).collect::<Vec<_>>()[..]) {
            return Ok(Err(format!("fields {:?} are not what the catalogue allows", leaf.fields)));
        }
    }
    Ok(Ok(leaf))
}

/// Audits the log in `store` against the exporter's log key (and, if given, the affiliates catalogue).
pub fn audit(
    store: &ExporterStore,
    log_key: &VerifyingKey,
    catalogue: Option<&Catalogue>,
) -> Result<AuditReport, StoreError> {
    audit_against(store, log_key, catalogue, &[])
}

/// [`audit`], and [`check_external`] against `external` heads (user-pinned, the relay's).
pub fn audit_against(
    store: &ExporterStore,
    log_key: &VerifyingKey,
    catalogue: Option<&Catalogue>,
    external: &[(String, ExternalHead)],
) -> Result<AuditReport, StoreError> {
    let mut report = AuditReport::default();
    let mut hashes = Vec::new();
    store.visit_log_records(|index, record| {
        if index != hashes.len() as u64 {
            report.problems.push(format!("entry {index}: out of sequence (expected {})", hashes.len()));
        }
        match record {
            Ok(record) => {
                if let Err(problem) = check_entry(store, catalogue, &record)? {
                    report.problems.push(format!("entry {index}: {problem}"));
                }
                hashes.push(leaf_hash(&record.leaf));
            }
            Err(problem) => {
                report.problems.push(format!("entry {index}: {problem}"));
                hashes.push([0; 32]);
            }
        }
        Ok::<_, StoreError>(())
    })?;
    report.entries = hashes.len() as u64;
    let log = MerkleLog::from_leaf_hashes(hashes);
    let heads = store.heads()?;
    report.heads = heads.len() as u64;
    let mut previous: Option<relay_proto::merkle::TreeHead> = None;
    for signed in &heads {
        let head = signed.head;
        let name = format!("head of size {}", head.size);
        if signed.verify(log_key).is_err() {
            report.problems.push(format!("{name}: signature does not verify under the log key"));
        }
        match log.root_at(head.size) {
            Ok(root) if root == head.root => {}
            Ok(_) => report.problems.push(format!("{name}: root is not the root over the first {} entries", head.size)),
            Err(_) => report.problems.push(format!("{name}: larger than the log ({} entries)", log.len())),
        }
        if let Some(old) = previous {
            let proof = log.consistency_proof(old.size, head.size).unwrap_or_default();
            if verify_consistency(old.size, head.size, &old.root, &head.root, &proof).is_err() {
                report.problems.push(format!("{name}: not consistent with the head of size {}", old.size));
            }
            if head.timestamp_ms < old.timestamp_ms {
                report.problems.push(format!("{name}: signed before the head of size {}", old.size));
            }
        }
        previous = Some(head);
    }
    report.signed_size = previous.map_or(0, |h| h.size);
    report.external_heads = external.len() as u64;
    report.problems.extend(check_external(&log, log_key, external));
    Ok(report)
}

/// [`audit_against`], requiring the latest head to carry a valid cosignature from each of `witnesses`.
pub fn audit_witnessed(
    store: &ExporterStore,
    log_key: &VerifyingKey,
    catalogue: Option<&Catalogue>,
    external: &[(String, ExternalHead)],
    witnesses: &[VerifyingKey],
) -> Result<AuditReport, StoreError> {
    let mut report = audit_against(store, log_key, catalogue, external)?;
    if witnesses.is_empty() {
        return Ok(report);
    }
    let heads = store.heads()?;
    match heads.last() {
        Some(latest) => {
            let cosignatures = store.cosignatures(latest.head.size)?;
            for witness in witnesses {
                if let Err(e) = require_cosignatures(log_key, &latest.head, &cosignatures, &[*witness]) {
                    report.problems.push(format!("latest head: {e}"));
                }
            }
        }
        None if report.entries > 0 => {
            report.problems.push("no signed head: the log's entries are not witnessed".to_owned());
        }
        None => {}
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::{Signer, SigningKey};
    use relay_proto::consent::Purpose;
    use relay_proto::merkle::TreeHead;
    use relay_proto::witness::{Checkpoint, Cosignature, check_checkpoint};

    use super::*;
    use crate::core::Write;
    use crate::ids::WebhookId;

    fn example() -> Catalogue {
        Catalogue::parse(include_str!("../affiliates.example.toml")).expect("catalogue")
    }

    fn advertising_notice() -> [u8; 32] {
        example().notice("adsco", Purpose::Advertising).expect("a notice").hash
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        store: ExporterStore,
        user: SigningKey,
        log_key: SigningKey,
        log: MerkleLog,
        /// A witness of the log, and the last checkpoint it cosigned (it applies the real rule).
        witness: SigningKey,
        checkpoint: Checkpoint,
    }

    fn statement(user: &SigningKey, sequence: u64, decision: Decision, time_ms: u64) -> (ConsentStatement, Evidence) {
        let s = ConsentStatement {
            account: AccountId::from_identity_key(user.verifying_key().as_bytes()),
            affiliate: "adsco".into(),
            purpose: Purpose::Advertising,
            decision,
            notice_hash: advertising_notice(),
            sequence,
            time_ms,
            expires_ms: None,
        };
        let evidence = Evidence {
            statement: hex::encode(s.encode()),
            signature: hex::encode(user.sign(&s.signed_bytes()).to_bytes()),
            identity_key: hex::encode(user.verifying_key().as_bytes()),
            recorded_at_ms: time_ms,
        };
        (s, evidence)
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("dir");
            let store = ExporterStore::open(dir.path()).expect("store");
            store.version_notices(example().notice_terms()).expect("notices");
            Self {
                _dir: dir,
                store,
                user: SigningKey::from_bytes(&[5; 32]),
                log_key: SigningKey::from_bytes(&[6; 32]),
                log: MerkleLog::new(),
                witness: SigningKey::from_bytes(&[7; 32]),
                checkpoint: Checkpoint::empty(),
            }
        }

        /// Submits the latest stored head to the witness, as the exporter does, and stores its cosignature if it
        /// gives one. Returns whether it did.
        fn cosign_latest(&mut self) -> bool {
            let Some(head) = self.store.heads().expect("heads").last().copied() else { return false };
            let old = self.checkpoint.size.min(self.log.len());
            let proof = self.log.consistency_proof(old, head.head.size).unwrap_or_default();
            let log_key = self.log_key.verifying_key();
            match check_checkpoint(&log_key, self.checkpoint, self.checkpoint.size, &proof, &head) {
                Ok(next) => {
                    self.checkpoint = next;
                    let c = Cosignature::sign(&self.witness, &log_key, &head.head, 50);
                    self.store.put_cosignature(head.head.size, &c).expect("cosignature");
                    true
                }
                Err(_) => false,
            }
        }

        /// The audit with the witness's key configured and its latest checkpoint as a head the log must extend.
        fn witnessed_audit(&self) -> Vec<String> {
            let checkpoint = ExternalHead {
                log_key: None,
                size: self.checkpoint.size,
                root: hex::encode(self.checkpoint.root),
                timestamp_ms: None,
                signature: None,
            };
            let external = [("witness".to_owned(), checkpoint)];
            let witnesses = [self.witness.verifying_key()];
            audit_witnessed(&self.store, &self.log_key.verifying_key(), None, &external, &witnesses)
                .expect("audit")
                .problems
        }

        fn account(&self) -> AccountId {
            AccountId::from_identity_key(self.user.verifying_key().as_bytes())
        }

        fn pair(&self) -> Pair {
            Pair::new(self.account(), "adsco", Purpose::Advertising)
        }

        /// Logs an export at `time_ms` under `grant`, then signs a head over the log.
        fn export(&mut self, n: u8, grant: &(ConsentStatement, Evidence), time_ms: u64, fields: &[&str]) {
            self.log_leaf(LeafKind::Export, n, grant, time_ms, fields);
        }

        /// Logs a leaf of `kind` at `time_ms` following from `statement`, then signs a head over the log.
        fn log_leaf(
            &mut self,
            kind: LeafKind,
            n: u8,
            grant: &(ConsentStatement, Evidence),
            time_ms: u64,
            fields: &[&str],
        ) {
            let leaf = ExportLeaf {
                kind,
                notice_hash: Some(grant.0.notice_hash),
                export_id: [n; 16],
                affiliate: "adsco".into(),
                purpose: "advertising".into(),
                fields: fields.iter().map(|f| (*f).to_owned()).collect(),
                payload_hash: [n; 32],
                consent_hash: grant.0.hash(),
                time_ms,
            };
            let encoded = leaf.encode().expect("leaf");
            let record = LogRecord { leaf: encoded.clone(), account: self.account(), evidence: grant.1.clone() };
            let id = WebhookId::from_export_id([n; 16]);
            let settle = Write::Settle { id, pair: self.pair(), delivered: None, record: Box::new(record) };
            self.store.apply(&settle).expect("log");
            self.log.append(&encoded);
            let head = TreeHead { size: self.log.len(), root: self.log.root(), timestamp_ms: u64::from(n) };
            self.store.put_head(&head.sign(&self.log_key)).expect("head");
        }

        fn record_statement(&self, sequence: u64, evidence: &Evidence) {
            let write = Write::Statement { pair: self.pair(), sequence, evidence: evidence.clone() };
            self.store.apply(&write).expect("evidence");
        }

        fn audit(&self) -> AuditReport {
            let catalogue = Catalogue::parse(include_str!("../affiliates.example.toml")).expect("catalogue");
            audit(&self.store, &self.log_key.verifying_key(), Some(&catalogue)).expect("audit")
        }
    }

    const FIELDS: &[&str] = &["phone_pseudonym", "device_model"];

    /// An export logged under a notice version after the exporter had made the next one is reported: the notice
    /// the user signed was no longer the pair's current one.
    #[test]
    fn an_export_under_a_notice_after_its_replacement_is_reported() {
        let mut f = Fixture::new();
        let grant = statement(&f.user, 1, Decision::Grant, 1_000);
        f.record_statement(1, &grant.1);
        let widened = include_str!("../affiliates.example.toml").replace(
            r#"advertising = ["phone_pseudonym", "device_model"]"#,
            r#"advertising = ["phone", "phone_pseudonym", "device_model"]"#,
        );
        let terms = Catalogue::parse(&widened).expect("catalogue").notice_terms();
        let versioned = f.store.version_notices(terms).expect("version 2");
        assert!(
            versioned.iter().any(|n| n.affiliate == "adsco" && n.purpose == Purpose::Advertising && n.version == 2)
        );
        f.export(1, &grant, relay_proto::now_ms() + 60_000, FIELDS);
        f.export(2, &grant, 5_000, FIELDS);
        let report = f.audit();
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert!(
            report.problems[0].contains("entry 0: exported under notice version 1 after a later version"),
            "{:?}",
            report.problems
        );
    }

    #[test]
    fn a_log_of_exports_under_grants_in_force_passes() {
        let mut f = Fixture::new();
        let grant = statement(&f.user, 1, Decision::Grant, 1_000);
        f.record_statement(1, &grant.1);
        for n in 1..=5 {
            f.export(n, &grant, 2_000 + u64::from(n), FIELDS);
        }
        let report = f.audit();
        assert!(report.passed(), "{:?}", report.problems);
        assert_eq!((report.entries, report.heads, report.signed_size), (5, 5, 5));
    }

    /// Withdrawal notices are leaves of their own kind: one that follows from the pair's withdrawal passes; one that
    /// claims to follow from a grant, or lists fields, or precedes its withdrawal, is reported.
    #[test]
    fn withdrawal_notices_must_follow_from_a_withdrawal_of_their_pair() {
        let mut f = Fixture::new();
        let grant = statement(&f.user, 1, Decision::Grant, 1_000);
        let withdraw = statement(&f.user, 2, Decision::Withdraw, 3_000);
        f.record_statement(1, &grant.1);
        f.record_statement(2, &withdraw.1);
        f.export(1, &grant, 2_000, FIELDS);
        f.log_leaf(LeafKind::WithdrawalNotice, 2, &withdraw, 3_500, &[]);
        let report = f.audit();
        assert!(report.passed(), "{:?}", report.problems);
        f.log_leaf(LeafKind::WithdrawalNotice, 3, &grant, 3_600, &[]);
        f.log_leaf(LeafKind::WithdrawalNotice, 4, &withdraw, 3_700, FIELDS);
        f.log_leaf(LeafKind::ErasureNotice, 5, &withdraw, 2_900, &[]);
        let report = f.audit();
        let flagged: Vec<&str> =
            report.problems.iter().filter_map(|p| p.strip_prefix("entry ")?.split(':').next()).collect();
        assert_eq!(flagged, ["2", "3", "4"], "{:?}", report.problems);
    }

    #[test]
    fn exports_after_a_withdrawal_without_a_grant_or_with_other_fields_are_reported() {
        let mut f = Fixture::new();
        let grant = statement(&f.user, 1, Decision::Grant, 1_000);
        let withdraw = statement(&f.user, 2, Decision::Withdraw, 3_000);
        f.record_statement(1, &grant.1);
        f.record_statement(2, &withdraw.1);
        f.export(1, &grant, 2_000, FIELDS);
        f.export(2, &grant, 4_000, FIELDS);
        f.export(3, &withdraw, 5_000, FIELDS);
        f.export(4, &grant, 900, FIELDS);
        f.export(5, &grant, 2_500, &["phone", "device_model"]);
        let mut forged = grant.clone();
        forged.1.signature = hex::encode([0u8; 64]);
        f.export(6, &forged, 2_600, FIELDS);
        let report = f.audit();
        let problems = report.problems.join("\n");
        assert_eq!(report.problems.len(), 5, "{problems}");
        assert!(problems.contains("entry 1: statement 2 for the pair was recorded before the export"), "{problems}");
        assert!(problems.contains("entry 2: the statement is a withdrawal"), "{problems}");
        assert!(problems.contains("entry 3: exported before the grant was recorded"), "{problems}");
        assert!(problems.contains("entry 4: fields"), "{problems}");
        assert!(problems.contains("entry 5: consent evidence: the user's signature does not verify"), "{problems}");
    }

    /// The rollbacks and rewrites that whoever holds `log.key` can make pass the store's own checks; a head kept
    /// outside (a user's pin, the relay's) fails each.
    #[test]
    fn rollbacks_and_re_signed_rewrites_pass_alone_and_fail_against_an_earlier_head() {
        let grant = statement(&SigningKey::from_bytes(&[5; 32]), 1, Decision::Grant, 1_000);
        let honest = || {
            let mut f = Fixture::new();
            f.record_statement(1, &grant.1);
            for n in 1..=3 {
                f.export(n, &grant, 2_000 + u64::from(n), FIELDS);
            }
            f
        };
        let pinned = |f: &Fixture| {
            let head = f.store.heads().expect("heads").last().copied().expect("a head");
            vec![("pin".to_owned(), ExternalHead::from(&head))]
        };
        // Rewrites the log as `leaves` (records from the honest log), re-signing a head per size.
        let rewrite = |f: &mut Fixture, records: Vec<LogRecord>| {
            f.store.drop_log_tail(0).expect("drop");
            f.log = MerkleLog::new();
            for (index, record) in records.into_iter().enumerate() {
                let export_id = ExportLeaf::decode(&record.leaf).expect("leaf").export_id;
                f.store.append_recovered(index as u64, &WebhookId::from_export_id(export_id), &record).expect("append");
                f.log.append(&record.leaf);
                let head = TreeHead { size: f.log.len(), root: f.log.root(), timestamp_ms: 10 + index as u64 };
                f.store.put_head(&head.sign(&f.log_key)).expect("head");
            }
        };
        let records = |f: &Fixture| -> Vec<LogRecord> {
            f.store.log_records(0, 10).expect("records").into_iter().map(|(_, r)| r).collect()
        };

        // The newest entry dropped with its heads.
        let f = honest();
        let pin = pinned(&f);
        f.store.drop_log_tail(2).expect("drop the newest");
        assert!(f.audit().passed(), "alone, the shortened log passes");
        let report = audit_against(&f.store, &f.log_key.verifying_key(), None, &pin).expect("audit");
        assert_eq!(
            report.problems,
            ["pin: head of size 3: the log does not extend it (the log holds 2 entries: entries lost)"]
        );

        // Entry 0 deleted, every head re-signed.
        let mut f = honest();
        let pin = pinned(&f);
        let kept = records(&f).split_off(1);
        rewrite(&mut f, kept);
        assert!(f.audit().passed(), "alone, the re-signed log passes: {:?}", f.audit().problems);
        let problems = audit_against(&f.store, &f.log_key.verifying_key(), None, &pin).expect("audit").problems;
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("does not extend it"), "{problems:?}");

        // An entry's payload hash altered, every head re-signed.
        let mut f = honest();
        let pin = pinned(&f);
        let mut altered = records(&f);
        let mut leaf = ExportLeaf::decode(&altered[1].leaf).expect("leaf");
        leaf.payload_hash = [0xee; 32];
        altered[1].leaf = leaf.encode().expect("leaf");
        rewrite(&mut f, altered);
        assert!(f.audit().passed(), "alone, the re-signed log passes: {:?}", f.audit().problems);
        let problems = audit_against(&f.store, &f.log_key.verifying_key(), None, &pin).expect("audit").problems;
        assert_eq!(
            problems,
            [
                "pin: head of size 3: the log does not extend it (another root over its first 3 entries: entries changed)"
            ]
        );

        // A head that claims a signature it does not have is reported too; the honest log extends its pin.
        let f = honest();
        let mut pin = pinned(&f);
        assert!(audit_against(&f.store, &f.log_key.verifying_key(), None, &pin).expect("audit").passed());
        pin[0].1.signature = Some(hex::encode([1u8; 64]));
        let problems = audit_against(&f.store, &f.log_key.verifying_key(), None, &pin).expect("audit").problems;
        assert_eq!(problems, ["pin: head of size 3: signature does not verify under the log key"]);
    }

    /// The same attacks by a holder of `log.key`, against a log whose heads a witness cosigned: the witness refuses
    /// every rewritten head, and the audit with the witness configured fails each, without any head pinned by a user.
    #[test]
    fn with_a_witness_rollbacks_and_re_signed_rewrites_fail() {
        let grant = statement(&SigningKey::from_bytes(&[5; 32]), 1, Decision::Grant, 1_000);
        let honest = || {
            let mut f = Fixture::new();
            f.record_statement(1, &grant.1);
            for n in 1..=3 {
                f.export(n, &grant, 2_000 + u64::from(n), FIELDS);
                assert!(f.cosign_latest(), "the honest head of size {n} is cosigned");
            }
            f
        };
        // Rewrites the log as `records`, re-signing a head per size and asking the witness to cosign each.
        let rewrite = |f: &mut Fixture, records: Vec<LogRecord>| {
            f.store.drop_log_tail(0).expect("drop");
            f.log = MerkleLog::new();
            let mut cosigned = false;
            for (index, record) in records.into_iter().enumerate() {
                let export_id = ExportLeaf::decode(&record.leaf).expect("leaf").export_id;
                f.store.append_recovered(index as u64, &WebhookId::from_export_id(export_id), &record).expect("append");
                f.log.append(&record.leaf);
                let head = TreeHead { size: f.log.len(), root: f.log.root(), timestamp_ms: 10 + index as u64 };
                f.store.put_head(&head.sign(&f.log_key)).expect("head");
                cosigned |= f.cosign_latest();
            }
            cosigned
        };
        let records = |f: &Fixture| -> Vec<LogRecord> {
            f.store.log_records(0, 10).expect("records").into_iter().map(|(_, r)| r).collect()
        };
        let f = honest();
        assert_eq!(f.witnessed_audit(), Vec::<String>::new(), "the honest, cosigned log passes");

        // (a) The newest entry dropped with its heads and cosignatures: the head of size 2 is still cosigned, but
        // the witness's checkpoint is not extended.
        let mut f = honest();
        f.store.drop_log_tail(2).expect("drop the newest");
        f.log = crate::process::load_log(&f.store).expect("log");
        assert!(f.audit().passed(), "alone, the shortened log passes");
        let problems = f.witnessed_audit();
        assert!(
            problems.iter().any(|p| p.starts_with("witness: head of size 3: the log does not extend it")),
            "{problems:?}"
        );
        // The limit of the key alone: the older head that is now the latest was cosigned, so without the witness's
        // checkpoint the rollback passes.
        let key_only = audit_witnessed(&f.store, &f.log_key.verifying_key(), None, &[], &[f.witness.verifying_key()]);
        assert!(key_only.expect("audit").passed(), "a rollback to a cosigned head passes the key alone");
        // ...and then another entry logged in its place and re-signed: the witness refuses to cosign it.
        let mut replaced = records(&f);
        let mut leaf = ExportLeaf::decode(&replaced[1].leaf).expect("leaf");
        leaf.export_id = [0xaa; 16];
        replaced.push(LogRecord { leaf: leaf.encode().expect("leaf"), ..replaced[1].clone() });
        assert!(!rewrite(&mut f, replaced), "the witness cosigned a rewritten head");
        let problems = f.witnessed_audit();
        assert!(
            problems.iter().any(|p| p.contains("head of size 3 carries no cosignature from witness")),
            "{problems:?}"
        );

        // (b) Entry 0 deleted, every head re-signed.
        let mut f = honest();
        let kept = records(&f).split_off(1);
        assert!(!rewrite(&mut f, kept), "the witness cosigned a rewritten head");
        assert!(f.audit().passed(), "alone, the re-signed log passes");
        let problems = f.witnessed_audit();
        assert!(problems.iter().any(|p| p.contains("carries no cosignature from witness")), "{problems:?}");

        // (c) An entry's payload hash altered, every head re-signed.
        let mut f = honest();
        let mut altered = records(&f);
        let mut leaf = ExportLeaf::decode(&altered[1].leaf).expect("leaf");
        leaf.payload_hash = [0xee; 32];
        altered[1].leaf = leaf.encode().expect("leaf");
        assert!(!rewrite(&mut f, altered), "the witness cosigned a rewritten head");
        assert!(f.audit().passed(), "alone, the re-signed log passes");
        let problems = f.witnessed_audit();
        assert!(problems.iter().any(|p| p.contains("carries no cosignature from witness")), "{problems:?}");

        // A cosignature forged with another key, claiming to be the witness's.
        let f = honest();
        let head = f.store.heads().expect("heads").last().copied().expect("head");
        let mut forged =
            Cosignature::sign(&SigningKey::from_bytes(&[9; 32]), &f.log_key.verifying_key(), &head.head, 1);
        forged.witness_key = f.witness.verifying_key().to_bytes();
        f.store.put_cosignature(3, &forged).expect("forged");
        let problems = f.witnessed_audit();
        assert!(problems.iter().any(|p| p.contains("cosignature does not verify under witness key")), "{problems:?}");
    }

    #[test]
    fn a_tampered_entry_or_head_is_detected() {
        let mut f = Fixture::new();
        let grant = statement(&f.user, 1, Decision::Grant, 1_000);
        for n in 1..=3 {
            f.export(n, &grant, 2_000, FIELDS);
        }
        assert!(f.audit().passed());

        // Rewrite entry 1 with another (still well-formed) field list: every head over it stops matching.
        let mut records = f.store.log_records(1, 1).expect("records");
        let (_, mut record) = records.remove(0);
        let mut leaf = ExportLeaf::decode(&record.leaf).expect("leaf");
        leaf.fields = vec!["device_model".into()];
        record.leaf = leaf.encode().expect("leaf");
        f.store.replace_log_record(1, &record).expect("tamper");
        let problems = f.audit().problems.join("\n");
        assert!(problems.contains("head of size 2: root is not the root"), "{problems}");
        assert!(problems.contains("head of size 3: root is not the root"), "{problems}");

        // A head signed by another key.
        let mut f = Fixture::new();
        f.export(1, &grant, 2_000, FIELDS);
        let forged = TreeHead { size: 1, root: f.log.root(), timestamp_ms: 9 }.sign(&SigningKey::from_bytes(&[7; 32]));
        f.store.put_head(&forged).expect("head");
        let problems = f.audit().problems.join("\n");
        assert!(problems.contains("head of size 1: signature does not verify"), "{problems}");
    }
}
