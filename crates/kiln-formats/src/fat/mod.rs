//! FAT12/16/32 (Microsoft "FAT: General Overview of On-Disk Format" 1.03, "fatgen103"; VFAT
//! long names from the same document, §7), written from an [`fstree::Tree`](crate::fstree).
//!
//! kiln's own writer rather than the `fatfs` crate: slots need a file's clusters reserved
//! contiguously beyond its current size, and injection needs to know the byte offset of the
//! file's 8.3 directory entry and of its FAT entries, which `fatfs` neither offers nor reports.
//!
//! Geometry follows dosfstools' `mkfs.fat` (4.2) for a fixed disk with 512-byte sectors and two
//! FATs, so an image of a given size gets the FAT type, cluster size, reserved sectors and FAT
//! length mkfs.fat would choose: FAT32 from 512 MiB up (with Microsoft's cluster-size table),
//! otherwise FAT12 or FAT16 starting from 4-sector clusters and doubling until the cluster count
//! fits; structures aligned to the cluster size above 8192 sectors; total sectors rounded down
//! to a whole number of tracks. See [`geometry`].
//!
//! Modules: [`layout`] (on-disk structs and constants), [`names`] (8.3 and long names),
//! [`write`](mod@write) (the writer and slot reservations), [`read`] (reader and dump), [`slot`] (patches
//! that resize a slot file in place).

pub mod edit;
pub mod layout;
pub mod names;
pub mod read;
pub mod slot;
pub mod write;

pub use layout::{FatType, Geometry};
pub use read::FatReader;
pub use slot::{Patch, SlotLocation};
pub use write::{auto_size, FatOptions, FatReport, FatWriter};

use std::io;

/// Errors from planning, writing, reading or patching a FAT filesystem.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FatError {
    /// An entry of the tree cannot be stored in FAT.
    #[error("{path}: {reason}")]
    Unsupported {
        /// Path in the tree.
        path: String,
        /// Why.
        reason: String,
    },
    /// The tree does not fit.
    #[error(
        "tree needs {needed} clusters of {cluster_size} bytes but the {size}-byte FAT{bits} \
         filesystem has {available}"
    )]
    NoSpace {
        /// Clusters needed.
        needed: u64,
        /// Clusters available.
        available: u64,
        /// Bytes per cluster.
        cluster_size: u32,
        /// Filesystem size in bytes.
        size: u64,
        /// 12, 16 or 32.
        bits: u32,
    },
    /// Options are unusable (size, label, FAT type).
    #[error("{0}")]
    BadOptions(String),
    /// Reading file contents from the source failed.
    #[error("{path}: read at byte {offset}: {source}")]
    Source {
        /// Path in the tree.
        path: String,
        /// Byte offset within the file.
        offset: u64,
        /// The underlying error.
        source: io::Error,
    },
    /// Writing to the sink or reading the image failed.
    #[error("i/o at byte {offset} of the filesystem: {source}")]
    Io {
        /// Byte offset within the filesystem.
        offset: u64,
        /// The underlying error.
        source: io::Error,
    },
    /// The image is not a FAT filesystem kiln can read, or is inconsistent.
    #[error("corrupt FAT filesystem at byte {offset}: {reason}")]
    Corrupt {
        /// Byte offset of the offending structure.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A path looked up in the image does not exist or has the wrong kind.
    #[error("{path}: {reason}")]
    NotFound {
        /// The path.
        path: String,
        /// Why.
        reason: String,
    },
    /// A slot patch cannot be computed.
    #[error("slot {name}: {reason}")]
    Slot {
        /// Slot name.
        name: String,
        /// Why.
        reason: String,
    },
}

/// Wraps an I/O error at a filesystem byte offset.
pub(crate) fn io_err(offset: u64) -> impl FnOnce(io::Error) -> FatError {
    move |source| FatError::Io { offset, source }
}

/// Pick the FAT type and layout for a filesystem of `size` bytes, as mkfs.fat 4.2 does for a
/// fixed disk (or with `force` set, as `mkfs.fat -F 12|16|32` does).
pub fn geometry(size: u64, force: Option<FatType>) -> Result<Geometry, FatError> {
    layout::compute_geometry(size, force)
}
