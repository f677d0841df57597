//! A human-readable dump of an EROFS image: super block fields, then every inode reachable from
//! the root with its nid, offset, layout, size, owner, mode, xattrs and (for compressed files)
//! extent count. For debugging and snapshot tests.

use std::fmt::Write;

use super::layout::*;
use super::reader::{Image, ReadAt};
use super::Error;
use crate::repart::Uuid;

fn layout_name(l: u8) -> &'static str {
    match l {
        datalayout::FLAT_PLAIN => "flat",
        datalayout::COMPRESSED_FULL => "z-full",
        datalayout::FLAT_INLINE => "inline",
        datalayout::COMPRESSED_COMPACT => "z-compact",
        datalayout::CHUNK_BASED => "chunked",
        _ => "?",
    }
}

/// Renders the dump. `max_entries` bounds the number of inodes listed.
pub fn dump<R: ReadAt>(img: &Image<R>, max_entries: usize) -> Result<String, Error> {
    let sb = &img.sb;
    let mut s = String::new();
    let _ = writeln!(s, "super block @1024");
    let _ = writeln!(s, "  magic           {:#010x}", sb.magic.get());
    let _ = writeln!(s, "  checksum        {:#010x}", sb.checksum.get());
    let _ = writeln!(s, "  feature_compat  {:#x}", sb.feature_compat.get());
    let _ = writeln!(s, "  feature_incompat {:#x}", sb.feature_incompat.get());
    let _ = writeln!(s, "  blkszbits       {}", sb.blkszbits);
    let _ = writeln!(s, "  root_nid        {}", sb.root_nid.get());
    let _ = writeln!(s, "  inos            {}", sb.inos.get());
    let _ = writeln!(
        s,
        "  build_time      {}.{:09}",
        sb.build_time.get() as i64,
        sb.build_time_nsec.get()
    );
    let _ = writeln!(s, "  blocks          {}", sb.blocks.get());
    let _ = writeln!(s, "  meta_blkaddr    {}", sb.meta_blkaddr.get());
    let _ = writeln!(s, "  xattr_blkaddr   {}", sb.xattr_blkaddr.get());
    let _ = writeln!(
        s,
        "  uuid            {}",
        Uuid::from_bytes(sb.uuid).simple()
    );
    let _ = writeln!(s, "  compr_algs      {:#x}", sb.available_compr_algs.get());
    let _ = writeln!(
        s,
        "inodes (nid @offset layout mode nlink uid:gid size mtime path)"
    );
    let mut stack = vec![(b"/".to_vec(), u64::from(sb.root_nid.get()))];
    let mut seen = std::collections::BTreeSet::new();
    let mut listed = 0;
    while let Some((path, nid)) = stack.pop() {
        if listed >= max_entries {
            let _ = writeln!(s, "  ... (truncated)");
            break;
        }
        let ino = img.inode(nid)?;
        listed += 1;
        let extra = match ino.layout {
            datalayout::COMPRESSED_FULL | datalayout::COMPRESSED_COMPACT => {
                format!(" extents={} zblocks={}", img.extents(&ino)?.len(), ino.i_u)
            }
            datalayout::CHUNK_BASED => format!(" chunkbits={}", ino.i_u & 0x1f),
            _ if ino.mode & 0o170000 == 0o020000 || ino.mode & 0o170000 == 0o060000 => {
                let (ma, mi) = ino.rdev();
                format!(" rdev={ma}:{mi}")
            }
            _ => format!(" blkaddr={}", ino.i_u),
        };
        let _ = writeln!(
            s,
            "  {:>8} @{:<10} {:<7} {:06o} {:>3} {}:{} {} {}.{:09}{}{} {}",
            nid,
            ino.offset,
            layout_name(ino.layout),
            ino.mode,
            ino.nlink,
            ino.uid,
            ino.gid,
            ino.size,
            ino.mtime.sec,
            ino.mtime.nsec,
            if ino.extended { " ext" } else { "" },
            extra,
            String::from_utf8_lossy(&path)
        );
        for (name, value) in img.xattrs(&ino)? {
            let _ = writeln!(
                s,
                "             xattr {}={}",
                String::from_utf8_lossy(&name),
                hex(&value[..value.len().min(32)])
            );
        }
        if ino.is_dir() && seen.insert(nid) {
            let mut ents = img.read_dir(&ino)?;
            ents.reverse();
            for e in ents {
                if e.name == b"." || e.name == b".." {
                    continue;
                }
                let mut p = if path == b"/" {
                    Vec::new()
                } else {
                    path.clone()
                };
                p.push(b'/');
                p.extend_from_slice(&e.name);
                stack.push((p, e.nid));
            }
        }
    }
    Ok(s)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
