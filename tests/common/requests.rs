//! HTTP helpers: a master with one builder, raw HTTP/1.1 requests.

use base64::Engine;

use super::*;

/// The config of a master with `users`, a worker `w1` and one builder
/// `widgets` of one step running `shell`, built on every change; `extra`
/// appended.
pub fn widgets_config(users: &[UserSpec<'_>], shell: &str, extra: &str) -> String {
    widgets_config_with("", users, shell, extra)
}

/// [`widgets_config`] with more `[master]` settings (or tables under it).
pub fn widgets_config_with(
    extra_master: &str,
    users: &[UserSpec<'_>],
    shell: &str,
    extra: &str,
) -> String {
    config_text(
        &format!("heartbeat_interval = \"1s\"\n{extra_master}"),
        users,
    ) + "\n[[worker]]\nname = \"w1\"\n"
        + &one_step_builder("widgets", "step", shell)
        + "\n[[scheduler]]\nname = \"all\"\nbuilders = [\"widgets\"]\n"
        + extra
}

/// A master on [`widgets_config`] (no extra).
pub async fn widgets_master(users: &[UserSpec<'_>], shell: &str) -> TestMaster {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("master.toml"),
        widgets_config(users, shell, ""),
    )
    .unwrap();
    let secrets = secrets_text(users)
        + secrets_text(&[("w1", "w1-pw", &[])]).trim_start_matches("[verifiers]\n");
    std::fs::write(dir.path().join("secrets.toml"), secrets).unwrap();
    TestMaster::start_in(dir).await
}

/// `GET /metrics` with `authorization` (if any) over HTTP/1.1; the status
/// line and the body.
pub async fn get_metrics(m: &TestMaster, authorization: Option<&str>) -> (String, String) {
    http_get(m, "/metrics", authorization).await
}

/// `GET path` with `authorization` (if any) over HTTP/1.1; the head and
/// the body.
pub async fn http_get(m: &TestMaster, path: &str, authorization: Option<&str>) -> (String, String) {
    let mut raw = Raw::connect(m.addr).await;
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    raw.write(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n").as_bytes())
        .await;
    let reply = String::from_utf8(raw.read_to_close().await).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

pub fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// `GET path` of the JSON API as `authorization`: the status and the JSON.
pub async fn api_get(
    m: &TestMaster,
    path: String,
    authorization: String,
) -> (u16, serde_json::Value) {
    let (head, body) = http_get(m, &path, Some(&authorization)).await;
    let status: u16 = head[9..12].parse().unwrap();
    let json =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body}"));
    (status, json)
}

/// `POST path` with a JSON `body` as `authorization` (if any): the status
/// and the JSON answer (`null` if none).
pub async fn http_post(
    m: &TestMaster,
    path: &str,
    authorization: Option<&str>,
    body: &str,
) -> (u16, serde_json::Value) {
    let mut raw = Raw::connect(m.addr).await;
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    raw.write(
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    let reply = String::from_utf8(raw.read_to_close().await).unwrap();
    let (head, text) = reply.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    (
        status,
        serde_json::from_str(text).unwrap_or(serde_json::Value::Null),
    )
}

/// An HTTP/1.1 answer: status, head (lower-cased header names as sent) and
/// body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Answer {
    /// The values of a header (case-insensitive name).
    pub fn headers(&self, name: &str) -> Vec<String> {
        self.head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
            .collect()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// `method path` over HTTP/1.1 with `headers` and `body`.
pub async fn http(
    m: &TestMaster,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut raw = Raw::connect(m.addr).await;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if method != "GET" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    raw.write(req.as_bytes()).await;
    let reply = raw.read_to_close().await;
    let split = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("{method} {path}: no HTTP answer: {reply:?}"));
    let head = String::from_utf8_lossy(&reply[..split]).into_owned();
    let mut body = reply[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Answer {
        status: head[9..12].parse().unwrap(),
        head,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// A chunked HTTP/1.1 body's bytes.
pub fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("a chunk size line");
        let size = usize::from_str_radix(std::str::from_utf8(&b[..line]).unwrap().trim(), 16)
            .expect("a hex chunk size");
        b = &b[line + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// Logs in through the web login's JSON endpoints, running SCRAM as the
/// page's script does: the session cookie (`name=value`) and CSRF token,
/// or the refusal.
pub async fn web_login(
    m: &TestMaster,
    user: &str,
    password: &str,
) -> Result<(String, String), Answer> {
    let client = switchyard::auth::scram::ScramClient::new(user, password.as_bytes());
    let json = [("Content-Type", "application/json")];
    let start = http(
        m,
        "POST",
        "/api/v1/login/start",
        &json,
        &serde_json::json!({ "client_first": client.client_first() }).to_string(),
    )
    .await;
    if start.status != 200 {
        return Err(start);
    }
    let s = start.json();
    let server_first = s["server_first"].as_str().unwrap();
    let fin = client.answer_uncached(server_first.as_bytes()).unwrap();
    let finish = http(
        m,
        "POST",
        "/api/v1/login/finish",
        &json,
        &serde_json::json!({ "login": s["login"], "client_final": fin.message() }).to_string(),
    )
    .await;
    if finish.status != 200 {
        return Err(finish);
    }
    let f = finish.json();
    fin.verify_server(f["server_final"].as_str().unwrap().as_bytes())
        .expect("the master proves it holds the verifier");
    let cookie = finish
        .headers("set-cookie")
        .into_iter()
        .find(|c| c.starts_with("switchyard_session="))
        .expect("a session cookie");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    // In clear, the cookie cannot be Secure (the browser would not send it).
    assert!(!cookie.contains("Secure"), "{cookie}");
    let pair = cookie.split(';').next().unwrap().to_string();
    Ok((pair, f["csrf"].as_str().unwrap().to_string()))
}
