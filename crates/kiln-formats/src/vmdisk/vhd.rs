//! VHD (Microsoft "Virtual Hard Disk Image Format Specification", October 2006): a fixed disk
//! is the raw bytes followed by a 512-byte big-endian footer; a dynamic disk is a footer copy,
//! a dynamic disk header, the Block Allocation Table (one big-endian sector number per 2 MiB
//! block, `0xFFFFFFFF` for a block that reads as zeroes), the allocated blocks (a 512-byte
//! sector bitmap, then 2 MiB of data) and the footer.
//!
//! Sizes are rounded up to a whole MiB, as Azure requires of uploaded fixed VHDs. The checksum
//! is the one's complement of the byte sum with the checksum field zero (spec, "Hard Disk
//! Footer Format"). The geometry follows the spec's CHS algorithm (Appendix). The creator
//! application is `win ` because readers choose between the CHS geometry and `current_size`
//! by it: QEMU before 9.2 trusts `current_size` only for `win `, `qem2`, `d2v `, `CTXS` and
//! `tap`, and a kiln disk's size is rarely a whole number of cylinders.

use std::io::{Seek, Write};

use zerocopy::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::{corrupt, Error, Piece, Plan, Raw, Result, VirtualDisk};
use crate::io::ReadAt;

/// The footer cookie.
pub const COOKIE: &[u8; 8] = b"conectix";
/// The dynamic header cookie.
pub const DYN_COOKIE: &[u8; 8] = b"cxsparse";
/// Disk type: fixed.
pub const TYPE_FIXED: u32 = 2;
/// Disk type: dynamic.
pub const TYPE_DYNAMIC: u32 = 3;
/// Block size of dynamic disks kiln writes (the spec's default, 2 MiB).
pub const BLOCK: u64 = 2 << 20;
/// Sizes are rounded up to this (Azure).
pub const ALIGN: u64 = 1 << 20;
const UNUSED: u32 = 0xFFFF_FFFF;

/// The hard disk footer (512 bytes).
#[derive(Clone, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Footer {
    /// `conectix`.
    pub cookie: [u8; 8],
    /// Bit 1 (reserved) is always set.
    pub features: U32,
    /// 0x00010000.
    pub format_version: U32,
    /// Byte offset of the dynamic header; all ones for a fixed disk.
    pub data_offset: U64,
    /// Seconds since 2000-01-01 00:00:00 UTC.
    pub timestamp: U32,
    /// Creator application.
    pub creator_app: [u8; 4],
    /// Creator version.
    pub creator_version: U32,
    /// Creator host OS.
    pub creator_os: [u8; 4],
    /// Size at creation, bytes.
    pub original_size: U64,
    /// Current virtual size, bytes.
    pub current_size: U64,
    /// Cylinders.
    pub cylinders: U16,
    /// Heads.
    pub heads: u8,
    /// Sectors per track.
    pub sectors: u8,
    /// 2 fixed, 3 dynamic, 4 differencing.
    pub disk_type: U32,
    /// One's complement of the byte sum with this field zero.
    pub checksum: U32,
    /// Identifies the disk.
    pub unique_id: [u8; 16],
    /// 1 when saved state is held.
    pub saved_state: u8,
    /// Zero.
    pub reserved: [u8; 427],
}

const _: () = assert!(size_of::<Footer>() == 512);
const _: () = assert!(std::mem::offset_of!(Footer, current_size) == 48);
const _: () = assert!(std::mem::offset_of!(Footer, checksum) == 64);

/// The dynamic disk header (1024 bytes).
#[derive(Clone, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct DynHeader {
    /// `cxsparse`.
    pub cookie: [u8; 8],
    /// Next structure; all ones (unused).
    pub data_offset: U64,
    /// Byte offset of the BAT.
    pub table_offset: U64,
    /// 0x00010000.
    pub header_version: U32,
    /// BAT entries.
    pub max_table_entries: U32,
    /// Bytes per block (a power of two).
    pub block_size: U32,
    /// One's complement of the byte sum with this field zero.
    pub checksum: U32,
    /// Parent disk (differencing disks).
    pub parent_unique_id: [u8; 16],
    /// Parent's modification time.
    pub parent_timestamp: U32,
    /// Zero.
    pub reserved: U32,
    /// Parent's name, UTF-16BE.
    pub parent_name: [u8; 512],
    /// Parent locators.
    pub parent_locators: [u8; 192],
    /// Zero.
    pub reserved2: [u8; 256],
}

const _: () = assert!(size_of::<DynHeader>() == 1024);
const _: () = assert!(std::mem::offset_of!(DynHeader, checksum) == 36);

/// Options of the writer.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// A dynamic disk (otherwise fixed).
    pub dynamic: bool,
    /// The footer's unique id (derive it from the image for reproducible output).
    pub unique_id: [u8; 16],
    /// Footer timestamp, seconds since 2000-01-01 (0 for reproducible output).
    pub timestamp: u32,
}

/// The spec's checksum: one's complement of the byte sum.
pub fn checksum(bytes: &[u8]) -> u32 {
    !bytes
        .iter()
        .fold(0u32, |a, &b| a.wrapping_add(u32::from(b)))
}

/// Cylinders, heads, sectors per track for `size` bytes (spec Appendix, "CHS Calculation").
pub fn geometry(size: u64) -> (u16, u8, u8) {
    let mut total = (size / 512).min(65535 * 16 * 255);
    let (spt, heads, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = total / spt;
    } else {
        let mut s = 17;
        let mut c = total / s;
        let mut h = c.div_ceil(1024);
        if h < 4 {
            h = 4;
        }
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        (spt, heads, cth) = (s, h, c);
    }
    total = cth / heads;
    (total as u16, heads as u8, spt as u8)
}

/// The virtual size kiln gives a `size`-byte raw disk.
pub fn virtual_size(size: u64) -> u64 {
    size.next_multiple_of(ALIGN)
}

fn footer(size: u64, opts: &Options) -> Footer {
    let (c, h, s) = geometry(size);
    let mut f = Footer {
        cookie: *COOKIE,
        features: 2.into(),
        format_version: 0x0001_0000.into(),
        data_offset: if opts.dynamic { 512 } else { u64::MAX }.into(),
        timestamp: opts.timestamp.into(),
        creator_app: *b"win ",
        creator_version: 0x000a_0000.into(),
        creator_os: *b"Wi2k",
        original_size: size.into(),
        current_size: size.into(),
        cylinders: c.into(),
        heads: h,
        sectors: s,
        disk_type: if opts.dynamic {
            TYPE_DYNAMIC
        } else {
            TYPE_FIXED
        }
        .into(),
        checksum: 0.into(),
        unique_id: opts.unique_id,
        saved_state: 0,
        reserved: [0; 427],
    };
    f.checksum = checksum(f.as_bytes()).into();
    f
}

/// Lays out `raw` as a VHD. A fixed disk is the raw disk's non-zero 64 KiB pieces at their
/// own offsets, holes elsewhere, and the footer; a dynamic disk gives each 2 MiB block with a
/// non-zero byte, in guest order, a full sector bitmap and the block's data (zero-padded to a
/// whole block).
pub fn plan(raw: &Raw<'_>, opts: Options) -> Result<Plan> {
    let size = virtual_size(raw.size);
    let foot = footer(size, &opts);
    let mut plan = Plan::default();
    if !opts.dynamic {
        // 64 KiB, so the zero test reads little of a data run and the holes stay holes.
        let chunk = 1u64 << 16;
        for i in raw.nonzero_chunks(chunk)? {
            let from = i * chunk;
            plan.zero_to(from);
            plan.push(Piece::Raw {
                offset: from,
                len: chunk.min(raw.size - from),
            });
        }
        plan.zero_to(size);
        plan.push(Piece::Bytes(foot.as_bytes().to_vec()));
        return Ok(plan);
    }
    let entries = size.div_ceil(BLOCK);
    let entries32 = u32::try_from(entries).map_err(|_| Error::Unsupported {
        format: "vhd",
        what: format!("a {size}-byte dynamic disk"),
    })?;
    let bat_off = 512 + 1024;
    let bat_len = (entries * 4).next_multiple_of(512);
    let mut hdr = DynHeader {
        cookie: *DYN_COOKIE,
        data_offset: u64::MAX.into(),
        table_offset: (bat_off as u64).into(),
        header_version: 0x0001_0000.into(),
        max_table_entries: entries32.into(),
        block_size: (BLOCK as u32).into(),
        checksum: 0.into(),
        parent_unique_id: [0; 16],
        parent_timestamp: 0.into(),
        reserved: 0.into(),
        parent_name: [0; 512],
        parent_locators: [0; 192],
        reserved2: [0; 256],
    };
    hdr.checksum = checksum(hdr.as_bytes()).into();
    let mut bat = vec![UNUSED; entries as usize];
    let mut blocks = Plan::default();
    let data_start = bat_off as u64 + bat_len;
    for i in raw.nonzero_chunks(BLOCK)? {
        let at = data_start + blocks.len();
        bat[i as usize] = u32::try_from(at / 512).map_err(|_| Error::Unsupported {
            format: "vhd",
            what: "a dynamic disk file above 2 TiB".into(),
        })?;
        // The sector bitmap of a block whose every sector is present.
        blocks.push(Piece::Fill {
            byte: 0xFF,
            len: 512,
        });
        let from = i * BLOCK;
        let len = BLOCK.min(raw.size - from);
        blocks.push(Piece::Raw { offset: from, len });
        blocks.push(Piece::Zero(BLOCK - len));
    }
    let mut head = foot.as_bytes().to_vec();
    head.extend_from_slice(hdr.as_bytes());
    head.extend(bat.iter().flat_map(|e| e.to_be_bytes()));
    head.resize(data_start as usize, 0);
    plan.push(Piece::Bytes(head));
    for p in blocks.pieces() {
        plan.push(p.clone());
    }
    plan.push(Piece::Bytes(foot.as_bytes().to_vec()));
    if plan.len() / 512 > u64::from(u32::MAX) {
        return Err(Error::Unsupported {
            format: "vhd",
            what: "a dynamic disk file above 2 TiB".into(),
        });
    }
    Ok(plan)
}

/// Writes `raw` as a VHD to `w` (positioned at 0). Holes in a fixed disk are seeks, so the
/// output stays sparse on file systems that keep holes.
pub fn write<W: Write + Seek>(raw: &Raw<'_>, w: &mut W, opts: Options) -> Result<u64> {
    let plan = plan(raw, opts)?;
    plan.write_to(raw, w)?;
    Ok(plan.len())
}

/// A VHD opened for reading.
pub struct Reader<'a> {
    r: &'a dyn ReadAt,
    len: u64,
    /// The footer (from the end of the file).
    pub footer: Footer,
    /// The dynamic header and BAT, for dynamic disks.
    pub dynamic: Option<(DynHeader, Vec<u32>)>,
}

fn parse_footer(b: &[u8], at: u64) -> Result<Footer> {
    let f = Footer::read_from_bytes(b).map_err(|_| corrupt("vhd", at, "footer"))?;
    if &f.cookie != COOKIE {
        return Err(corrupt("vhd", at, "no conectix footer"));
    }
    let mut z = f.clone();
    z.checksum = 0.into();
    if checksum(z.as_bytes()) != f.checksum.get() {
        return Err(corrupt("vhd", at + 64, "footer checksum mismatch"));
    }
    Ok(f)
}

impl<'a> Reader<'a> {
    /// Parses the footer (and for dynamic disks the header and BAT) of the `len`-byte `r`.
    pub fn open(r: &'a dyn ReadAt, len: u64) -> Result<Self> {
        if len < 512 {
            return Err(corrupt(
                "vhd",
                0,
                format!("{len} bytes: too short for a footer"),
            ));
        }
        let mut b = [0u8; 512];
        // Old writers left a 511-byte footer; take the one at len - 512.
        r.read_at(len - 512, &mut b)?;
        let footer = parse_footer(&b, len - 512)?;
        let size = footer.current_size.get();
        match footer.disk_type.get() {
            TYPE_FIXED => {
                if size > len - 512 {
                    return Err(corrupt(
                        "vhd",
                        len - 512,
                        format!("current size {size} beyond the data"),
                    ));
                }
                Ok(Reader {
                    r,
                    len,
                    footer,
                    dynamic: None,
                })
            }
            TYPE_DYNAMIC => {
                let off = footer.data_offset.get();
                if off.checked_add(1024).is_none_or(|e| e > len) {
                    return Err(corrupt(
                        "vhd",
                        16,
                        format!("dynamic header at {off} outside the file"),
                    ));
                }
                let mut hb = [0u8; 1024];
                r.read_at(off, &mut hb)?;
                let hdr = DynHeader::read_from_bytes(&hb[..])
                    .map_err(|_| corrupt("vhd", off, "dynamic header"))?;
                if &hdr.cookie != DYN_COOKIE {
                    return Err(corrupt("vhd", off, "no cxsparse header"));
                }
                let bs = u64::from(hdr.block_size.get());
                if !bs.is_power_of_two() || !(512..=(256 << 20)).contains(&bs) {
                    return Err(corrupt("vhd", off + 32, format!("block size {bs}")));
                }
                let entries = u64::from(hdr.max_table_entries.get());
                if entries < size.div_ceil(bs) {
                    return Err(corrupt(
                        "vhd",
                        off + 28,
                        format!("{entries} BAT entries for a {size}-byte disk"),
                    ));
                }
                let toff = hdr.table_offset.get();
                let need = size.div_ceil(bs);
                if toff.checked_add(need * 4).is_none_or(|e| e > len) {
                    return Err(corrupt(
                        "vhd",
                        off + 16,
                        format!("BAT at {toff} outside the file"),
                    ));
                }
                let mut raw = vec![0u8; (need * 4) as usize];
                r.read_at(toff, &mut raw)?;
                let bat = raw
                    .chunks_exact(4)
                    .map(|b| u32::from_be_bytes(b.try_into().unwrap_or_default()))
                    .collect();
                Ok(Reader {
                    r,
                    len,
                    footer,
                    dynamic: Some((hdr, bat)),
                })
            }
            t => Err(Error::Unsupported {
                format: "vhd",
                what: format!("disk type {t}"),
            }),
        }
    }

    /// A human dump of the footer and the dynamic header.
    pub fn dump(&self) -> String {
        let f = &self.footer;
        let mut s = format!(
            "vhd type {} size {} (original {})\n  geometry {}/{}/{}\n  creator {:?} {:#x} on {:?}\n  timestamp {}\n  checksum {:#010x}\n",
            f.disk_type.get(),
            f.current_size.get(),
            f.original_size.get(),
            f.cylinders.get(),
            f.heads,
            f.sectors,
            String::from_utf8_lossy(&f.creator_app),
            f.creator_version.get(),
            String::from_utf8_lossy(&f.creator_os),
            f.timestamp.get(),
            f.checksum.get(),
        );
        if let Some((h, bat)) = &self.dynamic {
            let used = bat.iter().filter(|&&e| e != UNUSED).count();
            s += &format!(
                "  dynamic: block size {}, BAT at {} with {} entries, {used} allocated\n",
                h.block_size.get(),
                h.table_offset.get(),
                h.max_table_entries.get()
            );
        }
        s
    }
}

impl VirtualDisk for Reader<'_> {
    fn size(&self) -> u64 {
        self.footer.current_size.get()
    }

    fn read_virtual(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if let Some(e) = super::past_end(offset, buf.len(), self.size()) {
            return Err(e);
        }
        let Some((h, bat)) = &self.dynamic else {
            self.r.read_at(offset, buf)?;
            return Ok(());
        };
        let bs = u64::from(h.block_size.get());
        let bitmap = (bs / 512).div_ceil(8).next_multiple_of(512);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let block = pos / bs;
            let within = pos % bs;
            let n = ((bs - within) as usize).min(buf.len() - done);
            let e = bat[block as usize];
            let part = &mut buf[done..done + n];
            if e == UNUSED {
                part.fill(0);
            } else {
                let start = u64::from(e) * 512 + bitmap + within;
                if start + n as u64 > self.len {
                    return Err(corrupt(
                        "vhd",
                        u64::from(e) * 512,
                        format!("block {block} outside the file"),
                    ));
                }
                self.r.read_at(start, part)?;
            }
            done += n;
        }
        Ok(())
    }
}
