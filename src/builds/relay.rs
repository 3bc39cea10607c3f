//! Live events across masters sharing a database.
//!
//! Every master's console `watch`, web UI and API event stream read one
//! broadcast of domain events; on a shared PostgreSQL database a build may
//! run on another master. Each master therefore sends the build events it
//! emits (a build or step starting or ending, output stored) to the others
//! with `NOTIFY switchyard_events`, a batch every 100 ms at most (output
//! events of one step summed), and re-emits what the others send, marked
//! [`Stamped::elsewhere`] so that it is not sent on again. Events are a
//! live view, not the truth: a batch that is lost (a listening connection
//! broke) costs a live view an update, never a record.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::{BuildMaster, Event, Stamped};
use crate::store::postgres::{PgState, Relayed};

/// How long events are gathered into one notification.
const BATCH: Duration = Duration::from_millis(100);

/// Whether an event is about a build (relayed); a worker's session or a
/// reload is this master's own business.
fn relayed(e: &Event) -> bool {
    matches!(
        e,
        Event::BuildStarted { .. }
            | Event::StepStarted { .. }
            | Event::StepEnded { .. }
            | Event::BuildEnded { .. }
            | Event::OutputStored { .. }
    )
}

/// Sends this master's build events to the others until `shutdown`.
pub(crate) async fn send(bm: BuildMaster, pg: PgState, shutdown: CancellationToken) {
    let mut events = bm.subscribe();
    loop {
        let mut batch = Vec::new();
        let until = tokio::time::Instant::now() + BATCH;
        loop {
            let next = if batch.is_empty() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = events.recv() => r,
                }
            } else {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(until) => break,
                    r = events.recv() => r,
                }
            };
            match next {
                Ok(s) if !s.elsewhere && relayed(&s.event) => batch.push(s),
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => return,
            }
        }
        if let Err(e) = pg.relay(&coalesce(batch)).await {
            tracing::debug!(error = %e, "cannot send build events to the other masters");
        }
    }
}

/// Output events of one step attempt summed into one (the last of them).
fn coalesce(batch: Vec<Stamped>) -> Vec<Stamped> {
    let mut output: BTreeMap<(i64, i64), usize> = BTreeMap::new();
    let mut out: Vec<Stamped> = Vec::with_capacity(batch.len());
    for s in batch {
        if let Event::OutputStored { build, step, bytes } = s.event {
            if let Some(&at) = output.get(&(build, step))
                && let Event::OutputStored { bytes: sum, .. } = &mut out[at].event
            {
                *sum += bytes;
                out[at].unix_ms = s.unix_ms;
                continue;
            }
            output.insert((build, step), out.len());
        }
        out.push(s);
    }
    out
}

/// Re-emits what another master relayed.
pub(crate) fn receive(bm: &BuildMaster, relayed: Relayed) {
    for mut s in relayed.events {
        s.elsewhere = true;
        bm.emit_stamped(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_events_of_a_step_are_summed_and_the_rest_kept_in_order() {
        let at = |unix_ms, event| Stamped {
            unix_ms,
            event,
            elsewhere: false,
        };
        let out = |build, step, bytes| Event::OutputStored { build, step, bytes };
        let started = Event::StepStarted {
            build: 1,
            step: "s".into(),
            attempt: 1,
        };
        let got = coalesce(vec![
            at(1, started.clone()),
            at(2, out(1, 10, 5)),
            at(3, out(2, 20, 7)),
            at(4, out(1, 10, 6)),
        ]);
        assert_eq!(
            got,
            vec![at(1, started), at(4, out(1, 10, 11)), at(3, out(2, 20, 7))]
        );
        assert!(!relayed(&Event::Reloaded {
            summary: String::new()
        }));
    }
}
