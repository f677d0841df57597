//! kiln-inject: slots and patch plans. A slot is a file whose storage was reserved contiguously
//! at build time; injecting a payload is a handful of [`Region`] patches over the immutable base,
//! and a composed image ("base + patches") reads and seeks like a file.
//!
//! The pieces, bottom up:
//! - [`region`]: [`Region`] and the validated, sorted [`PatchPlan`] over an image of known size;
//! - [`source`]: where base bytes come from — [`ReadAt`] (a local file, memory, any ranged
//!   reader) and [`AsyncRangeSource`] (the same, streamed, for object storage and the server);
//! - [`compose`]: [`ComposedImage`] (`Read + Seek + read_at`) and [`AsyncComposed`] (byte-range
//!   streams), both walking the same [`Segment`] list;
//! - [`slots`]: the slot table, stored in the image at [`slots::TABLE_OFFSET`] and as a JSON
//!   sidecar;
//! - [`plan`]: payloads → regions, dispatched per filesystem kind (ext4, FAT, EROFS, ISO 9660
//!   and raw byte ranges), each checked against the base before it is patched;
//! - [`chunks`]: per-chunk sha256 tables and chunked digests, composed in O(patched chunks),
//!   and the plain sha256 of a composed image from a stored [`sha256::Midstate`] in O(tail);
//! - [`output`]: writing a composed image in place, to a new file, or to a stream.

#![forbid(unsafe_code)]

pub mod bounds;
pub mod chunks;
pub mod compose;
mod kinds;
pub mod output;
pub mod plan;
pub mod region;
pub mod sha256;
pub mod slots;
pub mod source;

pub use chunks::{ChunkTable, ChunkedDigest};
pub use compose::{AsyncComposed, ComposedImage, Segment};
pub use plan::{plan_injection, Payload};
pub use region::{PatchPlan, Region};
pub use slots::{FsKind, Slot, SlotMeta, SlotTable};
pub use source::{AsyncRangeSource, FileSource, ReadAt};

use std::io;

/// Errors of slot tables, patch plans and composed images. Messages name the slot, file or
/// byte offset at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O error; `what` names the file or operation.
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    /// The slot table (in the image or a sidecar) is missing, truncated or corrupt.
    #[error("slot table at offset {offset} of {place}: {msg}")]
    Table {
        place: String,
        offset: u64,
        msg: String,
    },
    /// The table decoded but describes something impossible.
    #[error("slot table: {0}")]
    InvalidTable(String),
    /// The image is shorter (or longer) than its slot table says.
    #[error("{place}: image is {actual} bytes but its slot table describes {expected} bytes (truncated or wrong image?)")]
    ImageSize {
        place: String,
        expected: u64,
        actual: u64,
    },
    /// A payload names a slot the table does not have.
    #[error("unknown slot {name:?} (this image has: {available})")]
    UnknownSlot { name: String, available: String },
    /// The same slot was given two payloads.
    #[error("slot {0:?} given more than once")]
    DuplicateSlot(String),
    /// A payload does not fit its slot.
    #[error("payload for slot {slot:?} is {len} bytes, more than the slot's capacity of {capacity} bytes")]
    TooLarge {
        slot: String,
        len: u64,
        capacity: u64,
    },
    /// Two patches touch the same bytes.
    #[error(
        "patch at offset {b_offset} (+{b_len}) overlaps patch at offset {a_offset} (+{a_len})"
    )]
    Overlap {
        a_offset: u64,
        a_len: u64,
        b_offset: u64,
        b_len: u64,
    },
    /// A patch lies (partly) outside the image.
    #[error("patch at offset {offset} (+{len}) runs past the end of the {image_len}-byte image")]
    OutOfBounds {
        offset: u64,
        len: u64,
        image_len: u64,
    },
    /// A region's data is longer than the region.
    #[error("patch at offset {offset}: {data_len} bytes of data do not fit its length of {len}")]
    RegionData {
        offset: u64,
        len: u64,
        data_len: u64,
    },
    /// The base does not hold what the slot table says about a slot's filesystem (a stale or
    /// wrong table, a damaged filesystem), or the filesystem cannot take the new size.
    #[error("slot {slot:?} ({kind} filesystem at byte {fs_offset}): {msg}")]
    Base {
        slot: String,
        kind: FsKind,
        fs_offset: u64,
        msg: String,
    },
    /// A chunk table (sidecar) is truncated, corrupt or does not match the image.
    #[error("chunk table {place} at offset {offset}: {msg}")]
    Chunks {
        place: String,
        offset: u64,
        msg: String,
    },
}

impl Error {
    /// An I/O error on `what` (a path or an operation).
    pub fn io(what: impl std::fmt::Display, source: io::Error) -> Self {
        Error::Io {
            what: what.to_string(),
            source,
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
