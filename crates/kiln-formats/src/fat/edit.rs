//! Crash-safe edits of a FAT filesystem in place: adding and removing one file.
//!
//! An update must never leave the ESP without a bootable entry, so nothing a live file uses
//! is ever overwritten. Every edit is a short sequence of writes separated by durability
//! barriers ([`Device::sync`]), ordered so that a power cut between any two writes, or inside
//! one (512-byte sectors land or do not), leaves every file that existed before intact and
//! readable:
//!
//! - **Adding** `DIR/NAME`: the data goes to free clusters; then the FAT copies chain them
//!   (clusters marked used but reachable from no entry: a cut here only loses space); then the
//!   directory entries are written into free slots, long-name entries and the 8.3 entry in one
//!   write. The file appears when its 8.3 entry lands; a torn write can only leave long-name
//!   entries whose checksum matches no 8.3 entry, which readers ignore. A directory with no
//!   free slots grows by a cluster that is written and terminated first and linked last.
//! - **Removing**: the 8.3 entry is marked deleted first (the file disappears at once), then
//!   its long-name entries, then its clusters are freed.
//!
//! Each edit starts by reclaiming clusters that the FAT marks used but no entry reaches (what
//! a cut edit leaves behind), and ends by writing the exact free-cluster count to FSInfo, so a
//! completed edit leaves a filesystem `fsck.fat -n` passes.

use std::io;

use zerocopy::IntoBytes;

use super::layout::*;
use super::names::{self, ShortNames};
use super::read::FatReader;
use super::FatError;

/// The filesystem's bytes, read and written in place.
pub trait Device {
    /// Fills `buf` from filesystem byte `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `bytes` at filesystem byte `offset`.
    fn write(&self, offset: u64, bytes: &[u8]) -> io::Result<()>;
    /// Makes every earlier write durable before any later one starts.
    fn sync(&self) -> io::Result<()>;
}

/// Reads through a [`Device`], as [`FatReader`] takes them.
type DevRead<'a> = Box<dyn Fn(u64, &mut [u8]) -> io::Result<()> + 'a>;

/// An open filesystem: its layout and an in-memory copy of the first FAT.
struct Editor<'d> {
    dev: &'d dyn Device,
    g: Geometry,
    root_cluster: u32,
    fat: Vec<u8>,
}

fn io_at(offset: u64) -> impl FnOnce(io::Error) -> FatError {
    move |source| FatError::Io { offset, source }
}

impl<'d> Editor<'d> {
    fn open(dev: &'d dyn Device) -> Result<Self, FatError> {
        let r = FatReader::open(|o: u64, b: &mut [u8]| dev.read(o, b))?;
        let g = r.geometry.clone();
        let mut fat = vec![0u8; g.fat_sectors as usize * SECTOR as usize];
        dev.read(g.fat_offset(0), &mut fat)
            .map_err(io_at(g.fat_offset(0)))?;
        Ok(Editor {
            dev,
            root_cluster: r.root_cluster,
            g,
            fat,
        })
    }

    fn reader(&self) -> Result<FatReader<DevRead<'_>>, FatError> {
        FatReader::open(Box::new(|o: u64, b: &mut [u8]| self.dev.read(o, b)) as DevRead<'_>)
    }

    fn entry(&self, c: u32) -> u32 {
        get_entry(self.g.fat_type, &self.fat, 0, c).unwrap_or(0)
    }

    fn clusters(&self) -> std::ops::Range<u32> {
        2..self.g.cluster_count + 2
    }

    fn write(&self, offset: u64, bytes: &[u8]) -> Result<(), FatError> {
        self.dev.write(offset, bytes).map_err(io_at(offset))
    }

    fn sync(&self) -> Result<(), FatError> {
        self.dev.sync().map_err(io_at(0))
    }

    /// Sets FAT entries in memory and writes the bytes they touch to every FAT copy.
    fn set_entries(&mut self, values: &[(u32, u32)]) -> Result<(), FatError> {
        let t = self.g.fat_type;
        for &(c, v) in values {
            if !set_entry(t, &mut self.fat, 0, c, v) {
                return Err(FatError::Corrupt {
                    offset: self.g.fat_offset(0),
                    reason: format!("cluster {c} is outside the FAT"),
                });
            }
        }
        // The byte ranges touched, merged where they meet: one write per run per copy.
        let mut spans: Vec<(u64, u64)> = values
            .iter()
            .map(|&(c, _)| {
                let (off, len) = entry_span(t, c);
                (off, off + len as u64)
            })
            .collect();
        spans.sort_unstable();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (a, b) in spans {
            match runs.last_mut() {
                Some(r) if a <= r.1 => r.1 = r.1.max(b),
                _ => runs.push((a, b)),
            }
        }
        for copy in 0..self.g.num_fats {
            for &(a, b) in &runs {
                self.write(
                    self.g.fat_offset(copy) + a,
                    &self.fat[a as usize..b as usize],
                )?;
            }
        }
        Ok(())
    }

    /// Makes every FAT copy equal to the first. Edits write the first copy before the others,
    /// so after a cut the first is the newer one (and what readers use).
    fn mirror_fats(&self) -> Result<(), FatError> {
        let mut copy = vec![0u8; self.fat.len()];
        let mut wrote = false;
        for i in 1..self.g.num_fats {
            let at = self.g.fat_offset(i);
            self.dev.read(at, &mut copy).map_err(io_at(at))?;
            for (k, (a, b)) in self
                .fat
                .chunks(SECTOR as usize)
                .zip(copy.chunks(SECTOR as usize))
                .enumerate()
            {
                if a != b {
                    self.write(at + (k * SECTOR as usize) as u64, a)?;
                    wrote = true;
                }
            }
        }
        if wrote {
            self.sync()?;
        }
        Ok(())
    }

    /// Per cluster number, whether a chain from the root or a directory entry reaches it.
    fn reachable(&self) -> Result<Vec<bool>, FatError> {
        let r = self.reader()?;
        let mut firsts: Vec<u32> = r
            .walk()?
            .into_iter()
            .map(|(_, e)| e.first_cluster)
            .filter(|&c| c >= 2)
            .collect();
        if self.g.fat_type == FatType::Fat32 {
            firsts.push(self.root_cluster);
        }
        let mut reachable = vec![false; self.g.cluster_count as usize + 2];
        for c in firsts {
            for x in r.chain(c)? {
                reachable[x as usize] = true;
            }
        }
        Ok(reachable)
    }

    /// Frees clusters the FAT marks used that no directory entry reaches (after making the
    /// FAT copies agree).
    fn reclaim_lost(&mut self) -> Result<(), FatError> {
        self.mirror_fats()?;
        let reachable = self.reachable()?;
        let bad = match self.g.fat_type {
            FatType::Fat12 => 0xFF7,
            FatType::Fat16 => 0xFFF7,
            FatType::Fat32 => 0x0FFF_FFF7,
        };
        let lost: Vec<(u32, u32)> = self
            .clusters()
            .filter(|&c| !reachable[c as usize] && self.entry(c) != 0 && self.entry(c) != bad)
            .map(|c| (c, 0))
            .collect();
        if !lost.is_empty() {
            self.set_entries(&lost)?;
            self.sync()?;
        }
        Ok(())
    }

    /// Marks deleted the long-name entries of `dir` that belong to no 8.3 entry (what a cut
    /// removal or a torn entry write leaves behind).
    fn sweep_orphans(&self, dir: &str) -> Result<(), FatError> {
        let (_, raw, offs) = self.dir(dir)?;
        let mut orphans = Vec::new();
        let mut pending: Vec<usize> = Vec::new();
        let mut sum = 0u8;
        for (i, e) in raw.chunks_exact(32).enumerate() {
            if e[0] == 0 {
                break;
            }
            if e[0] == DELETED {
                orphans.append(&mut pending);
            } else if e[11] == ATTR_LONG_NAME {
                if e[0] & LFN_LAST != 0 || pending.is_empty() || e[13] != sum {
                    orphans.append(&mut pending);
                }
                sum = e[13];
                pending.push(i);
            } else {
                let mut short = [0u8; 11];
                short.copy_from_slice(&e[..11]);
                if names::checksum(&short) != sum {
                    orphans.append(&mut pending);
                }
                pending.clear();
            }
        }
        orphans.append(&mut pending);
        for &i in &orphans {
            self.write(offs[i], &[DELETED])?;
        }
        if !orphans.is_empty() {
            self.sync()?;
        }
        Ok(())
    }

    fn free_clusters(&self) -> impl Iterator<Item = u32> + '_ {
        self.clusters().filter(|&c| self.entry(c) == 0)
    }

    /// Writes the exact free count (and the next-free hint) to FSInfo on FAT32.
    fn write_fsinfo(&self) -> Result<(), FatError> {
        let Some(at) = self.g.fsinfo_offset() else {
            return Ok(());
        };
        let free = self.free_clusters().count() as u32;
        let next = self.free_clusters().next().unwrap_or(0xFFFF_FFFF);
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&free.to_le_bytes());
        b[4..].copy_from_slice(&next.to_le_bytes());
        self.write(at + FSINFO_FREE_COUNT, &b)?;
        self.sync()
    }

    /// The first cluster of directory `dir` (0 for the root) and its slots.
    fn dir(&self, dir: &str) -> Result<(u32, Vec<u8>, Vec<u64>), FatError> {
        let r = self.reader()?;
        let first = match r.lookup(dir)? {
            None => 0,
            Some(e) if e.is_dir() => e.first_cluster,
            Some(_) => {
                return Err(FatError::NotFound {
                    path: dir.into(),
                    reason: "not a directory".into(),
                })
            }
        };
        let (raw, offs) = r.dir_raw(first)?;
        Ok((first, raw, offs))
    }
}

/// Adds the file `dir/name` holding `data`, crash-safely (see the module documentation).
/// `dir` must exist and must not hold `name` already.
pub fn add_file(
    dev: &dyn Device,
    dir: &str,
    name: &str,
    data: &[u8],
    mtime: i64,
) -> Result<(), FatError> {
    let path = format!("{}/{name}", dir.trim_end_matches('/'));
    let mut ed = Editor::open(dev)?;
    ed.reclaim_lost()?;
    ed.sweep_orphans(dir)?;
    let (first, raw, offs) = ed.dir(dir)?;

    // The directory entries: a unique 8.3 name, long-name entries when needed.
    let mut shorts = ShortNames::default();
    let mut end = raw.len() / 32;
    for (i, e) in raw.chunks_exact(32).enumerate() {
        if e[0] == 0 {
            end = i;
            break;
        }
        if e[0] != DELETED && e[11] != ATTR_LONG_NAME {
            let mut s = [0u8; 11];
            s.copy_from_slice(&e[..11]);
            shorts.take(s);
        }
    }
    let exists = ed
        .reader()?
        .list(dir)?
        .into_iter()
        .any(|e| e.name.eq_ignore_ascii_case(name) || e.short_name.eq_ignore_ascii_case(name));
    if exists {
        return Err(FatError::Unsupported {
            path,
            reason: "already exists".into(),
        });
    }
    let (short, long) = shorts
        .assign(name)
        .map_err(|reason| FatError::Unsupported {
            path: path.clone(),
            reason,
        })?;
    let mut slots: Vec<u8> = Vec::new();
    if long {
        let units =
            names::check_long_name(name.as_bytes()).map_err(|reason| FatError::Unsupported {
                path: path.clone(),
                reason,
            })?;
        for l in names::lfn_entries(&units, &short) {
            slots.extend_from_slice(l.as_bytes());
        }
    }
    let cs = u64::from(ed.g.cluster_size());
    let nclusters = (data.len() as u64).div_ceil(cs) as usize;
    let (date, time, tenth) = dos_time(mtime, 0);
    let mut d = DirEntry {
        name: short,
        attr: ATTR_ARCHIVE,
        crt_time_tenth: tenth,
        crt_time: time.into(),
        crt_date: date.into(),
        lst_acc_date: date.into(),
        wrt_time: time.into(),
        wrt_date: date.into(),
        file_size: u32::try_from(data.len())
            .map_err(|_| FatError::Unsupported {
                path: path.clone(),
                reason: format!("{} bytes is more than a FAT file holds", data.len()),
            })?
            .into(),
        ..DirEntry::default()
    };
    let need = slots.len() / 32 + 1;

    // Free slots: a run of `need` deleted or never-used slots.
    let mut run = None;
    let mut start = 0;
    for i in 0..raw.len() / 32 {
        let free = i >= end || raw[i * 32] == DELETED;
        if !free {
            start = i + 1;
        } else if i + 1 - start == need {
            run = Some(start);
            break;
        }
    }
    let grow = run.is_none();
    if grow && first == 0 && ed.g.fat_type != FatType::Fat32 {
        return Err(FatError::Unsupported {
            path,
            reason: "the root directory is full".into(),
        });
    }

    // Clusters: the file's, and one more when the directory grows.
    let want = nclusters + usize::from(grow);
    let free: Vec<u32> = ed.free_clusters().take(want).collect();
    if free.len() < want {
        return Err(FatError::NoSpace {
            needed: want as u64,
            available: free.len() as u64,
            cluster_size: ed.g.cluster_size(),
            size: ed.g.size(),
            bits: ed.g.fat_type.bits(),
        });
    }
    let (file_clusters, dir_cluster) = free.split_at(nclusters);
    if let Some(&c) = file_clusters.first() {
        d.set_first_cluster(c);
    }
    slots.extend_from_slice(d.as_bytes());

    // 1. The data, into clusters no entry uses.
    // One write per run of consecutive clusters.
    let mut i = 0;
    while i < file_clusters.len() {
        let mut j = i + 1;
        while j < file_clusters.len() && file_clusters[j] == file_clusters[j - 1] + 1 {
            j += 1;
        }
        let lo = i * cs as usize;
        let hi = data.len().min(j * cs as usize);
        ed.write(ed.g.cluster_offset(file_clusters[i]), &data[lo..hi])?;
        i = j;
    }
    // A new directory cluster: the entries, then zeroes (end of directory).
    if let Some(&c) = dir_cluster.first() {
        let mut b = vec![0u8; cs as usize];
        b[..slots.len()].copy_from_slice(&slots);
        ed.write(ed.g.cluster_offset(c), &b)?;
    }
    ed.sync()?;

    // 2. The chains (still unreachable).
    let eoc = ed.g.fat_type.eoc();
    let mut chain: Vec<(u32, u32)> = file_clusters.windows(2).map(|w| (w[0], w[1])).collect();
    chain.extend(file_clusters.last().map(|&c| (c, eoc)));
    chain.extend(dir_cluster.first().map(|&c| (c, eoc)));
    ed.set_entries(&chain)?;
    ed.sync()?;

    // 3. The entries become visible.
    match (run, dir_cluster.first()) {
        (Some(at), _) => {
            // Slots are contiguous within a cluster; a run may cross into the next cluster.
            let mut i = 0;
            while i < need {
                let mut j = i + 1;
                while j < need && offs[at + j] == offs[at + j - 1] + 32 {
                    j += 1;
                }
                ed.write(offs[at + i], &slots[i * 32..j * 32])?;
                i = j;
            }
        }
        (None, Some(&c)) => {
            let first = if first == 0 { ed.root_cluster } else { first };
            let last = *ed.reader()?.chain(first)?.last().unwrap_or(&first);
            ed.set_entries(&[(last, c)])?;
        }
        (None, None) => unreachable!("a directory without free slots grows"),
    }
    ed.sync()?;
    ed.write_fsinfo()
}

/// Removes the file at `path`, crash-safely; false when there is no such file.
pub fn remove_file(dev: &dyn Device, path: &str) -> Result<bool, FatError> {
    let mut ed = Editor::open(dev)?;
    ed.reclaim_lost()?;
    let parent = path.rsplit_once('/').map_or("", |(p, _)| p);
    ed.sweep_orphans(parent)?;
    let Some(e) = ed.reader()?.lookup(path).or_else(|e| match e {
        FatError::NotFound { .. } => Ok(None),
        e => Err(e),
    })?
    else {
        return Ok(false);
    };
    if e.is_dir() {
        return Err(FatError::Unsupported {
            path: path.into(),
            reason: "is a directory".into(),
        });
    }
    let (_, raw, offs) = ed.dir(parent)?;
    let Some(k) = offs.iter().position(|&o| o == e.dirent_offset) else {
        return Err(FatError::Corrupt {
            offset: e.dirent_offset,
            reason: format!("{path}: its entry is not in its directory"),
        });
    };
    let sum = {
        let mut s = [0u8; 11];
        s.copy_from_slice(&raw[k * 32..k * 32 + 11]);
        names::checksum(&s)
    };
    // 1. The 8.3 entry: the file is gone.
    ed.write(e.dirent_offset, &[DELETED])?;
    ed.sync()?;
    // 2. Its long-name entries.
    let mut i = k;
    while i > 0 {
        let s = &raw[(i - 1) * 32..i * 32];
        if s[0] == DELETED || s[11] != ATTR_LONG_NAME || s[13] != sum {
            break;
        }
        ed.write(offs[i - 1], &[DELETED])?;
        let last = s[0] & LFN_LAST != 0;
        i -= 1;
        if last {
            break;
        }
    }
    ed.sync()?;
    // 3. Its clusters.
    if e.first_cluster >= 2 {
        let chain = ed.reader()?.chain(e.first_cluster)?;
        let freed: Vec<(u32, u32)> = chain.into_iter().map(|c| (c, 0)).collect();
        ed.set_entries(&freed)?;
        ed.sync()?;
    }
    ed.write_fsinfo()?;
    Ok(true)
}

/// Clusters a file of `len` bytes takes, and how many are free once unreachable clusters are
/// counted as free (what [`add_file`] will find).
pub fn space(dev: &dyn Device, len: u64) -> Result<(u64, u64), FatError> {
    let ed = Editor::open(dev)?;
    let used = ed.reachable()?;
    let free = ed.clusters().filter(|&c| !used[c as usize]).count() as u64;
    Ok((len.div_ceil(u64::from(ed.g.cluster_size())), free))
}
