//! The console in a real browser: Debian's headless Chromium, driven over
//! WebDriver (chromedriver) by fantoccini. An operator signs in, creates a
//! customer and a key and copies its plaintext, calls the data plane with
//! it, sees the request and its cost on the overview and the customer page,
//! gives the key limits of its own, revokes it and sees the next call
//! refused, closes last month, sees the webhook delivery that announced it
//! fail and retries it, and signs out. Each page is saved as a screenshot
//! under `target/console-screenshots/`.
//!
//! `scripts/test` installs `chromium` and `chromium-driver` when missing.

#![allow(clippy::unwrap_used)] // tests may unwrap (STYLE.md)

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use http::{Method, Request, StatusCode};
use http_body_util::Full;

/// chromedriver on a free port, stopped when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start() -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver is installed (scripts/test installs Debian's chromium-driver)");
        Driver { child, port }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver) -> Client {
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".to_owned(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--no-first-run", "--disable-sync", "--window-size=1280,1100"
            ]
        }),
    );
    let url = format!("http://127.0.0.1:{}", driver.port);
    // chromedriver takes a moment to listen.
    for _ in 0..50 {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        if let Ok(client) = ClientBuilder::new(connector)
            .capabilities(capabilities.clone())
            .connect(&url)
            .await
        {
            return client;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("cannot start a browser session through chromedriver at {url}");
}

fn screenshots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn shoot(browser: &Client, name: &str) {
    let png = browser.screenshot().await.unwrap();
    std::fs::write(screenshots().join(format!("{name}.png")), png).unwrap();
}

async fn call(gw: &TestGateway, key: &str) -> StatusCode {
    send(
        &client(),
        Request::post(gw.url("/v1/chat/completions"))
            .header("authorization", format!("Bearer {key}"))
            .body(Full::new(Bytes::from_static(
                br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello there"}]}"#,
            )))
            .unwrap(),
    )
    .await
    .status
}

async fn text_of(browser: &Client, css: &str) -> String {
    browser
        .find(Locator::Css(css))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The text of `css` on the page a form or click navigates to: a click
/// returns before the next page has loaded, so this waits for an element
/// only that page has.
async fn after_navigation(browser: &Client, css: &str) -> String {
    browser
        .wait()
        .at_most(Duration::from_secs(10))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|error| panic!("{css} never appeared: {error}"))
        .text()
        .await
        .unwrap()
}

/// Waits for a `.notice` that says `words`: the page before may have had
/// a notice of its own.
async fn notice_saying(browser: &Client, words: &str) -> String {
    let mut last = String::new();
    for _ in 0..100 {
        if let Ok(notice) = browser.find(Locator::Css(".notice")).await {
            last = notice.text().await.unwrap_or_default();
            if last.contains(words) {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no notice saying {words:?}; the last said {last:?}");
}

async fn fill(browser: &Client, css: &str, value: &str) {
    let field = browser.find(Locator::Css(css)).await.unwrap();
    field.clear().await.unwrap();
    field.send_keys(value).await.unwrap();
}

async fn submit(browser: &Client, form: &str) {
    browser
        .find(Locator::Css(&format!("{form} button[type=submit]")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_runs_the_business_from_the_console() {
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let receiver = tollgate_mock::WebhookReceiver::start(secret).await.unwrap();
    let mock = MockUpstream::start().await.unwrap();
    let gw = TestGateway::start(config(&format!(
        r#"
[admin]
tokens = ["admin-test-token"]

[usage]
flush_interval = "50ms"

[[tiers]]
name = "pro"
monthly_requests = 1000
monthly_cost_usd = 5.0

[[routes]]
name = "openai"
prefix = "/v1/"
upstream = "{upstream}"
usage = "openai"

[pricing."gpt-4o-mini"]
input = 150.0
output = 600.0

[[webhooks]]
url = "{hook}"
secret = "{secret}"
events = ["billing.period_closed"]
"#,
        upstream = mock.url(),
        hook = receiver.url(),
    )))
    .await;
    let console = |path: &str| format!("http://{}{path}", gw.admin);
    let driver = Driver::start();
    let browser = browser(&driver).await;

    // Sign in.
    browser.goto(&console("/console/")).await.unwrap();
    assert!(browser
        .current_url()
        .await
        .unwrap()
        .path()
        .ends_with("/console/login"));
    shoot(&browser, "01-sign-in").await;
    fill(&browser, "#token", "admin-test-token").await;
    submit(&browser, "form").await;
    after_navigation(&browser, "dl.tiles").await;
    assert_eq!(text_of(&browser, "h1").await, "Overview");

    // A customer, then a key whose plaintext is shown once.
    browser.goto(&console("/console/customers")).await.unwrap();
    fill(&browser, "#name", "acme").await;
    submit(&browser, "form[action='/console/customers'][method='post']").await;
    assert!(after_navigation(&browser, ".notice")
        .await
        .contains("Customer acme created."));
    shoot(&browser, "02-customers").await;
    browser.goto(&console("/console/keys")).await.unwrap();
    fill(&browser, "#new-customer", "acme").await;
    fill(&browser, "#new-name", "laptop").await;
    submit(&browser, "form[action='/console/keys'][method='post']").await;
    let key = after_navigation(&browser, "#plaintext").await;
    assert!(key.starts_with("tg_"), "{key}");
    shoot(&browser, "03-new-key").await;

    // The key works; the request and its cost reach the overview.
    eventually(Duration::from_secs(2), || async {
        call(&gw, &key).await == StatusCode::OK
    })
    .await;
    let summary = eventually_json(&gw, "/v1/usage/summary?customer=acme", |s| {
        s["requests"] == 1
    })
    .await;
    browser.goto(&console("/console/")).await.unwrap();
    let top = text_of(&browser, "section[aria-labelledby='top'] table").await;
    assert!(top.contains("acme"), "{top}");
    let exact = format!("{} USD", summary["cost_usd"].as_str().unwrap());
    let titled = browser
        .find(Locator::Css(&format!("span[title='{exact}']")))
        .await;
    assert!(
        titled.is_ok(),
        "the overview shows the API's exact cost {exact}"
    );
    shoot(&browser, "04-overview").await;

    // The customer page shows the same.
    let id = summary["customer_id"].as_str().unwrap().to_owned();
    browser
        .goto(&console(&format!("/console/customers/{id}")))
        .await
        .unwrap();
    assert_eq!(text_of(&browser, "h1").await, "acme");
    assert!(browser
        .find(Locator::Css(&format!("span[title='{exact}']")))
        .await
        .is_ok());
    assert!(text_of(&browser, "section[aria-labelledby='keys']")
        .await
        .contains("laptop"));
    shoot(&browser, "05-customer").await;

    // Give the key limits of its own, then open the form again to see them.
    browser
        .goto(&console("/console/keys?customer=acme"))
        .await
        .unwrap();
    shoot(&browser, "06-keys").await;
    let summary = "details.edit-limits summary";
    browser
        .find(Locator::Css(summary))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    fill(&browser, "form.limits input[name=rate]", "10/s").await;
    fill(&browser, "form.limits input[name=monthly_requests]", "1000").await;
    fill(&browser, "form.limits input[name=monthly_cost_usd]", "25").await;
    submit(&browser, "form.limits").await;
    notice_saying(&browser, "saved: 10/s · 1,000 req/mo · 25 USD/mo").await;
    let limits = admin(&gw, Method::GET, "/v1/keys?customer=acme", None)
        .await
        .json();
    assert_eq!(limits["data"][0]["limits"]["rate"], "10/s", "{limits}");
    browser
        .find(Locator::Css(summary))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    shoot(&browser, "07-key-limits").await;
    browser
        .find(Locator::Css("form.limits button[name=clear]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser.accept_alert().await.unwrap();
    notice_saying(&browser, "cleared: only its customer's apply").await;
    assert_eq!(
        admin(&gw, Method::GET, "/v1/keys?customer=acme", None)
            .await
            .json()["data"][0]["limits"],
        serde_json::Value::Null
    );

    // Revoke it (confirming); the next call is refused.
    browser
        .find(Locator::Css("button.danger"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser.accept_alert().await.unwrap();
    notice_saying(&browser, "revoked").await;
    eventually(Duration::from_secs(1), || async {
        call(&gw, &key).await == StatusCode::UNAUTHORIZED
    })
    .await;

    // Close last month (confirming); the webhook announcing it fails once.
    receiver.fail_next(1, 500);
    let last = time::OffsetDateTime::now_utc()
        .date()
        .replace_day(1)
        .unwrap()
        .previous_day()
        .unwrap();
    let period = format!("{:04}-{:02}", last.year(), u8::from(last.month()));
    browser
        .goto(&console(&format!("/console/billing?period={period}")))
        .await
        .unwrap();
    submit(&browser, "form[action='/console/billing/close']").await;
    browser.accept_alert().await.unwrap();
    assert!(after_navigation(&browser, ".notice")
        .await
        .contains("closed"));
    shoot(&browser, "08-billing").await;
    let billing = admin(
        &gw,
        Method::GET,
        &format!("/v1/billing/summary?period={period}"),
        None,
    )
    .await;
    assert_eq!(billing.json()["closed"], true);

    // The failed delivery is listed; a retry delivers it.
    let mut listed = String::new();
    for _ in 0..100 {
        browser.goto(&console("/console/webhooks")).await.unwrap();
        listed = text_of(&browser, "main").await;
        if listed.contains("answered HTTP 500") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(listed.contains("answered HTTP 500"), "{listed}");
    assert_eq!(text_of(&browser, ".badge").await, "pending");
    shoot(&browser, "09-webhooks").await;
    submit(&browser, "table.deliveries form").await;
    notice_saying(&browser, "Delivered billing.period_closed").await;
    assert_eq!(text_of(&browser, ".badge").await, "delivered");
    shoot(&browser, "10-webhooks-retried").await;
    let accepted = receiver.wait_for(1, Duration::from_secs(5)).await.unwrap();
    assert_eq!(accepted[0].event_type, "billing.period_closed");

    // Sign out; the console is closed to this browser again.
    submit(&browser, "form.signout").await;
    after_navigation(&browser, "#token").await;
    assert!(browser
        .current_url()
        .await
        .unwrap()
        .path()
        .ends_with("/console/login"));
    browser.goto(&console("/console/keys")).await.unwrap();
    assert!(browser
        .current_url()
        .await
        .unwrap()
        .path()
        .ends_with("/console/login"));
    browser.close().await.unwrap();
    gw.stop().await;
}

/// An admin API document once `done` holds (rows reach the database within
/// a flush or two).
async fn eventually_json(
    gw: &TestGateway,
    path: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    for _ in 0..100 {
        let document = admin(gw, Method::GET, path, None).await.json();
        if done(&document) {
            return document;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{path} never got there");
}
