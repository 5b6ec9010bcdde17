//! A relay that lies, for tests only: the end-to-end guarantees are claims about what clients do when the relay is
//! malicious, and this is how the integration tests play that relay without writing a second one.
//!
//! Contract: nothing in the relay ever sets a [`Tamper`] itself; no configuration key, flag or request reaches it. It
//! exists only as a `#[doc(hidden)]` handle on an in-process [`crate::RelayHandle`]. While it is untouched (always,
//! outside tests) every answer is exactly what the relay would send without it. It holds no store handle: it can
//! only rewrite the keys a lookup or bundle answer carries, the opaque envelopes a send stores, the export-log
//! listings (`ExportList`) and the pages of a user's consent history the consent handler answers, so the message path
//! that consults it still names no personal data.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use relay_proto::AccountId;
use relay_proto::wire::{ExportList, ListExports};

/// A sealing key the relay hands out in place of an account's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubstituteKey {
    /// The X25519 key to hand out.
    pub sealing_key: [u8; 32],
    /// The binding signature to hand out with it; `None` keeps the account's real one.
    pub signature: Option<Vec<u8>>,
    /// Also substitute it in prekey bundles (`identity_dh_key`), not only in lookups.
    pub in_bundles: bool,
}

/// Rewrites an envelope stored for a recipient; `None` stores it unchanged.
pub type EnvelopeRewrite = Arc<dyn Fn(&AccountId, &[u8]) -> Option<Vec<u8>> + Send + Sync>;

/// Rewrites a page of a user's consent history (each entry: statement bytes, signature, recorded at).
pub type HistoryRewrite = Arc<dyn Fn(Vec<(Vec<u8>, Vec<u8>, u64)>) -> Vec<(Vec<u8>, Vec<u8>, u64)> + Send + Sync>;
/// Rewrites the answer to a `ListExports` request (given as asked), given the honest answer (`None` where the relay
/// would have refused the request); `None` sends the honest answer (or refusal).
pub type ExportListRewrite = Arc<dyn Fn(&ListExports, Option<&ExportList>) -> Option<ExportList> + Send + Sync>;

/// What the relay is told to lie about.
#[doc(hidden)]
#[derive(Default)]
pub struct Tamper {
    /// Set once any lie is configured: until then the hot paths (every send, every lookup) take no lock here.
    active: AtomicBool,
    sealing_keys: Mutex<HashMap<AccountId, SubstituteKey>>,
    envelopes: Mutex<Option<EnvelopeRewrite>>,
    history: Mutex<Option<HistoryRewrite>>,
    export_lists: Mutex<Option<ExportListRewrite>>,
}

impl std::fmt::Debug for Tamper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tamper(..)")
    }
}

impl Tamper {
    /// From now on, answers about `account` carry `key` instead of its own sealing key.
    pub fn substitute_sealing_key(&self, account: AccountId, key: SubstituteKey) {
        self.sealing_keys.lock().unwrap_or_else(PoisonError::into_inner).insert(account, key);
        self.active.store(true, Ordering::Release);
    }

    /// From now on, every envelope stored is first passed through `rewrite`.
    pub fn rewrite_envelopes(&self, rewrite: EnvelopeRewrite) {
        *self.envelopes.lock().unwrap_or_else(PoisonError::into_inner) = Some(rewrite);
        self.active.store(true, Ordering::Release);
    }

    /// From now on, every page of consent history served is first passed through `rewrite`.
    pub fn rewrite_history(&self, rewrite: HistoryRewrite) {
        *self.history.lock().unwrap_or_else(PoisonError::into_inner) = Some(rewrite);
        self.active.store(true, Ordering::Release);
    }

    /// A page of consent history as served: `page` itself unless a rewrite is set.
    pub fn history(&self, page: Vec<(Vec<u8>, Vec<u8>, u64)>) -> Vec<(Vec<u8>, Vec<u8>, u64)> {
        if !self.active.load(Ordering::Acquire) {
            return page;
        }
        let rewrite = self.history.lock().unwrap_or_else(PoisonError::into_inner).clone();
        match rewrite {
            Some(r) => r(page),
            None => page,
        }
    }

    /// From now on, every answer to `ListExports` is first passed through `rewrite`.
    pub fn rewrite_export_lists(&self, rewrite: ExportListRewrite) {
        *self.export_lists.lock().unwrap_or_else(PoisonError::into_inner) = Some(rewrite);
        self.active.store(true, Ordering::Release);
    }

    /// The substitute for `account`'s sealing key in a lookup (or, with `bundle`, a bundle) answer, if any.
    pub fn sealing_key(&self, account: &AccountId, bundle: bool) -> Option<SubstituteKey> {
        if !self.active.load(Ordering::Acquire) {
            return None;
        }
        let keys = self.sealing_keys.lock().unwrap_or_else(PoisonError::into_inner);
        keys.get(account).filter(|k| !bundle || k.in_bundles).cloned()
    }

    /// The envelope to store for `recipient`: `envelope` itself unless a rewrite is set and changes it.
    pub fn envelope(&self, recipient: &AccountId, envelope: &[u8]) -> Option<Vec<u8>> {
        if !self.active.load(Ordering::Acquire) {
            return None;
        }
        let rewrite = self.envelopes.lock().unwrap_or_else(PoisonError::into_inner).clone();
        rewrite.and_then(|r| r(recipient, envelope))
    }

    /// The export listing to send for `request`: `None` (send `honest`, or the refusal when it is `None`) unless a
    /// rewrite is set and changes it.
    pub fn export_list(&self, request: &ListExports, honest: Option<&ExportList>) -> Option<ExportList> {
        if !self.active.load(Ordering::Acquire) {
            return None;
        }
        let rewrite = self.export_lists.lock().unwrap_or_else(PoisonError::into_inner).clone();
        rewrite.and_then(|r| r(request, honest))
    }
}
