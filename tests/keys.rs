//! Keys end to end, on both backends: CLI and admin API in, data plane out,
//! live revocation, rotation grace, expiry, route limits, the admin token,
//! and a database outage while serving.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use tollgate_metering::keys::KeyFormat;

use tollgate_store::testing::{Backend, TestGuard};

/// A throwaway database plus a config file pointing at it.
struct Setup {
    config_path: PathBuf,
    config: tollgate::config::Config,
    db: TestGuard,
    mock: MockUpstream,
    _dir: tempfile::TempDir,
}

async fn setup(backend: Backend) -> Setup {
    let db = TestGuard::create(backend).await;
    setup_on(db, None).await
}

/// `url_override` points the gateway somewhere else (a cut-able proxy)
/// while the CLI config keeps the direct URL.
async fn setup_on(db: TestGuard, url_override: Option<String>) -> Setup {
    let mock = MockUpstream::start().await.unwrap();
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

[[tiers]]
name = "pro"

[[routes]]
name = "mock"
prefix = "/v1/"
upstream = "{upstream}"
[routes.set_headers]
authorization = "Bearer upstream-secret"

[[routes]]
name = "other"
prefix = "/other/"
upstream = "{upstream}"
"#,
        url = db.url(),
        spool = dir.path().join("spool").display(),
        upstream = mock.url(),
    );
    let config_path = write_file(dir.path(), "tollgate.toml", &toml);
    let mut config = config(&toml);
    if let Some(url) = url_override {
        config.database.url = url;
    }
    Setup {
        config_path,
        config,
        db,
        mock,
        _dir: dir,
    }
}

impl Setup {
    /// A gateway on the setup's database, with a spool of its own (a spool
    /// directory belongs to one running gateway).
    async fn gateway(&self) -> TestGateway {
        let mut config = self.config.clone();
        config.usage.spool_dir = self
            ._dir
            .path()
            .join(format!("spool-{}", uuid::Uuid::now_v7().simple()));
        TestGateway::start_on(config, None).await
    }

    fn create_key(&self, customer: &str, extra: &[&str]) -> serde_json::Value {
        let mut args = vec![
            "keys",
            "create",
            "--customer",
            customer,
            "--tier",
            "test",
            "--json",
        ];
        args.extend_from_slice(extra);
        cli_json(&self.config_path, &args)
    }
}

async fn call(gw: &TestGateway, path: &str, key: &str) -> Reply {
    send(
        &client(),
        Request::get(gw.url(path))
            .header("authorization", format!("Bearer {key}"))
            .body(Full::default())
            .unwrap(),
    )
    .await
}

tollgate_store::both_backends!(
    cli_key_works_then_revocation_is_live_within_a_second,
    rotation_keeps_the_old_key_for_its_grace_only,
    expiry_and_route_limits,
    auth_errors_say_why,
    admin_api_manages_customers_and_keys,
    keys_never_reach_the_upstream,
    patching_a_key_changes_it_on_the_data_plane_within_a_second,
);

async fn cli_key_works_then_revocation_is_live_within_a_second(backend: Backend) {
    let setup = setup(backend).await;
    let gw = setup.gateway().await;
    let created = setup.create_key("acme", &["--name", "ci"]);
    let key = created["key"].as_str().unwrap().to_owned();
    assert!(KeyFormat::new("tg").check(&key).is_ok());
    assert_eq!(created["customer"], "acme");
    assert_eq!(created["tier"], "test");
    assert_eq!(created["name"], "ci");
    assert_eq!(created["prefix"].as_str().unwrap(), &key[..11]);

    let took = eventually(Duration::from_secs(1), || async {
        call(&gw, "/v1/echo", &key).await.status == StatusCode::OK
    })
    .await;
    eprintln!("{backend:?}: new key live after {took:?}");

    let (code, _, stderr) = cli(
        &setup.config_path,
        &["keys", "revoke", created["prefix"].as_str().unwrap()],
    );
    assert_eq!(code, 0, "{stderr}");
    let took = eventually(Duration::from_secs(1), || async {
        call(&gw, "/v1/echo", &key).await.status == StatusCode::UNAUTHORIZED
    })
    .await;
    eprintln!("{backend:?}: revocation live after {took:?}");
    let reply = call(&gw, "/v1/echo", &key).await;
    assert_eq!(reply.error_type(), "invalid_api_key");
    assert!(reply.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("revoked"));

    let listed = cli_json(
        &setup.config_path,
        &[
            "keys",
            "list",
            "--customer",
            "acme",
            "--status",
            "revoked",
            "--json",
        ],
    );
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], created["id"]);
    assert_eq!(listed[0]["status"], "revoked");
    assert!(listed[0].get("key").is_none(), "lists never show the key");
    let active = cli_json(
        &setup.config_path,
        &[
            "keys",
            "list",
            "--customer",
            "acme",
            "--status",
            "active",
            "--json",
        ],
    );
    assert_eq!(active.as_array().unwrap().len(), 0);

    // Unknown prefix: runtime error, exit 1, one line.
    let (code, _, stderr) = cli(&setup.config_path, &["keys", "revoke", "tg_nothing1"]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    // A different tier for an existing customer is a usage error.
    let (code, _, stderr) = cli(
        &setup.config_path,
        &["keys", "create", "--customer", "acme", "--tier", "pro"],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("set-tier"), "{stderr}");
    gw.stop().await;
}

async fn rotation_keeps_the_old_key_for_its_grace_only(backend: Backend) {
    let setup = setup(backend).await;
    let gw = setup.gateway().await;
    let created = admin(
        &gw,
        Method::POST,
        "/v1/keys",
        Some(serde_json::json!({"customer": "rot", "tier": "test"})),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let old = created.json()["key"].as_str().unwrap().to_owned();
    let id = created.json()["id"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(1), || async {
        call(&gw, "/v1/a", &old).await.status == StatusCode::OK
    })
    .await;

    let rotated = admin(
        &gw,
        Method::POST,
        &format!("/v1/keys/{id}/rotate"),
        Some(serde_json::json!({"grace_seconds": 2})),
    )
    .await;
    assert_eq!(rotated.status, StatusCode::CREATED);
    let body = rotated.json();
    let new = body["key"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    assert!(body["old_key_expires_at"].is_string());
    eventually(Duration::from_secs(1), || async {
        call(&gw, "/v1/a", &new).await.status == StatusCode::OK
    })
    .await;
    assert_eq!(
        call(&gw, "/v1/a", &old).await.status,
        StatusCode::OK,
        "old key works during the grace"
    );

    tokio::time::sleep(Duration::from_millis(2100)).await;
    let reply = call(&gw, "/v1/a", &old).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(reply.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("expired"));
    assert_eq!(call(&gw, "/v1/a", &new).await.status, StatusCode::OK);

    // The CLI rotates too, and prints the same shape.
    let again = cli_json(
        &setup.config_path,
        &[
            "keys",
            "rotate",
            body["id"].as_str().unwrap(),
            "--grace",
            "1h",
            "--json",
        ],
    );
    assert!(again["key"].as_str().unwrap().starts_with("tg_"));
    assert!(again["old_key_expires_at"].is_string());
    gw.stop().await;
}

async fn expiry_and_route_limits(backend: Backend) {
    let setup = setup(backend).await;
    let gw = setup.gateway().await;
    let soon = time::OffsetDateTime::now_utc() + time::Duration::milliseconds(1500);
    let soon = soon
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let created = admin(
        &gw,
        Method::POST,
        "/v1/keys",
        Some(serde_json::json!({"customer": "exp", "tier": "test", "expires_at": soon})),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let key = created.json()["key"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(1), || async {
        call(&gw, "/v1/a", &key).await.status == StatusCode::OK
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let reply = call(&gw, "/v1/a", &key).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(reply.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("expired"));

    let limited = setup.create_key("lim", &["--routes", "other"]);
    let key = limited["key"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(1), || async {
        call(&gw, "/other/x", &key).await.status == StatusCode::OK
    })
    .await;
    let reply = call(&gw, "/v1/x", &key).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(reply.error_type(), "route_forbidden");

    let (code, _, stderr) = cli(
        &setup.config_path,
        &["keys", "create", "--customer", "lim", "--routes", "nope"],
    );
    assert_eq!(code, 2);
    assert!(
        stderr.contains("routes") && stderr.contains("nope"),
        "{stderr}"
    );
    gw.stop().await;
}

async fn auth_errors_say_why(backend: Backend) {
    let setup = setup(backend).await;
    let gw = setup.gateway().await;
    let missing = send(
        &client(),
        Request::get(gw.url("/v1/a")).body(Full::default()).unwrap(),
    )
    .await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    assert_eq!(missing.error_type(), "missing_api_key");

    let malformed = call(&gw, "/v1/a", "tg_short").await;
    assert_eq!(malformed.error_type(), "invalid_api_key");
    assert!(malformed.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("malformed"));

    // Right shape, wrong checksum: refused as malformed, without a lookup.
    let good = gw.key.clone().unwrap();
    let mut bad = good.clone().into_bytes();
    let last = bad.len() - 1;
    bad[last] = if bad[last] == b'A' { b'B' } else { b'A' };
    let bad = String::from_utf8(bad).unwrap();
    let reply = call(&gw, "/v1/a", &bad).await;
    assert!(reply.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("checksum"));

    let unknown = KeyFormat::new("tg").generate().unwrap();
    let reply = call(&gw, "/v1/a", unknown.expose()).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(reply.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("nknown"));

    let via_x_api_key = send(
        &client(),
        Request::get(gw.url("/v1/a"))
            .header("x-api-key", &good)
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(via_x_api_key.status, StatusCode::OK);
    // The key is checked after routing: an unknown path is 404 either way.
    assert_eq!(
        call(&gw, "/nowhere", &bad).await.status,
        StatusCode::NOT_FOUND
    );
    gw.stop().await;
}

async fn admin_api_manages_customers_and_keys(backend: Backend) {
    let setup = setup(backend).await;
    let gw = setup.gateway().await;
    let url = format!("http://{}/v1/customers", gw.admin);
    for token in [None, Some("Bearer wrong"), Some("Basic admin-test-token")] {
        let mut builder = Request::get(&url);
        if let Some(token) = token {
            builder = builder.header("authorization", token);
        }
        let reply = send(&client(), builder.body(Full::default()).unwrap()).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{token:?}");
        assert_eq!(reply.error_type(), "unauthorized");
    }
    assert_eq!(
        get(&format!("http://{}/healthz", gw.admin)).await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&format!("http://{}/readyz?strict=true", gw.admin))
            .await
            .status,
        StatusCode::OK
    );

    for name in ["c1", "c2", "c3"] {
        let reply = admin(
            &gw,
            Method::POST,
            "/v1/customers",
            Some(serde_json::json!({"name": name, "tier": "test"})),
        )
        .await;
        assert_eq!(reply.status, StatusCode::CREATED);
        assert_eq!(reply.json()["customer"], name);
        assert_eq!(reply.json()["customer_id"], reply.json()["id"]);
    }
    let dup = admin(
        &gw,
        Method::POST,
        "/v1/customers",
        Some(serde_json::json!({"name": "c1", "tier": "test"})),
    )
    .await;
    assert_eq!(dup.status, StatusCode::BAD_REQUEST);
    assert!(dup.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("name"));
    let bad_tier = admin(
        &gw,
        Method::POST,
        "/v1/customers",
        Some(serde_json::json!({"name": "c9", "tier": "gold"})),
    )
    .await;
    assert_eq!(bad_tier.status, StatusCode::BAD_REQUEST);
    assert!(bad_tier.json()["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("tier:"));
    let no_name = admin(
        &gw,
        Method::POST,
        "/v1/customers",
        Some(serde_json::json!({"tier": "test"})),
    )
    .await;
    assert_eq!(no_name.status, StatusCode::BAD_REQUEST);
    assert!(no_name.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("name"));

    // Pagination: "test" (made at start) + c1..c3 = 4 customers, pages of 3.
    let page1 = admin(&gw, Method::GET, "/v1/customers?limit=3", None)
        .await
        .json();
    assert_eq!(page1["data"].as_array().unwrap().len(), 3);
    let cursor = page1["next_cursor"].as_str().unwrap();
    let page2 = admin(
        &gw,
        Method::GET,
        &format!("/v1/customers?limit=3&cursor={cursor}"),
        None,
    )
    .await
    .json();
    assert_eq!(page2["data"].as_array().unwrap().len(), 1);
    assert!(page2["next_cursor"].is_null());
    assert_eq!(
        admin(&gw, Method::GET, "/v1/customers?limit=0", None)
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        admin(&gw, Method::GET, "/v1/customers?limit=abc", None)
            .await
            .status,
        StatusCode::BAD_REQUEST
    );

    let patched = admin(
        &gw,
        Method::PATCH,
        "/v1/customers/c2",
        Some(serde_json::json!({"tier": "pro"})),
    )
    .await;
    assert_eq!(patched.status, StatusCode::OK);
    assert_eq!(patched.json()["tier"], "pro");
    let by_id = admin(
        &gw,
        Method::GET,
        &format!("/v1/customers/{}", patched.json()["id"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(by_id.json()["tier"], "pro");
    assert_eq!(
        admin(&gw, Method::GET, "/v1/customers/nobody", None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );

    let key = admin(
        &gw,
        Method::POST,
        "/v1/keys",
        Some(serde_json::json!({"customer": "c1", "name": "k1"})),
    )
    .await;
    assert_eq!(key.status, StatusCode::CREATED);
    let key = key.json();
    for field in [
        "id",
        "key",
        "prefix",
        "customer_id",
        "customer",
        "tier",
        "name",
        "created_at",
        "expires_at",
    ] {
        assert!(key.get(field).is_some(), "create answer has {field}: {key}");
    }
    let one = admin(
        &gw,
        Method::GET,
        &format!("/v1/keys/{}", key["prefix"].as_str().unwrap()),
        None,
    )
    .await
    .json();
    assert_eq!(one["id"], key["id"]);
    assert!(one.get("key").is_none() && one.get("digest").is_none());
    let list = admin(&gw, Method::GET, "/v1/keys?customer=c1&status=active", None)
        .await
        .json();
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert!(
        !list.to_string().contains(key["key"].as_str().unwrap()),
        "lists never carry plaintext"
    );
    assert_eq!(
        admin(&gw, Method::GET, "/v1/keys?status=bogus", None)
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        admin(
            &gw,
            Method::POST,
            "/v1/keys",
            Some(serde_json::json!({"customer": "ghost"}))
        )
        .await
        .status,
        StatusCode::NOT_FOUND
    );

    let revoke = admin(
        &gw,
        Method::DELETE,
        &format!("/v1/keys/{}", key["id"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(revoke.status, StatusCode::NO_CONTENT);
    let unknown = admin(
        &gw,
        Method::DELETE,
        &format!("/v1/keys/{}", uuid_like()),
        None,
    )
    .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.error_type(), "not_found");
    gw.stop().await;
}

fn uuid_like() -> String {
    tollgate_metering::KeyId::new().to_string()
}

async fn keys_never_reach_the_upstream(backend: Backend) {
    let setup = setup(backend).await;
    let gw = setup.gateway().await;
    let key = gw.key.clone().unwrap();
    let reply = send(
        &client(),
        Request::post(gw.url("/v1/echo"))
            .header("authorization", format!("Bearer {key}"))
            .header("x-api-key", &key)
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(!String::from_utf8_lossy(&reply.body).contains(&key));
    let seen = setup.mock.requests();
    assert_eq!(seen.len(), 1);
    for (name, value) in &seen[0].headers {
        assert!(
            !value.to_str().unwrap_or("").contains(&key),
            "{name} carried the key upstream"
        );
    }
    assert_eq!(seen[0].headers["authorization"], "Bearer upstream-secret");
    assert!(!seen[0].headers.contains_key("x-api-key"));
    drop(setup.db);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_postgres_see_a_revocation_within_a_second() {
    let setup = setup(Backend::Postgres).await;
    let a = setup.gateway().await;
    let b = setup.gateway().await;
    let created = setup.create_key("shared", &[]);
    let key = created["key"].as_str().unwrap().to_owned();
    for gw in [&a, &b] {
        eventually(Duration::from_secs(1), || async {
            call(gw, "/v1/x", &key).await.status == StatusCode::OK
        })
        .await;
    }
    let (code, _, stderr) = cli(
        &setup.config_path,
        &["keys", "revoke", created["id"].as_str().unwrap()],
    );
    assert_eq!(code, 0, "{stderr}");
    for gw in [&a, &b] {
        let took = eventually(Duration::from_secs(1), || async {
            call(gw, "/v1/x", &key).await.status == StatusCode::UNAUTHORIZED
        })
        .await;
        eprintln!("instance saw the revocation after {took:?}");
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_keeps_the_data_plane_serving_and_resyncs_after() {
    let db = TestGuard::create(Backend::Postgres).await;
    let target: std::net::SocketAddr = postgres_addr(db.url());
    let proxy = CutProxy::start(target).await;
    let through_proxy = db
        .url()
        .replacen(&target.to_string(), &proxy.addr.to_string(), 1);
    let setup = setup_on(db, Some(through_proxy)).await;
    let gw = setup.gateway().await;
    let key = gw.key.clone().unwrap();
    let victim = setup.create_key("victim", &[]);
    let victim_key = victim["key"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(1), || async {
        call(&gw, "/v1/x", &victim_key).await.status == StatusCode::OK
    })
    .await;

    proxy.cut();
    for _ in 0..5 {
        assert_eq!(
            call(&gw, "/v1/x", &key).await.status,
            StatusCode::OK,
            "cached keys keep working"
        );
    }
    let write = admin(
        &gw,
        Method::POST,
        "/v1/customers",
        Some(serde_json::json!({"name": "during", "tier": "test"})),
    )
    .await;
    assert_eq!(write.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(write.error_type(), "database_unavailable");
    assert_eq!(
        get(&format!("http://{}/readyz", gw.admin)).await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&format!("http://{}/readyz?strict=true", gw.admin))
            .await
            .status,
        StatusCode::SERVICE_UNAVAILABLE
    );

    // Changes made meanwhile (straight to the database) arrive after it returns.
    let newcomer = setup.create_key("newcomer", &[]);
    let newcomer_key = newcomer["key"].as_str().unwrap().to_owned();
    let (code, _, stderr) = cli(
        &setup.config_path,
        &["keys", "revoke", victim["id"].as_str().unwrap()],
    );
    assert_eq!(code, 0, "{stderr}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        call(&gw, "/v1/x", &victim_key).await.status,
        StatusCode::OK,
        "the cut hides the revocation"
    );

    proxy.restore();
    let took = eventually(Duration::from_secs(10), || async {
        call(&gw, "/v1/x", &newcomer_key).await.status == StatusCode::OK
            && call(&gw, "/v1/x", &victim_key).await.status == StatusCode::UNAUTHORIZED
    })
    .await;
    eprintln!("resynced {took:?} after the database returned");
    assert_eq!(
        get(&format!("http://{}/readyz?strict=true", gw.admin))
            .await
            .status,
        StatusCode::OK
    );
    gw.stop().await;
}

#[test]
fn keys_and_bodies_never_appear_in_logs() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mock = rt.block_on(MockUpstream::start()).unwrap();
    let toml = format!(
        "[[tiers]]\nname = \"t\"\n[server]\nlisten = \"LISTEN\"\nadmin_listen = \"ADMIN\"\n[[routes]]\nname = \"m\"\nprefix = \"/\"\nupstream = \"{}\"\n",
        mock.url()
    );
    let gw = Process::serve_logged(&toml, "trace");
    let key = gw.key.clone().unwrap();
    let unknown = KeyFormat::new("tg").generate().unwrap().expose().to_owned();
    rt.block_on(async {
        for presented in [key.as_str(), unknown.as_str(), "tg_garbage-canary"] {
            let reply = send(
                &client(),
                Request::post(gw.url("/v1/echo"))
                    .header("authorization", format!("Bearer {presented}"))
                    .body(Full::new(Bytes::from_static(b"body-canary-123")))
                    .unwrap(),
            )
            .await;
            assert!(!String::from_utf8_lossy(&reply.body).contains(presented));
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    let logs = gw.logs().join("\n");
    assert!(logs.contains("Data plane listening."), "logs were captured");
    for secret in [
        key.as_str(),
        unknown.as_str(),
        "garbage-canary",
        "body-canary-123",
    ] {
        assert!(!logs.contains(secret), "{secret} appeared in the logs");
    }
}

fn rfc3339(at: time::OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

async fn patching_a_key_changes_it_on_the_data_plane_within_a_second(backend: Backend) {
    let setup = setup(backend).await;
    let gw = setup.gateway().await;
    let created = admin(
        &gw,
        Method::POST,
        "/v1/keys",
        Some(serde_json::json!({"customer": "acme", "tier": "test", "name": "one"})),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let key = created.json()["key"].as_str().unwrap().to_owned();
    let prefix = created.json()["prefix"].as_str().unwrap().to_owned();
    let id = created.json()["id"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(1), || async {
        call(&gw, "/v1/a", &key).await.status == StatusCode::OK
    })
    .await;
    let patch = |who: String, body: serde_json::Value| {
        let gw = &gw;
        async move { admin(gw, Method::PATCH, &format!("/v1/keys/{who}"), Some(body)).await }
    };

    // Narrow its routes and rename it, by prefix: the data plane follows.
    let reply = patch(
        prefix.clone(),
        serde_json::json!({"routes": ["other"], "name": "two"}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let view = reply.json();
    assert_eq!(
        (view["id"].as_str(), view["name"].as_str()),
        (Some(&*id), Some("two"))
    );
    assert_eq!(view["routes"], serde_json::json!(["other"]));
    assert_eq!(view["customer"], "acme");
    assert!(
        view.get("key").is_none(),
        "the plaintext is shown once only"
    );
    let took = eventually(Duration::from_secs(1), || async {
        call(&gw, "/v1/a", &key).await.status == StatusCode::FORBIDDEN
    })
    .await;
    eprintln!("{backend:?}: route change live after {took:?}");
    assert_eq!(
        call(&gw, "/v1/a", &key).await.error_type(),
        "route_forbidden"
    );
    assert_eq!(call(&gw, "/other/a", &key).await.status, StatusCode::OK);

    // `null` clears (every route, no name); absent fields stay.
    let reply = patch(
        id.clone(),
        serde_json::json!({"routes": null, "name": null}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert!(reply.json()["routes"].is_null() && reply.json()["name"].is_null());
    eventually(Duration::from_secs(1), || async {
        call(&gw, "/v1/a", &key).await.status == StatusCode::OK
    })
    .await;
    let reply = patch(id.clone(), serde_json::json!({"name": "three"})).await;
    assert_eq!(reply.json()["name"], "three");
    assert!(reply.json()["routes"].is_null());
    let fetched = admin(&gw, Method::GET, &format!("/v1/keys/{id}"), None).await;
    assert_eq!(fetched.json()["name"], "three");

    // Bad changes are refused whole, naming the field; nothing changes.
    let past = rfc3339(time::OffsetDateTime::now_utc() - time::Duration::hours(1));
    for (body, field) in [
        (
            serde_json::json!({"expires_at": past, "name": "x"}),
            "expires_at:",
        ),
        (serde_json::json!({"routes": ["nope"]}), "routes:"),
        (serde_json::json!({"routes": []}), "routes:"),
        (serde_json::json!({"name": "a\u{7}b"}), "name:"),
        (serde_json::json!({"expires_at": "tomorrow"}), "expires_at:"),
        (
            serde_json::json!({"limits": {"monthly_requests": -5}}),
            "limits:",
        ),
        (serde_json::json!({"colour": "red"}), "colour:"),
    ] {
        let reply = patch(id.clone(), body.clone()).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(reply.error_type(), "invalid_request");
        let message = reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(message.starts_with(field), "{body}: {message}");
    }
    let fetched = admin(&gw, Method::GET, &format!("/v1/keys/{id}"), None).await;
    assert_eq!(fetched.json()["name"], "three");
    let unknown = patch(
        uuid::Uuid::now_v7().to_string(),
        serde_json::json!({"name": "x"}),
    )
    .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);

    // An expiry set now ends the key then.
    let soon = time::OffsetDateTime::now_utc() + time::Duration::milliseconds(1500);
    let reply = patch(id.clone(), serde_json::json!({"expires_at": rfc3339(soon)})).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert!(reply.json()["expires_at"].is_string());
    let took = eventually(Duration::from_secs(3), || async {
        call(&gw, "/v1/a", &key).await.status == StatusCode::UNAUTHORIZED
    })
    .await;
    eprintln!("{backend:?}: expiry live after {took:?}");
    assert!(call(&gw, "/v1/a", &key).await.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("expired"));
}
