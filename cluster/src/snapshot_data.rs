//! A Raft snapshot's data as openraft reads and writes it: a file.
//!
//! A snapshot this node took, or settled on after installing one, is a cut
//! of its log: the tables and each partition's end, no records (the storage
//! crate's `snapshot` module). When openraft reads one to send it to a
//! follower, the cut is first written out in full on a thread, into a file
//! of its own that is unlinked at once: its space is freed when the sending
//! ends, or at a crash. A snapshot being received is the file it is written
//! to.

use std::future::Future;
use std::io::{self, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
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
        task: JoinHandle<io::Result<std::fs::File>>,
        cancel: Arc<AtomicBool>,
    },
    Ready(tokio::fs::File),
    Failed(String),
}

/// What writing a cut out takes.
pub(crate) struct Expand {
    pub(crate) log: Log,
    /// The cut, open: a snapshot taken since replaces its name, not it.
    pub(crate) cut: std::fs::File,
    /// Where the whole file is written (and unlinked at once).
    pub(crate) dir: PathBuf,
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
            state: State::Ready(file),
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
            State::Ready(file) => Ok(file),
            _ => Err(io::Error::other("a snapshot taken here, not one received")),
        }
    }

    /// Drives the writing out until the file is there, then any seek
    /// asked for before.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let next = match &mut self.state {
                State::Ready(_) => break,
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
                    Ok(Ok(file)) => State::Ready(tokio::fs::File::from_std(file)),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "cluster: cannot write a snapshot out to send it");
                        State::Failed(e.to_string())
                    }
                    Err(e) => State::Failed(e.to_string()),
                },
            };
            self.state = next;
        }
        if let (Some(at), State::Ready(file)) = (self.seek.take(), &mut self.state) {
            Pin::new(file).start_seek(at)?;
            self.seeking = true;
        }
        Poll::Ready(Ok(()))
    }

    fn ready_file(&mut self) -> io::Result<Pin<&mut tokio::fs::File>> {
        match &mut self.state {
            State::Ready(file) => Ok(Pin::new(file)),
            _ => Err(io::Error::other("the snapshot's file is not there")),
        }
    }
}

impl Expand {
    /// Writes the cut out in full (blocking); answers the file, read from
    /// its start.
    fn run(self, cancel: &AtomicBool) -> io::Result<std::fs::File> {
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
            .read(true)
            .write(true)
            .open(&path)?;
        std::fs::remove_file(&path)?;
        let mut read = file.try_clone()?;
        let started = std::time::Instant::now();
        let out = BufWriter::with_capacity(1 << 20, Cancellable { file, cancel });
        let bytes = self
            .log
            .snapshot_expand(BufReader::new(self.cut), out)
            .map_err(io::Error::other)?;
        read.seek(SeekFrom::Start(0))?;
        tracing::info!(bytes, took = ?started.elapsed(), "cluster: wrote a snapshot out to send it");
        Ok(read)
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
            State::Ready(file) => Pin::new(file).start_seek(position),
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
            State::Ready(file) => Pin::new(file).poll_write(cx, buf),
            _ => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a snapshot taken here is not written to",
            ))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().state {
            State::Ready(file) => Pin::new(file).poll_flush(cx),
            _ => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().state {
            State::Ready(file) => Pin::new(file).poll_shutdown(cx),
            _ => Poll::Ready(Ok(())),
        }
    }
}
