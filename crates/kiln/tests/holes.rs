//! Holes from zeroes (issue 18, item 2): all-zero 4 KiB blocks of file data become holes by
//! default, whatever the source, and `--keep-zeroes` writes them as data.
//!
//! One tree with a 1 GiB file of zeroes, a file mixing data and written zero blocks, a
//! SEEK_HOLE-sparse file with unaligned data runs, small zero files and a dense one. From the
//! directory, a GNU sparse tar (`tar -S`), a plain tar and the plain tar as a zstd stream on
//! stdin, `kiln mkfs` must give byte-identical ext4 and EROFS (plain and lz4) images; e2fsck
//! and fsck.erofs pass; the kernel reads the tree back equal, and `stat` says the zero file
//! has no blocks allocated.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};

use kiln_testkit::oracle::{self, Fs};
use kiln_testkit::{pseudo_random, require_tool, run, run_ok, set_times};

const GIB: u64 = 1 << 30;

fn kiln() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.env_remove("SOURCE_DATE_EPOCH");
    c
}

fn sha256(p: &Path) -> String {
    let o = run_ok(Command::new("sha256sum").arg(p));
    String::from_utf8_lossy(&o.stdout)[..64].to_string()
}

/// The tree. Every file's bytes are written for real (the tar must store them) except where
/// a hole is the point.
fn fixture(root: &Path) {
    fs::create_dir_all(root.join("data")).unwrap();
    // 1 GiB of zeroes: sparse on disk (set_len), stored dense by a plain tar.
    let f = fs::File::create(root.join("data/zero-1g")).unwrap();
    f.set_len(GIB).unwrap();
    // Data, two written zero blocks, data, a zero block, and an unaligned tail of data.
    let mut mixed = pseudo_random(1, 4096 * 3);
    mixed.extend(vec![0u8; 8192]);
    mixed.extend(pseudo_random(2, 5000));
    mixed.extend(vec![0u8; 4096 + 2192]);
    mixed.extend(pseudo_random(3, 777));
    fs::write(root.join("data/mixed"), &mixed).unwrap();
    // A sparse file whose data runs start and end inside blocks, with a written zero block.
    let f = fs::File::create(root.join("data/sparse")).unwrap();
    f.set_len(10 << 20).unwrap();
    f.write_all_at(&pseudo_random(4, 3000), 100).unwrap();
    f.write_all_at(&vec![0u8; 4096 * 2], 1 << 20).unwrap();
    f.write_all_at(&pseudo_random(5, 9000), (2 << 20) + 4000)
        .unwrap();
    f.write_all_at(b"end", (10 << 20) - 3).unwrap();
    // Zero files of under a block and of two blocks, a dense file, an empty one.
    fs::write(root.join("data/zero-small"), vec![0u8; 1000]).unwrap();
    fs::write(root.join("data/zero-8k"), vec![0u8; 8192]).unwrap();
    fs::write(root.join("dense"), pseudo_random(6, 70_000)).unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    for p in [
        "data/zero-1g",
        "data/mixed",
        "data/sparse",
        "data/zero-small",
        "data/zero-8k",
        "dense",
        "empty",
        "data",
        ".",
    ] {
        set_times(&root.join(p), 1_700_000_000, 0);
    }
}

fn tar(src: &Path, out: &Path, sparse: bool) {
    let mut c = Command::new("tar");
    if sparse {
        c.arg("--sparse");
    }
    run_ok(
        c.args([
            "--sort=name",
            "--format=gnu",
            "--owner=0",
            "--group=0",
            "-C",
        ])
        .arg(src)
        .arg("-cf")
        .arg(out)
        .arg("."),
    );
}

/// `kiln mkfs FS` of `source` (a path, or `-` with `stdin` piped in) to `out`.
fn mkfs(fs_args: &[&str], source: &str, stdin: Option<&Path>, out: &Path, extra: &[&str]) {
    let mut c = kiln();
    c.arg("mkfs")
        .args(fs_args)
        .arg(source)
        .arg("-o")
        .arg(out)
        .args(extra)
        .arg("--all-root")
        .arg("-q");
    let o = match stdin {
        Some(zst) => {
            let mut z = Command::new("zstd")
                .args(["-1", "-q", "-c", "-T0"])
                .arg(zst)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let o = c.stdin(z.stdout.take().unwrap()).output().unwrap();
            assert!(z.wait().unwrap().success(), "zstd -c {}", zst.display());
            o
        }
        None => c.output().unwrap(),
    };
    assert!(
        o.status.success(),
        "kiln mkfs {fs_args:?} {source}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// 512-byte blocks the kernel says a file of the mounted image holds.
fn blocks_in(img: &Path, fs: Fs, path: &str) -> u64 {
    oracle::with_host_mount(img, fs, |mnt| {
        let o = run_ok(Command::new("stat").args(["-c", "%b"]).arg(mnt.join(path)));
        String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
    })
}

#[test]
fn zero_blocks_become_holes_from_every_source() {
    let d = tempfile::Builder::new()
        .prefix("kiln-holes-")
        .tempdir()
        .unwrap();
    let src = d.path().join("src");
    fixture(&src);
    let (sparse_tar, dense_tar) = (d.path().join("sparse.tar"), d.path().join("dense.tar"));
    tar(&src, &sparse_tar, true);
    tar(&src, &dense_tar, false);
    assert!(
        fs::metadata(&dense_tar).unwrap().len() > GIB,
        "the plain tar stores the zeroes"
    );
    require_tool("zstd");

    let kinds: [(&str, Fs, &[&str]); 3] = [
        ("ext4", Fs::Ext4, &["ext4"]),
        ("erofs", Fs::Erofs, &["erofs"]),
        ("erofs-lz4", Fs::Erofs, &["erofs", "-z", "lz4"]),
    ];
    let want = oracle::scan(&src);
    for (name, fs_kind, args) in kinds {
        let t = std::time::Instant::now();
        let img = |what: &str| d.path().join(format!("{name}-{what}.img"));
        let sources: [(&str, String, Option<&Path>); 4] = [
            ("dir", src.display().to_string(), None),
            ("sparse-tar", sparse_tar.display().to_string(), None),
            ("dense-tar", dense_tar.display().to_string(), None),
            ("dense-tar-zstd-stdin", "-".into(), Some(&dense_tar)),
        ];
        let mut sums = Vec::new();
        for (what, s, stdin) in &sources {
            mkfs(args, s, *stdin, &img(what), &[]);
            sums.push((what.to_string(), sha256(&img(what))));
        }
        assert!(
            sums.iter().all(|(_, s)| *s == sums[0].1),
            "{name}: the same tree from every source must give the same image: {sums:#?}"
        );
        let one = img("dense-tar");
        let size = fs::metadata(&one).unwrap().len();
        assert!(
            size < 8 << 20,
            "{name}: a 1 GiB zero file made a {size}-byte image"
        );
        match fs_kind {
            Fs::Ext4 => {
                let o = run(Command::new(require_tool("e2fsck")).arg("-fn").arg(&one));
                assert!(
                    o.status.success(),
                    "e2fsck -fn: {}",
                    String::from_utf8_lossy(&o.stdout)
                );
            }
            _ => {
                let o = run(Command::new(require_tool("fsck.erofs")).arg(&one));
                assert!(
                    o.status.success(),
                    "fsck.erofs: {}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
            }
        }
        // The kernel: the same tree, and no blocks behind the zeroes.
        oracle::check_on_host(name, &want, &one, fs_kind);
        // ext4 counts allocated blocks in i_blocks; EROFS reports blocks from the file size
        // for uncompressed layouts, so there the image size above is the measure.
        if fs_kind == Fs::Ext4 && oracle::host_can_mount(fs_kind) {
            assert_eq!(blocks_in(&one, fs_kind, "data/zero-1g"), 0);
            assert_eq!(blocks_in(&one, fs_kind, "data/zero-8k"), 0);
            // mixed: blocks 3 and 4 of its 8 are zero: 6 blocks of 8 sectors.
            assert_eq!(blocks_in(&one, fs_kind, "data/mixed"), 6 * 8);
        }
        eprintln!(
            "{name}: 4 sources, identical, checked in {:.1?}",
            t.elapsed()
        );
    }

    // --keep-zeroes writes the zeroes of a plain tar as data.
    let kept = d.path().join("kept.ext4");
    mkfs(
        &["ext4"],
        &dense_tar.display().to_string(),
        None,
        &kept,
        &["--keep-zeroes"],
    );
    let o = run(Command::new(require_tool("e2fsck")).arg("-fn").arg(&kept));
    assert!(o.status.success(), "e2fsck -fn of the --keep-zeroes image");
    if oracle::host_can_mount(Fs::Ext4) {
        assert!(
            blocks_in(&kept, Fs::Ext4, "data/zero-1g") >= GIB / 512,
            "--keep-zeroes: the zero file must be allocated"
        );
    }
    let kept_erofs = d.path().join("kept.erofs");
    mkfs(
        &["erofs"],
        &dense_tar.display().to_string(),
        None,
        &kept_erofs,
        &["--keep-zeroes"],
    );
    assert!(fs::metadata(&kept_erofs).unwrap().len() > GIB);
}
