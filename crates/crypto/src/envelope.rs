//! Envelope encryption under the KEK. Each secret gets its own random data key (AES-256-GCM);
//! the data key is wrapped under the KEK (AES-256-GCM as well). The purpose and the KEK id are
//! authenticated with both, so an envelope opens only for the use it was sealed for, and says
//! which KEK it needs.
//!
//! Text form: `env1.<kek id>.<wrapped data key>.<ciphertext>`, each part base64url, each
//! encrypted part prefixed with its 12-byte nonce.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::{Kek, random_bytes};

const TAG: &str = "env1";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("the envelope is malformed")]
    Malformed,
    #[error("the envelope was sealed under KEK `{0}`, which is not loaded")]
    WrongKek(String),
    /// Wrong purpose, tampered bytes or the wrong key: indistinguishable by design.
    #[error("the envelope does not open (tampered, or sealed for another purpose)")]
    Unopenable,
    #[error("the system random number generator failed")]
    Random,
}

fn seal_with(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
    let key =
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).map_err(|_| EnvelopeError::Random)?);
    let nonce: [u8; NONCE_LEN] = random_bytes().map_err(|_| EnvelopeError::Random)?;
    let mut sealed = plaintext.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut sealed,
    )
    .map_err(|_| EnvelopeError::Random)?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&sealed);
    Ok(out)
}

fn open_with(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, key).map_err(|_| EnvelopeError::Unopenable)?,
    );
    let (nonce, ciphertext) = sealed
        .split_at_checked(NONCE_LEN)
        .ok_or(EnvelopeError::Malformed)?;
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| EnvelopeError::Malformed)?;
    let mut buffer = ciphertext.to_vec();
    let plaintext = key
        .open_in_place(nonce, Aad::from(aad), &mut buffer)
        .map_err(|_| EnvelopeError::Unopenable)?;
    Ok(plaintext.to_vec())
}

fn aad(kek_id: &str, purpose: &str, part: &str) -> Vec<u8> {
    format!("caracal:{TAG}:{part}:{kek_id}:{purpose}").into_bytes()
}

impl Kek {
    /// Seals `plaintext` for `purpose` (e.g. `provider:api_key:<provider id>`).
    pub fn seal(&self, purpose: &str, plaintext: &[u8]) -> Result<String, EnvelopeError> {
        let data_key: [u8; 32] = random_bytes().map_err(|_| EnvelopeError::Random)?;
        let wrapped = seal_with(self.key(), &aad(self.key_id(), purpose, "dek"), &data_key)?;
        let ciphertext = seal_with(&data_key, &aad(self.key_id(), purpose, "data"), plaintext)?;
        Ok(format!(
            "{TAG}.{}.{}.{}",
            self.key_id(),
            URL_SAFE_NO_PAD.encode(wrapped),
            URL_SAFE_NO_PAD.encode(ciphertext)
        ))
    }

    /// Opens an envelope sealed for `purpose` under this KEK.
    pub fn open(&self, purpose: &str, envelope: &str) -> Result<Vec<u8>, EnvelopeError> {
        let mut parts = envelope.split('.');
        let (Some(TAG), Some(kek_id), Some(wrapped), Some(ciphertext), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(EnvelopeError::Malformed);
        };
        if kek_id != self.key_id() {
            return Err(EnvelopeError::WrongKek(kek_id.to_owned()));
        }
        let wrapped = URL_SAFE_NO_PAD
            .decode(wrapped)
            .map_err(|_| EnvelopeError::Malformed)?;
        let ciphertext = URL_SAFE_NO_PAD
            .decode(ciphertext)
            .map_err(|_| EnvelopeError::Malformed)?;
        let data_key = open_with(self.key(), &aad(kek_id, purpose, "dek"), &wrapped)?;
        let data_key: [u8; 32] = data_key.try_into().map_err(|_| EnvelopeError::Unopenable)?;
        open_with(&data_key, &aad(kek_id, purpose, "data"), &ciphertext)
    }
}

/// The KEK id an envelope names, without opening it.
pub fn envelope_kek_id(envelope: &str) -> Option<&str> {
    let mut parts = envelope.split('.');
    (parts.next() == Some(TAG)).then(|| parts.next()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_open_only_for_their_purpose_and_key() {
        let kek = Kek::generate().unwrap();
        let envelope = kek.seal("provider:api_key:p1", b"sk-live-123").unwrap();
        assert_eq!(envelope_kek_id(&envelope), Some(kek.key_id()));
        assert!(!envelope.contains("sk-live"));
        assert_eq!(
            kek.open("provider:api_key:p1", &envelope).unwrap(),
            b"sk-live-123"
        );
        assert_ne!(
            kek.seal("provider:api_key:p1", b"sk-live-123").unwrap(),
            envelope,
            "fresh keys and nonces"
        );

        assert_eq!(
            kek.open("provider:api_key:p2", &envelope),
            Err(EnvelopeError::Unopenable)
        );
        let other = Kek::generate().unwrap();
        assert_eq!(
            other.open("provider:api_key:p1", &envelope),
            Err(EnvelopeError::WrongKek(kek.key_id().to_owned()))
        );
        let forged = envelope.replacen(kek.key_id(), other.key_id(), 1);
        assert_eq!(
            other.open("provider:api_key:p1", &forged),
            Err(EnvelopeError::Unopenable)
        );
    }

    #[test]
    fn tampered_or_malformed_envelopes_are_refused() {
        let kek = Kek::generate().unwrap();
        let envelope = kek.seal("p", b"secret").unwrap();
        let mut bytes = envelope.clone().into_bytes();
        let last = bytes.len() - 2;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        assert_eq!(kek.open("p", &tampered), Err(EnvelopeError::Unopenable));
        for text in [
            "",
            "env1",
            "env2.a.b.c",
            &format!("{envelope}.extra"),
            "env1.kek_x.!!.!!",
        ] {
            assert!(kek.open("p", text).is_err(), "{text}");
        }
    }
}
