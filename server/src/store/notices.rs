//! Notices as the exporter published them: every document ever published, by hash, and the current one per
//! (affiliate, purpose).
//!
//! One tree, two key families:
//! - `0 ‖ SHA-256 (32)` → the notice document, byte for byte (kept for good: old grants and audits refer to it);
//! - `1 ‖ purpose index (1) ‖ affiliate` → the SHA-256 of the pair's current notice.
//!
//! [`Notices::publish`] takes the exporter's complete current set and replaces the current map with it in one
//! transaction, so a pair the catalogue no longer allows has no current notice from then on, and a reader never sees
//! half of a publication. Every document is decoded ([`Notice::decode`]) before it is stored: the relay serves only
//! canonical notices, and two documents for one pair in one publication are refused.

use std::collections::BTreeMap;

use relay_proto::consent::{PURPOSES, Purpose};
use relay_proto::notice::{Notice, NoticeError, notice_hash};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

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
    Store(#[from] sled::Error),
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
pub struct Notices {
    tree: sled::Tree,
}

fn document_key(hash: &[u8; 32]) -> Vec<u8> {
    [&[DOCUMENT][..], hash].concat()
}

fn current_key(affiliate: &str, purpose: Purpose) -> Vec<u8> {
    let index = PURPOSES.iter().position(|p| *p == purpose).unwrap_or(0) as u8;
    [&[CURRENT, index][..], affiliate.as_bytes()].concat()
}

impl Notices {
    /// Notices kept in `tree`.
    pub fn new(tree: sled::Tree) -> Self {
        Self { tree }
    }

    /// Stores every document of `documents` and makes them the complete current set. Not durable until the next
    /// group commit.
    pub fn publish(&self, documents: &[Vec<u8>]) -> Result<Published, NoticeStoreError> {
        if documents.len() > MAX_PUBLISHED_NOTICES {
            return Err(NoticeStoreError::TooMany(documents.len()));
        }
        let mut current = BTreeMap::new();
        for (index, document) in documents.iter().enumerate() {
            let notice = Notice::decode(document).map_err(|source| NoticeStoreError::Invalid { index, source })?;
            let key = current_key(&notice.affiliate, notice.purpose);
            if current.insert(key, (notice_hash(document), document)).is_some() {
                return Err(NoticeStoreError::Duplicate { affiliate: notice.affiliate, purpose: notice.purpose });
            }
        }
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
            TransactionError::Storage(e) => NoticeStoreError::Store(e),
            TransactionError::Abort(()) => NoticeStoreError::Corrupt,
        })?;
        Ok(Published { new_documents, current: current.len() })
    }

    /// How many pairs have a current notice.
    pub fn current_count(&self) -> usize {
        self.tree.scan_prefix([CURRENT]).count()
    }

    /// The current notice hash of the pair, if the exporter published one.
    pub fn current_hash(&self, affiliate: &str, purpose: Purpose) -> Result<Option<[u8; 32]>, NoticeStoreError> {
        self.tree
            .get(current_key(affiliate, purpose))?
            .map(|v| v.as_ref().try_into().map_err(|_| NoticeStoreError::Corrupt))
            .transpose()
    }

    /// The current notice document of the pair.
    pub fn current(&self, affiliate: &str, purpose: Purpose) -> Result<Option<Vec<u8>>, NoticeStoreError> {
        match self.current_hash(affiliate, purpose)? {
            Some(hash) => Ok(Some(self.by_hash(&hash)?.ok_or(NoticeStoreError::Corrupt)?)),
            None => Ok(None),
        }
    }

    /// The document whose SHA-256 is `hash`, current or not.
    pub fn by_hash(&self, hash: &[u8; 32]) -> Result<Option<Vec<u8>>, NoticeStoreError> {
        Ok(self.tree.get(document_key(hash))?.map(|v| v.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use relay_proto::notice::{Field, Retention};

    use super::*;

    fn notice(affiliate: &str, purpose: Purpose, fields: Vec<Field>, version: u32) -> Vec<u8> {
        Notice {
            version,
            affiliate: affiliate.into(),
            legal_name: "Some Company SA".into(),
            country: "FR".into(),
            purpose,
            fields,
            retention: Retention::Days(30),
        }
        .encode()
        .expect("valid notice")
    }

    fn store() -> Notices {
        let db = sled::Config::new().temporary(true).open().expect("sled");
        Notices::new(db.open_tree("notices").expect("tree"))
    }

    #[test]
    fn the_published_set_replaces_the_current_one_and_old_documents_stay_readable() {
        let n = store();
        let ads_v1 = notice("adsco", Purpose::Advertising, vec![Field::DeviceModel], 1);
        let sec = notice("shieldco", Purpose::Security, vec![Field::Phone], 1);
        assert_eq!(
            n.publish(&[ads_v1.clone(), sec.clone()]).expect("publish"),
            Published { new_documents: 2, current: 2 }
        );
        assert_eq!(n.current("adsco", Purpose::Advertising).expect("read"), Some(ads_v1.clone()));
        assert_eq!(n.current_hash("adsco", Purpose::Analytics).expect("read"), None);

        let ads_v2 = notice("adsco", Purpose::Advertising, vec![Field::Phone, Field::DeviceModel], 2);
        assert_eq!(
            n.publish(std::slice::from_ref(&ads_v2)).expect("publish"),
            Published { new_documents: 1, current: 1 }
        );
        assert_eq!(n.current_hash("adsco", Purpose::Advertising).expect("read"), Some(notice_hash(&ads_v2)));
        assert_eq!(n.current_hash("shieldco", Purpose::Security).expect("read"), None, "left the set: no notice");
        assert_eq!(n.by_hash(&notice_hash(&ads_v1)).expect("read"), Some(ads_v1), "the old version stays readable");
        assert_eq!(n.publish(&[ads_v2]).expect("again"), Published { new_documents: 0, current: 1 });
    }

    #[test]
    fn only_canonical_documents_one_per_pair_are_published() {
        let n = store();
        let good = notice("adsco", Purpose::Advertising, vec![Field::DeviceModel], 1);
        let mut bad = good.clone();
        bad.push(b'\n');
        assert!(matches!(n.publish(&[good.clone(), bad]), Err(NoticeStoreError::Invalid { index: 1, .. })));
        let other = notice("adsco", Purpose::Advertising, vec![Field::Os], 2);
        assert!(matches!(n.publish(&[good, other]), Err(NoticeStoreError::Duplicate { .. })));
        assert_eq!(n.current_hash("adsco", Purpose::Advertising).expect("read"), None, "a refused set changes nothing");
    }
}
