//! The metadata allocator. Once every regular file's data is stored, each inode's shape is
//! known ([`Laid`]: core, xattrs, and an inline tail, chunk map or index array after them);
//! [`MetaAlloc`] places inodes first-fit in the meta area so that no inode core and no inline
//! tail crosses a block, and the tail area after it gets directory blocks and long symlink
//! targets. [`MetaLayout`] is the result; `meta_write.rs` writes it. The size bound of a
//! compressed image, before anything is compressed, is computed here too.

use super::meta::{node_path, MetaPrep};
use super::store::{chunk_blocks, chunk_plan, chunked, tail_inline, Store, Tail};
use super::{block_u32, blocks_of, Error, INLINE_MAX, UNIT};
use crate::erofs::compact;
use crate::erofs::layout::*;
use crate::fstree::{NodeId, NodeKind, Tree};

/// A metadata item's size and placement constraints.
#[derive(Clone, Copy, Debug)]
pub(super) struct ItemShape {
    /// Inode core size (32 or 64).
    isize: u64,
    /// Bytes before the payload: inode, xattrs and (compressed) alignment + map header.
    pub(super) head: u64,
    /// Payload bytes: inline tail, chunk map or index array.
    extra: u64,
    /// The payload is an inline tail and must not cross a block.
    pub(super) tail: bool,
}

impl ItemShape {
    fn total(&self) -> u64 {
        self.head + self.extra
    }

    fn fits(&self, off: u64) -> bool {
        off % BLOCK + self.isize <= BLOCK
            && (!self.tail || (off + self.head) % BLOCK + self.extra <= BLOCK)
    }
}

/// First-fit allocator for the metadata area, remembering the holes alignment leaves.
#[derive(Default)]
struct MetaAlloc {
    end: u64,
    gaps: Vec<(u64, u64)>,
}

const MAX_GAPS: usize = 256;

impl MetaAlloc {
    fn alloc(&mut self, it: &ItemShape) -> Option<u64> {
        let total = it.total();
        for g in 0..self.gaps.len() {
            let (s, e) = self.gaps[g];
            let mut off = s;
            for _ in 0..4 {
                if off + total > e || it.fits(off) {
                    break;
                }
                off = self.adjust(off, it);
            }
            if off + total <= e && it.fits(off) {
                let after = round_up(off + total, ISLOT);
                let mut repl = Vec::new();
                if off > s {
                    repl.push((s, off));
                }
                if after < e {
                    repl.push((after, e));
                }
                self.gaps.splice(g..g + 1, repl);
                return Some(off);
            }
        }
        let mut off = self.end;
        let mut tries = 0;
        while !it.fits(off) {
            off = self.adjust(off, it);
            tries += 1;
            if tries > 16 {
                return None;
            }
        }
        if off > self.end {
            self.gaps.push((self.end, off));
            if self.gaps.len() > MAX_GAPS {
                // Forget the smallest hole (ties: the earliest), deterministically.
                if let Some(i) =
                    (0..self.gaps.len()).min_by_key(|&i| self.gaps[i].1 - self.gaps[i].0)
                {
                    self.gaps.remove(i);
                }
            }
        }
        self.end = round_up(off + total, ISLOT);
        Some(off)
    }

    fn adjust(&self, off: u64, it: &ItemShape) -> u64 {
        if off % BLOCK + it.isize > BLOCK {
            return round_up(off + 1, BLOCK);
        }
        // Move so the tail starts just after the next block boundary.
        let b = (off + it.head) / BLOCK * BLOCK + BLOCK;
        round_up(b - it.head, ISLOT).max(off + ISLOT)
    }
}

/// The data layout and payload of one inode, once stores and tail blocks are known.
pub(super) struct Laid {
    pub(super) shape: ItemShape,
    pub(super) layout: u8,
    pub(super) i_u: u32,
    pub(super) size: u64,
    /// A compressed file's compacted index array, when its clusters allow one.
    pub(super) compact: Option<Vec<u8>>,
}

pub(super) struct MetaLayout {
    /// Offset of each node's inode in the metadata area (by walk position).
    pub(super) offsets: Vec<u64>,
    pub(super) laid: Vec<Laid>,
    pub(super) shared_blkaddr: u64,
    pub(super) meta_blkaddr: u64,
    pub(super) meta_blocks: u64,
    /// First block of the tail area and, per walk position, the block of its tail-area data.
    pub(super) tail_blocks: Vec<Option<u64>>,
    pub(super) total_blocks: u64,
}

impl MetaPrep {
    /// Data layout, payload shape and `i_u` of a node, given its store.
    fn laid(&self, tree: &Tree, id: NodeId, store: Option<&Store>) -> Result<Laid, Error> {
        let p = self.prep(id)?;
        let isize = if p.extended { 64 } else { 32 };
        let base = isize + p.xattrs.len() as u64;
        let flat = |size: u64, blkaddr: u64, inline: bool| -> Result<Laid, Error> {
            Ok(Laid {
                shape: ItemShape {
                    isize,
                    head: base,
                    extra: if inline { size % BLOCK } else { 0 },
                    tail: inline,
                },
                layout: if inline {
                    datalayout::FLAT_INLINE
                } else {
                    datalayout::FLAT_PLAIN
                },
                i_u: block_u32(blkaddr, "data")?,
                size,
                compact: None,
            })
        };
        let node = tree.node(id);
        match &node.kind {
            NodeKind::File(_) => match store {
                None | Some(Store::Empty) => flat(0, 0, false),
                Some(Store::Flat {
                    blkaddr,
                    size,
                    tail,
                }) => flat(*size, *blkaddr, matches!(tail, Tail::Inline(_))),
                Some(Store::Chunked {
                    size,
                    chunkbits,
                    map,
                }) => Ok(Laid {
                    shape: ItemShape {
                        isize,
                        head: base,
                        extra: 4 * map.len() as u64,
                        tail: false,
                    },
                    layout: datalayout::CHUNK_BASED,
                    i_u: u32::from(*chunkbits),
                    size: *size,
                    compact: None,
                }),
                Some(Store::Compressed {
                    size,
                    indexes,
                    blocks,
                }) => {
                    // Compacted indexes (2 to 4 bytes per logical cluster) where they can
                    // express the file, as mkfs.erofs does; the full form (8 bytes) otherwise.
                    // Inodes are 32-byte aligned, so the array's alignment is known here.
                    let hdr = round_up(base, 8);
                    let compact = compact::encode(indexes, *size, hdr + MAP_HEADER);
                    let (head, extra, layout) = match &compact {
                        Some(c) => (
                            hdr + MAP_HEADER,
                            c.len() as u64,
                            datalayout::COMPRESSED_COMPACT,
                        ),
                        None => (
                            hdr + FULL_INDEX_HEADER,
                            8 * indexes.len() as u64,
                            datalayout::COMPRESSED_FULL,
                        ),
                    };
                    Ok(Laid {
                        shape: ItemShape {
                            isize,
                            head,
                            extra,
                            tail: false,
                        },
                        layout,
                        i_u: block_u32(*blocks, "compressed block count")?,
                        size: *size,
                        compact,
                    })
                }
            },
            // Directories and long symlinks get their blkaddr once the tail area is placed.
            NodeKind::Dir(_) => {
                let size = self.dirs.get(&id).map_or(0, |d| d.size);
                flat(size, 0, tail_inline(size))
            }
            NodeKind::Symlink(t) => flat(t.len() as u64, 0, tail_inline(t.len() as u64)),
            NodeKind::CharDev { major, minor } | NodeKind::BlockDev { major, minor } => Ok(Laid {
                shape: ItemShape {
                    isize,
                    head: base,
                    extra: 0,
                    tail: false,
                },
                layout: datalayout::FLAT_PLAIN,
                i_u: encode_dev(*major, *minor),
                size: 0,
                compact: None,
            }),
            NodeKind::Fifo | NodeKind::Socket => flat(0, 0, false),
        }
    }

    /// Places inodes and tail-area blocks. `stores` is indexed by node id.
    pub(super) fn layout(
        &self,
        tree: &Tree,
        stores: &[Option<Store>],
        data_end: u64,
    ) -> Result<MetaLayout, Error> {
        let mut alloc = MetaAlloc::default();
        let mut offsets = Vec::with_capacity(self.walk.len());
        let mut laid = Vec::with_capacity(self.walk.len());
        for &id in &self.walk {
            let l = self.laid(tree, id, stores.get(id as usize).and_then(Option::as_ref))?;
            let off = alloc.alloc(&l.shape).ok_or_else(|| Error::Unsupported {
                path: node_path(tree, id),
                reason: "inode and inline data cannot be placed in the metadata area".into(),
            })?;
            offsets.push(off);
            laid.push(l);
        }
        if offsets
            .first()
            .is_some_and(|&o| o / ISLOT > u64::from(u16::MAX))
        {
            return Err(Error::TooLarge("root nid does not fit 16 bits".into()));
        }
        let shared_blkaddr = data_end;
        let shared_blocks = blocks_of(self.shared.len() as u64);
        let meta_blkaddr = shared_blkaddr + shared_blocks;
        let meta_blocks = blocks_of(alloc.end).max(1);
        let mut next = meta_blkaddr + meta_blocks;
        let mut tail_blocks = Vec::with_capacity(self.walk.len());
        for (i, &id) in self.walk.iter().enumerate() {
            let l = &mut laid[i];
            let nb = match &tree.node(id).kind {
                NodeKind::Dir(_) | NodeKind::Symlink(_) => {
                    l.size / BLOCK + u64::from(l.size % BLOCK != 0 && !l.shape.tail)
                }
                _ => 0,
            };
            if nb > 0 {
                tail_blocks.push(Some(next));
                l.i_u = block_u32(next, "directory data")?;
                next += nb;
            } else {
                tail_blocks.push(None);
            }
        }
        if next > u64::from(u32::MAX) {
            return Err(Error::TooLarge(format!("{next} blocks")));
        }
        Ok(MetaLayout {
            offsets,
            laid,
            shared_blkaddr,
            meta_blkaddr,
            meta_blocks,
            tail_blocks,
            total_blocks: next,
        })
    }

    /// Upper bound of a compressed image's size, without compressing.
    pub(super) fn bound(&self, tree: &Tree) -> Result<u64, Error> {
        let mut data = 0u64;
        let mut meta = 0u64;
        let mut tails = 0u64;
        for &id in &self.walk {
            let p = self.prep(id)?;
            let isize: u64 = if p.extended { 64 } else { 32 };
            let base = isize + p.xattrs.len() as u64;
            let node = tree.node(id);
            let (d, m) = match &node.kind {
                NodeKind::File(f) => {
                    if let Some(s) = &node.slot {
                        (blocks_of(s.capacity), base)
                    } else if let Some(segs) = f.segments.as_ref().filter(|_| chunked(true, f)) {
                        let (cb, has) = chunk_plan(f.size, segs);
                        let d: u64 = has
                            .iter()
                            .enumerate()
                            .filter(|(_, h)| **h)
                            .map(|(c, _)| chunk_blocks(f.size, cb, c as u64))
                            .sum();
                        (d, base + 4 * has.len() as u64)
                    } else {
                        let n = f.size.div_ceil(BLOCK);
                        let units = f.size.div_ceil(UNIT);
                        // Flat: n blocks and an inline tail; compressed: at most one block more
                        // per unit, and the index array.
                        let flat_meta = base + INLINE_MAX + BLOCK + ISLOT;
                        let z_meta = round_up(base, 8) + FULL_INDEX_HEADER + 8 * n;
                        (n + units, flat_meta.max(z_meta))
                    }
                }
                NodeKind::Dir(_) | NodeKind::Symlink(_) => {
                    let size = match &node.kind {
                        NodeKind::Dir(_) => self.dirs.get(&id).map_or(0, |d| d.size),
                        NodeKind::Symlink(t) => t.len() as u64,
                        _ => 0,
                    };
                    tails += blocks_of(size);
                    (0, base + INLINE_MAX + BLOCK + ISLOT)
                }
                _ => (0, base),
            };
            data += d;
            // + 2 slots: an extended inode core is never split across blocks, which can skip
            // up to 64 bytes.
            meta += round_up(m, ISLOT) + 2 * ISLOT;
        }
        Ok((1 + data + blocks_of(self.shared.len() as u64) + blocks_of(meta) + 1 + tails) * BLOCK)
    }
}
