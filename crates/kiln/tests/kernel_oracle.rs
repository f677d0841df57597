//! The kernel as the oracle for every filesystem kiln writes: each image is mounted read-only
//! by Linux and every entry it shows is compared with the source (bytes, size, mode with
//! setuid/setgid/sticky, owner, xattrs, symlink target, device numbers, mtime, hardlinks), as
//! far as the filesystem can represent them.
//!
//! - ext4 and EROFS (every compression mode, several levels and physical cluster sizes) on the
//!   generated corpus plus a corpus of files sized at every boundary a writer decides on, with
//!   incompressible, compressible and mixed content;
//! - FAT and ISO 9660 (Rock Ridge), and EROFS again, through the Debian 6.1 kernel in a guest;
//! - a seeded random search over file sizes and contents (`KILN_ORACLE_SEED` replays a run);
//! - a real Debian tree (scripts/debian-tree), against GNU tar's extraction of the same tar.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kiln_testkit::oracle::{self, Fs, Manifest};
use kiln_testkit::{
    boundary_corpus, generate_corpus, run_ok, scratch_dir, shaped_bytes, CorpusOptions, SHAPES,
};

fn kiln(args: &[&str]) {
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .env_remove("SOURCE_DATE_EPOCH"),
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The EROFS variants every corpus goes through: (label, extra `kiln mkfs erofs` arguments).
const EROFS_MODES: &[(&str, &[&str])] = &[
    ("none", &["-z", "none"]),
    ("lz4-pc1", &["-z", "lz4", "--pcluster-blocks", "1"]),
    ("lz4-pc4", &["-z", "lz4", "--pcluster-blocks", "4"]),
    ("lz4-pc16", &["-z", "lz4"]),
    ("lz4-pc256", &["-z", "lz4", "--pcluster-blocks", "256"]),
    (
        "lz4hc-l1-pc2",
        &["-z", "lz4hc", "--level", "1", "--pcluster-blocks", "2"],
    ),
    ("lz4hc-l5", &["-z", "lz4hc"]),
    (
        "lz4hc-l9-pc64",
        &["-z", "lz4hc", "--level", "9", "--pcluster-blocks", "64"],
    ),
    ("lz4hc-l12-pc16", &["-z", "lz4hc", "--level", "12"]),
];

/// The generated corpus (every entry kind, xattrs, links, devices, odd names and times) plus
/// the boundary corpus, made once for this test binary, and its manifest.
fn corpus() -> &'static (PathBuf, Manifest) {
    static C: OnceLock<(PathBuf, Manifest)> = OnceLock::new();
    C.get_or_init(|| {
        let dir = scratch_dir("kiln-oracle-corpus").keep();
        let root = dir.join("src");
        fs::create_dir(&root).unwrap();
        generate_corpus(
            &root,
            CorpusOptions {
                huge_dir: false,
                huge_sparse: false,
            },
        );
        boundary_corpus(&root, "boundaries", true);
        // generate_corpus sets the root's time last; the new directory changed it again.
        kiln_testkit::set_times(&root, 1_600_000_000, 123_456_789);
        let m = oracle::scan(&root);
        (root, m)
    })
}

fn require_host(fs: Fs) {
    assert!(
        oracle::host_can_mount(fs) || !ci(),
        "the kernel oracle needs root and a host kernel with {fs:?} (CI has both)"
    );
}

/// In CI (scripts/test sets KILN_REQUIRE_DEBIAN_TREES) a missing oracle is a failure.
fn ci() -> bool {
    std::env::var_os("KILN_REQUIRE_DEBIAN_TREES").is_some_and(|v| v == "1")
}

#[test]
fn ext4_reads_back_exactly() {
    require_host(Fs::Ext4);
    let (src, want) = corpus();
    let out = tempfile::tempdir().unwrap();
    let img = out.path().join("ext4.img");
    kiln(&["mkfs", "ext4", s(src), "-o", s(&img)]);
    let got = oracle::kernel_read(&img, Fs::Ext4);
    oracle::assert_same("ext4", want, &got, Fs::Ext4);
    // The stable layout: hashed inode numbers (free ones between), data placed by path.
    kiln(&[
        "mkfs",
        "ext4",
        "--size",
        "1G",
        "--layout",
        "stable",
        s(src),
        "-o",
        s(&img),
    ]);
    let got = oracle::kernel_read(&img, Fs::Ext4);
    oracle::assert_same("ext4 stable", want, &got, Fs::Ext4);
}

#[test]
fn erofs_reads_back_exactly_in_every_mode() {
    require_host(Fs::Erofs);
    let (src, want) = corpus();
    let out = tempfile::tempdir().unwrap();
    for (label, args) in EROFS_MODES {
        let img = out.path().join(format!("{label}.img"));
        let mut a = vec!["mkfs", "erofs", s(src), "-o", s(&img)];
        a.extend_from_slice(args);
        kiln(&a);
        let got = oracle::kernel_read(&img, Fs::Erofs);
        oracle::assert_same(&format!("erofs {label}"), want, &got, Fs::Erofs);
        fs::remove_file(&img).unwrap();
    }
}

/// FAT and ISO 9660 through the Debian kernel in a guest (the host kernel here has neither),
/// with EROFS (lz4, lz4hc, uncompressed) in the same boot: the 6.1 kernel is the one kiln's
/// images run.
#[test]
fn guest_kernel_reads_fat_iso_and_erofs() {
    let t = scratch_dir("kiln-oracle-guest");
    // FAT keeps regular files and directories only; the boundary corpus without 16 MiB files
    // keeps the guest's hashing short.
    let plain = t.path().join("plain");
    boundary_corpus(&plain, "boundaries", false);
    fs::create_dir_all(plain.join("a/deeper/dir")).unwrap();
    fs::write(plain.join("a/deeper/dir/Mixed Case Name.html"), b"<p>x</p>").unwrap();
    fs::write(plain.join("a/lower.txt"), b"8.3 in lower case").unwrap();
    let plain_m = oracle::scan(&plain);
    // ISO and EROFS also get the corpus with every entry kind.
    let rich = t.path().join("rich");
    fs::create_dir(&rich).unwrap();
    generate_corpus(
        &rich,
        CorpusOptions {
            huge_dir: false,
            huge_sparse: false,
        },
    );
    boundary_corpus(&rich, "boundaries", false);
    kiln_testkit::set_times(&rich, 1_600_000_000, 0);
    let rich_m = oracle::scan(&rich);

    let fat = t.path().join("fat.img");
    kiln(&["mkfs", "vfat", s(&plain), "-o", s(&fat)]);
    let iso = t.path().join("rr.iso");
    kiln(&["mkfs", "iso9660", s(&rich), "-o", s(&iso)]);
    let lz4 = t.path().join("lz4.img");
    kiln(&[
        "mkfs",
        "erofs",
        "-z",
        "lz4",
        "--pcluster-blocks",
        "4",
        s(&rich),
        "-o",
        s(&lz4),
    ]);
    let lz4hc = t.path().join("lz4hc.img");
    kiln(&["mkfs", "erofs", "-z", "lz4hc", s(&rich), "-o", s(&lz4hc)]);
    let plain_erofs = t.path().join("none.img");
    kiln(&["mkfs", "erofs", s(&rich), "-o", s(&plain_erofs)]);

    let got = oracle::guest_read(&[
        (&fat, Fs::Vfat),
        (&iso, Fs::Iso9660),
        (&lz4, Fs::Erofs),
        (&lz4hc, Fs::Erofs),
        (&plain_erofs, Fs::Erofs),
    ]);
    oracle::assert_same("vfat (6.1)", &plain_m, &got[0], Fs::Vfat);
    // Rock Ridge names of 255 bytes show truncated by isofs (see oracle::expected); the rest
    // of the corpus must match.
    oracle::assert_same("iso9660 (6.1)", &rich_m, &got[1], Fs::Iso9660);
    // The guest has no xattr tool: diff compares xattrs only where both sides have them.
    oracle::assert_same("erofs lz4 (6.1)", &rich_m, &got[2], Fs::Erofs);
    oracle::assert_same("erofs lz4hc (6.1)", &rich_m, &got[3], Fs::Erofs);
    oracle::assert_same("erofs uncompressed (6.1)", &rich_m, &got[4], Fs::Erofs);
}

/// A seeded random search: each case draws files whose sizes cluster around the boundaries
/// and whose content mixes shapes at random offsets, writes them with a random EROFS mode,
/// level and physical cluster size (and ext4), and compares through the kernel. Bounded in
/// cases and time; the seed is printed, and `KILN_ORACLE_SEED` replays it.
#[test]
fn random_files_read_back_exactly() {
    require_host(Fs::Erofs);
    let seed: u64 = std::env::var("KILN_ORACLE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x6b69_6c6e);
    eprintln!("random_files_read_back_exactly: seed {seed}");
    let mut rng = Rng(seed | 1);
    let started = Instant::now();
    let budget = Duration::from_secs(150);
    let mut cases = 0;
    let mut files = 0;
    while cases < 40 && started.elapsed() < budget {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir(&src).unwrap();
        let n = 20 + rng.below(40);
        for i in 0..n {
            let size = rng.size();
            let mut data = Vec::with_capacity(size);
            while data.len() < size {
                let piece = (1 + rng.below(3 * 4096) as usize).min(size - data.len());
                let shape = SHAPES[rng.below(SHAPES.len() as u64) as usize];
                data.extend(shaped_bytes(shape, rng.next(), piece));
            }
            fs::write(src.join(format!("f{i:03}")), &data).unwrap();
        }
        files += n;
        let m = oracle::scan(&src);
        let (z, extra): (&str, Vec<String>) = match rng.below(3) {
            0 => ("none", vec![]),
            1 => ("lz4", vec![]),
            _ => (
                "lz4hc",
                vec!["--level".into(), (1 + rng.below(12)).to_string()],
            ),
        };
        let pc = [1u64, 2, 3, 4, 8, 16, 32, 64, 256][rng.below(9) as usize].to_string();
        let img = t.path().join("e.img");
        let mut a = vec![
            "mkfs",
            "erofs",
            "-z",
            z,
            "--pcluster-blocks",
            &pc,
            s(&src),
            "-o",
            s(&img),
        ];
        a.extend(extra.iter().map(String::as_str));
        kiln(&a);
        let what =
            format!("case {cases} (seed {seed}): erofs -z {z} {extra:?} --pcluster-blocks {pc}");
        oracle::assert_same(&what, &m, &oracle::kernel_read(&img, Fs::Erofs), Fs::Erofs);
        if cases % 4 == 0 {
            let e4 = t.path().join("e4.img");
            kiln(&["mkfs", "ext4", s(&src), "-o", s(&e4)]);
            oracle::assert_same(
                &format!("case {cases}: ext4"),
                &m,
                &oracle::kernel_read(&e4, Fs::Ext4),
                Fs::Ext4,
            );
        }
        cases += 1;
    }
    eprintln!("random_files_read_back_exactly: {cases} cases, {files} files");
    assert!(cases >= 5, "only {cases} cases ran in the time budget");
}

/// xorshift64*: enough for drawing test shapes, reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Mostly near a boundary (a multiple of 4 KiB, 64 KiB or 1 MiB, plus or minus a little),
    /// sometimes anywhere up to 3 MiB.
    fn size(&mut self) -> usize {
        let base: u64 = match self.below(4) {
            0 => 4096 * self.below(40),
            1 => 65536 * self.below(20),
            2 => (1 << 20) * self.below(3),
            _ => return self.below(3 << 20) as usize,
        };
        let delta = self.below(2 * 4097) as i64 - 4097;
        base.saturating_add_signed(delta) as usize
    }
}

/// A Debian bookworm tree (linux-image-amd64, systemd) as the kernel reads it from kiln's
/// ext4 and EROFS images, against GNU tar's own extraction of the same tar.
#[test]
fn debian_tree_reads_back_exactly() {
    let Some(tar) = kiln_testkit::debian_tree("bookworm-generic") else {
        return;
    };
    require_host(Fs::Erofs);
    let t = tempfile::tempdir().unwrap();
    let reference = t.path().join("ref");
    fs::create_dir(&reference).unwrap();
    run_ok(
        Command::new("tar")
            .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf"])
            .arg(&tar)
            .arg("-C")
            .arg(&reference),
    );
    let want = oracle::scan(&reference);
    assert!(
        want.files() > 5000,
        "{} files in the Debian tree",
        want.files()
    );
    fs::remove_dir_all(&reference).unwrap();
    for (label, args) in [
        ("ext4", &["mkfs", "ext4"][..]),
        (
            "ext4 stable",
            &["mkfs", "ext4", "--size", "2G", "--layout", "stable"][..],
        ),
        ("erofs lz4", &["mkfs", "erofs", "-z", "lz4"][..]),
        ("erofs lz4hc", &["mkfs", "erofs", "-z", "lz4hc"][..]),
        (
            "erofs lz4 pc4",
            &["mkfs", "erofs", "-z", "lz4", "--pcluster-blocks", "4"][..],
        ),
    ] {
        let img = t.path().join("img");
        let mut a = args.to_vec();
        a.extend_from_slice(&[s(&tar), "-o", s(&img)]);
        kiln(&a);
        let fs_kind = if label.starts_with("ext4") {
            Fs::Ext4
        } else {
            Fs::Erofs
        };
        let got = oracle::kernel_read(&img, fs_kind);
        oracle::assert_same(&format!("Debian bookworm, {label}"), &want, &got, fs_kind);
        fs::remove_file(&img).unwrap();
    }
}
