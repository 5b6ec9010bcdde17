//! The relay's sender-certificate key: an Ed25519 key generated on first start and kept in the data directory
//! (`sender-certificate.key`, the 32-byte seed, mode 0600), with which the relay vouches, to recipients, for the
//! number and keys of the account that sent a sealed envelope (`relay_proto::identity`).
//!
//! Contract: the key never leaves this module except as its public half, which `Registered` and `AuthOk` carry and
//! clients pin. Certificates are issued only from the directory's record of an authenticated account (see
//! `session::auth`), never from what a request states. Losing the file makes every client refuse the new key: keep
//! it with the TLS key.

use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use relay_proto::PhoneNumber;
use relay_proto::identity::{CERTIFICATE_VALIDITY_MS, SenderCertificate, SignedCertificate};

use crate::store::directory::AccountKeys;

/// File name of the key in the data directory.
pub const KEY_FILE: &str = "sender-certificate.key";

/// Why the key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertificateKeyError {
    /// Reading or writing the file failed.
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// The file is not a 32-byte seed.
    #[error("{0} is not a 32-byte Ed25519 seed")]
    Corrupt(PathBuf),
    /// No randomness for a new key.
    #[error("no randomness to generate the sender-certificate key")]
    Random,
}

/// Issues sender certificates.
pub struct CertificateIssuer {
    key: SigningKey,
}

impl std::fmt::Debug for CertificateIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CertificateIssuer({})", hex::encode(self.public_key()))
    }
}

impl CertificateIssuer {
    /// Loads the key from `data_dir`, generating it (durably, 0600 from the first byte) on first start.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, CertificateKeyError> {
        let path = data_dir.join(KEY_FILE);
        if !path.exists() {
            let mut seed = [0u8; 32];
            relay_quic::crypto_provider().secure_random.fill(&mut seed).map_err(|_| CertificateKeyError::Random)?;
            relay_quic::durable_file::create_secret(&path, &seed)
                .map_err(|e| CertificateKeyError::Io(path.clone(), e))?;
        }
        let bytes = std::fs::read(&path).map_err(|e| CertificateKeyError::Io(path.clone(), e))?;
        let seed: [u8; 32] = bytes.try_into().map_err(|_| CertificateKeyError::Corrupt(path))?;
        Ok(Self { key: SigningKey::from_bytes(&seed) })
    }

    /// The public key clients pin.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// A certificate for the account with `keys`, registered with `phone`, valid from `now_ms` for
    /// [`CERTIFICATE_VALIDITY_MS`].
    pub fn issue(&self, keys: &AccountKeys, phone: PhoneNumber, now_ms: u64) -> SignedCertificate {
        let expires_ms = now_ms.saturating_add(CERTIFICATE_VALIDITY_MS);
        SenderCertificate::new(keys.identity_key, keys.sealing_key, phone, expires_ms).sign(&self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_created_once_private_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = CertificateIssuer::load_or_create(dir.path()).expect("create");
        let again = CertificateIssuer::load_or_create(dir.path()).expect("load");
        assert_eq!(first.public_key(), again.public_key());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE)).expect("meta").permissions().mode();
            assert_eq!(mode & 0o077, 0, "the key is readable by its owner only");
        }
        std::fs::write(dir.path().join(KEY_FILE), [1; 31]).expect("corrupt it");
        assert!(matches!(CertificateIssuer::load_or_create(dir.path()), Err(CertificateKeyError::Corrupt(_))));
    }

    #[test]
    fn a_certificate_verifies_under_the_public_key_and_says_what_the_directory_says() {
        let dir = tempfile::tempdir().expect("tempdir");
        let issuer = CertificateIssuer::load_or_create(dir.path()).expect("create");
        let keys = AccountKeys { identity_key: [3; 32], sealing_key: [4; 32], sealing_key_signature: None };
        let phone = PhoneNumber::parse("+33612345678").expect("valid");
        let signed = issuer.issue(&keys, phone.clone(), 1_000);
        let key = ed25519_dalek::VerifyingKey::from_bytes(&issuer.public_key()).expect("key");
        let cert = signed.verify(&key, 1_000).expect("valid");
        assert_eq!((cert.identity_key, cert.sealing_key, cert.phone), ([3; 32], [4; 32], phone));
        assert_eq!(cert.expires_ms, 1_000 + CERTIFICATE_VALIDITY_MS);
    }
}
