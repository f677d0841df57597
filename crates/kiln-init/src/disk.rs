//! Finding block devices: the kernel lists them under /sys/class/block (devtmpfs provides the
//! /dev nodes); partitions are matched to GPT entries by their start sector, so the mapping does
//! not depend on how a GPT reader numbers entries.

use std::os::unix::fs::FileExt;

use kiln_formats::gpt::{Gpt, Partition};

/// DPS types of the root and /usr partitions and their verity partitions for the
/// architecture kiln-init is built for (SPECS.md), RFC byte order.
#[cfg(target_arch = "aarch64")]
mod native {
    pub use kiln_formats::gpt::{
        TYPE_ROOT_ARM64 as ROOT, TYPE_ROOT_ARM64_VERITY as ROOT_VERITY, TYPE_USR_ARM64 as USR,
        TYPE_USR_ARM64_VERITY as USR_VERITY,
    };
    /// The DPS name of [`ROOT`], for messages.
    pub const ROOT_NAME: &str = "root-arm64";
}
#[cfg(not(target_arch = "aarch64"))]
mod native {
    pub use kiln_formats::gpt::{
        TYPE_ROOT_X86_64 as ROOT, TYPE_ROOT_X86_64_VERITY as ROOT_VERITY, TYPE_USR_X86_64 as USR,
        TYPE_USR_X86_64_VERITY as USR_VERITY,
    };
    /// The DPS name of [`ROOT`], for messages.
    pub const ROOT_NAME: &str = "root-x86-64";
}
pub use kiln_formats::gpt::TYPE_VAR as VAR;
pub use native::{ROOT, ROOT_NAME, ROOT_VERITY, USR, USR_VERITY};

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

/// The dm-verity slot named `name`: a root (or /usr) data partition and its verity partition of
/// the matching type, both with GPT name `name`, on the same disk. systemd-sysupdate names the
/// partitions of a slot it fills after the version it wrote (`NAME_VERSION`).
pub fn verity_pair_by_name(parts: &[Found], name: &str) -> Option<(Found, Found)> {
    parts.iter().filter(|d| d.entry.name == name).find_map(|d| {
        let hash_type = match d.entry.type_guid {
            ROOT => ROOT_VERITY,
            USR => USR_VERITY,
            _ => return None,
        };
        parts
            .iter()
            .find(|h| h.disk == d.disk && h.entry.type_guid == hash_type && h.entry.name == name)
            .map(|h| (d.clone(), h.clone()))
    })
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
                p.entry.type_guid, p.entry.part_guid, p.entry.name
            ));
        }
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn found(disk: &str, n: u32, type_guid: Uuid, name: &str) -> Found {
        Found {
            dev: BlockDev {
                name: format!("{disk}{n}"),
                major: 254,
                minor: n,
                parent: Some((disk.into(), u64::from(n) * 2048)),
                sectors: 2048,
            },
            disk: disk.into(),
            entry: Partition {
                type_guid,
                part_guid: Uuid::from_bytes([n as u8; 16]),
                first_lba: u64::from(n) * 2048,
                last_lba: u64::from(n) * 2048 + 2047,
                attributes: 0,
                name: name.into(),
            },
        }
    }

    #[test]
    fn pair_by_name_matches_types_and_disk() {
        let parts = vec![
            found("vda", 2, ROOT, "os_1"),
            found("vda", 3, ROOT_VERITY, "os_1"),
            found("vda", 4, ROOT, "os_2"),
            // The hash partition named os_2 lives on another disk: not a pair.
            found("vdb", 1, ROOT_VERITY, "os_2"),
            found("vda", 5, USR, "usr_3"),
            found("vda", 6, USR_VERITY, "usr_3"),
            found("vda", 7, VAR, "var_4"),
            found("vda", 8, ROOT_VERITY, "var_4"),
        ];
        let (d, h) = verity_pair_by_name(&parts, "os_1").unwrap();
        assert_eq!((d.dev.name.as_str(), h.dev.name.as_str()), ("vda2", "vda3"));
        assert!(verity_pair_by_name(&parts, "os_2").is_none());
        let (d, h) = verity_pair_by_name(&parts, "usr_3").unwrap();
        assert_eq!((d.dev.name.as_str(), h.dev.name.as_str()), ("vda5", "vda6"));
        assert!(verity_pair_by_name(&parts, "var_4").is_none());
        assert!(verity_pair_by_name(&parts, "_empty").is_none());
    }
}
