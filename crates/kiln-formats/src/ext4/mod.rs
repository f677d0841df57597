//! ext4 (kernel Documentation/filesystems/ext4/, e2fsprogs lib/ext2fs/ext2_fs.h).
//!
//! A writer at parity with modern `mke2fs -t ext4` defaults (4 KiB blocks, extents, flex_bg,
//! 64bit, metadata_csum, 256-byte inodes with nanosecond times, dir_index, dir_nlink,
//! extra_isize, huge_file, sparse_super; a journal only on request), a reader, and a dump.
//!
//! Layout policy (see [`alloc`]): `meta_bg` instead of `resize_inode`, so every fixed metadata
//! block sits at a position that depends only on its group number. File data is placed first,
//! from block 2 upwards, in canonical tree order (or in arrival order for a stream); directory
//! blocks, extent tree blocks, symlink blocks, xattr blocks, the journal, bitmaps and inode
//! tables follow. The data layout therefore never depends on totals known only at the end,
//! which is what makes a `tar --sort=name` stream and the directory it came from produce the
//! same image.
//!
//! [`Layout::Stable`] changes the policy for fixed-size filesystems, so that an unchanged
//! file keeps its inode and its blocks from one build to the next: the inode tables and
//! bitmaps come first, and inode numbers and data positions are hashed from each path (see
//! [`Layout`]). Delta updates then fetch little more than what changed.
//!
//! Use [`plan`] then [`Plan::write`] for trees whose bytes can be read in any order, and
//! [`StreamWriter`] (a [`crate::fstree::Placer`]) for one-pass sources.

use std::io;

pub mod alloc;
pub mod csum;
pub mod dir;
pub mod dump;
pub mod extent;
pub mod hash;
pub mod layout;
mod plan;
pub mod reader;
pub mod slot;
mod stream;
#[cfg(test)]
mod tests;
mod write;
pub mod xattr;

pub use plan::{plan, Plan, MAX_FILE_SIZE};
pub use stream::StreamWriter;

use crate::repart::{self, Uuid};

/// How big the filesystem is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    /// Exactly this many bytes (rounded down to whole blocks); an error if the tree does not
    /// fit.
    Fixed(u64),
    /// The smallest filesystem holding the tree, plus `extra_bytes` of free space and
    /// `extra_inodes` free inodes.
    Minimize {
        /// Free space to leave, in bytes (rounded up to blocks).
        extra_bytes: u64,
        /// Free inodes to leave.
        extra_inodes: u64,
    },
}

/// Where inodes and blocks go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Layout {
    /// Inode numbers in tree order and data packed from block 2 upwards in that order: the
    /// smallest and most contiguous image, but adding one file renumbers every inode after
    /// it and moves every later file's blocks.
    #[default]
    Packed,
    /// For [`Size::Fixed`] only. Fixed metadata (journal, bitmaps, inode tables) first, at
    /// positions that depend on the size alone. Each path's inode number is `12 +
    /// SHA-256(path) mod (n - 11)`, probing upwards on a collision, where `n` is the inode
    /// count (which follows the size by `inode_ratio`) capped at 2^22 for trees of fewer than
    /// 2^21 entries. Each object (file data, directory, long symlink, xattr or extent-tree
    /// block) goes into the first free gap large enough at or after a block hashed from its
    /// path, wrapping round, and is split only when no gap is large enough. An unchanged file
    /// therefore keeps its inode and its blocks when other files come and go, unless they
    /// collide with it. Costs: more extents and free-space fragments, and inode-table blocks
    /// spread over the whole table (non-zero blocks an image carries).
    Stable,
}

/// Filesystem parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Size policy.
    pub size: Size,
    /// Volume label, at most 16 bytes.
    pub label: String,
    /// Filesystem UUID.
    pub uuid: Uuid,
    /// Directory hash seed.
    pub hash_seed: Uuid,
    /// Create a jbd2 journal (inode 8), sized like mke2fs does.
    pub journal: bool,
    /// Filesystem creation/write/check time in seconds (`SOURCE_DATE_EPOCH`, or 0).
    pub timestamp: i64,
    /// Create `/lost+found` (16 KiB, like mke2fs) unless the tree has one.
    pub lost_found: bool,
    /// Bytes per inode for [`Size::Fixed`] (mke2fs `inode_ratio`, 16384).
    pub inode_ratio: u64,
    /// Percentage of blocks reserved for root (mke2fs uses 5; images default to 0).
    pub reserved_percent: u8,
    /// [`StreamWriter`]: all-zero blocks of streamed files become holes as the data arrives
    /// (indexed trees get theirs from `fstree::find_holes` before planning).
    pub zero_holes: bool,
    /// Where inodes and blocks go.
    pub layout: Layout,
}

impl Options {
    /// Options whose UUID and hash seed derive from `seed` the way systemd-repart derives
    /// them: UUID = `filesystem_uuid(seed)`, hash seed = `derive_uuid(seed, "directory-hash-seed")`.
    /// Without a seed, an all-zero seed is used, so the output is still deterministic.
    pub fn from_seed(seed: Option<&Uuid>, size: Size) -> Self {
        let seed = seed.copied().unwrap_or(Uuid::nil());
        Self {
            size,
            label: String::new(),
            uuid: repart::filesystem_uuid(&seed),
            hash_seed: repart::derive_uuid(&seed, "directory-hash-seed"),
            journal: false,
            timestamp: 0,
            lost_found: true,
            inode_ratio: 16384,
            reserved_percent: 0,
            zero_holes: false,
            layout: Layout::Packed,
        }
    }
}

/// Where a slot's bytes and inode live (byte offsets from the start of the filesystem).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotLocation {
    /// Slot name.
    pub name: String,
    /// Inode number of the slot file.
    pub inode: u32,
    /// Byte offset of its 256-byte inode.
    pub inode_offset: u64,
    /// Byte offset of its first reserved data block.
    pub data_offset: u64,
    /// Reserved bytes (whole blocks), contiguous from `data_offset`.
    pub capacity: u64,
}

/// What a finished filesystem contains.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// Filesystem size in bytes.
    pub size_bytes: u64,
    /// Total blocks.
    pub blocks: u64,
    /// Blocks in use (all metadata included).
    pub used_blocks: u64,
    /// Total inodes.
    pub inodes: u64,
    /// Inodes in use (reserved inodes included).
    pub used_inodes: u64,
    /// Block groups.
    pub groups: u64,
    /// Filesystem UUID.
    pub uuid: Uuid,
    /// Slots, in tree order.
    pub slots: Vec<SlotLocation>,
}

/// Errors from planning, writing or reading ext4.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The tree does not fit the requested size.
    #[error("the tree needs a {needed}-byte filesystem but the size is {size} bytes")]
    TooSmall {
        /// Smallest size that would hold the tree, in bytes.
        needed: u64,
        /// The requested size.
        size: u64,
    },
    /// The requested size is unusable.
    #[error("filesystem size {size} bytes: {reason}")]
    BadSize {
        /// The requested size.
        size: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The label does not fit in the superblock.
    #[error("label {0:?} is longer than 16 bytes")]
    Label(String),
    /// A tree entry cannot be represented.
    #[error("{path}: {msg}")]
    Entry {
        /// Path of the entry in the tree.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// Reading a file's bytes failed.
    #[error("{path}: reading file data: {source}")]
    Read {
        /// Path of the file in the tree.
        path: String,
        /// The underlying error.
        source: io::Error,
    },
    /// Writing the image failed.
    #[error("writing the image at byte {offset}: {source}")]
    Write {
        /// Byte offset of the failed write.
        offset: u64,
        /// The underlying error.
        source: io::Error,
    },
    /// A slot cannot be laid out.
    #[error("slot {name:?}: {msg}")]
    Slot {
        /// Slot name.
        name: String,
        /// What is wrong.
        msg: String,
    },
    /// The layout cannot be used with these options.
    #[error("stable layout: {0}")]
    Layout(&'static str),
    /// Reading an image failed.
    #[error("reading the image at byte {offset}: {source}")]
    ReadImage {
        /// Byte offset of the failed read.
        offset: u64,
        /// The underlying error.
        source: io::Error,
    },
    /// An image is not valid ext4 (reader).
    #[error("invalid ext4 image at byte {offset}: {msg}")]
    Corrupt {
        /// Byte offset of the bad structure.
        offset: u64,
        /// What is wrong.
        msg: String,
    },
}

/// Result alias for this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Progress callback: called with the number of file bytes just copied.
pub type Progress<'a> = &'a (dyn Fn(u64) + Sync);
