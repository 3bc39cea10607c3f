//! The web UI over HTTP against a real master: pages, the browser login
//! (SCRAM through the JSON endpoints, as the page's script runs it), web
//! sessions, CSRF, escaping, Server-Sent Events; and a real Chromium
//! driving the pages (`a_real_browser_logs_in_forces_and_watches_the_log_grow`).

mod common;

use std::time::Duration;
use switchyard::store::BuildStore;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const VIEWER: UserSpec = ("viewer", "viewer-pw", &["web"]);

/// How many build requests were ever made.
async fn requests_made(m: &TestMaster) -> i64 {
    let state = m.master.state().clone();
    state
        .read(|c| c.query_row("SELECT COUNT(*) FROM build_requests", [], |r| r.get(0)))
        .await
        .unwrap()
}

#[tokio::test]
async fn the_web_login_makes_a_session_that_acts_with_csrf_and_a_reload_ends() {
    let users = [HOOK, ADMIN, VIEWER];
    let m = widgets_master(&users, "echo hi").await;

    // Anonymous: the login page, 401.
    let a = http(&m, "GET", "/", &[], "").await;
    assert_eq!(a.status, 401, "{}", a.head);
    assert!(a.body.contains("id=\"login\""), "{}", a.body);
    assert!(a.headers("content-type")[0].starts_with("text/html"));

    // A wrong password is refused (and the proof was checked, not the
    // password sent).
    let refused = web_login(&m, "viewer", "wrong").await.unwrap_err();
    assert_eq!(refused.status, 401, "{}", refused.body);
    let refused = web_login(&m, "nobody", "wrong").await.unwrap_err();
    assert_eq!(refused.status, 401, "{}", refused.body);
    // A proof for a login that was never started.
    let a = http(
        &m,
        "POST",
        "/api/v1/login/finish",
        &[("Content-Type", "application/json")],
        r#"{"login":"made-up","client_final":"c=biws,r=x,p=AAAA"}"#,
    )
    .await;
    assert_eq!(a.status, 401, "{}", a.body);
    // A user with neither `web` nor `debug` may not log in to the web.
    let refused = web_login(&m, HOOK.0, HOOK.1).await.unwrap_err();
    assert_eq!(refused.status, 403, "{}", refused.body);

    let (viewer, _) = web_login(&m, "viewer", "viewer-pw").await.unwrap();
    let a = http(&m, "GET", "/", &[("Cookie", &viewer)], "").await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(
        a.body.contains("Logged in as <strong>viewer</strong>"),
        "{}",
        a.body
    );
    // No force form for a user who may only read, and a forged post is
    // refused.
    let a = http(&m, "GET", "/builders/widgets", &[("Cookie", &viewer)], "").await;
    assert_eq!(a.status, 200);
    assert!(!a.body.contains("Force build"), "{}", a.body);
    let form = [
        ("Cookie", viewer.as_str()),
        ("Content-Type", "application/x-www-form-urlencoded"),
    ];
    let a = http(&m, "POST", "/builders/widgets/force", &form, "branch=main").await;
    assert_eq!(a.status, 403, "{}", a.body);
    let a = http(
        &m,
        "POST",
        "/api/v1/builders/widgets/force",
        &[("Cookie", &viewer)],
        "",
    )
    .await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert_eq!(requests_made(&m).await, 0);

    // An admin's session: the page has the form and the CSRF token.
    let (admin, csrf) = web_login(&m, ADMIN.0, ADMIN.1).await.unwrap();
    let a = http(&m, "GET", "/builders/widgets", &[("Cookie", &admin)], "").await;
    assert!(a.body.contains("Force build"), "{}", a.body);
    assert!(a.body.contains(&format!("name=\"csrf\" value=\"{csrf}\"")));
    let form = [
        ("Cookie", admin.as_str()),
        ("Content-Type", "application/x-www-form-urlencoded"),
    ];
    // Without its CSRF token, or with a wrong one: 403, nothing queued.
    let a = http(&m, "POST", "/builders/widgets/force", &form, "branch=main").await;
    assert_eq!(a.status, 403, "{}", a.body);
    let a = http(
        &m,
        "POST",
        "/builders/widgets/force",
        &form,
        "branch=main&csrf=wrong&submission=s1",
    )
    .await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert_eq!(requests_made(&m).await, 0);
    // With it: queued, and the same submission twice (a double click)
    // makes one request, both answered with the same page.
    let body = format!("branch=main&revision=&properties=a%3D1&csrf={csrf}&submission=s2");
    let first = http(&m, "POST", "/builders/widgets/force", &form, &body).await;
    let second = http(&m, "POST", "/builders/widgets/force", &form, &body).await;
    assert_eq!(first.status, 303, "{}", first.body);
    assert_eq!(first.headers("location"), second.headers("location"));
    assert!(first.headers("location")[0].starts_with("/builders/widgets?queued="));
    assert_eq!(requests_made(&m).await, 1);
    // Two requests at once with one submission id (a double click whose
    // second request arrives while the first acts): one more request.
    let body = format!("branch=main&csrf={csrf}&submission=s3");
    let (a, b) = tokio::join!(
        http(&m, "POST", "/builders/widgets/force", &form, &body),
        http(&m, "POST", "/builders/widgets/force", &form, &body)
    );
    assert_eq!((a.status, b.status), (303, 303), "{} {}", a.body, b.body);
    assert_eq!(a.headers("location"), b.headers("location"));
    assert_eq!(requests_made(&m).await, 2);
    // The JSON API with a session: the token goes in X-CSRF-Token.
    let a = http(
        &m,
        "POST",
        "/api/v1/builders/widgets/force",
        &[("Cookie", &admin)],
        "",
    )
    .await;
    assert_eq!(a.status, 403, "{}", a.body);
    let a = http(
        &m,
        "POST",
        "/api/v1/builders/widgets/force",
        &[("Cookie", &admin), ("X-CSRF-Token", &csrf)],
        "",
    )
    .await;
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(requests_made(&m).await, 3);

    // A reload that removes the viewer ends the viewer's session; the
    // admin's goes on.
    std::fs::write(
        m.config_path(),
        widgets_config(&[HOOK, ADMIN], "echo hi", ""),
    )
    .unwrap();
    within("a reload", m.master.reload()).await.unwrap();
    let a = http(&m, "GET", "/", &[("Cookie", &viewer)], "").await;
    assert_eq!(a.status, 401, "{}", a.body);
    let a = http(&m, "GET", "/", &[("Cookie", &admin)], "").await;
    assert_eq!(a.status, 200, "{}", a.body);
    // Logging out ends a session.
    let a = http(&m, "POST", "/api/v1/logout", &[("Cookie", &admin)], "").await;
    assert_eq!(a.status, 204);
    let a = http(&m, "GET", "/", &[("Cookie", &admin)], "").await;
    assert_eq!(a.status, 401);
    m.stop().await;
}

/// Reads a Server-Sent Events stream until `done` says it has what it
/// needs; returns what was read.
async fn read_sse(stream: &mut tokio::net::TcpStream, done: impl Fn(&str) -> bool) -> String {
    let mut got = Vec::new();
    within("server-sent events", async {
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "the stream ended: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
            if done(&String::from_utf8_lossy(&got)) {
                break;
            }
        }
    })
    .await;
    String::from_utf8_lossy(&got).into_owned()
}

async fn sse(m: &TestMaster, path: &str, auth: &str) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(m.addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nAuthorization: {auth}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    s
}

#[tokio::test]
async fn pages_escape_hostile_text_and_live_streams_deliver_events_and_output() {
    let users = [HOOK, ADMIN, VIEWER];
    // The step prints a hostile line, waits for a file, then prints more:
    // the test sees the first line live before the build can end.
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("go");
    let shell = format!(
        "echo '<img src=x onerror=alert(1)>'; printf '\\033[31mred\\033[0m\\n'; while [ ! -e {} ]; do sleep 0.05; done; echo after-gate",
        gate.display()
    );
    let m = widgets_master(&users, &shell).await;
    let auth = basic(VIEWER.0, VIEWER.1);
    let _w = worker(&m, "w1", "w1-pw");
    wait_connected(&m, 1).await;

    let mut events = sse(&m, "/api/v1/events", &auth).await;
    // The head arrives before any event.
    read_sse(&mut events, |t| t.contains("\r\n\r\n")).await;
    let change = switchyard::proto::Change {
        repository: "widgets".into(),
        branch: "main".into(),
        revision: "abc123".into(),
        author: "Mallory <script>alert('a')</script>".into(),
        comments: "fix </pre><script>alert(2)</script>".into(),
        files: vec!["src/<b>.rs".into()],
        ..Default::default()
    };
    push_change(&m, change).await;
    let seen = read_sse(&mut events, |t| t.contains("event: step_started")).await;
    assert!(seen.contains("event: build_started"), "{seen}");
    let build: i64 = {
        let data = seen
            .lines()
            .skip_while(|l| *l != "event: build_started")
            .nth(1)
            .unwrap();
        let v: serde_json::Value =
            serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(v["builder"], "widgets");
        v["build"].as_i64().unwrap()
    };

    // The step's output arrives over SSE while it runs.
    let mut log = sse(
        &m,
        &format!("/api/v1/builds/{build}/log/stream?format=html"),
        &auth,
    )
    .await;
    let live = read_sse(&mut log, |t| t.contains("red")).await;
    assert!(live.contains("text/event-stream"), "{live}");
    assert!(live.contains("event: output"), "{live}");
    assert!(
        live.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "{live}"
    );
    assert!(live.contains(r#"<span class=\"f1\">red</span>"#), "{live}");
    assert!(!live.contains("<img"), "{live}");

    // The build page while it runs: the log so far, escaped, live-ready.
    let page = http(
        &m,
        "GET",
        &format!("/builds/{build}"),
        &[("Authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("data-running=\"true\""), "{}", page.body);
    assert!(page.body.contains("&lt;img src=x onerror=alert(1)&gt;"));
    for hostile in ["<img", "<script>alert", "</pre><script>", "<b>.rs"] {
        assert!(
            !page.body.contains(hostile),
            "{hostile} unescaped in {}",
            page.body
        );
    }
    assert!(
        page.body
            .contains("Mallory &lt;script&gt;alert(&#39;a&#39;)&lt;/script&gt;")
            || page
                .body
                .contains("Mallory &lt;script&gt;alert('a')&lt;/script&gt;"),
        "{}",
        page.body
    );

    // The home page shows it running (and, below, ended: its view of a
    // builder is read again when one of its builds ends).
    let home = http(&m, "GET", "/", &[("Authorization", &auth)], "").await;
    assert!(home.body.contains("title=\"#1: running\""), "{}", home.body);
    assert!(
        home.body.contains("step <strong>step</strong>"),
        "{}",
        home.body
    );
    std::fs::write(&gate, "").unwrap();
    let rest = read_sse(&mut log, |t| t.contains("event: end")).await;
    assert!(rest.contains("after-gate"), "{rest}");
    assert!(rest.contains(r#"{"result":"success"}"#), "{rest}");
    let ended = read_sse(&mut events, |t| t.contains("event: build_ended")).await;
    assert!(ended.contains("\"result\":\"success\""), "{ended}");

    // A builder whose name is hostile HTML and URL syntax at once.
    const HOSTILE: &str = "\"><img+src=x+onerror=alert(3)>?#&'";
    std::fs::write(
        m.config_path(),
        widgets_config(&users, &shell, &one_step_builder(HOSTILE, "s", "true")),
    )
    .unwrap();
    within("a reload", m.master.reload()).await.unwrap();
    let escaped = "&quot;&gt;&lt;img+src=x+onerror=alert(3)&gt;?#&amp;";
    let home = http(&m, "GET", "/", &[("Authorization", &auth)], "").await;
    assert!(home.body.contains(escaped), "{}", home.body);
    let encoded = "/builders/%22%3E%3Cimg%2Bsrc%3Dx%2Bonerror%3Dalert%283%29%3E%3F%23%26%27";
    assert!(
        home.body.contains(&format!("href=\"{encoded}\"")),
        "{}",
        home.body
    );
    let page = http(&m, "GET", encoded, &[("Authorization", &auth)], "").await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body.contains(&format!("<h1>{escaped}")),
        "{}",
        page.body
    );

    // Every page answers, escaped; the changes page shows the build.
    for path in [
        "/",
        "/builders/widgets",
        &format!("/builds/{build}"),
        "/workers",
        "/changes",
        "/login",
    ] {
        let a = http(&m, "GET", path, &[("Authorization", &auth)], "").await;
        assert_eq!(a.status, 200, "{path}: {}", a.body);
        for hostile in ["<img", "<script>alert", "<b>.rs", "alert(3)>"] {
            assert!(!a.body.contains(hostile), "{path}: {hostile} unescaped");
        }
    }
    let changes = http(&m, "GET", "/changes", &[("Authorization", &auth)], "").await;
    assert!(
        changes.body.contains(&format!("href=\"/builds/{build}\"")),
        "{}",
        changes.body
    );
    let home = http(&m, "GET", "/", &[("Authorization", &auth)], "").await;
    assert!(home.body.contains("title=\"#1: success\""), "{}", home.body);
    assert!(home.body.contains("✔"), "results are told by an icon too");

    // Bad ids, unknown builds, static files only by name.
    let get = |p: String| {
        let (m, auth) = (&m, auth.clone());
        async move { http(m, "GET", &p, &[("Authorization", &auth)], "").await }
    };
    assert_eq!(get("/builds/abc".into()).await.status, 400);
    assert_eq!(get("/builds/99999".into()).await.status, 404);
    assert_eq!(get("/builders/nope".into()).await.status, 404);
    assert_eq!(
        get("/api/v1/builds/99999/log/stream".into()).await.status,
        404
    );
    assert_eq!(get("/static/../Cargo.toml".into()).await.status, 404);
    assert_eq!(get("/static/..%2fCargo.toml".into()).await.status, 404);
    assert_eq!(get("/static/app.css%00".into()).await.status, 404);
    let js = get("/static/app.js".into()).await;
    assert_eq!(js.status, 200);
    assert!(js.headers("cache-control")[0].contains("immutable"));
    assert!(js.body.contains("scramLogin"));
    // A huge query string is refused, and the master goes on serving.
    let huge = format!("/changes?before={}", "9".repeat(20_000));
    let mut raw = Raw::connect(m.addr).await;
    raw.write(format!("GET {huge} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await;
    let reply = String::from_utf8_lossy(&raw.read_to_close().await).into_owned();
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 4"),
        "{reply}"
    );
    assert_eq!(get("/".into()).await.status, 200);
    // "Load earlier" reads a range of a step's log as HTML.
    let a = get(format!(
        "/builds/{build}/log/html?step=0&attempt=1&start=0&end=9"
    ))
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body, "&lt;img src=");
    m.stop().await;
    drop(dir);
}

#[tokio::test]
async fn public_pages_need_no_login_but_actions_do() {
    let users = [HOOK, ADMIN];
    let m = widgets_master(&users, "echo hi").await;
    std::fs::write(
        m.config_path(),
        widgets_config(&users, "echo hi", "\n[web]\npublic = true\n"),
    )
    .unwrap();
    within("a reload", m.master.reload()).await.unwrap();
    for path in ["/", "/builders/widgets", "/workers", "/changes"] {
        let a = http(&m, "GET", path, &[], "").await;
        assert_eq!(a.status, 200, "{path}");
        assert!(a.body.contains("Log in"), "{path}");
        assert!(!a.body.contains("Force build"), "{path}");
    }
    let a = http(
        &m,
        "POST",
        "/builders/widgets/force",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        "branch=main",
    )
    .await;
    assert_eq!(a.status, 403, "{}", a.body);
    assert_eq!(requests_made(&m).await, 0);
    m.stop().await;
}

#[tokio::test]
async fn an_event_stream_outlives_the_http1_deadline_and_others_are_served() {
    // The event stream stays open past the HTTP/1 deadline (it streams),
    // and everyone else is served meanwhile.
    let m = TestMaster::start("sniff_timeout = \"300ms\"", &[VIEWER]).await;
    let auth = basic(VIEWER.0, VIEWER.1);
    let mut events = sse(&m, "/api/v1/events", &auth).await;
    read_sse(&mut events, |t| t.contains("\r\n\r\n")).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    // Still open: a reload's event arrives.
    within("a reload", m.master.reload()).await.unwrap();
    let got = read_sse(&mut events, |t| t.contains("event: reloaded")).await;
    assert!(got.contains("event: reloaded"), "{got}");
    let a = http(&m, "GET", "/healthz", &[], "").await;
    assert_eq!(a.status, 200);
    m.stop().await;
}

/// chromedriver on a free port, killed when dropped.
struct Driver {
    _child: Reaped,
    url: String,
}

/// Starts chromedriver, or says why it cannot: on CI (`CI` set) a missing
/// browser fails the test, elsewhere the test is skipped with a note.
async fn chromedriver() -> Option<Driver> {
    let present = |p: &str| std::path::Path::new(p).exists();
    if !present("/usr/bin/chromedriver") || !present("/usr/bin/chromium") {
        if std::env::var_os("CI").is_some() {
            panic!(
                "CI is set and Chromium or chromedriver is missing: install the Debian packages chromium and chromium-driver (.ci/run does)"
            );
        }
        eprintln!(
            "skipped: no /usr/bin/chromium or /usr/bin/chromedriver (apt-get install chromium chromium-driver)"
        );
        return None;
    }
    let port = free_port();
    let child = std::process::Command::new("/usr/bin/chromedriver")
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let url = format!("http://127.0.0.1:{port}");
    within("chromedriver to listen", async {
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    Some(Driver {
        _child: Reaped(child),
        url,
    })
}

/// A headless Chromium session through `driver`, with a fresh profile
/// (kept until the returned directory drops) and `extra` arguments.
async fn browser(driver: &Driver, extra: &[&str]) -> (fantoccini::Client, tempfile::TempDir) {
    let profile = tempfile::tempdir().unwrap();
    let mut args: Vec<String> = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
    ]
    .iter()
    .chain(extra)
    .map(|a| a.to_string())
    .collect();
    args.push(format!("--user-data-dir={}", profile.path().display()));
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({ "binary": "/usr/bin/chromium", "args": args }),
    );
    let c = within(
        "a browser session",
        fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&driver.url),
    )
    .await
    .expect("a WebDriver session");
    (c, profile)
}

/// Waits (bounded) until `f` is true.
async fn eventually<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + limit;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < until,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_real_browser_logs_in_forces_and_watches_the_log_grow() {
    use fantoccini::Locator;
    let Some(driver) = chromedriver().await else {
        return;
    };
    let users = [HOOK, ADMIN];
    let m = widgets_master(
        &users,
        "for i in $(seq 1 60); do echo \"line-$i \\033[32mgreen\\033[0m\"; sleep 0.1; done",
    )
    .await;
    let _w = worker(&m, "w1", "w1-pw");
    wait_connected(&m, 1).await;
    let (c, _profile) = browser(&driver, &[]).await;
    let base = format!("http://{}", m.addr);
    let step = Duration::from_secs(20);

    // Log in through the page: SCRAM runs in the browser. Without
    // WebCrypto (as over plain HTTP from another host), so the vendored
    // noble-hashes does the hashing.
    within("the login page", c.goto(&format!("{base}/login")))
        .await
        .unwrap();
    let hidden = c
        .execute(
            "Object.defineProperty(window.crypto, 'subtle', { value: undefined }); return window.crypto.subtle === undefined;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        hidden,
        serde_json::json!(true),
        "WebCrypto hidden from the page"
    );
    let log_in = || async {
        c.find(Locator::Css("input[name=user]"))
            .await
            .unwrap()
            .send_keys(ADMIN.0)
            .await
            .unwrap();
        c.find(Locator::Css("input[name=password]"))
            .await
            .unwrap()
            .send_keys(ADMIN.1)
            .await
            .unwrap();
        c.find(Locator::Css("#login button"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        eventually("the login to land on the home page", step, || async {
            c.source()
                .await
                .unwrap_or_default()
                .contains("Logged in as <strong>admin</strong>")
        })
        .await;
    };
    log_in().await;
    // Log out, and in again with WebCrypto (what a browser on localhost or
    // over HTTPS uses).
    c.find(Locator::Css("#logout"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    eventually("the logout", step, || async {
        c.source()
            .await
            .unwrap_or_default()
            .contains("href=\"/login\"")
    })
    .await;
    within("the login page", c.goto(&format!("{base}/login")))
        .await
        .unwrap();
    let webcrypto = c
        .execute("return typeof window.crypto.subtle.deriveBits;", vec![])
        .await
        .unwrap();
    assert_eq!(webcrypto, serde_json::json!("function"));
    log_in().await;

    // Force a build with a double click: one build.
    within(
        "the builder page",
        c.goto(&format!("{base}/builders/widgets")),
    )
    .await
    .unwrap();
    c.find(Locator::Css("details.force summary"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.find(Locator::Css("input[name=branch]"))
        .await
        .unwrap()
        .send_keys("main")
        .await
        .unwrap();
    c.execute(
        "const b = document.querySelector('details.force button'); b.click(); b.click();",
        vec![],
    )
    .await
    .unwrap();
    eventually("the force to be answered", step, || async {
        c.current_url()
            .await
            .map(|u| u.as_str().contains("queued="))
            .unwrap_or(false)
    })
    .await;
    let state = m.master.state().clone();
    let build = within("the build to start", async {
        loop {
            if let Some(b) = state.builds(None, 5).await.unwrap().first() {
                return b.id;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;

    // Its page while it runs: the log grows live, in colour.
    within("the build page", c.goto(&format!("{base}/builds/{build}")))
        .await
        .unwrap();
    let log_text = || async {
        c.execute(
            "return Array.from(document.querySelectorAll('#logs pre')).map(p => p.textContent).join('')",
            vec![],
        )
        .await
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
    };
    let at_load = log_text().await;
    assert!(
        !at_load.contains("line-60"),
        "the build ended before the page loaded: {at_load}"
    );
    eventually("the log to grow to its last line", step, || async {
        log_text().await.contains("line-60")
    })
    .await;
    let text = log_text().await;
    for i in 1..=60 {
        assert_eq!(
            text.matches(&format!("line-{i} ")).count(),
            1,
            "line-{i} once in {text}"
        );
    }
    let green = c.find(Locator::Css("#logs pre span.f2")).await.unwrap();
    assert_eq!(green.text().await.unwrap(), "green");
    eventually("the page to show the build's result", step, || async {
        c.find(Locator::Css("#summary .result.success"))
            .await
            .is_ok()
    })
    .await;
    let png = c.screenshot().await.unwrap();
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("build-page.png"), png).unwrap();
    c.close().await.unwrap();

    let builds = m.master.state().builds(None, 10).await.unwrap();
    assert_eq!(builds.len(), 1, "one double click, one build");
    assert_eq!(requests_made(&m).await, 1);
    m.stop().await;
}

/// The head of an answer, and its body unless it is an event stream
/// (which does not end).
async fn call(
    m: &TestMaster,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(m.addr).await.unwrap();
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let head = read_sse(&mut s, |t| t.contains("\r\n\r\n")).await;
    let head = head.split("\r\n\r\n").next().unwrap().to_string();
    (head[9..12].parse().unwrap(), head.to_ascii_lowercase())
}

#[tokio::test]
async fn every_operation_in_the_openapi_document_answers_as_documented() {
    let users = [HOOK, ADMIN];
    let m = widgets_master(&users, "echo hi").await;
    let _w = worker(&m, "w1", "w1-pw");
    wait_connected(&m, 1).await;
    let mut events = m.master.builds().subscribe();
    push(&m, "main").await;
    builds_ended(&mut events, 1).await;

    let doc = http(&m, "GET", "/api/v1/openapi.json", &[], "").await;
    assert_eq!(doc.status, 200);
    let doc = doc.json();
    assert_eq!(doc["openapi"].as_str().unwrap().chars().next(), Some('3'));
    let resolve = |v: &serde_json::Value| -> serde_json::Value {
        match v.get("$ref").and_then(|r| r.as_str()) {
            Some(r) => {
                let mut at = &doc;
                for part in r.trim_start_matches("#/").split('/') {
                    at = &at[part];
                }
                at.clone()
            }
            None => v.clone(),
        }
    };
    let admin = basic(ADMIN.0, ADMIN.1);
    let mut checked = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let mut url = path.clone();
            for p in op["parameters"].as_array().cloned().unwrap_or_default() {
                let p = resolve(&p);
                if p["in"] == "path" {
                    let example = p["example"].to_string().trim_matches('"').to_string();
                    url = url.replace(&format!("{{{}}}", p["name"].as_str().unwrap()), &example);
                }
            }
            assert!(
                !url.contains('{'),
                "{path}: a path parameter without an example"
            );
            let body = op["requestBody"]["content"]["application/json"]["example"]
                .as_object()
                .map(|o| serde_json::Value::Object(o.clone()).to_string())
                .unwrap_or_default();
            let documented = op["responses"].as_object().unwrap();
            let method = method.to_ascii_uppercase();
            let (status, head) = call(&m, &method, &url, Some(&admin), &body).await;
            let answer = documented
                .get(&status.to_string())
                .unwrap_or_else(|| panic!("{method} {url}: {status} is not documented ({head})"));
            let answer = resolve(answer);
            if let Some(content) = answer["content"].as_object() {
                let ct = content.keys().next().unwrap();
                assert!(
                    head.contains(&format!("content-type: {ct}")),
                    "{method} {url}: not {ct}: {head}"
                );
            }
            // Operations that need credentials say 401, and answer it.
            let public = op["security"].as_array().is_some_and(|s| s.is_empty());
            if !public {
                let (status, head) = call(&m, &method, &url, None, &body).await;
                assert_eq!(status, 401, "{method} {url} without credentials: {head}");
                assert!(
                    documented.contains_key("401"),
                    "{method} {url}: 401 not documented"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 15, "only {checked} operations");
    m.stop().await;
}

#[tokio::test]
async fn a_1_gib_log_is_read_by_range_without_reading_what_is_before() {
    let users = [HOOK, VIEWER];
    let m = widgets_master(&users, "true").await;
    let _w = worker(&m, "w1", "w1-pw");
    wait_connected(&m, 1).await;
    let mut events = m.master.builds().subscribe();
    push(&m, "main").await;
    let (build, _) = builds_ended(&mut events, 1).await[0];
    let row = m.master.state().build(build).await.unwrap().unwrap().steps[0].row;
    // 1 GiB of output in 1 MiB chunks, chunk i filled with letter i % 26.
    const MIB: usize = 1 << 20;
    for batch in 0..16u64 {
        let chunks = (0..64u64)
            .map(|j| {
                let i = batch * 64 + j;
                switchyard::store::LogChunk {
                    step: row,
                    seq: i + 1,
                    stream: 1,
                    data: bytes::Bytes::from(vec![b'a' + (i % 26) as u8; MIB]),
                }
            })
            .collect();
        m.master.state().append_logs(chunks).await.unwrap();
    }
    let auth = basic(VIEWER.0, VIEWER.1);
    // Across a chunk boundary deep in the log, and the very end.
    let at = 700 * MIB as u64;
    for (start, end) in [(at - 10, at + 10), ((1u64 << 30) - 5, 1u64 << 30)] {
        let a = within(
            "a range of a 1 GiB log",
            http(
                &m,
                "GET",
                &format!("/api/v1/builds/{build}/log?start={start}&end={end}"),
                &[("Authorization", &auth)],
                "",
            ),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.head);
        let want: Vec<u8> = (start..end)
            .map(|o| b'a' + ((o / MIB as u64) % 26) as u8)
            .collect();
        assert_eq!(a.body.as_bytes(), &want[..], "{start}..{end}");
    }
    // Past the end: nothing.
    let a = http(
        &m,
        "GET",
        &format!("/api/v1/builds/{build}/log?start={}", 1u64 << 31),
        &[("Authorization", &auth)],
        "",
    )
    .await;
    assert_eq!((a.status, a.body.len()), (200, 0));
    m.stop().await;
}

#[tokio::test]
async fn failed_web_logins_count_in_the_login_throttle() {
    let m = TestMaster::start("auth_max_failures = 3", &[VIEWER]).await;
    for _ in 0..3 {
        let a = web_login(&m, "viewer", "wrong").await.unwrap_err();
        assert_eq!(a.status, 401, "{}", a.body);
    }
    // The address is blocked now, for the web login as for every other.
    let a = web_login(&m, "viewer", "viewer-pw").await.unwrap_err();
    assert_eq!(a.status, 429, "{}", a.body);
    assert!(a.body.contains("retry in"), "{}", a.body);
    let a = http(
        &m,
        "GET",
        "/api/v1/builders",
        &[("Authorization", &basic("viewer", "viewer-pw"))],
        "",
    )
    .await;
    assert_eq!(a.status, 429, "{}", a.body);
    m.stop().await;
}

#[tokio::test]
async fn an_idle_web_session_ends() {
    let users = [HOOK, VIEWER];
    let m = widgets_master(&users, "true").await;
    let config = |idle: &str| {
        widgets_config(
            &users,
            "true",
            &format!("\n[web]\nsession_idle_timeout = {idle:?}\n"),
        )
    };
    std::fs::write(m.config_path(), config("0s")).unwrap();
    let err = within("a reload", m.master.reload()).await.unwrap_err();
    assert!(
        err.to_string().contains("web.session_idle_timeout"),
        "{err}"
    );
    std::fs::write(m.config_path(), config("2s")).unwrap();
    within("a reload", m.master.reload()).await.unwrap();
    let (viewer, _) = web_login(&m, VIEWER.0, VIEWER.1).await.unwrap();
    // Used well within the timeout, it lives on.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let a = http(&m, "GET", "/", &[("Cookie", &viewer)], "").await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let a = http(&m, "GET", "/", &[("Cookie", &viewer)], "").await;
    assert_eq!(a.status, 401, "{}", a.body);
    m.stop().await;
}

#[tokio::test]
async fn one_address_cannot_take_every_login_slot() {
    let m = TestMaster::start("", &[VIEWER]).await;
    // From 127.0.0.2: logins started and never finished.
    let start_from_other_address = |user: String| {
        let addr = m.addr;
        async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            let mut s = within("connect", socket.connect(addr)).await.unwrap();
            let body = serde_json::json!({ "client_first": format!("n,,n={user},r=abcdefgh") })
                .to_string();
            s.write_all(
                format!(
                    "POST /api/v1/login/start HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await
            .unwrap();
            let mut out = Vec::new();
            within("the answer", s.read_to_end(&mut out)).await.unwrap();
            String::from_utf8_lossy(&out).into_owned()
        }
    };
    for i in 0..8 {
        let reply = start_from_other_address(format!("stranger{i}")).await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    }
    let reply = start_from_other_address("stranger8".into()).await;
    assert!(reply.starts_with("HTTP/1.1 429"), "{reply}");
    assert!(reply.contains("from your address"), "{reply}");
    // Someone else logs in meanwhile.
    web_login(&m, VIEWER.0, VIEWER.1).await.unwrap();
    m.stop().await;
}

/// Inside TLS, on a master whose `[[checker]]` program judges a user the
/// secrets file does not know, a real Chromium logs in through the page
/// (which posts the password, as the form tells it to).
#[tokio::test]
async fn a_real_browser_logs_in_over_tls_through_the_command_checker() {
    use fantoccini::Locator;
    use std::os::unix::fs::PermissionsExt;
    let Some(driver) = chromedriver().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _pin) =
        switchyard::dispatcher::tls::self_signed(&["localhost".into()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), cert).unwrap();
    std::fs::write(dir.path().join("key.pem"), key).unwrap();
    let script = dir.path().join("check.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nread -r user\nread -r pw\necho \"$user\" >> \"$(dirname \"$0\")/asked\"\n\
         [ \"$user\" = dora ] && [ \"$pw\" = 'directory pass' ] && exit 0\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        dir.path().join("master.toml"),
        widgets_config_with(
            "[master.tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n",
            &[ADMIN, ("dora", "", &["web"])],
            "true",
            "\n[[checker]]\nkind = \"command\"\ncommand = [\"./check.sh\"]\n",
        ),
    )
    .unwrap();
    let secrets = secrets_text(&[ADMIN])
        + secrets_text(&[("w1", "w1-pw", &[])]).trim_start_matches("[verifiers]\n");
    std::fs::write(dir.path().join("secrets.toml"), secrets).unwrap();
    let m = TestMaster::start_in(dir).await;

    // The master's certificate is self-signed, made by this test.
    let (c, _profile) = browser(&driver, &["--ignore-certificate-errors"]).await;
    let base = format!("https://localhost:{}", m.addr.port());
    within("the login page over TLS", c.goto(&format!("{base}/login")))
        .await
        .unwrap();
    for (field, value) in [("user", "dora"), ("password", "directory pass")] {
        c.find(Locator::Css(&format!("input[name={field}]")))
            .await
            .unwrap()
            .send_keys(value)
            .await
            .unwrap();
    }
    c.find(Locator::Css("#login button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    eventually(
        "the login to land on the home page",
        Duration::from_secs(20),
        || async {
            c.source()
                .await
                .unwrap_or_default()
                .contains("Logged in as <strong>dora</strong>")
        },
    )
    .await;
    let home = c.source().await.unwrap();
    assert!(home.contains("widgets"), "{home}");
    c.close().await.unwrap();
    let asked = std::fs::read_to_string(m.dir.path().join("asked")).unwrap();
    assert_eq!(asked, "dora\n");
    m.stop().await;
}
