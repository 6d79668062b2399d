//! The contract between the Gateway and the STS, which never import each other: what the
//! Gateway asks for one proxied call, how a call over HTTP is signed, what a refusal carries,
//! and the seam through which a Gateway in the same process as the STS exchanges without HTTP.

use http::StatusCode;

use crate::state::RoleState;
use crate::wire::TokenResponse;

pub const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
pub const TIMESTAMP_HEADER: &str = "x-caracal-gateway-timestamp";
pub const NONCE_HEADER: &str = "x-caracal-gateway-request";
pub const SIGNATURE_HEADER: &str = "x-caracal-gateway-signature";
/// How far a gateway call's timestamp may be from the STS's clock.
pub const MAX_SKEW_SECONDS: i64 = 60;
/// The label the Gateway↔STS key is derived under from the KEK (every replica shares it).
pub const KEY_LABEL: &str = "gateway-sts-hmac";

/// The signature of a gateway call: hex HMAC-SHA256 over
/// `"{ts}\n{nonce}\n{METHOD}\n{path}\n{hex sha256(body)}"`.
pub fn signature(
    key: &[u8; 32],
    timestamp: &str,
    nonce: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> String {
    let message = format!(
        "{timestamp}\n{nonce}\n{method}\n{path}\n{}",
        caracal_crypto::hex(&caracal_crypto::sha256(body))
    );
    let tag = aws_lc_rs::hmac::sign(
        &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key),
        message.as_bytes(),
    );
    caracal_crypto::hex(tag.as_ref())
}

/// What the Gateway asks for one proxied call.
#[derive(Debug, Clone)]
pub struct GatewayCall {
    pub zone_id: String,
    pub application_id: String,
    /// The presented `use=gateway` mandate.
    pub token: String,
    pub resource: String,
    pub method: String,
    pub path: String,
    /// The mandate's claims as this Gateway verified them (signature with the zone's keys) once
    /// it spent the mandate's `jti` in the shared replay registry. Only the in-process STS reads
    /// it, and then neither verifies the signature again nor spends the `jti` a second time; the
    /// HTTP exchange sends the token alone, which the STS verifies in full.
    pub verified: Option<crate::wire::MandateClaims>,
}

/// A refusal in the token endpoint's terms, which the Gateway passes to its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub code: String,
    pub description: String,
}

impl Refusal {
    pub fn new(status: StatusCode, code: &str, description: impl Into<String>) -> Refusal {
        Refusal {
            status,
            code: code.to_owned(),
            description: description.into(),
        }
    }

    /// Only the STS being unavailable counts toward the Gateway's circuit: never a policy
    /// answer, a missing provider credential or a cancelled client.
    pub fn counts_against_sts(&self) -> bool {
        self.code == "sts_unavailable" && self.status.is_server_error()
    }
}

/// A granted exchange. An in-process STS hands over its event without waiting for the disk:
/// the Gateway waits for `evidence` before it reports the call, so the event's fsync overlaps
/// the upstream call instead of delaying it (invariant 5 still holds: nothing is reported
/// before its evidence is durable). Over HTTP the STS waits itself: `None`.
#[derive(Debug)]
pub struct Exchanged {
    pub answer: TokenResponse,
    pub evidence: Option<crate::evidence::Pending>,
}

/// The STS as a Gateway in the same process reaches it: no HTTP and no signature (the process
/// is the trust boundary), the Gateway's verification of the mandate trusted
/// ([`GatewayCall::verified`]); everything else as for a signed call.
#[async_trait::async_trait]
pub trait InProcessExchange: Send + Sync {
    async fn exchange(
        &self,
        state: &RoleState,
        request_id: &str,
        call: &GatewayCall,
    ) -> Result<Exchanged, Refusal>;
}
