//! Compression: a file's bytes cut into 1 MiB units ([`UNIT`]) that are compressed
//! independently, in parallel batches, each into fixed-output physical clusters of up to
//! `pcluster_blocks` blocks with LZ4 or LZ4HC; and the full index array that maps a compressed
//! file's logical clusters onto the clusters once they are placed. Placing (writing the clusters
//! into the data region) is the data pipeline's, in `data.rs`.

use rayon::prelude::*;
use sha2::Digest;

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
            let d0 = if j == h + 1 && !e.plain {
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

/// A unit's raw bytes, its extents when the job compresses, its SHA-256 when the job is
/// hashed.
pub(super) type UnitOut = (Vec<u8>, Option<Vec<Ext>>, Option<[u8; 32]>);

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
            || lz4::Compressor::new(level),
            |c, &(j, off, l)| {
                let job = &jobs[j];
                let raw = match &job.data {
                    JobData::Mem(v) => v
                        .get(off as usize..(off + l) as usize)
                        .map(<[u8]>::to_vec)
                        .ok_or_else(|| Error::corrupt(off, "stream piece shorter than its size"))?,
                    JobData::Source(f) => {
                        let mut b = vec![0u8; l as usize];
                        read_source(contents, f, job.start + off, &mut b)?;
                        b
                    }
                };
                let exts = job.compress.then(|| compress_unit(c, &raw, pcluster));
                let digest = job.digest.then(|| sha2::Sha256::digest(&raw).into());
                Ok((raw, exts, digest))
            },
        )
        .collect();
    Batch { jobs, units }
}
