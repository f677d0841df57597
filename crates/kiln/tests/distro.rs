//! Real distributions boot (issue #15). Debian trees made by `scripts/debian-tree` (mmdebstrap:
//! bookworm with the generic kernel and with the cloud kernel, trixie with `.ko.xz` modules),
//! built with `kiln build` from `examples/debian` into a dm-verity EROFS disk with A/B slots
//! and /var, and a live ISO, then booted under QEMU (TCG) with systemd as PID 1 until the
//! example's boot report unit prints what the system looks like after multi-user.target.
//!
//! Each tree is built once per run of this test binary and shared by its tests (the trees
//! themselves are cached between runs by the script). Boots run one at a time. CI runs every
//! kernel and every storage path at least once; `scripts/boot-matrix` runs the full cross
//! product ([`full_matrix`], ignored by default).
//!
//! A missing tree fails the tests when `KILN_REQUIRE_DEBIAN_TREES=1` (CI sets it) and skips
//! them otherwise; QEMU, OVMF and the reference tools are required.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
mod ab_support;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kiln_build::qemu::{self, Attach, BootOptions, BootOutcome, DirectKernel, Ending, Firmware};
use kiln_formats::fat::FatReader;
use kiln_formats::gpt::Gpt;
use kiln_testkit::{debian_tree, process_dir, require_tool, run_ok, RemoveOnPass};
use serde_json::Value;

use ab_support::{check_systemd_disk_boot, esp_ukis, must_succeed, partition_bytes, serve, Faults};

/// TCG boots are CPU-bound; two at once on a small machine only make both slow.
static QEMU: Mutex<()> = Mutex::new(());

/// The trees `scripts/debian-tree` makes.
const TREES: &[&str] = &["bookworm-generic", "bookworm-cloud", "trixie-generic"];

/// Seconds a systemd boot may take under TCG before it counts as hung.
const BOOT_TIMEOUT: u64 = 420;

fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/debian")
}

/// One tree built into a disk and an ISO.
struct Image {
    tree: &'static str,
    /// The tar the image was built from.
    tar: PathBuf,
    /// `kiln build`'s output directory.
    out: PathBuf,
    disk: PathBuf,
    iso: PathBuf,
    report: Value,
}

fn tmp_root() -> PathBuf {
    process_dir(Path::new(env!("CARGO_TARGET_TMPDIR")), "distro")
}

/// Copies the example project to `dir`, changing the spec with `edit`.
fn project(dir: &Path, edit: impl Fn(String) -> String) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(example().join("files"))
            .arg(dir),
    );
    fs::copy(example().join("piece.html"), dir.join("piece.html")).unwrap();
    let spec = fs::read_to_string(example().join("kiln.toml")).unwrap();
    fs::write(dir.join("kiln.toml"), edit(spec)).unwrap();
    dir.to_path_buf()
}

/// `kiln build PROJECT --source TAR -o OUT`; the report.
fn build(project: &Path, tar: &Path, out: &Path, what: &str) -> Value {
    build_with(project, tar, out, what, &[])
}

/// `kiln build PROJECT --source TAR -o OUT EXTRA...`; the report.
fn build_with(project: &Path, tar: &Path, out: &Path, what: &str, extra: &[&str]) -> Value {
    let t = Instant::now();
    let o = run_ok(
        kiln()
            .arg("build")
            .arg(project)
            .arg("--source")
            .arg(tar)
            .arg("-o")
            .arg(out)
            .args(extra),
    );
    eprintln!(
        "kiln build {what}: {:.1} s\n{}",
        t.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&o.stderr)
    );
    let name = fs::read_dir(out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.ends_with(".json") && !n.contains('_'))
        .expect("the build report NAME.json");
    serde_json::from_slice(&fs::read(out.join(name)).unwrap()).unwrap()
}

fn build_image(tree: &'static str) -> Option<Image> {
    let tar = debian_tree(tree)?;
    let dir = tmp_root().join(tree);
    let p = project(&dir.join("project"), |s| s);
    let out = dir.join("out");
    let report = build(&p, &tar, &out, tree);
    Some(Image {
        tree,
        tar,
        disk: out.join("debian_1.img"),
        iso: out.join("debian_1.iso"),
        out,
        report,
    })
}

/// The image of `tree`, built on first use. `None` when the tree is not there (and not
/// required).
fn image(tree: &'static str) -> Option<&'static Image> {
    type Cells = Vec<(&'static str, OnceLock<Option<Image>>)>;
    static IMAGES: OnceLock<Cells> = OnceLock::new();
    let all = IMAGES.get_or_init(|| TREES.iter().map(|t| (*t, OnceLock::new())).collect());
    let cell = &all.iter().find(|(t, _)| *t == tree).unwrap().1;
    cell.get_or_init(|| build_image(tree)).as_ref()
}

fn tools() {
    for t in ["qemu-system-x86_64", "sgdisk", "veritysetup", "cp"] {
        require_tool(t);
    }
}

/// Boots with `opts`, one QEMU at a time, until the boot report ends.
fn boot_with(opts: BootOptions, what: &str) -> BootOutcome {
    let _one = QEMU.lock().unwrap_or_else(|p| p.into_inner());
    let out = qemu::boot(&BootOptions {
        expect: Some("KILN-REPORT-END".into()),
        timeout: Duration::from_secs(BOOT_TIMEOUT),
        memory_mib: 1024,
        echo: false,
        ..opts
    })
    .unwrap();
    eprintln!("boot {what}: {}", out.summary());
    out
}

/// Boots `image` attached as `attach` under OVMF until the boot report ends.
///
/// One boot may be repeated, and only one kind: on a snapshot of a disk, the firmware failed to
/// load a UKI whose bytes on the disk are checked to be intact. In CI, OVMF loaded a trixie UKI
/// over EHCI whose compressed kernel came out corrupt ("EFI stub: ERROR: Failed to decompress
/// kernel"), while mtools read the same UKI back byte for byte. The same disk booted on every
/// other run. So the firmware's read path got it wrong, not the image: a disk is read-only under
/// snapshot, so two boots of it see the same bytes. A second failure fails the test, and so
/// does a UKI on the ESP that differs from the one `kiln build` wrote.
fn boot(image: &Path, attach: Attach, keep: bool, what: &str) -> BootOutcome {
    let opts = || BootOptions {
        image: Some(image.to_path_buf()),
        attach,
        firmware: Firmware::Ovmf(None),
        keep,
        ..BootOptions::default()
    };
    let out = boot_with(opts(), what);
    if out.success() || keep || !firmware_failed_to_load(&out.console) {
        return out;
    }
    let Some(checked) = esp_ukis_as_built(image) else {
        return out;
    };
    let lines: Vec<&str> = out.console.lines().collect();
    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
    eprintln!(
        "WARNING boot {what}: the firmware failed to load the UKI ({}); {checked}. \
         Booting once more.\n--- console of the failed boot (end) ---\n{tail}",
        out.summary()
    );
    boot_with(opts(), &format!("{what}, second boot"))
}

/// True when the console shows the firmware or the kernel's EFI stub failing to load or
/// start the UKI (before any of the kernel's own output).
fn firmware_failed_to_load(console: &str) -> bool {
    !console.contains("Linux version")
        && (console.contains("EFI stub: ERROR")
            || console.contains("Error starting kernel image")
            || (console.contains("Failed to execute") && console.contains("Load Error")))
}

#[test]
fn only_a_failed_uki_load_counts_as_a_firmware_failure() {
    let ci = "BdsDxe: starting Boot0001 \"UEFI QEMU QEMU USB HARDDRIVE\"\n\
              EFI stub: WARNING: Decompression failed: ZSTD-compressed data is corrupt\n\
              EFI stub: ERROR: Failed to decompress kernel\n\
              Error starting kernel image: Load Error\n";
    assert!(firmware_failed_to_load(ci));
    let kernel_ran = "EFI stub: Loaded initrd from LINUX_EFI_INITRD_MEDIA_GUID device path\n\
                      [    0.000000] Linux version 6.12.118+deb13-amd64\n\
                      Kernel panic - not syncing: VFS: Unable to mount root fs\n";
    assert!(!firmware_failed_to_load(kernel_ran));
    assert!(!firmware_failed_to_load("Shell> "));
}

/// Reads every UKI of `disk`'s ESP with mtools (not kiln's FAT reader) and compares it with
/// the UKI `kiln build` wrote beside the disk (`NAME_VERSION.efi`). Panics when one differs;
/// `None` when `disk` has no ESP or nothing to compare with; else what was checked.
fn esp_ukis_as_built(disk: &Path) -> Option<String> {
    let f = fs::File::open(disk).ok()?;
    let esp = Gpt::read(&f)
        .ok()?
        .partitions
        .into_iter()
        .find(|p| p.name == "esp")?;
    let dir = disk.parent()?;
    let built: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "efi"))
        .collect();
    let names = esp_ukis(disk);
    if built.is_empty() || names.is_empty() {
        return None;
    }
    require_tool("mcopy");
    let img = format!("{}@@{}", disk.display(), esp.offset());
    let mut checked = Vec::new();
    for name in &names {
        let o = run_ok(
            Command::new("mcopy")
                .args(["-n", "-i", &img])
                .arg(format!("::/EFI/Linux/{name}"))
                .arg("-"),
        );
        let same = built
            .iter()
            .find(|p| fs::read(p).is_ok_and(|b| b == o.stdout))
            .unwrap_or_else(|| {
                panic!(
                    "{}: /EFI/Linux/{name} on the ESP ({} bytes, read with mtools) differs \
                     from every UKI kiln build wrote in {}",
                    disk.display(),
                    o.stdout.len(),
                    dir.display()
                )
            });
        checked.push(format!(
            "{name} read with mtools equals {}",
            same.file_name()?.to_string_lossy()
        ));
    }
    Some(checked.join(", "))
}

/// Seconds of guest uptime at which multi-user.target was reached.
fn multi_user_secs(r: &BTreeMap<String, String>) -> f64 {
    r.get("multi-user-usec")
        .and_then(|u| u.parse::<f64>().ok())
        .map(|u| u / 1e6)
        .unwrap_or(f64::NAN)
}

/// What every systemd boot from the verity disk must show.
fn check_disk_boot(img: &Image, out: &BootOutcome, what: &str) -> BTreeMap<String, String> {
    let r = check_systemd_disk_boot(out, "/dev/ttyS0", what);
    let get = |k: &str| r.get(k).map(String::as_str).unwrap_or("<missing>");
    assert_eq!(
        get("kernel"),
        img.report["boot"]["kernel"].as_str().unwrap(),
        "{what}"
    );
    eprintln!(
        "{what}: multi-user.target at {:.1} s guest uptime, {:.1} s from QEMU start",
        multi_user_secs(&r),
        out.elapsed.as_secs_f64()
    );
    r
}

/// Builds with the image and checks what `kiln build` reports about the initrd: modules with
/// reasons, crc32c for libcrc32c and the root filesystem, sha256 for dm-verity.
fn check_build_report(img: &Image) {
    let b = &img.report["boot"];
    let modules: Vec<&str> = b["modules"]
        .as_array()
        .unwrap_or_else(|| panic!("{}: no boot.modules in {}", img.tree, img.report))
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    let reasons = b["module_reasons"].as_object().unwrap();
    for m in &modules {
        assert!(reasons.contains_key(*m), "{}: no reason for {m}", img.tree);
    }
    if modules.contains(&"libcrc32c") {
        let crc = modules
            .iter()
            .find(|m| m.starts_with("crc32c"))
            .unwrap_or_else(|| panic!("{}: libcrc32c without crc32c: {modules:?}", img.tree));
        let pos = |n: &str| modules.iter().position(|m| *m == n).unwrap();
        assert!(pos(crc) < pos("libcrc32c"), "{}: {modules:?}", img.tree);
    }
    assert!(
        b["unresolved"].as_array().unwrap().is_empty(),
        "{}: {b}",
        img.tree
    );
}

fn tree_or_skip(tree: &'static str) -> Option<&'static Image> {
    tools();
    image(tree)
}

/// Must hold: the generic bookworm kernel (ext4, erofs, crc32c, AHCI and USB as modules)
/// reaches multi-user.target with systemd from the verity disk as an AHCI disk and a USB stick
/// (as a virtio disk in the A/B test); the counted boot is blessed by systemd-bless-boot.
#[test]
fn bookworm_generic_disk_ahci_usb() {
    let Some(img) = tree_or_skip("bookworm-generic") else {
        return;
    };
    check_build_report(img);
    for (attach, what) in [
        (Attach::Ahci, "bookworm-generic disk (AHCI)"),
        (Attach::Usb, "bookworm-generic disk (USB stick, xHCI)"),
    ] {
        let out = boot(&img.disk, attach, false, what);
        let r = check_disk_boot(img, &out, what);
        // Counted boot (debian_1+2.efi): systemd blesses it once boot-complete.target is up.
        assert_eq!(r["boot-complete"], "active", "{what}");
        assert_eq!(r["bless"], "active", "{what}");
        assert!(
            r["modules"].contains("crc32c_generic") && r["modules"].contains("libcrc32c"),
            "{what}: {}",
            r["modules"]
        );
    }
}

/// The cloud kernel has no AHCI or USB drivers: its disk boots as virtio-scsi and NVMe (as
/// virtio-blk in `bookworm_cloud_lz4hc_root_boots`).
#[test]
fn bookworm_cloud_disk_virtio_scsi_nvme() {
    let Some(img) = tree_or_skip("bookworm-cloud") else {
        return;
    };
    check_build_report(img);
    let skipped = img.report["boot"]["skipped"].to_string();
    assert!(
        skipped.contains("usb_storage") && skipped.contains("ahci"),
        "{skipped}"
    );
    for (attach, what) in [
        (Attach::Scsi, "bookworm-cloud disk (virtio-scsi)"),
        (Attach::Nvme, "bookworm-cloud disk (NVMe)"),
    ] {
        let out = boot(&img.disk, attach, false, what);
        check_disk_boot(img, &out, what);
    }
}

/// The same Debian system with its EROFS root compressed with lz4hc (the example's is lz4):
/// every file systemd and the services read comes through the kernel's decompressor.
#[test]
fn bookworm_cloud_lz4hc_root_boots() {
    let Some(tar) = debian_tree("bookworm-cloud") else {
        return;
    };
    let dir = tmp_root().join("bookworm-cloud-lz4hc");
    let _clean = RemoveOnPass(dir.clone());
    let p = project(&dir.join("project"), |s| {
        assert!(s.contains("compression = \"lz4\""));
        s.replace("compression = \"lz4\"", "compression = \"lz4hc\"")
            .replace("output = [\"disk\", \"iso\"]", "output = [\"disk\"]")
    });
    let out = dir.join("out");
    let report = build(&p, &tar, &out, "bookworm-cloud, lz4hc root");
    let img = Image {
        tree: "bookworm-cloud",
        tar,
        disk: out.join("debian_1.img"),
        iso: out.join("debian_1.iso"),
        out,
        report,
    };
    let what = "bookworm-cloud disk, lz4hc root (virtio-blk)";
    let o = boot(&img.disk, Attach::Disk, false, what);
    check_disk_boot(&img, &o, what);
}

/// Debian 13: kernel 6.12 with `.ko.xz` modules, systemd 257. CI boots every kernel and every
/// storage path at least once: virtio-blk, AHCI and xHCI run with bookworm's generic kernel,
/// EHCI and UAS with trixie's. `scripts/boot-matrix` runs the full cross product.
#[test]
fn trixie_disk_ehci() {
    let Some(img) = tree_or_skip("trixie-generic") else {
        return;
    };
    check_build_report(img);
    // The check a repeated boot depends on: the ESP's UKI, read with mtools, is the one built.
    let checked = esp_ukis_as_built(&img.disk).expect("a UKI on the ESP and one beside the disk");
    assert!(checked.contains("equals debian_1.efi"), "{checked}");
    let what = "trixie disk (USB stick, EHCI)";
    let out = boot(&img.disk, Attach::UsbEhci, false, what);
    check_disk_boot(img, &out, what);
}

/// What a live boot must show: the RAM overlay root, the medium at /run/kiln/medium with the
/// slot's (injected) content.
fn check_live_boot(out: &BootOutcome, page: &str, what: &str) {
    let r = must_succeed(out, what);
    let get = |k: &str| r.get(k).map(String::as_str).unwrap_or("<missing>");
    assert_eq!(get("multi-user"), "active", "{what}: {r:?}");
    assert!(get("init").ends_with("/systemd"), "{what}");
    assert!(
        get("mount /").starts_with("overlay overlay rw"),
        "{what}: root {}",
        get("mount /")
    );
    assert_eq!(get("root-writable"), "yes", "{what}");
    assert!(
        get("mount /run/kiln/medium").contains(" iso9660 ro"),
        "{what}: {r:?}"
    );
    assert_eq!(get("piece"), page, "{what}");
    assert_eq!(get("getty"), "active", "{what}");
    assert_eq!(get("failed"), "", "{what}: failed units");
    assert!(
        out.console.contains("dm-verity active over /live/root.img"),
        "{what}"
    );
    eprintln!(
        "{what}: multi-user.target at {:.1} s guest uptime",
        multi_user_secs(&r)
    );
}

/// Must hold: the live ISO as a CD and as a USB stick, showing a slot's injected content.
fn live_iso(tree: &'static str, attaches: &[(Attach, &str)]) {
    let Some(img) = tree_or_skip(tree) else {
        return;
    };
    let page = format!("<h1>injected into the {tree} ISO</h1>");
    let dir = img.out.parent().unwrap();
    let payload = dir.join("page.html");
    fs::write(&payload, &page).unwrap();
    let personal = dir.join("personal.iso");
    run_ok(
        kiln()
            .arg("inject")
            .arg(&img.iso)
            .arg("--slot")
            .arg(format!("piece={}", payload.display()))
            .arg("-o")
            .arg(&personal),
    );
    for (attach, what) in attaches {
        let out = boot(&personal, *attach, false, what);
        check_live_boot(&out, &page, what);
    }
}

#[test]
fn bookworm_generic_live_iso_cd() {
    live_iso(
        "bookworm-generic",
        &[(Attach::CdromAhci, "bookworm-generic ISO (CD, AHCI)")],
    );
}

/// A live ISO as a USB stick (written with dd or Etcher); as a virtio-scsi CD in
/// `bookworm_cloud_live_iso_cd`.
#[test]
fn trixie_live_iso_usb() {
    live_iso("trixie-generic", &[(Attach::Usb, "trixie ISO (USB stick)")]);
}

/// The cloud kernel has no USB or AHCI: its live ISO boots as a virtio-scsi CD.
#[test]
fn bookworm_cloud_live_iso_cd() {
    live_iso(
        "bookworm-cloud",
        &[(Attach::Cdrom, "bookworm-cloud ISO (CD, virtio-scsi)")],
    );
}

/// USB Attached SCSI: OVMF cannot boot from it, so the kernel and kiln's initrd (taken from
/// the UKI) boot directly and find the verity root on the UAS disk.
#[test]
fn trixie_disk_uas_direct_kernel() {
    let Some(img) = tree_or_skip("trixie-generic") else {
        return;
    };
    let dir = img.out.parent().unwrap();
    let (kernel, initrd, cmdline) = uki_parts(img, dir);
    let out = boot_with(
        BootOptions {
            image: Some(img.disk.clone()),
            attach: Attach::Uas,
            firmware: Firmware::Bios,
            direct: Some(DirectKernel {
                kernel,
                initrd: Some(initrd),
                append: cmdline,
            }),
            ..BootOptions::default()
        },
        "trixie disk (UAS, direct kernel)",
    );
    let r = must_succeed(&out, "trixie disk (UAS)");
    assert_eq!(r["multi-user"], "active");
    assert!(
        r["mount /"].starts_with("/dev/mapper/root erofs ro"),
        "{r:?}"
    );
    assert!(r["modules"].contains("uas"), "{}", r["modules"]);
}

/// The kernel, initrd and command line of the disk's UKI (read from its ESP with kiln's FAT
/// reader), the sections extracted with objcopy.
fn uki_parts(img: &Image, dir: &Path) -> (PathBuf, PathBuf, String) {
    let name = img.report["boot"]["uki"].as_str().unwrap();
    let f = fs::File::open(&img.disk).unwrap();
    let gpt = Gpt::read(&f).unwrap();
    let esp = gpt.partitions.iter().find(|p| p.name == "esp").unwrap();
    let off = esp.offset();
    let fat = FatReader::open(|o: u64, b: &mut [u8]| f.read_exact_at(b, off + o)).unwrap();
    let uki = dir.join("uki.efi");
    fs::write(&uki, fat.read_file(&format!("/EFI/Linux/{name}")).unwrap()).unwrap();
    let objcopy = require_tool("objcopy");
    let mut parts = Vec::new();
    for s in [".linux", ".initrd", ".cmdline"] {
        let to = dir.join(format!("uki{s}"));
        run_ok(
            Command::new(&objcopy)
                .arg("-O")
                .arg("binary")
                .arg(format!("--only-section={s}"))
                .arg(&uki)
                .arg(&to),
        );
        parts.push(to);
    }
    let cmdline = fs::read_to_string(&parts[2])
        .unwrap()
        .trim_end_matches('\0')
        .trim()
        .to_string();
    (parts[0].clone(), parts[1].clone(), cmdline)
}

const HEALTH_UNIT: &str = "[Unit]
Description=kiln test: a health check that fails
Before=boot-complete.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo KILN-HEALTH-FAILING; exit 1'
StandardOutput=journal+console

[Install]
RequiredBy=boot-complete.target
";

/// Must hold: an A/B update of the Debian image with a unit that fails before
/// boot-complete.target. v1 boots (a virtio disk) and systemd-bless-boot blesses it; `kiln
/// update` installs v2, built with one try, in the other slot; v2's health check fails,
/// nothing blesses it, its try is used up and systemd-boot starts the blessed v1 again.
#[test]
fn ab_update_with_failing_unit_falls_back_to_blessed_v1() {
    let Some(img) = tree_or_skip("bookworm-generic") else {
        return;
    };
    let dir = tmp_root().join("ab");
    let _clean = RemoveOnPass(dir.clone());
    let p2 = project(&dir.join("project-v2"), |s| {
        s.replace("version = \"1\"", "version = \"2\"")
            .replace("tries = 2", "tries = 1")
    });
    let units = p2.join("files/etc/systemd/system");
    fs::write(units.join("kiln-health.service"), HEALTH_UNIT).unwrap();
    fs::create_dir_all(units.join("boot-complete.target.requires")).unwrap();
    std::os::unix::fs::symlink(
        "/etc/systemd/system/kiln-health.service",
        units.join("boot-complete.target.requires/kiln-health.service"),
    )
    .unwrap();
    let out2 = dir.join("out-v2");
    build(
        &p2,
        &img.tar,
        &out2,
        "bookworm-generic v2 (failing health check)",
    );

    // The machine's disk: v1, written by its boots.
    let disk = dir.join("machine.img");
    run_ok(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(&img.disk)
            .arg(&disk),
    );
    assert_eq!(esp_ukis(&disk), ["debian_1+2.efi"]);
    let out = boot(&disk, Attach::Disk, true, "A/B: v1 (virtio-blk)");
    let r = check_disk_boot(img, &out, "A/B: v1 (virtio-blk)");
    assert!(r["loader-entry"].starts_with("debian_1"), "{r:?}");
    assert_eq!(r["bless"], "active");
    assert!(
        r["cmdline"].contains("kiln.label=debian_1"),
        "{}",
        r["cmdline"]
    );
    assert_eq!(
        esp_ukis(&disk),
        ["debian_1.efi"],
        "systemd-bless-boot renamed the UKI"
    );

    let o = run_ok(kiln().arg("update").arg(&disk).arg("--with").arg(&out2));
    eprintln!("kiln update: {}", String::from_utf8_lossy(&o.stdout));
    assert_eq!(esp_ukis(&disk), ["debian_1.efi", "debian_2+1.efi"]);

    // v2's one try: its health check fails, boot-complete.target is not reached, nothing
    // blesses the boot, and systemd-boot has counted it down to 0 tries left.
    let what = "A/B: v2, its only try";
    let out = boot(&disk, Attach::Disk, true, what);
    let r = must_succeed(&out, what);
    assert!(
        r["cmdline"].contains("kiln.label=debian_2"),
        "{what}: {}",
        r["cmdline"]
    );
    assert_eq!(r["multi-user"], "active", "{what}");
    assert!(out.console.contains("KILN-HEALTH-FAILING"), "{what}");
    assert!(r["failed"].contains("kiln-health.service"), "{what}: {r:?}");
    assert_ne!(r["boot-complete"], "active", "{what}");
    assert_ne!(r["bless"], "active", "{what}");
    assert_eq!(
        esp_ukis(&disk),
        ["debian_1.efi", "debian_2+0-1.efi"],
        "{what}"
    );
    let out = boot(&disk, Attach::Disk, true, "A/B: fallback");
    let r = check_disk_boot(img, &out, "A/B: fallback to v1");
    assert!(
        r["cmdline"].contains("kiln.label=debian_1"),
        "{}",
        r["cmdline"]
    );
    assert_eq!(r["loader-entry"], "debian_1.efi");
    assert_eq!(esp_ukis(&disk), ["debian_1.efi", "debian_2+0-1.efi"]);
}

/// `Package Version` of every package in a tree's dpkg status.
fn packages(tar: &Path) -> BTreeMap<String, String> {
    let o = run_ok(
        Command::new("tar")
            .arg("-xOf")
            .arg(tar)
            .arg("./var/lib/dpkg/status"),
    );
    let mut m = BTreeMap::new();
    for stanza in String::from_utf8(o.stdout).unwrap().split("\n\n") {
        let field = |k: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
        };
        if let (Some(p), Some(v)) = (field("Package:"), field("Version:")) {
            m.insert(p, v);
        }
    }
    m
}

/// Must hold (#22): a Debian tree v1 and v2 = v1 with one package added (bookworm-cloud and
/// bookworm-cloud-hello, made by mmdebstrap from one mirror state), each built into a signed
/// A/B disk with an ext4 root (packed, and in the stable layout) and with an EROFS lz4 root.
/// `kiln update --from` turns a v1 disk into v2 over HTTP with byte ranges: the slot equals
/// v2's root image byte for byte, at most 15 % of the root is fetched, and the updated disk
/// boots v2 (hello runs). The stable layout fetches less than the packed one.
#[test]
fn debian_update_from_http_fetches_one_package() {
    tools();
    require_tool("tar");
    let (Some(tar1), Some(tar2)) = (
        debian_tree("bookworm-cloud"),
        debian_tree("bookworm-cloud-hello"),
    ) else {
        return;
    };
    // The two trees differ by one package and nothing else.
    let (p1, p2) = (packages(&tar1), packages(&tar2));
    let mut added = p2.clone();
    added.retain(|k, _| !p1.contains_key(k));
    let changed: Vec<&String> = p1.keys().filter(|k| p2.get(*k) != p1.get(*k)).collect();
    assert!(
        added.keys().eq(["hello"]) && changed.is_empty(),
        "the trees must differ by the hello package alone (added {added:?}, changed {changed:?}); \
         made from different mirror states? remove both and run scripts/debian-tree bookworm-cloud-hello"
    );

    let dir = tmp_root().join("delta");
    let _clean = RemoveOnPass(dir.clone());
    let key = dir.join("release.key");
    let pubkey = dir.join("release.pub");
    fs::create_dir_all(&dir).unwrap();
    kiln_ship::sign::generate_unencrypted(&key, &pubkey).unwrap();
    let key = key.to_str().unwrap();
    let mut fetched = BTreeMap::new();
    for (fs_name, root_spec, image_spec) in [
        ("ext4", "fs = \"ext4\"", ""),
        ("ext4-stable", "fs = \"ext4\"", "\nlayout = \"stable\""),
        ("erofs-lz4", "fs = \"erofs\"\ncompression = \"lz4\"", ""),
    ] {
        let p = project(&dir.join(fs_name).join("project"), |s| {
            s.replace(
                "output = [\"disk\", \"iso\"]",
                &format!("output = [\"disk\"]{image_spec}"),
            )
            .replace("fs = \"erofs\"\ncompression = \"lz4\"", root_spec)
        });
        // The boot report also says what hello prints.
        let report = p.join("files/usr/local/sbin/kiln-boot-report");
        let script = fs::read_to_string(&report).unwrap().replace(
            "echo KILN-REPORT-END",
            "r hello \"$(hello 2>&1)\"\necho KILN-REPORT-END",
        );
        fs::write(&report, script).unwrap();
        let out1 = dir.join(fs_name).join("v1");
        let out2 = dir.join(fs_name).join("v2");
        build_with(&p, &tar1, &out1, &format!("{fs_name} v1"), &["--sign", key]);
        build_with(
            &p,
            &tar2,
            &out2,
            &format!("{fs_name} v2 (+hello)"),
            &["--image-version", "2", "--sign", key],
        );

        let faults = Arc::new(Mutex::new(Faults::default()));
        let url = format!("{}/debian_2.index", serve(out2.clone(), faults.clone()));
        let disk = dir.join(fs_name).join("machine.img");
        run_ok(
            Command::new("cp")
                .arg("--sparse=always")
                .arg(out1.join("debian_1.img"))
                .arg(&disk),
        );
        let t = Instant::now();
        let o = run_ok(
            kiln()
                .arg("update")
                .arg(&disk)
                .arg("--from")
                .arg(&url)
                .arg("--pub")
                .arg(&pubkey)
                .arg("--json"),
        );
        let rep = kiln_testkit::schema::assert_valid_output("update", &o.stdout);
        let secs = t.elapsed().as_secs_f64();
        let root = fs::read(out2.join("debian_2.root.raw")).unwrap();
        let (dn, hn) = (
            rep["data_partition"].as_u64().unwrap() as usize,
            rep["hash_partition"].as_u64().unwrap() as usize,
        );
        assert!(
            partition_bytes(&disk, dn, Some(root.len() as u64)) == root,
            "{fs_name}: the updated slot differs from v2's root image"
        );
        let verity = fs::read(out2.join("debian_2.root-verity.raw")).unwrap();
        assert!(partition_bytes(&disk, hn, Some(verity.len() as u64)) == verity);
        let missing = rep["root_missing_size"].as_u64().unwrap();
        fetched.insert(fs_name, missing);
        let pct = 100.0 * missing as f64 / root.len() as f64;
        // The slot is fixed at 1 GiB; what the filesystem holds is its blocks that are not all
        // zero, the fairer denominator.
        let used = 4096
            * root
                .chunks(4096)
                .filter(|b| b.iter().any(|&x| x != 0))
                .count() as u64;
        let pct_used = 100.0 * missing as f64 / used as f64;
        let sent = faults.lock().unwrap().sent;
        eprintln!(
            "delta {fs_name}: root {missing} of {} bytes fetched ({pct:.2} %), {pct_used:.2} % of \
             its {used} bytes in use (the tree's tar is {} bytes); UKI {} of {}; index {}; \
             {sent} bytes served in all, {} requests, {secs:.1} s",
            root.len(),
            fs::metadata(&tar2).unwrap().len(),
            rep["uki_missing_size"],
            rep["uki_size"],
            rep["index_size"],
            rep["requests"],
        );
        assert_eq!(rep["root_size"].as_u64(), Some(root.len() as u64));
        assert!(
            pct_used <= 15.0,
            "{fs_name}: {pct_used:.2} % of the root's blocks in use fetched for one package: {rep}"
        );
        // What was sent is what the report says was fetched, and the index.
        assert_eq!(
            rep["fetched_size"].as_u64().unwrap() + rep["index_size"].as_u64().unwrap(),
            sent,
            "{rep}"
        );
        assert_eq!(
            esp_ukis(&disk),
            ["debian_1+2.efi", "debian_2+2.efi"],
            "{fs_name}"
        );

        let what = format!("{fs_name} v1 updated to v2 over HTTP");
        let out = boot(&disk, Attach::Disk, false, &what);
        let r = must_succeed(&out, &what);
        let get = |k: &str| r.get(k).map(String::as_str).unwrap_or("<missing>");
        assert_eq!(get("multi-user"), "active", "{what}: {r:?}");
        assert_eq!(get("failed"), "", "{what}: failed units");
        assert!(
            get("cmdline").contains("kiln.label=debian_2"),
            "{what}: {}",
            get("cmdline")
        );
        let fstype = fs_name.split('-').next().unwrap();
        assert!(
            get("mount /").starts_with(&format!("/dev/mapper/root {fstype} ro")),
            "{what}: root {}",
            get("mount /")
        );
        assert_eq!(get("hello"), "Hello, world!", "{what}");
    }
    // What the stable layout is for: unchanged files stay put, so less is fetched.
    assert!(
        fetched["ext4-stable"] < fetched["ext4"],
        "bytes fetched by layout: {fetched:?}"
    );
}

/// Must hold: a kernel with a module missing from the initrd fails with a message naming that
/// module. Debian 12's generic kernel with its crc32c implementations taken out of the
/// package: the initrd builder reports that nothing provides crc32c, and at boot libcrc32c
/// cannot initialise, EROFS (which needs it) cannot load, and kiln-init's last words say so.
#[test]
fn missing_crc32c_is_named_at_build_and_at_boot() {
    use kiln_build::initrd::{self, InitrdOptions};
    use kiln_formats::fstree::{DataRef, FileData, Meta, Node, NodeKind};
    let Some(img) = tree_or_skip("bookworm-generic") else {
        return;
    };
    let dir = tmp_root().join("missing");
    let _clean = RemoveOnPass(dir.clone());
    fs::create_dir_all(&dir).unwrap();
    let (mut tree, contents) =
        kiln_tree::open_random_access(&kiln_tree::SourceArg::TarFile(img.tar.clone())).unwrap();
    let kernel = initrd::find_kernel(&tree, None).unwrap();
    for f in ["modules.dep", "modules.alias"] {
        let p = format!("{}/{f}", kernel.modules_dir);
        let text =
            String::from_utf8(initrd::read_tree_file(&tree, &contents, &p).unwrap()).unwrap();
        let kept: String = text
            .lines()
            .filter(|l| {
                !l.contains("crc32c_generic")
                    && !l.contains("crc32c-intel")
                    && !l.contains("crc32c_intel")
            })
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(kept.len() < text.len(), "{p} names crc32c modules");
        let m = Meta::default();
        tree.insert(
            p.as_bytes(),
            Node {
                kind: NodeKind::File(FileData::dense(
                    kept.len() as u64,
                    DataRef::Inline(kept.into_bytes().into()),
                )),
                meta: m.clone(),
                slot: None,
            },
            &m,
        )
        .unwrap();
    }
    let ird = initrd::build_initrd(
        &tree,
        &contents,
        &InitrdOptions {
            root_fs: Some("erofs".into()),
            kiln_init: kiln_init_embed::kiln_init(std::env::consts::ARCH)
                .unwrap()
                .to_vec(),
            ..InitrdOptions::default()
        },
    )
    .unwrap();
    assert!(
        ird.unresolved
            .iter()
            .any(|u| u.starts_with("crc32c (loaded before libcrc32c")),
        "the build names what is missing: {:?}",
        ird.unresolved
    );
    assert!(
        !ird.modules.iter().any(|m| m.starts_with("crc32c")),
        "{:?}",
        ird.modules
    );
    let initrd_path = dir.join("initrd-without-crc32c");
    fs::write(&initrd_path, &ird.bytes).unwrap();
    let (kernel_path, _, cmdline) = uki_parts(img, &dir);
    let out = {
        let _one = QEMU.lock().unwrap_or_else(|p| p.into_inner());
        qemu::boot(&BootOptions {
            image: Some(img.disk.clone()),
            firmware: Firmware::Bios,
            direct: Some(DirectKernel {
                kernel: kernel_path,
                initrd: Some(initrd_path),
                append: format!("{cmdline} kiln.reboot_delay=0"),
            }),
            expect: Some("kiln-init: boot failed".into()),
            fail: vec!["Kernel panic".into(), "KILN-REPORT-BEGIN".into()],
            timeout: Duration::from_secs(180),
            echo: false,
            ..BootOptions::default()
        })
        .unwrap()
    };
    eprintln!("boot without crc32c: {}", out.summary());
    assert_eq!(out.ending, Ending::Matched, "{}", out.console);
    let last: Vec<&str> = out
        .console
        .lines()
        .filter(|l| l.starts_with("kiln-init: ") && !l.starts_with("kiln-init: ["))
        .collect();
    let error = last.first().copied().unwrap_or("");
    eprintln!("kiln-init's error: {error}");
    for want in ["erofs", "libcrc32c", "crc32c loaded before it"] {
        assert!(
            error.contains(want),
            "{want:?} not in {error:?}\n{}",
            out.console
        );
    }
}

/// The full cross product: every tree, its disk on every storage path its kernel has, and its
/// ISO as every CD and USB kind. `scripts/boot-matrix` runs it.
#[test]
#[ignore = "the full matrix takes an hour under TCG; scripts/boot-matrix runs it"]
fn full_matrix() {
    let mut results = Vec::new();
    for tree in TREES {
        let Some(img) = tree_or_skip(tree) else {
            continue;
        };
        let skipped = img.report["boot"]["skipped"].to_string();
        let has = |m: &str| !skipped.contains(&format!("\"{m}\""));
        for attach in Attach::ALL {
            let needs: &[&str] = match attach {
                Attach::Ahci | Attach::CdromAhci => &["ahci"],
                Attach::Usb | Attach::Uas => &["xhci_pci", "usb_storage"],
                Attach::UsbEhci => &["ehci_pci", "usb_storage"],
                _ => &[],
            };
            if !needs.iter().all(|m| has(m)) {
                results.push(format!("{tree} {attach}: not in this kernel"));
                continue;
            }
            let t = Instant::now();
            let (what, ok) = match attach {
                Attach::Cdrom | Attach::CdromAhci => {
                    let what = format!("{tree} ISO as {attach}");
                    let out = boot(&img.iso, *attach, false, &what);
                    let ok = out.success();
                    (what, ok)
                }
                Attach::Uas => {
                    let what = format!("{tree} disk as uas (direct kernel)");
                    let dir = img.out.parent().unwrap();
                    let (kernel, initrd, cmdline) = uki_parts(img, dir);
                    let out = boot_with(
                        BootOptions {
                            image: Some(img.disk.clone()),
                            attach: Attach::Uas,
                            firmware: Firmware::Bios,
                            direct: Some(DirectKernel {
                                kernel,
                                initrd: Some(initrd),
                                append: cmdline,
                            }),
                            ..BootOptions::default()
                        },
                        &what,
                    );
                    (what, out.success())
                }
                _ => {
                    let what = format!("{tree} disk as {attach}");
                    let out = boot(&img.disk, *attach, false, &what);
                    if out.success() {
                        check_disk_boot(img, &out, &what);
                    }
                    (what, out.success())
                }
            };
            results.push(format!(
                "{what}: {} in {:.0} s",
                if ok { "multi-user" } else { "FAILED" },
                t.elapsed().as_secs_f64()
            ));
            if matches!(attach, Attach::Usb) {
                let what = format!("{tree} ISO as usb");
                let t = Instant::now();
                let out = boot(&img.iso, Attach::Usb, false, &what);
                results.push(format!(
                    "{what}: {} in {:.0} s",
                    if out.success() {
                        "multi-user"
                    } else {
                        "FAILED"
                    },
                    t.elapsed().as_secs_f64()
                ));
            }
        }
    }
    eprintln!("boot matrix:\n  {}", results.join("\n  "));
    assert!(
        !results.iter().any(|r| r.contains("FAILED")),
        "{results:#?}"
    );
}

/// Recompresses `name` (a `.ko.xz` of the tree) with `tool`, as `.ko.EXT`, and points
/// modules.dep at it: a kernel package shipping that module compressed another way.
fn recompress_module(
    tree: &mut kiln_formats::fstree::Tree,
    contents: &dyn kiln_formats::fstree::Contents,
    moddir: &str,
    rel_xz: &str,
    ext: &str,
    tool: &[&str],
    dir: &Path,
) {
    use kiln_build::initrd;
    use kiln_formats::fstree::{DataRef, FileData, Meta, Node, NodeKind};
    let xz = initrd::read_tree_file(tree, contents, &format!("{moddir}/{rel_xz}")).unwrap();
    let src = dir.join("module.ko.xz");
    fs::write(&src, &xz).unwrap();
    let raw = run_ok(Command::new(require_tool("xz")).arg("-dc").arg(&src)).stdout;
    let plain = dir.join("module.ko");
    fs::write(&plain, &raw).unwrap();
    let packed = run_ok(
        Command::new(require_tool(tool[0]))
            .args(&tool[1..])
            .arg(&plain),
    )
    .stdout;
    let rel_new = format!("{}.{ext}", rel_xz.strip_suffix(".xz").unwrap());
    let m = Meta::default();
    let file = |b: Vec<u8>| Node {
        kind: NodeKind::File(FileData::dense(b.len() as u64, DataRef::Inline(b.into()))),
        meta: m.clone(),
        slot: None,
    };
    tree.insert(format!("{moddir}/{rel_new}").as_bytes(), file(packed), &m)
        .unwrap();
    let dep_path = format!("{moddir}/modules.dep");
    let dep =
        String::from_utf8(initrd::read_tree_file(tree, contents, &dep_path).unwrap()).unwrap();
    assert!(dep.contains(rel_xz), "{rel_xz} in modules.dep");
    let dep = dep.replace(rel_xz, &rel_new);
    tree.insert(dep_path.as_bytes(), file(dep.into_bytes()), &m)
        .unwrap();
}

/// Must hold (compressed modules): the initrd keeps trixie's modules as shipped. The kernel
/// decompresses `.ko.xz` itself (CONFIG_MODULE_DECOMPRESS with xz); dm-verity recompressed as
/// `.ko.zst` and dm-bufio as `.ko.gz` it cannot, so kiln-init decompresses those. Direct kernel
/// boot of the trixie disk with `kiln.debug`, until kiln-init switches root to systemd (the
/// other tests take systemd from there).
#[test]
fn compressed_modules_by_the_kernel_and_by_kiln_init() {
    use kiln_build::initrd::{self, InitrdOptions, ModuleFiles};
    let Some(img) = tree_or_skip("trixie-generic") else {
        return;
    };
    let dir = tmp_root().join("compressed");
    let _clean = RemoveOnPass(dir.clone());
    fs::create_dir_all(&dir).unwrap();
    let (mut tree, contents) =
        kiln_tree::open_random_access(&kiln_tree::SourceArg::TarFile(img.tar.clone())).unwrap();
    let kernel = initrd::find_kernel(&tree, None).unwrap();
    let md = kernel.modules_dir.clone();
    recompress_module(
        &mut tree,
        &contents,
        &md,
        "kernel/drivers/md/dm-verity.ko.xz",
        "zst",
        &["zstd", "-q", "-c", "-19"],
        &dir,
    );
    recompress_module(
        &mut tree,
        &contents,
        &md,
        "kernel/drivers/md/dm-bufio.ko.xz",
        "gz",
        &["gzip", "-n", "-c", "-9"],
        &dir,
    );
    let opts = InitrdOptions {
        root_fs: Some("erofs".into()),
        kiln_init: kiln_init_embed::kiln_init(std::env::consts::ARCH)
            .unwrap()
            .to_vec(),
        module_files: ModuleFiles::AsShipped,
        ..InitrdOptions::default()
    };
    let shipped = initrd::build_initrd(&tree, &contents, &opts).unwrap();
    let decompressed = initrd::build_initrd(
        &tree,
        &contents,
        &InitrdOptions {
            module_files: ModuleFiles::Decompressed,
            ..opts.clone()
        },
    )
    .unwrap();
    eprintln!(
        "trixie initrd: {} bytes with modules as shipped, {} decompressed",
        shipped.bytes.len(),
        decompressed.bytes.len()
    );
    let initrd_path = dir.join("initrd-as-shipped");
    fs::write(&initrd_path, &shipped.bytes).unwrap();
    let (kernel_path, _, cmdline) = uki_parts(img, &dir);
    let out = {
        let _one = QEMU.lock().unwrap_or_else(|p| p.into_inner());
        qemu::boot(&BootOptions {
            image: Some(img.disk.clone()),
            firmware: Firmware::Bios,
            direct: Some(DirectKernel {
                kernel: kernel_path,
                initrd: Some(initrd_path),
                append: format!("{cmdline} kiln.debug"),
            }),
            expect: Some("switching root to /sbin/init".into()),
            timeout: Duration::from_secs(180),
            echo: false,
            ..BootOptions::default()
        })
        .unwrap()
    };
    eprintln!("boot with compressed modules: {}", out.summary());
    assert_eq!(out.ending, Ending::Matched, "{}", out.console);
    let line = |m: &str| {
        out.console
            .lines()
            .find(|l| l.contains(&format!("loaded {m} in ")))
            .unwrap_or_else(|| panic!("no 'loaded {m}' line:\n{}", out.console))
            .to_string()
    };
    for (m, how) in [
        ("erofs", "xz decompressed by the kernel"),
        ("dm_verity", "zstd decompressed by kiln-init"),
        ("dm_bufio", "gzip decompressed by kiln-init"),
    ] {
        let l = line(m);
        assert!(l.contains(how), "{m}: {l}");
    }
    assert!(out.console.contains("dm-verity active"), "{}", out.console);
    if let Some(l) = out.console.lines().find(|l| l.contains("modules for")) {
        eprintln!("{l}");
    }
}
