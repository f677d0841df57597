//! Turns tar entries into a [`Tree`], with tar extraction semantics: `./` prefixes dropped, a
//! root entry (`./`, `.`, `/`) sets the root's metadata, missing parents are created, a later
//! entry replaces an earlier one of the same name (a directory over a directory only updates
//! its metadata, as [`Tree::insert`] does), hard links share the node of an earlier entry.
//!
//! Directory entries are kept in one ordered map keyed by (parent id, name) while the archive
//! is read and moved into the tree's sorted entry lists at the end. Inserting into a sorted
//! `Vec` per directory would cost O(n) per out-of-order name, so a 100k-entry directory
//! archived in `readdir` order (GNU tar's default) would take O(n²); the map keeps every
//! insertion O(log n) whatever the order.

use std::collections::{BTreeMap, HashSet};
use std::ops::Bound;

use kiln_formats::fstree::{DataRef, DirEntry, Meta, Node, NodeId, NodeKind, Tree, NAME_MAX, ROOT};

use super::parser::{Entry, Kind};
use super::sparse;
use crate::Error;

/// Longest symlink target the writers accept (ext4 and EROFS use one 4 KiB block).
pub const SYMLINK_MAX: usize = 4095;

/// Where an entry goes.
#[derive(Debug)]
pub enum Target {
    /// The root directory itself.
    Root,
    /// Name `1` (the map key: parent id big-endian, then the name) in directory `0`.
    At(NodeId, Box<[u8]>),
}

/// Builds a tree from entries in archive order.
pub struct Builder {
    tree: Tree,
    /// (parent id as 4 big-endian bytes ‖ name) → node. Big-endian so the map orders by
    /// parent first, then by name bytes: the canonical directory order.
    children: BTreeMap<Box<[u8]>, NodeId>,
    /// Directory entries naming each node while building.
    nlink: Vec<u32>,
    /// The parent directory of the previous entry (path and id): consecutive entries usually
    /// share it, so most entries skip the walk from the root.
    last_parent: Option<(Vec<u8>, NodeId)>,
    scratch: Vec<u8>,
    /// While applying image layers: the keys of the directory entries the current layer made.
    /// A whiteout hides only what lower layers made (image-spec `layer.md`, "Whiteouts").
    fresh: Option<HashSet<Box<[u8]>>>,
}

/// The prefix of a whiteout's name (image-spec `layer.md`).
pub const WHITEOUT: &[u8] = b".wh.";
/// The name of the opaque-directory whiteout.
pub const OPAQUE: &[u8] = b".wh..wh..opq";

fn key(parent: NodeId, name: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&parent.to_be_bytes());
    out.extend_from_slice(name);
}

fn err(e: &Entry, msg: impl Into<String>) -> Error {
    Error::Entry {
        entry: e.display(),
        offset: e.offset,
        msg: msg.into(),
    }
}

/// The components of an archive path: `.` and empty ones dropped; absolute paths, `..`,
/// NUL bytes and names over 255 bytes refused. An empty result is the root.
fn components(path: &[u8]) -> Result<Vec<&[u8]>, String> {
    if path.is_empty() {
        return Err("empty name".into());
    }
    let comps: Vec<&[u8]> = path
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .collect();
    if path.first() == Some(&b'/') && !comps.is_empty() {
        return Err("absolute path: archive members must be relative to the root".into());
    }
    for c in &comps {
        if *c == b".." {
            return Err("`..` path component: archive members must stay inside the root".into());
        }
        if c.len() > NAME_MAX {
            return Err(format!(
                "name component of {} bytes is longer than {NAME_MAX} bytes",
                c.len()
            ));
        }
        if c.contains(&0) {
            return Err("NUL byte in name".into());
        }
    }
    Ok(comps)
}

impl Default for Builder {
    fn default() -> Self {
        Self::new()
    }
}

impl Builder {
    /// An empty tree whose root has default metadata until a root entry says otherwise.
    pub fn new() -> Self {
        Self {
            tree: Tree::new(Meta::default()),
            children: BTreeMap::new(),
            nlink: vec![1],
            last_parent: None,
            scratch: Vec::new(),
            fresh: None,
        }
    }

    /// Starts applying the next image layer: from now on whiteouts hide only what earlier
    /// layers made.
    pub fn begin_layer(&mut self) {
        self.fresh = Some(HashSet::new());
        self.last_parent = None;
    }

    /// Applies `e` if it is a whiteout (its last component starts with `.wh.`) and returns
    /// true; returns false for any other entry. `.wh.NAME` removes NAME, `.wh..wh..opq` empties
    /// its directory, both of what lower layers made only; a whiteout whose parent does not
    /// exist hides nothing. A whiteout is never added to the tree.
    pub fn whiteout(&mut self, e: &Entry, discard: &mut dyn FnMut(u32)) -> Result<bool, Error> {
        let comps = components(&e.path).map_err(|m| err(e, format!("whiteout: {m}")))?;
        let Some((name, parents)) = comps.split_last() else {
            return Ok(false);
        };
        let Some(hidden) = name.strip_prefix(WHITEOUT) else {
            return Ok(false);
        };
        if hidden.is_empty() || (hidden.starts_with(WHITEOUT) && *name != OPAQUE) {
            return Err(err(
                e,
                "whiteout with no name, or a reserved `.wh..wh.` name other than the opaque marker",
            ));
        }
        let mut dir = ROOT;
        for c in parents {
            match self.lookup(dir, c) {
                Some(n) if self.tree.node(n).is_dir() => dir = n,
                _ => return Ok(true),
            }
        }
        self.last_parent = None;
        let fresh = self.fresh.take().unwrap_or_default();
        if *name == OPAQUE {
            let lo = dir.to_be_bytes().to_vec().into_boxed_slice();
            let hi = match dir.checked_add(1) {
                Some(m) => Bound::Excluded(m.to_be_bytes().to_vec().into_boxed_slice()),
                None => Bound::Unbounded,
            };
            let lower: Vec<Box<[u8]>> = self
                .children
                .range::<Box<[u8]>, _>((Bound::Included(lo), hi))
                .map(|(k, _)| k.clone())
                .filter(|k| !fresh.contains(k))
                .collect();
            for k in lower {
                if let Some(old) = self.children.remove(&k) {
                    self.release(old, discard);
                }
            }
        } else {
            let mut k = Vec::with_capacity(4 + hidden.len());
            key(dir, hidden, &mut k);
            if !fresh.contains(&k[..]) {
                if let Some(old) = self.children.remove(&k[..]) {
                    self.release(old, discard);
                }
            }
        }
        self.fresh = Some(fresh);
        Ok(true)
    }

    fn lookup(&mut self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        key(dir, name, &mut self.scratch);
        self.children.get(&self.scratch[..]).copied()
    }

    fn push(&mut self, node: Node) -> NodeId {
        let id = self.tree.push(node);
        self.nlink.push(0);
        id
    }

    /// Checks the entry's path and returns where it goes, creating missing parent directories
    /// (mode 0755, owned by root, mtime 0: an archive that wants other values lists them).
    pub fn target(&mut self, e: &Entry) -> Result<Target, Error> {
        let comps = components(&e.path).map_err(|m| err(e, m))?;
        let Some((name, parents)) = comps.split_last() else {
            return Ok(Target::Root);
        };
        let parent_path = parents.join(&b'/');
        let dir = match &self.last_parent {
            Some((p, id)) if *p == parent_path => *id,
            _ => {
                let mut cur = ROOT;
                for (i, c) in parents.iter().enumerate() {
                    cur = match self.lookup(cur, c) {
                        Some(n) if self.tree.node(n).is_dir() => n,
                        Some(n) => {
                            return Err(err(
                                e,
                                format!(
                                    "parent {:?} is a {}, not a directory",
                                    String::from_utf8_lossy(&parents[..=i].join(&b'/')),
                                    self.tree.node(n).kind.name()
                                ),
                            ))
                        }
                        None => {
                            let n = self.push(Node {
                                kind: NodeKind::Dir(Vec::new()),
                                meta: Meta::default(),
                                slot: None,
                            });
                            self.link(cur, c, n, &mut |_| {});
                            n
                        }
                    };
                }
                self.last_parent = Some((parent_path, cur));
                cur
            }
        };
        Ok(Target::At(dir, (*name).into()))
    }

    /// Resolves an existing path (for hard link targets); no directories are created.
    fn resolve(&mut self, e: &Entry, path: &[u8]) -> Result<NodeId, Error> {
        let comps = components(path).map_err(|m| err(e, format!("hard link target: {m}")))?;
        let mut cur = ROOT;
        for c in comps {
            cur = self.lookup(cur, c).ok_or_else(|| {
                err(
                    e,
                    format!(
                        "hard link to {:?}, which is not in the archive before it",
                        String::from_utf8_lossy(path)
                    ),
                )
            })?;
        }
        Ok(cur)
    }

    /// Makes `name` in `dir` name `node`; whatever it named before is released.
    fn link(&mut self, dir: NodeId, name: &[u8], node: NodeId, discard: &mut dyn FnMut(u32)) {
        let mut k = Vec::with_capacity(4 + name.len());
        key(dir, name, &mut k);
        self.nlink[node as usize] += 1;
        let k: Box<[u8]> = k.into();
        if let Some(f) = &mut self.fresh {
            f.insert(k.clone());
        }
        if let Some(old) = self.children.insert(k, node) {
            self.release(old, discard);
        }
    }

    /// Drops one directory entry naming `node`. When none is left, a placed file's storage is
    /// handed back and a directory's whole subtree goes with it.
    fn release(&mut self, node: NodeId, discard: &mut dyn FnMut(u32)) {
        let mut stack = vec![node];
        while let Some(n) = stack.pop() {
            let count = &mut self.nlink[n as usize];
            *count = count.saturating_sub(1);
            if *count > 0 {
                continue;
            }
            match &self.tree.node(n).kind {
                NodeKind::File(f) => {
                    if let DataRef::Placed(i) = f.data {
                        discard(i);
                    }
                }
                NodeKind::Dir(_) => {
                    // The cached parent may be inside the dropped subtree.
                    self.last_parent = None;
                    let lo = n.to_be_bytes().to_vec();
                    let hi = match n.checked_add(1) {
                        Some(m) => Bound::Excluded(m.to_be_bytes().to_vec().into_boxed_slice()),
                        None => Bound::Unbounded,
                    };
                    let keys: Vec<Box<[u8]>> = self
                        .children
                        .range::<Box<[u8]>, _>((Bound::Included(lo.into_boxed_slice()), hi))
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in keys {
                        if let Some(child) = self.children.remove(&k) {
                            stack.push(child);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Adds an entry at `target`. `data` is where a regular file's stored bytes are
    /// ([`DataRef::Empty`] when it stores none); `discard` is called with the index of every
    /// placed file that a replacement makes unreachable.
    pub fn add(
        &mut self,
        e: &Entry,
        target: Target,
        data: DataRef,
        discard: &mut dyn FnMut(u32),
    ) -> Result<(), Error> {
        let meta = Meta {
            perm: e.perm,
            uid: e.uid,
            gid: e.gid,
            mtime: e.mtime,
            xattrs: e.xattrs.clone(),
        };
        let (dir, name) = match target {
            Target::Root if e.kind == Kind::Dir => {
                self.tree.node_mut(ROOT).meta = meta;
                return Ok(());
            }
            Target::Root => return Err(err(e, "names the root directory but is not a directory")),
            Target::At(d, n) => (d, n),
        };
        let existing = self.lookup(dir, &name);
        let kind = match e.kind {
            Kind::HardLink => {
                if e.link.is_empty() {
                    return Err(err(e, "hard link with an empty target"));
                }
                let t = self.resolve(e, &e.link)?;
                if self.tree.node(t).is_dir() {
                    return Err(err(
                        e,
                        format!(
                            "hard link to directory {:?}",
                            String::from_utf8_lossy(&e.link)
                        ),
                    ));
                }
                if existing != Some(t) {
                    self.link(dir, &name, t, discard);
                }
                return Ok(());
            }
            Kind::Dir => {
                if let Some(old) = existing.filter(|&o| self.tree.node(o).is_dir()) {
                    self.tree.node_mut(old).meta = meta;
                    if let Some(f) = &mut self.fresh {
                        let mut k = Vec::with_capacity(4 + name.len());
                        key(dir, &name, &mut k);
                        f.insert(k.into());
                    }
                    return Ok(());
                }
                NodeKind::Dir(Vec::new())
            }
            Kind::File => {
                let mut f = sparse::file_data(e.size, e.runs.clone());
                if f.stored_len() > 0 {
                    f.data = data;
                }
                NodeKind::File(f)
            }
            Kind::Symlink => {
                if e.link.is_empty() || e.link.len() > SYMLINK_MAX || e.link.contains(&0) {
                    return Err(err(
                        e,
                        format!(
                            "symlink target of {} bytes: it must be 1 to {SYMLINK_MAX} bytes without NUL",
                            e.link.len()
                        ),
                    ));
                }
                NodeKind::Symlink(e.link.clone().into())
            }
            Kind::Char => NodeKind::CharDev {
                major: e.dev.0,
                minor: e.dev.1,
            },
            Kind::Block => NodeKind::BlockDev {
                major: e.dev.0,
                minor: e.dev.1,
            },
            Kind::Fifo => NodeKind::Fifo,
        };
        let id = self.push(Node {
            kind,
            meta,
            slot: None,
        });
        self.link(dir, &name, id, discard);
        Ok(())
    }

    /// The finished tree: every directory's entries, sorted by name.
    pub fn finish(self) -> Tree {
        let Builder {
            mut tree, children, ..
        } = self;
        // Exact capacities: no doubling slack in the arena or in any directory's entries.
        tree.nodes.shrink_to_fit();
        let mut counts = vec![0u32; tree.nodes.len()];
        for k in children.keys() {
            if let Some((p, _)) = k.split_first_chunk::<4>() {
                if let Some(c) = counts.get_mut(NodeId::from_be_bytes(*p) as usize) {
                    *c += 1;
                }
            }
        }
        let mut current: Option<(NodeId, Vec<DirEntry>)> = None;
        let store = |tree: &mut Tree, cur: Option<(NodeId, Vec<DirEntry>)>| {
            if let Some((d, mut v)) = cur {
                v.shrink_to_fit();
                if let NodeKind::Dir(entries) = &mut tree.node_mut(d).kind {
                    *entries = v;
                }
            }
        };
        for (k, node) in children {
            let Some((parent, name)) = k.split_first_chunk::<4>() else {
                continue;
            };
            let parent = NodeId::from_be_bytes(*parent);
            let entry = DirEntry {
                name: name.into(),
                node,
            };
            match &mut current {
                Some((d, v)) if *d == parent => v.push(entry),
                _ => {
                    store(&mut tree, current.take());
                    let n = counts.get(parent as usize).copied().unwrap_or(1);
                    let mut v = Vec::with_capacity(n as usize);
                    v.push(entry);
                    current = Some((parent, v));
                }
            }
        }
        store(&mut tree, current);
        tree
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn path_components() {
        let ok: &[(&[u8], &[&[u8]])] = &[
            (b"./a/b", &[b"a", b"b"]),
            (b"a//./b/", &[b"a", b"b"]),
            (b"./", &[]),
            (b".", &[]),
            (b"/", &[]),
            (b"/./", &[]),
        ];
        for (p, want) in ok {
            assert_eq!(components(p).unwrap(), *want, "{p:?}");
        }
        for bad in [&b""[..], b"/etc/passwd", b"a/../b", b"..", b"a/\0b"] {
            assert!(components(bad).is_err(), "{bad:?}");
        }
        assert!(components(&[b'x'; 256]).is_err());
        assert!(components(&[b'x'; 255]).is_ok());
    }
}
