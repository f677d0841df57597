//! A minimal GPT reader (UEFI 2.10 §5.3): the primary header at LBA 1 and its partition
//! entries, enough to find partitions by type and partition UUID. It mirrors the shape of
//! `kiln_formats::gpt::Gpt` (UUIDs in RFC byte order) so the two are interchangeable; kiln-init
//! switches to the shared reader once it is available.

use std::os::unix::fs::FileExt;

/// One used partition entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// Partition type GUID, RFC byte order.
    pub type_guid: [u8; 16],
    /// Unique partition GUID, RFC byte order.
    pub part_guid: [u8; 16],
    /// First LBA (inclusive).
    pub first_lba: u64,
    /// Last LBA (inclusive).
    pub last_lba: u64,
    /// Attribute bits.
    pub attributes: u64,
    /// Partition name (UTF-16LE decoded).
    pub name: String,
}

/// A partition table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gpt {
    /// Disk GUID, RFC byte order.
    pub disk_guid: [u8; 16],
    /// Used entries in table order.
    pub partitions: Vec<Partition>,
}

/// GPT stores the first three GUID fields little-endian; RFC order is big-endian throughout.
pub fn guid_to_rfc(g: &[u8; 16]) -> [u8; 16] {
    let mut u = *g;
    u[0..4].reverse();
    u[4..6].reverse();
    u[6..8].reverse();
    u
}

impl Gpt {
    /// Reads the primary GPT of a device with `lba` bytes per logical block.
    pub fn read(f: &std::fs::File, lba: u64) -> Result<Self, String> {
        let mut h = [0u8; 92];
        f.read_exact_at(&mut h, lba)
            .map_err(|e| format!("read GPT header at {lba}: {e}"))?;
        if &h[0..8] != b"EFI PART" {
            return Err(format!("no GPT header (\"EFI PART\") at offset {lba}"));
        }
        let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let mut disk = [0u8; 16];
        disk.copy_from_slice(&h[56..72]);
        let entries_lba = u64_at(72);
        let count = u32_at(80) as u64;
        let size = u32_at(84) as u64;
        if !(128..=4096).contains(&size) || count > 16384 {
            return Err(format!(
                "GPT header at {lba}: implausible table ({count} entries of {size} bytes)"
            ));
        }
        let mut table = vec![0u8; (count * size) as usize];
        f.read_exact_at(&mut table, entries_lba * lba)
            .map_err(|e| format!("read GPT entries at LBA {entries_lba}: {e}"))?;
        let mut partitions = Vec::new();
        for e in table.chunks_exact(size as usize) {
            let mut t = [0u8; 16];
            t.copy_from_slice(&e[0..16]);
            if t == [0; 16] {
                continue;
            }
            let mut p = [0u8; 16];
            p.copy_from_slice(&e[16..32]);
            let le = |o: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&e[o..o + 8]);
                u64::from_le_bytes(b)
            };
            let units: Vec<u16> = e[56..128]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|&c| c != 0)
                .collect();
            partitions.push(Partition {
                type_guid: guid_to_rfc(&t),
                part_guid: guid_to_rfc(&p),
                first_lba: le(32),
                last_lba: le(40),
                attributes: le(48),
                name: String::from_utf16_lossy(&units),
            });
        }
        Ok(Gpt {
            disk_guid: guid_to_rfc(&disk),
            partitions,
        })
    }
}
