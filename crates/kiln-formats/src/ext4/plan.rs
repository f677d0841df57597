//! Planning: inode numbers, every block's position, and the filesystem size, decided before
//! a byte is written (so the same plan answers "how big is it").

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use super::alloc::{reserved_blocks, Allocator, Full};
use super::dir::{self, Ent, HashParams};
use super::extent::{tree_blocks, Ext};
use super::hash::seed_words;
use super::layout::*;
use super::xattr::{self, DiskXattr};
use super::{csum, Error, Layout, Options, Result, Size, SlotLocation};
use crate::fstree::{DataRef, FileData, NodeId, NodeKind, Segment, Tree, ROOT};

/// What an inode number stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Src {
    /// A reserved inode with no content (1, 3..=7, 9, 10; 8 without a journal).
    Reserved,
    /// A tree node.
    Node(NodeId),
    /// The synthesized `/lost+found`.
    LostFound,
    /// The journal (inode 8).
    Journal,
    /// An unused inode below the highest one in use (stable layouts): all zero, its bitmap
    /// bit clear.
    Free,
}

/// Per-inode layout.
#[derive(Clone, Debug)]
pub(crate) struct Ino {
    pub src: Src,
    /// Range of this inode's mapping in [`Plan::extents`].
    pub ext_start: u32,
    pub ext_count: u32,
    /// First extent tree block (when more than 4 extents).
    pub tree_block: u64,
    /// Index + 1 into [`Plan::xblocks`] (0: none).
    pub xattr: u32,
    /// Directory is hash-indexed.
    pub indexed: bool,
    /// Directories: the parent's inode number.
    pub parent: u32,
    /// Data already written by a stream.
    pub preplaced: bool,
}

impl Ino {
    fn new(src: Src) -> Self {
        Self {
            src,
            ext_start: 0,
            ext_count: 0,
            tree_block: 0,
            xattr: 0,
            indexed: false,
            parent: 0,
            preplaced: false,
        }
    }
}

/// An extended attribute block shared by every inode with the same block attributes.
#[derive(Clone, Debug)]
pub(crate) struct XBlock {
    pub block: u64,
    pub attrs: Vec<DiskXattr>,
    pub refs: u32,
}

/// Data placed before planning (by a stream) plus the allocator state after it.
#[derive(Clone, Debug)]
pub(crate) struct DataState {
    pub alloc: Allocator,
    pub extents: Vec<Ext>,
    /// Per placement index: range in `extents`, or `None` once discarded.
    pub placed: Vec<Option<(u32, u32)>>,
}

impl DataState {
    pub fn new(limit: u64) -> Self {
        Self {
            alloc: Allocator::new(limit),
            extents: Vec::new(),
            placed: Vec::new(),
        }
    }
}

/// A complete layout: every inode number and block position, and the filesystem size.
#[derive(Clone, Debug)]
pub struct Plan {
    pub(crate) opts: Options,
    pub(crate) blocks: u64,
    pub(crate) groups: u64,
    pub(crate) ipg: u32,
    /// `inodes[i]` describes inode `i + 1`; its length is the highest inode number in use.
    pub(crate) inodes: Vec<Ino>,
    pub(crate) node_ino: Vec<u32>,
    pub(crate) links: Vec<u32>,
    pub(crate) extents: Vec<Ext>,
    pub(crate) xblocks: Vec<XBlock>,
    pub(crate) block_bitmap_at: Vec<u64>,
    pub(crate) inode_bitmap_at: Vec<u64>,
    pub(crate) itable_at: Vec<u64>,
    pub(crate) used: Vec<(u64, u64)>,
    pub(crate) slots: Vec<SlotLocation>,
    pub(crate) hp: HashParams,
    pub(crate) fs_seed: u32,
    /// Inode of `/lost+found` and whether kiln synthesized it.
    pub(crate) lost_found: Option<(u32, bool)>,
}

/// Plans `tree` with `opts`.
pub fn plan(tree: &Tree, opts: &Options) -> Result<Plan> {
    let limit = limit_blocks(opts)?;
    plan_with(tree, opts, DataState::new(limit))
}

/// The allocator limit for a size policy.
pub(crate) fn limit_blocks(opts: &Options) -> Result<u64> {
    match opts.size {
        Size::Fixed(bytes) => Ok(fixed_blocks(bytes)?),
        // 2^48 blocks is the extent format's physical limit.
        Size::Minimize { .. } => Ok(1 << 48),
    }
}

/// Blocks of a fixed-size filesystem: whole blocks, dropping a last group too small to hold
/// its own fixed metadata.
pub(crate) fn fixed_blocks(bytes: u64) -> Result<u64> {
    let mut t = bytes / BLOCK_SIZE;
    let g = t.div_ceil(BLOCKS_PER_GROUP);
    if g > 0 {
        let rem = t - (g - 1) * BLOCKS_PER_GROUP;
        if rem <= reserved_blocks(g - 1) {
            t = (g - 1) * BLOCKS_PER_GROUP;
        }
    }
    if t < 64 {
        return Err(Error::BadSize {
            size: bytes,
            reason: "smaller than the 256 KiB minimum",
        });
    }
    Ok(t)
}

/// Makes sure the last group of a `t`-block filesystem holds all its fixed metadata plus a
/// block, growing `t` if needed.
fn normalize_total(t: u64) -> u64 {
    let g = t.div_ceil(BLOCKS_PER_GROUP).max(1);
    let start = (g - 1) * BLOCKS_PER_GROUP;
    let min = start + reserved_blocks(g - 1) + 1;
    t.max(min)
}

/// mke2fs's default journal size for a filesystem of `blocks` 4 KiB blocks
/// (e2fsprogs `ext2fs_default_journal_size`), never below jbd2's 1024-block minimum.
pub(crate) fn journal_blocks(blocks: u64) -> u64 {
    match blocks {
        b if b < 32768 => 1024,
        b if b < 256 * 1024 => 4096,
        b if b < 512 * 1024 => 8192,
        b if b < 4096 * 1024 => 16384,
        b if b < 8192 * 1024 => 32768,
        b if b < 16384 * 1024 => 65536,
        b if b < 32768 * 1024 => 131072,
        _ => 262144,
    }
}

/// Path of `node` for messages (a walk; only called on errors).
pub(crate) fn path_of(tree: &Tree, node: NodeId) -> String {
    let mut found = None;
    tree.walk_paths(|p, id| {
        if id == node && found.is_none() {
            found = Some(String::from_utf8_lossy(p).into_owned());
        }
    });
    found.unwrap_or_else(|| format!("<node {node}>"))
}

/// Largest file ext4 holds with 4 KiB blocks: extents address 32-bit logical blocks, so the
/// last byte is in block 2^32 - 2 (the kernel's `ext4_max_size` for extent-mapped files).
pub const MAX_FILE_SIZE: u64 = ((1 << 32) - 1) * BLOCK_SIZE;

/// Logical block runs `(first, count)` holding a file's data runs, merged and sorted. A size
/// over [`MAX_FILE_SIZE`] is refused here, before any block of the file is allocated or written.
pub(crate) fn block_runs(fd: &FileData) -> std::result::Result<Vec<(u64, u64)>, String> {
    if fd.size > MAX_FILE_SIZE {
        return Err(format!(
            "file size {} bytes exceeds ext4's limit of {MAX_FILE_SIZE} bytes per file (2^32 - 1 blocks of 4 KiB)",
            fd.size
        ));
    }
    let one;
    let segs: &[Segment] = match &fd.segments {
        Some(s) => s,
        None if fd.size == 0 => &[],
        None => {
            one = [Segment {
                offset: 0,
                len: fd.size,
            }];
            &one
        }
    };
    let mut runs: Vec<(u64, u64)> = Vec::with_capacity(segs.len());
    let mut prev_end = 0u64;
    for s in segs {
        if s.len == 0 {
            continue;
        }
        let end = s
            .offset
            .checked_add(s.len)
            .filter(|&e| e <= fd.size)
            .ok_or_else(|| {
                format!(
                    "data run at {} of {} bytes lies past the file size {}",
                    s.offset, s.len, fd.size
                )
            })?;
        if s.offset < prev_end {
            return Err(format!(
                "data runs overlap or are out of order at byte {}",
                s.offset
            ));
        }
        prev_end = end;
        let b0 = s.offset / BLOCK_SIZE;
        let b1 = end.div_ceil(BLOCK_SIZE);
        match runs.last_mut() {
            Some(r) if r.0 + r.1 >= b0 => r.1 = b1.max(r.0 + r.1) - r.0,
            _ => runs.push((b0, b1 - b0)),
        }
    }
    if let Some(r) = runs.last() {
        if r.0 + r.1 > u64::from(u32::MAX) {
            return Err(format!(
                "file of {} bytes is larger than ext4's 16 TiB limit for 4 KiB blocks",
                fd.size
            ));
        }
    }
    Ok(runs)
}

/// Allocates a file's data runs, appending extents. Returns the extent range.
pub(crate) fn alloc_runs(
    alloc: &mut Allocator,
    runs: &[(u64, u64)],
    extents: &mut Vec<Ext>,
) -> std::result::Result<(u32, u32), Full> {
    let start = extents.len();
    for &(lb, nb) in runs {
        append_run(alloc, extents, start, lb, nb, &mut |_, _, _| {})?;
    }
    Ok((start as u32, (extents.len() - start) as u32))
}

/// Allocates `nb` blocks for logical blocks `lb..lb + nb` of the file whose extents start at
/// `extents[first]`, extending its last extent when logically and physically contiguous (up to
/// the extent length limit). `placed(lblk, pblk, n)` learns where each piece went. Streams call
/// it piece by piece as data arrives; [`alloc_runs`] once per run: both give the same extents.
pub(crate) fn append_run(
    alloc: &mut Allocator,
    extents: &mut Vec<Ext>,
    first: usize,
    lb: u64,
    nb: u64,
    placed: &mut dyn FnMut(u64, u64, u64),
) -> std::result::Result<(), Full> {
    let max = u64::from(EXT_INIT_MAX_LEN);
    let mut l = lb;
    let mut left = nb;
    while left > 0 {
        let p0 = alloc.next_start();
        let extend = extents.len() > first
            && extents.last().is_some_and(|e| {
                u64::from(e.lblk) + u64::from(e.len) == l
                    && e.pblk + u64::from(e.len) == p0
                    && u64::from(e.len) < max
            });
        if extend {
            let room = extents.last().map_or(0, |e| max - u64::from(e.len));
            let (p, n) = alloc.run(left.min(room))?;
            if let Some(e) = extents.last_mut() {
                e.len += n as u32;
            }
            placed(l, p, n);
            l += n;
            left -= n;
        } else {
            let (p, n) = alloc.run(left.min(max))?;
            extents.push(Ext {
                lblk: l as u32,
                len: n as u32,
                pblk: p,
                unwritten: false,
            });
            placed(l, p, n);
            l += n;
            left -= n;
        }
    }
    Ok(())
}

/// The extents of a slot of `cap` blocks at `pblk` holding `data` initialized blocks: the
/// data as initialized extents, the rest of the reservation as unwritten ones.
pub fn slot_extents(pblk: u64, cap: u64, data: u64) -> Vec<Ext> {
    let mut out = Vec::new();
    let mut l = 0u64;
    while l < cap {
        let unwritten = l >= data;
        let max = if unwritten {
            EXT_UNWRITTEN_MAX_LEN
        } else {
            EXT_INIT_MAX_LEN
        };
        let end = if unwritten { cap } else { data };
        let n = (end - l).min(u64::from(max));
        out.push(Ext {
            lblk: l as u32,
            len: n as u32,
            pblk: pblk + l,
            unwritten,
        });
        l += n;
    }
    out
}

/// Largest slot, in blocks, whose every fill level maps with at most 4 extents in the inode.
pub const MAX_SLOT_BLOCKS: u64 = 3 * EXT_UNWRITTEN_MAX_LEN as u64 + 1;

pub(crate) fn file_type(kind: &NodeKind) -> u8 {
    match kind {
        NodeKind::Dir(_) => FT_DIR,
        NodeKind::File(_) => FT_REG_FILE,
        NodeKind::Symlink(_) => FT_SYMLINK,
        NodeKind::CharDev { .. } => FT_CHRDEV,
        NodeKind::BlockDev { .. } => FT_BLKDEV,
        NodeKind::Fifo => FT_FIFO,
        NodeKind::Socket => FT_SOCK,
    }
}

/// Most inodes sharing one xattr block (the kernel's `EXT4_XATTR_REFCOUNT_MAX`).
const XATTR_REFCOUNT_MAX: u32 = 1024;

/// Blocks of the synthesized lost+found (16 KiB, as mke2fs makes it).
pub(crate) const LOST_FOUND_BLOCKS: u64 = 4;

impl Plan {
    /// Entries of directory inode `ino` (without `.` and `..`), in name order.
    pub(crate) fn dir_entries<'t>(&self, tree: &'t Tree, node: NodeId) -> Vec<Ent<'t>> {
        let mut v: Vec<Ent<'t>> = tree
            .entries(node)
            .iter()
            .map(|e| Ent {
                name: &e.name,
                ino: self.node_ino[e.node as usize],
                ft: file_type(&tree.node(e.node).kind),
            })
            .collect();
        if node == ROOT {
            if let Some((ino, true)) = self.lost_found {
                let at = v.partition_point(|e| e.name < &b"lost+found"[..]);
                v.insert(
                    at,
                    Ent {
                        name: b"lost+found",
                        ino,
                        ft: FT_DIR,
                    },
                );
            }
        }
        v
    }

    /// The extents of inode `ino`.
    pub(crate) fn exts(&self, ino: u32) -> &[Ext] {
        let i = &self.inodes[ino as usize - 1];
        &self.extents[i.ext_start as usize..(i.ext_start + i.ext_count) as usize]
    }

    /// Filesystem size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.blocks * BLOCK_SIZE
    }

    /// Total blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Inodes in use, reserved ones included.
    pub fn used_inodes(&self) -> u64 {
        self.inodes.iter().filter(|i| i.src != Src::Free).count() as u64
    }

    /// Total inodes.
    pub fn total_inodes(&self) -> u64 {
        u64::from(self.ipg) * self.groups
    }

    /// Blocks in use, fixed metadata included.
    pub fn used_blocks(&self) -> u64 {
        let fixed: u64 = (0..self.groups).map(reserved_blocks).sum();
        fixed + self.used.iter().map(|r| r.1).sum::<u64>()
    }

    /// Slots laid out, in tree order.
    pub fn slots(&self) -> &[SlotLocation] {
        &self.slots
    }

    /// The inode number of a tree node (0 if unreachable).
    pub fn inode_of(&self, node: NodeId) -> u32 {
        self.node_ino.get(node as usize).copied().unwrap_or(0)
    }

    /// Byte offset of inode `ino`'s record.
    pub fn inode_offset(&self, ino: u32) -> u64 {
        let idx = u64::from(ino - 1);
        let g = idx / u64::from(self.ipg);
        let i = idx % u64::from(self.ipg);
        self.itable_at[g as usize] * BLOCK_SIZE + i * INODE_SIZE
    }

    /// The filesystem checksum seed (crc32c of the UUID).
    pub fn checksum_seed(&self) -> u32 {
        self.fs_seed
    }
}

fn entry_err(tree: &Tree, node: NodeId, msg: impl Into<String>) -> Error {
    Error::Entry {
        path: path_of(tree, node),
        msg: msg.into(),
    }
}

/// Plans `tree` on top of data already placed (`data`).
pub(crate) fn plan_with(tree: &Tree, opts: &Options, data: DataState) -> Result<Plan> {
    match plan_inner(tree, opts, data.clone()) {
        Err(PlanErr::Full) => {
            let size = match opts.size {
                Size::Fixed(b) => b,
                Size::Minimize { .. } => 1 << 60,
            };
            Err(Error::TooSmall {
                needed: needed_size(tree, opts, data)?,
                size,
            })
        }
        Err(PlanErr::Err(e)) => Err(e),
        Ok(p) => Ok(p),
    }
}

/// The smallest size (found by search, at most a few dozen plans) that holds the tree under
/// `opts`' size policy, for the "does not fit" message.
fn needed_size(tree: &Tree, opts: &Options, data: DataState) -> Result<u64> {
    let attempt = |blocks: u64| -> Result<bool> {
        let mut o = opts.clone();
        let mut d = data.clone();
        if let Size::Fixed(_) = o.size {
            o.size = Size::Fixed(blocks * BLOCK_SIZE);
            d.alloc.set_limit(blocks);
        }
        match plan_inner(tree, &o, d) {
            Ok(_) => Ok(true),
            Err(PlanErr::Full) => Ok(false),
            Err(PlanErr::Err(Error::BadSize { .. })) => Ok(false),
            Err(PlanErr::Err(e)) => Err(e),
        }
    };
    // The minimized layout is a lower bound; fixed sizes add inode tables by ratio.
    let mut min = opts.clone();
    min.size = Size::Minimize {
        extra_bytes: 0,
        extra_inodes: 0,
    };
    min.layout = Layout::Packed;
    let mut d = data.clone();
    d.alloc.set_limit(1 << 48);
    let lower = match plan_inner(tree, &min, d) {
        Ok(p) => p.blocks,
        Err(PlanErr::Err(e)) => return Err(e),
        Err(PlanErr::Full) => return Ok(u64::MAX),
    };
    if !matches!(opts.size, Size::Fixed(_)) {
        return Ok(lower * BLOCK_SIZE);
    }
    let (mut lo, mut hi) = (lower.max(64) - 1, lower.max(64));
    let mut tries = 0;
    while !attempt(hi)? {
        lo = hi;
        hi += (hi / 32).max(16);
        tries += 1;
        if tries > 64 {
            return Ok(u64::MAX);
        }
    }
    for _ in 0..24 {
        if hi - lo <= 1 {
            break;
        }
        let mid = lo + (hi - lo) / 2;
        if attempt(mid)? {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi * BLOCK_SIZE)
}

enum PlanErr {
    Full,
    Err(Error),
}

impl From<Full> for PlanErr {
    fn from(_: Full) -> Self {
        PlanErr::Full
    }
}

impl From<Error> for PlanErr {
    fn from(e: Error) -> Self {
        PlanErr::Err(e)
    }
}

fn plan_inner(tree: &Tree, opts: &Options, data: DataState) -> std::result::Result<Plan, PlanErr> {
    if opts.label.len() > 16 {
        return Err(Error::Label(opts.label.clone()).into());
    }
    let DataState {
        mut alloc,
        mut extents,
        placed,
    } = data;

    // 1. Inode numbers: root 2, lost+found 11, then canonical tree order.
    let walk = tree.walk();
    let mut node_ino = vec![0u32; tree.nodes.len()];
    let mut inodes: Vec<Ino> = (1..FIRST_INO).map(|_| Ino::new(Src::Reserved)).collect();
    inodes[ROOT_INO as usize - 1].src = Src::Node(ROOT);
    node_ino[ROOT as usize] = ROOT_INO;
    if opts.journal {
        inodes[JOURNAL_INO as usize - 1].src = Src::Journal;
    }
    let mut lost_found = None;
    if opts.lost_found {
        match tree.lookup(ROOT, b"lost+found") {
            Some(n) if tree.node(n).is_dir() => {
                node_ino[n as usize] = FIRST_INO;
                inodes.push(Ino::new(Src::Node(n)));
                lost_found = Some((FIRST_INO, false));
            }
            Some(_) => {}
            None => {
                inodes.push(Ino::new(Src::LostFound));
                lost_found = Some((FIRST_INO, true));
            }
        }
    }
    let order: Vec<NodeId> = walk
        .iter()
        .copied()
        .filter(|&id| node_ino[id as usize] == 0)
        .collect();
    let stable = match (opts.layout, opts.size) {
        (Layout::Packed, _) => None,
        (Layout::Stable, Size::Minimize { .. }) => {
            return Err(Error::Layout("needs a fixed filesystem size").into())
        }
        (Layout::Stable, Size::Fixed(_)) if !placed.is_empty() => return Err(Error::Layout(
            "a one-pass stream places data as it arrives; give a directory or an indexed archive",
        )
        .into()),
        (Layout::Stable, Size::Fixed(bytes)) => {
            // Geometry and fixed metadata first: their positions depend on the size alone.
            // The inode count follows the size (by `inode_ratio`), unless the tree needs more.
            let want = (inodes.len() + order.len()) as u64;
            let (t, g, ipg) = fixed_geometry(bytes, opts, want)?;
            alloc.set_limit(t);
            let jb = if opts.journal { journal_blocks(t) } else { 0 };
            let tail = layout_tail(&mut alloc, g, ipg, jb)?;
            alloc.set_wrap(true);
            let data_lo = alloc.cursor();
            let keys = path_keys(tree);
            hashed_inodes(&order, &keys, g * ipg, &mut node_ino, &mut inodes);
            Some(Stable {
                t,
                g,
                ipg,
                tail,
                keys,
                data_lo,
            })
        }
    };
    if stable.is_none() {
        for &id in &order {
            let ino = u32::try_from(inodes.len() + 1)
                .map_err(|_| entry_err(tree, id, "more than 2^32 inodes"))?;
            node_ino[id as usize] = ino;
            inodes.push(Ino::new(Src::Node(id)));
        }
    }
    // Where each object's search for space starts (stable layouts).
    let hint = |src: Src| -> Option<u64> {
        let st = stable.as_ref()?;
        let key = match src {
            Src::Node(id) => st.keys[id as usize][1],
            Src::LostFound => path_key(b"/lost+found")[1],
            _ => return None,
        };
        Some(st.data_lo + key % (st.t - st.data_lo))
    };
    let links = tree.link_counts();

    // 2. Data, in canonical order (streamed data is already placed, in arrival order).
    let mut slots_pending: Vec<(NodeId, u32, u64, u64)> = Vec::new();
    let mut referenced = vec![false; placed.len()];
    for &id in &walk {
        let node = tree.node(id);
        let NodeKind::File(fd) = &node.kind else {
            if node.slot.is_some() {
                return Err(entry_err(tree, id, "only regular files can be slots").into());
            }
            continue;
        };
        let ino = node_ino[id as usize];
        if links[id as usize] > LINK_MAX {
            return Err(entry_err(
                tree,
                id,
                format!(
                    "{} hard links, more than ext4's {LINK_MAX}",
                    links[id as usize]
                ),
            )
            .into());
        }
        let runs = block_runs(fd).map_err(|m| entry_err(tree, id, m))?;
        let info = &mut inodes[ino as usize - 1];
        if let Some(slot) = &node.slot {
            if matches!(fd.data, DataRef::Placed(_)) {
                return Err(Error::Slot {
                    name: slot.name.clone(),
                    msg: "slot files cannot come from a one-pass stream".into(),
                }
                .into());
            }
            let cap = slot.capacity.div_ceil(BLOCK_SIZE);
            if fd.size > slot.capacity {
                return Err(Error::Slot {
                    name: slot.name.clone(),
                    msg: format!(
                        "initial content of {} bytes exceeds the capacity of {} bytes",
                        fd.size, slot.capacity
                    ),
                }
                .into());
            }
            if cap == 0 || cap > MAX_SLOT_BLOCKS {
                return Err(Error::Slot {
                    name: slot.name.clone(),
                    msg: format!(
                        "capacity {} bytes is outside 1..={} bytes (the inode maps a slot with at most 4 extents)",
                        slot.capacity,
                        MAX_SLOT_BLOCKS * BLOCK_SIZE
                    ),
                }
                .into());
            }
            if let Some(h) = hint(Src::Node(id)) {
                alloc.seek(h);
            }
            let p = alloc.contiguous(cap)?;
            let data_blocks = fd.size.div_ceil(BLOCK_SIZE);
            info.ext_start = extents.len() as u32;
            let se = slot_extents(p, cap, data_blocks);
            info.ext_count = se.len() as u32;
            extents.extend(se);
            slots_pending.push((id, ino, p, cap));
            continue;
        }
        match fd.data {
            DataRef::Placed(i) => {
                let r = placed
                    .get(i as usize)
                    .copied()
                    .flatten()
                    .ok_or_else(|| entry_err(tree, id, format!("unknown placed data #{i}")))?;
                referenced[i as usize] = true;
                info.ext_start = r.0;
                info.ext_count = r.1;
                info.preplaced = true;
            }
            _ => {
                let (s, n) = place_runs(&mut alloc, hint(Src::Node(id)), &runs, &mut extents)?;
                info.ext_start = s;
                info.ext_count = n;
            }
        }
    }
    // Streamed data no reachable node refers to (replaced entries) goes back to free space.
    for (i, r) in placed.iter().enumerate() {
        if let (Some((s, n)), false) = (r, referenced[i]) {
            for e in &extents[*s as usize..(*s + *n) as usize] {
                alloc.free(e.pblk, u64::from(e.len));
            }
        }
    }

    // 3. Metadata whose size the tree alone decides, in inode order.
    let hp = HashParams {
        seed: seed_words(opts.hash_seed.as_bytes()),
        signed: true,
    };
    let mut plan = Plan {
        opts: opts.clone(),
        blocks: 0,
        groups: 0,
        ipg: 0,
        inodes,
        node_ino,
        links,
        extents,
        xblocks: Vec::new(),
        block_bitmap_at: Vec::new(),
        inode_bitmap_at: Vec::new(),
        itable_at: Vec::new(),
        used: Vec::new(),
        slots: Vec::new(),
        hp,
        fs_seed: csum::fs_seed(opts.uuid.as_bytes()),
        lost_found,
    };
    // Parents of directories.
    for &id in &walk {
        let pino = plan.node_ino[id as usize];
        for e in tree.entries(id) {
            if tree.node(e.node).is_dir() {
                let c = plan.node_ino[e.node as usize];
                plan.inodes[c as usize - 1].parent = pino;
            }
        }
    }
    plan.inodes[ROOT_INO as usize - 1].parent = ROOT_INO;
    if let Some((ino, true)) = plan.lost_found {
        plan.inodes[ino as usize - 1].parent = ROOT_INO;
    }
    let mut xmap: BTreeMap<Vec<DiskXattr>, u32> = BTreeMap::new();
    for idx in 0..plan.inodes.len() {
        let src = plan.inodes[idx].src;
        let mut own_blocks = 0u64;
        match src {
            Src::Node(id) => match &tree.node(id).kind {
                NodeKind::Dir(_) => {
                    let ents = plan.dir_entries(tree, id);
                    for e in &ents {
                        if e.name.is_empty() || e.name.len() > 255 {
                            return Err(entry_err(
                                tree,
                                id,
                                "entry name of 0 or more than 255 bytes",
                            )
                            .into());
                        }
                    }
                    let (n, indexed) = dir::blocks(&ents, hp).map_err(|t| {
                        entry_err(
                            tree,
                            id,
                            format!(
                                "directory needs {} leaf blocks, more than a two-level htree indexes",
                                t.leaves
                            ),
                        )
                    })?;
                    plan.inodes[idx].indexed = indexed;
                    own_blocks = u64::from(n);
                }
                NodeKind::Symlink(t) => {
                    if t.is_empty() || t.len() > 4095 {
                        return Err(
                            entry_err(tree, id, "symlink target must be 1..=4095 bytes").into()
                        );
                    }
                    if t.len() > FAST_SYMLINK_MAX {
                        own_blocks = 1;
                    }
                }
                _ => {}
            },
            Src::LostFound => own_blocks = LOST_FOUND_BLOCKS,
            Src::Reserved | Src::Journal | Src::Free => {}
        }
        let at = hint(src);
        if own_blocks > 0 {
            let (s, n) = place_runs(&mut alloc, at, &[(0, own_blocks)], &mut plan.extents)?;
            plan.inodes[idx].ext_start = s;
            plan.inodes[idx].ext_count = n;
        }
        let tb = tree_blocks(plan.inodes[idx].ext_count as usize);
        if tb > 0 {
            if let Some(h) = at {
                alloc.seek(h);
            }
            plan.inodes[idx].tree_block = alloc.contiguous(tb)?;
        }
        // Extended attributes that do not fit in the inode share blocks by content.
        if let Src::Node(id) = src {
            let meta = &tree.node(id).meta;
            if !meta.xattrs.is_empty() {
                let attrs = xattr::to_disk(&meta.xattrs).map_err(|(name, p)| {
                    entry_err(
                        tree,
                        id,
                        format!("xattr {:?}: {p}", String::from_utf8_lossy(&name)),
                    )
                })?;
                let split =
                    xattr::split(attrs).map_err(|p| entry_err(tree, id, format!("xattrs: {p}")))?;
                if !split.block.is_empty() {
                    // Share a block among inodes with identical block attributes, up to the
                    // kernel's EXT4_XATTR_REFCOUNT_MAX (1024) references per block.
                    let n = match xmap.get(&split.block) {
                        Some(&n) if plan.xblocks[n as usize - 1].refs < XATTR_REFCOUNT_MAX => n,
                        _ => {
                            if let Some(h) = at {
                                alloc.seek(h);
                            }
                            let (b, _) = alloc.run(1)?;
                            plan.xblocks.push(XBlock {
                                block: b,
                                attrs: split.block.clone(),
                                refs: 0,
                            });
                            let n = plan.xblocks.len() as u32;
                            xmap.insert(split.block, n);
                            n
                        }
                    };
                    plan.xblocks[n as usize - 1].refs += 1;
                    plan.inodes[idx].xattr = n;
                }
            }
        }
    }

    // 4. Count-dependent metadata: journal, bitmaps, inode tables; then the size.
    let used_inodes = plan.used_inodes();
    let (extra_blocks, want_inodes) = match opts.size {
        Size::Fixed(_) => (0, used_inodes),
        Size::Minimize {
            extra_bytes,
            extra_inodes,
        } => (extra_bytes.div_ceil(BLOCK_SIZE), used_inodes + extra_inodes),
    };
    let max_ipg = u64::from(MAX_INODES_PER_GROUP);
    let base = alloc;
    let (final_alloc, t, g, ipg, tail) = match (stable, opts.size) {
        // A stable layout placed its fixed metadata before the data.
        (Some(st), _) => (base, st.t, st.g, st.ipg, st.tail),
        (None, Size::Fixed(bytes)) => {
            let (t, g, ipg) = fixed_geometry(bytes, opts, want_inodes)?;
            let jb = if opts.journal { journal_blocks(t) } else { 0 };
            let mut a = base;
            a.set_limit(t);
            let tail = layout_tail(&mut a, g, ipg, jb)?;
            (a, t, g, ipg, tail)
        }
        (None, Size::Minimize { .. }) => {
            let mut g = want_inodes.div_ceil(max_ipg).max(1);
            let mut jb = if opts.journal { 1024 } else { 0 };
            loop {
                let ipg = ipg_for(g, want_inodes);
                if ipg * g > u64::from(u32::MAX) {
                    return Err(Error::Entry {
                        path: "/".into(),
                        msg: "more inodes than ext4 can count".into(),
                    }
                    .into());
                }
                let mut a = base.clone();
                let tail = layout_tail(&mut a, g, ipg, jb)?;
                let t = normalize_total(a.cursor() + extra_blocks);
                let g2 = t.div_ceil(BLOCKS_PER_GROUP);
                let jb2 = if opts.journal { journal_blocks(t) } else { 0 };
                if g2 > g || jb2 > jb {
                    g = g.max(g2);
                    jb = jb.max(jb2);
                    continue;
                }
                // Fewer groups would do, but fewer groups means other inode tables: keep g
                // groups by reaching into the last one.
                let t = if g2 < g {
                    normalize_total((g - 1) * BLOCKS_PER_GROUP + 1)
                } else {
                    t
                };
                break (a, t, g, ipg, tail);
            }
        }
    };
    plan.blocks = t;
    plan.groups = g;
    plan.ipg = ipg as u32;
    plan.block_bitmap_at = tail.block_bitmaps;
    plan.inode_bitmap_at = tail.inode_bitmaps;
    plan.itable_at = tail.itables;
    if let Some(j) = tail.journal {
        let info = &mut plan.inodes[JOURNAL_INO as usize - 1];
        info.ext_start = plan.extents.len() as u32;
        info.ext_count = j.len() as u32;
        plan.extents.extend(j);
        info.tree_block = tail.journal_tree;
    }
    plan.used = final_alloc.used();

    // 5. Slot locations.
    for (id, ino, p, cap) in slots_pending {
        let name = tree
            .node(id)
            .slot
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default();
        plan.slots.push(SlotLocation {
            name,
            inode: ino,
            inode_offset: plan.inode_offset(ino),
            data_offset: p * BLOCK_SIZE,
            capacity: cap * BLOCK_SIZE,
        });
    }
    Ok(plan)
}

/// What a stable layout decides before any data is placed.
struct Stable {
    t: u64,
    g: u64,
    ipg: u64,
    tail: Tail,
    /// Per node: two 64-bit keys hashed from its path (inode number, data position).
    keys: Vec<[u64; 2]>,
    /// First block after the fixed metadata.
    data_lo: u64,
}

/// Inodes per group for `want` inodes over `groups` groups: whole inode-table blocks.
fn ipg_for(groups: u64, want: u64) -> u64 {
    let per = want.div_ceil(groups).max(u64::from(INODES_PER_BLOCK));
    per.div_ceil(u64::from(INODES_PER_BLOCK)) * u64::from(INODES_PER_BLOCK)
}

/// Blocks, groups and inodes per group of a fixed-size filesystem holding `want` inodes.
fn fixed_geometry(
    bytes: u64,
    opts: &Options,
    want: u64,
) -> std::result::Result<(u64, u64, u64), PlanErr> {
    let t = fixed_blocks(bytes)?;
    let g = t.div_ceil(BLOCKS_PER_GROUP);
    let by_ratio = (t * BLOCK_SIZE) / opts.inode_ratio.max(1024);
    let ipg = ipg_for(g, by_ratio.max(want)).min(u64::from(MAX_INODES_PER_GROUP));
    if ipg * g < want || ipg * g > u64::from(u32::MAX) {
        return Err(PlanErr::Full);
    }
    Ok((t, g, ipg))
}

/// The two placement keys of a path: SHA-256 of the path, its first and second 8 bytes.
fn path_key(path: &[u8]) -> [u64; 2] {
    let d = Sha256::digest(path);
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&d[i * 8..i * 8 + 8]);
        u64::from_le_bytes(b)
    };
    [word(0), word(1)]
}

/// Placement keys of every node, from its first path in walk order.
fn path_keys(tree: &Tree) -> Vec<[u64; 2]> {
    let mut keys = vec![[0u64; 2]; tree.nodes.len()];
    tree.walk_paths(|p, id| keys[id as usize] = path_key(p));
    keys
}

/// Most inode numbers a stable layout hashes into: the plan holds a record for each number up
/// to the highest in use, so a filesystem with millions of inodes would cost memory in
/// proportion. Trees with more than half as many entries use every inode number.
const STABLE_INO_RANGE: u64 = 1 << 22;

/// Numbers `order`'s nodes by their hashed keys within `FIRST_INO + 1..=total` (at most
/// [`STABLE_INO_RANGE`] of them), probing upwards (and round) past numbers taken, and fills
/// the gaps with free inodes.
fn hashed_inodes(
    order: &[NodeId],
    keys: &[[u64; 2]],
    total: u64,
    node_ino: &mut [u32],
    inodes: &mut Vec<Ino>,
) {
    let lo = u64::from(FIRST_INO) + 1;
    let total = if 2 * (inodes.len() + order.len()) as u64 <= STABLE_INO_RANGE {
        total.min(STABLE_INO_RANGE)
    } else {
        total
    };
    let span = total + 1 - lo;
    let mut taken = vec![false; (total + 1) as usize];
    let mut max = inodes.len() as u64;
    for &id in order {
        let mut n = lo + keys[id as usize][0] % span;
        while taken[n as usize] {
            n = if n == total { lo } else { n + 1 };
        }
        taken[n as usize] = true;
        node_ino[id as usize] = n as u32;
        max = max.max(n);
    }
    inodes.resize(max as usize, Ino::new(Src::Free));
    for &id in order {
        inodes[node_ino[id as usize] as usize - 1].src = Src::Node(id);
    }
}

/// Allocates a file's data runs like [`alloc_runs`], or with a `hint`, each run in the first
/// gap at or after the hint that holds it whole (up to the extent length limit), splitting it
/// only when no such gap is left.
fn place_runs(
    alloc: &mut Allocator,
    hint: Option<u64>,
    runs: &[(u64, u64)],
    extents: &mut Vec<Ext>,
) -> std::result::Result<(u32, u32), Full> {
    let Some(h) = hint else {
        return alloc_runs(alloc, runs, extents);
    };
    let start = extents.len();
    let max = u64::from(EXT_INIT_MAX_LEN);
    alloc.seek(h);
    for &(lb, nb) in runs {
        let mut l = lb;
        let mut left = nb;
        while left > 0 {
            let n = left.min(max);
            let Ok(p) = alloc.contiguous(n) else {
                append_run(alloc, extents, start, l, left, &mut |_, _, _| {})?;
                break;
            };
            let merge = extents.len() > start
                && extents.last().is_some_and(|e| {
                    u64::from(e.lblk) + u64::from(e.len) == l
                        && e.pblk + u64::from(e.len) == p
                        && u64::from(e.len) + n <= max
                });
            match extents.last_mut() {
                Some(e) if merge => e.len += n as u32,
                _ => extents.push(Ext {
                    lblk: l as u32,
                    len: n as u32,
                    pblk: p,
                    unwritten: false,
                }),
            }
            l += n;
            left -= n;
        }
    }
    Ok((start as u32, (extents.len() - start) as u32))
}

struct Tail {
    journal: Option<Vec<Ext>>,
    journal_tree: u64,
    block_bitmaps: Vec<u64>,
    inode_bitmaps: Vec<u64>,
    itables: Vec<u64>,
}

fn layout_tail(
    a: &mut Allocator,
    groups: u64,
    ipg: u64,
    journal: u64,
) -> std::result::Result<Tail, Full> {
    let (journal, journal_tree) = if journal > 0 {
        let mut j = Vec::new();
        alloc_runs(a, &[(0, journal)], &mut j)?;
        let tb = tree_blocks(j.len());
        let t = if tb > 0 { a.contiguous(tb)? } else { 0 };
        (Some(j), t)
    } else {
        (None, 0)
    };
    let g = groups as usize;
    let mut block_bitmaps = Vec::with_capacity(g);
    let mut inode_bitmaps = Vec::with_capacity(g);
    let mut itables = Vec::with_capacity(g);
    for _ in 0..g {
        block_bitmaps.push(a.run(1)?.0);
    }
    for _ in 0..g {
        inode_bitmaps.push(a.run(1)?.0);
    }
    let itb = ipg / u64::from(INODES_PER_BLOCK);
    for _ in 0..g {
        itables.push(a.contiguous(itb)?);
    }
    Ok(Tail {
        journal,
        journal_tree,
        block_bitmaps,
        inode_bitmaps,
        itables,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn block_runs_merge_and_validate() {
        let fd = |size, segs: &[(u64, u64)]| FileData {
            size,
            data: DataRef::Empty,
            segments: Some(
                segs.iter()
                    .map(|&(offset, len)| Segment { offset, len })
                    .collect(),
            ),
        };
        assert_eq!(
            block_runs(&FileData::dense(0, DataRef::Empty)).unwrap(),
            vec![]
        );
        assert_eq!(
            block_runs(&FileData::dense(
                4097,
                DataRef::Inline(vec![1; 4097].into())
            ))
            .unwrap(),
            vec![(0, 2)]
        );
        assert_eq!(
            block_runs(&fd(
                1 << 20,
                &[(0, 10), (100, 10), (8192, 1), (40960, 4096)]
            ))
            .unwrap(),
            vec![(0, 1), (2, 1), (10, 1)]
        );
        assert!(block_runs(&fd(100, &[(50, 60)])).is_err());
        assert!(block_runs(&fd(100, &[(50, 10), (40, 5)])).is_err());
    }

    #[test]
    fn slot_extent_counts_stay_within_the_inode() {
        for cap in [1u64, 2, 32768, 65535, MAX_SLOT_BLOCKS] {
            for data in [
                0,
                1,
                cap / 2,
                cap.saturating_sub(1),
                cap,
                32767,
                32768,
                32769,
                65537,
            ] {
                if data > cap {
                    continue;
                }
                let e = slot_extents(100, cap, data);
                assert!(e.len() <= 4, "cap {cap} data {data}: {} extents", e.len());
                assert_eq!(e.iter().map(|x| u64::from(x.len)).sum::<u64>(), cap);
            }
        }
        // Exhaustively at the limit: every fill level fits.
        let worst = (0..=MAX_SLOT_BLOCKS)
            .map(|d| slot_extents(0, MAX_SLOT_BLOCKS, d).len())
            .max();
        assert_eq!(worst, Some(4));
        assert_eq!(slot_extents(0, MAX_SLOT_BLOCKS + 1, 1).len(), 5);
    }

    #[test]
    fn journal_sizes_follow_mke2fs() {
        assert_eq!(journal_blocks(2048), 1024);
        assert_eq!(journal_blocks(153600), 4096);
        assert_eq!(journal_blocks(300_000), 8192);
        assert_eq!(journal_blocks(1 << 30), 262144);
    }
}
