//! `[[reporter]]` against a local HTTP server standing in for GitHub's
//! API, which records what it is sent and fails the first attempts (500,
//! then 429 with `Retry-After`): the statuses arrive pending then success,
//! on the right commit, context and target URL; and a master killed -9
//! between a build's end and its delivery delivers it after its restart,
//! once.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchyard::store::ReportOutbox;

use common::*;

/// What the stand-in API was sent: (path, credentials or signature header,
/// body as JSON, status it answered, body as sent).
type Seen = Arc<Mutex<Vec<(String, String, serde_json::Value, u16, Vec<u8>)>>>;

/// A stand-in API on 127.0.0.1: answers each request with the next status
/// of `script`, then 201; returns its address and what it saw.
async fn stand_in(script: Arc<Mutex<Vec<u16>>>) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let app = axum::Router::new().fallback({
        let seen = seen.clone();
        move |req: axum::extract::Request| {
            let (seen, script) = (seen.clone(), script.clone());
            async move {
                let path = req.uri().path().to_string();
                let auth = [
                    "authorization",
                    "private-token",
                    "x-switchyard-signature-256",
                ]
                .iter()
                .find_map(|h| req.headers().get(*h).and_then(|v| v.to_str().ok()))
                .unwrap_or_default()
                .to_string();
                let body = axum::body::to_bytes(req.into_body(), 1 << 20)
                    .await
                    .unwrap();
                let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                let status = {
                    let mut s = script.lock().unwrap();
                    if s.is_empty() { 201 } else { s.remove(0) }
                };
                seen.lock()
                    .unwrap()
                    .push((path, auth, json, status, body.to_vec()));
                let mut r = axum::response::Response::new(axum::body::Body::from("{}"));
                *r.status_mut() = axum::http::StatusCode::from_u16(status).unwrap();
                if status == 429 {
                    r.headers_mut()
                        .insert("retry-after", axum::http::HeaderValue::from_static("1"));
                }
                r
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    (addr, seen)
}

const VIEWER: UserSpec = ("viewer", "viewer-pw", &["web"]);

/// `GET path` on a master process at `addr`: the status and the body.
async fn get(addr: &str, path: &str, authorization: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {authorization}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    within("an answer", s.read_to_end(&mut out)).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        String::from_utf8_lossy(&dechunk(body.as_bytes())).into_owned()
    } else {
        body.to_string()
    };
    (head[9..12].parse().unwrap(), body)
}

const SHA: &str = "6dcb09b5b57875f334f61aebed695e2e4193db5e";

fn reporter_toml(api: &str) -> String {
    format!(
        "\n[web]\nurl = \"https://ci.example.org/\"\n\
         \n[[reporter]]\nname = \"gh\"\nkind = \"github\"\napi_url = \"http://{api}\"\nbuilders = [\"widgets\"]\n"
    )
}

fn secrets_with_token(users: &[UserSpec<'_>]) -> String {
    secrets_text(users)
        + secrets_text(&[("w1", "w1-pw", &[])]).trim_start_matches("[verifiers]\n")
        + "\n[reporter_tokens]\ngh = \"tok-123\"\n"
}

/// The statuses the API accepted, as (state, context, target_url).
fn accepted(seen: &Seen) -> Vec<(String, String, String)> {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|(_, _, _, status, _)| *status < 300)
        .map(|(_, _, b, _, _)| {
            (
                b["state"].as_str().unwrap_or_default().to_string(),
                b["context"].as_str().unwrap_or_default().to_string(),
                b["target_url"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

async fn until_accepted(seen: &Seen, n: usize) {
    within(&format!("{n} accepted statuses"), async {
        while accepted(seen).len() < n {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// A widgets master with `users`, one step running `shell`, `extra` TOML
/// and the reporter tokens `tokens` (a `[reporter_tokens]` body), its
/// worker connected.
async fn reporting_master(
    users: &[UserSpec<'_>],
    shell: &str,
    extra: &str,
    tokens: &str,
) -> (TestMaster, Reaped) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("master.toml"),
        widgets_config(users, shell, extra),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("secrets.toml"),
        secrets_text(users)
            + secrets_text(&[("w1", "w1-pw", &[])]).trim_start_matches("[verifiers]\n")
            + "\n[reporter_tokens]\n"
            + tokens,
    )
    .unwrap();
    let m = TestMaster::start_in(dir).await;
    let w = worker(&m, "w1", "w1-pw");
    wait_connected(&m, 1).await;
    (m, w)
}

/// Pushes a change of [`SHA`] on `main` of `repository`.
async fn push_sha(m: &TestMaster, repository: &str) {
    push_change(
        m,
        switchyard::proto::Change {
            repository: repository.into(),
            branch: "main".into(),
            revision: SHA.into(),
            ..Default::default()
        },
    )
    .await;
}

#[tokio::test]
async fn statuses_arrive_in_order_through_failures() {
    let script = Arc::new(Mutex::new(vec![500, 429]));
    let (api, seen) = stand_in(script).await;
    // The step outlasts the pending status's two failed attempts.
    let (m, _w) = reporting_master(
        &[HOOK, ADMIN],
        "sleep 4",
        &reporter_toml(&api),
        "gh = \"tok-123\"\n",
    )
    .await;
    let mut events = m.master.builds().subscribe();
    push_sha(&m, "https://github.com/octo/widgets.git").await;
    let (build, result) = builds_ended(&mut events, 1).await.remove(0);
    assert_eq!(result, "success");
    until_accepted(&seen, 2).await;
    let target = format!("https://ci.example.org/builds/{build}");
    assert_eq!(
        accepted(&seen),
        [
            (
                "pending".into(),
                "switchyard/widgets".into(),
                target.clone()
            ),
            ("success".into(), "switchyard/widgets".into(), target),
        ]
    );
    let all = seen.lock().unwrap().clone();
    // The two failed attempts were the pending status, retried; success
    // was not sent before pending got through.
    let states: Vec<(&str, u16)> = all
        .iter()
        .map(|(_, _, b, s, _)| (b["state"].as_str().unwrap_or_default(), *s))
        .collect();
    assert_eq!(
        states,
        [
            ("pending", 500),
            ("pending", 429),
            ("pending", 201),
            ("success", 201)
        ]
    );
    for (path, auth, _, _, _) in &all {
        assert_eq!(path, &format!("/repos/octo/widgets/statuses/{SHA}"));
        assert_eq!(auth, "Bearer tok-123");
    }
    // Nothing is left in the outbox.
    let left: i64 = m
        .master
        .state()
        .read(|c| c.query_row("SELECT COUNT(*) FROM report_outbox", [], |r| r.get(0)))
        .await
        .unwrap();
    assert_eq!(left, 0);
    assert_eq!(
        debug_cli(&m, ADMIN.0, ADMIN.1, &["reports"]).await.unwrap(),
        "every report was delivered\n"
    );
    let status = debug_cli(&m, ADMIN.0, ADMIN.1, &["status"]).await.unwrap();
    assert!(!status.contains("undelivered"), "{status}");
    m.stop().await;
}

#[tokio::test]
async fn a_report_pending_at_a_kill_9_is_delivered_after_the_restart_once() {
    // The API is down (503) until the master has been killed.
    let script = Arc::new(Mutex::new(vec![503; 1000]));
    let (api, seen) = stand_in(script.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let users = [HOOK, VIEWER, ADMIN];
    std::fs::write(
        dir.path().join("master.toml"),
        widgets_config(&users, "true", &reporter_toml(&api))
            .replace("127.0.0.1:0", &format!("127.0.0.1:{port}")),
    )
    .unwrap();
    std::fs::write(dir.path().join("secrets.toml"), secrets_with_token(&users)).unwrap();
    let (mut master, addr) = master_process(dir.path());
    let _worker = Reaped(
        std::process::Command::new(BIN)
            .args(["worker", "--master", &addr, "--name", "w1", "--basedir"])
            .arg(dir.path().join("basedir"))
            .env("SWITCHYARD_PASSWORD", "w1-pw")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut hook = switchyard::grpc::client::ChangeSourceConnection::connect(&addr, HOOK.0, HOOK.1)
        .await
        .unwrap();
    // The worker may still be logging in: the request waits for it.
    hook.push(switchyard::proto::Change {
        repository: "https://github.com/octo/widgets.git".into(),
        branch: "main".into(),
        revision: SHA.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // The build ends (a finished build in the state database), its
    // statuses are refused meanwhile.
    let state_path = dir.path().join("state.sqlite");
    within("the build to end", async {
        loop {
            let db = switchyard::store::StateDb::open(&state_path).unwrap();
            let ended: i64 = db
                .read(|c| {
                    c.query_row(
                        "SELECT COUNT(*) FROM builds WHERE finished_ms IS NOT NULL",
                        [],
                        |r| r.get(0),
                    )
                })
                .await
                .unwrap();
            if ended == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    // Meanwhile the API and the web UI show what waits, and why.
    let viewer = basic(VIEWER.0, VIEWER.1);
    let json = within("an undelivered report", async {
        loop {
            let (status, body) = get(&addr, "/api/v1/reports", &viewer).await;
            assert_eq!(status, 200, "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            if v["undelivered"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["event"] == "finished")
            {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let r = &json["undelivered"][0];
    assert_eq!(r["reporter"], "gh");
    assert_eq!(r["builder"], "widgets");
    assert!(r["last_error"].as_str().unwrap().contains("503"), "{r}");
    let (status, page) = get(&addr, "/reports", &viewer).await;
    assert_eq!(status, 200);
    assert!(
        page.contains("HTTP 503") && page.contains("widgets #1"),
        "{page}"
    );
    // And the console.
    let out = within(
        "switchyard debug reports",
        tokio::process::Command::new(BIN)
            .args(["debug", "--master", &addr, "--user", ADMIN.0, "reports"])
            .env("SWITCHYARD_PASSWORD", ADMIN.1)
            .env("HOME", dir.path())
            .output(),
    )
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("gh widgets#1 finished") && text.contains("HTTP 503"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `debug status` counts them.
    let out = tokio::process::Command::new(BIN)
        .args(["debug", "--master", &addr, "--user", ADMIN.0, "status"])
        .env("SWITCHYARD_PASSWORD", ADMIN.1)
        .env("HOME", dir.path())
        .output();
    let out = within("switchyard debug status", out).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(" reports undelivered (`debug reports`)"),
        "{text}"
    );
    master.0.kill().unwrap();
    master.0.wait().unwrap();
    assert!(accepted(&seen).is_empty());
    script.lock().unwrap().clear();
    let (_again, _) = master_process(dir.path());
    until_accepted(&seen, 1).await;
    // Give a duplicate the chance to show.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let states: Vec<String> = accepted(&seen).into_iter().map(|(s, _, _)| s).collect();
    assert_eq!(
        states,
        ["success"],
        "the start is superseded by the end; the end once"
    );
}

#[tokio::test]
async fn gitlab_gitea_and_http_reporters_speak_their_apis() {
    use hmac::{KeyInit, Mac};
    let (api, seen) = stand_in(Arc::new(Mutex::new(Vec::new()))).await;
    let (m, _w) = reporting_master(
        &[HOOK],
        "exit 3",
        &format!(
            "\n[[reporter]]\nname = \"gl\"\nkind = \"gitlab\"\napi_url = \"http://{api}/api/v4\"\n\
             \n[[reporter]]\nname = \"gt\"\nkind = \"forgejo\"\napi_url = \"http://{api}/api/v1\"\n\
             \n[[reporter]]\nname = \"ev\"\nkind = \"http\"\nurl = \"http://{api}/events\"\nbranches = [\"main\"]\n\
             \n[[reporter]]\nname = \"ghe\"\nkind = \"github\"\napi_url = \"http://{api}/api/v3/\"\n"
        ),
        "gl = \"gl-token\"\ngt = \"gt-token\"\nev = \"event-secret\"\nghe = \"ghe-token\"\n",
    )
    .await;
    let mut events = m.master.builds().subscribe();
    push_sha(&m, "git@gitlab.example.org:group/sub/widgets.git").await;
    let (build, result) = builds_ended(&mut events, 1).await.remove(0);
    assert_eq!(result, "failure");
    // Each reporter sends the end at least; the start may be superseded.
    within("the four ends", async {
        loop {
            let n = seen
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, _, b, _, _)| {
                    b["state"] == "failed" || b["state"] == "failure" || b["event"] == "finished"
                })
                .count();
            if n == 4 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let all = seen.lock().unwrap().clone();
    let gl = all
        .iter()
        .find(|(p, _, b, _, _)| p.starts_with("/api/v4/") && b["state"] == "failed")
        .expect("GitLab's status");
    assert_eq!(
        gl.0,
        format!("/api/v4/projects/group%2Fsub%2Fwidgets/statuses/{SHA}")
    );
    assert_eq!(gl.2["name"], "switchyard/widgets");
    assert_eq!(gl.1, "gl-token");
    let gt = all
        .iter()
        .find(|(p, _, b, _, _)| p.starts_with("/api/v1/") && b["state"] == "failure")
        .expect("Gitea's status");
    assert_eq!(
        gt.0,
        format!("/api/v1/repos/group/sub/widgets/statuses/{SHA}")
    );
    assert_eq!(gt.1, "token gt-token");
    // GitHub Enterprise: the API's prefix from `api_url` (its trailing
    // slash or not).
    let ghe = all
        .iter()
        .find(|(p, _, b, _, _)| p.starts_with("/api/v3/") && b["state"] == "failure")
        .expect("GitHub Enterprise's status");
    assert_eq!(
        ghe.0,
        format!("/api/v3/repos/group/sub/widgets/statuses/{SHA}")
    );
    assert_eq!(ghe.1, "Bearer ghe-token");
    assert_eq!(ghe.2["context"], "switchyard/widgets");
    let ev = all
        .iter()
        .find(|(p, _, b, _, _)| p == "/events" && b["event"] == "finished")
        .expect("the HTTP event");
    assert_eq!(ev.2["build"]["id"], build);
    assert_eq!(ev.2["build"]["result"], "failure");
    assert_eq!(ev.2["build"]["revision"], SHA);
    // It is signed with the shared secret over the body as sent.
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"event-secret").unwrap();
    mac.update(&ev.4);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(ev.1, format!("sha256={hex}"));
    m.stop().await;
}

#[tokio::test]
async fn a_report_older_than_max_age_is_given_up_and_the_outbox_empties() {
    // The API never accepts.
    let (api, seen) = stand_in(Arc::new(Mutex::new(vec![503; 10_000]))).await;
    let (m, _w) = reporting_master(
        &[HOOK],
        "true",
        &format!(
            "\n[[reporter]]\nname = \"gh\"\nkind = \"github\"\napi_url = \"http://{api}\"\nmax_age = \"2s\"\n"
        ),
        "gh = \"tok-123\"\n",
    )
    .await;
    let mut events = m.master.builds().subscribe();
    push_sha(&m, "https://github.com/octo/widgets.git").await;
    builds_ended(&mut events, 1).await;
    let outbox = || async {
        m.master
            .state()
            .read(|c| {
                c.query_row("SELECT COUNT(*) FROM report_outbox", [], |r| {
                    r.get::<_, i64>(0)
                })
            })
            .await
            .unwrap()
    };
    within("the report to be given up", async {
        while outbox().await > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(!seen.lock().unwrap().is_empty(), "it was tried");
    assert!(accepted(&seen).is_empty());
    assert!(
        m.master
            .state()
            .undelivered_reports(10)
            .await
            .unwrap()
            .is_empty()
    );
    m.stop().await;
}

#[tokio::test]
async fn a_later_build_of_the_same_commit_waits_for_the_earlier_ones_status() {
    // The API refuses the first two attempts; meanwhile a second build of
    // the same commit ends. Its status must not arrive before the first's.
    let (api, seen) = stand_in(Arc::new(Mutex::new(vec![503, 503]))).await;
    let (m, _w) =
        reporting_master(&[HOOK], "true", &reporter_toml(&api), "gh = \"tok-123\"\n").await;
    let mut events = m.master.builds().subscribe();
    for _ in 0..2 {
        push_sha(&m, "https://github.com/octo/widgets.git").await;
    }
    let mut ended = builds_ended(&mut events, 2).await;
    ended.sort();
    until_accepted(&seen, 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let finals: Vec<String> = accepted(&seen)
        .into_iter()
        .filter(|(state, _, _)| state == "success")
        .map(|(_, _, target)| target)
        .collect();
    assert_eq!(
        finals,
        [
            format!("https://ci.example.org/builds/{}", ended[0].0),
            format!("https://ci.example.org/builds/{}", ended[1].0),
        ],
        "the earlier build's status first"
    );
    m.stop().await;
}
