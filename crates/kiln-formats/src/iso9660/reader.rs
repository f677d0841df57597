//! Reading ISO 9660 images: volume descriptors, the El Torito catalog, and directory trees with
//! Rock Ridge or Joliet names. Every offset and length read from the image is checked against
//! the image size before use; a malformed image is an error naming the byte offset, never a
//! panic or an endless loop (directories already visited are not entered again, CE chains are
//! bounded).

use std::collections::HashSet;

use zerocopy::FromBytes;

use super::layout::*;
use super::rock_ridge::{self, RrInfo, SuspError};
use super::time::short_date_to_unix;
use super::{IsoError, ReadAt};

/// Which directory tree to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TreeKind {
    /// The ISO 9660 tree, with Rock Ridge names and attributes when present.
    Primary,
    /// The Joliet tree.
    Joliet,
}

/// The fields of a primary or supplementary volume descriptor.
#[derive(Clone, Debug)]
pub struct VolumeInfo {
    /// Sector of the descriptor.
    pub lba: u32,
    /// Descriptor type (1 primary, 2 supplementary).
    pub vd_type: u8,
    /// Joliet escape sequence, if this is a Joliet descriptor.
    pub joliet_escape: Option<[u8; 3]>,
    /// System identifier.
    pub system_id: String,
    /// Volume identifier (the label).
    pub volume_id: String,
    /// Volume set identifier.
    pub volume_set_id: String,
    /// Publisher identifier.
    pub publisher_id: String,
    /// Data preparer identifier.
    pub preparer_id: String,
    /// Application identifier.
    pub application_id: String,
    /// Volume space size in logical blocks.
    pub space_size: u32,
    /// Logical block size.
    pub block_size: u16,
    /// Path table size in bytes.
    pub path_table_size: u32,
    /// LBA of the L path table.
    pub l_path_table: u32,
    /// LBA of the M path table.
    pub m_path_table: u32,
    /// Root directory extent.
    pub root_lba: u32,
    /// Root directory size in bytes.
    pub root_size: u32,
    /// Volume creation date.
    pub created: LongDate,
    /// Volume modification date (the "UUID").
    pub modified: LongDate,
    /// Volume expiration date.
    pub expires: LongDate,
    /// Volume effective date.
    pub effective: LongDate,
}

/// One El Torito boot entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootImage {
    /// Platform id of the entry's section (`PLATFORM_*`).
    pub platform: u8,
    /// Boot indicator was 0x88.
    pub bootable: bool,
    /// Media type (0: no emulation).
    pub media_type: u8,
    /// Load segment.
    pub load_segment: u16,
    /// System type.
    pub system_type: u8,
    /// Length in 512-byte virtual sectors.
    pub sector_count: u16,
    /// First sector (2048 bytes) of the image.
    pub load_rba: u32,
}

/// An El Torito boot catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootCatalog {
    /// Sector of the catalog.
    pub lba: u32,
    /// Platform of the validation entry.
    pub platform: u8,
    /// Manufacturer id string of the validation entry.
    pub id: String,
    /// The default entry, then section entries in order.
    pub images: Vec<BootImage>,
}

/// Rock Ridge as announced by the root directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RockRidge {
    /// Bytes to skip at the start of each System Use area (SP's LEN_SKP).
    pub skip: u8,
    /// Extension identifiers from ER entries (`RRIP_1991A`, ...).
    pub extensions: Vec<String>,
}

/// One directory entry read from an image.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Path from the root, starting with `/`.
    pub path: Vec<u8>,
    /// Name: Rock Ridge NM, else the Joliet or ISO identifier without version and trailing dot.
    pub name: Vec<u8>,
    /// The raw file identifier.
    pub identifier: Vec<u8>,
    /// Absolute byte offset of the (first) directory record.
    pub record_offset: u64,
    /// First sector of the data.
    pub extent_lba: u32,
    /// Total data length in bytes (summed over the extents of a multi-extent file).
    pub size: u64,
    /// (LBA, length) of every extent, in order.
    pub extents: Vec<(u32, u32)>,
    /// Directory record flags.
    pub flags: u8,
    /// True for directories.
    pub is_dir: bool,
    /// Recording date of the record (Unix seconds).
    pub date: Option<i64>,
    /// Rock Ridge attributes (primary tree with Rock Ridge only).
    pub rr: Option<RrInfo>,
}

impl Entry {
    /// `st_mode` from Rock Ridge, or a plausible one from the record flags.
    pub fn mode(&self) -> u32 {
        match self.rr.as_ref().and_then(|r| r.px) {
            Some((mode, ..)) => mode,
            None if self.is_dir => 0o040555,
            None => 0o100444,
        }
    }

    /// Symlink target from Rock Ridge.
    pub fn symlink(&self) -> Option<&[u8]> {
        self.rr.as_ref()?.symlink.as_deref()
    }
}

/// A parsed image: descriptors, boot catalog, Rock Ridge presence. Trees are read on demand.
#[derive(Clone, Debug)]
pub struct IsoImage {
    /// Image length in bytes.
    pub len: u64,
    /// (sector, type) of every volume descriptor up to the terminator.
    pub descriptors: Vec<(u32, u8)>,
    /// The primary volume descriptor.
    pub primary: VolumeInfo,
    /// The Joliet supplementary descriptor, if any.
    pub joliet: Option<VolumeInfo>,
    /// The El Torito catalog, if a boot record points at one.
    pub boot: Option<BootCatalog>,
    /// Rock Ridge, if the root's "." record starts with SP.
    pub rock_ridge: Option<RockRidge>,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .trim_end_matches([' ', '\0'])
        .to_string()
}

fn ucs2_text(b: &[u8]) -> String {
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16_lossy(&units)
        .trim_end_matches([' ', '\0'])
        .to_string()
}

/// A Joliet identifier as UTF-8 (no trimming: spaces are part of names).
fn ucs2_name(b: &[u8]) -> String {
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16_lossy(&units)
}

struct RawRecord {
    offset: u64,
    header: DirRecordHeader,
    name: Vec<u8>,
    su: Vec<u8>,
}

impl IsoImage {
    /// Reads the descriptors of an image of `len` bytes.
    pub fn open(r: &dyn ReadAt, len: u64) -> Result<IsoImage, IsoError> {
        let mut descriptors = Vec::new();
        let mut primary: Option<VolumeInfo> = None;
        let mut joliet = None;
        let mut catalog_lba = None;
        let mut lba = u64::from(SYSTEM_AREA_SECTORS);
        let mut sector = vec![0u8; SECTOR as usize];
        loop {
            let at = lba * SECTOR;
            if at + SECTOR > len || descriptors.len() >= 64 {
                return Err(IsoError::corrupt(
                    at,
                    "no volume descriptor set terminator before the end of the image",
                ));
            }
            read(r, at, &mut sector, "volume descriptor")?;
            if sector[1..6] != STANDARD_ID {
                return Err(IsoError::corrupt(
                    at + 1,
                    format!(
                        "volume descriptor identifier is {:?}, expected \"CD001\"",
                        String::from_utf8_lossy(&sector[1..6])
                    ),
                ));
            }
            let t = sector[0];
            descriptors.push((lba as u32, t));
            match t {
                VD_TERMINATOR => break,
                VD_PRIMARY if primary.is_none() => {
                    primary = Some(volume_info(&sector, lba as u32, false)?);
                }
                VD_SUPPLEMENTARY if joliet.is_none() => {
                    let esc = [sector[88], sector[89], sector[90]];
                    if JOLIET_ESCAPES.contains(&esc) {
                        joliet = Some(volume_info(&sector, lba as u32, true)?);
                    }
                }
                VD_BOOT_RECORD => {
                    let br = BootRecord::read_from_bytes(&sector[..])
                        .map_err(|_| IsoError::corrupt(at, "short boot record"))?;
                    if br.boot_system_id.starts_with(EL_TORITO_ID) {
                        catalog_lba = Some(br.catalog_lba.get());
                    }
                }
                _ => {}
            }
            lba += 1;
        }
        let Some(primary) = primary else {
            return Err(IsoError::corrupt(
                u64::from(SYSTEM_AREA_SECTORS) * SECTOR,
                "no primary volume descriptor",
            ));
        };
        if primary.block_size != SECTOR as u16 {
            return Err(IsoError::corrupt(
                u64::from(primary.lba) * SECTOR + 128,
                format!(
                    "logical block size {} is not supported (only 2048)",
                    primary.block_size
                ),
            ));
        }
        let mut img = IsoImage {
            len,
            descriptors,
            primary,
            joliet,
            boot: None,
            rock_ridge: None,
        };
        if let Some(c) = catalog_lba {
            img.boot = Some(img.read_catalog(r, c)?);
        }
        img.rock_ridge = img.detect_rock_ridge(r)?;
        Ok(img)
    }

    /// Reads the descriptors of an image file or block device.
    pub fn open_file(f: &std::fs::File) -> Result<IsoImage, IsoError> {
        use std::io::{Seek, SeekFrom};
        // Seeking to the end also gives the size of a block device.
        let mut h = f;
        let len = h.seek(SeekFrom::End(0)).map_err(|source| IsoError::Io {
            what: "finding the image size".into(),
            offset: 0,
            source,
        })?;
        Self::open(f, len)
    }

    /// The volume UUID as blkid and GRUB show it (from the modification date).
    pub fn uuid(&self) -> String {
        super::time::long_date_uuid(&self.primary.modified)
    }

    fn check_range(&self, offset: u64, len: u64, what: &str) -> Result<(), IsoError> {
        if offset.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(IsoError::corrupt(
                offset,
                format!(
                    "{what} of {len} bytes runs past the end of the {}-byte image",
                    self.len
                ),
            ));
        }
        Ok(())
    }

    fn read_catalog(&self, r: &dyn ReadAt, lba: u32) -> Result<BootCatalog, IsoError> {
        let at = u64::from(lba) * SECTOR;
        self.check_range(at, SECTOR, "boot catalog")?;
        let mut s = vec![0u8; SECTOR as usize];
        read(r, at, &mut s, "boot catalog")?;
        let v = ValidationEntry::read_from_bytes(&s[..32])
            .map_err(|_| IsoError::corrupt(at, "short validation entry"))?;
        if v.header_id != 1 || v.key != [0x55, 0xAA] {
            return Err(IsoError::corrupt(
                at,
                format!(
                    "boot catalog validation entry has header id {} and key {:02x?}, expected 1 and [55, aa]",
                    v.header_id, v.key
                ),
            ));
        }
        let sum = s[..32].chunks_exact(2).fold(0u16, |a, w| {
            a.wrapping_add(u16::from_le_bytes([w[0], w[1]]))
        });
        if sum != 0 {
            return Err(IsoError::corrupt(
                at + 28,
                format!("boot catalog validation checksum does not sum to zero (sum {sum:#06x})"),
            ));
        }
        let entry = |pos: usize, platform: u8| -> Option<BootImage> {
            let e = BootEntry::read_from_bytes(s.get(pos..pos + 32)?).ok()?;
            Some(BootImage {
                platform,
                bootable: e.indicator == BOOT_INDICATOR_BOOTABLE,
                media_type: e.media_type,
                load_segment: e.load_segment.get(),
                system_type: e.system_type,
                sector_count: e.sector_count.get(),
                load_rba: e.load_rba.get(),
            })
        };
        let mut images = Vec::new();
        if s[32] == BOOT_INDICATOR_BOOTABLE || s[32] == 0 {
            if let Some(e) = entry(32, v.platform) {
                if s[32] != 0 || e.load_rba != 0 {
                    images.push(e);
                }
            }
        }
        let mut pos = 64;
        while pos + 32 <= s.len() {
            let ind = s[pos];
            if ind != SECTION_HEADER_MORE && ind != SECTION_HEADER_FINAL {
                break;
            }
            let h = SectionHeader::read_from_bytes(&s[pos..pos + 32])
                .map_err(|_| IsoError::corrupt(at + pos as u64, "short section header"))?;
            pos += 32;
            let mut n = h.entries.get();
            while n > 0 && pos + 32 <= s.len() {
                if s[pos] == 0x44 {
                    pos += 32; // extension entry of the previous section entry
                    continue;
                }
                if let Some(e) = entry(pos, h.platform) {
                    images.push(e);
                }
                pos += 32;
                n -= 1;
            }
            if ind == SECTION_HEADER_FINAL {
                break;
            }
        }
        Ok(BootCatalog {
            lba,
            platform: v.platform,
            id: text(&v.id_string),
            images,
        })
    }

    fn detect_rock_ridge(&self, r: &dyn ReadAt) -> Result<Option<RockRidge>, IsoError> {
        let recs = self.read_records(r, self.primary.root_lba, self.primary.root_size)?;
        let Some(dot) = recs.first() else {
            return Ok(None);
        };
        if !(dot.su.len() >= 7 && dot.su[..2] == *b"SP" && dot.su[4..6] == [0xBE, 0xEF]) {
            return Ok(None);
        }
        let skip = dot.su[6];
        let info = self.parse_su(r, dot, 0)?;
        Ok(Some(RockRidge {
            skip,
            extensions: info
                .extensions
                .iter()
                .map(|e| String::from_utf8_lossy(e).into_owned())
                .collect(),
        }))
    }

    fn parse_su(&self, r: &dyn ReadAt, rec: &RawRecord, skip: usize) -> Result<RrInfo, IsoError> {
        let su_offset = rec.offset + 33 + rec.name.len() as u64 + name_pad(rec.name.len()) as u64;
        let len = self.len;
        let mut read_area = |block: u32, off: u32, n: u32| -> Result<Vec<u8>, SuspError> {
            let at = u64::from(block) * SECTOR + u64::from(off);
            if n > 65536 || at.checked_add(u64::from(n)).is_none_or(|e| e > len) {
                return Err(SuspError {
                    offset: at,
                    msg: format!("continuation area of {n} bytes lies outside the image"),
                });
            }
            let mut b = vec![0u8; n as usize];
            r.read_at(at, &mut b).map_err(|e| SuspError {
                offset: at,
                msg: format!("reading continuation area: {e}"),
            })?;
            Ok(b)
        };
        rock_ridge::parse(&rec.su, su_offset, skip, &mut read_area)
            .map_err(|e| IsoError::corrupt(e.offset, e.msg))
    }

    /// Reads the raw records of a directory extent.
    fn read_records(
        &self,
        r: &dyn ReadAt,
        lba: u32,
        size: u32,
    ) -> Result<Vec<RawRecord>, IsoError> {
        let start = u64::from(lba) * SECTOR;
        let size = u64::from(size);
        self.check_range(start, size, "directory extent")?;
        let mut buf = vec![0u8; size as usize];
        read(r, start, &mut buf, "directory")?;
        let mut out = Vec::new();
        let mut pos = 0usize;
        while pos < buf.len() {
            let len = usize::from(buf[pos]);
            if len == 0 {
                // Records never cross a sector; the rest of this sector is padding.
                pos = (pos / SECTOR as usize + 1) * SECTOR as usize;
                continue;
            }
            let at = start + pos as u64;
            let sector_end = (pos / SECTOR as usize + 1) * SECTOR as usize;
            if len < 34 || pos + len > sector_end.min(buf.len()) {
                return Err(IsoError::corrupt(
                    at,
                    format!("directory record of {len} bytes is too short or crosses a sector"),
                ));
            }
            let rec = &buf[pos..pos + len];
            let header = DirRecordHeader::read_from_bytes(&rec[..33])
                .map_err(|_| IsoError::corrupt(at, "short directory record"))?;
            let nl = usize::from(header.name_len);
            let su_start = 33 + nl + name_pad(nl);
            if nl == 0 || su_start > len {
                return Err(IsoError::corrupt(
                    at + 32,
                    format!("identifier length {nl} does not fit a {len}-byte record"),
                ));
            }
            out.push(RawRecord {
                offset: at,
                header,
                name: rec[33..33 + nl].to_vec(),
                su: rec[su_start..].to_vec(),
            });
            pos += len;
        }
        Ok(out)
    }

    /// Lists a tree depth-first (entries of a directory in record order, each directory's
    /// contents right after it). The root itself is not listed.
    pub fn entries(&self, r: &dyn ReadAt, kind: TreeKind) -> Result<Vec<Entry>, IsoError> {
        let (root_lba, root_size) = match kind {
            TreeKind::Primary => (self.primary.root_lba, self.primary.root_size),
            TreeKind::Joliet => match &self.joliet {
                Some(j) => (j.root_lba, j.root_size),
                None => return Ok(Vec::new()),
            },
        };
        let mut out = Vec::new();
        let mut visited = HashSet::from([root_lba]);
        let root = self.dir_entries(r, kind, root_lba, root_size, &[])?;
        let mut stack: Vec<std::vec::IntoIter<Entry>> = vec![root.into_iter()];
        while let Some(top) = stack.last_mut() {
            let Some(e) = top.next() else {
                stack.pop();
                continue;
            };
            if e.is_dir {
                if !visited.insert(e.extent_lba) {
                    return Err(IsoError::corrupt(
                        e.record_offset,
                        format!(
                            "directory {} points at an extent already listed (a loop)",
                            String::from_utf8_lossy(&e.path)
                        ),
                    ));
                }
                let size = u32::try_from(e.size).unwrap_or(u32::MAX);
                let children = self.dir_entries(r, kind, e.extent_lba, size, &e.path)?;
                out.push(e);
                stack.push(children.into_iter());
            } else {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// The entries of one directory, in record order.
    fn dir_entries(
        &self,
        r: &dyn ReadAt,
        kind: TreeKind,
        lba: u32,
        size: u32,
        path: &[u8],
    ) -> Result<Vec<Entry>, IsoError> {
        let rr_skip = match (&self.rock_ridge, kind) {
            (Some(rr), TreeKind::Primary) => Some(usize::from(rr.skip)),
            _ => None,
        };
        let recs = self.read_records(r, lba, size)?;
        let mut listed: Vec<Entry> = Vec::new();
        let mut i = 0;
        while i < recs.len() {
            let rec = &recs[i];
            i += 1;
            if rec.name == [0] || rec.name == [1] {
                continue;
            }
            let rr = match rr_skip {
                Some(skip) => Some(self.parse_su(r, rec, skip)?),
                None => None,
            };
            if rr.as_ref().is_some_and(|x| x.relocated) {
                continue; // listed where its CL record is
            }
            let mut flags = rec.header.flags;
            let mut extents = vec![(rec.header.extent.get(), rec.header.size.get())];
            // Multi-extent files: following records with the same identifier.
            while flags & FLAG_MULTI_EXTENT != 0 && i < recs.len() && recs[i].name == rec.name {
                flags = recs[i].header.flags;
                extents.push((recs[i].header.extent.get(), recs[i].header.size.get()));
                i += 1;
            }
            let mut is_dir = flags & FLAG_DIRECTORY != 0;
            let mut extent_lba = extents[0].0;
            let mut size: u64 = extents.iter().map(|e| u64::from(e.1)).sum();
            if let Some(cl) = rr.as_ref().and_then(|x| x.child_link) {
                // Relocated directory: its "." record holds the size.
                let dot = self.read_records(r, cl, SECTOR as u32)?;
                let dsize = dot.first().map_or(SECTOR as u32, |d| d.header.size.get());
                is_dir = true;
                extent_lba = cl;
                size = u64::from(dsize);
                extents = vec![(cl, dsize)];
            }
            let name = match (&rr, kind) {
                (Some(RrInfo { name: Some(n), .. }), _) => n.clone(),
                (_, TreeKind::Joliet) => plain_name(ucs2_name(&rec.name).as_bytes(), is_dir),
                _ => plain_name(&rec.name, is_dir),
            };
            if name.is_empty() || name.contains(&b'/') || name == b"." || name == b".." {
                return Err(IsoError::corrupt(
                    rec.offset,
                    format!("unusable entry name {:?}", String::from_utf8_lossy(&name)),
                ));
            }
            let mut p = path.to_vec();
            p.push(b'/');
            p.extend_from_slice(&name);
            listed.push(Entry {
                path: p,
                name,
                identifier: rec.name.clone(),
                record_offset: rec.offset,
                extent_lba,
                size,
                extents,
                flags,
                is_dir,
                date: short_date_to_unix(&rec.header.date),
                rr,
            });
        }
        Ok(listed)
    }

    /// Checks the L and M path tables of a tree against its directories: both tables must
    /// list every directory breadth first (children in record order), numbered from 1 with the
    /// root as its own parent, with the same identifiers and extents the records have
    /// (ECMA-119 §9.4, §6.9). Readers such as Windows use the path tables rather than the
    /// directory records, so a mismatch matters even when Linux and libisofs read the image.
    pub fn check_path_tables(&self, r: &dyn ReadAt, kind: TreeKind) -> Result<(), IsoError> {
        let vol = match kind {
            TreeKind::Primary => &self.primary,
            TreeKind::Joliet => match &self.joliet {
                Some(j) => j,
                None => return Ok(()),
            },
        };
        let size = u64::from(vol.path_table_size);
        let mut tables = Vec::new();
        for (lba, big) in [(vol.l_path_table, false), (vol.m_path_table, true)] {
            let at = u64::from(lba) * SECTOR;
            self.check_range(at, size, "path table")?;
            let mut buf = vec![0u8; size as usize];
            read(r, at, &mut buf, "path table")?;
            let mut recs: Vec<(Vec<u8>, u32, u16)> = Vec::new();
            let mut pos = 0usize;
            while pos < buf.len() {
                let nl = usize::from(buf[pos]);
                let end = pos + 8 + nl;
                if nl == 0 || end > buf.len() {
                    return Err(IsoError::corrupt(
                        at + pos as u64,
                        format!("path table record with identifier length {nl} does not fit"),
                    ));
                }
                let e = [buf[pos + 2], buf[pos + 3], buf[pos + 4], buf[pos + 5]];
                let p = [buf[pos + 6], buf[pos + 7]];
                let (extent, parent) = if big {
                    (u32::from_be_bytes(e), u16::from_be_bytes(p))
                } else {
                    (u32::from_le_bytes(e), u16::from_le_bytes(p))
                };
                recs.push((buf[pos + 8..end].to_vec(), extent, parent));
                pos = end + nl % 2;
            }
            tables.push((at, recs));
        }
        // The directories, breadth first, as the records describe them.
        let mut want: Vec<(Vec<u8>, u32, u16)> = vec![(vec![0], vol.root_lba, 1)];
        let mut sizes = vec![vol.root_size];
        let mut i = 0;
        while i < want.len() {
            if want.len() > 65535 {
                return Err(IsoError::corrupt(
                    u64::from(vol.lba) * SECTOR,
                    "more than 65535 directories",
                ));
            }
            let (lba, size) = (want[i].1, sizes[i]);
            let recs = self.read_records(r, lba, size)?;
            for rec in recs.iter().skip(2) {
                if rec.header.flags & FLAG_DIRECTORY != 0 {
                    want.push((rec.name.clone(), rec.header.extent.get(), (i + 1) as u16));
                    sizes.push(rec.header.size.get());
                }
            }
            i += 1;
        }
        for (at, recs) in &tables {
            if recs.len() != want.len() {
                return Err(IsoError::corrupt(
                    *at,
                    format!(
                        "path table lists {} directories, the tree has {}",
                        recs.len(),
                        want.len()
                    ),
                ));
            }
            for (n, (got, exp)) in recs.iter().zip(&want).enumerate() {
                if got != exp {
                    return Err(IsoError::corrupt(
                        *at,
                        format!(
                            "path table entry {}: identifier {:?} extent {} parent {}, but the \
                             directory records say {:?} extent {} parent {}",
                            n + 1,
                            String::from_utf8_lossy(&got.0),
                            got.1,
                            got.2,
                            String::from_utf8_lossy(&exp.0),
                            exp.1,
                            exp.2
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Every directory record, in either tree, whose extent starts at `lba` (regular files
    /// only): what an injection must update.
    pub fn records_for_extent(&self, r: &dyn ReadAt, lba: u32) -> Result<Vec<u64>, IsoError> {
        let mut out = Vec::new();
        for kind in [TreeKind::Primary, TreeKind::Joliet] {
            for e in self.entries(r, kind)? {
                if !e.is_dir && e.extent_lba == lba {
                    out.push(e.record_offset);
                }
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// The entry at `path` (`/a/b`) in the primary tree.
    pub fn find(&self, r: &dyn ReadAt, path: &[u8]) -> Result<Option<Entry>, IsoError> {
        let want: Vec<u8> = {
            let mut p = Vec::new();
            for c in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
                p.push(b'/');
                p.extend_from_slice(c);
            }
            p
        };
        Ok(self
            .entries(r, TreeKind::Primary)?
            .into_iter()
            .find(|e| e.path == want))
    }

    /// Reads a file's data (all its extents).
    pub fn read_file(&self, r: &dyn ReadAt, e: &Entry) -> Result<Vec<u8>, IsoError> {
        let total = usize::try_from(e.size).map_err(|_| {
            IsoError::corrupt(e.record_offset, "file too large to read into memory")
        })?;
        let mut out = Vec::with_capacity(crate::io::capacity_hint(total as u64));
        for &(lba, len) in &e.extents {
            let at = u64::from(lba) * SECTOR;
            self.check_range(at, u64::from(len), "file extent")?;
            let start = out.len();
            out.resize(start + len as usize, 0);
            read(r, at, &mut out[start..], "file data")?;
        }
        Ok(out)
    }
}

/// A name from a plain identifier: a version (`;1`) removed, and with it the dot that
/// separates an empty extension (`NAME.;1` is `NAME`).
fn plain_name(id: &[u8], is_dir: bool) -> Vec<u8> {
    let mut n = id.to_vec();
    if !is_dir {
        if let Some(i) = n.iter().rposition(|&b| b == b';') {
            n.truncate(i);
            if n.len() > 1 && n.last() == Some(&b'.') {
                n.pop();
            }
        }
    }
    n
}

fn read(r: &dyn ReadAt, at: u64, buf: &mut [u8], what: &str) -> Result<(), IsoError> {
    r.read_at(at, buf).map_err(|source| IsoError::Io {
        what: format!("reading {what}"),
        offset: at,
        source,
    })
}

fn volume_info(s: &[u8], lba: u32, joliet: bool) -> Result<VolumeInfo, IsoError> {
    let vd = VolumeDescriptor::read_from_bytes(s)
        .map_err(|_| IsoError::corrupt(u64::from(lba) * SECTOR, "short volume descriptor"))?;
    let t = |b: &[u8]| if joliet { ucs2_text(b) } else { text(b) };
    let at = u64::from(lba) * SECTOR;
    for (name, ok, off) in [
        ("volume space size", vd.volume_space_size.consistent(), 80),
        ("logical block size", vd.block_size.consistent(), 128),
        ("path table size", vd.path_table_size.consistent(), 132),
        ("root extent", vd.root.extent.consistent(), 158),
        ("root size", vd.root.size.consistent(), 166),
    ] {
        if !ok {
            return Err(IsoError::corrupt(
                at + off,
                format!("{name}: little- and big-endian copies differ"),
            ));
        }
    }
    Ok(VolumeInfo {
        lba,
        vd_type: vd.vd_type,
        joliet_escape: joliet.then(|| [vd.escapes[0], vd.escapes[1], vd.escapes[2]]),
        system_id: t(&vd.system_id),
        volume_id: t(&vd.volume_id),
        volume_set_id: t(&vd.volume_set_id),
        publisher_id: t(&vd.publisher_id),
        preparer_id: t(&vd.preparer_id),
        application_id: t(&vd.application_id),
        space_size: vd.volume_space_size.get(),
        block_size: vd.block_size.get(),
        path_table_size: vd.path_table_size.get(),
        l_path_table: vd.l_path_table.get(),
        m_path_table: vd.m_path_table.get(),
        root_lba: vd.root.extent.get(),
        root_size: vd.root.size.get(),
        created: vd.created,
        modified: vd.modified,
        expires: vd.expires,
        effective: vd.effective,
    })
}
