//! `ping`: echoes every frame back until the client or the master hangs up.
//! Monitors use it to check that the port is alive and logins work;
//! benchmarks use it to measure the port; tests use it to prove routing.

use futures_util::{SinkExt, StreamExt};

use crate::dispatcher::Session;

/// The service's name on the port.
pub const NAME: &str = "ping";

/// Serves one `ping` session.
pub async fn serve(mut session: Session) {
    loop {
        let frame = tokio::select! {
            _ = session.hangup.requested() => {
                tracing::info!(user = %session.user, session = %session.id, "ping session hung up by the master");
                break;
            }
            f = session.stream.next() => f,
        };
        match frame {
            Some(Ok(bytes)) => {
                if let Err(e) = session.stream.send(bytes.freeze()).await {
                    tracing::debug!(session = %session.id, error = %e, "ping: write failed");
                    break;
                }
            }
            Some(Err(e)) => {
                tracing::info!(peer = %session.peer, session = %session.id, error = %e, "ping: closing session on a bad frame");
                break;
            }
            None => break,
        }
    }
    tracing::debug!(session = %session.id, "ping session closed");
}
