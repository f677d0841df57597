//! EROFS, the kernel's enhanced read-only filesystem (kernel
//! Documentation/filesystems/erofs.rst, erofs-utils `include/erofs_fs.h`).
//!
//! - [`layout`]: the on-disk structures and constants.
//! - [`writer`]: tree -> image, planned first ([`plan`]) or streamed ([`StreamWriter`]), with
//!   optional LZ4/LZ4HC compression in big physical clusters.
//! - [`reader`]: image -> superblock, inodes by nid, directory lookup, file bytes (including
//!   decompression), xattrs.
//! - [`dump`]: a human-readable listing for debugging.
//!
//! Image layout kiln writes (all 4 KiB blocks):
//!
//! ```text
//! block 0        super block at byte 1024, then the LZ4 config when compressing
//! data region    regular files' data in tree (or stream arrival) order
//! xattr area     shared xattrs (xattr_blkaddr)
//! meta area      inodes with their xattrs, inline tails and index arrays (meta_blkaddr)
//! tail area      directory blocks and long symlink targets (they need nids, known last)
//! ```
//!
//! Data comes first so a once-read stream can be written as it arrives; everything that needs
//! to know where other things are (inodes, directories) is written after it.

pub mod dump;
pub mod layout;
pub mod reader;
pub mod writer;

#[cfg(test)]
mod tests;

pub use reader::{Image, InodeInfo};
pub use writer::{
    plan, rewrite_slot_size, Compression, Options, Plan, SizeEstimate, SlotLocation, StreamWriter,
    Summary, LZ4HC_DEFAULT_LEVEL,
};

use std::io;

/// Errors writing or reading EROFS images. Messages name the path, nid or offset at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading source data or writing the image failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// Something in the input tree cannot be represented in EROFS.
    #[error("{path}: {reason}")]
    Unsupported { path: String, reason: String },
    /// A slot reservation is unusable.
    #[error("slot {name:?}: {reason}")]
    Slot { name: String, reason: String },
    /// The image would exceed a format limit (block count, root nid).
    #[error("image too large: {0}")]
    TooLarge(String),
    /// The output window is smaller than the image.
    #[error("image needs {need} bytes but the output holds only {have}")]
    NoRoom { need: u64, have: u64 },
    /// A corrupt or unsupported image (reader).
    #[error("corrupt image at offset {offset}: {reason}")]
    Corrupt { offset: u64, reason: String },
    /// A path looked up in an image does not exist.
    #[error("{0}: no such file or directory in the image")]
    NotFound(String),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn corrupt(offset: u64, reason: impl Into<String>) -> Self {
        Error::Corrupt {
            offset,
            reason: reason.into(),
        }
    }
}
