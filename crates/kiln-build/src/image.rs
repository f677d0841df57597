//! `kiln build`: a spec and a source tree become a GPT disk image, written in one pass straight
//! into the output file at each partition's offset, plus its split artifacts, sidecars and a
//! report. Nothing is written under a final name until everything has succeeded.
//!
//! Order of work: read and normalise the tree; check the policy; split it per partition; plan
//! every filesystem (exact sizes for ext4 and FAT, an upper bound for compressed EROFS); lay the
//! disk out; write the data partitions in disk order — an auto-sized partition takes its final
//! size once written and the partitions after it move up, which is safe because nothing after
//! it has been written yet; hash the verity partitions; build the UKI with the root hash and
//! write the ESP last (its size was fixed up front from a UKI of identical length); write the
//! GPT; then the slot table, sidecars, split artifacts, the hybrid ISO when the spec asks for
//! one (`crate::iso`, from the same tree; an ISO-only spec skips the disk), SBOM, provenance
//! and signatures.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use kiln_formats::fstree::{self, Contents, NodeKind, Timestamp, Tree};
use kiln_formats::repart::{self, Uuid};
use kiln_formats::sink::FileSink;
use kiln_formats::{erofs, ext4, fat, gpt, verity};
use kiln_inject::slots::{self as islots, ByteRange, PayloadInfo, SlotMeta};
use kiln_tree::output::AtomicFile;
use kiln_tree::progress::{self, Progress};
use kiln_tree::{Normalize, SourceArg};
use rayon::prelude::*;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::boot;
use crate::layout::{self, align_up, FsSize, Layout, Role, ALIGN, SECTOR};
use crate::prepare;
use crate::spec::{self, Compression, FsKind, PartSize, Spec};
use crate::sysupdate;

/// What `kiln build` was asked to do.
#[derive(Clone, Debug, Default)]
pub struct BuildOptions {
    /// The spec file, or a directory holding `kiln.toml`.
    pub spec: PathBuf,
    /// Where outputs go (created if missing).
    pub outdir: PathBuf,
    /// Overrides the spec's `[source] tree`.
    pub source: Option<PathBuf>,
    /// Overrides the spec's seed.
    pub seed: Option<Uuid>,
    /// Overrides the spec's `[image] version` (release pipelines build each version from one
    /// spec).
    pub version: Option<String>,
    /// Sign the outputs with this minisign secret key.
    pub sign_key: Option<PathBuf>,
    /// Kept for callers that set it; the library never prints (see [`build_with`]).
    pub quiet: bool,
}

/// One output file.
#[derive(Clone, Debug, Serialize)]
pub struct Artifact {
    /// File name in the output directory.
    pub file: String,
    /// Size in bytes.
    pub size: u64,
    /// sha256, hex (`digest`, `"sha256:HEX"`, in JSON).
    #[serde(rename = "digest", serialize_with = "crate::json::sha256")]
    pub sha256: String,
}

/// One GPT entry as built.
#[derive(Clone, Debug, Serialize)]
pub struct PartitionReport {
    /// 1-based partition number.
    pub number: usize,
    /// What it is for (`data`, `verity`, `empty-twin`, `empty-verity-twin` in JSON).
    #[serde(serialize_with = "Role::serialize_name")]
    pub role: Role,
    /// DPS type name (or GUID text).
    #[serde(rename = "type")]
    pub type_name: String,
    /// Type GUID.
    pub type_uuid: String,
    /// GPT name.
    pub label: String,
    /// Partition UUID.
    pub uuid: String,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
    /// Filesystem, if kiln wrote one.
    pub filesystem: Option<String>,
    /// Filesystem UUID, if any.
    pub fs_uuid: Option<String>,
    /// Bytes the filesystem occupies (the rest of the partition is zero).
    pub fs_size: Option<u64>,
    /// GPT attribute bits (a list of names in JSON).
    #[serde(serialize_with = "crate::json::gpt_attributes")]
    pub attributes: u64,
    /// sha256 of the partition's bytes, hex (`digest`, `"sha256:HEX"`, in JSON).
    #[serde(rename = "digest", serialize_with = "crate::json::sha256")]
    pub sha256: String,
}

/// A dm-verity pair.
#[derive(Clone, Debug, Serialize)]
pub struct VerityReport {
    /// Partition number of the data.
    pub data_partition: usize,
    /// Partition number of the hash tree.
    pub hash_partition: usize,
    /// Root hash, hex.
    pub root_hash: String,
    /// Salt, hex.
    pub salt: String,
    /// Superblock UUID.
    pub uuid: String,
    /// 4096-byte data blocks covered.
    pub data_blocks: u64,
}

/// Bytes of `extra` free space per extra free inode of an auto-sized ext4 filesystem:
/// mke2fs's default inode ratio (`mke2fs.conf`, `inode_ratio = 16384`).
const EXTRA_BYTES_PER_INODE: u64 = 16384;

/// The boot stage's result.
#[derive(Clone, Debug, Serialize)]
pub struct BootReport {
    /// Kernel version.
    pub kernel: String,
    /// Kernel path in the tree.
    pub kernel_path: String,
    /// The UKI's command line.
    pub cmdline: String,
    /// File name under `EFI/Linux/` on the ESP.
    pub uki: String,
    /// Where the stub came from.
    pub stub: String,
    /// Initrd size in bytes.
    pub initrd_size: u64,
    /// Modules in the initrd, in load order.
    pub modules: Vec<String>,
    /// Module → why it is in the initrd (what asked for it).
    pub module_reasons: BTreeMap<String, String>,
    /// Requested modules built into the kernel.
    pub builtin: Vec<String>,
    /// Optional modules this kernel does not have.
    pub skipped: Vec<String>,
    /// Soft dependencies and run-time aliases nothing in the kernel provides, with who wanted
    /// them.
    pub unresolved: Vec<String>,
}

impl BootReport {
    /// The report of a boot stage whose UKI has command line `cmdline` and file name `uki`.
    pub fn new(bp: &boot::BootParts, cmdline: String, uki: String) -> Self {
        BootReport {
            kernel: bp.kernel.version.clone(),
            kernel_path: bp.kernel.image.clone(),
            cmdline,
            uki,
            stub: bp.stub_from.clone(),
            initrd_size: bp.initrd.len() as u64,
            modules: bp.modules.clone(),
            module_reasons: bp
                .modules
                .iter()
                .cloned()
                .zip(bp.reasons.iter().cloned())
                .collect(),
            builtin: bp.builtin.clone(),
            skipped: bp.skipped.clone(),
            unresolved: bp.unresolved.clone(),
        }
    }
}

/// `OUTDIR/NAME.json`.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// [`crate::json::BUILD_SCHEMA`].
    pub schema: &'static str,
    /// kiln's version.
    pub kiln_version: &'static str,
    /// Image name.
    pub name: String,
    /// Image version.
    pub version: String,
    /// The seed, hex.
    pub seed: String,
    /// `SOURCE_DATE_EPOCH` used.
    pub source_date_epoch: Option<i64>,
    /// sha256 of the spec file, hex (`spec_digest`, `"sha256:HEX"`, in JSON).
    #[serde(rename = "spec_digest", serialize_with = "crate::json::sha256")]
    pub spec_sha256: String,
    /// The source as given.
    pub source: String,
    /// Digest of the normalised input tree (paths, metadata, bytes).
    pub input_digest: String,
    /// The disk image (absent when `[image] output` lists only "iso").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<Artifact>,
    /// Disk GUID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_uuid: Option<String>,
    /// Chunked digest of the disk (`kiln verify --digest`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunked_digest: Option<String>,
    /// Partitions in GPT order.
    pub partitions: Vec<PartitionReport>,
    /// Root hash of the (first) verity-protected root or usr partition.
    pub root_hash: Option<String>,
    /// All verity pairs.
    pub verity: Vec<VerityReport>,
    /// The boot stage, if the spec has `[boot]`.
    pub boot: Option<BootReport>,
    /// Injectable slots.
    #[serde(serialize_with = "crate::json::slots")]
    pub slots: Vec<islots::Slot>,
    /// Every other output file.
    pub artifacts: Vec<Artifact>,
    /// The hybrid ISO, when `[image] output` lists "iso".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iso: Option<crate::iso::IsoReport>,
    /// The container image the source was (reference, digests, layers, and its config's
    /// Env, Entrypoint, Cmd, WorkingDir and User).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<kiln_tree::oci::ImageConfig>,
}

impl Report {
    /// The fields every build reports (what was built, from what), with no outputs yet.
    fn describing(
        spec: &Spec,
        source: &Path,
        epoch: Option<i64>,
        input_digest: &[u8; 32],
        image: Option<&kiln_tree::oci::ImageConfig>,
    ) -> Self {
        Self {
            schema: crate::json::BUILD_SCHEMA,
            kiln_version: env!("CARGO_PKG_VERSION"),
            name: spec.name.clone(),
            version: spec.version.clone(),
            seed: hex32(&spec.seed),
            source_date_epoch: epoch,
            spec_sha256: hex32(&spec.digest),
            source: source.display().to_string(),
            input_digest: format!("sha256:{}", hex32(input_digest)),
            disk: None,
            disk_uuid: None,
            chunked_digest: None,
            partitions: Vec::new(),
            root_hash: None,
            verity: Vec::new(),
            boot: None,
            slots: Vec::new(),
            artifacts: Vec::new(),
            iso: None,
            image: image.cloned(),
        }
    }
}

/// Tells the build's observer about each stage.
pub(crate) struct Stages<'p> {
    progress: &'p dyn Progress,
}

impl Stages<'_> {
    pub(crate) fn done(&self, what: impl std::fmt::Display) {
        self.progress.done(&what.to_string());
    }

    /// A long stage of about `total` bytes starts; its bytes go to [`Stages::progress`].
    pub(crate) fn begin(&self, what: impl std::fmt::Display, total: u64) {
        self.progress.begin(&what.to_string(), Some(total));
    }

    pub(crate) fn progress(&self) -> &dyn Progress {
        self.progress
    }
}

/// Bytes of file data a writer copies for `tree` (what its progress callbacks count).
fn data_bytes(tree: &Tree) -> u64 {
    tree.nodes
        .iter()
        .map(|n| match &n.kind {
            NodeKind::File(f) => f.stored_len(),
            _ => 0,
        })
        .sum()
}

/// A filesystem written into a partition.
enum Written {
    Ext4(ext4::Report),
    Erofs(erofs::Summary),
    Fat(fat::FatReport),
}

/// A partition's planned content.
enum Planned<'t> {
    None,
    Ext4(ext4::Plan),
    Erofs(erofs::Plan<'t>),
    Fat(fat::FatOptions),
}

fn hex32(u: &[u8]) -> String {
    hex::encode(u)
}

fn uuid_text(u: &Uuid) -> String {
    repart::format_uuid(u)
}

/// Builds the image described by `opts`, silently.
pub fn build(opts: &BuildOptions) -> Result<Report> {
    build_with(opts, &progress::Silent)
}

/// Builds the image described by `opts`, telling `progress` about every stage: a line per
/// finished stage, and the bytes of the long ones (writing a filesystem, verity, digests).
pub fn build_with(opts: &BuildOptions, progress: &dyn Progress) -> Result<Report> {
    let stages = Stages { progress };
    let mut spec = Spec::load(&opts.spec).map_err(|e| anyhow!("{e}"))?;
    if let Some(seed) = opts.seed {
        spec.seed = seed;
    }
    if let Some(v) = &opts.version {
        spec::check_version(v).map_err(|e| anyhow!("--version: {e}"))?;
        spec.version = v.clone();
    }
    let epoch = match spec.source_date_epoch {
        Some(e) => Some(e),
        None => Normalize::from_env(false)?.source_date_epoch,
    };
    let mtime = epoch.unwrap_or(0);

    // Source.
    let source = opts
        .source
        .clone()
        .or_else(|| spec.source.clone())
        .ok_or_else(|| {
            anyhow!(
                "no source tree: give --source PATH or set [source] tree in {}",
                spec.file.display()
            )
        })?;
    if let (None, Some(at)) = (&opts.source, spec.source_at) {
        let reference = ["oci://", "oci-layout:", "docker-archive:"]
            .iter()
            .any(|s| source.to_string_lossy().starts_with(s));
        if !reference && !source.exists() {
            bail!(
                "{}:{}:{}: [source] tree {} does not exist (make it, or give --source PATH)",
                spec.file.display(),
                at.line,
                at.column,
                source.display()
            );
        }
    }
    for (i, p) in spec.partitions.iter().enumerate() {
        if let PartSize::Fixed(sz) = p.size {
            if sz.0 % ALIGN != 0 {
                progress.note(&format!(
                    "{}:{}: partition {} size {} rounded up to {} (partitions are 1 MiB aligned)",
                    spec.file.display(),
                    p.at.line,
                    i + 1,
                    spec::human_size(sz.0),
                    spec::human_size(align_up(sz.0, ALIGN))
                ));
            }
        }
    }
    let arg = SourceArg::parse(&source);
    let (mut tree, contents, image) = kiln_tree::open_random_access_holes(&arg, !spec.keep_zeroes)
        .with_context(|| format!("reading the source {}", source.display()))?;
    if let Some(name) = &spec.service {
        let unit = crate::prepare::image_service(&mut tree, image.as_ref(), name, mtime)?;
        stages.done(format_args!("source: {unit} from the image config"));
    }
    if let Some(add) = &spec.add {
        let n = kiln_tree::dir::add_dir(&mut tree, add)
            .with_context(|| format!("[source] add = {}", add.display()))?;
        if !spec.keep_zeroes {
            let pick = |f: &fstree::FileData| matches!(&f.data, fstree::DataRef::Host(p) if p.starts_with(add));
            kiln_tree::holes::find_where(&mut tree, &contents, &pick)
                .with_context(|| format!("[source] add = {}", add.display()))?;
        }
        stages.done(format_args!(
            "source: {n} entries added from {}",
            add.display()
        ));
    }
    Normalize {
        source_date_epoch: epoch,
        all_root: spec.all_root,
    }
    .apply(&mut tree);
    let input_digest = prepare::tree_digest(&tree, &contents)?;
    stages.done(format_args!(
        "source {}: {} entries",
        source.display(),
        tree.walk().len()
    ));
    prepare::check_arch(&tree, &contents, spec.arch).context("source tree")?;
    if boot::add_esp_mount_point(&spec, &mut tree, mtime)? {
        stages.done(format_args!(
            "root: added /efi, where systemd mounts the ESP to bless a counted boot"
        ));
    }

    // Policy, before anything is written.
    if !spec.forbid.is_empty() {
        let policy = kiln_ship::policy::Policy {
            forbid: spec.forbid.clone(),
        };
        let hits = kiln_ship::policy::scan(&tree, &contents, &policy)?;
        if !hits.is_empty() {
            let list: String = hits.iter().map(|h| format!("  {h}\n")).collect();
            bail!(
                "content policy: {} forbidden match(es) in the tree:\n{list}",
                hits.len()
            );
        }
        stages.done("policy: clean");
    }

    let machine_id = prepare::machine_id(&tree, &contents)?;
    let name_version = format!("{}_{}", spec.name, spec.version);
    let osrel = prepare::os_release(&tree, &contents, &spec.name, &spec.version)?;
    prepare::stamp_os_release(&mut tree, &osrel)?;

    // A/B images carry the sysupdate transfers that fill their inactive slot.
    let ab = spec
        .partitions
        .iter()
        .find(|p| p.slots == 2)
        .map(|p| (short_type(&p.type_name), p.verity));
    let transfers = ab.map(|(t, v)| {
        sysupdate::transfers(
            &spec.name,
            t,
            v,
            spec.boot.as_ref().map(|b| b.tries),
            &Default::default(),
        )
    });
    if let Some(ts) = &transfers {
        for t in ts {
            let path = format!("/usr/lib/sysupdate.d/{}", t.file);
            if tree.resolve(path.as_bytes()).is_none() {
                let node = fstree::Node {
                    kind: NodeKind::File(fstree::FileData::dense(
                        t.text.len() as u64,
                        fstree::DataRef::Inline(t.text.as_bytes().into()),
                    )),
                    meta: fstree::Meta {
                        perm: 0o644,
                        mtime: Timestamp::from_secs(mtime),
                        ..Default::default()
                    },
                    slot: None,
                };
                tree.insert(
                    path.as_bytes(),
                    node,
                    &fstree::Meta {
                        perm: 0o755,
                        mtime: Timestamp::from_secs(mtime),
                        ..Default::default()
                    },
                )?;
            }
        }
    }

    let finish_with = Finish {
        opts,
        spec: &spec,
        tree: &tree,
        contents: &contents,
        source: &source,
        epoch,
        input_digest,
        stages: &stages,
    };
    let iso_inputs = crate::iso::IsoInputs {
        spec: &spec,
        tree: &tree,
        contents: &contents,
        osrel: &osrel,
        epoch,
        outdir: &opts.outdir,
        name_version: &name_version,
    };
    if !spec.disk {
        // `output = ["iso"]`: no disk is laid out.
        std::fs::create_dir_all(&opts.outdir)
            .with_context(|| format!("creating {}", opts.outdir.display()))?;
        let iso = crate::iso::build(&iso_inputs, &stages)?;
        let report = Report::describing(&spec, &source, epoch, &input_digest, image.as_ref());
        return finish(&finish_with, report, Vec::new(), None, Some(iso));
    }

    // Per-partition trees and slots.
    let mut trees = prepare::split(&spec, &tree)?;
    for (p, t) in spec.partitions.iter().zip(trees.iter_mut()) {
        if let Some(t) = t {
            prepare::place_slots(p, t, &contents, mtime)?;
        }
    }

    // Boot: everything but the root hash, so the ESP can be sized up front.
    let root_index = spec
        .partitions
        .iter()
        .position(|p| p.type_name.starts_with("root-") || p.type_name.starts_with("usr-"));
    let boot_parts = match &spec.boot {
        None => None,
        Some(b) => {
            let root_fs = root_index.map(|i| spec.partitions[i].fs.name());
            let cfg = kiln_init::config::Config {
                overlays: b.overlays.clone(),
                rootfstype: root_fs.map(str::to_string),
                ..Default::default()
            };
            let parts = boot::prepare(
                b,
                spec.arch,
                &tree,
                &contents,
                root_fs,
                cfg,
                osrel.clone(),
                mtime.clamp(0, u32::MAX as i64) as u32,
            )?;
            stages.done(format_args!("initrd: {}", parts.summary()));
            Some(parts)
        }
    };
    let tries = spec.boot.as_ref().map(|b| b.tries).unwrap_or(0);
    let uki_file = boot::uki_name(&name_version, tries);

    // Plan every filesystem.
    let mut planned: Vec<Planned<'_>> = Vec::new();
    let mut sizes = Vec::new();
    let esp_index = spec.partitions.iter().position(|p| p.type_name == "esp");
    // The ESP tree with a UKI of final length (the root hash is a fixed-length hex string).
    let placeholder_cmdline = boot_parts
        .as_ref()
        .map(|_| cmdline(&spec, None, &[0u8; 32]));
    let placeholder_uki: Option<Arc<[u8]>> = match (&boot_parts, &placeholder_cmdline) {
        (Some(bp), Some(c)) => Some(bp.uki(c)?.into()),
        _ => None,
    };
    if let (Some(i), Some(bp), Some(uki)) = (esp_index, &boot_parts, &placeholder_uki) {
        let base = trees[i].take();
        trees[i] = Some(boot::esp_tree(
            spec.arch,
            base,
            &bp.systemd_boot,
            &uki_file,
            uki.clone(),
            spec.boot.as_ref().map(|b| b.timeout).unwrap_or(0),
            mtime,
        )?);
    }
    // Provisional partition UUIDs: filesystem UUIDs derive from them (as systemd-repart does,
    // from the UUID before verity replaces it).
    let provisional = layout::layout(
        &spec,
        // Provisional: no size is known yet, so no budget is judged on it.
        &vec![
            FsSize {
                bytes: 0,
                upper_bound: true,
            };
            spec.partitions.len()
        ],
        machine_id.as_ref(),
    )
    .map_err(|e| anyhow!("{e}"))?;
    let part_uuid_of = |spec_i: usize| -> Uuid {
        provisional
            .parts
            .iter()
            .find(|p| p.spec == spec_i && p.role == Role::Data)
            .map(|p| p.uuid)
            .unwrap_or([0; 16])
    };
    for (i, p) in spec.partitions.iter().enumerate() {
        let t = trees[i].as_ref();
        let fs_uuid = repart::filesystem_uuid(&part_uuid_of(i));
        let label = p
            .label
            .clone()
            .unwrap_or_else(|| repart::label(&p.type_name, 0));
        let mut upper_bound = false;
        let (pl, need) = match (p.fs, t) {
            (FsKind::None, _) | (_, None) => (Planned::None, 0),
            (FsKind::Ext4, Some(t)) => {
                let size = match p.size {
                    PartSize::Fixed(s) => ext4::Size::Fixed(align_up(s.0, ALIGN)),
                    // The free space gets inodes at mke2fs's default density (one per
                    // 16 KiB): a writable /var with room for data but no free inode cannot
                    // create a file (journald, logind and dpkg all do at boot).
                    PartSize::Auto => ext4::Size::Minimize {
                        extra_bytes: p.extra,
                        extra_inodes: p.extra / EXTRA_BYTES_PER_INODE,
                    },
                };
                let mut o = ext4::Options::from_seed(Some(&part_uuid_of(i)), size);
                o.label = truncate_label(&label, 16);
                o.timestamp = mtime;
                // An auto-sized filesystem stays minimized (with `extra` free space); the rest
                // of its 1 MiB-aligned partition is padding. Re-planning it as fixed-size would
                // switch to fixed-size inode density and need more room than it has.
                let plan = ext4::plan(t, &o).map_err(|e| part_error(p, &e.to_string(), t))?;
                let need = plan.size_bytes();
                (Planned::Ext4(plan), need)
            }
            (FsKind::Erofs, Some(t)) => {
                let o = erofs::Options {
                    compression: match p.compression {
                        Compression::None => erofs::Compression::None,
                        Compression::Lz4 => erofs::Compression::Lz4,
                        Compression::Lz4hc => erofs::Compression::Lz4hc {
                            level: erofs::LZ4HC_DEFAULT_LEVEL,
                        },
                    },
                    uuid: fs_uuid,
                    timestamp: epoch.map(Timestamp::from_secs),
                    volume_name: truncate_label(&label, 16).into_bytes(),
                    ..Default::default()
                };
                let plan = erofs::plan(t, &o).map_err(|e| part_error(p, &e.to_string(), t))?;
                let need = plan.size().bytes;
                upper_bound = !plan.size().exact;
                (Planned::Erofs(plan), need)
            }
            (FsKind::Vfat, Some(t)) => {
                let fat_label = fat_label(&label);
                let (size, fat_type) = match p.size {
                    PartSize::Fixed(s) => (align_up(s.0, ALIGN), None),
                    PartSize::Auto => {
                        fat::auto_size(t, None, fat_label.clone(), p.extra.max(64 << 10))
                            .map_err(|e| part_error(p, &e.to_string(), t))?
                    }
                };
                let o = fat::FatOptions {
                    size,
                    fat_type,
                    volume_id: fat_volume_id(&fs_uuid),
                    label: fat_label,
                };
                fat::FatWriter::new(t, o.clone()).map_err(|e| part_error(p, &e.to_string(), t))?;
                (Planned::Fat(o), size)
            }
        };
        if let (Some(b), Some(t), false) = (p.budget, t, upper_bound) {
            if need > b {
                bail!(
                    "partition {} (line {}) needs {}, over its budget of {}; the heaviest paths:\n{}",
                    p.label.as_deref().unwrap_or(&p.type_name),
                    p.at.line,
                    spec::human_size(need),
                    spec::human_size(b),
                    crate::budget::report(t, 20)
                );
            }
        }
        planned.push(pl);
        sizes.push(FsSize {
            bytes: need,
            upper_bound,
        });
    }
    let mut lay = layout::layout(&spec, &sizes, machine_id.as_ref()).map_err(|e| match e.spec {
        Some(i) => match &trees[i] {
            Some(t) => anyhow!("{e}; the heaviest paths:\n{}", crate::budget::report(t, 20)),
            None => anyhow!("{e}"),
        },
        None => anyhow!(
            "{e}; the heaviest paths of the source:\n{}",
            crate::budget::report(&tree, 20)
        ),
    })?;
    stages.done(format_args!("plan: {} partitions", lay.parts.len()));

    // Write.
    std::fs::create_dir_all(&opts.outdir)
        .with_context(|| format!("creating {}", opts.outdir.display()))?;
    let disk_name = format!("{name_version}.img");
    let disk_path = opts.outdir.join(&disk_name);
    let out = AtomicFile::create(&disk_path)
        .with_context(|| format!("creating {}", disk_path.display()))?;
    let file = out.file();
    let mut written: BTreeMap<usize, Written> = BTreeMap::new();
    let mut fs_sizes: BTreeMap<usize, u64> = BTreeMap::new();
    let mut verity_reports = Vec::new();
    let mut root_hash: Option<[u8; 32]> = None;
    let mut esp_part: Option<usize> = None;
    let salt = repart::verity_salt(&spec.seed);
    let vuuid = repart::verity_uuid(&spec.seed);

    // In disk order: a partition is written after every partition before it on the disk, so
    // shrinking an auto-sized one moves only partitions not yet written.
    for idx in lay.order.clone() {
        reflow(&mut lay);
        let part = lay.parts[idx].clone();
        match part.role {
            Role::Data => {
                let sp = &spec.partitions[part.spec];
                if Some(part.spec) == esp_index && boot_parts.is_some() {
                    esp_part = Some(idx);
                    continue;
                }
                let Some(t) = trees[part.spec].as_ref() else {
                    continue;
                };
                let window = FileSink::new(file, part.offset, part.size);
                let (w, used) = match &planned[part.spec] {
                    Planned::None => continue,
                    Planned::Ext4(plan) => {
                        stages.begin(format_args!("{} (ext4)", part.label), plan.data_bytes(t));
                        let inc = progress::advancing(stages.progress());
                        let r = plan
                            .write_with_progress(t, &contents, &window, &inc)
                            .map_err(|e| {
                                anyhow!("partition {} (line {}): {e}", part.label, sp.at.line)
                            })?;
                        let used = r.size_bytes;
                        (Written::Ext4(r), used)
                    }
                    Planned::Erofs(plan) => {
                        stages.begin(format_args!("{} (erofs)", part.label), data_bytes(t));
                        let at = progress::positioning(stages.progress());
                        let s = plan.write(&contents, &window, &at).map_err(|e| {
                            anyhow!("partition {} (line {}): {e}", part.label, sp.at.line)
                        })?;
                        let used = s.size;
                        (Written::Erofs(s), used)
                    }
                    Planned::Fat(o) => {
                        let r = fat::FatWriter::new(t, o.clone())?
                            .write(&contents, &window)
                            .map_err(|e| {
                                anyhow!("partition {} (line {}): {e}", part.label, sp.at.line)
                            })?;
                        (Written::Fat(r), o.size)
                    }
                };
                if let Some(b) = sp.budget {
                    if used > b {
                        bail!(
                            "partition {} (line {}) is {}, over its budget of {}; the heaviest paths by their share of it:\n{}",
                            part.label,
                            sp.at.line,
                            spec::human_size(used),
                            spec::human_size(b),
                            crate::budget::report_share(t, 20, used)
                        );
                    }
                }
                if matches!(sp.size, PartSize::Auto) {
                    lay.parts[idx].size = align_up(used.max(1), ALIGN);
                }
                stages.done(format_args!(
                    "{} ({}): {}",
                    part.label,
                    sp.fs.name(),
                    spec::human_size(used)
                ));
                written.insert(idx, w);
                fs_sizes.insert(idx, used);
            }
            Role::Verity { of } => {
                let data = lay.parts[of].clone();
                let params = verity::Params::new(&salt, vuuid);
                stages.begin(format_args!("verity of {}", data.label), data.size);
                let read = |off: u64, buf: &mut [u8]| -> std::io::Result<()> {
                    // Past the end of what was written, the file reads short: zeroes.
                    let n = read_full_at(file, buf, data.offset + off)?;
                    buf[n..].fill(0);
                    stages.progress().advance(buf.len() as u64);
                    Ok(())
                };
                let hash_sink = FileSink::new(file, part.offset, part.size);
                let f = verity::format(&params, data.size, &read, &hash_sink)
                    .map_err(|e| anyhow!("verity for {}: {e}", data.label))?;
                if root_hash.is_none() {
                    root_hash = Some(f.root_hash);
                }
                lay.set_root_hash(of, &f.root_hash);
                verity_reports.push(VerityReport {
                    data_partition: of + 1,
                    hash_partition: idx + 1,
                    root_hash: hex32(&f.root_hash),
                    salt: hex32(&salt),
                    uuid: uuid_text(&vuuid),
                    data_blocks: f.data_blocks,
                });
                stages.done(format_args!(
                    "verity of {}: root hash {}",
                    data.label,
                    hex32(&f.root_hash)
                ));
            }
            Role::EmptyTwin | Role::EmptyVerityTwin => {}
        }
    }
    reflow(&mut lay);

    // The UKI with the real root hash, and the ESP.
    let mut boot_report = None;
    let mut uki_bytes: Option<Vec<u8>> = None;
    if let (Some(idx), Some(bp)) = (esp_part, &boot_parts) {
        let c = cmdline(&spec, Some(&lay), &root_hash.unwrap_or([0; 32]));
        let uki = bp.uki(&c)?;
        if Some(uki.len()) != placeholder_uki.as_ref().map(|u| u.len()) {
            bail!("internal: the UKI changed size between sizing and writing the ESP");
        }
        let part = lay.parts[idx].clone();
        let sp = &spec.partitions[part.spec];
        let mut esp = trees[part.spec]
            .clone()
            .ok_or_else(|| anyhow!("internal: no ESP tree"))?;
        let uki_node = boot::file(uki.clone().into(), mtime);
        esp.insert(
            format!("/EFI/Linux/{uki_file}").as_bytes(),
            uki_node,
            &fstree::Meta::default(),
        )?;
        let Planned::Fat(o) = &planned[part.spec] else {
            bail!("the ESP must be vfat")
        };
        let window = FileSink::new(file, part.offset, part.size);
        let r = fat::FatWriter::new(&esp, o.clone())?
            .write(&contents, &window)
            .map_err(|e| anyhow!("ESP (line {}): {e}", sp.at.line))?;
        written.insert(idx, Written::Fat(r));
        fs_sizes.insert(idx, o.size);
        trees[part.spec] = Some(esp);
        stages.done(format_args!(
            "esp: systemd-boot + EFI/Linux/{uki_file} ({} KiB)",
            uki.len() / 1024
        ));
        boot_report = Some(BootReport::new(bp, c, uki_file.clone()));
        uki_bytes = Some(uki);
    }

    // The disk's size, GPT and budget.
    let end = lay
        .parts
        .iter()
        .map(|p| p.offset + p.size)
        .max()
        .unwrap_or(ALIGN);
    let min_disk = end + 33 * SECTOR;
    let disk_size = match spec.disk_size {
        Some(s) if s < min_disk => bail!(
            "the partitions need {} but [image] size is {}",
            spec::human_size(min_disk),
            spec::human_size(s)
        ),
        Some(s) => align_up(s, SECTOR),
        None => align_up(min_disk, ALIGN),
    };
    lay.disk_size = disk_size;
    if let Some(b) = spec.budget {
        if disk_size > b {
            bail!(
                "the disk image is {}, over the image budget of {}; the heaviest paths by their share of the written filesystems:\n{}",
                spec::human_size(disk_size),
                spec::human_size(b),
                crate::budget::report_share(&tree, 20, fs_sizes.values().sum())
            );
        }
    }
    file.set_len(disk_size)
        .with_context(|| format!("sizing {}", out.tmp_path().display()))?;
    let mut table = gpt::Gpt::new(disk_size, lay.disk_uuid).map_err(|e| anyhow!("GPT: {e}"))?;
    for p in &lay.parts {
        table.partitions.push(gpt::Partition {
            type_guid: p.type_uuid,
            part_guid: p.uuid,
            first_lba: p.offset / SECTOR,
            last_lba: (p.offset + p.size) / SECTOR - 1,
            attributes: p.flags,
            name: p.label.clone(),
        });
    }
    table
        .write(&FileSink::new(file, 0, disk_size))
        .map_err(|e| anyhow!("GPT: {e}"))?;

    // Slots.
    let mut slot_list = Vec::new();
    for (&idx, w) in &written {
        let part = &lay.parts[idx];
        let sp = &spec.partitions[part.spec];
        let t = trees[part.spec].as_ref();
        for s in &sp.slot {
            let default = default_payload(t, &contents, &s.path)?;
            let fs = part.offset;
            // Only one arm runs, so the closure may take `default` by value.
            let slot_of = move |data: ByteRange, meta: SlotMeta| islots::Slot {
                name: s.name.clone(),
                path: s.path.clone(),
                capacity: s.capacity,
                data: vec![data],
                meta,
                default,
            };
            let slot = match w {
                Written::Ext4(r) => {
                    let l = r.slots.iter().find(|l| l.name == s.name).ok_or_else(|| {
                        anyhow!("slot {}: not reported by the ext4 writer", s.name)
                    })?;
                    slot_of(
                        ByteRange {
                            offset: fs + l.data_offset,
                            len: align_up(l.capacity, 4096),
                        },
                        SlotMeta::Ext4(islots::Ext4Meta {
                            fs_offset: fs,
                            inode: l.inode,
                            inode_offset: fs + l.inode_offset,
                        }),
                    )
                }
                Written::Erofs(sum) => {
                    let l = sum.slots.iter().find(|l| l.name == s.name).ok_or_else(|| {
                        anyhow!("slot {}: not reported by the EROFS writer", s.name)
                    })?;
                    slot_of(
                        ByteRange {
                            offset: fs + l.data_offset,
                            len: align_up(l.capacity, 4096),
                        },
                        SlotMeta::Erofs(islots::ErofsMeta {
                            fs_offset: fs,
                            nid: l.nid,
                            inode_offset: fs + l.inode_offset,
                            extended: l.extended,
                        }),
                    )
                }
                Written::Fat(r) => {
                    let l = r.slots.iter().find(|l| l.name == s.name).ok_or_else(|| {
                        anyhow!("slot {}: not reported by the FAT writer", s.name)
                    })?;
                    slot_of(
                        ByteRange {
                            offset: fs + l.data_offset,
                            len: u64::from(l.cluster_count) * u64::from(l.cluster_size),
                        },
                        SlotMeta::Fat(islots::FatMeta {
                            fs_offset: fs,
                            dirent_offset: fs + l.dirent_offset,
                            first_cluster: l.first_cluster,
                            cluster_count: l.cluster_count,
                            fat_offsets: l.fat_offsets.iter().map(|o| fs + o).collect(),
                            fsinfo_offset: l.fsinfo_offset.map(|o| fs + o),
                            cluster_size: l.cluster_size,
                            fat_bits: fat_bits(l.fat_type),
                        }),
                    )
                }
            };
            slot_list.push(slot);
        }
    }
    let slot_table = islots::SlotTable {
        image_len: disk_size,
        slots: slot_list.clone(),
    };
    let mut pending: Vec<AtomicFile> = Vec::new();
    let mut artifacts: Vec<Artifact> = Vec::new();
    if !slot_list.is_empty() {
        slot_table.validate()?;
        slot_table.write_into(file, &disk_path.display().to_string())?;
        let side = AtomicFile::create(&islots::sidecar_path(&disk_path))?;
        let json = slot_table.to_sidecar_json()?;
        side.file().write_all(json.as_bytes())?;
        artifacts.push(artifact_of_bytes(&side, json.as_bytes()));
        pending.push(side);
        stages.done(format_args!(
            "slots: {}",
            slot_list
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }

    // Digests: the chunk table (with the plain sha256 and the SHA-256 midstates at each slot's
    // first patchable byte, for `kiln serve`) and every partition.
    let src = kiln_inject::FileSource::from_file(file.try_clone()?, out.tmp_path())?;
    // Two passes read the disk: the chunks in parallel and the plain sha256 in sequence.
    stages.begin("digests", 2 * disk_size);
    let src = Counted {
        inner: src,
        progress: stages.progress(),
    };
    let chunks = kiln_inject::ChunkTable::compute_resumable(&src, &slot_table.resume_points())?;
    let disk_sha = chunks
        .sha256
        .ok_or_else(|| anyhow!("internal: no plain sha256 from the chunk table"))?;
    let chunk_file = AtomicFile::create(&kiln_inject::chunks::sidecar_path(&disk_path))?;
    let cbytes = chunks.to_bytes();
    chunk_file.file().write_all(&cbytes)?;
    artifacts.push(artifact_of_bytes(&chunk_file, &cbytes));
    pending.push(chunk_file);
    let part_shas: Vec<[u8; 32]> = lay
        .parts
        .par_iter()
        .map(|p| sha256_range(file, p.offset, p.size))
        .collect::<std::io::Result<_>>()?;
    stages.done(format_args!("digests: disk sha256 {}", hex32(&disk_sha)));

    let partitions: Vec<PartitionReport> = lay
        .parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let sp = &spec.partitions[p.spec];
            let has_fs = written.contains_key(&i);
            PartitionReport {
                number: i + 1,
                role: p.role,
                type_name: p.type_name.clone(),
                type_uuid: uuid_text(&p.type_uuid),
                label: p.label.clone(),
                uuid: uuid_text(&p.uuid),
                offset: p.offset,
                size: p.size,
                filesystem: has_fs.then(|| sp.fs.name().to_string()),
                fs_uuid: has_fs.then(|| uuid_text(&repart::filesystem_uuid(&part_uuid_of(p.spec)))),
                fs_size: fs_sizes.get(&i).copied(),
                attributes: p.flags,
                sha256: hex32(&part_shas[i]),
            }
        })
        .collect();

    // Split artifacts for updates: what `kiln update` and systemd-sysupdate install into the
    // inactive slot. Only A/B images have one, so only they get the (full-size) copies.
    if let Some(ri) = lay.parts.iter().position(|p| {
        p.role == Role::Data
            && (p.type_name.starts_with("root-") || p.type_name.starts_with("usr-"))
            && spec.partitions[p.spec].slots == 2
    }) {
        let short = short_type(&lay.parts[ri].type_name);
        let p = lay.parts[ri].clone();
        let a = copy_out(
            file,
            p.offset,
            p.size,
            &opts.outdir.join(format!("{name_version}.{short}.raw")),
        )?;
        artifacts.push(Artifact {
            file: a.0,
            size: p.size,
            sha256: hex32(&part_shas[ri]),
        });
        pending.push(a.1);
        if let Some(vi) = lay.verity_of(ri) {
            let v = lay.parts[vi].clone();
            let a = copy_out(
                file,
                v.offset,
                v.size,
                &opts
                    .outdir
                    .join(format!("{name_version}.{short}-verity.raw")),
            )?;
            artifacts.push(Artifact {
                file: a.0,
                size: v.size,
                sha256: hex32(&part_shas[vi]),
            });
            pending.push(a.1);
        }
    }
    if let Some(uki) = &uki_bytes {
        let f = AtomicFile::create(&opts.outdir.join(format!("{name_version}.efi")))?;
        f.file().write_all(uki)?;
        artifacts.push(artifact_of_bytes(&f, uki));
        pending.push(f);
    }
    // The signed update index for `kiln update --from` (crate::delta), from the verity tree's
    // level 0: only for a verity A/B root with a UKI, the ones `kiln update` installs.
    if let Some(ix) = update_index(
        &spec,
        &lay,
        &verity_reports,
        &artifacts,
        boot_report.as_ref(),
        uki_bytes.as_deref(),
        file,
        epoch,
    )? {
        let f = AtomicFile::create(&opts.outdir.join(format!("{name_version}.index")))?;
        f.file().write_all(&ix)?;
        artifacts.push(artifact_of_bytes(&f, &ix));
        pending.push(f);
    }
    if let Some(ts) = &transfers {
        let dir = opts.outdir.join("sysupdate.d");
        std::fs::create_dir_all(&dir)?;
        for t in ts {
            let f = AtomicFile::create(&dir.join(&t.file))?;
            f.file().write_all(t.text.as_bytes())?;
            let mut a = artifact_of_bytes(&f, t.text.as_bytes());
            a.file = format!("sysupdate.d/{}", t.file);
            artifacts.push(a);
            pending.push(f);
        }
    }

    // The root partition's filesystem as a bare image: a microVM's root drive.
    if spec.rootfs {
        let ri = lay
            .parts
            .iter()
            .position(|p| p.role == Role::Data && p.type_name.starts_with("root-"))
            .ok_or_else(|| anyhow!("output \"rootfs\" needs a root partition"))?;
        let p = lay.parts[ri].clone();
        let fs_name = spec.partitions[p.spec].fs.name().to_string();
        let a = copy_out(
            file,
            p.offset,
            p.size,
            &opts.outdir.join(format!("{name_version}.rootfs.{fs_name}")),
        )?;
        stages.done(format_args!("{} ({})", a.0, spec::human_size(p.size)));
        artifacts.push(Artifact {
            file: a.0,
            size: p.size,
            sha256: hex32(&part_shas[ri]),
        });
        pending.push(a.1);
        // A distribution kernel has virtio-mmio and virtio-blk (and maybe the filesystem) as
        // modules: with a kernel in the tree, its image and an initrd that loads them go beside
        // the rootfs, for `kiln boot --microvm` or a Firecracker config.
        if let Ok(kernel) = crate::initrd::find_kernel(&tree, None) {
            for (f, a) in
                microvm_boot_files(&spec, &tree, &contents, &kernel, &fs_name, mtime, opts)?
            {
                stages.done(format_args!("{} ({})", a.file, spec::human_size(a.size)));
                artifacts.push(a);
                pending.push(f);
            }
        }
    }
    if !spec.keep_disk {
        // Only the rootfs was asked for: the disk and its sidecars were scaffolding.
        let disk_prefix = disk_name.clone();
        artifacts.retain(|a| !a.file.starts_with(&disk_prefix));
        pending.retain(|f| {
            f.dest()
                .file_name()
                .is_none_or(|n| !n.to_string_lossy().starts_with(&disk_prefix))
        });
    }

    // VM disk containers, streamed from the finished raw disk.
    for (f, a) in crate::vmdisk::outputs(
        file,
        disk_size,
        &opts.outdir,
        &name_version,
        &spec.vm_formats,
        spec.qcow2_compression,
        spec.vhd_dynamic,
    )? {
        stages.done(format_args!("{} ({})", a.file, spec::human_size(a.size)));
        artifacts.push(a);
        pending.push(f);
    }

    // The hybrid ISO, from the same tree.
    let iso = if spec.iso {
        Some(crate::iso::build(&iso_inputs, &stages)?)
    } else {
        None
    };

    let report = Report {
        disk: spec.keep_disk.then(|| Artifact {
            file: disk_name.clone(),
            size: disk_size,
            sha256: hex32(&disk_sha),
        }),
        disk_uuid: Some(uuid_text(&lay.disk_uuid)),
        chunked_digest: Some(chunks.digest().to_string()),
        partitions,
        root_hash: root_hash.map(|h| hex32(&h)),
        verity: verity_reports,
        boot: boot_report,
        slots: slot_list,
        artifacts,
        ..Report::describing(&spec, &source, epoch, &input_digest, image.as_ref())
    };
    let disk = spec.keep_disk.then_some(out);
    finish(&finish_with, report, pending, disk, iso)
}

/// The tree's kernel as `NAME_VERSION.vmlinuz` and a kiln initrd for it as
/// `NAME_VERSION.initrd`: kiln-init with virtio_mmio, virtio_blk and the root filesystem's
/// module (those the kernel does not build in), mounting `root=/dev/vda`, no /var partition.
fn microvm_boot_files(
    spec: &Spec,
    tree: &Tree,
    contents: &dyn Contents,
    kernel: &crate::initrd::KernelInfo,
    fs_name: &str,
    mtime: i64,
    opts: &BuildOptions,
) -> Result<Vec<(AtomicFile, Artifact)>> {
    let (arch, name_version) = (spec.arch, format!("{}_{}", spec.name, spec.version));
    let linux = crate::initrd::read_tree_file(tree, contents, &kernel.image)
        .with_context(|| format!("rootfs: reading the kernel {}", kernel.image))?;
    let linux = boot::kernel_image(linux, &kernel.image, arch)?;
    let kiln_init = boot::kiln_init(arch).context("rootfs")?;
    // kiln-init mounts the root read-only; tmpfs overlays make /etc, /var and /tmp writable
    // for the guest's life (systemd writes its machine-id, journald and units their state).
    let overlays: Vec<String> = ["/etc", "/var", "/tmp"]
        .iter()
        .filter(|d| {
            tree.resolve(d.as_bytes())
                .is_some_and(|id| tree.node(id).is_dir())
        })
        .map(|d| d.to_string())
        .collect();
    let config = kiln_init::config::Config {
        var: Some(kiln_init::config::VarMode::Off),
        overlays,
        ..Default::default()
    };
    let initrd = crate::initrd::build_initrd(
        tree,
        contents,
        &crate::initrd::InitrdOptions {
            kernel: Some(kernel.image.clone()),
            root_fs: Some(fs_name.to_string()),
            extra_modules: vec!["virtio_mmio".into(), "overlay".into()],
            no_optional_modules: true,
            config,
            kiln_init,
            mtime: u32::try_from(mtime.max(0)).unwrap_or(u32::MAX),
            compression: Default::default(),
            module_files: Default::default(),
        },
    )
    .context("rootfs: building the microVM initrd")?;
    let mut out = Vec::new();
    for (suffix, bytes) in [("vmlinuz", &linux), ("initrd", &initrd.bytes)] {
        let f = AtomicFile::create(&opts.outdir.join(format!("{name_version}.{suffix}")))?;
        f.file().write_all(bytes)?;
        let a = artifact_of_bytes(&f, bytes);
        out.push((f, a));
    }
    Ok(out)
}

/// A source that tells the observer how many bytes were read through it.
struct Counted<'p, R> {
    inner: R,
    progress: &'p dyn Progress,
}

impl<R: kiln_inject::ReadAt> kiln_inject::ReadAt for Counted<'_, R> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read_at(offset, buf)?;
        self.progress.advance(n as u64);
        Ok(n)
    }

    fn len(&self) -> u64 {
        self.inner.len()
    }
}

/// What the last stage needs from the build.
struct Finish<'a> {
    opts: &'a BuildOptions,
    spec: &'a Spec,
    tree: &'a Tree,
    contents: &'a dyn Contents,
    source: &'a Path,
    epoch: Option<i64>,
    input_digest: [u8; 32],
    stages: &'a Stages<'a>,
}

/// The last stage of every build: the SBOM, provenance over every output, the report, the
/// commit (everything else first, then the images, then the report that describes them) and
/// signatures. `disk` is the disk image described by `report.disk`.
fn finish(
    f: &Finish<'_>,
    mut report: Report,
    mut pending: Vec<AtomicFile>,
    disk: Option<AtomicFile>,
    iso: Option<crate::iso::IsoOutput>,
) -> Result<Report> {
    let (opts, spec) = (f.opts, f.spec);
    let name_version = format!("{}_{}", spec.name, spec.version);
    let mut images: Vec<(AtomicFile, Artifact)> = Vec::new();
    if let (Some(d), Some(a)) = (disk, &report.disk) {
        images.push((d, a.clone()));
    }
    if let Some(iso) = iso {
        for (file, a) in iso.sidecars {
            pending.push(file);
            report.artifacts.push(a);
        }
        report.iso = Some(iso.report);
        images.push((iso.image, iso.artifact));
    }
    // The SBOM describes the first image: the disk, the ISO, else the bare rootfs.
    let first = images
        .first()
        .map(|(_, a)| a.sha256.clone())
        .or_else(|| {
            report
                .artifacts
                .iter()
                .find(|a| a.file.contains(".rootfs."))
                .map(|a| a.sha256.clone())
        })
        .ok_or_else(|| anyhow!("internal: a build without an image"))?;

    // SBOM.
    let sbom = kiln_ship::sbom::spdx_for_tree(f.tree, f.contents, &spec.name, Some(&first))?;
    let sbom_text = serde_json::to_string_pretty(&sbom)? + "\n";
    let sf = AtomicFile::create(&opts.outdir.join(format!("{name_version}.spdx.json")))?;
    sf.file().write_all(sbom_text.as_bytes())?;
    report
        .artifacts
        .push(artifact_of_bytes(&sf, sbom_text.as_bytes()));
    pending.push(sf);

    // Provenance: every output so far, with its digest.
    let mut subjects: Vec<kiln_ship::provenance::Subject> = images
        .iter()
        .map(|(_, a)| kiln_ship::provenance::Subject {
            name: a.file.clone(),
            sha256: a.sha256.clone(),
        })
        .collect();
    subjects.extend(
        report
            .artifacts
            .iter()
            .map(|a| kiln_ship::provenance::Subject {
                name: a.file.clone(),
                sha256: a.sha256.clone(),
            }),
    );
    let def = kiln_ship::provenance::BuildDefinition {
        spec: spec.file.display().to_string(),
        spec_sha256: hex32(&spec.digest),
        source: f.source.display().to_string(),
        source_sha256: hex32(&f.input_digest),
        seed: hex32(&spec.seed),
        source_date_epoch: f.epoch,
        extra: BTreeMap::new(),
    };
    let run = kiln_ship::provenance::RunDetails {
        builder_id: format!("kiln/{}", env!("CARGO_PKG_VERSION")),
        invocation_id: None,
        started_on: None,
        finished_on: None,
    };
    let prov =
        serde_json::to_string_pretty(&kiln_ship::provenance::statement(&subjects, &def, &run))?
            + "\n";
    let pf = AtomicFile::create(&opts.outdir.join(format!("{name_version}.provenance.json")))?;
    pf.file().write_all(prov.as_bytes())?;
    pending.push(pf);

    let report_path = opts.outdir.join(format!("{}.json", spec.name));
    let rf = AtomicFile::create(&report_path)?;
    rf.file()
        .write_all((serde_json::to_string_pretty(&report)? + "\n").as_bytes())?;

    // Commit: everything else first, the images, then the report that describes them.
    for p in pending {
        p.commit()?;
    }
    let mut done = Vec::new();
    for (file, a) in images {
        file.commit()?;
        done.push((opts.outdir.join(&a.file), a.size));
    }
    rf.commit()?;
    if let Some(key) = &opts.sign_key {
        let mut files: Vec<PathBuf> = done.iter().map(|(p, _)| p.clone()).collect();
        files.push(report_path.clone());
        files.extend(
            report
                .artifacts
                .iter()
                .filter(|a| {
                    a.file.ends_with(".raw")
                        || a.file.ends_with(".efi")
                        || a.file.contains(".rootfs.")
                        || a.file.ends_with(".index")
                })
                .map(|a| opts.outdir.join(&a.file)),
        );
        kiln_ship::sign::sign_files(&files, key).context("signing the outputs")?;
        f.stages.done(format_args!("signed {} files", files.len()));
    }
    for (p, size) in done {
        f.stages
            .done(format_args!("{} ({})", p.display(), spec::human_size(size)));
    }
    Ok(report)
}

/// Reads as much of `buf` as the file holds at `off` (short at EOF), returning the count.
pub(crate) fn read_full_at(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

fn sha256_range(f: &File, off: u64, len: u64) -> std::io::Result<[u8; 32]> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(buf.len() as u64) as usize;
        let got = read_full_at(f, &mut buf[..n], off + pos)?;
        buf[got..n].fill(0);
        h.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(h.finalize().into())
}

/// Copies `[off, off + len)` of `src` to a new atomic file at `dest` (kernel-side copy; holes
/// stay holes where the filesystem supports it).
fn copy_out(src: &File, off: u64, len: u64, dest: &Path) -> Result<(String, AtomicFile)> {
    let a = AtomicFile::create(dest).with_context(|| format!("creating {}", dest.display()))?;
    copy_file_range(src, off, a.file(), len)
        .with_context(|| format!("writing {}", dest.display()))?;
    a.file().set_len(len)?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((name, a))
}

/// `len` bytes from `src` at `off` to the start of `dst`: copy_file_range (reflinks where the
/// filesystem can), falling back to read/write; zero blocks are left as holes either way.
fn copy_file_range(src: &File, off: u64, dst: &File, len: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut done = 0u64;
    match kiln_os::copy_range(src, off, dst, 0, len)? {
        // The end of the source: the rest is zeroes (set_len covers it).
        kiln_os::Copied::All | kiln_os::Copied::Short(_) => {}
        kiln_os::Copied::Unsupported => {
            // A filesystem pair without copy_file_range: copy the rest by hand.
            let mut buf = vec![0u8; 1 << 20];
            while done < len {
                let n = (len - done).min(buf.len() as u64) as usize;
                let got = read_full_at(src, &mut buf[..n], off + done)?;
                if got == 0 {
                    break;
                }
                if buf[..got].iter().any(|&b| b != 0) {
                    dst.write_all_at(&buf[..got], done)?;
                }
                done += got as u64;
            }
        }
    }
    Ok(())
}

pub(crate) fn artifact_of_bytes(f: &AtomicFile, bytes: &[u8]) -> Artifact {
    let file = f
        .dest()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Artifact {
        file,
        size: bytes.len() as u64,
        sha256: hex32(&Sha256::digest(bytes)),
    }
}

/// The update index of an A/B verity root with a UKI (see [`crate::delta`]), or `None`.
#[allow(clippy::too_many_arguments)]
fn update_index(
    spec: &Spec,
    lay: &Layout,
    verity_reports: &[VerityReport],
    artifacts: &[Artifact],
    boot: Option<&BootReport>,
    uki: Option<&[u8]>,
    file: &File,
    epoch: Option<i64>,
) -> Result<Option<Vec<u8>>> {
    let name_version = format!("{}_{}", spec.name, spec.version);
    let (Some(boot), Some(uki)) = (boot, uki) else {
        return Ok(None);
    };
    let Some(ri) = lay.parts.iter().position(|p| {
        p.role == Role::Data
            && (p.type_name.starts_with("root-") || p.type_name.starts_with("usr-"))
            && spec.partitions[p.spec].slots == 2
    }) else {
        return Ok(None);
    };
    let Some(vi) = lay.verity_of(ri) else {
        return Ok(None);
    };
    let Some(vr) = verity_reports.iter().find(|v| v.data_partition == ri + 1) else {
        return Ok(None);
    };
    let short = short_type(&lay.parts[ri].type_name);
    let find = |f: String| {
        artifacts
            .iter()
            .find(|a| a.file == f)
            .cloned()
            .ok_or_else(|| anyhow!("internal: no artifact {f} for the update index"))
    };
    let hexa = |s: &str| hex::decode(s).map_err(|e| anyhow!("internal: {s:?}: {e}"));
    let root_hash: [u8; 32] = hexa(&vr.root_hash)?
        .try_into()
        .map_err(|_| anyhow!("internal: root hash length"))?;
    let salt = hexa(&vr.salt)?;
    let bytes = crate::delta::build_index(&crate::delta::IndexInputs {
        name: &spec.name,
        version: &spec.version,
        disk_uuid: uuid_text(&lay.disk_uuid),
        source_date_epoch: epoch,
        salt: &salt,
        verity_uuid: repart::verity_uuid(&spec.seed),
        root_hash,
        data_type: (
            lay.parts[ri].type_name.clone(),
            uuid_text(&lay.parts[ri].type_uuid),
        ),
        hash_type: (
            lay.parts[vi].type_name.clone(),
            uuid_text(&lay.parts[vi].type_uuid),
        ),
        uki_name: boot.uki.clone(),
        data: find(format!("{name_version}.{short}.raw"))?,
        hash: find(format!("{name_version}.{short}-verity.raw"))?,
        uki: (find(format!("{name_version}.efi"))?, uki),
        file,
        hash_offset: lay.parts[vi].offset,
    })?;
    Ok(Some(bytes))
}

/// Recomputes offsets in disk order, twins' sizes from their A partition and verity sizes
/// from their data partition. Partitions already written keep their offsets: only auto sizes
/// of the partition just written change, and everything after it is still unwritten.
fn reflow(lay: &mut Layout) {
    for i in 0..lay.parts.len() {
        match lay.parts[i].role {
            Role::Verity { of } => {
                lay.parts[i].size = align_up(layout::verity_hash_size(lay.parts[of].size), ALIGN)
            }
            Role::EmptyTwin => {
                if let Some(a) = lay.parts[..i]
                    .iter()
                    .rev()
                    .find(|p| p.role == Role::Data && p.spec == lay.parts[i].spec)
                {
                    lay.parts[i].size = a.size;
                }
            }
            Role::EmptyVerityTwin => {
                if let Some(a) = lay.parts[..i]
                    .iter()
                    .rev()
                    .find(|p| matches!(p.role, Role::Verity { .. }) && p.spec == lay.parts[i].spec)
                {
                    lay.parts[i].size = a.size;
                }
            }
            Role::Data => {}
        }
    }
    lay.place();
}

/// Keeps systemd's veritysetup generator from acting on `roothash=` in the booted system:
/// kiln-init has set up dm-verity already, and the generator would have systemd wait 90 s for
/// the root hash halves as partition UUIDs, which a live medium or a slot filled by
/// systemd-sysupdate does not have (systemd-veritysetup-generator(8): `systemd.verity=`).
pub(crate) const NO_SYSTEMD_VERITY: &str = "systemd.verity=no";

/// The UKI command line: the spec's, then how kiln-init finds the root.
fn cmdline(spec: &Spec, lay: Option<&Layout>, root_hash: &[u8; 32]) -> String {
    let mut c = spec
        .boot
        .as_ref()
        .map(|b| b.cmdline.trim().to_string())
        .unwrap_or_default();
    let root = spec
        .partitions
        .iter()
        .position(|p| p.type_name.starts_with("root-") || p.type_name.starts_with("usr-"));
    if let Some(ri) = root {
        if !c.is_empty() {
            c.push(' ');
        }
        if spec.partitions[ri].verity {
            c.push_str(&format!("roothash={}", hex32(root_hash)));
            if spec.boot.as_ref().is_some_and(|b| b.initrd.is_none()) {
                c.push(' ');
                c.push_str(NO_SYSTEMD_VERITY);
            }
            if spec.partitions[ri].slots == 2 {
                // kiln update gives the slot the root hash halves as UUIDs; systemd-sysupdate
                // cannot, but names the slot NAME_VERSION, which kiln-init falls back to.
                c.push_str(&format!(" kiln.label={}_{}", spec.name, spec.version));
            }
        } else {
            // The UUID is known before anything is written, so the placeholder has its length.
            let uuid = lay
                .and_then(|l| {
                    l.parts
                        .iter()
                        .find(|p| p.spec == ri && p.role == Role::Data)
                })
                .map(|p| p.uuid)
                .unwrap_or_else(|| {
                    repart::partition_uuid(&spec.seed, &spec.partitions[ri].type_uuid, 0)
                });
            c.push_str(&format!("root=PARTUUID={}", uuid_text(&uuid)));
        }
    }
    c
}

/// `root`/`usr` from `root-x86-64`/`usr-x86-64`.
fn short_type(t: &str) -> &'static str {
    if t.starts_with("usr-") {
        "usr"
    } else {
        "root"
    }
}

pub(crate) fn truncate_label(l: &str, max: usize) -> String {
    let mut s = String::new();
    for ch in l.chars() {
        if s.len() + ch.len_utf8() > max {
            break;
        }
        s.push(ch);
    }
    s
}

/// FAT volume labels: at most 11 characters of upper-case ASCII without specials.
pub(crate) fn fat_label(l: &str) -> Option<String> {
    let s: String = l
        .chars()
        .map(|c| c.to_ascii_uppercase())
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .take(11)
        .collect();
    (!s.is_empty()).then_some(s)
}

/// FAT volume serial from the filesystem UUID (its first four bytes, as repart's mkfs.vfat
/// call derives it).
pub(crate) fn fat_volume_id(fs_uuid: &Uuid) -> [u8; 4] {
    [fs_uuid[0], fs_uuid[1], fs_uuid[2], fs_uuid[3]]
}

fn fat_bits(t: fat::FatType) -> u8 {
    match t {
        fat::FatType::Fat12 => 12,
        fat::FatType::Fat16 => 16,
        fat::FatType::Fat32 => 32,
    }
}

fn part_error(p: &spec::Partition, e: &str, t: &Tree) -> anyhow::Error {
    anyhow!(
        "partition {} (line {}): {e}; the heaviest paths:\n{}",
        p.label.as_deref().unwrap_or(&p.type_name),
        p.at.line,
        crate::budget::report(t, 20)
    )
}

fn default_payload(t: Option<&Tree>, contents: &dyn Contents, path: &str) -> Result<PayloadInfo> {
    let bytes = match t {
        Some(t) => fstree::read_file(t, contents, path, u64::MAX)?.unwrap_or_default(),
        None => Vec::new(),
    };
    Ok(PayloadInfo::of(&bytes))
}
