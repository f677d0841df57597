//! Broken and hostile inputs against the CLI: each test reproduces one defect of the input
//! audit (the number in its comment) and asserts the clean outcome: a non-zero exit with an
//! error naming the input, no output under the final name, no temp file left, the base image
//! unchanged, bounded memory.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{entries, kiln, kiln_bin, ok, s, sha};

/// Asserts that `o` failed and its stderr mentions every one of `want`.
fn failed_with(o: &Output, want: &[&str]) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "should fail; stderr: {err}");
    for w in want {
        assert!(err.contains(w), "{err:?} does not mention {w:?}");
    }
    assert!(!err.contains("panicked"), "a panic is not an error message: {err}");
    err
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name)
}

/// A sorted plain tar of `dir` at `to`.
fn tar_of(dir: &Path, to: &Path) {
    kiln_testkit::run_ok(
        Command::new("tar")
            .arg("--sort=name")
            .arg("--owner=0")
            .arg("--group=0")
            .arg("-cf")
            .arg(to)
            .arg("-C")
            .arg(dir)
            .arg("."),
    );
}

/// `tool -c ARGS < from > to`.
fn compress(tool: &str, args: &[&str], from: &Path, to: &Path) {
    let out = Command::new(tool)
        .args(args)
        .arg("-c")
        .stdin(fs::File::open(from).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{tool}: {}", String::from_utf8_lossy(&out.stderr));
    fs::write(to, out.stdout).unwrap();
}

// 1. `kiln build --source X.tar.gz|.zst|.xz` (and compressed stdin) failed with "unknown
// placed data": the spooled stream's indexes reached the ext4 planner as its own.
#[test]
fn build_from_compressed_tars_and_stdin_gives_the_plain_tar_image() {
    let d = tempfile::tempdir().unwrap();
    let tar = d.path().join("root.tar");
    tar_of(&example("hello-rootfs"), &tar);
    let spec = example("hello");
    let build = |source: &Path, stdin: Option<&Path>, out: &str| -> String {
        let mut c = Command::new(kiln_bin());
        c.args(["build", s(&spec), "-o", s(&d.path().join(out)), "-q", "--source"]);
        match stdin {
            Some(f) => {
                c.arg("-").stdin(fs::File::open(f).unwrap());
            }
            None => {
                c.arg(source);
            }
        }
        let o = c.output().unwrap();
        assert!(
            o.status.success(),
            "build from {}: {}",
            source.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        sha(&d.path().join(out).join("hello_1.0.img"))
    };
    let plain = build(&tar, None, "plain");
    for (tool, ext) in [("gzip", "gz"), ("zstd", "zst"), ("xz", "xz")] {
        let z = d.path().join(format!("root.tar.{ext}"));
        compress(tool, &[], &tar, &z);
        assert_eq!(build(&z, None, ext), plain, "--source root.tar.{ext}");
        assert_eq!(
            build(&z, Some(&z), &format!("{ext}-stdin")),
            plain,
            "--source - < root.tar.{ext}"
        );
    }
}

/// A tar holding one incompressible file, gzip-compressed with stored (level 0) blocks, so a
/// flipped byte changes the data without breaking the deflate framing: only the CRC can tell.
fn stored_gzip_tar(dir: &Path) -> (Vec<u8>, usize) {
    let src = dir.join("src");
    fs::create_dir_all(&src).unwrap();
    let payload = kiln_testkit::pseudo_random(7, 64 << 10);
    fs::write(src.join("blob"), &payload).unwrap();
    let tar = dir.join("plain.tar");
    tar_of(&src, &tar);
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
    e.write_all(&fs::read(&tar).unwrap()).unwrap();
    let gz = e.finish().unwrap();
    // The blob's bytes appear verbatim in the stored blocks.
    let at = gz
        .windows(64)
        .position(|w| w == &payload[4096..4160])
        .expect("stored deflate keeps the bytes");
    (gz, at)
}

// 2. A corrupt compressed tar was accepted: reading stopped at the tar end marker, so the
// gzip CRC/ISIZE and the zstd checksum were never checked, and trailing garbage passed.
#[test]
fn corrupt_or_trailing_compressed_streams_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let (gz, at) = stored_gzip_tar(d.path());
    let out = d.path().join("out");
    fs::create_dir_all(&out).unwrap();
    let mkfs = |input: &Path| {
        kiln(&["mkfs", "ext4", s(input), "-o", s(&out.join("x.img"))])
    };
    // The intact stream works.
    let good = d.path().join("good.tar.gz");
    fs::write(&good, &gz).unwrap();
    ok(&["mkfs", "ext4", s(&good), "-o", s(&out.join("x.img"))]);
    fs::remove_file(out.join("x.img")).unwrap();

    let mut flipped = gz.clone();
    flipped[at + 10] ^= 0x01;
    let f = d.path().join("flipped.tar.gz");
    fs::write(&f, &flipped).unwrap();
    failed_with(&mkfs(&f), &["flipped.tar.gz", "gzip"]);

    let mut trailing = gz.clone();
    trailing.extend_from_slice(b"trailing garbage after the member");
    let t = d.path().join("trailing.tar.gz");
    fs::write(&t, &trailing).unwrap();
    failed_with(&mkfs(&t), &["trailing.tar.gz", "gzip"]);

    // zstd with a content checksum over raw (incompressible) blocks: a flipped byte is caught
    // only by the checksum at the end of the frame.
    let mut z = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
    z.include_checksum(true).unwrap();
    z.write_all(&fs::read(d.path().join("plain.tar")).unwrap())
        .unwrap();
    let mut zs = z.finish().unwrap();
    let payload = kiln_testkit::pseudo_random(7, 64 << 10);
    let zat = zs
        .windows(64)
        .position(|w| w == &payload[4096..4160])
        .expect("raw zstd block keeps the bytes");
    zs[zat + 10] ^= 0x01;
    let zf = d.path().join("flipped.tar.zst");
    fs::write(&zf, &zs).unwrap();
    failed_with(&mkfs(&zf), &["flipped.tar.zst", "zstd"]);
    assert_eq!(entries(&out), Vec::<String>::new(), "no output, no temp file");
}
