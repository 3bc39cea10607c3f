//! A gRPC client for change hooks: what `switchyard sendchange` runs.

use std::time::Duration;

use base64::Engine as _;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use crate::proto::change_source_client::ChangeSourceClient;
use crate::proto::{Change, PushChangeRequest};

/// Why a push failed, in words a person can act on.
#[derive(Debug, thiserror::Error)]
pub enum SendChangeError {
    #[error("{0:?} is not a master address; give HOST:PORT, e.g. 127.0.0.1:9989")]
    Address(String),
    #[error("cannot connect to the master at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("the master refused the credentials of user {user:?}: {message}")]
    Credentials { user: String, message: String },
    #[error("user {user:?} may not push changes (needs the service `change-source`): {message}")]
    NotAllowed { user: String, message: String },
    #[error("the master rejected the change: {0}")]
    Invalid(String),
    #[error("the master could not take the change right now: {0}")]
    Unavailable(String),
    #[error("the master answered {code:?}: {message}")]
    Other { code: Code, message: String },
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    let mut last = out.clone();
    while let Some(s) = cur {
        let text = s.to_string();
        // Layers often repeat their inner error's words; say them once.
        if text != last {
            out.push_str(": ");
            out.push_str(&text);
        }
        last = text;
        cur = s.source();
    }
    out
}

/// A connection to a master's `ChangeSource` with credentials.
pub struct ChangeSourceConnection {
    client: ChangeSourceClient<Channel>,
    user: String,
    authorization: MetadataValue<tonic::metadata::Ascii>,
    /// The device token from the last answered request, presented on the
    /// next (see `auth::throttle`).
    device_token: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl ChangeSourceConnection {
    /// Connects to `addr` (HOST:PORT), within 10 seconds.
    pub async fn connect(addr: &str, user: &str, password: &str) -> Result<Self, SendChangeError> {
        Self::connect_with(addr, user, password, None).await
    }

    /// [`ChangeSourceConnection::connect`], over TLS when `tls` is given.
    pub async fn connect_with(
        addr: &str,
        user: &str,
        password: &str,
        tls: Option<&crate::wire::tls::ClientTls>,
    ) -> Result<Self, SendChangeError> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|_| SendChangeError::Address(addr.to_string()))?
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60));
        let failed = |reason: String| SendChangeError::Connect {
            addr: addr.to_string(),
            reason,
        };
        let channel = match tls {
            None => endpoint
                .connect()
                .await
                .map_err(|e| failed(error_chain(&e)))?,
            Some(tls) => {
                let name = tls.name_for(addr).map_err(failed)?;
                let (connector, target) = (tls.connector.clone(), addr.to_string());
                let connect = tower::service_fn(move |_uri: http::Uri| {
                    let (connector, name, target) =
                        (connector.clone(), name.clone(), target.clone());
                    async move {
                        let tcp = tokio::net::TcpStream::connect(&target).await?;
                        let _ = tcp.set_nodelay(true);
                        let s = connector.connect(name, tcp).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                            crate::wire::Transport::TlsClient(Box::new(s)),
                        ))
                    }
                });
                endpoint
                    .connect_with_connector(connect)
                    .await
                    .map_err(|e| failed(error_chain(&e)))?
            }
        };
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let authorization = MetadataValue::try_from(format!("Basic {token}"))
            .map_err(|_| SendChangeError::Address(addr.to_string()))?;
        Ok(ChangeSourceConnection {
            client: ChangeSourceClient::new(channel),
            user: user.to_string(),
            authorization,
            device_token: None,
        })
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        req.metadata_mut()
            .insert("authorization", self.authorization.clone());
        if let Some(t) = &self.device_token {
            req.metadata_mut()
                .insert(crate::grpc::DEVICE_TOKEN_HEADER, t.clone());
        }
        req
    }

    /// The device token the master issued on the last answered request.
    pub fn device_token(&self) -> Option<String> {
        self.device_token
            .as_ref()
            .and_then(|t| t.to_str().ok())
            .map(str::to_string)
    }

    /// Presents `token` (saved from an earlier run) on the next request.
    pub fn set_device_token(&mut self, token: &str) {
        self.device_token = MetadataValue::try_from(token).ok();
    }

    fn keep_token(&mut self, metadata: &tonic::metadata::MetadataMap) {
        if let Some(t) = metadata.get(crate::grpc::DEVICE_TOKEN_HEADER) {
            self.device_token = Some(t.clone());
        }
    }

    fn explain(&self, s: Status) -> SendChangeError {
        let message = s.message().to_string();
        match s.code() {
            Code::Unauthenticated => SendChangeError::Credentials {
                user: self.user.clone(),
                message,
            },
            Code::PermissionDenied => SendChangeError::NotAllowed {
                user: self.user.clone(),
                message,
            },
            Code::InvalidArgument => SendChangeError::Invalid(message),
            Code::Unavailable => SendChangeError::Unavailable(message),
            code => SendChangeError::Other { code, message },
        }
    }

    /// Pushes one change; returns its id once the master has stored it.
    pub async fn push(&mut self, change: Change) -> Result<i64, SendChangeError> {
        self.push_request(PushChangeRequest {
            change: Some(change),
            idempotency_key: String::new(),
        })
        .await
    }

    /// Pushes one change under `key`: if this user pushed `key` before (in
    /// the master's memory of 7 days), nothing is stored and the first
    /// push's id comes back, so a push whose answer was lost can be resent.
    pub async fn push_once(&mut self, change: Change, key: &str) -> Result<i64, SendChangeError> {
        self.push_request(PushChangeRequest {
            change: Some(change),
            idempotency_key: key.to_string(),
        })
        .await
    }

    async fn push_request(&mut self, request: PushChangeRequest) -> Result<i64, SendChangeError> {
        let req = self.request(request);
        match self.client.push_change(req).await {
            Ok(r) => {
                self.keep_token(r.metadata());
                Ok(r.into_inner().id)
            }
            Err(s) => Err(self.explain(s)),
        }
    }

    /// Pushes a batch, all or nothing; returns the ids in order.
    pub async fn push_batch(&mut self, changes: Vec<Change>) -> Result<Vec<i64>, SendChangeError> {
        let stream = futures_util::stream::iter(changes.into_iter().map(|c| PushChangeRequest {
            change: Some(c),
            idempotency_key: String::new(),
        }));
        let req = self.request(stream);
        match self.client.push_changes(req).await {
            Ok(r) => {
                self.keep_token(r.metadata());
                Ok(r.into_inner().ids)
            }
            Err(s) => Err(self.explain(s)),
        }
    }
}
