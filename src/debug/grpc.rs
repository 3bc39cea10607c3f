//! The console as gRPC: `switchyard.v1.Debug`, for scripts in any language.
//! Credentials as for change hooks, for a user granted `debug`.

use std::pin::Pin;

use futures_util::Stream;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use super::{DebugApi, DebugError, SERVICE};
use crate::grpc::GrpcAuth;
use crate::proto::debug_server::{Debug, DebugServer};
use crate::proto::{
    BuildersReply, BuildersRequest, BuildsReply, BuildsRequest, DebugEvent, ForceReply,
    ForceRequest, HangupReply, HangupRequest, LogReply, LogRequest, StatusReply, StatusRequest,
    StopReply, StopRequest, WatchRequest, WorkersReply, WorkersRequest,
};
use crate::proto::{ReloadReply, ReloadRequest};

pub struct DebugService {
    api: DebugApi,
    auth: GrpcAuth,
}

impl DebugService {
    pub fn new(api: DebugApi, auth: GrpcAuth) -> Self {
        DebugService { api, auth }
    }

    pub fn into_server(self) -> DebugServer<Self> {
        DebugServer::new(self)
    }
}

fn status(e: DebugError) -> Status {
    match e {
        DebugError::NotFound(m) => Status::not_found(m),
        DebugError::Invalid(m) => Status::invalid_argument(m),
        DebugError::Internal(m) => Status::internal(m),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Debug for DebugService {
    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        self.auth.authorize(&req, SERVICE).await?;
        self.api.status().await.map(Response::new).map_err(status)
    }

    async fn workers(
        &self,
        req: Request<WorkersRequest>,
    ) -> Result<Response<WorkersReply>, Status> {
        self.auth.authorize(&req, SERVICE).await?;
        Ok(Response::new(self.api.workers()))
    }

    async fn builders(
        &self,
        req: Request<BuildersRequest>,
    ) -> Result<Response<BuildersReply>, Status> {
        self.auth.authorize(&req, SERVICE).await?;
        self.api.builders().await.map(Response::new).map_err(status)
    }

    async fn builds(&self, req: Request<BuildsRequest>) -> Result<Response<BuildsReply>, Status> {
        self.auth.authorize(&req, SERVICE).await?;
        self.api
            .builds(req.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    type LogStream = BoxStream<LogReply>;

    async fn log(&self, req: Request<LogRequest>) -> Result<Response<Self::LogStream>, Status> {
        self.auth.authorize(&req, SERVICE).await?;
        // A chunk or two ahead of the client: HTTP/2 flow control holds the
        // rest back in the database, not in memory.
        let (tx, mut rx) = mpsc::channel(2);
        let (out_tx, out_rx) = mpsc::channel::<Result<LogReply, Status>>(2);
        let api = self.api.clone();
        let req = req.into_inner();
        tokio::spawn(async move {
            let forward = {
                let out_tx = out_tx.clone();
                tokio::spawn(async move {
                    while let Some(l) = rx.recv().await {
                        if out_tx.send(Ok(l)).await.is_err() {
                            break;
                        }
                    }
                })
            };
            let r = api.log(req, tx).await;
            let _ = forward.await;
            if let Err(e) = r {
                let _ = out_tx.send(Err(status(e))).await;
            }
        });
        Ok(Response::new(Box::pin(tokio_stream_from(out_rx))))
    }

    async fn force(&self, req: Request<ForceRequest>) -> Result<Response<ForceReply>, Status> {
        let user = self.auth.authorize(&req, SERVICE).await?;
        self.api
            .force(req.into_inner(), &user)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn stop(&self, req: Request<StopRequest>) -> Result<Response<StopReply>, Status> {
        self.auth.authorize(&req, SERVICE).await?;
        self.api
            .stop(req.into_inner())
            .map(Response::new)
            .map_err(status)
    }

    async fn hangup(&self, req: Request<HangupRequest>) -> Result<Response<HangupReply>, Status> {
        self.auth.authorize(&req, SERVICE).await?;
        self.api
            .hangup(req.into_inner())
            .map(Response::new)
            .map_err(status)
    }

    async fn artifacts(
        &self,
        req: Request<crate::proto::ArtifactsRequest>,
    ) -> Result<Response<crate::proto::ArtifactsReply>, Status> {
        self.auth.authorize(&req, SERVICE).await?;
        self.api
            .artifacts(req.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn reports(
        &self,
        req: Request<crate::proto::ReportsRequest>,
    ) -> Result<Response<crate::proto::ReportsReply>, Status> {
        self.auth.authorize(&req, SERVICE).await?;
        self.api.reports().await.map(Response::new).map_err(status)
    }

    async fn unblock(
        &self,
        req: Request<crate::proto::UnblockRequest>,
    ) -> Result<Response<crate::proto::UnblockReply>, Status> {
        let user = self.auth.authorize(&req, SERVICE).await?;
        self.api
            .unblock(req.into_inner(), &user)
            .map(Response::new)
            .map_err(status)
    }

    async fn reload(&self, req: Request<ReloadRequest>) -> Result<Response<ReloadReply>, Status> {
        let user = self.auth.authorize(&req, SERVICE).await?;
        self.api
            .reload(&user)
            .await
            .map(Response::new)
            .map_err(status)
    }

    type WatchStream = BoxStream<DebugEvent>;

    async fn watch(
        &self,
        req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.auth.authorize(&req, SERVICE).await?;
        let mut watch = self.api.watch();
        let (tx, rx) = mpsc::channel::<Result<DebugEvent, Status>>(64);
        tokio::spawn(async move {
            loop {
                match watch.events.recv().await {
                    Ok(e) => {
                        let Some(e) = super::wire_event(&e) else {
                            continue;
                        };
                        if tx.send(Ok(e)).await.is_err() {
                            break;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream_from(rx))))
    }
}

/// A stream over an mpsc receiver.
fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
