//! `kiln mkfs erofs` against the reference tools: fsck.erofs (check and --extract), the kernel
//! (loop mount, when root), and kiln's own reader; reproducibility; bad input.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_formats::erofs::Image;
use kiln_testkit::oracle::{self, Fs};
use kiln_testkit::{generate_corpus, require_tool, run, run_ok, scratch_dir, CorpusOptions};
use sha2::Digest;

fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

/// A generated corpus in its own temp dir (removed when dropped).
struct Corpus {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Corpus {
    fn new(opts: CorpusOptions) -> Self {
        let dir = scratch_dir("kiln-erofs-corpus");
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        generate_corpus(&root, opts);
        Self { _dir: dir, root }
    }
}

type Scan = (BTreeMap<Vec<u8>, Entry>, Vec<Vec<Vec<u8>>>);

/// What a round trip must preserve about one path.
#[derive(Debug, PartialEq, Eq, Clone)]
struct Entry {
    kind: &'static str,
    perm: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
    /// sha256 of file bytes, symlink target, or "" for others.
    content: String,
    rdev: (u32, u32),
    size: u64,
    /// Fewer blocks allocated than the size needs (a sparse file in the source).
    sparse: bool,
    /// Extended attributes (name, value), sorted.
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn hash_file(p: &Path) -> String {
    let mut f = fs::File::open(p).unwrap();
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

/// Walks a host tree: path -> entry, plus hardlink groups (paths sharing an inode).
fn scan(root: &Path) -> Scan {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
    fn rec(
        root: &Path,
        p: &Path,
        out: &mut BTreeMap<Vec<u8>, Entry>,
        inodes: &mut BTreeMap<u64, Vec<Vec<u8>>>,
    ) {
        let md = fs::symlink_metadata(p).unwrap();
        let rel = p
            .strip_prefix(root)
            .unwrap()
            .as_os_str()
            .as_bytes()
            .to_vec();
        let ft = md.file_type();
        let (kind, content) = if ft.is_dir() {
            ("dir", String::new())
        } else if ft.is_file() {
            ("file", hash_file(p))
        } else if ft.is_symlink() {
            (
                "symlink",
                String::from_utf8_lossy(fs::read_link(p).unwrap().as_os_str().as_bytes())
                    .into_owned(),
            )
        } else if ft.is_char_device() {
            ("chr", String::new())
        } else if ft.is_block_device() {
            ("blk", String::new())
        } else if ft.is_fifo() {
            ("fifo", String::new())
        } else {
            ("sock", String::new())
        };
        let rdev = if ft.is_char_device() || ft.is_block_device() {
            (
                libc::major(md.rdev() as libc::dev_t) as u32,
                libc::minor(md.rdev() as libc::dev_t) as u32,
            )
        } else {
            (0, 0)
        };
        if !ft.is_dir() && md.nlink() > 1 {
            inodes.entry(md.ino()).or_default().push(rel.clone());
        }
        out.insert(
            rel,
            Entry {
                kind,
                perm: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                mtime: (md.mtime(), md.mtime_nsec()),
                content,
                rdev,
                size: if ft.is_dir() { 0 } else { md.size() },
                sparse: ft.is_file() && md.blocks() * 512 < md.size(),
                xattrs: kiln_tree::dir::xattrs(p)
                    .unwrap()
                    .into_iter()
                    .map(|x| (x.name.to_vec(), x.value.to_vec()))
                    .collect(),
            },
        );
        if ft.is_dir() {
            for e in fs::read_dir(p).unwrap() {
                rec(root, &e.unwrap().path(), out, inodes);
            }
        }
    }
    rec(root, root, &mut out, &mut inodes);
    let groups = inodes.into_values().filter(|g| g.len() > 1).collect();
    (out, groups)
}

/// Compares two scans field by field, listing the first differences.
fn compare(
    what: &str,
    a: &BTreeMap<Vec<u8>, Entry>,
    b: &BTreeMap<Vec<u8>, Entry>,
    mask: impl Fn(&Entry) -> Entry,
) {
    let mut diffs = Vec::new();
    for (p, ea) in a {
        match b.get(p) {
            None => diffs.push(format!("missing {:?}", String::from_utf8_lossy(p))),
            Some(eb) if mask(ea) != mask(eb) => diffs.push(format!(
                "{:?}: {:?} vs {:?}",
                String::from_utf8_lossy(p),
                mask(ea),
                mask(eb)
            )),
            _ => {}
        }
    }
    for p in b.keys().filter(|p| !a.contains_key(*p)) {
        diffs.push(format!("extra {:?}", String::from_utf8_lossy(p)));
    }
    assert!(
        diffs.is_empty(),
        "{what}: {} differences, first: {:#?}",
        diffs.len(),
        &diffs[..diffs.len().min(10)]
    );
}

fn mkfs(src: &Path, out: &Path, z: &str) -> serde_json::Value {
    let o = run_ok(
        kiln()
            .args(["mkfs", "erofs"])
            .arg(src)
            .arg("-o")
            .arg(out)
            .args([
                "-z",
                z,
                "--json",
                "--seed",
                "0123456789abcdef0123456789abcdef",
            ]),
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn fsck(img: &Path) {
    let o = run(Command::new(require_tool("fsck.erofs")).arg(img));
    assert!(
        o.status.success(),
        "fsck.erofs {}: {}{}",
        img.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Compares the image, read with kiln's reader, to the source tree: everything fsck.erofs 1.5
/// does not extract (xattrs, hardlink identity, link counts, exact times of every kind).
fn compare_with_reader(src: &Path, img_path: &Path, hashes: &BTreeMap<Vec<u8>, Entry>) {
    let tree = kiln_tree::dir::read_dir_tree(src).unwrap();
    let img = Image::open(fs::File::open(img_path).unwrap()).unwrap();
    let links = tree.link_counts();
    let mut nid_of_node: BTreeMap<u32, u64> = BTreeMap::new();
    let mut checked = 0;
    let mut failures = Vec::new();
    // Walk the image and the tree together: one read_dir per directory.
    let mut stack = vec![(
        b"/".to_vec(),
        kiln_formats::fstree::ROOT,
        img.root().unwrap(),
    )];
    while let Some((path, id, ino)) = stack.pop() {
        let node = tree.node(id);
        checked += 1;
        if let Some(prev) = nid_of_node.insert(id, ino.nid) {
            if prev != ino.nid {
                failures.push(format!("{path:?}: hardlink not shared"));
            }
        }
        let want_mode = node.mode();
        if ino.mode != want_mode || ino.uid != node.meta.uid || ino.gid != node.meta.gid {
            failures.push(format!("{:?}: mode/owner", String::from_utf8_lossy(&path)));
        }
        if ino.mtime != node.meta.mtime {
            failures.push(format!(
                "{:?}: mtime {:?} vs {:?}",
                String::from_utf8_lossy(&path),
                ino.mtime,
                node.meta.mtime
            ));
        }
        let want_nlink = if node.is_dir() {
            2 + tree.subdir_count(id)
        } else {
            links[id as usize]
        };
        if ino.nlink != want_nlink {
            failures.push(format!("{:?}: nlink", String::from_utf8_lossy(&path)));
        }
        let mut xs: Vec<(Vec<u8>, Vec<u8>)> = img.xattrs(&ino).unwrap();
        xs.sort();
        let want: Vec<(Vec<u8>, Vec<u8>)> = node
            .meta
            .xattrs
            .iter()
            .map(|x| (x.name.to_vec(), x.value.to_vec()))
            .collect();
        if xs != want {
            failures.push(format!(
                "{:?}: xattrs {xs:?} vs {want:?}",
                String::from_utf8_lossy(&path)
            ));
        }
        if let kiln_formats::NodeKind::Symlink(t) = &node.kind {
            if img.read_all(&ino).unwrap() != **t {
                failures.push(format!("{:?}: target", String::from_utf8_lossy(&path)));
            }
        }
        if let kiln_formats::NodeKind::File(_) = &node.kind {
            let mut h = sha2::Sha256::new();
            img.copy_to(&ino, &mut HashWriter(&mut h)).unwrap();
            let got = hex::encode(h.finalize());
            let rel = &path[1..];
            let want = &hashes[rel].content;
            if &got != want {
                failures.push(format!("{:?}: bytes", String::from_utf8_lossy(&path)));
            }
        }
        if node.is_dir() {
            let ents = img.read_dir(&ino).unwrap();
            let names: Vec<&[u8]> = ents
                .iter()
                .map(|e| e.name.as_slice())
                .filter(|n| *n != b"." && *n != b"..")
                .collect();
            let want: Vec<&[u8]> = tree.entries(id).iter().map(|e| &*e.name).collect();
            if names != want {
                failures.push(format!(
                    "{:?}: entries differ",
                    String::from_utf8_lossy(&path)
                ));
                continue;
            }
            let by_name: BTreeMap<&[u8], u64> =
                ents.iter().map(|e| (e.name.as_slice(), e.nid)).collect();
            for e in tree.entries(id).iter().rev() {
                let mut p = if path == b"/" {
                    Vec::new()
                } else {
                    path.clone()
                };
                p.push(b'/');
                p.extend_from_slice(&e.name);
                let child = img.inode(by_name[&*e.name]).unwrap();
                stack.push((p, e.node, child));
            }
        }
    }
    assert!(checked > 10);
    assert!(
        failures.is_empty(),
        "reader comparison of {}: {:#?}",
        img_path.display(),
        &failures[..failures.len().min(10)]
    );
}

struct HashWriter<'a>(&'a mut sha2::Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.update(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Full round trip for one compression mode.
/// The regular files of `entries` (paths relative to `src`) holding an all-zero 4 KiB block
/// (a block-aligned piece, the last one possibly short): kiln stores those blocks as holes.
fn holey_files(
    src: &Path,
    entries: &BTreeMap<Vec<u8>, Entry>,
) -> std::collections::BTreeSet<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    entries
        .iter()
        .filter(|(_, e)| e.kind == "file" && e.size > 0)
        .filter(|(p, _)| {
            let data = fs::read(src.join(std::ffi::OsStr::from_bytes(p))).unwrap();
            data.chunks(4096).any(|b| b.iter().all(|&x| x == 0))
        })
        .map(|(p, _)| p.clone())
        .collect()
}

fn round_trip(src: &Path, source: &Scan, kernel_src: &oracle::Manifest, z: &str) {
    let t = scratch_dir("kiln-erofs-round-trip");
    let img = t.path().join(format!("{z}.img"));
    let j = mkfs(src, &img, z);
    assert_eq!(
        j["size"].as_u64().unwrap(),
        fs::metadata(&img).unwrap().len()
    );
    fsck(&img);

    // fsck.erofs 1.5 --extract --preserve: names, bytes, modes, owners, mtimes (seconds and
    // nanoseconds), symlinks, devices, fifos. It does not restore xattrs or hardlinks, so
    // those are compared through kiln's reader below.
    let ex = t.path().join("extract");
    run_ok(
        Command::new(require_tool("fsck.erofs"))
            .arg(format!("--extract={}", ex.display()))
            .arg("--preserve")
            .arg(&img),
    );
    let a = &source.0;
    let (b, _) = scan(&ex);
    // fsck.erofs 1.5 skips unmapped (hole) chunks without seeking, so an extracted sparse file
    // is its data runs packed together; those files are compared through the kernel and
    // kiln's reader instead.
    let sparse: Vec<&Vec<u8>> = a.iter().filter(|(_, e)| e.sparse).map(|(p, _)| p).collect();
    assert!(sparse.len() >= 3, "corpus has sparse files");
    // kiln makes every all-zero 4 KiB block a hole, so files with such blocks are sparse in the
    // image too, and fsck.erofs 1.5 packs them the same way (1.9 extracts them right; the
    // kernel reads them right, checked below for every file).
    let holey = holey_files(src, a);
    let a_masked: BTreeMap<Vec<u8>, Entry> = a
        .iter()
        .map(|(p, e)| {
            let mut e = e.clone();
            if e.sparse || holey.contains(p) {
                e.content = String::new();
                e.size = 0;
            }
            (p.clone(), e)
        })
        .collect();
    let b_masked: BTreeMap<Vec<u8>, Entry> = b
        .iter()
        .map(|(p, e)| {
            let mut e = e.clone();
            if a.get(p).is_some_and(|x| x.sparse) || holey.contains(p) {
                e.content = String::new();
                e.size = 0;
            }
            (p.clone(), e)
        })
        .collect();
    compare(
        &format!("fsck.erofs --extract ({z})"),
        &a_masked,
        &b_masked,
        |e| {
            let mut e = e.clone();
            e.sparse = false;
            if e.kind == "dir" || e.kind == "symlink" {
                // Directory times change as extraction fills them; symlink times are not set.
                e.mtime = (0, 0);
            }
            // fsck.erofs 1.5 sets the mode before the owner, and chown clears setuid/setgid:
            // those bits are checked through kiln's reader and the kernel instead. It does not
            // restore xattrs either.
            e.perm &= 0o1777;
            e.xattrs.clear();
            e
        },
    );
    compare_with_reader(src, &img, &source.0);
    oracle::check_on_host(&format!("kernel mount ({z})"), kernel_src, &img, Fs::Erofs);
}

#[test]
fn corpus_round_trips_in_every_mode() {
    let c = Corpus::new(CorpusOptions::default());
    let source = scan(&c.root);
    let kernel_src = oracle::scan(&c.root);
    for z in ["none", "lz4", "lz4hc"] {
        round_trip(&c.root, &source, &kernel_src, z);
    }
}

/// Copies a tree with `cp -a` (new inodes, new directory layout on disk, so readdir order and
/// inode numbers differ from the original).
fn copy_tree(src: &Path, dst: &Path) {
    run_ok(Command::new("cp").arg("-a").arg(src).arg(dst));
}

fn sha256_file(p: &Path) -> String {
    hash_file(p)
}

#[test]
fn reproducible_across_temp_dirs_and_umask() {
    let t1 = tempfile::tempdir().unwrap();
    let t2 = tempfile::Builder::new()
        .prefix("other-name")
        .tempdir()
        .unwrap();
    let a = t1.path().join("src");
    fs::create_dir(&a).unwrap();
    generate_corpus(
        &a,
        CorpusOptions {
            huge_dir: false,
            huge_sparse: false,
        },
    );
    // A second copy made with a different umask and creation order.
    // SAFETY: umask has no preconditions; tests in this binary do not depend on it.
    let old = unsafe { libc::umask(0o077) };
    let b = t2.path().join("elsewhere");
    copy_tree(&a, &b);
    unsafe { libc::umask(old) };
    for z in ["none", "lz4", "lz4hc"] {
        let ia = t1.path().join(format!("{z}.img"));
        let ib = t2.path().join(format!("{z}.img"));
        let ja = mkfs(&a, &ia, z);
        let jb = mkfs(&b, &ib, z);
        assert_eq!(ja["digest"], jb["digest"], "{z}: same tree, same image");
        assert_eq!(
            ja["digest"].as_str().unwrap(),
            format!("sha256:{}", sha256_file(&ia))
        );
        fsck(&ia);
    }
    // The seed changes the UUID and therefore the bytes.
    let ic = t1.path().join("seed.img");
    run_ok(
        kiln()
            .args(["mkfs", "erofs"])
            .arg(&a)
            .arg("-o")
            .arg(&ic)
            .args(["--seed", "ffffffffffffffffffffffffffffffff"]),
    );
    assert_ne!(sha256_file(&ic), sha256_file(&t1.path().join("none.img")));
}

#[test]
fn bad_input_fails_cleanly_without_output() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out.img");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![t.path().join("missing").display().to_string()],
            "missing",
        ),
        (
            vec![
                t.path().display().to_string(),
                "--seed".into(),
                "not-hex".into(),
            ],
            "--seed",
        ),
        (
            vec![
                t.path().display().to_string(),
                "--label".into(),
                "a-label-longer-than-16".into(),
            ],
            "--label",
        ),
    ];
    for (args, needle) in cases {
        let o = run(kiln()
            .args(["mkfs", "erofs"])
            .args(&args)
            .arg("-o")
            .arg(&out));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        let left: Vec<_> = fs::read_dir(t.path()).unwrap().collect();
        assert!(left.is_empty(), "{args:?} left {left:?}");
    }
    // An unwritable destination: its "directory" is a regular file. (A missing directory is
    // created, as every -o does.)
    fs::write(t.path().join("plain-file"), b"x").unwrap();
    let o = run(kiln()
        .args(["mkfs", "erofs"])
        .arg(
            Corpus::new(CorpusOptions {
                huge_dir: false,
                huge_sparse: false,
            })
            .root
            .clone(),
        )
        .arg("-o")
        .arg(t.path().join("plain-file/dir/out.img")));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("plain-file/dir"));
}

/// A slice of the machine's /usr (a real tree: ELF files, scripts, many small files, links),
/// round-tripped in every mode. Bounded so the test stays quick.
#[test]
fn usr_subset_round_trips() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("usr");
    fs::create_dir(&src).unwrap();
    let mut copied = 0;
    for d in [
        "/usr/bin",
        "/usr/lib/x86_64-linux-gnu/perl-base",
        "/usr/share/perl5",
        "/usr/share/zoneinfo",
    ] {
        if Path::new(d).is_dir() {
            run_ok(Command::new("cp").arg("-a").arg(d).arg(&src));
            copied += 1;
        }
    }
    assert!(copied >= 2, "/usr has too little to copy");
    let (want, _) = scan(&src);
    let kernel_want = oracle::scan(&src);
    for z in ["none", "lz4", "lz4hc"] {
        let img = t.path().join(format!("{z}.img"));
        mkfs(&src, &img, z);
        fsck(&img);
        let ex = t.path().join(format!("x-{z}"));
        run_ok(
            Command::new(require_tool("fsck.erofs"))
                .arg(format!("--extract={}", ex.display()))
                .arg("--preserve")
                .arg(&img),
        );
        let (got, _) = scan(&ex);
        let holey = holey_files(&src, &want);
        let mask = |m: &BTreeMap<Vec<u8>, Entry>| -> BTreeMap<Vec<u8>, Entry> {
            m.iter()
                .map(|(p, e)| {
                    let mut e = e.clone();
                    if holey.contains(p) {
                        e.content = String::new();
                        e.size = 0;
                    }
                    (p.clone(), e)
                })
                .collect()
        };
        let (want_m, got_m) = (mask(&want), mask(&got));
        // Files with all-zero blocks are sparse in the image, which fsck.erofs 1.5 extracts
        // packed (see round_trip); the kernel reads every file, those included.
        oracle::check_on_host(
            &format!("/usr subset, kernel mount ({z})"),
            &kernel_want,
            &img,
            Fs::Erofs,
        );
        compare(&format!("/usr subset ({z})"), &want_m, &got_m, |e| {
            let mut e = e.clone();
            if e.kind == "dir" || e.kind == "symlink" {
                e.mtime = (0, 0);
            }
            e.perm &= 0o1777;
            e.xattrs.clear();
            e
        });
        compare_with_reader(&src, &img, &want);
        fs::remove_dir_all(&ex).unwrap();
    }
}

#[test]
fn directory_tar_and_stream_give_the_same_image() {
    let c = Corpus::new(CorpusOptions {
        huge_dir: false,
        huge_sparse: false,
    });
    let d = tempfile::tempdir().unwrap();
    let tar = d.path().join("c.tar");
    run_ok(
        Command::new("tar")
            .args([
                "--sparse",
                "--xattrs",
                "--xattrs-include=*",
                "--sort=name",
                "--format=pax",
                "-C",
            ])
            .arg(&c.root)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
    );
    require_tool("zstd");
    for z in ["none", "lz4", "lz4hc"] {
        let a = d.path().join(format!("dir-{z}.img"));
        let b = d.path().join(format!("tar-{z}.img"));
        let s = d.path().join(format!("zst-{z}.img"));
        mkfs(&c.root, &a, z);
        mkfs(&tar, &b, z);
        run_ok(
            Command::new("sh")
                .arg("-c")
                .arg("zstd -q -c \"$1\" | \"$0\" mkfs erofs - -o \"$2\" -z \"$3\" --seed 0123456789abcdef0123456789abcdef")
                .arg(env!("CARGO_BIN_EXE_kiln"))
                .arg(&tar)
                .arg(&s)
                .arg(z),
        );
        fsck(&s);
        assert_eq!(
            hash_file(&a),
            hash_file(&b),
            "{z}: directory and tar differ"
        );
        assert_eq!(
            hash_file(&a),
            hash_file(&s),
            "{z}: directory and zstd stream differ"
        );
    }
}
