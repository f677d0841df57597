//! The `kiln.toml` spec: what image to build, from which tree, how it boots, and its ordered
//! partitions. Parsing keeps source spans so every error — a TOML syntax error, an unknown key,
//! a bad size, a partition that cannot work — names the line and column it comes from.

use std::fmt;
use std::path::{Path, PathBuf};

use kiln_formats::arch::Arch;
use kiln_formats::gpt;
use kiln_formats::repart::{self, Uuid};
use serde::de::{self, Deserializer};
use serde::Deserialize;
use toml::Spanned;

/// A spec error with its position in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    /// The spec file, for messages.
    pub file: PathBuf,
    /// 1-based line, 0 when unknown.
    pub line: usize,
    /// 1-based column, 0 when unknown.
    pub column: usize,
    /// What is wrong and what was expected.
    pub msg: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.column,
                self.msg
            )
        } else {
            write!(f, "{}: {}", self.file.display(), self.msg)
        }
    }
}

impl std::error::Error for SpecError {}

/// A size in bytes, written `4096`, `512K`, `128M`, `2G`, `1T`, `1.5G` or `8MiB`: every unit is
/// a power of 1024. `MB`, `GB` and the like are refused, here and in every size kiln reads
/// (command-line flags too), because half the world reads them as powers of 1000: "16MB"
/// silently becoming 16 MiB is a 4.9% surprise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl Size {
    /// Parses a size string.
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let (num, mult) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
            Some((i, _)) => {
                let unit = t[i..].trim().to_ascii_uppercase();
                if unit.len() == 2 && unit.ends_with('B') && "KMGT".contains(&unit[..1]) {
                    return Err(format!(
                        "bad size {s:?}: {:?} is ambiguous (powers of 1000 or 1024?); write {:?} or {:?} (both powers of 1024)",
                        &t[i..],
                        format!("{}{}", t[..i].trim(), &unit[..1]),
                        format!("{}{}iB", t[..i].trim(), &unit[..1]),
                    ));
                }
                let mult: u64 = match unit.strip_suffix("IB").unwrap_or(&unit) {
                    "" | "B" => 1,
                    "K" => 1 << 10,
                    "M" => 1 << 20,
                    "G" => 1 << 30,
                    "T" => 1 << 40,
                    _ => {
                        return Err(format!(
                            "bad size {s:?}: unknown unit {:?} (use K, M, G or T)",
                            &t[i..]
                        ))
                    }
                };
                (t[..i].trim(), mult)
            }
            None => (t, 1),
        };
        if num.is_empty() {
            return Err(format!("bad size {s:?}: no number"));
        }
        let bytes = if let Some((int, frac)) = num.split_once('.') {
            let int: u64 = int
                .parse()
                .map_err(|_| format!("bad size {s:?}: not a number"))?;
            if frac.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) || frac.len() > 9 {
                return Err(format!("bad size {s:?}: not a number"));
            }
            let f: u64 = frac
                .parse()
                .map_err(|_| format!("bad size {s:?}: not a number"))?;
            let scale = 10u64.pow(frac.len() as u32);
            int.checked_mul(mult).and_then(|v| {
                v.checked_add((u128::from(f) * u128::from(mult) / u128::from(scale)) as u64)
            })
        } else {
            let n: u64 = num
                .parse()
                .map_err(|_| format!("bad size {s:?}: not a number"))?;
            n.checked_mul(mult)
        };
        bytes
            .map(Size)
            .ok_or_else(|| format!("bad size {s:?}: too large"))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&human_size(self.0))
    }
}

/// Formats bytes with a binary unit and one decimal (`1.5 GiB`, `512 B`).
pub fn human_size(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) if n >= 0 => Ok(Size(n as u64)),
            Raw::Int(n) => Err(de::Error::custom(format!("bad size {n}: negative"))),
            Raw::Str(s) => Size::parse(&s).map_err(de::Error::custom),
        }
    }
}

/// A partition size: fixed, or `auto` (as small as the contents allow, plus `extra`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartSize {
    /// Exactly this many bytes (rounded up to the 1 MiB alignment).
    Fixed(Size),
    /// Computed from the contents.
    Auto,
}

impl<'de> Deserialize<'de> for PartSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Str(s) if s.eq_ignore_ascii_case("auto") => Ok(PartSize::Auto),
            Raw::Str(s) => Size::parse(&s)
                .map(PartSize::Fixed)
                .map_err(de::Error::custom),
            Raw::Int(n) if n > 0 => Ok(PartSize::Fixed(Size(n as u64))),
            Raw::Int(n) => Err(de::Error::custom(format!(
                "bad size {n}: must be positive or \"auto\""
            ))),
        }
    }
}

/// `[image]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSection {
    /// Image name: letters, digits, `.`, `-`; used in file names and sysupdate patterns.
    pub name: Spanned<String>,
    /// Version string; no `_` (it separates name and version in artifact names).
    pub version: Spanned<String>,
    /// 32 hex digits or a UUID; every UUID, salt and label derives from it.
    pub seed: Option<Spanned<String>>,
    /// Clamp for every timestamp; the environment's `SOURCE_DATE_EPOCH` is used when absent.
    pub source_date_epoch: Option<i64>,
    /// Upper bound for the whole disk image.
    pub budget: Option<Spanned<Size>>,
    /// Target architecture, `x86-64` or `arm64` (default: the machine kiln runs on).
    pub arch: Option<Spanned<String>>,
    /// Fixed total disk size; partitions must fit (`size = "fill"` is not supported).
    pub size: Option<Spanned<Size>>,
    /// What to emit: `disk` (default), `iso`, and VM disks made from the disk: `qcow2`,
    /// `vhd`, `vmdk` (these imply `disk`: the raw image is their source and is kept).
    #[serde(default)]
    pub output: Option<Spanned<Vec<String>>>,
    /// Compressed qcow2 clusters: `zstd` or `zlib` (default: none).
    pub qcow2_compression: Option<Spanned<String>>,
    /// `fixed` (default, as Azure requires) or `dynamic`.
    pub vhd_type: Option<Spanned<String>>,
    /// Place partitions holding slots after the others on disk (default true); see
    /// [`crate::layout::layout`].
    pub slots_last: Option<bool>,
    /// `packed` (default) or `stable`: ext4 filesystems of fixed size place inodes and data
    /// by path, so that an unchanged file stays put between builds (small delta updates).
    pub layout: Option<Spanned<String>>,
}

/// A `[source] tree` resolved against the spec's directory: image references keep their
/// scheme (`oci://` as is; the path of `oci-layout:` and `docker-archive:` is resolved).
fn source_path(dir: &Path, t: &str) -> PathBuf {
    if t.starts_with("oci://") {
        return PathBuf::from(t);
    }
    for scheme in ["oci-layout:", "docker-archive:"] {
        if let Some(rest) = t.strip_prefix(scheme) {
            return PathBuf::from(format!("{scheme}{}", dir.join(rest).display()));
        }
    }
    dir.join(t)
}

/// `[source]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSection {
    /// A directory or tar file (relative to the spec's directory); `--source` overrides it.
    pub tree: Option<Spanned<String>>,
    /// Make every file owned by root.
    #[serde(default)]
    pub all_root: bool,
    /// Write all-zero 4 KiB blocks of file data as data instead of holes.
    #[serde(default)]
    pub keep_zeroes: bool,
    /// A host directory (relative to the spec's directory) laid over the tree: its files
    /// replace the tree's, its directories merge (units, configuration on top of a base tar).
    pub add: Option<Spanned<String>>,
    /// For a container image source: write a systemd unit NAME.service that runs the image
    /// config's Entrypoint/Cmd with its Env, WorkingDir and User, enabled for multi-user.target.
    pub service: Option<Spanned<String>>,
}

/// `[boot]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSection {
    /// `auto` (find `/boot/vmlinuz-*` or `/usr/lib/modules/*/vmlinuz` in the tree) or a path
    /// in the tree.
    #[serde(default)]
    pub kernel: Option<Spanned<String>>,
    /// Kernel command line; kiln appends `roothash=` and its own options.
    #[serde(default)]
    pub cmdline: Option<Spanned<String>>,
    /// `kiln` (kiln-init, the default) or a path to a prebuilt initrd (relative to the spec).
    #[serde(default)]
    pub initrd: Option<Spanned<String>>,
    /// systemd's UKI stub: `auto` (the tree's, then the host's) or a path.
    #[serde(default)]
    pub stub: Option<Spanned<String>>,
    /// Extra kernel modules for the initrd, by name.
    #[serde(default)]
    pub modules: Vec<Spanned<String>>,
    /// Boot-counting tries for a new UKI (`NAME_VERSION+TRIES.efi`); 0 disables counting.
    #[serde(default)]
    pub tries: Option<u32>,
    /// systemd-boot menu timeout in seconds (loader.conf).
    #[serde(default)]
    pub timeout: Option<u32>,
    /// Directories of the root that get a tmpfs overlay at boot (writable, RAM-only).
    #[serde(default)]
    pub overlays: Vec<Spanned<String>>,
}

/// A slot reserved in a partition's filesystem for later injection.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotSection {
    /// Slot name (`--slot NAME=FILE`); defaults to the file's base name without extension.
    pub name: Option<String>,
    /// Absolute path of the file inside the partition's filesystem.
    pub path: String,
    /// Bytes reserved, contiguous on disk.
    pub capacity: Size,
    /// The payload before injection: a host file relative to the spec (default: empty).
    pub default: Option<String>,
}

/// One slot or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    /// `slot = { ... }`
    One(T),
    /// `slot = [{ ... }, { ... }]`
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(t) => vec![t],
            OneOrMany::Many(v) => v,
        }
    }
}

/// `[[partition]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionSection {
    /// DPS type name (`esp`, `root`, `root-x86-64`, `var`, `linux-generic`, ...) or a GUID.
    #[serde(rename = "type")]
    pub type_: Option<Spanned<String>>,
    /// GPT partition name; defaults to systemd-repart's (the type name, `-2` for a second).
    pub label: Option<Spanned<String>>,
    /// `ext4`, `erofs`, `vfat` or `none`.
    pub fs: Option<Spanned<String>>,
    /// `auto` or a size.
    pub size: Option<Spanned<PartSize>>,
    /// Free space added to an `auto` size (writable filesystems).
    pub extra: Option<Spanned<Size>>,
    /// Directory of the source tree that becomes this filesystem's root.
    pub contents: Option<Spanned<String>>,
    /// A host directory (relative to the spec) copied into this filesystem instead.
    pub copy: Option<Spanned<String>>,
    /// Protect with dm-verity (adds the hash partition after this one).
    #[serde(default)]
    pub verity: bool,
    /// 2 for A/B: an empty twin (and verity twin) labelled `_empty` follows.
    pub slots: Option<Spanned<u32>>,
    /// GPT attribute flags: `read-only`, `no-auto`, `grow-fs`.
    #[serde(default)]
    pub flags: Vec<Spanned<String>>,
    /// Upper bound for this partition's filesystem.
    pub budget: Option<Spanned<Size>>,
    /// EROFS compression: `lz4` (default), `lz4hc`, `none`.
    pub compression: Option<Spanned<String>>,
    /// Injectable slots in this filesystem (errors point at the whole `slot` value: serde's
    /// untagged enums cannot carry spans inside).
    pub slot: Option<Spanned<OneOrMany<SlotSection>>>,
}

/// `[policy]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    /// Byte patterns that must appear in no file name or content.
    #[serde(default)]
    pub forbid: Vec<Spanned<String>>,
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    image: ImageSection,
    #[serde(default)]
    source: SourceSection,
    boot: Option<BootSection>,
    #[serde(default, rename = "partition")]
    partitions: Vec<Spanned<PartitionSection>>,
    #[serde(default)]
    policy: PolicySection,
}

/// A filesystem kind a partition can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsKind {
    /// ext4.
    Ext4,
    /// EROFS.
    Erofs,
    /// FAT (type by size).
    Vfat,
    /// No filesystem: the partition is left zeroed (or filled by kiln, e.g. verity hashes).
    None,
}

impl FsKind {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ext4" => FsKind::Ext4,
            "erofs" => FsKind::Erofs,
            "vfat" | "fat" | "fat32" => FsKind::Vfat,
            "none" | "raw" => FsKind::None,
            _ => return None,
        })
    }

    /// Name as written in specs and reports.
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Ext4 => "ext4",
            FsKind::Erofs => "erofs",
            FsKind::Vfat => "vfat",
            FsKind::None => "none",
        }
    }
}

/// EROFS compression choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Uncompressed.
    None,
    /// LZ4 (kernel ≥ 5.4; the default for bootable images).
    Lz4,
    /// LZ4, high-compression encoder.
    Lz4hc,
}

/// A resolved slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// Unique slot name.
    pub name: String,
    /// Path inside the filesystem.
    pub path: String,
    /// Reserved bytes.
    pub capacity: u64,
    /// Host file with the default payload.
    pub default: Option<PathBuf>,
    /// Where it was declared, for later errors.
    pub at: Pos,
}

/// A position in the spec file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pos {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

/// What a partition holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Contents {
    /// Nothing (a zeroed partition, or the ESP filled by the boot stage).
    Empty,
    /// A directory of the source tree (`/` for root).
    Tree(String),
    /// A host directory.
    Host(PathBuf),
}

/// A resolved partition (as declared; A/B twins and verity partitions are added by the layout).
#[derive(Debug, Clone)]
pub struct Partition {
    /// DPS name of the type when it has one (`esp`, `root-x86-64`, ...), else the GUID text.
    pub type_name: String,
    /// Type GUID (RFC byte order).
    pub type_uuid: Uuid,
    /// Explicit label.
    pub label: Option<String>,
    /// Filesystem.
    pub fs: FsKind,
    /// Size rule.
    pub size: PartSize,
    /// Extra free bytes for `auto`.
    pub extra: u64,
    /// What goes in.
    pub contents: Contents,
    /// dm-verity protected.
    pub verity: bool,
    /// 1, or 2 for A/B.
    pub slots: u32,
    /// GPT attribute bits.
    pub flags: u64,
    /// Filesystem size limit.
    pub budget: Option<u64>,
    /// EROFS compression.
    pub compression: Compression,
    /// Injectable slots.
    pub slot: Vec<Slot>,
    /// Where it was declared.
    pub at: Pos,
}

/// Boot settings, resolved.
#[derive(Debug, Clone, Default)]
pub struct Boot {
    /// `None` = auto.
    pub kernel: Option<String>,
    /// User part of the command line.
    pub cmdline: String,
    /// `None` = kiln-init; else a host path.
    pub initrd: Option<PathBuf>,
    /// `None` = auto.
    pub stub: Option<PathBuf>,
    /// Extra modules.
    pub modules: Vec<String>,
    /// Boot-counting tries.
    pub tries: u32,
    /// loader.conf timeout.
    pub timeout: u32,
    /// tmpfs overlays.
    pub overlays: Vec<String>,
}

/// A parsed and validated spec.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The spec file.
    pub file: PathBuf,
    /// Its directory (relative paths resolve against it).
    pub dir: PathBuf,
    /// Image name.
    pub name: String,
    /// Image version.
    pub version: String,
    /// Seed bytes.
    pub seed: Uuid,
    /// Target architecture: partition types, EFI binaries, kernel format, kiln-init build.
    pub arch: Arch,
    /// `SOURCE_DATE_EPOCH` from the spec.
    pub source_date_epoch: Option<i64>,
    /// Whole-image budget.
    pub budget: Option<u64>,
    /// Fixed disk size.
    pub disk_size: Option<u64>,
    /// Lay slot partitions out after the others (`[image] slots_last`, default true).
    pub slots_last: bool,
    /// `[image] layout = "stable"`: ext4 filesystems of fixed size get
    /// [`kiln_formats::ext4::Layout::Stable`].
    pub stable_layout: bool,
    /// Emit a disk image.
    pub disk: bool,
    /// Keep the disk image (false when only `rootfs` asked for one to be laid out).
    pub keep_disk: bool,
    /// Emit the root partition's filesystem as a bare image (`NAME_VERSION.rootfs.FS`): a
    /// microVM's root drive.
    pub rootfs: bool,
    /// Emit a hybrid ISO.
    pub iso: bool,
    /// VM disk containers written from the disk, in output order.
    pub vm_formats: Vec<crate::vmdisk::VmFormat>,
    /// qcow2 cluster compression.
    pub qcow2_compression: Option<kiln_formats::vmdisk::Compression>,
    /// A dynamic VHD instead of a fixed one.
    pub vhd_dynamic: bool,
    /// Source tree path (resolved), if the spec names one.
    pub source: Option<PathBuf>,
    /// Where `[source] tree` is written, for the error when it is missing.
    pub source_at: Option<Pos>,
    /// A host directory laid over the source tree (resolved).
    pub add: Option<PathBuf>,
    /// `[source] service`: the unit to write from a container image's config.
    pub service: Option<String>,
    /// All-root ownership.
    pub all_root: bool,
    /// `[source] keep_zeroes`: all-zero blocks stay data (else they become holes).
    pub keep_zeroes: bool,
    /// Boot settings; `None` builds a disk that is not bootable by itself.
    pub boot: Option<Boot>,
    /// Partitions in disk order.
    pub partitions: Vec<Partition>,
    /// Forbidden patterns.
    pub forbid: Vec<String>,
    /// sha256 of the spec file's bytes (for reports and provenance).
    pub digest: [u8; 32],
}

/// Resolves a DPS type name (with `root`/`usr` as aliases of `arch`'s types, as
/// systemd-repart reads them) or a GUID to (canonical name, type UUID). Unnamed GUIDs keep
/// their text as the name.
pub fn resolve_type(s: &str, arch: Arch) -> Option<(String, Uuid)> {
    let key = match s {
        "root" | "root-verity" | "root-verity-sig" | "usr" | "usr-verity" => {
            let (base, rest) = s.split_once('-').unwrap_or((s, ""));
            if rest.is_empty() {
                format!("{base}-{}", arch.name())
            } else {
                format!("{base}-{}-{rest}", arch.name())
            }
        }
        "generic" | "linux" => "linux-generic".into(),
        other => other.into(),
    };
    let guid = gpt::parse_type(&key)?;
    let name = type_name(&guid)
        .map(str::to_string)
        .unwrap_or_else(|| guid.to_string());
    Some((name, guid))
}

/// The architecture a DPS root or /usr type (or its verity types) is for.
pub fn dps_arch(type_name: &str) -> Option<Arch> {
    let rest = type_name
        .strip_prefix("root-")
        .or_else(|| type_name.strip_prefix("usr-"))?;
    Arch::ALL.iter().copied().find(|a| {
        rest.strip_prefix(a.name())
            .is_some_and(|r| r.is_empty() || r.starts_with('-'))
    })
}

/// The DPS name of a type UUID, if it has one.
pub fn type_name(u: &Uuid) -> Option<&'static str> {
    gpt::type_by_guid(u).map(|t| t.name)
}

/// Line and column (1-based) of byte offset `off` in `text`.
fn line_col(text: &str, off: usize) -> Pos {
    let off = off.min(text.len());
    let before = &text[..off];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map(|i| off - i).unwrap_or(off + 1);
    Pos { line, column: col }
}

/// GPT attribute bits (UEFI, DPS), re-exported under the names specs use.
pub mod attr {
    pub use kiln_formats::gpt::{
        ATTR_GROWFS as GROW_FS, ATTR_NO_AUTO as NO_AUTO, ATTR_READ_ONLY as READ_ONLY,
    };
}

struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Ctx<'_> {
    fn err<T>(&self, span: std::ops::Range<usize>, msg: impl Into<String>) -> Result<T, SpecError> {
        Err(self.error(self.pos(span), msg))
    }

    /// The error at `p`, for a position found earlier (or none, line 0).
    fn error(&self, p: Pos, msg: impl Into<String>) -> SpecError {
        SpecError {
            file: self.file.to_path_buf(),
            line: p.line,
            column: p.column,
            msg: msg.into(),
        }
    }

    fn pos(&self, span: std::ops::Range<usize>) -> Pos {
        line_col(self.text, span.start)
    }
}

/// Checks an image version: letters, digits and `.-~^+`, no `_` (it separates name and version
/// in artifact names and sysupdate patterns).
pub fn check_version(version: &str) -> Result<(), String> {
    if valid_ident(version, ".-~^+") {
        Ok(())
    } else {
        Err(format!("version {version:?}: use letters, digits and .-~^+ (no '_', it separates name and version)"))
    }
}

fn valid_ident(s: &str, allow: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || allow.contains(c))
}

impl Spec {
    /// Reads and validates the spec at `path` (a file, or a directory holding `kiln.toml`).
    pub fn load(path: &Path) -> Result<Spec, SpecError> {
        let file = if path.is_dir() {
            path.join("kiln.toml")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|e| SpecError {
            file: file.clone(),
            line: 0,
            column: 0,
            msg: format!("cannot read spec: {e}"),
        })?;
        Self::parse(&file, &text)
    }

    /// Parses and validates spec text; `file` is used for messages and relative paths.
    ///
    /// The steps run in the order below, and each returns the first error it finds, so a
    /// spec with several mistakes is always reported at the same one.
    pub fn parse(file: &Path, text: &str) -> Result<Spec, SpecError> {
        let cx = Ctx { file, text };
        let raw: RawSpec = toml::from_str(text).map_err(|e| {
            let p = e
                .span()
                .map(|s| line_col(text, s.start))
                .unwrap_or_default();
            cx.error(p, e.message())
        })?;
        let dir = spec_dir(file);

        let img = &raw.image;
        let id = image_identity(&cx, img)?;
        let out = image_outputs(&cx, img)?;
        let source_at = raw.source.tree.as_ref().map(|t| cx.pos(t.span()));
        let source = raw
            .source
            .tree
            .as_ref()
            .map(|t| source_path(&dir, t.get_ref()));
        let service = source_service(&cx, &raw.source)?;
        let (qcow2_compression, vhd_dynamic) = image_vm_options(&cx, img)?;
        let add = source_add(&cx, &raw.source, &dir)?;
        let boot = match &raw.boot {
            None => None,
            Some(b) => Some(boot_section(&cx, b, &dir)?),
        };
        let partitions = partitions(&cx, &raw.partitions, id.arch, &dir)?;
        check_partitions(&cx, &partitions, out.disk)?;
        check_outputs(&cx, img, &out, boot.is_some(), &partitions)?;
        let stable_layout = image_layout(&cx, img, &partitions)?;
        let forbid = policy_forbid(&cx, &raw.policy)?;

        use sha2::Digest;
        Ok(Spec {
            file: file.to_path_buf(),
            dir,
            arch: id.arch,
            name: id.name,
            version: id.version,
            seed: id.seed,
            source_date_epoch: img.source_date_epoch,
            budget: img.budget.as_ref().map(|b| b.get_ref().0),
            disk_size: img.size.as_ref().map(|s| s.get_ref().0),
            slots_last: img.slots_last.unwrap_or(true),
            stable_layout,
            disk: out.disk,
            keep_disk: out.keep_disk,
            rootfs: out.rootfs,
            iso: out.iso,
            vm_formats: out.vm_formats,
            qcow2_compression,
            vhd_dynamic,
            source,
            source_at,
            add,
            service,
            all_root: raw.source.all_root,
            keep_zeroes: raw.source.keep_zeroes,
            boot,
            partitions,
            forbid,
            digest: sha2::Sha256::digest(text.as_bytes()).into(),
        })
    }
}

/// The directory relative paths in the spec resolve against: the file's, or `.`.
fn spec_dir(file: &Path) -> PathBuf {
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        dir
    }
}

/// `[image]` name, version, seed and arch, resolved.
struct Identity {
    name: String,
    version: String,
    seed: Uuid,
    arch: Arch,
}

/// `[image]` name, version, seed and arch.
fn image_identity(cx: &Ctx, img: &ImageSection) -> Result<Identity, SpecError> {
    let name = img.name.get_ref().clone();
    if !valid_ident(&name, ".-") {
        return cx.err(
            img.name.span(),
            format!("image name {name:?}: use letters, digits, '.' and '-'"),
        );
    }
    let version = img.version.get_ref().clone();
    if let Err(e) = check_version(&version) {
        return cx.err(img.version.span(), e);
    }
    let seed = match &img.seed {
        Some(s) => match repart::uuid_from_spec(s.get_ref()) {
            Some(u) => u,
            None => {
                return cx.err(
                    s.span(),
                    format!("seed {:?}: expected 32 hex digits or a UUID", s.get_ref()),
                )
            }
        },
        // Deterministic without a seed: derive one from the name, so two specs with
        // different names never share UUIDs by accident.
        None => repart::derive_uuid(&Uuid::nil(), &format!("kiln-image:{name}")),
    };
    let arch = match &img.arch {
        Some(a) => match Arch::parse(a.get_ref()) {
            Some(arch) => arch,
            None => {
                return cx.err(
                    a.span(),
                    format!(
                        "unknown arch {:?}: expected \"x86-64\" or \"arm64\"",
                        a.get_ref()
                    ),
                )
            }
        },
        None => match Arch::host() {
            Some(a) => a,
            None => {
                return cx.err(
                    img.name.span(),
                    format!(
                        "this machine is {}, which kiln does not build for: set [image] arch = \"x86-64\" or \"arm64\"",
                        std::env::consts::ARCH
                    ),
                )
            }
        },
    };
    Ok(Identity {
        name,
        version,
        seed,
        arch,
    })
}

/// What `[image] output` asks for.
struct Outputs {
    disk: bool,
    keep_disk: bool,
    rootfs: bool,
    iso: bool,
    vm_formats: Vec<crate::vmdisk::VmFormat>,
}

/// `[image] output`: `disk` unless it says otherwise.
fn image_outputs(cx: &Ctx, img: &ImageSection) -> Result<Outputs, SpecError> {
    let (mut disk, mut iso, mut rootfs) = (true, false, false);
    let mut vm_formats = Vec::new();
    if let Some(out) = &img.output {
        disk = false;
        for o in out.get_ref() {
            match o.as_str() {
                "disk" => disk = true,
                "iso" => iso = true,
                "rootfs" => rootfs = true,
                other => match crate::vmdisk::VmFormat::parse(other) {
                    Some(f) => {
                        disk = true;
                        if !vm_formats.contains(&f) {
                            vm_formats.push(f);
                        }
                    }
                    None => {
                        return cx.err(
                            out.span(),
                            format!(
                                "unknown output {other:?}: expected \"disk\", \"iso\", \"rootfs\", \"qcow2\", \"vhd\" or \"vmdk\""
                            ),
                        )
                    }
                },
            }
        }
        if !disk && !iso && !rootfs {
            return cx.err(
                out.span(),
                "output is empty: list \"disk\", \"iso\", \"rootfs\" or several",
            );
        }
    }
    // The rootfs is the root partition of a laid-out disk, copied out; the disk is kept
    // only when asked for.
    Ok(Outputs {
        disk: disk | rootfs,
        keep_disk: disk,
        rootfs,
        iso,
        vm_formats,
    })
}

/// `[image] qcow2_compression` and `vhd_type`: (qcow2 cluster compression, dynamic VHD).
fn image_vm_options(
    cx: &Ctx,
    img: &ImageSection,
) -> Result<(Option<kiln_formats::vmdisk::Compression>, bool), SpecError> {
    let qcow2_compression = match &img.qcow2_compression {
        None => None,
        Some(c) => match crate::vmdisk::parse_compression(c.get_ref()) {
            Ok(c) => Some(c),
            Err(e) => return cx.err(c.span(), format!("qcow2_compression: {e}")),
        },
    };
    let vhd_dynamic = match img.vhd_type.as_ref().map(|t| (t, t.get_ref().as_str())) {
        None | Some((_, "fixed")) => false,
        Some((_, "dynamic")) => true,
        Some((t, other)) => {
            return cx.err(
                t.span(),
                format!("vhd_type {other:?}: expected \"fixed\" or \"dynamic\""),
            )
        }
    };
    Ok((qcow2_compression, vhd_dynamic))
}

/// `[image] layout`: whether ext4 filesystems of fixed size get the stable layout. Other
/// filesystems keep theirs (an auto-sized one follows its content anyway; EROFS has no stable
/// layout), so a spec asking for it without such a partition is refused.
fn image_layout(cx: &Ctx, img: &ImageSection, parts: &[Partition]) -> Result<bool, SpecError> {
    let Some(l) = &img.layout else {
        return Ok(false);
    };
    match l.get_ref().as_str() {
        "packed" => Ok(false),
        "stable" => {
            let any = parts
                .iter()
                .any(|p| p.fs == FsKind::Ext4 && matches!(p.size, PartSize::Fixed(_)));
            if !any {
                return cx.err(
                    l.span(),
                    "layout = \"stable\" applies to ext4 partitions of fixed size, and this image has none (EROFS and auto-sized filesystems keep the packed layout)",
                );
            }
            Ok(true)
        }
        other => cx.err(
            l.span(),
            format!("layout {other:?}: expected \"packed\" or \"stable\""),
        ),
    }
}

/// `[source] service`: a unit name.
fn source_service(cx: &Ctx, src: &SourceSection) -> Result<Option<String>, SpecError> {
    let Some(s) = &src.service else {
        return Ok(None);
    };
    let n = s.get_ref();
    let ok = !n.is_empty()
        && n.len() <= 200
        && !n.starts_with('.')
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b));
    if !ok {
        return cx.err(
            s.span(),
            format!("service: {n:?} is not a unit name (letters, digits, `-_.@`)"),
        );
    }
    Ok(Some(n.clone()))
}

/// `[source] add`: a host directory, resolved against the spec's directory.
fn source_add(cx: &Ctx, src: &SourceSection, dir: &Path) -> Result<Option<PathBuf>, SpecError> {
    let Some(a) = &src.add else {
        return Ok(None);
    };
    let p = dir.join(a.get_ref());
    if !p.is_dir() {
        return cx.err(a.span(), format!("add: {} is not a directory", p.display()));
    }
    Ok(Some(p))
}

/// `[boot]`, with `auto` and `kiln` meaning "kiln chooses" and host paths resolved.
fn boot_section(cx: &Ctx, b: &BootSection, dir: &Path) -> Result<Boot, SpecError> {
    let mut overlays = Vec::new();
    for o in &b.overlays {
        if !o.get_ref().starts_with('/') || o.get_ref().contains("..") {
            return cx.err(
                o.span(),
                format!(
                    "overlay {:?}: expected an absolute path without '..'",
                    o.get_ref()
                ),
            );
        }
        overlays.push(o.get_ref().clone());
    }
    Ok(Boot {
        kernel: b
            .kernel
            .as_ref()
            .map(|k| k.get_ref().clone())
            .filter(|k| k != "auto"),
        cmdline: b
            .cmdline
            .as_ref()
            .map(|c| c.get_ref().clone())
            .unwrap_or_default(),
        initrd: match &b.initrd {
            Some(i) if i.get_ref() != "kiln" => Some(dir.join(i.get_ref())),
            _ => None,
        },
        stub: b
            .stub
            .as_ref()
            .filter(|s| s.get_ref() != "auto")
            .map(|s| dir.join(s.get_ref())),
        modules: b.modules.iter().map(|m| m.get_ref().clone()).collect(),
        tries: b.tries.unwrap_or(3),
        timeout: b.timeout.unwrap_or(0),
        overlays,
    })
}

/// Every `[[partition]]`, in order. Slot names are unique across all of them.
fn partitions(
    cx: &Ctx,
    raw: &[Spanned<PartitionSection>],
    arch: Arch,
    dir: &Path,
) -> Result<Vec<Partition>, SpecError> {
    let mut partitions = Vec::new();
    let mut slot_names: Vec<String> = Vec::new();
    for sp in raw {
        partitions.push(partition(cx, sp, arch, dir, &mut slot_names)?);
    }
    Ok(partitions)
}

/// One `[[partition]]`; `slot_names` holds the slot names taken so far and gains this
/// partition's.
fn partition(
    cx: &Ctx,
    sp: &Spanned<PartitionSection>,
    arch: Arch,
    dir: &Path,
    slot_names: &mut Vec<String>,
) -> Result<Partition, SpecError> {
    let at = cx.pos(sp.span());
    let p = sp.get_ref();
    let Some(t) = &p.type_ else {
        return cx.err(
            sp.span(),
            "partition without `type` (a DPS name like \"root\" or a GUID)",
        );
    };
    let (type_name, type_uuid) = partition_type(cx, t, arch)?;
    let is_root = type_name.starts_with("root-") && !type_name.contains("verity");
    let is_usr = type_name.starts_with("usr-") && !type_name.contains("verity");
    let fs = partition_fs(cx, p, t, &type_name)?;
    let size = p
        .size
        .as_ref()
        .map(|s| *s.get_ref())
        .unwrap_or(PartSize::Auto);
    if let (Some(s), Some(e)) = (&p.size, &p.extra) {
        if matches!(s.get_ref(), PartSize::Fixed(_)) {
            return cx.err(e.span(), "`extra` only applies to `size = \"auto\"`; a fixed size already says how big it is");
        }
    }
    let contents = partition_contents(cx, p, &type_name, dir)?;
    if fs == FsKind::None && contents != Contents::Empty && p.contents.is_some() {
        return cx.err(
            sp.span(),
            "a partition with `fs = \"none\"` cannot have contents",
        );
    }
    if p.verity && !(fs == FsKind::Erofs || fs == FsKind::Ext4) {
        return cx.err(
            sp.span(),
            "`verity = true` needs an ext4 or erofs filesystem",
        );
    }
    if p.verity && !(is_root || is_usr) {
        return cx.err(
            sp.span(),
            format!("`verity = true` is supported on root and usr partitions, not {type_name}"),
        );
    }
    let slots = partition_slots(cx, p, is_root || is_usr)?;
    let flags = partition_flags(cx, p)?;
    let compression = partition_compression(cx, p, fs)?;
    let slot = match &p.slot {
        None => Vec::new(),
        Some(v) => slot_entries(cx, v, p.verity, fs, dir, slot_names)?,
    };
    if let (PartSize::Fixed(sz), Some(b)) = (size, &p.budget) {
        if sz.0 > b.get_ref().0 {
            return cx.err(
                b.span(),
                format!(
                    "fixed size {sz} is larger than the partition's budget {}",
                    b.get_ref()
                ),
            );
        }
    }
    if let Some(l) = &p.label {
        if l.get_ref().encode_utf16().count() > 36 {
            return cx.err(l.span(), "GPT labels hold at most 36 UTF-16 code units");
        }
    }
    Ok(Partition {
        type_name,
        type_uuid,
        label: p.label.as_ref().map(|l| l.get_ref().clone()),
        fs,
        size,
        extra: p.extra.as_ref().map(|e| e.get_ref().0).unwrap_or(0),
        contents,
        verity: p.verity,
        slots,
        flags,
        budget: p.budget.as_ref().map(|b| b.get_ref().0),
        compression,
        slot,
        at,
    })
}

/// A partition's `type`, resolved for `arch`: (canonical name, type UUID). Another
/// architecture's root or usr type and verity types (kiln adds those) are refused.
fn partition_type(cx: &Ctx, t: &Spanned<String>, arch: Arch) -> Result<(String, Uuid), SpecError> {
    let Some((type_name, type_uuid)) = resolve_type(t.get_ref(), arch) else {
        return cx.err(t.span(), format!("unknown partition type {:?}: use a DPS name (esp, root, usr, var, home, swap, linux-generic, ...) or a GUID", t.get_ref()));
    };
    if let Some(other) = dps_arch(&type_name).filter(|a| *a != arch) {
        return cx.err(
            t.span(),
            format!(
                "partition type {type_name} is for {other}, but the image is {arch} ([image] arch); write \"{}\" for the image's own",
                if type_name.starts_with("usr-") { "usr" } else { "root" }
            ),
        );
    }
    if type_name.contains("verity") {
        return cx.err(t.span(), "verity partitions are added by kiln: set `verity = true` on the data partition instead");
    }
    Ok((type_name, type_uuid))
}

/// A partition's `fs`, defaulting by type (vfat for the ESP and XBOOTLDR, none for swap,
/// else ext4); `t` is its `type`, where an ESP error points when `fs` is not written.
fn partition_fs(
    cx: &Ctx,
    p: &PartitionSection,
    t: &Spanned<String>,
    type_name: &str,
) -> Result<FsKind, SpecError> {
    let fs = match &p.fs {
        Some(f) => match FsKind::parse(f.get_ref()) {
            Some(k) => k,
            None => {
                return cx.err(
                    f.span(),
                    format!(
                        "unknown filesystem {:?}: expected ext4, erofs, vfat or none",
                        f.get_ref()
                    ),
                )
            }
        },
        None => match type_name {
            "esp" | "xbootldr" => FsKind::Vfat,
            "swap" => FsKind::None,
            _ => FsKind::Ext4,
        },
    };
    if type_name == "esp" && fs != FsKind::Vfat {
        return cx.err(
            p.fs.as_ref().map(|f| f.span()).unwrap_or(t.span()),
            "an ESP must be vfat",
        );
    }
    Ok(fs)
}

/// A partition's `contents` or `copy`, defaulting by type (`/` for root, `/usr` for usr,
/// `/var`, `/home`; else empty).
fn partition_contents(
    cx: &Ctx,
    p: &PartitionSection,
    type_name: &str,
    dir: &Path,
) -> Result<Contents, SpecError> {
    Ok(match (&p.contents, &p.copy) {
        (Some(a), Some(_)) => return cx.err(a.span(), "give either `contents` (a directory of the source tree) or `copy` (a host directory), not both"),
        (Some(c), None) => {
            let v = c.get_ref();
            if !v.starts_with('/') || v.split('/').any(|x| x == "..") {
                return cx.err(c.span(), format!("contents {v:?}: expected an absolute path in the tree, without '..'"));
            }
            Contents::Tree(v.clone())
        }
        (None, Some(h)) => Contents::Host(dir.join(h.get_ref())),
        (None, None) => match type_name {
            n if n.starts_with("root-") => Contents::Tree("/".into()),
            n if n.starts_with("usr-") => Contents::Tree("/usr".into()),
            "var" => Contents::Tree("/var".into()),
            "home" => Contents::Tree("/home".into()),
            _ => Contents::Empty,
        },
    })
}

/// A partition's `slots`: 1, or 2 (A/B) for a root or usr partition (`root_or_usr`).
fn partition_slots(cx: &Ctx, p: &PartitionSection, root_or_usr: bool) -> Result<u32, SpecError> {
    let slots = p.slots.as_ref().map(|s| *s.get_ref()).unwrap_or(1);
    if let Some(s) = &p.slots {
        if !(1..=2).contains(s.get_ref()) {
            return cx.err(s.span(), "`slots` must be 1 or 2 (A/B)");
        }
        if *s.get_ref() == 2 && !root_or_usr {
            return cx.err(
                s.span(),
                "A/B `slots = 2` is supported on root and usr partitions",
            );
        }
    }
    Ok(slots)
}

/// A partition's GPT attribute bits: its `flags`, plus read-only under verity.
fn partition_flags(cx: &Ctx, p: &PartitionSection) -> Result<u64, SpecError> {
    let mut flags = 0u64;
    for f in &p.flags {
        flags |= match f.get_ref().as_str() {
            "read-only" => attr::READ_ONLY,
            "no-auto" => attr::NO_AUTO,
            "grow-fs" => attr::GROW_FS,
            other => {
                return cx.err(
                    f.span(),
                    format!("unknown flag {other:?}: expected read-only, no-auto or grow-fs"),
                )
            }
        };
    }
    if p.verity {
        flags |= attr::READ_ONLY;
    }
    Ok(flags)
}

/// A partition's `compression` (LZ4 when not written), which only an EROFS one may set.
fn partition_compression(
    cx: &Ctx,
    p: &PartitionSection,
    fs: FsKind,
) -> Result<Compression, SpecError> {
    let Some(c) = &p.compression else {
        return Ok(Compression::Lz4);
    };
    if fs != FsKind::Erofs {
        return cx.err(c.span(), "`compression` applies to erofs partitions");
    }
    match c.get_ref().as_str() {
        "lz4" => Ok(Compression::Lz4),
        "lz4hc" => Ok(Compression::Lz4hc),
        "none" => Ok(Compression::None),
        other => cx.err(
            c.span(),
            format!("unknown compression {other:?}: expected lz4, lz4hc or none"),
        ),
    }
}

/// A partition's `slot` entries; every error points at the whole `slot` value. Each name is
/// checked against, and added to, `slot_names`.
fn slot_entries(
    cx: &Ctx,
    slots_v: &Spanned<OneOrMany<SlotSection>>,
    verity: bool,
    fs: FsKind,
    dir: &Path,
    slot_names: &mut Vec<String>,
) -> Result<Vec<Slot>, SpecError> {
    let span = slots_v.span();
    let mut slot = Vec::new();
    for s in slots_v.get_ref().clone().into_vec() {
        let spath = &s.path;
        if !spath.starts_with('/') || spath.ends_with('/') || spath.split('/').any(|x| x == "..") {
            return cx.err(
                span,
                format!("slot path {spath:?}: expected an absolute file path without '..'"),
            );
        }
        if verity {
            return cx.err(span, "a slot cannot live in a verity-protected partition: its bytes are hashed, so injecting would break verification; put it on its own small partition");
        }
        if !matches!(fs, FsKind::Ext4 | FsKind::Vfat | FsKind::Erofs) {
            return cx.err(
                span,
                format!(
                    "slots need an ext4, vfat or erofs filesystem, not {}",
                    fs.name()
                ),
            );
        }
        let base = spath.rsplit('/').next().unwrap_or_default();
        let sname = s
            .name
            .clone()
            .unwrap_or_else(|| base.split('.').next().unwrap_or(base).to_string());
        if !valid_ident(&sname, "-_.") {
            return cx.err(
                span,
                format!("slot name {sname:?}: use letters, digits, '-', '_' and '.'"),
            );
        }
        if slot_names.contains(&sname) {
            return cx.err(span, format!("duplicate slot name {sname:?}"));
        }
        if s.capacity.0 == 0 {
            return cx.err(span, "slot capacity must be positive");
        }
        slot_names.push(sname.clone());
        slot.push(Slot {
            name: sname,
            path: spath.clone(),
            capacity: s.capacity.0,
            default: s.default.as_ref().map(|d| dir.join(d)),
            at: cx.pos(span.clone()),
        });
    }
    Ok(slot)
}

/// Checks across partitions: a disk has at least one, and no two share a source subtree
/// (that would duplicate files) or a label.
fn check_partitions(cx: &Ctx, partitions: &[Partition], disk: bool) -> Result<(), SpecError> {
    if partitions.is_empty() && disk {
        return cx.err(
            0..0,
            "no [[partition]]: a disk needs at least one (e.g. type = \"root\")",
        );
    }
    for (i, a) in partitions.iter().enumerate() {
        for b in &partitions[..i] {
            if let (Contents::Tree(x), Contents::Tree(y)) = (&a.contents, &b.contents) {
                if x == y {
                    return Err(cx.error(
                        a.at,
                        format!(
                            "contents {x:?} is already the contents of the {} partition at line {}",
                            b.type_name, b.at.line
                        ),
                    ));
                }
            }
        }
        if let Some(l) = &a.label {
            if partitions[..i].iter().any(|b| b.label.as_ref() == Some(l)) {
                return Err(cx.error(a.at, format!("duplicate partition label {l:?}")));
            }
        }
    }
    Ok(())
}

/// Checks of the outputs and `[boot]` against the partitions, and of the image size against
/// its budget.
fn check_outputs(
    cx: &Ctx,
    img: &ImageSection,
    out: &Outputs,
    has_boot: bool,
    partitions: &[Partition],
) -> Result<(), SpecError> {
    if has_boot && out.disk && !partitions.iter().any(|p| p.type_name == "esp") {
        return cx.err(
            0..0,
            "[boot] needs an esp partition for systemd-boot and the UKI",
        );
    }
    if let (true, Some(o)) = (out.rootfs, &img.output) {
        if !partitions.iter().any(|p| p.type_name.starts_with("root-")) {
            return cx.err(
                o.span(),
                "output \"rootfs\" needs a root partition: its filesystem is the rootfs",
            );
        }
    }
    if let (true, false, Some(o)) = (out.iso, has_boot, &img.output) {
        return cx.err(
            o.span(),
            "output \"iso\" needs a [boot] section: the ISO boots the tree's kernel through systemd-boot and kiln's initrd",
        );
    }
    if let (Some(size), Some(budget)) = (&img.size, &img.budget) {
        if size.get_ref().0 > budget.get_ref().0 {
            return cx.err(
                budget.span(),
                format!(
                    "image size {} is larger than its budget {}",
                    size.get_ref(),
                    budget.get_ref()
                ),
            );
        }
    }
    Ok(())
}

/// `[policy] forbid`: patterns, none of them empty.
fn policy_forbid(cx: &Ctx, policy: &PolicySection) -> Result<Vec<String>, SpecError> {
    let forbid = policy
        .forbid
        .iter()
        .map(|f| f.get_ref().clone())
        .collect::<Vec<_>>();
    if let Some(f) = policy.forbid.iter().find(|f| f.get_ref().is_empty()) {
        return cx.err(
            f.span(),
            "an empty forbidden pattern would match everything",
        );
    }
    Ok(forbid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Spec, SpecError> {
        Spec::parse(Path::new("kiln.toml"), text)
    }

    const GOOD: &str = r#"
[image]
name = "notepat-os"
version = "2026.11.22"
seed = "0123456789abcdef0123456789abcdef"
budget = "500M"

[source]
tree = "rootfs"

[boot]
cmdline = "console=ttyS0"

[[partition]]
type = "esp"
size = "64M"

[[partition]]
type = "root"
fs = "erofs"
verity = true
slots = 2

[[partition]]
type = "var"
size = "32M"

[[partition]]
type = "linux-generic"
label = "piece"
size = "20M"
slot = { name = "piece", path = "/piece.html", capacity = "8M" }
"#;

    #[test]
    fn parses_the_example() {
        let s = parse(GOOD).unwrap();
        assert_eq!(s.name, "notepat-os");
        assert_eq!(s.partitions.len(), 4);
        assert_eq!(s.partitions[1].type_name, "root-x86-64");
        assert_eq!(s.partitions[1].slots, 2);
        assert_eq!(s.partitions[1].flags & attr::READ_ONLY, attr::READ_ONLY);
        assert_eq!(s.partitions[2].contents, Contents::Tree("/var".into()));
        assert_eq!(s.partitions[3].slot[0].capacity, 8 << 20);
        assert_eq!(s.budget, Some(500 << 20));
    }

    #[test]
    fn errors_name_line_and_column() {
        let cases: &[(&str, &str, usize)] = &[
            ("[image]\nname = \"a\"\nversion = \"1\"\nbogus = 1\n", "unknown field `bogus`", 4),
            ("[image]\nname = \"a\"\nversion = \"1\"\n[[partition]]\ntype = \"root\"\nsize = \"12Q\"\n", "unknown unit", 6),
            ("[image]\nname = \"a\"\nversion = \"1\"\n[[partition]]\ntype = \"rooot\"\n", "unknown partition type", 5),
            ("[image]\nname = \"a\"\nversion = \"1_2\"\n[[partition]]\ntype = \"root\"\n", "no '_'", 3),
            ("[image]\nname = \"a\"\nversion = \"1\"\n[[partition]]\ntype = \"root\"\nverity = true\nslot = { path = \"/p\", capacity = \"1M\" }\n", "verity-protected", 7),
            ("[image]\nname = \"a\"\nversion = \"1\"\n[[partition]]\ntype = \"root\"\nsize = \"1G\"\nbudget = \"500M\"\n", "budget", 7),
            ("[image]\nname = \"a\"\nversion = \"1\"\n[[partition]]\ntype = \"var\"\nsize = \"1G\"\nextra = \"5M\"\n", "`extra` only applies", 7),
            ("[image]\nname = \"a\"\nversion = \"1\"\nseed = \"xyz\"\n[[partition]]\ntype = \"root\"\n", "32 hex digits", 4),
            ("[image]\nname = \"a\"\nversion = \"1\"\n[[partition]]\ntype = \"root\"\n[[partition]]\ntype = \"linux-generic\"\ncontents = \"/\"\n", "already the contents", 6),
            ("[image]\nname = \"a\"\nversion = \"1\"\noutput = [\"iso\"]\n", "needs a [boot] section", 4),
            ("[image]\nname = \"a\"\nversion = \"1\"\noutput = [\"rootfs\"]\n[[partition]]\ntype = \"var\"\n", "needs a root partition", 4),
            ("[image\n", "", 1),
            ("[image]\nname = \"a\"\nversion = \"1\"\narch = \"riscv64\"\n", "unknown arch", 4),
            ("[image]\nname = \"a\"\nversion = \"1\"\narch = \"arm64\"\n[[partition]]\ntype = \"root-x86-64\"\n", "is for x86-64, but the image is arm64", 6),
            ("[image]\nname = \"a\"\nversion = \"1\"\narch = \"x86-64\"\n[[partition]]\ntype = \"usr-arm64\"\n", "is for arm64, but the image is x86-64", 6),
            ("[image]\nname = \"a\"\nversion = \"1\"\nlayout = \"zigzag\"\n[[partition]]\ntype = \"root\"\n", "expected \"packed\" or \"stable\"", 4),
            ("[image]\nname = \"a\"\nversion = \"1\"\nlayout = \"stable\"\n[[partition]]\ntype = \"root\"\nfs = \"erofs\"\nsize = \"1G\"\n[[partition]]\ntype = \"var\"\nfs = \"ext4\"\n", "applies to ext4 partitions of fixed size", 4),
        ];
        for (text, want, line) in cases {
            let e = parse(text).unwrap_err();
            assert!(e.msg.contains(want), "{text:?}: got {e}");
            assert_eq!(e.line, *line, "{text:?}: got {e}");
            assert!(e.column > 0, "{e}");
        }
    }

    #[test]
    fn stable_layout_is_on_with_a_fixed_size_ext4_partition() {
        let text = "[image]\nname = \"a\"\nversion = \"1\"\nlayout = \"stable\"\n[[partition]]\ntype = \"root\"\nfs = \"ext4\"\nsize = \"1G\"\n";
        assert!(parse(text).unwrap().stable_layout);
        assert!(
            !parse(&text.replace("stable", "packed"))
                .unwrap()
                .stable_layout
        );
        assert!(!parse(GOOD).unwrap().stable_layout);
    }

    #[test]
    fn arch_picks_the_dps_types_of_root_and_usr() {
        let s = parse("[image]\nname = \"a\"\nversion = \"1\"\narch = \"arm64\"\n[[partition]]\ntype = \"usr\"\nverity = true\n[[partition]]\ntype = \"root\"\n").unwrap();
        assert_eq!(s.arch, Arch::Arm64);
        assert_eq!(s.partitions[0].type_name, "usr-arm64");
        assert_eq!(s.partitions[0].type_uuid, gpt::TYPE_USR_ARM64);
        assert_eq!(s.partitions[1].type_name, "root-arm64");
        assert_eq!(s.partitions[1].type_uuid, gpt::TYPE_ROOT_ARM64);
        let s = parse("[image]\nname = \"a\"\nversion = \"1\"\narch = \"amd64\"\n[[partition]]\ntype = \"root\"\n").unwrap();
        assert_eq!(s.arch, Arch::X86_64);
        assert_eq!(s.partitions[0].type_uuid, gpt::TYPE_ROOT_X86_64);
        assert_eq!(dps_arch("root-arm64-verity"), Some(Arch::Arm64));
        assert_eq!(dps_arch("usr-x86-64"), Some(Arch::X86_64));
        assert_eq!(dps_arch("var"), None);
    }

    #[test]
    fn sizes() {
        for (s, v) in [
            ("4096", 4096),
            ("512K", 512 << 10),
            ("128M", 128 << 20),
            ("2G", 2 << 30),
            ("1.5G", 3 << 29),
            ("8MiB", 8 << 20),
        ] {
            assert_eq!(Size::parse(s).unwrap().0, v, "{s}");
        }
        for s in [
            "",
            "M",
            "1X",
            "-1",
            "1.G",
            "99999999999999T",
            "16MB",
            "1gb",
            "4KB",
        ] {
            assert!(Size::parse(s).is_err(), "{s}");
        }
        assert!(Size::parse("16MB")
            .unwrap_err()
            .contains("\"16M\" or \"16MiB\""));
        assert_eq!(Size::parse("100B").unwrap().0, 100);
        assert_eq!(human_size(3 << 29), "1.5 GiB");
    }

    #[test]
    fn the_first_mistake_in_check_order_is_reported() {
        // Each spec has two mistakes; the one checked first is reported, wherever the other
        // one is written.
        const IMG: &str = "[image]\nname = \"a\"\nversion = \"1\"\narch = \"x86-64\"\n";
        let cases: &[(&str, &str, usize)] = &[
            ("budget = \"1G\"\nsize = \"2G\"\n[[partition]]\ntype = \"root\"\nfs = \"vfat\"\nverity = true\n", "needs an ext4 or erofs", 7),
            ("output = [\"bogus\"]\nseed = \"xyz\"\n", "32 hex digits", 6),
            ("output = [\"bogus\"]\nqcow2_compression = \"lz4\"\n", "unknown output", 5),
            ("qcow2_compression = \"lz4\"\n[source]\nservice = \".x\"\n", "not a unit name", 7),
            ("vhd_type = \"sparse\"\n[source]\nadd = \"no-such-dir\"\n", "vhd_type", 5),
            ("[source]\nadd = \"no-such-dir\"\n[boot]\noverlays = [\"etc\"]\n", "not a directory", 6),
            ("[boot]\noverlays = [\"etc\"]\n[[partition]]\ntype = \"rooot\"\n", "overlay", 6),
            ("[[partition]]\ntype = \"root\"\nfs = \"btrfs\"\nslots = 3\n", "unknown filesystem", 7),
            ("[[partition]]\ntype = \"var\"\nflags = [\"bogus\"]\nslots = 2\n", "`slots = 2`", 8),
            ("[[partition]]\ntype = \"var\"\ncompression = \"zstd\"\nflags = [\"x\"]\n", "unknown flag", 8),
            ("[[partition]]\ntype = \"var\"\nlabel = \"l\"\n[[partition]]\ntype = \"home\"\nlabel = \"l\"\nfs = \"none\"\ncontents = \"/home\"\n", "cannot have contents", 8),
            ("output = [\"iso\"]\nsize = \"2G\"\nbudget = \"1G\"\n[[partition]]\ntype = \"root\"\n", "needs a [boot] section", 5),
            ("size = \"2G\"\nbudget = \"1G\"\n[[partition]]\ntype = \"root\"\n[policy]\nforbid = [\"\"]\n", "larger than its budget", 6),
        ];
        for (rest, want, line) in cases {
            let text = format!("{IMG}{rest}");
            let e = parse(&text).unwrap_err();
            assert!(
                e.msg.contains(want) && e.line == *line,
                "{text:?}: want {want:?} at line {line}, got {e}"
            );
        }
    }
}
