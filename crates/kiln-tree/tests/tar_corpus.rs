//! Round trips through the reference tar writers: the testkit corpus is archived by GNU tar
//! (and bsdtar for libarchive's xattr keywords) in every format, read back indexed and
//! streamed, and compared with the directory reader's view of the same corpus.
//!
//! Differences the formats force, and only those, are allowed: gnu and ustar store whole-second
//! mtimes and no xattrs; archives made without `--sparse` store sparse files dense. atime and
//! ctime are never compared (kiln's tree has no such fields).
#![allow(clippy::unwrap_used)]

mod common;

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::{assert_same_tree, Bytes, Expect, Recorder};
use kiln_formats::fstree::{HostContents, Tree};
use kiln_testkit::{generate_corpus, require_tool, run_ok, CorpusOptions};
use kiln_tree::tar::{self, Compression, TarStream};
use kiln_tree::{dir::read_dir_tree, Opened};

struct Corpus {
    _dir: tempfile::TempDir,
    root: PathBuf,
    tree: Tree,
}

/// The small corpus (no 100k directory) with the 5 GiB sparse file, made once per run.
fn corpus() -> &'static Corpus {
    static C: OnceLock<Corpus> = OnceLock::new();
    C.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("corpus");
        fs::create_dir(&root).unwrap();
        generate_corpus(
            &root,
            CorpusOptions {
                huge_dir: false,
                huge_sparse: true,
            },
        );
        let tree = read_dir_tree(&root).unwrap();
        Corpus {
            _dir: dir,
            root,
            tree,
        }
    })
}

/// The corpus tree without the 5 GiB file (for archives made without `--sparse`, which would
/// store 5 GiB of zeroes).
fn without_five_gib(t: &Tree) -> Tree {
    let mut t = t.clone();
    let d = t.resolve(b"/sparse").unwrap();
    t.unlink(d, b"five-gib").unwrap();
    t
}

const NO_FIVE_GIB: &str = "--exclude=./sparse/five-gib";

fn gnu_tar(src: &Path, out: &Path, args: &[&str]) {
    let mut c = Command::new(require_tool("tar"));
    c.arg("-C").arg(src).arg("-cf").arg(out).args(args).arg(".");
    run_ok(&mut c);
}

/// Reads `path` every way kiln can and compares each result with `want`.
fn check(path: &Path, want: &Tree, ex: Expect) {
    check_n(path, want, ex, 60)
}

fn check_n(path: &Path, want: &Tree, ex: Expect, min_paths: usize) {
    let want_bytes = Bytes::Contents(&HostContents);
    let mut compared = 0;
    match kiln_tree::tar::open_file(path).unwrap() {
        Opened::Indexed(t, c) => {
            compared = assert_same_tree(want, &want_bytes, &t, &Bytes::Contents(&c), ex);
            // Reads that span holes and runs of a sparse file, through the indexed contents.
            if let Some(id) = t.resolve(b"/sparse/holes") {
                let kiln_formats::fstree::NodeKind::File(f) = &t.node(id).kind else {
                    panic!("sparse/holes is not a file")
                };
                let host = fs::read(corpus().root.join("sparse/holes")).unwrap();
                let mut buf = vec![1u8; host.len()];
                kiln_formats::fstree::Contents::read_at(&c, f, 0, &mut buf).unwrap();
                assert!(buf == host, "logical read of sparse/holes differs");
            }
        }
        Opened::Stream(s) => {
            assert_ne!(s.compression(), Compression::None);
            let mut rec = Recorder::default();
            let t = s.read(&mut rec).unwrap();
            assert!(rec.discarded.is_empty());
            compared = compared.max(assert_same_tree(
                want,
                &want_bytes,
                &t,
                &Bytes::Placed(&rec),
                ex,
            ));
        }
    }
    // Every archive also streams (a plain one as if it came from a pipe).
    let s = TarStream::from_reader(File::open(path).unwrap(), "test").unwrap();
    let mut rec = Recorder::default();
    let t = s.read(&mut rec).unwrap();
    let n = assert_same_tree(want, &want_bytes, &t, &Bytes::Placed(&rec), ex);
    assert_eq!(n, compared);
    assert!(n > min_paths, "only {n} paths compared");
}

const DENSE: Expect = Expect {
    nanos: false,
    xattrs: false,
    sparse: false,
    libarchive_times: false,
};

#[test]
fn gnu_format() {
    let c = corpus();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("gnu.tar");
    gnu_tar(&c.root, &out, &["--format=gnu", NO_FIVE_GIB]);
    check(&out, &without_five_gib(&c.tree), DENSE);
}

#[test]
fn gnu_format_sparse_old_gnu_maps() {
    let c = corpus();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("gnu-sparse.tar");
    gnu_tar(&c.root, &out, &["--format=gnu", "--sparse"]);
    check(
        &out,
        &c.tree,
        Expect {
            sparse: true,
            ..DENSE
        },
    );
}

const PAX: Expect = Expect {
    nanos: true,
    xattrs: true,
    sparse: true,
    libarchive_times: false,
};

#[test]
fn posix_format_with_xattrs() {
    let c = corpus();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("posix.tar");
    gnu_tar(
        &c.root,
        &out,
        &[
            "--format=posix",
            "--xattrs",
            "--xattrs-include=*",
            NO_FIVE_GIB,
        ],
    );
    check(
        &out,
        &without_five_gib(&c.tree),
        Expect {
            sparse: false,
            ..PAX
        },
    );
}

#[test]
fn posix_format_sparse_versions() {
    let c = corpus();
    let d = tempfile::tempdir().unwrap();
    for v in ["0.0", "0.1", "1.0"] {
        let out = d.path().join(format!("posix-sparse-{v}.tar"));
        gnu_tar(
            &c.root,
            &out,
            &[
                "--format=posix",
                "--xattrs",
                "--xattrs-include=*",
                "--sparse",
                &format!("--sparse-version={v}"),
            ],
        );
        check(&out, &c.tree, PAX);
    }
}

#[test]
fn compressed_gzip_xz_zstd_stream() {
    let c = corpus();
    let d = tempfile::tempdir().unwrap();
    for (flag, want) in [
        ("--gzip", Compression::Gzip),
        ("--xz", Compression::Xz),
        ("--zstd", Compression::Zstd),
    ] {
        let out = d.path().join(format!("c{flag}.tar.x"));
        gnu_tar(
            &c.root,
            &out,
            &[
                "--format=posix",
                "--xattrs",
                "--xattrs-include=*",
                "--sparse",
                flag,
            ],
        );
        let s = TarStream::from_reader(File::open(&out).unwrap(), "t").unwrap();
        assert_eq!(s.compression(), want);
        check(&out, &c.tree, PAX);
    }
}

#[test]
fn multi_member_gzip() {
    let c = corpus();
    let d = tempfile::tempdir().unwrap();
    let plain = d.path().join("p.tar");
    gnu_tar(
        &c.root,
        &plain,
        &[
            "--format=posix",
            "--xattrs",
            "--xattrs-include=*",
            "--sparse",
        ],
    );
    let bytes = fs::read(&plain).unwrap();
    // Split at an odd place (not a block boundary) into three gzip members.
    let cuts = [
        0,
        bytes.len() / 3 + 17,
        2 * bytes.len() / 3 + 101,
        bytes.len(),
    ];
    let out = d.path().join("multi.tar.gz");
    let mut f = File::create(&out).unwrap();
    for w in cuts.windows(2) {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&bytes[w[0]..w[1]]).unwrap();
        f.write_all(&e.finish().unwrap()).unwrap();
    }
    drop(f);
    check(&out, &c.tree, PAX);
}

#[test]
fn ustar_format() {
    // ustar cannot hold 255-byte names, long symlink targets, ids over 2^21 or times before
    // 1970: archive the parts of the corpus it can, with times moved after the epoch.
    let c = corpus();
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    fs::create_dir(&src).unwrap();
    for part in [
        "files",
        "hard",
        "special",
        "modes",
        "deep",
        "empty-dir",
        "links",
    ] {
        run_ok(
            Command::new("cp")
                .arg("-a")
                .arg(c.root.join(part))
                .arg(&src),
        );
    }
    fs::remove_file(src.join("files").join("n".repeat(255))).unwrap();
    fs::remove_file(src.join("links/slow")).unwrap();
    let _ = fs::remove_file(src.join("modes/big-ids"));
    run_ok(Command::new("find").arg(&src).args([
        "-exec",
        "touch",
        "-h",
        "-d",
        "@1600000000",
        "{}",
        "+",
    ]));
    let want = read_dir_tree(&src).unwrap();
    let out = d.path().join("ustar.tar");
    gnu_tar(&src, &out, &["--format=ustar"]);
    let head = fs::read(&out).unwrap();
    assert_eq!(&head[257..265], b"ustar\x0000", "a POSIX ustar archive");
    check_n(&out, &want, DENSE, 40);
}

#[test]
fn bsdtar_pax_libarchive_xattrs() {
    let c = corpus();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("bsd.tar");
    run_ok(
        Command::new(require_tool("bsdtar"))
            .arg("-C")
            .arg(&c.root)
            .args(["--format=pax", "--xattrs", "-cf"])
            .arg(&out)
            .args(["--exclude", "./sparse/five-gib", "."]),
    );
    let bytes = fs::read(&out).unwrap();
    let needle = b"LIBARCHIVE.xattr.user.large=";
    assert!(
        bytes.windows(needle.len()).any(|w| w == needle),
        "bsdtar wrote LIBARCHIVE.xattr records"
    );
    // bsdtar writes both SCHILY.xattr and LIBARCHIVE.xattr records; remove the SCHILY ones
    // (keeping every record length intact) so the libarchive decoding is what is tested.
    let mut patched = bytes.clone();
    let schily = b" SCHILY.xattr.";
    let mut i = 0;
    let mut n = 0;
    while let Some(p) = patched[i..].windows(schily.len()).position(|w| w == schily) {
        let at = i + p + 1;
        patched[at..at + 6].copy_from_slice(b"IGNORE");
        i = at;
        n += 1;
    }
    assert!(n > 10, "renamed {n} SCHILY.xattr records");
    let patched_path = d.path().join("bsd-libarchive-only.tar");
    fs::write(&patched_path, patched).unwrap();
    let want = without_five_gib(&c.tree);
    // bsdtar stores sparse files with GNU.sparse 1.0 maps by default.
    let ex = Expect {
        libarchive_times: true,
        ..PAX
    };
    check(&out, &want, ex);
    check(&patched_path, &want, ex);
}

#[test]
fn hundred_thousand_entry_directory_in_readdir_order() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("corpus");
    fs::create_dir(&root).unwrap();
    generate_corpus(
        &root,
        CorpusOptions {
            huge_dir: true,
            huge_sparse: false,
        },
    );
    let want = read_dir_tree(&root).unwrap();
    let out = d.path().join("big.tar");
    // No --sort: GNU tar emits readdir (hash) order, the worst case for insertion.
    gnu_tar(&root, &out, &["--format=gnu", "--sparse"]);
    let ex = Expect {
        sparse: true,
        ..DENSE
    };
    let Opened::Indexed(t, contents) = tar::open_file(&out).unwrap() else {
        panic!("a plain tar file is indexed")
    };
    let n = assert_same_tree(
        &want,
        &Bytes::Contents(&HostContents),
        &t,
        &Bytes::Contents(&contents),
        ex,
    );
    assert!(n > 100_000, "{n} paths");
    let mut rec = Recorder::default();
    let t = TarStream::from_reader(File::open(&out).unwrap(), "big")
        .unwrap()
        .read(&mut rec)
        .unwrap();
    assert_same_tree(
        &want,
        &Bytes::Contents(&HostContents),
        &t,
        &Bytes::Placed(&rec),
        ex,
    );
}

#[test]
fn dump_lists_headers_records_and_entries() {
    let c = corpus();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("p.tar.gz");
    gnu_tar(
        &c.root,
        &out,
        &[
            "--format=posix",
            "--xattrs",
            "--xattrs-include=*",
            "--sparse",
            "--gzip",
        ],
    );
    let mut text = Vec::new();
    tar::dump(File::open(&out).unwrap(), &mut text).unwrap();
    let text = String::from_utf8(text).unwrap();
    assert!(text.starts_with("compression: Gzip\n"), "{}", &text[..100]);
    for needle in [
        "header type=x",
        "GNU.sparse.realsize=5368709120",
        "=> file \"./sparse/five-gib\"",
        "SCHILY.xattr.user.small=v",
        "=> hardlink",
        "end of archive",
    ] {
        assert!(text.contains(needle), "dump lacks {needle:?}");
    }
}
