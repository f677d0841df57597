//! Whole-filesystem tests: streamed and indexed writes agree byte for byte, slots rewrite
//! cleanly, our reader reads back what was written, and e2fsck/debugfs (the reference tools)
//! accept the results.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::Cursor;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use kiln_testkit::{pseudo_random, require_tool, run, run_ok};

use super::reader::Reader;
use super::*;
use crate::fstree::{
    DataRef, FileData, HostContents, Meta, Node, NodeKind, Placer, Segment, SlotReservation,
    Timestamp, Tree, Xattr,
};
use crate::sink::{FileSink, MemSink};

fn meta(perm: u16, sec: i64) -> Meta {
    Meta {
        perm,
        uid: 1000,
        gid: 100,
        mtime: Timestamp {
            sec,
            nsec: 123_456_789,
        },
        xattrs: Vec::new(),
    }
}

fn file(data: Vec<u8>) -> Node {
    Node {
        kind: NodeKind::File(FileData::dense(
            data.len() as u64,
            DataRef::Inline(data.into()),
        )),
        meta: meta(0o644, 1_700_000_000),
        slot: None,
    }
}

fn sparse(size: u64, runs: &[(u64, u64)]) -> Node {
    let mut bytes = vec![0u8; size as usize];
    for (i, &(o, l)) in runs.iter().enumerate() {
        bytes[o as usize..(o + l) as usize]
            .copy_from_slice(&pseudo_random(i as u64 + 50, l as usize));
    }
    Node {
        kind: NodeKind::File(FileData {
            size,
            data: DataRef::Inline(bytes.into()),
            segments: Some(
                runs.iter()
                    .map(|&(offset, len)| Segment { offset, len })
                    .collect(),
            ),
        }),
        meta: meta(0o600, 1_600_000_000),
        slot: None,
    }
}

/// A tree touching every feature the writer has: kinds, sizes, sparse runs, xattrs inline and
/// in (shared) blocks, hardlinks, an indexed directory, fast and slow symlinks, devices.
fn sample_tree() -> Tree {
    let mut t = Tree::new(meta(0o755, 1_650_000_000));
    let m = meta(0o755, 1_650_000_000);
    for (i, size) in [0usize, 1, 60, 4095, 4096, 4097, 100_000, 1 << 20]
        .into_iter()
        .enumerate()
    {
        t.insert(
            format!("files/f{i}").as_bytes(),
            file(pseudo_random(i as u64, size)),
            &m,
        )
        .unwrap();
    }
    t.insert(
        b"files/sparse",
        sparse(
            10 << 20,
            &[(4096, 100), (5 << 20, 8192), ((10 << 20) - 10, 10)],
        ),
        &m,
    )
    .unwrap();
    t.insert(b"files/all-hole", sparse(1 << 20, &[]), &m)
        .unwrap();
    let mut x = file(b"xattrs".to_vec());
    x.meta.xattrs = vec![
        Xattr {
            name: b"security.selinux".as_slice().into(),
            value: b"system_u:object_r:bin_t:s0\0".as_slice().into(),
        },
        Xattr {
            name: b"user.big".as_slice().into(),
            value: pseudo_random(3, 2000).into(),
        },
    ];
    let xid = t.insert(b"x/with-xattrs", x.clone(), &m).unwrap();
    t.insert(b"x/same-block", x, &m).unwrap();
    let hl = t.resolve(b"files/f3").unwrap();
    let d = t.mkdir_p(b"links", &m).unwrap();
    t.link(d, b"hard", hl);
    for (name, target) in [
        (&b"fast"[..], b"../files/f1".to_vec()),
        (b"slow", vec![b'y'; 200]),
    ] {
        t.insert(
            [&b"links/"[..], name].concat().as_slice(),
            Node {
                kind: NodeKind::Symlink(target.into()),
                meta: meta(0o777, 1),
                slot: None,
            },
            &m,
        )
        .unwrap();
    }
    for (name, kind) in [
        ("dev/null", NodeKind::CharDev { major: 1, minor: 3 }),
        (
            "dev/big",
            NodeKind::BlockDev {
                major: 4000,
                minor: 300_000,
            },
        ),
        ("dev/fifo", NodeKind::Fifo),
        ("dev/sock", NodeKind::Socket),
    ] {
        t.insert(
            name.as_bytes(),
            Node {
                kind,
                meta: meta(0o600, -5),
                slot: None,
            },
            &m,
        )
        .unwrap();
    }
    for i in 0..3000 {
        t.insert(
            format!("many/entry-{i:05}-{}", "z".repeat(i % 30)).as_bytes(),
            file(vec![b'e'; i % 3]),
            &m,
        )
        .unwrap();
    }
    // High bytes hash differently with signed chars: e2fsck checks the htree order.
    for i in 0..600u32 {
        let name = [
            b"hi-".as_slice(),
            &[0x80 + (i % 128) as u8, 0xFF - (i / 128) as u8],
            format!("-{i}").as_bytes(),
        ]
        .concat();
        t.insert(
            [b"high/".as_slice(), &name].concat().as_slice(),
            file(vec![]),
            &m,
        )
        .unwrap();
    }
    let _ = xid;
    t
}

fn opts() -> Options {
    let mut o = Options::from_seed(
        Some(&crate::repart::Uuid::from_bytes([7; 16])),
        Size::Minimize {
            extra_bytes: 0,
            extra_inodes: 0,
        },
    );
    o.timestamp = 1_700_000_000;
    o
}

fn build_mem(tree: &Tree, o: &Options) -> Vec<u8> {
    let p = plan(tree, o).unwrap();
    let sink = MemSink::new(p.size_bytes() as usize);
    p.write(tree, &HostContents, &sink).unwrap();
    sink.into_inner()
}

fn e2fsck_bytes(img: &[u8]) {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("img");
    fs::write(&f, img).unwrap();
    e2fsck(&f);
}

fn e2fsck(f: &Path) {
    let out = run(Command::new(require_tool("e2fsck")).arg("-fn").arg(f));
    assert!(
        out.status.success(),
        "e2fsck -fn: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Feeds the tree's files to a stream writer in canonical order, as a `tar --sort=name`
/// stream would, and returns the image.
fn build_streamed(tree: &Tree, o: &Options, len: usize, extra_discarded: bool) -> Vec<u8> {
    let sink = MemSink::new(len);
    let mut w = StreamWriter::new(o, &sink).unwrap();
    let mut t2 = tree.clone();
    for id in tree.walk() {
        let NodeKind::File(fd) = &tree.node(id).kind else {
            continue;
        };
        if extra_discarded && id == 5 {
            // A file that a later entry of the same name replaces: placed, then discarded.
            let junk = FileData::dense(50_000, DataRef::Empty);
            let i = w.place(&junk, &mut Cursor::new(vec![9u8; 50_000])).unwrap();
            w.discard(i);
        }
        let mut packed = Vec::new();
        let all = match &fd.data {
            DataRef::Inline(b) => b.clone(),
            DataRef::Empty => Arc::from(&[][..]),
            other => panic!("{other:?}"),
        };
        for r in fd.runs() {
            packed.extend_from_slice(&all[r.offset as usize..(r.offset + r.len) as usize]);
        }
        let shape = FileData {
            size: fd.size,
            data: DataRef::Empty,
            segments: fd.segments.clone(),
        };
        let idx = w.place(&shape, &mut Cursor::new(packed)).unwrap();
        if let NodeKind::File(fd2) = &mut t2.node_mut(id).kind {
            fd2.data = DataRef::Placed(idx);
        }
    }
    w.finish(&t2, &HostContents).unwrap();
    let mut v = sink.into_inner();
    v.truncate(len);
    v
}

/// Reads every entry of `tree` back from `img` with kiln's reader and compares it.
fn assert_reads_back(tree: &Tree, img: Vec<u8>) -> Reader<Vec<u8>> {
    let r = Reader::open(img).unwrap();
    tree.walk_paths(|path, id| {
        let ino = r
            .resolve(path)
            .unwrap()
            .unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(path)));
        let node = tree.node(id);
        let inode = r.inode(ino).unwrap();
        assert_eq!(
            u32::from(inode.mode.get()),
            node.mode(),
            "{}",
            String::from_utf8_lossy(path)
        );
        assert_eq!(Reader::<Vec<u8>>::mtime(&inode), node.meta.mtime);
        match &node.kind {
            NodeKind::File(fd) => {
                let DataRef::Inline(b) = &fd.data else {
                    assert_eq!(fd.stored_len(), 0);
                    return;
                };
                let mut want = b.to_vec();
                // Holes read as zeroes whatever the inline buffer holds there.
                if let Some(segs) = &fd.segments {
                    let mut z = vec![0u8; fd.size as usize];
                    for s in segs.iter() {
                        z[s.offset as usize..(s.offset + s.len) as usize]
                            .copy_from_slice(&want[s.offset as usize..(s.offset + s.len) as usize]);
                    }
                    want = z;
                }
                assert_eq!(r.read_data(ino).unwrap(), want);
            }
            NodeKind::Symlink(t) => assert_eq!(&r.symlink_target(ino).unwrap()[..], &t[..]),
            _ => {}
        }
        let want_x: Vec<(Vec<u8>, Vec<u8>)> = node
            .meta
            .xattrs
            .iter()
            .map(|x| (x.name.to_vec(), x.value.to_vec()))
            .collect();
        assert_eq!(r.xattrs(ino).unwrap(), want_x);
    });
    r
}

#[test]
fn e2fsck_accepts_the_sample_tree_and_reader_reads_it_back() {
    let tree = sample_tree();
    let img = build_mem(&tree, &opts());
    e2fsck_bytes(&img);
    let r = assert_reads_back(&tree, img);
    assert!(
        r.inode(r.resolve(b"/many").unwrap().unwrap())
            .unwrap()
            .flags
            .get()
            & layout::INODE_INDEX_FL
            != 0
    );
    // Dumps render without error.
    assert!(dump::superblock(&r).contains("uuid"));
    assert!(dump::tree(&r).unwrap().contains("/links/slow"));
    assert!(dump::inode(&r, 2).unwrap().contains("inode 2"));
}

#[test]
fn streamed_and_indexed_images_are_identical() {
    let tree = sample_tree();
    let o = opts();
    let a = build_mem(&tree, &o);
    let b = build_streamed(&tree, &o, a.len(), false);
    assert!(a == b, "stream and indexed writes differ");
    // Data placed and then discarded (a replaced tar entry) leaves a clean filesystem.
    let c = build_streamed(&tree, &o, a.len() + (1 << 20), true);
    e2fsck_bytes(&c[..]);
}

#[test]
fn fixed_size_with_more_than_64_groups_uses_second_meta_group() {
    // 9 GiB, sparse: 72 groups, so descriptors live in groups 0, 1, 63 and 64, 65.
    let tree = sample_tree();
    let mut o = opts();
    o.size = Size::Fixed(9 << 30);
    o.journal = true;
    let p = plan(&tree, &o).unwrap();
    assert_eq!(p.groups, 72);
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("img");
    let file = fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&f)
        .unwrap();
    file.set_len(9 << 30).unwrap();
    p.write(&tree, &HostContents, &FileSink::new(&file, 0, 9 << 30))
        .unwrap();
    e2fsck(&f);
    let out = run_ok(Command::new(require_tool("dumpe2fs")).arg(&f));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Group descriptor at 2097152"),
        "group 64's descriptor block"
    );
    assert!(
        text.contains("Group descriptor at 2064384"),
        "group 63's backup of meta group 0"
    );
    assert!(
        text.contains("Group descriptor at 2129920"),
        "group 65's backup of meta group 1"
    );
}

#[test]
fn too_small_fixed_size_is_refused_with_a_size_that_fits() {
    let tree = sample_tree();
    let mut o = opts();
    o.size = Size::Fixed(1 << 20);
    match plan(&tree, &o) {
        Err(Error::TooSmall { needed, size }) => {
            assert_eq!(size, 1 << 20);
            o.size = Size::Fixed(needed);
            plan(&tree, &o).unwrap();
            o.size = Size::Fixed(needed - 4096);
            assert!(
                plan(&tree, &o).is_err(),
                "the reported size is the smallest"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn slots_rewrite_cleanly_for_every_size() {
    let mut tree = sample_tree();
    let cap: u64 = 8 << 20;
    let mut n = file(b"<h1>default</h1>".to_vec());
    n.slot = Some(SlotReservation {
        name: "piece".into(),
        capacity: cap,
    });
    let m = meta(0o755, 0);
    tree.insert(b"piece.html", n, &m).unwrap();
    let o = opts();
    let p = plan(&tree, &o).unwrap();
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base");
    let len = p.size_bytes();
    {
        let f = fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&base)
            .unwrap();
        f.set_len(len).unwrap();
        let rep = p
            .write(&tree, &HostContents, &FileSink::new(&f, 0, len))
            .unwrap();
        assert_eq!(rep.slots.len(), 1);
        assert_eq!(rep.slots[0].capacity, cap);
    }
    e2fsck(&base);
    let slot = p.slots()[0].clone();
    let base_bytes = fs::read(&base).unwrap();
    let mut inode = [0u8; 256];
    inode
        .copy_from_slice(&base_bytes[slot.inode_offset as usize..slot.inode_offset as usize + 256]);
    assert_eq!(slot::reservation(&inode, slot.inode).unwrap().1 * 4096, cap);
    for size in [0u64, 1, 4096, 4097, cap - 1, cap] {
        let new = slot::rewrite_inode(&inode, p.checksum_seed(), slot.inode, size).unwrap();
        let payload = pseudo_random(size + 1, size as usize);
        let mut img = base_bytes.clone();
        img[slot.inode_offset as usize..slot.inode_offset as usize + 256].copy_from_slice(&new);
        img[slot.data_offset as usize..(slot.data_offset + size) as usize]
            .copy_from_slice(&payload);
        let f = d.path().join(format!("s{size}"));
        fs::write(&f, &img).unwrap();
        e2fsck(&f);
        let out = run_ok(
            Command::new(require_tool("debugfs"))
                .arg("-R")
                .arg("cat /piece.html")
                .arg(&f),
        );
        assert!(
            out.stdout == payload,
            "size {size}: debugfs cat returned {} bytes",
            out.stdout.len()
        );
        fs::remove_file(&f).unwrap();
    }
    assert!(slot::rewrite_inode(&inode, p.checksum_seed(), slot.inode, cap + 1).is_err());
    // A slot too large for four in-inode extents is refused by name.
    let mut big = file(vec![]);
    big.slot = Some(SlotReservation {
        name: "huge".into(),
        capacity: 1 << 30,
    });
    tree.insert(b"huge", big, &m).unwrap();
    let e = plan(&tree, &o).unwrap_err().to_string();
    assert!(e.contains("huge") && e.contains("capacity"), "{e}");
}

#[test]
fn bad_trees_get_errors_naming_the_entry() {
    let m = meta(0o755, 0);
    let mut t = Tree::new(m.clone());
    let mut n = file(b"x".to_vec());
    n.meta.xattrs = vec![Xattr {
        name: b"user.huge".as_slice().into(),
        value: vec![0u8; 5000].into(),
    }];
    t.insert(b"dir/bad-xattr", n, &m).unwrap();
    let e = plan(&t, &opts()).unwrap_err().to_string();
    assert!(e.contains("/dir/bad-xattr") && e.contains("xattr"), "{e}");

    let mut t = Tree::new(m.clone());
    t.insert(
        b"lies",
        Node {
            kind: NodeKind::File(FileData {
                size: 10,
                data: DataRef::Empty,
                segments: Some(vec![Segment { offset: 5, len: 20 }].into()),
            }),
            meta: m.clone(),
            slot: None,
        },
        &m,
    )
    .unwrap();
    let e = plan(&t, &opts()).unwrap_err().to_string();
    assert!(
        e.contains("/lies") && e.contains("past the file size"),
        "{e}"
    );

    let mut o = opts();
    o.label = "a label that is far too long".into();
    assert!(matches!(plan(&Tree::default(), &o), Err(Error::Label(_))));
}

#[test]
fn reader_rejects_garbage_without_panicking() {
    let img = build_mem(&sample_tree(), &opts());
    for (off, val) in [(1024 + 0x38, 0u8), (1024 + 0x10, 0xFF), (1024 + 0x18, 9)] {
        let mut bad = img.clone();
        bad[off] = val;
        assert!(Reader::open(bad).is_err());
    }
    // Corrupt an inode table block: reading inodes reports checksum errors, not panics.
    let r = Reader::open(img.clone()).unwrap();
    let off = r.inode_offset(12).unwrap() as usize;
    let mut bad = img;
    for b in &mut bad[off..off + 256] {
        *b ^= 0x5A;
    }
    let r = Reader::open(bad).unwrap();
    assert!(r.inode(12).is_err());
    assert!(r.read_data(12).is_err());
    let _ = r.resolve(b"/files/f1");
}

#[test]
fn lost_found_from_the_tree_is_kept_and_link_limits_are_enforced() {
    let m = meta(0o755, 0);
    let mut t = Tree::new(m.clone());
    t.insert(b"lost+found/orphan", file(b"x".to_vec()), &m)
        .unwrap();
    let img = build_mem(&t, &opts());
    e2fsck_bytes(&img);
    let r = Reader::open(img).unwrap();
    assert_eq!(r.resolve(b"/lost+found").unwrap(), Some(layout::FIRST_INO));
    assert!(r.resolve(b"/lost+found/orphan").unwrap().is_some());

    // A file named lost+found means no lost+found directory; still clean.
    let mut t = Tree::new(m.clone());
    t.insert(b"lost+found", file(b"not a dir".to_vec()), &m)
        .unwrap();
    e2fsck_bytes(&build_mem(&t, &opts()));

    // More hard links than ext4 counts is refused, naming the file.
    let mut t = Tree::new(m.clone());
    let f = t.insert(b"target", file(b"x".to_vec()), &m).unwrap();
    let d = t.mkdir_p(b"links", &m).unwrap();
    for i in 0..layout::LINK_MAX {
        t.link(d, format!("l{i}").as_bytes(), f);
    }
    let e = plan(&t, &opts()).unwrap_err().to_string();
    assert!(
        e.contains("/links/l0") && e.contains("65001 hard links"),
        "{e}"
    );
}

/// Two names with the same hash straddling a leaf boundary: the second leaf's index entry
/// carries the continuation bit, e2fsck accepts it, and lookups (ours and debugfs's) find
/// both names.
#[test]
fn hash_collisions_across_a_leaf_boundary() {
    let o = opts();
    let seed = hash::seed_words(o.hash_seed.as_bytes());
    let h = |n: &[u8]| hash::half_md4(n, &seed, true).0;
    // Find colliding names by brute force (about nine pairs expected among 200k).
    let mut hs: Vec<(u32, u32)> = (0..200_000u32)
        .map(|i| (h(format!("collision-name-{i:06}").as_bytes()), i))
        .collect();
    hs.sort_unstable();
    let (ch, a, b) = hs
        .windows(2)
        .filter(|w| w[0].0 == w[1].0)
        .map(|w| (w[0].0, w[0].1, w[1].1))
        .max()
        .expect("no collision among 200k names");
    let (a, b) = (
        format!("collision-name-{a:06}"),
        format!("collision-name-{b:06}"),
    );
    // Fill the first leaf with 4-byte names hashing below the collision, then `a`, so that
    // `b` (same hash) spills into the next leaf.
    let room = 4096 - 12 - dir::rec_len(a.len());
    let mut used = 0;
    let mut fillers = Vec::new();
    let mut j = 0u32;
    while used + 12 <= room {
        let n = format!("{:04x}", j);
        j += 1;
        assert!(j < 1 << 16, "not enough small-hash fillers");
        if h(n.as_bytes()) < ch {
            used += 12;
            fillers.push(n);
        }
    }
    let m = meta(0o755, 0);
    let mut t = Tree::new(m.clone());
    for n in fillers.iter().chain([&a, &b]) {
        t.insert(format!("d/{n}").as_bytes(), file(n.as_bytes().to_vec()), &m)
            .unwrap();
    }
    let img = build_mem(&t, &o);
    let dino = Reader::open(img.clone())
        .unwrap()
        .resolve(b"/d")
        .unwrap()
        .unwrap();
    // The second index entry (the second leaf) has the collision hash with bit 0 set.
    let r = Reader::open(img.clone()).unwrap();
    let inode = r.inode(dino).unwrap();
    let root_blk = r.extents(dino, &inode).unwrap()[0].pblk as usize * 4096;
    let entry1 = u32::from_le_bytes(img[root_blk + 40..root_blk + 44].try_into().unwrap());
    assert_eq!(entry1, ch | 1, "continuation bit on the second leaf");
    for n in [&a, &b] {
        assert!(
            r.resolve(format!("/d/{n}").as_bytes()).unwrap().is_some(),
            "{n}"
        );
    }
    e2fsck_bytes(&img);
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("img");
    fs::write(&f, &img).unwrap();
    for n in [&a, &b] {
        let out = run_ok(
            Command::new(require_tool("debugfs"))
                .arg("-R")
                .arg(format!("cat /d/{n}"))
                .arg(&f),
        );
        assert_eq!(out.stdout, n.as_bytes(), "debugfs lookup of {n}");
    }
}

/// Blocks that differ between two images of the same size.
fn blocks_differing(a: &[u8], b: &[u8]) -> usize {
    assert_eq!(a.len(), b.len());
    a.chunks(4096)
        .zip(b.chunks(4096))
        .filter(|(x, y)| x != y)
        .count()
}

/// The sample tree with a package's worth of files added in the middle and one file grown.
fn sample_tree_v2() -> Tree {
    let mut t = sample_tree();
    let m = meta(0o755, 1_650_000_000);
    for i in 0..40u64 {
        t.insert(
            format!("files/new-{i:02}").as_bytes(),
            file(pseudo_random(900 + i, 3000 + i as usize * 1000)),
            &m,
        )
        .unwrap();
    }
    let f5 = t.resolve(b"files/f5").unwrap();
    t.node_mut(f5).kind = NodeKind::File(FileData::dense(
        20_000,
        DataRef::Inline(pseudo_random(77, 20_000).into()),
    ));
    t
}

#[test]
fn stable_layout_keeps_unchanged_files_in_place() {
    let (v1, v2) = (sample_tree(), sample_tree_v2());
    // 8192 inodes, 45 % of them in use: about what a Debian root in a 1 GiB slot uses.
    let mut packed = opts();
    packed.size = Size::Fixed(128 << 20);
    let mut stable = packed.clone();
    stable.layout = Layout::Stable;

    let mut churn = Vec::new();
    for o in [&packed, &stable] {
        let (a, b) = (build_mem(&v1, o), build_mem(&v2, o));
        e2fsck_bytes(&a);
        e2fsck_bytes(&b);
        assert_reads_back(&v2, b.clone());
        churn.push(blocks_differing(&a, &b));
    }
    // Deterministic: the same tree gives the same bytes.
    assert!(build_mem(&v2, &stable) == build_mem(&v2, &stable));
    let (packed_churn, stable_churn) = (churn[0], churn[1]);
    // The new files' data and inodes, the grown file, /files and the bitmaps and descriptors
    // must change; with packed numbering every inode after /files/new-* moves as well.
    assert!(
        stable_churn * 4 < packed_churn,
        "blocks changed: stable {stable_churn}, packed {packed_churn}"
    );

    // Unchanged paths keep their inode numbers and their blocks, bar probing collisions.
    let (p1, p2) = (plan(&v1, &stable).unwrap(), plan(&v2, &stable).unwrap());
    let (mut same, mut moved, mut data_moved) = (0, 0, 0);
    v1.walk_paths(|path, id1| {
        if path == b"/files/f5" || path == b"/files" {
            return;
        }
        let id2 = v2.resolve(&path[1..]).unwrap();
        let (i1, i2) = (p1.inode_of(id1), p2.inode_of(id2));
        if i1 == i2 {
            same += 1;
        } else {
            moved += 1;
        }
        if p1
            .exts(i1)
            .iter()
            .map(|e| e.pblk)
            .ne(p2.exts(i2).iter().map(|e| e.pblk))
        {
            data_moved += 1;
        }
    });
    // A collision moves about one entry per added one (41 here); packed numbering moves
    // every entry after the first added one.
    eprintln!(
        "blocks changed: stable {stable_churn}, packed {packed_churn}; {same} entries kept their inode, {moved} moved; {data_moved} moved their blocks"
    );
    assert!(
        same > 3000 && moved <= 2 * 41 && data_moved <= 2 * 41,
        "{same} kept their inode, {moved} moved; {data_moved} moved their blocks"
    );
}

#[test]
fn stable_layout_needs_a_fixed_size_and_an_indexed_tree() {
    let mut o = opts();
    o.layout = Layout::Stable;
    let e = plan(&sample_tree(), &o).unwrap_err();
    assert!(e.to_string().contains("fixed filesystem size"), "{e}");
    o.size = Size::Fixed(64 << 20);
    let sink = MemSink::new(64 << 20);
    let e = StreamWriter::new(&o, &sink).err().unwrap();
    assert!(e.to_string().contains("one-pass stream"), "{e}");
}
