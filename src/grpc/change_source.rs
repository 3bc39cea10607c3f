//! `switchyard.v1.ChangeSource`: change hooks push changes here.
//!
//! Every change is validated in full before anything is stored, and a batch
//! is stored all or nothing, so bad input never leaves half a push behind.
//! An error names the field, e.g. `changes[2].files[7]: 5000 bytes is over
//! the limit of 4096`.

use std::collections::BTreeMap;
use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};

use super::GrpcAuth;
use crate::proto::change_source_server::{ChangeSource, ChangeSourceServer};
use crate::proto::{Change, PushChangeRequest, PushChangeResponse, PushChangesResponse};
use crate::store::{ChangeStore, NewChange};

/// The service name users must be granted to push changes.
pub const SERVICE: &str = "change-source";

/// Limits on what one push may carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeLimits {
    /// repository, branch, revision, author, category, project.
    pub max_field: usize,
    pub max_comments: usize,
    pub max_files: usize,
    pub max_path: usize,
    pub max_properties: usize,
    pub max_property_name: usize,
    pub max_property_value: usize,
    /// Changes in one `PushChanges` call.
    pub max_batch: usize,
    /// Encoded bytes of one change, whatever its fields: the gRPC message
    /// limit is set from it, so a change within every field limit and this
    /// total is never refused by the transport.
    pub max_change_bytes: usize,
    /// Encoded bytes of one `PushChanges` batch.
    pub max_batch_bytes: usize,
    /// Bytes of batches being received by all clients at once: past it,
    /// receiving waits (HTTP/2 flow control slows the senders).
    pub max_inflight_bytes: usize,
}

impl Default for ChangeLimits {
    fn default() -> Self {
        ChangeLimits {
            max_field: 1024,
            max_comments: 64 * 1024,
            max_files: 10_000,
            max_path: 4096,
            max_properties: 1000,
            max_property_name: 256,
            max_property_value: 64 * 1024,
            max_batch: 1000,
            max_change_bytes: 4 * 1024 * 1024,
            max_batch_bytes: 16 * 1024 * 1024,
            max_inflight_bytes: 64 * 1024 * 1024,
        }
    }
}

fn check_len(at: &str, field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(Status::invalid_argument(format!(
            "{at}.{field}: {} bytes is over the limit of {max}",
            value.len()
        )));
    }
    Ok(())
}

/// tonic's own status for a message that is not valid protobuf is
/// INTERNAL; it is the client's fault: INVALID_ARGUMENT.
pub(crate) fn client_fault(s: Status) -> Status {
    if s.code() == tonic::Code::Internal && s.message().contains("decode") {
        Status::invalid_argument(format!("not a valid message: {}", s.message()))
    } else {
        s
    }
}

/// Validates a pushed change; `at` names it in errors (`change`, `changes[3]`).
pub fn validate(
    change: Option<Change>,
    at: &str,
    limits: &ChangeLimits,
) -> Result<NewChange, Status> {
    let c = change.ok_or_else(|| Status::invalid_argument(format!("{at}: required")))?;
    let size = prost::Message::encoded_len(&c);
    if size > limits.max_change_bytes {
        return Err(Status::invalid_argument(format!(
            "{at}: {size} bytes is over the limit of {} for one change",
            limits.max_change_bytes
        )));
    }
    if c.repository.trim().is_empty() {
        return Err(Status::invalid_argument(format!(
            "{at}.repository: required"
        )));
    }
    for (field, value) in [
        ("repository", &c.repository),
        ("branch", &c.branch),
        ("revision", &c.revision),
        ("author", &c.author),
        ("category", &c.category),
        ("project", &c.project),
    ] {
        check_len(at, field, value, limits.max_field)?;
    }
    check_len(at, "comments", &c.comments, limits.max_comments)?;
    if c.files.len() > limits.max_files {
        return Err(Status::invalid_argument(format!(
            "{at}.files: {} files is over the limit of {}",
            c.files.len(),
            limits.max_files
        )));
    }
    for (i, f) in c.files.iter().enumerate() {
        check_len(at, &format!("files[{i}]"), f, limits.max_path)?;
    }
    if c.properties.len() > limits.max_properties {
        return Err(Status::invalid_argument(format!(
            "{at}.properties: {} properties is over the limit of {}",
            c.properties.len(),
            limits.max_properties
        )));
    }
    for (k, v) in &c.properties {
        if k.is_empty() {
            return Err(Status::invalid_argument(format!(
                "{at}.properties: a property has an empty name"
            )));
        }
        check_len(at, "properties (name)", k, limits.max_property_name)?;
        check_len(
            at,
            &format!("properties[{k:?}]"),
            v,
            limits.max_property_value,
        )?;
    }
    let when = match c.when {
        None => None,
        Some(t) => {
            // RFC 3339 range, as google.protobuf.Timestamp defines it.
            if !(-62_135_596_800..=253_402_300_799).contains(&t.seconds)
                || !(0..1_000_000_000).contains(&t.nanos)
            {
                return Err(Status::invalid_argument(format!(
                    "{at}.when: not a valid timestamp"
                )));
            }
            Some((t.seconds, t.nanos))
        }
    };
    Ok(NewChange {
        repository: c.repository,
        branch: c.branch,
        revision: c.revision,
        author: c.author,
        comments: c.comments,
        category: c.category,
        project: c.project,
        files: c.files,
        when,
        properties: c.properties.into_iter().collect::<BTreeMap<_, _>>(),
    })
}

/// The service: authenticates, validates, stores.
pub struct ChangeSourceService {
    store: Arc<dyn ChangeStore>,
    auth: GrpcAuth,
    limits: ChangeLimits,
    /// KiB of batches being received, all clients together.
    inflight: Arc<tokio::sync::Semaphore>,
}

fn kib(bytes: usize) -> u32 {
    bytes.div_ceil(1024).min(u32::MAX as usize) as u32
}

impl ChangeSourceService {
    pub fn new(store: Arc<dyn ChangeStore>, auth: GrpcAuth) -> Self {
        ChangeSourceService {
            store,
            auth,
            inflight: Arc::new(tokio::sync::Semaphore::new(kib(
                ChangeLimits::default().max_inflight_bytes
            ) as usize)),
            limits: ChangeLimits::default(),
        }
    }

    pub fn with_limits(mut self, limits: ChangeLimits) -> Self {
        self.inflight = Arc::new(tokio::sync::Semaphore::new(
            kib(limits.max_inflight_bytes) as usize
        ));
        self.limits = limits;
        self
    }

    /// The tonic service, ready to add to routes or a server. Its message
    /// limit is one change at its limit plus the request's envelope.
    pub fn into_server(self) -> ChangeSourceServer<Self> {
        let max = self.limits.max_change_bytes + 64;
        ChangeSourceServer::new(self).max_decoding_message_size(max)
    }

    /// Stores a batch pushed by `user`, once per `key` when the client
    /// gave one.
    async fn store(
        &self,
        user: &str,
        key: Option<String>,
        batch: Vec<NewChange>,
    ) -> Result<Vec<i64>, Status> {
        let summary: Vec<(String, String, String)> = batch
            .iter()
            .map(|c| (c.repository.clone(), c.branch.clone(), c.revision.clone()))
            .collect();
        let stored = match key {
            None => self.store.add_changes(batch).await.map(|ids| (ids, false)),
            Some(key) => {
                self.store
                    .add_changes_keyed((format!("\0push\0{user}"), key), batch)
                    .await
            }
        };
        let (ids, again) = stored.map_err(|e| {
            tracing::error!(error = %e, "cannot store pushed changes");
            Status::unavailable(format!("the master could not store the change: {e}"))
        })?;
        if again {
            tracing::info!(user, ids = ?ids, "push resent with a key already stored; nothing stored again");
            return Ok(ids);
        }
        for (id, (repository, branch, revision)) in ids.iter().zip(summary) {
            tracing::info!(user, id, repository, branch, revision, "change received");
        }
        Ok(ids)
    }
}

/// The longest `idempotency_key` a push may carry.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

/// A push's key: none when empty; refused when too long.
fn idempotency_key(key: String) -> Result<Option<String>, Status> {
    if key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(Status::invalid_argument(format!(
            "idempotency_key: longer than {MAX_IDEMPOTENCY_KEY} bytes"
        )));
    }
    Ok((!key.is_empty()).then_some(key))
}

#[tonic::async_trait]
impl ChangeSource for ChangeSourceService {
    async fn push_change(
        &self,
        request: Request<PushChangeRequest>,
    ) -> Result<Response<PushChangeResponse>, Status> {
        let user = self.auth.authorize(&request, SERVICE).await?;
        let request = request.into_inner();
        let key = idempotency_key(request.idempotency_key)?;
        let change = validate(request.change, "change", &self.limits)?;
        let ids = self.store(&user, key, vec![change]).await?;
        let id = ids
            .first()
            .copied()
            .ok_or_else(|| Status::internal("the store returned no id"))?;
        Ok(Response::new(PushChangeResponse { id }))
    }

    async fn push_changes(
        &self,
        request: Request<Streaming<PushChangeRequest>>,
    ) -> Result<Response<PushChangesResponse>, Status> {
        let user = self.auth.authorize(&request, SERVICE).await?;
        let mut stream = request.into_inner();
        let mut batch = Vec::new();
        let mut key = None;
        let (mut bytes, mut held) = (0usize, Vec::new());
        while let Some(msg) = stream.message().await.map_err(client_fault)? {
            let size = prost::Message::encoded_len(&msg);
            bytes += size;
            if bytes > self.limits.max_batch_bytes {
                return Err(Status::invalid_argument(format!(
                    "changes: more than {} bytes in one batch; split it",
                    self.limits.max_batch_bytes
                )));
            }
            // Memory for what this batch holds, shared by every client:
            // past it, this one waits for others to be stored.
            // Bounded, so that batches waiting on each other give up rather
            // than wait forever.
            let permit = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                self.inflight.clone().acquire_many_owned(kib(size).max(1)),
            )
            .await
            .map_err(|_| {
                Status::resource_exhausted(
                    "the master is busy receiving other batches; retry shortly",
                )
            })?
            .map_err(|_| Status::unavailable("the master is shutting down"))?;
            held.push(permit);
            if batch.len() == self.limits.max_batch {
                return Err(Status::invalid_argument(format!(
                    "changes: more than {} changes in one batch; split it",
                    self.limits.max_batch
                )));
            }
            let at = format!("changes[{}]", batch.len());
            let this_key = idempotency_key(msg.idempotency_key)?;
            if batch.is_empty() {
                key = this_key;
            } else if this_key.is_some() && this_key != key {
                return Err(Status::invalid_argument(format!(
                    "{at}.idempotency_key: differs from the first message's; one key covers the batch"
                )));
            }
            batch.push(validate(msg.change, &at, &self.limits)?);
        }
        let ids = if batch.is_empty() {
            Vec::new()
        } else {
            self.store(&user, key, batch).await?
        };
        drop(held);
        Ok(Response::new(PushChangesResponse { ids }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change() -> Change {
        Change {
            repository: "r".into(),
            ..Default::default()
        }
    }

    #[test]
    fn errors_name_the_field() {
        let l = ChangeLimits::default();
        let msg = |c: Option<Change>| {
            validate(c, "changes[2]", &l)
                .unwrap_err()
                .message()
                .to_string()
        };
        assert_eq!(msg(None), "changes[2]: required");
        assert_eq!(
            msg(Some(Change::default())),
            "changes[2].repository: required"
        );
        let mut c = change();
        c.branch = "x".repeat(2000);
        assert!(msg(Some(c)).starts_with("changes[2].branch: 2000 bytes"));
        let mut c = change();
        c.files = vec!["a".into(), "b".repeat(5000)];
        assert!(msg(Some(c)).starts_with("changes[2].files[1]: 5000 bytes"));
        let mut c = change();
        c.files = vec!["f".into(); 10_001];
        assert!(msg(Some(c)).starts_with("changes[2].files: 10001 files"));
        let mut c = change();
        c.when = Some(prost_types::Timestamp {
            seconds: 0,
            nanos: -1,
        });
        assert_eq!(msg(Some(c)), "changes[2].when: not a valid timestamp");
        assert!(validate(Some(change()), "change", &l).is_ok());
    }
}
