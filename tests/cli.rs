//! The `switchyard` binary as an operator runs it: real processes, real
//! signals.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use switchyard::auth::Verifier;
use switchyard::client::{self, Credentials};

/// Kills the child if a test fails half-way.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn master(config: &std::path::Path) -> Proc {
        Self::master_with(config, &[])
    }

    /// A master with more command-line arguments.
    fn master_with(config: &std::path::Path, args: &[&std::ffi::OsStr]) -> Proc {
        let mut child = Command::new(BIN)
            .args(["master", "--config"])
            .arg(config)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc { child, lines }
    }

    /// Waits for a log line containing `needle` and returns it.
    fn wait_for_line(&self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(line) => seen.push(line),
                Err(_) => break,
            }
        }
        panic!(
            "no log line containing {needle:?}; saw:\n{}",
            seen.join("\n")
        );
    }

    fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the master did not exit within {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs a command that must fail; returns what it said on stderr.
fn failure(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "it succeeded: {err}");
    err
}

fn listening_addr(p: &Proc) -> String {
    address_in(&p.wait_for_line("listening on ")).unwrap()
}

const ALICE: UserSpec = ("alice", "alice-pw", &["ping"]);

/// A directory with a config and secrets file for ALICE alone, and the
/// config's path.
fn alice_only() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("master.toml");
    std::fs::write(&config, config_text("", &[ALICE])).unwrap();
    std::fs::write(dir.path().join("secrets.toml"), secrets_text(&[ALICE])).unwrap();
    (dir, config)
}
const BOB: UserSpec = ("bob", "bob-pw", &["ping"]);

#[tokio::test]
async fn master_reloads_on_sighup_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("master.toml");
    std::fs::write(&config, config_text("", &[ALICE, BOB])).unwrap();
    std::fs::write(dir.path().join("secrets.toml"), secrets_text(&[ALICE, BOB])).unwrap();
    let mut p = Proc::master(&config);
    let addr = listening_addr(&p);

    let mut a = within(
        "login",
        client::connect(&addr, "ping", &Credentials::new("alice", "alice-pw")),
    )
    .await
    .unwrap();
    let mut b = within(
        "login",
        client::connect(&addr, "ping", &Credentials::new("bob", "bob-pw")),
    )
    .await
    .unwrap();

    // A broken config is rejected with file and line; nothing changes.
    std::fs::write(
        &config,
        "[master]\nsecrets = \"secrets.toml\"\nlisten = [\n",
    )
    .unwrap();
    p.signal("HUP");
    let line = p.wait_for_line("reload rejected");
    assert!(line.contains("master.toml:"), "{line}");
    assert_echo(&mut b, b"bob after a broken reload").await;

    // Removing bob hangs up bob, and only bob.
    std::fs::write(&config, config_text("", &[ALICE])).unwrap();
    p.signal("HUP");
    p.wait_for_line("reload applied");
    assert_hung_up(&mut b, Duration::from_secs(3)).await;
    assert_echo(&mut a, b"alice untouched").await;

    // Shutdown closes sessions and connections still sniffing or logging in.
    let mut silent = Raw::connect(addr.parse().unwrap()).await;
    let mut half = Raw::native(addr.parse().unwrap()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    p.signal("TERM");
    let status = p.wait_exit();
    assert!(status.success(), "master exited with {status}");
    assert_hung_up(&mut a, WAIT).await;
    silent.read_to_close().await;
    half.read_to_close().await;
}

#[test]
fn master_refuses_a_broken_config_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("master.toml");
    std::fs::write(
        &config,
        "[master]\nsecrets = \"secrets.toml\"\nmax_connections = -1\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("secrets.toml"), "[verifiers]\n").unwrap();
    let err = failure(Command::new(BIN).args(["master", "--config"]).arg(&config));
    assert!(
        err.contains("master.toml:3:") && err.contains("master.max_connections"),
        "{err}"
    );

    let err = failure(Command::new(BIN).args(["master", "--config", "/nonexistent/master.toml"]));
    assert!(
        err.contains("/nonexistent/master.toml: no such file") && err.contains("--config"),
        "{err}"
    );
    // No --config at all, in a directory without master.toml: say how.
    let empty = tempfile::tempdir().unwrap();
    let err = failure(Command::new(BIN).arg("master").current_dir(empty.path()));
    assert!(err.contains("--config FILE"), "{err}");
    // A missing secrets file names the config line that points to it.
    std::fs::write(
        &config,
        "[master]\nlisten = \"127.0.0.1:0\"\nsecrets = \"gone.toml\"\n",
    )
    .unwrap();
    let err = failure(Command::new(BIN).args(["master", "--config"]).arg(&config));
    assert!(
        err.contains("master.toml:3:") && err.contains("gone.toml"),
        "{err}"
    );
}

#[test]
fn a_master_address_without_a_port_gets_9989() {
    let out = Command::new(BIN)
        .args(["ping", "--master", "localhost:http", "--user", "u"])
        .env("SWITCHYARD_PASSWORD", "x")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not a port number"),
        "{err}"
    );
    // Nothing listens on 127.0.0.2:9989: the error names the address used.
    let out = Command::new(BIN)
        .args(["ping", "--master", "127.0.0.2", "--user", "u"])
        .env("SWITCHYARD_PASSWORD", "x")
        .env("HOME", std::env::temp_dir())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("cannot connect to 127.0.0.2:9989"), "{err}");
}

#[tokio::test]
async fn the_master_says_its_pid_and_writes_a_pidfile() {
    let (dir, config) = alice_only();
    let pidfile = dir.path().join("master.pid");
    let mut p = Proc::master_with(&config, &["--pidfile".as_ref(), pidfile.as_os_str()]);
    let line = p.wait_for_line("listening on ");
    let pid = p.child.id();
    assert!(line.contains(&format!("pid {pid}")), "{line}");
    let written = std::fs::read_to_string(&pidfile).unwrap();
    assert_eq!(written.trim(), pid.to_string());
    p.signal("TERM");
    assert!(p.wait_exit().success());
    assert!(!pidfile.exists(), "the pid file is removed at a clean stop");
}

fn passwd(args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = Command::new(BIN)
        .arg("passwd")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A child that refuses its arguments exits without reading: ignore the
    // broken pipe, the exit status says what happened.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    child.wait_with_output().unwrap()
}

#[test]
fn passwd_prints_a_verifier_and_nothing_else() {
    let out = passwd(&["alice"], "correct horse\nsecond line ignored\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1);
    let v = Verifier::parse(stdout.trim()).unwrap();
    assert_eq!(v.iterations(), 4096);
    assert!(v.matches_password(b"correct horse"));
    assert!(!stdout.contains("correct horse"));

    let out = passwd(&["alice", "--iterations", "10000"], "pw\n");
    assert!(out.status.success());
    assert_eq!(
        Verifier::parse(String::from_utf8(out.stdout).unwrap().trim())
            .unwrap()
            .iterations(),
        10000
    );

    let out = passwd(&["alice", "--iterations", "100"], "pw\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("4096"));

    let out = passwd(&["alice"], "");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty"));
}

#[tokio::test]
async fn ping_command_checks_a_live_port() {
    let m = TestMaster::start("", &[ALICE]).await;
    let addr = m.addr.to_string();
    let run = |pw: &'static str| {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || {
            Command::new(BIN)
                .args(["ping", "--master", &addr, "--user", "alice", "--count", "2"])
                .env("SWITCHYARD_PASSWORD", pw)
                .stdin(Stdio::null())
                .output()
                .unwrap()
        })
    };
    let ok = within("ping", run("alice-pw")).await.unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("ok: "));
    let bad = within("ping", run("wrong")).await.unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("AUTH_FAILED"));
    m.stop().await;
}

#[test]
fn help_names_every_subcommand() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for cmd in ["master", "passwd", "sendchange", "ping"] {
        assert!(help.contains(cmd), "{help}");
    }
}

fn sendchange(addr: &str, user: &str, password: &str, extra: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(["sendchange", "--master", addr, "--user", user])
        .args(extra)
        .env("SWITCHYARD_PASSWORD", password)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

const HOOK: UserSpec = ("hook", "hook-pw", &["change-source"]);

#[test]
fn sendchange_is_durable_across_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("master.toml");
    std::fs::write(&config, config_text("", &[HOOK])).unwrap();
    std::fs::write(dir.path().join("secrets.toml"), secrets_text(&[HOOK])).unwrap();
    let mut p = Proc::master(&config);
    let addr = listening_addr(&p);

    let out = sendchange(
        &addr,
        "hook",
        "hook-pw",
        &[
            "--repository",
            "https://git.example.org/widgets.git",
            "--branch",
            "main",
            "--revision",
            "abc123",
            "--author",
            "Ada",
            "--comments",
            "fix the frobnicator",
            "--file",
            "src/a.rs",
            "--file",
            "src/b.rs",
            "--property",
            "ci=yes",
            "--when",
            "1750000000",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id: i64 = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Acknowledged: now kill the master without warning.
    p.signal("KILL");
    p.wait_exit();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = switchyard::store::StateDb::open(&dir.path().join("state.sqlite")).unwrap();
    let stored = rt
        .block_on(db.change(id))
        .unwrap()
        .expect("an acknowledged change survives kill -9");
    assert_eq!(stored.change.revision, "abc123");
    assert_eq!(stored.change.comments, "fix the frobnicator");
    assert_eq!(stored.change.files, vec!["src/a.rs", "src/b.rs"]);
    assert_eq!(
        stored.change.properties.get("ci").map(String::as_str),
        Some("yes")
    );
    assert_eq!(stored.change.when, Some((1_750_000_000, 0)));
}

#[test]
fn sendchange_failures_say_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("master.toml");
    std::fs::write(&config, config_text("", &[HOOK])).unwrap();
    std::fs::write(dir.path().join("secrets.toml"), secrets_text(&[HOOK])).unwrap();
    let p = Proc::master(&config);
    let addr = listening_addr(&p);
    let repo = ["--repository", "r"];

    let out = sendchange(&addr, "hook", "wrong", &repo);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refused the credentials of user \"hook\""),
        "{err}"
    );

    let out = sendchange(&addr, "hook", "hook-pw", &["--repository", ""]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rejected the change: change.repository: required"),
        "{err}"
    );

    // Nothing listens on this port once the listener is dropped.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let out = sendchange(&closed, "hook", "hook-pw", &repo);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot connect to the master at {closed}")),
        "{err}"
    );

    let out = Command::new(BIN)
        .args([
            "sendchange",
            "--master",
            &addr,
            "--user",
            "hook",
            "--repository",
            "r",
        ])
        .env_remove("SWITCHYARD_PASSWORD")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--password-file"));

    let pwfile = dir.path().join("pw");
    std::fs::write(&pwfile, "hook-pw\n").unwrap();
    let out = Command::new(BIN)
        .args([
            "sendchange",
            "--master",
            &addr,
            "--user",
            "hook",
            "--repository",
            "r",
            "--password-file",
        ])
        .arg(&pwfile)
        .env_remove("SWITCHYARD_PASSWORD")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A bare repository `dir/widgets.git` with `examples/post-receive` as its
/// hook, and an empty work tree `dir/work`; `git` runs git as the hook's
/// pusher.
fn hooked_repository(
    dir: &std::path::Path,
    git: &dyn Fn(&std::path::Path, &[&str]) -> String,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let bare = dir.join("widgets.git");
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    git(dir, &["init", "--bare", "-q", bare.to_str().unwrap()]);
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/examples/post-receive"),
        bare.join("hooks/post-receive"),
    )
    .unwrap();
    git(&work, &["init", "-q"]);
    (bare, work)
}

#[test]
fn the_example_post_receive_hook_pushes_each_new_commit() {
    let git_ok = Command::new("git")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(git_ok, "this test needs git on PATH");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("master.toml");
    std::fs::write(&config, config_text("", &[HOOK])).unwrap();
    std::fs::write(dir.path().join("secrets.toml"), secrets_text(&[HOOK])).unwrap();
    let p = Proc::master(&config);
    let addr = listening_addr(&p);

    let git = |cwd: &std::path::Path, args: &[&str]| {
        git_as_hook(
            &addr,
            std::path::Path::new("widgets"),
            dir.path(),
            cwd,
            args,
        )
    };
    let (bare, work) = hooked_repository(dir.path(), &git);
    for (file, msg) in [("a.txt", "first"), ("b.txt", "second")] {
        std::fs::write(work.join(file), msg).unwrap();
        git(&work, &["add", file]);
        git(&work, &["commit", "-q", "-m", msg]);
    }
    let out = git(&work, &["push", "-q", bare.to_str().unwrap(), "main"]);
    assert_eq!(out.matches("switchyard: change").count(), 2, "{out}");
    std::fs::write(work.join("c.txt"), "third").unwrap();
    git(&work, &["add", "c.txt"]);
    git(&work, &["commit", "-q", "-m", "third"]);
    let out = git(&work, &["push", "-q", bare.to_str().unwrap(), "main"]);
    assert_eq!(out.matches("switchyard: change").count(), 1, "{out}");

    let head = git(&work, &["rev-parse", "HEAD"]).trim().to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = switchyard::store::StateDb::open(&dir.path().join("state.sqlite")).unwrap();
    let all = rt.block_on(db.changes_after(0, 10)).unwrap();
    let seen: Vec<(&str, &str, Vec<String>)> = all
        .iter()
        .map(|c| {
            (
                c.change.branch.as_str(),
                c.change.comments.trim(),
                c.change.files.clone(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("main", "first", vec!["a.txt".to_string()]),
            ("main", "second", vec!["b.txt".to_string()]),
            ("main", "third", vec!["c.txt".to_string()])
        ]
    );
    assert_eq!(all[2].change.revision, head);
    assert_eq!(all[2].change.repository, "widgets");
    assert_eq!(all[2].change.author, "Ada <ada@example.org>");
    drop(p);
}

/// A master process on `users` (and a worker `w1` when `worker` is set),
/// with its address.
fn master_on(dir: &std::path::Path, users: &[UserSpec<'_>], worker: bool) -> (Proc, String) {
    let config = dir.join("master.toml");
    let mut text = config_text("", users);
    let mut secrets = secrets_text(users);
    if worker {
        text.push_str("\n[[worker]]\nname = \"w1\"\n");
        secrets.push_str(secrets_text(&[("w1", "w1-pw", &[])]).trim_start_matches("[verifiers]\n"));
    }
    std::fs::write(&config, text).unwrap();
    std::fs::write(dir.join("secrets.toml"), secrets).unwrap();
    let p = Proc::master(&config);
    let addr = listening_addr(&p);
    (p, addr)
}

async fn ping_as(addr: &str, user: &str, password: &str) {
    let mut s = within(
        "a login",
        client::connect(addr, "ping", &Credentials::new(user, password)),
    )
    .await
    .unwrap_or_else(|e| panic!("{user} cannot log in: {e}"));
    assert_echo(&mut s, b"still served").await;
}

#[tokio::test]
async fn an_emptied_secrets_file_is_refused_on_sighup_and_locks_nobody_out() {
    let dir = tempfile::tempdir().unwrap();
    let (p, addr) = master_on(dir.path(), &[ALICE, BOB], true);
    let mut a = within(
        "login",
        client::connect(&addr, "ping", &Credentials::new("alice", "alice-pw")),
    )
    .await
    .unwrap();
    // `: > secrets.toml; kill -HUP`
    std::fs::write(dir.path().join("secrets.toml"), "").unwrap();
    p.signal("HUP");
    let line = p.wait_for_line("reload rejected");
    assert!(
        line.contains("master.toml:7:") && line.contains("user `alice` has no verifier"),
        "{line}"
    );
    assert_echo(&mut a, b"alice kept her session").await;
    ping_as(&addr, "alice", "alice-pw").await;
    ping_as(&addr, "bob", "bob-pw").await;

    // Only the worker's verifier missing: the error names its line too.
    std::fs::write(dir.path().join("secrets.toml"), secrets_text(&[ALICE, BOB])).unwrap();
    p.signal("HUP");
    let line = p.wait_for_line("reload rejected");
    assert!(
        line.contains("master.toml:") && line.contains("worker `w1` has no verifier"),
        "{line}"
    );

    // A verifier for a name the config does not know is a warning naming
    // the secrets file's line; the reload applies.
    let mut secrets = secrets_text(&[ALICE, BOB, ("w1", "w1-pw", &[])]);
    secrets.push_str(secrets_text(&[("admn", "x", &[])]).trim_start_matches("[verifiers]\n"));
    std::fs::write(dir.path().join("secrets.toml"), secrets).unwrap();
    p.signal("HUP");
    let line = p.wait_for_line("admn");
    assert!(line.contains("secrets.toml:5:"), "{line}");
    p.wait_for_line("reload applied");
    ping_as(&addr, "bob", "bob-pw").await;
}

#[test]
fn a_user_or_worker_without_a_verifier_stops_the_master_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("master.toml");
    std::fs::write(
        &config,
        format!("{}\n[[worker]]\nname = \"w1\"\n", config_text("", &[ALICE])),
    )
    .unwrap();
    std::fs::write(dir.path().join("secrets.toml"), secrets_text(&[ALICE])).unwrap();
    let err = failure(Command::new(BIN).args(["master", "--config"]).arg(&config));
    assert!(
        err.contains("master.toml:11:") && err.contains("worker `w1` has no verifier"),
        "{err}"
    );
}

#[tokio::test]
async fn a_reload_that_would_block_on_a_fifo_does_not_freeze_the_master() {
    let dir = tempfile::tempdir().unwrap();
    let (p, addr) = master_on(dir.path(), &[ALICE], false);
    let fifo = dir.path().join("secrets.fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    std::fs::write(
        dir.path().join("master.toml"),
        config_text("", &[ALICE]).replace("secrets.toml", "secrets.fifo"),
    )
    .unwrap();
    p.signal("HUP");
    let line = p.wait_for_line("reload rejected");
    assert!(
        line.contains("secrets.fifo") && line.contains("not a regular file"),
        "{line}"
    );
    ping_as(&addr, "alice", "alice-pw").await;
    // The port keeps serving plain HTTP too.
    let mut raw = Raw::connect(addr.parse().unwrap()).await;
    raw.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let reply = raw.read_to_close().await;
    assert!(
        reply.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&reply)
    );
}

#[tokio::test]
async fn a_refused_flood_is_logged_once_per_address() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("master.toml");
    std::fs::write(
        &config,
        config_text("max_unauthenticated_per_address = 2", &[ALICE]),
    )
    .unwrap();
    std::fs::write(dir.path().join("secrets.toml"), secrets_text(&[ALICE])).unwrap();
    let p = Proc::master(&config);
    let addr: std::net::SocketAddr = listening_addr(&p).parse().unwrap();
    let _held = (Raw::native(addr).await, Raw::native(addr).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..50 {
        let mut r = Raw::native(addr).await;
        r.read_to_close().await;
    }
    // The master is still serving, and said it once.
    p.wait_for_line("too many connections from this address");
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut more = 0;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match p.lines.recv_timeout(left) {
            Ok(line) if line.contains("too many connections from this address") => more += 1,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    assert_eq!(more, 0, "a flood of 50 refusals must make one log line");
}

#[test]
fn the_interactive_console_logs_in_again_after_a_master_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let admin: UserSpec = ("admin", "admin-pw", &["debug"]);
    std::fs::write(
        dir.path().join("master.toml"),
        config_text("", &[admin]).replace("127.0.0.1:0", &format!("127.0.0.1:{port}")),
    )
    .unwrap();
    std::fs::write(dir.path().join("secrets.toml"), secrets_text(&[admin])).unwrap();
    let (first, addr) = master_process(dir.path());
    let mut console = Command::new(BIN)
        .args(["debug", "--master", &addr, "--user", "admin"])
        .env("SWITCHYARD_PASSWORD", "admin-pw")
        .env("HOME", dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = console.stdin.take().unwrap();
    let stdout = console.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let wait_status = |lines: &mpsc::Receiver<String>| {
        let deadline = Instant::now() + WAIT;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if let Ok(l) = lines.recv_timeout(left)
                && l.contains("workers connected")
            {
                return;
            }
        }
        panic!("no status answer");
    };
    stdin.write_all(b"status\n").unwrap();
    wait_status(&lines);
    drop(first); // killed
    let (_second, _) = master_process(dir.path());
    stdin.write_all(b"status\n").unwrap();
    wait_status(&lines);
    stdin.write_all(b"quit\n").unwrap();
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = console.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the console did not quit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
}

#[tokio::test]
async fn a_master_whose_log_reader_went_away_keeps_serving() {
    // `switchyard master ... 2>&1 | head -1`: the pipe closes after a line.
    let (_dir, config) = alice_only();
    let mut child = Command::new(BIN)
        .args(["master", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = {
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        lines
            .find_map(|l| l.ok().as_deref().and_then(address_in))
            .expect("the master's start line")
        // The reader is dropped here: the pipe is closed.
    };
    let mut p = Proc {
        child,
        lines: mpsc::channel().1,
    };
    // Each of these logs a line into the closed pipe.
    for _ in 0..3 {
        p.signal("HUP");
        tokio::time::sleep(Duration::from_millis(200)).await;
        ping_as(&addr, "alice", "alice-pw").await;
    }
    assert!(p.child.try_wait().unwrap().is_none(), "the master exited");
    p.signal("TERM");
    assert!(p.wait_exit().success());
}

#[test]
fn a_push_made_while_the_master_is_down_is_built_once_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let config = dir.path().join("master.toml");
    std::fs::write(
        &config,
        config_text("", &[HOOK]).replace("127.0.0.1:0", &addr),
    )
    .unwrap();
    std::fs::write(dir.path().join("secrets.toml"), secrets_text(&[HOOK])).unwrap();
    let git = |cwd: &std::path::Path, args: &[&str]| {
        git_as_hook(
            &addr,
            std::path::Path::new("widgets"),
            dir.path(),
            cwd,
            args,
        )
    };
    let (bare, work) = hooked_repository(dir.path(), &git);
    let commit = |file: &str| {
        std::fs::write(work.join(file), file).unwrap();
        git(&work, &["add", file]);
        git(&work, &["commit", "-q", "-m", file]);
    };
    // The master is down: the push succeeds, its commits wait.
    commit("a.txt");
    commit("b.txt");
    let out = git(&work, &["push", "-q", bare.to_str().unwrap(), "main"]);
    assert_eq!(out.matches("waits in").count(), 2, "{out}");
    let spool = bare.join("switchyard-spool");
    let waiting = |d: &std::path::Path| {
        std::fs::read_dir(d)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".push")
            })
            .count()
    };
    assert_eq!(waiting(&spool), 2);

    // Back up: the next push sends the waiting ones first, in order.
    let p = Proc::master(&config);
    assert_eq!(listening_addr(&p), addr);
    commit("c.txt");
    let out = git(&work, &["push", "-q", bare.to_str().unwrap(), "main"]);
    assert_eq!(out.matches("switchyard: change").count(), 1, "{out}");
    assert_eq!(out.matches("sent the spooled").count(), 2, "{out}");
    assert_eq!(waiting(&spool), 0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = switchyard::store::StateDb::open(&dir.path().join("state.sqlite")).unwrap();
    let all = rt.block_on(db.changes_after(0, 10)).unwrap();
    let comments: Vec<&str> = all.iter().map(|c| c.change.comments.trim()).collect();
    assert_eq!(comments, ["a.txt", "b.txt", "c.txt"]);

    // `--flush` sends a spool on its own (here one filled against a
    // master that is not there).
    let other = dir.path().join("other-spool");
    let send = |args: &[&str]| {
        Command::new(BIN)
            .args(["sendchange", "--user", "hook", "--repository", "widgets"])
            .args(args)
            .env("SWITCHYARD_PASSWORD", "hook-pw")
            .env("HOME", dir.path())
            .output()
            .unwrap()
    };
    let nobody = format!("127.0.0.1:{}", free_port());
    let out = send(&[
        "--master",
        &nobody,
        "--revision",
        "d",
        "--spool",
        other.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(75),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("kept in"));
    let out = Command::new(BIN)
        .args(["sendchange", "--user", "hook", "--master", &addr, "--flush"])
        .arg(&other)
        .env("SWITCHYARD_PASSWORD", "hook-pw")
        .env("HOME", dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id: i64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let last = rt.block_on(db.changes_after(id - 1, 10)).unwrap();
    assert_eq!(last[0].change.revision, "d");
    assert_eq!(waiting(&other), 0);
}
