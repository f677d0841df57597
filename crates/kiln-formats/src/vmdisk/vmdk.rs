//! VMDK streamOptimized (VMware "Virtual Disk Format 5.0", sections "The Sparse Extent Header",
//! "Stream-Optimized Compressed Sparse Extents"): one file written strictly front to back, as
//! OVA packaging and cloud image import expect.
//!
//! Layout: the sparse extent header in sector 0 (grain directory offset `GD_AT_END`), the
//! embedded descriptor from sector 1, then from sector 128 (`overHead`) the grains: each is a
//! grain marker (the grain's first LBA, the compressed length) followed by a zlib stream of
//! one 64 KiB grain, padded to a sector. After the grains of every 512-grain span comes a grain
//! table marker and the table (sector numbers of the grain markers, 0 for a grain of zeroes);
//! a span with no grains gets no table (grain directory entry 0). Then the grain directory
//! marker and directory, the footer marker and footer (the header again with the real
//! directory offset) and the end-of-stream marker. All numbers are little-endian.

use std::io::{self, Read, Seek, Write};

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::{corrupt, Error, Out, Raw, Result, VirtualDisk};
use crate::io::ReadAt;

/// `KDMV` (the bytes of the little-endian magic 0x564d444b).
pub const MAGIC: &[u8; 4] = b"KDMV";
/// Grain size in sectors (64 KiB).
pub const GRAIN_SECTORS: u64 = 128;
const GRAIN: u64 = GRAIN_SECTORS * 512;
/// Grain table entries per table.
pub const GTES_PER_GT: u64 = 512;
/// Header flag: the newline detection characters are valid.
pub const FLAG_NL_TEST: u32 = 1 << 0;
/// Header flag: grains are compressed.
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// Header flag: grains and metadata have markers.
pub const FLAG_MARKERS: u32 = 1 << 17;
/// `gdOffset` in a header whose directory is found through the footer.
pub const GD_AT_END: u64 = u64::MAX;
/// Marker types.
pub const MARKER_EOS: u32 = 0;
/// Grain table marker.
pub const MARKER_GT: u32 = 1;
/// Grain directory marker.
pub const MARKER_GD: u32 = 2;
/// Footer marker.
pub const MARKER_FOOTER: u32 = 3;
/// Sectors reserved for the embedded descriptor.
const DESCRIPTOR_SECTORS: u64 = 20;

/// The sparse extent header (one sector, packed).
#[derive(Clone, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Header {
    /// `KDMV`.
    pub magic: [u8; 4],
    /// 3 for streamOptimized.
    pub version: U32,
    /// `FLAG_*`.
    pub flags: U32,
    /// Virtual size in sectors.
    pub capacity: U64,
    /// Grain size in sectors.
    pub grain_size: U64,
    /// Sector of the embedded descriptor.
    pub descriptor_offset: U64,
    /// Sectors of the embedded descriptor.
    pub descriptor_size: U64,
    /// Entries per grain table.
    pub num_gtes_per_gt: U32,
    /// Sector of the redundant grain directory (0: none).
    pub rgd_offset: U64,
    /// Sector of the grain directory, or `GD_AT_END`.
    pub gd_offset: U64,
    /// Sectors before the first grain.
    pub overhead: U64,
    /// 1 if the disk was not closed cleanly.
    pub unclean_shutdown: u8,
    /// `\n`.
    pub single_end_line_char: u8,
    /// ` `.
    pub non_end_line_char: u8,
    /// `\r`.
    pub double_end_line_char1: u8,
    /// `\n`.
    pub double_end_line_char2: u8,
    /// 1: deflate.
    pub compress_algorithm: U16,
    /// Zero.
    pub pad: [u8; 433],
}

const _: () = assert!(size_of::<Header>() == 512);
const _: () = assert!(std::mem::offset_of!(Header, gd_offset) == 56);
const _: () = assert!(std::mem::offset_of!(Header, compress_algorithm) == 77);

/// A metadata marker sector: `val` sectors of metadata of `kind` follow.
fn marker(val: u64, kind: u32) -> [u8; 512] {
    let mut m = [0u8; 512];
    m[..8].copy_from_slice(&val.to_le_bytes());
    m[12..16].copy_from_slice(&kind.to_le_bytes());
    m
}

/// Options of the writer.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The extent file name the descriptor names (the output's file name).
    pub file_name: String,
    /// Content ID written to the descriptor (derive it from the image for reproducibility).
    pub cid: u32,
}

fn header(capacity: u64, gd_offset: u64) -> Header {
    Header {
        magic: *MAGIC,
        version: 3.into(),
        flags: (FLAG_NL_TEST | FLAG_COMPRESSED | FLAG_MARKERS).into(),
        capacity: capacity.into(),
        grain_size: GRAIN_SECTORS.into(),
        descriptor_offset: 1.into(),
        descriptor_size: DESCRIPTOR_SECTORS.into(),
        num_gtes_per_gt: (GTES_PER_GT as u32).into(),
        rgd_offset: 0.into(),
        gd_offset: gd_offset.into(),
        overhead: GRAIN_SECTORS.into(),
        unclean_shutdown: 0,
        single_end_line_char: b'\n',
        non_end_line_char: b' ',
        double_end_line_char1: b'\r',
        double_end_line_char2: b'\n',
        compress_algorithm: 1.into(),
        pad: [0; 433],
    }
}

/// The embedded descriptor text.
pub fn descriptor(capacity: u64, opts: &Options) -> String {
    let cylinders = (capacity / (16 * 63)).min(65535);
    let name: String = opts
        .file_name
        .chars()
        .map(|c| if c == '"' || c.is_control() { '_' } else { c })
        .collect();
    format!(
        "# Disk DescriptorFile\nversion=1\nCID={:08x}\nparentCID=ffffffff\ncreateType=\"streamOptimized\"\n\n\
         # Extent description\nRW {capacity} SPARSE \"{name}\"\n\n\
         # The Disk Data Base\n#DDB\n\n\
         ddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"{cylinders}\"\n\
         ddb.geometry.heads = \"16\"\nddb.geometry.sectors = \"63\"\nddb.adapterType = \"lsilogic\"\n",
        opts.cid
    )
}

fn zlib(data: &[u8]) -> io::Result<Vec<u8>> {
    let mut e = flate2::write::ZlibEncoder::new(
        Vec::with_capacity(data.len() / 2),
        flate2::Compression::new(super::DEFLATE_LEVEL),
    );
    e.write_all(data)?;
    e.finish()
}

/// Writes `raw` as a streamOptimized VMDK to `w` (sequentially; `w` is never seeked).
pub fn write<W: Write + Seek>(raw: &Raw<'_>, w: &mut W, opts: &Options) -> Result<u64> {
    let capacity = raw.size.div_ceil(512);
    let grains = capacity.div_ceil(GRAIN_SECTORS);
    let tables = grains.div_ceil(GTES_PER_GT);
    let desc = descriptor(capacity, opts);
    if desc.len() as u64 > DESCRIPTOR_SECTORS * 512 {
        return Err(Error::Unsupported {
            format: "vmdk",
            what: format!("a descriptor of {} bytes", desc.len()),
        });
    }
    let mut out = Out { w, pos: 0 };
    out.write(header(capacity, GD_AT_END).as_bytes())?;
    out.write(desc.as_bytes())?;
    out.pad_to(GRAIN_SECTORS * 512)?;

    let mut gd = vec![0u32; tables as usize];
    let mut gt = vec![0u32; GTES_PER_GT as usize];
    let mut current: u64 = 0; // grain table being filled
    let mut any = false;
    let flush_table =
        |out: &mut Out<'_, W>, gt: &mut Vec<u32>, t: u64, gd: &mut Vec<u32>| -> Result<()> {
            out.write(&marker(4, MARKER_GT))?;
            gd[t as usize] = sector(out.pos)?;
            let bytes: Vec<u8> = gt.iter().flat_map(|e| e.to_le_bytes()).collect();
            out.write(&bytes)?;
            gt.fill(0);
            Ok(())
        };
    raw.for_each_nonzero(
        GRAIN,
        128,
        |d| zlib(&d),
        |index, data| {
            let data = data?;
            let t = index / GTES_PER_GT;
            if t != current {
                if any {
                    flush_table(&mut out, &mut gt, current, &mut gd)?;
                }
                current = t;
                any = false;
            }
            gt[(index % GTES_PER_GT) as usize] = sector(out.pos)?;
            any = true;
            let mut m = Vec::with_capacity(12 + data.len());
            m.extend_from_slice(&(index * GRAIN_SECTORS).to_le_bytes());
            m.extend_from_slice(&(data.len() as u32).to_le_bytes());
            m.extend_from_slice(&data);
            out.write(&m)?;
            out.pad_to(out.pos.next_multiple_of(512))?;
            Ok(())
        },
    )?;
    if any {
        flush_table(&mut out, &mut gt, current, &mut gd)?;
    }
    let gd_bytes: Vec<u8> = gd.iter().flat_map(|e| e.to_le_bytes()).collect();
    let gd_sectors = (gd_bytes.len() as u64).div_ceil(512);
    out.write(&marker(gd_sectors, MARKER_GD))?;
    let gd_offset = out.pos / 512;
    out.write(&gd_bytes)?;
    out.pad_to(out.pos.next_multiple_of(512))?;
    out.write(&marker(1, MARKER_FOOTER))?;
    out.write(header(capacity, gd_offset).as_bytes())?;
    out.write(&marker(0, MARKER_EOS))?;
    out.w.flush()?;
    Ok(out.pos)
}

fn sector(pos: u64) -> Result<u32> {
    u32::try_from(pos / 512).map_err(|_| Error::Unsupported {
        format: "vmdk",
        what: "a file above 2 TiB".into(),
    })
}

/// A sparse VMDK (streamOptimized, or monolithicSparse without compression) opened for
/// reading.
pub struct Reader<'a> {
    r: &'a dyn ReadAt,
    len: u64,
    /// The header in effect (the footer's, for a streamOptimized file).
    pub header: Header,
    /// The embedded descriptor text.
    pub descriptor: String,
    gd: Vec<u32>,
}

impl<'a> Reader<'a> {
    /// Parses the header (and footer), descriptor and grain directory of the `len`-byte `r`.
    pub fn open(r: &'a dyn ReadAt, len: u64) -> Result<Self> {
        if len < 512 {
            return Err(corrupt(
                "vmdk",
                0,
                format!("{len} bytes: too short for a header"),
            ));
        }
        let mut b = [0u8; 512];
        r.read_at(0, &mut b)?;
        let mut header =
            Header::read_from_bytes(&b[..]).map_err(|_| corrupt("vmdk", 0, "header"))?;
        if &header.magic != MAGIC {
            return Err(corrupt("vmdk", 0, "no KDMV magic"));
        }
        if header.gd_offset.get() == GD_AT_END {
            if len < 1536 {
                return Err(corrupt(
                    "vmdk",
                    0,
                    "grain directory at the end, but no footer",
                ));
            }
            let mut f = [0u8; 1536];
            r.read_at(len - 1536, &mut f)?;
            let kind = |s: &[u8]| u32::from_le_bytes(s[12..16].try_into().unwrap_or_default());
            if kind(&f[..512]) != MARKER_FOOTER
                || &f[512..516] != MAGIC
                || kind(&f[1024..]) != MARKER_EOS
                || f[1024..1036].iter().any(|&x| x != 0)
            {
                return Err(corrupt(
                    "vmdk",
                    len - 1536,
                    "no footer marker, footer and end-of-stream marker at the end",
                ));
            }
            header = Header::read_from_bytes(&f[512..1024])
                .map_err(|_| corrupt("vmdk", len - 1024, "footer"))?;
        }
        let flags = header.flags.get();
        if flags & FLAG_COMPRESSED != 0 && header.compress_algorithm.get() != 1 {
            return Err(Error::Unsupported {
                format: "vmdk",
                what: format!("compression algorithm {}", header.compress_algorithm.get()),
            });
        }
        if flags & FLAG_COMPRESSED != 0 && flags & FLAG_MARKERS == 0 {
            return Err(Error::Unsupported {
                format: "vmdk",
                what: "compressed grains without markers".into(),
            });
        }
        let gs = header.grain_size.get();
        if !gs.is_power_of_two() || !(1..=2048).contains(&gs) {
            return Err(corrupt("vmdk", 20, format!("grain size {gs} sectors")));
        }
        let per = u64::from(header.num_gtes_per_gt.get());
        if !(1..=4096).contains(&per) {
            return Err(corrupt(
                "vmdk",
                44,
                format!("{per} entries per grain table"),
            ));
        }
        let capacity = header.capacity.get();
        if capacity.checked_mul(512).is_none() {
            return Err(corrupt("vmdk", 12, format!("capacity {capacity} sectors")));
        }
        let tables = capacity.div_ceil(gs).div_ceil(per);
        let gd_off = header
            .gd_offset
            .get()
            .checked_mul(512)
            .ok_or_else(|| corrupt("vmdk", 56, "grain directory offset"))?;
        if gd_off.checked_add(tables * 4).is_none_or(|e| e > len) {
            return Err(corrupt(
                "vmdk",
                56,
                format!("grain directory at {gd_off} outside the file"),
            ));
        }
        let mut raw = vec![0u8; (tables * 4) as usize];
        r.read_at(gd_off, &mut raw)?;
        let gd = raw
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
            .collect();
        let (doff, dlen) = (header.descriptor_offset.get(), header.descriptor_size.get());
        let descriptor = match (doff.checked_mul(512), dlen.checked_mul(512)) {
            (Some(o), Some(l))
                if doff != 0 && l <= 1 << 20 && o.checked_add(l).is_some_and(|e| e <= len) =>
            {
                let mut d = vec![0u8; l as usize];
                r.read_at(o, &mut d)?;
                let end = d.iter().position(|&c| c == 0).unwrap_or(d.len());
                String::from_utf8_lossy(&d[..end]).into_owned()
            }
            _ => String::new(),
        };
        Ok(Reader {
            r,
            len,
            header,
            descriptor,
            gd,
        })
    }

    fn grain_bytes(&self) -> u64 {
        self.header.grain_size.get() * 512
    }

    /// Byte offset of grain `g`'s data (or marker), 0 if unallocated.
    fn grain_at(&self, g: u64) -> Result<u64> {
        let per = u64::from(self.header.num_gtes_per_gt.get());
        let table = u64::from(self.gd[(g / per) as usize]) * 512;
        if table == 0 {
            return Ok(0);
        }
        let at = table + (g % per) * 4;
        if at + 4 > self.len {
            return Err(corrupt("vmdk", table, "grain table outside the file"));
        }
        let mut e = [0u8; 4];
        self.r.read_at(at, &mut e)?;
        Ok(u64::from(u32::from_le_bytes(e)) * 512)
    }

    fn read_grain(&self, g: u64, buf: &mut [u8]) -> Result<()> {
        let at = self.grain_at(g)?;
        if at == 0 {
            buf.fill(0);
            return Ok(());
        }
        let flags = self.header.flags.get();
        if flags & FLAG_COMPRESSED == 0 {
            let start = if flags & FLAG_MARKERS != 0 {
                at + 12
            } else {
                at
            };
            if start + buf.len() as u64 > self.len {
                return Err(corrupt("vmdk", at, format!("grain {g} outside the file")));
            }
            self.r.read_at(start, buf)?;
            return Ok(());
        }
        if at + 12 > self.len {
            return Err(corrupt(
                "vmdk",
                at,
                format!("grain marker {g} outside the file"),
            ));
        }
        let mut m = [0u8; 12];
        self.r.read_at(at, &mut m)?;
        let size = u64::from(u32::from_le_bytes(m[8..12].try_into().unwrap_or_default()));
        if size == 0 || size > 2 * self.grain_bytes() + 1024 || at + 12 + size > self.len {
            return Err(corrupt(
                "vmdk",
                at,
                format!("grain {g}: compressed size {size}"),
            ));
        }
        let mut data = vec![0u8; size as usize];
        self.r.read_at(at + 12, &mut data)?;
        let mut d = flate2::read::ZlibDecoder::new(&data[..]);
        d.read_exact(buf)
            .map_err(|e| corrupt("vmdk", at, format!("grain {g} does not inflate: {e}")))?;
        Ok(())
    }

    /// A human dump: header fields, descriptor and grain counts.
    pub fn dump(&self) -> Result<String> {
        let h = &self.header;
        let mut s = format!(
            "vmdk version {} flags {:#x}\n  capacity {} sectors, grain {} sectors, {} entries per table\n  descriptor at sector {} ({} sectors), grain directory at sector {}, overhead {}\n",
            h.version.get(), h.flags.get(), h.capacity.get(), h.grain_size.get(), h.num_gtes_per_gt.get(),
            h.descriptor_offset.get(), h.descriptor_size.get(), h.gd_offset.get(), h.overhead.get(),
        );
        let grains = h.capacity.get().div_ceil(h.grain_size.get());
        let mut used = 0u64;
        for g in 0..grains {
            if self.grain_at(g)? != 0 {
                used += 1;
            }
        }
        s += &format!("  grains: {used} of {grains} allocated\n  descriptor:\n");
        for l in self.descriptor.lines() {
            s += &format!("    {l}\n");
        }
        Ok(s)
    }
}

impl VirtualDisk for Reader<'_> {
    fn size(&self) -> u64 {
        self.header.capacity.get() * 512
    }

    fn read_virtual(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if let Some(e) = super::past_end(offset, buf.len(), self.size()) {
            return Err(e);
        }
        let gb = self.grain_bytes();
        let mut grain = vec![0u8; gb as usize];
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let g = pos / gb;
            let within = (pos % gb) as usize;
            let n = (gb as usize - within).min(buf.len() - done);
            self.read_grain(g, &mut grain)?;
            buf[done..done + n].copy_from_slice(&grain[within..within + n]);
            done += n;
        }
        Ok(())
    }
}
