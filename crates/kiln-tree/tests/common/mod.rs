//! Helpers shared by the tar tests: a recording placer, a tree comparison, and a builder for
//! hand-made archives.
#![allow(dead_code, unused_imports, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{self, Read};

use kiln_formats::fstree::{Contents, DataRef, FileData, NodeId, NodeKind, Placer, Tree};
pub use kiln_tree::tar::header::cstr;
use kiln_tree::tar::header::{put_number, Header, BLOCK, MAGIC_GNU, MAGIC_USTAR};
use zerocopy::IntoBytes;

/// A placer that keeps every file's packed bytes, as a streaming writer would place them.
#[derive(Default)]
pub struct Recorder {
    pub files: Vec<Vec<u8>>,
    pub discarded: Vec<u32>,
    /// Fail `place` once this many files were placed.
    pub fail_after: Option<usize>,
}

impl Placer for Recorder {
    fn place(&mut self, file: &FileData, data: &mut dyn Read) -> io::Result<u32> {
        if self.fail_after.is_some_and(|n| self.files.len() >= n) {
            return Err(io::Error::new(io::ErrorKind::StorageFull, "image is full"));
        }
        assert_eq!(
            file.data,
            DataRef::Empty,
            "the placer gets no data reference"
        );
        let mut v = Vec::new();
        data.read_to_end(&mut v)?;
        assert_eq!(
            v.len() as u64,
            file.stored_len(),
            "placer receives exactly the runs' bytes"
        );
        self.files.push(v);
        Ok(self.files.len() as u32 - 1)
    }

    fn discard(&mut self, index: u32) {
        self.discarded.push(index);
    }
}

/// How to read a file's stored (packed) bytes from a tree.
pub enum Bytes<'a> {
    /// Through a [`Contents`] (directory or indexed tar), run by run.
    Contents(&'a dyn Contents),
    /// From a recording placer (streamed tar).
    Placed(&'a Recorder),
}

impl Bytes<'_> {
    pub fn packed(&self, f: &FileData) -> Vec<u8> {
        match self {
            Bytes::Contents(c) => {
                let mut out = Vec::new();
                for r in f.runs() {
                    let mut buf = vec![0u8; r.len as usize];
                    c.read_at(f, r.offset, &mut buf).unwrap();
                    out.extend(buf);
                }
                out
            }
            Bytes::Placed(rec) => match f.data {
                DataRef::Placed(i) => rec.files[i as usize].clone(),
                DataRef::Empty => Vec::new(),
                ref other => panic!("streamed file has data {other:?}"),
            },
        }
    }
}

/// The logical content of a file with holes expanded (small files only).
pub fn logical(f: &FileData, b: &Bytes<'_>) -> Vec<u8> {
    let packed = b.packed(f);
    let mut out = vec![0u8; f.size as usize];
    let mut at = 0usize;
    for r in f.runs() {
        let n = r.len as usize;
        out[r.offset as usize..r.offset as usize + n].copy_from_slice(&packed[at..at + n]);
        at += n;
    }
    out
}

/// Which differences between a directory and its tar the format forces.
#[derive(Clone, Copy, Debug)]
pub struct Expect {
    /// mtimes carry nanoseconds (PAX); otherwise whole seconds (floor).
    pub nanos: bool,
    /// xattrs are stored.
    pub xattrs: bool,
    /// sparse files keep their runs; otherwise they are stored dense.
    pub sparse: bool,
    /// libarchive writes a pre-epoch time `sec + nsec` (sec < 0) as `-|sec|.nsec`, which the
    /// PAX rule (a decimal number) reads as `sec - nsec`; GNU tar and Go write the decimal.
    pub libarchive_times: bool,
}

fn paths(t: &Tree) -> BTreeMap<Vec<u8>, NodeId> {
    let mut m = BTreeMap::new();
    // walk_paths yields a hardlinked node once; collect every name through the entries.
    fn rec(t: &Tree, id: NodeId, path: &mut Vec<u8>, m: &mut BTreeMap<Vec<u8>, NodeId>) {
        for e in t.entries(id) {
            let len = path.len();
            path.push(b'/');
            path.extend_from_slice(&e.name);
            m.insert(path.clone(), e.node);
            rec(t, e.node, path, m);
            path.truncate(len);
        }
    }
    m.insert(b"/".to_vec(), kiln_formats::fstree::ROOT);
    rec(t, kiln_formats::fstree::ROOT, &mut Vec::new(), &mut m);
    m
}

/// Asserts that `got` (read from a tar) describes the same tree as `want` (read from the
/// directory the tar was made of), modulo what `ex` says the format cannot store. Returns the
/// number of paths compared.
pub fn assert_same_tree(
    want: &Tree,
    want_bytes: &Bytes<'_>,
    got: &Tree,
    got_bytes: &Bytes<'_>,
    ex: Expect,
) -> usize {
    let wp = paths(want);
    let gp = paths(got);
    let wk: Vec<_> = wp.keys().collect();
    let gk: Vec<_> = gp.keys().collect();
    if wk != gk {
        let missing: Vec<_> = wp
            .keys()
            .filter(|k| !gp.contains_key(*k))
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .take(10)
            .collect();
        let extra: Vec<_> = gp
            .keys()
            .filter(|k| !wp.contains_key(*k))
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .take(10)
            .collect();
        panic!("path sets differ: missing {missing:?}, extra {extra:?}");
    }
    // Hardlink identity: two paths share a node in `got` exactly when they do in `want`.
    let mut wgroups: BTreeMap<NodeId, Vec<&Vec<u8>>> = BTreeMap::new();
    let mut ggroups: BTreeMap<NodeId, Vec<&Vec<u8>>> = BTreeMap::new();
    for (p, &id) in &wp {
        wgroups.entry(id).or_default().push(p);
    }
    for (p, &id) in &gp {
        ggroups.entry(id).or_default().push(p);
    }
    let mut wg: Vec<_> = wgroups.into_values().collect();
    let mut gg: Vec<_> = ggroups.into_values().collect();
    wg.sort();
    gg.sort();
    assert_eq!(wg, gg, "hardlink groups differ");

    for (p, &wid) in &wp {
        let gid = gp[p];
        let (w, g) = (want.node(wid), got.node(gid));
        let ps = String::from_utf8_lossy(p);
        assert_eq!(w.meta.perm, g.meta.perm, "{ps}: permissions");
        assert_eq!(w.meta.uid, g.meta.uid, "{ps}: uid");
        assert_eq!(w.meta.gid, g.meta.gid, "{ps}: gid");
        let mut wt = w.meta.mtime;
        if !ex.nanos {
            wt.nsec = 0;
        }
        if ex.libarchive_times && wt.sec < 0 && wt.nsec > 0 {
            wt = kiln_formats::fstree::Timestamp {
                sec: wt.sec - 1,
                nsec: 1_000_000_000 - wt.nsec,
            };
        }
        assert_eq!(wt, g.meta.mtime, "{ps}: mtime");
        if ex.xattrs {
            assert_eq!(w.meta.xattrs, g.meta.xattrs, "{ps}: xattrs");
        } else {
            assert!(g.meta.xattrs.is_empty(), "{ps}: no xattrs expected");
        }
        match (&w.kind, &g.kind) {
            (NodeKind::File(wf), NodeKind::File(gf)) => {
                assert_eq!(wf.size, gf.size, "{ps}: size");
                if ex.sparse || wf.segments.is_none() {
                    assert_eq!(wf.segments, gf.segments, "{ps}: data runs");
                    assert_eq!(
                        want_bytes.packed(wf),
                        got_bytes.packed(gf),
                        "{ps}: stored bytes"
                    );
                } else {
                    assert_eq!(gf.segments, None, "{ps}: stored dense");
                    assert_eq!(
                        logical(wf, want_bytes),
                        logical(gf, got_bytes),
                        "{ps}: content"
                    );
                }
            }
            (NodeKind::Dir(_), NodeKind::Dir(_)) => {}
            (a, b) => assert_eq!(a, b, "{ps}: kind"),
        }
    }
    wp.len()
}

/// Builds tar archives byte by byte, including broken ones.
#[derive(Default)]
pub struct Ar {
    pub buf: Vec<u8>,
}

pub fn header(name: &[u8], typeflag: u8, size: u64) -> Header {
    let mut h = Header::zeroed();
    let n = name.len().min(100);
    h.name[..n].copy_from_slice(&name[..n]);
    put_number(&mut h.mode, 0o644);
    put_number(&mut h.uid, 1000);
    put_number(&mut h.gid, 100);
    put_number(&mut h.size, size as i64);
    put_number(&mut h.mtime, 1_700_000_000);
    h.typeflag = typeflag;
    h.magic.copy_from_slice(&MAGIC_USTAR[..6]);
    h.version.copy_from_slice(&MAGIC_USTAR[6..]);
    h
}

pub fn gnu_header(name: &[u8], typeflag: u8, size: u64) -> Header {
    let mut h = header(name, typeflag, size);
    h.magic.copy_from_slice(&MAGIC_GNU[..6]);
    h.version.copy_from_slice(&MAGIC_GNU[6..]);
    h
}

impl Ar {
    /// Appends a header (checksum set); returns its offset.
    pub fn push(&mut self, mut h: Header) -> u64 {
        h.set_checksum();
        let off = self.buf.len() as u64;
        self.buf.extend_from_slice(h.as_bytes());
        off
    }

    /// Appends data padded to a block.
    pub fn data(&mut self, d: &[u8]) {
        self.buf.extend_from_slice(d);
        let pad = d.len().next_multiple_of(BLOCK) - d.len();
        self.buf.extend(std::iter::repeat_n(0u8, pad));
    }

    pub fn file(&mut self, name: &[u8], d: &[u8]) -> u64 {
        let off = self.push(header(name, b'0', d.len() as u64));
        self.data(d);
        off
    }

    pub fn dir(&mut self, name: &[u8]) -> u64 {
        let mut h = header(name, b'5', 0);
        put_number(&mut h.mode, 0o755);
        self.push(h)
    }

    pub fn link(&mut self, name: &[u8], typeflag: u8, target: &[u8]) -> u64 {
        let mut h = header(name, typeflag, 0);
        h.linkname[..target.len()].copy_from_slice(target);
        self.push(h)
    }

    /// A PAX record with its length prefix.
    pub fn record(key: &str, value: &[u8]) -> Vec<u8> {
        let body = key.len() + value.len() + 3; // ' ', '=', '\n'
        let mut len = body + 1;
        while len != body + len.to_string().len() {
            len = body + len.to_string().len();
        }
        let mut r = format!("{len} {key}=").into_bytes();
        r.extend_from_slice(value);
        r.push(b'\n');
        r
    }

    /// A PAX header of type `t` (`x` or `g`) holding `records`; returns its offset.
    pub fn pax(&mut self, t: u8, records: &[(&str, &[u8])]) -> u64 {
        let data: Vec<u8> = records
            .iter()
            .flat_map(|(k, v)| Self::record(k, v))
            .collect();
        let off = self.push(header(b"./PaxHeaders/x", t, data.len() as u64));
        self.data(&data);
        off
    }

    /// Two zero blocks.
    pub fn end(&mut self) {
        self.buf.extend(std::iter::repeat_n(0u8, 2 * BLOCK));
    }
}
