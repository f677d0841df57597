//! Where a slot table may write in its image. A table is data from outside (a sidecar, a
//! `--table` file, the bytes at 24576), so before any patch is planned its slots are checked
//! against the image's own structure:
//!
//! - on a GPT disk (either header readable, UEFI 2.10 §5.3), every byte a slot patches lies in
//!   one partition (for a filesystem slot, the partition holding its `fs_offset`), so the
//!   protective MBR, both headers and both entry arrays, which lie outside the usable LBAs,
//!   are never touched;
//! - a hybrid ISO is the exception: its ISO 9660 filesystem starts at byte 0, before the GPT it
//!   carries, in no partition. Its GPT describes the filesystem with a partition starting at the
//!   end of the system area (byte 32768); an ISO 9660 slot there patches only that partition;
//! - the in-image slot table area (24576..32768) is never touched;
//! - an ISO 9660 slot never touches the 32 KiB system area of its filesystem (ECMA-119 §6.2.1);
//! - no slot's metadata touches another slot's data.
//!
//! Without this, a sidecar describing a raw slot at offset 0 let `inject` overwrite the primary
//! GPT (and with `--in-place`, the base's own).

use std::ops::Range;

use kiln_formats::gpt::Gpt;

use crate::slots::{Slot, SlotMeta, SlotTable, MAGIC, TABLE_MAX, TABLE_OFFSET};
use crate::source::ReadAt;
use crate::{Error, Result};

/// ISO 9660's system area: the first 16 sectors of 2048 bytes.
const ISO_SYSTEM_AREA: u64 = 16 * 2048;

/// The structure of an image that slots must respect.
#[derive(Debug)]
pub struct ImageBounds {
    /// Partitions of a GPT disk (byte ranges); `None` when the image has no readable GPT.
    partitions: Option<Vec<Range<u64>>>,
    /// The GPT's usable LBAs as bytes (`None` without a readable GPT).
    usable: Option<Range<u64>>,
    /// The in-image slot table area, when the image holds a table there.
    table_area: Option<Range<u64>>,
}

impl ImageBounds {
    /// Reads what [`ImageBounds::check`] needs from `base`.
    pub fn read(base: &(dyn ReadAt + Sync)) -> Self {
        let len = base.len();
        let gpt = Gpt::read_with(len, |off, buf| {
            let n = base.read_at(off, buf)?;
            if n < buf.len() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("image ends before byte {}", off + buf.len() as u64),
                ));
            }
            Ok(())
        })
        .ok();
        let usable = gpt
            .as_ref()
            .map(|g| g.first_usable_lba * 512..(g.last_usable_lba + 1).saturating_mul(512));
        let partitions = gpt.map(|g| {
            g.partitions
                .iter()
                .map(|p| p.offset()..p.offset().saturating_add(p.size()))
                .collect()
        });
        let mut magic = [0u8; 8];
        let table_area = (base.read_at(TABLE_OFFSET, &mut magic).ok() == Some(8) && magic == MAGIC)
            .then_some(TABLE_OFFSET..TABLE_OFFSET + TABLE_MAX as u64);
        Self {
            partitions,
            usable,
            table_area,
        }
    }

    /// Checks the bytes `slot` would patch: its data ranges and `metadata` (offset, length)
    /// pairs. `table` gives the other slots' data.
    pub fn check(&self, table: &SlotTable, slot: &Slot, metadata: &[(u64, u64)]) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidTable(format!("slot {:?}: {msg}", slot.name)));
        let spans: Vec<(Range<u64>, &str)> = slot
            .data
            .iter()
            .map(|r| (r.offset..r.offset.saturating_add(r.len), "data"))
            .chain(
                metadata
                    .iter()
                    .map(|&(o, l)| (o..o.saturating_add(l), "metadata")),
            )
            .collect();
        let fs_offset = match &slot.meta {
            SlotMeta::Raw(_) => None,
            SlotMeta::Ext4(m) => Some(m.fs_offset),
            SlotMeta::Fat(m) => Some(m.fs_offset),
            SlotMeta::Erofs(m) => Some(m.fs_offset),
            SlotMeta::Iso9660(m) => Some(m.fs_offset),
        };
        // A hybrid ISO's filesystem starts at byte 0, in no partition; its GPT describes it
        // with a partition that starts right after the system area (byte 32768) and runs to the
        // end of the ISO 9660 data. That partition is the slot's home.
        let hybrid_home = match (&slot.meta, fs_offset, &self.partitions) {
            (SlotMeta::Iso9660(_), Some(fs), Some(parts))
                if !parts.iter().any(|p| p.contains(&fs)) =>
            {
                let sys = fs..fs.saturating_add(ISO_SYSTEM_AREA);
                match parts.iter().find(|p| sys.contains(&p.start) || p.start == sys.end) {
                    Some(p) => Some(p.clone()),
                    None => {
                        return bad(format!(
                            "its iso9660 filesystem at byte {fs} is in no GPT partition, and no partition starts in its system area"
                        ))
                    }
                }
            }
            _ => None,
        };
        if let (Some(home), Some(usable)) = (&hybrid_home, &self.usable) {
            for (r, what) in &spans {
                let inside = home.start <= r.start && r.end <= home.end;
                if !inside || r.start < usable.start || r.end > usable.end {
                    return bad(format!(
                        "{what} at bytes {}..{} lies outside the ISO 9660 partition at bytes {}..{} (GPT headers, entry arrays and other partitions are never patched)",
                        r.start, r.end, home.start, home.end
                    ));
                }
            }
        } else if let Some(parts) = &self.partitions {
            let home = match fs_offset {
                Some(fs) => match parts.iter().find(|p| p.contains(&fs)) {
                    Some(p) => Some(p.clone()),
                    None => {
                        return bad(format!(
                            "its {} filesystem at byte {fs} is in no GPT partition",
                            slot.kind()
                        ))
                    }
                },
                None => None,
            };
            for (r, what) in &spans {
                let inside = |p: &Range<u64>| p.start <= r.start && r.end <= p.end;
                let ok = match &home {
                    Some(p) => inside(p),
                    None => parts.iter().any(inside),
                };
                if !ok {
                    return bad(format!(
                        "{what} at bytes {}..{} lies outside {} (GPT headers, entry arrays and gaps are never patched)",
                        r.start,
                        r.end,
                        match &home {
                            Some(p) => format!("its partition at bytes {}..{}", p.start, p.end),
                            None => "every GPT partition".into(),
                        }
                    ));
                }
            }
        }
        if let Some(a) = &self.table_area {
            for (r, what) in &spans {
                if r.start < a.end && a.start < r.end {
                    return bad(format!(
                        "{what} at bytes {}..{} overlaps the slot table at {}..{}",
                        r.start, r.end, a.start, a.end
                    ));
                }
            }
        }
        if let SlotMeta::Iso9660(m) = &slot.meta {
            let sys = m.fs_offset..m.fs_offset.saturating_add(ISO_SYSTEM_AREA);
            for (r, what) in &spans {
                if r.start < sys.end && sys.start < r.end {
                    return bad(format!(
                        "{what} at bytes {}..{} lies in the ISO 9660 system area {}..{}",
                        r.start, r.end, sys.start, sys.end
                    ));
                }
            }
        }
        for other in table.slots.iter().filter(|o| o.name != slot.name) {
            for d in &other.data {
                let od = d.offset..d.offset.saturating_add(d.len);
                for (r, what) in &spans {
                    if r.start < od.end && od.start < r.end {
                        return bad(format!(
                            "{what} at bytes {}..{} overlaps the data of slot {:?} at {}..{}",
                            r.start, r.end, other.name, od.start, od.end
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}
