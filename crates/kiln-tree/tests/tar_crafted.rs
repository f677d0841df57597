//! Hand-made archives: the semantics of odd but valid input, and a malicious corpus where each
//! case must give a clear error naming the entry and the offset of its header, read indexed
//! and streamed alike, without panicking.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Cursor, Write};

use common::{gnu_header, header, Ar, Recorder};
use kiln_formats::fstree::{DataRef, FileData, NodeKind, Segment, Timestamp, Tree};
use kiln_tree::tar::header::{put_number, SparseField, BLOCK};
use kiln_tree::tar::{self, TarStream};
use kiln_tree::Error;

fn indexed(bytes: &[u8]) -> Result<Tree, Error> {
    tar::index(Cursor::new(bytes.to_vec()), bytes.len() as u64)
}

fn streamed(bytes: &[u8]) -> (Result<Tree, Error>, Recorder) {
    let mut rec = Recorder::default();
    let r =
        TarStream::from_reader(Cursor::new(bytes.to_vec()), "test").and_then(|s| s.read(&mut rec));
    (r, rec)
}

/// Both readers fail, and each message names `entry` (or none) and `offset` and says `what`.
#[track_caller]
fn assert_fails(bytes: &[u8], entry: Option<&str>, offset: u64, what: &str) {
    let (s, _) = streamed(bytes);
    for (mode, r) in [("indexed", indexed(bytes)), ("streamed", s)] {
        let e = match r {
            Ok(_) => panic!("{mode}: accepted, expected an error saying {what:?}"),
            Err(e) => e,
        };
        let msg = e.to_string();
        match (&e, entry) {
            (Error::Entry { entry: got, .. }, Some(want)) => {
                assert_eq!(got, want, "{mode}: {msg}")
            }
            (Error::Archive { .. }, None) => {}
            _ => panic!("{mode}: unexpected error kind: {msg} ({e:?})"),
        }
        assert!(
            msg.contains(&format!("at offset {offset}:")),
            "{mode}: offset {offset} missing in: {msg}"
        );
        assert!(msg.contains(what), "{mode}: {what:?} missing in: {msg}");
    }
}

fn file_node<'a>(t: &'a Tree, path: &str) -> &'a FileData {
    match &t.node(t.resolve(path.as_bytes()).unwrap()).kind {
        NodeKind::File(f) => f,
        k => panic!("{path} is a {}", k.name()),
    }
}

#[test]
fn malicious_paths() {
    let mut a = Ar::default();
    a.dir(b"./");
    let off = a.file(b"/etc/passwd", b"root::0:0::/:/bin/sh\n");
    a.end();
    assert_fails(&a.buf, Some("/etc/passwd"), off, "absolute path");

    let mut a = Ar::default();
    a.dir(b"./a/");
    let off = a.file(b"./a/../../escape", b"x");
    a.end();
    assert_fails(&a.buf, Some("./a/../../escape"), off, "`..`");

    // A name over 255 bytes through every way a long name can arrive.
    let long = format!("dir/{}", "n".repeat(256));
    let mut a = Ar::default();
    let mut l = gnu_header(b"././@LongLink", b'L', long.len() as u64 + 1);
    l.typeflag = b'L';
    a.push(l);
    a.data(format!("{long}\0").as_bytes());
    let off = a.push(gnu_header(b"dir/nnnn", b'0', 0));
    a.end();
    assert_fails(&a.buf, Some(&long), off, "longer than 255 bytes");

    let mut a = Ar::default();
    a.pax(b'x', &[("path", long.as_bytes())]);
    let off = a.push(header(b"short", b'0', 0));
    a.end();
    assert_fails(&a.buf, Some(&long), off, "longer than 255 bytes");

    // A parent that is not a directory.
    let mut a = Ar::default();
    a.file(b"a", b"file");
    let off = a.file(b"a/b", b"under a file");
    a.end();
    assert_fails(&a.buf, Some("a/b"), off, "parent \"a\" is a file");

    // The root named by a non-directory.
    let mut a = Ar::default();
    let off = a.file(b".", b"x");
    a.end();
    assert_fails(
        &a.buf,
        Some("."),
        off,
        "root directory but is not a directory",
    );
}

#[test]
fn malicious_links() {
    let mut a = Ar::default();
    a.file(b"present", b"x");
    let off = a.link(b"l", b'1', b"missing");
    a.end();
    assert_fails(
        &a.buf,
        Some("l"),
        off,
        "hard link to \"missing\", which is not in the archive before it",
    );

    // A link to an entry that only comes later is just as missing.
    let mut a = Ar::default();
    let off = a.link(b"early", b'1', b"later");
    a.file(b"later", b"x");
    a.end();
    assert_fails(&a.buf, Some("early"), off, "not in the archive before it");

    let mut a = Ar::default();
    a.dir(b"d/");
    let off = a.link(b"l", b'1', b"./d/");
    a.end();
    assert_fails(&a.buf, Some("l"), off, "hard link to directory");

    let mut a = Ar::default();
    let off = a.link(b"l", b'1', b"/etc/shadow");
    a.end();
    assert_fails(&a.buf, Some("l"), off, "hard link target: absolute path");

    let mut a = Ar::default();
    let off = a.link(b"s", b'2', b"");
    a.end();
    assert_fails(&a.buf, Some("s"), off, "symlink target of 0 bytes");
}

#[test]
fn truncated_archives() {
    let mut a = Ar::default();
    a.file(b"first", b"ok");
    let off = a.file(b"big", &vec![7u8; 3000]);
    a.end();
    // EOF inside the data.
    assert_fails(
        &a.buf[..off as usize + 512 + 1000],
        Some("big"),
        off,
        "truncated",
    );
    // EOF inside the padding after the data.
    assert_fails(
        &a.buf[..off as usize + 512 + 3050],
        Some("big"),
        off,
        "truncated",
    );
    // EOF inside a header.
    assert_fails(
        &a.buf[..off as usize + 100],
        None,
        off,
        "truncated archive: the header block of \"big\" has only 100 of 512 bytes",
    );
    // EOF on a block boundary, without the end-of-archive marker.
    let end = a.buf.len() - 1024;
    assert_fails(&a.buf[..end], None, end as u64, "end-of-archive marker");
    // Nothing at all.
    assert_fails(b"", None, 0, "empty input");
    // EOF inside a PAX header's data.
    let mut a = Ar::default();
    let off = a.pax(b'x', &[("path", &[b'p'; 700])]);
    assert_fails(
        &a.buf[..700],
        Some("./PaxHeaders/x"),
        off,
        "truncated inside a 710-byte extended header",
    );
    // A single zero block at the very end is accepted (GNU tar writes two, but accepts one).
    let mut a = Ar::default();
    a.file(b"f", b"x");
    a.buf.extend([0u8; 512]);
    assert!(indexed(&a.buf).is_ok());
}

#[test]
fn bad_checksums_and_numbers() {
    let mut a = Ar::default();
    a.file(b"fine", b"x");
    let off = a.file(b"bent", b"y") as usize;
    a.end();
    let mut bad = a.buf.clone();
    bad[off + 140] ^= 1; // one bit of the mtime field
    assert_fails(&bad, Some("bent"), off as u64, "bad header checksum");
    let mut bad = a.buf.clone();
    bad[off + 148..off + 156].copy_from_slice(b"zz\0     ");
    assert_fails(&bad, Some("bent"), off as u64, "unreadable header checksum");
    // Random bytes are not a tar.
    let noise = kiln_testkit::pseudo_random(5, 4096);
    assert_fails(
        &noise,
        Some(&String::from_utf8_lossy(common::cstr(&noise[..100]))),
        0,
        "checksum",
    );

    // A size field of garbage (checksum valid).
    let mut a = Ar::default();
    let mut h = header(b"garbage", b'0', 0);
    h.size.copy_from_slice(b"12abc\0\0\0\0\0\0\0");
    let off = a.push(h);
    a.end();
    assert_fails(&a.buf, Some("garbage"), off, "size field \"12abc\"");

    let mut a = Ar::default();
    let mut h = header(b"u", b'0', 0);
    put_number(&mut h.uid, 1 << 40);
    let off = a.push(h);
    a.end();
    assert_fails(
        &a.buf,
        Some("u"),
        off,
        "uid 1099511627776 is not a 32-bit id",
    );
}

#[test]
fn lying_sizes() {
    // Claims 1 GiB, holds 100 bytes.
    let mut a = Ar::default();
    let off = a.push(header(b"liar", b'0', 1 << 30));
    a.data(&[1u8; 100]);
    a.end();
    assert_fails(&a.buf, Some("liar"), off, "truncated");

    // Claims less than it holds: the rest is read as a header and fails its checksum.
    let mut a = Ar::default();
    a.push(header(b"short", b'0', 10));
    a.data(&[b'A'; 2000]);
    a.end();
    assert_fails(&a.buf, Some(&"A".repeat(100)), 1024, "checksum");

    // Header-only types carry no data whatever their size says: no bytes are skipped.
    let mut a = Ar::default();
    a.push(header(b"d/", b'5', 1 << 40));
    let mut h = header(b"s", b'2', 999_999);
    h.linkname[..3].copy_from_slice(b"abc");
    a.push(h);
    a.file(b"d/f", b"after");
    a.end();
    let t = indexed(&a.buf).unwrap();
    assert_eq!(file_node(&t, "d/f").size, 5);
}

#[test]
fn oversized_metadata() {
    // A PAX header claiming 1 TiB of records.
    let mut a = Ar::default();
    let off = a.push(header(b"./PaxHeaders/huge", b'x', 1 << 40));
    a.end();
    assert_fails(
        &a.buf,
        Some("./PaxHeaders/huge"),
        off,
        "exceeds the limit of 1048576 bytes",
    );

    // Many PAX headers before one entry add up against the same bound.
    let mut a = Ar::default();
    let rec = vec![b'v'; 600 * 1024];
    a.pax(b'x', &[("comment", &rec)]);
    let off = a.pax(b'x', &[("comment", &rec)]);
    a.end();
    assert_fails(&a.buf, Some("./PaxHeaders/x"), off, "exceeds the limit");

    // A GNU long name of 2 MiB.
    let mut a = Ar::default();
    let off = a.push(gnu_header(b"././@LongLink", b'L', 2 << 20));
    a.end();
    assert_fails(&a.buf, Some("././@LongLink"), off, "exceeds the limit");

    // A record whose length runs past its header.
    let mut a = Ar::default();
    let data = b"99999999 path=x\n";
    let off = a.push(header(b"./PaxHeaders/r", b'x', data.len() as u64));
    a.data(data);
    a.push(header(b"f", b'0', 0));
    a.end();
    assert_fails(
        &a.buf,
        Some("./PaxHeaders/r"),
        off,
        "record length 99999999 does not fit",
    );

    // Bad values, reported at the extended header (or at the entry's header when the value
    // is only wrong for that entry).
    for (k, v, what, at_pax) in [
        ("mtime", &b"12x"[..], "is not `[-]SECONDS[.FRACTION]`", true),
        ("uid", b"-1", "expected a decimal number", true),
        ("size", b"1e3", "expected a decimal number", true),
        (
            "size",
            b"18446744073709551615",
            "larger than 2^63-1 bytes",
            false,
        ),
        ("LIBARCHIVE.xattr.user.x", b"***", "not base64", true),
    ] {
        let mut a = Ar::default();
        let poff = a.pax(b'x', &[(k, v)]);
        let off = a.push(header(b"f", b'0', 0));
        a.end();
        assert_fails(&a.buf, Some("f"), if at_pax { poff } else { off }, what);
    }

    // An extended header with no entry after it.
    let mut a = Ar::default();
    let off = a.pax(b'x', &[("path", b"x")]);
    a.end();
    assert_fails(&a.buf, None, off, "not followed by an entry");
}

fn old_sparse(name: &[u8], realsize: u64, runs: &[(u64, u64)], ext_runs: &[(u64, u64)]) -> Ar {
    let stored: u64 = runs.iter().chain(ext_runs).map(|r| r.1).sum();
    let mut a = Ar::default();
    let mut h = gnu_header(name, b'S', stored);
    let g = h.gnu_mut();
    put_number(&mut g.realsize, realsize as i64);
    for (f, &(o, n)) in g.sparse.iter_mut().zip(runs) {
        put_number(&mut f.offset, o as i64);
        put_number(&mut f.numbytes, n as i64);
    }
    g.isextended = u8::from(!ext_runs.is_empty());
    a.push(h);
    for (i, chunk) in ext_runs.chunks(21).enumerate() {
        let mut block = [0u8; BLOCK];
        for (j, &(o, n)) in chunk.iter().enumerate() {
            let mut f = SparseField {
                offset: [0; 12],
                numbytes: [0; 12],
            };
            put_number(&mut f.offset, o as i64);
            put_number(&mut f.numbytes, n as i64);
            block[j * 24..j * 24 + 12].copy_from_slice(&f.offset);
            block[j * 24 + 12..j * 24 + 24].copy_from_slice(&f.numbytes);
        }
        block[504] = u8::from((i + 1) * 21 < ext_runs.len());
        a.buf.extend_from_slice(&block);
    }
    a.data(&kiln_testkit::pseudo_random(1, stored as usize));
    a
}

#[test]
fn absurd_sparse_maps() {
    let mut a = old_sparse(b"s", 100, &[(0, 50), (200, 10)], &[]);
    a.end();
    assert_fails(&a.buf, Some("s"), 0, "runs past the file size 100");

    let mut a = old_sparse(b"s", 1000, &[(500, 50), (100, 10)], &[]);
    a.end();
    assert_fails(&a.buf, Some("s"), 0, "overlaps or precedes");

    // A chain of extension blocks that never ends: cut by the archive's end.
    let mut a = old_sparse(
        b"s",
        1 << 40,
        &[(0, 1), (10, 1), (20, 1), (30, 1)],
        &[(40, 1)],
    );
    let ext_at = 512;
    a.buf[ext_at + 504] = 1; // "another extension block follows"
    assert_fails(&a.buf, Some("s"), 1024, "sparse");

    // (records, error, reported at the extended header rather than the entry's header)
    for (records, what, at_pax) in [
        (
            vec![
                ("GNU.sparse.size", &b"100"[..]),
                ("GNU.sparse.numblocks", b"1000000000000"),
            ],
            "more than 1048576 runs",
            true,
        ),
        (
            vec![
                ("GNU.sparse.size", &b"100"[..]),
                ("GNU.sparse.map", b"0,10,5,10"),
            ],
            "overlaps",
            false,
        ),
        (
            vec![
                ("GNU.sparse.size", &b"100"[..]),
                ("GNU.sparse.numblocks", b"3"),
                ("GNU.sparse.map", b"0,20"),
            ],
            "numblocks=3 but the map has 1 pairs",
            false,
        ),
        (
            vec![("GNU.sparse.size", &b"100"[..]), ("GNU.sparse.map", b"0,5")],
            "describes 5 bytes of data but the entry stores 20",
            false,
        ),
        (
            vec![("GNU.sparse.major", &b"1"[..]), ("GNU.sparse.minor", b"0")],
            "without GNU.sparse.realsize",
            false,
        ),
        (
            vec![
                ("GNU.sparse.offset", &b"1"[..]),
                ("GNU.sparse.offset", b"2"),
            ],
            "without its GNU.sparse.numbytes",
            true,
        ),
    ] {
        let mut a = Ar::default();
        let poff = a.pax(b'x', &records);
        let off = a.push(header(b"p", b'0', 20));
        a.data(&[1u8; 20]);
        a.end();
        assert_fails(&a.buf, Some("p"), if at_pax { poff } else { off }, what);
    }

    // PAX 1.0 maps in the data: a huge count, garbage, a map longer than the data.
    for (map, what) in [
        (&b"99999999999999\n"[..], "claims 99999999999999 runs"),
        (b"1\n0\nxyz\n", "unexpected byte 'x'"),
        (&[b'1'; 600][..], "count has more than 20 digits"),
    ] {
        let mut a = Ar::default();
        a.pax(
            b'x',
            &[
                ("GNU.sparse.major", b"1"),
                ("GNU.sparse.minor", b"0"),
                ("GNU.sparse.name", b"real"),
                ("GNU.sparse.realsize", b"1000"),
            ],
        );
        let mut data = map.to_vec();
        data.resize(data.len().next_multiple_of(512), 0);
        let off = a.push(header(b"GNUSparseFile.1/real", b'0', data.len() as u64));
        a.data(&data);
        a.end();
        assert_fails(&a.buf, Some("real"), off, what);
    }
}

#[test]
fn decompression_bomb_is_bounded_by_the_caller() {
    // 64 MiB of zeroes in one file compress to about 64 KiB.
    let mut a = Ar::default();
    a.push(header(b"zeroes", b'0', 64 << 20));
    a.buf.resize(a.buf.len() + (64 << 20), 0);
    a.end();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&a.buf).unwrap();
    let gz = gz.finish().unwrap();
    assert!(gz.len() < 1 << 20);
    let mut rec = Recorder::default();
    let e = TarStream::from_reader(Cursor::new(gz.clone()), "bomb")
        .unwrap()
        .with_limit(8 << 20)
        .read(&mut rec)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("tar entry \"zeroes\" at offset 0: reading data at offset 8388608: input exceeds the limit of 8388608 uncompressed bytes"),
        "{e}"
    );
    // The limit also holds when the bytes are headers, not file data.
    let mut a = Ar::default();
    for i in 0..1000 {
        a.dir(format!("d{i}/").as_bytes());
    }
    a.end();
    let e = TarStream::from_reader(Cursor::new(a.buf), "many")
        .unwrap()
        .with_limit(100 * 512)
        .read(&mut Recorder::default())
        .unwrap_err();
    assert!(
        e.to_string().contains(
            "tar archive at offset 51200: reading header: input exceeds the limit of 51200"
        ),
        "{e}"
    );
    // The same stream without a limit is fine.
    let mut rec = Recorder::default();
    let t = TarStream::from_reader(Cursor::new(gz), "bomb")
        .unwrap()
        .read(&mut rec)
        .unwrap();
    assert_eq!(file_node(&t, "zeroes").size, 64 << 20);
    assert_eq!(rec.files[0].len(), 64 << 20);
}

#[test]
fn placer_errors_are_reported_as_such() {
    let mut a = Ar::default();
    a.file(b"one", b"1");
    let off = a.file(b"two", b"2");
    a.end();
    let mut rec = Recorder {
        fail_after: Some(1),
        ..Recorder::default()
    };
    let e = TarStream::from_reader(Cursor::new(a.buf), "t")
        .unwrap()
        .read(&mut rec)
        .unwrap_err();
    assert!(
        matches!(e, Error::Place { offset, .. } if offset == off),
        "{e:?}"
    );
    assert!(e.to_string().contains("image is full"), "{e}");
}

#[test]
fn lone_zero_block_and_unknown_types() {
    let mut a = Ar::default();
    a.file(b"a", b"x");
    a.buf.extend([0u8; 512]);
    a.file(b"b", b"y");
    a.end();
    assert_fails(&a.buf, None, 1024, "lone zero block");

    let mut a = Ar::default();
    let off = a.push(gnu_header(b"vol", b'M', 0));
    a.end();
    assert_fails(&a.buf, Some("vol"), off, "multi-volume");
    let mut a = Ar::default();
    let off = a.push(header(b"q", b'Q', 0));
    a.end();
    assert_fails(&a.buf, Some("q"), off, "unsupported entry type \"Q\"");
}

#[test]
fn replacement_semantics_and_discard() {
    let mut a = Ar::default();
    a.file(b"a", b"first");
    a.file(b"./a", b"second");
    a.file(b"x", b"kept alive");
    a.link(b"y", b'1', b"./x");
    a.file(b"x", b"new x");
    a.dir(b"d/");
    a.file(b"d/f", b"in d");
    a.file(b"d/sub/g", b"deeper");
    a.file(b"d", b"d is a file now");
    let mut h = header(b"e/", b'5', 0);
    put_number(&mut h.mode, 0o700);
    a.dir(b"e/");
    a.file(b"e/keep", b"stays");
    a.push(h);
    a.link(b"self", b'1', b"a");
    a.link(b"self", b'1', b"self");
    a.end();

    let (t, rec) = streamed(&a.buf);
    let t = t.unwrap();
    // Placed: 0 "first", 1 "second", 2 "kept alive", 3 "new x", 4 "in d", 5 "deeper",
    // 6 "d is a file now", 7 "stays".
    let mut discarded = rec.discarded.clone();
    discarded.sort();
    assert_eq!(
        discarded,
        [0, 4, 5],
        "replaced files with no other name are discarded"
    );
    assert_eq!(file_node(&t, "a").data, DataRef::Placed(1));
    assert_eq!(
        file_node(&t, "y").data,
        DataRef::Placed(2),
        "y keeps the old x"
    );
    assert_eq!(file_node(&t, "x").data, DataRef::Placed(3));
    assert_eq!(file_node(&t, "d").data, DataRef::Placed(6));
    assert_eq!(t.resolve(b"self"), t.resolve(b"a"));
    let e = t.resolve(b"e").unwrap();
    assert_eq!(
        t.node(e).meta.perm,
        0o700,
        "directory over directory updates metadata"
    );
    assert!(t.resolve(b"e/keep").is_some(), "and keeps its entries");

    // The indexed reader gives the same structure.
    let ti = indexed(&a.buf).unwrap();
    let names = |t: &Tree| {
        let mut v = Vec::new();
        t.walk_paths(|p, _| v.push(String::from_utf8_lossy(p).into_owned()));
        v
    };
    assert_eq!(names(&t), names(&ti));
    // (walk_paths lists a hardlinked node once: "self" shares "a"'s node.)
    assert_eq!(names(&t), ["/", "/a", "/d", "/e", "/e/keep", "/x", "/y"]);
}

#[test]
fn headers_and_extensions() {
    let mut a = Ar::default();
    // Root metadata from "./".
    let mut h = header(b"./", b'5', 0);
    put_number(&mut h.mode, 0o710);
    put_number(&mut h.uid, 5);
    a.push(h);
    // Base-256: a negative mtime and a uid above 2^21.
    let mut h = header(b"old", b'0', 3);
    put_number(&mut h.mtime, -86_400 * 365 * 20);
    h.uid = [0x80, 0, 0, 0, 0xb2, 0xd0, 0x5e, 0x00];
    a.push(h);
    a.data(b"old");
    // Global PAX values apply to later entries; local ones win.
    a.pax(b'g', &[("uid", b"4000000000"), ("gid", b"77")]);
    a.pax(
        b'x',
        &[
            ("mtime", b"-1.25"),
            ("gid", b"4294967295"),
            ("path", b"./pax/long/name"),
            ("SCHILY.xattr.user.s", b"raw\0value"),
            ("LIBARCHIVE.xattr.user.l%20x", b"AAEC"),
            ("SCHILY.xattr.security.capability", b"\x01\x00\x00\x02"),
        ],
    );
    a.file(b"ignored-name", b"pax");
    a.file(b"after", b"global");
    // GNU long link for a symlink; devices; a FIFO; a V7 header without magic.
    let target = "t".repeat(300);
    let mut k = gnu_header(b"././@LongLink", b'K', target.len() as u64 + 1);
    k.typeflag = b'K';
    a.push(k);
    a.data(format!("{target}\0").as_bytes());
    a.push(gnu_header(b"sym", b'2', 0));
    let mut h = header(b"dev/sda", b'4', 0);
    put_number(&mut h.devmajor, 8);
    put_number(&mut h.devminor, 1);
    a.push(h);
    a.pax(
        b'x',
        &[("SCHILY.devmajor", b"4000"), ("SCHILY.devminor", b"300000")],
    );
    a.push(header(b"dev/big", b'3', 0));
    a.push(header(b"fifo", b'6', 0));
    let mut v7 = header(b"v7-file", 0, 2);
    v7.magic = [0; 6];
    v7.version = [0; 2];
    a.push(v7);
    a.data(b"v7");
    let mut v7dir = header(b"v7-dir/", 0, 0);
    v7dir.magic = [0; 6];
    v7dir.version = [0; 2];
    a.push(v7dir);
    // A ustar prefix.
    let mut h = header(b"leaf", b'0', 1);
    h.ustar_mut().prefix[..10].copy_from_slice(b"pre/fix/ed");
    a.push(h);
    a.data(b"L");
    a.end();

    for t in [indexed(&a.buf).unwrap(), streamed(&a.buf).0.unwrap()] {
        let root = t.node(0);
        assert_eq!((root.meta.perm, root.meta.uid), (0o710, 5));
        let old = t.node(t.resolve(b"old").unwrap());
        assert_eq!(old.meta.mtime, Timestamp::from_secs(-86_400 * 365 * 20));
        assert_eq!(old.meta.uid, 3_000_000_000);
        let p = t.node(t.resolve(b"pax/long/name").unwrap());
        assert_eq!(
            p.meta.mtime,
            Timestamp {
                sec: -2,
                nsec: 750_000_000
            }
        );
        assert_eq!((p.meta.uid, p.meta.gid), (4_000_000_000, u32::MAX));
        let x: Vec<(&[u8], &[u8])> = p
            .meta
            .xattrs
            .iter()
            .map(|x| (&*x.name, &*x.value))
            .collect();
        assert_eq!(
            x,
            [
                (&b"security.capability"[..], &b"\x01\x00\x00\x02"[..]),
                (b"user.l x", &[0, 1, 2]),
                (b"user.s", b"raw\0value"),
            ]
        );
        assert!(t.resolve(b"ignored-name").is_none());
        let after = t.node(t.resolve(b"after").unwrap());
        assert_eq!((after.meta.uid, after.meta.gid), (4_000_000_000, 77));
        assert!(after.meta.xattrs.is_empty(), "local records do not leak");
        assert!(
            matches!(&t.node(t.resolve(b"sym").unwrap()).kind, NodeKind::Symlink(s) if **s == *target.as_bytes())
        );
        assert_eq!(
            t.node(t.resolve(b"dev/sda").unwrap()).kind,
            NodeKind::BlockDev { major: 8, minor: 1 }
        );
        assert_eq!(
            t.node(t.resolve(b"dev/big").unwrap()).kind,
            NodeKind::CharDev {
                major: 4000,
                minor: 300_000
            }
        );
        let dev = t.node(t.resolve(b"dev").unwrap());
        assert_eq!((dev.meta.perm, dev.meta.uid), (0o755, 0), "implicit parent");
        assert_eq!(t.node(t.resolve(b"fifo").unwrap()).kind, NodeKind::Fifo);
        assert_eq!(file_node(&t, "v7-file").size, 2);
        assert!(t.node(t.resolve(b"v7-dir").unwrap()).is_dir());
        assert_eq!(file_node(&t, "pre/fix/ed/leaf").size, 1);
    }
}

#[test]
fn sparse_entries_map_to_packed_data() {
    // Old GNU map with an extension block: 30 runs of 3 bytes every 1000 bytes.
    let runs: Vec<(u64, u64)> = (0..30).map(|i| (i * 1000 + 7, 3)).collect();
    let mut a = old_sparse(b"old", 40_000, &runs[..4], &runs[4..]);
    // PAX 1.0: map in the data.
    a.pax(
        b'x',
        &[
            ("GNU.sparse.major", b"1"),
            ("GNU.sparse.minor", b"0"),
            ("GNU.sparse.name", b"v1"),
            ("GNU.sparse.realsize", b"1048576"),
        ],
    );
    let mut data = b"2\n4096\n5\n1048569\n7\n".to_vec();
    data.resize(512, 0);
    data.extend_from_slice(b"hello world!");
    a.push(header(b"./GNUSparseFile.9/v1", b'0', data.len() as u64));
    a.data(&data);
    a.end();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.tar");
    std::fs::write(&path, &a.buf).unwrap();
    let kiln_tree::Opened::Indexed(t, c) = tar::open_file(&path).unwrap() else {
        panic!("plain file is indexed")
    };
    let (ts, rec) = streamed(&a.buf);
    let ts = ts.unwrap();
    let want_old: Vec<Segment> = runs
        .iter()
        .map(|&(offset, len)| Segment { offset, len })
        .collect();
    let packed = kiln_testkit::pseudo_random(1, 90);
    for t in [&t, &ts] {
        let f = file_node(t, "old");
        assert_eq!(f.size, 40_000);
        assert_eq!(f.segments.as_deref(), Some(&want_old[..]));
        let v1 = file_node(t, "v1");
        assert_eq!(v1.size, 1 << 20);
        assert_eq!(
            v1.segments.as_deref(),
            Some(
                &[
                    Segment {
                        offset: 4096,
                        len: 5
                    },
                    Segment {
                        offset: 1_048_569,
                        len: 7
                    }
                ][..]
            )
        );
    }
    assert_eq!(rec.files[0], packed);
    assert_eq!(rec.files[1], b"hello world!");
    // Indexed reads by logical offset, inside runs and across holes.
    use kiln_formats::fstree::Contents;
    let f = file_node(&t, "old");
    let mut b = [0u8; 3];
    c.read_at(f, 29_007, &mut b).unwrap();
    assert_eq!(b, packed[87..90]);
    let mut b = vec![9u8; 2000];
    c.read_at(f, 1000, &mut b).unwrap();
    let mut want = vec![0u8; 2000];
    want[7..10].copy_from_slice(&packed[3..6]);
    want[1007..1010].copy_from_slice(&packed[6..9]);
    assert_eq!(b, want);
    let v1 = file_node(&t, "v1");
    let mut b = [0u8; 6];
    c.read_at(v1, 1_048_570, &mut b).unwrap();
    assert_eq!(&b, b" world!".get(1..).unwrap());
    assert!(c.read_at(v1, 1_048_575, &mut b).is_err(), "past the end");
}

#[test]
fn files_with_many_runs_read_by_offset() {
    // 200 runs (PAX 0.1 map): enough for the contents reader's cached run offsets.
    let runs: Vec<(u64, u64)> = (0..200).map(|i| (i * 100 + 1, 3)).collect();
    let map: Vec<String> = runs.iter().map(|(o, n)| format!("{o},{n}")).collect();
    let packed = kiln_testkit::pseudo_random(3, 600);
    let mut a = Ar::default();
    a.pax(
        b'x',
        &[
            ("GNU.sparse.size", b"20000"),
            ("GNU.sparse.numblocks", b"200"),
            ("GNU.sparse.name", b"many"),
            ("GNU.sparse.map", map.join(",").as_bytes()),
        ],
    );
    a.push(header(b"GNUSparseFile.1/many", b'0', 600));
    a.data(&packed);
    a.end();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.tar");
    std::fs::write(&path, &a.buf).unwrap();
    let kiln_tree::Opened::Indexed(t, c) = tar::open_file(&path).unwrap() else {
        panic!("plain file is indexed")
    };
    use kiln_formats::fstree::Contents;
    let f = file_node(&t, "many");
    assert_eq!(f.segments.as_ref().map(|s| s.len()), Some(200));
    // Run by run, last to first (the cache must not depend on order).
    for (i, &(o, n)) in runs.iter().enumerate().rev() {
        let mut b = vec![0u8; n as usize];
        c.read_at(f, o, &mut b).unwrap();
        assert_eq!(b, packed[i * 3..i * 3 + 3], "run {i}");
    }
    let mut whole = vec![1u8; 20000];
    c.read_at(f, 0, &mut whole).unwrap();
    let mut want = vec![0u8; 20000];
    for (i, &(o, _)) in runs.iter().enumerate() {
        want[o as usize..o as usize + 3].copy_from_slice(&packed[i * 3..i * 3 + 3]);
    }
    assert!(whole == want);
}
