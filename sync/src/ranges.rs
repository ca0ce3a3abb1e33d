//! A small set of disjoint, sorted offset ranges: which offsets of an edge
//! partition the core holds. With live data going first there are at most a
//! few ranges (one per lane opened while a backlog drained), so a sorted
//! `Vec` is the right shape.

/// Disjoint, non-adjacent half-open ranges `[start, end)`, sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet(Vec<(u64, u64)>);

impl RangeSet {
    /// An empty set.
    pub fn new() -> Self {
        RangeSet(Vec::new())
    }

    /// A set from any list of ranges (merged and sorted; empty ones dropped).
    pub fn from_ranges(ranges: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut set = RangeSet::new();
        for (a, b) in ranges {
            set.insert(a, b);
        }
        set
    }

    /// The ranges, sorted.
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.0
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when no offset is held.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds `[start, end)`, merging with touching or overlapping ranges.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        // First range that ends at or after `start` (could merge with it).
        let i = self.0.partition_point(|&(_, e)| e < start);
        let mut j = i;
        let (mut s, mut e) = (start, end);
        while j < self.0.len() && self.0[j].0 <= e {
            s = s.min(self.0[j].0);
            e = e.max(self.0[j].1);
            j += 1;
        }
        self.0.splice(i..j, [(s, e)]);
    }

    /// Is `offset` held?
    pub fn contains(&self, offset: u64) -> bool {
        let i = self.0.partition_point(|&(_, e)| e <= offset);
        self.0.get(i).is_some_and(|&(s, _)| s <= offset)
    }

    /// May a lane go on from `offset`: is it held, or the end of a held
    /// range (or 0, where every partition starts)?
    pub fn continues_at(&self, offset: u64) -> bool {
        offset == 0 || self.0.iter().any(|&(s, e)| s <= offset && offset <= e)
    }

    /// The end of the highest range that starts at or below `offset` (0 when
    /// none): where a lane that wants to write `offset` should have gone on.
    pub fn expected_below(&self, offset: u64) -> u64 {
        self.0
            .iter()
            .rev()
            .find(|&&(s, _)| s <= offset)
            .map_or(0, |&(_, e)| e)
    }

    /// The parts of `[start, end)` not held, in order.
    pub fn missing(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = start;
        for &(s, e) in &self.0 {
            if e <= at {
                continue;
            }
            if s >= end {
                break;
            }
            if s > at {
                out.push((at, s.min(end)));
            }
            at = at.max(e);
            if at >= end {
                break;
            }
        }
        if at < end {
            out.push((at, end));
        }
        out
    }

    /// The first offset at or after `from` that is not held.
    pub fn next_missing(&self, from: u64) -> u64 {
        let i = self.0.partition_point(|&(_, e)| e <= from);
        match self.0.get(i) {
            Some(&(s, e)) if s <= from => e,
            _ => from,
        }
    }

    /// How many offsets below `end` are held.
    pub fn count_below(&self, end: u64) -> u64 {
        self.0
            .iter()
            .map(|&(s, e)| e.min(end).saturating_sub(s))
            .sum()
    }

    /// The end of the range that starts at 0 (everything below it is held).
    pub fn prefix(&self) -> u64 {
        match self.0.first() {
            Some(&(0, e)) => e,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_merges_touching_and_overlapping_ranges() {
        let mut s = RangeSet::new();
        s.insert(10, 20);
        s.insert(30, 40);
        assert_eq!(s.ranges(), &[(10, 20), (30, 40)]);
        s.insert(20, 25);
        assert_eq!(s.ranges(), &[(10, 25), (30, 40)]);
        s.insert(24, 31);
        assert_eq!(s.ranges(), &[(10, 40)]);
        s.insert(0, 5);
        s.insert(50, 60);
        s.insert(3, 55);
        assert_eq!(s.ranges(), &[(0, 60)]);
        s.insert(7, 7);
        assert_eq!(s.ranges(), &[(0, 60)]);
        assert_eq!(
            RangeSet::from_ranges([(5, 6), (0, 2), (2, 5)]).ranges(),
            &[(0, 6)]
        );
    }

    #[test]
    fn queries_agree_with_a_bitmap() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..500 {
            let mut set = RangeSet::new();
            let mut bits = [false; 64];
            for _ in 0..rng.usize(0..6) {
                let a = rng.u64(0..64);
                let b = rng.u64(a..=64);
                set.insert(a, b);
                for bit in &mut bits[a as usize..b as usize] {
                    *bit = true;
                }
            }
            for w in set.ranges().windows(2) {
                assert!(w[0].1 < w[1].0, "disjoint, non-adjacent, sorted: {set:?}");
            }
            for (o, &held) in bits.iter().enumerate() {
                assert_eq!(set.contains(o as u64), held, "{set:?} @ {o}");
            }
            let (a, b) = (rng.u64(0..64), rng.u64(0..=64));
            let missing: Vec<u64> = set.missing(a, b).iter().flat_map(|&(s, e)| s..e).collect();
            let want: Vec<u64> = (a..b).filter(|&o| !bits[o as usize]).collect();
            assert_eq!(missing, want, "{set:?} missing in {a}..{b}");
            let next = (a..64).find(|&o| !bits[o as usize]).unwrap_or(64);
            assert_eq!(set.next_missing(a), next, "{set:?} next_missing({a})");
            let below = bits[..b as usize].iter().filter(|&&x| x).count() as u64;
            assert_eq!(set.count_below(b), below);
        }
    }

    #[test]
    fn lanes_continue_only_where_a_range_ends_or_inside_one() {
        let set = RangeSet::from_ranges([(0, 10), (20, 30)]);
        for o in [0, 5, 10, 20, 25, 30] {
            assert!(set.continues_at(o), "{o}");
        }
        for o in [11, 19, 31] {
            assert!(!set.continues_at(o), "{o}");
        }
        assert_eq!(set.expected_below(15), 10);
        assert_eq!(set.expected_below(35), 30);
        assert_eq!(RangeSet::new().expected_below(9), 0);
        assert!(RangeSet::new().continues_at(0));
        assert_eq!(set.prefix(), 10);
        assert_eq!(RangeSet::from_ranges([(3, 9)]).prefix(), 0);
    }
}
