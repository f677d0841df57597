//! dm-verity hash trees and superblocks (kernel Documentation/admin-guide/device-mapper/verity.rst;
//! the on-disk superblock and level layout of cryptsetup's `veritysetup format`, format version 1).
//!
//! Format 1 digests are `sha256(salt ‖ block)`. A hash block holds `hash_block_size / 32`
//! digests (128 for 4 KiB blocks) and is zero-padded. Level 0 hashes the data blocks, level
//! `i + 1` hashes the blocks of level `i`, until one block remains; the root hash is the digest
//! of that top block (or of the only data block when there is just one). On the hash device the
//! 512-byte superblock occupies block 0, then the **top** level comes first, followed by each
//! lower level (cryptsetup `hash_levels()`): so the kernel's `hash_start_block` is 1.
//!
//! Hashing runs in parallel across cores (rayon): each task hashes the data behind one hash
//! block (512 KiB of data for 4 KiB blocks) and writes that hash block; upper levels read the
//! level below back from the sink. `sha2` selects the SHA-NI implementation at run time.

use std::fmt::Write as _;
use std::io;

use rayon::prelude::*;
use sha2::{Digest, Sha256};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::repart::Uuid;
use crate::sink::Sink;

/// Superblock signature.
pub const SIGNATURE: [u8; 8] = *b"verity\0\0";
/// On-disk format version this module writes (salt first, superblock present).
pub const VERSION: u32 = 1;
/// Hash type 1: the "normal" (non-Chrome OS) format with `H(salt ‖ block)`.
pub const HASH_TYPE: u32 = 1;
/// Size of the superblock in bytes (it occupies the whole first hash block).
pub const SUPERBLOCK_SIZE: usize = 512;
/// Default data and hash block size.
pub const BLOCK_SIZE: u32 = 4096;
/// Size of a SHA-256 digest.
pub const DIGEST_SIZE: usize = 32;
/// Largest salt the superblock can hold.
pub const MAX_SALT: usize = 256;
/// The only hash algorithm supported.
pub const ALGORITHM: &str = "sha256";

/// The dm-verity superblock (cryptsetup lib/verity/verity.c `struct verity_sb`).
#[derive(Clone, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Superblock {
    /// `verity\0\0`.
    pub signature: [u8; 8],
    /// Superblock version, 1.
    pub version: U32,
    /// 1 = salt before the block (normal), 0 = Chrome OS (salt after).
    pub hash_type: U32,
    /// UUID of this hash device, RFC byte order.
    pub uuid: [u8; 16],
    /// Hash algorithm name, NUL padded (`sha256`).
    pub algorithm: [u8; 32],
    /// Data block size in bytes.
    pub data_block_size: U32,
    /// Hash block size in bytes.
    pub hash_block_size: U32,
    /// Number of data blocks covered.
    pub data_blocks: U64,
    /// Bytes of `salt` in use.
    pub salt_size: U16,
    /// Zero.
    pub pad1: [u8; 6],
    /// Salt, zero padded.
    pub salt: [u8; MAX_SALT],
    /// Zero.
    pub pad2: [u8; 168],
}
const _: () = assert!(size_of::<Superblock>() == SUPERBLOCK_SIZE);
const _: () = assert!(std::mem::offset_of!(Superblock, data_block_size) == 64);
const _: () = assert!(std::mem::offset_of!(Superblock, salt_size) == 80);
const _: () = assert!(std::mem::offset_of!(Superblock, salt) == 88);

/// Errors from formatting or verifying. Offsets are bytes within the named device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerityError {
    /// Reading the data device failed.
    #[error("data device: read at byte {offset}: {source}")]
    DataIo {
        /// Byte offset of the failed read.
        offset: u64,
        /// The underlying error.
        source: io::Error,
    },
    /// Reading or writing the hash device failed.
    #[error("hash device: i/o at byte {offset}: {source}")]
    HashIo {
        /// Byte offset of the failed access.
        offset: u64,
        /// The underlying error.
        source: io::Error,
    },
    /// Parameters are unusable.
    #[error("{0}")]
    BadParams(String),
    /// The superblock is not a supported dm-verity superblock.
    #[error("hash device: superblock at byte 0: {0}")]
    BadSuperblock(String),
    /// The hash device is too small for the tree.
    #[error("hash device is {have} bytes, the tree for {data_blocks} data blocks needs {need}")]
    HashTooSmall {
        /// Bytes available.
        have: u64,
        /// Bytes needed.
        need: u64,
        /// Data blocks covered.
        data_blocks: u64,
    },
    /// A stored digest does not match the block it covers.
    #[error(
        "verification failed: level {level} hash block {hash_block} (hash device byte \
         {hash_offset}) does not match {what} {index}"
    )]
    Mismatch {
        /// Tree level (0 = digests of data blocks).
        level: usize,
        /// Hash block number within the hash device.
        hash_block: u64,
        /// Byte offset of that hash block.
        hash_offset: u64,
        /// `data block` or `hash block`.
        what: &'static str,
        /// Index of the covered block (data block number, or hash-device block number).
        index: u64,
    },
    /// The recomputed root hash differs.
    #[error("verification failed: root hash is {computed}, expected {expected}")]
    RootMismatch {
        /// Hex of the computed root hash.
        computed: String,
        /// Hex of the expected root hash.
        expected: String,
    },
}

/// Formatting parameters (the ones `veritysetup format` takes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Params {
    /// Salt (0..=256 bytes); kiln uses 32 bytes from the seed.
    pub salt: Vec<u8>,
    /// Superblock UUID, RFC byte order.
    pub uuid: Uuid,
    /// Data block size in bytes (power of two, 512..=1 MiB).
    pub data_block_size: u32,
    /// Hash block size in bytes (power of two, 512..=1 MiB).
    pub hash_block_size: u32,
}

impl Params {
    /// 4 KiB data and hash blocks, sha256, with this salt and UUID (veritysetup's defaults).
    pub fn new(salt: &[u8], uuid: Uuid) -> Params {
        Params {
            salt: salt.to_vec(),
            uuid,
            data_block_size: BLOCK_SIZE,
            hash_block_size: BLOCK_SIZE,
        }
    }

    fn check(&self) -> Result<(), VerityError> {
        if self.salt.len() > MAX_SALT {
            return Err(VerityError::BadParams(format!(
                "salt of {} bytes, at most {MAX_SALT}",
                self.salt.len()
            )));
        }
        for (what, v) in [
            ("data block size", self.data_block_size),
            ("hash block size", self.hash_block_size),
        ] {
            if !v.is_power_of_two() || !(512..=1 << 20).contains(&v) {
                return Err(VerityError::BadParams(format!(
                    "{what} {v} is not a power of two in 512..=1048576"
                )));
            }
        }
        Ok(())
    }
}

/// Where each level of a tree lives on the hash device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Data blocks covered.
    pub data_blocks: u64,
    /// Per level (index 0 = hashes of data blocks): first hash-device block and block count.
    pub levels: Vec<(u64, u64)>,
    /// Hash-device blocks in total, superblock block included.
    pub total_blocks: u64,
    /// Hash block size in bytes.
    pub hash_block_size: u32,
}

impl Layout {
    /// The level layout for `data_blocks` blocks (cryptsetup `hash_levels()`).
    pub fn new(data_blocks: u64, hash_block_size: u32) -> Layout {
        let per_block_bits = (hash_block_size as usize / DIGEST_SIZE).trailing_zeros();
        let mut levels = 0u32;
        while per_block_bits * levels < 64
            && (data_blocks.saturating_sub(1) >> (per_block_bits * levels)) != 0
        {
            levels += 1;
        }
        let mut out = vec![(0u64, 0u64); levels as usize];
        let mut pos = 1u64; // block 0 is the superblock
        for i in (0..levels as usize).rev() {
            let shift = (i as u32 + 1) * per_block_bits;
            let n = if shift >= 64 {
                1
            } else {
                data_blocks.div_ceil(1u64 << shift)
            };
            out[i] = (pos, n);
            pos += n;
        }
        Layout {
            data_blocks,
            levels: out,
            total_blocks: pos,
            hash_block_size,
        }
    }

    /// Size of the hash device in bytes.
    pub fn hash_size(&self) -> u64 {
        self.total_blocks * u64::from(self.hash_block_size)
    }
}

/// Size in bytes of the hash device `format` writes for `data_size` bytes of data.
pub fn hash_size(data_size: u64, params: &Params) -> u64 {
    Layout::new(
        data_size / u64::from(params.data_block_size),
        params.hash_block_size,
    )
    .hash_size()
}

/// What `format` produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Formatted {
    /// The root hash.
    pub root_hash: [u8; 32],
    /// Data blocks covered.
    pub data_blocks: u64,
    /// Bytes of the hash device written (superblock block included).
    pub hash_size: u64,
}

impl Formatted {
    /// The root hash as lowercase hex (the `roothash=` kernel argument).
    pub fn root_hash_hex(&self) -> String {
        hex(&self.root_hash)
    }
}

/// A positional reader over a device: fills the buffer from the given byte offset.
pub type ReadAt<'a> = &'a (dyn Fn(u64, &mut [u8]) -> io::Result<()> + Sync);

/// Lowercase hex of bytes.
pub fn hex(b: &[u8]) -> String {
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

/// The superblock for `params` covering `data_blocks` blocks.
pub fn superblock(params: &Params, data_blocks: u64) -> Result<Superblock, VerityError> {
    params.check()?;
    let mut algorithm = [0u8; 32];
    algorithm[..ALGORITHM.len()].copy_from_slice(ALGORITHM.as_bytes());
    let mut salt = [0u8; MAX_SALT];
    salt[..params.salt.len()].copy_from_slice(&params.salt);
    Ok(Superblock {
        signature: SIGNATURE,
        version: U32::new(VERSION),
        hash_type: U32::new(HASH_TYPE),
        uuid: params.uuid.into_bytes(),
        algorithm,
        data_block_size: U32::new(params.data_block_size),
        hash_block_size: U32::new(params.hash_block_size),
        data_blocks: U64::new(data_blocks),
        salt_size: U16::new(params.salt.len() as u16),
        pad1: [0; 6],
        salt,
        pad2: [0; 168],
    })
}

/// Parses and checks a superblock, returning it with the parameters it records.
pub fn parse_superblock(bytes: &[u8]) -> Result<(Superblock, Params), VerityError> {
    let bad = |m: String| VerityError::BadSuperblock(m);
    let (sb, _) = Superblock::read_from_prefix(bytes)
        .map_err(|_| bad(format!("{} bytes, expected {SUPERBLOCK_SIZE}", bytes.len())))?;
    if sb.signature != SIGNATURE {
        return Err(bad(format!(
            "signature {:02x?}, expected \"verity\\0\\0\"",
            sb.signature
        )));
    }
    if sb.version.get() != VERSION {
        return Err(bad(format!("version {}, expected 1", sb.version.get())));
    }
    if sb.hash_type.get() != HASH_TYPE {
        return Err(bad(format!(
            "hash type {}, only 1 (salt first) is supported",
            sb.hash_type.get()
        )));
    }
    let alg_len = sb.algorithm.iter().position(|&b| b == 0).unwrap_or(32);
    let alg = String::from_utf8_lossy(&sb.algorithm[..alg_len]).into_owned();
    if alg != ALGORITHM {
        return Err(bad(format!("algorithm {alg:?}, only sha256 is supported")));
    }
    let salt_len = usize::from(sb.salt_size.get());
    if salt_len > MAX_SALT {
        return Err(bad(format!("salt size {salt_len}, at most {MAX_SALT}")));
    }
    let params = Params {
        salt: sb.salt[..salt_len].to_vec(),
        uuid: Uuid::from_bytes(sb.uuid),
        data_block_size: sb.data_block_size.get(),
        hash_block_size: sb.hash_block_size.get(),
    };
    params.check().map_err(|e| bad(e.to_string()))?;
    Ok((sb, params))
}

/// Receives each finished hash block of a level with its index within the level.
type BlockOut<'a> = &'a (dyn Fn(u64, &[u8]) -> Result<(), VerityError> + Sync);
/// Turns a source read failure at a byte offset into the right error.
type SrcError<'a> = &'a (dyn Fn(u64, io::Error) -> VerityError + Sync);

/// Hashes `src_blocks` blocks of `block_size` bytes read through `src`, 128 (for 4 KiB hash
/// blocks) digests per hash block, and hands each finished hash block with its index to `out`.
/// Runs one task per hash block on the rayon pool.
fn hash_level(
    salt_state: &Sha256,
    src: ReadAt<'_>,
    src_blocks: u64,
    block_size: usize,
    hash_block_size: usize,
    out: BlockOut<'_>,
    src_error: SrcError<'_>,
) -> Result<(), VerityError> {
    let per = (hash_block_size / DIGEST_SIZE) as u64;
    let n_hash = src_blocks.div_ceil(per);
    // Read at most 512 KiB (one 4 KiB hash block's worth of 4 KiB blocks) at a time, so large
    // block sizes from a foreign superblock cannot demand huge buffers.
    let chunk_blocks = ((512usize << 10) / block_size).max(1) as u64;
    (0..n_hash).into_par_iter().try_for_each_init(
        || {
            (
                vec![0u8; chunk_blocks as usize * block_size],
                vec![0u8; hash_block_size],
            )
        },
        |(buf, hb), j| {
            let first = j * per;
            let count = (src_blocks - first).min(per);
            hb.fill(0);
            let mut done = 0u64;
            while done < count {
                let n = (count - done).min(chunk_blocks);
                let offset = (first + done) * block_size as u64;
                let data = &mut buf[..n as usize * block_size];
                src(offset, data).map_err(|e| src_error(offset, e))?;
                for (k, block) in data.chunks_exact(block_size).enumerate() {
                    let mut h = salt_state.clone();
                    h.update(block);
                    let at = (done as usize + k) * DIGEST_SIZE;
                    hb[at..at + DIGEST_SIZE].copy_from_slice(&h.finalize());
                }
                done += n;
            }
            out(j, hb)
        },
    )
}

/// Builds the hash tree for `data_size` bytes (a multiple of the data block size) read through
/// `data`, writing superblock and tree into `hash` (whose window must hold at least
/// [`hash_size`] bytes; it must read back as zeroes where nothing was written).
pub fn format(
    params: &Params,
    data_size: u64,
    data: ReadAt<'_>,
    hash: &dyn Sink,
) -> Result<Formatted, VerityError> {
    params.check()?;
    let dbs = u64::from(params.data_block_size);
    if !data_size.is_multiple_of(dbs) || data_size == 0 {
        return Err(VerityError::BadParams(format!(
            "data size {data_size} is not a positive multiple of the {dbs}-byte data block"
        )));
    }
    let data_blocks = data_size / dbs;
    let layout = Layout::new(data_blocks, params.hash_block_size);
    if hash.len() < layout.hash_size() {
        return Err(VerityError::HashTooSmall {
            have: hash.len(),
            need: layout.hash_size(),
            data_blocks,
        });
    }
    let hbs = params.hash_block_size as usize;
    let mut salted = Sha256::new();
    salted.update(&params.salt);

    let sb = superblock(params, data_blocks)?;
    hash.write_at(0, sb.as_bytes())
        .map_err(|source| VerityError::HashIo { offset: 0, source })?;

    let hash_io = |offset: u64, source: io::Error| VerityError::HashIo { offset, source };
    let data_io = |offset: u64, source: io::Error| VerityError::DataIo { offset, source };
    let hash_read = |off: u64, buf: &mut [u8]| hash.read_at(off, buf);
    for (i, &(start, _)) in layout.levels.iter().enumerate() {
        let write = |j: u64, block: &[u8]| {
            let off = (start + j) * hbs as u64;
            hash.write_at(off, block).map_err(|e| hash_io(off, e))
        };
        if i == 0 {
            hash_level(
                &salted,
                data,
                data_blocks,
                dbs as usize,
                hbs,
                &write,
                &data_io,
            )?;
        } else {
            let (below_start, below_n) = layout.levels[i - 1];
            let below = |off: u64, buf: &mut [u8]| hash_read(below_start * hbs as u64 + off, buf);
            hash_level(&salted, &below, below_n, hbs, hbs, &write, &hash_io)?;
        }
    }
    let root = top_digest(&salted, &layout, data, hash, dbs as usize)?;
    Ok(Formatted {
        root_hash: root,
        data_blocks,
        hash_size: layout.hash_size(),
    })
}

/// The root hash: digest of the top hash block, or of the only data block.
fn top_digest(
    salted: &Sha256,
    layout: &Layout,
    data: ReadAt<'_>,
    hash: &dyn Sink,
    dbs: usize,
) -> Result<[u8; 32], VerityError> {
    let hbs = layout.hash_block_size as usize;
    let mut h = salted.clone();
    match layout.levels.last() {
        Some(&(start, _)) => {
            let mut top = vec![0u8; hbs];
            let off = start * hbs as u64;
            hash.read_at(off, &mut top)
                .map_err(|source| VerityError::HashIo {
                    offset: off,
                    source,
                })?;
            h.update(&top);
        }
        None => {
            let mut block = vec![0u8; dbs];
            data(0, &mut block).map_err(|source| VerityError::DataIo { offset: 0, source })?;
            h.update(&block);
        }
    }
    Ok(h.finalize().into())
}

/// What `verify` checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The parameters read from the superblock.
    pub params: Params,
    /// Data blocks checked.
    pub data_blocks: u64,
}

/// Checks every data block and every hash block against `root_hash`, like `veritysetup
/// verify`. `hash` is read from byte 0 (superblock) on; `data` must hold at least the data
/// blocks the superblock names. Fails naming the first mismatching hash block and the block it
/// covers.
pub fn verify(
    data: ReadAt<'_>,
    hash: ReadAt<'_>,
    hash_len: u64,
    root_hash: &[u8; 32],
) -> Result<Verified, VerityError> {
    let mut raw = [0u8; SUPERBLOCK_SIZE];
    hash(0, &mut raw).map_err(|source| VerityError::HashIo { offset: 0, source })?;
    let (sb, params) = parse_superblock(&raw)?;
    let data_blocks = sb.data_blocks.get();
    let layout = Layout::new(data_blocks, params.hash_block_size);
    if hash_len < layout.hash_size() {
        return Err(VerityError::HashTooSmall {
            have: hash_len,
            need: layout.hash_size(),
            data_blocks,
        });
    }
    let hbs = params.hash_block_size as usize;
    let dbs = params.data_block_size as usize;
    let per = (hbs / DIGEST_SIZE) as u64;
    let mut salted = Sha256::new();
    salted.update(&params.salt);
    let hash_io = |offset: u64, source: io::Error| VerityError::HashIo { offset, source };
    let data_io = |offset: u64, source: io::Error| VerityError::DataIo { offset, source };
    for (i, &(start, _)) in layout.levels.iter().enumerate() {
        let compare = |j: u64, computed: &[u8]| {
            let off = (start + j) * hbs as u64;
            let mut stored = vec![0u8; hbs];
            hash(off, &mut stored).map_err(|e| hash_io(off, e))?;
            if stored == computed {
                return Ok(());
            }
            let k = stored
                .chunks(DIGEST_SIZE)
                .zip(computed.chunks(DIGEST_SIZE))
                .position(|(a, b)| a != b)
                .unwrap_or(0) as u64;
            let (what, index) = if i == 0 {
                ("data block", j * per + k)
            } else {
                ("hash block", layout.levels[i - 1].0 + j * per + k)
            };
            Err(VerityError::Mismatch {
                level: i,
                hash_block: start + j,
                hash_offset: off,
                what,
                index,
            })
        };
        if i == 0 {
            hash_level(&salted, data, data_blocks, dbs, hbs, &compare, &data_io)?;
        } else {
            let (below_start, below_n) = layout.levels[i - 1];
            let below = |off: u64, buf: &mut [u8]| hash(below_start * hbs as u64 + off, buf);
            hash_level(&salted, &below, below_n, hbs, hbs, &compare, &hash_io)?;
        }
    }
    let mut h = salted.clone();
    match layout.levels.last() {
        Some(&(start, _)) => {
            let mut top = vec![0u8; hbs];
            let off = start * hbs as u64;
            hash(off, &mut top).map_err(|e| hash_io(off, e))?;
            h.update(&top);
        }
        None => {
            let mut block = vec![0u8; dbs];
            data(0, &mut block).map_err(|e| data_io(0, e))?;
            h.update(&block);
        }
    }
    let computed: [u8; 32] = h.finalize().into();
    if &computed != root_hash {
        return Err(VerityError::RootMismatch {
            computed: hex(&computed),
            expected: hex(root_hash),
        });
    }
    Ok(Verified {
        params,
        data_blocks,
    })
}

/// The level-0 digest of one data block: `sha256(salt ‖ block)` (format 1). Digests of a
/// block fetched from elsewhere compare with the tree's level 0 only through this salted form.
pub fn block_digest(salt: &[u8], block: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(block);
    h.finalize().into()
}

/// The root hash of the tree whose level 0 is `level0` (`data_blocks * 32` bytes: the digests
/// of the data blocks in order), computed the way [`format`] computes it: 128 digests per
/// zero-padded 4 KiB hash block, level after level, the root being the digest of the top block
/// (or the only data block's digest when there is one block). Lets an index of level-0 digests
/// be checked against a root hash without the data.
pub fn root_from_level0(params: &Params, level0: &[u8]) -> Result<[u8; 32], VerityError> {
    params.check()?;
    if level0.is_empty() || !level0.len().is_multiple_of(DIGEST_SIZE) {
        return Err(VerityError::BadParams(format!(
            "{} bytes of level-0 digests is not a positive multiple of {DIGEST_SIZE}",
            level0.len()
        )));
    }
    let data_blocks = (level0.len() / DIGEST_SIZE) as u64;
    let layout = Layout::new(data_blocks, params.hash_block_size);
    let hbs = params.hash_block_size as usize;
    let mut salted = Sha256::new();
    salted.update(&params.salt);
    let mut cur = level0.to_vec();
    for _ in &layout.levels {
        let next: Vec<u8> = cur
            .par_chunks(hbs)
            .flat_map_iter(|digests| {
                let mut block = vec![0u8; hbs];
                block[..digests.len()].copy_from_slice(digests);
                let mut h = salted.clone();
                h.update(&block);
                <[u8; 32]>::from(h.finalize())
            })
            .collect();
        cur = next;
    }
    let mut root = [0u8; 32];
    root.copy_from_slice(&cur[..DIGEST_SIZE]);
    Ok(root)
}

/// The device-mapper table line for a verity target whose superblock sits at the start of the
/// hash device: `1 DATA HASH dbs hbs data_blocks hash_start sha256 ROOT SALT`.
pub fn dm_table(
    data_dev: &str,
    hash_dev: &str,
    params: &Params,
    data_blocks: u64,
    root_hash: &[u8; 32],
) -> String {
    let salt = if params.salt.is_empty() {
        "-".to_string()
    } else {
        hex(&params.salt)
    };
    // The superblock fills hash block 0, so the tree starts at hash block 1.
    format!(
        "{VERSION} {data_dev} {hash_dev} {} {} {data_blocks} 1 {ALGORITHM} {} {salt}",
        params.data_block_size,
        params.hash_block_size,
        hex(root_hash)
    )
}

/// A human-readable dump of a superblock and the tree layout it implies.
pub fn dump(superblock_bytes: &[u8]) -> Result<String, VerityError> {
    let (sb, p) = parse_superblock(superblock_bytes)?;
    let layout = Layout::new(sb.data_blocks.get(), p.hash_block_size);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "dm-verity superblock (format {VERSION}, hash type {HASH_TYPE})"
    );
    let _ = writeln!(s, "  uuid        {}", p.uuid);
    let _ = writeln!(s, "  algorithm   {ALGORITHM}");
    let _ = writeln!(
        s,
        "  data blocks {} x {} bytes",
        layout.data_blocks, p.data_block_size
    );
    let _ = writeln!(s, "  hash block  {} bytes", p.hash_block_size);
    let _ = writeln!(s, "  salt        {} ({} bytes)", hex(&p.salt), p.salt.len());
    for (i, (start, n)) in layout.levels.iter().enumerate().rev() {
        let _ = writeln!(
            s,
            "  level {i}: hash blocks {start}..{} (bytes {}..{})",
            start + n,
            start * u64::from(p.hash_block_size),
            (start + n) * u64::from(p.hash_block_size)
        );
    }
    let _ = writeln!(s, "  hash device {} bytes", layout.hash_size());
    Ok(s)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::sink::MemSink;

    #[test]
    fn layout_matches_spec_examples() {
        // 300 data blocks: 2 levels, 5 hash-device blocks (superblock + 1 + 3).
        let l = Layout::new(300, 4096);
        assert_eq!(l.levels, vec![(2, 3), (1, 1)]);
        assert_eq!(l.total_blocks, 5);
        assert_eq!(Layout::new(1, 4096).levels, vec![]);
        assert_eq!(Layout::new(128, 4096).levels, vec![(1, 1)]);
        assert_eq!(Layout::new(129, 4096).levels, vec![(2, 2), (1, 1)]);
        assert_eq!(
            Layout::new(16385, 4096).levels,
            vec![(4, 129), (2, 2), (1, 1)]
        );
    }

    fn mem_reader(v: &[u8]) -> impl Fn(u64, &mut [u8]) -> io::Result<()> + Sync + '_ {
        move |off, buf| {
            let o = off as usize;
            buf.copy_from_slice(&v[o..o + buf.len()]);
            Ok(())
        }
    }

    #[test]
    fn root_from_level0_matches_format() {
        for blocks in [1usize, 2, 127, 128, 129, 300, 16385] {
            let data: Vec<u8> = (0..blocks * 4096)
                .map(|i| (i * 7 + i / 4096) as u8)
                .collect();
            let params = Params::new(&[9u8; 32], Uuid::from_bytes([3u8; 16]));
            let sink = crate::sink::MemSink::new(hash_size(data.len() as u64, &params) as usize);
            let f = format(&params, data.len() as u64, &mem_reader(&data), &sink).unwrap();
            let level0: Vec<u8> = data
                .chunks(4096)
                .flat_map(|b| block_digest(&params.salt, b))
                .collect();
            assert_eq!(
                root_from_level0(&params, &level0).unwrap(),
                f.root_hash,
                "{blocks}"
            );
            let mut bad = level0.clone();
            bad[5] ^= 1;
            assert_ne!(
                root_from_level0(&params, &bad).unwrap(),
                f.root_hash,
                "{blocks}"
            );
        }
    }

    #[test]
    fn format_then_verify_and_detect_flips() {
        let params = Params::new(&[0xAB; 32], Uuid::from_bytes([3; 16]));
        let mut data: Vec<u8> = (0..300 * 4096u32)
            .map(|i| (i * 7 + i / 4096) as u8)
            .collect();
        let hs = hash_size(data.len() as u64, &params);
        assert_eq!(hs, 5 * 4096);
        let sink = MemSink::new(hs as usize);
        let f = format(&params, data.len() as u64, &mem_reader(&data), &sink).unwrap();
        let hashdev = sink.into_inner();
        assert_eq!(f.data_blocks, 300);
        let v = verify(&mem_reader(&data), &mem_reader(&hashdev), hs, &f.root_hash).unwrap();
        assert_eq!(v.params, params);
        assert!(dump(&hashdev)
            .unwrap()
            .contains("level 1: hash blocks 1..2"));

        data[299 * 4096 + 5] ^= 1;
        let e = verify(&mem_reader(&data), &mem_reader(&hashdev), hs, &f.root_hash).unwrap_err();
        assert!(e.to_string().contains("data block 299"), "{e}");
        data[299 * 4096 + 5] ^= 1;
        let mut bad_hash = hashdev.clone();
        bad_hash[4096 + 33] ^= 1; // top level block
        let e = verify(&mem_reader(&data), &mem_reader(&bad_hash), hs, &f.root_hash).unwrap_err();
        assert!(
            matches!(
                e,
                VerityError::Mismatch {
                    level: 1,
                    hash_block: 1,
                    ..
                }
            ),
            "{e}"
        );
        assert!(format(
            &params,
            4095,
            &mem_reader(&data),
            &MemSink::new(hs as usize)
        )
        .is_err());
        assert!(format(&params, 4096 * 300, &mem_reader(&data), &MemSink::new(4096)).is_err());
        assert!(parse_superblock(&[0u8; 512]).is_err());
        let t = dm_table("/dev/a", "/dev/b", &params, 300, &f.root_hash);
        assert!(
            t.starts_with("1 /dev/a /dev/b 4096 4096 300 1 sha256 "),
            "{t}"
        );
    }
}
