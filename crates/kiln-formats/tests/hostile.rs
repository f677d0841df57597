//! Hostile inputs to the format readers and writers: untrusted numbers from an image or a
//! tree are range-checked before they are used, and format limits are enforced before any
//! byte is written.
#![allow(clippy::unwrap_used)]

use kiln_formats::erofs;
use kiln_formats::ext4;
use kiln_formats::fstree::{DataRef, FileData, HostContents, Meta, Node, NodeKind, Segment, Tree};
use kiln_formats::sink::MemSink;

fn file(data: &[u8]) -> Node {
    Node {
        kind: NodeKind::File(FileData::dense(
            data.len() as u64,
            DataRef::Inline(data.to_vec().into()),
        )),
        meta: Meta::default(),
        slot: None,
    }
}

/// A sparse file of `size` bytes holding 4 bytes of data at its start.
fn sparse(size: u64) -> Node {
    Node {
        kind: NodeKind::File(FileData {
            size,
            data: DataRef::Inline(b"data".to_vec().into()),
            segments: Some(vec![Segment { offset: 0, len: 4 }].into()),
        }),
        meta: Meta::default(),
        slot: None,
    }
}

fn erofs_image(t: &Tree) -> Vec<u8> {
    erofs_image_with(t, &erofs::Options::default())
}

fn erofs_image_with(t: &Tree, o: &erofs::Options) -> Vec<u8> {
    let p = erofs::plan(t, o).unwrap();
    let sink = MemSink::new(p.size().bytes as usize);
    let s = p.write(&HostContents, &sink, &|_| {}).unwrap();
    let mut v = sink.into_inner();
    v.truncate(s.size as usize);
    v
}

/// A minimal ext4 image holding `/a` = "hello".
fn ext4_image_of_a_file() -> Vec<u8> {
    let mut t = Tree::default();
    t.insert(b"/a", file(b"hello"), &Meta::default()).unwrap();
    let o = ext4::Options::from_seed(
        None,
        ext4::Size::Minimize {
            extra_bytes: 0,
            extra_inodes: 0,
        },
    );
    let plan = ext4::plan(&t, &o).unwrap();
    let sink = MemSink::new(plan.size_bytes() as usize);
    plan.write(&t, &HostContents, &sink).unwrap();
    sink.into_inner()
}

// 13. The EROFS reader computed `meta_blkaddr * BLOCK + nid * ISLOT` from a dirent's nid
// unchecked: a nid of 2^59 + root wrapped around to the root inode (release) or overflowed
// (debug).
#[test]
fn erofs_nid_from_a_dirent_is_range_checked() {
    let mut t = Tree::default();
    t.insert(b"/a", file(b"hello"), &Meta::default()).unwrap();
    let mut img = erofs_image(&t);
    let im = erofs::Image::open(&img[..]).unwrap();
    let root = im.root().unwrap();
    let a = im.lookup_in(&root, b"a").unwrap().unwrap();
    // Find a's dirent (nid, little-endian u64, at the start of a 12-byte dirent) in the root
    // directory's block and point it far away.
    let wrapped = root.nid + (1u64 << 59);
    let needle = a.to_le_bytes();
    let hits: Vec<usize> = img
        .windows(8)
        .enumerate()
        .filter(|(i, w)| *w == needle && i % 4 == 0 && *i >= 4096)
        .map(|(i, _)| i)
        .collect();
    assert!(!hits.is_empty(), "dirent of /a found");
    for h in &hits {
        img[*h..*h + 8].copy_from_slice(&wrapped.to_le_bytes());
    }
    let im = erofs::Image::open(&img[..]).unwrap();
    let err = im.lookup(b"/a").map(|i| i.nid);
    assert!(err.is_err(), "nid {wrapped} must not resolve: {err:?}");
    let msg = err.unwrap_err().to_string();
    assert!(msg.contains("out of range"), "{msg}");
    assert!(im.inode(u64::MAX).is_err());
    assert!(im.inode(wrapped).is_err());
}

// 3. Sparse sizes were trusted: a 2^62-byte sparse file made the EROFS writer emit chunk maps
// without bound, and ext4 accepted files past its 16 TiB limit.
#[test]
fn files_past_a_format_limit_are_refused_before_writing() {
    for size in [32u64 << 40, 1 << 62] {
        let mut t = Tree::default();
        t.insert(b"/dir/huge", sparse(size), &Meta::default())
            .unwrap();
        let e = erofs::plan(&t, &erofs::Options::default())
            .err()
            .unwrap_or_else(|| panic!("EROFS accepted a {size}-byte file"))
            .to_string();
        assert!(e.contains("/dir/huge") && e.contains("limit"), "{e}");
        let o = ext4::Options::from_seed(
            None,
            ext4::Size::Minimize {
                extra_bytes: 0,
                extra_inodes: 0,
            },
        );
        let e = ext4::plan(&t, &o)
            .err()
            .unwrap_or_else(|| panic!("ext4 accepted a {size}-byte file"))
            .to_string();
        assert!(e.contains("huge") && e.contains("limit"), "{e}");
    }
    // At the limit itself ext4 still plans (a sparse file costs one block here).
    let mut t = Tree::default();
    t.insert(b"/edge", sparse(ext4::MAX_FILE_SIZE), &Meta::default())
        .unwrap();
    let o = ext4::Options::from_seed(
        None,
        ext4::Size::Minimize {
            extra_bytes: 0,
            extra_inodes: 0,
        },
    );
    ext4::plan(&t, &o).unwrap();
}

// Found by scripts/fuzz-smoke (target ext4): the reader sized its group descriptor table from
// the superblock's block count before reading a descriptor, so a superblock claiming 2^46
// blocks asked the allocator for 63 GB and aborted the process. A count read from an image
// now reserves at most `io::capacity_hint` entries, and the table read fails at the first
// descriptor block the image does not hold.
#[test]
fn ext4_block_count_does_not_size_an_allocation() {
    let mut img = ext4_image_of_a_file();
    ext4::reader::Reader::open(&img[..]).unwrap();
    // blocks_count_hi (superblock offset 0x150), then the superblock checksum (0x3FC).
    let sb = 1024;
    img[sb + 0x150..sb + 0x154].copy_from_slice(&0x3FFFu32.to_le_bytes());
    let sum = ext4::csum::superblock(&img[sb..sb + 1024]);
    img[sb + 0x3FC..sb + 0x400].copy_from_slice(&sum.to_le_bytes());
    // Whichever check meets the bad table first (here the zeroed descriptor of group 1 fails
    // its checksum) must name a byte offset; before the fix the process aborted instead.
    let err = ext4::reader::Reader::open(&img[..])
        .err()
        .expect("a block count past the image is refused");
    assert!(err.to_string().contains("at byte"), "{err}");
}

// Found by scripts/fuzz-smoke (target ext4): a 64-byte group descriptor carries the high half
// of its inode table's block number, and the reader multiplied that number by the block size
// unchecked, so a descriptor naming block 2^63 overflowed (debug) or wrapped to a small offset
// (release) and inodes were read from the wrong place. The table must lie inside the
// filesystem; every inode of the group is refused with an error naming it.
#[test]
fn ext4_inode_table_past_the_end_is_refused() {
    let mut img = ext4_image_of_a_file();
    let seed = {
        let r = ext4::reader::Reader::open(&img[..]).unwrap();
        assert_eq!(
            r.read_data(r.resolve(b"/a").unwrap().unwrap()).unwrap(),
            b"hello"
        );
        r.checksum_seed()
    };
    // Group 0's descriptor is the first 64 bytes of block 1: inode_table_hi at 0x28, then the
    // descriptor's checksum at 0x1E.
    let d = 4096;
    img[d + 0x28..d + 0x2C].copy_from_slice(&0x8000_0000u32.to_le_bytes());
    let desc: [u8; 64] = img[d..d + 64].try_into().unwrap();
    let sum = ext4::csum::group_desc(seed, 0, &desc);
    img[d + 0x1E..d + 0x20].copy_from_slice(&sum.to_le_bytes());
    let r = ext4::reader::Reader::open(&img[..]).unwrap();
    for ino in [1, 2, 11, 12] {
        let err = r
            .inode(ino)
            .expect_err("an inode table past the end is refused");
        assert!(
            err.to_string().contains("past the end"),
            "inode {ino}: {err}"
        );
        assert!(r.read_data(ino).is_err());
        assert!(ext4::dump::inode(&r, ino).is_err());
    }
    assert!(ext4::dump::tree(&r).is_err());
}

// A length read from an EROFS image sized the reader's buffer before the read could fail: a
// compressed file whose inode claims 4 GiB made it allocate its index array (megabytes) for
// an image of a few blocks. Lengths are now checked against the filesystem's end first.
#[test]
fn erofs_lengths_from_the_image_are_checked_against_its_end() {
    let mut t = Tree::default();
    t.insert(b"/a", file(&[b'z'; 65536]), &Meta::default())
        .unwrap();
    let o = erofs::Options {
        compression: erofs::Compression::Lz4,
        ..Default::default()
    };
    let mut img = erofs_image_with(&t, &o);
    let im = erofs::Image::open(&img[..]).unwrap();
    let a = im.lookup(b"/a").unwrap();
    assert_eq!(im.read_all(&a).unwrap(), vec![b'z'; 65536]);
    // i_size of a compact inode: a u32 at byte 8; of an extended one: a u64 at byte 8.
    let at = a.offset as usize + 8;
    if a.extended {
        img[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    } else {
        img[at..at + 4].copy_from_slice(&0xFFFF_F000u32.to_le_bytes());
    }
    let im = erofs::Image::open(&img[..]).unwrap();
    let a = im.lookup(b"/a").unwrap();
    let err = im.extents(&a).unwrap_err().to_string();
    assert!(
        err.contains("would lie past the") && err.contains("-byte filesystem"),
        "{err}"
    );
}
