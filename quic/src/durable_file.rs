//! Files written so that a crash or power loss leaves either the old contents or the new, never a torn or
//! rolled-back file, and secret files readable by their owner only: the one writer used for every key and every
//! state file of the relay, the exporter and the client.
//!
//! Contract: a secret is created with mode 0600 from its first byte (never written and then chmod-ed); after
//! [`create_secret`] or [`replace`] returns, the file's data and its directory entry are on disk (the file and its
//! parent directory are fsynced).

use std::io::Write;
use std::path::Path;

/// Who may read a file written by [`replace`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Mode 0600: keys, sessions, anything secret.
    Owner,
    /// Mode 0644: public material (certificates, public keys).
    Everyone,
}

impl Access {
    #[cfg(unix)]
    fn mode(self) -> u32 {
        match self {
            Self::Owner => 0o600,
            Self::Everyone => 0o644,
        }
    }
}

/// Creates `path` (which must not exist) with mode 0600 and `bytes`, durably.
pub fn create_secret(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, Access::Owner.mode());
    let mut file = opts.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    sync_parent(path)
}

/// Replaces `path` atomically with `bytes`: written to a temporary file beside it (with `access` from the start),
/// fsynced, renamed over `path`, and the directory fsynced so that the rename itself survives a power loss.
pub fn replace(path: &Path, bytes: &[u8], access: Access) -> std::io::Result<()> {
    let name = path.file_name().ok_or_else(|| std::io::Error::other("replace: path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, access.mode());
    let mut file = opts.open(&tmp)?;
    // A temporary file left by an earlier crash keeps its old mode: set it again before writing.
    #[cfg(unix)]
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(access.mode()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    sync_parent(path)
}

/// Fsyncs the directory holding `path`, so that a new or renamed entry in it is durable.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(parent)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(unix)]
    use std::os::unix::fs::PermissionsExt;

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    #[test]
    fn secret_is_created_owner_only_and_never_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k");
        create_secret(&path, b"one").expect("create");
        assert_eq!(std::fs::read(&path).expect("read"), b"one");
        #[cfg(unix)]
        assert_eq!(mode(&path), 0o600);
        let again = create_secret(&path, b"two").expect_err("an existing secret is never overwritten");
        assert_eq!(again.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).expect("read"), b"one");
    }

    #[test]
    fn replace_swaps_contents_and_sets_the_mode_even_over_a_stale_temporary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        // A temporary file left world-readable by a crash must not leak the next secret written through it.
        std::fs::write(dir.path().join(".state.json.tmp"), b"stale").expect("stale tmp");
        #[cfg(unix)]
        std::fs::set_permissions(dir.path().join(".state.json.tmp"), std::fs::Permissions::from_mode(0o666))
            .expect("chmod");
        replace(&path, b"first", Access::Owner).expect("replace");
        replace(&path, b"second", Access::Owner).expect("replace");
        assert_eq!(std::fs::read(&path).expect("read"), b"second");
        assert!(!dir.path().join(".state.json.tmp").exists(), "the temporary is renamed away");
        #[cfg(unix)]
        assert_eq!(mode(&path), 0o600);
        replace(&path, b"public", Access::Everyone).expect("replace");
        #[cfg(unix)]
        assert_eq!(mode(&path), 0o644);
    }
}
