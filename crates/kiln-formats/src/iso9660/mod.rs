//! ISO 9660 images: ECMA-119 4th edition with Rock Ridge (SUSP 1.12 / RRIP 1.10), Joliet and
//! El Torito, plus the hybrid layout that lets the same file boot from a CD and a USB stick.
//!
//! # What an image looks like
//!
//! ```text
//! sector 0..16   system area: protective MBR + GPT (hybrid images); bytes 24576..32768 are
//!                never written (kiln's slot table lives there)
//! 16             primary volume descriptor
//! 17             El Torito boot record (when an ESP is given; El Torito fixes it at 17)
//! 18             Joliet supplementary volume descriptor (when enabled)
//! next           volume descriptor set terminator
//! next           El Torito boot catalog
//!                path tables (L, M; then Joliet L, M)
//!                directories in path table order (ISO 9660, then Joliet)
//!                Rock Ridge continuation areas
//!                one zero sector that every empty extent points at
//!                file data in the tree's canonical order, each file contiguous; slots get
//!                ceil(capacity / 2048) sectors
//!                (with `slots_last`: the directories and continuation areas come after the
//!                other files' data, and the slot files after them)
//!   ---- end of the ISO 9660 data (GPT partition 1 ends here)
//!                the ESP image (GPT partition 2, El Torito's UEFI entry)
//!                backup GPT (hybrid images); the volume space covers everything
//! ```
//!
//! This is the "appended partition" style of current Ubuntu and Debian media: nothing
//! overlaps, the ESP is not a file of the ISO 9660 tree, and firmware finds it through El
//! Torito on a CD and through the GPT on a disk.
//!
//! # Choices
//!
//! - File identifiers are ISO level 1 (`NAME.EXT;1`, 8+3) and are only a fallback: the real
//!   names, modes, owners, times, symlinks and device numbers are in Rock Ridge.
//! - Joliet is written by default: Windows ignores Rock Ridge and would otherwise show 8.3
//!   upper-case names. It holds directories and regular files only (it cannot express the
//!   rest), names truncated to 64 UCS-2 characters.
//! - Extended attributes are not stored: there is no standard for them in ISO 9660 (AAIP is
//!   libisofs-specific). File times keep whole seconds (RRIP short form, which Linux reads).
//! - Directory depth and path length limits of ECMA-119 §6.8.2.1 are not enforced (no
//!   RR_MOVED relocation); Linux, libisofs and Windows read deep trees fine.
//! - Files of 4 GiB or more are refused (level 3 multi-extent files are not written).
//! - Names up to 255 bytes are written (NM split into 250-byte pieces) and read back whole by
//!   xorriso, isoinfo and this reader; Linux's isofs stops at 253 bytes and shows a 254- or
//!   255-byte name as its first 250 bytes. Linux 6.1's isofs also keeps times in 32 bits.
//!   The QEMU test in tests/iso9660.rs checks everything else Linux reports against the tree.
//! - Symlink targets up to 4095 bytes are written (SL entries over chained continuation
//!   areas) and read by Linux and this reader; libisofs (xorriso) refuses to load an image
//!   with a target over 1024 bytes ("Rock Ridge path too long").
//! - Volume UUID: blkid, udev (`/dev/disk/by-uuid`) and GRUB call the volume modification date
//!   `YYYY-MM-DD-HH-MM-SS-cc` the UUID of an ISO. kiln derives that date from the image seed
//!   ([`VolumeUuid::from_seed`]), so kiln-init can find its boot medium by UUID whether it is
//!   a CD or a disk; the creation and effective dates carry the build timestamp.

pub mod dump;
pub mod layout;
pub mod names;
pub mod reader;
pub mod rock_ridge;
pub mod slot;
pub mod time;
pub mod writer;

use std::io;

pub use reader::{BootCatalog, BootImage, Entry, IsoImage, TreeKind};
pub use slot::{Patch, SlotLocation};
pub use writer::{IsoOptions, IsoPlan, VolumeUuid};

/// Errors from writing or reading an ISO image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IsoError {
    /// A file too large for a single ISO 9660 extent.
    #[error(
        "{path}: file of {size} bytes is too large for ISO 9660 (files must be smaller than 4 GiB)"
    )]
    FileTooLarge { path: String, size: u64 },
    /// A slot whose current content exceeds its capacity, or whose capacity cannot be an extent.
    #[error("{path}: slot {name:?}: {msg}")]
    BadSlot {
        path: String,
        name: String,
        msg: String,
    },
    /// A directory named by more than one entry (ISO 9660 directories cannot be hardlinked).
    #[error("{path}: directory is linked from more than one place")]
    DirectoryLinkedTwice { path: String },
    /// More directories than a path table can number.
    #[error("{count} directories; a path table can number at most 65535")]
    TooManyDirectories { count: usize },
    /// No unique short identifier is left in a directory.
    #[error("{path}: no unique ISO 9660 identifier left for this entry")]
    NamesExhausted { path: String },
    /// A bad option value.
    #[error("{what}: {msg}")]
    BadOption { what: &'static str, msg: String },
    /// The image would not fit the format's 32-bit sector numbers.
    #[error("image of {sectors} sectors exceeds ISO 9660's 32-bit volume size")]
    TooLarge { sectors: u64 },
    /// Reading input or writing output failed.
    #[error("{what} at byte offset {offset}: {source}")]
    Io {
        what: String,
        offset: u64,
        source: io::Error,
    },
    /// The image is malformed.
    #[error("byte offset {offset}: {msg}")]
    Corrupt { offset: u64, msg: String },
    /// A payload does not fit its slot.
    #[error("slot {name:?}: payload of {len} bytes exceeds its capacity of {capacity} bytes")]
    PayloadTooLarge {
        name: String,
        len: u64,
        capacity: u64,
    },
    /// The hybrid GPT could not be laid out or written.
    #[error("hybrid GPT: {0}")]
    Gpt(#[from] crate::gpt::GptError),
}

impl IsoError {
    pub(crate) fn corrupt(offset: u64, msg: impl Into<String>) -> Self {
        IsoError::Corrupt {
            offset,
            msg: msg.into(),
        }
    }
}

pub use crate::io::ReadAt;
