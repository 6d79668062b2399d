//! Key material and cryptographic primitives, all on aws-lc-rs.
//!
//! - [`Kek`]: the key-encryption key that seals every stored secret ([`Kek::seal`], envelope
//!   encryption with a fresh data key per secret, purpose-bound). It lives in a file under
//!   `$CARACAL_HOME`, never in the database; the database records only its id and a check
//!   value, so a wrong or swapped KEK file is refused at start.
//! - [`AdminToken`]: bearer tokens for the admin API, `cat_` + 32 random bytes base64url. Only
//!   their SHA-256 digest is stored: the token carries 256 bits of entropy, so a slow password
//!   hash would add cost without adding strength.
//!
//! Every type that holds secret bytes has a `Debug` that prints no secret.

mod admin_token;
mod envelope;
pub mod es256;
mod kek;
mod secret_hash;

pub use admin_token::{AdminToken, TokenDigest};
pub use envelope::{EnvelopeError, envelope_kek_id};
pub use kek::{Kek, KekError};
pub use secret_hash::{MIN_SECRET_CHARS, SecretHashError, hash_secret, verify_secret};

/// Fills a fresh array from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], RandomError> {
    let mut bytes = [0u8; N];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| RandomError)?;
    Ok(bytes)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the system random number generator failed")]
pub struct RandomError;

/// Decodes lower-case hex, the only form this project writes. Anything else (odd length, a
/// sign, upper case) is `None`, so one value has exactly one accepted spelling.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let mut bytes = vec![0; text.len() / 2];
    decode_into(text.as_bytes(), &mut bytes)?;
    Some(bytes)
}

/// [`unhex`] of exactly 32 bytes: a SHA-256 digest or an HMAC-SHA256. Allocates nothing (the
/// sweep decodes several per row).
pub fn unhex32(text: &str) -> Option<[u8; 32]> {
    let mut bytes = [0; 32];
    decode_into(text.as_bytes(), &mut bytes)?;
    Some(bytes)
}

/// A lower-case hex digit's value, or `INVALID` (anything above 15).
fn nibble(character: u8) -> u8 {
    const INVALID: u8 = 0xff;
    let digit = character.wrapping_sub(b'0');
    let letter = character.wrapping_sub(b'a');
    if digit < 10 {
        digit
    } else if letter < 6 {
        letter + 10
    } else {
        INVALID
    }
}

fn decode_into(text: &[u8], out: &mut [u8]) -> Option<()> {
    if text.len() != out.len() * 2 {
        return None;
    }
    // No early exit inside the loop: it stays branch-light, and the verdict comes at the end.
    let mut invalid = false;
    for (pair, byte) in text.chunks_exact(2).zip(out.iter_mut()) {
        let (high, low) = match pair {
            [high, low] => (nibble(*high), nibble(*low)),
            _ => (0xff, 0xff),
        };
        invalid |= (high | low) > 15;
        *byte = (high << 4) | (low & 0x0f);
    }
    (!invalid).then_some(())
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let digit = |nibble: u8| {
        char::from(if nibble < 10 {
            b'0' + nibble
        } else {
            b'a' + nibble - 10
        })
    };
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(digit(byte >> 4));
        text.push(digit(byte & 0x0f));
    }
    text
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unhex_accepts_only_the_spelling_hex_writes() {
        let bytes = [0x00, 0x7f, 0xa5, 0xff];
        assert_eq!(unhex(&hex(&bytes)), Some(bytes.to_vec()));
        assert_eq!(unhex(""), Some(Vec::new()));
        for bad in ["0", "0g", "+f", "-1", "FF", "aB", " 0", "0x"] {
            assert_eq!(unhex(bad), None, "`{bad}`");
        }
        let digest = sha256(b"abc");
        assert_eq!(unhex32(&hex(&digest)), Some(digest));
        assert_eq!(unhex32(&hex(&digest[..31])), None);
    }

    #[test]
    fn sha256_matches_the_fips_vector() {
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
