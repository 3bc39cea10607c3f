//! Wake-ups between masters: `NOTIFY` only wakes, the tables stay the truth.
//!
//! A write that gives the other masters something to do (a change, a build
//! request) sends `NOTIFY switchyard` in its own transaction, so the
//! notification goes out exactly when the write commits. Each master
//! listens on one connection of its own ([`PgState::listen`]) and, woken,
//! reads the tables as it would after its own write. A notification can be
//! lost (the listening connection broke, the server restarted): a new
//! listening connection therefore wakes once when it is made, so nothing
//! that committed meanwhile waits for the next push.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;

use super::PgState;
use crate::store::StateError;

/// The channel every master listens on.
pub(super) const CHANNEL: &str = "switchyard";

/// The channel build events are relayed on (see `builds::relay`).
const EVENTS: &str = "switchyard_events";

/// A notification's payload is at most 8,000 bytes: events are sent in
/// batches below this.
const MAX_PAYLOAD: usize = 7000;

/// Build events another master relayed.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Relayed {
    /// The sending master process (a random id of its own; its own relays
    /// are not re-emitted).
    pub from: i64,
    pub events: Vec<crate::builds::Stamped>,
}

/// Wake-ups from the other masters (and this one's own writes). Dropping
/// it closes the listening connection.
pub struct Wakeups {
    notify: Arc<Notify>,
    events: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Relayed>>,
    task: tokio::task::JoinHandle<()>,
}

impl Wakeups {
    /// Returns once something may have changed since the last call (several
    /// wake-ups before a call make one).
    pub async fn woken(&self) {
        self.notify.notified().await
    }

    /// The next batch of build events another master relayed.
    pub async fn relayed(&self) -> Option<Relayed> {
        self.events.lock().await.recv().await
    }
}

impl Drop for Wakeups {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PgState {
    /// Listens for wake-ups on a connection of its own (not one of the
    /// pool's), made again after it breaks, with a backoff of up to 5 s.
    /// Fails only if the first connection cannot be made.
    pub async fn listen(&self) -> Result<Wakeups, StateError> {
        let notify = Arc::new(Notify::new());
        let me = self.origin;
        // A listener that falls behind loses batches, not memory.
        let (events_tx, events) = tokio::sync::mpsc::channel(256);
        let first = listening(&self.config, notify.clone(), events_tx.clone(), me).await?;
        let (config, wake) = (self.config.clone(), notify.clone());
        let task = tokio::spawn(async move {
            first.await;
            let mut backoff = Duration::from_millis(100);
            loop {
                tokio::time::sleep(backoff).await;
                match listening(&config, wake.clone(), events_tx.clone(), me).await {
                    Ok(connected) => {
                        backoff = Duration::from_millis(100);
                        // Whatever was sent while no connection listened
                        // is in the tables: wake to read them.
                        wake.notify_one();
                        connected.await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for other masters' wake-ups; trying again");
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
        Ok(Wakeups {
            notify,
            events: tokio::sync::Mutex::new(events),
            task,
        })
    }

    /// Sends build events to the other masters listening (in batches that
    /// fit a notification).
    pub async fn relay(&self, events: &[crate::builds::Stamped]) -> Result<(), StateError> {
        let from = self.origin;
        let mut batches: Vec<Vec<String>> = vec![Vec::new()];
        let mut size = 0;
        for e in events {
            let one = serde_json::to_string(e).map_err(|e| StateError::Postgres(e.to_string()))?;
            if size + one.len() > MAX_PAYLOAD && !batches.last().is_some_and(Vec::is_empty) {
                batches.push(Vec::new());
                size = 0;
            }
            size += one.len() + 1;
            if let Some(b) = batches.last_mut() {
                b.push(one);
            }
        }
        let client = self.client().await?;
        for b in batches.into_iter().filter(|b| !b.is_empty()) {
            let payload = format!("{{\"from\":{from},\"events\":[{}]}}", b.join(","));
            client
                .execute("SELECT pg_notify($1, $2)", &[&EVENTS, &payload])
                .await?;
        }
        Ok(())
    }
}

/// Connects, listens, and returns a future that forwards notifications as
/// wake-ups until the connection ends.
async fn listening(
    config: &tokio_postgres::Config,
    wake: Arc<Notify>,
    events: tokio::sync::mpsc::Sender<Relayed>,
    me: i64,
) -> Result<impl std::future::Future<Output = ()> + Send + 'static, StateError> {
    let (client, mut connection) = config.connect(tokio_postgres::NoTls).await?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let messages = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) if n.channel() == EVENTS => {
                    match serde_json::from_str::<Relayed>(n.payload()) {
                        Ok(r) if r.from != me => {
                            let _ = events.try_send(r);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::debug!(error = %e, "a relayed event batch does not parse")
                        }
                    }
                }
                Some(Ok(AsyncMessage::Notification(_))) => wake.notify_one(),
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "the connection listening for wake-ups broke");
                    break;
                }
                None => break,
            }
        }
        let _ = tx.send(());
    });
    client
        .batch_execute(&format!("LISTEN {CHANNEL}; LISTEN {EVENTS}"))
        .await?;
    Ok(async move {
        let _ = rx.await;
        drop(client);
        messages.abort();
    })
}
