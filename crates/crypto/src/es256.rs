//! ES256 (ECDSA over P-256 with SHA-256): the zone signing keys that sign mandates, and the
//! public keys that verify them. Signatures are the fixed 64-byte `r ‖ s` form JWS uses.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _,
    ParsedPublicKey,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Es256Error {
    #[error("the private key is not a P-256 PKCS#8 document")]
    BadPrivateKey,
    #[error("the public key is not a point on P-256")]
    BadPublicKey,
    #[error("signing failed")]
    Signing,
}

/// A zone's private signing key. Its `Debug` prints only the public half.
pub struct SigningKey {
    pair: EcdsaKeyPair,
    pkcs8: Vec<u8>,
    public: PublicKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("public", &self.public_key())
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    pub fn generate() -> Result<SigningKey, Es256Error> {
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
            .map_err(|_| Es256Error::Signing)?;
        let pkcs8 = pair
            .to_pkcs8v1()
            .map_err(|_| Es256Error::Signing)?
            .as_ref()
            .to_vec();
        SigningKey::from_pair(pair, pkcs8)
    }

    fn from_pair(pair: EcdsaKeyPair, pkcs8: Vec<u8>) -> Result<SigningKey, Es256Error> {
        let point = pair.public_key().as_ref();
        let (x, y) = point
            .get(1..)
            .unwrap_or_default()
            .split_at(point.len().saturating_sub(1) / 2);
        let public = PublicKey::from_xy(x, y)?;
        Ok(SigningKey {
            pair,
            pkcs8,
            public,
            rng: SystemRandom::new(),
        })
    }

    pub fn from_pkcs8(der: &[u8]) -> Result<SigningKey, Es256Error> {
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
            .map_err(|_| Es256Error::BadPrivateKey)?;
        SigningKey::from_pair(pair, der.to_vec())
    }

    /// The PKCS#8 document: what gets sealed under the KEK.
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// `r ‖ s` over SHA-256 of `message`.
    pub fn sign(&self, message: &[u8]) -> Result<[u8; 64], Es256Error> {
        let signature = self
            .pair
            .sign(&self.rng, message)
            .map_err(|_| Es256Error::Signing)?;
        signature
            .as_ref()
            .try_into()
            .map_err(|_| Es256Error::Signing)
    }
}

/// A P-256 public key (the uncompressed point `04 ‖ x ‖ y`), parsed once for fast checks.
#[derive(Clone)]
pub struct PublicKey {
    point: [u8; 65],
    parsed: ParsedPublicKey,
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &PublicKey) -> bool {
        self.point == other.point
    }
}

impl Eq for PublicKey {}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", crate::hex(&self.point))
    }
}

impl PublicKey {
    /// From the JWK coordinates; refused unless the point is on the curve.
    pub fn from_xy(x: &[u8], y: &[u8]) -> Result<PublicKey, Es256Error> {
        if x.len() != 32 || y.len() != 32 {
            return Err(Es256Error::BadPublicKey);
        }
        let mut point = [4u8; 65];
        for (target, source) in point.iter_mut().skip(1).zip(x.iter().chain(y)) {
            *target = *source;
        }
        // Parsing checks the point is on the curve.
        let parsed = ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
            .map_err(|_| Es256Error::BadPublicKey)?;
        Ok(PublicKey { point, parsed })
    }

    pub fn x(&self) -> &[u8] {
        self.point.get(1..33).unwrap_or_default()
    }

    pub fn y(&self) -> &[u8] {
        self.point.get(33..65).unwrap_or_default()
    }

    /// Whether `signature` (`r ‖ s`) signs `message` under this key.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        signature.len() == 64 && self.parsed.verify_sig(message, signature).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_under_their_key_and_message() {
        let key = SigningKey::generate().unwrap();
        let signature = key.sign(b"message").unwrap();
        let public = key.public_key();
        assert!(public.verify(b"message", &signature));
        assert!(!public.verify(b"messagf", &signature));
        let other_key = SigningKey::generate().unwrap();
        let other = other_key.public_key();
        assert!(!other.verify(b"message", &signature));
        let mut flipped = signature;
        flipped[10] ^= 1;
        assert!(!public.verify(b"message", &flipped));
        assert!(!public.verify(b"message", &signature[..63]));
    }

    #[test]
    fn keys_survive_pkcs8_and_jwk_coordinates() {
        let key = SigningKey::generate().unwrap();
        let again = SigningKey::from_pkcs8(key.pkcs8()).unwrap();
        assert_eq!(again.public_key(), key.public_key());
        let public = key.public_key();
        let rebuilt = PublicKey::from_xy(public.x(), public.y()).unwrap();
        assert_eq!(&rebuilt, public);
        assert!(rebuilt.verify(b"m", &again.sign(b"m").unwrap()));
        assert!(PublicKey::from_xy(&[1; 32], &[2; 32]).is_err());
        assert!(PublicKey::from_xy(&[1; 31], public.y()).is_err());
        assert!(SigningKey::from_pkcs8(b"not a key").is_err());
        assert!(!format!("{key:?}").contains(&crate::hex(key.pkcs8())));
    }
}
