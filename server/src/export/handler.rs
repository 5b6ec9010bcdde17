//! The export protocol's requests, answered from the consent registry, the directory's profiles and the fence.
//!
//! Contract: an [`ExportHandler`] is built from those three, the relay's copy of the export log, the notices and the
//! group commit (a durability barrier that reads nothing), and nothing else. It holds no `MailboxStore` handle (nor
//! the `Store` or the relay's `Shared` state), so no request of the export protocol can read, write or count a
//! mailbox, whatever it carries (invariant 2 of `docs/exporter.md`). Personal data (a [`Subject`]) leaves only for a
//! pair whose latest statement is a grant in force now, under the pair's current notice; `BeginExport` takes its lease *before* it reads the
//! registry, so it either finishes before a withdrawal is acknowledged or sees the withdrawal and is denied.
//! `SubjectChanges` likewise carries a subject only with the grants of that account in force now. `PublishNotices`
//! replaces the current notices with the exporter's complete set, durably before it is acknowledged. `PublishLog` is
//! acknowledged only once the appended entries are durable; `ErasureChanges` pages through the erasure feed, each
//! request as the user signed it; `ReadLog` returns the log as published (leaves, the
//! account ids the exporter gave with them, signed heads), nothing more.

use std::sync::Arc;
use std::time::Instant;

use relay_proto::consent::{Purpose, statement_hash, valid_affiliate_id};
use relay_proto::merkle::{SignedTreeHead, log_key_from_wire};
use relay_proto::wire::{
    BeginExport, ConsentChange, ConsentChangeList, ConsentChanges, EndExport, ErasureChange, ErasureChangeList,
    ErasureChanges, ExportDenied, ExportEnded, ExportGranted, ExportResponse, LogCopy, LogPublished, NoticesPublished,
    PublishLog, PublishNotices, PublishedEntry, ReadLog, Subject, SubjectChangeList, SubjectChanges,
    export_request::Body as Req, export_response::Body as Resp,
};
use relay_proto::{
    AccountId, MAX_CONSENT_CHANGES, MAX_ERASURE_CHANGES, MAX_PUBLISHED_ENTRIES, MAX_READ_LOG_BYTES,
    MAX_READ_LOG_ENTRIES, MAX_SUBJECT_CHANGES,
};

use crate::fence::{LEASE_TTL, LeaseId, Pair};
use crate::reject::Reject;
use crate::store::consent::Recorded;
use crate::store::directory::AccountKeys;
use crate::store::{AccountProfile, ConsentRegistry, Directory, Durability, Erasures, ExportLog, Notices};

/// Answers export requests. Cheap to share: every connection of the export interface uses the same one.
pub struct ExportHandler {
    consent: ConsentRegistry,
    directory: Directory,
    fence: crate::store::Leases,
    log: ExportLog,
    notices: Notices,
    commit: Arc<dyn Durability>,
    erasures: Erasures,
}

fn resp(body: Resp) -> Result<ExportResponse, Reject> {
    Ok(ExportResponse { body: Some(body) })
}

fn subject(p: AccountProfile) -> Subject {
    Subject { phone: p.phone, device: Some(p.device) }
}

/// The pair named by a request, checked like any peer input.
fn pair(account_id: &[u8], affiliate: &str, purpose: &str) -> Result<Pair, Reject> {
    let account = AccountId::from_slice(account_id).ok_or_else(|| Reject::invalid("account_id must be 16 bytes"))?;
    let purpose = Purpose::parse(purpose).ok_or_else(|| Reject::invalid("unknown purpose"))?;
    if !valid_affiliate_id(affiliate) {
        return Err(Reject::invalid("invalid affiliate id"));
    }
    Ok((account, purpose, affiliate.to_owned()))
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl ExportHandler {
    /// A handler over the consent registry, the directory (for profiles), the withdrawal fence, the export log, the
    /// notices and the group commit: all it may use.
    pub fn new(
        consent: ConsentRegistry,
        directory: Directory,
        fence: crate::store::Leases,
        log: ExportLog,
        notices: Notices,
        commit: Arc<dyn Durability>,
        erasures: Erasures,
    ) -> Self {
        Self { consent, directory, fence, log, notices, commit, erasures }
    }

    /// Answers one request; a refused one becomes an error frame.
    pub async fn handle(&self, body: Option<Req>) -> ExportResponse {
        let reply = match body {
            Some(Req::ConsentChanges(c)) => self.consent_changes(c).await,
            Some(Req::BeginExport(b)) => self.begin_export(b).await,
            Some(Req::EndExport(e)) => self.end_export(e).await,
            Some(Req::SubjectChanges(c)) => self.subject_changes(c).await,
            Some(Req::PublishLog(p)) => self.publish_log(p).await,
            Some(Req::ReadLog(r)) => self.read_log(r).await,
            Some(Req::PublishNotices(p)) => self.publish_notices(p).await,
            Some(Req::ErasureChanges(c)) => self.erasure_changes(c).await,
            None => Err(Reject::invalid("empty or unknown export request")),
        };
        reply.unwrap_or_else(|r| ExportResponse::error(r.code, r.message))
    }

    /// Whether `r` is in force at `now_ms` under its pair's current notice and not objected to (not whether it is the
    /// latest).
    async fn in_force(&self, r: &Recorded, now_ms: u64) -> Result<bool, Reject> {
        let s = &r.statement;
        if !s.granted_at(now_ms) {
            return Ok(false);
        }
        let objection = self.consent.latest_for(&s.account, s.purpose, "").await?;
        Ok(s.in_force(now_ms, self.notices.current_hash(&s.affiliate, s.purpose).await?.as_ref())
            && s.not_objected(objection.as_ref().map(|o| &o.statement)))
    }

    /// Whether `r` is a grant that is the latest statement for its pair and in force at `now_ms`.
    async fn in_force_latest(&self, r: &Recorded, now_ms: u64) -> Result<bool, Reject> {
        if !self.in_force(r, now_ms).await? {
            return Ok(false);
        }
        let s = &r.statement;
        let latest = self.consent.latest_for(&s.account, s.purpose, &s.affiliate).await?;
        Ok(latest.is_some_and(|l| l.statement.sequence == s.sequence))
    }

    async fn consent_changes(&self, c: ConsentChanges) -> Result<ExportResponse, Reject> {
        let now = relay_proto::now_ms();
        let mut changes = Vec::new();
        let mut next_cursor = c.after_cursor;
        for (cursor, r) in self.consent.changes(c.after_cursor, MAX_CONSENT_CHANGES).await? {
            // Past this entry even if it is skipped below, so that the exporter's next page moves on.
            next_cursor = cursor;
            let account = r.statement.account;
            let Some(keys) = self.directory.keys(&account).await? else {
                // Normal after a takeover removed the account; the account id only at debug level, like every line
                // naming one.
                tracing::debug!(%account, "consent statement of an account missing from the directory");
                continue;
            };
            let subject = if self.in_force_latest(&r, now).await? {
                self.directory.profile(&account).await?.map(subject)
            } else {
                None
            };
            changes.push(Self::change(cursor, &keys, r, subject));
        }
        resp(Resp::ConsentChangeList(ConsentChangeList { changes, next_cursor }))
    }

    fn change(
        cursor: u64,
        keys: &AccountKeys,
        r: crate::store::consent::Recorded,
        subject: Option<Subject>,
    ) -> ConsentChange {
        ConsentChange {
            cursor,
            account_id: r.statement.account.as_bytes().to_vec().into(),
            identity_key: keys.identity_key.to_vec().into(),
            statement: r.encoded.into(),
            signature: r.signature.to_vec().into(),
            recorded_at_ms: r.recorded_at_ms,
            subject,
        }
    }

    /// Recorded erasures, as the users signed them: the exporter verifies each itself.
    async fn erasure_changes(&self, c: ErasureChanges) -> Result<ExportResponse, Reject> {
        let mut next_cursor = c.after_cursor;
        let mut changes = Vec::new();
        for (cursor, e) in self.erasures.changes(c.after_cursor, MAX_ERASURE_CHANGES).await? {
            next_cursor = cursor;
            changes.push(ErasureChange {
                cursor,
                account_id: e.account.as_bytes().to_vec().into(),
                identity_key: e.identity_key.to_vec().into(),
                signed: e.signed.into(),
                signature: e.signature.to_vec().into(),
                recorded_at_ms: e.recorded_at_ms,
            });
        }
        resp(Resp::ErasureChangeList(ErasureChangeList { changes, next_cursor }))
    }

    async fn subject_changes(&self, c: SubjectChanges) -> Result<ExportResponse, Reject> {
        let now = relay_proto::now_ms();
        let mut changes = Vec::new();
        let mut next_cursor = c.after_cursor;
        for (cursor, account) in self.directory.subject_changes(c.after_cursor, MAX_SUBJECT_CHANGES).await? {
            next_cursor = cursor;
            let (Some(keys), Some(profile)) =
                (self.directory.keys(&account).await?, self.directory.profile(&account).await?)
            else {
                continue;
            };
            for r in self.consent.latest(&account).await? {
                if self.in_force(&r, now).await? {
                    changes.push(Self::change(cursor, &keys, r, Some(subject(profile.clone()))));
                }
            }
        }
        resp(Resp::SubjectChangeList(SubjectChangeList { changes, next_cursor }))
    }

    async fn publish_log(&self, p: PublishLog) -> Result<ExportResponse, Reject> {
        if p.entries.len() > MAX_PUBLISHED_ENTRIES {
            return Err(Reject::invalid(format!("at most {MAX_PUBLISHED_ENTRIES} entries per publication")));
        }
        let key = log_key_from_wire(&p.log_key).map_err(|e| Reject::invalid(e.to_string()))?;
        let head = p.head.as_ref().ok_or_else(|| Reject::invalid("a publication needs a signed tree head"))?;
        let head = SignedTreeHead::try_from(head).map_err(|e| Reject::invalid(e.to_string()))?;
        let entries = p
            .entries
            .into_iter()
            .map(|e| {
                let account = AccountId::from_slice(&e.account_id)
                    .ok_or_else(|| Reject::invalid("account_id must be 16 bytes"))?;
                Ok((account, e.leaf.to_vec()))
            })
            .collect::<Result<Vec<_>, Reject>>()?;
        let cosignatures = p
            .head
            .as_ref()
            .map(relay_proto::witness::cosignatures_from_wire)
            .transpose()
            .map_err(|e| Reject::invalid(e.to_string()))?
            .unwrap_or_default();
        let size = self.log.publish(p.first_index, &entries, &head, &key, &cosignatures).await?;
        self.commit.durable().await?;
        resp(Resp::LogPublished(LogPublished { size }))
    }

    async fn publish_notices(&self, p: PublishNotices) -> Result<ExportResponse, Reject> {
        let documents: Vec<Vec<u8>> = p.documents.iter().map(|d| d.to_vec()).collect();
        let published = self.notices.publish(&documents).await?;
        self.commit.durable().await?;
        tracing::info!(new = published.new_documents, current = published.current, "notices published");
        resp(Resp::NoticesPublished(NoticesPublished {
            new_documents: u32::try_from(published.new_documents).unwrap_or(u32::MAX),
            current: u32::try_from(published.current).unwrap_or(u32::MAX),
        }))
    }

    /// The relay's copy of the log as published: what the exporter checks its own log against and recovers from.
    /// It names accounts only by id, which the exporter itself supplied.
    async fn read_log(&self, r: ReadLog) -> Result<ExportResponse, Reject> {
        let max = usize::try_from(r.max_entries).unwrap_or(usize::MAX).min(MAX_READ_LOG_ENTRIES);
        let page = self.log.copy(r.start_index, max, MAX_READ_LOG_BYTES).await?;
        let latest = match &page.latest {
            Some(h) => Some(self.log.wire_head(h).await?),
            None => None,
        };
        let mut heads = Vec::with_capacity(page.heads.len());
        for h in &page.heads {
            heads.push(self.log.wire_head(h).await?);
        }
        resp(Resp::LogCopy(LogCopy {
            size: page.size,
            log_key: page.log_key.map(|k| k.to_bytes().to_vec()).unwrap_or_default().into(),
            latest,
            entries: page
                .entries
                .into_iter()
                .map(|(account, leaf)| PublishedEntry {
                    account_id: account.as_bytes().to_vec().into(),
                    leaf: leaf.into(),
                })
                .collect(),
            heads,
        }))
    }

    async fn begin_export(&self, b: BeginExport) -> Result<ExportResponse, Reject> {
        let pair = pair(&b.account_id, &b.affiliate, &b.purpose)?;
        let hash: [u8; 32] =
            b.statement_hash.as_ref().try_into().map_err(|_| Reject::invalid("statement_hash must be 32 bytes"))?;
        // The lease first, then the registry read (the fence's ordering; see the module header).
        let (lease, deadline) = self.fence.acquire(pair.clone(), LEASE_TTL).await?;
        let granted = match self.check_grant(&pair, &hash).await {
            // The lease is durable before the exporter hears of it, so that a restart cannot forget it.
            Ok(Ok(subject)) => self.commit.durable().await.map(|()| Ok(subject)).map_err(Reject::from),
            other => other,
        };
        match granted {
            Ok(Ok(subject)) => {
                tracing::debug!(account = %pair.0, purpose = %pair.1, lease = lease.0, "export lease granted");
                let now = Instant::now();
                let deadline_ms = relay_proto::now_ms().saturating_add(ms(deadline.saturating_duration_since(now)));
                resp(Resp::ExportGranted(ExportGranted {
                    lease_id: lease.0,
                    deadline_ms,
                    subject: Some(subject),
                    valid_for_ms: ms(deadline.saturating_duration_since(now)),
                }))
            }
            Ok(Err(reason)) => {
                self.fence.release(&pair, lease).await;
                resp(Resp::ExportDenied(ExportDenied { reason: reason.into() }))
            }
            Err(reject) => {
                self.fence.release(&pair, lease).await;
                Err(reject)
            }
        }
    }

    /// With the lease held: the subject if the pair's latest statement is `hash` and in force, else why not.
    async fn check_grant(
        &self,
        (account, purpose, affiliate): &Pair,
        hash: &[u8; 32],
    ) -> Result<Result<Subject, &'static str>, Reject> {
        let Some(latest) = self.consent.latest_for(account, *purpose, affiliate).await? else {
            return Ok(Err("no consent recorded for this pair"));
        };
        if statement_hash(&latest.encoded) != *hash {
            return Ok(Err("not the latest statement for this pair"));
        }
        if !self.in_force(&latest, relay_proto::now_ms()).await? {
            return Ok(Err("consent is not in force for this pair"));
        }
        match self.directory.profile(account).await? {
            Some(p) => Ok(Ok(subject(p))),
            None => Ok(Err("no such account")),
        }
    }

    async fn end_export(&self, e: EndExport) -> Result<ExportResponse, Reject> {
        let pair = pair(&e.account_id, &e.affiliate, &e.purpose)?;
        self.fence.release(&pair, LeaseId(e.lease_id)).await;
        resp(Resp::ExportEnded(ExportEnded {}))
    }
}

#[cfg(test)]
mod tests {
    use relay_proto::PhoneNumber;
    use relay_proto::consent::{ConsentStatement, Decision};
    use relay_proto::notice::{Field, Notice, Retention};
    use relay_proto::wire::DeviceInfo;

    use super::*;
    use crate::store::directory::Claim;

    fn handler() -> (ExportHandler, sled::Db) {
        let db = sled::Config::new().temporary(true).open().expect("db");
        let tree = |n: &str| db.open_tree(n).expect("tree");
        let handler = ExportHandler::new(
            Arc::new(crate::store::SledConsentRegistry::new(tree("consent"))),
            Arc::new(crate::store::SledDirectory::new(tree("i"), tree("p"), tree("n"), tree("s"))),
            Arc::new(crate::fence::Fence::default()),
            Arc::new(crate::store::SledExportLog::open(tree("log")).expect("log")),
            Arc::new(crate::store::SledNotices::new(tree("notices"))),
            crate::store::GroupCommit::start(db.clone()),
            Arc::new(crate::store::SledErasures::new(tree("erasures"))),
        );
        (handler, db)
    }

    fn notice(purpose: Purpose, fields: &[Field]) -> Notice {
        Notice {
            version: 1,
            affiliate: "adsco".into(),
            legal_name: "AdsCo SAS".into(),
            country: "FR".into(),
            purpose,
            fields: fields.to_vec(),
            retention: Retention::default_for(purpose),
        }
    }

    async fn publish(h: &ExportHandler, notices: &[Notice]) {
        let documents = notices.iter().map(|n| n.encode().expect("notice").into()).collect();
        match ask(h, Req::PublishNotices(PublishNotices { documents })).await {
            Resp::NoticesPublished(p) => assert_eq!(p.current as usize, notices.len()),
            other => panic!("expected NoticesPublished, got {other:?}"),
        }
    }

    fn grant(account: AccountId, sequence: u64, purpose: Purpose) -> ConsentStatement {
        ConsentStatement {
            account,
            affiliate: "adsco".into(),
            purpose,
            decision: Decision::Grant,
            notice_hash: notice(purpose, &[Field::DeviceModel]).hash().expect("notice"),
            sequence,
            time_ms: relay_proto::now_ms() - 10_000,
            expires_ms: None,
        }
    }

    async fn ask(h: &ExportHandler, body: Req) -> Resp {
        h.handle(Some(body)).await.body.expect("a response")
    }

    fn begin(s: &ConsentStatement) -> Req {
        Req::BeginExport(BeginExport {
            account_id: s.account.as_bytes().to_vec().into(),
            affiliate: s.affiliate.clone(),
            purpose: s.purpose.as_str().into(),
            statement_hash: s.hash().to_vec().into(),
        })
    }

    /// Grants under a notice that has since changed, and grants that have expired, release no personal data and
    /// get no export lease; a current grant does. (The relay refuses to record a grant under an old notice, so an
    /// outdated one can only be a grant recorded before the notice changed, which this test writes directly.)
    #[tokio::test]
    async fn grants_under_a_changed_notice_or_expired_are_not_in_force() {
        let (h, _db) = handler();
        let published: Vec<_> = [Purpose::Advertising, Purpose::Analytics, Purpose::Security]
            .into_iter()
            .map(|p| notice(p, &[Field::DeviceModel]))
            .collect();
        publish(&h, &published).await;
        let keys = AccountKeys { identity_key: [1; 32], sealing_key: [2; 32], sealing_key_signature: None };
        let phone = PhoneNumber::parse("+33612345678").expect("phone");
        let device = DeviceInfo { model: "Pixel 9".into(), os: "Android 16".into(), app_version: "1.0".into() };
        let account = h.directory.register(keys, &phone, device, 1, Claim::FirstCome).await.expect("register").account;

        let stale = ConsentStatement { notice_hash: [7; 32], ..grant(account, 1, Purpose::Advertising) };
        let expired = ConsentStatement {
            expires_ms: Some(relay_proto::now_ms() - 1_000),
            ..grant(account, 2, Purpose::Analytics)
        };
        let current = grant(account, 3, Purpose::Security);
        for s in [&stale, &expired, &current] {
            h.consent.record(&s.encode(), &[0; 64], relay_proto::now_ms()).await.expect("record");
        }

        let Resp::ConsentChangeList(list) = ask(&h, Req::ConsentChanges(ConsentChanges { after_cursor: 0 })).await
        else {
            panic!("expected a change list")
        };
        let with_subject: Vec<u64> = list.changes.iter().filter(|c| c.subject.is_some()).map(|c| c.cursor).collect();
        assert_eq!(with_subject, [3], "only the current grant carries the subject");

        for (s, why) in [(&stale, "changed notice"), (&expired, "expired")] {
            match ask(&h, begin(s)).await {
                Resp::ExportDenied(d) => assert!(d.reason.contains("not in force"), "{why}: {}", d.reason),
                other => panic!("{why}: expected a denial, got {other:?}"),
            }
        }
        match ask(&h, begin(&current)).await {
            Resp::ExportGranted(g) => assert_eq!(g.subject.map(|s| s.phone), Some("+33612345678".into())),
            other => panic!("expected a lease, got {other:?}"),
        }

        // The operator adds the phone number to what AdsCo receives for security: a new notice, and
        // the grant made under the old one stops being in force at once.
        let widened = notice(Purpose::Security, &[Field::Phone, Field::DeviceModel]);
        publish(&h, &[published[0].clone(), published[1].clone(), widened]).await;
        match ask(&h, begin(&current)).await {
            Resp::ExportDenied(d) => assert!(d.reason.contains("not in force"), "{}", d.reason),
            other => panic!("a grant under the old notice: expected a denial, got {other:?}"),
        }
        let Resp::ConsentChangeList(list) = ask(&h, Req::ConsentChanges(ConsentChanges { after_cursor: 0 })).await
        else {
            panic!("expected a change list")
        };
        assert!(list.changes.iter().all(|c| c.subject.is_none()), "no subject under a notice no longer current");
        // A pair the exporter stopped publishing has no notice: nothing is in force for it either.
        publish(&h, &[published[0].clone()]).await;
        assert!(matches!(ask(&h, begin(&current)).await, Resp::ExportDenied(_)));
    }

    /// An objection to a purpose ends every grant for it, to every affiliate, made before it; a lift lets grants made
    /// after it count again, not the old ones.
    #[tokio::test]
    async fn an_objection_voids_the_purposes_grants_until_a_new_grant_after_its_lift() {
        let (h, _db) = handler();
        publish(&h, &[notice(Purpose::Advertising, &[Field::DeviceModel])]).await;
        let keys = AccountKeys { identity_key: [1; 32], sealing_key: [2; 32], sealing_key_signature: None };
        let phone = PhoneNumber::parse("+33612345678").expect("phone");
        let device = DeviceInfo { model: "Pixel 9".into(), os: "Android 16".into(), app_version: "1.0".into() };
        let account = h.directory.register(keys, &phone, device, 1, Claim::FirstCome).await.expect("register").account;
        let purpose_level = |decision, sequence| ConsentStatement {
            affiliate: String::new(),
            decision,
            notice_hash: [0; 32],
            ..grant(account, sequence, Purpose::Advertising)
        };
        let record = async |s: &ConsentStatement| {
            h.consent.record(&s.encode(), &[0; 64], relay_proto::now_ms()).await.expect("record")
        };
        let first = grant(account, 1, Purpose::Advertising);
        record(&first).await;
        assert!(matches!(ask(&h, begin(&first)).await, Resp::ExportGranted(_)));
        record(&purpose_level(Decision::Object, 2)).await;
        assert!(matches!(ask(&h, begin(&first)).await, Resp::ExportDenied(_)), "objected: denied");
        record(&purpose_level(Decision::Lift, 3)).await;
        assert!(matches!(ask(&h, begin(&first)).await, Resp::ExportDenied(_)), "a lift does not revive it");
        let second = grant(account, 4, Purpose::Advertising);
        record(&second).await;
        assert!(matches!(ask(&h, begin(&second)).await, Resp::ExportGranted(_)), "granted again after the lift");
    }

    /// Erasure: once the account is out of the directory, its grant (still in the registry, as evidence) releases
    /// nothing: no lease, no subject in the consent feed; the erasure feed pages its requests in order.
    #[tokio::test]
    async fn an_erased_accounts_grants_are_never_in_force_again() {
        let (h, _db) = handler();
        publish(&h, &[notice(Purpose::Advertising, &[Field::DeviceModel])]).await;
        let keys = AccountKeys { identity_key: [1; 32], sealing_key: [2; 32], sealing_key_signature: None };
        let phone = PhoneNumber::parse("+33612345678").expect("phone");
        let device = DeviceInfo { model: "Pixel 9".into(), os: "Android 16".into(), app_version: "1.0".into() };
        let account = h.directory.register(keys, &phone, device, 1, Claim::FirstCome).await.expect("register").account;
        let g = grant(account, 1, Purpose::Advertising);
        h.consent.record(&g.encode(), &[0; 64], relay_proto::now_ms()).await.expect("record");
        assert!(matches!(ask(&h, begin(&g)).await, Resp::ExportGranted(_)), "in force before the erasure");

        let erasure = crate::store::Erasure {
            account,
            identity_key: [1; 32],
            recorded_at_ms: 5,
            signature: [3; 64],
            signed: relay_proto::auth::delete_transcript(&[4; 32], &account),
        };
        h.erasures.record(&erasure).await.expect("erasure");
        assert_eq!(h.directory.remove(&account).await.expect("remove"), Some(phone.clone()));
        assert_eq!(h.directory.lookup(&phone).await.expect("lookup"), None, "the number is free");

        match ask(&h, begin(&g)).await {
            Resp::ExportDenied(d) => assert!(d.reason.contains("no such account"), "{}", d.reason),
            other => panic!("an erased account's grant: expected a denial, got {other:?}"),
        }
        let Resp::ConsentChangeList(list) = ask(&h, Req::ConsentChanges(ConsentChanges { after_cursor: 0 })).await
        else {
            panic!("expected a change list")
        };
        assert!(list.changes.iter().all(|c| c.subject.is_none()), "no subject of an erased account");
        assert_eq!(h.consent.history(&account).await.expect("history").len(), 1, "the statement stays as evidence");

        let Resp::ErasureChangeList(list) = ask(&h, Req::ErasureChanges(ErasureChanges { after_cursor: 0 })).await
        else {
            panic!("expected an erasure list")
        };
        assert_eq!(list.next_cursor, 1);
        assert_eq!(list.changes.len(), 1);
        assert_eq!(list.changes[0].signed.as_ref(), erasure.signed.as_slice());
        assert_eq!(list.changes[0].account_id.as_ref(), account.as_bytes());
        let Resp::ErasureChangeList(list) = ask(&h, Req::ErasureChanges(ErasureChanges { after_cursor: 1 })).await
        else {
            panic!("expected an erasure list")
        };
        assert!(list.changes.is_empty());
        assert_eq!(list.next_cursor, 1);
    }
}
