//! The operator's console against a real master with real workers: the
//! `switchyard debug` binary, its `--json` output, and the gRPC Debug service.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;
use switchyard::builds::Outcome;
use switchyard::store::BuildStore;

use common::*;
use serde_json::Value;

const ADMIN: UserSpec = ("admin", "admin-pw", &["debug", "change-source"]);
const HOOK: UserSpec = ("hook", "hook-pw", &["change-source"]);

const BUILDS: &str = r#"
[[worker]]
name = "w1"
max_builds = 2

[[builder]]
name = "quick"
workers = ["w1"]
[[builder.step]]
name = "say"
shell = "echo quick output"
[[builder.step]]
name = "more"
shell = "echo more output >&2"

[[builder]]
name = "slow"
workers = ["w1"]
[[builder.step]]
name = "wait"
shell = "(sleep 5; touch survived) & echo waiting; sleep 60"

[[builder]]
name = "drip"
workers = ["w1"]
[[builder.step]]
name = "first"
shell = "echo one; sleep 1; printf 'two, then ' >&2; sleep 0.2; echo three"
[[builder.step]]
name = "second"
shell = "sleep 1; echo four"

[[scheduler]]
name = "features"
builders = ["quick"]
branches = ["feature"]
"#;

async fn start() -> (TestMaster, Reaped) {
    let users = [ADMIN, HOOK];
    let dir = tempfile::tempdir().unwrap();
    let config = config_text("heartbeat_interval = \"1s\"", &users) + BUILDS;
    let secrets = secrets_text(&users)
        + secrets_text(&[("w1", "w1-pw", &[])]).trim_start_matches("[verifiers]\n");
    std::fs::write(dir.path().join("master.toml"), config).unwrap();
    std::fs::write(dir.path().join("secrets.toml"), secrets).unwrap();
    let m = TestMaster::start_in(dir).await;
    let worker = spawn_worker(&m, "w1", "w1-pw", "basedir");
    within("the worker to connect", async {
        while m.master.builds().connected().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    (m, worker)
}

/// Runs `switchyard debug` once and returns stdout.
async fn debug(
    m: &TestMaster,
    user: &str,
    password: &str,
    args: &[&str],
) -> Result<String, String> {
    debug_cli(m, user, password, args).await
}

async fn json(m: &TestMaster, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = debug(m, "admin", "admin-pw", &all).await.unwrap();
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

async fn wait_result(m: &TestMaster, build: i64) -> Outcome {
    within("the build to end", async {
        loop {
            if let Some(r) = m
                .master
                .state()
                .build(build)
                .await
                .unwrap()
                .and_then(|b| b.result)
            {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

async fn next_build_started(
    events: &mut tokio::sync::broadcast::Receiver<switchyard::builds::Stamped>,
) -> i64 {
    within("a build to start", async {
        loop {
            if let Ok(e) = events.recv().await
                && let switchyard::builds::Event::BuildStarted { build, .. } = e.event
            {
                return build;
            }
        }
    })
    .await
}

#[tokio::test]
async fn force_status_builds_log_and_json_from_the_console() {
    let (m, _w) = start().await;
    let mut events = m.master.builds().subscribe();
    let forced = json(
        &m,
        &[
            "force",
            "quick",
            "--branch",
            "main",
            "--revision",
            "abc",
            "--property",
            "who=ada",
            "--property",
            "ticket=T-9",
        ],
    )
    .await;
    assert!(forced["request_id"].as_i64().unwrap() > 0);
    let build = next_build_started(&mut events).await;
    // force waited for a worker to start it, and says which build it is.
    assert_eq!(forced["build"]["id"], build, "{forced}");
    assert_eq!(forced["build"]["number"], 1);
    assert_eq!(wait_result(&m, build).await, Outcome::Success);

    let status = json(&m, &["status"]).await;
    assert_eq!(status["workers_connected"], 1);
    assert_eq!(status["builders"], 3);
    let workers = json(&m, &["workers"]).await;
    assert_eq!(workers[0]["name"], "w1");
    assert_eq!(workers[0]["connected"], true);
    let builders = json(&m, &["builders"]).await;
    assert_eq!(builders.as_array().unwrap().len(), 3);
    let builds = json(&m, &["builds", "quick"]).await;
    let b = &builds[0];
    assert_eq!(b["id"], build);
    assert_eq!(b["builder"], "quick");
    assert_eq!(b["result"], "success");
    assert_eq!(b["branch"], "main");
    assert_eq!(b["revision"], "abc");
    assert_eq!(b["steps"].as_array().unwrap().len(), 2);
    assert_eq!(b["steps"][1]["name"], "more");
    assert_eq!(b["steps"][1]["result"], "success");
    // Its properties, each with its source, and its number.
    assert_eq!(b["number"], 1);
    assert_eq!(b["properties"]["branch"]["value"], "main");
    assert_eq!(b["properties"]["branch"]["source"], "force");
    assert_eq!(b["properties"]["build_number"]["value"], "1");
    assert_eq!(b["properties"]["worker"]["source"], "build");
    assert_eq!(b["properties"]["who"]["value"], "ada");
    assert_eq!(b["properties"]["ticket"]["source"], "force");

    // Human output too.
    let text = debug(&m, "admin", "admin-pw", &["builds"]).await.unwrap();
    assert!(
        text.contains("quick") && text.contains("say:success more:success"),
        "{text}"
    );
    // A header per step, stderr marked; `--raw` is the bytes alone.
    let log = debug(&m, "admin", "admin-pw", &["log", &build.to_string()])
        .await
        .unwrap();
    assert_eq!(
        log,
        "=== step say ===\nquick output\n=== step more ===\n[stderr] more output\n"
    );
    let raw = debug(
        &m,
        "admin",
        "admin-pw",
        &["log", &build.to_string(), "--raw"],
    )
    .await
    .unwrap();
    assert_eq!(raw, "quick output\nmore output\n");
    // BUILDER#NUMBER names a build wherever a build is named.
    let by_number = debug(&m, "admin", "admin-pw", &["log", "quick#1"])
        .await
        .unwrap();
    assert_eq!(by_number, log);
    let detail = debug(&m, "admin", "admin-pw", &["build", "quick#1"])
        .await
        .unwrap();
    assert!(
        detail.contains(&format!("build {build} (quick#1)"))
            && detail.contains("who = ada (force)")
            && detail.contains("say (attempt 1): success"),
        "{detail}"
    );
    let err = debug(&m, "admin", "admin-pw", &["build", "quick#99"])
        .await
        .unwrap_err();
    assert!(err.contains("no build quick#99"), "{err}");
    let log = debug(
        &m,
        "admin",
        "admin-pw",
        &["log", &build.to_string(), "more"],
    )
    .await
    .unwrap();
    assert_eq!(log, "=== step more ===\n[stderr] more output\n");

    // Mistakes are explained, and exit non-zero.
    let err = debug(&m, "admin", "admin-pw", &["force", "nosuch"])
        .await
        .unwrap_err();
    assert!(err.contains("no builder named \"nosuch\""), "{err}");
    let err = debug(&m, "admin", "admin-pw", &["frobnicate"])
        .await
        .unwrap_err();
    assert!(err.contains("unknown command"), "{err}");
    let err = debug(&m, "admin", "admin-pw", &["log", "99999"])
        .await
        .unwrap_err();
    assert!(err.contains("no build 99999"), "{err}");
    // A user without the `debug` grant.
    let err = debug(&m, "hook", "hook-pw", &["status"]).await.unwrap_err();
    assert!(err.contains("NOT_AUTHORIZED"), "{err}");
    m.stop().await;
}

#[tokio::test]
async fn log_follow_streams_a_running_build_until_it_ends() {
    let (m, _w) = start().await;
    // force prints the build once a worker has started it.
    let forced = debug(&m, "admin", "admin-pw", &["force", "drip"])
        .await
        .unwrap();
    assert!(
        forced.starts_with("build drip#1 (id ") && forced.contains("started on w1"),
        "{forced}"
    );
    let started = std::time::Instant::now();
    let log = debug(&m, "admin", "admin-pw", &["log", "drip#1", "-f"])
        .await
        .unwrap();
    // It ran until the build ended (the steps take over two seconds), and
    // printed everything, stderr marked on a line of its own.
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert_eq!(
        log,
        "=== step first ===\none\n[stderr] two, then \nthree\n=== step second ===\nfour\n=== build ended: success ===\n"
    );
    let id = m.master.state().build_by_number("drip", 1).await.unwrap();
    let b = m.master.state().build(id.unwrap()).await.unwrap().unwrap();
    assert_eq!(b.result, Some(Outcome::Success));
    // Following a finished build prints it and its end at once.
    let again = debug(&m, "admin", "admin-pw", &["log", "drip#1", "--follow"])
        .await
        .unwrap();
    assert_eq!(again, log);
    // JSON: one object per chunk, then the result.
    let lines = debug(&m, "admin", "admin-pw", &["--json", "log", "drip#1", "-f"])
        .await
        .unwrap();
    let last: Value = serde_json::from_str(lines.lines().last().unwrap()).unwrap();
    assert_eq!(last["build_result"], "success");
    // Without waiting, force says it queued a request.
    let queued = debug(&m, "admin", "admin-pw", &["force", "drip", "--wait", "0"])
        .await
        .unwrap();
    assert!(
        queued.starts_with("build request ") && queued.contains("queued"),
        "{queued}"
    );
    let err = debug(
        &m,
        "admin",
        "admin-pw",
        &["force", "drip", "--wait", "soon"],
    )
    .await
    .unwrap_err();
    assert!(err.contains("--wait must be seconds"), "{err}");
    m.stop().await;
}

#[tokio::test]
async fn a_build_shows_its_changes_and_builds_list_in_fitted_columns() {
    let (m, _w) = start().await;
    let mut events = m.master.builds().subscribe();
    push_change(
        &m,
        switchyard::proto::Change {
            repository: "widgets".into(),
            branch: "feature".into(),
            revision: "0123456789abcdef0123".into(),
            author: "Ada <ada@example.org>".into(),
            comments: "Fix the frobnicator\n\nIt frobbed twice.".into(),
            files: vec!["src/frob.rs".into(), "README.md".into()],
            ..Default::default()
        },
    )
    .await;
    let build = next_build_started(&mut events).await;
    assert_eq!(wait_result(&m, build).await, Outcome::Success);
    let detail = debug(&m, "admin", "admin-pw", &["build", "quick#1"])
        .await
        .unwrap();
    for want in [
        "changes:",
        "0123456789ab on feature by Ada <ada@example.org>",
        "      Fix the frobnicator",
        "      It frobbed twice.",
        "      | src/frob.rs",
        "      | README.md",
    ] {
        assert!(detail.contains(want), "{want:?} missing in:\n{detail}");
    }
    let b = json(&m, &["build", "quick#1"]).await;
    assert_eq!(b[0]["changes"][0]["author"], "Ada <ada@example.org>");
    assert_eq!(b[0]["changes"][0]["files"][1], "README.md");
    // Columns as wide as their contents: each header starts where its
    // values start.
    let table = debug(&m, "admin", "admin-pw", &["builds"]).await.unwrap();
    let mut lines = table.lines();
    let header = lines.next().unwrap();
    let row = lines.next().unwrap();
    for (column, value) in [
        ("BRANCH", "feature"),
        ("REVISION", "0123456789"),
        ("RESULT", "success"),
    ] {
        assert_eq!(header.find(column), row.find(value), "{column}:\n{table}");
    }
    assert!(
        header.contains("STARTED") && header.contains("TOOK"),
        "{table}"
    );
    assert!(row.contains("quick#1  "), "{table}");
    m.stop().await;
}

#[tokio::test]
async fn stop_interrupts_a_running_build_and_kills_its_processes() {
    let (m, _w) = start().await;
    let mut events = m.master.builds().subscribe();
    debug(&m, "admin", "admin-pw", &["force", "slow"])
        .await
        .unwrap();
    let build = next_build_started(&mut events).await;
    // Let the step start its processes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = debug(&m, "admin", "admin-pw", &["stop", &build.to_string()])
        .await
        .unwrap();
    assert!(out.contains("stopping"), "{out}");
    assert_eq!(wait_result(&m, build).await, Outcome::Interrupted);
    let b = m.master.state().build(build).await.unwrap().unwrap();
    assert_eq!(b.steps[0].result, Some(Outcome::Interrupted));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !m.dir.path().join("basedir/slow/survived").exists(),
        "a process of the stopped step survived"
    );
    let err = debug(&m, "admin", "admin-pw", &["stop", &build.to_string()])
        .await
        .unwrap_err();
    assert!(err.contains("no running build"), "{err}");
    m.stop().await;
}

#[tokio::test]
async fn watch_sees_a_build_from_start_to_end() {
    let (m, _w) = start().await;
    let mut watch = Reaped(
        Command::new(BIN)
            .args([
                "debug",
                "--master",
                &m.addr.to_string(),
                "--user",
                "admin",
                "--json",
                "watch",
            ])
            .env("SWITCHYARD_PASSWORD", "admin-pw")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = watch.0.stdout.take().unwrap();
    // The master runs on this test's runtime: read the lines without blocking it.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Wait until the watch is subscribed.
    within("the watch to subscribe", async {
        while json(&m, &["status"]).await["watchers"] != 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let mut seen: Vec<Value> = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    debug(&m, "admin", "admin-pw", &["hangup", "w1"])
        .await
        .unwrap();
    debug(&m, "admin", "admin-pw", &["force", "quick"])
        .await
        .unwrap();
    while !seen.iter().any(|e| e["type"] == "build_finished") {
        let line = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(line)) => line,
            _ => panic!("watch: no build_finished in time; saw {seen:?}"),
        };
        seen.push(serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")));
    }
    let types: Vec<&str> = seen.iter().map(|e| e["type"].as_str().unwrap()).collect();
    let pos = |t: &str| {
        types
            .iter()
            .position(|x| *x == t)
            .unwrap_or_else(|| panic!("no {t} in {types:?}"))
    };
    assert!(pos("worker_lost") < pos("build_started"), "{types:?}");
    assert!(pos("build_started") < pos("step_started"));
    assert!(pos("step_started") < pos("step_finished"));
    assert!(pos("step_finished") < pos("build_finished"));
    let finished = seen.iter().find(|e| e["type"] == "build_finished").unwrap();
    assert_eq!(finished["result"], "success");
    assert_eq!(finished["builder"], "quick");
    assert_eq!(types.iter().filter(|t| **t == "step_finished").count(), 2);
    m.stop().await;
}

#[tokio::test]
async fn the_interactive_console_takes_commands_on_stdin() {
    let (m, _w) = start().await;
    let addr = m.addr.to_string();
    let out = within(
        "an interactive console",
        tokio::task::spawn_blocking(move || {
            let mut child = Command::new(BIN)
                .args(["debug", "--master", &addr, "--user", "admin"])
                .env("SWITCHYARD_PASSWORD", "admin-pw")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(b"help\nstatus\nworkers\nbogus\nquit\n")
                .unwrap();
            child.wait_with_output().unwrap()
        }),
    )
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("force BUILDER"), "help: {stdout}");
    assert!(stdout.contains("1/1 workers connected"), "status: {stdout}");
    assert!(
        stdout.contains("w1") && stdout.contains("yes"),
        "workers: {stdout}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown command"));
    m.stop().await;
}

#[tokio::test]
async fn the_same_operations_over_grpc() {
    use switchyard::proto::debug_client::DebugClient;
    use switchyard::proto::{BuildsRequest, ForceRequest, StatusRequest};
    let (m, _w) = start().await;
    let mut client = DebugClient::new(m.grpc().await);
    let auth = |user: &str, pw: &str| {
        use base64::Engine;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
        )
        .parse::<tonic::metadata::MetadataValue<_>>()
        .unwrap()
    };
    let mut req = tonic::Request::new(StatusRequest {});
    req.metadata_mut()
        .insert("authorization", auth("hook", "hook-pw"));
    let err = within("Status", client.status(req)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    let mut events = m.master.builds().subscribe();
    let mut req = tonic::Request::new(ForceRequest {
        builder: "quick".into(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", auth("admin", "admin-pw"));
    within("Force", client.force(req)).await.unwrap();
    let build = next_build_started(&mut events).await;
    assert_eq!(wait_result(&m, build).await, Outcome::Success);
    let mut req = tonic::Request::new(BuildsRequest {
        builder: "quick".into(),
        limit: 5,
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", auth("admin", "admin-pw"));
    let builds = within("Builds", client.builds(req))
        .await
        .unwrap()
        .into_inner()
        .builds;
    assert_eq!(builds[0].id, build);
    assert_eq!(builds[0].result, "success");
    assert_eq!(builds[0].steps.len(), 2);
    m.stop().await;
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test]
async fn consoles_that_ask_for_a_big_log_and_never_read_pin_little_memory() {
    use futures_util::{SinkExt, StreamExt};
    use prost::Message;
    use switchyard::proto::{DebugReply, DebugRequest, LogRequest, debug_request};
    let dir = tempfile::tempdir().unwrap();
    let big = r#"
[[builder]]
name = "big"
workers = ["w1"]
[[builder.step]]
name = "print"
shell = "yes 0123456789012345678901234567890123456789012345678901234567890123456789 | head -c 67108864"
"#;
    std::fs::write(
        dir.path().join("master.toml"),
        config_text("", &[ADMIN]) + "\n[[worker]]\nname = \"w1\"\n" + big,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("secrets.toml"),
        secrets_text(&[ADMIN, ("w1", "w1-pw", &[])]),
    )
    .unwrap();
    let (master, addr) = master_process(dir.path());
    let _worker = Reaped(
        Command::new(BIN)
            .args(["worker", "--master", &addr, "--name", "w1", "--basedir"])
            .arg(dir.path().join("basedir"))
            .env("SWITCHYARD_PASSWORD", "w1-pw")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let creds = switchyard::client::Credentials::new("admin", "admin-pw");
    let mut console = switchyard::debug::console::Console::connect(&addr, &creds)
        .await
        .unwrap();
    // Force the build (retrying until the worker is connected) and wait for it.
    within("the build to be forced", async {
        while console_cmd(&mut console, &["force", "big"]).await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let out = console_cmd(&mut console, &["builds"])
            .await
            .unwrap_or_default();
        if out.contains("success") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the 64 MiB build did not finish"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pid = master.0.id();
    let before = rss_kib(pid);
    // Four sessions, each asking for the 64 MiB log sixteen times, reading nothing.
    let mut silent = Vec::new();
    for _ in 0..4 {
        let mut s = switchyard::client::connect(&addr, "debug", &creds)
            .await
            .unwrap();
        for id in 1..=16 {
            let req = DebugRequest {
                id,
                command: Some(debug_request::Command::Log(LogRequest {
                    build: 1,
                    ..Default::default()
                })),
            };
            s.stream
                .send(bytes::Bytes::from(req.encode_to_vec()))
                .await
                .unwrap();
        }
        silent.push(s);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rss_kib(pid);
    let grown_mib = after.saturating_sub(before) / 1024;
    assert!(
        grown_mib < 64,
        "the master grew by {grown_mib} MiB for consoles that read nothing"
    );
    // The sessions are still good: one reads its log to the end, in full.
    let s = &mut silent[0];
    let mut bytes = 0usize;
    let mut ended = 0;
    within("a whole log", async {
        while ended < 16 {
            let frame = s.stream.next().await.unwrap().unwrap();
            let reply = DebugReply::decode(frame.freeze()).unwrap();
            if let Some(switchyard::proto::debug_reply::Result::Log(l)) = &reply.result {
                bytes += l.data.len();
            }
            if reply.end {
                ended += 1;
            }
        }
    })
    .await;
    assert_eq!(bytes, 16 * 67_108_864);
    // And the master still answers others.
    console_cmd(&mut console, &["status"]).await.unwrap();
}

async fn console_cmd(
    c: &mut switchyard::debug::console::Console,
    words: &[&str],
) -> Result<String, String> {
    let words: Vec<String> = words.iter().map(|w| w.to_string()).collect();
    let command = switchyard::debug::console::parse(&words)?;
    let mut out = Vec::new();
    within(
        "a console command",
        c.run(command, &mut out, std::future::pending::<()>()),
    )
    .await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test]
async fn force_fields_have_the_limits_of_a_change() {
    let (m, _w) = start().await;
    let long = "b".repeat(2000);
    let err = debug(
        &m,
        "admin",
        "admin-pw",
        &["force", "quick", "--branch", &long],
    )
    .await
    .unwrap_err();
    assert!(
        err.contains("--branch") && err.contains("over the limit of 1024"),
        "{err}"
    );
    // The console still works, and `builds` replies stay small.
    debug(&m, "admin", "admin-pw", &["builds"]).await.unwrap();
    m.stop().await;
}

#[tokio::test]
async fn console_options_that_would_do_nothing_are_errors_and_json_goes_anywhere() {
    let (m, _w) = start().await;
    for (args, expected) in [
        (&["watch", "--limit", "3"][..], "takes no option --limit"),
        (&["builds", "--limit", "-1"][..], "from 1 to 1000"),
        (&["builds", "--limit", "0"][..], "from 1 to 1000"),
        (&["status", "--branch", "x"][..], "takes no option --branch"),
        (&["builds", "--branch", "x"][..], "it takes --limit"),
    ] {
        let err = debug(&m, "admin", "admin-pw", args).await.unwrap_err();
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    let out = debug(&m, "admin", "admin-pw", &["builds", "quick", "--json"])
        .await
        .unwrap();
    let v: Value = serde_json::from_str(out.trim()).expect("--json after the command");
    assert!(v.is_array(), "{v}");
    let help = debug(&m, "admin", "admin-pw", &["--help"]).await.unwrap();
    assert!(help.contains("--json"), "{help}");
    m.stop().await;
}
