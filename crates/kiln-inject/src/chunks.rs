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

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rayon::prelude::*;
use sha2::{Digest, Sha256};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::region::PatchPlan;
use crate::source::ReadAt;
use crate::{Error, Result};

/// Chunk size of kiln's chunk tables: 4 MiB.
pub const CHUNK_SIZE: u64 = 4 << 20;
const DOMAIN: &[u8] = b"kiln-chunked-sha256\0";
const MAGIC: [u8; 8] = *b"KILNCHNK";
const FLAG_SHA256: u32 = 1;

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

impl ChunkTable {
    /// Hashes every chunk of `src` in parallel (all cores). With `plain`, also computes the
    /// plain sha256 of the whole image in a sequential pass alongside (costs one more core).
    pub fn compute(src: &(dyn ReadAt + Sync), plain: bool) -> std::io::Result<Self> {
        Self::compute_with(src, CHUNK_SIZE, plain)
    }

    /// [`ChunkTable::compute`] with another chunk size (tests).
    pub fn compute_with(
        src: &(dyn ReadAt + Sync),
        chunk_size: u64,
        plain: bool,
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
        let whole = || -> std::io::Result<[u8; 32]> {
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut off = 0;
            while off < len {
                let k = (len - off).min(buf.len() as u64) as usize;
                src.read_exact_at(off, &mut buf[..k])?;
                h.update(&buf[..k]);
                off += k as u64;
            }
            Ok(h.finalize().into())
        };
        let (digests, sha256) = if plain {
            let (d, s) = rayon::join(chunked, whole);
            (d?, Some(s?))
        } else {
            (chunked()?, None)
        };
        Ok(Self {
            chunk_size,
            image_len: len,
            digests,
            sha256,
        })
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
    /// dropped (it cannot be updated without reading everything).
    pub fn compose(&self, composed: &(dyn ReadAt + Sync), plan: &PatchPlan) -> Result<Self> {
        if self.image_len != plan.image_len() || composed.len() != self.image_len {
            return Err(Error::Chunks {
                place: "base chunk table".into(),
                offset: 24,
                msg: format!(
                    "table is for a {}-byte image, the image is {} bytes",
                    self.image_len,
                    composed.len()
                ),
            });
        }
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
        Ok(Self {
            chunk_size: self.chunk_size,
            image_len: self.image_len,
            digests,
            sha256: None,
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
        let mut h = ChunksHeader {
            magic: MAGIC,
            version: 1.into(),
            flags: if self.sha256.is_some() {
                FLAG_SHA256
            } else {
                0
            }
            .into(),
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
        if h.version.get() != 1 {
            return Err(err(8, format!("unsupported version {}", h.version.get())));
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
        let body = b.get(80..).unwrap_or_default();
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
        Ok(Self {
            chunk_size,
            image_len,
            digests,
            sha256: (h.flags.get() & FLAG_SHA256 != 0).then_some(h.sha256),
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
        let t = ChunkTable::compute_with(&base, 4096, true).unwrap();
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
        let full = ChunkTable::compute_with(&c, 4096, false).unwrap();
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

    #[test]
    fn empty_image() {
        let t = ChunkTable::compute(&Vec::<u8>::new(), true).unwrap();
        assert!(t.digests.is_empty());
        assert_eq!(ChunkTable::from_bytes(&t.to_bytes(), "x").unwrap(), t);
    }
}
