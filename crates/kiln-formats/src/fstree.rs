//! The format-neutral description of a filesystem tree: what every writer (ext4, EROFS, ISO 9660,
//! FAT) needs to know about the files it lays out, and nothing about where they came from.
//!
//! A [`Tree`] is an arena of [`Node`]s; node 0 is the root directory. Directories hold their
//! entries sorted by name bytes, so iteration order is canonical whatever order the source
//! delivered them in. A hardlink is two directory entries naming the same node. File bytes are
//! never stored here except for small generated files ([`DataRef::Inline`]); everything else is a
//! reference the [`Contents`] reader resolves when a writer copies data.

use std::io;
use std::path::Path;
use std::sync::Arc;

/// Index of a node in [`Tree::nodes`]. The root directory is always [`ROOT`].
pub type NodeId = u32;

/// The root directory's node id.
pub const ROOT: NodeId = 0;

/// Seconds and nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    /// Whole seconds; may be negative (before 1970).
    pub sec: i64,
    /// Nanoseconds, `0..1_000_000_000`.
    pub nsec: u32,
}

impl Timestamp {
    /// A timestamp with no fractional part.
    pub const fn from_secs(sec: i64) -> Self {
        Self { sec, nsec: 0 }
    }
}

/// One extended attribute: full name including its namespace prefix (`security.selinux`,
/// `user.foo`, `trusted.overlay.opaque`) and raw value.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Xattr {
    /// Full attribute name, e.g. `b"security.capability"`.
    pub name: Box<[u8]>,
    /// Raw value bytes (may be empty, may contain NULs).
    pub value: Box<[u8]>,
}

/// A contiguous run of a sparse file that holds data; everything between runs is a hole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Logical byte offset of the run within the file.
    pub offset: u64,
    /// Length of the run in bytes.
    pub len: u64,
}

/// Where a regular file's bytes live until a writer copies them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataRef {
    /// The file has no bytes to copy (size 0, or entirely a hole).
    Empty,
    /// A file on the host filesystem (directory sources, files added by a build).
    Host(Arc<Path>),
    /// Byte offset of the file's (packed, for sparse entries) data in the uncompressed tar
    /// that [`Contents`] was opened on.
    Tar(u64),
    /// Like [`DataRef::Tar`], for a file whose [`FileData::segments`] no longer describe how
    /// its bytes are packed in the tar (holes were found in its data by
    /// [`nonzero_runs`]): the offset, and the runs as the tar stores them.
    TarPacked(u64, Arc<[Segment]>),
    /// Bytes held in memory: small generated files (loader.conf, default slot payloads).
    Inline(Arc<[u8]>),
    /// Already written by a streaming writer; the index is private to that writer.
    Placed(u32),
}

/// A regular file's content description.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileData {
    /// Apparent size in bytes (`st_size`).
    pub size: u64,
    /// Where the bytes are.
    pub data: DataRef,
    /// Data runs of a sparse file, sorted and non-overlapping, within `0..size`. `None` means
    /// the whole file is data. For [`DataRef::Tar`] the runs are stored packed, one after the
    /// other, starting at the tar offset.
    pub segments: Option<Box<[Segment]>>,
}

impl FileData {
    /// A dense file whose bytes are at `data`.
    pub fn dense(size: u64, data: DataRef) -> Self {
        let data = if size == 0 { DataRef::Empty } else { data };
        Self {
            size,
            data,
            segments: None,
        }
    }

    /// The data runs of this file: the segments of a sparse file, or one run covering it all.
    pub fn runs(&self) -> Vec<Segment> {
        match &self.segments {
            Some(s) => s.to_vec(),
            None if self.size == 0 => Vec::new(),
            None => vec![Segment {
                offset: 0,
                len: self.size,
            }],
        }
    }

    /// Bytes of data actually stored (sum of runs).
    pub fn stored_len(&self) -> u64 {
        match &self.segments {
            Some(s) => s.iter().map(|s| s.len).sum(),
            None => self.size,
        }
    }
}

/// A directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// Name bytes: never empty, never `.` or `..`, no `/` or NUL, at most 255 bytes.
    pub name: Box<[u8]>,
    /// The node this entry names.
    pub node: NodeId,
}

/// What kind of object a node is, with its kind-specific payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// A directory; entries sorted by name bytes, unique names.
    Dir(Vec<DirEntry>),
    /// A regular file.
    File(FileData),
    /// A symbolic link and its target bytes (1..=4095 bytes).
    Symlink(Box<[u8]>),
    /// A character device.
    CharDev { major: u32, minor: u32 },
    /// A block device.
    BlockDev { major: u32, minor: u32 },
    /// A named pipe.
    Fifo,
    /// A Unix socket.
    Socket,
}

impl NodeKind {
    /// The `S_IFMT` bits for this kind.
    pub fn format_bits(&self) -> u32 {
        match self {
            NodeKind::Dir(_) => 0o040000,
            NodeKind::File(_) => 0o100000,
            NodeKind::Symlink(_) => 0o120000,
            NodeKind::CharDev { .. } => 0o020000,
            NodeKind::BlockDev { .. } => 0o060000,
            NodeKind::Fifo => 0o010000,
            NodeKind::Socket => 0o140000,
        }
    }

    /// A short lowercase name for messages and reports.
    pub fn name(&self) -> &'static str {
        match self {
            NodeKind::Dir(_) => "directory",
            NodeKind::File(_) => "file",
            NodeKind::Symlink(_) => "symlink",
            NodeKind::CharDev { .. } => "char device",
            NodeKind::BlockDev { .. } => "block device",
            NodeKind::Fifo => "fifo",
            NodeKind::Socket => "socket",
        }
    }
}

/// Ownership, permissions, times and xattrs of a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits including setuid/setgid/sticky (`mode & 0o7777`).
    pub perm: u16,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Modification time; writers use it for atime/ctime/crtime too, for reproducibility.
    pub mtime: Timestamp,
    /// Extended attributes, sorted by name, unique names.
    pub xattrs: Vec<Xattr>,
}

impl Default for Meta {
    fn default() -> Self {
        Self {
            perm: 0o755,
            uid: 0,
            gid: 0,
            mtime: Timestamp::default(),
            xattrs: Vec::new(),
        }
    }
}

/// A filesystem object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// Kind and kind-specific payload.
    pub kind: NodeKind,
    /// Ownership, permissions, times, xattrs.
    pub meta: Meta,
    /// Set when a build reserved this file as an injectable slot: blocks for `capacity` bytes
    /// must be allocated contiguously so the file can later be rewritten in place.
    pub slot: Option<SlotReservation>,
}

/// A file whose storage is reserved for later injection (see kiln-inject).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotReservation {
    /// Slot name, unique within an image.
    pub name: String,
    /// Bytes reserved, contiguous on disk.
    pub capacity: u64,
}

impl Node {
    /// The full `st_mode`: format bits plus permissions.
    pub fn mode(&self) -> u32 {
        self.kind.format_bits() | u32::from(self.meta.perm & 0o7777)
    }

    /// True for directories.
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, NodeKind::Dir(_))
    }
}

/// Errors from building or editing a tree.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TreeError {
    /// A path component is empty, `.`/`..` where not allowed, contains NUL, or is too long.
    #[error("{path}: {reason}")]
    BadName { path: String, reason: &'static str },
    /// A path runs through something that is not a directory.
    #[error("{path}: parent {parent} is a {kind}, not a directory")]
    NotADirectory {
        path: String,
        parent: String,
        kind: &'static str,
    },
}

/// An arena of nodes; node [`ROOT`] is the root directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tree {
    /// All nodes; a node may be unreachable after a replacement (writers skip those).
    pub nodes: Vec<Node>,
}

/// Longest name a directory entry may have (ext4, EROFS and Rock Ridge all allow 255).
pub const NAME_MAX: usize = 255;

impl Default for Tree {
    fn default() -> Self {
        Self::new(Meta::default())
    }
}

impl Tree {
    /// A tree holding only a root directory with `meta`.
    pub fn new(meta: Meta) -> Self {
        Self {
            nodes: vec![Node {
                kind: NodeKind::Dir(Vec::new()),
                meta,
                slot: None,
            }],
        }
    }

    /// The node with id `id`.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }

    /// Mutable access to node `id`.
    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id as usize]
    }

    /// Entries of directory `id` (empty for non-directories).
    pub fn entries(&self, id: NodeId) -> &[DirEntry] {
        match &self.node(id).kind {
            NodeKind::Dir(e) => e,
            _ => &[],
        }
    }

    /// Adds a node that no directory names yet; link it with [`Tree::link`].
    pub fn push(&mut self, node: Node) -> NodeId {
        let id = u32::try_from(self.nodes.len()).expect("more than 4 billion nodes");
        self.nodes.push(node);
        id
    }

    /// Finds `name` in directory `dir`.
    pub fn lookup(&self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        let e = self.entries(dir);
        e.binary_search_by(|x| (*x.name).cmp(name))
            .ok()
            .map(|i| e[i].node)
    }

    /// Makes `name` in directory `dir` name `node`, replacing any existing entry of that name
    /// (as tar extraction does). Returns the node previously named, if any.
    pub fn link(&mut self, dir: NodeId, name: &[u8], node: NodeId) -> Option<NodeId> {
        let NodeKind::Dir(entries) = &mut self.nodes[dir as usize].kind else {
            panic!("link into a non-directory node {dir}");
        };
        match entries.binary_search_by(|x| (*x.name).cmp(name)) {
            Ok(i) => Some(std::mem::replace(&mut entries[i].node, node)),
            Err(i) => {
                entries.insert(
                    i,
                    DirEntry {
                        name: name.into(),
                        node,
                    },
                );
                None
            }
        }
    }

    /// Removes `name` from directory `dir`, returning the node it named.
    pub fn unlink(&mut self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        let NodeKind::Dir(entries) = &mut self.nodes[dir as usize].kind else {
            return None;
        };
        let i = entries.binary_search_by(|x| (*x.name).cmp(name)).ok()?;
        Some(entries.remove(i).node)
    }

    /// Resolves a `/`-separated path relative to the root (leading `/` and `.` components are
    /// ignored). Does not follow symlinks.
    pub fn resolve(&self, path: &[u8]) -> Option<NodeId> {
        let mut cur = ROOT;
        for c in path
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty() && *c != b".")
        {
            cur = self.lookup(cur, c)?;
        }
        Some(cur)
    }

    /// Resolves `path` as the booted system would: symlinks in every component are followed
    /// (absolute targets from this tree's root, `..` stops at the root), at most 40 hops.
    pub fn resolve_follow(&self, path: &[u8]) -> Option<NodeId> {
        let mut comps: Vec<Vec<u8>> = path
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty() && *c != b".")
            .rev()
            .map(<[u8]>::to_vec)
            .collect();
        let mut stack: Vec<NodeId> = vec![ROOT];
        let mut hops = 0;
        while let Some(c) = comps.pop() {
            let cur = *stack.last()?;
            if c == b".." {
                if stack.len() > 1 {
                    stack.pop();
                }
                continue;
            }
            let next = self.lookup(cur, &c)?;
            match &self.node(next).kind {
                NodeKind::Symlink(target) => {
                    hops += 1;
                    if hops > 40 {
                        return None;
                    }
                    if target.first() == Some(&b'/') {
                        stack.truncate(1);
                    }
                    comps.extend(
                        target
                            .split(|&b| b == b'/')
                            .filter(|c| !c.is_empty() && *c != b".")
                            .rev()
                            .map(<[u8]>::to_vec),
                    );
                }
                _ => stack.push(next),
            }
        }
        stack.last().copied()
    }

    /// Creates (or returns) the directory at `path`, creating missing parents with `meta`.
    pub fn mkdir_p(&mut self, path: &[u8], meta: &Meta) -> Result<NodeId, TreeError> {
        let mut cur = ROOT;
        let mut walked = Vec::new();
        for c in path
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty() && *c != b".")
        {
            check_name(c, path)?;
            walked.extend_from_slice(b"/");
            walked.extend_from_slice(c);
            cur = match self.lookup(cur, c) {
                Some(n) if self.node(n).is_dir() => n,
                Some(n) => {
                    return Err(TreeError::NotADirectory {
                        path: String::from_utf8_lossy(path).into_owned(),
                        parent: String::from_utf8_lossy(&walked).into_owned(),
                        kind: self.node(n).kind.name(),
                    })
                }
                None => {
                    let n = self.push(Node {
                        kind: NodeKind::Dir(Vec::new()),
                        meta: meta.clone(),
                        slot: None,
                    });
                    self.link(cur, c, n);
                    n
                }
            };
        }
        Ok(cur)
    }

    /// Inserts `node` at `path` (parents created with `parent_meta`), replacing what was there.
    /// A directory replacing a directory keeps the old entries, as tar extraction does.
    pub fn insert(
        &mut self,
        path: &[u8],
        node: Node,
        parent_meta: &Meta,
    ) -> Result<NodeId, TreeError> {
        let (parent, name) = split_parent(path);
        if name.is_empty() {
            // The root itself: only metadata can change.
            self.nodes[ROOT as usize].meta = node.meta;
            return Ok(ROOT);
        }
        check_name(name, path)?;
        let dir = self.mkdir_p(parent, parent_meta)?;
        if let Some(old) = self.lookup(dir, name) {
            if self.node(old).is_dir() && node.is_dir() {
                self.nodes[old as usize].meta = node.meta;
                return Ok(old);
            }
        }
        let id = self.push(node);
        self.link(dir, name, id);
        Ok(id)
    }

    /// Node ids reachable from the root in canonical order: depth-first, pre-order, children
    /// in name order. A node reachable through several hardlinks appears once, at its first
    /// position. This is the order writers allocate in, and the order of a `tar --sort=name`
    /// stream of the same directory.
    pub fn walk(&self) -> Vec<NodeId> {
        let mut seen = vec![false; self.nodes.len()];
        let mut out = Vec::with_capacity(self.nodes.len());
        let mut stack = vec![ROOT];
        while let Some(id) = stack.pop() {
            if std::mem::replace(&mut seen[id as usize], true) {
                continue;
            }
            out.push(id);
            for e in self.entries(id).iter().rev() {
                if !seen[e.node as usize] {
                    stack.push(e.node);
                }
            }
        }
        out
    }

    /// Like [`Tree::walk`] but also yields each node's path (bytes, starting with `/`; the
    /// root is `/`). Costs a path allocation per node; meant for reports and error messages.
    pub fn walk_paths(&self, mut f: impl FnMut(&[u8], NodeId)) {
        let mut seen = vec![false; self.nodes.len()];
        let mut path = Vec::with_capacity(256);
        self.walk_paths_rec(ROOT, &mut path, &mut seen, &mut f);
    }

    fn walk_paths_rec(
        &self,
        id: NodeId,
        path: &mut Vec<u8>,
        seen: &mut [bool],
        f: &mut impl FnMut(&[u8], NodeId),
    ) {
        if std::mem::replace(&mut seen[id as usize], true) {
            return;
        }
        if path.is_empty() {
            f(b"/", id);
        } else {
            f(path, id);
        }
        for e in self.entries(id) {
            let len = path.len();
            path.push(b'/');
            path.extend_from_slice(&e.name);
            self.walk_paths_rec(e.node, path, seen, f);
            path.truncate(len);
        }
    }

    /// Number of directory entries naming each node (the root counts one, for itself).
    /// Unreachable nodes get 0.
    pub fn link_counts(&self) -> Vec<u32> {
        let mut n = vec![0u32; self.nodes.len()];
        n[ROOT as usize] = 1;
        for id in self.walk() {
            for e in self.entries(id) {
                n[e.node as usize] += 1;
            }
        }
        n
    }

    /// Number of subdirectories of each directory node (for `nlink = 2 + subdirs`).
    pub fn subdir_count(&self, id: NodeId) -> u32 {
        self.entries(id)
            .iter()
            .filter(|e| self.node(e.node).is_dir())
            .count() as u32
    }
}

/// Splits `a/b/c` into (`a/b`, `c`), ignoring trailing slashes.
pub fn split_parent(path: &[u8]) -> (&[u8], &[u8]) {
    let mut p = path;
    while p.last() == Some(&b'/') {
        p = &p[..p.len() - 1];
    }
    match p.iter().rposition(|&b| b == b'/') {
        Some(i) => (&p[..i], &p[i + 1..]),
        None => (&[], p),
    }
}

/// Checks one path component.
pub fn check_name(name: &[u8], path: &[u8]) -> Result<(), TreeError> {
    let reason = if name.is_empty() {
        "empty path component"
    } else if name == b"." || name == b".." {
        "`.` or `..` path component"
    } else if name.len() > NAME_MAX {
        "name longer than 255 bytes"
    } else if name.contains(&0) {
        "NUL byte in name"
    } else {
        return Ok(());
    };
    Err(TreeError::BadName {
        path: String::from_utf8_lossy(path).into_owned(),
        reason,
    })
}

/// Reads a whole regular file of `tree` (following symlinks) when it exists and is at most
/// `limit` bytes: `Ok(None)` when there is no such file, an error when it is larger or a
/// directory, or when its bytes cannot be read. Meant for configuration files.
pub fn read_file(
    tree: &Tree,
    contents: &dyn Contents,
    path: &str,
    limit: u64,
) -> io::Result<Option<Vec<u8>>> {
    let Some(id) = tree.resolve_follow(path.as_bytes()) else {
        return Ok(None);
    };
    let fd = match &tree.node(id).kind {
        NodeKind::File(fd) => fd,
        k => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{path}: a {}, not a regular file", k.name()),
            ))
        }
    };
    if fd.size > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{path}: {} bytes, more than the {limit} expected", fd.size),
        ));
    }
    let mut buf = vec![0u8; fd.size as usize];
    for run in fd.runs() {
        let dst = usize::try_from(run.offset)
            .ok()
            .and_then(|s| buf.get_mut(s..s + run.len as usize))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{path}: data run beyond its size"),
                )
            })?;
        contents
            .read_at(fd, run.offset, dst)
            .map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
    }
    Ok(Some(buf))
}

/// Reads the bytes a [`DataRef`] points at. Writers call it from many threads at once.
pub trait Contents: Sync {
    /// Fills `buf` with the file's bytes starting at logical offset `offset`. The range lies
    /// within one data run of `file` (writers never ask for holes).
    fn read_at(&self, file: &FileData, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// [`Contents`] for trees whose data is only [`DataRef::Host`], [`DataRef::Inline`] or
/// [`DataRef::Empty`] (directory sources and generated files).
#[derive(Clone, Copy, Debug, Default)]
pub struct HostContents;

impl Contents for HostContents {
    fn read_at(&self, file: &FileData, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        read_host_or_inline(file, offset, buf)
    }
}

/// Shared implementation of the host and in-memory cases, for other [`Contents`] to reuse.
pub fn read_host_or_inline(file: &FileData, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    match &file.data {
        DataRef::Host(p) => {
            let f = std::fs::File::open(p)?;
            f.read_exact_at(buf, offset).map_err(|e| {
                io::Error::new(e.kind(), format!("{}: read at {offset}: {e}", p.display()))
            })
        }
        DataRef::Inline(bytes) => {
            let start = usize::try_from(offset).ok().filter(|&o| o <= bytes.len());
            let src = start.and_then(|s| bytes.get(s..s + buf.len()));
            match src {
                Some(src) => {
                    buf.copy_from_slice(src);
                    Ok(())
                }
                None => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "inline data: read of {} bytes at {offset} past its end",
                        buf.len()
                    ),
                )),
            }
        }
        DataRef::Empty => {
            buf.fill(0);
            Ok(())
        }
        other => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("this content reader cannot read {other:?}"),
        )),
    }
}

/// The block size holes are found in: ext4's and EROFS's block. A file block (at a multiple
/// of it in the file) whose bytes are all zero is a hole when zeroes become holes.
pub const HOLE_BLOCK: u64 = 4096;

/// True when every byte of `b` is zero. Works eight bytes at a time, which the compiler turns
/// into vector instructions; at memory speed, it costs far less than the copy it rides along.
pub fn is_zero(b: &[u8]) -> bool {
    // A block that holds data nearly always has a non-zero byte among its first few: look
    // there first, so most blocks cost 16 bytes of reading instead of 4096.
    if b.iter().take(16).any(|&x| x != 0) {
        return false;
    }
    let (words, rest) = b.split_at(b.len() - b.len() % 8);
    words.chunks_exact(8).fold(0u64, |acc, w| {
        acc | u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]])
    }) == 0
        && rest.iter().all(|&x| x == 0)
}

/// The byte ranges of `buf` (file bytes starting at a multiple of [`HOLE_BLOCK`]) that make
/// up its blocks holding a non-zero byte, consecutive blocks merged: `(start, end)` pairs,
/// starts block-aligned, the last end possibly `buf.len()`.
pub fn nonzero_ranges(buf: &[u8], out: &mut Vec<(usize, usize)>) {
    out.clear();
    let bs = HOLE_BLOCK as usize;
    let mut at = 0usize;
    while at < buf.len() {
        let end = (at + bs).min(buf.len());
        if !is_zero(&buf[at..end]) {
            match out.last_mut() {
                Some(r) if r.1 == at => r.1 = end,
                _ => out.push((at, end)),
            }
        }
        at = end;
    }
}

/// Collects a file's data runs from its bytes as they go by: the blocks holding a non-zero
/// byte, merged. The result depends only on the file's logical content, never on how a source
/// stored it (dense, sparse tar, SEEK_HOLE), so every source of one tree gives the same runs.
#[derive(Debug)]
pub struct NonzeroRuns {
    size: u64,
    runs: Vec<Segment>,
    scratch: Vec<(usize, usize)>,
}

impl NonzeroRuns {
    /// Runs of a file of `size` bytes.
    pub fn new(size: u64) -> Self {
        Self {
            size,
            runs: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Scans `buf`, the file's bytes at `offset` (a multiple of [`HOLE_BLOCK`]), called in
    /// increasing offset order; returns the non-zero ranges of `buf` (see [`nonzero_ranges`]).
    pub fn scan(&mut self, offset: u64, buf: &[u8]) -> &[(usize, usize)] {
        nonzero_ranges(buf, &mut self.scratch);
        for &(s, e) in &self.scratch {
            let (s, e) = (offset + s as u64, offset + e as u64);
            match self.runs.last_mut() {
                Some(r) if r.offset + r.len >= s => r.len = e.max(r.offset + r.len) - r.offset,
                _ => self.runs.push(Segment {
                    offset: s,
                    len: e - s,
                }),
            }
        }
        &self.scratch
    }

    /// The file description: dense (`segments: None`) when every block holds data, else the
    /// runs (none at all for a file of zeroes, whose `data` becomes [`DataRef::Empty`]).
    pub fn finish(self, data: DataRef) -> FileData {
        let dense = self.size == 0
            || (self.runs.len() == 1 && self.runs[0].offset == 0 && self.runs[0].len == self.size);
        if dense {
            return FileData::dense(self.size, data);
        }
        FileData {
            size: self.size,
            data: if self.runs.is_empty() {
                DataRef::Empty
            } else {
                data
            },
            segments: Some(self.runs.into()),
        }
    }
}

/// The block ranges a file's data runs touch, as byte ranges `(start, end)`: starts at block
/// boundaries, ends at block boundaries or the file's end; touching runs merged. Only these
/// can hold non-zero bytes.
pub fn touched_blocks(file: &FileData) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for r in file.runs().iter().filter(|r| r.len > 0) {
        let s = r.offset / HOLE_BLOCK * HOLE_BLOCK;
        let e = (r.offset + r.len).div_ceil(HOLE_BLOCK) * HOLE_BLOCK;
        let e = e.min(file.size);
        match out.last_mut() {
            Some(l) if l.1 >= s => l.1 = l.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Reads a placed file's bytes from a one-pass stream (its data runs, packed, in order) as
/// logical chunks of at most `chunk` bytes covering [`touched_blocks`], holes between runs
/// filled with zeroes; `f(offset, bytes)` gets each chunk, offsets block-aligned and
/// increasing. Every packed byte is consumed exactly once.
pub fn stream_blocks(
    file: &FileData,
    data: &mut dyn io::Read,
    buf: &mut Vec<u8>,
    chunk: usize,
    f: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let chunk = (chunk.max(HOLE_BLOCK as usize) / HOLE_BLOCK as usize) * HOLE_BLOCK as usize;
    let runs = file.runs();
    let mut ri = 0usize;
    for (s, e) in touched_blocks(file) {
        let mut at = s;
        while at < e {
            let end = (at + chunk as u64).min(e);
            let n = (end - at) as usize;
            if buf.len() < n {
                buf.resize(n, 0);
            }
            let b = &mut buf[..n];
            b.fill(0);
            while let Some(r) = runs.get(ri) {
                let (rs, re) = (r.offset, r.offset + r.len);
                if rs >= end {
                    break;
                }
                let (cs, ce) = (rs.max(at), re.min(end));
                if ce > cs {
                    data.read_exact(&mut b[(cs - at) as usize..(ce - at) as usize])?;
                }
                if re > end {
                    break;
                }
                ri += 1;
            }
            f(at, b)?;
            at = end;
        }
    }
    Ok(())
}

/// Finds the holes in a file whose bytes `contents` reads: reads the blocks its data runs
/// touch, in chunks of `buf`'s length, and returns the file with the data runs of
/// [`NonzeroRuns`]. For a tar-backed file whose runs change, the data reference keeps the
/// tar's packing ([`DataRef::TarPacked`]).
pub fn find_holes(
    file: &FileData,
    contents: &dyn Contents,
    buf: &mut [u8],
) -> io::Result<FileData> {
    find_holes_until(file, contents, buf, u64::MAX)
}

/// [`find_holes`] for a writer that stores a file with holes only when at most half of its
/// bytes are data (a compressed EROFS image: see `erofs::writer::store::chunked`): once more
/// than half of the file is known to be data, the rest is not read and the file is returned
/// as it was. Such a file is stored from its bytes either way (holes read as zeroes), so the
/// image is the one [`find_holes`] gives, for about half the reading on dense files. The
/// first chunk covers just over half of the file, so a small dense file takes one read too.
pub fn find_mostly_holes(
    file: &FileData,
    contents: &dyn Contents,
    buf: &mut [u8],
) -> io::Result<FileData> {
    find_holes_until(file, contents, buf, file.size / 2)
}

/// Finds holes until more than `data_limit` bytes of data are found (then `file` is returned
/// unchanged).
fn find_holes_until(
    file: &FileData,
    contents: &dyn Contents,
    buf: &mut [u8],
    data_limit: u64,
) -> io::Result<FileData> {
    let mut runs = NonzeroRuns::new(file.size);
    let step = (buf.len() as u64 / HOLE_BLOCK).max(1) * HOLE_BLOCK;
    // With a limit, the first read stops one block past it.
    let mut first = if data_limit < file.size {
        (data_limit / HOLE_BLOCK + 1) * HOLE_BLOCK
    } else {
        step
    }
    .min(step);
    let mut data = 0u64;
    for (s, e) in touched_blocks(file) {
        let mut at = s;
        while at < e {
            let end = (at + first).min(e);
            first = step;
            let b = &mut buf[..(end - at) as usize];
            read_logical(file, contents, at, b)?;
            data += runs
                .scan(at, b)
                .iter()
                .map(|&(s, e)| (e - s) as u64)
                .sum::<u64>();
            if data > data_limit {
                return Ok(file.clone());
            }
            at = end;
        }
    }
    let out = runs.finish(file.data.clone());
    // A tar-backed file whose runs changed keeps the tar's packing in its reference.
    Ok(match (&file.data, &out.data) {
        (DataRef::Tar(off), DataRef::Tar(_)) if out.segments != file.segments => FileData {
            data: DataRef::TarPacked(*off, file.runs().into()),
            ..out
        },
        _ => out,
    })
}

/// Reads logical bytes `[offset, offset + buf.len())` of `file`, zeroes in its holes (a
/// [`Contents`] reader is only asked for bytes inside data runs).
fn read_logical(
    file: &FileData,
    contents: &dyn Contents,
    offset: u64,
    buf: &mut [u8],
) -> io::Result<()> {
    let end = offset + buf.len() as u64;
    if file.segments.is_none() {
        return contents.read_at(file, offset, buf);
    }
    buf.fill(0);
    for r in file.runs() {
        let (s, e) = (r.offset.max(offset), (r.offset + r.len).min(end));
        if s < e {
            contents.read_at(
                file,
                s,
                &mut buf[(s - offset) as usize..(e - offset) as usize],
            )?;
        }
    }
    Ok(())
}

/// A placed file's logical bytes (holes as zeroes) from its packed one-pass stream.
pub struct Unpack<'a> {
    runs: Vec<Segment>,
    ri: usize,
    pos: u64,
    size: u64,
    inner: &'a mut dyn io::Read,
}

impl<'a> Unpack<'a> {
    /// Reads `file`'s runs, packed, from `inner`.
    pub fn new(file: &FileData, inner: &'a mut dyn io::Read) -> Self {
        Self {
            runs: file.runs(),
            ri: 0,
            pos: 0,
            size: file.size,
            inner,
        }
    }
}

impl io::Read for Unpack<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self
            .runs
            .get(self.ri)
            .is_some_and(|r| r.offset + r.len <= self.pos)
        {
            self.ri += 1;
        }
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let (is_data, until) = match self.runs.get(self.ri) {
            Some(r) if r.offset <= self.pos => (true, r.offset + r.len),
            Some(r) => (false, r.offset),
            None => (false, self.size),
        };
        let n = (until - self.pos).min(buf.len() as u64) as usize;
        let n = if is_data {
            self.inner.read(&mut buf[..n])?
        } else {
            buf[..n].fill(0);
            n
        };
        self.pos += n as u64;
        Ok(n)
    }
}

/// Receives file bytes during a single pass over a source that cannot be read twice (a
/// compressed tar, stdin). A writer implements it to place each file's data in the output as it
/// arrives; the tree then records [`DataRef::Placed`] with the returned index and the writer lays
/// out the metadata once the tree is complete.
pub trait Placer {
    /// Stores a file's data. `file` gives the size and the data runs (its `data` is
    /// [`DataRef::Empty`]); `data` yields exactly the runs' bytes, packed, in order.
    fn place(&mut self, file: &FileData, data: &mut dyn io::Read) -> io::Result<u32>;

    /// Tells the writer that a placed file was replaced by a later entry of the same name and
    /// its storage may be reclaimed.
    fn discard(&mut self, _index: u32) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(size: u64) -> Node {
        Node {
            kind: NodeKind::File(FileData::dense(
                size,
                DataRef::Inline(vec![0; size as usize].into()),
            )),
            meta: Meta::default(),
            slot: None,
        }
    }

    /// Inline data, counting the bytes read.
    #[derive(Default)]
    struct Counting(std::sync::atomic::AtomicU64);

    impl Contents for Counting {
        fn read_at(&self, f: &FileData, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            self.0
                .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
            read_host_or_inline(f, offset, buf)
        }
    }

    /// `find_mostly_holes` gives exactly `find_holes`'s runs to a file that is at most half
    /// data, leaves any other file as it was, and reads little more than half of a dense one.
    #[test]
    fn mostly_holes_agrees_where_it_matters_and_reads_half() {
        let b = HOLE_BLOCK as usize;
        // Per block: 1 = data, 0 = zeroes; then the bytes of a partial last block (data).
        let cases: &[(&str, usize)] = &[
            ("1111111111111111111111111111111111111111", 0),
            ("1111111111000000000000000000000000000000", 0),
            ("0000000000000000000000000000001111111111", 100),
            ("1010101010101010101010101010101010101010", 0),
            ("1010101010101010101010101010101010101011", 0),
            ("0000000000000000000011111111111111111111", 1),
            ("0000000000000000000000000000000000000000", 0),
            ("1", 5),
            ("", 7),
        ];
        for &(blocks, tail) in cases {
            let mut bytes = Vec::new();
            for c in blocks.bytes() {
                bytes.extend(std::iter::repeat_n(u8::from(c == b'1') * 7, b));
            }
            bytes.extend(std::iter::repeat_n(9u8, tail));
            let f = FileData::dense(bytes.len() as u64, DataRef::Inline(bytes.into()));
            for buf_blocks in [256, 3] {
                let mut buf = vec![0u8; buf_blocks * b];
                let full = find_holes(&f, &HostContents, &mut buf).unwrap();
                let c = Counting::default();
                let mostly = find_mostly_holes(&f, &c, &mut buf).unwrap();
                let read = c.0.into_inner();
                let what = format!("{blocks}+{tail} with a {buf_blocks}-block buffer");
                if full.stored_len() * 2 <= f.size {
                    assert_eq!(mostly, full, "{what}");
                    assert!(mostly.segments.is_some(), "{what}");
                } else {
                    assert_eq!(mostly, f, "{what}");
                }
                if !blocks.contains('0') && blocks.len() > 1 {
                    assert!(read <= f.size / 2 + HOLE_BLOCK, "{what}: read {read}");
                }
            }
        }
    }

    #[test]
    fn insert_resolve_and_walk_in_canonical_order() {
        let mut t = Tree::default();
        let m = Meta::default();
        for p in ["/b/z", "/a", "/b/y", "/c/d/e"] {
            t.insert(p.as_bytes(), file(1), &m).unwrap();
        }
        let mut seen = Vec::new();
        t.walk_paths(|p, _| seen.push(String::from_utf8(p.to_vec()).unwrap()));
        assert_eq!(
            seen,
            ["/", "/a", "/b", "/b/y", "/b/z", "/c", "/c/d", "/c/d/e"]
        );
        assert!(t.resolve(b"/b/y").is_some());
        assert!(t.resolve(b"b/./y").is_some());
        assert!(t.resolve(b"/b/x").is_none());
    }

    #[test]
    fn later_entry_replaces_earlier_but_dirs_merge() {
        let mut t = Tree::default();
        let m = Meta::default();
        t.insert(b"d/f", file(1), &m).unwrap();
        let new_dir = Node {
            kind: NodeKind::Dir(vec![]),
            meta: Meta {
                perm: 0o700,
                ..m.clone()
            },
            slot: None,
        };
        t.insert(b"d", new_dir, &m).unwrap();
        let d = t.resolve(b"d").unwrap();
        assert_eq!(t.node(d).meta.perm, 0o700);
        assert!(
            t.resolve(b"d/f").is_some(),
            "directory over directory keeps entries"
        );
        t.insert(b"d/f", file(7), &m).unwrap();
        let f = t.resolve(b"d/f").unwrap();
        assert!(matches!(&t.node(f).kind, NodeKind::File(d) if d.size == 7));
    }

    #[test]
    fn hardlinks_counted_once_in_walk() {
        let mut t = Tree::default();
        let m = Meta::default();
        let f = t.insert(b"a/f", file(3), &m).unwrap();
        let b = t.mkdir_p(b"b", &m).unwrap();
        t.link(b, b"g", f);
        assert_eq!(t.walk().iter().filter(|&&n| n == f).count(), 1);
        assert_eq!(t.link_counts()[f as usize], 2);
    }

    #[test]
    fn resolve_follow_and_read_file_follow_symlinks() {
        let mut t = Tree::default();
        let m = Meta::default();
        t.insert(b"/usr/lib/os-release", file(3), &m).unwrap();
        let link = |target: &[u8]| Node {
            kind: NodeKind::Symlink(target.into()),
            meta: Meta::default(),
            slot: None,
        };
        t.insert(b"/etc/os-release", link(b"../usr/lib/os-release"), &m)
            .unwrap();
        t.insert(b"/lib", link(b"usr/lib"), &m).unwrap();
        t.insert(b"/loop", link(b"/loop"), &m).unwrap();
        let target = t.resolve(b"/usr/lib/os-release");
        assert_eq!(t.resolve_follow(b"/etc/os-release"), target);
        assert_eq!(t.resolve_follow(b"/lib/os-release"), target);
        assert_eq!(t.resolve_follow(b"/loop/x"), None);
        assert_eq!(
            read_file(&t, &HostContents, "/etc/os-release", 10)
                .unwrap()
                .unwrap(),
            vec![0; 3]
        );
        assert!(read_file(&t, &HostContents, "/nope", 10).unwrap().is_none());
        assert!(read_file(&t, &HostContents, "/etc/os-release", 2).is_err());
        assert!(read_file(&t, &HostContents, "/usr", 2).is_err());
    }

    #[test]
    fn bad_names_rejected() {
        let mut t = Tree::default();
        let m = Meta::default();
        for p in [&b"a/../b"[..], b"a/\0", &[b'x'; 256][..]] {
            assert!(
                t.insert(p, file(0), &m).is_err(),
                "{:?}",
                String::from_utf8_lossy(p)
            );
        }
        t.insert(b"f", file(0), &m).unwrap();
        assert!(matches!(
            t.insert(b"f/g", file(0), &m),
            Err(TreeError::NotADirectory { .. })
        ));
    }
}
