//! Builds survive a blinking link: the step keeps running on the worker, the
//! worker reconnects, the master re-attaches the step, and the log is byte
//! for byte what the command wrote. (Issue 6, first part: link drops.)

mod common;

use std::time::Duration;

use common::*;

const COUNT: &str = r#"
[[builder]]
name = "count"
workers = ["w1"]
[[builder.step]]
name = "lines"
shell = "i=1; while [ $i -le 3000 ]; do echo \"line $i\"; if [ $((i % 300)) -eq 0 ]; then sleep 0.3; fi; i=$((i+1)); done"
[[builder.step]]
name = "after"
shell = "echo second step"
"#;

fn expected() -> String {
    (1..=3000).map(|i| format!("line {i}\n")).collect()
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
) -> (switchyard::state::BuildRecord, Reaped) {
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
                && let Some(switchyard::proto::debug_event::Kind::StepStarted(s)) = e.kind
                && s.step == victim
            {
                return;
            }
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    w.0.kill().unwrap(); // SIGKILL: the worker dies, its step is orphaned
    w.0.wait().unwrap();
    let pids = std::fs::read_to_string(m.dir.path().join("basedir/pids")).unwrap();
    let orphan: u32 = pids.lines().next().unwrap().trim().parse().unwrap();
    assert!(
        std::path::Path::new(&format!("/proc/{orphan}")).exists(),
        "the step runs on as an orphan"
    );
    let w2 = spawn_worker(m, "w1", "w1-pw", "basedir");
    // The new worker kills what its previous run left behind.
    within("the orphan to be killed", async {
        while std::fs::read_to_string(format!("/proc/{orphan}/stat"))
            .is_ok_and(|s| !s.contains(") Z "))
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let ended = builds_ended(&mut events, 1).await;
    let b = m.master.state().build(ended[0].0).await.unwrap().unwrap();
    (b, w2)
}

fn attempts(b: &switchyard::state::BuildRecord) -> Vec<(String, u32, String)> {
    b.steps
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                s.attempt,
                s.result.clone().unwrap_or_default(),
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
    assert_eq!(b.result.as_deref(), Some("success"));
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
    assert_eq!(b.result.as_deref(), Some("success"));
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
    assert_eq!(b.result.as_deref(), Some("failure"));
    assert_eq!(attempts(&b), vec![("long".into(), 1, "exception".into())]);
    assert!(
        b.steps[0].detail.contains("on_lost = fail"),
        "{}",
        b.steps[0].detail
    );
    m.stop().await;
}
