//! How a regular file's data is stored ([`Store`], [`Tail`]), and the rules that decide it from
//! a file's size and runs alone: which tails go inline, which files are chunk-based and with
//! which chunk size. The data pipeline applies them when it places a file, the metadata side
//! when it sizes inodes and bounds a compressed image.

use super::{blocks_of, INLINE_MAX};
use crate::erofs::layout::*;
use crate::fstree::{FileData, Segment};

/// A file's last partial block.
#[derive(Clone, Debug)]
pub(super) enum Tail {
    /// No partial block, or it is stored as a full block after the others.
    InBlocks,
    /// Packed after the inode: the bytes, or `None` to read them from the source.
    Inline(Option<Box<[u8]>>),
}

/// How a regular file's data is stored.
#[derive(Clone, Debug)]
pub(super) enum Store {
    Empty,
    Flat {
        blkaddr: u64,
        size: u64,
        tail: Tail,
    },
    Chunked {
        size: u64,
        chunkbits: u8,
        map: Vec<u32>,
    },
    Compressed {
        size: u64,
        indexes: Vec<LclusterIndex>,
        blocks: u64,
    },
}

pub(super) fn tail_inline(size: u64) -> bool {
    let t = size % BLOCK;
    t != 0 && t <= INLINE_MAX
}

/// Chunk plan for a sparse file: chunk bits and, per chunk, whether it holds data.
pub(super) fn chunk_plan(size: u64, runs: &[Segment]) -> (u8, Vec<bool>) {
    let mut best: Option<(u64, u8)> = None;
    for cb in 0u8..=20 {
        let csize = BLOCK << cb;
        let n = size.div_ceil(csize);
        let mut data_blocks = 0u64;
        let mut last: Option<u64> = None;
        for r in runs.iter().filter(|r| r.len > 0) {
            let first = r.offset / csize;
            let end = (r.offset + r.len - 1) / csize;
            for c in first..=end {
                if last.is_some_and(|l| l >= c) {
                    continue;
                }
                last = Some(c);
                data_blocks += blocks_of((size - c * csize).min(csize));
            }
        }
        let cost = data_blocks * BLOCK + 4 * n;
        if best.is_none_or(|(b, _)| cost < b) {
            best = Some((cost, cb));
        }
    }
    let cb = best.map(|b| b.1).unwrap_or(0);
    let csize = BLOCK << cb;
    let mut has = vec![false; size.div_ceil(csize) as usize];
    for r in runs.iter().filter(|r| r.len > 0) {
        for c in r.offset / csize..=(r.offset + r.len - 1) / csize {
            if let Some(h) = has.get_mut(c as usize) {
                *h = true;
            }
        }
    }
    (cb, has)
}

/// True when a file is stored chunk-based, its holes as null chunks: every sparse file of an
/// uncompressed image; in a compressed image, a sparse file whose holes are at least half of
/// it. Below that its zeroes are compressed with the rest (LZ4 turns a zero block into a few
/// bytes), rather than giving up compression for its data. The rule reads only the file's
/// size and runs, so every source of the same content decides alike.
pub(super) fn chunked(compressed: bool, f: &FileData) -> bool {
    f.segments.is_some() && (!compressed || f.stored_len().saturating_mul(2) <= f.size)
}

/// Data blocks of chunk `c` of a chunked file.
pub(super) fn chunk_blocks(size: u64, cb: u8, c: u64) -> u64 {
    let csize = BLOCK << cb;
    blocks_of((size - c * csize).min(csize))
}
