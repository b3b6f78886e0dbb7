//! The usage spool on a disk that fills up, for real: the spool directory
//! is a small tmpfs, so appends fail with ENOSPC as they would on a full
//! disk. With the database down as well the gateway answers 503
//! `metering_unavailable`; it serves again, by itself, as soon as the disk
//! has room or the database answers, and every row of a request that got
//! its 200 reaches the database exactly once, or, at a stop that could save
//! it nowhere, is counted and logged as lost.
//!
//! Mounting a tmpfs takes root (CI runs as root). Elsewhere these tests
//! fail, saying so, unless `TOLLGATE_TEST_SKIP_TMPFS=1` skips them.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use http_body_util::Full;
use tollgate_store::testing::{Backend, TestGuard};

/// A tmpfs of its own, unmounted (and its directory removed) on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it), or `None`
    /// when the tests are told to skip for want of one.
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        let mounted = matches!(&output, Ok(output) if output.status.success());
        if mounted {
            return Some(Tmpfs { dir });
        }
        if std::env::var_os("TOLLGATE_TEST_SKIP_TMPFS").is_some() {
            eprintln!("skipped: cannot mount a tmpfs ({output:?})");
            return None;
        }
        panic!(
            "these tests mount a small tmpfs to fill a disk for real, which takes root: \
             {output:?}; set TOLLGATE_TEST_SKIP_TMPFS=1 to skip them"
        );
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file that takes every byte the tmpfs has left.
    fn fill(&self) -> PathBuf {
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = [0x5a_u8; 4096];
        loop {
            if let Err(error) = file.write_all(&chunk).and_then(|()| file.flush()) {
                assert_eq!(error.raw_os_error(), Some(28), "ENOSPC: {error}");
                return path;
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn toml(db_url: &str, spool: &Path, upstream: &str, listen: &str, admin: &str) -> String {
    format!(
        r#"
[server]
listen = "{listen}"
admin_listen = "{admin}"

[database]
url = "{db_url}"

[usage]
spool_dir = "{spool}"
flush_interval = "20ms"

[[tiers]]
name = "test"

[[routes]]
name = "openai"
prefix = "/v1/"
upstream = "{upstream}"
usage = "openai"
"#,
        spool = spool.display(),
    )
}

/// A gateway in-process on a database behind a [`CutProxy`], its spool on
/// a tmpfs of `size`; `None` when tmpfs tests are skipped.
struct Faulty {
    db: TestGuard,
    proxy: CutProxy,
    _mock: MockUpstream,
    tmpfs: Tmpfs,
    gateway: TestGateway,
}

impl Faulty {
    async fn start(size: &str) -> Option<Faulty> {
        let tmpfs = Tmpfs::mount(size)?;
        let db = TestGuard::create(Backend::Postgres).await;
        let (proxy, through) = CutProxy::for_postgres(db.url()).await;
        let mock = MockUpstream::start().await.unwrap();
        let toml = toml(
            &through,
            &tmpfs.path().join("spool"),
            &mock.url(),
            "127.0.0.1:0",
            "127.0.0.1:0",
        );
        let gateway = TestGateway::start_on(config(&toml), None).await;
        Some(Faulty {
            db,
            proxy,
            _mock: mock,
            tmpfs,
            gateway,
        })
    }

    fn key(&self) -> String {
        self.gateway.key.clone().unwrap()
    }

    fn stats(&self) -> std::sync::Arc<tollgate_metering::usage::recorder::RecorderStats> {
        self.gateway
            .running
            .as_ref()
            .unwrap()
            .metering()
            .recorder
            .stats()
            .clone()
    }
}

/// One metered request with `x-request-id: id`: 200, or 503
/// `metering_unavailable` (anything else fails the test).
async fn call(addr: std::net::SocketAddr, key: &str, id: &str) -> StatusCode {
    let request = authorized(
        Method::POST,
        format!("http://{addr}/v1/chat/completions"),
        Some(key),
    )
    .header("content-type", "application/json")
    .header("x-request-id", id)
    .body(Full::new(Bytes::from(
        r#"{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a b"}]}"#,
    )))
    .unwrap();
    let reply = send(&client(), request).await;
    match reply.status {
        StatusCode::OK => {}
        StatusCode::SERVICE_UNAVAILABLE => {
            assert_eq!(reply.error_type(), "metering_unavailable");
        }
        other => panic!("unexpected {other}: {:?}", reply.body),
    }
    reply.status
}

/// Requests, one at a time, until one gets 503; returns the ids of those
/// served (which all owe a row).
async fn serve_until_refused(addr: std::net::SocketAddr, key: &str, tag: &str) -> Vec<String> {
    let mut served = Vec::new();
    for i in 0..5000 {
        let id = format!("{tag}-{i}");
        if call(addr, key, &id).await == StatusCode::SERVICE_UNAVAILABLE {
            return served;
        }
        served.push(id);
    }
    panic!("never refused after {} requests", served.len());
}

/// Requests every 20 ms until one is served; returns how long that took
/// and the id served.
async fn until_served(
    addr: std::net::SocketAddr,
    key: &str,
    tag: &str,
    within: Duration,
) -> (Duration, String) {
    let started = Instant::now();
    for i in 0.. {
        let id = format!("{tag}-{i}");
        if call(addr, key, &id).await == StatusCode::OK {
            return (started.elapsed(), id);
        }
        assert!(
            started.elapsed() < within,
            "still refused {within:?} after the fix"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    unreachable!()
}

/// How many rows each `client_request_id` has in `usage_events`.
async fn rows_by_request(url: &str) -> HashMap<String, i64> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .query(
            "SELECT client_request_id, count(*) FROM usage_events GROUP BY client_request_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get::<_, String>(0), row.get::<_, i64>(1)))
        .collect()
}

/// Waits until `usage_events` holds exactly one row for each of `served`
/// and none for anything else.
async fn assert_exactly_once(url: &str, served: &[String]) {
    let expected: HashMap<String, i64> = served.iter().map(|id| (id.clone(), 1)).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = rows_by_request(url).await;
        if rows == expected {
            return;
        }
        let missing = expected.keys().filter(|id| !rows.contains_key(*id)).count();
        let extra: Vec<_> = rows
            .iter()
            .filter(|(id, count)| **count != 1 || !expected.contains_key(*id))
            .collect();
        assert!(extra.is_empty(), "rows doubled or unowed: {extra:?}");
        assert!(
            Instant::now() < deadline,
            "{missing} of {} rows never arrived",
            served.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Serves a few requests with everything up (so the spool has a
/// checkpoint file, as any running gateway does), then takes the database
/// away and fills the disk: the requests served until the first 503 owe
/// their rows, some of them held in memory only.
async fn outage(f: &Faulty, fill: bool) -> (Vec<String>, Option<PathBuf>) {
    let key = f.key();
    let mut served = Vec::new();
    for i in 0..3 {
        let id = format!("before-{i}");
        assert_eq!(call(f.gateway.addr, &key, &id).await, StatusCode::OK);
        served.push(id);
    }
    assert_exactly_once(f.db.url(), &served).await;
    f.proxy.cut();
    let filler = fill.then(|| f.tmpfs.fill());
    served.extend(serve_until_refused(f.gateway.addr, &key, "during").await);
    // It stays refused while neither the disk nor the database takes rows.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        call(f.gateway.addr, &key, "refused").await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    (served, filler)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_and_the_database_back_serve_again_and_every_row_arrives_once() {
    let Some(f) = Faulty::start("256k").await else {
        return;
    };
    let key = f.key();
    let (mut served, filler) = outage(&f, true).await;

    std::fs::remove_file(filler.unwrap()).unwrap();
    f.proxy.restore();
    let (took, id) = until_served(f.gateway.addr, &key, "after", Duration::from_secs(5)).await;
    eprintln!("serving again {took:?} after the disk had room and the database answered");
    served.push(id);
    for i in 0..20 {
        let id = format!("later-{i}");
        assert_eq!(call(f.gateway.addr, &key, &id).await, StatusCode::OK);
        served.push(id);
    }
    assert_exactly_once(f.db.url(), &served).await;
    f.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_the_spool_filled_serves_again_once_the_database_answers() {
    // No filler: the spool fills the disk by itself during the outage, and
    // the database coming back is the only fix.
    let Some(f) = Faulty::start("64k").await else {
        return;
    };
    let key = f.key();
    let stats = f.stats();
    let (mut served, _) = outage(&f, false).await;
    assert!(served.len() > 100, "the spool held {} rows", served.len());

    f.proxy.restore();
    let (took, id) = until_served(f.gateway.addr, &key, "after", Duration::from_secs(5)).await;
    eprintln!("serving again {took:?} after the database answered, the disk still full");
    served.push(id);
    // Rows go to the database directly until the spool, drained, gives its
    // space back; then it takes them again.
    let spooled = stats.rows_spooled.load(Ordering::Relaxed);
    let started = Instant::now();
    for i in 0.. {
        let id = format!("later-{i}");
        assert_eq!(call(f.gateway.addr, &key, &id).await, StatusCode::OK);
        served.push(id);
        if stats.rows_spooled.load(Ordering::Relaxed) > spooled + 20 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the spool takes rows again"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!("the spool took rows again {:?} later", started.elapsed());
    assert_exactly_once(f.db.url(), &served).await;
    assert_eq!(stats.rows_lost.load(Ordering::Relaxed), 0);
    f.gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_on_a_full_disk_writes_held_rows_to_the_database() {
    let Some(mut f) = Faulty::start("256k").await else {
        return;
    };
    let stats = f.stats();
    let (served, _filler) = outage(&f, true).await;
    // The database answers again and the stop begins at once, the disk
    // still full: the rows held in memory go to the database directly.
    f.proxy.restore();
    let running = f.gateway.running.take().unwrap();
    let started = Instant::now();
    tokio::time::timeout(
        Duration::from_secs(10),
        running.stop_within(Duration::from_secs(5)),
    )
    .await
    .expect("the stop finishes");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(stats.rows_lost.load(Ordering::Relaxed), 0);
    assert_exactly_once(f.db.url(), &served).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_a_full_disk_with_the_database_down_ends_in_time_and_counts_the_lost_rows() {
    let Some(tmpfs) = Tmpfs::mount("256k") else {
        return;
    };
    let db = TestGuard::create(Backend::Postgres).await;
    let (proxy, through) = CutProxy::for_postgres(db.url()).await;
    let mock = MockUpstream::start().await.unwrap();
    let spool = tmpfs.path().join("spool");
    let gateway = Process::serve(&toml(&through, &spool, &mock.url(), "LISTEN", "ADMIN"));
    let key = gateway.key.clone().unwrap();

    let mut served = Vec::new();
    for i in 0..3 {
        let id = format!("before-{i}");
        assert_eq!(call(gateway.addr, &key, &id).await, StatusCode::OK);
        served.push(id);
    }
    assert_exactly_once(db.url(), &served).await;
    proxy.cut();
    let filler = tmpfs.fill();
    served.extend(serve_until_refused(gateway.addr, &key, "during").await);

    let grace = tollgate_metering::usage::recorder::SHUTDOWN_GRACE;
    let started = Instant::now();
    gateway.signal("TERM");
    let mut gateway = gateway;
    let status = loop {
        if let Some(status) = gateway.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < grace + Duration::from_secs(5),
            "still running {:?} after SIGTERM",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let took = started.elapsed();
    assert!(status.success(), "{status:?}");
    let lost_lines: Vec<serde_json::Value> = gateway
        .logs()
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| {
            line["message"]
                .as_str()
                .is_some_and(|message| message.contains("they are lost"))
        })
        .collect();
    assert_eq!(lost_lines.len(), 1, "{:?}", gateway.logs());
    assert_eq!(lost_lines[0]["level"], "ERROR");
    let lost = lost_lines[0]["rows"].as_u64().unwrap();
    assert!(lost > 0);
    eprintln!("stopped {took:?} after SIGTERM, {lost} rows lost");

    // Everything else was in the spool: a restart with room and the
    // database replays it, and only the lost rows are missing.
    std::fs::remove_file(filler).unwrap();
    proxy.restore();
    let gateway = gateway.kill_and_restart("info");
    let rows = rows_by_request(db.url()).await;
    assert!(rows.values().all(|count| *count == 1), "{rows:?}");
    assert!(rows.keys().all(|id| served.contains(id)), "{rows:?}");
    assert_eq!(rows.len() as u64 + lost, served.len() as u64);
    drop(gateway);
}
