//! How keys are laid out in the backends' trees: batch keys (a base offset,
//! big-endian, so trees sort by offset), partition floor keys, consumer-group
//! offset keys (`group NUL topic NUL partition`, scanned by group prefix) and
//! metadata keys (`space NUL key`, scanned by space prefix). [`SledStore`] and
//! [`MemStore`] share them, so both backends order and filter alike.
//!
//! [`SledStore`]: super::SledStore
//! [`MemStore`]: super::MemStore

use crate::error::{Error, Result};

pub(super) fn be(offset: u64) -> [u8; 8] {
    offset.to_be_bytes()
}

pub(super) fn key_offset(key: &[u8]) -> Result<u64> {
    let arr: [u8; 8] = key.try_into().map_err(|_| {
        Error::Io(std::io::Error::other(format!(
            "batch key of {} bytes",
            key.len()
        )))
    })?;
    Ok(u64::from_be_bytes(arr))
}

pub(super) fn group_key(group: &str, topic: &str, partition: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(group.len() + topic.len() + 6);
    k.extend_from_slice(group.as_bytes());
    k.push(0);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

/// The group a group-offset key belongs to.
pub(super) fn group_of_key(key: &[u8]) -> Option<&str> {
    let end = key.iter().position(|&b| b == 0)?;
    std::str::from_utf8(&key[..end]).ok()
}

/// The topic a group-offset key names (`group NUL topic NUL partition`).
pub(super) fn topic_of_group_key(key: &[u8]) -> Option<&[u8]> {
    let start = key.iter().position(|&b| b == 0)? + 1;
    let end = key.len().checked_sub(5)?;
    (start <= end && key[end] == 0).then(|| &key[start..end])
}

/// The names of a partition's trees in sled: `p/TOPIC/N` (and
/// `p/TOPIC/N/chunks`); topic names have no `/`, so `p/TOPIC/` prefixes
/// exactly one topic's.
pub(super) fn partition_tree_prefix(topic: &str) -> String {
    format!("p/{topic}/")
}

/// The topic a partition tree belongs to.
pub(super) fn topic_of_tree(name: &[u8]) -> Option<&str> {
    let rest = name.strip_prefix(b"p/")?;
    let end = rest.iter().position(|&b| b == b'/')?;
    std::str::from_utf8(&rest[..end]).ok()
}

pub(super) fn meta_key(space: &str, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(space.len() + 1 + key.len());
    k.extend_from_slice(space.as_bytes());
    k.push(0);
    k.extend_from_slice(key);
    k
}

/// A group position's stored value: the offset (8 bytes, big-endian),
/// then the commit's metadata (none: the value is the offset alone, as
/// every position was stored before metadata was kept).
pub(super) fn group_value(offset: u64, metadata: &[u8]) -> Vec<u8> {
    [&be(offset)[..], metadata].concat()
}

pub(super) fn parse_group_key(
    group: &str,
    key: &[u8],
    value: &[u8],
) -> Option<super::GroupPosition> {
    let rest = key.strip_prefix(group.as_bytes())?.strip_prefix(&[0])?;
    let (topic, part) = rest.split_at(rest.len().checked_sub(5)?);
    let part = part.strip_prefix(&[0])?;
    let partition = u32::from_be_bytes(part.try_into().ok()?);
    let (offset, metadata) = value.split_at_checked(8)?;
    let offset = u64::from_be_bytes(offset.try_into().ok()?);
    Some((
        String::from_utf8(topic.to_vec()).ok()?,
        partition,
        offset,
        metadata.to_vec(),
    ))
}

/// (space, key) of a metadata key.
pub(super) fn split_meta_key(k: &[u8]) -> Option<(&str, &[u8])> {
    let at = k.iter().position(|&b| b == 0)?;
    Some((std::str::from_utf8(&k[..at]).ok()?, &k[at + 1..]))
}

/// (topic, partition) of a floor key.
pub(super) fn parse_floor_key(k: &[u8]) -> Option<(String, u32)> {
    let (topic, part) = k.split_at(k.len().checked_sub(5)?);
    let part = part.strip_prefix(&[0])?;
    Some((
        String::from_utf8(topic.to_vec()).ok()?,
        u32::from_be_bytes(part.try_into().ok()?),
    ))
}

pub(super) fn floor_key(topic: &str, partition: u32) -> Vec<u8> {
    let mut k = topic.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

#[cfg(test)]
mod tests {
    use crate::store::{MemStore, Store};

    #[test]
    fn group_keys_round_trip_and_do_not_leak_across_groups() {
        let s = MemStore::new();
        s.put_group_offset("g", "t.a", 3, 42, b"").expect("put");
        s.put_group_offset("g2", "t", 0, 7, b"").expect("put");
        s.put_group_offset("g", "t", 0, 1, b"meta").expect("put");
        let mut got = s.group_offsets("g").expect("get");
        got.sort();
        assert_eq!(
            got,
            vec![
                ("t".to_owned(), 0, 1, b"meta".to_vec()),
                ("t.a".to_owned(), 3, 42, Vec::new())
            ]
        );
    }

    #[test]
    fn a_group_key_names_its_topic_whatever_the_partition_bytes() {
        use super::{group_key, topic_of_group_key, topic_of_tree};
        for partition in [0, 1, 256, u32::MAX] {
            let k = group_key("g", "t.a", partition);
            assert_eq!(topic_of_group_key(&k), Some(&b"t.a"[..]));
        }
        assert_eq!(topic_of_group_key(b"g"), None);
        assert_eq!(topic_of_tree(b"p/t.a/3/chunks"), Some("t.a"));
        assert_eq!(topic_of_tree(b"__topics"), None);
    }
}
