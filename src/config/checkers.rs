//! `[[checker]]`: password checkers asked after the secrets file, for users
//! it has no verifier for, and only for logins that arrived inside TLS
//! (see [`crate::auth::command`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Validator};
use crate::auth::command::{CommandChecker, DEFAULT_CONCURRENCY, DEFAULT_TIMEOUT};

/// The kinds of `[[checker]]` there are.
pub const KINDS: &[&str] = &["command"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawChecker {
    kind: Spanned<String>,
    command: Option<Spanned<Vec<String>>>,
    timeout: Option<Spanned<String>>,
    concurrency: Option<Spanned<i64>>,
}

/// One `[[checker]]`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckerConfig {
    /// `kind = "command"`: a program judges the password.
    Command {
        /// The program, resolved against the config's directory when it
        /// names a path, else found on `PATH` when the config is read.
        program: PathBuf,
        args: Vec<String>,
        timeout: Duration,
        concurrency: usize,
    },
}

impl CheckerConfig {
    /// The checker this describes, ready for the port.
    pub fn build(&self) -> Arc<dyn crate::auth::Checker> {
        match self {
            CheckerConfig::Command {
                program,
                args,
                timeout,
                concurrency,
            } => Arc::new(CommandChecker::new(
                program,
                args.clone(),
                *timeout,
                *concurrency,
            )),
        }
    }
}

pub(super) fn validate(
    c: &Validator<'_>,
    base: &Path,
    raw: &[Spanned<RawChecker>],
) -> Result<Vec<CheckerConfig>, ConfigError> {
    let mut out = Vec::with_capacity(raw.len());
    for r in raw {
        let at = r.span();
        let r = r.get_ref();
        if r.kind.get_ref() != "command" {
            return c.err(
                r.kind.span(),
                "checker.kind",
                format_args!(
                    "`{}` is not a kind of checker; the kinds are {}",
                    r.kind.get_ref(),
                    KINDS.join(", ")
                ),
            );
        }
        let Some(command) = &r.command else {
            return c.err(
                at,
                "checker.command",
                "is missing: a command checker needs `command = [\"/path/to/program\", ...]`",
            );
        };
        let Some((first, args)) = command.get_ref().split_first() else {
            return c.err(command.span(), "checker.command", "names no program");
        };
        let program = resolve(base, first).map_err(|why| {
            ConfigError::at(
                c.path,
                c.text,
                command.span().start,
                format!("key `checker.command`: {why}"),
            )
        })?;
        out.push(CheckerConfig::Command {
            program,
            args: args.to_vec(),
            timeout: c.duration(&r.timeout, "checker.timeout", DEFAULT_TIMEOUT)?,
            concurrency: c.count(&r.concurrency, "checker.concurrency", DEFAULT_CONCURRENCY)?,
        });
    }
    Ok(out)
}

/// The program `name` names: a path (against `base` when relative), or a
/// name found on `PATH`. It must be an executable file now, so that a typo
/// is an error at load, not a refused login later.
fn resolve(base: &Path, name: &str) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    if name.trim().is_empty() {
        return Err("names no program".into());
    }
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.contains('/') {
        let p = base.join(name);
        return if executable(&p) {
            Ok(p)
        } else {
            Err(format!("{} is not an executable file", p.display()))
        };
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| executable(p))
        .ok_or_else(|| format!("no executable `{name}` on PATH"))
}
