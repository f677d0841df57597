//! Tree -> EROFS image.
//!
//! Two entry points share one data path and one metadata path:
//! - [`plan`] + [`Plan::write`] for trees whose file bytes can be read in any order (directories,
//!   uncompressed tar files). Uncompressed images are laid out completely during planning, so
//!   [`Plan::size`] is exact; compressed images report an upper bound (data as if stored raw
//!   plus the largest metadata any outcome can need) and [`Summary::size`] is the exact size
//!   after writing. Compressing during planning would either hold every compressed byte in
//!   memory or compress twice; kiln build instead lays the filesystem out at its offset with the
//!   bound and trims the partition to [`Summary::size`].
//! - [`StreamWriter`], a [`Placer`] for once-read sources: file data is written in arrival
//!   order; [`StreamWriter::finish`] writes the metadata when the tree is complete. A
//!   `tar --sort=name` stream of a directory gives the same bytes as the directory, because the
//!   data region is in [`Tree::walk`] order either way and every layout decision depends only on
//!   sizes, never on which path delivered the bytes.
//!
//! Decisions that keep both paths identical:
//! - a regular file's last partial block is packed after its inode (FLAT_INLINE) when it is at
//!   most [`INLINE_MAX`] bytes, which the metadata allocator can always honour;
//! - compressed files are cut into 1 MiB units compressed independently (in parallel, each in
//!   fixed-output physical clusters of `pcluster_blocks` blocks), so the output does not depend
//!   on thread scheduling; files up to 16 MiB fall back to plain storage when compression does
//!   not save a block, larger ones keep per-cluster fallbacks only;
//! - sparse files use the chunk-based layout (holes are [`NULL_ADDR`] chunks), with the chunk
//!   size that minimises data plus map bytes.

use std::collections::BTreeMap;
use std::io::{self, Read};

use rayon::prelude::*;
use sha2::Digest;
use zerocopy::IntoBytes;

use super::layout::*;
use super::Error;
use crate::fstree::{
    Contents, DataRef, FileData, NodeId, NodeKind, Placer, SlotReservation, Timestamp, Tree, Xattr,
    ROOT,
};
use crate::lz4;
use crate::sink::Sink;

/// Largest tail packed after its inode. The metadata allocator can place any inode so that a
/// tail this long does not cross a block (inodes are 32-byte aligned).
pub const INLINE_MAX: u64 = BLOCK - 32;
/// Compression unit: extents never span one, which makes units independent work items.
const UNIT: u64 = 1 << 20;
/// Files up to this size are compressed as a whole (and may fall back to plain storage).
const PIECE: u64 = 16 << 20;
/// Input bytes gathered before a parallel compression pass.
const BATCH_BYTES: u64 = 64 << 20;
/// Copy buffer for uncompressed data.
const COPY_CHUNK: usize = 1 << 20;

/// kiln's default LZ4HC level, chosen with `scripts/bench-erofs` (3.65 GB from /usr, 64 KiB
/// physical clusters, 2 cores): level 5 is 0.7 % larger than level 6 for 15 % less CPU, and
/// still 9 % smaller than `mkfs.erofs -zlz4hc` at under half its wall time.
pub const LZ4HC_DEFAULT_LEVEL: u8 = 5;

/// Data compression.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    /// Store data as is.
    #[default]
    None,
    /// LZ4, fast greedy encoder.
    Lz4,
    /// LZ4 with the high-compression encoder at `level` (1..=12, lz4hc's default is 9).
    Lz4hc {
        /// Encoder effort, 1..=12.
        level: u8,
    },
}

impl Compression {
    fn level(self) -> Option<lz4::Level> {
        match self {
            Compression::None => None,
            Compression::Lz4 => Some(lz4::Level::Fast),
            Compression::Lz4hc { level } => Some(lz4::Level::High(level)),
        }
    }
}

/// How to build the image.
#[derive(Clone, Debug)]
pub struct Options {
    /// Data compression.
    pub compression: Compression,
    /// Largest physical cluster in blocks (1..=256); big clusters compress better.
    pub pcluster_blocks: u32,
    /// Filesystem UUID (kiln derives it from the seed).
    pub uuid: [u8; 16],
    /// The super block build time, which every compact inode uses as its mtime. `None` picks
    /// the most common mtime in the tree, so most inodes can be compact.
    pub timestamp: Option<Timestamp>,
    /// Volume label (at most 16 bytes).
    pub volume_name: Vec<u8>,
    /// Compressed modes: regular files with the same bytes share one copy of their compressed
    /// data (their inodes point at the same physical clusters). Read-only filesystems allow
    /// it; it costs nothing at read time. Sameness is decided by SHA-256, so it is the same
    /// for every source (directory, tar, stream).
    pub dedupe: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            compression: Compression::None,
            pcluster_blocks: 16,
            uuid: [0; 16],
            timestamp: None,
            volume_name: Vec::new(),
            dedupe: true,
        }
    }
}

impl Options {
    fn check(&self) -> Result<(), Error> {
        if !(1..=(PCLUSTER_MAX_SIZE / BLOCK) as u32).contains(&self.pcluster_blocks) {
            return Err(Error::Unsupported {
                path: "options".into(),
                reason: format!(
                    "pcluster_blocks {} is outside 1..=256",
                    self.pcluster_blocks
                ),
            });
        }
        if self.volume_name.len() > 16 {
            return Err(Error::Unsupported {
                path: "options".into(),
                reason: "volume name longer than 16 bytes".into(),
            });
        }
        Ok(())
    }
}

/// Where a slot's bytes and its size field live, for `kiln inject`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotLocation {
    /// Slot name from the reservation.
    pub name: String,
    /// nid of the slot file's inode.
    pub nid: u64,
    /// Byte offset of the inode in the image.
    pub inode_offset: u64,
    /// Byte offset of the reserved, contiguous data blocks.
    pub data_offset: u64,
    /// Bytes reserved (the file may grow to this size).
    pub capacity: u64,
    /// True when the inode is the 64-byte extended form (64-bit size field).
    pub extended: bool,
}

/// What was written.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// Exact image size in bytes (a multiple of the block size).
    pub size: u64,
    /// Number of inodes.
    pub inodes: u64,
    /// Blocks of file data (the data region).
    pub data_blocks: u64,
    /// Blocks of inodes, xattrs, directories and long symlinks.
    pub meta_blocks: u64,
    /// Regular files stored compressed.
    pub compressed_files: u64,
    /// Of those, files whose data is shared with an earlier file of the same content.
    pub shared_files: u64,
    /// Bytes of compressed data the shared files did not store again.
    pub shared_bytes: u64,
    /// Slot locations.
    pub slots: Vec<SlotLocation>,
    /// nid of the root directory.
    pub root_nid: u64,
}

/// The size a plan knows before writing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SizeEstimate {
    /// Bytes to reserve for the image.
    pub bytes: u64,
    /// True when `bytes` is the exact size (uncompressed images), false for an upper bound.
    pub exact: bool,
}

/// A file's last partial block.
#[derive(Clone, Debug)]
enum Tail {
    /// No partial block, or it is stored as a full block after the others.
    InBlocks,
    /// Packed after the inode: the bytes, or `None` to read them from the source.
    Inline(Option<Box<[u8]>>),
}

/// How a regular file's data is stored.
#[derive(Clone, Debug)]
enum Store {
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

fn tail_inline(size: u64) -> bool {
    let t = size % BLOCK;
    t != 0 && t <= INLINE_MAX
}

fn blocks_of(n: u64) -> u64 {
    n.div_ceil(BLOCK)
}

fn block_u32(b: u64, what: &str) -> Result<u32, Error> {
    u32::try_from(b)
        .map_err(|_| Error::TooLarge(format!("{what} at block {b} is past 2^32 blocks")))
}

/// Chunk plan for a sparse file: chunk bits and, per chunk, whether it holds data.
fn chunk_plan(size: u64, runs: &[crate::fstree::Segment]) -> (u8, Vec<bool>) {
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
fn chunked(compressed: bool, f: &FileData) -> bool {
    f.segments.is_some() && (!compressed || f.stored_len().saturating_mul(2) <= f.size)
}

/// Data blocks of chunk `c` of a chunked file.
fn chunk_blocks(size: u64, cb: u8, c: u64) -> u64 {
    let csize = BLOCK << cb;
    blocks_of((size - c * csize).min(csize))
}

/// One extent of compressed output for a unit.
struct Ext {
    /// Input bytes covered.
    len: u64,
    /// Compressed block (None: stored plain, `len` <= one block).
    bytes: Option<Vec<u8>>,
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
struct ZExt {
    start: u64,
    len: u64,
    plain: bool,
    blkaddr: u32,
    blocks: u32,
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
fn build_indexes(size: u64, exts: &[ZExt]) -> Vec<LclusterIndex> {
    let n = size.div_ceil(BLOCK);
    let mut idx: Vec<LclusterIndex> = (0..n).map(|_| LclusterIndex::default()).collect();
    // The logical cluster holding the end of file, when it needs the terminating head.
    let eof_head = exts
        .last()
        .filter(|last| size % BLOCK != 0 && last.start / BLOCK < size / BLOCK)
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
enum JobData {
    /// Bytes already in memory (streams).
    Mem(Vec<u8>),
    /// Read from the [`Contents`] during the pass.
    Source(FileData),
}

struct Job {
    key: usize,
    size: u64,
    /// Logical offset of this piece in the file.
    start: u64,
    len: u64,
    /// The whole file (may fall back to plain storage); false for pieces of big files.
    whole: bool,
    /// Compress at all (false: small files written flat, in order).
    compress: bool,
    /// Hash the bytes for whole-file dedupe.
    digest: bool,
    data: JobData,
}

/// A unit's raw bytes, its extents when the job compresses, its SHA-256 when the job is
/// hashed.
type UnitOut = (Vec<u8>, Option<Vec<Ext>>, Option<[u8; 32]>);

/// A compressed batch waiting to be placed: its jobs and their units' results, in order.
struct Batch {
    jobs: Vec<Job>,
    units: Vec<Result<UnitOut, Error>>,
}

/// Reads and compresses every unit of `jobs` in parallel (output order is input order, so
/// the image does not depend on scheduling).
fn compress_batch(
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

/// Writes file data into the data region, in order, compressing in parallel batches. While
/// one batch is compressed, the previous one is placed (written and indexed), so the cores
/// stay busy.
struct DataCore<'s> {
    sink: &'s dyn Sink,
    level: Option<lz4::Level>,
    pcluster: usize,
    next_block: u64,
    pending: Vec<Job>,
    pending_bytes: u64,
    /// Compressed, not yet placed.
    ready: Option<Batch>,
    stores: Vec<Option<Store>>,
    building: BTreeMap<usize, Vec<ZExt>>,
    compressed_files: u64,
    /// Whole-file dedupe, when enabled.
    dedupe: Option<Dedupe>,
}

/// Whole-file dedupe state: which files to hash, and the compressed files placed so far by
/// content.
struct Dedupe {
    /// Hash only files of these sizes (an indexed source knows every size up front and can
    /// skip files whose size is unique); `None` hashes every file (streams).
    sizes: Option<std::collections::HashSet<u64>>,
    /// Content digest (of the unit digests and the size) -> the store of its first copy.
    seen: std::collections::HashMap<[u8; 32], Store>,
    /// Files that share an earlier copy, and the bytes they did not store again.
    shared: u64,
    saved_bytes: u64,
}

fn read_source(
    contents: &dyn Contents,
    file: &FileData,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), Error> {
    contents
        .read_at(file, offset, buf)
        .map_err(|e| Error::io(format!("reading {:?} at offset {offset}", file.data), e))
}

fn write_sink(sink: &dyn Sink, offset: u64, buf: &[u8]) -> Result<(), Error> {
    sink.write_at(offset, buf)
        .map_err(|e| Error::io(format!("writing image at offset {offset}"), e))
}

impl<'s> DataCore<'s> {
    fn new(sink: &'s dyn Sink, opts: &Options) -> Self {
        Self {
            sink,
            level: opts.compression.level(),
            pcluster: (opts.pcluster_blocks as u64 * BLOCK) as usize,
            next_block: 1,
            pending: Vec::new(),
            pending_bytes: 0,
            ready: None,
            stores: Vec::new(),
            building: BTreeMap::new(),
            compressed_files: 0,
            dedupe: (opts.dedupe && opts.compression != Compression::None).then(|| Dedupe {
                sizes: None,
                seen: Default::default(),
                shared: 0,
                saved_bytes: 0,
            }),
        }
    }

    /// Limits hashing to files whose size occurs more than once among `sizes` (only a file
    /// with a twin of the same size can share its data).
    fn dedupe_sizes(&mut self, sizes: impl Iterator<Item = u64>) {
        if let Some(d) = &mut self.dedupe {
            let mut count: std::collections::HashMap<u64, u32> = Default::default();
            for s in sizes {
                *count.entry(s).or_default() += 1;
            }
            d.sizes = Some(
                count
                    .into_iter()
                    .filter(|&(_, n)| n > 1)
                    .map(|(s, _)| s)
                    .collect(),
            );
        }
    }

    /// Files sharing an earlier copy, and the compressed bytes they did not store again.
    fn shared(&self) -> (u64, u64) {
        self.dedupe
            .as_ref()
            .map_or((0, 0), |d| (d.shared, d.saved_bytes))
    }

    /// Whether a whole-file job of `size` bytes is hashed.
    fn digest_for(&self, size: u64) -> bool {
        self.dedupe
            .as_ref()
            .is_some_and(|d| d.sizes.as_ref().is_none_or(|s| s.contains(&size)))
    }

    fn set(&mut self, key: usize, store: Store) {
        if self.stores.len() <= key {
            self.stores.resize(key + 1, None);
        }
        self.stores[key] = Some(store);
    }

    fn alloc(&mut self, blocks: u64) -> u64 {
        let b = self.next_block;
        self.next_block += blocks;
        b
    }

    /// True when a file of this shape goes through compression batches.
    fn batched(&self, file: &FileData, slot: bool) -> bool {
        self.level.is_some() && !slot && file.size > 0 && !chunked(true, file)
    }

    /// Adds a file whose bytes the pass reads from the source.
    fn push_source(
        &mut self,
        key: usize,
        file: &FileData,
        contents: &dyn Contents,
    ) -> Result<(), Error> {
        let size = file.size;
        if size <= PIECE {
            self.push(
                Job {
                    key,
                    size,
                    start: 0,
                    len: size,
                    whole: true,
                    compress: size > BLOCK,
                    digest: size > BLOCK && self.digest_for(size),
                    data: JobData::Source(file.clone()),
                },
                contents,
            )?;
        } else {
            let mut start = 0;
            while start < size {
                let len = (size - start).min(PIECE);
                self.push(
                    Job {
                        key,
                        size,
                        start,
                        len,
                        whole: false,
                        compress: true,
                        digest: false,
                        data: JobData::Source(file.clone()),
                    },
                    contents,
                )?;
                start += len;
            }
        }
        Ok(())
    }

    fn push(&mut self, job: Job, contents: &dyn Contents) -> Result<(), Error> {
        self.pending_bytes += job.len.max(BLOCK);
        self.pending.push(job);
        if self.pending_bytes >= BATCH_BYTES {
            self.advance(contents)?;
        }
        Ok(())
    }

    /// Compresses the pending jobs while the previously compressed batch is placed.
    fn advance(&mut self, contents: &dyn Contents) -> Result<(), Error> {
        let jobs = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let prev = self.ready.take();
        let level = self.level.unwrap_or(lz4::Level::Fast);
        let pcluster = self.pcluster;
        let (placed, next) = rayon::join(
            || prev.map_or(Ok(()), |b| self.place_batch(b)),
            || (!jobs.is_empty()).then(|| compress_batch(jobs, contents, level, pcluster)),
        );
        placed?;
        self.ready = next;
        Ok(())
    }

    /// Compresses and writes every pending job, in order.
    fn flush(&mut self, contents: &dyn Contents) -> Result<(), Error> {
        if !self.pending.is_empty() {
            self.advance(contents)?;
        }
        match self.ready.take() {
            Some(b) => self.place_batch(b),
            None => Ok(()),
        }
    }

    /// Writes a compressed batch's jobs in order.
    fn place_batch(&mut self, batch: Batch) -> Result<(), Error> {
        let mut results = batch.units.into_iter();
        for job in batch.jobs {
            let nunits = job.len.div_ceil(UNIT) as usize;
            let mut outs = Vec::with_capacity(nunits);
            for _ in 0..nunits {
                match results.next() {
                    Some(r) => outs.push(r?),
                    None => {
                        return Err(Error::corrupt(job.start, "internal: unit results missing"))
                    }
                }
            }
            self.place_job(job, outs)?;
        }
        Ok(())
    }

    fn place_job(&mut self, job: Job, outs: Vec<UnitOut>) -> Result<(), Error> {
        // The file's content digest: over its units' digests and its size.
        let digest: Option<[u8; 32]> =
            outs.iter()
                .map(|o| o.2)
                .collect::<Option<Vec<_>>>()
                .map(|ds| {
                    let mut h = sha2::Sha256::new();
                    h.update(job.size.to_le_bytes());
                    for d in ds {
                        h.update(d);
                    }
                    h.finalize().into()
                });
        if let (Some(d), Some(dd)) = (&digest, &mut self.dedupe) {
            if let Some(st) = dd.seen.get(d) {
                if let Store::Compressed { blocks, .. } = st {
                    dd.saved_bytes += blocks * BLOCK;
                }
                dd.shared += 1;
                let st = st.clone();
                self.compressed_files += 1;
                self.set(job.key, st);
                return Ok(());
            }
        }
        if job.whole {
            let flat_blocks =
                job.size / BLOCK + u64::from(job.size % BLOCK != 0 && !tail_inline(job.size));
            let comp_blocks: Option<u64> = outs
                .iter()
                .map(|(_, e, _)| {
                    e.as_ref().map(|e| {
                        e.iter()
                            .map(|x| x.bytes.as_ref().map_or(1, |b| blocks_of(b.len() as u64)))
                            .sum::<u64>()
                    })
                })
                .sum();
            if comp_blocks.is_none_or(|c| c >= flat_blocks) {
                return self.place_flat_mem(job.key, job.size, outs.into_iter().map(|o| o.0));
            }
        }
        let mut base = job.start;
        let mut exts = self.building.remove(&job.key).unwrap_or_default();
        for (raw, e, _) in outs {
            let Some(e) = e else {
                return Err(Error::corrupt(
                    base,
                    "internal: uncompressed unit in a compressed file",
                ));
            };
            let mut pos = 0u64;
            for x in e {
                match &x.bytes {
                    Some(b) => {
                        let nb = blocks_of(b.len() as u64);
                        let blk = self.alloc(nb);
                        write_sink(self.sink, blk * BLOCK + nb * BLOCK - b.len() as u64, b)?;
                        exts.push(ZExt {
                            start: base + pos,
                            len: x.len,
                            plain: false,
                            blkaddr: block_u32(blk, "compressed data")?,
                            blocks: nb as u32,
                        });
                    }
                    None => {
                        let blk = self.alloc(1);
                        let r = raw
                            .get(pos as usize..(pos + x.len) as usize)
                            .ok_or_else(|| {
                                Error::corrupt(pos, "internal: plain extent past unit")
                            })?;
                        write_sink(self.sink, blk * BLOCK, r)?;
                        exts.push(ZExt {
                            start: base + pos,
                            len: x.len,
                            plain: true,
                            blkaddr: block_u32(blk, "file data")?,
                            blocks: 1,
                        });
                    }
                }
                pos += x.len;
            }
            base += raw.len() as u64;
        }
        if job.start + job.len >= job.size {
            let blocks = exts.iter().map(|e| u64::from(e.blocks)).sum();
            let indexes = build_indexes(job.size, &exts);
            self.compressed_files += 1;
            let store = Store::Compressed {
                size: job.size,
                indexes,
                blocks,
            };
            if let (Some(d), Some(dd)) = (digest, &mut self.dedupe) {
                dd.seen.insert(d, store.clone());
            }
            self.set(job.key, store);
        } else {
            self.building.insert(job.key, exts);
        }
        Ok(())
    }

    /// Stores a dense file flat from in-memory pieces (its full blocks in the data region, the
    /// tail inline or in one more block).
    fn place_flat_mem(
        &mut self,
        key: usize,
        size: u64,
        pieces: impl Iterator<Item = Vec<u8>>,
    ) -> Result<(), Error> {
        let inline = tail_inline(size);
        let full = size / BLOCK;
        let nblocks = full + u64::from(size % BLOCK != 0 && !inline);
        let blk = self.alloc(nblocks);
        let mut pos = 0u64;
        let mut tail = Vec::new();
        for p in pieces {
            let keep = if inline {
                (full * BLOCK).saturating_sub(pos).min(p.len() as u64) as usize
            } else {
                p.len()
            };
            if keep > 0 {
                write_sink(self.sink, blk * BLOCK + pos, &p[..keep])?;
            }
            tail.extend_from_slice(&p[keep..]);
            pos += p.len() as u64;
        }
        self.set(
            key,
            if size == 0 {
                Store::Empty
            } else {
                Store::Flat {
                    blkaddr: if nblocks == 0 { 0 } else { blk },
                    size,
                    tail: if inline {
                        Tail::Inline(Some(tail.into()))
                    } else {
                        Tail::InBlocks
                    },
                }
            },
        );
        Ok(())
    }

    /// Lays out a file stored uncompressed (slots, sparse files, uncompressed mode); returns
    /// the store and the data writes still to do as (image offset, logical offset, length).
    fn layout_plain(
        &mut self,
        file: &FileData,
        slot: Option<&SlotReservation>,
    ) -> Result<(Store, Vec<Write>), Error> {
        let size = file.size;
        if let Some(s) = slot {
            let nb = blocks_of(s.capacity);
            let blk = self.alloc(nb);
            let writes = runs_within(file, 0, size, blk * BLOCK);
            return Ok((
                Store::Flat {
                    blkaddr: blk,
                    size,
                    tail: Tail::InBlocks,
                },
                writes,
            ));
        }
        if size == 0 {
            return Ok((Store::Empty, Vec::new()));
        }
        if let Some(segs) = &file.segments {
            let (cb, has) = chunk_plan(size, segs);
            let csize = BLOCK << cb;
            let mut map = Vec::with_capacity(has.len());
            let mut writes = Vec::new();
            for (c, h) in has.iter().enumerate() {
                if !h {
                    map.push(NULL_ADDR);
                    continue;
                }
                let c = c as u64;
                let blk = self.alloc(chunk_blocks(size, cb, c));
                map.push(block_u32(blk, "chunk")?);
                let end = ((c + 1) * csize).min(size);
                writes.extend(runs_within(file, c * csize, end, blk * BLOCK));
            }
            return Ok((
                Store::Chunked {
                    size,
                    chunkbits: cb,
                    map,
                },
                writes,
            ));
        }
        let inline = tail_inline(size);
        let full = size / BLOCK;
        let nb = full + u64::from(size % BLOCK != 0 && !inline);
        let blk = self.alloc(nb);
        let stored = if inline { full * BLOCK } else { size };
        let writes = if stored > 0 {
            vec![(blk * BLOCK, 0, stored)]
        } else {
            Vec::new()
        };
        Ok((
            Store::Flat {
                blkaddr: if nb == 0 { 0 } else { blk },
                size,
                tail: if inline {
                    Tail::Inline(None)
                } else {
                    Tail::InBlocks
                },
            },
            writes,
        ))
    }
}

/// A data copy: (image offset, logical offset in the file, length).
type Write = (u64, u64, u64);

/// The parts of `file`'s data runs inside `[from, to)`, as writes relative to `image_base`
/// (which is where logical offset `from` lands).
fn runs_within(file: &FileData, from: u64, to: u64, image_base: u64) -> Vec<(u64, u64, u64)> {
    let mut out = Vec::new();
    for r in file.runs() {
        let s = r.offset.max(from);
        let e = (r.offset + r.len).min(to);
        if s < e {
            out.push((image_base + (s - from), s, e - s));
        }
    }
    out
}

/// Copies logical ranges of a file from the source into the image.
fn copy_ranges(
    sink: &dyn Sink,
    contents: &dyn Contents,
    file: &FileData,
    writes: &[(u64, u64, u64)],
) -> Result<(), Error> {
    let mut buf = vec![0u8; COPY_CHUNK.min(writes.iter().map(|w| w.2).max().unwrap_or(0) as usize)];
    for &(img, logical, len) in writes {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            read_source(contents, file, logical + done, &mut buf[..n])?;
            write_sink(sink, img + done, &buf[..n])?;
            done += n as u64;
        }
    }
    Ok(())
}

/// Reads from a stream into the writes of a placed file (the stream yields the runs packed).
fn copy_stream(
    sink: &dyn Sink,
    data: &mut dyn Read,
    writes: &[(u64, u64, u64)],
) -> Result<(), Error> {
    let mut buf = vec![0u8; COPY_CHUNK];
    for &(img, _, len) in writes {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            data.read_exact(&mut buf[..n])
                .map_err(|e| Error::io("reading stream data", e))?;
            write_sink(sink, img + done, &buf[..n])?;
            done += n as u64;
        }
    }
    Ok(())
}

/// A planned image for an indexed tree.
pub struct Plan<'t> {
    tree: &'t Tree,
    opts: Options,
    meta: MetaPrep,
    estimate: SizeEstimate,
}

impl std::fmt::Debug for Plan<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("estimate", &self.estimate)
            .finish()
    }
}

/// Plans an image of `tree`: validates everything that can be checked without file bytes
/// and sizes the image.
pub fn plan<'t>(tree: &'t Tree, opts: &Options) -> Result<Plan<'t>, Error> {
    opts.check()?;
    super::check_file_sizes(tree)?;
    let meta = MetaPrep::new(tree, opts)?;
    let estimate = if opts.compression == Compression::None {
        // Lay the data out for real (no bytes needed) to get the exact size.
        let sink = crate::sink::MemSink::new(0);
        let mut core = DataCore::new(&sink, opts);
        for &id in &meta.files {
            let node = tree.node(id);
            if let NodeKind::File(f) = &node.kind {
                let (st, _) = core.layout_plain(f, node.slot.as_ref())?;
                core.set(id as usize, st);
            }
        }
        let data_end = core.next_block;
        let m = meta.layout(tree, &core.stores, data_end)?;
        SizeEstimate {
            bytes: m.total_blocks * BLOCK,
            exact: true,
        }
    } else {
        SizeEstimate {
            bytes: meta.bound(tree)?,
            exact: false,
        }
    };
    Ok(Plan {
        tree,
        opts: opts.clone(),
        meta,
        estimate,
    })
}

impl Plan<'_> {
    /// The image size (exact when uncompressed, an upper bound when compressed).
    pub fn size(&self) -> SizeEstimate {
        self.estimate
    }

    /// Writes the image into `sink` (which must read as zeroes and hold [`Plan::size`] bytes).
    /// `progress` is called with the bytes of file data written so far.
    pub fn write(
        &self,
        contents: &dyn Contents,
        sink: &dyn Sink,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Summary, Error> {
        if sink.len() < self.estimate.bytes {
            return Err(Error::NoRoom {
                need: self.estimate.bytes,
                have: sink.len(),
            });
        }
        let tree = self.tree;
        let mut core = DataCore::new(sink, &self.opts);
        let sizes: Vec<u64> = self
            .meta
            .files
            .iter()
            .filter_map(|&id| {
                let node = tree.node(id);
                match &node.kind {
                    NodeKind::File(f)
                        if f.size <= PIECE && core.batched(f, node.slot.is_some()) =>
                    {
                        Some(f.size)
                    }
                    _ => None,
                }
            })
            .collect();
        core.dedupe_sizes(sizes.into_iter());
        let done = std::sync::atomic::AtomicU64::new(0);
        let mut direct: Vec<(NodeId, Vec<Write>)> = Vec::new();
        for &id in &self.meta.files {
            let node = tree.node(id);
            let NodeKind::File(f) = &node.kind else {
                continue;
            };
            if f.size == 0 && node.slot.is_none() {
                // No data: nothing to order, no batch to flush.
                core.set(id as usize, Store::Empty);
            } else if core.batched(f, node.slot.is_some()) {
                core.push_source(id as usize, f, contents)?;
                progress(done.fetch_add(f.size, std::sync::atomic::Ordering::Relaxed) + f.size);
            } else {
                if core.level.is_some() {
                    // Keep data in tree order: earlier batched files go first.
                    core.flush(contents)?;
                }
                let (st, writes) = core.layout_plain(f, node.slot.as_ref())?;
                core.set(id as usize, st);
                if core.level.is_some() {
                    copy_ranges(sink, contents, f, &writes)?;
                } else {
                    direct.push((id, writes));
                }
            }
        }
        core.flush(contents)?;
        // Uncompressed data: every address is known, copy in parallel.
        direct.par_iter().try_for_each(|(id, writes)| {
            let NodeKind::File(f) = &tree.node(*id).kind else {
                return Ok(());
            };
            copy_ranges(sink, contents, f, writes)?;
            let n: u64 = writes.iter().map(|w| w.2).sum();
            progress(done.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n);
            Ok::<(), Error>(())
        })?;
        let data_end = core.next_block;
        let compressed_files = core.compressed_files;
        let (shared_files, shared_bytes) = core.shared();
        let stores = std::mem::take(&mut core.stores);
        let mut s = self
            .meta
            .write(tree, &stores, data_end, sink, Some(contents), &self.opts)?;
        s.compressed_files = compressed_files;
        s.shared_files = shared_files;
        s.shared_bytes = shared_bytes;
        Ok(s)
    }
}

/// Writes an image from a once-read source: implement [`Placer`] for the tree reader, then
/// [`StreamWriter::finish`] with the complete tree.
pub struct StreamWriter<'s> {
    core: DataCore<'s>,
    opts: Options,
    placed: usize,
}

impl std::fmt::Debug for StreamWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamWriter")
            .field("placed", &self.placed)
            .finish()
    }
}

/// Contents reader for streams: placed data is already in the image.
struct NoContents;

impl Contents for NoContents {
    fn read_at(&self, file: &FileData, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        crate::fstree::read_host_or_inline(file, offset, buf)
    }
}

impl<'s> StreamWriter<'s> {
    /// A writer into `sink` (zeroed, large enough for the image; trim it to
    /// [`Summary::size`] afterwards).
    pub fn new(opts: &Options, sink: &'s dyn Sink) -> Result<Self, Error> {
        opts.check()?;
        Ok(Self {
            core: DataCore::new(sink, opts),
            opts: opts.clone(),
            placed: 0,
        })
    }

    fn place_inner(&mut self, file: &FileData, data: &mut dyn Read) -> Result<u32, Error> {
        let key = self.placed;
        let index =
            u32::try_from(key).map_err(|_| Error::TooLarge("more than 2^32 files".into()))?;
        self.placed += 1;
        if file.size == 0 {
            self.core.set(key, Store::Empty);
        } else if self.core.batched(file, false) {
            // A sparse file compressed whole: its holes read as zeroes.
            let mut unpack;
            let data: &mut dyn Read = if file.segments.is_some() {
                unpack = crate::fstree::Unpack::new(file, data);
                &mut unpack
            } else {
                data
            };
            let size = file.size;
            let whole = size <= PIECE;
            let mut start = 0;
            while start < size {
                let len = (size - start).min(PIECE);
                let mut v = vec![0u8; len as usize];
                data.read_exact(&mut v).map_err(|e| {
                    Error::io(format!("reading stream data at file offset {start}"), e)
                })?;
                self.core.push(
                    Job {
                        key,
                        size,
                        start,
                        len,
                        whole,
                        compress: !whole || size > BLOCK,
                        digest: whole && size > BLOCK && self.core.digest_for(size),
                        data: JobData::Mem(v),
                    },
                    &NoContents,
                )?;
                start += len;
            }
        } else {
            self.core.flush(&NoContents)?;
            let (mut st, writes) = self.core.layout_plain(file, None)?;
            // The tail is not in the image yet: read it after the blocks and keep it.
            let stored: u64 = writes.iter().map(|w| w.2).sum();
            copy_stream(self.core.sink, data, &writes)?;
            if let Store::Flat {
                size,
                tail: Tail::Inline(t),
                ..
            } = &mut st
            {
                let mut b = vec![0u8; (*size - stored) as usize];
                data.read_exact(&mut b)
                    .map_err(|e| Error::io("reading stream data (file tail)", e))?;
                *t = Some(b.into());
            }
            self.core.set(key, st);
        }
        Ok(index)
    }

    /// Writes the metadata for the complete `tree` (whose placed files carry
    /// [`DataRef::Placed`] indexes from this writer). Files with other data references (added
    /// after reading, e.g. by a build) are written now, from `contents`.
    pub fn finish(mut self, tree: &Tree, contents: &dyn Contents) -> Result<Summary, Error> {
        super::check_file_sizes(tree)?;
        let meta = MetaPrep::new(tree, &self.opts)?;
        self.core.flush(contents)?;
        let placed = std::mem::take(&mut self.core.stores);
        let base = placed.len().max(self.placed);
        let mut by_node: Vec<Option<Store>> = vec![None; tree.nodes.len()];
        // First the placed files (already in the image), then the rest in tree order.
        for &id in &meta.files {
            let node = tree.node(id);
            let NodeKind::File(f) = &node.kind else {
                continue;
            };
            if let DataRef::Placed(i) = f.data {
                if let Some(s) = &node.slot {
                    return Err(Error::Slot {
                        name: s.name.clone(),
                        reason: "its data came from a stream; a slot must be a file the build adds"
                            .into(),
                    });
                }
                let st = placed.get(i as usize).cloned().flatten().ok_or_else(|| {
                    Error::Unsupported {
                        path: node_path(tree, id),
                        reason: format!("placed data index {i} was never written"),
                    }
                })?;
                by_node[id as usize] = Some(st);
            }
        }
        for &id in &meta.files {
            let node = tree.node(id);
            let NodeKind::File(f) = &node.kind else {
                continue;
            };
            if matches!(f.data, DataRef::Placed(_)) {
                continue;
            }
            let key = base + id as usize;
            if self.core.batched(f, node.slot.is_some()) {
                self.core.push_source(key, f, contents)?;
            } else {
                self.core.flush(contents)?;
                let (st, writes) = self.core.layout_plain(f, node.slot.as_ref())?;
                copy_ranges(self.core.sink, contents, f, &writes)?;
                self.core.set(key, st);
            }
        }
        self.core.flush(contents)?;
        for &id in &meta.files {
            if by_node[id as usize].is_none() {
                by_node[id as usize] = self.core.stores.get(base + id as usize).cloned().flatten();
            }
        }
        let data_end = self.core.next_block;
        let mut s = meta.write(
            tree,
            &by_node,
            data_end,
            self.core.sink,
            Some(contents),
            &self.opts,
        )?;
        s.compressed_files = self.core.compressed_files;
        (s.shared_files, s.shared_bytes) = self.core.shared();
        Ok(s)
    }
}

impl Placer for StreamWriter<'_> {
    fn place(&mut self, file: &FileData, data: &mut dyn Read) -> io::Result<u32> {
        super::check_file_size(file.size)?;
        self.place_inner(file, data)
            .map_err(|e| io::Error::other(e.to_string()))
    }
}

// ---------------------------------------------------------------------------------------------
// Metadata

/// Path of a node for messages (searches the tree; only used on error paths).
fn node_path(tree: &Tree, id: NodeId) -> String {
    let mut found = None;
    tree.walk_paths(|p, n| {
        if n == id && found.is_none() {
            found = Some(String::from_utf8_lossy(p).into_owned());
        }
    });
    found.unwrap_or_else(|| format!("node {id}"))
}

/// Splits an xattr name into (prefix index, suffix).
fn xattr_prefix(name: &[u8]) -> Option<(u8, &[u8])> {
    for (idx, p) in XATTR_PREFIXES {
        if idx == 2 || idx == 3 {
            if name == p {
                return Some((idx, &[]));
            }
        } else if let Some(s) = name.strip_prefix(p) {
            return Some((idx, s));
        }
    }
    None
}

fn xattr_entry(x: &Xattr) -> Option<Vec<u8>> {
    let (idx, suffix) = xattr_prefix(&x.name)?;
    let mut v = Vec::with_capacity(4 + suffix.len() + x.value.len() + 3);
    v.extend_from_slice(
        XattrEntry {
            e_name_len: suffix.len() as u8,
            e_name_index: idx,
            e_value_size: (x.value.len() as u16).into(),
        }
        .as_bytes(),
    );
    v.extend_from_slice(suffix);
    v.extend_from_slice(&x.value);
    v.resize(round_up(v.len() as u64, 4) as usize, 0);
    Some(v)
}

/// Per-node facts that do not depend on where data went.
struct NodePrep {
    extended: bool,
    /// The xattr ibody (header, shared ids, inline entries), empty if no xattrs.
    xattrs: Vec<u8>,
    nlink: u32,
    ino: u32,
}

/// Everything about the metadata that can be computed from the tree alone.
struct MetaPrep {
    walk: Vec<NodeId>,
    files: Vec<NodeId>,
    prep: Vec<Option<NodePrep>>,
    shared: Vec<u8>,
    build_time: Timestamp,
    /// Sorted directory entries (with `.` and `..`) and their block split, per directory.
    dirs: BTreeMap<NodeId, DirPrep>,
}

struct DirPrep {
    /// (name, node) in on-disk order; `.` and `..` included.
    entries: Vec<(Box<[u8]>, NodeId)>,
    /// Index of the first entry of each block.
    block_starts: Vec<usize>,
    size: u64,
}

fn dir_prep(tree: &Tree, id: NodeId, parent: NodeId) -> DirPrep {
    let mut entries: Vec<(Box<[u8]>, NodeId)> = tree
        .entries(id)
        .iter()
        .map(|e| (e.name.clone(), e.node))
        .collect();
    entries.push((b".".to_vec().into(), id));
    entries.push((b"..".to_vec().into(), parent));
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut block_starts = vec![0];
    let mut used = 0u64;
    for (i, (name, _)) in entries.iter().enumerate() {
        let need = 12 + name.len() as u64;
        if used + need > BLOCK {
            block_starts.push(i);
            used = 0;
        }
        used += need;
    }
    let size = (block_starts.len() as u64 - 1) * BLOCK + used;
    DirPrep {
        entries,
        block_starts,
        size,
    }
}

/// A metadata item's size and placement constraints.
#[derive(Clone, Copy, Debug)]
struct ItemShape {
    /// Inode core size (32 or 64).
    isize: u64,
    /// Bytes before the payload: inode, xattrs and (compressed) alignment + map header.
    head: u64,
    /// Payload bytes: inline tail, chunk map or index array.
    extra: u64,
    /// The payload is an inline tail and must not cross a block.
    tail: bool,
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
struct Laid {
    shape: ItemShape,
    layout: u8,
    i_u: u32,
    size: u64,
}

struct MetaLayout {
    /// Offset of each node's inode in the metadata area (by walk position).
    offsets: Vec<u64>,
    laid: Vec<Laid>,
    shared_blkaddr: u64,
    meta_blkaddr: u64,
    meta_blocks: u64,
    /// First block of the tail area and, per walk position, the block of its tail-area data.
    tail_blocks: Vec<Option<u64>>,
    total_blocks: u64,
}

impl MetaPrep {
    fn new(tree: &Tree, opts: &Options) -> Result<Self, Error> {
        let walk = tree.walk();
        if walk.len() > u32::MAX as usize {
            return Err(Error::TooLarge("more than 2^32 inodes".into()));
        }
        let links = tree.link_counts();
        // Parents of directories, for `..`.
        let mut parent = vec![ROOT; tree.nodes.len()];
        for &id in &walk {
            for e in tree.entries(id) {
                if tree.node(e.node).is_dir() {
                    parent[e.node as usize] = id;
                }
            }
        }
        let build_time = match opts.timestamp {
            Some(t) => t,
            None => {
                let mut counts: BTreeMap<Timestamp, u64> = BTreeMap::new();
                for &id in &walk {
                    *counts.entry(tree.node(id).meta.mtime).or_default() += 1;
                }
                counts
                    .iter()
                    .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
                    .map(|(t, _)| *t)
                    .unwrap_or_default()
            }
        };
        // Shared xattrs: every (name, value) used by two or more inodes, stored once.
        let mut uses: BTreeMap<&Xattr, u32> = BTreeMap::new();
        for &id in &walk {
            for x in &tree.node(id).meta.xattrs {
                if xattr_prefix(&x.name).is_none() {
                    return Err(Error::Unsupported {
                        path: node_path(tree, id),
                        reason: format!(
                            "xattr {:?}: EROFS stores only user., trusted., security., lustre. and POSIX ACL names",
                            String::from_utf8_lossy(&x.name)
                        ),
                    });
                }
                let (_, suffix) = xattr_prefix(&x.name).unwrap_or((0, &[]));
                if suffix.len() > NAME_LEN || x.value.len() > u16::MAX as usize {
                    return Err(Error::Unsupported {
                        path: node_path(tree, id),
                        reason: format!(
                            "xattr {:?}: name over 255 bytes or value over 65535 bytes",
                            String::from_utf8_lossy(&x.name)
                        ),
                    });
                }
                *uses.entry(x).or_default() += 1;
            }
        }
        let mut shared = Vec::new();
        let mut shared_id: BTreeMap<&Xattr, u32> = BTreeMap::new();
        for (x, n) in &uses {
            if *n >= 2 {
                shared_id.insert(x, (shared.len() / 4) as u32);
                shared.extend_from_slice(&xattr_entry(x).unwrap_or_default());
            }
        }
        let mut prep: Vec<Option<NodePrep>> = (0..tree.nodes.len()).map(|_| None).collect();
        let mut files = Vec::new();
        let mut dirs = BTreeMap::new();
        for (i, &id) in walk.iter().enumerate() {
            let node = tree.node(id);
            let nlink = if node.is_dir() {
                2 + tree.subdir_count(id)
            } else {
                links[id as usize]
            };
            let mut ids = Vec::new();
            let mut inline = Vec::new();
            for x in &node.meta.xattrs {
                match shared_id.get(x) {
                    Some(&sid) if ids.len() < 255 => ids.push(sid),
                    _ => inline.extend_from_slice(&xattr_entry(x).unwrap_or_default()),
                }
            }
            let mut xattrs = Vec::new();
            if !ids.is_empty() || !inline.is_empty() {
                xattrs.extend_from_slice(
                    XattrIbodyHeader {
                        h_shared_count: ids.len() as u8,
                        ..Default::default()
                    }
                    .as_bytes(),
                );
                for s in ids {
                    xattrs.extend_from_slice(&s.to_le_bytes());
                }
                xattrs.extend_from_slice(&inline);
                if (xattrs.len() - 12) / 4 + 1 > u16::MAX as usize {
                    return Err(Error::Unsupported {
                        path: node_path(tree, id),
                        reason: format!(
                            "{} bytes of xattrs exceed EROFS's inline limit",
                            xattrs.len()
                        ),
                    });
                }
            }
            let size_max = match &node.kind {
                NodeKind::File(f) => {
                    files.push(id);
                    if let Some(s) = &node.slot {
                        if f.size > s.capacity {
                            return Err(Error::Slot {
                                name: s.name.clone(),
                                reason: format!(
                                    "{} holds {} bytes, more than the {} reserved",
                                    node_path(tree, id),
                                    f.size,
                                    s.capacity
                                ),
                            });
                        }
                        if f.segments.is_some() {
                            return Err(Error::Slot {
                                name: s.name.clone(),
                                reason: "a slot cannot be a sparse file".into(),
                            });
                        }
                        s.capacity
                    } else {
                        f.size
                    }
                }
                NodeKind::Dir(_) => {
                    let d = dir_prep(tree, id, parent[id as usize]);
                    let s = d.size;
                    dirs.insert(id, d);
                    s
                }
                NodeKind::Symlink(t) => {
                    if t.is_empty() || t.len() > 4095 {
                        return Err(Error::Unsupported {
                            path: node_path(tree, id),
                            reason: format!(
                                "symlink target of {} bytes (1..=4095 allowed)",
                                t.len()
                            ),
                        });
                    }
                    t.len() as u64
                }
                NodeKind::CharDev { major, minor } | NodeKind::BlockDev { major, minor } => {
                    if *major >= 1 << 12 || *minor >= 1 << 20 {
                        return Err(Error::Unsupported {
                            path: node_path(tree, id),
                            reason: format!(
                                "device {major}:{minor} does not fit EROFS's 12:20-bit rdev"
                            ),
                        });
                    }
                    0
                }
                NodeKind::Fifo | NodeKind::Socket => 0,
            };
            let m = &node.meta;
            let extended = m.mtime != build_time
                || m.uid > 0xFFFF
                || m.gid > 0xFFFF
                || nlink > 0xFFFF
                || size_max > u64::from(u32::MAX);
            prep[id as usize] = Some(NodePrep {
                extended,
                xattrs,
                nlink,
                ino: i as u32 + 1,
            });
        }
        Ok(Self {
            walk,
            files,
            prep,
            shared,
            build_time,
            dirs,
        })
    }

    fn prep(&self, id: NodeId) -> Result<&NodePrep, Error> {
        self.prep
            .get(id as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::corrupt(0, format!("internal: node {id} not prepared")))
    }

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
                }),
                Some(Store::Compressed {
                    size,
                    indexes,
                    blocks,
                }) => Ok(Laid {
                    shape: ItemShape {
                        isize,
                        head: round_up(base, 8) + FULL_INDEX_HEADER,
                        extra: 8 * indexes.len() as u64,
                        tail: false,
                    },
                    layout: datalayout::COMPRESSED_FULL,
                    i_u: block_u32(*blocks, "compressed block count")?,
                    size: *size,
                }),
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
            }),
            NodeKind::Fifo | NodeKind::Socket => flat(0, 0, false),
        }
    }

    /// Places inodes and tail-area blocks. `stores` is indexed by node id.
    fn layout(
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
    fn bound(&self, tree: &Tree) -> Result<u64, Error> {
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

    /// Writes metadata, directories, the shared xattr area and the super block.
    fn write(
        &self,
        tree: &Tree,
        stores: &[Option<Store>],
        data_end: u64,
        sink: &dyn Sink,
        contents: Option<&dyn Contents>,
        opts: &Options,
    ) -> Result<Summary, Error> {
        let m = self.layout(tree, stores, data_end)?;
        let size = m.total_blocks * BLOCK;
        if sink.len() < size {
            return Err(Error::NoRoom {
                need: size,
                have: sink.len(),
            });
        }
        let nid_of = {
            let mut v = vec![0u64; tree.nodes.len()];
            for (i, &id) in self.walk.iter().enumerate() {
                v[id as usize] = m.offsets[i] / ISLOT;
            }
            v
        };
        // Inline tails of files written from an indexed source: read in parallel, a batch of
        // inodes at a time so only one batch of tails is in memory besides the metadata area.
        let read_tail = |&id: &NodeId| -> Result<Option<Vec<u8>>, Error> {
            let (
                Some(Store::Flat {
                    size,
                    tail: Tail::Inline(None),
                    ..
                }),
                NodeKind::File(f),
            ) = (
                stores.get(id as usize).and_then(Option::as_ref),
                &tree.node(id).kind,
            )
            else {
                return Ok(None);
            };
            let Some(c) = contents else {
                return Err(Error::corrupt(0, "internal: no source for inline tails"));
            };
            let t = size % BLOCK;
            let mut b = vec![0u8; t as usize];
            read_source(c, f, size - t, &mut b).map_err(|e| Error::Unsupported {
                path: node_path(tree, id),
                reason: e.to_string(),
            })?;
            Ok(Some(b))
        };
        const TAIL_BATCH: usize = 4096;
        let mut meta = vec![0u8; (m.meta_blocks * BLOCK) as usize];
        let mut slots = Vec::new();
        let mut tails: Vec<Option<Vec<u8>>> = Vec::new();
        for (i, &id) in self.walk.iter().enumerate() {
            if i % TAIL_BATCH == 0 {
                let end = (i + TAIL_BATCH).min(self.walk.len());
                tails = self.walk[i..end]
                    .par_iter()
                    .map(read_tail)
                    .collect::<Result<_, _>>()?;
            }
            let node = tree.node(id);
            let p = self.prep(id)?;
            let l = &m.laid[i];
            let off = m.offsets[i] as usize;
            let format = (u16::from(l.layout) << I_DATALAYOUT_SHIFT)
                | if p.extended { I_VERSION_EXTENDED } else { 0 };
            let icount = if p.xattrs.is_empty() {
                0
            } else {
                ((p.xattrs.len() - 12) / 4 + 1) as u16
            };
            let mode = node.mode() as u16;
            let md = &node.meta;
            let core: Vec<u8> = if p.extended {
                InodeExtended {
                    i_format: format.into(),
                    i_xattr_icount: icount.into(),
                    i_mode: mode.into(),
                    i_size: l.size.into(),
                    i_u: l.i_u.into(),
                    i_ino: p.ino.into(),
                    i_uid: md.uid.into(),
                    i_gid: md.gid.into(),
                    i_mtime: (md.mtime.sec as u64).into(),
                    i_mtime_nsec: md.mtime.nsec.into(),
                    i_nlink: p.nlink.into(),
                    ..Default::default()
                }
                .as_bytes()
                .to_vec()
            } else {
                InodeCompact {
                    i_format: format.into(),
                    i_xattr_icount: icount.into(),
                    i_mode: mode.into(),
                    i_nlink: (p.nlink as u16).into(),
                    i_size: (l.size as u32).into(),
                    i_u: l.i_u.into(),
                    i_ino: p.ino.into(),
                    i_uid: (md.uid as u16).into(),
                    i_gid: (md.gid as u16).into(),
                    ..Default::default()
                }
                .as_bytes()
                .to_vec()
            };
            let mut put = |at: usize, b: &[u8]| -> Result<(), Error> {
                meta.get_mut(at..at + b.len())
                    .ok_or_else(|| Error::corrupt(at as u64, "internal: metadata past its area"))?
                    .copy_from_slice(b);
                Ok(())
            };
            put(off, &core)?;
            put(off + core.len(), &p.xattrs)?;
            let payload = off + l.shape.head as usize;
            match (&node.kind, stores.get(id as usize).and_then(Option::as_ref)) {
                (
                    NodeKind::File(_),
                    Some(Store::Flat {
                        tail: Tail::Inline(t),
                        size,
                        ..
                    }),
                ) => {
                    let bytes = t
                        .as_deref()
                        .or(tails.get(i % TAIL_BATCH).and_then(|t| t.as_deref()))
                        .ok_or_else(|| Error::corrupt(0, "internal: inline tail missing"))?;
                    if bytes.len() as u64 != size % BLOCK {
                        return Err(Error::Unsupported {
                            path: node_path(tree, id),
                            reason: "file tail shorter than its size".into(),
                        });
                    }
                    put(payload, bytes)?;
                }
                (NodeKind::File(_), Some(Store::Chunked { map, .. })) => {
                    for (k, a) in map.iter().enumerate() {
                        put(payload + 4 * k, &a.to_le_bytes())?;
                    }
                }
                (NodeKind::File(_), Some(Store::Compressed { indexes, .. })) => {
                    let hdr = off + round_up(core.len() as u64 + p.xattrs.len() as u64, 8) as usize;
                    put(
                        hdr,
                        MapHeader {
                            h_advise: ADVISE_BIG_PCLUSTER_1.into(),
                            h_algorithmtype: COMPRESSION_LZ4,
                            h_clusterbits: 0,
                            ..Default::default()
                        }
                        .as_bytes(),
                    )?;
                    for (k, x) in indexes.iter().enumerate() {
                        put(payload + 8 * k, x.as_bytes())?;
                    }
                }
                (NodeKind::Dir(_), _) => {
                    let d = self
                        .dirs
                        .get(&id)
                        .ok_or_else(|| Error::corrupt(0, "internal: directory not prepared"))?;
                    let bytes = dir_bytes(tree, d, &nid_of);
                    let full = (d.size / BLOCK * BLOCK) as usize;
                    let (blocks_part, tail_part) = if l.shape.tail {
                        (&bytes[..full], &bytes[full..])
                    } else {
                        (&bytes[..], &[][..])
                    };
                    if let Some(b) = m.tail_blocks[i] {
                        write_sink(sink, b * BLOCK, blocks_part)?;
                    }
                    put(payload, tail_part)?;
                }
                (NodeKind::Symlink(t), _) => {
                    if l.shape.tail {
                        put(payload, t)?;
                    } else if let Some(b) = m.tail_blocks[i] {
                        write_sink(sink, b * BLOCK, t)?;
                    }
                }
                _ => {}
            }
            if let (Some(s), Some(Store::Flat { blkaddr, .. })) =
                (&node.slot, stores.get(id as usize).and_then(Option::as_ref))
            {
                slots.push(SlotLocation {
                    name: s.name.clone(),
                    nid: m.offsets[i] / ISLOT,
                    inode_offset: m.meta_blkaddr * BLOCK + m.offsets[i],
                    data_offset: blkaddr * BLOCK,
                    capacity: s.capacity,
                    extended: p.extended,
                });
            }
        }
        write_sink(sink, m.meta_blkaddr * BLOCK, &meta)?;
        if !self.shared.is_empty() {
            write_sink(sink, m.shared_blkaddr * BLOCK, &self.shared)?;
        }
        // Super block (and the LZ4 config after it), checksummed over bytes 1024..4096.
        let any_chunked = stores
            .iter()
            .flatten()
            .any(|s| matches!(s, Store::Chunked { .. }));
        let compressing = opts.compression != Compression::None;
        let mut incompat = 0;
        if compressing {
            incompat |= FEATURE_INCOMPAT_LZ4_0PADDING | FEATURE_INCOMPAT_BIG_PCLUSTER;
        }
        if any_chunked {
            incompat |= FEATURE_INCOMPAT_CHUNKED_FILE;
        }
        let mut volume_name = [0u8; 16];
        volume_name[..opts.volume_name.len().min(16)]
            .copy_from_slice(&opts.volume_name[..opts.volume_name.len().min(16)]);
        let sb = SuperBlock {
            magic: MAGIC.into(),
            checksum: 0.into(),
            feature_compat: FEATURE_COMPAT_SB_CHKSUM.into(),
            blkszbits: BLKSZ_BITS,
            sb_extslots: 0,
            root_nid: (nid_of[ROOT as usize] as u16).into(),
            inos: (self.walk.len() as u64).into(),
            build_time: (self.build_time.sec as u64).into(),
            build_time_nsec: self.build_time.nsec.into(),
            blocks: (m.total_blocks as u32).into(),
            meta_blkaddr: (m.meta_blkaddr as u32).into(),
            xattr_blkaddr: (if self.shared.is_empty() {
                0
            } else {
                m.shared_blkaddr as u32
            })
            .into(),
            uuid: opts.uuid,
            volume_name,
            feature_incompat: incompat.into(),
            available_compr_algs: (if compressing {
                1u16 << COMPRESSION_LZ4
            } else {
                0
            })
            .into(),
            ..Default::default()
        };
        let mut block0 = vec![0u8; (BLOCK - SUPER_OFFSET) as usize];
        block0[..128].copy_from_slice(sb.as_bytes());
        if compressing {
            block0[128..130].copy_from_slice(&14u16.to_le_bytes());
            block0[130..144].copy_from_slice(
                Lz4Cfgs {
                    max_distance: 65535.into(),
                    max_pclusterblks: (opts.pcluster_blocks as u16).into(),
                    ..Default::default()
                }
                .as_bytes(),
            );
        }
        let crc = sb_checksum(&block0);
        block0[4..8].copy_from_slice(&crc.to_le_bytes());
        write_sink(sink, SUPER_OFFSET, &block0)?;
        Ok(Summary {
            size,
            inodes: self.walk.len() as u64,
            data_blocks: data_end - 1,
            meta_blocks: m.total_blocks - m.shared_blkaddr,
            compressed_files: 0,
            shared_files: 0,
            shared_bytes: 0,
            slots,
            root_nid: nid_of[ROOT as usize],
        })
    }
}

fn file_type(kind: &NodeKind) -> u8 {
    match kind {
        NodeKind::Dir(_) => ft::DIR,
        NodeKind::File(_) => ft::REG_FILE,
        NodeKind::Symlink(_) => ft::SYMLINK,
        NodeKind::CharDev { .. } => ft::CHRDEV,
        NodeKind::BlockDev { .. } => ft::BLKDEV,
        NodeKind::Fifo => ft::FIFO,
        NodeKind::Socket => ft::SOCK,
    }
}

/// A directory's data: per block, the dirent array then the names.
fn dir_bytes(tree: &Tree, d: &DirPrep, nid_of: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(d.size as usize);
    for (b, &start) in d.block_starts.iter().enumerate() {
        let end = d
            .block_starts
            .get(b + 1)
            .copied()
            .unwrap_or(d.entries.len());
        let ents = &d.entries[start..end];
        let block_base = out.len();
        let mut nameoff = 12 * ents.len();
        for (name, node) in ents {
            out.extend_from_slice(
                Dirent {
                    nid: nid_of[*node as usize].into(),
                    nameoff: (nameoff as u16).into(),
                    file_type: file_type(&tree.node(*node).kind),
                    reserved: 0,
                }
                .as_bytes(),
            );
            nameoff += name.len();
        }
        for (name, _) in ents {
            out.extend_from_slice(name);
        }
        if end < d.entries.len() {
            out.resize(block_base + BLOCK as usize, 0);
        }
    }
    out
}

/// Rewrites a slot file's size in its inode bytes (`inode` is the 32- or 64-byte inode read at
/// [`SlotLocation::inode_offset`]). The data blocks are not touched: the caller writes the new
/// contents at [`SlotLocation::data_offset`] and zeroes the rest of the old size.
pub fn rewrite_slot_size(
    slot: &SlotLocation,
    inode: &mut [u8],
    new_size: u64,
) -> Result<(), Error> {
    if new_size > slot.capacity {
        return Err(Error::Slot {
            name: slot.name.clone(),
            reason: format!("{new_size} bytes exceed the {} reserved", slot.capacity),
        });
    }
    let need = if slot.extended { 64 } else { 32 };
    if inode.len() < need {
        return Err(Error::Slot {
            name: slot.name.clone(),
            reason: format!("inode buffer of {} bytes, need {need}", inode.len()),
        });
    }
    let format = u16::from_le_bytes([inode[0], inode[1]]);
    let layout = ((format >> I_DATALAYOUT_SHIFT) & 7) as u8;
    let mode = u16::from_le_bytes([inode[4], inode[5]]);
    let i_u = u32::from_le_bytes([inode[16], inode[17], inode[18], inode[19]]);
    if (format & I_VERSION_EXTENDED == 1) != slot.extended
        || layout != datalayout::FLAT_PLAIN
        || mode & 0o170000 != 0o100000
        || u64::from(i_u) * BLOCK != slot.data_offset
    {
        return Err(Error::Slot {
            name: slot.name.clone(),
            reason: format!(
                "inode at offset {} is not a flat slot inode",
                slot.inode_offset
            ),
        });
    }
    if slot.extended {
        inode[8..16].copy_from_slice(&new_size.to_le_bytes());
    } else {
        let s = u32::try_from(new_size).map_err(|_| Error::Slot {
            name: slot.name.clone(),
            reason: "compact inode cannot hold a size over 4 GiB".into(),
        })?;
        inode[8..12].copy_from_slice(&s.to_le_bytes());
    }
    Ok(())
}
