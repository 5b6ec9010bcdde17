//! The `file` verifier, for tests and local demos: each pending code is written to
//! `<data_dir>/verification/<request id>` as one JSON line, `{"phone", "code", "expires_at"}` (the body the
//! webhook verifier posts), where whoever runs the relay can read it.
//!
//! Contract: the directory is mode 0700 and each file 0600 from its first byte (`durable_file::create_secret`). A
//! file lives as long as its request: it is removed when the code is used to register, when a newer request for the
//! number replaces it, when its attempts run out and when it expires (the relay's sweep). These files are the only
//! place the relay writes a code, and, for a number that never registers, the only place it writes that number.

use std::path::{Path, PathBuf};

use super::code::RequestId;
use super::{CodeMessage, DeliveryError};

/// Name of the directory under the data directory.
pub const DIR: &str = "verification";

/// Writes and removes code files.
pub struct FileSender {
    dir: PathBuf,
}

impl FileSender {
    /// Creates (or tightens to 0700) `<data_dir>/verification`.
    pub fn open(data_dir: &Path) -> std::io::Result<Self> {
        let dir = data_dir.join(DIR);
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&dir)?;
        // A directory made earlier (or by someone else) with a wider mode is narrowed before any code goes in.
        #[cfg(unix)]
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        Ok(Self { dir })
    }

    /// The file of request `id`.
    pub fn path(&self, id: &RequestId) -> PathBuf {
        self.dir.join(id.to_string())
    }

    /// Writes the code file of `message`.
    pub async fn deliver(&self, message: &CodeMessage<'_>) -> Result<(), DeliveryError> {
        let (path, body) = (self.path(message.request_id), format!("{}\n", message.json()));
        tokio::task::spawn_blocking(move || relay_quic::durable_file::create_secret(&path, body.as_bytes()))
            .await
            .map_err(|e| DeliveryError::File(std::io::Error::other(e)))?
            .map_err(DeliveryError::File)
    }

    /// Removes the code file of request `id`, if it is still there.
    pub fn withdraw(&self, id: &RequestId) {
        match std::fs::remove_file(self.path(id)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(request = %id, error = %e, "could not remove a code file"),
        }
    }
}
