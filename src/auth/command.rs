//! `[[checker]] kind = "command"`: a program that judges a user name and
//! password, for directories Switchyard cannot read verifiers from (a
//! `checkpassword`-style script, PAM, LDAP through a helper).
//!
//! The program gets the user name and the password on standard input, one
//! line each, and answers with its exit status:
//!
//! - `0`: accepted;
//! - `1`: refused (a wrong password, or a user it refuses);
//! - `2`: it does not know the user, so the next `[[checker]]` is asked
//!   (past the last one, the login is refused);
//! - anything else, a signal, or no answer within the timeout: the checker is
//!   unavailable, and the login is refused as "retry later" without counting
//!   against the user.
//!
//! It sees passwords, so it is a [`Capability::Cleartext`] checker: the port
//! asks it only for logins that arrived inside TLS (see
//! [`super::check_password`]). At most `concurrency` programs run at once;
//! a login waits for a slot within the same timeout. The program starts
//! with an empty environment but for `PATH`, its standard output and error
//! are discarded (a script that echoes its input must not put a password in
//! the master's log), and it is killed if it overruns.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;

use super::{Capability, Checker, CheckerError};

/// How long a program may take by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// How many programs may run at once by default.
pub const DEFAULT_CONCURRENCY: usize = 4;

/// The exit status that means "I do not know this user".
pub const EXIT_UNKNOWN_USER: i32 = 2;

/// A password checker that runs a program (see the module's docs).
pub struct CommandChecker {
    program: PathBuf,
    args: Vec<String>,
    timeout: Duration,
    slots: Arc<Semaphore>,
}

impl std::fmt::Debug for CommandChecker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandChecker")
            .field("program", &self.program)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl CommandChecker {
    /// `program` with `args`, each run bounded by `timeout`, at most
    /// `concurrency` at once (at least one).
    pub fn new(
        program: impl Into<PathBuf>,
        args: Vec<String>,
        timeout: Duration,
        concurrency: usize,
    ) -> Self {
        CommandChecker {
            program: program.into(),
            args,
            timeout,
            slots: Arc::new(Semaphore::new(concurrency.max(1))),
        }
    }

    async fn run(&self, user: &str, password: &[u8]) -> Result<Option<bool>, CheckerError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| CheckerError::Unavailable("password command closed".into()))?;
        let mut child = tokio::process::Command::new(&self.program)
            .args(&self.args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                CheckerError::Unavailable(format!(
                    "cannot run password command {}: {e}",
                    self.program.display()
                ))
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            let mut input = Vec::with_capacity(user.len() + password.len() + 2);
            input.extend_from_slice(user.as_bytes());
            input.push(b'\n');
            input.extend_from_slice(password);
            input.push(b'\n');
            // A program that decides without reading closes its end first:
            // its exit status still counts.
            let _ = stdin.write_all(&input).await;
            drop(stdin);
        }
        let status = child.wait().await.map_err(|e| {
            CheckerError::Unavailable(format!(
                "password command {} failed: {e}",
                self.program.display()
            ))
        })?;
        match status.code() {
            Some(0) => Ok(Some(true)),
            Some(1) => Ok(Some(false)),
            Some(EXIT_UNKNOWN_USER) => Ok(None),
            Some(n) => Err(CheckerError::Unavailable(format!(
                "password command {} exited with status {n} (0 accepts, 1 refuses, 2 does not know the user)",
                self.program.display()
            ))),
            None => Err(CheckerError::Unavailable(format!(
                "password command {} was killed by a signal",
                self.program.display()
            ))),
        }
    }
}

#[async_trait]
impl Checker for CommandChecker {
    fn capability(&self) -> Capability {
        Capability::Cleartext
    }

    async fn check_cleartext(
        &self,
        user: &str,
        password: &[u8],
    ) -> Result<Option<bool>, CheckerError> {
        // One line each: a password holding a line break or NUL cannot be
        // passed on unambiguously, so it is refused without asking.
        if password.iter().any(|&b| b == b'\n' || b == b'\r' || b == 0)
            || user.bytes().any(|b| b == b'\n' || b == b'\r' || b == 0)
        {
            return Ok(Some(false));
        }
        match tokio::time::timeout(self.timeout, self.run(user, password)).await {
            Ok(answer) => answer,
            Err(_) => Err(CheckerError::Unavailable(format!(
                "password command {} gave no answer within {:?}",
                self.program.display(),
                self.timeout
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &std::path::Path, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("check");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[tokio::test]
    async fn exit_status_decides_and_overruns_are_killed() {
        let dir = tempfile::tempdir().unwrap();
        let path = script(
            dir.path(),
            r#"read -r user; read -r pw
case "$user" in
  alice) [ "$pw" = "open sesame" ] && exit 0; exit 1 ;;
  slow) sleep 30 ;;
  odd) exit 7 ;;
  *) exit 2 ;;
esac"#,
        );
        let c = CommandChecker::new(&path, vec![], Duration::from_millis(500), 2);
        assert_eq!(
            c.check_cleartext("alice", b"open sesame").await.unwrap(),
            Some(true)
        );
        assert_eq!(
            c.check_cleartext("alice", b"wrong").await.unwrap(),
            Some(false)
        );
        assert_eq!(
            c.check_cleartext("alice", b"open sesame\n").await.unwrap(),
            Some(false)
        );
        assert_eq!(c.check_cleartext("bob", b"x").await.unwrap(), None);
        let e = c.check_cleartext("odd", b"x").await.unwrap_err();
        assert!(e.to_string().contains("status 7"), "{e}");
        let started = std::time::Instant::now();
        let e = c.check_cleartext("slow", b"x").await.unwrap_err();
        assert!(e.to_string().contains("no answer within"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
