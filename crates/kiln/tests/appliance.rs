//! The example appliance (examples/appliance) end to end: `kiln build` with [boot] makes a disk
//! that boots under OVMF with a dm-verity root; a flipped byte in the root is caught by
//! dm-verity and the boot is not blessed; `kiln update` installs v2 and a broken v3 into the
//! inactive slot and systemd-boot's boot counting falls back to v2 by itself; builds are
//! reproducible and the UKI has the expected sections; missing boot inputs are build errors.
//!
//! Needs QEMU, OVMF, systemd-boot-efi, busybox-static, linux-image-cloud-amd64, mtools,
//! dosfstools, gdisk, cryptsetup-bin and binutils: CI installs them (.ci/run); a missing one
//! fails the test with its name. Boots run one at a time (TCG is CPU-bound) and print their
//! times.

#![allow(clippy::unwrap_used)]

mod ab_support;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use kiln_build::qemu::{self, BootOptions, BootOutcome, Firmware};
use kiln_formats::gpt::Gpt;
use kiln_formats::{erofs, pe};
use kiln_testkit::{is_root, require_tool, run, run_ok};
use serde_json::Value;

use ab_support::{esp_ukis, markers, must_succeed};

/// TCG boots are CPU-bound; two at once on a small machine only make both slow.
static QEMU: Mutex<()> = Mutex::new(());

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/appliance")
}

fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

fn tools() {
    for t in [
        "qemu-system-x86_64",
        "busybox",
        "mdir",
        "fsck.fat",
        "sgdisk",
        "veritysetup",
        "objdump",
    ] {
        require_tool(t);
    }
    assert!(
        Path::new("/usr/lib/systemd/boot/efi/linuxx64.efi.stub").is_file(),
        "systemd's UKI stub is missing; install systemd-boot-efi (.ci/run does)"
    );
}

/// `make-rootfs DIR/NAME [--broken-health]`.
fn rootfs(dir: &Path, name: &str, broken: bool) -> PathBuf {
    let out = dir.join(name);
    let mut c = Command::new(example().join("make-rootfs"));
    c.arg(&out);
    if broken {
        c.arg("--broken-health");
    }
    run_ok(&mut c);
    out
}

/// `kiln build SPEC --source SRC --version V -o OUT`; returns the report.
fn build(spec: &Path, src: &Path, version: &str, out: &Path) -> Value {
    run_ok(
        kiln()
            .arg("build")
            .arg(spec)
            .arg("--source")
            .arg(src)
            .arg("--image-version")
            .arg(version)
            .arg("-o")
            .arg(out)
            .arg("-q"),
    );
    let r: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("appliance.json")).unwrap()).unwrap();
    // With [boot]: the boot section follows the report's schema.
    kiln_testkit::schema::assert_valid("build", &r);
    r
}

/// Boots `disk` with OVMF, writing to it (boot counting renames persist), until `expect`.
fn boot(disk: &Path, expect: &str, what: &str) -> BootOutcome {
    let _one = QEMU.lock().unwrap_or_else(|p| p.into_inner());
    let out = qemu::boot(&BootOptions {
        image: Some(disk.to_path_buf()),
        firmware: Firmware::Ovmf(None),
        expect: Some(expect.into()),
        timeout: Duration::from_secs(180),
        keep: true,
        ..BootOptions::default()
    })
    .unwrap();
    eprintln!("boot {what}: {}", out.summary());
    must_succeed(&out, what);
    out
}

/// Copies `len` bytes at `off` of `disk` into `to`.
fn extract(disk: &Path, off: u64, len: u64, to: &Path) -> PathBuf {
    let f = fs::File::open(disk).unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, off).unwrap();
    fs::write(to, &buf).unwrap();
    to.to_path_buf()
}

/// Reference checks of a disk after an update: sgdisk, fsck.fat on the ESP, and veritysetup on
/// the slot named `NAME_VERSION` against `root_hash`.
fn check_disk(disk: &Path, dir: &Path, name_version: &str, root_hash: &str) {
    let v = run_ok(Command::new(require_tool("sgdisk")).arg("-v").arg(disk));
    let text = String::from_utf8_lossy(&v.stdout);
    assert!(text.contains("No problems found"), "sgdisk -v: {text}");
    let f = fs::File::open(disk).unwrap();
    let gpt = Gpt::read(&f).unwrap();
    assert!(gpt.primary_error.is_none());
    let esp = gpt.partitions.iter().find(|p| p.name == "esp").unwrap();
    let esp_file = extract(disk, esp.offset(), esp.size(), &dir.join("esp.check"));
    run_ok(
        Command::new(require_tool("fsck.fat"))
            .arg("-n")
            .arg(&esp_file),
    );
    let pair: Vec<_> = gpt
        .partitions
        .iter()
        .filter(|p| p.name == name_version)
        .collect();
    assert_eq!(pair.len(), 2, "{name_version}: {:?}", gpt.partitions);
    let hex: String = root_hash.to_string();
    assert_eq!(pair[0].part_guid.simple().to_string(), hex[..32]);
    assert_eq!(pair[1].part_guid.simple().to_string(), hex[32..]);
    let data = extract(
        disk,
        pair[0].offset(),
        pair[0].size(),
        &dir.join("data.check"),
    );
    let hash = extract(
        disk,
        pair[1].offset(),
        pair[1].size(),
        &dir.join("hash.check"),
    );
    run_ok(
        Command::new(require_tool("veritysetup"))
            .arg("verify")
            .arg(&data)
            .arg(&hash)
            .arg(root_hash),
    );
    for p in [esp_file, data, hash] {
        fs::remove_file(p).unwrap();
    }
}

/// `kiln update DISK --with NEW --json`, through a loop device when running as root; its
/// report, checked against the `kiln.update/1` schema.
fn update(disk: &Path, with: &Path) -> Value {
    let out = update_text(disk, with);
    kiln_testkit::schema::assert_valid_output("update", out.as_bytes())
}

fn update_text(disk: &Path, with: &Path) -> String {
    if !is_root() {
        eprintln!("skipped: kiln update through a loop device needs root; updating the file");
        let o = run_ok(
            kiln()
                .arg("update")
                .arg(disk)
                .arg("--with")
                .arg(with)
                .arg("--json"),
        );
        return String::from_utf8_lossy(&o.stdout).into_owned();
    }
    let o = run(Command::new(require_tool("losetup"))
        .args(["-f", "--show"])
        .arg(disk));
    if !o.status.success() {
        // Root in a container without loop devices.
        eprintln!(
            "skipped: no loop device ({}); updating the file",
            String::from_utf8_lossy(&o.stderr).trim()
        );
        let o = run_ok(
            kiln()
                .arg("update")
                .arg(disk)
                .arg("--with")
                .arg(with)
                .arg("--json"),
        );
        return String::from_utf8_lossy(&o.stdout).into_owned();
    }
    let dev = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let o = run(kiln()
        .arg("update")
        .arg(&dev)
        .arg("--with")
        .arg(with)
        .arg("--json"));
    run_ok(Command::new(require_tool("losetup")).arg("-d").arg(&dev));
    assert!(
        o.status.success(),
        "kiln update {dev}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn sha(p: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(fs::read(p).unwrap()))
}

/// Must hold 1 and 3: v1 boots (verity root, marker, page) and blesses; `kiln update` to v2,
/// which boots and blesses; a broken v3 never blesses, and once its tries are used up the
/// machine boots v2 again on its own.
#[test]
fn boots_blesses_updates_and_rolls_back() {
    tools();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let spec = example();
    let r1 = rootfs(dir, "root1", false);
    let r3 = rootfs(dir, "root3", true);
    let v1 = build(&spec, &r1, "1", &dir.join("v1"));
    let v2 = build(&spec, &r1, "2", &dir.join("v2"));
    let v3 = build(&spec, &r3, "3", &dir.join("v3"));
    assert_eq!(v1["boot"]["uki"], "appliance_1+3.efi");
    assert!(v1["boot"]["cmdline"]
        .as_str()
        .unwrap()
        .contains("kiln.label=appliance_1"));
    // The machine's disk is v1 personalised with `kiln inject`: its own kiosk page in the
    // piece slot (the built image itself stays as it was).
    let disk = dir.join("disk.img");
    let base = dir.join("v1/appliance_1.img");
    let base_sha = sha(&base);
    let page = "<html><body><h1>Injected kiosk page</h1>\n<p>for machine 0451</p></body></html>\n";
    let page_file = dir.join("mine.html");
    fs::write(&page_file, page).unwrap();
    run_ok(
        kiln()
            .arg("inject")
            .arg(&base)
            .arg("--slot")
            .arg(format!("piece={}", page_file.display()))
            .arg("-o")
            .arg(&disk),
    );
    assert_eq!(sha(&base), base_sha, "kiln inject changed the base image");
    assert_eq!(esp_ukis(&disk), ["appliance_1+3.efi"]);

    // v1: marker with the version, the injected page from the piece partition, blessed.
    let o = boot(&disk, "APPLIANCE-DONE", "v1");
    assert!(
        o.console.contains("dm-verity active"),
        "no verity root:\n{}",
        o.console
    );
    let m = markers(&o);
    assert!(
        m.contains(&"APPLIANCE-BOOT image=appliance version=1"),
        "{m:?}"
    );
    let between = o
        .console
        .split("APPLIANCE-PAGE-BEGIN")
        .nth(1)
        .and_then(|s| s.split("APPLIANCE-PAGE-END").next())
        .unwrap_or_else(|| panic!("no page:\n{}", o.console));
    for line in page.lines() {
        assert!(
            between.contains(line),
            "page line {line:?} missing:\n{between}"
        );
    }
    assert!(
        m.contains(&"APPLIANCE-BLESSED appliance_1+2-1.efi -> appliance_1.efi"),
        "{m:?}"
    );
    assert_eq!(esp_ukis(&disk), ["appliance_1.efi"]);

    // Refusals leave the disk as it was: another seed family, another image name, a version
    // that is already the running one.
    let before = sha(&disk);
    let other_seed = dir.join("other-seed");
    run_ok(
        kiln()
            .arg("build")
            .arg(&spec)
            .arg("--source")
            .arg(&r1)
            .args([
                "--image-version",
                "9",
                "--seed",
                "00112233445566778899aabbccddeeff",
            ])
            .arg("-o")
            .arg(&other_seed)
            .arg("-q"),
    );
    let e = run(kiln()
        .arg("update")
        .arg(&disk)
        .arg("--with")
        .arg(&other_seed));
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(!e.status.success() && err.contains("another seed"), "{err}");
    let renamed = dir.join("renamed");
    fs::create_dir(&renamed).unwrap();
    fs::copy(spec.join("piece.html"), renamed.join("piece.html")).unwrap();
    let toml = fs::read_to_string(spec.join("kiln.toml")).unwrap();
    fs::write(
        renamed.join("kiln.toml"),
        toml.replace("name = \"appliance\"", "name = \"kiosk\""),
    )
    .unwrap();
    run_ok(
        kiln()
            .arg("build")
            .arg(&renamed)
            .arg("--source")
            .arg(&r1)
            .args(["--image-version", "9", "-o"])
            .arg(renamed.join("out"))
            .arg("-q"),
    );
    let e = run(kiln()
        .arg("update")
        .arg(&disk)
        .arg("--with")
        .arg(renamed.join("out/kiosk.json")));
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(
        !e.status.success() && err.contains("not an image of \"kiosk\""),
        "{err}"
    );
    let e = run(kiln()
        .arg("update")
        .arg(&disk)
        .arg("--with")
        .arg(dir.join("v1")));
    let err = String::from_utf8_lossy(&e.stderr);
    assert!(
        !e.status.success() && err.contains("already installed"),
        "{err}"
    );
    assert_eq!(sha(&disk), before, "a refused update changed the disk");

    // v2 into the empty slot; it boots first (newest) and blesses itself.
    let out = update(&disk, &dir.join("v2"));
    assert_eq!(out["replaced"], "_empty", "{out}");
    check_disk(&disk, dir, "appliance_2", v2["root_hash"].as_str().unwrap());
    assert_eq!(esp_ukis(&disk), ["appliance_1.efi", "appliance_2+3.efi"]);
    let o = boot(&disk, "APPLIANCE-DONE", "v2");
    let m = markers(&o);
    assert!(
        m.contains(&"APPLIANCE-BOOT image=appliance version=2"),
        "{m:?}"
    );
    assert!(
        m.contains(&"APPLIANCE-BLESSED appliance_2+2-1.efi -> appliance_2.efi"),
        "{m:?}"
    );
    assert_eq!(esp_ukis(&disk), ["appliance_1.efi", "appliance_2.efi"]);

    // A slot filled by systemd-sysupdate has the version as its name but keeps the partition
    // UUIDs it had: kiln-init finds it by kiln.label= and dm-verity still checks it.
    let sysupdated = dir.join("sysupdated.img");
    fs::copy(&disk, &sysupdated).unwrap();
    {
        let f = fs::File::open(&sysupdated).unwrap();
        let gpt = Gpt::read(&f).unwrap();
        let mut c = Command::new(require_tool("sgdisk"));
        for (i, p) in gpt.partitions.iter().enumerate() {
            if p.name == "appliance_2" {
                c.arg(format!("--partition-guid={}:R", gpt.number(i)));
            }
        }
        c.arg(&sysupdated);
        run_ok(&mut c);
    }
    let o = boot(&sysupdated, "APPLIANCE-DONE", "v2 slot with other UUIDs");
    assert!(
        o.console.contains("(found by name \"appliance_2\")"),
        "{}",
        o.console
    );
    assert!(markers(&o).contains(&"APPLIANCE-HEALTHY version=2"));
    fs::remove_file(&sysupdated).unwrap();

    // A broken v3 replaces v1 (v2 is the newest blessed version and stays).
    let out = update(&disk, &dir.join("v3/appliance.json"));
    assert!(
        out["replaced"] == "appliance_1" && out["kept"] == "2",
        "{out}"
    );
    check_disk(&disk, dir, "appliance_3", v3["root_hash"].as_str().unwrap());
    assert_eq!(esp_ukis(&disk), ["appliance_2.efi", "appliance_3+3.efi"]);
    for (i, left) in [
        "appliance_3+2-1.efi",
        "appliance_3+1-2.efi",
        "appliance_3+0-3.efi",
    ]
    .iter()
    .enumerate()
    {
        let o = boot(&disk, "APPLIANCE-UNHEALTHY", &format!("v3 try {}", i + 1));
        let m = markers(&o);
        assert!(
            m.contains(&"APPLIANCE-BOOT image=appliance version=3"),
            "{m:?}"
        );
        assert!(
            !m.iter().any(|l| l.starts_with("APPLIANCE-BLESSED")),
            "{m:?}"
        );
        assert_eq!(esp_ukis(&disk), ["appliance_2.efi", *left]);
    }
    // Out of tries: systemd-boot sorts v3 last and boots v2, with no intervention.
    let o = boot(&disk, "APPLIANCE-DONE", "fallback to v2");
    let m = markers(&o);
    assert!(
        m.contains(&"APPLIANCE-BOOT image=appliance version=2"),
        "{m:?}"
    );
    assert!(m.contains(&"APPLIANCE-HEALTHY version=2"), "{m:?}");
    assert_eq!(esp_ukis(&disk), ["appliance_2.efi", "appliance_3+0-3.efi"]);
}

/// Must hold 2: one flipped byte in a file's data inside the verity root is an I/O error at
/// boot, and the boot is not blessed.
#[test]
fn tampered_root_is_an_io_error_and_not_blessed() {
    tools();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let r1 = rootfs(dir, "root1", false);
    let rep = build(&example(), &r1, "1", &dir.join("v1"));
    let disk = dir.join("tampered.img");
    fs::copy(dir.join("v1/appliance_1.img"), &disk).unwrap();

    // Where payload.bin's data lies in the root partition, by kiln's EROFS reader.
    let root = rep["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["label"] == "appliance_1" && p["type"] == "root-x86-64")
        .unwrap();
    let root_off = root["offset"].as_u64().unwrap();
    let raw = fs::File::open(dir.join("v1/appliance_1.root.raw")).unwrap();
    let img = erofs::Image::open(&raw).unwrap();
    let ino = img.lookup(b"/usr/share/appliance/payload.bin").unwrap();
    let data_at = match ino.layout {
        erofs::layout::datalayout::FLAT_PLAIN | erofs::layout::datalayout::FLAT_INLINE => {
            u64::from(ino.i_u) * 4096
        }
        _ => img.extents(&ino).unwrap()[0].pa,
    } + 1000;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, root_off + data_at).unwrap();
    b[0] ^= 0x01;
    f.write_all_at(&b, root_off + data_at).unwrap();
    drop(f);

    let o = boot(&disk, "APPLIANCE-UNHEALTHY", "tampered v1");
    let m = markers(&o);
    assert!(
        m.iter().any(|l| l
            .starts_with("APPLIANCE-HEALTH-FAIL: read /usr/share/appliance/payload.bin")
            && l.contains("Input/output error")),
        "{m:?}\n{}",
        o.console
    );
    // The kernel names the block: dm-verity, not some other failure, refused it.
    let block = data_at / 4096;
    assert!(
        o.console
            .contains(&format!("data block {block} is corrupted")),
        "no dm-verity report for block {block}:\n{}",
        o.console
    );
    assert!(
        !m.iter().any(|l| l.starts_with("APPLIANCE-BLESSED")),
        "{m:?}"
    );
    assert_eq!(esp_ukis(&disk), ["appliance_1+2-1.efi"]);
}

/// Must hold 4: the same inputs give the same initrd, UKI and disk; the UKI has the stub's
/// .sbat and kiln's .osrel .cmdline .uname .initrd .linux (objdump -h).
#[test]
fn reproducible_and_uki_sections() {
    require_tool("objdump");
    require_tool("busybox");
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let r1 = rootfs(dir, "root1", false);
    let a = build(&example(), &r1, "1", &dir.join("a"));
    let b = build(&example(), &r1, "1", &dir.join("b"));
    assert_eq!(a["disk"]["digest"], b["disk"]["digest"]);
    for f in ["appliance_1.img", "appliance_1.efi", "appliance_1.root.raw"] {
        assert_eq!(
            sha(&dir.join("a").join(f)),
            sha(&dir.join("b").join(f)),
            "{f}"
        );
    }
    let ua = fs::read(dir.join("a/appliance_1.efi")).unwrap();
    let ub = fs::read(dir.join("b/appliance_1.efi")).unwrap();
    let (pa, pb) = (
        pe::Pe::parse(&ua, "a").unwrap(),
        pe::Pe::parse(&ub, "b").unwrap(),
    );
    let ia = pa.section_data(pa.section(".initrd").unwrap());
    let ib = pb.section_data(pb.section(".initrd").unwrap());
    assert!(ia.len() > 100_000, "initrd of {} bytes", ia.len());
    assert_eq!(ia, ib, "initrds differ");

    let o = run_ok(
        Command::new(require_tool("objdump"))
            .arg("-h")
            .arg(dir.join("a/appliance_1.efi")),
    );
    let text = String::from_utf8_lossy(&o.stdout);
    for s in [".osrel", ".cmdline", ".uname", ".initrd", ".linux", ".sbat"] {
        assert!(
            text.lines().any(|l| l.split_whitespace().nth(1) == Some(s)),
            "objdump -h shows no {s}:\n{text}"
        );
    }
    let cmdline = pa.section_data(pa.section(".cmdline").unwrap());
    let cmdline = String::from_utf8_lossy(cmdline);
    assert!(
        cmdline.contains(&format!("roothash={}", a["root_hash"].as_str().unwrap())),
        "{cmdline}"
    );
}

/// Must hold 5: a missing kernel, stub or module is a build error naming it, and nothing is
/// written.
#[test]
fn missing_boot_inputs_are_build_errors() {
    require_tool("busybox");
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let r1 = rootfs(dir, "root1", false);
    let toml = fs::read_to_string(example().join("kiln.toml")).unwrap();
    let spec = |name: &str, text: String| -> PathBuf {
        let s = dir.join(name);
        fs::create_dir(&s).unwrap();
        fs::write(s.join("kiln.toml"), text).unwrap();
        fs::copy(example().join("piece.html"), s.join("piece.html")).unwrap();
        s
    };
    let no_kernel = dir.join("no-kernel");
    run_ok(Command::new("cp").arg("-a").arg(&r1).arg(&no_kernel));
    for e in fs::read_dir(no_kernel.join("boot")).unwrap() {
        fs::remove_file(e.unwrap().path()).unwrap();
    }
    let cases = [
        (
            spec("plain", toml.clone()),
            no_kernel,
            "no kernel in the tree",
        ),
        (
            spec(
                "bad-stub",
                toml.replace(
                    "timeout = 0",
                    "timeout = 0\nstub = \"/nonexistent/linuxx64.efi.stub\"",
                ),
            ),
            r1.clone(),
            "/nonexistent/linuxx64.efi.stub",
        ),
        (
            spec(
                "bad-module",
                toml.replace("\"efivarfs\"]", "\"efivarfs\", \"no_such_module\"]"),
            ),
            r1.clone(),
            "kernel module no_such_module not found",
        ),
    ];
    for (i, (s, src, want)) in cases.iter().enumerate() {
        let out = dir.join(format!("out{i}"));
        let o = run(kiln()
            .arg("build")
            .arg(s)
            .arg("--source")
            .arg(src)
            .arg("-o")
            .arg(&out)
            .arg("-q"));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{}: built", s.display());
        assert!(err.contains(want), "{}: {err}", s.display());
        let left: Vec<_> = fs::read_dir(&out)
            .map(|r| r.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{}: left {left:?}", s.display());
    }
}
