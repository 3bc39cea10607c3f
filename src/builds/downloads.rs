//! The master's side of `download` steps: the artifacts it offers to the
//! workers running them.
//!
//! A download step's build opens the artifact's file when the step starts
//! and offers it under the step's id ([`Downloads::offer`]); the worker
//! asks for it piece by piece (`ArtifactWanted`) and the session answers
//! each ask from the open file ([`Downloads::answer`]). The worker asks
//! for what it has not written yet, so after a cut link (or a master
//! restart, where the build offers the same artifact again: the step's row
//! records which) it resumes where its file ends. Dropping the [`Offered`]
//! handle, when the step has ended, withdraws the offer. The file is held
//! open, so retention deleting the artifact meanwhile does not cut a
//! download short.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use crate::proto::{ArtifactData, ArtifactWanted};

/// Most bytes in one answer (one frame).
pub const MAX_PIECE: u32 = 1 << 20;

struct Offer {
    file: Arc<std::fs::File>,
    size: u64,
}

/// The artifacts offered to running download steps, by step id.
#[derive(Default)]
pub(crate) struct Downloads {
    offers: Mutex<HashMap<Vec<u8>, Offer>>,
}

/// An offer of an artifact to one step; dropping it withdraws the offer.
pub(crate) struct Offered {
    downloads: Arc<Downloads>,
    step_id: Vec<u8>,
}

impl Drop for Offered {
    fn drop(&mut self) {
        self.downloads
            .offers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.step_id);
    }
}

impl Downloads {
    /// Offers `file` (of `size` bytes) to the step `step_id`.
    pub(crate) fn offer(
        self: &Arc<Self>,
        step_id: &[u8],
        file: std::fs::File,
        size: u64,
    ) -> Offered {
        self.offers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                step_id.to_vec(),
                Offer {
                    file: Arc::new(file),
                    size,
                },
            );
        Offered {
            downloads: self.clone(),
            step_id: step_id.to_vec(),
        }
    }

    /// The answer to a worker's ask: at most [`MAX_PIECE`] bytes from its
    /// offset, or why not. `None` when nothing is offered to that step
    /// (yet: after a master restart the build offers it again shortly, and
    /// the worker asks again).
    pub(crate) async fn answer(&self, wanted: ArtifactWanted) -> Option<ArtifactData> {
        let (file, size) = {
            let offers = self.offers.lock().unwrap_or_else(|e| e.into_inner());
            let o = offers.get(&wanted.step_id)?;
            (o.file.clone(), o.size)
        };
        let mut data = ArtifactData {
            step_id: wanted.step_id,
            offset: wanted.offset,
            ..Default::default()
        };
        if wanted.offset > size {
            data.error = format!(
                "asked for bytes from {} of an artifact of {size} bytes",
                wanted.offset
            );
            return Some(data);
        }
        let len = (wanted.length.min(MAX_PIECE) as u64).min(size - wanted.offset) as usize;
        let offset = wanted.offset;
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, offset).map(|_| buf)
        })
        .await;
        match read {
            Ok(Ok(buf)) => data.data = buf,
            Ok(Err(e)) => data.error = format!("the master cannot read the artifact: {e}"),
            Err(_) => data.error = "the master cannot read the artifact".into(),
        }
        Some(data)
    }
}
