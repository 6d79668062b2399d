//! The token endpoint's form body (`application/x-www-form-urlencoded`), parsed strictly:
//! UTF-8 only, well-formed percent escapes only, every field at most once except `resource`.

/// The fields the token endpoint reads; anything else is ignored (RFC 6749 §3.2).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TokenForm {
    pub grant_type: Option<String>,
    pub zone_id: Option<String>,
    pub application_id: Option<String>,
    pub client_secret: Option<String>,
    /// In the order sent; trimmed, de-duplicated and sorted by the exchange.
    pub resources: Vec<String>,
    pub scope: Option<String>,
    pub subject_token: Option<String>,
    pub subject_token_type: Option<String>,
    pub session_id: Option<String>,
    pub agent_session_id: Option<String>,
    pub delegation_edge_id: Option<String>,
    pub ttl_seconds: Option<String>,
    pub approval_id: Option<String>,
    pub request_method: Option<String>,
    pub request_path: Option<String>,
    pub gateway_request_id: Option<String>,
    /// `caracal run`'s routes: the workload, its `ws_` secret and the binding's variable.
    pub workload_id: Option<String>,
    pub secret: Option<String>,
    pub env: Option<String>,
    /// `actor_token`, `client_assertion` or `client_assertion_type`, if any was sent.
    pub refused_field: Option<&'static str>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormError {
    #[error("the form body is not valid UTF-8")]
    NotUtf8,
    #[error("the form body has a malformed percent escape")]
    BadEscape,
    #[error("duplicate form field: {0}")]
    Duplicate(String),
}

/// Parses `body`. Empty pairs (`a=1&&b=2`) are skipped, as browsers send them.
pub fn parse(body: &[u8]) -> Result<TokenForm, FormError> {
    let mut form = TokenForm::default();
    for pair in body.split(|byte| *byte == b'&') {
        if pair.is_empty() {
            continue;
        }
        let (name, value) = match pair.iter().position(|byte| *byte == b'=') {
            Some(at) => (
                pair.get(..at).unwrap_or_default(),
                pair.get(at + 1..).unwrap_or_default(),
            ),
            None => (pair, &[][..]),
        };
        let name = decode(name)?;
        let value = decode(value)?;
        let slot = match name.as_str() {
            "resource" => {
                form.resources.push(value);
                continue;
            }
            "actor_token" | "client_assertion" | "client_assertion_type" => {
                form.refused_field = Some(match name.as_str() {
                    "actor_token" => "actor_token",
                    "client_assertion" => "client_assertion",
                    _ => "client_assertion_type",
                });
                continue;
            }
            "grant_type" => &mut form.grant_type,
            "zone_id" => &mut form.zone_id,
            "application_id" => &mut form.application_id,
            "client_secret" => &mut form.client_secret,
            "scope" => &mut form.scope,
            "subject_token" => &mut form.subject_token,
            "subject_token_type" => &mut form.subject_token_type,
            "session_id" => &mut form.session_id,
            "agent_session_id" => &mut form.agent_session_id,
            "delegation_edge_id" => &mut form.delegation_edge_id,
            "ttl_seconds" => &mut form.ttl_seconds,
            "approval_id" => &mut form.approval_id,
            "request_method" => &mut form.request_method,
            "request_path" => &mut form.request_path,
            "gateway_request_id" => &mut form.gateway_request_id,
            "workload_id" => &mut form.workload_id,
            "secret" => &mut form.secret,
            "env" => &mut form.env,
            _ => continue,
        };
        if slot.is_some() {
            return Err(FormError::Duplicate(name));
        }
        *slot = Some(value);
    }
    Ok(form)
}

/// `+` is a space; `%XY` is a byte; the bytes must be UTF-8.
fn decode(raw: &[u8]) -> Result<String, FormError> {
    let mut bytes = Vec::with_capacity(raw.len());
    let mut rest = raw.iter();
    while let Some(&byte) = rest.next() {
        match byte {
            b'+' => bytes.push(b' '),
            b'%' => {
                let (Some(high), Some(low)) = (rest.next(), rest.next()) else {
                    return Err(FormError::BadEscape);
                };
                let (Some(high), Some(low)) = (hex_value(*high), hex_value(*low)) else {
                    return Err(FormError::BadEscape);
                };
                bytes.push(high << 4 | low);
            }
            other => bytes.push(other),
        }
    }
    String::from_utf8(bytes).map_err(|_| FormError::NotUtf8)
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fields_decode_and_only_resource_repeats() {
        let form = parse(
            b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&resource=a&resource=b&scope=x+y&&other=1",
        )
        .unwrap();
        assert_eq!(
            form.grant_type.as_deref(),
            Some("urn:ietf:params:oauth:grant-type:token-exchange")
        );
        assert_eq!(form.resources, ["a", "b"]);
        assert_eq!(form.scope.as_deref(), Some("x y"));
        assert_eq!(
            parse(b"scope=a&scope=b"),
            Err(FormError::Duplicate("scope".into()))
        );
        assert_eq!(parse(b"scope=%ZZ"), Err(FormError::BadEscape));
        assert_eq!(parse(b"scope=%4"), Err(FormError::BadEscape));
        assert_eq!(parse(b"scope=%FF"), Err(FormError::NotUtf8));
        assert_eq!(parse(b"scope=\xff"), Err(FormError::NotUtf8));
        assert_eq!(
            parse(b"actor_token=x").unwrap().refused_field,
            Some("actor_token")
        );
        assert_eq!(parse(b"").unwrap(), TokenForm::default());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5_000))]

        /// Arbitrary bytes never panic, and a field that parses round-trips its encoding.
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&body);
        }

        #[test]
        fn encoded_values_round_trip(value in "\\PC{0,64}") {
            let encoded = serde_urlencoded::to_string([("scope", value.as_str())]).unwrap();
            let form = parse(encoded.as_bytes()).unwrap();
            prop_assert_eq!(form.scope.as_deref(), Some(value.as_str()));
        }
    }
}
