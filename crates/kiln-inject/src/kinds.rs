//! The filesystem slot kinds. For each, read the base bytes the slot table points at, check
//! that they still describe the slot's reservation (a stale or wrong table must fail before
//! anything is patched, never scribble over other structures), and compute the metadata
//! patches for a payload of a new length. The byte-level rewrites belong to the formats:
//!
//! - ext4: [`kiln_formats::ext4::slot::rewrite_inode`] (size, initialized/unwritten extent
//!   split, metadata_csum inode checksum);
//! - FAT: [`kiln_formats::fat::SlotLocation::patches`] (8.3 entry, FAT chains in every copy,
//!   FAT32 FSInfo free count);
//! - EROFS: [`kiln_formats::erofs::rewrite_slot_size`] (the inode's size field; EROFS has no
//!   inode checksums);
//! - ISO 9660: [`kiln_formats::iso9660::slot`] (the both-endian data length of every directory
//!   record pointing at the extent, ECMA-119 §9.1.4).
//!
//! Every read goes through the [`Overlay`] of the patches planned so far, so two slots in one
//! filesystem that touch the same structure (FAT sectors, the FSInfo sector) compose: the
//! second sees the first's result, and the overlay merges both into one region.

use std::collections::BTreeMap;
use std::io;

use kiln_formats::{erofs, ext4, fat, iso9660};

use crate::slots::{ByteRange, ErofsMeta, Ext4Meta, FatMeta, IsoMeta, Slot};
use crate::source::ReadAt;
use crate::{Error, Result};

/// The base seen through the metadata patches planned so far. Patches are kept merged:
/// sorted, pairwise disjoint and not adjacent.
pub(crate) struct Overlay<'a> {
    base: &'a (dyn ReadAt + Sync),
    patches: BTreeMap<u64, Vec<u8>>,
}

impl<'a> Overlay<'a> {
    pub(crate) fn new(base: &'a (dyn ReadAt + Sync)) -> Self {
        Self {
            base,
            patches: BTreeMap::new(),
        }
    }

    /// Fills `buf` from `offset`: base bytes with the patches applied.
    pub(crate) fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.base.read_exact_at(offset, buf)?;
        let end = offset.saturating_add(buf.len() as u64);
        for (&po, pb) in self.patches.range(..end).rev() {
            let pend = po + pb.len() as u64;
            if pend <= offset {
                break;
            }
            let lo = po.max(offset);
            let hi = pend.min(end);
            // In range by construction: lo..hi lies inside both the patch and the buffer.
            let (src, dst) = ((lo - po) as usize, (lo - offset) as usize);
            let n = (hi - lo) as usize;
            buf[dst..dst + n].copy_from_slice(&pb[src..src + n]);
        }
        Ok(())
    }

    /// Adds a patch; it wins over earlier ones where they overlap, and is merged with every
    /// patch it overlaps or touches.
    pub(crate) fn add(&mut self, offset: u64, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let end = offset.saturating_add(bytes.len() as u64);
        let touching: Vec<u64> = self
            .patches
            .range(..=end)
            .rev()
            .take_while(|(&po, pb)| po + Vec::len(pb) as u64 >= offset)
            .map(|(&po, _)| po)
            .collect();
        let mut start = offset;
        let mut stop = end;
        for po in &touching {
            if let Some(pb) = self.patches.get(po) {
                start = start.min(*po);
                stop = stop.max(po + pb.len() as u64);
            }
        }
        let mut merged = vec![0u8; (stop - start) as usize];
        for po in touching {
            if let Some(pb) = self.patches.remove(&po) {
                let at = (po - start) as usize;
                merged[at..at + pb.len()].copy_from_slice(&pb);
            }
        }
        let at = (offset - start) as usize;
        merged[at..at + bytes.len()].copy_from_slice(bytes);
        self.patches.insert(start, merged);
    }

    /// The merged patches, sorted by offset.
    pub(crate) fn into_patches(self) -> impl Iterator<Item = (u64, Vec<u8>)> {
        self.patches.into_iter()
    }
}

/// A filesystem inside the image, for the format readers (their offsets are relative to it).
struct Window<'o, 'a> {
    src: &'o Overlay<'a>,
    offset: u64,
}

impl Window<'_, '_> {
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let abs = self.offset.checked_add(offset).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "offset overflows the image")
        })?;
        self.src.read(abs, buf)
    }
}

impl kiln_formats::io::ReadAt for Window<'_, '_> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read(offset, buf)
    }
}

/// Metadata patches: (absolute offset, new bytes).
pub(crate) type Patches = Vec<(u64, Vec<u8>)>;

/// Builds the error for `slot` whose filesystem starts at `fs_offset`.
fn mismatch(slot: &Slot, fs_offset: u64) -> impl Fn(String) -> Error + '_ {
    move |msg| Error::Base {
        slot: slot.name.clone(),
        kind: slot.kind(),
        fs_offset,
        msg,
    }
}

/// The slot's single data range (every filesystem kind reserves one contiguous run).
fn one_range(slot: &Slot, err: &dyn Fn(String) -> Error) -> Result<ByteRange> {
    match slot.data.as_slice() {
        [d] => Ok(*d),
        other => Err(err(format!(
            "expected one contiguous data range, the slot table lists {}",
            other.len()
        ))),
    }
}

/// ext4 (`EXT4_FEATURE_INCOMPAT_RECOVER`): the journal holds transactions not yet replayed;
/// replaying them after injection could overwrite the patched inode.
const EXT4_INCOMPAT_RECOVER: u32 = 0x0004;
/// ext4 (`EXT4_FEATURE_INCOMPAT_CSUM_SEED`): the checksum seed is stored in the superblock
/// instead of derived from the UUID; kiln's reader derives it from the UUID.
const EXT4_INCOMPAT_CSUM_SEED: u32 = 0x2000;
/// `S_IFMT` / `S_IFREG` (POSIX st_mode).
const S_IFMT: u16 = 0o170000;
const S_IFREG: u16 = 0o100000;

/// ext4: the slot inode rewritten for `len` bytes.
pub(crate) fn ext4(slot: &Slot, m: &Ext4Meta, src: &Overlay, len: u64) -> Result<Patches> {
    let err = mismatch(slot, m.fs_offset);
    let d = one_range(slot, &err)?;
    let inner = |e: ext4::Error| err(format!("{e} (offset within the filesystem)"));
    let win = Window {
        src,
        offset: m.fs_offset,
    };
    let r = ext4::reader::Reader::open(&win).map_err(inner)?;
    let sb = r.superblock();
    let incompat = sb.feature_incompat.get();
    if incompat & EXT4_INCOMPAT_RECOVER != 0 {
        return Err(err(
            "the filesystem needs journal recovery (it was not cleanly unmounted); run e2fsck \
             on it first"
                .into(),
        ));
    }
    if incompat & EXT4_INCOMPAT_CSUM_SEED != 0 {
        return Err(err(
            "the filesystem stores its checksum seed in the superblock (metadata_csum_seed), \
             which slot injection does not support"
                .into(),
        ));
    }
    if sb.inode_size.get() != 256 {
        return Err(err(format!(
            "inodes are {} bytes; slots need 256-byte inodes",
            sb.inode_size.get()
        )));
    }
    let at = r
        .inode_offset(m.inode)
        .map_err(inner)?
        .checked_add(m.fs_offset)
        .ok_or_else(|| err("inode offset overflows".into()))?;
    if at != m.inode_offset {
        return Err(err(format!(
            "the slot table puts inode {} at image byte {}, the filesystem at {at}; the table \
             does not describe this image",
            m.inode, m.inode_offset
        )));
    }
    let raw = r.inode_raw(m.inode).map_err(inner)?;
    let inode = r.inode(m.inode).map_err(inner)?;
    if inode.mode.get() & S_IFMT != S_IFREG || inode.links_count.get() == 0 {
        return Err(err(format!(
            "inode {} at image byte {at} is not a regular file in use (mode {:o}, {} links)",
            m.inode,
            inode.mode.get(),
            inode.links_count.get()
        )));
    }
    let (pblk, blocks) = ext4::slot::reservation(&raw, m.inode).map_err(inner)?;
    let block = ext4::layout::BLOCK_SIZE;
    let (start, bytes) = (
        pblk.checked_mul(block)
            .and_then(|b| b.checked_add(m.fs_offset)),
        blocks.checked_mul(block),
    );
    if start != Some(d.offset) || bytes != Some(d.len) {
        return Err(err(format!(
            "inode {} at image byte {at} maps blocks {pblk}..{} but the slot table's data range \
             is image bytes {}..{}; the table does not describe this image",
            m.inode,
            pblk.saturating_add(blocks),
            d.offset,
            d.offset.saturating_add(d.len)
        )));
    }
    let new = ext4::slot::rewrite_inode(&raw, r.checksum_seed(), m.inode, len).map_err(inner)?;
    Ok(vec![(m.inode_offset, new.to_vec())])
}

/// FAT: directory entry, FAT chains and FSInfo for `len` bytes.
pub(crate) fn fat(slot: &Slot, m: &FatMeta, src: &Overlay, len: u64) -> Result<Patches> {
    let err = mismatch(slot, m.fs_offset);
    let d = one_range(slot, &err)?;
    let inner = |e: fat::FatError| err(format!("{e}"));
    let fs = m.fs_offset;
    let r = fat::FatReader::open(|off: u64, buf: &mut [u8]| src.read(fs.saturating_add(off), buf))
        .map_err(|e| err(format!("{e} (offset within the filesystem)")))?;
    let g = r.geometry;
    let fat_type = match m.fat_bits {
        12 => fat::FatType::Fat12,
        16 => fat::FatType::Fat16,
        32 => fat::FatType::Fat32,
        b => {
            return Err(err(format!(
                "the slot table says FAT{b}; expected 12, 16 or 32"
            )))
        }
    };
    let abs = |o: u64| fs.saturating_add(o);
    let fats: Vec<u64> = (0..g.num_fats).map(|i| abs(g.fat_offset(i))).collect();
    let mut wrong = Vec::new();
    if g.fat_type != fat_type {
        wrong.push(format!(
            "FAT{} (the table says FAT{})",
            g.fat_type.bits(),
            m.fat_bits
        ));
    }
    if g.cluster_size() != m.cluster_size {
        wrong.push(format!(
            "{}-byte clusters (the table says {})",
            g.cluster_size(),
            m.cluster_size
        ));
    }
    if fats != m.fat_offsets {
        wrong.push(format!(
            "FATs at image bytes {fats:?} (the table says {:?})",
            m.fat_offsets
        ));
    }
    let expect_fsinfo = g.fsinfo_offset().map(abs);
    if expect_fsinfo != m.fsinfo_offset {
        wrong.push(format!(
            "FSInfo at {expect_fsinfo:?} (the table says {:?})",
            m.fsinfo_offset
        ));
    }
    let last = u64::from(m.first_cluster) + u64::from(m.cluster_count);
    if m.first_cluster < 2 || m.cluster_count == 0 || last > u64::from(g.cluster_count) + 2 {
        wrong.push(format!(
            "clusters 2..{} (the table reserves {} clusters from {})",
            u64::from(g.cluster_count) + 2,
            m.cluster_count,
            m.first_cluster
        ));
    } else {
        let want = abs(g.cluster_offset(m.first_cluster));
        let want_len = u64::from(m.cluster_count) * u64::from(g.cluster_size());
        if d.offset != want || d.len != want_len {
            wrong.push(format!(
                "cluster {} at image byte {want}, {want_len} bytes for {} clusters (the table's \
                 data range is {}+{})",
                m.first_cluster, m.cluster_count, d.offset, d.len
            ));
        }
    }
    let fs_end = abs(g.size());
    if m.dirent_offset < fs || m.dirent_offset.saturating_add(32) > fs_end {
        wrong.push(format!(
            "the directory entry at image byte {} lies outside the filesystem (bytes {fs}..{fs_end})",
            m.dirent_offset
        ));
    }
    if !wrong.is_empty() {
        return Err(err(format!(
            "the filesystem has {}; the table does not describe this image",
            wrong.join(", ")
        )));
    }
    let loc = fat::SlotLocation {
        name: slot.name.clone(),
        dirent_offset: m.dirent_offset,
        first_cluster: m.first_cluster,
        cluster_count: m.cluster_count,
        data_offset: d.offset,
        capacity: slot.capacity,
        fat_offsets: m.fat_offsets.clone(),
        fsinfo_offset: m.fsinfo_offset,
        cluster_size: m.cluster_size,
        fat_type,
        initial_size: slot.default.len,
    };
    let patches = loc
        .patches(len, &mut |off, buf| src.read(off, buf))
        .map_err(inner)?;
    Ok(patches.into_iter().map(|p| (p.offset, p.bytes)).collect())
}

/// EROFS: the slot inode's size field for `len` bytes.
pub(crate) fn erofs(slot: &Slot, m: &ErofsMeta, src: &Overlay, len: u64) -> Result<Patches> {
    let err = mismatch(slot, m.fs_offset);
    let d = one_range(slot, &err)?;
    let inner = |e: erofs::Error| err(format!("{e} (offset within the filesystem)"));
    let win = Window {
        src,
        offset: m.fs_offset,
    };
    let img = erofs::Image::open(&win).map_err(inner)?;
    let info = img.inode(m.nid).map_err(inner)?;
    let at = info.offset.saturating_add(m.fs_offset);
    if at != m.inode_offset || info.extended != m.extended {
        return Err(err(format!(
            "nid {} is {} inode at image byte {at}, the slot table says {} at {}; the table \
             does not describe this image",
            m.nid,
            if info.extended {
                "an extended"
            } else {
                "a compact"
            },
            if m.extended { "extended" } else { "compact" },
            m.inode_offset
        )));
    }
    let fs_len = u64::from(img.sb.blocks.get()).saturating_mul(erofs::layout::BLOCK);
    let rel = d.offset.checked_sub(m.fs_offset);
    if rel.is_none_or(|r| r.saturating_add(d.len) > fs_len) {
        return Err(err(format!(
            "the data range {}+{} lies outside the {fs_len}-byte filesystem",
            d.offset, d.len
        )));
    }
    let loc = erofs::SlotLocation {
        name: slot.name.clone(),
        nid: m.nid,
        inode_offset: m.inode_offset,
        data_offset: rel.unwrap_or(0),
        capacity: slot.capacity.min(d.len),
        extended: m.extended,
    };
    let mut raw = vec![0u8; if m.extended { 64 } else { 32 }];
    src.read(m.inode_offset, &mut raw).map_err(|e| {
        err(format!(
            "reading the inode at image byte {}: {e}",
            m.inode_offset
        ))
    })?;
    erofs::rewrite_slot_size(&loc, &mut raw, len).map_err(|e| err(e.to_string()))?;
    Ok(vec![(m.inode_offset, raw)])
}

/// ISO 9660: the data length of every directory record pointing at the extent.
pub(crate) fn iso9660(slot: &Slot, m: &IsoMeta, src: &Overlay, len: u64) -> Result<Patches> {
    let err = mismatch(slot, m.fs_offset);
    let d = one_range(slot, &err)?;
    let sector = iso9660::layout::SECTOR;
    let want = u64::from(m.extent_lba)
        .checked_mul(sector)
        .and_then(|o| o.checked_add(m.fs_offset));
    if want != Some(d.offset) {
        return Err(err(format!(
            "extent LBA {} is not at the slot's data offset {}",
            m.extent_lba, d.offset
        )));
    }
    if m.record_offsets.is_empty() {
        return Err(err("the slot table lists no directory records".into()));
    }
    let win = Window { src, offset: 0 };
    iso9660::slot::verify_records(&win, m.extent_lba, &m.record_offsets)
        .map_err(|e| err(e.to_string()))?;
    let patches = iso9660::slot::record_size_patches(&m.record_offsets, len)
        .map_err(|e| err(e.to_string()))?;
    Ok(patches.into_iter().map(|p| (p.offset, p.data)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_merges_and_reads_through() {
        let base: Vec<u8> = (0..64u8).collect();
        let mut o = Overlay::new(&base);
        o.add(10, &[0xA0; 4]); // 10..14
        o.add(20, &[0xB0; 2]); // 20..22
        o.add(14, &[0xC0; 2]); // touches the first: merged 10..16
        o.add(12, &[0xD0; 10]); // spans both: 10..22
        let mut buf = [0u8; 16];
        o.read(8, &mut buf).unwrap();
        assert_eq!(
            buf,
            [
                8, 9, 0xA0, 0xA0, 0xD0, 0xD0, 0xD0, 0xD0, 0xD0, 0xD0, 0xD0, 0xD0, 0xD0, 0xD0, 22,
                23
            ]
        );
        o.add(40, &[1]);
        let p: Vec<(u64, Vec<u8>)> = o.into_patches().collect();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].0, 10);
        assert_eq!(p[0].1.len(), 12);
        assert_eq!(p[1], (40, vec![1]));
    }
}
