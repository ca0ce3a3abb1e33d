//! The Raft log's entries on disk: segment files written front to back and
//! fdatasynced, a write-ahead log of its own.
//!
//! They were a sled tree before. sled keeps a tree's values in its leaf
//! nodes and writes a node again, whole, every ten changes and at every
//! split (a leaf holds 16 entries), so each entry was written about six
//! times over: 0.6 GB per node for an edge's 106 MB drain, and a tenth of
//! a node's time copying it. Here each entry is written once.
//!
//! - **A record** is its length (u32, little end), the CRC-32 of its bytes,
//!   then its bytes: the entry's postcard encoding, which begins with its
//!   log id.
//! - **A segment** is a file named by its first entry's index. A new one
//!   begins when the last passes [`Wal::segment_bytes`], or when an entry
//!   does not follow the last one written (after a snapshot moved the log
//!   past its end).
//! - **Durable**: an append, a truncation and a new or removed segment are
//!   answered only after the files written, and the directory where files
//!   came or went, are synced ([`Pending::sync`]).
//! - **At open** each segment is read through. The first record that is
//!   short, empty or fails its CRC ends the log: it and everything after it
//!   (a write a crash cut short, never acknowledged, since an append is
//!   answered after its sync) is removed before the log is used. A record
//!   that passes its CRC but cannot be read, or does not follow the one
//!   before it (its index, its term), is not a torn write: the log is
//!   refused, not cut, as cutting could drop acknowledged entries.
//! - **A purge** removes the segments whose entries are all purged; the
//!   purged id itself is kept by the caller, and entries at or below it
//!   are skipped at open.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::LogId;

use crate::types::NodeId;

/// A segment is closed and another begun once it holds this much.
pub(crate) const SEGMENT_BYTES: u64 = 64 << 20;
/// Length and CRC.
const HEADER: usize = 8;
/// No record is larger (an entry is at most a few MiB; a length past this
/// is a torn or foreign write).
const MAX_RECORD: usize = 256 << 20;

/// Where one entry's record is.
#[derive(Clone)]
struct Loc {
    log_id: LogId<NodeId>,
    file: Arc<File>,
    /// The record's start (its header).
    pos: u64,
    /// The entry's bytes, after the header.
    len: u32,
}

struct Segment {
    /// The index of its first entry (its name).
    first: u64,
    /// The index of its last entry.
    last: u64,
    path: PathBuf,
    file: Arc<File>,
    len: u64,
}

/// What a change needs synced before it is answered.
#[must_use]
#[derive(Default)]
pub(crate) struct Pending {
    files: Vec<Arc<File>>,
    dir: Option<PathBuf>,
}

impl Pending {
    fn file(&mut self, f: &Arc<File>) {
        if !self.files.iter().any(|g| Arc::ptr_eq(g, f)) {
            self.files.push(f.clone());
        }
    }

    /// What `other` needs synced too.
    pub(crate) fn merge(&mut self, other: Pending) {
        for f in &other.files {
            self.file(f);
        }
        if other.dir.is_some() {
            self.dir = other.dir;
        }
    }

    /// fdatasync of each file written, fsync of the directory if files
    /// came or went.
    pub(crate) fn sync(self) -> io::Result<()> {
        for f in &self.files {
            f.sync_data()?;
        }
        if let Some(dir) = self.dir {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// The entries' segment files and where each live entry is.
pub struct Wal {
    dir: PathBuf,
    segments: VecDeque<Segment>,
    /// Every entry after the purged one, in index order, with no gap.
    locs: VecDeque<Loc>,
    segment_bytes: u64,
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.wal")
}

/// The log id an entry's encoding begins with.
fn log_id_of(bytes: &[u8]) -> Option<LogId<NodeId>> {
    postcard::take_from_bytes::<LogId<NodeId>>(bytes)
        .ok()
        .map(|(id, _)| id)
}

/// Reads the next record, `remaining` bytes being left in the file:
/// `Ok(None)` at the end or at a record that is not whole and sound (short,
/// empty, or failing its CRC).
fn read_record(r: &mut impl Read, remaining: u64, buf: &mut Vec<u8>) -> io::Result<Option<u32>> {
    let mut header = [0u8; HEADER];
    if let Err(e) = r.read_exact(&mut header) {
        return match e.kind() {
            io::ErrorKind::UnexpectedEof => Ok(None),
            _ => Err(e),
        };
    }
    let [l0, l1, l2, l3, c0, c1, c2, c3] = header;
    let len = u32::from_le_bytes([l0, l1, l2, l3]);
    let crc = u32::from_le_bytes([c0, c1, c2, c3]);
    // An entry is never empty: a length of 0 is a tail of zeros, as a
    // crash can leave past the last synced write.
    if len == 0 || len as usize > MAX_RECORD || u64::from(len) + HEADER as u64 > remaining {
        return Ok(None);
    }
    buf.resize(len as usize, 0);
    if let Err(e) = r.read_exact(buf) {
        return match e.kind() {
            io::ErrorKind::UnexpectedEof => Ok(None),
            _ => Err(e),
        };
    }
    Ok((crc32fast::hash(buf) == crc).then_some(len))
}

impl Wal {
    /// Opens the log in `dir` (created if missing), skipping the entries
    /// up to `purged` and cutting it at the first record that is not sound.
    pub fn open(dir: &Path, purged: Option<u64>) -> io::Result<Wal> {
        Wal::open_with(dir, purged, SEGMENT_BYTES)
    }

    /// [`Wal::open`] with segments of `segment_bytes`.
    pub fn open_with(dir: &Path, purged: Option<u64>, segment_bytes: u64) -> io::Result<Wal> {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            if let Some(parent) = dir.parent() {
                File::open(parent)?.sync_all()?;
            }
        }
        let mut firsts = Vec::new();
        for item in std::fs::read_dir(dir)? {
            let name = item?.file_name();
            // Only names this log gives (20 digits, `.wal`).
            let Some(first) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".wal"))
                .filter(|n| n.len() == 20 && n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            firsts.push(first);
        }
        firsts.sort_unstable();
        let mut wal = Wal {
            dir: dir.to_path_buf(),
            segments: VecDeque::new(),
            locs: VecDeque::new(),
            segment_bytes,
        };
        let mut pending = Pending::default();
        let mut cut = false;
        for first in firsts {
            let path = dir.join(segment_name(first));
            if cut {
                std::fs::remove_file(&path)?;
                pending.dir = Some(dir.to_path_buf());
                continue;
            }
            let (segment, torn_at) = wal.scan(first, path, purged)?;
            if let Some(index) = torn_at {
                segment.file.set_len(segment.len)?;
                pending.file(&segment.file);
                // What follows a torn record is cut too, unless the torn
                // record was purged anyway (then so is all before it).
                cut = purged.is_none_or(|p| index > p);
            }
            match segment.len {
                0 => {
                    std::fs::remove_file(&segment.path)?;
                    pending.dir = Some(dir.to_path_buf());
                }
                _ if purged.is_some_and(|p| segment.last <= p) => {
                    std::fs::remove_file(&segment.path)?;
                }
                _ => wal.segments.push_back(segment),
            }
        }
        pending.sync()?;
        if let (Some(p), Some(first)) = (purged, wal.first_index()) {
            if first != p + 1 {
                return Err(invalid(format!(
                    "Raft log: entries purged up to {p}, but the first one kept is {first}"
                )));
            }
        }
        Ok(wal)
    }

    /// Reads segment `first` through: the segment as far as it is sound,
    /// and, if a torn record ends it early, the index that record would
    /// have had. A record that passes its CRC but is not the entry that
    /// should come there is an error.
    fn scan(
        &mut self,
        first: u64,
        path: PathBuf,
        purged: Option<u64>,
    ) -> io::Result<(Segment, Option<u64>)> {
        let file = Arc::new(OpenOptions::new().read(true).write(true).open(&path)?);
        let size = file.metadata()?.len();
        let mut reader = BufReader::with_capacity(1 << 20, &*file);
        let mut buf = Vec::new();
        let mut pos = 0u64;
        let mut last = None::<LogId<NodeId>>;
        let torn_at = loop {
            let expected = match last {
                Some(l) => l.index + 1,
                None => first,
            };
            let Some(len) = read_record(&mut reader, size - pos, &mut buf)? else {
                break (pos < size).then_some(expected);
            };
            let corrupt = |what: &str| {
                invalid(format!(
                    "Raft log: {} at byte {pos}: {what}; the log is not read further \
                     (cutting it could drop acknowledged entries)",
                    path.display()
                ))
            };
            let Some(log_id) = log_id_of(&buf) else {
                return Err(corrupt("a record passes its CRC but is not an entry"));
            };
            if log_id.index != expected {
                return Err(corrupt(&format!(
                    "entry {} where {expected} should be",
                    log_id.index
                )));
            }
            // After the last live entry of the segment before, the next
            // one (a segment past it is only where all before is purged).
            let before = last.or_else(|| self.locs.back().map(|l| l.log_id));
            if let Some(b) = before {
                if last.is_none() && log_id.index != b.index + 1 {
                    return Err(corrupt(&format!(
                        "segment begins at {} after entry {}",
                        log_id.index, b.index
                    )));
                }
                if log_id.leader_id < b.leader_id {
                    return Err(corrupt("an entry of an older term after a newer one"));
                }
            }
            if purged.is_none_or(|p| log_id.index > p) {
                self.locs.push_back(Loc {
                    log_id,
                    file: file.clone(),
                    pos,
                    len,
                });
            }
            last = Some(log_id);
            pos += (HEADER as u64) + u64::from(len);
        };
        if torn_at.is_some() {
            tracing::error!(
                segment = %path.display(),
                at = pos,
                "cluster: the Raft log ends in a record a crash cut short; it and what follows are removed"
            );
        }
        let last = last.map_or(first.saturating_sub(1), |l| l.index);
        Ok((
            Segment {
                first,
                last,
                path,
                file,
                len: pos,
            },
            torn_at,
        ))
    }

    /// The first live entry's index.
    pub fn first_index(&self) -> Option<u64> {
        self.locs.front().map(|l| l.log_id.index)
    }

    /// The last live entry's id.
    pub fn last(&self) -> Option<LogId<NodeId>> {
        self.locs.back().map(|l| l.log_id)
    }

    /// Live entries.
    pub fn len(&self) -> usize {
        self.locs.len()
    }

    /// No live entries.
    pub fn is_empty(&self) -> bool {
        self.locs.is_empty()
    }

    /// Writes `entries` (each its log id and encoding), in order after the
    /// last; durable once the answer is synced.
    pub(crate) fn append(&mut self, entries: &[(LogId<NodeId>, Vec<u8>)]) -> io::Result<Pending> {
        let mut pending = Pending::default();
        let mut i = 0;
        while i < entries.len() {
            let index = entries[i].0.index;
            if let Some(l) = self.last() {
                if index != l.index + 1 {
                    return Err(invalid(format!(
                        "Raft log: entry {index} appended after {}",
                        l.index
                    )));
                }
            }
            let starts_segment = match self.segments.back() {
                None => true,
                Some(s) => s.len >= self.segment_bytes || index != s.last + 1,
            };
            if starts_segment {
                self.begin_segment(index)?;
                pending.dir = Some(self.dir.clone());
            }
            let Some(segment) = self.segments.back_mut() else {
                return Err(invalid("Raft log: no segment".into()));
            };
            // This segment's share, one write.
            let mut buf = Vec::new();
            let mut locs = Vec::new();
            let mut len = segment.len;
            while let Some((log_id, bytes)) = entries.get(i) {
                if len >= self.segment_bytes && !buf.is_empty() {
                    break;
                }
                if i > 0 && log_id.index != entries[i - 1].0.index + 1 {
                    return Err(invalid(format!(
                        "Raft log: entry {} appended after {}",
                        log_id.index,
                        entries[i - 1].0.index
                    )));
                }
                let n = u32::try_from(bytes.len())
                    .ok()
                    .filter(|&n| n as usize <= MAX_RECORD)
                    .ok_or_else(|| invalid(format!("Raft log: entry of {} bytes", bytes.len())))?;
                buf.extend_from_slice(&n.to_le_bytes());
                buf.extend_from_slice(&crc32fast::hash(bytes).to_le_bytes());
                buf.extend_from_slice(bytes);
                locs.push(Loc {
                    log_id: *log_id,
                    file: segment.file.clone(),
                    pos: len,
                    len: n,
                });
                len += (HEADER as u64) + u64::from(n);
                i += 1;
            }
            if let Err(e) = segment.file.write_all_at(&buf, segment.len) {
                // What was written of it is cut off again (best effort: at
                // open, a record that is not whole ends the log anyway).
                let _ = segment.file.set_len(segment.len);
                return Err(e);
            }
            segment.len = len;
            if let Some(l) = locs.last() {
                segment.last = l.log_id.index;
            }
            pending.file(&segment.file);
            self.locs.extend(locs);
        }
        Ok(pending)
    }

    fn begin_segment(&mut self, first: u64) -> io::Result<()> {
        let path = self.dir.join(segment_name(first));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        self.segments.push_back(Segment {
            first,
            last: first.saturating_sub(1),
            path,
            file: Arc::new(file),
            len: 0,
        });
        Ok(())
    }

    /// Removes the entries from `index` on.
    pub(crate) fn truncate(&mut self, index: u64) -> io::Result<Pending> {
        let mut pending = Pending::default();
        let cut = self.locs.iter().find(|l| l.log_id.index == index).cloned();
        while self.locs.back().is_some_and(|l| l.log_id.index >= index) {
            self.locs.pop_back();
        }
        while let Some(s) = self.segments.back() {
            if s.first < index {
                break;
            }
            std::fs::remove_file(&s.path)?;
            pending.dir = Some(self.dir.clone());
            self.segments.pop_back();
        }
        if let (Some(s), Some(cut)) = (self.segments.back_mut(), cut) {
            if s.last >= index && Arc::ptr_eq(&s.file, &cut.file) {
                s.file.set_len(cut.pos)?;
                s.len = cut.pos;
                s.last = index - 1;
                pending.file(&s.file);
            }
        }
        Ok(pending)
    }

    /// Forgets the entries up to `index`, removing the segments that hold
    /// nothing else.
    pub(crate) fn purge(&mut self, index: u64) -> io::Result<()> {
        while self.locs.front().is_some_and(|l| l.log_id.index <= index) {
            self.locs.pop_front();
        }
        while let Some(s) = self.segments.front() {
            if s.last > index {
                break;
            }
            std::fs::remove_file(&s.path)?;
            self.segments.pop_front();
        }
        Ok(())
    }

    /// Where the live entries from `start` to `end` (inclusive) are.
    fn locate(&self, start: u64, end: u64) -> Vec<Loc> {
        let Some(first) = self.first_index() else {
            return Vec::new();
        };
        let from = start.max(first);
        if end < from {
            return Vec::new();
        }
        let skip = usize::try_from(from - first).unwrap_or(usize::MAX);
        let take = usize::try_from(end - from)
            .unwrap_or(usize::MAX)
            .saturating_add(1);
        self.locs.iter().skip(skip).take(take).cloned().collect()
    }

    /// Reads the entries from `start` to `end` (inclusive) that are live:
    /// their encodings, in order. The files are read after `wal`'s lock
    /// is let go, so a truncation may come in between (a leader's
    /// replication still running as it steps down, while the new leader's
    /// entries replace its last ones): a record that is not what it was
    /// is not an error if it is no longer live, and the read ends there.
    pub fn read(wal: &std::sync::Mutex<Wal>, start: u64, end: u64) -> io::Result<Vec<Vec<u8>>> {
        let locs = tributary_storage::util::lock(wal).locate(start, end);
        let mut out = Vec::with_capacity(locs.len());
        for l in locs {
            match Wal::read_at(&l) {
                Ok(bytes) => out.push(bytes),
                Err(e) => {
                    let live = tributary_storage::util::lock(wal).is_live(&l);
                    if live {
                        return Err(e);
                    }
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The entry at `l`, checked.
    fn read_at(l: &Loc) -> io::Result<Vec<u8>> {
        let mut record = vec![0u8; HEADER + l.len as usize];
        l.file.read_exact_at(&mut record, l.pos)?;
        let bytes = record.split_off(HEADER);
        let crc = record
            .get(4..8)
            .and_then(|c| c.try_into().ok())
            .map(u32::from_le_bytes);
        if crc != Some(crc32fast::hash(&bytes)) || log_id_of(&bytes) != Some(l.log_id) {
            return Err(invalid(format!(
                "Raft log: entry {} is not what was written",
                l.log_id.index
            )));
        }
        Ok(bytes)
    }

    /// `l` is where a live entry is.
    fn is_live(&self, l: &Loc) -> bool {
        let Some(first) = self.first_index() else {
            return false;
        };
        let Some(at) = l
            .log_id
            .index
            .checked_sub(first)
            .and_then(|i| usize::try_from(i).ok())
        else {
            return false;
        };
        self.locs.get(at).is_some_and(|k| {
            k.log_id == l.log_id && k.pos == l.pos && Arc::ptr_eq(&k.file, &l.file)
        })
    }

    /// Removes every segment (the log empty, as new).
    pub(crate) fn clear(&mut self) -> io::Result<Pending> {
        self.locs.clear();
        let mut pending = Pending::default();
        while let Some(s) = self.segments.pop_front() {
            std::fs::remove_file(&s.path)?;
            pending.dir = Some(self.dir.clone());
        }
        Ok(pending)
    }

    /// Segment files (for tests).
    #[cfg(test)]
    pub(crate) fn segment_count(&self) -> usize {
        self.segments.len()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use openraft::{CommittedLeaderId, Entry};

    use super::*;
    use crate::types::{big_entry, TypeConfig};

    fn entry(term: u64, index: u64, bytes: usize) -> (LogId<NodeId>, Vec<u8>) {
        let mut e = big_entry(index, bytes);
        e.log_id = LogId::new(CommittedLeaderId::new(term, 1), index);
        (e.log_id, postcard::to_allocvec(&e).expect("encode"))
    }

    fn entries(term: u64, range: std::ops::RangeInclusive<u64>) -> Vec<(LogId<NodeId>, Vec<u8>)> {
        range.map(|i| entry(term, i, 100 + i as usize)).collect()
    }

    /// Appends and syncs.
    fn put(wal: &mut Wal, entries: &[(LogId<NodeId>, Vec<u8>)]) {
        wal.append(entries).expect("append").sync().expect("sync");
    }

    /// (index, term) of every live entry, read from the files.
    fn read_all(wal: Wal) -> Vec<(u64, u64)> {
        let first = wal.first_index().unwrap_or(0);
        let m = std::sync::Mutex::new(wal);
        Wal::read(&m, first, u64::MAX)
            .expect("read")
            .iter()
            .map(|b| {
                let e: Entry<TypeConfig> = postcard::from_bytes(b).expect("decode");
                (e.log_id.index, e.log_id.leader_id.term)
            })
            .collect()
    }

    fn indexes(got: &[(u64, u64)]) -> Vec<u64> {
        got.iter().map(|(i, _)| *i).collect()
    }

    #[test]
    fn a_log_id_is_read_from_the_start_of_an_entry() {
        let (id, bytes) = entry(3, 42, 10);
        assert_eq!(log_id_of(&bytes), Some(id));
    }

    /// Entries span several segments and read back after a reopen.
    #[test]
    fn entries_read_back_across_segments() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut wal = Wal::open_with(dir.path(), None, 1000).expect("open");
        put(&mut wal, &entries(1, 1..=20));
        assert!(wal.segment_count() > 2, "{}", wal.segment_count());
        drop(wal);
        let wal = Wal::open_with(dir.path(), None, 1000).expect("reopen");
        assert_eq!(indexes(&read_all(wal)), (1..=20).collect::<Vec<_>>());
    }

    /// A record a crash cut short, and whatever a crash left after it
    /// (a later segment begun), is removed at open; the log goes on from
    /// the last whole entry.
    #[test]
    fn a_torn_record_ends_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut wal = Wal::open_with(dir.path(), None, 1 << 20).expect("open");
        put(&mut wal, &entries(1, 1..=5));
        drop(wal);
        let (_, six) = entry(1, 6, 106);
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(segment_name(1)))
            .expect("segment");
        f.write_all(&(six.len() as u32).to_le_bytes())
            .expect("write");
        f.write_all(&crc32fast::hash(&six).to_le_bytes())
            .expect("write");
        f.write_all(&six[..six.len() / 2]).expect("write");
        std::fs::write(dir.path().join(segment_name(7)), b"junk").expect("write");
        let mut wal = Wal::open_with(dir.path(), None, 1 << 20).expect("reopen");
        assert_eq!(wal.last().map(|l| l.index), Some(5));
        assert_eq!(wal.segment_count(), 1);
        assert!(!dir.path().join(segment_name(7)).exists());
        put(&mut wal, &entries(2, 6..=7));
        drop(wal);
        let wal = Wal::open_with(dir.path(), None, 1 << 20).expect("reopen");
        assert_eq!(
            read_all(wal),
            [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (6, 2), (7, 2)]
        );
    }

    /// A flipped byte in a record fails its CRC: the log ends before it.
    #[test]
    fn a_record_that_fails_its_crc_ends_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut wal = Wal::open_with(dir.path(), None, 1 << 20).expect("open");
        put(&mut wal, &entries(1, 1..=3));
        let second = wal.locs[1].pos;
        drop(wal);
        let path = dir.path().join(segment_name(1));
        let mut bytes = std::fs::read(&path).expect("read");
        let at = usize::try_from(second).expect("pos") + HEADER + 20;
        bytes[at] ^= 0xff;
        std::fs::write(&path, bytes).expect("write");
        let wal = Wal::open_with(dir.path(), None, 1 << 20).expect("reopen");
        assert_eq!(indexes(&read_all(wal)), [1]);
    }

    /// A truncation (a new leader's entries replacing the old) is what a
    /// reopen finds: within a segment and across segments, removed ones
    /// do not come back.
    #[test]
    fn a_truncation_stays_truncated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut wal = Wal::open_with(dir.path(), None, 1000).expect("open");
        put(&mut wal, &entries(1, 1..=20));
        let segments = wal.segment_count();
        wal.truncate(6).expect("truncate").sync().expect("sync");
        assert!(wal.segment_count() < segments);
        assert_eq!(wal.last().map(|l| l.index), Some(5));
        put(&mut wal, &entries(2, 6..=8));
        wal.truncate(8).expect("truncate").sync().expect("sync");
        drop(wal);
        let wal = Wal::open_with(dir.path(), None, 1000).expect("reopen");
        assert_eq!(
            read_all(wal),
            [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (6, 2), (7, 2)]
        );
    }

    /// A purge removes the segments it empties and the entries it covers
    /// stay gone after a reopen; a snapshot moving the log past its end
    /// begins a new segment, which opens after the purged ones.
    #[test]
    fn a_purge_removes_segments_and_the_log_goes_on_past_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut wal = Wal::open_with(dir.path(), None, 1000).expect("open");
        put(&mut wal, &entries(1, 1..=20));
        let segments = wal.segment_count();
        wal.purge(12).expect("purge");
        assert!(wal.segment_count() < segments);
        assert_eq!(wal.first_index(), Some(13));
        drop(wal);
        let mut wal = Wal::open_with(dir.path(), Some(12), 1000).expect("reopen");
        assert_eq!(wal.first_index(), Some(13));
        // A snapshot up to 100: everything purged, the log goes on at 101.
        wal.purge(100).expect("purge");
        assert_eq!(wal.len(), 0);
        put(&mut wal, &entries(3, 101..=103));
        drop(wal);
        let wal = Wal::open_with(dir.path(), Some(100), 1000).expect("reopen");
        assert_eq!(indexes(&read_all(wal)), [101, 102, 103]);
    }

    /// Segments left by a purge whose files were not all removed (a crash
    /// between the purged id written and the files removed) are skipped,
    /// and a later segment that starts past them is kept.
    #[test]
    fn purged_segments_left_behind_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut wal = Wal::open_with(dir.path(), None, 1000).expect("open");
        put(&mut wal, &entries(1, 1..=5));
        // As after a snapshot to 50 whose purge did not remove the files.
        wal.locs.clear();
        put(&mut wal, &entries(2, 51..=53));
        drop(wal);
        let wal = Wal::open_with(dir.path(), Some(50), 1000).expect("reopen");
        assert_eq!(indexes(&read_all(wal)), [51, 52, 53]);
        assert!(!dir.path().join(segment_name(1)).exists());
    }

    /// A tail of zeros (a file made longer by a write a crash cut short)
    /// is a torn record, not an entry: it is removed.
    #[test]
    fn a_tail_of_zeros_is_torn() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut wal = Wal::open_with(dir.path(), None, 1 << 20).expect("open");
        put(&mut wal, &entries(1, 1..=2));
        drop(wal);
        let path = dir.path().join(segment_name(1));
        let mut f = OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("segment");
        f.write_all(&[0u8; 4096]).expect("write");
        let wal = Wal::open_with(dir.path(), None, 1 << 20).expect("reopen");
        assert_eq!(indexes(&read_all(wal)), [1, 2]);
        assert_eq!(
            std::fs::metadata(&path).expect("metadata").len(),
            2 * HEADER as u64
                + entries(1, 1..=2)
                    .iter()
                    .map(|(_, b)| b.len() as u64)
                    .sum::<u64>()
        );
    }

    /// A record that passes its CRC but is not the entry that should come
    /// there is not cut away (that could drop acknowledged entries): the
    /// log is refused, and nothing is removed.
    #[test]
    fn a_sound_record_out_of_place_refuses_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut wal = Wal::open_with(dir.path(), None, 1 << 20).expect("open");
        put(&mut wal, &entries(1, 1..=2));
        drop(wal);
        let path = dir.path().join(segment_name(1));
        let len = std::fs::metadata(&path).expect("metadata").len();
        let (_, five) = entry(1, 5, 10);
        let mut f = OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("segment");
        f.write_all(&(five.len() as u32).to_le_bytes())
            .expect("write");
        f.write_all(&crc32fast::hash(&five).to_le_bytes())
            .expect("write");
        f.write_all(&five).expect("write");
        let refused = Wal::open_with(dir.path(), None, 1 << 20)
            .err()
            .expect("refused");
        assert!(refused.to_string().contains("entry 5 where 3"), "{refused}");
        assert!(std::fs::metadata(&path).expect("metadata").len() > len);
    }

    /// Entries kept that do not begin right after the purged one (some lost)
    /// refuse the log.
    #[test]
    fn a_gap_after_the_purged_entry_refuses_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut wal = Wal::open_with(dir.path(), None, 1 << 20).expect("open");
        put(&mut wal, &entries(1, 5..=7));
        drop(wal);
        assert!(Wal::open_with(dir.path(), Some(2), 1 << 20).is_err());
        assert!(Wal::open_with(dir.path(), Some(4), 1 << 20).is_ok());
    }

    /// A read whose entries a truncation replaced after they were located
    /// ends where they were replaced, without an error; the same damage to
    /// a live entry is an error.
    #[test]
    fn a_read_overtaken_by_a_truncation_ends_there() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut wal = Wal::open_with(dir.path(), None, 1 << 20).expect("open");
        put(&mut wal, &entries(1, 1..=4));
        let m = std::sync::Mutex::new(wal);
        let locs = tributary_storage::util::lock(&m).locate(1, 4);
        // The truncation and the new leader's entries come in between.
        {
            let mut wal = tributary_storage::util::lock(&m);
            wal.truncate(3).expect("truncate").sync().expect("sync");
            put(&mut wal, &[entry(2, 3, 500)]);
        }
        let read: Vec<u64> = locs
            .iter()
            .map_while(|l| Wal::read_at(l).ok())
            .filter_map(|b| log_id_of(&b).map(|id| id.index))
            .collect();
        assert_eq!(read, [1, 2]);
        let wal = tributary_storage::util::lock(&m);
        assert!(wal.is_live(&locs[1]));
        assert!(!wal.is_live(&locs[2]), "entry 3 of term 1 is gone");
        drop(wal);
        assert_eq!(Wal::read(&m, 1, 4).expect("read").len(), 3);
    }

    /// An entry that does not follow the last is refused.
    #[test]
    fn a_gap_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut wal = Wal::open_with(dir.path(), None, 1000).expect("open");
        put(&mut wal, &entries(1, 1..=2));
        assert!(wal.append(&entries(1, 4..=4)).is_err());
    }
}
