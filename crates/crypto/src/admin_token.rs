//! Admin bearer tokens: generation, parsing and the digest stored in place of the token.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::{RandomError, hex, random_bytes, sha256};

/// A plaintext admin token. It exists only between minting and handing it to the operator (or
/// between reading a request header and hashing it); it is never stored.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

/// The SHA-256 of a token, lower-case hex: what the store keeps and looks tokens up by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenDigest(String);

impl AdminToken {
    /// What every admin token starts with; no mandate (a compact JWS) does.
    pub const PREFIX: &str = "cat_";

    pub fn generate() -> Result<AdminToken, RandomError> {
        let bytes: [u8; 32] = random_bytes()?;
        Ok(AdminToken(format!(
            "{}{}",
            Self::PREFIX,
            URL_SAFE_NO_PAD.encode(bytes)
        )))
    }

    /// Accepts text that has the shape of a token (`cat_` + 43 base64url characters), or `None`.
    pub fn parse(text: &str) -> Option<AdminToken> {
        let body = text.strip_prefix(Self::PREFIX)?;
        let decoded = URL_SAFE_NO_PAD.decode(body).ok()?;
        (decoded.len() == 32).then(|| AdminToken(text.to_owned()))
    }

    pub fn digest(&self) -> TokenDigest {
        TokenDigest(hex(&sha256(self.0.as_bytes())))
    }

    /// The plaintext, for the single moment it is shown or written to the operator's file.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(cat_***)")
    }
}

impl TokenDigest {
    /// Wraps a digest read back from the store.
    pub fn from_stored(hex_text: String) -> TokenDigest {
        TokenDigest(hex_text)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_parse_and_differ() {
        let first = AdminToken::generate().unwrap();
        let second = AdminToken::generate().unwrap();
        assert_ne!(first, second);
        assert_eq!(first.expose().len(), 4 + 43);
        assert_eq!(AdminToken::parse(first.expose()), Some(first.clone()));
        assert_eq!(first.digest().as_str().len(), 64);
        assert_ne!(first.digest(), second.digest());
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for text in [
            "",
            "cat_",
            "cat_short",
            "xat_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "cat_!!!",
        ] {
            assert_eq!(AdminToken::parse(text), None, "{text}");
        }
    }

    #[test]
    fn debug_never_shows_the_token() {
        let token = AdminToken::generate().unwrap();
        let shown = format!("{token:?}");
        assert!(!shown.contains(&token.expose()[4..]), "{shown}");
    }
}
