//! The device's long-term keys: an Ed25519 identity key (signs authentication and message content) and an X25519
//! key that sealed envelopes are encrypted to, bound to the identity key by a signature the device publishes
//! ([`Identity::sealing_key_signature`]). Secret bytes never appear in `Debug` output or logs.

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use relay_proto::AccountId;
use x25519_dalek::{PublicKey, StaticSecret};

/// The device's key pairs.
#[derive(Clone)]
pub struct Identity {
    signing: SigningKey,
    sealing: StaticSecret,
    /// The public half of `sealing`, derived once: every envelope sealed or opened names it, and deriving it is a
    /// scalar multiplication.
    sealing_public: [u8; 32],
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", self.account_id())
    }
}

impl Identity {
    /// Fresh random keys.
    pub fn generate() -> Self {
        let mut rng = rand::rng();
        Self::from_keys(SigningKey::generate(&mut rng), StaticSecret::random_from_rng(&mut rng))
    }

    fn from_keys(signing: SigningKey, sealing: StaticSecret) -> Self {
        let sealing_public = PublicKey::from(&sealing).to_bytes();
        Self { signing, sealing, sealing_public }
    }

    /// Keys from their secret bytes.
    pub fn from_secrets(signing: [u8; 32], sealing: [u8; 32]) -> Self {
        Self::from_keys(SigningKey::from_bytes(&signing), StaticSecret::from(sealing))
    }

    /// The secret bytes (identity, sealing), for the key file.
    pub fn secrets(&self) -> ([u8; 32], [u8; 32]) {
        (self.signing.to_bytes(), self.sealing.to_bytes())
    }

    /// Ed25519 public identity key.
    pub fn identity_key(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// The verifying key.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// X25519 public key for sealed envelopes.
    pub fn sealing_key(&self) -> [u8; 32] {
        self.sealing_public
    }

    /// The X25519 secret, for opening envelopes.
    pub(crate) fn sealing_secret(&self) -> &StaticSecret {
        &self.sealing
    }

    /// The account id the relay derives from the identity key.
    pub fn account_id(&self) -> AccountId {
        AccountId::from_identity_key(&self.identity_key())
    }

    /// The identity key's signature binding the sealing key to it (`relay_proto::identity::binding_bytes`):
    /// published at registration, handed out with the keys by every lookup and bundle, and carried in a session's
    /// first message. Ed25519 is deterministic, so it is the same signature every time.
    pub fn sealing_key_signature(&self) -> [u8; 64] {
        self.sign(&relay_proto::identity::binding_bytes(&self.identity_key(), &self.sealing_key()))
    }

    /// Signs `msg` with the identity key.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.signing.sign(msg).to_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The public key kept beside the secret is the one the secret derives, however the identity was made.
    #[test]
    fn the_kept_sealing_key_is_the_secrets_public_key() {
        let generated = Identity::generate();
        assert_eq!(generated.sealing_key(), PublicKey::from(generated.sealing_secret()).to_bytes());
        let (signing, sealing) = generated.secrets();
        let restored = Identity::from_secrets(signing, sealing);
        assert_eq!(restored.sealing_key(), generated.sealing_key());
        assert_eq!(restored.sealing_key(), PublicKey::from(&StaticSecret::from(sealing)).to_bytes());
    }
}
