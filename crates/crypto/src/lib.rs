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
mod kek;

pub use admin_token::{AdminToken, TokenDigest};
pub use envelope::{EnvelopeError, envelope_kek_id};
pub use kek::{Kek, KekError};

/// Fills a fresh array from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], RandomError> {
    let mut bytes = [0u8; N];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| RandomError)?;
    Ok(bytes)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the system random number generator failed")]
pub struct RandomError;

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        // Writing to a String cannot fail.
        let _ = write!(text, "{byte:02x}");
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
    fn sha256_matches_the_fips_vector() {
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
