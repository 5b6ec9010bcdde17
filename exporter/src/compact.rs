//! Compaction of the exporter's sled database after an erasure, so that removed personal data leaves the disk.
//!
//! sled is log-structured: a removed value stays in its data files until the segment holding it is reused, which
//! may be never. After an erasure, once the account's notices have left the outbox (delivered or abandoned), the
//! exporter rewrites its database: every tree's current contents are copied into a fresh database beside it
//! (`db.compact`), which then replaces the old one (`db` → `db.old`, `db.compact` → `db`, `db.old` removed). The
//! removed values, the phone numbers among them, are not copied and go with the old files.
//!
//! Contract: the erasure's writes set a durable flag ([`COMPACTION_DUE`] in `meta`), which the copy leaves out;
//! a crash anywhere leaves either the old database with the flag still set (compacted again later) or the new one
//! complete: [`settle`] finishes or undoes an interrupted swap before the store is opened. No value is logged.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The `meta` key of the flag an erasure sets: the database holds removed personal data until compacted.
pub const COMPACTION_DUE: &[u8] = b"compaction_due";
/// How long a reopen waits for sled's background threads to release the files of a dropped database.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(suffix);
    path.with_file_name(name)
}

/// The database being built by a compaction.
pub fn fresh_path(path: &Path) -> PathBuf {
    sibling(path, ".compact")
}

/// The database a compaction replaced, until it is removed.
pub fn old_path(path: &Path) -> PathBuf {
    sibling(path, ".old")
}

/// Finishes or undoes a compaction interrupted by a crash, before the database at `path` is opened: a complete new
/// database whose swap was cut short is moved in; a half-built one, or an old one left over, is removed.
pub fn settle(path: &Path) -> std::io::Result<()> {
    let (fresh, old) = (fresh_path(path), old_path(path));
    if !path.exists() && fresh.exists() {
        // Crashed between the two renames: the new database was complete (it is renamed only once flushed).
        std::fs::rename(&fresh, path)?;
    }
    for leftover in [fresh, old] {
        if leftover.exists() {
            std::fs::remove_dir_all(&leftover)?;
        }
    }
    Ok(())
}

/// Copies every tree of `from` into a new database at [`fresh_path`]`(path)`, without the [`COMPACTION_DUE`] flag,
/// and flushes it.
pub fn copy(from: &sled::Db, path: &Path) -> Result<(), sled::Error> {
    let fresh = fresh_path(path);
    if fresh.exists() {
        std::fs::remove_dir_all(&fresh)?;
    }
    let to = sled::open(&fresh)?;
    for name in from.tree_names() {
        let (source, target) = (from.open_tree(&name)?, to.open_tree(&name)?);
        for item in source.iter() {
            let (k, v) = item?;
            if name.as_ref() == b"meta" && k.as_ref() == COMPACTION_DUE {
                continue;
            }
            target.insert(k, v)?;
        }
    }
    to.flush()?;
    Ok(())
}

/// Swaps the copy made by [`copy`] in for the database at `path`, whose handles must all be dropped.
pub fn swap(path: &Path) -> std::io::Result<()> {
    let old = old_path(path);
    std::fs::rename(path, &old)?;
    std::fs::rename(fresh_path(path), path)?;
    std::fs::remove_dir_all(&old)
}

/// Opens the database at `path` with `open`, retrying while sled's threads of a dropped handle still hold its lock.
pub async fn reopen<T, E: std::fmt::Display>(open: impl Fn() -> Result<T, E>) -> Result<T, E> {
    let deadline = tokio::time::Instant::now() + RELEASE_WAIT;
    loop {
        match open() {
            Err(e) if e.to_string().contains("could not acquire lock") && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files_containing(dir: &Path, needle: &[u8]) -> usize {
        let mut hits = 0;
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).expect("dir") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    stack.push(path);
                } else if std::fs::read(&path).expect("file").windows(needle.len()).any(|w| w == needle) {
                    hits += 1;
                }
            }
        }
        hits
    }

    /// A removed value stays in sled's files (the reason this module exists); the compacted copy keeps every tree's
    /// live contents, not the removed value, and not the flag.
    #[tokio::test]
    async fn a_compaction_keeps_what_is_live_and_drops_what_was_removed() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("db");
        {
            let db = sled::open(&path).expect("open");
            let (outbox, meta) = (db.open_tree("outbox").expect("tree"), db.open_tree("meta").expect("tree"));
            outbox.insert("kept", &b"KEPT-VALUE-1"[..]).expect("insert");
            outbox.insert("gone", &b"ERASED-PHONE-33612345678"[..]).expect("insert");
            meta.insert(COMPACTION_DUE, &[1][..]).expect("flag");
            db.flush().expect("flush");
            outbox.remove("gone").expect("remove");
            db.flush().expect("flush");
            assert!(files_containing(&path, b"ERASED-PHONE-33612345678") > 0, "sled keeps removed bytes");
            copy(&db, &path).expect("copy");
        }
        let db = reopen(|| sled::open(&path)).await.expect("old db released");
        drop(db);
        swap(&path).expect("swap");
        let db = reopen(|| sled::open(&path)).await.expect("reopen");
        assert_eq!(
            db.open_tree("outbox").expect("tree").get("kept").expect("get").as_deref(),
            Some(&b"KEPT-VALUE-1"[..])
        );
        assert!(!db.open_tree("meta").expect("tree").contains_key(COMPACTION_DUE).expect("get"));
        drop(db);
        assert_eq!(files_containing(dir.path(), b"ERASED-PHONE-33612345678"), 0);
        assert!(!fresh_path(&path).exists() && !old_path(&path).exists());
    }

    /// An interrupted swap is finished (the copy was complete) or its leftovers removed.
    #[test]
    fn an_interrupted_compaction_is_settled_before_the_store_opens() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("db");
        // Between the two renames: only the old and the complete new database exist.
        std::fs::create_dir_all(fresh_path(&path)).expect("fresh");
        std::fs::write(fresh_path(&path).join("marker"), b"new").expect("marker");
        std::fs::create_dir_all(old_path(&path)).expect("old");
        settle(&path).expect("settle");
        assert_eq!(std::fs::read(path.join("marker")).expect("moved in"), b"new");
        assert!(!fresh_path(&path).exists() && !old_path(&path).exists());
        // A half-built copy beside the database is removed; the database stays.
        std::fs::create_dir_all(fresh_path(&path)).expect("fresh");
        settle(&path).expect("settle");
        assert!(path.join("marker").exists() && !fresh_path(&path).exists());
    }
}
