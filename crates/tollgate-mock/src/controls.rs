//! The `x-mock-*` request headers that steer a response (see the crate docs).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;

/// Most content chunks a request may ask for, so that a typo cannot make the
/// mock build a gigabyte of JSON.
pub(crate) const MAX_CHUNKS: u64 = 1_000_000;

pub(crate) const COST: &str = "x-mock-cost-usd";
pub(crate) const TOKEN_HEADERS: &str = "x-mock-token-headers";
pub(crate) const CHUNKS: &str = "x-mock-chunks";
pub(crate) const CHUNK_DELAY: &str = "x-mock-chunk-delay-ms";
pub(crate) const HANG: &str = "x-mock-hang";
pub(crate) const STATUS: &str = "x-mock-status";
pub(crate) const RESET_AFTER: &str = "x-mock-reset-after";
pub(crate) const HEADER: &str = "x-mock-header";
pub(crate) const CACHE_READ: &str = "x-mock-cache-read";
pub(crate) const CONTENT_LENGTH: &str = "x-mock-content-length";

/// Where `x-mock-hang` stops the response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Hang {
    /// No response head at all.
    Headers,
    /// The head and the first body chunk, then nothing.
    Body,
}

/// Everything the request asked the mock to do, parsed and validated.
#[derive(Clone, Debug, Default)]
pub(crate) struct Controls {
    /// `x-mock-cost-usd`, copied verbatim to `x-cost-usd`.
    pub cost_usd: Option<HeaderValue>,
    /// `x-mock-token-headers`: add `x-tokens-input` / `x-tokens-output`.
    pub token_headers: bool,
    /// `x-mock-chunks`: content chunks (completion words).
    pub chunks: Option<u64>,
    /// `x-mock-chunk-delay-ms`: pause before each streamed chunk after the first.
    pub chunk_delay: Duration,
    /// `x-mock-hang`.
    pub hang: Option<Hang>,
    /// `x-mock-status`: answer with this status and an error body.
    pub status: Option<StatusCode>,
    /// `x-mock-reset-after`: body frames to send before breaking the body.
    pub reset_after: Option<u64>,
    /// `x-mock-header`, in request order.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// `x-mock-cache-read`: prompt tokens served from the upstream's cache.
    pub cache_read: u64,
    /// `x-mock-content-length`: `/bytes/{n}` sends a `content-length`.
    pub content_length: bool,
}

/// A control header the mock could not understand; answered with a 400 so a
/// test with a typo fails loudly instead of testing something else.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ControlError {
    pub header: &'static str,
    pub problem: String,
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.header, self.problem)
    }
}

impl Controls {
    pub(crate) fn parse(headers: &HeaderMap) -> Result<Self, ControlError> {
        let chunks = number::<u64>(headers, CHUNKS)?;
        if let Some(chunks) = chunks {
            if chunks > MAX_CHUNKS {
                return Err(ControlError {
                    header: CHUNKS,
                    problem: format!("at most {MAX_CHUNKS} chunks, got {chunks}"),
                });
            }
        }
        Ok(Self {
            cost_usd: headers.get(COST).cloned(),
            token_headers: flag(headers, TOKEN_HEADERS)?,
            chunks,
            chunk_delay: Duration::from_millis(number(headers, CHUNK_DELAY)?.unwrap_or(0)),
            hang: hang(headers)?,
            status: status(headers)?,
            reset_after: number(headers, RESET_AFTER)?,
            headers: extra_headers(headers)?,
            cache_read: number(headers, CACHE_READ)?.unwrap_or(0),
            content_length: flag(headers, CONTENT_LENGTH)?,
        })
    }
}

/// The header's value as text, if present.
fn text<'h>(headers: &'h HeaderMap, name: &'static str) -> Result<Option<&'h str>, ControlError> {
    headers
        .get(name)
        .map(|value| {
            value.to_str().map(str::trim).map_err(|_| ControlError {
                header: name,
                problem: "the value is not visible ASCII".to_owned(),
            })
        })
        .transpose()
}

fn number<T: FromStr>(headers: &HeaderMap, name: &'static str) -> Result<Option<T>, ControlError> {
    text(headers, name)?
        .map(|value| {
            value.parse().map_err(|_| ControlError {
                header: name,
                problem: format!("expected a whole number, got {value:?}"),
            })
        })
        .transpose()
}

fn flag(headers: &HeaderMap, name: &'static str) -> Result<bool, ControlError> {
    match text(headers, name)? {
        None | Some("0" | "false") => Ok(false),
        Some("1" | "true") => Ok(true),
        Some(other) => Err(ControlError {
            header: name,
            problem: format!("expected 1 or 0, got {other:?}"),
        }),
    }
}

fn hang(headers: &HeaderMap) -> Result<Option<Hang>, ControlError> {
    match text(headers, HANG)? {
        None => Ok(None),
        Some("headers") => Ok(Some(Hang::Headers)),
        Some("body") => Ok(Some(Hang::Body)),
        Some(other) => Err(ControlError {
            header: HANG,
            problem: format!("expected \"headers\" or \"body\", got {other:?}"),
        }),
    }
}

fn status(headers: &HeaderMap) -> Result<Option<StatusCode>, ControlError> {
    let Some(code) = number::<u16>(headers, STATUS)? else {
        return Ok(None);
    };
    // A 1xx is not a final response; hyper cannot send one as such.
    match StatusCode::from_u16(code) {
        Ok(status) if !status.is_informational() => Ok(Some(status)),
        _ => Err(ControlError {
            header: STATUS,
            problem: format!("expected a final status code 200-999, got {code}"),
        }),
    }
}

/// Every `x-mock-header: name: value`, split at the first colon.
fn extra_headers(headers: &HeaderMap) -> Result<Vec<(HeaderName, HeaderValue)>, ControlError> {
    headers
        .get_all(HEADER)
        .iter()
        .map(|raw| {
            let invalid = |problem: &str| ControlError {
                header: HEADER,
                problem: format!("{problem} in {:?}", String::from_utf8_lossy(raw.as_bytes())),
            };
            let bytes = raw.as_bytes();
            let colon = bytes
                .iter()
                .position(|&b| b == b':')
                .ok_or_else(|| invalid("expected \"name: value\""))?;
            let (name, value) = (&bytes[..colon], &bytes[colon + 1..]);
            let name = HeaderName::from_bytes(name.trim_ascii())
                .map_err(|_| invalid("invalid header name"))?;
            let value = HeaderValue::from_bytes(value.trim_ascii())
                .map_err(|_| invalid("invalid header value"))?;
            Ok((name, value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn no_headers_means_defaults() {
        let controls = Controls::parse(&HeaderMap::new()).unwrap();
        assert_eq!(controls.chunks, None);
        assert_eq!(controls.chunk_delay, Duration::ZERO);
        assert!(!controls.token_headers && !controls.content_length);
        assert!(controls.headers.is_empty());
    }

    #[test]
    fn parses_every_control() {
        let controls = Controls::parse(&headers(&[
            (COST, "not-a-number"),
            (TOKEN_HEADERS, "1"),
            (CHUNKS, "7"),
            (CHUNK_DELAY, " 25 "),
            (HANG, "body"),
            (STATUS, "503"),
            (RESET_AFTER, "2"),
            (HEADER, "connection: x-foo"),
            (HEADER, "x-foo:1"),
            (CACHE_READ, "40"),
            (CONTENT_LENGTH, "true"),
        ]))
        .unwrap();
        assert_eq!(controls.cost_usd.unwrap(), "not-a-number");
        assert!(controls.token_headers);
        assert_eq!(controls.chunks, Some(7));
        assert_eq!(controls.chunk_delay, Duration::from_millis(25));
        assert_eq!(controls.hang, Some(Hang::Body));
        assert_eq!(controls.status, Some(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(controls.reset_after, Some(2));
        assert_eq!(controls.headers.len(), 2);
        assert_eq!(controls.headers[0].0, "connection");
        assert_eq!(controls.headers[0].1, "x-foo");
        assert_eq!(controls.headers[1].0, "x-foo");
        assert_eq!(controls.headers[1].1, "1");
        assert_eq!(controls.cache_read, 40);
        assert!(controls.content_length);
    }

    #[test]
    fn bad_values_name_the_header() {
        for (pairs, message) in [
            (
                [(CHUNKS, "three")],
                "x-mock-chunks: expected a whole number, got \"three\"",
            ),
            (
                [(CHUNKS, "1000001")],
                "x-mock-chunks: at most 1000000 chunks, got 1000001",
            ),
            (
                [(HANG, "forever")],
                "x-mock-hang: expected \"headers\" or \"body\", got \"forever\"",
            ),
            (
                [(STATUS, "100")],
                "x-mock-status: expected a final status code 200-999, got 100",
            ),
            (
                [(STATUS, "1000")],
                "x-mock-status: expected a final status code 200-999, got 1000",
            ),
            (
                [(TOKEN_HEADERS, "yes")],
                "x-mock-token-headers: expected 1 or 0, got \"yes\"",
            ),
            (
                [(HEADER, "no colon")],
                "x-mock-header: expected \"name: value\" in \"no colon\"",
            ),
            (
                [(HEADER, "bad name: 1")],
                "x-mock-header: invalid header name in \"bad name: 1\"",
            ),
        ] {
            let error = Controls::parse(&headers(&pairs)).unwrap_err();
            assert_eq!(error.to_string(), message);
        }
    }
}
