//! Request ids: the correlation id echoed on every response and written in every log line.

use std::fmt;

/// A request id that is safe to echo in a header and write to a log: 1 to 128 printable ASCII
/// characters (0x21..=0x7e), so it can carry no whitespace, control bytes or header folding.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId(String);

impl RequestId {
    pub const MAX_LEN: usize = 128;

    /// Accepts an inbound `X-Request-Id` value, or `None` when the caller must generate one.
    pub fn from_inbound(value: &[u8]) -> Option<RequestId> {
        let acceptable = !value.is_empty()
            && value.len() <= Self::MAX_LEN
            && value.iter().all(|byte| (0x21..=0x7e).contains(byte));
        if !acceptable {
            return None;
        }
        String::from_utf8(value.to_vec()).ok().map(RequestId)
    }

    /// Wraps an id the caller generated itself (a UUIDv7 in canonical form).
    pub fn generated(uuid_text: String) -> RequestId {
        RequestId(uuid_text)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &[u8], accepted: bool) {
        assert_eq!(
            RequestId::from_inbound(input).is_some(),
            accepted,
            "input {:?}",
            String::from_utf8_lossy(input)
        );
    }

    #[test]
    fn inbound_request_ids() {
        check(b"0192f7c4-8a1b-7c2d-9e3f-0123456789ab", true);
        check(b"req:42/a_b.c-d~!", true);
        check(&[b'a'; 128], true);
        check(&[b'a'; 129], false);
        check(b"", false);
        check(b"has space", false);
        check(b"line\nbreak", false);
        check(b"tab\there", false);
        check("caf\u{e9}".as_bytes(), false);
        check(b"\x7f", false);
    }
}
