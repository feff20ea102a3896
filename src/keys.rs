//! Key material: generation, the SHA-256 look-up hash, the AES-256-GCM recoverable copy and
//! the display form. Nothing here logs; [`Secret`] keeps key material out of `Debug` output.

use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use rand::rngs::OsRng;
use rand::{Rng, RngCore};
use sha2::{Digest, Sha256};
use uuid::Uuid;

const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
/// Characters after `<prefix>-`.
pub(crate) const KEY_BODY_LEN: usize = 32;
/// First byte of a sealed key: names the encryption scheme, so keys can be re-sealed
/// under a new scheme or a rotated encryption key later without guessing.
const SEAL_V1: u8 = 1;
const NONCE_LEN: usize = 12;

/// A string that must never be printed: API keys, the admin token, the encryption key.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A fresh API key: `<prefix>-` and 32 characters of `[A-Za-z0-9]` from the OS generator.
pub(crate) fn generate(prefix: &str) -> Secret {
    let mut rng = OsRng;
    let body: String = (0..KEY_BODY_LEN)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    Secret(format!("{prefix}-{body}"))
}

/// Lower-case hex SHA-256 of the key: the only form used to find a key.
pub fn hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// `sk-AbCd…wXyZ`: enough to recognise a key, far too little to use it.
pub(crate) fn display(key: &str) -> String {
    let (prefix, body) = key.rsplit_once('-').unwrap_or(("", key));
    let chars: Vec<char> = body.chars().collect();
    if chars.len() < 12 {
        return format!("{prefix}-…");
    }
    let head: String = chars[..4].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{prefix}-{head}…{tail}")
}

/// The AES-256-GCM key that seals the recoverable copy of every API key.
#[derive(Clone)]
pub struct EncryptionKey(Aes256Gcm);

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EncryptionKey(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("encryption key must be base64 of exactly 32 bytes")]
    BadEncryptionKey,
    #[error("sealed key could not be opened (wrong encryption key or corrupted data)")]
    Open,
    #[error("sealed key has an unknown format version")]
    Version,
}

impl EncryptionKey {
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| KeyError::BadEncryptionKey)?;
        if bytes.len() != 32 {
            return Err(KeyError::BadEncryptionKey);
        }
        Aes256Gcm::new_from_slice(&bytes)
            .map(EncryptionKey)
            .map_err(|_| KeyError::BadEncryptionKey)
    }

    /// `version || nonce || ciphertext+tag`; the key id is the associated data, so a sealed
    /// copy moved to another row does not open.
    pub(crate) fn seal(&self, key_id: Uuid, key: &Secret) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        let payload = Payload {
            msg: key.expose().as_bytes(),
            aad: key_id.as_bytes(),
        };
        // Encryption with a valid key and an in-memory buffer cannot fail.
        let ciphertext = self
            .0
            .encrypt(Nonce::from_slice(&nonce), payload)
            .unwrap_or_default();
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
        out.push(SEAL_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    pub(crate) fn open(&self, key_id: Uuid, sealed: &[u8]) -> Result<Secret, KeyError> {
        let (&version, rest) = sealed.split_first().ok_or(KeyError::Open)?;
        if version != SEAL_V1 {
            return Err(KeyError::Version);
        }
        if rest.len() < NONCE_LEN {
            return Err(KeyError::Open);
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let plain = self
            .0
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: key_id.as_bytes(),
                },
            )
            .map_err(|_| KeyError::Open)?;
        String::from_utf8(plain)
            .map(Secret)
            .map_err(|_| KeyError::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc() -> EncryptionKey {
        EncryptionKey::from_base64(&base64::engine::general_purpose::STANDARD.encode([7u8; 32]))
            .unwrap()
    }

    #[test]
    fn generated_keys_have_the_contract_format() {
        let k = generate("sk");
        let body = k.expose().strip_prefix("sk-").unwrap();
        assert_eq!(body.len(), 32);
        assert!(body.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_ne!(generate("sk"), k);
    }

    #[test]
    fn seal_opens_only_with_the_same_id() {
        let key = generate("sk");
        let id = Uuid::new_v4();
        let sealed = enc().seal(id, &key);
        assert!(!sealed
            .windows(key.expose().len())
            .any(|w| w == key.expose().as_bytes()));
        assert_eq!(enc().open(id, &sealed).unwrap(), key);
        assert!(enc().open(Uuid::new_v4(), &sealed).is_err());
    }

    #[test]
    fn bad_encryption_keys_are_refused() {
        assert!(EncryptionKey::from_base64("c2hvcnQ=").is_err());
        assert!(EncryptionKey::from_base64("not base64!").is_err());
    }

    #[test]
    fn display_hides_the_middle() {
        assert_eq!(
            display("sk-AbCdefghijklmnopqrstuvwxyz12wXyZ"),
            "sk-AbCd…wXyZ"
        );
        assert!(format!("{:?}", Secret::new("sk-x")).contains("redacted"));
    }
}
