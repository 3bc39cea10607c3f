//! `switchyard debug`: the console client.
//!
//! With a command it runs it once and exits (for scripts); without one it is
//! an interactive console with line editing, history and `help`. `--json`
//! prints machine-readable output: one JSON document per command, or one
//! JSON object per line for `watch` and `log`.

use std::io::Write;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use prost::Message;
use serde_json::{Value, json};

use crate::api::json::{build_json, builders_json, workers_json};
use crate::client::{self, ClientSession, Credentials};
use crate::proto::ReloadRequest;
use crate::proto::{
    BuildersRequest, BuildsRequest, DebugEvent, DebugReply, DebugRequest, ForceRequest,
    HangupRequest, LogRequest, StatusRequest, StopRequest, WatchRequest, WorkersRequest,
    debug_event, debug_reply, debug_request,
};

pub const HELP: &str = "\
commands:
  status                                   the master at a glance
  workers                                  configured workers, connected or not
  builders                                 builders, their workers, steps and queue
  builds [BUILDER] [--limit N]             recent builds with their steps
  build BUILD                              one build: changes, properties with sources, steps
  log BUILD [STEP] [-f] [--raw]            a build's output (STEP: name or position), a header
                                           per step and stderr lines marked `[stderr] `;
                                           -f (--follow) until a running build ends;
                                           --raw: the bytes only, as the step wrote them
  force BUILDER [--branch B] [--revision R] [--repository R] [--property NAME=VALUE]...
        [--wait SECONDS]                   request a build, and print it once a worker starts
                                           it (waits 10 s by default; 0: do not wait)
  stop BUILD                               stop a running build
  hangup WORKER                            hang up a worker's session
  unblock ADDRESS                          forget an address's failed logins
  reports                                  reports [[reporter]]s could not deliver yet
  artifacts BUILD                          the artifacts a build's upload steps stored
  watch                                    live events until Ctrl-C
  reload                                   re-read the config and secrets (as SIGHUP)
  help, quit

BUILD is a build's id, or BUILDER#NUMBER (e.g. widgets#12).
--json (anywhere on the command line) prints one JSON value per line.";

/// A console session with a master.
pub struct Console {
    session: ClientSession,
    next_id: u64,
    pub json: bool,
    /// Print builds in detail (the `build` command).
    detail: bool,
    /// `log --raw`: the log's bytes only.
    raw: bool,
    /// Where a log being printed is: the step attempt last printed, and
    /// whether the output is at the start of a line.
    log_step: Option<(String, u32)>,
    log_at_line_start: bool,
    log_last_stderr: bool,
}

/// How long `force` waits for its build to start, unless told.
const DEFAULT_FORCE_WAIT_MS: u32 = 10_000;

/// Removes a flag without a value; says whether it was there.
fn take_switch(words: &mut Vec<String>, flag: &str) -> bool {
    let before = words.len();
    words.retain(|w| w != flag);
    words.len() != before
}

fn take_flag(words: &mut Vec<String>, flag: &str) -> Result<Option<String>, String> {
    match words.iter().position(|w| w == flag) {
        None => Ok(None),
        Some(i) if i + 1 < words.len() => {
            let v = words.remove(i + 1);
            words.remove(i);
            Ok(Some(v))
        }
        Some(_) => Err(format!("{flag} needs a value")),
    }
}

/// The words with a `BUILDER#NUMBER` in the BUILD position stood in for by
/// an id, so the line can be checked before the reference is resolved.
fn checkable(words: &[String]) -> Vec<String> {
    let mut w = words.to_vec();
    if matches!(
        w.first().map(String::as_str),
        Some("log" | "stop" | "build" | "artifacts")
    ) && w.get(1).is_some_and(|b| b.contains('#'))
    {
        w[1] = "0".into();
    }
    w
}

fn number(word: &str, what: &str) -> Result<i64, String> {
    word.parse()
        .map_err(|_| format!("{what} must be a number, not {word:?}"))
}

/// Parses a console command line into a request.
pub fn parse(words: &[String]) -> Result<debug_request::Command, String> {
    use debug_request::Command as C;
    let mut words = words.to_vec();
    if words.is_empty() {
        return Err("no command; try `help`".into());
    }
    let cmd = words.remove(0);
    // Each command takes its own options and no other: an option that
    // would do nothing is an error, not ignored.
    let takes: &[&str] = match cmd.as_str() {
        "builds" => &["--limit"],
        "force" => &[
            "--branch",
            "--revision",
            "--repository",
            "--property",
            "--wait",
        ],
        "log" => &["--follow", "--raw"],
        _ => &[],
    };
    for w in words.iter_mut() {
        if w == "-f" {
            *w = "--follow".into();
        }
    }
    if let Some(flag) = words
        .iter()
        .find(|w| w.starts_with("--") && !takes.contains(&w.as_str()))
    {
        return Err(if takes.is_empty() {
            format!("{cmd} takes no option {flag}; try `help`")
        } else {
            format!(
                "{cmd} takes no option {flag} (it takes {}); try `help`",
                takes.join(", ")
            )
        });
    }
    let limit = take_flag(&mut words, "--limit")?;
    let follow = take_switch(&mut words, "--follow");
    take_switch(&mut words, "--raw"); // how the console prints, not what it asks
    let wait_ms = match take_flag(&mut words, "--wait")? {
        None => DEFAULT_FORCE_WAIT_MS,
        Some(w) => match w.parse::<f64>() {
            Ok(secs) if (0.0..=60.0).contains(&secs) => (secs * 1000.0) as u32,
            _ => return Err(format!("--wait must be seconds from 0 to 60, not {w:?}")),
        },
    };
    let branch = take_flag(&mut words, "--branch")?.unwrap_or_default();
    let revision = take_flag(&mut words, "--revision")?.unwrap_or_default();
    let repository = take_flag(&mut words, "--repository")?.unwrap_or_default();
    let mut properties = std::collections::HashMap::new();
    while let Some(p) = take_flag(&mut words, "--property")? {
        match p.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                properties.insert(k.to_string(), v.to_string());
            }
            _ => return Err(format!("--property {p:?} is not NAME=VALUE")),
        }
    }
    let n = words.len();
    let usage = |u: &str| Err(format!("usage: {u}"));
    let command = match (cmd.as_str(), n) {
        ("status", 0) => C::Status(StatusRequest {}),
        ("workers", 0) => C::Workers(WorkersRequest {}),
        ("builders", 0) => C::Builders(BuildersRequest {}),
        ("builds", 0 | 1) => C::Builds(BuildsRequest {
            builder: words.first().cloned().unwrap_or_default(),
            limit: match limit {
                None => 0,
                Some(l) => match number(&l, "--limit")? {
                    n @ 1..=1000 => n as u32,
                    _ => return Err(format!("--limit must be from 1 to 1000, not {l}")),
                },
            },
            ..Default::default()
        }),
        ("builds", _) => return usage("builds [BUILDER] [--limit N]"),
        ("build", 1) => C::Builds(BuildsRequest {
            build: number(&words[0], "BUILD")?,
            limit: 1,
            ..Default::default()
        }),
        ("build", _) => return usage("build BUILD"),
        ("log", 1 | 2) => C::Log(LogRequest {
            build: number(&words[0], "BUILD")?,
            step: words.get(1).cloned().unwrap_or_default(),
            follow,
        }),
        ("log", _) => return usage("log BUILD [STEP] [-f] [--raw]"),
        ("force", 1) => C::Force(ForceRequest {
            builder: words[0].clone(),
            branch,
            revision,
            repository,
            properties,
            wait_ms,
        }),
        ("force", _) => {
            return usage(
                "force BUILDER [--branch B] [--revision R] [--repository R] [--property NAME=VALUE]... [--wait SECONDS]",
            );
        }
        ("stop", 1) => C::Stop(StopRequest {
            build: number(&words[0], "BUILD")?,
        }),
        ("stop", _) => return usage("stop BUILD"),
        ("hangup", 1) => C::Hangup(HangupRequest {
            worker: words[0].clone(),
        }),
        ("hangup", _) => return usage("hangup WORKER"),
        ("unblock", 1) => C::Unblock(crate::proto::UnblockRequest {
            address: words[0].clone(),
        }),
        ("unblock", _) => return usage("unblock ADDRESS"),
        ("watch", 0) => C::Watch(WatchRequest {}),
        ("reports", 0) => C::Reports(crate::proto::ReportsRequest {}),
        ("artifacts", 1) => C::Artifacts(crate::proto::ArtifactsRequest {
            build: number(&words[0], "BUILD")?,
        }),
        ("artifacts", _) => return usage("artifacts BUILD"),
        ("reload", 0) => C::Reload(ReloadRequest {}),
        ("status" | "workers" | "builders" | "watch" | "reload" | "reports", _) => {
            return Err(format!("{cmd} takes no arguments"));
        }
        _ => return Err(format!("unknown command {cmd:?}; try `help`")),
    };
    Ok(command)
}

pub fn event_json(e: &DebugEvent) -> Value {
    use debug_event::Kind as K;
    let mut v = match &e.kind {
        Some(K::WorkerConnected(w)) => {
            json!({"type": "worker_connected", "worker": w.worker, "session_id": w.session_id})
        }
        Some(K::WorkerLost(w)) => {
            json!({"type": "worker_lost", "worker": w.worker, "reason": w.reason})
        }
        Some(K::BuildStarted(b)) => {
            json!({"type": "build_started", "build": b.build, "builder": b.builder, "worker": b.worker})
        }
        Some(K::StepStarted(s)) => {
            json!({"type": "step_started", "build": s.build, "step": s.step, "attempt": s.attempt})
        }
        Some(K::StepEnded(s)) => {
            json!({"type": "step_finished", "build": s.build, "step": s.step, "attempt": s.attempt, "result": s.result, "detail": s.detail})
        }
        Some(K::BuildEnded(b)) => {
            json!({"type": "build_finished", "build": b.build, "builder": b.builder, "result": b.result})
        }
        Some(K::Reloaded(r)) => json!({"type": "reloaded", "summary": r.summary}),
        None => json!({"type": "unknown"}),
    };
    v["unix_ms"] = json!(e.unix_ms);
    v
}

pub fn event_text(e: &DebugEvent) -> String {
    use debug_event::Kind as K;
    match &e.kind {
        Some(K::WorkerConnected(w)) => {
            format!("worker {} connected (session {})", w.worker, w.session_id)
        }
        Some(K::WorkerLost(w)) => format!("worker {} lost: {}", w.worker, w.reason),
        Some(K::BuildStarted(b)) => format!(
            "build {} started: builder {} on worker {}",
            b.build, b.builder, b.worker
        ),
        Some(K::StepStarted(s)) => format!(
            "build {} step {} started (attempt {})",
            s.build, s.step, s.attempt
        ),
        Some(K::StepEnded(s)) if s.detail.is_empty() => {
            format!("build {} step {} finished: {}", s.build, s.step, s.result)
        }
        Some(K::StepEnded(s)) => format!(
            "build {} step {} finished: {} ({})",
            s.build, s.step, s.result, s.detail
        ),
        Some(K::BuildEnded(b)) => format!(
            "build {} finished: {} (builder {})",
            b.build, b.result, b.builder
        ),
        Some(K::Reloaded(r)) => format!("config reloaded: {}", r.summary),
        None => "unknown event".into(),
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

impl Console {
    pub async fn connect(addr: &str, creds: &Credentials) -> Result<Self, client::ClientError> {
        Self::connect_with(addr, creds, &client::ClientOptions::default()).await
    }

    /// [`Console::connect`] with client options (TLS, say).
    pub async fn connect_with(
        addr: &str,
        creds: &Credentials,
        opts: &client::ClientOptions,
    ) -> Result<Self, client::ClientError> {
        let session = client::connect_with(addr, super::SERVICE, creds, opts).await?;
        Ok(Console {
            session,
            next_id: 1,
            json: false,
            detail: false,
            raw: false,
            log_step: None,
            log_at_line_start: true,
            log_last_stderr: false,
        })
    }

    /// Sets how the command in `words` prints (`build` in detail, `log
    /// --raw` as bytes).
    fn print_for(&mut self, words: &[String]) {
        self.detail = words.first().is_some_and(|w| w == "build");
        self.raw = words.iter().any(|w| w == "--raw");
        self.log_step = None;
        self.log_at_line_start = true;
    }

    /// A piece of a log for a person: a header when a step attempt begins,
    /// and `[stderr] ` before each line written to standard error (on a
    /// line of its own). `--raw` prints the bytes alone.
    fn print_log(&mut self, l: crate::proto::LogReply, out: &mut dyn Write) -> std::io::Result<()> {
        if !l.build_result.is_empty() {
            if !self.log_at_line_start {
                writeln!(out)?;
            }
            return writeln!(out, "=== build ended: {} ===", l.build_result);
        }
        let step = Some((l.step.clone(), l.attempt));
        if self.log_step != step {
            if !self.log_at_line_start {
                writeln!(out)?;
            }
            let attempt = if l.attempt > 1 {
                format!(" (attempt {})", l.attempt)
            } else {
                String::new()
            };
            writeln!(out, "=== step {}{attempt} ===", l.step)?;
            self.log_step = step;
            self.log_at_line_start = true;
        }
        if l.data.is_empty() {
            return Ok(());
        }
        let stderr = l.stream == crate::proto::OutputStream::Stderr as i32;
        // A line one stream left unfinished ends where the other stream
        // cuts in, so stdout is never shown as stderr or the reverse.
        if !self.log_at_line_start && self.log_last_stderr != stderr {
            writeln!(out)?;
            self.log_at_line_start = true;
        }
        self.log_last_stderr = stderr;
        if !stderr {
            out.write_all(&l.data)?;
            self.log_at_line_start = l.data.ends_with(b"\n");
            return Ok(());
        }
        for line in l.data.split_inclusive(|&b| b == b'\n') {
            if self.log_at_line_start {
                out.write_all(b"[stderr] ")?;
            }
            out.write_all(line)?;
            self.log_at_line_start = line.ends_with(b"\n");
        }
        Ok(())
    }

    /// Turns a `BUILDER#NUMBER` in a command's BUILD position into the
    /// build's id (one query to the master); other words are kept.
    pub async fn resolve(&mut self, words: &[String]) -> Result<Vec<String>, String> {
        let mut words = words.to_vec();
        let takes_build = matches!(
            words.first().map(String::as_str),
            Some("log" | "stop" | "build" | "artifacts")
        );
        if let Some(w) = words.get(1).filter(|_| takes_build)
            && let Some((builder, n)) = w.split_once('#')
        {
            let n: i64 = n
                .parse()
                .map_err(|_| format!("{w:?} is not BUILDER#NUMBER"))?;
            let id = self
                .send(debug_request::Command::Builds(BuildsRequest {
                    builder: builder.to_string(),
                    number: n,
                    ..Default::default()
                }))
                .await?;
            let reply = self.reply(id).await?;
            match reply.result {
                Some(debug_reply::Result::Builds(b)) if !b.builds.is_empty() => {
                    words[1] = b.builds[0].id.to_string();
                }
                _ => return Err(format!("no build {w}")),
            }
        }
        Ok(words)
    }

    async fn send(&mut self, command: debug_request::Command) -> Result<u64, String> {
        let id = self.next_id;
        self.next_id += 1;
        let req = DebugRequest {
            id,
            command: Some(command),
        };
        self.session
            .stream
            .send(Bytes::from(req.encode_to_vec()))
            .await
            .map_err(|e| format!("lost the master: {e}"))?;
        Ok(id)
    }

    async fn reply(&mut self, id: u64) -> Result<DebugReply, String> {
        loop {
            let frame = self
                .session
                .stream
                .next()
                .await
                .ok_or("the master closed the console session")?
                .map_err(|e| format!("lost the master: {e}"))?;
            let reply = DebugReply::decode(frame.freeze())
                .map_err(|_| "the master sent an undecodable reply".to_string())?;
            if reply.id == id {
                if let Some(debug_reply::Result::Error(e)) = &reply.result {
                    return Err(e.clone());
                }
                return Ok(reply);
            }
        }
    }

    /// Runs one command, printing its output to `out`. `watch` runs until
    /// the session ends or `stop` resolves.
    pub async fn run(
        &mut self,
        command: debug_request::Command,
        out: &mut dyn Write,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), String> {
        let id = self.send(command).await?;
        tokio::pin!(stop);
        loop {
            let reply = tokio::select! {
                r = self.reply(id) => r?,
                _ = &mut stop => return Ok(()),
            };
            let end = reply.end;
            if let Some(r) = reply.result {
                self.print(r, out)
                    .map_err(|e| format!("cannot write the output: {e}"))?;
            }
            if end {
                return Ok(());
            }
        }
    }

    fn print(&mut self, r: debug_reply::Result, out: &mut dyn Write) -> std::io::Result<()> {
        use debug_reply::Result as R;
        if self.json {
            let v = match r {
                R::Status(s) => json!({
                    "version": s.version, "workers_configured": s.workers_configured, "workers_connected": s.workers_connected,
                    "builders": s.builders, "builds_running": s.builds_running, "requests_waiting": s.requests_waiting,
                    "watchers": s.watchers, "reports_undelivered": s.reports_undelivered,
                    "lease_epoch": s.lease_epoch, "lease_lost": s.lease_lost,
                }),
                R::Workers(w) => workers_json(&w),
                R::Builders(b) => builders_json(&b),
                R::Builds(b) => json!(b.builds.iter().map(build_json).collect::<Vec<_>>()),
                R::Log(l) if !l.build_result.is_empty() => json!({"build_result": l.build_result}),
                R::Log(l) => json!({
                    "step": l.step, "attempt": l.attempt, "stream": crate::worker::agent::stream_name(l.stream),
                    "text": String::from_utf8_lossy(&l.data),
                }),
                R::Force(f) => json!({
                    "request_id": f.request_id,
                    "build": f.build.as_ref().map(build_json),
                }),
                R::Reload(r) => json!({"summary": r.summary}),
                R::Stop(_) | R::Hangup(_) => json!({"ok": true}),
                R::Unblock(u) => json!({"forgotten": u.forgotten}),
                R::Artifacts(a) => json!(
                    a.artifacts
                        .iter()
                        .map(|x| json!({"name": x.name, "size": x.size, "sha256": x.sha256}))
                        .collect::<Vec<_>>()
                ),
                R::Reports(r) => json!(r
                    .reports
                    .iter()
                    .map(|u| json!({
                        "reporter": u.reporter, "build_id": u.build_id, "builder": u.builder,
                        "number": u.number, "event": u.event, "queued_unix_ms": u.queued_unix_ms,
                        "attempts": u.attempts, "next_attempt_unix_ms": u.next_attempt_unix_ms,
                        "last_error": u.last_error,
                    }))
                    .collect::<Vec<_>>()),
                R::Event(e) => event_json(&e),
                R::Error(e) => json!({"error": e}),
            };
            writeln!(out, "{v}")?;
            return out.flush();
        }
        match r {
            R::Status(s) => {
                write!(
                    out,
                    "switchyard {}: {}/{} workers connected, {} builders, {} builds running, {} requests waiting",
                    s.version,
                    s.workers_connected,
                    s.workers_configured,
                    s.builders,
                    s.builds_running,
                    s.requests_waiting
                )?;
                if s.reports_undelivered > 0 {
                    write!(
                        out,
                        ", {} reports undelivered (`debug reports`)",
                        s.reports_undelivered
                    )?;
                }
                if s.lease_lost {
                    write!(
                        out,
                        ", LEASE LOST (lease {}): taking a new one, no builds run here meanwhile",
                        s.lease_epoch
                    )?;
                } else if s.lease_epoch > 0 {
                    write!(out, ", lease {}", s.lease_epoch)?;
                }
                writeln!(out)?
            }
            R::Workers(w) => {
                writeln!(
                    out,
                    "{:<20} {:<10} {:<20} {:<16} {:>4} {:>7}",
                    "WORKER", "CONNECTED", "HOST", "OS/ARCH", "CPUS", "BUILDS"
                )?;
                for w in w.workers {
                    let os = if w.connected {
                        format!("{}/{}", w.os, w.arch)
                    } else {
                        "-".into()
                    };
                    writeln!(
                        out,
                        "{:<20} {:<10} {:<20} {:<16} {:>4} {:>7}",
                        w.name,
                        if w.connected { "yes" } else { "no" },
                        or_dash(&w.hostname),
                        os,
                        w.cpus,
                        format!("{}/{}", w.running_builds, w.max_builds)
                    )?;
                }
            }
            R::Builders(b) => {
                writeln!(
                    out,
                    "{:<20} {:>7}  {:<30} STEPS",
                    "BUILDER", "WAITING", "WORKERS"
                )?;
                for b in b.builders {
                    writeln!(
                        out,
                        "{:<20} {:>7}  {:<30} {}",
                        b.name,
                        b.waiting,
                        b.workers.join(","),
                        b.steps.join(" → ")
                    )?;
                }
            }
            R::Builds(b) if self.detail => {
                for b in b.builds {
                    writeln!(
                        out,
                        "build {} ({}#{}) on {}: {}",
                        b.id,
                        b.builder,
                        b.number,
                        or_dash(&b.worker),
                        if b.result.is_empty() {
                            "running"
                        } else {
                            &b.result
                        }
                    )?;
                    writeln!(out, "  reason: {}", b.reason)?;
                    writeln!(
                        out,
                        "  started {}, {}",
                        local_time(b.started_unix_ms),
                        took(b.started_unix_ms, b.finished_unix_ms)
                    )?;
                    if !b.changes.is_empty() {
                        writeln!(out, "  changes:")?;
                    }
                    for c in &b.changes {
                        let short: String = c.revision.chars().take(12).collect();
                        writeln!(
                            out,
                            "    {} {} on {} by {} at {}",
                            c.id,
                            or_dash(&short),
                            or_dash(&c.branch),
                            or_dash(&c.author),
                            local_time(c.when_unix_ms)
                        )?;
                        for line in c.comments.lines() {
                            writeln!(out, "      {line}")?;
                        }
                        for f in &c.files {
                            writeln!(out, "      | {f}")?;
                        }
                    }
                    writeln!(out, "  properties:")?;
                    for p in &b.properties {
                        writeln!(out, "    {} = {} ({})", p.name, p.value, p.source)?;
                    }
                    writeln!(out, "  steps:")?;
                    for st in &b.steps {
                        let took = if st.finished_unix_ms > 0 {
                            format!(
                                "{:.1}s",
                                (st.finished_unix_ms - st.started_unix_ms) as f64 / 1000.0
                            )
                        } else {
                            "-".into()
                        };
                        writeln!(
                            out,
                            "    {} (attempt {}): {} in {took}{}",
                            st.name,
                            st.attempt,
                            if st.result.is_empty() {
                                "running"
                            } else {
                                &st.result
                            },
                            if st.detail.is_empty() {
                                String::new()
                            } else {
                                format!(" ({})", st.detail)
                            }
                        )?;
                    }
                }
            }
            R::Builds(b) => {
                let mut rows = vec![
                    [
                        "BUILD",
                        "BUILDER#NUMBER",
                        "BRANCH",
                        "REVISION",
                        "STARTED",
                        "TOOK",
                        "WORKER",
                        "RESULT",
                        "STEPS",
                    ]
                    .map(String::from)
                    .to_vec(),
                ];
                for b in b.builds {
                    let steps: Vec<String> = b
                        .steps
                        .iter()
                        .map(|s| {
                            let attempt = if s.attempt > 1 {
                                format!("#{}", s.attempt)
                            } else {
                                String::new()
                            };
                            format!(
                                "{}{attempt}:{}",
                                s.name,
                                if s.result.is_empty() {
                                    "running"
                                } else {
                                    &s.result
                                }
                            )
                        })
                        .collect();
                    let short: String = b.revision.chars().take(10).collect();
                    rows.push(vec![
                        b.id.to_string(),
                        format!("{}#{}", b.builder, b.number),
                        or_dash(&b.branch).to_string(),
                        or_dash(&short).to_string(),
                        local_time(b.started_unix_ms),
                        took(b.started_unix_ms, b.finished_unix_ms),
                        or_dash(&b.worker).to_string(),
                        if b.result.is_empty() {
                            "running".into()
                        } else {
                            b.result.clone()
                        },
                        steps.join(" "),
                    ]);
                }
                write_table(out, &rows)?;
            }
            R::Log(l) if self.raw => out.write_all(&l.data)?,
            R::Log(l) => self.print_log(l, out)?,
            R::Force(f) => match f.build {
                Some(b) => writeln!(
                    out,
                    "build {}#{} (id {}) started on {} for request {}; follow it with `log {}#{} -f`",
                    b.builder, b.number, b.id, b.worker, f.request_id, b.builder, b.number
                )?,
                None => writeln!(
                    out,
                    "build request {} queued; no worker has started it yet (a request number, not a build number: `builds` shows the build once a worker starts it)",
                    f.request_id
                )?,
            },
            R::Reload(r) => writeln!(out, "reloaded: {}", r.summary)?,
            R::Stop(_) => writeln!(out, "stopping")?,
            R::Hangup(_) => writeln!(out, "hung up")?,
            R::Unblock(u) => writeln!(
                out,
                "unblocked ({} throttle entries forgotten)",
                u.forgotten
            )?,
            R::Artifacts(a) if a.artifacts.is_empty() => writeln!(out, "no artifacts")?,
            R::Artifacts(a) => {
                for x in &a.artifacts {
                    writeln!(out, "{} {} bytes sha256 {}", x.name, x.size, x.sha256)?;
                }
            }
            R::Reports(r) if r.reports.is_empty() => writeln!(out, "every report was delivered")?,
            R::Reports(r) => {
                for u in &r.reports {
                    writeln!(
                        out,
                        "{} {}#{} {}: {} attempt(s), next at {}, last error: {}",
                        u.reporter,
                        u.builder,
                        u.number,
                        u.event,
                        u.attempts,
                        hms(u.next_attempt_unix_ms),
                        u.last_error
                    )?;
                }
            }
            R::Event(e) => writeln!(out, "{} {}", hms(e.unix_ms), event_text(&e))?,
            R::Error(e) => writeln!(out, "error: {e}")?,
        }
        out.flush()
    }
}

/// Rows as columns as wide as their widest cell, two spaces apart (the
/// last column unpadded).
fn write_table(out: &mut dyn Write, rows: &[Vec<String>]) -> std::io::Result<()> {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.extend(std::iter::repeat_n(
                    ' ',
                    widths[c] - cell.chars().count() + 2,
                ));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// A moment as the operator's local date and time.
fn local_time(unix_ms: i64) -> String {
    use chrono::TimeZone;
    match chrono::Local.timestamp_millis_opt(unix_ms) {
        chrono::LocalResult::Single(t) if unix_ms > 0 => t.format("%Y-%m-%d %H:%M:%S").to_string(),
        _ => "-".into(),
    }
}

/// How long something took, or has been running.
fn took(started_ms: i64, finished_ms: i64) -> String {
    if started_ms <= 0 {
        return "-".into();
    }
    let end = if finished_ms > 0 {
        finished_ms
    } else {
        chrono::Utc::now().timestamp_millis()
    };
    let secs = ((end - started_ms).max(0) as f64) / 1000.0;
    let text = if secs < 60.0 {
        format!("{secs:.1}s")
    } else if secs < 3600.0 {
        format!("{}m{:02}s", secs as u64 / 60, secs as u64 % 60)
    } else {
        format!("{}h{:02}m", secs as u64 / 3600, secs as u64 / 60 % 60)
    };
    if finished_ms > 0 {
        text
    } else {
        format!("{text}+")
    }
}

fn hms(unix_ms: i64) -> String {
    let s = (unix_ms / 1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// Runs one command and exits: `switchyard debug ... COMMAND`.
pub async fn once(
    addr: &str,
    creds: &Credentials,
    opts: &client::ClientOptions,
    json: bool,
    words: &[String],
) -> Result<(), String> {
    parse(&checkable(words))?; // errors in the line before connecting
    let mut console = Console::connect_with(addr, creds, opts)
        .await
        .map_err(|e| e.to_string())?;
    console.json = json;
    let words = console.resolve(words).await?;
    console.print_for(&words);
    let command = parse(&words)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    console.run(command, &mut out, ctrl_c).await
}

/// The interactive console: line editing, history, `help`.
pub fn interactive(
    rt: &tokio::runtime::Runtime,
    addr: &str,
    creds: &Credentials,
    opts: &client::ClientOptions,
    json: bool,
) -> Result<(), String> {
    use rustyline::error::ReadlineError;
    let mut console = rt
        .block_on(Console::connect_with(addr, creds, opts))
        .map_err(|e| e.to_string())?;
    console.json = json;
    let mut editor =
        rustyline::DefaultEditor::new().map_err(|e| format!("cannot start line editing: {e}"))?;
    let history =
        std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".switchyard_history"));
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    println!(
        "connected to {addr} as {}; type `help` for commands",
        creds.user()
    );
    loop {
        let line = match editor.readline("switchyard> ") {
            Ok(l) => l,
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(format!("cannot read the command: {e}")),
        };
        let words: Vec<String> = line.split_whitespace().map(String::from).collect();
        if words.is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(line.as_str());
        match words[0].as_str() {
            "quit" | "exit" => break,
            "help" => {
                println!("{HELP}");
                continue;
            }
            _ => {}
        }
        let json = json || words.iter().any(|w| w == "--json");
        let words: Vec<String> = words.into_iter().filter(|w| w != "--json").collect();
        console.json = json;
        let words = match parse(&checkable(&words)) {
            Ok(_) => match rt.block_on(console.resolve(&words)) {
                Ok(w) => w,
                Err(e) => {
                    eprintln!("error: {e}");
                    continue;
                }
            },
            Err(_) => words,
        };
        console.print_for(&words);
        let command = match parse(&words) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{e}");
                continue;
            }
        };
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let again = command.clone();
        let endless = match &command {
            debug_request::Command::Watch(_) => true,
            debug_request::Command::Log(l) => l.follow,
            _ => false,
        };
        let result = if endless {
            // A watch (or followed log) on a session of its own, that
            // Ctrl-C ends.
            rt.block_on(async {
                let mut watcher = Console::connect_with(addr, creds, opts)
                    .await
                    .map_err(|e| e.to_string())?;
                watcher.json = json;
                watcher.print_for(&words);
                let ctrl_c = async {
                    let _ = tokio::signal::ctrl_c().await;
                };
                watcher.run(command, &mut out, ctrl_c).await
            })
        } else {
            rt.block_on(console.run(command, &mut out, std::future::pending()))
        };
        let Err(e) = result else { continue };
        if !(e.starts_with("lost the master") || e.starts_with("the master closed")) {
            eprintln!("error: {e}");
            continue;
        }
        // The master restarted, or the link dropped: log in again.
        eprintln!("{e}; logging in again");
        console = match rt.block_on(async {
            tokio::time::timeout(
                std::time::Duration::from_secs(30),
                Console::connect_with(addr, creds, opts),
            )
            .await
        }) {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(format!("cannot log in again: {e}")),
            Err(_) => return Err("cannot log in again within 30 s".into()),
        };
        console.json = json;
        use debug_request::Command as C;
        if matches!(
            again,
            C::Status(_) | C::Workers(_) | C::Builders(_) | C::Builds(_) | C::Log(_)
        ) {
            if let Err(e) = rt.block_on(console.run(again, &mut out, std::future::pending())) {
                eprintln!("error: {e}");
            }
        } else {
            eprintln!(
                "logged in again; the command may not have reached the master: check, and repeat it if needed"
            );
        }
    }
    if let Some(h) = &history {
        let _ = editor.save_history(h);
    }
    Ok(())
}
