//! The exporter's rules, free of I/O: what to do with a change read from the relay's feeds, and how each delivery
//! attempt goes (lease → in flight → post → release → settle). Events go in, each with the current time; effects
//! come out, for a driver to perform in order (`crate::process` over sled, QUIC and HTTP; an in-memory pair in the
//! tests). Nothing here touches a disk, a socket or a clock; the randomness of retry jitter and event nonces comes
//! from an injected [`Entropy`].
//!
//! Events: [`Core::handle_change`], [`Core::handle_erasure`] (see [`erasure`]) and [`Core::page_done`] for the feeds; for deliveries, [`Core::plan_deliveries`]
//! then, attempt by attempt, [`Core::poll_attempt`] and the answers to the questions its effects ask:
//! [`Core::handle_lease`] (the relay's answer to [`Effect::AskLease`]), [`Core::handle_lease_check`] (the time once
//! the flush before a request is done, [`Effect::CheckLease`]), [`Core::handle_answer`] (the affiliate's answer to
//! [`Effect::Post`]) and [`Core::handle_released`] (once [`Effect::ReleaseLease`] is done, whatever the relay said).
//! An attempt asks one question at a time, and a question is always the last effect of its batch.
//!
//! Two clocks: wall-clock times (`now_ms`, ms since the Unix epoch) date log entries, events and retries; a lease is
//! counted on the exporter's monotonic clock (`mono_ms`, ms since any fixed point of this process), which does not
//! jump, from the moment the lease was asked for, for as long as the relay says it has left
//! ([`Lease::valid_for_ms`]).
//!
//! Contract (the withdrawal fence and the crash rules, `docs/exporter.md`):
//! - An export is posted only inside a lease asked for immediately before that attempt, and the lease is released
//!   after the attempt. The lease's deadline is the time it was asked for plus what the relay said it has left, on
//!   the monotonic clock. An attempt goes on to the flush before its request only with [`LEASE_NEEDED`] left, and
//!   the request starts only if, once that flush is done, [`POST_NEEDED`] is still left (the whole
//!   [`HTTP_TIMEOUT`] and [`CLOCK_SLACK`]); otherwise nothing is sent, the lease is released and the export
//!   retried. Withdrawal notices carry no data and need no lease.
//! - Durability is ordering: the driver performs effects one after the other, and an effect runs only once the ones
//!   before it are done; after a [`Effect::Flush`], every write before it is durable. Before an export request
//!   leaves, its entry is written as [`EntryState::InFlight`] and flushed ([`Write::Put`], [`Effect::Flush`],
//!   [`Effect::CheckLease`], then [`Effect::Post`]), so an export whose answer never comes (a crash, a lost connection) is known after a restart.
//! - An entry leaves the outbox only on a 2xx answer, a denial of its lease, a withdrawal of its pair (or a newer
//!   export superseding it), or its affiliate leaving the catalogue. An export that leaves any way but the last
//!   after an attempt that got no answer is logged as delivered, at that attempt's time, since the affiliate may
//!   hold it; a 2xx is logged at the answered attempt's time. Logging and removal are one [`Write::Settle`], which
//!   the store performs log first, durably, then the removal.
//! - A failed attempt is retried after [`backoff`] (1 s doubling to 10 min, with jitter), under the same webhook id
//!   and with the same body. A withdrawal or erasure notice is retried only for [`Core::set_notice_retry_for`] (default
//!   [`NOTICE_RETRY_FOR`], 7 days) from when it was queued: its first failure after that abandons it (out of the
//!   outbox, counted in [`Core::abandoned`], an `error!` line naming its webhook id and affiliate).
//! - Changes and deliveries take turns: no change is applied while an attempt is under way.
//!
//! Logs (through `tracing`) carry webhook ids and counts, never personal data.

mod changes;
pub mod delivered;
pub mod entry;
pub mod erasure;
pub mod retry;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

pub use changes::{Applied, CheckedChange, ExportMarker, Known};
pub use delivered::Delivered;
pub use entry::{
    Attempt, Entry, EntryState, Evidence, InFlight, Kind, Lease, Leased, LogRecord, Reached, TransitionError,
    UnloggableError,
};
pub use erasure::{AccountRecords, CheckedErasure, Erased};
pub use retry::{Entropy, RETRY_BASE, RETRY_MAX, SystemEntropy, backoff};

use relay_proto::consent::ConsentStatement;

use crate::affiliates::Catalogue;
use crate::feed::Feed;
use crate::ids::{Pair, WebhookId};

/// Bound of one webhook request (connect, TLS, send, status line); the socket is torn down when it fires.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// What the flush that marks an export in flight, before its request, may take out of the lease before the
/// request can no longer start (it is checked again after the flush, so a slower disk only costs a retry).
pub const FLUSH_BOUND: Duration = Duration::from_secs(5);
/// Slack for the two clocks' rates, timer lateness and tearing the socket down once the timeout fires.
pub const CLOCK_SLACK: Duration = Duration::from_secs(2);
/// Lease time that must be left, once the flush before the request is done, for the request to start.
pub const POST_NEEDED: Duration = HTTP_TIMEOUT.saturating_add(CLOCK_SLACK);
/// Lease time that must be left when the relay's grant arrives for the attempt to go on: 17 s, within the relay's
/// `LEASE_TTL` (30 s) with room for the lease request's own round trip.
pub const LEASE_NEEDED: Duration = POST_NEEDED.saturating_add(FLUSH_BOUND);
/// How long a withdrawal notice is retried, from when it was queued, before it is abandoned.
pub const NOTICE_RETRY_FOR: Duration = Duration::from_secs(7 * 24 * 3600);
/// Deliveries attempted per pass.
pub const DELIVERIES_PER_PASS: usize = 64;

/// The relay's answer to [`Effect::AskLease`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseAnswer {
    /// The lease is held until released or until its deadline.
    Granted(Lease),
    /// The statement is no longer the pair's latest in force (withdrawn, expired, superseded).
    Denied {
        /// The relay's reason, for the log.
        reason: String,
    },
    /// No answer: the request or the connection failed. The attempt ends and the entry stays as it was.
    Failed,
}

/// The affiliate's answer to [`Effect::Post`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// An HTTP status: 2xx means the affiliate took the event.
    Status(u16),
    /// Nothing of the request left (connecting or the TLS handshake failed).
    NotSent(String),
    /// The request may have arrived, but no status came back (the connection failed, the request timed out).
    Unknown(String),
}

/// Something the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Write to the store: visible to the driver's lookups at once, durable at the next [`Effect::Flush`].
    Write(Write),
    /// Make every write before this one durable before going on.
    Flush,
    /// Ask the relay for an export lease on `pair` for the statement `statement_hash` (`BeginExport`); answer with
    /// [`Core::handle_lease`].
    AskLease {
        /// The pair.
        pair: Pair,
        /// The statement the export follows from.
        statement_hash: [u8; 32],
    },
    /// The export's entry is durably in flight: tell the core the monotonic time now, with
    /// [`Core::handle_lease_check`], which decides whether its request may still start inside the lease.
    CheckLease {
        /// The webhook id.
        id: WebhookId,
    },
    /// Post `body` under webhook id `id` to `affiliate`'s endpoint, signed; answer with [`Core::handle_answer`].
    Post {
        /// The webhook id.
        id: WebhookId,
        /// The affiliate's id in the catalogue.
        affiliate: String,
        /// The body, exactly as stored.
        body: String,
    },
    /// Release `lease` on `pair` (`EndExport`); then call [`Core::handle_released`], whatever the relay answered.
    ReleaseLease {
        /// The pair.
        pair: Pair,
        /// The lease.
        lease: Lease,
    },
}

/// A write to the exporter's store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Keep a verified statement of `pair` as audit evidence.
    Statement {
        /// The pair.
        pair: Pair,
        /// The statement's sequence number.
        sequence: u64,
        /// The statement as the relay recorded it.
        evidence: Evidence,
    },
    /// Store `entry` under `id` (a new entry, or its new state).
    Put {
        /// The webhook id.
        id: WebhookId,
        /// The entry.
        entry: Box<Entry>,
    },
    /// Remove the entry under `id` (delivered notice, or dropped without a log record).
    Remove {
        /// The webhook id.
        id: WebhookId,
    },
    /// Append `record` to the export log unless `id` is logged already, durably; then remove the entry under `id`
    /// and add `delivered` (an export's) to what `pair`'s affiliate received.
    Settle {
        /// The export's (or notice's) webhook id.
        id: WebhookId,
        /// Its pair.
        pair: Pair,
        /// How an export identified the user to the affiliate (what a later withdrawal notice carries); `None` for
        /// a notice, which gives the affiliate nothing new.
        delivered: Option<Delivered>,
        /// The log record.
        record: Box<LogRecord>,
    },
    /// Record what was last queued for `pair`.
    SetExported {
        /// The pair.
        pair: Pair,
        /// What was queued.
        marker: ExportMarker,
    },
    /// Forget what was queued for `pair` (at its withdrawal).
    ForgetExported {
        /// The pair.
        pair: Pair,
    },
    /// Forget that `pair` was delivered (once its withdrawal notice is queued).
    ForgetDelivered {
        /// The pair.
        pair: Pair,
    },
    /// Delete the delivered bodies kept for `account` (erasure).
    EraseBodies {
        /// The erased account.
        account: relay_proto::AccountId,
    },
    /// Mark `account` erased, with the signed request as evidence: no grant of it exports anything any more.
    Erased {
        /// The erased account.
        account: relay_proto::AccountId,
        /// The signed erasure request.
        evidence: Evidence,
    },
    /// Move `feed`'s cursor to `cursor`.
    Cursor {
        /// The feed.
        feed: Feed,
        /// Its new cursor.
        cursor: u64,
    },
}

/// Why the core refused an event: the driver called it out of turn. Never caused by what a peer sends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CoreError {
    /// A change arrived while the attempt for this entry was under way.
    #[error("attempt for {0} under way")]
    Busy(WebhookId),
    /// An answer arrived to a question that was not asked.
    #[error("{0} without a question asked for it")]
    Unasked(&'static str),
    /// An entry's state does not allow the step.
    #[error(transparent)]
    Transition(#[from] TransitionError),
    /// An export to log lacks what its record needs.
    #[error(transparent)]
    Unloggable(#[from] UnloggableError),
}

/// The attempt under way, by the question it waits on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Current {
    /// Waiting for the relay's answer to the lease asked for the export `id`, begun at `started_ms`.
    Leasing { id: WebhookId, started_ms: u64 },
    /// Waiting for the flush before the request of `id` to be done; the lease lapses at `deadline` (monotonic ms).
    Starting { id: WebhookId, deadline: u64 },
    /// Waiting for the affiliate's answer to the request for `id`.
    Posting { id: WebhookId },
    /// Waiting for the affiliate's answer to notice `id`, whose attempt began at `started_ms`.
    Notifying { id: WebhookId, started_ms: u64 },
    /// Waiting for the lease of `id` to be released, then settling it.
    Releasing { id: WebhookId, settle: Settle },
}

impl Current {
    fn id(&self) -> WebhookId {
        match self {
            Current::Leasing { id, .. }
            | Current::Starting { id, .. }
            | Current::Posting { id }
            | Current::Notifying { id, .. }
            | Current::Releasing { id, .. } => *id,
        }
    }
}

/// How an export attempt settles once its lease is released.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Settle {
    /// Acknowledged with `status`: logged at `started_ms` and removed.
    Delivered { status: u16, started_ms: u64 },
    /// Rescheduled.
    Retry(Failure),
}

/// Why an attempt did not deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    /// The affiliate answered with this status, not a 2xx.
    Refused(u16),
    /// No status: why.
    Failed(String),
}

impl Answer {
    /// The 2xx status, or why the event was not taken.
    fn outcome(&self) -> Result<u16, Failure> {
        match self {
            Answer::Status(status) if (200..300).contains(status) => Ok(*status),
            Answer::Status(status) => Err(Failure::Refused(*status)),
            Answer::NotSent(why) | Answer::Unknown(why) => Err(Failure::Failed(why.clone())),
        }
    }
}

/// The exporter's rules and the outbox they act on.
pub struct Core {
    catalogue: Catalogue,
    master_key: [u8; 32],
    outbox: BTreeMap<WebhookId, Entry>,
    cursors: HashMap<Feed, u64>,
    planned: VecDeque<WebhookId>,
    /// Whether the planned batch still owes its closing flush.
    plan_open: bool,
    current: Option<Current>,
    entropy: Box<dyn Entropy>,
    delivered: u64,
    /// The export log's latest signed head with its cosignatures (the `log_head` of event bodies queued now).
    log_head: Option<serde_json::Value>,
    abandoned: u64,
    notice_retry_for: Duration,
}

impl Core {
    /// The rules over the outbox `entries` and feed `cursors` as the store holds them (every entry at rest),
    /// with the affiliates `catalogue`, the pseudonym `master_key` and a source of `entropy`.
    pub fn new(
        catalogue: Catalogue,
        master_key: [u8; 32],
        entries: impl IntoIterator<Item = (WebhookId, Entry)>,
        cursors: impl IntoIterator<Item = (Feed, u64)>,
        entropy: Box<dyn Entropy>,
    ) -> Self {
        Self {
            catalogue,
            master_key,
            outbox: entries.into_iter().collect(),
            cursors: cursors.into_iter().collect(),
            planned: VecDeque::new(),
            plan_open: false,
            current: None,
            entropy,
            delivered: 0,
            log_head: None,
            abandoned: 0,
            notice_retry_for: NOTICE_RETRY_FOR,
        }
    }

    /// The affiliates catalogue with its current notices.
    pub fn catalogue(&self) -> &Catalogue {
        &self.catalogue
    }

    /// Sets the export log head that bodies queued from now on carry (`crate::feed::log_head`). A queued body
    /// never changes: retries repeat it with the head it was queued with.
    pub fn set_log_head(&mut self, head: Option<serde_json::Value>) {
        self.log_head = head;
    }

    /// Retries a withdrawal notice for `bound` from when it was queued (default [`NOTICE_RETRY_FOR`]).
    pub fn set_notice_retry_for(&mut self, bound: Duration) {
        self.notice_retry_for = bound;
    }

    /// Withdrawal and erasure notices abandoned since this core was made: affiliates that were not told.
    pub fn abandoned(&self) -> u64 {
        self.abandoned
    }

    /// Entries in the outbox.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// The outbox, by webhook id.
    pub fn outbox(&self) -> &BTreeMap<WebhookId, Entry> {
        &self.outbox
    }

    /// Webhooks acknowledged with 2xx since this core was made.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// `feed`'s cursor: the changes up to it are applied.
    pub fn cursor(&self, feed: Feed) -> u64 {
        self.cursors.get(&feed).copied().unwrap_or(0)
    }

    /// Plans the deliveries of a pass: at most [`DELIVERIES_PER_PASS`] entries due at `now_ms`, soonest first (by
    /// webhook id among equals). An entry that fails during the pass waits for the next one.
    pub fn plan_deliveries(&mut self, now_ms: u64) {
        let mut due: Vec<(u64, WebhookId)> = self
            .outbox
            .iter()
            .filter(|(_, e)| e.next_attempt_ms <= now_ms)
            .map(|(id, e)| (e.next_attempt_ms, *id))
            .collect();
        due.sort();
        self.planned = due.into_iter().take(DELIVERIES_PER_PASS).map(|(_, id)| id).collect();
        self.plan_open = true;
    }

    /// The first effects of the next planned attempt, begun at `now_ms`; the batch's closing [`Effect::Flush`]
    /// once the plan is done; then `None`. Also `None` while an attempt is under way.
    pub fn poll_attempt(&mut self, now_ms: u64) -> Option<Vec<Effect>> {
        if self.current.is_some() {
            return None;
        }
        while let Some(id) = self.planned.pop_front() {
            let Some(entry) = self.outbox.get(&id) else { continue };
            if self.catalogue.get(&entry.pair.affiliate).is_none() {
                tracing::warn!(webhook = %id, "affiliate no longer in the catalogue; entry dropped");
                self.outbox.remove(&id);
                return Some(vec![Effect::Write(Write::Remove { id })]);
            }
            if entry.kind == Kind::Export && !self.under_current_notice(entry) {
                // The terms changed since the grant (a restart with a new catalogue): the grant no longer covers
                // what would leave. Dropped like a withdrawn pair's export (logged if an attempt may have reached).
                tracing::info!(webhook = %id, "the pair's notice changed since the grant; export dropped");
                let mut effects = Vec::new();
                return match self.drop_export(&id, &mut effects) {
                    Ok(_) => Some(effects),
                    Err(e) => {
                        tracing::error!(webhook = %id, error = %e, "cannot drop an export under an old notice");
                        continue;
                    }
                };
            }
            let first = match entry.kind {
                Kind::Withdrawn | Kind::Erased => {
                    self.current = Some(Current::Notifying { id, started_ms: now_ms });
                    Effect::Post { id, affiliate: entry.pair.affiliate.clone(), body: entry.body.clone() }
                }
                Kind::Export => {
                    self.current = Some(Current::Leasing { id, started_ms: now_ms });
                    Effect::AskLease { pair: entry.pair.clone(), statement_hash: entry.statement_hash }
                }
            };
            return Some(vec![first]);
        }
        // Rescheduled entries need not be durable at once, but a pass leaves everything it wrote durable.
        std::mem::take(&mut self.plan_open).then(|| vec![Effect::Flush])
    }

    /// The relay answered the lease asked for the attempt under way; `asked_mono_ms` is when the request for it was
    /// sent and `now_mono_ms` now, both on the monotonic clock.
    pub fn handle_lease(
        &mut self,
        answer: LeaseAnswer,
        asked_mono_ms: u64,
        now_mono_ms: u64,
    ) -> Result<Vec<Effect>, CoreError> {
        let Some(Current::Leasing { id, started_ms }) = self.current.clone() else {
            return Err(CoreError::Unasked("a lease answer"));
        };
        self.current = None;
        let lease = match answer {
            LeaseAnswer::Failed => return Ok(Vec::new()),
            LeaseAnswer::Denied { reason } => {
                tracing::info!(webhook = %id, reason = %reason, "export denied by the relay; dropped");
                let mut effects = Vec::new();
                self.drop_export(&id, &mut effects)?;
                return Ok(effects);
            }
            LeaseAnswer::Granted(lease) => lease,
        };
        let Some(entry) = self.outbox.get_mut(&id) else { return Err(CoreError::Unasked("a lease for no entry")) };
        let leased = take_state(entry).lease(lease, started_ms).map_err(|e| restore_state(entry, e))?;
        // Counted from when it was asked for, which is before the relay took it: this deadline is the earlier one.
        let deadline = asked_mono_ms.saturating_add(lease.valid_for_ms);
        if !left_at_least(deadline, now_mono_ms, LEASE_NEEDED) {
            let (lease, state) = leased.unused();
            entry.state = state;
            let failure = Failure::Failed("lease too short to start a request".to_owned());
            self.current = Some(Current::Releasing { id, settle: Settle::Retry(failure) });
            return Ok(vec![Effect::ReleaseLease { pair: entry.pair.clone(), lease }]);
        }
        entry.state = EntryState::InFlight(leased.send());
        self.current = Some(Current::Starting { id, deadline });
        Ok(vec![
            Effect::Write(Write::Put { id, entry: Box::new(entry.clone()) }),
            Effect::Flush,
            Effect::CheckLease { id },
        ])
    }

    /// The flush before the request of the attempt under way is done, at `now_mono_ms`: the request leaves if its
    /// whole timeout (and the slack) still fits in the lease; otherwise nothing is sent and the lease is released.
    pub fn handle_lease_check(&mut self, now_mono_ms: u64) -> Result<Vec<Effect>, CoreError> {
        let Some(Current::Starting { id, deadline }) = self.current.clone() else {
            return Err(CoreError::Unasked("a lease check"));
        };
        let Some(entry) = self.outbox.get_mut(&id) else { return Err(CoreError::Unasked("a check for no entry")) };
        if left_at_least(deadline, now_mono_ms, POST_NEEDED) {
            tracing::info!(webhook = %id, attempt = entry.attempts + 1, "posting export");
            self.current = Some(Current::Posting { id });
            return Ok(vec![Effect::Post { id, affiliate: entry.pair.affiliate.clone(), body: entry.body.clone() }]);
        }
        // Nothing left: back to what the entry was before this attempt (its stored in-flight mark is only ever on
        // the safe side, and the retry writes the entry again).
        let in_flight = match take_state(entry) {
            EntryState::InFlight(in_flight) => in_flight,
            state => {
                entry.state = state.clone();
                return Err(TransitionError { state, transition: "start its request" }.into());
            }
        };
        let (attempt, state) = in_flight.answered(Reached::Known).map_err(|e| restore_state(entry, e))?;
        entry.state = state;
        tracing::info!(webhook = %id, "the flush before the request left too little of the lease; not sent");
        let failure = Failure::Failed("lease too short after the flush".to_owned());
        self.current = Some(Current::Releasing { id, settle: Settle::Retry(failure) });
        Ok(vec![Effect::ReleaseLease { pair: entry.pair.clone(), lease: attempt.lease }])
    }

    /// The affiliate answered the request of the attempt under way (or it failed), at `now_ms`.
    pub fn handle_answer(&mut self, answer: Answer, now_ms: u64) -> Result<Vec<Effect>, CoreError> {
        if let Some(Current::Notifying { id, started_ms }) = self.current.clone() {
            self.current = None;
            let Some(entry) = self.outbox.get(&id) else { return Err(CoreError::Unasked("an answer for no entry")) };
            return match answer.outcome() {
                Ok(status) => {
                    // Logged as a withdrawal notice (a notice stored before notices were logged has no evidence:
                    // it is only removed).
                    let write = match entry.log_record(&id, started_ms) {
                        Ok(record) => {
                            Write::Settle { id, pair: entry.pair.clone(), delivered: None, record: Box::new(record) }
                        }
                        Err(e) => {
                            tracing::warn!(webhook = %id, error = %e, "notice delivered but not logged");
                            Write::Remove { id }
                        }
                    };
                    self.outbox.remove(&id);
                    Ok(vec![Effect::Write(self.count_delivered(id, status, write))])
                }
                Err(failure) => Ok(vec![self.reschedule_notice(id, failure, now_ms)?]),
            };
        }
        let Some(Current::Posting { id }) = self.current.clone() else {
            return Err(CoreError::Unasked("a webhook answer"));
        };
        let Some(entry) = self.outbox.get_mut(&id) else { return Err(CoreError::Unasked("an answer for no entry")) };
        let in_flight = match take_state(entry) {
            EntryState::InFlight(in_flight) => in_flight,
            state => {
                entry.state = state.clone();
                return Err(TransitionError { state, transition: "be answered" }.into());
            }
        };
        let reached = match answer {
            Answer::Status(_) | Answer::NotSent(_) => Reached::Known,
            Answer::Unknown(_) => Reached::Unknown,
        };
        let (attempt, state) = in_flight.answered(reached).map_err(|e| restore_state(entry, e))?;
        entry.state = state;
        let settle = match answer.outcome() {
            Ok(status) => Settle::Delivered { status, started_ms: attempt.started_ms },
            Err(failure) => Settle::Retry(failure),
        };
        self.current = Some(Current::Releasing { id, settle });
        Ok(vec![Effect::ReleaseLease { pair: entry.pair.clone(), lease: attempt.lease }])
    }

    /// The lease of the attempt under way was released (or releasing it failed: it lapses by itself), at `now_ms`:
    /// the export is logged and removed if it was acknowledged, rescheduled otherwise.
    pub fn handle_released(&mut self, now_ms: u64) -> Result<Vec<Effect>, CoreError> {
        let Some(Current::Releasing { id, settle }) = self.current.take() else {
            return Err(CoreError::Unasked("a released lease"));
        };
        match settle {
            Settle::Delivered { status, started_ms } => {
                let Some(entry) = self.outbox.get(&id) else { return Err(CoreError::Unasked("settling no entry")) };
                let write = Write::Settle {
                    id,
                    record: Box::new(entry.log_record(&id, started_ms)?),
                    pair: entry.pair.clone(),
                    delivered: Some(entry.delivered_as(&id)),
                };
                self.outbox.remove(&id);
                Ok(vec![Effect::Write(self.count_delivered(id, status, write))])
            }
            Settle::Retry(failure) => Ok(vec![self.reschedule(id, failure, now_ms)?]),
        }
    }

    /// Counts a webhook acknowledged with `status`; `write` is what takes it out of the store.
    fn count_delivered(&mut self, id: WebhookId, status: u16, write: Write) -> Write {
        self.delivered += 1;
        tracing::info!(webhook = %id, status, "webhook delivered");
        write
    }

    /// Reschedules notice `id` after a failure at `now_ms`, or abandons it if it was queued `notice_retry_for` ago or
    /// more (a notice stored before queue times were kept starts counting now).
    fn reschedule_notice(&mut self, id: WebhookId, failure: Failure, now_ms: u64) -> Result<Effect, CoreError> {
        let Some(entry) = self.outbox.get_mut(&id) else { return Err(CoreError::Unasked("rescheduling no entry")) };
        let queued = *entry.queued_ms.get_or_insert(now_ms);
        let bound = u64::try_from(self.notice_retry_for.as_millis()).unwrap_or(u64::MAX);
        if now_ms.saturating_sub(queued) < bound {
            return self.reschedule(id, failure, now_ms);
        }
        let (affiliate, kind) = (entry.pair.affiliate.clone(), entry.kind);
        self.outbox.remove(&id);
        self.abandoned += 1;
        tracing::error!(
            webhook = %id,
            affiliate = %affiliate,
            abandoned_total = self.abandoned,
            kind = ?kind,
            "notice abandoned after its retry period: the affiliate was not told of a withdrawal or an erasure"
        );
        Ok(Effect::Write(Write::Remove { id }))
    }

    /// Schedules the next attempt of `id` after its `attempts`-th failure, [`backoff`] from `now_ms`.
    fn reschedule(&mut self, id: WebhookId, failure: Failure, now_ms: u64) -> Result<Effect, CoreError> {
        let Some(entry) = self.outbox.get_mut(&id) else { return Err(CoreError::Unasked("rescheduling no entry")) };
        entry.attempts = entry.attempts.saturating_add(1);
        let delay = backoff(entry.attempts, self.entropy.jitter());
        entry.next_attempt_ms = now_ms.saturating_add(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
        match failure {
            Failure::Refused(status) => tracing::info!(webhook = %id, status, ?delay, "webhook refused; will retry"),
            Failure::Failed(e) => tracing::info!(webhook = %id, error = %e, ?delay, "webhook failed; will retry"),
        }
        Ok(Effect::Write(Write::Put { id, entry: Box::new(entry.clone()) }))
    }

    /// Takes export `id` out of the outbox undelivered. If an attempt of it may have reached the affiliate, it is
    /// settled as delivered instead, logged at that attempt's time (the log must never miss data an affiliate may
    /// hold): then how it identified the user, which the pair's delivered record gains.
    fn drop_export(&mut self, id: &WebhookId, effects: &mut Vec<Effect>) -> Result<Option<Delivered>, CoreError> {
        let Some(entry) = self.outbox.get(id) else { return Ok(None) };
        match entry.state.unanswered_since() {
            Some(since) if entry.kind == Kind::Export => {
                let record = Box::new(entry.log_record(id, since)?);
                let delivered = entry.delivered_as(id);
                effects.push(Effect::Write(Write::Settle {
                    id: *id,
                    pair: entry.pair.clone(),
                    delivered: Some(delivered.clone()),
                    record,
                }));
                self.outbox.remove(id);
                tracing::info!(webhook = %id, "export dropped after an attempt with no answer; logged as delivered");
                Ok(Some(delivered))
            }
            _ => {
                effects.push(Effect::Write(Write::Remove { id: *id }));
                self.outbox.remove(id);
                tracing::info!(webhook = %id, "queued export dropped before any attempt could reach the affiliate");
                Ok(None)
            }
        }
    }
}

impl Core {
    /// Whether an export's grant names its pair's current notice (the evidence is the signed statement).
    fn under_current_notice(&self, entry: &Entry) -> bool {
        let current = self.catalogue.notice(&entry.pair.affiliate, entry.pair.purpose).map(|n| n.hash);
        let named = entry
            .evidence
            .as_ref()
            .and_then(|e| hex::decode(&e.statement).ok())
            .and_then(|b| ConsentStatement::decode_stored(&b).ok())
            .map(|s| s.notice_hash);
        named.is_some() && named == current
    }
}

/// Whether at least `needed` is left from `now` to `deadline` (monotonic ms).
fn left_at_least(deadline: u64, now: u64, needed: Duration) -> bool {
    u128::from(deadline.saturating_sub(now)) >= needed.as_millis()
}

/// Moves an entry's state out for a transition (which consumes it); the entry holds a placeholder meanwhile.
fn take_state(entry: &mut Entry) -> EntryState {
    std::mem::replace(&mut entry.state, EntryState::Queued)
}

/// Puts back the state a refused transition returned.
fn restore_state(entry: &mut Entry, refused: TransitionError) -> CoreError {
    entry.state = refused.state.clone();
    refused.into()
}
