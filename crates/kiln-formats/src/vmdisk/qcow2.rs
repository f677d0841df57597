//! qcow2 version 3, as QEMU's `docs/interop/qcow2.txt` specifies it: big-endian header in
//! cluster 0, a two-level cluster map (L1 table → L2 tables) and a two-level refcount structure
//! (refcount table → refcount blocks).
//!
//! Layout kiln writes (64 KiB clusters, 16-bit refcounts, no snapshots, no backing file):
//! the header cluster, then the data clusters in guest order (all-zero clusters are left
//! unallocated: their L2 entry is 0, which reads as zeroes without a backing file), then the
//! L2 tables, the L1 table, the refcount table and the refcount blocks. Data first lets
//! compressed clusters be packed back to back as they come; the header is written last.
//!
//! Compressed clusters ("Compressed Clusters Descriptor", x = 62 - (cluster_bits - 8) = 54):
//! bits 0..54 hold the byte offset of the data, bits 54..62 the number of 512-byte sectors the
//! data occupies beyond the one holding its first byte, bit 62 marks the entry compressed and
//! bit 63 (COPIED) stays clear. zlib data is a raw deflate stream with a 4 KiB window (QEMU
//! inflates with `windowBits = -12`, so a longer back-reference would fail there); zstd data is
//! one frame (compression type 1, incompatible feature bit 3). Every host cluster a compressed
//! cluster touches is counted once per compressed cluster in its refcount; standard clusters
//! and metadata have refcount 1 and their L1/L2 entries carry COPIED.

use std::io::{Read, Seek, Write};

use zerocopy::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::{corrupt, Compression, Error, Out, Piece, Plan, Raw, Result, VirtualDisk};
use crate::io::ReadAt;

/// `QFI\xfb`.
pub const MAGIC: &[u8; 4] = b"QFI\xfb";
/// log2 of the cluster size kiln writes (64 KiB, QEMU's default).
pub const CLUSTER_BITS: u32 = 16;
const CS: u64 = 1 << CLUSTER_BITS;
/// Header length kiln writes: through `compression_type` (byte 104), padded to 8.
const HEADER_LEN: u32 = 112;
/// Bit 62 of an L2 entry: compressed cluster.
pub const L2_COMPRESSED: u64 = 1 << 62;
/// Bit 63 of an L1/L2 entry: refcount is exactly one.
pub const COPIED: u64 = 1 << 63;
/// Bits 9..56: a cluster-aligned host offset in L1/L2/refcount table entries.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Incompatible feature bit 3: `compression_type` is non-zero.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 0: dirty (refcounts may be stale).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Compression types (header byte 104).
pub const COMPRESSION_ZLIB: u8 = 0;
/// zstd.
pub const COMPRESSION_ZSTD: u8 = 1;
/// refcount_order 4: 16-bit refcounts.
const REFCOUNT_ORDER: u32 = 4;

/// The qcow2 v3 header with the compression type field (112 bytes).
#[derive(Clone, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Header {
    /// `QFI\xfb`.
    pub magic: [u8; 4],
    /// 2 or 3.
    pub version: U32,
    /// Offset of the backing file name; 0 without one.
    pub backing_file_offset: U64,
    /// Length of the backing file name.
    pub backing_file_size: U32,
    /// log2 of the cluster size in bytes.
    pub cluster_bits: U32,
    /// Virtual disk size in bytes.
    pub size: U64,
    /// 0: no encryption.
    pub crypt_method: U32,
    /// Entries in the L1 table.
    pub l1_size: U32,
    /// Byte offset of the L1 table (cluster aligned).
    pub l1_table_offset: U64,
    /// Byte offset of the refcount table (cluster aligned).
    pub refcount_table_offset: U64,
    /// Clusters the refcount table occupies.
    pub refcount_table_clusters: U32,
    /// Internal snapshots.
    pub nb_snapshots: U32,
    /// Byte offset of the snapshot table.
    pub snapshots_offset: U64,
    /// Bits a reader must understand (v3).
    pub incompatible_features: U64,
    /// Bits a reader may ignore (v3).
    pub compatible_features: U64,
    /// Bits a writer must clear if it does not know them (v3).
    pub autoclear_features: U64,
    /// log2 of the refcount width in bits (v3).
    pub refcount_order: U32,
    /// Length of this header in bytes (v3).
    pub header_length: U32,
    /// Compression type of compressed clusters (when `header_length > 104`).
    pub compression_type: u8,
    /// Padding to a multiple of 8.
    pub pad: [u8; 7],
}

const _: () = assert!(size_of::<Header>() == HEADER_LEN as usize);
const _: () = assert!(std::mem::offset_of!(Header, incompatible_features) == 72);
const _: () = assert!(std::mem::offset_of!(Header, header_length) == 100);
const _: () = assert!(std::mem::offset_of!(Header, compression_type) == 104);

/// Options of the writer.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Compress clusters (a cluster that does not shrink is stored as it is).
    pub compression: Option<Compression>,
}

/// What the writer produced.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// Bytes written.
    pub file_size: u64,
    /// Guest clusters stored uncompressed.
    pub clusters: u64,
    /// Guest clusters stored compressed.
    pub compressed: u64,
}

/// Raw deflate with a 4 KiB window, as QEMU inflates it (`windowBits = -12`), at
/// [`super::DEFLATE_LEVEL`].
fn deflate_4k(data: &[u8]) -> Option<Vec<u8>> {
    let level = flate2::Compression::new(super::DEFLATE_LEVEL);
    let mut c = flate2::Compress::new_with_window_bits(level, false, 12);
    let mut out = Vec::with_capacity(data.len());
    match c.compress_vec(data, &mut out, flate2::FlushCompress::Finish) {
        Ok(flate2::Status::StreamEnd) => Some(out),
        _ => None, // did not fit in data.len() bytes: store it uncompressed
    }
}

pub(crate) fn compress(kind: Compression, data: &[u8]) -> Option<Vec<u8>> {
    let out = match kind {
        Compression::Zlib => deflate_4k(data)?,
        Compression::Zstd => zstd::bulk::compress(data, 3).ok()?,
    };
    (out.len() < data.len()).then_some(out)
}

/// One guest cluster as stored.
enum Stored {
    Plain(Vec<u8>),
    Packed(Vec<u8>),
}

/// The unused tails of host clusters that compressed data had partly filled when an
/// uncompressed cluster (which must start on a cluster boundary) came next. Later compressed
/// clusters that fit go there, first fit, so a mix of compressible and incompressible data
/// wastes no more than the last tails (QEMU reuses its one open tail the same way).
#[derive(Default)]
struct Gaps(Vec<(u64, u64)>);

impl Gaps {
    /// The most tails kept; when full, the smallest one is forgotten.
    const MAX: usize = 32;

    fn add(&mut self, start: u64, end: u64) {
        if end <= start {
            return;
        }
        if self.0.len() == Self::MAX {
            let (i, _) = (self.0.iter().enumerate())
                .min_by_key(|(_, (s, e))| e - s)
                .expect("MAX > 0");
            if self.0[i].1 - self.0[i].0 >= end - start {
                return;
            }
            self.0.swap_remove(i);
        }
        self.0.push((start, end));
    }

    /// The start of `len` bytes in the first tail that holds them.
    fn take(&mut self, len: u64) -> Option<u64> {
        let i = self.0.iter().position(|(s, e)| e - s >= len)?;
        let start = self.0[i].0;
        self.0[i].0 += len;
        if self.0[i].0 == self.0[i].1 {
            self.0.remove(i);
        }
        Some(start)
    }
}

/// Refcounts of host clusters, indexed by host cluster.
struct Refs(Vec<u16>);

impl Refs {
    /// One more reference to host cluster `cluster`.
    fn bump(&mut self, cluster: u64) -> Result<()> {
        let c = cluster as usize;
        if self.0.len() <= c {
            self.0.resize(c + 1, 0);
        }
        self.0[c] = self.0[c].checked_add(1).ok_or_else(|| {
            corrupt(
                "qcow2",
                cluster * CS,
                "more than 65535 references to one cluster",
            )
        })?;
        Ok(())
    }
}

/// The guest-cluster count and L1 size of a `size`-byte disk.
fn geometry(size: u64) -> Result<(u64, u64)> {
    let guest_clusters = size.div_ceil(CS);
    let l1_size = guest_clusters.div_ceil(CS / 8);
    if l1_size > u64::from(u32::MAX) / 8 {
        return Err(Error::Unsupported {
            format: "qcow2",
            what: format!("a {size}-byte disk"),
        });
    }
    Ok((guest_clusters, l1_size))
}

/// What follows the data clusters, and the header.
struct Tables {
    /// The L2 tables, the L1 table, the refcount table and the refcount blocks, back to back
    /// from the cluster-aligned end of the data.
    tail: Vec<Vec<u8>>,
    /// The header and the end of the header extension area, for byte 0.
    header: Vec<u8>,
}

/// Lays out the metadata after data that ends at the cluster boundary `data_end`: `l2` has
/// one entry per guest cluster and `refs` counts every cluster up to `data_end`.
fn tables(
    l2: Vec<u64>,
    mut refs: Refs,
    data_end: u64,
    size: u64,
    comp: Option<Compression>,
) -> Result<Tables> {
    let (_, l1_size) = geometry(size)?;
    let l2_entries = (CS / 8) as usize;
    let mut tail = Vec::new();
    let mut pos = data_end;

    // L2 tables: one per 8192 guest clusters that has any allocated entry.
    let mut l1: Vec<u64> = vec![0; l1_size as usize];
    for (i, table) in l2.chunks(l2_entries).enumerate() {
        if table.iter().all(|&e| e == 0) {
            continue;
        }
        l1[i] = pos | COPIED;
        refs.bump(pos / CS)?;
        let mut bytes = Vec::with_capacity(CS as usize);
        for e in table {
            bytes.extend_from_slice(&e.to_be_bytes());
        }
        bytes.resize(CS as usize, 0);
        tail.push(bytes);
        pos += CS;
    }
    drop(l2);

    // The L1 table.
    let l1_offset = pos;
    let mut l1_bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
    let l1_clusters = (l1_bytes.len() as u64).div_ceil(CS).max(1);
    for c in 0..l1_clusters {
        refs.bump(l1_offset / CS + c)?;
    }
    l1_bytes.resize((l1_clusters * CS) as usize, 0);
    tail.push(l1_bytes);
    pos += l1_clusters * CS;

    // Refcount table and blocks, which count themselves: grow until they cover everything.
    let per_block = CS * 8 / (1 << REFCOUNT_ORDER);
    let used = pos / CS;
    let (mut blocks, mut table_clusters) = (1u64, 1u64);
    loop {
        let total = used + table_clusters + blocks;
        let b = total.div_ceil(per_block);
        let t = (b * 8).div_ceil(CS);
        if b == blocks && t == table_clusters {
            break;
        }
        (blocks, table_clusters) = (b, t);
    }
    let table_offset = pos;
    let blocks_offset = table_offset + table_clusters * CS;
    for c in 0..table_clusters + blocks {
        refs.bump(table_offset / CS + c)?;
    }
    let mut table = Vec::with_capacity((table_clusters * CS) as usize);
    for b in 0..blocks {
        table.extend_from_slice(&(blocks_offset + b * CS).to_be_bytes());
    }
    table.resize((table_clusters * CS) as usize, 0);
    tail.push(table);
    refs.0.resize((blocks * per_block) as usize, 0);
    for block in refs.0.chunks(per_block as usize) {
        tail.push(block.iter().flat_map(|r| r.to_be_bytes()).collect());
    }

    let header = Header {
        magic: *MAGIC,
        version: 3.into(),
        backing_file_offset: 0.into(),
        backing_file_size: 0.into(),
        cluster_bits: CLUSTER_BITS.into(),
        size: size.into(),
        crypt_method: 0.into(),
        l1_size: (l1_size as u32).into(),
        l1_table_offset: l1_offset.into(),
        refcount_table_offset: table_offset.into(),
        refcount_table_clusters: (table_clusters as u32).into(),
        nb_snapshots: 0.into(),
        snapshots_offset: 0.into(),
        incompatible_features: match comp {
            Some(Compression::Zstd) => INCOMPAT_COMPRESSION,
            _ => 0,
        }
        .into(),
        compatible_features: 0.into(),
        autoclear_features: 0.into(),
        refcount_order: REFCOUNT_ORDER.into(),
        header_length: HEADER_LEN.into(),
        compression_type: match comp {
            Some(Compression::Zstd) => COMPRESSION_ZSTD,
            _ => COMPRESSION_ZLIB,
        },
        pad: [0; 7],
    };
    // Header, then the end of the header extension area (type 0, length 0).
    let mut header = header.as_bytes().to_vec();
    header.extend_from_slice(&[0u8; 8]);
    Ok(Tables { tail, header })
}

/// Lays out `raw` as an uncompressed qcow2: the header cluster, then each non-zero guest
/// cluster in guest order (the last one zero-padded to a whole cluster), then the tables.
pub fn plan(raw: &Raw<'_>) -> Result<(Plan, Summary)> {
    let (guest_clusters, _) = geometry(raw.size)?;
    let nonzero = raw.nonzero_chunks(CS)?;
    let mut l2: Vec<u64> = vec![0; guest_clusters as usize];
    let mut refs = Refs(vec![1]); // the header cluster
    let mut data = Vec::with_capacity(nonzero.len());
    let mut host = CS;
    for &index in &nonzero {
        l2[index as usize] = host | COPIED;
        refs.bump(host / CS)?;
        let from = index * CS;
        let len = CS.min(raw.size - from);
        data.push(Piece::Raw { offset: from, len });
        data.push(Piece::Zero(CS - len));
        host += CS;
    }
    let Tables { tail, header } = tables(l2, refs, host, raw.size, None)?;
    let mut plan = Plan::default();
    plan.push(Piece::Bytes(header));
    plan.zero_to(CS);
    for p in data {
        plan.push(p);
    }
    for t in tail {
        plan.push(Piece::Bytes(t));
    }
    let sum = Summary {
        file_size: plan.len(),
        clusters: nonzero.len() as u64,
        compressed: 0,
    };
    Ok((plan, sum))
}

/// Writes `raw` as qcow2 to `w` (positioned at 0).
pub fn write<W: Write + Seek>(raw: &Raw<'_>, w: &mut W, opts: Options) -> Result<Summary> {
    let Some(comp) = opts.compression else {
        let (plan, sum) = plan(raw)?;
        plan.write_to(raw, w)?;
        return Ok(sum);
    };
    let (guest_clusters, _) = geometry(raw.size)?;
    let mut l2: Vec<u64> = vec![0; guest_clusters as usize];
    let mut refs = Refs(vec![1]); // the header cluster
    let mut out = Out { w, pos: 0 };
    out.pad_to(CS)?;
    let mut sum = Summary::default();
    let mut gaps = Gaps::default();
    raw.for_each_nonzero(
        CS,
        128,
        |data| match compress(comp, &data) {
            Some(c) => Stored::Packed(c),
            None => Stored::Plain(data),
        },
        |index, stored| {
            match stored {
                Stored::Plain(data) => {
                    let aligned = out.pos.next_multiple_of(CS);
                    gaps.add(out.pos, aligned);
                    out.pad_to(aligned)?;
                    l2[index as usize] = out.pos | COPIED;
                    refs.bump(out.pos / CS)?;
                    out.write(&data)?;
                    sum.clusters += 1;
                }
                Stored::Packed(data) => {
                    let len = data.len() as u64;
                    let start = match gaps.take(len) {
                        Some(start) => {
                            out.write_at(start, &data)?;
                            start
                        }
                        None => {
                            out.write(&data)?;
                            out.pos - len
                        }
                    };
                    let end = start + len;
                    let extra_sectors = ((end - 1) >> 9) - (start >> 9);
                    l2[index as usize] = L2_COMPRESSED | (extra_sectors << 54) | start;
                    for c in start / CS..=(end - 1) / CS {
                        refs.bump(c)?;
                    }
                    sum.compressed += 1;
                }
            }
            Ok(())
        },
    )?;
    out.pad_to(out.pos.next_multiple_of(CS))?;
    let Tables { tail, header } = tables(l2, refs, out.pos, raw.size, Some(comp))?;
    for t in &tail {
        out.write(t)?;
    }
    out.write_at(0, &header)?;
    sum.file_size = out.pos;
    out.w.flush()?;
    Ok(sum)
}

/// A qcow2 image opened for reading.
pub struct Reader<'a> {
    r: &'a dyn ReadAt,
    len: u64,
    /// The parsed header.
    pub header: Header,
    cluster_bits: u32,
    l1: Vec<u64>,
}

impl<'a> Reader<'a> {
    /// Parses the header and the L1 table of the `len`-byte image `r`.
    pub fn open(r: &'a dyn ReadAt, len: u64) -> Result<Self> {
        let mut buf = [0u8; HEADER_LEN as usize];
        if len < 72 {
            return Err(corrupt(
                "qcow2",
                0,
                format!("{len} bytes: too short for a header"),
            ));
        }
        let n = (HEADER_LEN as u64).min(len) as usize;
        r.read_at(0, &mut buf[..n])?;
        let header =
            Header::read_from_bytes(&buf[..]).map_err(|_| corrupt("qcow2", 0, "header"))?;
        if &header.magic != MAGIC {
            return Err(corrupt("qcow2", 0, "no QFI\\xfb magic"));
        }
        let version = header.version.get();
        if version != 2 && version != 3 {
            return Err(Error::Unsupported {
                format: "qcow2",
                what: format!("version {version}"),
            });
        }
        let cluster_bits = header.cluster_bits.get();
        if !(9..=21).contains(&cluster_bits) {
            return Err(corrupt("qcow2", 20, format!("cluster_bits {cluster_bits}")));
        }
        if header.backing_file_offset.get() != 0 {
            return Err(Error::Unsupported {
                format: "qcow2",
                what: "a backing file".into(),
            });
        }
        if header.crypt_method.get() != 0 {
            return Err(Error::Unsupported {
                format: "qcow2",
                what: "encryption".into(),
            });
        }
        if version == 3 {
            let hl = header.header_length.get();
            if hl < 104 || hl % 8 != 0 {
                return Err(corrupt("qcow2", 100, format!("header_length {hl}")));
            }
            let inc = header.incompatible_features.get();
            if inc & !(INCOMPAT_COMPRESSION | INCOMPAT_DIRTY) != 0 {
                return Err(Error::Unsupported {
                    format: "qcow2",
                    what: format!("incompatible features {inc:#x}"),
                });
            }
            if header.refcount_order.get() > 6 {
                return Err(corrupt("qcow2", 96, "refcount_order above 6"));
            }
        }
        let mut header = header;
        if version == 2 || header.header_length.get() <= 104 {
            header.compression_type = COMPRESSION_ZLIB;
        }
        if header.compression_type > COMPRESSION_ZSTD {
            return Err(Error::Unsupported {
                format: "qcow2",
                what: format!("compression type {}", header.compression_type),
            });
        }
        let cs = 1u64 << cluster_bits;
        let needed = header.size.get().div_ceil(cs).div_ceil(cs / 8);
        let l1_size = u64::from(header.l1_size.get());
        if l1_size < needed {
            return Err(corrupt(
                "qcow2",
                36,
                format!("l1_size {l1_size} below the {needed} entries the size needs"),
            ));
        }
        let l1_off = header.l1_table_offset.get();
        if l1_off % cs != 0 || l1_off.checked_add(l1_size * 8).is_none_or(|e| e > len) {
            return Err(corrupt(
                "qcow2",
                40,
                format!("L1 table at {l1_off} outside the file"),
            ));
        }
        let mut raw = vec![0u8; (needed * 8) as usize];
        r.read_at(l1_off, &mut raw)?;
        let l1 = raw
            .chunks_exact(8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()))
            .collect();
        Ok(Reader {
            r,
            len,
            header,
            cluster_bits,
            l1,
        })
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The L2 entry of guest cluster `c` (0: unallocated).
    pub fn l2_entry(&self, c: u64) -> Result<u64> {
        let per = self.cs() / 8;
        let l1e = self.l1[(c / per) as usize];
        let table = l1e & OFFSET_MASK;
        if table == 0 {
            return Ok(0);
        }
        if !table.is_multiple_of(self.cs()) || table + self.cs() > self.len {
            return Err(corrupt("qcow2", table, "L2 table outside the file"));
        }
        let mut e = [0u8; 8];
        let at = table + (c % per) * 8;
        self.r.read_at(at, &mut e)?;
        Ok(u64::from_be_bytes(e))
    }

    /// Guest cluster `c` into `buf` (one cluster).
    fn read_cluster(&self, c: u64, buf: &mut [u8]) -> Result<()> {
        let e = self.l2_entry(c)?;
        let cs = self.cs();
        if e & L2_COMPRESSED != 0 {
            let x = 62 - (self.cluster_bits - 8);
            let off = e & ((1u64 << x) - 1);
            let sectors = ((e >> x) & ((1u64 << (62 - x)) - 1)) + 1;
            let end = ((off & !511) + sectors * 512).min(self.len);
            if off >= end {
                return Err(corrupt(
                    "qcow2",
                    off,
                    format!("compressed cluster {c} outside the file"),
                ));
            }
            let mut data = vec![0u8; (end - off) as usize];
            self.r.read_at(off, &mut data)?;
            let ok = match self.header.compression_type {
                COMPRESSION_ZSTD => zstd::stream::read::Decoder::with_buffer(&data[..])
                    .map(|d| d.single_frame())
                    .and_then(|mut d| d.read_exact(buf))
                    .is_ok(),
                _ => {
                    let mut d = flate2::Decompress::new(false);
                    d.decompress(&data, buf, flate2::FlushDecompress::Finish)
                        .is_ok()
                        && d.total_out() == buf.len() as u64
                }
            };
            if !ok {
                return Err(corrupt(
                    "qcow2",
                    off,
                    format!("compressed cluster {c} does not inflate to {cs} bytes"),
                ));
            }
            return Ok(());
        }
        let host = e & OFFSET_MASK;
        if host == 0 || (self.header.version.get() == 3 && e & 1 != 0) {
            buf.fill(0);
            return Ok(());
        }
        if !host.is_multiple_of(cs) || host >= self.len {
            return Err(corrupt(
                "qcow2",
                host,
                format!("cluster {c} outside the file"),
            ));
        }
        // A final cluster may be short in a file QEMU wrote; the rest reads as zeroes.
        let n = (self.len - host).min(cs) as usize;
        self.r.read_at(host, &mut buf[..n])?;
        buf[n..].fill(0);
        Ok(())
    }

    /// A human dump: header fields and cluster counts.
    pub fn dump(&self) -> Result<String> {
        let h = &self.header;
        let mut s = format!(
            "qcow2 version {}\n  size {}\n  cluster_bits {}\n  l1_size {} at {}\n  refcount table at {} ({} clusters, order {})\n  incompatible {:#x} compatible {:#x} autoclear {:#x}\n  compression_type {}\n",
            h.version.get(),
            h.size.get(),
            h.cluster_bits.get(),
            h.l1_size.get(),
            h.l1_table_offset.get(),
            h.refcount_table_offset.get(),
            h.refcount_table_clusters.get(),
            h.refcount_order.get(),
            h.incompatible_features.get(),
            h.compatible_features.get(),
            h.autoclear_features.get(),
            h.compression_type,
        );
        let (mut plain, mut packed) = (0u64, 0u64);
        for c in 0..h.size.get().div_ceil(self.cs()) {
            match self.l2_entry(c)? {
                0 => {}
                e if e & L2_COMPRESSED != 0 => packed += 1,
                _ => plain += 1,
            }
        }
        s += &format!("  clusters: {plain} standard, {packed} compressed\n");
        Ok(s)
    }
}

impl VirtualDisk for Reader<'_> {
    fn size(&self) -> u64 {
        self.header.size.get()
    }

    fn read_virtual(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if let Some(e) = super::past_end(offset, buf.len(), self.size()) {
            return Err(e);
        }
        let cs = self.cs();
        let mut cluster = vec![0u8; cs as usize];
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let c = pos / cs;
            let within = (pos % cs) as usize;
            let n = (cs as usize - within).min(buf.len() - done);
            self.read_cluster(c, &mut cluster)?;
            buf[done..done + n].copy_from_slice(&cluster[within..within + n]);
            done += n;
        }
        Ok(())
    }
}
