//! Rewriting a slot's inode for a new payload size.
//!
//! A slot is a regular file whose blocks were reserved contiguously when the image was built:
//! the inode maps the payload with initialized extents and the rest of the reservation with
//! unwritten ones (as `fallocate(FALLOC_FL_KEEP_SIZE)` would), all within the four extents
//! the inode itself holds. Injecting a payload of any size up to the capacity rewrites only
//! the inode (size, extent split, checksum) and the data blocks.

use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, IntoBytes};

use super::csum;
use super::extent::{self, Ext};
use super::layout::{Extent, ExtentHeader, Inode, BLOCK_SIZE, EXTENT_MAGIC, INODE_EXTENTS_FL};
use super::plan::slot_extents;
use super::{Error, Result};

fn bad(ino: u32, msg: impl Into<String>) -> Error {
    Error::Slot {
        name: format!("inode {ino}"),
        msg: msg.into(),
    }
}

/// The contiguous reservation `(first block, blocks)` a slot inode maps.
pub fn reservation(inode: &[u8; 256], ino: u32) -> Result<(u64, u64)> {
    let i = Inode::read_from_bytes(inode).map_err(|_| bad(ino, "inode is not 256 bytes"))?;
    if i.flags.get() & INODE_EXTENTS_FL == 0 {
        return Err(bad(ino, "inode does not use extents"));
    }
    let h = ExtentHeader::read_from_bytes(&i.block[..12])
        .map_err(|_| bad(ino, "short extent header"))?;
    if h.magic.get() != EXTENT_MAGIC || h.depth.get() != 0 {
        return Err(bad(ino, "not a slot: extent tree is not held in the inode"));
    }
    let n = usize::from(h.entries.get());
    if n == 0 || n > 4 {
        return Err(bad(ino, format!("not a slot: {n} extents")));
    }
    let mut next_l = 0u64;
    let mut start = None;
    let mut next_p = 0u64;
    for k in 0..n {
        let raw = Extent::read_from_bytes(&i.block[12 + 12 * k..24 + 12 * k])
            .map_err(|_| bad(ino, "short extent"))?;
        let e = Ext::from_raw(&raw);
        if u64::from(e.lblk) != next_l || (start.is_some() && e.pblk != next_p) {
            return Err(bad(ino, "not a slot: the reservation is not contiguous"));
        }
        start.get_or_insert(e.pblk);
        next_l += u64::from(e.len);
        next_p = e.pblk + u64::from(e.len);
    }
    Ok((start.unwrap_or(0), next_l))
}

/// Returns the slot inode `base` (inode number `ino`, filesystem checksum seed `fs_seed`)
/// rewritten for a payload of `new_size` bytes: size, initialized/unwritten extent split and
/// checksum. The caller writes these 256 bytes and the payload (at the slot's data offset).
pub fn rewrite_inode(base: &[u8; 256], fs_seed: u32, ino: u32, new_size: u64) -> Result<[u8; 256]> {
    let (pblk, cap) = reservation(base, ino)?;
    if new_size > cap * BLOCK_SIZE {
        return Err(bad(
            ino,
            format!(
                "payload of {new_size} bytes exceeds the slot capacity of {} bytes",
                cap * BLOCK_SIZE
            ),
        ));
    }
    let exts = slot_extents(pblk, cap, new_size.div_ceil(BLOCK_SIZE));
    if exts.len() > 4 {
        return Err(bad(ino, "payload split needs more than 4 extents"));
    }
    let seed = csum::inode_seed(fs_seed, ino, 0);
    let (root, blocks) = extent::build(&exts, 0, seed);
    debug_assert!(blocks.is_empty());
    let mut i = Inode::read_from_bytes(base).map_err(|_| bad(ino, "inode is not 256 bytes"))?;
    i.block = root;
    i.size_lo = U32::new(new_size as u32);
    i.size_high = U32::new((new_size >> 32) as u32);
    let mut raw = [0u8; 256];
    raw.copy_from_slice(i.as_bytes());
    csum::set_inode(fs_seed, ino, &mut raw);
    Ok(raw)
}
