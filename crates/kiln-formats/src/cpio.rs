//! cpio "newc" archives (the initramfs format; kernel Documentation/driver-api/early-userspace/
//! buffer-format.rst, and the "SVR4 portable" format of GNU cpio).
//!
//! Each member is a 110-byte ASCII header (`070701` and thirteen 8-digit hexadecimal fields),
//! the NUL-terminated name, padding to a multiple of 4 bytes counted from the header start, the
//! data, and padding to a multiple of 4 again. The archive ends with a member named
//! `TRAILER!!!`. Hard links share an inode number; as GNU cpio does, only the last member of a
//! link group carries the data and the earlier ones have size 0.
//!
//! The writer is deterministic: [`write_entries`] and [`write_tree`] sort members by path
//! bytes, number inodes 1, 2, 3… in that order and take every time from the input.

use std::io::{self, Read, Write};

use crate::fstree::{Contents, NodeKind, Tree};

/// Magic of a "newc" header without checksums.
pub const MAGIC_NEWC: &[u8; 6] = b"070701";
/// Magic of a "crc" header (same layout; `check` holds a byte sum of the data).
pub const MAGIC_CRC: &[u8; 6] = b"070702";
/// Length of a header in bytes: 6 magic + 13 fields × 8 hex digits.
pub const HEADER_LEN: usize = 110;
/// Name of the member that ends an archive.
pub const TRAILER: &[u8] = b"TRAILER!!!";

/// Errors reading or writing a cpio archive.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CpioError {
    /// The underlying reader or writer failed.
    #[error("cpio: {context}: {source}")]
    Io { context: String, source: io::Error },
    /// A header that is not "newc" at `offset`.
    #[error("cpio header at offset {offset}: {msg}")]
    BadHeader { offset: u64, msg: String },
    /// The archive ended before the trailer.
    #[error("cpio archive truncated at offset {offset}: {msg}")]
    Truncated { offset: u64, msg: String },
    /// A value does not fit a "newc" field (32 bits) for member `path`.
    #[error("cpio member {path:?}: {field} {value} does not fit the 32-bit newc field")]
    TooLarge {
        path: String,
        field: &'static str,
        value: u64,
    },
    /// A member name is unusable.
    #[error("cpio member {path:?}: {msg}")]
    BadName { path: String, msg: &'static str },
    /// Two members have the same path.
    #[error("cpio member {path:?} appears twice")]
    Duplicate { path: String },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> CpioError {
    let context = context.into();
    move |source| CpioError::Io { context, source }
}

/// The decoded fields of one member header.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Inode number; members with equal `ino` (and device) are hard links.
    pub ino: u32,
    /// Full `st_mode`: file type bits and permissions.
    pub mode: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Link count.
    pub nlink: u32,
    /// Modification time, seconds since the Unix epoch.
    pub mtime: u32,
    /// Size of the data that follows the name, in bytes.
    pub filesize: u32,
    /// Major number of the device the file lived on (kiln writes 0).
    pub dev_major: u32,
    /// Minor number of the device the file lived on (kiln writes 0).
    pub dev_minor: u32,
    /// Major number of a device node.
    pub rdev_major: u32,
    /// Minor number of a device node.
    pub rdev_minor: u32,
    /// Name length including the terminating NUL.
    pub namesize: u32,
    /// Checksum (`070702` only; 0 otherwise).
    pub check: u32,
}

impl Header {
    /// The 110 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..6].copy_from_slice(MAGIC_NEWC);
        let fields = [
            self.ino,
            self.mode,
            self.uid,
            self.gid,
            self.nlink,
            self.mtime,
            self.filesize,
            self.dev_major,
            self.dev_minor,
            self.rdev_major,
            self.rdev_minor,
            self.namesize,
            self.check,
        ];
        for (i, v) in fields.iter().enumerate() {
            let s = format!("{v:08X}");
            out[6 + i * 8..14 + i * 8].copy_from_slice(s.as_bytes());
        }
        out
    }

    /// Parses 110 header bytes found at `offset` (for messages).
    pub fn decode(b: &[u8], offset: u64) -> Result<Self, CpioError> {
        let bad = |msg: String| CpioError::BadHeader { offset, msg };
        if b.len() < HEADER_LEN {
            return Err(CpioError::Truncated {
                offset,
                msg: format!("header needs {HEADER_LEN} bytes, {} left", b.len()),
            });
        }
        let magic = &b[..6];
        if magic != MAGIC_NEWC && magic != MAGIC_CRC {
            return Err(bad(format!(
                "magic {:?}, expected \"070701\" or \"070702\"",
                String::from_utf8_lossy(magic)
            )));
        }
        let mut f = [0u32; 13];
        for (i, v) in f.iter_mut().enumerate() {
            let s = &b[6 + i * 8..14 + i * 8];
            let txt = std::str::from_utf8(s).map_err(|_| bad(format!("field {i} is not ASCII")))?;
            *v = u32::from_str_radix(txt, 16)
                .map_err(|_| bad(format!("field {i} {txt:?} is not 8 hexadecimal digits")))?;
        }
        Ok(Self {
            ino: f[0],
            mode: f[1],
            uid: f[2],
            gid: f[3],
            nlink: f[4],
            mtime: f[5],
            filesize: f[6],
            dev_major: f[7],
            dev_minor: f[8],
            rdev_major: f[9],
            rdev_minor: f[10],
            namesize: f[11],
            check: f[12],
        })
    }
}

/// Padding needed to bring `n` to a multiple of 4.
const fn pad4(n: u64) -> usize {
    ((4 - (n % 4)) % 4) as usize
}

/// Streams members into a "newc" archive. The caller chooses the order and inode numbers; use
/// [`write_entries`] or [`write_tree`] for the canonical, deterministic layout.
pub struct Writer<W: Write> {
    out: W,
    /// Bytes written so far (alignment is relative to the archive start).
    pos: u64,
}

impl<W: Write> Writer<W> {
    /// A writer at the start of an archive.
    pub fn new(out: W) -> Self {
        Self { out, pos: 0 }
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    fn put(&mut self, b: &[u8], what: &str) -> Result<(), CpioError> {
        self.out
            .write_all(b)
            .map_err(io_err(format!("writing {what} at offset {}", self.pos)))?;
        self.pos += b.len() as u64;
        Ok(())
    }

    /// Writes one member: `header` (its `namesize` and `filesize` are filled in here), `name`
    /// and exactly `size` bytes read from `data`.
    pub fn add(
        &mut self,
        mut header: Header,
        name: &[u8],
        size: u64,
        data: &mut dyn Read,
    ) -> Result<(), CpioError> {
        let shown = || String::from_utf8_lossy(name).into_owned();
        if name.is_empty() || name.contains(&0) {
            return Err(CpioError::BadName {
                path: shown(),
                msg: "name is empty or contains NUL",
            });
        }
        header.namesize = u32::try_from(name.len() + 1).map_err(|_| CpioError::TooLarge {
            path: shown(),
            field: "name length",
            value: name.len() as u64,
        })?;
        header.filesize = u32::try_from(size).map_err(|_| CpioError::TooLarge {
            path: shown(),
            field: "file size",
            value: size,
        })?;
        self.put(&header.encode(), "header")?;
        self.put(name, "name")?;
        let pad = pad4(self.pos + 1) + 1;
        self.put(&[0u8; 4][..pad], "name padding")?;
        let copied = io::copy(&mut data.take(size), &mut self.out)
            .map_err(io_err(format!("copying data of {:?}", shown())))?;
        if copied != size {
            return Err(CpioError::Io {
                context: format!("copying data of {:?}", shown()),
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("expected {size} bytes, got {copied}"),
                ),
            });
        }
        self.pos += size;
        let pad = pad4(self.pos);
        self.put(&[0u8; 4][..pad], "data padding")?;
        Ok(())
    }

    /// Writes the `TRAILER!!!` member and returns the inner writer.
    pub fn finish(mut self) -> Result<W, CpioError> {
        let h = Header {
            nlink: 1,
            ..Header::default()
        };
        self.add(h, TRAILER, 0, &mut io::empty())?;
        self.out.flush().map_err(io_err("flushing archive"))?;
        Ok(self.out)
    }
}

/// What a member is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file with its bytes.
    File(Vec<u8>),
    /// A symbolic link and its target.
    Symlink(Vec<u8>),
    /// A character device node.
    CharDev { major: u32, minor: u32 },
    /// A block device node.
    BlockDev { major: u32, minor: u32 },
    /// A named pipe.
    Fifo,
}

impl EntryKind {
    fn format_bits(&self) -> u32 {
        match self {
            EntryKind::Dir => 0o040000,
            EntryKind::File(_) => 0o100000,
            EntryKind::Symlink(_) => 0o120000,
            EntryKind::CharDev { .. } => 0o020000,
            EntryKind::BlockDev { .. } => 0o060000,
            EntryKind::Fifo => 0o010000,
        }
    }
}

/// A member described in memory (initrds are small; [`write_tree`] streams large trees).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Path without a leading `/` (`.` for the root directory).
    pub path: Vec<u8>,
    /// What it is, with its payload.
    pub kind: EntryKind,
    /// Permission bits (`mode & 0o7777`).
    pub perm: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Modification time, seconds since the Unix epoch.
    pub mtime: u32,
}

impl Entry {
    /// A root-owned directory.
    pub fn dir(path: &str, perm: u32, mtime: u32) -> Self {
        Self::new(path, EntryKind::Dir, perm, mtime)
    }

    /// A root-owned regular file.
    pub fn file(path: &str, data: Vec<u8>, perm: u32, mtime: u32) -> Self {
        Self::new(path, EntryKind::File(data), perm, mtime)
    }

    /// A root-owned member of any kind.
    pub fn new(path: &str, kind: EntryKind, perm: u32, mtime: u32) -> Self {
        Self {
            path: normalize_path(path.as_bytes()),
            kind,
            perm,
            uid: 0,
            gid: 0,
            mtime,
        }
    }
}

/// Strips leading `/` and `./`; the root becomes `.`.
fn normalize_path(p: &[u8]) -> Vec<u8> {
    let mut s = p;
    loop {
        if let Some(r) = s.strip_prefix(b"/") {
            s = r;
        } else if let Some(r) = s.strip_prefix(b"./") {
            s = r;
        } else {
            break;
        }
    }
    while s.len() > 1 && s.ends_with(b"/") {
        s = &s[..s.len() - 1];
    }
    if s.is_empty() {
        b".".to_vec()
    } else {
        s.to_vec()
    }
}

/// Sort key: the root first, then path bytes, so a directory precedes its contents.
fn sort_key(p: &[u8]) -> (bool, &[u8]) {
    (p != b".", p)
}

/// Writes `entries` as a complete archive: sorted by path, inodes numbered from 1 in that order,
/// followed by the trailer. Duplicate paths are an error.
pub fn write_entries<W: Write>(entries: &[Entry], out: W) -> Result<W, CpioError> {
    let mut order: Vec<&Entry> = entries.iter().collect();
    order.sort_by(|a, b| sort_key(&a.path).cmp(&sort_key(&b.path)));
    for w in order.windows(2) {
        if w[0].path == w[1].path {
            return Err(CpioError::Duplicate {
                path: String::from_utf8_lossy(&w[0].path).into_owned(),
            });
        }
    }
    let mut w = Writer::new(out);
    for (i, e) in order.iter().enumerate() {
        let (rmaj, rmin) = match e.kind {
            EntryKind::CharDev { major, minor } | EntryKind::BlockDev { major, minor } => {
                (major, minor)
            }
            _ => (0, 0),
        };
        let h = Header {
            ino: i as u32 + 1,
            mode: e.kind.format_bits() | (e.perm & 0o7777),
            uid: e.uid,
            gid: e.gid,
            nlink: if e.kind == EntryKind::Dir { 2 } else { 1 },
            mtime: e.mtime,
            rdev_major: rmaj,
            rdev_minor: rmin,
            ..Header::default()
        };
        let data: &[u8] = match &e.kind {
            EntryKind::File(d) | EntryKind::Symlink(d) => d,
            _ => &[],
        };
        w.add(h, &e.path, data.len() as u64, &mut &data[..])?;
    }
    w.finish()
}

/// Reads a tree file's bytes through [`Contents`], one data run at a time (holes read as
/// zeros), so [`write_tree`] never holds a whole file in memory.
struct TreeFileReader<'a> {
    contents: &'a dyn Contents,
    file: &'a crate::fstree::FileData,
    runs: Vec<crate::fstree::Segment>,
    pos: u64,
}

impl Read for TreeFileReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.file.size || buf.is_empty() {
            return Ok(0);
        }
        let want = (buf.len() as u64)
            .min(self.file.size - self.pos)
            .min(1 << 20);
        // Inside a run: read up to its end. In a hole: zeros up to the next run.
        for r in &self.runs {
            if self.pos >= r.offset && self.pos < r.offset + r.len {
                let n = want.min(r.offset + r.len - self.pos) as usize;
                self.contents.read_at(self.file, self.pos, &mut buf[..n])?;
                self.pos += n as u64;
                return Ok(n);
            }
        }
        let next = self
            .runs
            .iter()
            .map(|r| r.offset)
            .filter(|&o| o > self.pos)
            .min()
            .unwrap_or(self.file.size);
        let n = want.min(next - self.pos) as usize;
        buf[..n].fill(0);
        self.pos += n as u64;
        Ok(n)
    }
}

/// Writes every node of `tree` reachable from the root as a complete archive. Paths are stored
/// without a leading `/` (the root as `.`), in path-byte order; hard links share an inode and
/// the last link carries the data. Sockets are skipped (the format cannot carry them usefully).
pub fn write_tree<W: Write>(tree: &Tree, contents: &dyn Contents, out: W) -> Result<W, CpioError> {
    // Collect (path, node) for every directory entry, hard links included.
    let mut members: Vec<(Vec<u8>, u32)> = Vec::new();
    collect(tree, crate::fstree::ROOT, &mut Vec::new(), &mut members);
    members.sort_by(|a, b| sort_key(&a.0).cmp(&sort_key(&b.0)));
    let links = tree.link_counts();
    // Inode numbers follow first appearance in sorted order; remember each node's last member.
    let mut ino = vec![0u32; tree.nodes.len()];
    let mut last = vec![usize::MAX; tree.nodes.len()];
    let mut next = 1u32;
    for (i, (_, n)) in members.iter().enumerate() {
        let n = *n as usize;
        if ino[n] == 0 {
            ino[n] = next;
            next += 1;
        }
        last[n] = i;
    }
    let mut w = Writer::new(out);
    for (i, (path, id)) in members.iter().enumerate() {
        let node = tree.node(*id);
        let shown = || String::from_utf8_lossy(path).into_owned();
        let mtime = u32::try_from(node.meta.mtime.sec.max(0)).map_err(|_| CpioError::TooLarge {
            path: shown(),
            field: "mtime",
            value: node.meta.mtime.sec as u64,
        })?;
        let (rmaj, rmin) = match node.kind {
            NodeKind::CharDev { major, minor } | NodeKind::BlockDev { major, minor } => {
                (major, minor)
            }
            NodeKind::Socket => continue,
            _ => (0, 0),
        };
        let nlink = if node.is_dir() {
            2 + tree.subdir_count(*id)
        } else {
            links[*id as usize].max(1)
        };
        let h = Header {
            ino: ino[*id as usize],
            mode: node.mode(),
            uid: node.meta.uid,
            gid: node.meta.gid,
            nlink,
            mtime,
            rdev_major: rmaj,
            rdev_minor: rmin,
            ..Header::default()
        };
        match &node.kind {
            NodeKind::File(fd) if last[*id as usize] == i => {
                let mut r = TreeFileReader {
                    contents,
                    file: fd,
                    runs: fd.runs(),
                    pos: 0,
                };
                w.add(h, path, fd.size, &mut r)?;
            }
            NodeKind::Symlink(t) => w.add(h, path, t.len() as u64, &mut &t[..])?,
            _ => w.add(h, path, 0, &mut io::empty())?,
        }
    }
    w.finish()
}

fn collect(tree: &Tree, id: u32, path: &mut Vec<u8>, out: &mut Vec<(Vec<u8>, u32)>) {
    if path.is_empty() {
        out.push((b".".to_vec(), id));
    } else {
        out.push((path.clone(), id));
    }
    if !tree.node(id).is_dir() {
        return;
    }
    for e in tree.entries(id) {
        let len = path.len();
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(&e.name);
        collect(tree, e.node, path, out);
        path.truncate(len);
    }
}

/// One member read back from an archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Header fields as stored.
    pub header: Header,
    /// Name bytes without the NUL.
    pub name: Vec<u8>,
    /// Offset of the header in the archive.
    pub offset: u64,
    /// Offset of the data in the archive.
    pub data_offset: u64,
}

impl Member {
    /// The member's data as a slice of the archive it was read from.
    pub fn data<'a>(&self, archive: &'a [u8]) -> &'a [u8] {
        let start = self.data_offset as usize;
        archive
            .get(start..start + self.header.filesize as usize)
            .unwrap_or(&[])
    }
}

/// Parses an uncompressed archive up to and excluding its trailer. Every member's name and data
/// must lie within `archive`.
pub fn read(archive: &[u8]) -> Result<Vec<Member>, CpioError> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    loop {
        let offset = pos as u64;
        let rest = archive.get(pos..).unwrap_or(&[]);
        let header = Header::decode(rest, offset)?;
        let name_start = pos + HEADER_LEN;
        let name_len = header.namesize as usize;
        if name_len == 0 {
            return Err(CpioError::BadHeader {
                offset,
                msg: "namesize 0 (a name needs at least its NUL)".into(),
            });
        }
        let name_bytes = archive
            .get(name_start..name_start + name_len)
            .ok_or_else(|| CpioError::Truncated {
                offset,
                msg: format!("name of {name_len} bytes runs past the end"),
            })?;
        if name_bytes.last() != Some(&0) {
            return Err(CpioError::BadHeader {
                offset,
                msg: "name is not NUL-terminated".into(),
            });
        }
        let name = name_bytes[..name_len - 1].to_vec();
        let data_offset = name_start + name_len;
        let data_offset = data_offset + pad4(data_offset as u64);
        let size = header.filesize as usize;
        if name == TRAILER {
            return Ok(out);
        }
        if archive.len() < data_offset + size {
            return Err(CpioError::Truncated {
                offset,
                msg: format!(
                    "data of {:?} ({size} bytes at {data_offset}) runs past the end ({} bytes)",
                    String::from_utf8_lossy(&name),
                    archive.len()
                ),
            });
        }
        out.push(Member {
            header,
            name,
            offset,
            data_offset: data_offset as u64,
        });
        pos = data_offset + size;
        pos += pad4(pos as u64);
    }
}

/// A human listing: one line per member with offset, inode, mode, owner, links, size, mtime and
/// name (symlink targets after `->`).
pub fn dump(archive: &[u8]) -> Result<String, CpioError> {
    use std::fmt::Write as _;
    let mut s = String::new();
    for m in read(archive)? {
        let h = &m.header;
        let _ = write!(
            s,
            "{:>10} ino={:<5} mode={:06o} {}:{} nlink={} size={} mtime={} {}",
            m.offset,
            h.ino,
            h.mode,
            h.uid,
            h.gid,
            h.nlink,
            h.filesize,
            h.mtime,
            String::from_utf8_lossy(&m.name)
        );
        if h.mode & 0o170000 == 0o120000 {
            let _ = write!(s, " -> {}", String::from_utf8_lossy(m.data(archive)));
        }
        if matches!(h.mode & 0o170000, 0o020000 | 0o060000) {
            let _ = write!(s, " dev={}:{}", h.rdev_major, h.rdev_minor);
        }
        s.push('\n');
    }
    Ok(s)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::fstree::{DataRef, FileData, HostContents, Meta, Node, Timestamp};
    use std::process::Command;

    fn sample() -> Vec<Entry> {
        vec![
            Entry::file(
                "/init",
                b"#!/bin/sh\necho hi\n".to_vec(),
                0o755,
                1_700_000_000,
            ),
            Entry::dir("/", 0o755, 1_700_000_000),
            Entry::dir("etc", 0o755, 1_700_000_001),
            Entry::file("etc/conf", b"x".to_vec(), 0o644, 1_700_000_002),
            Entry::new(
                "bin/sh",
                EntryKind::Symlink(b"busybox".to_vec()),
                0o777,
                1_700_000_003,
            ),
            Entry::dir("bin", 0o700, 1_700_000_004),
            Entry::new(
                "dev/console",
                EntryKind::CharDev { major: 5, minor: 1 },
                0o600,
                1_700_000_005,
            ),
            Entry::dir("dev", 0o755, 1_700_000_006),
            Entry::file("empty", Vec::new(), 0o600, 7),
        ]
    }

    #[test]
    fn header_round_trip_and_layout() {
        let h = Header {
            ino: 1,
            mode: 0o100644,
            nlink: 1,
            mtime: 0x12345678,
            filesize: 3,
            namesize: 5,
            ..Header::default()
        };
        let b = h.encode();
        assert_eq!(&b[..6], b"070701");
        assert_eq!(&b[6..14], b"00000001");
        assert_eq!(&b[14..22], b"000081A4");
        assert_eq!(Header::decode(&b, 0).unwrap(), h);
        let mut bad = b;
        bad[0] = b'1';
        assert!(matches!(
            Header::decode(&bad, 9),
            Err(CpioError::BadHeader { offset: 9, .. })
        ));
    }

    #[test]
    fn members_are_sorted_padded_and_numbered() {
        let a = write_entries(&sample(), Vec::new()).unwrap();
        assert_eq!(a.len() % 4, 0);
        let m = read(&a).unwrap();
        let names: Vec<_> = m
            .iter()
            .map(|m| String::from_utf8(m.name.clone()).unwrap())
            .collect();
        assert_eq!(
            names,
            [
                ".",
                "bin",
                "bin/sh",
                "dev",
                "dev/console",
                "empty",
                "etc",
                "etc/conf",
                "init"
            ]
        );
        for (i, m) in m.iter().enumerate() {
            assert_eq!(m.header.ino, i as u32 + 1);
            assert_eq!(m.offset % 4, 0);
            assert_eq!(m.data_offset % 4, 0);
        }
        assert_eq!(m[8].data(&a), b"#!/bin/sh\necho hi\n");
        assert_eq!(m[2].data(&a), b"busybox");
        assert_eq!((m[4].header.rdev_major, m[4].header.rdev_minor), (5, 1));
        // The archive ends with the trailer member, padded.
        let t = b"TRAILER!!!\0";
        let pos = a.windows(t.len()).rposition(|w| w == t).unwrap();
        assert_eq!(&a[pos - HEADER_LEN..pos - HEADER_LEN + 6], b"070701");
        // Same input in another order: same bytes.
        let mut rev = sample();
        rev.reverse();
        assert_eq!(write_entries(&rev, Vec::new()).unwrap(), a);
        assert!(dump(&a).unwrap().contains("bin/sh -> busybox"));
    }

    #[test]
    fn duplicates_and_truncation_are_errors() {
        let mut e = sample();
        e.push(Entry::dir("/etc/", 0o755, 0));
        assert!(matches!(
            write_entries(&e, Vec::new()),
            Err(CpioError::Duplicate { .. })
        ));
        let a = write_entries(&sample(), Vec::new()).unwrap();
        for cut in [5, 200, a.len() - 20] {
            assert!(read(&a[..cut]).is_err(), "cut at {cut}");
        }
    }

    /// GNU cpio lists and extracts what we write, with the same names, modes, times and bytes.
    #[test]
    fn gnu_cpio_extracts_identical_tree() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let cpio = which("cpio");
        let a = write_entries(&sample(), Vec::new()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let arc = dir.path().join("a.cpio");
        std::fs::write(&arc, &a).unwrap();
        let list = Command::new(&cpio)
            .args(["-it", "--quiet", "-F"])
            .arg(&arc)
            .output()
            .unwrap();
        assert!(list.status.success(), "{list:?}");
        let listed = String::from_utf8(list.stdout).unwrap();
        assert_eq!(
            listed.lines().collect::<Vec<_>>(),
            [
                ".",
                "bin",
                "bin/sh",
                "dev",
                "dev/console",
                "empty",
                "etc",
                "etc/conf",
                "init"
            ]
        );
        let verbose = Command::new(&cpio)
            .args(["-itv", "--quiet", "-F"])
            .arg(&arc)
            .output()
            .unwrap();
        let v = String::from_utf8(verbose.stdout).unwrap();
        assert!(v.contains("lrwxrwxrwx"), "{v}");
        assert!(v.contains("bin/sh -> busybox"), "{v}");
        let out = dir.path().join("x");
        std::fs::create_dir(&out).unwrap();
        // Device nodes need root to extract; leave them out of the extraction check.
        let st = Command::new(&cpio)
            .args(["-idm", "--quiet", "--no-absolute-filenames", "-F"])
            .arg(&arc)
            .arg("--nonmatching")
            .arg("dev/console")
            .current_dir(&out)
            .status()
            .unwrap();
        assert!(st.success());
        for e in sample() {
            let p = out.join(std::str::from_utf8(&e.path).unwrap());
            if matches!(e.kind, EntryKind::CharDev { .. }) {
                continue;
            }
            let md = std::fs::symlink_metadata(&p).unwrap();
            match &e.kind {
                EntryKind::File(d) => {
                    assert_eq!(&std::fs::read(&p).unwrap(), d);
                    assert_eq!(md.permissions().mode() & 0o7777, e.perm);
                    assert_eq!(md.mtime(), i64::from(e.mtime), "{p:?}");
                }
                EntryKind::Symlink(t) => {
                    assert_eq!(
                        std::fs::read_link(&p)
                            .unwrap()
                            .as_os_str()
                            .as_encoded_bytes(),
                        &t[..]
                    );
                }
                EntryKind::Dir => assert!(md.is_dir()),
                _ => {}
            }
        }
    }

    #[test]
    fn tree_archive_with_hardlinks_matches_gnu_cpio() {
        let cpio = which("cpio");
        let mut t = Tree::default();
        let m = Meta {
            mtime: Timestamp::from_secs(1_600_000_000),
            ..Meta::default()
        };
        let data: std::sync::Arc<[u8]> = b"hello, initrd\n".to_vec().into();
        let f = t
            .insert(
                b"a/f",
                Node {
                    kind: NodeKind::File(FileData::dense(
                        data.len() as u64,
                        DataRef::Inline(data.clone()),
                    )),
                    meta: Meta {
                        perm: 0o640,
                        ..m.clone()
                    },
                    slot: None,
                },
                &m,
            )
            .unwrap();
        let b = t.mkdir_p(b"b", &m).unwrap();
        t.link(b, b"g", f);
        let a = write_tree(&t, &HostContents, Vec::new()).unwrap();
        let mem = read(&a).unwrap();
        let names: Vec<_> = mem.iter().map(|m| m.name.clone()).collect();
        assert_eq!(names, [&b"."[..], b"a", b"a/f", b"b", b"b/g"]);
        assert_eq!(mem[2].header.ino, mem[4].header.ino);
        assert_eq!(mem[2].header.nlink, 2);
        assert_eq!(mem[2].header.filesize, 0, "first link carries no data");
        assert_eq!(mem[4].data(&a), &data[..]);
        let dir = tempfile::tempdir().unwrap();
        let arc = dir.path().join("t.cpio");
        std::fs::write(&arc, &a).unwrap();
        let st = Command::new(&cpio)
            .args(["-idm", "--quiet", "-F"])
            .arg(&arc)
            .current_dir(dir.path())
            .status()
            .unwrap();
        assert!(st.success());
        use std::os::unix::fs::MetadataExt;
        let f1 = std::fs::metadata(dir.path().join("a/f")).unwrap();
        let f2 = std::fs::metadata(dir.path().join("b/g")).unwrap();
        assert_eq!(f1.ino(), f2.ino(), "extracted as hard links");
        assert_eq!(std::fs::read(dir.path().join("a/f")).unwrap(), &data[..]);
        assert_eq!(f1.mtime(), 1_600_000_000);
    }

    fn which(tool: &str) -> std::path::PathBuf {
        std::env::var_os("PATH")
            .and_then(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join(tool))
                    .find(|c| c.is_file())
            })
            .unwrap_or_else(|| panic!("{tool} not found in PATH; install it (CI does)"))
    }
}
