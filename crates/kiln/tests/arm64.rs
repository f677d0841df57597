//! arm64 images built on an x86-64 host (issue #17), booted under `qemu-system-aarch64 -M virt`
//! with AAVMF (TCG): the arm64 example appliance (busybox and the arm64 cloud kernel, unpacked
//! from Debian's arm64 packages; dm-verity EROFS root with an A/B twin, /var, the "piece"
//! slot) shows its injected page, and a broken update falls back to the blessed version by
//! boot counting; a Debian arm64 tree made by mmdebstrap (maintainer scripts under
//! qemu-user-static) reaches multi-user.target with systemd from the verity disk (booted from
//! its qcow2) and from the live ISO on a CD; a tree of the other architecture is a build error
//! naming the file.
//!
//! Needs qemu-system-aarch64, AAVMF, the arm64 packages (`dpkg --add-architecture arm64`) and
//! a kiln with kiln-init for aarch64 embedded: `scripts/test` installs them. The Debian tree
//! is skipped when missing unless `KILN_REQUIRE_DEBIAN_TREES=1` (CI sets it).

#![allow(clippy::unwrap_used)]

mod ab_support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_build::qemu::{self, Attach, BootOptions, BootOutcome, Firmware};
use kiln_formats::arch::Arch;
use kiln_formats::gpt::{self, Gpt};
use kiln_formats::pe;
use kiln_testkit::{debian_tree, process_dir, require_tool, run, run_ok};

use ab_support::{check_systemd_disk_boot, esp_ukis, markers, must_succeed, report_of};

/// TCG boots are CPU-bound; two at once on a small machine only make both slow.
static QEMU: Mutex<()> = Mutex::new(());

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

fn tools() {
    for t in ["qemu-system-aarch64", "apt-get", "dpkg-deb", "busybox"] {
        require_tool(t);
    }
    assert!(
        Path::new("/usr/share/AAVMF/AAVMF_CODE.fd").is_file(),
        "AAVMF is missing; install qemu-efi-aarch64 (scripts/test does)"
    );
    assert!(
        kiln_init_embed::embedded("aarch64").is_some() || std::env::var_os("KILN_INIT_AARCH64").is_some(),
        "this kiln has no kiln-init for aarch64 embedded (see the build warnings: gcc-aarch64-linux-gnu and the aarch64-unknown-linux-musl target)"
    );
}

/// The arm64 appliance tree, made once per test process (`make-rootfs --arch arm64`).
fn arm64_rootfs(broken: bool) -> PathBuf {
    let d = process_dir(Path::new(env!("CARGO_TARGET_TMPDIR")), "arm64-rootfs");
    let out = d.join(if broken { "broken" } else { "good" });
    static MADE: Mutex<()> = Mutex::new(());
    let _one = MADE.lock().unwrap_or_else(|p| p.into_inner());
    if !out.exists() {
        let mut c = Command::new(examples().join("appliance/make-rootfs"));
        c.arg(&out).args(["--arch", "arm64"]);
        if broken {
            c.arg("--broken-health");
        }
        run_ok(&mut c);
    }
    out
}

fn build(spec: &Path, src: &Path, version: &str, out: &Path) {
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
}

fn boot(disk: &Path, expect: &str, timeout: u64, what: &str) -> BootOutcome {
    boot_with(disk, Attach::Disk, true, expect, timeout, what)
}

/// Boots `image` on the virt machine with AAVMF until `expect`; fails the test if it does not
/// get there. `keep` lets the guest write to the image (boot counting).
fn boot_with(
    image: &Path,
    attach: Attach,
    keep: bool,
    expect: &str,
    timeout: u64,
    what: &str,
) -> BootOutcome {
    let _one = QEMU.lock().unwrap_or_else(|p| p.into_inner());
    let out = qemu::boot(&BootOptions {
        image: Some(image.to_path_buf()),
        attach,
        firmware: Firmware::Ovmf(None),
        arch: Arch::Arm64,
        expect: Some(expect.into()),
        timeout: Duration::from_secs(timeout),
        keep,
        echo: false,
        ..BootOptions::default()
    })
    .unwrap();
    eprintln!("boot {what}: {}", out.summary());
    must_succeed(&out, what);
    out
}

/// Must hold 1: the arm64 verity disk boots to its marker with the injected slot content;
/// A/B fallback works on arm64 as on x86-64. Also what the disk is made of: arm64 DPS types,
/// BOOTAA64.EFI, a UKI for machine 0xaa64.
#[test]
fn arm64_appliance_shows_injected_page_and_falls_back() {
    tools();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let spec = examples().join("appliance-arm64");
    let good = arm64_rootfs(false);
    let broken = arm64_rootfs(true);
    build(&spec, &good, "1", &dir.join("v1"));
    build(&spec, &broken, "2", &dir.join("v2"));

    let base = dir.join("v1/appliance_1.img");
    let f = fs::File::open(&base).unwrap();
    let table = Gpt::read(&f).unwrap();
    let types: Vec<_> = table.partitions.iter().map(|p| p.type_guid).collect();
    for t in [gpt::TYPE_ROOT_ARM64, gpt::TYPE_ROOT_ARM64_VERITY] {
        assert_eq!(types.iter().filter(|x| **x == t).count(), 2, "{types:?}");
    }
    assert!(!types.contains(&gpt::TYPE_ROOT_X86_64));
    assert_eq!(qemu::esp_arches(&base), Some(vec![Arch::Arm64]));
    // The UKI is an arm64 PE image whose .linux is the arm64 kernel.
    let uki = fs::read(dir.join("v1/appliance_1.efi")).unwrap();
    let p = pe::Pe::parse(&uki, "UKI").unwrap();
    assert_eq!(p.coff.machine.get(), pe::MACHINE_ARM64);
    let linux = p.section_data(p.section(".linux").unwrap());
    assert_eq!(
        kiln_formats::arch::kernel_image_arch(linux),
        Some(Arch::Arm64)
    );

    // The machine's disk: v1 with its own page injected.
    let page = "<html><body><h1>arm64 kiosk</h1>\n<p>machine 0aa64</p></body></html>\n";
    fs::write(dir.join("mine.html"), page).unwrap();
    let disk = dir.join("disk.img");
    run_ok(
        kiln()
            .arg("inject")
            .arg(&base)
            .arg("--slot")
            .arg(format!("piece={}", dir.join("mine.html").display()))
            .arg("-o")
            .arg(&disk),
    );
    let o = boot(&disk, "APPLIANCE-DONE", 240, "arm64 v1");
    assert!(o.console.contains("dm-verity active"), "{}", o.console);
    let m = markers(&o);
    assert!(
        m.contains(&"APPLIANCE-BOOT image=appliance version=1"),
        "{m:?}"
    );
    let shown = o
        .console
        .split("APPLIANCE-PAGE-BEGIN")
        .nth(1)
        .and_then(|s| s.split("APPLIANCE-PAGE-END").next())
        .unwrap_or_else(|| panic!("no page:\n{}", o.console));
    for line in page.lines() {
        assert!(shown.contains(line), "{line:?} missing:\n{shown}");
    }
    assert!(
        m.contains(&"APPLIANCE-BLESSED appliance_1+2-1.efi -> appliance_1.efi"),
        "{m:?}"
    );

    // A broken v2 into the other slot: three unblessed tries, then v1 again by itself.
    run_ok(
        kiln()
            .arg("update")
            .arg(&disk)
            .arg("--with")
            .arg(dir.join("v2")),
    );
    assert_eq!(esp_ukis(&disk), ["appliance_1.efi", "appliance_2+3.efi"]);
    for (i, left) in [
        "appliance_2+2-1.efi",
        "appliance_2+1-2.efi",
        "appliance_2+0-3.efi",
    ]
    .iter()
    .enumerate()
    {
        let o = boot(
            &disk,
            "APPLIANCE-UNHEALTHY",
            240,
            &format!("arm64 v2 try {}", i + 1),
        );
        let m = markers(&o);
        assert!(
            m.contains(&"APPLIANCE-BOOT image=appliance version=2"),
            "{m:?}"
        );
        assert!(
            !m.iter().any(|l| l.starts_with("APPLIANCE-BLESSED")),
            "{m:?}"
        );
        assert_eq!(esp_ukis(&disk), ["appliance_1.efi", *left]);
    }
    let o = boot(&disk, "APPLIANCE-DONE", 240, "arm64 fallback to v1");
    let m = markers(&o);
    assert!(
        m.contains(&"APPLIANCE-BOOT image=appliance version=1"),
        "{m:?}"
    );
    assert!(m.contains(&"APPLIANCE-HEALTHY version=1"), "{m:?}");
}

/// An arm64 spec over an x86-64 tree, and the x86-64 spec over an arm64 tree, are build
/// errors naming a file of the wrong machine; nothing is written.
#[test]
fn a_tree_of_the_other_architecture_is_refused() {
    tools();
    let d = tempfile::tempdir().unwrap();
    let x86 = d.path().join("x86");
    run_ok(Command::new(examples().join("appliance/make-rootfs")).arg(&x86));
    for (spec, tree, want) in [
        (
            examples().join("appliance-arm64"),
            x86.clone(),
            "/bin/busybox is an ELF executable for x86-64, but the image is arm64",
        ),
        (
            examples().join("appliance"),
            arm64_rootfs(false),
            "/bin/busybox is an ELF executable for arm64, but the image is x86-64",
        ),
    ] {
        let out = d.path().join("out");
        let o = run(kiln()
            .arg("build")
            .arg(&spec)
            .arg("--source")
            .arg(&tree)
            .arg("-o")
            .arg(&out));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{err}");
        assert!(!out.join("appliance_1.img").exists());
    }
}

/// Must hold 2: a Debian arm64 tree with systemd boots the same way (the example's boot report
/// after multi-user.target, dm-verity EROFS root, /var, the serial getty on ttyAMA0).
#[test]
fn debian_arm64_reaches_multi_user_with_systemd() {
    tools();
    let Some(tar) = debian_tree("bookworm-cloud-arm64") else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let project = d.path().join("project");
    fs::create_dir_all(&project).unwrap();
    let debian = examples().join("debian");
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(debian.join("files"))
            .arg(&project),
    );
    fs::copy(debian.join("piece.html"), project.join("piece.html")).unwrap();
    let spec = fs::read_to_string(debian.join("kiln.toml"))
        .unwrap()
        .replace("[image]\n", "[image]\narch = \"arm64\"\n")
        .replace(
            "output = [\"disk\", \"iso\"]",
            "output = [\"qcow2\", \"iso\"]",
        )
        .replace("console=ttyS0", "console=ttyAMA0");
    fs::write(project.join("kiln.toml"), spec).unwrap();
    let out = d.path().join("out");
    let t = Instant::now();
    run_ok(
        kiln()
            .arg("build")
            .arg(&project)
            .arg("--source")
            .arg(&tar)
            .arg("-o")
            .arg(&out)
            .arg("-q"),
    );
    eprintln!(
        "kiln build (Debian arm64): {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // The disk, booted from its qcow2 container: what the x86-64 Debian boots show.
    let what = "Debian bookworm arm64 (qcow2)";
    let o = boot_with(
        &out.join("debian_1.qcow2"),
        Attach::Disk,
        true,
        "KILN-REPORT-END",
        600,
        what,
    );
    let report = check_systemd_disk_boot(&o, "/dev/ttyAMA0", what);
    let get = |k: &str| report.get(k).map(String::as_str).unwrap_or("<missing>");
    assert!(get("kernel").ends_with("-arm64"), "{}", get("kernel"));
    // systemd-boot (aa64) chose the counted UKI (the tree has no systemd-boot package, so
    // nothing blesses it: the appliance test covers boot counting on arm64).
    assert_eq!(get("loader-entry"), "debian_1+2.efi", "{report:?}");
    assert!(get("cmdline").contains("roothash="), "{report:?}");

    // The live ISO from a CD on virtio-scsi: El Torito's UEFI image holds BOOTAA64.EFI.
    let what = "Debian bookworm arm64 live ISO (cdrom)";
    let o = boot_with(
        &out.join("debian_1.iso"),
        Attach::Cdrom,
        false,
        "KILN-REPORT-END",
        600,
        what,
    );
    let report = report_of(&o.console);
    let get = |k: &str| report.get(k).map(String::as_str).unwrap_or("<missing>");
    assert_eq!(get("multi-user"), "active", "{report:?}");
    assert!(
        get("mount /run/kiln/medium").contains(" iso9660 ro"),
        "{report:?}"
    );
    assert_eq!(get("piece"), "<h1>debian: default piece</h1>", "{report:?}");
    assert_eq!(get("getty-tty"), "/dev/ttyAMA0", "{report:?}");
    assert_eq!(get("failed"), "", "{report:?}");
}
