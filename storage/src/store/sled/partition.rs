//! One sled partition: a tree of batches keyed by base offset, and a second
//! tree holding the chunks of its large batches (why and how: [`SledPartition`]).

use std::ops::Bound::{Excluded, Unbounded};

use crate::error::{Error, Result};
use crate::store::keys::{be, key_offset};
use crate::store::{PartitionStore, StoredBatch};

/// One partition: its batches, and the chunks of its large batches.
///
/// ## Large batches are stored in chunks
/// sled keeps a leaf page of up to 16 values in memory and writes a page
/// larger than a quarter of a segment to a blob file; its cache then counts
/// such a page by the size of its pointer, so pages of large values are never
/// evicted and the process grows with every large event written (measured: 1.9
/// GiB RSS after 1.5 GB of 900 KB events with a 32 MiB cache). So a batch value
/// over [`CHUNKED_OVER`] bytes (only a single event larger than a batch makes
/// one) is stored as [`CHUNK`]-byte values in a second tree, keyed by base
/// offset and chunk number, and the partition tree holds a 14-byte stub:
///
/// ```text
/// 0  1  magic 0x55 ('U': chunked; a whole batch starts with 0x54)
/// 1  1  version (1)
/// 2  8  total length (LE u64)
/// 10 4  chunk count (LE u32)
/// ```
///
/// Chunks are written before the stub and removed after it, in the same commit
/// cycle as any other write, so a stub never outlives its chunks (a crash can
/// only leave orphan chunks of a batch whose stub was not yet durable, which
/// nothing reads; the offset is then written again and overwrites them).
pub(super) struct SledPartition {
    pub(super) tree: sled::Tree,
    pub(super) chunks: sled::Tree,
}

/// Batch values over this many bytes are stored in chunks.
pub const CHUNKED_OVER: usize = 12 * 1024;
/// Size of one chunk of a large batch.
pub const CHUNK: usize = 8 * 1024;
const STUB_MAGIC: u8 = 0x55;
const STUB_LEN: usize = 14;

fn chunk_key(base: u64, i: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&base.to_be_bytes());
    k[8..].copy_from_slice(&i.to_be_bytes());
    k
}

/// (total length, chunk count) when `v` is a stub.
fn stub(v: &[u8]) -> Option<(u64, u32)> {
    if v.len() != STUB_LEN || v[0] != STUB_MAGIC || v[1] != 1 {
        return None;
    }
    let total = u64::from_le_bytes(v[2..10].try_into().ok()?);
    let count = u32::from_le_bytes(v[10..14].try_into().ok()?);
    Some((total, count))
}

impl SledPartition {
    /// The stored batch under `k`, put back together when it was chunked.
    fn batch(&self, (k, v): (sled::IVec, sled::IVec)) -> Result<StoredBatch> {
        let base = key_offset(&k)?;
        let Some((total, count)) = stub(&v) else {
            return Ok((base, v.to_vec()));
        };
        let broken = |detail: String| Error::Corruption {
            topic: String::from_utf8_lossy(&self.tree.name()).into_owned(),
            partition: 0,
            offset: base,
            detail,
        };
        let total = usize::try_from(total).map_err(|_| broken("chunked batch too large".into()))?;
        let mut out = Vec::with_capacity(total.min(64 * 1024 * 1024));
        let mut seen = 0u32;
        for item in self
            .chunks
            .range(chunk_key(base, 0)..chunk_key(base, count))
        {
            let (_, chunk) = item?;
            out.extend_from_slice(&chunk);
            seen += 1;
        }
        if seen != count || out.len() != total {
            return Err(broken(format!(
                "chunked batch: {seen} of {count} chunks, {} of {total} bytes",
                out.len()
            )));
        }
        Ok((base, out))
    }
}

impl PartitionStore for SledPartition {
    fn insert(&self, base: u64, value: Vec<u8>) -> Result<()> {
        if value.len() <= CHUNKED_OVER {
            self.tree.insert(be(base), value)?;
            return Ok(());
        }
        let mut count = 0u32;
        for (i, chunk) in value.chunks(CHUNK).enumerate() {
            let i = u32::try_from(i).map_err(|_| Error::Config("batch too large".into()))?;
            self.chunks.insert(chunk_key(base, i), chunk)?;
            count = i + 1;
        }
        let mut s = [0u8; STUB_LEN];
        s[0] = STUB_MAGIC;
        s[1] = 1;
        s[2..10].copy_from_slice(&(value.len() as u64).to_le_bytes());
        s[10..14].copy_from_slice(&count.to_le_bytes());
        self.tree.insert(be(base), &s[..])?;
        Ok(())
    }

    fn remove(&self, base: u64) -> Result<()> {
        if let Some(old) = self.tree.remove(be(base))? {
            if let Some((_, count)) = stub(&old) {
                for i in 0..count {
                    self.chunks.remove(chunk_key(base, i))?;
                }
            }
        }
        Ok(())
    }

    fn first(&self) -> Result<Option<StoredBatch>> {
        self.tree.first()?.map(|kv| self.batch(kv)).transpose()
    }

    fn last(&self) -> Result<Option<StoredBatch>> {
        self.tree.last()?.map(|kv| self.batch(kv)).transpose()
    }

    fn read(&self, from: u64, max_bytes: usize) -> Result<Vec<StoredBatch>> {
        let mut out = Vec::new();
        let mut bytes = 0;
        if let Some(item) = self.tree.range(..=be(from)).next_back() {
            let b = self.batch(item?)?;
            bytes += b.1.len();
            out.push(b);
        }
        for item in self.tree.range((Excluded(be(from)), Unbounded)) {
            if bytes >= max_bytes && !out.is_empty() {
                break;
            }
            let b = self.batch(item?)?;
            bytes += b.1.len();
            out.push(b);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{SledOptions, SledStore, Store};

    #[test]
    fn sled_read_starts_at_containing_batch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SledStore::open(dir.path(), &SledOptions::default()).expect("open");
        let p = s.partition("t", 0).expect("partition");
        for base in [0u64, 10, 20, 30] {
            p.insert(base, vec![base as u8; 100]).expect("insert");
        }
        let got: Vec<u64> = p
            .read(15, 150)
            .expect("read")
            .into_iter()
            .map(|b| b.0)
            .collect();
        assert_eq!(got, vec![10, 20]);
        let got: Vec<u64> = p
            .read(20, 1)
            .expect("read")
            .into_iter()
            .map(|b| b.0)
            .collect();
        assert_eq!(got, vec![20]);
        assert_eq!(p.first().expect("first").map(|b| b.0), Some(0));
        assert_eq!(p.last().expect("last").map(|b| b.0), Some(30));
        s.sync().expect("sync");
    }

    #[test]
    fn large_batches_are_chunked_not_blobs_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SledStore::open(dir.path(), &SledOptions::default()).expect("open");
        let p = s.partition("t", 0).expect("partition");
        let big: Vec<u8> = (0..600 * 1024u32).map(|i| (i % 251) as u8).collect();
        p.insert(5, big.clone()).expect("insert");
        p.insert(6, vec![1, 2, 3]).expect("insert small");
        s.sync().expect("sync");
        let blobs = std::fs::read_dir(dir.path().join("blobs")).map_or(0, |d| d.count());
        assert_eq!(blobs, 0, "a chunked batch makes no blob");
        assert_eq!(p.first().expect("first"), Some((5, big.clone())));
        assert_eq!(p.read(5, 1).expect("read")[0], (5, big));
        p.remove(5).expect("remove");
        assert_eq!(p.first().expect("first"), Some((6, vec![1, 2, 3])));
        let chunks = s.db.open_tree("p/t/0/chunks").expect("chunks");
        assert!(
            chunks.is_empty(),
            "removing a chunked batch removes its chunks"
        );
        // A stub whose chunks are missing is corruption, not a panic.
        p.insert(7, vec![9u8; 100 * 1024]).expect("insert");
        chunks.remove(chunk_key(7, 3)).expect("damage");
        assert!(matches!(p.last(), Err(Error::Corruption { offset: 7, .. })));
    }
}
