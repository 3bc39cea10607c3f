//! Applying a new build configuration to a running master, by name, leaving
//! alone everything that did not change.
//!
//! - Workers added may log in at once. Workers removed have their running
//!   builds interrupted (their sessions are hung up by the port), or, when
//!   draining, finish their current builds, get no new work, and are hung up
//!   after.
//! - Builders unchanged (their whole definition compares equal) are not
//!   touched. Builders changed keep running their current builds with the old
//!   definition; new builds of them wait until those end, then use the new
//!   one, with their queue and history kept. Builders removed have their
//!   running builds interrupted, then their queue and history deleted.
//! - Schedulers apply to changes pushed after the reload.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{BuildConfig, BuildMaster};

/// How to apply a reload.
#[derive(Clone, Debug, Default)]
pub struct ReconfigOptions {
    /// `[master] drain_removed_workers`.
    pub drain_removed_workers: bool,
    /// Workers whose password changed: their sessions are hung up, so their
    /// running builds are interrupted.
    pub new_passwords: BTreeSet<String>,
}

/// What a reload did to workers, builders and schedulers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildsReport {
    pub workers_added: Vec<String>,
    pub workers_removed: Vec<String>,
    /// Removed workers finishing their current builds first.
    pub workers_draining: Vec<String>,
    pub workers_unchanged: usize,
    pub builders_added: Vec<String>,
    pub builders_removed: Vec<String>,
    pub builders_changed: Vec<String>,
    /// Changed builders whose new definition waits for a running build.
    pub builders_waiting: Vec<String>,
    pub builders_unchanged: usize,
    pub schedulers_added: Vec<String>,
    pub schedulers_removed: Vec<String>,
    pub schedulers_changed: Vec<String>,
    pub schedulers_unchanged: usize,
    /// Builds interrupted, as (build, reason).
    pub interrupted: Vec<(i64, String)>,
}

fn list(f: &mut fmt::Formatter<'_>, label: &str, v: &[String]) -> fmt::Result {
    if !v.is_empty() {
        write!(f, " {label} [{}]", v.join(", "))?;
    }
    Ok(())
}

impl fmt::Display for BuildsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "workers:")?;
        list(f, "added", &self.workers_added)?;
        list(f, "removed", &self.workers_removed)?;
        list(f, "draining", &self.workers_draining)?;
        write!(f, " {} unchanged; builders:", self.workers_unchanged)?;
        list(f, "added", &self.builders_added)?;
        list(f, "removed", &self.builders_removed)?;
        list(f, "changed", &self.builders_changed)?;
        list(f, "waiting for a build to finish", &self.builders_waiting)?;
        write!(f, " {} unchanged; schedulers:", self.builders_unchanged)?;
        list(f, "added", &self.schedulers_added)?;
        list(f, "removed", &self.schedulers_removed)?;
        list(f, "changed", &self.schedulers_changed)?;
        write!(f, " {} unchanged", self.schedulers_unchanged)?;
        if !self.interrupted.is_empty() {
            let ids: Vec<String> = self
                .interrupted
                .iter()
                .map(|(b, _)| b.to_string())
                .collect();
            write!(f, "; builds interrupted: {}", ids.join(", "))?;
        }
        Ok(())
    }
}

fn diff<T: PartialEq>(
    old: &BTreeMap<String, T>,
    new: &BTreeMap<String, T>,
) -> (Vec<String>, Vec<String>, Vec<String>, usize) {
    let added = new
        .keys()
        .filter(|k| !old.contains_key(*k))
        .cloned()
        .collect();
    let removed = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .cloned()
        .collect();
    let mut changed = Vec::new();
    let mut unchanged = 0;
    for (k, v) in new {
        match old.get(k) {
            Some(o) if o == v => unchanged += 1,
            Some(_) => changed.push(k.clone()),
            None => {}
        }
    }
    (added, removed, changed, unchanged)
}

impl BuildMaster {
    /// Applies `new` as described in the module docs. Validation happened
    /// before: this cannot fail, and changes nothing that compares equal.
    pub fn reconfigure(&self, new: BuildConfig, opts: &ReconfigOptions) -> BuildsReport {
        let inner = &self.inner;
        let mut report = BuildsReport::default();
        let old = inner.config();
        let mut pending = inner
            .pending_builders
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut draining = inner.draining.lock().unwrap_or_else(|e| e.into_inner());
        let running = inner.running.lock().unwrap_or_else(|e| e.into_inner());
        let mut active = new;

        // Builders, compared with what they will be once a change still
        // waiting lands (so repeating a waiting change is a no-op). Only the
        // builders that changed are copied.
        let effective = |name: &str| pending.get(name).or_else(|| old.builders.get(name));
        let removed: Vec<String> = old
            .builders
            .keys()
            .filter(|k| !active.builders.contains_key(*k))
            .cloned()
            .collect();
        let mut changed = Vec::new();
        let mut still_waiting = Vec::new();
        for (name, def) in &active.builders {
            match effective(name) {
                None => report.builders_added.push(name.clone()),
                Some(e) if e == def => {
                    report.builders_unchanged += 1;
                    if pending.contains_key(name) {
                        still_waiting.push(name.clone());
                    }
                }
                Some(_) => changed.push(name.clone()),
            }
        }
        for name in still_waiting {
            // The same change as before, still waiting: keep the running definition.
            if let Some(current) = old.builders.get(&name) {
                active.builders.insert(name.clone(), current.clone());
            }
            report.builders_waiting.push(name);
        }
        for name in changed {
            let busy = running.values().any(|r| r.builder == name);
            match old.builders.get(&name) {
                Some(current) if busy => {
                    // Keep the definition its running build uses; the new one waits.
                    if let Some(next) = active.builders.insert(name.clone(), current.clone()) {
                        pending.insert(name.clone(), next);
                    }
                    report.builders_waiting.push(name);
                }
                _ => {
                    pending.remove(&name);
                    report.builders_changed.push(name);
                }
            }
        }
        let links = inner
            .workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for name in &removed {
            pending.remove(name);
            for (id, r) in running.iter().filter(|(_, r)| &r.builder == name) {
                let reason = format!("builder {name} was removed from the config");
                if let Some(link) = links.get(&r.worker) {
                    link.interrupt_steps(Some(&[*id]), &reason);
                }
                r.stop.stop(&reason);
                report
                    .interrupted
                    .push((*id, format!("builder {name} removed")));
            }
            self.forget_builder_later(name.clone());
        }
        report.builders_removed = removed;

        // Workers. A draining worker put back in the config is simply kept.
        draining.retain(|w| !active.workers.contains_key(w));
        let (added, removed, _changed, unchanged) = diff(&old.workers, &active.workers);
        report.workers_added = added;
        report.workers_unchanged = unchanged + _changed.len();
        for name in removed {
            let busy: Vec<i64> = running
                .iter()
                .filter(|(_, r)| r.worker == name)
                .map(|(id, _)| *id)
                .collect();
            if opts.drain_removed_workers && !busy.is_empty() {
                // Keep it configured (so its session stays) until its builds end.
                if let Some(w) = old.workers.get(&name) {
                    active.workers.insert(name.clone(), w.clone());
                }
                draining.insert(name.clone());
                report.workers_draining.push(name.clone());
            } else {
                let reason = format!("worker {name} was removed from the config");
                if let Some(link) = links.get(&name) {
                    link.interrupt_steps(None, &reason);
                }
                for id in busy {
                    if let Some(r) = running.get(&id) {
                        r.stop.stop(&reason);
                    }
                    report
                        .interrupted
                        .push((id, format!("worker {name} removed")));
                }
                draining.remove(&name);
                if let Some(link) = links.get(&name) {
                    link.hangup.cancel();
                }
            }
            report.workers_removed.push(name);
        }
        for name in &opts.new_passwords {
            let reason = format!("worker {name}'s password changed; it must log in again");
            if let Some(link) = links.get(name) {
                link.interrupt_steps(None, &reason);
            }
            for (id, r) in running.iter().filter(|(_, r)| &r.worker == name) {
                r.stop.stop(&reason);
                report
                    .interrupted
                    .push((*id, format!("worker {name}'s password changed")));
            }
        }
        let (added, removed, changed, unchanged) = diff(&old.schedulers, &active.schedulers);
        report.schedulers_added = added;
        report.schedulers_removed = removed;
        report.schedulers_changed = changed;
        report.schedulers_unchanged = unchanged;

        *inner.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(active);
        drop((running, draining, pending));
        inner.emit(super::Event::Reloaded {
            summary: report.to_string(),
        });
        self.wake();
        report
    }

    /// Called when a build ends: lands a builder's waiting change once its
    /// last running build is over, and hangs up a drained worker.
    pub(super) fn after_build(&self, builder: &str, worker: &str) {
        let inner = &self.inner;
        let running = inner.running.lock().unwrap_or_else(|e| e.into_inner());
        let mut pending = inner
            .pending_builders
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !running.values().any(|r| r.builder == builder)
            && let Some(def) = pending.remove(builder)
        {
            let mut config = inner.config.write().unwrap_or_else(|e| e.into_inner());
            let mut next = (**config).clone();
            next.builders.insert(builder.to_string(), def);
            *config = Arc::new(next);
            tracing::info!(
                builder,
                "builder re-instantiated with its new definition after its build finished"
            );
        }
        let mut draining = inner.draining.lock().unwrap_or_else(|e| e.into_inner());
        if draining.contains(worker) && self.slots_for(worker).busy.load(Ordering::SeqCst) == 0 {
            draining.remove(worker);
            let mut config = inner.config.write().unwrap_or_else(|e| e.into_inner());
            let mut next = (**config).clone();
            next.workers.remove(worker);
            *config = Arc::new(next);
            tracing::info!(worker, "removed worker drained: hanging up");
            if let Some(link) = self.link_of(worker) {
                link.hangup.cancel();
            }
        }
    }

    /// Deletes a removed builder's queue and history once its running builds
    /// have ended (bounded wait).
    fn forget_builder_later(&self, name: String) {
        let me = self.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while tokio::time::Instant::now() < deadline
                && me
                    .inner
                    .running
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .values()
                    .any(|r| r.builder == name)
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if me.inner.config().builders.contains_key(&name) {
                return; // added back meanwhile: keep its history
            }
            match me.inner.state.delete_builder(&name).await {
                Ok(n) => {
                    tracing::info!(builder = %name, builds = n, "removed builder's queue and history deleted")
                }
                Err(e) => {
                    tracing::error!(builder = %name, error = %e, "cannot delete a removed builder's history")
                }
            }
        });
    }
}
