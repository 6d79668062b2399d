//! Mandates as compact JWS: ES256 only, one key id per zone key. Signing for the STS, checking
//! for the STS (subject tokens) and the Gateway. Parsing refuses before it trusts: the size is
//! bounded, each part must be canonical base64url, the header may name only `ES256` with a
//! `kid`, and the claims are read only after the signature verifies.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use caracal_crypto::es256::{PublicKey, SigningKey};

use crate::wire::{MandateClaims, MandateHeader};

/// The longest mandate accepted; ours are well under 2 KiB.
pub const MAX_MANDATE_BYTES: usize = 8 * 1024;

/// Seconds of clock difference tolerated on `exp` and `iat`.
pub const LEEWAY_SECONDS: i64 = 60;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MandateError {
    #[error("the token is not a compact JWS")]
    Malformed,
    #[error("the token is larger than {MAX_MANDATE_BYTES} bytes")]
    TooLarge,
    #[error("the token's algorithm is not ES256")]
    Algorithm,
    #[error("the token's key is not one of the zone's keys")]
    UnknownKey,
    #[error("the token's signature does not verify")]
    Signature,
    #[error("the token's claims are malformed")]
    Claims,
    #[error("the token has expired")]
    Expired,
    #[error("the token was issued in the future")]
    IssuedInFuture,
    #[error("the token was not issued by this STS for it")]
    Issuer,
    #[error("signing failed")]
    Signing,
}

/// The encoded header of a key: computed once per key, reused for every mandate it signs.
pub fn encoded_header(kid: &str) -> String {
    let header = serde_json::json!({"alg": "ES256", "kid": kid, "typ": "JWT"});
    URL_SAFE_NO_PAD.encode(header.to_string())
}

/// Signs `claims` as a compact JWS under `key`, whose encoded header is `header`.
pub fn sign(
    header: &str,
    key: &SigningKey,
    claims: &MandateClaims,
) -> Result<String, MandateError> {
    let payload = serde_json::to_vec(claims).map_err(|_| MandateError::Signing)?;
    let mut token = String::with_capacity(header.len() + payload.len() * 4 / 3 + 100);
    token.push_str(header);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(&payload, &mut token);
    let signature = key
        .sign(token.as_bytes())
        .map_err(|_| MandateError::Signing)?;
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(signature, &mut token);
    Ok(token)
}

fn decode_part(part: &str) -> Result<Vec<u8>, MandateError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| MandateError::Malformed)
}

/// Checks the signature with the key `key_for(kid)` returns and gives back the claims. Time,
/// issuer and audience are checked separately ([`check_times`], [`check_issuer`]).
pub fn verify<'k>(
    token: &str,
    key_for: impl FnOnce(&str) -> Option<&'k PublicKey>,
) -> Result<MandateClaims, MandateError> {
    checked(token, key_for, false)
}

/// [`verify`] for a token this process signed, byte for byte, so its signature is known to
/// be good ([`crate::keys::Issued`]): every check but the ES256 arithmetic, the key still
/// looked up by its id and required to verify now.
pub fn verify_recognized<'k>(
    token: &str,
    key_for: impl FnOnce(&str) -> Option<&'k PublicKey>,
) -> Result<MandateClaims, MandateError> {
    checked(token, key_for, true)
}

fn checked<'k>(
    token: &str,
    key_for: impl FnOnce(&str) -> Option<&'k PublicKey>,
    recognized: bool,
) -> Result<MandateClaims, MandateError> {
    if token.len() > MAX_MANDATE_BYTES {
        return Err(MandateError::TooLarge);
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(MandateError::Malformed);
    };
    let header: MandateHeader =
        serde_json::from_slice(&decode_part(header)?).map_err(|_| MandateError::Malformed)?;
    // Exactly ES256: `none`, HS256 (with the public key as a secret) and every other algorithm
    // are refused before any key is looked at.
    if header.alg != "ES256" || header.typ.as_deref().is_some_and(|typ| typ != "JWT") {
        return Err(MandateError::Algorithm);
    }
    let key = key_for(&header.kid).ok_or(MandateError::UnknownKey)?;
    let signature = decode_part(signature)?;
    let (signed, _) = token.rsplit_once('.').ok_or(MandateError::Malformed)?;
    if !recognized && !key.verify(signed.as_bytes(), &signature) {
        return Err(MandateError::Signature);
    }
    serde_json::from_slice(&decode_part(payload)?).map_err(|_| MandateError::Claims)
}

/// The `zone_id` a token claims, read without verifying anything: only to choose which zone's
/// keys to verify it with (a lie there fails the signature check).
pub fn claimed_zone(token: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct ZoneOnly {
        zone_id: String,
    }
    if token.len() > MAX_MANDATE_BYTES {
        return None;
    }
    let payload = token.split('.').nth(1)?;
    let claims: ZoneOnly = serde_json::from_slice(&decode_part(payload).ok()?).ok()?;
    Some(claims.zone_id)
}

/// `exp` not passed and `iat` not in the future, each with [`LEEWAY_SECONDS`].
pub fn check_times(claims: &MandateClaims, now_seconds: i64) -> Result<(), MandateError> {
    if claims.exp + LEEWAY_SECONDS <= now_seconds {
        return Err(MandateError::Expired);
    }
    if claims.iat > now_seconds + LEEWAY_SECONDS {
        return Err(MandateError::IssuedInFuture);
    }
    Ok(())
}

/// Issued by `issuer` and addressed to it (session and gateway mandates).
pub fn check_issuer(claims: &MandateClaims, issuer: &str) -> Result<(), MandateError> {
    if claims.iss != issuer || !claims.aud.iter().any(|aud| aud == issuer) {
        return Err(MandateError::Issuer);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use crate::test_support::claims;

    fn hs256(key: &[u8], signing_input: &str) -> String {
        let tag = aws_lc_rs::hmac::sign(
            &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key),
            signing_input.as_bytes(),
        );
        URL_SAFE_NO_PAD.encode(tag.as_ref())
    }

    #[test]
    fn a_signed_mandate_verifies_and_nothing_else_does() {
        let key = SigningKey::generate().unwrap();
        let token = sign(&encoded_header("k1"), &key, &claims()).unwrap();
        let public = key.public_key();
        let lookup = |kid: &str| (kid == "k1").then_some(public);
        assert_eq!(verify(&token, lookup).unwrap(), claims());
        // Optional claims are omitted, never empty.
        let payload = token.split('.').nth(1).unwrap();
        let json = String::from_utf8(URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        assert!(
            !json.contains("target") && !json.contains("hop_count"),
            "{json}"
        );

        // Another key id, another key, a changed claim, a truncated signature.
        assert_eq!(
            verify(&token, |_| None::<&PublicKey>),
            Err(MandateError::UnknownKey)
        );
        let other = SigningKey::generate().unwrap();
        assert_eq!(
            verify(&token, |_| Some(other.public_key())),
            Err(MandateError::Signature)
        );
        let mut forged = claims();
        forged.scope = Some("admin".into());
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        let parts: Vec<&str> = token.split('.').collect();
        let swapped = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        assert_eq!(verify(&swapped, lookup), Err(MandateError::Signature));
        assert!(matches!(
            verify(&token[..token.len() - 4], lookup),
            Err(MandateError::Signature | MandateError::Malformed)
        ));

        // Algorithm confusion: `none`, and HS256 keyed with the public key.
        let none_header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","kid":"k1"}"#);
        let unsigned = format!("{none_header}.{}.", parts[1]);
        assert_eq!(verify(&unsigned, lookup), Err(MandateError::Algorithm));
        let hs_header = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","kid":"k1","typ":"JWT"}"#);
        let input = format!("{hs_header}.{}", parts[1]);
        let mut public_bytes = vec![4u8];
        public_bytes.extend_from_slice(public.x());
        public_bytes.extend_from_slice(public.y());
        let confused = format!("{input}.{}", hs256(&public_bytes, &input));
        assert_eq!(verify(&confused, lookup), Err(MandateError::Algorithm));
        // Header fields beyond alg/kid/typ (`jku`, `crit`, ...) are refused.
        let jku = URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","kid":"k1","jku":"http://x"}"#);
        assert_eq!(
            verify(&format!("{jku}.{}.{}", parts[1], parts[2]), lookup),
            Err(MandateError::Malformed)
        );
        assert_eq!(
            verify(&"a".repeat(MAX_MANDATE_BYTES + 1), lookup),
            Err(MandateError::TooLarge)
        );
    }

    #[test]
    fn times_and_issuer_are_checked_with_leeway() {
        let c = claims();
        assert_eq!(check_times(&c, 2_000 + LEEWAY_SECONDS - 1), Ok(()));
        assert_eq!(
            check_times(&c, 2_000 + LEEWAY_SECONDS),
            Err(MandateError::Expired)
        );
        assert_eq!(
            check_times(&c, 1_000 - LEEWAY_SECONDS - 1),
            Err(MandateError::IssuedInFuture)
        );
        assert_eq!(check_issuer(&c, "http://sts"), Ok(()));
        assert_eq!(check_issuer(&c, "http://sts/"), Err(MandateError::Issuer));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// Any string, any bytes spliced into a real token: an error or the original claims,
        /// never a panic.
        #[test]
        fn arbitrary_tokens_never_panic(text in "\\PC{0,300}", cut in 0usize..400, insert in "[A-Za-z0-9_.=+/-]{0,8}") {
            let key = SigningKey::generate().unwrap();
            let public = key.public_key();
            let _ = verify(&text, |_| Some(public));
            let token = sign(&encoded_header("k"), &key, &claims()).unwrap();
            let at = cut.min(token.len());
            let mut spliced = token.clone();
            spliced.insert_str(at, &insert);
            if let Ok(read) = verify(&spliced, |_| Some(public)) {
                prop_assert_eq!(read, claims());
            }
        }
    }
}
