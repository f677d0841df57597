//! FAT writer against dosfstools and mtools: kiln picks mkfs.fat's geometry for a size,
//! `fsck.fat -n` is clean on trees of many shapes (FAT12/16/32), `mcopy -s` extracts exactly the
//! source tree, kiln's reader agrees, and slot rewrites at any size stay fsck-clean and read
//! back as the payload.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use kiln_formats::fat::{self, FatOptions, FatReader, FatType, FatWriter};
use kiln_formats::fstree::{
    DataRef, FileData, HostContents, Meta, Node, NodeKind, SlotReservation, Timestamp, Tree,
};
use kiln_formats::sink::FileSink;
use kiln_testkit::{pseudo_random, require_tool, run, run_ok};

fn meta(sec: i64) -> Meta {
    Meta {
        mtime: Timestamp { sec, nsec: 0 },
        ..Meta::default()
    }
}

fn add_file(t: &mut Tree, path: &str, data: Vec<u8>, sec: i64) {
    let node = Node {
        kind: NodeKind::File(FileData::dense(
            data.len() as u64,
            DataRef::Inline(Arc::from(data)),
        )),
        meta: meta(sec),
        slot: None,
    };
    t.insert(path.as_bytes(), node, &meta(sec)).unwrap();
}

fn add_dir(t: &mut Tree, path: &str) {
    t.mkdir_p(path.as_bytes(), &meta(1_600_000_000)).unwrap();
}

/// A tree exercising names, depth, sizes and counts. `files` controls the big directory.
fn shapes_tree(files: usize, big: usize) -> Tree {
    let mut t = Tree::new(meta(1_650_000_000));
    add_file(&mut t, "BOOTX64.EFI", pseudo_random(1, 5000), 1_700_000_000);
    add_file(
        &mut t,
        "readme.txt",
        b"lower-case 8.3 name\n".to_vec(),
        1_700_000_001,
    );
    add_file(&mut t, "README.md", b"mixed case\n".to_vec(), 1_700_000_002);
    add_file(&mut t, "empty", Vec::new(), 1_700_000_003);
    add_file(&mut t, ".hidden-dotfile", b"dot\n".to_vec(), 1_700_000_004);
    add_file(
        &mut t,
        "a name with spaces.html",
        b"<p>hi</p>\n".to_vec(),
        1_700_000_005,
    );
    add_file(
        &mut t,
        "ünïcødé-名前.txt",
        b"unicode\n".to_vec(),
        1_700_000_006,
    );
    add_file(
        &mut t,
        "many.dots.in.name.tar.gz",
        b"dots\n".to_vec(),
        1_700_000_007,
    );
    add_file(&mut t, &"L".repeat(200), b"long\n".to_vec(), 1_700_000_008);
    add_file(&mut t, "old-1970", b"clamped to 1980\n".to_vec(), 0);
    add_file(
        &mut t,
        "future-2200",
        b"clamped to 2107\n".to_vec(),
        7_258_118_400,
    );
    add_file(&mut t, "big.bin", pseudo_random(2, big), 1_700_000_009);
    add_dir(&mut t, "empty-dir");
    add_dir(&mut t, "EFI/BOOT");
    add_file(
        &mut t,
        "EFI/BOOT/BOOTX64.EFI",
        pseudo_random(3, 70_000),
        1_700_000_010,
    );
    add_file(
        &mut t,
        "EFI/Linux/notepat_2026.11.22+3.efi",
        pseudo_random(4, 40_000),
        1_700_000_011,
    );
    add_file(
        &mut t,
        "loader/loader.conf",
        b"timeout 0\n".to_vec(),
        1_700_000_012,
    );
    let mut deep = String::from("deep");
    for i in 0..12 {
        deep.push_str(&format!("/level-{i}-directory"));
    }
    add_file(
        &mut t,
        &format!("{deep}/leaf.txt"),
        b"deep leaf\n".to_vec(),
        1_700_000_013,
    );
    for i in 0..files {
        let data = if i % 7 == 0 {
            Vec::new()
        } else {
            pseudo_random(i as u64 + 100, i * 37 % 3000)
        };
        add_file(
            &mut t,
            &format!("many/file number {i:04}.dat"),
            data,
            1_700_000_100 + i as i64,
        );
    }
    t
}

struct Built {
    _dir: tempfile::TempDir,
    img: PathBuf,
    report: fat::FatReport,
}

fn build(tree: &Tree, size: u64, fat_type: Option<FatType>, label: Option<&str>) -> Built {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fat.img");
    let opts = FatOptions {
        size,
        fat_type,
        volume_id: [0x78, 0x56, 0x34, 0x12],
        label: label.map(String::from),
    };
    let w = FatWriter::new(tree, opts).unwrap();
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&img)
        .unwrap();
    f.set_len(size).unwrap();
    let report = w.write(&HostContents, &FileSink::new(&f, 0, size)).unwrap();
    Built {
        _dir: dir,
        img,
        report,
    }
}

fn fsck_clean(img: &Path) {
    let out = run(Command::new(require_tool("fsck.fat"))
        .arg("-n")
        .arg("-V")
        .arg(img));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "fsck.fat -n failed:\n{text}");
    // fsck.fat -n exits 0 even for some repairs it would make; those lines name the fix.
    for bad in [
        "Free cluster summary",
        "differences between boot sector",
        "Perform changes",
        "Orphaned",
        "will be truncated",
        "Unable",
        "lost",
        "Fix",
    ] {
        assert!(
            !text.contains(bad),
            "fsck.fat -n reports a problem ({bad}):\n{text}"
        );
    }
}

fn mtools(cmd: &str) -> Command {
    let mut c = Command::new(require_tool(cmd));
    c.env("MTOOLS_SKIP_CHECK", "1").env("LC_ALL", "C.UTF-8");
    c
}

/// Every file of the tree as path → bytes (directories as path → None).
fn tree_files(t: &Tree) -> BTreeMap<String, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    t.walk_paths(|p, id| {
        if p == b"/" {
            return;
        }
        let path = String::from_utf8(p.to_vec()).unwrap();
        let v = match &t.node(id).kind {
            NodeKind::File(fd) => Some(match &fd.data {
                DataRef::Inline(b) => b.to_vec(),
                _ => Vec::new(),
            }),
            _ => None,
        };
        out.insert(path, v);
    });
    out
}

fn host_files(root: &Path) -> BTreeMap<String, Option<Vec<u8>>> {
    fn rec(root: &Path, dir: &Path, out: &mut BTreeMap<String, Option<Vec<u8>>>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = format!("/{}", p.strip_prefix(root).unwrap().to_str().unwrap());
            if e.file_type().unwrap().is_dir() {
                out.insert(rel, None);
                rec(root, &p, out);
            } else {
                out.insert(rel, Some(fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    rec(root, root, &mut out);
    out
}

fn check_round_trip(tree: &Tree, b: &Built) {
    fsck_clean(&b.img);
    let want = tree_files(tree);

    // mtools' view.
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("x");
    fs::create_dir(&dest).unwrap();
    run_ok(
        mtools("mcopy")
            .arg("-s")
            .arg("-n")
            .arg("-i")
            .arg(&b.img)
            .arg("::/")
            .arg(&dest),
    );
    // mcopy -s ::/ copies the root's contents into dest.
    let got = host_files(&dest);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    assert!(got == want, "mcopy -s extracted different bytes");

    // kiln's reader.
    let bytes = fs::read(&b.img).unwrap();
    let rd = |off: u64, buf: &mut [u8]| {
        let o = off as usize;
        buf.copy_from_slice(&bytes[o..o + buf.len()]);
        Ok(())
    };
    let r = FatReader::open(rd).unwrap();
    assert_eq!(r.geometry, b.report.geometry);
    let mut mine = BTreeMap::new();
    for (p, e) in r.walk().unwrap() {
        let v = (!e.is_dir()).then(|| r.read_entry(&e).unwrap());
        mine.insert(p, v);
    }
    assert!(mine == want, "kiln's reader disagrees with the source tree");
    assert!(r.dump().unwrap().contains("/EFI/BOOT/BOOTX64.EFI"));
}

#[test]
fn geometry_matches_mkfs_fat() {
    let dir = tempfile::tempdir().unwrap();
    // KiB sizes across FAT12, FAT16 and FAT32, cluster-size steps and odd sizes (not floppy
    // sizes, where mkfs.fat uses floppy presets for non-disk targets).
    for kib in [
        100u64, 1000, 2048, 4096, 4100, 8192, 16384, 16000, 33_000, 65536, 131_072, 270_000,
        300_000, 524_287, 524_288, 600_000, 1_048_576, 8_400_000, 17_000_000,
    ] {
        let img = dir.path().join(format!("m{kib}.img"));
        run_ok(
            Command::new(require_tool("mkfs.fat"))
                .arg("-C")
                .arg("-i")
                .arg("12345678")
                .arg(&img)
                .arg(kib.to_string()),
        );
        let f = File::open(&img).unwrap();
        let rd = |off: u64, buf: &mut [u8]| {
            use std::os::unix::fs::FileExt;
            f.read_exact_at(buf, off)
        };
        let theirs = FatReader::open(rd).unwrap().geometry;
        let ours = fat::geometry(kib * 1024, None).unwrap();
        assert_eq!(ours, theirs, "geometry for {kib} KiB");
        fs::remove_file(&img).unwrap();
    }
}

#[test]
fn fat12_shapes_fsck_clean_and_mcopy_round_trip() {
    let t = shapes_tree(60, 100_000);
    let b = build(&t, 4 << 20, None, Some("KILNESP"));
    assert_eq!(b.report.geometry.fat_type, FatType::Fat12);
    check_round_trip(&t, &b);
    let out = run_ok(mtools("minfo").arg("-i").arg(&b.img).arg("::"));
    let info = String::from_utf8_lossy(&out.stdout);
    assert!(info.contains("serial number: 12345678"), "{info}");
    assert!(info.contains("disk label=\"KILNESP    \""), "{info}");
}

#[test]
fn fat16_shapes_fsck_clean_and_mcopy_round_trip() {
    let t = shapes_tree(700, 3 << 20);
    let b = build(&t, 64 << 20, None, None);
    assert_eq!(b.report.geometry.fat_type, FatType::Fat16);
    check_round_trip(&t, &b);
    // mdir shows long names and their generated short names.
    let out = run_ok(mtools("mdir").arg("-i").arg(&b.img).arg("::/"));
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("a name with spaces.html"), "{listing}");
    assert!(listing.contains("ANAMEW~1 HTM"), "{listing}");
}

#[test]
fn fat32_shapes_fsck_clean_and_mcopy_round_trip() {
    let t = shapes_tree(300, 1 << 20);
    let b = build(&t, 600 << 20, None, Some("ESP"));
    assert_eq!(b.report.geometry.fat_type, FatType::Fat32);
    check_round_trip(&t, &b);
}

#[test]
fn forced_fat32_small_and_timestamps() {
    let t = shapes_tree(10, 1000);
    let b = build(&t, 40 << 20, Some(FatType::Fat32), None);
    assert_eq!(b.report.geometry.fat_type, FatType::Fat32);
    fsck_clean(&b.img);
    let out = run_ok(mtools("mdir").arg("-i").arg(&b.img).arg("::/"));
    let listing = String::from_utf8_lossy(&out.stdout);
    // 1970 clamps to 1980-01-01, 2200 to 2107-12-31; 1_700_000_000 is 2023-11-14 22:13:20.
    assert!(listing.contains("1980-01-01"), "{listing}");
    assert!(listing.contains("2107-12-31"), "{listing}");
    assert!(listing.contains("2023-11-14  22:13"), "{listing}");
}

#[test]
fn reproducible_bytes() {
    let t = shapes_tree(50, 10_000);
    let a = fs::read(build(&t, 8 << 20, None, Some("X")).img).unwrap();
    let b = fs::read(build(&t, 8 << 20, None, Some("X")).img).unwrap();
    assert!(a == b);
}

#[test]
fn clear_errors() {
    let mut t = Tree::default();
    t.insert(
        b"/dir/link",
        Node {
            kind: NodeKind::Symlink(b"target".to_vec().into()),
            meta: Meta::default(),
            slot: None,
        },
        &Meta::default(),
    )
    .unwrap();
    let e = FatWriter::new(&t, opts(4 << 20)).unwrap_err().to_string();
    assert!(e.contains("/dir/link") && e.contains("symlink"), "{e}");

    let mut t = Tree::default();
    add_file(&mut t, "a:b", vec![1], 0);
    let e = FatWriter::new(&t, opts(4 << 20)).unwrap_err().to_string();
    assert!(e.contains("/a:b") && e.contains("':'"), "{e}");

    let mut t = Tree::default();
    add_file(&mut t, "Same", vec![1], 0);
    add_file(&mut t, "same", vec![1], 0);
    let e = FatWriter::new(&t, opts(4 << 20)).unwrap_err().to_string();
    assert!(e.contains("case"), "{e}");

    let mut t = Tree::default();
    add_file(&mut t, "big", vec![7; 3 << 20], 0);
    let e = FatWriter::new(&t, opts(2 << 20)).unwrap_err().to_string();
    assert!(e.contains("clusters"), "{e}");

    let mut t = Tree::default();
    for i in 0..600 {
        add_file(&mut t, &format!("F{i}"), vec![], 0);
    }
    let e = FatWriter::new(&t, opts(8 << 20)).unwrap_err().to_string();
    assert!(e.contains("root directory holds 512"), "{e}");

    let mut o = opts(4 << 20);
    o.label = Some("bad.label".into());
    assert!(FatWriter::new(&Tree::default(), o).is_err());
    assert!(FatWriter::new(&Tree::default(), opts(1000)).is_err());
}

fn opts(size: u64) -> FatOptions {
    FatOptions {
        size,
        fat_type: None,
        volume_id: [1, 2, 3, 4],
        label: None,
    }
}

#[test]
fn auto_size_is_small_and_fits() {
    let t = shapes_tree(100, 2 << 20);
    let (size, fat_type) = fat::auto_size(&t, None, None, 0).unwrap();
    assert_eq!(fat_type, None);
    assert_eq!(size % (64 << 10), 0);
    let b = build(&t, size, None, None);
    check_round_trip(&t, &b);
    // One step smaller does not hold the tree (or leaves no valid layout).
    assert!(FatWriter::new(&t, opts(size - (64 << 10))).is_err());
    // An empty tree gets a tiny but valid filesystem.
    let empty = Tree::default();
    let (small, _) = fat::auto_size(&empty, None, Some("EMPTY".into()), 0).unwrap();
    assert!(small <= 128 << 10, "{small}");
    let b = build(&empty, small, None, Some("EMPTY"));
    fsck_clean(&b.img);
    // Slack is honoured.
    let (with_slack, _) = fat::auto_size(&t, None, None, 1 << 20).unwrap();
    let w = FatWriter::new(&t, opts(with_slack)).unwrap();
    let g = w.geometry();
    assert!(
        u64::from(g.cluster_count - w.clusters_used()) * u64::from(g.cluster_size()) >= 1 << 20
    );
}

/// A root directory too big for the fixed FAT16 root gets FAT32 at a small size, not the
/// 512 MiB at which mkfs.fat's size rule would switch to FAT32 by itself.
#[test]
fn auto_size_picks_fat32_for_a_crowded_root() {
    let mut t = Tree::new(meta(1_650_000_000));
    for i in 0..600 {
        add_file(
            &mut t,
            &format!("a-long-file-name-{i:04}.txt"),
            vec![b'x'; 100],
            1_700_000_000,
        );
    }
    let (size, fat_type) = fat::auto_size(&t, None, None, 0).unwrap();
    assert_eq!(fat_type, Some(FatType::Fat32));
    assert!(size <= 40 << 20, "{size}");
    let w = FatWriter::new(
        &t,
        FatOptions {
            fat_type,
            ..opts(size)
        },
    )
    .unwrap();
    assert_eq!(w.geometry().fat_type, FatType::Fat32);
}

fn slot_tree(capacity: u64) -> Tree {
    let mut t = shapes_tree(20, 5000);
    let node = Node {
        kind: NodeKind::File(FileData::dense(
            9,
            DataRef::Inline(Arc::from(&b"loading.."[..])),
        )),
        meta: meta(1_700_000_000),
        slot: Some(SlotReservation {
            name: "piece".into(),
            capacity,
        }),
    };
    t.insert(b"/web/piece.html", node, &meta(1_700_000_000))
        .unwrap();
    // Something allocated after the slot, so a wrong chain would collide with it.
    add_file(
        &mut t,
        "zz-after.bin",
        pseudo_random(77, 9000),
        1_700_000_000,
    );
    t
}

fn inject(img: &Path, loc: &fat::SlotLocation, payload: &[u8]) {
    let f = File::options().read(true).write(true).open(img).unwrap();
    use std::os::unix::fs::FileExt;
    let patches = loc
        .patches(payload.len() as u64, &mut |off, buf| {
            f.read_exact_at(buf, off)
        })
        .unwrap();
    for p in &patches {
        f.write_all_at(&p.bytes, p.offset).unwrap();
    }
    f.write_all_at(payload, loc.data_offset).unwrap();
}

fn check_slots(size: u64, fat_type: Option<FatType>, want: FatType) {
    let capacity = 50_000;
    let t = slot_tree(capacity);
    let b = build(&t, size, fat_type, None);
    assert_eq!(b.report.geometry.fat_type, want);
    fsck_clean(&b.img);
    let loc = b.report.slots[0].clone();
    assert_eq!(loc.name, "piece");
    let cs = u64::from(loc.cluster_size);
    assert_eq!(u64::from(loc.cluster_count), capacity.div_ceil(cs));
    let base = fs::read(&b.img).unwrap();
    // The reported dirent is the slot's 8.3 entry.
    let rd = |off: u64, buf: &mut [u8]| {
        let o = off as usize;
        buf.copy_from_slice(&base[o..o + buf.len()]);
        Ok(())
    };
    let e = FatReader::open(rd)
        .unwrap()
        .lookup("/web/piece.html")
        .unwrap()
        .unwrap();
    assert_eq!(e.dirent_offset, loc.dirent_offset);
    assert_eq!(e.first_cluster, loc.first_cluster);

    let mut sizes = vec![0, 1, cs - 1, cs, cs + 1, capacity - 1, capacity];
    sizes.dedup();
    for (i, &n) in sizes.iter().enumerate() {
        let payload = pseudo_random(1000 + n, n as usize);
        // Fresh from the base, and chained on the previous injection (in place twice).
        fs::write(&b.img, &base).unwrap();
        if i > 0 {
            inject(&b.img, &loc, &pseudo_random(5, sizes[i - 1] as usize));
        }
        inject(&b.img, &loc, &payload);
        fsck_clean(&b.img);
        let out = run_ok(
            mtools("mtype")
                .arg("-i")
                .arg(&b.img)
                .arg("::/web/piece.html"),
        );
        assert!(out.stdout == payload, "mtype after injecting {n} bytes");
        let dest = tempfile::tempdir().unwrap();
        run_ok(
            mtools("mcopy")
                .arg("-n")
                .arg("-i")
                .arg(&b.img)
                .arg("::/zz-after.bin")
                .arg(dest.path()),
        );
        assert_eq!(
            fs::read(dest.path().join("zz-after.bin")).unwrap(),
            pseudo_random(77, 9000)
        );
    }
    // Too big is refused.
    let f = File::open(&b.img).unwrap();
    use std::os::unix::fs::FileExt;
    let e = loc
        .patches(capacity + 1, &mut |off, buf| f.read_exact_at(buf, off))
        .unwrap_err()
        .to_string();
    assert!(e.contains("exceeds the capacity"), "{e}");
}

#[test]
fn slots_fat12() {
    check_slots(4 << 20, None, FatType::Fat12);
}

#[test]
fn slots_fat16() {
    check_slots(32 << 20, None, FatType::Fat16);
}

#[test]
fn slots_fat32() {
    check_slots(64 << 20, Some(FatType::Fat32), FatType::Fat32);
}

#[test]
fn corrupt_images_give_errors_not_panics() {
    let t = shapes_tree(40, 20_000);
    for (size, ty) in [(4u64 << 20, None), (40 << 20, Some(FatType::Fat32))] {
        let b = build(&t, size, ty, None);
        let mut img = fs::read(&b.img).unwrap();
        // Metadata lives in the first few hundred KiB: boot sector, FATs, root, directories.
        let hot = (b.report.geometry.data_offset() as usize + 64 * 1024).min(img.len());
        let noise = pseudo_random(size, 4 * 2000);
        for round in 0..2000 {
            let r = u32::from_le_bytes(noise[round * 4..round * 4 + 4].try_into().unwrap());
            let at = r as usize % hot;
            let flip = (r >> 24) as u8 | 1;
            img[at] ^= flip;
            let rd = |off: u64, buf: &mut [u8]| {
                let o = usize::try_from(off)
                    .ok()
                    .filter(|o| o + buf.len() <= img.len());
                match o {
                    Some(o) => {
                        buf.copy_from_slice(&img[o..o + buf.len()]);
                        Ok(())
                    }
                    None => Err(std::io::Error::other("past end")),
                }
            };
            if let Ok(r) = FatReader::open(rd) {
                if let Ok(all) = r.walk() {
                    for (_, e) in all.iter().take(50) {
                        let _ = r.read_entry(e);
                    }
                }
                let _ = r.dump();
            }
            img[at] ^= flip;
        }
    }
}

/// An ESP held in memory that loses power: writes past `budget` never land, and the write the
/// power cut interrupts lands only its first `torn` 512-byte sectors.
struct PowerCut {
    img: std::cell::RefCell<Vec<u8>>,
    budget: std::cell::Cell<usize>,
    torn: usize,
    writes: std::cell::Cell<usize>,
}

impl PowerCut {
    fn new(img: Vec<u8>, budget: usize, torn: usize) -> Self {
        PowerCut {
            img: img.into(),
            budget: budget.into(),
            torn,
            writes: 0.into(),
        }
    }
}

impl fat::edit::Device for PowerCut {
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let img = self.img.borrow();
        let a = offset as usize;
        let src = img
            .get(a..a + buf.len())
            .ok_or_else(|| std::io::Error::other("read past the end"))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write(&self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.writes.set(self.writes.get() + 1);
        let a = offset as usize;
        if self.budget.get() == 0 {
            // The cut: the first `torn` sectors of this write land (sector-aligned in the
            // device, so count from the sector the write starts in).
            let end = ((a / 512) + self.torn) * 512;
            let n = end.saturating_sub(a).min(bytes.len());
            self.img.borrow_mut()[a..a + n].copy_from_slice(&bytes[..n]);
            return Err(std::io::Error::other("power cut"));
        }
        self.budget.set(self.budget.get() - 1);
        self.img.borrow_mut()[a..a + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }
    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What `kiln update` does to the ESP: remove the replaced version's UKI and any earlier copy
/// of the new one, then add the new one.
fn install(dev: &PowerCut, name: &str, new: &[u8]) -> Result<(), fat::FatError> {
    fat::edit::remove_file(dev, "/EFI/Linux/app_2+3.efi")?;
    fat::edit::remove_file(dev, &format!("/EFI/Linux/{name}"))?;
    fat::edit::add_file(dev, "/EFI/Linux", name, new, 1_700_000_300)
}

/// Reads a file with mtools (an independent FAT implementation, standing in for firmware).
fn mread(img: &Path, path: &str) -> Option<Vec<u8>> {
    let out = run(mtools("mtype").arg("-i").arg(img).arg(format!("::{path}")));
    out.status.success().then_some(out.stdout)
}

// An update's ESP edit cut by a power loss after every write, and inside every multi-sector
// write, leaves the kept version's UKI intact for kiln's reader and for mtools; running the
// update again finishes it, and the result passes fsck.fat -n. FAT16 and FAT32, with a
// directory that has free slots and one that must grow.
#[test]
fn esp_edit_survives_a_power_cut_at_every_write() {
    let kept = pseudo_random(71, 300 << 10);
    let new = pseudo_random(73, 250 << 10);
    let mut points = 0;
    for (size, ty) in [(16u64 << 20, FatType::Fat16), (40 << 20, FatType::Fat32)] {
        for fill in [false, true] {
            let mut t = Tree::new(meta(1_650_000_000));
            add_dir(&mut t, "/EFI/BOOT");
            add_file(
                &mut t,
                "/EFI/BOOT/BOOTX64.EFI",
                pseudo_random(70, 10_000),
                1_700_000_000,
            );
            add_file(
                &mut t,
                "/EFI/Linux/app_1+3.efi",
                kept.clone(),
                1_700_000_100,
            );
            add_file(
                &mut t,
                "/EFI/Linux/app_2+3.efi",
                pseudo_random(72, 200 << 10),
                1_700_000_200,
            );
            add_file(
                &mut t,
                "/loader/loader.conf",
                b"timeout 0\n".to_vec(),
                1_700_000_000,
            );
            let b = build(&t, size, Some(ty), Some("ESP"));
            let mut base = fs::read(&b.img).unwrap();
            if fill {
                // Fill /EFI/Linux to its last slot, so that the new entry grows it by a cluster.
                let dev = PowerCut::new(base, usize::MAX, 0);
                let cs = {
                    let r = FatReader::open(|o: u64, buf: &mut [u8]| {
                        fat::edit::Device::read(&dev, o, buf)
                    })
                    .unwrap();
                    r.geometry.cluster_size() as usize
                };
                // Slots: `.`, `..`, two per file (a long name and its 8.3 entry).
                let files = (cs / 32 - 2) / 2;
                for i in 0..files - 2 {
                    fat::edit::add_file(&dev, "/EFI/Linux", &format!("x+{i:02}.efi"), b"x", 0)
                        .unwrap();
                }
                base = dev.img.into_inner();
            }
            // The new name needs three slots where the removed one frees two, so a full
            // directory must grow.
            let name = if fill {
                "app_3.0.0-rc.1+3.efi"
            } else {
                "app_3+3.efi"
            };
            let img = b.img.clone();
            let check_kept = |bytes: &[u8], what: &str| {
                fs::write(&img, bytes).unwrap();
                let r = FatReader::open(|o: u64, buf: &mut [u8]| {
                    buf.copy_from_slice(&bytes[o as usize..o as usize + buf.len()]);
                    Ok(())
                })
                .unwrap();
                assert!(
                    r.read_file("/EFI/Linux/app_1+3.efi").unwrap() == kept,
                    "{what}: kiln reads the kept UKI wrong"
                );
                assert!(
                    mread(&img, "/EFI/Linux/app_1+3.efi").as_deref() == Some(&kept[..]),
                    "{what}: mtools reads the kept UKI wrong"
                );
            };

            // The whole edit, to count its writes.
            let dir_clusters = |bytes: &[u8]| {
                let r = FatReader::open(|o: u64, buf: &mut [u8]| {
                    buf.copy_from_slice(&bytes[o as usize..o as usize + buf.len()]);
                    Ok(())
                })
                .unwrap();
                let e = r.lookup("/EFI/Linux").unwrap().unwrap();
                r.chain(e.first_cluster).unwrap().len()
            };
            let full = PowerCut::new(base.clone(), usize::MAX, 0);
            install(&full, name, &new).unwrap();
            let writes = full.writes.get();
            let done = full.img.into_inner();
            assert_eq!(dir_clusters(&done), dir_clusters(&base) + usize::from(fill));
            check_kept(&done, "complete");
            fsck_clean(&img);
            assert!(mread(&img, &format!("/EFI/Linux/{name}")).as_deref() == Some(&new[..]));
            assert!(mread(&img, "/EFI/Linux/app_2+3.efi").is_none());

            for cut in 0..writes {
                for torn in [0, 1, 3] {
                    let what = format!("{ty:?}, directory full: {fill}, cut at write {cut}, {torn} sectors of it landed");
                    let dev = PowerCut::new(base.clone(), cut, torn);
                    assert!(
                        install(&dev, name, &new).is_err(),
                        "{what}: the cut was not reached"
                    );
                    let after = dev.img.into_inner();
                    check_kept(&after, &what);
                    // Running the update again finishes the job, fsck-clean.
                    let again = PowerCut::new(after, usize::MAX, 0);
                    install(&again, name, &new).unwrap_or_else(|e| panic!("{what}: resuming: {e}"));
                    let fin = again.img.into_inner();
                    check_kept(&fin, &what);
                    fsck_clean(&img);
                    assert!(
                        mread(&img, &format!("/EFI/Linux/{name}")).as_deref() == Some(&new[..]),
                        "{what}: resumed"
                    );
                    points += 1;
                }
            }
            eprintln!("{ty:?}, directory full: {fill}: {writes} writes in an update");
        }
    }
    assert!(points >= 20, "only {points} cut points");
    eprintln!("{points} power cuts, each leaving the kept UKI readable and the update resumable");
}
