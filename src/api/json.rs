//! The JSON that the JSON API and the console's `--json` share: one
//! shape for a build, the builders and the workers, whichever door asked.

use serde_json::{Value, json};

use crate::proto::BuildDetails;

fn opt_str(s: &str) -> Value {
    if s.is_empty() { Value::Null } else { json!(s) }
}

fn opt_ms(ms: i64) -> Value {
    if ms == 0 { Value::Null } else { json!(ms) }
}

/// Workers as `debug --json workers` and the JSON API show them.
pub fn workers_json(w: &crate::proto::WorkersReply) -> Value {
    json!(w.workers.iter().map(|w| json!({
        "name": w.name, "connected": w.connected, "hostname": opt_str(&w.hostname), "os": opt_str(&w.os),
        "arch": opt_str(&w.arch), "cpus": w.cpus, "version": opt_str(&w.version), "max_builds": w.max_builds,
        "running_builds": w.running_builds, "session_id": opt_str(&w.session_id),
        "connected_unix_ms": opt_ms(w.connected_unix_ms),
        "last_heard_unix_ms": opt_ms(w.last_heard_unix_ms),
    })).collect::<Vec<_>>())
}

/// Builders as `debug --json builders` and the JSON API show them.
pub fn builders_json(b: &crate::proto::BuildersReply) -> Value {
    json!(
        b.builders
            .iter()
            .map(|b| json!({
                "name": b.name, "workers": b.workers, "steps": b.steps, "waiting": b.waiting,
            }))
            .collect::<Vec<_>>()
    )
}

/// A build as `debug --json` and the JSON API show it.
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
        "changes": b.changes.iter().map(|c| json!({
            "id": c.id,
            "repository": c.repository,
            "branch": c.branch,
            "revision": c.revision,
            "author": c.author,
            "comments": c.comments,
            "files": c.files,
            "when_unix_ms": c.when_unix_ms,
        })).collect::<Vec<_>>(),
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
            "log": { "stored": s.log_stored, "bytes": s.log_bytes, "lines": s.log_lines },
        })).collect::<Vec<_>>(),
    })
}
