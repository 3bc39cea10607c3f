//! `[[poller]]` against a real git repository on disk and a real master:
//! the first poll makes no changes, new commits do (author, message,
//! files), branches are filtered, a new branch makes its head, a
//! force-push makes only the new commits, a restart makes nothing twice,
//! and a repository that disappears is retried until it is back.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use switchyard::store::StoredChange;

fn git(cwd: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args(["-c", "user.name=Ada", "-c", "user.email=ada@example.org"])
        .args(["-c", "init.defaultBranch=main"])
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn commit(work: &Path, file: &str, message: &str) -> String {
    std::fs::write(work.join(file), message).unwrap();
    git(work, &["add", file]);
    git(work, &["commit", "-q", "-m", message]);
    git(work, &["rev-parse", "HEAD"])
}

async fn changes(m: &TestMaster) -> Vec<StoredChange> {
    m.master.state().changes_after(0, 1000).await.unwrap()
}

/// Waits (bounded) until the master has `n` changes.
async fn until_changes(m: &TestMaster, n: usize) -> Vec<StoredChange> {
    within(&format!("{n} changes"), async {
        loop {
            let c = changes(m).await;
            if c.len() >= n {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

#[tokio::test]
async fn a_poller_makes_a_change_for_each_new_commit_once() {
    let dir = tempfile::tempdir().unwrap();
    let up = dir.path().join("up.git");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    git(dir.path(), &["init", "--bare", "-q", up.to_str().unwrap()]);
    git(&work, &["init", "-q"]);
    git(&work, &["remote", "add", "up", up.to_str().unwrap()]);
    commit(&work, "a.txt", "history before the master");
    git(&work, &["push", "-q", "up", "main"]);
    std::fs::write(
        dir.path().join("master.toml"),
        config_text("", &[ADMIN])
            + &format!(
                "\n[[poller]]\nrepository = {:?}\nbranches = [\"main\", \"release/*\"]\ninterval = \"1s\"\n",
                up.to_str().unwrap()
            ),
    )
    .unwrap();
    std::fs::write(dir.path().join("secrets.toml"), secrets_text(&[ADMIN])).unwrap();
    let m = TestMaster::start_in(dir).await;
    let repo = up.to_str().unwrap().to_string();
    // The first poll records the heads and makes nothing.
    within("the first poll", async {
        while m
            .master
            .state()
            .poller_heads(&repo)
            .await
            .unwrap()
            .is_none()
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(changes(&m).await.is_empty());

    // Two new commits: two changes, oldest first.
    let a1 = commit(&work, "x.txt", "add x");
    let a2 = commit(&work, "y.txt", "add y\n\nwith a body");
    git(&work, &["push", "-q", "up", "main"]);
    let c = until_changes(&m, 2).await;
    assert_eq!(c.len(), 2);
    assert_eq!(c[0].change.revision, a1);
    assert_eq!(c[1].change.revision, a2);
    assert_eq!(c[0].change.author, "Ada <ada@example.org>");
    assert_eq!(c[1].change.comments, "add y\n\nwith a body");
    assert_eq!(c[0].change.files, ["x.txt"]);
    assert_eq!(c[0].change.branch, "main");
    assert_eq!(c[0].change.repository, repo);
    assert_eq!(c[0].change.project, "up", "named like its directory");
    assert_eq!(c[0].change.category, "poll");
    assert!(c[0].change.when.is_some());

    // A branch it does not follow: nothing; a new release branch: its head.
    git(&work, &["checkout", "-q", "-b", "feature"]);
    commit(&work, "f.txt", "feature work");
    git(&work, &["push", "-q", "up", "feature"]);
    git(&work, &["checkout", "-q", "-b", "release/1.0", "main"]);
    let r1 = commit(&work, "r.txt", "release notes");
    git(&work, &["push", "-q", "up", "release/1.0"]);
    let c = until_changes(&m, 3).await;
    assert_eq!(c.len(), 3);
    assert_eq!(c[2].change.branch, "release/1.0");
    assert_eq!(c[2].change.revision, r1);

    // A force-push: only the commit the new head has.
    git(&work, &["checkout", "-q", "main"]);
    git(&work, &["reset", "-q", "--hard", "HEAD~1"]);
    let b1 = commit(&work, "z.txt", "rewritten");
    git(&work, &["push", "-q", "-f", "up", "main"]);
    let c = until_changes(&m, 4).await;
    assert_eq!(c.len(), 4);
    assert_eq!(c[3].change.revision, b1);

    // A restart makes nothing twice; the next commit is still seen.
    let dir = m.stop_keeping_files().await;
    let m = TestMaster::start_in(dir).await;
    let b2 = commit(&work, "w.txt", "after the restart");
    git(&work, &["push", "-q", "up", "main"]);
    let c = until_changes(&m, 5).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(changes(&m).await.len(), 5, "{c:?}");
    assert_eq!(c[4].change.revision, b2);

    // The repository goes away: the master goes on, and picks up again
    // once it is back.
    let moved = up.with_extension("away");
    std::fs::rename(&up, &moved).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    m.login(ADMIN.0, ADMIN.1, "debug")
        .await
        .expect("the master still serves while a repository is gone");
    std::fs::rename(&moved, &up).unwrap();
    let b3 = commit(&work, "v.txt", "it is back");
    git(&work, &["push", "-q", "up", "main"]);
    let c = until_changes(&m, 6).await;
    assert_eq!(c[5].change.revision, b3);
    m.stop().await;
}
