//! Webhooks on the port against a real master: GitHub, GitLab and Gitea
//! deliveries built from the providers' documented example payloads,
//! signed in the test; wrong and missing signatures, redelivery, both
//! content types, pings and other events, bad JSON, huge bodies, the
//! throttle, HTTP/2, and pull requests reaching only the schedulers that
//! ask for them.

mod common;

use common::*;
use hmac::{KeyInit, Mac};
use serde_json::json;
use switchyard::store::StoredChange;

const GH_SECRET: &str = "github-secret-0123456789";
const GL_SECRET: &str = "gitlab-token-0123456789";
const GT_SECRET: &str = "gitea-secret-0123456789";

fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A master with the three webhooks; `widgets` builds every change on
/// `main`, `prs` those and pull requests into `main`.
async fn hook_master(extra_master: &str) -> TestMaster {
    let dir = tempfile::tempdir().unwrap();
    let users = [ADMIN];
    std::fs::write(
        dir.path().join("master.toml"),
        config_text(extra_master, &users)
            + "\n[[worker]]\nname = \"w1\"\n"
            + &one_step_builder("widgets", "step", "true")
            + &one_step_builder("prs", "step", "true")
            + "\n[[scheduler]]\nname = \"main\"\nbuilders = [\"widgets\"]\nbranches = [\"main\"]\n\
               \n[[scheduler]]\nname = \"pulls\"\nbuilders = [\"prs\"]\nbranches = [\"main\"]\npull_requests = true\n\
               \n[[webhook]]\nname = \"gh\"\nkind = \"github\"\n\
               \n[[webhook]]\nname = \"gl\"\nkind = \"gitlab\"\nrepository_url = \"ssh\"\n\
               \n[[webhook]]\nname = \"gt\"\nkind = \"forgejo\"\n",
    )
    .unwrap();
    let secrets = secrets_text(&users)
        + secrets_text(&[("w1", "w1-pw", &[])]).trim_start_matches("[verifiers]\n")
        + &format!(
            "\n[webhook_secrets]\ngh = {GH_SECRET:?}\ngl = {GL_SECRET:?}\ngt = {GT_SECRET:?}\n"
        );
    std::fs::write(dir.path().join("secrets.toml"), secrets).unwrap();
    TestMaster::start_in(dir).await
}

async fn changes(m: &TestMaster) -> Vec<StoredChange> {
    let mut c: Vec<StoredChange> = m
        .master
        .state()
        .recent_changes(None, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|(c, _)| c)
        .collect();
    c.reverse();
    c
}

/// (builder, branch, revision) of every build request, oldest first.
async fn requests(m: &TestMaster) -> Vec<(String, String, String)> {
    m.master
        .state()
        .read(|c| {
            let mut s =
                c.prepare("SELECT builder, branch, revision FROM build_requests ORDER BY id")?;
            let rows = s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect()
        })
        .await
        .unwrap()
}

/// GitHub's documented push example, trimmed to what a change uses.
fn github_push() -> serde_json::Value {
    json!({
        "ref": "refs/heads/main",
        "before": "17c497ccc7cca9c2f735aa07e9e3813060ce9a6a",
        "after": "1481a2de7b2a7d02428ad93446ab166be7793fbb",
        "created": false, "deleted": false, "forced": false,
        "commits": [
            {
                "id": "c441029cf673f84c8b7db52d0a5944ee5c52ff89",
                "distinct": true,
                "message": "Test",
                "timestamp": "2013-02-22T13:50:07-08:00",
                "url": "https://github.com/octokitty/testing/commit/c441029cf673f84c8b7db52d0a5944ee5c52ff89",
                "author": { "name": "Garen Torikian", "email": "lolwut@noway.biz", "username": "octokitty" },
                "committer": { "name": "Garen Torikian", "email": "lolwut@noway.biz", "username": "octokitty" },
                "added": [], "removed": [], "modified": ["README.md"]
            },
            {
                "id": "1481a2de7b2a7d02428ad93446ab166be7793fbb",
                "distinct": true,
                "message": "Rename madame-bovary.txt to words/madame-bovary.txt",
                "timestamp": "2013-03-12T08:14:29-07:00",
                "author": { "name": "Garen Torikian", "email": "lolwut@noway.biz", "username": "octokitty" },
                "added": ["words/madame-bovary.txt"], "removed": ["madame-bovary.txt"], "modified": []
            }
        ],
        "head_commit": {
            "id": "1481a2de7b2a7d02428ad93446ab166be7793fbb",
            "message": "Rename madame-bovary.txt to words/madame-bovary.txt",
            "timestamp": "2013-03-12T08:14:29-07:00",
            "author": { "name": "Garen Torikian", "email": "lolwut@noway.biz", "username": "octokitty" },
            "added": ["words/madame-bovary.txt"], "removed": ["madame-bovary.txt"], "modified": []
        },
        "repository": {
            "name": "testing",
            "full_name": "octokitty/testing",
            "html_url": "https://github.com/octokitty/testing",
            "clone_url": "https://github.com/octokitty/testing.git",
            "ssh_url": "git@github.com:octokitty/testing.git"
        },
        "pusher": { "name": "Garen Torikian", "email": "lolwut@noway.biz" }
    })
}

async fn deliver(
    m: &TestMaster,
    hook: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, serde_json::Value) {
    let a = http(m, "POST", &format!("/hooks/{hook}"), headers, body).await;
    let v = serde_json::from_str(&a.body).unwrap_or(serde_json::Value::Null);
    (a.status, v)
}

async fn github(
    m: &TestMaster,
    event: &str,
    delivery: &str,
    payload: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let body = payload.to_string();
    let sig = format!("sha256={}", sign(GH_SECRET, body.as_bytes()));
    deliver(
        m,
        "gh",
        &[
            ("Content-Type", "application/json"),
            ("X-GitHub-Event", event),
            ("X-GitHub-Delivery", delivery),
            ("X-Hub-Signature-256", &sig),
        ],
        &body,
    )
    .await
}

#[tokio::test]
async fn github_pushes_tags_and_pull_requests_become_changes_once() {
    let m = hook_master("").await;
    // A push: one change per commit, stored before the answer.
    let (status, answer) = github(&m, "push", "d-1", &github_push()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["changes"].as_array().unwrap().len(), 2, "{answer}");
    let stored = changes(&m).await;
    assert_eq!(stored.len(), 2);
    let first = &stored[0].change;
    assert_eq!(first.repository, "https://github.com/octokitty/testing.git");
    assert_eq!(first.project, "octokitty/testing");
    assert_eq!(first.branch, "main");
    assert_eq!(first.revision, "c441029cf673f84c8b7db52d0a5944ee5c52ff89");
    assert_eq!(first.author, "Garen Torikian <lolwut@noway.biz>");
    assert_eq!(first.comments, "Test");
    assert_eq!(first.files, ["README.md"]);
    assert_eq!(first.when, Some((1361569807, 0)));
    assert_eq!(
        stored[1].change.files,
        ["words/madame-bovary.txt", "madame-bovary.txt"]
    );
    assert_eq!(
        requests(&m).await.len(),
        4,
        "each commit, by widgets and by prs"
    );

    // The same delivery again: nothing twice.
    let (status, again) = github(&m, "push", "d-1", &github_push()).await;
    assert_eq!(status, 200);
    assert_eq!(again["redelivery"], true);
    assert_eq!(again["changes"], answer["changes"]);
    assert_eq!(changes(&m).await.len(), 2);
    assert_eq!(requests(&m).await.len(), 4);

    // GitHub's form encoding carries the same JSON in `payload=`.
    let mut push = github_push();
    push["commits"].as_array_mut().unwrap().truncate(1);
    let form = serde_urlencoded::to_string([("payload", push.to_string())]).unwrap();
    let sig = format!("sha256={}", sign(GH_SECRET, form.as_bytes()));
    let (status, answer) = deliver(
        &m,
        "gh",
        &[
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("X-GitHub-Event", "push"),
            ("X-GitHub-Delivery", "d-form"),
            ("X-Hub-Signature-256", &sig),
        ],
        &form,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(changes(&m).await.len(), 3);

    // A tag: one change with its `tag`; a deleted branch: none.
    let mut tag = github_push();
    tag["ref"] = json!("refs/tags/v1.0");
    tag["commits"] = json!([]);
    let (status, _) = github(&m, "push", "d-tag", &tag).await;
    assert_eq!(status, 200);
    let tagged = changes(&m).await.pop().unwrap().change;
    assert_eq!(
        tagged.properties.get("tag").map(String::as_str),
        Some("v1.0")
    );
    assert_eq!(tagged.revision, "1481a2de7b2a7d02428ad93446ab166be7793fbb");
    assert_eq!(tagged.category, "tag");
    let mut deleted = github_push();
    deleted["deleted"] = json!(true);
    deleted["after"] = json!("0000000000000000000000000000000000000000");
    deleted["commits"] = json!([]);
    deleted["head_commit"] = json!(null);
    let (status, _) = github(&m, "push", "d-del", &deleted).await;
    assert_eq!(status, 200);
    assert_eq!(changes(&m).await.len(), 4);

    // A pull request into main: a change on its head, built by `prs` only
    // (its scheduler asks for pull requests).
    let before = requests(&m).await.len();
    let pr = json!({
        "action": "opened",
        "number": 1347,
        "pull_request": {
            "number": 1347,
            "title": "Amazing new feature",
            "body": "Please pull these awesome changes in!",
            "user": { "login": "octocat" },
            "head": {
                "ref": "new-topic",
                "sha": "6dcb09b5b57875f334f61aebed695e2e4193db5e",
                "repo": { "clone_url": "https://github.com/octocat/Hello-World.git", "html_url": "https://github.com/octocat/Hello-World", "ssh_url": "git@github.com:octocat/Hello-World.git" }
            },
            "base": {
                "ref": "main",
                "sha": "6dcb09b5b57875f334f61aebed695e2e4193db5e",
                "repo": { "clone_url": "https://github.com/octokitty/testing.git", "html_url": "https://github.com/octokitty/testing", "ssh_url": "git@github.com:octokitty/testing.git" }
            }
        },
        "repository": { "clone_url": "https://github.com/octokitty/testing.git" }
    });
    let (status, answer) = github(&m, "pull_request", "d-pr", &pr).await;
    assert_eq!(status, 200, "{answer}");
    let c = changes(&m).await.pop().unwrap().change;
    assert_eq!(c.revision, "6dcb09b5b57875f334f61aebed695e2e4193db5e");
    assert_eq!(c.branch, "new-topic");
    assert_eq!(c.repository, "https://github.com/octokitty/testing.git");
    assert_eq!(c.properties["pr_number"], "1347");
    assert_eq!(c.properties["pr_base"], "main");
    assert_eq!(
        c.properties["pr_head_repository"],
        "https://github.com/octocat/Hello-World.git"
    );
    let made = requests(&m).await;
    assert_eq!(
        made[before..],
        [(
            "prs".to_string(),
            "new-topic".to_string(),
            "6dcb09b5b57875f334f61aebed695e2e4193db5e".to_string()
        )]
    );
    // A closed pull request, a ping, another event.
    let mut closed = pr.clone();
    closed["action"] = json!("closed");
    assert_eq!(github(&m, "pull_request", "d-c", &closed).await.0, 202);
    let (status, answer) = github(
        &m,
        "ping",
        "d-ping",
        &json!({"zen": "Keep it logically awesome."}),
    )
    .await;
    assert_eq!((status, answer["event"].as_str()), (200, Some("ping")));
    assert_eq!(
        github(&m, "issues", "d-i", &json!({"action": "opened"}))
            .await
            .0,
        202
    );
    assert_eq!(changes(&m).await.len(), 5);
    m.stop().await;
}

#[tokio::test]
async fn unsigned_wrong_oversized_or_malformed_deliveries_make_nothing() {
    let m = hook_master("auth_max_failures = 3\nauth_block = \"1h\"").await;
    let body = github_push().to_string();
    let good = format!("sha256={}", sign(GH_SECRET, body.as_bytes()));
    let wrong = format!(
        "sha256={}",
        sign("another-secret-entirely", body.as_bytes())
    );
    // An unknown hook, bad JSON (signed), a body over 25 MB.
    assert_eq!(deliver(&m, "nope", &[], "{}").await.0, 404);
    let bad = "{\"ref\": ";
    let sig = format!("sha256={}", sign(GH_SECRET, bad.as_bytes()));
    let (status, answer) = deliver(
        &m,
        "gh",
        &[("X-GitHub-Event", "push"), ("X-Hub-Signature-256", &sig)],
        bad,
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("not JSON"));
    let mut raw = Raw::connect(m.addr).await;
    raw.write(
        b"POST /hooks/gh HTTP/1.1\r\nHost: x\r\nX-GitHub-Event: push\r\nContent-Length: 26214401\r\n\r\n{",
    )
    .await;
    let reply = String::from_utf8_lossy(&raw.read_to_close().await).into_owned();
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    // The same without a length (chunked): cut at the limit.
    let mut raw = Raw::connect(m.addr).await;
    raw.write(b"POST /hooks/gh HTTP/1.1\r\nHost: x\r\nX-GitHub-Event: push\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await;
    let (mut read, mut write) = raw.stream.into_split();
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..30 {
            let head = format!("{:x}\r\n", chunk.len());
            if write.write_all(head.as_bytes()).await.is_err()
                || write.write_all(&chunk).await.is_err()
                || write.write_all(b"\r\n").await.is_err()
            {
                return;
            }
        }
    });
    let mut reply = Vec::new();
    let _ = within("the answer to a chunked flood", async {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 4096];
        while !reply.windows(4).any(|w| w == b"\r\n\r\n") {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => reply.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    writer.abort();
    let reply = String::from_utf8_lossy(&reply).into_owned();
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    for headers in [
        vec![("X-GitHub-Event", "push")],
        vec![
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", wrong.as_str()),
        ],
        vec![
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", "sha256="),
        ],
    ] {
        let (status, answer) = deliver(&m, "gh", &headers, &body).await;
        assert_eq!(status, 401);
        assert_eq!(answer, json!({"error": "unauthorized"}), "no detail");
    }
    // A wrong GitLab token: the same.
    let (status, _) = deliver(
        &m,
        "gl",
        &[("X-Gitlab-Event", "Push Hook"), ("X-Gitlab-Token", "nope")],
        "{}",
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(changes(&m).await.len(), 0);
    // Three bad deliveries to `gh` from this address: it is refused here
    // for a while, the right signature too.
    let (status, _) = deliver(
        &m,
        "gh",
        &[
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", good.as_str()),
        ],
        &body,
    )
    .await;
    assert_eq!(status, 429);
    assert_eq!(changes(&m).await.len(), 0);
    m.stop().await;
}

#[tokio::test]
async fn gitlab_and_gitea_deliveries_become_changes() {
    let m = hook_master("").await;
    // GitLab's documented push example (trimmed), its token, SSH URLs as
    // configured.
    let push = json!({
        "object_kind": "push",
        "before": "95790bf891e76fee5e1747ab589903a6a1f80f22",
        "after": "da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
        "ref": "refs/heads/main",
        "checkout_sha": "da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
        "user_name": "John Smith",
        "user_email": "john@example.com",
        "project": {
            "path_with_namespace": "mike/diaspora",
            "web_url": "http://example.com/mike/diaspora",
            "git_ssh_url": "git@example.com:mike/diaspora.git",
            "git_http_url": "http://example.com/mike/diaspora.git"
        },
        "commits": [{
            "id": "da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
            "message": "fixed readme",
            "timestamp": "2012-01-03T23:36:29+02:00",
            "author": { "name": "GitLab dev user", "email": "gitlabdev@dv6700.(none)" },
            "added": ["CHANGELOG"], "modified": ["app/controller/application.rb"], "removed": []
        }],
        "total_commits_count": 1
    });
    let (status, answer) = deliver(
        &m,
        "gl",
        &[
            ("Content-Type", "application/json"),
            ("X-Gitlab-Event", "Push Hook"),
            ("X-Gitlab-Token", GL_SECRET),
            (
                "X-Gitlab-Event-UUID",
                "13792a34-cac6-4fda-95a8-c58e00a3954e",
            ),
        ],
        &push.to_string(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let c = changes(&m).await.pop().unwrap().change;
    assert_eq!(c.repository, "git@example.com:mike/diaspora.git");
    assert_eq!(c.project, "mike/diaspora");
    assert_eq!(c.branch, "main");
    assert_eq!(c.files, ["CHANGELOG", "app/controller/application.rb"]);
    assert_eq!(c.author, "GitLab dev user <gitlabdev@dv6700.(none)>");
    // A merge request opened.
    let mr = json!({
        "object_kind": "merge_request",
        "user": { "name": "Administrator", "username": "root" },
        "project": { "git_ssh_url": "git@example.com:mike/diaspora.git" },
        "object_attributes": {
            "iid": 1, "action": "open", "title": "MS-Viewport",
            "source_branch": "ms-viewport", "target_branch": "master",
            "source": { "git_ssh_url": "git@example.com:awesome_space/awesome_project.git" },
            "target": { "git_ssh_url": "git@example.com:mike/diaspora.git" },
            "last_commit": { "id": "da1560886d4f094c3e6c9ef40349f7d38b5d27d7", "message": "fixed readme" }
        }
    });
    let (status, _) = deliver(
        &m,
        "gl",
        &[
            ("X-Gitlab-Event", "Merge Request Hook"),
            ("X-Gitlab-Token", GL_SECRET),
        ],
        &mr.to_string(),
    )
    .await;
    assert_eq!(status, 200);
    let c = changes(&m).await.pop().unwrap().change;
    assert_eq!(c.properties["pr_number"], "1");
    assert_eq!(c.properties["pr_base"], "master");
    assert_eq!(
        c.properties["pr_head_repository"],
        "git@example.com:awesome_space/awesome_project.git"
    );
    // An update that changed only the title makes nothing.
    let mut retitled = mr.clone();
    retitled["object_attributes"]["action"] = json!("update");
    let (status, _) = deliver(
        &m,
        "gl",
        &[
            ("X-Gitlab-Event", "Merge Request Hook"),
            ("X-Gitlab-Token", GL_SECRET),
        ],
        &retitled.to_string(),
    )
    .await;
    assert_eq!(status, 202);

    // Gitea (here as Forgejo): the GitHub-like payload, its own signature.
    let mut push = github_push();
    push["commits"].as_array_mut().unwrap().truncate(1);
    let body = push.to_string();
    let (status, answer) = deliver(
        &m,
        "gt",
        &[
            ("X-Gitea-Event", "push"),
            ("X-Gitea-Delivery", "g-1"),
            ("X-Gitea-Signature", &sign(GT_SECRET, body.as_bytes())),
        ],
        &body,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(changes(&m).await.len(), 3);
    // GitHub's signature scheme under Gitea's hook name does not pass.
    let (status, _) = deliver(
        &m,
        "gt",
        &[
            ("X-Gitea-Event", "push"),
            ("X-Gitea-Signature", &sign(GH_SECRET, body.as_bytes())),
        ],
        &body,
    )
    .await;
    assert_eq!(status, 401);
    m.stop().await;
}

#[tokio::test]
async fn a_delivery_over_http2_is_served_like_one_over_http1() {
    use http_body_util::BodyExt;
    let m = hook_master("").await;
    let body = github_push().to_string();
    let sig = format!("sha256={}", sign(GH_SECRET, body.as_bytes()));
    let tcp = tokio::net::TcpStream::connect(m.addr).await.unwrap();
    let (mut sender, conn) = within(
        "an HTTP/2 handshake",
        hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        ),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let request = http::Request::post(format!("http://{}/hooks/gh", m.addr))
        .header("content-type", "application/json")
        .header("x-github-event", "push")
        .header("x-github-delivery", "h2-1")
        .header("x-hub-signature-256", sig)
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let response = within("an HTTP/2 answer", sender.send_request(request))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer = within("the body", response.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(answer["changes"].as_array().unwrap().len(), 2);
    assert_eq!(changes(&m).await.len(), 2);
    m.stop().await;
}
