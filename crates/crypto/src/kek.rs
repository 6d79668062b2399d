//! The key-encryption key: generation, its file encoding, and the check value that binds a KEK
//! file to the database it was created with.

use std::fmt;

use aws_lc_rs::hmac;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::{RandomError, hex, random_bytes};

const FILE_TAG: &str = "caracal-kek:v1";
const CHECK_LABEL: &[u8] = b"caracal:kek-check:v1";

/// A 256-bit key-encryption key and its id. Envelopes record the id so a rotated KEK can still
/// open what its predecessor sealed.
#[derive(Clone)]
pub struct Kek {
    key_id: String,
    key: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KekError {
    #[error("the KEK file is not in the `caracal-kek:v1:<id>:<key>` format")]
    Malformed,
    #[error("the KEK key is not 32 bytes of base64url")]
    BadKey,
    #[error(transparent)]
    Random(#[from] RandomError),
}

impl Kek {
    pub fn generate() -> Result<Kek, KekError> {
        let id_bytes: [u8; 8] = random_bytes()?;
        Ok(Kek {
            key_id: format!("kek_{}", hex(&id_bytes)),
            key: random_bytes()?,
        })
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub(crate) fn key(&self) -> &[u8; 32] {
        &self.key
    }

    /// The file form: `caracal-kek:v1:<key id>:<base64url key>` and a newline.
    pub fn to_file_text(&self) -> String {
        format!(
            "{FILE_TAG}:{}:{}\n",
            self.key_id,
            URL_SAFE_NO_PAD.encode(self.key)
        )
    }

    pub fn from_file_text(text: &str) -> Result<Kek, KekError> {
        let rest = text
            .trim_end()
            .strip_prefix(FILE_TAG)
            .ok_or(KekError::Malformed)?;
        let rest = rest.strip_prefix(':').ok_or(KekError::Malformed)?;
        let (key_id, key_text) = rest.split_once(':').ok_or(KekError::Malformed)?;
        let id_ok = key_id.starts_with("kek_")
            && key_id.len() > 4
            && key_id
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_');
        if !id_ok {
            return Err(KekError::Malformed);
        }
        let decoded = URL_SAFE_NO_PAD
            .decode(key_text)
            .map_err(|_| KekError::BadKey)?;
        let key: [u8; 32] = decoded.try_into().map_err(|_| KekError::BadKey)?;
        Ok(Kek {
            key_id: key_id.to_owned(),
            key,
        })
    }

    /// A 256-bit key for one purpose, derived from the KEK: HMAC-SHA256(KEK,
    /// `caracal:derive:v1:` ‖ label). Replicas that share the KEK derive the same keys; the
    /// label (e.g. `audit-chain:chain-1`) is what a row stores to name its key.
    pub fn derive(&self, label: &str) -> [u8; 32] {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.key);
        let tag = hmac::sign(&key, format!("caracal:derive:v1:{label}").as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// HMAC-SHA256 of a fixed label under the KEK, hex. Stored beside the key id so that a KEK
    /// file which does not belong to the database is detected without revealing the key.
    pub fn check_value(&self) -> String {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.key);
        hex(hmac::sign(&key, CHECK_LABEL).as_ref())
    }
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kek")
            .field("key_id", &self.key_id)
            .field("key", &"***")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_text_round_trips_and_keeps_the_check_value() {
        let kek = Kek::generate().unwrap();
        let parsed = Kek::from_file_text(&kek.to_file_text()).unwrap();
        assert_eq!(parsed.key_id(), kek.key_id());
        assert_eq!(parsed.check_value(), kek.check_value());
        assert_ne!(Kek::generate().unwrap().check_value(), kek.check_value());
    }

    #[test]
    fn malformed_files_are_refused() {
        let good = Kek::generate().unwrap().to_file_text();
        let short_key = format!("{FILE_TAG}:kek_ab:{}", URL_SAFE_NO_PAD.encode([0u8; 16]));
        let cases = [
            ("", KekError::Malformed),
            ("caracal-kek:v2:kek_ab:AAAA", KekError::Malformed),
            ("caracal-kek:v1:nokeyid", KekError::Malformed),
            ("caracal-kek:v1:bad id:AAAA", KekError::Malformed),
            (short_key.as_str(), KekError::BadKey),
        ];
        for (text, expected) in cases {
            assert_eq!(Kek::from_file_text(text).unwrap_err(), expected, "{text}");
        }
        assert!(Kek::from_file_text(&good).is_ok());
    }

    #[test]
    fn derived_keys_differ_by_label_and_by_kek() {
        let kek = Kek::generate().unwrap();
        assert_eq!(kek.derive("a"), kek.derive("a"));
        assert_ne!(kek.derive("a"), kek.derive("b"));
        assert_ne!(kek.derive("a"), Kek::generate().unwrap().derive("a"));
        assert_ne!(&kek.derive("a"), kek.key());
    }

    #[test]
    fn debug_hides_the_key() {
        let kek = Kek::generate().unwrap();
        assert!(format!("{kek:?}").contains("***"));
        assert!(!format!("{kek:?}").contains(&URL_SAFE_NO_PAD.encode(kek.key)));
    }
}
