//! GUID partition tables and the protective MBR (UEFI 2.10 §5: §5.2.3 protective MBR, §5.3.2
//! GPT header, §5.3.3 partition entry array), with the partition type GUIDs of the UAPI Group's
//! Discoverable Partitions Specification (DPS).
//!
//! Geometry is fixed to what every tool kiln interoperates with expects: 512-byte logical
//! sectors, 128 entries of 128 bytes (16 KiB of entries, 32 sectors). The primary header is at
//! LBA 1 with its entries at LBA 2..=33; the backup entries occupy the 32 sectors before the last
//! one and the backup header is the last sector. So a disk of `n` sectors has usable LBAs
//! `34..=n-34`.
//!
//! The same writer serves a GPT inside an ISO 9660 system area (the first 32 KiB of a hybrid
//! ISO): the disk is the whole ISO, sizes are in bytes and partition extents in 512-byte LBAs.
//! Only bytes 446..512 of the MBR are written, so boot code placed there earlier is preserved.
//!
//! The reader depends on nothing but this crate's layout types and CRC32, so the static initrd
//! (kiln-init) can use it to find partitions by UUID.
//!
//! UUIDs are [`Uuid`]s (RFC 4122 byte order) everywhere in this API; only the on-disk structs
//! hold the mixed-endian GUID form (first three fields little-endian), and this module is the
//! one place that converts: [`Uuid::to_bytes_le`] when writing, [`Uuid::from_bytes_le`] when
//! reading.

use std::fmt::Write as _;
use std::io;

use uuid::uuid;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::repart::{self, Uuid};
use crate::sink::Sink;

/// Logical sector size in bytes. GPT offsets are counted in these units (LBAs).
pub const SECTOR: u64 = 512;
/// Number of entries in each partition entry array (the UEFI minimum array size, 16 KiB).
pub const ENTRY_COUNT: u32 = 128;
/// Size of one partition entry in bytes.
pub const ENTRY_SIZE: u32 = 128;
/// Sectors taken by one entry array: 128 × 128 / 512.
pub const ENTRY_ARRAY_SECTORS: u64 = (ENTRY_COUNT as u64 * ENTRY_SIZE as u64) / SECTOR;
/// Sectors before the first usable LBA: protective MBR, primary header, primary entries.
pub const HEAD_SECTORS: u64 = 2 + ENTRY_ARRAY_SECTORS;
/// Sectors after the last usable LBA: backup entries and backup header.
pub const TAIL_SECTORS: u64 = ENTRY_ARRAY_SECTORS + 1;
/// GPT header signature ("EFI PART").
pub const SIGNATURE: [u8; 8] = *b"EFI PART";
/// GPT header revision 1.0.
pub const REVISION: u32 = 0x0001_0000;
/// Size of the defined part of the GPT header.
pub const HEADER_SIZE: u32 = 92;
/// Longest partition name: 36 UTF-16 code units.
pub const NAME_UNITS: usize = 36;
/// Partition type byte of the protective MBR's only record.
pub const MBR_TYPE_PROTECTIVE: u8 = 0xEE;

/// Attribute bit 0: the platform requires this partition to function (UEFI 2.10 table 5-8).
pub const ATTR_REQUIRED: u64 = 1 << 0;
/// Attribute bit 1: EFI firmware must not produce a block I/O protocol for this partition.
pub const ATTR_NO_BLOCK_IO: u64 = 1 << 1;
/// Attribute bit 2: legacy BIOS bootable.
pub const ATTR_LEGACY_BIOS_BOOTABLE: u64 = 1 << 2;
/// DPS bit 59: grow the filesystem to the partition size on first mount.
pub const ATTR_GROWFS: u64 = 1 << 59;
/// DPS bit 60: mount read-only.
pub const ATTR_READ_ONLY: u64 = 1 << 60;
/// DPS bit 63: do not auto-mount this partition.
pub const ATTR_NO_AUTO: u64 = 1 << 63;

/// Attribute bits with names, for dumps and spec parsing.
pub const ATTRIBUTE_NAMES: &[(u64, &str)] = &[
    (ATTR_REQUIRED, "required"),
    (ATTR_NO_BLOCK_IO, "no-block-io-protocol"),
    (ATTR_LEGACY_BIOS_BOOTABLE, "legacy-bios-bootable"),
    (ATTR_GROWFS, "grow-fs"),
    (ATTR_READ_ONLY, "read-only"),
    (ATTR_NO_AUTO, "no-auto"),
];

/// The names of the bits set in `attributes`, lowest bit first: the UEFI/DPS name
/// (`required`, `no-block-io-protocol`, `legacy-bios-bootable`, `grow-fs`, `read-only`,
/// `no-auto`), `bitN` for a bit without one.
pub fn attribute_names(attributes: u64) -> Vec<String> {
    (0..64)
        .map(|b| 1u64 << b)
        .filter(|bit| attributes & bit != 0)
        .map(|bit| {
            ATTRIBUTE_NAMES.iter().find(|(b, _)| *b == bit).map_or_else(
                || format!("bit{}", bit.trailing_zeros()),
                |(_, n)| (*n).into(),
            )
        })
        .collect()
}

/// Looks an attribute bit up by its name (`read-only`, `no-auto`, ...).
pub fn attribute_by_name(name: &str) -> Option<u64> {
    ATTRIBUTE_NAMES
        .iter()
        .find(|(_, n)| *n == name)
        .map(|(b, _)| *b)
}

/// A named partition type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartType {
    /// Name as systemd-repart spells it (`esp`, `root-x86-64`, ...); also the default label.
    pub name: &'static str,
    /// Type GUID in RFC byte order.
    pub guid: Uuid,
}

/// EFI System Partition.
pub const TYPE_ESP: Uuid = uuid!("c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
/// Extended boot loader partition (XBOOTLDR).
pub const TYPE_XBOOTLDR: Uuid = uuid!("bc13c2ff-59e6-4262-a352-b275fd6f7172");
/// Root filesystem for x86-64.
pub const TYPE_ROOT_X86_64: Uuid = uuid!("4f68bce3-e8cd-4db1-96e7-fbcaf984b709");
/// dm-verity hash data for the x86-64 root.
pub const TYPE_ROOT_X86_64_VERITY: Uuid = uuid!("2c7357ed-ebd2-46d9-aec1-23d437ec2bf5");
/// Signature of the x86-64 root's verity root hash.
pub const TYPE_ROOT_X86_64_VERITY_SIG: Uuid = uuid!("41092b05-9fc8-4523-994f-2def0408b176");
/// /usr for x86-64.
pub const TYPE_USR_X86_64: Uuid = uuid!("8484680c-9521-48c6-9c11-b0720656f69e");
/// dm-verity hash data for the x86-64 /usr.
pub const TYPE_USR_X86_64_VERITY: Uuid = uuid!("77ff5f63-e7b6-4633-acf4-1565b864c0e6");
/// Root filesystem for arm64 (AArch64).
pub const TYPE_ROOT_ARM64: Uuid = uuid!("b921b045-1df0-41c3-af44-4c6f280d3fae");
/// dm-verity hash data for the arm64 root.
pub const TYPE_ROOT_ARM64_VERITY: Uuid = uuid!("df3300ce-d69f-4c92-978c-9bfb0f38d820");
/// Signature of the arm64 root's verity root hash.
pub const TYPE_ROOT_ARM64_VERITY_SIG: Uuid = uuid!("6db69de6-29f4-4758-a7a5-962190f00ce3");
/// /usr for arm64.
pub const TYPE_USR_ARM64: Uuid = uuid!("b0e01050-ee5f-4390-949a-9101b17104e9");
/// dm-verity hash data for the arm64 /usr.
pub const TYPE_USR_ARM64_VERITY: Uuid = uuid!("6e11a4e7-fbca-4ded-b9e9-e1a512bb664e");
/// /var.
pub const TYPE_VAR: Uuid = uuid!("4d21b016-b534-45c2-a9fb-5c16e091fd2d");
/// /home.
pub const TYPE_HOME: Uuid = uuid!("933ac7e1-2eb4-4f13-b844-0e14e2aef915");
/// Swap.
pub const TYPE_SWAP: Uuid = uuid!("0657fd6d-a4ab-43c4-84e5-0933c84b4f4f");
/// Generic Linux data.
pub const TYPE_LINUX_GENERIC: Uuid = uuid!("0fc63daf-8483-4772-8e79-3d69d8477de4");

/// The DPS types kiln knows by name (SPECS.md), names as systemd-repart's `Type=` spells them.
pub const TYPES: &[PartType] = &[
    PartType {
        name: "esp",
        guid: TYPE_ESP,
    },
    PartType {
        name: "xbootldr",
        guid: TYPE_XBOOTLDR,
    },
    PartType {
        name: "root-x86-64",
        guid: TYPE_ROOT_X86_64,
    },
    PartType {
        name: "root-x86-64-verity",
        guid: TYPE_ROOT_X86_64_VERITY,
    },
    PartType {
        name: "root-x86-64-verity-sig",
        guid: TYPE_ROOT_X86_64_VERITY_SIG,
    },
    PartType {
        name: "usr-x86-64",
        guid: TYPE_USR_X86_64,
    },
    PartType {
        name: "usr-x86-64-verity",
        guid: TYPE_USR_X86_64_VERITY,
    },
    PartType {
        name: "root-arm64",
        guid: TYPE_ROOT_ARM64,
    },
    PartType {
        name: "root-arm64-verity",
        guid: TYPE_ROOT_ARM64_VERITY,
    },
    PartType {
        name: "root-arm64-verity-sig",
        guid: TYPE_ROOT_ARM64_VERITY_SIG,
    },
    PartType {
        name: "usr-arm64",
        guid: TYPE_USR_ARM64,
    },
    PartType {
        name: "usr-arm64-verity",
        guid: TYPE_USR_ARM64_VERITY,
    },
    PartType {
        name: "var",
        guid: TYPE_VAR,
    },
    PartType {
        name: "home",
        guid: TYPE_HOME,
    },
    PartType {
        name: "swap",
        guid: TYPE_SWAP,
    },
    PartType {
        name: "linux-generic",
        guid: TYPE_LINUX_GENERIC,
    },
];

/// The type with this name (`esp`, `root-x86-64`, ...).
pub fn type_by_name(name: &str) -> Option<&'static PartType> {
    TYPES.iter().find(|t| t.name == name)
}

/// The named type with this GUID (RFC byte order).
pub fn type_by_guid(guid: &Uuid) -> Option<&'static PartType> {
    TYPES.iter().find(|t| &t.guid == guid)
}

/// Resolves a type given by DPS name or as a GUID (hyphenated, or 32 hex digits).
pub fn parse_type(s: &str) -> Option<Uuid> {
    type_by_name(s)
        .map(|t| t.guid)
        .or_else(|| repart::uuid_from_spec(s))
}

/// GPT header (UEFI 2.10 §5.3.2, table 5-5). The rest of its sector is zero.
#[derive(Clone, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Header {
    /// `EFI PART`.
    pub signature: [u8; 8],
    /// Revision, 0x00010000 for 1.0.
    pub revision: U32,
    /// Bytes of this header covered by `header_crc32` (92).
    pub header_size: U32,
    /// CRC32 of the first `header_size` bytes with this field zeroed.
    pub header_crc32: U32,
    /// Must be zero.
    pub reserved: U32,
    /// LBA of this header (1 for the primary, last LBA for the backup).
    pub my_lba: U64,
    /// LBA of the other header.
    pub alternate_lba: U64,
    /// First LBA a partition may use.
    pub first_usable_lba: U64,
    /// Last LBA a partition may use (inclusive).
    pub last_usable_lba: U64,
    /// Disk GUID, mixed-endian.
    pub disk_guid: [u8; 16],
    /// First LBA of this header's partition entry array.
    pub partition_entry_lba: U64,
    /// Number of entries in the array.
    pub num_entries: U32,
    /// Size of one entry in bytes (128 × 2^n).
    pub entry_size: U32,
    /// CRC32 of the whole entry array (`num_entries × entry_size` bytes).
    pub entries_crc32: U32,
}
const _: () = assert!(size_of::<Header>() == HEADER_SIZE as usize);
const _: () = assert!(std::mem::offset_of!(Header, disk_guid) == 56);
const _: () = assert!(std::mem::offset_of!(Header, entries_crc32) == 88);

/// One partition entry (UEFI 2.10 §5.3.3, table 5-6). All-zero type GUID = unused.
#[derive(Clone, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Entry {
    /// Partition type GUID, mixed-endian.
    pub type_guid: [u8; 16],
    /// Unique partition GUID, mixed-endian.
    pub part_guid: [u8; 16],
    /// First LBA of the partition.
    pub first_lba: U64,
    /// Last LBA of the partition (inclusive).
    pub last_lba: U64,
    /// Attribute bits (`ATTR_*`).
    pub attributes: U64,
    /// Name in UTF-16LE, NUL-padded.
    pub name: [U16; NAME_UNITS],
}
const _: () = assert!(size_of::<Entry>() == ENTRY_SIZE as usize);
const _: () = assert!(std::mem::offset_of!(Entry, first_lba) == 32);
const _: () = assert!(std::mem::offset_of!(Entry, name) == 56);

/// A legacy MBR partition record (UEFI 2.10 §5.2.1, table 5-2).
#[derive(Clone, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct MbrRecord {
    /// 0x80 = bootable; 0 for the protective record.
    pub boot_indicator: u8,
    /// CHS address of the first sector (head, sector | cylinder high bits, cylinder low).
    pub starting_chs: [u8; 3],
    /// Partition type; 0xEE for the protective record.
    pub os_type: u8,
    /// CHS address of the last sector, 0xFFFFFF when not representable.
    pub ending_chs: [u8; 3],
    /// First sector (1 for the protective record).
    pub starting_lba: U32,
    /// Length in sectors, capped at 0xFFFFFFFF.
    pub size_in_lba: U32,
}
const _: () = assert!(size_of::<MbrRecord>() == 16);

/// The tail of the MBR sector that a protective MBR defines: four partition records at byte
/// 446 and the 0x55AA signature at 510 (bytes 0..446 are boot code and the disk signature).
#[derive(Clone, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct MbrTail {
    /// The four partition records; only the first is used by a protective MBR.
    pub records: [MbrRecord; 4],
    /// 0x55, 0xAA.
    pub signature: [u8; 2],
}
const _: () = assert!(size_of::<MbrTail>() == 66);
/// Byte offset of [`MbrTail`] in sector 0.
pub const MBR_TAIL_OFFSET: u64 = 446;

/// Errors reading or writing a GPT. Offsets are LBAs of 512 bytes unless named otherwise.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GptError {
    /// Reading or writing the disk failed.
    #[error("i/o at byte {offset}: {source}")]
    Io {
        /// Byte offset of the failed access.
        offset: u64,
        /// The underlying error.
        source: io::Error,
    },
    /// The disk is not a whole number of 512-byte sectors.
    #[error("disk size {size} bytes is not a multiple of 512")]
    NotSectorMultiple {
        /// Disk size in bytes.
        size: u64,
    },
    /// The disk is too small to hold a GPT.
    #[error("disk of {size} bytes is too small for a GPT (needs at least {min} bytes)")]
    TooSmall {
        /// Disk size in bytes.
        size: u64,
        /// Minimum size in bytes.
        min: u64,
    },
    /// No `EFI PART` signature.
    #[error("no GPT header at LBA {lba}: signature is {found:02x?}, expected \"EFI PART\"")]
    BadSignature {
        /// LBA of the header looked at.
        lba: u64,
        /// The 8 bytes found.
        found: [u8; 8],
    },
    /// A header field has an impossible value.
    #[error("GPT header at LBA {lba}: {field} is {value}, expected {expected}")]
    BadHeaderField {
        /// LBA of the header.
        lba: u64,
        /// Field name.
        field: &'static str,
        /// Value found.
        value: u64,
        /// What would have been valid.
        expected: String,
    },
    /// Header CRC mismatch.
    #[error("GPT header at LBA {lba}: header CRC32 is {stored:#010x}, computed {computed:#010x}")]
    BadHeaderCrc {
        /// LBA of the header.
        lba: u64,
        /// CRC stored in the header.
        stored: u32,
        /// CRC of the bytes read.
        computed: u32,
    },
    /// Entry array CRC mismatch.
    #[error(
        "GPT entry array at LBA {lba} (header at LBA {header_lba}): CRC32 is {computed:#010x}, \
         header says {stored:#010x}"
    )]
    BadEntriesCrc {
        /// LBA of the header that points at the array.
        header_lba: u64,
        /// LBA of the array.
        lba: u64,
        /// CRC stored in the header.
        stored: u32,
        /// CRC of the bytes read.
        computed: u32,
    },
    /// A partition entry is inconsistent.
    #[error("GPT entry {number} (array at LBA {lba}): {reason}")]
    BadEntry {
        /// LBA of the array.
        lba: u64,
        /// 1-based entry number.
        number: u32,
        /// What is wrong.
        reason: String,
    },
    /// Neither header is usable.
    #[error("no valid GPT: primary: {primary}; backup: {backup}")]
    BothBad {
        /// Why the primary header was rejected.
        primary: Box<GptError>,
        /// Why the backup header was rejected.
        backup: Box<GptError>,
    },
    /// A layout to write is invalid.
    #[error("partition {number} ({name:?}): {reason}")]
    BadLayout {
        /// 1-based entry number.
        number: u32,
        /// Partition name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The sink to write into does not match the disk size.
    #[error("output window is {sink} bytes but the GPT describes a {disk}-byte disk")]
    SinkSize {
        /// Sink length.
        sink: u64,
        /// Disk size.
        disk: u64,
    },
}

/// A partition (UUIDs in RFC byte order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// Partition type GUID (`TYPE_*`).
    pub type_guid: Uuid,
    /// Unique partition GUID.
    pub part_guid: Uuid,
    /// First LBA (512-byte sectors).
    pub first_lba: u64,
    /// Last LBA, inclusive.
    pub last_lba: u64,
    /// Attribute bits (`ATTR_*`).
    pub attributes: u64,
    /// Name (at most 36 UTF-16 code units).
    pub name: String,
}

impl Partition {
    /// Byte offset of the partition on the disk.
    pub fn offset(&self) -> u64 {
        self.first_lba * SECTOR
    }

    /// Size of the partition in bytes.
    pub fn size(&self) -> u64 {
        (self.last_lba + 1).saturating_sub(self.first_lba) * SECTOR
    }
}

/// A GUID partition table: the layout to write, or what was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gpt {
    /// Disk GUID.
    pub disk_guid: Uuid,
    /// Used partition entries, in entry order.
    pub partitions: Vec<Partition>,
    /// 1-based entry number of each partition (Linux's partition number: entry 3 is `vda3`).
    /// Empty means `1..=partitions.len()`; the reader always fills it.
    pub entry_numbers: Vec<u32>,
    /// Disk size in 512-byte sectors.
    pub disk_sectors: u64,
    /// First LBA partitions may use.
    pub first_usable_lba: u64,
    /// Last LBA partitions may use (inclusive).
    pub last_usable_lba: u64,
    /// Set by the reader when the primary header was unusable and the backup was read instead:
    /// why the primary was rejected.
    pub primary_error: Option<String>,
}

/// Bytes the table puts on disk at a byte offset: `(offset, bytes)`.
pub type Region = (u64, Vec<u8>);

impl Gpt {
    /// An empty table for a disk of `disk_size` bytes (a multiple of 512) with the standard
    /// 128-entry arrays: usable LBAs `34..=sectors-34`.
    pub fn new(disk_size: u64, disk_guid: Uuid) -> Result<Gpt, GptError> {
        if !disk_size.is_multiple_of(SECTOR) {
            return Err(GptError::NotSectorMultiple { size: disk_size });
        }
        let min = (HEAD_SECTORS + TAIL_SECTORS + 1) * SECTOR;
        if disk_size < min {
            return Err(GptError::TooSmall {
                size: disk_size,
                min,
            });
        }
        let sectors = disk_size / SECTOR;
        Ok(Gpt {
            disk_guid,
            partitions: Vec::new(),
            entry_numbers: Vec::new(),
            disk_sectors: sectors,
            first_usable_lba: HEAD_SECTORS,
            last_usable_lba: sectors - TAIL_SECTORS - 1,
            primary_error: None,
        })
    }

    /// Disk size in bytes.
    pub fn disk_size(&self) -> u64 {
        self.disk_sectors * SECTOR
    }

    /// Entry number of the `i`-th partition.
    pub fn number(&self, i: usize) -> u32 {
        self.entry_numbers.get(i).copied().unwrap_or(i as u32 + 1)
    }

    /// The partition with this unique GUID and its entry number.
    pub fn find(&self, part_guid: &Uuid) -> Option<(u32, &Partition)> {
        self.partitions
            .iter()
            .enumerate()
            .find(|(_, p)| &p.part_guid == part_guid)
            .map(|(i, p)| (self.number(i), p))
    }

    /// Checks the layout: types set, extents inside the usable area and disjoint, names short
    /// enough, entry numbers unique and within 1..=128.
    pub fn validate(&self) -> Result<(), GptError> {
        let bad = |i: usize, reason: String| GptError::BadLayout {
            number: self.number(i),
            name: self.partitions[i].name.clone(),
            reason,
        };
        if self.partitions.len() > ENTRY_COUNT as usize {
            return Err(bad(
                ENTRY_COUNT as usize,
                format!("{} partitions, at most 128 fit", self.partitions.len()),
            ));
        }
        if !self.entry_numbers.is_empty() && self.entry_numbers.len() != self.partitions.len() {
            return Err(GptError::BadLayout {
                number: 0,
                name: String::new(),
                reason: format!(
                    "{} entry numbers for {} partitions",
                    self.entry_numbers.len(),
                    self.partitions.len()
                ),
            });
        }
        let mut numbers = std::collections::BTreeSet::new();
        for (i, p) in self.partitions.iter().enumerate() {
            let n = self.number(i);
            if n == 0 || n > ENTRY_COUNT || !numbers.insert(n) {
                return Err(bad(
                    i,
                    format!("entry number {n} is out of 1..=128 or repeated"),
                ));
            }
            if p.type_guid.is_nil() {
                return Err(bad(
                    i,
                    "type GUID is all zeroes (marks an unused entry)".into(),
                ));
            }
            if p.first_lba > p.last_lba {
                return Err(bad(
                    i,
                    format!("first LBA {} is after last LBA {}", p.first_lba, p.last_lba),
                ));
            }
            if p.first_lba < self.first_usable_lba || p.last_lba > self.last_usable_lba {
                return Err(bad(
                    i,
                    format!(
                        "LBAs {}..={} leave the usable area {}..={}",
                        p.first_lba, p.last_lba, self.first_usable_lba, self.last_usable_lba
                    ),
                ));
            }
            if p.name.encode_utf16().count() > NAME_UNITS {
                return Err(bad(i, "name longer than 36 UTF-16 code units".into()));
            }
            for (j, q) in self.partitions.iter().enumerate().take(i) {
                if p.first_lba <= q.last_lba && q.first_lba <= p.last_lba {
                    return Err(bad(
                        i,
                        format!(
                            "LBAs {}..={} overlap partition {} ({:?}) at {}..={}",
                            p.first_lba,
                            p.last_lba,
                            self.number(j),
                            q.name,
                            q.first_lba,
                            q.last_lba
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The partition entry array as written on disk (128 entries of 128 bytes).
    pub fn entry_array(&self) -> Result<Vec<u8>, GptError> {
        self.validate()?;
        let mut arr = vec![0u8; (ENTRY_COUNT * ENTRY_SIZE) as usize];
        for (i, p) in self.partitions.iter().enumerate() {
            let mut name = [U16::new(0); NAME_UNITS];
            for (slot, unit) in name.iter_mut().zip(p.name.encode_utf16()) {
                *slot = U16::new(unit);
            }
            let e = Entry {
                type_guid: p.type_guid.to_bytes_le(),
                part_guid: p.part_guid.to_bytes_le(),
                first_lba: U64::new(p.first_lba),
                last_lba: U64::new(p.last_lba),
                attributes: U64::new(p.attributes),
                name,
            };
            let at = (self.number(i) - 1) as usize * ENTRY_SIZE as usize;
            arr[at..at + ENTRY_SIZE as usize].copy_from_slice(e.as_bytes());
        }
        Ok(arr)
    }

    fn header(&self, primary: bool, entries_crc: u32) -> [u8; SECTOR as usize] {
        let last = self.disk_sectors - 1;
        let (my, alt, entries) = if primary {
            (1, last, 2)
        } else {
            (last, 1, last - ENTRY_ARRAY_SECTORS)
        };
        let mut h = Header {
            signature: SIGNATURE,
            revision: U32::new(REVISION),
            header_size: U32::new(HEADER_SIZE),
            header_crc32: U32::new(0),
            reserved: U32::new(0),
            my_lba: U64::new(my),
            alternate_lba: U64::new(alt),
            first_usable_lba: U64::new(self.first_usable_lba),
            last_usable_lba: U64::new(self.last_usable_lba),
            disk_guid: self.disk_guid.to_bytes_le(),
            partition_entry_lba: U64::new(entries),
            num_entries: U32::new(ENTRY_COUNT),
            entry_size: U32::new(ENTRY_SIZE),
            entries_crc32: U32::new(entries_crc),
        };
        h.header_crc32 = U32::new(crc32fast::hash(h.as_bytes()));
        let mut sector = [0u8; SECTOR as usize];
        sector[..HEADER_SIZE as usize].copy_from_slice(h.as_bytes());
        sector
    }

    /// The protective MBR's partition table and signature (bytes 446..512 of sector 0).
    pub fn protective_mbr_tail(&self) -> [u8; 66] {
        let last = self.disk_sectors - 1;
        let rec = MbrRecord {
            boot_indicator: 0,
            // CHS 0/0/2: cylinder 0, head 0, sector 2 (= LBA 1).
            starting_chs: [0x00, 0x02, 0x00],
            os_type: MBR_TYPE_PROTECTIVE,
            ending_chs: lba_to_chs(last),
            starting_lba: U32::new(1),
            size_in_lba: U32::new(u32::try_from(last).unwrap_or(u32::MAX)),
        };
        let tail = MbrTail {
            records: [
                rec,
                MbrRecord::default(),
                MbrRecord::default(),
                MbrRecord::default(),
            ],
            signature: [0x55, 0xAA],
        };
        let mut out = [0u8; 66];
        out.copy_from_slice(tail.as_bytes());
        out
    }

    /// Everything the table puts on disk, as `(byte offset, bytes)` in ascending order: the
    /// protective MBR tail, the primary header and entries, the backup entries and header.
    pub fn regions(&self) -> Result<Vec<Region>, GptError> {
        let arr = self.entry_array()?;
        let crc = crc32fast::hash(&arr);
        let last = self.disk_sectors - 1;
        Ok(vec![
            (MBR_TAIL_OFFSET, self.protective_mbr_tail().to_vec()),
            (SECTOR, self.header(true, crc).to_vec()),
            (2 * SECTOR, arr.clone()),
            ((last - ENTRY_ARRAY_SECTORS) * SECTOR, arr),
            (last * SECTOR, self.header(false, crc).to_vec()),
        ])
    }

    /// The same regions in the order an in-place rewrite must write them to survive a power
    /// cut, as two batches with a flush between: first the backup (entries, then header), then
    /// the primary (entries, header, the protective MBR tail). A copy whose header is written
    /// after its entries is never valid with the other copy's contents; so a cut in the first
    /// batch leaves the primary (old, valid) in charge, and a cut in the second leaves either
    /// a valid new primary or a primary whose CRC fails, which readers (firmware, and
    /// [`Gpt::read`]) answer with the backup, already new and flushed.
    pub fn rewrite_batches(&self) -> Result<[Vec<Region>; 2], GptError> {
        let mut r = self.regions()?.into_iter();
        let (Some(mbr), Some(ph), Some(pe), Some(be), Some(bh)) =
            (r.next(), r.next(), r.next(), r.next(), r.next())
        else {
            unreachable!("regions() has five entries");
        };
        Ok([vec![be, bh], vec![pe, ph, mbr]])
    }

    /// Writes the protective MBR tail, both headers and both entry arrays into `sink`, whose
    /// window must be the whole disk.
    pub fn write(&self, sink: &dyn Sink) -> Result<(), GptError> {
        if sink.len() != self.disk_size() {
            return Err(GptError::SinkSize {
                sink: sink.len(),
                disk: self.disk_size(),
            });
        }
        for (off, bytes) in self.regions()? {
            sink.write_at(off, &bytes).map_err(|source| GptError::Io {
                offset: off,
                source,
            })?;
        }
        Ok(())
    }

    /// Reads the GPT of a disk image or block device with `pread`. The size comes from seeking
    /// to the end, which also works for block devices.
    pub fn read(f: &std::fs::File) -> Result<Gpt, GptError> {
        use std::io::{Seek, SeekFrom};
        use std::os::unix::fs::FileExt;
        let mut handle = f;
        let len = handle
            .seek(SeekFrom::End(0))
            .map_err(|source| GptError::Io { offset: 0, source })?;
        Self::read_with(len, |off, buf| f.read_exact_at(buf, off))
    }

    /// Reads the GPT of an in-memory disk image.
    pub fn from_bytes(disk: &[u8]) -> Result<Gpt, GptError> {
        Self::read_with(disk.len() as u64, |off, buf| {
            crate::io::ReadAt::read_at(disk, off, buf)
        })
    }

    /// Reads the GPT of a disk of `len` bytes through a positional reader. Uses the primary
    /// header; if it or its entries are damaged, the backup at the last LBA, recording why in
    /// [`Gpt::primary_error`]; fails naming both problems when neither is usable.
    pub fn read_with(
        len: u64,
        mut read_at: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
    ) -> Result<Gpt, GptError> {
        let min = (HEAD_SECTORS + TAIL_SECTORS + 1) * SECTOR;
        if len < min {
            return Err(GptError::TooSmall { size: len, min });
        }
        let sectors = len / SECTOR;
        match read_one(&mut read_at, sectors, 1) {
            Ok(g) => Ok(g),
            Err(primary) => match read_one(&mut read_at, sectors, sectors - 1) {
                Ok(mut g) => {
                    g.primary_error = Some(primary.to_string());
                    Ok(g)
                }
                Err(backup) => Err(GptError::BothBad {
                    primary: Box::new(primary),
                    backup: Box::new(backup),
                }),
            },
        }
    }

    /// A human-readable listing: header fields, then one block per partition with byte offsets.
    pub fn dump(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "GPT disk {}", self.disk_guid);
        let _ = writeln!(
            s,
            "  size {} bytes ({} sectors of 512), usable LBA {}..={}",
            self.disk_size(),
            self.disk_sectors,
            self.first_usable_lba,
            self.last_usable_lba
        );
        if let Some(e) = &self.primary_error {
            let _ = writeln!(s, "  primary header unusable, read the backup: {e}");
        }
        for (i, p) in self.partitions.iter().enumerate() {
            let ty = type_by_guid(&p.type_guid).map_or("", |t| t.name);
            let _ = writeln!(
                s,
                "  #{:<3} {:?} type {} {}",
                self.number(i),
                p.name,
                p.type_guid,
                ty
            );
            let _ = writeln!(s, "       uuid {}", p.part_guid);
            let _ = writeln!(
                s,
                "       LBA {}..={} = bytes {}..{} ({} bytes)",
                p.first_lba,
                p.last_lba,
                p.offset(),
                p.offset() + p.size(),
                p.size()
            );
            if p.attributes != 0 {
                let names = attribute_names(p.attributes);
                let _ = writeln!(
                    s,
                    "       attributes {:#018x} {}",
                    p.attributes,
                    names.join(",")
                );
            }
        }
        s
    }
}

impl std::fmt::Display for Gpt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.dump())
    }
}

/// CHS address of `lba` with the 255-head, 63-sector geometry, or 0xFFFFFF past cylinder 1023.
fn lba_to_chs(lba: u64) -> [u8; 3] {
    let c = lba / (255 * 63);
    if c > 1023 {
        return [0xFF, 0xFF, 0xFF];
    }
    let h = (lba / 63) % 255;
    let s = lba % 63 + 1;
    [
        h as u8,
        (s as u8) | (((c >> 2) & 0xC0) as u8),
        (c & 0xFF) as u8,
    ]
}

fn read_one(
    read_at: &mut impl FnMut(u64, &mut [u8]) -> io::Result<()>,
    sectors: u64,
    lba: u64,
) -> Result<Gpt, GptError> {
    let mut sector = [0u8; SECTOR as usize];
    read_at(lba * SECTOR, &mut sector).map_err(|source| GptError::Io {
        offset: lba * SECTOR,
        source,
    })?;
    let h = Header::read_from_prefix(&sector)
        .map_err(|_| GptError::BadHeaderField {
            lba,
            field: "header",
            value: 0,
            expected: "92 bytes".into(),
        })?
        .0;
    if h.signature != SIGNATURE {
        return Err(GptError::BadSignature {
            lba,
            found: h.signature,
        });
    }
    let field = |field: &'static str, value: u64, expected: String| GptError::BadHeaderField {
        lba,
        field,
        value,
        expected,
    };
    let hsize = h.header_size.get();
    if !(HEADER_SIZE..=SECTOR as u32).contains(&hsize) {
        return Err(field("header size", hsize.into(), "92..=512".into()));
    }
    let mut copy = sector;
    copy[16..20].fill(0);
    let computed = crc32fast::hash(&copy[..hsize as usize]);
    if computed != h.header_crc32.get() {
        return Err(GptError::BadHeaderCrc {
            lba,
            stored: h.header_crc32.get(),
            computed,
        });
    }
    if h.revision.get() >> 16 != 1 {
        return Err(field(
            "revision",
            h.revision.get().into(),
            "major revision 1 (0x00010000)".into(),
        ));
    }
    if h.my_lba.get() != lba {
        return Err(field("my LBA", h.my_lba.get(), lba.to_string()));
    }
    let (first, last) = (h.first_usable_lba.get(), h.last_usable_lba.get());
    if first < 2 || last >= sectors || first > last.saturating_add(1) {
        return Err(field(
            "usable LBA range end",
            last,
            format!("a range starting at {first} that ends before the disk's {sectors} sectors"),
        ));
    }
    let esize = h.entry_size.get();
    if esize < ENTRY_SIZE || !esize.is_power_of_two() {
        return Err(field(
            "entry size",
            esize.into(),
            "128 × a power of two".into(),
        ));
    }
    let count = h.num_entries.get();
    let arr_len = u64::from(count) * u64::from(esize);
    // Generous bound (64 × the standard array) against absurd headers; real disks use 16 KiB.
    if arr_len > 1 << 20 {
        return Err(field(
            "entry count",
            count.into(),
            format!("an array of at most 1 MiB with {esize}-byte entries"),
        ));
    }
    let arr_lba = h.partition_entry_lba.get();
    let arr_sectors = arr_len.div_ceil(SECTOR);
    if arr_lba < 2 || arr_lba.saturating_add(arr_sectors) > sectors {
        return Err(field(
            "partition entry LBA",
            arr_lba,
            format!("an array of {arr_sectors} sectors inside the disk"),
        ));
    }
    let mut arr = vec![0u8; arr_len as usize];
    read_at(arr_lba * SECTOR, &mut arr).map_err(|source| GptError::Io {
        offset: arr_lba * SECTOR,
        source,
    })?;
    let computed = crc32fast::hash(&arr);
    if computed != h.entries_crc32.get() {
        return Err(GptError::BadEntriesCrc {
            header_lba: lba,
            lba: arr_lba,
            stored: h.entries_crc32.get(),
            computed,
        });
    }
    let mut partitions = Vec::new();
    let mut numbers = Vec::new();
    for (i, raw) in arr.chunks_exact(esize as usize).enumerate() {
        let Ok((e, _)) = Entry::read_from_prefix(raw) else {
            continue;
        };
        if e.type_guid == [0; 16] {
            continue;
        }
        let number = i as u32 + 1;
        let (pf, pl) = (e.first_lba.get(), e.last_lba.get());
        if pf > pl || pl >= sectors {
            return Err(GptError::BadEntry {
                lba: arr_lba,
                number,
                reason: format!(
                    "LBAs {pf}..={pl} are reversed or run past the disk's {sectors} sectors"
                ),
            });
        }
        let units: Vec<u16> = e
            .name
            .iter()
            .map(|u| u.get())
            .take_while(|&u| u != 0)
            .collect();
        partitions.push(Partition {
            type_guid: Uuid::from_bytes_le(e.type_guid),
            part_guid: Uuid::from_bytes_le(e.part_guid),
            first_lba: pf,
            last_lba: pl,
            attributes: e.attributes.get(),
            name: String::from_utf16_lossy(&units),
        });
        numbers.push(number);
    }
    Ok(Gpt {
        disk_guid: Uuid::from_bytes_le(h.disk_guid),
        partitions,
        entry_numbers: numbers,
        disk_sectors: sectors,
        first_usable_lba: first,
        last_usable_lba: last,
        primary_error: None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::sink::MemSink;

    fn sample() -> Gpt {
        let seed = Uuid::from_u128(0x0123456789abcdef0123456789abcdef);
        let mut g = Gpt::new(64 << 20, repart::disk_uuid(&seed)).unwrap();
        g.partitions.push(Partition {
            type_guid: TYPE_ESP,
            part_guid: repart::partition_uuid(&seed, &TYPE_ESP, 0),
            first_lba: 2048,
            last_lba: 2048 + 20480 - 1,
            attributes: 0,
            name: "esp".into(),
        });
        g.partitions.push(Partition {
            type_guid: TYPE_ROOT_X86_64,
            part_guid: repart::partition_uuid(&seed, &TYPE_ROOT_X86_64, 0),
            first_lba: 22528,
            last_lba: 100_000,
            attributes: ATTR_READ_ONLY | ATTR_GROWFS | ATTR_NO_AUTO,
            name: "root-x86-64 ünïcødé".into(),
        });
        g
    }

    fn written(g: &Gpt) -> Vec<u8> {
        let s = MemSink::new(g.disk_size() as usize);
        g.write(&s).unwrap();
        s.into_inner()
    }

    #[test]
    fn round_trip() {
        let g = sample();
        let disk = written(&g);
        let back = Gpt::from_bytes(&disk).unwrap();
        assert_eq!(back.disk_guid, g.disk_guid);
        assert_eq!(back.partitions, g.partitions);
        assert_eq!(back.entry_numbers, vec![1, 2]);
        assert_eq!(back.first_usable_lba, 34);
        assert_eq!(back.last_usable_lba, (64 << 20) / 512 - 34);
        assert!(back.primary_error.is_none());
        assert_eq!(&disk[510..512], &[0x55, 0xAA]);
        assert_eq!(disk[450], 0xEE);
        assert_eq!(&disk[512..520], b"EFI PART");
        // On disk the GUIDs are mixed-endian: the first three fields little-endian.
        assert_eq!(&disk[512 + 56..512 + 72], &g.disk_guid.to_bytes_le());
        assert_eq!(
            &disk[1024..1040],
            &[
                0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
                0xc9, 0x3b
            ]
        );
        assert_eq!(&disk[1040..1056], &g.partitions[0].part_guid.to_bytes_le());
        let d = g.disk_guid.as_bytes();
        assert_eq!(
            &disk[512 + 56..512 + 64],
            &[d[3], d[2], d[1], d[0], d[5], d[4], d[7], d[6]]
        );
        assert_eq!(&disk[512 + 64..512 + 72], &d[8..16]);
        let dump = back.dump();
        assert!(
            dump.contains("read-only,grow-fs,no-auto")
                || dump.contains("grow-fs,read-only,no-auto"),
            "{dump}"
        );
        assert!(dump.contains("esp"));
    }

    #[test]
    fn falls_back_to_backup_and_names_both_failures() {
        let g = sample();
        let mut disk = written(&g);
        // Damage one byte of the primary entry array: the entries CRC no longer matches.
        disk[2 * 512 + 40] ^= 1;
        let back = Gpt::from_bytes(&disk).unwrap();
        assert_eq!(back.partitions, g.partitions);
        let why = back.primary_error.unwrap();
        assert!(why.contains("entry array at LBA 2"), "{why}");
        // Now damage the backup header too.
        let last = disk.len() - 512;
        disk[last + 30] ^= 1;
        let err = Gpt::from_bytes(&disk).unwrap_err().to_string();
        assert!(err.contains("primary:") && err.contains("LBA 2"), "{err}");
        assert!(err.contains(&format!("LBA {}", last / 512)), "{err}");
        assert!(err.contains("header CRC32"), "{err}");
    }

    #[test]
    fn not_a_gpt() {
        let err = Gpt::from_bytes(&vec![0u8; 1 << 20])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no GPT header at LBA 1"), "{err}");
        assert!(Gpt::from_bytes(&[0u8; 1000]).is_err());
    }

    #[test]
    fn layout_errors() {
        let mut g = sample();
        g.partitions[1].first_lba = 20000;
        let e = g.validate().unwrap_err().to_string();
        assert!(e.contains("overlap"), "{e}");
        let mut g = sample();
        g.partitions[1].last_lba = g.disk_sectors - 1;
        assert!(g
            .validate()
            .unwrap_err()
            .to_string()
            .contains("usable area"));
        let mut g = sample();
        g.partitions[0].name = "x".repeat(37);
        assert!(g.validate().unwrap_err().to_string().contains("36"));
        let mut g = sample();
        g.partitions[0].type_guid = Uuid::nil();
        assert!(g.validate().is_err());
        assert!(Gpt::new(1000, Uuid::nil()).is_err());
        assert!(Gpt::new(512 * 60, Uuid::nil()).is_err());
        let s = MemSink::new(4096);
        assert!(sample().write(&s).is_err());
    }

    #[test]
    fn entry_numbers_and_type_table() {
        let mut g = sample();
        g.entry_numbers = vec![3, 1];
        let back = Gpt::from_bytes(&written(&g)).unwrap();
        assert_eq!(back.entry_numbers, vec![1, 3]);
        assert_eq!(back.partitions[0].name, g.partitions[1].name);
        let (n, p) = back.find(&g.partitions[0].part_guid).unwrap();
        assert_eq!((n, p.first_lba), (3, 2048));
        assert_eq!(type_by_name("esp").unwrap().guid, TYPE_ESP);
        assert_eq!(type_by_guid(&TYPE_VAR).unwrap().name, "var");
        assert_eq!(
            parse_type("0fc63daf-8483-4772-8e79-3d69d8477de4"),
            Some(TYPE_LINUX_GENERIC)
        );
        assert_eq!(
            parse_type("0FC63DAF848347728E793D69D8477DE4"),
            Some(TYPE_LINUX_GENERIC)
        );
        assert_eq!(parse_type("{0fc63daf-8483-4772-8e79-3d69d8477de4}"), None);
        assert_eq!(TYPE_ESP.to_string(), "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
        assert_eq!(attribute_by_name("no-auto"), Some(1 << 63));
        assert_eq!(lba_to_chs(0), [0, 1, 0]);
        assert_eq!(lba_to_chs(u64::from(u32::MAX)), [0xFF; 3]);
    }
}
