//! The operator console over real sockets: signing in and out, the session
//! cookie's flags and lifetime, CSRF on every change, the security headers,
//! and pages whose numbers are the admin API's.

#![allow(clippy::unwrap_used)] // tests may unwrap (STYLE.md)

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::Full;

/// A console request, with the session cookie when there is one.
async fn console(
    gw: &TestGateway,
    method: Method,
    path: &str,
    cookie: Option<&str>,
    form: Option<&[(&str, &str)]>,
) -> Reply {
    let mut builder = Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", gw.admin));
    if let Some(cookie) = cookie {
        builder = builder.header("cookie", format!("tollgate_session={cookie}"));
    }
    let body = match form {
        Some(form) => {
            builder = builder.header("content-type", "application/x-www-form-urlencoded");
            Full::new(Bytes::from(serde_urlencoded::to_string(form).unwrap()))
        }
        None => Full::default(),
    };
    send(&client(), builder.body(body).unwrap()).await
}

fn text(reply: &Reply) -> String {
    String::from_utf8_lossy(&reply.body).into_owned()
}

fn header<'a>(reply: &'a Reply, name: &str) -> &'a str {
    reply
        .headers
        .get(name)
        .map(|value| value.to_str().unwrap())
        .unwrap_or("")
}

/// Every console answer carries the security headers.
fn assert_secure(reply: &Reply) {
    assert_eq!(
        header(reply, "content-security-policy"),
        "default-src 'self'"
    );
    assert_eq!(header(reply, "x-frame-options"), "DENY");
    assert_eq!(header(reply, "referrer-policy"), "no-referrer");
}

/// The CSRF token of a page's forms.
fn csrf(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").unwrap() + "name=\"csrf\" value=\"".len();
    page[at..at + 64].to_owned()
}

async fn sign_in(gw: &TestGateway) -> String {
    let reply = console(
        gw,
        Method::POST,
        "/console/login",
        None,
        Some(&[("token", "admin-test-token")]),
    )
    .await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "{}", text(&reply));
    assert_eq!(header(&reply, "location"), "/console/");
    let cookie = header(&reply, "set-cookie").to_owned();
    let value = cookie
        .strip_prefix("tollgate_session=")
        .and_then(|rest| rest.split(';').next())
        .unwrap()
        .to_owned();
    assert_eq!(value.len(), 64, "{cookie}");
    value
}

fn gateway_config(mock: &MockUpstream, session_ttl: &str) -> tollgate::config::Config {
    config(&format!(
        r#"
[admin]
tokens = ["admin-test-token"]
session_ttl = "{session_ttl}"

[usage]
flush_interval = "50ms"

[[tiers]]
name = "test"
monthly_requests = 4

[[routes]]
name = "openai"
prefix = "/v1/"
upstream = "{upstream}"
usage = "openai"

[pricing."gpt-4o-mini"]
input = 0.15
output = 0.60
"#,
        upstream = mock.url()
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_in_and_out_and_the_session_cookie() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = TestGateway::start(gateway_config(&mock, "12h")).await;

    // Not signed in: pages send to the sign-in form; changes are refused.
    let reply = console(&gw, Method::GET, "/console/", None, None).await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER);
    assert_eq!(header(&reply, "location"), "/console/login");
    assert_secure(&reply);
    let reply = console(
        &gw,
        Method::POST,
        "/console/customers",
        None,
        Some(&[("name", "x")]),
    )
    .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    let login = console(&gw, Method::GET, "/console/login", None, None).await;
    assert_eq!(login.status, StatusCode::OK);
    assert_secure(&login);
    assert!(
        text(&login).contains("<label for=\"token\">"),
        "{}",
        text(&login)
    );
    assert!(!text(&login).contains("<script>"), "no inline script");

    for wrong in ["", "nope", "admin-test-token "] {
        let reply = console(
            &gw,
            Method::POST,
            "/console/login",
            None,
            Some(&[("token", wrong)]),
        )
        .await;
        if wrong.trim() == "admin-test-token" {
            continue;
        }
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{wrong:?}");
        assert!(header(&reply, "set-cookie").is_empty());
        assert!(text(&reply).contains("role=\"alert\""));
    }

    let reply = console(
        &gw,
        Method::POST,
        "/console/login",
        None,
        Some(&[("token", "admin-test-token")]),
    )
    .await;
    let cookie = header(&reply, "set-cookie");
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(cookie.contains(flag), "{cookie}");
    }
    assert!(
        !cookie.contains("Secure"),
        "plain HTTP admin listener: {cookie}"
    );
    let session = sign_in(&gw).await;

    let overview = console(&gw, Method::GET, "/console/", Some(&session), None).await;
    assert_eq!(overview.status, StatusCode::OK, "{}", text(&overview));
    assert_secure(&overview);
    assert_eq!(header(&overview, "cache-control"), "no-store");
    let page = text(&overview);
    assert!(
        page.contains("This month") && page.contains("<svg"),
        "{page}"
    );
    assert!(page.contains("All dates and times are UTC"));

    // Sign out needs the session's CSRF token, and ends it on the server.
    let token = csrf(&page);
    let refused = console(
        &gw,
        Method::POST,
        "/console/logout",
        Some(&session),
        Some(&[("csrf", "0")]),
    )
    .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let out = console(
        &gw,
        Method::POST,
        "/console/logout",
        Some(&session),
        Some(&[("csrf", &token)]),
    )
    .await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    assert!(header(&out, "set-cookie").contains("Max-Age=0"));
    let after = console(&gw, Method::GET, "/console/", Some(&session), None).await;
    assert_eq!(
        after.status,
        StatusCode::SEE_OTHER,
        "the old cookie is refused"
    );

    // The assets are part of the binary.
    let css = console(&gw, Method::GET, "/console/assets/console.css", None, None).await;
    assert_eq!(
        (css.status, header(&css, "content-type")),
        (StatusCode::OK, "text/css")
    );
    let js = console(&gw, Method::GET, "/console/assets/console.js", None, None).await;
    assert_eq!(js.status, StatusCode::OK);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_after_its_ttl() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = TestGateway::start(gateway_config(&mock, "1s")).await;
    let session = sign_in(&gw).await;
    let reply = console(&gw, Method::GET, "/console/customers", Some(&session), None).await;
    assert_eq!(reply.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let reply = console(&gw, Method::GET, "/console/customers", Some(&session), None).await;
    assert_eq!(reply.status, StatusCode::SEE_OTHER);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_show_the_admin_api_numbers_and_changes_need_csrf() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = TestGateway::start(gateway_config(&mock, "12h")).await;
    let key = gw.key.clone().unwrap();
    for _ in 0..3 {
        let reply = send(
            &client(),
            Request::post(gw.url("/v1/chat/completions"))
                .header("authorization", format!("Bearer {key}"))
                .body(Full::new(Bytes::from_static(
                    br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
                )))
                .unwrap(),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    // The rows reach the database within a flush or two.
    eventually(Duration::from_secs(5), || async {
        admin(&gw, Method::GET, "/v1/usage/summary", None)
            .await
            .json()["requests"]
            == 3
    })
    .await;
    let summary = admin(&gw, Method::GET, "/v1/usage/summary", None)
        .await
        .json();
    let session = sign_in(&gw).await;
    let page = text(&console(&gw, Method::GET, "/console/", Some(&session), None).await);
    assert!(
        page.contains("<dt>Requests</dt><dd>3</dd>"),
        "the month's requests as the API says: {page}"
    );
    let cost = summary["cost_usd"].as_str().unwrap();
    assert!(
        page.contains(&format!("title=\"{cost} USD\"")),
        "exact cost {cost}: {page}"
    );
    assert!(page.contains("gpt-4o-mini"), "cost by model: {page}");

    // Customers: the list, then a new one, with the session's CSRF token only.
    let list = text(&console(&gw, Method::GET, "/console/customers", Some(&session), None).await);
    assert!(list.contains("test"), "{list}");
    let token = csrf(&list);
    let form = [("csrf", "forged"), ("name", "acme"), ("tier", "test")];
    let refused = console(
        &gw,
        Method::POST,
        "/console/customers",
        Some(&session),
        Some(&form),
    )
    .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(
        admin(&gw, Method::GET, "/v1/customers/acme", None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    let form = [("csrf", token.as_str()), ("name", "acme"), ("tier", "test")];
    let created = console(
        &gw,
        Method::POST,
        "/console/customers",
        Some(&session),
        Some(&form),
    )
    .await;
    assert_eq!(created.status, StatusCode::OK);
    assert!(
        text(&created).contains("Customer acme created."),
        "{}",
        text(&created)
    );
    let api = admin(&gw, Method::GET, "/v1/customers/acme", None).await;
    assert_eq!(
        (api.status, api.json()["tier"].as_str()),
        (StatusCode::OK, Some("test"))
    );
    // A bad one is refused on the page, naming the field.
    let form = [("csrf", token.as_str()), ("name", "acme"), ("tier", "gold")];
    let bad = text(
        &console(
            &gw,
            Method::POST,
            "/console/customers",
            Some(&session),
            Some(&form),
        )
        .await,
    );
    assert!(
        bad.contains("role=\"alert\"") && bad.contains("tier:"),
        "{bad}"
    );
    gw.stop().await;
}

/// The first `<code id="plaintext">` of a page: a key shown once.
fn plaintext(page: &str) -> String {
    let at = page.find("<code id=\"plaintext\">").unwrap() + "<code id=\"plaintext\">".len();
    let end = page[at..].find('<').unwrap();
    page[at..at + end].to_owned()
}

async fn call(gw: &TestGateway, key: &str) -> StatusCode {
    send(
        &client(),
        Request::post(gw.url("/v1/chat/completions"))
            .header("authorization", format!("Bearer {key}"))
            .body(Full::new(Bytes::from_static(
                br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
            )))
            .unwrap(),
    )
    .await
    .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_customers_billing_and_webhooks_pages() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = TestGateway::start(gateway_config(&mock, "12h")).await;
    let session = sign_in(&gw).await;
    let page = |path: &'static str| {
        let (gw, session) = (&gw, session.clone());
        async move { text(&console(gw, Method::GET, path, Some(&session), None).await) }
    };
    let token = csrf(&page("/console/keys").await);

    // A key made on the keys page is shown once, works, and is revoked there.
    let form = [
        ("csrf", token.as_str()),
        ("customer", "acme"),
        ("tier", "test"),
        ("name", "laptop"),
        ("routes", ""),
    ];
    let created = text(
        &console(
            &gw,
            Method::POST,
            "/console/keys",
            Some(&session),
            Some(&form),
        )
        .await,
    );
    let key = plaintext(&created);
    assert!(key.starts_with("tg_"), "{created}");
    assert!(
        created.contains("data-copy=\"#plaintext\""),
        "a copy button"
    );
    eventually(Duration::from_secs(1), || async {
        call(&gw, &key).await == StatusCode::OK
    })
    .await;
    let listed = page("/console/keys").await;
    assert!(
        listed.contains("laptop") && listed.contains("acme"),
        "{listed}"
    );
    assert!(!listed.contains(&key), "the plaintext is never shown again");
    let id = admin(&gw, Method::GET, "/v1/keys?customer=acme", None)
        .await
        .json()["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let revoke = format!("/console/keys/{id}/revoke");
    let revoked = text(
        &console(
            &gw,
            Method::POST,
            &revoke,
            Some(&session),
            Some(&[("csrf", token.as_str())]),
        )
        .await,
    );
    assert!(revoked.contains("revoked."), "{revoked}");
    eventually(Duration::from_secs(1), || async {
        call(&gw, &key).await == StatusCode::UNAUTHORIZED
    })
    .await;

    // The customer page edits overrides through the same rules as the API.
    let acme = admin(&gw, Method::GET, "/v1/customers/acme", None)
        .await
        .json();
    let path = format!("/console/customers/{}", acme["id"].as_str().unwrap());
    let detail = text(&console(&gw, Method::GET, &path, Some(&session), None).await);
    assert!(
        detail.contains("<h1>acme</h1>") && detail.contains("laptop"),
        "{detail}"
    );
    assert!(
        detail.contains("requests") && detail.contains("of 4"),
        "{detail}"
    );
    let bad = [
        ("csrf", token.as_str()),
        ("tier", "test"),
        ("overrides", "{\"monthly_requests\": -1}"),
    ];
    let bad = text(&console(&gw, Method::POST, &path, Some(&session), Some(&bad)).await);
    assert!(
        bad.contains("role=\"alert\"") && bad.contains("overrides"),
        "{bad}"
    );
    let good = [
        ("csrf", token.as_str()),
        ("tier", "test"),
        ("overrides", "{\"monthly_requests\": 9}"),
    ];
    let good = text(&console(&gw, Method::POST, &path, Some(&session), Some(&good)).await);
    assert!(good.contains("Saved."), "{good}");
    let api = admin(&gw, Method::GET, "/v1/customers/acme", None)
        .await
        .json();
    assert_eq!(api["overrides"]["monthly_requests"], 9);

    // Billing: last month, closed from the page; the export downloads.
    let last = time::OffsetDateTime::now_utc()
        .date()
        .replace_day(1)
        .unwrap()
        .previous_day()
        .unwrap();
    let period = format!("{:04}-{:02}", last.year(), u8::from(last.month()));
    let billing = text(
        &console(
            &gw,
            Method::GET,
            &format!("/console/billing?period={period}"),
            Some(&session),
            None,
        )
        .await,
    );
    assert!(billing.contains(&format!("Close {period}")), "{billing}");
    let form = [("csrf", token.as_str()), ("period", period.as_str())];
    let closed = text(
        &console(
            &gw,
            Method::POST,
            "/console/billing/close",
            Some(&session),
            Some(&form),
        )
        .await,
    );
    assert!(closed.contains("closed: its lines are frozen"), "{closed}");
    let api = admin(
        &gw,
        Method::GET,
        &format!("/v1/billing/summary?period={period}"),
        None,
    )
    .await;
    assert_eq!(api.json()["closed"], true);
    let today = time::OffsetDateTime::now_utc().date().to_string();
    let export = console(
        &gw,
        Method::GET,
        &format!("/console/billing/export?from={today}&to={today}"),
        Some(&session),
        None,
    )
    .await;
    assert_eq!(export.status, StatusCode::OK);
    assert!(
        text(&export).starts_with("id,client_request_id,ts,"),
        "{}",
        text(&export)
    );
    assert_secure(&export);
    let anonymous = console(&gw, Method::GET, "/console/billing/export", None, None).await;
    assert_eq!(
        anonymous.status,
        StatusCode::SEE_OTHER,
        "the export needs a session"
    );

    let webhooks = page("/console/webhooks").await;
    assert!(webhooks.contains("No webhook deliveries yet"), "{webhooks}");
    let missing = console(&gw, Method::GET, "/console/nothing", Some(&session), None).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_finds_customers_beyond_the_first_page() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = TestGateway::start(gateway_config(&mock, "12h")).await;
    for n in 0..105 {
        let name = format!("c{n:03}");
        let reply = admin(
            &gw,
            Method::POST,
            "/v1/customers",
            Some(serde_json::json!({"name": name, "tier": "test"})),
        )
        .await;
        assert_eq!(reply.status, StatusCode::CREATED);
    }
    let session = sign_in(&gw).await;
    let first = text(&console(&gw, Method::GET, "/console/customers", Some(&session), None).await);
    assert!(first.contains("Next page"), "a page of 100");
    assert!(!first.contains(">c104<"), "{first}");
    let found = text(
        &console(
            &gw,
            Method::GET,
            "/console/customers?q=C104",
            Some(&session),
            None,
        )
        .await,
    );
    assert!(found.contains(">c104</a>"), "{found}");
    assert_eq!(found.matches("class=\"id\"").count(), 1, "only the match");
    let none = text(
        &console(
            &gw,
            Method::GET,
            "/console/customers?q=nobody",
            Some(&session),
            None,
        )
        .await,
    );
    assert!(none.contains("No customer matches"), "{none}");
    gw.stop().await;
}
