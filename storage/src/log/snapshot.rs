//! Snapshots of the whole log, for a replicated log whose older entries are
//! dropped: a node far behind, or one whose data was wiped, installs a
//! snapshot, then applies the entries after it.
//!
//! ## Taking one: a cut
//! [`Log::snapshot_cut`] is called when no replicated op is being applied,
//! so what it sees is the state after one index of the replicated log. It
//! writes everything that is overwritten in place (topic configs, floors,
//! group positions, metadata) and each partition's end (its next offset and
//! byte position), and no records: the cut file is as large as those tables,
//! whatever the log holds. Compaction's own progress (`compaction`,
//! `compaction.pass`) is the node's and stays out: the restored node
//! compacts from scratch.
//!
//! ## Sending one: the cut made whole
//! [`Log::snapshot_expand`] writes a cut out in full when a node needs it:
//! the cut's items, each partition's end followed by its batches below that
//! end as the log holds them then. The records a cut refers to are not
//! copied when it is taken, because below a partition's end the log only
//! changes by retention (which removes a prefix) and compaction (which
//! removes records and keeps offsets), and what a node may do to its own
//! copy it may do to a snapshot too. Three things are taken care of:
//! - a compaction pass since the cut may have merged batches across an end:
//!   such a batch is written trimmed to the records below the end;
//! - a topic deleted since the cut, or deleted and created again (another
//!   id), gives no batches: its partitions end where the cut saw them, and
//!   the entries after the snapshot delete or create it on the restored
//!   node too;
//! - no compaction pass runs while the copy is made (one running when it
//!   starts is waited for), so the batches it reads are not rewritten under
//!   it.
//!
//! A file written before cuts (batches in it) is passed through whole.
//!
//! ## The file
//! `TRIBSNAP` and a version (`u32`, little-endian), then frames: a length
//! (`u32` LE), a CRC-32 of the body (`u32` LE), the body (an [`Item`] in
//! postcard). The first item is the caller's header (a Raft snapshot's
//! metadata), the last says how many came before it: a file cut short or
//! damaged is refused before anything is changed. A cut holds `Ends` items
//! where a whole snapshot holds a `Partition` item and its `Batch` items.
//!
//! ## Restoring
//! [`Log::restore`] checks the whole file, then replaces everything the log
//! holds (store and memory) by its contents and syncs. It can run again
//! over its own result (a crash in the middle is repaired by restoring the
//! same file at the next start). Readers find no topics while it runs. A
//! cut is refused: it holds no records.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::recovery::{build_topic, recover_producers};
use super::state::{PartitionState, Shared};
use super::{compaction, corruption, producers, Log};
use crate::batch::{decode_header, walk, CompactBuilder};
use crate::error::{Error, Result};
use crate::store::PartitionStore;
use crate::topic::TopicConfig;
use crate::util::lock;

const MAGIC: &[u8; 8] = b"TRIBSNAP";
const VERSION: u32 = 1;
/// A frame larger than this is refused as damage: the largest batch holds
/// one event of the largest size a topic may allow, plus its framing.
const MAX_FRAME: usize = crate::topic::MAX_EVENT_BYTES_LIMIT + (1 << 20);
/// Bytes of batches read from a partition at a time.
const READ_BYTES: usize = 1 << 20;

#[derive(Serialize, Deserialize)]
enum Item {
    Header(Vec<u8>),
    Topic(TopicConfig),
    Floor {
        topic: String,
        partition: u32,
        start: u64,
    },
    Group {
        group: String,
        topic: String,
        partition: u32,
        offset: u64,
        metadata: Vec<u8>,
    },
    Meta {
        space: String,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    /// The batches after it belong to this partition, which ends at `end`.
    Partition {
        topic: String,
        partition: u32,
        end: u64,
    },
    Batch {
        base: u64,
        value: Vec<u8>,
    },
    End {
        items: u64,
    },
    /// In a cut: the partition ends at offset `end`, byte position
    /// `position`; its batches are the log's.
    Ends {
        topic: String,
        partition: u32,
        end: u64,
        position: u64,
    },
}

/// An item's body (a topic config, the last thing in its item, may be in
/// an earlier layout: a snapshot taken before topics had ids).
fn decode_item(body: &[u8]) -> Result<Item> {
    postcard::from_bytes(body).map_err(damaged)
}

fn damaged(what: impl std::fmt::Display) -> Error {
    Error::Io(std::io::Error::other(format!("snapshot file: {what}")))
}

struct Writer<W: Write> {
    out: W,
    items: u64,
    bytes: u64,
}

impl<W: Write> Writer<W> {
    fn new(mut out: W) -> Result<Writer<W>> {
        out.write_all(MAGIC)?;
        out.write_all(&VERSION.to_le_bytes())?;
        Ok(Writer {
            out,
            items: 0,
            bytes: (MAGIC.len() + 4) as u64,
        })
    }

    fn put(&mut self, item: &Item) -> Result<()> {
        let body = postcard::to_stdvec(item).map_err(damaged)?;
        let len = u32::try_from(body.len()).map_err(|_| damaged("an item over 4 GiB"))?;
        self.out.write_all(&len.to_le_bytes())?;
        self.out.write_all(&crc32fast::hash(&body).to_le_bytes())?;
        self.out.write_all(&body)?;
        self.items += 1;
        self.bytes += 8 + body.len() as u64;
        Ok(())
    }

    /// The last item: the count of those before it.
    fn end(&mut self) -> Result<()> {
        let items = self.items;
        self.put(&Item::End { items })?;
        self.out.flush()?;
        Ok(())
    }
}

struct Reader<R: Read> {
    input: R,
    items: u64,
}

impl Reader<BufReader<File>> {
    fn open(path: &Path) -> Result<Reader<BufReader<File>>> {
        Reader::new(BufReader::new(File::open(path)?))
    }
}

impl<R: Read> Reader<R> {
    fn new(mut input: R) -> Result<Reader<R>> {
        let mut head = [0u8; 12];
        input
            .read_exact(&mut head)
            .map_err(|_| damaged("shorter than its header"))?;
        if &head[..8] != MAGIC {
            return Err(damaged("not a snapshot"));
        }
        let version = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
        if version != VERSION {
            return Err(damaged(format!(
                "version {version}, this build reads {VERSION}"
            )));
        }
        Ok(Reader { input, items: 0 })
    }

    fn next(&mut self) -> Result<Item> {
        let mut head = [0u8; 8];
        self.input
            .read_exact(&mut head)
            .map_err(|_| damaged("cut short"))?;
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if len > MAX_FRAME {
            return Err(damaged(format!("an item of {len} bytes")));
        }
        let mut body = vec![0u8; len];
        self.input
            .read_exact(&mut body)
            .map_err(|_| damaged("cut short"))?;
        if crc32fast::hash(&body) != crc {
            return Err(damaged(format!("item {} fails its checksum", self.items)));
        }
        let item = decode_item(&body)?;
        if let Item::End { items } = item {
            if items != self.items {
                return Err(damaged(format!(
                    "{} items where the end counts {items}",
                    self.items
                )));
            }
        }
        self.items += 1;
        Ok(item)
    }

    fn header(&mut self) -> Result<Vec<u8>> {
        match self.next()? {
            Item::Header(h) => Ok(h),
            _ => Err(damaged("no header first")),
        }
    }
}

/// The header a snapshot file (or a cut) was written with.
pub fn snapshot_header(path: &Path) -> Result<Vec<u8>> {
    Reader::open(path)?.header()
}

/// The header of a snapshot file (or a cut) read from its start.
pub fn read_snapshot_header(input: impl Read) -> Result<Vec<u8>> {
    Reader::new(input)?.header()
}

/// A cut begun by [`Log::snapshot_cut`]: written but for its end, which
/// [`Cut::finish`] writes and makes durable.
pub struct Cut {
    writer: Writer<BufWriter<File>>,
}

/// While one is held, no compaction pass runs (see [`Log::snapshot_expand`]).
struct NoPasses<'a>(&'a Shared);

impl<'a> NoPasses<'a> {
    fn hold(shared: &'a Shared) -> NoPasses<'a> {
        shared.snapshotting.fetch_add(1, SeqCst);
        // A pass that began before holds this lock until it is done; any
        // later one sees the count once it has the lock, and stops.
        drop(lock(&shared.retention));
        NoPasses(shared)
    }
}

impl Drop for NoPasses<'_> {
    fn drop(&mut self) {
        self.0.snapshotting.fetch_sub(1, SeqCst);
    }
}

impl Log {
    /// Begins a cut in a new file at `path`: `header` first, then the log's
    /// topic configs, floors, group positions and metadata as they are now,
    /// and each partition's end. Call it when no op of the replicated log is
    /// being applied, so that all this is the state after one index.
    pub fn snapshot_cut(&self, path: &Path, header: &[u8]) -> Result<Cut> {
        let shared = self.shared();
        let out = BufWriter::new(
            File::options()
                .create(true)
                .truncate(true)
                .write(true)
                .open(path)?,
        );
        let mut w = Writer::new(out)?;
        w.put(&Item::Header(header.to_vec()))?;
        let topics: Vec<_> = shared
            .topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let mut ends = Vec::new();
        for t in &topics {
            w.put(&Item::Topic(t.config.clone()))?;
            for ps in &t.partitions {
                ends.push(Item::Ends {
                    topic: t.config.name.clone(),
                    partition: ps.id,
                    end: ps.next.load(SeqCst),
                    position: ps.next_pos.load(SeqCst),
                });
            }
        }
        let store = shared.store.as_ref();
        for (topic, partition, start) in store.floors()? {
            w.put(&Item::Floor {
                topic,
                partition,
                start,
            })?;
        }
        for group in store.group_names()? {
            for (topic, partition, offset, metadata) in store.group_offsets(&group)? {
                w.put(&Item::Group {
                    group: group.clone(),
                    topic,
                    partition,
                    offset,
                    metadata,
                })?;
            }
        }
        store.for_each_meta(&mut |space, key, value| {
            if space == compaction::CHECKPOINTS || space == compaction::INTENTS {
                return Ok(());
            }
            w.put(&Item::Meta {
                space: space.to_owned(),
                key: key.to_vec(),
                value: value.to_vec(),
            })
        })?;
        for item in &ends {
            w.put(item)?;
        }
        Ok(Cut { writer: w })
    }

    /// Writes the snapshot whose cut is read from `cut` in full to `out`
    /// (see the module's docs): what [`Log::restore`] takes. Answers the
    /// bytes written. Blocking: run it on a thread of its own.
    pub fn snapshot_expand(&self, cut: impl Read, out: impl Write) -> Result<u64> {
        let shared = self.shared();
        let _no_passes = NoPasses::hold(shared);
        let mut input = Reader::new(cut)?;
        let mut w = Writer::new(out)?;
        let mut ids: BTreeMap<String, [u8; 16]> = BTreeMap::new();
        loop {
            match input.next()? {
                Item::End { .. } => break,
                Item::Ends {
                    topic,
                    partition,
                    end,
                    position,
                } => {
                    w.put(&Item::Partition {
                        topic: topic.clone(),
                        partition,
                        end,
                    })?;
                    let id = ids.get(&topic).copied();
                    let live = shared
                        .topic(&topic)
                        .filter(|t| Some(t.config.id) == id && !t.live.deleted.load(SeqCst));
                    let Some(t) = live else { continue };
                    let Some(ps) = t.partitions.get(partition as usize) else {
                        continue;
                    };
                    let deleted = || t.live.deleted.load(SeqCst);
                    copy_partition(&mut w, &topic, ps, end, position, deleted)?;
                }
                item => {
                    if let Item::Topic(config) = &item {
                        ids.insert(config.name.clone(), config.id);
                    }
                    w.put(&item)?;
                }
            }
        }
        w.end()?;
        Ok(w.bytes)
    }

    /// Replaces everything this log holds by the snapshot at `path` (see the
    /// module's docs); answers the snapshot's header. The whole file is
    /// checked before anything changes.
    pub async fn restore(&self, path: &Path) -> Result<Vec<u8>> {
        // Whatever was queued is written first: nothing lands after.
        self.barrier().await?;
        let shared = self.inner.shared.clone();
        let path = path.to_owned();
        let (header, next_id) = tokio::task::spawn_blocking(move || restore(&shared, &path))
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e.to_string())))??;
        *self.shared().producer_ids.lock().await = (next_id, next_id);
        Ok(header)
    }
}

/// Writes a partition's batches below `end` (at byte position `position`)
/// as the log holds them now.
fn copy_partition<W: Write>(
    w: &mut Writer<W>,
    topic: &str,
    ps: &PartitionState,
    end: u64,
    position: u64,
    deleted: impl Fn() -> bool,
) -> Result<()> {
    // Where the batches written so far end: a batch starting below it is
    // covered by the one before (what a pass cut short leaves).
    let mut reached = 0;
    // The byte position the last batch written ends at.
    let mut last_position = None;
    let mut batches = ps.store.read(0, READ_BYTES);
    loop {
        let list = match batches {
            Ok(list) => list,
            // Deleted during the copy: the entries after the snapshot
            // delete it on the restored node too.
            Err(_) if deleted() => return Ok(()),
            Err(e) => return Err(e),
        };
        let Some(last) = list.last().map(|(base, _)| *base) else {
            return Ok(());
        };
        for (base, value) in list {
            if base >= end {
                return Ok(());
            }
            if base < reached {
                continue;
            }
            let h = decode_header(&value).map_err(|d| corruption(topic, ps.id, base, d))?;
            let (value, end_position) = if base.saturating_add(h.span) > end {
                trim(topic, ps.id, base, &value, end, position, last_position)?
            } else {
                (value, h.end_position)
            };
            reached = base.saturating_add(h.span).min(end);
            last_position = Some(end_position);
            w.put(&Item::Batch { base, value })?;
        }
        batches = ps.store.read_after(last, READ_BYTES);
    }
}

/// A batch reaching past `end` (a compaction pass merged it since the cut)
/// as a compacted batch of its records below `end`, and the byte position
/// it ends at: right after the batch before it (`after`), whose position
/// the pass counted back from its own end, past the cut; or, first, where
/// the partition ended at the cut (`position`).
fn trim(
    topic: &str,
    partition: u32,
    base: u64,
    value: &[u8],
    end: u64,
    position: u64,
    after: Option<u64>,
) -> Result<(Vec<u8>, u64)> {
    let mut b = CompactBuilder::new(base, value.len());
    walk(value, base, partition, base, end, |r, horizon| {
        b.push(&r, horizon);
        true
    })
    .map_err(|d| corruption(topic, partition, base, d))?;
    let end_position = after.map_or(position, |p| p.saturating_add(b.len() as u64));
    Ok((b.finish(end - base, end_position), end_position))
}

impl Cut {
    /// Ends the cut and makes the file durable; answers its size in bytes.
    /// Blocking: run it on a thread of its own.
    pub fn finish(mut self) -> Result<u64> {
        self.writer.end()?;
        let file = self.writer.out.get_ref();
        file.sync_all()?;
        Ok(self.writer.bytes)
    }
}

/// The partition a restore is writing.
struct Restoring {
    topic: String,
    partition: u32,
    store: Arc<dyn PartitionStore>,
    /// Where it ended at the cut.
    end: u64,
    /// Where its batches written so far end.
    reached: u64,
}

/// Reads the whole file, checking every frame and that the items make a
/// log (valid topic configs, partitions of those topics, batches that
/// decode, in a partition); answers its header.
fn check(path: &Path) -> Result<Vec<u8>> {
    let mut input = Reader::open(path)?;
    let header = input.header()?;
    let mut partitions: BTreeMap<String, u32> = BTreeMap::new();
    let mut in_partition = false;
    loop {
        match input.next()? {
            Item::Header(_) => return Err(damaged("a second header")),
            Item::Topic(config) => {
                config.validate().map_err(damaged)?;
                partitions.insert(config.name.clone(), config.partitions);
            }
            Item::Partition {
                topic, partition, ..
            } => {
                if partitions.get(&topic).is_none_or(|n| partition >= *n) {
                    return Err(damaged(format!(
                        "partition {partition} of no topic {topic}"
                    )));
                }
                in_partition = true;
            }
            Item::Batch { base, value } => {
                if !in_partition {
                    return Err(damaged("a batch before its partition"));
                }
                decode_header(&value).map_err(|e| damaged(format!("the batch at {base}: {e}")))?;
            }
            Item::End { .. } => return Ok(header),
            Item::Ends { .. } => return Err(damaged("a cut, whose records are not in the file")),
            Item::Floor { .. } | Item::Group { .. } | Item::Meta { .. } => {}
        }
    }
}

/// The blocking part of [`Log::restore`]: answers the header and the first
/// producer id free after it.
fn restore(shared: &Shared, path: &Path) -> Result<(Vec<u8>, i64)> {
    let header = check(path)?;

    // Retention, the evictor and compaction work on the old partitions.
    let _pass = lock(&shared.retention);
    {
        let mut topics = shared.topics.write().unwrap_or_else(|p| p.into_inner());
        for t in topics.values() {
            t.live.deleted.store(true, SeqCst);
        }
        topics.clear();
        shared.topic_count.send_replace(0);
    }
    lock(&shared.deleting).clear();
    let store = shared.store.as_ref();
    store.clear()?;
    let mut input = Reader::open(path)?;
    input.header()?;
    let mut current: Option<Restoring> = None;
    let close = |current: &mut Option<Restoring>| -> Result<()> {
        // A partition whose batches went with its deletion after the cut
        // still ends where it ended: later entries find their offsets.
        if let Some(p) = current.take() {
            if p.reached < p.end {
                store.put_floor(&p.topic, p.partition, p.end)?;
            }
        }
        Ok(())
    };
    loop {
        match input.next()? {
            Item::Header(_) => return Err(damaged("a second header")),
            Item::Topic(config) => store.put_topic(&config)?,
            Item::Floor {
                topic,
                partition,
                start,
            } => store.put_floor(&topic, partition, start)?,
            Item::Group {
                group,
                topic,
                partition,
                offset,
                metadata,
            } => store.put_group_offset(&group, &topic, partition, offset, &metadata)?,
            Item::Meta { space, key, value } => store.put_meta(&space, &key, Some(&value))?,
            Item::Partition {
                topic,
                partition,
                end,
            } => {
                close(&mut current)?;
                let store = store.partition(&topic, partition)?;
                current = Some(Restoring {
                    topic,
                    partition,
                    store,
                    end,
                    reached: 0,
                });
            }
            Item::Batch { base, value } => {
                let Some(p) = current.as_mut() else {
                    return Err(damaged("a batch before its partition"));
                };
                let h = decode_header(&value)
                    .map_err(|d| super::corruption(&p.topic, p.partition, base, d))?;
                p.reached = base.saturating_add(h.span);
                p.store.insert(base, value)?;
            }
            Item::End { .. } => break,
            Item::Ends { .. } => return Err(damaged("a cut, whose records are not in the file")),
        }
    }
    close(&mut current)?;
    store.sync()?;

    // The state in memory, as when the log opens.
    let mut topics = BTreeMap::new();
    for config in store.load_topics()? {
        let name = config.name.clone();
        let state = build_topic(store, config, &shared.config.forwarded)?;
        topics.insert(name, Arc::new(state));
    }
    *lock(&shared.producers) = recover_producers(store, &topics)?;
    let next_id = producers::id_block(store.get_meta(producers::ID_SPACE, b"next")?.as_deref()).0;
    let count = topics.len();
    *shared.topics.write().unwrap_or_else(|p| p.into_inner()) = topics;
    shared.topic_count.send_replace(count);
    tracing::info!(topics = count, "log restored from a snapshot");
    Ok((header, next_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_topic_item_is_read_in_the_layout_it_was_written_in() {
        let mut config = TopicConfig::new("t", 2);
        config.id = [3; 16];
        let body = postcard::to_stdvec(&Item::Topic(config.clone())).expect("encode");
        let Item::Topic(read) = decode_item(&body).expect("read") else {
            panic!("not a topic")
        };
        assert_eq!(read, config);
        // A config stored before ids: the same fields without the last two.
        let mut old = config.clone();
        old.id = [0; 16];
        let full = postcard::to_stdvec(&old).expect("encode");
        // id (16 bytes) and an empty set (1 byte) are the tail.
        let mut body = vec![1];
        body.extend_from_slice(&full[..full.len() - 17]);
        let Item::Topic(read) = decode_item(&body).expect("read") else {
            panic!("not a topic")
        };
        assert_eq!(read, old);
        let end = postcard::to_stdvec(&Item::End { items: 4 }).expect("encode");
        assert!(matches!(decode_item(&end), Ok(Item::End { items: 4 })));
        assert!(decode_item(&[1, 0xff]).is_err());
    }
}
