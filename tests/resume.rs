//! Builds survive a blinking link: the step keeps running on the worker, the
//! worker reconnects, the master re-attaches the step, and the log is byte
//! for byte what the command wrote: 200,000 numbered lines with pauses,
//! through link cuts, black holes and a master `kill -9`; lost steps follow
//! their `on_lost`.

mod common;

use std::time::Duration;
use switchyard::builds::{Event, Outcome};
use switchyard::store::BuildStore;

use common::*;

const COUNT: &str = r#"
[[builder]]
name = "count"
workers = ["w1"]
[[builder.step]]
name = "lines"
shell = "awk 'BEGIN { for (i = 1; i <= 200000; i++) { print \"line \" i; if (i % 20000 == 0) { fflush(); system(\"sleep 0.3\") } } }'"
[[builder.step]]
name = "after"
shell = "echo second step"
"#;

fn expected() -> String {
    (1..=200_000).map(|i| format!("line {i}\n")).collect()
}

async fn master_with_count(heartbeat: &str) -> TestMaster {
    let users = [HOOK, ADMIN];
    let dir = tempfile::tempdir().unwrap();
    let master = format!("heartbeat_interval = \"{heartbeat}\"\nworker_reconnect_grace = \"30s\"");
    let config = config_text(&master, &users) + "\n[[worker]]\nname = \"w1\"\n" + COUNT;
    std::fs::write(dir.path().join("master.toml"), config).unwrap();
    let secrets = secrets_text(&users)
        + secrets_text(&[("w1", "w1-pw", &[])]).trim_start_matches("[verifiers]\n");
    std::fs::write(dir.path().join("secrets.toml"), secrets).unwrap();
    TestMaster::start_in(dir).await
}

/// Runs the counting build through a proxy, disturbing the link with
/// `disturb` twice while the step prints; checks the build and its log.
async fn survives(disturb: fn(&Proxy), heartbeat: &str, pause: Duration) {
    let m = master_with_count(heartbeat).await;
    let proxy = Proxy::start(m.addr).await;
    let _w = spawn_worker_via(&m, proxy.addr, "w1", "w1-pw", "basedir");
    wait_connected(&m, 1).await;
    let first_session = m.master.builds().connected()[0].session_id.clone();
    let mut events = m.master.builds().subscribe();
    m.master
        .builds()
        .force("count", "", "", "", "test")
        .await
        .unwrap();

    for _ in 0..2 {
        tokio::time::sleep(pause).await;
        disturb(&proxy);
    }
    let ended = builds_ended(&mut events, 1).await;
    assert_eq!(ended[0].1, "success", "the build must survive the cuts");
    let b = m.master.state().build(ended[0].0).await.unwrap().unwrap();
    assert_eq!(b.steps.len(), 2, "no step re-run: {:?}", b.steps);
    assert!(b.steps.iter().all(|s| s.attempt == 1));
    let log = log_text(&m, b.id, 0).await;
    assert_eq!(log.len(), expected().len());
    assert!(
        log == expected(),
        "the log must be byte-exact: no chunk lost, none doubled"
    );
    assert_eq!(log_text(&m, b.id, 1).await, "second step\n");
    // The worker did reconnect (new session).
    let now = m.master.builds().connected();
    assert_eq!(now.len(), 1);
    assert_ne!(now[0].session_id, first_session);
    m.stop().await;
}

#[tokio::test]
async fn a_build_survives_link_cuts_with_a_byte_exact_log() {
    survives(Proxy::cut, "1s", Duration::from_millis(800)).await;
}

#[tokio::test]
async fn a_build_survives_a_black_holed_link() {
    // Nothing is closed: both sides must notice the silence (two heartbeat
    // intervals) and the worker must come back on a new link.
    survives(Proxy::black_hole, "500ms", Duration::from_millis(700)).await;
}

/// A master with one worker and one builder made of `steps_toml`.
async fn master_with_builder(steps_toml: &str) -> TestMaster {
    let users = [HOOK, ADMIN];
    let dir = tempfile::tempdir().unwrap();
    let master = "heartbeat_interval = \"1s\"\nworker_reconnect_grace = \"30s\"";
    let config = config_text(master, &users)
        + "\n[[worker]]\nname = \"w1\"\n\n[[builder]]\nname = \"b\"\nworkers = [\"w1\"]\n"
        + steps_toml;
    std::fs::write(dir.path().join("master.toml"), config).unwrap();
    let secrets = secrets_text(&users)
        + secrets_text(&[("w1", "w1-pw", &[])]).trim_start_matches("[verifiers]\n");
    std::fs::write(dir.path().join("secrets.toml"), secrets).unwrap();
    TestMaster::start_in(dir).await
}

const LONG: &str = "echo $$ >> ../pids; echo start; sleep 3; echo end";

/// Starts a build, kills the worker with -9 while step `victim` runs,
/// starts a new worker process, and returns the ended build.
async fn kill_worker_during(
    m: &TestMaster,
    victim: &str,
) -> (switchyard::store::BuildRecord, Reaped) {
    let mut w = spawn_worker(m, "w1", "w1-pw", "basedir");
    wait_connected(m, 1).await;
    let mut events = m.master.builds().subscribe();
    m.master
        .builds()
        .force("b", "", "", "", "test")
        .await
        .unwrap();
    within("the victim step to start", async {
        loop {
            if let Ok(e) = events.recv().await
                && let switchyard::builds::Event::StepStarted { step, .. } = e.event
                && step == victim
            {
                return;
            }
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    w.0.kill().unwrap(); // SIGKILL: the worker dies without a word
    w.0.wait().unwrap();
    let pids = std::fs::read_to_string(m.dir.path().join("basedir/pids")).unwrap();
    let step_pid: u32 = pids.lines().next().unwrap().trim().parse().unwrap();
    // No step process outlives its worker: the step host is told of
    // the worker's death by the kernel and kills the step's process group.
    within("the step to die with its worker", async {
        while std::fs::read_to_string(format!("/proc/{step_pid}/stat"))
            .is_ok_and(|s| !s.contains(") Z "))
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let w2 = spawn_worker(m, "w1", "w1-pw", "basedir");
    let ended = builds_ended(&mut events, 1).await;
    let b = m.master.state().build(ended[0].0).await.unwrap().unwrap();
    (b, w2)
}

fn attempts(b: &switchyard::store::BuildRecord) -> Vec<(String, u32, String)> {
    b.steps
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                s.attempt,
                s.result.map(|o| o.to_string()).unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_lost_step_with_on_lost_retry_runs_again_and_keeps_its_first_log() {
    let m = master_with_builder(&format!(
        "[[builder.step]]\nname = \"long\"\nshell = \"{LONG}\"\non_lost = \"retry\"\n"
    ))
    .await;
    let (b, _w) = kill_worker_during(&m, "long").await;
    assert_eq!(b.result, Some(Outcome::Success));
    assert_eq!(
        attempts(&b),
        vec![
            ("long".into(), 1, "exception".into()),
            ("long".into(), 2, "success".into())
        ]
    );
    assert!(
        b.steps[0].detail.contains("on_lost = retry"),
        "{}",
        b.steps[0].detail
    );
    assert_ne!(
        b.steps[0].step_id, b.steps[1].step_id,
        "a new attempt has a new step id"
    );
    assert_eq!(
        log_text(&m, b.id, 0).await,
        "start\n",
        "the lost attempt's log is kept"
    );
    assert_eq!(log_text(&m, b.id, 1).await, "start\nend\n");
    m.stop().await;
}

#[tokio::test]
async fn a_lost_step_with_on_lost_restart_runs_the_build_again() {
    let steps = format!(
        "[[builder.step]]\nname = \"checkout\"\nshell = \"echo checkout\"\n[[builder.step]]\nname = \"long\"\nshell = \"{LONG}\"\non_lost = \"restart\"\n"
    );
    let m = master_with_builder(&steps).await;
    let (b, _w) = kill_worker_during(&m, "long").await;
    assert_eq!(b.result, Some(Outcome::Success));
    assert_eq!(
        attempts(&b),
        vec![
            ("checkout".into(), 1, "success".into()),
            ("checkout".into(), 2, "success".into()),
            ("long".into(), 1, "exception".into()),
            ("long".into(), 2, "success".into()),
        ]
    );
    m.stop().await;
}

#[tokio::test]
async fn a_lost_step_with_on_lost_fail_fails_the_build() {
    let m = master_with_builder(&format!(
        "[[builder.step]]\nname = \"long\"\nshell = \"{LONG}\"\non_lost = \"fail\"\n"
    ))
    .await;
    let (b, _w) = kill_worker_during(&m, "long").await;
    assert_eq!(b.result, Some(Outcome::Failure));
    assert_eq!(attempts(&b), vec![("long".into(), 1, "exception".into())]);
    assert!(
        b.steps[0].detail.contains("on_lost = fail"),
        "{}",
        b.steps[0].detail
    );
    m.stop().await;
}

async fn debug_json(addr: &str, args: &[&str]) -> serde_json::Value {
    let (addr, args): (String, Vec<String>) = (
        addr.to_string(),
        args.iter().map(|s| s.to_string()).collect(),
    );
    let out = within(
        "switchyard debug",
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(BIN)
                .args(["debug", "--master", &addr, "--user", "admin", "--json"])
                .args(&args)
                .env("SWITCHYARD_PASSWORD", "admin-pw")
                .output()
                .unwrap()
        }),
    )
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A master process on a fixed loopback port (so that a restarted master is
/// found at the same address), with worker `w1` as a process too. Returns
/// the temp dir, the master, its address and the worker.
async fn master_and_worker_processes(
    builds_toml: &str,
    grace: &str,
) -> (tempfile::TempDir, Reaped, String, Reaped) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let users = [HOOK, ADMIN];
    let master = format!("heartbeat_interval = \"1s\"\nworker_reconnect_grace = \"{grace}\"");
    let config = config_text(&master, &users).replace("127.0.0.1:0", &format!("127.0.0.1:{port}"))
        + "\n[[worker]]\nname = \"w1\"\n"
        + builds_toml;
    std::fs::write(dir.path().join("master.toml"), config).unwrap();
    let secrets = secrets_text(&users)
        + secrets_text(&[("w1", "w1-pw", &[])]).trim_start_matches("[verifiers]\n");
    std::fs::write(dir.path().join("secrets.toml"), secrets).unwrap();
    let (master, addr) = master_process(dir.path());
    let worker = Reaped(
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
    within("the worker to connect", async {
        while debug_json(&addr, &["workers"]).await[0]["connected"] != true {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    (dir, master, addr, worker)
}

/// Waits for the newest build to end; returns it as `debug --json` shows it.
async fn newest_build_when_ended(addr: &str) -> serde_json::Value {
    within("the build to finish", async {
        loop {
            let builds = debug_json(addr, &["builds"]).await;
            if builds[0]["result"].is_string() {
                return builds[0].clone();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
}

/// The log of a build (or one step) as `switchyard debug log` prints it.
async fn debug_log(addr: &str, build: &serde_json::Value, step: Option<&str>) -> Vec<u8> {
    let (addr, id, step) = (
        addr.to_string(),
        build["id"].as_i64().unwrap().to_string(),
        step.map(String::from),
    );
    within(
        "the log",
        tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new(BIN);
            cmd.args([
                "debug", "--master", &addr, "--user", "admin", "log", &id, "--raw",
            ]);
            cmd.args(step);
            cmd.env("SWITCHYARD_PASSWORD", "admin-pw")
                .output()
                .unwrap()
                .stdout
        }),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn a_build_survives_the_master_being_killed_with_9() {
    let (dir, mut first, addr, _w) = master_and_worker_processes(COUNT, "30s").await;
    debug_json(&addr, &["force", "count"]).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    // Mid-step: kill -9 the master, start another on the same state.
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let (_second, addr2) = master_process(dir.path());
    assert_eq!(addr, addr2);
    let build = newest_build_when_ended(&addr).await;
    assert_eq!(build["result"], "success", "{build}");
    let steps = build["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2, "nothing re-run: {build}");
    assert!(steps.iter().all(|s| s["attempt"] == 1), "{build}");
    let log = debug_log(&addr, &build, Some("lines")).await;
    assert!(
        log == expected().into_bytes(),
        "the log must be byte-exact across the master's restart"
    );
}

#[tokio::test]
async fn a_step_keeps_printing_while_the_master_is_down_and_nothing_is_lost() {
    // 48 MiB printed while the worker has no master: past the 32 MiB held
    // in memory, the rest is spilled to disk, and the step runs to its end.
    let big = "[[builder]]\nname = \"big\"\nworkers = [\"w1\"]\n[[builder.step]]\nname = \"print\"\nshell = \"echo start; sleep 1; head -c 50331648 /dev/zero | tr '\\\\0' 'y'; echo; echo done\"\n";
    let (dir, mut first, addr, _w) = master_and_worker_processes(big, "60s").await;
    let basedir = dir.path().join("basedir");
    debug_json(&addr, &["force", "big"]).await;
    // Kill the master once the step runs (it sleeps a second before printing).
    let running = basedir.join(".switchyard/steps");
    within("the step to start", async {
        while std::fs::read_dir(&running).map(|d| d.count()).unwrap_or(0) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    first.0.kill().unwrap();
    first.0.wait().unwrap();

    // With no master, the step still runs to its end, its output spilled.
    let steps_dir = basedir.join(".switchyard/steps");
    let spill_dir = basedir.join(".switchyard/spill");
    let mut spilled = false;
    within("the step to finish while the master is down", async {
        loop {
            spilled |= std::fs::read_dir(&spill_dir).is_ok_and(|d| d.count() > 0);
            let running = std::fs::read_dir(&steps_dir)
                .map(|d| d.count())
                .unwrap_or(0);
            if spilled && running == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    let (_second, _) = master_process(dir.path());
    let build = newest_build_when_ended(&addr).await;
    assert_eq!(build["result"], "success", "{build}");
    assert_eq!(build["steps"][0]["attempt"], 1);
    let log = debug_log(&addr, &build, None).await;

    assert_eq!(log.len(), 6 + 50_331_648 + 1 + 5);
    assert!(log.starts_with(b"start\n") && log.ends_with(b"\ndone\n"));
    assert!(
        log[6..6 + 50_331_648].iter().all(|&b| b == b'y'),
        "byte-exact"
    );
    within("the spill to be cleaned up", async {
        while std::fs::read_dir(&spill_dir).is_ok_and(|d| d.count() > 0) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_stranger_failing_as_the_worker_cannot_lock_it_out_of_its_reconnect() {
    let toml = one_step_builder("slow", "wait", "sleep 3; echo finished");
    let m = master_with(&[("w1", "w1-pw", 1)], &toml).await;
    let proxy = Proxy::start(m.addr).await;
    let _w = spawn_worker_via(&m, proxy.addr, "w1", "w1-pw", "basedir");
    wait_connected(&m, 1).await;
    let mut events = m.master.builds().subscribe();
    m.master
        .builds()
        .force("slow", "", "", "", "test")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A stranger on the worker's own address guesses its password until
    // new logins as w1 from here are refused...
    for _ in 0..10 {
        assert!(m.login("w1", "guess", "worker").await.is_err());
    }
    let refused = m.login("w1", "w1-pw", "worker").await.err().unwrap();
    assert!(
        refused.to_string().contains("too many failed logins"),
        "{refused}"
    );
    // ...then the worker's link drops mid-build: it must get back in.
    proxy.cut();
    let ended = builds_ended(&mut events, 1).await;
    assert_eq!(
        ended[0].1, "success",
        "the worker was locked out of its reconnect"
    );
    assert_eq!(log_text(&m, ended[0].0, 0).await, "finished\n");
    // The worker keeps its token on disk: restarted, it gets back in too,
    // while a new client as w1 from here is still refused.
    assert!(
        m.dir
            .path()
            .join("basedir/.switchyard/device-token")
            .exists()
    );
    drop(_w);
    within("the old session to go", async {
        while !m.master.builds().connected().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let _w = spawn_worker_via(&m, proxy.addr, "w1", "w1-pw", "basedir");
    wait_connected(&m, 1).await;
    assert!(m.login("w1", "w1-pw", "worker").await.is_err());
    m.stop().await;
}

#[tokio::test]
async fn a_step_sent_to_a_dead_session_is_sent_again_not_lost() {
    let toml = one_step_builder("quick", "hello", "echo hello");
    let m = master_with(&[("w1", "w1-pw", 1)], &toml).await;
    let proxy = Proxy::start(m.addr).await;
    let mut old = spawn_worker_via(&m, proxy.addr, "w1", "w1-pw", "basedir");
    wait_connected(&m, 1).await;
    // The link goes silent, and the build is sent into it: the worker
    // never receives its StartStep.
    proxy.black_hole();
    let mut events = m.master.builds().subscribe();
    m.master
        .builds()
        .force("quick", "", "", "", "test")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The worker restarts (a new process on a good link) while the master
    // still holds the old session.
    let _ = old.0.kill();
    let _ = old.0.wait();
    let _new = spawn_worker(&m, "w1", "w1-pw", "basedir");
    let ended = builds_ended(&mut events, 1).await;
    assert_eq!(
        ended[0].1, "success",
        "a step the worker never received must be sent again, not lost"
    );
    let b = m.master.state().build(ended[0].0).await.unwrap().unwrap();
    assert_eq!(b.steps.len(), 1);
    assert_eq!(b.steps[0].attempt, 1, "not counted as a lost attempt");
    assert_eq!(log_text(&m, b.id, 0).await, "hello\n");
    m.stop().await;
}

#[tokio::test]
async fn an_upload_goes_on_across_a_master_kill_9_and_arrives_whole() {
    let toml = "[[builder]]\nname = \"art\"\nworkers = [\"w1\"]\n[[builder.step]]\nname = \"make\"\nshell = \"head -c 134217728 /dev/urandom > app\"\n[[builder.step]]\nname = \"up\"\nupload = { source = \"app\", name = \"app\" }\n";
    let (dir, mut first, addr, _w) = master_and_worker_processes(toml, "60s").await;
    debug_json(&addr, &["force", "art"]).await;
    // Kill the master once part of the upload is stored.
    let uploads = dir.path().join("uploads");
    within("the upload to start", async {
        loop {
            let stored: u64 = std::fs::read_dir(uploads.join("0"))
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                .map(|e| e.metadata().map_or(0, |m| m.len()))
                .sum();
            if stored > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let (_second, _) = master_process(dir.path());
    let build = newest_build_when_ended(&addr).await;
    assert_eq!(build["result"], "success", "{build}");
    assert_eq!(build["steps"][1]["attempt"], 1, "not run again: {build}");
    let id = build["id"].as_i64().unwrap();
    let sent = std::fs::read(dir.path().join("basedir/art/app")).unwrap();
    let stored = std::fs::read(dir.path().join(format!("artifacts/{id}/app"))).unwrap();
    assert!(stored == sent, "byte-exact across the restart");
}

#[tokio::test]
async fn a_download_goes_on_across_a_master_kill_9_and_arrives_whole() {
    let toml = "[[builder]]\nname = \"art\"\nworkers = [\"w1\"]\n[[builder.step]]\nname = \"make\"\nshell = \"head -c 134217728 /dev/urandom > app\"\n[[builder.step]]\nname = \"up\"\nupload = { source = \"app\", name = \"app\" }\n\n[[builder]]\nname = \"use\"\nworkers = [\"w1\"]\n[[builder.step]]\nname = \"get\"\ndownload = { name = \"app\", from = \"latest-success:art\", dest = \"app\" }\n[[builder.step]]\nname = \"check\"\nshell = \"cmp app ../art/app && echo same\"\n";
    let (dir, mut first, addr, _w) = master_and_worker_processes(toml, "60s").await;
    debug_json(&addr, &["force", "art"]).await;
    let made = newest_build_when_ended(&addr).await;
    assert_eq!(made["result"], "success", "{made}");
    debug_json(&addr, &["force", "use"]).await;
    // Kill the master once part of the artifact is on the worker's disk.
    let partial = dir.path().join("basedir/use/.app.switchyard-download");
    within("the download to start", async {
        while std::fs::metadata(&partial).map_or(0, |m| m.len()) < 4 << 20 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await;
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let (_second, _) = master_process(dir.path());
    let build = within("the download's build", async {
        loop {
            let b = newest_build_when_ended(&addr).await;
            if b["id"] != made["id"] {
                return b;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(build["result"], "success", "{build}");
    assert_eq!(build["steps"][0]["attempt"], 1, "not run again: {build}");
    let sent = std::fs::read(dir.path().join("basedir/art/app")).unwrap();
    let got = std::fs::read(dir.path().join("basedir/use/app")).unwrap();
    assert!(got == sent, "byte-exact across the restart");
}

#[tokio::test]
async fn steps_die_with_their_worker_under_either_supervisor() {
    let m = master_with_builder(
        "[[builder.step]]\nname = \"long\"\nshell = \"echo $PPID $$ >> ../started; sleep 30\"\n",
    )
    .await;
    // A worker installed without `switchyard-step` beside it runs its step
    // host with its own `__step` (the step's parent is the host).
    let alone = m.dir.path().join("alone");
    std::fs::create_dir_all(&alone).unwrap();
    let lone_bin = alone.join("switchyard");
    if std::fs::hard_link(BIN, &lone_bin).is_err() {
        std::fs::copy(BIN, &lone_bin).unwrap();
    }
    let started = m.dir.path().join("basedir/started");
    for (round, (program, supervisor)) in [
        (std::path::PathBuf::from(BIN), "switchyard-step"),
        (lone_bin, "switchyard"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut w = Reaped(
            std::process::Command::new(&program)
                .args([
                    "worker",
                    "--master",
                    &m.addr.to_string(),
                    "--name",
                    "w1",
                    "--basedir",
                ])
                .arg(m.dir.path().join("basedir"))
                .env("SWITCHYARD_PASSWORD", "w1-pw")
                .env("RUST_LOG", "warn")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_connected(&m, 1).await;
        m.master
            .builds()
            .force("b", "", "", "", "test")
            .await
            .unwrap();
        let (ppid, pid) = within("the step to start", async {
            loop {
                let text = std::fs::read_to_string(&started).unwrap_or_default();
                if let Some(line) = text.lines().nth(round) {
                    let mut ids = line.split_whitespace().map(|n| n.parse::<u32>().unwrap());
                    return (ids.next().unwrap(), ids.next().unwrap());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        let comm = std::fs::read_to_string(format!("/proc/{ppid}/comm")).unwrap();
        assert_eq!(comm.trim(), supervisor, "round {round}");
        w.0.kill().unwrap();
        w.0.wait().unwrap();
        within("the step to die with its worker", async {
            while std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| !s.contains(") Z "))
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        within("the worker's session to end", async {
            while !m.master.builds().connected().is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }
    m.stop().await;
}

/// The step host (one process per worker that starts its steps) killed
/// while a step runs: the worker kills the step's group, the step fails
/// saying so, and the next build gets a new host.
#[tokio::test]
async fn a_dead_step_host_fails_its_running_step_and_the_next_gets_a_new_one() {
    let m = master_with_builder(
        "[[builder.step]]\nname = \"s\"\nshell = \"echo $PPID $$ >> ../started; if [ ! -e ../once ]; then touch ../once; sleep 30; fi\"\n",
    )
    .await;
    let _w = spawn_worker(&m, "w1", "w1-pw", "basedir");
    wait_connected(&m, 1).await;
    let mut events = m.master.builds().subscribe();
    let started = m.dir.path().join("basedir/started");
    let ids = |n: usize| {
        let started = started.clone();
        within("the step to start", async move {
            loop {
                let text = std::fs::read_to_string(&started).unwrap_or_default();
                if let Some(line) = text.lines().nth(n) {
                    let v: Vec<u32> = line
                        .split_whitespace()
                        .map(|x| x.parse().unwrap())
                        .collect();
                    return (v[0], v[1]);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    m.master
        .builds()
        .force("b", "", "", "", "test")
        .await
        .unwrap();
    let (host, step) = ids(0).await;
    let comm = std::fs::read_to_string(format!("/proc/{host}/comm")).unwrap();
    assert_eq!(comm.trim(), "switchyard-step");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(host as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    within("the step to die with its host", async {
        while std::fs::read_to_string(format!("/proc/{step}/stat"))
            .is_ok_and(|s| !s.contains(") Z "))
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let ended = builds_ended(&mut events, 1).await;
    let b = m.master.state().build(ended[0].0).await.unwrap().unwrap();
    assert_ne!(b.result, Some(Outcome::Success));
    assert!(
        b.steps[0].detail.contains("the step host died"),
        "{}",
        b.steps[0].detail
    );
    // The next build runs on a new host.
    m.master
        .builds()
        .force("b", "", "", "", "test")
        .await
        .unwrap();
    let ended = builds_ended(&mut events, 1).await;
    let b = m.master.state().build(ended[0].0).await.unwrap().unwrap();
    assert_eq!(b.result, Some(Outcome::Success));
    let (second_host, _) = ids(1).await;
    assert_ne!(second_host, host);
    m.stop().await;
}

/// A builder `where` on `w1` printing which master ran it, for any change.
fn marked(which: &str) -> String {
    one_step_builder("where", "say", &format!("echo built by {which}"))
        + "\n[[scheduler]]\nname = \"all\"\nbuilders = [\"where\"]\n"
}

/// Pushes a change to `m` and returns the log of the build it ran there.
async fn build_on(m: &TestMaster) -> String {
    let mut events = m.master.builds().subscribe();
    push(m, "main").await;
    let ended = builds_ended(&mut events, 1).await;
    assert_eq!(ended[0].1, "success", "{ended:?}");
    log_text(m, ended[0].0, 0).await
}

#[tokio::test]
async fn a_worker_given_several_masters_skips_one_it_cannot_reach_and_fails_over_when_its_master_is_gone()
 {
    let a = master_with(&[("w1", "w1-pw", 1)], &marked("a")).await;
    let b = master_with(&[("w1", "w1-pw", 1)], &marked("b")).await;
    // Nothing listens at the first address.
    let dead = format!("127.0.0.1:{}", free_port());
    let _w = spawn_worker_to(
        &[dead, a.addr.to_string(), b.addr.to_string()],
        "w1",
        "w1-pw",
        &a.dir.path().join("basedir-w1"),
        &[],
        &[],
    );
    // It went past the dead address to a, and stays there.
    wait_connected(&a, 1).await;
    assert!(build_on(&a).await.contains("built by a"));
    assert!(b.master.builds().connected().is_empty());
    // a goes away: the worker cannot log in there any more and goes on
    // to b, where builds run.
    a.stop().await;
    wait_connected(&b, 1).await;
    assert!(build_on(&b).await.contains("built by b"));
}

/// Two masters on one PostgreSQL database (each its own port and config,
/// one shared `data_dir`), six worker processes spread over them, 300
/// changes pushed half to each: every request is built exactly once, both
/// masters' workers build, and a build's log run on one master is read
/// through the other's console.
#[tokio::test]
async fn two_masters_on_one_postgresql_database_build_each_request_once() {
    use switchyard::store::BuildFilter;
    let db = switchyard::store::postgres::testing::TempPg::new().await;
    let shared = tempfile::tempdir().unwrap();
    let names: Vec<String> = (1..=6).map(|i| format!("w{i}")).collect();
    let passwords: Vec<String> = names.iter().map(|n| format!("{n}-pw")).collect();
    let workers: Vec<(&str, &str, u32)> = names
        .iter()
        .zip(&passwords)
        .map(|(n, p)| (n.as_str(), p.as_str(), 1))
        .collect();
    let list: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    let builds_toml = format!(
        "\n[[builder]]\nname = \"b\"\nworkers = [{}]\n[[builder.step]]\nname = \"say\"\nshell = \"echo built $SWITCHYARD_BUILD_NUMBER\"\n\n[[scheduler]]\nname = \"all\"\nbuilders = [\"b\"]\n",
        list.join(", ")
    );
    let extra = format!("state = {:?}\ndata_dir = {:?}", db.url, shared.path());
    let a = master_configured(&extra, &workers, &builds_toml, "").await;
    let b = master_configured(&extra, &workers, &builds_toml, "").await;
    let (addr_a, addr_b) = (a.addr.to_string(), b.addr.to_string());
    let _workers: Vec<Reaped> = names
        .iter()
        .zip(&passwords)
        .enumerate()
        .map(|(i, (n, p))| {
            let order = if i < 3 {
                [addr_a.clone(), addr_b.clone()]
            } else {
                [addr_b.clone(), addr_a.clone()]
            };
            spawn_worker_to(
                &order,
                n,
                p,
                &shared.path().join(format!("basedir-{n}")),
                &[],
                &[],
            )
        })
        .collect();
    wait_connected(&a, 3).await;
    wait_connected(&b, 3).await;
    // 300 changes, half pushed to each master, each making one request.
    for m in [&a, &b] {
        let mut conn = switchyard::grpc::client::ChangeSourceConnection::connect(
            &m.addr.to_string(),
            "hook",
            "hook-pw",
        )
        .await
        .unwrap();
        for n in 0..150 {
            let change = switchyard::proto::Change {
                repository: "widgets".into(),
                branch: "main".into(),
                revision: format!("r{n}"),
                ..Default::default()
            };
            within("a push", conn.push(change)).await.unwrap();
        }
    }
    let state = a.master.state().clone();
    let all = BuildFilter {
        builder: Some("b".into()),
        limit: 1000,
        ..Default::default()
    };
    let builds = tokio::time::timeout(Duration::from_secs(240), async {
        loop {
            let builds = state.find_builds(all.clone()).await.unwrap();
            if builds.len() >= 300 && builds.iter().all(|b| b.result.is_some()) {
                return builds;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await
    .expect("300 builds within 240 s");
    assert_eq!(builds.len(), 300, "a request built twice");
    assert!(builds.iter().all(|b| b.result == Some(Outcome::Success)));
    let requests: std::collections::BTreeSet<i64> = builds.iter().map(|b| b.request_id).collect();
    assert_eq!(requests.len(), 300, "a request built twice");
    let numbers: std::collections::BTreeSet<i64> = builds.iter().map(|b| b.number).collect();
    assert_eq!(numbers, (1..=300).collect());
    assert!(state.waiting_requests().await.unwrap().is_empty());
    let on_a = builds
        .iter()
        .filter(|b| ["w1", "w2", "w3"].contains(&b.worker.as_str()))
        .count();
    assert!(
        on_a > 0 && on_a < 300,
        "{on_a} of 300 built on master a's workers"
    );
    // A build run through a is read through b (console and state alike).
    let from_a = builds.iter().find(|b| b.worker == "w1").unwrap();
    let log = debug_log(&addr_b, &serde_json::json!({ "id": from_a.id }), None).await;
    assert_eq!(
        String::from_utf8_lossy(&log),
        format!("built {}\n", from_a.number)
    );
    assert_eq!(
        b.master.state().build(from_a.id).await.unwrap().unwrap(),
        state.build(from_a.id).await.unwrap().unwrap()
    );
    a.stop().await;
    b.stop().await;
    db.drop_database().await;
}

/// Config and secrets for a master process on a shared PostgreSQL state,
/// with worker `w1`, `builds_toml`, a reconnect grace of `grace` and a
/// lease of `lease`, in a directory of its own.
fn shared_state_master(
    db_url: &str,
    data_dir: &std::path::Path,
    builds_toml: &str,
    grace: &str,
    lease: &str,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let users = [HOOK, ADMIN];
    let master = format!(
        "heartbeat_interval = \"1s\"\nworker_reconnect_grace = \"{grace}\"\nstate = {db_url:?}\ndata_dir = {:?}\nlease_duration = \"{lease}\"",
        data_dir
    );
    let config = config_text(&master, &users) + "\n[[worker]]\nname = \"w1\"\n" + builds_toml;
    std::fs::write(dir.path().join("master.toml"), config).unwrap();
    let secrets = secrets_text(&users)
        + secrets_text(&[("w1", "w1-pw", &[])]).trim_start_matches("[verifiers]\n");
    std::fs::write(dir.path().join("secrets.toml"), secrets).unwrap();
    dir
}

/// Waits (at most `bound`) for the newest build `addr` shows to end, and
/// checks it succeeded with both its steps run once each (nothing re-run).
async fn ended_once_each(addr: &str, bound: Duration) -> serde_json::Value {
    let build = tokio::time::timeout(bound, async {
        loop {
            let builds = debug_json(addr, &["builds"]).await;
            if builds[0]["result"].is_string() {
                return builds[0].clone();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the build on {addr} to end within {bound:?}"));
    assert_eq!(build["result"], "success", "{build}");
    let steps = build["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2, "nothing re-run: {build}");
    assert!(steps.iter().all(|s| s["attempt"] == 1), "{build}");
    build
}

/// Master processes a and b on one PostgreSQL database (a database of the
/// test's own, one shared data_dir, leases of 3 s), worker `w1` logged in to
/// a (naming both), and the counting build forced on a, 0.9 s into its
/// first step.
struct Failover {
    db: Option<switchyard::store::postgres::testing::TempPg>,
    _shared: tempfile::TempDir,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    a: Reaped,
    /// Kept running until the end.
    _b: Reaped,
    addr_a: String,
    addr_b: String,
    worker: Option<Reaped>,
}

impl Failover {
    /// `grace_a`: a's worker reconnect grace.
    async fn mid_step(grace_a: &str) -> Failover {
        let db = switchyard::store::postgres::testing::TempPg::new().await;
        let shared = tempfile::tempdir().unwrap();
        let dirs = (
            shared_state_master(&db.url, shared.path(), COUNT, grace_a, "3s"),
            shared_state_master(&db.url, shared.path(), COUNT, "30s", "3s"),
        );
        let (a, addr_a) = master_process(dirs.0.path());
        let (b, addr_b) = master_process(dirs.1.path());
        let worker = spawn_worker_to(
            &[addr_a.clone(), addr_b.clone()],
            "w1",
            "w1-pw",
            &shared.path().join("basedir-w1"),
            &[],
            &[],
        );
        within("the worker to connect to a", async {
            while debug_json(&addr_a, &["workers"]).await[0]["connected"] != true {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        debug_json(&addr_a, &["force", "count"]).await;
        tokio::time::sleep(Duration::from_millis(900)).await;
        Failover {
            db: Some(db),
            _shared: shared,
            _dirs: dirs,
            a,
            _b: b,
            addr_a,
            addr_b,
            worker: Some(worker),
        }
    }

    /// Waits (60 s at most) for the build to end on b; checks it succeeded
    /// with both steps run once, and returns it as b's console shows it.
    async fn ended_on_b_once_each(&self) -> serde_json::Value {
        ended_once_each(&self.addr_b, Duration::from_secs(60)).await
    }

    /// Stops the processes and drops the database.
    async fn end(mut self) {
        drop(self.worker.take());
        if let Some(db) = self.db.take() {
            // The masters' connections go with the database (FORCE).
            db.drop_database().await;
        }
    }
}

/// Master processes a and b on one PostgreSQL database: a is killed with
/// -9 mid-step; its worker fails over to b, which adopts the build once
/// a's lease has expired and re-attaches the running step: the build ends
/// with every step run once and a byte-exact log, shown by b's console.
#[tokio::test]
async fn a_build_goes_on_on_another_master_when_its_master_is_killed_with_9() {
    let mut f = Failover::mid_step("30s").await;
    let addr_b = f.addr_b.clone();
    // Mid-step: a's machine is gone.
    f.a.0.kill().unwrap();
    f.a.0.wait().unwrap();
    let build = f.ended_on_b_once_each().await;
    let log = debug_log(&addr_b, &build, Some("lines")).await;
    assert!(
        log == expected().into_bytes(),
        "the log must be byte-exact across the failover ({} bytes, {} expected)",
        log.len(),
        expected().len()
    );
    f.end().await;
}

/// Sends `signal` (`STOP`, `CONT`) to a process.
fn signal(p: &Reaped, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &p.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Master a is stopped (SIGSTOP) mid-step, past its lease: b adopts the
/// build and finishes it. a, continued (SIGCONT), finds its lease gone:
/// what it still had to write (the worker's output it read before it
/// stopped, its own view of the build) is refused or let go of, and the
/// build and its log stay exactly as b left them, also once a has taken
/// a new lease (which takes back nothing: b owns the build).
#[tokio::test]
async fn a_master_stopped_past_its_lease_writes_nothing_when_it_comes_back() {
    // a's grace is short: once continued, it soon takes the step it no
    // longer hears of for lost, and tries to record that (and to fail the
    // build); those are the late writes that must not land.
    let f = Failover::mid_step("1s").await;
    let (a, addr_a, addr_b) = (&f.a, f.addr_a.clone(), f.addr_b.clone());
    let lease_of_a = debug_json(&addr_a, &["status"]).await["lease_epoch"]
        .as_i64()
        .unwrap();
    signal(a, "STOP");
    let build = f.ended_on_b_once_each().await;
    assert_eq!(
        debug_log(&addr_b, &build, Some("lines")).await,
        expected().into_bytes()
    );
    // a comes back, and has a moment to do what it would.
    signal(a, "CONT");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = debug_json(&addr_b, &["builds"]).await[0].clone();
    assert_eq!(after, build, "a wrote to a build it no longer owns");
    assert!(
        debug_log(&addr_b, &build, Some("lines")).await == expected().into_bytes(),
        "the log must stay byte-exact after a comes back"
    );
    // a still shows the shared state, as b left it, and serves again
    // under a new lease.
    assert_eq!(debug_json(&addr_a, &["builds"]).await[0], build);
    let status = debug_json(&addr_a, &["status"]).await;
    assert!(
        status["lease_epoch"].as_i64().unwrap() > lease_of_a && status["lease_lost"] == false,
        "{status}"
    );
    f.end().await;
}

/// A master in this process on the database at `db_url` (files under
/// `shared`, reconnect grace 30 s, lease `lease`), with worker `w1`, a
/// process, logged in to it.
async fn master_on(
    db_url: &str,
    shared: &std::path::Path,
    builds_toml: &str,
    lease: &str,
) -> (TestMaster, String, Reaped) {
    let dir = shared_state_master(db_url, shared, builds_toml, "30s", lease);
    let m = TestMaster::start_in(dir).await;
    let addr = m.addr.to_string();
    let w = spawn_worker_to(
        std::slice::from_ref(&addr),
        "w1",
        "w1-pw",
        &shared.join("basedir-w1"),
        &[],
        &[],
    );
    wait_connected(&m, 1).await;
    (m, addr, w)
}

/// PostgreSQL crashes and comes back (immediate stop, 2 s down, recovery)
/// during a build and a stream of pushes: the master rides it out, the
/// worker's session is not dropped, the build ends byte-exact with nothing
/// re-run, and every push the master acknowledged is stored, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_and_pushes_ride_out_a_postgresql_crash() {
    let pg = std::sync::Arc::new(PrivatePg::start());
    let shared = tempfile::tempdir().unwrap();
    let (m, addr, _w) = master_on(&pg.url(), shared.path(), COUNT, "10s").await;
    let session = m.master.builds().connected()[0].session_id.clone();
    debug_json(&addr, &["force", "count"]).await;
    // Pushes all along, before, during and after the outage.
    let pushes = {
        let addr = addr.clone();
        tokio::spawn(async move {
            let mut conn =
                switchyard::grpc::client::ChangeSourceConnection::connect(&addr, "hook", "hook-pw")
                    .await
                    .unwrap();
            let mut acknowledged = Vec::new();
            for n in 0..30 {
                let change = switchyard::proto::Change {
                    repository: "widgets".into(),
                    branch: "main".into(),
                    revision: format!("r{n}"),
                    ..Default::default()
                };
                if let Ok(Ok(id)) =
                    tokio::time::timeout(Duration::from_secs(40), conn.push(change)).await
                {
                    acknowledged.push(id);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            acknowledged
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let restart = pg.clone();
    tokio::task::spawn_blocking(move || restart.crash_and_restart(Duration::from_secs(2)))
        .await
        .unwrap();
    let acknowledged = tokio::time::timeout(Duration::from_secs(120), pushes)
        .await
        .expect("the pushes to end")
        .unwrap();
    let build = ended_once_each(&addr, Duration::from_secs(60)).await;
    assert!(
        debug_log(&addr, &build, Some("lines")).await == expected().into_bytes(),
        "the log must be byte-exact across the database's crash"
    );
    let now = m.master.builds().connected();
    assert_eq!(now.len(), 1);
    assert_eq!(
        now[0].session_id, session,
        "the worker's session was dropped"
    );
    assert_eq!(
        acknowledged.len(),
        30,
        "pushes waited out the outage: {acknowledged:?}"
    );
    let state = m.master.state();
    for id in &acknowledged {
        assert!(
            state.change(*id).await.unwrap().is_some(),
            "acknowledged change {id} lost"
        );
    }
    assert_eq!(state.change_count().await.unwrap(), 30);
    m.stop().await;
}

/// PostgreSQL is away longer than the master's lease (1 s lease, 4 s
/// down) mid-step: the master finds its lease lost when the database is
/// back, lets go of its build and hangs up its worker, takes a new lease,
/// takes its own build back and serves again: the worker logs in again,
/// its step is re-attached, the build ends byte-exact with nothing re-run,
/// and the next build runs, with no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_that_lost_its_lease_to_a_database_outage_takes_a_new_one_and_builds_on() {
    let pg = std::sync::Arc::new(PrivatePg::start());
    let shared = tempfile::tempdir().unwrap();
    let (m, addr, _w) = master_on(&pg.url(), shared.path(), COUNT, "1s").await;
    let epoch = || m.master.state().postgres().unwrap().lease().unwrap().0;
    let first_epoch = epoch();
    debug_json(&addr, &["force", "count"]).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let outage = pg.clone();
    tokio::task::spawn_blocking(move || outage.crash_and_restart(Duration::from_secs(4)))
        .await
        .unwrap();
    let build = ended_once_each(&addr, Duration::from_secs(90)).await;
    assert!(
        debug_log(&addr, &build, Some("lines")).await == expected().into_bytes(),
        "the log must be byte-exact across the lost lease"
    );
    assert!(epoch() > first_epoch, "the master serves under a new lease");
    let status = debug_json(&addr, &["status"]).await;
    assert_eq!(
        (status["lease_epoch"].as_i64(), &status["lease_lost"]),
        (Some(epoch()), &serde_json::json!(false)),
        "the console says which lease: {status}"
    );
    // It serves on: the next build runs on the worker, here.
    debug_json(&addr, &["force", "count"]).await;
    let next = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let b = newest_build_when_ended(&addr).await;
            if b["number"] == 2 {
                return b;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the next build to end");
    assert_eq!(next["result"], "success", "{next}");
    m.stop().await;
}

/// A build's write is refused for the lease while the lease still lives in
/// the database: the renewal is held up (its `masters` row locked) past
/// this master's own bound on file writes, three quarters of the lease,
/// and then goes through. The step ending in that window cannot be
/// recorded; the master steps down (ends that lease), takes a new one,
/// takes its build back and re-attaches the step: the build ends with
/// nothing re-run. Without the step-down the build would wait forever,
/// owned by a live lease that no task runs it under.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_refused_a_write_for_its_lease_makes_its_master_step_down_and_take_it_back() {
    let db = switchyard::store::postgres::testing::TempPg::new().await;
    let shared = tempfile::tempdir().unwrap();
    let go = shared.path().join("go");
    let builds_toml = format!(
        "[[builder]]\nname = \"wait\"\nworkers = [\"w1\"]\n[[builder.step]]\nname = \"wait\"\nshell = \"while [ ! -e {} ]; do sleep 0.05; done; echo released\"\n[[builder.step]]\nname = \"after\"\nshell = \"echo second step\"\n",
        go.display()
    );
    let (m, addr, _w) = master_on(&db.url, shared.path(), &builds_toml, "8s").await;
    let epoch = || m.master.state().postgres().unwrap().lease().unwrap().0;
    let first = epoch();
    debug_json(&addr, &["force", "wait"]).await;
    within("the step to start", async {
        while debug_json(&addr, &["builds"]).await[0]["steps"]
            .as_array()
            .is_none_or(|s| s.is_empty())
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let (client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    // Left of the lease by the database's clock, in ms.
    let left = || async {
        client
            .query_one(
                "SELECT (EXTRACT(EPOCH FROM expires_at - clock_timestamp()) * 1000)::float8 FROM masters WHERE id = $1",
                &[&first],
            )
            .await
            .unwrap()
            .get::<_, f64>(0)
    };
    // Right after a renewal (the lease moves on), hold the next one back.
    let was = left().await;
    within("a renewal", async {
        while left().await < was {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    client.batch_execute("BEGIN").await.unwrap();
    let left_ms = client
        .query_one(
            "SELECT (EXTRACT(EPOCH FROM expires_at - clock_timestamp()) * 1000)::float8 FROM masters WHERE id = $1 FOR UPDATE",
            &[&first],
        )
        .await
        .unwrap()
        .get::<_, f64>(0);
    // The renewal was sent about 8 s before the lease ends: the master's
    // own bound passes 2 s before it ends. The step is let go of 1.7 s
    // before (the master then has 1.2 s to find its write refused), and
    // the renewal goes through 0.5 s before.
    tokio::time::sleep(Duration::from_millis((left_ms - 1700.0).max(0.0) as u64)).await;
    std::fs::write(&go, b"").unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    client.batch_execute("COMMIT").await.unwrap();
    let build = ended_once_each(&addr, Duration::from_secs(60)).await;
    assert_eq!(debug_log(&addr, &build, Some("wait")).await, b"released\n");
    assert!(epoch() > first, "the master took a new lease");
    assert!(
        left().await <= 0.0,
        "the lease it stepped down from was ended"
    );
    m.stop().await;
}

/// A build running on one master is seen live on another sharing its
/// database: b's event stream (what its console's `watch`, web UI and API
/// follow) carries the build's start, its output and its end, marked as
/// having happened elsewhere; its log and the artifact it stored on a are
/// read through b, also once a is gone.
#[tokio::test]
async fn a_build_on_one_master_is_seen_live_on_another() {
    let db = switchyard::store::postgres::testing::TempPg::new().await;
    let shared = tempfile::tempdir().unwrap();
    let extra = format!("state = {:?}\ndata_dir = {:?}", db.url, shared.path());
    let builds_toml = marked("a")
        + "[[builder.step]]\nname = \"make\"\nshell = \"echo artifact made on a > out.txt\"\n[[builder.step]]\nname = \"up\"\nupload = { source = \"out.txt\", name = \"out\" }\n";
    let a = master_configured(&extra, &[("w1", "w1-pw", 1)], &builds_toml, "").await;
    let b = master_configured(&extra, &[("w1", "w1-pw", 1)], &builds_toml, "").await;
    let _w = spawn_worker_to(
        &[a.addr.to_string()],
        "w1",
        "w1-pw",
        &shared.path().join("basedir-w1"),
        &[],
        &[],
    );
    wait_connected(&a, 1).await;
    let mut on_b = b.master.builds().subscribe();
    push(&a, "main").await;
    let seen = within("b to see the build on a", async {
        let mut seen = Vec::new();
        loop {
            let s = on_b.recv().await.unwrap();
            assert!(s.elsewhere, "b ran nothing itself: {s:?}");
            let end = matches!(s.event, Event::BuildEnded { .. });
            seen.push(s.event);
            if end {
                return seen;
            }
        }
    })
    .await;
    let Some(Event::BuildStarted { build, .. }) = seen.first().cloned() else {
        panic!("{seen:?}")
    };
    assert!(seen.iter().any(|e| matches!(e, Event::OutputStored { build: x, bytes, .. } if *x == build && *bytes > 0)), "{seen:?}");
    assert!(
        matches!(seen.last(), Some(Event::BuildEnded { outcome: Outcome::Success, build: x, .. }) if *x == build),
        "{seen:?}"
    );
    assert_eq!(log_text(&b, build, 0).await, "built by a\n");
    // a is gone: b still serves what a stored.
    a.stop().await;
    assert_eq!(log_text(&b, build, 0).await, "built by a\n");
    let admin = basic("admin", "admin-pw");
    let (head, body) = http_get(
        &b,
        &format!("/api/v1/builds/{build}/artifacts/out"),
        Some(&admin),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.contains("artifact made on a"), "{body}");
    b.stop().await;
    db.drop_database().await;
}
