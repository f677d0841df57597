//! Slots in an ISO 9660 image: a file whose extent was reserved for `capacity` bytes at build
//! time, so a new payload can be written in place.
//!
//! What depends on a file's size in the images kiln writes: the both-endian data length
//! (ECMA-119 §9.1.4) of every directory record pointing at the extent — the ISO 9660 record,
//! the Joliet record, and one of each per hardlink. Nothing else does: Rock Ridge has no size
//! field (PX carries mode, links and ids; TF times are left as built so injection stays
//! reproducible), the path tables list directories only, the volume space size covers the
//! reservation, ISO 9660 has no checksums, the El Torito validation checksum covers only its
//! own entry, and the GPT's CRCs cover only its headers and entry arrays. (kiln writes no
//! xorriso-style MD5 tags, which would cover the data.)

use super::layout::{BothU32, DirRecordHeader, FLAG_DIRECTORY, RECORD_SIZE_OFFSET, SECTOR};
use super::{IsoError, ReadAt};
use zerocopy::{FromBytes, IntoBytes};

/// The 8 bytes (both-endian data length) to write at `record + RECORD_SIZE_OFFSET` for a file
/// of `len` bytes. An error above 4 GiB - 1, which no record can hold.
pub fn size_field(len: u64) -> Result<[u8; 8], IsoError> {
    let v = u32::try_from(len).map_err(|_| IsoError::FileTooLarge {
        path: "slot payload".into(),
        size: len,
    })?;
    let mut out = [0u8; 8];
    out.copy_from_slice(BothU32::new(v).as_bytes());
    Ok(out)
}

/// The size patches for records at `record_offsets` (absolute) and a file of `len` bytes.
pub fn record_size_patches(record_offsets: &[u64], len: u64) -> Result<Vec<Patch>, IsoError> {
    let field = size_field(len)?;
    Ok(record_offsets
        .iter()
        .map(|&r| Patch {
            offset: r + RECORD_SIZE_OFFSET as u64,
            len: 8,
            data: field.to_vec(),
        })
        .collect())
}

/// Checks, before patching `image`, that every offset holds a file record (not a directory)
/// whose extent is `extent_lba`: a stale or wrong slot table must not scribble over other
/// records.
pub fn verify_records(
    image: &dyn ReadAt,
    extent_lba: u32,
    record_offsets: &[u64],
) -> Result<(), IsoError> {
    for &r in record_offsets {
        let mut b = [0u8; 33];
        image.read_at(r, &mut b).map_err(|source| IsoError::Io {
            what: "reading a slot's directory record".into(),
            offset: r,
            source,
        })?;
        let h = DirRecordHeader::read_from_bytes(&b[..])
            .map_err(|_| IsoError::corrupt(r, "short directory record"))?;
        let ok = usize::from(h.len) >= 34
            && h.extent.consistent()
            && h.size.consistent()
            && h.extent.get() == extent_lba
            && h.flags & FLAG_DIRECTORY == 0;
        if !ok {
            return Err(IsoError::corrupt(
                r,
                format!(
                    "expected the directory record of a file at extent {extent_lba}, found a \
                     {}-byte record for extent {} with flags {:#04x}",
                    h.len,
                    h.extent.get(),
                    h.flags
                ),
            ));
        }
    }
    Ok(())
}

/// A byte range to overwrite: `data` at `offset`, then zeroes up to `len` bytes in total.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Patch {
    /// Absolute byte offset in the image.
    pub offset: u64,
    /// Length of the range in bytes (at least `data.len()`).
    pub len: u64,
    /// Leading bytes; the rest of the range is zero.
    pub data: Vec<u8>,
}

/// Where a slot lives in an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotLocation {
    /// Slot name.
    pub name: String,
    /// First sector of the reserved extent.
    pub extent_lba: u32,
    /// Byte offset of the extent in the image.
    pub data_offset: u64,
    /// Bytes the slot may hold.
    pub capacity: u64,
    /// Size of the content written at build time.
    pub size: u64,
    /// Absolute byte offset of every directory record (ISO 9660 and Joliet) whose extent is
    /// `extent_lba`.
    pub record_offsets: Vec<u64>,
}

impl SlotLocation {
    /// Bytes reserved on disk: whole sectors, at least one.
    pub fn reserved_len(&self) -> u64 {
        self.capacity.div_ceil(SECTOR).max(1) * SECTOR
    }

    /// The patches that make every record say the file is `new_size` bytes: the 8-byte
    /// both-endian data length at offset 10 of each record.
    pub fn size_patches(&self, new_size: u64) -> Result<Vec<Patch>, IsoError> {
        if new_size > self.capacity {
            return Err(IsoError::PayloadTooLarge {
                name: self.name.clone(),
                len: new_size,
                capacity: self.capacity,
            });
        }
        record_size_patches(&self.record_offsets, new_size)
    }

    /// All patches that inject `payload`: the whole reserved extent (payload, then zeroes, so
    /// the result does not depend on what was there before) and the size fields. Sorted by
    /// offset, non-overlapping.
    pub fn payload_patches(&self, payload: &[u8]) -> Result<Vec<Patch>, IsoError> {
        let mut p = self.size_patches(payload.len() as u64)?;
        p.push(Patch {
            offset: self.data_offset,
            len: self.reserved_len(),
            data: payload.to_vec(),
        });
        p.sort_by_key(|x| x.offset);
        Ok(p)
    }
}

/// Applies patches to an in-memory image (tests, small images).
pub fn apply(image: &mut [u8], patches: &[Patch]) -> Result<(), IsoError> {
    for p in patches {
        let range = usize::try_from(p.offset)
            .ok()
            .zip(usize::try_from(p.len).ok())
            .and_then(|(o, l)| Some(o..o.checked_add(l)?))
            .filter(|r| r.end <= image.len() && p.data.len() <= r.len());
        let Some(r) = range else {
            return Err(IsoError::corrupt(
                p.offset,
                format!(
                    "patch of {} bytes does not fit an image of {} bytes",
                    p.len,
                    image.len()
                ),
            ));
        };
        let (head, tail) = image[r].split_at_mut(p.data.len());
        head.copy_from_slice(&p.data);
        tail.fill(0);
    }
    Ok(())
}
