//! `kiln inject` and `kiln verify` end to end on raw-slot images: the three outputs agree,
//! the base is untouched, bad input fails cleanly without output, digests verify.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kiln_inject::slots::{ByteRange, PayloadInfo, RawMeta, SizeField, Slot, SlotMeta, SlotTable};

use common::{entries, kiln, ok, s, sha};

const IMAGE_LEN: u64 = 9 << 20;
const DATA: u64 = 1 << 20;
const CAPACITY: u64 = 300_000;

fn fails(args: &[&str], want: &str) {
    let o = kiln(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "kiln {args:?} should fail");
    assert!(
        err.contains(want),
        "kiln {args:?}: {err:?} does not mention {want:?}"
    );
}

fn table() -> SlotTable {
    SlotTable {
        image_len: IMAGE_LEN,
        slots: vec![Slot {
            name: "piece".into(),
            path: String::new(),
            capacity: CAPACITY,
            data: vec![ByteRange {
                offset: DATA,
                len: 307_200,
            }],
            meta: SlotMeta::Raw(RawMeta {
                size_fields: vec![SizeField {
                    offset: DATA - 8,
                    width: 4,
                }],
            }),
            default: PayloadInfo::of(b"loading"),
        }],
    }
}

/// A 9 MiB base with non-zero bytes everywhere, a default payload and an in-image table.
fn make_base(dir: &Path) -> PathBuf {
    let p = dir.join("base.img");
    let mut bytes: Vec<u8> = (0..IMAGE_LEN).map(|i| (i % 249) as u8 | 0x10).collect();
    bytes[DATA as usize - 8..DATA as usize - 4].copy_from_slice(&7u32.to_le_bytes());
    bytes[DATA as usize..DATA as usize + 7].copy_from_slice(b"loading");
    fs::write(&p, &bytes).unwrap();
    let f = fs::File::options().write(true).open(&p).unwrap();
    table().write_into(&f, "base").unwrap();
    p
}

#[test]
fn three_outputs_are_identical_for_many_sizes_and_base_is_untouched() {
    let d = tempfile::tempdir().unwrap();
    let base = make_base(d.path());
    let base_sha = sha(&base);
    for size in [0usize, 1, 4096, 123_457, CAPACITY as usize] {
        let payload: Vec<u8> = (0..size).map(|i| (i * 31 % 256) as u8).collect();
        let pf = d.path().join(format!("p{size}"));
        fs::write(&pf, &payload).unwrap();
        let slot = format!("piece={}", s(&pf));

        let out = d.path().join(format!("out{size}.img"));
        ok(&["inject", s(&base), "--slot", &slot, "-o", s(&out)]);

        let streamed = d.path().join(format!("stream{size}.img"));
        let st = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["inject", s(&base), "--slot", &slot, "-o", "-"])
            .stdout(fs::File::create(&streamed).unwrap())
            .status()
            .unwrap();
        assert!(st.success());

        // Through a pipe too (sendfile into a pipe is a different kernel path).
        let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["inject", s(&base), "--slot", &slot, "-o", "-"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut piped = Vec::new();
        std::io::Read::read_to_end(child.stdout.as_mut().unwrap(), &mut piped).unwrap();
        assert!(child.wait().unwrap().success());

        let inplace = d.path().join(format!("inplace{size}.img"));
        fs::copy(&base, &inplace).unwrap();
        ok(&["inject", s(&inplace), "--slot", &slot, "--in-place"]);

        let want = fs::read(&out).unwrap();
        assert_eq!(want.len() as u64, IMAGE_LEN);
        assert_eq!(
            fs::read(&streamed).unwrap(),
            want,
            "size {size}: -o - differs"
        );
        assert_eq!(piped, want, "size {size}: -o - into a pipe differs");
        assert_eq!(
            fs::read(&inplace).unwrap(),
            want,
            "size {size}: --in-place differs"
        );
        // The payload is there with its true size, the rest of the reservation is zero, and
        // everything outside the slot is the base.
        let b = fs::read(&base).unwrap();
        let (lo, hi) = (DATA as usize, DATA as usize + 307_200);
        assert_eq!(&want[lo..lo + size], &payload[..]);
        assert!(want[lo + size..hi].iter().all(|&x| x == 0));
        assert_eq!(&want[lo - 8..lo - 4], &(size as u32).to_le_bytes());
        assert_eq!(&want[..lo - 8], &b[..lo - 8]);
        assert_eq!(&want[lo - 4..lo], &b[lo - 4..lo]);
        assert_eq!(&want[hi..], &b[hi..]);

        // Injecting the same payload again gives the same bytes.
        let again = d.path().join(format!("again{size}.img"));
        ok(&["inject", s(&out), "--slot", &slot, "-o", s(&again)]);
        assert_eq!(fs::read(&again).unwrap(), want);
    }
    assert_eq!(sha(&base), base_sha, "base modified");
}

#[test]
fn bad_input_is_a_clear_error_and_leaves_no_output() {
    let d = tempfile::tempdir().unwrap();
    let base = make_base(d.path());
    let base_sha = sha(&base);
    let small = d.path().join("small");
    fs::write(&small, b"hello").unwrap();
    let big = d.path().join("big");
    fs::write(&big, vec![1u8; CAPACITY as usize + 1]).unwrap();

    let truncated = d.path().join("truncated.img");
    fs::write(&truncated, &fs::read(&base).unwrap()[..(8 << 20)]).unwrap();
    let cut_in_table = d.path().join("cut.img");
    fs::write(&cut_in_table, &fs::read(&base).unwrap()[..24_650]).unwrap();
    let corrupt = d.path().join("corrupt.img");
    let mut c = fs::read(&base).unwrap();
    c[24_576 + 100] ^= 0x20;
    fs::write(&corrupt, &c).unwrap();
    let before = entries(d.path());

    let out = d.path().join("out.img");
    let piece_small = format!("piece={}", s(&small));
    let nope = format!("nope={}", s(&small));
    let piece_big = format!("piece={}", s(&big));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "inject",
                s(&truncated),
                "--slot",
                &piece_small,
                "-o",
                s(&out),
            ],
            "image is 8388608 bytes but its slot table describes 9437184",
        ),
        (
            vec![
                "inject",
                s(&cut_in_table),
                "--slot",
                &piece_small,
                "-o",
                s(&out),
            ],
            "offset 24640",
        ),
        (
            vec!["inject", s(&corrupt), "--slot", &piece_small, "-o", s(&out)],
            "body checksum mismatch",
        ),
        (
            vec!["inject", s(&base), "--slot", &nope, "-o", s(&out)],
            "unknown slot \"nope\" (this image has: piece)",
        ),
        (
            vec!["inject", s(&base), "--slot", &piece_big, "-o", s(&out)],
            "300001 bytes, more than the slot's capacity of 300000",
        ),
        (
            vec!["inject", s(&base), "--slot", "piece", "-o", s(&out)],
            "expected NAME=FILE",
        ),
        (
            vec!["inject", s(&base), "--slot", &piece_small, "-o", s(&base)],
            "is the base image",
        ),
        (
            vec!["inject", s(&corrupt), "--slot", &piece_small, "--in-place"],
            "checksum mismatch",
        ),
        (
            vec!["inject", s(&base), "--slot", &piece_big, "--in-place"],
            "capacity",
        ),
    ];
    for (args, want) in &cases {
        fails(args, want);
        assert_eq!(entries(d.path()), before, "{args:?} left files behind");
    }
    // -o - with an error writes nothing to stdout.
    let o = kiln(&["inject", s(&corrupt), "--slot", &piece_small, "-o", "-"]);
    assert!(!o.status.success() && o.stdout.is_empty());
    assert_eq!(sha(&base), base_sha);
    assert_eq!(
        fs::read(&corrupt).unwrap(),
        c,
        "in-place on a corrupt table wrote something"
    );
}

#[test]
fn chunked_digests_verify_and_compose() {
    let d = tempfile::tempdir().unwrap();
    let base = make_base(d.path());
    let p = d.path().join("payload");
    fs::write(&p, vec![0xAB; 200_000]).unwrap();
    let slot = format!("piece={}", s(&p));

    // Without a chunk table, inject reports no chunked digest; with one, it does.
    let o = ok(&[
        "inject",
        s(&base),
        "--slot",
        &slot,
        "-o",
        s(&d.path().join("a.img")),
        "--json",
    ]);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(j.get("chunked_digest").is_none());
    assert_eq!(j["table"], "in-image");

    let o = ok(&["verify", s(&base), "--print", "--write-chunks", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["digest"], format!("sha256:{}", sha(&base)));
    assert!(d.path().join("base.img.chunks").exists());

    let out = d.path().join("out.img");
    let o = ok(&["inject", s(&base), "--slot", &slot, "-o", s(&out), "--json"]);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let digest = j["chunked_digest"].as_str().unwrap().to_string();
    assert!(digest.starts_with("chunked-sha256:"));

    // The output verifies against it by full read; the base + payload verifies without
    // writing anything; a different payload does not.
    ok(&["verify", s(&out), "--digest", &digest]);
    ok(&["verify", s(&base), "--slot", &slot, "--digest", &digest]);
    ok(&[
        "verify",
        s(&out),
        "--digest",
        &format!("sha256:{}", sha(&out)),
    ]);
    let other = d.path().join("other");
    fs::write(&other, b"x").unwrap();
    fails(
        &[
            "verify",
            s(&base),
            "--slot",
            &format!("piece={}", s(&other)),
            "--digest",
            &digest,
        ],
        "digest mismatch",
    );
    fails(
        &["verify", s(&base), "--digest", "chunked-sha256:zz"],
        "expected chunked-sha256",
    );

    // In-place injection keeps the chunk sidecar in step with the file.
    let ip = d.path().join("ip.img");
    fs::copy(&base, &ip).unwrap();
    fs::copy(
        d.path().join("base.img.chunks"),
        d.path().join("ip.img.chunks"),
    )
    .unwrap();
    ok(&["inject", s(&ip), "--slot", &slot, "--in-place"]);
    ok(&["verify", s(&ip), "--digest", &digest]);
    let o = ok(&["verify", s(&ip), "--print", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["chunked_digest"], digest.as_str());
}

/// A raw slot described by a sidecar over the data blocks of a file in an ext4 image made by
/// mke2fs: a same-length payload goes in, e2fsck stays clean and debugfs reads the payload.
/// (The ext4 slot kind, which also rewrites the inode for a new size, comes with kiln's ext4
/// writer; this checks the sidecar path and that only the described bytes change.)
#[test]
fn sidecar_table_over_an_ext4_file() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    fs::create_dir(&root).unwrap();
    let default: Vec<u8> = (0..65_536u32).map(|i| (i % 97) as u8 + 1).collect();
    fs::write(root.join("piece.html"), &default).unwrap();
    let img = d.path().join("fs.ext4");
    let st = Command::new("mke2fs")
        .args([
            "-q",
            "-F",
            "-t",
            "ext4",
            "-b",
            "4096",
            "-d",
            s(&root),
            s(&img),
            "8M",
        ])
        .env("E2FSPROGS_FAKE_TIME", "1700000000")
        .status()
        .expect("mke2fs (e2fsprogs) must be installed");
    assert!(st.success());
    let o = Command::new("debugfs")
        .args(["-R", "stat /piece.html", s(&img)])
        .output()
        .expect("debugfs (e2fsprogs) must be installed");
    let text = String::from_utf8_lossy(&o.stdout);
    // "(0-15):1234-1249" — one contiguous extent.
    let ext = text
        .split_whitespace()
        .find(|w| w.starts_with("(0-15):"))
        .unwrap_or_else(|| panic!("no single extent in {text}"));
    let first: u64 = ext["(0-15):".len()..]
        .split('-')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let len = fs::metadata(&img).unwrap().len();
    let t = SlotTable {
        image_len: len,
        slots: vec![Slot {
            name: "piece".into(),
            path: "/piece.html".into(),
            capacity: 65_536,
            data: vec![ByteRange {
                offset: first * 4096,
                len: 65_536,
            }],
            meta: SlotMeta::Raw(RawMeta::default()),
            default: PayloadInfo::of(&default),
        }],
    };
    fs::write(
        d.path().join("fs.ext4.slots.json"),
        t.to_sidecar_json().unwrap(),
    )
    .unwrap();
    let payload: Vec<u8> = (0..65_536u32).map(|i| (i % 13) as u8 + b'a').collect();
    let pf = d.path().join("new.html");
    fs::write(&pf, &payload).unwrap();
    let out = d.path().join("out.ext4");
    let o = ok(&[
        "inject",
        s(&img),
        "--slot",
        &format!("piece={}", s(&pf)),
        "-o",
        s(&out),
        "--json",
    ]);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(j["table"].as_str().unwrap().ends_with("fs.ext4.slots.json"));
    let fsck = Command::new("e2fsck")
        .args(["-fn", s(&out)])
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let cat = Command::new("debugfs")
        .args(["-R", "cat /piece.html", s(&out)])
        .output()
        .unwrap();
    assert_eq!(cat.stdout, payload);
    // A bad sidecar is an error naming it.
    fs::write(
        d.path().join("fs.ext4.slots.json"),
        b"{\"format\": \"kiln-slots\"",
    )
    .unwrap();
    fails(
        &[
            "inject",
            s(&img),
            "--slot",
            &format!("piece={}", s(&pf)),
            "-o",
            s(&d.path().join("x")),
        ],
        "fs.ext4.slots.json",
    );
}
