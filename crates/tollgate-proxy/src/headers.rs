//! Header rewriting in both directions: hop-by-hop stripping (RFC 9110
//! §7.6.1), `x-forwarded-*`, and the request id.

use std::net::IpAddr;

use http::header::{HeaderName, HeaderValue, CONNECTION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};
use http::HeaderMap;

pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(crate) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The longest client `x-request-id` the gateway passes on.
pub(crate) const MAX_REQUEST_ID_LEN: usize = 128;

/// Removes the hop-by-hop headers: `Connection` and every header it names,
/// then the fixed list. Applied to requests going upstream and responses
/// coming back.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the headers finds what is there, so that the usual
    // message (none of them, or only `Connection: keep-alive`) hashes no
    // name of the list and splits no value.
    let (mut connection, mut names_headers, mut fixed) = (false, false, false);
    for (name, value) in headers.iter() {
        if name == CONNECTION {
            connection = true;
            names_headers |= !names_no_header(value);
        } else if is_hop_by_hop(name) {
            fixed = true;
        }
    }
    if names_headers {
        // Collected first: the map cannot be mutated while its values are
        // borrowed. Only connections that name headers pay for this Vec;
        // `keep-alive` is on the fixed list and `close` names no header.
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .map(str::trim)
            .filter(|token| {
                !token.eq_ignore_ascii_case("keep-alive") && !token.eq_ignore_ascii_case("close")
            })
            .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    if connection {
        headers.remove(CONNECTION);
    }
    if fixed {
        for name in [&KEEP_ALIVE, &PROXY_CONNECTION] {
            headers.remove(name);
        }
        for name in [TE, TRAILER, TRANSFER_ENCODING, UPGRADE] {
            headers.remove(name);
        }
    }
}

/// Headers through which a client could speak for the gateway to the
/// upstream: who the client is (`Forwarded`, `X-Real-IP`, ...), which
/// path was asked for (`X-Original-URL`, `X-Rewrite-URL`: Symfony and IIS
/// route by them, past the route the gateway chose) or which method
/// (`X-HTTP-Method-Override`: a `GET` the gateway did not read turned into
/// a `POST`). The gateway sets `X-Forwarded-*` itself; these go.
const SPOKEN_FOR: [&str; 11] = [
    "forwarded",
    "x-real-ip",
    "x-client-ip",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-original-url",
    "x-rewrite-url",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Removes the [`SPOKEN_FOR`] headers from a request going upstream.
pub(crate) fn strip_spoken_for(headers: &mut HeaderMap) {
    // Most requests carry none: one scan of the names, no hashing.
    if headers.keys().any(|name| is_spoken_for(name.as_str())) {
        for name in SPOKEN_FOR {
            headers.remove(name);
        }
    }
}

/// One of [`SPOKEN_FOR`]: a `match`, which compares lengths first, where a
/// search of the list would compare each name with all of them.
fn is_spoken_for(name: &str) -> bool {
    matches!(
        name,
        "forwarded"
            | "x-real-ip"
            | "x-client-ip"
            | "x-forwarded-port"
            | "x-forwarded-prefix"
            | "x-forwarded-server"
            | "x-original-url"
            | "x-rewrite-url"
            | "x-http-method-override"
            | "x-http-method"
            | "x-method-override"
    )
}

/// Removes every `name` header. The names are looked at first (see
/// [`has_name`]).
pub(crate) fn remove_if_present(headers: &mut HeaderMap, name: &HeaderName) {
    if has_name(headers, name) {
        headers.remove(name);
    }
}

/// Whether a `name` header is present, by a scan of the names: on a
/// message's few headers, a scan that finds nothing (the usual case for
/// `Expect`, a second key header or `X-Forwarded-For`) costs a fraction of
/// hashing the name.
fn has_name(headers: &HeaderMap, name: &HeaderName) -> bool {
    headers.keys().any(|present| present == name)
}

/// A client address as a header value (`x-forwarded-for`): made once per
/// connection rather than formatted for each request.
pub(crate) fn ip_header(ip: IpAddr) -> HeaderValue {
    // An address's text is always a valid header value.
    HeaderValue::from_str(&ip.to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// A `Connection` value that is only `keep-alive` or `close`, the usual
/// ones: it names no header to remove.
fn names_no_header(value: &HeaderValue) -> bool {
    let token = value.as_bytes().trim_ascii();
    token.eq_ignore_ascii_case(b"keep-alive") || token.eq_ignore_ascii_case(b"close")
}

/// One of the fixed hop-by-hop headers (not counting `Connection` and the
/// names it lists).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == TE
        || name == TRAILER
        || name == TRANSFER_ENCODING
        || name == UPGRADE
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// The client's `x-request-id` if it is sane: 1 to 128 visible ASCII
/// characters. Anything else is ignored (and replaced by the usage id).
pub(crate) fn sane_request_id(headers: &HeaderMap) -> Option<&HeaderValue> {
    let value = headers.get(&X_REQUEST_ID)?;
    let bytes = value.as_bytes();
    let sane = !bytes.is_empty()
        && bytes.len() <= MAX_REQUEST_ID_LEN
        && bytes.iter().all(|b| b.is_ascii_graphic());
    sane.then_some(value)
}

/// Appends the client address to `x-forwarded-for` (joining any values the
/// client or an earlier proxy sent) and sets `x-forwarded-proto` and
/// `x-forwarded-host`.
pub(crate) fn set_forwarded(
    headers: &mut HeaderMap,
    client_ip: &HeaderValue,
    proto: &'static str,
    host: Option<HeaderValue>,
) {
    // Most requests carry none.
    let forwarded_for = if has_name(headers, &X_FORWARDED_FOR) {
        let mut joined = String::new();
        for value in headers.get_all(&X_FORWARDED_FOR) {
            if let Ok(value) = value.to_str() {
                joined.push_str(value.trim());
                joined.push_str(", ");
            }
        }
        joined.push_str(client_ip.to_str().unwrap_or_default());
        HeaderValue::from_str(&joined).ok()
    } else {
        Some(client_ip.clone())
    };
    if let Some(value) = forwarded_for {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    match host {
        Some(host) => {
            headers.insert(X_FORWARDED_HOST.clone(), host);
        }
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        headers
    }

    #[test]
    fn a_client_cannot_speak_for_the_gateway() {
        let mut headers = map(&[
            ("Forwarded", "for=1.2.3.4;host=evil"),
            ("X-Real-IP", "1.2.3.4"),
            ("x-original-url", "/admin"),
            ("X-Rewrite-URL", "/admin"),
            ("x-http-method-override", "POST"),
            ("x-forwarded-prefix", "/x"),
            ("content-type", "application/json"),
            ("x-request-id", "keep"),
        ]);
        strip_spoken_for(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "x-request-id"]);
        let mut none = map(&[("accept", "*/*")]);
        strip_spoken_for(&mut none);
        assert_eq!(none.len(), 1);
        assert!(SPOKEN_FOR.iter().all(|name| is_spoken_for(name)));
    }

    /// The names left after stripping `pairs`, sorted.
    fn left_after_strip(pairs: &[(&str, &str)]) -> Vec<String> {
        let mut headers = map(pairs);
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<_> = headers.keys().map(|k| k.as_str().to_owned()).collect();
        left.sort();
        left
    }

    #[test]
    fn strips_fixed_and_connection_named_headers() {
        let left = left_after_strip(&[
            ("connection", "keep-alive, X-Secret-Hop"),
            ("connection", "x-other"),
            ("x-secret-hop", "1"),
            ("x-other", "2"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("content-type", "application/json"),
            ("x-kept", "yes"),
        ]);
        assert_eq!(left, vec!["content-type", "x-kept"]);
    }

    #[test]
    fn a_plain_keep_alive_connection_header_is_all_that_goes() {
        let left = left_after_strip(&[
            ("connection", "Keep-Alive, close"),
            ("content-length", "2"),
            ("close", "kept: close is not a header the token names"),
        ]);
        assert_eq!(left, vec!["close", "content-length"]);

        // The usual values alone, in any case and spacing: only the
        // Connection headers go.
        let left = left_after_strip(&[
            ("connection", " Close "),
            ("connection", "KEEP-ALIVE"),
            ("x-one", "1"),
        ]);
        assert_eq!(left, vec!["x-one"]);

        // A plain `keep-alive` first does not hide a header named by a
        // second Connection value.
        let left = left_after_strip(&[
            ("connection", "keep-alive"),
            ("connection", "x-named"),
            ("x-named", "1"),
            ("x-one", "1"),
        ]);
        assert_eq!(left, vec!["x-one"]);

        let mut untouched = map(&[("content-type", "a/b"), ("x-one", "1")]);
        strip_hop_by_hop(&mut untouched);
        assert_eq!(untouched.len(), 2);
    }

    #[test]
    fn remove_if_present_removes_every_value_or_nothing() {
        let mut headers = map(&[
            ("expect", "100-continue"),
            ("x-api-key", "one"),
            ("x-api-key", "two"),
            ("x-kept", "yes"),
        ]);
        remove_if_present(&mut headers, &HeaderName::from_static("x-api-key"));
        remove_if_present(&mut headers, &http::header::EXPECT);
        remove_if_present(&mut headers, &http::header::AUTHORIZATION);
        let left: Vec<_> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_bytes()))
            .collect();
        assert_eq!(left, vec![("x-kept", &b"yes"[..])]);
    }

    #[test]
    fn request_id_sanity() {
        assert_eq!(
            sane_request_id(&map(&[("x-request-id", "abc-123")])).unwrap(),
            "abc-123"
        );
        assert!(sane_request_id(&map(&[("x-request-id", "has space")])).is_none());
        assert!(sane_request_id(&map(&[("x-request-id", "")])).is_none());
        let long = "a".repeat(129);
        assert!(sane_request_id(&map(&[("x-request-id", &long)])).is_none());
        let max = "a".repeat(128);
        assert!(sane_request_id(&map(&[("x-request-id", &max)])).is_some());
    }

    #[test]
    fn forwarded_for_appends() {
        let mut headers = map(&[
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
        ]);
        set_forwarded(
            &mut headers,
            &ip_header("127.0.0.1".parse().unwrap()),
            "https",
            Some(HeaderValue::from_static("gw.example")),
        );
        assert_eq!(headers[&X_FORWARDED_FOR], "10.0.0.1, 10.0.0.2, 127.0.0.1");
        assert_eq!(headers.get_all(&X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(headers[&X_FORWARDED_PROTO], "https");
        assert_eq!(headers[&X_FORWARDED_HOST], "gw.example");

        let mut fresh = HeaderMap::new();
        set_forwarded(&mut fresh, &ip_header("::1".parse().unwrap()), "http", None);
        assert_eq!(fresh[&X_FORWARDED_FOR], "::1");
    }
}
