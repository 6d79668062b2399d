//! Argon2id hashes of client secrets: what the store keeps instead of the secret.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

/// Shortest client secret accepted (the reference's floor).
pub const MIN_SECRET_CHARS: usize = 32;

/// The reference's parameters: 64 MiB, three passes, two lanes.
fn hasher() -> Argon2<'static> {
    let params = Params::new(64 * 1024, 3, 2, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretHashError {
    #[error("the system random number generator failed")]
    Random,
    #[error("hashing failed")]
    Hash,
}

/// The Argon2id PHC string of `secret`, with a fresh random salt.
pub fn hash_secret(secret: &str) -> Result<String, SecretHashError> {
    let salt_bytes = crate::random_bytes::<16>().map_err(|_| SecretHashError::Random)?;
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|_| SecretHashError::Hash)?;
    hasher()
        .hash_password(secret.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|_| SecretHashError::Hash)
}

/// Whether `secret` matches a stored PHC string; a malformed one matches nothing.
pub fn verify_secret(secret: &str, stored: &str) -> bool {
    PasswordHash::new(stored)
        .is_ok_and(|hash| hasher().verify_password(secret.as_bytes(), &hash).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_secret_verifies_and_salts_differ() {
        let secret = "s".repeat(MIN_SECRET_CHARS);
        let first = hash_secret(&secret).unwrap();
        let second = hash_secret(&secret).unwrap();
        assert!(
            first.starts_with("$argon2id$v=19$m=65536,t=3,p=2$"),
            "{first}"
        );
        assert_ne!(first, second);
        assert!(verify_secret(&secret, &first));
        assert!(!verify_secret(&"t".repeat(MIN_SECRET_CHARS), &first));
        assert!(!verify_secret(&secret, "not a hash"));
    }
}
