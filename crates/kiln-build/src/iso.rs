//! The hybrid ISO stage of `kiln build` (`[image] output = ["iso"]`, alone or with `"disk"`):
//! one file, `OUTDIR/NAME_VERSION.iso`, that boots under UEFI from a CD (El Torito, platform
//! 0xEF, no emulation) and from a USB stick or disk (protective MBR and GPT in the system area,
//! the ESP appended as GPT partition 2), runs entirely from RAM, and carries the spec's slots
//! as injectable ISO 9660 files. The formats are `kiln_formats::iso9660` (ECMA-119 with Rock
//! Ridge, Joliet and El Torito), `erofs`, `verity` and `fat`; the boot pieces are the disk's.
//!
//! ```text
//! ISO 9660 tree (Rock Ridge + Joliet)
//!   /live/root.img          the whole source tree as EROFS (the root partition's compression,
//!                           lz4 when the spec has no EROFS root)
//!   /live/root.img.verity   its dm-verity hash tree (when the root partition has verity = true)
//!   /<slot path>            every slot of the spec (e.g. /piece.html), its capacity reserved
//! after the ISO 9660 data  the ESP image: systemd-boot, loader.conf, EFI/Linux/NAME_VERSION.efi
//! ```
//!
//! **Boot.** Firmware → systemd-boot → the live UKI (no boot counting: nothing ever writes to
//! the medium) → kiln-init in live mode, from the UKI command line
//! `… kiln.live=LABEL [roothash=HEX]`: it finds the medium by its ISO volume label (a CD, or the
//! whole disk a stick shows up as), mounts it read-only at [`MEDIUM_MOUNT`], loop-mounts
//! `/live/root.img` (under dm-verity with the hash tree beside it when a root hash is given),
//! puts a tmpfs overlay over it and switches root. `/run` moves into the new root, so **the
//! live system reads every slot at `/run/kiln/medium/<slot path>`** (a kiosk's init shows
//! `/run/kiln/medium/piece.html`). Everything the live system writes lives in RAM.
//!
//! **Why a slot is an ISO file** rather than a small FAT or ext4 image inside the ISO: the
//! payload is then an ordinary file of the medium — xorriso, isoinfo, a desktop's file manager
//! and the live system all read the injected page as is, with no second mount — and injecting
//! patches only the reserved extent and the both-endian size field of each directory record
//! pointing at it (ISO 9660 and Joliet; ISO 9660 has no checksums, the GPT's CRCs do not cover
//! file data). A nested filesystem would add its own metadata and checksums to patch, and a
//! loop mount to boot. Other files of a slot's partition are not carried into the ISO.
//!
//! **No temporary copy.** The ISO is planned once with the EROFS image's upper bound to learn
//! where the root image starts; the EROFS is written straight there; the ISO is planned again
//! with the real size — the root image's extent cannot move, because no metadata and no file
//! placed before it depends on file sizes (checked). The verity tree is hashed from the
//! written image into its own extent, the UKI gets the root hash, and the ESP, whose size was
//! fixed up front from a UKI of identical length, is written at its place. Then the ISO
//! metadata, the slot files, the GPT and kiln's slot table (byte 24576) and sidecars.
//!
//! **Identity.** The volume label is `NAME_VERSION` (at most 32 characters), the volume "UUID"
//! (its modification date, as blkid reports it) derives from the seed, and the GPT's GUIDs
//! from `derive_uuid(seed, "kiln-iso")`, so that an ISO and the disk image of the same spec,
//! attached to one machine, never share a disk or partition GUID.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use kiln_formats::fstree::{self, Contents, DataRef, FileData, Meta, Node, NodeKind, Timestamp};
use kiln_formats::fstree::{NodeId, Tree};
use kiln_formats::iso9660::writer::HybridOptions;
use kiln_formats::iso9660::{IsoOptions, IsoPlan};
use kiln_formats::repart;
use kiln_formats::sink::FileSink;
use kiln_formats::{erofs, fat, verity};
use kiln_inject::slots::{self as islots, ByteRange, IsoMeta, PayloadInfo, SlotMeta};
use kiln_tree::output::AtomicFile;
use serde::Serialize;

use crate::artifacts::{
    chunk_table, fat_label, fat_volume_id, read_full_at, truncate_label, write_slot_table,
    Artifact, Outputs, Stages,
};
use crate::boot::{self, BootReport};
use crate::prepare;
use crate::spec::{self, Compression, FsKind, Spec};

/// Path of the root image in the ISO (kiln-init's default `kiln.live.image`).
pub const ROOT_IMAGE: &str = kiln_init::config::DEFAULT_LIVE_IMAGE;
/// Where kiln-init keeps the live medium mounted (read-only); the live system finds the
/// slots below it.
pub const MEDIUM_MOUNT: &str = kiln_init::config::LIVE_MEDIUM_MOUNT;
/// Modules a live boot cannot do without, on top of kiln's required set: the medium's
/// filesystem, the loop device, the RAM overlay and the root image's filesystem. A kernel
/// without them (as modules or built in) is a build error, not a medium that cannot boot.
pub const LIVE_MODULES: &[&str] = &["isofs", "loop", "overlay", "erofs"];
/// The largest file a single ISO 9660 extent holds, rounded down to whole 4 KiB blocks.
const MAX_ISO_FILE: u64 = (u32::MAX as u64) & !4095;

/// Where one file of the ISO lies.
#[derive(Clone, Debug, Serialize)]
pub struct IsoFile {
    /// Path in the ISO 9660 tree.
    pub path: String,
    /// Byte offset of its extent in the ISO.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
}

/// The root image's dm-verity tree.
#[derive(Clone, Debug, Serialize)]
pub struct IsoVerity {
    /// The hash tree file.
    pub file: IsoFile,
    /// Root hash, hex (in the UKI command line as `roothash=`).
    pub root_hash: String,
    /// Salt, hex.
    pub salt: String,
    /// Superblock UUID.
    pub uuid: String,
    /// 4096-byte data blocks covered.
    pub data_blocks: u64,
}

/// One partition of the hybrid GPT.
#[derive(Clone, Debug, Serialize)]
pub struct IsoPartition {
    /// 1-based number.
    pub number: usize,
    /// `iso9660` (the ISO data, type "Microsoft basic data" as xorriso marks it) or `esp`.
    pub role: &'static str,
    /// Partition UUID.
    pub uuid: String,
    /// Byte offset.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
}

/// What the ISO stage built (the `iso` member of the build report).
#[derive(Clone, Debug, Serialize)]
pub struct IsoReport {
    /// File name in the output directory.
    pub file: String,
    /// Size in bytes.
    pub size: u64,
    /// sha256, hex (`digest`, `"sha256:HEX"`, in JSON).
    #[serde(rename = "digest", serialize_with = "crate::json::sha256")]
    pub sha256: String,
    /// Chunked digest (`kiln verify --digest`).
    pub chunked_digest: String,
    /// ISO volume label; kiln-init finds the medium by it (`kiln.live=`).
    pub volume_id: String,
    /// The volume "UUID" blkid reports (the volume modification date).
    pub volume_uuid: String,
    /// GPT disk GUID of the hybrid layout.
    pub disk_uuid: String,
    /// The hybrid GPT's partitions.
    pub partitions: Vec<IsoPartition>,
    /// The root image.
    pub root: IsoFile,
    /// Its filesystem (`erofs`).
    pub root_filesystem: &'static str,
    /// Its compression (`none`, `lz4`, `lz4hc`).
    pub root_compression: &'static str,
    /// Its dm-verity tree, if the root partition asks for verity.
    pub verity: Option<IsoVerity>,
    /// The ESP image (El Torito's UEFI entry and GPT partition 2).
    pub esp: IsoFile,
    /// Where kiln-init mounts the medium in the live system.
    pub medium_mount: String,
    /// The live boot: kernel, UKI, command line, initrd.
    pub boot: BootReport,
    /// Injectable slots (also in the table at byte 24576 and the sidecar).
    #[serde(serialize_with = "crate::json::slots")]
    pub slots: Vec<islots::Slot>,
}

/// A built, not yet committed ISO and its sidecars.
pub struct IsoOutput {
    /// The report member.
    pub report: IsoReport,
    /// The ISO itself, under its temp name.
    pub image: AtomicFile,
    /// The ISO as an artifact.
    pub artifact: Artifact,
    /// The slot-table sidecar (when there are slots) and the chunk table, with their artifacts.
    pub sidecars: Vec<(AtomicFile, Artifact)>,
}

/// What the stage reads.
pub struct IsoInputs<'a> {
    /// The spec.
    pub spec: &'a Spec,
    /// The whole normalised source tree (os-release stamped).
    pub tree: &'a Tree,
    /// Its file contents.
    pub contents: &'a dyn Contents,
    /// os-release for the UKI.
    pub osrel: &'a str,
    /// `SOURCE_DATE_EPOCH`.
    pub epoch: Option<i64>,
    /// Output directory (exists).
    pub outdir: &'a Path,
    /// `NAME_VERSION`.
    pub name_version: &'a str,
}

/// The ISO volume label for `NAME_VERSION`: at most 32 bytes (ECMA-119 §8.4.6); spec names and
/// versions are printable ASCII already.
pub fn volume_label(name_version: &str) -> String {
    name_version.chars().take(32).collect()
}

/// The live UKI's command line: the spec's, then how kiln-init finds the live root.
pub fn live_cmdline(spec: &Spec, label: &str, root_hash: Option<&[u8; 32]>) -> String {
    let mut c = spec
        .boot
        .as_ref()
        .map(|b| b.cmdline.trim().to_string())
        .unwrap_or_default();
    if !c.is_empty() {
        c.push(' ');
    }
    c.push_str(&format!("kiln.live={label}"));
    if let Some(h) = root_hash {
        c.push_str(&format!(
            " roothash={} {}",
            hex::encode(h),
            boot::NO_SYSTEMD_VERITY
        ));
    }
    c
}

/// The EROFS settings for the root image: the spec's first root (or usr) partition's
/// compression when it is EROFS, else lz4; and whether it asks for verity.
fn root_settings(spec: &Spec) -> (Compression, bool) {
    let root = spec
        .partitions
        .iter()
        .find(|p| p.type_name.starts_with("root-") || p.type_name.starts_with("usr-"));
    match root {
        Some(p) if p.fs == FsKind::Erofs => (p.compression, p.verity),
        Some(p) => (Compression::Lz4, p.verity),
        None => (Compression::Lz4, false),
    }
}

fn compression_name(c: Compression) -> &'static str {
    match c {
        Compression::None => "none",
        Compression::Lz4 => "lz4",
        Compression::Lz4hc => "lz4hc",
    }
}

fn placed_file(size: u64, index: u32, mtime: i64) -> Node {
    Node {
        kind: NodeKind::File(FileData::dense(size, DataRef::Placed(index))),
        meta: Meta {
            perm: 0o444,
            mtime: Timestamp::from_secs(mtime),
            ..Meta::default()
        },
        slot: None,
    }
}

fn set_size(tree: &mut Tree, id: NodeId, size: u64) {
    if let NodeKind::File(f) = &mut tree.node_mut(id).kind {
        *f = FileData::dense(size, f.data.clone());
    }
}

/// The ISO 9660 tree without the ESP: the root image (and its verity tree) as files the
/// caller writes, plus every slot of the spec at its path. Returns the tree, the root image's
/// and verity file's nodes, and the slots as (spec slot, partition tree) for their defaults.
fn iso_tree(
    spec: &Spec,
    partition_trees: &[Option<Tree>],
    verity: bool,
    mtime: i64,
) -> Result<(Tree, NodeId, Option<NodeId>)> {
    let dir_meta = Meta {
        perm: 0o755,
        mtime: Timestamp::from_secs(mtime),
        ..Meta::default()
    };
    let mut t = Tree::new(dir_meta.clone());
    // Sizes are provisional (non-zero: an empty file would share the zero sector and change
    // the metadata layout between the two plans).
    t.insert(
        ROOT_IMAGE.as_bytes(),
        placed_file(4096, 0, mtime),
        &dir_meta,
    )?;
    let root = t
        .resolve(ROOT_IMAGE.as_bytes())
        .ok_or_else(|| anyhow!("internal: {ROOT_IMAGE} missing from the ISO tree"))?;
    let verity_node = if verity {
        let p = format!("{ROOT_IMAGE}.verity");
        t.insert(p.as_bytes(), placed_file(8192, 1, mtime), &dir_meta)?;
        t.resolve(p.as_bytes())
    } else {
        None
    };
    for (p, pt) in spec.partitions.iter().zip(partition_trees) {
        for s in &p.slot {
            let src = pt
                .as_ref()
                .and_then(|pt| pt.resolve(s.path.as_bytes()).map(|id| pt.node(id).clone()))
                .ok_or_else(|| anyhow!("internal: slot {} has no file in its tree", s.name))?;
            if t.resolve(s.path.as_bytes()).is_some()
                || s.path == "/live"
                || s.path.starts_with("/live/")
            {
                bail!(
                    "slot {} (line {}): path {} collides with the ISO's {} (the live root image); \
                     choose another slot path",
                    s.name,
                    s.at.line,
                    s.path,
                    ROOT_IMAGE
                );
            }
            t.insert(s.path.as_bytes(), src, &dir_meta)
                .with_context(|| format!("slot {} (line {}): {}", s.name, s.at.line, s.path))?;
        }
    }
    Ok((t, root, verity_node))
}

fn iso_options(spec: &Spec, label: &str, mtime: i64, esp_len: u64) -> IsoOptions {
    let mut o = IsoOptions::new(label, mtime, &spec.seed);
    o.application_id = format!("KILN {}", env!("CARGO_PKG_VERSION"));
    o.publisher_id = String::new();
    o.esp_len = Some(esp_len);
    // Slot files and the directory records that point at them near the end, as slot
    // partitions on a disk: kiln serve hashes a personalised ISO from the first of them on.
    o.slots_last = spec.slots_last;
    o.hybrid = Some(HybridOptions::from_seed(&repart::derive_uuid(
        &spec.seed, "kiln-iso",
    )));
    o
}

/// Builds the ISO into a temp file beside `OUTDIR/NAME_VERSION.iso` (not committed).
///
/// The steps: the live boot pieces; the ESP sized from a UKI of final length; the ISO 9660
/// tree and a first plan that places the root image; the root image written at its extent;
/// the final plan and dm-verity over the root image; the ESP with the real UKI; the rest of
/// the ISO (descriptors, directories, El Torito, slot files, GPT); slot table and digests.
pub(crate) fn build(inp: &IsoInputs<'_>, stages: &Stages) -> Result<IsoOutput> {
    let spec = inp.spec;
    let mtime = inp.epoch.unwrap_or(0);
    let boot_spec = live_boot_spec(spec)?;
    let (compression, with_verity) = root_settings(spec);
    let label = volume_label(inp.name_version);
    let bp = live_boot_parts(inp, boot_spec, stages)?;

    // Slot defaults come from each partition's tree, exactly as on the disk.
    let mut part_trees = prepare::split(spec, inp.tree)?;
    for (p, t) in spec.partitions.iter().zip(part_trees.iter_mut()) {
        if let Some(t) = t {
            prepare::place_slots(p, t, inp.contents, mtime)?;
        }
    }
    let esp = LiveEsp::plan(inp, &bp, &part_trees, &label, with_verity)?;

    // The ISO 9660 tree, a first plan to learn where the root image starts, and the root
    // image written there.
    let (mut tree, root_node, verity_node) = iso_tree(spec, &part_trees, with_verity, mtime)?;
    let opts = iso_options(spec, &label, mtime, esp.fat.size);
    let iso_name = format!("{}.iso", inp.name_version);
    let iso_path = inp.outdir.join(&iso_name);
    let out = AtomicFile::create(&iso_path)
        .with_context(|| format!("creating {}", iso_path.display()))?;
    let file = out.file();
    let (root_at, root_size) =
        write_root_image(inp, compression, &label, &mut tree, root_node, &opts, file)?;
    stages.done(format_args!(
        "iso {ROOT_IMAGE} (erofs, {}): {}",
        compression_name(compression),
        spec::human_size(root_size)
    ));

    // The final plan, dm-verity over the root image, and the ESP with the real UKI.
    let vparams = verity::Params::new(
        &repart::verity_salt(&spec.seed),
        repart::verity_uuid(&spec.seed),
    );
    set_size(&mut tree, root_node, root_size);
    let hash_size = verity::hash_size(root_size, &vparams);
    if let Some(v) = verity_node {
        set_size(&mut tree, v, hash_size);
    }
    let plan = IsoPlan::new(&tree, &opts).map_err(|e| anyhow!("ISO layout: {e}"))?;
    let root_ext = plan
        .extent(root_node)
        .ok_or_else(|| anyhow!("internal: no extent for {ROOT_IMAGE}"))?;
    if root_ext.offset() != root_at {
        bail!(
            "internal: the root image moved from byte {root_at} to {} between the ISO plans",
            root_ext.offset()
        );
    }
    let verity = match verity_node {
        Some(v) => Some(root_verity(
            &plan, v, &vparams, root_at, root_size, file, stages,
        )?),
        None => None,
    };
    let cmdline = live_cmdline(spec, &label, verity.as_ref().map(|v| &v.0));
    let (esp_at, esp_len) = esp.write(inp, &bp, &plan, &cmdline, file, stages)?;

    // Everything else: descriptors, directories, El Torito, slot files, the GPT.
    let size = plan.size();
    plan.write(&tree, inp.contents, None, &FileSink::new(file, 0, size))
        .map_err(|e| anyhow!("writing {}: {e}", iso_path.display()))?;
    file.set_len(size)
        .with_context(|| format!("sizing {}", out.tmp_path().display()))?;

    // Slots: the table at byte 24576 (kept free by the writer) and the sidecar; digests.
    let slots = iso_slots(spec, &plan, &part_trees, inp.contents)?;
    let mut sidecars = Outputs::default();
    let table = write_slot_table(&slots, size, file, &iso_path, &mut sidecars)?;
    if !slots.is_empty() {
        stages.done(format_args!(
            "iso slots: {}",
            slots
                .iter()
                .map(|s| format!("{} at {MEDIUM_MOUNT}{}", s.name, s.path))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let (sha, chunked_digest) = chunk_table(&out, &iso_path, size, &table, &mut sidecars, stages)?;

    let report = IsoReport {
        file: iso_name.clone(),
        size,
        sha256: hex::encode(sha),
        chunked_digest,
        volume_id: label.clone(),
        volume_uuid: opts.uuid.to_string(),
        disk_uuid: esp.hybrid.disk_guid.to_string(),
        partitions: iso_partitions(&plan)?,
        root: IsoFile {
            path: ROOT_IMAGE.into(),
            offset: root_at,
            size: root_size,
        },
        root_filesystem: "erofs",
        root_compression: compression_name(compression),
        verity: verity.map(|v| v.1),
        esp: IsoFile {
            path: "(El Torito UEFI image, GPT partition 2)".into(),
            offset: esp_at,
            size: esp_len,
        },
        medium_mount: MEDIUM_MOUNT.into(),
        boot: BootReport::new(&bp, cmdline, esp.uki_file.clone()),
        slots,
    };
    stages.done(format_args!(
        "iso: {} ({}), sha256 {}",
        iso_name,
        spec::human_size(size),
        report.sha256
    ));
    let artifact = Artifact {
        file: iso_name,
        size,
        sha256: report.sha256.clone(),
    };
    Ok(IsoOutput {
        report,
        image: out,
        artifact,
        sidecars: sidecars
            .pending
            .into_iter()
            .zip(sidecars.artifacts)
            .collect(),
    })
}

/// The spec's `[boot]`, which the ISO boots with in live mode; an error without one, or with
/// a prebuilt initrd (which cannot find a live root).
fn live_boot_spec(spec: &Spec) -> Result<&spec::Boot> {
    let Some(boot_spec) = &spec.boot else {
        bail!(
            "{}: output \"iso\" needs a [boot] section: the ISO boots a kernel from the tree \
             through systemd-boot",
            spec.file.display()
        );
    };
    if let Some(p) = &boot_spec.initrd {
        bail!(
            "{}: output \"iso\" boots with kiln's initrd in live mode; [boot] initrd = {} \
             cannot find a live root (remove it or drop \"iso\" from [image] output)",
            spec.file.display(),
            p.display()
        );
    }
    Ok(boot_spec)
}

/// The live initrd and the boot pieces: kiln-init finds the medium, loop-mounts the EROFS
/// image and overlays it with RAM. The spec's overlays are moot: the whole root is.
fn live_boot_parts(
    inp: &IsoInputs<'_>,
    boot_spec: &spec::Boot,
    stages: &Stages,
) -> Result<boot::BootParts> {
    let mut live_boot = boot_spec.clone();
    for m in LIVE_MODULES {
        if !live_boot.modules.iter().any(|x| x == m) {
            live_boot.modules.push((*m).to_string());
        }
    }
    let cfg = kiln_init::config::Config {
        rootfstype: Some("erofs".into()),
        ..Default::default()
    };
    let bp = boot::prepare(
        &live_boot,
        inp.spec.arch,
        inp.tree,
        inp.contents,
        Some("erofs"),
        cfg,
        inp.osrel.to_string(),
        inp.epoch.unwrap_or(0).clamp(0, u32::MAX as i64) as u32,
    )
    .context("the ISO's live boot")?;
    stages.done(format_args!("iso initrd (live): {}", bp.summary()));
    Ok(bp)
}

/// The ISO's ESP: its base tree (the spec's ESP contents), its FAT sized from a UKI of final
/// length (the root hash is fixed-length hex), and the hybrid layout's identifiers.
struct LiveEsp {
    base: Option<Tree>,
    /// `NAME_VERSION.efi`: no boot counting, since systemd-boot would rename the UKI on a
    /// stick, and nothing may write to a live medium.
    uki_file: String,
    placeholder_len: usize,
    fat: fat::FatOptions,
    timeout: u32,
    mtime: i64,
    hybrid: HybridOptions,
}

impl LiveEsp {
    fn plan(
        inp: &IsoInputs<'_>,
        bp: &boot::BootParts,
        part_trees: &[Option<Tree>],
        label: &str,
        with_verity: bool,
    ) -> Result<Self> {
        let spec = inp.spec;
        let mtime = inp.epoch.unwrap_or(0);
        let esp_index = spec.partitions.iter().position(|p| p.type_name == "esp");
        let base = esp_index.and_then(|i| part_trees[i].clone());
        let uki_file = boot::uki_name(inp.name_version, 0);
        let placeholder = live_cmdline(spec, label, with_verity.then_some(&[0u8; 32]));
        let placeholder_uki: Arc<[u8]> = bp.uki(&placeholder)?.into();
        let timeout = spec.boot.as_ref().map(|b| b.timeout).unwrap_or(0);
        let esp_tree = boot::esp_tree(
            spec.arch,
            base.clone(),
            &bp.systemd_boot,
            &uki_file,
            placeholder_uki.clone(),
            timeout,
            mtime,
        )?;
        let hybrid = HybridOptions::from_seed(&repart::derive_uuid(&spec.seed, "kiln-iso"));
        let esp_fs_uuid = repart::filesystem_uuid(&hybrid.esp_part_guid);
        let esp_label = esp_index
            .and_then(|i| spec.partitions[i].label.as_deref())
            .and_then(fat_label)
            .or_else(|| Some("ESP".to_string()));
        let (esp_size, fat_type) = fat::auto_size(&esp_tree, None, esp_label.clone(), 64 << 10)
            .map_err(|e| anyhow!("the ISO's ESP: {e}"))?;
        Ok(Self {
            base,
            uki_file,
            placeholder_len: placeholder_uki.len(),
            fat: fat::FatOptions {
                size: esp_size,
                fat_type,
                volume_id: fat_volume_id(&esp_fs_uuid),
                label: esp_label,
            },
            timeout,
            mtime,
            hybrid,
        })
    }

    /// The UKI with `cmdline` (the real root hash) and the ESP written at its place in
    /// `plan`; where the ESP is.
    fn write(
        &self,
        inp: &IsoInputs<'_>,
        bp: &boot::BootParts,
        plan: &IsoPlan,
        cmdline: &str,
        file: &std::fs::File,
        stages: &Stages,
    ) -> Result<(u64, u64)> {
        let uki = bp.uki(cmdline)?;
        if uki.len() != self.placeholder_len {
            bail!("internal: the live UKI changed size between sizing and writing the ESP");
        }
        let esp_tree = boot::esp_tree(
            inp.spec.arch,
            self.base.clone(),
            &bp.systemd_boot,
            &self.uki_file,
            uki.clone().into(),
            self.timeout,
            self.mtime,
        )?;
        let (esp_at, esp_len) = plan
            .esp_range()
            .ok_or_else(|| anyhow!("internal: the ISO plan has no ESP"))?;
        fat::FatWriter::new(&esp_tree, self.fat.clone())
            .and_then(|w| w.write(inp.contents, &FileSink::new(file, esp_at, esp_len)))
            .map_err(|e| anyhow!("the ISO's ESP: {e}"))?;
        stages.done(format_args!(
            "iso esp: systemd-boot + EFI/Linux/{} ({} KiB), {}",
            self.uki_file,
            uki.len() / 1024,
            spec::human_size(esp_len)
        ));
        Ok((esp_at, esp_len))
    }
}

/// Plans the root image (EROFS of the whole tree), places it with a first ISO plan and
/// writes it straight at its extent (the window may reach past the first plan's extent: only
/// the real size counts, and nothing else is written yet); its offset and size.
fn write_root_image(
    inp: &IsoInputs<'_>,
    compression: Compression,
    label: &str,
    tree: &mut Tree,
    root_node: NodeId,
    opts: &IsoOptions,
    file: &std::fs::File,
) -> Result<(u64, u64)> {
    let eo = erofs::Options {
        compression: match compression {
            Compression::None => erofs::Compression::None,
            Compression::Lz4 => erofs::Compression::Lz4,
            Compression::Lz4hc => erofs::Compression::Lz4hc { level: 9 },
        },
        uuid: repart::derive_uuid(&inp.spec.seed, "kiln-iso-root").into_bytes(),
        timestamp: inp.epoch.map(Timestamp::from_secs),
        volume_name: truncate_label(label, 16).into_bytes(),
        ..Default::default()
    };
    let eplan = erofs::plan(inp.tree, &eo).map_err(|e| {
        anyhow!(
            "the ISO's root image: {e}; the heaviest paths:\n{}",
            crate::budget::report(inp.tree, 20)
        )
    })?;
    let bound = eplan.size().bytes;
    set_size(tree, root_node, bound.clamp(4096, MAX_ISO_FILE));
    let plan1 = IsoPlan::new(tree, opts).map_err(|e| anyhow!("ISO layout: {e}"))?;
    let root_at = plan1
        .extent(root_node)
        .map(|e| e.offset())
        .ok_or_else(|| anyhow!("internal: no extent for {ROOT_IMAGE}"))?;
    let written = eplan
        .write(inp.contents, &FileSink::new(file, root_at, bound), &|_| {})
        .map_err(|e| anyhow!("the ISO's root image: {e}"))?;
    let root_size = written.size;
    if root_size > MAX_ISO_FILE {
        bail!(
            "the root image is {} ({root_size} bytes); an ISO 9660 file holds less than 4 GiB \
             and kiln writes no multi-extent files; the heaviest paths:\n{}",
            spec::human_size(root_size),
            crate::budget::report(inp.tree, 20)
        );
    }
    Ok((root_at, root_size))
}

/// dm-verity over the root image, into the hash file's extent; the root hash and the report.
fn root_verity(
    plan: &IsoPlan,
    v: NodeId,
    vparams: &verity::Params,
    root_at: u64,
    root_size: u64,
    file: &std::fs::File,
    stages: &Stages,
) -> Result<([u8; 32], IsoVerity)> {
    let hash_size = verity::hash_size(root_size, vparams);
    let ext = plan
        .extent(v)
        .ok_or_else(|| anyhow!("internal: no extent for the verity file"))?;
    let read = |off: u64, buf: &mut [u8]| -> std::io::Result<()> {
        let n = read_full_at(file, buf, root_at + off)?;
        buf[n..].fill(0);
        Ok(())
    };
    let f = verity::format(
        vparams,
        root_size,
        &read,
        &FileSink::new(file, ext.offset(), hash_size),
    )
    .map_err(|e| anyhow!("verity of the ISO's root image: {e}"))?;
    stages.done(format_args!(
        "iso {ROOT_IMAGE}.verity: root hash {}",
        hex::encode(f.root_hash)
    ));
    Ok((
        f.root_hash,
        IsoVerity {
            file: IsoFile {
                path: format!("{ROOT_IMAGE}.verity"),
                offset: ext.offset(),
                size: hash_size,
            },
            root_hash: hex::encode(f.root_hash),
            salt: hex::encode(&vparams.salt),
            uuid: vparams.uuid.to_string(),
            data_blocks: f.data_blocks,
        },
    ))
}

/// The slots of the spec as files of the ISO, where the writer placed them.
fn iso_slots(
    spec: &Spec,
    plan: &IsoPlan,
    part_trees: &[Option<Tree>],
    contents: &dyn Contents,
) -> Result<Vec<islots::Slot>> {
    let mut slots = Vec::new();
    for (p, pt) in spec.partitions.iter().zip(part_trees) {
        for s in &p.slot {
            let loc = plan
                .slots()
                .iter()
                .find(|l| l.name == s.name)
                .ok_or_else(|| anyhow!("slot {}: not reported by the ISO writer", s.name))?;
            let default = match pt {
                Some(t) => fstree::read_file(t, contents, &s.path, u64::MAX)?.unwrap_or_default(),
                None => Vec::new(),
            };
            slots.push(islots::Slot {
                name: s.name.clone(),
                path: s.path.clone(),
                capacity: s.capacity,
                data: vec![ByteRange {
                    offset: loc.data_offset,
                    len: loc.reserved_len(),
                }],
                meta: SlotMeta::Iso9660(IsoMeta {
                    fs_offset: 0,
                    extent_lba: loc.extent_lba,
                    record_offsets: loc.record_offsets.clone(),
                }),
                default: PayloadInfo::of(&default),
            });
        }
    }
    Ok(slots)
}

/// The hybrid ISO's GPT entries, for the report.
fn iso_partitions(plan: &IsoPlan) -> Result<Vec<IsoPartition>> {
    let gpt = plan
        .gpt()
        .ok_or_else(|| anyhow!("internal: hybrid ISO without a GPT"))?;
    Ok(gpt
        .partitions
        .iter()
        .enumerate()
        .map(|(i, p)| IsoPartition {
            number: i + 1,
            role: if p.type_guid == kiln_formats::gpt::TYPE_ESP {
                "esp"
            } else {
                "iso9660"
            },
            uuid: p.part_guid.to_string(),
            offset: p.first_lba * kiln_formats::gpt::SECTOR,
            size: (p.last_lba + 1 - p.first_lba) * kiln_formats::gpt::SECTOR,
        })
        .collect())
}
