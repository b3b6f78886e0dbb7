//! Routes: which upstream a request goes to, and how its URI is rewritten.
//!
//! Routes are compiled once from config (upstream scheme and authority parsed,
//! header names validated) so the per-request work is a prefix scan and one
//! URI assembled from shared parts. A route with TLS settings of its own
//! gets its upstream client here too; the others use the gateway's shared
//! default client.

use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderName, HeaderValue, Uri};

use crate::forward::{upstream_client_with, UpstreamClient};
use crate::meter::RouteUsage;
use crate::metrics::{Metrics, RouteMetrics};
use crate::tls::UpstreamTls;
use tollgate_metering::usage::Pricing;

/// A route as configured: the proxy's view of a `[[routes]]` table.
#[derive(Clone, Debug)]
pub struct RouteSpec {
    pub name: String,
    pub prefix: String,
    pub upstream: Uri,
    pub strip_prefix: bool,
    pub timeout: Duration,
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
    pub strip_response_headers: Vec<HeaderName>,
    /// Where the route's usage comes from.
    pub usage: RouteUsage,
    /// `ca_file` and `client_cert`; `None` = the default client.
    pub tls: Option<UpstreamTls>,
}

/// A route that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("route {route:?}: upstream {upstream} must be an absolute http:// or https:// URI")]
    BadUpstream { route: String, upstream: String },
    #[error("route {route:?}: prefix {prefix:?} must start with '/'")]
    BadPrefix { route: String, prefix: String },
    #[error("route {route:?}: upstream TLS settings need an https:// upstream, not {upstream}")]
    TlsOnPlainUpstream { route: String, upstream: String },
}

/// A compiled route.
#[derive(Debug)]
pub(crate) struct Route {
    pub name: Arc<str>,
    pub prefix: String,
    scheme: Scheme,
    authority: Authority,
    /// The `Host` header every upstream request carries, built once.
    host: HeaderValue,
    /// The upstream URI's path without its trailing slash ("" for none); it
    /// is prepended to every forwarded path.
    base_path: String,
    pub strip_prefix: bool,
    pub timeout: Duration,
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
    pub strip_response_headers: Vec<HeaderName>,
    pub usage: RouteUsage,
    /// The route's metric handles.
    pub metrics: Arc<RouteMetrics>,
    /// The route's own client and the settings it was built from, when it
    /// has TLS settings of its own.
    own_client: Option<(UpstreamTls, UpstreamClient)>,
}

impl Route {
    /// Checks and compiles `spec`, with its metric handles from `metrics`
    /// (their `model` labels are `pricing`'s models). A route whose TLS
    /// settings equal those of a route in `previous` takes over that
    /// route's client, and so its pool of open connections, instead of
    /// building a new one.
    fn compile(
        spec: RouteSpec,
        metrics: &Metrics,
        pricing: &Pricing,
        previous: Option<&RouteTable>,
    ) -> Result<Route, RouteError> {
        let bad_upstream = || RouteError::BadUpstream {
            route: spec.name.clone(),
            upstream: spec.upstream.to_string(),
        };
        if !spec.prefix.starts_with('/') {
            return Err(RouteError::BadPrefix {
                route: spec.name.clone(),
                prefix: spec.prefix.clone(),
            });
        }
        let scheme = spec.upstream.scheme().cloned().ok_or_else(bad_upstream)?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(bad_upstream());
        }
        let authority = spec
            .upstream
            .authority()
            .cloned()
            .ok_or_else(bad_upstream)?;
        let host = HeaderValue::from_str(authority.as_str()).map_err(|_| bad_upstream())?;
        let base_path = spec.upstream.path().trim_end_matches('/').to_owned();
        let own_client = match spec.tls {
            Some(_) if scheme != Scheme::HTTPS => {
                return Err(RouteError::TlsOnPlainUpstream {
                    route: spec.name.clone(),
                    upstream: spec.upstream.to_string(),
                })
            }
            Some(tls) => {
                let client = previous
                    .and_then(|table| table.client_for(&tls))
                    .unwrap_or_else(|| upstream_client_with(&tls));
                Some((tls, client))
            }
            None => None,
        };
        Ok(Route {
            metrics: metrics.route(&spec.name, pricing),
            name: Arc::from(spec.name),
            prefix: spec.prefix,
            scheme,
            authority,
            host,
            base_path,
            strip_prefix: spec.strip_prefix,
            timeout: spec.timeout,
            set_headers: spec.set_headers,
            strip_response_headers: spec.strip_response_headers,
            usage: spec.usage,
            own_client,
        })
    }

    /// The client that forwards this route's requests: its own when it has
    /// TLS settings, else `default`.
    pub(crate) fn client<'a>(&'a self, default: &'a UpstreamClient) -> &'a UpstreamClient {
        match &self.own_client {
            Some((_, client)) => client,
            None => default,
        }
    }

    /// The `Host` header for the upstream: its authority as configured.
    pub(crate) fn host_header(&self) -> &HeaderValue {
        &self.host
    }

    /// The upstream URI for a client request URI routed here.
    pub(crate) fn upstream_uri(&self, client: &Uri) -> Result<Uri, http::Error> {
        let path_and_query = match self.rewrite_path(client.path()) {
            None => client
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
            Some(path) => {
                let mut rewritten = path;
                if let Some(query) = client.query() {
                    rewritten.push('?');
                    rewritten.push_str(query);
                }
                PathAndQuery::try_from(rewritten)?
            }
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
    }

    /// The rewritten path, or `None` when the client's path is forwarded as is
    /// (the common case, which then costs no allocation).
    pub(crate) fn rewrite_path(&self, path: &str) -> Option<String> {
        if !self.strip_prefix && self.base_path.is_empty() {
            return None;
        }
        let rest = if self.strip_prefix {
            // The prefix always matched, so the slice is in bounds; re-root
            // whatever follows it at '/'.
            path.get(self.prefix.len()..).unwrap_or("")
        } else {
            path
        };
        let mut out = String::with_capacity(self.base_path.len() + rest.len() + 1);
        out.push_str(&self.base_path);
        if !rest.starts_with('/') {
            out.push('/');
        }
        out.push_str(rest);
        Some(out)
    }
}

/// All routes, longest prefix first.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// Compiles `specs`, longest prefix first. For a reload, `previous` is
    /// the table being replaced: routes whose TLS settings did not change
    /// keep the client (and its open connections) they had in it; changed
    /// or new settings get a new client.
    pub fn new_reusing(
        specs: Vec<RouteSpec>,
        metrics: &Metrics,
        pricing: &Pricing,
        previous: Option<&RouteTable>,
    ) -> Result<RouteTable, RouteError> {
        let mut routes = specs
            .into_iter()
            .map(|spec| Route::compile(spec, metrics, pricing, previous))
            .collect::<Result<Vec<_>, _>>()?;
        // Longest prefix wins; the sort is stable, so equal lengths keep
        // their config order.
        routes.sort_by_key(|route| std::cmp::Reverse(route.prefix.len()));
        Ok(RouteTable { routes })
    }

    /// The route with the longest prefix of `path`, in any ASCII case: an
    /// upstream that routes without regard to case would otherwise serve
    /// `/V1/CHAT/completions` as `/v1/chat/completions` to a request the
    /// gateway routed elsewhere (to a shorter prefix, unmetered).
    pub(crate) fn find(&self, path: &str) -> Option<&Route> {
        self.routes.iter().find(|route| {
            path.as_bytes()
                .get(..route.prefix.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(route.prefix.as_bytes()))
        })
    }

    /// A client already built for exactly these TLS settings. (Cloning a
    /// client shares its pool.)
    fn client_for(&self, tls: &UpstreamTls) -> Option<UpstreamClient> {
        self.routes
            .iter()
            .find_map(|route| match &route.own_client {
                Some((built_for, client)) if built_for == tls => Some(client.clone()),
                _ => None,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(spec: RouteSpec) -> Result<Route, RouteError> {
        Route::compile(spec, &Metrics::new(), &Pricing::default(), None)
    }

    fn route_table(specs: Vec<RouteSpec>) -> RouteTable {
        RouteTable::new_reusing(specs, &Metrics::new(), &Pricing::default(), None).unwrap()
    }

    fn spec(name: &str, prefix: &str, upstream: &str, strip: bool) -> RouteSpec {
        RouteSpec {
            name: name.into(),
            prefix: prefix.into(),
            upstream: upstream.parse().unwrap(),
            strip_prefix: strip,
            timeout: Duration::from_secs(1),
            set_headers: vec![],
            strip_response_headers: vec![],
            usage: RouteUsage::default(),
            tls: None,
        }
    }

    #[test]
    fn longest_prefix_wins_regardless_of_order() {
        let table = route_table(vec![
            spec("all", "/", "http://a", false),
            spec("v1", "/v1/", "http://b", false),
            spec("chat", "/v1/chat/", "http://c", false),
        ]);
        assert_eq!(&*table.find("/v1/chat/completions").unwrap().name, "chat");
        assert_eq!(&*table.find("/v1/embeddings").unwrap().name, "v1");
        assert_eq!(&*table.find("/other").unwrap().name, "all");
        // In any case, as an upstream that ignores case would route it.
        assert_eq!(&*table.find("/V1/CHAT/completions").unwrap().name, "chat");
        assert_eq!(&*table.find("/v1/Chat/x").unwrap().name, "chat");
        assert_eq!(&*table.find("/V1/x").unwrap().name, "v1");
        let only_v1 = route_table(vec![spec("v1", "/v1/", "http://b", false)]);
        assert!(only_v1.find("/v1").is_none());
        assert!(only_v1.find("/v2/x").is_none());
    }

    #[test]
    fn strip_prefix_reroots_at_slash_and_keeps_the_query() {
        let route = compile(spec(
            "anthropic",
            "/anthropic/",
            "https://api.anthropic.com",
            true,
        ))
        .unwrap();
        let uri = route
            .upstream_uri(&"/anthropic/v1/messages?beta=true".parse().unwrap())
            .unwrap();
        assert_eq!(
            uri.to_string(),
            "https://api.anthropic.com/v1/messages?beta=true"
        );
        let bare = route.upstream_uri(&"/anthropic/".parse().unwrap()).unwrap();
        assert_eq!(bare.to_string(), "https://api.anthropic.com/");

        let no_slash = compile(spec("a", "/anthropic", "http://up:81", true)).unwrap();
        let uri = no_slash
            .upstream_uri(&"/anthropic/v1/x".parse().unwrap())
            .unwrap();
        assert_eq!(uri.to_string(), "http://up:81/v1/x");
    }

    #[test]
    fn upstream_base_path_is_prepended() {
        let route = compile(spec("a", "/v1/", "http://up/base/", false)).unwrap();
        let uri = route.upstream_uri(&"/v1/x?q=1".parse().unwrap()).unwrap();
        assert_eq!(uri.to_string(), "http://up/base/v1/x?q=1");
        let plain = compile(spec("a", "/v1/", "http://up", false)).unwrap();
        let uri = plain.upstream_uri(&"/v1/x?q=1".parse().unwrap()).unwrap();
        assert_eq!(uri.to_string(), "http://up/v1/x?q=1");
    }

    #[test]
    fn rejects_bad_routes() {
        assert!(matches!(
            compile(spec("a", "v1/", "http://up", false)),
            Err(RouteError::BadPrefix { .. })
        ));
        assert!(matches!(
            compile(spec("a", "/v1/", "/relative", false)),
            Err(RouteError::BadUpstream { .. })
        ));
        assert!(matches!(
            compile(spec("a", "/v1/", "ftp://up", false)),
            Err(RouteError::BadUpstream { .. })
        ));
    }

    #[test]
    fn only_routes_with_tls_settings_have_their_own_client() {
        let tls = UpstreamTls::new(Vec::new(), None).unwrap();
        let with_tls = |upstream: &str| RouteSpec {
            tls: Some(tls.clone()),
            ..spec("a", "/v1/", upstream, false)
        };
        assert!(matches!(
            compile(with_tls("http://up")),
            Err(RouteError::TlsOnPlainUpstream { .. })
        ));
        assert!(compile(with_tls("https://up"))
            .unwrap()
            .own_client
            .is_some());
        assert!(compile(spec("a", "/v1/", "https://up", false))
            .unwrap()
            .own_client
            .is_none());
    }
}
