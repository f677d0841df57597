//! VM disk outputs end to end, on the example appliance (examples/appliance): `[image] output`
//! with qcow2, vhd and vmdk, and `kiln convert` with compressed qcow2 clusters (zstd, zlib) and a
//! dynamic VHD. Every container passes `qemu-img check` (where the format has one) and
//! `qemu-img compare` finds it identical to the raw disk; two builds give the same bytes; the
//! digest the build reports (and `kiln convert --sha256` prints) is the file's; `kiln convert`
//! without `--sha256` writes the bytes the build wrote; the qcow2 boots under OVMF to the
//! appliance's marker.
//!
//! Needs qemu-utils (qemu-img), QEMU, OVMF, busybox-static and the kernel the appliance uses:
//! scripts/test installs them; a missing one fails the test with its name.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_build::qemu::{self, BootOptions, Firmware};
use kiln_testkit::{require_tool, run, run_ok};
use serde_json::Value;

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/appliance")
}

fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

fn sha(p: &Path) -> String {
    let o = run_ok(Command::new("sha256sum").arg(p));
    String::from_utf8_lossy(&o.stdout)[..64].to_string()
}

/// The appliance spec with `output` listing the VM disks, in a copy of the example directory.
fn spec_with_vm_outputs(dir: &Path) -> PathBuf {
    let spec_dir = dir.join("spec");
    fs::create_dir_all(&spec_dir).unwrap();
    for e in fs::read_dir(example()).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            fs::copy(e.path(), spec_dir.join(e.file_name())).unwrap();
        }
    }
    let text = fs::read_to_string(spec_dir.join("kiln.toml")).unwrap();
    let text = text.replacen(
        "[image]\n",
        "[image]\noutput = [\"disk\", \"qcow2\", \"vhd\", \"vmdk\"]\n",
        1,
    );
    fs::write(spec_dir.join("kiln.toml"), text).unwrap();
    spec_dir
}

fn build(spec: &Path, src: &Path, out: &Path) -> Value {
    run_ok(
        kiln()
            .arg("build")
            .arg(spec)
            .arg("--source")
            .arg(src)
            .arg("-o")
            .arg(out)
            .arg("-q"),
    );
    serde_json::from_slice(&fs::read(out.join("appliance.json")).unwrap()).unwrap()
}

/// `qemu-img check` exits 0 ("No errors were found") and `qemu-img compare` says identical.
fn check_and_compare(raw: &Path, img: &Path, fmt: &str) {
    let qemu_img = require_tool("qemu-img");
    if fmt != "vpc" {
        let o = run(Command::new(&qemu_img).args(["check", "-f", fmt]).arg(img));
        assert!(
            o.status.success(),
            "qemu-img check {}: {}{}",
            img.display(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let o = run(Command::new(&qemu_img)
        .args(["compare", "-f", "raw", "-F", fmt])
        .arg(raw)
        .arg(img));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && text.contains("Images are identical"),
        "qemu-img compare {} {}: {text}{}",
        raw.display(),
        img.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    // kiln's own reader agrees with the raw bytes too.
    let o = run_ok(
        Command::new(&qemu_img)
            .args(["info", "--output=json", "-f", fmt])
            .arg(img),
    );
    let info: Value = serde_json::from_slice(&o.stdout).unwrap();
    let virt = info["virtual-size"].as_u64().unwrap();
    let raw_len = fs::metadata(raw).unwrap().len();
    assert!(
        virt >= raw_len && virt - raw_len < (1 << 20),
        "{}: virtual size {virt} for a {raw_len}-byte raw disk",
        img.display()
    );
}

#[test]
fn appliance_vm_disks_check_compare_reproduce_and_boot() {
    require_tool("busybox");
    require_tool("qemu-img");
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let src = dir.join("rootfs");
    run_ok(Command::new(example().join("make-rootfs")).arg(&src));
    let spec = spec_with_vm_outputs(dir);

    let t = Instant::now();
    let a = build(&spec, &src, &dir.join("a"));
    eprintln!("build with qcow2, vhd, vmdk outputs: {:?}", t.elapsed());
    let b = build(&spec, &src, &dir.join("b"));
    let raw = dir.join("a/appliance_1.img");
    let files: Vec<String> = a["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["file"].as_str().unwrap().to_string())
        .collect();
    for (ext, fmt) in [("qcow2", "qcow2"), ("vhd", "vpc"), ("vmdk", "vmdk")] {
        let name = format!("appliance_1.{ext}");
        assert!(
            files.contains(&name),
            "report artifacts lack {name}: {files:?}"
        );
        let (pa, pb) = (dir.join("a").join(&name), dir.join("b").join(&name));
        assert_eq!(sha(&pa), sha(&pb), "{name} differs between two builds");
        // The digest the report gives (holes hashed without being read) is the file's.
        let art = a["artifacts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["file"] == name.as_str())
            .unwrap();
        assert_eq!(art["digest"], format!("sha256:{}", sha(&pa)), "{name}");
        check_and_compare(&raw, &pa, fmt);
    }
    assert_eq!(a["disk"]["digest"], b["disk"]["digest"]);
    // The fixed VHD's virtual size is the raw size rounded up to a MiB (Azure).
    let vhd_len = fs::metadata(dir.join("a/appliance_1.vhd")).unwrap().len();
    assert_eq!((vhd_len - 512) % (1 << 20), 0, "VHD of {vhd_len} bytes");

    // kiln convert: compressed qcow2 clusters and a dynamic VHD, each twice for the bytes.
    for (args, out, fmt) in [
        (
            &["--to", "qcow2", "--compression", "zstd"][..],
            "z.qcow2",
            "qcow2",
        ),
        (
            &["--to", "qcow2", "--compression", "zlib"][..],
            "l.qcow2",
            "qcow2",
        ),
        (&["--to", "vhd", "--dynamic"][..], "d.vhd", "vpc"),
    ] {
        let mut shas = Vec::new();
        for n in 0..2 {
            let o = dir.join(format!("{n}{out}"));
            let out = run_ok(
                kiln()
                    .arg("convert")
                    .arg(&raw)
                    .args(args)
                    .arg("--sha256")
                    .arg("-o")
                    .arg(&o),
            );
            check_and_compare(&raw, &o, fmt);
            shas.push(sha(&o));
            let said = String::from_utf8_lossy(&out.stderr).to_string();
            assert!(
                said.contains(&format!("sha256 {})", sha(&o))),
                "kiln convert {args:?} reported another sha256: {said}"
            );
        }
        assert_eq!(
            shas[0], shas[1],
            "kiln convert {args:?} is not reproducible"
        );
    }
    // Without --sha256 kiln convert prints no digest, and writes the bytes the build wrote.
    for ext in ["qcow2", "vhd"] {
        let o = dir.join(format!("c.{ext}"));
        let out = run_ok(
            kiln()
                .arg("convert")
                .arg(&raw)
                .args(["--to", ext, "-o"])
                .arg(&o),
        );
        let said = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!said.contains("sha256"), "{said}");
        let built = dir.join(format!("a/appliance_1.{ext}"));
        assert_eq!(
            sha(&o),
            sha(&built),
            "kiln convert --to {ext} and the build differ"
        );
    }
    let plain = fs::metadata(dir.join("a/appliance_1.qcow2")).unwrap().len();
    let packed = fs::metadata(dir.join("0z.qcow2")).unwrap().len();
    assert!(packed < plain, "zstd qcow2 {packed} bytes, plain {plain}");

    // The qcow2 boots (QEMU gets format=qcow2 from kiln boot's detection).
    let out = qemu::boot(&BootOptions {
        image: Some(dir.join("a/appliance_1.qcow2")),
        firmware: Firmware::Ovmf(None),
        expect: Some("APPLIANCE-DONE".into()),
        timeout: Duration::from_secs(180),
        ..BootOptions::default()
    })
    .unwrap();
    eprintln!("boot qcow2: {}", out.summary());
    assert!(
        out.success(),
        "qcow2 boot: {}\n--- console ---\n{}\n--- qemu ---\n{}",
        out.summary(),
        out.console,
        out.qemu_stderr
    );
}

/// Bad invocations are refused with a message, and leave no output behind.
#[test]
fn convert_refuses_bad_input() {
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("r.img");
    fs::write(&raw, vec![7u8; 1 << 20]).unwrap();
    let q = d.path().join("r.qcow2");
    run_ok(
        kiln()
            .arg("convert")
            .arg(&raw)
            .args(["--to", "qcow2"])
            .arg("-o")
            .arg(&q),
    );
    // A qcow2 is not a raw disk.
    let o = run(kiln()
        .arg("convert")
        .arg(&q)
        .args(["--to", "vmdk"])
        .arg("-o")
        .arg(d.path().join("x.vmdk")));
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already a qcow2"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Compression is a qcow2 option.
    let o = run(kiln()
        .arg("convert")
        .arg(&raw)
        .args(["--to", "vhd", "--compression", "zstd"])
        .arg("-o")
        .arg(d.path().join("x.vhd")));
    assert!(!o.status.success());
    assert!(!d.path().join("x.vhd").exists() && !d.path().join("x.vmdk").exists());
}
