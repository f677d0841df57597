//! Finding block devices: the kernel lists them under /sys/class/block (devtmpfs provides the
//! /dev nodes); partitions are matched to GPT entries by their start sector, so the mapping does
//! not depend on how a GPT reader numbers entries.

use std::os::unix::fs::FileExt;

use kiln_formats::gpt::{Gpt, Partition};

/// DPS type of the x86-64 root partition (SPECS.md), RFC byte order.
pub const ROOT_X86_64: [u8; 16] = [
    0x4f, 0x68, 0xbc, 0xe3, 0xe8, 0xcd, 0x4d, 0xb1, 0x96, 0xe7, 0xfb, 0xca, 0xf9, 0x84, 0xb7, 0x09,
];
/// DPS type of /var, RFC byte order.
pub const VAR: [u8; 16] = [
    0x4d, 0x21, 0xb0, 0x16, 0xb5, 0x34, 0x45, 0xc2, 0xa9, 0xfb, 0x5c, 0x16, 0xe0, 0x91, 0xfd, 0x2d,
];

/// A block device the kernel knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockDev {
    /// Kernel name (`vda`, `vda2`, `sr0`).
    pub name: String,
    /// Device number.
    pub major: u32,
    /// Device number.
    pub minor: u32,
    /// For a partition: the whole disk's name and the start in 512-byte sectors.
    pub parent: Option<(String, u64)>,
    /// Size in 512-byte sectors.
    pub sectors: u64,
}

impl BlockDev {
    /// `/dev/NAME`.
    pub fn path(&self) -> String {
        format!("/dev/{}", self.name)
    }

    /// `MAJOR:MINOR`, how device-mapper tables name devices.
    pub fn devno(&self) -> String {
        format!("{}:{}", self.major, self.minor)
    }
}

fn read_trim(p: &str) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Every block device with a non-zero size, sorted by name (whole disks before their
/// partitions).
pub fn list() -> Vec<BlockDev> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/sys/class/block") else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let base = format!("/sys/class/block/{name}");
        let Some(dev) = read_trim(&format!("{base}/dev")) else {
            continue;
        };
        let Some((ma, mi)) = dev.split_once(':') else {
            continue;
        };
        let (Ok(major), Ok(minor)) = (ma.parse(), mi.parse()) else {
            continue;
        };
        let sectors: u64 = read_trim(&format!("{base}/size"))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if sectors == 0 {
            continue;
        }
        let parent = if std::path::Path::new(&format!("{base}/partition")).exists() {
            let start = read_trim(&format!("{base}/start")).and_then(|s| s.parse().ok());
            let disk = std::fs::canonicalize(&base).ok().and_then(|p| {
                p.parent()
                    .and_then(|d| d.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
            });
            match (disk, start) {
                (Some(d), Some(s)) => Some((d, s)),
                _ => continue,
            }
        } else {
            None
        };
        out.push(BlockDev {
            name,
            major,
            minor,
            parent,
            sectors,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Reads the first `len` bytes of a device (fewer if it is smaller).
pub fn read_head(dev: &BlockDev, len: usize) -> Result<Vec<u8>, String> {
    let f = std::fs::File::open(dev.path()).map_err(|e| format!("open {}: {e}", dev.path()))?;
    let len = len.min((dev.sectors * 512) as usize);
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, 0)
        .map_err(|e| format!("read {}: {e}", dev.path()))?;
    Ok(b)
}

/// A GPT partition that the kernel has created a device for.
#[derive(Clone, Debug)]
pub struct Found {
    /// The partition's device.
    pub dev: BlockDev,
    /// The whole disk it is on.
    pub disk: String,
    /// Its GPT entry.
    pub entry: Partition,
}

/// Every GPT partition of every disk, matched to its partition device. Disks without a GPT are
/// skipped; partitions whose device has not appeared yet are left out.
pub fn gpt_partitions(devs: &[BlockDev]) -> Vec<Found> {
    let mut out = Vec::new();
    for disk in devs.iter().filter(|d| d.parent.is_none()) {
        let Ok(f) = std::fs::File::open(disk.path()) else {
            continue;
        };
        // kiln_formats::gpt reads 512-byte-sector tables (what kiln and every image tool
        // write); disks with 4 KiB logical blocks are not boot media kiln produces.
        let Ok(gpt) = Gpt::read(&f) else {
            continue;
        };
        for entry in gpt.partitions {
            let start = entry.first_lba;
            if let Some(dev) = devs
                .iter()
                .find(|d| d.parent.as_ref() == Some(&(disk.name.clone(), start)))
            {
                out.push(Found {
                    dev: dev.clone(),
                    disk: disk.name.clone(),
                    entry,
                });
            }
        }
    }
    out
}

/// One line per device for "not found" messages.
pub fn describe(devs: &[BlockDev], parts: &[Found]) -> String {
    if devs.is_empty() {
        return "no block devices at all (missing storage driver module?)".into();
    }
    let mut s = String::new();
    for d in devs {
        s.push_str(&format!(
            "\n  {} ({}, {} sectors)",
            d.name,
            d.devno(),
            d.sectors
        ));
        if let Some(p) = parts.iter().find(|p| p.dev.name == d.name) {
            s.push_str(&format!(
                " type {} uuid {} {:?}",
                kiln_init::config::format_uuid(&p.entry.type_guid),
                kiln_init::config::format_uuid(&p.entry.part_guid),
                p.entry.name
            ));
        }
    }
    s
}
