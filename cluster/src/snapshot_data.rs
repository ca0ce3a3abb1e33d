//! A Raft snapshot's data as openraft reads and writes it.
//!
//! A snapshot this node took, or settled on after installing one, is a cut
//! of its log: the tables and each partition's end, no records (the storage
//! crate's `snapshot` module). It is never read as a file: to send one to a
//! follower, the network layer streams it ([`Expand::stream`]), written out
//! in full on a thread, chunk by chunk, as the chunks are sent. Nothing of
//! it is written to disk on the way, so sending needs no room for a copy,
//! and at most [`IN_FLIGHT`] chunks wait between the thread and the sender
//! (with the one being filled and the one being sent, a few MiB). A
//! snapshot being
//! received is the file it is written to.

use std::io::{self, BufReader, SeekFrom, Write};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tributary_storage::Log;

/// Chunks written out and not yet sent, at most.
pub(crate) const IN_FLIGHT: usize = 2;

/// The data of one snapshot (see the module's docs).
pub struct SnapshotData {
    state: State,
}

enum State {
    /// A cut, to be streamed.
    Cut(Expand),
    /// A file: one being received, or received.
    File(tokio::fs::File),
    /// A cut already taken to be streamed.
    Taken,
}

/// What writing a cut out takes.
pub(crate) struct Expand {
    pub(crate) log: Log,
    /// The cut, open: a snapshot taken since replaces its name, not it.
    pub(crate) cut: std::fs::File,
}

impl SnapshotData {
    /// A file as it is (one being received).
    pub fn file(file: tokio::fs::File) -> SnapshotData {
        SnapshotData {
            state: State::File(file),
        }
    }

    /// A cut, streamed written out in full when it is sent.
    pub(crate) fn cut(expand: Expand) -> SnapshotData {
        SnapshotData {
            state: State::Cut(expand),
        }
    }

    /// The file (of a snapshot received).
    pub fn into_file(self) -> io::Result<tokio::fs::File> {
        match self.state {
            State::File(file) => Ok(file),
            _ => Err(io::Error::other("a snapshot taken here, not one received")),
        }
    }

    /// The cut, to stream it (`None`: a file, or a cut taken before).
    pub(crate) fn take_cut(&mut self) -> Option<Expand> {
        match std::mem::replace(&mut self.state, State::Taken) {
            State::Cut(expand) => Some(expand),
            other => {
                self.state = other;
                None
            }
        }
    }

    fn file_mut(&mut self) -> io::Result<Pin<&mut tokio::fs::File>> {
        match &mut self.state {
            State::File(file) => Ok(Pin::new(file)),
            _ => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a snapshot taken here is streamed, not read as a file",
            )),
        }
    }
}

impl Expand {
    /// Writes the cut out in full on a thread, in chunks of `chunk` bytes
    /// handed over as they fill (the last may be shorter). The thread
    /// stops as soon as the receiver is dropped; it answers the bytes
    /// written, or why it stopped. The chunks end when it does: whether
    /// the last one ends the snapshot is its answer's to say.
    pub(crate) fn stream(
        self,
        chunk: usize,
    ) -> (JoinHandle<io::Result<u64>>, mpsc::Receiver<Vec<u8>>) {
        let (tx, rx) = mpsc::channel(IN_FLIGHT);
        let task = tokio::task::spawn_blocking(move || {
            let mut out = Chunks {
                tx,
                chunk: chunk.max(1),
                buf: Vec::new(),
            };
            let bytes = self
                .log
                .snapshot_expand(BufReader::new(self.cut), &mut out)
                .map_err(io::Error::other)?;
            out.hand_over()?;
            Ok(bytes)
        });
        (task, rx)
    }
}

/// A writer that hands its bytes over in chunks.
struct Chunks {
    tx: mpsc::Sender<Vec<u8>>,
    chunk: usize,
    buf: Vec<u8>,
}

impl Chunks {
    fn hand_over(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let full = std::mem::take(&mut self.buf);
        self.tx
            .blocking_send(full)
            .map_err(|_| io::Error::other("the snapshot is no longer wanted"))
    }
}

impl Write for Chunks {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(self.chunk);
        }
        let n = bytes.len().min(self.chunk - self.buf.len());
        self.buf.extend_from_slice(&bytes[..n]);
        if self.buf.len() == self.chunk {
            self.hand_over()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsyncRead for SnapshotData {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().file_mut() {
            Ok(file) => file.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncSeek for SnapshotData {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        self.get_mut().file_mut()?.start_seek(position)
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        match self.get_mut().file_mut() {
            Ok(file) => file.poll_complete(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for SnapshotData {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().file_mut() {
            Ok(file) => file.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().file_mut() {
            Ok(file) => file.poll_flush(cx),
            Err(_) => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().file_mut() {
            Ok(file) => file.poll_shutdown(cx),
            Err(_) => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::Path;
    use std::sync::Arc;

    use tokio::io::AsyncReadExt;
    use tributary_storage::{AppendRecord, Event, LogConfig, MemStore, TopicConfig};

    use super::*;

    pub(crate) fn log() -> Log {
        Log::with_store(Arc::new(MemStore::new()), LogConfig::default()).expect("log")
    }

    pub(crate) fn expand(log: &Log, dir: &Path) -> Expand {
        Expand {
            log: log.clone(),
            cut: std::fs::File::open(dir.join("cut")).expect("cut"),
        }
    }

    /// A log of 200 records in two partitions, and its cut, `cut` in the
    /// directory answered.
    pub(crate) async fn leader_with_records() -> (Log, tempfile::TempDir) {
        let leader = log();
        leader
            .create_topic(TopicConfig::new("t", 2))
            .await
            .expect("create");
        for i in 0..200 {
            let record = AppendRecord {
                partition: None,
                event: Event::new(format!("event {i} {}", "x".repeat(100))),
            };
            leader.append("t", vec![record]).await.expect("append");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let cut = leader
            .snapshot_cut(&dir.path().join("cut"), b"h")
            .expect("cut");
        cut.finish().expect("finish");
        (leader, dir)
    }

    /// A cut streams as chunks of the asked size (the last shorter) that
    /// make a whole snapshot, which restores a node equal to the leader;
    /// nothing is written beside the cut.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cut_streams_in_chunks_that_make_a_whole_snapshot() {
        let (leader, dir) = leader_with_records().await;
        let mut data = SnapshotData::cut(expand(&leader, dir.path()));
        let mut buf = Vec::new();
        assert!(
            data.read_to_end(&mut buf).await.is_err(),
            "a cut is not read as a file"
        );
        let cut = data.take_cut().expect("the cut");
        assert!(data.take_cut().is_none(), "taken once");
        let (task, mut chunks) = cut.stream(1000);
        let mut whole = Vec::new();
        let mut sizes = Vec::new();
        while let Some(c) = chunks.recv().await {
            sizes.push(c.len());
            whole.extend_from_slice(&c);
        }
        let bytes = task.await.expect("join").expect("written out");
        assert_eq!(bytes, whole.len() as u64);
        assert!(sizes.len() > 10, "{} chunks", sizes.len());
        let (last, rest) = sizes.split_last().expect("chunks");
        assert!(rest.iter().all(|&s| s == 1000), "{sizes:?}");
        assert!(*last <= 1000 && *last > 0);
        let files: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").collect();
        assert_eq!(files.len(), 1, "only the cut");
        restores_the_leader(&leader, &whole, dir.path()).await;
    }

    /// `whole`, as a snapshot file in `dir`, restores a node whose
    /// partitions equal [`leader_with_records`]' log.
    pub(crate) async fn restores_the_leader(leader: &Log, whole: &[u8], dir: &Path) {
        let copy = dir.join("copy");
        std::fs::write(&copy, whole).expect("write");
        let node = log();
        assert_eq!(node.restore(&copy).await.expect("restore"), b"h");
        for p in 0..2 {
            assert_eq!(
                node.offsets("t", p).expect("t"),
                leader.offsets("t", p).expect("t")
            );
        }
    }

    /// A stream nobody reads any more stops: its thread answers that the
    /// snapshot is no longer wanted, having written out no more than the
    /// chunks in flight.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_dropped_stops_writing_out() {
        let (leader, dir) = leader_with_records().await;
        let (task, mut chunks) = expand(&leader, dir.path()).stream(100);
        assert_eq!(chunks.recv().await.expect("a first chunk").len(), 100);
        drop(chunks);
        let e = task.await.expect("join").expect_err("stopped");
        assert!(e.to_string().contains("no longer wanted"), "{e}");
    }

    /// A cut that cannot be written out ends its chunks with the reason.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cut_that_cannot_be_written_out_says_why() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("cut"), b"not a snapshot").expect("write");
        let (task, mut chunks) = expand(&log(), dir.path()).stream(1000);
        while chunks.recv().await.is_some() {}
        let e = task.await.expect("join").expect_err("damaged");
        assert!(e.to_string().contains("snapshot file"), "{e}");
    }
}
