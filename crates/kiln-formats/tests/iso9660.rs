//! The ISO 9660 writer and reader against the reference tools: xorriso (El Torito report,
//! Rock Ridge extraction), isoinfo (Rock Ridge and Joliet listings and extraction), sgdisk and
//! sfdisk (the hybrid GPT), blkid (label and UUID) and, when running as root, the kernel's
//! isofs through a loop mount.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_formats::fstree::{
    DataRef, FileData, HostContents, Meta, Node, NodeKind, SlotReservation, Timestamp, Tree,
};
use kiln_formats::iso9660::writer::HybridOptions;
use kiln_formats::iso9660::{self, slot, IsoImage, IsoOptions, IsoPlan, TreeKind, VolumeUuid};
use kiln_formats::repart::Uuid;
use kiln_formats::sink::FileSink;
use kiln_testkit::oracle::Fs;
use kiln_testkit::{generate_corpus, pseudo_random, require_tool, run, run_ok, CorpusOptions};

const SEED: Uuid = Uuid::from_bytes(*b"kiln-iso-testing");

/// A temporary directory on tmpfs when /dev/shm has room (creating and deleting the 100k-entry
/// corpus costs minutes on some disks), else in the default temporary directory.
fn tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let c = std::ffi::CString::new("/dev/shm").unwrap();
    // SAFETY: a valid NUL-terminated path and a zeroed statvfs to fill.
    let ok = unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0;
    if ok && (st.f_bavail as u64) * (st.f_frsize as u64) >= 2 << 30 {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().unwrap()
}
const EPOCH: i64 = 1_700_000_000;

/// Makes an 8 MiB FAT ESP image holding `EFI/BOOT/BOOTX64.EFI` (systemd-boot) and a
/// `loader/loader.conf` with `timeout 17`, with mkfs.fat + mtools.
fn make_esp(dir: &Path) -> Vec<u8> {
    make_esp_sized(dir, 8 << 10, 0)
}

/// Like [`make_esp`] with a size in KiB and `pad_mib` MiB of filler copied first, so the boot
/// files land beyond it.
fn make_esp_sized(dir: &Path, kib: u64, pad_mib: usize) -> Vec<u8> {
    let img = dir.join("esp.img");
    let _ = fs::remove_file(&img);
    run_ok(
        Command::new(require_tool("mkfs.fat"))
            .args(["-C", "-n", "KILNESP", "-i", "12345678"])
            .arg(&img)
            .arg(kib.to_string()),
    );
    let efi = Path::new("/usr/lib/systemd/boot/efi/systemd-bootx64.efi");
    assert!(
        efi.is_file(),
        "{} missing; .ci/run installs systemd-boot-efi",
        efi.display()
    );
    let mtool = |args: &[&std::ffi::OsStr]| {
        run_ok(
            Command::new(require_tool(args[0].to_str().unwrap()))
                .arg("-i")
                .arg(&img)
                .args(&args[1..]),
        );
    };
    let os = |s: &str| std::ffi::OsString::from(s);
    for d in ["::/EFI", "::/EFI/BOOT", "::/loader"] {
        mtool(&[&os("mmd"), &os(d)]);
    }
    if pad_mib > 0 {
        let pad = dir.join("pad.bin");
        fs::write(&pad, pseudo_random(77, pad_mib << 20)).unwrap();
        mtool(&[&os("mcopy"), pad.as_os_str(), &os("::/pad.bin")]);
    }
    mtool(&[
        &os("mcopy"),
        efi.as_os_str(),
        &os("::/EFI/BOOT/BOOTX64.EFI"),
    ]);
    // "Boot in 17 s." on the console proves systemd-boot ran from this ESP and read its FAT.
    let conf = dir.join("loader.conf");
    fs::write(&conf, "timeout 17\n").unwrap();
    mtool(&[&os("mcopy"), conf.as_os_str(), &os("::/loader/loader.conf")]);
    fs::read(&img).unwrap()
}

fn options(esp: Option<&[u8]>, hybrid: bool) -> IsoOptions {
    let mut o = IsoOptions::new("KILN_TEST", EPOCH, &SEED);
    o.esp_len = esp.map(|e| e.len() as u64);
    if hybrid {
        o.hybrid = Some(HybridOptions::from_seed(&SEED));
    }
    o
}

fn build(tree: &Tree, opts: &IsoOptions, esp: Option<&[u8]>, out: &Path) -> IsoPlan {
    let plan = IsoPlan::new(tree, opts).unwrap();
    let f = File::create(out).unwrap();
    f.set_len(plan.size()).unwrap();
    let owned: Option<Vec<u8>> = esp.map(<[u8]>::to_vec);
    let esp_reader = owned.as_ref().map(|v| v as &dyn iso9660::ReadAt);
    plan.write(
        tree,
        &HostContents,
        esp_reader,
        &FileSink::new(&f, 0, plan.size()),
    )
    .unwrap();
    plan
}

fn corpus(dir: &Path, huge_dir: bool) -> PathBuf {
    let src = dir.join("src");
    fs::create_dir(&src).unwrap();
    generate_corpus(
        &src,
        CorpusOptions {
            huge_dir,
            huge_sparse: false,
        },
    );
    src
}

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Dir,
    File(Vec<u8>),
    Link(Vec<u8>),
    Fifo,
    Char(u64),
    Block(u64),
    Socket,
}

#[derive(Debug, PartialEq, Eq)]
struct Attrs {
    kind: Kind,
    perm: u32,
    owner: Option<(u32, u32)>,
    mtime: Option<i64>,
}

/// Everything under `root` by relative path (the root itself excluded).
fn snapshot(root: &Path, owners: bool, mtimes: bool) -> BTreeMap<PathBuf, Attrs> {
    fn rec(
        root: &Path,
        dir: &Path,
        out: &mut BTreeMap<PathBuf, Attrs>,
        owners: bool,
        mtimes: bool,
    ) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p).unwrap();
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                Kind::Dir
            } else if ft.is_symlink() {
                Kind::Link(
                    std::os::unix::ffi::OsStrExt::as_bytes(fs::read_link(&p).unwrap().as_os_str())
                        .to_vec(),
                )
            } else if ft.is_file() {
                Kind::File(fs::read(&p).unwrap())
            } else if ft.is_fifo() {
                Kind::Fifo
            } else if ft.is_char_device() {
                Kind::Char(md.rdev())
            } else if ft.is_block_device() {
                Kind::Block(md.rdev())
            } else {
                Kind::Socket
            };
            out.insert(
                p.strip_prefix(root).unwrap().to_path_buf(),
                Attrs {
                    kind,
                    perm: if ft.is_symlink() {
                        0
                    } else {
                        md.mode() & 0o7777
                    },
                    owner: owners.then(|| (md.uid(), md.gid())),
                    mtime: (mtimes && !ft.is_symlink()).then(|| md.mtime()),
                },
            );
            if ft.is_dir() {
                rec(root, &p, out, owners, mtimes);
            }
        }
    }
    let mut out = BTreeMap::new();
    rec(root, root, &mut out, owners, mtimes);
    out
}

fn assert_same_trees(
    want: &BTreeMap<PathBuf, Attrs>,
    got: &BTreeMap<PathBuf, Attrs>,
    skip: impl Fn(&Attrs) -> bool,
) {
    let mut problems = Vec::new();
    for (p, a) in want {
        if skip(a) {
            continue;
        }
        match got.get(p) {
            None => problems.push(format!("{}: missing", p.display())),
            Some(b) if a != b => problems.push(format!(
                "{}: want {:?} {:o} {:?} {:?}, got {:?} {:o} {:?} {:?}",
                p.display(),
                short(&a.kind),
                a.perm,
                a.owner,
                a.mtime,
                short(&b.kind),
                b.perm,
                b.owner,
                b.mtime
            )),
            _ => {}
        }
    }
    for p in got.keys() {
        if !want.contains_key(p) {
            problems.push(format!("{}: unexpected", p.display()));
        }
    }
    assert!(
        problems.is_empty(),
        "{} differences:\n{}",
        problems.len(),
        problems[..problems.len().min(40)].join("\n")
    );
}

fn short(k: &Kind) -> String {
    match k {
        Kind::File(d) => format!("file({} bytes)", d.len()),
        other => format!("{other:?}"),
    }
}

/// xorriso refuses paths under /dev (tmpfs test dirs live there) unless told they are files.
fn stdio(p: &Path) -> String {
    format!("stdio:{}", p.display())
}

fn xorriso_extract(iso: &Path, out: &Path) {
    run_ok(
        Command::new(require_tool("xorriso"))
            .args(["-osirrox", "on", "-indev"])
            .arg(stdio(iso))
            .args(["-extract", "/"])
            .arg(out),
    );
}

#[test]
fn corpus_round_trips_through_xorriso_with_rock_ridge() {
    let dir = tempdir();
    let src = corpus(dir.path(), true);
    let tree = kiln_tree::dir::read_dir_tree(&src).unwrap();
    let iso = dir.path().join("out.iso");
    build(&tree, &options(None, false), None, &iso);

    let out = dir.path().join("xorriso");
    xorriso_extract(&iso, &out);
    // xorriso restores names, data, modes, symlinks, fifos and mtimes; as root also owners.
    // It does not create device files by default, so those are compared through our reader
    // and isoinfo below.
    let root = kiln_testkit::is_root();
    let want = snapshot(&src, root, true);
    let got = snapshot(&out, root, true);
    assert_same_trees(&want, &got, |a| {
        matches!(a.kind, Kind::Char(_) | Kind::Block(_) | Kind::Socket)
    });

    // Our reader agrees on every entry, devices included.
    let f = File::open(&iso).unwrap();
    let len = f.metadata().unwrap().len();
    let img = IsoImage::open(&f, len).unwrap();
    assert!(img
        .rock_ridge
        .as_ref()
        .unwrap()
        .extensions
        .contains(&"RRIP_1991A".to_string()));
    let entries = img.entries(&f, TreeKind::Primary).unwrap();
    // Path tables agree with the directories (isovfy does not look at them).
    img.check_path_tables(&f, TreeKind::Primary).unwrap();
    img.check_path_tables(&f, TreeKind::Joliet).unwrap();
    let want_all = snapshot(&src, true, true);
    assert_eq!(entries.len(), want_all.len());
    for e in &entries {
        let rel = PathBuf::from(std::ffi::OsStr::from_bytes_compat(&e.path[1..]));
        let a = want_all
            .get(&rel)
            .unwrap_or_else(|| panic!("{} not in source", rel.display()));
        let rr = e.rr.as_ref().unwrap();
        let (mode, _, uid, gid) = rr.px.unwrap();
        assert_eq!(
            mode & 0o7777,
            if matches!(a.kind, Kind::Link(_)) {
                mode & 0o7777
            } else {
                a.perm
            },
            "{}",
            rel.display()
        );
        assert_eq!(Some((uid, gid)), a.owner, "{}", rel.display());
        match &a.kind {
            Kind::File(d) => assert_eq!(&img.read_file(&f, e).unwrap(), d, "{}", rel.display()),
            Kind::Link(t) => assert_eq!(e.symlink(), Some(&t[..])),
            Kind::Char(r) | Kind::Block(r) => {
                let (ma, mi) = rr.device.unwrap();
                assert_eq!(
                    (ma, mi),
                    (libc_major(*r), libc_minor(*r)),
                    "{}",
                    rel.display()
                );
            }
            _ => {}
        }
        if !matches!(a.kind, Kind::Link(_)) {
            assert_eq!(rr.mtime, a.mtime, "{}", rel.display());
        }
    }
}

fn libc_major(dev: u64) -> u32 {
    (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff)) as u32
}

fn libc_minor(dev: u64) -> u32 {
    (((dev >> 12) & 0xffff_ff00) | (dev & 0xff)) as u32
}

trait FromBytesCompat {
    fn from_bytes_compat(b: &[u8]) -> &Self;
}

impl FromBytesCompat for std::ffi::OsStr {
    fn from_bytes_compat(b: &[u8]) -> &Self {
        std::os::unix::ffi::OsStrExt::from_bytes(b)
    }
}

#[test]
fn hybrid_image_passes_sgdisk_xorriso_and_blkid() {
    let dir = tempdir();
    let src = corpus(dir.path(), false);
    let tree = kiln_tree::dir::read_dir_tree(&src).unwrap();
    let esp = make_esp(dir.path());
    let iso = dir.path().join("hybrid.iso");
    let plan = build(&tree, &options(Some(&esp), true), Some(&esp), &iso);

    // El Torito: xorriso lists one UEFI no-emulation entry at the ESP's sector.
    let out = run_ok(
        Command::new(require_tool("xorriso"))
            .arg("-indev")
            .arg(stdio(&iso))
            .args(["-report_el_torito", "plain"]),
    );
    let report = String::from_utf8_lossy(&out.stdout);
    let (esp_off, esp_len) = plan.esp_range().unwrap();
    let line = report
        .lines()
        .find(|l| l.starts_with("El Torito boot img :"))
        .unwrap_or_else(|| panic!("no boot image in report:\n{report}"));
    let f: Vec<&str> = line.split_whitespace().collect();
    // "El Torito boot img : 1 UEFI y none 0x0000 0x00 8192 LBA"
    assert_eq!(&f[5..10], ["1", "UEFI", "y", "none", "0x0000"], "{line}");
    assert_eq!(f[11], (esp_len / 512).to_string(), "{line}");
    assert_eq!(f[12], (esp_off / 2048).to_string(), "{line}");

    // The ESP bytes are where El Torito and the GPT say.
    let bytes = fs::read(&iso).unwrap();
    assert_eq!(
        &bytes[esp_off as usize..(esp_off + esp_len) as usize],
        &esp[..]
    );
    // The slot-table area of the system area is untouched.
    assert!(bytes[24576..32768].iter().all(|&b| b == 0));

    // sgdisk: no problems.
    let out = run_ok(Command::new(require_tool("sgdisk")).arg("-v").arg(&iso));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("No problems found"), "{text}");

    // sfdisk: the data partition from 32 KiB to the end of the ISO data, then the ESP.
    let out = run_ok(Command::new(require_tool("sfdisk")).arg("--json").arg(&iso));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pt = &json["partitiontable"];
    assert_eq!(pt["label"], "gpt");
    assert_eq!(pt["firstlba"], 64);
    let parts: Vec<(u64, u64, String)> = pt["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["start"].as_u64().unwrap(),
                p["size"].as_u64().unwrap(),
                p["type"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let (data_start, data_end) = plan.data_range();
    assert_eq!(
        parts,
        [
            (
                data_start / 512,
                (data_end - data_start) / 512,
                "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7".to_string()
            ),
            (
                esp_off / 512,
                esp_len / 512,
                "C12A7328-F81F-11D2-BA4B-00A0C93EC93B".to_string()
            ),
        ]
    );
    // The data partition ends where the ISO 9660 data ends: the last file's extent.
    let last = plan
        .extents()
        .iter()
        .map(|e| e.offset() + u64::from(e.sectors) * 2048)
        .max();
    assert_eq!(last, Some(data_end));

    // blkid: label and the seed-derived UUID.
    let out = run_ok(Command::new(require_tool("blkid")).arg(&iso));
    let text = String::from_utf8_lossy(&out.stdout);
    let uuid = VolumeUuid::from_seed(&SEED).to_string();
    assert!(text.contains("LABEL=\"KILN_TEST\""), "{text}");
    assert!(text.contains(&format!("UUID=\"{uuid}\"")), "{text}");
    assert!(text.contains("TYPE=\"iso9660\""), "{text}");

    // The tree still extracts identically with the ESP and GPT around it.
    let out = dir.path().join("x");
    xorriso_extract(&iso, &out);
    let root = kiln_testkit::is_root();
    assert_same_trees(
        &snapshot(&src, root, true),
        &snapshot(&out, root, true),
        |a| matches!(a.kind, Kind::Char(_) | Kind::Block(_) | Kind::Socket),
    );

    // Our dump reads it all back.
    let f = File::open(&iso).unwrap();
    let d = iso9660::dump::dump(&f, bytes.len() as u64).unwrap();
    assert!(
        d.contains("platform 0xef (UEFI), bootable, media no emulation"),
        "{d}"
    );
    assert!(d.contains("ISO9660"), "{d}");
}

#[test]
fn isoinfo_reads_rock_ridge_and_joliet() {
    let dir = tempdir();
    let src = corpus(dir.path(), false);
    let tree = kiln_tree::dir::read_dir_tree(&src).unwrap();
    let iso = dir.path().join("j.iso");
    build(&tree, &options(None, false), None, &iso);
    let isoinfo = require_tool("isoinfo");

    // Rock Ridge listing: the 255-byte name and the device numbers are there.
    let out = run_ok(Command::new(&isoinfo).args(["-R", "-l", "-i"]).arg(&iso));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&"n".repeat(255)), "long name missing");
    // Rock Ridge extraction of single files, by their real names.
    for p in ["files/size-4097", "hard/y/link1", "files/space and\ttab"] {
        let out = run_ok(
            Command::new(&isoinfo)
                .args(["-R", "-i"])
                .arg(&iso)
                .arg("-x")
                .arg(format!("/{p}")),
        );
        assert_eq!(out.stdout, fs::read(src.join(p)).unwrap(), "{p}");
    }
    // Joliet: extraction by Joliet name.
    let out = run_ok(
        Command::new(&isoinfo)
            .args(["-J", "-i"])
            .arg(&iso)
            .args(["-x", "/files/size-65536"]),
    );
    assert_eq!(out.stdout, fs::read(src.join("files/size-65536")).unwrap());
    // isovfy (genisoimage) checks records, path tables and Rock Ridge entries.
    let out = run_ok(Command::new(require_tool("isovfy")).arg(&iso));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("No errors found"), "{text}");
    let out = run_ok(Command::new(&isoinfo).args(["-d", "-i"]).arg(&iso));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Joliet with UCS level 3 found"), "{text}");
    assert!(
        text.contains("Rock Ridge signatures version 1 found"),
        "{text}"
    );

    // Our Joliet reader lists every directory and regular file of the source.
    let f = File::open(&iso).unwrap();
    let img = IsoImage::open(&f, f.metadata().unwrap().len()).unwrap();
    let joliet = img.entries(&f, TreeKind::Joliet).unwrap();
    img.check_path_tables(&f, TreeKind::Primary).unwrap();
    img.check_path_tables(&f, TreeKind::Joliet).unwrap();
    // Joliet names are unique case-insensitively within each directory (Windows compares
    // them so).
    let mut seen = std::collections::HashSet::new();
    for e in &joliet {
        let parent = &e.path[..e.path.len() - e.name.len()];
        assert!(
            seen.insert((parent.to_vec(), e.name.to_ascii_lowercase())),
            "{}",
            String::from_utf8_lossy(&e.path)
        );
    }
    let want = snapshot(&src, false, false)
        .into_iter()
        .filter(|(_, a)| matches!(a.kind, Kind::Dir | Kind::File(_)))
        .count();
    assert_eq!(joliet.len(), want);
}

#[test]
fn builds_are_reproducible() {
    let a = tempdir();
    let b = tempdir();
    let mut hashes = Vec::new();
    // The ESP image is an input like the tree; mtools stamps directories with the current
    // time, so make it once.
    let esp = make_esp(a.path());
    for d in [a.path(), b.path()] {
        let src = corpus(d, false);
        let tree = kiln_tree::dir::read_dir_tree(&src).unwrap();
        let iso = d.join("r.iso");
        build(&tree, &options(Some(&esp), true), Some(&esp), &iso);
        hashes.push(fs::read(&iso).unwrap());
    }
    assert!(hashes[0] == hashes[1], "two builds differ");
}

fn slot_tree(capacity: u64, initial: &[u8]) -> Tree {
    let mut t = Tree::new(Meta {
        mtime: Timestamp::from_secs(EPOCH),
        ..Meta::default()
    });
    let m = Meta {
        perm: 0o644,
        mtime: Timestamp::from_secs(EPOCH),
        ..Meta::default()
    };
    let file = |data: &[u8]| Node {
        kind: NodeKind::File(FileData::dense(
            data.len() as u64,
            DataRef::Inline(data.to_vec().into()),
        )),
        meta: m.clone(),
        slot: None,
    };
    t.insert(b"/before.txt", file(b"before\n"), &m).unwrap();
    let mut piece = file(initial);
    piece.slot = Some(SlotReservation {
        name: "piece".into(),
        capacity,
    });
    let id = t.insert(b"/www/piece.html", piece, &m).unwrap();
    // A hardlink to the slot: its records must be patched too.
    let d = t.mkdir_p(b"/alias", &m).unwrap();
    t.link(d, b"same-piece.html", id);
    t.insert(b"/zz-after.bin", file(&pseudo_random(5, 10_000)), &m)
        .unwrap();
    t
}

#[test]
fn slot_rewrites_change_only_size_fields_and_data() {
    for slots_last in [false, true] {
        slot_rewrites(slots_last);
    }
}

fn slot_rewrites(slots_last: bool) {
    let dir = tempdir();
    let capacity = 3 * 2048 + 100;
    let tree = slot_tree(capacity, b"<p>default</p>\n");
    let iso = dir.path().join("slot.iso");
    let mut opts = options(None, false);
    opts.slots_last = slots_last;
    let plan = build(&tree, &opts, None, &iso);
    let base = fs::read(&iso).unwrap();
    let s = &plan.slots()[0];
    // With slots_last, every byte an injection rewrites lies after all other file data.
    let other_end = plan
        .extents()
        .iter()
        .filter(|e| e.lba != s.extent_lba)
        .map(|e| e.offset() + u64::from(e.sectors) * 2048)
        .max()
        .unwrap();
    let first_patch = s.record_offsets.iter().copied().min().unwrap();
    assert_eq!(
        first_patch > other_end && s.data_offset > first_patch,
        slots_last,
        "records at {:?}, slot at {}, other data ends at {other_end}",
        s.record_offsets,
        s.data_offset
    );
    assert_eq!(s.name, "piece");
    // ISO 9660 and Joliet records for both names.
    assert_eq!(s.record_offsets.len(), 4);
    // The reader finds the same records by extent.
    let img = IsoImage::open(&base, base.len() as u64).unwrap();
    assert_eq!(
        img.records_for_extent(&base, s.extent_lba).unwrap(),
        s.record_offsets
    );

    // The records check out; a wrong extent or a directory record is refused.
    slot::verify_records(&base, s.extent_lba, &s.record_offsets).unwrap();
    assert!(slot::verify_records(&base, s.extent_lba + 1, &s.record_offsets).is_err());
    let root_dot = img.primary.root_lba as u64 * 2048;
    assert!(slot::verify_records(&base, img.primary.root_lba, &[root_dot]).is_err());

    for size in [0u64, 1, 2048, capacity] {
        let payload = pseudo_random(size + 1, size as usize);
        let patches = s.payload_patches(&payload).unwrap();
        let mut img = base.clone();
        slot::apply(&mut img, &patches).unwrap();

        // Only the reserved extent and the 8-byte size fields changed.
        let allowed = |i: usize| {
            let i = i as u64;
            (i >= s.data_offset && i < s.data_offset + s.reserved_len())
                || s.record_offsets.iter().any(|&r| i >= r + 10 && i < r + 18)
        };
        for (i, (a, b)) in base.iter().zip(&img).enumerate() {
            assert!(a == b || allowed(i), "byte {i} changed for size {size}");
        }

        let path = dir.path().join(format!("slot-{size}.iso"));
        fs::write(&path, &img).unwrap();
        let out = dir.path().join(format!("x-{size}"));
        xorriso_extract(&path, &out);
        assert_eq!(fs::read(out.join("www/piece.html")).unwrap(), payload);
        assert_eq!(
            fs::read(out.join("alias/same-piece.html")).unwrap(),
            payload
        );
        assert_eq!(fs::read(out.join("before.txt")).unwrap(), b"before\n");
        assert_eq!(
            fs::read(out.join("zz-after.bin")).unwrap(),
            pseudo_random(5, 10_000)
        );
        // Joliet sees the new size too.
        let out = run_ok(
            Command::new(require_tool("isoinfo"))
                .args(["-J", "-i"])
                .arg(&path)
                .args(["-x", "/www/piece.html"]),
        );
        assert_eq!(out.stdout, payload);
    }
    assert!(s.payload_patches(&vec![0; capacity as usize + 1]).is_err());
}

#[test]
fn bad_inputs_are_clear_errors() {
    let m = Meta::default();
    // A file of 4 GiB is refused, naming it.
    let mut t = Tree::default();
    t.insert(
        b"/big/five-gib",
        Node {
            kind: NodeKind::File(FileData {
                size: 5 << 30,
                data: DataRef::Empty,
                segments: Some(Box::new([])),
            }),
            meta: m.clone(),
            slot: None,
        },
        &m,
    )
    .unwrap();
    let e = IsoPlan::new(&t, &options(None, false)).err().unwrap();
    let msg = e.to_string();
    assert!(
        msg.contains("/big/five-gib") && msg.contains("4 GiB"),
        "{msg}"
    );

    // A slot whose default content exceeds its capacity.
    let t = slot_tree(10, b"0123456789abc");
    let msg = IsoPlan::new(&t, &options(None, false))
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("piece.html") && msg.contains("capacity"),
        "{msg}"
    );

    // A directory linked twice.
    let mut t = Tree::default();
    let d = t.mkdir_p(b"/a/d", &m).unwrap();
    let b = t.mkdir_p(b"/b", &m).unwrap();
    t.link(b, b"again", d);
    let msg = IsoPlan::new(&t, &options(None, false))
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("/b/again") && msg.contains("more than one place"),
        "{msg}"
    );

    // More directories than a path table can number.
    let mut t = Tree::default();
    for i in 0..65536u32 {
        t.mkdir_p(format!("/d{:03}/{:05}", i / 1000, i).as_bytes(), &m)
            .unwrap();
    }
    let msg = IsoPlan::new(&t, &options(None, false))
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("65535"), "{msg}");

    // Bad labels.
    let t = Tree::default();
    for label in ["", "x".repeat(33).as_str(), "caf\u{e9}"] {
        let mut o = options(None, false);
        o.volume_id = label.to_string();
        assert!(IsoPlan::new(&t, &o).is_err(), "{label:?}");
    }

    // Garbage and truncated images are errors, not panics.
    let dir = tempdir();
    let src = corpus(dir.path(), false);
    let tree = kiln_tree::dir::read_dir_tree(&src).unwrap();
    let iso = dir.path().join("t.iso");
    build(&tree, &options(None, false), None, &iso);
    let good = fs::read(&iso).unwrap();
    for cut in [0usize, 16 * 2048, 17 * 2048, 21 * 2048] {
        let b = &good[..cut];
        if let Ok(img) = IsoImage::open(&b, b.len() as u64) {
            assert!(img.entries(&b, TreeKind::Primary).is_err(), "cut at {cut}");
        }
    }
    // Cut in the file data: the tree lists, reading a file past the end fails cleanly.
    let b = &good[..good.len() / 2];
    let img = IsoImage::open(&b, b.len() as u64).unwrap();
    let entries = img.entries(&b, TreeKind::Primary).unwrap();
    assert!(entries
        .iter()
        .any(|e| !e.is_dir && img.read_file(&b, e).is_err()));
    // A path table pointing a directory elsewhere is caught.
    let img = IsoImage::open(&good, good.len() as u64).unwrap();
    img.check_path_tables(&good, TreeKind::Primary).unwrap();
    let mut x = good.clone();
    let l = img.primary.l_path_table as usize * 2048;
    let second = l + 8 + 2; // root record: 8 bytes + 1-byte identifier + pad
    x[second + 2] ^= 0x01;
    let msg = img
        .check_path_tables(&x, TreeKind::Primary)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("path table entry 2"), "{msg}");

    let mut x = good.clone();
    x[16 * 2048 + 1] = b'X';
    let msg = IsoImage::open(&x, x.len() as u64)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("32769"), "{msg}");
    // Flip bytes all over the metadata: any outcome but a panic is fine.
    let meta_end = 64 * 2048;
    for i in (16 * 2048..meta_end.min(good.len())).step_by(97) {
        let mut x = good.clone();
        x[i] ^= 0xA5;
        if let Ok(img) = IsoImage::open(&x, x.len() as u64) {
            let _ = img.entries(&x, TreeKind::Primary);
            let _ = img.entries(&x, TreeKind::Joliet);
        }
    }
}

#[test]
fn kernel_isofs_reads_the_image() {
    if !kiln_testkit::is_root() {
        eprintln!("SKIPPED kernel_isofs_reads_the_image: loop mounts need root");
        return;
    }
    let _ = run(Command::new("modprobe").arg("isofs"));
    let fs_list = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !fs_list.lines().any(|l| l.trim_end().ends_with("iso9660")) {
        eprintln!(
            "SKIPPED kernel_isofs_reads_the_image: the running kernel has no iso9660 support \
             (the QEMU boot test covers the kernel's reading)"
        );
        return;
    }
    let dir = tempdir();
    let src = corpus(dir.path(), false);
    let tree = kiln_tree::dir::read_dir_tree(&src).unwrap();
    let esp = make_esp(dir.path());
    let iso = dir.path().join("k.iso");
    build(&tree, &options(Some(&esp), true), Some(&esp), &iso);
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let out = run(Command::new("mount")
        .args(["-o", "loop,ro", "-t", "iso9660"])
        .arg(&iso)
        .arg(&mnt));
    if !out.status.success() {
        panic!("mount failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let got = snapshot(&mnt, true, true);
    let _ = run(Command::new("umount").arg(&mnt));
    // The kernel shows everything, devices included, with Rock Ridge attributes.
    assert_same_trees(&snapshot(&src, true, true), &got, |a| {
        matches!(a.kind, Kind::Socket)
    });
}

/// Boots `image` under OVMF (TCG) with `drive` arguments until `marker` appears on the serial
/// console; returns the seconds it took, or panics with the console tail after `limit`.
fn boot_until(image: &Path, drive: &[String], marker: &str, limit: u64) -> f64 {
    use std::io::Read;
    use std::sync::{Arc, Mutex};
    let code = Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd");
    let vars_src = Path::new("/usr/share/OVMF/OVMF_VARS_4M.fd");
    assert!(
        code.is_file() && vars_src.is_file(),
        "OVMF missing; .ci/run installs ovmf"
    );
    let vars = image.with_extension("vars.fd");
    fs::copy(vars_src, &vars).unwrap();
    let start = std::time::Instant::now();
    let mut child = Command::new(require_tool("qemu-system-x86_64"))
        .args(["-machine", "q35", "-m", "256", "-nographic", "-no-reboot"])
        .args(["-serial", "mon:stdio"])
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,readonly=on,file={}",
            code.display()
        ))
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,file={}", vars.display()))
        .args(drive)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(Vec::<u8>::new()));
    let mut stdout = child.stdout.take().unwrap();
    let sink = log.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let found = loop {
        let seen = {
            let l = log.lock().unwrap();
            l.windows(marker.len()).any(|w| w == marker.as_bytes())
        };
        if seen {
            break true;
        }
        if start.elapsed().as_secs() > limit || child.try_wait().unwrap().is_some() {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let secs = start.elapsed().as_secs_f64();
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    if !found {
        let l = log.lock().unwrap();
        let tail = String::from_utf8_lossy(&l[l.len().saturating_sub(3000)..]).into_owned();
        panic!("{marker:?} not seen within {limit} s; console tail:\n{tail}");
    }
    secs
}

#[test]
fn ovmf_boots_systemd_boot_from_the_cd_and_from_the_disk() {
    let dir = tempdir();
    let marker = "Boot in 17 s.";
    let cd_args = |iso: &Path| -> Vec<String> {
        vec![
            "-drive".into(),
            format!(
                "file={},media=cdrom,if=none,id=cd,snapshot=on",
                iso.display()
            ),
            "-device".into(),
            "ide-cd,drive=cd".into(),
        ]
    };
    let tree = slot_tree(4096, b"<p>hello</p>\n");

    // An 8 MiB ESP: El Torito counts it exactly (16384 x 512 bytes).
    let small = make_esp(dir.path());
    let iso = dir.path().join("small.iso");
    build(&tree, &options(Some(&small), true), Some(&small), &iso);
    let cd_small = boot_until(&iso, &cd_args(&iso), marker, 240);

    // A 48 MiB ESP with the boot files beyond 32 MiB: the 16-bit count cannot say its size,
    // so it is 0 and the firmware must map the image to the end of the volume.
    let big = make_esp_sized(dir.path(), 48 << 10, 36);
    let iso = dir.path().join("big.iso");
    let plan = build(&tree, &options(Some(&big), true), Some(&big), &iso);
    let f = File::open(&iso).unwrap();
    let img = IsoImage::open_file(&f).unwrap();
    assert_eq!(img.boot.as_ref().unwrap().images[0].sector_count, 0);
    let cd_big = boot_until(&iso, &cd_args(&iso), marker, 240);

    // As a disk, with the boot catalog wiped so only the GPT's ESP partition can work.
    let disk_img = dir.path().join("disk.img");
    let mut bytes = fs::read(&iso).unwrap();
    let cat = img.boot.as_ref().unwrap().lba as usize * 2048;
    bytes[cat..cat + 2048].fill(0);
    fs::write(&disk_img, &bytes).unwrap();
    let disk = boot_until(
        &disk_img,
        &[
            "-drive".into(),
            format!(
                "file={},format=raw,if=virtio,snapshot=on",
                disk_img.display()
            ),
        ],
        marker,
        240,
    );
    eprintln!(
        "OVMF (TCG) reached systemd-boot: CD {cd_small:.1} s (8 MiB ESP), CD {cd_big:.1} s \
         (48 MiB ESP), disk {disk:.1} s ({} byte image)",
        plan.size()
    );
}

#[test]
fn linux_isofs_reads_rock_ridge_in_qemu() {
    let dir = tempdir();
    let src = corpus(dir.path(), false);
    // Symlinks whose SL entries need chained continuation areas (more than one sector of
    // System Use data). libisofs refuses targets over 1024 bytes, so only this test has them.
    let long_target: Vec<String> = (0..15)
        .map(|i| format!("{i:02}{}", "c".repeat(198)))
        .collect();
    std::os::unix::fs::symlink(long_target.join("/"), src.join("links/very-long")).unwrap();
    std::os::unix::fs::symlink(
        "/".to_string() + &"y".repeat(3500),
        src.join("links/one-component"),
    )
    .unwrap();
    let tree = kiln_tree::dir::read_dir_tree(&src).unwrap();
    let iso = dir.path().join("linux.iso");
    build(&tree, &options(None, true), None, &iso);

    // The Debian kernel in a guest mounts it and shows every entry (kiln_testkit::oracle: modes,
    // owners, times, links, devices, bytes; isofs's own limits on names and times applied).
    let want = kiln_testkit::oracle::scan(&src);
    let got = kiln_testkit::oracle::guest_read(&[(&iso, Fs::Iso9660)]);
    kiln_testkit::oracle::assert_same("Linux isofs (Rock Ridge)", &want, &got[0], Fs::Iso9660);
}

mod random_trees {
    use super::*;
    use kiln_formats::iso9660::names::cmp_identifiers;
    use kiln_formats::sink::MemSink;
    use proptest::prelude::*;

    /// Name bytes chosen to collide after ISO and Joliet mapping: case, dots, punctuation,
    /// non-ASCII and invalid UTF-8.
    fn name() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop_oneof![
                Just(b'a'),
                Just(b'A'),
                Just(b'b'),
                Just(b'.'),
                Just(b'-'),
                Just(b' '),
                Just(b';'),
                Just(b'1'),
                Just(0xC3),
                Just(0xA9),
                Just(0xFF),
            ],
            1..30,
        )
        .prop_filter("not . or ..", |n| n != b"." && n != b"..")
    }

    #[derive(Clone, Debug)]
    enum Kind {
        File(Vec<u8>),
        Dir,
        Link(Vec<u8>),
        Fifo,
        HardlinkToFirstFile,
    }

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![
            4 => proptest::collection::vec(any::<u8>(), 0..5000).prop_map(Kind::File),
            3 => Just(Kind::Dir),
            1 => proptest::collection::vec(1u8..=255, 1..300).prop_map(Kind::Link),
            1 => Just(Kind::Fifo),
            1 => Just(Kind::HardlinkToFirstFile),
        ]
    }

    fn build_tree(spec: &[(Vec<Vec<u8>>, Kind)]) -> Tree {
        let m = Meta {
            perm: 0o755,
            mtime: Timestamp::from_secs(EPOCH),
            ..Meta::default()
        };
        let mut t = Tree::new(m.clone());
        let mut first_file = None;
        for (comps, kind) in spec {
            let path = comps.join(&b'/');
            let (parent, name) = kiln_formats::fstree::split_parent(&path);
            let Ok(dir) = t.mkdir_p(parent, &m) else {
                continue;
            };
            if t.lookup(dir, name).is_some() {
                continue;
            }
            let nk = match kind {
                Kind::File(d) => NodeKind::File(FileData::dense(
                    d.len() as u64,
                    DataRef::Inline(d.clone().into()),
                )),
                Kind::Dir => NodeKind::Dir(Vec::new()),
                Kind::Link(target) => NodeKind::Symlink(target.clone().into()),
                Kind::Fifo => NodeKind::Fifo,
                Kind::HardlinkToFirstFile => match first_file {
                    Some(id) => {
                        t.link(dir, name, id);
                        continue;
                    }
                    None => continue,
                },
            };
            let is_file = matches!(nk, NodeKind::File(_));
            let id = t
                .insert(
                    &path,
                    Node {
                        kind: nk,
                        meta: m.clone(),
                        slot: None,
                    },
                    &m,
                )
                .unwrap();
            if is_file && first_file.is_none() {
                first_file = Some(id);
            }
        }
        t
    }

    /// A small image with every record kind, Rock Ridge continuation areas, Joliet, El
    /// Torito and a GPT, to corrupt.
    fn sample_image() -> Vec<u8> {
        let spec = vec![
            (
                vec![b"dir".to_vec(), vec![b'n'; 250]],
                Kind::File(vec![1; 3000]),
            ),
            (
                vec![b"dir".to_vec(), b"link".to_vec()],
                Kind::Link(vec![b'x'; 700]),
            ),
            (vec![b"fifo".to_vec()], Kind::Fifo),
            (vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()], Kind::Dir),
            (vec![b"hard".to_vec()], Kind::HardlinkToFirstFile),
        ];
        let tree = build_tree(&spec);
        let esp = vec![0xEEu8; 64 << 10];
        let opts = options(Some(&esp), true);
        let plan = IsoPlan::new(&tree, &opts).unwrap();
        let sink = MemSink::new(plan.size() as usize);
        plan.write(&tree, &HostContents, Some(&esp), &sink).unwrap();
        sink.into_inner()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
        /// Corrupted images give errors or odd listings, never panics or hangs.
        #[test]
        fn corrupt_images_never_panic(
            edits in proptest::collection::vec((0usize..(40 * 2048), any::<u8>()), 1..12)
        ) {
            thread_local! {
                static BASE: Vec<u8> = sample_image();
            }
            let mut img = BASE.with(|b| b.clone());
            for (pos, val) in edits {
                let pos = pos % img.len();
                img[pos] = val;
            }
            let len = img.len() as u64;
            if let Ok(iso) = IsoImage::open(&img, len) {
                for kind in [TreeKind::Primary, TreeKind::Joliet] {
                    if let Ok(entries) = iso.entries(&img, kind) {
                        for e in entries.iter().take(20) {
                            let _ = iso.read_file(&img, e);
                        }
                    }
                    let _ = iso.check_path_tables(&img, kind);
                }
                let _ = iso.records_for_extent(&img, 40);
            }
            let _ = kiln_formats::iso9660::dump::dump(&img, len);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]
        #[test]
        fn random_trees_read_back_exactly(
            spec in proptest::collection::vec(
                (proptest::collection::vec(name(), 1..4), kind()),
                1..60,
            )
        ) {
            let tree = build_tree(&spec);
            let opts = options(None, true);
            let plan = IsoPlan::new(&tree, &opts).unwrap();
            let sink = MemSink::new(plan.size() as usize);
            plan.write(&tree, &HostContents, None, &sink).unwrap();
            let img_bytes = sink.into_inner();
            let img = IsoImage::open(&img_bytes, img_bytes.len() as u64).unwrap();
            img.check_path_tables(&img_bytes, TreeKind::Primary).unwrap();
            img.check_path_tables(&img_bytes, TreeKind::Joliet).unwrap();

            // Every path of the tree, with its kind and bytes, and nothing else.
            let mut want: BTreeMap<Vec<u8>, NodeKind> = BTreeMap::new();
            tree.walk_paths(|p, id| {
                if p != b"/" {
                    want.insert(p.to_vec(), tree.node(id).kind.clone());
                }
            });
            // walk_paths names a hardlinked node once; add the other names.
            fn all_paths(t: &Tree, dir: u32, prefix: &[u8], out: &mut BTreeMap<Vec<u8>, NodeKind>) {
                for e in t.entries(dir) {
                    let mut p = prefix.to_vec();
                    p.push(b'/');
                    p.extend_from_slice(&e.name);
                    out.insert(p.clone(), t.node(e.node).kind.clone());
                    if t.node(e.node).is_dir() {
                        all_paths(t, e.node, &p, out);
                    }
                }
            }
            want.clear();
            all_paths(&tree, 0, b"", &mut want);

            let entries = img.entries(&img_bytes, TreeKind::Primary).unwrap();
            prop_assert_eq!(entries.len(), want.len());
            let mut by_dir: BTreeMap<Vec<u8>, Vec<Vec<u8>>> = BTreeMap::new();
            for e in &entries {
                let k = want.get(&e.path);
                prop_assert!(k.is_some(), "unexpected {:?}", String::from_utf8_lossy(&e.path));
                match k.unwrap() {
                    NodeKind::File(fd) => {
                        let DataRef::Inline(d) = &fd.data else {
                            prop_assert_eq!(fd.size, 0);
                            prop_assert_eq!(e.size, 0);
                            continue;
                        };
                        prop_assert_eq!(&img.read_file(&img_bytes, e).unwrap()[..], &d[..]);
                    }
                    NodeKind::Symlink(t) => prop_assert_eq!(e.symlink(), Some(&t[..])),
                    NodeKind::Dir(_) => prop_assert!(e.is_dir),
                    NodeKind::Fifo => prop_assert_eq!(e.mode() & 0o170000, 0o010000),
                    _ => {}
                }
                let parent = e.path[..e.path.len() - e.name.len()].to_vec();
                by_dir.entry(parent).or_default().push(e.identifier.clone());
            }
            // Identifiers are unique and in ECMA-119 order within each directory.
            for ids in by_dir.values() {
                for w in ids.windows(2) {
                    prop_assert_eq!(cmp_identifiers(&w[0], &w[1]), std::cmp::Ordering::Less);
                }
            }
            // Joliet: directories and regular files, names unique case-insensitively.
            let joliet = img.entries(&img_bytes, TreeKind::Joliet).unwrap();
            let n_jol = want
                .values()
                .filter(|k| matches!(k, NodeKind::Dir(_) | NodeKind::File(_)))
                .count();
            prop_assert_eq!(joliet.len(), n_jol);
            let mut seen = std::collections::HashSet::new();
            for e in &joliet {
                let parent = e.path[..e.path.len() - e.name.len()].to_vec();
                prop_assert!(seen.insert((parent, e.name.to_ascii_lowercase())));
            }
        }
    }
}
