//! A Raft snapshot's data as openraft reads and writes it: a file.
//!
//! A snapshot this node took, or settled on after installing one, is a cut
//! of its log: the tables and each partition's end, no records (the storage
//! crate's `snapshot` module). When openraft reads one to send it to a
//! follower, the cut is first written out in full on a thread, into
//! `sending-N.snap`. One is written at a time, and every send of the same
//! snapshot while one lasts reads the same file; it is removed when the last
//! send ends (and at the next start, after a crash). A snapshot being
//! received is the file it is written to.

use std::future::Future;
use std::io::{self, BufReader, BufWriter, SeekFrom, Write};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};
use tokio::task::JoinHandle;
use tributary_storage::Log;

/// The file of one snapshot (see the module's docs).
pub struct SnapshotData {
    state: State,
    /// A seek asked for before the file was there.
    seek: Option<SeekFrom>,
    /// That seek was started on the file and is not complete yet.
    seeking: bool,
}

enum State {
    /// A cut, not written out yet.
    Cut(Expand),
    /// Being written out.
    Expanding {
        task: JoinHandle<io::Result<(std::fs::File, Arc<Written>)>>,
        cancel: Arc<AtomicBool>,
    },
    /// The file, and what keeps a written-out one there.
    Ready(tokio::fs::File, Option<Arc<Written>>),
    Failed(String),
}

/// What writing a cut out takes.
pub(crate) struct Expand {
    pub(crate) log: Log,
    /// The cut, open: a snapshot taken since replaces its name, not it.
    pub(crate) cut: std::fs::File,
    /// The snapshot's id.
    pub(crate) id: String,
    /// Where the whole file is written.
    pub(crate) dir: PathBuf,
    pub(crate) outgoing: Arc<Outgoing>,
}

/// The snapshots written out to be sent, shared by their sends.
#[derive(Default)]
pub(crate) struct Outgoing {
    /// Held while one is written out: one at a time.
    writing: Mutex<()>,
    /// The last one written out, while a send holds it.
    last: Mutex<Weak<Written>>,
}

/// A snapshot written out in full: removed when the last send holding it
/// ends.
pub(crate) struct Written {
    id: String,
    path: PathBuf,
}

impl Drop for Written {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Drop for SnapshotData {
    fn drop(&mut self) {
        if let State::Expanding { cancel, .. } = &self.state {
            cancel.store(true, Relaxed);
        }
    }
}

impl SnapshotData {
    /// A file as it is (one being received).
    pub fn file(file: tokio::fs::File) -> SnapshotData {
        SnapshotData {
            state: State::Ready(file, None),
            seek: None,
            seeking: false,
        }
    }

    /// A cut, written out in full once it is read.
    pub(crate) fn cut(expand: Expand) -> SnapshotData {
        SnapshotData {
            state: State::Cut(expand),
            seek: None,
            seeking: false,
        }
    }

    /// The file (of a snapshot received).
    pub fn into_file(mut self) -> io::Result<tokio::fs::File> {
        match std::mem::replace(&mut self.state, State::Failed(String::new())) {
            State::Ready(file, None) => Ok(file),
            _ => Err(io::Error::other("a snapshot taken here, not one received")),
        }
    }

    /// Drives the writing out until the file is there, then any seek
    /// asked for before.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let next = match &mut self.state {
                State::Ready(..) => break,
                State::Failed(e) => return Poll::Ready(Err(io::Error::other(e.clone()))),
                State::Cut(_) => {
                    let taken = std::mem::replace(&mut self.state, State::Failed(String::new()));
                    let State::Cut(expand) = taken else { continue };
                    let cancel = Arc::new(AtomicBool::new(false));
                    let stop = cancel.clone();
                    let task = tokio::task::spawn_blocking(move || expand.run(&stop));
                    State::Expanding { task, cancel }
                }
                State::Expanding { task, .. } => match ready!(Pin::new(task).poll(cx)) {
                    Ok(Ok((file, written))) => {
                        State::Ready(tokio::fs::File::from_std(file), Some(written))
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "cluster: cannot write a snapshot out to send it");
                        State::Failed(e.to_string())
                    }
                    Err(e) => State::Failed(e.to_string()),
                },
            };
            self.state = next;
        }
        if let (Some(at), State::Ready(file, _)) = (self.seek.take(), &mut self.state) {
            Pin::new(file).start_seek(at)?;
            self.seeking = true;
        }
        Poll::Ready(Ok(()))
    }

    fn ready_file(&mut self) -> io::Result<Pin<&mut tokio::fs::File>> {
        match &mut self.state {
            State::Ready(file, _) => Ok(Pin::new(file)),
            _ => Err(io::Error::other("the snapshot's file is not there")),
        }
    }
}

impl Expand {
    /// Writes the cut out in full (blocking), or finds it written out for
    /// another send; answers the file, open at its start.
    fn run(self, cancel: &AtomicBool) -> io::Result<(std::fs::File, Arc<Written>)> {
        let _one_at_a_time = lock(&self.outgoing.writing);
        let found = lock(&self.outgoing.last)
            .upgrade()
            .filter(|w| w.id == self.id);
        if let Some(written) = found {
            return Ok((std::fs::File::open(&written.path)?, written));
        }
        // Never the log's own room: the whole file is about as large as the
        // log.
        let stored = self.log.stored_bytes();
        let need = stored + stored / 4 + (64 << 20);
        if let Some(free) = self.log.free_disk_bytes().filter(|&free| free < need) {
            return Err(io::Error::other(format!(
                "no room to write a snapshot out: {free} bytes free, {need} needed"
            )));
        }
        static SENT: AtomicU64 = AtomicU64::new(0);
        let path = self
            .dir
            .join(format!("sending-{}.snap", SENT.fetch_add(1, Relaxed)));
        let file = std::fs::File::options()
            .create_new(true)
            .write(true)
            .open(&path)?;
        // From here the file goes with the last handle, whatever happens.
        let written = Arc::new(Written { id: self.id, path });
        let started = std::time::Instant::now();
        let out = BufWriter::with_capacity(1 << 20, Cancellable { file, cancel });
        let bytes = self
            .log
            .snapshot_expand(BufReader::new(self.cut), out)
            .map_err(io::Error::other)?;
        tracing::info!(bytes, took = ?started.elapsed(), "cluster: wrote a snapshot out to send it");
        *lock(&self.outgoing.last) = Arc::downgrade(&written);
        Ok((std::fs::File::open(&written.path)?, written))
    }
}

/// A file whose writes fail once the snapshot is no longer wanted.
struct Cancellable<'a> {
    file: std::fs::File,
    cancel: &'a AtomicBool,
}

impl Write for Cancellable<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.cancel.load(Relaxed) {
            return Err(io::Error::other("the snapshot is no longer wanted"));
        }
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl AsyncRead for SnapshotData {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_ready(cx))?;
        if this.seeking {
            ready!(this.ready_file()?.poll_complete(cx))?;
            this.seeking = false;
        }
        this.ready_file()?.poll_read(cx, buf)
    }
}

impl AsyncSeek for SnapshotData {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        let this = self.get_mut();
        match &mut this.state {
            State::Ready(file, _) => Pin::new(file).start_seek(position),
            _ => {
                this.seek = Some(position);
                Ok(())
            }
        }
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        let this = self.get_mut();
        ready!(this.poll_ready(cx))?;
        let at = ready!(this.ready_file()?.poll_complete(cx));
        this.seeking = false;
        Poll::Ready(at)
    }
}

impl AsyncWrite for SnapshotData {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().state {
            State::Ready(file, _) => Pin::new(file).poll_write(cx, buf),
            _ => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a snapshot taken here is not written to",
            ))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().state {
            State::Ready(file, _) => Pin::new(file).poll_flush(cx),
            _ => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().state {
            State::Ready(file, _) => Pin::new(file).poll_shutdown(cx),
            _ => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::Path;

    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    use tributary_storage::{AppendRecord, Event, LogConfig, MemStore, TopicConfig};

    use super::*;

    fn log() -> Log {
        Log::with_store(Arc::new(MemStore::new()), LogConfig::default()).expect("log")
    }

    fn sending(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("sending-"))
            .collect()
    }

    fn data(log: &Log, dir: &Path, id: &str, outgoing: &Arc<Outgoing>) -> SnapshotData {
        SnapshotData::cut(Expand {
            log: log.clone(),
            cut: std::fs::File::open(dir.join("cut")).expect("cut"),
            id: id.into(),
            dir: dir.to_owned(),
            outgoing: outgoing.clone(),
        })
    }

    /// Two sends of one snapshot read one file written out once, each at
    /// its own position; the file is a whole snapshot, and it goes with
    /// the last send.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cut_is_written_out_once_for_its_sends_and_removed_after_the_last() {
        let leader = log();
        leader
            .create_topic(TopicConfig::new("t", 2))
            .await
            .expect("create");
        for i in 0..50 {
            let record = AppendRecord {
                partition: None,
                event: Event::new(format!("e{i}")),
            };
            leader.append("t", vec![record]).await.expect("append");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let cut = leader
            .snapshot_cut(&dir.path().join("cut"), b"h")
            .expect("cut");
        cut.finish().expect("finish");
        let outgoing = Arc::default();
        let mut a = data(&leader, dir.path(), "s", &outgoing);
        let mut b = data(&leader, dir.path(), "s", &outgoing);
        let size = a.seek(SeekFrom::End(0)).await.expect("written out");
        assert_eq!(b.seek(SeekFrom::End(0)).await.expect("shared"), size);
        assert_eq!(sending(dir.path()).len(), 1, "written out once");
        a.seek(SeekFrom::Start(0)).await.expect("seek");
        b.seek(SeekFrom::Start(100)).await.expect("seek");
        let mut whole = Vec::new();
        a.read_to_end(&mut whole).await.expect("read");
        assert_eq!(whole.len() as u64, size);
        let mut tail = Vec::new();
        b.read_to_end(&mut tail).await.expect("read");
        assert_eq!(tail, whole[100..]);
        drop(a);
        assert_eq!(sending(dir.path()).len(), 1, "b still sends it");
        drop(b);
        assert!(sending(dir.path()).is_empty(), "gone with the last send");

        let copy = dir.path().join("copy");
        std::fs::write(&copy, &whole).expect("write");
        let node = log();
        assert_eq!(node.restore(&copy).await.expect("restore"), b"h");
        for p in 0..2 {
            assert_eq!(
                node.offsets("t", p).expect("t"),
                leader.offsets("t", p).expect("t")
            );
        }
        // Another snapshot's send writes its own.
        let mut c = data(&leader, dir.path(), "other", &outgoing);
        c.seek(SeekFrom::End(0)).await.expect("written out");
        assert_eq!(sending(dir.path()).len(), 1);
    }

    /// A cut that cannot be written out fails every read and seek of it,
    /// and leaves no file.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cut_that_cannot_be_written_out_fails_each_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("cut"), b"not a snapshot").expect("write");
        let mut d = data(&log(), dir.path(), "s", &Arc::default());
        let e = d.seek(SeekFrom::End(0)).await.expect_err("damaged");
        assert!(e.to_string().contains("snapshot file"), "{e}");
        assert!(d.seek(SeekFrom::Start(0)).await.is_err());
        let mut buf = Vec::new();
        assert!(d.read_to_end(&mut buf).await.is_err());
        assert!(sending(dir.path()).is_empty());
    }
}
