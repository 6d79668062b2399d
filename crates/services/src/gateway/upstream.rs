//! Reaching the upstream safely: which addresses are never dialled, the resolver that checks
//! every address at connect time, the request the upstream receives (sanitised headers and the
//! injected credential) and the response body that stops when the mandate is revoked.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use hyper_util::client::legacy::connect::dns::Name;

use super::revocation::{Anchors, RevocationView};

/// Addresses never dialled, whatever the operator configured: link-local (the cloud metadata
/// services live there), multicast, unspecified and broadcast, also when written as
/// IPv4-mapped, IPv4-compatible or NAT64 IPv6, plus the metadata addresses outside those
/// ranges (AWS's IPv6 one, Alibaba's CGNAT one). Loopback and private ranges stay reachable:
/// operators run internal tools there, and the host allowlist narrows further.
pub fn is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden_v4(v4);
            }
            let segments = v6.segments();
            // NAT64 (64:ff9b::/96) and the deprecated IPv4-compatible form (::a.b.c.d).
            let embedded = Ipv4Addr::from(v6.to_bits() as u32);
            if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] && forbidden_v4(embedded) {
                return true;
            }
            if segments[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified() {
                return forbidden_v4(embedded);
            }
            v6.is_unspecified()
                || v6.is_multicast()
                || (segments[0] & 0xffc0) == 0xfe80
                || v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
        }
    }
}

fn forbidden_v4(v4: Ipv4Addr) -> bool {
    v4.is_link_local()
        || v4.is_multicast()
        || v4.is_unspecified()
        || v4.is_broadcast()
        || v4 == Ipv4Addr::new(100, 100, 100, 200)
}

/// Why an upstream URL is refused before any connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    #[error("the upstream URL is not an absolute http(s) URL without credentials")]
    Url,
    #[error("the upstream host is not on the allowlist")]
    NotAllowed,
    #[error("the upstream host resolves to a forbidden address")]
    Forbidden,
    #[error("the upstream host does not resolve")]
    Unresolvable,
}

/// Checks `url` and returns it parsed: http or https, a host, no userinfo, on the allowlist when
/// one is set, and every address it resolves to allowed. The connector checks again when it
/// dials (the name may resolve differently by then).
pub async fn check_url(url: &str, allowlist: &[String]) -> Result<http::Uri, GuardError> {
    let uri: http::Uri = url.parse().map_err(|_| GuardError::Url)?;
    let authority = uri.authority().ok_or(GuardError::Url)?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || authority.as_str().contains('@') {
        return Err(GuardError::Url);
    }
    let host = authority.host();
    if host.is_empty() {
        return Err(GuardError::Url);
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if !allowlist.is_empty()
        && !allowlist
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(bare))
    {
        return Err(GuardError::NotAllowed);
    }
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return if is_forbidden(ip) {
            Err(GuardError::Forbidden)
        } else {
            Ok(uri)
        };
    }
    let default_port = if uri.scheme_str() == Some("https") {
        443
    } else {
        80
    };
    let addresses: Vec<SocketAddr> =
        tokio::net::lookup_host((bare, authority.port_u16().unwrap_or(default_port)))
            .await
            .map_err(|_| GuardError::Unresolvable)?
            .collect();
    if addresses.is_empty() {
        return Err(GuardError::Unresolvable);
    }
    if addresses.iter().any(|address| is_forbidden(address.ip())) {
        return Err(GuardError::Forbidden);
    }
    Ok(uri)
}

/// The upstream connector's resolver: resolves at connect time and drops forbidden
/// addresses, so a name that rebinds to the metadata service after [`check_url`] is still
/// never dialled.
#[derive(Clone, Default)]
pub struct CheckedResolver;

impl tower::Service<Name> for CheckedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        Box::pin(async move {
            let allowed: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0))
                .await?
                .filter(|address| !is_forbidden(address.ip()))
                .collect();
            if allowed.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    "no allowed address",
                ));
            }
            Ok(allowed.into_iter())
        })
    }
}

/// Headers that belong to one connection, never forwarded either way.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Headers an upstream credential may never be written into.
const RESERVED_CREDENTIAL_HEADERS: [&str; 20] = [
    "baggage",
    "connection",
    "content-encoding",
    "content-length",
    "content-type",
    "expect",
    "forwarded",
    "host",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "traceparent",
    "tracestate",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "via",
    "x-real-ip",
    "x-request-id",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The header an upstream credential goes in, if it is one a credential may use.
pub fn credential_header(name: Option<&str>) -> Option<HeaderName> {
    let name = name
        .filter(|name| !name.is_empty())
        .unwrap_or("authorization");
    let header = HeaderName::from_bytes(name.as_bytes()).ok()?;
    let lower = header.as_str();
    let reserved = lower.starts_with("x-caracal-")
        || lower.starts_with("x-forwarded-")
        || lower.starts_with("proxy-")
        || RESERVED_CREDENTIAL_HEADERS.contains(&lower);
    (!reserved).then_some(header)
}

/// The inbound headers as the upstream may see them: no hop-by-hop headers, no caller
/// credential, no `X-Caracal-*`, no forwarding claims the caller made, no `caracal.*` baggage.
pub fn sanitise_request_headers(inbound: &HeaderMap) -> HeaderMap {
    let mut headers = inbound.clone();
    strip_hop_by_hop(&mut headers);
    let dropped: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            let name = name.as_str();
            name.starts_with("x-caracal-")
                || name.starts_with("x-forwarded-")
                || matches!(
                    name,
                    "forwarded" | "x-real-ip" | "authorization" | "host" | "cookie2"
                )
        })
        .cloned()
        .collect();
    for name in dropped {
        headers.remove(name);
    }
    let baggage: Vec<String> = headers
        .get_all("baggage")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|member| !member.is_empty() && !member.starts_with("caracal."))
        .map(str::to_owned)
        .collect();
    headers.remove("baggage");
    if !baggage.is_empty()
        && let Ok(value) = HeaderValue::from_str(&baggage.join(","))
    {
        headers.insert("baggage", value);
    }
    if let Some(value) = headers.get("traceparent")
        && !valid_traceparent(value.to_str().unwrap_or_default())
    {
        headers.remove("traceparent");
        headers.remove("tracestate");
    }
    headers
}

/// A W3C `traceparent` this Gateway forwards: known shape, not the forbidden values.
fn valid_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |part: &str, len: usize| {
        part.len() == len
            && part
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    match parts.as_slice() {
        [version, trace, parent, flags, rest @ ..] => {
            hex(version, 2)
                && *version != "ff"
                && (*version != "00" || rest.is_empty())
                && hex(trace, 32)
                && trace.bytes().any(|b| b != b'0')
                && hex(parent, 16)
                && parent.bytes().any(|b| b != b'0')
                && hex(flags, 2)
        }
        _ => false,
    }
}

/// The upstream's response headers as the caller may see them.
pub fn sanitise_response_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    // The Gateway's own signals (`X-Caracal-Refused-By`, `X-Caracal-Revoked`, …) are not the
    // upstream's to give.
    let reserved: Vec<http::HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("x-caracal-"))
        .cloned()
        .collect();
    for name in reserved {
        headers.remove(name);
    }
    for name in [
        "server",
        "x-powered-by",
        "x-aspnet-version",
        "x-aspnetmvc-version",
        "refresh",
    ] {
        headers.remove(name);
    }
    // A redirect elsewhere is the upstream's business, not a place to send the caller.
    for name in [http::header::LOCATION, http::header::CONTENT_LOCATION] {
        let relative = headers
            .get(&name)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| {
                !value.starts_with("//") && !value.contains("://") && !value.starts_with('\\')
            });
        if !relative {
            headers.remove(name);
        }
    }
}

/// `base` path joined with the request path (already refused if it had dot segments).
pub fn join_path(base: &str, request: &str) -> String {
    let base = base.trim_end_matches('/');
    match request {
        "" | "/" if base.is_empty() => "/".to_owned(),
        "" | "/" => base.to_owned(),
        _ => format!("{base}{request}"),
    }
}

/// The upstream's query merged with the caller's: the upstream's keys win, then `set`
/// overrides (the API-key parameter).
pub fn merge_query(
    upstream: Option<&str>,
    caller: Option<&str>,
    set: Option<(&str, &str)>,
) -> Option<String> {
    let parse = |query: Option<&str>| -> Vec<(String, String)> {
        query
            .and_then(|query| serde_urlencoded::from_str(query).ok())
            .unwrap_or_default()
    };
    let mut pairs = parse(upstream);
    let fixed: Vec<String> = pairs.iter().map(|(key, _)| key.clone()).collect();
    pairs.extend(
        parse(caller)
            .into_iter()
            .filter(|(key, _)| !fixed.contains(key)),
    );
    if let Some((name, value)) = set {
        pairs.retain(|(key, _)| key != name);
        pairs.push((name.to_owned(), value.to_owned()));
    }
    if pairs.is_empty() {
        return None;
    }
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    serde_urlencoded::to_string(&pairs).ok()
}

/// The upstream's response body on its way to the caller: flushed as it arrives, cut (with
/// the trailer `X-Caracal-Revoked: true`) as soon as the mandate is revoked, and ended with an
/// error if the upstream goes quiet for longer than the idle timeout.
pub struct GuardedBody<B> {
    inner: B,
    view: Arc<RevocationView>,
    anchors: Anchors,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    sent: Arc<AtomicU64>,
    revoked: Arc<std::sync::atomic::AtomicBool>,
    finished: bool,
}

impl<B> GuardedBody<B> {
    pub fn new(
        inner: B,
        view: Arc<RevocationView>,
        anchors: Anchors,
        idle: Duration,
        sent: Arc<AtomicU64>,
        revoked: Arc<std::sync::atomic::AtomicBool>,
    ) -> GuardedBody<B> {
        GuardedBody {
            inner,
            view,
            anchors,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            sent,
            revoked,
            finished: false,
        }
    }
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<B> Body for GuardedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(None);
        }
        if this.view.is_revoked(&this.anchors) {
            this.finished = true;
            this.revoked.store(true, Ordering::Relaxed);
            let mut trailers = HeaderMap::new();
            trailers.insert("x-caracal-revoked", HeaderValue::from_static("true"));
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let deadline = tokio::time::Instant::now() + this.idle;
                this.timer.as_mut().reset(deadline);
                // Upstream trailers are not forwarded; only data is.
                match frame.into_data() {
                    Ok(data) => {
                        this.sent.fetch_add(data.len() as u64, Ordering::Relaxed);
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Err(_) => {
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    }
                }
            }
            Poll::Ready(Some(Err(error))) => {
                this.finished = true;
                Poll::Ready(Some(Err(error.into())))
            }
            Poll::Ready(None) => {
                this.finished = true;
                Poll::Ready(None)
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    this.finished = true;
                    Poll::Ready(Some(Err("the upstream stream went idle".into())))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The JSON object a `GET` of `url` (or, with `form`, a form `POST` to it) answers with 200,
/// through the address guard and `allowlist`, within `max_bytes` and `timeout`; otherwise why
/// not. For the requests the deployment makes of its own accord (OIDC discovery, OAuth token
/// endpoints).
pub async fn fetch_json(
    url: &str,
    form: Option<String>,
    allowlist: &[String],
    max_bytes: usize,
    timeout: Duration,
) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    use http_body_util::BodyExt as _;
    let uri = check_url(url, allowlist)
        .await
        .map_err(|error| error.to_string())?;
    let client = super::upstream_client()?;
    let request = match form {
        None => {
            http::Request::get(uri).body(http_body_util::Limited::new(axum::body::Body::empty(), 0))
        }
        Some(form) => {
            let length = form.len();
            http::Request::post(uri)
                .header(
                    http::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .body(http_body_util::Limited::new(
                    axum::body::Body::from(form),
                    length,
                ))
        }
    };
    let mut request = request.map_err(|error| error.to_string())?;
    request.headers_mut().insert(
        http::header::ACCEPT,
        HeaderValue::from_static("application/json"),
    );
    let fetched = async {
        let response = client
            .request(request)
            .await
            .map_err(|error| error.to_string())?;
        if response.status() != http::StatusCode::OK {
            return Err(format!("answered {}", response.status()));
        }
        let body = http_body_util::Limited::new(response.into_body(), max_bytes)
            .collect()
            .await
            .map_err(|_| format!("no answer of at most {max_bytes} bytes"))?
            .to_bytes();
        serde_json::from_slice(&body).map_err(|_| "the answer is not a JSON object".to_owned())
    };
    tokio::time::timeout(timeout, fetched)
        .await
        .map_err(|_| format!("no answer within {} s", timeout.as_secs()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn metadata_link_local_multicast_and_unspecified_are_forbidden_in_every_spelling() {
        for forbidden in [
            "169.254.169.254",
            "169.254.0.1",
            "::ffff:169.254.169.254",
            "::169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "239.255.255.250",
            "ff02::1",
            "fe80::1",
            "255.255.255.255",
            "fd00:ec2::254",
            "100.100.100.200",
            "::ffff:0.0.0.0",
        ] {
            assert!(is_forbidden(ip(forbidden)), "{forbidden} must be forbidden");
        }
        for allowed in [
            "127.0.0.1",
            "::1",
            "10.0.0.5",
            "192.168.1.1",
            "8.8.8.8",
            "fd12::1",
            "100.64.0.1",
        ] {
            assert!(!is_forbidden(ip(allowed)), "{allowed} stays reachable");
        }
    }

    #[tokio::test]
    async fn urls_are_refused_before_any_connection() {
        for (url, error) in [
            (
                "http://169.254.169.254/latest/meta-data",
                GuardError::Forbidden,
            ),
            ("http://[::ffff:169.254.169.254]/", GuardError::Forbidden),
            ("http://0.0.0.0:8080/", GuardError::Forbidden),
            ("http://224.0.0.1/", GuardError::Forbidden),
            ("http://user:pw@127.0.0.1/", GuardError::Url),
            ("ftp://127.0.0.1/", GuardError::Url),
            ("/relative", GuardError::Url),
        ] {
            assert_eq!(check_url(url, &[]).await, Err(error), "{url}");
        }
        assert!(check_url("http://127.0.0.1:9/x", &[]).await.is_ok());
        assert!(check_url("https://127.0.0.1:9/x", &[]).await.is_ok());
        assert_eq!(
            check_url("http://127.0.0.1:9/x", &["api.example".to_owned()]).await,
            Err(GuardError::NotAllowed)
        );
    }

    #[test]
    fn credential_headers_cannot_be_reserved_ones() {
        assert_eq!(credential_header(None).unwrap(), "authorization");
        assert_eq!(credential_header(Some("X-Api-Key")).unwrap(), "x-api-key");
        for reserved in [
            "Host",
            "X-Caracal-Identity",
            "x-forwarded-for",
            "Proxy-Foo",
            "content-length",
            "bad header",
        ] {
            assert!(credential_header(Some(reserved)).is_none(), "{reserved}");
        }
    }

    #[test]
    fn paths_and_queries_merge_with_the_upstream_winning() {
        assert_eq!(join_path("", "/a"), "/a");
        assert_eq!(join_path("/", ""), "/");
        assert_eq!(join_path("/v1/", "/items/"), "/v1/items/");
        assert_eq!(join_path("/v1", "/"), "/v1");
        assert_eq!(
            merge_query(Some("tenant=1"), Some("tenant=2&q=x"), None).as_deref(),
            Some("q=x&tenant=1")
        );
        assert_eq!(
            merge_query(None, Some("key=mine&q=x"), Some(("key", "secret"))).as_deref(),
            Some("key=secret&q=x")
        );
        assert_eq!(merge_query(None, None, None), None);
    }

    #[test]
    fn traceparent_is_kept_only_when_valid() {
        assert!(valid_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent(
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent(
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"
        ));
        assert!(!valid_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x"
        ));
    }
}
