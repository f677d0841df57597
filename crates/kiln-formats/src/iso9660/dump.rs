//! A human-readable dump of an ISO image for debugging and `kiln inspect`: the GPT of a hybrid
//! image, volume descriptors, the El Torito catalog and both trees with record offsets.

use std::fmt::Write;

use super::layout::{PLATFORM_EFI, PLATFORM_X86, SECTOR};
use super::reader::{IsoImage, TreeKind, VolumeInfo};
use super::{IsoError, ReadAt};
use crate::gpt::Gpt;

fn platform_name(p: u8) -> &'static str {
    match p {
        PLATFORM_X86 => "x86 BIOS",
        PLATFORM_EFI => "UEFI",
        1 => "PowerPC",
        2 => "Mac",
        _ => "unknown",
    }
}

fn volume(out: &mut String, title: &str, v: &VolumeInfo) {
    let _ = writeln!(out, "{title} (sector {}):", v.lba);
    let _ = writeln!(out, "  volume id        {:?}", v.volume_id);
    let _ = writeln!(out, "  system id        {:?}", v.system_id);
    let _ = writeln!(out, "  volume set id    {:?}", v.volume_set_id);
    let _ = writeln!(out, "  publisher id     {:?}", v.publisher_id);
    let _ = writeln!(out, "  preparer id      {:?}", v.preparer_id);
    let _ = writeln!(out, "  application id   {:?}", v.application_id);
    let _ = writeln!(
        out,
        "  volume space     {} blocks of {} bytes ({} bytes)",
        v.space_size,
        v.block_size,
        u64::from(v.space_size) * u64::from(v.block_size)
    );
    let _ = writeln!(
        out,
        "  path tables      {} bytes, L at sector {}, M at sector {}",
        v.path_table_size, v.l_path_table, v.m_path_table
    );
    let _ = writeln!(
        out,
        "  root directory   sector {}, {} bytes",
        v.root_lba, v.root_size
    );
    for (name, d) in [
        ("created ", &v.created),
        ("modified", &v.modified),
        ("expires ", &v.expires),
        ("effective", &v.effective),
    ] {
        let _ = writeln!(
            out,
            "  {name:<9}        {} (UTC{:+})",
            String::from_utf8_lossy(&d.digits),
            i32::from(d.gmt_offset) * 15
        );
    }
    if let Some(e) = v.joliet_escape {
        let _ = writeln!(out, "  joliet escape    {:?}", String::from_utf8_lossy(&e));
    }
}

/// Dumps an image of `len` bytes.
pub fn dump(r: &dyn ReadAt, len: u64) -> Result<String, IsoError> {
    let img = IsoImage::open(r, len)?;
    let mut out = String::new();
    let _ = writeln!(out, "image: {len} bytes ({} sectors of 2048)", len / SECTOR);
    match Gpt::read_with(len, |o, b| r.read_at(o, b)) {
        Ok(g) => {
            let _ = writeln!(out, "system area: protective MBR + GPT");
            for line in g.dump().lines() {
                let _ = writeln!(out, "  {line}");
            }
        }
        Err(e) => {
            let _ = writeln!(out, "system area: no GPT ({e})");
        }
    }
    let _ = writeln!(out, "volume descriptors:");
    for (lba, t) in &img.descriptors {
        let name = match t {
            0 => "boot record",
            1 => "primary",
            2 => "supplementary",
            3 => "partition",
            255 => "terminator",
            _ => "unknown",
        };
        let _ = writeln!(out, "  sector {lba:<6} type {t:<3} {name}");
    }
    volume(&mut out, "primary volume descriptor", &img.primary);
    let _ = writeln!(out, "  uuid (blkid)     {}", img.uuid());
    if let Some(j) = &img.joliet {
        volume(&mut out, "joliet volume descriptor", j);
    }
    match &img.rock_ridge {
        Some(rr) => {
            let _ = writeln!(
                out,
                "rock ridge: SP skip {}, extensions {:?}",
                rr.skip, rr.extensions
            );
        }
        None => {
            let _ = writeln!(out, "rock ridge: none");
        }
    }
    match &img.boot {
        Some(c) => {
            let _ = writeln!(
                out,
                "el torito catalog at sector {}: validation platform {:#04x} ({}), id {:?}",
                c.lba,
                c.platform,
                platform_name(c.platform),
                c.id
            );
            for (i, b) in c.images.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "  entry {i}: platform {:#04x} ({}), {}, media {}, load segment {:#06x}, system type {:#04x}, {} x 512 bytes at sector {} (byte {})",
                    b.platform,
                    platform_name(b.platform),
                    if b.bootable { "bootable" } else { "not bootable" },
                    if b.media_type == 0 { "no emulation".to_string() } else { format!("type {}", b.media_type) },
                    b.load_segment,
                    b.system_type,
                    b.sector_count,
                    b.load_rba,
                    u64::from(b.load_rba) * SECTOR
                );
            }
        }
        None => {
            let _ = writeln!(out, "el torito: none");
        }
    }
    for (kind, title) in [
        (TreeKind::Primary, "ISO 9660 tree"),
        (TreeKind::Joliet, "Joliet tree"),
    ] {
        if kind == TreeKind::Joliet && img.joliet.is_none() {
            continue;
        }
        let _ = writeln!(
            out,
            "{title} (record offset, extent, size, mode, uid:gid, mtime, path):"
        );
        for e in img.entries(r, kind)? {
            let (uid, gid) =
                e.rr.as_ref()
                    .and_then(|r| r.px)
                    .map_or((0, 0), |(_, _, u, g)| (u, g));
            let mtime = e.rr.as_ref().and_then(|r| r.mtime).or(e.date);
            let _ = write!(
                out,
                "  @{:<10} lba {:<8} {:>10} {:07o} {uid}:{gid} {} {}",
                e.record_offset,
                e.extent_lba,
                e.size,
                e.mode(),
                mtime.map_or("-".to_string(), |t| t.to_string()),
                String::from_utf8_lossy(&e.path)
            );
            if let Some(t) = e.symlink() {
                let _ = write!(out, " -> {}", String::from_utf8_lossy(t));
            }
            if let Some((ma, mi)) = e.rr.as_ref().and_then(|r| r.device) {
                let _ = write!(out, " [device {ma}:{mi}]");
            }
            if e.extents.len() > 1 {
                let _ = write!(out, " [{} extents]", e.extents.len());
            }
            let id = if kind == TreeKind::Joliet {
                let units: Vec<u16> = e
                    .identifier
                    .chunks_exact(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect();
                String::from_utf16_lossy(&units)
            } else {
                String::from_utf8_lossy(&e.identifier).into_owned()
            };
            let _ = writeln!(out, " [{id}]");
        }
    }
    Ok(out)
}
