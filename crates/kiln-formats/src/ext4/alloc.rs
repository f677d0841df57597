//! Block geometry and allocation.
//!
//! kiln writes ext4 with `meta_bg` and `sparse_super` and without `resize_inode`, so every
//! block that is fixed metadata sits at the start of its group, at a position that depends on
//! the group's index alone (group_descr.rst "Meta Block Groups", super.rst "sparse_super"):
//!
//! - a superblock copy in groups 0, 1 and powers of 3, 5 and 7;
//! - a descriptor block in groups 0, 1 and 63 of every run of 64 groups (the primary and its
//!   two backups), right after the superblock copy if the group has one.
//!
//! Alternatives weighed: the classic layout (resize_inode, descriptors after every backup
//! superblock) puts `ceil(groups / 64)` descriptor blocks, plus reserved growth blocks, at the
//! start of groups 0, 1, 3, 5, 7, 9, 25, ... so the data region's holes move whenever the group
//! count changes. sparse_super2 (two backups at recorded groups) would also do; meta_bg is
//! the older of the two (kernel 2.6 era, versus 3.16 for sparse_super2), so more readers
//! implement it.
//!
//! Nothing here depends on how many groups the filesystem ends up with. That is what lets the
//! data region be laid out first, in arrival order, before the tree's totals are known: the
//! allocator walks forward from block 2 and steps over these fixed blocks. Bitmaps, inode
//! tables and other count-dependent metadata go after the data (flex_bg allows them anywhere).

use std::collections::BTreeMap;

use super::layout::{BLOCKS_PER_GROUP, DESCS_PER_BLOCK};

/// True if group `g` holds a superblock copy (sparse_super: 0, 1, 3^k, 5^k, 7^k).
pub fn group_has_super(g: u64) -> bool {
    fn power_of(mut g: u64, base: u64) -> bool {
        while g > 1 && g.is_multiple_of(base) {
            g /= base;
        }
        g == 1
    }
    g <= 1 || power_of(g, 3) || power_of(g, 5) || power_of(g, 7)
}

/// True if group `g` holds a descriptor block of its meta group (first, second, last group).
pub fn group_has_desc(g: u64) -> bool {
    let r = g % DESCS_PER_BLOCK;
    r == 0 || r == 1 || r == DESCS_PER_BLOCK - 1
}

/// Number of fixed metadata blocks at the start of group `g`.
pub fn reserved_blocks(g: u64) -> u64 {
    u64::from(group_has_super(g)) + u64::from(group_has_desc(g))
}

/// Block of the descriptor copy in group `g` (which must have one).
pub fn desc_block_in_group(g: u64) -> u64 {
    g * BLOCKS_PER_GROUP + u64::from(group_has_super(g))
}

/// The allocation cursor ran into the end of a fixed-size filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// A block allocator that steps over the fixed metadata blocks and records what it handed
/// out as sorted, merged ranges.
///
/// It allocates at a cursor. Packed layouts only ever move the cursor forward, so every
/// allocation lands after the previous one. Stable layouts [`seek`](Allocator::seek) to a hint
/// before each object and let the search wrap round to block 2: an allocation then takes the
/// first free gap at or after its hint.
#[derive(Clone, Debug)]
pub struct Allocator {
    cursor: u64,
    limit: u64,
    /// Used ranges, start to length, merged when adjacent.
    used: BTreeMap<u64, u64>,
    /// Searches that reach the limit go on from block 2 (stable layouts).
    wrap: bool,
}

impl Allocator {
    /// An allocator whose first block is 2 (after the superblock and group 0's descriptors),
    /// refusing to hand out blocks at or beyond `limit`.
    pub fn new(limit: u64) -> Self {
        Self {
            cursor: 2,
            limit,
            used: BTreeMap::new(),
            wrap: false,
        }
    }

    /// The next block the allocator would consider.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Changes the limit (used when the final size is decided after the data is placed).
    pub fn set_limit(&mut self, limit: u64) {
        self.limit = limit;
    }

    /// Lets searches that reach the limit go on from block 2.
    pub fn set_wrap(&mut self, wrap: bool) {
        self.wrap = wrap;
    }

    /// Moves the cursor to `b` (at least block 2): the next allocation takes the first free
    /// gap from there.
    pub fn seek(&mut self, b: u64) {
        self.cursor = b.max(2);
    }

    /// Blocks handed out, as sorted non-overlapping `(start, len)` ranges.
    pub fn used(&self) -> Vec<(u64, u64)> {
        self.used.iter().map(|(&s, &l)| (s, l)).collect()
    }

    /// Total blocks handed out.
    pub fn used_blocks(&self) -> u64 {
        self.used.values().sum()
    }

    fn skip_reserved(b: u64) -> u64 {
        let g = b / BLOCKS_PER_GROUP;
        let r = reserved_blocks(g);
        if b % BLOCKS_PER_GROUP < r {
            g * BLOCKS_PER_GROUP + r
        } else {
            b
        }
    }

    /// The first block at or after `b` that is fixed metadata.
    fn next_reserved(b: u64) -> u64 {
        let mut g = b / BLOCKS_PER_GROUP + 1;
        while reserved_blocks(g) == 0 {
            g += 1;
        }
        g * BLOCKS_PER_GROUP
    }

    /// The first block at or after `b` that is neither fixed metadata nor handed out.
    fn first_free(&self, mut b: u64) -> u64 {
        loop {
            let s = Self::skip_reserved(b);
            match self.used.range(..=s).next_back() {
                Some((&us, &ul)) if us + ul > s => b = us + ul,
                _ => return s,
            }
        }
    }

    /// End of the free gap starting at the free block `s`: the next fixed metadata or the
    /// next used range, whichever comes first (the limit is the caller's to apply).
    fn gap_end(&self, s: u64) -> u64 {
        let used = self
            .used
            .range(s + 1..)
            .next()
            .map_or(u64::MAX, |(&k, _)| k);
        Self::next_reserved(s).min(used)
    }

    /// The first free gap at or after the cursor, wrapping round once if allowed: `(start,
    /// end)`. `wrapped` says whether the search already wrapped.
    fn gap_from(&self, b: u64, wrapped: &mut bool) -> Result<(u64, u64), Full> {
        let mut s = self.first_free(b);
        if s >= self.limit {
            if !self.wrap || *wrapped {
                return Err(Full);
            }
            *wrapped = true;
            s = self.first_free(2);
            if s >= self.limit {
                return Err(Full);
            }
        }
        Ok((s, self.gap_end(s)))
    }

    fn take(&mut self, start: u64, len: u64) -> Result<(), Full> {
        if start + len > self.limit {
            return Err(Full);
        }
        self.cursor = start + len;
        let mut len = len;
        if let Some(next) = self.used.remove(&(start + len)) {
            len += next;
        }
        match self.used.range_mut(..start).next_back() {
            Some((&ps, pl)) if ps + *pl == start => *pl += len,
            _ => {
                self.used.insert(start, len);
            }
        }
        Ok(())
    }

    /// Returns `len` blocks at `start` to free space (data a stream placed for an entry that
    /// was later replaced). The cursor does not move back.
    pub fn free(&mut self, start: u64, len: u64) {
        let end = start + len;
        let hit: Vec<(u64, u64)> = self
            .used
            .range(..end)
            .rev()
            .take_while(|(&s, &l)| s + l > start)
            .map(|(&s, &l)| (s, l))
            .collect();
        for (s, l) in hit {
            self.used.remove(&s);
            if s < start {
                self.used.insert(s, start - s);
            }
            if s + l > end {
                self.used.insert(end, s + l - end);
            }
        }
    }

    /// The block the next [`Allocator::run`] starts at.
    pub fn next_start(&self) -> u64 {
        self.first_free(self.cursor)
    }

    /// Allocates up to `max` (> 0) contiguous blocks at the cursor, fewer if fixed metadata
    /// or used blocks interrupt the run. Returns `(start, len)`.
    pub fn run(&mut self, max: u64) -> Result<(u64, u64), Full> {
        let (start, mut end) = self.gap_from(self.cursor, &mut false)?;
        if self.wrap {
            // A run that would cross the limit stops there; the next one wraps round.
            end = end.min(self.limit);
        }
        let len = max.min(end - start);
        self.take(start, len)?;
        Ok((start, len))
    }

    /// Allocates exactly `n` contiguous blocks in the first gap at or after the cursor that
    /// holds them, leaving smaller gaps free. Returns the first block.
    pub fn contiguous(&mut self, n: u64) -> Result<u64, Full> {
        let origin = self.cursor;
        let mut wrapped = false;
        let (mut start, mut end) = self.gap_from(origin, &mut wrapped)?;
        loop {
            if wrapped && start >= origin {
                return Err(Full);
            }
            if end.min(self.limit) - start >= n {
                self.take(start, n)?;
                return Ok(start);
            }
            if end >= self.limit && !self.wrap {
                return Err(Full);
            }
            (start, end) = self.gap_from(end, &mut wrapped)?;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sparse_super_and_meta_bg_positions() {
        let supers: Vec<u64> = (0..130).filter(|&g| group_has_super(g)).collect();
        assert_eq!(supers, [0, 1, 3, 5, 7, 9, 25, 27, 49, 81, 125]);
        let descs: Vec<u64> = (0..130).filter(|&g| group_has_desc(g)).collect();
        assert_eq!(descs, [0, 1, 63, 64, 65, 127, 128, 129]);
        assert_eq!(reserved_blocks(0), 2);
        assert_eq!(reserved_blocks(2), 0);
        assert_eq!(reserved_blocks(3), 1);
        assert_eq!(desc_block_in_group(1), BLOCKS_PER_GROUP + 1);
        assert_eq!(desc_block_in_group(63), 63 * BLOCKS_PER_GROUP);
    }

    #[test]
    fn runs_step_over_fixed_metadata() {
        let mut a = Allocator::new(u64::MAX);
        let (s, l) = a.run(100_000).unwrap();
        assert_eq!((s, l), (2, BLOCKS_PER_GROUP - 2));
        // Group 1 starts with a superblock copy and a descriptor block.
        let (s, l) = a.run(10).unwrap();
        assert_eq!((s, l), (BLOCKS_PER_GROUP + 2, 10));
        // Group 2 has nothing fixed: a run flows from group 1 into group 2 and stops at 3.
        let (s, l) = a.run(1 << 20).unwrap();
        assert_eq!(s, BLOCKS_PER_GROUP + 12);
        assert_eq!(s + l, 3 * BLOCKS_PER_GROUP);
        // Contiguous allocations skip to where they fit.
        let mut a = Allocator::new(u64::MAX);
        a.run(BLOCKS_PER_GROUP - 10).unwrap();
        let s = a.contiguous(100).unwrap();
        assert_eq!(s, BLOCKS_PER_GROUP + 2);
        assert_eq!(
            a.used(),
            &[(2, BLOCKS_PER_GROUP - 10), (BLOCKS_PER_GROUP + 2, 100)]
        );
        let mut a = Allocator::new(50);
        assert_eq!(a.run(100), Err(Full));
    }

    #[test]
    fn stable_searches_take_the_first_gap_from_the_hint_and_wrap() {
        let mut a = Allocator::new(1000);
        a.set_wrap(true);
        a.seek(500);
        assert_eq!(a.contiguous(100), Ok(500));
        // 450..500 is too small for 100 blocks: the next gap that holds them.
        a.seek(450);
        assert_eq!(a.contiguous(100), Ok(600));
        // A run takes what the gap holds.
        a.seek(450);
        assert_eq!(a.run(100), Ok((450, 50)));
        // Past the end, the search goes on from block 2.
        a.seek(950);
        assert_eq!(a.contiguous(100), Ok(2));
        assert_eq!(a.used(), vec![(2, 100), (450, 250)]);
        // A run stops at the limit rather than failing.
        a.seek(990);
        assert_eq!(a.run(100), Ok((990, 10)));
        a.free(460, 10);
        assert_eq!(a.used(), vec![(2, 100), (450, 10), (470, 230), (990, 10)]);
        // Freed blocks are found again; nothing holds 700 contiguous blocks.
        a.seek(0);
        assert_eq!(a.contiguous(10), Ok(102));
        a.seek(455);
        assert_eq!(a.contiguous(10), Ok(460));
        assert_eq!(a.contiguous(700), Err(Full));
        assert_eq!(a.used_blocks(), 100 + 250 + 10 + 10);
    }
}
