//! Compression: a file's bytes cut into 1 MiB units ([`UNIT`]) that are compressed
//! independently, in parallel batches, each into fixed-output physical clusters of up to
//! `pcluster_blocks` blocks with LZ4 or LZ4HC; and the full index array that maps a compressed
//! file's logical clusters onto the clusters once they are placed. Placing (writing the clusters
//! into the data region) is the data pipeline's, in `data.rs`.

use rayon::prelude::*;
use sha2::Digest;

use super::store::tail_inline;
use super::{blocks_of, read_source, Error, UNIT};
use crate::erofs::layout::*;
use crate::fstree::{Contents, FileData};
use crate::lz4;

/// One extent of compressed output for a unit.
pub(super) struct Ext {
    /// Input bytes covered.
    pub(super) len: u64,
    /// Compressed block (None: stored plain, `len` <= one block).
    pub(super) bytes: Option<Vec<u8>>,
}

/// Compresses one unit into extents of fixed-output physical clusters.
fn compress_unit(c: &mut lz4::Compressor, data: &[u8], pcluster: usize) -> Vec<Ext> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        let mut buf = Vec::with_capacity(pcluster);
        let n = c.compress_dest(&data[pos..], pcluster, &mut buf);
        let nb = blocks_of(buf.len() as u64);
        if n > 0 && nb < blocks_of(n as u64) {
            out.push(Ext {
                len: n as u64,
                bytes: Some(buf),
            });
            pos += n;
        } else {
            // Incompressible here: store the blocks this attempt covered as plain clusters.
            let plain_blocks = (n as u64 / BLOCK).max(1);
            for _ in 0..plain_blocks {
                if pos >= data.len() {
                    break;
                }
                let l = (data.len() - pos).min(BLOCK as usize);
                out.push(Ext {
                    len: l as u64,
                    bytes: None,
                });
                pos += l;
            }
        }
    }
    out
}

/// A placed extent: logical start, length, plain or compressed, block address, block count.
#[derive(Clone, Copy, Debug)]
pub(super) struct ZExt {
    pub(super) start: u64,
    pub(super) len: u64,
    pub(super) plain: bool,
    pub(super) blkaddr: u32,
    pub(super) blocks: u32,
}

/// Builds the full index array of a compressed file from its extents.
///
/// The file's end is marked with a head of its own. The kernel finds where an extent ends
/// from the head that follows it (`z_erofs_do_map_blocks` in fs/erofs/zmap.c): an offset in a
/// NONHEAD logical cluster with no later head maps to an extent that ends at the *end of that
/// logical cluster*, not at `i_size` (only ztailpacking inodes are clamped to `i_size`). For a
/// PLAIN head the kernel then requires `m_llen <= m_plen` (one block) and fails the read with
/// EFSCORRUPTED otherwise. So a last extent stored plain that starts at `clusterofs > 0` and
/// runs into the next logical cluster (e.g. 3,553 incompressible bytes at 125,399 of a
/// 128,952-byte file) was unreadable past its first logical cluster, although every byte
/// was on disk. When the file ends inside a logical cluster that its last extent did not start
/// in, that logical cluster gets a PLAIN index whose `clusterofs` is the end of file: the
/// kernel then ends the last extent exactly at `i_size` (`EROFS_MAP_FULL_MAPPED`), and no
/// offset at or past it is ever mapped (reads past `i_size` are unmapped before any lookup).
/// erofs-utils writes the same terminating index (`z_erofs_fini_full_indexes`).
pub(super) fn build_indexes(size: u64, exts: &[ZExt]) -> Vec<LclusterIndex> {
    let n = size.div_ceil(BLOCK);
    let mut idx: Vec<LclusterIndex> = (0..n).map(|_| LclusterIndex::default()).collect();
    // The logical cluster holding the end of file, when it needs the terminating head.
    let eof_head = exts
        .last()
        .filter(|last| !size.is_multiple_of(BLOCK) && last.start / BLOCK < size / BLOCK)
        .map(|_| size / BLOCK);
    for e in exts {
        let h = e.start / BLOCK;
        let Some(head) = idx.get_mut(h as usize) else {
            continue;
        };
        head.di_advise.set(if e.plain {
            lcluster::PLAIN
        } else {
            lcluster::HEAD1
        });
        head.di_clusterofs.set((e.start % BLOCK) as u16);
        head.di_u.set(e.blkaddr);
        let end = e.start + e.len;
        let next_head = if end >= size {
            eof_head.unwrap_or(n)
        } else {
            end / BLOCK
        };
        for j in h + 1..next_head {
            // The block count goes after every head a NONHEAD follows, a PLAIN one's (1)
            // included: compacted indexes with big pclusters require it there.
            let d0 = if j == h + 1 {
                D0_CBLKCNT | e.blocks as u16
            } else {
                (j - h).min(u64::from(D0_CBLKCNT - 1)) as u16
            };
            let d1 = (next_head - j).min(u64::from(u16::MAX)) as u16;
            if let Some(x) = idx.get_mut(j as usize) {
                x.di_advise.set(lcluster::NONHEAD);
                x.di_clusterofs.set(0);
                x.di_u.set(u32::from(d0) | (u32::from(d1) << 16));
            }
        }
    }
    if let Some(t) = eof_head.and_then(|t| idx.get_mut(t as usize)) {
        t.di_advise.set(lcluster::PLAIN);
        t.di_clusterofs.set((size % BLOCK) as u16);
        t.di_u.set(0);
    }
    idx
}

/// Work for the parallel compression pass.
pub(super) enum JobData {
    /// Bytes already in memory (streams).
    Mem(Vec<u8>),
    /// Read from the [`Contents`] during the pass.
    Source(FileData),
}

pub(super) struct Job {
    pub(super) key: usize,
    pub(super) size: u64,
    /// Logical offset of this piece in the file.
    pub(super) start: u64,
    pub(super) len: u64,
    /// The whole file (may fall back to plain storage); false for pieces of big files.
    pub(super) whole: bool,
    /// Compress at all (false: small files written flat, in order).
    pub(super) compress: bool,
    /// Hash the bytes for whole-file dedupe.
    pub(super) digest: bool,
    pub(super) data: JobData,
}

/// A compressed unit, as placing needs it.
pub(super) struct UnitOut {
    /// Input bytes covered.
    pub(super) len: u64,
    /// The unit's bytes, kept only when placing may store them as they are (see
    /// [`needs_raw`]).
    pub(super) raw: Option<Vec<u8>>,
    /// Its extents, when the job compresses.
    pub(super) exts: Option<Vec<Ext>>,
    /// Its SHA-256, when the job is hashed.
    pub(super) digest: Option<[u8; 32]>,
}

/// Blocks a whole file of `size` bytes takes stored flat (its tail inline when it fits).
pub(super) fn flat_blocks(size: u64) -> u64 {
    size / BLOCK + u64::from(!size.is_multiple_of(BLOCK) && !tail_inline(size))
}

/// Blocks the extents take.
pub(super) fn ext_blocks(exts: &[Ext]) -> u64 {
    exts.iter()
        .map(|x| x.bytes.as_ref().map_or(1, |b| blocks_of(b.len() as u64)))
        .sum()
}

/// Whether placing may need a unit's bytes: a job that is not compressed is stored flat, a
/// plain extent is copied from them, and a whole file falls back to flat storage when its
/// clusters do not save a block. For a whole file of one unit that is decided here, with the
/// rule placing applies; a whole file of several units keeps them all.
fn needs_raw(job: &Job, exts: Option<&[Ext]>) -> bool {
    let Some(exts) = exts else {
        return true;
    };
    exts.iter().any(|x| x.bytes.is_none())
        || (job.whole && (job.len > UNIT || ext_blocks(exts) >= flat_blocks(job.size)))
}

/// A compressed batch waiting to be placed: its jobs and their units' results, in order.
pub(super) struct Batch {
    pub(super) jobs: Vec<Job>,
    pub(super) units: Vec<Result<UnitOut, Error>>,
}

/// Reads and compresses every unit of `jobs` in parallel (output order is input order, so
/// the image does not depend on scheduling).
pub(super) fn compress_batch(
    jobs: Vec<Job>,
    contents: &dyn Contents,
    level: lz4::Level,
    pcluster: usize,
) -> Batch {
    let mut units = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        let mut off = 0;
        while off < job.len {
            let l = (job.len - off).min(UNIT);
            units.push((j, off, l));
            off += l;
        }
    }
    let units = units
        .par_iter()
        .map_init(
            // The compressor and a read buffer per worker: a unit is read into the buffer,
            // and copied out only when placing may need its bytes (most units leave as
            // clusters only), so no unit costs an allocation and a zero-fill of its own.
            || (lz4::Compressor::new(level), Vec::new()),
            |(c, buf), &(j, off, l)| {
                let job = &jobs[j];
                let raw: &[u8] = match &job.data {
                    JobData::Mem(v) => v
                        .get(off as usize..(off + l) as usize)
                        .ok_or_else(|| Error::corrupt(off, "stream piece shorter than its size"))?,
                    JobData::Source(f) => {
                        if buf.len() < l as usize {
                            buf.resize(l as usize, 0);
                        }
                        let b = &mut buf[..l as usize];
                        read_source(contents, f, job.start + off, b)?;
                        b
                    }
                };
                let exts = job.compress.then(|| compress_unit(c, raw, pcluster));
                let digest = job.digest.then(|| sha2::Sha256::digest(raw).into());
                Ok(UnitOut {
                    len: l,
                    raw: needs_raw(job, exts.as_deref()).then(|| raw.to_vec()),
                    exts,
                    digest,
                })
            },
        )
        .collect();
    Batch { jobs, units }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::erofs::compact;
    use proptest::prelude::*;

    /// Extents of a `size`-byte file from (length, plain, blocks) pieces, placed back to back
    /// from block `first` (or with a gap after the `gap_after`th).
    fn extents(
        size: u64,
        pieces: &[(u64, bool, u32)],
        first: u32,
        gap_after: Option<usize>,
    ) -> Vec<ZExt> {
        let (mut start, mut blk) = (0u64, first);
        let mut out = Vec::new();
        for (k, &(len, plain, blocks)) in pieces.iter().enumerate() {
            if start >= size {
                break;
            }
            let len = len.min(size - start);
            // A compressed extent saves a block at least (what compress_unit keeps).
            let blocks = if plain {
                1
            } else {
                blocks.min(blocks_of(len).saturating_sub(1) as u32).max(1)
            };
            out.push(ZExt {
                start,
                len,
                plain,
                blkaddr: blk,
                blocks,
            });
            start += len;
            blk += blocks + u32::from(gap_after == Some(k));
        }
        if start < size {
            let plain = size - start <= BLOCK;
            out.push(ZExt {
                start,
                len: size - start,
                plain,
                blkaddr: blk,
                blocks: 1,
            });
        }
        out
    }

    /// Per logical cluster: type, cluster offset and address of heads before the end of file,
    /// the block count of NONHEADs that carry one, and the head each NONHEAD looks back to.
    fn mapping(idx: &[LclusterIndex], size: u64) -> Vec<(u16, u16, u32, usize)> {
        let mut owner = 0usize;
        idx.iter()
            .enumerate()
            .map(|(j, x)| {
                let t = x.di_advise.get() & 3;
                if t != lcluster::NONHEAD {
                    owner = j;
                    let la = j as u64 * BLOCK + u64::from(x.di_clusterofs.get());
                    let addr = if la < size { x.di_u.get() } else { 0 };
                    return (t, x.di_clusterofs.get(), addr, j);
                }
                let d0 = x.di_u.get() as u16;
                let cnt = if d0 & D0_CBLKCNT != 0 {
                    u32::from(d0)
                } else {
                    0
                };
                // Follow the lookback chain the way the kernel does.
                let mut k = j;
                loop {
                    let y = &idx[k];
                    if y.di_advise.get() & 3 != lcluster::NONHEAD {
                        break;
                    }
                    let d = y.di_u.get() as u16;
                    k -= if d & D0_CBLKCNT != 0 {
                        1
                    } else {
                        usize::from(d)
                    };
                }
                assert_eq!(k, owner, "lookback of {j}");
                (t, 0, cnt, k)
            })
            .collect()
    }

    #[test]
    fn compact_pack_bits_are_pinned() {
        // One 4-byte pack: a HEAD1 at offset 0, then the block count 3; address 100.
        let idx = build_indexes(
            2 * BLOCK,
            &[ZExt {
                start: 0,
                len: 2 * BLOCK,
                plain: false,
                blkaddr: 100,
                blocks: 3,
            }],
        );
        let bytes = compact::encode(&idx, 2 * BLOCK, 32).unwrap();
        assert_eq!(bytes, [0x00, 0x10, 0x03, 0x28, 100, 0, 0, 0]);
    }

    #[test]
    fn compact_needs_back_to_back_clusters() {
        // Heads in the same pack: the second's address is counted from the first's, so a gap
        // between their clusters cannot be expressed. (Across packs it can: each pack has an
        // address of its own, and the encoder keeps whatever decodes back to the same map.)
        let pieces = [(5000, false, 1); 40];
        let size = 200_000;
        for ebase in [8, 16, 24, 32] {
            let ok = build_indexes(size, &extents(size, &pieces, 77, None));
            assert!(compact::encode(&ok, size, ebase).is_some(), "ebase {ebase}");
            let gap = build_indexes(size, &extents(size, &pieces, 77, Some(0)));
            assert!(
                compact::encode(&gap, size, ebase).is_none(),
                "ebase {ebase}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Whatever the extents and the array's alignment, the compacted array decodes (the
        /// way the kernel reads it) to the mapping of the full indexes it came from, and is
        /// as long as `array_len` says.
        #[test]
        fn compact_round_trips(
            size in 1u64..400_000,
            pieces in proptest::collection::vec((1u64..70_000, any::<bool>(), 1u32..17), 1..40),
            first in 0u32..1_000_000,
            ebase in (0u64..4).prop_map(|k| 8 + 8 * k),
        ) {
            let pieces: Vec<_> = pieces
                .into_iter()
                // As compress_unit makes them: a plain extent is one block of input (a shorter
                // one only at the end), a compressed one covers more than a block.
                .map(|(len, plain, blocks)| if plain { (BLOCK, true, 1) } else { (len + BLOCK, false, blocks) })
                .collect();
            let full = build_indexes(size, &extents(size, &pieces, first, None));
            let bytes = compact::encode(&full, size, ebase).expect("back-to-back clusters encode");
            prop_assert_eq!(bytes.len() as u64, compact::array_len(full.len(), ebase));
            let back = compact::decode(&bytes, full.len(), ebase).unwrap();
            prop_assert_eq!(mapping(&back, size), mapping(&full, size));
        }
    }
}
