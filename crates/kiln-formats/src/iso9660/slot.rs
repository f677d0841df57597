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

use super::layout::{BothU32, RECORD_SIZE_OFFSET, SECTOR};
use super::IsoError;
use zerocopy::IntoBytes;

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
        let field = BothU32::new(new_size as u32);
        Ok(self
            .record_offsets
            .iter()
            .map(|&r| Patch {
                offset: r + RECORD_SIZE_OFFSET as u64,
                len: 8,
                data: field.as_bytes().to_vec(),
            })
            .collect())
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
