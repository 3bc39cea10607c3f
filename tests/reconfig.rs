//! Reconfiguration of workers and builders on a running master (SIGHUP or
//! `debug reload`): what changed is handled, what did not is not touched.
//! Real master, real worker processes; long steps are `sleep` with markers.

mod common;

use std::time::Duration;
use switchyard::builds::Outcome;
use switchyard::store::BuildStore;

use common::*;
use switchyard::builds::Event;

/// Two workers, two builders (one each), each step long enough to reload
/// under, printing a marker at its start and its end.
fn builds_toml(extra_b1_step: &str, w1: bool, b2: bool, _drain: bool) -> String {
    let mut t = String::new();
    if w1 {
        t.push_str("\n[[worker]]\nname = \"w1\"\n");
    }
    t.push_str("\n[[worker]]\nname = \"w2\"\n");
    let b1_workers = if w1 { "[\"w1\"]" } else { "[]" };
    t.push_str(&format!(
        "\n[[builder]]\nname = \"b1\"\nworkers = {b1_workers}\n[[builder.step]]\nname = \"long\"\nshell = \"echo start; sleep 2; touch finished-b1; echo end\"\n{extra_b1_step}"
    ));
    if b2 {
        t.push_str("\n[[builder]]\nname = \"b2\"\nworkers = [\"w2\"]\n[[builder.step]]\nname = \"long\"\nshell = \"echo start; sleep 2; touch finished-b2; echo end\"\n");
    }
    t
}

async fn start(toml: &str, drain: bool) -> TestMaster {
    let extra = if drain {
        "heartbeat_interval = \"1s\"\ndrain_removed_workers = true"
    } else {
        "heartbeat_interval = \"1s\""
    };
    let users = [HOOK, ADMIN];
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("master.toml"),
        config_text(extra, &users) + toml,
    )
    .unwrap();
    let secrets = secrets_text(&users)
        + secrets_text(&[("w1", "w1-pw", &[]), ("w2", "w2-pw", &[])])
            .trim_start_matches("[verifiers]\n");
    std::fs::write(dir.path().join("secrets.toml"), secrets).unwrap();
    TestMaster::start_in(dir).await
}

/// Rewrites the config (keeping the secrets) and reloads.
async fn reload_with(m: &TestMaster, toml: &str, drain: bool) -> switchyard::master::ReloadReport {
    let extra = if drain {
        "heartbeat_interval = \"1s\"\ndrain_removed_workers = true"
    } else {
        "heartbeat_interval = \"1s\""
    };
    std::fs::write(m.config_path(), config_text(extra, &[HOOK, ADMIN]) + toml).unwrap();
    m.master.reload().await.unwrap()
}

async fn force(m: &TestMaster, builder: &str) {
    m.master
        .builds()
        .force(builder, "", "", "", "test")
        .await
        .unwrap();
}

async fn started(
    events: &mut tokio::sync::broadcast::Receiver<switchyard::builds::Stamped>,
    n: usize,
) -> Vec<(i64, String)> {
    let mut out = Vec::new();
    within("builds to start", async {
        while out.len() < n {
            if let Ok(e) = events.recv().await
                && let Event::BuildStarted { build, builder, .. } = e.event
            {
                out.push((build, builder));
            }
        }
    })
    .await;
    out
}

async fn result_of(m: &TestMaster, build: i64) -> Outcome {
    within("a build to end", async {
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

fn session_of(m: &TestMaster, name: &str) -> Option<String> {
    m.master
        .builds()
        .connected()
        .into_iter()
        .find(|l| l.name == name)
        .map(|l| l.session_id.clone())
}

fn id_of(started: &[(i64, String)], builder: &str) -> i64 {
    started
        .iter()
        .find(|(_, b)| b == builder)
        .map(|(id, _)| *id)
        .unwrap()
}

/// Runs `switchyard debug reload`: (success, stdout, stderr).
async fn debug_reload(m: &TestMaster) -> (bool, String, String) {
    let addr = m.addr.to_string();
    within(
        "debug reload",
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new(BIN)
                .args(["debug", "--master", &addr, "--user", "admin", "reload"])
                .env("SWITCHYARD_PASSWORD", "admin-pw")
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).to_string(),
                String::from_utf8_lossy(&out.stderr).to_string(),
            )
        }),
    )
    .await
    .unwrap()
}

/// Lets the steps start and print their first marker.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(600)).await;
}

#[tokio::test]
async fn removing_a_worker_interrupts_its_build_and_touches_nothing_else() {
    let m = start(&builds_toml("", true, true, false), false).await;
    let (_w1, _w2) = (worker(&m, "w1", "w1-pw"), worker(&m, "w2", "w2-pw"));
    wait_connected(&m, 2).await;
    let w2_session = session_of(&m, "w2").unwrap();
    let mut events = m.master.builds().subscribe();
    force(&m, "b1").await;
    force(&m, "b2").await;
    let s = started(&mut events, 2).await;
    settle().await;
    let report = reload_with(&m, &builds_toml("", false, true, false), false).await;
    assert_eq!(report.builds.workers_removed, vec!["w1".to_string()]);
    assert_eq!(report.builds.workers_unchanged, 1);
    assert_eq!(result_of(&m, id_of(&s, "b1")).await, Outcome::Interrupted);
    assert_eq!(result_of(&m, id_of(&s, "b2")).await, Outcome::Success);
    assert_eq!(
        log_text(&m, id_of(&s, "b2"), 0).await,
        "start\nend\n",
        "the unchanged builder's build ran whole"
    );
    assert_eq!(
        session_of(&m, "w2"),
        Some(w2_session),
        "the unchanged worker keeps its session"
    );
    within("w1 to be hung up", async {
        while session_of(&m, "w1").is_some() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !m.dir.path().join("basedir-w1/b1/finished-b1").exists(),
        "the interrupted step's processes were killed"
    );
    m.stop().await;
}

#[tokio::test]
async fn a_draining_worker_finishes_its_build_gets_no_more_and_leaves() {
    let m = start(&builds_toml("", true, true, true), true).await;
    let (_w1, _w2) = (worker(&m, "w1", "w1-pw"), worker(&m, "w2", "w2-pw"));
    wait_connected(&m, 2).await;
    let mut events = m.master.builds().subscribe();
    force(&m, "b1").await;
    let s = started(&mut events, 1).await;
    force(&m, "b1").await; // queued behind the first
    settle().await;
    // w1 goes, but b1 keeps naming it: this reload only removes the worker.
    let toml = builds_toml("", true, true, true)
        .replacen("\n[[worker]]\nname = \"w1\"\n", "", 1)
        .replace("workers = [\"w1\"]", "workers = []");
    let report = reload_with(&m, &toml, true).await;
    assert_eq!(report.builds.workers_draining, vec!["w1".to_string()]);
    assert_eq!(result_of(&m, s[0].0).await, Outcome::Success);
    assert_eq!(log_text(&m, s[0].0, 0).await, "start\nend\n");
    within("the drained worker to be hung up", async {
        while session_of(&m, "w1").is_some() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // The second request got no worker.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        m.master
            .state()
            .builds(Some("b1".into()), 10)
            .await
            .unwrap()
            .len(),
        1
    );
    m.stop().await;
}

#[tokio::test]
async fn a_changed_worker_password_hangs_it_up_and_interrupts_its_build() {
    let m = start(&builds_toml("", true, true, false), false).await;
    let _w1 = worker(&m, "w1", "w1-pw");
    wait_connected(&m, 1).await;
    let old_session = session_of(&m, "w1").unwrap();
    let mut events = m.master.builds().subscribe();
    force(&m, "b1").await;
    let s = started(&mut events, 1).await;
    settle().await;
    let secrets_path = m.dir.path().join("secrets.toml");
    let secrets = std::fs::read_to_string(&secrets_path).unwrap();
    let kept: Vec<&str> = secrets
        .lines()
        .filter(|l| !l.starts_with("\"w1\""))
        .collect();
    let new_w1 = secrets_text(&[("w1", "w1-new-pw", &[])]);
    std::fs::write(
        &secrets_path,
        format!(
            "{}\n{}",
            kept.join("\n"),
            new_w1.trim_start_matches("[verifiers]\n")
        ),
    )
    .unwrap();
    let report = m.master.reload().await.unwrap();
    assert!(
        report
            .hung_up
            .iter()
            .any(|(u, _, why)| u == "w1" && *why == "password changed"),
        "{report}"
    );
    assert_eq!(result_of(&m, s[0].0).await, Outcome::Interrupted);
    // The old password no longer logs in; the new one does.
    assert!(m.login("w1", "w1-pw", "worker").await.is_err());
    let _w1_new = worker(&m, "w1", "w1-new-pw");
    within("w1 to come back", async {
        while session_of(&m, "w1").is_none_or(|s| s == old_session) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    m.stop().await;
}

#[tokio::test]
async fn a_changed_builder_waits_for_its_build_then_uses_the_new_steps() {
    let m = start(&builds_toml("", true, true, false), false).await;
    let (_w1, _w2) = (worker(&m, "w1", "w1-pw"), worker(&m, "w2", "w2-pw"));
    wait_connected(&m, 2).await;
    let mut events = m.master.builds().subscribe();
    force(&m, "b1").await;
    let s = started(&mut events, 1).await;
    force(&m, "b1").await; // queued: must survive the change
    settle().await;
    let extra = "[[builder.step]]\nname = \"added\"\nshell = \"echo new step\"\n";
    let report = reload_with(&m, &builds_toml(extra, true, true, false), false).await;
    assert_eq!(
        report.builds.builders_waiting,
        vec!["b1".to_string()],
        "{report}"
    );
    assert_eq!(report.builds.builders_unchanged, 1);
    // The running build finishes with the old definition...
    assert_eq!(result_of(&m, s[0].0).await, Outcome::Success);
    let first = m.master.state().build(s[0].0).await.unwrap().unwrap();
    assert_eq!(first.steps.len(), 1);
    // ...then the queued request runs with the new one.
    let next = started(&mut events, 1).await;
    assert_eq!(result_of(&m, next[0].0).await, Outcome::Success);
    let second = m.master.state().build(next[0].0).await.unwrap().unwrap();
    assert_eq!(
        second
            .steps
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["long", "added"]
    );
    assert_eq!(log_text(&m, next[0].0, 1).await, "new step\n");
    // History kept.
    assert_eq!(
        m.master
            .state()
            .builds(Some("b1".into()), 10)
            .await
            .unwrap()
            .len(),
        2
    );
    m.stop().await;
}

#[tokio::test]
async fn a_deleted_builder_is_halted_and_forgotten() {
    let m = start(&builds_toml("", true, true, false), false).await;
    let (_w1, _w2) = (worker(&m, "w1", "w1-pw"), worker(&m, "w2", "w2-pw"));
    wait_connected(&m, 2).await;
    let mut events = m.master.builds().subscribe();
    force(&m, "b2").await;
    let s = started(&mut events, 1).await;
    settle().await;
    let w2_session = session_of(&m, "w2").unwrap();
    let report = reload_with(&m, &builds_toml("", true, false, false), false).await;
    assert_eq!(report.builds.builders_removed, vec!["b2".to_string()]);
    assert_eq!(report.builds.interrupted.len(), 1);
    within("b2's history to be deleted", async {
        while m.master.state().build(s[0].0).await.unwrap().is_some() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !m.dir.path().join("basedir-w2/b2/finished-b2").exists(),
        "the halted step's processes were killed"
    );
    assert_eq!(
        session_of(&m, "w2"),
        Some(w2_session),
        "the worker itself is untouched"
    );
    let err = m
        .master
        .builds()
        .force("b2", "", "", "", "test")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no builder named"));
    m.stop().await;
}

#[tokio::test]
async fn schedulers_apply_to_changes_pushed_after_the_reload() {
    let m = start(&builds_toml("", true, true, false), false).await;
    let _w2 = worker(&m, "w2", "w2-pw");
    wait_connected(&m, 1).await;
    push(&m, "release").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(m.master.state().builds(None, 10).await.unwrap().is_empty());
    let with_scheduler = builds_toml("", true, true, false)
        + "\n[[scheduler]]\nname = \"rel\"\nbuilders = [\"b2\"]\nbranches = [\"release\"]\n";
    let mut events = m.master.builds().subscribe();
    let report = reload_with(&m, &with_scheduler, false).await;
    assert_eq!(report.builds.schedulers_added, vec!["rel".to_string()]);
    // `watch` hears about the reload, with the same summary.
    let e = within("the reload event", events.recv()).await.unwrap();
    match e.event {
        Event::Reloaded { summary } => {
            assert!(summary.contains("schedulers: added [rel]"), "{summary}")
        }
        other => panic!("expected a reload event, got {other:?}"),
    }
    push(&m, "release").await;
    let s = started(&mut events, 1).await;
    assert_eq!(s[0].1, "b2");
    m.stop().await;
}

#[tokio::test]
async fn broken_configs_change_nothing_and_debug_reload_says_why() {
    let m = start(&builds_toml("", true, true, false), false).await;
    let (_w1, _w2) = (worker(&m, "w1", "w1-pw"), worker(&m, "w2", "w2-pw"));
    wait_connected(&m, 2).await;
    let sessions = (session_of(&m, "w1"), session_of(&m, "w2"));
    let good = std::fs::read_to_string(m.config_path()).unwrap();
    let cases = [
        (
            good.replace("[[worker]]\nname = \"w2\"", "[[worker\nname = \"w2\""),
            "master.toml:",
        ),
        (
            good.replace("workers = [\"w2\"]", "workers = [\"w9\"]"),
            "builder.workers",
        ),
        (
            good.clone() + "\n[[worker]]\nname = \"w2\"\n",
            "defined twice",
        ),
    ];
    for (broken, words) in cases {
        std::fs::write(m.config_path(), &broken).unwrap();
        let (ok, _, err) = debug_reload(&m).await;
        assert!(!ok, "a broken config must make `debug reload` fail");
        assert!(
            err.contains("nothing changed") && err.contains(words),
            "{err}"
        );
    }
    assert_eq!((session_of(&m, "w1"), session_of(&m, "w2")), sessions);
    std::fs::write(m.config_path(), &good).unwrap();
    let out = debug_reload(&m).await;
    assert!(out.0, "{}", out.2);
    assert!(
        out.1.contains("reloaded:") && out.1.contains("builders:") && out.1.contains("2 unchanged"),
        "{}",
        out.1
    );
    m.stop().await;
}

#[tokio::test]
async fn twenty_reloads_while_builds_run_disturb_nothing_unchanged() {
    let m = start(&builds_toml("", true, true, false), false).await;
    let (_w1, _w2) = (worker(&m, "w1", "w1-pw"), worker(&m, "w2", "w2-pw"));
    wait_connected(&m, 2).await;
    let sessions = (session_of(&m, "w1"), session_of(&m, "w2"));
    let mut events = m.master.builds().subscribe();
    force(&m, "b1").await;
    force(&m, "b2").await;
    let s = started(&mut events, 2).await;
    for i in 0..20 {
        // Only an unused builder and a scheduler change, back and forth.
        let extra = format!(
            "\n[[builder]]\nname = \"spare\"\nworkers = [\"w2\"]\n[[builder.step]]\nname = \"s\"\nshell = \"echo {i}\"\n"
        );
        let report = reload_with(&m, &(builds_toml("", true, true, false) + &extra), false).await;
        assert!(
            report.builds.interrupted.is_empty() && report.hung_up.is_empty(),
            "{report}"
        );
        assert!(report.builds.builders_waiting.is_empty(), "{report}");
    }
    for b in ["b1", "b2"] {
        assert_eq!(result_of(&m, id_of(&s, b)).await, Outcome::Success);
        assert_eq!(log_text(&m, id_of(&s, b), 0).await, "start\nend\n");
    }
    assert_eq!(
        (session_of(&m, "w1"), session_of(&m, "w2")),
        sessions,
        "unchanged workers keep their sessions"
    );
    m.stop().await;
}

#[tokio::test]
async fn reloads_are_serialised() {
    let m = start(&builds_toml("", true, true, false), false).await;
    // Ten reloads at once, alternating two configs: each one sees the
    // previous one's result, never half of it.
    let a = builds_toml("", true, true, false);
    let b =
        builds_toml("", true, true, false) + "\n[[scheduler]]\nname = \"x\"\nbuilders = [\"b1\"]\n";
    std::fs::write(
        m.config_path(),
        config_text("heartbeat_interval = \"1s\"", &[HOOK, ADMIN]) + &b,
    )
    .unwrap();
    let reloads: Vec<_> = (0..10).map(|_| m.master.reload()).collect();
    let reports = within("ten reloads", futures_util::future::join_all(reloads)).await;
    let reports: Vec<_> = reports.into_iter().map(|r| r.unwrap()).collect();
    // Exactly one of them added the scheduler; the others found it there.
    assert_eq!(
        reports
            .iter()
            .filter(|r| r.builds.schedulers_added == ["x"])
            .count(),
        1
    );
    assert!(reports.iter().all(|r| r.builds.builders_unchanged == 2));
    std::fs::write(
        m.config_path(),
        config_text("heartbeat_interval = \"1s\"", &[HOOK, ADMIN]) + &a,
    )
    .unwrap();
    let r = m.master.reload().await.unwrap();
    assert_eq!(r.builds.schedulers_removed, vec!["x".to_string()]);
    m.stop().await;
}
