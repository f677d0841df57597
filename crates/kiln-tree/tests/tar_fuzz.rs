//! Property tests: mutated, truncated and random archives never panic either reader, and
//! whatever they accept is internally consistent (data references inside the archive, sparse
//! runs inside the file, placed bytes exactly the stored length).
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Cursor;

use common::{gnu_header, header, Ar, Recorder};
use kiln_formats::fstree::{DataRef, NodeKind, Tree};
use kiln_tree::tar::header::{put_number, Header, BLOCK};
use kiln_tree::tar::{self, TarStream};
use proptest::prelude::*;
use zerocopy::{FromBytes, IntoBytes};

/// An archive using every feature, and the offsets of its header blocks.
fn base() -> (Vec<u8>, Vec<usize>) {
    let mut a = Ar::default();
    let mut hdrs = Vec::new();
    let mut at = |a: &Ar| hdrs.push(a.buf.len());
    at(&a);
    a.dir(b"./");
    at(&a);
    a.pax(b'g', &[("uid", b"7"), ("SCHILY.xattr.user.g", b"global")]);
    at(&a);
    a.pax(
        b'x',
        &[
            ("path", b"dir/pax-name"),
            ("mtime", b"-12.5"),
            ("LIBARCHIVE.xattr.user.b", b"AAE"),
            ("size", b"5"),
        ],
    );
    at(&a);
    a.push(header(b"x", b'0', 5));
    a.data(b"12345");
    at(&a);
    let mut l = gnu_header(b"././@LongLink", b'L', 12);
    l.typeflag = b'L';
    a.push(l);
    a.data(b"dir/longnam\0");
    at(&a);
    a.push(gnu_header(b"dir/named-by-the-long-name", b'0', 3));
    a.data(b"abc");
    at(&a);
    a.file(b"dir/short", b"short");
    at(&a);
    let mut s = gnu_header(b"sparse", b'S', 4);
    {
        let g = s.gnu_mut();
        put_number(&mut g.realsize, 5000);
        put_number(&mut g.sparse[0].offset, 10);
        put_number(&mut g.sparse[0].numbytes, 2);
        put_number(&mut g.sparse[1].offset, 4000);
        put_number(&mut g.sparse[1].numbytes, 2);
        g.isextended = 1;
    }
    a.push(s);
    let mut ext = [0u8; BLOCK];
    put_number(&mut ext[0..12], 4998);
    put_number(&mut ext[12..24], 0);
    a.buf.extend_from_slice(&ext);
    a.data(b"wxyz");
    at(&a);
    a.pax(
        b'x',
        &[
            ("GNU.sparse.major", b"1"),
            ("GNU.sparse.minor", b"0"),
            ("GNU.sparse.name", b"dir/v1"),
            ("GNU.sparse.realsize", b"9000"),
        ],
    );
    let mut d = b"1\n8000\n3\n".to_vec();
    d.resize(512, 0);
    d.extend_from_slice(b"end");
    at(&a);
    a.push(header(b"GNUSparseFile.0/v1", b'0', d.len() as u64));
    a.data(&d);
    at(&a);
    a.link(b"hard", b'1', b"dir/short");
    at(&a);
    a.link(b"sym", b'2', b"dir/short");
    at(&a);
    let mut dev = header(b"dev", b'3', 0);
    put_number(&mut dev.devmajor, 1);
    put_number(&mut dev.devminor, 3);
    a.push(dev);
    at(&a);
    a.push(header(b"fifo", b'6', 0));
    at(&a);
    a.file(b"dir/short", b"replaced");
    a.end();
    (a.buf, hdrs)
}

fn check_tree(t: &Tree, archive_len: Option<u64>) {
    t.walk();
    t.walk_paths(|_, _| {});
    for n in &t.nodes {
        if let NodeKind::File(f) = &n.kind {
            if let Some(segs) = &f.segments {
                let mut end = 0;
                for s in segs.iter() {
                    assert!(s.offset >= end && s.len > 0 && s.offset + s.len <= f.size);
                    end = s.offset + s.len;
                }
            }
            if let (DataRef::Tar(off), Some(len)) = (&f.data, archive_len) {
                assert!(
                    off + f.stored_len() <= len,
                    "data reference past the archive"
                );
            }
        }
    }
}

fn run(bytes: &[u8]) {
    if let Ok(t) = tar::index(Cursor::new(bytes.to_vec()), bytes.len() as u64) {
        check_tree(&t, Some(bytes.len() as u64));
    }
    let mut rec = Recorder::default();
    if let Ok(t) = TarStream::from_reader(Cursor::new(bytes.to_vec()), "fuzz")
        .and_then(|s| s.with_limit(1 << 24).read(&mut rec))
    {
        check_tree(&t, None);
    }
}

fn fix_checksum(bytes: &mut [u8], at: usize) {
    if let Some(block) = bytes.get_mut(at..at + BLOCK) {
        let mut h = Header::read_from_bytes(block).unwrap();
        h.set_checksum();
        block.copy_from_slice(h.as_bytes());
    }
}

#[test]
fn base_archive_is_valid() {
    let (bytes, _) = base();
    let t = tar::index(Cursor::new(bytes.clone()), bytes.len() as u64).unwrap();
    for p in [
        "dir/pax-name",
        "dir/longnam",
        "dir/short",
        "sparse",
        "dir/v1",
        "hard",
        "sym",
        "dev",
        "fifo",
    ] {
        assert!(t.resolve(p.as_bytes()).is_some(), "{p}");
    }
    run(&bytes);
}

proptest! {
    // 1024 cases each in CI; PROPTEST_CASES=N for a longer run.
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1024)
    ))]

    #[test]
    fn mutated_archives_never_panic(
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..12),
        fix in any::<bool>(),
        cut in any::<Option<usize>>(),
    ) {
        let (mut bytes, headers) = base();
        for (at, v) in edits {
            let i = at % bytes.len();
            bytes[i] = v;
        }
        // Recomputed checksums let the mutation reach the field parsers.
        if fix {
            for &h in &headers {
                fix_checksum(&mut bytes, h);
            }
        }
        if let Some(c) = cut {
            bytes.truncate(c % (bytes.len() + 1));
        }
        run(&bytes);
    }

    #[test]
    fn header_shaped_noise_never_panics(
        blocks in prop::collection::vec(
            (prop::collection::vec(any::<u8>(), BLOCK), prop::sample::select(b"0125LKxgSD367VM\0".to_vec()), any::<bool>()),
            1..6,
        ),
        tail in prop::collection::vec(any::<u8>(), 0..1024),
    ) {
        let mut bytes = Vec::new();
        for (mut b, t, ustar) in blocks {
            b[156] = t;
            if ustar {
                b[257..265].copy_from_slice(b"ustar\x0000");
            }
            let at = bytes.len();
            bytes.extend_from_slice(&b);
            fix_checksum(&mut bytes, at);
        }
        bytes.extend_from_slice(&tail);
        run(&bytes);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..3000)) {
        run(&bytes);
    }
}

/// The mutation test is only worth something if mutations get past the checksum: with
/// checksums recomputed, a fair share of mutated archives must still parse, and the rest must
/// fail in many different ways.
#[test]
fn mutations_reach_the_field_parsers() {
    let (base, headers) = base();
    let noise = kiln_testkit::pseudo_random(42, 3 * 4000);
    let (mut ok, mut kinds) = (0, std::collections::BTreeSet::new());
    for i in 0..4000 {
        let mut bytes = base.clone();
        let at = u16::from_le_bytes([noise[3 * i], noise[3 * i + 1]]) as usize % bytes.len();
        bytes[at] = noise[3 * i + 2];
        for &h in &headers {
            fix_checksum(&mut bytes, h);
        }
        match tar::index(Cursor::new(bytes.clone()), bytes.len() as u64) {
            Ok(t) => {
                ok += 1;
                check_tree(&t, Some(bytes.len() as u64));
            }
            Err(e) => {
                let msg = e.to_string();
                // The message after the offset, without numbers: the kind of fault.
                let tail = msg.rsplit_once(": ").map_or(msg.as_str(), |(_, t)| t);
                kinds.insert(
                    tail.chars()
                        .filter(|c| c.is_alphabetic())
                        .take(24)
                        .collect::<String>(),
                );
            }
        }
    }
    assert!(ok > 1000, "only {ok} of 4000 mutated archives parsed");
    assert!(
        kinds.len() > 15,
        "only {} kinds of error: {kinds:?}",
        kinds.len()
    );
}
