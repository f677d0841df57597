//! Reading FAT12/16/32 filesystems (any writer's, 512-byte sectors): boot sector, directories
//! with long names, files; and a human dump for debugging.

use std::fmt::Write as _;
use std::io;

use zerocopy::FromBytes;

use super::layout::*;
use super::names;
use super::FatError;

/// One directory entry as read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Long name if present and valid, else the 8.3 display name.
    pub name: String,
    /// The 8.3 name (`BASE.EXT`).
    pub short_name: String,
    /// `ATTR_*` bits.
    pub attr: u8,
    /// File size in bytes (0 for directories).
    pub size: u32,
    /// First cluster (0 for empty files and the FAT12/16 root).
    pub first_cluster: u32,
    /// Last write time as Unix seconds (FAT local time read as UTC).
    pub mtime: i64,
    /// Byte offset of the 8.3 entry within the filesystem.
    pub dirent_offset: u64,
}

impl Entry {
    /// True for directories.
    pub fn is_dir(&self) -> bool {
        self.attr & ATTR_DIRECTORY != 0
    }
}

/// A FAT filesystem read through a positional reader (offsets relative to its first byte).
pub struct FatReader<R> {
    read: R,
    /// Layout from the boot sector.
    pub geometry: Geometry,
    /// First cluster of the FAT32 root directory (0 on FAT12/16).
    pub root_cluster: u32,
    /// Volume serial number.
    pub volume_id: [u8; 4],
    /// Volume label from the boot sector.
    pub label: String,
}

impl<R: Fn(u64, &mut [u8]) -> io::Result<()>> FatReader<R> {
    /// Parses the boot sector and checks that the layout is self-consistent.
    pub fn open(read: R) -> Result<Self, FatError> {
        let mut bs = [0u8; 512];
        read(0, &mut bs).map_err(super::io_err(0))?;
        let corrupt = |reason: String| FatError::Corrupt { offset: 0, reason };
        let (bpb, _) =
            Bpb::read_from_prefix(&bs).map_err(|_| corrupt("short boot sector".into()))?;
        if bs[510] != 0x55 || bs[511] != 0xAA {
            return Err(corrupt("no 0x55AA boot sector signature".into()));
        }
        if bpb.bytes_per_sector.get() != SECTOR as u16 {
            return Err(corrupt(format!(
                "{} bytes per sector; only 512 is supported",
                bpb.bytes_per_sector.get()
            )));
        }
        let spc = u32::from(bpb.sectors_per_cluster);
        if spc == 0 || !spc.is_power_of_two() {
            return Err(corrupt(format!(
                "{spc} sectors per cluster is not a power of two"
            )));
        }
        let reserved = u32::from(bpb.reserved_sectors.get());
        let num_fats = u32::from(bpb.num_fats);
        if reserved == 0 || num_fats == 0 {
            return Err(corrupt("zero reserved sectors or zero FATs".into()));
        }
        let root_entries = u32::from(bpb.root_entries.get());
        let total = if bpb.total_sectors_16.get() != 0 {
            u32::from(bpb.total_sectors_16.get())
        } else {
            bpb.total_sectors_32.get()
        };
        let fat32_fields = Bpb32::read_from_prefix(&bs[36..]).ok().map(|(b, _)| b);
        let (fat_sectors, ext_at) = match bpb.fat_size_16.get() {
            0 => (fat32_fields.as_ref().map_or(0, |b| b.fat_size_32.get()), 64),
            n => (u32::from(n), 36),
        };
        let root_sectors = (root_entries * DIRENT_SIZE).div_ceil(SECTOR);
        let meta = u64::from(reserved)
            + u64::from(num_fats) * u64::from(fat_sectors)
            + u64::from(root_sectors);
        if fat_sectors == 0 || u64::from(total) <= meta {
            return Err(corrupt(format!(
                "{total} total sectors leave no data area after {meta} metadata sectors"
            )));
        }
        // At most 2^28 clusters exist in any FAT, so the narrowing cannot lose a valid count.
        let cluster_count = ((u64::from(total) - meta) / u64::from(spc)).min(1 << 28) as u32;
        let fat_type = FatType::from_cluster_count(cluster_count);
        if (fat_type == FatType::Fat32) != (bpb.fat_size_16.get() == 0) {
            return Err(corrupt(format!(
                "{cluster_count} clusters mean FAT{} but the BPB layout says otherwise",
                fat_type.bits()
            )));
        }
        let entry_bytes_needed = (u64::from(cluster_count) + 2) * u64::from(fat_type.bits()) / 8;
        if entry_bytes_needed > u64::from(fat_sectors) * u64::from(SECTOR) {
            return Err(corrupt(format!(
                "FAT of {fat_sectors} sectors is too small for {cluster_count} clusters"
            )));
        }
        let ext = ExtBpb::read_from_prefix(&bs[ext_at..])
            .map_err(|_| corrupt("short boot sector".into()))?
            .0;
        let (volume_id, label) = if ext.boot_sig == EXT_BOOT_SIG {
            (
                ext.volume_id,
                String::from_utf8_lossy(&ext.volume_label)
                    .trim_end()
                    .to_string(),
            )
        } else {
            ([0; 4], String::new())
        };
        let root_cluster = if fat_type == FatType::Fat32 {
            fat32_fields.map_or(0, |b| b.root_cluster.get())
        } else {
            0
        };
        let geometry = Geometry {
            fat_type,
            total_sectors: total,
            sectors_per_cluster: spc,
            reserved_sectors: reserved,
            fat_sectors,
            num_fats,
            root_entries,
            cluster_count,
            sectors_per_track: bpb.sectors_per_track.get(),
            heads: bpb.num_heads.get(),
        };
        Ok(FatReader {
            read,
            geometry,
            root_cluster,
            volume_id,
            label,
        })
    }

    fn rd(&self, off: u64, buf: &mut [u8]) -> Result<(), FatError> {
        (self.read)(off, buf).map_err(super::io_err(off))
    }

    /// FAT entry of cluster `c` (from the first FAT).
    pub fn fat_entry(&self, c: u32) -> Result<u32, FatError> {
        let t = self.geometry.fat_type;
        let (off, len) = entry_span(t, c);
        let mut b = [0u8; 4];
        self.rd(self.geometry.fat_offset(0) + off, &mut b[..len])?;
        get_entry(t, &b[..len], off, c).ok_or_else(|| FatError::Corrupt {
            offset: self.geometry.fat_offset(0) + off,
            reason: format!("FAT entry of cluster {c} unreadable"),
        })
    }

    /// The cluster chain starting at `first`, checked for range and loops.
    pub fn chain(&self, first: u32) -> Result<Vec<u32>, FatError> {
        let g = &self.geometry;
        let mut out = Vec::new();
        let mut c = first;
        loop {
            if c < 2 || u64::from(c) >= u64::from(g.cluster_count) + 2 {
                return Err(FatError::Corrupt {
                    offset: g.fat_offset(0),
                    reason: format!(
                        "cluster chain from {first} reaches cluster {c}, outside 2..{}",
                        u64::from(g.cluster_count) + 2
                    ),
                });
            }
            if out.len() > g.cluster_count as usize {
                return Err(FatError::Corrupt {
                    offset: g.fat_offset(0),
                    reason: format!("cluster chain from {first} loops"),
                });
            }
            out.push(c);
            let next = self.fat_entry(c)?;
            if g.fat_type.is_eoc(next) {
                return Ok(out);
            }
            c = next;
        }
    }

    /// The raw bytes of a directory and the filesystem offset of each of its 32-byte slots.
    pub(crate) fn dir_raw(&self, first: u32) -> Result<(Vec<u8>, Vec<u64>), FatError> {
        let g = &self.geometry;
        if first == 0 && g.fat_type != FatType::Fat32 {
            let len = g.root_entries as usize * DIRENT_SIZE as usize;
            let mut buf = vec![0u8; len];
            self.rd(g.root_dir_offset(), &mut buf)?;
            let offs = (0..g.root_entries as u64)
                .map(|i| g.root_dir_offset() + i * u64::from(DIRENT_SIZE))
                .collect();
            return Ok((buf, offs));
        }
        let first = if first == 0 { self.root_cluster } else { first };
        let chain = self.chain(first)?;
        if chain.len() as u64 * u64::from(g.cluster_size())
            > u64::from(MAX_DIR_ENTRIES * DIRENT_SIZE)
        {
            return Err(FatError::Corrupt {
                offset: g.cluster_offset(first),
                reason: format!("directory at cluster {first} is larger than 2 MiB"),
            });
        }
        let cs = g.cluster_size() as usize;
        let mut buf = vec![0u8; chain.len() * cs];
        let mut offs = Vec::with_capacity(buf.len() / 32);
        for (i, &c) in chain.iter().enumerate() {
            let at = g.cluster_offset(c);
            self.rd(at, &mut buf[i * cs..(i + 1) * cs])?;
            offs.extend((0..cs as u64 / 32).map(|k| at + k * 32));
        }
        Ok((buf, offs))
    }

    /// Entries of the directory starting at cluster `first` (0 = root), without `.`, `..` and
    /// the volume label.
    pub fn read_dir(&self, first: u32) -> Result<Vec<Entry>, FatError> {
        let (buf, offs) = self.dir_raw(first)?;
        let mut out = Vec::new();
        let mut lfn: Vec<Option<[u16; LFN_UNITS]>> = Vec::new();
        let mut lfn_sum = 0u8;
        for (raw, &off) in buf.chunks_exact(32).zip(&offs) {
            if raw[0] == 0 {
                break;
            }
            if raw[0] == DELETED {
                lfn.clear();
                continue;
            }
            if raw[11] & 0x3F == ATTR_LONG_NAME {
                let Ok((l, _)) = LfnEntry::read_from_prefix(raw) else {
                    continue;
                };
                let ord = usize::from(l.ord & 0x1F);
                if l.ord & LFN_LAST != 0 {
                    lfn = vec![None; ord];
                    lfn_sum = l.checksum;
                }
                if ord == 0 || ord > lfn.len() || l.checksum != lfn_sum {
                    lfn.clear();
                    continue;
                }
                let mut units = [0u16; LFN_UNITS];
                for (u, v) in units
                    .iter_mut()
                    .zip(l.name1.iter().chain(&l.name2).chain(&l.name3))
                {
                    *u = v.get();
                }
                lfn[ord - 1] = Some(units);
                continue;
            }
            let Ok((de, _)) = DirEntry::read_from_prefix(raw) else {
                continue;
            };
            let parts = std::mem::take(&mut lfn);
            if de.attr & ATTR_VOLUME_ID != 0 || de.name[0] == b'.' {
                continue;
            }
            let short = names::short_display(&de.name, de.nt_res);
            let long = (!parts.is_empty()
                && lfn_sum == names::checksum(&de.name)
                && parts.iter().all(Option::is_some))
            .then(|| {
                let units: Vec<u16> = parts
                    .iter()
                    .flatten()
                    .flat_map(|p| p.iter().copied())
                    .take_while(|&u| u != 0)
                    .collect();
                String::from_utf16_lossy(&units)
            });
            out.push(Entry {
                name: long.unwrap_or_else(|| short.clone()),
                short_name: short,
                attr: de.attr,
                size: de.file_size.get(),
                first_cluster: de.first_cluster(),
                mtime: unix_time(de.wrt_date.get(), de.wrt_time.get()),
                dirent_offset: off,
            });
        }
        Ok(out)
    }

    /// The entry at `path` (`/`-separated, case-insensitive like FAT itself). The root has no
    /// entry: `Ok(None)`.
    pub fn lookup(&self, path: &str) -> Result<Option<Entry>, FatError> {
        let mut dir = 0u32;
        let mut found: Option<Entry> = None;
        for comp in path.split('/').filter(|c| !c.is_empty()) {
            if let Some(e) = &found {
                if !e.is_dir() {
                    return Err(FatError::NotFound {
                        path: path.into(),
                        reason: format!("{} is not a directory", e.name),
                    });
                }
                dir = e.first_cluster;
            }
            let want = comp.to_uppercase();
            found = Some(
                self.read_dir(dir)?
                    .into_iter()
                    .find(|e| e.name.to_uppercase() == want || e.short_name == want)
                    .ok_or_else(|| FatError::NotFound {
                        path: path.into(),
                        reason: format!("no entry {comp:?}"),
                    })?,
            );
        }
        Ok(found)
    }

    /// Entries of the directory at `path`.
    pub fn list(&self, path: &str) -> Result<Vec<Entry>, FatError> {
        match self.lookup(path)? {
            None => self.read_dir(0),
            Some(e) if e.is_dir() => self.read_dir(e.first_cluster),
            Some(_) => Err(FatError::NotFound {
                path: path.into(),
                reason: "not a directory".into(),
            }),
        }
    }

    /// The bytes of the file at `path`.
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>, FatError> {
        let e = self
            .lookup(path)?
            .filter(|e| !e.is_dir())
            .ok_or_else(|| FatError::NotFound {
                path: path.into(),
                reason: "not a file".into(),
            })?;
        self.read_entry(&e)
    }

    /// The bytes of a file entry.
    pub fn read_entry(&self, e: &Entry) -> Result<Vec<u8>, FatError> {
        let size = e.size as usize;
        if size == 0 {
            return Ok(Vec::new());
        }
        let g = &self.geometry;
        let chain = self.chain(e.first_cluster)?;
        let cs = g.cluster_size() as usize;
        if chain.len() < size.div_ceil(cs) {
            return Err(FatError::Corrupt {
                offset: e.dirent_offset,
                reason: format!(
                    "{}: {} bytes but a chain of only {} clusters",
                    e.name,
                    e.size,
                    chain.len()
                ),
            });
        }
        let mut out = vec![0u8; size];
        for (i, chunk) in out.chunks_mut(cs).enumerate() {
            self.rd(g.cluster_offset(chain[i]), chunk)?;
        }
        Ok(out)
    }

    /// Every entry below the root, depth first, with its path (`/a/b`).
    pub fn walk(&self) -> Result<Vec<(String, Entry)>, FatError> {
        let mut out = Vec::new();
        let mut stack = vec![(String::new(), 0u32, 0usize)];
        while let Some((prefix, dir, depth)) = stack.pop() {
            if depth > 256 {
                return Err(FatError::Corrupt {
                    offset: self.geometry.cluster_offset(dir),
                    reason: format!("{prefix}: directories nested deeper than 256 (a loop?)"),
                });
            }
            let entries = self.read_dir(dir)?;
            let mut subdirs = Vec::new();
            for e in entries {
                let p = format!("{prefix}/{}", e.name);
                if e.is_dir() {
                    subdirs.push((p.clone(), e.first_cluster, depth + 1));
                }
                out.push((p, e));
            }
            stack.extend(subdirs.into_iter().rev());
        }
        Ok(out)
    }

    /// A human-readable dump: boot sector layout, then every entry with its offsets.
    pub fn dump(&self) -> Result<String, FatError> {
        let g = &self.geometry;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "FAT{} volume id {:02x}{:02x}-{:02x}{:02x} label {:?}",
            g.fat_type.bits(),
            self.volume_id[3],
            self.volume_id[2],
            self.volume_id[1],
            self.volume_id[0],
            self.label
        );
        let _ = writeln!(
            s,
            "  {} sectors ({} bytes), {} reserved, {} FATs x {} sectors at byte {}",
            g.total_sectors,
            g.size(),
            g.reserved_sectors,
            g.num_fats,
            g.fat_sectors,
            g.fat_offset(0)
        );
        let _ = writeln!(
            s,
            "  root: {}; data at byte {}, {} clusters of {} bytes",
            if g.fat_type == FatType::Fat32 {
                format!("cluster {}", self.root_cluster)
            } else {
                format!("{} entries at byte {}", g.root_entries, g.root_dir_offset())
            },
            g.data_offset(),
            g.cluster_count,
            g.cluster_size()
        );
        for (path, e) in self.walk()? {
            let _ = writeln!(
                s,
                "  {path}{} {} bytes, 8.3 {}, cluster {}, entry at byte {}",
                if e.is_dir() { "/" } else { "" },
                e.size,
                e.short_name,
                e.first_cluster,
                e.dirent_offset
            );
        }
        Ok(s)
    }
}
