//! Reloading users and secrets: exactly the affected sessions are hung up,
//! and a broken file changes nothing.

mod common;

use std::time::Duration;

use common::*;
use switchyard::client::ClientError;
use switchyard::proto::RejectCode;

const ALICE: UserSpec = ("alice", "alice-pw", &["ping"]);
const BOB: UserSpec = ("bob", "bob-pw", &["ping"]);
const CAROL: UserSpec = ("carol", "carol-pw", &["ping"]);

/// The issue asks for "within a second"; the master cancels at once, and the
/// test allows some slack for a loaded CI machine.
const HANGUP_BOUND: Duration = Duration::from_secs(3);

#[tokio::test]
async fn removing_a_user_hangs_up_exactly_that_users_sessions() {
    let m = TestMaster::start("", &[ALICE, BOB]).await;
    let mut a1 = m.login("alice", "alice-pw", "ping").await.unwrap();
    let mut a2 = m.login("alice", "alice-pw", "ping").await.unwrap();
    let mut b1 = m.login("bob", "bob-pw", "ping").await.unwrap();
    let mut b2 = m.login("bob", "bob-pw", "ping").await.unwrap();

    // Keep alice's verifier as it was: rewrite the config only.
    std::fs::write(m.config_path(), config_text("", &[ALICE])).unwrap();
    let report = m.master.reload().await.unwrap();
    assert_eq!(report.users_removed, vec!["bob".to_string()]);
    assert_eq!(report.hung_up.len(), 2);
    assert!(
        report
            .hung_up
            .iter()
            .all(|(u, _, why)| u == "bob" && *why == "user removed")
    );

    assert_hung_up(&mut b1, HANGUP_BOUND).await;
    assert_hung_up(&mut b2, HANGUP_BOUND).await;
    assert_echo(&mut a1, b"alice 1 untouched").await;
    assert_echo(&mut a2, b"alice 2 untouched").await;
    assert_eq!(m.master.dispatcher().session_count(), 2);
    let (code, _) = match m.login("bob", "bob-pw", "ping").await {
        Err(ClientError::Rejected { code, message }) => (code, message),
        _ => panic!("bob must not log in after removal"),
    };
    assert_eq!(
        code,
        RejectCode::NotAuthorized,
        "bob's verifier is still in the secrets file, but he has no grant"
    );
    m.stop().await;
}

#[tokio::test]
async fn a_changed_password_or_a_lost_service_hangs_up_only_those() {
    let m = TestMaster::start("", &[ALICE, BOB, CAROL]).await;
    let mut a = m.login("alice", "alice-pw", "ping").await.unwrap();
    let mut b = m.login("bob", "bob-pw", "ping").await.unwrap();
    let mut c = m.login("carol", "carol-pw", "ping").await.unwrap();
    let a_id = a.session_id.clone();

    // New secrets: bob gets a new password; carol loses ping; alice's and
    // carol's verifier lines stay byte for byte the same.
    let secrets_path = m.dir.path().join("secrets.toml");
    let old = std::fs::read_to_string(&secrets_path).unwrap();
    let keep: Vec<&str> = old
        .lines()
        .filter(|l| l.starts_with("\"alice\"") || l.starts_with("\"carol\""))
        .collect();
    let fresh = secrets_text(&[("bob", "bob-new-pw", &[])]);
    std::fs::write(&secrets_path, format!("{fresh}{}\n", keep.join("\n"))).unwrap();
    std::fs::write(
        m.config_path(),
        config_text("", &[ALICE, BOB, ("carol", "carol-pw", &["debug"])]),
    )
    .unwrap();
    let report = m.master.reload().await.unwrap();

    assert_hung_up(&mut b, HANGUP_BOUND).await;
    assert_hung_up(&mut c, HANGUP_BOUND).await;
    assert_echo(&mut a, b"alice untouched").await;
    assert_eq!(a.session_id, a_id);
    let mut why: Vec<_> = report
        .hung_up
        .iter()
        .map(|(u, _, w)| (u.as_str(), *w))
        .collect();
    why.sort();
    assert_eq!(
        why,
        vec![
            ("bob", "password changed"),
            ("carol", "service no longer granted")
        ]
    );

    assert!(m.login("bob", "bob-pw", "ping").await.is_err());
    m.assert_serves("bob", "bob-new-pw").await;
    m.stop().await;
}

#[tokio::test]
async fn a_new_user_can_log_in_at_once() {
    let m = TestMaster::start("", &[ALICE]).await;
    let mut a = m.login("alice", "alice-pw", "ping").await.unwrap();
    assert!(m.login("bob", "bob-pw", "ping").await.is_err());
    // Alice's verifier is regenerated with a new salt here, so keep her
    // secrets line and only add bob's.
    let secrets_path = m.dir.path().join("secrets.toml");
    let mut secrets = std::fs::read_to_string(&secrets_path).unwrap();
    secrets.push_str(secrets_text(&[BOB]).trim_start_matches("[verifiers]\n"));
    std::fs::write(&secrets_path, secrets).unwrap();
    std::fs::write(m.config_path(), config_text("", &[ALICE, BOB])).unwrap();
    let report = m.master.reload().await.unwrap();
    assert_eq!(report.users_added, vec!["bob".to_string()]);
    assert!(report.hung_up.is_empty());
    m.assert_serves("bob", "bob-pw").await;
    assert_echo(&mut a, b"alice untouched").await;
    m.stop().await;
}

#[tokio::test]
async fn a_broken_config_or_secrets_file_changes_nothing() {
    let m = TestMaster::start("", &[ALICE, BOB]).await;
    let mut b = m.login("bob", "bob-pw", "ping").await.unwrap();
    let good_config = std::fs::read_to_string(m.config_path()).unwrap();
    let secrets_path = m.dir.path().join("secrets.toml");
    let good_secrets = std::fs::read_to_string(&secrets_path).unwrap();

    // A config that would remove bob, with a syntax error on line 4.
    std::fs::write(m.config_path(), "[master]\nlisten = \"127.0.0.1:0\"\nsecrets = \"secrets.toml\"\n[[user]\nname = \"alice\"\n").unwrap();
    let err = m.master.reload().await.unwrap_err().to_string();
    assert!(err.contains("master.toml:4:"), "{err}");
    // A semantic error: a duplicate user.
    std::fs::write(m.config_path(), config_text("", &[ALICE, ALICE])).unwrap();
    let err = m.master.reload().await.unwrap_err().to_string();
    assert!(
        err.contains("master.toml:") && err.contains("defined twice"),
        "{err}"
    );
    // A good config but a broken secrets file: nothing applies either.
    std::fs::write(m.config_path(), config_text("", &[ALICE])).unwrap();
    std::fs::write(
        &secrets_path,
        "[verifiers]\nalice = \"SCRAM-SHA-256$1:AAAA$BBBB:CCCC\"\n",
    )
    .unwrap();
    let err = m.master.reload().await.unwrap_err().to_string();
    assert!(
        err.contains("secrets.toml:2:") && err.contains("verifiers.alice"),
        "{err}"
    );
    assert!(
        !err.contains("BBBB"),
        "errors must not quote verifiers: {err}"
    );

    assert_echo(&mut b, b"bob still here").await;
    m.assert_serves("alice", "alice-pw").await;
    m.assert_serves("bob", "bob-pw").await;

    // Restore, and a good reload still works afterwards.
    std::fs::write(m.config_path(), good_config).unwrap();
    std::fs::write(&secrets_path, good_secrets).unwrap();
    let report = m.master.reload().await.unwrap();
    assert_eq!(report.users_unchanged, 2);
    assert!(report.hung_up.is_empty());
    assert_echo(&mut b, b"bob still here").await;
    m.stop().await;
}
