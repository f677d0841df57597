//! Tree -> EROFS image.
//!
//! Two entry points share one data path and one metadata path:
//! - [`plan()`] + [`Plan::write`] for trees whose file bytes can be read in any order (directories,
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
//!
//! The files of this module, data path first, then metadata path:
//! - this file: the public options and results, the pipeline's sizes, shared I/O helpers;
//! - `plan.rs`: [`plan()`] and [`Plan::write`], the entry point for indexed sources;
//! - `stream.rs`: [`StreamWriter`], the entry point for once-read sources;
//! - `store.rs`: how a regular file's data is stored (`Store`, `Tail`) and the sizing rules
//!   both paths apply to it (inline tails, chunk plans);
//! - `data.rs`: the data pipeline, `DataCore`: block allocation in the data region, whole-file
//!   dedupe, placing compressed batches, plain and chunked layout, copying from the source;
//! - `compress.rs`: units and physical clusters: compression jobs and batches, LZ4/LZ4HC
//!   cutting into fixed-output clusters, a compressed file's index array;
//! - `meta.rs`: what the metadata needs from the tree alone, `MetaPrep`: inode numbers, link
//!   counts, xattr bodies and the shared xattr area, sorted directories;
//! - `meta_layout.rs`: the metadata allocator: each inode's shape once its data is stored,
//!   inode placement in the meta area, the tail area, the size bound of compressed images;
//! - `meta_write.rs`: inode, dirent and super block bytes;
//! - `slot.rs`: [`rewrite_slot_size`], patching a slot's size in an image already written.
//!
//! [`Placer`]: crate::fstree::Placer
//! [`Tree::walk`]: crate::fstree::Tree::walk

mod compress;
mod data;
mod meta;
mod meta_layout;
mod meta_write;
mod plan;
mod slot;
mod store;
mod stream;

pub use plan::{plan, Plan};
pub use slot::rewrite_slot_size;
pub use stream::StreamWriter;

use super::layout::*;
use super::Error;
use crate::fstree::{Contents, FileData, Timestamp};
use crate::lz4;
use crate::sink::Sink;

/// Largest tail packed after its inode. The metadata allocator can place any inode so that a
/// tail this long does not cross a block (inodes are 32-byte aligned).
pub const INLINE_MAX: u64 = BLOCK - 32;
/// Compression unit: extents never span one, which makes units independent work items. Each
/// unit ends in a partial physical cluster (half a block lost on average): at 1 MiB that cost
/// 0.27 % of a /usr image with LZ4HC, at 4 MiB 0.07 %, with no measurable loss of parallelism.
const UNIT: u64 = 4 << 20;
/// Files up to this size are compressed as a whole (and may fall back to plain storage).
const PIECE: u64 = 16 << 20;
/// Input bytes gathered before a parallel compression pass.
const BATCH_BYTES: u64 = 64 << 20;
/// Copy buffer for uncompressed data.
const COPY_CHUNK: usize = 1 << 20;

/// kiln's default LZ4HC level, chosen with `scripts/bench-erofs` (4.49 GB from /usr, 64 KiB
/// physical clusters, 2 cores, against erofs-utils 1.9.3 `-zlz4hc,9 -C65536 --workers=2`):
/// level 5 takes 0.67x its wall time for 1.002x its size, level 6 0.78x for 0.999x.
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

/// Blocks that hold `n` bytes.
fn blocks_of(n: u64) -> u64 {
    n.div_ceil(BLOCK)
}

/// A block address or count as the 32 bits the format stores; too large an image is an
/// error naming `what`.
fn block_u32(b: u64, what: &str) -> Result<u32, Error> {
    u32::try_from(b)
        .map_err(|_| Error::TooLarge(format!("{what} at block {b} is past 2^32 blocks")))
}

/// Reads file bytes from the source; errors name the file and offset.
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

/// Writes image bytes; errors name the offset.
fn write_sink(sink: &dyn Sink, offset: u64, buf: &[u8]) -> Result<(), Error> {
    sink.write_at(offset, buf)
        .map_err(|e| Error::io(format!("writing image at offset {offset}"), e))
}
