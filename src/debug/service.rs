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
use tokio::sync::mpsc;

use super::{DebugApi, DebugError};
use crate::dispatcher::Session;
use crate::proto::{DebugReply, DebugRequest, debug_reply, debug_request};

/// Replies waiting to be written, per session.
const QUEUE: usize = 256;

pub async fn serve(api: DebugApi, session: Session) {
    let user = session.user.clone();
    let hangup = session.hangup.clone();
    let Session { stream, .. } = session;
    let (mut sink, mut frames) = stream.split();
    let (tx, mut rx) = mpsc::channel::<DebugReply>(QUEUE);
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = hangup.requested() => break,
            Some(reply) = rx.recv() => {
                if sink.send(Bytes::from(reply.encode_to_vec())).await.is_err() {
                    break;
                }
            }
            frame = frames.next() => {
                let Some(Ok(bytes)) = frame else { break };
                let req = match DebugRequest::decode(bytes.freeze()) {
                    Ok(r) => r,
                    Err(_) => {
                        let _ = tx.send(error(0, "not a DebugRequest".into())).await;
                        continue;
                    }
                };
                tasks.spawn(handle(api.clone(), req, user.clone(), tx.clone()));
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

async fn handle(api: DebugApi, req: DebugRequest, user: String, tx: mpsc::Sender<DebugReply>) {
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
        debug_request::Command::Reload(_) => api.reload(&user).await.map(|r| Some(R::Reload(r))),
        debug_request::Command::Log(r) => {
            let (ltx, mut lrx) = mpsc::channel(16);
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
            let mut events = api.watch();
            loop {
                match events.recv().await {
                    Ok(e) => {
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
