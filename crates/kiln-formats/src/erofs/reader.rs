//! Reading EROFS images: super block, inodes by nid, directories, file bytes (flat, inline,
//! chunk-based and full-index LZ4 compressed), xattrs. Every offset read from the image is
//! bounds-checked; a corrupt image gives [`Error::Corrupt`] naming the offset, never a panic.

use std::io::Write;

use zerocopy::FromBytes;

use super::compact;
use super::layout::*;
use super::Error;
use crate::fstree::Timestamp;

pub use crate::io::ReadAt;

/// An xattr as (full name with its prefix, value).
pub type XattrPair = (Vec<u8>, Vec<u8>);

/// A decoded inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InodeInfo {
    /// Its nid.
    pub nid: u64,
    /// Byte offset of the inode in the image.
    pub offset: u64,
    /// 64-byte extended form.
    pub extended: bool,
    /// Data layout ([`datalayout`]).
    pub layout: u8,
    /// `st_mode`.
    pub mode: u32,
    /// Link count.
    pub nlink: u32,
    /// Size in bytes.
    pub size: u64,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time.
    pub mtime: Timestamp,
    /// Raw `i_u` (block address, rdev, compressed blocks or chunk format).
    pub i_u: u32,
    /// 32-bit inode number.
    pub ino: u32,
    /// Size of the xattr ibody in bytes.
    pub xattr_size: u64,
}

impl InodeInfo {
    /// Offset of the first byte after the inode and its xattrs.
    pub fn payload(&self) -> u64 {
        self.offset + if self.extended { 64 } else { 32 } + self.xattr_size
    }

    /// True for directories.
    pub fn is_dir(&self) -> bool {
        self.mode & 0o170000 == 0o040000
    }

    /// (major, minor) of a device inode.
    pub fn rdev(&self) -> (u32, u32) {
        decode_dev(self.i_u)
    }
}

/// One directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntryInfo {
    /// Name bytes.
    pub name: Vec<u8>,
    /// nid it names.
    pub nid: u64,
    /// [`ft`] file type.
    pub file_type: u8,
}

/// One extent of a compressed file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZExtent {
    /// Logical start.
    pub la: u64,
    /// Logical length.
    pub llen: u64,
    /// Physical byte address.
    pub pa: u64,
    /// Physical length (whole blocks).
    pub plen: u64,
    /// Stored uncompressed.
    pub plain: bool,
}

/// An opened image.
pub struct Image<R: ReadAt> {
    r: R,
    /// The super block.
    pub sb: SuperBlock,
}

impl<R: ReadAt> std::fmt::Debug for Image<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image").field("sb", &self.sb).finish()
    }
}

const MAX_XATTR_ENTRIES: usize = 1 << 16;

impl<R: ReadAt> Image<R> {
    /// Opens an image: checks the magic, block size and (if flagged) the checksum.
    pub fn open(r: R) -> Result<Self, Error> {
        let mut b0 = vec![0u8; (BLOCK - SUPER_OFFSET) as usize];
        r.read_at(SUPER_OFFSET, &mut b0)
            .map_err(|e| Error::io("reading the super block", e))?;
        let sb = SuperBlock::read_from_prefix(&b0)
            .map_err(|_| Error::corrupt(SUPER_OFFSET, "short super block"))?
            .0;
        if sb.magic.get() != MAGIC {
            return Err(Error::corrupt(
                SUPER_OFFSET,
                format!("bad magic {:#x}, expected {MAGIC:#x}", sb.magic.get()),
            ));
        }
        if sb.blkszbits != BLKSZ_BITS {
            return Err(Error::corrupt(
                SUPER_OFFSET + 12,
                format!("block size 2^{} unsupported (only 4096)", sb.blkszbits),
            ));
        }
        if sb.feature_compat.get() & FEATURE_COMPAT_SB_CHKSUM != 0 {
            let want = sb.checksum.get();
            b0[4..8].fill(0);
            let got = sb_checksum(&b0);
            if got != want {
                return Err(Error::corrupt(
                    SUPER_OFFSET + 4,
                    format!("super block checksum {want:#010x}, computed {got:#010x}"),
                ));
            }
        }
        Ok(Self { r, sb })
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.r
            .read_at(offset, buf)
            .map_err(|e| Error::corrupt(offset, e.to_string()))
    }

    /// Reads `len` bytes at `offset`. Both come from the image, so neither is trusted: the
    /// range must lie inside the filesystem the super block describes, and the buffer grows a
    /// chunk at a time as reads succeed, so a length that a short image cannot back costs at
    /// most one chunk more than the image holds.
    fn read_vec(&self, offset: u64, len: u64) -> Result<Vec<u8>, Error> {
        const CHUNK: u64 = 1 << 20;
        let end = u64::from(self.sb.blocks.get()) * BLOCK;
        if len > 1 << 30 || offset.checked_add(len).is_none_or(|e| e > end) {
            return Err(Error::corrupt(
                offset,
                format!("{len} bytes from here would lie past the {end}-byte filesystem"),
            ));
        }
        let mut v = Vec::with_capacity(len.min(CHUNK) as usize);
        while (v.len() as u64) < len {
            let at = v.len();
            let n = (len - at as u64).min(CHUNK) as usize;
            v.resize(at + n, 0);
            self.read(offset + at as u64, &mut v[at..])?;
        }
        Ok(v)
    }

    /// Byte offset of inode `nid`. A nid comes from a dirent, so it is untrusted: the inode
    /// must lie inside the filesystem (`blocks` in the super block), as the ext4 reader checks
    /// an inode number against its inode count.
    pub fn inode_offset(&self, nid: u64) -> Result<u64, Error> {
        let meta = u64::from(self.sb.meta_blkaddr.get()) * BLOCK;
        let end = u64::from(self.sb.blocks.get()) * BLOCK;
        nid.checked_mul(ISLOT)
            .and_then(|o| o.checked_add(meta))
            .filter(|o| o.checked_add(ISLOT).is_some_and(|e| e <= end))
            .ok_or_else(|| {
                Error::corrupt(
                    meta,
                    format!("nid {nid} out of range: its inode would lie past the {end}-byte filesystem"),
                )
            })
    }

    /// The root directory's inode.
    pub fn root(&self) -> Result<InodeInfo, Error> {
        self.inode(u64::from(self.sb.root_nid.get()))
    }

    /// Decodes inode `nid`.
    pub fn inode(&self, nid: u64) -> Result<InodeInfo, Error> {
        let offset = self.inode_offset(nid)?;
        let mut b = [0u8; 64];
        self.read(offset, &mut b[..32])?;
        let format = u16::from_le_bytes([b[0], b[1]]);
        let extended = format & I_VERSION_EXTENDED != 0;
        let layout = ((format >> I_DATALAYOUT_SHIFT) & 7) as u8;
        let icount = u64::from(u16::from_le_bytes([b[2], b[3]]));
        let xattr_size = if icount == 0 {
            0
        } else {
            12 + 4 * (icount - 1)
        };
        let info = if extended {
            self.read(offset + 32, &mut b[32..])?;
            let i = InodeExtended::read_from_bytes(&b[..])
                .map_err(|_| Error::corrupt(offset, "short inode"))?;
            InodeInfo {
                nid,
                offset,
                extended,
                layout,
                mode: u32::from(i.i_mode.get()),
                nlink: i.i_nlink.get(),
                size: i.i_size.get(),
                uid: i.i_uid.get(),
                gid: i.i_gid.get(),
                mtime: Timestamp {
                    sec: i.i_mtime.get() as i64,
                    nsec: i.i_mtime_nsec.get(),
                },
                i_u: i.i_u.get(),
                ino: i.i_ino.get(),
                xattr_size,
            }
        } else {
            let i = InodeCompact::read_from_bytes(&b[..32])
                .map_err(|_| Error::corrupt(offset, "short inode"))?;
            InodeInfo {
                nid,
                offset,
                extended,
                layout,
                mode: u32::from(i.i_mode.get()),
                nlink: u32::from(i.i_nlink.get()),
                size: u64::from(i.i_size.get()),
                uid: u32::from(i.i_uid.get()),
                gid: u32::from(i.i_gid.get()),
                mtime: Timestamp {
                    sec: self.sb.build_time.get() as i64,
                    nsec: self.sb.build_time_nsec.get(),
                },
                i_u: i.i_u.get(),
                ino: i.i_ino.get(),
                xattr_size,
            }
        };
        if layout > datalayout::CHUNK_BASED {
            return Err(Error::corrupt(
                offset,
                format!("unknown data layout {layout}"),
            ));
        }
        Ok(info)
    }

    /// The inode's xattrs as (full name, value), shared ones first.
    pub fn xattrs(&self, ino: &InodeInfo) -> Result<Vec<XattrPair>, Error> {
        if ino.xattr_size == 0 {
            return Ok(Vec::new());
        }
        let base = ino.offset + if ino.extended { 64 } else { 32 };
        let body = self.read_vec(base, ino.xattr_size)?;
        let shared = usize::from(body[4]);
        let mut out = Vec::new();
        let ids_end = 12 + 4 * shared;
        if ids_end > body.len() {
            return Err(Error::corrupt(base, "shared xattr ids past the xattr body"));
        }
        for k in 0..shared {
            let p = 12 + 4 * k;
            let id = u32::from_le_bytes([body[p], body[p + 1], body[p + 2], body[p + 3]]);
            let at = u64::from(self.sb.xattr_blkaddr.get()) * BLOCK + u64::from(id) * 4;
            let mut h = [0u8; 4];
            self.read(at, &mut h)?;
            let len = 4 + u64::from(h[0]) + u64::from(u16::from_le_bytes([h[2], h[3]]));
            let e = self.read_vec(at, len)?;
            out.push(parse_entry(&e, at)?.0);
        }
        let mut pos = ids_end;
        while pos < body.len() && out.len() < MAX_XATTR_ENTRIES {
            let (x, used) = parse_entry(&body[pos..], base + pos as u64)?;
            out.push(x);
            pos += used;
        }
        Ok(out)
    }

    /// Reads `buf.len()` bytes of the inode's data from `offset` (within the size).
    pub fn read_at(&self, ino: &InodeInfo, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= ino.size)
            .ok_or_else(|| {
                Error::corrupt(ino.offset, format!("read past the size of nid {}", ino.nid))
            })?;
        match ino.layout {
            datalayout::FLAT_PLAIN | datalayout::FLAT_INLINE => {
                let full = if ino.layout == datalayout::FLAT_INLINE {
                    ino.size / BLOCK * BLOCK
                } else {
                    ino.size
                };
                let base = u64::from(ino.i_u) * BLOCK;
                let split = full.clamp(offset, end);
                let (a, b) = buf.split_at_mut((split - offset) as usize);
                if !a.is_empty() {
                    self.read(base + offset, a)?;
                }
                if !b.is_empty() {
                    let tail_off = ino.payload();
                    if tail_off % BLOCK + (ino.size - full) > BLOCK {
                        return Err(Error::corrupt(
                            tail_off,
                            "inline data crosses a block boundary",
                        ));
                    }
                    self.read(tail_off + (split - full), b)?;
                }
                Ok(())
            }
            datalayout::CHUNK_BASED => {
                let format = ino.i_u as u16;
                let cbits = 12 + u32::from(format & CHUNK_FORMAT_BLKBITS_MASK);
                let unit: u64 = if format & CHUNK_FORMAT_INDEXES != 0 {
                    8
                } else {
                    4
                };
                let table = round_up(ino.payload(), unit);
                let mut pos = offset;
                let mut done = 0usize;
                while done < buf.len() {
                    let c = pos >> cbits;
                    let within = pos - (c << cbits);
                    let n = ((1u64 << cbits) - within).min((buf.len() - done) as u64) as usize;
                    let mut e = [0u8; 8];
                    self.read(table + unit * c, &mut e[..unit as usize])?;
                    let addr = if unit == 8 {
                        u32::from_le_bytes([e[4], e[5], e[6], e[7]])
                    } else {
                        u32::from_le_bytes([e[0], e[1], e[2], e[3]])
                    };
                    if addr == NULL_ADDR {
                        buf[done..done + n].fill(0);
                    } else {
                        self.read((u64::from(addr) << 12) + within, &mut buf[done..done + n])?;
                    }
                    done += n;
                    pos += n as u64;
                }
                Ok(())
            }
            datalayout::COMPRESSED_FULL | datalayout::COMPRESSED_COMPACT => {
                let exts = self.extents(ino)?;
                let mut done = 0usize;
                let mut pos = offset;
                let first = exts.partition_point(|e| e.la + e.llen <= offset);
                for e in &exts[first..] {
                    if done == buf.len() {
                        break;
                    }
                    let data = self.extent_data(e)?;
                    let s = (pos - e.la) as usize;
                    let n = (data.len() - s).min(buf.len() - done);
                    buf[done..done + n].copy_from_slice(&data[s..s + n]);
                    done += n;
                    pos += n as u64;
                }
                if done != buf.len() {
                    return Err(Error::corrupt(
                        ino.offset,
                        "compressed extents do not cover the file",
                    ));
                }
                Ok(())
            }
            l => Err(Error::corrupt(
                ino.offset,
                format!("data layout {l} is not supported by this reader"),
            )),
        }
    }

    /// Decodes the extents of a compressed inode (full or compacted indexes), and checks them the way the
    /// kernel maps them (`z_erofs_do_map_blocks`, fs/erofs/zmap.c), so that an image this
    /// reader accepts is one the kernel can read:
    /// - an offset in a logical cluster with no head after it maps to an extent that ends at
    ///   the end of that logical cluster, not at `i_size`; for a PLAIN head that length must fit
    ///   its one block (the kernel returns EFSCORRUPTED otherwise);
    /// - every NONHEAD's lookback distance leads to the head of its extent;
    /// - with big pclusters, a HEAD1's block count is in the NONHEAD right after it, and a head
    ///   right after it means one block;
    /// - a head at or past `i_size` may only mark the end of file in the last logical cluster.
    pub fn extents(&self, ino: &InodeInfo) -> Result<Vec<ZExtent>, Error> {
        let hdr_at = round_up(ino.payload(), 8);
        let h = MapHeader::read_from_bytes(&self.read_vec(hdr_at, 8)?[..])
            .map_err(|_| Error::corrupt(hdr_at, "short map header"))?;
        if h.h_clusterbits & 7 != 0 {
            return Err(Error::corrupt(hdr_at, "logical clusters other than 4 KiB"));
        }
        let big = h.h_advise.get() & ADVISE_BIG_PCLUSTER_1 != 0;
        let n = ino.size.div_ceil(BLOCK);
        if n > 1 << 28 {
            return Err(Error::corrupt(ino.offset, "implausible compressed size"));
        }
        let compacted = ino.layout == datalayout::COMPRESSED_COMPACT;
        let (first, decoded) = if compacted {
            let advise = h.h_advise.get();
            let big2 = advise & compact::ADVISE_BIG_PCLUSTER_2 != 0;
            if big != big2 {
                return Err(Error::corrupt(
                    hdr_at,
                    "compacted indexes with inconsistent big pcluster flags",
                ));
            }
            if advise & compact::ADVISE_COMPACTED_2B == 0 {
                return Err(Error::corrupt(
                    hdr_at,
                    "compacted indexes without 2-byte packs",
                ));
            }
            let ebase = hdr_at + MAP_HEADER;
            let raw = self.read_vec(ebase, compact::array_len(n as usize, ebase))?;
            let d = compact::decode(&raw, n as usize, ebase)
                .map_err(|(off, what)| Error::corrupt(ebase + off, what))?;
            (ebase, d)
        } else {
            let first = hdr_at + FULL_INDEX_HEADER;
            let raw = self.read_vec(first, 8 * n)?;
            let mut d = Vec::with_capacity(crate::io::capacity_hint(n));
            for (j, b) in raw.chunks_exact(8).enumerate() {
                d.push(
                    LclusterIndex::read_from_bytes(b)
                        .map_err(|_| Error::corrupt(first + 8 * j as u64, "short index"))?,
                );
            }
            (first, d)
        };
        // Offsets in errors: the full index, or the start of the compacted array.
        let at = |j: usize| {
            if compacted {
                first
            } else {
                first + 8 * j as u64
            }
        };
        let mut lcs = Vec::with_capacity(crate::io::capacity_hint(n));
        for (j, x) in decoded.into_iter().enumerate() {
            let t = x.di_advise.get() & 3;
            if t == 3 {
                return Err(Error::corrupt(at(j), "reserved lcluster type"));
            }
            if t != lcluster::NONHEAD && u64::from(x.di_clusterofs.get()) >= BLOCK {
                return Err(Error::corrupt(
                    at(j),
                    "cluster offset past its logical cluster",
                ));
            }
            lcs.push(x);
        }
        let is_head = |x: &LclusterIndex| x.di_advise.get() & 3 != lcluster::NONHEAD;
        // Heads in order; a head at or past the end of file only terminates the last extent.
        let mut heads = Vec::new();
        for (j, x) in lcs.iter().enumerate() {
            if !is_head(x) {
                continue;
            }
            let la = j as u64 * BLOCK + u64::from(x.di_clusterofs.get());
            if la >= ino.size && j as u64 + 1 != n {
                return Err(Error::corrupt(at(j), "extent head past the end of file"));
            }
            if la < ino.size {
                heads.push(j);
            }
        }
        if heads.first() != Some(&0) || lcs[0].di_clusterofs.get() != 0 {
            return Err(Error::corrupt(first, "first extent does not start at 0"));
        }
        // Every NONHEAD must look back to the head before it (the kernel follows delta[0]).
        let mut owner = 0usize;
        for (j, x) in lcs.iter().enumerate() {
            if is_head(x) {
                owner = j;
                continue;
            }
            let d0 = x.di_u.get() as u16;
            let back = if d0 & D0_CBLKCNT != 0 {
                if !big {
                    return Err(Error::corrupt(at(j), "block count without big pclusters"));
                }
                if j != owner + 1 {
                    return Err(Error::corrupt(at(j), "block count away from its head"));
                }
                1
            } else {
                usize::from(d0)
            };
            let mut k = j;
            let mut back = back;
            loop {
                k = k.checked_sub(back).filter(|_| back > 0).ok_or_else(|| {
                    Error::corrupt(at(j), "lookback distance leads before the file")
                })?;
                let y = &lcs[k];
                if is_head(y) {
                    break;
                }
                let d = y.di_u.get() as u16;
                back = if d & D0_CBLKCNT != 0 {
                    1
                } else {
                    usize::from(d)
                };
            }
            if k != owner {
                return Err(Error::corrupt(at(j), "lookback distance misses its head"));
            }
        }
        let mut exts = Vec::with_capacity(heads.len());
        for (i, &j) in heads.iter().enumerate() {
            let x = &lcs[j];
            let la = j as u64 * BLOCK + u64::from(x.di_clusterofs.get());
            let next = heads.get(i + 1).copied().or_else(|| {
                // The end-of-file terminator, if there is one.
                let last = n as usize - 1;
                (last > j && is_head(&lcs[last])).then_some(last)
            });
            let end = next.map_or(ino.size, |k| {
                k as u64 * BLOCK + u64::from(lcs[k].di_clusterofs.get())
            });
            let end = end.min(ino.size);
            let plain = x.di_advise.get() & 3 == lcluster::PLAIN;
            let plen = if plain || !big {
                BLOCK
            } else {
                match lcs.get(j + 1) {
                    None => {
                        return Err(Error::corrupt(
                            at(j),
                            "compressed extent in the last logical cluster: its block count \
                             would be read past the index array",
                        ))
                    }
                    Some(y) if is_head(y) => BLOCK,
                    Some(y) if y.di_u.get() as u16 & D0_CBLKCNT != 0 => {
                        u64::from(y.di_u.get() as u16 & !D0_CBLKCNT) * BLOCK
                    }
                    Some(_) => {
                        return Err(Error::corrupt(at(j + 1), "no block count after a head"))
                    }
                }
            };
            if plain {
                // The kernel's m_llen for the extent's last logical cluster: up to the next
                // head when that head sits in the same logical cluster, else to its end.
                let last_lc = (end - 1) / BLOCK;
                let kernel_end = match next {
                    Some(k) if k as u64 == last_lc => end,
                    _ => (last_lc + 1) * BLOCK,
                };
                if kernel_end - la > plen {
                    return Err(Error::corrupt(
                        at(j),
                        format!(
                            "plain extent at {la} maps to {} bytes in the kernel, more than \
                             its {plen}-byte block",
                            kernel_end - la
                        ),
                    ));
                }
            }
            exts.push(ZExtent {
                la,
                llen: end - la,
                pa: u64::from(x.di_u.get()) * BLOCK,
                plen,
                plain,
            });
        }
        Ok(exts)
    }

    fn extent_data(&self, e: &ZExtent) -> Result<Vec<u8>, Error> {
        if e.llen > 16 << 20 || e.plen > PCLUSTER_MAX_SIZE {
            return Err(Error::corrupt(e.pa, "extent too large"));
        }
        let src = self.read_vec(e.pa, e.plen)?;
        if e.plain {
            if e.llen > BLOCK {
                return Err(Error::corrupt(e.pa, "plain extent longer than a block"));
            }
            return Ok(src[..e.llen as usize].to_vec());
        }
        // Zero padding in front (LZ4_0PADDING), less than one block.
        let skip = src
            .iter()
            .take(BLOCK as usize)
            .take_while(|&&b| b == 0)
            .count();
        crate::lz4::decompress(&src[skip..], e.llen as usize)
            .map_err(|err| Error::corrupt(e.pa, err.to_string()))
    }

    /// Streams all of the inode's data into `w`.
    pub fn copy_to(&self, ino: &InodeInfo, w: &mut dyn Write) -> Result<(), Error> {
        if datalayout::is_compressed(ino.layout) {
            for e in self.extents(ino)? {
                w.write_all(&self.extent_data(&e)?)
                    .map_err(|err| Error::io("writing file data", err))?;
            }
            return Ok(());
        }
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = 0;
        while pos < ino.size {
            let n = (ino.size - pos).min(buf.len() as u64) as usize;
            self.read_at(ino, pos, &mut buf[..n])?;
            w.write_all(&buf[..n])
                .map_err(|err| Error::io("writing file data", err))?;
            pos += n as u64;
        }
        Ok(())
    }

    /// All of a (small) inode's data.
    pub fn read_all(&self, ino: &InodeInfo) -> Result<Vec<u8>, Error> {
        if ino.size > 1 << 30 {
            return Err(Error::corrupt(
                ino.offset,
                "file too large to read into memory",
            ));
        }
        let mut v = Vec::with_capacity(crate::io::capacity_hint(ino.size));
        self.copy_to(ino, &mut v)?;
        Ok(v)
    }

    /// Entries of a directory, in on-disk order (including `.` and `..`).
    pub fn read_dir(&self, ino: &InodeInfo) -> Result<Vec<DirEntryInfo>, Error> {
        if !ino.is_dir() {
            return Err(Error::corrupt(
                ino.offset,
                format!("nid {} is not a directory", ino.nid),
            ));
        }
        let data = self.read_all(ino)?;
        let mut out = Vec::new();
        for (b, blk) in data.chunks(BLOCK as usize).enumerate() {
            let at = ino.offset + b as u64 * BLOCK;
            if blk.len() < 12 {
                return Err(Error::corrupt(at, "directory block shorter than one entry"));
            }
            let first = usize::from(u16::from_le_bytes([blk[8], blk[9]]));
            if first < 12 || first % 12 != 0 || first > blk.len() {
                return Err(Error::corrupt(at, format!("bad first name offset {first}")));
            }
            let count = first / 12;
            for i in 0..count {
                let d = &blk[12 * i..12 * i + 12];
                let nid = u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
                let start = usize::from(u16::from_le_bytes([d[8], d[9]]));
                let end = if i + 1 < count {
                    usize::from(u16::from_le_bytes([blk[12 * i + 20], blk[12 * i + 21]]))
                } else {
                    let rest = blk.get(start..).unwrap_or(&[]);
                    start + rest.iter().position(|&c| c == 0).unwrap_or(rest.len())
                };
                let name = blk
                    .get(start..end)
                    .filter(|n| !n.is_empty() && n.len() <= NAME_LEN)
                    .ok_or_else(|| Error::corrupt(at + 12 * i as u64, "bad name offsets"))?;
                out.push(DirEntryInfo {
                    name: name.to_vec(),
                    nid,
                    file_type: d[10],
                });
            }
        }
        Ok(out)
    }

    /// Looks up `name` in a directory (binary search over the sorted entries).
    pub fn lookup_in(&self, dir: &InodeInfo, name: &[u8]) -> Result<Option<u64>, Error> {
        let ents = self.read_dir(dir)?;
        Ok(ents
            .binary_search_by(|e| e.name.as_slice().cmp(name))
            .ok()
            .map(|i| ents[i].nid))
    }

    /// Resolves a `/`-separated path from the root (no symlinks followed).
    pub fn lookup(&self, path: &[u8]) -> Result<InodeInfo, Error> {
        let mut cur = self.root()?;
        for c in path
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty() && *c != b".")
        {
            let nid = self
                .lookup_in(&cur, c)?
                .ok_or_else(|| Error::NotFound(String::from_utf8_lossy(path).into_owned()))?;
            cur = self.inode(nid)?;
        }
        Ok(cur)
    }

    /// The underlying bytes.
    pub fn source(&self) -> &R {
        &self.r
    }
}

fn parse_entry(b: &[u8], at: u64) -> Result<(XattrPair, usize), Error> {
    let h = b
        .get(..4)
        .ok_or_else(|| Error::corrupt(at, "truncated xattr entry"))?;
    let nlen = usize::from(h[0]);
    let idx = h[1];
    let vlen = usize::from(u16::from_le_bytes([h[2], h[3]]));
    let body = b
        .get(4..4 + nlen + vlen)
        .ok_or_else(|| Error::corrupt(at, "xattr entry runs past its area"))?;
    let prefix: &[u8] = XATTR_PREFIXES
        .iter()
        .find(|(i, _)| *i == idx)
        .map(|(_, p)| *p)
        .ok_or_else(|| Error::corrupt(at, format!("unknown xattr name index {idx}")))?;
    let mut name = prefix.to_vec();
    name.extend_from_slice(&body[..nlen]);
    Ok((
        (name, body[nlen..].to_vec()),
        round_up((4 + nlen + vlen) as u64, 4) as usize,
    ))
}
