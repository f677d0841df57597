//! Boot tests under QEMU (TCG). The test disk is made with the reference tools — `mke2fs -d`
//! for a busybox root, `veritysetup format` for its hash tree, `sfdisk` for a GPT whose root
//! data and hash partition UUIDs are the root hash halves, `mkfs.fat` + `mcopy` for the ESP —
//! and booted with kiln's initrd (kiln-init + modules from the machine's Debian kernel) and
//! kiln's UKI. The root's /sbin/init prints markers the tests look for.
//!
//! The reference tools, QEMU, OVMF, the kernel and systemd-boot are required: CI installs them
//! (.ci/run); a missing one fails the test with its name.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use kiln_build::initrd::{self, Compression, InitrdOptions};
use kiln_build::qemu::{self, BootOptions, DirectKernel, Ending, Firmware};
use kiln_formats::fstree::{DataRef, FileData, HostContents, Meta, Node, NodeKind, Tree};
use kiln_formats::pe;
use kiln_formats::repart::Uuid;
use kiln_testkit::{
    host_kernel_version as kernel_version, process_dir, require_tool as tool, run_ok,
};

const ESP_TYPE: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
const ROOT_TYPE: &str = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709";
const VERITY_TYPE: &str = "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5";
const VAR_TYPE: &str = "4d21b016-b534-45c2-a9fb-5c16e091fd2d";
/// Partition layout in 512-byte sectors: (start, size).
const ESP: (u64, u64) = (2048, 65536);
const ROOT: (u64, u64) = (67584, 32768);
const HASH: (u64, u64) = (100352, 4096);
const VAR: (u64, u64) = (104448, 16384);
const DISK_SECTORS: u64 = 122880;

/// TCG boots are CPU-bound; running two at once on a small machine only makes both slow.
static QEMU: Mutex<()> = Mutex::new(());

struct Fixture {
    dir: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    /// Disk with ESP (systemd-boot + UKI), verity root, hash, /var.
    disk: PathBuf,
    /// The same disk with one byte of /etc/tamper's data flipped in the root partition.
    tampered: PathBuf,
    /// An ISO 9660 image (volume KILN_LIVE) holding the root as /live/root.img and its hash
    /// tree as /live/root.img.verity.
    live_iso: PathBuf,
    roothash: String,
}

/// Runs a command that must succeed; its stdout.
fn run(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run_ok(cmd).stdout).into_owned()
}

/// 32 hex digits as a hyphenated UUID.
fn uuid_of(hex: &str) -> Uuid {
    Uuid::try_parse(hex).unwrap()
}

/// A tree holding the machine's kernel and modules, referenced by host path.
fn kernel_tree(ver: &str) -> Tree {
    let mut t = Tree::default();
    let m = Meta::default();
    let add = |t: &mut Tree, tree_path: &str, host: &Path| {
        let size = std::fs::metadata(host)
            .unwrap_or_else(|e| panic!("{}: {e}", host.display()))
            .len();
        t.insert(
            tree_path.as_bytes(),
            Node {
                kind: NodeKind::File(FileData::dense(size, DataRef::Host(host.into()))),
                meta: m.clone(),
                slot: None,
            },
            &m,
        )
        .unwrap();
    };
    add(
        &mut t,
        &format!("/boot/vmlinuz-{ver}"),
        Path::new(&format!("/boot/vmlinuz-{ver}")),
    );
    let base = PathBuf::from(format!("/usr/lib/modules/{ver}"));
    for f in initrd::DB_FILES {
        if base.join(f).is_file() {
            add(
                &mut t,
                &format!("/usr/lib/modules/{ver}/{f}"),
                &base.join(f),
            );
        }
    }
    let dep = std::fs::read_to_string(base.join("modules.dep")).unwrap();
    for line in dep.lines() {
        if let Some((p, _)) = line.split_once(':') {
            add(
                &mut t,
                &format!("/usr/lib/modules/{ver}/{p}"),
                &base.join(p),
            );
        }
    }
    t
}

const INIT_SCRIPT: &str = r#"#!/bin/sh
echo "KILN-TEST-MARKER"
cat /etc/hello
grep -E " / | /var " /proc/mounts
if echo persisted > /var/probe && [ "$(cat /var/probe)" = persisted ]; then echo VAR-WRITABLE; fi
if echo x > /root-probe 2>/dev/null; then echo ROOT-WRITABLE; else echo ROOT-READONLY; fi
if echo x > /etc/probe 2>/dev/null && [ "$(cat /etc/probe)" = x ]; then echo ETC-WRITABLE; fi
if echo x > /tmp/probe 2>/dev/null; then echo TMP-WRITABLE; fi
grep -E " /etc | /tmp " /proc/mounts
if err=$(cat /etc/tamper 2>&1 >/dev/null); then echo TAMPER-READ-OK; else echo "TAMPER-IO-ERROR $err"; fi
echo KILN-DONE
poweroff -f
"#;

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(build_fixture)
}

fn build_fixture() -> Fixture {
    let dir = process_dir(Path::new(env!("CARGO_TARGET_TMPDIR")), "boot");
    std::fs::create_dir_all(&dir).unwrap();
    let ver = kernel_version();

    // Root tree: busybox and an init script.
    let root = dir.join("root");
    for d in [
        "bin", "sbin", "etc", "proc", "sys", "dev", "run", "var", "tmp",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(tool("busybox"), root.join("bin/busybox")).unwrap();
    for a in ["sh", "cat", "echo", "grep", "poweroff", "mount", "ls", "["] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).unwrap();
    }
    std::fs::write(root.join("sbin/init"), INIT_SCRIPT).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        root.join("sbin/init"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(root.join("etc/hello"), "hello from the verity root\n").unwrap();
    // 64 KiB of deterministic, incompressible-looking bytes.
    let mut x = 0x2545F4914F6CDD1Du64;
    let tamper: Vec<u8> = (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(root.join("etc/tamper"), &tamper).unwrap();

    let root_img = dir.join("root.ext4");
    run(Command::new(tool("mke2fs"))
        .args([
            "-q",
            "-F",
            "-t",
            "ext4",
            "-b",
            "4096",
            "-E",
            "root_owner=0:0",
            "-d",
        ])
        .arg(&root)
        .arg(&root_img)
        .arg(format!("{}k", ROOT.1 / 2)));
    let hash_img = dir.join("root.verity");
    let vf = run(Command::new(tool("veritysetup"))
        .arg("format")
        .arg("--salt=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
        .arg("--uuid=8d6c1a36-5a7c-4ff6-9d0e-0a6f0d5ec0de")
        .arg(&root_img)
        .arg(&hash_img));
    let roothash = vf
        .lines()
        .find_map(|l| l.strip_prefix("Root hash:"))
        .expect("veritysetup printed a root hash")
        .trim()
        .to_string();
    assert_eq!(roothash.len(), 64);
    let var_img = dir.join("var.ext4");
    run(Command::new(tool("mke2fs"))
        .args(["-q", "-F", "-t", "ext4"])
        .arg(&var_img)
        .arg(format!("{}k", VAR.1 / 2)));

    // Initrd and UKI.
    let tree = kernel_tree(&ver);
    let init = kiln_init_embed::kiln_init(std::env::consts::ARCH)
        .expect("kiln-init is embedded in this build");
    let t0 = std::time::Instant::now();
    let ird = initrd::build_initrd(
        &tree,
        &HostContents,
        &InitrdOptions {
            root_fs: Some("ext4".into()),
            kiln_init: init.to_vec(),
            mtime: 1_700_000_000,
            compression: Compression::default(),
            ..InitrdOptions::default()
        },
    )
    .expect("initrd");
    eprintln!(
        "initrd: {} bytes, {} modules, built in {:.1} s; builtin {:?}; skipped {:?}",
        ird.bytes.len(),
        ird.modules.len(),
        t0.elapsed().as_secs_f64(),
        ird.builtin,
        ird.skipped
    );
    let initrd_path = dir.join("initrd.zst");
    std::fs::write(&initrd_path, &ird.bytes).unwrap();
    let kernel = PathBuf::from(format!("/boot/vmlinuz-{ver}"));
    let stub = std::fs::read("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
        .expect("systemd's UKI stub (install systemd-boot-efi; CI does)");
    let kernel_bytes = std::fs::read(&kernel).unwrap();
    let cmdline = format!("console=ttyS0 panic=-1 roothash={roothash}");
    let uki = pe::assemble_uki(
        &stub,
        &pe::UkiParts {
            linux: &kernel_bytes,
            initrd: &ird.bytes,
            cmdline: cmdline.as_bytes(),
            osrel: b"NAME=kiln-test\nID=kiln-test\nVERSION_ID=1\nPRETTY_NAME=\"kiln boot test\"\n",
            uname: Some(ver.as_bytes()),
            ..pe::UkiParts::default()
        },
    )
    .expect("UKI");
    let uki_path = dir.join("x.efi");
    std::fs::write(&uki_path, &uki).unwrap();

    // ESP.
    let esp = dir.join("esp.img");
    run(Command::new(tool("mkfs.fat"))
        .args(["-C", "-n", "ESP"])
        .arg(&esp)
        .arg((ESP.1 / 2).to_string()));
    let loader = dir.join("loader.conf");
    std::fs::write(&loader, "timeout 0\n").unwrap();
    run(Command::new(tool("mmd")).arg("-i").arg(&esp).args([
        "::/EFI",
        "::/EFI/BOOT",
        "::/EFI/Linux",
        "::/loader",
    ]));
    for (src, dst) in [
        (
            PathBuf::from("/usr/lib/systemd/boot/efi/systemd-bootx64.efi"),
            "::/EFI/BOOT/BOOTX64.EFI",
        ),
        (uki_path.clone(), "::/EFI/Linux/x.efi"),
        (loader.clone(), "::/loader/loader.conf"),
    ] {
        run(Command::new(tool("mcopy"))
            .arg("-i")
            .arg(&esp)
            .arg(&src)
            .arg(dst));
    }

    // GPT disk.
    let disk = dir.join("disk.img");
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(DISK_SECTORS * 512).unwrap();
    drop(f);
    let table = format!(
        "label: gpt\n\
         start={}, size={}, type={ESP_TYPE}, name=esp\n\
         start={}, size={}, type={ROOT_TYPE}, uuid={}, name=root-x86-64\n\
         start={}, size={}, type={VERITY_TYPE}, uuid={}, name=root-x86-64-verity\n\
         start={}, size={}, type={VAR_TYPE}, name=var\n",
        ESP.0,
        ESP.1,
        ROOT.0,
        ROOT.1,
        uuid_of(&roothash[..32]),
        HASH.0,
        HASH.1,
        uuid_of(&roothash[32..]),
        VAR.0,
        VAR.1
    );
    let mut child = Command::new(tool("sfdisk"))
        .arg("-q")
        .arg(&disk)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(table.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk");
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    for (img, (start, size)) in [
        (&esp, ESP),
        (&root_img, ROOT),
        (&hash_img, HASH),
        (&var_img, VAR),
    ] {
        let data = std::fs::read(img).unwrap();
        assert!(
            data.len() as u64 <= size * 512,
            "{} does not fit",
            img.display()
        );
        f.write_all_at(&data, start * 512).unwrap();
    }
    drop(f);

    // Tampered copy: flip a byte inside /etc/tamper's first data block.
    let bmap = run(Command::new(tool("debugfs"))
        .args(["-R", "bmap /etc/tamper 0"])
        .arg(&root_img));
    let block: u64 = bmap
        .trim()
        .parse()
        .expect("debugfs bmap prints a block number");
    let tampered = dir.join("tampered.img");
    std::fs::copy(&disk, &tampered).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&tampered)
        .unwrap();
    let off = ROOT.0 * 512 + block * 4096 + 123;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).unwrap();
    assert_eq!(b[0], tamper[123], "debugfs bmap points at the file's data");
    f.write_all_at(&[b[0] ^ 0xff], off).unwrap();

    let live_iso = dir.join("live.iso");
    run(Command::new(tool("xorriso"))
        .args(["-as", "mkisofs", "-quiet", "-R", "-V", "KILN_LIVE", "-o"])
        .arg(&live_iso)
        .arg("-graft-points")
        .arg(format!("/live/root.img={}", root_img.display()))
        .arg(format!("/live/root.img.verity={}", hash_img.display())));

    Fixture {
        dir,
        kernel,
        initrd: initrd_path,
        disk,
        tampered,
        live_iso,
        roothash,
    }
}

fn direct_boot(image: &Path, append: String, expect: &str, fail: Vec<String>) -> qemu::BootOutcome {
    let fx = fixture();
    let _guard = QEMU.lock().unwrap_or_else(|e| e.into_inner());
    let out = qemu::boot(&BootOptions {
        image: Some(image.to_path_buf()),
        firmware: Firmware::Bios,
        direct: Some(DirectKernel {
            kernel: fx.kernel.clone(),
            initrd: Some(fx.initrd.clone()),
            append,
        }),
        expect: Some(expect.into()),
        fail,
        timeout: Duration::from_secs(180),
        memory_mib: 512,
        echo: false,
        ..BootOptions::default()
    })
    .expect("qemu runs");
    eprintln!("boot: {}", out.summary());
    out
}

fn assert_lines(console: &str, wanted: &[&str]) {
    for w in wanted {
        assert!(console.contains(w), "console lacks {w:?}:\n{console}");
    }
}

#[test]
fn verity_root_boots_and_tampering_is_an_io_error() {
    let fx = fixture();
    let out = direct_boot(
        &fx.tampered,
        format!("console=ttyS0 panic=-1 roothash={}", fx.roothash),
        "KILN-DONE",
        qemu::DEFAULT_FAIL_PATTERNS
            .iter()
            .map(|s| s.to_string())
            .collect(),
    );
    assert_eq!(out.ending, Ending::Matched, "{}", out.console);
    eprintln!(
        "verity boot (direct kernel, TCG): marker after {:.1} s",
        out.elapsed.as_secs_f64()
    );
    assert_lines(
        &out.console,
        &[
            "KILN-TEST-MARKER",
            "hello from the verity root",
            "/dev/mapper/root / ext4 ro",
            " /var ext4 rw",
            "VAR-WRITABLE",
            "ROOT-READONLY",
            "TAMPER-IO-ERROR",
            "Input/output error",
            "is corrupted",
        ],
    );
    assert!(!out.console.contains("TAMPER-READ-OK"), "{}", out.console);
    assert!(!out.console.contains("ETC-WRITABLE"), "{}", out.console);
}

#[test]
fn root_without_roothash_is_found_by_dps_type() {
    let fx = fixture();
    let out = direct_boot(
        &fx.tampered,
        "console=ttyS0 panic=-1 kiln.var=off kiln.overlay=/etc kiln.tmpfs=/tmp".into(),
        "KILN-DONE",
        qemu::DEFAULT_FAIL_PATTERNS
            .iter()
            .map(|s| s.to_string())
            .collect(),
    );
    assert_eq!(out.ending, Ending::Matched, "{}", out.console);
    // No verity: the flipped byte goes unnoticed, and /var stays unmounted as asked.
    assert_lines(
        &out.console,
        &[
            "KILN-TEST-MARKER",
            "/dev/vda2 / ext4 ro",
            "TAMPER-READ-OK",
            "ROOT-READONLY",
            "overlay /etc overlay rw",
            "ETC-WRITABLE",
            "tmpfs /tmp tmpfs rw",
            "TMP-WRITABLE",
        ],
    );
    assert!(!out.console.contains(" /var ext4"), "{}", out.console);
}

#[test]
fn kiln_init_failure_is_reported_then_reboots() {
    let fx = fixture();
    let wrong = "ab".repeat(32);
    let out = direct_boot(
        &fx.disk,
        format!("console=ttyS0 panic=-1 roothash={wrong} kiln.timeout=3 kiln.reboot_delay=1"),
        "KILN-TEST-MARKER",
        vec![r"Kernel panic".into()],
    );
    // -no-reboot turns the guest's reboot into QEMU exiting.
    assert_eq!(out.ending, Ending::Exited(Some(0)), "{}", out.console);
    assert_lines(
        &out.console,
        &[
            "kiln-init: the dm-verity data and hash partitions not found within 3 s",
            "kiln-init: boot failed; rebooting in 1 s",
            "reboot: Restarting system",
        ],
    );
}

/// The whole UEFI path: OVMF → systemd-boot (EFI/BOOT/BOOTX64.EFI) → kiln's UKI in
/// EFI/Linux → kernel → kiln's initrd → verity root, driven through `kiln boot`.
#[test]
fn uki_boots_under_ovmf_with_kiln_boot() {
    let fx = fixture();
    let _guard = QEMU.lock().unwrap_or_else(|e| e.into_inner());
    let t = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("boot")
        .arg(&fx.disk)
        .args([
            "--expect",
            "KILN-DONE",
            "--timeout",
            "240",
            "--memory",
            "512",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kiln boot failed: {stderr}\n{stdout}");
    eprintln!(
        "UKI boot under OVMF (TCG) via kiln boot: {:.1} s; {}",
        t.elapsed().as_secs_f64(),
        stderr.trim()
    );
    assert_lines(
        &stdout,
        &[
            "KILN-TEST-MARKER",
            "hello from the verity root",
            "/dev/mapper/root / ext4 ro",
            "VAR-WRITABLE",
            "TAMPER-READ-OK",
        ],
    );
    // The command line came from the UKI's .cmdline section.
    assert!(
        stdout.contains(&format!("roothash={}", fx.roothash)),
        "{stdout}"
    );
    assert!(stderr.contains("kiln boot: matched after"), "{stderr}");
    let _ = &fx.dir;
}

#[test]
fn kiln_boot_fails_on_timeout() {
    let fx = fixture();
    let _guard = QEMU.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("boot")
        .arg(&fx.disk)
        .arg("--kernel")
        .arg(&fx.kernel)
        .arg("--initrd")
        .arg(&fx.initrd)
        .args([
            "--append",
            // A root that never appears, waited for far longer than the timeout: the guest
            // stays busy however fast the machine is.
            "console=ttyS0 panic=-1 kiln.var=off kiln.timeout=300 \
             root=PARTUUID=0badc0de-0000-4000-8000-000000000000",
            "--expect",
            "NEVER-PRINTED",
            "--timeout",
            "4",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no match within 4 s"), "{stderr}");
}

/// Live mode: the medium found by its ISO volume label on a CD (virtio-scsi), the root image
/// loop-mounted read-only under dm-verity (hash tree beside it on the medium), a RAM overlay
/// on top so the root is writable and nothing reaches the medium.
#[test]
fn live_iso_root_with_verity_and_ram_overlay() {
    let fx = fixture();
    let _guard = QEMU.lock().unwrap_or_else(|e| e.into_inner());
    let out = qemu::boot(&BootOptions {
        image: Some(fx.live_iso.clone()),
        attach: qemu::Attach::Cdrom,
        firmware: Firmware::Bios,
        direct: Some(DirectKernel {
            kernel: fx.kernel.clone(),
            initrd: Some(fx.initrd.clone()),
            append: format!(
                "console=ttyS0 panic=-1 kiln.live=KILN_LIVE roothash={}",
                fx.roothash
            ),
        }),
        expect: Some("KILN-DONE".into()),
        timeout: Duration::from_secs(180),
        memory_mib: 512,
        echo: false,
        ..BootOptions::default()
    })
    .expect("qemu runs");
    eprintln!("live boot (CD, direct kernel, TCG): {}", out.summary());
    assert_eq!(out.ending, Ending::Matched, "{}", out.console);
    assert_lines(
        &out.console,
        &[
            "live medium \"KILN_LIVE\" mounted from /dev/sr0",
            "dm-verity active over /live/root.img",
            "KILN-TEST-MARKER",
            "hello from the verity root",
            "overlay / overlay rw",
            "ROOT-WRITABLE",
            "TAMPER-READ-OK",
        ],
    );
}

/// Same inputs, same bytes: the initrd (real kernel modules, default zstd) and the UKI built
/// from it, twice.
#[test]
fn initrd_and_uki_are_reproducible() {
    let ver = kernel_version();
    let tree = kernel_tree(&ver);
    let init = kiln_init_embed::kiln_init(std::env::consts::ARCH).expect("embedded kiln-init");
    let opts = InitrdOptions {
        root_fs: Some("erofs".into()),
        kiln_init: init.to_vec(),
        mtime: 1_600_000_000,
        ..InitrdOptions::default()
    };
    let a = initrd::build_initrd(&tree, &HostContents, &opts).unwrap();
    let b = initrd::build_initrd(&kernel_tree(&ver), &HostContents, &opts).unwrap();
    assert_eq!(a.bytes, b.bytes, "initrd differs between two builds");
    assert!(a.modules.contains(&"erofs".to_string()), "{:?}", a.modules);
    let stub = std::fs::read("/usr/lib/systemd/boot/efi/linuxx64.efi.stub").unwrap();
    let kernel = std::fs::read(format!("/boot/vmlinuz-{ver}")).unwrap();
    let uki = |initrd: &[u8]| {
        pe::assemble_uki(
            &stub,
            &pe::UkiParts {
                linux: &kernel,
                initrd,
                cmdline: b"console=ttyS0",
                osrel: b"ID=kiln\n",
                ..pe::UkiParts::default()
            },
        )
        .unwrap()
    };
    let (ua, ub) = (uki(&a.bytes), uki(&b.bytes));
    assert!(ua == ub, "UKI differs between two builds");
}

/// Without --expect, `kiln boot` succeeds only when the guest powers off: the init script
/// ends with `poweroff -f`, while a failing kiln-init reboots.
#[test]
fn kiln_boot_without_expect_needs_a_power_off() {
    let fx = fixture();
    let _guard = QEMU.lock().unwrap_or_else(|e| e.into_inner());
    let boot = |append: &str| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("boot")
            .arg(&fx.disk)
            .arg("--kernel")
            .arg(&fx.kernel)
            .arg("--initrd")
            .arg(&fx.initrd)
            .args(["--append", append, "--timeout", "120", "--memory", "512"])
            .output()
            .unwrap()
    };
    let ok = boot("console=ttyS0 panic=-1 kiln.var=off");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("reboot: Power down"));
    // kiln-init fails (no such device) and reboots: the run fails on its message.
    let bad = boot("console=ttyS0 panic=-1 root=/dev/vdz kiln.timeout=1 kiln.reboot_delay=0");
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("failed after") && stderr.contains("kiln-init: boot failed"),
        "{stderr}"
    );
}
