//! The console over the native protocol: service `debug`.
//!
//! The client sends `DebugRequest` frames; each is served in a task of its
//! own, and its `DebugReply` frames (same id; the last with `end`) go back
//! through one writer, so a `watch` does not block other commands on the
//! same session. The session ends when the client closes it or the master
//! hangs up.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use prost::Message;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use super::{DebugApi, DebugError};
use crate::dispatcher::Session;
use crate::proto::{DebugReply, DebugRequest, debug_reply, debug_request};

/// Encoded reply bytes waiting to be written, per session: a client that
/// asks for a huge log and never reads holds this much of the master's
/// memory, not the log.
const QUEUE_BYTES: usize = 1024 * 1024;

/// Requests one session may have in flight at once.
const MAX_IN_FLIGHT: usize = 16;

/// The way replies go to the session's writer: bounded by bytes. A sender
/// waits for room (backpressure up to the request's task, and from there to
/// the log reader), so a slow or silent client slows only itself.
#[derive(Clone)]
struct Replies {
    tx: mpsc::Sender<(DebugReply, OwnedSemaphorePermit)>,
    room: Arc<Semaphore>,
}

impl Replies {
    async fn send(&self, reply: DebugReply) -> Result<(), ()> {
        let n = reply.encoded_len().clamp(1, QUEUE_BYTES) as u32;
        let permit = self
            .room
            .clone()
            .acquire_many_owned(n)
            .await
            .map_err(|_| ())?;
        self.tx.send((reply, permit)).await.map_err(|_| ())
    }

    /// Sends without waiting; a reply with no room is dropped (the client
    /// is not reading anyway). For the session's own loop, which also
    /// writes, and so must never wait for room.
    fn try_send(&self, reply: DebugReply) {
        let n = reply.encoded_len().clamp(1, QUEUE_BYTES) as u32;
        if let Ok(permit) = self.room.clone().try_acquire_many_owned(n) {
            let _ = self.tx.try_send((reply, permit));
        }
    }
}

pub async fn serve(api: DebugApi, session: Session) {
    let user = session.user.clone();
    let hangup = session.hangup.clone();
    let Session { stream, .. } = session;
    let (mut sink, mut frames) = stream.split();
    let (tx, mut rx) = mpsc::channel(64);
    let replies = Replies {
        tx,
        room: Arc::new(Semaphore::new(QUEUE_BYTES)),
    };
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = hangup.requested() => break,
            Some((reply, room)) = rx.recv() => {
                let sent = sink.send(Bytes::from(reply.encode_to_vec())).await;
                drop(room);
                if sent.is_err() {
                    break;
                }
            }
            frame = frames.next() => {
                let Some(Ok(bytes)) = frame else { break };
                let req = match DebugRequest::decode(bytes.freeze()) {
                    Ok(r) => r,
                    Err(_) => {
                        replies.try_send(error(0, "not a DebugRequest".into()));
                        continue;
                    }
                };
                while tasks.try_join_next().is_some() {}
                if tasks.len() >= MAX_IN_FLIGHT {
                    replies.try_send(error(req.id, format!("more than {MAX_IN_FLIGHT} requests in flight on this session; wait for one to end")));
                    continue;
                }
                tasks.spawn(handle(api.clone(), req, user.clone(), replies.clone()));
            }
        }
    }
    tasks.abort_all();
}

fn error(id: u64, message: String) -> DebugReply {
    DebugReply {
        id,
        end: true,
        result: Some(debug_reply::Result::Error(message)),
    }
}

fn done(id: u64, result: debug_reply::Result) -> DebugReply {
    DebugReply {
        id,
        end: true,
        result: Some(result),
    }
}

async fn handle(api: DebugApi, req: DebugRequest, user: String, tx: Replies) {
    use debug_reply::Result as R;
    let id = req.id;
    let Some(command) = req.command else {
        let _ = tx.send(error(id, "empty request".into())).await;
        return;
    };
    let reply: Result<Option<R>, DebugError> = match command {
        debug_request::Command::Status(_) => api.status().await.map(|r| Some(R::Status(r))),
        debug_request::Command::Workers(_) => Ok(Some(R::Workers(api.workers()))),
        debug_request::Command::Builders(_) => api.builders().await.map(|r| Some(R::Builders(r))),
        debug_request::Command::Builds(r) => api.builds(r).await.map(|r| Some(R::Builds(r))),
        debug_request::Command::Force(r) => api.force(r, &user).await.map(|r| Some(R::Force(r))),
        debug_request::Command::Stop(r) => api.stop(r).map(|r| Some(R::Stop(r))),
        debug_request::Command::Hangup(r) => api.hangup(r).map(|r| Some(R::Hangup(r))),
        debug_request::Command::Unblock(r) => api.unblock(r, &user).map(|r| Some(R::Unblock(r))),
        debug_request::Command::Reports(_) => api.reports().await.map(|r| Some(R::Reports(r))),
        debug_request::Command::Artifacts(r) => {
            api.artifacts(r).await.map(|r| Some(R::Artifacts(r)))
        }
        debug_request::Command::Reload(_) => api.reload(&user).await.map(|r| Some(R::Reload(r))),
        debug_request::Command::Log(r) => {
            // A chunk or two ahead of the writer, no more.
            let (ltx, mut lrx) = mpsc::channel(2);
            let forward = {
                let tx = tx.clone();
                tokio::spawn(async move {
                    while let Some(l) = lrx.recv().await {
                        if tx
                            .send(DebugReply {
                                id,
                                end: false,
                                result: Some(R::Log(l)),
                            })
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                })
            };
            let r = api.log(r, ltx).await;
            let _ = forward.await;
            r.map(|()| None)
        }
        debug_request::Command::Watch(_) => {
            let mut watch = api.watch();
            loop {
                match watch.events.recv().await {
                    Ok(e) => {
                        let Some(e) = super::wire_event(&e) else {
                            continue;
                        };
                        if tx
                            .send(DebugReply {
                                id,
                                end: false,
                                result: Some(R::Event(e)),
                            })
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "a watch fell behind and missed events");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    };
    let last = match reply {
        Ok(Some(r)) => done(id, r),
        Ok(None) => DebugReply {
            id,
            end: true,
            result: None,
        },
        Err(e) => error(id, e.to_string()),
    };
    let _ = tx.send(last).await;
}
