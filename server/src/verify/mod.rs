//! Phone-number verification at registration, pluggable (`[registration] verifier`, `relayd --verifier`):
//!
//! - `open`: first come, first served, as before verification existed: a number held by another identity is
//!   `PHONE_TAKEN`. Allowed only when the relay listens on loopback (the config refuses it otherwise unless
//!   `insecure_open_registration` is set): on any real network it lets anyone squat anyone's number.
//! - `file` ([`file`]): each code is written to `<data_dir>/verification/<request id>`; for tests and local demos.
//! - `webhook=URL` ([`webhook`]): each code is posted, Standard-Webhooks-signed, to an SMS gateway on this host.
//!
//! With `file` or `webhook`, `RequestCode` draws a 6-digit code ([`code`]), keeps only its keyed hash, and hands the
//! code to the sender; `Register` for a number the identity does not already hold must carry it. A code expires
//! after 10 minutes and allows 5 `Register` requests, right or wrong; requests are rate-limited per number and per
//! client address. A verified registration takes the number over from whoever held it (`store::directory::Claim`),
//! unless the holder set a registration lock ([`lock`]) and was active within 7 days: then the PIN is needed too.
//!
//! Contract: nothing here logs a phone number, a code or a PIN (request ids and account ids only); the store holds
//! tags and verifiers, never the values. [`Registration`] is the one place these rules are applied; the `Register`
//! handler asks it before writing the directory. Time comes from [`Clock`], the wall clock plus an offset that tests
//! move forward instead of sleeping.

pub mod code;
pub mod file;
pub mod lock;
pub mod webhook;

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use relay_proto::verification::{CODE_ATTEMPTS, FormatError, RegistrationPin, VerificationCode};
use relay_proto::{AccountId, PhoneNumber};

use crate::ratelimit::{RateLimiter, address_key};
use crate::store::{Claim, CommitError, Durability, VerificationStoreError, Verifications};
use code::{Attempt, CodeKey, PendingCode, PhoneTag, RequestId};
use file::FileSender;
use lock::Lock;
use webhook::{WebhookSender, WebhookUrl};

/// Which verifier the relay runs, as written in the config and on the command line (`open`, `file`,
/// `webhook=URL`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum VerifierSpec {
    /// First come, first served; loopback only unless explicitly allowed.
    #[default]
    Open,
    /// Codes written to files in the data directory.
    File,
    /// Codes posted to an SMS gateway.
    Webhook(WebhookUrl),
}

/// Why a verifier spec does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// Not one of the three forms.
    #[error("the verifier must be \"open\", \"file\" or \"webhook=URL\", not {0:?}")]
    Unknown(String),
    /// A bad webhook URL.
    #[error(transparent)]
    Url(#[from] webhook::UrlError),
}

impl FromStr for VerifierSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        match s {
            "open" => Ok(Self::Open),
            "file" => Ok(Self::File),
            _ => match s.strip_prefix("webhook=") {
                Some(url) => Ok(Self::Webhook(url.parse()?)),
                None => Err(SpecError::Unknown(s.to_owned())),
            },
        }
    }
}

impl fmt::Display for VerifierSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Open => f.write_str("open"),
            Self::File => f.write_str("file"),
            Self::Webhook(url) => write!(f, "webhook={url}"),
        }
    }
}

/// The relay's clock for codes and locks: the wall clock, plus an offset that only tests move.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicU64>,
}

impl Clock {
    /// Now, in ms since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        relay_proto::now_ms().saturating_add(self.offset_ms.load(Ordering::Relaxed))
    }

    /// Moves this clock forward by `by` (for tests of expiry and lock periods, instead of waiting).
    #[doc(hidden)]
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.offset_ms.fetch_add(by, Ordering::Relaxed);
    }
}

/// What a verifier delivers: the JSON `{"phone", "code", "expires_at"}` plus the request id that names it.
pub struct CodeMessage<'a> {
    /// The request.
    pub request_id: &'a RequestId,
    /// The number to send the code to.
    pub phone: &'a PhoneNumber,
    /// The code.
    pub code: &'a VerificationCode,
    /// When it expires (ms since the Unix epoch).
    pub expires_at_ms: u64,
    /// Now (ms since the Unix epoch), for the webhook timestamp.
    pub now_ms: u64,
}

impl CodeMessage<'_> {
    /// The JSON body, fields in this order: `{"phone":"+…","code":"123456","expires_at":"<RFC 3339 UTC>"}`.
    pub fn json(&self) -> String {
        #[derive(serde::Serialize)]
        struct Body<'a> {
            phone: &'a str,
            code: &'a str,
            expires_at: String,
        }
        let body = Body {
            phone: self.phone.as_str(),
            code: self.code.as_str(),
            expires_at: relay_proto::time::rfc3339(self.expires_at_ms),
        };
        // Serializing three strings cannot fail; should it, an empty object reaches nobody's phone and shows.
        serde_json::to_string(&body).unwrap_or_else(|_| "{}".to_owned())
    }
}

/// Why a code could not be handed to the verifier.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeliveryError {
    /// The code file could not be written.
    #[error("code file: {0}")]
    File(std::io::Error),
    /// The gateway could not be reached or did not answer 2xx.
    #[error("SMS gateway: {0}")]
    Gateway(String),
}

/// Why a verifier could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The verification key could not be read or created.
    #[error("verification key: {0}")]
    Key(std::io::Error),
    /// The code directory could not be created.
    #[error("code directory: {0}")]
    Directory(std::io::Error),
    /// The webhook secret could not be read or created.
    #[error(transparent)]
    Secret(#[from] webhook::SecretError),
}

/// Why a verification step refused a request (mapped to wire codes in `reject`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// `RequestCode` on a relay that does not verify numbers.
    #[error("this relay registers numbers without verification (open): send Register without a code")]
    NotOffered,
    /// A number this identity does not hold, and no code.
    #[error("this relay verifies phone numbers: request a code (RequestCode), then register with it")]
    Required,
    /// A code or PIN of the wrong form.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// No code can be accepted for this number.
    #[error("no valid code for this number (none requested, expired, or attempts used up): request a new one")]
    NoCode,
    /// The wrong code.
    #[error("wrong code; {left} attempt(s) left{}", if *left == 0 { ": request a new code" } else { "" })]
    BadCode {
        /// Attempts left.
        left: u8,
    },
    /// The holder's registration lock holds and the PIN is missing or wrong.
    #[error(
        "this number has a registration lock: {}; the lock lapses after {} more day(s) without activity of the \
         identity that holds the number; {left} attempt(s) left with this code",
        if *pin_given { "wrong PIN" } else { "give its PIN" },
        remaining_ms.div_ceil(86_400_000)
    )]
    Locked {
        /// Whether a PIN was given (and was wrong).
        pin_given: bool,
        /// How long the lock still holds.
        remaining_ms: u64,
        /// Attempts left with this code.
        left: u8,
    },
    /// Too many code requests from this address.
    #[error("at most {0} code requests per hour from one address")]
    RateLimitedAddress(u32),
    /// Too many code requests for this number.
    #[error("at most {0} code requests per hour for one number")]
    RateLimitedNumber(u32),
    /// The verifier could not take the code.
    #[error("the verifier could not send the code; nothing was sent, try again later")]
    Unavailable(#[source] DeliveryError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] VerificationStoreError),
    /// The store could not make a change durable.
    #[error(transparent)]
    Commit(#[from] CommitError),
    /// The relay is stopping and dropped the work.
    #[error("the relay is shutting down")]
    ShuttingDown,
}

/// Runs `f` (PIN hashing: slow on purpose) on the blocking pool. A panic in it is a bug and goes on as a panic of
/// the calling task, as it would have inline.
async fn off_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, VerifyError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(v) => Ok(v),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(VerifyError::ShuttingDown),
    }
}

/// Rate limits of code requests (see `config::Registration`).
#[derive(Debug, Clone, Copy)]
pub struct CodeLimits {
    /// Code requests per number per hour.
    pub per_number_per_hour: u32,
    /// Code requests per client address (IPv6: per /64) per hour.
    pub per_address_per_hour: u32,
}

enum Sender {
    File(FileSender),
    // Boxed: the signing key is large and there is one sender per relay.
    Webhook(Box<WebhookSender>),
}

impl Sender {
    async fn deliver(&self, message: &CodeMessage<'_>) -> Result<(), DeliveryError> {
        match self {
            Self::File(f) => f.deliver(message).await,
            Self::Webhook(w) => w.deliver(message).await,
        }
    }

    /// The request is over (used, replaced, expired): a code file goes; an SMS cannot be taken back.
    fn withdraw(&self, id: &RequestId) {
        match self {
            Self::File(f) => f.withdraw(id),
            Self::Webhook(_) => {}
        }
    }
}

struct Verified {
    key: CodeKey,
    sender: Sender,
    per_number: RateLimiter<PhoneTag>,
    per_address: RateLimiter<IpAddr>,
    limits: CodeLimits,
}

/// What a registration was admitted on: the directory claim, and the code request to close once it is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// The grounds for the directory write.
    pub claim: Claim,
    /// The code used, if one was: its number's tag and its request.
    pub code: Option<(PhoneTag, RequestId)>,
}

/// The registration rules: verifier, codes, locks.
pub struct Registration {
    verified: Option<Verified>,
    store: Verifications,
    commit: Arc<dyn Durability>,
    clock: Clock,
}

impl Registration {
    /// The rules for `spec`, keeping their state in `store` and `data_dir` (key, secret, code files).
    pub fn open(
        spec: &VerifierSpec,
        data_dir: &Path,
        store: Verifications,
        commit: Arc<dyn Durability>,
        limits: CodeLimits,
    ) -> Result<Self, StartError> {
        let sender = match spec {
            VerifierSpec::Open => None,
            VerifierSpec::File => Some(Sender::File(FileSender::open(data_dir).map_err(StartError::Directory)?)),
            VerifierSpec::Webhook(url) => Some(Sender::Webhook(Box::new(WebhookSender::open(url.clone(), data_dir)?))),
        };
        let verified = match sender {
            Some(sender) => Some(Verified {
                key: CodeKey::load_or_create(data_dir).map_err(StartError::Key)?,
                sender,
                per_number: RateLimiter::per_hour(limits.per_number_per_hour),
                per_address: RateLimiter::per_hour(limits.per_address_per_hour),
                limits,
            }),
            None => None,
        };
        Ok(Self { verified, store, commit, clock: Clock::default() })
    }

    /// The clock codes and locks are judged by.
    pub fn clock(&self) -> Clock {
        self.clock.clone()
    }

    /// `RequestCode`: draws a code for `phone`, replacing any pending one, stores its tag durably, then hands it
    /// to the verifier. If the verifier fails, the request is dropped again.
    pub async fn request_code(&self, phone: &PhoneNumber, peer: IpAddr) -> Result<(RequestId, u64), VerifyError> {
        let v = self.verified.as_ref().ok_or(VerifyError::NotOffered)?;
        let now = Instant::now();
        if !v.per_address.allow(address_key(peer), now) {
            return Err(VerifyError::RateLimitedAddress(v.limits.per_address_per_hour));
        }
        let tag = v.key.phone_tag(phone);
        if !v.per_number.allow(tag, now) {
            return Err(VerifyError::RateLimitedNumber(v.limits.per_number_per_hour));
        }
        let (id, code, now_ms) = (RequestId::random(), code::draw_code(), self.clock.now_ms());
        let pending = PendingCode::new(&v.key, id, &code, now_ms);
        if let Some(old) = self.store.replace_pending(&tag, &pending).await? {
            v.sender.withdraw(&old.request_id);
        }
        self.commit.durable().await?;
        let message = CodeMessage { request_id: &id, phone, code: &code, expires_at_ms: pending.expires_at_ms, now_ms };
        if let Err(e) = v.sender.deliver(&message).await {
            tracing::warn!(request = %id, error = %e, "verification code not delivered");
            self.store.remove_pending(&tag, &id).await?;
            v.sender.withdraw(&id);
            return Err(VerifyError::Unavailable(e));
        }
        // A newer request for the number may have replaced this one while it was being delivered (and found no file
        // to remove yet): then this request's file must not outlive it.
        if self.store.pending_request(&tag).await? != Some(id) {
            v.sender.withdraw(&id);
        }
        tracing::info!(request = %id, "verification code sent");
        Ok((id, pending.expires_at_ms))
    }

    /// Whether `account` may register `phone`, which `holder` holds now, with `code` and `pin` (empty: none).
    /// Uses up one attempt of the number's code whenever a code is needed and given.
    pub async fn admit(
        &self,
        account: AccountId,
        phone: &PhoneNumber,
        holder: Option<AccountId>,
        code: &str,
        pin: &str,
    ) -> Result<Admission, VerifyError> {
        let first_come = Admission { claim: Claim::FirstCome, code: None };
        // Open relays verify nothing; and an identity re-registering the number it holds proved it already.
        let Some(v) = self.verified.as_ref() else { return Ok(first_come) };
        if holder == Some(account) {
            return Ok(first_come);
        }
        if code.is_empty() {
            return Err(VerifyError::Required);
        }
        let code = VerificationCode::parse(code)?;
        let pin = (!pin.is_empty()).then(|| RegistrationPin::parse(pin)).transpose()?;
        let tag = v.key.phone_tag(phone);
        let now_ms = self.clock.now_ms();
        let Some((answer, id)) = self.store.attempt(&tag, now_ms, &|p| v.key.matches(p, &code)).await? else {
            return Err(VerifyError::NoCode);
        };
        // The store dropped a request that expired or whose attempts are used up: its code file goes with it now,
        // whatever becomes of this registration.
        if matches!(answer, Attempt::Expired | Attempt::Wrong { left: 0 } | Attempt::Right { left: 0 }) {
            v.sender.withdraw(&id);
        }
        let left = match answer {
            Attempt::Expired => return Err(VerifyError::NoCode),
            Attempt::Wrong { left } => return Err(VerifyError::BadCode { left }),
            Attempt::Right { left } => left,
        };
        if let Some(holder) = holder
            && let Some(lock) = self.store.lock(&holder).await?
            && lock.holds(now_ms)
        {
            let remaining_ms = lock.remaining_ms(now_ms);
            let locked = |pin_given| VerifyError::Locked { pin_given, remaining_ms, left };
            let Some(pin) = pin else { return Err(locked(false)) };
            if !off_thread(move || lock.verify(&pin)).await? {
                tracing::info!(request = %id, "registration lock PIN refused");
                return Err(locked(true));
            }
        }
        Ok(Admission { claim: Claim::Verified { holder }, code: Some((tag, id)) })
    }

    /// After the directory write of an admitted registration of `account` (not yet durable): closes the code
    /// request, drops the lock of the account it displaced, and counts the registration as `account`'s activity.
    /// Returns the request whose file to remove once the write is durable ([`Registration::withdraw`]).
    pub async fn registered(
        &self,
        admission: &Admission,
        account: &AccountId,
        displaced: Option<AccountId>,
    ) -> Result<Option<RequestId>, VerifyError> {
        if let Some(old) = displaced {
            self.store.set_lock(&old, None).await?;
        }
        self.store.touch(account, self.clock.now_ms()).await?;
        match admission.code {
            Some((tag, id)) => {
                self.store.remove_pending(&tag, &id).await?;
                Ok(Some(id))
            }
            None => Ok(None),
        }
    }

    /// The account is erased: drops its registration lock and any code pending for `phone`, the number it held
    /// (with the code's file). Not yet durable.
    pub async fn forget(&self, account: &AccountId, phone: Option<&PhoneNumber>) -> Result<(), VerifyError> {
        self.store.set_lock(account, None).await?;
        if let (Some(v), Some(phone)) = (&self.verified, phone)
            && let Some(id) = self.store.drop_pending(&v.key.phone_tag(phone)).await?
        {
            v.sender.withdraw(&id);
        }
        Ok(())
    }

    /// Removes what the verifier holds for request `id` (its code file).
    pub fn withdraw(&self, id: &RequestId) {
        if let Some(v) = &self.verified {
            v.sender.withdraw(id);
        }
    }

    /// Counts an authentication as `account`'s activity (what keeps its registration lock holding).
    pub async fn touch(&self, account: &AccountId) -> Result<(), VerifyError> {
        Ok(self.store.touch(account, self.clock.now_ms()).await?)
    }

    /// `SetRegistrationLock`: sets `account`'s lock to `pin`, or removes it when `pin` is empty; durable before it
    /// returns. Whether a lock is now set.
    pub async fn set_lock(&self, account: &AccountId, pin: &str) -> Result<bool, VerifyError> {
        let lock = if pin.is_empty() {
            None
        } else {
            let pin = RegistrationPin::parse(pin)?;
            let now_ms = self.clock.now_ms();
            Some(off_thread(move || Lock::new(&pin, now_ms)).await?)
        };
        self.store.set_lock(account, lock.as_ref()).await?;
        self.commit.durable().await?;
        tracing::debug!(%account, enabled = lock.is_some(), "registration lock changed");
        Ok(lock.is_some())
    }

    /// Removes expired codes (and their files); how many.
    pub async fn sweep(&self) -> Result<usize, VerifyError> {
        let Some(v) = &self.verified else { return Ok(0) };
        let expired = self.store.sweep_expired(self.clock.now_ms()).await?;
        for id in &expired {
            v.sender.withdraw(id);
        }
        Ok(expired.len())
    }

    /// Attempts a new code allows (reported in `CodeSent`).
    pub fn attempts(&self) -> u32 {
        u32::from(CODE_ATTEMPTS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        for s in ["open", "file", "webhook=http://127.0.0.1:8085/sms"] {
            assert_eq!(s.parse::<VerifierSpec>().expect(s).to_string(), s);
        }
        assert!(matches!("sms".parse::<VerifierSpec>(), Err(SpecError::Unknown(_))));
        assert!(matches!("webhook=https://sms.example/x".parse::<VerifierSpec>(), Err(SpecError::Url(_))));
        assert!(matches!("webhook=http://10.0.0.1/x".parse::<VerifierSpec>(), Err(SpecError::Url(_))));
    }

    #[test]
    fn the_code_message_is_the_documented_json() {
        let (id, phone) = (RequestId([0xab; 16]), PhoneNumber::parse("+33612345678").expect("phone"));
        let code = VerificationCode::parse("042042").expect("code");
        let m =
            CodeMessage { request_id: &id, phone: &phone, code: &code, expires_at_ms: 1_795_507_359_132, now_ms: 0 };
        assert_eq!(m.json(), r#"{"phone":"+33612345678","code":"042042","expires_at":"2026-11-24T08:02:39.132Z"}"#);
    }

    /// An erased account's registration lock goes, and so does a code pending for the number it held (with its file).
    #[tokio::test]
    async fn forgetting_an_erased_account_drops_its_lock_and_the_numbers_pending_code() {
        let dir = tempfile::tempdir().expect("dir");
        let db = sled::Config::new().temporary(true).open().expect("db");
        let store: Verifications = Arc::new(crate::store::SledVerifications::new(
            db.open_tree("c").expect("tree"),
            db.open_tree("l").expect("tree"),
        ));
        let commit = crate::store::GroupCommit::start(db);
        let limits = CodeLimits { per_number_per_hour: 5, per_address_per_hour: 5 };
        let r = Registration::open(&VerifierSpec::File, dir.path(), store.clone(), commit, limits).expect("open");
        let phone = PhoneNumber::parse("+33612345678").expect("phone");
        let account = AccountId([3; 16]);
        let (request, _) = r.request_code(&phone, IpAddr::from([127, 0, 0, 1])).await.expect("code");
        r.set_lock(&account, "2468").await.expect("lock");
        let Some(Sender::File(files)) = r.verified.as_ref().map(|v| &v.sender) else { panic!("a file verifier") };
        let file = files.path(&request);
        assert!(file.exists() && store.pending().await == 1 && store.lock(&account).await.expect("lock").is_some());
        r.forget(&account, Some(&phone)).await.expect("forget");
        assert_eq!(store.pending().await, 0, "the pending code is gone");
        assert!(store.lock(&account).await.expect("lock").is_none(), "the lock is gone");
        assert!(!file.exists(), "the code file is gone");
    }
}
