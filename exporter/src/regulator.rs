//! Answers for a regulator: one directory holding what the operator must be able to show about the exports of a
//! period (`relay-audit --regulator-pack DIR --from DATE --to DATE`), written from the exporter's data dir and its
//! catalogue, with nothing but files.
//!
//! Contract: the pack holds
//! - `catalogue.json`: the controller and every affiliate with its country and, per purpose, its fields and
//!   retention — never a webhook secret;
//! - `notices/` and `notices.json`: every notice version the exporter made, each document byte for byte (named by its
//!   SHA-256) with when it became current and, if a later version replaced it, when; those in force during the
//!   period are marked;
//! - `article30.json` and `article30.md`: the record of processing activities (GDPR Article 30(1)) generated from the
//!   catalogue: controller, purposes, categories of data subjects and of personal data, recipients, transfers to
//!   countries outside the EU/EEA, retention, and the technical measures;
//! - `log.json`: the signed tree heads (with the witnesses' cosignatures the exporter holds), and every log entry of
//!   the period with its leaf, its inclusion proof under the latest head and the signed statement that allowed it;
//! - `bodies.jsonl`: every export body delivered in the period that is still within its retention, exactly as posted
//!   (the vault keeps them sealed; a body past its retention, withdrawn or erased is gone, and the pack says how many
//!   entries of the period have no body any more).
//!
//! The directory is created owner-only (0700) and every file in it 0600: it holds personal data. It must not exist
//! yet: a pack is written once.

use std::collections::BTreeSet;
use std::path::Path;

use ed25519_dalek::VerifyingKey;
use relay_proto::merkle::{ExportLeaf, MerkleLog, leaf_hash};
use relay_proto::notice::{FIELDS, Retention};
use serde::Serialize;

use crate::affiliates::{Catalogue, Controller};
use crate::outbox::{ExporterStore, StoreError};
use crate::vault::{Vault, VaultError};

/// ISO 3166-1 alpha-2 codes of the EU and EEA member states: a recipient elsewhere is a transfer to a third country.
pub const EU_EEA: [&str; 30] = [
    "AT", "BE", "BG", "HR", "CY", "CZ", "DK", "EE", "FI", "FR", "DE", "GR", "HU", "IE", "IT", "LV", "LT", "LU", "MT",
    "NL", "PL", "PT", "RO", "SK", "SI", "ES", "SE", "IS", "LI", "NO",
];

/// Why a pack could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PackError {
    /// The catalogue names no controller.
    #[error("the catalogue names no controller: add a [controller] section (name, contact, country)")]
    NoController,
    /// The directory exists already.
    #[error("{0} exists already: a regulator pack is written to a new directory")]
    Exists(String),
    /// The period is empty or reversed.
    #[error("the period is empty: --from must be before --to")]
    Period,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The vault failed.
    #[error(transparent)]
    Vault(#[from] VaultError),
    /// Writing failed.
    #[error("writing the pack: {0}")]
    Io(#[from] std::io::Error),
    /// A proof could not be made (the store's log disagrees with its heads: run the audit).
    #[error("export log: {0}")]
    Log(String),
}

/// What a pack holds, in counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PackSummary {
    /// Log entries in the period.
    pub entries: usize,
    /// Bodies in the period (still within their retention).
    pub bodies: usize,
    /// Entries of the period whose body is gone (retention over, withdrawn, erased, or delivered before bodies were
    /// kept).
    pub without_body: usize,
    /// Notice versions in force during the period.
    pub notices_in_force: usize,
    /// Heads (signed tree heads) in the pack.
    pub heads: usize,
}

/// The record of processing activities, generated from the catalogue.
#[derive(Debug, Clone, Serialize)]
pub struct Article30 {
    /// Controller (Art. 30(1)(a)).
    pub controller: Controller,
    /// When the record was generated (ms since the Unix epoch).
    pub generated_at_ms: u64,
    /// Categories of data subjects (Art. 30(1)(c)).
    pub data_subjects: String,
    /// One activity per purpose (Art. 30(1)(b)–(g)).
    pub activities: Vec<Activity>,
    /// Technical and organisational security measures (Art. 30(1)(g)).
    pub security_measures: Vec<String>,
}

/// One processing activity: a purpose, with its recipients.
#[derive(Debug, Clone, Serialize)]
pub struct Activity {
    /// The purpose.
    pub purpose: String,
    /// Lawful basis.
    pub lawful_basis: String,
    /// Categories of personal data disclosed for it (the union of the recipients' fields).
    pub data_categories: Vec<String>,
    /// Recipients.
    pub recipients: Vec<Recipient>,
}

/// One recipient of one activity.
#[derive(Debug, Clone, Serialize)]
pub struct Recipient {
    /// Affiliate id.
    pub affiliate: String,
    /// Legal name.
    pub legal_name: String,
    /// Country.
    pub country: String,
    /// Whether that is a transfer to a country outside the EU/EEA (Art. 30(1)(e)).
    pub third_country_transfer: bool,
    /// Fields it receives.
    pub fields: Vec<String>,
    /// How long it may keep them (Art. 30(1)(f)).
    pub retention: String,
}

/// The Article 30 record of `catalogue` (`None` without a controller).
pub fn article30(catalogue: &Catalogue, now_ms: u64) -> Option<Article30> {
    let controller = catalogue.controller()?.clone();
    let mut activities = Vec::new();
    for purpose in relay_proto::consent::PURPOSES {
        let recipients: Vec<Recipient> = catalogue
            .iter()
            .filter_map(|a| {
                let fields = a.purposes.get(&purpose)?;
                let retention = a.retention.get(&purpose).copied().unwrap_or(Retention::default_for(purpose));
                Some(Recipient {
                    affiliate: a.id.clone(),
                    legal_name: a.name.clone(),
                    country: a.country.clone(),
                    third_country_transfer: !EU_EEA.contains(&a.country.as_str()),
                    fields: fields.iter().map(|f| f.as_str().to_owned()).collect(),
                    retention: retention.to_string(),
                })
            })
            .collect();
        if recipients.is_empty() {
            continue;
        }
        let used: BTreeSet<&str> = recipients.iter().flat_map(|r| r.fields.iter().map(String::as_str)).collect();
        activities.push(Activity {
            purpose: purpose.as_str().to_owned(),
            lawful_basis: "consent (GDPR Art. 6(1)(a)), given per affiliate and purpose under a notice naming the \
                           recipient, the fields and the retention; withdrawable at any time"
                .into(),
            data_categories: FIELDS
                .iter()
                .filter(|f| used.contains(f.as_str()))
                .map(|f| format!("{} ({})", f.as_str(), f.describe()))
                .collect(),
            recipients,
        });
    }
    Some(Article30 {
        controller,
        generated_at_ms: now_ms,
        data_subjects: "users of the messaging service who granted consent to an affiliate for a purpose".into(),
        activities,
        security_measures: vec![
            "messages are end-to-end encrypted; the relay never reads them, and the exporter cannot reach them".into(),
            "every export is checked against the user's signed consent statement at send time, under a lease that \
             a withdrawal waits for"
                .into(),
            "every export is a leaf of an append-only Merkle log whose signed heads users, affiliates and \
             independent witnesses hold"
                .into(),
            "webhooks are signed (Standard Webhooks) and sent over TLS, or plain HTTP on the same host only".into(),
            "delivered bodies are kept encrypted at rest (ChaCha20-Poly1305) for the notice's retention and then \
             deleted"
                .into(),
        ],
    })
}

/// The record as Markdown, for people.
pub fn article30_markdown(r: &Article30) -> String {
    let mut out = format!(
        "# Record of processing activities (GDPR Article 30)\n\nGenerated {} from the exporter's catalogue.\n\n\
         ## Controller\n\n{} ({}), contact: {}\n\n## Data subjects\n\n{}\n",
        relay_proto::time::rfc3339(r.generated_at_ms),
        r.controller.name,
        r.controller.country,
        r.controller.contact,
        r.data_subjects
    );
    for a in &r.activities {
        out.push_str(&format!(
            "\n## Purpose: {}\n\nLawful basis: {}\n\nData: {}\n\n| recipient | country | third country | fields | \
             retention |\n|---|---|---|---|---|\n",
            a.purpose,
            a.lawful_basis,
            a.data_categories.join("; ")
        ));
        for r in &a.recipients {
            out.push_str(&format!(
                "| {} ({}) | {} | {} | {} | {} |\n",
                r.legal_name,
                r.affiliate,
                r.country,
                if r.third_country_transfer { "yes: safeguards required" } else { "no" },
                r.fields.join(", "),
                r.retention
            ));
        }
    }
    out.push_str("\n## Security measures\n\n");
    for m in &r.security_measures {
        out.push_str(&format!("- {m}\n"));
    }
    out
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    relay_quic::durable_file::create_secret(path, bytes)
}

fn json(value: &impl Serialize) -> Vec<u8> {
    // Values made of strings, numbers and vectors always serialise.
    serde_json::to_vec_pretty(value).unwrap_or_default()
}

/// Writes the pack for `[from_ms, to_ms)` into the new directory `dir` (see the module contract).
pub fn write_pack(
    dir: &Path,
    store: &ExporterStore,
    log_key: &VerifyingKey,
    catalogue: &Catalogue,
    vault: Option<&Vault>,
    from_ms: u64,
    to_ms: u64,
) -> Result<PackSummary, PackError> {
    if from_ms >= to_ms {
        return Err(PackError::Period);
    }
    let record = article30(catalogue, relay_proto::now_ms()).ok_or(PackError::NoController)?;
    if dir.exists() {
        return Err(PackError::Exists(dir.display().to_string()));
    }
    std::fs::create_dir_all(dir)?;
    relay_quic::durable_file::private_dir(dir)?;
    let mut summary = PackSummary::default();

    // The catalogue, without secrets or endpoints' credentials.
    let affiliates: Vec<serde_json::Value> = catalogue
        .iter()
        .map(|a| {
            let purposes: serde_json::Map<String, serde_json::Value> = a
                .purposes
                .iter()
                .map(|(p, fields)| {
                    let retention = a.retention.get(p).copied().unwrap_or(Retention::default_for(*p));
                    let fields: Vec<&str> = fields.iter().map(|f| f.as_str()).collect();
                    (p.as_str().to_owned(), serde_json::json!({"fields": fields, "retention": retention.to_string()}))
                })
                .collect();
            serde_json::json!({"id": a.id, "legal_name": a.name, "country": a.country, "purposes": purposes})
        })
        .collect();
    write_private(
        &dir.join("catalogue.json"),
        &json(&serde_json::json!({"controller": catalogue.controller(), "affiliates": affiliates})),
    )?;

    // Every notice version, with when it was current.
    let notices_dir = dir.join("notices");
    std::fs::create_dir(&notices_dir)?;
    relay_quic::durable_file::private_dir(&notices_dir)?;
    let made = store.made_notices()?;
    let mut index = Vec::new();
    for n in &made {
        let hash = relay_proto::notice::notice_hash(&n.document);
        let replaced_ms = made
            .iter()
            .filter(|o| {
                o.notice.affiliate == n.notice.affiliate
                    && o.notice.purpose == n.notice.purpose
                    && o.notice.version > n.notice.version
            })
            .map(|o| o.made_ms)
            .min();
        let in_force = n.made_ms < to_ms && replaced_ms.is_none_or(|r| r > from_ms);
        summary.notices_in_force += usize::from(in_force);
        write_private(&notices_dir.join(format!("{}.txt", hex::encode(hash))), &n.document)?;
        index.push(serde_json::json!({
            "hash": hex::encode(hash),
            "affiliate": n.notice.affiliate,
            "purpose": n.notice.purpose.as_str(),
            "version": n.notice.version,
            "current_from_ms": n.made_ms,
            "replaced_at_ms": replaced_ms,
            "in_force_in_period": in_force,
        }));
    }
    write_private(&dir.join("notices.json"), &json(&index))?;

    write_private(&dir.join("article30.json"), &json(&record))?;
    write_private(&dir.join("article30.md"), article30_markdown(&record).as_bytes())?;

    // The log: heads with cosignatures, and the period's entries with proofs under the latest head.
    let heads = store.heads()?;
    let mut hashes = Vec::new();
    let mut period = Vec::new();
    store.visit_log(|index, record| {
        hashes.push(leaf_hash(&record.leaf));
        if let Ok(leaf) = ExportLeaf::decode(&record.leaf)
            && (from_ms..to_ms).contains(&leaf.time_ms)
        {
            period.push((index, record.clone(), leaf));
        }
        Ok::<(), StoreError>(())
    })?;
    let log = MerkleLog::from_leaf_hashes(hashes);
    let latest = heads.last().copied();
    let mut entries = Vec::new();
    let kept = match vault {
        Some(v) => v.delivered_between(from_ms, to_ms)?,
        None => Vec::new(),
    };
    for (index, record, leaf) in &period {
        let proof = match latest {
            Some(h) if *index < h.head.size => Some(
                log.inclusion_proof(*index, h.head.size)
                    .map_err(|e| PackError::Log(e.to_string()))?
                    .iter()
                    .map(hex::encode)
                    .collect::<Vec<_>>(),
            ),
            _ => None,
        };
        let id = crate::ids::WebhookId::from_export_id(leaf.export_id).to_string();
        let has_body = kept.iter().any(|k| k.id == id);
        if leaf.kind == relay_proto::merkle::LeafKind::Export && !has_body {
            summary.without_body += 1;
        }
        entries.push(serde_json::json!({
            "index": index,
            "webhook_id": id,
            "account": record.account.to_string(),
            "kind": format!("{:?}", leaf.kind),
            "affiliate": leaf.affiliate,
            "purpose": leaf.purpose,
            "fields": leaf.fields,
            "time_ms": leaf.time_ms,
            "notice_hash": leaf.notice_hash.map(hex::encode),
            "consent_hash": hex::encode(leaf.consent_hash),
            "leaf": hex::encode(&record.leaf),
            "inclusion_proof": proof,
            "consent_evidence": record.evidence,
            "body_kept": has_body,
        }));
    }
    summary.entries = entries.len();
    let mut head_values = Vec::new();
    for h in &heads {
        let cosignatures = store.cosignatures(h.head.size)?;
        head_values.push(crate::feed::log_head(log_key, h, &cosignatures));
    }
    summary.heads = head_values.len();
    write_private(
        &dir.join("log.json"),
        &json(&serde_json::json!({
            "log_key": hex::encode(log_key.as_bytes()),
            "period": {"from_ms": from_ms, "to_ms": to_ms},
            "latest_head_size": latest.map(|h| h.head.size),
            "heads": head_values,
            "entries": entries,
        })),
    )?;

    let mut lines = Vec::new();
    for k in &kept {
        lines.extend(serde_json::to_vec(k).unwrap_or_default());
        lines.push(b'\n');
    }
    summary.bodies = kept.len();
    write_private(&dir.join("bodies.jsonl"), &lines)?;
    write_private(&dir.join("summary.json"), &json(&summary))?;
    write_private(&dir.join("README.txt"), readme(from_ms, to_ms, &summary).as_bytes())?;
    Ok(summary)
}

fn readme(from_ms: u64, to_ms: u64, s: &PackSummary) -> String {
    format!(
        "Consent Relay regulator pack: exports from {} to {} (UTC, end excluded).\n\n\
         catalogue.json   controller and affiliates (countries, fields and retention per purpose); no secrets\n\
         notices/         every notice version, byte for byte, named by its SHA-256 (notices.json: when current)\n\
         article30.json   record of processing activities (GDPR Art. 30(1)), also as article30.md\n\
         log.json         signed tree heads (with witness cosignatures) and the period's {} log entries, each with\n\
         \x20                its leaf, inclusion proof under the latest head and the user-signed consent statement\n\
         bodies.jsonl     the {} export bodies of the period still within their retention, exactly as delivered\n\
         \x20                ({} exports of the period have no body any more: retention over, withdrawn or erased)\n\n\
         To check the log independently: every leaf's SHA-256(0x00 || leaf) with its inclusion proof must lead to the\n\
         latest head's root (RFC 6962), the head's signature must verify under log_key (docs/protocol.md 10), and each\n\
         consent statement's signature under the user's identity key it names (docs/protocol.md 9). With the\n\
         exporter's data dir: relay-audit --exporter-data DIR --affiliates FILE.\n",
        relay_proto::time::date(from_ms),
        relay_proto::time::date(to_ms),
        s.entries,
        s.bodies,
        s.without_body
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../affiliates.example.toml");

    #[test]
    fn the_record_names_recipients_countries_transfers_and_retention() {
        let text = EXAMPLE.replace("country = \"DE\"", "country = \"US\"");
        let catalogue = Catalogue::parse(&text).expect("catalogue");
        let record = article30(&catalogue, 0).expect("a controller");
        let security = record.activities.iter().find(|a| a.purpose == "security").expect("security");
        let shield = &security.recipients[0];
        assert_eq!((shield.legal_name.as_str(), shield.country.as_str()), ("ShieldCo GmbH", "US"));
        assert!(shield.third_country_transfer, "the US is outside the EU/EEA");
        assert_eq!(shield.retention, "90 days");
        let ads = record.activities.iter().find(|a| a.purpose == "advertising").expect("advertising");
        assert!(!ads.recipients[0].third_country_transfer, "FR is inside");
        assert!(ads.data_categories.iter().any(|c| c.starts_with("phone_pseudonym")));
        assert!(record.activities.iter().all(|a| a.purpose != "business_messaging"), "no recipient, no activity");
        let md = article30_markdown(&record);
        assert!(md.contains("| ShieldCo GmbH (shieldco) | US | yes: safeguards required |"), "{md}");
    }

    #[test]
    fn no_controller_no_record() {
        let block =
            "[controller]\nname = \"Consent Relay Operator SAS\"\ncontact = \"dpo@relay.example\"\ncountry = \"FR\"\n";
        assert!(EXAMPLE.contains(block));
        let without = EXAMPLE.replace(block, "");
        let catalogue = Catalogue::parse(&without).expect("catalogue");
        assert!(catalogue.controller().is_none());
        assert!(article30(&catalogue, 0).is_none());
    }
}
