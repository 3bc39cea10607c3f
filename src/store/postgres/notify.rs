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

/// Wake-ups from the other masters (and this one's own writes). Dropping
/// it closes the listening connection.
pub struct Wakeups {
    notify: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Wakeups {
    /// Returns once something may have changed since the last call (several
    /// wake-ups before a call make one).
    pub async fn woken(&self) {
        self.notify.notified().await
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
        let first = listening(&self.config, notify.clone()).await?;
        let (config, wake) = (self.config.clone(), notify.clone());
        let task = tokio::spawn(async move {
            first.await;
            let mut backoff = Duration::from_millis(100);
            loop {
                tokio::time::sleep(backoff).await;
                match listening(&config, wake.clone()).await {
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
        Ok(Wakeups { notify, task })
    }
}

/// Connects, listens, and returns a future that forwards notifications as
/// wake-ups until the connection ends.
async fn listening(
    config: &tokio_postgres::Config,
    wake: Arc<Notify>,
) -> Result<impl std::future::Future<Output = ()> + Send + 'static, StateError> {
    let (client, mut connection) = config.connect(tokio_postgres::NoTls).await?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let messages = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
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
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    Ok(async move {
        let _ = rx.await;
        drop(client);
        messages.abort();
    })
}
