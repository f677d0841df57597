//! Patching an image already written: a slot file's size in its inode, for `kiln inject`. The
//! writer reserved the slot's blocks and reported where they are ([`SlotLocation`]).

use super::{Error, SlotLocation};
use crate::erofs::layout::*;

/// Rewrites a slot file's size in its inode bytes (`inode` is the 32- or 64-byte inode read at
/// [`SlotLocation::inode_offset`]). The data blocks are not touched: the caller writes the new
/// contents at [`SlotLocation::data_offset`] and zeroes the rest of the old size.
pub fn rewrite_slot_size(
    slot: &SlotLocation,
    inode: &mut [u8],
    new_size: u64,
) -> Result<(), Error> {
    if new_size > slot.capacity {
        return Err(Error::Slot {
            name: slot.name.clone(),
            reason: format!("{new_size} bytes exceed the {} reserved", slot.capacity),
        });
    }
    let need = if slot.extended { 64 } else { 32 };
    if inode.len() < need {
        return Err(Error::Slot {
            name: slot.name.clone(),
            reason: format!("inode buffer of {} bytes, need {need}", inode.len()),
        });
    }
    let format = u16::from_le_bytes([inode[0], inode[1]]);
    let layout = ((format >> I_DATALAYOUT_SHIFT) & 7) as u8;
    let mode = u16::from_le_bytes([inode[4], inode[5]]);
    let i_u = u32::from_le_bytes([inode[16], inode[17], inode[18], inode[19]]);
    if (format & I_VERSION_EXTENDED == 1) != slot.extended
        || layout != datalayout::FLAT_PLAIN
        || mode & 0o170000 != 0o100000
        || u64::from(i_u) * BLOCK != slot.data_offset
    {
        return Err(Error::Slot {
            name: slot.name.clone(),
            reason: format!(
                "inode at offset {} is not a flat slot inode",
                slot.inode_offset
            ),
        });
    }
    if slot.extended {
        inode[8..16].copy_from_slice(&new_size.to_le_bytes());
    } else {
        let s = u32::try_from(new_size).map_err(|_| Error::Slot {
            name: slot.name.clone(),
            reason: "compact inode cannot hold a size over 4 GiB".into(),
        })?;
        inode[8..12].copy_from_slice(&s.to_le_bytes());
    }
    Ok(())
}
