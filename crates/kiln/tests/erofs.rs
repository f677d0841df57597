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
use std::sync::OnceLock;

use kiln_formats::erofs::{self, Image};
use kiln_testkit::{generate_corpus, is_root, require_tool, run, run_ok, CorpusOptions};
use sha2::Digest;

fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

/// The full corpus (100k-entry directory, 5 GiB sparse file), generated once per test binary.
fn corpus() -> &'static Path {
    static C: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &C.get_or_init(|| {
        let t = tempfile::Builder::new()
            .prefix("kiln-erofs-corpus")
            .tempdir()
            .unwrap();
        let root = t.path().join("root");
        fs::create_dir(&root).unwrap();
        generate_corpus(&root, CorpusOptions::default());
        (t, root)
    })
    .1
}

type Scan = (BTreeMap<Vec<u8>, Entry>, Vec<Vec<Vec<u8>>>);

/// The corpus scanned once (hashing the 5 GiB sparse file is the slow part).
fn source_scan() -> &'static Scan {
    static S: OnceLock<Scan> = OnceLock::new();
    S.get_or_init(|| scan(corpus()))
}

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
fn scan(root: &Path) -> (BTreeMap<Vec<u8>, Entry>, Vec<Vec<Vec<u8>>>) {
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
fn compare_with_reader(src: &Path, img_path: &Path) {
    let tree = kiln_tree::dir::read_dir_tree(src).unwrap();
    let img = Image::open(fs::File::open(img_path).unwrap()).unwrap();
    let links = tree.link_counts();
    let mut nid_of_node: BTreeMap<u32, u64> = BTreeMap::new();
    let mut checked = 0;
    let mut failures = Vec::new();
    let mut stack = vec![(b"/".to_vec(), kiln_formats::fstree::ROOT)];
    while let Some((path, id)) = stack.pop() {
        let node = tree.node(id);
        let ino = img.lookup(&path).unwrap();
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
            let want = &source_scan().0[rel].content;
            if &got != want {
                failures.push(format!("{:?}: bytes", String::from_utf8_lossy(&path)));
            }
        }
        for e in tree.entries(id).iter().rev() {
            let mut p = if path == b"/" {
                Vec::new()
            } else {
                path.clone()
            };
            p.push(b'/');
            p.extend_from_slice(&e.name);
            stack.push((p, e.node));
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
fn round_trip(z: &str) {
    let src = corpus();
    let t = tempfile::tempdir().unwrap();
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
    let (a, _) = source_scan();
    let (b, _) = scan(&ex);
    // fsck.erofs 1.5 skips unmapped (hole) chunks without seeking, so an extracted sparse file
    // is its data runs packed together; those files are compared through the kernel and
    // kiln's reader instead.
    let sparse: Vec<&Vec<u8>> = a.iter().filter(|(_, e)| e.sparse).map(|(p, _)| p).collect();
    assert!(sparse.len() >= 3, "corpus has sparse files");
    let a_masked: BTreeMap<Vec<u8>, Entry> = a
        .iter()
        .map(|(p, e)| {
            let mut e = e.clone();
            if e.sparse {
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
            if a.get(p).is_some_and(|x| x.sparse) {
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
            e
        },
    );
    compare_with_reader(src, &img);
    kernel_mount(src, &img, z);
}

/// Mounts the image read-only through a loop device and compares, when root.
fn kernel_mount(src: &Path, img: &Path, z: &str) {
    if !is_root() {
        eprintln!("skipped: kernel mount of the {z} image needs root and loop devices");
        return;
    }
    let m = tempfile::tempdir().unwrap();
    let o = run(Command::new("mount")
        .args(["-t", "erofs", "-o", "ro,loop"])
        .arg(img)
        .arg(m.path()));
    if !o.status.success() {
        eprintln!(
            "skipped: kernel mount of the {z} image failed to start ({}); no loop devices?",
            String::from_utf8_lossy(&o.stderr).trim()
        );
        assert!(
            !String::from_utf8_lossy(&o.stderr).contains("wrong fs type"),
            "kernel rejected the image"
        );
        return;
    }
    let _ = src;
    let (a, ga) = source_scan();
    let (a, ga) = (a.clone(), ga.clone());
    let (b, gb) = scan(m.path());
    run_ok(Command::new("umount").arg(m.path()));
    compare(&format!("kernel mount ({z})"), &a, &b, |e| {
        let mut e = e.clone();
        e.sparse = false;
        if e.kind == "dir" {
            e.size = 0;
        }
        e
    });
    let norm = |mut g: Vec<Vec<Vec<u8>>>| {
        for x in &mut g {
            x.sort();
        }
        g.sort();
        g
    };
    assert_eq!(norm(ga), norm(gb), "hardlink groups through the kernel");
}

#[test]
fn corpus_round_trip_uncompressed() {
    round_trip("none");
}

#[test]
fn corpus_round_trip_lz4() {
    round_trip("lz4");
}

#[test]
fn corpus_round_trip_lz4hc() {
    round_trip("lz4hc");
}
