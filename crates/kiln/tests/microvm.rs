//! MicroVM root drives (issue 18, item 3): `[image] output = ["rootfs"]` writes the root
//! partition's filesystem as a bare image, which the kernel mounts as it is.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::Path;
use std::process::Command;

use kiln_testkit::oracle::{self, Fs};
use kiln_testkit::{pseudo_random, require_tool, run, run_ok};
use serde_json::Value;

fn kiln() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.env_remove("SOURCE_DATE_EPOCH");
    c
}

fn tree(root: &Path) {
    fs::create_dir_all(root.join("etc/systemd/system")).unwrap();
    fs::create_dir_all(root.join("usr/bin")).unwrap();
    fs::write(root.join("etc/hostname"), "vm\n").unwrap();
    fs::write(root.join("usr/bin/agent"), pseudo_random(7, 300_000)).unwrap();
    fs::write(root.join("usr/bin/zeroes"), vec![0u8; 1 << 20]).unwrap();
    fs::write(
        root.join("etc/systemd/system/agent.service"),
        "[Service]\nExecStart=/usr/bin/agent\n",
    )
    .unwrap();
}

#[test]
fn rootfs_output_is_a_bare_filesystem_the_kernel_mounts() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    tree(&src);
    for fs_name in ["ext4", "erofs"] {
        let dir = d.path().join(fs_name);
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("kiln.toml"),
            format!(
                "[image]\nname = \"vm\"\nversion = \"1\"\noutput = [\"rootfs\"]\n\n\
                 [[partition]]\ntype = \"root\"\nfs = \"{fs_name}\"\n"
            ),
        )
        .unwrap();
        let out = dir.join("out");
        run_ok(
            kiln()
                .arg("build")
                .arg(&dir)
                .arg("-o")
                .arg(&out)
                .arg("--source")
                .arg(&src)
                .arg("-q"),
        );
        let img = out.join(format!("vm_1.rootfs.{fs_name}"));
        assert!(img.is_file(), "{fs_name}: no {}", img.display());
        assert!(
            !out.join("vm_1.img").exists(),
            "output = [\"rootfs\"] alone keeps no disk image"
        );
        let report: Value =
            serde_json::from_slice(&fs::read(out.join("vm.json")).unwrap()).unwrap();
        assert!(
            report["disk"].is_null(),
            "{fs_name}: the report names no disk"
        );
        let listed = report["artifacts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["file"] == format!("vm_1.rootfs.{fs_name}"))
            .unwrap_or_else(|| panic!("{fs_name}: rootfs not in the report's artifacts"));
        let sha = run_ok(Command::new("sha256sum").arg(&img));
        assert_eq!(
            listed["digest"].as_str().unwrap(),
            format!("sha256:{}", &String::from_utf8_lossy(&sha.stdout)[..64]),
            "{fs_name}: the report's digest is the file's"
        );
        kiln_testkit::schema::assert_valid("build", &report);
        // No GPT: the filesystem starts at byte 0 (ext4's magic at 1080, EROFS's at 1024).
        let head = fs::read(&img).unwrap();
        match fs_name {
            "ext4" => {
                assert_eq!(&head[1080..1082], &[0x53, 0xef]);
                let o = run(Command::new(require_tool("e2fsck")).arg("-fn").arg(&img));
                assert!(o.status.success(), "e2fsck -fn {}", img.display());
            }
            _ => {
                assert_eq!(&head[1024..1028], &0xe0f5_e1e2u32.to_le_bytes());
                let o = run(Command::new(require_tool("fsck.erofs")).arg(&img));
                assert!(o.status.success(), "fsck.erofs {}", img.display());
            }
        }
        let kind = if fs_name == "ext4" {
            Fs::Ext4
        } else {
            Fs::Erofs
        };
        if oracle::host_can_mount(kind) {
            oracle::with_host_mount(&img, kind, |mnt| {
                for p in [
                    "etc/hostname",
                    "usr/bin/agent",
                    "usr/bin/zeroes",
                    "etc/systemd/system/agent.service",
                ] {
                    assert_eq!(
                        fs::read(mnt.join(p)).unwrap(),
                        fs::read(src.join(p)).unwrap(),
                        "{fs_name}: /{p} as the kernel reads it"
                    );
                }
            });
        } else {
            oracle::check_on_host(fs_name, &oracle::scan(&src), &img, kind);
        }
    }
}

/// Must hold (#18): a Debian image with a systemd service made from the image config boots as
/// a microVM rootfs. The Debian tree (the cloud kernel: virtio-mmio and virtio-blk are
/// modules) is the first layer of an OCI image layout, a second layer adds /srv/agent.txt, and
/// the config's Entrypoint/Cmd/WorkingDir (`cat agent.txt` in /srv) become the unit of
/// `[source] service = "agent"`; built as `output = ["rootfs"]` and booted with
/// `kiln boot --microvm` under TCG from the kernel and initrd the build wrote beside it. The
/// marker reaches the console only through that unit, run where the config says, reading
/// the second layer's file.
#[test]
fn debian_rootfs_boots_as_a_microvm_and_runs_its_service() {
    let Some(tar) = kiln_testkit::debian_tree("bookworm-cloud") else {
        return;
    };
    require_tool("qemu-system-x86_64");
    require_tool("python3");
    let d = tempfile::tempdir().unwrap();
    let layout = d.path().join("layout");
    run_ok(
        Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/oci_support/layout.py"
            ))
            .arg(&layout)
            .arg("agent")
            .arg(&tar),
    );
    fs::write(
        d.path().join("kiln.toml"),
        format!(
            "[image]\nname = \"vm\"\nversion = \"1\"\noutput = [\"rootfs\"]\n\n\
             [source]\ntree = \"oci-layout:{}:v1\"\nservice = \"agent\"\n\n\
             [[partition]]\ntype = \"root\"\nfs = \"ext4\"\n",
            layout.display()
        ),
    )
    .unwrap();
    let out = d.path().join("out");
    let t = std::time::Instant::now();
    run_ok(
        kiln()
            .arg("build")
            .arg(d.path())
            .arg("-o")
            .arg(&out)
            .arg("-q"),
    );
    eprintln!("built in {:.1?}", t.elapsed());
    for f in ["vm_1.rootfs.ext4", "vm_1.vmlinuz", "vm_1.initrd"] {
        assert!(out.join(f).is_file(), "no {f}");
    }
    let t = std::time::Instant::now();
    let o = run(kiln()
        .arg("boot")
        .arg("--microvm")
        .arg("--kernel")
        .arg(out.join("vm_1.vmlinuz"))
        .arg("--initrd")
        .arg(out.join("vm_1.initrd"))
        .args(["--expect", "KILN-MICROVM-SERVICE-RAN", "--timeout", "240"])
        .args(["--memory", "1024"])
        .arg(out.join("vm_1.rootfs.ext4")));
    let console = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "the microVM did not print the marker ({}):\n{}\n{}",
        o.status,
        console
            .lines()
            .rev()
            .take(60)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n"),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        console
            .lines()
            .any(|l| l.contains("virtio_blk virtio") && l.contains("[vda]")),
        "the disk came through virtio-mmio as /dev/vda"
    );
    eprintln!("microVM marker after {:.1?}", t.elapsed());
}
