//! [`SledDisk`]: a sled database in a directory of its own, opened and
//! synced so that what it reports synced is on disk. The node's store and
//! the cluster's Raft log each open one.
//!
//! What sled does not do by itself, and this does:
//! - **One process per directory.** sled takes its file lock only inside its
//!   open, after the snapshot clean-up below; a `tributary.lock` of our own
//!   is taken first and held for the database's life.
//! - **A crash during sled's start-up snapshot** leaves `snap.*.generating`,
//!   which bricks the next open (sled issues #1527/#1533): removed first.
//! - **sled's own file lock** can still be held for a moment by its I/O
//!   threads after the last handle of a closed database went: waited out.
//! - **A sync that is one.** sled's flush writes its buffers and calls
//!   `sync_file_range`, which neither reaches the device's cache nor records
//!   a grown file's size; and sled never syncs the blob files it writes for
//!   values over a quarter of a segment. [`SledDisk::sync`] flushes, fsyncs
//!   every blob file not synced before and the directory naming them, then
//!   `fdatasync`s the database file.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::util::lock;

/// A sled database opened for durable syncs (see the module doc).
pub struct SledDisk {
    db: sled::Db,
    db_file: File,
    dir: PathBuf,
    blobs_dir: PathBuf,
    synced_blobs: Mutex<HashSet<OsString>>,
    syncs: AtomicU64,
    /// Held for the database's life: one process per directory.
    _dir_lock: File,
}

impl SledDisk {
    /// Opens or creates the database in `dir` with sled's page cache of
    /// `cache_capacity` bytes and log segments of `segment_size` (a power of
    /// two ≥ 64 KiB; values over a quarter of it become blob files).
    pub fn open(dir: &Path, cache_capacity: u64, segment_size: usize) -> Result<SledDisk> {
        if !segment_size.is_power_of_two() || segment_size < 64 * 1024 {
            return Err(Error::Config(format!(
                "segment_size must be a power of two ≥ 65536, got {segment_size}"
            )));
        }
        std::fs::create_dir_all(dir)?;
        // Our own lock first: the snapshot clean-up below must never touch the
        // files of another live process (sled takes its lock only inside open).
        let dir_lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("tributary.lock"))?;
        if let Err(e) = dir_lock.try_lock() {
            return Err(Error::Io(std::io::Error::other(format!(
                "{} is in use by another process ({e})",
                dir.display()
            ))));
        }
        remove_interrupted_snapshots(dir)?;
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_capacity)
            .segment_size(segment_size)
            .flush_every_ms(None);
        let db = open_waiting_for_lock(&config)?;
        db.flush()?;
        let db_file = File::open(dir.join("db"))?;
        db_file.sync_all()?;
        // sled writes its settings (`conf`, with the segment size) and never
        // syncs them: a power cut right after a database's creation leaves
        // the file empty.
        File::open(dir.join("conf"))?.sync_all()?;
        File::open(dir)?.sync_all()?;
        Ok(SledDisk {
            db,
            db_file,
            dir: dir.to_owned(),
            blobs_dir: dir.join("blobs"),
            synced_blobs: Mutex::new(HashSet::new()),
            syncs: AtomicU64::new(0),
            _dir_lock: dir_lock,
        })
    }

    /// The segment size a database in `dir` was created with (sled refuses
    /// to open it with another), if there is one: from the `conf` file sled
    /// keeps beside it.
    pub fn segment_size_of(dir: &Path) -> Option<usize> {
        let conf = std::fs::read(dir.join("conf")).ok()?;
        conf.split(|&b| b == b'\n').find_map(|line| {
            std::str::from_utf8(line.strip_prefix(b"segment_size: ")?)
                .ok()?
                .parse()
                .ok()
        })
    }

    /// The database.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes everything written so far durable (blocks: call it off the
    /// async workers).
    pub fn sync(&self) -> Result<()> {
        self.db.flush()?;
        self.sync_blobs()?;
        self.db_file.sync_data()?;
        self.syncs.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Syncs completed since the database was opened.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Relaxed)
    }

    /// Blob files synced and still present, as of the last sync.
    pub fn synced_blobs(&self) -> usize {
        lock(&self.synced_blobs).len()
    }

    /// Fsyncs every blob not synced before, then the directory that names
    /// them.
    fn sync_blobs(&self) -> Result<()> {
        let entries = match std::fs::read_dir(&self.blobs_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let mut synced = lock(&self.synced_blobs);
        let mut present = HashSet::new();
        let mut any_new = false;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if !synced.contains(&name) {
                match File::open(entry.path()) {
                    Ok(f) => f.sync_data()?,
                    // sled removed it meanwhile (garbage collection): nothing to keep.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e.into()),
                }
                any_new = true;
            }
            present.insert(name);
        }
        *synced = present;
        if any_new {
            File::open(&self.blobs_dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// How long [`SledDisk::open`] waits for sled's file lock.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// sled's I/O thread pool keeps the database file, and with it the file lock,
/// open for a moment after the last handle is dropped: reopening right after a
/// close can find the lock still taken. Wait a little for it; a lock another
/// process really holds still fails, after the wait.
fn open_waiting_for_lock(config: &sled::Config) -> Result<sled::Db> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match config.open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            opened => return Ok(opened?),
        }
    }
}

/// sled issues #1527/#1533: a crash while sled writes its start-up snapshot
/// leaves `snap.*.generating`, which bricks the next open. Remove them.
fn remove_interrupted_snapshots(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(file = %name, "removing an interrupted sled snapshot left by a crash");
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupted_snapshot_files_are_removed_before_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(SledDisk::open(dir.path(), 1 << 20, 1 << 20).expect("open"));
        let junk = dir.path().join("snap.00000000000001A0.generating");
        std::fs::write(&junk, b"half a snapshot").expect("write");
        drop(SledDisk::open(dir.path(), 1 << 20, 1 << 20).expect("reopen"));
        assert!(!junk.exists());
    }

    #[test]
    fn large_values_become_synced_blobs_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = SledDisk::open(dir.path(), 1 << 20, 1 << 20).expect("open");
        let raw = d.db().open_tree("raw").expect("tree");
        let big = vec![7u8; 600 * 1024];
        raw.insert(b"k", big.clone()).expect("insert");
        d.sync().expect("sync");
        let blobs = std::fs::read_dir(dir.path().join("blobs"))
            .expect("blobs dir")
            .count();
        assert!(
            blobs >= 1,
            "a 600 KiB value should be a blob with 1 MiB segments"
        );
        assert_eq!(d.synced_blobs(), blobs);
        assert_eq!(d.syncs(), 1);
        assert_eq!(raw.get(b"k").expect("get").as_deref(), Some(&big[..]));
    }

    #[test]
    fn the_segment_size_a_database_was_created_with_is_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(SledDisk::segment_size_of(dir.path()), None);
        drop(SledDisk::open(dir.path(), 1 << 20, 512 * 1024).expect("open"));
        assert_eq!(SledDisk::segment_size_of(dir.path()), Some(512 * 1024));
        assert!(SledDisk::open(dir.path(), 1 << 20, 1 << 20).is_err());
        drop(SledDisk::open(dir.path(), 1 << 20, 512 * 1024).expect("reopen"));
    }

    #[test]
    fn a_second_open_of_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = SledDisk::open(dir.path(), 1 << 20, 1 << 20).expect("open");
        let err = SledDisk::open(dir.path(), 1 << 20, 1 << 20)
            .err()
            .expect("a second open must fail");
        assert!(err.to_string().contains("in use"), "{err}");
    }

    #[test]
    fn a_segment_size_not_a_power_of_two_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(SledDisk::open(dir.path(), 1 << 20, 100_000).is_err());
    }
}
