//! Reading ext4 images with 4 KiB blocks: superblock, group descriptors (classic and
//! meta_bg layouts), inodes by number, extent trees, directories (linear and htree lookups),
//! extended attributes and file contents. Checksums are verified where metadata_csum is on.
//! Every offset and length read from the image is checked; malformed images give
//! [`Error::Corrupt`] naming the byte offset, never a panic.

use zerocopy::FromBytes;

use super::alloc::desc_block_in_group;
use super::csum;
use super::extent::Ext;
use super::hash::{half_md4, seed_words};
use super::layout::*;
use super::write::dec_time;
use super::xattr;
use super::{Error, Result};
use crate::fstree::Timestamp;

pub use crate::io::{ReadAt, SinkReader};

/// A directory entry as read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// Name bytes.
    pub name: Vec<u8>,
    /// Inode number.
    pub ino: u32,
    /// `FT_*` file type.
    pub file_type: u8,
}

/// An opened image.
pub struct Reader<R: ReadAt> {
    r: R,
    sb: Superblock,
    descs: Vec<GroupDesc>,
    fs_seed: u32,
    csum: bool,
}

fn corrupt(offset: u64, msg: impl Into<String>) -> Error {
    Error::Corrupt {
        offset,
        msg: msg.into(),
    }
}

impl<R: ReadAt> Reader<R> {
    /// Opens an image: reads and checks the superblock and the group descriptors.
    pub fn open(r: R) -> Result<Self> {
        let mut raw = [0u8; 1024];
        read(&r, SUPERBLOCK_OFFSET, &mut raw)?;
        let sb = Superblock::read_from_bytes(&raw)
            .map_err(|_| corrupt(SUPERBLOCK_OFFSET, "short superblock"))?;
        if sb.magic.get() != EXT4_MAGIC {
            return Err(corrupt(
                SUPERBLOCK_OFFSET + 0x38,
                format!("bad magic {:#06x}", sb.magic.get()),
            ));
        }
        if sb.log_block_size.get() != 2 {
            return Err(corrupt(
                SUPERBLOCK_OFFSET + 0x18,
                "only 4096-byte blocks are supported",
            ));
        }
        let csum_on = sb.feature_ro_compat.get() & RO_COMPAT_METADATA_CSUM != 0;
        if csum_on && csum::superblock(&raw) != sb.checksum.get() {
            return Err(corrupt(
                SUPERBLOCK_OFFSET + 0x3FC,
                "superblock checksum mismatch",
            ));
        }
        let bpg = u64::from(sb.blocks_per_group.get());
        let ipg = sb.inodes_per_group.get();
        if bpg == 0 || bpg > BLOCKS_PER_GROUP || ipg == 0 || ipg > MAX_INODES_PER_GROUP {
            return Err(corrupt(
                SUPERBLOCK_OFFSET + 0x20,
                "bad blocks or inodes per group",
            ));
        }
        if sb.inode_size.get() < 128 || usize::from(sb.inode_size.get()) > BS {
            return Err(corrupt(SUPERBLOCK_OFFSET + 0x58, "bad inode size"));
        }
        let blocks = join(sb.blocks_count_lo.get(), sb.blocks_count_hi.get());
        let first = u64::from(sb.first_data_block.get());
        let groups = blocks.saturating_sub(first).div_ceil(bpg);
        let is64 = sb.feature_incompat.get() & INCOMPAT_64BIT != 0;
        let dsize = if is64 {
            usize::from(sb.desc_size.get())
        } else {
            32
        };
        if !(32..=BS).contains(&dsize) || !dsize.is_power_of_two() {
            return Err(corrupt(SUPERBLOCK_OFFSET + 0xFE, "bad descriptor size"));
        }
        if groups > (1 << 32) {
            return Err(corrupt(SUPERBLOCK_OFFSET + 4, "absurd block count"));
        }
        let per_block = (BS / dsize) as u64;
        let meta_bg = sb.feature_incompat.get() & INCOMPAT_META_BG != 0;
        let first_meta = u64::from(sb.first_meta_bg.get());
        let fs_seed = csum::fs_seed(&sb.uuid);
        let mut descs = Vec::with_capacity(crate::io::capacity_hint(groups));
        let mut block = vec![0u8; BS];
        for b in 0..groups.div_ceil(per_block) {
            let loc = if meta_bg && b >= first_meta {
                if per_block != DESCS_PER_BLOCK {
                    return Err(corrupt(
                        SUPERBLOCK_OFFSET + 0xFE,
                        "meta_bg needs 64-byte descriptors here",
                    ));
                }
                desc_block_in_group(b * per_block)
            } else {
                first + 1 + b
            };
            read(&r, loc * BLOCK_SIZE, &mut block)?;
            for k in 0..per_block {
                let g = b * per_block + k;
                if g >= groups {
                    break;
                }
                let at = k as usize * dsize;
                let mut d64 = [0u8; 64];
                d64[..dsize.min(64)].copy_from_slice(&block[at..at + dsize.min(64)]);
                let d = GroupDesc::read_from_bytes(&d64)
                    .map_err(|_| corrupt(loc * BLOCK_SIZE, "short descriptor"))?;
                if csum_on
                    && dsize == 64
                    && csum::group_desc(fs_seed, g as u32, &d64) != d.checksum.get()
                {
                    return Err(corrupt(
                        loc * BLOCK_SIZE + at as u64,
                        format!("group {g} descriptor checksum mismatch"),
                    ));
                }
                descs.push(d);
            }
        }
        Ok(Self {
            r,
            sb,
            descs,
            fs_seed,
            csum: csum_on,
        })
    }

    /// The superblock.
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// Group descriptors.
    pub fn groups(&self) -> &[GroupDesc] {
        &self.descs
    }

    /// The checksum seed (crc32c of the UUID).
    pub fn checksum_seed(&self) -> u32 {
        self.fs_seed
    }

    /// Total blocks.
    pub fn blocks(&self) -> u64 {
        join(self.sb.blocks_count_lo.get(), self.sb.blocks_count_hi.get())
    }

    /// Byte offset of inode `ino`'s record.
    pub fn inode_offset(&self, ino: u32) -> Result<u64> {
        let ipg = self.sb.inodes_per_group.get();
        if ino == 0 || ino > self.sb.inodes_count.get() {
            return Err(corrupt(0, format!("inode {ino} out of range")));
        }
        let g = (ino - 1) / ipg;
        let i = (ino - 1) % ipg;
        let d = self
            .descs
            .get(g as usize)
            .ok_or_else(|| corrupt(0, format!("inode {ino}: group {g} has no descriptor")))?;
        // The inode table is a 64-bit block number in a 64-bit descriptor: it must lie in the
        // filesystem before its byte offset is worked out.
        let table = d.inode_table();
        if table >= self.blocks() {
            return Err(corrupt(
                0,
                format!("inode {ino}: group {g}'s inode table at block {table} is past the end"),
            ));
        }
        Ok(table * BLOCK_SIZE + u64::from(i) * u64::from(self.sb.inode_size.get()))
    }

    /// The raw 256 bytes of inode `ino` (checksum verified).
    pub fn inode_raw(&self, ino: u32) -> Result<[u8; 256]> {
        let off = self.inode_offset(ino)?;
        let mut raw = [0u8; 256];
        let n = usize::from(self.sb.inode_size.get()).min(256);
        read(&self.r, off, &mut raw[..n])?;
        if self.csum
            && n == 256
            && raw.iter().any(|&b| b != 0)
            && csum::inode(self.fs_seed, ino, &raw) != csum::stored_inode(&raw)
        {
            return Err(corrupt(off, format!("inode {ino} checksum mismatch")));
        }
        Ok(raw)
    }

    /// Inode `ino`.
    pub fn inode(&self, ino: u32) -> Result<Inode> {
        let raw = self.inode_raw(ino)?;
        Inode::read_from_bytes(&raw).map_err(|_| corrupt(0, "short inode"))
    }

    /// Mapped extents of an inode, in logical order (tree blocks walked and verified).
    pub fn extents(&self, ino: u32, inode: &Inode) -> Result<Vec<Ext>> {
        if inode.flags.get() & INODE_EXTENTS_FL == 0 {
            return Ok(Vec::new());
        }
        let seed = csum::inode_seed(self.fs_seed, ino, inode.generation.get());
        let mut out = Vec::new();
        self.walk_node(&inode.block, 4, seed, None, &mut out, 0)?;
        Ok(out)
    }

    fn walk_node(
        &self,
        node: &[u8],
        max_entries: usize,
        seed: u32,
        at: Option<u64>,
        out: &mut Vec<Ext>,
        depth_guard: u32,
    ) -> Result<()> {
        let off = at.unwrap_or(0);
        if depth_guard > 5 {
            return Err(corrupt(off, "extent tree deeper than 5 levels"));
        }
        let h = ExtentHeader::read_from_bytes(&node[..12])
            .map_err(|_| corrupt(off, "short extent header"))?;
        if h.magic.get() != EXTENT_MAGIC {
            return Err(corrupt(off, "bad extent header magic"));
        }
        let n = usize::from(h.entries.get());
        if n > usize::from(h.max.get()) || n > max_entries {
            return Err(corrupt(off, "extent node has more entries than room"));
        }
        if let Some(blk) = at {
            if self.csum {
                let tail = 12 + 12 * usize::from(h.max.get());
                if tail + 4 <= BS {
                    let want = u32::from_le_bytes([
                        node[tail],
                        node[tail + 1],
                        node[tail + 2],
                        node[tail + 3],
                    ]);
                    if csum::crc32c_raw(seed, &node[..tail]) != want {
                        return Err(corrupt(blk, "extent block checksum mismatch"));
                    }
                }
            }
        }
        for k in 0..n {
            let e = &node[12 + 12 * k..24 + 12 * k];
            if h.depth.get() == 0 {
                let raw = Extent::read_from_bytes(e).map_err(|_| corrupt(off, "short extent"))?;
                out.push(Ext::from_raw(&raw));
            } else {
                let idx = ExtentIdx::read_from_bytes(e).map_err(|_| corrupt(off, "short index"))?;
                let child = u64::from(idx.leaf_lo.get()) | u64::from(idx.leaf_hi.get()) << 32;
                if child >= self.blocks() {
                    return Err(corrupt(
                        off,
                        format!("extent index points past the end (block {child})"),
                    ));
                }
                let mut b = vec![0u8; BS];
                read(&self.r, child * BLOCK_SIZE, &mut b)?;
                self.walk_node(
                    &b,
                    EXTENTS_PER_BLOCK,
                    seed,
                    Some(child * BLOCK_SIZE),
                    out,
                    depth_guard + 1,
                )?;
            }
        }
        Ok(())
    }

    /// Reads an inode's contents (files, directories, slow symlinks); holes and unwritten
    /// extents read as zeroes.
    pub fn read_data(&self, ino: u32) -> Result<Vec<u8>> {
        let inode = self.inode(ino)?;
        let size = inode.size();
        let len =
            usize::try_from(size).map_err(|_| corrupt(0, "file too large to read into memory"))?;
        if len > 1 << 31 {
            return Err(corrupt(
                0,
                format!("inode {ino}: {size} bytes is too large to read into memory"),
            ));
        }
        let mut out = vec![0u8; len];
        for e in self.extents(ino, &inode)? {
            if e.unwritten {
                continue;
            }
            let from = u64::from(e.lblk) * BLOCK_SIZE;
            if from >= size {
                continue;
            }
            let to = (from + u64::from(e.len) * BLOCK_SIZE).min(size);
            if e.pblk + u64::from(e.len) > self.blocks() {
                return Err(corrupt(
                    0,
                    format!("inode {ino}: extent past the end of the filesystem"),
                ));
            }
            read(
                &self.r,
                e.pblk * BLOCK_SIZE,
                &mut out[from as usize..to as usize],
            )?;
        }
        Ok(out)
    }

    /// A symlink's target.
    pub fn symlink_target(&self, ino: u32) -> Result<Vec<u8>> {
        let inode = self.inode(ino)?;
        let size = inode.size() as usize;
        if inode.flags.get() & INODE_EXTENTS_FL == 0 {
            return inode.block.get(..size).map(<[u8]>::to_vec).ok_or_else(|| {
                corrupt(0, format!("inode {ino}: fast symlink longer than 60 bytes"))
            });
        }
        self.read_data(ino)
    }

    /// All entries of directory `ino` (including `.` and `..`), in on-disk order.
    pub fn dir_entries(&self, ino: u32) -> Result<Vec<DirEntry>> {
        let data = self.read_data(ino)?;
        let mut out = Vec::new();
        for (b, block) in data.chunks(BS).enumerate() {
            parse_block(block, &mut out).map_err(|at| {
                corrupt(
                    0,
                    format!("directory inode {ino}, block {b}, byte {at}: bad entry"),
                )
            })?;
        }
        Ok(out)
    }

    /// Looks `name` up in directory `dir`, through the htree index when there is one.
    pub fn lookup(&self, dir: u32, name: &[u8]) -> Result<Option<u32>> {
        let inode = self.inode(dir)?;
        if inode.flags.get() & INODE_INDEX_FL == 0 {
            return Ok(self
                .dir_entries(dir)?
                .into_iter()
                .find(|e| e.name == name)
                .map(|e| e.ino));
        }
        let exts = self.extents(dir, &inode)?;
        let block_of = |l: u32| -> Result<Vec<u8>> {
            let e = exts
                .iter()
                .find(|e| l >= e.lblk && u64::from(l) < u64::from(e.lblk) + u64::from(e.len))
                .ok_or_else(|| {
                    corrupt(0, format!("directory {dir}: logical block {l} unmapped"))
                })?;
            let mut b = vec![0u8; BS];
            read(
                &self.r,
                (e.pblk + u64::from(l - e.lblk)) * BLOCK_SIZE,
                &mut b,
            )?;
            Ok(b)
        };
        let root = block_of(0)?;
        let info = DxRoot::read_from_bytes(&root[..40]).map_err(|_| corrupt(0, "short dx root"))?;
        let signed = self.sb.flags.get() & FLAGS_SIGNED_HASH != 0;
        let (hash, _) = half_md4(name, &seed_words(&self.sb.hash_seed), signed);
        // The index entries of a dx block: (hash as stored, child block); the first entry's
        // hash slot holds count/limit and stands for "everything below the second".
        let entries = |block: &[u8], at: usize| -> Result<Vec<(u32, u32)>> {
            let word =
                |p: usize| u32::from_le_bytes([block[p], block[p + 1], block[p + 2], block[p + 3]]);
            let count = usize::from(u16::from_le_bytes([block[at + 2], block[at + 3]]));
            if count == 0 || at + count * 8 > BS {
                return Err(corrupt(0, format!("directory {dir}: bad dx count")));
            }
            Ok((0..count)
                .map(|k| {
                    (
                        if k == 0 { 0 } else { word(at + k * 8) },
                        word(at + k * 8 + 4),
                    )
                })
                .collect())
        };
        let mut leaves = entries(&root, 32)?;
        if info.indirect_levels > 1 {
            return Err(corrupt(
                0,
                format!("directory {dir}: more than 2 htree levels"),
            ));
        }
        if info.indirect_levels == 1 {
            let mut flat = Vec::new();
            for (_, node) in leaves {
                flat.extend(entries(&block_of(node)?, 8)?);
            }
            leaves = flat;
        }
        // The leaf whose range holds `hash` (stored hashes compare with their continuation
        // bit, as the kernel's probe does), then following leaves while they continue it.
        let start = leaves.iter().rposition(|&(h, _)| h <= hash).unwrap_or(0);
        let mut k = start;
        loop {
            let mut ents = Vec::new();
            parse_block(&block_of(leaves[k].1)?, &mut ents)
                .map_err(|at| corrupt(0, format!("directory {dir}: bad leaf entry at {at}")))?;
            if let Some(e) = ents.iter().find(|e| e.name == name) {
                return Ok(Some(e.ino));
            }
            k += 1;
            match leaves.get(k) {
                Some(&(h, _)) if h & 1 == 1 && h & !1 == hash => continue,
                _ => break,
            }
        }
        Ok(None)
    }

    /// Resolves a `/`-separated path from the root (no symlinks followed).
    pub fn resolve(&self, path: &[u8]) -> Result<Option<u32>> {
        let mut cur = ROOT_INO;
        for c in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            match self.lookup(cur, c)? {
                Some(i) => cur = i,
                None => return Ok(None),
            }
        }
        Ok(Some(cur))
    }

    /// Extended attributes of `ino` with full names, values in VFS form (ACLs converted back).
    pub fn xattrs(&self, ino: u32) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let raw = self.inode_raw(ino)?;
        let inode = Inode::read_from_bytes(&raw).map_err(|_| corrupt(0, "short inode"))?;
        let mut attrs = Vec::new();
        let start = 128 + usize::from(inode.extra_isize.get());
        if start + 4 <= 256 && raw[start..start + 4] == XATTR_MAGIC.to_le_bytes() {
            attrs.extend(
                xattr::parse(&raw[start..], 4, 4)
                    .ok_or_else(|| corrupt(0, format!("inode {ino}: bad in-inode xattrs")))?,
            );
        }
        let blk = inode.file_acl();
        if blk != 0 {
            let mut b = vec![0u8; BS];
            read(&self.r, blk * BLOCK_SIZE, &mut b)?;
            if b[..4] != XATTR_MAGIC.to_le_bytes() {
                return Err(corrupt(blk * BLOCK_SIZE, "bad xattr block magic"));
            }
            if self.csum {
                let want = u32::from_le_bytes([b[16], b[17], b[18], b[19]]);
                if csum::xattr_block(self.fs_seed, blk, &b) != want {
                    return Err(corrupt(blk * BLOCK_SIZE, "xattr block checksum mismatch"));
                }
            }
            attrs.extend(
                xattr::parse(&b, 32, 0)
                    .ok_or_else(|| corrupt(blk * BLOCK_SIZE, "bad xattr block entries"))?,
            );
        }
        let mut out: Vec<(Vec<u8>, Vec<u8>)> = attrs
            .into_iter()
            .map(|a| {
                let name = xattr::join_name(a.index, &a.name);
                let value = match a.index {
                    XATTR_INDEX_POSIX_ACL_ACCESS | XATTR_INDEX_POSIX_ACL_DEFAULT => {
                        xattr::acl_from_disk(&a.value).unwrap_or_else(|| a.value.to_vec())
                    }
                    _ => a.value.to_vec(),
                };
                (name, value)
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Modification time of an inode.
    pub fn mtime(inode: &Inode) -> Timestamp {
        dec_time(inode.mtime.get(), inode.mtime_extra.get())
    }
}

fn read<R: ReadAt + ?Sized>(r: &R, offset: u64, buf: &mut [u8]) -> Result<()> {
    r.read_at(offset, buf)
        .map_err(|source| Error::ReadImage { offset, source })
}

/// Parses the live entries of one directory block; `Err(byte)` on a malformed record.
fn parse_block(block: &[u8], out: &mut Vec<DirEntry>) -> std::result::Result<(), usize> {
    let mut p = 0usize;
    while p + 8 <= block.len() {
        let h = DirEntryHead::read_from_bytes(&block[p..p + 8]).map_err(|_| p)?;
        let rec = usize::from(h.rec_len.get());
        if rec < 8 || rec % 4 != 0 || p + rec > block.len() {
            return Err(p);
        }
        let n = usize::from(h.name_len);
        if h.inode.get() != 0 && h.file_type != FT_DIR_CSUM {
            let name = block.get(p + 8..p + 8 + n).ok_or(p)?;
            if 8 + n > rec {
                return Err(p);
            }
            out.push(DirEntry {
                name: name.to_vec(),
                ino: h.inode.get(),
                file_type: h.file_type,
            });
        }
        p += rec;
    }
    Ok(())
}
