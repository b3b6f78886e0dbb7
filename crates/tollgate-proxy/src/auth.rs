//! Data-plane authentication (README, Data plane behaviour): find the key in the configured
//! headers, check its format and checksum (no lookup for a malformed key),
//! then one digest and one cache lookup. No I/O.

use std::sync::Arc;
use std::time::SystemTime;

use http::header::{HeaderName, AUTHORIZATION};
use http::HeaderMap;
use tollgate_metering::keys::{Authenticated, KeyCache};
use tollgate_metering::keys::{KeyDigest, KeyFormat, KeyFormatError};

use crate::error::{InvalidKey, ProxyError};

/// Finds and checks keys.
pub struct Authenticator {
    cache: Arc<KeyCache>,
    format: KeyFormat,
    headers: Vec<HeaderName>,
}

impl Authenticator {
    pub fn new(cache: Arc<KeyCache>, format: KeyFormat, headers: Vec<HeaderName>) -> Self {
        Authenticator {
            cache,
            format,
            headers,
        }
    }

    /// The customer and key behind the request's key.
    pub(crate) fn authenticate(&self, headers: &HeaderMap) -> Result<Authenticated, ProxyError> {
        let presented = self.presented_key(headers)?;
        self.format
            .check(presented)
            .map_err(|error| ProxyError::InvalidApiKey {
                reason: InvalidKey::Malformed(error),
            })?;
        self.cache
            .lookup(&KeyDigest::of(presented), now_micros())
            .map_err(|refusal| ProxyError::InvalidApiKey {
                reason: InvalidKey::Refused(refusal),
            })
    }

    /// The first configured header that carries a key. `Authorization` only
    /// counts with the Bearer scheme (other schemes are for someone else).
    fn presented_key<'h>(&self, headers: &'h HeaderMap) -> Result<&'h str, ProxyError> {
        for name in &self.headers {
            let Some(value) = headers.get(name) else {
                continue;
            };
            let Ok(value) = value.to_str() else {
                return Err(ProxyError::InvalidApiKey {
                    reason: InvalidKey::Malformed(KeyFormatError::Alphabet),
                });
            };
            let key = if *name == AUTHORIZATION {
                match bearer(value) {
                    Some(token) => token,
                    None => continue,
                }
            } else {
                value.trim()
            };
            return Ok(key);
        }
        Err(ProxyError::MissingApiKey)
    }

    /// Removes every header a key may travel in, so that no key (the one
    /// used, or a second one the client also sent) is forwarded upstream.
    pub(crate) fn strip_key_headers(&self, headers: &mut HeaderMap) {
        for name in &self.headers {
            crate::headers::remove_if_present(headers, name);
        }
    }
}

fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn now_micros() -> i64 {
    match SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
        Ok(since) => i64::try_from(since.as_micros()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn auth() -> Authenticator {
        Authenticator::new(
            Arc::new(KeyCache::new()),
            KeyFormat::new("tg"),
            vec![AUTHORIZATION, HeaderName::from_static("x-api-key")],
        )
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn reason(result: Result<Authenticated, ProxyError>) -> String {
        match result {
            Err(ProxyError::InvalidApiKey { reason }) => reason.label().as_str().to_owned(),
            Err(ProxyError::MissingApiKey) => "missing".to_owned(),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn finds_the_key_in_either_header() {
        let auth = auth();
        let key = KeyFormat::new("tg").generate().unwrap();
        let bearer = format!("Bearer {}", key.expose());
        assert_eq!(
            reason(auth.authenticate(&headers(&[("authorization", &bearer)]))),
            "unknown"
        );
        assert_eq!(
            reason(auth.authenticate(&headers(&[("x-api-key", key.expose())]))),
            "unknown"
        );
        let lower = format!("bearer   {}", key.expose());
        assert_eq!(
            reason(auth.authenticate(&headers(&[("authorization", &lower)]))),
            "unknown"
        );
        // Basic auth is not a Tollgate key; with nothing else, the key is missing.
        assert_eq!(
            reason(auth.authenticate(&headers(&[("authorization", "Basic dXNlcjpwdw==")]))),
            "missing"
        );
        assert_eq!(reason(auth.authenticate(&HeaderMap::new())), "missing");
        assert_eq!(
            reason(auth.authenticate(&headers(&[("x-api-key", "sk-not-ours")]))),
            "malformed"
        );
    }

    #[test]
    fn strips_every_key_header() {
        let auth = auth();
        let mut map = headers(&[
            ("authorization", "Bearer x"),
            ("x-api-key", "y"),
            ("x-other", "z"),
        ]);
        auth.strip_key_headers(&mut map);
        assert_eq!(map.len(), 1);
        assert!(map.contains_key("x-other"));
    }
}
