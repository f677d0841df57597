//! Delta updates over the network: the signed update index `kiln build` writes next to the
//! split artifacts, and `kiln update IMAGE --from URL`, which builds the new root slot from
//! blocks the disk already has and fetches only the others.
//!
//! ## The index: `NAME_VERSION.index` (+ `.index.minisig` with `--sign`)
//!
//! Little-endian, version 2:
//!
//! | off | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `KILNUIDX` |
//! | 8 | 4 | format version, 2 |
//! | 12 | 4 | length J of the JSON header |
//! | 16 | 8 | D: digests of the root data (its 4 KiB blocks) |
//! | 24 | 8 | U: digests of the UKI (its 4 KiB blocks, the last one zero-padded) |
//! | 32 | J | JSON header ([`IndexMeta`]: name, version, disk GUID, partition types, verity salt, UUID and root hash, the three artifacts with size and sha256, the UKI's ESP name) |
//! | 32+J | to the end | one zstd frame of 32·(D+U) bytes: the D root data digests (the dm-verity tree's level 0, copied from the hash partition the build wrote), then the U UKI block digests |
//!
//! Why compressed: a root slot is sized for later versions, so much of it is free space, whose
//! blocks all have the one digest of a zero block. On a 1 GiB slot holding a 350 MB Debian
//! tree in ext4, the digests are 8 MiB raw and 2.9 MB compressed, which is most of what a
//! one-package update fetches. (Distinct digests do not compress; runs of one do.)
//!
//! Every digest is dm-verity's format-1 digest `sha256(salt ‖ block)` with the image's verity
//! salt (the UKI's too, so one function hashes every block), so a block fetched from anywhere
//! checks against its index entry, and the index's level 0 rebuilds the tree whose root is the
//! signed root hash ([`kiln_formats::verity::root_from_level0`]). A reader checks that before
//! trusting anything else in the index. The whole file is minisign-signed like every other
//! output (`kiln build --sign`); `kiln update --from` refuses an index whose signature does not
//! verify with `--pub`. Size: at most 32 bytes per 4 KiB (0.78 % of the root), and about that
//! per block in use.
//!
//! ## `kiln update IMAGE --from URL/NAME_VERSION.index --pub KEY.pub`
//!
//! 1. Fetch the index and its `.minisig`, verify the signature, parse and self-check it.
//! 2. Open the disk and pick the target slot exactly as `--with` does ([`crate::update`]).
//! 3. Hash every 4 KiB block of the target slot's data partition and of the kept slot's (same
//!    salt): a map from digest to where the block is. A new block is *in place* when the
//!    target already holds it at its position (a resumed run finds its earlier work there),
//!    *local* when either slot holds it anywhere (blocks only in the target, at another
//!    position, are read into memory before anything is written, so the writes cannot
//!    clobber them), and *missing* otherwise. The UKI's blocks come the same way from the
//!    UKIs on the ESP.
//! 4. `--dry-run` stops here and reports what would be fetched.
//! 5. Fetch the UKI's missing blocks, check its sha256, and assemble the new ESP in memory (so
//!    a UKI that does not fit fails before the disk is touched).
//! 6. Name the target slot `_empty` in the GPT (flushed), so an interrupted run is picked up
//!    by the next one and nothing takes the slot for a version while it is being rewritten.
//! 7. Write the local blocks, then fetch the missing ones as coalesced Range requests (several
//!    in flight, retried, resumed from the last good block; [`kiln_ship::ranges`]); every
//!    fetched block is checked against its index digest before it is written, and a bad one
//!    is fetched again (and refused after the retries). Zero the partition's tail. Flush.
//! 8. Rebuild the dm-verity hash partition from the data on the disk and require its root hash
//!    to be the signed one (and the hash partition's sha256 the build's): this reads back
//!    every byte of the slot, local blocks included. Flush.
//! 9. Only then the GPT (root hash halves as UUIDs, `NAME_VERSION` as names) and the ESP with
//!    the new UKI, as `--with` does: the slot becomes bootable after its data was verified.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};
use kiln_formats::repart::Uuid;
use kiln_formats::sink::FileSink;
use kiln_formats::verity;
use kiln_ship::ranges::{self, FetchOptions, Verdict};
use kiln_ship::store::Remote;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::artifacts::Artifact;
use crate::update::{self, NewBuild};

/// First 8 bytes of an index.
pub const MAGIC: [u8; 8] = *b"KILNUIDX";
/// The format version this module writes and reads.
pub const VERSION: u32 = 2;
/// Block size of the index (dm-verity's data block).
pub const BLOCK: u64 = 4096;
const HEADER: usize = 32;
/// zstd level of the digest area: runs of one digest are what compresses, and any level finds
/// them; a high level buys nothing on the distinct digests but time.
const DIGEST_ZSTD_LEVEL: i32 = 3;
/// Largest index accepted (a 64 GiB root has a 512 MiB index; bigger is not an index).
const MAX_INDEX: u64 = 1 << 30;

/// One artifact the index describes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct IndexFile {
    /// File name, relative to the index.
    pub file: String,
    /// Bytes.
    pub size: u64,
    /// sha256, hex.
    pub sha256: String,
}

/// The JSON header of an index.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct IndexMeta {
    /// Always `kiln-update-index`.
    pub format: String,
    /// Image name.
    pub name: String,
    /// Image version.
    pub version: String,
    /// Disk GUID (the image family: same seed).
    pub disk_uuid: String,
    /// `SOURCE_DATE_EPOCH` of the build (ESP timestamps).
    pub source_date_epoch: Option<i64>,
    /// Block size of the digests, 4096.
    pub block_size: u64,
    /// dm-verity salt, hex.
    pub salt: String,
    /// dm-verity superblock UUID.
    pub verity_uuid: String,
    /// dm-verity root hash of the root data, hex.
    pub root_hash: String,
    /// DPS type name and GUID of the data partition (`root-x86-64`).
    pub data_type: String,
    /// See `data_type`.
    pub data_type_uuid: String,
    /// DPS type name and GUID of the hash partition.
    pub hash_type: String,
    /// See `hash_type`.
    pub hash_type_uuid: String,
    /// The UKI's name under `EFI/Linux/` (with the boot counter).
    pub uki_name: String,
    /// `NAME_VERSION.root.raw`.
    pub data: IndexFile,
    /// `NAME_VERSION.root-verity.raw`.
    pub hash: IndexFile,
    /// `NAME_VERSION.efi`.
    pub uki: IndexFile,
}

/// A parsed, self-consistent index.
#[derive(Clone, Debug)]
pub struct Index {
    /// The header.
    pub meta: IndexMeta,
    /// Root data digests, one per 4 KiB block.
    pub data: Vec<[u8; 32]>,
    /// UKI digests, one per 4 KiB block.
    pub uki: Vec<[u8; 32]>,
    /// Decoded from `meta`.
    pub salt: Vec<u8>,
    /// Decoded from `meta`.
    pub root_hash: [u8; 32],
}

/// Salted digests of every 4 KiB block of `bytes` (the last one zero-padded).
fn block_digests(salt: &[u8], bytes: &[u8]) -> Vec<[u8; 32]> {
    bytes
        .par_chunks(BLOCK as usize)
        .map(|c| {
            if c.len() == BLOCK as usize {
                verity::block_digest(salt, c)
            } else {
                let mut b = vec![0u8; BLOCK as usize];
                b[..c.len()].copy_from_slice(c);
                verity::block_digest(salt, &b)
            }
        })
        .collect()
}

impl Index {
    /// The file's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let json = serde_json::to_vec(&self.meta)?;
        let digests: Vec<u8> = self
            .data
            .iter()
            .chain(&self.uki)
            .flatten()
            .copied()
            .collect();
        let packed = zstd::bulk::compress(&digests, DIGEST_ZSTD_LEVEL)?;
        let mut out = Vec::with_capacity(HEADER + json.len() + packed.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&u32::try_from(json.len())?.to_le_bytes());
        out.extend_from_slice(&(self.data.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.uki.len() as u64).to_le_bytes());
        out.extend_from_slice(&json);
        out.extend_from_slice(&packed);
        Ok(out)
    }

    /// Parses and checks an index (`what` names it in errors): the header, the counts against
    /// the artifact sizes, and the data digests against the root hash.
    pub fn parse(b: &[u8], what: &str) -> Result<Index> {
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        if b.len() < HEADER || b[..8] != MAGIC {
            bail!("{what}: not a kiln update index (no KILNUIDX magic at byte 0)");
        }
        if u32_at(8) != VERSION {
            bail!(
                "{what}: index format version {} at byte 8; this kiln reads version {VERSION}",
                u32_at(8)
            );
        }
        let j = u32_at(12) as usize;
        let (nd, nu) = (u64_at(16), u64_at(24));
        if b.len() - HEADER < j {
            bail!(
                "{what}: {} bytes, but its JSON header at byte {HEADER} is {j} bytes long",
                b.len()
            );
        }
        // The digest area's size, bounded before anything is allocated for it.
        let area = nd
            .checked_add(nu)
            .and_then(|n| n.checked_mul(32))
            .filter(|&n| n <= MAX_INDEX)
            .ok_or_else(|| {
                anyhow!("{what}: header at byte 16 claims {nd} + {nu} digests; too many")
            })?;
        let meta: IndexMeta = serde_json::from_slice(&b[HEADER..HEADER + j])
            .with_context(|| format!("{what}: the JSON header at byte {HEADER}"))?;
        let area_at = HEADER + j;
        let unpacked = zstd::bulk::decompress(&b[area_at..], area as usize)
            .map_err(|e| anyhow!("{what}: the digests at byte {area_at}: {e}"))?;
        if unpacked.len() as u64 != area {
            bail!(
                "{what}: the digests at byte {area_at} unpack to {} bytes; the header's \
                 {nd} + {nu} digests need {area}",
                unpacked.len()
            );
        }
        if meta.format != "kiln-update-index" || meta.block_size != BLOCK {
            bail!(
                "{what}: header says format {:?}, block size {}; expected kiln-update-index, {BLOCK}",
                meta.format,
                meta.block_size
            );
        }
        let digests = |from: usize, n: u64| -> Vec<[u8; 32]> {
            unpacked[from..from + 32 * n as usize]
                .chunks_exact(32)
                .map(|c| {
                    let mut d = [0u8; 32];
                    d.copy_from_slice(c);
                    d
                })
                .collect()
        };
        let data = digests(0, nd);
        let uki = digests(32 * nd as usize, nu);
        if meta.data.size != nd * BLOCK || nd == 0 {
            bail!(
                "{what}: {nd} root digests for a {}-byte root image",
                meta.data.size
            );
        }
        if meta.uki.size.div_ceil(BLOCK) != nu {
            bail!("{what}: {nu} UKI digests for a {}-byte UKI", meta.uki.size);
        }
        let salt = hex::decode(&meta.salt).with_context(|| format!("{what}: salt"))?;
        let root_hash: [u8; 32] = hex::decode(&meta.root_hash)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| {
                anyhow!(
                    "{what}: root hash {:?} is not 32 bytes of hex",
                    meta.root_hash
                )
            })?;
        let vuuid = Uuid::try_parse(&meta.verity_uuid)
            .map_err(|_| anyhow!("{what}: verity UUID {:?}", meta.verity_uuid))?;
        let params = verity::Params::new(&salt, vuuid);
        let flat: Vec<u8> = data.iter().flatten().copied().collect();
        let root = verity::root_from_level0(&params, &flat).map_err(|e| anyhow!("{what}: {e}"))?;
        if root != root_hash {
            bail!(
                "{what}: its block digests give root hash {}, not the {} it names",
                hex::encode(root),
                meta.root_hash
            );
        }
        if meta.hash.size < verity::hash_size(meta.data.size, &params) {
            bail!(
                "{what}: the hash image of {} bytes is too small",
                meta.hash.size
            );
        }
        Ok(Index {
            meta,
            data,
            uki,
            salt,
            root_hash,
        })
    }

    /// What `kiln update` needs to install the build this index describes.
    fn new_build(&self, src: &str) -> Result<NewBuild> {
        let m = &self.meta;
        let uuid =
            |s: &str| Uuid::try_parse(s).map_err(|_| anyhow!("{src}: bad UUID {s:?} in the index"));
        Ok(NewBuild {
            src: src.to_string(),
            name: m.name.clone(),
            version: m.version.clone(),
            disk_uuid: uuid(&m.disk_uuid)?,
            root_hash: self.root_hash,
            data_type: uuid(&m.data_type_uuid)?,
            hash_type: uuid(&m.hash_type_uuid)?,
            data_type_name: m.data_type.clone(),
            hash_type_name: m.hash_type.clone(),
            uki_name: m.uki_name.clone(),
            source_date_epoch: m.source_date_epoch,
        })
    }
}

/// What `kiln build` knows when it writes the index.
pub(crate) struct IndexInputs<'a> {
    pub name: &'a str,
    pub version: &'a str,
    pub disk_uuid: String,
    pub source_date_epoch: Option<i64>,
    pub salt: &'a [u8],
    pub verity_uuid: Uuid,
    pub root_hash: [u8; 32],
    pub data_type: (String, String),
    pub hash_type: (String, String),
    pub uki_name: String,
    pub data: Artifact,
    pub hash: Artifact,
    pub uki: (Artifact, &'a [u8]),
    /// The disk being built and where the hash partition is in it.
    pub file: &'a File,
    pub hash_offset: u64,
}

/// Builds the index from the build's own verity tree: level 0 is read from the hash partition
/// just written (no second pass over the data).
pub(crate) fn build_index(i: &IndexInputs<'_>) -> Result<Vec<u8>> {
    let data_blocks = i.data.size / BLOCK;
    let layout = verity::Layout::new(data_blocks, BLOCK as u32);
    let mut level0 = vec![0u8; data_blocks as usize * 32];
    match layout.levels.first() {
        Some(&(start, _)) => i
            .file
            .read_exact_at(&mut level0, i.hash_offset + start * BLOCK)
            .context("reading level 0 of the verity tree")?,
        // One data block: the root hash is its digest.
        None => level0.copy_from_slice(&i.root_hash),
    }
    let idx = Index {
        meta: IndexMeta {
            format: "kiln-update-index".into(),
            name: i.name.into(),
            version: i.version.into(),
            disk_uuid: i.disk_uuid.clone(),
            source_date_epoch: i.source_date_epoch,
            block_size: BLOCK,
            salt: hex::encode(i.salt),
            verity_uuid: i.verity_uuid.to_string(),
            root_hash: hex::encode(i.root_hash),
            data_type: i.data_type.0.clone(),
            data_type_uuid: i.data_type.1.clone(),
            hash_type: i.hash_type.0.clone(),
            hash_type_uuid: i.hash_type.1.clone(),
            uki_name: i.uki_name.clone(),
            data: art(&i.data),
            hash: art(&i.hash),
            uki: art(&i.uki.0),
        },
        data: level0
            .chunks_exact(32)
            .map(|c| c.try_into().unwrap_or([0; 32]))
            .collect(),
        uki: block_digests(i.salt, i.uki.1),
        salt: i.salt.to_vec(),
        root_hash: i.root_hash,
    };
    let bytes = idx.to_bytes()?;
    // The same checks a client runs: a build never publishes an index it would refuse.
    Index::parse(&bytes, "the update index being written")?;
    Ok(bytes)
}

fn art(a: &Artifact) -> IndexFile {
    IndexFile {
        file: a.file.clone(),
        size: a.size,
        sha256: a.sha256.clone(),
    }
}

/// What `kiln update --from` was asked to do.
#[derive(Clone, Debug)]
pub struct FromOptions {
    /// The disk image or block device.
    pub image: PathBuf,
    /// The index: `http(s)://…/NAME_VERSION.index`, `s3://…`, or a local path.
    pub from: String,
    /// minisign public key the index must be signed with.
    pub pubkey: PathBuf,
    /// Plan and report only; write nothing.
    pub dry_run: bool,
    /// Fetch options (parallel ranges, retries).
    pub fetch: FetchOptions,
}

/// What a `--from` update did (or, with `--dry-run`, would do). In JSON (`kiln.update/1`) byte
/// counts end in `_size`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FromReport {
    /// Whether anything was written.
    pub dry_run: bool,
    /// Root image bytes.
    #[serde(rename = "root_size")]
    pub root_bytes: u64,
    /// Root blocks already in place in the target slot.
    pub blocks_in_place: u64,
    /// Root blocks copied from elsewhere on the disk.
    pub blocks_local: u64,
    /// Root blocks fetched.
    pub blocks_fetched: u64,
    /// Root bytes that had to be fetched (the plan), and their share of the root.
    #[serde(rename = "root_missing_size")]
    pub root_missing_bytes: u64,
    /// `root_missing_bytes` as a percentage of `root_bytes`.
    pub root_missing_percent: f64,
    /// UKI bytes that had to be fetched (of `uki_bytes`).
    #[serde(rename = "uki_missing_size")]
    pub uki_missing_bytes: u64,
    /// UKI size.
    #[serde(rename = "uki_size")]
    pub uki_bytes: u64,
    /// Index and signature bytes.
    #[serde(rename = "index_size")]
    pub index_bytes: u64,
    /// Body bytes actually received, retries included.
    #[serde(rename = "fetched_size")]
    pub fetched_bytes: u64,
    /// Range requests sent.
    pub requests: u64,
    /// Tries repeated (dropped connections, bad blocks).
    pub retries: u64,
    /// The install, as `kiln update --with` reports it: name and version always; partitions,
    /// slots and UKIs once done (with `--dry-run`, left empty); `gpt_restored` also for a
    /// dry run, where it says what would be rewritten.
    #[serde(flatten)]
    pub install: update::UpdateReport,
}

/// Where a block of the new root comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// Already at its place in the target.
    InPlace,
    /// The kept slot's data partition, at this block.
    Kept(u64),
    /// The target's data partition at another block: read before anything is written.
    Target(u64),
    /// Not on the disk.
    Missing,
}

/// Digest → block index for every block of `len` bytes at `off` of `f` whose digest is in
/// `wanted`; also returns the digest of each block (for the in-place check).
fn scan(f: &File, off: u64, len: u64, salt: &[u8], what: &str) -> Result<Vec<[u8; 32]>> {
    let blocks = len / BLOCK;
    const CHUNK: u64 = 256; // 1 MiB reads
    let chunks: Vec<u64> = (0..blocks.div_ceil(CHUNK)).collect();
    let per: Vec<Vec<[u8; 32]>> = chunks
        .par_iter()
        .map(|&c| -> Result<Vec<[u8; 32]>> {
            let first = c * CHUNK;
            let n = (blocks - first).min(CHUNK);
            let mut buf = vec![0u8; (n * BLOCK) as usize];
            f.read_exact_at(&mut buf, off + first * BLOCK)
                .with_context(|| format!("{what}: reading block {first}"))?;
            Ok(block_digests(salt, &buf))
        })
        .collect::<Result<_>>()?;
    Ok(per.into_iter().flatten().collect())
}

/// Where each block of `want` comes from, given the target's and the kept slot's digests.
fn plan(want: &[[u8; 32]], target: &[[u8; 32]], kept: &[[u8; 32]]) -> Vec<Source> {
    let needed: std::collections::HashSet<&[u8; 32]> = want.iter().collect();
    let mut in_kept: HashMap<&[u8; 32], u64> = HashMap::new();
    for (i, d) in kept.iter().enumerate() {
        if needed.contains(d) {
            in_kept.entry(d).or_insert(i as u64);
        }
    }
    let mut in_target: HashMap<&[u8; 32], u64> = HashMap::new();
    for (i, d) in target.iter().enumerate() {
        if needed.contains(d) {
            in_target.entry(d).or_insert(i as u64);
        }
    }
    want.iter()
        .enumerate()
        .map(|(i, d)| {
            if target.get(i) == Some(d) {
                Source::InPlace
            } else if let Some(&k) = in_kept.get(d) {
                Source::Kept(k)
            } else if let Some(&k) = in_target.get(d) {
                Source::Target(k)
            } else {
                Source::Missing
            }
        })
        .collect()
}

/// Blocks read from the target into memory at most (beyond, they are fetched instead).
const MAX_STASH: u64 = 256 << 20;

/// `kiln update IMAGE --from URL`, in this order:
///
/// 1. fetch the index and check its signature;
/// 2. open the disk and its target slot;
/// 3. plan where each block of the new root comes from (in place, elsewhere on the disk, or
///    fetched) and which UKI blocks the ESP already holds;
/// 4. stop there for `--dry-run`;
/// 5. fetch the rest of the UKI and assemble the new ESP, before the disk is touched;
/// 6. name the target `_empty`;
/// 7. write the local blocks, then fetch the missing ones;
/// 8. check the whole slot against the signed root hash, rebuilding its hash partition;
/// 9. make it bootable.
pub fn update_from(opts: &FromOptions) -> Result<FromReport> {
    let fetched = fetch_index(opts)?;
    let (remote, idx, new) = (&fetched.remote, &fetched.idx, &fetched.new);
    let m = &idx.meta;
    let mut t = update::open_target(&opts.image, new, opts.dry_run)?;
    check_fit(opts, &t, idx, new)?;
    let p = plan_root(&t, idx)?;
    let (uki, uki_missing) = local_uki(&t, idx, &new.name)?;
    let miss_bytes = |blocks: &[u64], len: u64| -> u64 {
        blocks.iter().map(|&b| (len - b * BLOCK).min(BLOCK)).sum()
    };
    let root_len = m.data.size;
    let mut report = FromReport {
        dry_run: opts.dry_run,
        root_bytes: root_len,
        blocks_in_place: p.in_place,
        blocks_local: p.sources.len() as u64 - p.in_place - p.missing.len() as u64,
        blocks_fetched: p.missing.len() as u64,
        root_missing_bytes: miss_bytes(&p.missing, root_len),
        root_missing_percent: 100.0 * miss_bytes(&p.missing, root_len) as f64 / root_len as f64,
        uki_missing_bytes: miss_bytes(&uki_missing, m.uki.size),
        uki_bytes: m.uki.size,
        index_bytes: fetched.bytes,
        install: update::UpdateReport {
            name: new.name.clone(),
            version: new.version.clone(),
            gpt_restored: t.gpt_restored.clone(),
            ..Default::default()
        },
        ..FromReport::default()
    };
    if opts.dry_run {
        return Ok(report);
    }

    // The UKI and the new ESP, before the disk is touched.
    let (uki, s1) = fetch_uki(opts, remote, idx, uki, &uki_missing)?;
    let esp = update::assemble_esp(&t, new, uki)?;
    // The target is nobody's version while it changes.
    update::mark_target_empty(&mut t)?;
    let s2 = write_root(opts, remote, idx, &t, &p)?;
    verify_slot(opts, &fetched.where_, idx, &t)?;

    // Bootable only now.
    report.install = update::finish_install(&mut t, new, esp)?;
    report.fetched_bytes = s1.bytes + s2.bytes;
    report.requests = s1.requests + s2.requests;
    report.retries = s1.retries + s2.retries;
    Ok(report)
}

/// A verified update index and where it came from.
struct Fetched {
    remote: Remote,
    /// `remote` as text, for messages.
    where_: String,
    idx: Index,
    new: NewBuild,
    /// Index and signature bytes.
    bytes: u64,
}

/// The index at `opts.from`, its signature checked first.
fn fetch_index(opts: &FromOptions) -> Result<Fetched> {
    let remote = Remote::parse(&opts.from)?;
    let sig_remote = remote.with_suffix(".minisig");
    let idx_bytes = ranges::get_whole(&remote, MAX_INDEX)?;
    let sig = ranges::get_whole(&sig_remote, 64 << 10)?;
    let where_ = remote.to_string();
    let sig_text = String::from_utf8(sig).map_err(|_| anyhow!("{sig_remote}: not text"))?;
    kiln_ship::sign::verify_bytes(&idx_bytes, &sig_text, &opts.pubkey, &where_).with_context(
        || {
            format!(
                "{where_}: the index signature does not verify with {}; refusing to update",
                opts.pubkey.display()
            )
        },
    )?;
    let idx = Index::parse(&idx_bytes, &where_)?;
    let new = idx.new_build(&where_)?;
    Ok(Fetched {
        remote,
        where_,
        idx,
        new,
        bytes: (idx_bytes.len() + sig_text.len()) as u64,
    })
}

/// Refuses a new build whose root or hash image does not fit the target slot's partitions.
fn check_fit(opts: &FromOptions, t: &update::Target, idx: &Index, new: &NewBuild) -> Result<()> {
    let (d, h) = (t.data(), t.hash());
    let (root_len, hash_len) = (idx.meta.data.size, idx.meta.hash.size);
    if root_len > d.size() || hash_len > h.size() {
        bail!(
            "{}: {}'s root ({root_len} bytes) and hash ({hash_len}) images do not fit partitions {} ({}) and {} ({}); rebuild with the same partition sizes",
            opts.image.display(),
            new.nv(),
            t.table.number(t.slot.data),
            d.size(),
            t.table.number(t.slot.hash),
            h.size()
        );
    }
    Ok(())
}

/// Where each block of the new root comes from.
struct RootPlan {
    sources: Vec<Source>,
    /// Blocks only the target holds, read into memory before anything is written.
    stash_n: u64,
    /// Blocks to fetch.
    missing: Vec<u64>,
    in_place: u64,
}

/// Scans both slots for the new root's blocks; blocks beyond [`MAX_STASH`] that only the
/// target holds are fetched instead.
fn plan_root(t: &update::Target, idx: &Index) -> Result<RootPlan> {
    let (d, kd) = (t.data(), t.other_data());
    let target_digests = scan(
        &t.f,
        d.offset(),
        d.size(),
        &idx.salt,
        &t.part_what(t.slot.data),
    )?;
    let kept_digests = scan(
        &t.f,
        kd.offset(),
        kd.size(),
        &idx.salt,
        &t.part_what(t.other.data),
    )?;
    let mut sources = plan(&idx.data, &target_digests, &kept_digests);
    let mut stash_n = 0u64;
    for s in sources.iter_mut() {
        if let Source::Target(_) = s {
            if stash_n * BLOCK >= MAX_STASH {
                *s = Source::Missing;
            } else {
                stash_n += 1;
            }
        }
    }
    let missing: Vec<u64> = (0..sources.len() as u64)
        .filter(|&i| sources[i as usize] == Source::Missing)
        .collect();
    let in_place = sources.iter().filter(|s| **s == Source::InPlace).count() as u64;
    Ok(RootPlan {
        sources,
        stash_n,
        missing,
        in_place,
    })
}

/// The new UKI as far as the UKIs on the ESP have its blocks, and the blocks still missing.
fn local_uki(t: &update::Target, idx: &Index, name: &str) -> Result<(Vec<u8>, Vec<u64>)> {
    let mut uki = vec![0u8; idx.meta.uki.size as usize];
    let mut uki_have = vec![false; idx.uki.len()];
    let mut by_digest: HashMap<[u8; 32], Vec<u8>> = HashMap::new();
    for (_, bytes) in t.esp_ukis(name)? {
        for c in bytes.chunks(BLOCK as usize) {
            let mut b = vec![0u8; BLOCK as usize];
            b[..c.len()].copy_from_slice(c);
            by_digest
                .entry(verity::block_digest(&idx.salt, &b))
                .or_insert(b);
        }
    }
    for (i, dg) in idx.uki.iter().enumerate() {
        if let Some(b) = by_digest.get(dg) {
            let at = i * BLOCK as usize;
            let n = (uki.len() - at).min(BLOCK as usize);
            uki[at..at + n].copy_from_slice(&b[..n]);
            uki_have[i] = true;
        }
    }
    let missing = (0..idx.uki.len() as u64)
        .filter(|&i| !uki_have[i as usize])
        .collect();
    Ok((uki, missing))
}

/// Fetches the UKI blocks the ESP lacks into `uki` and checks the whole against the index.
fn fetch_uki(
    opts: &FromOptions,
    remote: &Remote,
    idx: &Index,
    uki: Vec<u8>,
    uki_missing: &[u64],
) -> Result<(Vec<u8>, ranges::FetchStats)> {
    let m = &idx.meta;
    let uki_remote = remote.join(&m.uki.file)?;
    let uki_cell = Mutex::new(uki);
    let uki_ranges = ranges::coalesce(uki_missing, BLOCK, m.uki.size, 4, 1024);
    let stats = ranges::fetch_ranges(&uki_remote, &uki_ranges, &opts.fetch, &|off, bytes| {
        check_blocks(&idx.uki, &idx.salt, off, bytes, &uki_remote, &|at, b| {
            let mut u = uki_cell.lock().map_err(|_| anyhow!("poisoned"))?;
            u[at as usize..at as usize + b.len()].copy_from_slice(b);
            Ok(())
        })
    })?;
    let uki = uki_cell.into_inner().map_err(|_| anyhow!("poisoned"))?;
    let sha = hex::encode(Sha256::digest(&uki));
    if sha != m.uki.sha256 {
        bail!(
            "{uki_remote}: the assembled UKI has sha256 {sha}, the index says {}",
            m.uki.sha256
        );
    }
    Ok((uki, stats))
}

/// Writes the new root into the target: the blocks only in the target first (through
/// memory), then the ones from the kept slot, then the fetched ones; zeroes after the root.
fn write_root(
    opts: &FromOptions,
    remote: &Remote,
    idx: &Index,
    t: &update::Target,
    p: &RootPlan,
) -> Result<ranges::FetchStats> {
    let (d, kd) = (t.data(), t.other_data());
    let root_len = idx.meta.data.size;
    let data_what = t.part_what(t.slot.data);
    let mut stash: Vec<(u64, Vec<u8>)> = Vec::with_capacity(p.stash_n as usize);
    for (i, s) in p.sources.iter().enumerate() {
        if let Source::Target(k) = *s {
            let mut b = vec![0u8; BLOCK as usize];
            t.f.read_exact_at(&mut b, d.offset() + k * BLOCK)
                .with_context(|| format!("{data_what}: reading block {k}"))?;
            stash.push((i as u64, b));
        }
    }
    let mut buf = vec![0u8; BLOCK as usize];
    for (i, s) in p.sources.iter().enumerate() {
        if let Source::Kept(k) = *s {
            t.f.read_exact_at(&mut buf, kd.offset() + k * BLOCK)
                .with_context(|| format!("{}: reading block {k}", t.part_what(t.other.data)))?;
            t.f.write_all_at(&buf, d.offset() + i as u64 * BLOCK)
                .with_context(|| format!("{data_what}: writing block {i}"))?;
        }
    }
    for (i, b) in &stash {
        t.f.write_all_at(b, d.offset() + i * BLOCK)
            .with_context(|| format!("{data_what}: writing block {i}"))?;
    }
    drop(stash);
    let data_remote = remote.join(&idx.meta.data.file)?;
    let root_ranges: Vec<Range<u64>> = ranges::coalesce(&p.missing, BLOCK, root_len, 4, 2048);
    let f = &t.f;
    let stats = ranges::fetch_ranges(&data_remote, &root_ranges, &opts.fetch, &|off, bytes| {
        check_blocks(&idx.data, &idx.salt, off, bytes, &data_remote, &|at, b| {
            f.write_all_at(b, d.offset() + at)
                .with_context(|| format!("{data_what}: writing at byte {at}"))
        })
    })?;
    update::write_range(
        f,
        &data_what,
        d.offset() + root_len,
        d.size() - root_len,
        &[],
    )?;
    update::flush(f, &opts.image)?;
    Ok(stats)
}

/// The whole slot against the signed root hash, rebuilding its hash partition; the hash
/// image against the index's sha256.
fn verify_slot(opts: &FromOptions, where_: &str, idx: &Index, t: &update::Target) -> Result<()> {
    let (d, h) = (t.data(), t.hash());
    let m = &idx.meta;
    let f = &t.f;
    let (data_what, hash_what) = (t.part_what(t.slot.data), t.part_what(t.slot.hash));
    update::write_range(f, &hash_what, h.offset(), h.size(), &[])?;
    let vuuid = Uuid::try_parse(&m.verity_uuid).map_err(|_| anyhow!("{where_}: verity UUID"))?;
    let params = verity::Params::new(&idx.salt, vuuid);
    let read = |off: u64, b: &mut [u8]| f.read_exact_at(b, d.offset() + off);
    let formatted = verity::format(
        &params,
        m.data.size,
        &read,
        &FileSink::new(f, h.offset(), h.size()),
    )
    .with_context(|| format!("{data_what}: dm-verity"))?;
    if formatted.root_hash != idx.root_hash {
        bail!(
            "{data_what}: the assembled root has root hash {}, the signed index says {}; the slot stays unbootable (named _empty)",
            hex::encode(formatted.root_hash),
            m.root_hash
        );
    }
    let mut hh = Sha256::new();
    let mut hb = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < m.hash.size {
        let n = (m.hash.size - pos).min(hb.len() as u64) as usize;
        f.read_exact_at(&mut hb[..n], h.offset() + pos)
            .with_context(|| format!("{hash_what}: reading"))?;
        hh.update(&hb[..n]);
        pos += n as u64;
    }
    let hsha = hex::encode(hh.finalize());
    if hsha != m.hash.sha256 {
        bail!(
            "{hash_what}: the rebuilt hash image has sha256 {hsha}, the index says {}",
            m.hash.sha256
        );
    }
    update::flush(f, &opts.image)
}

/// Checks whole blocks fetched at `off` against `digests`, handing each good one to `write`;
/// the first bad block is asked for again.
fn check_blocks(
    digests: &[[u8; 32]],
    salt: &[u8],
    off: u64,
    bytes: &[u8],
    remote: &Remote,
    write: &dyn Fn(u64, &[u8]) -> Result<()>,
) -> Result<Verdict> {
    let mut good = 0usize;
    let mut verdict = Verdict::Accept;
    for (k, c) in bytes.chunks(BLOCK as usize).enumerate() {
        let at = off + k as u64 * BLOCK;
        let i = (at / BLOCK) as usize;
        let mut b = [0u8; BLOCK as usize];
        b[..c.len()].copy_from_slice(c);
        let want = digests
            .get(i)
            .ok_or_else(|| anyhow!("{remote}: block {i} is past the index"))?;
        if verity::block_digest(salt, &b) != *want {
            verdict = Verdict::Refetch(
                at,
                format!(
                    "block {i} (bytes {at}..{}) does not match the signed index",
                    at + c.len() as u64
                ),
            );
            break;
        }
        good += c.len();
    }
    if good > 0 {
        write(off, &bytes[..good])?;
    }
    Ok(verdict)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn plan_prefers_in_place_then_kept_then_target() {
        let d = |x: u8| [x; 32];
        let want = [d(1), d(2), d(3), d(4), d(5)];
        let target = [d(1), d(3), d(9)];
        let kept = [d(2), d(2)];
        assert_eq!(
            plan(&want, &target, &kept),
            [
                Source::InPlace,
                Source::Kept(0),
                Source::Target(1),
                Source::Missing,
                Source::Missing
            ]
        );
    }

    #[test]
    fn index_round_trip_and_checks() {
        let salt = [7u8; 32];
        // 100 distinct blocks, then 200 zero blocks (free space).
        let data: Vec<u8> = (0..300 * 4096u32)
            .map(|i| {
                if i < 100 * 4096 {
                    (i / 4096) as u8 + 1
                } else {
                    0
                }
            })
            .collect();
        let params = verity::Params::new(&salt, Uuid::from_bytes([1; 16]));
        let level0: Vec<[u8; 32]> = block_digests(&salt, &data);
        let flat: Vec<u8> = level0.iter().flatten().copied().collect();
        let root = verity::root_from_level0(&params, &flat).unwrap();
        let f = |file: &str, size| IndexFile {
            file: file.into(),
            size,
            sha256: "00".into(),
        };
        let idx = Index {
            meta: IndexMeta {
                format: "kiln-update-index".into(),
                name: "a".into(),
                version: "2".into(),
                disk_uuid: Uuid::from_bytes([2; 16]).to_string(),
                source_date_epoch: None,
                block_size: BLOCK,
                salt: hex::encode(salt),
                verity_uuid: Uuid::from_bytes([1; 16]).to_string(),
                root_hash: hex::encode(root),
                data_type: "root-x86-64".into(),
                data_type_uuid: Uuid::from_bytes([3; 16]).to_string(),
                hash_type: "root-x86-64-verity".into(),
                hash_type_uuid: Uuid::from_bytes([4; 16]).to_string(),
                uki_name: "a_2+3.efi".into(),
                data: f("a_2.root.raw", data.len() as u64),
                hash: f("a_2.root-verity.raw", 4096 * 5),
                uki: f("a_2.efi", 5000),
            },
            data: level0,
            uki: vec![[0; 32]; 2],
            salt: salt.to_vec(),
            root_hash: root,
        };
        let b = idx.to_bytes().unwrap();
        let back = Index::parse(&b, "x").unwrap();
        assert_eq!(back.data, idx.data);
        assert_eq!(back.meta, idx.meta);
        // Zero blocks' digests are runs of one value: the digest area packs to a fraction.
        assert!(b.len() < 300 * 32 / 2, "{} bytes", b.len());
        // A digest changed: the root hash no longer follows.
        let mut changed = idx.clone();
        changed.data[7][0] ^= 1;
        let e = Index::parse(&changed.to_bytes().unwrap(), "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("root hash"), "{e}");
        // The packed digests damaged: refused, whichever check notices first.
        let mut bad = b.clone();
        let last = bad.len() - 3;
        bad[last] ^= 0x55;
        assert!(Index::parse(&bad, "x").is_err());
        // More digests packed than the header says: refused without unpacking past its count.
        let mut few = b.clone();
        few[16..24].copy_from_slice(&100u64.to_le_bytes());
        let e = Index::parse(&few, "x").unwrap_err().to_string();
        assert!(e.contains("digests at byte"), "{e}");
        // A header claiming 2^60 digests is refused before any allocation.
        let mut huge = b.clone();
        huge[16..24].copy_from_slice(&(1u64 << 60).to_le_bytes());
        let e = Index::parse(&huge, "x").unwrap_err().to_string();
        assert!(e.contains("too many"), "{e}");
        // Truncated, wrong magic, wrong version.
        assert!(Index::parse(&b[..b.len() - 1], "x").is_err());
        let mut m = b.clone();
        m[0] = b'X';
        assert!(Index::parse(&m, "x")
            .unwrap_err()
            .to_string()
            .contains("magic"));
        let mut v = b.clone();
        v[8] = 1;
        assert!(Index::parse(&v, "x")
            .unwrap_err()
            .to_string()
            .contains("version"));
    }
}
