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
    gateway_config_with(mock, session_ttl, "")
}

/// As [`gateway_config`], with `extra` at the end (e.g. `[[webhooks]]`).
fn gateway_config_with(
    mock: &MockUpstream,
    session_ttl: &str,
    extra: &str,
) -> tollgate::config::Config {
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
{extra}
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

/// A POST of a console form with the session's cookie.
async fn post(gw: &TestGateway, session: &str, path: &str, form: &[(&str, &str)]) -> Reply {
    console(gw, Method::POST, path, Some(session), Some(form)).await
}

/// The key's own limits as the admin API shows them.
async fn api_limits(gw: &TestGateway, id: &str) -> serde_json::Value {
    let reply = admin(gw, Method::GET, &format!("/v1/keys/{id}"), None).await;
    assert_eq!(reply.status, StatusCode::OK);
    reply.json()["limits"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_limits_are_set_refused_and_cleared_from_the_keys_page() {
    let mock = MockUpstream::start().await.unwrap();
    let gw = TestGateway::start(gateway_config(&mock, "12h")).await;
    let session = sign_in(&gw).await;
    let id = admin(&gw, Method::GET, "/v1/keys?customer=test", None)
        .await
        .json()["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let path = format!("/console/keys/{id}/limits");

    // Listed without limits of its own, with a form to give it some.
    let listed = text(&console(&gw, Method::GET, "/console/keys", Some(&session), None).await);
    assert!(listed.contains("customer&#39;s only"), "{listed}");
    assert!(
        listed.contains(&format!("action=\"{path}\""))
            && listed.contains(&format!("<label for=\"rate-{id}\">Rate</label>")),
        "{listed}"
    );
    assert_eq!(api_limits(&gw, &id).await, serde_json::Value::Null);
    let token = csrf(&listed);

    // Without the session's CSRF token nothing changes.
    let form = [("csrf", "forged"), ("rate", "10/s")];
    let refused = post(&gw, &session, &path, &form).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(api_limits(&gw, &id).await, serde_json::Value::Null);

    // Saved: the admin API reads back what the form set; empty is no limit.
    let form = [
        ("csrf", token.as_str()),
        ("rate", "10/s"),
        ("monthly_requests", "1000"),
        ("monthly_tokens", ""),
        ("monthly_cost_usd", "25"),
    ];
    let saved = post(&gw, &session, &path, &form).await;
    assert_eq!(saved.status, StatusCode::OK);
    assert_secure(&saved);
    let saved = text(&saved);
    assert!(
        saved.contains("role=\"status\"")
            && saved.contains("saved: 10/s · 1,000 req/mo · 25 USD/mo."),
        "{saved}"
    );
    assert!(
        saved.contains(&format!("id=\"rate-{id}\" name=\"rate\" value=\"10/s\"")),
        "the form is prefilled: {saved}"
    );
    let limits = api_limits(&gw, &id).await;
    assert_eq!(limits["rate"], "10/s", "{limits}");
    assert_eq!(limits["monthly_requests"], 1000, "{limits}");
    assert_eq!(limits["monthly_cost_usd"], "25", "{limits}");
    assert!(limits.get("monthly_tokens").is_none(), "{limits}");

    // Bad input is refused naming the field, comes back in the open form,
    // and changes nothing.
    for (field, value, named) in [
        ("rate", "ten per second", "rate"),
        ("monthly_requests", "lots", "monthly_requests"),
        ("monthly_cost_usd", "a few dollars", "monthly_cost_usd"),
    ] {
        let mut form = vec![
            ("csrf", token.as_str()),
            ("rate", "20/s"),
            ("monthly_requests", "5"),
        ];
        form.retain(|(name, _)| *name != field);
        form.push((field, value));
        let bad = text(&post(&gw, &session, &path, &form).await);
        let alert = bad
            .split("role=\"alert\">")
            .nth(1)
            .unwrap_or_else(|| panic!("no alert for {field}: {bad}"));
        let alert = &alert[..alert.find("</p>").unwrap()];
        assert!(alert.contains(named), "{field}: {alert}");
        assert!(alert.contains("Key tg_"), "names the key: {alert}");
        assert!(
            bad.contains(&format!("value=\"{}\"", value.replace('\'', "&#39;"))),
            "the refused value is kept: {bad}"
        );
        assert!(
            bad.contains("<details class=\"edit-limits\" open>"),
            "{bad}"
        );
        assert_eq!(
            api_limits(&gw, &id).await,
            limits,
            "{field}: nothing changed"
        );
    }

    // Cleared: only the customer's limits apply again.
    let cleared = text(
        &post(
            &gw,
            &session,
            &path,
            &[("csrf", token.as_str()), ("clear", "1"), ("rate", "10/s")],
        )
        .await,
    );
    assert!(
        cleared.contains("cleared: only its customer&#39;s apply."),
        "{cleared}"
    );
    assert_eq!(api_limits(&gw, &id).await, serde_json::Value::Null);

    // A new key can be given limits at once; a bad one is not made.
    let form = [
        ("csrf", token.as_str()),
        ("customer", "test"),
        ("name", "batch"),
        ("rate", "5/min"),
        ("monthly_tokens", "20000"),
    ];
    let created = text(&post(&gw, &session, "/console/keys", &form).await);
    assert!(
        created.contains("Its own limits: 5/min · 20,000 tokens/mo."),
        "{created}"
    );
    let keys = admin(&gw, Method::GET, "/v1/keys?customer=test", None)
        .await
        .json();
    let batch = keys["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|key| key["name"] == "batch")
        .unwrap();
    assert_eq!(batch["limits"]["rate"], "5/min");
    assert_eq!(batch["limits"]["monthly_tokens"], 20000);
    let form = [
        ("csrf", token.as_str()),
        ("customer", "test"),
        ("name", "bad"),
        ("rate", "ten per second"),
    ];
    let bad = text(&post(&gw, &session, "/console/keys", &form).await);
    assert!(bad.contains("role=\"alert\">limits: invalid rate"), "{bad}");
    let keys = admin(&gw, Method::GET, "/v1/keys?customer=test", None)
        .await
        .json();
    assert_eq!(keys["data"].as_array().unwrap().len(), 2, "{keys}");
    gw.stop().await;
}

const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// `YYYY-MM` of the month `back` months before this one.
fn month_before(back: u32) -> String {
    let mut date = time::OffsetDateTime::now_utc()
        .date()
        .replace_day(1)
        .unwrap();
    for _ in 0..back {
        date = date.previous_day().unwrap().replace_day(1).unwrap();
    }
    format!("{:04}-{:02}", date.year(), u8::from(date.month()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhooks_page_lists_deliveries_and_retries_one() {
    let receiver = tollgate_mock::WebhookReceiver::start(WEBHOOK_SECRET)
        .await
        .unwrap();
    let mock = MockUpstream::start().await.unwrap();
    let hook = format!(
        "[[webhooks]]\nurl = \"{}\"\nsecret = \"{WEBHOOK_SECRET}\"\nevents = [\"billing.period_closed\"]\n",
        receiver.url()
    );
    let gw = TestGateway::start(gateway_config_with(&mock, "12h", &hook)).await;
    let session = sign_in(&gw).await;
    let page = |path: String| {
        let (gw, session) = (&gw, session.clone());
        async move { text(&console(gw, Method::GET, &path, Some(&session), None).await) }
    };
    let empty = page("/console/webhooks".into()).await;
    assert!(empty.contains("No webhook deliveries yet"), "{empty}");
    let token = csrf(&empty);

    // Closing last month records billing.period_closed; its first attempt
    // is answered 500.
    receiver.fail_next(1, 500);
    let period = month_before(1);
    let closed = admin(
        &gw,
        Method::POST,
        &format!("/v1/billing/periods/{period}/close"),
        None,
    )
    .await;
    assert_eq!(closed.status, StatusCode::OK, "{}", text(&closed));
    eventually(Duration::from_secs(10), || async {
        page("/console/webhooks".into())
            .await
            .contains("answered HTTP 500")
    })
    .await;
    let deliveries = admin(&gw, Method::GET, "/v1/webhooks/deliveries", None)
        .await
        .json();
    let delivery = &deliveries["data"][0];
    assert_eq!(delivery["status"], "pending", "{deliveries}");
    assert_eq!(delivery["attempts"], 1, "{deliveries}");
    let (id, event_id) = (
        delivery["id"].as_str().unwrap().to_owned(),
        delivery["event_id"].as_str().unwrap().to_owned(),
    );
    let listed = page("/console/webhooks".into()).await;
    for shown in [
        "billing.period_closed".to_owned(),
        receiver.url(),
        "<span class=\"badge pending\">pending</span>".to_owned(),
        "<td class=\"problem\">answered HTTP 500</td>".to_owned(),
        event_id.clone(),
        format!("action=\"/console/webhooks/deliveries/{id}/retry\""),
    ] {
        assert!(listed.contains(&shown), "{shown}: {listed}");
    }
    let created = time::OffsetDateTime::parse(
        delivery["created_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let minute = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]");
    assert!(
        listed.contains(&format!(
            "<td class=\"time\">{}</td>",
            created.format(&minute).unwrap()
        )),
        "the created time in UTC minutes: {listed}"
    );

    // Filters are query parameters.
    let none = page("/console/webhooks?status=delivered".into()).await;
    assert!(none.contains("No deliveries match"), "{none}");
    let some = page("/console/webhooks?status=pending&event=billing.period_closed".into()).await;
    assert!(some.contains(&event_id), "{some}");
    assert!(
        some.contains("<option selected>billing.period_closed</option>"),
        "{some}"
    );
    let bad = page("/console/webhooks?status=lost".into()).await;
    assert!(bad.contains("role=\"alert\">status:"), "{bad}");

    // Retry needs the CSRF token; then it is delivered, signed, with the
    // same webhook-id, and the page says so.
    let retry = format!("/console/webhooks/deliveries/{id}/retry");
    let forged = post(&gw, &session, &retry, &[("csrf", "forged")]).await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    let form = [
        ("csrf", token.as_str()),
        ("status", ""),
        ("event", "billing.period_closed"),
        ("cursor", ""),
    ];
    let retried = post(&gw, &session, &retry, &form).await;
    assert_eq!(retried.status, StatusCode::OK);
    assert_secure(&retried);
    let retried = text(&retried);
    assert!(
        retried.contains(&format!(
            "role=\"status\">Delivered billing.period_closed to {}.",
            receiver.url()
        )),
        "{retried}"
    );
    assert!(
        retried.contains("<span class=\"badge delivered\">delivered</span>")
            && retried.contains("<option selected>billing.period_closed</option>"),
        "the same view, delivered: {retried}"
    );
    let accepted = receiver.wait_for(1, Duration::from_secs(5)).await.unwrap();
    assert_eq!(accepted[0].id, event_id);
    assert_eq!(accepted[0].event_type, "billing.period_closed");
    assert!(accepted[0].valid, "{:?}", accepted[0].error);
    assert_eq!(accepted[0].body["data"]["period"], period.as_str());
    let all = receiver.received();
    assert_eq!(all.len(), 2, "one failed attempt, one retry");
    assert!(all.iter().all(|r| r.id == event_id && r.valid));
    let after = admin(
        &gw,
        Method::GET,
        "/v1/webhooks/deliveries?status=delivered",
        None,
    )
    .await
    .json();
    assert_eq!(after["data"][0]["attempts"], 2, "{after}");

    // A retry of no delivery says so.
    let missing = text(
        &post(
            &gw,
            &session,
            "/console/webhooks/deliveries/nope/retry",
            &[("csrf", token.as_str())],
        )
        .await,
    );
    assert!(
        missing.contains("role=\"alert\">Could not retry the delivery"),
        "{missing}"
    );

    // Past a page of 50, the next page follows the cursor with the filters.
    for back in 2..=51 {
        let period = month_before(back);
        let closed = admin(
            &gw,
            Method::POST,
            &format!("/v1/billing/periods/{period}/close"),
            None,
        )
        .await;
        assert_eq!(closed.status, StatusCode::OK, "{period}");
    }
    receiver
        .wait_for(51, Duration::from_secs(30))
        .await
        .unwrap();
    let first = page("/console/webhooks?event=billing.period_closed".into()).await;
    assert_eq!(first.matches("class=\"badge ").count(), 50, "{first}");
    assert!(!first.contains(&event_id), "the oldest is on the next page");
    let at = first.find("href=\"/console/webhooks?").unwrap() + "href=\"".len();
    let next = first[at..at + first[at..].find('"').unwrap()].replace("&#38;", "&");
    assert!(
        next.starts_with("/console/webhooks?event=billing.period_closed&cursor="),
        "{next}"
    );
    let second = page(next).await;
    assert_eq!(second.matches("class=\"badge ").count(), 1, "{second}");
    assert!(second.contains(&event_id), "{second}");
    assert!(!second.contains("Next page"), "{second}");
    gw.stop().await;
}
