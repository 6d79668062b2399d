//! The `_sig` field of stream messages (sdk-wire-contract §6.1): lower-case hex
//! HMAC-SHA256 over `<stream>\n` followed by `name=value\n` for every other field, sorted by
//! name.

use std::fmt;

use aws_lc_rs::hmac;
use caracal_crypto::hex;

use crate::Fields;

pub const SIGNATURE_FIELD: &str = "_sig";

/// The key that signs and verifies stream messages. Every producer and consumer of a deployment
/// shares it. During a rotation a previous key is still accepted when verifying (messages it
/// signed may wait in a stream), never used to sign.
#[derive(Clone)]
pub struct StreamKey {
    current: hmac::Key,
    previous: Option<hmac::Key>,
}

impl StreamKey {
    pub fn new(bytes: &[u8]) -> StreamKey {
        StreamKey {
            current: hmac::Key::new(hmac::HMAC_SHA256, bytes),
            previous: None,
        }
    }

    /// This key, also accepting what `previous` signed.
    #[must_use]
    pub fn accepting_previous(mut self, previous: &[u8]) -> StreamKey {
        self.previous = Some(hmac::Key::new(hmac::HMAC_SHA256, previous));
        self
    }
}

impl fmt::Debug for StreamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StreamKey(***)")
    }
}

/// Why a message's signature was refused; the string is the dead-letter reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureError {
    Missing,
    Mismatch,
}

impl SignatureError {
    pub fn reason(self) -> &'static str {
        match self {
            SignatureError::Missing => "missing_signature",
            SignatureError::Mismatch => "bad_signature",
        }
    }
}

/// The bytes the signature covers. `Fields` is sorted by name already.
pub fn canonical(stream: &str, fields: &Fields) -> String {
    let mut text = String::with_capacity(stream.len() + 1 + fields.len() * 32);
    text.push_str(stream);
    text.push('\n');
    for (name, value) in fields {
        if name == SIGNATURE_FIELD {
            continue;
        }
        text.push_str(name);
        text.push('=');
        text.push_str(value);
        text.push('\n');
    }
    text
}

pub fn sign(key: &StreamKey, stream: &str, fields: &Fields) -> String {
    hex(hmac::sign(&key.current, canonical(stream, fields).as_bytes()).as_ref())
}

/// Checks `_sig` in constant time, against the current key and then the previous one.
pub fn verify(key: &StreamKey, stream: &str, fields: &Fields) -> Result<(), SignatureError> {
    let claimed = fields.get(SIGNATURE_FIELD).ok_or(SignatureError::Missing)?;
    let claimed = caracal_crypto::unhex(claimed).ok_or(SignatureError::Mismatch)?;
    let message = canonical(stream, fields);
    std::iter::once(&key.current)
        .chain(&key.previous)
        .any(|key| hmac::verify(key, message.as_bytes(), &claimed).is_ok())
        .then_some(())
        .ok_or(SignatureError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference's interoperability vectors, byte for byte.
    #[test]
    fn reference_vectors() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/reference/fixtures/stream-sig-canonicalize.vectors.json"
        );
        let text =
            std::fs::read_to_string(path).expect("the shared fixtures are beside the project");
        let vectors: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        assert!(vectors.len() >= 4);
        for vector in vectors {
            let description = vector["description"].as_str().unwrap();
            let stream = vector["stream"].as_str().unwrap();
            // JSON nulls are fields that are never written.
            let fields: Fields = vector["values"]
                .as_object()
                .unwrap()
                .iter()
                .filter_map(|(name, value)| {
                    value.as_str().map(|value| (name.clone(), value.to_owned()))
                })
                .collect();
            let key_bytes =
                caracal_crypto::unhex(vector["hmac_key_hex"].as_str().unwrap()).unwrap();
            let key = StreamKey::new(&key_bytes);
            assert_eq!(
                canonical(stream, &fields),
                vector["expected_canonical"].as_str().unwrap(),
                "{description}"
            );
            let signature = sign(&key, stream, &fields);
            assert_eq!(
                signature,
                vector["expected_sig_hex"].as_str().unwrap(),
                "{description}"
            );

            let mut signed = fields.clone();
            signed.insert(SIGNATURE_FIELD.to_owned(), signature);
            assert_eq!(verify(&key, stream, &signed), Ok(()), "{description}");
        }
    }

    #[test]
    fn tampering_is_detected() {
        let key = StreamKey::new(b"k");
        let mut fields: Fields = [("zone_id".to_owned(), "z1".to_owned())].into();
        assert_eq!(verify(&key, "s", &fields), Err(SignatureError::Missing));
        fields.insert(SIGNATURE_FIELD.to_owned(), sign(&key, "s", &fields));
        assert_eq!(verify(&key, "s", &fields), Ok(()));
        assert_eq!(
            verify(&key, "other", &fields),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(&StreamKey::new(b"other"), "s", &fields),
            Err(SignatureError::Mismatch)
        );
        let mut edited = fields.clone();
        edited.insert("zone_id".to_owned(), "z2".to_owned());
        assert_eq!(verify(&key, "s", &edited), Err(SignatureError::Mismatch));
        let mut added = fields.clone();
        added.insert("reason".to_owned(), "x".to_owned());
        assert_eq!(verify(&key, "s", &added), Err(SignatureError::Mismatch));
        fields.insert(SIGNATURE_FIELD.to_owned(), "zz".to_owned());
        assert_eq!(verify(&key, "s", &fields), Err(SignatureError::Mismatch));
    }

    #[test]
    fn a_rotated_key_signs_new_and_still_accepts_the_previous_keys_messages() {
        let fields: Fields = [("zone_id".to_owned(), "z1".to_owned())].into();
        let signed_by = |key: &StreamKey| {
            let mut signed = fields.clone();
            signed.insert(SIGNATURE_FIELD.to_owned(), sign(key, "s", &fields));
            signed
        };
        let (old, new) = (StreamKey::new(b"old"), StreamKey::new(b"new"));
        let rotated = StreamKey::new(b"new").accepting_previous(b"old");
        assert_eq!(sign(&rotated, "s", &fields), sign(&new, "s", &fields));
        assert_eq!(verify(&rotated, "s", &signed_by(&old)), Ok(()));
        assert_eq!(verify(&rotated, "s", &signed_by(&new)), Ok(()));
        assert_eq!(
            verify(&rotated, "s", &signed_by(&StreamKey::new(b"third"))),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(&new, "s", &signed_by(&old)),
            Err(SignatureError::Mismatch),
            "once the previous key is dropped, its messages are refused"
        );
    }
}
