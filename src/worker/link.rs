//! The worker's end of a session, split in two: frames read from the
//! master ([`FrameReader`], the session's length-delimited codec), and
//! messages written to it ([`FrameWriter`]).
//!
//! The writer exists for step output, most of what a worker sends: a
//! chunk's bytes are never copied into a message buffer. Everything around
//! them (the frame's length, the message's fields, the data's tag and
//! length) is encoded into a small buffer, and the chunk's own bytes, shared
//! with the chunk the agent holds until it is acknowledged, go to the
//! socket beside it in one vectored write. For 1 GiB of output that is one
//! pass over the bytes in user space fewer (BENCHMARKS.md, issue 14).
//!
//! Lifecycle: made from a logged-in [`ClientSession`](crate::client::ClientSession)
//! by [`split`], used for that session only, dropped with it.

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
use tokio::io::{AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

use crate::proto::{StepOutput, WorkerMessage, worker_message};
use crate::wire::Transport;

/// Chunks at least this long go beside the encoded message rather than
/// into it (shorter ones cost less to copy than a slice of their own).
const OWN_SLICE: usize = 4096;

/// Most slices handed to one vectored write.
const MAX_SLICES: usize = 64;

/// Frames from the master.
pub type FrameReader = FramedRead<ReadHalf<Transport>, LengthDelimitedCodec>;

/// Splits a logged-in session's frames into the reader and the writer.
/// Bytes the handshake already read past its last frame stay first in the
/// reader's buffer.
pub fn split(
    stream: tokio_util::codec::Framed<Transport, LengthDelimitedCodec>,
) -> (FrameReader, FrameWriter<WriteHalf<Transport>>) {
    let parts = stream.into_parts();
    let max = parts.codec.max_frame_length();
    let (r, w) = tokio::io::split(parts.io);
    let mut reader = FramedRead::new(r, parts.codec);
    reader.read_buffer_mut().extend_from_slice(&parts.read_buf);
    let mut writer = FrameWriter::new(w, max);
    // Anything the handshake queued but did not send goes first.
    writer.head.extend_from_slice(&parts.write_buf);
    (reader, writer)
}

/// Messages to the master, length-prefixed (4 bytes, big-endian) as every
/// frame of the session is; queued by [`FrameWriter::push`], sent by
/// [`FrameWriter::flush`].
pub struct FrameWriter<W> {
    io: W,
    max_frame: usize,
    /// What is encoded and not yet a slice of its own in `queue`.
    head: BytesMut,
    /// Slices to send, in order.
    queue: VecDeque<Bytes>,
    /// Bytes in `queue`.
    queued: usize,
}

/// Queued bytes past which [`FrameWriter::feed`] sends them.
const FEED_LIMIT: usize = 1 << 20;

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(io: W, max_frame: usize) -> Self {
        FrameWriter {
            io,
            max_frame,
            head: BytesMut::with_capacity(8 * 1024),
            queue: VecDeque::new(),
            queued: 0,
        }
    }

    /// Queues a message; a message over the session's frame limit is an
    /// error (and nothing of it is queued).
    pub fn push(&mut self, msg: WorkerMessage) -> io::Result<()> {
        let len = msg.encoded_len();
        if len > self.max_frame {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a message of {len} bytes is over the session's frame limit ({} bytes)",
                    self.max_frame
                ),
            ));
        }
        self.head.reserve(4 + len.min(OWN_SLICE * 2));
        self.head.put_u32(len as u32);
        match msg.kind {
            Some(worker_message::Kind::Output(chunk)) if chunk.data.len() >= OWN_SLICE => {
                self.push_output(chunk)
            }
            kind => WorkerMessage { kind }
                .encode(&mut self.head)
                .map_err(io::Error::other)?,
        }
        Ok(())
    }

    /// A chunk's message, its data a slice of its own: the same bytes
    /// `encode` writes (fields in their numbers' order, data last).
    fn push_output(&mut self, mut chunk: StepOutput) {
        let data = std::mem::take(&mut chunk.data);
        let data_field = 1 + encoded_len_varint(data.len() as u64) as usize + data.len();
        let inner = chunk.encoded_len() + data_field;
        encode_key(2, WireType::LengthDelimited, &mut self.head);
        encode_varint(inner as u64, &mut self.head);
        chunk
            .encode(&mut self.head)
            .expect("the buffer grows as needed");
        encode_key(4, WireType::LengthDelimited, &mut self.head);
        encode_varint(data.len() as u64, &mut self.head);
        self.queue_head();
        self.queued += data.len();
        self.queue.push_back(data);
    }

    fn queue_head(&mut self) {
        if !self.head.is_empty() {
            self.queued += self.head.len();
            self.queue.push_back(self.head.split().freeze());
        }
    }

    /// Queues a message, and sends what is queued once it is past
    /// [`FEED_LIMIT`] (what many messages in a row use: memory stays
    /// bounded).
    pub async fn feed(&mut self, msg: WorkerMessage) -> io::Result<()> {
        self.push(msg)?;
        if self.queued + self.head.len() >= FEED_LIMIT {
            self.flush().await?;
        }
        Ok(())
    }

    /// Sends everything queued.
    pub async fn flush(&mut self) -> io::Result<()> {
        self.queue_head();
        while !self.queue.is_empty() {
            let slices: Vec<IoSlice<'_>> = self
                .queue
                .iter()
                .take(MAX_SLICES)
                .map(|b| IoSlice::new(b))
                .collect();
            let mut n = self.io.write_vectored(&slices).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.queued -= n;
            while n > 0 {
                let first = self.queue.front_mut().expect("written bytes were queued");
                if n >= first.len() {
                    n -= first.len();
                    self.queue.pop_front();
                } else {
                    first.advance(n);
                    n = 0;
                }
            }
        }
        self.io.flush().await
    }

    /// Queues a message and sends everything queued.
    pub async fn send(&mut self, msg: WorkerMessage) -> io::Result<()> {
        self.push(msg)?;
        self.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::OutputStream;

    /// What the writer sends is what the length-delimited codec and prost
    /// read back, for chunks beside their message and inside it.
    #[tokio::test]
    async fn frames_written_in_slices_read_back_as_the_messages_sent() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut w = FrameWriter::new(a, 8 << 20);
        let sent: Vec<WorkerMessage> = [0usize, 10, OWN_SLICE - 1, OWN_SLICE, 300_000]
            .iter()
            .enumerate()
            .map(|(i, &len)| WorkerMessage {
                kind: Some(worker_message::Kind::Output(StepOutput {
                    step_id: vec![7; 16],
                    seq: 1 << (i * 9),
                    stream: OutputStream::Stderr as i32,
                    data: Bytes::from(vec![i as u8 + 1; len]),
                })),
            })
            .collect();
        let reading = tokio::spawn(async move {
            use futures_util::StreamExt;
            let mut r = FramedRead::new(b, LengthDelimitedCodec::new());
            let mut got = Vec::new();
            while let Some(f) = r.next().await {
                got.push(WorkerMessage::decode(f.unwrap().freeze()).unwrap());
            }
            got
        });
        for m in &sent {
            w.push(m.clone()).unwrap();
        }
        w.flush().await.unwrap();
        let too_big = WorkerMessage {
            kind: Some(worker_message::Kind::Output(StepOutput {
                data: Bytes::from(vec![0; 9 << 20]),
                ..Default::default()
            })),
        };
        assert!(w.push(too_big).is_err());
        w.send(sent[1].clone()).await.unwrap();
        drop(w);
        let got = reading.await.unwrap();
        assert_eq!(got.len(), sent.len() + 1);
        assert_eq!(&got[..sent.len()], &sent[..]);
        assert_eq!(got[sent.len()], sent[1]);
    }
}
