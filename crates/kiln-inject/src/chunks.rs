//! Chunked digests for streamed verification. An image is cut into [`CHUNK_SIZE`] (4 MiB)
//! chunks; the chunk table holds each chunk's sha256, and the image's *chunked digest* is
//!
//! ```text
//! sha256( "kiln-chunked-sha256\0" ‖ u64le chunk_size ‖ u64le image_len ‖ digest_0 ‖ … ‖ digest_n-1 )
//! ```
//!
//! written `chunked-sha256:<hex>`. Because a patch only changes the chunks it touches, the
//! chunked digest of "base + patches" costs O(patched chunks) given the base's table
//! ([`ChunkTable::compose`]), while a receiver can still verify a stream chunk by chunk.
//!
//! Sidecar `IMAGE.chunks` (little-endian):
//!
//! | off | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `KILNCHNK` |
//! | 8 | 4 | version = 1 |
//! | 12 | 4 | flags: bit 0 = plain sha256 present |
//! | 16 | 8 | chunk size in bytes |
//! | 24 | 8 | image length in bytes |
//! | 32 | 8 | number of chunks = ceil(image length / chunk size) |
//! | 40 | 32 | plain sha256 of the whole image (if flag bit 0) |
//! | 72 | 4 | crc32c of the digest array |
//! | 76 | 4 | crc32c of bytes 0..76 |
//! | 80 | 32 × n | chunk digests |
//!
//! Version 2 (flag bit 1) appends the SHA-256 midstates of the base ([`Midstate`]): the hash
//! state after the first `offset` bytes, taken where a slot's first patchable byte lies
//! ([`crate::SlotTable::resume_points`]). Version 1 readers refuse such a file by its version
//! instead of misreading it; files without midstates stay version 1.
//!
//! | off | size | field |
//! |---|---|---|
//! | 80 + 32n | 8 | number of midstates m |
//! | +8 | 4 | crc32c of the midstate entries |
//! | +12 | 4 | reserved, zero |
//! | +16 | 40 × m | midstates, offsets ascending: u64le offset, H0..H7 as big-endian u32 |
//!
//! With a midstate at or before the first patched byte, the plain sha256 of "base + patches"
//! costs only the bytes from the midstate to the end ([`ChunkTable::composed_sha256`]): a few
//! MiB when the slot partitions are laid out last, whatever the size of the image.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rayon::prelude::*;
use sha2::{Digest, Sha256};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::region::PatchPlan;
use crate::sha256::{Midstate, Sha256Resumable, BLOCK, MIDSTATE_BYTES};
use crate::source::ReadAt;
use crate::{Error, Result};

/// Chunk size of kiln's chunk tables: 4 MiB.
pub const CHUNK_SIZE: u64 = 4 << 20;
const DOMAIN: &[u8] = b"kiln-chunked-sha256\0";
const MAGIC: [u8; 8] = *b"KILNCHNK";
const FLAG_SHA256: u32 = 1;
const FLAG_MIDSTATES: u32 = 2;
/// Bytes of the midstate section's header (count, crc32c, reserved).
const MIDSTATES_HEADER: usize = 16;

/// The sidecar header.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct ChunksHeader {
    /// `KILNCHNK`.
    pub magic: [u8; 8],
    /// Format version (1).
    pub version: U32,
    /// Bit 0: `sha256` holds the plain digest of the image.
    pub flags: U32,
    /// Chunk size in bytes.
    pub chunk_size: U64,
    /// Image length in bytes.
    pub image_len: U64,
    /// Number of chunk digests that follow.
    pub count: U64,
    /// Plain sha256 of the image, or zero.
    pub sha256: [u8; 32],
    /// crc32c of the digest array.
    pub digests_crc32c: U32,
    /// crc32c of header bytes 0..76.
    pub header_crc32c: U32,
}
const _: () = assert!(size_of::<ChunksHeader>() == 80);
const _: () = assert!(std::mem::offset_of!(ChunksHeader, sha256) == 40);

/// A chunked digest (see the module docs).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkedDigest(pub [u8; 32]);

impl fmt::Display for ChunkedDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "chunked-sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for ChunkedDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for ChunkedDigest {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let h = s
            .strip_prefix("chunked-sha256:")
            .ok_or_else(|| format!("{s:?}: expected chunked-sha256:<64 hex digits>"))?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(h, &mut out)
            .map_err(|e| format!("{s:?}: expected chunked-sha256:<64 hex digits>: {e}"))?;
        Ok(Self(out))
    }
}

/// Per-chunk sha256 of an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkTable {
    /// Chunk size in bytes.
    pub chunk_size: u64,
    /// Image length in bytes.
    pub image_len: u64,
    /// sha256 of each chunk (the last may be short).
    pub digests: Vec<[u8; 32]>,
    /// Plain sha256 of the whole image, when it was computed.
    pub sha256: Option<[u8; 32]>,
    /// SHA-256 midstates of the image, offsets ascending (empty when none were taken).
    pub midstates: Vec<Midstate>,
}

fn chunk_count(len: u64, chunk: u64) -> u64 {
    len.div_ceil(chunk)
}

fn hash_chunk(
    src: &(dyn ReadAt + Sync),
    off: u64,
    len: usize,
    buf: &mut Vec<u8>,
) -> std::io::Result<[u8; 32]> {
    buf.resize(len, 0);
    src.read_exact_at(off, &mut buf[..len])?;
    Ok(Sha256::digest(&buf[..len]).into())
}

/// `points` rounded down to a multiple of [`BLOCK`], at most `len`, ascending, unique.
fn midstate_points(points: &[u64], len: u64) -> Vec<u64> {
    let mut v: Vec<u64> = points
        .iter()
        .map(|p| p / BLOCK * BLOCK)
        .filter(|&p| p <= len)
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// The plain sha256 of all of `src`, read sequentially in 1 MiB pieces.
pub fn plain_sha256(src: &(dyn ReadAt + Sync)) -> std::io::Result<[u8; 32]> {
    hash_range(src, None, &[]).map(|(sha, _)| sha)
}

/// Hashes `src` sequentially from `from` (a midstate of it, or the start) to its end, taking
/// the midstate at each of `points` (multiples of [`BLOCK`], ascending) passed on the way.
fn hash_range(
    src: &(dyn ReadAt + Sync),
    from: Option<&Midstate>,
    points: &[u64],
) -> std::io::Result<([u8; 32], Vec<Midstate>)> {
    let len = src.len();
    let mut h = from.map_or_else(Sha256Resumable::new, Sha256Resumable::resume);
    let mut off = h.position();
    let mut taken = Vec::new();
    let start = off;
    let mut pts = points.iter().copied().filter(|&p| p >= start).peekable();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        while let Some(&p) = pts.peek() {
            if p != off {
                break;
            }
            taken.extend(h.midstate());
            pts.next();
        }
        if off >= len {
            break;
        }
        let mut k = (len - off).min(buf.len() as u64);
        if let Some(&p) = pts.peek() {
            k = k.min(p - off);
        }
        let k = k as usize;
        src.read_exact_at(off, &mut buf[..k])?;
        h.update(&buf[..k]);
        off += k as u64;
    }
    Ok((h.finalize(), taken))
}

impl ChunkTable {
    /// Hashes every chunk of `src` in parallel (all cores). With `plain`, also computes the
    /// plain sha256 of the whole image in a sequential pass alongside (costs one more core).
    pub fn compute(src: &(dyn ReadAt + Sync), plain: bool) -> std::io::Result<Self> {
        Self::compute_with(src, CHUNK_SIZE, plain, &[])
    }

    /// [`ChunkTable::compute`] with the plain sha256 and the SHA-256 midstates at `points`
    /// (each rounded down to a multiple of 64; see [`crate::SlotTable::resume_points`]).
    pub fn compute_resumable(src: &(dyn ReadAt + Sync), points: &[u64]) -> std::io::Result<Self> {
        Self::compute_with(src, CHUNK_SIZE, true, points)
    }

    /// [`ChunkTable::compute`] with another chunk size (tests) and midstates at `points`
    /// (which imply `plain`).
    pub fn compute_with(
        src: &(dyn ReadAt + Sync),
        chunk_size: u64,
        plain: bool,
        points: &[u64],
    ) -> std::io::Result<Self> {
        let len = src.len();
        let n = chunk_count(len, chunk_size);
        let chunked = || -> std::io::Result<Vec<[u8; 32]>> {
            (0..n)
                .into_par_iter()
                .map_init(Vec::new, |buf, i| {
                    let off = i * chunk_size;
                    hash_chunk(src, off, (len - off).min(chunk_size) as usize, buf)
                })
                .collect()
        };
        let points = midstate_points(points, len);
        let (digests, whole) = if plain || !points.is_empty() {
            let (d, s) = rayon::join(chunked, || hash_range(src, None, &points));
            let (sha, mids) = s?;
            (d?, Some((sha, mids)))
        } else {
            (chunked()?, None)
        };
        let (sha256, midstates) = match whole {
            Some((s, m)) => (Some(s), m),
            None => (None, Vec::new()),
        };
        Ok(Self {
            chunk_size,
            image_len: len,
            digests,
            sha256,
            midstates,
        })
    }

    /// True when a midstate sits at each of `points` (rounded down to a block).
    pub fn has_midstates_at(&self, points: &[u64]) -> bool {
        midstate_points(points, self.image_len)
            .iter()
            .all(|p| self.midstates.iter().any(|m| m.offset == *p))
    }

    /// Hashes `src` (the image this table describes) once from the start to add the plain
    /// sha256 and the midstates at `points`, for tables made without them. A stored sha256
    /// that differs is an error naming `place` (a stale sidecar).
    pub fn add_midstates(
        &mut self,
        src: &(dyn ReadAt + Sync),
        points: &[u64],
        place: &str,
    ) -> Result<()> {
        if src.len() != self.image_len {
            return Err(Error::Chunks {
                place: place.to_string(),
                offset: 24,
                msg: format!(
                    "describes a {}-byte image, the image is {} bytes",
                    self.image_len,
                    src.len()
                ),
            });
        }
        let mut points = midstate_points(points, self.image_len);
        points.extend(self.midstates.iter().map(|m| m.offset));
        points.sort_unstable();
        points.dedup();
        let (sha, mids) = hash_range(src, None, &points)
            .map_err(|e| Error::io(format!("{place}: hashing the image"), e))?;
        if self.sha256.is_some_and(|s| s != sha) {
            return Err(Error::Chunks {
                place: place.to_string(),
                offset: 40,
                msg: "the stored sha256 is not the image's (stale sidecar?)".into(),
            });
        }
        self.sha256 = Some(sha);
        self.midstates = mids;
        Ok(())
    }

    /// The last midstate at or before `offset`.
    pub fn resume_point(&self, offset: u64) -> Option<&Midstate> {
        self.midstates.iter().rev().find(|m| m.offset <= offset)
    }

    /// The plain sha256 of `composed` (base + `plan`, with `self` the base's table), hashing
    /// only from the last midstate at or before the first patched byte to the end. Returns the
    /// digest and the number of bytes hashed, or `None` when no midstate lies early enough
    /// (the caller decides whether a full pass is worth it).
    pub fn composed_sha256(
        &self,
        composed: &(dyn ReadAt + Sync),
        plan: &PatchPlan,
    ) -> Result<Option<([u8; 32], u64)>> {
        self.check_shape(composed.len(), plan)?;
        let Some(first) = plan.regions().first() else {
            return Ok(self.sha256.map(|s| (s, 0)));
        };
        let Some(m) = self.resume_point(first.offset) else {
            return Ok(None);
        };
        let (sha, _) = hash_range(composed, Some(m), &[])
            .map_err(|e| Error::io("reading the composed image from the first patch", e))?;
        Ok(Some((sha, self.image_len - m.offset)))
    }

    /// Checks every midstate against the plain sha256 by hashing from the earliest one to the
    /// end of `src` (a stale or damaged sidecar must not produce wrong digests). Without a
    /// stored plain sha256 there is nothing to check against and this succeeds.
    pub fn verify_midstates(&self, src: &(dyn ReadAt + Sync), place: &str) -> Result<()> {
        let (Some(want), Some(first)) = (self.sha256, self.midstates.first()) else {
            return Ok(());
        };
        let later: Vec<u64> = self.midstates.iter().map(|m| m.offset).collect();
        let (sha, seen) = hash_range(src, Some(first), &later)
            .map_err(|e| Error::io(format!("{place}: checking midstates"), e))?;
        let err = |msg: String| Error::Chunks {
            place: place.to_string(),
            offset: 80 + 32 * self.digests.len() as u64,
            msg,
        };
        if seen != self.midstates {
            return Err(err(
                "the midstates do not follow from one another (damaged sidecar?)".into(),
            ));
        }
        if sha != want {
            return Err(err(format!(
                "resuming at byte {} does not give the stored sha256 (stale sidecar?)",
                first.offset
            )));
        }
        Ok(())
    }

    fn check_shape(&self, len: u64, plan: &PatchPlan) -> Result<()> {
        if self.image_len != plan.image_len() || len != self.image_len {
            return Err(Error::Chunks {
                place: "base chunk table".into(),
                offset: 24,
                msg: format!(
                    "table is for a {}-byte image, the image is {len} bytes",
                    self.image_len
                ),
            });
        }
        Ok(())
    }

    /// The chunked digest.
    pub fn digest(&self) -> ChunkedDigest {
        let mut h = Sha256::new();
        h.update(DOMAIN);
        h.update(self.chunk_size.to_le_bytes());
        h.update(self.image_len.to_le_bytes());
        for d in &self.digests {
            h.update(d);
        }
        ChunkedDigest(h.finalize().into())
    }

    /// Indices of the chunks `plan` touches, ascending, without duplicates.
    pub fn touched(&self, plan: &PatchPlan) -> Vec<u64> {
        let mut out: Vec<u64> = Vec::new();
        for r in plan.regions() {
            let first = r.offset / self.chunk_size;
            let last = (r.end() - 1) / self.chunk_size;
            let from = match out.last() {
                Some(&l) if l >= first => l + 1,
                _ => first,
            };
            out.extend(from..=last);
        }
        out
    }

    /// The table of `composed` (base + `plan`), given that `self` is the base's table: only the
    /// chunks the plan touches are read (from `composed`) and rehashed. The plain sha256 is
    /// dropped ([`ChunkTable::composed_sha256`] computes it from a midstate); the midstates
    /// before the first patched byte stay valid and are kept.
    pub fn compose(&self, composed: &(dyn ReadAt + Sync), plan: &PatchPlan) -> Result<Self> {
        self.check_shape(composed.len(), plan)?;
        let touched = self.touched(plan);
        let fresh: Vec<(u64, [u8; 32])> = touched
            .par_iter()
            .map_init(Vec::new, |buf, &i| {
                let off = i * self.chunk_size;
                let len = (self.image_len - off).min(self.chunk_size) as usize;
                hash_chunk(composed, off, len, buf).map(|d| (i, d))
            })
            .collect::<std::io::Result<_>>()
            .map_err(|e| Error::io("reading patched chunks", e))?;
        let mut digests = self.digests.clone();
        for (i, d) in fresh {
            if let Some(slot) = digests.get_mut(i as usize) {
                *slot = d;
            }
        }
        let first = plan.regions().first().map_or(u64::MAX, |r| r.offset);
        Ok(Self {
            chunk_size: self.chunk_size,
            image_len: self.image_len,
            digests,
            sha256: if plan.regions().is_empty() {
                self.sha256
            } else {
                None
            },
            midstates: self
                .midstates
                .iter()
                .filter(|m| m.offset <= first)
                .copied()
                .collect(),
        })
    }

    /// Indices of chunks whose digests differ between two tables of the same shape.
    pub fn diff(&self, other: &ChunkTable) -> Vec<u64> {
        self.digests
            .iter()
            .zip(&other.digests)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| i as u64)
            .collect()
    }

    /// The sidecar encoding.
    pub fn to_bytes(&self) -> Vec<u8> {
        let digests: Vec<u8> = self.digests.iter().flatten().copied().collect();
        let mut flags = 0;
        if self.sha256.is_some() {
            flags |= FLAG_SHA256;
        }
        if !self.midstates.is_empty() {
            flags |= FLAG_MIDSTATES;
        }
        let mut h = ChunksHeader {
            magic: MAGIC,
            version: if self.midstates.is_empty() { 1 } else { 2 }.into(),
            flags: flags.into(),
            chunk_size: self.chunk_size.into(),
            image_len: self.image_len.into(),
            count: (self.digests.len() as u64).into(),
            sha256: self.sha256.unwrap_or([0; 32]),
            digests_crc32c: crc32c::crc32c(&digests).into(),
            header_crc32c: 0.into(),
        };
        h.header_crc32c = crc32c::crc32c(&h.as_bytes()[..76]).into();
        let mut out = h.as_bytes().to_vec();
        out.extend_from_slice(&digests);
        if !self.midstates.is_empty() {
            let entries: Vec<u8> = self.midstates.iter().flat_map(|m| m.to_bytes()).collect();
            out.extend_from_slice(&(self.midstates.len() as u64).to_le_bytes());
            out.extend_from_slice(&crc32c::crc32c(&entries).to_le_bytes());
            out.extend_from_slice(&[0u8; 4]);
            out.extend_from_slice(&entries);
        }
        out
    }

    /// Parses a sidecar (`place` names it in errors).
    pub fn from_bytes(b: &[u8], place: &str) -> Result<Self> {
        let err = |offset: u64, msg: String| Error::Chunks {
            place: place.to_string(),
            offset,
            msg,
        };
        let hb = b.get(..80).ok_or_else(|| {
            err(
                0,
                format!("{} bytes, shorter than the 80-byte header", b.len()),
            )
        })?;
        let h =
            ChunksHeader::read_from_bytes(hb).map_err(|_| err(0, "unreadable header".into()))?;
        if h.magic != MAGIC {
            return Err(err(0, "expected magic \"KILNCHNK\"".into()));
        }
        if crc32c::crc32c(&hb[..76]) != h.header_crc32c.get() {
            return Err(err(76, "header checksum mismatch".into()));
        }
        let version = h.version.get();
        if version != 1 && version != 2 {
            return Err(err(8, format!("unsupported version {version}")));
        }
        let flags = h.flags.get();
        if (flags & FLAG_MIDSTATES != 0) != (version == 2) {
            return Err(err(
                12,
                format!("version {version} with flags {flags:#x}: midstates belong to version 2"),
            ));
        }
        let (chunk_size, image_len, count) = (h.chunk_size.get(), h.image_len.get(), h.count.get());
        if chunk_size == 0 || chunk_count(image_len, chunk_size) != count {
            return Err(err(
                16,
                format!("{count} chunks do not cover {image_len} bytes in chunks of {chunk_size}"),
            ));
        }
        let want = count
            .checked_mul(32)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| err(32, format!("chunk count {count} too large")))?;
        let rest = b.get(80..).unwrap_or_default();
        let (body, trailer) = if version == 2 {
            if rest.len() < want {
                return Err(err(
                    80,
                    format!(
                        "expected {want} bytes of digests, found {} (truncated?)",
                        rest.len()
                    ),
                ));
            }
            rest.split_at(want)
        } else {
            (rest, &[][..])
        };
        if body.len() != want {
            return Err(err(
                80,
                format!(
                    "expected {want} bytes of digests, found {} (truncated?)",
                    body.len()
                ),
            ));
        }
        if crc32c::crc32c(body) != h.digests_crc32c.get() {
            return Err(err(80, "digest array checksum mismatch".into()));
        }
        let digests = body
            .chunks_exact(32)
            .map(|c| {
                let mut d = [0u8; 32];
                d.copy_from_slice(c);
                d
            })
            .collect();
        let midstates = if version == 2 {
            parse_midstates(trailer, 80 + want as u64, image_len, &err)?
        } else {
            Vec::new()
        };
        Ok(Self {
            chunk_size,
            image_len,
            digests,
            sha256: (flags & FLAG_SHA256 != 0).then_some(h.sha256),
            midstates,
        })
    }

    /// Reads `IMAGE.chunks` for `image` if it exists and matches the image's length.
    pub fn load_sidecar(image: &Path, image_len: u64) -> Result<Option<Self>> {
        let p = sidecar_path(image);
        let bytes = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(p.display(), e)),
        };
        let t = Self::from_bytes(&bytes, &p.display().to_string())?;
        if t.image_len != image_len {
            return Err(Error::Chunks {
                place: p.display().to_string(),
                offset: 24,
                msg: format!(
                    "describes a {}-byte image but {} is {image_len} bytes (stale sidecar?)",
                    t.image_len,
                    image.display()
                ),
            });
        }
        Ok(Some(t))
    }
}

/// The version 2 midstate section at sidecar offset `at`.
fn parse_midstates(
    b: &[u8],
    at: u64,
    image_len: u64,
    err: &dyn Fn(u64, String) -> Error,
) -> Result<Vec<Midstate>> {
    let Some(head) = b.get(..MIDSTATES_HEADER) else {
        return Err(err(
            at,
            format!(
                "{} bytes where the {MIDSTATES_HEADER}-byte midstate header belongs (truncated?)",
                b.len()
            ),
        ));
    };
    let mut n = [0u8; 8];
    n.copy_from_slice(&head[..8]);
    let count = u64::from_le_bytes(n);
    let mut c = [0u8; 4];
    c.copy_from_slice(&head[8..12]);
    let crc = u32::from_le_bytes(c);
    let entries = &b[MIDSTATES_HEADER..];
    if count.checked_mul(MIDSTATE_BYTES as u64) != Some(entries.len() as u64) {
        return Err(err(
            at,
            format!(
                "{count} midstates need {} bytes, found {} (truncated?)",
                count.saturating_mul(MIDSTATE_BYTES as u64),
                entries.len()
            ),
        ));
    }
    if crc32c::crc32c(entries) != crc {
        return Err(err(at + 8, "midstate checksum mismatch".into()));
    }
    let mut out: Vec<Midstate> = Vec::with_capacity(entries.len() / MIDSTATE_BYTES);
    for (i, e) in entries.chunks_exact(MIDSTATE_BYTES).enumerate() {
        let place = at + (MIDSTATES_HEADER + i * MIDSTATE_BYTES) as u64;
        let mut raw = [0u8; MIDSTATE_BYTES];
        raw.copy_from_slice(e);
        let m = Midstate::from_bytes(&raw).map_err(|msg| err(place, msg))?;
        if m.offset > image_len || out.last().is_some_and(|p| p.offset >= m.offset) {
            return Err(err(
                place,
                format!(
                    "midstate offset {} is out of order or past the {image_len}-byte image",
                    m.offset
                ),
            ));
        }
        out.push(m);
    }
    Ok(out)
}

/// `IMAGE.chunks` for an image path.
pub fn sidecar_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".chunks");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::Region;
    use crate::ComposedImage;
    use std::sync::Arc;

    #[test]
    fn compose_equals_full_recompute_and_sidecar_roundtrips() {
        let base: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 256) as u8).collect();
        let t = ChunkTable::compute_with(&base, 4096, true, &[]).unwrap();
        assert_eq!(t.digests.len(), 25);
        assert_eq!(t.sha256.unwrap(), <[u8; 32]>::from(Sha256::digest(&base)));
        let plan = Arc::new(
            PatchPlan::new(
                100_000,
                vec![
                    Region::bytes(4000, vec![1u8; 200]),
                    Region::zeroes(99_999, 1),
                ],
            )
            .unwrap(),
        );
        let c = ComposedImage::new(&base, plan.clone()).unwrap();
        let composed = t.compose(&c, &plan).unwrap();
        let full = ChunkTable::compute_with(&c, 4096, false, &[]).unwrap();
        assert_eq!(composed, full);
        assert_eq!(t.touched(&plan), vec![0, 1, 24]);
        assert_eq!(t.diff(&composed), vec![0, 1, 24]);
        assert_ne!(t.digest(), composed.digest());
        let d = composed.digest();
        assert_eq!(d.to_string().parse::<ChunkedDigest>().unwrap(), d);
        let bytes = t.to_bytes();
        assert_eq!(ChunkTable::from_bytes(&bytes, "x").unwrap(), t);
        let e = ChunkTable::from_bytes(&bytes[..bytes.len() - 1], "x.chunks").unwrap_err();
        assert!(e.to_string().contains("x.chunks at offset 80"), "{e}");
        let mut bad = bytes.clone();
        bad[100] ^= 1;
        assert!(ChunkTable::from_bytes(&bad, "x").is_err());
    }

    fn sample_base() -> Vec<u8> {
        (0..100_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect()
    }

    #[test]
    fn midstates_give_the_composed_sha256_from_the_tail() {
        let base = sample_base();
        let t = ChunkTable::compute_with(&base, 4096, true, &[50_000, 4000, 99_999, 4000]).unwrap();
        let offsets: Vec<u64> = t.midstates.iter().map(|m| m.offset).collect();
        assert_eq!(
            offsets,
            [3968, 49_984, 99_968],
            "rounded down to blocks, sorted, unique"
        );
        assert_eq!(t.sha256.unwrap(), <[u8; 32]>::from(Sha256::digest(&base)));
        t.verify_midstates(&base, "t").unwrap();

        // Patches from byte 50_100 on: hashing starts at the midstate at 49_984.
        let plan = Arc::new(
            PatchPlan::new(
                100_000,
                vec![
                    Region::bytes(50_100, vec![9u8; 300]),
                    Region::zeroes(99_990, 10),
                ],
            )
            .unwrap(),
        );
        let c = ComposedImage::new(&base, plan.clone()).unwrap();
        let mut all = vec![0u8; 100_000];
        c.read_exact_at(0, &mut all).unwrap();
        let (sha, hashed) = t.composed_sha256(&c, &plan).unwrap().unwrap();
        assert_eq!(sha, <[u8; 32]>::from(Sha256::digest(&all)));
        assert_eq!(hashed, 100_000 - 49_984);
        // The composed table keeps the midstates before the first patch, which still hold.
        let ct = t.compose(&c, &plan).unwrap();
        let kept: Vec<u64> = ct.midstates.iter().map(|m| m.offset).collect();
        assert_eq!(kept, [3968, 49_984]);
        assert_eq!(
            ct.composed_sha256(&c, &PatchPlan::new(100_000, vec![]).unwrap())
                .unwrap(),
            None
        );

        // A patch before every midstate: no shortcut, the caller is told so.
        let early = Arc::new(PatchPlan::new(100_000, vec![Region::bytes(100, vec![1u8])]).unwrap());
        let ce = ComposedImage::new(&base, early.clone()).unwrap();
        assert_eq!(t.composed_sha256(&ce, &early).unwrap(), None);
        // No patches at all: the base's own sha256.
        let none = PatchPlan::new(100_000, vec![]).unwrap();
        assert_eq!(
            t.composed_sha256(&base, &none).unwrap(),
            Some((t.sha256.unwrap(), 0))
        );
    }

    #[test]
    fn midstates_round_trip_through_the_sidecar_and_damage_is_caught() {
        let base = sample_base();
        let t = ChunkTable::compute_with(&base, 4096, true, &[8192, 65_536]).unwrap();
        let bytes = t.to_bytes();
        assert_eq!(
            &bytes[8..12],
            &2u32.to_le_bytes(),
            "version 2 with midstates"
        );
        assert_eq!(ChunkTable::from_bytes(&bytes, "x").unwrap(), t);
        // Without midstates the file stays version 1, as older readers expect.
        let plain = ChunkTable::compute_with(&base, 4096, true, &[]).unwrap();
        assert_eq!(&plain.to_bytes()[8..12], &1u32.to_le_bytes());

        let midstart = 80 + 32 * t.digests.len();
        for (what, cut) in [("header", midstart + 3), ("entries", bytes.len() - 1)] {
            let e = ChunkTable::from_bytes(&bytes[..cut], "x.chunks").unwrap_err();
            assert!(e.to_string().contains("truncated"), "{what}: {e}");
        }
        let mut bad = bytes.clone();
        bad[midstart + 16 + 20] ^= 1;
        let e = ChunkTable::from_bytes(&bad, "x.chunks").unwrap_err();
        assert!(e.to_string().contains("midstate checksum"), "{e}");

        // A table whose midstate does not belong to the image fails the check against the
        // stored sha256 instead of producing wrong digests.
        let mut stale = t.clone();
        stale.midstates[1].state[0] ^= 1;
        let e = stale.verify_midstates(&base, "stale.chunks").unwrap_err();
        assert!(e.to_string().contains("stale.chunks"), "{e}");
        let mut other = base.clone();
        other[90_000] ^= 1;
        let e = t.verify_midstates(&other, "t").unwrap_err();
        assert!(e.to_string().contains("stored sha256"), "{e}");
    }

    #[test]
    fn empty_image() {
        let t = ChunkTable::compute(&Vec::<u8>::new(), true).unwrap();
        assert!(t.digests.is_empty());
        assert_eq!(ChunkTable::from_bytes(&t.to_bytes(), "x").unwrap(), t);
    }
}
