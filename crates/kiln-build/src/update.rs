//! `kiln update IMAGE --with NEW`: installs a newer build of the same image into the inactive
//! A/B slot of a disk (an image file or a block device), the way systemd-sysupdate would on a
//! running system, but from outside and with the partition UUIDs kiln's UKIs look for.
//!
//! NEW is a `kiln build` output directory (or its `NAME.json` report) holding the split
//! artifacts `NAME_VERSION.root.raw`, `NAME_VERSION.root-verity.raw` and `NAME_VERSION.efi`
//! (`usr` instead of `root` for /usr images).
//!
//! ## Which slot is overwritten
//!
//! The image has two root (or /usr) data partitions of NEW's type and two verity partitions;
//! the k-th data partition on the disk pairs with the k-th verity partition (the order
//! `kiln build` and systemd-repart lay them out in). A slot's version is its GPT name
//! `NAME_VERSION`; `_empty` marks a slot never filled.
//!
//! 1. A slot named `_empty` is the target.
//! 2. Otherwise one slot is kept: the one holding the newest version that has a *blessed* UKI
//!    on the ESP (`EFI/Linux/NAME_VERSION.efi`, no boot counter: a boot of it was good); when
//!    no UKI is blessed, the newest version whose UKI still has tries left; when no UKI names
//!    either slot, the newest version. The other slot is the target. Versions compare like
//!    systemd's version comparison (digit runs numerically).
//! 3. NEW's version must not be the kept slot's (nothing to do, and overwriting the other slot
//!    would lose the fallback).
//!
//! ## What is written, in order
//!
//! 1. NEW's data and hash images into the target pair, every byte (the rest of a partition
//!    larger than its image is zeroed), then a flush.
//! 2. The GPT, both copies: the target pair gets the root hash halves as partition UUIDs and
//!    `NAME_VERSION` as names. Then a flush.
//! 3. The ESP, edited in place (`kiln_formats::fat::edit`): the UKIs of the version just
//!    overwritten (and any older copy of NEW's) are removed, then NEW's UKI is added as
//!    `EFI/Linux/NAME_VERSION+TRIES.efi`. Every other file stays in its clusters.
//!
//! Guarantees: nothing is written before every check has passed, including that NEW's UKI
//! fits on the ESP. Steps 1 and 2 never touch the kept slot, its UKI or the ESP, so an
//! interruption there leaves the kept version bootable: a half-written target fails dm-verity,
//! and its old UKI (if any) can only boot a root whose hash no longer matches. Step 3 never
//! writes a cluster or a directory slot that a kept file uses: the new UKI's data goes to free
//! clusters, is chained, and appears when its directory entry lands; removals delete the entry
//! first. A power cut anywhere in step 3 leaves the kept UKI intact (tested at every write,
//! torn writes included, in `kiln-formats/tests/fat_tools.rs`), and the next run reclaims
//! what the cut run left (lost clusters, orphaned long names, FAT copies that differ) and
//! finishes the edit.

use std::cmp::Ordering;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use kiln_formats::fat::FatReader;
use kiln_formats::gpt::{self, Gpt};
use kiln_formats::repart::Uuid;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::layout::EMPTY_LABEL;

/// What `kiln update` was asked to do.
#[derive(Clone, Debug)]
pub struct UpdateOptions {
    /// The disk image file or block device to update in place.
    pub image: PathBuf,
    /// A `kiln build` output directory or its `NAME.json` report.
    pub with: PathBuf,
}

/// What was done (in `kiln.update/1` JSON, these fields as they are named).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UpdateReport {
    /// Image name.
    pub name: String,
    /// The version installed.
    pub version: String,
    /// 1-based GPT entry numbers of the data and hash partitions written.
    pub data_partition: u32,
    /// See `data_partition`.
    pub hash_partition: u32,
    /// What the target slot was named before (`_empty` or `NAME_VERSION`).
    pub replaced: String,
    /// The version that was kept, if any.
    pub kept: Option<String>,
    /// ESP path of the UKI installed.
    pub installed_uki: String,
    /// ESP paths of the UKIs removed.
    pub removed_ukis: Vec<String>,
    /// Why the primary GPT was unusable, when it was rewritten from the valid backup.
    pub gpt_restored: Option<String>,
}

/// The parts of a build report `kiln update` reads.
#[derive(Debug, Deserialize)]
struct NewReport {
    name: String,
    version: String,
    disk_uuid: String,
    root_hash: Option<String>,
    source_date_epoch: Option<i64>,
    boot: Option<NewBoot>,
    partitions: Vec<NewPartition>,
    artifacts: Vec<NewArtifact>,
}

#[derive(Debug, Deserialize)]
struct NewBoot {
    uki: String,
}

#[derive(Debug, Deserialize)]
struct NewPartition {
    #[serde(rename = "type")]
    type_name: String,
    type_uuid: String,
    label: String,
}

#[derive(Debug, Deserialize)]
struct NewArtifact {
    file: String,
    size: u64,
    /// `"sha256:HEX"` (schema `kiln.build/2`); a schema-1 report's `sha256` is plain hex.
    #[serde(alias = "sha256")]
    digest: String,
}

impl NewArtifact {
    /// The sha256 as hex.
    fn sha256(&self) -> &str {
        self.digest.strip_prefix("sha256:").unwrap_or(&self.digest)
    }
}

/// A UKI under `EFI/Linux/` named after the image.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Uki {
    /// File name.
    file: String,
    /// Its version.
    version: String,
    /// Boot counter: tries left and tries done, `None` when blessed (or never counted).
    counter: Option<(u32, u32)>,
}

/// Parses `NAME_VERSION.efi`, `NAME_VERSION+LEFT.efi` or `NAME_VERSION+LEFT-DONE.efi`.
fn parse_uki(name: &str, file: &str) -> Option<Uki> {
    let stem = file
        .strip_suffix(".efi")
        .or_else(|| file.strip_suffix(".EFI"))?;
    let rest = stem.strip_prefix(name)?.strip_prefix('_')?;
    let (version, counter) = match rest.rsplit_once('+') {
        None => (rest, None),
        Some((v, c)) => {
            let (left, done) = match c.split_once('-') {
                Some((l, d)) => (l.parse().ok()?, d.parse().ok()?),
                None => (c.parse().ok()?, 0),
            };
            (v, Some((left, done)))
        }
    };
    (!version.is_empty()).then(|| Uki {
        file: file.to_string(),
        version: version.to_string(),
        counter,
    })
}

/// Version order as systemd compares versions, simplified: runs of digits compare as numbers,
/// other characters by byte, `~` sorts before anything (a pre-release).
pub fn version_cmp(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    loop {
        match (a.get(i), b.get(j)) {
            (None, None) => return Ordering::Equal,
            (Some(b'~'), Some(b'~')) => {
                i += 1;
                j += 1;
            }
            (Some(b'~'), _) => return Ordering::Less,
            (_, Some(b'~')) => return Ordering::Greater,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let run = |s: &[u8], mut k: usize| {
                    while s.get(k) == Some(&b'0') {
                        k += 1;
                    }
                    let start = k;
                    while s.get(k).is_some_and(u8::is_ascii_digit) {
                        k += 1;
                    }
                    (start, k)
                };
                let (sa, ea) = run(a, i);
                let (sb, eb) = run(b, j);
                let o = (ea - sa)
                    .cmp(&(eb - sb))
                    .then_with(|| a[sa..ea].cmp(&b[sb..eb]));
                if o != Ordering::Equal {
                    return o;
                }
                i = ea;
                j = eb;
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                i += 1;
                j += 1;
            }
        }
    }
}

/// Finds and parses NEW's report; returns it with the directory its artifacts are in.
fn load_new(with: &Path) -> Result<(NewReport, PathBuf)> {
    let read = |p: &Path| -> Result<Option<NewReport>> {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not JSON", p.display()))?;
        // `kiln.build/2`; reports of kiln before it said `"format": "kiln-build-report"`
        // (schema 1), which reads the same for what an update takes from it.
        let schema2 = v.get("schema").and_then(|f| f.as_str()) == Some(crate::json::BUILD_SCHEMA);
        let schema1 = v.get("format").and_then(|f| f.as_str()) == Some("kiln-build-report");
        if !schema2 && !schema1 {
            return Ok(None);
        }
        let r: NewReport = serde_json::from_value(v)
            .with_context(|| format!("{}: not a kiln build report", p.display()))?;
        Ok(Some(r))
    };
    if with.is_dir() {
        let mut found = Vec::new();
        let mut names: Vec<PathBuf> = std::fs::read_dir(with)
            .with_context(|| format!("listing {}", with.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        names.sort();
        for p in names {
            // Other JSON files (SBOM, provenance, slot sidecar) are not reports: skip them.
            if let Ok(Some(r)) = read(&p) {
                found.push((r, p));
            }
        }
        match found.len() {
            1 => {
                let (r, _) = found.remove(0);
                Ok((r, with.to_path_buf()))
            }
            0 => bail!(
                "{}: no kiln build report (NAME.json) in this directory",
                with.display()
            ),
            _ => bail!(
                "{}: {} build reports ({}); give the one to install",
                with.display(),
                found.len(),
                found
                    .iter()
                    .map(|(_, p)| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    } else {
        let r =
            read(with)?.ok_or_else(|| anyhow!("{}: not a kiln build report", with.display()))?;
        let dir = with
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Ok((r, dir))
    }
}

/// Reads a split artifact of NEW, checking its size and sha256 against the report.
fn read_artifact(r: &NewReport, dir: &Path, file: &str) -> Result<Vec<u8>> {
    let a = r
        .artifacts
        .iter()
        .find(|a| a.file == file)
        .ok_or_else(|| {
            anyhow!(
                "{}: the report lists no {file}; was it built from an A/B spec (slots = 2) with [boot]?",
                dir.display()
            )
        })?;
    let p = dir.join(file);
    let mut bytes = Vec::new();
    File::open(&p)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .with_context(|| format!("reading {}", p.display()))?;
    if bytes.len() as u64 != a.size {
        bail!(
            "{}: {} bytes, but the report says {}",
            p.display(),
            bytes.len(),
            a.size
        );
    }
    let sha = hex::encode(Sha256::digest(&bytes));
    if sha != a.sha256() {
        bail!(
            "{}: sha256 {sha} does not match the report's {}",
            p.display(),
            a.sha256()
        );
    }
    Ok(bytes)
}

/// One A/B slot on the disk: indexes into `Gpt::partitions`.
#[derive(Clone, Debug)]
pub(crate) struct Slot {
    pub data: usize,
    pub hash: usize,
    pub label: String,
}

/// Writes `bytes` at `off` and zeroes the rest of the `len`-byte range (plain writes: the
/// range holds an older filesystem, so nothing may be skipped).
pub(crate) fn write_range(f: &File, what: &str, off: u64, len: u64, bytes: &[u8]) -> Result<()> {
    if bytes.len() as u64 > len {
        bail!("{what}: {} bytes do not fit its {len}", bytes.len());
    }
    f.write_all_at(bytes, off)
        .with_context(|| format!("{what}: writing {} bytes at offset {off}", bytes.len()))?;
    let zeros = vec![0u8; 1 << 20];
    let mut pos = bytes.len() as u64;
    while pos < len {
        let n = (len - pos).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], off + pos)
            .with_context(|| format!("{what}: zeroing at offset {}", off + pos))?;
        pos += n as u64;
    }
    Ok(())
}

pub(crate) fn flush(f: &File, image: &Path) -> Result<()> {
    f.sync_all()
        .with_context(|| format!("{}: flushing", image.display()))
}

/// What installing needs to know about NEW, from its build report (`--with`) or from its
/// signed update index (`--from`).
#[derive(Clone, Debug)]
pub(crate) struct NewBuild {
    /// Where NEW came from, for messages.
    pub src: String,
    pub name: String,
    pub version: String,
    pub disk_uuid: Uuid,
    pub root_hash: [u8; 32],
    pub data_type: Uuid,
    pub hash_type: Uuid,
    pub data_type_name: String,
    pub hash_type_name: String,
    /// The UKI's file name under `EFI/Linux/` (with its boot counter).
    pub uki_name: String,
    pub source_date_epoch: Option<i64>,
}

impl NewBuild {
    pub fn nv(&self) -> String {
        format!("{}_{}", self.name, self.version)
    }
}

/// NEW from a build report.
fn new_from_report(new: &NewReport, src: &str) -> Result<NewBuild> {
    let nv = format!("{}_{}", new.name, new.version);
    let is_root = |t: &str| t.starts_with("root-") || t.starts_with("usr-");
    let data_p = new
        .partitions
        .iter()
        .find(|p| p.label == nv && is_root(&p.type_name) && !p.type_name.ends_with("-verity"))
        .ok_or_else(|| anyhow!("{src}: no root or usr partition named {nv} in the report"))?;
    let hash_p = new
        .partitions
        .iter()
        .find(|p| p.label == nv && is_root(&p.type_name) && p.type_name.ends_with("-verity"))
        .ok_or_else(|| {
            anyhow!(
                "{src}: {nv} has no verity partition; kiln update installs dm-verity roots only"
            )
        })?;
    Ok(NewBuild {
        src: src.to_string(),
        name: new.name.clone(),
        version: new.version.clone(),
        disk_uuid: Uuid::try_parse(&new.disk_uuid)
            .map_err(|_| anyhow!("{src}: bad disk UUID {:?}", new.disk_uuid))?,
        root_hash: new
            .root_hash
            .as_deref()
            .and_then(|h| hex::decode(h).ok())
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| anyhow!("{src}: the report has no 32-byte root hash"))?,
        data_type: Uuid::try_parse(&data_p.type_uuid)
            .map_err(|_| anyhow!("{src}: bad type UUID {:?}", data_p.type_uuid))?,
        hash_type: Uuid::try_parse(&hash_p.type_uuid)
            .map_err(|_| anyhow!("{src}: bad type UUID {:?}", hash_p.type_uuid))?,
        data_type_name: data_p.type_name.clone(),
        hash_type_name: hash_p.type_name.clone(),
        uki_name: new
            .boot
            .as_ref()
            .map(|b| b.uki.clone())
            .ok_or_else(|| anyhow!("{src}: {nv} has no [boot] section, so no UKI to install"))?,
        source_date_epoch: new.source_date_epoch,
    })
}

/// The disk being updated, its A/B slots and the chosen target.
pub(crate) struct Target {
    pub img: PathBuf,
    pub f: File,
    pub disk_len: u64,
    pub table: Gpt,
    /// The slot to overwrite.
    pub slot: Slot,
    /// The slot kept (the running version, or `_empty`).
    pub other: Slot,
    /// The version kept, if any.
    pub kept: Option<String>,
    esp_off: u64,
    esp_len: u64,
    esp_where: String,
    entries: Vec<(String, kiln_formats::fat::read::Entry)>,
    /// Why the primary GPT was unusable, when it was restored from the backup.
    pub gpt_restored: Option<String>,
}

impl Target {
    /// GPT entry of the target's data partition.
    pub fn data(&self) -> &gpt::Partition {
        &self.table.partitions[self.slot.data]
    }
    /// GPT entry of the target's hash partition.
    pub fn hash(&self) -> &gpt::Partition {
        &self.table.partitions[self.slot.hash]
    }
    /// GPT entry of the kept slot's data partition.
    pub fn other_data(&self) -> &gpt::Partition {
        &self.table.partitions[self.other.data]
    }
    /// `IMAGE: partition N` of a partition index, for messages.
    pub fn part_what(&self, i: usize) -> String {
        format!("{}: partition {}", self.img.display(), self.table.number(i))
    }

    fn esp_reader(&self) -> Result<FatReader<EspRead<'_>>> {
        let (esp_off, esp_len, f) = (self.esp_off, self.esp_len, &self.f);
        let read: EspRead<'_> = Box::new(move |off: u64, buf: &mut [u8]| {
            if off + buf.len() as u64 > esp_len {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("read at {off} past the end of the {esp_len}-byte ESP"),
                ));
            }
            f.read_exact_at(buf, esp_off + off)
        });
        FatReader::open(read).with_context(|| self.esp_where.clone())
    }

    /// The UKIs of NEW's image on the ESP: their ESP paths and bytes (a source of blocks for
    /// `--from`).
    pub fn esp_ukis(&self, name: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let reader = self.esp_reader()?;
        let mut out = Vec::new();
        for (path, e) in &self.entries {
            if e.is_dir()
                || !path.to_ascii_lowercase().starts_with("/efi/linux/")
                || parse_uki(name, &e.name).is_none()
            {
                continue;
            }
            let bytes = reader
                .read_entry(e)
                .with_context(|| format!("{}: reading {path}", self.esp_where))?;
            out.push((path.clone(), bytes));
        }
        Ok(out)
    }
}

/// Opens the disk (read-write unless `read_only`), checks it is of NEW's family and picks the
/// target slot (see the module documentation).
pub(crate) fn open_target(img: &Path, new: &NewBuild, read_only: bool) -> Result<Target> {
    let src = &new.src;
    let f = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(img)
        .with_context(|| {
            format!(
                "opening {}{}",
                img.display(),
                if read_only { "" } else { " for writing" }
            )
        })?;
    let disk_len = (&f)
        .seek(SeekFrom::End(0))
        .with_context(|| format!("{}: finding its size", img.display()))?;
    let table = Gpt::read(&f).with_context(|| format!("{}: reading the GPT", img.display()))?;
    // A damaged primary with a valid backup is what a power cut during an earlier GPT rewrite
    // leaves (see write_gpt); firmware boots from the backup, so the backup is the table, and
    // both copies are rewritten from it before anything else.
    let gpt_restored = table.primary_error.clone();
    if table.disk_guid != new.disk_uuid {
        bail!(
            "{}: disk GUID {} differs from {src}'s {}: that build comes from another seed (another image family); refusing to install it",
            img.display(),
            table.disk_guid,
            new.disk_uuid
        );
    }
    let slots = ab_slots(img, &table, new, disk_len)?;
    let (esp_off, esp_len, esp_where) = esp_of(img, &table, disk_len)?;
    let mut t = Target {
        img: img.to_path_buf(),
        f,
        disk_len,
        slot: slots[0].clone(),
        other: slots[1].clone(),
        kept: None,
        table,
        esp_off,
        esp_len,
        esp_where,
        entries: Vec::new(),
        gpt_restored,
    };
    if t.gpt_restored.is_some() && !read_only {
        write_gpt(&mut t)?;
    }
    let entries = {
        let reader = t.esp_reader()?;
        reader.walk().with_context(|| t.esp_where.clone())?
    };
    t.entries = entries;
    let ukis: Vec<Uki> = t
        .entries
        .iter()
        .filter(|(p, e)| !e.is_dir() && p.to_ascii_lowercase().starts_with("/efi/linux/"))
        .filter_map(|(_, e)| parse_uki(&new.name, &e.name))
        .collect();
    let (target, kept) = pick_target(&slots, &ukis, &new.name);
    if kept.as_deref() == Some(new.version.as_str()) {
        bail!(
            "{}: version {} is already installed (partition {}) and is the one kept; nothing to do",
            img.display(),
            new.version,
            t.table.number(slots[1 - target].data)
        );
    }
    t.slot = slots[target].clone();
    t.other = slots[1 - target].clone();
    t.kept = kept;
    Ok(t)
}

/// The disk's two A/B slots of `new`'s types: their data and hash partitions must be named
/// `_empty` or `NAME_VERSION` and lie inside the disk.
fn ab_slots(img: &Path, table: &Gpt, new: &NewBuild, disk_len: u64) -> Result<Vec<Slot>> {
    let datas: Vec<usize> = (0..table.partitions.len())
        .filter(|&i| table.partitions[i].type_guid == new.data_type)
        .collect();
    let hashes: Vec<usize> = (0..table.partitions.len())
        .filter(|&i| table.partitions[i].type_guid == new.hash_type)
        .collect();
    if datas.len() != 2 || hashes.len() != 2 {
        bail!(
            "{}: {} {} and {} {} partitions; an A/B image has two of each",
            img.display(),
            datas.len(),
            new.data_type_name,
            hashes.len(),
            new.hash_type_name
        );
    }
    let slots: Vec<Slot> = datas
        .iter()
        .zip(&hashes)
        .map(|(&d, &h)| Slot {
            data: d,
            hash: h,
            label: table.partitions[d].name.clone(),
        })
        .collect();
    let prefix = format!("{}_", new.name);
    for s in &slots {
        if s.label != EMPTY_LABEL && !s.label.starts_with(&prefix) {
            bail!(
                "{}: partition {} is named {:?}, not {}VERSION: this disk is not an image of {:?}",
                img.display(),
                table.number(s.data),
                s.label,
                prefix,
                new.name
            );
        }
    }
    for s in &slots {
        for i in [s.data, s.hash] {
            let p = &table.partitions[i];
            if p.offset() + p.size() > disk_len {
                bail!(
                    "{}: partition {} ends past the disk",
                    img.display(),
                    table.number(i)
                );
            }
        }
    }
    Ok(slots)
}

/// The ESP's offset, length and a name for messages.
fn esp_of(img: &Path, table: &Gpt, disk_len: u64) -> Result<(u64, u64, String)> {
    let esp_type = gpt::type_by_name("esp")
        .map(|t| t.guid)
        .ok_or_else(|| anyhow!("internal: no ESP type"))?;
    let esp_i = (0..table.partitions.len())
        .find(|&i| table.partitions[i].type_guid == esp_type)
        .ok_or_else(|| anyhow!("{}: no EFI system partition", img.display()))?;
    let esp = table.partitions[esp_i].clone();
    let (esp_off, esp_len) = (esp.offset(), esp.size());
    if esp_off + esp_len > disk_len {
        bail!(
            "{}: the ESP ends at {} past the disk's end {disk_len}",
            img.display(),
            esp_off + esp_len
        );
    }
    let esp_where = format!("{}: ESP (partition {})", img.display(), table.number(esp_i));
    Ok((esp_off, esp_len, esp_where))
}

/// The slot to overwrite (see the module documentation) and the version kept in the other:
/// the empty slot if there is one; else the slot whose version is not the newest blessed one
/// (then the newest with tries left, then the newest with a UKI at all, then the newest).
fn pick_target(slots: &[Slot], ukis: &[Uki], name: &str) -> (usize, Option<String>) {
    let prefix = format!("{name}_");
    let version_of = |s: &Slot| s.label.strip_prefix(&prefix).map(str::to_string);
    match slots.iter().position(|s| s.label == EMPTY_LABEL) {
        Some(t) => {
            let other = &slots[1 - t];
            (t, version_of(other))
        }
        None => {
            let newest = |pred: &dyn Fn(&Uki) -> bool| -> Option<usize> {
                let mut best: Option<(usize, String)> = None;
                for (k, s) in slots.iter().enumerate() {
                    let Some(v) = version_of(s) else { continue };
                    if !ukis.iter().any(|u| u.version == v && pred(u)) {
                        continue;
                    }
                    if best
                        .as_ref()
                        .is_none_or(|(_, b)| version_cmp(&v, b) == Ordering::Greater)
                    {
                        best = Some((k, v));
                    }
                }
                best.map(|(k, _)| k)
            };
            let keep = newest(&|u| u.counter.is_none())
                .or_else(|| newest(&|u| u.counter.is_some_and(|(l, _)| l > 0)))
                .or_else(|| newest(&|_| true))
                .unwrap_or_else(|| match (version_of(&slots[0]), version_of(&slots[1])) {
                    (Some(a), Some(b)) if version_cmp(&b, &a) == Ordering::Greater => 1,
                    _ => 0,
                });
            (1 - keep, version_of(&slots[keep]))
        }
    }
}

/// The ESP edit that installs NEW's UKI, checked before anything is written.
pub(crate) struct EspPlan {
    uki: Vec<u8>,
    linux_dir: String,
    mtime: i64,
    installed: String,
    removed: Vec<String>,
}

/// Reads of the ESP within the image file, as [`FatReader`] takes them.
type EspRead<'a> = Box<dyn Fn(u64, &mut [u8]) -> std::io::Result<()> + 'a>;

/// The ESP, edited in place through the image file (offsets relative to the ESP).
struct EspDevice<'a> {
    t: &'a Target,
}

impl kiln_formats::fat::edit::Device for EspDevice<'_> {
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.check(offset, buf.len())?;
        self.t.f.read_exact_at(buf, self.t.esp_off + offset)
    }
    fn write(&self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.check(offset, bytes.len())?;
        self.t.f.write_all_at(bytes, self.t.esp_off + offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.t.f.sync_data()
    }
}

impl EspDevice<'_> {
    fn check(&self, offset: u64, len: usize) -> std::io::Result<()> {
        if offset + len as u64 > self.t.esp_len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "byte {offset} past the end of the {}-byte ESP",
                    self.t.esp_len
                ),
            ));
        }
        Ok(())
    }
}

/// Plans the ESP edit that installs `uki` as NEW's UKI: the UKIs of the version being replaced
/// (and any older copy of NEW's) go, NEW's comes in. Every other file stays where it is: the
/// edit is made in place so that a power cut at any point leaves the kept version bootable
/// (`kiln_formats::fat::edit`). Refused here, before anything is written, when it cannot fit.
pub(crate) fn assemble_esp(t: &Target, new: &NewBuild, uki: Vec<u8>) -> Result<EspPlan> {
    let prefix = format!("{}_", new.name);
    let replaced_version = t.slot.label.strip_prefix(&prefix).map(str::to_string);
    let mut removed = Vec::new();
    let mut freed = 0u64;
    let dev = EspDevice { t };
    let (need, free) = kiln_formats::fat::edit::space(&dev, uki.len() as u64)
        .with_context(|| t.esp_where.clone())?;
    let cluster = {
        let r = t.esp_reader()?;
        u64::from(r.geometry.cluster_size())
    };
    for (path, e) in &t.entries {
        if e.is_dir() || !path.to_ascii_lowercase().starts_with("/efi/linux/") {
            continue;
        }
        if let Some(u) = parse_uki(&new.name, &e.name) {
            if Some(&u.version) == replaced_version.as_ref() || u.version == new.version {
                removed.push(path.clone());
                freed += u64::from(e.size).div_ceil(cluster);
            }
        }
    }
    let linux_dir = t
        .entries
        .iter()
        .find(|(p, e)| e.is_dir() && p.eq_ignore_ascii_case("/efi/linux"))
        .map(|(p, _)| p.clone())
        .ok_or_else(|| anyhow!("{}: no /EFI/Linux directory for the UKI", t.esp_where))?;
    // One more cluster in case the directory has to grow.
    if free + freed < need + 1 {
        bail!(
            "{}: the ESP has {} free clusters of {cluster} bytes ({} once the replaced UKIs \
             are removed) but {} needs {}",
            t.esp_where,
            free,
            free + freed,
            new.uki_name,
            need + 1
        );
    }
    let installed = format!("{linux_dir}/{}", new.uki_name);
    Ok(EspPlan {
        uki,
        linux_dir,
        mtime: new.source_date_epoch.unwrap_or(0),
        installed,
        removed,
    })
}

/// Step 3: the ESP edit, in place and crash-safe.
fn edit_esp(t: &Target, new: &NewBuild, esp: &EspPlan) -> Result<()> {
    use kiln_formats::fat::edit;
    let dev = EspDevice { t };
    for path in &esp.removed {
        edit::remove_file(&dev, path)
            .with_context(|| format!("{}: removing {path}", t.esp_where))?;
    }
    edit::add_file(&dev, &esp.linux_dir, &new.uki_name, &esp.uki, esp.mtime)
        .with_context(|| format!("{}: adding {}", t.esp_where, esp.installed))?;
    Ok(())
}

/// Writes both GPT copies of `t.table` (checked first), in an order a power cut cannot turn
/// into a disk whose firmware sees neither the old table nor the new one.
fn write_gpt(t: &mut Target) -> Result<()> {
    let img = t.img.display();
    t.table
        .validate()
        .map_err(|e| anyhow!("{img}: the updated GPT: {e}"))?;
    if t.table.disk_size() != t.disk_len - t.disk_len % 512 {
        bail!(
            "{img}: the GPT describes {} bytes but the disk has {}",
            t.table.disk_size(),
            t.disk_len
        );
    }
    // Backup first, then primary, each header after its entries (see Gpt::rewrite_batches).
    for batch in t
        .table
        .rewrite_batches()
        .map_err(|e| anyhow!("{img}: GPT: {e}"))?
    {
        for (off, bytes) in batch {
            t.f.write_all_at(&bytes, off)
                .with_context(|| format!("{img}: writing the GPT at offset {off}"))?;
        }
        flush(&t.f, &t.img)?;
    }
    Ok(())
}

/// Names the target slot `_empty` in the GPT before its contents change, so that a run cut
/// short leaves a slot every later `kiln update` picks again as its target (and resumes into),
/// and no tool takes for a version.
pub(crate) fn mark_target_empty(t: &mut Target) -> Result<()> {
    if t.slot.label == EMPTY_LABEL {
        return Ok(());
    }
    t.table.partitions[t.slot.data].name = EMPTY_LABEL.to_string();
    t.table.partitions[t.slot.hash].name = EMPTY_LABEL.to_string();
    write_gpt(t)
}

/// Steps 2 and 3 (see the module documentation), once the target slot holds NEW's data and
/// hash images and they are flushed: the GPT, then the ESP.
pub(crate) fn finish_install(t: &mut Target, new: &NewBuild, esp: EspPlan) -> Result<UpdateReport> {
    let nv = new.nv();
    let img = t.img.clone();
    // The root hash halves, raw, as UUIDs (what the UKI's roothash= looks for, as kiln build
    // sets them) and the version as names (what systemd-sysupdate and kiln.label= look for).
    let mut a = [0u8; 16];
    let mut b = [0u8; 16];
    a.copy_from_slice(&new.root_hash[..16]);
    b.copy_from_slice(&new.root_hash[16..]);
    let (a, b) = (Uuid::from_bytes(a), Uuid::from_bytes(b));
    let (sd, sh) = (t.slot.data, t.slot.hash);
    let dups = t
        .table
        .partitions
        .iter()
        .enumerate()
        .any(|(i, p)| i != sd && i != sh && (p.part_guid == a || p.part_guid == b));
    if dups {
        bail!(
            "{}: another partition already has the root hash of {nv} as its UUID",
            img.display()
        );
    }
    t.table.partitions[sd].part_guid = a;
    t.table.partitions[sh].part_guid = b;
    t.table.partitions[sd].name = nv.clone();
    t.table.partitions[sh].name = nv.clone();
    write_gpt(t)?;

    // 3. The ESP.
    edit_esp(t, new, &esp)?;
    flush(&t.f, &img)?;

    Ok(UpdateReport {
        name: new.name.clone(),
        version: new.version.clone(),
        data_partition: t.table.number(sd),
        hash_partition: t.table.number(sh),
        replaced: t.slot.label.clone(),
        kept: t.kept.clone(),
        installed_uki: esp.installed,
        removed_ukis: esp.removed,
        gpt_restored: t.gpt_restored.clone(),
    })
}

/// Installs NEW into the inactive slot of `opts.image`.
pub fn update(opts: &UpdateOptions) -> Result<UpdateReport> {
    let (report, dir) = load_new(&opts.with)?;
    let new = new_from_report(&report, &opts.with.display().to_string())?;
    let nv = new.nv();
    let short = if new.data_type_name.starts_with("usr-") {
        "usr"
    } else {
        "root"
    };
    let mut t = open_target(&opts.image, &new, false)?;
    let img = opts.image.clone();

    // NEW's bytes, checked against its report, and that they fit.
    let data = read_artifact(&report, &dir, &format!("{nv}.{short}.raw"))?;
    let hash = read_artifact(&report, &dir, &format!("{nv}.{short}-verity.raw"))?;
    let uki = read_artifact(&report, &dir, &format!("{nv}.efi"))?;
    for (what, bytes, i) in [("data", &data, t.slot.data), ("verity", &hash, t.slot.hash)] {
        let p = &t.table.partitions[i];
        if bytes.len() as u64 > p.size() {
            bail!(
                "{}: {nv}'s {what} image is {} bytes but partition {} holds only {}; rebuild with the same partition sizes",
                img.display(),
                bytes.len(),
                t.table.number(i),
                p.size()
            );
        }
    }
    let esp = assemble_esp(&t, &new, uki)?;

    // 1. The slot's contents.
    let (d, h) = (t.data().clone(), t.hash().clone());
    write_range(&t.f, &t.part_what(t.slot.data), d.offset(), d.size(), &data)?;
    write_range(&t.f, &t.part_what(t.slot.hash), h.offset(), h.size(), &hash)?;
    flush(&t.f, &img)?;

    // 2 and 3.
    finish_install(&mut t, &new, esp)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn uki_names() {
        assert_eq!(
            parse_uki("app", "app_2+3.efi"),
            Some(Uki {
                file: "app_2+3.efi".into(),
                version: "2".into(),
                counter: Some((3, 0))
            })
        );
        assert_eq!(
            parse_uki("app", "app_2.1+0-3.efi").unwrap().counter,
            Some((0, 3))
        );
        assert_eq!(parse_uki("app", "app_1.efi").unwrap().counter, None);
        assert_eq!(parse_uki("app", "app_1.efi").unwrap().version, "1");
        assert!(parse_uki("app", "other_1.efi").is_none());
        assert!(parse_uki("app", "app_.efi").is_none());
        assert!(parse_uki("app", "app_1+x.efi").is_none());
        assert!(parse_uki("app", "apple_1.efi").is_none());
    }

    #[test]
    fn versions_compare_numerically() {
        use Ordering::*;
        for (a, b, o) in [
            ("2", "10", Less),
            ("1.10", "1.9", Greater),
            ("1.0", "1.0", Equal),
            ("1.0~rc1", "1.0", Less),
            ("1.0", "1.0a", Less),
            ("007", "7", Equal),
            ("2026.1", "2025.12", Greater),
        ] {
            assert_eq!(version_cmp(a, b), o, "{a} vs {b}");
        }
    }
}
