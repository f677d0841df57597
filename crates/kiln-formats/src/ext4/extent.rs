//! Extent trees (kernel Documentation/filesystems/ext4/ifork.rst): the root lives in the
//! inode's 60-byte `i_block` (header + 4 entries); more than 4 extents spill into tree blocks
//! of 340 entries each, with a crc32c tail seeded by the owning inode.

use zerocopy::little_endian::{U16, U32};
use zerocopy::IntoBytes;

use super::csum::crc32c_raw;
use super::layout::{
    Extent, ExtentHeader, ExtentIdx, BS, EXTENTS_IN_INODE, EXTENTS_PER_BLOCK, EXTENT_MAGIC,
    EXT_INIT_MAX_LEN,
};

/// One mapping: logical blocks `lblk..lblk + len` at physical blocks `pblk..pblk + len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ext {
    /// First logical block.
    pub lblk: u32,
    /// Length in blocks (at most 32768, or 32767 when unwritten).
    pub len: u32,
    /// First physical block.
    pub pblk: u64,
    /// Allocated but reading as zeroes (`fallocate` style).
    pub unwritten: bool,
}

impl Ext {
    /// The on-disk leaf entry.
    pub fn raw(&self) -> Extent {
        let len = if self.unwritten {
            self.len + EXT_INIT_MAX_LEN
        } else {
            self.len
        };
        Extent {
            block: U32::new(self.lblk),
            len: U16::new(len as u16),
            start_hi: U16::new((self.pblk >> 32) as u16),
            start_lo: U32::new(self.pblk as u32),
        }
    }

    /// Decodes an on-disk leaf entry.
    pub fn from_raw(e: &Extent) -> Self {
        let raw = u32::from(e.len.get());
        let (len, unwritten) = if raw > EXT_INIT_MAX_LEN {
            (raw - EXT_INIT_MAX_LEN, true)
        } else {
            (raw, false)
        };
        Ext {
            lblk: e.block.get(),
            len,
            pblk: u64::from(e.start_lo.get()) | u64::from(e.start_hi.get()) << 32,
            unwritten,
        }
    }
}

/// Tree blocks needed to map `n` extents (0 when they fit in the inode).
pub fn tree_blocks(n: usize) -> u64 {
    let mut total = 0u64;
    let mut level = n;
    while level > EXTENTS_IN_INODE {
        let blocks = level.div_ceil(EXTENTS_PER_BLOCK);
        total += blocks as u64;
        level = blocks;
    }
    total
}

fn header(entries: usize, max: usize, depth: u16) -> ExtentHeader {
    ExtentHeader {
        magic: U16::new(EXTENT_MAGIC),
        entries: U16::new(entries as u16),
        max: U16::new(max as u16),
        depth: U16::new(depth),
        generation: U32::new(0),
    }
}

/// Builds the inode's `i_block` and the tree blocks (`tree_blocks(exts.len())` of them, to
/// be written at `first_tree_block` onwards). `seed` is the inode's checksum seed.
pub fn build(exts: &[Ext], first_tree_block: u64, seed: u32) -> ([u8; 60], Vec<u8>) {
    // Items of the current level: (first logical block, 12 entry bytes).
    let mut items: Vec<(u32, [u8; 12])> = exts
        .iter()
        .map(|e| {
            let mut b = [0u8; 12];
            b.copy_from_slice(e.raw().as_bytes());
            (e.lblk, b)
        })
        .collect();
    let mut blocks = Vec::new();
    let mut depth = 0u16;
    let mut next = first_tree_block;
    while items.len() > EXTENTS_IN_INODE {
        let mut up = Vec::with_capacity(items.len().div_ceil(EXTENTS_PER_BLOCK));
        for chunk in items.chunks(EXTENTS_PER_BLOCK) {
            let mut b = vec![0u8; BS];
            b[..12].copy_from_slice(header(chunk.len(), EXTENTS_PER_BLOCK, depth).as_bytes());
            for (i, (_, e)) in chunk.iter().enumerate() {
                b[12 + 12 * i..24 + 12 * i].copy_from_slice(e);
            }
            let tail_at = 12 + 12 * EXTENTS_PER_BLOCK;
            let c = crc32c_raw(seed, &b[..tail_at]);
            b[tail_at..tail_at + 4].copy_from_slice(&c.to_le_bytes());
            blocks.extend_from_slice(&b);
            let idx = ExtentIdx {
                block: U32::new(chunk[0].0),
                leaf_lo: U32::new(next as u32),
                leaf_hi: U16::new((next >> 32) as u16),
                unused: U16::new(0),
            };
            let mut ib = [0u8; 12];
            ib.copy_from_slice(idx.as_bytes());
            up.push((chunk[0].0, ib));
            next += 1;
        }
        items = up;
        depth += 1;
    }
    let mut root = [0u8; 60];
    root[..12].copy_from_slice(header(items.len(), EXTENTS_IN_INODE, depth).as_bytes());
    for (i, (_, e)) in items.iter().enumerate() {
        root[12 + 12 * i..24 + 12 * i].copy_from_slice(e);
    }
    (root, blocks)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn tree_sizes() {
        assert_eq!(tree_blocks(0), 0);
        assert_eq!(tree_blocks(4), 0);
        assert_eq!(tree_blocks(5), 1);
        assert_eq!(tree_blocks(340 * 4), 4);
        assert_eq!(tree_blocks(340 * 4 + 1), 5 + 1);
    }

    #[test]
    fn build_shapes() {
        let exts: Vec<Ext> = (0..10)
            .map(|i| Ext {
                lblk: i * 2,
                len: 1,
                pblk: 100 + u64::from(i) * 2,
                unwritten: false,
            })
            .collect();
        let (root, blocks) = build(&exts, 7, 0);
        assert_eq!(blocks.len(), BS);
        assert_eq!(u16::from_le_bytes([root[6], root[7]]), 1, "depth 1");
        assert_eq!(
            u32::from_le_bytes([root[16], root[17], root[18], root[19]]),
            7
        );
        let (root, blocks) = build(&exts[..3], 7, 0);
        assert!(blocks.is_empty());
        assert_eq!(u16::from_le_bytes([root[2], root[3]]), 3);
        let u = Ext {
            lblk: 0,
            len: 5,
            pblk: 9,
            unwritten: true,
        };
        assert_eq!(Ext::from_raw(&u.raw()), u);
    }
}
