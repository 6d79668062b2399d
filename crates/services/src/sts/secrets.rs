//! Client secret verification: Argon2id is deliberately slow (tens of milliseconds), so a
//! verified secret is remembered for an hour as its SHA-256 next to the stored hash it matched,
//! and cold verifications run two at a time on blocking threads so a flood of wrong secrets
//! cannot starve the runtime.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

const TTL: Duration = Duration::from_secs(3600);
const CAPACITY: usize = 8192;
const COLD_CONCURRENCY: usize = 2;

struct Verified {
    digest: [u8; 32],
    /// The stored hash it matched: a rotated secret changes it, so the entry stops counting.
    stored_hash: String,
    at: Instant,
}

pub struct SecretCache {
    verified: Mutex<HashMap<String, Verified>>,
    cold: Semaphore,
}

impl Default for SecretCache {
    fn default() -> SecretCache {
        SecretCache {
            verified: Mutex::default(),
            cold: Semaphore::new(COLD_CONCURRENCY),
        }
    }
}

impl SecretCache {
    /// Whether `secret` is the secret of `application_id`, whose stored hash is `stored_hash`.
    pub async fn verify(&self, application_id: &str, secret: &str, stored_hash: &str) -> bool {
        let digest = caracal_crypto::sha256(secret.as_bytes());
        if self.cached(application_id, &digest, stored_hash) {
            return true;
        }
        let Ok(_permit) = self.cold.acquire().await else {
            return false;
        };
        let (secret, stored) = (secret.to_owned(), stored_hash.to_owned());
        let verified =
            tokio::task::spawn_blocking(move || caracal_crypto::verify_secret(&secret, &stored))
                .await
                .unwrap_or(false);
        if verified {
            self.remember(application_id, digest, stored_hash);
        }
        verified
    }

    fn cached(&self, application_id: &str, digest: &[u8; 32], stored_hash: &str) -> bool {
        let verified = self
            .verified
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        verified.get(application_id).is_some_and(|entry| {
            entry.at.elapsed() < TTL
                && entry.stored_hash == stored_hash
                && aws_lc_rs::constant_time::verify_slices_are_equal(&entry.digest, digest).is_ok()
        })
    }

    fn remember(&self, application_id: &str, digest: [u8; 32], stored_hash: &str) {
        let mut verified = self
            .verified
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if verified.len() >= CAPACITY {
            verified.retain(|_, entry| entry.at.elapsed() < TTL);
            if verified.len() >= CAPACITY {
                // Still full of live entries: start over rather than grow without bound.
                verified.clear();
            }
        }
        verified.insert(
            application_id.to_owned(),
            Verified {
                digest,
                stored_hash: stored_hash.to_owned(),
                at: Instant::now(),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_verified_secret_is_cached_until_the_hash_changes() {
        let cache = SecretCache::default();
        let secret = "s".repeat(32);
        let hash = caracal_crypto::hash_secret(&secret).unwrap();
        assert!(cache.verify("app", &secret, &hash).await);
        assert!(cache.cached("app", &caracal_crypto::sha256(secret.as_bytes()), &hash));
        assert!(!cache.verify("app", &"t".repeat(32), &hash).await);
        // A rotated secret: the old secret no longer matches the new hash, cached or not.
        let rotated = caracal_crypto::hash_secret(&"u".repeat(32)).unwrap();
        assert!(!cache.cached("app", &caracal_crypto::sha256(secret.as_bytes()), &rotated));
        assert!(!cache.verify("app", &secret, &rotated).await);
    }
}
