//! A real build master: real worker processes, real steps, real SQLite.

mod common;

use std::time::Duration;
use switchyard::builds::Outcome;
use switchyard::store::BuildStore;

use common::*;

/// Starts a master with one worker `w1` and the builds in `toml`, pushes a
/// change to `branch`, and returns the build it ran, once it has ended.
async fn run_one(toml: &str, branch: &str) -> (TestMaster, Reaped, switchyard::store::BuildRecord) {
    let m = master_with(&[("w1", "w1-pw", 1)], toml).await;
    let w = worker(&m, "w1", "w1-pw");
    wait_connected(&m, 1).await;
    let mut events = m.master.builds().subscribe();
    push(&m, branch).await;
    let ended = builds_ended(&mut events, 1).await;
    let b = m.master.state().build(ended[0].0).await.unwrap().unwrap();
    (m, w, b)
}

const TWO_STEPS: &str = r#"
[[builder]]
name = "widgets"
workers = ["w1"]
[[builder.step]]
name = "hello"
shell = "echo hello; exit 0"
[[builder.step]]
name = "world"
command = ["sh", "-c", "echo world >&2"]

[[scheduler]]
name = "main"
builders = ["widgets"]
branches = ["main"]
"#;

#[tokio::test]
async fn a_pushed_change_runs_a_two_step_build_to_success() {
    let m = master_with(&[("w1", "w1-pw", 1)], TWO_STEPS).await;
    let _w = worker(&m, "w1", "w1-pw");
    wait_connected(&m, 1).await;
    let mut events = m.master.builds().subscribe();
    push(&m, "main").await;
    let ended = builds_ended(&mut events, 1).await;
    assert_eq!(ended[0].1, "success");
    let b = m.master.state().build(ended[0].0).await.unwrap().unwrap();
    assert_eq!(b.builder, "widgets");
    assert_eq!(b.worker, "w1");
    assert_eq!(b.result, Some(Outcome::Success));
    assert_eq!(b.steps.len(), 2);
    assert!(
        b.steps
            .iter()
            .all(|s| s.result == Some(Outcome::Success) && s.exit_code == Some(0))
    );
    assert_ne!(b.steps[0].step_id, b.steps[1].step_id);
    assert_eq!(b.steps[0].step_id.to_string().len(), 32, "128-bit step ids");
    assert_eq!(log_text(&m, b.id, 0).await, "hello\n");
    assert_eq!(log_text(&m, b.id, 1).await, "world\n");
    // A change on another branch matches no scheduler.
    push(&m, "feature").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(m.master.state().builds(None, 10).await.unwrap().len(), 1);
    m.stop().await;
}

#[tokio::test]
async fn stored_output_is_announced_as_it_lands() {
    // Two bursts a while apart, on both streams: each lands as its own
    // batch, and every stored byte is announced once.
    let toml = one_step_builder(
        "widgets",
        "talk",
        "echo first; sleep 0.3; echo second >&2; sleep 0.3; echo third",
    ) + "\n[[scheduler]]\nname = \"all\"\nbuilders = [\"widgets\"]\n";
    let m = master_with(&[("w1", "w1-pw", 1)], &toml).await;
    let _w = worker(&m, "w1", "w1-pw");
    wait_connected(&m, 1).await;
    let mut events = m.master.builds().subscribe();
    push(&m, "main").await;
    let (mut announced, mut times, mut build) = (0u64, 0, None);
    within("the build to end", async {
        loop {
            let e = events.recv().await.unwrap();
            match e.event {
                switchyard::builds::Event::OutputStored {
                    build: b, bytes, ..
                } => {
                    build = Some(b);
                    announced += bytes;
                    times += 1;
                }
                switchyard::builds::Event::BuildEnded { .. } => break,
                _ => {}
            }
        }
    })
    .await;
    let log = log_text(&m, build.unwrap(), 0).await;
    assert_eq!(log, "first\nsecond\nthird\n");
    assert_eq!(announced, log.len() as u64);
    assert!(times >= 2, "announced {times} times");
    m.stop().await;
}

#[tokio::test]
async fn a_failing_step_fails_the_build_and_later_steps_do_not_run() {
    let toml = r#"
[[builder]]
name = "widgets"
workers = ["w1"]
[[builder.step]]
name = "compile"
shell = "echo compiling; exit 3"
[[builder.step]]
name = "never"
shell = "touch ran-anyway"

[[scheduler]]
name = "all"
builders = ["widgets"]
"#;
    let (m, _w, b) = run_one(toml, "any").await;
    assert_eq!(b.result, Some(Outcome::Failure));
    assert_eq!(b.steps.len(), 1, "the second step must not run");
    assert_eq!(b.steps[0].exit_code, Some(3));
    assert_eq!(log_text(&m, b.id, 0).await, "compiling\n");
    assert!(!m.dir.path().join("basedir-w1/widgets/ran-anyway").exists());
    m.stop().await;
}

#[tokio::test]
async fn a_timeout_kills_the_whole_process_group() {
    // The step starts a background child that would write a file after 3 s;
    // the timeout (1 s) must kill it too.
    let toml = r#"
[[builder]]
name = "slow"
workers = ["w1"]
[[builder.step]]
name = "hang"
shell = "(sleep 3; touch child-survived) & echo started; sleep 30"
timeout = "1s"

[[scheduler]]
name = "all"
builders = ["slow"]
"#;
    let (m, _w, b) = run_one(toml, "main").await;
    assert_eq!(b.result, Some(Outcome::Failure));
    assert!(b.steps[0].detail.contains("timed out"), "{:?}", b.steps[0]);
    assert_eq!(log_text(&m, b.id, 0).await, "started\n");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !m.dir.path().join("basedir-w1/slow/child-survived").exists(),
        "a child of the step outlived the timeout"
    );
    m.stop().await;
}

#[tokio::test]
async fn two_workers_share_one_builders_queue() {
    let toml = r#"
[[builder]]
name = "widgets"
workers = ["w1", "w2"]
[[builder.step]]
name = "work"
shell = "sleep 0.5; echo done"

[[scheduler]]
name = "all"
builders = ["widgets"]
"#;
    let m = master_with(&[("w1", "w1-pw", 1), ("w2", "w2-pw", 1)], toml).await;
    let _w1 = worker(&m, "w1", "w1-pw");
    let _w2 = worker(&m, "w2", "w2-pw");
    wait_connected(&m, 2).await;
    let mut events = m.master.builds().subscribe();
    for _ in 0..4 {
        push(&m, "main").await;
    }
    let ended = builds_ended(&mut events, 4).await;
    assert!(ended.iter().all(|(_, r)| r == "success"), "{ended:?}");
    let builds = m.master.state().builds(None, 10).await.unwrap();
    let on = |w: &str| builds.iter().filter(|b| b.worker == w).count();
    assert_eq!(on("w1") + on("w2"), 4);
    assert!(
        on("w1") >= 1 && on("w2") >= 1,
        "both workers took builds: w1 {} w2 {}",
        on("w1"),
        on("w2")
    );
    m.stop().await;
}

#[tokio::test]
async fn an_unknown_worker_cannot_log_in() {
    let m = master_with(&[("w1", "w1-pw", 1)], TWO_STEPS).await;
    // A user that exists but is not a worker, and a name that does not exist.
    let err = m.login("hook", "hook-pw", "worker").await.err().unwrap();
    assert_eq!(
        err.reject_code(),
        Some(switchyard::proto::RejectCode::NotAuthorized)
    );
    let err = m.login("w9", "w1-pw", "worker").await.err().unwrap();
    assert_eq!(
        err.reject_code(),
        Some(switchyard::proto::RejectCode::AuthFailed)
    );
    // The real worker still connects.
    let _w = worker(&m, "w1", "w1-pw");
    wait_connected(&m, 1).await;
    m.stop().await;
}

/// Logs in as worker `name` in-process and says hello; with `alive`, a task
/// answers the master's heartbeats as a real worker does.
async fn fake_worker(
    m: &TestMaster,
    name: &str,
    password: &str,
    alive: bool,
) -> (String, tokio::task::JoinHandle<()>) {
    use futures_util::{SinkExt, StreamExt};
    use prost::Message;
    use switchyard::proto::{
        MasterMessage, WorkerHello, WorkerMessage, master_message, worker_message,
    };
    let mut s = m.login(name, password, "worker").await.unwrap();
    let hello = WorkerMessage {
        kind: Some(worker_message::Kind::Hello(WorkerHello {
            hostname: "fake".into(),
            ..Default::default()
        })),
    };
    s.stream
        .send(bytes::Bytes::from(hello.encode_to_vec()))
        .await
        .unwrap();
    let id = s.session_id.clone();
    let task = tokio::spawn(async move {
        if !alive {
            // Hold the connection open but never answer.
            std::future::pending::<()>().await;
        }
        while let Some(Ok(frame)) = s.stream.next().await {
            if let Ok(MasterMessage {
                kind: Some(master_message::Kind::Heartbeat(hb)),
            }) = MasterMessage::decode(frame.freeze())
            {
                let reply = WorkerMessage {
                    kind: Some(worker_message::Kind::Heartbeat(hb)),
                };
                if s.stream
                    .send(bytes::Bytes::from(reply.encode_to_vec()))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
    });
    (id, task)
}

fn connected_session(m: &TestMaster, name: &str) -> Option<String> {
    m.master
        .builds()
        .connected()
        .into_iter()
        .find(|l| l.name == name)
        .map(|l| l.session_id.clone())
}

#[tokio::test]
async fn a_second_login_is_refused_while_the_first_answers_and_replaces_it_when_it_does_not() {
    let m = master_with(&[("w1", "w1-pw", 1)], TWO_STEPS).await;
    let (first, _alive) = fake_worker(&m, "w1", "w1-pw", true).await;
    within("w1 to register", async {
        while connected_session(&m, "w1").is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let (second, _t) = fake_worker(&m, "w1", "w1-pw", true).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        connected_session(&m, "w1").as_deref(),
        Some(first.as_str()),
        "a live session must not be replaced"
    );
    assert_ne!(first, second);
    drop(_alive);

    // A first session that does not answer is replaced within a few seconds.
    let m2 = master_with(&[("w1", "w1-pw", 1)], TWO_STEPS).await;
    let (silent, _s) = fake_worker(&m2, "w1", "w1-pw", false).await;
    within("w1 to register", async {
        while connected_session(&m2, "w1").is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let (newer, _n) = fake_worker(&m2, "w1", "w1-pw", true).await;
    within("the silent session to be replaced", async {
        while connected_session(&m2, "w1").as_deref() != Some(newer.as_str()) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_ne!(silent, newer);
    m.stop().await;
    m2.stop().await;
}

#[tokio::test]
async fn a_big_log_streams_byte_exact_while_other_builds_finish() {
    // 32 MiB of output through the worker's window and the master's batches,
    // while a second worker's quick builds keep finishing.
    let toml = r#"
[[builder]]
name = "big"
workers = ["w1"]
[[builder.step]]
name = "print"
shell = "head -c 33554432 /dev/zero | tr '\\0' 'x'"

[[builder]]
name = "quick"
workers = ["w2"]
[[builder.step]]
name = "say"
shell = "echo quick"

[[scheduler]]
name = "all"
builders = ["big", "quick"]
"#;
    let m = master_with(&[("w1", "w1-pw", 1), ("w2", "w2-pw", 1)], toml).await;
    let _w1 = worker(&m, "w1", "w1-pw");
    let _w2 = worker(&m, "w2", "w2-pw");
    wait_connected(&m, 2).await;
    let mut events = m.master.builds().subscribe();
    for _ in 0..3 {
        push(&m, "main").await;
    }
    let ended = builds_ended(&mut events, 6).await;
    assert!(ended.iter().all(|(_, r)| r == "success"), "{ended:?}");
    let builds = m
        .master
        .state()
        .builds(Some("big".into()), 10)
        .await
        .unwrap();
    assert_eq!(builds.len(), 3);
    for b in builds {
        let chunks = m
            .master
            .state()
            .log_page(b.steps[0].row, 0, usize::MAX)
            .await
            .unwrap();
        let seqs: Vec<u64> = chunks.iter().map(|c| c.seq).collect();
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "chunks are numbered without gaps"
        );
        let total: usize = chunks.iter().map(|c| c.data.len()).sum();
        assert_eq!(total, 32 << 20);
        assert!(chunks.iter().all(|c| c.data.iter().all(|&b| b == b'x')));
    }
    m.stop().await;
}

#[tokio::test]
async fn a_reload_adds_a_worker_and_a_builder() {
    let m = master_with(&[("w1", "w1-pw", 1)], TWO_STEPS).await;
    // w2 is not configured yet: it cannot log in.
    assert!(m.login("w2", "w2-pw", "worker").await.is_err());
    let config = std::fs::read_to_string(m.config_path()).unwrap();
    let more = r#"
[[worker]]
name = "w2"

[[builder]]
name = "gadgets"
workers = ["w2"]
[[builder.step]]
name = "make"
shell = "echo gadget"

[[scheduler]]
name = "gadgets"
builders = ["gadgets"]
branches = ["gadgets"]
"#;
    std::fs::write(m.config_path(), config + more).unwrap();
    let secrets_path = m.dir.path().join("secrets.toml");
    let secrets = std::fs::read_to_string(&secrets_path).unwrap()
        + secrets_text(&[("w2", "w2-pw", &[])]).trim_start_matches("[verifiers]\n");
    std::fs::write(&secrets_path, secrets).unwrap();
    m.master.reload().await.unwrap();
    let _w2 = worker(&m, "w2", "w2-pw");
    wait_connected(&m, 1).await;
    let mut events = m.master.builds().subscribe();
    push(&m, "gadgets").await;
    let ended = builds_ended(&mut events, 1).await;
    assert_eq!(ended[0].1, "success");
    assert_eq!(log_text(&m, ended[0].0, 0).await, "gadget\n");
    m.stop().await;
}

#[tokio::test]
async fn steps_get_a_clean_environment_without_the_workers_password() {
    // `[worker.env]` right after the `[[worker]]` tables belongs to `w1`.
    let toml = r#"
[worker.env]
FROM_MASTER = "worker-config"
SHADOWED = "by-worker"

[[builder]]
name = "widgets"
workers = ["w1"]
[[builder.step]]
name = "env"
shell = "env | sort; tr '\\0' '\\n' < /proc/$PPID/environ > supervisor.env && echo supervisor-environ-read; sed 's/^/supervisor:/' supervisor.env"
env = { SHADOWED = "by-step" }

[[scheduler]]
name = "main"
builders = ["widgets"]
"#;
    let m = master_with(&[("w1", "w1-pw", 1)], toml).await;
    let _w = spawn_worker_with(
        &m,
        "w1",
        "w1-pw",
        "basedir-w1",
        &["--pass-env", "PASSED_ON"],
        &[
            ("PASSED_ON", "yes"),
            ("NOT_PASSED", "leak"),
            ("LC_TIME", "C"),
            ("TZ", "UTC"),
        ],
    );
    wait_connected(&m, 1).await;
    let mut events = m.master.builds().subscribe();
    push(&m, "main").await;
    let ended = builds_ended(&mut events, 1).await;
    assert_eq!(ended[0].1, "success");
    let log = log_text(&m, ended[0].0, 0).await;
    assert!(
        !log.contains("w1-pw"),
        "the password reached a step:\n{log}"
    );
    assert!(!log.contains("SWITCHYARD_PASSWORD"), "{log}");
    assert!(!log.contains("NOT_PASSED"), "{log}");
    for line in [
        "PASSED_ON=yes",
        "LC_TIME=C",
        "TZ=UTC",
        "FROM_MASTER=worker-config",
        "SHADOWED=by-step",
        // The step could read its supervisor's environment (which holds
        // nothing of the worker's: the supervisor starts with none).
        "supervisor-environ-read",
    ] {
        assert!(log.lines().any(|l| l == line), "no {line} in:\n{log}");
    }
    assert!(log.lines().any(|l| l.starts_with("PATH=")), "{log}");
    // Nothing else from the worker's environment: every variable is one
    // the README lists, or one the master or --pass-env gave.
    let allowed = [
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "TMPDIR",
        "TZ",
        "PASSED_ON",
        "FROM_MASTER",
        "SHADOWED",
        "PWD",
        "SHLVL",
        "_",
        "OLDPWD",
    ];
    // The build's own variables (pushed: repository widgets, branch main,
    // revision r1).
    let basedir = m.dir.path().join("basedir-w1");
    for line in [
        "SWITCHYARD_REPOSITORY=widgets".to_string(),
        "SWITCHYARD_BRANCH=main".to_string(),
        "SWITCHYARD_REVISION=r1".to_string(),
        "SWITCHYARD_BUILDER=widgets".to_string(),
        "SWITCHYARD_BUILD_NUMBER=1".to_string(),
        format!("SWITCHYARD_BUILD_ID={}", ended[0].0),
        "SWITCHYARD_WORKER=w1".to_string(),
        format!("SWITCHYARD_BUILDDIR={}/widgets", basedir.display()),
    ] {
        assert!(log.lines().any(|l| l == line), "no {line} in:\n{log}");
    }
    let documented = [
        "SWITCHYARD_REPOSITORY",
        "SWITCHYARD_BRANCH",
        "SWITCHYARD_REVISION",
        "SWITCHYARD_BUILDER",
        "SWITCHYARD_BUILD_NUMBER",
        "SWITCHYARD_BUILD_ID",
        "SWITCHYARD_WORKER",
        "SWITCHYARD_BUILDDIR",
    ];
    for l in log
        .lines()
        .filter(|l| !l.starts_with("supervisor:") && *l != "supervisor-environ-read")
    {
        let name = l.split('=').next().unwrap();
        assert!(
            allowed.contains(&name) || documented.contains(&name) || name.starts_with("LC_"),
            "{name} reached the step"
        );
    }
    m.stop().await;
}

#[test]
fn a_worker_refuses_to_pass_its_own_password() {
    let out = std::process::Command::new(BIN)
        .args([
            "worker",
            "--master",
            "127.0.0.1:9",
            "--name",
            "w",
            "--basedir",
        ])
        .arg(std::env::temp_dir().join("switchyard-never-used"))
        .args(["--pass-env", "SWITCHYARD_PASSWORD"])
        .env("SWITCHYARD_PASSWORD", "pw")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--pass-env") && err.contains("never passed"),
        "{err}"
    );
}

#[tokio::test]
async fn output_chunks_out_of_sequence_close_the_workers_session() {
    use futures_util::{SinkExt, StreamExt};
    use prost::Message;
    use switchyard::proto::{
        MasterMessage, StepOutput, WorkerHello, WorkerMessage, master_message, worker_message,
    };
    let toml = one_step_builder("widgets", "hello", "echo hello");
    let m = master_with(&[("w1", "w1-pw", 1)], &toml).await;
    for bad_seq in [0u64, 2, u64::MAX] {
        // A hand-made worker that sends one chunk with a bad number.
        let creds = switchyard::client::Credentials::new("w1", "w1-pw");
        let mut s = within(
            "a worker login",
            switchyard::client::connect(&m.addr.to_string(), "worker", &creds),
        )
        .await
        .unwrap();
        let hello = WorkerMessage {
            kind: Some(worker_message::Kind::Hello(WorkerHello::default())),
        };
        s.stream
            .send(bytes::Bytes::from(hello.encode_to_vec()))
            .await
            .unwrap();
        wait_connected(&m, 1).await;
        if bad_seq == 0 {
            m.master
                .builds()
                .force("widgets", "", "", "", "test")
                .await
                .unwrap();
        }
        let start = within("a StartStep", async {
            loop {
                let f = s.stream.next().await.unwrap().unwrap();
                if let Some(master_message::Kind::Start(st)) =
                    MasterMessage::decode(f.freeze()).unwrap().kind
                {
                    break st;
                }
            }
        })
        .await;
        let out = WorkerMessage {
            kind: Some(worker_message::Kind::Output(StepOutput {
                step_id: start.step_id,
                seq: bad_seq,
                stream: 1,
                data: bytes::Bytes::from_static(b"never shown"),
            })),
        };
        s.stream
            .send(bytes::Bytes::from(out.encode_to_vec()))
            .await
            .unwrap();
        // The master closes the session instead of storing the chunk.
        within("the master to close the session", async {
            while let Some(Ok(_)) = s.stream.next().await {}
        })
        .await;
    }
    // A real worker then runs the build to its end; nothing bad was stored.
    let mut events = m.master.builds().subscribe();
    let _w = worker(&m, "w1", "w1-pw");
    let ended = builds_ended(&mut events, 1).await;
    assert_eq!(ended[0].1, "success");
    assert_eq!(log_text(&m, ended[0].0, 0).await, "hello\n");
    m.stop().await;
}

const PROPERTIES: &str = r#"
[worker.properties]
arch = "x86_64"

[[builder]]
name = "props"
workers = ["w1"]
[[builder.step]]
name = "shell"
shell = "echo branch=%(prop:branch)s; echo default=%(prop:nope:-dflt)s plus=%(prop:arch:+set)s date=+%Y"
[[builder.step]]
name = "command"
command = ["printf", "%s|%s\n", "b=%(prop:branch)s", "%(prop:ticket)s"]
[[builder.step]]
name = "envvar"
shell = "echo $FROM_PROP"
env = { FROM_PROP = "%(prop:arch)s-%(prop:builder)s" }
[[builder.step]]
name = "emit"
shell = "echo version=1.2.3; echo not a property"
set_properties = "stdout"
[[builder.step]]
name = "use"
shell = "echo v=%(prop:version)s"
[[builder.step]]
name = "missing"
shell = "echo %(prop:undefined_thing)s"
[[builder.step]]
name = "never"
shell = "touch never-ran"

[[scheduler]]
name = "all"
builders = ["props"]
[scheduler.properties]
channel = "stable"
"#;

#[tokio::test]
async fn properties_are_interpolated_quoted_and_stored_with_their_sources() {
    let m = master_with(&[("w1", "w1-pw", 1)], PROPERTIES).await;
    let _w = worker(&m, "w1", "w1-pw");
    wait_connected(&m, 1).await;
    let mut events = m.master.builds().subscribe();
    let evil = "x';touch pwned;'";
    push_change(
        &m,
        switchyard::proto::Change {
            repository: "widgets".into(),
            branch: evil.into(),
            revision: "abc".into(),
            // Later sources win: the build names its builder, the worker its arch.
            properties: [
                ("ticket".to_string(), "T-1".to_string()),
                ("builder".to_string(), "from-change".to_string()),
                ("arch".to_string(), "from-change".to_string()),
            ]
            .into(),
            ..Default::default()
        },
    )
    .await;
    let ended = builds_ended(&mut events, 1).await;
    assert_eq!(
        ended[0].1, "failure",
        "the step with a missing property fails"
    );
    let b = m.master.state().build(ended[0].0).await.unwrap().unwrap();
    // A branch that would run a command if it were not quoted is text.
    assert_eq!(
        log_text(&m, b.id, 0).await,
        format!("branch={evil}\ndefault=dflt plus=set date=+%Y\n")
    );
    let dir = m.dir.path().join("basedir-w1/props");
    assert!(
        !dir.join("pwned").exists(),
        "an interpolated value ran as a command"
    );
    assert_eq!(log_text(&m, b.id, 1).await, format!("b={evil}|T-1\n"));
    assert_eq!(log_text(&m, b.id, 2).await, "x86_64-props\n");
    // The missing property fails its step, naming it; later steps do not run.
    // A step set a property for the steps after it.
    assert_eq!(log_text(&m, b.id, 4).await, "v=1.2.3\n");
    let missing = &b.steps[5];
    assert_eq!(missing.result, Some(Outcome::Failure));
    assert!(
        missing.detail.contains("undefined_thing"),
        "{}",
        missing.detail
    );
    assert_eq!(b.steps.len(), 6);
    assert!(!dir.join("never-ran").exists());
    // Stored with their sources; later sources win.
    let prop = |name: &str| {
        b.properties
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, v, s)| (v.as_str(), s.as_str()))
    };
    assert_eq!(prop("branch"), Some((evil, "change")));
    assert_eq!(prop("ticket"), Some(("T-1", "change")));
    assert_eq!(prop("scheduler"), Some(("all", "scheduler")));
    assert_eq!(prop("channel"), Some(("stable", "scheduler")));
    assert_eq!(prop("version"), Some(("1.2.3", "step")));
    assert_eq!(prop("builder"), Some(("props", "build")));
    assert_eq!(prop("build_number"), Some(("1", "build")));
    assert_eq!(prop("arch"), Some(("x86_64", "worker")));
    assert_eq!(prop("worker_os"), Some((std::env::consts::OS, "worker")));
    // Numbers go on per builder.
    push(&m, "main").await;
    let ended = builds_ended(&mut events, 1).await;
    let b2 = m.master.state().build(ended[0].0).await.unwrap().unwrap();
    assert_eq!(b2.number, 2);
    m.stop().await;
}

const SECRET: &str = "s3cr3t-Tok3n-42";

const SECRETS: &str = r#"
[[builder]]
name = "deploy"
workers = ["w1"]
[[builder.step]]
name = "whole"
shell = "echo token=%(secret:token)s; echo on stderr %(secret:token)s >&2"
[[builder.step]]
name = "split"
env = { T = "%(secret:token)s" }
shell = "printf '%s' \"$T\" | head -c 6; sleep 0.5; printf '%s\\n' \"$T\" | tail -c +7; printf 's3cr3t-'"
[[builder.step]]
name = "clone"
git = { repository = "/nowhere/%(secret:token)s.git", mode = "full" }

[[scheduler]]
name = "all"
builders = ["deploy"]
"#;

#[tokio::test]
async fn a_step_secret_is_masked_in_logs_and_never_stored() {
    let m = master_with_secrets(
        &[("w1", "w1-pw", 1)],
        SECRETS,
        &format!("\n[step_secrets]\ntoken = {SECRET:?}\n"),
    )
    .await;
    let _w = worker(&m, "w1", "w1-pw");
    wait_connected(&m, 1).await;
    let mut events = m.master.builds().subscribe();
    push(&m, "main").await;
    let ended = builds_ended(&mut events, 1).await;
    assert_eq!(ended[0].1, "failure", "the git step's repository is absent");
    let b = m.master.state().build(ended[0].0).await.unwrap().unwrap();
    // Printed whole, on both streams.
    let whole = log_text(&m, b.id, 0).await;
    assert!(whole.contains("token=<secret:token>\n"), "{whole}");
    assert!(whole.contains("on stderr <secret:token>\n"), "{whole}");
    // Printed in two writes half a second apart (two output chunks), then a
    // prefix of it at the very end, which is no secret and is kept.
    assert_eq!(log_text(&m, b.id, 1).await, "<secret:token>\ns3cr3t-");
    // git's own message, with the secret in the URL masked.
    let clone = log_text(&m, b.id, 2).await;
    assert!(clone.contains("/nowhere/<secret:token>.git"), "{clone}");
    assert!(!clone.contains(SECRET), "{clone}");
    assert_eq!(b.steps[2].result, Some(Outcome::Failure));
    // Nowhere in what the master stored, nor in what the console shows.
    let shown = debug_cli(
        &m,
        ADMIN.0,
        ADMIN.1,
        &["build", &b.id.to_string(), "--json"],
    )
    .await
    .unwrap();
    assert!(
        shown.contains("deploy") && !shown.contains(SECRET),
        "{shown}"
    );
    for entry in std::fs::read_dir(m.dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.to_string_lossy().contains("state.sqlite") {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
                "{} holds the secret",
                path.display()
            );
        }
    }
    m.stop().await;
}

#[tokio::test]
async fn a_worker_that_cannot_mask_gets_no_secret() {
    let m = master_with_secrets(
        &[("w1", "w1-pw", 1)],
        &(one_step_builder("deploy", "whole", "echo %(secret:token)s")
            + "\n[[scheduler]]\nname = \"all\"\nbuilders = [\"deploy\"]\n"),
        &format!("\n[step_secrets]\ntoken = {SECRET:?}\n"),
    )
    .await;
    // An old worker: its hello does not say it masks secrets.
    let (_id, _task) = fake_worker(&m, "w1", "w1-pw", true).await;
    wait_connected(&m, 1).await;
    let mut events = m.master.builds().subscribe();
    push(&m, "main").await;
    let ended = builds_ended(&mut events, 1).await;
    assert_eq!(ended[0].1, "failure");
    let b = m.master.state().build(ended[0].0).await.unwrap().unwrap();
    assert!(
        b.steps[0].detail.contains("cannot mask step secrets"),
        "{}",
        b.steps[0].detail
    );
    m.stop().await;
}

/// Runs git in `cwd` as Ada, with the hook's settings for `m`.
fn git(m: &TestMaster, cwd: &std::path::Path, args: &[&str]) -> String {
    git_as_hook(
        &m.addr.to_string(),
        &m.dir.path().join("widgets.git"),
        m.dir.path(),
        cwd,
        args,
    )
}

const CHECKOUT: &str = r#"
[[builder]]
name = "widgets"
workers = ["w1"]
[[builder.step]]
name = "checkout"
git = { repository = "%(prop:repository)s", mode = "full" }
[[builder.step]]
name = "check"
shell = "git rev-parse HEAD; echo got=$SWITCHYARD_GOT_REVISION; ./check.sh"

[[scheduler]]
name = "main"
builders = ["widgets"]
branches = ["main"]
"#;

/// A bare repository `widgets.git` with the example hook, and one push of
/// two commits: the first breaks `check.sh`, the second fixes it. Returns
/// their revisions.
fn push_two_commits(m: &TestMaster) -> Vec<String> {
    let bare = m.dir.path().join("widgets.git");
    let work = m.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    git(
        m,
        m.dir.path(),
        &["init", "--bare", "-q", bare.to_str().unwrap()],
    );
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/examples/post-receive"),
        bare.join("hooks/post-receive"),
    )
    .unwrap();
    git(m, &work, &["init", "-q"]);
    let check = work.join("check.sh");
    let mut revisions = Vec::new();
    for (body, msg) in [
        ("#!/bin/sh\nexit 1\n", "break it"),
        ("#!/bin/sh\nexit 0\n", "fix it"),
    ] {
        std::fs::write(&check, body).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&check, std::fs::Permissions::from_mode(0o755)).unwrap();
        git(m, &work, &["add", "check.sh"]);
        git(m, &work, &["commit", "-q", "-m", msg]);
        revisions.push(git(m, &work, &["rev-parse", "HEAD"]).trim().to_string());
    }
    git(m, &work, &["push", "-q", bare.to_str().unwrap(), "main"]);
    revisions
}

// Multi-threaded: git runs blocking here while its hook talks to the
// in-process master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_build_checks_out_exactly_the_commit_it_was_made_for() {
    let m = master_with(&[("w1", "w1-pw", 1)], CHECKOUT).await;
    let _w = worker(&m, "w1", "w1-pw");
    wait_connected(&m, 1).await;
    let mut events = m.master.builds().subscribe();
    let revisions = push_two_commits(&m);
    let ended = builds_ended(&mut events, 2).await;
    let mut builds = Vec::new();
    for (id, _) in &ended {
        builds.push(m.master.state().build(*id).await.unwrap().unwrap());
    }
    builds.sort_by_key(|b| b.number);
    for (b, (rev, expected)) in builds
        .iter()
        .zip(revisions.iter().zip(["failure", "success"]))
    {
        assert_eq!(b.revision, *rev);
        assert_eq!(
            b.result.map(|o| o.as_str()),
            Some(expected),
            "build {} of {rev}",
            b.number
        );
        let log = log_text(&m, b.id, 1).await;
        assert_eq!(
            log.lines().next(),
            Some(rev.as_str()),
            "build {} ran another commit: {log}",
            b.number
        );
        assert!(log.contains(&format!("got={rev}")), "{log}");
        let got = b.properties.iter().find(|(n, _, _)| n == "got_revision");
        assert_eq!(
            got.map(|(_, v, s)| (v.as_str(), s.as_str())),
            Some((rev.as_str(), "step"))
        );
    }
    m.stop().await;
}

// Multi-threaded: git runs blocking here while its hook talks to the
// in-process master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_revision_or_branch_fails_the_git_step_with_a_clear_message() {
    let m = master_with(&[("w1", "w1-pw", 1)], CHECKOUT).await;
    let _w = worker(&m, "w1", "w1-pw");
    wait_connected(&m, 1).await;
    let mut events = m.master.builds().subscribe();
    push_two_commits(&m);
    builds_ended(&mut events, 2).await;
    let bare = m.dir.path().join("widgets.git");
    for (branch, revision, says) in [
        (
            "main",
            "0123456789abcdef0123456789abcdef01234567",
            "not our ref",
        ),
        ("nobranch", "", "the repository has no branch nobranch"),
    ] {
        m.master
            .builds()
            .force_with(
                "widgets",
                branch,
                revision,
                bare.to_str().unwrap(),
                "test",
                Default::default(),
            )
            .await
            .unwrap();
        let ended = builds_ended(&mut events, 1).await;
        assert_eq!(ended[0].1, "failure");
        let log = log_text(&m, ended[0].0, 0).await;
        assert!(log.contains(says), "{log}");
    }
    m.stop().await;
}

#[tokio::test]
async fn a_file_filter_lets_only_matching_changes_build() {
    let toml = one_step_builder("widgets", "hello", "echo hello")
        + "\n[[scheduler]]\nname = \"code\"\nbuilders = [\"widgets\"]\nfile_filter = [\"src/**\", \"!src/generated/**\"]\n";
    let m = master_with(&[("w1", "w1-pw", 1)], &toml).await;
    let _w = worker(&m, "w1", "w1-pw");
    wait_connected(&m, 1).await;
    let mut events = m.master.builds().subscribe();
    let change = |files: &[&str], rev: &str| switchyard::proto::Change {
        repository: "widgets".into(),
        branch: "main".into(),
        revision: rev.into(),
        files: files.iter().map(|f| f.to_string()).collect(),
        ..Default::default()
    };
    push_change(&m, change(&["docs/a.md"], "docs-only")).await;
    push_change(&m, change(&["src/generated/x.rs"], "generated-only")).await;
    push_change(&m, change(&["docs/a.md", "src/lib.rs"], "code")).await;
    let ended = builds_ended(&mut events, 1).await;
    let b = m.master.state().build(ended[0].0).await.unwrap().unwrap();
    assert_eq!(b.revision, "code");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        m.master.state().builds(None, 10).await.unwrap().len(),
        1,
        "only the change touching src/ (outside generated/) builds"
    );
    m.stop().await;
}

#[tokio::test]
async fn collapsed_requests_make_one_build_of_the_newest_change() {
    let toml = one_step_builder("widgets", "hello", "echo %(prop:revision)s").replacen(
        "workers = [\"w1\"]\n",
        "workers = [\"w1\"]\ncollapse_requests = true\n",
        1,
    ) + "\n[[scheduler]]\nname = \"all\"\nbuilders = [\"widgets\"]\n";
    let m = master_with(&[("w1", "w1-pw", 1)], &toml).await;
    let mut ids = Vec::new();
    for (rev, branch) in [
        ("a", "main"),
        ("b", "main"),
        ("other", "dev"),
        ("c", "main"),
    ] {
        ids.push(
            push_change(
                &m,
                switchyard::proto::Change {
                    repository: "widgets".into(),
                    branch: branch.into(),
                    revision: rev.into(),
                    ..Default::default()
                },
            )
            .await,
        );
    }
    // The worker arrives after all four requests wait.
    let mut events = m.master.builds().subscribe();
    let _w = worker(&m, "w1", "w1-pw");
    let ended = builds_ended(&mut events, 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let builds = m.master.state().builds(None, 10).await.unwrap();
    assert_eq!(
        builds.len(),
        2,
        "main's three requests collapse into one build"
    );
    let main = builds.iter().find(|b| b.branch == "main").unwrap();
    assert_eq!(main.revision, "c");
    assert_eq!(log_text(&m, main.id, 0).await, "c\n");
    let change_ids = main
        .properties
        .iter()
        .find(|(n, _, _)| n == "change_ids")
        .map(|(_, v, _)| v.clone());
    assert_eq!(
        change_ids,
        Some(format!("{},{},{}", ids[0], ids[1], ids[3]))
    );
    assert!(ended.iter().all(|(_, r)| r == "success"));
    m.stop().await;
}

#[tokio::test]
async fn a_tree_stable_timer_makes_one_build_of_the_newest_once_pushes_stop() {
    let toml = one_step_builder("widgets", "hello", "echo %(prop:revision)s")
        + "\n[[scheduler]]\nname = \"stable\"\nbuilders = [\"widgets\"]\ntree_stable_timer = \"1s\"\n";
    let m = master_with(&[("w1", "w1-pw", 1)], &toml).await;
    let _w = worker(&m, "w1", "w1-pw");
    wait_connected(&m, 1).await;
    let mut events = m.master.builds().subscribe();
    let mut ids = Vec::new();
    for rev in ["first", "second"] {
        ids.push(
            push_change(
                &m,
                switchyard::proto::Change {
                    repository: "widgets".into(),
                    branch: "main".into(),
                    revision: rev.into(),
                    ..Default::default()
                },
            )
            .await,
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Still within a second of the last push: nothing has started.
    assert!(m.master.state().builds(None, 10).await.unwrap().is_empty());
    let ended = builds_ended(&mut events, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let builds = m.master.state().builds(None, 10).await.unwrap();
    assert_eq!(builds.len(), 1, "one build for the batch");
    assert_eq!(builds[0].id, ended[0].0);
    assert_eq!(builds[0].revision, "second");
    let change_ids = builds[0]
        .properties
        .iter()
        .find(|(n, _, _)| n == "change_ids")
        .map(|(_, v, _)| v.clone());
    assert_eq!(change_ids, Some(format!("{},{}", ids[0], ids[1])));
    m.stop().await;
}

#[tokio::test]
async fn a_nightly_scheduler_builds_on_its_clock_only_when_the_branch_changed() {
    // A "nightly" that fires every second.
    let toml = one_step_builder("widgets", "hello", "echo %(prop:revision)s")
        + "\n[[scheduler]]\nname = \"nightly\"\nkind = \"nightly\"\ncron = \"* * * * * *\"\nbranch = \"main\"\nonly_if_changed = true\nbuilders = [\"widgets\"]\n";
    let m = master_with(&[("w1", "w1-pw", 1)], &toml).await;
    let _w = worker(&m, "w1", "w1-pw");
    wait_connected(&m, 1).await;
    let mut events = m.master.builds().subscribe();
    let change = |rev: &str| switchyard::proto::Change {
        repository: "widgets".into(),
        branch: "main".into(),
        revision: rev.into(),
        ..Default::default()
    };
    push_change(&m, change("one")).await;
    // The push itself builds nothing; the next firing builds the newest.
    let ended = builds_ended(&mut events, 1).await;
    let b = m.master.state().build(ended[0].0).await.unwrap().unwrap();
    assert_eq!(b.revision, "one");
    assert_eq!(b.reason, "nightly scheduler nightly");
    // Firings with nothing new build nothing.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(m.master.state().builds(None, 10).await.unwrap().len(), 1);
    push_change(&m, change("two")).await;
    let ended = builds_ended(&mut events, 1).await;
    let b = m.master.state().build(ended[0].0).await.unwrap().unwrap();
    assert_eq!(b.revision, "two");
    assert_eq!(log_text(&m, b.id, 0).await, "two\n");
    m.stop().await;
}

#[tokio::test]
async fn a_nightly_firing_missed_while_the_master_was_down_fires_once_across_restarts() {
    // Fires once a minute, at a second a few seconds from now. No worker
    // connects: the requests wait, and are counted.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let second = (now.as_secs() + 3) % 60;
    let toml = one_step_builder("widgets", "hello", "true")
        + &format!(
            "\n[[scheduler]]\nname = \"nightly\"\nkind = \"nightly\"\ncron = \"{second} * * * * *\"\nbranch = \"main\"\nbuilders = [\"widgets\"]\n"
        );
    let waiting = |m: &TestMaster| {
        let state = m.master.state().clone();
        async move { state.waiting_requests().await.unwrap().len() }
    };
    let m = master_with(&[("w1", "w1-pw", 1)], &toml).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(waiting(&m).await, 0, "not due yet");
    // Down across the firing...
    let dir = m.stop_keeping_files().await;
    let fired_at = std::time::UNIX_EPOCH + Duration::from_secs(now.as_secs() + 4);
    while std::time::SystemTime::now() < fired_at {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ...the next master fires it once, at start.
    let m = TestMaster::start_in(dir).await;
    within("the missed firing", async {
        while waiting(&m).await == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(waiting(&m).await, 1, "one request for one missed firing");
    // Restarted again within the same minute: that firing is done.
    let dir = m.stop_keeping_files().await;
    let m = TestMaster::start_in(dir).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let requests = m.master.state().waiting_requests().await.unwrap();
    assert_eq!(requests.len(), 1, "a firing is never made twice");
    assert_eq!(requests[0].request.reason, "nightly scheduler nightly");
    m.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_push_under_a_tree_stable_timer_makes_one_build_of_the_newest() {
    let toml = CHECKOUT.replace(
        "branches = [\"main\"]",
        "branches = [\"main\"]\ntree_stable_timer = \"1s\"",
    );
    let m = master_with(&[("w1", "w1-pw", 1)], &toml).await;
    let _w = worker(&m, "w1", "w1-pw");
    wait_connected(&m, 1).await;
    let mut events = m.master.builds().subscribe();
    let revisions = push_two_commits(&m);
    let ended = builds_ended(&mut events, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(m.master.state().builds(None, 10).await.unwrap().len(), 1);
    let b = m.master.state().build(ended[0].0).await.unwrap().unwrap();
    assert_eq!(b.result, Some(Outcome::Success));
    assert_eq!(b.revision, revisions[1]);
    let log = log_text(&m, b.id, 1).await;
    assert_eq!(log.lines().next(), Some(revisions[1].as_str()), "{log}");
    let ids = b
        .properties
        .iter()
        .find(|(n, _, _)| n == "change_ids")
        .map(|(_, v, _)| v.split(',').count());
    assert_eq!(ids, Some(2), "both changes recorded on the one build");
    m.stop().await;
}

/// Adds `keys` to the `[master]` table of `m`'s config and reloads it.
async fn reload_with_master_keys(m: &TestMaster, keys: &str) {
    let text = std::fs::read_to_string(m.config_path()).unwrap();
    let text = text.replacen(
        "heartbeat_interval = \"1s\"",
        &format!("heartbeat_interval = \"1s\"\n{keys}"),
        1,
    );
    std::fs::write(m.config_path(), text).unwrap();
    within("a reload", m.master.reload()).await.unwrap();
}

#[tokio::test]
async fn a_step_past_max_log_size_is_cut_with_a_marker_or_fails() {
    // 200,000 bytes, then a line, then a while: with `truncate` the step
    // goes on and succeeds; with `fail` it is stopped at the limit.
    let toml = r#"
[[builder]]
name = "chatty"
workers = ["w1"]
[[builder.step]]
name = "print"
shell = "head -c 200000 /dev/zero | tr '\\0' 'a'; echo; echo after; if [ -e stop-early ]; then exit 0; fi; sleep 20"
[[builder.step]]
name = "next"
shell = "echo next"

[[scheduler]]
name = "all"
builders = ["chatty"]
"#;
    let m = master_with(&[("w1", "w1-pw", 1)], toml).await;
    reload_with_master_keys(&m, "max_log_size = \"64KiB\"").await;
    let w = worker(&m, "w1", "w1-pw");
    wait_connected(&m, 1).await;
    // The step's directory, for `stop-early`.
    let workdir = m.dir.path().join("basedir-w1/chatty");
    std::fs::create_dir_all(&workdir).unwrap();
    std::fs::write(workdir.join("stop-early"), "").unwrap();
    let mut events = m.master.builds().subscribe();
    push(&m, "main").await;
    let (id, result) = builds_ended(&mut events, 1).await.remove(0);
    assert_eq!(result, "success");
    let log = log_text(&m, id, 0).await;
    assert_eq!(log.len(), 65536 + log[65536..].len());
    assert!(
        log[..65536].bytes().all(|b| b == b'a'),
        "the first 64 KiB kept"
    );
    assert_eq!(
        &log[65536..],
        "\n[switchyard: this step's output passed max_log_size (65536 bytes); the rest was not stored]\n"
    );
    assert_eq!(log_text(&m, id, 1).await, "next\n");

    // `fail`: stopped at the limit, not 20 s later; the next step does not run.
    std::fs::remove_file(workdir.join("stop-early")).unwrap();
    reload_with_master_keys(&m, "on_log_limit = \"fail\"").await;
    let started = std::time::Instant::now();
    push(&m, "main").await;
    let (id, result) = builds_ended(&mut events, 1).await.remove(0);
    assert_eq!(result, "failure");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    let b = m.master.state().build(id).await.unwrap().unwrap();
    assert_eq!(b.steps.len(), 1);
    assert_eq!(b.steps[0].result, Some(Outcome::Failure));
    assert!(
        b.steps[0].detail.contains("max_log_size (65536 bytes)"),
        "{}",
        b.steps[0].detail
    );
    assert!(
        log_text(&m, id, 0)
            .await
            .ends_with("the rest was not stored]\n")
    );
    drop(w);
    m.stop().await;
}

#[tokio::test]
async fn retention_prunes_old_logs_then_old_builds_while_builds_run() {
    let toml = r#"
[[builder]]
name = "widgets"
workers = ["w1"]
[[builder.step]]
name = "say"
shell = "seq 1 20000"

[[scheduler]]
name = "all"
builders = ["widgets"]
"#;
    let m = master_with(&[("w1", "w1-pw", 1)], toml).await;
    let _w = worker(&m, "w1", "w1-pw");
    wait_connected(&m, 1).await;
    let mut events = m.master.builds().subscribe();
    for _ in 0..4 {
        push(&m, "main").await;
    }
    let mut ids: Vec<i64> = builds_ended(&mut events, 4)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    ids.sort();
    let expected: String = (1..=20000).map(|n| format!("{n}\n")).collect();
    // Builds 1 and 2 ended 100 days ago, build 3 40 days ago.
    let day = 24 * 3600 * 1000i64;
    for (id, days) in [(ids[0], 100), (ids[1], 100), (ids[2], 40)] {
        m.master
            .state()
            .write(move |c| {
                c.execute(
                    "UPDATE builds SET finished_ms = finished_ms - ?2 WHERE id = ?1",
                    [id, days * day],
                )
            })
            .await
            .unwrap();
    }
    let files = |id: i64| {
        let m = &m;
        async move {
            let b = m.master.state().build(id).await.unwrap().unwrap();
            m.master.state().log_files().stats(b.steps[0].row).unwrap()
        }
    };
    assert!(files(ids[2]).await.is_some());
    // A build runs while the reload's pass prunes.
    push(&m, "main").await;
    reload_with_master_keys(&m, "build_retention = \"90d\"\nlog_retention = \"30d\"").await;
    let (running, result) = builds_ended(&mut events, 1).await.remove(0);
    assert_eq!(result, "success");
    assert_eq!(log_text(&m, running, 0).await, expected);
    within("the pruning", async {
        while m.master.state().build(ids[0]).await.unwrap().is_some()
            || files(ids[2]).await.is_some()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // Past 90 days: gone, builds and all. Past 30: the build stays, its
    // log does not. Newer: untouched.
    assert!(m.master.state().build(ids[1]).await.unwrap().is_none());
    let kept = m.master.state().build(ids[2]).await.unwrap().unwrap();
    assert_eq!(kept.result, Some(Outcome::Success));
    assert_eq!(log_text(&m, ids[2], 0).await, "");
    assert_eq!(log_text(&m, ids[3], 0).await, expected);
    let stored: String = m
        .master
        .state()
        .read(move |c| {
            c.query_row(
                "SELECT log_stored FROM steps WHERE build_id = ?1",
                [kept.id],
                |r| r.get(0),
            )
        })
        .await
        .unwrap();
    assert_eq!(stored, "pruned");
    // The console and the API say where each log is, and how big.
    let json = |id: i64| {
        let m = &m;
        async move {
            let out = debug_cli(m, ADMIN.0, ADMIN.1, &["--json", "build", &id.to_string()])
                .await
                .unwrap();
            serde_json::from_str::<serde_json::Value>(&out).unwrap()[0].clone()
        }
    };
    let pruned = json(ids[2]).await;
    assert_eq!(pruned["steps"][0]["log"]["stored"], "pruned", "{pruned}");
    let (head, body) = http_get(
        &m,
        &format!("/api/v1/builds/{}/log", ids[2]),
        Some(&basic(ADMIN.0, ADMIN.1)),
    )
    .await;
    assert!(
        head.contains(" 410 ") && body.contains("log_retention"),
        "{head}{body}"
    );
    let whole = json(ids[3]).await;
    assert_eq!(whole["steps"][0]["log"]["bytes"], expected.len(), "{whole}");
    assert_eq!(whole["steps"][0]["log"]["lines"], 20000, "{whole}");
    // No file is left of the deleted builds' logs.
    let left = std::fs::read_dir(m.dir.path().join("logs/0"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "idx")
        })
        .count();
    assert_eq!(left, 2, "the two newest builds' logs");
    m.stop().await;
}

/// A small tmpfs mounted for a test (it needs root, as CI has), unmounted
/// when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(at: &std::path::Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(at).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "this test fills a disk: it mounts a {size} tmpfs, which needs root (as CI runs): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk(at.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_fails_the_step_that_cannot_write_and_the_master_recovers() {
    let toml = r#"
[[builder]]
name = "small"
workers = ["w1"]
[[builder.step]]
name = "say"
shell = "seq 1 1000"

[[builder]]
name = "big"
workers = ["w1"]
[[builder.step]]
name = "print"
shell = "head -c 3000000 /dev/zero | tr '\\0' 'b'"

[[builder]]
name = "ship"
workers = ["w1"]
[[builder.step]]
name = "make"
shell = "head -c 3000000 /dev/urandom > app"
[[builder.step]]
name = "up"
upload = { source = "app", name = "app" }
"#;
    let m = master_with(&[("w1", "w1-pw", 1)], toml).await;
    let data = m.dir.path().join("data");
    let disk = SmallDisk::mount(&data, "4m");
    // The logs go to the small disk from the next start: the state
    // database stays where it is.
    let text = std::fs::read_to_string(m.config_path()).unwrap();
    std::fs::write(
        m.config_path(),
        text.replacen(
            "heartbeat_interval = \"1s\"",
            "heartbeat_interval = \"1s\"\ndata_dir = \"data\"",
            1,
        ),
    )
    .unwrap();
    let dir = m.stop_keeping_files().await;
    let m = TestMaster::start_in(dir).await;
    let _w = worker(&m, "w1", "w1-pw");
    wait_connected(&m, 1).await;
    let mut events = m.master.builds().subscribe();
    let force = |builder: &'static str| {
        let m = &m;
        async move {
            m.master
                .builds()
                .force(builder, "", "", "", "test")
                .await
                .unwrap()
        }
    };
    force("small").await;
    let (small, result) = builds_ended(&mut events, 1).await.remove(0);
    assert_eq!(result, "success");
    let expected: String = (1..=1000).map(|n| format!("{n}\n")).collect();
    // The disk fills up: about 1 MiB is left.
    let filler = data.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while std::fs::metadata(&filler).unwrap().len() < 3 * 1024 * 1024 {
            if f.write_all(&block).is_err() {
                break;
            }
        }
        f.sync_all().unwrap();
    }
    force("big").await;
    let (big, result) = builds_ended(&mut events, 1).await.remove(0);
    assert_eq!(result, "failure");
    let b = m.master.state().build(big).await.unwrap().unwrap();
    assert!(
        b.steps[0]
            .detail
            .contains("could not store this step's output")
            && b.steps[0].detail.contains("No space left on device"),
        "{}",
        b.steps[0].detail
    );
    // An upload cannot land either: its step fails, saying why, and
    // leaves nothing half-received.
    force("ship").await;
    let (ship, result) = builds_ended(&mut events, 1).await.remove(0);
    assert_eq!(result, "failure");
    let b = m.master.state().build(ship).await.unwrap().unwrap();
    assert!(
        b.steps[1].detail.contains("No space left on device"),
        "{}",
        b.steps[1].detail
    );
    assert!(m.master.state().artifacts(ship).await.unwrap().is_empty());
    // What was stored before is whole, and readable.
    assert_eq!(log_text(&m, small, 0).await, expected);
    let partial = log_text(&m, big, 0).await;
    assert!(partial.bytes().all(|c| c == b'b') && partial.len() < 3_000_000);
    // Space comes back: the next build stores all of its output.
    std::fs::remove_file(&filler).unwrap();
    force("big").await;
    let (again, result) = builds_ended(&mut events, 1).await.remove(0);
    assert_eq!(result, "success");
    let log = log_text(&m, again, 0).await;
    assert_eq!(log.len(), 3_000_000);
    assert_eq!(log_text(&m, small, 0).await, expected);
    // Nothing half-written is left taking room (a compression that could
    // not finish on the full disk cleans up after itself).
    let received: Vec<_> = std::fs::read_dir(data.join("uploads/0"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(received.is_empty(), "a failed upload's files: {received:?}");
    let mut left = vec![data.join("logs")];
    while let Some(d) = left.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            assert!(!p.to_string_lossy().ends_with(".tmp"), "{p:?}");
            if p.is_dir() {
                left.push(p);
            }
        }
    }
    let dir = m.stop_keeping_files().await;
    drop(disk);
    drop(dir);
}

#[tokio::test]
async fn an_upload_survives_two_link_cuts_and_arrives_whole() {
    let toml = r#"
[[builder]]
name = "art"
workers = ["w1"]
[[builder.step]]
name = "make"
shell = "head -c 134217728 /dev/urandom > app; mkdir -p dist/sub; echo one > dist/a.txt; echo two > dist/sub/b.txt; ln -sfn /etc dist/etc-link"
[[builder.step]]
name = "upload-app"
upload = { source = "app", name = "app" }
[[builder.step]]
name = "upload-dist"
upload = { source = "./dist", name = "dist.tar" }
"#;
    let m = master_with(&[("w1", "w1-pw", 1)], toml).await;
    let proxy = Proxy::start(m.addr).await;
    let _w = spawn_worker_via(&m, proxy.addr, "w1", "w1-pw", "basedir");
    wait_connected(&m, 1).await;
    let mut events = m.master.builds().subscribe();
    m.master
        .builds()
        .force("art", "", "", "", "test")
        .await
        .unwrap();
    // Cut the link twice while the 128 MiB upload is on its way: once
    // some of it is stored, and again once more is stored after the
    // worker is back.
    let mut cuts = 0;
    let mut uploading = false;
    let ended = within("the build, through two cuts", async {
        loop {
            let e = events.recv().await.unwrap();
            match e.event {
                switchyard::builds::Event::StepStarted { step, .. } => {
                    uploading = step == "upload-app";
                }
                switchyard::builds::Event::OutputStored { .. } if uploading && cuts < 2 => {
                    proxy.cut();
                    cuts += 1;
                    // Wait for the worker to be back before the next cut.
                    while m.master.builds().connected().is_empty() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                switchyard::builds::Event::BuildEnded { build, outcome, .. } => {
                    return (build, outcome.to_string());
                }
                _ => {}
            }
        }
    })
    .await;
    assert_eq!(cuts, 2, "the upload was cut twice");
    assert_eq!(ended.1, "success");
    let build = ended.0;
    // The artifact is the worker's file, byte for byte, and says so.
    let sent = std::fs::read(m.dir.path().join("basedir/art/app")).unwrap();
    let stored = std::fs::read(m.dir.path().join(format!("artifacts/{build}/app"))).unwrap();
    assert!(
        stored == sent,
        "the artifact differs from the worker's file"
    );
    let digest: String = {
        use sha2::Digest;
        sha2::Sha256::digest(&sent)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    // The upload step's log holds what it said, not the artifact's bytes.
    let said = log_text(&m, build, 1).await;
    assert!(
        said.len() < 1000 && said.ends_with(&format!("{digest}, 134217728 bytes\n")),
        "{said}"
    );
    let admin = basic(ADMIN.0, ADMIN.1);
    let (head, body) = http_get(
        &m,
        &format!("/api/v1/builds/{build}/artifacts"),
        Some(&admin),
    )
    .await;
    assert!(head.contains(" 200 "), "{head}");
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list["artifacts"][0]["name"], "app");
    assert_eq!(list["artifacts"][0]["size"], 134_217_728);
    assert_eq!(list["artifacts"][0]["sha256"], digest);
    assert_eq!(list["artifacts"][1]["name"], "dist.tar");
    // So does the console, by id or BUILDER#NUMBER.
    let listed = debug_cli(&m, ADMIN.0, ADMIN.1, &["artifacts", "art#1"])
        .await
        .unwrap();
    assert!(
        listed.contains(&format!("app 134217728 bytes sha256 {digest}")),
        "{listed}"
    );
    let listed = debug_cli(
        &m,
        ADMIN.0,
        ADMIN.1,
        &["--json", "artifacts", &build.to_string()],
    )
    .await
    .unwrap();
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed[1]["name"], "dist.tar");
    // The build's page lists them, with links to download them.
    let (head, page) = http_get(&m, &format!("/builds/{build}"), Some(&admin)).await;
    assert!(head.contains(" 200 "), "{head}");
    assert!(
        page.contains(&format!("/api/v1/builds/{build}/artifacts/app")) && page.contains(&digest),
        "{page}"
    );
    // The directory came as a tar stream: its files, and its symbolic
    // link as a link (not followed).
    let mut raw = Raw::connect(m.addr).await;
    raw.write(
        format!("GET /api/v1/builds/{build}/artifacts/dist.tar HTTP/1.0\r\nAuthorization: {admin}\r\n\r\n")
            .as_bytes(),
    )
    .await;
    let reply = raw.read_to_close().await;
    let at = reply.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    assert!(String::from_utf8_lossy(&reply[..at]).contains(" 200 "));
    let mut archive = tar::Archive::new(&reply[at + 4..]);
    let mut seen = std::collections::BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let kind = entry.header().entry_type();
        let mut text = String::new();
        if kind.is_file() {
            std::io::Read::read_to_string(&mut entry, &mut text).unwrap();
        }
        seen.insert(
            path.trim_start_matches("./").to_string(),
            (kind.is_symlink(), text),
        );
    }
    assert_eq!(seen["a.txt"], (false, "one\n".to_string()));
    assert_eq!(seen["sub/b.txt"], (false, "two\n".to_string()));
    assert!(seen["etc-link"].0, "{seen:?}");
    assert!(
        !seen.keys().any(|k| k.starts_with("etc-link/")),
        "the link was followed"
    );
    let (head, _) = http_get(
        &m,
        &format!("/api/v1/builds/{build}/artifacts/nosuch"),
        Some(&admin),
    )
    .await;
    assert!(head.contains(" 404 "), "{head}");
    // A build deleted by retention takes its artifacts with it.
    m.master
        .state()
        .write(move |c| {
            c.execute(
                "UPDATE builds SET finished_ms = finished_ms - 100 * 86400000 WHERE id = ?1",
                [build],
            )
        })
        .await
        .unwrap();
    reload_with_master_keys(&m, "build_retention = \"90d\"").await;
    let kept = m.dir.path().join(format!("artifacts/{build}"));
    within("the build and its artifacts to go", async {
        while kept.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(m.master.state().artifacts(build).await.unwrap().is_empty());
    m.stop().await;
}

#[tokio::test]
async fn an_upload_cannot_leave_the_steps_directory() {
    // In the config: refused when it is read.
    let text = "[master]\nsecrets = \"s.toml\"\n\n[[worker]]\nname = \"w1\"\n\n[[builder]]\nname = \"b\"\nworkers = [\"w1\"]\n[[builder.step]]\nname = \"up\"\nupload = { source = \"../secrets\", name = \"x\" }\n";
    let err = switchyard::config::Config::parse(std::path::Path::new("master.toml"), text)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("builder.step.upload.source") && err.contains("no `..`"),
        "{err}"
    );
    let named = text
        .replace("../secrets", "ok")
        .replace("name = \"x\"", "name = \"../x\"");
    let err = switchyard::config::Config::parse(std::path::Path::new("master.toml"), &named)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("builder.step.upload.name"), "{err}");
    // On the worker: a symbolic link out of the step's directory.
    let toml = r#"
[[builder]]
name = "sneaky"
workers = ["w1"]
[[builder.step]]
name = "link"
shell = "ln -sfn /etc/hostname out"
[[builder.step]]
name = "up"
upload = { source = "out", name = "out" }
"#;
    let (m, _w, b) = {
        let m = master_with(&[("w1", "w1-pw", 1)], toml).await;
        let w = worker(&m, "w1", "w1-pw");
        wait_connected(&m, 1).await;
        let mut events = m.master.builds().subscribe();
        m.master
            .builds()
            .force("sneaky", "", "", "", "test")
            .await
            .unwrap();
        let ended = builds_ended(&mut events, 1).await;
        let b = m.master.state().build(ended[0].0).await.unwrap().unwrap();
        (m, w, b)
    };
    assert_eq!(b.result, Some(Outcome::Failure));
    assert!(
        log_text(&m, b.id, 1)
            .await
            .contains("leads outside the step's directory")
    );
    assert!(m.master.state().artifacts(b.id).await.unwrap().is_empty());
    m.stop().await;
}

#[tokio::test]
async fn an_upload_past_max_artifact_size_or_its_builds_share_is_stopped_and_fails() {
    let toml = r#"
[[builder]]
name = "huge"
workers = ["w1"]
[[builder.step]]
name = "make"
shell = "head -c 3000000 /dev/zero > big"
[[builder.step]]
name = "up"
upload = { source = "big", name = "big" }

[[builder]]
name = "pair"
workers = ["w1"]
[[builder.step]]
name = "make"
shell = "head -c 800000 /dev/urandom > a; head -c 800000 /dev/urandom > b"
[[builder.step]]
name = "up-a"
upload = { source = "a", name = "a" }
[[builder.step]]
name = "up-b"
upload = { source = "b", name = "b" }
"#;
    let m = master_with(&[("w1", "w1-pw", 1)], toml).await;
    reload_with_master_keys(
        &m,
        "max_artifact_size = \"1MiB\"\nmax_build_artifacts_size = \"1500KB\"",
    )
    .await;
    let _w = worker(&m, "w1", "w1-pw");
    wait_connected(&m, 1).await;
    let mut events = m.master.builds().subscribe();
    m.master
        .builds()
        .force("huge", "", "", "", "test")
        .await
        .unwrap();
    let (id, result) = builds_ended(&mut events, 1).await.remove(0);
    assert_eq!(result, "failure");
    let b = m.master.state().build(id).await.unwrap().unwrap();
    assert!(
        b.steps[1].detail.contains("max_artifact_size"),
        "{}",
        b.steps[1].detail
    );
    assert!(m.master.state().artifacts(id).await.unwrap().is_empty());
    // Nothing of it is left in the uploads being received.
    let left: Vec<_> = std::fs::read_dir(m.dir.path().join("uploads/0"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // Each of two 800 kB artifacts is within max_artifact_size, but not
    // both within the build's 1.5 MB: the second upload fails, saying so,
    // and the first stays.
    let (id, result) = force_and_wait(&m, "pair", &[]).await;
    assert_eq!(result, "failure");
    let b = m.master.state().build(id).await.unwrap().unwrap();
    assert_eq!(b.steps[1].result, Some(Outcome::Success));
    let detail = &b.steps[2].detail;
    assert!(
        detail.contains(
            "max_build_artifacts_size (1500000 bytes; the build's other artifacts take 800000)"
        ),
        "{detail}"
    );
    let kept: Vec<_> = m
        .master
        .state()
        .artifacts(id)
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.name, a.size))
        .collect();
    assert_eq!(kept, vec![("a".to_string(), 800_000)]);
    m.stop().await;
}

/// Forces a build of `builder` with `properties` and waits for its end.
async fn force_and_wait(
    m: &TestMaster,
    builder: &str,
    properties: &[(&str, &str)],
) -> (i64, String) {
    let mut events = m.master.builds().subscribe();
    m.master
        .builds()
        .force_with(
            builder,
            "",
            "",
            "",
            "test",
            properties
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
        .await
        .unwrap();
    builds_ended(&mut events, 1).await.remove(0)
}

#[tokio::test]
async fn a_download_brings_another_builders_artifact_across_two_link_cuts() {
    let outside = tempfile::tempdir().unwrap();
    let toml = r#"
[[builder]]
name = "make"
workers = ["w1"]
[[builder.step]]
name = "make"
shell = "head -c 100663296 /dev/urandom > app; mkdir -p site/sub wheels; echo one > site/a.txt; echo two > site/sub/b.txt; echo a > wheels/a.whl; echo b > wheels/b.whl; echo c > wheels/c.txt"
[[builder.step]]
name = "upload-app"
upload = { source = "app", name = "app" }
[[builder.step]]
name = "upload-site"
upload = { source = "site", name = "site" }
[[builder.step]]
name = "upload-wheels"
upload = { source = "wheels/*.whl", name = "wheels" }

[[builder]]
name = "use"
workers = ["w1"]
[[builder.step]]
name = "get-app"
download = { name = "app", from = "latest-success:make", dest = "bin/app" }
[[builder.step]]
name = "get-site"
download = { name = "site", from = "%(prop:upstream)s", dest = "www" }
[[builder.step]]
name = "get-wheels"
download = { name = "wheels", from = "make#1", dest = "." }
[[builder.step]]
name = "check"
shell = "sha256sum bin/app; cat www/a.txt www/sub/b.txt; ls -a bin; ls wheels"

[[builder]]
name = "sneaky"
workers = ["w1"]
[[builder.step]]
name = "link"
shell = "ln -sfn \"$OUTSIDE\" out"
env = { OUTSIDE = "%(prop:outside)s" }
[[builder.step]]
name = "get"
download = { name = "app", from = "make#1", dest = "out/app" }

[[builder]]
name = "nothing"
workers = ["w1"]
[[builder.step]]
name = "get"
download = { name = "app", from = "latest-success:nobody", dest = "app" }
"#;
    let m = master_with(&[("w1", "w1-pw", 1)], toml).await;
    let proxy = Proxy::start(m.addr).await;
    let _w = spawn_worker_via(&m, proxy.addr, "w1", "w1-pw", "basedir");
    wait_connected(&m, 1).await;
    let (made, result) = force_and_wait(&m, "make", &[]).await;
    assert_eq!(result, "success");
    let sent = std::fs::read(m.dir.path().join("basedir/make/app")).unwrap();
    let digest = {
        use sha2::Digest;
        switchyard::wire::hex(&sha2::Sha256::digest(&sent))
    };

    // The other builder's build fetches it; the link is cut twice while the
    // 96 MiB come, each time once more of it is on the worker's disk.
    let mut events = m.master.builds().subscribe();
    let upstream = made.to_string();
    m.master
        .builds()
        .force_with(
            "use",
            "",
            "",
            "",
            "test",
            [("upstream".to_string(), upstream)].into_iter().collect(),
        )
        .await
        .unwrap();
    let partial = m
        .dir
        .path()
        .join("basedir/use/bin/.app.switchyard-download");
    let mut cuts = 0;
    let mut cut_at = 0u64;
    let ended = within("the download, through two cuts", async {
        loop {
            tokio::select! {
                e = events.recv() => {
                    if let switchyard::builds::Event::BuildEnded { build, outcome, .. } = e.unwrap().event {
                        return (build, outcome.to_string());
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(1)) => {
                    let have = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
                    if cuts < 2 && have >= cut_at + (16 << 20) {
                        proxy.cut();
                        cuts += 1;
                        cut_at = have;
                        while m.master.builds().connected().is_empty() {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
            }
        }
    })
    .await;
    assert_eq!(cuts, 2, "the download was cut twice");
    assert_eq!(ended.1, "success");
    let got = std::fs::read(m.dir.path().join("basedir/use/bin/app")).unwrap();
    assert!(got == sent, "the downloaded file differs from the upload");
    let said = log_text(&m, ended.0, 0).await;
    assert!(
        said.contains(&format!("100663296 bytes, sha256 {digest}")),
        "{said}"
    );
    // The directory was unpacked; the step after them saw both, and no
    // partial file is left.
    let checked = log_text(&m, ended.0, 3).await;
    assert!(checked.contains(&format!("{digest}  bin/app")), "{checked}");
    assert!(checked.contains("one\ntwo\n"), "{checked}");
    assert!(!checked.contains("switchyard-download"), "{checked}");
    // The glob sent the wheels only, at their paths.
    assert!(checked.ends_with("a.whl\nb.whl\n"), "{checked}");

    // A destination through a link out of the step's directory is refused,
    // and nothing is written there.
    let (sneaky, result) = force_and_wait(
        &m,
        "sneaky",
        &[("outside", outside.path().to_str().unwrap())],
    )
    .await;
    assert_eq!(result, "failure");
    let b = m.master.state().build(sneaky).await.unwrap().unwrap();
    let detail = &b.steps[1].detail;
    assert!(
        detail.contains("refused") && detail.contains("outside"),
        "{detail}"
    );
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);

    // An artifact nobody stored fails the step before it starts, saying so.
    let (nothing, result) = force_and_wait(&m, "nothing", &[]).await;
    assert_eq!(result, "failure");
    let b = m.master.state().build(nothing).await.unwrap().unwrap();
    assert!(
        b.steps[0]
            .detail
            .contains("no successful build of builder `nobody` stored an artifact `app`"),
        "{}",
        b.steps[0].detail
    );
    m.stop().await;
}

#[tokio::test]
async fn an_upload_glob_that_matches_nothing_fails_the_step() {
    let toml = r#"
[[builder]]
name = "none"
workers = ["w1"]
[[builder.step]]
name = "up"
upload = { source = "dist/*.whl", name = "wheels" }
"#;
    let m = master_with(&[("w1", "w1-pw", 1)], toml).await;
    let _w = worker(&m, "w1", "w1-pw");
    wait_connected(&m, 1).await;
    let (id, result) = force_and_wait(&m, "none", &[]).await;
    assert_eq!(result, "failure");
    let said = log_text(&m, id, 0).await;
    assert!(
        said.contains("\"dist/*.whl\": nothing matches it"),
        "{said}"
    );
    assert!(m.master.state().artifacts(id).await.unwrap().is_empty());
    m.stop().await;
}

#[test]
fn a_download_destination_must_stay_in_the_steps_directory() {
    let text = "[master]\nsecrets = \"s.toml\"\n\n[[worker]]\nname = \"w1\"\n\n[[builder]]\nname = \"b\"\nworkers = [\"w1\"]\n[[builder.step]]\nname = \"get\"\ndownload = { name = \"x\", from = \"latest-success:a\", dest = \"../x\" }\n";
    let parse = |t: &str| {
        switchyard::config::Config::parse(std::path::Path::new("master.toml"), t)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let err = parse(text);
    assert!(
        err.contains("builder.step.download.dest") && err.contains("no `..`"),
        "{err}"
    );
    let err = parse(&text.replace("../x", "/etc/x"));
    assert!(err.contains("builder.step.download.dest"), "{err}");
    let err = parse(
        &text
            .replace("../x", "ok")
            .replace("name = \"x\"", "name = \"../x\""),
    );
    assert!(err.contains("builder.step.download.name"), "{err}");
    let err = parse(
        &text
            .replace("../x", "ok")
            .replace("latest-success:a", "%(secret:tok)s"),
    );
    assert!(err.contains("builder.step.download.from"), "{err}");
    let fine = parse(&text.replace("../x", "bin/x"));
    assert!(!fine.contains("download"), "{fine}");
}

#[tokio::test]
async fn an_old_worker_gets_no_download_and_a_stray_ask_is_stopped() {
    let toml = r#"
[[builder]]
name = "use"
workers = ["w1"]
[[builder.step]]
name = "get"
download = { name = "app", from = "latest-success:make", dest = "app" }
"#;
    let m = master_with(&[("w1", "w1-pw", 1)], toml).await;
    // An old worker: its hello does not say it runs downloads.
    let (_id, task) = fake_worker(&m, "w1", "w1-pw", true).await;
    wait_connected(&m, 1).await;
    let (id, result) = force_and_wait(&m, "use", &[]).await;
    assert_eq!(result, "failure");
    let b = m.master.state().build(id).await.unwrap().unwrap();
    assert!(
        b.steps[0]
            .detail
            .contains("cannot run download steps; upgrade it"),
        "{}",
        b.steps[0].detail
    );
    task.abort();
    let _ = m.master.builds().hangup("w1");
    // A worker asking for the artifact of a step it does not run gets no
    // byte of anything, and is told to stop that step.
    use futures_util::{SinkExt, StreamExt};
    use prost::Message;
    use switchyard::proto::{
        ArtifactWanted, MasterMessage, WorkerHello, WorkerMessage, master_message, worker_message,
    };
    let mut s = within("a second session", async {
        loop {
            if let Ok(s) = m.login("w1", "w1-pw", "worker").await {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    for kind in [
        worker_message::Kind::Hello(WorkerHello {
            downloads: true,
            ..Default::default()
        }),
        worker_message::Kind::Wanted(ArtifactWanted {
            step_id: vec![7; 16],
            offset: 0,
            length: 1 << 20,
        }),
    ] {
        let msg = WorkerMessage { kind: Some(kind) };
        s.stream
            .send(bytes::Bytes::from(msg.encode_to_vec()))
            .await
            .unwrap();
    }
    let told = within("the master's answer", async {
        loop {
            let frame = s.stream.next().await.unwrap().unwrap();
            match MasterMessage::decode(frame.freeze()).unwrap().kind {
                Some(master_message::Kind::Interrupt(i)) => return i,
                Some(master_message::Kind::Data(_)) => panic!("artifact bytes for a stray ask"),
                _ => {}
            }
        }
    })
    .await;
    assert_eq!(told.step_id, vec![7; 16]);
    m.stop().await;
}

/// A master and worker `w1` where builder `make` has stored `bytes` random
/// bytes as the artifact `app` (its build's id is returned), and builder
/// `use` is `use_step` (a download step, say).
async fn master_with_made_artifact(bytes: u64, use_step: &str) -> (TestMaster, Reaped, i64) {
    let toml = format!(
        "[[builder]]\nname = \"make\"\nworkers = [\"w1\"]\n[[builder.step]]\nname = \"make\"\nshell = \"head -c {bytes} /dev/urandom > app\"\n[[builder.step]]\nname = \"up\"\nupload = {{ source = \"app\", name = \"app\" }}\n\n[[builder]]\nname = \"use\"\nworkers = [\"w1\"]\n[[builder.step]]\n{use_step}"
    );
    let m = master_with(&[("w1", "w1-pw", 1)], &toml).await;
    let w = worker(&m, "w1", "w1-pw");
    wait_connected(&m, 1).await;
    let (made, result) = force_and_wait(&m, "make", &[]).await;
    assert_eq!(result, "success");
    (m, w, made)
}

#[tokio::test]
async fn a_download_of_an_artifact_damaged_on_the_master_fails_saying_so() {
    let (m, _w, made) = master_with_made_artifact(
        100_000,
        "name = \"get\"\ndownload = { name = \"app\", from = \"make#1\", dest = \"app\" }\n",
    )
    .await;
    // Cut short behind the master's back (a disk fault, a hand).
    let stored = m.dir.path().join(format!("artifacts/{made}/app"));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&stored)
        .unwrap()
        .set_len(500)
        .unwrap();
    let (id, result) = force_and_wait(&m, "use", &[]).await;
    assert_eq!(result, "failure");
    let b = m.master.state().build(id).await.unwrap().unwrap();
    assert!(
        b.steps[0].detail.contains(&format!(
            "the artifact `app` of build {made} cannot be read on the master: it has 500 bytes, 100000 were stored"
        )),
        "{}",
        b.steps[0].detail
    );
    assert!(!m.dir.path().join("basedir-w1/use/app").exists());
    m.stop().await;
}

#[tokio::test]
async fn a_download_past_its_timeout_stops_and_leaves_nothing() {
    let (m, _w, _) = master_with_made_artifact(
        64 << 20,
        "name = \"get\"\ndownload = { name = \"app\", from = \"latest-success:make\", dest = \"bin/app\" }\ntimeout = \"20ms\"\n",
    )
    .await;
    // 64 MiB take longer than 20 ms to come.
    let (id, result) = force_and_wait(&m, "use", &[]).await;
    assert_eq!(result, "failure");
    let b = m.master.state().build(id).await.unwrap().unwrap();
    assert!(
        b.steps[0].detail.contains(
            "timed out after 20ms; the download was stopped and its partial file removed"
        ),
        "{}",
        b.steps[0].detail
    );
    let bin = m.dir.path().join("basedir-w1/use/bin");
    let left: Vec<_> = std::fs::read_dir(&bin)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    m.stop().await;
}
