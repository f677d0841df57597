//! On-disk structures of ISO 9660 (ECMA-119 4th edition), Joliet (Microsoft, 1995), the System
//! Use Sharing Protocol (SUSP 1.12, IEEE P1281), the Rock Ridge Interchange Protocol (RRIP 1.10
//! "RRIP_1991A", IEEE P1282) and El Torito (Phoenix/IBM 1995).
//!
//! ECMA-119 stores most numbers twice, little-endian then big-endian ("both-byte order",
//! §7.2.3 and §7.3.3); [`BothU16`] and [`BothU32`] carry that in the type. Path tables come in a
//! little-endian (L) and a big-endian (M) copy (§9.4). El Torito fields are little-endian only.

use std::mem::{offset_of, size_of};

use zerocopy::byteorder::{BigEndian, LittleEndian, U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Logical sector and block size of every ISO kiln writes or reads (ECMA-119 §6.1.2 allows
/// others; no CD or El Torito implementation uses them).
pub const SECTOR: u64 = 2048;
/// Sectors 0..16 are the system area (ECMA-119 §6.2.1): MBR and GPT live there.
pub const SYSTEM_AREA_SECTORS: u32 = 16;
/// Standard identifier of every volume descriptor (ECMA-119 §8.1.2).
pub const STANDARD_ID: [u8; 5] = *b"CD001";

/// Volume descriptor type: boot record (ECMA-119 §8.2).
pub const VD_BOOT_RECORD: u8 = 0;
/// Volume descriptor type: primary (ECMA-119 §8.4).
pub const VD_PRIMARY: u8 = 1;
/// Volume descriptor type: supplementary, used by Joliet (ECMA-119 §8.5).
pub const VD_SUPPLEMENTARY: u8 = 2;
/// Volume descriptor type: set terminator (ECMA-119 §8.3).
pub const VD_TERMINATOR: u8 = 255;

/// Joliet UCS-2 level 3 escape sequence in a supplementary descriptor (Joliet spec §2).
pub const JOLIET_ESCAPE_L3: [u8; 3] = *b"%/E";
/// Level 1 and 2 escape sequences, accepted by the reader.
pub const JOLIET_ESCAPES: [[u8; 3]; 3] = [*b"%/@", *b"%/C", *b"%/E"];

/// Directory record flag: hidden ("existence", ECMA-119 §9.1.6 bit 0).
pub const FLAG_HIDDEN: u8 = 0x01;
/// Directory record flag: the record describes a directory (bit 1).
pub const FLAG_DIRECTORY: u8 = 0x02;
/// Directory record flag: not the final record of a multi-extent file (bit 7).
pub const FLAG_MULTI_EXTENT: u8 = 0x80;

/// A 16-bit number stored little-endian then big-endian (ECMA-119 §7.2.3).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct BothU16 {
    /// The value, little-endian.
    pub le: U16<LittleEndian>,
    /// The same value, big-endian.
    pub be: U16<BigEndian>,
}
const _: () = assert!(size_of::<BothU16>() == 4);

impl BothU16 {
    /// Both copies of `v`.
    pub fn new(v: u16) -> Self {
        Self {
            le: v.into(),
            be: v.into(),
        }
    }

    /// The little-endian copy (what every reader in practice trusts).
    pub fn get(&self) -> u16 {
        self.le.get()
    }

    /// True when both copies agree.
    pub fn consistent(&self) -> bool {
        self.le.get() == self.be.get()
    }
}

/// A 32-bit number stored little-endian then big-endian (ECMA-119 §7.3.3).
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct BothU32 {
    /// The value, little-endian.
    pub le: U32<LittleEndian>,
    /// The same value, big-endian.
    pub be: U32<BigEndian>,
}
const _: () = assert!(size_of::<BothU32>() == 8);

impl BothU32 {
    /// Both copies of `v`.
    pub fn new(v: u32) -> Self {
        Self {
            le: v.into(),
            be: v.into(),
        }
    }

    /// The little-endian copy.
    pub fn get(&self) -> u32 {
        self.le.get()
    }

    /// True when both copies agree.
    pub fn consistent(&self) -> bool {
        self.le.get() == self.be.get()
    }
}

/// The 7-byte recording date of a directory record (ECMA-119 §9.1.5), also used by Rock
/// Ridge TF entries in their short form (RRIP §4.1.6).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct ShortDate {
    /// Years since 1900 (0..=255, so 1900..=2155).
    pub years_since_1900: u8,
    /// Month, 1..=12.
    pub month: u8,
    /// Day of the month, 1..=31.
    pub day: u8,
    /// Hour, 0..=23.
    pub hour: u8,
    /// Minute, 0..=59.
    pub minute: u8,
    /// Second, 0..=59.
    pub second: u8,
    /// Offset from UTC in 15-minute intervals, signed (kiln always writes 0).
    pub gmt_offset: i8,
}
const _: () = assert!(size_of::<ShortDate>() == 7);

/// The 17-byte volume date of a volume descriptor (ECMA-119 §8.4.26.1): sixteen ASCII digits
/// `YYYYMMDDHHMMSScc` (cc = hundredths) and a signed offset from UTC in 15-minute units.
/// "Not specified" is sixteen `'0'` digits and offset 0.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C)]
pub struct LongDate {
    /// `YYYYMMDDHHMMSScc` in ASCII digits.
    pub digits: [u8; 16],
    /// Offset from UTC in 15-minute intervals.
    pub gmt_offset: i8,
}
const _: () = assert!(size_of::<LongDate>() == 17);

impl LongDate {
    /// The "not specified" date.
    pub const UNSET: LongDate = LongDate {
        digits: *b"0000000000000000",
        gmt_offset: 0,
    };
}

/// The fixed 33-byte part of a directory record (ECMA-119 §9.1). The file identifier follows,
/// then a padding byte when the identifier length is even, then the System Use area (SUSP).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct DirRecordHeader {
    /// Length of the whole record in bytes (33..=255, always even).
    pub len: u8,
    /// Length of the extended attribute record in sectors (kiln writes 0).
    pub ext_attr_len: u8,
    /// Sector number (LBA) of the file's or directory's extent.
    pub extent: BothU32,
    /// Data length in bytes; for directories a multiple of 2048.
    pub size: BothU32,
    /// Recording date and time.
    pub date: ShortDate,
    /// `FLAG_*` bits.
    pub flags: u8,
    /// File unit size for interleaved files (0: not interleaved).
    pub unit_size: u8,
    /// Interleave gap size (0: not interleaved).
    pub interleave_gap: u8,
    /// Volume sequence number of the volume holding the extent (1).
    pub volume_seq: BothU16,
    /// Length of the file identifier in bytes.
    pub name_len: u8,
}
const _: () = assert!(size_of::<DirRecordHeader>() == 33);
/// Byte offset of the both-endian data length inside a directory record; injection rewrites
/// these 8 bytes.
pub const RECORD_SIZE_OFFSET: usize = offset_of!(DirRecordHeader, size);
const _: () = assert!(RECORD_SIZE_OFFSET == 10);
/// Byte offset of the both-endian extent LBA inside a directory record.
pub const RECORD_EXTENT_OFFSET: usize = offset_of!(DirRecordHeader, extent);
const _: () = assert!(RECORD_EXTENT_OFFSET == 2);

/// The longest a directory record may be (its length is one byte; ECMA-119 §9.1.1).
pub const MAX_RECORD_LEN: usize = 255;

/// Padding after a file identifier of `name_len` bytes: records are even-length, so an even
/// identifier length (33 + even is odd) takes one padding byte (ECMA-119 §9.1.12).
pub const fn name_pad(name_len: usize) -> usize {
    if name_len.is_multiple_of(2) {
        1
    } else {
        0
    }
}

/// The fixed 8-byte part of a path table record (ECMA-119 §9.4). The directory identifier
/// follows, padded to an even length. Byte order of the numbers depends on the table (L or M),
/// so they are raw bytes here.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct PathTableHeader {
    /// Length of the directory identifier.
    pub name_len: u8,
    /// Extended attribute record length (0).
    pub ext_attr_len: u8,
    /// Extent LBA of the directory, in the table's byte order.
    pub extent: [u8; 4],
    /// Number (1-based, in path table order) of the parent directory, in the table's byte order.
    pub parent: [u8; 2],
}
const _: () = assert!(size_of::<PathTableHeader>() == 8);

/// A primary (type 1) or supplementary (type 2) volume descriptor (ECMA-119 §8.4, §8.5).
/// Joliet uses the supplementary form with UCS-2 big-endian identifiers and an escape sequence.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct VolumeDescriptor {
    /// `VD_PRIMARY` or `VD_SUPPLEMENTARY`.
    pub vd_type: u8,
    /// `CD001`.
    pub id: [u8; 5],
    /// Descriptor version, 1.
    pub version: u8,
    /// Volume flags (supplementary only; 0).
    pub flags: u8,
    /// System identifier (a-characters, or UCS-2 for Joliet), space padded.
    pub system_id: [u8; 32],
    /// Volume identifier (d-characters, or UCS-2 for Joliet), space padded: the label.
    pub volume_id: [u8; 32],
    /// Unused, zero.
    pub unused1: [u8; 8],
    /// Number of logical blocks in the volume.
    pub volume_space_size: BothU32,
    /// Escape sequences (supplementary only; Joliet puts `%/E` here).
    pub escapes: [u8; 32],
    /// Volume set size (1).
    pub volume_set_size: BothU16,
    /// Volume sequence number (1).
    pub volume_seq: BothU16,
    /// Logical block size in bytes (2048).
    pub block_size: BothU16,
    /// Path table size in bytes.
    pub path_table_size: BothU32,
    /// LBA of the little-endian path table.
    pub l_path_table: U32<LittleEndian>,
    /// LBA of the optional second L table (0: none).
    pub l_path_table_opt: U32<LittleEndian>,
    /// LBA of the big-endian path table.
    pub m_path_table: U32<BigEndian>,
    /// LBA of the optional second M table (0: none).
    pub m_path_table_opt: U32<BigEndian>,
    /// Directory record of the root directory (33 bytes plus a one-byte identifier 0x00).
    pub root: DirRecordHeader,
    /// Identifier of the root record: 0x00.
    pub root_name: u8,
    /// Volume set identifier, space padded.
    pub volume_set_id: [u8; 128],
    /// Publisher identifier, space padded.
    pub publisher_id: [u8; 128],
    /// Data preparer identifier, space padded.
    pub preparer_id: [u8; 128],
    /// Application identifier, space padded.
    pub application_id: [u8; 128],
    /// Copyright file identifier, space padded.
    pub copyright_file: [u8; 37],
    /// Abstract file identifier, space padded.
    pub abstract_file: [u8; 37],
    /// Bibliographic file identifier, space padded.
    pub bibliographic_file: [u8; 37],
    /// Volume creation date.
    pub created: LongDate,
    /// Volume modification date; blkid and GRUB present it as the volume UUID.
    pub modified: LongDate,
    /// Volume expiration date (unset).
    pub expires: LongDate,
    /// Volume effective date.
    pub effective: LongDate,
    /// File structure version, 1.
    pub file_structure_version: u8,
    /// Reserved, zero.
    pub reserved1: u8,
    /// Application use, zero.
    pub application_use: [u8; 512],
    /// Reserved, zero.
    pub reserved2: [u8; 653],
}
const _: () = assert!(size_of::<VolumeDescriptor>() == 2048);
const _: () = assert!(offset_of!(VolumeDescriptor, volume_space_size) == 80);
const _: () = assert!(offset_of!(VolumeDescriptor, root) == 156);
const _: () = assert!(offset_of!(VolumeDescriptor, created) == 813);
const _: () = assert!(offset_of!(VolumeDescriptor, file_structure_version) == 881);

/// The boot system identifier of an El Torito boot record, NUL padded to 32 bytes.
pub const EL_TORITO_ID: &[u8] = b"EL TORITO SPECIFICATION";

/// El Torito boot record volume descriptor (El Torito §2.0), always at sector 17.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct BootRecord {
    /// `VD_BOOT_RECORD` (0).
    pub vd_type: u8,
    /// `CD001`.
    pub id: [u8; 5],
    /// Version, 1.
    pub version: u8,
    /// `EL TORITO SPECIFICATION`, NUL padded.
    pub boot_system_id: [u8; 32],
    /// Unused, zero.
    pub boot_id: [u8; 32],
    /// LBA of the boot catalog (little-endian; bytes 71..75 of the sector).
    pub catalog_lba: U32<LittleEndian>,
    /// Unused, zero.
    pub unused: [u8; 1973],
}
const _: () = assert!(size_of::<BootRecord>() == 2048);
const _: () = assert!(offset_of!(BootRecord, catalog_lba) == 71);

/// Platform id of an El Torito entry: 80x86 BIOS.
pub const PLATFORM_X86: u8 = 0;
/// Platform id: UEFI (UEFI 2.10 §13.3.2.1).
pub const PLATFORM_EFI: u8 = 0xEF;
/// Boot indicator of a bootable initial/section entry.
pub const BOOT_INDICATOR_BOOTABLE: u8 = 0x88;
/// Section header indicator: more headers follow.
pub const SECTION_HEADER_MORE: u8 = 0x90;
/// Section header indicator: final header.
pub const SECTION_HEADER_FINAL: u8 = 0x91;
/// Boot media type: no emulation (El Torito §2.2).
pub const MEDIA_NO_EMULATION: u8 = 0;
/// El Torito's virtual sector, the unit of an entry's sector count.
pub const EL_TORITO_VIRTUAL_SECTOR: u64 = 512;

/// The validation entry that opens a boot catalog (El Torito §2.1).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct ValidationEntry {
    /// Header id, 1.
    pub header_id: u8,
    /// Platform of the initial/default entry (`PLATFORM_*`).
    pub platform: u8,
    /// Reserved, zero.
    pub reserved: U16<LittleEndian>,
    /// Manufacturer/developer id, NUL padded.
    pub id_string: [u8; 24],
    /// Makes the sixteen little-endian words of this entry sum to zero.
    pub checksum: U16<LittleEndian>,
    /// `55 AA`.
    pub key: [u8; 2],
}
const _: () = assert!(size_of::<ValidationEntry>() == 32);

/// An initial/default entry or a section entry (El Torito §2.2, §2.4).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct BootEntry {
    /// `BOOT_INDICATOR_BOOTABLE` (0x88) or 0 (not bootable).
    pub indicator: u8,
    /// Boot media type (`MEDIA_NO_EMULATION`).
    pub media_type: u8,
    /// Load segment for BIOS (0 means the traditional 0x7C0).
    pub load_segment: U16<LittleEndian>,
    /// System type: the partition type byte of the image for hard-disk emulation, else 0.
    pub system_type: u8,
    /// Unused, zero.
    pub unused1: u8,
    /// Image length in 512-byte virtual sectors (saturates at 0xFFFF).
    pub sector_count: U16<LittleEndian>,
    /// LBA (2048-byte sectors) of the image.
    pub load_rba: U32<LittleEndian>,
    /// Selection criteria type (0: none).
    pub criteria_type: u8,
    /// Vendor unique selection criteria, zero.
    pub criteria: [u8; 19],
}
const _: () = assert!(size_of::<BootEntry>() == 32);

/// A section header (El Torito §2.3).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct SectionHeader {
    /// `SECTION_HEADER_MORE` or `SECTION_HEADER_FINAL`.
    pub indicator: u8,
    /// Platform of the entries in this section.
    pub platform: u8,
    /// Number of section entries following.
    pub entries: U16<LittleEndian>,
    /// Identifier, NUL padded.
    pub id_string: [u8; 28],
}
const _: () = assert!(size_of::<SectionHeader>() == 32);

/// Header shared by every SUSP entry (SUSP §4.1): two-letter signature, total length in bytes
/// (header included), entry version.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct SuspHeader {
    /// Signature, e.g. `PX`.
    pub sig: [u8; 2],
    /// Length of the whole entry in bytes.
    pub len: u8,
    /// Entry version (1 for every entry kiln writes).
    pub version: u8,
}
const _: () = assert!(size_of::<SuspHeader>() == 4);

/// SP: marks a SUSP-using volume; first entry of the root's "." record (SUSP §5.3).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct SpEntry {
    /// `SP`, 7, 1.
    pub header: SuspHeader,
    /// Check bytes `BE EF`.
    pub check: [u8; 2],
    /// Bytes to skip at the start of every System Use area (kiln writes 0).
    pub len_skp: u8,
}
const _: () = assert!(size_of::<SpEntry>() == 7);

/// CE: continues the System Use entries in a continuation area (SUSP §5.1).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct CeEntry {
    /// `CE`, 28, 1.
    pub header: SuspHeader,
    /// LBA of the sector holding the continuation area.
    pub block: BothU32,
    /// Byte offset of the area within that sector.
    pub offset: BothU32,
    /// Length of the area in bytes.
    pub len: BothU32,
}
const _: () = assert!(size_of::<CeEntry>() == 28);

/// PX: POSIX file attributes, RRIP 1.10 form without a serial number (RRIP §4.1.1).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct PxEntry {
    /// `PX`, 36, 1.
    pub header: SuspHeader,
    /// `st_mode`: file type and permission bits.
    pub mode: BothU32,
    /// `st_nlink`.
    pub nlink: BothU32,
    /// `st_uid`.
    pub uid: BothU32,
    /// `st_gid`.
    pub gid: BothU32,
}
const _: () = assert!(size_of::<PxEntry>() == 36);

/// PN: device number of a character or block device (RRIP §4.1.2).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct PnEntry {
    /// `PN`, 20, 1.
    pub header: SuspHeader,
    /// High word of the device number (see `rock_ridge::encode_device`).
    pub high: BothU32,
    /// Low word of the device number.
    pub low: BothU32,
}
const _: () = assert!(size_of::<PnEntry>() == 20);

/// TF flag: creation time recorded.
pub const TF_CREATION: u8 = 0x01;
/// TF flag: modification time recorded.
pub const TF_MODIFY: u8 = 0x02;
/// TF flag: access time recorded.
pub const TF_ACCESS: u8 = 0x04;
/// TF flag: attribute change time recorded.
pub const TF_ATTRIBUTES: u8 = 0x08;
/// TF flag: backup time recorded.
pub const TF_BACKUP: u8 = 0x10;
/// TF flag: expiration time recorded.
pub const TF_EXPIRATION: u8 = 0x20;
/// TF flag: effective time recorded.
pub const TF_EFFECTIVE: u8 = 0x40;
/// TF flag: times use the 17-byte long form.
pub const TF_LONG_FORM: u8 = 0x80;

/// NM/SL component flag: continued in the next entry/component.
pub const RR_CONTINUE: u8 = 0x01;
/// NM/SL flag: refers to the current directory (`.`).
pub const RR_CURRENT: u8 = 0x02;
/// NM/SL flag: refers to the parent directory (`..`).
pub const RR_PARENT: u8 = 0x04;
/// SL component flag: the root directory (`/`).
pub const SL_ROOT: u8 = 0x08;

/// ER identifier of RRIP 1.10, and the descriptor and source texts RRIP §5.3 assigns to it.
pub const RRIP_ID: &[u8] = b"RRIP_1991A";
/// ER descriptor text for `RRIP_1991A` (fixed by the RRIP specification).
pub const RRIP_DES: &[u8] =
    b"THE ROCK RIDGE INTERCHANGE PROTOCOL PROVIDES SUPPORT FOR POSIX FILE SYSTEM SEMANTICS";
/// ER source text for `RRIP_1991A` (fixed by the RRIP specification).
pub const RRIP_SRC: &[u8] = b"PLEASE CONTACT DISC PUBLISHER FOR SPECIFICATION SOURCE.  SEE PUBLISHER IDENTIFIER IN PRIMARY VOLUME DESCRIPTOR FOR CONTACT INFORMATION.";
/// Other Rock Ridge identifiers a reader accepts (RRIP 1.12).
pub const RRIP_IDS: [&[u8]; 3] = [b"RRIP_1991A", b"IEEE_P1282", b"IEEE_1282"];

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn both_endian_bytes() {
        assert_eq!(
            BothU32::new(0x0102_0304).as_bytes(),
            [4, 3, 2, 1, 1, 2, 3, 4]
        );
        assert_eq!(BothU16::new(0x0102).as_bytes(), [2, 1, 1, 2]);
    }
}
