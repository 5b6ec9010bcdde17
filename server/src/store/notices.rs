//! Notices as the exporter published them: every document ever published, by hash, and the current one per
//! (affiliate, purpose).
//!
//! One tree, two key families:
//! - `0 ‖ SHA-256 (32)` → the notice document, byte for byte (kept for good: old grants and audits refer to it);
//! - `1 ‖ purpose index (1) ‖ affiliate` → the SHA-256 of the pair's current notice.
//!
//! [`NoticeStore::publish`](super::NoticeStore::publish) takes the exporter's complete current set and replaces the current map with it in one
//! transaction, so a pair the catalogue no longer allows has no current notice from then on, and a reader never sees
//! half of a publication. Every document is decoded ([`Notice::decode`]) before it is stored: the relay serves only
//! canonical notices, and two documents for one pair in one publication are refused.

use std::collections::BTreeMap;

use relay_proto::consent::{PURPOSES, Purpose};
use relay_proto::notice::{Notice, NoticeError, notice_hash};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::backend::{BackendError, BoxFuture, NoticeStore};

const DOCUMENT: u8 = 0;
const CURRENT: u8 = 1;

/// Most documents one publication may carry (4 purposes for each of a few hundred affiliates).
pub const MAX_PUBLISHED_NOTICES: usize = 4096;

/// Why notices could not be published or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NoticeStoreError {
    /// A published document is not a canonical notice.
    #[error("published notice #{index}: {source}")]
    Invalid {
        /// Its position in the publication.
        index: usize,
        /// What is wrong with it.
        source: NoticeError,
    },
    /// Two documents of one publication are for the same pair.
    #[error("two published notices for {affiliate}/{purpose}")]
    Duplicate {
        /// The affiliate.
        affiliate: String,
        /// The purpose.
        purpose: Purpose,
    },
    /// The publication is larger than [`MAX_PUBLISHED_NOTICES`].
    #[error("{0} notices in one publication (at most {MAX_PUBLISHED_NOTICES})")]
    TooMany(usize),
    /// A stored value does not decode.
    #[error("corrupt notice record")]
    Corrupt,
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] BackendError),
}

impl From<sled::Error> for NoticeStoreError {
    fn from(e: sled::Error) -> Self {
        Self::Store(e.into())
    }
}

/// What a publication changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Documents the relay did not hold before.
    pub new_documents: usize,
    /// Pairs with a current notice now.
    pub current: usize,
}

/// The relay's notices.
#[derive(Clone)]
pub struct SledNotices {
    tree: sled::Tree,
}

fn document_key(hash: &[u8; 32]) -> Vec<u8> {
    [&[DOCUMENT][..], hash].concat()
}

fn current_key(affiliate: &str, purpose: Purpose) -> Vec<u8> {
    let index = PURPOSES.iter().position(|p| *p == purpose).unwrap_or(0) as u8;
    [&[CURRENT, index][..], affiliate.as_bytes()].concat()
}

/// A checked publication: each (affiliate, purpose) with its document's hash and the document.
pub(crate) type Checked<'a> = BTreeMap<(String, Purpose), ([u8; 32], &'a Vec<u8>)>;

/// Checks a publication as every backend must: at most [`MAX_PUBLISHED_NOTICES`] documents, each a canonical
/// notice, at most one per (affiliate, purpose).
pub(crate) fn checked_publication(documents: &[Vec<u8>]) -> Result<Checked<'_>, NoticeStoreError> {
    if documents.len() > MAX_PUBLISHED_NOTICES {
        return Err(NoticeStoreError::TooMany(documents.len()));
    }
    let mut current = BTreeMap::new();
    for (index, document) in documents.iter().enumerate() {
        let notice = Notice::decode(document).map_err(|source| NoticeStoreError::Invalid { index, source })?;
        if current.insert((notice.affiliate.clone(), notice.purpose), (notice_hash(document), document)).is_some() {
            return Err(NoticeStoreError::Duplicate { affiliate: notice.affiliate, purpose: notice.purpose });
        }
    }
    Ok(current)
}

impl SledNotices {
    /// Notices kept in `tree`.
    pub fn new(tree: sled::Tree) -> Self {
        Self { tree }
    }

    fn publish_now(&self, documents: &[Vec<u8>]) -> Result<Published, NoticeStoreError> {
        let current: BTreeMap<Vec<u8>, ([u8; 32], &Vec<u8>)> = checked_publication(documents)?
            .into_iter()
            .map(|((affiliate, purpose), v)| (current_key(&affiliate, purpose), v))
            .collect();
        let stale: Vec<sled::IVec> = self
            .tree
            .scan_prefix([CURRENT])
            .keys()
            .filter(|k| k.as_ref().is_ok_and(|k| !current.contains_key(&k[..])))
            .collect::<Result<_, _>>()?;
        let new_documents = current
            .values()
            .map(|(hash, _)| self.tree.contains_key(document_key(hash)))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .filter(|known| !known)
            .count();
        let result: Result<(), TransactionError<()>> = (&self.tree,).transaction(|(t,)| {
            for k in &stale {
                t.remove(k)?;
            }
            for (key, (hash, document)) in &current {
                t.insert(document_key(hash), document.as_slice())?;
                t.insert(key.as_slice(), &hash[..])?;
            }
            Ok::<(), ConflictableTransactionError<()>>(())
        });
        result.map_err(|e| match e {
            TransactionError::Storage(e) => NoticeStoreError::from(e),
            TransactionError::Abort(()) => NoticeStoreError::Corrupt,
        })?;
        Ok(Published { new_documents, current: current.len() })
    }

    fn current_count_now(&self) -> usize {
        self.tree.scan_prefix([CURRENT]).count()
    }

    fn current_hash_now(&self, affiliate: &str, purpose: Purpose) -> Result<Option<[u8; 32]>, NoticeStoreError> {
        self.tree
            .get(current_key(affiliate, purpose))?
            .map(|v| v.as_ref().try_into().map_err(|_| NoticeStoreError::Corrupt))
            .transpose()
    }

    fn current_now(&self, affiliate: &str, purpose: Purpose) -> Result<Option<Vec<u8>>, NoticeStoreError> {
        match self.current_hash_now(affiliate, purpose)? {
            Some(hash) => Ok(Some(self.by_hash_now(&hash)?.ok_or(NoticeStoreError::Corrupt)?)),
            None => Ok(None),
        }
    }

    fn by_hash_now(&self, hash: &[u8; 32]) -> Result<Option<Vec<u8>>, NoticeStoreError> {
        Ok(self.tree.get(document_key(hash))?.map(|v| v.to_vec()))
    }
}

impl NoticeStore for SledNotices {
    fn publish<'a>(&'a self, documents: &'a [Vec<u8>]) -> BoxFuture<'a, Result<Published, NoticeStoreError>> {
        Box::pin(std::future::ready(self.publish_now(documents)))
    }

    fn current_count(&self) -> BoxFuture<'_, Result<usize, NoticeStoreError>> {
        Box::pin(std::future::ready(Ok(self.current_count_now())))
    }

    fn current_hash<'a>(
        &'a self,
        affiliate: &'a str,
        purpose: Purpose,
    ) -> BoxFuture<'a, Result<Option<[u8; 32]>, NoticeStoreError>> {
        Box::pin(std::future::ready(self.current_hash_now(affiliate, purpose)))
    }

    fn current<'a>(
        &'a self,
        affiliate: &'a str,
        purpose: Purpose,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, NoticeStoreError>> {
        Box::pin(std::future::ready(self.current_now(affiliate, purpose)))
    }

    fn by_hash<'a>(&'a self, hash: &'a [u8; 32]) -> BoxFuture<'a, Result<Option<Vec<u8>>, NoticeStoreError>> {
        Box::pin(std::future::ready(self.by_hash_now(hash)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::conformance::notices as suite;

    fn store() -> crate::store::Notices {
        let db = sled::Config::new().temporary(true).open().expect("sled");
        Arc::new(SledNotices::new(db.open_tree("notices").expect("tree")))
    }

    #[tokio::test]
    async fn conformance() {
        suite::run_all(&store).await;
    }
}
