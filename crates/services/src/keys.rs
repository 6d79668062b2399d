//! Zone signing keys: created with the zone, sealed under the KEK, rotated with an overlap
//! during which the previous key still verifies. Only the STS's ring opens the private half
//! (`KeyRing::signing`); the Gateway's and the Coordinator's hold public keys alone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use caracal_crypto::Kek;
use caracal_crypto::es256::{PublicKey, SigningKey};
use caracal_store::{OutboxMessage, Store, StoreError};

use crate::mandate::MandateError;
use crate::wire::{Jwk, MandateClaims};

/// The stream that tells every STS and Gateway replica to drop a zone's cached keys.
pub const KEYS_INVALIDATE: &str = "caracal.keys.invalidate";

/// How long the previous key keeps verifying after a rotation, unless configured.
pub const DEFAULT_OVERLAP: Duration = Duration::from_secs(24 * 3600);

/// How long a replica trusts its cached keys without an invalidation.
const CACHE_TTL: Duration = Duration::from_secs(15 * 60);

/// How many verified session mandates a zone's key set remembers before it starts over.
const REMEMBERED_SESSIONS: usize = 1024;

/// `use=gateway` mandates the STS signed in this process. They come back to be verified: by
/// this STS's re-exchange, or by the Gateway beside it in one `caracal up`. A mandate shown
/// byte for byte as it was signed carries a signature known to be good, so its ES256
/// verification (about four times the cost of signing it) is skipped. Everything else is
/// still checked: the algorithm, that its key id names a key that verifies now, its claims.
/// Held as the SHA-256 of each mandate's text in a fixed table whose slots are overwritten,
/// never grown; a mandate not found (signed elsewhere, overwritten, altered) is verified in
/// full. Nothing but [`ZoneKeys::signed`] writes it.
pub struct Issued {
    slots: Box<[Mutex<[u8; 32]>]>,
}

impl Issued {
    const SLOTS: usize = 16_384;

    fn slot(&self, digest: &[u8; 32]) -> Option<std::sync::MutexGuard<'_, [u8; 32]>> {
        let index = usize::from(u16::from_le_bytes([digest[0], digest[1]])) % self.slots.len();
        let slot = self.slots.get(index)?;
        Some(slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    fn remember(&self, token: &Hashed<'_>) {
        if let Some(mut slot) = self.slot(&token.digest) {
            *slot = token.digest;
        }
    }

    fn contains(&self, token: &Hashed<'_>) -> bool {
        self.slot(&token.digest).is_some_and(|slot| {
            aws_lc_rs::constant_time::verify_slices_are_equal(&*slot, &token.digest).is_ok()
        })
    }
}

/// A presented token with its SHA-256, computed once here and nowhere else, for the
/// [`Issued`] lookup and the audit's fingerprint of the same call.
#[derive(Clone, Copy)]
pub struct Hashed<'t> {
    token: &'t str,
    digest: [u8; 32],
}

impl<'t> Hashed<'t> {
    pub fn new(token: &'t str) -> Hashed<'t> {
        Hashed {
            token,
            digest: caracal_crypto::sha256(token.as_bytes()),
        }
    }

    /// The first 8 bytes of the digest, in hex: correlates calls without keeping tokens.
    pub fn fingerprint(&self) -> String {
        caracal_crypto::hex(self.digest.get(..8).unwrap_or_default())
    }
}

/// The fingerprint only: a bearer token never reaches a log.
impl std::fmt::Debug for Hashed<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Hashed").field(&self.fingerprint()).finish()
    }
}

impl Default for Issued {
    fn default() -> Issued {
        Issued {
            slots: (0..Issued::SLOTS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

fn purpose(zone_id: &str) -> String {
    format!("zone-signing-key:{zone_id}")
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("zone `{0}` has no active signing key")]
    NoKey(String),
    #[error("signing key `{0}` does not open under the loaded KEK")]
    Unopenable(String),
    #[error("key generation failed")]
    Generation,
}

/// A fresh active key for `zone_id`, ready to store: the private half sealed under the KEK.
pub fn new_zone_key(kek: &Kek, zone_id: &str) -> Result<caracal_store::SigningKey, KeyError> {
    let key = SigningKey::generate().map_err(|_| KeyError::Generation)?;
    let kid = uuid::Uuid::now_v7().to_string();
    let envelope = kek
        .seal(&purpose(zone_id), key.pkcs8())
        .map_err(|_| KeyError::Generation)?;
    let jwk = jwk(&kid, key.public_key());
    let now = caracal_store::now_ms();
    Ok(caracal_store::SigningKey {
        kid,
        zone_id: zone_id.to_owned(),
        algorithm: "ES256".to_owned(),
        public_jwk: serde_json::to_string(&jwk).map_err(|_| KeyError::Generation)?,
        private_envelope: envelope,
        kek_id: kek.key_id().to_owned(),
        status: "active".to_owned(),
        created_at_ms: now,
        activated_at_ms: Some(now),
        retired_at_ms: None,
    })
}

fn jwk(kid: &str, public: &PublicKey) -> Jwk {
    Jwk {
        kty: "EC".to_owned(),
        crv: "P-256".to_owned(),
        use_: "sig".to_owned(),
        kid: kid.to_owned(),
        alg: "ES256".to_owned(),
        x: URL_SAFE_NO_PAD.encode(public.x()),
        y: URL_SAFE_NO_PAD.encode(public.y()),
    }
}

/// The invalidation message for `zone_id`'s keys.
pub fn invalidation(zone_id: &str) -> OutboxMessage {
    OutboxMessage {
        stream: KEYS_INVALIDATE.to_owned(),
        fields: [("zone_id".to_owned(), zone_id.to_owned())].into(),
        dedupe_key: None,
    }
}

/// A key that verifies, until `until_ms` if it is being retired.
#[derive(Debug)]
pub struct Verifier {
    pub kid: String,
    pub public: PublicKey,
    pub until_ms: Option<i64>,
    pub jwk: Jwk,
}

/// The zone's active key, opened: only on a signing ring.
#[derive(Debug)]
pub struct Signer {
    pub kid: String,
    pub key: SigningKey,
    /// The encoded JOSE header for the signer, built once.
    pub header: String,
}

/// One zone's keys as a replica holds them.
#[derive(Debug)]
pub struct ZoneKeys {
    pub signer: Option<Signer>,
    pub verifiers: Vec<Verifier>,
    loaded: Instant,
    /// Session mandates whose signature verified under these keys, by their exact text, with
    /// the key id that verified each. An agent presents its session mandate at every mint and
    /// lifecycle call; checking the same bytes against the same key again only costs an ES256
    /// verification. Dropped with the key set (rotation, invalidation, reload).
    verified_sessions: Mutex<HashMap<Box<str>, (String, MandateClaims)>>,
    /// Shared with the other role's ring when the STS and the Gateway run in one process.
    issued: Option<Arc<Issued>>,
}

impl ZoneKeys {
    /// The key for `kid` if it verifies at `now_ms`.
    pub fn verifier(&self, kid: &str, now_ms: i64) -> Option<&PublicKey> {
        self.verifiers
            .iter()
            .find(|v| v.kid == kid && v.until_ms.is_none_or(|until| until > now_ms))
            .map(|v| &v.public)
    }

    /// [`crate::mandate::verify`] with these keys; for a mandate the STS beside this ring
    /// signed, [`crate::mandate::verify_recognized`] (see [`Issued`]).
    pub fn verify(&self, token: &str, now_ms: i64) -> Result<MandateClaims, MandateError> {
        // An oversized token is refused by `verify` before anything is hashed.
        if self.issued.is_some() && token.len() <= crate::mandate::MAX_MANDATE_BYTES {
            return self.verify_hashed(&Hashed::new(token), now_ms);
        }
        crate::mandate::verify(token, |kid: &str| self.verifier(kid, now_ms))
    }

    /// [`ZoneKeys::verify`] for a caller that hashes the token anyway.
    pub fn verify_hashed(
        &self,
        token: &Hashed<'_>,
        now_ms: i64,
    ) -> Result<MandateClaims, MandateError> {
        let key_for = |kid: &str| self.verifier(kid, now_ms);
        // Both paths refuse an oversized token first.
        if self
            .issued
            .as_ref()
            .is_some_and(|issued| issued.contains(token))
        {
            return crate::mandate::verify_recognized(token.token, key_for);
        }
        crate::mandate::verify(token.token, key_for)
    }

    /// Tells the ring's [`Issued`] memory, if it has one, about a mandate just signed with
    /// these keys; only `use=gateway` mandates come back to this process to be verified.
    pub fn signed(&self, claims: &MandateClaims, token: &str) {
        if let Some(issued) = self.issued.as_ref().filter(|_| claims.use_ == "gateway") {
            issued.remember(&Hashed::new(token));
        }
    }

    /// [`ZoneKeys::verify`] for where session mandates are presented again and again (the
    /// STS's subject tokens, the Coordinator's lifecycle calls): a session mandate's outcome is
    /// remembered and reused while the key that verified it still verifies; lifetime, issuer
    /// and every live-state check stay the caller's, on every presentation. Paths that see a
    /// mandate once (the Gateway, control) use [`ZoneKeys::verify`] and never touch the memory.
    pub fn verify_session(&self, token: &str, now_ms: i64) -> Result<MandateClaims, MandateError> {
        let remembered = self
            .remembered()
            .get(token)
            .map(|(kid, claims)| (self.verifier(kid, now_ms).is_some(), claims.clone()));
        match remembered {
            Some((true, claims)) => return Ok(claims),
            Some((false, _)) => return Err(MandateError::UnknownKey),
            None => {}
        }
        let mut verified_by = None;
        let claims = crate::mandate::verify(token, |kid| {
            verified_by = Some(kid.to_owned());
            self.verifier(kid, now_ms)
        })?;
        if let Some(kid) = verified_by.filter(|_| claims.use_ == "session") {
            let mut remembered = self.remembered();
            if remembered.len() >= REMEMBERED_SESSIONS {
                remembered.clear();
            }
            remembered.insert(token.into(), (kid, claims.clone()));
        }
        Ok(claims)
    }

    fn remembered(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, (String, MandateClaims)>> {
        self.verified_sessions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// What the JWKS publishes at `now_ms`: the signer and every key still in its overlap.
    pub fn jwks(&self, now_ms: i64) -> Vec<Jwk> {
        self.verifiers
            .iter()
            .filter(|v| v.until_ms.is_none_or(|until| until > now_ms))
            .map(|v| v.jwk.clone())
            .collect()
    }
}

/// Every zone's keys, loaded on first use and dropped on invalidation or after 15 minutes. The
/// default ring verifies only: it never opens a private key.
#[derive(Clone, Default)]
pub struct KeyRing {
    zones: Arc<RwLock<HashMap<String, Arc<ZoneKeys>>>>,
    signs: bool,
    issued: Option<Arc<Issued>>,
}

impl KeyRing {
    /// A ring that also opens each zone's active private key (the STS's), and remembers the
    /// gateway mandates it signs: they come back to this STS for the Gateway's re-exchange
    /// (or to a Gateway in the same process, which [`KeyRing::sharing`] the memory).
    pub fn signing() -> KeyRing {
        KeyRing {
            signs: true,
            issued: Some(Arc::default()),
            ..KeyRing::default()
        }
    }

    /// The memory of mandates signed with this ring, if it keeps one.
    pub fn issued(&self) -> Option<Arc<Issued>> {
        self.issued.clone()
    }

    /// This ring reading `issued`, the signing ring's memory, when the Gateway and the STS run
    /// in one process.
    pub fn sharing(self, issued: Arc<Issued>) -> KeyRing {
        KeyRing {
            issued: Some(issued),
            ..self
        }
    }

    pub fn flush(&self, zone_id: &str) {
        self.zones
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(zone_id);
    }

    /// `zone_id`'s keys; a zone without an active key is [`KeyError::NoKey`].
    pub async fn zone(
        &self,
        store: &dyn Store,
        kek: &Kek,
        zone_id: &str,
    ) -> Result<Arc<ZoneKeys>, KeyError> {
        if let Some(keys) = self
            .zones
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(zone_id)
            .filter(|keys| keys.loaded.elapsed() < CACHE_TTL)
        {
            return Ok(Arc::clone(keys));
        }
        let mut keys = load(store, self.signs.then_some(kek), zone_id).await?;
        keys.issued = self.issued.clone();
        let keys = Arc::new(keys);
        self.zones
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(zone_id.to_owned(), Arc::clone(&keys));
        Ok(keys)
    }
}

/// The zone's keys; the active private key opened with `kek` when given.
async fn load(store: &dyn Store, kek: Option<&Kek>, zone_id: &str) -> Result<ZoneKeys, KeyError> {
    let rows = store.list_signing_keys(zone_id).await?;
    let now = caracal_store::now_ms();
    let mut active = false;
    let mut signer = None;
    let mut verifiers = Vec::new();
    // Newest first: the newest active key signs.
    for row in rows.iter().rev() {
        let until_ms = match row.status.as_str() {
            "active" => None,
            "retiring" if row.retired_at_ms.is_some_and(|until| until > now) => row.retired_at_ms,
            _ => continue,
        };
        let Some(public) = public_of(&row.public_jwk) else {
            tracing::error!(zone = zone_id, kid = %row.kid, "a stored public key does not parse; skipped");
            continue;
        };
        if until_ms.is_none() && !active {
            active = true;
            if let Some(kek) = kek {
                let opened = kek
                    .open(&purpose(zone_id), &row.private_envelope)
                    .map_err(|_| KeyError::Unopenable(row.kid.clone()))?;
                let key = SigningKey::from_pkcs8(&opened)
                    .map_err(|_| KeyError::Unopenable(row.kid.clone()))?;
                signer = Some(Signer {
                    header: crate::mandate::encoded_header(&row.kid),
                    kid: row.kid.clone(),
                    key,
                });
            }
        }
        verifiers.push(Verifier {
            kid: row.kid.clone(),
            jwk: jwk(&row.kid, &public),
            public,
            until_ms,
        });
    }
    if !active {
        return Err(KeyError::NoKey(zone_id.to_owned()));
    }
    Ok(ZoneKeys {
        signer,
        verifiers,
        loaded: Instant::now(),
        verified_sessions: Mutex::default(),
        issued: None,
    })
}

fn public_of(jwk_text: &str) -> Option<PublicKey> {
    let jwk: Jwk = serde_json::from_str(jwk_text).ok()?;
    let x = URL_SAFE_NO_PAD.decode(jwk.x).ok()?;
    let y = URL_SAFE_NO_PAD.decode(jwk.y).ok()?;
    PublicKey::from_xy(&x, &y).ok()
}

/// Gives every live zone without an active key its first one (zones created before keys were
/// created with the zone). Run when the STS starts.
pub async fn ensure_zone_keys(store: &dyn Store, kek: &Kek) -> Result<usize, KeyError> {
    let mut created = 0;
    for zone in store.list_zones().await? {
        if zone.archived_at_ms.is_some() {
            continue;
        }
        let keys = store.list_signing_keys(&zone.id).await?;
        if !keys.iter().any(|key| key.status == "active") {
            store
                .insert_signing_key(&new_zone_key(kek, &zone.id)?, &[])
                .await?;
            created += 1;
        }
    }
    Ok(created)
}

/// Rotates `zone_id`'s key: the new key signs at once, the previous one verifies for
/// `overlap`, and every replica is told to reload. Returns the new key id.
pub async fn rotate(
    store: &dyn Store,
    kek: &Kek,
    zone_id: &str,
    overlap: Duration,
    audit: OutboxMessage,
) -> Result<String, KeyError> {
    let key = new_zone_key(kek, zone_id)?;
    let until = caracal_store::now_ms() + i64::try_from(overlap.as_millis()).unwrap_or(i64::MAX);
    store
        .rotate_signing_key(&key, until, &[invalidation(zone_id), audit])
        .await?;
    Ok(key.kid)
}

/// Keeps a replica's key cache in step with rotations anywhere: a `caracal.keys.invalidate`
/// message drops the named zone's keys (read without a consumer group, like the policy
/// loader: every replica needs every message, and a message only causes a reload).
pub async fn follow_invalidations(
    ring: KeyRing,
    streams: Arc<dyn caracal_bus::Streams>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut last_entry = caracal_bus::last_entry_id(streams.as_ref(), KEYS_INVALIDATE).await;
    loop {
        if *stop.borrow() {
            return;
        }
        if let Ok(entries) = streams
            .range(KEYS_INVALIDATE, last_entry.as_deref(), 256)
            .await
        {
            for entry in &entries {
                if let Some(zone_id) = entry.fields.get("zone_id") {
                    ring.flush(zone_id);
                }
            }
            if let Some(last) = entries.last() {
                last_entry = Some(last.id.clone());
            }
        }
        tokio::select! {
            _ = stop.changed() => {}
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::claims;

    /// A key set whose only key, `k1`, is `key`'s public half and verifies until `until_ms`.
    fn verifying(key: &SigningKey, until_ms: i64, issued: Option<Arc<Issued>>) -> ZoneKeys {
        let public = PublicKey::from_xy(key.public_key().x(), key.public_key().y()).unwrap();
        ZoneKeys {
            signer: None,
            verifiers: vec![Verifier {
                kid: "k1".into(),
                jwk: jwk("k1", &public),
                public,
                until_ms: Some(until_ms),
            }],
            loaded: Instant::now(),
            verified_sessions: Mutex::default(),
            issued,
        }
    }

    /// `token` with the first character of its signature changed.
    fn flipped_signature(token: &str) -> String {
        let (signed, signature) = token.rsplit_once('.').unwrap();
        let flipped = if signature.starts_with('A') { 'B' } else { 'A' };
        format!("{signed}.{flipped}{}", &signature[1..])
    }

    /// A key set whose only key verifies until `until_ms`, and that key to sign with.
    fn retiring_keys(until_ms: i64) -> (ZoneKeys, SigningKey) {
        let key = SigningKey::generate().unwrap();
        (verifying(&key, until_ms, None), key)
    }

    #[test]
    fn a_gateway_mandate_signed_beside_the_ring_skips_only_the_signature_arithmetic() {
        let issued = Arc::new(Issued::default());
        let key = SigningKey::generate().unwrap();
        let signing = verifying(&key, 10_000, Some(Arc::clone(&issued)));
        let header = crate::mandate::encoded_header("k1");
        let mut gateway = claims();
        gateway.use_ = "gateway".into();
        let token = crate::mandate::sign(&header, &key, &gateway).unwrap();
        signing.signed(&gateway, &token);
        // Only gateway mandates are remembered: nothing else is shown to the Gateway.
        let session = crate::mandate::sign(&header, &key, &claims()).unwrap();
        signing.signed(&claims(), &session);
        assert!(issued.contains(&Hashed::new(&token)));
        assert!(!issued.contains(&Hashed::new(&session)));
        let shown = format!("{:?}", Hashed::new(&token));
        assert!(!shown.contains(&token) && shown.contains(&Hashed::new(&token).fingerprint()));

        // A ring reading the memory whose `k1` is another key: only the remembered mandate
        // passes, so its arithmetic was skipped (in a deployment a key id names one key).
        let oversized = "a".repeat(crate::mandate::MAX_MANDATE_BYTES + 1);
        issued.remember(&Hashed::new(&oversized));
        let elsewhere = verifying(&SigningKey::generate().unwrap(), 10_000, Some(issued));
        assert_eq!(elsewhere.verify(&token, 1_000).unwrap(), gateway);
        // Even a remembered token is refused when oversized, before anything else.
        assert_eq!(
            elsewhere.verify_hashed(&Hashed::new(&oversized), 1_000),
            Err(MandateError::TooLarge)
        );
        assert_eq!(
            elsewhere.verify(&session, 1_000),
            Err(MandateError::Signature)
        );
        // The key must still verify, and a changed byte is verified in full.
        assert_eq!(
            elsewhere.verify(&token, 10_000),
            Err(MandateError::UnknownKey)
        );
        assert_eq!(
            elsewhere.verify(&flipped_signature(&token), 1_000),
            Err(MandateError::Signature)
        );
        let mut widened = gateway.clone();
        widened.scope = Some("everything".into());
        let (_, payload_and_signature) = token.split_once('.').unwrap();
        let (_, signature) = payload_and_signature.split_once('.').unwrap();
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&widened).unwrap());
        let swapped = format!("{header}.{payload}.{signature}");
        assert_eq!(
            elsewhere.verify(&swapped, 1_000),
            Err(MandateError::Signature)
        );

        // Without the memory, the same mandate verifies by its signature alone.
        assert_eq!(
            verifying(&key, 10_000, None).verify(&token, 1_000).unwrap(),
            gateway
        );
    }

    #[test]
    fn the_issued_memory_is_a_fixed_table() {
        let issued = Issued::default();
        let tokens: Vec<String> = (0..2 * Issued::SLOTS).map(|n| format!("t{n}")).collect();
        for token in &tokens {
            issued.remember(&Hashed::new(token));
        }
        assert_eq!(issued.slots.len(), Issued::SLOTS);
        // The newest token of each slot is found; an overwritten one is not, and is verified in
        // full instead.
        assert!(issued.contains(&Hashed::new(tokens.last().unwrap())));
        let found = tokens
            .iter()
            .filter(|token| issued.contains(&Hashed::new(token)))
            .count();
        assert!(
            found <= Issued::SLOTS && found > Issued::SLOTS / 2,
            "{found}"
        );
    }

    #[test]
    fn a_remembered_session_mandate_verifies_only_while_its_key_does() {
        let (keys, key) = retiring_keys(10_000);
        let header = crate::mandate::encoded_header("k1");
        let session = crate::mandate::sign(&header, &key, &claims()).unwrap();
        assert_eq!(keys.verify_session(&session, 1_000).unwrap(), claims());
        assert_eq!(keys.remembered().len(), 1);
        // Remembered: the same answer, and none once the key's overlap has ended.
        assert_eq!(keys.verify_session(&session, 2_000).unwrap(), claims());
        assert_eq!(
            keys.verify_session(&session, 10_000),
            Err(MandateError::UnknownKey)
        );

        // Other bytes are verified afresh: a changed signature does not ride on the memory.
        assert_eq!(
            keys.verify_session(&flipped_signature(&session), 1_000),
            Err(MandateError::Signature)
        );

        // Only session mandates are remembered: the others are presented once.
        let mut gateway = claims();
        gateway.use_ = "gateway".into();
        let once = crate::mandate::sign(&header, &key, &gateway).unwrap();
        assert_eq!(keys.verify_session(&once, 1_000).unwrap(), gateway);
        assert_eq!(keys.remembered().len(), 1);
    }

    #[test]
    fn the_memory_is_bounded() {
        let (keys, key) = retiring_keys(i64::MAX);
        let header = crate::mandate::encoded_header("k1");
        for n in 0..=REMEMBERED_SESSIONS {
            let mut session = claims();
            session.jti = format!("j{n}");
            keys.verify_session(
                &crate::mandate::sign(&header, &key, &session).unwrap(),
                1_000,
            )
            .unwrap();
            assert!(keys.remembered().len() <= REMEMBERED_SESSIONS);
        }
    }
}
