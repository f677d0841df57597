//! Writer/reader tests on in-memory trees: round trips through kiln's reader, stream vs plan
//! identity, pinned digests, slots (checked with fsck.erofs), bad trees.
#![allow(clippy::unwrap_used)]

use std::io::Cursor;

use proptest::prelude::*;
use sha2::Digest;

use super::layout::*;
use super::*;
use crate::fstree::{
    DataRef, FileData, HostContents, Meta, Node, NodeId, NodeKind, Placer, Segment,
    SlotReservation, Timestamp, Tree, Xattr,
};
use crate::sink::MemSink;

fn meta(perm: u16, uid: u32, sec: i64, nsec: u32) -> Meta {
    Meta {
        perm,
        uid,
        gid: uid / 2,
        mtime: Timestamp { sec, nsec },
        xattrs: Vec::new(),
    }
}

fn text(seed: u32, n: usize) -> Vec<u8> {
    let words = ["alpha ", "beta ", "gamma\n", "delta ", "kiln ", "erofs "];
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        v.extend_from_slice(words[x as usize % words.len()].as_bytes());
    }
    v.truncate(n);
    v
}

fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn file(data: Vec<u8>, m: Meta) -> Node {
    Node {
        kind: NodeKind::File(FileData::dense(
            data.len() as u64,
            DataRef::Inline(data.into()),
        )),
        meta: m,
        slot: None,
    }
}

/// A fixture touching every feature: sizes around block and inline limits, compressible and
/// incompressible data, a sparse file, xattrs (shared and inline), hardlinks, every kind.
fn fixture() -> Tree {
    let m0 = meta(0o755, 0, 1_700_000_000, 0);
    let mut t = Tree::new(m0.clone());
    for (i, n) in [
        0usize,
        1,
        100,
        4064,
        4065,
        4095,
        4096,
        4097,
        9000,
        70_000,
        1 << 20,
        (3 << 20) + 5,
    ]
    .into_iter()
    .enumerate()
    {
        t.insert(
            format!("text/f{n}").as_bytes(),
            file(text(i as u32, n), m0.clone()),
            &m0,
        )
        .unwrap();
        t.insert(
            format!("noise/f{n}").as_bytes(),
            file(
                noise(i as u64, n),
                meta(0o644, 1000, 1_600_000_000 + i as i64, i as u32 * 7),
            ),
            &m0,
        )
        .unwrap();
    }
    let mixed = [
        text(1, 50_000),
        noise(2, 50_000),
        vec![0; 50_000],
        text(3, 50_000),
    ]
    .concat();
    t.insert(b"mixed", file(mixed, m0.clone()), &m0).unwrap();
    // Sparse: data at 1 MiB and at the end of 10 MiB.
    let mut sparse_bytes = vec![0u8; 10 << 20];
    sparse_bytes[1 << 20..(1 << 20) + 5000].copy_from_slice(&noise(5, 5000));
    let end = sparse_bytes.len();
    sparse_bytes[end - 100..].copy_from_slice(&noise(6, 100));
    let packed = [
        &sparse_bytes[1 << 20..(1 << 20) + 5000],
        &sparse_bytes[end - 100..],
    ]
    .concat();
    let _ = packed;
    t.insert(
        b"sparse",
        Node {
            kind: NodeKind::File(FileData {
                size: 10 << 20,
                data: DataRef::Inline(sparse_bytes.into()),
                segments: Some(
                    vec![
                        Segment {
                            offset: 1 << 20,
                            len: 5000,
                        },
                        Segment {
                            offset: (10 << 20) - 100,
                            len: 100,
                        },
                    ]
                    .into(),
                ),
            }),
            meta: m0.clone(),
            slot: None,
        },
        &m0,
    )
    .unwrap();
    let shared = Xattr {
        name: b"security.selinux".to_vec().into(),
        value: b"system_u:object_r:usr_t:s0\0".to_vec().into(),
    };
    for i in 0..5 {
        let mut m = m0.clone();
        m.xattrs = vec![
            Xattr {
                name: format!("user.i{i}").into_bytes().into(),
                value: vec![i as u8; 3 * i].into(),
            },
            shared.clone(),
        ];
        m.xattrs.sort();
        t.insert(format!("x/{i}").as_bytes(), file(b"x".to_vec(), m), &m0)
            .unwrap();
    }
    let mut big = m0.clone();
    big.xattrs = vec![
        Xattr {
            name: b"trusted.overlay.opaque".to_vec().into(),
            value: b"y".to_vec().into(),
        },
        Xattr {
            name: b"user.large".to_vec().into(),
            value: noise(9, 3000).into(),
        },
    ];
    t.insert(b"x/big", file(text(9, 4000), big), &m0).unwrap();
    let h = t
        .insert(b"hard/a", file(text(7, 5000), m0.clone()), &m0)
        .unwrap();
    let d = t.mkdir_p(b"hard/sub", &m0).unwrap();
    t.link(d, b"b", h);
    for (name, kind) in [
        ("dev/null", NodeKind::CharDev { major: 1, minor: 3 }),
        ("dev/sda", NodeKind::BlockDev { major: 8, minor: 0 }),
        (
            "dev/big",
            NodeKind::CharDev {
                major: 4000,
                minor: 300_000,
            },
        ),
        ("dev/fifo", NodeKind::Fifo),
        ("dev/sock", NodeKind::Socket),
        ("ln/short", NodeKind::Symlink(b"../text/f1".to_vec().into())),
        ("ln/long", NodeKind::Symlink(vec![b'a'; 4095].into())),
    ] {
        t.insert(
            name.as_bytes(),
            Node {
                kind,
                meta: meta(0o640, 70_000, -5, 1),
                slot: None,
            },
            &m0,
        )
        .unwrap();
    }
    let big_dir = t.mkdir_p(b"many", &m0).unwrap();
    for i in 0..3000 {
        let n = t.push(file(Vec::new(), m0.clone()));
        t.link(
            big_dir,
            format!("entry-{i:05}-{}", "z".repeat(i % 50)).as_bytes(),
            n,
        );
    }
    t
}

fn write_plan(t: &Tree, opts: &Options) -> Vec<u8> {
    let p = plan(t, opts).unwrap();
    let size = p.size();
    let sink = MemSink::new(size.bytes as usize);
    let s = p.write(&HostContents, &sink, &|_| {}).unwrap();
    let mut v = sink.into_inner();
    if size.exact {
        assert_eq!(s.size, size.bytes, "exact plan size");
    } else {
        assert!(
            s.size <= size.bytes,
            "bound {} < size {}",
            size.bytes,
            s.size
        );
    }
    v.truncate(s.size as usize);
    v
}

/// Reads the image back and compares with the tree.
fn check_tree(t: &Tree, img: &[u8]) {
    let im = Image::open(img).unwrap();
    let links = t.link_counts();
    let mut seen: std::collections::BTreeMap<NodeId, u64> = Default::default();
    t.walk_paths(|_, _| {});
    let mut stack = vec![(Vec::new(), crate::fstree::ROOT)];
    while let Some((path, id)) = stack.pop() {
        let n = t.node(id);
        let ino = im.lookup(&path).unwrap();
        let p = String::from_utf8_lossy(&path).into_owned();
        if let Some(prev) = seen.insert(id, ino.nid) {
            assert_eq!(prev, ino.nid, "{p}: hardlink");
        }
        assert_eq!(ino.mode, n.mode(), "{p}: mode");
        assert_eq!((ino.uid, ino.gid), (n.meta.uid, n.meta.gid), "{p}: owner");
        assert_eq!(ino.mtime, n.meta.mtime, "{p}: mtime");
        let nlink = if n.is_dir() {
            2 + t.subdir_count(id)
        } else {
            links[id as usize]
        };
        assert_eq!(ino.nlink, nlink, "{p}: nlink");
        let mut xs = im.xattrs(&ino).unwrap();
        xs.sort();
        let want: Vec<_> = n
            .meta
            .xattrs
            .iter()
            .map(|x| (x.name.to_vec(), x.value.to_vec()))
            .collect();
        assert_eq!(xs, want, "{p}: xattrs");
        match &n.kind {
            NodeKind::File(f) => {
                let got = im.read_all(&ino).unwrap();
                let mut want = vec![0u8; f.size as usize];
                for r in f.runs() {
                    HostContents.read_at_file(
                        f,
                        r.offset,
                        &mut want[r.offset as usize..(r.offset + r.len) as usize],
                    );
                }
                assert!(got == want, "{p}: bytes differ");
                // Random access in the middle too.
                if f.size > 10 {
                    let mut b = vec![0u8; (f.size / 3) as usize];
                    im.read_at(
                        &ino,
                        f.size / 2,
                        &mut b[..(f.size - f.size / 2).min(f.size / 3) as usize],
                    )
                    .unwrap();
                }
            }
            NodeKind::Symlink(s) => assert_eq!(im.read_all(&ino).unwrap(), s.to_vec(), "{p}"),
            NodeKind::CharDev { major, minor } | NodeKind::BlockDev { major, minor } => {
                assert_eq!(ino.rdev(), (*major, *minor), "{p}")
            }
            NodeKind::Dir(e) => {
                let ents = im.read_dir(&ino).unwrap();
                assert_eq!(ents.len(), e.len() + 2, "{p}: entries");
                assert!(
                    ents.windows(2).all(|w| w[0].name < w[1].name),
                    "{p}: sorted"
                );
            }
            _ => {}
        }
        for e in t.entries(id).iter().rev() {
            let mut c = path.clone();
            c.push(b'/');
            c.extend_from_slice(&e.name);
            stack.push((c, e.node));
        }
    }
}

trait ReadFile {
    fn read_at_file(&self, f: &FileData, off: u64, buf: &mut [u8]);
}

impl ReadFile for HostContents {
    fn read_at_file(&self, f: &FileData, off: u64, buf: &mut [u8]) {
        crate::fstree::Contents::read_at(self, f, off, buf).unwrap();
    }
}

fn modes() -> [Compression; 3] {
    [
        Compression::None,
        Compression::Lz4,
        Compression::Lz4hc { level: 9 },
    ]
}

#[test]
fn fixture_round_trips_through_the_reader() {
    let t = fixture();
    for c in modes() {
        let img = write_plan(
            &t,
            &Options {
                compression: c,
                ..Default::default()
            },
        );
        check_tree(&t, &img);
        let d = dump::dump(&Image::open(&img[..]).unwrap(), 100).unwrap();
        assert!(d.contains("root_nid"), "{d}");
    }
}

#[test]
fn compression_shrinks_text_and_falls_back_for_noise() {
    let t = fixture();
    let plain = write_plan(&t, &Options::default());
    let z = write_plan(
        &t,
        &Options {
            compression: Compression::Lz4hc { level: 9 },
            ..Default::default()
        },
    );
    assert!(
        z.len() * 10 < plain.len() * 8,
        "{} vs {}",
        z.len(),
        plain.len()
    );
    let im = Image::open(&z[..]).unwrap();
    let noise = im.lookup(b"/noise/f1048576").unwrap();
    assert!(
        !datalayout::is_compressed(noise.layout),
        "incompressible file stored plain"
    );
    let txt = im.lookup(b"/text/f1048576").unwrap();
    assert_eq!(txt.layout, datalayout::COMPRESSED_COMPACT);
    let ex = im.extents(&txt).unwrap();
    assert!(
        ex.iter().any(|e| e.plen > BLOCK),
        "big physical clusters used"
    );
}

/// Feeds the tree's files to a [`StreamWriter`] in walk order, as a sorted tar would.
fn write_stream(t: &Tree, opts: &Options) -> Vec<u8> {
    let sink = MemSink::new(64 << 20);
    let mut w = StreamWriter::new(opts, &sink).unwrap();
    let mut streamed = t.clone();
    for id in t.walk() {
        if let NodeKind::File(f) = &t.node(id).kind {
            let mut packed = Vec::new();
            for r in f.runs() {
                let mut b = vec![0u8; r.len as usize];
                HostContents.read_at_file(f, r.offset, &mut b);
                packed.extend_from_slice(&b);
            }
            let desc = FileData {
                size: f.size,
                data: DataRef::Empty,
                segments: f.segments.clone(),
            };
            let i = w.place(&desc, &mut Cursor::new(packed)).unwrap();
            if let NodeKind::File(g) = &mut streamed.node_mut(id).kind {
                g.data = DataRef::Placed(i);
            }
        }
    }
    let s = w.finish(&streamed, &HostContents).unwrap();
    let mut v = sink.into_inner();
    v.truncate(s.size as usize);
    v
}

#[test]
fn stream_and_plan_give_identical_bytes() {
    let t = fixture();
    for c in modes() {
        let opts = Options {
            compression: c,
            ..Default::default()
        };
        let a = write_plan(&t, &opts);
        let b = write_stream(&t, &opts);
        assert!(
            a == b,
            "{c:?}: stream differs from plan ({} vs {} bytes)",
            a.len(),
            b.len()
        );
    }
}

/// Files whose last extent is stored plain and starts inside a logical cluster: a
/// compressible head (which ends wherever its fixed-size physical cluster fills up) followed by
/// an incompressible tail. Before the end-of-file head was written, the kernel mapped the last
/// logical cluster of such a file to more than one block and refused to read it (EUCLEAN);
/// the reader models that mapping, so these files fail there as they failed in the kernel.
#[test]
fn plain_tails_crossing_a_logical_cluster_map_as_the_kernel_maps_them() {
    let m0 = meta(0o644, 0, 1_700_000_000, 0);
    let mut t = Tree::new(m0.clone());
    let mut crossing = 0;
    for i in 0..120u32 {
        let head = 5_000 + (i as usize * 7_919) % 90_000;
        let tail = 1 + (i as usize * 613) % 4_095;
        let mut data = text(i, head);
        data.extend(noise(u64::from(i) + 1, tail));
        t.insert(format!("/f{i}").as_bytes(), file(data, m0.clone()), &m0)
            .unwrap();
    }
    for pcluster_blocks in [1, 2, 4, 16] {
        for c in [Compression::Lz4, Compression::Lz4hc { level: 5 }] {
            let opts = Options {
                compression: c,
                pcluster_blocks,
                ..Default::default()
            };
            let img = write_plan(&t, &opts);
            let im = Image::open(&img[..]).unwrap();
            for i in 0..120u32 {
                let ino = im.lookup(format!("/f{i}").as_bytes()).unwrap();
                if !datalayout::is_compressed(ino.layout) {
                    continue;
                }
                let exts = im
                    .extents(&ino)
                    .unwrap_or_else(|e| panic!("{c:?} pcluster {pcluster_blocks}: /f{i}: {e}"));
                let last = exts.last().unwrap();
                if last.plain
                    && !last.la.is_multiple_of(BLOCK)
                    && last.la / BLOCK != (ino.size - 1) / BLOCK
                {
                    crossing += 1;
                }
            }
            check_tree(&t, &img);
        }
    }
    // The corpus must really produce the case it is about.
    assert!(
        crossing > 20,
        "only {crossing} plain tails cross a logical cluster"
    );
}

/// Files with the same bytes share one copy of their compressed data (and read back each as
/// itself); with dedupe off, each is stored; streams decide as plans do.
#[test]
fn identical_files_share_their_compressed_data() {
    let m0 = meta(0o644, 0, 1_700_000_000, 0);
    let mut t = Tree::new(m0.clone());
    let same = text(3, 50_000);
    for name in ["/a", "/b", "/sub/c"] {
        t.mkdir_p(b"/sub", &m0).unwrap();
        t.insert(
            name.as_bytes(),
            file(same.clone(), meta(0o600, 7, 1_700_000_001, 5)),
            &m0,
        )
        .unwrap();
    }
    let mut other = same.clone();
    other[40_000] ^= 1;
    t.insert(b"/d", file(other, m0.clone()), &m0).unwrap();
    for c in [Compression::Lz4, Compression::Lz4hc { level: 5 }] {
        let on = Options {
            compression: c,
            ..Default::default()
        };
        let off = Options {
            dedupe: false,
            ..on.clone()
        };
        let (a, b) = (write_plan(&t, &on), write_plan(&t, &off));
        check_tree(&t, &a);
        check_tree(&t, &b);
        assert!(a.len() < b.len(), "{c:?}: {} vs {}", a.len(), b.len());
        let im = Image::open(&a[..]).unwrap();
        let pa = |p: &[u8]| im.extents(&im.lookup(p).unwrap()).unwrap()[0].pa;
        assert_eq!(pa(b"/a"), pa(b"/b"));
        assert_eq!(pa(b"/a"), pa(b"/sub/c"));
        assert_ne!(pa(b"/a"), pa(b"/d"));
        assert!(write_stream(&t, &on) == a, "{c:?}: stream and plan differ");
    }
}

#[test]
fn pinned_digests() {
    // Changing these means the on-disk output changed: check fsck.erofs and the kernel, then
    // update them deliberately.
    let t = fixture();
    let opts = |c| Options {
        compression: c,
        uuid: crate::repart::filesystem_uuid(&crate::repart::Uuid::from_bytes([7; 16]))
            .into_bytes(),
        timestamp: Some(Timestamp {
            sec: 1_700_000_000,
            nsec: 0,
        }),
        ..Default::default()
    };
    let fsck = tool("fsck.erofs").expect("fsck.erofs not found; .ci/run installs it (apt-get)");
    let d = tempfile::tempdir().unwrap();
    let got: Vec<String> = modes()
        .iter()
        .map(|&c| {
            let img = write_plan(&t, &opts(c));
            let path = d.path().join("img");
            std::fs::write(&path, &img).unwrap();
            let out = std::process::Command::new(&fsck)
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{c:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            hex_digest(&img)
        })
        .collect();
    let want = [
        "ee075236c57684518eaeb0d711c899f0f15bc4cf589e182bc78508147d46739c",
        "cb0ca52bea58dde22ded64905a61a9cabd60e97eace0707867ede8501d0ef922",
        "d2b3a6b4b39920e345ff519547e641aa9423010da0676f045e221fa03c771cda",
    ];
    assert_eq!(got, want);
}

fn hex_digest(b: &[u8]) -> String {
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

#[test]
fn bad_trees_give_errors_not_panics() {
    let m0 = Meta::default();
    type Case = (&'static str, Box<dyn Fn(&mut Tree)>);
    let cases: Vec<Case> = vec![
        (
            "xattr",
            Box::new(|t: &mut Tree| {
                let mut m = Meta::default();
                m.xattrs.push(Xattr {
                    name: b"system.foo".to_vec().into(),
                    value: Box::new([]),
                });
                t.insert(b"f", file(vec![1], m), &Meta::default()).unwrap();
            }),
        ),
        (
            "rdev",
            Box::new(|t: &mut Tree| {
                t.insert(
                    b"d",
                    Node {
                        kind: NodeKind::CharDev {
                            major: 5000,
                            minor: 1,
                        },
                        meta: Meta::default(),
                        slot: None,
                    },
                    &Meta::default(),
                )
                .unwrap();
            }),
        ),
        (
            "symlink",
            Box::new(|t: &mut Tree| {
                t.insert(
                    b"l",
                    Node {
                        kind: NodeKind::Symlink(vec![b'x'; 5000].into()),
                        meta: Meta::default(),
                        slot: None,
                    },
                    &Meta::default(),
                )
                .unwrap();
            }),
        ),
        (
            "slot",
            Box::new(|t: &mut Tree| {
                let mut n = file(vec![1; 100], Meta::default());
                n.slot = Some(SlotReservation {
                    name: "s".into(),
                    capacity: 10,
                });
                t.insert(b"s", n, &Meta::default()).unwrap();
            }),
        ),
    ];
    for (what, f) in cases {
        let mut t = Tree::new(m0.clone());
        f(&mut t);
        let e = plan(&t, &Options::default())
            .err()
            .unwrap_or_else(|| panic!("{what}: accepted"));
        let msg = e.to_string();
        assert!(msg.contains('/') || msg.contains("slot"), "{what}: {msg}");
    }
    let mut t = Tree::default();
    t.insert(b"f", file(vec![1; 10], Meta::default()), &Meta::default())
        .unwrap();
    assert!(plan(
        &t,
        &Options {
            pcluster_blocks: 0,
            ..Default::default()
        }
    )
    .is_err());
    // A sink too small is an error, not a partial image.
    let p = plan(&t, &Options::default()).unwrap();
    let small = MemSink::new(4096);
    assert!(matches!(
        p.write(&HostContents, &small, &|_| {}),
        Err(Error::NoRoom { .. })
    ));
}

#[test]
fn reader_rejects_garbage() {
    let t = fixture();
    let img = write_plan(
        &t,
        &Options {
            compression: Compression::Lz4,
            ..Default::default()
        },
    );
    // Flip bytes all over the image: the reader must return errors or data, never panic.
    for step in [997usize, 4093, 65521] {
        let mut bad = img.clone();
        let mut i = 1024 + 128 + 16;
        while i < bad.len() {
            bad[i] ^= 0x5a;
            i += step;
        }
        if let Ok(im) = Image::open(&bad[..]) {
            let _ = dump::dump(&im, 10_000);
            if let Ok(root) = im.root() {
                let _ = im.read_dir(&root);
            }
        }
    }
    let mut bad = img.clone();
    bad[1024 + 60] ^= 1;
    assert!(
        matches!(Image::open(&bad[..]), Err(Error::Corrupt { .. })),
        "checksum checked"
    );
}

#[test]
fn slot_rewrite_passes_fsck_extract() {
    let Some(fsck) = tool("fsck.erofs") else {
        panic!("reference tool fsck.erofs not found; .ci/run installs it (apt-get)");
    };
    let m0 = Meta::default();
    let mut t = Tree::new(m0.clone());
    t.insert(b"before", file(text(1, 9000), m0.clone()), &m0)
        .unwrap();
    let mut n = file(b"default page\n".to_vec(), m0.clone());
    n.slot = Some(SlotReservation {
        name: "page".into(),
        capacity: 3 * 4096 + 10,
    });
    t.insert(b"www/index.html", n, &m0).unwrap();
    t.insert(b"zafter", file(text(2, 9000), m0.clone()), &m0)
        .unwrap();
    for c in modes() {
        let opts = Options {
            compression: c,
            ..Default::default()
        };
        let p = plan(&t, &opts).unwrap();
        let sink = MemSink::new(p.size().bytes as usize);
        let s = p.write(&HostContents, &sink, &|_| {}).unwrap();
        let mut img = sink.into_inner();
        img.truncate(s.size as usize);
        let slot = s.slots.first().unwrap().clone();
        assert_eq!(slot.name, "page");
        assert_eq!(slot.data_offset % BLOCK, 0);
        let new = text(5, 3 * 4096 + 10);
        img[slot.data_offset as usize..slot.data_offset as usize + new.len()].copy_from_slice(&new);
        let io = slot.inode_offset as usize;
        let iend = io + 64.min(img.len() - io);
        rewrite_slot_size(&slot, &mut img[io..iend], new.len() as u64).unwrap();
        assert!(
            rewrite_slot_size(&slot, &mut [0u8; 64], 1).is_err(),
            "not an inode"
        );
        assert!(rewrite_slot_size(&slot, &mut img[io..io + 64], slot.capacity + 1).is_err());
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("img");
        std::fs::write(&path, &img).unwrap();
        let out = std::process::Command::new(&fsck)
            .arg(format!("--extract={}", d.path().join("x").display()))
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{c:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            std::fs::read(d.path().join("x/www/index.html")).unwrap(),
            new,
            "{c:?}"
        );
        assert_eq!(
            std::fs::read(d.path().join("x/zafter")).unwrap(),
            text(2, 9000)
        );
        let im = Image::open(&img[..]).unwrap();
        assert_eq!(
            im.read_all(&im.lookup(b"/www/index.html").unwrap())
                .unwrap(),
            new
        );
    }
}

fn tool(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(std::path::PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[test]
fn hundred_thousand_entry_directory_looks_up() {
    let m0 = Meta::default();
    let mut t = Tree::new(m0.clone());
    let d = t.mkdir_p(b"big", &m0).unwrap();
    let empty = t.push(file(Vec::new(), m0.clone()));
    for i in 0..100_000 {
        t.link(
            d,
            format!("e{i:06}-{}", "q".repeat(i % 37)).as_bytes(),
            empty,
        );
    }
    let img = write_plan(&t, &Options::default());
    let im = Image::open(&img[..]).unwrap();
    let dir = im.lookup(b"/big").unwrap();
    assert!(dir.size > 100 * BLOCK);
    for i in [0usize, 1, 4242, 99_999] {
        let name = format!("e{i:06}-{}", "q".repeat(i % 37));
        assert!(
            im.lookup_in(&dir, name.as_bytes()).unwrap().is_some(),
            "{name}"
        );
    }
    assert_eq!(
        im.inode(im.lookup(b"/big/e000001-q").unwrap().nid)
            .unwrap()
            .nlink,
        100_000
    );
}

fn arb_tree() -> impl Strategy<Value = Tree> {
    let entry = (
        proptest::collection::vec(
            prop_oneof![Just(b'a'), Just(b'b'), Just(b'/'), any::<u8>()],
            1..12,
        ),
        prop_oneof![
            (0usize..20_000, any::<u32>()).prop_map(|(n, s)| (0u8, n, s)),
            (0usize..3, any::<u32>()).prop_map(|(n, s)| (1u8, n, s)),
            (1usize..200, any::<u32>()).prop_map(|(n, s)| (2u8, n, s)),
        ],
        0u16..0o7777,
        any::<u16>(),
        proptest::collection::vec(
            (0u8..3, proptest::collection::vec(any::<u8>(), 0..40)),
            0..3,
        ),
    );
    proptest::collection::vec(entry, 0..40).prop_map(|entries| {
        let m0 = Meta::default();
        let mut t = Tree::new(m0.clone());
        for (path, (kind, n, seed), perm, id, xs) in entries {
            let path: Vec<u8> = path
                .into_iter()
                .map(|b| if b == 0 { b'z' } else { b })
                .collect();
            let mut m = meta(perm, u32::from(id) * 3, i64::from(id % 3), 0);
            for (k, v) in xs {
                m.xattrs.push(Xattr {
                    name: format!("user.k{k}").into_bytes().into(),
                    value: v.into(),
                });
            }
            m.xattrs.sort();
            m.xattrs.dedup_by(|a, b| a.name == b.name);
            let node = match kind {
                0 => file(
                    if seed % 2 == 0 {
                        text(seed, n)
                    } else {
                        noise(u64::from(seed), n)
                    },
                    m,
                ),
                1 => Node {
                    kind: NodeKind::Dir(Vec::new()),
                    meta: m,
                    slot: None,
                },
                _ => Node {
                    kind: NodeKind::Symlink(vec![b'l'; n].into()),
                    meta: m,
                    slot: None,
                },
            };
            let _ = t.insert(&path, node, &m0);
        }
        t
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn prop_random_trees_round_trip(t in arb_tree(), z in 0usize..3) {
        let opts = Options { compression: modes()[z], pcluster_blocks: 1 + (z as u32) * 3, ..Default::default() };
        let img = write_plan(&t, &opts);
        check_tree(&t, &img);
        prop_assert!(write_stream(&t, &opts) == img);
    }
}
