//! What makes a request malformed (phase 1 of the pipeline), checked on
//! every request of a connection, pipelined or not.
//!
//! - Paths: a dot segment (`.` or `..`, literal or percent-encoded in any
//!   case) would let `/pub/../premium/x` match route `pub` here and reach
//!   `premium` at an upstream that normalises; an encoded slash or
//!   backslash (`%2f`, `%5c`) or a raw backslash would do the same at an
//!   upstream that decodes or treats `\` as `/`. So would an encoded
//!   character that needs no encoding (`/v1/%63hat/` is `/v1/chat/` once
//!   decoded, as most servers decode before they route), an empty segment
//!   (`/v1//chat/`, which nginx and others merge) and a `;` parameter
//!   (`/v1/chat;x/`, which Java servers drop, and `..;` is `..` to them).
//!   The gateway refuses them rather than normalising, so what it routes
//!   and meters is exactly what the upstream sees.
//! - `Host`: an HTTP/1.1 request carries exactly one, and it is a plain
//!   `host[:port]` (RFC 9112 §3.2); it is copied into `x-forwarded-host`, so
//!   anything else would be passed on to upstreams that trust it.
//! - Head size: the request line and headers together are at most
//!   `max_header_bytes` (431), the request line alone too (414).
//!
//! All checks are byte scans of what hyper already parsed: no allocation.

use http::header::HOST;
use http::{HeaderMap, Method, Uri, Version};

use crate::error::ProxyError;

/// Refuses a path that an upstream could read as another: with a dot
/// segment, an encoded slash or backslash, a raw backslash, an encoded
/// character that needs no encoding, an empty segment or a `;` parameter.
pub(crate) fn check_path(path: &str) -> Result<(), ProxyError> {
    let bytes = path.as_bytes();
    // One pass finds what needs a closer look; most paths have none of it.
    let (mut previous, mut encoded_or_dot) = (0, false);
    for &byte in bytes {
        match byte {
            b'\\' | b';' => {
                return Err(malformed(
                    "the path contains a backslash or a `;` parameter",
                ));
            }
            b'/' if previous == b'/' => {
                return Err(malformed("the path contains an empty segment"));
            }
            b'%' | b'.' => encoded_or_dot = true,
            _ => {}
        }
        previous = byte;
    }
    if !encoded_or_dot {
        return Ok(());
    }
    for (at, _) in path.match_indices('%') {
        let decoded = bytes
            .get(at + 1..at + 3)
            .and_then(|code| std::str::from_utf8(code).ok())
            .and_then(|code| u8::from_str_radix(code, 16).ok());
        match decoded {
            Some(b'/' | b'\\') => {
                return Err(malformed("the path contains an encoded slash or backslash"));
            }
            // `%2e` is judged with the dot segments below.
            Some(byte) if byte != b'.' && is_unreserved(byte) => {
                return Err(malformed(
                    "the path encodes a character that needs no encoding",
                ));
            }
            _ => {}
        }
    }
    if path.split('/').any(is_dot_segment) {
        return Err(malformed("the path contains a dot segment"));
    }
    Ok(())
}

/// RFC 3986's unreserved characters: the ones a URI never needs to encode,
/// and that normalisation decodes.
fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// `.` or `..`, each dot literal or `%2e` in any case.
fn is_dot_segment(segment: &str) -> bool {
    let mut rest = segment.as_bytes();
    let mut dots = 0;
    while !rest.is_empty() {
        if rest[0] == b'.' {
            rest = &rest[1..];
        } else if rest.len() >= 3 && rest[0] == b'%' && rest[1..3].eq_ignore_ascii_case(b"2e") {
            rest = &rest[3..];
        } else {
            return false;
        }
        dots += 1;
    }
    dots == 1 || dots == 2
}

/// An HTTP/1.1 request has exactly one `Host`; any `Host` present (any
/// version) is a plain `host[:port]`, and so is the request target's
/// authority (HTTP/2's `:authority`, an absolute-form target), which
/// stands in for `Host` where there is none.
pub(crate) fn check_host(
    version: Version,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(), ProxyError> {
    if uri
        .authority()
        .is_some_and(|authority| !is_host_port(authority.as_str().as_bytes()))
    {
        return Err(malformed(
            "the request's authority is not a valid host[:port]",
        ));
    }
    let mut hosts = headers.get_all(HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(malformed("the request has more than one Host header"));
    }
    match first {
        None if version == Version::HTTP_11 => {
            Err(malformed("an HTTP/1.1 request must have a Host header"))
        }
        None => Ok(()),
        Some(value) if is_host_port(value.as_bytes()) => Ok(()),
        Some(_) => Err(malformed("the Host header is not a valid host[:port]")),
    }
}

/// `host[:port]`: a registered name, an IPv4 address or a bracketed IPv6
/// address, and an optional port of 1 to 5 digits up to 65535; no
/// userinfo, path, query or whitespace.
fn is_host_port(value: &[u8]) -> bool {
    let Ok(value) = std::str::from_utf8(value) else {
        return false;
    };
    // The port, when the value has one (`None`: no colon at all).
    let (host, port) = match value.strip_prefix('[') {
        Some(bracketed) => match bracketed.split_once(']') {
            Some((v6, rest)) if v6.parse::<std::net::Ipv6Addr>().is_ok() => {
                match rest.strip_prefix(':') {
                    Some(port) => ("v6", Some(port)),
                    None if rest.is_empty() => ("v6", None),
                    None => return false,
                }
            }
            _ => return false,
        },
        None => match value.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (value, None),
        },
    };
    let port_ok = port.is_none_or(is_port);
    port_ok && !host.is_empty() && host.bytes().all(is_unreserved)
}

fn is_port(digits: &str) -> bool {
    (1..=5).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && digits.parse::<u16>().is_ok()
}

/// The request line and headers fit in `limit` bytes, counted as they
/// travel in HTTP/1.1 (`name: value\r\n`).
pub(crate) fn check_head_size(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    limit: u64,
) -> Result<(), ProxyError> {
    // "METHOD SP target SP HTTP/1.1 CRLF"
    let target = uri.path_and_query().map_or(1, |path| path.as_str().len())
        + uri
            .authority()
            .map_or(0, |authority| authority.as_str().len())
        + uri.scheme_str().map_or(0, |scheme| scheme.len() + 3);
    let line = (method.as_str().len() + target + 12) as u64;
    if line > limit {
        return Err(ProxyError::UriTooLong { limit });
    }
    let mut size = line + 2;
    for (name, value) in headers {
        size += (name.as_str().len() + value.len() + 4) as u64;
        if size > limit {
            return Err(ProxyError::HeaderTooLarge { limit });
        }
    }
    Ok(())
}

fn malformed(reason: &'static str) -> ProxyError {
    ProxyError::MalformedRequest { reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    #[test]
    fn dot_segments_and_encoded_separators_are_refused_in_any_spelling() {
        for bad in [
            "/pub/../premium",
            "/pub/..",
            "/pub/./x",
            "/pub/%2e%2e/premium",
            "/pub/%2E%2e/x",
            "/pub/.%2E/x",
            "/pub/%2e./x",
            "/pub/%2e/x",
            "/pub/a%2fb",
            "/pub/a%2Fb",
            "/pub/a%5cb",
            "/pub/a%5C..",
            "/pub\\..\\premium",
            "/..",
            // Read as another path by servers that decode, merge slashes
            // or drop `;` parameters.
            "/v1/%63hat/completions",
            "/v1/chat/%43ompletions",
            "/pub/%7e",
            "/pub/%5F",
            "/pub/%25%32%65",
            "/v1//chat/completions",
            "//v1/chat",
            "/v1/chat//",
            "/v1/chat;x/completions",
            "/pub/..;/premium",
            "/pub/;",
        ] {
            assert!(check_path(bad).is_err(), "{bad} is refused");
        }
        for good in [
            "/",
            "/pub/x",
            "/pub/...",
            "/pub/.well-known/x",
            "/pub/a..b",
            "/pub/..x",
            "/pub/%2e%2e%2e",
            "/pub/%2ex",
            "/pub/a%20b",
            "/pub/%25",
            "/pub/%C3%A9",
            "/pub/%3A%40%2B",
            "/pub/%zz",
            "/pub/%",
            "/v1/chat/completions",
        ] {
            assert!(check_path(good).is_ok(), "{good} is accepted");
        }
    }

    fn headers(hosts: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for host in hosts {
            map.append(HOST, HeaderValue::from_str(host).unwrap());
        }
        map
    }

    #[test]
    fn http11_needs_exactly_one_plain_host() {
        for good in [
            "example.com",
            "example.com:8080",
            "127.0.0.1",
            "127.0.0.1:1",
            "[::1]",
            "[::1]:443",
            "my_host",
        ] {
            assert!(
                check_host(Version::HTTP_11, &Uri::default(), &headers(&[good])).is_ok(),
                "{good}"
            );
        }
        for bad in [
            "",
            "user@example.com",
            "example.com/path",
            "example.com:port",
            "example.com:",
            "exa mple.com",
            "example.com?x",
            "[not-an-ip]",
            ":80",
            "example.com:99999",
        ] {
            assert!(
                check_host(Version::HTTP_11, &Uri::default(), &headers(&[bad])).is_err(),
                "{bad:?}"
            );
        }
        assert!(check_host(Version::HTTP_11, &Uri::default(), &headers(&[])).is_err());
        assert!(check_host(Version::HTTP_11, &Uri::default(), &headers(&["a", "a"])).is_err());
        assert!(check_host(Version::HTTP_10, &Uri::default(), &headers(&[])).is_ok());
        assert!(check_host(Version::HTTP_2, &Uri::default(), &headers(&[])).is_ok());
        // The target's authority (HTTP/2's `:authority`, an absolute-form
        // target) is held to the same.
        let uri = |text: &str| text.parse::<Uri>().unwrap();
        for good in [
            "http://example.com/x",
            "https://[::1]:8443/x",
            "http://a:80/",
        ] {
            assert!(
                check_host(Version::HTTP_2, &uri(good), &headers(&[])).is_ok(),
                "{good}"
            );
        }
        for bad in [
            "http://a@evil.example/x",
            "http://user:pw@evil.example:1/v1/x",
        ] {
            assert!(
                check_host(Version::HTTP_2, &uri(bad), &headers(&[])).is_err(),
                "{bad}"
            );
            assert!(
                check_host(Version::HTTP_11, &uri(bad), &headers(&["a"])).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn heads_over_the_limit_are_431_and_long_request_lines_414() {
        let uri: Uri = "/v1/chat".parse().unwrap();
        let mut map = headers(&["example.com"]);
        assert!(check_head_size(&Method::GET, &uri, &map, 1024).is_ok());
        map.insert("x-big", HeaderValue::from_str(&"a".repeat(1000)).unwrap());
        assert!(matches!(
            check_head_size(&Method::GET, &uri, &map, 1024),
            Err(ProxyError::HeaderTooLarge { limit: 1024 })
        ));
        let long: Uri = format!("/v1/{}", "a".repeat(1100)).parse().unwrap();
        assert!(matches!(
            check_head_size(&Method::GET, &long, &headers(&[]), 1024),
            Err(ProxyError::UriTooLong { limit: 1024 })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Whatever the path, an accepted one has no segment that a
        /// percent-decoding, backslash-folding upstream would read as `.`
        /// or `..`.
        #[test]
        fn arbitrary_input_paths(path in "(/[a-zA-Z.%25\\\\2eEfF5cC]{0,6}){1,5}") {
            if check_path(&path).is_ok() {
                let folded = path.replace('\\', "/");
                let decoded = decode(&folded);
                for segment in decoded.split(['/', '\\']) {
                    prop_assert!(segment != "." && segment != "..", "{path} -> {decoded}");
                }
            }
        }

        #[test]
        fn arbitrary_input_hosts(value in "\\PC{0,40}") {
            if let Ok(header) = HeaderValue::from_str(&value) {
                let mut map = HeaderMap::new();
                map.insert(HOST, header);
                if check_host(Version::HTTP_11, &Uri::default(), &map).is_ok() {
                    prop_assert!(!value.contains(['@', '/', ' ', '?', '#']));
                    prop_assert!(value.parse::<http::uri::Authority>().is_ok());
                }
            }
        }
    }

    /// One round of percent-decoding, as an upstream would do it.
    fn decode(path: &str) -> String {
        let bytes = path.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' && i + 2 < bytes.len() {
                if let Ok(byte) = u8::from_str_radix(&path[i + 1..i + 3], 16) {
                    out.push(byte);
                    i += 3;
                    continue;
                }
            }
            out.push(bytes[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}
