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

pub use crate::artifacts::Artifact;
use crate::artifacts::{
    artifact_of_bytes, chunk_table, copy_out, fat_label, fat_volume_id, read_full_at, sha256_range,
    truncate_label, write_artifact, write_slot_table, Outputs, Stages,
};
pub use crate::boot::BootReport;
use crate::boot::{self, NO_SYSTEMD_VERITY};
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
            seed: spec.seed.simple().to_string(),
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

/// Builds the image described by `opts`, silently.
pub fn build(opts: &BuildOptions) -> Result<Report> {
    build_with(opts, &progress::Silent)
}

/// Builds the image described by `opts`, telling `progress` about every stage: a line per
/// finished stage, and the bytes of the long ones (writing a filesystem, verity, digests).
///
/// The stages, in order: load the spec; open, normalise and check the source; stamp the
/// image's identity into the tree; prepare the boot pieces; plan every filesystem and lay the
/// disk out; write the partitions (data, verity, then the ESP with the final UKI); write the
/// GPT and the slot table; digests; side artifacts; the ISO; then [`finish`].
pub fn build_with(opts: &BuildOptions, progress: &dyn Progress) -> Result<Report> {
    let stages = Stages { progress };
    let spec = load_spec(opts, progress)?;
    let _span = tracing::info_span!("build", image = %spec.name, version = %spec.version).entered();
    let epoch = match spec.source_date_epoch {
        Some(e) => Some(e),
        None => Normalize::from_env(false)?.source_date_epoch,
    };
    let mtime = epoch.unwrap_or(0);
    let mut src = open_source(opts, &spec, &stages, epoch, mtime)?;
    let ident = stamp_identity(&spec, &mut src, mtime)?;
    let src = src;

    let finish_with = Finish {
        opts,
        spec: &spec,
        tree: &src.tree,
        contents: &src.contents,
        source: &src.path,
        epoch,
        input_digest: src.input_digest,
        stages: &stages,
    };
    let iso_inputs = crate::iso::IsoInputs {
        spec: &spec,
        tree: &src.tree,
        contents: &src.contents,
        osrel: &ident.osrel,
        epoch,
        outdir: &opts.outdir,
        name_version: &ident.name_version,
    };
    if !spec.disk {
        // `output = ["iso"]`: no disk is laid out.
        std::fs::create_dir_all(&opts.outdir)
            .with_context(|| format!("creating {}", opts.outdir.display()))?;
        let iso = crate::iso::build(&iso_inputs, &stages)?;
        let report = src.report(&spec, epoch);
        return finish(&finish_with, report, Vec::new(), None, Some(iso));
    }

    // Per-partition trees and slots.
    let mut trees = prepare::split(&spec, &src.tree)?;
    for (p, t) in spec.partitions.iter().zip(trees.iter_mut()) {
        if let Some(t) = t {
            prepare::place_slots(p, t, &src.contents, mtime)?;
        }
    }
    let boot_parts = prepare_boot(&spec, &src, &ident, mtime, &stages)?;
    let esp = EspPlan::new(&spec, &ident, boot_parts.as_ref())?;
    esp.add_to(&spec, &mut trees, mtime)?;
    let mut plan = plan_disk(&spec, &src.tree, &trees, &ident, epoch, mtime)?;
    stages.done(format_args!("plan: {} partitions", plan.lay.parts.len()));

    // Write.
    std::fs::create_dir_all(&opts.outdir)
        .with_context(|| format!("creating {}", opts.outdir.display()))?;
    let disk_name = format!("{}.img", ident.name_version);
    let disk_path = opts.outdir.join(&disk_name);
    let out = AtomicFile::create(&disk_path)
        .with_context(|| format!("creating {}", disk_path.display()))?;
    let file = out.file();
    let mut parts = write_partitions(&spec, &mut plan, &trees, &src.contents, file, &esp, &stages)?;
    let booted = write_esp(
        &spec,
        &plan,
        &trees,
        &src.contents,
        file,
        &esp,
        &mut parts,
        mtime,
        &stages,
    )?;
    // Every filesystem is written: the plans (which borrow the trees) are done with.
    let (mut lay, provisional) = (plan.lay, plan.provisional);
    let booted = booted.map(|(report, uki, (i, esp_tree))| {
        trees[i] = Some(esp_tree);
        (report, uki)
    });
    let disk_size = write_gpt(&spec, &mut lay, file, &src.tree, &parts, &out)?;

    // Slots, digests and what the report says about each partition.
    let slot_list = slots_of(&spec, &lay, &trees, &parts.written, &src.contents)?;
    let mut outs = Outputs::default();
    let slot_table = write_slot_table(&slot_list, disk_size, file, &disk_path, &mut outs)?;
    if !slot_list.is_empty() {
        let names: Vec<&str> = slot_list.iter().map(|s| s.name.as_str()).collect();
        stages.done(format_args!("slots: {}", names.join(", ")));
    }
    let digests = digests(
        &out,
        &disk_path,
        disk_size,
        &slot_table,
        &lay,
        &mut outs,
        &stages,
    )?;
    let partitions = partition_reports(&spec, &lay, &provisional, &parts, &digests.parts);

    let ctx = SideOutputs {
        opts,
        spec: &spec,
        lay: &lay,
        file,
        name_version: &ident.name_version,
        part_shas: &digests.parts,
        epoch,
    };
    ctx.update_artifacts(&parts.verity_reports, booted.as_ref(), &ident, &mut outs)?;
    if spec.rootfs {
        ctx.rootfs(&src, mtime, &stages, &mut outs)?;
    }
    if !spec.keep_disk {
        // Only the rootfs was asked for: the disk and its sidecars were scaffolding.
        outs.drop_prefixed(&disk_name);
    }

    ctx.vm_disks(disk_size, &stages, &mut outs)?;

    // The hybrid ISO, from the same tree.
    let iso = if spec.iso {
        Some(crate::iso::build(&iso_inputs, &stages)?)
    } else {
        None
    };

    let (boot_report, _) = booted.unzip();
    let report = Report {
        disk: spec.keep_disk.then(|| Artifact {
            file: disk_name.clone(),
            size: disk_size,
            sha256: hex32(&digests.disk),
        }),
        disk_uuid: Some(lay.disk_uuid.to_string()),
        chunked_digest: Some(digests.chunked),
        partitions,
        root_hash: parts.root_hash.map(|h| hex32(&h)),
        verity: parts.verity_reports,
        boot: boot_report,
        slots: slot_list,
        artifacts: outs.artifacts,
        ..src.report(&spec, epoch)
    };
    let disk = spec.keep_disk.then_some(out);
    finish(&finish_with, report, outs.pending, disk, iso)
}

/// The spec at `opts.spec` with the command line's overrides (seed, version); notes each fixed
/// partition size that gets rounded up to the 1 MiB alignment.
fn load_spec(opts: &BuildOptions, progress: &dyn Progress) -> Result<Spec> {
    let mut spec = Spec::load(&opts.spec)?;
    if let Some(seed) = opts.seed {
        spec.seed = seed;
    }
    if let Some(v) = &opts.version {
        spec::check_version(v).map_err(|e| anyhow!("--version: {e}"))?;
        spec.version = v.clone();
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
    Ok(spec)
}

/// The source tree, read, laid over, normalised and checked.
struct Source {
    /// Where it came from (`--source` or `[source] tree`).
    path: PathBuf,
    tree: Tree,
    contents: kiln_tree::SourceContents,
    /// A container image's config, when the source is one.
    image: Option<kiln_tree::oci::ImageConfig>,
    /// The digest of the normalised tree (provenance).
    input_digest: [u8; 32],
}

impl Source {
    /// The report's fields that describe what was built from what, with no outputs yet.
    fn report(&self, spec: &Spec, epoch: Option<i64>) -> Report {
        Report::describing(
            spec,
            &self.path,
            epoch,
            &self.input_digest,
            self.image.as_ref(),
        )
    }
}

/// Opens the source: `--source` or the spec's tree, a container image's service unit, the
/// `[source] add` overlay, normalisation, the digest, the architecture check, the ESP mount
/// point and the content policy.
fn open_source(
    opts: &BuildOptions,
    spec: &Spec,
    stages: &Stages<'_>,
    epoch: Option<i64>,
    mtime: i64,
) -> Result<Source> {
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
    if boot::add_esp_mount_point(spec, &mut tree, mtime)? {
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
    Ok(Source {
        path: source,
        tree,
        contents,
        image,
        input_digest,
    })
}

/// Who the image is: stamped into its tree before anything is planned.
struct Identity {
    /// `/etc/machine-id` of the tree, if it has one (the /var partition's UUID derives from it).
    machine_id: Option<Uuid>,
    /// `NAME_VERSION`.
    name_version: String,
    /// os-release with IMAGE_ID and IMAGE_VERSION.
    osrel: String,
    /// The sysupdate transfers of an A/B image, also written into its tree.
    transfers: Option<Vec<sysupdate::Transfer>>,
}

/// Stamps os-release and, for an A/B image, the sysupdate transfers that fill its inactive
/// slot into the tree.
fn stamp_identity(spec: &Spec, src: &mut Source, mtime: i64) -> Result<Identity> {
    let (tree, contents) = (&mut src.tree, &src.contents);
    let machine_id = prepare::machine_id(tree, contents)?;
    let name_version = format!("{}_{}", spec.name, spec.version);
    let osrel = prepare::os_release(tree, contents, &spec.name, &spec.version)?;
    prepare::stamp_os_release(tree, &osrel)?;

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
    let meta = |perm| fstree::Meta {
        perm,
        mtime: Timestamp::from_secs(mtime),
        ..Default::default()
    };
    for t in transfers.iter().flatten() {
        let path = format!("/usr/lib/sysupdate.d/{}", t.file);
        if tree.resolve(path.as_bytes()).is_none() {
            let node = fstree::Node {
                kind: NodeKind::File(fstree::FileData::dense(
                    t.text.len() as u64,
                    fstree::DataRef::Inline(t.text.as_bytes().into()),
                )),
                meta: meta(0o644),
                slot: None,
            };
            tree.insert(path.as_bytes(), node, &meta(0o755))?;
        }
    }
    Ok(Identity {
        machine_id,
        name_version,
        osrel,
        transfers,
    })
}

/// Everything the UKI needs but the root hash, so the ESP can be sized up front.
fn prepare_boot(
    spec: &Spec,
    src: &Source,
    ident: &Identity,
    mtime: i64,
    stages: &Stages<'_>,
) -> Result<Option<boot::BootParts>> {
    let Some(b) = &spec.boot else {
        return Ok(None);
    };
    let root_index = spec
        .partitions
        .iter()
        .position(|p| p.type_name.starts_with("root-") || p.type_name.starts_with("usr-"));
    let root_fs = root_index.map(|i| spec.partitions[i].fs.name());
    let cfg = kiln_init::config::Config {
        overlays: b.overlays.clone(),
        rootfstype: root_fs.map(str::to_string),
        ..Default::default()
    };
    let parts = boot::prepare(
        b,
        spec.arch,
        &src.tree,
        &src.contents,
        root_fs,
        cfg,
        ident.osrel.clone(),
        mtime.clamp(0, u32::MAX as i64) as u32,
    )?;
    stages.done(format_args!("initrd: {}", parts.summary()));
    Ok(Some(parts))
}

/// The ESP of a bootable disk: which partition it is, the UKI's name, and a UKI of the final
/// length (the root hash is a fixed-length hex string) that sizes it before the root exists.
struct EspPlan<'b> {
    /// The spec's ESP partition, when the disk boots.
    index: Option<usize>,
    boot: Option<&'b boot::BootParts>,
    /// `NAME_VERSION(+TRIES).efi`.
    uki_file: String,
    placeholder_uki: Option<Arc<[u8]>>,
}

impl<'b> EspPlan<'b> {
    fn new(spec: &Spec, ident: &Identity, boot: Option<&'b boot::BootParts>) -> Result<Self> {
        let tries = spec.boot.as_ref().map(|b| b.tries).unwrap_or(0);
        let placeholder_uki = match boot {
            Some(bp) => Some(bp.uki(&cmdline(spec, None, &[0u8; 32]))?.into()),
            None => None,
        };
        Ok(Self {
            index: spec.partitions.iter().position(|p| p.type_name == "esp"),
            boot,
            uki_file: boot::uki_name(&ident.name_version, tries),
            placeholder_uki,
        })
    }

    /// Puts systemd-boot, loader.conf and the placeholder UKI into the ESP's tree.
    fn add_to(&self, spec: &Spec, trees: &mut [Option<Tree>], mtime: i64) -> Result<()> {
        if let (Some(i), Some(bp), Some(uki)) = (self.index, self.boot, &self.placeholder_uki) {
            let base = trees[i].take();
            trees[i] = Some(boot::esp_tree(
                spec.arch,
                base,
                &bp.systemd_boot,
                &self.uki_file,
                uki.clone(),
                spec.boot.as_ref().map(|b| b.timeout).unwrap_or(0),
                mtime,
            )?);
        }
        Ok(())
    }

    /// True for the partition that gets the ESP written last.
    fn is_esp(&self, spec_index: usize) -> bool {
        Some(spec_index) == self.index && self.boot.is_some()
    }
}

/// Every filesystem planned and the disk laid out.
struct DiskPlan<'t> {
    /// Per spec partition.
    planned: Vec<Planned<'t>>,
    lay: Layout,
    /// The layout before sizes were known: its partition UUIDs are what the filesystem UUIDs
    /// derive from (as systemd-repart does, from the UUID before verity replaces it).
    provisional: Layout,
}

/// The UUID spec partition `spec_i`'s data partition has in the `provisional` layout.
fn provisional_uuid(provisional: &Layout, spec_i: usize) -> Uuid {
    provisional
        .parts
        .iter()
        .find(|p| p.spec == spec_i && p.role == Role::Data)
        .map(|p| p.uuid)
        .unwrap_or(Uuid::nil())
}

/// Plans every partition's filesystem from its tree, checks the budgets, and lays the disk out.
fn plan_disk<'t>(
    spec: &Spec,
    tree: &Tree,
    trees: &'t [Option<Tree>],
    ident: &Identity,
    epoch: Option<i64>,
    mtime: i64,
) -> Result<DiskPlan<'t>> {
    let provisional = layout::layout(
        spec,
        // Provisional: no size is known yet, so no budget is judged on it.
        &vec![
            FsSize {
                bytes: 0,
                upper_bound: true,
            };
            spec.partitions.len()
        ],
        ident.machine_id.as_ref(),
    )?;
    let mut plan = DiskPlan {
        planned: Vec::new(),
        lay: provisional.clone(),
        provisional,
    };
    let mut sizes = Vec::new();
    for (i, p) in spec.partitions.iter().enumerate() {
        let t = trees[i].as_ref();
        let (pl, size) = plan_partition(
            p,
            t,
            &provisional_uuid(&plan.provisional, i),
            epoch,
            mtime,
            spec.stable_layout,
        )?;
        if let (Some(b), Some(t), false) = (p.budget, t, size.upper_bound) {
            if size.bytes > b {
                bail!(
                    "partition {} (line {}) needs {}, over its budget of {}; the heaviest paths:\n{}",
                    p.label.as_deref().unwrap_or(&p.type_name),
                    p.at.line,
                    spec::human_size(size.bytes),
                    spec::human_size(b),
                    crate::budget::report(t, 20)
                );
            }
        }
        plan.planned.push(pl);
        sizes.push(size);
    }
    plan.lay =
        layout::layout(spec, &sizes, ident.machine_id.as_ref()).map_err(|e| match e.spec {
            Some(i) => match &trees[i] {
                Some(t) => anyhow!("{e}; the heaviest paths:\n{}", crate::budget::report(t, 20)),
                None => anyhow!("{e}"),
            },
            None => anyhow!(
                "{e}; the heaviest paths of the source:\n{}",
                crate::budget::report(tree, 20)
            ),
        })?;
    Ok(plan)
}

/// Plans the filesystem of partition `p` holding `t`: the plan and the size it needs (an
/// upper bound for compressed EROFS).
fn plan_partition<'t>(
    p: &spec::Partition,
    t: Option<&'t Tree>,
    part_uuid: &Uuid,
    epoch: Option<i64>,
    mtime: i64,
    stable: bool,
) -> Result<(Planned<'t>, FsSize)> {
    let fs_uuid = repart::filesystem_uuid(part_uuid);
    let label = p
        .label
        .clone()
        .unwrap_or_else(|| repart::label(&p.type_name, 0));
    let exact = |bytes| FsSize {
        bytes,
        upper_bound: false,
    };
    let t = match (p.fs, t) {
        (FsKind::None, _) | (_, None) => return Ok((Planned::None, exact(0))),
        (_, Some(t)) => t,
    };
    Ok(match p.fs {
        FsKind::None => unreachable!("handled above"),
        FsKind::Ext4 => {
            let size = match p.size {
                PartSize::Fixed(s) => ext4::Size::Fixed(align_up(s.0, ALIGN)),
                // The free space gets inodes at mke2fs's default density (one per 16 KiB): a
                // writable /var with room for data but no free inode cannot create a file
                // (journald, logind and dpkg all do at boot).
                PartSize::Auto => ext4::Size::Minimize {
                    extra_bytes: p.extra,
                    extra_inodes: p.extra / EXTRA_BYTES_PER_INODE,
                },
            };
            let mut o = ext4::Options::from_seed(Some(part_uuid), size);
            o.label = truncate_label(&label, 16);
            o.timestamp = mtime;
            if stable && matches!(size, ext4::Size::Fixed(_)) {
                o.layout = ext4::Layout::Stable;
            }
            // An auto-sized filesystem stays minimized (with `extra` free space); the rest of
            // its 1 MiB-aligned partition is padding. Re-planning it as fixed-size would switch
            // to fixed-size inode density and need more room than it has.
            let plan = ext4::plan(t, &o).map_err(|e| part_error(p, &e.to_string(), t))?;
            let need = plan.size_bytes();
            (Planned::Ext4(plan), exact(need))
        }
        FsKind::Erofs => {
            let o = erofs::Options {
                compression: match p.compression {
                    Compression::None => erofs::Compression::None,
                    Compression::Lz4 => erofs::Compression::Lz4,
                    Compression::Lz4hc => erofs::Compression::Lz4hc {
                        level: erofs::LZ4HC_DEFAULT_LEVEL,
                    },
                },
                uuid: fs_uuid.into_bytes(),
                timestamp: epoch.map(Timestamp::from_secs),
                volume_name: truncate_label(&label, 16).into_bytes(),
                ..Default::default()
            };
            let plan = erofs::plan(t, &o).map_err(|e| part_error(p, &e.to_string(), t))?;
            let size = FsSize {
                bytes: plan.size().bytes,
                upper_bound: !plan.size().exact,
            };
            (Planned::Erofs(plan), size)
        }
        FsKind::Vfat => {
            let fat_label = fat_label(&label);
            let (size, fat_type) = match p.size {
                PartSize::Fixed(s) => (align_up(s.0, ALIGN), None),
                PartSize::Auto => fat::auto_size(t, None, fat_label.clone(), p.extra.max(64 << 10))
                    .map_err(|e| part_error(p, &e.to_string(), t))?,
            };
            let o = fat::FatOptions {
                size,
                fat_type,
                volume_id: fat_volume_id(&fs_uuid),
                label: fat_label,
            };
            fat::FatWriter::new(t, o.clone()).map_err(|e| part_error(p, &e.to_string(), t))?;
            (Planned::Fat(o), exact(size))
        }
    })
}

/// What writing the partitions produced.
struct Partitions {
    /// Filesystems written, by layout index.
    written: BTreeMap<usize, Written>,
    /// Their sizes, by layout index.
    fs_sizes: BTreeMap<usize, u64>,
    verity_reports: Vec<VerityReport>,
    /// The first verity root hash (the root's, which goes on the command line).
    root_hash: Option<[u8; 32]>,
    /// The ESP's layout index, written last by [`write_esp`].
    esp_part: Option<usize>,
}

/// Writes every data and verity partition into `file`, in disk order: a partition is written
/// after every partition before it on the disk, so shrinking an auto-sized one moves only
/// partitions not yet written. The ESP of a bootable disk is left for [`write_esp`].
fn write_partitions(
    spec: &Spec,
    plan: &mut DiskPlan<'_>,
    trees: &[Option<Tree>],
    contents: &dyn Contents,
    file: &File,
    esp: &EspPlan<'_>,
    stages: &Stages<'_>,
) -> Result<Partitions> {
    let mut w = Partitions {
        written: BTreeMap::new(),
        fs_sizes: BTreeMap::new(),
        verity_reports: Vec::new(),
        root_hash: None,
        esp_part: None,
    };
    for idx in plan.lay.order.clone() {
        reflow(&mut plan.lay);
        let part = plan.lay.parts[idx].clone();
        match part.role {
            Role::Data if esp.is_esp(part.spec) => w.esp_part = Some(idx),
            Role::Data => {
                let sp = &spec.partitions[part.spec];
                let Some(t) = trees[part.spec].as_ref() else {
                    continue;
                };
                let window = FileSink::new(file, part.offset, part.size);
                let Some((written, used)) = write_filesystem(
                    &plan.planned[part.spec],
                    t,
                    contents,
                    &window,
                    &part,
                    sp,
                    stages,
                )?
                else {
                    continue;
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
                    plan.lay.parts[idx].size = align_up(used.max(1), ALIGN);
                }
                stages.done(format_args!(
                    "{} ({}): {}",
                    part.label,
                    sp.fs.name(),
                    spec::human_size(used)
                ));
                w.written.insert(idx, written);
                w.fs_sizes.insert(idx, used);
            }
            Role::Verity { of } => {
                let r = write_verity(spec, &mut plan.lay, of, idx, file, stages)?;
                if w.root_hash.is_none() {
                    w.root_hash = Some(r.1);
                }
                w.verity_reports.push(r.0);
            }
            Role::EmptyTwin | Role::EmptyVerityTwin => {}
        }
    }
    reflow(&mut plan.lay);
    Ok(w)
}

/// Writes the planned filesystem of one partition through `window`; what was written and
/// its size, `None` for a partition without one.
fn write_filesystem(
    planned: &Planned<'_>,
    t: &Tree,
    contents: &dyn Contents,
    window: &FileSink<'_>,
    part: &layout::Part,
    sp: &spec::Partition,
    stages: &Stages<'_>,
) -> Result<Option<(Written, u64)>> {
    let at_fault =
        |e: &dyn std::fmt::Display| anyhow!("partition {} (line {}): {e}", part.label, sp.at.line);
    Ok(Some(match planned {
        Planned::None => return Ok(None),
        Planned::Ext4(plan) => {
            stages.begin(format_args!("{} (ext4)", part.label), plan.data_bytes(t));
            let inc = progress::advancing(stages.progress());
            let r = plan
                .write_with_progress(t, contents, window, &inc)
                .map_err(|e| at_fault(&e))?;
            let used = r.size_bytes;
            (Written::Ext4(r), used)
        }
        Planned::Erofs(plan) => {
            stages.begin(format_args!("{} (erofs)", part.label), data_bytes(t));
            let at = progress::positioning(stages.progress());
            let s = plan
                .write(contents, window, &at)
                .map_err(|e| at_fault(&e))?;
            let used = s.size;
            (Written::Erofs(s), used)
        }
        Planned::Fat(o) => {
            let r = fat::FatWriter::new(t, o.clone())?
                .write(contents, window)
                .map_err(|e| at_fault(&e))?;
            (Written::Fat(r), o.size)
        }
    }))
}

/// Hashes data partition `of` into verity partition `idx` and gives the data partition the
/// UUIDs the root hash names; the report and the root hash.
fn write_verity(
    spec: &Spec,
    lay: &mut Layout,
    of: usize,
    idx: usize,
    file: &File,
    stages: &Stages<'_>,
) -> Result<(VerityReport, [u8; 32])> {
    let salt = repart::verity_salt(&spec.seed);
    let vuuid = repart::verity_uuid(&spec.seed);
    let data = lay.parts[of].clone();
    let part = lay.parts[idx].clone();
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
        .with_context(|| format!("verity for {}", data.label))?;
    lay.set_root_hash(of, &f.root_hash);
    stages.done(format_args!(
        "verity of {}: root hash {}",
        data.label,
        hex32(&f.root_hash)
    ));
    Ok((
        VerityReport {
            data_partition: of + 1,
            hash_partition: idx + 1,
            root_hash: hex32(&f.root_hash),
            salt: hex32(&salt),
            uuid: vuuid.to_string(),
            data_blocks: f.data_blocks,
        },
        f.root_hash,
    ))
}

/// Builds the UKI with the real root hash and writes the ESP (sized up front from a UKI of
/// the same length); for a bootable disk, the boot report, the UKI, and the ESP's tree with
/// it (with the ESP's spec index).
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn write_esp(
    spec: &Spec,
    plan: &DiskPlan<'_>,
    trees: &[Option<Tree>],
    contents: &dyn Contents,
    file: &File,
    esp: &EspPlan<'_>,
    parts: &mut Partitions,
    mtime: i64,
    stages: &Stages<'_>,
) -> Result<Option<(BootReport, Vec<u8>, (usize, Tree))>> {
    let (Some(idx), Some(bp)) = (parts.esp_part, esp.boot) else {
        return Ok(None);
    };
    let c = cmdline(spec, Some(&plan.lay), &parts.root_hash.unwrap_or([0; 32]));
    let uki = bp.uki(&c)?;
    if Some(uki.len()) != esp.placeholder_uki.as_ref().map(|u| u.len()) {
        bail!("internal: the UKI changed size between sizing and writing the ESP");
    }
    let part = plan.lay.parts[idx].clone();
    let sp = &spec.partitions[part.spec];
    let mut esp_tree = trees[part.spec]
        .clone()
        .ok_or_else(|| anyhow!("internal: no ESP tree"))?;
    let uki_node = boot::file(uki.clone().into(), mtime);
    esp_tree.insert(
        format!("/EFI/Linux/{}", esp.uki_file).as_bytes(),
        uki_node,
        &fstree::Meta::default(),
    )?;
    let Planned::Fat(o) = &plan.planned[part.spec] else {
        bail!("the ESP must be vfat")
    };
    let window = FileSink::new(file, part.offset, part.size);
    let r = fat::FatWriter::new(&esp_tree, o.clone())?
        .write(contents, &window)
        .with_context(|| format!("ESP (line {})", sp.at.line))?;
    parts.written.insert(idx, Written::Fat(r));
    parts.fs_sizes.insert(idx, o.size);
    stages.done(format_args!(
        "esp: systemd-boot + EFI/Linux/{} ({} KiB)",
        esp.uki_file,
        uki.len() / 1024
    ));
    Ok(Some((
        BootReport::new(bp, c, esp.uki_file.clone()),
        uki,
        (part.spec, esp_tree),
    )))
}

/// Sizes the disk (`[image] size`, else the partitions' end plus the backup GPT), checks the
/// image budget and writes the GPT; the disk's size.
fn write_gpt(
    spec: &Spec,
    lay: &mut Layout,
    file: &File,
    tree: &Tree,
    parts: &Partitions,
    out: &AtomicFile,
) -> Result<u64> {
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
                crate::budget::report_share(tree, 20, parts.fs_sizes.values().sum())
            );
        }
    }
    file.set_len(disk_size)
        .with_context(|| format!("sizing {}", out.tmp_path().display()))?;
    let mut table = gpt::Gpt::new(disk_size, lay.disk_uuid).context("GPT")?;
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
        .context("GPT")?;
    Ok(disk_size)
}

/// The slots of every written filesystem, as the slot table records them.
fn slots_of(
    spec: &Spec,
    lay: &Layout,
    trees: &[Option<Tree>],
    written: &BTreeMap<usize, Written>,
    contents: &dyn Contents,
) -> Result<Vec<islots::Slot>> {
    let mut slot_list = Vec::new();
    for (&idx, w) in written {
        let part = &lay.parts[idx];
        let sp = &spec.partitions[part.spec];
        let t = trees[part.spec].as_ref();
        for s in &sp.slot {
            let (data, meta) = slot_place(w, part.offset, &s.name)?;
            slot_list.push(islots::Slot {
                name: s.name.clone(),
                path: s.path.clone(),
                capacity: s.capacity,
                data: vec![data],
                meta,
                default: default_payload(t, contents, &s.path)?,
            });
        }
    }
    Ok(slot_list)
}

/// Where slot `name` of the filesystem `w` (at disk offset `fs`) lies: its reserved bytes and
/// what must be patched to change its length.
fn slot_place(w: &Written, fs: u64, name: &str) -> Result<(ByteRange, SlotMeta)> {
    let missing = |writer: &str| anyhow!("slot {name}: not reported by the {writer} writer");
    Ok(match w {
        Written::Ext4(r) => {
            let l = r
                .slots
                .iter()
                .find(|l| l.name == name)
                .ok_or_else(|| missing("ext4"))?;
            (
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
            let l = sum
                .slots
                .iter()
                .find(|l| l.name == name)
                .ok_or_else(|| missing("EROFS"))?;
            (
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
            let l = r
                .slots
                .iter()
                .find(|l| l.name == name)
                .ok_or_else(|| missing("FAT"))?;
            (
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
    })
}

/// The disk's digests.
struct Digests {
    /// sha256 of the whole disk.
    disk: [u8; 32],
    /// The chunk table's digest.
    chunked: String,
    /// sha256 of each partition, by layout index.
    parts: Vec<[u8; 32]>,
}

/// The chunk table, written as a sidecar, and every partition's sha256.
fn digests(
    out: &AtomicFile,
    disk_path: &Path,
    disk_size: u64,
    slot_table: &islots::SlotTable,
    lay: &Layout,
    outs: &mut Outputs,
    stages: &Stages<'_>,
) -> Result<Digests> {
    let (disk, chunked) = chunk_table(out, disk_path, disk_size, slot_table, outs, stages)?;
    let parts: Vec<[u8; 32]> = lay
        .parts
        .par_iter()
        .map(|p| sha256_range(out.file(), p.offset, p.size))
        .collect::<std::io::Result<_>>()?;
    stages.done(format_args!("digests: disk sha256 {}", hex32(&disk)));
    Ok(Digests {
        disk,
        chunked,
        parts,
    })
}

/// What the report says about each partition of the disk.
fn partition_reports(
    spec: &Spec,
    lay: &Layout,
    provisional: &Layout,
    parts: &Partitions,
    part_shas: &[[u8; 32]],
) -> Vec<PartitionReport> {
    lay.parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let sp = &spec.partitions[p.spec];
            let has_fs = parts.written.contains_key(&i);
            let fs_uuid =
                || repart::filesystem_uuid(&provisional_uuid(provisional, p.spec)).to_string();
            PartitionReport {
                number: i + 1,
                role: p.role,
                type_name: p.type_name.clone(),
                type_uuid: p.type_uuid.to_string(),
                label: p.label.clone(),
                uuid: p.uuid.to_string(),
                offset: p.offset,
                size: p.size,
                filesystem: has_fs.then(|| sp.fs.name().to_string()),
                fs_uuid: has_fs.then(fs_uuid),
                fs_size: parts.fs_sizes.get(&i).copied(),
                attributes: p.flags,
                sha256: hex32(&part_shas[i]),
            }
        })
        .collect()
}

/// What the side outputs of a disk build read: the finished disk and its layout.
struct SideOutputs<'a> {
    opts: &'a BuildOptions,
    spec: &'a Spec,
    lay: &'a Layout,
    file: &'a File,
    name_version: &'a str,
    part_shas: &'a [[u8; 32]],
    epoch: Option<i64>,
}

impl SideOutputs<'_> {
    /// Layout partition `i` copied out to `OUTDIR/NAME_VERSION.SUFFIX`.
    fn copy_partition(&self, i: usize, suffix: &str) -> Result<(AtomicFile, Artifact)> {
        let p = &self.lay.parts[i];
        let dest = self
            .opts
            .outdir
            .join(format!("{}.{suffix}", self.name_version));
        let (file, f) = copy_out(self.file, p.offset, p.size, &dest)?;
        Ok((
            f,
            Artifact {
                file,
                size: p.size,
                sha256: hex32(&self.part_shas[i]),
            },
        ))
    }

    /// What `kiln update` and systemd-sysupdate install into the inactive slot: the split root
    /// (and verity) partition, the UKI, the signed update index and the sysupdate transfers.
    /// Only A/B images have an inactive slot, so only they get the (full-size) copies.
    fn update_artifacts(
        &self,
        verity_reports: &[VerityReport],
        booted: Option<&(BootReport, Vec<u8>)>,
        ident: &Identity,
        outs: &mut Outputs,
    ) -> Result<()> {
        let (spec, lay) = (self.spec, self.lay);
        if let Some(ri) = lay.parts.iter().position(|p| {
            p.role == Role::Data
                && (p.type_name.starts_with("root-") || p.type_name.starts_with("usr-"))
                && spec.partitions[p.spec].slots == 2
        }) {
            let short = short_type(&lay.parts[ri].type_name);
            outs.add(self.copy_partition(ri, &format!("{short}.raw"))?);
            if let Some(vi) = lay.verity_of(ri) {
                outs.add(self.copy_partition(vi, &format!("{short}-verity.raw"))?);
            }
        }
        let outdir = &self.opts.outdir;
        if let Some((_, uki)) = booted {
            outs.add(write_artifact(
                &outdir.join(format!("{}.efi", self.name_version)),
                uki,
            )?);
        }
        // The signed update index for `kiln update --from` (crate::delta), from the verity
        // tree's level 0: only for a verity A/B root with a UKI, the ones `kiln update` installs.
        if let Some(ix) = update_index(
            spec,
            lay,
            verity_reports,
            &outs.artifacts,
            booted.map(|b| &b.0),
            booted.map(|b| b.1.as_slice()),
            self.file,
            self.epoch,
        )? {
            outs.add(write_artifact(
                &outdir.join(format!("{}.index", self.name_version)),
                &ix,
            )?);
        }
        if let Some(ts) = &ident.transfers {
            let dir = outdir.join("sysupdate.d");
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for t in ts {
                let (f, mut a) = write_artifact(&dir.join(&t.file), t.text.as_bytes())?;
                a.file = format!("sysupdate.d/{}", t.file);
                outs.add((f, a));
            }
        }
        Ok(())
    }

    /// VM disk containers (`[image] output` qcow2, vhd, vmdk), streamed from the finished raw
    /// disk.
    fn vm_disks(&self, disk_size: u64, stages: &Stages<'_>, outs: &mut Outputs) -> Result<()> {
        let spec = self.spec;
        for (f, a) in crate::vmdisk::outputs(
            self.file,
            disk_size,
            &self.opts.outdir,
            self.name_version,
            &spec.vm_formats,
            spec.qcow2_compression,
            spec.vhd_dynamic,
        )? {
            stages.done(format_args!("{} ({})", a.file, spec::human_size(a.size)));
            outs.add((f, a));
        }
        Ok(())
    }

    /// The root partition's filesystem as a bare image (a microVM's root drive) and, when the
    /// tree has a kernel, the kernel and an initrd for it.
    fn rootfs(
        &self,
        src: &Source,
        mtime: i64,
        stages: &Stages<'_>,
        outs: &mut Outputs,
    ) -> Result<()> {
        let ri = self
            .lay
            .parts
            .iter()
            .position(|p| p.role == Role::Data && p.type_name.starts_with("root-"))
            .ok_or_else(|| anyhow!("output \"rootfs\" needs a root partition"))?;
        let p = &self.lay.parts[ri];
        let fs_name = self.spec.partitions[p.spec].fs.name().to_string();
        let (f, a) = self.copy_partition(ri, &format!("rootfs.{fs_name}"))?;
        stages.done(format_args!("{} ({})", a.file, spec::human_size(p.size)));
        outs.add((f, a));
        // A distribution kernel has virtio-mmio and virtio-blk (and maybe the filesystem) as
        // modules: with a kernel in the tree, its image and an initrd that loads them go beside
        // the rootfs, for `kiln boot --microvm` or a Firecracker config.
        if let Ok(kernel) = crate::initrd::find_kernel(&src.tree, None) {
            for (f, a) in microvm_boot_files(
                self.spec,
                &src.tree,
                &src.contents,
                &kernel,
                &fs_name,
                mtime,
                self.opts,
            )? {
                stages.done(format_args!("{} ({})", a.file, spec::human_size(a.size)));
                outs.add((f, a));
            }
        }
        Ok(())
    }
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
        seed: spec.seed.simple().to_string(),
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
        disk_uuid: lay.disk_uuid.to_string(),
        source_date_epoch: epoch,
        salt: &salt,
        verity_uuid: repart::verity_uuid(&spec.seed),
        root_hash,
        data_type: (
            lay.parts[ri].type_name.clone(),
            lay.parts[ri].type_uuid.to_string(),
        ),
        hash_type: (
            lay.parts[vi].type_name.clone(),
            lay.parts[vi].type_uuid.to_string(),
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
            c.push_str(&format!("root=PARTUUID={uuid}"));
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
