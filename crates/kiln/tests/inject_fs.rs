//! `kiln inject` into filesystem slots of images made by `kiln build`: an ext4 slot, two FAT
//! slots sharing one FAT and an EROFS slot, checked after injection with e2fsck, debugfs,
//! fsck.fat, mtype and fsck.erofs; the three output modes agree; re-injecting an injected
//! image equals injecting the base; bad bases and payloads fail cleanly without output.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_testkit::{require_tool, run};
use serde_json::Value;

use common::{entries, kiln, ok, s, sha};

const SPEC: &str = r#"
[image]
name = "slots"
version = "1"
seed = "0123456789abcdef0123456789abcdef"
source_date_epoch = 1700000000

[[partition]]
type = "linux-generic"
label = "e4"
fs = "ext4"
size = "4M"
slot = { name = "e4", path = "/index.html", capacity = "64K", default = "page.html" }

[[partition]]
type = "linux-generic"
label = "vf"
fs = "vfat"
size = "4M"
slot = [{ name = "fa", path = "/a.bin", capacity = "64K", default = "page.html" }, { name = "fb", path = "/b.bin", capacity = "20000" }]

[[partition]]
type = "linux-generic"
label = "ero"
fs = "erofs"
size = "4M"
slot = { name = "er", path = "/er.bin", capacity = "64K" }
"#;

const CAP: usize = 65_536;
const CAP_FB: usize = 20_000;
const DEFAULT_PAGE: &[u8] = b"<p>default page</p>\n";

fn fails(args: &[&str], want: &[&str]) {
    let o = kiln(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "kiln {args:?} should fail");
    assert!(o.stdout.is_empty(), "kiln {args:?} wrote to stdout");
    for w in want {
        assert!(
            err.contains(w),
            "kiln {args:?}: {err:?} does not mention {w:?}"
        );
    }
}

/// Builds the spec into DIR/out; returns the disk and the build report.
fn build(dir: &Path) -> (PathBuf, Value) {
    let src = dir.join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("index.html"), b"the tree's page\n").unwrap();
    fs::write(dir.join("page.html"), DEFAULT_PAGE).unwrap();
    fs::write(dir.join("kiln.toml"), SPEC).unwrap();
    ok(&[
        "build",
        s(dir),
        "-o",
        s(&dir.join("out")),
        "--source",
        s(&src),
        "-q",
    ]);
    let r: Value = serde_json::from_slice(&fs::read(dir.join("out/slots.json")).unwrap()).unwrap();
    (dir.join("out/slots_1.img"), r)
}

/// Partition `i` of `disk` copied into its own file.
fn part(disk: &Path, r: &Value, i: usize, to: &Path) -> PathBuf {
    let p = &r["partitions"][i];
    let (off, size) = (p["offset"].as_u64().unwrap(), p["size"].as_u64().unwrap());
    let data = fs::read(disk).unwrap();
    fs::write(to, &data[off as usize..(off + size) as usize]).unwrap();
    to.to_path_buf()
}

fn payload(len: usize, mul: usize) -> Vec<u8> {
    (0..len).map(|i| (i * mul % 251) as u8).collect()
}

/// Runs `cmd`, requires success, returns stdout.
fn check(cmd: &mut Command, what: &str) -> Vec<u8> {
    let o = run(cmd);
    assert!(
        o.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

/// Every filesystem of `img` passes its checker and holds exactly the given payloads.
fn check_filesystems(
    img: &Path,
    r: &Value,
    dir: &Path,
    e4: &[u8],
    fa: &[u8],
    fb: &[u8],
    er: &[u8],
) {
    let p0 = part(img, r, 0, &dir.join("p0.ext4"));
    check(Command::new("e2fsck").arg("-fn").arg(&p0), "e2fsck");
    let cat = check(
        Command::new("debugfs")
            .args(["-R", "cat /index.html"])
            .arg(&p0),
        "debugfs",
    );
    assert!(
        cat == e4,
        "debugfs cat: {} bytes, want {}",
        cat.len(),
        e4.len()
    );

    let p1 = part(img, r, 1, &dir.join("p1.fat"));
    check(Command::new("fsck.fat").arg("-n").arg(&p1), "fsck.fat");
    for (name, want) in [("::/a.bin", fa), ("::/b.bin", fb)] {
        let got = check(Command::new("mtype").arg("-i").arg(&p1).arg(name), "mtype");
        assert!(
            got == want,
            "mtype {name}: {} bytes, want {}",
            got.len(),
            want.len()
        );
    }

    let p2 = part(img, r, 2, &dir.join("p2.erofs"));
    check(Command::new("fsck.erofs").arg(&p2), "fsck.erofs");
    let x = dir.join("x");
    let _ = fs::remove_dir_all(&x);
    check(
        Command::new("fsck.erofs")
            .arg(format!("--extract={}", s(&x)))
            .arg(&p2),
        "fsck.erofs --extract",
    );
    let got = fs::read(x.join("er.bin")).unwrap();
    assert!(
        got == er,
        "erofs er.bin: {} bytes, want {}",
        got.len(),
        er.len()
    );
}

#[test]
fn filesystem_slots_of_a_built_image() {
    for t in ["e2fsck", "debugfs", "fsck.fat", "mtype", "fsck.erofs"] {
        require_tool(t);
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (base, r) = build(dir);
    let base_sha = sha(&base);
    // The defaults as built: the spec's default page, empty files where none is given.
    check_filesystems(&base, &r, dir, DEFAULT_PAGE, DEFAULT_PAGE, b"", b"");
    // Slot files the build adds are dated SOURCE_DATE_EPOCH like the rest, not 1970.
    let p0 = part(&base, &r, 0, &dir.join("p0-stat.ext4"));
    let stat = check(
        Command::new("debugfs")
            .args(["-R", "stat /index.html"])
            .arg(&p0),
        "debugfs",
    );
    let stat = String::from_utf8_lossy(&stat);
    assert!(
        stat.contains("mtime: 0x6553f100"),
        "slot file mtime is not 1700000000:\n{stat}"
    );

    // One copy injected in place again and again: each step must equal injecting the base.
    let inplace = dir.join("inplace.img");
    fs::copy(&base, &inplace).unwrap();
    for size in [0usize, 1, 4095, 4096, 4097, 10_000, CAP] {
        let (e4, fa, er) = (payload(size, 7), payload(size, 11), payload(size, 13));
        let fb = payload(size.min(CAP_FB), 17);
        let mut args: Vec<String> = ["inject", s(&base)].map(String::from).to_vec();
        for (name, bytes) in [("e4", &e4), ("fa", &fa), ("fb", &fb), ("er", &er)] {
            let f = dir.join(format!("{name}.in"));
            fs::write(&f, bytes).unwrap();
            args.push("--slot".into());
            args.push(format!("{name}={}", s(&f)));
        }
        let a = |extra: &[&str], image: &Path| -> Vec<String> {
            let mut v = args.clone();
            v[1] = s(image).into();
            v.extend(extra.iter().map(|x| x.to_string()));
            v
        };
        let run_args = |v: Vec<String>| ok(&v.iter().map(String::as_str).collect::<Vec<_>>());

        let out = dir.join("out.img");
        let json = run_args(a(&["-o", s(&out), "--json"], &base));
        let twice = dir.join("twice.img");
        run_args(a(&["-o", s(&twice)], &base));
        let streamed = run_args(a(&["-o", "-"], &base)).stdout;
        run_args(a(&["--in-place"], &inplace));
        let want = fs::read(&out).unwrap();
        assert!(
            fs::read(&twice).unwrap() == want,
            "size {size}: second -o differs"
        );
        assert!(streamed == want, "size {size}: -o - differs from -o FILE");
        assert!(
            fs::read(&inplace).unwrap() == want,
            "size {size}: re-injecting in place differs from injecting the base"
        );
        check_filesystems(&out, &r, dir, &e4, &fa, &fb, &er);

        // The chunked digest inject reports verifies from the base plus the payloads.
        let j: Value = serde_json::from_slice(&json.stdout).unwrap();
        let digest = j["chunked_digest"].as_str().unwrap();
        ok(&["verify", s(&out), "--digest", digest]);
        let mut v = a(&["--digest", digest], &base);
        v[0] = "verify".into();
        run_args(v);
    }
    // Only one FAT slot given: the other keeps its bytes, the FAT stays consistent.
    let one = dir.join("one.img");
    let fa = payload(5000, 3);
    fs::write(dir.join("fa.in"), &fa).unwrap();
    ok(&[
        "inject",
        s(&inplace),
        "--slot",
        &format!("fa={}", s(&dir.join("fa.in"))),
        "-o",
        s(&one),
    ]);
    let last = |m| payload(CAP, m);
    check_filesystems(
        &one,
        &r,
        dir,
        &last(7),
        &fa,
        &payload(CAP_FB, 17),
        &last(13),
    );
    assert_eq!(sha(&base), base_sha, "base modified");
}

/// A copy of `base` with `bytes` written at `offset`.
fn damaged(base: &Path, to: &Path, offset: u64, bytes: &[u8]) -> PathBuf {
    let mut b = fs::read(base).unwrap();
    b[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes);
    fs::write(to, b).unwrap();
    to.to_path_buf()
}

#[test]
fn bad_bases_and_payloads_fail_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let (base, _) = build(d.path());
    let base_sha = sha(&base);
    let t: Value =
        serde_json::from_slice(&fs::read(d.path().join("out/slots_1.img.slots.json")).unwrap())
            .unwrap();
    let meta = |name: &str| -> Value {
        t["slots"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == name)
            .unwrap()["meta"]
            .clone()
    };
    let at = |name: &str, key: &str| meta(name)[key].as_u64().unwrap();

    let w = d.path().join("work");
    fs::create_dir(&w).unwrap();
    let small = w.join("small");
    fs::write(&small, b"hello").unwrap();
    let over = w.join("over");
    fs::write(&over, vec![1u8; CAP + 1]).unwrap();
    let over_fb = w.join("over_fb");
    fs::write(&over_fb, vec![1u8; CAP_FB + 1]).unwrap();

    let len = fs::metadata(&base).unwrap().len();
    let truncated = w.join("truncated.img");
    fs::write(
        &truncated,
        &fs::read(&base).unwrap()[..(len as usize - 4096)],
    )
    .unwrap();
    let corrupt = damaged(&base, &w.join("table.img"), 24_576 + 200, b"\xff");
    // The ext4 inode's mode made a directory (its checksum then fails too), the FAT entry's
    // first cluster pointed elsewhere, the EROFS inode's block address moved.
    let bad_ext4 = damaged(
        &base,
        &w.join("ext4.img"),
        at("e4", "inode_offset") + 1,
        b"\x40",
    );
    let bad_fat = damaged(
        &base,
        &w.join("fat.img"),
        at("fa", "dirent_offset") + 26,
        b"\x07",
    );
    let bad_erofs = damaged(
        &base,
        &w.join("erofs.img"),
        at("er", "inode_offset") + 16,
        b"\x77",
    );
    let before = entries(&w);
    let out = w.join("out.img");
    let o = s(&out);
    let sl = |n: &str, f: &Path| format!("{n}={}", s(f));
    let (e4s, fas, ers) = (sl("e4", &small), sl("fa", &small), sl("er", &small));
    let trunc_msg = format!(
        "image is {} bytes but its slot table describes {len}",
        len - 4096
    );
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            vec![
                "inject".into(),
                s(&base).into(),
                "--slot".into(),
                sl("e4", &over),
                "-o".into(),
                o.into(),
            ],
            vec!["65537 bytes, more than the slot's capacity of 65536"],
        ),
        (
            vec![
                "inject".into(),
                s(&base).into(),
                "--slot".into(),
                sl("fb", &over_fb),
                "-o".into(),
                o.into(),
            ],
            vec!["20001 bytes, more than the slot's capacity of 20000"],
        ),
        (
            vec![
                "inject".into(),
                s(&base).into(),
                "--slot".into(),
                sl("nope", &small),
                "-o".into(),
                o.into(),
            ],
            vec!["unknown slot \"nope\" (this image has: e4, fa, fb, er)"],
        ),
        (
            vec![
                "inject".into(),
                s(&truncated).into(),
                "--slot".into(),
                e4s.clone(),
                "-o".into(),
                o.into(),
            ],
            vec![&trunc_msg],
        ),
        (
            vec![
                "inject".into(),
                s(&corrupt).into(),
                "--slot".into(),
                e4s.clone(),
                "-o".into(),
                o.into(),
            ],
            vec!["checksum mismatch"],
        ),
        (
            vec![
                "inject".into(),
                s(&bad_ext4).into(),
                "--slot".into(),
                e4s.clone(),
                "-o".into(),
                o.into(),
            ],
            vec!["slot \"e4\" (ext4 filesystem at byte 1048576)", "inode 12"],
        ),
        (
            vec![
                "inject".into(),
                s(&bad_fat).into(),
                "--slot".into(),
                fas.clone(),
                "-o".into(),
                o.into(),
            ],
            vec![
                "slot \"fa\" (fat filesystem at byte",
                "directory entry at byte",
                "first cluster 7",
            ],
        ),
        (
            vec![
                "inject".into(),
                s(&bad_erofs).into(),
                "--slot".into(),
                ers.clone(),
                "-o".into(),
                o.into(),
            ],
            vec![
                "slot \"er\" (erofs filesystem at byte",
                "not a flat slot inode",
            ],
        ),
        (
            vec![
                "inject".into(),
                s(&bad_ext4).into(),
                "--slot".into(),
                e4s.clone(),
                "--in-place".into(),
            ],
            vec!["slot \"e4\""],
        ),
        (
            vec![
                "inject".into(),
                s(&bad_fat).into(),
                "--slot".into(),
                fas,
                "-o".into(),
                "-".into(),
            ],
            vec!["slot \"fa\""],
        ),
    ];
    let damaged_sha: Vec<String> = [&bad_ext4, &bad_fat, &bad_erofs, &corrupt]
        .iter()
        .map(|p| sha(p))
        .collect();
    for (args, want) in &cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        fails(&a, want);
        assert_eq!(entries(&w), before, "{a:?} left files behind");
    }
    assert_eq!(sha(&base), base_sha, "base modified");
    let after: Vec<String> = [&bad_ext4, &bad_fat, &bad_erofs, &corrupt]
        .iter()
        .map(|p| sha(p))
        .collect();
    assert_eq!(after, damaged_sha, "a failed injection modified its image");
}
