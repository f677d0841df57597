//! Container images as sources (`oci-layout:`, `docker-archive:`, `oci://`), against the
//! reference unpacker: `umoci raw unpack` of the same image gives the tree that the kernel must
//! read from kiln's ext4 and EROFS images (paths, modes, owners, xattrs, link targets, bytes,
//! hardlinks). The images are written by hand (`oci_support/layout.py`): three layers that
//! exercise every whiteout rule of the image-spec, and the bad inputs kiln must refuse.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod ship_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_testkit::oracle::{self, Fs};
use ship_support::*;

const LAYOUT_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/oci_support/layout.py");

fn layout(dir: &Path, case: &str) -> PathBuf {
    let p = dir.join(case);
    ok(Command::new(tool("python3"))
        .arg(LAYOUT_PY)
        .arg(&p)
        .arg(case));
    p
}

fn mkfs(fs: &str, source: &str, out: &Path) -> std::process::Output {
    run(kiln().args(["mkfs", fs, source, "-o"]).arg(out))
}

fn mkfs_ok(fs: &str, source: &str, out: &Path) {
    let o = mkfs(fs, source, out);
    assert!(
        o.status.success(),
        "kiln mkfs {fs} {source}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The tree umoci unpacks, without the `lost+found` that only ext4 adds.
fn reference(layout: &Path, dir: &Path) -> oracle::Manifest {
    let rootfs = dir.join("umoci-rootfs");
    ok(Command::new(tool("umoci"))
        .args(["raw", "unpack", "--image"])
        .arg(format!("{}:v1", layout.display()))
        .arg(&rootfs));
    oracle::scan(&rootfs)
}

fn without_lost_found(mut m: oracle::Manifest) -> oracle::Manifest {
    m.entries.remove(&b"lost+found"[..]);
    m
}

fn assert_kernel_reads(what: &str, want: &oracle::Manifest, img: &Path, fs: Fs) {
    if !oracle::host_can_mount(fs) {
        oracle::check_on_host(what, want, img, fs);
        return;
    }
    let got = without_lost_found(oracle::host_read(img, fs));
    oracle::assert_same(what, want, &got, fs);
}

#[test]
fn layers_and_whiteouts_match_umoci_from_a_layout_an_archive_and_a_registry() {
    let t = tempfile::tempdir().unwrap();
    // umoci 0.4 reads no zstd: its reference comes from the same layers with the zstd one
    // gzip-compressed (identical diff_ids); kiln reads the zstd original.
    let want = reference(&layout(t.path(), "whiteouts-gzip"), t.path());
    for gone in [
        "c", "a/f1", "b/x", "opq/o1", "e", "h1", "sym", "a/sub", "d/y",
    ] {
        assert!(
            !want.entries.contains_key(gone.as_bytes()),
            "umoci kept {gone}: the test image does not do what it says"
        );
    }
    let img = layout(t.path(), "whiteouts");
    let src = format!("oci-layout:{}:v1", img.display());

    for (fs, f) in [("ext4", Fs::Ext4), ("erofs", Fs::Erofs)] {
        let out = t.path().join(format!("layout.{fs}"));
        mkfs_ok(fs, &src, &out);
        assert_kernel_reads(&format!("{src} as {fs}"), &want, &out, f);
    }

    // docker-archive: skopeo writes what `docker save` writes (uncompressed layers).
    let archive = t.path().join("image.tar");
    ok(Command::new(tool("skopeo"))
        .args(["copy", "--quiet"])
        .arg(format!(
            "oci:{}:v1",
            t.path().join("whiteouts-gzip").display()
        ))
        .arg(format!("docker-archive:{}:test/img:v1", archive.display())));
    let out = t.path().join("archive.ext4");
    mkfs_ok(
        "ext4",
        &format!("docker-archive:{}", archive.display()),
        &out,
    );
    assert_kernel_reads("docker-archive as ext4", &want, &out, Fs::Ext4);

    // A registry: pushed by skopeo, read by kiln's client, each blob once.
    let reg = registry();
    ok(Command::new(tool("skopeo"))
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:v1", img.display()))
        .arg(format!("docker://{}/test/whiteouts:v1", reg.addr())));
    let out = t.path().join("registry.ext4");
    mkfs_ok(
        "ext4",
        &format!("oci://{}/test/whiteouts:v1", reg.addr()),
        &out,
    );
    assert_kernel_reads("oci:// as ext4", &want, &out, Fs::Ext4);
}

#[test]
fn build_report_records_the_image_config_and_the_service_unit() {
    let t = tempfile::tempdir().unwrap();
    let img = layout(t.path(), "whiteouts");
    let spec = t.path().join("kiln.toml");
    std::fs::write(
        &spec,
        format!(
            "[image]\nname = \"ctr\"\nversion = \"1\"\nseed = \"0123456789abcdef0123456789abcdef\"\n\n\
             [source]\ntree = \"oci-layout:{}:v1\"\nservice = \"agent\"\n\n\
             [[partition]]\ntype = \"root\"\nfs = \"ext4\"\n",
            img.display()
        ),
    )
    .unwrap();
    let out = t.path().join("out");
    let report = ok(kiln()
        .args(["build", "--quiet", "--json", "-o"])
        .arg(&out)
        .arg(&spec));
    let r: serde_json::Value = serde_json::from_str(&report).unwrap();
    let image = &r["image"];
    assert_eq!(image["entrypoint"], serde_json::json!(["/bin/sh", "-c"]));
    assert_eq!(image["cmd"], serde_json::json!(["echo $GREETING"]));
    assert_eq!(image["user"], "1000:1000");
    assert_eq!(image["working_dir"], "/srv");
    assert_eq!(image["layers"].as_array().unwrap().len(), 3);
    assert!(image["config_digest"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    // The unit is in the root partition, as the kernel reads it.
    let disk = out.join(r["disk"]["file"].as_str().unwrap());
    let part = &r["partitions"][0];
    let (off, size) = (
        part["offset"].as_u64().unwrap(),
        part["size"].as_u64().unwrap(),
    );
    let root = t.path().join("root.ext4");
    ok(Command::new("dd")
        .arg(format!("if={}", disk.display()))
        .arg(format!("of={}", root.display()))
        .args(["bs=1M", "iflag=skip_bytes,count_bytes", "status=none"])
        .arg(format!("skip={off}"))
        .arg(format!("count={size}")));
    if !oracle::host_can_mount(Fs::Ext4) {
        oracle::check_on_host("root", &oracle::Manifest::default(), &root, Fs::Ext4);
        return;
    }
    let m = oracle::host_read(&root, Fs::Ext4);
    let unit = m
        .entries
        .get(&b"etc/systemd/system/agent.service"[..])
        .expect("agent.service in the root");
    assert_eq!(unit.kind, oracle::Kind::File);
    let link = m
        .entries
        .get(&b"etc/systemd/system/multi-user.target.wants/agent.service"[..])
        .expect("the unit is enabled");
    assert_eq!(link.target.as_deref(), Some(&b"../agent.service"[..]));
}

/// Each bad input fails with an error naming what is wrong, and leaves no output behind.
#[test]
fn bad_images_are_refused_with_no_output() {
    let t = tempfile::tempdir().unwrap();
    let check = |what: &str, src: &str, needles: &[&str]| {
        let outdir = t.path().join(format!("out-{what}"));
        std::fs::create_dir_all(&outdir).unwrap();
        let out = outdir.join("img.ext4");
        let o = mkfs("ext4", src, &out);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{what}: kiln accepted it");
        for n in needles {
            assert!(
                err.contains(n),
                "{what}: the error does not say {n:?}:\n{err}"
            );
        }
        let left: Vec<_> = std::fs::read_dir(&outdir).unwrap().collect();
        assert!(left.is_empty(), "{what}: left {left:?} behind");
    };

    // A layer whose bytes changed after the manifest was written: the uncompressed third
    // layer keeps parsing, so only the digests can catch it.
    let img = layout(t.path(), "whiteouts");
    let idx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(img.join("index.json")).unwrap()).unwrap();
    let blob = |d: &serde_json::Value| img.join("blobs/sha256").join(&d.as_str().unwrap()[7..]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(&idx["manifests"][0]["digest"])).unwrap())
            .unwrap();
    let plain = blob(&manifest["layers"][2]["digest"]);
    let mut bytes = std::fs::read(&plain).unwrap();
    let at = bytes
        .windows(8)
        .position(|w| w == b"changed\n")
        .expect("file data in the plain layer");
    bytes[at] = b'C';
    std::fs::write(&plain, &bytes).unwrap();
    let src = format!("oci-layout:{}:v1", img.display());
    check(
        "digest",
        &src,
        &[
            "layer 3 of 3",
            "sha256 mismatch",
            &manifest["layers"][2]["digest"].as_str().unwrap()[..20],
        ],
    );

    // A truncated gzip layer (the first).
    let img = layout(&t.path().join("trunc"), "whiteouts");
    let idx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(img.join("index.json")).unwrap()).unwrap();
    let blob = |d: &serde_json::Value| img.join("blobs/sha256").join(&d.as_str().unwrap()[7..]);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(&idx["manifests"][0]["digest"])).unwrap())
            .unwrap();
    let first = blob(&manifest["layers"][0]["digest"]);
    let len = std::fs::metadata(&first).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&first)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    check(
        "truncated",
        &format!("oci-layout:{}:v1", img.display()),
        &["layer 1 of 3"],
    );

    // A whiteout that climbs out of the root.
    let img = layout(t.path(), "escape");
    check(
        "escape",
        &format!("oci-layout:{}:v1", img.display()),
        &["layer 1 of 1", "../.wh.x", "`..`"],
    );

    // An index with no manifest for the host's architecture.
    let img = layout(t.path(), "noarch");
    check(
        "noarch",
        &format!("oci-layout:{}:v1", img.display()),
        &["no manifest for linux/amd64", "linux/arm64"],
    );
}
