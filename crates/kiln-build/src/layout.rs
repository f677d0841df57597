//! Disk layout: the spec's partitions expanded (A/B twins, verity hash partners), sized, aligned
//! to 1 MiB and given systemd-repart's deterministic UUIDs and labels. Pure computation: the
//! filesystems' sizes come in, offsets and identities go out.

use kiln_formats::repart::{self, Uuid};

use crate::spec::{self, FsKind, PartSize, Spec};

/// Partition alignment and the gap before the first partition (room for the GPT and kiln's
/// slot table at byte 24576).
pub const ALIGN: u64 = 1 << 20;

/// 512-byte logical sectors.
pub const SECTOR: u64 = 512;

/// Label of an A/B twin that holds nothing yet (systemd-sysupdate's convention).
pub const EMPTY_LABEL: &str = "_empty";

/// What a laid-out partition is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Holds the spec partition's filesystem.
    Data,
    /// The dm-verity hash device of the partition at `of` (an index into the layout).
    Verity {
        /// Index of the data partition in [`Layout::parts`].
        of: usize,
    },
    /// The empty B twin of an A/B data partition.
    EmptyTwin,
    /// The empty B twin of a verity partition.
    EmptyVerityTwin,
}

impl Role {
    /// The role's name in reports: `data`, `verity`, `empty-twin`, `empty-verity-twin` (the
    /// data partition of a verity one is in the report's `verity` list).
    pub fn name(&self) -> &'static str {
        match self {
            Role::Data => "data",
            Role::Verity { .. } => "verity",
            Role::EmptyTwin => "empty-twin",
            Role::EmptyVerityTwin => "empty-verity-twin",
        }
    }

    /// Serializes the role as [`Role::name`].
    pub fn serialize_name<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// One GPT entry to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    /// Index of the spec partition this comes from.
    pub spec: usize,
    /// Role.
    pub role: Role,
    /// DPS type name (or GUID text).
    pub type_name: String,
    /// Type GUID (RFC order).
    pub type_uuid: Uuid,
    /// GPT name.
    pub label: String,
    /// Partition UUID. For verity data/hash partitions this is provisional until the root hash
    /// is known ([`Layout::set_root_hash`]).
    pub uuid: Uuid,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
    /// GPT attribute bits.
    pub flags: u64,
}

/// The whole disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Disk GUID.
    pub disk_uuid: Uuid,
    /// Partitions in GPT order.
    pub parts: Vec<Part>,
    /// The order they lie on the disk, as indices into `parts` (see [`placement_order`]).
    pub order: Vec<usize>,
    /// Total disk size in bytes.
    pub disk_size: u64,
}

/// Why a layout cannot be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutError {
    /// Spec partition index at fault, if any.
    pub spec: Option<usize>,
    /// Message.
    pub msg: String,
}

impl std::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for LayoutError {}

/// Rounds up to a multiple of `a` (a power of two).
pub fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Size in bytes of a dm-verity hash device (superblock + tree) for `data_size` bytes of data
/// with 4096-byte blocks and sha256 (SPECS.md: 128 digests per hash block).
pub fn verity_hash_size(data_size: u64) -> u64 {
    let blocks = data_size.div_ceil(4096);
    let mut total = 1; // superblock block
    let mut level = blocks;
    while level > 1 {
        level = level.div_ceil(128);
        total += level;
    }
    if blocks == 1 {
        total += 1;
    }
    total * 4096
}

/// Sizes the filesystems need, as the build planned them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FsSize {
    /// Bytes the partition's contents need (0 for empty partitions).
    pub bytes: u64,
    /// True when `bytes` is an upper bound rather than the size (a compressed EROFS plan
    /// reserves the uncompressed size). Budgets are not judged on an upper bound: the build
    /// judges them on the written size instead.
    pub upper_bound: bool,
}

impl FsSize {
    /// A size known exactly.
    pub fn exact(bytes: u64) -> Self {
        Self {
            bytes,
            upper_bound: false,
        }
    }
}

/// Lays out the disk for `spec` given the planned size of each spec partition's contents.
/// `machine_id`, when the tree has one, keys the `/var` partition UUID the way systemd's
/// gpt-auto-generator expects.
pub fn layout(
    spec: &Spec,
    sizes: &[FsSize],
    machine_id: Option<&Uuid>,
) -> Result<Layout, LayoutError> {
    assert_eq!(
        sizes.len(),
        spec.partitions.len(),
        "one size per spec partition"
    );
    let mut ex = Expansion {
        seed: &spec.seed,
        name_version: format!("{}_{}", spec.name, spec.version),
        seen: Vec::new(),
        parts: Vec::new(),
    };
    for (i, p) in spec.partitions.iter().enumerate() {
        let size = partition_size(i, p, sizes[i])?;
        ex.expand(i, p, size, machine_id);
    }
    let mut parts = ex.parts;
    if parts.len() > 128 {
        return Err(LayoutError {
            spec: None,
            msg: format!("{} partitions: a GPT holds at most 128", parts.len()),
        });
    }

    let order = placement_order(spec, &parts);
    let off = place(&mut parts, &order);
    let disk_size = disk_size(spec, sizes, off)?;
    Ok(Layout {
        disk_uuid: repart::disk_uuid(&spec.seed),
        parts,
        order,
        disk_size,
    })
}

/// The aligned size of spec partition `i`, `p`, whose contents need `fs`: its fixed size, which
/// they must fit, or `auto`'s. Contents over the partition's budget are refused unless `fs` is
/// only an upper bound.
fn partition_size(i: usize, p: &spec::Partition, fs: FsSize) -> Result<u64, LayoutError> {
    let need = fs.bytes;
    let size = match p.size {
        PartSize::Fixed(s) => {
            let s = align_up(s.0, ALIGN);
            if need > s {
                let (is, needs) = (spec::human_size(s), spec::human_size(need));
                let what = format!("is {is} but its contents need {needs}");
                return Err(partition_error(i, p, what));
            }
            s
        }
        PartSize::Auto => align_up(need.max(1), ALIGN),
    };
    if let Some(b) = p.budget.filter(|_| !fs.upper_bound) {
        if need > b {
            let (needs, budget) = (spec::human_size(need), spec::human_size(b));
            let what = format!("needs {needs}, over its budget of {budget}");
            return Err(partition_error(i, p, what));
        }
    }
    Ok(size)
}

/// An error about spec partition `i`, `p`, named by its label (or type) and line: `what` says
/// what is wrong.
fn partition_error(i: usize, p: &spec::Partition, what: String) -> LayoutError {
    LayoutError {
        spec: Some(i),
        msg: format!(
            "partition {} (line {}) {what}",
            p.label.as_deref().unwrap_or(&p.type_name),
            p.at.line
        ),
    }
}

/// The spec partitions expanded into GPT entries so far, with what naming them needs.
struct Expansion<'a> {
    /// The image seed every partition UUID derives from.
    seed: &'a Uuid,
    /// `NAME_VERSION`, the label of an A/B partition in use.
    name_version: String,
    /// k per type UUID, in disk order (systemd-repart counts earlier partitions of the same
    /// type).
    seen: Vec<(Uuid, u64)>,
    /// The GPT entries, in order.
    parts: Vec<Part>,
}

impl Expansion<'_> {
    /// The next k for type `t`: 0 for its first partition, then 1, 2, ...
    fn next_k(&mut self, t: &Uuid) -> u64 {
        match self.seen.iter_mut().find(|(u, _)| u == t) {
            Some((_, k)) => {
                *k += 1;
                *k
            }
            None => {
                self.seen.push((*t, 0));
                0
            }
        }
    }

    /// Appends spec partition `i`, `p`, of `size` bytes: its data partition, then its verity
    /// partner, then for A/B the empty twin of each.
    fn expand(&mut self, i: usize, p: &spec::Partition, size: u64, machine_id: Option<&Uuid>) {
        let ab = p.slots == 2;
        let type_k = self.next_k(&p.type_uuid);
        let default_label = if ab {
            self.name_version.clone()
        } else {
            repart::label(&p.type_name, type_k)
        };
        let label = p.label.clone().unwrap_or(default_label);
        let mut uuid = repart::partition_uuid(self.seed, &p.type_uuid, type_k);
        if p.type_name == "var" && type_k == 0 {
            if let Some(mid) = machine_id {
                uuid = repart::partition_uuid(mid, &p.type_uuid, 0);
            }
        }
        let data_index = self.parts.len();
        self.parts.push(Part {
            spec: i,
            role: Role::Data,
            type_name: p.type_name.clone(),
            type_uuid: p.type_uuid,
            label,
            uuid,
            offset: 0,
            size,
            flags: p.flags,
        });
        let verity_type = if p.verity {
            Some(verity_type_of(&p.type_name))
        } else {
            None
        };
        if let Some(vtype) = &verity_type {
            let vlabel = ab.then(|| self.name_version.clone());
            self.push_verity(i, Role::Verity { of: data_index }, vtype, vlabel, size);
        }
        if ab {
            let k = self.next_k(&p.type_uuid);
            self.parts.push(Part {
                spec: i,
                role: Role::EmptyTwin,
                type_name: p.type_name.clone(),
                type_uuid: p.type_uuid,
                label: EMPTY_LABEL.into(),
                uuid: repart::partition_uuid(self.seed, &p.type_uuid, k),
                offset: 0,
                size,
                flags: p.flags,
            });
            if let Some(vtype) = &verity_type {
                let vlabel = Some(EMPTY_LABEL.into());
                self.push_verity(i, Role::EmptyVerityTwin, vtype, vlabel, size);
            }
        }
    }

    /// Appends the verity hash partition (`role`, of type `vtype`) for `data_size` bytes of
    /// data, labelled `label` or else systemd-repart's default for its type.
    fn push_verity(
        &mut self,
        i: usize,
        role: Role,
        (vname, vuuid): &(String, Uuid),
        label: Option<String>,
        data_size: u64,
    ) {
        let vk = self.next_k(vuuid);
        let label = label.unwrap_or_else(|| repart::label(vname, vk));
        self.parts.push(Part {
            spec: i,
            role,
            type_name: vname.clone(),
            type_uuid: *vuuid,
            label,
            uuid: repart::partition_uuid(self.seed, vuuid, vk),
            offset: 0,
            size: align_up(verity_hash_size(data_size), ALIGN),
            flags: spec::attr::READ_ONLY,
        });
    }
}

/// The disk size for partitions ending at `off`: `[image] size` when they fit in it, else
/// the smallest aligned size with room for the backup GPT; refused over the image budget
/// unless some `sizes` are only upper bounds.
fn disk_size(spec: &Spec, sizes: &[FsSize], off: u64) -> Result<u64, LayoutError> {
    // Room for the backup GPT (33 sectors), keeping the disk size a multiple of the alignment.
    let min_disk = off + 33 * SECTOR;
    let disk_size = match spec.disk_size {
        Some(s) if s < min_disk => {
            return Err(LayoutError {
                spec: None,
                msg: format!(
                    "the partitions need {} but [image] size is {}",
                    spec::human_size(min_disk),
                    spec::human_size(s)
                ),
            })
        }
        Some(s) => align_up(s, SECTOR),
        None => align_up(min_disk, ALIGN),
    };
    // With a compressed filesystem the disk size here is an upper bound; the build checks the
    // image budget again on the written disk.
    let estimated = sizes.iter().any(|s| s.upper_bound);
    if let Some(b) = spec.budget.filter(|_| !estimated) {
        if disk_size > b {
            return Err(LayoutError {
                spec: None,
                msg: format!(
                    "the disk image is {}, over the image budget of {}",
                    spec::human_size(disk_size),
                    spec::human_size(b)
                ),
            });
        }
    }
    Ok(disk_size)
}

/// The order partitions are placed on the disk, as indices into `parts` (which stay in spec
/// order in the GPT, so partition numbers, labels and systemd-repart's UUIDs do not change).
///
/// With `slots_last` (the default), partitions holding slots go after the others: the bytes
/// from a slot's first patchable byte to the end of the disk are all `kiln serve` has to hash
/// for a personalised image's plain sha256 (the base's SHA-256 state before them is stored),
/// so that tail should be a few MiB, not the root and its A/B twin. A partition with the
/// grow-fs flag stays last all the same, because it can only grow into the end of the disk.
///
/// A spec partition moves with everything it expands to (verity partner, A/B twins), so a
/// hash partition still follows its data, which the build writes first.
pub fn placement_order(spec: &Spec, parts: &[Part]) -> Vec<usize> {
    let rank = |p: &Part| -> u8 {
        let sp = &spec.partitions[p.spec];
        if !spec.slots_last {
            0
        } else if sp.flags & spec::attr::GROW_FS != 0 {
            2
        } else if !sp.slot.is_empty() {
            1
        } else {
            0
        }
    };
    let mut order: Vec<usize> = (0..parts.len()).collect();
    order.sort_by_key(|&i| rank(&parts[i]));
    order
}

/// Gives `parts` contiguous offsets from [`ALIGN`] on, in `order`; returns the end.
fn place(parts: &mut [Part], order: &[usize]) -> u64 {
    let mut off = ALIGN;
    for &i in order {
        parts[i].offset = off;
        off += parts[i].size;
    }
    off
}

/// The verity hash partition type for a data partition type.
fn verity_type_of(type_name: &str) -> (String, Uuid) {
    let name = format!("{type_name}-verity");
    let arch = spec::dps_arch(type_name).unwrap_or(kiln_formats::arch::Arch::X86_64);
    let (n, u) = spec::resolve_type(&name, arch).unwrap_or_else(|| {
        // Data types without a DPS verity type are refused by the spec parser.
        unreachable!("no verity type for {type_name}")
    });
    (n, u)
}

impl Layout {
    /// Recomputes the offsets from the sizes, in disk order.
    pub fn place(&mut self) {
        place(&mut self.parts, &self.order);
    }

    /// Sets the UUIDs of a verity pair from its root hash (data = first 16 bytes, hash = last
    /// 16, raw — SPECS.md), the way systemd finds them.
    pub fn set_root_hash(&mut self, data_index: usize, root_hash: &[u8; 32]) {
        let mut a = [0u8; 16];
        let mut b = [0u8; 16];
        a.copy_from_slice(&root_hash[..16]);
        b.copy_from_slice(&root_hash[16..]);
        self.parts[data_index].uuid = Uuid::from_bytes(a);
        if let Some(v) = self
            .parts
            .iter_mut()
            .find(|p| p.role == Role::Verity { of: data_index })
        {
            v.uuid = Uuid::from_bytes(b);
        }
    }

    /// The verity partner of the data partition at `data_index`.
    pub fn verity_of(&self, data_index: usize) -> Option<usize> {
        self.parts
            .iter()
            .position(|p| p.role == Role::Verity { of: data_index })
    }
}

/// True when `fs` is written by kiln into the partition (as opposed to left empty).
pub fn has_filesystem(fs: FsKind) -> bool {
    fs != FsKind::None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn spec(text: &str) -> Spec {
        Spec::parse(Path::new("kiln.toml"), text).unwrap()
    }

    const AB: &str = r#"
[image]
name = "os"
version = "1.0"
seed = "0123456789abcdef0123456789abcdef"
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
"#;

    #[test]
    fn ab_verity_expansion_order_labels_and_uuids() {
        let s = spec(AB);
        let l = layout(
            &s,
            &[
                FsSize::exact(1 << 20),
                FsSize::exact(300 << 20),
                FsSize::exact(0),
            ],
            None,
        )
        .unwrap();
        let names: Vec<_> = l
            .parts
            .iter()
            .map(|p| (p.type_name.as_str(), p.label.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("esp", "esp"),
                ("root-x86-64", "os_1.0"),
                ("root-x86-64-verity", "os_1.0"),
                ("root-x86-64", "_empty"),
                ("root-x86-64-verity", "_empty"),
                ("var", "var"),
            ]
        );
        // The B twin is the second partition of its type: k = 1.
        let root = Uuid::try_parse("4f68bce3-e8cd-4db1-96e7-fbcaf984b709").unwrap();
        assert_eq!(l.parts[3].uuid, repart::partition_uuid(&s.seed, &root, 1));
        assert_eq!(l.parts[1].size, l.parts[3].size);
        assert_eq!(l.parts[0].offset, ALIGN);
        for w in l.parts.windows(2) {
            assert_eq!(w[0].offset + w[0].size, w[1].offset, "contiguous, aligned");
            assert_eq!(w[1].offset % ALIGN, 0);
        }
        assert!(l.disk_size >= l.parts[5].offset + l.parts[5].size + 33 * 512);
        let mut l2 = l.clone();
        let h: [u8; 32] = std::array::from_fn(|i| i as u8);
        l2.set_root_hash(1, &h);
        assert_eq!(l2.parts[1].uuid.as_bytes(), &h[..16]);
        assert_eq!(l2.parts[2].uuid.as_bytes(), &h[16..]);
    }

    #[test]
    fn var_uuid_follows_machine_id() {
        let s = spec(AB);
        let mid = Uuid::from_bytes([7u8; 16]);
        let l = layout(
            &s,
            &[FsSize::exact(0), FsSize::exact(1 << 20), FsSize::exact(0)],
            Some(&mid),
        )
        .unwrap();
        let var = Uuid::try_parse("4d21b016-b534-45c2-a9fb-5c16e091fd2d").unwrap();
        assert_eq!(l.parts[5].uuid, repart::partition_uuid(&mid, &var, 0));
    }

    #[test]
    fn fixed_too_small_and_budgets_fail_with_line() {
        let s = spec(AB);
        let e = layout(
            &s,
            &[FsSize::exact(65 << 20), FsSize::exact(1), FsSize::exact(0)],
            None,
        )
        .unwrap_err();
        assert!(e.msg.contains("line 6") && e.msg.contains("need"), "{e}");
        let s = spec(&AB.replace("version = \"1.0\"", "version = \"1.0\"\nbudget = \"100M\""));
        let e = layout(
            &s,
            &[FsSize::exact(0), FsSize::exact(200 << 20), FsSize::exact(0)],
            None,
        )
        .unwrap_err();
        assert!(e.msg.contains("budget"), "{e}");
    }

    const SLOT_FIRST: &str = r#"
[image]
name = "kiosk"
version = "1"
seed = "0123456789abcdef0123456789abcdef"
[[partition]]
type = "esp"
size = "64M"
[[partition]]
type = "linux-generic"
label = "piece"
fs = "ext4"
size = "8M"
slot = { name = "piece", path = "/piece.html", capacity = "1M" }
[[partition]]
type = "root"
fs = "erofs"
verity = true
slots = 2
[[partition]]
type = "var"
size = "32M"
flags = ["grow-fs"]
"#;

    #[test]
    fn slot_partitions_are_placed_after_the_others_but_before_grow_fs() {
        let sizes = [
            FsSize::exact(1 << 20),
            FsSize::exact(1 << 20),
            FsSize::exact(300 << 20),
            FsSize::exact(0),
        ];
        let s = spec(SLOT_FIRST);
        let l = layout(&s, &sizes, None).unwrap();
        // The GPT keeps the spec's order (and with it the labels and UUIDs) ...
        let labels: Vec<_> = l.parts.iter().map(|p| p.label.as_str()).collect();
        assert_eq!(
            labels,
            ["esp", "piece", "kiosk_1", "kiosk_1", "_empty", "_empty", "var"]
        );
        // ... while on disk the slot partition follows the root pair and precedes grow-fs /var.
        let mut by_offset: Vec<_> = l.parts.iter().collect();
        by_offset.sort_by_key(|p| p.offset);
        let placed: Vec<_> = by_offset
            .iter()
            .map(|p| (p.type_name.as_str(), p.label.as_str()))
            .collect();
        assert_eq!(
            placed,
            [
                ("esp", "esp"),
                ("root-x86-64", "kiosk_1"),
                ("root-x86-64-verity", "kiosk_1"),
                ("root-x86-64", "_empty"),
                ("root-x86-64-verity", "_empty"),
                ("linux-generic", "piece"),
                ("var", "var"),
            ]
        );
        for w in by_offset.windows(2) {
            assert_eq!(w[0].offset + w[0].size, w[1].offset, "contiguous, aligned");
        }
        let piece = &l.parts[1];
        let tail = l.disk_size - piece.offset;
        assert_eq!(
            tail,
            piece.size + (32 << 20) + ALIGN,
            "slot + /var + GPT room"
        );
        let same_ids = layout(
            &spec(&SLOT_FIRST.replace("version = \"1\"", "version = \"1\"\nslots_last = false")),
            &sizes,
            None,
        )
        .unwrap();
        // Opting out gives the spec order on disk; identities do not depend on placement.
        assert_eq!(
            same_ids.parts[1].offset,
            l.parts[0].offset + l.parts[0].size
        );
        for (a, b) in l.parts.iter().zip(&same_ids.parts) {
            assert_eq!((a.uuid, &a.label, a.size), (b.uuid, &b.label, b.size));
        }
    }

    #[test]
    fn verity_sizes_match_specs_example() {
        // SPECS.md: 300 data blocks -> 2 levels -> 5 hash-device blocks.
        assert_eq!(verity_hash_size(300 * 4096), 5 * 4096);
        assert_eq!(verity_hash_size(128 * 4096), 2 * 4096);
        assert_eq!(verity_hash_size(129 * 4096), 4 * 4096);
    }
}
