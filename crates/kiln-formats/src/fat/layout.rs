//! FAT on-disk structures and geometry (fatgen103 §3 boot sector and BPB, §4 FAT, §5 FSInfo,
//! §6 directory entries, §7 long name entries), and the size rules of dosfstools' mkfs.fat.

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::FatError;

/// Sector size kiln writes (the only one UEFI firmware reliably handles on removable media).
pub const SECTOR: u32 = 512;
/// Number of FAT copies.
pub const NUM_FATS: u32 = 2;
/// Media descriptor for fixed disks.
pub const MEDIA_FIXED: u8 = 0xF8;
/// Root directory entries of FAT12/16 before cluster alignment (mkfs.fat's default).
pub const ROOT_ENTRIES: u32 = 512;
/// Extended boot signature: volume id, label and type fields follow.
pub const EXT_BOOT_SIG: u8 = 0x29;
/// BIOS drive number for fixed disks.
pub const DRIVE_FIXED: u8 = 0x80;
/// Largest FAT12 cluster count mkfs.fat creates (fatgen103 says < 4085).
pub const MAX_CLUST_12: u32 = 4084;
/// Smallest FAT16 cluster count mkfs.fat creates (a margin above 4085 against misdetection).
pub const MIN_CLUST_16: u32 = 4087;
/// Largest FAT16 cluster count (fatgen103: < 65525).
pub const MAX_CLUST_16: u32 = 65524;
/// Smallest FAT32 cluster count.
pub const MIN_CLUST_32: u32 = 65525;
/// Largest FAT32 cluster count (28-bit entries minus reserved values).
pub const MAX_CLUST_32: u32 = 268_435_446;
/// FAT32 FSInfo sector number.
pub const FSINFO_SECTOR: u32 = 1;
/// FAT32 backup boot sector number (its FSInfo copy follows it).
pub const BACKUP_BOOT_SECTOR: u32 = 6;
/// FSInfo lead signature "RRaA".
pub const FSINFO_LEAD_SIG: u32 = 0x4161_5252;
/// FSInfo structure signature "rrAa".
pub const FSINFO_STRUCT_SIG: u32 = 0x6141_7272;
/// FSInfo trail signature.
pub const FSINFO_TRAIL_SIG: u32 = 0xAA55_0000;
/// Byte offset of the free-cluster count within the FSInfo sector.
pub const FSINFO_FREE_COUNT: u64 = 488;
/// Byte offset of the next-free hint within the FSInfo sector.
pub const FSINFO_NEXT_FREE: u64 = 492;

/// Directory entry attribute: read-only.
pub const ATTR_READ_ONLY: u8 = 0x01;
/// Directory entry attribute: hidden.
pub const ATTR_HIDDEN: u8 = 0x02;
/// Directory entry attribute: system.
pub const ATTR_SYSTEM: u8 = 0x04;
/// Directory entry attribute: volume label.
pub const ATTR_VOLUME_ID: u8 = 0x08;
/// Directory entry attribute: directory.
pub const ATTR_DIRECTORY: u8 = 0x10;
/// Directory entry attribute: archive (set on files written).
pub const ATTR_ARCHIVE: u8 = 0x20;
/// The attribute combination that marks a long-name entry.
pub const ATTR_LONG_NAME: u8 = 0x0F;
/// `nt_res` flag: the 8.3 base is displayed lowercase.
pub const NT_LOWER_BASE: u8 = 0x08;
/// `nt_res` flag: the 8.3 extension is displayed lowercase.
pub const NT_LOWER_EXT: u8 = 0x10;
/// First name byte of a deleted entry.
pub const DELETED: u8 = 0xE5;
/// Long-name entry ordinal flag for the last (first stored) entry.
pub const LFN_LAST: u8 = 0x40;
/// UTF-16 units per long-name entry.
pub const LFN_UNITS: usize = 13;
/// Size of a directory entry.
pub const DIRENT_SIZE: u32 = 32;
/// Most entries a directory may have (fatgen103: 65536 × 32 bytes = 2 MiB).
pub const MAX_DIR_ENTRIES: u32 = 65536;

/// FAT variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FatType {
    /// 12-bit entries.
    Fat12,
    /// 16-bit entries.
    Fat16,
    /// 28-bit entries in 32-bit words.
    Fat32,
}

impl FatType {
    /// 12, 16 or 32.
    pub fn bits(self) -> u32 {
        match self {
            FatType::Fat12 => 12,
            FatType::Fat16 => 16,
            FatType::Fat32 => 32,
        }
    }

    /// End-of-chain marker written by kiln.
    pub fn eoc(self) -> u32 {
        match self {
            FatType::Fat12 => 0xFFF,
            FatType::Fat16 => 0xFFFF,
            FatType::Fat32 => 0x0FFF_FFFF,
        }
    }

    /// True when `v` is an end-of-chain value.
    pub fn is_eoc(self, v: u32) -> bool {
        match self {
            FatType::Fat12 => v >= 0xFF8,
            FatType::Fat16 => v >= 0xFFF8,
            FatType::Fat32 => v & 0x0FFF_FFFF >= 0x0FFF_FFF8,
        }
    }

    /// The 8-byte type string in the extended BPB.
    pub fn fs_type(self) -> [u8; 8] {
        match self {
            FatType::Fat12 => *b"FAT12   ",
            FatType::Fat16 => *b"FAT16   ",
            FatType::Fat32 => *b"FAT32   ",
        }
    }

    /// The type fatgen103 §3.5 assigns to a cluster count.
    pub fn from_cluster_count(n: u32) -> FatType {
        if n < 4085 {
            FatType::Fat12
        } else if n < 65525 {
            FatType::Fat16
        } else {
            FatType::Fat32
        }
    }
}

/// Common BIOS parameter block at the start of the boot sector (fatgen103 §3.1).
#[derive(Clone, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Bpb {
    /// x86 jump over the BPB to the boot code.
    pub jump: [u8; 3],
    /// OEM name, informational.
    pub oem_name: [u8; 8],
    /// Bytes per sector (512).
    pub bytes_per_sector: U16,
    /// Sectors per cluster (power of two, 1..=128).
    pub sectors_per_cluster: u8,
    /// Sectors before the first FAT (boot sector included).
    pub reserved_sectors: U16,
    /// Number of FATs (2).
    pub num_fats: u8,
    /// FAT12/16 root directory entries; 0 on FAT32.
    pub root_entries: U16,
    /// Total sectors if < 65536, else 0.
    pub total_sectors_16: U16,
    /// Media descriptor (0xF8 fixed disk), repeated in FAT entry 0.
    pub media: u8,
    /// FAT12/16 sectors per FAT; 0 on FAT32.
    pub fat_size_16: U16,
    /// CHS sectors per track (informational for LBA media).
    pub sectors_per_track: U16,
    /// CHS heads (informational).
    pub num_heads: U16,
    /// Sectors before this filesystem on its disk (0 for an image).
    pub hidden_sectors: U32,
    /// Total sectors if `total_sectors_16` is 0.
    pub total_sectors_32: U32,
}
const _: () = assert!(size_of::<Bpb>() == 36);

/// Extended BPB fields of FAT12/16 (at byte 36) and FAT32 (at byte 64) (fatgen103 §3.2/3.3).
#[derive(Clone, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct ExtBpb {
    /// BIOS drive number (0x80).
    pub drive_number: u8,
    /// Reserved (Windows NT dirty flags), 0.
    pub reserved: u8,
    /// 0x29: the next three fields are valid.
    pub boot_sig: u8,
    /// Volume serial number.
    pub volume_id: [u8; 4],
    /// Volume label, space padded; "NO NAME    " without one.
    pub volume_label: [u8; 11],
    /// "FAT12   ", "FAT16   " or "FAT32   ", informational.
    pub fs_type: [u8; 8],
}
const _: () = assert!(size_of::<ExtBpb>() == 26);

/// FAT32-only BPB fields at byte 36 (fatgen103 §3.3).
#[derive(Clone, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Bpb32 {
    /// Sectors per FAT.
    pub fat_size_32: U32,
    /// Bit 7 clear: FATs mirrored.
    pub ext_flags: U16,
    /// Version 0.0.
    pub fs_version: U16,
    /// First cluster of the root directory.
    pub root_cluster: U32,
    /// Sector of the FSInfo structure.
    pub fs_info: U16,
    /// Sector of the backup boot sector.
    pub backup_boot: U16,
    /// Zero.
    pub reserved: [u8; 12],
}
const _: () = assert!(size_of::<Bpb32>() == 28);

/// FAT32 FSInfo sector (fatgen103 §5).
#[derive(Clone, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct FsInfo {
    /// 0x41615252.
    pub lead_sig: U32,
    /// Zero.
    pub reserved1: [u8; 480],
    /// 0x61417272.
    pub struct_sig: U32,
    /// Free clusters, or 0xFFFFFFFF if unknown.
    pub free_count: U32,
    /// Where to start looking for a free cluster, or 0xFFFFFFFF.
    pub next_free: U32,
    /// Zero.
    pub reserved2: [u8; 12],
    /// 0xAA550000.
    pub trail_sig: U32,
}
const _: () = assert!(size_of::<FsInfo>() == 512);
const _: () = assert!(std::mem::offset_of!(FsInfo, free_count) == FSINFO_FREE_COUNT as usize);

/// A short (8.3) directory entry (fatgen103 §6).
#[derive(Clone, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DirEntry {
    /// 8-byte base and 3-byte extension, space padded; 0 = end of directory, 0xE5 = deleted.
    pub name: [u8; 11],
    /// `ATTR_*` bits.
    pub attr: u8,
    /// Case flags (`NT_LOWER_*`).
    pub nt_res: u8,
    /// Creation time, hundredths of a second (0..=199) added to `crt_time`.
    pub crt_time_tenth: u8,
    /// Creation time (hour << 11 | minute << 5 | second / 2).
    pub crt_time: U16,
    /// Creation date ((year - 1980) << 9 | month << 5 | day).
    pub crt_date: U16,
    /// Last access date.
    pub lst_acc_date: U16,
    /// High 16 bits of the first cluster (FAT32).
    pub fst_clus_hi: U16,
    /// Last write time.
    pub wrt_time: U16,
    /// Last write date.
    pub wrt_date: U16,
    /// Low 16 bits of the first cluster.
    pub fst_clus_lo: U16,
    /// File size in bytes (0 for directories).
    pub file_size: U32,
}
const _: () = assert!(size_of::<DirEntry>() == DIRENT_SIZE as usize);
/// Byte offset of `fst_clus_hi` in a directory entry.
pub const DIRENT_CLUS_HI: usize = 20;
/// Byte offset of `fst_clus_lo` in a directory entry.
pub const DIRENT_CLUS_LO: usize = 26;
/// Byte offset of `file_size` in a directory entry.
pub const DIRENT_SIZE_FIELD: usize = 28;
const _: () = assert!(std::mem::offset_of!(DirEntry, fst_clus_hi) == DIRENT_CLUS_HI);
const _: () = assert!(std::mem::offset_of!(DirEntry, fst_clus_lo) == DIRENT_CLUS_LO);
const _: () = assert!(std::mem::offset_of!(DirEntry, file_size) == DIRENT_SIZE_FIELD);

impl DirEntry {
    /// First cluster (both halves).
    pub fn first_cluster(&self) -> u32 {
        u32::from(self.fst_clus_hi.get()) << 16 | u32::from(self.fst_clus_lo.get())
    }

    /// Sets both halves of the first cluster.
    pub fn set_first_cluster(&mut self, c: u32) {
        self.fst_clus_hi = U16::new((c >> 16) as u16);
        self.fst_clus_lo = U16::new(c as u16);
    }
}

/// A long-name (VFAT) directory entry (fatgen103 §7).
#[derive(Clone, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct LfnEntry {
    /// Sequence number 1..=20, `LFN_LAST` on the last.
    pub ord: u8,
    /// Name characters 1-5.
    pub name1: [U16; 5],
    /// `ATTR_LONG_NAME`.
    pub attr: u8,
    /// Zero.
    pub kind: u8,
    /// Checksum of the 8.3 name this entry belongs to.
    pub checksum: u8,
    /// Name characters 6-11.
    pub name2: [U16; 6],
    /// Zero.
    pub fst_clus_lo: U16,
    /// Name characters 12-13.
    pub name3: [U16; 2],
}
const _: () = assert!(size_of::<LfnEntry>() == DIRENT_SIZE as usize);

/// Where everything is in a FAT filesystem, in bytes unless named otherwise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// FAT variant.
    pub fat_type: FatType,
    /// Sectors in the filesystem (`BPB_TotSec`); may be less than the image holds.
    pub total_sectors: u32,
    /// Sectors per cluster.
    pub sectors_per_cluster: u32,
    /// Reserved sectors before the first FAT.
    pub reserved_sectors: u32,
    /// Sectors per FAT.
    pub fat_sectors: u32,
    /// Number of FAT copies (kiln writes 2).
    pub num_fats: u32,
    /// FAT12/16 root directory entries (0 on FAT32).
    pub root_entries: u32,
    /// Data clusters (numbered 2..cluster_count + 2).
    pub cluster_count: u32,
    /// CHS sectors per track written to the BPB.
    pub sectors_per_track: u16,
    /// CHS heads written to the BPB.
    pub heads: u16,
}

impl Geometry {
    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u32 {
        self.sectors_per_cluster * SECTOR
    }

    /// Byte offset of FAT copy `i`.
    pub fn fat_offset(&self, i: u32) -> u64 {
        (u64::from(self.reserved_sectors) + u64::from(i) * u64::from(self.fat_sectors))
            * u64::from(SECTOR)
    }

    /// Byte offset of the FAT12/16 root directory region.
    pub fn root_dir_offset(&self) -> u64 {
        self.fat_offset(self.num_fats)
    }

    /// Byte offset of cluster 2.
    pub fn data_offset(&self) -> u64 {
        self.root_dir_offset() + u64::from(self.root_entries) * u64::from(DIRENT_SIZE)
    }

    /// Byte offset of cluster `c` (2-based).
    pub fn cluster_offset(&self, c: u32) -> u64 {
        self.data_offset() + u64::from(c.saturating_sub(2)) * u64::from(self.cluster_size())
    }

    /// Filesystem size in bytes (`total_sectors × 512`).
    pub fn size(&self) -> u64 {
        u64::from(self.total_sectors) * u64::from(SECTOR)
    }

    /// Byte offset of the FSInfo sector (FAT32).
    pub fn fsinfo_offset(&self) -> Option<u64> {
        (self.fat_type == FatType::Fat32).then_some(u64::from(FSINFO_SECTOR * SECTOR))
    }
}

/// Byte offset and length of cluster `c`'s entry within one FAT (a FAT12 entry straddles two
/// bytes; the range covers both).
pub fn entry_span(t: FatType, c: u32) -> (u64, usize) {
    match t {
        FatType::Fat12 => (u64::from(c) * 3 / 2, 2),
        FatType::Fat16 => (u64::from(c) * 2, 2),
        FatType::Fat32 => (u64::from(c) * 4, 4),
    }
}

/// Reads FAT entry `c` from a buffer holding FAT bytes starting at FAT byte `base`.
pub fn get_entry(t: FatType, buf: &[u8], base: u64, c: u32) -> Option<u32> {
    let at = |o: u64| -> Option<usize> { usize::try_from(o.checked_sub(base)?).ok() };
    match t {
        FatType::Fat12 => {
            let o = at(u64::from(c) * 3 / 2)?;
            let v = u32::from(*buf.get(o)?) | u32::from(*buf.get(o + 1)?) << 8;
            Some(if c.is_multiple_of(2) {
                v & 0xFFF
            } else {
                v >> 4
            })
        }
        FatType::Fat16 => {
            let o = at(u64::from(c) * 2)?;
            Some(u32::from(u16::from_le_bytes([
                *buf.get(o)?,
                *buf.get(o + 1)?,
            ])))
        }
        FatType::Fat32 => {
            let o = at(u64::from(c) * 4)?;
            let b = buf.get(o..o + 4)?;
            Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x0FFF_FFFF)
        }
    }
}

/// Writes FAT entry `c` into a buffer holding FAT bytes from FAT byte `base`, preserving the
/// neighbouring nibble (FAT12) and the reserved top 4 bits (FAT32). False if out of range.
pub fn set_entry(t: FatType, buf: &mut [u8], base: u64, c: u32, v: u32) -> bool {
    let at = |o: u64| -> Option<usize> { usize::try_from(o.checked_sub(base)?).ok() };
    match t {
        FatType::Fat12 => {
            let Some(o) = at(u64::from(c) * 3 / 2).filter(|&o| o + 1 < buf.len()) else {
                return false;
            };
            if c.is_multiple_of(2) {
                buf[o] = v as u8;
                buf[o + 1] = (buf[o + 1] & 0xF0) | ((v >> 8) as u8 & 0x0F);
            } else {
                buf[o] = (buf[o] & 0x0F) | ((v as u8 & 0x0F) << 4);
                buf[o + 1] = (v >> 4) as u8;
            }
        }
        FatType::Fat16 => {
            let Some(o) = at(u64::from(c) * 2).filter(|&o| o + 1 < buf.len()) else {
                return false;
            };
            buf[o..o + 2].copy_from_slice(&(v as u16).to_le_bytes());
        }
        FatType::Fat32 => {
            let Some(o) = at(u64::from(c) * 4).filter(|&o| o + 3 < buf.len()) else {
                return false;
            };
            let old = u32::from_le_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
            let new = (old & 0xF000_0000) | (v & 0x0FFF_FFFF);
            buf[o..o + 4].copy_from_slice(&new.to_le_bytes());
        }
    }
    true
}

fn align(sectors: u32, cluster: u32, enabled: bool) -> u32 {
    if enabled {
        sectors.div_ceil(cluster) * cluster
    } else {
        sectors
    }
}

/// mkfs.fat 4.2's choice for a fixed disk of `size` bytes (see the module docs).
pub(crate) fn compute_geometry(size: u64, force: Option<FatType>) -> Result<Geometry, FatError> {
    let sector = u64::from(SECTOR);
    let total = size / sector;
    if total < 64 {
        return Err(FatError::BadOptions(format!(
            "a FAT filesystem of {size} bytes is too small (at least 32 KiB)"
        )));
    }
    let total = u32::try_from(total).map_err(|_| {
        FatError::BadOptions(format!(
            "a FAT filesystem of {size} bytes is too large (at most 2 TiB with 512-byte sectors)"
        ))
    })?;
    // CHS fields: SD card recommendation below 256 MiB, LBA-assist translation above.
    let (heads, spt): (u16, u16) = if total <= 524_288 {
        let h = if total <= 32768 {
            2
        } else if total <= 65536 {
            4
        } else if total <= 262_144 {
            8
        } else {
            16
        };
        (h, if total <= 4096 { 16 } else { 32 })
    } else {
        let h = if total <= 16 * 63 * 1024 {
            16
        } else if total <= 32 * 63 * 1024 {
            32
        } else if total <= 64 * 63 * 1024 {
            64
        } else if total <= 128 * 63 * 1024 {
            128
        } else {
            255
        };
        (h, 63)
    };
    let fat_type = match force {
        Some(t) => Some(t),
        None if size >= 512 << 20 => Some(FatType::Fat32),
        None => None,
    };
    let mut cluster = if fat_type == Some(FatType::Fat32) {
        let s = u64::from(total);
        if s > 32 * 1024 * 1024 * 2 {
            64
        } else if s > 16 * 1024 * 1024 * 2 {
            32
        } else if s > 8 * 1024 * 1024 * 2 {
            16
        } else if s > 260 * 1024 * 2 {
            8
        } else {
            1
        }
    } else {
        4
    };
    let reserved0 = if fat_type == Some(FatType::Fat32) {
        32
    } else {
        1
    };
    let root_entries0 = if fat_type == Some(FatType::Fat32) {
        0
    } else {
        ROOT_ENTRIES
    };
    // A whole number of tracks, as DOS and mtools expect.
    let num_sectors = total / u32::from(spt) * u32::from(spt);
    let aligned = num_sectors > 8192;
    let root_dir_sectors = (root_entries0 * DIRENT_SIZE).div_ceil(SECTOR);
    let nf = u64::from(NUM_FATS);
    let ss = u64::from(SECTOR);
    let (mut c12, mut c16, mut c32) = (0u32, 0u32, 0u32);
    let (mut f12, mut f16, mut f32_) = (0u32, 0u32, 0u32);
    while cluster <= 128 {
        let fatdata32 = num_sectors.saturating_sub(align(reserved0, cluster, aligned));
        let fatdata1216 = fatdata32.saturating_sub(align(root_dir_sectors, cluster, aligned));
        let cs = u64::from(cluster);

        let guess = 2 * (u64::from(fatdata1216) * ss + nf * 3) / (2 * cs * ss + nf * 3);
        f12 = align(
            (((guess as u32 + 2) * 3 + 1) >> 1).div_ceil(SECTOR),
            cluster,
            aligned,
        );
        c12 = fatdata1216.saturating_sub(NUM_FATS * f12) / cluster;
        let max12 = (f12 * 2 * SECTOR / 3).min(MAX_CLUST_12);
        if c12 > max12 {
            c12 = 0;
        }

        let guess = (u64::from(fatdata1216) * ss + nf * 4) / (cs * ss + nf * 2);
        f16 = align(((guess as u32 + 2) * 2).div_ceil(SECTOR), cluster, aligned);
        c16 = fatdata1216.saturating_sub(NUM_FATS * f16) / cluster;
        let max16 = (f16 * SECTOR / 2).min(MAX_CLUST_16);
        if c16 > max16 || c16 < MIN_CLUST_16 {
            c16 = 0;
        }

        let guess = (u64::from(fatdata32) * ss + nf * 8) / (cs * ss + nf * 4);
        f32_ = align(((guess as u32 + 2) * 4).div_ceil(SECTOR), cluster, aligned);
        c32 = fatdata32.saturating_sub(NUM_FATS * f32_) / cluster;
        let max32 = (f32_ * SECTOR / 4).min(MAX_CLUST_32);
        if c32 > max32 || (c32 < MIN_CLUST_32 && force != Some(FatType::Fat32)) {
            c32 = 0;
        }

        let ok = match fat_type {
            None => c12 != 0 || c16 != 0,
            Some(FatType::Fat12) => c12 != 0,
            Some(FatType::Fat16) => c16 != 0,
            Some(FatType::Fat32) => c32 != 0,
        };
        if ok {
            break;
        }
        cluster <<= 1;
    }
    let fat_type = fat_type.unwrap_or(if c16 > c12 {
        FatType::Fat16
    } else {
        FatType::Fat12
    });
    let (count, fat_sectors) = match fat_type {
        FatType::Fat12 => (c12, f12),
        FatType::Fat16 => (c16, f16),
        FatType::Fat32 => (c32, f32_),
    };
    if count == 0 || cluster > 128 {
        return Err(FatError::BadOptions(format!(
            "no {} layout fits {size} bytes",
            force.map_or("FAT".to_string(), |t| format!("FAT{}", t.bits()))
        )));
    }
    let root_entries = if fat_type == FatType::Fat32 {
        0
    } else {
        align(root_dir_sectors, cluster, aligned) * (SECTOR / DIRENT_SIZE)
    };
    Ok(Geometry {
        fat_type,
        total_sectors: num_sectors,
        sectors_per_cluster: cluster,
        reserved_sectors: align(reserved0, cluster, aligned),
        fat_sectors,
        num_fats: NUM_FATS,
        root_entries,
        cluster_count: count,
        sectors_per_track: spt,
        heads,
    })
}

/// FAT's (date, time, hundredths) for a Unix time, as UTC, clamped to the representable range
/// 1980-01-01 00:00:00 ..= 2107-12-31 23:59:58.
pub fn dos_time(sec: i64, nsec: u32) -> (u16, u16, u8) {
    const MIN: i64 = 315_532_800; // 1980-01-01T00:00:00Z
    const MAX: i64 = 4_354_819_198; // 2107-12-31T23:59:58Z
    let (sec, nsec) = if sec < MIN {
        (MIN, 0)
    } else if sec > MAX {
        (MAX, 0)
    } else {
        (sec, nsec)
    };
    let days = sec.div_euclid(86400);
    let rem = sec.rem_euclid(86400) as u32;
    let (y, m, d) = crate::calendar::civil_from_days(days);
    let date = (((y - 1980) as u16) << 9) | ((m as u16) << 5) | d as u16;
    let time = (((rem / 3600) << 11) | ((rem / 60 % 60) << 5) | ((rem % 60) / 2)) as u16;
    let hundredths = ((rem % 2) * 100 + nsec / 10_000_000) as u8;
    (date, time, hundredths)
}

/// The Unix time of a FAT date and time (UTC).
pub fn unix_time(date: u16, time: u16) -> i64 {
    let y = i64::from(date >> 9) + 1980;
    let m = i64::from((date >> 5) & 0xF).clamp(1, 12);
    let d = i64::from(date & 0x1F).max(1);
    let days = crate::calendar::days_from_civil(y, m as u32, d as u32);
    days * 86400
        + i64::from(time >> 11) * 3600
        + i64::from((time >> 5) & 0x3F) * 60
        + i64::from(time & 0x1F) * 2
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_and_clamp() {
        // 2023-11-14 22:13:20 UTC
        let (d, t, h) = dos_time(1_700_000_000, 500_000_000);
        assert_eq!(d, (43 << 9) | (11 << 5) | 14);
        assert_eq!(t, (22 << 11) | (13 << 5) | 10);
        assert_eq!(h, 50);
        assert_eq!(unix_time(d, t), 1_700_000_000);
        assert_eq!(dos_time(0, 0), ((1 << 5) | 1, 0, 0));
        assert_eq!(dos_time(-1_000_000, 5), ((1 << 5) | 1, 0, 0));
        let (d, t, _) = dos_time(i64::MAX, 0);
        assert_eq!(d, (127 << 9) | (12 << 5) | 31);
        assert_eq!(t, (23 << 11) | (59 << 5) | 29);
    }

    #[test]
    fn fat12_entries_share_bytes() {
        let mut b = vec![0u8; 12];
        for c in 0..8 {
            assert!(set_entry(FatType::Fat12, &mut b, 0, c, 0xA00 + c));
        }
        for c in 0..8 {
            assert_eq!(get_entry(FatType::Fat12, &b, 0, c), Some(0xA00 + c));
        }
        assert!(!set_entry(FatType::Fat12, &mut b, 0, 8, 1));
        let mut b = vec![0xFFu8; 8];
        set_entry(FatType::Fat32, &mut b, 0, 1, 5);
        assert_eq!(&b[4..8], &[5, 0, 0, 0xF0]);
    }
}
