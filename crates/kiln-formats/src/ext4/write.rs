//! Emitting a [`Plan`]: file data in parallel, then directories, extent trees, xattr blocks,
//! the journal superblock, inode tables, bitmaps, descriptors and superblocks.

use std::io;

use rayon::prelude::*;
use zerocopy::big_endian as be;
use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromZeros, IntoBytes};

use super::alloc::{desc_block_in_group, group_has_desc, group_has_super, reserved_blocks};
use super::csum;
use super::dir;
use super::extent::{self, Ext};
use super::layout::*;
use super::plan::{path_of, Plan, Src, LOST_FOUND_BLOCKS};
use super::xattr;
use super::{Error, Progress, Report, Result};
use crate::fstree::{Contents, FileData, NodeKind, Segment, Timestamp, Tree};
use crate::sink::Sink;

/// Largest chunk of file data read and written at once.
pub(crate) const CHUNK: usize = 4 << 20;

/// Why copying a file failed.
pub(crate) enum CopyErr {
    Read(io::Error),
    Write(u64, io::Error),
}

/// Copies a file's data runs into its initialized extents. `read(offset, buf)` fills `buf`
/// with the file's bytes at logical `offset`; it is called in increasing offset order, each
/// byte once, so a one-pass stream can serve it.
pub(crate) fn copy_file(
    fd: &FileData,
    exts: &[Ext],
    sink: &dyn Sink,
    buf: &mut Vec<u8>,
    read: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
    progress: Progress,
) -> std::result::Result<(), CopyErr> {
    let one;
    let segs: &[Segment] = match &fd.segments {
        Some(s) => s,
        None => {
            one = [Segment {
                offset: 0,
                len: fd.size,
            }];
            &one
        }
    };
    let mut si = 0usize;
    for e in exts.iter().filter(|e| !e.unwritten) {
        let mut lb = u64::from(e.lblk);
        let end_lb = lb + u64::from(e.len);
        let mut pb = e.pblk;
        while lb < end_lb {
            let n = (end_lb - lb).min((CHUNK / BS) as u64);
            let start = lb * BLOCK_SIZE;
            let len = n as usize * BS;
            let stop = start + len as u64;
            if buf.len() < len {
                buf.resize(len, 0);
            }
            let chunk = &mut buf[..len];
            while si < segs.len() && segs[si].offset + segs[si].len <= start {
                si += 1;
            }
            let covered = segs
                .get(si)
                .is_some_and(|s| s.offset <= start && s.offset + s.len >= stop);
            if !covered {
                chunk.fill(0);
            }
            let mut k = si;
            let mut copied = 0u64;
            while let Some(s) = segs.get(k) {
                if s.offset >= stop {
                    break;
                }
                let s0 = s.offset.max(start);
                let s1 = (s.offset + s.len).min(stop);
                if s1 > s0 {
                    read(s0, &mut chunk[(s0 - start) as usize..(s1 - start) as usize])
                        .map_err(CopyErr::Read)?;
                    copied += s1 - s0;
                }
                if s.offset + s.len > stop {
                    break;
                }
                k += 1;
            }
            si = k;
            let off = pb * BLOCK_SIZE;
            sink.write_at(off, chunk)
                .map_err(|err| CopyErr::Write(off, err))?;
            progress(copied);
            lb += n;
            pb += n;
        }
    }
    Ok(())
}

/// Encodes a timestamp as ext4's 32-bit seconds plus the extra word (2 epoch bits extending
/// the range to year 2446, 30 bits of nanoseconds). Out-of-range times are clamped.
pub(crate) fn enc_time(t: Timestamp) -> (u32, u32) {
    const MIN: i64 = -(1 << 31);
    const MAX: i64 = (1 << 31) - 1 + (3 << 32);
    let sec = t.sec.clamp(MIN, MAX);
    let nsec = if sec == t.sec {
        t.nsec.min(999_999_999)
    } else {
        0
    };
    let lo = sec as u32;
    let epoch = ((sec - i64::from(lo as i32)) >> 32) as u32 & 3;
    (lo, (nsec << 2) | epoch)
}

/// Decodes what [`enc_time`] encodes.
pub(crate) fn dec_time(lo: u32, extra: u32) -> Timestamp {
    Timestamp {
        sec: i64::from(lo as i32) + (i64::from(extra & 3) << 32),
        nsec: extra >> 2,
    }
}

fn set_bits(bm: &mut [u8], from: usize, to: usize) {
    let mut i = from;
    while i < to && !i.is_multiple_of(8) {
        bm[i / 8] |= 1 << (i % 8);
        i += 1;
    }
    while i + 8 <= to {
        bm[i / 8] = 0xFF;
        i += 8;
    }
    while i < to {
        bm[i / 8] |= 1 << (i % 8);
        i += 1;
    }
}

fn w(sink: &dyn Sink, offset: u64, data: &[u8]) -> Result<()> {
    sink.write_at(offset, data)
        .map_err(|source| Error::Write { offset, source })
}

/// Writes `bytes` (whole blocks) to the physical blocks `exts` map them to.
fn write_mapped(sink: &dyn Sink, exts: &[Ext], bytes: &[u8]) -> Result<()> {
    for e in exts {
        let from = e.lblk as usize * BS;
        let to = from + e.len as usize * BS;
        if let Some(part) = bytes.get(from..to.min(bytes.len())) {
            w(sink, e.pblk * BLOCK_SIZE, part)?;
        }
    }
    Ok(())
}

impl Plan {
    /// Writes the filesystem: file bytes through `contents`, everything through `sink` (which
    /// must be at least [`Plan::size_bytes`] long and read as zeroes).
    pub fn write(&self, tree: &Tree, contents: &dyn Contents, sink: &dyn Sink) -> Result<Report> {
        self.write_with_progress(tree, contents, sink, &|_| {})
    }

    /// [`Plan::write`] reporting copied file bytes to `progress`.
    pub fn write_with_progress(
        &self,
        tree: &Tree,
        contents: &dyn Contents,
        sink: &dyn Sink,
        progress: Progress,
    ) -> Result<Report> {
        if sink.len() < self.size_bytes() {
            return Err(Error::BadSize {
                size: sink.len(),
                reason: "the output is smaller than the planned filesystem",
            });
        }
        self.write_data(tree, contents, sink, progress)?;
        self.write_metadata(tree, sink)?;
        Ok(self.report())
    }

    /// Bytes of file data the write will copy (for progress bars).
    pub fn data_bytes(&self, tree: &Tree) -> u64 {
        self.inodes
            .iter()
            .filter(|i| !i.preplaced)
            .filter_map(|i| match i.src {
                Src::Node(id) => match &tree.node(id).kind {
                    NodeKind::File(fd) => Some(fd.stored_len()),
                    _ => None,
                },
                _ => None,
            })
            .sum()
    }

    pub(crate) fn report(&self) -> Report {
        Report {
            size_bytes: self.size_bytes(),
            blocks: self.blocks,
            used_blocks: self.used_blocks(),
            inodes: self.total_inodes(),
            used_inodes: self.used_inodes(),
            groups: self.groups,
            uuid: self.opts.uuid,
            slots: self.slots.clone(),
        }
    }

    fn write_data(
        &self,
        tree: &Tree,
        contents: &dyn Contents,
        sink: &dyn Sink,
        progress: Progress,
    ) -> Result<()> {
        let files: Vec<(u32, &FileData)> = self
            .inodes
            .iter()
            .enumerate()
            .filter(|(_, i)| !i.preplaced && i.ext_count > 0)
            .filter_map(|(idx, i)| match i.src {
                Src::Node(id) => match &tree.node(id).kind {
                    NodeKind::File(fd) if fd.stored_len() > 0 => Some((idx as u32 + 1, fd)),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        files
            .par_iter()
            .with_min_len(8)
            .try_for_each_init(Vec::new, |buf, &(ino, fd)| {
                let mut read = |off: u64, b: &mut [u8]| contents.read_at(fd, off, b);
                copy_file(fd, self.exts(ino), sink, buf, &mut read, progress).map_err(|e| {
                    let Src::Node(id) = self.inodes[ino as usize - 1].src else {
                        unreachable!("files are tree nodes")
                    };
                    match e {
                        CopyErr::Read(source) => Error::Read {
                            path: path_of(tree, id),
                            source,
                        },
                        CopyErr::Write(offset, source) => Error::Write { offset, source },
                    }
                })
            })
    }

    fn write_metadata(&self, tree: &Tree, sink: &dyn Sink) -> Result<()> {
        // Directory, symlink and lost+found blocks, and extent tree blocks.
        (0..self.inodes.len()).into_par_iter().try_for_each(|idx| {
            let ino = idx as u32 + 1;
            let info = &self.inodes[idx];
            let seed = csum::inode_seed(self.fs_seed, ino, 0);
            let exts = self.exts(ino);
            match info.src {
                Src::Node(id) => {
                    match &tree.node(id).kind {
                        NodeKind::Dir(_) => {
                            let ents = self.dir_entries(tree, id);
                            let bytes = dir::render(ino, info.parent, &ents, self.hp, seed)
                                .map_err(|t| Error::Entry {
                                    path: path_of(tree, id),
                                    msg: format!("directory needs {} leaf blocks", t.leaves),
                                })?;
                            write_mapped(sink, exts, &bytes)?;
                        }
                        NodeKind::Symlink(t) if t.len() > FAST_SYMLINK_MAX => {
                            let mut b = vec![0u8; BS];
                            b[..t.len()].copy_from_slice(t);
                            write_mapped(sink, exts, &b)?;
                        }
                        _ => {}
                    }
                }
                Src::LostFound => {
                    write_mapped(sink, exts, &lost_found_blocks(ino, seed))?;
                }
                Src::Journal => {
                    if let Some(e) = exts.first() {
                        let total: u64 = exts.iter().map(|e| u64::from(e.len)).sum();
                        w(sink, e.pblk * BLOCK_SIZE, &self.journal_superblock(total))?;
                    }
                }
                Src::Reserved | Src::Free => {}
            }
            if info.ext_count as usize > EXTENTS_IN_INODE {
                let (_, blocks) = extent::build(exts, info.tree_block, seed);
                w(sink, info.tree_block * BLOCK_SIZE, &blocks)?;
            }
            Ok(())
        })?;

        // Shared xattr blocks.
        self.xblocks.par_iter().try_for_each(|x| {
            let mut b = xattr::block(&x.attrs, x.refs);
            let c = csum::xattr_block(self.fs_seed, x.block, &b);
            b[16..20].copy_from_slice(&c.to_le_bytes());
            w(sink, x.block * BLOCK_SIZE, &b)
        })?;

        // Inode tables, one group at a time in parallel.
        let ipg = u64::from(self.ipg);
        let max_ino = self.inodes.len() as u64;
        (0..self.groups).into_par_iter().try_for_each(|g| {
            let first = g * ipg + 1;
            if first > max_ino {
                return Ok(());
            }
            let last = ((g + 1) * ipg).min(max_ino);
            let mut buf = vec![0u8; ((last - first + 1) * INODE_SIZE) as usize];
            for (k, ino) in (first..=last).enumerate() {
                let raw = self.inode_bytes(tree, ino as u32);
                buf[k * INODE_SIZE as usize..(k + 1) * INODE_SIZE as usize].copy_from_slice(&raw);
            }
            // Blocks of free inodes only stay unwritten: the sink reads as zeros where nothing
            // was written, as for the rest of the table past `last`.
            let at = self.itable_at[g as usize] * BLOCK_SIZE;
            let zero = |b: &[u8]| b.iter().all(|&x| x == 0);
            let mut k = 0;
            while k < buf.len() {
                let len: usize = buf[k..]
                    .chunks(BS)
                    .take_while(|b| !zero(b))
                    .map(<[u8]>::len)
                    .sum();
                if len > 0 {
                    w(sink, at + k as u64, &buf[k..k + len])?;
                    k += len;
                } else {
                    k += BS.min(buf.len() - k);
                }
            }
            Ok(())
        })?;

        self.write_group_metadata(sink)
    }

    fn journal_superblock(&self, blocks: u64) -> Vec<u8> {
        let mut j = JournalSuperblock::new_zeroed();
        j.magic = be::U32::new(JBD2_MAGIC);
        j.blocktype = be::U32::new(JBD2_SUPERBLOCK_V2);
        j.blocksize = be::U32::new(BLOCK_SIZE as u32);
        j.maxlen = be::U32::new(blocks as u32);
        j.first = be::U32::new(1);
        j.sequence = be::U32::new(1);
        j.uuid = self.opts.uuid.into_bytes();
        j.nr_users = be::U32::new(1);
        let mut b = vec![0u8; BS];
        b[..1024].copy_from_slice(j.as_bytes());
        b
    }

    /// The 256 bytes of inode `ino`, checksum included.
    pub(crate) fn inode_bytes(&self, tree: &Tree, ino: u32) -> [u8; 256] {
        let info = &self.inodes[ino as usize - 1];
        let mut i = Inode::new_zeroed();
        let fs_time = Timestamp::from_secs(self.opts.timestamp);
        let set_times = |i: &mut Inode, t: Timestamp| {
            let (lo, extra) = enc_time(t);
            i.atime = U32::new(lo);
            i.ctime = U32::new(lo);
            i.mtime = U32::new(lo);
            i.crtime = U32::new(lo);
            i.atime_extra = U32::new(extra);
            i.ctime_extra = U32::new(extra);
            i.mtime_extra = U32::new(extra);
            i.crtime_extra = U32::new(extra);
        };
        if info.src == Src::Free {
            // As mke2fs leaves an inode never used: all zero, no checksum.
            return [0u8; 256];
        }
        if info.src == Src::Reserved {
            // As mke2fs leaves them: zero, the bad-blocks inode stamped with the creation time.
            if ino == BAD_INO {
                let (lo, _) = enc_time(fs_time);
                i.atime = U32::new(lo);
                i.ctime = U32::new(lo);
                i.mtime = U32::new(lo);
            }
            let mut raw = [0u8; 256];
            raw.copy_from_slice(i.as_bytes());
            csum::set_inode(self.fs_seed, ino, &mut raw);
            return raw;
        }
        i.extra_isize = U16::new(EXTRA_ISIZE);
        let exts = self.exts(ino);
        let seed = csum::inode_seed(self.fs_seed, ino, 0);
        let mapped: u64 = exts.iter().map(|e| u64::from(e.len)).sum();
        let tree_blocks = extent::tree_blocks(exts.len());
        let mut blocks = mapped + tree_blocks;
        let mut flags = 0u32;
        let mut use_extents = true;
        let (mode, size, links, times, uid, gid) = match info.src {
            Src::Journal => (0o100600u32, mapped * BLOCK_SIZE, 1u32, fs_time, 0, 0),
            Src::LostFound => (0o040700, LOST_FOUND_BLOCKS * BLOCK_SIZE, 2, fs_time, 0, 0),
            Src::Node(id) => {
                let node = tree.node(id);
                let m = &node.meta;
                let (size, links) = match &node.kind {
                    NodeKind::Dir(_) => {
                        let mut n = 2 + tree.subdir_count(id);
                        if matches!(self.lost_found, Some((_, true))) && id == crate::fstree::ROOT {
                            n += 1;
                        }
                        if n > LINK_MAX {
                            n = 1;
                        }
                        if info.indexed {
                            flags |= INODE_INDEX_FL;
                        }
                        (mapped * BLOCK_SIZE, n)
                    }
                    NodeKind::File(fd) => (fd.size, self.links[id as usize]),
                    NodeKind::Symlink(t) => {
                        if t.len() <= FAST_SYMLINK_MAX {
                            use_extents = false;
                            i.block[..t.len()].copy_from_slice(t);
                        }
                        (t.len() as u64, self.links[id as usize])
                    }
                    NodeKind::CharDev { major, minor } | NodeKind::BlockDev { major, minor } => {
                        use_extents = false;
                        let (major, minor) = (*major, *minor);
                        if major < 256 && minor < 256 {
                            i.block[..4].copy_from_slice(&((major << 8) | minor).to_le_bytes());
                        } else {
                            let enc = (minor & 0xFF) | (major << 8) | ((minor & !0xFF) << 12);
                            i.block[4..8].copy_from_slice(&enc.to_le_bytes());
                        }
                        (0, self.links[id as usize])
                    }
                    NodeKind::Fifo | NodeKind::Socket => {
                        use_extents = false;
                        (0, self.links[id as usize])
                    }
                };
                (node.mode(), size, links, m.mtime, m.uid, m.gid)
            }
            Src::Reserved | Src::Free => unreachable!("handled above"),
        };
        if use_extents {
            flags |= INODE_EXTENTS_FL;
            let (root, _) = extent::build(exts, info.tree_block, seed);
            i.block = root;
        }
        if info.xattr > 0 {
            let x = &self.xblocks[info.xattr as usize - 1];
            blocks += 1;
            i.file_acl_lo = U32::new(x.block as u32);
            i.file_acl_high = U16::new((x.block >> 32) as u16);
        }
        if let Src::Node(id) = info.src {
            let meta = &tree.node(id).meta;
            if !meta.xattrs.is_empty() {
                // Planning validated these; the split is deterministic.
                if let Ok(attrs) = xattr::to_disk(&meta.xattrs) {
                    if let Ok(split) = xattr::split(attrs) {
                        i.xattr = xattr::ibody(&split.inline);
                    }
                }
            }
        }
        i.mode = U16::new(mode as u16);
        i.uid = U16::new(uid as u16);
        i.uid_high = U16::new((uid >> 16) as u16);
        i.gid = U16::new(gid as u16);
        i.gid_high = U16::new((gid >> 16) as u16);
        i.size_lo = U32::new(size as u32);
        i.size_high = U32::new((size >> 32) as u32);
        i.links_count = U16::new(links as u16);
        let sectors = blocks * (BLOCK_SIZE / 512);
        i.blocks_lo = U32::new(sectors as u32);
        i.blocks_high = U16::new((sectors >> 32) as u16);
        i.flags = U32::new(flags);
        set_times(&mut i, times);
        let mut raw = [0u8; 256];
        raw.copy_from_slice(i.as_bytes());
        csum::set_inode(self.fs_seed, ino, &mut raw);
        raw
    }

    /// The superblock for copy `group`, checksum included.
    pub(crate) fn superblock(&self, group: u64, free_blocks: u64, free_inodes: u64) -> Superblock {
        let mut s = Superblock::new_zeroed();
        let o = &self.opts;
        let ts = o.timestamp.clamp(0, (1 << 40) - 1) as u64;
        s.inodes_count = U32::new(self.total_inodes() as u32);
        s.blocks_count_lo = U32::new(self.blocks as u32);
        s.blocks_count_hi = U32::new((self.blocks >> 32) as u32);
        let r = self.blocks * u64::from(o.reserved_percent.min(50)) / 100;
        s.r_blocks_count_lo = U32::new(r as u32);
        s.r_blocks_count_hi = U32::new((r >> 32) as u32);
        s.free_blocks_count_lo = U32::new(free_blocks as u32);
        s.free_blocks_count_hi = U32::new((free_blocks >> 32) as u32);
        s.free_inodes_count = U32::new(free_inodes as u32);
        s.first_data_block = U32::new(0);
        s.log_block_size = U32::new(2);
        s.log_cluster_size = U32::new(2);
        s.blocks_per_group = U32::new(BLOCKS_PER_GROUP as u32);
        s.clusters_per_group = U32::new(BLOCKS_PER_GROUP as u32);
        s.inodes_per_group = U32::new(self.ipg);
        s.wtime = U32::new(ts as u32);
        s.wtime_hi = (ts >> 32) as u8;
        s.max_mnt_count = U16::new(0xFFFF);
        s.magic = U16::new(EXT4_MAGIC);
        s.state = U16::new(STATE_VALID);
        s.errors = U16::new(ERRORS_CONTINUE);
        s.lastcheck = U32::new(ts as u32);
        s.lastcheck_hi = (ts >> 32) as u8;
        s.mkfs_time = U32::new(ts as u32);
        s.mkfs_time_hi = (ts >> 32) as u8;
        s.rev_level = U32::new(DYNAMIC_REV);
        s.first_ino = U32::new(FIRST_INO);
        s.inode_size = U16::new(INODE_SIZE as u16);
        s.block_group_nr = U16::new(group as u16);
        let mut compat = COMPAT_EXT_ATTR | COMPAT_DIR_INDEX;
        if o.journal {
            compat |= COMPAT_HAS_JOURNAL;
        }
        s.feature_compat = U32::new(compat);
        s.feature_incompat = U32::new(
            INCOMPAT_FILETYPE
                | INCOMPAT_META_BG
                | INCOMPAT_EXTENTS
                | INCOMPAT_64BIT
                | INCOMPAT_FLEX_BG,
        );
        s.feature_ro_compat = U32::new(
            RO_COMPAT_SPARSE_SUPER
                | RO_COMPAT_LARGE_FILE
                | RO_COMPAT_HUGE_FILE
                | RO_COMPAT_DIR_NLINK
                | RO_COMPAT_EXTRA_ISIZE
                | RO_COMPAT_METADATA_CSUM,
        );
        s.uuid = o.uuid.into_bytes();
        let label = o.label.as_bytes();
        s.volume_name[..label.len().min(16)].copy_from_slice(&label[..label.len().min(16)]);
        s.hash_seed = o.hash_seed.into_bytes();
        s.def_hash_version = DX_HASH_HALF_MD4;
        s.desc_size = U16::new(DESC_SIZE as u16);
        s.default_mount_opts = U32::new(DEFM_XATTR_USER | DEFM_ACL);
        s.first_meta_bg = U32::new(0);
        s.min_extra_isize = U16::new(EXTRA_ISIZE);
        s.want_extra_isize = U16::new(EXTRA_ISIZE);
        s.flags = U32::new(FLAGS_SIGNED_HASH);
        s.log_groups_per_flex = 4;
        s.checksum_type = CHECKSUM_TYPE_CRC32C;
        if o.journal {
            s.journal_inum = U32::new(JOURNAL_INO);
            s.jnl_backup_type = JNL_BACKUP_BLOCKS;
            let exts = self.exts(JOURNAL_INO);
            let seed = csum::inode_seed(self.fs_seed, JOURNAL_INO, 0);
            let (root, _) =
                extent::build(exts, self.inodes[JOURNAL_INO as usize - 1].tree_block, seed);
            for k in 0..15 {
                s.jnl_blocks[k] = U32::new(u32::from_le_bytes([
                    root[4 * k],
                    root[4 * k + 1],
                    root[4 * k + 2],
                    root[4 * k + 3],
                ]));
            }
            let size: u64 = exts.iter().map(|e| u64::from(e.len)).sum::<u64>() * BLOCK_SIZE;
            s.jnl_blocks[15] = U32::new((size >> 32) as u32);
            s.jnl_blocks[16] = U32::new(size as u32);
        }
        let c = csum::superblock(s.as_bytes());
        s.checksum = U32::new(c);
        s
    }

    fn write_group_metadata(&self, sink: &dyn Sink) -> Result<()> {
        let groups = self.groups as usize;
        let ipg = u64::from(self.ipg);
        // Per group: directories, inodes in use, and the index past the last one in use.
        let mut dirs = vec![0u32; groups];
        let mut in_use = vec![0u64; groups];
        let mut high = vec![0u64; groups];
        for (idx, info) in self.inodes.iter().enumerate() {
            let g = (idx as u64 / ipg) as usize;
            let is_dir = match info.src {
                Src::LostFound => true,
                Src::Node(_) => info.parent != 0,
                _ => false,
            };
            if is_dir {
                dirs[g] += 1;
            }
            if info.src != Src::Free {
                in_use[g] += 1;
                high[g] = idx as u64 % ipg + 1;
            }
        }
        let mut descs = vec![GroupDesc::default(); groups];
        let mut free_blocks_total = 0u64;
        let mut free_inodes_total = 0u64;
        let mut r = 0usize; // index into used ranges
        for g in 0..groups {
            let gstart = g as u64 * BLOCKS_PER_GROUP;
            let gend = (gstart + BLOCKS_PER_GROUP).min(self.blocks);
            let glen = (gend - gstart) as usize;
            let mut bm = vec![0u8; BS];
            set_bits(&mut bm, 0, reserved_blocks(g as u64) as usize);
            while r < self.used.len() && self.used[r].0 + self.used[r].1 <= gstart {
                r += 1;
            }
            let mut k = r;
            while let Some(&(s, l)) = self.used.get(k) {
                if s >= gend {
                    break;
                }
                let a = s.max(gstart) - gstart;
                let b = (s + l).min(gend) - gstart;
                set_bits(&mut bm, a as usize, b as usize);
                if s + l > gend {
                    break;
                }
                k += 1;
            }
            let used_bits: u32 = bm.iter().map(|b| b.count_ones()).sum();
            let free_blocks = glen as u64 - u64::from(used_bits);
            set_bits(&mut bm, glen, BS * 8);
            let bb_csum = csum::bitmap(self.fs_seed, &bm);
            w(sink, self.block_bitmap_at[g] * BLOCK_SIZE, &bm)?;

            let used_inodes = in_use[g];
            let mut ib = vec![0u8; BS];
            let first = g * ipg as usize;
            for (k, info) in self
                .inodes
                .iter()
                .skip(first)
                .take(high[g] as usize)
                .enumerate()
            {
                if info.src != Src::Free {
                    ib[k / 8] |= 1 << (k % 8);
                }
            }
            set_bits(&mut ib, ipg as usize, BS * 8);
            let ib_csum = csum::bitmap(self.fs_seed, &ib[..(ipg / 8) as usize]);
            w(sink, self.inode_bitmap_at[g] * BLOCK_SIZE, &ib)?;

            let free_inodes = ipg - used_inodes;
            free_blocks_total += free_blocks;
            free_inodes_total += free_inodes;
            let d = &mut descs[g];
            let bb = self.block_bitmap_at[g];
            let ibm = self.inode_bitmap_at[g];
            let it = self.itable_at[g];
            d.block_bitmap_lo = U32::new(bb as u32);
            d.block_bitmap_hi = U32::new((bb >> 32) as u32);
            d.inode_bitmap_lo = U32::new(ibm as u32);
            d.inode_bitmap_hi = U32::new((ibm >> 32) as u32);
            d.inode_table_lo = U32::new(it as u32);
            d.inode_table_hi = U32::new((it >> 32) as u32);
            d.free_blocks_count_lo = U16::new(free_blocks as u16);
            d.free_blocks_count_hi = U16::new((free_blocks >> 16) as u16);
            d.free_inodes_count_lo = U16::new(free_inodes as u16);
            d.free_inodes_count_hi = U16::new((free_inodes >> 16) as u16);
            d.used_dirs_count_lo = U16::new(dirs[g] as u16);
            d.used_dirs_count_hi = U16::new((dirs[g] >> 16) as u16);
            let mut flags = BG_INODE_ZEROED;
            if used_inodes == 0 {
                flags |= BG_INODE_UNINIT;
            }
            d.flags = U16::new(flags);
            d.block_bitmap_csum_lo = U16::new(bb_csum as u16);
            d.block_bitmap_csum_hi = U16::new((bb_csum >> 16) as u16);
            d.inode_bitmap_csum_lo = U16::new(ib_csum as u16);
            d.inode_bitmap_csum_hi = U16::new((ib_csum >> 16) as u16);
            let unused = ipg - high[g];
            d.itable_unused_lo = U16::new(unused as u16);
            d.itable_unused_hi = U16::new((unused >> 16) as u16);
            let mut raw = [0u8; 64];
            raw.copy_from_slice(d.as_bytes());
            d.checksum = U16::new(csum::group_desc(self.fs_seed, g as u32, &raw));
        }

        // Descriptor blocks: one per meta group, in its first, second and last group.
        for (m, chunk) in descs.chunks(DESCS_PER_BLOCK as usize).enumerate() {
            let mut b = vec![0u8; BS];
            for (k, d) in chunk.iter().enumerate() {
                b[k * 64..(k + 1) * 64].copy_from_slice(d.as_bytes());
            }
            let first = m as u64 * DESCS_PER_BLOCK;
            for g in [first, first + 1, first + DESCS_PER_BLOCK - 1] {
                if g < self.groups && group_has_desc(g) {
                    w(sink, desc_block_in_group(g) * BLOCK_SIZE, &b)?;
                }
            }
        }

        // Superblock and its backups.
        for g in 0..self.groups {
            if !group_has_super(g) {
                continue;
            }
            let sb = self.superblock(g, free_blocks_total, free_inodes_total);
            let off = if g == 0 {
                SUPERBLOCK_OFFSET
            } else {
                g * BLOCKS_PER_GROUP * BLOCK_SIZE
            };
            w(sink, off, sb.as_bytes())?;
        }
        Ok(())
    }
}

/// The blocks of a fresh lost+found: `.` and `..` in the first, empty records in the rest.
fn lost_found_blocks(ino: u32, seed: u32) -> Vec<u8> {
    let mut out = vec![0u8; LOST_FOUND_BLOCKS as usize * BS];
    let ents: [dir::Ent; 0] = [];
    let hp = dir::HashParams {
        seed: [0; 4],
        signed: true,
    };
    if let Ok(first) = dir::render(ino, ROOT_INO, &ents, hp, seed) {
        out[..BS].copy_from_slice(&first);
    }
    for b in 1..LOST_FOUND_BLOCKS as usize {
        let blk = &mut out[b * BS..(b + 1) * BS];
        let head = DirEntryHead {
            inode: U32::new(0),
            rec_len: U16::new((BS - 12) as u16),
            name_len: 0,
            file_type: 0,
        };
        blk[..8].copy_from_slice(head.as_bytes());
        let tail = DirTail {
            rec_len: U16::new(12),
            reserved_ft: FT_DIR_CSUM,
            checksum: U32::new(csum::crc32c_raw(seed, &blk[..BS - 12])),
            ..Default::default()
        };
        blk[BS - 12..].copy_from_slice(tail.as_bytes());
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_across_epochs() {
        for (sec, nsec) in [
            (0i64, 0u32),
            (-31_536_000, 5),
            (1_700_000_000, 999_999_999),
            (4_102_444_800, 123),
            ((1 << 31) - 1, 1),
            (1 << 33, 7),
        ] {
            let t = Timestamp { sec, nsec };
            let (lo, extra) = enc_time(t);
            assert_eq!(dec_time(lo, extra), t, "{sec}");
        }
        assert_eq!(enc_time(Timestamp::from_secs(-(1 << 40))).0, 0x8000_0000);
    }
}
