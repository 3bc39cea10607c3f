//! A step's output that the master has not acknowledged yet.
//!
//! The oldest chunks stay in memory; once the agent's memory bound is
//! reached, newer chunks are appended to a spill file under the basedir and
//! only their place in it is kept. So a step that prints a lot while its
//! worker is cut off from the master keeps running, and nothing it printed
//! is lost: on reconnect the whole spool is replayed, oldest first.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::proto::StepOutput;

struct Spilled {
    seq: u64,
    stream: i32,
    offset: u64,
    len: usize,
}

/// One step's unacknowledged output.
pub(crate) struct Spool {
    step_id: Vec<u8>,
    memory: VecDeque<StepOutput>,
    spilled: VecDeque<Spilled>,
    file: Option<(PathBuf, File)>,
    end: u64,
}

impl Drop for Spool {
    fn drop(&mut self) {
        if let Some((path, _)) = self.file.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Spool {
    pub(crate) fn new(step_id: &[u8]) -> Self {
        Spool {
            step_id: step_id.to_vec(),
            memory: VecDeque::new(),
            spilled: VecDeque::new(),
            file: None,
            end: 0,
        }
    }

    /// Bytes held on disk.
    pub(crate) fn spilled_bytes(&self) -> u64 {
        self.spilled.iter().map(|s| s.len as u64).sum()
    }

    /// Keeps a chunk: in memory, unless memory is full (or chunks of this
    /// step are already on disk, to keep them in order). Returns the bytes
    /// it added to memory.
    pub(crate) fn push(&mut self, chunk: StepOutput, spill_dir: &Path, memory_full: bool) -> usize {
        if memory_full || !self.spilled.is_empty() {
            match self.spill(&chunk, spill_dir) {
                Ok(()) => return 0,
                Err(e) => {
                    tracing::error!(error = %e, dir = %spill_dir.display(), "cannot spill step output to disk; keeping it in memory")
                }
            }
        }
        let n = chunk.data.len();
        self.memory.push_back(chunk);
        n
    }

    fn spill(&mut self, chunk: &StepOutput, spill_dir: &Path) -> std::io::Result<()> {
        if self.file.is_none() {
            std::fs::create_dir_all(spill_dir)?;
            let path = spill_dir.join(crate::wire::hex(&self.step_id));
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(&path)?;
            self.file = Some((path, file));
            self.end = 0;
        }
        let (_, file) = self.file.as_mut().expect("opened above");
        file.seek(SeekFrom::Start(self.end))?;
        file.write_all(&chunk.data)?;
        self.spilled.push_back(Spilled {
            seq: chunk.seq,
            stream: chunk.stream,
            offset: self.end,
            len: chunk.data.len(),
        });
        self.end += chunk.data.len() as u64;
        Ok(())
    }

    /// Forgets every chunk up to `seq`. Returns the memory bytes freed.
    pub(crate) fn ack(&mut self, seq: u64) -> usize {
        let mut freed = 0;
        while self.memory.front().is_some_and(|c| c.seq <= seq) {
            if let Some(c) = self.memory.pop_front() {
                freed += c.data.len();
            }
        }
        while self.spilled.front().is_some_and(|c| c.seq <= seq) {
            self.spilled.pop_front();
        }
        if self.spilled.is_empty()
            && let Some((path, _)) = self.file.take()
        {
            let _ = std::fs::remove_file(path);
        }
        freed
    }

    /// Every chunk held, oldest first, for a replay: read from disk one at
    /// a time, so replaying a large spill does not fill the memory.
    pub(crate) fn replay(&mut self) -> Replay<'_> {
        Replay {
            spool: self,
            next_memory: 0,
            next_spilled: 0,
        }
    }
}

/// Walks a spool's chunks, oldest first.
pub(crate) struct Replay<'a> {
    spool: &'a mut Spool,
    next_memory: usize,
    next_spilled: usize,
}

impl Iterator for Replay<'_> {
    type Item = std::io::Result<StepOutput>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(c) = self.spool.memory.get(self.next_memory) {
            self.next_memory += 1;
            return Some(Ok(c.clone()));
        }
        let s = self.spool.spilled.get(self.next_spilled)?;
        self.next_spilled += 1;
        let (seq, stream, offset, len) = (s.seq, s.stream, s.offset, s.len);
        let (_, file) = self.spool.file.as_mut()?;
        let mut data = vec![0u8; len];
        let read = file
            .seek(SeekFrom::Start(offset))
            .and_then(|_| file.read_exact(&mut data));
        Some(read.map(|()| StepOutput {
            step_id: self.spool.step_id.clone(),
            seq,
            stream,
            data: data.into(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(seq: u64, text: &str) -> StepOutput {
        StepOutput {
            step_id: vec![1, 2],
            seq,
            stream: 1,
            data: bytes::Bytes::copy_from_slice(text.as_bytes()),
        }
    }

    #[test]
    fn spills_in_order_replays_everything_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::new(&[1, 2]);
        assert_eq!(s.push(chunk(1, "one "), dir.path(), false), 4);
        assert_eq!(s.push(chunk(2, "two "), dir.path(), true), 0);
        // Once spilling, later chunks follow on disk even with room.
        assert_eq!(s.push(chunk(3, "three"), dir.path(), false), 0);
        assert_eq!(s.spilled_bytes(), 9);
        let all: Vec<u8> = s.replay().flat_map(|c| c.unwrap().data.to_vec()).collect();
        assert_eq!(all, b"one two three");
        assert_eq!(s.ack(2), 4);
        let rest: Vec<u64> = s.replay().map(|c| c.unwrap().seq).collect();
        assert_eq!(rest, [3]);
        s.ack(3);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "the spill file is gone once acknowledged"
        );
    }
}
