//! The slot table: where an image's injectable slots live and what to rewrite when a payload
//! goes in. Stored in two places with the same content:
//!
//! - **Inside the image** at byte [`TABLE_OFFSET`] (24576), at most [`TABLE_MAX`] (8 KiB). On a
//!   GPT disk that is the gap between the end of the primary partition entry array (LBA 2..33
//!   of 512-byte sectors, ending at byte 17408; UEFI 2.10 §5.3) and the first partition, which
//!   kiln aligns to 1 MiB; in an ISO 9660 image it is inside the 32 KiB system area (sectors
//!   0..15 of 2048 bytes, ECMA-119 §6.2.1) which the ISO writer leaves free there. A bare
//!   filesystem image has no such gap and uses the sidecar only.
//! - **As a sidecar** `IMAGE.slots.json` next to the image (pretty-printed JSON of
//!   [`SlotTable`] with a format marker).
//!
//! In-image layout (all integers little-endian):
//!
//! | off | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `KILNSLOT` |
//! | 8 | 4 | version = 1 |
//! | 12 | 4 | header length = 64 |
//! | 16 | 4 | body length in bytes |
//! | 20 | 4 | body encoding: 0 = compact JSON of [`SlotTable`] |
//! | 24 | 32 | sha256 of the body |
//! | 56 | 4 | crc32c (Castagnoli) of header bytes 0..56 |
//! | 60 | 4 | reserved, zero |
//! | 64 | body length | body |
//!
//! The rest of the 8 KiB area is zero. All offsets in the table are absolute byte offsets in
//! the image, so a reader needs no partition table or filesystem parser to inject.

use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::{Error, Result};

/// Byte offset of the in-image slot table.
pub const TABLE_OFFSET: u64 = 24576;
/// Bytes reserved for the in-image table (header + body), ending at 32768.
pub const TABLE_MAX: usize = 8192;
/// First bytes of the in-image table.
pub const MAGIC: [u8; 8] = *b"KILNSLOT";
/// Table format version this code reads and writes.
pub const VERSION: u32 = 1;
/// Value of `format` in the JSON sidecar.
pub const SIDECAR_FORMAT: &str = "kiln-slots";

/// The 64-byte header in front of the in-image table body.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct TableHeader {
    /// `KILNSLOT`.
    pub magic: [u8; 8],
    /// Format version ([`VERSION`]).
    pub version: U32,
    /// Size of this header in bytes (64); lets a later version grow it.
    pub header_len: U32,
    /// Length of the body that follows, in bytes.
    pub body_len: U32,
    /// Body encoding: 0 = compact JSON.
    pub encoding: U32,
    /// sha256 of the body bytes.
    pub body_sha256: [u8; 32],
    /// crc32c of header bytes 0..56, so a damaged length is caught before it is trusted.
    pub header_crc32c: U32,
    /// Zero.
    pub reserved: U32,
}
const _: () = assert!(size_of::<TableHeader>() == 64);
const _: () = assert!(std::mem::offset_of!(TableHeader, body_sha256) == 24);
const _: () = assert!(std::mem::offset_of!(TableHeader, header_crc32c) == 56);
const HEADER_LEN: usize = size_of::<TableHeader>();

/// A filesystem kind a slot can live in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsKind {
    /// A plain byte range with little-endian size field(s): no filesystem.
    Raw,
    /// An ext4 regular file.
    Ext4,
    /// A FAT12/16/32 regular file.
    Fat,
    /// An uncompressed, flat EROFS regular file.
    Erofs,
    /// An ISO 9660 file extent.
    Iso9660,
}

impl std::fmt::Display for FsKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FsKind::Raw => "raw",
            FsKind::Ext4 => "ext4",
            FsKind::Fat => "fat",
            FsKind::Erofs => "erofs",
            FsKind::Iso9660 => "iso9660",
        })
    }
}

/// An absolute byte range in the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteRange {
    /// Absolute byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl ByteRange {
    /// One past the last byte, or `None` on overflow.
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.len)
    }
}

/// A little-endian unsigned size field that holds the payload length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SizeField {
    /// Absolute byte offset of the field.
    pub offset: u64,
    /// Width in bytes: 1, 2, 4 or 8.
    pub width: u8,
}

/// Metadata of a raw slot: the data ranges are all there is, plus size fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawMeta {
    /// Fields that receive the payload length (little-endian), e.g. a header in front of the
    /// data that a consumer reads to know how much of the range is payload.
    #[serde(default)]
    pub size_fields: Vec<SizeField>,
}

/// Metadata of an ext4 slot (offsets absolute in the image).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ext4Meta {
    /// Byte offset of the filesystem (its partition) in the image.
    pub fs_offset: u64,
    /// Inode number of the slot file.
    pub inode: u32,
    /// Byte offset of its on-disk inode.
    pub inode_offset: u64,
}

/// Metadata of a FAT slot (offsets absolute in the image).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FatMeta {
    /// Byte offset of the filesystem (its partition) in the image.
    pub fs_offset: u64,
    /// Byte offset of the file's 8.3 directory entry.
    pub dirent_offset: u64,
    /// First cluster of the reservation.
    pub first_cluster: u32,
    /// Clusters reserved.
    pub cluster_count: u32,
    /// Byte offset of each FAT copy.
    pub fat_offsets: Vec<u64>,
    /// Byte offset of the FAT32 FSInfo sector, if any.
    pub fsinfo_offset: Option<u64>,
    /// Bytes per cluster.
    pub cluster_size: u32,
    /// FAT entry width in bits: 12, 16 or 32.
    pub fat_bits: u8,
}

/// Metadata of an EROFS slot (offsets absolute in the image).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErofsMeta {
    /// Byte offset of the filesystem (its partition) in the image.
    pub fs_offset: u64,
    /// Inode number (nid).
    pub nid: u64,
    /// Byte offset of the on-disk inode.
    pub inode_offset: u64,
    /// True for the 64-byte extended inode (64-bit size field), false for the compact one.
    pub extended: bool,
}

/// Metadata of an ISO 9660 slot (offsets absolute in the image).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsoMeta {
    /// Byte offset of the ISO filesystem in the image (0 for a plain ISO).
    pub fs_offset: u64,
    /// Logical block (2048 bytes) of the file's extent.
    pub extent_lba: u32,
    /// Byte offset of every directory record that points at the extent.
    pub record_offsets: Vec<u64>,
}

/// What to rewrite when a payload goes in, per filesystem kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum SlotMeta {
    /// See [`RawMeta`].
    Raw(RawMeta),
    /// See [`Ext4Meta`].
    Ext4(Ext4Meta),
    /// See [`FatMeta`].
    Fat(FatMeta),
    /// See [`ErofsMeta`].
    Erofs(ErofsMeta),
    /// See [`IsoMeta`].
    Iso9660(IsoMeta),
}

impl SlotMeta {
    /// The filesystem kind.
    pub fn kind(&self) -> FsKind {
        match self {
            SlotMeta::Raw(_) => FsKind::Raw,
            SlotMeta::Ext4(_) => FsKind::Ext4,
            SlotMeta::Fat(_) => FsKind::Fat,
            SlotMeta::Erofs(_) => FsKind::Erofs,
            SlotMeta::Iso9660(_) => FsKind::Iso9660,
        }
    }
}

/// Length and digest of a payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadInfo {
    /// Length in bytes.
    pub len: u64,
    /// sha256, lowercase hex.
    pub sha256: String,
}

impl PayloadInfo {
    /// Describes `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self {
            len: bytes.len() as u64,
            sha256: hex::encode(Sha256::digest(bytes)),
        }
    }
}

/// One slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// Unique name (`[A-Za-z0-9._-]`, 1..=64 characters).
    pub name: String,
    /// Path of the file inside its filesystem, for humans (`/piece.html`); empty for raw.
    #[serde(default)]
    pub path: String,
    /// Largest payload in bytes.
    pub capacity: u64,
    /// The reserved data area, in payload order. Payload bytes fill it from the start; the
    /// rest is zeroed on injection. Total length ≥ capacity.
    pub data: Vec<ByteRange>,
    /// Metadata to rewrite; its `kind` is the filesystem kind.
    pub meta: SlotMeta,
    /// The payload the base image holds.
    pub default: PayloadInfo,
}

impl Slot {
    /// The filesystem kind.
    pub fn kind(&self) -> FsKind {
        self.meta.kind()
    }

    /// Total bytes of the reserved data ranges.
    pub fn reserved(&self) -> u64 {
        self.data.iter().map(|r| r.len).fold(0, u64::saturating_add)
    }

    /// The first image byte an injection into this slot can change: its data, or the
    /// metadata its kind rewrites (size fields; the ext4 or EROFS inode; the FAT directory
    /// entry, FAT copies and FSInfo sector; the ISO 9660 directory records). Every byte before
    /// it is the base's whatever the payload, so the base's SHA-256 state there can be reused.
    pub fn first_patchable(&self) -> u64 {
        let data = self.data.iter().map(|r| r.offset);
        let meta: Vec<u64> = match &self.meta {
            SlotMeta::Raw(m) => m.size_fields.iter().map(|f| f.offset).collect(),
            SlotMeta::Ext4(m) => vec![m.inode_offset],
            SlotMeta::Fat(m) => m
                .fat_offsets
                .iter()
                .copied()
                .chain([m.dirent_offset])
                .chain(m.fsinfo_offset)
                .collect(),
            SlotMeta::Erofs(m) => vec![m.inode_offset],
            SlotMeta::Iso9660(m) => m.record_offsets.clone(),
        };
        data.chain(meta).min().unwrap_or(0)
    }
}

/// All slots of an image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotTable {
    /// Size of the image the table describes, in bytes; a shorter file is a truncated image.
    pub image_len: u64,
    /// The slots, in build order.
    pub slots: Vec<Slot>,
}

/// The sidecar's JSON: the table plus a format marker and version.
#[derive(Serialize, Deserialize)]
struct Sidecar {
    format: String,
    version: u32,
    #[serde(flatten)]
    table: SlotTable,
}

fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl SlotTable {
    /// Where SHA-256 midstates of the base are worth keeping: each slot's
    /// [`Slot::first_patchable`] byte, ascending (rounded down to a block by the chunk table).
    pub fn resume_points(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.slots.iter().map(Slot::first_patchable).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The slot called `name`.
    pub fn get(&self, name: &str) -> Option<&Slot> {
        self.slots.iter().find(|s| s.name == name)
    }

    /// Comma-separated slot names, for messages.
    pub fn names(&self) -> String {
        if self.slots.is_empty() {
            return "no slots".into();
        }
        self.slots
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Checks that the table is self-consistent: unique valid names, data ranges inside the
    /// image and disjoint, capacity within the reservation, size fields that fit the capacity
    /// and do not overlap data.
    pub fn validate(&self) -> Result<()> {
        let bad =
            |s: &Slot, msg: String| Err(Error::InvalidTable(format!("slot {:?}: {msg}", s.name)));
        let mut spans: Vec<(u64, u64, &str)> = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            if !valid_name(&s.name) {
                return bad(
                    s,
                    "name must be 1-64 characters of A-Z a-z 0-9 . _ -".into(),
                );
            }
            if self.slots[..i].iter().any(|o| o.name == s.name) {
                return bad(s, "name used twice".into());
            }
            if s.data.is_empty() {
                return bad(s, "no data ranges".into());
            }
            for r in &s.data {
                match r.end() {
                    Some(end) if end <= self.image_len => spans.push((r.offset, end, &s.name)),
                    _ => {
                        return bad(
                            s,
                            format!(
                            "data range at offset {} (+{}) runs past the end of the {}-byte image",
                            r.offset, r.len, self.image_len
                        ),
                        )
                    }
                }
            }
            if s.capacity > s.reserved() {
                return bad(
                    s,
                    format!(
                        "capacity {} exceeds the {} bytes of its data ranges",
                        s.capacity,
                        s.reserved()
                    ),
                );
            }
            if s.default.len > s.capacity {
                return bad(
                    s,
                    format!(
                        "default payload of {} bytes exceeds the capacity",
                        s.default.len
                    ),
                );
            }
            if let SlotMeta::Raw(m) = &s.meta {
                for f in &m.size_fields {
                    if !matches!(f.width, 1 | 2 | 4 | 8) {
                        return bad(
                            s,
                            format!(
                                "size field at offset {} has width {}, expected 1, 2, 4 or 8",
                                f.offset, f.width
                            ),
                        );
                    }
                    if f.width < 8 && s.capacity >> (8 * u32::from(f.width)) != 0 {
                        return bad(
                            s,
                            format!(
                                "size field at offset {} ({} bytes) cannot hold the capacity {}",
                                f.offset, f.width, s.capacity
                            ),
                        );
                    }
                    match f.offset.checked_add(u64::from(f.width)) {
                        Some(end) if end <= self.image_len => spans.push((f.offset, end, &s.name)),
                        _ => {
                            return bad(
                                s,
                                format!(
                                    "size field at offset {} runs past the end of the image",
                                    f.offset
                                ),
                            )
                        }
                    }
                }
            }
        }
        spans.sort();
        for w in spans.windows(2) {
            if let [a, b] = w {
                if b.0 < a.1 {
                    return Err(Error::InvalidTable(format!(
                        "slot {:?} bytes at offset {} overlap slot {:?} bytes at offset {}",
                        b.2, b.0, a.2, a.0
                    )));
                }
            }
        }
        Ok(())
    }

    /// The in-image encoding (header + body), at most [`TABLE_MAX`] bytes.
    pub fn encode(&self) -> Result<Vec<u8>> {
        self.validate()?;
        let body = serde_json::to_vec(self).map_err(|e| Error::InvalidTable(e.to_string()))?;
        if HEADER_LEN + body.len() > TABLE_MAX {
            return Err(Error::InvalidTable(format!(
                "encoded table is {} bytes, more than the {TABLE_MAX} bytes reserved at offset {TABLE_OFFSET}",
                HEADER_LEN + body.len()
            )));
        }
        let mut h = TableHeader {
            magic: MAGIC,
            version: VERSION.into(),
            header_len: (HEADER_LEN as u32).into(),
            body_len: (body.len() as u32).into(),
            encoding: 0.into(),
            body_sha256: Sha256::digest(&body).into(),
            header_crc32c: 0.into(),
            reserved: 0.into(),
        };
        h.header_crc32c = crc32c::crc32c(&h.as_bytes()[..56]).into();
        let mut out = h.as_bytes().to_vec();
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Decodes an in-image table from the bytes at [`TABLE_OFFSET`] (`area` may be shorter than
    /// [`TABLE_MAX`] when the image ends early; `place` names the image in errors).
    pub fn decode(area: &[u8], place: &str) -> Result<Self> {
        let err = |offset: u64, msg: String| Error::Table {
            place: place.to_string(),
            offset,
            msg,
        };
        let Some(hb) = area.get(..HEADER_LEN) else {
            return Err(err(
                TABLE_OFFSET,
                format!(
                    "image ends {} bytes into the {HEADER_LEN}-byte table header (truncated image?)",
                    area.len()
                ),
            ));
        };
        let h = TableHeader::read_from_bytes(hb)
            .map_err(|_| err(TABLE_OFFSET, "unreadable header".into()))?;
        if h.magic != MAGIC {
            return Err(err(
                TABLE_OFFSET,
                format!(
                    "no slot table: expected magic \"KILNSLOT\", found {}",
                    hex::encode(h.magic)
                ),
            ));
        }
        let crc = crc32c::crc32c(&hb[..56]);
        if crc != h.header_crc32c.get() {
            return Err(err(
                TABLE_OFFSET + 56,
                format!(
                    "header checksum mismatch: stored crc32c {:08x}, computed {crc:08x}",
                    h.header_crc32c.get()
                ),
            ));
        }
        if h.version.get() != VERSION {
            return Err(err(
                TABLE_OFFSET + 8,
                format!(
                    "unsupported table version {} (this kiln reads {VERSION})",
                    h.version.get()
                ),
            ));
        }
        let hlen = h.header_len.get() as usize;
        let blen = h.body_len.get() as usize;
        if hlen < HEADER_LEN || hlen.saturating_add(blen) > TABLE_MAX {
            return Err(err(
                TABLE_OFFSET + 12,
                format!("header ({hlen}) + body ({blen}) exceed the {TABLE_MAX}-byte table area"),
            ));
        }
        let Some(body) = area.get(hlen..hlen + blen) else {
            return Err(err(
                TABLE_OFFSET + hlen as u64,
                format!(
                    "image ends {} bytes into the {blen}-byte table body (truncated image?)",
                    area.len().saturating_sub(hlen)
                ),
            ));
        };
        let sum: [u8; 32] = Sha256::digest(body).into();
        if sum != h.body_sha256 {
            return Err(err(
                TABLE_OFFSET + hlen as u64,
                format!(
                    "body checksum mismatch: stored sha256 {}, computed {}",
                    hex::encode(h.body_sha256),
                    hex::encode(sum)
                ),
            ));
        }
        if h.encoding.get() != 0 {
            return Err(err(
                TABLE_OFFSET + 20,
                format!("unknown body encoding {}", h.encoding.get()),
            ));
        }
        let t: SlotTable = serde_json::from_slice(body).map_err(|e| {
            err(
                TABLE_OFFSET + hlen as u64,
                format!("body is not a slot table: {e}"),
            )
        })?;
        t.validate()?;
        Ok(t)
    }

    /// Checks the table against an image of `actual` bytes.
    pub fn check_image_len(&self, actual: u64, place: &str) -> Result<()> {
        if actual != self.image_len {
            return Err(Error::ImageSize {
                place: place.to_string(),
                expected: self.image_len,
                actual,
            });
        }
        Ok(())
    }

    /// Writes the table into `file` at [`TABLE_OFFSET`], zeroing the rest of the area. Refuses
    /// a table whose slots use bytes of the table area, or an image too small to hold it.
    pub fn write_into(&self, file: &File, place: &str) -> Result<()> {
        let area = TABLE_OFFSET..TABLE_OFFSET + TABLE_MAX as u64;
        for s in &self.slots {
            for r in &s.data {
                if r.offset < area.end && r.end().is_none_or(|e| e > area.start) {
                    return Err(Error::InvalidTable(format!(
                        "slot {:?}: data at offset {} overlaps the slot table area {}..{}",
                        s.name, r.offset, area.start, area.end
                    )));
                }
            }
        }
        if self.image_len < area.end {
            return Err(Error::InvalidTable(format!(
                "a {}-byte image has no room for a slot table at {}..{}",
                self.image_len, area.start, area.end
            )));
        }
        let mut buf = self.encode()?;
        buf.resize(TABLE_MAX, 0);
        file.write_all_at(&buf, TABLE_OFFSET)
            .map_err(|e| Error::io(format!("{place}: writing the slot table"), e))
    }

    /// The sidecar JSON (pretty-printed, stable field order).
    pub fn to_sidecar_json(&self) -> Result<String> {
        self.validate()?;
        let s = Sidecar {
            format: SIDECAR_FORMAT.into(),
            version: VERSION,
            table: self.clone(),
        };
        let mut j =
            serde_json::to_string_pretty(&s).map_err(|e| Error::InvalidTable(e.to_string()))?;
        j.push('\n');
        Ok(j)
    }

    /// Parses a sidecar (`place` names it in errors).
    pub fn from_sidecar_json(text: &[u8], place: &str) -> Result<Self> {
        let err = |msg: String| Error::Table {
            place: place.to_string(),
            offset: 0,
            msg,
        };
        let s: Sidecar = serde_json::from_slice(text).map_err(|e| {
            err(format!(
                "not a slot table sidecar (line {}, column {}): {e}",
                e.line(),
                e.column()
            ))
        })?;
        if s.format != SIDECAR_FORMAT {
            return Err(err(format!(
                "format is {:?}, expected {SIDECAR_FORMAT:?}",
                s.format
            )));
        }
        if s.version != VERSION {
            return Err(err(format!(
                "unsupported version {} (this kiln reads {VERSION})",
                s.version
            )));
        }
        s.table.validate()?;
        Ok(s.table)
    }
}

/// `IMAGE.slots.json` for an image path.
pub fn sidecar_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".slots.json");
    PathBuf::from(s)
}

/// Where a table was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TableSource {
    /// Inside the image at [`TABLE_OFFSET`].
    InImage,
    /// In a sidecar file.
    Sidecar(PathBuf),
}

/// Reads the in-image table of `file` (`place` names it in errors) and checks the image size.
pub fn read_table(file: &File, place: &str) -> Result<SlotTable> {
    let len = file.metadata().map_err(|e| Error::io(place, e))?.len();
    let want = (len.saturating_sub(TABLE_OFFSET)).min(TABLE_MAX as u64) as usize;
    let mut area = vec![0u8; want];
    file.read_exact_at(&mut area, TABLE_OFFSET).map_err(|e| {
        Error::io(
            format!("{place}: reading the slot table at offset {TABLE_OFFSET}"),
            e,
        )
    })?;
    let t = SlotTable::decode(&area, place)?;
    t.check_image_len(len, place)?;
    Ok(t)
}

/// Finds an image's table: `explicit` (a sidecar path) if given; else the in-image table; else,
/// only when the image has no table magic at [`TABLE_OFFSET`] (a bare filesystem image, whose
/// bytes there belong to the filesystem), `IMAGE.slots.json`. A damaged in-image table (magic
/// present, checksum or length wrong) is an error, never silently replaced by the sidecar.
pub fn find_table(
    image: &Path,
    file: &File,
    explicit: Option<&Path>,
) -> Result<(SlotTable, TableSource)> {
    let place = image.display().to_string();
    let len = file.metadata().map_err(|e| Error::io(&place, e))?.len();
    let load_sidecar = |p: &Path| -> Result<SlotTable> {
        let text = std::fs::read(p).map_err(|e| Error::io(p.display(), e))?;
        let t = SlotTable::from_sidecar_json(&text, &p.display().to_string())?;
        t.check_image_len(len, &place)?;
        Ok(t)
    };
    if let Some(p) = explicit {
        return Ok((load_sidecar(p)?, TableSource::Sidecar(p.to_path_buf())));
    }
    let mut magic = [0u8; 8];
    let avail = len.saturating_sub(TABLE_OFFSET).min(8) as usize;
    file.read_exact_at(&mut magic[..avail], TABLE_OFFSET)
        .map_err(|e| Error::io(format!("{place}: reading offset {TABLE_OFFSET}"), e))?;
    let side = sidecar_path(image);
    if magic != MAGIC && side.exists() {
        return Ok((load_sidecar(&side)?, TableSource::Sidecar(side)));
    }
    match read_table(file, &place) {
        Ok(t) => Ok((t, TableSource::InImage)),
        Err(Error::Table { offset, msg, place }) if magic != MAGIC => Err(Error::Table {
            place,
            offset,
            msg: format!("{msg}; and there is no sidecar {}", side.display()),
        }),
        Err(e) => Err(e),
    }
}

/// A human description of a table, for `kiln inspect`.
pub fn format_table(t: &SlotTable) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "slot table: {} slot(s), image {} bytes",
        t.slots.len(),
        t.image_len
    );
    for s in &t.slots {
        let _ = writeln!(
            out,
            "  slot {:?} ({}{})",
            s.name,
            s.kind(),
            if s.path.is_empty() {
                String::new()
            } else {
                format!(" {}", s.path)
            }
        );
        let _ = writeln!(
            out,
            "    capacity   {} bytes (reserved {})",
            s.capacity,
            s.reserved()
        );
        for r in &s.data {
            let _ = writeln!(
                out,
                "    data       {}..{} ({} bytes)",
                r.offset,
                r.offset.saturating_add(r.len),
                r.len
            );
        }
        let _ = writeln!(
            out,
            "    default    {} bytes, sha256 {}",
            s.default.len, s.default.sha256
        );
        match &s.meta {
            SlotMeta::Raw(m) => {
                for f in &m.size_fields {
                    let _ = writeln!(
                        out,
                        "    size field {} (u{} little-endian)",
                        f.offset,
                        u32::from(f.width) * 8
                    );
                }
            }
            SlotMeta::Ext4(m) => {
                let _ = writeln!(
                    out,
                    "    ext4       fs at {}, inode {} at {}",
                    m.fs_offset, m.inode, m.inode_offset
                );
            }
            SlotMeta::Fat(m) => {
                let _ = writeln!(out, "    fat{}      fs at {}, dirent at {}, clusters {}+{} of {} bytes, FATs at {:?}, FSInfo {:?}", m.fat_bits, m.fs_offset, m.dirent_offset, m.first_cluster, m.cluster_count, m.cluster_size, m.fat_offsets, m.fsinfo_offset);
            }
            SlotMeta::Erofs(m) => {
                let _ = writeln!(
                    out,
                    "    erofs      fs at {}, nid {} at {} ({} inode)",
                    m.fs_offset,
                    m.nid,
                    m.inode_offset,
                    if m.extended { "extended" } else { "compact" }
                );
            }
            SlotMeta::Iso9660(m) => {
                let _ = writeln!(
                    out,
                    "    iso9660    fs at {}, extent LBA {}, records at {:?}",
                    m.fs_offset, m.extent_lba, m.record_offsets
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn raw_table(image_len: u64) -> SlotTable {
        SlotTable {
            image_len,
            slots: vec![Slot {
                name: "piece".into(),
                path: String::new(),
                capacity: 10_000,
                data: vec![ByteRange {
                    offset: 40_960,
                    len: 12_288,
                }],
                meta: SlotMeta::Raw(RawMeta {
                    size_fields: vec![SizeField {
                        offset: 40_952,
                        width: 4,
                    }],
                }),
                default: PayloadInfo::of(b""),
            }],
        }
    }

    #[test]
    fn encode_decode_roundtrip_and_sidecar() {
        let t = raw_table(65_536);
        let enc = t.encode().unwrap();
        assert_eq!(&enc[..8], b"KILNSLOT");
        assert_eq!(SlotTable::decode(&enc, "x").unwrap(), t);
        let j = t.to_sidecar_json().unwrap();
        assert!(j.contains("\"kind\": \"raw\""), "{j}");
        assert_eq!(
            SlotTable::from_sidecar_json(j.as_bytes(), "x.json").unwrap(),
            t
        );
        assert!(format_table(&t).contains("size field 40952 (u32 little-endian)"));
    }

    #[test]
    fn corrupt_and_truncated_tables_name_the_offset() {
        let enc = raw_table(65_536).encode().unwrap();
        let mut flipped = enc.clone();
        *flipped.last_mut().unwrap() ^= 1;
        let mut bad_len = enc.clone();
        bad_len[16] ^= 0x10;
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (enc[..30].to_vec(), "offset 24576"),
            (enc[..enc.len() - 1].to_vec(), "truncated image"),
            (flipped, "body checksum mismatch"),
            (bad_len, "header checksum mismatch"),
            (vec![0u8; 64], "expected magic"),
        ];
        for (bytes, want) in cases {
            let e = SlotTable::decode(&bytes, "img").unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("img"), "{e} !~ {want}");
        }
    }

    #[test]
    fn invalid_tables_are_refused() {
        let mut cases = Vec::new();
        let mut t = raw_table(65_536);
        t.slots[0].capacity = 20_000;
        cases.push((t, "exceeds the 12288 bytes"));
        let mut t = raw_table(65_536);
        t.slots[0].data[0].offset = 60_000;
        cases.push((t, "runs past the end"));
        let mut t = raw_table(65_536);
        t.slots.push(t.slots[0].clone());
        cases.push((t, "name used twice"));
        let mut t = raw_table(65_536);
        if let SlotMeta::Raw(m) = &mut t.slots[0].meta {
            m.size_fields[0].width = 1;
        }
        cases.push((t, "cannot hold the capacity"));
        let mut t = raw_table(65_536);
        if let SlotMeta::Raw(m) = &mut t.slots[0].meta {
            m.size_fields[0].offset = 40_960;
        }
        cases.push((t, "overlap"));
        let mut t = raw_table(65_536);
        t.slots[0].name = "../x".into();
        cases.push((t, "name must be"));
        for (t, want) in cases {
            let e = t.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e} !~ {want}");
        }
    }
}
