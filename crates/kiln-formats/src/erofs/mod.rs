//! EROFS, the kernel's enhanced read-only filesystem (kernel
//! Documentation/filesystems/erofs.rst, erofs-utils `include/erofs_fs.h`).
//!
//! - [`layout`]: the on-disk structures and constants.
//! - [`writer`]: tree -> image, planned first ([`plan`]) or streamed ([`StreamWriter`]), with
//!   optional LZ4/LZ4HC compression in big physical clusters.
//! - [`reader`]: image -> superblock, inodes by nid, directory lookup, file bytes (including
//!   decompression), xattrs.
//! - [`compact`]: compacted logical cluster indexes (what compressed inodes get), encoded
//!   from the full form and checked by decoding them the kernel's way.
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

pub mod compact;
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

/// Largest logical file size kiln writes: 2^32 blocks of 4 KiB (16 TiB), the reach of EROFS's
/// 32-bit block addresses. A sparse file's chunk map grows with its logical size, so without
/// this bound a few KiB of tar claiming a 2^62-byte sparse file made the writer emit chunk maps
/// without end.
pub const MAX_FILE_SIZE: u64 = 1 << 44;

fn too_big(size: u64) -> String {
    format!("file size {size} bytes exceeds kiln's EROFS limit of {MAX_FILE_SIZE} bytes per file (2^32 blocks of 4 KiB)")
}

/// Refuses, before anything is laid out, a tree holding a file over [`MAX_FILE_SIZE`], naming it.
pub(crate) fn check_file_sizes(tree: &crate::fstree::Tree) -> Result<(), Error> {
    let mut bad = None;
    tree.walk_paths(|p, id| {
        if let crate::fstree::NodeKind::File(f) = &tree.node(id).kind {
            if f.size > MAX_FILE_SIZE && bad.is_none() {
                bad = Some(Error::Unsupported {
                    path: String::from_utf8_lossy(p).into_owned(),
                    reason: too_big(f.size),
                });
            }
        }
    });
    bad.map_or(Ok(()), Err)
}

/// The same bound for one file of a stream, before its data is placed.
pub(crate) fn check_file_size(size: u64) -> io::Result<()> {
    if size > MAX_FILE_SIZE {
        return Err(io::Error::new(io::ErrorKind::FileTooLarge, too_big(size)));
    }
    Ok(())
}
