//! The ISO 9660 writer: [`IsoPlan::new`] decides every sector and builds all metadata (it is
//! small: a few hundred bytes per entry); [`IsoPlan::write`] emits it and copies file data.
//! The plan answers "how big", "where is each file" and "where are the slots" before anything
//! is written, so a caller can write a large file (an EROFS root image, the ESP) directly at
//! its extent instead of through a temporary copy.

use std::collections::VecDeque;
use std::fmt;

use rayon::prelude::*;
use zerocopy::{FromZeros, IntoBytes};

use super::layout::*;
use super::names::{self, Mangler};
use super::rock_ridge::{self as rr, Packed, CE_LEN};
use super::slot::SlotLocation;
use super::time::{days_from_civil, long_date, long_date_uuid};
use super::{IsoError, ReadAt};
use crate::fstree::{Contents, DataRef, FileData, NodeId, NodeKind, Tree, ROOT};
use crate::gpt::{self, Gpt, Partition};
use crate::repart::{self, Uuid};
use crate::sink::Sink;

/// GPT type of the partition covering the ISO 9660 data: Microsoft basic data, as xorriso
/// marks it. Written mixed-endian by the GPT writer like every other GUID.
pub const TYPE_BASIC_DATA: Uuid = uuid::uuid!("ebd0a0a2-b9e5-4433-87c0-68b6b72699c7");

/// First 512-byte LBA a hybrid GPT lets partitions use: 64 = byte 32768, the end of the system
/// area. This keeps the slot table (bytes 24576..32768) outside the usable area.
pub const HYBRID_FIRST_USABLE_LBA: u64 = 64;

/// Bytes of file data per copy job (jobs run in parallel).
const COPY_CHUNK: u64 = 4 << 20;
/// Bytes per read/write call when copying through a buffer (keeps peak memory small).
const BUF_CHUNK: u64 = 1 << 20;

/// The volume "UUID": the sixteen digits of the volume modification date
/// (`YYYYMMDDHHMMSScc`), shown by blkid/GRUB as `YYYY-MM-DD-HH-MM-SS-cc`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct VolumeUuid(pub [u8; 16]);

impl VolumeUuid {
    /// A date derived from `seed`: HMAC-SHA256(seed, "iso9660-volume-uuid") mapped onto the
    /// hundredths of a second between 2000-01-01 and 2099-12-31, so the identifier is a valid
    /// date (tools parse it) and differs between images built from different seeds (2^38
    /// values).
    pub fn from_seed(seed: &Uuid) -> Self {
        let h = repart::hmac_sha256(seed.as_bytes(), &[b"iso9660-volume-uuid"]);
        let v = u64::from_le_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]);
        let start = days_from_civil(2000, 1, 1) * 86_400;
        let span = (days_from_civil(2100, 1, 1) * 86_400 - start) as u64 * 100;
        let cs = v % span;
        let d = long_date(start + (cs / 100) as i64, (cs % 100) as u32);
        VolumeUuid(d.digits)
    }

    /// The date of a timestamp (what xorriso does when given no explicit UUID).
    pub fn from_timestamp(sec: i64) -> Self {
        VolumeUuid(long_date(sec, 0).digits)
    }

    /// Parses `YYYY-MM-DD-HH-MM-SS-cc` or sixteen digits.
    pub fn parse(s: &str) -> Option<Self> {
        let digits: Vec<u8> = s.bytes().filter(|&b| b != b'-').collect();
        if digits.len() != 16 || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let mut d = [0u8; 16];
        d.copy_from_slice(&digits);
        Some(VolumeUuid(d))
    }

    fn long_date(&self) -> LongDate {
        LongDate {
            digits: self.0,
            gmt_offset: 0,
        }
    }
}

impl fmt::Display for VolumeUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&long_date_uuid(&self.long_date()))
    }
}

impl fmt::Debug for VolumeUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VolumeUuid({self})")
    }
}

/// The GPT of a hybrid image (a protective MBR and GPT in the system area, backup GPT at the
/// end): partition 1 covers the ISO 9660 data from byte 32768, partition 2 the ESP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HybridOptions {
    /// Disk GUID.
    pub disk_guid: Uuid,
    /// Unique GUID of the ISO data partition.
    pub data_part_guid: Uuid,
    /// Unique GUID of the ESP partition.
    pub esp_part_guid: Uuid,
}

impl HybridOptions {
    /// GUIDs derived from an image seed as systemd-repart derives them (SPECS.md): disk GUID
    /// `derive_uuid(seed, "disk-uuid")`, each partition's from its type GUID with k = 0.
    pub fn from_seed(seed: &Uuid) -> Self {
        Self {
            disk_guid: repart::disk_uuid(seed),
            data_part_guid: repart::partition_uuid(seed, &TYPE_BASIC_DATA, 0),
            esp_part_guid: repart::partition_uuid(seed, &gpt::TYPE_ESP, 0),
        }
    }
}

/// What to build.
#[derive(Clone, Debug)]
pub struct IsoOptions {
    /// Volume identifier, the label blkid reports (1..=32 printable ASCII characters).
    pub volume_id: String,
    /// Application identifier (at most 128 printable ASCII characters).
    pub application_id: String,
    /// Publisher identifier (at most 128 printable ASCII characters).
    pub publisher_id: String,
    /// Volume creation and effective date, Unix seconds (`SOURCE_DATE_EPOCH`).
    pub timestamp: i64,
    /// Volume modification date, reported as the volume UUID.
    pub uuid: VolumeUuid,
    /// Also write a Joliet tree.
    pub joliet: bool,
    /// Length in bytes of the FAT ESP image to place after the ISO data and boot through
    /// El Torito (platform 0xEF, no emulation). `None`: no El Torito.
    pub esp_len: Option<u64>,
    /// Write a protective MBR and GPT (hybrid image for USB sticks).
    pub hybrid: Option<HybridOptions>,
    /// Place the directories (and their Rock Ridge continuation areas) and then the slot files
    /// after all other file data, so that everything injecting into a slot rewrites — the
    /// extent and the directory records pointing at it — sits near the end of the ISO 9660
    /// data. `kiln serve` then hashes only that tail for a personalised image's sha256.
    /// ECMA-119 puts no order on extents; readers find everything through the descriptors.
    pub slots_last: bool,
}

impl IsoOptions {
    /// Options with a label, a timestamp and a seed; Joliet on, no ESP, no GPT.
    pub fn new(volume_id: &str, timestamp: i64, seed: &Uuid) -> Self {
        Self {
            volume_id: volume_id.to_string(),
            application_id: "KILN".to_string(),
            publisher_id: String::new(),
            timestamp,
            uuid: VolumeUuid::from_seed(seed),
            joliet: true,
            esp_len: None,
            hybrid: None,
            slots_last: false,
        }
    }
}

/// One directory entry of the input tree, with its identifiers.
struct Item {
    name: Box<[u8]>,
    node: NodeId,
    iso_id: Vec<u8>,
    joliet_id: Option<Vec<u16>>,
}

/// Placement of one directory record inside its directory's extent.
#[derive(Default)]
struct RecordPos {
    /// Byte offset within the directory extent.
    offset: u32,
    /// Record length.
    len: u8,
    /// Rock Ridge entries and continuation areas.
    susp: Packed,
    /// (LBA, byte offset) of each continuation area.
    areas: Vec<(u32, u32)>,
}

struct Dir {
    node: NodeId,
    /// Identifier in the parent (ISO 9660 and Joliet); the root's are `[0]`.
    iso_id: Vec<u8>,
    joliet_id: Vec<u16>,
    /// Index (ISO path table order) of the parent; the root is its own parent.
    parent: usize,
    path: Vec<u8>,
    items: Vec<Item>,
    /// `items` indices in ECMA-119 §9.3 order.
    iso_order: Vec<usize>,
    /// Indices of the items Joliet lists, in order.
    joliet_order: Vec<usize>,
    /// ".", "..", then `iso_order`.
    records: Vec<RecordPos>,
    /// Byte offsets of ".", "..", then `joliet_order` records.
    joliet_records: Vec<u32>,
    lba: u32,
    size: u32,
    joliet_lba: u32,
    joliet_size: u32,
}

/// Where a regular file's bytes go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileExtent {
    /// The node.
    pub node: NodeId,
    /// First sector.
    pub lba: u32,
    /// Sectors reserved (a slot reserves its capacity).
    pub sectors: u32,
    /// Current file size in bytes.
    pub size: u32,
}

impl FileExtent {
    /// Byte offset of the data in the image.
    pub fn offset(&self) -> u64 {
        u64::from(self.lba) * SECTOR
    }
}

/// A complete layout: every sector decided and all metadata built.
pub struct IsoPlan {
    opts: IsoOptions,
    total_sectors: u32,
    /// (byte offset, bytes) of all metadata, ascending.
    meta: Vec<(u64, Vec<u8>)>,
    files: Vec<FileExtent>,
    /// Per node: index into `files`.
    file_index: Vec<Option<u32>>,
    slots: Vec<SlotLocation>,
    data_end: u32,
    esp: Option<(u32, u64)>,
    gpt: Option<Gpt>,
}

fn path_of(dir: &[u8], name: &[u8]) -> String {
    let mut p = dir.to_vec();
    p.push(b'/');
    p.extend_from_slice(name);
    String::from_utf8_lossy(&p).into_owned()
}

fn check_text(what: &'static str, s: &str, max: usize, allow_empty: bool) -> Result<(), IsoError> {
    let bad = |msg: String| IsoError::BadOption { what, msg };
    if s.is_empty() && !allow_empty {
        return Err(bad("must not be empty".into()));
    }
    if s.len() > max {
        return Err(bad(format!(
            "{s:?} is {} characters, at most {max} fit",
            s.len()
        )));
    }
    if let Some(c) = s.chars().find(|c| !(' '..='~').contains(c)) {
        return Err(bad(format!(
            "{s:?} contains {c:?}; only printable ASCII is allowed"
        )));
    }
    Ok(())
}

/// `s` space-padded into `N` bytes.
fn padded<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [b' '; N];
    let b = s.as_bytes();
    let n = b.len().min(N);
    out[..n].copy_from_slice(&b[..n]);
    out
}

/// `s` as UCS-2 big-endian, space-padded into `N` bytes (a trailing odd byte stays 0x00).
fn padded_ucs2<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0u8; N];
    for (i, chunk) in out.chunks_exact_mut(2).enumerate() {
        let c = s.chars().nth(i).map_or(0x20u16, |c| c as u16);
        chunk.copy_from_slice(&c.to_be_bytes());
    }
    out
}

fn sectors_for(bytes: u64) -> u64 {
    bytes.div_ceil(SECTOR)
}

/// Room for System Use entries in a record whose identifier is `name_len` bytes, keeping the
/// record length even and at most 255.
fn su_room(name_len: usize) -> usize {
    MAX_RECORD_LEN - 1 - (33 + name_len + name_pad(name_len))
}

/// Lays records of the given lengths into sectors (a record never crosses a sector boundary,
/// ECMA-119 §6.8.1.1); returns each offset and the extent size in bytes.
fn lay_records(
    lens: impl Iterator<Item = usize>,
    path: &[u8],
) -> Result<(Vec<u32>, u32), IsoError> {
    let mut offs = Vec::new();
    let mut pos: u64 = 0;
    for len in lens {
        let len = len as u64;
        if pos % SECTOR + len > SECTOR {
            pos = pos.div_ceil(SECTOR) * SECTOR;
        }
        offs.push(pos as u32);
        pos += len;
    }
    let size = sectors_for(pos).max(1) * SECTOR;
    let size = u32::try_from(size).map_err(|_| IsoError::FileTooLarge {
        path: format!("{} (directory)", String::from_utf8_lossy(path)),
        size,
    })?;
    Ok((offs, size))
}

impl IsoPlan {
    /// Plans an image of `tree` with `opts`.
    pub fn new(tree: &Tree, opts: &IsoOptions) -> Result<IsoPlan, IsoError> {
        check_text("volume id", &opts.volume_id, 32, false)?;
        check_text("application id", &opts.application_id, 128, true)?;
        check_text("publisher id", &opts.publisher_id, 128, true)?;
        if opts.esp_len == Some(0) {
            return Err(IsoError::BadOption {
                what: "ESP image",
                msg: "is empty".into(),
            });
        }

        let mut dirs = collect_dirs(tree, opts.joliet)?;
        if dirs.len() > 65535 {
            return Err(IsoError::TooManyDirectories { count: dirs.len() });
        }
        let mut dir_of: Vec<Option<usize>> = vec![None; tree.nodes.len()];
        for (i, d) in dirs.iter().enumerate() {
            dir_of[d.node as usize] = Some(i);
        }
        let links = tree.link_counts();

        // Rock Ridge entries and record sizes of every ISO 9660 directory.
        for i in 0..dirs.len() {
            let parent = dirs[i].parent;
            let mut recs = Vec::with_capacity(dirs[i].items.len() + 2);
            // "." and "..": identifiers 0x00 and 0x01.
            for (which, target) in [(0usize, i), (1, parent)] {
                let n = tree.node(dirs[target].node);
                let mut e = Vec::new();
                if which == 0 && i == 0 {
                    e.push(rr::sp());
                }
                e.push(rr::px(
                    n.mode(),
                    2 + tree.subdir_count(dirs[target].node),
                    n.meta.uid,
                    n.meta.gid,
                ));
                e.push(rr::tf(n.meta.mtime.sec));
                if which == 0 && i == 0 {
                    e.push(rr::er());
                }
                recs.push(record_pos(1, e));
            }
            for &k in &dirs[i].iso_order {
                let item = &dirs[i].items[k];
                let n = tree.node(item.node);
                let nlink = if n.is_dir() {
                    2 + tree.subdir_count(item.node)
                } else {
                    links[item.node as usize]
                };
                let mut e = vec![
                    rr::px(n.mode(), nlink, n.meta.uid, n.meta.gid),
                    rr::tf(n.meta.mtime.sec),
                ];
                match &n.kind {
                    NodeKind::CharDev { major, minor } | NodeKind::BlockDev { major, minor } => {
                        e.push(rr::pn(*major, *minor))
                    }
                    _ => {}
                }
                e.extend(rr::nm(&item.name));
                if let NodeKind::Symlink(t) = &n.kind {
                    e.extend(rr::sl(t));
                }
                recs.push(record_pos(item.iso_id.len(), e));
            }
            let (offs, size) = lay_records(recs.iter().map(|r| usize::from(r.len)), &dirs[i].path)?;
            for (r, o) in recs.iter_mut().zip(offs) {
                r.offset = o;
            }
            dirs[i].records = recs;
            dirs[i].size = size;
            if opts.joliet {
                let lens = [34usize, 34].into_iter().chain(
                    dirs[i]
                        .joliet_order
                        .iter()
                        .map(|&k| joliet_record_len(&dirs[i].items[k])),
                );
                let (offs, size) = lay_records(lens, &dirs[i].path)?;
                dirs[i].joliet_records = offs;
                dirs[i].joliet_size = size;
            }
        }
        let joliet_pt_order = if opts.joliet {
            joliet_order(&dirs, &dir_of, tree)
        } else {
            Vec::new()
        };

        // Sector allocation.
        let mut lba: u64 = u64::from(SYSTEM_AREA_SECTORS);
        let pvd_lba = lba;
        lba += 1;
        let br_lba = opts.esp_len.map(|_| {
            lba += 1;
            lba - 1
        });
        let svd_lba = opts.joliet.then(|| {
            lba += 1;
            lba - 1
        });
        let term_lba = lba;
        lba += 1;
        let catalog_lba = opts.esp_len.map(|_| {
            lba += 1;
            lba - 1
        });
        let iso_pt = path_table(&dirs, &(0..dirs.len()).collect::<Vec<_>>(), false);
        let iso_pt_l = lba;
        lba += sectors_for(iso_pt.len() as u64);
        let iso_pt_m = lba;
        lba += sectors_for(iso_pt.len() as u64);
        let (j_pt_l, j_pt_m) = if opts.joliet {
            let len = sectors_for(path_table(&dirs, &joliet_pt_order, true).len() as u64);
            let l = lba;
            lba += len;
            let m = lba;
            lba += len;
            (l, m)
        } else {
            (0, 0)
        };
        // Directories (ISO 9660, then Joliet) and the continuation areas: first, or after the
        // other files' data with `slots_last`.
        let alloc_dirs = |dirs: &mut Vec<Dir>, lba: &mut u64| {
            for d in dirs.iter_mut() {
                d.lba = *lba as u32;
                *lba += u64::from(d.size) / SECTOR;
            }
            if opts.joliet {
                for &i in &joliet_pt_order {
                    dirs[i].joliet_lba = *lba as u32;
                    *lba += u64::from(dirs[i].joliet_size) / SECTOR;
                }
            }
            // Continuation areas, packed; an area never crosses a sector.
            let ce_start = *lba;
            let mut ce_pos: u64 = 0;
            for d in dirs.iter_mut() {
                for r in d.records.iter_mut() {
                    for a in 0..r.susp.areas.len() {
                        let len = r.susp.area_len(a) as u64;
                        if ce_pos % SECTOR + len > SECTOR {
                            ce_pos = ce_pos.div_ceil(SECTOR) * SECTOR;
                        }
                        let abs = ce_start * SECTOR + ce_pos;
                        r.areas.push(((abs / SECTOR) as u32, (abs % SECTOR) as u32));
                        ce_pos += len;
                    }
                }
            }
            *lba += sectors_for(ce_pos);
        };
        if !opts.slots_last {
            alloc_dirs(&mut dirs, &mut lba);
        }

        // Files in canonical tree order; hardlinks share one extent.
        let mut paths: Vec<Option<String>> = vec![None; tree.nodes.len()];
        tree.walk_paths(|p, id| paths[id as usize] = Some(String::from_utf8_lossy(p).into_owned()));
        let path = |id: NodeId| paths[id as usize].clone().unwrap_or_default();
        let walk = tree.walk();
        let needs_empty = walk.iter().any(|&id| match &tree.node(id).kind {
            NodeKind::File(f) => f.size == 0 && tree.node(id).slot.is_none(),
            NodeKind::Dir(_) => false,
            _ => true,
        });
        let empty_lba = if needs_empty {
            lba += 1;
            (lba - 1) as u32
        } else {
            0
        };
        let mut files: Vec<FileExtent> = Vec::new();
        let mut file_index: Vec<Option<u32>> = vec![None; tree.nodes.len()];
        // Sectors each file reserves, in walk order; extents are given out below.
        let mut reserves: Vec<u64> = Vec::new();
        for &id in &walk {
            let n = tree.node(id);
            let NodeKind::File(f) = &n.kind else {
                if let Some(s) = &n.slot {
                    return Err(IsoError::BadSlot {
                        path: path(id),
                        name: s.name.clone(),
                        msg: format!("a slot must be a regular file, this is a {}", n.kind.name()),
                    });
                }
                continue;
            };
            if f.size > u64::from(u32::MAX) {
                return Err(IsoError::FileTooLarge {
                    path: path(id),
                    size: f.size,
                });
            }
            let reserve = match &n.slot {
                Some(s) => {
                    if s.capacity > u64::from(u32::MAX) {
                        return Err(IsoError::BadSlot {
                            path: path(id),
                            name: s.name.clone(),
                            msg: format!(
                                "capacity of {} bytes exceeds the 4 GiB - 1 an ISO 9660 file can hold",
                                s.capacity
                            ),
                        });
                    }
                    if f.size > s.capacity {
                        return Err(IsoError::BadSlot {
                            path: path(id),
                            name: s.name.clone(),
                            msg: format!(
                                "initial content of {} bytes exceeds the capacity of {} bytes",
                                f.size, s.capacity
                            ),
                        });
                    }
                    // At least one sector, so the slot owns an extent even when empty.
                    sectors_for(s.capacity).max(1)
                }
                None => sectors_for(f.size),
            };
            file_index[id as usize] = Some(files.len() as u32);
            reserves.push(reserve);
            files.push(FileExtent {
                node: id,
                lba: empty_lba,
                sectors: reserve as u32,
                size: f.size as u32,
            });
        }
        // Extents in walk order; with `slots_last`, the other files, the directories, then
        // the slot files.
        let is_slot = |f: &FileExtent| tree.node(f.node).slot.is_some();
        for pass in [false, true] {
            if pass && opts.slots_last {
                alloc_dirs(&mut dirs, &mut lba);
            }
            for (f, &reserve) in files.iter_mut().zip(&reserves) {
                if (opts.slots_last && is_slot(f) != pass) || (!opts.slots_last && pass) {
                    continue;
                }
                if reserve > 0 {
                    f.lba = lba as u32;
                    lba += reserve;
                }
            }
        }
        let data_end = lba;
        let esp = match opts.esp_len {
            Some(len) => {
                let at = lba;
                lba += sectors_for(len);
                Some((at as u32, len))
            }
            None => None,
        };
        // The backup GPT needs 33 sectors of 512 bytes at the very end.
        if opts.hybrid.is_some() {
            lba += sectors_for(gpt::TAIL_SECTORS * gpt::SECTOR);
        }
        if lba > u64::from(u32::MAX) {
            return Err(IsoError::TooLarge { sectors: lba });
        }
        let total_sectors = lba as u32;

        // ---- Emit metadata. ----
        let mut meta: Vec<(u64, Vec<u8>)> = Vec::new();
        let extent_of = |id: NodeId| -> (u32, u32) {
            match file_index[id as usize] {
                Some(i) => {
                    let f = &files[i as usize];
                    (f.lba, f.size)
                }
                None => (empty_lba, 0),
            }
        };
        let mut slot_records: Vec<Vec<u64>> = vec![Vec::new(); files.len()];

        // ISO 9660 directories and their continuation areas.
        for i in 0..dirs.len() {
            let d = &dirs[i];
            let mut buf = vec![0u8; d.size as usize];
            for (r, rec) in d.records.iter().enumerate() {
                let (name, lba, size, flags, mtime): (&[u8], u32, u32, u8, i64) = match r {
                    0 => (
                        &[0],
                        d.lba,
                        d.size,
                        FLAG_DIRECTORY,
                        tree.node(d.node).meta.mtime.sec,
                    ),
                    1 => {
                        let p = &dirs[d.parent];
                        (
                            &[1],
                            p.lba,
                            p.size,
                            FLAG_DIRECTORY,
                            tree.node(p.node).meta.mtime.sec,
                        )
                    }
                    _ => {
                        let item = &d.items[d.iso_order[r - 2]];
                        let n = tree.node(item.node);
                        let (lba, size, flags) = match dir_of[item.node as usize] {
                            Some(c) if n.is_dir() => (dirs[c].lba, dirs[c].size, FLAG_DIRECTORY),
                            _ => {
                                let (l, s) = extent_of(item.node);
                                (l, s, 0)
                            }
                        };
                        (&item.iso_id, lba, size, flags, n.meta.mtime.sec)
                    }
                };
                let mut su = rec.susp.inline.clone();
                if let Some(&(blk, off)) = rec.areas.first() {
                    su.extend(rr::ce(blk, off, rec.susp.area_len(0) as u32));
                }
                let at = rec.offset as usize;
                write_record(
                    &mut buf[at..at + usize::from(rec.len)],
                    name,
                    lba,
                    size,
                    flags,
                    mtime,
                    &su,
                );
                if r >= 2 {
                    let item = &d.items[d.iso_order[r - 2]];
                    if let Some(fi) = file_index[item.node as usize] {
                        if tree.node(item.node).slot.is_some() {
                            slot_records[fi as usize]
                                .push(u64::from(d.lba) * SECTOR + u64::from(rec.offset));
                        }
                    }
                }
                // Continuation areas of this record.
                for a in 0..rec.susp.areas.len() {
                    let mut bytes = rec.susp.areas[a].clone();
                    if let Some(&(blk, off)) = rec.areas.get(a + 1) {
                        bytes.extend(rr::ce(blk, off, rec.susp.area_len(a + 1) as u32));
                    }
                    debug_assert_eq!(bytes.len(), rec.susp.area_len(a));
                    let (blk, off) = rec.areas[a];
                    meta.push((u64::from(blk) * SECTOR + u64::from(off), bytes));
                }
            }
            meta.push((u64::from(d.lba) * SECTOR, buf));
        }

        // Joliet directories.
        if opts.joliet {
            for &i in &joliet_pt_order {
                let d = &dirs[i];
                let mut buf = vec![0u8; d.joliet_size as usize];
                let p = &dirs[d.parent];
                struct JRec {
                    name: Vec<u8>,
                    lba: u32,
                    size: u32,
                    flags: u8,
                    mtime: i64,
                    node: Option<NodeId>,
                }
                let dot = |name: u8, d: &Dir| JRec {
                    name: vec![name],
                    lba: d.joliet_lba,
                    size: d.joliet_size,
                    flags: FLAG_DIRECTORY,
                    mtime: tree.node(d.node).meta.mtime.sec,
                    node: None,
                };
                let mut recs = vec![dot(0, d), dot(1, p)];
                for &k in &d.joliet_order {
                    let item = &d.items[k];
                    let n = tree.node(item.node);
                    let (lba, size, flags) = match dir_of[item.node as usize] {
                        Some(c) if n.is_dir() => {
                            (dirs[c].joliet_lba, dirs[c].joliet_size, FLAG_DIRECTORY)
                        }
                        _ => {
                            let (l, s) = extent_of(item.node);
                            (l, s, 0)
                        }
                    };
                    recs.push(JRec {
                        name: names::ucs2_be(item.joliet_id.as_deref().unwrap_or_default()),
                        lba,
                        size,
                        flags,
                        mtime: n.meta.mtime.sec,
                        node: Some(item.node),
                    });
                }
                for (r, &off) in recs.iter().zip(&d.joliet_records) {
                    let len = 33 + r.name.len() + name_pad(r.name.len());
                    let at = off as usize;
                    write_record(
                        &mut buf[at..at + len],
                        &r.name,
                        r.lba,
                        r.size,
                        r.flags,
                        r.mtime,
                        &[],
                    );
                    if let Some(node) = r.node {
                        if let Some(fi) = file_index[node as usize] {
                            if tree.node(node).slot.is_some() {
                                slot_records[fi as usize]
                                    .push(u64::from(d.joliet_lba) * SECTOR + u64::from(off));
                            }
                        }
                    }
                }
                meta.push((u64::from(d.joliet_lba) * SECTOR, buf));
            }
        }

        // Path tables.
        let order: Vec<usize> = (0..dirs.len()).collect();
        meta.push((iso_pt_l * SECTOR, path_table(&dirs, &order, false)));
        meta.push((
            iso_pt_m * SECTOR,
            path_table_bytes(&dirs, &order, false, true),
        ));
        let mut j_pt_len = 0;
        if opts.joliet {
            let l = path_table(&dirs, &joliet_pt_order, true);
            j_pt_len = l.len();
            meta.push((j_pt_l * SECTOR, l));
            meta.push((
                j_pt_m * SECTOR,
                path_table_bytes(&dirs, &joliet_pt_order, true, true),
            ));
        }

        // Volume descriptors.
        let root = &dirs[0];
        let mut pvd = VolumeDescriptor::new_zeroed();
        fill_descriptor(&mut pvd, opts, total_sectors);
        pvd.vd_type = VD_PRIMARY;
        pvd.system_id = padded("LINUX");
        pvd.volume_id = padded(&opts.volume_id);
        pvd.volume_set_id = padded(&opts.volume_id);
        pvd.publisher_id = padded(&opts.publisher_id);
        pvd.preparer_id = padded("KILN");
        pvd.application_id = padded(&opts.application_id);
        pvd.path_table_size = BothU32::new(iso_pt.len() as u32);
        pvd.l_path_table = (iso_pt_l as u32).into();
        pvd.m_path_table = (iso_pt_m as u32).into();
        pvd.root = root_record(root.lba, root.size, tree.node(root.node).meta.mtime.sec);
        meta.push((pvd_lba * SECTOR, pvd.as_bytes().to_vec()));
        if let Some(svd_lba) = svd_lba {
            let mut svd = VolumeDescriptor::new_zeroed();
            fill_descriptor(&mut svd, opts, total_sectors);
            svd.vd_type = VD_SUPPLEMENTARY;
            svd.escapes[..3].copy_from_slice(&JOLIET_ESCAPE_L3);
            svd.system_id = padded_ucs2("LINUX");
            svd.volume_id = padded_ucs2(&opts.volume_id);
            svd.volume_set_id = padded_ucs2(&opts.volume_id);
            svd.publisher_id = padded_ucs2(&opts.publisher_id);
            svd.preparer_id = padded_ucs2("KILN");
            svd.application_id = padded_ucs2(&opts.application_id);
            svd.copyright_file = padded_ucs2("");
            svd.abstract_file = padded_ucs2("");
            svd.bibliographic_file = padded_ucs2("");
            svd.path_table_size = BothU32::new(j_pt_len as u32);
            svd.l_path_table = (j_pt_l as u32).into();
            svd.m_path_table = (j_pt_m as u32).into();
            svd.root = root_record(
                root.joliet_lba,
                root.joliet_size,
                tree.node(root.node).meta.mtime.sec,
            );
            meta.push((svd_lba * SECTOR, svd.as_bytes().to_vec()));
        }
        let mut term = vec![0u8; SECTOR as usize];
        term[0] = VD_TERMINATOR;
        term[1..6].copy_from_slice(&STANDARD_ID);
        term[6] = 1;
        meta.push((term_lba * SECTOR, term));

        // El Torito.
        if let (Some(br_lba), Some(cat_lba), Some((esp_lba, esp_len))) = (br_lba, catalog_lba, esp)
        {
            let mut br = BootRecord::new_zeroed();
            br.vd_type = VD_BOOT_RECORD;
            br.id = STANDARD_ID;
            br.version = 1;
            br.boot_system_id[..EL_TORITO_ID.len()].copy_from_slice(EL_TORITO_ID);
            br.catalog_lba = (cat_lba as u32).into();
            meta.push((br_lba * SECTOR, br.as_bytes().to_vec()));
            meta.push((cat_lba * SECTOR, boot_catalog(esp_lba, esp_len)));
        }

        // Slots.
        let mut slots = Vec::new();
        for (fi, f) in files.iter().enumerate() {
            if let Some(s) = &tree.node(f.node).slot {
                slots.push(SlotLocation {
                    name: s.name.clone(),
                    extent_lba: f.lba,
                    data_offset: f.offset(),
                    capacity: s.capacity,
                    size: u64::from(f.size),
                    record_offsets: std::mem::take(&mut slot_records[fi]),
                });
            }
        }

        // Hybrid GPT.
        let gpt = match &opts.hybrid {
            Some(h) => Some(hybrid_gpt(h, total_sectors, data_end as u32, esp)?),
            None => None,
        };

        meta.sort_by_key(|(o, _)| *o);
        Ok(IsoPlan {
            opts: opts.clone(),
            total_sectors,
            meta,
            files,
            file_index,
            slots,
            data_end: data_end as u32,
            esp,
            gpt,
        })
    }

    /// Size of the whole image in bytes (a multiple of 2048).
    pub fn size(&self) -> u64 {
        u64::from(self.total_sectors) * SECTOR
    }

    /// The options the plan was made with.
    pub fn options(&self) -> &IsoOptions {
        &self.opts
    }

    /// Where a regular file's data goes, if `node` is one.
    pub fn extent(&self, node: NodeId) -> Option<&FileExtent> {
        let i = (*self.file_index.get(node as usize)?)?;
        self.files.get(i as usize)
    }

    /// Every regular file's extent, in layout order.
    pub fn extents(&self) -> &[FileExtent] {
        &self.files
    }

    /// Slots and where their size fields are.
    pub fn slots(&self) -> &[SlotLocation] {
        &self.slots
    }

    /// Byte range `[start, end)` of the ISO 9660 data (system area excluded): the hybrid GPT's
    /// data partition.
    pub fn data_range(&self) -> (u64, u64) {
        (
            HYBRID_FIRST_USABLE_LBA * gpt::SECTOR,
            u64::from(self.data_end) * SECTOR,
        )
    }

    /// Byte offset and length of the ESP image, if any.
    pub fn esp_range(&self) -> Option<(u64, u64)> {
        self.esp.map(|(lba, len)| (u64::from(lba) * SECTOR, len))
    }

    /// The hybrid GPT, if any.
    pub fn gpt(&self) -> Option<&Gpt> {
        self.gpt.as_ref()
    }

    /// The metadata regions as `(byte offset, bytes)`, ascending (for tests and dumps).
    pub fn metadata(&self) -> &[(u64, Vec<u8>)] {
        &self.meta
    }

    /// Writes the image into `sink` (a window of exactly [`IsoPlan::size`] bytes that reads as
    /// zeroes). File bytes come from `contents`; files whose data is
    /// [`DataRef::Placed`] and, when `esp` is `None`, the ESP are left for the caller to write
    /// at [`IsoPlan::extent`] / [`IsoPlan::esp_range`]. Bytes 24576..32768 are never written.
    pub fn write(
        &self,
        tree: &Tree,
        contents: &dyn Contents,
        esp: Option<&dyn ReadAt>,
        sink: &dyn Sink,
    ) -> Result<(), IsoError> {
        if sink.len() != self.size() {
            return Err(IsoError::BadOption {
                what: "output",
                msg: format!(
                    "window is {} bytes but the image is {} bytes",
                    sink.len(),
                    self.size()
                ),
            });
        }
        let io = |what: &str, offset: u64| {
            let what = what.to_string();
            move |source| IsoError::Io {
                what,
                offset,
                source,
            }
        };
        for (off, bytes) in &self.meta {
            sink.write_at(*off, bytes)
                .map_err(io("writing ISO 9660 metadata", *off))?;
        }
        if let Some(g) = &self.gpt {
            for (off, bytes) in g.regions()? {
                debug_assert!(off + bytes.len() as u64 <= 24576 || off >= 32768);
                sink.write_at(off, &bytes)
                    .map_err(io("writing the hybrid GPT", off))?;
            }
        }

        // File data: split into chunks so large files are copied on all cores too.
        let mut jobs: Vec<(&FileData, u64, u64, u64)> = Vec::new(); // (file, logical off, len, dest)
        for f in &self.files {
            let NodeKind::File(fd) = &tree.node(f.node).kind else {
                continue;
            };
            if matches!(fd.data, DataRef::Placed(_) | DataRef::Empty) {
                continue;
            }
            for run in fd.runs() {
                let mut o = run.offset;
                while o < run.offset + run.len {
                    let n = COPY_CHUNK.min(run.offset + run.len - o);
                    jobs.push((fd, o, n, f.offset() + o));
                    o += n;
                }
            }
        }
        let window = sink.file_window();
        jobs.par_iter().try_for_each_init(
            Vec::new,
            |buf: &mut Vec<u8>, &(fd, off, len, dest)| {
                // Host files into a file: let the kernel copy (no user-space pass over the
                // bytes; a reflink where the filesystem can). Fall back to read + write.
                if let (Some((out, base)), DataRef::Host(path)) = (window, &fd.data) {
                    match copy_range(path, off, out, base + dest, len) {
                        Ok(true) => return Ok(()),
                        Ok(false) => {}
                        Err(e) => return Err(io("copying file data for the extent", dest)(e)),
                    }
                }
                // Allocated on first use: kernel copies need no buffer.
                buf.resize(BUF_CHUNK as usize, 0);
                let mut done = 0;
                while done < len {
                    let n = BUF_CHUNK.min(len - done);
                    let b = &mut buf[..n as usize];
                    let at = dest + done;
                    contents
                        .read_at(fd, off + done, b)
                        .map_err(io("reading file data for the extent", at))?;
                    sink.write_at(at, b).map_err(io("writing file data", at))?;
                    done += n;
                }
                Ok(())
            },
        )?;

        if let (Some(src), Some((lba, len))) = (esp, self.esp) {
            let base = u64::from(lba) * SECTOR;
            let chunks: Vec<u64> = (0..len.div_ceil(BUF_CHUNK))
                .map(|i| i * BUF_CHUNK)
                .collect();
            chunks.par_iter().try_for_each_init(
                || vec![0u8; BUF_CHUNK as usize],
                |buf, &o| {
                    let b = &mut buf[..BUF_CHUNK.min(len - o) as usize];
                    src.read_at(o, b).map_err(io("reading the ESP image", o))?;
                    sink.write_at(base + o, b)
                        .map_err(io("writing the ESP image", base + o))
                },
            )?;
        }
        Ok(())
    }
}

/// Copies `len` bytes from `src` at `src_off` to `out` at `out_off` with copy_file_range(2).
/// `Ok(false)` when the kernel or filesystem cannot (nothing was written then; the caller
/// copies through a buffer); an error when the source ends early or I/O fails.
fn copy_range(
    src: &std::path::Path,
    src_off: u64,
    out: &std::fs::File,
    out_off: u64,
    len: u64,
) -> std::io::Result<bool> {
    let f = std::fs::File::open(src)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", src.display())))?;
    match kiln_os::copy_range(&f, src_off, out, out_off, len)? {
        kiln_os::Copied::All => {}
        kiln_os::Copied::Unsupported => return Ok(false),
        kiln_os::Copied::Short(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{}: ends before byte {}", src.display(), src_off + len),
            ))
        }
    }
    Ok(true)
}

fn record_pos(name_len: usize, entries: Vec<Vec<u8>>) -> RecordPos {
    let susp = rr::pack(entries, su_room(name_len));
    let inline = susp.inline_len();
    let mut len = 33 + name_len + name_pad(name_len) + inline;
    len += len % 2;
    debug_assert!(len <= MAX_RECORD_LEN);
    RecordPos {
        offset: 0,
        len: len as u8,
        susp,
        areas: Vec::new(),
    }
}

fn joliet_record_len(item: &Item) -> usize {
    let n = item.joliet_id.as_ref().map_or(0, |j| j.len() * 2);
    33 + n + name_pad(n)
}

/// Fills `out` (exactly the record's length) with a directory record.
fn write_record(
    out: &mut [u8],
    name: &[u8],
    lba: u32,
    size: u32,
    flags: u8,
    mtime: i64,
    su: &[u8],
) {
    let h = DirRecordHeader {
        len: out.len() as u8,
        ext_attr_len: 0,
        extent: BothU32::new(lba),
        size: BothU32::new(size),
        date: super::time::short_date(mtime),
        flags,
        unit_size: 0,
        interleave_gap: 0,
        volume_seq: BothU16::new(1),
        name_len: name.len() as u8,
    };
    out[..33].copy_from_slice(h.as_bytes());
    out[33..33 + name.len()].copy_from_slice(name);
    let su_at = 33 + name.len() + name_pad(name.len());
    out[su_at..su_at + su.len()].copy_from_slice(su);
}

fn root_record(lba: u32, size: u32, mtime: i64) -> DirRecordHeader {
    DirRecordHeader {
        len: 34,
        ext_attr_len: 0,
        extent: BothU32::new(lba),
        size: BothU32::new(size),
        date: super::time::short_date(mtime),
        flags: FLAG_DIRECTORY,
        unit_size: 0,
        interleave_gap: 0,
        volume_seq: BothU16::new(1),
        name_len: 1,
    }
}

fn fill_descriptor(vd: &mut VolumeDescriptor, opts: &IsoOptions, total: u32) {
    vd.id = STANDARD_ID;
    vd.version = 1;
    vd.volume_space_size = BothU32::new(total);
    vd.volume_set_size = BothU16::new(1);
    vd.volume_seq = BothU16::new(1);
    vd.block_size = BothU16::new(SECTOR as u16);
    vd.volume_set_id = [b' '; 128];
    vd.publisher_id = [b' '; 128];
    vd.preparer_id = [b' '; 128];
    vd.application_id = [b' '; 128];
    vd.copyright_file = [b' '; 37];
    vd.abstract_file = [b' '; 37];
    vd.bibliographic_file = [b' '; 37];
    vd.created = long_date(opts.timestamp, 0);
    vd.modified = opts.uuid.long_date();
    vd.expires = LongDate::UNSET;
    vd.effective = long_date(opts.timestamp, 0);
    vd.file_structure_version = 1;
    vd.root_name = 0;
}

/// A path table in L (little-endian) byte order.
fn path_table(dirs: &[Dir], order: &[usize], joliet: bool) -> Vec<u8> {
    path_table_bytes(dirs, order, joliet, false)
}

/// A path table (ECMA-119 §9.4) listing `order` (dir indices; position + 1 is the directory
/// number), in M (big-endian) or L byte order.
fn path_table_bytes(dirs: &[Dir], order: &[usize], joliet: bool, big: bool) -> Vec<u8> {
    let mut number = vec![0u16; dirs.len()];
    for (pos, &i) in order.iter().enumerate() {
        number[i] = (pos + 1) as u16;
    }
    let mut out = Vec::new();
    for &i in order {
        let d = &dirs[i];
        let name: Vec<u8> = if i == 0 {
            vec![0]
        } else if joliet {
            names::ucs2_be(&d.joliet_id)
        } else {
            d.iso_id.clone()
        };
        let lba = if joliet { d.joliet_lba } else { d.lba };
        let parent = number[d.parent].max(1);
        let h = PathTableHeader {
            name_len: name.len() as u8,
            ext_attr_len: 0,
            extent: if big {
                lba.to_be_bytes()
            } else {
                lba.to_le_bytes()
            },
            parent: if big {
                parent.to_be_bytes()
            } else {
                parent.to_le_bytes()
            },
        };
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(&name);
        if name.len() % 2 == 1 {
            out.push(0);
        }
    }
    out
}

/// Collects directories in ISO 9660 path table order (breadth first, children in record order)
/// with their items' identifiers.
fn collect_dirs(tree: &Tree, joliet: bool) -> Result<Vec<Dir>, IsoError> {
    let mut dirs: Vec<Dir> = vec![new_dir(ROOT, 0, Vec::new(), vec![0], vec![0])];
    let mut is_listed = vec![false; tree.nodes.len()];
    is_listed[ROOT as usize] = true;
    let mut i = 0;
    while i < dirs.len() {
        let node = dirs[i].node;
        let mut iso = Mangler::<u8>::new();
        let mut jol = Mangler::<u16>::new();
        let mut items = Vec::new();
        for e in tree.entries(node) {
            let n = tree.node(e.node);
            let is_dir = n.is_dir();
            let (s, x) = names::iso_candidate(&e.name, is_dir);
            let (s, x) =
                iso.unique(s, x, names::ISO_STEM_MAX)
                    .ok_or_else(|| IsoError::NamesExhausted {
                        path: path_of(&dirs[i].path, &e.name),
                    })?;
            let joliet_id = if joliet && matches!(n.kind, NodeKind::Dir(_) | NodeKind::File(_)) {
                let (s, x) = names::joliet_candidate(&e.name, is_dir);
                let max = names::joliet_stem_max(&x);
                let (s, x) = jol
                    .unique(s, x, max)
                    .ok_or_else(|| IsoError::NamesExhausted {
                        path: path_of(&dirs[i].path, &e.name),
                    })?;
                Some(names::joliet_identifier(&s, &x))
            } else {
                None
            };
            items.push(Item {
                name: e.name.clone(),
                node: e.node,
                iso_id: names::iso_identifier(&s, &x, is_dir),
                joliet_id,
            });
        }
        let mut iso_order: Vec<usize> = (0..items.len()).collect();
        iso_order.sort_by(|&a, &b| names::cmp_identifiers(&items[a].iso_id, &items[b].iso_id));
        let mut joliet_order: Vec<usize> = (0..items.len())
            .filter(|&k| items[k].joliet_id.is_some())
            .collect();
        joliet_order.sort_by(|&a, &b| {
            names::cmp_identifiers(
                items[a].joliet_id.as_deref().unwrap_or_default(),
                items[b].joliet_id.as_deref().unwrap_or_default(),
            )
        });
        let path = dirs[i].path.clone();
        for &k in &iso_order {
            let it = &items[k];
            if tree.node(it.node).is_dir() {
                let mut p = path.clone();
                p.push(b'/');
                p.extend_from_slice(&it.name);
                if std::mem::replace(&mut is_listed[it.node as usize], true) {
                    return Err(IsoError::DirectoryLinkedTwice {
                        path: String::from_utf8_lossy(&p).into_owned(),
                    });
                }
                let jid = it.joliet_id.clone().unwrap_or_default();
                dirs.push(new_dir(it.node, i, p, it.iso_id.clone(), jid));
            }
        }
        dirs[i].items = items;
        dirs[i].iso_order = iso_order;
        dirs[i].joliet_order = joliet_order;
        i += 1;
    }
    Ok(dirs)
}

fn new_dir(
    node: NodeId,
    parent: usize,
    path: Vec<u8>,
    iso_id: Vec<u8>,
    joliet_id: Vec<u16>,
) -> Dir {
    Dir {
        node,
        iso_id,
        joliet_id,
        parent,
        path,
        items: Vec::new(),
        iso_order: Vec::new(),
        joliet_order: Vec::new(),
        records: Vec::new(),
        joliet_records: Vec::new(),
        lba: 0,
        size: 0,
        joliet_lba: 0,
        joliet_size: 0,
    }
}

/// Directory indices in Joliet path table order (breadth first, children in Joliet order).
fn joliet_order(dirs: &[Dir], dir_of: &[Option<usize>], tree: &Tree) -> Vec<usize> {
    let mut order = Vec::with_capacity(dirs.len());
    let mut queue = VecDeque::from([0usize]);
    while let Some(i) = queue.pop_front() {
        order.push(i);
        for &k in &dirs[i].joliet_order {
            let node = dirs[i].items[k].node;
            if tree.node(node).is_dir() {
                if let Some(c) = dir_of[node as usize] {
                    queue.push_back(c);
                }
            }
        }
    }
    order
}

/// The boot catalog sector: a validation entry for platform 0xEF and one bootable
/// no-emulation default entry for the ESP image. With a single UEFI image this is the layout
/// xorriso writes for `-e` alone; firmware (EDK2's PartitionDxe) exposes every bootable entry
/// as a block device and looks for `\EFI\BOOT\BOOTX64.EFI` on its FAT filesystem.
pub(crate) fn boot_catalog(esp_lba: u32, esp_len: u64) -> Vec<u8> {
    let mut v = ValidationEntry {
        header_id: 1,
        platform: PLATFORM_EFI,
        reserved: 0.into(),
        id_string: [0; 24],
        checksum: 0.into(),
        key: [0x55, 0xAA],
    };
    let sum = v.as_bytes().chunks_exact(2).fold(0u16, |s, w| {
        s.wrapping_add(u16::from_le_bytes([w[0], w[1]]))
    });
    v.checksum = 0u16.wrapping_sub(sum).into();
    // The count is in 512-byte virtual sectors and 16 bits wide. For a larger image write 0,
    // as xorriso does: EDK2 then takes everything from the image to the end of the volume
    // space, which here includes the ESP (PartitionDxe/ElTorito.c, "SectorCount < 2").
    let count = esp_len.div_ceil(EL_TORITO_VIRTUAL_SECTOR);
    let count = u16::try_from(count).unwrap_or(0);
    let e = BootEntry {
        indicator: BOOT_INDICATOR_BOOTABLE,
        media_type: MEDIA_NO_EMULATION,
        load_segment: 0.into(),
        system_type: 0,
        unused1: 0,
        sector_count: count.into(),
        load_rba: esp_lba.into(),
        criteria_type: 0,
        criteria: [0; 19],
    };
    let mut out = vec![0u8; SECTOR as usize];
    out[..32].copy_from_slice(v.as_bytes());
    out[32..64].copy_from_slice(e.as_bytes());
    out
}

/// The hybrid GPT: partition 1 "ISO9660" from byte 32768 to the end of the ISO data
/// (read-only), partition 2 "ESP" over the ESP image, usable area starting at byte 32768.
fn hybrid_gpt(
    h: &HybridOptions,
    total_sectors: u32,
    data_end: u32,
    esp: Option<(u32, u64)>,
) -> Result<Gpt, IsoError> {
    let per = SECTOR / gpt::SECTOR;
    let mut g = Gpt::new(u64::from(total_sectors) * SECTOR, h.disk_guid)?;
    g.first_usable_lba = HYBRID_FIRST_USABLE_LBA;
    g.partitions.push(Partition {
        type_guid: TYPE_BASIC_DATA,
        part_guid: h.data_part_guid,
        first_lba: HYBRID_FIRST_USABLE_LBA,
        last_lba: u64::from(data_end) * per - 1,
        attributes: gpt::ATTR_READ_ONLY,
        name: "ISO9660".into(),
    });
    if let Some((lba, len)) = esp {
        let first = u64::from(lba) * per;
        g.partitions.push(Partition {
            type_guid: gpt::TYPE_ESP,
            part_guid: h.esp_part_guid,
            first_lba: first,
            last_lba: first + len.div_ceil(gpt::SECTOR) - 1,
            attributes: 0,
            name: "ESP".into(),
        });
    }
    g.validate()?;
    Ok(g)
}

// Keep the CE length in sync with what `pack` assumed.
const _: () = assert!(CE_LEN == 28);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use zerocopy::FromBytes;

    #[test]
    fn boot_catalog_checksum_and_counts() {
        for (len, count) in [(8u64 << 20, 16384u16), (65535 * 512, 65535), (64 << 20, 0)] {
            let c = boot_catalog(1234, len);
            let sum = c[..32].chunks_exact(2).fold(0u16, |a, w| {
                a.wrapping_add(u16::from_le_bytes([w[0], w[1]]))
            });
            assert_eq!(sum, 0);
            assert_eq!(c[1], PLATFORM_EFI);
            let e = BootEntry::read_from_bytes(&c[32..64]).unwrap();
            assert_eq!(e.indicator, BOOT_INDICATOR_BOOTABLE);
            assert_eq!(e.sector_count.get(), count, "{len}");
            assert_eq!(e.load_rba.get(), 1234);
        }
    }

    #[test]
    fn volume_uuid_from_seed_is_a_valid_date() {
        for i in 0..200u8 {
            let u = VolumeUuid::from_seed(&Uuid::from_bytes([i; 16]));
            let d = LongDate {
                digits: u.0,
                gmt_offset: 0,
            };
            let t = super::super::time::long_date_to_unix(&d).unwrap();
            assert_eq!(super::super::time::long_date(t, 0).digits[..14], u.0[..14]);
            assert!(u.0.starts_with(b"20"));
            assert_eq!(VolumeUuid::parse(&u.to_string()), Some(u));
        }
        assert_ne!(
            VolumeUuid::from_seed(&Uuid::from_bytes([1; 16])),
            VolumeUuid::from_seed(&Uuid::from_bytes([2; 16]))
        );
    }
}
