//! Bad and extreme input to the admin API and the management commands
//! (docs/CLI.md, docs/ADMIN-API.md): a value out of range is a 400 `invalid_request` naming the
//! field (a usage error, exit 2, naming the flag, on the command line),
//! never a panic or a dropped connection; path segments are percent-decoded.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use http::{Method, StatusCode};
use serde_json::json;
use tollgate_store::testing::{Backend, TestGuard};

/// A gateway on a throwaway database of `backend`, and the config file the
/// CLI uses for the same database.
struct Setup {
    gw: TestGateway,
    config_path: std::path::PathBuf,
    _db: TestGuard,
    _dir: tempfile::TempDir,
}

async fn setup(backend: Backend) -> Setup {
    let db = TestGuard::create(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        r#"
[admin]
tokens = ["admin-test-token"]

[database]
url = "{url}"

[usage]
spool_dir = "{spool}"

[[tiers]]
name = "test"

[[routes]]
name = "any"
prefix = "/"
upstream = "http://127.0.0.1:9"
"#,
        url = db.url(),
        spool = dir.path().join("spool").display(),
    );
    let config_path = write_file(dir.path(), "tollgate.toml", &toml);
    let gw = TestGateway::start_on(config(&toml), None).await;
    Setup {
        gw,
        config_path,
        _db: db,
        _dir: dir,
    }
}

/// Asserts a 400 `invalid_request` whose message starts with `field`.
fn assert_invalid(reply: &Reply, field: &str, what: &str) {
    assert_eq!(
        reply.status,
        StatusCode::BAD_REQUEST,
        "{what}: {}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.error_type(), "invalid_request", "{what}");
    let message = reply.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.starts_with(&format!("{field}:")),
        "{what}: the message names {field}: {message}"
    );
}

tollgate_store::both_backends!(
    out_of_range_times_are_400_naming_the_field,
    out_of_range_overrides_are_400_naming_the_field,
    path_segments_are_percent_decoded,
    extreme_query_values_are_answered,
    bodies_and_key_limits_must_be_objects_with_values_in_range,
    a_nul_in_a_name_or_key_is_not_found_not_a_server_error,
    names_count_characters_and_refuse_invisible_ones,
    keys_made_at_once_for_a_new_customer_all_succeed,
);

async fn names_count_characters_and_refuse_invisible_ones(backend: Backend) {
    let setup = setup(backend).await;
    let gw = &setup.gw;
    let create = |name: String| async move {
        admin(
            gw,
            Method::POST,
            "/v1/customers",
            Some(json!({"name": name, "tier": "test"})),
        )
        .await
    };
    let reply = create("é".repeat(128)).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
    assert_invalid(&create("é".repeat(129)).await, "name", "129 characters");
    for spoof in ["a\u{202E}gnp.exe", "ac\u{200B}me", "\u{2066}x\u{2069}"] {
        assert_invalid(&create(spoof.to_owned()).await, "name", spoof);
    }
}

async fn keys_made_at_once_for_a_new_customer_all_succeed(backend: Backend) {
    let setup = setup(backend).await;
    let gw = &setup.gw;
    let url = format!("http://{}/v1/keys", gw.admin);
    let replies = futures_join_all((0..6).map(|_| {
        let request = http::Request::post(&url)
            .header("authorization", "Bearer admin-test-token")
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(
                json!({"customer": "newco", "tier": "test"}).to_string(),
            )))
            .unwrap();
        async move { send(&client(), request).await }
    }))
    .await;
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
    }
    let customers: std::collections::HashSet<_> = replies
        .iter()
        .map(|reply| reply.json()["customer_id"].clone())
        .collect();
    assert_eq!(customers.len(), 1, "{customers:?}");
}

async fn a_nul_in_a_name_or_key_is_not_found_not_a_server_error(backend: Backend) {
    let setup = setup(backend).await;
    let gw = &setup.gw;
    for path in ["/v1/customers/a%00b", "/v1/keys/tg_%00", "/v1/quota/a%01b"] {
        let reply = admin(gw, Method::GET, path, None).await;
        assert_eq!(
            reply.status,
            StatusCode::NOT_FOUND,
            "{path}: {:?}",
            reply.body
        );
    }
    let reply = admin(gw, Method::GET, "/v1/usage/summary?customer=%00", None).await;
    assert_invalid(&reply, "customer", "a NUL customer");
    let reply = admin(
        gw,
        Method::POST,
        "/v1/keys",
        Some(json!({"customer": "a\u{0}b", "tier": "test"})),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{:?}", reply.body);
}

async fn bodies_and_key_limits_must_be_objects_with_values_in_range(backend: Backend) {
    let setup = setup(backend).await;
    let gw = &setup.gw;
    // serde would read a struct from an array of its values.
    let reply = admin(
        gw,
        Method::PATCH,
        "/v1/customers/test",
        Some(json!([null, null])),
    )
    .await;
    assert_invalid(&reply, "body", "an array body");
    assert_eq!(
        reply.json()["error"]["message"],
        "body: expected a JSON object"
    );
    let key = admin(
        gw,
        Method::POST,
        "/v1/keys",
        Some(json!({"customer": "test"})),
    )
    .await;
    assert_eq!(key.status, StatusCode::CREATED);
    let id = key.json()["id"].as_str().unwrap().to_owned();
    for (limits, field) in [
        (json!([null, 5, null, null]), "limits"),
        (json!({"monthly_requests": -1}), "limits"),
        (json!({"monthly_requests": 1e20}), "limits"),
        (json!({"monthly_cost_usd": "9223372037"}), "limits"),
        (json!({"rate": "0/s"}), "limits"),
        (json!({"overage": "bill"}), "limits"),
        (json!({"burst": 5}), "limits"),
    ] {
        let what = format!("limits {limits}");
        let created = admin(
            gw,
            Method::POST,
            "/v1/keys",
            Some(json!({"customer": "test", "limits": limits})),
        )
        .await;
        assert_invalid(&created, field, &what);
        let patched = admin(
            gw,
            Method::PATCH,
            &format!("/v1/keys/{id}"),
            Some(json!({"limits": limits})),
        )
        .await;
        assert_invalid(&patched, field, &what);
    }
    let unchanged = admin(gw, Method::GET, &format!("/v1/keys/{id}"), None).await;
    assert_eq!(unchanged.json()["limits"], serde_json::Value::Null);
    // Out of range on the command line: a usage error naming the flag.
    for (flag, value) in [
        ("--monthly-requests", "18446744073709551616"),
        ("--monthly-cost-usd", "1e400"),
        ("--rate", "ten/s"),
    ] {
        let (code, _, stderr) = cli(
            &setup.config_path,
            &["keys", "set-limits", &id, flag, value],
        );
        assert_eq!(code, 2, "{flag} {value}: {stderr}");
        assert!(stderr.contains(flag), "{flag}: {stderr}");
    }
    let (code, _, stderr) = cli(&setup.config_path, &["keys", "set-limits", &id]);
    assert_eq!(code, 2, "nothing to set: {stderr}");
    let (code, stdout, stderr) = cli(
        &setup.config_path,
        &[
            "keys",
            "set-limits",
            &id,
            "--monthly-requests",
            "10",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let set: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(set["limits"], json!({"monthly_requests": 10}));
    let (code, stdout, _) = cli(
        &setup.config_path,
        &["keys", "set-limits", &id, "--clear", "--json"],
    );
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&stdout).unwrap()["limits"],
        serde_json::Value::Null
    );
    setup.gw.stop().await;
}

async fn out_of_range_times_are_400_naming_the_field(backend: Backend) {
    let setup = setup(backend).await;
    let gw = &setup.gw;
    let created = admin(
        gw,
        Method::POST,
        "/v1/keys",
        Some(json!({"customer": "far", "tier": "test"})),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let id = created.json()["id"].as_str().unwrap().to_owned();
    let rotate = format!("/v1/keys/{id}/rotate");

    // About 31,700 years, past the end of year 9999: this used to panic in
    // the handler and drop the connection.
    for grace in [
        json!(999_999_999_999u64),
        json!(i64::MAX),
        json!(u64::MAX),
        json!(-1),
        json!(1e30),
        json!("1d"),
    ] {
        let reply = admin(
            gw,
            Method::POST,
            &rotate,
            Some(json!({ "grace_seconds": grace })),
        )
        .await;
        assert_invalid(&reply, "grace_seconds", &format!("grace_seconds {grace}"));
    }
    // The key is untouched by the refused rotations, and a sane one works.
    let rotated = admin(gw, Method::POST, &rotate, Some(json!({"grace_seconds": 0}))).await;
    assert_eq!(rotated.status, StatusCode::CREATED);

    for expires_at in [
        // In range as written, past 9999-12-31 in UTC.
        "9999-12-31T23:59:59-23:59",
        "10000-01-01T00:00:00Z",
        "2026-13-01T00:00:00Z",
        "not a date",
    ] {
        let reply = admin(
            gw,
            Method::POST,
            "/v1/keys",
            Some(json!({"customer": "far", "expires_at": expires_at})),
        )
        .await;
        assert_invalid(&reply, "expires_at", expires_at);
    }
    // The very end of the representable range is a valid expiry.
    let last = admin(
        gw,
        Method::POST,
        "/v1/keys",
        Some(json!({"customer": "far", "expires_at": "9999-12-31T23:59:59Z"})),
    )
    .await;
    assert_eq!(last.status, StatusCode::CREATED, "{:?}", last.body);
    assert_eq!(last.json()["expires_at"], "9999-12-31T23:59:59Z");

    // The same values on the command line: exit 2, one line naming the flag.
    for (args, flag) in [
        (
            vec!["keys", "rotate", id.as_str(), "--grace", "999999999d"],
            "--grace",
        ),
        (
            vec![
                "keys",
                "rotate",
                id.as_str(),
                "--grace",
                "99999999999999999999d",
            ],
            "--grace",
        ),
        (
            vec![
                "keys",
                "create",
                "--customer",
                "far",
                "--expires-in",
                "999999999d",
            ],
            "--expires-in",
        ),
        (
            vec![
                "keys",
                "create",
                "--customer",
                "far",
                "--expires-in",
                "3000000d",
            ],
            "--expires-in",
        ),
    ] {
        let (code, stdout, stderr) = cli(&setup.config_path, &args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert!(
            stderr.starts_with(&format!("error: {flag}: ")),
            "{args:?}: the error names {flag}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    setup.gw.stop().await;
}

async fn out_of_range_overrides_are_400_naming_the_field(backend: Backend) {
    let setup = setup(backend).await;
    let gw = &setup.gw;
    let created = admin(
        gw,
        Method::POST,
        "/v1/customers",
        Some(json!({"name": "big", "tier": "test"})),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED);
    for (overrides, field) in [
        (json!({"monthly_requests": -1}), "monthly_requests"),
        (json!({"monthly_tokens": 1.5}), "monthly_tokens"),
        (
            json!({"monthly_cost_usd": "9223372037"}),
            "monthly_cost_usd",
        ),
        (json!({"monthly_cost_usd": "1e400"}), "monthly_cost_usd"),
        (json!({"rate": "1000000001/s"}), "rate"),
        (json!({"rate": "99999999999999999999/s"}), "rate"),
        (
            json!({"overage_price_per_request_usd": "-0.1"}),
            "overage_price_per_request_usd",
        ),
    ] {
        let reply = admin(
            gw,
            Method::PATCH,
            "/v1/customers/big",
            Some(json!({ "overrides": overrides })),
        )
        .await;
        assert_invalid(&reply, "overrides", &overrides.to_string());
        let message = reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(message.contains(field), "{overrides}: {message}");
    }
    // The largest values that are in range are accepted and reported back.
    let largest = json!({
        "monthly_requests": u64::MAX,
        "monthly_tokens": u64::MAX,
        "monthly_cost_usd": "9223372036.854775807",
        "rate": "1000000000/s",
    });
    let reply = admin(
        gw,
        Method::PATCH,
        "/v1/customers/big",
        Some(json!({ "overrides": largest })),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let quota = admin(gw, Method::GET, "/v1/quota/big", None).await;
    assert_eq!(quota.status, StatusCode::OK, "{:?}", quota.body);
    setup.gw.stop().await;
}

async fn path_segments_are_percent_decoded(backend: Backend) {
    let setup = setup(backend).await;
    let gw = &setup.gw;
    for name in ["sp ace", "a/b", "naïve"] {
        let reply = admin(
            gw,
            Method::POST,
            "/v1/customers",
            Some(json!({"name": name, "tier": "test"})),
        )
        .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{name}");
    }
    for (path, name) in [
        ("/v1/customers/sp%20ace", "sp ace"),
        ("/v1/customers/a%2Fb", "a/b"),
        ("/v1/customers/a%2fb", "a/b"),
        ("/v1/customers/na%C3%AFve", "naïve"),
        ("/v1/customers/%73p%20ace", "sp ace"),
    ] {
        let reply = admin(gw, Method::GET, path, None).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {:?}", reply.body);
        assert_eq!(reply.json()["name"], name, "{path}");
    }
    let quota = admin(gw, Method::GET, "/v1/quota/sp%20ace", None).await;
    assert_eq!(quota.status, StatusCode::OK, "{:?}", quota.body);
    assert_eq!(quota.json()["customer"], "sp ace");
    let patched = admin(
        gw,
        Method::PATCH,
        "/v1/customers/sp%20ace",
        Some(json!({"overrides": {"monthly_requests": 5}})),
    )
    .await;
    assert_eq!(patched.status, StatusCode::OK, "{:?}", patched.body);

    // A key by its prefix, with the underscore escaped; rotated and
    // revoked the same way.
    let key = admin(
        gw,
        Method::POST,
        "/v1/keys",
        Some(json!({"customer": "sp ace"})),
    )
    .await
    .json();
    let prefix = key["prefix"].as_str().unwrap();
    let escaped = prefix.replace('_', "%5F");
    let one = admin(gw, Method::GET, &format!("/v1/keys/{escaped}"), None).await;
    assert_eq!(one.status, StatusCode::OK, "{escaped}: {:?}", one.body);
    assert_eq!(one.json()["id"], key["id"]);
    let rotated = admin(
        gw,
        Method::POST,
        &format!("/v1/keys/{escaped}/rotate"),
        None,
    )
    .await;
    assert_eq!(rotated.status, StatusCode::CREATED, "{:?}", rotated.body);
    let revoked = admin(
        gw,
        Method::DELETE,
        &format!(
            "/v1/keys/{}",
            rotated.json()["prefix"]
                .as_str()
                .unwrap()
                .replace('_', "%5f")
        ),
        None,
    )
    .await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT);

    // A period segment too: this month cannot be closed, whichever way it
    // is written.
    let now = time::OffsetDateTime::now_utc();
    let period = format!("{:04}%2D{:02}", now.year(), u8::from(now.month()));
    let close = admin(
        gw,
        Method::POST,
        &format!("/v1/billing/periods/{period}/close"),
        None,
    )
    .await;
    assert_invalid(&close, "period", &period);

    // Malformed escapes and non-UTF-8 are the client's mistake, naming the
    // segment as sent.
    for (method, path, segment) in [
        (Method::GET, "/v1/customers/sp%zzace", "sp%zzace"),
        (Method::GET, "/v1/customers/sp%2", "sp%2"),
        (Method::GET, "/v1/customers/%", "%"),
        (Method::GET, "/v1/customers/%+f", "%+f"),
        (Method::GET, "/v1/customers/%ff%fe", "%ff%fe"),
        (Method::GET, "/v1/customers/%C3", "%C3"),
        (Method::PATCH, "/v1/customers/%C3%28", "%C3%28"),
        (Method::GET, "/v1/keys/tg%ZZ", "tg%ZZ"),
        (Method::POST, "/v1/keys/%80/rotate", "%80"),
        (Method::DELETE, "/v1/keys/%e2%82", "%e2%82"),
        (Method::GET, "/v1/quota/%G0", "%G0"),
        (
            Method::POST,
            "/v1/billing/periods/2020-0%1/close",
            "2020-0%1",
        ),
    ] {
        let body = (method == Method::PATCH).then(|| json!({}));
        let reply = admin(gw, method, path, body).await;
        assert_invalid(&reply, &format!("path segment {segment:?}"), path);
    }
    setup.gw.stop().await;
}

/// Every list, report and billing endpoint with values at and past the ends
/// of their ranges: each is answered, 200 or 400 naming the parameter.
async fn extreme_query_values_are_answered(backend: Backend) {
    let setup = setup(backend).await;
    let gw = &setup.gw;
    let cursor = tollgate_metering::KeyId::new().to_string();
    let ok = [
        "/v1/customers?limit=1000".to_owned(),
        "/v1/keys?limit=1".to_owned(),
        format!("/v1/keys?cursor={cursor}"),
        "/v1/usage/summary?from=9999-12-31&to=9999-12-31".to_owned(),
        "/v1/usage/summary?from=0000-01-01&to=9999-12-31".to_owned(),
        "/v1/usage/daily?to=9999-12-01".to_owned(),
        "/v1/usage/by-customer?from=0001-01-01&to=9999-12-31".to_owned(),
        "/v1/usage/top-customers?limit=1000&from=0000-01-01&to=9999-12-31".to_owned(),
        "/v1/usage/export?from=9999-12-31&to=9999-12-31".to_owned(),
        "/v1/billing/summary?period=9999-12".to_owned(),
        "/v1/billing/summary?period=0000-01".to_owned(),
    ];
    for path in &ok {
        let reply = admin(gw, Method::GET, path, None).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{path}: {}",
            String::from_utf8_lossy(&reply.body)
        );
    }
    let bad = [
        ("/v1/customers?limit=4294967296", "limit"),
        ("/v1/customers?limit=99999999999999999999999", "limit"),
        ("/v1/customers?limit=1001", "limit"),
        ("/v1/keys?limit=-1", "limit"),
        ("/v1/keys?limit=", "limit"),
        ("/v1/keys?cursor=zzz", "cursor"),
        ("/v1/keys?status=%ff", "status"),
        ("/v1/usage/summary?from=10000-01-01", "from"),
        ("/v1/usage/summary?to=+10000-01-01", "to"),
        ("/v1/usage/summary?from=2026-02-30", "from"),
        ("/v1/usage/summary?from=9999-12-31&to=0000-01-01", "from"),
        ("/v1/usage/top-customers?limit=4294967296", "limit"),
        ("/v1/usage/top-customers?limit=0", "limit"),
        ("/v1/billing/summary?period=10000-01", "period"),
        ("/v1/billing/summary?period=2026-13", "period"),
        ("/v1/usage/summary?limit=1&limit=2", "query"),
    ];
    for (path, field) in bad {
        let reply = admin(gw, Method::GET, path, None).await;
        assert_invalid(&reply, field, path);
    }
    for (period, field) in [("9999-12", "period"), ("99999-01", "period")] {
        let path = format!("/v1/billing/periods/{period}/close");
        let reply = admin(gw, Method::POST, &path, None).await;
        assert_invalid(&reply, field, &path);
    }
    setup.gw.stop().await;
}

/// Arbitrary query strings on every list, report and billing endpoint,
/// over a real socket: each is answered 200, or 400 `invalid_request`
/// naming a parameter (404 only for a customer that does not exist) —
/// never a panic or a dropped connection.
#[test]
fn arbitrary_input_admin_query_strings_are_answered() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let setup = rt.block_on(setup(Backend::Sqlite));
    let endpoints = [
        "/v1/customers",
        "/v1/keys",
        "/v1/usage/summary",
        "/v1/usage/daily",
        "/v1/usage/by-customer",
        "/v1/usage/top-customers",
        "/v1/usage/export",
        "/v1/billing/summary",
    ];
    let names = [
        "limit", "cursor", "customer", "status", "from", "to", "by", "format", "period", "strict",
        "x",
    ];
    // A value: near-valid ones and arbitrary bytes, percent-encoded.
    let value = prop_oneof![
        Just("test".to_owned()),
        Just("active".to_owned()),
        Just("csv".to_owned()),
        Just("cost".to_owned()),
        "[0-9]{1,25}",
        "-?[0-9]{1,6}-[0-9]{1,3}(-[0-9]{1,3})?",
        "[+-]?[0-9]{4,6}-(0[0-9]|1[0-9])-[0-3][0-9]",
        proptest::collection::vec(any::<u8>(), 0..12).prop_map(|bytes| {
            bytes
                .iter()
                .map(|b| format!("%{b:02X}"))
                .collect::<String>()
        }),
        "[A-Za-z0-9%+._~=-]{0,16}",
    ];
    let query = (
        0..endpoints.len(),
        proptest::collection::vec((0..names.len(), value), 0..5),
        "[A-Za-z0-9%&=+._~-]{0,12}",
    );
    let mut runner = TestRunner::new(Config::with_cases(64));
    let outcome = runner.run(&query, |(endpoint, pairs, raw)| {
        let mut query: Vec<String> = pairs
            .iter()
            .map(|(name, value)| format!("{}={value}", names[*name]))
            .collect();
        query.push(raw);
        let path = format!("{}?{}", endpoints[endpoint], query.join("&"));
        let reply = rt.block_on(admin(&setup.gw, Method::GET, &path, None));
        match reply.status {
            StatusCode::OK => {}
            StatusCode::BAD_REQUEST => {
                prop_assert_eq!(reply.error_type(), "invalid_request", "{}", path);
                let message = reply.json()["error"]["message"]
                    .as_str()
                    .unwrap()
                    .to_owned();
                let named = names
                    .iter()
                    .chain(&["query"])
                    .any(|name| message.starts_with(&format!("{name}:")));
                prop_assert!(named, "{}: {}", path, message);
            }
            StatusCode::NOT_FOUND => {
                prop_assert!(path.contains("customer="), "{}", path);
                prop_assert_eq!(reply.error_type(), "not_found", "{}", path);
            }
            other => prop_assert!(false, "{}: {} {:?}", path, other, reply.body),
        }
        Ok(())
    });
    rt.block_on(setup.gw.stop());
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
}

#[tokio::test]
async fn with_migrations_off_a_schema_of_another_version_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("usage.db");
    let mut config = config(&format!(
        "[database]\nurl = \"sqlite://{}\"\nmigrate = false\n",
        db.display()
    ));
    let error = tollgate::app::open_store(&config).await.err().unwrap();
    assert!(
        format!("{error:#}").contains("tollgate migrate"),
        "{error:#}"
    );
    config.database.migrate = true;
    tollgate::app::open_store(&config).await.unwrap();
    config.database.migrate = false;
    tollgate::app::open_store(&config).await.unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute(
        "INSERT INTO schema_migrations (version, name, applied_at) VALUES (99, 'future', '2030-01-01T00:00:00.000000Z')",
        [],
    )
    .unwrap();
    let error = tollgate::app::open_store(&config).await.err().unwrap();
    assert!(format!("{error:#}").contains("version 99"), "{error:#}");
}
