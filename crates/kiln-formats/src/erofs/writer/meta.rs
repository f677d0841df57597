//! What the metadata needs from the tree alone, before any data is placed ([`MetaPrep`]): the
//! walk order (which gives inode numbers), link counts, the super block's build time, each
//! inode's xattr body and the shared xattr area, sorted directory blocks, and whether an inode
//! must be extended. Nodes EROFS cannot represent (xattr names, symlink lengths, device numbers,
//! slots a file does not fit) are rejected here, before any metadata is written.

use std::collections::BTreeMap;

use zerocopy::IntoBytes;

use super::{Error, Options};
use crate::erofs::layout::*;
use crate::fstree::{FileData, NodeId, NodeKind, SlotReservation, Timestamp, Tree, Xattr, ROOT};

/// Path of a node for messages (searches the tree; only used on error paths).
pub(super) fn node_path(tree: &Tree, id: NodeId) -> String {
    let mut found = None;
    tree.walk_paths(|p, n| {
        if n == id && found.is_none() {
            found = Some(String::from_utf8_lossy(p).into_owned());
        }
    });
    found.unwrap_or_else(|| format!("node {id}"))
}

/// Splits an xattr name into (prefix index, suffix).
fn xattr_prefix(name: &[u8]) -> Option<(u8, &[u8])> {
    for (idx, p) in XATTR_PREFIXES {
        if idx == 2 || idx == 3 {
            if name == p {
                return Some((idx, &[]));
            }
        } else if let Some(s) = name.strip_prefix(p) {
            return Some((idx, s));
        }
    }
    None
}

fn xattr_entry(x: &Xattr) -> Option<Vec<u8>> {
    let (idx, suffix) = xattr_prefix(&x.name)?;
    let mut v = Vec::with_capacity(4 + suffix.len() + x.value.len() + 3);
    v.extend_from_slice(
        XattrEntry {
            e_name_len: suffix.len() as u8,
            e_name_index: idx,
            e_value_size: (x.value.len() as u16).into(),
        }
        .as_bytes(),
    );
    v.extend_from_slice(suffix);
    v.extend_from_slice(&x.value);
    v.resize(round_up(v.len() as u64, 4) as usize, 0);
    Some(v)
}

/// Per-node facts that do not depend on where data went.
pub(super) struct NodePrep {
    pub(super) extended: bool,
    /// The xattr ibody (header, shared ids, inline entries), empty if no xattrs.
    pub(super) xattrs: Vec<u8>,
    pub(super) nlink: u32,
    pub(super) ino: u32,
}

/// Everything about the metadata that can be computed from the tree alone.
pub(super) struct MetaPrep {
    pub(super) walk: Vec<NodeId>,
    pub(super) files: Vec<NodeId>,
    prep: Vec<Option<NodePrep>>,
    pub(super) shared: Vec<u8>,
    pub(super) build_time: Timestamp,
    /// Sorted directory entries (with `.` and `..`) and their block split, per directory.
    pub(super) dirs: BTreeMap<NodeId, DirPrep>,
}

pub(super) struct DirPrep {
    /// (name, node) in on-disk order; `.` and `..` included.
    pub(super) entries: Vec<(Box<[u8]>, NodeId)>,
    /// Index of the first entry of each block.
    pub(super) block_starts: Vec<usize>,
    pub(super) size: u64,
}

fn dir_prep(tree: &Tree, id: NodeId, parent: NodeId) -> DirPrep {
    let mut entries: Vec<(Box<[u8]>, NodeId)> = tree
        .entries(id)
        .iter()
        .map(|e| (e.name.clone(), e.node))
        .collect();
    entries.push((b".".to_vec().into(), id));
    entries.push((b"..".to_vec().into(), parent));
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut block_starts = vec![0];
    let mut used = 0u64;
    for (i, (name, _)) in entries.iter().enumerate() {
        let need = 12 + name.len() as u64;
        if used + need > BLOCK {
            block_starts.push(i);
            used = 0;
        }
        used += need;
    }
    let size = (block_starts.len() as u64 - 1) * BLOCK + used;
    DirPrep {
        entries,
        block_starts,
        size,
    }
}

impl MetaPrep {
    pub(super) fn new(tree: &Tree, opts: &Options) -> Result<Self, Error> {
        let walk = tree.walk();
        if walk.len() > u32::MAX as usize {
            return Err(Error::TooLarge("more than 2^32 inodes".into()));
        }
        let links = tree.link_counts();
        let parent = parents(tree, &walk);
        let build_time = match opts.timestamp {
            Some(t) => t,
            None => common_mtime(tree, &walk),
        };
        let (shared, shared_id) = shared_xattrs(tree, &walk)?;
        let mut prep: Vec<Option<NodePrep>> = (0..tree.nodes.len()).map(|_| None).collect();
        let mut files = Vec::new();
        let mut dirs = BTreeMap::new();
        for (i, &id) in walk.iter().enumerate() {
            let node = tree.node(id);
            let nlink = if node.is_dir() {
                2 + tree.subdir_count(id)
            } else {
                links[id as usize]
            };
            let xattrs = xattr_ibody(tree, id, &shared_id)?;
            let size_max = match &node.kind {
                NodeKind::File(f) => {
                    files.push(id);
                    match &node.slot {
                        Some(s) => slot_capacity(tree, id, f, s)?,
                        None => f.size,
                    }
                }
                NodeKind::Dir(_) => {
                    let d = dir_prep(tree, id, parent[id as usize]);
                    let s = d.size;
                    dirs.insert(id, d);
                    s
                }
                NodeKind::Symlink(t) => {
                    check_symlink(tree, id, t)?;
                    t.len() as u64
                }
                NodeKind::CharDev { major, minor } | NodeKind::BlockDev { major, minor } => {
                    check_rdev(tree, id, *major, *minor)?;
                    0
                }
                NodeKind::Fifo | NodeKind::Socket => 0,
            };
            let m = &node.meta;
            let extended = m.mtime != build_time
                || m.uid > 0xFFFF
                || m.gid > 0xFFFF
                || nlink > 0xFFFF
                || size_max > u64::from(u32::MAX);
            prep[id as usize] = Some(NodePrep {
                extended,
                xattrs,
                nlink,
                ino: i as u32 + 1,
            });
        }
        Ok(Self {
            walk,
            files,
            prep,
            shared,
            build_time,
            dirs,
        })
    }

    pub(super) fn prep(&self, id: NodeId) -> Result<&NodePrep, Error> {
        self.prep
            .get(id as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::corrupt(0, format!("internal: node {id} not prepared")))
    }
}

/// Parents of directories, for `..`.
fn parents(tree: &Tree, walk: &[NodeId]) -> Vec<NodeId> {
    let mut parent = vec![ROOT; tree.nodes.len()];
    for &id in walk {
        for e in tree.entries(id) {
            if tree.node(e.node).is_dir() {
                parent[e.node as usize] = id;
            }
        }
    }
    parent
}

/// The build time when none is given: the most common mtime in the tree (ties: the earliest),
/// so most inodes can be compact.
fn common_mtime(tree: &Tree, walk: &[NodeId]) -> Timestamp {
    let mut counts: BTreeMap<Timestamp, u64> = BTreeMap::new();
    for &id in walk {
        *counts.entry(tree.node(id).meta.mtime).or_default() += 1;
    }
    counts
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
        .map(|(t, _)| *t)
        .unwrap_or_default()
}

/// Shared xattrs: every (name, value) used by two or more inodes, stored once. Returns the
/// shared xattr area and each shared xattr's id (its offset in the area in 4-byte units).
fn shared_xattrs<'t>(
    tree: &'t Tree,
    walk: &[NodeId],
) -> Result<(Vec<u8>, BTreeMap<&'t Xattr, u32>), Error> {
    let mut uses: BTreeMap<&Xattr, u32> = BTreeMap::new();
    for &id in walk {
        for x in &tree.node(id).meta.xattrs {
            check_xattr(tree, id, x)?;
            *uses.entry(x).or_default() += 1;
        }
    }
    let mut shared = Vec::new();
    let mut shared_id: BTreeMap<&Xattr, u32> = BTreeMap::new();
    for (x, n) in &uses {
        if *n >= 2 {
            shared_id.insert(x, (shared.len() / 4) as u32);
            shared.extend_from_slice(&xattr_entry(x).unwrap_or_default());
        }
    }
    Ok((shared, shared_id))
}

/// Rejects an xattr EROFS cannot store: a name without a known prefix, a name or value too long.
fn check_xattr(tree: &Tree, id: NodeId, x: &Xattr) -> Result<(), Error> {
    if xattr_prefix(&x.name).is_none() {
        return Err(Error::Unsupported {
            path: node_path(tree, id),
            reason: format!(
                "xattr {:?}: EROFS stores only user., trusted., security., lustre. and POSIX ACL names",
                String::from_utf8_lossy(&x.name)
            ),
        });
    }
    let (_, suffix) = xattr_prefix(&x.name).unwrap_or((0, &[]));
    if suffix.len() > NAME_LEN || x.value.len() > u16::MAX as usize {
        return Err(Error::Unsupported {
            path: node_path(tree, id),
            reason: format!(
                "xattr {:?}: name over 255 bytes or value over 65535 bytes",
                String::from_utf8_lossy(&x.name)
            ),
        });
    }
    Ok(())
}

/// A node's xattr ibody: the header, the ids of its shared xattrs (at most 255), then its other
/// xattrs inline. Empty when the node has no xattrs.
fn xattr_ibody(
    tree: &Tree,
    id: NodeId,
    shared_id: &BTreeMap<&Xattr, u32>,
) -> Result<Vec<u8>, Error> {
    let mut ids = Vec::new();
    let mut inline = Vec::new();
    for x in &tree.node(id).meta.xattrs {
        match shared_id.get(x) {
            Some(&sid) if ids.len() < 255 => ids.push(sid),
            _ => inline.extend_from_slice(&xattr_entry(x).unwrap_or_default()),
        }
    }
    let mut xattrs = Vec::new();
    if !ids.is_empty() || !inline.is_empty() {
        xattrs.extend_from_slice(
            XattrIbodyHeader {
                h_shared_count: ids.len() as u8,
                ..Default::default()
            }
            .as_bytes(),
        );
        for s in ids {
            xattrs.extend_from_slice(&s.to_le_bytes());
        }
        xattrs.extend_from_slice(&inline);
        if (xattrs.len() - 12) / 4 + 1 > u16::MAX as usize {
            return Err(Error::Unsupported {
                path: node_path(tree, id),
                reason: format!(
                    "{} bytes of xattrs exceed EROFS's inline limit",
                    xattrs.len()
                ),
            });
        }
    }
    Ok(xattrs)
}

/// A slot file's capacity (the size its inode must be able to hold), once the file is known to
/// fit the slot.
fn slot_capacity(tree: &Tree, id: NodeId, f: &FileData, s: &SlotReservation) -> Result<u64, Error> {
    if f.size > s.capacity {
        return Err(Error::Slot {
            name: s.name.clone(),
            reason: format!(
                "{} holds {} bytes, more than the {} reserved",
                node_path(tree, id),
                f.size,
                s.capacity
            ),
        });
    }
    if f.segments.is_some() {
        return Err(Error::Slot {
            name: s.name.clone(),
            reason: "a slot cannot be a sparse file".into(),
        });
    }
    Ok(s.capacity)
}

/// Rejects a symlink target EROFS cannot store.
fn check_symlink(tree: &Tree, id: NodeId, t: &[u8]) -> Result<(), Error> {
    if t.is_empty() || t.len() > 4095 {
        return Err(Error::Unsupported {
            path: node_path(tree, id),
            reason: format!("symlink target of {} bytes (1..=4095 allowed)", t.len()),
        });
    }
    Ok(())
}

/// Rejects a device number that does not fit the inode's rdev encoding.
fn check_rdev(tree: &Tree, id: NodeId, major: u32, minor: u32) -> Result<(), Error> {
    if major >= 1 << 12 || minor >= 1 << 20 {
        return Err(Error::Unsupported {
            path: node_path(tree, id),
            reason: format!("device {major}:{minor} does not fit EROFS's 12:20-bit rdev"),
        });
    }
    Ok(())
}
