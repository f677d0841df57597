//! Resizing a slot file in place: the handful of byte patches that give a file whose clusters
//! were reserved contiguously at build time a new size, keeping the filesystem consistent
//! (`fsck.fat -n` clean) at every size from 0 to the capacity.
//!
//! What changes: the file's 8.3 directory entry (size; first cluster, which is 0 for an empty
//! file), the FAT entries of the reservation in every FAT copy (a chain over the clusters the
//! new size needs, the rest of the reservation free), and on FAT32 the FSInfo free count. The
//! long-name entries stay valid: their checksum covers only the 8.3 name. The payload itself is
//! written by the caller at [`SlotLocation::data_offset`].

use std::io;

use super::layout::*;
use super::FatError;

/// Where a slot lives in a FAT filesystem; byte offsets are relative to the filesystem start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotLocation {
    /// Slot name.
    pub name: String,
    /// Byte offset of the file's 8.3 directory entry.
    pub dirent_offset: u64,
    /// First cluster of the reservation (0 when the capacity is 0).
    pub first_cluster: u32,
    /// Clusters reserved, contiguous.
    pub cluster_count: u32,
    /// Byte offset of the reservation's first byte (where the payload goes).
    pub data_offset: u64,
    /// Bytes reserved (the largest size the file may take).
    pub capacity: u64,
    /// Byte offset of each FAT copy.
    pub fat_offsets: Vec<u64>,
    /// Byte offset of the FSInfo sector (FAT32 only).
    pub fsinfo_offset: Option<u64>,
    /// Bytes per cluster.
    pub cluster_size: u32,
    /// FAT variant (entry width).
    pub fat_type: FatType,
    /// Size of the content written at build time.
    pub initial_size: u64,
}

/// A byte range to overwrite, relative to the filesystem start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Patch {
    /// Byte offset.
    pub offset: u64,
    /// New bytes.
    pub bytes: Vec<u8>,
}

impl SlotLocation {
    /// The base-image byte ranges `(offset, len)` that [`SlotLocation::patches`] reads.
    pub fn base_ranges(&self) -> Vec<(u64, usize)> {
        let mut v = vec![(self.dirent_offset, DIRENT_SIZE as usize)];
        if let Some((start, len)) = self.fat_span() {
            v.extend(self.fat_offsets.iter().map(|f| (f + start, len)));
        }
        if let Some(fi) = self.fsinfo_offset {
            v.push((fi, SECTOR as usize));
        }
        v
    }

    /// Byte range within one FAT covering the reservation's entries.
    fn fat_span(&self) -> Option<(u64, usize)> {
        if self.cluster_count == 0 {
            return None;
        }
        let last = self.first_cluster + self.cluster_count - 1;
        let (start, _) = entry_span(self.fat_type, self.first_cluster);
        let (end_start, end_len) = entry_span(self.fat_type, last);
        Some((start, (end_start + end_len as u64 - start) as usize))
    }

    fn err(&self, reason: String) -> FatError {
        FatError::Slot {
            name: self.name.clone(),
            reason,
        }
    }

    /// Patches that give the slot file `new_size` bytes (0..=capacity), reading what they need
    /// from the base image through `read` (offsets relative to the filesystem start). Sorted
    /// by offset, non-overlapping.
    pub fn patches(
        &self,
        new_size: u64,
        read: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
    ) -> Result<Vec<Patch>, FatError> {
        if new_size > self.capacity {
            return Err(self.err(format!(
                "payload of {new_size} bytes exceeds the capacity of {} bytes",
                self.capacity
            )));
        }
        let cs = u64::from(self.cluster_size);
        if cs == 0 || self.capacity.div_ceil(cs) > u64::from(self.cluster_count) {
            return Err(self.err(format!(
                "slot table is inconsistent: {} clusters of {cs} bytes cannot hold {} bytes",
                self.cluster_count, self.capacity
            )));
        }
        let new_n = new_size.div_ceil(cs) as u32;
        let mut rd = |off: u64, buf: &mut [u8]| {
            read(off, buf).map_err(|source| FatError::Io {
                offset: off,
                source,
            })
        };

        // The directory entry must be the slot's: first cluster 0 or the reservation's start.
        let mut de = [0u8; DIRENT_SIZE as usize];
        rd(self.dirent_offset, &mut de)?;
        let old_first = u32::from(u16::from_le_bytes([
            de[DIRENT_CLUS_HI],
            de[DIRENT_CLUS_HI + 1],
        ])) << 16
            | u32::from(u16::from_le_bytes([
                de[DIRENT_CLUS_LO],
                de[DIRENT_CLUS_LO + 1],
            ]));
        let old_size = u64::from(u32::from_le_bytes([
            de[DIRENT_SIZE_FIELD],
            de[DIRENT_SIZE_FIELD + 1],
            de[DIRENT_SIZE_FIELD + 2],
            de[DIRENT_SIZE_FIELD + 3],
        ]));
        if (old_first != 0 && old_first != self.first_cluster)
            || old_size > self.capacity
            || de[11] & (ATTR_DIRECTORY | ATTR_VOLUME_ID) != 0
            || de[0] == 0
            || de[0] == DELETED
        {
            return Err(self.err(format!(
                "directory entry at byte {} (first cluster {old_first}, size {old_size}) is not \
                 this slot's file; the image does not match the slot table",
                self.dirent_offset
            )));
        }
        let new_first = if new_size == 0 { 0 } else { self.first_cluster };
        de[DIRENT_CLUS_HI..DIRENT_CLUS_HI + 2]
            .copy_from_slice(&((new_first >> 16) as u16).to_le_bytes());
        de[DIRENT_CLUS_LO..DIRENT_CLUS_LO + 2].copy_from_slice(&(new_first as u16).to_le_bytes());
        de[DIRENT_SIZE_FIELD..DIRENT_SIZE_FIELD + 4]
            .copy_from_slice(&(new_size as u32).to_le_bytes());
        let mut out = vec![Patch {
            offset: self.dirent_offset,
            bytes: de.to_vec(),
        }];

        let mut old_alloc = 0u32;
        if let Some((start, len)) = self.fat_span() {
            let t = self.fat_type;
            for (i, &fat) in self.fat_offsets.iter().enumerate() {
                let mut buf = vec![0u8; len];
                rd(fat + start, &mut buf)?;
                for k in 0..self.cluster_count {
                    let c = self.first_cluster + k;
                    if i == 0 && get_entry(t, &buf, start, c).unwrap_or(0) != 0 {
                        old_alloc += 1;
                    }
                    let v = if k >= new_n {
                        0
                    } else if k + 1 == new_n {
                        t.eoc()
                    } else {
                        c + 1
                    };
                    if !set_entry(t, &mut buf, start, c, v) {
                        return Err(self.err(format!("FAT entry of cluster {c} out of range")));
                    }
                }
                out.push(Patch {
                    offset: fat + start,
                    bytes: buf,
                });
            }
        }

        if let Some(fi) = self.fsinfo_offset {
            let mut sec = [0u8; SECTOR as usize];
            rd(fi, &mut sec)?;
            let word = |o: usize| u32::from_le_bytes([sec[o], sec[o + 1], sec[o + 2], sec[o + 3]]);
            if word(0) != FSINFO_LEAD_SIG || word(484) != FSINFO_STRUCT_SIG {
                return Err(self.err(format!("no FSInfo signature at byte {fi}")));
            }
            let free = word(FSINFO_FREE_COUNT as usize);
            if free != u32::MAX {
                let new_free = (u64::from(free) + u64::from(old_alloc))
                    .checked_sub(u64::from(new_n))
                    .and_then(|v| u32::try_from(v).ok())
                    .ok_or_else(|| {
                        self.err(format!(
                            "FSInfo free count {free} at byte {fi} is inconsistent with the FAT"
                        ))
                    })?;
                out.push(Patch {
                    offset: fi + FSINFO_FREE_COUNT,
                    bytes: new_free.to_le_bytes().to_vec(),
                });
            }
        }
        out.sort_by_key(|p| p.offset);
        Ok(out)
    }
}
