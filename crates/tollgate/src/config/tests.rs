//! Tests of the whole pipeline, text to `Config`: the shipped config files,
//! defaults, interpolation, and the exact error an operator sees for every
//! way a file can be wrong.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};
use serde::de::{self, DeserializeOwned, Visitor};

use super::raw::{
    RawAdmin, RawConfig, RawDatabase, RawKeys, RawPrice, RawRoute, RawServer, RawTier, RawTls,
    RawUsage, RawWebhook,
};
use super::*;

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/tollgate.example.toml");
const QUICK_START: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/tollgate.toml");

fn env(name: &str) -> Option<String> {
    let value = match name {
        "TOLLGATE_ADMIN_TOKEN" => "admin-secret",
        "TOLLGATE_WEBHOOK_SECRET" => "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "OPENAI_API_KEY" => "sk-test",
        "EMPTY" => "",
        "NEWLINE" => "a\nb",
        "HEADER" => "X-From-Env",
        "CERT_DIR" => "/etc/tollgate",
        "TIMEOUT" => "5 parsecs",
        _ => return None,
    };
    Some(value.to_owned())
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, "tollgate.toml", &env)
}

/// The error for `text`, as the operator sees it.
fn message(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

/// A valid route with `extra` lines appended; its keys start on line 5.
fn route(extra: &str) -> String {
    format!("[[routes]]\nname = \"r\"\nprefix = \"/\"\nupstream = \"http://up\"\n{extra}")
}

fn header(name: &'static str) -> HeaderName {
    HeaderName::from_static(name)
}

// ---- defaults --------------------------------------------------------------

#[test]
fn defaults_are_the_documented_values() {
    assert_eq!(
        defaults::LISTEN,
        "127.0.0.1:8080".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(
        defaults::ADMIN_LISTEN,
        "127.0.0.1:9090".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(defaults::MAX_REQUEST_BODY, 10 * 1024 * 1024);
    assert_eq!(defaults::REQUEST_HEADER_TIMEOUT, Duration::from_secs(10));
    assert_eq!(defaults::WORKER_THREADS, 0);
    assert_eq!(defaults::DATABASE_URL, "sqlite://data/tollgate.db");
    assert_eq!(defaults::POOL_SIZE, 16);
    assert_eq!(defaults::KEY_PREFIX, "tg");
    assert_eq!(defaults::KEY_HEADERS, ["authorization", "x-api-key"]);
    assert_eq!(defaults::FLUSH_INTERVAL, Duration::from_millis(200));
    assert_eq!(defaults::BATCH_SIZE, 5000);
    assert_eq!(defaults::SPOOL_DIR, "data/spool");
    assert_eq!(defaults::SPOOL_MAX, 1024 * 1024 * 1024);
    assert_eq!(defaults::SYNC_INTERVAL, Duration::from_secs(1));
    // (migrate, strip_prefix): one comparison, since clippy rejects asserting a lone constant.
    assert_eq!(
        [defaults::MIGRATE, defaults::ROUTE_STRIP_PREFIX],
        [true, false]
    );
    assert_eq!(defaults::ROUTE_USAGE, UsageFormat::None);
    assert_eq!(defaults::ROUTE_TIMEOUT, Duration::from_secs(300));
    assert_eq!(defaults::TIER_OVERAGE, Overage::Block);
}

#[test]
fn default_config_uses_the_constants_and_has_no_routes_tiers_or_tokens() {
    let config = Config::default();
    assert_eq!(config.server.listen, defaults::LISTEN);
    assert_eq!(config.server.admin_listen, defaults::ADMIN_LISTEN);
    assert_eq!(config.server.tls, None);
    assert_eq!(config.server.max_request_body, defaults::MAX_REQUEST_BODY);
    assert_eq!(
        config.server.request_header_timeout,
        defaults::REQUEST_HEADER_TIMEOUT
    );
    assert_eq!(config.server.worker_threads, 0);
    assert_eq!(
        config.server.instance_id,
        format!(
            "{}-{}",
            hostname_part(&config.server.instance_id),
            std::process::id()
        )
    );
    assert!(config.admin.tokens.is_empty());
    assert_eq!(config.database.url, defaults::DATABASE_URL);
    assert_eq!(config.database.pool_size, defaults::POOL_SIZE);
    assert!(config.database.migrate);
    assert_eq!(config.database.backend(), DatabaseBackend::Sqlite);
    assert_eq!(config.keys.prefix, "tg");
    assert_eq!(
        config.keys.headers,
        [header("authorization"), header("x-api-key")]
    );
    assert_eq!(config.usage.flush_interval, defaults::FLUSH_INTERVAL);
    assert_eq!(config.usage.batch_size, defaults::BATCH_SIZE);
    assert_eq!(config.usage.spool_dir, PathBuf::from("data/spool"));
    assert_eq!(config.usage.spool_max, defaults::SPOOL_MAX);
    assert_eq!(config.usage.sync_interval, defaults::SYNC_INTERVAL);
    assert!(config.tiers.is_empty());
    assert!(config.routes.is_empty());
    assert!(config.pricing.is_empty());
}

fn hostname_part(instance_id: &str) -> &str {
    let suffix = format!("-{}", std::process::id());
    instance_id.strip_suffix(suffix.as_str()).unwrap()
}

#[test]
fn an_empty_file_or_empty_sections_give_the_defaults() {
    assert_eq!(parse("").unwrap(), Config::default());
    assert_eq!(
        parse("# nothing but a comment\n").unwrap(),
        Config::default()
    );
    let sections = "[server]\n[admin]\n[database]\n[keys]\n[usage]\n[pricing]\n";
    assert_eq!(parse(sections).unwrap(), Config::default());
    assert_eq!(
        parse("tiers = []\nroutes = []\n").unwrap(),
        Config::default()
    );
}

#[test]
fn route_and_tier_defaults() {
    let config = parse(&format!("{}\n[[tiers]]\nname = \"t\"\n", route(""))).unwrap();
    let route = &config.routes[0];
    assert!(!route.strip_prefix);
    assert_eq!(route.usage, UsageFormat::None);
    assert_eq!(route.timeout, Duration::from_secs(300));
    assert_eq!(route.cost_header, None);
    assert_eq!(route.input_tokens_header, None);
    assert_eq!(route.output_tokens_header, None);
    assert!(route.strip_response_headers.is_empty());
    assert!(route.set_headers.is_empty());
    assert_eq!(
        config.tiers,
        [TierConfig {
            name: "t".to_owned(),
            rate: None,
            monthly_requests: None,
            monthly_tokens: None,
            monthly_cost_nanos: None,
            overage: Overage::Block,
            overage_price_per_request_nanos: None,
            alerts: Alerts::none(),
        }]
    );
}

// ---- the shipped files -----------------------------------------------------

#[test]
fn the_example_file_parses_to_the_documented_values() {
    let text = std::fs::read_to_string(EXAMPLE).unwrap();
    let config = Config::parse(&text, "tollgate.example.toml", &env).unwrap();

    // [server], [database], [keys], [usage] show exactly the defaults.
    assert_eq!(config.server, ServerConfig::default());
    assert_eq!(config.database, DatabaseConfig::default());
    assert_eq!(config.keys, KeysConfig::default());
    assert_eq!(config.usage, UsageConfig::default());

    assert_eq!(config.admin.tokens, ["admin-secret"]);
    assert_eq!(
        config.tiers,
        [
            TierConfig {
                name: "free".to_owned(),
                rate: Some(Rate {
                    count: 60,
                    per: Duration::from_secs(60),
                }),
                monthly_requests: Some(1000),
                monthly_tokens: None,
                monthly_cost_nanos: None,
                overage: Overage::Block,
                overage_price_per_request_nanos: None,
                alerts: Alerts::none(),
            },
            TierConfig {
                name: "pro".to_owned(),
                rate: Some(Rate {
                    count: 600,
                    per: Duration::from_secs(60),
                }),
                monthly_requests: Some(100_000),
                monthly_tokens: Some(50_000_000),
                monthly_cost_nanos: Some(500_000_000_000),
                overage: Overage::Bill,
                overage_price_per_request_nanos: Some(1_000_000),
                alerts: Alerts::from_millionths(vec![500_000, 800_000, 1_000_000]).unwrap(),
            },
            TierConfig {
                name: "enterprise".to_owned(),
                rate: None,
                monthly_requests: None,
                monthly_tokens: None,
                monthly_cost_nanos: None,
                overage: Overage::Block,
                overage_price_per_request_nanos: None,
                alerts: Alerts::none(),
            },
        ]
    );
    assert_eq!(
        config.routes,
        [RouteConfig {
            name: "openai".to_owned(),
            prefix: "/v1/".to_owned(),
            upstream: Uri::from_static("https://api.openai.com"),
            strip_prefix: false,
            usage: UsageFormat::Openai,
            cost_header: Some(header("x-cost-usd")),
            input_tokens_header: Some(header("x-tokens-input")),
            output_tokens_header: Some(header("x-tokens-output")),
            timeout: Duration::from_secs(300),
            strip_response_headers: vec![header("x-cost-usd")],
            set_headers: vec![(
                header("authorization"),
                HeaderValue::from_static("Bearer sk-test")
            )],
            tls: None,
        }]
    );
    assert!(config.routes[0].set_headers[0].1.is_sensitive());
    assert_eq!(
        config.pricing.into_iter().collect::<Vec<_>>(),
        [(
            "gpt-4o-mini".to_owned(),
            ModelPrice {
                input: 150_000_000,
                output: 600_000_000,
                cache_read: 75_000_000,
                cache_write: 150_000_000,
            }
        )]
    );
}

/// The example with its commented-out settings (`# tls = ...`) and
/// sections (`# [[webhooks]]`) switched on.
fn example_with_commented_settings_enabled() -> (String, BTreeSet<String>) {
    let text = std::fs::read_to_string(EXAMPLE).unwrap();
    let mut enabled = BTreeSet::new();
    let lines: Vec<&str> = text
        .lines()
        .map(|line| {
            if let Some(section) = line
                .strip_prefix("# ")
                .filter(|rest| rest.starts_with("[[") && rest.ends_with("]]"))
            {
                enabled.insert(section.to_owned());
                return section;
            }
            let setting = line.strip_prefix("# ").filter(|rest| {
                rest.split_once(" = ").is_some_and(|(key, _)| {
                    !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                })
            });
            match setting {
                Some(setting) => {
                    enabled.insert(setting.split(' ').next().unwrap_or_default().to_owned());
                    setting
                }
                None => line,
            }
        })
        .collect();
    (lines.join("\n"), enabled)
}

#[test]
fn the_examples_commented_out_settings_are_valid() {
    let (text, enabled) = example_with_commented_settings_enabled();
    assert_eq!(
        enabled,
        BTreeSet::from(
            [
                "instance_id",
                "tls",
                "ca_file",
                "client_cert",
                "[[webhooks]]",
                "url",
                "secret",
                "events"
            ]
            .map(str::to_owned)
        )
    );
    // A route's PEM files are read at load: point the example's paths at
    // real ones.
    let pems = Pems::new();
    let text = text
        .replace("certs/internal-ca.pem", &pems.path(&pems.ca))
        .replace("certs/gw-client.pem", &pems.path(&pems.cert))
        .replace("certs/gw-client.key", &pems.path(&pems.key));
    let config = Config::parse(&text, "tollgate.example.toml", &env).unwrap();
    assert_eq!(
        config.server.tls,
        Some(TlsConfig {
            cert: PathBuf::from("certs/gw.pem"),
            key: PathBuf::from("certs/gw.key"),
        })
    );
    assert_eq!(
        config.admin.tls,
        Some(TlsConfig {
            cert: PathBuf::from("certs/admin.pem"),
            key: PathBuf::from("certs/admin.key"),
        })
    );
    assert_eq!(
        config.webhooks,
        [WebhookConfig {
            url: "https://billing.example.com/tollgate-events".to_owned(),
            secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned(),
            events: EventType::ALL.to_vec(),
        }]
    );
    let tls = config.routes[0].tls.as_ref().unwrap();
    assert_eq!(tls.ca_file.as_ref(), Some(&pems.ca));
    assert_eq!(
        tls.client_cert,
        Some(TlsConfig {
            cert: pems.cert.clone(),
            key: pems.key.clone(),
        })
    );
    assert!(tls.upstream.has_client_cert());
    assert_eq!(config.server.instance_id, "gw-1");
}

/// Captures the field list serde derives for a struct, so the test below
/// follows the parser when a key is added instead of a hand-kept list.
struct FieldCapture<'a>(&'a Cell<&'static [&'static str]>);

impl<'de> de::Deserializer<'de> for FieldCapture<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.set(fields);
        Err(de::Error::custom("fields captured"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
        byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
        enum identifier ignored_any
    }
}

fn fields_of<T: DeserializeOwned>() -> &'static [&'static str] {
    let fields = Cell::new(&[][..]);
    let _ = T::deserialize(FieldCapture(&fields));
    assert!(!fields.get().is_empty(), "{}", std::any::type_name::<T>());
    fields.get()
}

fn table<'a>(value: &'a toml::Value, what: &str) -> &'a toml::Table {
    value
        .as_table()
        .unwrap_or_else(|| panic!("{what} is not a table"))
}

/// Asserts that `shown` (keys present in the example) covers every field.
fn assert_covers<'a>(section: &str, shown: impl IntoIterator<Item = &'a String>, fields: &[&str]) {
    let shown: BTreeSet<&str> = shown.into_iter().map(String::as_str).collect();
    for field in fields {
        assert!(
            shown.contains(field),
            "config/tollgate.example.toml does not show {section}.{field}"
        );
    }
}

#[test]
fn the_example_shows_every_key_the_parser_accepts() {
    let (text, _) = example_with_commented_settings_enabled();
    let root: toml::Table = toml::from_str(&text).unwrap();
    assert_covers("(root)", root.keys(), fields_of::<RawConfig>());

    let server = table(&root["server"], "server");
    assert_covers("server", server.keys(), fields_of::<RawServer>());
    assert_covers(
        "server.tls",
        table(&server["tls"], "tls").keys(),
        fields_of::<RawTls>(),
    );
    assert_covers(
        "admin",
        table(&root["admin"], "admin").keys(),
        fields_of::<RawAdmin>(),
    );
    assert_covers(
        "database",
        table(&root["database"], "database").keys(),
        fields_of::<RawDatabase>(),
    );
    assert_covers(
        "keys",
        table(&root["keys"], "keys").keys(),
        fields_of::<RawKeys>(),
    );
    assert_covers(
        "usage",
        table(&root["usage"], "usage").keys(),
        fields_of::<RawUsage>(),
    );

    // Array sections: every field must appear in at least one entry.
    let entries = |name: &str| -> Vec<&toml::Table> {
        root[name]
            .as_array()
            .unwrap()
            .iter()
            .map(|entry| table(entry, name))
            .collect()
    };
    let tiers = entries("tiers");
    assert_covers(
        "tiers[]",
        tiers.iter().flat_map(|t| t.keys()),
        fields_of::<RawTier>(),
    );
    let routes = entries("routes");
    assert_covers(
        "routes[]",
        routes.iter().flat_map(|t| t.keys()),
        fields_of::<RawRoute>(),
    );
    let webhooks = entries("webhooks");
    assert_covers(
        "webhooks[]",
        webhooks.iter().flat_map(|t| t.keys()),
        fields_of::<RawWebhook>(),
    );
    let pricing = table(&root["pricing"], "pricing");
    assert_covers(
        "pricing.<model>",
        pricing
            .values()
            .flat_map(|model| table(model, "model").keys()),
        fields_of::<RawPrice>(),
    );
}

#[test]
fn the_quick_start_file_parses() {
    let config = Config::load(Path::new(QUICK_START)).unwrap();
    assert_eq!(config.server.listen, defaults::LISTEN);
    assert_eq!(config.server.admin_listen, defaults::ADMIN_LISTEN);
    assert_eq!(config.database, DatabaseConfig::default());
    assert!(config.admin.tokens.is_empty());
    let names: Vec<&str> = config.tiers.iter().map(|tier| tier.name.as_str()).collect();
    assert_eq!(names, ["free", "pro", "enterprise"]);
    assert_eq!(config.tier("pro").unwrap().overage, Overage::Bill);
    let route = config.route("mock").unwrap();
    assert_eq!(route.prefix, "/v1/");
    assert_eq!(route.upstream, Uri::from_static("http://127.0.0.1:8000"));
    assert_eq!(route.usage, UsageFormat::Openai);
    assert_eq!(route.cost_header, Some(header("x-cost-usd")));
    assert_eq!(route.strip_response_headers, [header("x-cost-usd")]);
    assert_eq!(config.routes.len(), 1);
}

// ---- loading ---------------------------------------------------------------

#[test]
fn a_missing_file_names_its_path() {
    let error = Config::load(Path::new("/nonexistent/tollgate.toml")).unwrap_err();
    assert!(error.is_not_found());
    assert!(
        error
            .to_string()
            .starts_with("cannot read config file /nonexistent/tollgate.toml: "),
        "{error}"
    );
    assert_eq!(error.line(), None);
    assert_eq!(error.key_path(), None);
}

// ---- interpolation ---------------------------------------------------------

#[test]
fn variables_are_substituted_in_arrays_tables_and_set_headers() {
    let text = format!(
        r#"
[server]
tls = {{ cert = "${{CERT_DIR}}/gw.pem", key = "${{CERT_DIR}}/gw.key" }}

[admin]
tokens = ["${{TOLLGATE_ADMIN_TOKEN}}", "literal", "${{OPENAI_API_KEY}}-2"]

[keys]
headers = ["${{HEADER}}"]

{}
strip_response_headers = ["x-a", "${{HEADER}}"]
[routes.set_headers]
authorization = "Bearer ${{OPENAI_API_KEY}}"
x-both = "${{TOLLGATE_ADMIN_TOKEN}}:${{OPENAI_API_KEY}}"
x-escaped = "$${{NOT_A_VAR}} and $5"
"#,
        route("")
    );
    let config = parse(&text).unwrap();
    assert_eq!(
        config.server.tls,
        Some(TlsConfig {
            cert: PathBuf::from("/etc/tollgate/gw.pem"),
            key: PathBuf::from("/etc/tollgate/gw.key"),
        })
    );
    assert_eq!(
        config.admin.tokens,
        ["admin-secret", "literal", "sk-test-2"]
    );
    assert_eq!(config.keys.headers, [header("x-from-env")]);
    let route = &config.routes[0];
    assert_eq!(
        route.strip_response_headers,
        [header("x-a"), header("x-from-env")]
    );
    assert_eq!(
        route.set_headers,
        [
            (
                header("authorization"),
                HeaderValue::from_static("Bearer sk-test")
            ),
            (
                header("x-both"),
                HeaderValue::from_static("admin-secret:sk-test")
            ),
            (
                header("x-escaped"),
                HeaderValue::from_static("${NOT_A_VAR} and $5")
            ),
        ]
    );
}

#[test]
fn a_missing_variable_names_it_with_key_path_and_line() {
    let error = parse("[admin]\ntokens = [\"ok\", \"${NOPE}\"]\n").unwrap_err();
    assert_eq!(
        error.to_string(),
        "tollgate.toml:2:17: admin.tokens[1]: environment variable NOPE is not set"
    );
    assert!(matches!(&error, ConfigError::MissingEnvVar { var, .. } if var == "NOPE"));
    assert_eq!(error.line(), Some(2));
    assert_eq!(error.key_path(), Some("admin.tokens[1]"));

    assert_eq!(
        message(&route("[routes.set_headers]\nauthorization = \"Bearer ${OPENAI_KEY}\"\n")),
        "tollgate.toml:6:17: routes[0].set_headers.authorization: environment variable OPENAI_KEY is not set"
    );
    assert_eq!(
        message("[server]\ntls = { cert = \"${NOPE}\", key = \"k\" }\n"),
        "tollgate.toml:2:16: server.tls.cert: environment variable NOPE is not set"
    );
    assert_eq!(
        message("[database]\nurl = \"postgres://u:${DB_PASSWORD}@db/x\"\n"),
        "tollgate.toml:2:7: database.url: environment variable DB_PASSWORD is not set"
    );
}

#[test]
fn malformed_variable_references_are_errors() {
    assert_eq!(
        message("[server]\ninstance_id = \"gw-${HOST\"\n"),
        "tollgate.toml:2:15: server.instance_id: unterminated \"${\" (write \"$${\" for a literal \"${\")"
    );
    assert_eq!(
        message("[server]\ninstance_id = \"${HOST:-x}\"\n"),
        "tollgate.toml:2:15: server.instance_id: invalid variable name \"HOST:-x\" in \"${...}\" (expected letters, digits and _, not starting with a digit)"
    );
}

#[test]
fn substituted_values_are_validated_like_written_ones() {
    assert_eq!(
        message(&route("timeout = \"${TIMEOUT}\"\n")),
        "tollgate.toml:5:11: routes[0].timeout: invalid duration \"5 parsecs\" (expected e.g. \"250ms\", \"10s\", \"5m\", \"24h\", \"30d\")"
    );
    // The value is not echoed: it usually holds a credential.
    assert_eq!(
        message(&route("[routes.set_headers]\nx-key = \"${NEWLINE}\"\n")),
        "tollgate.toml:6:9: routes[0].set_headers.x-key: invalid header value (control characters are not allowed, also after ${VAR} substitution)"
    );
    assert_eq!(
        message("[admin]\ntokens = [\"${EMPTY}\"]\n"),
        "tollgate.toml:2:11: admin.tokens[0]: admin token must not be empty"
    );
}

// ---- unknown keys, types, syntax -------------------------------------------

#[test]
fn unknown_keys_name_their_path_and_line() {
    assert_eq!(
        message("bogus = 1\n"),
        "tollgate.toml:1:1: bogus: unknown field `bogus`, expected one of `server`, `admin`, `database`, `keys`, `usage`, `tiers`, `routes`, `webhooks`, `pricing`"
    );
    assert_eq!(
        message("[server]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n"),
        "tollgate.toml:3:1: server.bogus: unknown field `bogus`, expected one of `listen`, `admin_listen`, `tls`, `max_request_body`, `request_header_timeout`, `idle_timeout`, `request_body_timeout`, `max_connections`, `max_header_bytes`, `worker_threads`, `instance_id`, `access_log`"
    );
    assert_eq!(
        message("[server]\ntls = { cert = \"c\", key = \"k\", ca = \"x\" }\n"),
        "tollgate.toml:2:32: server.tls.ca: unknown field `ca`, expected `cert` or `key`"
    );
    let second_route_bogus = format!(
        "{}\n[[routes]]\nname = \"b\"\nprefix = \"/b/\"\nupstream = \"http://b\"\nbogus = true\n",
        route("")
    );
    let error = parse(&second_route_bogus).unwrap_err();
    assert_eq!(error.key_path(), Some("routes[1].bogus"));
    assert_eq!(error.line(), Some(10));
    assert!(
        error.to_string().starts_with(
            "tollgate.toml:10:1: routes[1].bogus: unknown field `bogus`, expected one of `name`, "
        ),
        "{error}"
    );
    let error = parse("[[tiers]]\nname = \"t\"\nmonthly_budget = 5\n").unwrap_err();
    assert_eq!(error.key_path(), Some("tiers[0].monthly_budget"));
    assert_eq!(error.line(), Some(3));
    let error = parse("[pricing.\"gpt-4o\"]\ninput = 1\nouptut = 2\n").unwrap_err();
    assert_eq!(
        error.to_string(),
        "tollgate.toml:3:1: pricing.gpt-4o.ouptut: unknown field `ouptut`, expected one of `input`, `output`, `cache_read`, `cache_write`"
    );
}

#[test]
fn wrong_types_name_their_path_and_line() {
    assert_eq!(
        message("[server]\nlisten = 8080\n"),
        "tollgate.toml:2:10: server.listen: invalid type: integer `8080`, expected a string"
    );
    assert_eq!(
        message("server = 5\n"),
        "tollgate.toml:1:10: server: invalid type: integer `5`, expected a table"
    );
    assert_eq!(
        message("[[tiers]]\nname = \"t\"\nmonthly_requests = -1\n"),
        "tollgate.toml:3:20: tiers[0].monthly_requests: invalid value: integer `-1`, expected u64"
    );
    assert_eq!(
        message("[keys]\nheaders = [\"x-key\", 5]\n"),
        "tollgate.toml:2:21: keys.headers[1]: invalid type: integer `5`, expected a string"
    );
    assert_eq!(
        message("[pricing.m]\ninput = \"0.15\"\n"),
        "tollgate.toml:2:9: pricing.m.input: invalid type: string \"0.15\", expected a number of USD (e.g. 0.15 or 500)"
    );
}

#[test]
fn missing_required_keys_point_at_their_table() {
    assert_eq!(
        message("[[routes]]\nname = \"r\"\nprefix = \"/\"\n"),
        "tollgate.toml:1:1: routes[0]: missing field `upstream`"
    );
    assert_eq!(
        message("[[tiers]]\nname = \"a\"\n\n[[tiers]]\nrate = \"1/s\"\n"),
        "tollgate.toml:4:1: tiers[1]: missing field `name`"
    );
}

#[test]
fn syntax_errors_have_a_location_but_no_key_path() {
    let error = parse("[server\n").unwrap_err();
    assert_eq!(
        error.to_string(),
        "tollgate.toml:1:8: unclosed table, expected `]`"
    );
    assert_eq!(error.key_path(), None);
    assert_eq!(
        parse("[server]\nlisten = \"a\"\nlisten = \"b\"\n")
            .unwrap_err()
            .line(),
        Some(3)
    );
}

// ---- values ----------------------------------------------------------------

#[test]
fn bad_durations() {
    assert_eq!(
        message(&route("timeout = \"5 parsecs\"\n")),
        "tollgate.toml:5:11: routes[0].timeout: invalid duration \"5 parsecs\" (expected e.g. \"250ms\", \"10s\", \"5m\", \"24h\", \"30d\")"
    );
    assert_eq!(
        message("[usage]\nflush_interval = \"200\"\n"),
        "tollgate.toml:2:18: usage.flush_interval: invalid duration \"200\" (expected e.g. \"250ms\", \"10s\", \"5m\", \"24h\", \"30d\")"
    );
    // Zero makes no sense for a timeout or an interval.
    assert_eq!(
        message(&route("timeout = \"0s\"\n")),
        "tollgate.toml:5:11: routes[0].timeout: duration \"0s\" must be greater than zero"
    );
    for key in ["flush_interval", "sync_interval"] {
        let error = parse(&format!("[usage]\n{key} = \"0ms\"\n")).unwrap_err();
        assert_eq!(error.key_path(), Some(format!("usage.{key}").as_str()));
    }
    let error = parse("[server]\nrequest_header_timeout = \"0s\"\n").unwrap_err();
    assert_eq!(error.key_path(), Some("server.request_header_timeout"));
}

#[test]
fn durations_and_sizes_are_parsed() {
    let config = parse(&format!(
        "[server]\nmax_request_body = \"512KiB\"\nrequest_header_timeout = \"250ms\"\n\
         [usage]\nflush_interval = \"1s\"\nspool_max = \"2GiB\"\nsync_interval = \"5m\"\n{}",
        route("timeout = \"30d\"\n")
    ))
    .unwrap();
    assert_eq!(config.server.max_request_body, 512 * 1024);
    assert_eq!(
        config.server.request_header_timeout,
        Duration::from_millis(250)
    );
    assert_eq!(config.usage.flush_interval, Duration::from_secs(1));
    assert_eq!(config.usage.spool_max, 2 << 30);
    assert_eq!(config.usage.sync_interval, Duration::from_secs(300));
    assert_eq!(config.routes[0].timeout, Duration::from_secs(30 * 86_400));
}

#[test]
fn bad_sizes() {
    assert_eq!(
        message("[server]\nmax_request_body = \"10 megs\"\n"),
        "tollgate.toml:2:20: server.max_request_body: invalid size \"10 megs\" (expected e.g. \"512KiB\", \"10MiB\", \"1GiB\")"
    );
    assert_eq!(
        message("[usage]\nspool_max = \"1gib\"\n"),
        "tollgate.toml:2:13: usage.spool_max: invalid size \"1gib\" (expected e.g. \"512KiB\", \"10MiB\", \"1GiB\")"
    );
}

#[test]
fn rates_overage_and_usage_enums() {
    let config = parse(&format!(
        "[[tiers]]\nname = \"a\"\nrate = \"10/s\"\noverage = \"bill\"\n\
         [[tiers]]\nname = \"b\"\nrate = \"1000/h\"\n{}",
        route("usage = \"anthropic\"\n")
    ))
    .unwrap();
    assert_eq!(
        config.tiers[0].rate,
        Some(Rate {
            count: 10,
            per: Duration::from_secs(1),
        })
    );
    assert_eq!(config.tiers[0].overage, Overage::Bill);
    assert_eq!(
        config.tiers[1].rate,
        Some(Rate {
            count: 1000,
            per: Duration::from_secs(3600),
        })
    );
    assert_eq!(config.routes[0].usage, UsageFormat::Anthropic);

    assert_eq!(
        message("[[tiers]]\nname = \"a\"\nrate = \"60 per minute\"\n"),
        "tollgate.toml:3:8: tiers[0].rate: invalid rate \"60 per minute\" (expected e.g. \"10/s\", \"60/min\", \"1000/h\")"
    );
    assert_eq!(
        message("[[tiers]]\nname = \"a\"\nrate = \"0/min\"\n"),
        "tollgate.toml:3:8: tiers[0].rate: invalid rate \"0/min\" (the count must be at least 1)"
    );
    assert_eq!(
        message("[[tiers]]\nname = \"a\"\noverage = \"allow\"\n"),
        "tollgate.toml:3:11: tiers[0].overage: unknown overage \"allow\" (expected \"block\" or \"bill\")"
    );
    assert_eq!(
        message(&route("usage = \"OpenAI\"\n")),
        "tollgate.toml:5:9: routes[0].usage: unknown usage format \"OpenAI\" (expected \"openai\", \"anthropic\" or \"none\")"
    );
}

#[test]
fn money_becomes_integer_nano_usd() {
    let config = parse(
        "[[tiers]]\nname = \"a\"\nmonthly_cost_usd = 500.0\noverage_price_per_request_usd = 0.001\n\
         [[tiers]]\nname = \"b\"\nmonthly_cost_usd = 500\n\
         [pricing.m]\ninput = 0.15\noutput = 0.6\n\
         [pricing.n]\ninput = 3\noutput = 15\ncache_read = 0.3\ncache_write = 3.75\n",
    )
    .unwrap();
    assert_eq!(config.tiers[0].monthly_cost_nanos, Some(500_000_000_000));
    assert_eq!(
        config.tiers[0].overage_price_per_request_nanos,
        Some(1_000_000)
    );
    assert_eq!(config.tiers[1].monthly_cost_nanos, Some(500_000_000_000));
    // cache prices default to the input price
    assert_eq!(
        config.pricing["m"],
        ModelPrice {
            input: 150_000_000,
            output: 600_000_000,
            cache_read: 150_000_000,
            cache_write: 150_000_000,
        }
    );
    assert_eq!(
        config.pricing["n"],
        ModelPrice {
            input: 3_000_000_000,
            output: 15_000_000_000,
            cache_read: 300_000_000,
            cache_write: 3_750_000_000,
        }
    );
    // docs/CONFIGURATION.md: every pricing key is optional; an absent price is zero.
    assert_eq!(
        parse("[pricing.free]\n").unwrap().pricing["free"],
        ModelPrice::default()
    );
}

#[test]
fn bad_money() {
    assert_eq!(
        message("[[tiers]]\nname = \"a\"\nmonthly_cost_usd = -5.0\n"),
        "tollgate.toml:3:20: tiers[0].monthly_cost_usd: amount -5 USD must not be negative"
    );
    assert_eq!(
        message("[pricing.m]\noutput = nan\n"),
        "tollgate.toml:2:10: pricing.m.output: amount must be a finite number of USD, not NaN"
    );
    assert_eq!(
        message("[pricing.\"claude 3\"]\ncache_read = inf\n"),
        "tollgate.toml:2:14: pricing.\"claude 3\".cache_read: amount must be a finite number of USD, not inf"
    );
    assert_eq!(
        message("[[tiers]]\nname = \"a\"\noverage_price_per_request_usd = 1e12\n"),
        "tollgate.toml:3:33: tiers[0].overage_price_per_request_usd: amount 1000000000000 USD is too large (the maximum is 9223372036.854775807)"
    );
}

#[test]
fn server_values() {
    let config = parse(
        "[server]\nlisten = \"[::]:80\"\nadmin_listen = \"0.0.0.0:9\"\nworker_threads = 4\ninstance_id = \"gw-1\"\n",
    )
    .unwrap();
    assert_eq!(
        config.server.listen,
        "[::]:80".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(
        config.server.admin_listen,
        "0.0.0.0:9".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(config.server.worker_threads, 4);
    assert_eq!(config.server.effective_worker_threads(), 4);
    assert!(Config::default().server.effective_worker_threads() >= 1);
    assert_eq!(config.server.instance_id, "gw-1");

    assert_eq!(
        message("[server]\nlisten = \"localhost:8080\"\n"),
        "tollgate.toml:2:10: server.listen: invalid socket address \"localhost:8080\" (expected IP:port, e.g. \"127.0.0.1:8080\" or \"[::]:8080\")"
    );
    assert_eq!(
        message("[server]\nadmin_listen = \"127.0.0.1:8080\"\n"),
        "tollgate.toml:2:16: server.admin_listen: server.listen and server.admin_listen are both 127.0.0.1:8080"
    );
    // Port 0 binds two different ephemeral ports: fine.
    assert!(parse("[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n").is_ok());
    assert_eq!(
        message("[server]\ninstance_id = \"gw 1\"\n"),
        "tollgate.toml:2:15: server.instance_id: invalid instance id \"gw 1\" (must not contain whitespace or control characters)"
    );
    assert_eq!(
        message("[server]\ntls = { cert = \"\", key = \"k\" }\n"),
        "tollgate.toml:2:16: server.tls.cert: must not be empty"
    );
}

#[test]
fn admin_tokens() {
    assert_eq!(
        message("[admin]\ntokens = [\"a b\"]\n"),
        "tollgate.toml:2:11: admin.tokens[0]: admin token must not contain whitespace or control characters"
    );
    assert_eq!(
        message("[admin]\ntokens = [\"ok\", \"\"]\n"),
        "tollgate.toml:2:17: admin.tokens[1]: admin token must not be empty"
    );
}

#[test]
fn database_values() {
    for url in [
        "postgres://u:p@db:5432/x",
        "postgresql://db/x",
        "sqlite://:memory:",
    ] {
        let config = parse(&format!("[database]\nurl = \"{url}\"\n")).unwrap();
        assert_eq!(config.database.url, url);
    }
    assert_eq!(
        parse("[database]\nurl = \"postgres://db/x\"\npool_size = 4\nmigrate = false\n")
            .unwrap()
            .database,
        DatabaseConfig {
            url: "postgres://db/x".to_owned(),
            pool_size: 4,
            migrate: false,
        }
    );
    assert_eq!(
        parse("[database]\nurl = \"postgres://db/x\"\n")
            .unwrap()
            .database
            .backend(),
        DatabaseBackend::Postgres
    );
    // The URL is never echoed: it may hold a password.
    assert_eq!(
        message("[database]\nurl = \"mysql://root:hunter2@db/x\"\n"),
        "tollgate.toml:2:7: database.url: database URL must start with \"sqlite://\", \"postgres://\" or \"postgresql://\""
    );
    assert_eq!(
        message("[database]\nurl = \"sqlite://\"\n"),
        "tollgate.toml:2:7: database.url: database URL names no database after the scheme"
    );
    assert_eq!(
        message("[database]\npool_size = 0\n"),
        "tollgate.toml:2:13: database.pool_size: must be at least 1"
    );
}

#[test]
fn keys_values() {
    let config =
        parse("[keys]\nprefix = \"acme2\"\nheaders = [\"X-Api-Key\", \"authorization\"]\n")
            .unwrap();
    assert_eq!(config.keys.prefix, "acme2");
    // Header names are case-insensitive and stored lowercase; order is kept.
    assert_eq!(
        config.keys.headers,
        [header("x-api-key"), header("authorization")]
    );

    for bad in ["", "TG", "t_g", "abcdefghijklmnopq"] {
        assert_eq!(
            message(&format!("[keys]\nprefix = \"{bad}\"\n")),
            format!(
                "tollgate.toml:2:10: keys.prefix: invalid key prefix \"{bad}\" (expected 1 to 16 characters of a-z and 0-9)"
            )
        );
    }
    assert_eq!(
        message("[keys]\nheaders = []\n"),
        "tollgate.toml:2:11: keys.headers: at least one header is needed, or no client could present a key"
    );
    assert_eq!(
        message("[keys]\nheaders = [\"x-key\", \"X-Key\"]\n"),
        "tollgate.toml:2:21: keys.headers[1]: duplicate header \"x-key\""
    );
    assert_eq!(
        message("[keys]\nheaders = [\"x key\"]\n"),
        "tollgate.toml:2:12: keys.headers[0]: invalid header name \"x key\""
    );
}

#[test]
fn usage_values() {
    assert_eq!(
        parse("[usage]\nbatch_size = 1\nspool_dir = \"/var/spool/tg\"\n")
            .unwrap()
            .usage,
        UsageConfig {
            batch_size: 1,
            spool_dir: PathBuf::from("/var/spool/tg"),
            ..UsageConfig::default()
        }
    );
    assert_eq!(
        message("[usage]\nbatch_size = 0\n"),
        "tollgate.toml:2:14: usage.batch_size: must be at least 1"
    );
    assert_eq!(
        message("[usage]\nspool_dir = \"\"\n"),
        "tollgate.toml:2:13: usage.spool_dir: must not be empty"
    );
}

// ---- routes ----------------------------------------------------------------

#[test]
fn full_route() {
    let config = parse(&route(
        "strip_prefix = true\nusage = \"openai\"\ncost_header = \"X-Cost-USD\"\n\
         input_tokens_header = \"x-in\"\noutput_tokens_header = \"x-out\"\ntimeout = \"5s\"\n\
         strip_response_headers = [\"x-cost-usd\", \"server\"]\n\
         [routes.set_headers]\nx-b = \"2\"\nx-a = \"1\"\n",
    ))
    .unwrap();
    let route = &config.routes[0];
    assert_eq!(route.name, "r");
    assert_eq!(route.prefix, "/");
    assert_eq!(route.upstream, Uri::from_static("http://up/"));
    assert!(route.strip_prefix);
    assert_eq!(route.usage, UsageFormat::Openai);
    assert_eq!(route.cost_header, Some(header("x-cost-usd")));
    assert_eq!(route.input_tokens_header, Some(header("x-in")));
    assert_eq!(route.output_tokens_header, Some(header("x-out")));
    assert_eq!(route.timeout, Duration::from_secs(5));
    assert_eq!(
        route.strip_response_headers,
        [header("x-cost-usd"), header("server")]
    );
    // File order, not sorted.
    assert_eq!(
        route.set_headers,
        [
            (header("x-b"), HeaderValue::from_static("2")),
            (header("x-a"), HeaderValue::from_static("1")),
        ]
    );
}

fn route_with_upstream(upstream: &str) -> String {
    format!("[[routes]]\nname = \"r\"\nprefix = \"/\"\nupstream = \"{upstream}\"\n")
}

#[test]
fn upstreams() {
    for (upstream, expected) in [
        ("https://api.openai.com", "https://api.openai.com/"),
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000/"),
        ("http://[::1]:8000/base/path", "http://[::1]:8000/base/path"),
    ] {
        let config = parse(&route_with_upstream(upstream)).unwrap();
        assert_eq!(config.routes[0].upstream.to_string(), expected);
    }
    let expected_absolute =
        "upstream must be an absolute http:// or https:// URI, e.g. \"https://api.openai.com\"";
    for (upstream, expected) in [
        ("api.openai.com", expected_absolute),
        ("/v1", expected_absolute),
        ("ftp://files.example", expected_absolute),
        ("http://", expected_absolute),
        (
            "https://api.example/v1?key=secret",
            "upstream must not have a query string (a base path is allowed)",
        ),
        (
            "https://user:pw@api.example",
            "upstream must not contain user info; send credentials with set_headers",
        ),
        (
            "https://api.example/#top",
            "upstream must not have a fragment (\"#...\")",
        ),
    ] {
        assert_eq!(
            message(&route_with_upstream(upstream)),
            format!("tollgate.toml:4:12: routes[0].upstream: {expected}"),
            "{upstream}"
        );
    }
}

#[test]
fn route_prefixes() {
    assert_eq!(
        message("[[routes]]\nname = \"r\"\nprefix = \"v1/\"\nupstream = \"http://up\"\n"),
        "tollgate.toml:3:10: routes[0].prefix: route prefix \"v1/\" must start with \"/\""
    );
    assert_eq!(
        message("[[routes]]\nname = \"r\"\nprefix = \"/v1?x\"\nupstream = \"http://up\"\n"),
        "tollgate.toml:3:10: routes[0].prefix: route prefix \"/v1?x\" must not contain \"?\", \"#\", whitespace or control characters"
    );
}

#[test]
fn duplicate_routes_and_tiers() {
    let two_routes = |name: &str, prefix: &str| {
        format!(
            "[[routes]]\nname = \"a\"\nprefix = \"/a/\"\nupstream = \"http://up\"\n\n\
             [[routes]]\nname = \"{name}\"\nprefix = \"{prefix}\"\nupstream = \"http://up\"\n"
        )
    };
    let duplicate_name = parse(&two_routes("a", "/b/")).unwrap_err();
    assert_eq!(
        duplicate_name.to_string(),
        "tollgate.toml:7:8: routes[1].name: duplicate route name \"a\" (first defined on line 2)"
    );
    assert_eq!(duplicate_name.line(), Some(7));
    assert_eq!(duplicate_name.key_path(), Some("routes[1].name"));
    assert_eq!(
        message(&two_routes("b", "/a/")),
        "tollgate.toml:8:10: routes[1].prefix: duplicate route prefix \"/a/\" (also used by route \"a\")"
    );
    // Different strings are different prefixes, even if one contains the other.
    assert!(parse(&two_routes("b", "/a")).is_ok());
    assert_eq!(
        message("[[tiers]]\nname = \"free\"\n[[tiers]]\nname = \"free\"\n"),
        "tollgate.toml:4:8: tiers[1].name: duplicate tier name \"free\" (first defined on line 2)"
    );
}

#[test]
fn names_are_identifiers() {
    assert_eq!(
        message("[[tiers]]\nname = \"\"\n"),
        "tollgate.toml:2:8: tiers[0].name: invalid tier name \"\" (expected 1 to 64 characters of A-Z, a-z, 0-9, \".\", \"_\" and \"-\")"
    );
    assert_eq!(
        message("[[routes]]\nname = \"a,b\"\nprefix = \"/\"\nupstream = \"http://up\"\n"),
        "tollgate.toml:2:8: routes[0].name: invalid route name \"a,b\" (expected 1 to 64 characters of A-Z, a-z, 0-9, \".\", \"_\" and \"-\")"
    );
    assert!(parse("[[tiers]]\nname = \"Pro_2024.v-1\"\n").is_ok());
}

#[test]
fn route_header_names() {
    assert_eq!(
        message(&route("cost_header = \"x cost\"\n")),
        "tollgate.toml:5:15: routes[0].cost_header: invalid header name \"x cost\""
    );
    assert_eq!(
        message(&route("strip_response_headers = [\"ok\", \"\"]\n")),
        "tollgate.toml:5:33: routes[0].strip_response_headers[1]: invalid header name \"\""
    );
}

#[test]
fn set_headers_rules() {
    assert_eq!(
        message(&route("[routes.set_headers]\n\"x bad\" = \"v\"\n")),
        "tollgate.toml:6:11: routes[0].set_headers.\"x bad\": invalid header name \"x bad\""
    );
    assert_eq!(
        message(&route("[routes.set_headers]\nAuthorization = \"a\"\nauthorization = \"b\"\n")),
        "tollgate.toml:7:17: routes[0].set_headers.authorization: duplicate header \"authorization\" (header names are case-insensitive)"
    );
    assert_eq!(
        message(&route("[routes.set_headers]\nconnection = \"close\"\n")),
        "tollgate.toml:6:14: routes[0].set_headers.connection: \"connection\" is managed by the proxy and cannot be set on the upstream request"
    );
    // Values are sensitive: Debug does not show them.
    let config = parse(&route("[routes.set_headers]\nx-key = \"sk-live-123\"\n")).unwrap();
    let debug = format!("{:?}", config.routes[0]);
    assert!(!debug.contains("sk-live-123"), "{debug}");
}

// ---- secrets ---------------------------------------------------------------

#[test]
fn debug_output_hides_secrets() {
    let config = parse(
        "[admin]\ntokens = [\"t0p-secret\", \"another\"]\n\
         [database]\nurl = \"postgres://app:hunter2@db:5432/x?sslmode=require\"\n",
    )
    .unwrap();
    let debug = format!("{config:?}");
    assert!(!debug.contains("t0p-secret"), "{debug}");
    assert!(!debug.contains("hunter2"), "{debug}");
    assert!(debug.contains("<2 redacted>"), "{debug}");
    assert!(
        debug.contains("postgres://app:***@db:5432/x?sslmode=require"),
        "{debug}"
    );
    // Nothing to hide: unchanged.
    let plain = format!("{:?}", Config::default().database);
    assert!(plain.contains("sqlite://data/tollgate.db"), "{plain}");
}

/// Config texts built from the lines a real file has, with values at and
/// past the ends of their ranges, bad syntax and stray bytes mixed in.
mod arbitrary_input_config {
    use proptest::prelude::*;

    use super::*;

    fn line() -> impl Strategy<Value = String> {
        let fixed = prop_oneof![
            Just("[server]"),
            Just("[admin]"),
            Just("[database]"),
            Just("[usage]"),
            Just("[keys]"),
            Just("[[tiers]]"),
            Just("[[routes]]"),
            Just("[routes.set_headers]"),
            Just("[pricing.\"gpt-4o\"]"),
            Just("[[webhooks]]"),
            Just("name = \"t\""),
            Just("prefix = \"/v1/\""),
            Just("upstream = \"http://127.0.0.1:1\""),
            Just("timeout = \"999999999999999d\""),
            Just("timeout = \"18446744073709551615ms\""),
            Just("idle_timeout = \"0s\""),
            Just("max_request_body = \"99999999999TiB\""),
            Just("spool_max = \"18446744073709551615B\""),
            Just("rate = \"99999999999999999999/s\""),
            Just("rate = \"0/min\""),
            Just("monthly_requests = -1"),
            Just("monthly_requests = 9223372036854775807"),
            Just("monthly_cost_usd = 1e300"),
            Just("monthly_cost_usd = nan"),
            Just("overage_price_per_request_usd = -0.0"),
            Just("alerts = [0.5, 2.0, -1.0]"),
            Just("batch_size = 0"),
            Just("pool_size = 4294967296"),
            Just("worker_threads = 18446744073709551615"),
            Just("max_connections = -5"),
            Just("listen = \"999.0.0.1:80\""),
            Just("url = \"${MISSING}\""),
            Just("tokens = [\"${TOLLGATE_ADMIN_TOKEN}\"]"),
            Just("authorization = \"Bearer ${OPENAI_API_KEY}\""),
            Just("x-key = \"${NEWLINE}\""),
            Just("input = 0.15"),
            Just("unknown_key = 1"),
            Just("name = "),
            Just("= 1"),
            Just("[unclosed"),
            Just("\"unterminated = 1"),
        ]
        .prop_map(str::to_owned);
        prop_oneof![
            8 => fixed,
            1 => "[a-z_]{1,12} = \"[ -~]{0,16}\"",
            1 => "[ -~]{0,24}",
            1 => any::<String>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any text is a config or an error, never a panic; every error
        /// points at a line of the text (README, Commands: `check-config` prints
        /// `file:line`).
        #[test]
        fn arbitrary_input_config_errors_carry_a_line(lines in proptest::collection::vec(line(), 0..16)) {
            let text = lines.join("\n");
            if let Err(error) = parse(&text) {
                let line = error.line();
                prop_assert!(line.is_some(), "no line for {:?}\n---\n{}", error.to_string(), text);
                let line = line.unwrap_or(0);
                prop_assert!(line >= 1 && line <= text.lines().count().max(1) + 1, "line {} of\n{}", line, text);
                let shown = error.to_string();
                prop_assert!(shown.starts_with(&format!("tollgate.toml:{line}:")), "{}", shown);
                prop_assert_eq!(shown.lines().count(), 1, "one line: {}", shown);
            }
        }
    }
}

// ---- upstream TLS ----------------------------------------------------------

/// PEM files for a route's `ca_file` and `client_cert`: a test CA, a client
/// certificate it signed with its key, and a second, unrelated key.
struct Pems {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    other_key: PathBuf,
    dir: PathBuf,
}

impl Pems {
    fn new() -> Pems {
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca =
            rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let client_key = rcgen::KeyPair::generate().unwrap();
        let client = rcgen::CertificateParams::new(vec!["gateway".to_owned()])
            .unwrap()
            .signed_by(&client_key, &ca)
            .unwrap();
        let write = |name: &str, contents: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, contents).unwrap();
            path
        };
        Pems {
            ca: write("ca.pem", &ca.pem()),
            cert: write("client.pem", &client.pem()),
            key: write("client.key", &client_key.serialize_pem()),
            other_key: write(
                "other.key",
                &rcgen::KeyPair::generate().unwrap().serialize_pem(),
            ),
            dir: dir.path().to_owned(),
            _dir: dir,
        }
    }

    /// `path` as it is written in a TOML string.
    fn path(&self, path: &Path) -> String {
        path.display().to_string()
    }

    /// A file of the test's own in the same directory.
    fn write(&self, name: &str, contents: &str) -> String {
        let path = self.dir.join(name);
        std::fs::write(&path, contents).unwrap();
        self.path(&path)
    }
}

/// A valid https route with `extra` lines appended; its keys start on line 5.
fn https_route(extra: &str) -> String {
    format!("[[routes]]\nname = \"r\"\nprefix = \"/\"\nupstream = \"https://up\"\n{extra}")
}

#[test]
fn route_tls_reads_and_keeps_the_files() {
    let pems = Pems::new();
    let config = parse(&https_route(&format!(
        "ca_file = {:?}\nclient_cert = {{ cert = {:?}, key = {:?} }}\n",
        pems.path(&pems.ca),
        pems.path(&pems.cert),
        pems.path(&pems.key)
    )))
    .unwrap();
    let tls = config.routes[0].tls.as_ref().unwrap();
    assert_eq!(tls.ca_file.as_ref(), Some(&pems.ca));
    assert!(tls.upstream.has_client_cert());

    // Either key alone is enough.
    let ca_only = parse(&https_route(&format!(
        "ca_file = {:?}\n",
        pems.path(&pems.ca)
    )))
    .unwrap();
    let tls = ca_only.routes[0].tls.as_ref().unwrap();
    assert_eq!(tls.client_cert, None);
    assert!(!tls.upstream.has_client_cert());
    let cert_only = parse(&https_route(&format!(
        "client_cert = {{ cert = {:?}, key = {:?} }}\n",
        pems.path(&pems.cert),
        pems.path(&pems.key)
    )))
    .unwrap();
    assert_eq!(cert_only.routes[0].tls.as_ref().unwrap().ca_file, None);

    // Neither: the route has no TLS settings of its own.
    assert_eq!(parse(&https_route("")).unwrap().routes[0].tls, None);

    // The same files read twice are equal; other contents are not (what a
    // reload compares).
    assert_eq!(
        config,
        parse(&https_route(&format!(
            "ca_file = {:?}\nclient_cert = {{ cert = {:?}, key = {:?} }}\n",
            pems.path(&pems.ca),
            pems.path(&pems.cert),
            pems.path(&pems.key)
        )))
        .unwrap()
    );
    assert_ne!(ca_only.routes[0].tls, cert_only.routes[0].tls);

    // Debug shows no key material.
    let debug = format!("{:?}", config.routes[0]);
    let key_pem = std::fs::read_to_string(&pems.key).unwrap();
    let key_body = key_pem.lines().nth(1).unwrap();
    assert!(!debug.contains(key_body), "{debug}");
}

#[test]
fn route_tls_errors_name_the_line_and_key() {
    let pems = Pems::new();
    let ca = pems.path(&pems.ca);
    let cert = pems.path(&pems.cert);
    let key = pems.path(&pems.key);
    let dir = pems.path(&pems.dir);

    // A file that is not there.
    assert_eq!(
        message(&https_route(&format!("ca_file = \"{dir}/missing.pem\"\n"))),
        format!(
            "tollgate.toml:5:11: routes[0].ca_file: cannot read TLS certificate {dir}/missing.pem: \
             I/O error: No such file or directory (os error 2)"
        )
    );
    assert_eq!(
        message(&https_route(&format!(
            "client_cert = {{ cert = {cert:?}, key = \"{dir}/missing.key\" }}\n"
        ))),
        format!(
            "tollgate.toml:5:{}: routes[0].client_cert.key: cannot read TLS private key {dir}/missing.key: \
             I/O error: No such file or directory (os error 2)",
            34 + cert.len()
        )
    );
    // A PEM file without a certificate (here: a key given as the CA file).
    assert_eq!(
        message(&https_route(&format!("ca_file = {key:?}\n"))),
        format!("tollgate.toml:5:11: routes[0].ca_file: TLS certificate file {key} holds no certificate")
    );
    assert_eq!(
        message(&https_route(&format!(
            "client_cert = {{ cert = {key:?}, key = {key:?} }}\n"
        ))),
        format!("tollgate.toml:5:24: routes[0].client_cert.cert: TLS certificate file {key} holds no certificate")
    );
    // A key file without a key.
    assert_eq!(
        message(&https_route(&format!(
            "client_cert = {{ cert = {cert:?}, key = {cert:?} }}\n"
        ))),
        format!(
            "tollgate.toml:5:{}: routes[0].client_cert.key: TLS private key file {cert} holds no private key",
            34 + cert.len()
        )
    );
    // A key that does not parse.
    let garbage = pems.write(
        "garbage.key",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    );
    let error = message(&https_route(&format!(
        "client_cert = {{ cert = {cert:?}, key = {garbage:?} }}\n"
    )));
    assert!(
        error.starts_with(&format!(
            "tollgate.toml:5:{}: routes[0].client_cert.key: the private key is not usable: ",
            34 + cert.len()
        )),
        "{error}"
    );
    // A key of another certificate.
    let other = pems.path(&pems.other_key);
    let error = message(&https_route(&format!(
        "client_cert = {{ cert = {cert:?}, key = {other:?} }}\n"
    )));
    assert!(
        error.starts_with("tollgate.toml:5:")
            && error.contains(": routes[0].client_cert.key: the client certificate and key do not belong together: "),
        "{error}"
    );
    // A certificate block that is no certificate.
    let bad_root = pems.write(
        "bad-root.pem",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    let error = message(&https_route(&format!("ca_file = {bad_root:?}\n")));
    assert!(
        error.starts_with(
            "tollgate.toml:5:11: routes[0].ca_file: certificate 1 of the CA file is not a usable trust anchor: "
        ),
        "{error}"
    );
    // On a plain-http upstream the settings could never apply.
    assert_eq!(
        message(&route(&format!("ca_file = {ca:?}\n"))),
        "tollgate.toml:5:11: routes[0].ca_file: ca_file and client_cert apply to https:// upstreams only; \
         this route's upstream is http://"
    );
    assert_eq!(
        message(&route(&format!("client_cert = {{ cert = {cert:?}, key = {key:?} }}\n"))),
        "tollgate.toml:5:24: routes[0].client_cert: ca_file and client_cert apply to https:// upstreams only; \
         this route's upstream is http://"
    );
    // The table's shape.
    assert_eq!(
        message(&https_route(&format!(
            "client_cert = {{ cert = {cert:?} }}\n"
        ))),
        "tollgate.toml:5:15: routes[0].client_cert: missing field `key`"
    );
    assert_eq!(
        message(&https_route("ca_file = \"\"\n")),
        "tollgate.toml:5:11: routes[0].ca_file: must not be empty"
    );
}

#[test]
fn admin_tls_takes_two_paths() {
    let config = parse("[admin]\ntls = { cert = \"a.pem\", key = \"a.key\" }\n").unwrap();
    assert_eq!(
        config.admin.tls,
        Some(TlsConfig {
            cert: PathBuf::from("a.pem"),
            key: PathBuf::from("a.key"),
        })
    );
    // Like server.tls, the files are read when the listener starts.
    assert_eq!(
        message("[admin]\ntls = { cert = \"a.pem\" }\n"),
        "tollgate.toml:2:7: admin.tls: missing field `key`"
    );
    assert_eq!(
        message("[admin]\ntls = { cert = \"a.pem\", key = \"\" }\n"),
        "tollgate.toml:2:31: admin.tls.key: must not be empty"
    );
}

#[test]
fn connection_limits_and_their_bounds() {
    let config = parse(
        "[server]\nidle_timeout = \"90s\"\nrequest_body_timeout = \"5s\"\n\
         max_connections = 500\nmax_header_bytes = \"32KiB\"\n",
    )
    .unwrap();
    assert_eq!(config.server.idle_timeout, Duration::from_secs(90));
    assert_eq!(config.server.request_body_timeout, Duration::from_secs(5));
    assert_eq!(config.server.max_connections, 500);
    assert_eq!(config.server.max_header_bytes, 32 * 1024);
    let defaults = Config::default().server;
    assert_eq!(defaults.idle_timeout, defaults::IDLE_TIMEOUT);
    assert_eq!(defaults.max_connections, 10_000);
    assert_eq!(defaults.max_header_bytes, 64 * 1024);
    assert_eq!(
        message("[server]\nidle_timeout = \"0s\"\n"),
        "tollgate.toml:2:16: server.idle_timeout: duration \"0s\" must be greater than zero"
    );
    assert_eq!(
        message("[server]\nmax_connections = 0\n"),
        "tollgate.toml:2:19: server.max_connections: must be at least 1"
    );
    assert_eq!(
        message("[server]\nmax_header_bytes = \"512B\"\n"),
        "tollgate.toml:2:20: server.max_header_bytes: size \"512B\" must be between 1KiB and 16MiB"
    );
    assert_eq!(
        message("[server]\nrequest_body_timeout = \"soon\"\n"),
        "tollgate.toml:2:24: server.request_body_timeout: invalid duration \"soon\" (expected e.g. \"250ms\", \"10s\", \"5m\", \"24h\", \"30d\")"
    );
}

#[test]
fn alerts_are_ascending_fractions_read_to_a_millionth() {
    let config = parse("[[tiers]]\nname = \"t\"\nalerts = [0.5, 0.8, 1]\n").unwrap();
    assert_eq!(
        config.tiers[0].alerts.millionths(),
        [500_000, 800_000, 1_000_000]
    );
    assert_eq!(
        message("[[tiers]]\nname = \"t\"\nalerts = [0.8, 0.5]\n"),
        "tollgate.toml:3:10: tiers[0].alerts: alert fractions must be in ascending order, each once"
    );
    assert_eq!(
        message("[[tiers]]\nname = \"t\"\nalerts = [1.5]\n"),
        "tollgate.toml:3:10: tiers[0].alerts: alert fraction 1.5 must be above 0 and at most 1 (e.g. 0.8 for 80 %)"
    );
    assert_eq!(
        message("[[tiers]]\nname = \"t\"\nalerts = [0]\n"),
        "tollgate.toml:3:10: tiers[0].alerts: alert fraction 0 must be above 0 and at most 1 (e.g. 0.8 for 80 %)"
    );
}

#[test]
fn webhooks_name_the_field_at_fault_and_never_print_the_secret() {
    let hook = |body: &str| format!("[[webhooks]]\n{body}\n");
    let config = parse(&hook(
        "url = \"https://h.example/x\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\nevents = [\"quota.exhausted\"]",
    ))
    .unwrap();
    assert_eq!(config.webhooks[0].events, [EventType::QuotaExhausted]);
    assert!(
        !format!("{config:?}").contains("MfKQ9r8G"),
        "Debug hides the secret"
    );
    assert_eq!(
        message(&hook("url = \"ftp://h.example/\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"")),
        "tollgate.toml:2:7: webhooks[0].url: a webhook URL must be an absolute http:// or https:// URL"
    );
    let bad_secret = message(&hook(
        "url = \"https://h.example/\"\nsecret = \"not-a-secret-at-all\"",
    ));
    assert!(
        bad_secret.starts_with(
            "tollgate.toml:3:10: webhooks[0].secret: a webhook secret starts with \"whsec_\""
        ),
        "{bad_secret}"
    );
    assert!(!bad_secret.contains("not-a-secret"), "{bad_secret}");
    assert_eq!(
        message(&hook("url = \"https://h.example/\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\nevents = [\"quota.nearly\"]")),
        "tollgate.toml:4:11: webhooks[0].events[0]: unknown event \"quota.nearly\" (known: quota.threshold, quota.exhausted, key.expiring, billing.period_closed)"
    );
    let twice = format!(
        "{}{}",
        hook("url = \"https://h.example/\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\""),
        hook("url = \"https://h.example/\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"")
    );
    assert_eq!(
        message(&twice),
        "tollgate.toml:5:7: webhooks[1].url: the same URL as webhooks[0].url"
    );
    // A URL can hold a secret of its own: never in a message.
    let secret_path = message(&hook(
        "url = \"https://hooks.example/T0/B0/s3cr3tT0k3n x\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"",
    ));
    assert!(
        secret_path.starts_with("tollgate.toml:2:7: webhooks[0].url: invalid webhook URL"),
        "{secret_path}"
    );
    assert!(!secret_path.contains("s3cr3t"), "{secret_path}");
}

#[test]
fn worker_threads_and_batch_size_are_bounded() {
    assert_eq!(
        message("[server]\nworker_threads = 100000000\n"),
        "tollgate.toml:2:18: server.worker_threads: must be at most 1024 (0: one per core)"
    );
    assert_eq!(
        message("[usage]\nbatch_size = 10000000\n"),
        "tollgate.toml:2:14: usage.batch_size: must be at most 100000"
    );
    let config = parse("[server]\nworker_threads = 1024\n[usage]\nbatch_size = 100000\n").unwrap();
    assert_eq!(
        (config.server.worker_threads, config.usage.batch_size),
        (1024, 100_000)
    );
}
