//! A human-readable dump of an ext4 image (superblock, groups, inodes, directory tree) for
//! debugging and snapshot tests. The format is kiln's own, loosely following `dumpe2fs`.

use std::fmt::Write as _;

use super::layout::*;
use super::reader::{ReadAt, Reader};
use super::Result;
use crate::repart::Uuid;

/// The superblock and every group descriptor.
pub fn superblock<R: ReadAt>(r: &Reader<R>) -> String {
    let s = r.superblock();
    let mut o = String::new();
    let label = String::from_utf8_lossy(&s.volume_name)
        .trim_end_matches('\0')
        .to_string();
    let _ = writeln!(o, "superblock @1024");
    let _ = writeln!(o, "  label            {label:?}");
    let _ = writeln!(o, "  uuid             {}", Uuid::from_bytes(s.uuid));
    let _ = writeln!(o, "  hash seed        {}", Uuid::from_bytes(s.hash_seed));
    let _ = writeln!(
        o,
        "  blocks           {} (free {})",
        r.blocks(),
        join(s.free_blocks_count_lo.get(), s.free_blocks_count_hi.get())
    );
    let _ = writeln!(
        o,
        "  inodes           {} (free {})",
        s.inodes_count.get(),
        s.free_inodes_count.get()
    );
    let _ = writeln!(o, "  blocks/group     {}", s.blocks_per_group.get());
    let _ = writeln!(o, "  inodes/group     {}", s.inodes_per_group.get());
    let _ = writeln!(o, "  inode size       {}", s.inode_size.get());
    let _ = writeln!(
        o,
        "  features         compat {:#x} incompat {:#x} ro_compat {:#x}",
        s.feature_compat.get(),
        s.feature_incompat.get(),
        s.feature_ro_compat.get()
    );
    let _ = writeln!(o, "  flags            {:#x}", s.flags.get());
    let _ = writeln!(o, "  first meta bg    {}", s.first_meta_bg.get());
    let _ = writeln!(o, "  journal inode    {}", s.journal_inum.get());
    let _ = writeln!(o, "  mkfs time        {}", s.mkfs_time.get());
    let _ = writeln!(o, "  checksum         {:#010x}", s.checksum.get());
    for (g, d) in r.groups().iter().enumerate() {
        let _ = writeln!(
            o,
            "group {g}: block bitmap {} inode bitmap {} inode table {} free blocks {} free inodes {} dirs {} unused {} flags {:#x} csum {:#06x}",
            d.block_bitmap(),
            d.inode_bitmap(),
            d.inode_table(),
            d.free_blocks(),
            d.free_inodes(),
            d.used_dirs(),
            d.itable_unused(),
            d.flags.get(),
            d.checksum.get()
        );
    }
    o
}

/// One inode's fields and mapping.
pub fn inode<R: ReadAt>(r: &Reader<R>, ino: u32) -> Result<String> {
    let i = r.inode(ino)?;
    let mut o = String::new();
    let _ = writeln!(o, "inode {ino} @{}", r.inode_offset(ino)?);
    let _ = writeln!(
        o,
        "  mode {:o} uid {} gid {} links {} size {} sectors {} flags {:#x}",
        i.mode.get(),
        i.uid(),
        i.gid(),
        i.links_count.get(),
        i.size(),
        i.sectors(),
        i.flags.get()
    );
    let m = Reader::<R>::mtime(&i);
    let _ = writeln!(
        o,
        "  mtime {}.{:09} xattr block {}",
        m.sec,
        m.nsec,
        i.file_acl()
    );
    for e in r.extents(ino, &i)? {
        let _ = writeln!(
            o,
            "  extent {}..{} -> {}{}",
            e.lblk,
            u64::from(e.lblk) + u64::from(e.len),
            e.pblk,
            if e.unwritten { " (unwritten)" } else { "" }
        );
    }
    for (n, v) in r.xattrs(ino)? {
        let _ = writeln!(
            o,
            "  xattr {} = {} bytes",
            String::from_utf8_lossy(&n),
            v.len()
        );
    }
    Ok(o)
}

/// Every path with its inode, mode and size, depth first in directory order.
pub fn tree<R: ReadAt>(r: &Reader<R>) -> Result<String> {
    let mut o = String::new();
    let mut stack = vec![(b"/".to_vec(), ROOT_INO)];
    let mut guard = 0u64;
    while let Some((path, ino)) = stack.pop() {
        guard += 1;
        if guard > u64::from(r.superblock().inodes_count.get()) + 1 {
            break; // a directory cycle in a corrupt image
        }
        let i = r.inode(ino)?;
        let _ = writeln!(
            o,
            "{:>8} {:06o} {:>12} {}",
            ino,
            i.mode.get(),
            i.size(),
            String::from_utf8_lossy(&path)
        );
        if i.mode.get() & 0o170000 == 0o040000 {
            let mut ents = r.dir_entries(ino)?;
            ents.retain(|e| e.name != b"." && e.name != b"..");
            ents.sort_by(|a, b| b.name.cmp(&a.name));
            for e in ents {
                let mut p = path.clone();
                if p.len() > 1 {
                    p.push(b'/');
                }
                p.extend_from_slice(&e.name);
                stack.push((p, e.ino));
            }
        }
    }
    Ok(o)
}
