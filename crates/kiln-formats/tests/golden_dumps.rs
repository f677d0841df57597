//! Golden dumps: a small fixture tree written as ext4, EROFS (lz4) and ISO 9660, each read
//! back and rendered by its `dump` module, and compared with the snapshots in
//! `tests/snapshots/`. Any change to where a writer puts a structure, or to what it puts in
//! it, shows up here as a readable diff of the dump (`cargo insta review` to accept an
//! intended one). The same dumps are what `kiln inspect --dump` prints.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use kiln_formats::fstree::{
    DataRef, FileData, HostContents, Meta, Node, NodeKind, Timestamp, Tree, Xattr,
};
use kiln_formats::iso9660::{IsoOptions, IsoPlan};
use kiln_formats::repart::Uuid;
use kiln_formats::sink::MemSink;
use kiln_formats::{erofs, ext4, iso9660};
use kiln_testkit::{pseudo_random, text_bytes};

const EPOCH: i64 = 1_767_225_600;

fn meta(perm: u16) -> Meta {
    Meta {
        perm,
        uid: 0,
        gid: 0,
        mtime: Timestamp::from_secs(EPOCH),
        xattrs: Vec::new(),
    }
}

fn file(bytes: Vec<u8>, perm: u16) -> Node {
    Node {
        kind: NodeKind::File(FileData::dense(
            bytes.len() as u64,
            DataRef::Inline(Arc::from(bytes)),
        )),
        meta: meta(perm),
        slot: None,
    }
}

/// Directories, a tiny file (inline in EROFS), a file of a few blocks of random bytes, a
/// compressible one of several pclusters, an executable, a symlink, a hardlink and an xattr.
fn fixture() -> Tree {
    let d = meta(0o755);
    let mut t = Tree::new(d.clone());
    t.insert(b"/etc/hostname", file(b"golden\n".to_vec(), 0o644), &d)
        .unwrap();
    let mut conf = file(b"[kiln]\nmode = golden\n".to_vec(), 0o640);
    conf.meta.xattrs.push(Xattr {
        name: b"user.kiln"[..].into(),
        value: b"golden"[..].into(),
    });
    t.insert(b"/etc/kiln.conf", conf, &d).unwrap();
    t.insert(b"/usr/bin/tool", file(pseudo_random(1, 9000), 0o755), &d)
        .unwrap();
    t.insert(
        b"/usr/share/doc/notes.txt",
        file(text_bytes(2, 70_000), 0o644),
        &d,
    )
    .unwrap();
    t.insert(
        b"/usr/lib/os-release",
        file(b"ID=golden\nVERSION_ID=1\n".to_vec(), 0o644),
        &d,
    )
    .unwrap();
    let link = Node {
        kind: NodeKind::Symlink(b"../usr/lib/os-release"[..].into()),
        meta: meta(0o777),
        slot: None,
    };
    t.insert(b"/etc/os-release", link, &d).unwrap();
    let tool = t.resolve(b"/usr/bin/tool").unwrap();
    let bin = t.resolve(b"/usr/bin").unwrap();
    t.link(bin, b"tool-again", tool);
    t
}

#[test]
fn ext4_dump() {
    let t = fixture();
    let mut o = ext4::Options::from_seed(
        Some(&Uuid::from_bytes([7; 16])),
        ext4::Size::Minimize {
            extra_bytes: 0,
            extra_inodes: 0,
        },
    );
    o.label = "golden".into();
    o.timestamp = EPOCH;
    let p = ext4::plan(&t, &o).unwrap();
    let sink = MemSink::new(p.size_bytes() as usize);
    p.write(&t, &HostContents, &sink).unwrap();
    let img = sink.into_inner();
    let r = ext4::reader::Reader::open(&img[..]).unwrap();
    let dump = format!(
        "{}\n{}",
        ext4::dump::superblock(&r),
        ext4::dump::tree(&r).unwrap()
    );
    insta::assert_snapshot!(dump);
}

#[test]
fn erofs_lz4_dump() {
    let t = fixture();
    let o = erofs::Options {
        compression: erofs::Compression::Lz4,
        uuid: [9; 16],
        timestamp: Some(Timestamp::from_secs(EPOCH)),
        volume_name: b"golden".to_vec(),
        ..Default::default()
    };
    let p = erofs::plan(&t, &o).unwrap();
    let sink = MemSink::new(p.size().bytes as usize);
    let s = p.write(&HostContents, &sink, &|_| {}).unwrap();
    let mut img = sink.into_inner();
    img.truncate(s.size as usize);
    let image = erofs::Image::open(&img[..]).unwrap();
    insta::assert_snapshot!(erofs::dump::dump(&image, 1000).unwrap());
}

#[test]
fn iso9660_dump() {
    let t = fixture();
    let o = IsoOptions::new("GOLDEN", EPOCH, &Uuid::from_bytes([5; 16]));
    let p = IsoPlan::new(&t, &o).unwrap();
    let sink = MemSink::new(p.size() as usize);
    p.write(&t, &HostContents, None, &sink).unwrap();
    let img = sink.into_inner();
    insta::assert_snapshot!(iso9660::dump::dump(&img, img.len() as u64).unwrap());
}
