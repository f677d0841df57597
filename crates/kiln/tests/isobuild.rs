//! `kiln build` with `output = ["iso"]`: a kiosk tree (busybox, the machine's Debian kernel and
//! modules, an init that shows the page from the medium) becomes a hybrid live ISO. Checked
//! with the reference tools (sgdisk, xorriso, fsck.erofs, veritysetup), injected with
//! `kiln inject`, and booted under OVMF in QEMU as a plain disk (the bytes a user writes to a
//! USB stick; Debian's cloud kernel has no USB storage or AHCI driver, so the "stick" is a
//! virtio disk) and as a CD (virtio-scsi).
//!
//! The reference tools, QEMU, OVMF, the kernel and systemd-boot are required: CI installs them
//! (.ci/run); a missing one fails the test with its name.

#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

use kiln_testkit::{
    host_kernel_version as kernel_version, process_dir, require_tool as tool, run_ok as run,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// TCG boots are CPU-bound; two at once only make both slow.
static QEMU: Mutex<()> = Mutex::new(());

const DEFAULT_PAGE: &str = "<h1>kiosk: default piece</h1>\n";
const INJECTED_PAGE: &str =
    "<html><body><h1>injected piece #42</h1><p>shown from the medium</p></body></html>\n";

const INIT: &str = r#"#!/bin/sh
echo KIOSK-MARKER
echo "PAGE[$(cat /run/kiln/medium/piece.html)]"
if [ -e /var/kiosk-state ]; then echo "STATE-SURVIVED $(cat /var/kiosk-state)"; else echo STATE-FRESH; fi
if echo first-boot > /var/kiosk-state && sync && [ "$(cat /var/kiosk-state)" = first-boot ]; then echo STATE-WRITTEN; fi
if echo x > /run/kiln/medium/probe 2>/dev/null; then echo MEDIUM-WRITABLE; else echo MEDIUM-READONLY; fi
grep -E " / | /run/kiln/medium " /proc/mounts
echo KIOSK-DONE
poweroff -f
"#;

const SPEC: &str = r#"[image]
name = "kiosk"
version = "1"
seed = "6b696c6e2d6b696f736b2d69736f2d31"
source_date_epoch = 1767225600
output = ["iso"]

[source]
tree = "tree"
all_root = true

[boot]
cmdline = "console=ttyS0 panic=-1"
timeout = 0

[[partition]]
type = "root"
fs = "erofs"
compression = "lz4"
verity = true

[[partition]]
type = "linux-generic"
label = "piece"
fs = "ext4"
size = "4M"
slot = { name = "piece", path = "/piece.html", capacity = "64K", default = "piece.html" }
"#;

fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

fn sha256_file(p: &Path) -> String {
    let mut h = Sha256::new();
    let mut f = fs::File::open(p).unwrap();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

/// Copies the regular files and directories below `from` to `to` (symlinks such as
/// `build` point outside the module tree and are left out).
fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = e.file_type().unwrap();
        let dst = to.join(e.file_name());
        if t.is_dir() {
            copy_tree(&e.path(), &dst);
        } else if t.is_file() {
            fs::copy(e.path(), &dst).unwrap();
        }
    }
}

struct Fixture {
    dir: PathBuf,
    /// The project directory (kiln.toml, piece.html, tree/).
    project: PathBuf,
    /// The build report.
    report: Value,
    /// The ISO.
    iso: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(build_fixture)
}

fn build_fixture() -> Fixture {
    let dir = process_dir(Path::new(env!("CARGO_TARGET_TMPDIR")), "isobuild");
    let project = dir.join("kiosk");
    let tree = project.join("tree");
    for d in [
        "bin", "sbin", "etc", "proc", "sys", "dev", "run", "var", "tmp", "boot",
    ] {
        fs::create_dir_all(tree.join(d)).unwrap();
    }
    fs::copy(tool("busybox"), tree.join("bin/busybox")).unwrap();
    for a in ["sh", "cat", "echo", "grep", "poweroff", "sync", "["] {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(a)).unwrap();
    }
    fs::write(tree.join("sbin/init"), INIT).unwrap();
    fs::set_permissions(tree.join("sbin/init"), fs::Permissions::from_mode(0o755)).unwrap();
    let ver = kernel_version();
    fs::copy(
        format!("/boot/vmlinuz-{ver}"),
        tree.join(format!("boot/vmlinuz-{ver}")),
    )
    .unwrap();
    copy_tree(
        Path::new(&format!("/usr/lib/modules/{ver}")),
        &tree.join(format!("usr/lib/modules/{ver}")),
    );
    fs::write(project.join("piece.html"), DEFAULT_PAGE).unwrap();
    fs::write(project.join("kiln.toml"), SPEC).unwrap();

    let out = build(&project, &dir.join("out"));
    let report: Value = serde_json::from_slice(&fs::read(out.join("kiosk.json")).unwrap()).unwrap();
    // The ISO section (live boot, verity file, hybrid GPT) follows the report's schema.
    kiln_testkit::schema::assert_valid("build", &report);
    let iso = out.join("kiosk_1.iso");
    assert!(iso.is_file(), "{report}");
    Fixture {
        dir,
        project,
        report,
        iso,
    }
}

fn build(project: &Path, out: &Path) -> PathBuf {
    let t = std::time::Instant::now();
    let o = run(kiln().arg("build").arg(project).arg("-o").arg(out));
    eprintln!(
        "kiln build (iso) in {:.1} s:\n{}",
        t.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&o.stderr)
    );
    out.to_path_buf()
}

fn mode_of(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

fn xorriso_extract(iso: &Path, to: &Path) {
    let _ = fs::remove_dir_all(to);
    run(Command::new(tool("xorriso"))
        .args(["-osirrox", "on", "-indev"])
        .arg(iso)
        .args(["-extract", "/"])
        .arg(to));
}

/// The report, the reference tools' view of the ISO, and what every file holds.
#[test]
fn iso_passes_sgdisk_xorriso_erofs_and_verity_checks() {
    let fx = fixture();
    let r = &fx.report;
    let iso = &r["iso"];
    assert!(
        r.get("disk").is_none(),
        "an ISO-only spec builds no disk: {r}"
    );
    assert_eq!(iso["file"], "kiosk_1.iso");
    assert_eq!(
        iso["size"].as_u64().unwrap(),
        fs::metadata(&fx.iso).unwrap().len()
    );
    assert_eq!(
        iso["digest"].as_str().unwrap(),
        format!("sha256:{}", sha256_file(&fx.iso))
    );
    let cmdline = iso["boot"]["cmdline"].as_str().unwrap();
    let root_hash = iso["verity"]["root_hash"].as_str().unwrap();
    assert_eq!(
        cmdline,
        format!("console=ttyS0 panic=-1 kiln.live=kiosk_1 roothash={root_hash} systemd.verity=no")
    );
    for m in ["isofs", "loop", "overlay", "erofs"] {
        assert!(
            iso["boot"]["modules"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x == m),
            "{m} missing from the live initrd: {}",
            iso["boot"]
        );
    }

    // The hybrid GPT.
    let v = run(Command::new(tool("sgdisk")).arg("-v").arg(&fx.iso));
    let v = String::from_utf8_lossy(&v.stdout);
    assert!(v.contains("No problems found"), "sgdisk -v:\n{v}");
    let p = run(Command::new(tool("sgdisk")).arg("-p").arg(&fx.iso));
    let p = String::from_utf8_lossy(&p.stdout);
    assert!(p.contains("EF00"), "no ESP in the hybrid GPT:\n{p}");
    let esp = &iso["esp"];
    let parts = iso["partitions"].as_array().unwrap();
    assert!(
        parts.iter().any(|x| x["role"] == "esp"
            && x["offset"] == esp["offset"]
            && x["size"] == esp["size"]),
        "{parts:?} vs {esp}"
    );

    // El Torito: the UEFI entry, pointing at the ESP.
    let et = run(Command::new(tool("xorriso"))
        .arg("-indev")
        .arg(&fx.iso)
        .args(["-report_el_torito", "plain"]));
    let et = String::from_utf8_lossy(&et.stdout);
    let uefi = et
        .lines()
        .find(|l| l.starts_with("El Torito boot img :") && l.contains("UEFI"))
        .unwrap_or_else(|| panic!("no UEFI El Torito entry:\n{et}"));
    eprintln!("{et}");
    let esp_lba = esp["offset"].as_u64().unwrap() / 2048;
    assert!(
        uefi.split_whitespace().any(|w| w == esp_lba.to_string()),
        "UEFI entry does not start at LBA {esp_lba}: {uefi}"
    );

    // Every file, with its Rock Ridge name and mode, by xorriso.
    let x = fx.dir.join("extract");
    xorriso_extract(&fx.iso, &x);
    let mut names: Vec<String> = Vec::new();
    fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let rel = e.path().strip_prefix(base).unwrap().display().to_string();
            out.push(rel);
            if e.file_type().unwrap().is_dir() {
                walk(base, &e.path(), out);
            }
        }
    }
    walk(&x, &x, &mut names);
    names.sort();
    assert_eq!(
        names,
        [
            "live",
            "live/root.img",
            "live/root.img.verity",
            "piece.html"
        ],
        "ISO tree"
    );
    assert_eq!(
        fs::read_to_string(x.join("piece.html")).unwrap(),
        DEFAULT_PAGE
    );
    let mode = |p: &str| mode_of(&x.join(p));
    assert_eq!(mode("live"), 0o755);
    assert_eq!(mode("live/root.img"), 0o444);
    assert_eq!(mode("live/root.img.verity"), 0o444);
    // The slot file keeps the mode of its default in the tree (regular, readable), and is
    // dated like the rest of the medium.
    assert_eq!(mode("piece.html") & 0o444, 0o444);
    let mtime = |p: &str| {
        fs::metadata(x.join(p))
            .unwrap()
            .modified()
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    assert_eq!(mtime("piece.html"), 1_767_225_600);
    assert_eq!(mtime("live/root.img"), 1_767_225_600);
    // The bytes at the reported extents are the extracted files.
    let f = fs::File::open(&fx.iso).unwrap();
    for (what, file) in [
        (&iso["root"], "live/root.img"),
        (&iso["verity"]["file"], "live/root.img.verity"),
    ] {
        let want = fs::read(x.join(file)).unwrap();
        assert_eq!(want.len() as u64, what["size"].as_u64().unwrap(), "{file}");
        let mut got = vec![0u8; want.len()];
        f.read_exact_at(&mut got, what["offset"].as_u64().unwrap())
            .unwrap();
        assert!(got == want, "{file} differs from its reported extent");
    }

    // The root image: fsck.erofs, and dm-verity as veritysetup computes it.
    let img = x.join("live/root.img");
    run(Command::new(tool("fsck.erofs")).arg(&img));
    let vf = run(Command::new(tool("veritysetup"))
        .arg("verify")
        .arg(&img)
        .arg(x.join("live/root.img.verity"))
        .arg(root_hash));
    let _ = vf;
    // The EROFS holds the tree: the init script and the kernel, byte for byte.
    let ex = fx.dir.join("extract-root");
    let _ = fs::remove_dir_all(&ex);
    run(Command::new(tool("fsck.erofs"))
        .arg(format!("--extract={}", ex.display()))
        .arg(&img));
    assert_eq!(fs::read_to_string(ex.join("sbin/init")).unwrap(), INIT);
    assert_eq!(mode_of(&ex.join("sbin/init")), 0o755);
    let ver = kernel_version();
    assert!(
        fs::read(ex.join(format!("boot/vmlinuz-{ver}"))).unwrap()
            == fs::read(format!("/boot/vmlinuz-{ver}")).unwrap()
    );
    let _ = fs::remove_dir_all(&ex);

    // kiln inspect shows the boot catalog, the GPT and the slot.
    let ins = run(kiln().arg("inspect").arg(&fx.iso));
    let ins = String::from_utf8_lossy(&ins.stdout);
    eprintln!("{ins}");
    for want in [
        "El Torito boot catalog:",
        "entry 0: UEFI bootable no-emulation",
        "= GPT partition 2 (esp)",
        "piece        iso9660  /piece.html",
    ] {
        assert!(ins.contains(want), "kiln inspect lacks {want:?}:\n{ins}");
    }
    let _ = &fx.project;
}

/// Same inputs, same bytes.
#[test]
fn two_builds_give_identical_isos() {
    let fx = fixture();
    let again = build(&fx.project, &fx.dir.join("out2"));
    let b = again.join("kiosk_1.iso");
    assert_eq!(
        sha256_file(&fx.iso),
        sha256_file(&b),
        "the ISO differs between two builds"
    );
    {
        let side = "kiosk_1.iso.slots.json";
        let a = fx.iso.with_file_name(side);
        assert!(a.is_file(), "{} missing", a.display());
        assert_eq!(
            fs::read(&a).unwrap(),
            fs::read(again.join(side)).unwrap(),
            "{side}"
        );
    }
    let _ = fs::remove_dir_all(&again);
}

/// `output = ["disk", "iso"]`: one build writes both from the same tree; both pass sgdisk, the
/// provenance names both, and they share no GPT GUID (both may be attached to one machine).
#[test]
fn disk_and_iso_from_one_spec() {
    let fx = fixture();
    let project = fx.dir.join("both");
    fs::create_dir_all(&project).unwrap();
    fs::copy(fx.project.join("piece.html"), project.join("piece.html")).unwrap();
    let spec = SPEC
        .replace(r#"output = ["iso"]"#, r#"output = ["disk", "iso"]"#)
        .replace(r#"tree = "tree""#, r#"tree = "../kiosk/tree""#)
        .replace(
            "[[partition]]\ntype = \"root\"",
            "[[partition]]\ntype = \"esp\"\nsize = \"48M\"\n\n[[partition]]\ntype = \"root\"",
        );
    assert!(spec.contains("\"disk\", \"iso\"") && spec.contains("type = \"esp\""));
    fs::write(project.join("kiln.toml"), spec).unwrap();
    let out = build(&project, &fx.dir.join("out-both"));
    let r: Value = serde_json::from_slice(&fs::read(out.join("kiosk.json")).unwrap()).unwrap();
    let disk = out.join(r["disk"]["file"].as_str().unwrap());
    let iso = out.join(r["iso"]["file"].as_str().unwrap());
    for img in [&disk, &iso] {
        let v = run(Command::new(tool("sgdisk")).arg("-v").arg(img));
        assert!(
            String::from_utf8_lossy(&v.stdout).contains("No problems found"),
            "{}",
            img.display()
        );
    }
    assert_eq!(
        r["iso"]["digest"].as_str().unwrap(),
        format!("sha256:{}", sha256_file(&iso))
    );
    assert_eq!(
        r["disk"]["digest"].as_str().unwrap(),
        format!("sha256:{}", sha256_file(&disk))
    );
    let disk_guids: Vec<&str> = std::iter::once(r["disk_uuid"].as_str().unwrap())
        .chain(
            r["partitions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["uuid"].as_str().unwrap()),
        )
        .collect();
    let iso_guids: Vec<&str> = std::iter::once(r["iso"]["disk_uuid"].as_str().unwrap())
        .chain(
            r["iso"]["partitions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["uuid"].as_str().unwrap()),
        )
        .collect();
    assert!(
        iso_guids.iter().all(|g| !disk_guids.contains(g)),
        "{disk_guids:?} vs {iso_guids:?}"
    );
    let prov = fs::read_to_string(out.join("kiosk_1.provenance.json")).unwrap();
    assert!(prov.contains("kiosk_1.iso") && prov.contains(r["disk"]["file"].as_str().unwrap()));
    // The disk's boot is the installed kind (root= by DPS), the ISO's the live one.
    assert!(!r["boot"]["cmdline"]
        .as_str()
        .unwrap()
        .contains("kiln.live="));
    assert!(r["iso"]["boot"]["cmdline"]
        .as_str()
        .unwrap()
        .contains("kiln.live=kiosk_1"));
    let _ = fs::remove_dir_all(&out);
}

/// Injecting a page into the ISO's slot: only the slot's extent and the size fields of its
/// directory records change; in place, `-o FILE` and `-o -` agree; xorriso reads the new page.
fn inject(fx: &Fixture, page: &Path, name: &str) -> PathBuf {
    let out = fx.dir.join(name);
    run(kiln()
        .arg("inject")
        .arg(&fx.iso)
        .arg("--slot")
        .arg(format!("piece={}", page.display()))
        .arg("-o")
        .arg(&out));
    out
}

#[test]
fn injection_patches_only_the_slot_and_its_records() {
    let fx = fixture();
    let page = fx.dir.join("injected.html");
    fs::write(&page, INJECTED_PAGE).unwrap();
    let base_sha = sha256_file(&fx.iso);
    let a = inject(fx, &page, "inj-o.iso");
    assert_eq!(sha256_file(&fx.iso), base_sha, "the base ISO was modified");

    // -o -
    let stdout = fx.dir.join("inj-stdout.iso");
    let f = fs::File::create(&stdout).unwrap();
    let st = kiln()
        .arg("inject")
        .arg(&fx.iso)
        .arg("--slot")
        .arg(format!("piece={}", page.display()))
        .args(["-o", "-"])
        .stdout(Stdio::from(f))
        .status()
        .unwrap();
    assert!(st.success());
    // --in-place on a copy
    let inplace = fx.dir.join("inj-inplace.iso");
    fs::copy(&fx.iso, &inplace).unwrap();
    run(kiln()
        .arg("inject")
        .arg(&inplace)
        .arg("--slot")
        .arg(format!("piece={}", page.display()))
        .arg("--in-place"));
    let sa = sha256_file(&a);
    assert_eq!(sa, sha256_file(&stdout), "-o FILE and -o - differ");
    assert_eq!(sa, sha256_file(&inplace), "-o FILE and --in-place differ");
    assert_ne!(sa, base_sha);

    // Which bytes changed: only the slot's reserved extent and the 8-byte size field of each
    // directory record of the slot.
    let slot = &fx.report["iso"]["slots"][0];
    assert_eq!(slot["name"], "piece");
    let data = &slot["data"][0];
    let (d_off, d_len) = (
        data["offset"].as_u64().unwrap(),
        data["size"].as_u64().unwrap(),
    );
    let records: Vec<u64> = slot["meta"]["record_offsets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(records.len(), 2, "an ISO 9660 and a Joliet record: {slot}");
    // The records and the slot's extent come after the root image and its verity tree, so a
    // personalised ISO's sha256 resumes from the base's midstate before them.
    let iso = &fx.report["iso"];
    for big in [&iso["root"], &iso["verity"]["file"]] {
        let end = big["offset"].as_u64().unwrap() + big["size"].as_u64().unwrap();
        assert!(
            records.iter().all(|&r| r > end) && d_off > end,
            "slot records {records:?} / data {d_off} before a big file ending at {end}"
        );
    }
    let base = fs::read(&fx.iso).unwrap();
    let new = fs::read(&a).unwrap();
    assert_eq!(base.len(), new.len());
    let mut changed_outside = Vec::new();
    let mut changed_records = 0;
    for (i, (x, y)) in base.iter().zip(&new).enumerate() {
        if x == y {
            continue;
        }
        let i = i as u64;
        if (d_off..d_off + d_len).contains(&i) {
            continue;
        }
        if records.iter().any(|&r| (r + 10..r + 18).contains(&i)) {
            changed_records += 1;
            continue;
        }
        changed_outside.push(i);
    }
    assert!(
        changed_outside.is_empty(),
        "bytes changed outside the slot: {:?}",
        &changed_outside[..changed_outside.len().min(20)]
    );
    assert!(changed_records > 0, "no record size field changed");
    assert_eq!(
        &new[d_off as usize..d_off as usize + INJECTED_PAGE.len()],
        INJECTED_PAGE.as_bytes()
    );
    assert!(
        new[d_off as usize + INJECTED_PAGE.len()..(d_off + d_len) as usize]
            .iter()
            .all(|&b| b == 0)
    );

    // The reference tools: xorriso reads the new page byte for byte; the GPT stays clean.
    let x = fx.dir.join("extract-injected");
    xorriso_extract(&a, &x);
    assert_eq!(
        fs::read(x.join("piece.html")).unwrap(),
        INJECTED_PAGE.as_bytes()
    );
    let v = run(Command::new(tool("sgdisk")).arg("-v").arg(&a));
    assert!(String::from_utf8_lossy(&v.stdout).contains("No problems found"));
    for p in [stdout, inplace] {
        let _ = fs::remove_file(p);
    }
}

/// `kiln serve` streams the ISO with a piece injected, byte-identical to `kiln inject -o`.
#[test]
fn kiln_serve_streams_the_injected_iso() {
    let fx = fixture();
    let pieces = fx.dir.join("pieces");
    fs::create_dir_all(&pieces).unwrap();
    let page = pieces.join("hello.html");
    fs::write(&page, INJECTED_PAGE).unwrap();
    let want = fs::read(inject(fx, &page, "serve-want.iso")).unwrap();
    let cfg = fx.dir.join("serve.toml");
    fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\nuploads = \"{up}\"\n\
             [[image]]\nname = \"kiosk\"\nbase = \"{base}\"\nslot = \"piece\"\n\
             extension = \"iso\"\nfilename = \"kiosk-{{piece}}.iso\"\n\
             [[source]]\nkind = \"dir\"\npath = \"{pieces}\"\nextension = \".html\"\n",
            up = fx.dir.join("uploads").display(),
            base = fx.iso.display(),
            pieces = pieces.display(),
        ),
    )
    .unwrap();
    let srv = common::KilnServer::start(&cfg);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (status, cd, body) = rt.block_on(async {
        let r = reqwest::get(format!("{}/os/kiosk/hello.iso", srv.url))
            .await
            .unwrap();
        let status = r.status().as_u16();
        let cd = r
            .headers()
            .get("content-disposition")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        (status, cd, r.bytes().await.unwrap())
    });
    assert_eq!(status, 200);
    assert!(cd.contains("kiosk-hello.iso"), "{cd}");
    assert!(
        body[..] == want[..],
        "kiln serve's ISO differs from kiln inject's"
    );
}

fn boot(iso: &Path, attach: &str) -> (String, f64) {
    let _guard = QEMU.lock().unwrap_or_else(|e| e.into_inner());
    let t = std::time::Instant::now();
    let out = kiln()
        .arg("boot")
        .arg(iso)
        .args(["--as", attach, "--keep"])
        .args([
            "--expect",
            "KIOSK-DONE",
            "--timeout",
            "420",
            "--memory",
            "1024",
        ])
        .output()
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "kiln boot --as {attach} failed: {stderr}\n{stdout}"
    );
    eprintln!(
        "live ISO boot as {attach} under OVMF (TCG): {secs:.1} s; {}",
        stderr.trim()
    );
    (stdout, secs)
}

/// The injected ISO boots as a plain disk (what a USB stick shows) and then, the "reboot",
/// as a CD; the live system shows the marker and the injected page; what the first boot wrote
/// is gone in the second; the ISO's bytes are unchanged by both (QEMU ran with --keep, so the
/// disk was writable).
#[test]
fn injected_iso_boots_as_disk_and_cdrom_from_ram_only() {
    let fx = fixture();
    let page = fx.dir.join("boot-page.html");
    fs::write(&page, INJECTED_PAGE).unwrap();
    let iso = inject(fx, &page, "boot.iso");
    let before = sha256_file(&iso);
    let page_line = format!("PAGE[{}]", INJECTED_PAGE.trim_end());
    let (disk, disk_s) = boot(&iso, "disk");
    let (cd, cd_s) = boot(&iso, "cdrom");
    eprintln!("TCG boot to marker: disk {disk_s:.1} s, cdrom {cd_s:.1} s");
    for (console, dev) in [(&disk, "/dev/vda"), (&cd, "/dev/sr0")] {
        for want in [
            "KIOSK-MARKER",
            page_line.as_str(),
            "STATE-FRESH",
            "STATE-WRITTEN",
            "MEDIUM-READONLY",
            "overlay / overlay rw",
            "/run/kiln/medium iso9660 ro",
            "KIOSK-DONE",
        ] {
            assert!(console.contains(want), "console lacks {want:?}:\n{console}");
        }
        assert!(
            console.contains(&format!("live medium \"kiosk_1\" mounted from {dev}")),
            "medium not from {dev}:\n{console}"
        );
        assert!(
            console.contains("dm-verity active over /live/root.img"),
            "{console}"
        );
        assert!(!console.contains("STATE-SURVIVED"), "{console}");
        assert!(!console.contains("MEDIUM-WRITABLE"), "{console}");
    }
    assert_eq!(sha256_file(&iso), before, "booting changed the ISO");
}
