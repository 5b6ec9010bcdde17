//! Files written so that a crash or power loss leaves either the old contents or the new, never a torn or
//! rolled-back file, and secret files readable by their owner only: the one writer used for every key and every
//! state file of the relay, the exporter and the client.
//!
//! Contract: a secret is created with mode 0600 from its first byte (never written and then chmod-ed); after
//! [`create_secret`] or [`replace`] returns, the file's data and its directory entry are on disk (the file and its
//! parent directory are fsynced). A data directory made by [`private_dir`] is 0700 from its creation;
//! [`restrict_tree`] tightens one made before (directories 0700, files 0600), and [`restrict_new_files`] makes a
//! process create its files and directories for its owner only (umask 077), for those a library creates (sled).

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
    replace_all(&[(path, bytes)], access)
}

/// Replaces each `(path, bytes)` as [`replace`] does, for the cost of about one flush however many there are: every
/// temporary file is written first, then each is fsynced (the first fsync commits them all on a journalling file
/// system; the others find little left to do), then all are renamed, then each parent directory is fsynced once.
/// Each file ends either old or new, never torn; after a crash part-way some may be new and others old. When it
/// returns, all are on disk.
pub fn replace_all(files: &[(&Path, &[u8])], access: Access) -> std::io::Result<()> {
    let mut written = Vec::with_capacity(files.len());
    for (path, bytes) in files {
        let tmp = temporary(path)?;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, access.mode());
        let mut file = opts.open(&tmp)?;
        // A temporary file left by an earlier crash keeps its old mode: set it again before writing.
        #[cfg(unix)]
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(access.mode()))?;
        file.write_all(bytes)?;
        written.push((file, tmp, *path));
    }
    for (file, _, _) in &written {
        file.sync_all()?;
    }
    for (_, tmp, path) in &written {
        std::fs::rename(tmp, path)?;
    }
    // One fsync per parent directory: `synced` holds one path of each directory already done.
    let mut synced: Vec<&Path> = Vec::new();
    for (_, _, path) in &written {
        if !synced.iter().any(|done| done.parent() == path.parent()) {
            sync_parent(path)?;
            synced.push(path);
        }
    }
    Ok(())
}

/// The temporary file [`replace`] writes `path` through: `.NAME.tmp` beside it.
fn temporary(path: &Path) -> std::io::Result<std::path::PathBuf> {
    let name = path.file_name().ok_or_else(|| std::io::Error::other("replace: path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    Ok(path.with_file_name(tmp_name))
}

/// Creates `dir` (and missing parents) with mode 0700, or tightens it to 0700 if it exists.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)?;
    #[cfg(unix)]
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    Ok(())
}

/// Makes `dir` and every directory under it 0700 and every file under it 0600, changing only those that are
/// looser. Symbolic links are left alone (never followed).
pub fn restrict_tree(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            let meta = std::fs::symlink_metadata(&d)?;
            if meta.permissions().mode() & 0o777 != 0o700 {
                std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))?;
            }
            for entry in std::fs::read_dir(&d)? {
                let entry = entry?;
                let kind = entry.file_type()?;
                if kind.is_dir() {
                    stack.push(entry.path());
                } else if kind.is_file() && entry.metadata()?.permissions().mode() & 0o077 != 0 {
                    std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o600))?;
                }
            }
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Sets the process's umask to 077: every file and directory it creates from now on, including those created by
/// libraries that take no mode (the sled store), is its owner's alone. For server binaries, at start.
pub fn restrict_new_files() {
    #[cfg(unix)]
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
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
    fn replace_all_writes_every_file_owner_only_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).expect("mkdir");
        let (a, b, c) = (dir.path().join("a"), dir.path().join("b"), sub.join("c"));
        std::fs::write(&a, b"old").expect("old a");
        replace_all(&[(&a, b"new a"), (&b, b"new b"), (&c, b"new c")], Access::Owner).expect("replace");
        for (path, want) in [(&a, &b"new a"[..]), (&b, b"new b"), (&c, b"new c")] {
            assert_eq!(std::fs::read(path).expect("read"), want);
            #[cfg(unix)]
            assert_eq!(mode(path), 0o600);
        }
        let left: Vec<_> = [dir.path(), sub.as_path()]
            .iter()
            .flat_map(|d| std::fs::read_dir(d).expect("list"))
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "temporaries renamed away: {left:?}");
        replace_all(&[], Access::Owner).expect("nothing to write");
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

    #[cfg(unix)]
    #[test]
    fn private_dirs_are_created_and_tightened_owner_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("a/b");
        private_dir(&data).expect("create");
        assert_eq!((mode(&dir.path().join("a")), mode(&data)), (0o700, 0o700));
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::create_dir(data.join("sub")).expect("mkdir");
        std::fs::set_permissions(data.join("sub"), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::write(data.join("sub/f"), b"x").expect("write");
        std::fs::set_permissions(data.join("sub/f"), std::fs::Permissions::from_mode(0o644)).expect("chmod");
        std::fs::write(data.join("g"), b"x").expect("write");
        std::fs::set_permissions(data.join("g"), std::fs::Permissions::from_mode(0o400)).expect("chmod");
        restrict_tree(&data).expect("restrict");
        assert_eq!((mode(&data), mode(&data.join("sub")), mode(&data.join("sub/f"))), (0o700, 0o700, 0o600));
        assert_eq!(mode(&data.join("g")), 0o400, "already private: unchanged");
        private_dir(&data).expect("an existing dir is fine");
    }
}
