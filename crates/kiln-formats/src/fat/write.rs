//! The FAT writer: plan every cluster first (directories, files, slot reservations), then emit
//! boot sector(s), FSInfo, both FATs, directories and file data through a [`Sink`].
//!
//! Allocation is one contiguous run per object in the tree's canonical order (a directory's
//! clusters, then its entries in name order, depth first), so every file is unfragmented and a
//! slot's reservation is a single run. Clusters reserved for a slot beyond its current size are
//! free in the FAT (so `fsck.fat` sees a consistent filesystem at any size) and the FSInfo
//! next-free hint points past every reservation, so a driver that allocates later starts after
//! them.

use std::collections::BTreeSet;

use zerocopy::little_endian::{U16, U32};
use zerocopy::IntoBytes;

use super::layout::*;
use super::names::{self, ShortNames};
use super::slot::SlotLocation;
use super::{io_err, FatError};
use crate::fstree::{Contents, FileData, NodeId, NodeKind, Timestamp, Tree, ROOT};
use crate::sink::Sink;

/// What to build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FatOptions {
    /// Filesystem size in bytes (the image or partition size; a multiple of 512). mkfs.fat's
    /// rules may leave a few trailing sectors unused.
    pub size: u64,
    /// Force a FAT type; `None` chooses by size as mkfs.fat does.
    pub fat_type: Option<FatType>,
    /// Volume serial number (kiln takes the first 4 bytes of a seed-derived value), stored in
    /// this byte order; tools show it as a little-endian number, so `[0x78, 0x56, 0x34, 0x12]`
    /// appears as `1234-5678`.
    pub volume_id: [u8; 4],
    /// Volume label (at most 11 ASCII characters); `None` writes `NO NAME`.
    pub label: Option<String>,
}

/// What was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FatReport {
    /// The layout used.
    pub geometry: Geometry,
    /// Every slot, in tree order.
    pub slots: Vec<SlotLocation>,
    /// Clusters allocated or reserved.
    pub clusters_used: u32,
    /// Clusters free (slot reservations beyond the current size count as free in the FAT but
    /// not here).
    pub clusters_unreserved: u32,
}

#[derive(Debug)]
enum Target {
    Label,
    Dot,
    DotDot,
    Dir {
        node: NodeId,
        path: Vec<u8>,
        /// Index of the planned directory, set once it is planned.
        idx: usize,
    },
    File {
        node: NodeId,
        path: String,
        /// Clusters holding data.
        data_clusters: u32,
    },
}

#[derive(Debug)]
struct PEnt {
    short: [u8; 11],
    long: Option<Vec<u16>>,
    attr: u8,
    /// First cluster written to the entry (0 for empty files and the root).
    first: u32,
    size: u32,
    mtime: Timestamp,
    target: Target,
}

#[derive(Debug)]
struct PDir {
    /// First cluster, 0 for the FAT12/16 fixed root.
    first: u32,
    clusters: u32,
    entries: Vec<PEnt>,
}

#[derive(Debug)]
struct PSlot {
    name: String,
    dir: usize,
    /// Index of the 8.3 entry among the directory's 32-byte slots (long-name entries counted).
    dirent_index: u32,
    first: u32,
    clusters: u32,
    capacity: u64,
    size: u32,
}

/// A planned FAT filesystem, ready to write.
#[derive(Debug)]
pub struct FatWriter<'t> {
    tree: &'t Tree,
    opts: FatOptions,
    label: [u8; 11],
    geom: Geometry,
    dirs: Vec<PDir>,
    slots: Vec<PSlot>,
    /// Next never-allocated cluster.
    next: u32,
}

fn path_str(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// Validates and pads a volume label.
fn make_label(label: &Option<String>) -> Result<[u8; 11], FatError> {
    let Some(l) = label.as_deref().filter(|l| !l.is_empty()) else {
        return Ok(*b"NO NAME    ");
    };
    let bad = |why: &str| FatError::BadOptions(format!("volume label {l:?}: {why}"));
    if l.len() > 11 {
        return Err(bad("longer than 11 characters"));
    }
    if let Some(c) = l
        .chars()
        .find(|&c| !c.is_ascii() || (c as u32) < 0x20 || "*?.,;:/\\|+=<>[]\"".contains(c))
    {
        return Err(bad(&format!("FAT labels cannot contain {c:?}")));
    }
    if l.starts_with(' ') {
        return Err(bad("cannot start with a space"));
    }
    let mut out = [b' '; 11];
    out[..l.len()].copy_from_slice(l.as_bytes());
    Ok(out)
}

impl<'t> FatWriter<'t> {
    /// Plans `tree` into a filesystem of `opts.size` bytes: names, clusters, slots. Fails on
    /// entries FAT cannot hold (symlinks, devices, bad names, files ≥ 4 GiB) naming the path,
    /// and when the tree does not fit.
    pub fn new(tree: &'t Tree, opts: FatOptions) -> Result<Self, FatError> {
        if !opts.size.is_multiple_of(u64::from(SECTOR)) {
            return Err(FatError::BadOptions(format!(
                "FAT size {} is not a multiple of 512",
                opts.size
            )));
        }
        let label = make_label(&opts.label)?;
        let geom = super::geometry(opts.size, opts.fat_type)?;
        let mut w = FatWriter {
            tree,
            opts,
            label,
            geom,
            dirs: Vec::new(),
            slots: Vec::new(),
            next: 2,
        };
        let mut seen_slots = BTreeSet::new();
        let mut seen_dirs = BTreeSet::new();
        w.plan_dir(ROOT, b"", 0, &mut seen_slots, &mut seen_dirs)?;
        let used = w.next - 2;
        if used > w.geom.cluster_count {
            return Err(w.no_space(u64::from(used)));
        }
        Ok(w)
    }

    fn no_space(&self, needed: u64) -> FatError {
        FatError::NoSpace {
            needed,
            available: u64::from(self.geom.cluster_count),
            cluster_size: self.geom.cluster_size(),
            size: self.geom.size(),
            bits: self.geom.fat_type.bits(),
        }
    }

    /// The layout chosen.
    pub fn geometry(&self) -> &Geometry {
        &self.geom
    }

    /// Clusters the tree takes (reservations included).
    pub fn clusters_used(&self) -> u32 {
        self.next - 2
    }

    fn alloc(&mut self, n: u32) -> u32 {
        if n == 0 {
            return 0;
        }
        let first = self.next;
        self.next = self.next.saturating_add(n);
        first
    }

    fn clusters_for(&self, bytes: u64) -> u32 {
        u32::try_from(bytes.div_ceil(u64::from(self.geom.cluster_size()))).unwrap_or(u32::MAX)
    }

    fn plan_dir(
        &mut self,
        node: NodeId,
        path: &[u8],
        parent_first: u32,
        seen_slots: &mut BTreeSet<NodeId>,
        seen_dirs: &mut BTreeSet<NodeId>,
    ) -> Result<usize, FatError> {
        let tree = self.tree;
        let is_root = node == ROOT;
        if !seen_dirs.insert(node) {
            return Err(FatError::Unsupported {
                path: path_str(path),
                reason: "directory reached twice (a directory hard link or a loop)".into(),
            });
        }
        let children = tree.entries(node);
        let here = if is_root {
            "/".to_string()
        } else {
            path_str(path)
        };

        // Names: validity, case-insensitive uniqueness, then short names.
        let mut upper = BTreeSet::new();
        let mut shorts = ShortNames::default();
        for e in children {
            let child_path = [path, b"/", &e.name].concat();
            let units =
                names::check_long_name(&e.name).map_err(|reason| FatError::Unsupported {
                    path: path_str(&child_path),
                    reason,
                })?;
            let folded = String::from_utf16_lossy(&units).to_uppercase();
            if !upper.insert(folded) {
                return Err(FatError::Unsupported {
                    path: path_str(&child_path),
                    reason: "another entry in this directory differs only in case, which FAT \
                             cannot tell apart"
                        .into(),
                });
            }
            shorts.reserve_exact(&e.name);
        }
        let meta = &tree.node(node).meta;
        let mut entries = Vec::with_capacity(children.len() + 2);
        if is_root {
            if &self.label != b"NO NAME    " {
                entries.push(PEnt {
                    short: self.label,
                    long: None,
                    attr: ATTR_VOLUME_ID,
                    first: 0,
                    size: 0,
                    mtime: meta.mtime,
                    target: Target::Label,
                });
            }
        } else {
            for (short, target) in [
                (*b".          ", Target::Dot),
                (*b"..         ", Target::DotDot),
            ] {
                entries.push(PEnt {
                    short,
                    long: None,
                    attr: ATTR_DIRECTORY,
                    first: 0,
                    size: 0,
                    mtime: meta.mtime,
                    target,
                });
            }
        }
        for e in children {
            let child_path = [path, b"/", &e.name].concat();
            let child = tree.node(e.node);
            let name = String::from_utf8_lossy(&e.name);
            let (short, needs_long) =
                shorts
                    .assign(&name)
                    .map_err(|reason| FatError::Unsupported {
                        path: path_str(&child_path),
                        reason,
                    })?;
            let long = needs_long.then(|| name.encode_utf16().collect());
            let (attr, target) = match &child.kind {
                NodeKind::Dir(_) => (
                    ATTR_DIRECTORY,
                    Target::Dir {
                        node: e.node,
                        path: child_path.clone(),
                        idx: usize::MAX,
                    },
                ),
                NodeKind::File(_) => {
                    let ro = if child.meta.perm & 0o222 == 0 {
                        ATTR_READ_ONLY
                    } else {
                        0
                    };
                    (
                        ATTR_ARCHIVE | ro,
                        Target::File {
                            node: e.node,
                            path: path_str(&child_path),
                            data_clusters: 0,
                        },
                    )
                }
                other => {
                    return Err(FatError::Unsupported {
                        path: path_str(&child_path),
                        reason: format!(
                            "FAT holds only directories and regular files, not a {}",
                            other.name()
                        ),
                    })
                }
            };
            entries.push(PEnt {
                short,
                long,
                attr,
                first: 0,
                size: 0,
                mtime: child.meta.mtime,
                target,
            });
        }
        let slots_used: u32 = entries
            .iter()
            .map(|e| {
                1 + e
                    .long
                    .as_ref()
                    .map_or(0, |l| l.len().div_ceil(LFN_UNITS) as u32)
            })
            .sum();
        let (first, clusters) = if is_root && self.geom.fat_type != FatType::Fat32 {
            if slots_used > self.geom.root_entries {
                return Err(FatError::Unsupported {
                    path: here,
                    reason: format!(
                        "the FAT{} root directory holds {} entries, this tree needs {slots_used} \
                         (long names take extra entries)",
                        self.geom.fat_type.bits(),
                        self.geom.root_entries
                    ),
                });
            }
            (0, 0)
        } else {
            if slots_used > MAX_DIR_ENTRIES {
                return Err(FatError::Unsupported {
                    path: here,
                    reason: format!(
                        "directory needs {slots_used} entries, FAT allows {MAX_DIR_ENTRIES}"
                    ),
                });
            }
            let n = self
                .clusters_for(u64::from(slots_used) * u64::from(DIRENT_SIZE))
                .max(1);
            (self.alloc(n), n)
        };
        let idx = self.dirs.len();
        self.dirs.push(PDir {
            first,
            clusters,
            entries: Vec::new(),
        });
        // "." points at this directory, ".." at the parent (0 when the parent is the root).
        let mut dirent_index = 0u32;
        for ent in entries.iter_mut() {
            let lfn = ent
                .long
                .as_ref()
                .map_or(0, |l| l.len().div_ceil(LFN_UNITS) as u32);
            dirent_index += lfn;
            match &mut ent.target {
                Target::Label => {}
                Target::Dot => ent.first = first,
                Target::DotDot => ent.first = parent_first,
                Target::Dir {
                    node: child,
                    path: child_path,
                    idx: sub_idx,
                } => {
                    // ".." of a top-level directory is 0 even on FAT32 (fatgen103 §6.5).
                    let parent = if is_root { 0 } else { first };
                    let sub = self.plan_dir(*child, child_path, parent, seen_slots, seen_dirs)?;
                    *sub_idx = sub;
                    ent.first = self.dirs[sub].first;
                }
                Target::File {
                    node: fnode,
                    path: fpath,
                    data_clusters,
                } => {
                    let n = tree.node(*fnode);
                    let NodeKind::File(fd) = &n.kind else {
                        continue;
                    };
                    let size = u32::try_from(fd.size).map_err(|_| FatError::Unsupported {
                        path: fpath.clone(),
                        reason: format!("{} bytes; FAT files must be smaller than 4 GiB", fd.size),
                    })?;
                    let data = self.clusters_for(fd.size);
                    let reserve = match &n.slot {
                        Some(s) => {
                            if !seen_slots.insert(*fnode) {
                                return Err(FatError::Unsupported {
                                    path: fpath.clone(),
                                    reason: format!(
                                        "slot {} is a hard link; FAT has no hard links and a \
                                         slot needs exactly one directory entry",
                                        s.name
                                    ),
                                });
                            }
                            if fd.size > s.capacity {
                                return Err(FatError::Unsupported {
                                    path: fpath.clone(),
                                    reason: format!(
                                        "slot {}: initial content of {} bytes exceeds its \
                                         capacity of {} bytes",
                                        s.name, fd.size, s.capacity
                                    ),
                                });
                            }
                            if s.capacity > u64::from(u32::MAX) {
                                return Err(FatError::Unsupported {
                                    path: fpath.clone(),
                                    reason: format!(
                                        "slot {}: capacity {} is 4 GiB or more, beyond FAT's \
                                         file size field",
                                        s.name, s.capacity
                                    ),
                                });
                            }
                            self.clusters_for(s.capacity)
                        }
                        None => data,
                    };
                    let run = self.alloc(reserve);
                    *data_clusters = data;
                    ent.size = size;
                    ent.first = if size == 0 { 0 } else { run };
                    if let Some(s) = &n.slot {
                        self.slots.push(PSlot {
                            name: s.name.clone(),
                            dir: idx,
                            dirent_index,
                            first: run,
                            clusters: reserve,
                            capacity: s.capacity,
                            size,
                        });
                    }
                }
            }
            dirent_index += 1;
        }
        self.dirs[idx].entries = entries;
        Ok(idx)
    }

    fn dir_offset(&self, d: &PDir) -> u64 {
        if d.first == 0 {
            self.geom.root_dir_offset()
        } else {
            self.geom.cluster_offset(d.first)
        }
    }

    /// The slot locations this plan will produce (also returned by [`FatWriter::write`]).
    pub fn slot_locations(&self) -> Vec<SlotLocation> {
        self.slots
            .iter()
            .map(|s| SlotLocation {
                name: s.name.clone(),
                dirent_offset: self.dir_offset(&self.dirs[s.dir])
                    + u64::from(s.dirent_index) * u64::from(DIRENT_SIZE),
                first_cluster: s.first,
                cluster_count: s.clusters,
                data_offset: self.geom.cluster_offset(s.first.max(2)),
                capacity: s.capacity,
                fat_offsets: (0..NUM_FATS).map(|i| self.geom.fat_offset(i)).collect(),
                fsinfo_offset: self.geom.fsinfo_offset(),
                cluster_size: self.geom.cluster_size(),
                fat_type: self.geom.fat_type,
                initial_size: u64::from(s.size),
            })
            .collect()
    }

    fn boot_sector(&self) -> [u8; 512] {
        let g = &self.geom;
        let fat32 = g.fat_type == FatType::Fat32;
        let mut b = [0u8; 512];
        let (t16, t32) = if g.total_sectors < 65536 {
            (g.total_sectors as u16, 0)
        } else {
            (0, g.total_sectors)
        };
        let boot_code_at: u8 = if fat32 { 90 } else { 62 };
        let bpb = Bpb {
            // JMP short to the boot code, NOP.
            jump: [0xEB, boot_code_at - 2, 0x90],
            oem_name: *b"MSWIN4.1",
            bytes_per_sector: U16::new(SECTOR as u16),
            sectors_per_cluster: g.sectors_per_cluster as u8,
            reserved_sectors: U16::new(g.reserved_sectors as u16),
            num_fats: NUM_FATS as u8,
            root_entries: U16::new(g.root_entries as u16),
            total_sectors_16: U16::new(t16),
            media: MEDIA_FIXED,
            fat_size_16: U16::new(if fat32 { 0 } else { g.fat_sectors as u16 }),
            sectors_per_track: U16::new(g.sectors_per_track),
            num_heads: U16::new(g.heads),
            hidden_sectors: U32::new(0),
            total_sectors_32: U32::new(t32),
        };
        b[..36].copy_from_slice(bpb.as_bytes());
        let ext = ExtBpb {
            drive_number: DRIVE_FIXED,
            reserved: 0,
            boot_sig: EXT_BOOT_SIG,
            volume_id: self.opts.volume_id,
            volume_label: self.label,
            fs_type: g.fat_type.fs_type(),
        };
        if fat32 {
            let b32 = Bpb32 {
                fat_size_32: U32::new(g.fat_sectors),
                ext_flags: U16::new(0),
                fs_version: U16::new(0),
                root_cluster: U32::new(self.dirs.first().map_or(2, |d| d.first)),
                fs_info: U16::new(FSINFO_SECTOR as u16),
                backup_boot: U16::new(BACKUP_BOOT_SECTOR as u16),
                reserved: [0; 12],
            };
            b[36..64].copy_from_slice(b32.as_bytes());
            b[64..90].copy_from_slice(ext.as_bytes());
        } else {
            b[36..62].copy_from_slice(ext.as_bytes());
        }
        // Not bootable by BIOS: the boot code halts (HLT; JMP back to it).
        let at = usize::from(boot_code_at);
        b[at..at + 3].copy_from_slice(&[0xF4, 0xEB, 0xFD]);
        b[510] = 0x55;
        b[511] = 0xAA;
        b
    }

    fn fsinfo(&self) -> [u8; 512] {
        let free = self.geom.cluster_count - self.allocated_clusters();
        let next = if self.next - 2 < self.geom.cluster_count {
            self.next
        } else {
            u32::MAX
        };
        let fi = FsInfo {
            lead_sig: U32::new(FSINFO_LEAD_SIG),
            reserved1: [0; 480],
            struct_sig: U32::new(FSINFO_STRUCT_SIG),
            free_count: U32::new(free),
            next_free: U32::new(next),
            reserved2: [0; 12],
            trail_sig: U32::new(FSINFO_TRAIL_SIG),
        };
        let mut out = [0u8; 512];
        out.copy_from_slice(fi.as_bytes());
        out
    }

    /// Clusters marked in the FAT: reservations minus slot tails beyond the current size.
    fn allocated_clusters(&self) -> u32 {
        let tails: u32 = self
            .slots
            .iter()
            .map(|s| s.clusters - self.clusters_for(u64::from(s.size)))
            .sum();
        self.clusters_used() - tails
    }

    fn fat_bytes(&self) -> Vec<u8> {
        let g = &self.geom;
        let t = g.fat_type;
        let mut fat = vec![0u8; g.fat_sectors as usize * SECTOR as usize];
        let media = match t {
            FatType::Fat12 => 0xF00,
            FatType::Fat16 => 0xFF00,
            FatType::Fat32 => 0x0FFF_FF00,
        } | u32::from(MEDIA_FIXED);
        set_entry(t, &mut fat, 0, 0, media);
        set_entry(t, &mut fat, 0, 1, t.eoc());
        let mut chain = |first: u32, n: u32| {
            for k in 0..n {
                let v = if k + 1 == n { t.eoc() } else { first + k + 1 };
                set_entry(t, &mut fat, 0, first + k, v);
            }
        };
        for d in &self.dirs {
            if d.first != 0 {
                chain(d.first, d.clusters);
            }
            for e in &d.entries {
                if let Target::File { data_clusters, .. } = e.target {
                    if e.first != 0 {
                        chain(e.first, data_clusters);
                    }
                }
            }
        }
        fat
    }

    fn dir_bytes(&self, d: &PDir) -> Vec<u8> {
        let mut out = Vec::with_capacity(d.entries.len() * 64);
        for e in &d.entries {
            if let Some(units) = &e.long {
                for l in names::lfn_entries(units, &e.short) {
                    out.extend_from_slice(l.as_bytes());
                }
            }
            let (date, time, hundredths) = dos_time(e.mtime.sec, e.mtime.nsec);
            let mut de = DirEntry {
                name: e.short,
                attr: e.attr,
                nt_res: 0,
                crt_time_tenth: hundredths,
                crt_time: U16::new(time),
                crt_date: U16::new(date),
                lst_acc_date: U16::new(date),
                fst_clus_hi: U16::new(0),
                wrt_time: U16::new(time),
                wrt_date: U16::new(date),
                fst_clus_lo: U16::new(0),
                file_size: U32::new(e.size),
            };
            if matches!(e.target, Target::Label) {
                de.crt_time_tenth = 0;
                de.crt_time = U16::new(0);
                de.crt_date = U16::new(0);
                de.lst_acc_date = U16::new(0);
            }
            de.set_first_cluster(e.first);
            out.extend_from_slice(de.as_bytes());
        }
        out
    }

    /// Writes the filesystem into `sink` (window starting at the filesystem's first byte, at
    /// least the filesystem size, reading as zeroes). File bytes come from `contents`.
    pub fn write(&self, contents: &dyn Contents, sink: &dyn Sink) -> Result<FatReport, FatError> {
        let g = &self.geom;
        if sink.len() < g.size() {
            return Err(FatError::BadOptions(format!(
                "output window of {} bytes is smaller than the {}-byte filesystem",
                sink.len(),
                g.size()
            )));
        }
        let put = |off: u64, bytes: &[u8]| sink.write_at(off, bytes).map_err(io_err(off));
        let boot = self.boot_sector();
        put(0, &boot)?;
        if g.fat_type == FatType::Fat32 {
            let fi = self.fsinfo();
            put(u64::from(FSINFO_SECTOR * SECTOR), &fi)?;
            put(u64::from(BACKUP_BOOT_SECTOR * SECTOR), &boot)?;
            put(
                u64::from((BACKUP_BOOT_SECTOR + FSINFO_SECTOR) * SECTOR),
                &fi,
            )?;
        }
        let fat = self.fat_bytes();
        for i in 0..NUM_FATS {
            put(g.fat_offset(i), &fat)?;
        }
        for d in &self.dirs {
            put(self.dir_offset(d), &self.dir_bytes(d))?;
        }
        let mut buf = vec![0u8; 1 << 20];
        for d in &self.dirs {
            for e in &d.entries {
                let Target::File { node, path, .. } = &e.target else {
                    continue;
                };
                if e.first == 0 {
                    continue;
                }
                let NodeKind::File(fd) = &self.tree.node(*node).kind else {
                    continue;
                };
                self.copy_file(
                    contents,
                    sink,
                    fd,
                    path,
                    g.cluster_offset(e.first),
                    &mut buf,
                )?;
            }
        }
        Ok(FatReport {
            geometry: g.clone(),
            slots: self.slot_locations(),
            clusters_used: self.clusters_used(),
            clusters_unreserved: g.cluster_count - self.clusters_used(),
        })
    }

    fn copy_file(
        &self,
        contents: &dyn Contents,
        sink: &dyn Sink,
        fd: &FileData,
        path: &str,
        at: u64,
        buf: &mut [u8],
    ) -> Result<(), FatError> {
        for run in fd.runs() {
            let mut done = 0u64;
            while done < run.len {
                let n = (run.len - done).min(buf.len() as u64) as usize;
                let off = run.offset + done;
                contents
                    .read_at(fd, off, &mut buf[..n])
                    .map_err(|source| FatError::Source {
                        path: path.to_string(),
                        offset: off,
                        source,
                    })?;
                sink.write_at(at + off, &buf[..n])
                    .map_err(io_err(at + off))?;
                done += n as u64;
            }
        }
        Ok(())
    }
}

/// The smallest size (a multiple of 64 KiB) whose mkfs.fat layout holds `tree` with at least
/// `slack` bytes of free clusters, for embedding an ESP image (e.g. in an ISO), and the FAT type
/// to force at that size: `fat_type` as given, or FAT32 when the tree's root directory does not
/// fit the fixed FAT12/16 root that mkfs.fat's choice for the size would have.
pub fn auto_size(
    tree: &Tree,
    fat_type: Option<FatType>,
    label: Option<String>,
    slack: u64,
) -> Result<(u64, Option<FatType>), FatError> {
    const STEP: u64 = 64 << 10;
    let mut size = STEP;
    let mut fat_type = fat_type;
    for _ in 0..200 {
        let opts = FatOptions {
            size,
            fat_type,
            volume_id: [0; 4],
            label: label.clone(),
        };
        let deficit = match FatWriter::new(tree, opts) {
            Ok(w) => {
                let free = u64::from(w.geom.cluster_count - w.clusters_used())
                    * u64::from(w.geom.cluster_size());
                if free >= slack {
                    return Ok((size, fat_type));
                }
                slack - free
            }
            Err(FatError::NoSpace {
                needed,
                available,
                cluster_size,
                ..
            }) => (needed - available) * u64::from(cluster_size) + slack,
            // Too small for any layout of this type, or a fixed root directory that is too
            // small: grow and retry.
            Err(FatError::BadOptions(_)) => size,
            // FAT12/16 have a fixed root directory. When the tree's root does not fit it, FAT32
            // (whose root is a cluster chain) holds it at any size from ~32 MiB; growing until
            // mkfs.fat's size rule picks FAT32 by itself would mean 512 MiB.
            Err(FatError::Unsupported { reason, .. })
                if reason.contains("root directory holds") =>
            {
                if fat_type.is_none() {
                    fat_type = Some(FatType::Fat32);
                    continue;
                }
                size
            }
            Err(e) => return Err(e),
        };
        // Grow by the deficit plus room for the FATs that cover it, at least one step.
        let grow = (deficit + deficit / 128).max(STEP);
        size = (size + grow).div_ceil(STEP) * STEP;
    }
    Err(FatError::BadOptions(
        "could not find a FAT size that holds the tree".into(),
    ))
}
