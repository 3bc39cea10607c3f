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

use crate::client::{self, ClientSession, Credentials};
use crate::proto::ReloadRequest;
use crate::proto::{
    BuildDetails, BuildersRequest, BuildsRequest, DebugEvent, DebugReply, DebugRequest,
    ForceRequest, HangupRequest, LogRequest, StatusRequest, StopRequest, WatchRequest,
    WorkersRequest, debug_event, debug_reply, debug_request,
};

pub const HELP: &str = "\
commands:
  status                                   the master at a glance
  workers                                  configured workers, connected or not
  builders                                 builders, their workers, steps and queue
  builds [BUILDER] [--limit N]             recent builds with their steps
  build BUILD                              one build: properties with sources, steps
  log BUILD [STEP]                         a build's output (STEP: name or position)
  force BUILDER [--branch B] [--revision R] [--repository R] [--property NAME=VALUE]...
                                           request a build
  stop BUILD                               stop a running build
  hangup WORKER                            hang up a worker's session
  unblock ADDRESS                          forget an address's failed logins
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
        Some("log" | "stop" | "build")
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
        "force" => &["--branch", "--revision", "--repository", "--property"],
        _ => &[],
    };
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
        }),
        ("log", _) => return usage("log BUILD [STEP]"),
        ("force", 1) => C::Force(ForceRequest {
            builder: words[0].clone(),
            branch,
            revision,
            repository,
            properties,
        }),
        ("force", _) => {
            return usage(
                "force BUILDER [--branch B] [--revision R] [--repository R] [--property NAME=VALUE]...",
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
        ("reload", 0) => C::Reload(ReloadRequest {}),
        ("status" | "workers" | "builders" | "watch" | "reload", _) => {
            return Err(format!("{cmd} takes no arguments"));
        }
        _ => return Err(format!("unknown command {cmd:?}; try `help`")),
    };
    Ok(command)
}

fn opt_str(s: &str) -> Value {
    if s.is_empty() { Value::Null } else { json!(s) }
}

fn opt_ms(ms: i64) -> Value {
    if ms == 0 { Value::Null } else { json!(ms) }
}

pub fn build_json(b: &BuildDetails) -> Value {
    json!({
        "id": b.id,
        "number": b.number,
        "properties": b.properties.iter().map(|p| (p.name.clone(), json!({"value": p.value, "source": p.source}))).collect::<serde_json::Map<String, Value>>(),
        "builder": b.builder,
        "worker": b.worker,
        "result": opt_str(&b.result),
        "reason": b.reason,
        "repository": b.repository,
        "branch": b.branch,
        "revision": b.revision,
        "started_unix_ms": b.started_unix_ms,
        "finished_unix_ms": opt_ms(b.finished_unix_ms),
        "steps": b.steps.iter().map(|s| json!({
            "name": s.name,
            "position": s.position,
            "attempt": s.attempt,
            "step_id": s.step_id,
            "result": opt_str(&s.result),
            "exit_code": s.exit_code,
            "signal": s.signal,
            "detail": s.detail,
            "on_lost": s.on_lost,
            "started_unix_ms": s.started_unix_ms,
            "finished_unix_ms": opt_ms(s.finished_unix_ms),
        })).collect::<Vec<_>>(),
    })
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
        let session = client::connect(addr, super::SERVICE, creds).await?;
        Ok(Console {
            session,
            next_id: 1,
            json: false,
            detail: false,
        })
    }

    /// Turns a `BUILDER#NUMBER` in a command's BUILD position into the
    /// build's id (one query to the master); other words are kept.
    pub async fn resolve(&mut self, words: &[String]) -> Result<Vec<String>, String> {
        let mut words = words.to_vec();
        let takes_build = matches!(
            words.first().map(String::as_str),
            Some("log" | "stop" | "build")
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

    fn print(&self, r: debug_reply::Result, out: &mut dyn Write) -> std::io::Result<()> {
        use debug_reply::Result as R;
        if self.json {
            let v = match r {
                R::Status(s) => json!({
                    "version": s.version, "workers_configured": s.workers_configured, "workers_connected": s.workers_connected,
                    "builders": s.builders, "builds_running": s.builds_running, "requests_waiting": s.requests_waiting,
                    "watchers": s.watchers,
                }),
                R::Workers(w) => json!(w.workers.iter().map(|w| json!({
                    "name": w.name, "connected": w.connected, "hostname": opt_str(&w.hostname), "os": opt_str(&w.os),
                    "arch": opt_str(&w.arch), "cpus": w.cpus, "version": opt_str(&w.version), "max_builds": w.max_builds,
                    "running_builds": w.running_builds, "session_id": opt_str(&w.session_id),
                    "connected_unix_ms": opt_ms(w.connected_unix_ms),
                })).collect::<Vec<_>>()),
                R::Builders(b) => json!(b.builders.iter().map(|b| json!({
                    "name": b.name, "workers": b.workers, "steps": b.steps, "waiting": b.waiting,
                })).collect::<Vec<_>>()),
                R::Builds(b) => json!(b.builds.iter().map(build_json).collect::<Vec<_>>()),
                R::Log(l) => json!({
                    "step": l.step, "attempt": l.attempt, "stream": crate::worker::agent::stream_name(l.stream),
                    "text": String::from_utf8_lossy(&l.data),
                }),
                R::Force(f) => json!({"request_id": f.request_id}),
                R::Reload(r) => json!({"summary": r.summary}),
                R::Stop(_) | R::Hangup(_) => json!({"ok": true}),
                R::Unblock(u) => json!({"forgotten": u.forgotten}),
                R::Event(e) => event_json(&e),
                R::Error(e) => json!({"error": e}),
            };
            writeln!(out, "{v}")?;
            return out.flush();
        }
        match r {
            R::Status(s) => writeln!(
                out,
                "switchyard {}: {}/{} workers connected, {} builders, {} builds running, {} requests waiting",
                s.version,
                s.workers_connected,
                s.workers_configured,
                s.builders,
                s.builds_running,
                s.requests_waiting
            )?,
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
                writeln!(
                    out,
                    "{:>6} {:<24} {:<16} {:<10} {:<12} {:<12} STEPS",
                    "BUILD", "BUILDER#NUMBER", "BRANCH", "REVISION", "WORKER", "RESULT"
                )?;
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
                    let result = if b.result.is_empty() {
                        "running"
                    } else {
                        &b.result
                    };
                    let short: String = b.revision.chars().take(10).collect();
                    writeln!(
                        out,
                        "{:>6} {:<24} {:<16} {:<10} {:<12} {:<12} {}",
                        b.id,
                        format!("{}#{}", b.builder, b.number),
                        or_dash(&b.branch),
                        or_dash(&short),
                        b.worker,
                        result,
                        steps.join(" ")
                    )?;
                }
            }
            R::Log(l) => out.write_all(&l.data)?,
            R::Force(f) => writeln!(
                out,
                "build request {} queued (a request number, not a build number: `builds` shows the build once a worker starts it)",
                f.request_id
            )?,
            R::Reload(r) => writeln!(out, "reloaded: {}", r.summary)?,
            R::Stop(_) => writeln!(out, "stopping")?,
            R::Hangup(_) => writeln!(out, "hung up")?,
            R::Unblock(u) => writeln!(
                out,
                "unblocked ({} throttle entries forgotten)",
                u.forgotten
            )?,
            R::Event(e) => writeln!(out, "{} {}", hms(e.unix_ms), event_text(&e))?,
            R::Error(e) => writeln!(out, "error: {e}")?,
        }
        out.flush()
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
    json: bool,
    words: &[String],
) -> Result<(), String> {
    parse(&checkable(words))?; // errors in the line before connecting
    let mut console = Console::connect(addr, creds)
        .await
        .map_err(|e| e.to_string())?;
    console.json = json;
    let words = console.resolve(words).await?;
    console.detail = words.first().is_some_and(|w| w == "build");
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
    json: bool,
) -> Result<(), String> {
    use rustyline::error::ReadlineError;
    let mut console = rt
        .block_on(Console::connect(addr, creds))
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
        console.detail = words.first().is_some_and(|w| w == "build");
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
        let result = if matches!(command, debug_request::Command::Watch(_)) {
            // A watch of its own, on a session of its own, that Ctrl-C ends.
            rt.block_on(async {
                let mut watcher = Console::connect(addr, creds)
                    .await
                    .map_err(|e| e.to_string())?;
                watcher.json = json;
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
                Console::connect(addr, creds),
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
